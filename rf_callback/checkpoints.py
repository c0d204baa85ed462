"""Lightning checkpoints loaded for comparison: the model rebuilt on the CPU, its run, epoch and step.

:func:`load_checkpoint` checks the archive's checksums, reads the file with ``torch.load(...,
weights_only=True)`` (no code from the file runs) and rebuilds the LightningModule; :func:`monitor_state`
finds what a :class:`~rf_callback.ReceptiveFieldMonitor` (or a subclass) stored in it; :func:`load_probes`
reads probe images from a tensor file or a checkpoint.

A file never chooses what code runs: the model class a checkpoint names is taken only from modules that
are already imported, unless the caller allows importing it (``import_class=True``, ``--import-class``)
or names the class itself (``model_class=``, ``--model``).
"""

from __future__ import annotations

import inspect
import os
import pickle
import pkgutil
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from rf_callback.errors import CheckpointError, CompareError

__all__ = ["Checkpoint", "brief", "checkpoint_labels", "load_checkpoint", "load_probes", "monitor_state"]


@dataclass(frozen=True)
class Checkpoint:
    """A Lightning checkpoint loaded for comparison.

    Attributes:
        path: the file.
        label: how figures and tables name it (the file name without ``.ckpt``, plus parent folders
            when two checkpoints share a name).
        model: the LightningModule, on the CPU, in eval mode.
        model_class: ``package.module.QualName`` of the model.
        epoch: the checkpoint's epoch (``None`` when it does not say).
        step: its global step (``None`` when it does not say).
        monitor: the state a :class:`~rf_callback.ReceptiveFieldMonitor` stored in it (``probes``,
            ``layers``, ``unit``...), or ``None``.
        logged_step: the step its run's ReceptiveFieldMonitor logged this very state at, where TensorBoard
            shows its maps and the validation metrics beside them (Lightning logs an epoch's validation at
            the index of its last batch: ``step - 1``); ``None`` when the run logged no maps of it.
    """

    path: Path
    label: str
    model: LightningModule
    model_class: str
    epoch: int | None
    step: int | None
    monitor: Mapping[str, Any] | None
    logged_step: int | None = None

    @property
    def class_name(self) -> str:
        return self.model_class.rpartition(".")[2]

    @property
    def when(self) -> str:
        """``epoch 3, step 1720``, and the step TensorBoard shows it at where that differs:
        ``epoch 3, step 1720 (TensorBoard step 1719)``; what is known of it."""
        parts = [f"{name} {value}" for name, value in (("epoch", self.epoch), ("step", self.step)) if value is not None]
        logged = f" (TensorBoard step {self.logged_step})" if self.logged_step not in (None, self.step) else ""
        return (", ".join(parts) or "epoch unknown") + logged


