"""Gradient-saliency receptive maps: where a unit *does* look (its effective receptive field).

The theoretical receptive field (:func:`~rf_callback.receptive_fields`) says where a unit can
look; the gradient of the unit with respect to the input says where it does (Luo, Li, Urtasun
and Zemel, "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks",
NIPS 2016). :func:`receptive_maps` computes these maps for a batch of probe images and many
layers at once, leaving no trace on the model: a few forward passes, each on whole images or on
only the pixels its layers' units can see (crops, or their boxes tiled side by side), and at most
one backward pass per layer.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from rf_callback.report import format_table
from rf_callback.table import LayerKey, LayerRF, ReceptiveFieldTable, evaluating, receptive_fields, unwrap_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ERFStats",
    "ReceptiveMaps",
    "all_layers",
    "check_channel",
    "check_threshold_and_mass",
    "check_unit",
    "default_layers",
    "erf_stats",
    "receptive_maps",
]

Unit = Literal["center", "max"] | tuple[int, int]
"""Which output unit of a layer: the middle one, each probe's most active one, or a position (i, j)."""

LUO_THRESHOLD = 0.0455
"""1 - 95.45%: Luo et al. count the pixels above this fraction of the peak (a Gaussian's 2-sigma mass)."""

SPATIAL_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)


@dataclass(frozen=True)
class ERFStats:
    """Effective-receptive-field statistics, each a float tensor of shape (N, L) (probe, layer).

    Attributes:
        count: pixels whose saliency exceeds ``threshold`` times the map's peak (Luo et al.).
        size: ``sqrt(count)``, the side of a square of that area, in pixels.
        mass_side: side of the smallest square centred on the unit's RF centre that holds at least
            ``mass`` of the map's total saliency.
        rf_side: ``sqrt`` of the area of the unit's analytic box clipped to the image.
        size_fraction: ``size / rf_side``.
        mass_fraction: ``mass_side / rf_side`` (may exceed 1 near the border, where squares are cut).
        dead: True where the map is all zero (a dead unit); every statistic is 0 there.
        threshold: the fraction of the peak used for ``count``.
        mass: the fraction of the total used for ``mass_side``.
    """

    count: Tensor
    size: Tensor
    mass_side: Tensor
    rf_side: Tensor
    size_fraction: Tensor
    mass_fraction: Tensor
    dead: Tensor
    threshold: float
    mass: float

    def mean(self) -> dict[str, Tensor]:
        """Each statistic averaged over the probes whose unit is alive, shape (L,); 0 where all are dead.

        Keys: ``count``, ``size``, ``mass_side``, ``rf_side``, ``size_fraction``, ``mass_fraction`` (the
        attributes above) and ``dead_fraction`` (the share of probes whose map is all zero).
        """
        alive = (~self.dead).to(self.size.dtype)
        counted = alive.sum(0)
        result = {}
        for name in ("count", "size", "mass_side", "rf_side", "size_fraction", "mass_fraction"):
            total = (getattr(self, name) * alive).sum(0)
            result[name] = torch.where(counted > 0, total / counted.clamp(min=1), torch.zeros_like(total))
        result["dead_fraction"] = self.dead.to(self.size.dtype).mean(0)
        return result


