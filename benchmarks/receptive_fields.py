"""How fast is ``receptive_fields``? The meta-device trace vs one real forward pass, side by side.

Target: well under one real forward pass of torchvision's resnet50 at 224x224 on the CPU.

    python benchmarks/receptive_fields.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from timing import interleaved

from rf_callback.fields import receptive_fields

MODELS = ["resnet50", "vgg16", "densenet121", "mobilenet_v3_large", "convnext_tiny"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    print(
        f"{'model':20s} {'layers':>6s} {'trace ms':>9s} {'forward ms':>11s} {'ratio':>6s}"
        f"   ({torch.get_num_threads()} threads)"
    )
    torch.set_grad_enabled(False)
    for name in MODELS:
        model = getattr(torchvision.models, name)().eval()
        times = interleaved(
            {"trace": lambda: receptive_fields(model, (3, 224, 224)), "forward": lambda: model(image)}, args.repeats
        )
        trace, forward = times["trace"], times["forward"]
        rows = len(receptive_fields(model, (3, 224, 224)))
        print(f"{name:20s} {rows:6d} {trace * 1e3:9.1f} {forward * 1e3:11.1f} {trace / forward:6.2f}")


if __name__ == "__main__":
    main()
