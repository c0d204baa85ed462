"""Compare checkpoints: receptive maps and ERF statistics of several training checkpoints, as data.

:func:`compare_checkpoints` loads Lightning checkpoints (:mod:`rf_callback.checkpoints`), looks at the
layers they share through the same probe images and returns a :class:`Comparison`; nothing is written.
:func:`rf_callback.export.write_comparison` writes it to files and TensorBoard.

Example::

    comparison = compare_checkpoints(sorted(Path("lightning_logs/small_cnn/version_0/checkpoints").glob("*.ckpt")))
    print(comparison.format_table())
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor

from rf_callback.checkpoints import Checkpoint, checkpoint_labels, load_checkpoint, load_probes
from rf_callback.errors import CompareError, TraceError
from rf_callback.monitor import STATISTICS
from rf_callback.report import format_table, pair, signed
from rf_callback.saliency import ReceptiveMaps, receptive_maps
from rf_callback.selection import Unit, check_channel, check_unit, default_layers, mappable
from rf_callback.table import ReceptiveFieldTable, receptive_fields

__all__ = ["Comparison", "compare_checkpoints"]


def _probes(source: Tensor | str | os.PathLike | None, first: Checkpoint) -> tuple[Tensor, str, tuple[str, ...] | None]:
    """The probes, a phrase saying where they come from, and their captions (the class names the callback
    stored with them) when known."""
    labels = None
    if isinstance(source, Tensor):
        probes, origin = source, "given"
    elif source is None:
        stored = (first.monitor or {}).get("probes")
        if not isinstance(stored, Tensor):
            raise CompareError(
                f"{first.label} holds no ReceptiveFieldMonitor probes, so the images to look through must be given."
                " HINT: --probes FILE (a torch.save'd tensor (N, C, H, W), or a checkpoint of a run with the"
                " callback), or probes=<tensor> in Python."
            )
        probes, origin = stored, f"stored by ReceptiveFieldMonitor in {first.label}"
        captions = (first.monitor or {}).get("labels")
        if isinstance(captions, (list, tuple)) and len(captions) == len(stored):
            labels = tuple(map(str, captions))
    else:
        probes, origin = load_probes(source), f"from {source}"
    if probes.dim() != 4 or len(probes) == 0 or not probes.is_floating_point():
        raise CompareError(
            f"probes {origin}: expected a float tensor (N, C, H, W) with N >= 1, got {probes.dtype} of shape"
            f" {tuple(probes.shape)}."
        )
    return probes.detach().cpu().clone(), origin, labels


@dataclass(frozen=True)
class Comparison:
    """Receptive maps of the same probes at the layers several checkpoints share.

    Attributes:
        checkpoints: the checkpoints, in the order given.
        layers: the layers compared: those every checkpoint has.
        missing: each requested or default layer that some checkpoints lack → the labels of those.
        probes: the probe images ``(N, C, H, W)``.
        probe_origin: where the probes come from, in words.
        probe_labels: a caption per probe (the class names the callback stored with them), or ``None``.
        unit: the unit of each layer whose maps are taken.
        channel: the unit's channel (``None``: summed over channels).
        tables: each checkpoint's receptive-field table.
        maps: each checkpoint's :class:`~rf_callback.ReceptiveMaps` at ``layers``.
    """

    checkpoints: tuple[Checkpoint, ...]
    layers: tuple[str, ...]
    missing: dict[str, tuple[str, ...]]
    probes: Tensor
    probe_origin: str
    unit: Unit
    channel: int | None
    tables: tuple[ReceptiveFieldTable, ...]
    maps: tuple[ReceptiveMaps, ...]
    probe_labels: tuple[str, ...] | None = None

    @cached_property
    def means(self) -> list[dict[str, list[float]]]:
        """``means[k][stat][l]``: checkpoint k's statistic (:meth:`ERFStats.mean` keys) at layer l, over the probes."""
        return [{key: values.tolist() for key, values in result.erf.mean().items()} for result in self.maps]

    def records(self) -> list[dict[str, Any]]:
        """One dict per layer and checkpoint (layer by layer): names, analytic RF, ERF statistics and their
        change since the first checkpoint (``*_change``; CSV rows)."""
        rows = []
        first = self.means[0]
        for index, layer in enumerate(self.layers):
            for checkpoint, table, mean in zip(self.checkpoints, self.tables, self.means):
                row = {
                    "layer": layer,
                    "checkpoint": checkpoint.label,
                    "epoch": checkpoint.epoch,
                    "step": checkpoint.step,
                    "logged_step": checkpoint.logged_step,
                    "model": checkpoint.class_name,
                    "rf_size": pair(table[layer].size),
                    "rf_stride": pair(table[layer].stride),
                }
                row.update({tag: mean[key][index] for tag, (key, _) in STATISTICS.items()})
                row["erf_size_change"] = mean["size"][index] - first["size"][index]
                row["erf_size_fraction_change"] = mean["size_fraction"][index] - first["size_fraction"][index]
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
        header = ["layer", "checkpoint", "epoch", "step", "model", "RF size", "stride", "ERF size", "change", "ERF/RF"]
        header += ["mass side", "mass/RF", "dead"]
        rows = [
            [
                str(r["layer"]),
                str(r["checkpoint"]),
                "-" if r["epoch"] is None else str(r["epoch"]),
                _step(r["step"], r["logged_step"]),
                str(r["model"]),
                str(r["rf_size"]),
                str(r["rf_stride"]),
                f"{r['erf_size']:.2f}",
                signed(r["erf_size_change"], 2),
                f"{r['erf_size_fraction']:.2f}",
                f"{r['erf_mass_side']:.2f}",
                f"{r['erf_mass_fraction']:.2f}",
                f"{r['dead_fraction']:.0%}",
            ]
            for r in self.records()
        ]
        lines = [format_table(header, rows, markdown)]
        if self.missing:
            bullet = "* " if markdown else "  "
            lines += ["", "Layers not compared (not in every checkpoint):", *(bullet + note for note in self.notes)]
        return "\n".join(lines)