@dataclass(frozen=True)
class ReceptiveMaps:
    """Gradient receptive maps of N probes at L layers.

    Attributes:
        layers: the layer names (keys of the receptive-field table), in order.
        maps: ``|d unit / d input|`` summed over input channels, float32 (N, L, H, W).
        gradients: the signed gradient, float32 (N, L, C, H, W).
        units: the chosen unit ``(i, j)`` in each layer's output, int64 (N, L, 2).
        boxes: that unit's analytic box ``(top, left, bottom, right)`` clipped to the image, int64 (N, L, 4).
        centers: the centre ``(y, x)`` of that box's unclipped receptive field, float32 (N, L, 2).
        erf: the statistics of each map (:class:`ERFStats`).
    """

    layers: tuple[str, ...]
    maps: Tensor
    gradients: Tensor
    units: Tensor
    boxes: Tensor
    centers: Tensor
    erf: ERFStats

    def plot(
        self,
        probes: Tensor,
        layers: str | Sequence[str] | None = None,
        *,
        select: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        tile: int = 128,
    ) -> Figure:
        """The picture the callback logs, as a matplotlib figure: one grid of probes per layer.

        Args:
            probes: the images the maps were computed for ``(N, C, H, W)``.
            layers: one layer key or several (default: all of them).
            select: which probes to show (default: all).
            labels: a caption per probe.
            tile: screen pixels per probe side.

        Example::

            maps = receptive_maps(model, probes)
            maps.plot(probes, "layer3", select=[0, 1, 2])  # a Figure; in Jupyter it shows itself
        """
        from rf_callback.render import plot_maps

        names = [layers] if isinstance(layers, str) else list(layers) if layers is not None else list(self.layers)
        missing = [name for name in names if name not in self.layers]
        if missing:
            raise KeyError(f"ReceptiveMaps.plot: no maps for {missing}; these maps have {list(self.layers)}.")
        columns = [self.layers.index(name) for name in names]
        rows = list(select) if select is not None else list(range(len(probes)))
        captions = [labels[n] for n in rows] if labels is not None else None
        return plot_maps(
            probes[rows],
            self.maps[rows][:, columns],
            self.boxes[rows][:, columns],
            self.centers[rows][:, columns],
            labels=captions,
            layer_names=names,
            tile=tile,
        )

    def summary(self) -> str:
        """Per layer, the ERF statistics averaged over the probes, as an aligned table (``print(maps.summary())``).

        Columns: ``ERF size`` (side of a square with the area of the pixels above the threshold, input
        px), ``ERF/RF`` (that over the side of the analytic box), ``mass side`` (the square around the
        unit's centre holding ``mass`` of the saliency), ``mass/RF``, ``dead`` (probes with an all-zero map).
        """
        means = self.erf.mean()
        rows = [
            [
                layer,
                f"{means['size'][k]:.1f}",
                f"{means['size_fraction'][k]:.2f}",
                f"{means['mass_side'][k]:.1f}",
                f"{means['mass_fraction'][k]:.2f}",
                f"{means['dead_fraction'][k]:.0%}",
            ]
            for k, layer in enumerate(self.layers)
        ]
        return format_table(["layer", "ERF size", "ERF/RF", "mass side", "mass/RF", "dead"], rows)


def check_unit(unit: object) -> Unit:
    """``unit`` in its one canonical form, or a ``ValueError`` that lists the choices.

    ``"centre"`` is accepted for ``"center"``; a list ``[i, j]`` becomes a tuple.

    Example::
        >>> check_unit("centre"), check_unit([3, 4])
        ('center', (3, 4))
    """
    if unit == "centre":
        return "center"
    if unit in ("center", "max"):
        return unit  # type: ignore[return-value]
    if (
        isinstance(unit, (list, tuple))
        and len(unit) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in unit)
    ):
        return (unit[0], unit[1])
    raise ValueError(f"unit={unit!r}: choose 'center' (or 'centre'), 'max' or a unit position (i, j) with ints >= 0.")


def check_threshold_and_mass(threshold: float, mass: float) -> tuple[float, float]:
    """The ERF thresholds if ``0 < threshold < 1`` and ``0 < mass <= 1``, else a ``ValueError``.

    Example::
        >>> check_threshold_and_mass(LUO_THRESHOLD, 0.95)
        (0.0455, 0.95)
    """
    if not 0 < threshold < 1 or not 0 < mass <= 1:
        raise ValueError(f"threshold={threshold}, mass={mass}: need 0 < threshold < 1 and 0 < mass <= 1.")
    return threshold, mass


def check_channel(channel: object) -> int | None:
    """``channel`` if it is None (sum over channels) or an int >= 0, else a ``ValueError``.

    Example::
        >>> check_channel(None), check_channel(3)
        (None, 3)
    """
    if channel is None or (isinstance(channel, int) and not isinstance(channel, bool) and channel >= 0):
        return channel
    raise ValueError(f"channel={channel!r}: None (sum over channels) or an int >= 0.")


def _mappable(row: LayerRF) -> bool:
    """Whether a row can have a receptive map: a supported row whose output is an image ``(N, C, h, w)``."""
    return row.supported and len(row.output_shape) == 2 and tuple(row.tensor_shape[2:]) == row.output_shape


def default_layers(table: ReceptiveFieldTable) -> list[str]:
    """One layer per resolution stage: for each output resolution, the last layer of the shallowest depth.

    Depth counts the dots of the module name, so a stage's container (``layer1`` of a ResNet,
    ``features.1`` of a ConvNeXt) wins over the layers inside it and over the first layer of the
    next stage that still runs at its resolution. Containers holding more than one change of
    resolution (a whole ``features`` block) and rows with a single output position (heads) are
    left out. torchvision's ResNets give ``relu, layer1, layer2, layer3, layer4``.

    Example::
        >>> from torch import nn
        >>> conv = nn.Conv2d(4, 4, 3, padding=1)
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), conv, nn.MaxPool2d(2))
        >>> default_layers(receptive_fields(net, (1, 32, 32)))  # the last at 32x32, at 16x16, at 8x8
        ['1', '3', '4']
    """
    rows = {key: row for key, row in table.items() if _mappable(row)}
    inside: dict[str, set[tuple[int, ...]]] = {}  # module -> resolutions of the rows of modules inside it
    for key, row in rows.items():
        parts = LayerKey.parse(key).module.split(".")
        for end in range(len(parts)):
            inside.setdefault(".".join(parts[:end]), set()).add(row.output_shape)
    chosen: dict[tuple[int, ...], tuple[int, str]] = {}  # resolution -> (depth, key)
    for key, row in rows.items():
        module = LayerKey.parse(key).module
        if math.prod(row.output_shape) == 1 or len(inside.get(module, ())) > 2:
            continue  # a head, or a container of several stages
        depth = module.count(".")
        best = chosen.get(row.output_shape)
        if best is None or depth <= best[0]:
            chosen[row.output_shape] = (depth, key)
    keys = {key for _, key in chosen.values()}
    return [key for key in table if key in keys]


