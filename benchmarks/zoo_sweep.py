"""Sweep public model zoos with ``receptive_fields`` and check its boxes against gradient truth.

Not part of the test suite: it builds real torchvision and timm architectures (random weights, no
downloads) and takes minutes. For each model it records:

* the strict table: ok, refused (the operation and the module that ``UnsupportedLayerError`` names),
  a ``TraceError`` or a crash (any other exception: a bug of the engine);
* the lenient table (``strict=False``): its flagged rows, which must be there exactly when strict
  mode refuses, starting with the refusal strict mode names;
* the time of one table against one real forward pass (eval, one thread, medians);
* gradient truth on a *linearized twin* (float64, positive random weights scaled by fan-in, zero
  biases, unit running variances, max pooling replaced by average pooling, activation modules by the
  identity): for a sample of units, the bounding box of the nonzero gradient of the unit (its
  channels summed with random positive weights) with respect to a positive input must lie inside
  ``row.box(i, j)``, and equals it unless an activation called as a function cut a path.

    python benchmarks/zoo_sweep.py --limit 40                 # an evenly spaced sample of everything
    python benchmarks/zoo_sweep.py --models tv:resnet50 timm:maxvit_tiny_tf_224 seg:fcn_resnet50
    python benchmarks/zoo_sweep.py --sources timm --timm 'mobilenet*' --jsonl sweep.jsonl
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time
import traceback
import warnings
from typing import Any

import torch
import torchvision
from torch import nn

from rf_callback import TraceError, UnsupportedLayerError, receptive_fields
from rf_callback.table import OUTPUT_ROW

SOURCES = ("tv", "seg", "det", "timm")


# --------------------------------------------------------------------------------------------
# Which models, and how to build them
# --------------------------------------------------------------------------------------------


def catalogue(sources: list[str], timm_patterns: list[str]) -> list[str]:
    """Model names as ``source:name``, sorted within each source."""
    names = []
    if "tv" in sources:
        names += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    if "seg" in sources:
        names += [f"seg:{n}" for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    if "det" in sources:
        names += [f"det:{n}" for n in torchvision.models.list_models(module=torchvision.models.detection)]
    if "timm" in sources:
        import timm

        found = sorted({n for pattern in timm_patterns for n in timm.list_models(pattern)})
        names += [f"timm:{n}" for n in found]
    return names


def sample(names: list[str], limit: int | None) -> list[str]:
    """About ``limit`` names, shared fairly between the sources and evenly spaced within each (all without one)."""
    if not limit or limit >= len(names):
        return names
    sources = {name.partition(":")[0]: [] for name in names}
    for name in names:
        sources[name.partition(":")[0]].append(name)
    chosen, left = [], limit
    for k, group in enumerate(sorted(sources.values(), key=len)):  # small sources first; the rest share what is left
        quota = min(len(group), left // (len(sources) - k))
        chosen += [group[round(i * (len(group) - 1) / max(quota - 1, 1))] for i in range(quota)]
        left -= quota
    return chosen


def parameter_count(name: str, size: int | None, builder: Any = None) -> int | None:
    """The model's parameter count from a build on the meta device (no memory, no init), or None if that fails."""
    try:
        with torch.device("meta"):
            model, _ = (builder or build)(name, size)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def build(name: str, size: int | None) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model in eval mode with random weights, and the (C, H, W) it is traced at."""
    source, _, model_name = name.partition(":")
    shape = (3, size or 224, size or 224)
    if source == "tv":
        model = torchvision.models.get_model(model_name, weights=None)
    elif source == "seg":
        model = torchvision.models.get_model(model_name, weights=None, weights_backbone=None)
    elif source == "det":  # the detector's backbone: the part with a receptive field
        model = torchvision.models.get_model(model_name, weights=None, weights_backbone=None).backbone
    elif source == "timm":
        import timm

        model = timm.create_model(model_name, pretrained=False)
        if size is None:
            shape = tuple(model.pretrained_cfg.get("input_size", shape))
    else:
        raise ValueError(f"unknown source '{source}' in '{name}'; use one of {', '.join(SOURCES)}")
    return model.eval(), shape


# --------------------------------------------------------------------------------------------
# Gradient truth on a linearized twin
# --------------------------------------------------------------------------------------------


def linearized_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 copy in which gradients reach every path of a positive input.

    Activation modules become the identity (elementwise: the fields are the same): a ReLU after a
    normalization that centres its input, or a ``ReLU6`` that the twin's growing activations
    saturate, would cut paths. Activations called as functions inside ``forward`` stay.
    """
    twin = copy.deepcopy(model).double().eval()
    pools = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if _activation(child):
                setattr(parent, child_name, nn.Identity())
                continue
            average = pools.get(type(child))
            if average is None or child.return_indices:
                continue
            if set(child.dilation if isinstance(child.dilation, tuple) else (child.dilation,)) == {1}:
                pool = average(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode)
                setattr(parent, child_name, pool)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            if parameter.dim() > 1:
                fan_in = max(parameter[0].numel(), 1)
                parameter.copy_((0.5 + torch.rand(parameter.shape, generator=generator, dtype=torch.float64)) / fan_in)
            elif name.endswith("bias"):
                parameter.zero_()
            else:  # norm scales, layer scales: positive, unequal (equal ones cancel after a LayerNorm)
                parameter.copy_(0.75 + 0.5 * torch.rand(parameter.shape, generator=generator, dtype=torch.float64))
        for name, buffer in twin.named_buffers():
            if name.endswith("running_mean"):
                buffer.zero_()
            elif name.endswith("running_var"):
                buffer.fill_(1.0)
    return twin


ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
)  # fmt: skip


