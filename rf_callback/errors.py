"""Errors of the receptive-field engine: each names what was asked, what was found and how to fix it."""

from __future__ import annotations

from rf_callback.algebra import MisalignedBranchesError

__all__ = ["MisalignedBranchesError", "TraceError", "UnsupportedLayerError"]


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
        where = f"'{module_name}' ({module_type})" if module_name else f"the top-level forward ({module_type})"
        super().__init__(
            f"Cannot compute receptive fields through {operation} in {where}: {reason}. HINT: pass"
            " strict=False to get the table with the layers that depend on it flagged as unsupported."
        )


class TraceError(RuntimeError):
    """The model's ``forward`` could not run on the meta device."""
