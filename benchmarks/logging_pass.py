"""What one logging pass of the callback costs on real networks, against training the same probes once.

For resnet18, resnet50 (torchvision, ``weights=None``, 224x224, 3 channels) and the demo SmallCNN
(28x28), with 10 probes and the default layers (one per resolution stage), this times side by side:

* ``fwd+bwd``: one plain forward and backward of the 10 probes (``model(x).sum().backward()``), the unit;
* ``compute``: :meth:`ProbeMonitor.compute` (the maps, boxes and ERF statistics);
* ``render``: :meth:`ProbeMonitor.images` (one picture per layer);
* ``write``: ``add_image`` / ``add_scalar`` of those into a TensorBoard event file;
* ``pass``: :meth:`ProbeMonitor.log`, all of it,

and prints the ratios and the event-file bytes a pass adds. Targets (issue 10): a pass at most 3x
fwd+bwd, rendering at most 10 % of the pass, at most 1.5 MB per pass for resnet50 and 0.2 MB for the
demo. Medians of ``--repeats`` interleaved repeats, ``torch.set_num_threads(--threads)``.

    python benchmarks/logging_pass.py [--repeats 5] [--threads 1] [--models resnet18 resnet50 demo]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from timing import interleaved
from torch.utils.tensorboard import SummaryWriter

from rf_callback.demos.cnns import SmallCNN
from rf_callback.destinations import TensorBoardDestination
from rf_callback.monitor import ProbeMonitor


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if name == "demo":
        return SmallCNN().eval(), torch.rand(10, 1, 28, 28, generator=generator)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, torch.randn(10, 3, 224, 224, generator=generator)


def event_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("events.out.tfevents.*"))


def measure(name: str, repeats: int) -> tuple[int, dict[str, float], float]:
    """The default layers' count, the median seconds of each step, and the megabytes one pass adds."""
    model, probes = build(name)
    monitor = ProbeMonitor(model, probes)
    result = monitor.compute()
    images, scalars = monitor.images(result), monitor.scalars(result)
    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder)
        destination = TensorBoardDestination(writer)

        def train_step() -> None:
            x = probes.clone().requires_grad_(True)
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)

        def write() -> None:
            for tag, image in images.items():
                destination.add_image(tag, image, 0)
            destination.add_scalars(scalars, 0)
            destination.flush()

        times = interleaved(
            {
                "fwd+bwd": train_step,
                "compute": monitor.compute,
                "render": lambda: monitor.images(result),
                "write": write,
                "pass": lambda: monitor.log(destination, 0),
            },
            repeats,
        )
        writer.flush()
        before = event_bytes(Path(folder))
        monitor.log(destination, 1)
        writer.flush()
        size = (event_bytes(Path(folder)) - before) / 1e6
        writer.close()
    return len(monitor.layers), times, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "demo"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats, 10 probes, default layers\n")
    header = f"{'model':9s} {'layers':>6s} {'fwd+bwd s':>9s} {'compute':>8s} {'render':>7s} {'write':>6s}"
    print(f"{header} {'pass':>6s} {'pass/fwd+bwd':>12s} {'render share':>12s} {'MB/pass':>8s}")
    for name in args.models:
        layers, times, size = measure(name, args.repeats)
        base = times["fwd+bwd"]
        print(
            f"{name:9s} {layers:6d} {base:9.3f} {times['compute'] / base:7.2f}x {times['render'] / base:6.2f}x"
            f" {times['write'] / base:5.2f}x {times['pass']:5.2f}s {times['pass'] / base:11.2f}x"
            f" {times['render'] / times['pass']:11.0%} {size:8.2f}"
        )


if __name__ == "__main__":
    main()
