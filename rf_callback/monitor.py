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

Sharded models (FSDP2 ``fully_shard``, FSDP, DeepSpeed ZeRO-3) need every rank: build the monitor on
every rank, then call ``log`` on every rank at the same steps, with rank zero's writer::

    monitor = ProbeMonitor(model, probes)                      # every rank: traces a parameter-free twin
    monitor.log(writer if rank == 0 else None, step=epoch)      # every rank: gathers, rank zero maps and writes

(see :mod:`rf_callback.sharding`). Rank zero's probes are the ones used.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rf_callback.cost import Cost, unproductive_cost
from rf_callback.destinations import Destination, TensorBoardDestination, no_space_left
from rf_callback.erf import LUO_THRESHOLD, MASS_SHARES, check_threshold_and_mass, mean_area_key
from rf_callback.errors import DiskSpaceError, TraceError
from rf_callback.probes import Probes, as_probes
from rf_callback.render import CARD, coverage_figure, figure_image, layer_image, mean_image, summary_figure
from rf_callback.report import COLUMNS, MARKED, markdown_table, table_rows, unsupported_notes
from rf_callback.saliency import NonFiniteMapWarning, ReceptiveMaps, _receptive_maps, probe_mismatch
from rf_callback.selection import Unit, check_channel, check_unit, check_unit_fits, resolve_layers
from rf_callback.sharding import gathered, sharding_of
from rf_callback.table import ReceptiveFieldTable, receptive_fields, unwrap_model

__all__ = ["DESCRIPTIONS", "MIN_FREE_MB", "STATISTICS", "TAG", "ProbeMonitor", "eager", "layer_tag"]

OnError = Callable[["Destination | None", str, Exception], None]
"""Called with the destination (``None`` for a picture that could not be drawn), what could not be written or
drawn (in words, naming the layer) and the error."""

MIN_FREE_MB = 64.0
"""Disk space (MB) images never eat into: a destination's images stop for the run rather than leave less than
this free on its disk, for the run's own logs and checkpoints."""

TAG = "receptive_field"
"""Every tag starts with this: images ``receptive_field/<k>_<layer>`` (and ``.../mean``), scalars ``.../<statistic>``."""

