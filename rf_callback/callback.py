"""ReceptiveFieldMonitor: log analytic receptive fields and per-epoch receptive maps to the Trainer's loggers.

Thin glue over :func:`~rf_callback.receptive_fields`, :func:`~rf_callback.receptive_maps` and
:mod:`rf_callback.render`: check the configuration, decide when, work on rank zero, log, and keep
the probes in the checkpoint. :func:`destinations_for` maps the Trainer's loggers to
:mod:`rf_callback.destinations`.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from rf_callback.destinations import (
    Destination,
    MLflowDestination,
    PngFolderDestination,
    TensorBoardDestination,
    WandbDestination,
)
from rf_callback.fields import ReceptiveFieldTable, receptive_fields
from rf_callback.render import figure_image, probe_grid, summary_figure
from rf_callback.report import COLUMNS, format_rows, table_rows, unsupported_notes
from rf_callback.saliency import LUO_THRESHOLD, SPATIAL_LAYERS, ReceptiveMaps, Unit, default_layers, receptive_maps

__all__ = ["ReceptiveFieldMonitor", "destinations_for"]

TAG = "receptive_field"
SCALARS = {
    "erf_size": "size",
    "erf_size_fraction": "size_fraction",
    "erf_mass_side": "mass_side",
    "erf_mass_fraction": "mass_fraction",
    "dead_fraction": "dead_fraction",
}


class ReceptiveFieldMonitor(Callback):
    r"""Logs where each layer of the model looks: the analytic receptive field, and per-epoch gradient maps.

    At the start of training it computes the receptive field of every layer of the LightningModule
    (:func:`~rf_callback.receptive_fields`) and logs it once, as a Markdown table and a chart. Before
    the first training step (the untrained baseline, at step 0) and after every ``every_n_epochs``
    validation epochs, it computes the gradient receptive maps of fixed probe images
    (:func:`~rf_callback.receptive_maps`) and logs, for each monitored layer, one image (every probe
    with its saliency heatmap, the analytic box of the chosen unit and the unit's centre) and the
    ERF statistics as scalars. Tags are ``receptive_field/<layer>`` (images: TensorBoard's slider
    steps through the epochs of one layer) and ``receptive_field/<layer>/<statistic>`` (scalars).

    It leaves training alone: the maps are computed in eval mode on a clone of the probes, without
    touching parameters' gradients, BatchNorm statistics, hooks, modes or random state, on rank zero
    only, and logged straight to the loggers (no ``self.log``, so callback metrics are unchanged).

    Args:
        layers: module names to monitor (``model.named_modules()``; ``name[k]`` for the ``k``-th call of
            a module called several times). Default: every convolution and pooling layer.
        probes: the images to look through. ``None`` (default): one validation image per class, the
            first of each class in the validation dataset, at most ``num_probes``; a sequence of
            validation-dataset indices; or a tensor ``(N, C, H, W)`` as the model takes it.
        num_probes: how many default probes at most.
        every_n_epochs: log maps after every n-th validation epoch.
        unit: which output unit of each layer: ``"center"``, ``"max"`` or an explicit ``(i, j)``.
        channel: ``None`` sums the unit over channels; an int follows one channel.
        threshold: fraction of a map's peak for the ERF pixel count (Luo et al.'s 1 - 95.45%).
        mass: fraction of the saliency the ERF mass square must hold.
        scale: screen pixels per input pixel in the images (default: enough to make probes ~112 px).
        log_baseline: log the untrained maps at step 0, before the first training step.
        strict: raise errors met while computing or logging maps, instead of one warning each.

    Raises:
        MisconfigurationException: for bad arguments (here), no logger or unknown layers (at setup).

    Example::

        trainer = Trainer(callbacks=[ReceptiveFieldMonitor()], logger=TensorBoardLogger("lightning_logs"))
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        probes: Tensor | Sequence[int] | None = None,
        num_probes: int = 10,
        every_n_epochs: int = 1,
        unit: Unit = "center",
        channel: int | None = None,
        threshold: float = LUO_THRESHOLD,
        mass: float = 0.95,
        scale: int | None = None,
        log_baseline: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.layers = list(layers) if layers is not None else None
        self.probe_source = probes
        self.num_probes = num_probes
        self.every_n_epochs = every_n_epochs
        self.unit: Unit = tuple(unit) if isinstance(unit, (list, tuple)) else unit  # type: ignore[assignment]
        self.channel = channel
        self.threshold = threshold
        self.mass = mass
        self.scale = scale
        self.log_baseline = log_baseline
        self.strict = strict
        self._validate_arguments()
        self.probes: Tensor | None = probes.detach().cpu().clone() if isinstance(probes, Tensor) else None
        self.labels: Tensor | None = None
        self.indices: list[int] | None = None
        self.model_class: str | None = None
        self._table: ReceptiveFieldTable | None = None
        self._monitored: list[str] = []
        self._logged_steps: set[int] = set()
        self._destinations: list[Destination] = []

    def _validate_arguments(self) -> None:
        name = type(self).__name__
        if self.layers is not None and (not self.layers or not all(isinstance(n, str) for n in self.layers)):
            raise MisconfigurationException(f"{name}(layers={self.layers!r}): give a non-empty list of module names.")
        source = self.probe_source
        if isinstance(source, Tensor):
            if source.dim() != 4 or len(source) == 0:
                raise MisconfigurationException(
                    f"{name}(probes=tensor of shape {tuple(source.shape)}): probes must be (N, C, H, W) with N >= 1."
                )
        elif source is not None and (
            isinstance(source, str) or not all(isinstance(i, int) and i >= 0 for i in source) or not len(source)
        ):
            raise MisconfigurationException(
                f"{name}(probes={source!r}): give a tensor (N, C, H, W), validation-dataset indices, or None."
            )
        if not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise MisconfigurationException(f"{name}(num_probes={self.num_probes!r}): must be an int >= 1.")
        if not isinstance(self.every_n_epochs, int) or self.every_n_epochs < 1:
            raise MisconfigurationException(f"{name}(every_n_epochs={self.every_n_epochs!r}): must be an int >= 1.")
        unit = self.unit
        if unit not in ("center", "max") and not (
            isinstance(unit, tuple) and len(unit) == 2 and all(isinstance(v, int) and v >= 0 for v in unit)
        ):
            raise MisconfigurationException(
                f"{name}(unit={unit!r}): choose 'center', 'max' or a unit position (i, j) with ints >= 0."
            )
        if self.channel is not None and (not isinstance(self.channel, int) or self.channel < 0):
            raise MisconfigurationException(f"{name}(channel={self.channel!r}): None or an int >= 0.")
        if not 0 < self.threshold < 1 or not 0 < self.mass <= 1:
            raise MisconfigurationException(
                f"{name}(threshold={self.threshold}, mass={self.mass}): need 0 < threshold < 1 and 0 < mass <= 1."
            )
        if self.scale is not None and (not isinstance(self.scale, int) or self.scale < 1):
            raise MisconfigurationException(f"{name}(scale={self.scale!r}): None or an int >= 1.")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, unit=self.unit, channel=self.channel)

    # ---- setup: fail fast ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "ReceptiveFieldMonitor logs images and scalars, but the Trainer has no logger (logger=False)."
                " HINT: Trainer(logger=TensorBoardLogger('lightning_logs')), or remove the callback."
            )
        if trainer.is_global_zero:
            self._destinations = destinations_for(trainer)
            rank_zero_info(f"ReceptiveFieldMonitor logs to {'; '.join(d.describe() for d in self._destinations)}.")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._destinations = []  # the loggers' writers and runs are theirs to close

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_layer_names(pl_module)
        self.model_class = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"

    def _check_layer_names(self, pl_module: LightningModule) -> None:
        if self.layers is None:
            return
        names = {name for name, _ in pl_module.named_modules() if name}
        missing = [layer for layer in self.layers if re.sub(r"(\[\d+\])?(:\d+)?$", "", layer) not in names]
        if missing:
            spatial = [name for name, m in pl_module.named_modules() if isinstance(m, SPATIAL_LAYERS)]
            raise MisconfigurationException(
                f"ReceptiveFieldMonitor(layers={self.layers!r}): no module named {', '.join(missing)} in"
                f" {type(pl_module).__name__}. Available convolution and pooling layers:"
                f" {', '.join(spatial) or 'none'}. HINT: use names from model.named_modules()."
            )

    # ---- the table and the baseline, once the data and any checkpoint are in place ------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare(trainer, pl_module)
        if trainer.is_global_zero:
            self._log_table(trainer)
        if self.log_baseline and trainer.global_step == 0:
            self._log_maps(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # trainer.validate(): no on_train_start
            self._check_layer_names(pl_module)
            self._prepare(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._table is None:
            return
        if trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log_maps(trainer, pl_module)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Probes (restored, given, or read from the validation data), the table and the layers."""
        if self.probes is None:
            self.probes, self.labels, self.indices = self._read_probes(trainer)
        shape = tuple(self.probes.shape[1:])
        self._table = receptive_fields(pl_module, shape, strict=False)
        layers = self.layers if self.layers is not None else default_layers(pl_module, self._table)
        problems = []
        for layer in layers:
            try:
                row = self._table[layer]
            except KeyError as error:
                problems.append(error.args[0])
                continue
            if not row.supported:
                problems.append(f"'{layer}' has no receptive field: {row.unsupported.reason}")
            elif len(row.output_shape) != 2:
                problems.append(f"'{layer}' has no 2-D output")
        if problems or not layers:
            available = ", ".join(default_layers(pl_module, self._table)) or "none"
            raise MisconfigurationException(
                f"ReceptiveFieldMonitor(layers={self.layers!r}) on {type(pl_module).__name__} with probes of shape"
                f" {shape}: {'; '.join(problems) or 'no convolution or pooling layer found'}. Layers it can"
                f" monitor: {available}."
            )
        self._monitored = list(layers)

    def _read_probes(self, trainer: Trainer) -> tuple[Tensor, Tensor | None, list[int]]:
        """First image of each class (or the given indices) from the validation dataset, by index.

        Indexing the dataset (not iterating a DataLoader) draws nothing from the global random state;
        isolate_rng undoes any draw a random transform makes.
        """
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__"):
            raise MisconfigurationException(
                "ReceptiveFieldMonitor(probes=None) reads its probes from the validation dataset, but the Trainer has"
                f" none ({type(loader).__name__ if loader is not None else 'no val_dataloader'}). HINT: pass"
                " probes=<tensor (N, C, H, W)>, or give the Trainer a validation DataLoader over an indexable dataset."
            )
        with isolate_rng():
            if isinstance(self.probe_source, Sequence):
                chosen = list(self.probe_source)
                items = [_image_and_label(dataset[i]) for i in chosen]
            else:
                chosen, items, seen = [], [], set()
                for i in range(min(len(dataset), 50 * self.num_probes)):
                    image, label = _image_and_label(dataset[i])
                    if label is None or label not in seen:
                        chosen.append(i)
                        items.append((image, label))
                        seen.add(label)
                    if len(chosen) == self.num_probes:
                        break
                order = sorted(range(len(items)), key=lambda k: (items[k][1] is None, items[k][1] or 0))
                chosen, items = [chosen[k] for k in order], [items[k] for k in order]
        images = torch.stack([image for image, _ in items]).float()
        labels = [label for _, label in items]
        return images, (torch.tensor(labels) if None not in labels else None), chosen

    # ---- logging ------------------------------------------------------------------------------------------
    def _log_table(self, trainer: Trainer) -> None:
        assert self._table is not None
        records = [row.to_record() for row in self._table.values()]
        monitored = [self._table[name].to_record() for name in self._monitored]
        rank_zero_info(
            f"Receptive fields of the monitored layers (input {tuple(self._table.input_shape)}):\n"
            + format_rows(monitored)
        )
        step = trainer.global_step
        rows, notes = table_rows(records), unsupported_notes(records)
        summary = figure_image(summary_figure(monitored))

        def write(destination: Destination) -> None:
            destination.add_table(f"{TAG}/table", COLUMNS, rows, step)
            if notes:
                destination.add_text(f"{TAG}/unsupported", "\n".join(f"* {note}" for note in notes), step)
            destination.add_image(f"{TAG}/summary", summary, step)

        self._send(write, step)

    def _log_maps(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step in self._logged_steps:
            return
        try:
            result = self.compute(pl_module)
            self._write(trainer, result, step)
        except Exception as error:
            if self.strict:
                raise
            _warn_and_go_on(f"could not log the receptive maps at step {step}", error)
        self._logged_steps.add(step)

    def compute(self, pl_module: LightningModule) -> ReceptiveMaps:
        """The receptive maps of the probes for the monitored layers, as logged."""
        assert self.probes is not None
        return receptive_maps(
            pl_module,
            self.probes,
            self._monitored,
            unit=self.unit,
            channel=self.channel,
            threshold=self.threshold,
            mass=self.mass,
            fields=self._table,
        )

    def _write(self, trainer: Trainer, result: ReceptiveMaps, step: int) -> None:
        assert self.probes is not None
        scale = self.scale or max(1, round(112 / max(self.probes.shape[2:])))
        means = result.erf.mean()
        metrics = {
            f"{TAG}/{layer}/{tag}": float(means[key][index])
            for index, layer in enumerate(result.layers)
            for tag, key in SCALARS.items()
        }
        images = {
            f"{TAG}/{layer}": probe_grid(
                self.probes, result.maps[:, index], result.boxes[:, index], result.centers[:, index], scale=scale
            )
            for index, layer in enumerate(result.layers)
        }

        def write(destination: Destination) -> None:
            destination.add_scalars(metrics, step)
            for tag, image in images.items():
                destination.add_image(tag, image, step)

        self._send(write, step)

    def _send(self, write: Callable[[Destination], None], step: int) -> None:
        """``write`` to every destination, then flush it; one that fails keeps no other from its share."""
        for destination in self._destinations:
            try:
                try:
                    write(destination)
                finally:
                    destination.flush()
            except Exception as error:
                if self.strict:
                    raise
                _warn_and_go_on(f"could not log to {destination.describe()} at step {step}", error)

    # ---- checkpoint ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probes": self.probes,
            "labels": self.labels,
            "indices": self.indices,
            "layers": self._monitored or self.layers,
            "unit": self.unit,
            "channel": self.channel,
            "model_class": self.model_class,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes = state_dict.get("probes", self.probes)
        self.labels = state_dict.get("labels")
        self.indices = state_dict.get("indices")
        self.model_class = state_dict.get("model_class")


def _image_and_label(item: Any) -> tuple[Tensor, int | None]:
    """A dataset item as (image tensor, label or None): ``(x, y)``, ``{"image": x, "label": y}`` or ``x``."""
    if isinstance(item, dict):
        image = next((item[k] for k in ("image", "images", "input", "x", "pixel_values") if k in item), None)
        label = next((item[k] for k in ("label", "labels", "target", "y") if k in item), None)
    elif isinstance(item, (tuple, list)):
        image, label = item[0], (item[1] if len(item) > 1 else None)
    else:
        image, label = item, None
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise MisconfigurationException(
            "ReceptiveFieldMonitor(probes=None) expects validation items whose image is a tensor (C, H, W), got"
            f" {type(image).__name__}{'' if not isinstance(image, Tensor) else f' of shape {tuple(image.shape)}'}."
            " HINT: pass probes=<tensor (N, C, H, W)>."
        )
    if isinstance(label, Tensor):
        label = int(label.item()) if label.numel() == 1 else None
    return image, (int(label) if isinstance(label, (int, float)) else None)


def destinations_for(trainer: Trainer) -> list[Destination]:
    """Where the Trainer's loggers can hold what the monitor logs: each logger gets all it can hold.

    TensorBoard, Weights & Biases and MLflow loggers get images, scalars and tables in their own run;
    scalars go through the logger's ``log_metrics``, so its prefix and step bookkeeping apply and they
    line up with the validation metrics. The other loggers (``CSVLogger``, custom ones) get the scalars,
    and the images and tables, which they cannot hold, go as files to one folder under the first one's
    log directory, with one warning naming it.
    """
    destinations: list[Destination] = []
    others: list[Logger] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            destinations.append(TensorBoardDestination(logger.experiment, logger.log_metrics))
        elif isinstance(logger, WandbLogger):
            destinations.append(WandbDestination(logger.experiment, logger.log_metrics))
        elif isinstance(logger, MLFlowLogger):
            destinations.append(MLflowDestination(logger.experiment, logger.run_id, logger.log_metrics))
        else:
            others.append(logger)
    if others:
        folder = Path(getattr(others[0], "log_dir", None) or others[0].save_dir or trainer.default_root_dir)

        def log_metrics(values: Mapping[str, float], step: int) -> None:
            for logger in others:
                logger.log_metrics(values, step)

        destinations.append(PngFolderDestination(folder, log_metrics))
        kinds = ", ".join(type(logger).__name__ for logger in others)
        rank_zero_warn(
            f"ReceptiveFieldMonitor: {kinds} cannot hold images, so they are written as"
            f" {folder / TAG}/<layer>/step_<step>.png and the table as {folder / TAG / 'table.md'}; the scalars go"
            f" to {kinds}. HINT: add a TensorBoardLogger, WandbLogger or MLFlowLogger to see the images there."
        )
    return destinations


def _warn_and_go_on(what: str, error: Exception) -> None:
    rank_zero_warn(
        f"ReceptiveFieldMonitor {what}; training goes on. Pass strict=True to stop instead.\n"
        + "".join(traceback.format_exception(error))
    )