def _step(step: int | None, logged: int | None) -> str:
    """A checkpoint's step for a table, with the step TensorBoard shows it at where that differs.

    Example::
        >>> _step(430, 429), _step(430, None), _step(None, None)
        ('430 (TB 429)', '430', '-')
    """
    text = "-" if step is None else str(step)
    return text if logged in (None, step) else f"{text} (TB {logged})"


def compare_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    *,
    model_class: type[LightningModule] | None = None,
    layers: Sequence[str] | None = None,
    unit: Unit | None = None,
    channel: int | None = None,
    probes: Tensor | str | os.PathLike | None = None,
    import_class: bool = False,
) -> Comparison:
    """Load checkpoints and compute the receptive maps of the same probes at the layers they share.

    Args:
        checkpoints: Lightning checkpoint files, in the order to show them.
        model_class: the LightningModule class of every checkpoint (default: the one each names, found
            among the modules already imported).
        layers: layer names (keys of :func:`~rf_callback.receptive_fields`); each must be in every
            checkpoint. Default: the layers each checkpoint's ReceptiveFieldMonitor watched (else every
            convolution and pooling layer), those all share compared, the others listed in ``missing``.
        unit: ``"center"``, ``"max"`` or ``(i, j)``. Default: what the first checkpoint's
            ReceptiveFieldMonitor used, else ``"center"``.
        channel: one channel of the unit (default: the monitor's, else summed over channels).
        probes: a tensor ``(N, C, H, W)``; a file holding one (``torch.save``) or a checkpoint with
            ReceptiveFieldMonitor state. Default: the probes the first checkpoint's
            ReceptiveFieldMonitor stored.
        import_class: import the module of the class a checkpoint names when it is not imported yet (that
            runs its code: only for files you trust; see :func:`~rf_callback.checkpoints.load_checkpoint`).

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
    loaded = tuple(
        load_checkpoint(p, model_class, label, import_class=import_class)
        for p, label in zip(paths, checkpoint_labels(paths))
    )
    first = loaded[0].monitor or {}
    if unit is None:
        unit = first.get("unit", "center")
        channel = channel if channel is not None else first.get("channel")
    try:
        unit, channel = check_unit(unit), check_channel(channel)
    except ValueError as error:
        raise CompareError(str(error)) from None
    probe_images, origin, labels = _probes(probes, loaded[0])
    traced: dict[tuple, ReceptiveFieldTable] = {}
    tables = tuple(_table(checkpoint, probe_images, traced) for checkpoint in loaded)
    shared, missing = _shared_layers(loaded, tables, layers)
    results = []
    for checkpoint, table in zip(loaded, tables):
        try:
            results.append(
                receptive_maps(checkpoint.model, probe_images, shared, unit=unit, channel=channel, table=table)
            )
        except ValueError as error:
            raise CompareError(f"{checkpoint.label} ({checkpoint.class_name}): {error}") from error
    return Comparison(
        loaded, tuple(shared), missing, probe_images, origin, unit, channel, tables, tuple(results), labels
    )


def _table(checkpoint: Checkpoint, probes: Tensor, traced: dict[tuple, ReceptiveFieldTable]) -> ReceptiveFieldTable:
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
    row = table.get(layer)  # the comparison figure draws each layer's analytic box: supported rows only
    return row is not None and row.supported and mappable(row)


def _shared_layers(
    checkpoints: Sequence[Checkpoint], tables: Sequence[ReceptiveFieldTable], requested: Sequence[str] | None
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The layers to compare (in every checkpoint) and the others → the checkpoints that lack them."""
    own = [default_layers(table) for table in tables]
    for checkpoint, names in zip(checkpoints, own):
        if not names:
            raise CompareError(
                f"{checkpoint.label} ({checkpoint.class_name}) has no convolution or pooling layer with a receptive"
                " field: there is nothing to compare. HINT: compare checkpoints of convolutional models."
            )
    if requested is not None:
        for name in requested:
            for checkpoint, table in zip(checkpoints, tables):
                if not _usable(table, name):
                    why = "has no 2-D receptive field" if name in table else "is no layer"
                    accepted = [key for key in table if _usable(table, key)]
                    raise CompareError(
                        f"layer '{name}' {why} in {checkpoint.label} ({checkpoint.class_name}). Layers that can be"
                        f" compared: {', '.join(accepted)}."
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
