"""Compare checkpoints: receptive maps and ERF statistics of several training checkpoints side by side.

:func:`compare_checkpoints` loads Lightning checkpoints (the model class is read from the checkpoint:
the state :class:`~rf_callback.ReceptiveFieldMonitor` keeps, or LightningCLI's ``_class_path``), looks
at the layers they share through the same probe images, and returns a :class:`Comparison`.
:func:`write_comparison` writes it all at once or not at all: a figure with one row per layer and one
column per checkpoint, the ERF statistics as CSV and Markdown, a chart of ERF size against checkpoint
and, on request, a TensorBoard run with one step per checkpoint.

Example::

    comparison = compare_checkpoints(sorted(Path("lightning_logs/small_cnn/version_0/checkpoints").glob("*.ckpt")))
    print(comparison.format_table())
    write_comparison(comparison, "compare_out", tensorboard="lightning_logs/compare")
"""

from __future__ import annotations

import csv
import importlib
import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from rf_callback.callback import SCALARS, TAG
from rf_callback.errors import TraceError
from rf_callback.fields import ReceptiveFieldTable, receptive_fields
from rf_callback.render import layer_grid
from rf_callback.report import pair
from rf_callback.saliency import ReceptiveMaps, Unit, default_layers, receptive_maps

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image, ImageFont

__all__ = [
    "FASHION_MNIST",
    "CheckpointError",
    "Checkpoint",
    "CompareError",
    "Comparison",
    "compare_checkpoints",
    "fashion_mnist_probes",
    "load_checkpoint",
    "write_comparison",
]

FASHION_MNIST = "fashion-mnist"
"""``probes=FASHION_MNIST``: the first validation image of each Fashion-MNIST class."""

DATA_DIR = "data"
SOURCE_DIRS = ("../shared/data/FashionMNIST/raw",)
"""Where :func:`fashion_mnist_probes` looks, relative to the working directory (as ``configs/default.yaml``)."""

PROBE_PIXELS = 84
"""Screen pixels per probe side in the figure."""


class CompareError(ValueError):
    """Bad input to a comparison; the message is one line: what was asked, what was found, how to fix it."""


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
    """

    path: Path
    label: str
    model: LightningModule
    model_class: str
    epoch: int | None
    step: int | None
    monitor: Mapping[str, Any] | None

    @property
    def class_name(self) -> str:
        return self.model_class.rpartition(".")[2]

    @property
    def when(self) -> str:
        """``epoch 3, step 1290``; what is known of it."""
        parts = [f"{name} {value}" for name, value in (("epoch", self.epoch), ("step", self.step)) if value is not None]
        return ", ".join(parts) or "epoch unknown"


def load_checkpoint(
    path: str | os.PathLike, model_class: type[LightningModule] | None = None, label: str | None = None
) -> Checkpoint:
    """Load a Lightning checkpoint and rebuild its model on the CPU, in eval mode.

    The file is read with ``torch.load(..., weights_only=True)`` (no code from the file runs), then the
    model with ``model_class.load_from_checkpoint``. Without ``model_class``, the class is the one the
    checkpoint names: the ``model_class`` its ReceptiveFieldMonitor state holds, else LightningCLI's
    ``_class_path`` hyper-parameter; its module is imported.

    Args:
        path: the ``.ckpt`` file.
        model_class: the LightningModule subclass to rebuild, instead of the one the checkpoint names.
        label: the checkpoint's name in figures and tables (default: the file name without suffix).

    Raises:
        CheckpointError: if the file is missing, unreadable or not a Lightning checkpoint, if it names no
            model class or one that cannot be imported, or if the model cannot be rebuilt from it.

    Example::

        checkpoint = load_checkpoint("lightning_logs/small_cnn/version_0/checkpoints/epoch=4-step=2150.ckpt")
        checkpoint.model_class, checkpoint.epoch, checkpoint.monitor["probes"].shape
    """
    path = Path(path)
    contents = _read(path)
    monitor = _monitor_state(contents)
    cls = model_class if model_class is not None else _named_class(path, contents, monitor)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise CheckpointError(
            path, f"{_name_of(cls)} is not a LightningModule subclass. HINT: give the LightningModule that was trained."
        )
    try:
        model = cls.load_from_checkpoint(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any failure to rebuild is this checkpoint's problem, said in one line
        raise CheckpointError(
            path,
            f"cannot rebuild {_name_of(cls)} from it: {_brief(error)}. HINT: the class"
            " must be the one trained, calling self.save_hyperparameters() in __init__ (or name it with model_class).",
        ) from error
    model.eval()
    epoch, step = contents.get("epoch"), contents.get("global_step")
    return Checkpoint(
        path=path,
        label=label or path.stem,
        model=model,
        model_class=_name_of(cls),
        epoch=epoch if isinstance(epoch, int) else None,
        step=step if isinstance(step, int) else None,
        monitor=monitor,
    )


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(
            path, "no such file. HINT: check the path; checkpoints are usually under <log_dir>/checkpoints/."
        )
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file. HINT: name the .ckpt files inside it.")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch.load meets, the file cannot be read as a checkpoint
        hint = (
            "it is not a checkpoint, or holds objects other than tensors and plain values, which torch.load(...,"
            " weights_only=True) refuses, as load_from_checkpoint does"
            if isinstance(error, pickle.UnpicklingError)
            else "the file may be truncated or corrupted; give a .ckpt file that Lightning wrote completely"
        )
        raise CheckpointError(path, f"cannot be read as a checkpoint ({_brief(error)}). HINT: {hint}.") from error
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


def _monitor_state(contents: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The state of the first ReceptiveFieldMonitor stored in the checkpoint, if any."""
    callbacks = contents.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    return next(
        (
            state
            for key, state in callbacks.items()
            if isinstance(key, str) and key.startswith("ReceptiveFieldMonitor") and isinstance(state, Mapping)
        ),
        None,
    )


