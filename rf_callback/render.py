"""Pictures of receptive fields: one image per layer with every probe's saliency and analytic box, charts.

Images are uint8 tensors ``(3, H, W)`` (what TensorBoard's ``add_image`` takes); figures are
matplotlib figures. matplotlib is imported inside the functions that need it.

A layer's picture (:func:`layer_grid`) is drawn for a screen, not for the input: each probe becomes a
tile of at most ``tile`` pixels a side (small inputs are enlarged by an integer factor with nearest
neighbours, large ones reduced by an integer factor with area averaging), shown in dimmed grey with the
saliency on top in a colour map whose opacity grows with the saliency, so the heat reads on a white
garment as on a dark one. All probes go through one resize, one colour lookup and one blend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image
    from PIL.ImageFont import FreeTypeFont, ImageFont

__all__ = ["colorize", "figure_image", "layer_grid", "pil_image", "plot_maps", "save_png", "summary_figure"]

BOX_COLOR = (0, 255, 255)  # cyan: the analytic receptive field, and ticks at the centre of the unit's field
BACKGROUND = 40  # grey of the text strips
GAP = 110  # grey between the probes
TEXT_COLOR = (235, 235, 235)
NOTE_COLOR = (150, 220, 220)  # "whole image", in a paler cyan than the box it replaces
GREY_RANGE = (24.0, 150.0)  # the probe's darkest and brightest pixel: dim enough for the heat to show on white
FONT_SIZE = 11
LINE_HEIGHT = FONT_SIZE + 4
PADDING = 2


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


def tile_size(height: int, width: int, tile: int = 128) -> tuple[int, int]:
    """The ``(h, w)`` at which :func:`layer_grid` draws a ``height x width`` probe.

    The probe is enlarged or reduced by an integer factor, whichever brings its longer side closest to
    ``tile`` without passing it: pixels of small inputs stay sharp squares, and large inputs are averaged
    over whole blocks of pixels.

    Example::
        >>> tile_size(28, 28), tile_size(224, 224), tile_size(299, 299), tile_size(32, 64)
        ((112, 112), (112, 112), (100, 100), (64, 128))
    """
    side = max(height, width)
    if side <= tile:
        factor = tile // side
        return height * factor, width * factor
    factor = math.ceil(side / tile)
    return math.ceil(height / factor), math.ceil(width / factor)


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
    cmap: str = "inferno",
) -> Tensor:
    """One layer's picture: every probe with its saliency, the unit's analytic box and centre, and a colour scale.

    Each probe is drawn in dimmed grey (its own darkest to brightest pixel, so the heat shows on white as
    on black) with the saliency on top in ``cmap``, from 0 to the map's own peak, its opacity growing
    with the saliency. The analytic receptive field is a cyan box drawn just outside the field, with
    ticks on its sides at the centre of the unit's field; neither covers the heat. Where the field
    covers the whole image (a global unit, or a field larger than the image) box and ticks would say
    nothing: they are left out and the probe's caption says "whole image". Below the probes, one strip
    holds the colour scale and the legend.

    Args:
        images: the probes ``(N, C, H, W)`` as the model sees them (any range; channels are averaged).
        maps: the saliency ``(N, H, W)``, nonnegative.
        boxes: ``(N, 4)`` analytic boxes ``(top, left, bottom, right)``, half-open, in input pixels.
        centers: ``(N, 2)`` centres ``(y, x)`` of the units' fields, in input pixels.
        labels: a caption under each probe (class names; other values are shown with ``str``), or ``None``.
        tile: the longest side of a probe on screen, at most; see :func:`tile_size`.
        nrow: probes per row (default: at most 5, in rows of equal length where possible).
        whole_image: per probe, whether its unit sees the whole image. Default: where its box is the whole
            image.
        cmap: a matplotlib colour map name.

    Returns:
        uint8 ``(3, H', W')``, for ``SummaryWriter.add_image(..., dataformats="CHW")``.

    Raises:
        ValueError: if the shapes disagree, or ``labels``/``whole_image`` do not have one entry per probe.

    Example::
        >>> grid = layer_grid(torch.rand(10, 3, 224, 224), torch.rand(10, 224, 224),
        ...                   torch.tensor([[90, 90, 134, 134]]).expand(10, 4), torch.full((10, 2), 112.0),
        ...                   labels=["cat", "dog"] * 5)
        >>> grid.dtype, grid.shape  # 2 rows of 5 tiles of 112 px with captions, the legend below
        (torch.uint8, torch.Size([3, 279, 572]))
    """
    count, height, width = _check(images, maps, boxes, centers, labels, whole_image, tile)
    h, w = tile_size(height, width, tile)
    boxes = boxes.detach().cpu().long()
    if whole_image is None:
        whole = (boxes[:, 0] <= 0) & (boxes[:, 1] <= 0) & (boxes[:, 2] >= height) & (boxes[:, 3] >= width)
    else:
        whole = torch.as_tensor(whole_image, dtype=torch.bool).reshape(count).cpu()

    # One resize, one colour lookup, one blend for all probes, at the smaller of input and tile size:
    # large probes are reduced first, small ones blended first and then enlarged by repeating pixels.
    planes = torch.stack((images.detach().cpu().float().mean(1), maps.detach().cpu().float()), 1)
    planes = torch.nan_to_num_(planes, nan=0.0, posinf=0.0, neginf=0.0)
    if h < height:
        planes = F.interpolate(planes, size=(h, w), mode="area")
    grey, heat = _each_unit_range(planes[:, 0]), _each_unit_range(planes[:, 1].clamp_min(0))
    low, high = GREY_RANGE
    base = (low + (high - low) * grey)[:, None]
    colour = _palette(cmap).float()[(heat * 255).round_().long()].permute(0, 3, 1, 2)
    alpha = heat.sqrt_()[:, None]  # faint saliency shows too, yet lets the probe through
    panels = torch.lerp(base, colour, alpha).round_().to(torch.uint8)
    if h > height:
        factor = h // height
        panels = panels.repeat_interleave(factor, 2).repeat_interleave(factor, 3)

    # The box just outside the field (inside at the image's edge), ticks outward from it at the unit's
    # centre: neither hides the heat. A few slices per probe.
    fy, fx = h / height, w / width
    line, tick = max(1, round(max(h, w) / 64)), max(3, round(max(h, w) / 24))
    paint = torch.tensor(BOX_COLOR, dtype=torch.uint8).view(3, 1, 1)
    for n in (~whole).nonzero()[:, 0].tolist():
        top, left, bottom, right = boxes[n].tolist()
        y, x = centers[n].tolist()
        screen = (math.floor(top * fy), math.floor(left * fx), math.ceil(bottom * fy), math.ceil(right * fx))
        center = (math.floor((y + 0.5) * fy), math.floor((x + 0.5) * fx))
        for y0, y1, x0, x1 in _marks(screen, center, (h, w), line, tick):
            panels[n, :, y0:y1, x0:x1] = paint

    captions = [
        tuple(text for text in ("" if labels is None else str(labels[n]), "whole image" if whole[n] else "") if text)
        for n in range(count)
    ]
    lines = max(map(len, captions))
    if lines:
        panels = torch.cat([panels, torch.stack([_caption(c, w, lines) for c in captions])], 2)
    if nrow is None:
        nrow = math.ceil(count / math.ceil(count / 5))
    grid = make_grid(panels, nrow=nrow, padding=PADDING, pad_value=GAP)
    if count == 1:  # make_grid returns a single image as it is
        grid = F.pad(grid, (PADDING,) * 4, value=GAP)
    legend = _legend(grid.shape[2], cmap, drawn=not bool(whole.all()))
    return torch.cat([grid, legend], 1)


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


def _check(
    images: Tensor,
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    labels: Sequence[str] | None,
    whole_image: Sequence[bool] | Tensor | None,
    tile: int,
) -> tuple[int, int, int]:
    """``(N, H, W)`` of a :func:`layer_grid` call, or a ValueError naming the argument that disagrees."""
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"layer_grid: images must be (N, C, H, W) with N >= 1, got {tuple(images.shape)}.")
    count, _, height, width = images.shape
    expected = {"maps": (count, height, width), "boxes": (count, 4), "centers": (count, 2)}
    for name, tensor in (("maps", maps), ("boxes", boxes), ("centers", centers)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"layer_grid: {name} must be {expected[name]} for images {tuple(images.shape)}, got"
                f" {tuple(tensor.shape)}. HINT: pass one layer, e.g. maps.maps[:, k], maps.boxes[:, k]."
            )
    for name, values in (("labels", labels), ("whole_image", whole_image)):
        if values is not None and len(values) != count:
            raise ValueError(f"layer_grid: {name} needs one entry per probe ({count}), got {len(values)}.")
    if isinstance(labels, str):
        raise ValueError("layer_grid: labels must be a sequence of strings, one per probe, not one string.")
    if not isinstance(tile, int) or tile < 8:
        raise ValueError(f"layer_grid(tile={tile!r}): an int >= 8 (pixels on the longest side of a probe).")
    return count, height, width


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
def _caption(lines: tuple[str, ...], width: int, count: int) -> Tensor:
    """The strip under one probe: ``count`` lines of text, centred; "whole image" in the note colour."""
    from PIL import Image, ImageDraw

    font, step = _font(FONT_SIZE), LINE_HEIGHT
    strip = Image.new("RGB", (width, count * step), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for k, text in enumerate(lines):
        text = _fit(text, font, width - 2)
        x = (width - font.getlength(text)) / 2
        draw.text((x, k * step + 1), text, fill=NOTE_COLOR if text == "whole image" else TEXT_COLOR, font=font)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


@lru_cache(maxsize=32)
def _legend(width: int, cmap: str, drawn: bool) -> Tensor:
    """The strip under the grid: the colour scale from 0 to each map's peak, and what box and ticks mean."""
    from PIL import Image, ImageDraw

    font, height = _font(FONT_SIZE), LINE_HEIGHT + 4
    strip = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    x, middle = PADDING + 2, height // 2
    draw.text((x, middle), "0", fill=TEXT_COLOR, font=font, anchor="lm")
    x += int(font.getlength("0")) + 4
    bar = min(96, max(16, width // 5))
    ramp = _palette(cmap)[torch.linspace(0, 255, bar).round().long()].numpy()
    strip.paste(Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (8, bar, 3)))), (x, middle - 4))
    x += bar + 4
    text = "peak |d unit / d input|"
    draw.text((x, middle), text, fill=TEXT_COLOR, font=font, anchor="lm")
    if drawn:
        x += int(font.getlength(text)) + 18
        draw.rectangle((x, middle - 5, x + 10, middle + 5), outline=BOX_COLOR, width=2)
        for tick in ((x + 5, middle - 9, x + 5, middle - 6), (x + 5, middle + 6, x + 5, middle + 9)):
            draw.line(tick, fill=BOX_COLOR, width=2)
        for tick in ((x - 4, middle, x - 1, middle), (x + 11, middle, x + 14, middle)):
            draw.line(tick, fill=BOX_COLOR, width=2)
        text = "receptive field, ticks at its centre"
        draw.text((x + 20, middle), text, fill=TEXT_COLOR, font=font, anchor="lm")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


