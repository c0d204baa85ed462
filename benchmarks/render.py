"""How long does drawing one logging pass take, and how many bytes does it add to the event file?

One pass draws every monitored layer's picture of the probes and encodes it as ``add_image`` does
(``torch.utils.tensorboard.summary.image``: PIL's PNG at its default compression). Two cases:

* 224x224 RGB, 10 probes, 5 layers (resnet50's stages: fields of 11, 35, 91 px, then two that cover the
  whole image);
* 28x28 grey, 10 probes, 6 layers (the demo SmallCNN: fields of 3 to 16 px).

Probes are crops of matplotlib's sample photo (``grace_hopper.jpg``); maps are speckled Gaussians inside
each field, as untrained networks give (Luo et al.). Compared, interleaved in one process on one thread:

* old: one ``overlay`` per probe, scaled by an integer so a probe is ~112 px (224 px inputs stay 224),
  ``draw_keypoints`` per probe, ``make_grid`` (the renderer before ``layer_grid``, kept here verbatim);
* new: :func:`rf_callback.render.layer_grid` with class names under the probes.

Targets (issue 10): rendering at most 10 % of a logging pass, i.e. well under 100-200 ms for resnet
layers at 224 (one fwd+bwd of 10 probes through resnet18 takes ~2 s on our CPU); at most 1.5 MB of
events per pass for resnet50 and 0.2 MB for the demo.

    python benchmarks/render.py [--repeats 15]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import numpy as np
import torch
from timing import interleaved
from torch import Tensor
from torch.utils.tensorboard.summary import image as image_summary
from torchvision.utils import draw_keypoints, make_grid

from rf_callback.render import colorize, layer_grid

CASES = {  # name: (side, channels, field size per layer)
    "224x224 RGB, 5 layers": (224, 3, (11, 35, 91, 235, 427)),
    "28x28 grey, 6 layers": (28, 1, (3, 5, 6, 10, 14, 16)),
}
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# ---- the renderer before layer_grid, verbatim but for names --------------------------------------------
def _old_overlay(image: Tensor, saliency: Tensor, box: Sequence[int], center: Sequence[float], scale: int) -> Tensor:
    def unit_range(values: Tensor) -> Tensor:
        values = torch.nan_to_num(values.float(), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = values.min(), values.max()
        return (values - low) / (high - low) if high > low else torch.zeros_like(values)

    grey = (unit_range(image.float().mean(0)) * 255)[None].expand(3, -1, -1)
    heat = colorize(saliency).float()
    weight = unit_range(saliency).sqrt()[None] * 0.75
    blended = (grey * (1 - weight) + heat * weight).round().to(torch.uint8)
    big = blended.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    top, left, bottom, right = (int(v) * scale for v in box)
    if bottom > top and right > left:
        width, paint = max(1, scale // 2), torch.tensor((0, 255, 255), dtype=torch.uint8).view(3, 1, 1)
        big[:, top : top + width, left:right] = paint
        big[:, bottom - width : bottom, left:right] = paint
        big[:, top:bottom, left : left + width] = paint
        big[:, top:bottom, right - width : right] = paint
    y, x = center
    point = torch.tensor([[[(x + 0.5) * scale, (y + 0.5) * scale]]])
    return draw_keypoints(big, point, colors=(255, 255, 255), radius=max(1, scale // 2))


def old_probe_grid(images: Tensor, maps: Tensor, boxes: Tensor, centers: Tensor, scale: int) -> Tensor:
    panels = [_old_overlay(x, m, b.tolist(), c.tolist(), scale) for x, m, b, c in zip(images, maps, boxes, centers)]
    return make_grid(torch.stack(panels), nrow=5, padding=2, pad_value=64)


# ---- inputs ---------------------------------------------------------------------------------------------
def probes(side: int, channels: int, count: int = 10) -> Tensor:
    """``count`` crops of matplotlib's sample photo at ``side`` px, normalized as a model would take them."""
    import matplotlib.cbook
    from PIL import Image

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 255
    generator = torch.Generator().manual_seed(0)
    crops = []
    for _ in range(count):
        crop = int(torch.randint(min(pixels.shape[1:]) // 2, min(pixels.shape[1:]) + 1, (1,), generator=generator))
        top = int(torch.randint(0, pixels.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, pixels.shape[2] - crop + 1, (1,), generator=generator))
        crops.append(pixels[:, top : top + crop, left : left + crop])
    batch = torch.stack([torch.nn.functional.interpolate(c[None], size=(side, side), mode="area")[0] for c in crops])
    batch = batch.mean(1, keepdim=True) if channels == 1 else batch
    return (batch - batch.mean()) / batch.std()


def layer_maps(side: int, field: int, count: int = 10, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Maps (N, H, W), boxes (N, 4) and centres (N, 2) of the centre unit of a layer with this field size."""
    generator = torch.Generator().manual_seed(seed)
    middle = (side - 1) / 2
    start = round(middle - (field - 1) / 2)
    box = torch.tensor([max(start, 0), max(start, 0), min(start + field, side), min(start + field, side)])
    axis = torch.arange(side, dtype=torch.float32)
    spread = max(field / 6, 0.7)
    gaussian = torch.exp(-((axis[:, None] - middle) ** 2 + (axis[None, :] - middle) ** 2) / (2 * spread**2))
    inside = torch.zeros(side, side)
    inside[box[0] : box[2], box[1] : box[3]] = 1
    speckle = torch.randn(count, side, side, generator=generator).abs()
    maps = gaussian * inside * speckle
    return maps, box.expand(count, 4), torch.full((count, 2), middle)


def summary_bytes(grid: Tensor) -> int:
    """Bytes of the ``Summary`` that ``SummaryWriter.add_image`` would write (PNG inside)."""
    return len(image_summary("receptive_field/layer", grid, dataformats="CHW").SerializeToString())


def drawers(side: int, channels: int, fields: list[int]) -> dict[str, Callable[[], list]]:
    """One case's pictures drawn the old way and the new way, and drawn then encoded as written."""
    images = probes(side, channels)
    layers = [layer_maps(side, field, seed=k) for k, field in enumerate(fields)]
    scale = max(1, round(112 / side))  # the callback's old default

    def old() -> list[Tensor]:
        return [old_probe_grid(images, maps, boxes, centers, scale) for maps, boxes, centers in layers]

    def new() -> list[Tensor]:
        return [layer_grid(images, maps, boxes, centers, labels=LABELS) for maps, boxes, centers in layers]

    return {
        "old": old,
        "new": new,
        "old_written": lambda: [summary_bytes(grid) for grid in old()],
        "new_written": lambda: [summary_bytes(grid) for grid in new()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; medians of {args.repeats} interleaved repeats; per logging pass")
    header = f"{'case':24s} {'method':4s} {'image (h x w)':>14s} {'render ms':>10s} {'+ PNG ms':>9s} {'MB':>7s}"
    print(header)
    for case, (side, channels, fields) in CASES.items():
        draw = drawers(side, channels, fields)
        old, new = draw["old"], draw["new"]
        seconds = interleaved(draw, args.repeats)
        megabytes = {"old": sum(draw["old_written"]()) / 1e6, "new": sum(draw["new_written"]()) / 1e6}
        for method, draw in (("old", old), ("new", new)):
            shape = draw()[-1].shape
            print(
                f"{case:24s} {method:4s} {f'{shape[1]} x {shape[2]}':>14s} {seconds[method] * 1e3:10.1f}"
                f" {seconds[method + '_written'] * 1e3:9.1f} {megabytes[method]:7.3f}"
            )
        print(
            f"{case:24s} new/old: render {seconds['new'] / seconds['old']:.2f}, render + PNG"
            f" {seconds['new_written'] / seconds['old_written']:.2f}, bytes {megabytes['new'] / megabytes['old']:.2f}"
        )


if __name__ == "__main__":
    main()