def _named_class(path: Path, contents: Mapping[str, Any], monitor: Mapping[str, Any] | None) -> Any:
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
    try:
        return _import(name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(
            path,
            f"its model class '{name}' cannot be imported ({_brief(error)}). HINT: run"
            " from the project that defines it (or install it), or name the class: --model package.module:Class.",
        ) from error


def _import(name: str) -> Any:
    """``package.module.Qual.Name`` or ``package.module:Qual.Name`` → the object (the longest importable module).

    Example::
        >>> _import("collections.OrderedDict").__name__, _import("collections:OrderedDict.fromkeys").__name__
        ('OrderedDict', 'fromkeys')
    """
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
        return value
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            value = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name) and split > 1:
                continue  # a shorter prefix may be the module; a missing dependency inside it is re-raised
            raise
        for part in parts[split:]:
            value = getattr(value, part)
        return value
    raise ImportError(f"'{name}' names no module; write package.module.Class")


def _name_of(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)


def _brief(error: BaseException) -> str:
    """The gist of another library's error message, on one line: its first sentence, at most 200 characters.

    Example::
        >>> _brief(RuntimeError("Error(s) in loading state_dict for Net:\\n\\tMissing key(s): fc.weight. More."))
        'RuntimeError: Error(s) in loading state_dict for Net: Missing key(s): fc.weight'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["no message"]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    text = text.split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {text if len(text) <= 200 else text[:197] + '...'}"


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each file's name without suffix, with as many parent folders as it takes to tell them apart.

    Example::
        >>> _labels([Path("a/version_0/last.ckpt"), Path("a/version_1/last.ckpt"), Path("a/epoch=1.ckpt")])
        ['version_0/last', 'version_1/last', 'epoch=1']
    """
    parts = [path.absolute().with_suffix("").parts for path in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) if sum(q[-1] == p[-1] for q in parts) > 1 else p[-1] for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p[-1]} [{index}]" for index, p in enumerate(parts)]  # a file given twice


