"""Sweep public model zoos with ``receptive_fields`` and check its boxes against gradient truth.

Not part of the test suite: it builds real torchvision and timm architectures (random weights, no
downloads) and takes minutes. For each model it records:

* the strict table: ok, refused (the operation and the module that ``UnsupportedLayerError`` names),
  a ``TraceError`` or a crash (any other exception: a bug of the engine);
* the lenient table (``strict=False``): its flagged rows, which must be there exactly when strict
  mode refuses, starting with the refusal strict mode names;
* the time of one table against one real forward pass (eval, one thread, medians);
* gradient truth on a *linearized twin* (float64, positive random weights scaled by fan-in, zero
  biases, unit running variances, run under ``GradientEverywhere``: max pooling averaged, elementwise
  activations as the identity, gates as softsign curves): for a sample of units (signals, images and
  volumes alike), the bounding box of the nonzero gradient of the unit (its elements weighed at random)
  with respect to a positive input must equal ``row.box(...)``.

Another catalogue reuses all of it with its own ``builder`` (``benchmarks/external_sweep.py``).

    python benchmarks/zoo_sweep.py --limit 40                 # an evenly spaced sample of everything
    python benchmarks/zoo_sweep.py --models tv:resnet50 timm:maxvit_tiny_tf_224 seg:fcn_resnet50
    python benchmarks/zoo_sweep.py --sources timm --timm 'mobilenet*' --jsonl sweep.jsonl
"""

from __future__ import annotations

import argparse
import collections
import copy
import fnmatch
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import pathlib
import resource
import statistics
import subprocess
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from rf_callback import TraceError, UnsupportedLayerError, receptive_fields
from rf_callback.table import OUTPUT_ROW, LayerRF
from rf_callback.tracing import element_positions

SOURCES = ("tv", "seg", "det", "timm")
Builder = Callable[[str, int | None], tuple[nn.Module, tuple[int, ...]]]  # (name, size) -> (model, shape)
Sweep = Callable[[str, argparse.Namespace, "dict[str, Any] | None"], dict[str, Any]]  # (name, args, previous) -> record


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


def meta_build(name: str, size: int | None, builder: Builder = build) -> tuple[nn.Module, tuple[int, ...]] | None:
    """The model ``builder`` makes, built on the meta device (no memory, no initialization), or None where that
    fails."""
    try:
        with torch.device("meta"):
            return builder(name, size)
    except Exception:  # noqa: BLE001  (any model that cannot be built on the meta device)
        return None


# --------------------------------------------------------------------------------------------
# Gradient truth on a linearized twin
# --------------------------------------------------------------------------------------------