def load_checkpoint(
    path: str | os.PathLike,
    model_class: type[LightningModule] | None = None,
    label: str | None = None,
    *,
    import_class: bool = False,
) -> Checkpoint:
    """Load a Lightning checkpoint and rebuild its model on the CPU, in eval mode.

    The archive's checksums are verified, the file is read with ``torch.load(..., weights_only=True)``
    (no code from the file runs), then the model is rebuilt with ``model_class.load_from_checkpoint``.
    Without ``model_class``, the class is the one the checkpoint names: the ``model_class`` its
    ReceptiveFieldMonitor state holds, else LightningCLI's ``_class_path`` hyper-parameter. A file must
    not choose what code runs, so that class is looked up only in modules already imported (as in the
    notebook or script that trained it), unless ``import_class`` allows importing its module.

    Args:
        path: the ``.ckpt`` file.
        model_class: the LightningModule subclass to rebuild, instead of the one the checkpoint names.
        label: the checkpoint's name in figures and tables (default: the file name without suffix).
        import_class: import the module of the class the checkpoint names, if it is not imported yet:
            that runs the module's code, so only for files you trust.

    Raises:
        CheckpointError: if the file is missing, damaged (a checksum does not match), unreadable or not a
            Lightning checkpoint, if it names no model class, one whose module is not imported (without
            ``import_class``) or one that cannot be imported, or if the model cannot be rebuilt from it.

    Example::

        checkpoint = load_checkpoint("lightning_logs/small_cnn/version_0/checkpoints/epoch=4-step=2150.ckpt")
        checkpoint.model_class, checkpoint.epoch, checkpoint.monitor["probes"].shape
    """
    path = Path(path)
    contents = _read(path)
    monitor = monitor_state(contents)
    cls = model_class if model_class is not None else _named_class(path, contents, monitor, import_class)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise CheckpointError(
            path, f"{_name_of(cls)} is not a LightningModule subclass. HINT: give the LightningModule that was trained."
        )
    try:
        model = cls.load_from_checkpoint(path, map_location="cpu")
    except Exception as error:  # any failure to rebuild is this checkpoint's problem, said in one line
        raise CheckpointError(
            path,
            f"cannot rebuild {_name_of(cls)} from it: {brief(error)}. HINT: the class"
            " must be the one trained, calling self.save_hyperparameters() in __init__ (or name it with model_class).",
        ) from error
    model.eval()
    epoch, step = contents.get("epoch"), contents.get("global_step")
    step = step if isinstance(step, int) else None
    logged = (monitor or {}).get("logged_at")  # (global step, logged step) of the monitor's last maps
    return Checkpoint(
        path=path,
        label=label or path.stem,
        model=model,
        model_class=_name_of(cls),
        epoch=epoch if isinstance(epoch, int) else None,
        step=step,
        monitor=monitor,
        logged_step=logged[1] if isinstance(logged, (list, tuple)) and len(logged) == 2 and logged[0] == step else None,
    )


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(
            path, "no such file. HINT: check the path; checkpoints are usually under <log_dir>/checkpoints/."
        )
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file. HINT: name the .ckpt files inside it.")
    try:
        contents = _load_verified(path)
    except CheckpointError:
        raise
    except Exception as error:  # whatever torch.load meets, the file cannot be read as a checkpoint
        hint = (
            "it is not a checkpoint, or holds objects other than tensors and plain values, which torch.load(...,"
            " weights_only=True) refuses, as load_from_checkpoint does"
            if isinstance(error, pickle.UnpicklingError)
            else "the file may be truncated or corrupted; give a .ckpt file that Lightning wrote completely"
        )
        raise CheckpointError(path, f"cannot be read as a checkpoint ({brief(error)}). HINT: {hint}.") from error
    if not isinstance(contents, dict) or "state_dict" not in contents or "pytorch-lightning_version" not in contents:
        found = (
            f"a dict with keys {', '.join(map(str, list(contents)[:6]))}{'...' if len(contents) > 6 else ''}"
            if isinstance(contents, dict)
            else f"a {type(contents).__name__}"
        )
        raise CheckpointError(
            path,
            f"not a Lightning checkpoint: it holds {found}, without 'state_dict' and 'pytorch-lightning_version'."
            " HINT: give .ckpt files written by Lightning (ModelCheckpoint or trainer.save_checkpoint).",
        )
    return contents