STATISTICS = {
    "erf_size": (
        "size",
        (
            "ERF size: side (input px) of a square with the area of the input pixels whose saliency exceeds"
            " the threshold (default 4.55%) of the map's own peak."
        ),
    ),
    "erf_size_fraction": (
        "size_fraction",
        (
            "ERF size relative to the analytic receptive field: divided by the side of a square with the area of"
            " the unit's box clipped to the input (0-1)."
        ),
    ),
    "erf_mass_side": (
        "mass_side",
        (
            "Side (input px) of the smallest square centred on the unit's receptive-field centre holding the mass"
            " share (default 95%) of the map's total saliency."
        ),
    ),
    "erf_mass_fraction": (
        "mass_fraction",
        (
            "ERF mass side relative to the receptive field's reach: divided by the side of the smallest square"
            " around the same centre that holds the unit's whole box clipped to the input (0-1)."
        ),
    ),
    "dead_fraction": ("dead_fraction", "Share of probes whose unit has an all-zero map (logged only when nonzero)."),
    "non_finite_fraction": (
        "non_finite_fraction",
        "Share of probes whose map holds NaN or inf, left out of the other statistics (logged only when nonzero).",
    ),
    **{
        f"erf_{mean_area_key(share)}": (
            mean_area_key(share),
            f"Share of the input (0-1) whose largest values hold {100 * share:g}% of the probes' mean map: small is compact.",
        )
        for share in MASS_SHARES
    },
}
"""Scalar name -> (:meth:`ERFStats.mean` key, one-sentence description saying what it is relative to). For 1-D and
3-D inputs a "square" is an interval or a cube, its side the d-th root of the volume."""

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

    Every item (the scalars, each image, each table) goes to each destination on its own: one that fails
    costs only itself, and ``on_error`` names it. A pass's images take at most ``max_image_mb`` MB of
    pixels (PNG writes them in less); the layers beyond are not drawn, with one warning. Before writing
    images to a folder on this machine, the free space is checked: a destination's images stop for the
    run, with one ``on_error`` call, rather than leave less than :data:`MIN_FREE_MB` free (its scalars
    still go). When a write finds the disk full all the same, nothing more goes to that destination.

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
        tile: screen pixels per probe side in the images, at most (inputs are scaled by a whole factor, as
            large as TensorBoard's card allows).
        max_image_mb: the most image pixels (3 bytes each, in MB) one pass draws and writes.

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
        max_image_mb: float = 64.0,
    ) -> None:
        self.unit = check_unit(unit)
        self.channel = check_channel(channel)
        self.threshold, self.mass = check_threshold_and_mass(threshold, mass)
        if not isinstance(tile, int) or tile < 16:
            raise ValueError(f"tile={tile!r}: screen pixels per probe side, an int >= 16.")
        if not isinstance(max_image_mb, (int, float)) or isinstance(max_image_mb, bool) or not max_image_mb > 0:
            raise ValueError(f"max_image_mb={max_image_mb!r}: the most MB of image pixels per pass, a number > 0.")
        self.tile = tile
        self.max_image_mb = float(max_image_mb)
        self.model = model
        self.probes = as_probes(probes)
        self.table = self._trace()
        self.cost: Cost = unproductive_cost(model, self.table)
        self.layers = resolve_layers(self.table, layers)
        self._check_units_and_channels()
        self.tags = {layer: layer_tag(index, layer) for index, layer in enumerate(self.layers)}
        self._wrapped: dict[int, tuple[Any, Destination]] = {}  # id(SummaryWriter) -> (it, its destination)
        self._images_stopped: set[int] = set()  # id() of the destinations whose disk is nearly full: no more images
        self._full: set[int] = set()  # id() of the destinations whose disk is full: nothing more at all
        self._said: set[str] = set()  # the warnings given, not repeated every pass

    def _trace(self) -> ReceptiveFieldTable:
        shape = tuple(self.probes.images.shape[1:])
        try:
            with eager():
                return receptive_fields(self.model, shape, strict=False)
        except TraceError as error:
            mismatch = probe_mismatch(self.model, self.probes.images.shape)
            raise ValueError(mismatch or f"probes of shape {tuple(self.probes.images.shape)}: {error}") from error

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

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are sharded across ranks now: then :meth:`compute` and :meth:`log`
        are collectives (every rank calls them at the same point), and only rank zero gets maps."""
        return sharding_of(unwrap_model(self.model)) is not None

    def compute(self) -> ReceptiveMaps | None:
        """The receptive maps of the probes at the monitored layers, for the model as it is now.

        When the parameters are sharded (FSDP2, FSDP, DeepSpeed ZeRO-3) every rank must call it at the same
        point: the full parameters are gathered (:func:`~rf_callback.sharding.gathered`), rank zero computes
        the maps on a twin holding them and returns them; the other ranks return ``None`` at once. Maps
        holding NaN or inf get one :class:`~rf_callback.saliency.NonFiniteMapWarning`, repeated only when
        what it says changes.
        """
        model = unwrap_model(self.model)
        sharding = sharding_of(model)
        with gathered(model, sharding) if sharding is not None else contextlib.nullcontext(model) as whole:
            if whole is None:
                return None
            with eager():
                result, non_finite = _receptive_maps(
                    whole,
                    self.probes.images,
                    self.layers,
                    unit=self.unit,
                    channel=self.channel,
                    threshold=self.threshold,
                    mass=self.mass,
                    table=self.table,
                )
        if non_finite is not None:
            self._say(non_finite, NonFiniteMapWarning)
        return result

    def images(self, result: ReceptiveMaps, on_error: OnError | None = None) -> dict[str, Tensor]:
        """Two uint8 images ``(3, H, W)`` per layer: under its tag every probe with its heatmap, box, centre
        and caption; under ``<tag>/mean`` the probes' mean map, with the box when every unit has the same.
        Both are laid out for TensorBoard's card (:data:`~rf_callback.render.CARD`), at one width, so that
        they are shown at one scale, their text at the size it was drawn.

        Probes whose map holds NaN or inf are drawn marked so, and left out of the mean. Layers are drawn in
        order while their pixels fit ``max_image_mb``; the rest are left out with one warning. A layer that
        cannot be drawn is left out and given to ``on_error`` (``None`` raises).
        """
        drawn: dict[str, Tensor] = {}
        means = result.mean_maps
        budget, used = self.max_image_mb * 1e6, 0
        for k, layer in enumerate(result.layers):
            tag = self.tags[layer]
            try:
                grid, mean = self._draw(result, k, means[k])
            except Exception as error:  # one layer's picture costs only itself, and is reported
                if on_error is None:
                    raise
                on_error(None, f"the images of layer {layer!r} ({tag})", error)
                continue
            used += grid.numel() + mean.numel()
            if used > budget:
                left = result.layers[k:]
                self._say(
                    f"ProbeMonitor: the images of {len(left)} layer{'s' * (len(left) > 1)} ({', '.join(left[:5])}"
                    f"{', ...' if len(left) > 5 else ''}) are not drawn: one pass's images would take more than"
                    f" max_image_mb={self.max_image_mb:g} MB of pixels. Their scalars are logged. HINT: raise"
                    " max_image_mb, or monitor fewer layers or probes."
                )
                break
            drawn[tag], drawn[f"{tag}/mean"] = grid, mean
        return drawn

    def _draw(self, result: ReceptiveMaps, k: int, mean: Tensor) -> tuple[Tensor, Tensor]:
        """The ``k``-th layer's two pictures: every probe, and the probes' ``mean`` map."""
        analytic, finite = result.analytic[k], result.finite[:, k]
        grid = layer_image(
            self.probes.images, result.maps[:, k], result.boxes[:, k], result.centers[:, k],
            labels=self.probes.labels, tile=self.tile, analytic=analytic, finite=finite, fit=CARD,
        )  # fmt: skip
        same = bool((result.units[:, k] == result.units[0, k]).all())
        center = result.centers[0, k] if same or not bool(finite.any()) else _peak(mean)
        mean_picture = mean_image(
            mean, result.boxes[0, k] if same else None, center,
            probes=int(finite.sum()), analytic=analytic, tile=self.tile, fit=CARD,
        )  # fmt: skip
        return grid, mean_picture

    def scalars(self, result: ReceptiveMaps) -> dict[str, float]:
        """The ERF statistics, averaged over the probes whose map is finite, by tag (``dead_fraction`` and
        ``non_finite_fraction`` only where nonzero; none of a layer without a finite map but the latter)."""
        means = result.erf.mean()
        values = {}
        for k, layer in enumerate(result.layers):
            for name, (key, _) in STATISTICS.items():
                value = float(means[key][k])
                if not math.isnan(value) and (name not in ("dead_fraction", "non_finite_fraction") or value > 0):
                    values[f"{self.tags[layer]}/{name}"] = value
        return values

    def coverage(self, result: ReceptiveMaps, title: str | None = None) -> Tensor:
        """The monitored layers' analytic fields (smallest to largest over paths) and their effective fields now,
        against the input, with the border marked: a uint8 image (:func:`~rf_callback.render.coverage_figure`)."""
        records = [self.table[layer].to_record() for layer in result.layers]
        sizes = result.erf.mean()["size"].tolist()  # per layer, Luo et al.'s ERF size
        titled = {} if title is None else {"title": title}
        return figure_image(coverage_figure(records, self.table.input_shape[1:], sizes, **titled))

    def log(self, destinations: Any, step: int, on_error: OnError | None = None) -> ReceptiveMaps | None:
        """Compute, draw and write this step's maps and statistics to each destination; return the maps.

        Under sharded parameters every rank calls it (see :meth:`compute`); ranks other than zero pass
        ``None`` and get ``None``.

        Args:
            destinations: a ``SummaryWriter``, a :class:`~rf_callback.destinations.Destination`, a list, or
                ``None`` (compute only).
            step: the step to log at.
            on_error: called with ``(destination, what, error)`` for each item a destination fails to write
                (``what`` names it: the scalars, the image of a layer...), and with ``(None, what, error)``
                for a layer whose picture cannot be drawn, so that the other items and destinations still
                get written; ``None`` raises.
        """
        result = self.compute()
        targets = self._as_destinations(destinations)
        if result is None or not targets:
            return result
        images, scalars = self.images(result, on_error), self.scalars(result)
        layers = {tag: layer for layer, tag in self.tags.items()}
        items = [_Item("the ERF statistics (scalars)", lambda d: d.add_scalars(scalars, step))]
        for tag, image in images.items():
            layer = layers[tag.removesuffix("/mean")]
            what = f"the {'mean image' if tag.endswith('/mean') else 'image'} of layer {layer!r} ({tag})"
            items.append(_Item(what, lambda d, tag=tag, image=image: d.add_image(tag, image, step), image.numel()))
        tag = f"{TAG}/coverage"
        try:
            coverage = self.coverage(result)
        except Exception as error:  # like a layer's picture: costs only itself, and is reported
            if on_error is None:
                raise
            on_error(None, f"the chart {tag}", error)
        else:
            items.append(_Item(f"the chart {tag}", lambda d: d.add_image(tag, coverage, step), coverage.numel()))
        self._send(targets, items, on_error)
        return result

    def log_table(self, destinations: Any, step: int = 0, on_error: OnError | None = None) -> None:
        """Write the receptive fields of the monitored layers, of every layer, a chart of them, and which layers are
        predicted unproductive (``receptive_field/unproductive``), once."""
        monitored = [self.table[layer].to_record() for layer in self.layers]
        every = [row.to_record() for row in self.table.values()]
        notes = unsupported_notes(every)
        chart = figure_image(summary_figure(monitored))
        items = [
            _Item(
                f"the table {TAG}/table", lambda d: d.add_table(f"{TAG}/table", COLUMNS, table_rows(monitored), step)
            ),
            _Item(
                f"the table {TAG}/table_all_layers",
                lambda d: d.add_table(f"{TAG}/table_all_layers", COLUMNS, table_rows(every), step),
            ),
        ]
        verdicts = self.verdicts()
        if notes:
            text = "\n".join(f"* {note}" for note in notes)
            items.append(_Item(f"the notes {TAG}/unsupported", lambda d: d.add_text(f"{TAG}/unsupported", text, step)))
        items.append(_Item(f"the text {TAG}/unproductive", lambda d: d.add_text(f"{TAG}/unproductive", verdicts, step)))
        items.append(
            _Item(f"the chart {TAG}/summary", lambda d: d.add_image(f"{TAG}/summary", chart, step), chart.numel())
        )
        self._send(self._as_destinations(destinations), items, on_error)

    def _send(self, destinations: list[Destination], items: list[_Item], on_error: OnError | None) -> None:
        """Each item to each destination, on its own, then flush it; with ``on_error``, a failure costs only its
        item (all of the destination's remaining items when it raises the very same error again: a broken
        writer). A destination's images stop for the run when its disk is nearly full; everything stops when a
        write finds it full, so that the room left stays for the run's own logs."""
        pixels = sum(item.image_bytes for item in items)
        for destination in destinations:
            if id(destination) in self._full:
                continue
            seen: list[Exception] = []
            if pixels and id(destination) not in self._images_stopped:
                short = _short_of_space(destination, pixels)
                if short is not None:
                    self._images_stopped.add(id(destination))
                    self._failed(destination, "images", DiskSpaceError(short), seen, on_error)
            for item in items:
                if item.image_bytes and id(destination) in self._images_stopped:
                    continue
                try:
                    item.write(destination)
                except Exception as error:  # noqa: BLE001 - each destination's failure is reported, never swallowed
                    if self._failed(destination, item.what, error, seen, on_error):
                        break
            if id(destination) in self._full:
                continue
            try:
                destination.flush()
            except Exception as error:  # noqa: BLE001 - as above
                self._failed(destination, "what it buffered", error, seen, on_error)

    def _failed(
        self, destination: Destination, what: str, error: Exception, seen: list[Exception], on_error: OnError | None
    ) -> bool:
        """Report a failed write (raise it without ``on_error``); True when the destination's remaining items are to
        be skipped: this error was already seen there in this pass (a broken writer), or its disk is full."""
        if on_error is None:
            raise error
        if any(error is earlier for earlier in seen):
            return True
        seen.append(error)
        if no_space_left(error) and not isinstance(error, DiskSpaceError):
            self._full.add(id(destination))
            recovery = getattr(destination, "recovery", None)
            full = DiskSpaceError(
                f"no space left on the disk while writing {what}: nothing more goes to {destination.describe()} in"
                " this run (images, scalars, tables), so that the room left stays for the run's own logs"
                f"{f'; {recovery}' if recovery else ''}. HINT: free space on that disk, or log to another one."
            )
            full.__cause__ = error
            on_error(destination, what, full)
            return True
        on_error(destination, what, error)
        return False

    def _say(self, message: str, category: type[Warning] = UserWarning) -> None:
        """Warn, once per message."""
        if message not in self._said:
            self._said.add(message)
            warnings.warn(message, category, stacklevel=3)

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
        items = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
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


