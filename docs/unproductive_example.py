"""Train torchvision's ResNet-18 on Fashion-MNIST padded to 32 px and chart its fields against the input.

At 32 px the table predicts three unproductive convolutions (``layer3.1.conv2``, ``layer4.0.conv2``,
``layer4.1.conv2``: their shortest path and their inputs' already span the input, Richter et al. 2021).
This script trains the network briefly with a :class:`~rf_callback.ProbeMonitor` on the first test
image of each class, which maps its default layers (one per stage, plus the two sides of the border,
``layer3.1.conv1`` and ``layer3.1.conv2``), and writes

* ``docs/unproductive_resnet18.png``: the coverage chart before training and after it, side by side;
* the ERF extent of the monitored layers at each logging step, and the test accuracy, on stdout.

    python docs/unproductive_example.py [--raw-dir ../shared/data/FashionMNIST/raw] [--train 12000] [--epochs 3]

Random weights from seed 0, CPU, one thread per process as the machine allows; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from rf_callback import ProbeMonitor
from rf_callback.demos.fashion_mnist import CLASSES, PIXEL_MEAN, PIXEL_STD
from rf_callback.render import pil_image

DOCS = Path(__file__).resolve().parent


def read(raw: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images normalized as the demo does, padded with background to 32x32: (N, 1, 32, 32), and labels (N,)."""
    with gzip.open(raw / f"{split}-images-idx3-ubyte.gz") as file:
        images = np.frombuffer(file.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz") as file:
        labels = np.frombuffer(file.read(), np.uint8, offset=8)
    padded = F.pad(torch.from_numpy(images.copy()).float() / 255, (2, 2, 2, 2))
    return (padded - PIXEL_MEAN) / PIXEL_STD, torch.from_numpy(labels.astype(np.int64))


def resnet18_for_gray() -> nn.Module:
    """torchvision's ResNet-18 for one input channel and ten classes (the stem keeps its 7x7, stride 2 geometry)."""
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("../shared/data/FashionMNIST/raw"))
    parser.add_argument("--train", type=int, default=12000, help="training images (the first ones)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DOCS / "unproductive_resnet18.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = read(args.raw_dir, "train")
    images, labels = images[: args.train], labels[: args.train]
    test_images, test_labels = read(args.raw_dir, "t10k")
    probes = test_images[[int((test_labels == c).nonzero()[0]) for c in range(len(CLASSES))]]

    model = resnet18_for_gray()
    monitor = ProbeMonitor(model, probes)
    print(monitor.cost.describe())
    print("monitored:", ", ".join(monitor.layers))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    charts = []

    def observe(step: int) -> None:
        result = monitor.compute()
        means = result.erf.mean()
        for statistic, values in (
            ("extent", means["extent"][:, 0]),
            ("size", means["size"]),
            ("mass side", means["mass_side"]),
        ):
            print(
                f"step {step}: ERF {statistic} (px, of 32) "
                + ", ".join(f"{k} {v:.1f}" for k, v in zip(result.layers, values)),
                flush=True,
            )
        charts.append(pil_image(monitor.coverage(result, title=f"ResNet-18, step {step}")))

    observe(0)
    step = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(images), generator=generator).split(128):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 10 == 0:
                print(f"step {step}: loss {loss.item():.3f}", flush=True)
        observe(step)
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x).argmax(1) == y).sum()) for x, y in zip(test_images.split(500), test_labels.split(500))
        )
    print(f"test accuracy after {step} steps: {correct / len(test_labels):.3f}")
    first, last = charts[0], charts[-1]
    canvas = Image.new("RGB", (first.width + last.width, max(first.height, last.height)), "white")
    canvas.paste(first, (0, 0))
    canvas.paste(last, (first.width, 0))
    canvas.save(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