def summary_figure(records: Sequence[Mapping[str, Any]], title: str = "Analytic receptive field per layer") -> Figure:
    """Receptive-field size and effective stride of the given layers (``LayerRF.to_record`` dicts), as a chart.

    Rows without a receptive field, and global ones (every unit sees the whole input), are left out.

    Example::
        >>> figure = summary_figure([{"name": "conv1", "size": (3, 3), "stride": (1, 1)}])
        >>> [axes.get_ylabel() for axes in figure.axes]
        ['receptive-field size (input pixels)', 'effective stride (input pixels)']
    """
    from matplotlib.figure import Figure

    rows = [r for r in records if "unsupported" not in r and not r.get("is_global")]
    names = [r["name"] for r in rows]
    figure = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5), layout="constrained")
    size_axes = figure.add_subplot()
    positions = range(len(names))
    size_axes.bar(positions, [max(r["size"]) for r in rows], color="tab:blue", label="RF size (px)")
    size_axes.set_ylabel("receptive-field size (input pixels)")
    size_axes.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=8)
    stride_axes = size_axes.twinx()
    stride_axes.plot(positions, [max(r["stride"]) for r in rows], "o-", color="tab:orange", label="effective stride")
    stride_axes.set_ylabel("effective stride (input pixels)")
    size_axes.set_title(title)
    handles = [h for axes in (size_axes, stride_axes) for h in axes.get_legend_handles_labels()[0]]
    size_axes.legend(handles=handles, loc="upper left")
    return figure


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
    tile: int = 128,
    nrow: int | None = None,
    cmap: str = "inferno",
    dpi: int = 100,
) -> Figure:
    """The callback's pictures in a matplotlib figure, one :func:`layer_grid` per layer, for notebooks.

    Each layer's grid is shown pixel for pixel (at ``dpi``) under its name.

    Args:
        images: the probes ``(N, C, H, W)``.
        maps: saliency ``(N, L, H, W)`` for L layers, or ``(N, H, W)`` for one.
        boxes: ``(N, L, 4)`` or ``(N, 4)``, as :attr:`ReceptiveMaps.boxes`.
        centers: ``(N, L, 2)`` or ``(N, 2)``, as :attr:`ReceptiveMaps.centers`.
        labels: a caption under each probe (class names), or ``None``.
        layer_names: a title per layer (default: ``layer 0``, ``layer 1``, ...).
        whole_image: ``(N, L)`` or ``(N,)`` flags, see :func:`layer_grid`.
        tile, nrow, cmap: as for :func:`layer_grid`.
        dpi: the figure's resolution; at 100 one image pixel is one screen pixel in a notebook.

    Returns:
        a :class:`matplotlib.figure.Figure` (not attached to pyplot: nothing to close).

    Raises:
        ValueError: if the shapes disagree or ``layer_names`` has not one name per layer.

    Example::
        >>> figure = plot_maps(torch.rand(4, 1, 28, 28), torch.rand(4, 2, 28, 28),
        ...                    torch.tensor([[10, 10, 18, 18]]).expand(4, 2, 4), torch.full((4, 2, 2), 14.0),
        ...                    labels=["a", "b", "c", "d"], layer_names=["conv1", "conv2"])
        >>> [axes.get_title(loc="left") for axes in figure.axes]
        ['conv1', 'conv2']
    """
    from matplotlib.figure import Figure

    if maps.dim() == 3:
        maps, boxes, centers = maps[:, None], boxes[:, None], centers[:, None]
        whole_image = None if whole_image is None else torch.as_tensor(whole_image).reshape(-1, 1)
    if maps.dim() != 4 or boxes.dim() != 3 or centers.dim() != 3:
        raise ValueError(
            f"plot_maps: maps (N, L, H, W), boxes (N, L, 4) and centers (N, L, 2), got {tuple(maps.shape)},"
            f" {tuple(boxes.shape)} and {tuple(centers.shape)}."
        )
    count = maps.shape[1]
    names = list(layer_names) if layer_names is not None else [f"layer {k}" for k in range(count)]
    if len(names) != count:
        raise ValueError(f"plot_maps: layer_names needs one name per layer ({count}), got {len(names)}: {names}.")
    grids = [
        layer_grid(
            images,
            maps[:, k],
            boxes[:, k],
            centers[:, k],
            labels=labels,
            tile=tile,
            nrow=nrow,
            whole_image=None if whole_image is None else torch.as_tensor(whole_image)[:, k],
            cmap=cmap,
        )
        for k in range(count)
    ]
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
