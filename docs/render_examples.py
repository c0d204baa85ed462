"""Draw the example pictures of docs/: the callback's per-layer images, through ``plot_maps``.

* ``render_example_fmnist.png``: the demo SmallCNN (untrained, seed 0) on the first Fashion-MNIST test
  image of each class, at conv1, pool1 and pool2;
* ``render_example_224.png``: torchvision's resnet50 (untrained, seed 0) on 224x224 crops of matplotlib's
  sample pictures, one brightened and one darkened, at maxpool, layer2 and layer4 (a field larger than the
  image: no box, "whole image").

    python docs/render_examples.py [--raw-dir ../shared/data/FashionMNIST/raw]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import matplotlib.cbook
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from rf_callback import receptive_maps
from rf_callback.demos.cnns import SmallCNN
from rf_callback.demos.fashion_mnist import CLASSES, PIXEL_MEAN, PIXEL_STD
from rf_callback.render import plot_maps

DOCS = Path(__file__).resolve().parent
IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def fashion_mnist(raw: Path) -> torch.Tensor:
    """The first test image of each class, normalized as the data module does: (10, 1, 28, 28)."""
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz") as file:
        images = np.frombuffer(file.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as file:
        labels = np.frombuffer(file.read(), np.uint8, offset=8)
    first = [int(np.nonzero(labels == c)[0][0]) for c in range(len(CLASSES))]
    return torch.from_numpy(images[first].copy()).float().div(255).sub(PIXEL_MEAN).div(PIXEL_STD)[:, None]


def photos() -> tuple[torch.Tensor, list[str]]:
    """Ten 224x224 crops of matplotlib's sample pictures, the last two brightened and darkened."""

    def load(name: str) -> torch.Tensor:
        path = matplotlib.cbook.get_sample_data(name, asfileobj=False)
        return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255

    sources = {"portrait": load("grace_hopper.jpg"), "present": load("Minduka_Present_Blue_Pack.png")}
    generator = torch.Generator().manual_seed(0)
    crops, labels = [], []
    for k in range(10):
        label = "present" if k % 3 == 0 else "portrait"
        source = sources[label]
        side = min(source.shape[1:])
        crop = int(torch.randint(min(224, side), side + 1, (1,), generator=generator))
        top = int(torch.randint(0, source.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, source.shape[2] - crop + 1, (1,), generator=generator))
        picture = source[None, :, top : top + crop, left : left + crop]
        picture = F.interpolate(picture, size=(224, 224), mode="bilinear", antialias=True)[0].clamp(0, 1)
        if k == 8:
            picture, label = 0.85 + 0.15 * picture, "brightened"
        if k == 9:
            picture, label = 0.2 * picture, "darkened"
        crops.append(picture)
        labels.append(label)
    return (torch.stack(crops) - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None], labels


def draw(model: torch.nn.Module, probes: torch.Tensor, labels: list[str], layers: list[str], path: Path) -> None:
    result = receptive_maps(model, probes, layers)
    figure = plot_maps(probes, result.maps, result.boxes, result.centers, labels, result.layers)
    figure.savefig(path, pil_kwargs={"optimize": True})
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("../shared/data/FashionMNIST/raw"))
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = ["features.conv1", "features.pool1", "features.pool2"]
    draw(SmallCNN(), fashion_mnist(args.raw_dir), list(CLASSES), layers, DOCS / "render_example_fmnist.png")
    torch.manual_seed(0)
    probes, labels = photos()
    resnet = torchvision.models.resnet50(weights=None)
    draw(resnet, probes, labels, ["maxpool", "layer2", "layer4"], DOCS / "render_example_224.png")


if __name__ == "__main__":
    main()