# ---- probes ------------------------------------------------------------------------------------------
def fashion_mnist_probes(data_dir: str | os.PathLike = DATA_DIR, source_dirs: Sequence[str] = SOURCE_DIRS) -> Tensor:
    """The first validation image of each Fashion-MNIST class, in class order: ``(10, 1, 28, 28)``.

    The same images a :class:`~rf_callback.ReceptiveFieldMonitor` picks by default when trained on
    :class:`~rf_callback.data.FashionMNISTDataModule`; found offline (``download=False``).

    Raises:
        CompareError: if the files are not found or not valid.
    """
    from rf_callback.data import FashionMNISTDataModule, FashionMNISTNotFoundError, IdxFormatError

    datamodule = FashionMNISTDataModule(data_dir, source_dirs=source_dirs, download=False)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except (FashionMNISTNotFoundError, IdxFormatError, ValueError) as error:
        searched = ", ".join(str(folder) for folder in datamodule.search_dirs)
        raise CompareError(
            f"the Fashion-MNIST probes cannot be read ({_brief(error)}; looked in {searched}). HINT: put the four"
            " files in one of those folders, or give probes: a file holding a tensor (N, C, H, W) or a checkpoint"
            " with ReceptiveFieldMonitor state (--probes FILE)."
        ) from error
    assert datamodule.val_dataset is not None
    images, labels = datamodule.val_dataset.tensors
    first = [int((labels == label).nonzero()[0]) for label in labels.unique().tolist()]
    return images[first]


def _probes(source: Tensor | str | os.PathLike | None, first: Checkpoint) -> tuple[Tensor, str]:
    """The probes and a phrase saying where they come from."""
    if isinstance(source, Tensor):
        probes, origin = source, "given"
    elif source is None and first.monitor is not None and isinstance(first.monitor.get("probes"), Tensor):
        probes, origin = first.monitor["probes"], f"stored by ReceptiveFieldMonitor in {first.label}"
    elif source is None or source == FASHION_MNIST:
        try:
            probes = fashion_mnist_probes()
        except CompareError as error:
            why = f"{first.label} holds no ReceptiveFieldMonitor probes, and " if source is None else ""
            raise CompareError(f"{why}{error}") from error
        origin = "Fashion-MNIST, the first validation image of each class"
    else:
        probes, origin = _probe_file(Path(source)), f"from {source}"
    if probes.dim() != 4 or len(probes) == 0 or not probes.is_floating_point():
        raise CompareError(
            f"probes {origin}: expected a float tensor (N, C, H, W) with N >= 1, got {probes.dtype} of shape"
            f" {tuple(probes.shape)}."
        )
    return probes.detach().cpu().clone(), origin


def _probe_file(path: Path) -> Tensor:
    if not path.is_file():
        raise CompareError(
            f"probes '{path}': no such file. HINT: give a file holding a tensor (N, C, H, W), a checkpoint with"
            f" ReceptiveFieldMonitor state, or '{FASHION_MNIST}'."
        )
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read is said in one line
        raise CompareError(f"probes '{path}': cannot be read ({_brief(error)}).") from error
    if isinstance(contents, Tensor):
        return contents
    state = _monitor_state(contents) if isinstance(contents, Mapping) else None
    state = state if state is not None else contents
    if isinstance(state, Mapping) and isinstance(state.get("probes"), Tensor):
        return state["probes"]
    raise CompareError(
        f"probes '{path}': holds a {type(contents).__name__} with no probe tensor. HINT: torch.save(images, path)"
        " with images of shape (N, C, H, W), or give a checkpoint with ReceptiveFieldMonitor state."
    )