def all_layers(table: ReceptiveFieldTable) -> list[str]:
    """Every row that can have a receptive map (supported, with a 2-D output), in call order."""
    return [key for key, row in table.items() if _mappable(row)]


class _Stop(BaseException):
    """Raised from the last needed hook to skip the rest of forward (BaseException: user code's
    ``except Exception`` does not swallow it)."""


def resolve_layers(table: ReceptiveFieldTable, layers: str | Sequence[str] | None) -> list[str]:
    """The layer keys to map: ``None`` for :func:`default_layers`, ``"all"`` for :func:`all_layers`, or names.

    Raises:
        ValueError: for an unknown name (close matches and the valid names listed), a row without a
            receptive field, or one without a 2-D spatial output.
    """
    if layers is None or layers == "all":
        chosen = default_layers(table) if layers is None else all_layers(table)
        if not chosen:
            raise ValueError(
                "no layer with a 2-D receptive field that varies across the image: nothing to map. Rows:"
                f" {', '.join(table) or 'none'}. HINT: check the input shape, or pass layers=[...]."
            )
        return chosen
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"layers={layers!r}: give None, 'all', or a non-empty list of layer names.")
    valid = ", ".join(all_layers(table)) or "none"
    for name in names:
        try:
            row = table[name]
        except KeyError as error:
            raise ValueError(f"layers={names!r}: {error.args[0]} Layers that have maps: {valid}.") from None
        if not row.supported:
            raise ValueError(f"layers={names!r}: '{name}' has no receptive field: {row.unsupported.reason}.")
        if not _mappable(row):
            raise ValueError(
                f"layers={names!r}: '{name}' ({row.module_type}) gives an output of shape"
                f" {tuple(row.tensor_shape)} for one input, not an image (N, C, h, w), so it has no 2-D receptive map."
                f" Layers that have maps: {valid}."
            )
    return list(dict.fromkeys(names))


class _CropFailed(Exception):
    """The model cannot run on crops of the probes (it checks its input size, cuts at fixed places...)."""


_UNCROPPABLE: weakref.WeakKeyDictionary[nn.Module, set[frozenset[str]]] = weakref.WeakKeyDictionary()
"""Per model, the layer sets whose crops failed once, so that they are not tried again (weak keys:
the cache never keeps a model alive)."""


