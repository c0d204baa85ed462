"""ProbeMonitor: receptive maps of fixed probes over training, computed, drawn and written with no framework.

The Lightning callback (:class:`~rf_callback.ReceptiveFieldMonitor`) is thin glue over this class; a
plain PyTorch loop or Lightning Fabric uses it directly with a ``SummaryWriter``::

    from torch.utils.tensorboard import SummaryWriter
    from rf_callback import ProbeMonitor

    writer = SummaryWriter("runs/my_cnn")
    monitor = ProbeMonitor(model, probes)        # checks everything now: layers, unit, channel, probes
    monitor.log_table(writer)                     # the receptive-field table, once
    for epoch in range(epochs):
        train_one_epoch(model)
        monitor.log(writer, step=epoch)           # maps, boxes and ERF statistics of this epoch

It never changes training: see :func:`~rf_callback.receptive_maps` for what is left as found. Compiled
submodules (``torch.compile``) are run eagerly while it works, so their compiled code is neither
retraced nor changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rf_callback.cost import Cost, unproductive_cost
from rf_callback.destinations import Destination, TensorBoardDestination
from rf_callback.erf import LUO_THRESHOLD, MASS_SHARES, check_threshold_and_mass, mean_area_key
from rf_callback.errors import TraceError
from rf_callback.probes import Probes, as_probes
from rf_callback.render import coverage_figure, figure_image, layer_image, mean_image, summary_figure
from rf_callback.report import COLUMNS, MARKED, markdown_table, table_rows, unsupported_notes
from rf_callback.saliency import ReceptiveMaps, receptive_maps
from rf_callback.selection import Unit, check_channel, check_unit, check_unit_fits, resolve_layers
from rf_callback.table import ReceptiveFieldTable, receptive_fields, unwrap_model

__all__ = ["DESCRIPTIONS", "STATISTICS", "TAG", "ProbeMonitor", "eager", "layer_tag"]

OnError = Callable[["Destination", Exception], None]

TAG = "receptive_field"
"""Every tag starts with this: images ``receptive_field/<k>_<layer>`` (and ``.../mean``), scalars ``.../<statistic>``."""

STATISTICS = {
    "erf_size": ("size", "ERF size: side (input px) of a square with the area of the pixels above 4.55% of the peak."),
    "erf_size_fraction": ("size_fraction", "ERF size divided by the side of the analytic receptive field."),
    "erf_mass_side": ("mass_side", "Side (input px) of the square around the unit's centre holding 95% of the map."),
    "erf_mass_fraction": ("mass_fraction", "ERF mass side divided by the side of the analytic receptive field."),
    "dead_fraction": ("dead_fraction", "Share of probes whose unit has an all-zero map (logged only when nonzero)."),
    **{
        f"erf_{mean_area_key(share)}": (
            mean_area_key(share),
            f"Share of the input (0-1) whose largest values hold {100 * share:g}% of the probes' mean map: small is compact.",
        )
        for share in MASS_SHARES
    },
}
"""Scalar name -> (:meth:`ERFStats.mean` key, one-sentence description). For 1-D and 3-D inputs a
"square" is an interval or a cube, its side the d-th root of the volume."""

DESCRIPTIONS = {name: description for name, (_, description) in STATISTICS.items()}
"""Scalar name -> its description, shown by TensorBoard beside each chart."""


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run ``torch.compile``'d modules eagerly inside, without compiling, retracing or touching their caches."""
    with torch.compiler.set_stance("force_eager"):
        yield


