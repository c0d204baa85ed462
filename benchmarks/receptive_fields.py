"""How fast is ``receptive_fields``? The meta-device trace vs one real forward pass, side by side.

Target (issue 10): at most one real forward pass at 224x224 on one CPU thread, for every torchvision
classification model. Both are timed in turn within each repeat (medians), on one thread.

Measured (2 shared cores, torch 2.14.1, 7 repeats, 2026-12-07): 78 of 80 torchvision classifiers at
most 1x (resnet50 0.08x, densenet121 0.32x, efficientnet_b0 0.56x, mobilenet_v3_large 0.66x,
mnasnet0_5 0.81x, shufflenet_v2_x1_0 0.89x); mobilenet_v3_small 1.24x and shufflenet_v2_x0_5 1.13x
(21 repeats: 1.28x, 1.22x; timm's lcnet_050 1.17x), which earlier runs measured at 0.95-1.02x. What is
left is the models' own Python and the geometry's (see the README's Performance).

    python benchmarks/receptive_fields.py [--repeats 7] [--models resnet50 timm:lcnet_050 ...]
    python benchmarks/receptive_fields.py --torchvision   # every torchvision classification model
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from timing import interleaved

from rf_callback.table import receptive_fields

MODELS = [
    "resnet50",
    "vgg16",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
    "timm:lcnet_050",
    "timm:mobilenetv2_100",
]


def build(name: str) -> torch.nn.Module:
    """A torchvision classification model, or a timm one as ``timm:<name>``, with random weights."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
    return torchvision.models.get_model(name, weights=None).eval()


def trace_and_forward(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of the trace and of one forward of ``image``, timed in turn."""
    shape = tuple(image.shape[1:])
    times = interleaved(
        {"trace": lambda: receptive_fields(model, shape, strict=False), "forward": lambda: model(image)}, repeats
    )
    return times["trace"], times["forward"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=MODELS, help="torchvision names, or timm:<name>")
    parser.add_argument("--torchvision", action="store_true", help="every torchvision classification model")
    args = parser.parse_args()
    names = torchvision.models.list_models(module=torchvision.models) if args.torchvision else args.models
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    image = torch.randn(1, *shape)
    print(f"{'model':24s} {'layers':>6s} {'trace ms':>9s} {'forward ms':>11s} {'ratio':>6s}   (1 thread, {shape})")
    torch.set_grad_enabled(False)
    for name in names:
        try:
            model = build(name)
            rows = len(receptive_fields(model, shape, strict=False))
        except Exception as error:  # noqa: BLE001  (a model that does not run at this size: say so, go on)
            print(f"{name:24s} skipped: {type(error).__name__}: {str(error)[:80]}")
            continue
        trace, forward = trace_and_forward(model, image, args.repeats)
        print(f"{name:24s} {rows:6d} {trace * 1e3:9.1f} {forward * 1e3:11.1f} {trace / forward:6.2f}", flush=True)


if __name__ == "__main__":
    main()
