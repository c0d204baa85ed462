"""How :func:`~rf_callback.receptive_maps` splits its work into passes: crops and mosaics, planned by cost.

A shift-equivariant layer's unit depends only on the pixels in its analytic box, so its gradient can
be computed from a crop of the input around that box (on a multiple of the effective stride, meeting
the image border where the box runs past it), or from a *mosaic*: the boxes of several units tiled
side by side on one input, with a single backward. :func:`_plan` chooses, per call, the passes that
cost the fewest pixels through the network; the plan is exact whatever it chooses.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from rf_callback.table import LayerRF, ReceptiveFieldTable


def _per_unit(units: Tensor, function: Callable[..., tuple]) -> list[tuple]:
    """``function(*unit)`` for each probe's unit, computed once per distinct unit."""
    cache: dict[tuple[int, ...], tuple] = {}
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
    """Where one pass puts the probes' pixels: layer ``name``'s tile, of ``size`` at ``place`` in the
    pass's input, holds ``input[n, :, corner[0]:corner[0] + size[0], ...]`` for each probe's ``corner``.

    Positions have one coordinate per spatial axis: ``(h, w)`` and ``(y, x)`` for images.

    Attributes:
        size: the spatial size of the pass's input.
        tiles: per layer, ``(size, place, [corner per probe])``.
        together: the tiles are the units' boxes and do not overlap, so one backward of the sum
            of all units gives each layer's gradient on its own tile.
    """

    size: tuple[int, ...]
    tiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, ...]]]]
    together: bool = False

    @property
    def area(self) -> int:
        return math.prod(self.size)


def _crop(
    names: Sequence[str], fields: ReceptiveFieldTable, boxes: dict[str, list[tuple]], image: tuple[int, ...]
) -> _Layout | None:
    """One crop per probe from which every named layer's unit can be computed exactly; None: use the input.

    ``boxes`` holds each shift-equivariant layer's (``row.equivariant``: zero padding, no global
    mixing; strides > 0) analytic boxes, padding included, one per probe. A unit's gradient lives
    inside its box: running the network on a crop that holds that box, starts on a multiple of the
    effective stride and meets the input's border wherever the box runs past it gives the unit
    exactly, and backward then costs the crop's area instead of the input's. Any number of axes.
    """
    dims = len(image)
    hulls = [_hull(probe_boxes) for probe_boxes in zip(*(boxes[name] for name in names))]  # per probe
    corners, size = [], []
    for axis, length in enumerate(image):
        stride = math.lcm(*(fields[name].stride[axis] for name in names))
        lows = [min(max(hull[axis], 0), length - 1) // stride * stride for hull in hulls]
        highs = [min(hull[axis + dims], length) for hull in hulls]
        extent = max(max(high - low for low, high in zip(lows, highs)), 1)
        extent = min(extent + (length - extent) % stride, length)  # so that length - extent is a multiple of stride
        corners.append([min(low, length - extent) for low in lows])
        size.append(extent)
    if tuple(size) == tuple(image):
        return None
    crop = tuple(size)
    return _Layout(crop, {name: (crop, (0,) * dims, list(zip(*corners))) for name in names})


def _hull(boxes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The smallest box ``(lows..., highs...)`` holding all of ``boxes``."""
    dims = len(boxes[0]) // 2
    return (
        *(min(b[a] for b in boxes) for a in range(dims)),
        *(max(b[a] for b in boxes) for a in range(dims, 2 * dims)),
    )


def _mosaic(names: Sequence[str], fields: ReceptiveFieldTable, boxes: dict[str, list[tuple]]) -> _Layout:
    """The boxes of units that lie inside the image, side by side on one canvas per probe (images only).

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


def _cost(passes: Sequence[tuple[list[str], _Layout | None]], image: tuple[int, ...], paid: bool) -> int:
    """A plan's cost in pixels of the probes: per pass, its overhead, one forward and its backward
    passes; ``paid``: the forward on whole inputs has run already."""
    total = 0
    for members, layout in passes:
        area = math.prod(image) if layout is None else layout.area
        backward = area if layout is not None and layout.together else area * len(members)
        total += backward + (0 if paid and layout is None else _PASS_OVERHEAD + area)
    return total


def _grouped(
    names: Sequence[str],
    fields: ReceptiveFieldTable,
    boxes: dict[str, list[tuple]],
    image: tuple[int, ...],
    whole: Sequence[str],
    paid: bool,
) -> list[tuple[list[str], _Layout | None]]:
    """Crop passes for ``names``, ``whole`` on whole inputs: each layer runs on its own crop unless
    joining a pass with a larger one costs less. Forward and backward each cost about a pass's
    area, so a pass of its own costs a layer ``overhead + 2a``; joining a pass of area ``A``
    (with it) adds its backward, ``A``. Layers go from the largest crop down, each joining the
    smallest pass opened so far or opening the next. ``paid``: the forward on whole inputs has
    run already, so a layer can join that pass for its backward alone."""
    full = math.prod(image)
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
    image: tuple[int, ...],
    paid: bool = False,
) -> list[tuple[list[str], _Layout | None]]:
    """The layers grouped into passes (one forward each) on crops, mosaics, or (``None``) whole inputs.

    Shift-equivariant layers run on crops around their units' boxes (:func:`_grouped`). On images,
    units whose boxes lie inside the image can instead share a mosaic of their boxes with one
    backward for all (:func:`_mosaic`): the smallest ``k`` of them do, for the ``k`` of least cost.
    Layers without an analytic field run on whole inputs. ``paid``: a forward on whole inputs has
    run already (for ``unit="max"``).
    """
    key = (tuple(names), image, paid, tuple(tuple(map(tuple, units[name].tolist())) for name in names))
    if _LAST_PLAN and _LAST_PLAN[0][0]() is fields and _LAST_PLAN[0][1] == key:
        return _LAST_PLAN[0][2]
    plan = _plan(names, fields, units, image, paid)
    _LAST_PLAN[:] = [(weakref.ref(fields), key, plan)]
    return plan


def _croppable(row: LayerRF) -> bool:
    """Whether a row's units can be computed from crops: shift-equivariant, moving, laid out as an image.

    A flattened or token output's shape follows the input's, so crops would change its layout.
    """
    return (
        row.supported
        and row.equivariant
        and min(row.stride) > 0
        and row.placement is not None
        and row.placement.is_image
    )


def _plan(
    names: Sequence[str], fields: ReceptiveFieldTable, units: dict[str, Tensor], image: tuple[int, ...], paid: bool
) -> list[tuple[list[str], _Layout | None]]:
    boxes = {
        name: _per_unit(units[name], lambda *unit, row=fields[name]: row.box(*unit, clip=False))
        for name in names
        if _croppable(fields[name])
    }
    whole = [name for name in names if name not in boxes]
    best = _grouped(list(boxes), fields, boxes, image, whole, paid)
    inside = []  # units whose fields meet no padding (images only: the mosaic packs rectangles)
    if len(image) == 2:
        height, width = image
        inside = [
            name
            for name in boxes
            if all(b[0] >= 0 and b[1] >= 0 and b[2] <= height and b[3] <= width for b in boxes[name])
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
