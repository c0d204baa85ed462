"""Every torchvision model builder through ``receptive_fields``: ok / refused (operation, module) / time ratio.

Classification models, segmentation models and the detection models' backbones (``model.backbone``)
are built with random weights (``weights=None, weights_backbone=None``), traced with ``strict=True``
and timed against one real forward pass (1 thread, medians of interleaved repeats). ``--check K``
also compares the boxes of K sampled output pixels (and the corners) of each segmentation model's and
backbone's outputs with the support of their input gradient, in float64: they must be equal.

    python benchmarks/builder_sweep.py [--groups classification segmentation detection] [--check 6]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torchvision
from timing import interleaved

from rf_callback import UnsupportedLayerError, receptive_fields
from rf_callback.table import OUTPUT_ROW
from rf_callback.tracing import flat_tensors

SIZES = {"ssd300_vgg16": 300}  # models that need a larger input than --size
GROUPS = {
    "classification": torchvision.models,
    "segmentation": torchvision.models.segmentation,
    "detection": torchvision.models.detection,
}


def build(group: str, name: str) -> torch.nn.Module:
    if group == "classification":
        return torchvision.models.get_model(name, weights=None).eval()
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    return (model.backbone if group == "detection" else model).eval()


def output_rows(table, model: torch.nn.Module) -> list[str]:
    """The rows of the model's own output tensors: ``(output)`` or the last module's ``name:k`` rows."""
    own = [key for key in table if key.split(":")[0] == OUTPUT_ROW]  # computed in the top-level forward
    if own:
        return own
    if any(key.startswith("fpn:") for key in table):  # a detection backbone: its feature pyramid
        return [key for key in table if key.startswith("fpn:")]
    last = list(table)[-1].split(":")[0].split("[")[0]
    return [key for key in table if key == last or key.startswith(f"{last}:")]


def check_boxes(model: torch.nn.Module, shape: tuple[int, ...], count: int, rng: random.Random) -> tuple[int, int]:
    """(units checked, units whose box differs from the bounding box of their nonzero input gradient)."""
    model = model.double().eval()
    table = receptive_fields(model, shape)
    rows = output_rows(table, model)
    modules = dict(model.named_modules())
    captured: dict[str, object] = {}
    hooks = []
    for key in {row.split(":")[0] for row in rows} - {OUTPUT_ROW}:
        hooks.append(modules[key].register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out)))
    image = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
    try:
        output = model(image)
    finally:
        for hook in hooks:
            hook.remove()
    checked = wrong = 0
    for key in rows:
        module, _, index = key.partition(":")
        tensors = flat_tensors(output if module == OUTPUT_ROW else captured[module])
        tensor, row = tensors[int(index or 0)], table[key]
        h, w = row.output_shape
        units = {(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0)}
        units |= {(rng.randrange(h), rng.randrange(w)) for _ in range(count)}
        for i, j in sorted(units):
            (grad,) = torch.autograd.grad(tensor[0, :, i, j].sum(), image, retain_graph=True)
            ys, xs = grad[0].abs().sum(0).nonzero(as_tuple=True)
            found = (ys.min().item(), xs.min().item(), ys.max().item() + 1, xs.max().item() + 1)
            checked += 1
            if row.box(i, j) != found:
                wrong += 1
                print(f"    WRONG {key} unit {(i, j)}: box {row.box(i, j)}, gradient support {found}")
    return checked, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", type=int, default=0, help="sampled output pixels per dense model to check")
    parser.add_argument("--check-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    counts = {"ok": 0, "refused": 0, "error": 0}
    ratios, checked, wrong = [], 0, 0
    print(
        f"{'group':15s} {'model':36s} {'result':8s} {'trace ms':>9s} {'fwd ms':>8s} {'ratio':>6s}  (1 thread, {args.size} px)"
    )
    for group, module in GROUPS.items():
        if group not in args.groups:
            continue
        for name in torchvision.models.list_models(module=module):
            side = max(args.size, SIZES.get(name, 0))
            shape = (3, side, side)
            image = torch.randn(1, *shape)
            try:
                model = build(group, name)
                with torch.no_grad():
                    model(image)  # the size must suit the model itself
            except Exception as error:  # noqa: BLE001 - a model that does not run here: say so, go on
                counts["error"] += 1
                print(f"{group:15s} {name:36s} {'error':8s} {type(error).__name__}: {str(error)[:70]}")
                continue
            try:
                start = time.perf_counter()
                receptive_fields(model, shape)
                first = time.perf_counter() - start
            except UnsupportedLayerError as refused:
                counts["refused"] += 1
                where = (
                    f"'{refused.module_name}' ({refused.module_type})" if refused.module_name else refused.module_type
                )
                print(f"{group:15s} {name:36s} {'refused':8s} {refused.operation} in {where}: {refused.reason[:60]}")
                continue
            with torch.no_grad():
                times = interleaved(
                    {
                        "trace": lambda m=model, s=shape: receptive_fields(m, s),
                        "forward": lambda m=model, x=image: m(x),
                    },
                    args.repeats,
                )
            ratio = times["trace"] / times["forward"]
            counts["ok"] += 1
            ratios.append(ratio)
            print(
                f"{group:15s} {name:36s} {'ok':8s} {times['trace'] * 1e3:9.1f} {times['forward'] * 1e3:8.1f}"
                f" {ratio:6.2f}  (first trace {first * 1e3:.0f} ms)",
                flush=True,
            )
            if args.check and group != "classification":
                side = max(args.check_size, SIZES.get(name, 0))
                size = (3, side, side)
                units, bad = check_boxes(model, size, args.check, rng)
                checked, wrong = checked + units, wrong + bad
                print(f"    boxes of {units} output pixels at {size} vs gradient support: {units - bad} equal")
    ratios.sort()
    median = ratios[len(ratios) // 2] if ratios else float("nan")
    print(
        f"\n{counts['ok']} ok, {counts['refused']} refused, {counts['error']} did not run at {args.size} px;"
        f" trace / forward: median {median:.2f}, max {max(ratios, default=float('nan')):.2f}"
    )
    if args.check:
        print(f"boxes checked against gradient support: {checked} output pixels, {wrong} wrong")


if __name__ == "__main__":
    main()
