"""Pictures of receptive fields: one image per layer with every probe's saliency and analytic box, charts.

Images are uint8 tensors ``(3, H, W)`` (what TensorBoard's ``add_image`` takes); figures are
matplotlib figures. matplotlib is imported inside the functions that need it.

A layer's picture (:func:`layer_grid`) is drawn for a screen, not for the input: each probe becomes a
tile of at most ``tile`` pixels a side (small inputs are enlarged by an integer factor with nearest
neighbours, large ones reduced by an integer factor with area averaging), shown in dimmed grey with the
saliency on top in a colour map whose opacity grows with the saliency, so the heat reads on a bright
input as on a dark one. All probes go through one resize, one colour lookup and one blend.

Why one module of ~800 lines: the 1-D strips, 2-D grids and 3-D slices share the tile sizing, the
colour map, the captions and the legend, and :func:`layer_image` dispatches on the dimension; split by
dimension, each file would import most of the others.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from rf_callback.report import WHOLE  # the caption of a probe whose unit sees all of its input (no box drawn)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image
    from PIL.ImageFont import FreeTypeFont, ImageFont

__all__ = [
    "VERDICT_COLORS",
    "colorize",
    "coverage_figure",
    "figure_image",
    "layer_grid",
    "layer_image",
    "mean_image",
    "pil_image",
    "plot_maps",
    "save_png",
    "summary_figure",
]

BOX_COLOR = (0, 255, 255)  # cyan: the analytic receptive field, and ticks at the centre of the unit's field
BACKGROUND = 40  # grey of the text strips
GAP = 110  # grey between the probes
TEXT_COLOR = (235, 235, 235)
NOTE_COLOR = (150, 220, 220)  # "whole image", in a paler cyan than the box it replaces
GREY_RANGE = (24.0, 150.0)  # the probe's darkest and brightest pixel: dim enough for the heat to show on white
FONT_SIZE = 11
LINE_HEIGHT = FONT_SIZE + 4
PADDING = 2
CARD = (215, 320)
"""``(height, width)``, in screen pixels, of the room TensorBoard gives an image at its default settings
(measured in headless Chromium, TensorBoard 2.21): the Time Series tab fits each image into a box 215 px
high and, in a 1280 x 800 window, 324 to 326 px wide (the runs pane takes the rest; 358 at 1366 x 768,
370 at 1920 x 1080), shrinking or enlarging it to touch the nearer edge; the Images tab scales every
image to 350 px wide. A picture laid out with ``fit=CARD`` is shown at 1 to 1.1 times its size in both
tabs, so its text keeps the size it was drawn at."""
NOTEBOOK_WIDTH = 960
"""The width in pixels :func:`plot_maps` fills by default, at 100 dpi a notebook's figure."""


@lru_cache(maxsize=4)
def _palette(name: str) -> Tensor:
    import matplotlib

    return (torch.from_numpy(matplotlib.colormaps[name](range(256))[:, :3].copy()) * 255).round().to(torch.uint8)