# ---- the comparison -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """Receptive maps of the same probes at the layers several checkpoints share.

    Attributes:
        checkpoints: the checkpoints, in the order given.
        layers: the layers compared: those every checkpoint has.
        missing: each requested or default layer that some checkpoints lack → the labels of those.
        probes: the probe images ``(N, C, H, W)``.
        probe_origin: where the probes come from, in words.
        unit: the unit of each layer whose maps are taken.
        channel: the unit's channel (``None``: summed over channels).
        fields: each checkpoint's receptive-field table.
        maps: each checkpoint's :class:`~rf_callback.ReceptiveMaps` at ``layers``.
    """

    checkpoints: tuple[Checkpoint, ...]
    layers: tuple[str, ...]
    missing: dict[str, tuple[str, ...]]
    probes: Tensor
    probe_origin: str
    unit: Unit
    channel: int | None
    fields: tuple[ReceptiveFieldTable, ...]
    maps: tuple[ReceptiveMaps, ...]

    @cached_property
    def means(self) -> list[dict[str, list[float]]]:
        """``means[k][stat][l]``: checkpoint k's statistic (:meth:`ERFStats.mean` keys) at layer l, over the probes."""
        return [{key: values.tolist() for key, values in result.erf.mean().items()} for result in self.maps]

    def records(self) -> list[dict[str, Any]]:
        """One dict per layer and checkpoint (layer by layer): names, analytic RF and ERF statistics (CSV rows)."""
        rows = []
        for index, layer in enumerate(self.layers):
            for checkpoint, table, mean in zip(self.checkpoints, self.fields, self.means):
                row = {
                    "layer": layer,
                    "checkpoint": checkpoint.label,
                    "epoch": checkpoint.epoch,
                    "step": checkpoint.step,
                    "model": checkpoint.class_name,
                    "rf_size": pair(table[layer].size),
                    "rf_stride": pair(table[layer].stride),
                }
                row.update({tag: mean[key][index] for tag, key in SCALARS.items()})
                rows.append(row)
        return rows

    @property
    def notes(self) -> list[str]:
        """The layers left out because some checkpoints lack them, in words."""
        labels = [c.label for c in self.checkpoints]
        return [
            f"{layer}: missing from {', '.join(lacking)}; only in {', '.join(x for x in labels if x not in lacking)}"
            for layer, lacking in self.missing.items()
        ]

    def format_table(self, markdown: bool = False) -> str:
        """The ERF statistics per layer and checkpoint, aligned for a terminal or as Markdown, then the notes."""
        header = ["layer", "checkpoint", "epoch", "step", "model", "RF size", "stride", "ERF size", "ERF/RF"]
        header += ["mass side", "mass/RF", "dead"]
        rows = [
            [
                str(r["layer"]),
                str(r["checkpoint"]),
                "-" if r["epoch"] is None else str(r["epoch"]),
                "-" if r["step"] is None else str(r["step"]),
                str(r["model"]),
                str(r["rf_size"]),
                str(r["rf_stride"]),
                f"{r['erf_size']:.2f}",
                f"{r['erf_size_fraction']:.2f}",
                f"{r['erf_mass_side']:.2f}",
                f"{r['erf_mass_fraction']:.2f}",
                f"{r['dead_fraction']:.0%}",
            ]
            for r in self.records()
        ]
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
            lines = [
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
            ]
        if self.missing:
            bullet = "* " if markdown else "  "
            lines += ["", "Layers not compared (not in every checkpoint):", *(bullet + note for note in self.notes)]
        return "\n".join(lines)


