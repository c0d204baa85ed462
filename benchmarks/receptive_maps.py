"""How fast is ``receptive_maps``? Ours vs the naive way vs the floor, measured side by side.

* ours: ``receptive_maps(model, probes, fields=table)`` for 10 probes x every conv and pooling layer;
* naive: one captum ``NeuronGradient`` call per probe per layer (how it is usually done);
* floor: one plain forward pass of the 10 probes with forward hooks on the layers, then one
  ``torch.autograd.grad`` per layer, written out plainly below.

Targets: ours at least 10x faster than naive and at most 1.25x the floor.

    python benchmarks/receptive_maps.py [--repeats 20] [--device cpu] [--model rf_callback.demos.cnns:SmallCNN]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from captum.attr import NeuronGradient
from timing import interleaved

from rf_callback.cli import import_object
from rf_callback.fields import receptive_fields
from rf_callback.saliency import default_layers, receptive_maps


def probe_images(count: int) -> torch.Tensor:
    """Real Fashion-MNIST validation images when the data are at hand, else random ones."""
    try:
        from rf_callback.demos.fashion_mnist import FashionMNISTDataModule

        data = FashionMNISTDataModule(data_dir="data", source_dirs=["../shared/data/FashionMNIST/raw"], download=False)
        data.prepare_data()
        data.setup("fit")
        return torch.stack([data.val_dataset[i][0] for i in range(count)])
    except Exception as error:  # noqa: BLE001 - timing does not depend on the pixel values
        print(f"(random probes: {error})")
        return torch.randn(count, 1, 28, 28)


def floor(model, probes, layers, modules):
    outputs = {}
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        for name in layers
    ]
    image = probes.clone().requires_grad_(True)
    model(image)
    for handle in handles:
        handle.remove()
    maps = []
    for index, name in enumerate(layers):
        out = outputs[name]
        h, w = out.shape[2:]
        (grad,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), image, retain_graph=index < len(layers) - 1)
        maps.append(grad)
    return maps


def naive(model, probes, layers, modules):
    maps = []
    for name in layers:
        attribution = NeuronGradient(model, modules[name])
        for n in range(len(probes)):

            def center(out):
                h, w = out.shape[2:]
                return out[:, :, h // 2, w // 2].sum(1)

            maps.append(attribution.attribute(probes[n : n + 1], neuron_selector=center))
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rf_callback.demos.cnns:SmallCNN")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")

    torch.manual_seed(0)
    model = import_object(args.model)().to(args.device).eval()
    probes = probe_images(args.probes).to(args.device)
    table = receptive_fields(model, tuple(probes.shape[1:]))
    layers = default_layers(model, table)
    modules = dict(model.named_modules())

    times = interleaved(
        {
            "ours": lambda: receptive_maps(model, probes, layers, fields=table),
            "with_trace": lambda: receptive_maps(model, probes, layers),
            "floor": lambda: floor(model, probes, layers, modules),
            "naive": lambda: naive(model, probes, layers, modules),
        },
        args.repeats,
    )
    ours, with_trace, base, slow = (times[k] for k in ("ours", "with_trace", "floor", "naive"))
    threads = torch.get_num_threads()
    print(
        f"{args.model} on {args.device} ({threads} threads), {len(probes)} probes x {len(layers)} layers:"
        f" {', '.join(layers)}"
    )
    print(f"{'method':44s} {'median ms':>10s} {'vs ours':>8s}")
    for label, seconds in [
        ("ours: receptive_maps (table given)", ours),
        ("ours + receptive_fields trace", with_trace),
        ("floor: 1 hooked forward + 1 grad per layer", base),
        ("naive: captum NeuronGradient per probe/layer", slow),
    ]:
        print(f"{label:44s} {seconds * 1e3:10.2f} {seconds / ours:7.2f}x")
    print(f"speed-up over naive: {slow / ours:.1f}x (target >= 10x); ours / floor: {ours / base:.2f} (target <= 1.25)")


if __name__ == "__main__":
    main()