def linearized_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 copy with positive weights and small positive biases (run it under :class:`GradientEverywhere`), so
    that a positive input's gradient reaches every path. Biases are not zero: a query made of padding is then its
    bias, as in the real model, and its attention depends on the keys of its window (zero, it depended on nothing:
    SwinUNETR's padded windows read as units with no gradient)."""
    twin = copy.deepcopy(model).double().eval()
    pools = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
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
                parameter.copy_(0.1 + 0.1 * torch.rand(parameter.shape, generator=generator, dtype=torch.float64))
            else:  # norm scales, layer scales: positive, unequal (equal ones cancel after a LayerNorm)
                parameter.copy_(0.75 + 0.5 * torch.rand(parameter.shape, generator=generator, dtype=torch.float64))
        for name, buffer in twin.named_buffers():
            if name.endswith("running_mean"):
                buffer.zero_()
            elif name.endswith("running_var"):
                buffer.fill_(1.0)
    return twin


def _gentle_softmax(x: torch.Tensor, dim: int, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A softmax of scores scaled into [-1, 1]: the same dependencies, and no weight that rounds to zero."""
    finite = torch.isfinite(x)
    scale = x.detach().masked_fill(~finite, 0).abs().amax().clamp(min=1.0)
    return torch.softmax(x / scale, dim, dtype=kwargs.get("dtype"))


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """``F.scaled_dot_product_attention`` written out, with :func:`_gentle_softmax`."""
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return _gentle_softmax(scores, -1) @ value


def _mean_pool(pool: Any) -> Any:
    """``F.max_poolNd`` as the average pool of the same windows (the same inputs, each with a gradient)."""

    def pooled(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        if return_indices or set(dilation if isinstance(dilation, (tuple, list)) else (dilation,)) != {1}:
            return NotImplemented
        return pool(x, kernel_size, stride if stride else kernel_size, padding, ceil_mode)

    return pooled


def _adaptive_mean(pool: Any) -> Any:
    """``F.adaptive_max_poolNd`` as the adaptive average pool of the same windows."""

    def pooled(x, output_size, return_indices=False):
        return NotImplemented if return_indices else pool(x, output_size)

    return pooled


def _batch_norm_affine(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """An eval-mode ``F.batch_norm`` written as its per-channel affine map. torch 2.14.1's CPU kernel misreads a
    gradient of batch 1 whose strides look channels-last (a token layout's ``flatten(2).transpose(1, 2)`` after the
    norm, as in LeViT and CvT): it put the gradient of one token on the pixels of half the image.

    Example::
        >>> bn = nn.BatchNorm2d(2).eval()
        >>> x = torch.rand(1, 2, 3, 3)
        >>> torch.allclose(_batch_norm_affine(x, bn.running_mean, bn.running_var, bn.weight, bn.bias), bn(x))
        True
    """
    if training or running_mean is None:
        return NotImplemented
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = (running_var + eps).rsqrt() * (1 if weight is None else weight)
    return (x - running_mean.reshape(shape)) * scale.reshape(shape) + (0 if bias is None else bias.reshape(shape))


def _mean_over(x, dim=None, keepdim=False, *args, **kwargs):
    """``amax`` / ``max(dim)`` as a mean over the same positions."""
    if dim is None or isinstance(dim, torch.Tensor):
        return NotImplemented
    values = x.mean(dim, keepdim=keepdim)
    if kwargs.get("_values_only", True):
        return values
    return torch.return_types.max((values, x.argmax(dim, keepdim=keepdim)))


class GradientEverywhere(TorchFunctionMode):
    """Runs the twin with the functions whose gradient can be exactly zero on a path replaced by ones with the same
    inputs and a gradient everywhere: eval-mode batch norms as their affine maps, sigmoids and tanh by softsign
    curves of the same range (gates stay near one half: the identity would multiply small values into nothing),
    the other elementwise activations (ReLU,
    ReLU6, GELU, SiLU, PReLU, ...: after a normalization that centres its input, or saturated by the twin's
    growing values, they cut paths) by the identity, modules and functions alike (an elementwise function
    changes no field), softmax by one of scores scaled into [-1, 1], max pooling and ``amax`` by averages, and
    weights left unstandardized (NF-Nets' convolutions standardize theirs, which makes half of them negative). A
    pixel with a path to a unit then has a nonzero gradient (positive weights and inputs), and the box is
    testable."""

    IDENTITY: ClassVar = {
        *(F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.Tensor.relu_, F.relu6, F.hardtanh, F.hardtanh_),
        *(F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.rrelu_, F.threshold, F.threshold_),
        *(F.elu, F.elu_, F.selu, F.selu_, F.celu, F.celu_, F.gelu, F.silu, F.mish, F.hardswish, F.softplus),
    }
    SIGMOID: ClassVar = {torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, F.hardsigmoid}
    TANH: ClassVar = {torch.tanh, torch.Tensor.tanh, F.tanh}
    SOFTMAX: ClassVar = {torch.softmax, torch.Tensor.softmax, F.softmax}
    POOLS: ClassVar = {
        F.max_pool1d: _mean_pool(F.avg_pool1d),
        F.max_pool2d: _mean_pool(F.avg_pool2d),
        F.max_pool3d: _mean_pool(F.avg_pool3d),
        F.adaptive_max_pool1d: _adaptive_mean(F.adaptive_avg_pool1d),
        F.adaptive_max_pool2d: _adaptive_mean(F.adaptive_avg_pool2d),
        F.adaptive_max_pool3d: _adaptive_mean(F.adaptive_avg_pool3d),
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and kwargs.get("training", len(args) > 5 and args[5]) and args[1] is None:
            return args[0]  # batch statistics in the eval-mode twin: weight standardization (ScaledStdConv2d)
        if func is F.batch_norm:
            result = _batch_norm_affine(*args, **kwargs)
            if result is not NotImplemented:
                return result
        if func in self.IDENTITY:
            return args[0]
        if func in self.SIGMOID or func in self.TANH:
            x = args[0]
            softsign = x / (1 + x.abs())
            return 0.5 + 0.5 * softsign if func in self.SIGMOID else softsign
        if func in self.SOFTMAX:
            return _gentle_softmax(*args, **kwargs)
        if func is F.scaled_dot_product_attention and not kwargs.get("enable_gqa"):
            return _attention(*args, **kwargs)
        replacement = self.POOLS.get(func)
        if func in (torch.amax, torch.Tensor.amax):
            replacement = _mean_over
        elif func in (torch.max, torch.Tensor.max) and (len(args) > 1 and isinstance(args[1], int) or "dim" in kwargs):
            replacement = functools.partial(_mean_over, _values_only=False)
        if replacement is not None:
            result = replacement(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)


def _outputs_of(model: nn.Module, names: list[str], image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output tensors of the named rows (module names, ``name[k]`` for a module's k-th call, or ``(output)``)
    in one forward of ``image``."""
    modules = dict(model.named_modules())
    calls: dict[str, list[Any]] = collections.defaultdict(list)
    wanted = {name.split("[")[0] for name in names} - {OUTPUT_ROW}
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: calls[n].append(out)) for n in wanted if n in modules
    ]
    try:
        output = model(image)
    finally:
        for handle in handles:
            handle.remove()
    found: dict[str, Any] = {OUTPUT_ROW: output}
    for name in names:
        module, _, call = name.partition("[")
        made = calls.get(module, [])
        index = int(call.rstrip("]")) if call else 0
        if index < len(made) and (call or len(made) == 1):
            found[name] = made[index]
    return {n: found[n] for n in names if isinstance(found.get(n), torch.Tensor)}


def _support(value: torch.Tensor, image: torch.Tensor) -> tuple[int, ...] | None:
    """The bounding box ``(top, left, ..., bottom, right, ...)`` of the pixels where ``value``'s gradient is nonzero."""
    (grad,) = torch.autograd.grad(value, image, retain_graph=True)
    support = grad[0].abs().sum(0).nonzero()
    if support.numel() == 0:
        return None
    return (*support.min(0).values.tolist(), *(support.max(0).values + 1).tolist())


def _verdict(box: tuple[int, ...], found: tuple[int, ...] | None) -> str:
    """``equal``, ``larger`` (the box holds pixels without a gradient), ``smaller`` (the gradient reaches pixels
    outside the box: a wrong box) or ``empty`` (no gradient at all, where the box holds pixels). A unit that sees
    only padding has an empty box (along some axis) and no gradient: they agree.

    Example::
        >>> _verdict((0, 1, 0, 1), None), _verdict((0, 0, 2, 3), None), _verdict((0, 0, 2, 3), (0, 1, 2, 3))
        ('equal', 'empty', 'larger')
    """
    half = len(box) // 2
    if found is None:
        return "equal" if any(box[a] == box[a + half] for a in range(half)) else "empty"
    if found == box:
        return "equal"
    inside = all(box[a] <= found[a] and found[a + half] <= box[a + half] for a in range(half))
    return "larger" if inside else "smaller"


def _picks(extent: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Corner, centre and edge units of an output of ``extent`` positions (signals, images, volumes), no repeats.

    Example::
        >>> _picks((4, 6))  # first, last, centre, then the ends and middle of the first row and column
        [(0, 0), (3, 5), (2, 3), (0, 5), (3, 0), (2, 0), (0, 3)]
        >>> _picks((5,))
        [(0,), (4,), (2,)]
    """
    first, last, middle = (0,) * len(extent), tuple(n - 1 for n in extent), tuple(n // 2 for n in extent)
    inner = (0,) * (len(extent) - 1)
    edges = [(*inner, extent[-1] - 1), (extent[0] - 1, *inner), (extent[0] // 2, *inner), (*inner, extent[-1] // 2)]
    return list(dict.fromkeys([first, last, middle, *edges]))


def choose_rows(
    table, axes: int, rows: int, global_rows: int, match: str | None = None
) -> tuple[list[LayerRF], list[LayerRF]]:
    """Rows to check: ``rows`` evenly spaced local ones (the last row among them), and up to ``global_rows``
    rows where the table first calls a path global (a global row right after a local one), evenly spaced.
    ``rows=0``: every local row and every global one. ``match``: only rows whose names match this pattern."""
    candidates = [
        r
        for r in table.values()
        if r.supported and ":" not in r.name and r.layout is not None and len(r.output_shape) == axes
        if match is None or fnmatch.fnmatchcase(r.name, match)
    ]
    local = [r for r in candidates if not r.is_global]
    if not rows:
        return local, [r for r in candidates if r.is_global]
    chosen = local[:: max(len(local) // max(rows - 1, 1), 1)][: rows - 1] if rows > 1 else []
    if candidates and not candidates[-1].is_global and candidates[-1] not in chosen:
        chosen.append(candidates[-1])
    transitions = [r for previous, r in itertools.pairwise(candidates) if r.is_global and not previous.is_global]
    if candidates and candidates[0].is_global:
        transitions.insert(0, candidates[0])
    if candidates and candidates[-1].is_global and candidates[-1] not in transitions:
        transitions.append(candidates[-1])
    step = max(len(transitions) / max(global_rows, 1), 1)
    spread = [transitions[int(k * step)] for k in range(min(global_rows, len(transitions)))]
    return chosen, spread


def gradient_check(
    model: nn.Module,
    table,
    shape: tuple[int, ...],
    units: int,
    rows: int,
    global_rows: int = 4,
    per_global: int = 3,
    match: str | None = None,
) -> dict[str, Any]:
    """Compare boxes with the support of the gradient on the linearized twin, one unit per backward.

    A unit is every element at its position (``element_positions`` of the row's layout: tokens,
    channels-last and window layouts alike), its channels summed; ``per_global`` units of each row
    where a path first becomes global, whose units must each see the whole image (the sum of a
    whole output, as this sweep once checked global rows, sees everything even where each unit
    sees one mask unit).
    """
    axes = len(shape) - 1
    local, spread = choose_rows(table, axes, rows, global_rows, match)
    if not local and not spread:
        return {"units": 0}
    twin = linearized_twin(model)
    generator = torch.Generator().manual_seed(1)
    image = (0.5 + 0.5 * torch.rand((1, *shape), generator=generator, dtype=torch.float64)).requires_grad_()
    with GradientEverywhere():
        outputs = _outputs_of(twin, [r.name for r in local + spread], image)
    result: dict[str, Any] = collections.Counter()
    weights = torch.Generator().manual_seed(2)  # a unit's elements mixed with unequal weights: normalized
    # rows (an attention map's, a LayerNorm's channels) sum to a constant, whose gradient is zero
    wrong = []
    per_row = units if not rows else max(units // max(len(local), 1), 1)  # every row: units per row
    for row in local + spread:
        output = outputs.get(row.name)
        if output is None or tuple(output.shape) != tuple(row.tensor_shape):
            result["row not found"] += 1
            continue
        positions = element_positions(row.layout, row.tensor_shape, axes)
        kind = "global unit" if row.is_global else "unit"
        checks = []
        for unit in _picks(row.output_shape)[: per_global if row.is_global else per_row]:
            where = (positions == torch.tensor(unit).reshape(-1, *([1] * output.dim()))).all(0)
            if where.any():
                checks.append(
                    ((output[where] * (0.5 + torch.rand(int(where.sum()), generator=weights))).sum(), unit, kind)
                )
        for value, unit, kind in checks:
            box, found = row.box(*unit), _support(value, image)
            verdict = _verdict(box, found)
            result["units"] += 1
            result["global units"] += kind == "global unit"
            result[verdict] += 1
            if verdict != "equal":
                wrong.append(f"{verdict}: {row.name} {kind} {unit}: box {box}, gradient support {found}")
    return dict(result, wrong=wrong[:20])


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


def fingerprint(table) -> str:
    """A digest of what the table says (geometry, refusals, boxes of the corners and centre of every row)."""
    digest = hashlib.sha1()
    for row in table.values():
        digest.update(repr((row.name, row.output_shape, row.unsupported and row.unsupported.cause)).encode())
        if row.supported:
            corners = {tuple(0 for _ in row.output_shape), tuple(n - 1 for n in row.output_shape)}
            corners.add(tuple(n // 2 for n in row.output_shape))
            digest.update(repr((row.field.rfs, row.is_global, [row.box(*u) for u in sorted(corners)])).encode())
    return digest.hexdigest()[:16]


def trace(name: str, model: nn.Module, shape: tuple[int, ...]) -> tuple[dict[str, Any], Any]:
    """The strict and lenient tables: the record's status, rows, flags and fingerprint, and the lenient table."""
    record: dict[str, Any] = {}
    strict_error = None
    try:
        receptive_fields(model, shape)
        record["status"] = "ok"
    except UnsupportedLayerError as error:
        strict_error = error
        record |= {"status": "refused", "operation": error.operation, "module": error.module_name}
        record |= {"module_type": error.module_type, "reason": error.cause}
    except TraceError as error:
        return record | {"status": "trace error", "error": str(error)[:300]}, None
    except Exception as error:  # noqa: BLE001  (a crash of the engine itself: recorded)
        return record | {
            "status": "crash",
            "error": "".join(traceback.format_exception_only(error)).strip()[:300],
        }, None
    try:
        table = receptive_fields(model, shape, strict=False)
    except Exception as error:  # noqa: BLE001
        return record | {"status": "crash", "error": f"strict=False: {type(error).__name__}: {str(error)[:200]}"}, None
    flagged = table.unsupported
    record |= {"rows": len(table), "flagged": len(flagged), "fingerprint": fingerprint(table)}
    record["global rows"] = sum(1 for row in table.values() if row.supported and row.is_global)
    first = flagged[0].unsupported if flagged else None
    same = (strict_error is None) == (first is None) and (
        first is None or (first.operation, first.module_name) == (strict_error.operation, strict_error.module_name)
    )
    record["strict agrees"] = same
    return record, table


def sweep_one(
    name: str, args: argparse.Namespace, previous: dict[str, Any] | None = None, builder: Builder = build
) -> dict[str, Any]:
    """One model's record, the model made by ``builder`` (:func:`build` for the zoos here; another script's own
    catalogue). With the record of an earlier run (``--recheck``), a model whose table is the same (its
    fingerprint, traced from a build on the meta device when the model can be built there) keeps it."""
    record: dict[str, Any] = {"model": name}
    meta = meta_build(name, args.size, builder)
    count = None if meta is None else sum(p.numel() for p in meta[0].parameters())
    if count is not None and count > args.max_build_parameters:
        return record | {"status": "skipped", "error": f"{count / 1e6:.0f}M parameters (--max-build-parameters)"}
    if previous is not None and previous.get("fingerprint") and meta is not None:
        again, _ = trace(name, *meta)
        if again.get("fingerprint") == previous["fingerprint"] and again["status"] == previous["status"]:
            return previous | {"same table as": previous.get("code"), "strict agrees": again["strict agrees"]}
    checked = args.units and count is not None and count <= args.max_parameters
    if meta is not None and not args.repeats and not (checked and math.prod(meta[1][1:]) <= args.max_pixels):
        model, shape = meta  # no weights needed: the table is traced on the meta device anyway
    else:
        try:
            model, shape = builder(name, args.size)
        except Exception as error:  # noqa: BLE001
            return record | {"status": "build failed", "error": f"{type(error).__name__}: {str(error)[:120]}"}
    record["shape"] = list(shape)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    traced, table = trace(name, model, shape)
    record |= traced
    if table is None:
        return record
    if args.repeats:
        torch.set_grad_enabled(False)
        image = torch.randn((1, *shape))
        ms = _median_seconds(lambda: receptive_fields(model, shape, strict=False), args.repeats)
        forward = _median_seconds(lambda: model(image), args.repeats)
        torch.set_grad_enabled(True)
        record |= {"trace ms": ms * 1e3, "forward ms": forward * 1e3, "ratio": ms / forward}
    if not args.units:
        return record
    if record["parameters"] > args.max_parameters:
        record["gradient"] = {"skipped": f"{record['parameters'] / 1e6:.0f}M parameters (--max-parameters)"}
    elif math.prod(shape[1:]) > args.max_pixels:
        record["gradient"] = {"skipped": f"input {'x'.join(map(str, shape[1:]))} (--max-pixels)"}
    else:
        try:
            record["gradient"] = gradient_check(
                model, table, shape, args.units, args.rows, args.global_rows, args.global_units, args.match
            )
        except Exception as error:  # noqa: BLE001
            record["gradient"] = {"error": f"{type(error).__name__}: {str(error)[:150]}"}
    return record


# --------------------------------------------------------------------------------------------
# A worker process per batch of models: a model that hangs or runs out of memory costs one record
# --------------------------------------------------------------------------------------------


def _worker(connection, args: argparse.Namespace, sweep: Sweep) -> None:
    if args.max_memory_gb:
        limit = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    while True:
        task = connection.recv()
        if task is None:
            return
        name, previous = task
        start = time.perf_counter()
        try:
            record = sweep(name, args, previous)
        except MemoryError:
            record = {
                "model": name,
                "status": "skipped",
                "error": f"out of memory (--max-memory-gb {args.max_memory_gb})",
            }
        except Exception as error:  # noqa: BLE001
            record = {"model": name, "status": "crash", "error": f"sweep: {type(error).__name__}: {str(error)[:200]}"}
        record["seconds"] = round(time.perf_counter() - start, 1)
        connection.send(record)


class Workers:
    """Runs ``sweep`` (a module-level function: the child imports it) in a child process, restarted after
    ``recycle`` models, a timeout or a death."""

    def __init__(self, args: argparse.Namespace, sweep: Sweep = sweep_one) -> None:
        self.args, self.sweep, self.process, self.connection, self.done = args, sweep, None, None, 0
        self.context = multiprocessing.get_context("spawn")

    def _start(self) -> None:
        self.connection, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child, self.args, self.sweep), daemon=True)
        self.process.start()
        self.done = 0

    def stop(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                try:
                    self.connection.send(None)
                    self.process.join(10)
                except OSError:
                    pass
            if self.process.is_alive():
                self.process.kill()
            self.process.join()
            self.process = None

    def run(self, name: str, previous: dict[str, Any] | None) -> dict[str, Any]:
        if self.process is None or self.done >= self.args.recycle:
            self.stop()
            self._start()
        self.done += 1
        self.connection.send((name, previous))
        if self.connection.poll(self.args.timeout):
            try:
                return self.connection.recv()
            except EOFError:
                pass
            self.stop()
            return {"model": name, "status": "skipped", "error": "the worker died (out of memory, most likely)"}
        self.stop()
        if self.connection.poll(0):  # it died before the timeout
            return {"model": name, "status": "skipped", "error": "the worker died (out of memory, most likely)"}
        return {"model": name, "status": "skipped", "error": f"over {self.args.timeout:.0f} s (--timeout)"}


def code_version() -> str:
    """The commit the sweep runs on, ``+`` when the working tree differs from it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, check=False
        )
        return commit.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


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
        counts = " ".join(f"{kind} {gradient.get(kind, 0)}" for kind in VERDICTS)
        parts.append(f"units {gradient['units']:3d} ({gradient.get('global units', 0)} global): {counts}")
    elif "skipped" in gradient or "error" in gradient:
        parts.append(f"gradient: {gradient.get('skipped') or gradient.get('error')}")
    if record["status"] == "refused":
        parts.append(f"{record['operation']} in '{record['module']}' ({record['module_type']})")
    if "error" in record:
        parts.append(record["error"].splitlines()[0][:100])
    if not record.get("strict agrees", True):
        parts.append("STRICT/LENIENT DISAGREE")
    return "  ".join(parts)


VERDICTS = ("equal", "larger", "smaller", "empty")


def summary(records: list[dict[str, Any]]) -> str:
    status = collections.Counter(r["status"] for r in records)
    lines = [f"\n{len(records)} models: " + ", ".join(f"{n} {s}" for s, n in status.most_common())]
    refusals = collections.Counter(r["operation"] for r in records if r["status"] == "refused")
    if refusals:
        lines.append("refused at: " + ", ".join(f"{op} ({n})" for op, n in refusals.most_common()))
    for r in records:
        if r["status"] == "refused":
            lines.append(f"refused: {r['model']}: {r['operation']} in '{r['module']}' ({r['module_type']})")
    disagree = [r["model"] for r in records if r.get("strict agrees") is False]
    lines.append(f"strict and lenient disagree on {len(disagree)} models: {', '.join(disagree) or '-'}")
    skipped = collections.Counter(r["error"].split(" (")[-1].rstrip(")") for r in records if r["status"] == "skipped")
    if skipped:
        lines.append("skipped: " + ", ".join(f"{n} ({why})" for why, n in skipped.most_common()))
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
    traced = [r for r in records if "fingerprint" in r]
    gradients = [r["gradient"] for r in traced if r.get("gradient", {}).get("units")]
    not_checked = collections.Counter(
        r.get("gradient", {}).get("skipped", "").split(" (")[-1].rstrip(")") or "error or no row"
        for r in traced
        if not r.get("gradient", {}).get("units")
    )
    totals = {kind: sum(g.get(kind, 0) for g in gradients) for kind in ("units", "global units", *VERDICTS)}
    lines.append(
        f"gradient truth: {totals['units']} units ({totals['global units']} of rows called global) in"
        f" {len(gradients)} of {len(traced)} traced models: "
        + ", ".join(f"{kind} {totals[kind]}" for kind in VERDICTS)
        + "; not checked: "
        + (", ".join(f"{n} ({why})" for why, n in not_checked.most_common()) or "none")
    )
    for r in traced:
        for wrong in r.get("gradient", {}).get("wrong", []):
            lines.append(f"  {r['model']}: {wrong}")
    return "\n".join(lines)


def _read(path: str | None) -> dict[str, dict[str, Any]]:
    """The records of a JSON-lines file by model (the last one of each), empty if there is none."""
    if not path or not pathlib.Path(path).exists():
        return {}
    records = {}
    for text in pathlib.Path(path).read_text().splitlines():
        if text.strip():
            record = json.loads(text)
            records[record["model"]] = record
    return records


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of a sweep that any catalogue shares: what is timed and checked, limits, workers, records."""
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (0: no timing)")
    parser.add_argument(
        "--units",
        type=int,
        default=12,
        help="local units checked against the gradient per model (per row with --rows 0)",
    )
    parser.add_argument("--rows", type=int, default=4, help="local rows those units are spread over (0: every row)")
    parser.add_argument("--global-rows", type=int, default=4, help="rows where a path becomes global, checked too")
    parser.add_argument("--match", help="check only rows whose names match this pattern (fnmatch)")
    parser.add_argument("--global-units", type=int, default=3, help="units checked per global row")
    parser.add_argument("--max-parameters", type=float, default=60e6, help="no gradient check above this")
    parser.add_argument("--max-pixels", type=float, default=448 * 448, help="no gradient check above this input")
    parser.add_argument("--max-build-parameters", type=float, default=150e6, help="skip models above this")
    parser.add_argument("--max-memory-gb", type=float, default=0, help="address-space limit of the worker (0: none)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model before it is skipped")
    parser.add_argument("--workers", type=int, default=1, help="models traced at once, each in its own process")
    parser.add_argument("--recycle", type=int, default=20, help="models per worker process")
    parser.add_argument("--jsonl", help="append one JSON record per model; models already in it are not run again")
    parser.add_argument("--recheck", help="records of an earlier run: models whose table is unchanged keep theirs")
    parser.add_argument("--summary", action="store_true", help="only summarize the records of --jsonl")


def sweep_models(
    names: list[str], args: argparse.Namespace, sweep: Sweep = sweep_one, describe: Callable = line, versions: str = ""
) -> list[dict[str, Any]]:
    """Every model's record: those already in ``--jsonl`` as they are, the others from ``sweep`` in worker processes
    (``--workers`` at once), each printed as ``describe(record)`` and appended to ``--jsonl``."""
    done, previous = _read(args.jsonl), _read(args.recheck)
    code = code_version()
    todo = [name for name in names if name not in done]
    print(
        f"{len(names)} models ({len(names) - len(todo)} already in {args.jsonl}), code {code}, 1 thread,"
        f" torch {torch.__version__}{versions}",
        flush=True,
    )
    records = [done[name] for name in names if name in done]
    queue, lock = iter(todo), threading.Lock()

    def work() -> None:  # one worker process per thread, each taking the next model in turn
        workers = Workers(args, sweep)
        try:
            while True:
                with lock:
                    name = next(queue, None)
                if name is None:
                    return
                record = workers.run(name, previous.get(name))
                record["code"] = record.get("code") if "same table as" in record else code
                with lock:
                    records.append(record)
                    print(describe(record), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as stream:
                            stream.write(json.dumps(record, default=str) + "\n")
        finally:
            workers.stop()

    threads = [threading.Thread(target=work) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="source:name (sources: tv, seg, det, timm)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--timm", nargs="+", default=["*"], help="timm.list_models patterns (default: all)")
    parser.add_argument("--limit", type=int, help="an evenly spaced sample of this many models")
    parser.add_argument("--size", type=int, help="input height and width (default: 224, timm: the model's own)")
    add_options(parser)
    args = parser.parse_args()
    if args.summary:
        print(summary(list(_read(args.jsonl).values())))
        return
    names = args.models or list(_read(args.recheck)) or sample(catalogue(args.sources, args.timm), args.limit)
    print(summary(sweep_models(names, args, versions=f", torchvision {torchvision.__version__}")))


if __name__ == "__main__":
    main()