def compare_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    *,
    model_class: type[LightningModule] | None = None,
    layers: Sequence[str] | None = None,
    unit: Unit | None = None,
    channel: int | None = None,
    probes: Tensor | str | os.PathLike | None = None,
) -> Comparison:
    """Load checkpoints and compute the receptive maps of the same probes at the layers they share.

    Args:
        checkpoints: Lightning checkpoint files, in the order to show them.
        model_class: the LightningModule class of every checkpoint (default: the one each names).
        layers: layer names (keys of :func:`~rf_callback.receptive_fields`); each must be in every
            checkpoint. Default: the layers each checkpoint's ReceptiveFieldMonitor watched (else every
            convolution and pooling layer), those all share compared, the others listed in ``missing``.
        unit: ``"center"``, ``"max"`` or ``(i, j)``. Default: what the first checkpoint's
            ReceptiveFieldMonitor used, else ``"center"``.
        channel: one channel of the unit (default: the monitor's, else summed over channels).
        probes: a tensor ``(N, C, H, W)``; a file holding one (``torch.save``) or a checkpoint with
            ReceptiveFieldMonitor state; or :data:`FASHION_MNIST`. Default: the probes the first
            checkpoint's ReceptiveFieldMonitor stored, else :func:`fashion_mnist_probes`.

    Returns:
        A :class:`Comparison`.

    Raises:
        CheckpointError: for a checkpoint that cannot be loaded (see :func:`load_checkpoint`).
        CompareError: for layers, units or probes that do not fit the models, or a model without
            convolution or pooling layers.

    Example::

        comparison = compare_checkpoints(["epoch=0-step=430.ckpt", "epoch=4-step=2150.ckpt"], layers=["features.conv4"])
        comparison.records()[0]["erf_size"]
    """
    if not checkpoints:
        raise CompareError("compare_checkpoints: give at least one checkpoint file.")
    paths = [Path(path) for path in checkpoints]
    loaded = tuple(load_checkpoint(p, model_class, label) for p, label in zip(paths, _labels(paths)))
    first = loaded[0].monitor or {}
    if unit is None:
        unit = _as_unit(first.get("unit", "center"))
        channel = channel if channel is not None else first.get("channel")
    _check_unit(unit, channel)
    probe_images, origin = _probes(probes, loaded[0])
    traced: dict[tuple, ReceptiveFieldTable] = {}
    tables = tuple(_fields(checkpoint, probe_images, traced) for checkpoint in loaded)
    shared, missing = _shared_layers(loaded, tables, layers)
    results = []
    for checkpoint, table in zip(loaded, tables):
        try:
            results.append(
                receptive_maps(checkpoint.model, probe_images, shared, unit=unit, channel=channel, fields=table)
            )
        except ValueError as error:
            raise CompareError(f"{checkpoint.label} ({checkpoint.class_name}): {error}") from error
    return Comparison(loaded, tuple(shared), missing, probe_images, origin, unit, channel, tables, tuple(results))


def _as_unit(value: Any) -> Unit:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_unit(unit: Any, channel: Any) -> None:
    if unit not in ("center", "max") and not (
        isinstance(unit, tuple) and len(unit) == 2 and all(isinstance(v, int) and v >= 0 for v in unit)
    ):
        raise CompareError(f"unit={unit!r}: choose 'center', 'max' or a unit position (i, j) with ints >= 0.")
    if channel is not None and (not isinstance(channel, int) or channel < 0):
        raise CompareError(f"channel={channel!r}: None (sum over channels) or an int >= 0.")


def _fields(checkpoint: Checkpoint, probes: Tensor, traced: dict[tuple, ReceptiveFieldTable]) -> ReceptiveFieldTable:
    """The model's receptive-field table, traced once per architecture.

    Checkpoints of one class with the same hyper-parameters and tensor shapes are one architecture: the
    checkpoints of one run share a single trace.
    """
    shape = tuple(probes.shape[1:])
    model = checkpoint.model
    tensors = tuple((name, tuple(value.shape)) for name, value in model.state_dict().items())
    key = (checkpoint.model_class, repr(sorted(dict(model.hparams).items())), tensors, shape)
    if key in traced:
        return traced[key]
    try:
        traced[key] = receptive_fields(model, shape, strict=False)
        return traced[key]
    except (TraceError, ValueError) as error:
        raise CompareError(
            f"{checkpoint.label} ({checkpoint.class_name}) cannot take the probes of shape {shape}:"
            f" {' '.join(str(error).split())}"
        ) from error


def _usable(table: ReceptiveFieldTable, layer: str) -> bool:
    row = table.get(layer)
    return row is not None and row.supported and len(row.output_shape) == 2