def _activation(module: nn.Module) -> bool:
    """Whether ``module`` is an elementwise activation: PyTorch's, or a library's own class (``GELUActivation``,
    timm's ``Swish``) holding no parameters, buffers or submodules."""
    if isinstance(module, ACTIVATIONS):
        return True
    bare = not module._parameters and not module._buffers and not module._modules
    name = type(module).__name__
    return bare and (name.endswith("Activation") or name in {"Swish", "HardSwish", "HardMish", "GELUTanh", "QuickGELU"})


def _picks(extent: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Corner, centre and edge units of an output of ``extent`` positions (any number of axes), without repeats.

    For images: ``(0, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w - 1), (h - 1, 0), (h // 2, 0), (0, w // 2)``.
    """
    first, last, middle = (0,) * len(extent), tuple(n - 1 for n in extent), tuple(n // 2 for n in extent)
    inner = (0,) * (len(extent) - 1)
    picks = [first, last, middle, (*inner, extent[-1] - 1), (extent[0] - 1, *inner), (extent[0] // 2, *inner)]
    return list(dict.fromkeys([*picks, (*inner, extent[-1] // 2)]))


def _outputs_of(model: nn.Module, names: list[str], image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output tensors of the named rows (module names, or ``(output)``) in one forward of ``image``."""
    modules = dict(model.named_modules())
    found: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: found.__setitem__(n, out))
        for n in names
        if n != OUTPUT_ROW
    ]
    try:
        output = model(image)
    finally:
        for handle in handles:
            handle.remove()
    if OUTPUT_ROW in names:
        found[OUTPUT_ROW] = output
    return {n: t for n, t in found.items() if isinstance(t, torch.Tensor)}


