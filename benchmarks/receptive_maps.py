"""How fast is ``receptive_maps``? Ours vs a plain training step, the floor and the naive way, side by side.

For each model, with the same probes and layers, timed in turn within each repeat (medians):

* plain: one forward + backward of the probes, ``model(x).sum().backward()`` in eval mode, the
  cost of one training step on them (parameter gradients included);
* floor: one plain forward of the probes with forward hooks on the layers, then one
  ``torch.autograd.grad`` per layer, written out plainly below;
* ours: ``receptive_maps(model, probes, layers, table=table)``, boxes and ERF statistics included;
* naive: one captum ``NeuronGradient`` call per probe per layer (how it is usually done).

Models: ``demo`` (SmallCNN on Fashion-MNIST probes, its 6 conv and pooling layers), ``resnet18``
and ``resnet50`` (torchvision, ``weights=None``, random 3x224x224 probes, one layer per resolution
stage: maxpool, layer1 ... layer4), or any ``module:Class`` (every conv and pooling layer).
Targets: ours at most 3x plain on real networks (the whole logging pass), at least 10x faster
than naive on the demo.

    python benchmarks/receptive_maps.py [--models demo resnet18 resnet50] [--probes 10] [--repeats 3]
        [--naive demo] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch
import torchvision
from captum.attr import NeuronGradient
from timing import interleaved

from rf_callback.cli import import_object
from rf_callback.saliency import receptive_maps
from rf_callback.selection import default_layers
from rf_callback.table import receptive_fields

STAGES = ["maxpool", "layer1", "layer2", "layer3", "layer4"]  # torchvision resnets: one layer per resolution stage


def probe_images(count: int) -> torch.Tensor:
    """Real Fashion-MNIST validation images when the data are at hand, else random ones."""
    try:
        from rf_callback.demos.fashion_mnist import FashionMNISTDataModule

        data = FashionMNISTDataModule(data_dir="data", source_dirs=["../shared/data/FashionMNIST/raw"], download=False)
        data.prepare_data()
        data.setup("fit")
        return torch.stack([data.val_dataset[i % len(data.val_dataset)][0] for i in range(count)])
    except Exception as error:  # noqa: BLE001 - timing does not depend on the pixel values
        print(f"(random probes: {error})")
        return torch.randn(count, 1, 28, 28)


def setup(name: str, count: int) -> tuple[torch.nn.Module, torch.Tensor, list[str] | None]:
    """The model in eval mode, ``count`` probes and the layers (None: every conv and pooling layer)."""
    torch.manual_seed(0)
    if name == "demo":  # its six conv and pooling layers, the comparison the captum target was set on
        model = import_object("rf_callback.demos.cnns:SmallCNN")().eval()
        six = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]
        return model, probe_images(count), six
    if name in ("resnet18", "resnet50"):
        probes = torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return getattr(torchvision.models, name)(weights=None).eval(), probes, STAGES
    return import_object(name)().eval(), probe_images(count), None


def plain(model, probes):
    image = probes.clone().requires_grad_(True)
    model(image).sum().backward()
    model.zero_grad(set_to_none=True)


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


def measure(name: str, count: int, repeats: int, with_naive: bool) -> dict[str, float | str | int]:
    model, probes, layers = setup(name, count)
    table = receptive_fields(model, tuple(probes.shape[1:]))
    layers = layers or default_layers(table)
    modules = dict(model.named_modules())
    functions = {
        "plain": lambda: plain(model, probes),
        "floor": lambda: floor(model, probes, layers, modules),
        "ours": lambda: receptive_maps(model, probes, layers, table=table),
    }
    if with_naive:
        functions["naive"] = lambda: naive(model, probes, layers, modules)
    times = interleaved(functions, repeats)
    return {"model": name, "probes": count, "layers": len(layers), **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18", "resnet50"])
    parser.add_argument("--probes", type=int, nargs="+", default=[10], help="probe counts to run each model at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive", nargs="*", default=["demo"], help="models to time the captum loop on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    torch.set_num_threads(args.threads)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s),")
    print(f"median of {args.repeats} interleaved repeats; ms")
    header = f"{'model':10s} {'probes x layers':>15s} {'plain':>9s} {'floor':>9s} {'ours':>9s}"
    print(header + f" {'ours/plain':>10s} {'ours/floor':>10s} {'naive':>9s} {'naive/ours':>10s}")
    for name in args.models:
        for count in args.probes:
            row = measure(name, count, args.repeats, name in args.naive)
            ours = row["ours"]
            naive_ms = f"{row['naive'] * 1e3:9.1f} {row['naive'] / ours:9.1f}x" if "naive" in row else ""
            shape = f"{count} x {row['layers']}"
            print(
                f"{name:10s} {shape:>15s} {row['plain'] * 1e3:9.1f} {row['floor'] * 1e3:9.1f}"
                f" {ours * 1e3:9.1f} {ours / row['plain']:9.2f}x {ours / row['floor']:9.2f}x {naive_ms}",
                flush=True,
            )


if __name__ == "__main__":
    main()