def _load_verified(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` of a file whose archive checksums all match.

    ``torch.save`` writes a zip archive, each record with a CRC-32 of its bytes: a file damaged after it
    was written (a bad disk, an interrupted copy, bytes overwritten) is refused before anything is read
    from it. Files in torch's old, non-zip format carry no checksum and are read as they are.

    Raises:
        CheckpointError: naming the damaged record.
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except Exception as error:  # zipfile and zlib raise several kinds for a damaged archive
            raise CheckpointError(
                path, f"is a damaged archive ({brief(error)}). HINT: use another copy of it; it cannot be trusted."
            ) from error
        if damaged is not None:
            raise CheckpointError(
                path,
                f"is damaged: the checksum of '{damaged}' inside it does not match its bytes (it changed after it was"
                " written). HINT: use another copy of it; its numbers cannot be trusted.",
            )
    return torch.load(path, map_location="cpu", weights_only=True)


def monitor_state(contents: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The state a ReceptiveFieldMonitor (or a subclass of it) stored in the checkpoint, if any."""
    callbacks = contents.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    return next(
        (
            state
            for key, state in callbacks.items()
            if isinstance(state, Mapping)
            and str(state.get("format", "")).startswith("rf_callback.ReceptiveFieldMonitor")
            or isinstance(key, str)
            and key.startswith("ReceptiveFieldMonitor")
            and isinstance(state, Mapping)
        ),
        None,
    )


def _named_class(path: Path, contents: Mapping[str, Any], monitor: Mapping[str, Any] | None, import_class: bool) -> Any:
    hyper_parameters = contents.get("hyper_parameters")
    candidates = [
        (monitor or {}).get("model_class"),
        hyper_parameters.get("_class_path") if isinstance(hyper_parameters, Mapping) else None,
    ]
    name = next((c for c in candidates if isinstance(c, str) and c), None)
    if name is None:
        raise CheckpointError(
            path,
            "does not name its model class (no ReceptiveFieldMonitor state, no LightningCLI '_class_path')."
            " HINT: name it: model_class=MyModule, or --model package.module:MyModule on the command line.",
        )
    if not import_class:
        found = _imported(name)
        if found is None:
            raise CheckpointError(
                path,
                f"it names its model class '{name}', from a module that is not imported here; importing it would run"
                " that module's code, which a file must not choose. HINT: name the class yourself: --model"
                f" {name} (model_class=... in Python), or add --import-class (import_class=True) for a file you"
                " trust.",
            )
        return found
    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError) as error:
        raise CheckpointError(
            path,
            f"its model class '{name}' cannot be imported ({brief(error)}). HINT: run"
            " from the project that defines it (or install it), or name the class: --model package.module:Class.",
        ) from error


def _imported(name: str) -> Any:
    """The object ``package.module.Name`` (or ``package.module:Name``) names, found in the modules already imported
    without running any code (no import, no module ``__getattr__``, no descriptor); ``None`` if it is not there.

    Example::
        >>> _imported("collections.OrderedDict").__name__, _imported("this.Zen"), _imported("collections.nope")
        ('OrderedDict', None, None)
    """
    module_name, colon, attributes = name.partition(":")
    parts = module_name.split(".")
    if colon:
        start, rest = module_name, attributes.split(".") if attributes else []
    else:
        start = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in sys.modules), "")
        rest = parts[len(start.split(".")) :] if start else []
    obj = sys.modules.get(start)
    for attribute in rest:
        try:
            obj = inspect.getattr_static(obj, attribute)
        except AttributeError:
            return None
    return obj


def _name_of(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)


def brief(error: BaseException) -> str:
    """The gist of another library's error message, on one line: its first sentence, at most 200 characters.

    Example::
        >>> brief(RuntimeError("Error(s) in loading state_dict for Net:\\n\\tMissing key(s): fc.weight. More."))
        'RuntimeError: Error(s) in loading state_dict for Net: Missing key(s): fc.weight'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["no message"]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    text = text.split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {text if len(text) <= 200 else text[:197] + '...'}"


def checkpoint_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest tails of the paths (run / version / file, without ``checkpoints/`` and ``.ckpt``) that tell
    them apart, all built the same way: one depth for every label.

    Example::
        >>> checkpoint_labels([Path("a/version_0/checkpoints/last.ckpt"), Path("a/version_1/checkpoints/last.ckpt")])
        ['version_0/last', 'version_1/last']
        >>> checkpoint_labels([Path("run/epoch=0-step=4.ckpt"), Path("run/epoch=1-step=8.ckpt")])
        ['epoch=0-step=4', 'epoch=1-step=8']
    """
    parts = [[part for part in path.absolute().with_suffix("").parts if part != "checkpoints"] for path in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p[-1]} [{index}]" for index, p in enumerate(parts)]  # a file given twice


def load_probes(path: str | os.PathLike) -> Tensor:
    """The probe images in a ``torch.save``'d tensor file, or those a ReceptiveFieldMonitor stored in a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(
            f"probes '{path}': no such file. HINT: give a file holding a tensor (N, C, H, W) (torch.save) or a"
            " checkpoint with ReceptiveFieldMonitor state."
        )
    try:
        contents = _load_verified(path)
    except CheckpointError as error:
        raise CompareError(f"probes {error}") from error
    except Exception as error:  # any failure to read is said in one line
        raise CompareError(f"probes '{path}': cannot be read ({brief(error)}).") from error
    if isinstance(contents, Tensor):
        return contents
    state = monitor_state(contents) if isinstance(contents, Mapping) else None
    state = state if state is not None else contents
    if isinstance(state, Mapping) and isinstance(state.get("probes"), Tensor):
        return state["probes"]
    raise CompareError(
        f"probes '{path}': holds a {type(contents).__name__} with no probe tensor. HINT: torch.save(images, path)"
        " with images of shape (N, C, H, W), or give a checkpoint with ReceptiveFieldMonitor state."
    )
