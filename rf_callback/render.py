"""Pictures of receptive fields: saliency overlays with the analytic box, grids and summary charts.

Images are uint8 tensors ``(3, H, W)`` (what TensorBoard's ``add_image`` takes); figures are
matplotlib figures. matplotlib is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchvision.utils import draw_keypoints, make_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image

__all__ = ["colorize", "figure_image", "overlay", "pil_image", "probe_grid", "save_png", "summary_figure"]

BOX_COLOR = (0, 255, 255)  # cyan: the analytic receptive field
UNIT_COLOR = (255, 255, 255)  # white: the centre of the chosen unit's field


@lru_cache(maxsize=4)
def _palette(name: str) -> Tensor:
    import matplotlib

    return (torch.from_numpy(matplotlib.colormaps[name](range(256))[:, :3].copy()) * 255).round().to(torch.uint8)


def _unit_range(values: Tensor) -> Tensor:
    """Scaled to [0, 1] by its own range; NaN and infinities become 0, a constant becomes 0."""
    values = torch.nan_to_num(values.float(), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def colorize(values: Tensor, cmap: str = "inferno") -> Tensor:
    """A 2-D map as a uint8 RGB image ``(3, H, W)``, scaled by its own range.

    Example::
        >>> colorize(torch.tensor([[0.0, 1.0]])).shape
        torch.Size([3, 1, 2])
    """
    index = (_unit_range(values) * 255).round().long()
    return _palette(cmap)[index].permute(2, 0, 1).contiguous()


def overlay(
    image: Tensor, saliency: Tensor, box: Sequence[int], center: Sequence[float], scale: int = 4, cmap: str = "inferno"
) -> Tensor:
    """One probe: the image in grey, the saliency map blended over it, the analytic box and the unit's centre.

    Args:
        image: the probe ``(C, H, W)`` as the model sees it (any range).
        saliency: the map ``(H, W)``, nonnegative.
        box: ``(top, left, bottom, right)``, half-open, in input pixels.
        center: ``(y, x)`` of the unit's receptive-field centre.
        scale: each input pixel becomes ``scale x scale`` screen pixels (28x28 probes are small).

    Returns:
        uint8 ``(3, H * scale, W * scale)``.

    Example::
        >>> overlay(torch.rand(1, 8, 8), torch.rand(8, 8), (2, 2, 5, 5), (3.0, 3.0), scale=2).shape
        torch.Size([3, 16, 16])
    """
    grey = (_unit_range(image.float().mean(0)) * 255)[None].expand(3, -1, -1)
    heat = colorize(saliency, cmap).float()
    weight = _unit_range(saliency).sqrt()[None] * 0.75  # faint saliency lets the garment show through
    blended = (grey * (1 - weight) + heat * weight).round().to(torch.uint8)
    big = blended.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    top, left, bottom, right = (int(v) * scale for v in box)
    if bottom > top and right > left:
        _outline(big, top, left, bottom, right, width=max(1, scale // 2), color=BOX_COLOR)
    y, x = center
    point = torch.tensor([[[(x + 0.5) * scale, (y + 0.5) * scale]]])
    return draw_keypoints(big, point, colors=UNIT_COLOR, radius=max(1, scale // 2))


def _outline(image: Tensor, top: int, left: int, bottom: int, right: int, width: int, color: Sequence[int]) -> None:
    """Draw the inner border of ``[top:bottom, left:right]`` in place (faster than a font-loading box drawer)."""
    paint = torch.tensor(color, dtype=image.dtype).view(3, 1, 1)
    image[:, top : top + width, left:right] = paint
    image[:, bottom - width : bottom, left:right] = paint
    image[:, top:bottom, left : left + width] = paint
    image[:, top:bottom, right - width : right] = paint


def probe_grid(
    images: Tensor, maps: Tensor, boxes: Tensor, centers: Tensor, nrow: int = 5, scale: int = 4, cmap: str = "inferno"
) -> Tensor:
    """All probes of one layer side by side: uint8 ``(3, H, W)`` for ``SummaryWriter.add_image``.

    Args:
        images: probes ``(N, C, H, W)``.
        maps: saliency ``(N, H, W)``.
        boxes: ``(N, 4)`` analytic boxes; centers: ``(N, 2)`` unit centres.
    """
    panels = [
        overlay(images[n], maps[n], boxes[n].tolist(), centers[n].tolist(), scale, cmap) for n in range(len(images))
    ]
    return make_grid(torch.stack(panels), nrow=nrow, padding=2, pad_value=64)


def summary_figure(records: Sequence[Mapping[str, Any]], title: str = "Analytic receptive field per layer") -> Figure:
    """Receptive-field size and effective stride of the given layers (``LayerRF.to_record`` dicts), as a chart.

    Rows without a receptive field, and global ones (every unit sees the whole input), are left out.
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
    import numpy as np
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
    """Write a uint8 ``(3, H, W)`` image as PNG."""
    pil_image(image).save(path)