def _shared_layers(
    checkpoints: Sequence[Checkpoint], tables: Sequence[ReceptiveFieldTable], requested: Sequence[str] | None
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The layers to compare (in every checkpoint) and the others → the checkpoints that lack them."""
    own = [default_layers(c.model, table) for c, table in zip(checkpoints, tables)]
    for checkpoint, names in zip(checkpoints, own):
        if not names:
            raise CompareError(
                f"{checkpoint.label} ({checkpoint.class_name}) has no convolution or pooling layer with a receptive"
                " field: there is nothing to compare. HINT: compare checkpoints of convolutional models."
            )
    if requested is not None:
        for name in requested:
            for checkpoint, table, names in zip(checkpoints, tables, own):
                if not _usable(table, name):
                    why = "has no 2-D receptive field there" if name in table else "no such layer"
                    raise CompareError(
                        f"layers={list(requested)!r}: '{name}' {why} in {checkpoint.label} ({checkpoint.class_name})."
                        f" Layers it has: {', '.join(names)}. HINT: use names from receptive_fields(model, shape)."
                    )
        return list(dict.fromkeys(requested)), {}
    candidates: dict[str, None] = {}
    for checkpoint, names in zip(checkpoints, own):
        watched = (checkpoint.monitor or {}).get("layers")
        candidates.update(dict.fromkeys(watched if isinstance(watched, list) and watched else names))
    shared = [name for name in candidates if all(_usable(table, name) for table in tables)]
    missing = {
        name: tuple(c.label for c, table in zip(checkpoints, tables) if not _usable(table, name))
        for name in candidates
        if name not in shared
    }
    if not shared:
        listing = "; ".join(f"{c.label} has {', '.join(names)}" for c, names in zip(checkpoints, own))
        raise CompareError(
            f"the checkpoints share no layer by name ({listing}). HINT: compare checkpoints of one model."
        )
    return shared, missing


# ---- writing --------------------------------------------------------------------------------------------
def write_comparison(
    comparison: Comparison, out: str | os.PathLike, tensorboard: str | os.PathLike | None = None
) -> list[Path]:
    """Write the comparison's files into ``out``, all or none.

    Everything is written into a temporary folder next to ``out`` and moved into place at the end (files
    already in ``out`` with the same names are replaced); on any error nothing new is left behind.

    Files: ``comparison.png`` (one row per layer, one column per checkpoint: every probe with its
    saliency heatmap, the unit's analytic box and centre), ``erf.csv`` and ``erf.md`` (the statistics
    of :meth:`Comparison.records`), ``erf_size.png`` (ERF size and ERF / RF against checkpoint, per layer).
    With ``tensorboard``, also a TensorBoard run in that folder, one step per checkpoint (0, 1, ...), with
    the callback's tags: images ``receptive_field/<layer>``, scalars ``receptive_field/<layer>/<stat>``.

    Returns:
        The files written, ``out``'s first.

    Raises:
        CompareError: if ``out`` or ``tensorboard`` is an existing file, or cannot be written.
    """
    targets = [Path(out)] + ([Path(tensorboard)] if tensorboard is not None else [])
    for target in targets:
        if target.exists() and not target.is_dir():
            raise CompareError(f"'{target}' is a file; the comparison needs a folder there. HINT: choose another path.")
    grids = _grids(comparison)
    picture = _picture(comparison, grids)
    stages: list[Path] = []
    try:
        for target in targets:
            stages.append(_stage(target))
        # PNG encoding releases the GIL: it runs in a thread while matplotlib draws the chart.
        with ThreadPoolExecutor(max_workers=1) as pool:
            saved = pool.submit(picture.save, stages[0] / "comparison.png", compress_level=1)
            images = [[pool.submit(_png, grid) for grid in row] for row in grids] if tensorboard is not None else []
            _write_tables(comparison, stages[0])
            _erf_size_figure(comparison).savefig(stages[0] / "erf_size.png", pil_kwargs={"compress_level": 1})
            if tensorboard is not None:
                pngs = [[image.result() for image in row] for row in images]
                _write_tensorboard(comparison, pngs, (grids[0][0].shape[1], grids[0][0].shape[2]), stages[1])
            saved.result()
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
        written = []
        for stage, target in zip(stages, targets):
            for file in sorted(stage.iterdir()):
                os.replace(file, target / file.name)
                written.append(target / file.name)
        return written
    except OSError as error:
        raise CompareError(
            f"cannot write the comparison to {', '.join(map(str, targets))}: {_brief(error)}. HINT: choose a folder"
            " you can write to."
        ) from error
    finally:
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)


def _stage(target: Path) -> Path:
    """A new hidden folder beside ``target``, on its file system, so that files move into place by renaming."""
    target = target.absolute()
    parent = target.parent
    while not parent.is_dir():
        parent = parent.parent
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))


def _grids(comparison: Comparison) -> list[list[Tensor]]:
    """``grids[k][l]``: checkpoint k's probe grid at layer l (uint8 ``(3, H, W)``)."""
    probes = comparison.probes
    nrow = min(len(probes), 5)
    return [
        [
            layer_grid(
                probes,
                result.maps[:, index],
                result.boxes[:, index],
                result.centers[:, index],
                tile=PROBE_PIXELS,
                nrow=nrow,
            )
            for index in range(len(comparison.layers))
        ]
        for result in comparison.maps
    ]


def _png(image: Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_tables(comparison: Comparison, folder: Path) -> None:
    records = comparison.records()
    with (folder / "erf.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(
            {k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in records
        )
    (folder / "erf.md").write_text(_markdown(comparison) + "\n")


def _markdown(comparison: Comparison) -> str:
    lines = [
        "# ERF statistics across checkpoints",
        "",
        f"{len(comparison.probes)} probes ({comparison.probe_origin}); {_unit_words(comparison)}."
        " ERF size: side of a square with the area of the pixels above 4.55% of the map's peak (Luo et al.);"
        " mass side: the square around the unit's centre holding 95% of the saliency; both in input pixels,"
        " and as a fraction of the analytic RF (clipped to the image); dead: probes whose map is all zero.",
        "",
        comparison.format_table(markdown=True),
        "",
        "## Checkpoints",
        "",
        "| # | checkpoint | epoch | step | model | file |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {c.label} | {'-' if c.epoch is None else c.epoch} | {'-' if c.step is None else c.step}"
        f" | {c.model_class} | {c.path} |"
        for k, c in enumerate(comparison.checkpoints)
    ]
    return "\n".join(lines)


def _unit_words(comparison: Comparison) -> str:
    unit = comparison.unit
    where = f"unit {unit}" if isinstance(unit, tuple) else f"{unit} unit"
    return f"{where}, {'summed over channels' if comparison.channel is None else f'channel {comparison.channel}'}"


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _picture(comparison: Comparison, grids: Sequence[Sequence[Tensor]]) -> Image.Image:
    """The side-by-side figure: rows are layers, columns are checkpoints (``grids[k][l]`` from :func:`_grids`).

    Each cell is the probe grid of that layer and checkpoint, pasted as is (no resampling: one composed
    image rather than many matplotlib axes), with the mean ERF size and its fraction of the analytic RF
    below it. Row labels give the layer (and its RF when every checkpoint has the same one), column labels
    the checkpoint, its epoch and step, and the model class when the checkpoints have several.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    title_font, font = _font(16), _font(13)
    line = font.getbbox("Ag")[3] + 4
    gap = 12
    cell_h, cell_w = max(g.shape[1] for row in grids for g in row), max(g.shape[2] for row in grids for g in row)
    several_classes = len({c.model_class for c in comparison.checkpoints}) > 1
    headers = [[c.label, c.when, *([c.class_name] if several_classes else [])] for c in comparison.checkpoints]
    means = comparison.means
    row_labels = []
    for index, layer in enumerate(comparison.layers):
        shapes = {(t[layer].size, t[layer].stride) for t in comparison.fields}
        size, stride = next(iter(shapes))
        row_labels.append([layer, f"RF {pair(size)}, stride {pair(stride)}" if len(shapes) == 1 else "RF differs"])
    label_w = int(max(font.getlength(text) for label in row_labels for text in label)) + 2 * gap
    col_w = cell_w + gap
    title = f"Receptive maps of {len(comparison.probes)} probes, {_unit_words(comparison)}"
    legend = "heat: |d unit / d input|; cyan box: the unit's analytic receptive field; cyan ticks: its centre"
    width = max(label_w + len(grids) * col_w + gap, int(font.getlength(legend)) + 2 * gap)
    width = max(width, int(title_font.getlength(title)) + 2 * gap)
    top = gap + 2 * line + gap
    header_h = len(headers[0]) * line + 4
    row_h = cell_h + line + gap
    height = top + header_h + len(comparison.layers) * row_h + gap

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for k, column in enumerate(grids):
        for index, grid in enumerate(column):
            y, x = top + header_h + index * row_h, label_w + k * col_w
            canvas[y : y + grid.shape[1], x : x + grid.shape[2]] = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((gap, gap), title, fill=(0, 0, 0), font=title_font)
    draw.text((gap, gap + line + 4), legend, fill=(80, 80, 80), font=font)
    for k, header in enumerate(headers):
        for n, text in enumerate(header):
            text = _fit(text, font, cell_w)
            draw.text(
                (label_w + k * col_w, top + n * line), text, fill=(0, 0, 0) if n == 0 else (80, 80, 80), font=font
            )
    for index, label in enumerate(row_labels):
        y = top + header_h + index * row_h
        for n, text in enumerate(label):
            draw.text((gap, y + n * line), text, fill=(0, 0, 0) if n == 0 else (80, 80, 80), font=font)
        for k, (table, mean) in enumerate(zip(comparison.fields, means)):
            layer = comparison.layers[index]
            caption = f"ERF {mean['size'][index]:.1f} px, {mean['size_fraction'][index]:.0%} of RF"
            caption += f" {pair(table[layer].size)}"
            dead = mean["dead_fraction"][index]
            caption += f", {dead:.0%} dead" if dead else ""
            draw.text((label_w + k * col_w, y + cell_h + 2), _fit(caption, font, cell_w), fill=(0, 0, 0), font=font)
    return image


def _fit(text: str, font: Any, width: int) -> str:
    """``text``, shortened from the left with ``...`` until it fits in ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength("..." + text) > width:
        text = text[1:]
    return "..." + text


def _erf_size_figure(comparison: Comparison) -> Figure:
    """ERF size (input pixels) and ERF size / RF size against checkpoint, one line per layer."""
    from matplotlib.figure import Figure

    means = comparison.means
    positions = list(range(len(comparison.checkpoints)))
    figure = Figure(figsize=(max(6.0, 1.1 * len(positions) + 3.5), 6.0), dpi=100)
    size_axes, fraction_axes = figure.subplots(2, 1, sharex=True)
    for index, layer in enumerate(comparison.layers):
        size_axes.plot(positions, [m["size"][index] for m in means], "o-", label=layer)
        fraction_axes.plot(positions, [m["size_fraction"][index] for m in means], "o-")
    size_axes.set_ylabel("ERF size (input pixels)")
    fraction_axes.set_ylabel("ERF size / RF size")
    fraction_axes.set_ylim(bottom=0)
    labels = [c.when.replace(", ", "\n") if c.epoch is not None else c.label for c in comparison.checkpoints]
    fraction_axes.set_xticks(positions, labels, fontsize=8)
    fraction_axes.set_xlabel("checkpoint")
    for axes in (size_axes, fraction_axes):
        axes.grid(alpha=0.3)
    size_axes.set_title(f"Effective receptive field per layer, {_unit_words(comparison)}", fontsize=10)
    figure.subplots_adjust(left=0.1, right=0.75, top=0.93, bottom=0.14, hspace=0.08)
    figure.legend(loc="center left", bbox_to_anchor=(0.76, 0.5), title="layer", fontsize=8)
    return figure


def _write_tensorboard(comparison: Comparison, images: list[list[bytes]], size: tuple[int, int], folder: Path) -> None:
    """A TensorBoard run, step k = checkpoint k; ``images[k][l]``: the probe grids, PNG-encoded, of ``size`` (h, w)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    events = len(comparison.checkpoints) * (1 + len(comparison.layers) * (1 + len(SCALARS))) + 1
    writer = SummaryWriter(log_dir=str(folder), max_queue=events)  # a queue that never blocks; close() writes it
    try:
        writer.add_text(f"{TAG}/comparison", _markdown(comparison), 0)
        height, width = size
        for k, (checkpoint, means) in enumerate(zip(comparison.checkpoints, comparison.means)):
            writer.add_text(f"{TAG}/checkpoint", f"{checkpoint.label} ({checkpoint.when}): {checkpoint.path}", k)
            for index, layer in enumerate(comparison.layers):
                image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=images[k][index])
                writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"{TAG}/{layer}", image=image)]), k)
                for tag, key in SCALARS.items():
                    writer.add_scalar(f"{TAG}/{layer}/{tag}", means[key][index], k)
    finally:
        writer.close()
