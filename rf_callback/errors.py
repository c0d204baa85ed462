"""Every error rf_callback raises on purpose, in one module that imports nothing outside the standard library.

Each message says what was asked, what was found and how to fix it; errors that carry data keep it
as attributes, so that programs need not parse messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "CompareError",
    "DiskSpaceError",
    "MisalignedBranchesError",
    "TraceError",
    "UnsupportedLayerError",
]


class UnsupportedLayerError(ValueError):
    """The model uses an operation with no single receptive field per unit, or misaligned branches.

    Attributes:
        module_name: the module (``model.named_modules()`` path) where it happened; ``""`` for
            the top-level ``forward``.
        module_type: that module's class name.
        operation: the ATen operation, e.g. ``aten.upsample_nearest2d.vec``.
        reason: why it has no receptive field.
    """

    def __init__(self, module_name: str, module_type: str, operation: str, reason: str) -> None:
        self.module_name = module_name
        self.module_type = module_type
        self.operation = operation
        self.reason = reason
        super().__init__(
            f"Cannot compute receptive fields through {self.cause}. HINT: pass"
            " strict=False to get the table with the layers that depend on it flagged as unsupported."
        )

    @property
    def cause(self) -> str:
        """The operation, where it ran and why: ``aten.grid_sampler_2d.default in 'up' (Warp): <reason>``."""
        name, kind = self.module_name, self.module_type
        where = f"'{name}' ({kind})" if name else f"the top-level forward ({kind})"
        return f"{self.operation} in {where}: {self.reason}"


class MisalignedBranchesError(ValueError):
    """Branches meeting at a merge (add, concat, ...) move at different effective strides.

    Their units do not map to one interval per output position, so no single receptive field
    describes the merge. ``where`` names the merge point; ``branches`` hold each branch's geometry.
    """

    def __init__(self, where: str, branches: Sequence[Any]) -> None:
        self.where = where
        self.branches = tuple(branches)
        jumps = ", ".join(str(branch.jump) for branch in self.branches)
        super().__init__(
            f"Branches merged at {where} have different effective strides ({jumps}), so their units do not"
            " line up and no single receptive field describes the result. HINT: resample the branches to"
            " the same stride before merging them, or leave this layer out."
        )


class DiskSpaceError(OSError):
    """A destination's disk is full, or nearly: its images stop for the rest of the run (its scalars go on)."""


class TraceError(RuntimeError):
    """The model's ``forward`` could not run on the meta device."""


class CompareError(ValueError):
    """Bad input to a checkpoint comparison; the message is one line: what was asked, what was found, how to fix it."""


class CheckpointError(CompareError):
    """A checkpoint that cannot be compared: missing, unreadable, not from Lightning, or its model not rebuilt.

    Attributes:
        path: the checkpoint file.
        problem: what is wrong with it.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")