def gradient_check(model: nn.Module, table, shape: tuple[int, ...], units: int, rows: int) -> dict[str, Any]:
    """Compare boxes with the support of the gradient on the linearized twin, one unit per backward."""
    candidates = [
        r
        for r in table.values()
        if r.supported and "[" not in r.name and ":" not in r.name and len(r.output_shape) == len(shape) - 1
    ]
    dims = len(shape) - 1
    if not candidates:
        return {"units": 0}
    step = max(len(candidates) // rows, 1)
    chosen = candidates[::step][: rows - 1] + [candidates[-1]]
    twin = linearized_twin(model)
    generator = torch.Generator().manual_seed(1)
    image = (0.5 + 0.5 * torch.rand((1, *shape), generator=generator, dtype=torch.float64)).requires_grad_()
    outputs = _outputs_of(twin, [r.name for r in chosen], image)
    result: dict[str, Any] = collections.Counter()
    violations = []
    per_row = max(units // len(chosen), 1)
    for row in chosen:
        output = outputs.get(row.name)
        if output is None:
            continue
        if row.placement is None or output.dim() != len(row.tensor_shape):  # windows: no grid to index
            result["unclear layout"] += 1
            continue
        grid = row.placement.view(output)  # (N, C, *positions), whatever the layout: channels last, tokens
        for unit in _picks(row.output_shape)[:per_row]:
            channels = grid[(0, slice(None), *unit)]
            # Channels weighed at random (positive): their plain sum is a constant after a softmax over them
            # (attention probabilities) or a LayerNorm with a uniform scale, whose gradient is then zero.
            weights = 0.5 + torch.rand(channels.shape, generator=generator, dtype=channels.dtype)
            (grad,) = torch.autograd.grad((channels * weights).sum(), image, retain_graph=True)
            support = grad[0].abs().sum(0).nonzero()
            box = row.box(*unit)
            result["units"] += 1
            if support.numel() == 0:
                empty = all(box[a] == box[a + dims] for a in range(dims))  # a unit that sees only padding agrees
                result["inside" if empty else "empty support"] += 1
                result["equal"] += empty
                continue
            found = (*support.min(0).values.tolist(), *(support.max(0).values + 1).tolist())
            inside = all(box[a] <= found[a] and found[a + dims] <= box[a + dims] for a in range(dims))
            result["inside"] += inside
            result["equal"] += found == box
            if found != box:
                kind = "OUTSIDE" if not inside else "smaller"
                violations.append(f"{kind} {row.name} {unit}: box {box}, gradient support {found}")
    return dict(result, violations=violations)


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def _median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_one(name: str, args: argparse.Namespace, builder: Any = None) -> dict[str, Any]:
    """One model's record; ``builder(name, size) -> (model, shape)`` builds it (default: :func:`build`)."""
    record: dict[str, Any] = {"model": name}
    count = parameter_count(name, args.size, builder)
    if count is not None and count > args.max_build_parameters:
        return record | {"status": "skipped", "error": f"{count / 1e6:.0f}M parameters (--max-build-parameters)"}
    try:
        model, shape = (builder or build)(name, args.size)
    except Exception as error:
        return record | {"status": "build failed", "error": f"{type(error).__name__}: {str(error)[:120]}"}
    record["shape"] = list(shape)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    strict_error = None
    try:
        receptive_fields(model, shape)
        record["status"] = "ok"
    except UnsupportedLayerError as error:
        strict_error = error
        record |= {"status": "refused", "operation": error.operation, "module": error.module_name}
        record["module_type"] = error.module_type
    except TraceError as error:
        return record | {"status": "trace error", "error": str(error)[:300]}
    except Exception as error:  # a crash of the engine itself
        return record | {"status": "crash", "error": "".join(traceback.format_exception_only(error)).strip()[:300]}
    try:
        table = receptive_fields(model, shape, strict=False)
    except Exception as error:
        return record | {"status": "crash", "error": f"strict=False: {type(error).__name__}: {str(error)[:200]}"}
    flagged = table.unsupported
    record |= {"rows": len(table), "flagged": len(flagged)}
    first = flagged[0].unsupported if flagged else None
    same = (strict_error is None) == (first is None) and (
        first is None or (first.operation, first.module_name) == (strict_error.operation, strict_error.module_name)
    )
    record["strict agrees"] = same
    if args.repeats:
        torch.set_grad_enabled(False)
        image = torch.randn((1, *shape))
        trace = _median_seconds(lambda: receptive_fields(model, shape, strict=False), args.repeats)
        forward = _median_seconds(lambda: model(image), args.repeats)
        torch.set_grad_enabled(True)
        record |= {"trace ms": trace * 1e3, "forward ms": forward * 1e3, "ratio": trace / forward}
    if args.units and record["parameters"] <= args.max_parameters:
        try:
            record["gradient"] = gradient_check(model, table, shape, args.units, args.rows)
        except Exception as error:
            record["gradient"] = {"error": f"{type(error).__name__}: {str(error)[:150]}"}
    return record


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def line(record: dict[str, Any]) -> str:
    parts = [f"{record['model']:42s} {record['status']:12s}"]
    if "rows" in record:
        parts.append(f"rows {record['rows']:4d} flagged {record['flagged']:4d}")
    if "ratio" in record:
        parts.append(f"x{record['ratio']:5.2f}")
    gradient = record.get("gradient", {})
    if gradient.get("units"):
        inside, equal = gradient.get("inside", 0), gradient.get("equal", 0)
        parts.append(f"units {gradient['units']:3d} inside {inside:3d} equal {equal:3d}")
    if record["status"] == "refused":
        parts.append(f"{record['operation']} in '{record['module']}' ({record['module_type']})")
    if "error" in record:
        parts.append(record["error"].splitlines()[0][:100])
    if not record.get("strict agrees", True):
        parts.append("STRICT/LENIENT DISAGREE")
    return "  ".join(parts)


def summary(records: list[dict[str, Any]]) -> str:
    status = collections.Counter(r["status"] for r in records)
    lines = [f"\n{len(records)} models: " + ", ".join(f"{n} {s}" for s, n in status.most_common())]
    refusals = collections.Counter(r["operation"] for r in records if r["status"] == "refused")
    if refusals:
        lines.append("refused at: " + ", ".join(f"{op} ({n})" for op, n in refusals.most_common()))
    disagree = [r["model"] for r in records if r.get("strict agrees") is False]
    lines.append(f"strict and lenient disagree on {len(disagree)} models: {', '.join(disagree) or '-'}")
    for kind in ("crash", "trace error", "build failed", "skipped"):
        for r in records:
            if r["status"] == kind:
                lines.append(f"{kind}: {r['model']}: {r['error'].splitlines()[0][:150]}")
    ratios = [r["ratio"] for r in records if "ratio" in r]
    if ratios:
        slow = sorted((r for r in records if r.get("ratio", 0) > 1), key=lambda r: -r["ratio"])
        lines.append(
            f"table / forward: median {statistics.median(ratios):.2f}, max {max(ratios):.2f};"
            f" {len(slow)} of {len(ratios)} above 1: " + ", ".join(f"{r['model']} {r['ratio']:.1f}" for r in slow[:10])
        )
    gradients = [r["gradient"] for r in records if r.get("gradient", {}).get("units")]
    units = sum(g["units"] for g in gradients)
    inside = sum(g.get("inside", 0) for g in gradients)
    equal = sum(g.get("equal", 0) for g in gradients)
    empty = sum(g.get("empty support", 0) for g in gradients)
    lines.append(
        f"gradient truth: {units} units in {len(gradients)} models; support inside the box: {inside};"
        f" equal to it: {equal}; empty support: {empty}; outside: {units - inside - empty}"
    )
    for r in records:
        for violation in r.get("gradient", {}).get("violations", []):
            lines.append(f"  {r['model']}: {violation}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="source:name (sources: tv, seg, det, timm)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--timm", nargs="+", default=["*"], help="timm.list_models patterns (default: all)")
    parser.add_argument("--limit", type=int, help="an evenly spaced sample of this many models")
    parser.add_argument("--size", type=int, help="input height and width (default: 224, timm: the model's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (0: no timing)")
    parser.add_argument("--units", type=int, default=12, help="units checked against the gradient per model (0: none)")
    parser.add_argument("--rows", type=int, default=4, help="rows those units are spread over")
    parser.add_argument("--max-parameters", type=float, default=60e6, help="skip the gradient check above this")
    parser.add_argument("--max-build-parameters", type=float, default=150e6, help="skip models above this")
    parser.add_argument("--jsonl", help="also write one JSON record per model to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    names = args.models or sample(catalogue(args.sources, args.timm), args.limit)
    records = []
    print(f"{len(names)} models, 1 thread, torch {torch.__version__}, torchvision {torchvision.__version__}")
    for name in names:
        records.append(run_one(name, lambda name: sweep_one(name, args), args.jsonl))
    print(summary(records))


def run_one(name: str, sweep: Any, jsonl: str | None, describe: Any = line) -> dict[str, Any]:
    """``sweep(name)``'s record, timed, printed as ``describe(record)`` and appended to ``jsonl`` if given."""
    start = time.perf_counter()
    record = sweep(name)
    record["seconds"] = time.perf_counter() - start
    print(describe(record), flush=True)
    if jsonl:
        with open(jsonl, "a") as stream:
            stream.write(json.dumps(record, default=str) + "\n")
    return record


if __name__ == "__main__":
    main()