@dataclass(frozen=True)
class _Item:
    """One thing a pass writes to each destination."""

    what: str  # in words, for messages: "the image of layer 'conv1' (receptive_field/00_conv1)"
    write: Callable[[Destination], None]
    image_bytes: int = 0  # its pixels' bytes, for an image: stopped with the others when the disk is full


def _short_of_space(destination: Destination, image_bytes: int) -> str | None:
    """Why ``image_bytes`` more would leave less than :data:`MIN_FREE_MB` free on the destination's disk, or None."""
    where = getattr(destination, "local_folder", None)
    folder = where() if callable(where) else None
    if folder is None:
        return None
    free = _free_bytes(Path(folder))
    if free is None or free - image_bytes >= MIN_FREE_MB * 1e6:
        return None
    return (
        f"only {free / 1e6:.1f} MB free on the disk of {folder}; this pass's images take up to {image_bytes / 1e6:.1f}"
        f" MB and {MIN_FREE_MB:g} MB are left for the run's own logs and checkpoints: images to"
        f" {destination.describe()} stop for the rest of this run; scalars still go. HINT: free space on that disk,"
        " or log to another one."
    )


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding ``folder`` (or its nearest existing parent); None if that cannot be known."""
    for candidate in (folder, *folder.absolute().parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None