class ProbeMonitor:
    """Receptive maps of fixed probes at chosen layers, logged at any step to any destination.

    Everything that can be wrong is checked here, at construction: the probes, the layers (one per
    resolution stage by default), the unit and the channel against every layer's output.

    Each logging pass writes, per layer, one image of every probe's map (``receptive_field/<k>_<layer>``),
    one of the probes' mean map (``.../mean``, Luo et al.'s averaged ERF) and the ERF statistics, and
    one chart of every layer's analytic and effective fields against the input with the border between
    productive and unproductive layers marked (``receptive_field/coverage``,
    :func:`~rf_callback.render.coverage_figure`). Images, 1-D signals and 3-D volumes alike (see
    :func:`~rf_callback.render.layer_image`).

    :attr:`cost` holds what the layers predicted unproductive at the probes' size cost
    (:func:`~rf_callback.cost.unproductive_cost`); :meth:`log_table` writes it.

    Args:
        model: the network; ``model(probes)`` must run.
        probes: a tensor ``(N, C, H, W)`` (``(N, C, L)`` or ``(N, C, D, H, W)`` for 1-D or 3-D models) or
            :class:`~rf_callback.probes.Probes` (with captions).
        layers: ``None`` (one layer per resolution stage), ``"all"``, or layer keys of the table; a layer
            without an analytic field (after an upsampling: a dense prediction) gets maps, with no box.
        unit: ``"center"``, ``"max"``, ``"max_logit"`` or an output position, one index per axis
            (checked against every layer).
        channel: ``None`` sums the unit over channels; an int follows one channel.
        threshold: fraction of a map's peak for the ERF pixel count (Luo et al.'s 1 - 95.45%).
        mass: fraction of the saliency the ERF mass square must hold.
        tile: screen pixels per probe side in the images (inputs are scaled by a whole factor to fit).

    Raises:
        ValueError: for a bad argument, unknown layers (listed with the valid ones), a unit or
            channel outside a layer's output, probes the model cannot take.
        TypeError: for probes that are not a tensor.

    Example::
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
        >>> monitor = ProbeMonitor(net, torch.rand(2, 1, 16, 16))
        >>> monitor.layers, monitor.tags["2"]
        (['0', '2'], 'receptive_field/01_2')
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Tensor | Probes,
        layers: str | Sequence[str] | None = None,
        *,
        unit: Unit | str = "center",
        channel: int | None = None,
        threshold: float = LUO_THRESHOLD,
        mass: float = 0.95,
        tile: int = 128,
    ) -> None:
        self.unit = check_unit(unit)
        self.channel = check_channel(channel)
        self.threshold, self.mass = check_threshold_and_mass(threshold, mass)
        if not isinstance(tile, int) or tile < 16:
            raise ValueError(f"tile={tile!r}: screen pixels per probe side, an int >= 16.")
        self.tile = tile
        self.model = model
        self.probes = as_probes(probes)
        self.table = self._trace()
        self.cost: Cost = unproductive_cost(model, self.table)
        self.layers = resolve_layers(self.table, layers)
        self._check_units_and_channels()
        self.tags = {layer: layer_tag(index, layer) for index, layer in enumerate(self.layers)}
        self._wrapped: dict[int, tuple[Any, Destination]] = {}  # id(SummaryWriter) -> (it, its destination)

    def _trace(self) -> ReceptiveFieldTable:
        shape = tuple(self.probes.images.shape[1:])
        try:
            with eager():
                return receptive_fields(self.model, shape, strict=False)
        except TraceError as error:
            hint = _channel_hint(self.model, shape)
            raise ValueError(f"probes of shape {tuple(self.probes.images.shape)}: {hint}{error}") from error

    def _check_units_and_channels(self) -> None:
        for layer in self.layers:
            row = self.table[layer]
            check_unit_fits(self.unit, row)
            channels = row.tensor_shape[1]
            if self.channel is not None and self.channel >= channels:
                raise ValueError(
                    f"channel={self.channel}: layer '{layer}' has {channels} channels. HINT: channel=None sums"
                    " over channels, or monitor layers that have that channel."
                )

    def compute(self) -> ReceptiveMaps:
        """The receptive maps of the probes at the monitored layers, for the model as it is now."""
        with eager():
            return receptive_maps(
                self.model,
                self.probes.images,
                self.layers,
                unit=self.unit,
                channel=self.channel,
                threshold=self.threshold,
                mass=self.mass,
                table=self.table,
            )

    def images(self, result: ReceptiveMaps) -> dict[str, Tensor]:
        """Two uint8 images ``(3, H, W)`` per layer: under its tag every probe with its heatmap, box, centre
        and caption; under ``<tag>/mean`` the probes' mean map, with the box when every unit has the same."""
        images, labels = self.probes.images, self.probes.labels
        drawn = {}
        means = result.mean_maps
        for k, layer in enumerate(result.layers):
            tag, analytic = self.tags[layer], result.analytic[k]
            drawn[tag] = layer_image(
                images, result.maps[:, k], result.boxes[:, k], result.centers[:, k],
                labels=labels, tile=self.tile, analytic=analytic,
            )  # fmt: skip
            same = bool((result.units[:, k] == result.units[0, k]).all())
            center = result.centers[0, k] if same else _peak(means[k])
            drawn[f"{tag}/mean"] = mean_image(
                means[k], result.boxes[0, k] if same else None, center,
                probes=len(images), analytic=analytic, tile=self.tile,
            )  # fmt: skip
        return drawn

    def scalars(self, result: ReceptiveMaps) -> dict[str, float]:
        """The ERF statistics, averaged over the probes, by tag (``dead_fraction`` only where nonzero)."""
        means = result.erf.mean()
        values = {}
        for k, layer in enumerate(result.layers):
            for name, (key, _) in STATISTICS.items():
                value = float(means[key][k])
                if name != "dead_fraction" or value > 0:
                    values[f"{self.tags[layer]}/{name}"] = value
        return values

    def coverage(self, result: ReceptiveMaps, title: str | None = None) -> Tensor:
        """The monitored layers' analytic fields (smallest to largest over paths) and their effective fields now,
        against the input, with the border marked: a uint8 image (:func:`~rf_callback.render.coverage_figure`)."""
        records = [self.table[layer].to_record() for layer in result.layers]
        sizes = result.erf.mean()["size"].tolist()  # per layer, Luo et al.'s ERF size
        titled = {} if title is None else {"title": title}
        return figure_image(coverage_figure(records, self.table.input_shape[1:], sizes, **titled))

    def log(self, destinations: Any, step: int, on_error: OnError | None = None) -> ReceptiveMaps:
        """Compute, draw and write this step's maps and statistics to each destination; return the maps.

        Args:
            destinations: a ``SummaryWriter``, a :class:`~rf_callback.destinations.Destination`, or a list.
            step: the step to log at.
            on_error: called with ``(destination, error)`` when one destination fails, so that the
                others still get their share; ``None`` raises.
        """
        result = self.compute()
        images, scalars = self.images(result), self.scalars(result)
        images[f"{TAG}/coverage"] = self.coverage(result)

        def write(destination: Destination) -> None:
            destination.add_scalars(scalars, step)
            for tag, image in images.items():
                destination.add_image(tag, image, step)

        _send(self._as_destinations(destinations), write, on_error)
        return result

    def log_table(self, destinations: Any, step: int = 0, on_error: OnError | None = None) -> None:
        """Write the receptive fields of the monitored layers, of every layer, a chart of them, and which layers are
        predicted unproductive (``receptive_field/unproductive``), once."""
        monitored = [self.table[layer].to_record() for layer in self.layers]
        every = [row.to_record() for row in self.table.values()]
        notes = unsupported_notes(every)
        chart = figure_image(summary_figure(monitored))
        verdicts = self.verdicts()

        def write(destination: Destination) -> None:
            destination.add_table(f"{TAG}/table", COLUMNS, table_rows(monitored), step)
            destination.add_table(f"{TAG}/table_all_layers", COLUMNS, table_rows(every), step)
            if notes:
                destination.add_text(f"{TAG}/unsupported", "\n".join(f"* {note}" for note in notes), step)
            destination.add_text(f"{TAG}/unproductive", verdicts, step)
            destination.add_image(f"{TAG}/summary", chart, step)

        _send(self._as_destinations(destinations), write, on_error)

    def verdicts(self) -> str:
        """Markdown: which layers are predicted unproductive at the probes' size, what they cost, the rule, and the
        rows on both sides of the border (the layers that compute a field, as marked in the table)."""
        size = "x".join(map(str, self.table.input_shape[1:]))
        marked = [key for key in self.table.computing() if self.table[key].verdict in ("border", "unproductive")]
        named = set(self.cost.layers) | set(marked)
        records = [self.table[key].to_record() for key in self.table.output_order if key in named]
        rule = (
            f"A field covers the {size} input when its analytic size reaches it on every axis."
            f" **unproductive**: {MARKED['unproductive']}; **border**: {MARKED['border']}. The chart"
            " `receptive_field/coverage` shows at each logging step whether the effective fields past the border grow."
        )
        lines = [self.cost.describe(), "", rule]
        if records:
            lines += ["", markdown_table(COLUMNS, table_rows(records))]
        return "\n".join(lines)

    def _as_destinations(self, value: Any) -> list[Destination]:
        """``value`` as destinations; a ``SummaryWriter`` becomes one :class:`TensorBoardDestination`, kept for
        the next calls, so that only each scalar's first point carries its description."""
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if hasattr(item, "add_scalar") and id(item) not in self._wrapped:
                self._wrapped[id(item)] = (item, TensorBoardDestination(item, descriptions=DESCRIPTIONS))
        return [self._wrapped[id(item)][1] if hasattr(item, "add_scalar") else item for item in items]

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to look through the very same probes."""
        probes = self.probes
        return {"probes": probes.images, "labels": probes.labels, "indices": probes.indices}


def layer_tag(index: int, layer: str) -> str:
    """The tag of the ``index``-th monitored layer: a zero-padded index first, so tags sort in network order.

    Example::
        >>> layer_tag(0, "layer1.0.relu[2]")
        'receptive_field/00_layer1.0.relu[2]'
    """
    return f"{TAG}/{index:02d}_{layer}"


def _peak(values: Tensor) -> Tensor:
    """The position of the largest value of ``values`` (any shape), as float coordinates ``(d,)``."""
    flat = int(values.argmax())
    coordinates = []
    for length in reversed(values.shape):
        coordinates.append(flat % length)
        flat //= length
    return torch.tensor(coordinates[::-1], dtype=torch.float32)


def _channel_hint(model: nn.Module, shape: tuple[int, ...]) -> str:
    """A sentence naming the channels the model's first convolution or linear layer takes, when it disagrees."""
    first = next(
        (m for m in unwrap_model(model).modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None
    )
    wanted = getattr(first, "in_channels", None)
    if wanted is not None and wanted != shape[0]:
        return f"the model's first convolution takes {wanted} channels, the probes have {shape[0]}. "
    return ""


def _send(destinations: list[Destination], write: Callable[[Destination], None], on_error: OnError | None) -> None:
    """``write`` to every destination, then flush it; with ``on_error``, one that fails stops no other."""
    for destination in destinations:
        try:
            try:
                write(destination)
            finally:
                destination.flush()
        except Exception as error:
            if on_error is None:
                raise
            on_error(destination, error)