def _capture(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layers: Sequence[str],
    probes: Tensor,
    pick: Callable[[str, Tensor], Tensor],
    *,
    cropped: bool = False,
) -> dict[str, Tensor]:
    """Run ``model(probes)`` until every wanted layer is seen; return ``pick(layer, output)`` by layer.

    ``pick`` runs inside the forward hook, on the output as the layer returned it. The model may
    later modify that tensor in place (``out += branch(x)``, ``out.relu_()``); what ``pick`` took
    from it (an indexed copy, tied by autograd to the output's history at that moment) does not
    change, so a layer's result never depends on how far the forward runs. ``pick``'s own errors
    are raised as they are; with ``cropped``, an error of the model's forward (an input-size check,
    a fixed reshape) is raised as :class:`_CropFailed`.
    """
    wanted: dict[str, dict[int, list[tuple[str, int]]]] = {}
    for key in layers:
        parsed = LayerKey.parse(key)
        wanted.setdefault(parsed.module, {}).setdefault(parsed.call or 0, []).append((key, parsed.output or 0))
    captured: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    errors: list[Exception] = []

    def hook_for(name: str):
        def hook(_module, _args, output):
            index = calls.get(name, 0)
            calls[name] = index + 1
            for key, position in wanted[name].get(index, ()):
                try:
                    captured[key] = pick(key, _input_dependent(output)[position])
                except Exception as error:  # ours, not the model's: stop, and raise it below as it is
                    errors.append(error)
                    raise _Stop from None
            if len(captured) == len(layers):
                raise _Stop

        return hook

    handles = []
    try:
        for name in wanted:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        with contextlib.suppress(_Stop):
            model(probes)
    except Exception as error:
        if not cropped:
            raise
        raise _CropFailed(f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    missing = [key for key in layers if key not in captured]
    if missing:
        message = f"receptive_maps: forward never produced the outputs of {missing}."
        raise _CropFailed(message) if cropped else RuntimeError(message)
    return captured


def _input_dependent(output: object) -> list[Tensor]:
    """The tensors a module returned, in order, through tuples, lists and dicts (what ``name:i`` keys count)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _input_dependent(item)]
    return []


def _fixed_units(shape: tuple[int, ...], unit: Unit, name: str, count: int) -> Tensor | None:
    """The (i, j) of each probe's unit, (count, 2); None for ``unit="max"``, chosen during the forward."""
    if len(shape) != 2:
        raise ValueError(f"receptive_maps: layer '{name}' has a {len(shape)}-D spatial output; maps need 2-D images.")
    h, w = shape
    if unit == "max":
        return None
    if unit == "center":
        return torch.tensor([[h // 2, w // 2]] * count)
    i, j = unit
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"receptive_maps(unit={unit}): layer '{name}' has an output of {h}x{w}.")
    return torch.tensor([[i, j]] * count)


def _strongest(output: Tensor, channel: int | None) -> Tensor:
    """Each probe's position of largest activation (one channel, or the channel sum), (N, 2)."""
    output = output.detach()
    activation = output[:, channel] if channel is not None else output.sum(1)
    flat = activation.flatten(1).argmax(1).cpu()
    return torch.stack([flat // output.shape[3], flat % output.shape[3]], dim=1)


def _check_output(output: Tensor, channel: int | None, name: str) -> None:
    if output.dim() != 4:
        raise ValueError(f"receptive_maps: layer '{name}' gives a {output.dim()}-D output; maps need (N, C, h, w).")
    if channel is not None and not 0 <= channel < output.shape[1]:
        raise ValueError(f"receptive_maps(channel={channel}): layer '{name}' has {output.shape[1]} channels.")


def _unit_sum(output: Tensor, units: Sequence[tuple[int, int]], channel: int | None) -> Tensor:
    """Sum over probes of each probe's unit ``(i, j)`` (its channel sum, or one channel)."""
    if len(set(units)) == 1:
        i, j = units[0]
        picked = output[:, :, i, j]  # (N, C)
    else:
        rows, cols = (torch.tensor(axis, device=output.device) for axis in zip(*units))
        picked = output[torch.arange(len(units), device=output.device), :, rows, cols]
    return (picked[:, channel] if channel is not None else picked.sum(1)).sum()


def _per_unit(units: Tensor, function: Callable[[int, int], tuple]) -> list[tuple]:
    """``function(i, j)`` for each probe's unit, computed once per distinct unit."""
    cache: dict[tuple[int, int], tuple] = {}
    results = []
    for unit in map(tuple, units.tolist()):
        if unit not in cache:
            cache[unit] = function(*unit)
        results.append(cache[unit])
    return results


_PASS_OVERHEAD = 1024
"""What one more forward and backward cost beyond their pixels, counted in pixels of the probes
(one pixel through the network once). Measured on a CPU core with 10 probes, the fixed per-op
cost of a pass is what about 200 pixels cost in resnet18 and resnet50 at 224x224 and 500 in
SmallCNN at 28x28; the cost model ignores depth, which makes a shallow layer's backward in a
deeper pass look dearer than it is, so this leans towards fewer passes. Real networks' crops are
far larger, so only small inputs feel it."""


@dataclass(frozen=True)
class _Layout:
    """Where one pass puts the probes' pixels: layer ``name``'s tile, of ``(h, w)`` at ``(y, x)`` in
    the pass's input, holds ``image[n, :, top:top + h, left:left + w]`` for each probe's ``(top, left)``.

    Attributes:
        size: ``(H, W)`` of the pass's input.
        tiles: per layer, ``((h, w), (y, x), [(top, left) per probe])``.
        together: the tiles are the units' boxes and do not overlap, so one backward of the sum
            of all units gives each layer's gradient on its own tile.
    """

    size: tuple[int, int]
    tiles: dict[str, tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]]
    together: bool = False

    @property
    def area(self) -> int:
        return self.size[0] * self.size[1]


def _crop(
    names: Sequence[str], fields: ReceptiveFieldTable, boxes: dict[str, list[tuple]], image: tuple[int, int]
) -> _Layout | None:
    """One crop per probe from which every named layer's unit can be computed exactly; None: use the image.

    ``boxes`` holds each shift-equivariant layer's (``row.equivariant``: zero padding, no global
    mixing; strides > 0) analytic boxes, padding included, one per probe. A unit's gradient lives
    inside its box: running the network on a crop that holds that box, starts on a multiple of the
    effective stride and meets the image border wherever the box runs past it gives the unit
    exactly, and backward then costs the crop's area instead of the image's.
    """
    hulls = [_hull(probe_boxes) for probe_boxes in zip(*(boxes[name] for name in names))]  # per probe
    corners, size = [], []
    for axis, length in enumerate(image):
        stride = math.lcm(*(fields[name].stride[axis] for name in names))
        lows = [min(max(hull[axis], 0), length - 1) // stride * stride for hull in hulls]
        highs = [min(hull[axis + 2], length) for hull in hulls]
        extent = max(max(high - low for low, high in zip(lows, highs)), 1)
        extent = min(extent + (length - extent) % stride, length)  # so that length - extent is a multiple of stride
        corners.append([min(low, length - extent) for low in lows])
        size.append(extent)
    if tuple(size) == image:
        return None
    crop = (size[0], size[1])
    return _Layout(crop, {name: (crop, (0, 0), list(zip(*corners))) for name in names})


def _hull(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _mosaic(names: Sequence[str], fields: ReceptiveFieldTable, boxes: dict[str, list[tuple]]) -> _Layout:
    """The boxes of units that lie inside the image, side by side on one canvas per probe.

    Such a unit reads only the pixels of its box (its field meets no padding), wherever they sit,
    as long as they move by a multiple of its effective stride. So the tiles of several layers can
    share one input; their boxes do not overlap, so one backward of the sum of their units gives
    every layer's gradient on its own tile. Shelf packing, tallest first, at the width of least area.
    """
    sizes = {name: (boxes[name][0][2] - boxes[name][0][0], boxes[name][0][3] - boxes[name][0][1]) for name in names}
    order = sorted(names, key=lambda name: sizes[name], reverse=True)
    widths = [sizes[name][1] + fields[name].stride[1] - 1 for name in order]  # with room to align
    best: _Layout | None = None
    for limit in sorted({sum(widths[: k + 1]) for k in range(len(order))}):
        places, y0, x, bottom, right = {}, 0, 0, 0, 0
        for name in order:
            (h, w), (top, left, _, _), stride = sizes[name], boxes[name][0], fields[name].stride
            here = x + (left - x) % stride[1]  # the first column at or after x that keeps the unit on its grid
            if x and here + w > limit:  # a new shelf
                y0, x = bottom, 0
                here = left % stride[1]
            places[name] = (y0 + (top - y0) % stride[0], here)
            x = here + w
            bottom, right = max(bottom, places[name][0] + h), max(right, x)
        if best is None or bottom * right < best.area:
            tiles = {name: (sizes[name], places[name], [box[:2] for box in boxes[name]]) for name in names}
            best = _Layout((bottom, right), tiles, together=True)
    assert best is not None
    return best


def _cost(passes: Sequence[tuple[list[str], _Layout | None]], image: tuple[int, int], paid: bool) -> int:
    """A plan's cost in pixels of the probes: per pass, its overhead, one forward and its backward
    passes; ``paid``: the forward on whole images has run already."""
    total = 0
    for members, layout in passes:
        area = image[0] * image[1] if layout is None else layout.area
        backward = area if layout is not None and layout.together else area * len(members)
        total += backward + (0 if paid and layout is None else _PASS_OVERHEAD + area)
    return total


def _grouped(
    names: Sequence[str],
    fields: ReceptiveFieldTable,
    boxes: dict[str, list[tuple]],
    image: tuple[int, int],
    whole: Sequence[str],
    paid: bool,
) -> list[tuple[list[str], _Layout | None]]:
    """Crop passes for ``names``, ``whole`` on whole images: each layer runs on its own crop unless
    joining a pass with a larger one costs less. Forward and backward each cost about a pass's
    area, so a pass of its own costs a layer ``overhead + 2a``; joining a pass of area ``A``
    (with it) adds its backward, ``A``. Layers go from the largest crop down, each joining the
    smallest pass opened so far or opening the next. ``paid``: the forward on whole images has
    run already, so a layer can join that pass for its backward alone."""
    full = image[0] * image[1]
    own = {name: _crop([name], fields, boxes, image) for name in names}
    passes: list[tuple[list[str], _Layout | None]] = []
    first = [*whole, *(name for name in names if own[name] is None)]
    if first or paid:
        passes.append((first, None))
    for name in sorted((name for name in names if own[name] is not None), key=lambda name: -own[name].area):
        alone = own[name].area
        if passes:
            members, layout = passes[-1]
            merged = layout and _crop([*members, name], fields, boxes, image)
            if (full if merged is None else merged.area) <= 2 * alone + _PASS_OVERHEAD:
                passes[-1] = ([*members, name], merged)
                continue
        passes.append(([name], own[name]))
    whole_pass = [name for members, layout in passes if layout is None for name in members]
    return ([(whole_pass, None)] if whole_pass else []) + [(m, layout) for m, layout in passes if layout is not None]


_LAST_PLAN: list[tuple[weakref.ref, tuple, list]] = []
"""The last plan made, with a weak reference to its table: a callback asks for the same one every epoch."""


def _passes(
    names: Sequence[str],
    fields: ReceptiveFieldTable,
    units: dict[str, Tensor],
    image: tuple[int, int],
    paid: bool = False,
) -> list[tuple[list[str], _Layout | None]]:
    """The layers grouped into passes (one forward each) on crops, mosaics, or (``None``) whole images.

    Shift-equivariant layers run on crops around their units' boxes (:func:`_grouped`). Units
    whose boxes lie inside the image can instead share a mosaic of their boxes with one backward
    for all (:func:`_mosaic`): the smallest ``k`` of them do, for the ``k`` of least cost.
    ``paid``: a forward on whole images has run already (for ``unit="max"``).
    """
    key = (tuple(names), image, paid, tuple(tuple(map(tuple, units[name].tolist())) for name in names))
    if _LAST_PLAN and _LAST_PLAN[0][0]() is fields and _LAST_PLAN[0][1] == key:
        return _LAST_PLAN[0][2]
    plan = _plan(names, fields, units, image, paid)
    _LAST_PLAN[:] = [(weakref.ref(fields), key, plan)]
    return plan


def _plan(
    names: Sequence[str], fields: ReceptiveFieldTable, units: dict[str, Tensor], image: tuple[int, int], paid: bool
) -> list[tuple[list[str], _Layout | None]]:
    boxes = {
        name: _per_unit(units[name], lambda i, j, row=fields[name]: row.box(i, j, clip=False))
        for name in names
        if fields[name].equivariant and min(fields[name].stride) > 0
    }
    whole = [name for name in names if name not in boxes]
    best = _grouped(list(boxes), fields, boxes, image, whole, paid)
    height, width = image
    inside = [  # units whose fields meet no padding
        name for name in boxes if all(b[0] >= 0 and b[1] >= 0 and b[2] <= height and b[3] <= width for b in boxes[name])
    ]
    inside.sort(key=lambda name: fields[name].size[0] * fields[name].size[1])
    for k in range(2, min(len(inside), 16) + 1):
        tiled = inside[:k]
        plan = _grouped([n for n in boxes if n not in tiled], fields, boxes, image, whole, paid)
        plan.append((tiled, _mosaic(tiled, fields, boxes)))
        if _cost(plan, image, paid) < _cost(best, image, paid):
            best = plan
    order = {name: index for index, name in enumerate(names)}
    return [(sorted(members, key=order.__getitem__), layout) for members, layout in best]


def _move(target: Tensor, to: Sequence[tuple[int, int]], source: Tensor, at: Sequence[tuple[int, int]], size) -> None:
    """``target[n, :, y:y + h, x:x + w] = source[n, :, top:top + h, left:left + w]`` for each probe's corners."""
    h, w = size
    if len(set(to)) == 1 and len(set(at)) == 1:
        (y, x), (top, left) = to[0], at[0]
        target[:, :, y : y + h, x : x + w] = source[:, :, top : top + h, left : left + w]
        return
    for n, ((y, x), (top, left)) in enumerate(zip(to, at)):
        target[n, :, y : y + h, x : x + w] = source[n, :, top : top + h, left : left + w]


def _pass_gradients(
    model: nn.Module,
    modules: dict[str, nn.Module],
    members: Sequence[str],
    fields: ReceptiveFieldTable,
    pixels: Tensor,
    units: dict[str, Tensor],
    layout: _Layout | None,
    channel: int | None,
    into: dict[str, Tensor],
    reuse: tuple[Tensor, dict[str, Tensor]] | None = None,
) -> None:
    """Write the input gradient of each member layer's units into ``into[layer]`` (N, C, H, W).

    One forward on the pass's input (whole images, or the probes' pixels laid out by ``layout``),
    then one backward per layer through the shared graph, or a single one for a mosaic. ``reuse``
    is a forward already run on whole images: ``(leaf input, unit sums by layer)``. With a layout,
    raises :class:`_CropFailed` if the model cannot run on it; the caller then uses whole images.
    """
    count = len(pixels)
    if reuse is not None:
        leaf, targets = reuse
    else:
        if layout is None:
            leaf = pixels.clone()
        else:
            leaf = pixels.new_zeros(*pixels.shape[:2], *layout.size)
            for size, place, corners in {(s, p, tuple(c)) for s, p, c in layout.tiles.values()}:
                _move(leaf, [place] * count, pixels, corners, size)
        leaf.requires_grad_(True)

        local = {name: list(map(tuple, units[name].tolist())) for name in members}  # each probe's unit, in the pass
        if layout is not None:
            for name in members:
                _, (y, x), corners = layout.tiles[name]
                stride = fields[name].stride
                shifts = [((y - top) // stride[0], (x - left) // stride[1]) for top, left in corners]
                local[name] = [(i + di, j + dj) for (i, j), (di, dj) in zip(local[name], shifts)]

        def unit_sum(name: str, output: Tensor) -> Tensor:
            _check_output(output, channel, name)
            h, w = output.shape[2:]
            if layout is not None and not all(0 <= i < h and 0 <= j < w for i, j in local[name]):
                raise _CropFailed(f"layer '{name}' gives {h}x{w} positions on {layout.size}")
            return _unit_sum(output, local[name], channel)

        targets = _capture(model, modules, members, leaf, unit_sum, cropped=layout is not None)
    if layout is not None and layout.together:
        (gradient,) = torch.autograd.grad(torch.stack([targets[name] for name in members]).sum(), leaf)
        gradients = dict.fromkeys(members, gradient)
    else:
        gradients = {
            name: torch.autograd.grad(targets[name], leaf, retain_graph=index < len(members) - 1)[0]
            for index, name in enumerate(members)
        }
    for name in members:
        if layout is None:
            into[name][:] = gradients[name]
        else:
            size, place, corners = layout.tiles[name]
            _move(into[name], corners, gradients[name], [place] * count, size)


def receptive_maps(
    model: nn.Module,
    probes: Tensor,
    layers: Sequence[str] | None = None,
    *,
    unit: Unit = "center",
    channel: int | None = None,
    threshold: float = LUO_THRESHOLD,
    mass: float = 0.95,
    table: ReceptiveFieldTable | None = None,
) -> ReceptiveMaps:
    """Gradient receptive maps of one unit per (probe, layer), with ERF statistics.

    The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off),
    whatever its mode; every module's mode, its parameters and their ``.grad``, its hooks, the
    random state, grad mode, inference mode and autocast are left as found, and the probes are
    cloned. It works under ``torch.no_grad()`` and ``torch.inference_mode()`` (as in Lightning's
    validation), on the model's device and dtype, with channels-last probes, and on DDP or
    ``torch.compile`` wrappers. Autocast is switched off inside, so maps are computed at the
    model's own precision.

    Shift-equivariant layers run on crops of the probes around their units' boxes, and units whose
    fields meet no padding on their boxes tiled side by side, with one backward for all (exact,
    and cheaper). A model that cannot run on crops (it checks its input size, as torchvision's
    VisionTransformer does, or raises any other exception there) gets the same maps from whole
    images; that is decided once per model and set of layers, silently, and not tried again.
    Each layer's unit is read inside its forward hook, so a model that later changes that output
    in place (``out += branch(x)``, ``out.relu_()``) does not change its map: no map depends on
    which other layers are requested.

    Args:
        model: the network; ``model(probes)`` must run.
        probes: images (N, C, H, W).
        layers: layer keys from :func:`receptive_fields`; ``None`` (default): one per resolution stage
            (:func:`default_layers`); ``"all"``: every layer with a 2-D output.
        unit: ``"center"`` (the middle output position, as in Luo et al.), ``"max"`` (each probe's
            position of largest activation, summed over channels unless ``channel`` is given), or
            an explicit ``(i, j)``.
        channel: None sums the unit over channels; an int takes that channel only.
        threshold: fraction of a map's peak above which a pixel counts for ``erf.count``.
        mass: fraction of the total saliency that ``erf.mass_side``'s square must hold.
        table: the table from :func:`receptive_fields` for this input shape, if already computed.

    Returns:
        A :class:`ReceptiveMaps`.

    Example::
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        >>> result = receptive_maps(net, torch.rand(2, 1, 16, 16), layers=["0", "2"])
        >>> result.layers, tuple(result.maps.shape), result.boxes[0, 1].tolist()
        (('0', '2'), (2, 2, 16, 16), [6, 6, 11, 11])
    """
    if probes.dim() != 4:
        raise ValueError(f"receptive_maps: probes must be (N, C, H, W), got shape {tuple(probes.shape)}.")
    check_threshold_and_mass(threshold, mass)
    model = unwrap_model(model)
    fields = table if table is not None else receptive_fields(model, tuple(probes.shape[1:]), strict=False)
    if tuple(fields.input_shape) != tuple(probes.shape[1:]):
        raise ValueError(
            f"receptive_maps: fields were traced for {fields.input_shape}, probes are {tuple(probes.shape[1:])}."
        )
    unit, channel = check_unit(unit), check_channel(channel)
    names = resolve_layers(fields, layers)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else probes.device
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else probes.dtype

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        stack.enter_context(evaluating(model))
        count = len(probes)
        units = {name: _fixed_units(fields[name].output_shape, unit, name, count) for name in names}
        pixels = probes.detach().to(device=device, dtype=dtype).clone()
        modules = dict(model.named_modules())
        signed = torch.zeros(count, len(names), *probes.shape[1:])  # (N, L, C, H, W), float32 on the CPU
        into = {name: signed[:, index] for index, name in enumerate(names)}
        reuse = None
        if unit == "max":  # units come from the activations on whole images; the layers not cropped reuse that pass

            def strongest(name: str, output: Tensor) -> Tensor:
                _check_output(output, channel, name)
                units[name] = _strongest(output, channel)
                return _unit_sum(output, list(map(tuple, units[name].tolist())), channel)

            image = pixels.clone().requires_grad_(True)
            reuse = (image, _capture(model, modules, names, image, strongest))
        layer_set = frozenset(names)
        whole: list[str] = []
        for members, layout in _passes(names, fields, units, (probes.shape[2], probes.shape[3]), reuse is not None):
            if layout is None or layer_set in _UNCROPPABLE.get(model, ()):
                whole += members
                continue
            try:
                _pass_gradients(model, modules, members, fields, pixels, units, layout, channel, into)
            except _CropFailed:  # the same maps from whole images; not tried again for this model and layer set
                _UNCROPPABLE.setdefault(model, set()).add(layer_set)
                whole += members
        if whole:
            whole.sort(key=names.index)
            _pass_gradients(model, modules, whole, fields, pixels, units, None, channel, into, reuse)

    with torch.inference_mode(False):  # results are ordinary tensors, even for a caller in inference mode
        units_tensor = torch.stack([units[name].cpu() for name in names], dim=1)
        maps = signed.abs().sum(2)
        boxes = torch.tensor([_per_unit(units[name], fields[name].box) for name in names]).transpose(0, 1)
        centers = torch.tensor([_per_unit(units[name], fields[name].center) for name in names]).transpose(0, 1)
        return ReceptiveMaps(
            tuple(names), maps, signed, units_tensor, boxes, centers, erf_stats(maps, boxes, centers, threshold, mass)
        )


def erf_stats(
    maps: Tensor, boxes: Tensor, centers: Tensor, threshold: float = LUO_THRESHOLD, mass: float = 0.95
) -> ERFStats:
    """ERF statistics of saliency maps (N, L, H, W), with the analytic boxes (N, L, 4) and centres (N, L, 2).

    Example::
        >>> maps = torch.zeros(1, 2, 9, 9)
        >>> maps[0, 0, 3:6, 3:6] = 1.0  # a 3x3 plateau; the second map is dead
        >>> stats = erf_stats(maps, torch.tensor([[[0, 0, 9, 9]] * 2]), torch.tensor([[[4.0, 4.0]] * 2]))
        >>> stats.count.tolist(), stats.mass_side.tolist(), stats.dead.tolist()
        ([[9.0, 0.0]], [[3.0, 0.0]], [[False, True]])
    """
    maps = maps.float()
    h, w = maps.shape[2:]
    peak = maps.flatten(2).amax(2)
    dead = ~(peak > 0)
    count = (maps > threshold * peak[..., None, None]).flatten(2).sum(2).float()
    count = torch.where(dead, torch.zeros_like(count), count)
    size = count.sqrt()

    # A square of side s centred on the unit's RF centre holds the pixels whose Chebyshev distance d
    # from it is at most (s - 1) / 2. Centres sit on whole or half pixels, so s = 2d + 1 is a whole
    # number: bucket the saliency by it and find the first side whose cumulative mass is enough.
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    distance = torch.maximum((ys - centers[..., 0, None, None]).abs(), (xs - centers[..., 1, None, None]).abs())
    side = (2 * distance).round().long().flatten(2)  # side - 1
    buckets = maps.new_zeros(*side.shape[:2], int(side.max()) + 1).scatter_add_(2, side, maps.flatten(2))
    cumulative = buckets.cumsum(2)
    total = cumulative[..., -1:]
    first = (cumulative >= mass * total - 1e-6 * total).float().argmax(2)
    mass_side = (first + 1).float()
    mass_side = torch.where(dead, torch.zeros_like(mass_side), mass_side)

    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=0).float()
    rf_side = area.sqrt()
    safe = rf_side.clamp(min=1)
    zero = torch.zeros_like(size)
    return ERFStats(
        count=count,
        size=size,
        mass_side=mass_side,
        rf_side=rf_side,
        size_fraction=torch.where(rf_side > 0, size / safe, zero),
        mass_fraction=torch.where(rf_side > 0, mass_side / safe, zero),
        dead=dead,
        threshold=threshold,
        mass=mass,
    )
