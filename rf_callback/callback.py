"""ReceptiveFieldMonitor: the Lightning glue over :class:`~rf_callback.monitor.ProbeMonitor`.

It checks the configuration, decides when to log, works on rank zero, finds the loggers and keeps
the probes in the checkpoint; computing, drawing and writing belong to the library.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from rf_callback.destinations import Destination
from rf_callback.erf import LUO_THRESHOLD, check_threshold_and_mass
from rf_callback.loggers import destinations_for
from rf_callback.monitor import ProbeMonitor
from rf_callback.probes import Probes, probe_source, probes_from_dataset
from rf_callback.report import format_rows
from rf_callback.selection import Unit, check_channel, check_unit
from rf_callback.sharding import UnsupportedShardingError, sharding_of

__all__ = ["ReceptiveFieldMonitor"]

STATE_FORMAT = "rf_callback.ReceptiveFieldMonitor/2"
"""Marks this callback's state in a checkpoint, whatever the (sub)class is called."""


class ReceptiveFieldMonitor(Callback):
    r"""Logs where each layer of the model looks: the analytic receptive field, and gradient maps over training.

    When fitting starts it checks everything (probes, layers, unit, channel, loggers) and logs the
    receptive-field table. Before the first step (the untrained baseline), after every
    ``every_n_epochs``-th training epoch and after the last one, it logs for each monitored layer one
    image (every probe with its saliency heatmap, the analytic box of the chosen unit and its centre),
    one of the probes' mean map, and the ERF statistics as scalars. Models of images, 1-D signals
    (``Conv1d``) and 3-D volumes (``Conv3d``) alike. They land on the step of that epoch's validation metrics when
    a validation ran in the epoch, else at its end.

    It leaves training alone: maps are computed in eval mode on a clone of the probes, with input
    gradients only, compiled submodules run eagerly, ``self.log`` inside ``forward`` silenced, on rank
    zero only; parameters' gradients, BatchNorm statistics, hooks, modes, random state and callback
    metrics are left as found. Under sharded parameters (FSDP2 through ``ModelParallelStrategy``,
    ``FSDPStrategy``, DeepSpeed ZeRO-3) every rank gathers the parameters at the same steps and rank
    zero computes, draws and writes (:mod:`rf_callback.sharding`); tensor parallelism is refused when
    fitting starts.

    Args:
        layers: layer keys of :func:`~rf_callback.receptive_fields` (module names, ``name[k]`` for the
            ``k``-th call); ``None``: one layer per resolution stage; ``"all"``: every layer whose output is
            laid out as the input (``(N, C, h, w)`` for images), a dense prediction after upsampling included.
        probes: ``None`` (default): the first validation image of each class, at most ``num_probes``;
            validation-dataset indices; or a tensor ``(N, C, H, W)`` (``(N, C, L)``, ``(N, C, D, H, W)``) as the
            model takes it. A run resumed from a checkpoint looks through the probes stored in it, unless
            probes are given here: given probes always win.
        num_probes: how many default probes at most.
        every_n_epochs: log maps after every n-th training epoch (and after the last one).
        unit: ``"center"`` (or ``"centre"``), ``"max"``, ``"max_logit"`` (each probe's largest single value:
            the most confident logit of a dense prediction) or an explicit position, one index per axis.
        channel: ``None`` sums the unit over channels; an int follows one channel.
        threshold: fraction of a map's peak for the ERF pixel count (Luo et al.'s 1 - 95.45%).
        mass: fraction of the saliency the ERF mass square must hold.
        log_baseline: log the untrained maps at step 0, before the first training step.
        strict: raise errors met while logging maps, instead of one warning each.
        max_image_mb: the most image pixels (3 bytes each, in MB) one logging pass draws and writes; layers
            beyond are left out of the images (not of the scalars), with one warning.

    Raises:
        MisconfigurationException: for bad arguments (here) and for everything that does not fit the
            model, the data or the loggers (when fitting starts).

    Example::

        trainer = Trainer(callbacks=[ReceptiveFieldMonitor()], logger=TensorBoardLogger("lightning_logs"))
    """

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        probes: Tensor | Sequence[int] | None = None,
        num_probes: int = 10,
        every_n_epochs: int = 1,
        unit: Unit | str = "center",
        channel: int | None = None,
        threshold: float = LUO_THRESHOLD,
        mass: float = 0.95,
        log_baseline: bool = True,
        strict: bool = False,
        max_image_mb: float = 64.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        try:
            self.unit, self.channel = check_unit(unit), check_channel(channel)
            self.threshold, self.mass = check_threshold_and_mass(threshold, mass)
            self.probes, self.indices = probe_source(probes)  # given images, or dataset indices
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"{name}: {error}") from None
        for option, value in (("num_probes", num_probes), ("every_n_epochs", every_n_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MisconfigurationException(f"{name}({option}={value!r}): must be an int >= 1.")
        if not isinstance(max_image_mb, (int, float)) or isinstance(max_image_mb, bool) or not max_image_mb > 0:
            raise MisconfigurationException(f"{name}(max_image_mb={max_image_mb!r}): must be a number > 0.")
        self.layers = layers
        self.num_probes, self.every_n_epochs = num_probes, every_n_epochs
        self.log_baseline, self.strict, self.max_image_mb = log_baseline, strict, max_image_mb
        self._given = probes is not None  # given probes (images or indices) win over those a checkpoint stored
        self._stored: Probes | None = None  # the probes of the checkpoint resumed from
        self._reported: set[tuple[str, str, str]] = set()  # (destination, item, error type) already warned about
        self.model_class: str | None = None
        self.monitor: ProbeMonitor | None = None
        self._destinations: list[Any] = []
        self._logged_epochs: set[int] = set()
        self._logged_steps: set[int] = set()
        self._logged_at: tuple[int, int] | None = None  # (global step, logged step) of the last maps

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key()  # the monitoring options may change between runs: probes stay

    # ---- fail fast ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                f"{type(self).__name__} logs images and scalars, but the Trainer has no logger (logger=False)."
                " HINT: Trainer(logger=TensorBoardLogger('lightning_logs')), or remove the callback."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.model_class = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
        self._prepare(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and self.monitor is None:  # trainer.validate()
            self._prepare(trainer, pl_module)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Probes (given, restored, or read from the validation data), the monitor and the destinations."""
        name = type(self).__name__
        restored = not self._given and self._stored is not None
        if restored:
            self.probes = self._stored
        if self.probes is None:
            self.probes = self._read_probes(trainer)
        if self._stored is not None:
            rank_zero_info(f"{name}: resumed from a checkpoint, {self._probes_phrase(restored)}.")
        model = _sharded_root(trainer, pl_module)
        try:
            with _quiet(pl_module):
                self.monitor = ProbeMonitor(
                    model, self.probes, self.layers, unit=self.unit, channel=self.channel,
                    threshold=self.threshold, mass=self.mass, max_image_mb=self.max_image_mb,
                )  # fmt: skip
        except UnsupportedShardingError as error:
            raise MisconfigurationException(f"{name} under {type(trainer.strategy).__name__}: {error}") from None
        except (TypeError, ValueError) as error:
            if restored:
                shape = tuple(self.probes.images.shape)
                why = str(error).partition(" HINT:")[0].removeprefix(f"probes of shape {shape}: ")
                why = why.replace(f"probes of shape {shape} ", "they ", 1)  # probe_mismatch's words
                raise MisconfigurationException(
                    f"{name}: the {shape[0]} probes stored in the checkpoint, of shape {shape}, do not fit"
                    f" {type(pl_module).__name__} now: {why} HINT: pass probes=<a"
                    " tensor the model takes> or probes=[validation-dataset indices]: probes given to the callback"
                    " always replace the stored ones."
                ) from None
            # each message starts with the argument it is about
            raise MisconfigurationException(f"{name} on {type(pl_module).__name__}: {error}") from None
        if trainer.is_global_zero:
            try:
                self._destinations = destinations_for(trainer)
            except OSError as error:
                raise MisconfigurationException(
                    f"{name}: the folder for images cannot be written ({error}). HINT: add a TensorBoardLogger,"
                    " or make the log directory writable."
                ) from None
            rank_zero_info(
                f"Receptive fields of the monitored layers (input {tuple(self.monitor.table.input_shape)}):\n"
                + format_rows([self.monitor.table[layer].to_record() for layer in self.monitor.layers])
            )
            rank_zero_info(f"{name}: {self.monitor.cost.describe()}")
            self._guarded(lambda: self.monitor.log_table(self._destinations, trainer.global_step, self._failed))

    def _probes_phrase(self, restored: bool) -> str:
        """Which probes a resumed run looks through, in words."""
        stored = self._stored.images  # type: ignore[union-attr]
        if restored:
            return f"looking through the {len(stored)} probes stored in it (shape {tuple(stored.shape)})"
        given = f"probes={self.indices!r}" if self.indices is not None else "the probes given"
        shape = tuple(self.probes.images.shape)  # type: ignore[union-attr]
        return f"looking through {given} (shape {shape}), not the {len(stored)} stored in it"

    def _read_probes(self, trainer: Trainer) -> Probes:
        dataset = _validation_dataset(trainer)
        if dataset is None:
            raise MisconfigurationException(
                f"{type(self).__name__}(probes={self.indices!r}) reads its probes from the validation data, but the"
                " Trainer has none. HINT: pass probes=<tensor (N, C, H, W)>, or give the Trainer a validation"
                " DataLoader over an indexable dataset."
            )
        try:
            return probes_from_dataset(dataset, self.num_probes, self.indices)
        except (TypeError, IndexError, ValueError) as error:
            raise MisconfigurationException(f"{type(self).__name__}(probes={self.indices!r}): {error}") from None

    # ---- when ---------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_baseline and trainer.global_step == 0:
            self._log(trainer, pl_module, step=0)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._log(trainer, pl_module, step=trainer.global_step)
        elif self._due(trainer):  # the step Lightning logs this validation's metrics at
            self._log(trainer, pl_module, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
            self._logged_epochs.add(trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer) and trainer.current_epoch not in self._logged_epochs:  # no validation this epoch
            self._log(trainer, pl_module, step=trainer.global_step)
            self._logged_epochs.add(trainer.current_epoch)

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last or trainer.should_stop

    def _log(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self.monitor is None or step in self._logged_steps:
            return
        # Whole parameters: rank zero alone, no collective. Sharded: every rank gathers, in every hook that logs
        # (Lightning calls them on all ranks, and what decides - the epoch, the step, should_stop - is the same on
        # every rank); rank zero computes and writes.
        zero = trainer.is_global_zero
        if not zero and not self.monitor.sharded:
            return
        self._logged_steps.add(step)
        destinations = self._destinations if zero else None
        self._logged_at = (trainer.global_step, step)
        with _quiet(pl_module):
            self._guarded(lambda: self.monitor.log(destinations, step, self._failed), step)

    def _guarded(self, work: Any, step: int | None = None) -> None:
        try:
            work()
        except Exception as error:
            if self.strict:
                raise
            what = f"the receptive maps at step {step}" if step is not None else "the receptive-field table"
            self._warn(f"could not log {what}", error)

    def _failed(self, destination: Destination | None, what: str, error: Exception) -> None:
        """One item could not be drawn, or written to one destination: the others still are. Said once, not every
        pass."""
        if self.strict:
            raise error
        where = "" if destination is None else destination.describe()
        key = (where, what, type(error).__name__)
        if key in self._reported:
            return
        self._reported.add(key)
        self._warn(f"could not write {what} to {where}" if where else f"could not draw {what}", error, repeated=False)

    def _warn(self, what: str, error: Exception, repeated: bool = True) -> None:
        again = "" if repeated else ", and this is not said again while it keeps failing"
        rank_zero_warn(
            f"{type(self).__name__} {what}; training goes on{again}. Pass strict=True to stop instead.\n"
            + "".join(traceback.format_exception(error))
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._destinations = []  # the loggers' writers and runs are theirs to close

    # ---- checkpoint ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        probes = self.probes if self.probes is not None else self._stored
        return {
            "format": STATE_FORMAT,
            "probes": probes.images if probes is not None else None,
            "labels": probes.labels if probes is not None else None,
            "indices": probes.indices if probes is not None else self.indices,
            "layers": self.monitor.layers if self.monitor is not None else self.layers,
            "unit": self.unit,
            "channel": self.channel,
            "model_class": self.model_class,
            "logged_at": self._logged_at,  # a checkpoint of this state knows the step its maps are shown at
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the stored probes; they are used when fitting starts, unless probes were given to the callback."""
        images = state_dict.get("probes")
        if isinstance(images, Tensor):
            labels, indices = state_dict.get("labels"), state_dict.get("indices")
            labels = tuple(map(str, labels)) if isinstance(labels, (list, tuple)) else None  # old: a label tensor
            self._stored = Probes(images, labels, tuple(indices) if indices is not None else None)
        self.model_class = state_dict.get("model_class", self.model_class)


@contextlib.contextmanager
def _quiet(pl_module: LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing while the callback runs the model (trace and maps)."""
    pl_module.log = pl_module.log_dict = _ignore  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _sharded_root(trainer: Trainer, pl_module: LightningModule) -> Any:
    """The module to monitor: the LightningModule, or FSDP's root wrapper around it (``FSDPStrategy``), which
    holds the LightningModule's own parameters and must be the one gathered."""
    root = trainer.strategy.model
    if root is not None and root is not pl_module and sharding_of(root) == "fsdp":
        return root
    return pl_module


def _validation_dataset(trainer: Trainer) -> Any:
    """The first validation dataset, loaded or not yet (Lightning loads it lazily, at the first validation)."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if not source.is_defined():
            return None
        from rf_callback.probes import isolated_rng

        with isolated_rng():
            loaders = source.dataloader()
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    if isinstance(loaders, dict) and loaders:
        loader = next(iter(loaders.values()))
    return getattr(loader, "dataset", None)