def _unit_range(values: Tensor) -> Tensor:
    """Scaled to [0, 1] by its own range; NaN and infinities become 0, a constant becomes 0."""
    values = torch.nan_to_num(values.float(), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def _each_unit_range(values: Tensor) -> Tensor:
    """Each of the finite ``values`` ``(N, H, W)`` scaled to [0, 1] by its own range; a constant becomes 0."""
    low, high = values.amin((1, 2), keepdim=True), values.amax((1, 2), keepdim=True)
    span = high - low
    return torch.where(span > 0, (values - low) / span.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def colorize(values: Tensor, cmap: str = "inferno") -> Tensor:
    """A 2-D map as a uint8 RGB image ``(3, H, W)``, scaled by its own range.

    Example::
        >>> colorize(torch.tensor([[0.0, 1.0]])).shape
        torch.Size([3, 1, 2])
    """
    index = (_unit_range(values) * 255).round().long()
    return _palette(cmap)[index].permute(2, 0, 1).contiguous()


def _screen(shape: Sequence[int], tile: int) -> tuple[int, ...]:
    """``shape`` scaled by one integer factor (up or down), its longest side closest to ``tile`` without passing it."""
    side = max(shape)
    if side <= tile:
        factor = tile // side
        return tuple(n * factor for n in shape)
    factor = math.ceil(side / tile)
    return tuple(math.ceil(n / factor) for n in shape)


def tile_size(height: int, width: int, tile: int = 128) -> tuple[int, int]:
    """The ``(h, w)`` at which :func:`layer_grid` draws a ``height x width`` probe.

    The probe is enlarged or reduced by an integer factor, whichever brings its longer side closest to
    ``tile`` without passing it: pixels of small inputs stay sharp squares, and large inputs are averaged
    over whole blocks of pixels.

    Example::
        >>> tile_size(28, 28), tile_size(224, 224), tile_size(299, 299), tile_size(32, 64)
        ((112, 112), (112, 112), (100, 100), (64, 128))
    """
    h, w = _screen((height, width), tile)
    return h, w


NOT_ANALYTIC = "no analytic RF"
"""The caption of a probe at a layer without an analytic receptive field (no box drawn)."""

NON_FINITE = "non-finite map"
"""The caption of a probe whose map holds NaN or inf (drawn without heat or box)."""
NON_FINITE_MEAN = "no finite map"
"""The caption of a mean map when no probe's map is finite."""

Notes = list[str | None]
"""Per probe: ``None`` to draw the box and ticks, or the note written instead (``"whole image"``...)."""


def layer_image(
    images: Tensor | None,
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    *,
    labels: Sequence[str] | None = None,
    tile: int = 128,
    nrow: int | None = None,
    analytic: bool = True,
    cmap: str = "inferno",
    finite: Sequence[bool] | Tensor | None = None,
    fit: tuple[int, int] | None = None,
) -> Tensor:
    """One layer's picture for inputs with 1, 2 or 3 spatial axes: what the monitor logs, uint8 ``(3, H, W)``.

    Images are drawn by :func:`layer_grid`. A 1-D signal becomes a strip: the probe (its channels
    averaged) as a grey line, the saliency on top as a filled curve whose height runs from 0 to the
    map's peak, the receptive field shaded in cyan with a tick at the unit's centre. A volume becomes the
    three slices through the unit's centre as orthogonal views: axial (``H x W`` at the centre's
    depth), coronal (``D x W``) below it, sagittal (``H x D``, turned so that rows match) to its right,
    each with the box's section and ticks, the heat scaled to the volume's peak; the caption gives
    the slices' indices.

    Args:
        images: the probes ``(N, C, *spatial)``, or ``None`` to draw the maps alone (a mean map).
        maps: the saliency ``(N, *spatial)``, nonnegative.
        boxes: ``(N, 2d)`` boxes, half-open ``(lows..., highs...)``, in input pixels.
        centers: ``(N, d)`` centres of the units' fields, in input pixels.
        labels: a caption under each probe, or ``None``.
        tile: the longest side of a probe on screen, at most (a volume's longest axis; signals get three times it).
        nrow: probes per row (default: at most 4 images, 2 signals or 2 volumes).
        analytic: whether ``boxes`` are analytic receptive fields; ``False`` (a layer the tracer cannot
            follow, whose box is the whole input): no box, and the captions say so.
        cmap: a matplotlib colour map name.
        finite: per probe, whether its map is finite; a map holding NaN or inf is drawn without heat or box,
            its caption saying "non-finite map" (default: read from ``maps``).
        fit: ``(height, width)`` of the screen room the picture is for, e.g. :data:`CARD`: probes per row
            (unless ``nrow`` is given) and their size (at most ``tile``) are chosen so that the picture fits
            it at its own size (else so that the probes are largest once it is shrunk to fit), and a
            narrower picture is widened to ``width``, so that all pictures laid out for one room are shown
            at one scale. ``None``: ``tile`` and ``nrow`` as given.

    Raises:
        ValueError: if the shapes disagree, or the maps have not 1, 2 or 3 spatial axes.

    Example::
        >>> signals = layer_image(torch.rand(4, 1, 100), torch.rand(4, 100), torch.tensor([[40, 60]]).expand(4, 2),
        ...                       torch.full((4, 1), 49.5))
        >>> volumes = layer_image(torch.rand(2, 1, 8, 32, 32), torch.rand(2, 8, 32, 32),
        ...                       torch.tensor([[2, 8, 8, 6, 24, 24]]).expand(2, 6), torch.full((2, 3), 4.0))
        >>> signals.dtype, tuple(signals.shape), tuple(volumes.shape)
        (torch.uint8, (3, 153, 606), (3, 215, 330))
    """
    _, spatial = _check(images, maps, boxes, centers, labels, None, tile, "layer_image")
    _check_fit(fit, "layer_image")
    kept = _finite(maps, finite)
    notes = _notes(boxes, spatial, analytic, None, kept)
    return _draw(images, _blank_non_finite(maps, kept), boxes, centers, labels, tile, nrow, notes, cmap, fit)


def mean_image(
    mean: Tensor,
    box: Tensor | None,
    center: Tensor,
    *,
    probes: int,
    analytic: bool = True,
    tile: int = 128,
    cmap: str = "inferno",
    fit: tuple[int, int] | None = None,
) -> Tensor:
    """The probes' mean map of one layer (Luo et al.'s averaged ERF) drawn alone, as uint8 ``(3, H, W)``.

    Drawn as :func:`layer_image` draws one probe, on a dark ground instead of a probe.

    Args:
        mean: the mean map ``(*spatial)``, nonnegative; coloured from 0 to its peak.
        box: the units' box ``(2d,)`` when every probe's unit has the same, else ``None``: no box, and the
            caption says the units differ.
        center: the centre ``(d,)`` the ticks mark and a volume's slices go through.
        probes: how many maps were averaged (for the caption).
        analytic, tile, cmap, fit: as for :func:`layer_image`; with the ``fit`` of the layer's picture, the
            mean map is as large as fits and the two pictures are shown at one scale.

    Example::
        >>> mean, box, center = torch.rand(28, 28), torch.tensor([8, 8, 20, 20]), torch.tensor([13.5, 13.5])
        >>> mean_image(mean, box, center, probes=10).shape
        torch.Size([3, 165, 116])
        >>> mean_image(mean, box, center, probes=10, fit=CARD).shape  # as wide as the card, 112 px of map
        torch.Size([3, 165, 320])
    """
    spatial = tuple(mean.shape)
    whole = torch.tensor([*(0,) * len(spatial), *spatial])
    boxes = (whole if box is None else torch.as_tensor(box)).reshape(1, -1)
    labels = [f"mean of {probes} probe{'s' if probes != 1 else ''}"]
    _check(None, mean[None], boxes, center.reshape(1, -1), labels, None, tile, "mean_image")
    _check_fit(fit, "mean_image")
    if not bool(torch.isfinite(mean).all()):
        notes: Notes = [NON_FINITE_MEAN]
        mean = torch.zeros_like(mean)  # drawn without heat
    elif box is None and analytic:
        notes = ["units differ"]
    else:
        notes = _notes(boxes, spatial, analytic, None)
    return _draw(None, mean[None], boxes, center.reshape(1, -1), labels, tile, 1, notes, cmap, fit)


def _notes(
    boxes: Tensor,
    spatial: Sequence[int],
    analytic: bool,
    whole_image: Sequence[bool] | Tensor | None,
    finite: Sequence[bool] | None = None,
) -> Notes:
    """Per probe, ``None`` (draw the box) or why not: a map holding NaN or inf, no analytic field, or a field
    that covers the whole input."""
    dims = len(spatial)
    if not analytic:
        notes: Notes = [NOT_ANALYTIC] * len(boxes)
    else:
        if whole_image is None:
            boxes = boxes.detach().cpu().long()
            whole = ((boxes[:, :dims] <= 0) & (boxes[:, dims:] >= torch.tensor(spatial))).all(1)
        else:
            whole = torch.as_tensor(whole_image, dtype=torch.bool).reshape(len(boxes)).cpu()
        notes = [WHOLE[dims] if flag else None for flag in whole.tolist()]
    return notes if finite is None else [note if ok else NON_FINITE for note, ok in zip(notes, finite)]


def _blank_non_finite(maps: Tensor, finite: Sequence[bool]) -> Tensor:
    """``maps`` with the maps that are not ``finite`` set to zero: they are drawn without heat."""
    if all(finite):
        return maps
    keep = torch.tensor(finite, device=maps.device).view(-1, *(1,) * (maps.dim() - 1))
    return torch.where(keep, maps, 0.0)


def _finite(maps: Tensor, finite: Sequence[bool] | Tensor | None) -> list[bool]:
    """Per probe, whether its map is finite: as given, else read from ``maps`` ``(N, *spatial)``."""
    if finite is None:
        return torch.isfinite(maps.detach()).flatten(1).all(1).tolist()
    return torch.as_tensor(finite, dtype=torch.bool).reshape(len(maps)).tolist()


def layer_grid(
    images: Tensor,
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    *,
    labels: Sequence[str] | None = None,
    tile: int = 128,
    nrow: int | None = None,
    whole_image: Sequence[bool] | Tensor | None = None,
    analytic: bool = True,
    cmap: str = "inferno",
    fit: tuple[int, int] | None = None,
) -> Tensor:
    """One layer's picture: every probe with its saliency, the unit's analytic box and centre, and a colour scale.

    Each probe is drawn in dimmed grey (its own darkest to brightest pixel, so the heat shows on white as
    on black) with the saliency on top in ``cmap``, from 0 to the map's own peak, its opacity growing
    with the saliency. The analytic receptive field is a cyan box drawn just outside the field, with
    ticks on its sides at the centre of the unit's field; neither covers the heat. Where the field
    covers the whole image (a global unit, or a field larger than the image) box and ticks would say
    nothing: they are left out and the probe's caption says "whole image". Below the probes, one strip
    holds the colour scale and the legend. :func:`layer_image` draws inputs of any dimension.

    Args:
        images: the probes ``(N, C, H, W)`` as the model sees them (any range; channels are averaged),
            or ``None`` to draw the maps alone.
        maps: the saliency ``(N, H, W)``, nonnegative.
        boxes: ``(N, 4)`` analytic boxes ``(top, left, bottom, right)``, half-open, in input pixels.
        centers: ``(N, 2)`` centres ``(y, x)`` of the units' fields, in input pixels.
        labels: a caption under each probe (class names; other values are shown with ``str``), or ``None``.
        tile: the longest side of a probe on screen, at most; see :func:`tile_size`.
        nrow: probes per row (default: at most 4, in rows of equal length where possible, so that a
            grid stays legible at TensorBoard's default card width).
        whole_image: per probe, whether its unit sees the whole image. Default: where its box is the whole
            image.
        analytic: ``False`` for a layer without an analytic receptive field: no box, "no analytic RF".
        cmap: a matplotlib colour map name.
        fit: the screen room ``(height, width)`` to lay the picture out for, as for :func:`layer_image`.

    Returns:
        uint8 ``(3, H', W')``, for ``SummaryWriter.add_image(..., dataformats="CHW")``.

    Raises:
        ValueError: if the shapes disagree, or ``labels``/``whole_image`` do not have one entry per probe.

    Example::
        >>> grid = layer_grid(torch.rand(10, 3, 224, 224), torch.rand(10, 224, 224),
        ...                   torch.tensor([[90, 90, 134, 134]]).expand(10, 4), torch.full((10, 2), 112.0),
        ...                   labels=["cat", "dog"] * 5)
        >>> grid.dtype, grid.shape  # 3 rows of 4 tiles of 112 px with captions, the legend below
        (torch.uint8, torch.Size([3, 408, 458]))
    """
    _, spatial = _check(images, maps, boxes, centers, labels, whole_image, tile, "layer_grid", dims=2)
    _check_fit(fit, "layer_grid")
    kept = _finite(maps, None)
    notes = _notes(boxes, spatial, analytic, whole_image, kept)
    return _draw(images, _blank_non_finite(maps, kept), boxes, centers, labels, tile, nrow, notes, cmap, fit)


Caption = tuple[tuple[str, bool], ...]
"""The lines under one probe: ``(text, is_note)``; notes are drawn in the note colour."""


def _draw(
    images: Tensor | None,
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    labels: Sequence[str] | None,
    tile: int,
    nrow: int | None,
    notes: Notes,
    cmap: str,
    fit: tuple[int, int] | None,
) -> Tensor:
    """The panels of 1, 2 or 3 spatial axes, laid out (for ``fit`` when given) with their captions and the legend."""
    spatial = tuple(maps.shape[1:])
    if len(spatial) == 3:  # the caption gives the slices' indices
        slices = [f"z {z}, y {y}, x {x}" for z, y, x in zip(*(i.tolist() for i in _slice_index(centers, spatial)))]
        labels = [f"{labels[n]}\n{slices[n]}" if labels is not None else slices[n] for n in range(len(maps))]
    captions = [
        (
            *((text, False) for text in ("" if labels is None else str(labels[n])).split("\n") if text),
            *(((notes[n], True),) if notes[n] else ()),
        )
        for n in range(len(maps))
    ]
    drawn = any(note is None for note in notes)
    tile, nrow = _arrange(len(maps), spatial, tile, nrow, captions, drawn, fit)
    panels = _PANELS[len(spatial)](images, maps, boxes, centers, tile, notes, cmap)
    return _assemble(panels, captions, nrow, cmap, len(spatial), drawn, None if fit is None else fit[1])


def _panel_shape(spatial: Sequence[int], tile: int) -> tuple[int, int]:
    """``(h, w)`` on screen of one probe's panel: an image's tile, a signal's strip, a volume's three views."""
    if len(spatial) == 1:
        return max(32, tile // 2), _screen(spatial, 3 * tile)[0]
    if len(spatial) == 2:
        return tile_size(*spatial, tile)
    depth, height, width = _screen(spatial, tile)
    return height + PADDING + depth, width + PADDING + depth


def _column_width(panel: int, captions: Sequence[Caption]) -> int:
    """A column's width: the panel's, widened (up to twice) so that the captions are whole."""
    return min(max(panel, _widest_caption(tuple(captions))), 2 * panel)


@functools.lru_cache(maxsize=64)
def _widest_caption(captions: tuple[Caption, ...]) -> int:
    """The width of the widest caption line with its margins: measured once for every panel size tried."""
    font = _font(FONT_SIZE)
    return max((math.ceil(font.getlength(text)) + 2 * PADDING for lines in captions for text, _ in lines), default=0)


def _default_row(count: int, dims: int) -> int:
    """Panels per row by default: at most 4 images, in rows of equal length where possible; 2 signals or volumes."""
    return math.ceil(count / math.ceil(count / 4)) if dims == 2 else min(count, 2)


def _arrange(
    count: int,
    spatial: Sequence[int],
    tile: int,
    nrow: int | None,
    captions: Sequence[Caption],
    drawn: bool,
    fit: tuple[int, int] | None,
) -> tuple[int, int]:
    """``(tile, nrow)`` for ``count`` panels: as given, or the largest panels whose picture fits ``fit``.

    The default row: at most 4 images (in rows of equal length where possible), 2 signals or 2 volumes.
    With ``fit = (height, width)``, every panel size up to ``tile`` and every row length (the shortest
    for each number of rows) is tried: the largest panels with which the picture fits win; when none
    fits, those that are largest once the picture is shrunk to fit.
    """
    if fit is None:
        return tile, nrow if nrow is not None else _default_row(count, len(spatial))
    room_height, room_width = fit
    lines = max(map(len, captions), default=0)
    best: tuple[tuple[bool, float], int, int] | None = None
    shapes = set()
    for size in range(tile, 7, -1):
        shape = _panel_shape(spatial, size)
        if shape in shapes:
            continue
        shapes.add(shape)
        column = _column_width(shape[1], captions) if lines else shape[1]
        for columns in [nrow] if nrow is not None else range(1, count + 1):
            rows = math.ceil(count / columns)
            if nrow is None and columns > 1 and math.ceil(count / (columns - 1)) == rows:
                continue  # as many rows with fewer columns: rows of more even length
            width = max(columns * (column + PADDING) + PADDING, room_width)
            height = (
                rows * (shape[0] + lines * LINE_HEIGHT + PADDING) + PADDING + _legend_height(width, drawn, len(spatial))
            )
            scale = min(1.0, room_width / width, room_height / height)
            score = (scale == 1.0, max(shape) * scale)
            if best is None or score > best[0]:
                best = (score, size, columns)
    assert best is not None
    return best[1], best[2]


def _check_fit(fit: object, name: str) -> None:
    if fit is not None and not (
        isinstance(fit, tuple) and len(fit) == 2 and all(isinstance(n, int) and n >= 16 for n in fit)
    ):
        raise ValueError(f"{name}(fit={fit!r}): None or (height, width) in screen pixels, each an int >= 16.")


def _image_panels(
    images: Tensor | None, maps: Tensor, boxes: Tensor, centers: Tensor, tile: int, notes: Notes, cmap: str
) -> Tensor:
    """Images as tiles: each probe in dimmed grey, the heat on top, the box and ticks."""
    height, width = maps.shape[1:]
    size = tile_size(height, width, tile)
    grey = _grey(images, maps.shape).mean(1)
    panels = _panels(grey, maps.detach().cpu().float(), size, cmap, scaled=False)
    _draw_boxes(panels, boxes, centers, notes, (height, width), max(size))
    return panels


def _grey(images: Tensor | None, shape: Sequence[int]) -> Tensor:
    """The probes as float32 on the CPU ``(N, C, *spatial)``; zeros (one dark grey) when there are none."""
    if images is None:
        return torch.zeros(shape[0], 1, *shape[1:])
    return images.detach().cpu().float()


def _panels(grey: Tensor, heat: Tensor, size: Sequence[int], cmap: str, scaled: bool) -> Tensor:
    """Probes ``grey`` ``(N, H, W)`` with ``heat`` on top, at ``size`` on screen, uint8 ``(N, 3, h, w)``.

    ``scaled``: both are in [0, 1] already (scaled by a whole volume's range); otherwise each is scaled
    by its own range after the resize. One resize, one colour lookup and one blend for all probes, at
    the smaller of input and screen size: large probes are reduced first, small ones blended first and
    then enlarged by repeating pixels.
    """
    height = grey.shape[1]
    h, w = size
    planes = torch.nan_to_num_(torch.stack((grey, heat), 1), nan=0.0, posinf=0.0, neginf=0.0)
    if h < height:
        planes = F.interpolate(planes, size=(h, w), mode="area")
    if scaled:
        grey, heat = planes[:, 0].clamp(0, 1), planes[:, 1].clamp(0, 1)
    else:
        grey, heat = _each_unit_range(planes[:, 0]), _each_unit_range(planes[:, 1].clamp_min(0))
    low, high = GREY_RANGE
    base = (low + (high - low) * grey)[:, None]
    colour = _palette(cmap).float()[(heat * 255).round_().long()].permute(0, 3, 1, 2)
    alpha = heat.sqrt_()[:, None]  # faint saliency shows too, yet lets the probe through
    panels = torch.lerp(base, colour, alpha).round_().to(torch.uint8)
    if h > height:
        factor = h // height
        panels = panels.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    return panels


def _draw_boxes(
    panels: Tensor, boxes: Tensor, centers: Tensor, notes: Notes, shape: tuple[int, int], side: int
) -> None:
    """Paint each probe's box just outside its field (inside at the image's edge) and ticks outward from it
    at the unit's centre: neither hides the heat. A few slices per probe; probes with a note get none.
    ``side``: the longest side of a whole probe on screen, which sets the thickness of lines and ticks."""
    h, w = panels.shape[2:]
    height, width = shape
    fy, fx = h / height, w / width
    line, tick = max(1, round(side / 64)), max(3, round(side / 24))
    paint = torch.tensor(BOX_COLOR, dtype=torch.uint8).view(3, 1, 1)
    boxes, centers = boxes.detach().cpu().long(), centers.detach().cpu()
    for n, note in enumerate(notes):
        if note is not None:
            continue
        top, left, bottom, right = boxes[n].tolist()
        y, x = centers[n].tolist()
        screen = (math.floor(top * fy), math.floor(left * fx), math.ceil(bottom * fy), math.ceil(right * fx))
        center = (math.floor((y + 0.5) * fy), math.floor((x + 0.5) * fx))
        for y0, y1, x0, x1 in _marks(screen, center, (h, w), line, tick):
            panels[n, :, y0:y1, x0:x1] = paint


def _assemble(
    panels: Tensor, captions: Sequence[Caption], nrow: int, cmap: str, kind: int, drawn: bool, width: int | None
) -> Tensor:
    """Panels ``(N, 3, h, w)`` with their captions in rows of ``nrow``, widened to ``width``, the legend below."""
    count, panel = len(panels), panels.shape[3]
    lines = max(map(len, captions))
    if lines:
        column = _column_width(panel, captions)
        if column > panel:  # room for whole captions: the panel sits in the middle of its column
            left = (column - panel) // 2
            panels = F.pad(panels, (left, column - panel - left), value=GAP)
        panels = torch.cat([panels, torch.stack([_caption(c, column, lines) for c in captions])], 2)
    grid = make_grid(panels, nrow=nrow, padding=PADDING, pad_value=GAP)
    if count == 1:  # make_grid returns a single image as it is
        grid = F.pad(grid, (PADDING,) * 4, value=GAP)
    if width is not None and grid.shape[2] < width:
        left = (width - grid.shape[2]) // 2
        grid = F.pad(grid, (left, width - grid.shape[2] - left), value=GAP)
    return torch.cat([grid, _legend(grid.shape[2], cmap, drawn, kind)], 1)


SIGNAL_COLOR = 200.0
"""Grey of a 1-D probe's line."""
SHADE = 0.25
"""Opacity of the cyan shading of a 1-D receptive field."""
FILL = 0.55
"""Opacity of the filled saliency curve of a 1-D map (the probe's line shows through)."""
CURVE = 200
"""The colour map's entry (of 256) that draws a 1-D map's curve: its height, not its colour, tells the value."""


def _envelope(values: Tensor, width: int, joined: bool = True) -> tuple[Tensor, Tensor]:
    """Per screen column, the lowest and highest of ``values`` ``(N, L)`` it must show, ``(N, width)`` each.

    Columns cover whole blocks of samples (or a sample covers whole blocks of columns); with ``joined``
    each column also reaches the last sample of the column before it, so that a line is unbroken.
    """
    count, length = values.shape
    if width >= length:
        low = high = last = values[:, torch.arange(width) // (width // length)]
    else:
        factor = math.ceil(length / width)
        padded = F.pad(values[:, None], (0, width * factor - length), mode="replicate")[:, 0].view(count, width, factor)
        low, high, last = padded.amin(2), padded.amax(2), padded[..., -1]
    if not joined:
        return low, high
    before = torch.cat([last[:, :1], last[:, :-1]], 1)
    return torch.minimum(low, before), torch.maximum(high, before)


def _line(low: Tensor, high: Tensor, height: int, margin: int) -> Tensor:
    """The pixels ``(N, height, width)`` of a line through values in [0, 1] spanning ``[low, high]`` per column."""
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    span = height - 1 - 2 * margin
    top, bottom = margin + (1 - high[:, None]) * span, margin + (1 - low[:, None]) * span
    return (rows >= top - 0.75) & (rows <= bottom + 0.75)


def _signal_panels(
    images: Tensor | None, maps: Tensor, boxes: Tensor, centers: Tensor, tile: int, notes: Notes, cmap: str
) -> Tensor:
    """1-D probes as strips: the signal's line, the saliency curve on top (filled), the field shaded."""
    count, length = maps.shape
    (height, width), margin = _panel_shape((length,), tile), 3
    line, tick = max(1, round(height / 32)), max(3, round(height / 8))
    panels = torch.full((count, 3, height, width), float(BACKGROUND) / 2)

    # The receptive field: cyan shading with its bounds, and a tick at the unit's centre (drawn last).
    columns = torch.arange(width)
    boxes, centers = boxes.detach().cpu().long(), centers.detach().cpu().float()
    drawn = torch.tensor([note is None for note in notes])
    scale = width / length
    low, high = (boxes[:, 0] * scale).floor().long(), (boxes[:, 1] * scale).ceil().long()
    inside = drawn[:, None] & (columns >= low[:, None]) & (columns < high[:, None])
    edge = inside & ((columns < low[:, None] + line) | (columns >= high[:, None] - line))
    cyan = torch.tensor(BOX_COLOR, dtype=torch.float32).view(1, 3, 1, 1)
    panels = torch.where(inside[:, None, None], torch.lerp(panels, cyan, SHADE), panels)
    panels = torch.where(edge[:, None, None], cyan, panels)

    if images is not None:  # the probe, channels averaged, scaled by its own range (a constant in the middle)
        signal = torch.nan_to_num(images.detach().cpu().float().mean(1), nan=0.0, posinf=0.0, neginf=0.0)
        least, most = signal.amin(1, keepdim=True), signal.amax(1, keepdim=True)
        signal = torch.where(most > least, (signal - least) / (most - least).clamp_min(1e-30), 0.5)
        trace = _line(*_envelope(signal, width), height, margin)
        panels = torch.where(trace[:, None], SIGNAL_COLOR, panels)

    heat = torch.nan_to_num(maps.detach().cpu().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    peak = heat.amax(1, keepdim=True)
    heat = torch.where(peak > 0, heat / peak.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    colour = _palette(cmap)[CURVE].float().view(1, 3, 1, 1)
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    level = _envelope(heat, width, joined=False)[1]  # each column's own highest value
    surface = margin + (1 - level[:, None]) * (height - 1 - 2 * margin)
    filled = (rows >= surface) & (rows <= height - 1 - margin) & (level[:, None] > 0)
    panels = torch.where(filled[:, None], torch.lerp(panels, colour, FILL), panels)
    bottom, top = _envelope(heat, width)
    curve = _line(bottom, top, height, margin) & (top[:, None] > 0)
    panels = torch.where(curve[:, None], colour, panels)

    position = ((centers[:, 0] + 0.5) * scale).floor().long().clamp(0, width - line)
    ticks = drawn[:, None] & (columns >= position[:, None]) & (columns < position[:, None] + line)
    cap = torch.arange(height).view(1, height, 1) < tick
    panels = torch.where((ticks[:, None] & cap)[:, None], cyan, panels)
    return panels.round_().to(torch.uint8)


def _slice_index(centers: Tensor, spatial: Sequence[int]) -> list[Tensor]:
    """Per axis of a volume, the index ``(N,)`` of the slice through each unit's centre."""
    centers = centers.detach().cpu().float()
    return [(centers[:, a] + 0.5).floor().long().clamp(0, n - 1) for a, n in enumerate(spatial)]


def _volume_panels(
    images: Tensor | None, maps: Tensor, boxes: Tensor, centers: Tensor, tile: int, notes: Notes, cmap: str
) -> Tensor:
    """Volumes as the three slices through each unit's centre (orthogonal views), with the box's section on each."""
    count, depth, height, width = maps.shape
    screen = _screen((depth, height, width), tile)
    grey = torch.nan_to_num(_grey(images, maps.shape).mean(1), nan=0.0, posinf=0.0, neginf=0.0)
    grey = _each_unit_range(grey.flatten(1)[:, None]).view(maps.shape)  # by each volume's range
    heat = torch.nan_to_num(maps.detach().cpu().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    peak = heat.flatten(1).amax(1).view(count, 1, 1, 1)
    heat = torch.where(peak > 0, heat / peak.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    boxes, centers = boxes.detach().cpu().long(), centers.detach().cpu().float()
    index = _slice_index(centers, (depth, height, width))
    probes = torch.arange(count)

    def cut(volume: Tensor, axis: int) -> Tensor:  # each probe's slice across ``axis`` at its centre, (N, a, b)
        where: list[Any] = [slice(None)] * 3
        where[axis] = index[axis]
        return volume[(probes, *where)]

    # Orthogonal views, axes shared where they meet: the axial slice (y down, x across), the coronal one
    # below it (z down, x across), the sagittal one to its right, turned (y down, z across).
    views = {}
    for axis, kept in ((0, (1, 2)), (1, (0, 2)), (2, (1, 0))):
        planes = [cut(volume, axis) for volume in (grey, heat)]
        if axis == 2:
            planes = [plane.transpose(1, 2) for plane in planes]
        size, shape = tuple(screen[a] for a in kept), tuple(maps.shape[1 + a] for a in kept)
        panel = _panels(*planes, size, cmap, scaled=True)
        section = boxes[:, [kept[0], kept[1], kept[0] + 3, kept[1] + 3]]
        _draw_boxes(panel, section, centers[:, list(kept)], notes, shape, max(screen))
        views[axis] = panel
    corner = views[0].new_full((count, 3, screen[0], screen[0]), GAP)
    gap_right = views[0].new_full((count, 3, screen[1], PADDING), GAP)
    gap_below = views[0].new_full((count, 3, PADDING, screen[2] + PADDING + screen[0]), GAP)
    top = torch.cat([views[0], gap_right, views[2]], 3)
    bottom = torch.cat([views[1], gap_right.new_full((count, 3, screen[0], PADDING), GAP), corner], 3)
    return torch.cat([top, gap_below, bottom], 2)


_PANELS = {1: _signal_panels, 2: _image_panels, 3: _volume_panels}


def _marks(
    box: tuple[int, int, int, int], center: tuple[int, int], size: tuple[int, int], line: int, tick: int
) -> list[tuple[int, int, int, int]]:
    """Rectangles ``(y0, y1, x0, x1)`` that draw a box around ``box`` and ticks at ``center`` on a ``size`` tile.

    The lines lie just outside the box, moved inside where the box meets the tile's edge; each tick runs
    outward from its side, inward where there is no room.

    Example::
        >>> _marks((4, 4, 8, 8), (6, 6), (16, 16), 1, 3)[:2]  # the top line, then the bottom one
        [(3, 4, 3, 9), (8, 9, 3, 9)]
    """
    h, w = size
    top, left = min(max(box[0] - line, 0), h - 2 * line), min(max(box[1] - line, 0), w - 2 * line)
    bottom, right = min(max(box[2] + line, top + 2 * line), h), min(max(box[3] + line, left + 2 * line), w)
    y, x = min(max(center[0] - line // 2, 0), h - line), min(max(center[1] - line // 2, 0), w - line)
    above = top - tick if top >= tick else top + line
    below = bottom if bottom + tick <= h else max(bottom - line - tick, 0)
    before = left - tick if left >= tick else left + line
    after = right if right + tick <= w else max(right - line - tick, 0)
    return [
        (top, top + line, left, right),
        (bottom - line, bottom, left, right),
        (top, bottom, left, left + line),
        (top, bottom, right - line, right),
        (above, above + tick, x, x + line),
        (below, below + tick, x, x + line),
        (y, y + line, before, before + tick),
        (y, y + line, after, after + tick),
    ]


_LAYOUTS = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _check(
    images: Tensor | None,
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    labels: Sequence[str] | None,
    whole_image: Sequence[bool] | Tensor | None,
    tile: int,
    name: str,
    dims: int | None = None,
) -> tuple[int, tuple[int, ...]]:
    """``N`` and the spatial shape of a drawing call, or a ValueError naming the argument that disagrees.

    ``dims``: the number of spatial axes the caller draws (default: the maps', 1 to 3).
    """
    if images is not None:
        wanted = dims if dims is not None else images.dim() - 2
        if wanted not in _LAYOUTS or images.dim() != wanted + 2 or len(images) == 0:
            layout = _LAYOUTS.get(wanted, "(N, C, L), (N, C, H, W) or (N, C, D, H, W)")
            raise ValueError(f"{name}: images must be {layout} with N >= 1, got {tuple(images.shape)}.")
        count, spatial = len(images), tuple(images.shape[2:])
    else:
        wanted = dims if dims is not None else maps.dim() - 1
        if wanted not in _LAYOUTS or maps.dim() != wanted + 1 or len(maps) == 0:
            raise ValueError(f"{name}: maps must be (N, *spatial) with 1 to 3 spatial axes, got {tuple(maps.shape)}.")
        count, spatial = len(maps), tuple(maps.shape[1:])
    d = len(spatial)
    expected = {"maps": (count, *spatial), "boxes": (count, 2 * d), "centers": (count, d)}
    for key, tensor in (("maps", maps), ("boxes", boxes), ("centers", centers)):
        if tuple(tensor.shape) != expected[key]:
            found = "" if images is None else f" for images {tuple(images.shape)}"
            raise ValueError(
                f"{name}: {key} must be {expected[key]}{found}, got"
                f" {tuple(tensor.shape)}. HINT: pass one layer, e.g. maps.maps[:, k], maps.boxes[:, k]."
            )
    for key, values in (("labels", labels), ("whole_image", whole_image)):
        if values is not None and len(values) != count:
            raise ValueError(f"{name}: {key} needs one entry per probe ({count}), got {len(values)}.")
    if isinstance(labels, str):
        raise TypeError(f"{name}: labels must be a sequence of strings, one per probe, not one string.")
    if not isinstance(tile, int) or tile < 8:
        raise ValueError(f"{name}(tile={tile!r}): an int >= 8 (pixels on the longest side of a probe).")
    return count, spatial


@lru_cache(maxsize=4)
def _font(size: int) -> FreeTypeFont | ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _fit(text: str, font: FreeTypeFont | ImageFont, width: int) -> str:
    """``text``, cut with an ellipsis where it is wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


@lru_cache(maxsize=256)
def _caption(lines: tuple[tuple[str, bool], ...], width: int, count: int) -> Tensor:
    """The strip under one probe: ``count`` lines of ``(text, is_note)``, centred; notes in the note colour."""
    from PIL import Image, ImageDraw

    font, step = _font(FONT_SIZE), LINE_HEIGHT
    strip = Image.new("RGB", (width, count * step), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for k, (text, is_note) in enumerate(lines):
        text = _fit(text, font, width - 2)
        x = (width - font.getlength(text)) / 2
        draw.text((x, k * step + 1), text, fill=NOTE_COLOR if is_note else TEXT_COLOR, font=font)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


LegendItem = tuple[str, int, int, tuple[str, ...]]
"""One mark of the legend: its name, its icon's width, the gap before it on a shared line, its words from
longest to shortest."""


def _legend_items(width: int, drawn: bool, kind: int) -> list[LegendItem]:
    """What the legend under a ``width``-pixel picture explains, for ``kind`` spatial axes."""
    if kind == 1:
        items = [
            ("probe", 16, 0, ("probe",)),
            ("curve", 16, 14, ("|d unit / d input|, 0 to its peak", "|d unit / d input|", "saliency")),
        ]
        field = ("receptive field, tick at its centre", "receptive field", "RF")
    else:
        bar = min(96, max(16, width // 5))
        peak = ("volume's peak |d unit / d input|",) if kind == 3 else ()
        scale = int(_font(FONT_SIZE).getlength("0")) + 8 + bar
        items = [("scale", scale, 0, (*peak, "peak |d unit / d input|", "peak"))]
        field = ("receptive field, ticks at its centre", "receptive field", "RF")
    if drawn:
        items.append(("field", 20, 18, field))
    return items


@lru_cache(maxsize=64)
def _legend_lines(width: int, drawn: bool, kind: int) -> tuple[tuple[tuple[int, str, int], ...], ...]:
    """The legend's lines, each a tuple of ``(item index, words, gap before)``: the items in order, each
    with its whole words on the current line while they fit ``width``, else on a new line, where it gets
    the longest words that fit."""
    font, room = _font(FONT_SIZE), width - 2 * (PADDING + 2)
    lines: list[list[tuple[int, str, int]]] = []
    used = 0.0
    for k, (_, icon, gap, texts) in enumerate(_legend_items(width, drawn, kind)):
        if lines and used + gap + icon + font.getlength(texts[0]) <= room:
            lines[-1].append((k, texts[0], gap))
            used += gap + icon + font.getlength(texts[0])
            continue
        indent = min(gap, 4)  # the box's ticks reach 4 px to its left
        text = next((t for t in texts if indent + icon + font.getlength(t) <= room), texts[-1])
        lines.append([(k, text, indent)])
        used = indent + icon + font.getlength(text)
    return tuple(map(tuple, lines))


def _legend_height(width: int, drawn: bool, kind: int) -> int:
    """The height in pixels of the legend under a ``width``-pixel picture."""
    return len(_legend_lines(width, drawn, kind)) * LINE_HEIGHT + 4


@lru_cache(maxsize=32)
def _legend(width: int, cmap: str, drawn: bool, kind: int = 2) -> Tensor:
    """The strip under the grid: the colour scale from 0 to each map's peak, and what the marks mean.

    ``kind``: the spatial axes drawn: 2 (a box with ticks), 1 (a grey probe line, the map's curve and a
    shaded interval: no colour scale) or 3 (as 2, the heat scaled to each volume's peak). Every mark is
    explained in whole words: on a grid too narrow for one line, each gets a line of its own (words get
    shorter only where one mark's line is still too narrow).
    """
    from PIL import Image, ImageDraw

    font = _font(FONT_SIZE)
    items, lines = _legend_items(width, drawn, kind), _legend_lines(width, drawn, kind)
    bar = min(96, max(16, width // 5))
    strip = Image.new("RGB", (width, _legend_height(width, drawn, kind)), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        x, middle = PADDING + 2, row * LINE_HEIGHT + (LINE_HEIGHT + 4) // 2
        for k, text, gap in line:
            name, icon = items[k][:2]
            x += gap
            if name == "probe":
                draw.line((x, middle, x + 12, middle), fill=(int(SIGNAL_COLOR),) * 3, width=2)
            elif name == "curve":
                colour = tuple(_palette(cmap)[CURVE].tolist())
                draw.polygon(
                    [(x, middle + 5), (x + 4, middle - 5), (x + 8, middle + 2), (x + 12, middle + 5)], fill=colour
                )
            elif name == "scale":
                draw.text((x, middle), "0", fill=TEXT_COLOR, font=font, anchor="lm")
                ramp = _palette(cmap)[torch.linspace(0, 255, bar).round().long()].numpy()
                at = x + int(font.getlength("0")) + 4
                strip.paste(Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (8, bar, 3)))), (at, middle - 4))
            elif kind == 1:  # the shaded interval, a tick at its centre
                shade = tuple(round(BACKGROUND / 2 + (c - BACKGROUND / 2) * SHADE) for c in BOX_COLOR)
                draw.rectangle((x, middle - 5, x + 10, middle + 5), fill=shade, outline=BOX_COLOR, width=1)
                draw.line((x + 5, middle - 9, x + 5, middle - 6), fill=BOX_COLOR, width=2)
            else:  # the box, ticks on its sides
                draw.rectangle((x, middle - 5, x + 10, middle + 5), outline=BOX_COLOR, width=2)
                for tick in ((x + 5, middle - 9, x + 5, middle - 6), (x + 5, middle + 6, x + 5, middle + 9)):
                    draw.line(tick, fill=BOX_COLOR, width=2)
                for tick in ((x - 4, middle, x - 1, middle), (x + 11, middle, x + 14, middle)):
                    draw.line(tick, fill=BOX_COLOR, width=2)
            draw.text((x + icon, middle), text, fill=TEXT_COLOR, font=font, anchor="lm")
            x += icon + int(font.getlength(text))
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


def summary_figure(records: Sequence[Mapping[str, Any]], title: str = "Analytic receptive field per layer") -> Figure:
    """Receptive-field size and effective stride of the given layers (``LayerRF.to_record`` dicts), as a chart.

    One horizontal bar per layer, in the order given: its name on the left, the bar as long as the
    receptive field, its size and effective stride in numbers on the right. Sized for a TensorBoard card
    (:data:`CARD`: 320 px wide at 100 dpi, up to 215 px high for six layers), with text that needs no
    enlarging. Rows without a receptive field, and global ones (every unit sees the whole input), are left out.

    Example::
        >>> figure = summary_figure([{"name": "conv1", "size": (3, 3), "stride": (1, 1)}])
        >>> [axes.get_xlabel() for axes in figure.axes], figure.axes[1].get_yticklabels()[0].get_text()
        (['receptive-field size (input px)', ''], '3 px, stride 1')
    """
    from matplotlib.figure import Figure

    from rf_callback.report import pair

    rows = [r for r in records if "unsupported" not in r and not r.get("is_global")]
    names = [_shortened(r["name"], 22) for r in rows]
    inches = (CARD[1] / 100, max(1.3, (70 + 19 * len(rows)) / 100))  # 320 px wide at 100 dpi, 19 px a layer
    figure = Figure(figsize=inches, dpi=100, layout="constrained")
    size_axes = figure.add_subplot()
    positions = list(range(len(rows)))
    size_axes.barh(positions, [max(r["size"]) for r in rows], color="tab:blue", height=0.6)
    size_axes.set_yticks(positions, names, fontsize=8)
    size_axes.set_ylim(max(len(rows), 1) - 0.5, -0.5)  # network order, top to bottom (room for one when none)
    size_axes.set_xlabel("receptive-field size (input px)", fontsize=8)
    size_axes.tick_params(axis="x", labelsize=8)
    size_axes.grid(axis="x", alpha=0.3)
    numbers = size_axes.twinx()
    numbers.set_ylim(size_axes.get_ylim())
    numbers.set_yticks(positions, [f"{pair(r['size'])} px, stride {pair(r['stride'])}" for r in rows], fontsize=8)
    numbers.tick_params(axis="y", length=0)
    size_axes.set_title(title, fontsize=9)
    return figure


def _shortened(text: str, length: int) -> str:
    """``text``, its start replaced by an ellipsis when it has more than ``length`` characters."""
    return text if len(text) <= length else "…" + text[-(length - 1) :]


def figure_image(figure: Figure) -> Tensor:
    """A matplotlib figure drawn by Agg at its own size and dpi, as a uint8 image ``(3, H, W)``.

    Example::
        >>> from matplotlib.figure import Figure
        >>> figure_image(Figure(figsize=(2, 1), dpi=50)).shape
        torch.Size([3, 50, 100])
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = torch.from_numpy(np.asarray(canvas.buffer_rgba()).copy())
    return rgba[..., :3].permute(2, 0, 1).contiguous()


def pil_image(image: Tensor) -> Image:
    """A uint8 ``(3, H, W)`` image as a PIL image (what W&B and MLflow take)."""
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def save_png(image: Tensor, path: Any) -> None:
    """Write a uint8 ``(3, H, W)`` image as PNG to a path or a binary file.

    Example::
        >>> import io
        >>> save_png(torch.zeros(3, 2, 2, dtype=torch.uint8), buffer := io.BytesIO())
        >>> buffer.getvalue()[:4]
        b'\\x89PNG'
    """
    pil_image(image).save(path, format="PNG")


def plot_maps(
    images: Tensor,
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    labels: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
    *,
    whole_image: Tensor | None = None,
    analytic: Sequence[bool] | None = None,
    tile: int | None = None,
    nrow: int | None = None,
    cmap: str = "inferno",
    dpi: int = 100,
) -> Figure:
    """The callback's pictures in a matplotlib figure, one :func:`layer_image` per layer, for notebooks.

    Each layer's picture is shown pixel for pixel (at ``dpi``) under its name. Images, 1-D signals and
    volumes alike: the probes' shape says which.

    Args:
        images: the probes ``(N, C, *spatial)``.
        maps: saliency ``(N, L, *spatial)`` for L layers, or ``(N, *spatial)`` for one.
        boxes: ``(N, L, 2d)`` or ``(N, 2d)``, as :attr:`ReceptiveMaps.boxes`.
        centers: ``(N, L, d)`` or ``(N, d)``, as :attr:`ReceptiveMaps.centers`.
        labels: a caption under each probe (class names), or ``None``.
        layer_names: a title per layer (default: ``layer 0``, ``layer 1``, ...).
        whole_image: ``(N, L)`` or ``(N,)`` flags, see :func:`layer_grid` (images only).
        analytic: per layer, whether its boxes are analytic (:attr:`ReceptiveMaps.analytic`; default: all).
        tile: the longest side of a probe on screen, at most; ``None``: as large as lets a row of probes
            fill a notebook's width (:data:`NOTEBOOK_WIDTH`, 960 px), up to 256 px.
        nrow, cmap: as for :func:`layer_image`.
        dpi: the figure's resolution; at 100 one image pixel is one screen pixel in a notebook.

    Returns:
        a :class:`matplotlib.figure.Figure` (not attached to pyplot: nothing to close).

    Raises:
        ValueError: if the shapes disagree or ``layer_names`` has not one name per layer.

    Example::
        >>> figure = plot_maps(torch.rand(4, 1, 28, 28), torch.rand(4, 2, 28, 28),
        ...                    torch.tensor([[10, 10, 18, 18]]).expand(4, 2, 4), torch.full((4, 2, 2), 14.0),
        ...                    labels=["a", "b", "c", "d"], layer_names=["conv1", "conv2"])
        >>> [axes.get_title(loc="left") for axes in figure.axes], int(figure.bbox.width)  # 4 probes of 224 px a row
        (['conv1', 'conv2'], 906)
    """
    from matplotlib.figure import Figure

    dims = images.dim() - 2
    if maps.dim() == dims + 1:
        maps, boxes, centers = maps[:, None], boxes[:, None], centers[:, None]
        whole_image = None if whole_image is None else torch.as_tensor(whole_image).reshape(-1, 1)
    if maps.dim() != dims + 2 or boxes.dim() != 3 or centers.dim() != 3:
        raise ValueError(
            f"plot_maps: maps (N, L, *spatial), boxes (N, L, 2d) and centers (N, L, d) for images"
            f" {tuple(images.shape)}, got {tuple(maps.shape)}, {tuple(boxes.shape)} and {tuple(centers.shape)}."
        )
    count = maps.shape[1]
    names = list(layer_names) if layer_names is not None else [f"layer {k}" for k in range(count)]
    if len(names) != count:
        raise ValueError(f"plot_maps: layer_names needs one name per layer ({count}), got {len(names)}: {names}.")
    flags = list(analytic) if analytic is not None else [True] * count
    if len(flags) != count:
        raise ValueError(f"plot_maps: analytic needs one flag per layer ({count}), got {len(flags)}.")
    if tile is None:
        columns = nrow if nrow is not None else _default_row(len(images), images.dim() - 2)
        fills = (
            t for t in range(256, 8, -1) if columns * (_panel_shape(images.shape[2:], t)[1] + PADDING) < NOTEBOOK_WIDTH
        )
        tile = next(fills, 8)
    options = {"labels": labels, "tile": tile, "nrow": nrow, "cmap": cmap}

    def grid(k: int) -> Tensor:
        layer = (images, maps[:, k], boxes[:, k], centers[:, k])
        if dims != 2:
            return layer_image(*layer, analytic=flags[k], **options)
        whole = None if whole_image is None else torch.as_tensor(whole_image)[:, k]
        return layer_grid(*layer, whole_image=whole, analytic=flags[k], **options)

    grids = [grid(k) for k in range(count)]
    title = 0.3  # inches above each grid
    width = max(grid.shape[2] for grid in grids) / dpi
    heights = [grid.shape[1] / dpi for grid in grids]
    figure = Figure(figsize=(width, sum(heights) + count * title), dpi=dpi)
    for axes, grid, name in zip(figure.subplots(count, 1, squeeze=False, height_ratios=heights)[:, 0], grids, names):
        axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes.set_title(name, loc="left", fontsize=10)
        axes.set_axis_off()
    gap = title / (sum(heights) / count)  # as a fraction of the mean axes height
    figure.subplots_adjust(left=0, right=1, bottom=0, top=1 - title / (sum(heights) + count * title), hspace=gap)
    return figure


VERDICT_COLORS = {"unproductive": "tab:red", "border": "tab:orange", "critical": "gold"}
"""Bar colours of :func:`coverage_figure` by ``LayerRF.verdict``; other verdicts are blue."""


def coverage_figure(
    records: Sequence[Mapping[str, Any]],
    input_shape: Sequence[int],
    erf_size: Sequence[float] | None = None,
    title: str = "Fields against the input",
) -> Figure:
    """How much of the input each layer's fields span, with the border between productive and unproductive layers.

    One row per layer (a ``LayerRF.to_record`` dict), in the order given: its name on the left, a bar from
    its smallest to its largest analytic field over paths, divided by the input's length on the axis where
    it is shortest against the input, and, when given, a dot at its effective field now (``erf_size``: per
    layer, Luo et al.'s ERF size, the side of a square of the pixels above 4.55% of the peak, averaged over
    the probes), divided by the side of a square of the input's area; on a log scale where 1 (the grey
    line) is the whole input. Bars are coloured by verdict (:data:`VERDICT_COLORS`); a dashed red line
    marks the border, above the first unproductive layer. Sized for a TensorBoard card (:data:`CARD`: 320 px
    wide at 100 dpi, 19 px a layer), like :func:`summary_figure`.

    Past the border Richter et al. predict no gain: a layer there should not widen the effective field it
    reads, so its dot should stay level with the dot of the layer before the border, over training too.
    A dot that moves right past the border means the layer still widens its effective field, and the
    prediction is in doubt for it.

    Rows without a receptive field are left out.

    Example::
        >>> records = [{"name": "conv1", "min_size": [5, 5], "max_size": [5, 5], "verdict": "productive"},
        ...            {"name": "conv2", "min_size": [9, 9], "max_size": [9, 9], "verdict": "border"},
        ...            {"name": "conv3", "min_size": [13, 13], "max_size": [13, 13], "verdict": "unproductive"}]
        >>> figure = coverage_figure(records, (8, 8), [4.0, 7.0, 7.1])
        >>> figure.axes[0].get_xlabel(), [label.get_text() for label in figure.axes[0].get_yticklabels()]
        ('field / input 8x8 (log)', ['conv1', 'conv2', 'conv3'])
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = [(k, r) for k, r in enumerate(records) if "min_size" in r]
    verdicts = {r.get("verdict") for _, r in shown}
    handles = [Patch(color=color, label=verdict) for verdict, color in VERDICT_COLORS.items() if verdict in verdicts]
    if erf_size is not None:
        handles.append(Line2D([], [], marker="o", color="black", linestyle="", markersize=4, label="ERF size"))
    height = 89 + 19 * len(shown) + 12 * bool(handles)  # 320 px wide at 100 dpi, 19 px a layer, one legend line
    inches = (CARD[1] / 100, max(1.3, height / 100))
    figure = Figure(figsize=inches, dpi=100, layout="constrained")
    axes = figure.add_subplot()

    def ratio(sizes: Sequence[float]) -> float:
        return min(size / length for size, length in zip(sizes, input_shape))

    positions = list(range(len(shown)))
    lows = [ratio(r["min_size"]) for _, r in shown]
    highs = [ratio(r["max_size"]) for _, r in shown]
    colors = [VERDICT_COLORS.get(r.get("verdict", ""), "tab:blue") for _, r in shown]
    axes.barh(positions, [h - lo for lo, h in zip(lows, highs)], left=lows, height=0.6, color=colors, alpha=0.8)
    axes.scatter(lows, positions, marker="|", s=60, linewidths=2, color=colors, zorder=3)  # one path: only this
    effective: list[float] = []
    if erf_size is not None:
        side = math.prod(input_shape) ** (1 / len(input_shape))
        effective = [max(erf_size[k], 1.0) / side for k, _ in shown]  # (a dead unit's 0: one pixel)
        axes.plot(effective, positions, "o", color="black", markersize=4, zorder=4)
    axes.axvline(1.0, color="grey", linewidth=1)
    axes.set_xscale("log")
    values = lows + highs + effective
    low, high = min([*values, 1.0]) / 1.5, max([*values, 1.0]) * 1.5
    axes.set_xlim(low, high)
    ticks = [2.0**k for k in range(math.ceil(math.log2(low)), math.floor(math.log2(high)) + 1)]
    step = max(1, math.ceil(len(ticks) / 5))  # at most five labels on 320 px
    ticks = [t for t in ticks if round(math.log2(t)) % step == 0]
    axes.set_xticks(ticks, [f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks], fontsize=8)
    axes.minorticks_off()
    axes.set_yticks(positions, [_shortened(r["name"], 22) for _, r in shown], fontsize=8)
    axes.set_ylim(max(len(shown), 1) - 0.5, -0.5)  # network order, top to bottom
    first = next((i for i, (_, r) in enumerate(shown) if r.get("verdict") == "unproductive"), None)
    if first is not None:
        axes.axhline(first - 0.5, color="tab:red", linestyle="--", linewidth=1)
    axes.set_xlabel(f"field / input {'x'.join(map(str, input_shape))} (log)", fontsize=8)
    axes.set_title(title, fontsize=9)
    if handles:
        figure.legend(
            handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7, frameon=False,
            handlelength=1, handletextpad=0.4, columnspacing=0.8,
        )  # fmt: skip
    return figure
