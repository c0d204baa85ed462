"""Meta outputs without PyTorch's Python meta kernels, for the operations a trace runs most.

Each shortcut returns exactly what the real meta kernel would (shape, dtype, strides), or ``None`` to
let the kernel run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch._prims_common import are_strides_like_channels_last_or_false

from rf_callback.tracing.layout import _normalize_dim

aten = torch.ops.aten
_EVAL_BATCH_NORMS = (aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default)


def per_operation(compute: Any) -> Any:
    """``compute(func)`` computed once per ATen operation, looked up by identity.

    ``functools.cache`` would hash the ``OpOverload`` in Python at every lookup, which a trace does
    several times per operation; the cache holds each operation, so that its ``id`` is never reused.
    """
    cache: dict[int, tuple[Any, Any]] = {}

    @functools.wraps(compute)
    def cached(func: Any) -> Any:
        found = cache.get(id(func))
        if found is None:
            found = cache[id(func)] = (func, compute(func))
        return found[1]

    return cached


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------


def _to_meta(value: Any) -> Any:
    """``value`` with every tensor in it (in tuples and lists too) replaced by a meta tensor like it."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)) and not all(type(item) is int for item in value):  # not sizes, strides
        return type(value)(_to_meta(item) for item in value)
    return value


_BOOLEAN_RESULTS = {"eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "signbit", "isneginf", "isposinf"}

# Elementwise operations that PyTorch does not tag as pointwise (nor their in-place twins).
_UNTAGGED_ELEMENTWISE = {
    aten.hardswish,
    aten.hardswish_,
    aten.where,
    aten.masked_fill,
    aten.masked_fill_,
    aten.prelu,
    aten._prelu_kernel,
    aten.rrelu_with_noise,
    aten.rrelu_with_noise_,
}


@per_operation
def elementwise(func: Any) -> bool:
    """Whether ``func`` computes each output element from the same element of its (broadcast) inputs.

    PyTorch's ``pointwise`` tag is the guide, but it is missing on some in-place twins
    (``gelu_``, ``mish_``, ``threshold_``, ``abs_``) and on a few ops altogether (``hardswish``,
    ``where.ScalarOther``, ``masked_fill.Tensor``, ``prelu``): an op is elementwise when it, or its
    in-place / out-of-place twin of the same overload, is tagged, or when it is listed above.
    """
    if torch.Tag.pointwise in func.tags or func.overloadpacket in _UNTAGGED_ELEMENTWISE:
        return True
    name = func.overloadpacket.__name__
    if name.endswith("__"):  # a dunder (__and__...), not an in-place twin
        return False
    twin = getattr(aten, name[:-1] if name.endswith("_") else name + "_", None)
    overload = getattr(twin, func._overloadname, None) if twin is not None else None
    return overload is not None and (
        torch.Tag.pointwise in overload.tags or overload.overloadpacket in _UNTAGGED_ELEMENTWISE
    )


@per_operation
def _writes_first(func: Any) -> bool:
    """Whether ``func`` writes into its first argument and returns it (``relu_``, ``add_``...)."""
    arguments, returns = func._schema.arguments, func._schema.returns
    if not arguments or len(returns) != 1:
        return False
    argument, result = arguments[0].alias_info, returns[0].alias_info
    if argument is None or result is None:
        return False
    return argument.is_write and argument.before_set == result.before_set


def _dense_strides(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` whose dimensions run ``order``, outermost first."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


_CHANNELS_LAST = (0, 2, 3, 1)


def _standard_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """``contiguous_format`` or ``channels_last`` when ``tensor`` has exactly those strides, else None.

    ``is_contiguous()`` alone is not enough: it ignores the strides of length-1 dimensions, which
    the real kernels read when they choose the layout of their output. (``channels_last_3d`` is left
    out: there the meta kernels turn some ambiguous layouts contiguous.)
    """
    return _format_of(tensor.shape, tensor.stride())


@functools.lru_cache(maxsize=4096)
def _format_of(shape: torch.Size, strides: tuple[int, ...]) -> torch.memory_format | None:
    if strides == _dense_strides(shape, range(len(shape))):
        return torch.contiguous_format
    if len(shape) == 4 and strides == _dense_strides(shape, _CHANNELS_LAST):
        return torch.channels_last
    return None


@functools.lru_cache(maxsize=4096)
def _suggests_contiguous(shape: torch.Size, strides: tuple[int, ...]) -> bool:
    """Whether ``Tensor.suggest_memory_format()`` is ``contiguous_format`` for these sizes and strides."""
    return not are_strides_like_channels_last_or_false(shape, strides)


def _like(tensor: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """An empty meta tensor like ``tensor``, with its very strides or those of ``memory_format``."""
    if memory_format == torch.preserve_format:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta", memory_format=memory_format)


def _registry(table: dict[Any, Any]) -> Any:
    """A decorator factory: ``@register(key, ...)`` files the decorated handler under each key of ``table``."""

    def register(*keys):
        def decorate(handler):
            for key in keys:
                table[key] = handler
            return handler

        return decorate

    return register


def _broadcasts(shape: Sequence[int], to: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``to`` without growing it."""
    return len(shape) <= len(to) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(to)))


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _floating_meta(value: Any) -> bool:
    return _floating(value) and value.is_meta


_FORMATS = {True: (torch.contiguous_format, torch.channels_last), False: (torch.contiguous_format,)}
_SHORTCUTS: dict[Any, Any] = {}
_shortcut_for = _registry(_SHORTCUTS)
_special_shortcut = per_operation(_SHORTCUTS.get)  # filled at import, before any lookup


def _shortcut(func: Any, args: tuple, kwargs: dict) -> Any:
    """The meta output of common operations without running their (Python) meta kernels, or None.

    Only where the answer, strides included, is certainly the real meta kernel's (property tests
    hold it to that), for inputs with exactly contiguous or channels-last strides:

    * an in-place elementwise op returns its input (meta tensors hold no data);
    * ``clone`` keeps the strides of a dense input, or takes those of the ``memory_format`` asked for;
    * another elementwise op returns a tensor like its first input when the others have its shape
      and strides, or broadcast to it from a standard layout, all of one dtype;
    * the operations registered with ``_shortcut_for`` (convolution, eval-mode BatchNorm, LayerNorm,
      matrix products, concatenation, reductions over some dimensions, ``_unsafe_view``) answer
      what their kernels would.
    """
    special = _special_shortcut(func)
    if special is not None:
        return special(func, args, kwargs)
    first = args[0] if args else None
    if not elementwise(func) or "dtype" in kwargs or "out" in kwargs or not _floating_meta(first):
        return None
    if func is aten.clone.default and kwargs.get("memory_format") == torch.contiguous_format:
        return _like(first, torch.contiguous_format)  # x.contiguous(), whatever x's strides
    operands = [first, *(a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor))]
    in_place = _writes_first(func)
    full = first if in_place or len(operands) == 1 else max(operands, key=lambda t: (t.dim(), t.numel()))
    # Every operand has a say in the output's layout: all must share the full one's (contiguous unless it is first).
    layout = _standard_format(full)
    if any(t.dtype != first.dtype for t in operands) or layout not in _FORMATS[full is first]:
        return None  # a kernel decides the layout of the output of a strided input or mixed dtypes
    for other in operands:
        if other.shape == full.shape:
            if other.stride() != full.stride():
                return None
        elif not _broadcasts(other.shape, full.shape) or _standard_format(other) is not layout:
            return None
    if in_place:
        return first
    if func.overloadpacket.__name__ in _BOOLEAN_RESULTS or len(func._schema.returns) != 1:
        return None
    if func is aten.clone.default:
        return _like(first, kwargs.get("memory_format") or torch.preserve_format)
    return _like(full)


@_shortcut_for(aten.convolution.default)
def _convolved(func: Any, args: tuple, kwargs: dict) -> Any:
    """A plain convolution of a contiguous input: a contiguous tensor (the meta kernel spends ~0.1 ms on checks)."""
    first, weight, stride, padding, dilation = args[0], args[1], args[3], args[4], args[5]
    count = first.dim() - 2
    if count < 1 or not _floating_meta(first) or args[6] or weight.dim() != count + 2:
        return None
    if not len(stride) == len(padding) == len(dilation) == count:
        if not all(len(v) in (1, count) for v in (stride, padding, dilation)):
            return None
        stride, padding, dilation = (v * count if len(v) == 1 else v for v in (stride, padding, dilation))
    shape, kernel = first.shape, weight.shape
    spatial = [
        (shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[2 + i] - 1) - 1) // stride[i] + 1 for i in range(count)
    ]
    # A contiguous input, or one contiguous but for the strides of length-1 dims that does not look
    # channels-last (a channel half of a contiguous batch of one: ShuffleNet's branches): contiguous.
    usual = _standard_format(first) is torch.contiguous_format or (
        first.is_contiguous() and _suggests_contiguous(shape, first.stride())
    )
    if (
        usual
        and _standard_format(weight) is torch.contiguous_format
        and kernel[1] * args[8] == shape[1]
        and min(spatial) > 0
    ):
        return torch.empty((shape[0], kernel[0], *spatial), dtype=first.dtype, device="meta")
    return None


@_shortcut_for(*_EVAL_BATCH_NORMS)
def _normalized(func: Any, args: tuple, kwargs: dict) -> Any:
    """Eval-mode BatchNorm: a tensor like its input, and two per-channel statistics."""
    first = args[0]
    if not _floating_meta(first) or _standard_format(first) is None or (len(args) > 5 and args[5] is True):
        return None
    channels = (first.shape[1],) if first.dim() > 1 else (0,)
    return _like(first), *(torch.empty(channels, dtype=first.dtype, device="meta") for _ in range(2))


@_shortcut_for(aten.cat.default)
def _concatenated(func: Any, args: tuple, kwargs: dict) -> Any:
    """Tensors of one dtype and rank concatenated, one of them not laid out like channels-last: a contiguous tensor.

    The kernel keeps a layout only that all its inputs suggest (``suggest_memory_format``); any
    other mix, such as a channel split of a contiguous tensor (ShuffleNet's halves), is contiguous.
    """
    tensors = args[0]
    first = tensors[0] if tensors else None
    if not _floating_meta(first) or first.dim() == 0:
        return None
    d = _normalize_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), first.dim())
    for tensor in tensors:
        if tensor.dtype != first.dtype or tensor.dim() != first.dim():
            return None
        if any(n != m for i, (n, m) in enumerate(zip(tensor.shape, first.shape)) if i != d):
            return None
    if not any(_suggests_contiguous(tensor.shape, tensor.stride()) for tensor in tensors):
        return None
    shape = list(first.shape)
    shape[d] = sum(tensor.shape[d] for tensor in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


@_shortcut_for(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
def _reduced(func: Any, args: tuple, kwargs: dict) -> Any:
    """A reduction over some dimensions of a tensor in a standard layout: a contiguous tensor."""
    first = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not dims or "dtype" in kwargs or "out" in kwargs or not _floating_meta(first) or first.dim() == 0:
        return None
    if _standard_format(first) is None:
        return None
    dims = {_normalize_dim(d, first.dim()) for d in dims}
    shape = [1 if d in dims else n for d, n in enumerate(first.shape) if keepdim or d not in dims]
    return torch.empty(shape, dtype=first.dtype, device="meta")


@_shortcut_for(aten.mm.default, aten.bmm.default, aten.addmm.default)
def _multiplied(func: Any, args: tuple, kwargs: dict) -> Any:
    """A matrix product (plus a bias that broadcasts to it) of one dtype: a contiguous tensor, whatever the strides."""
    left, right = (args[1], args[2]) if func is aten.addmm.default else (args[0], args[1])
    rank = 3 if func is aten.bmm.default else 2
    if not (_floating(left) and _floating(right)) or left.dim() != rank or right.dim() != rank:
        return None
    if left.dtype != right.dtype or left.shape[-1] != right.shape[-2] or left.shape[:-2] != right.shape[:-2]:
        return None
    shape = (*left.shape[:-1], right.shape[-1])
    if func is aten.addmm.default:
        bias = args[0]
        if not _floating(bias) or bias.dtype != left.dtype or bias.dim() > 2:
            return None
        if not _broadcasts(bias.shape, shape):
            return None
    return torch.empty(shape, dtype=left.dtype, device="meta")


@_shortcut_for(aten.linear.default)
def _linear_output(func: Any, args: tuple, kwargs: dict) -> Any:
    """``nn.Linear`` of a batched input (as the fast path lowers it): a contiguous tensor of ``out_features``."""
    first, weight = args[0], args[1]
    if not _floating_meta(first) or first.dim() < 2 or weight.dim() != 2 or first.shape[-1] != weight.shape[1]:
        return None
    return torch.empty((*first.shape[:-1], weight.shape[0]), dtype=first.dtype, device="meta")


@_shortcut_for(aten.split.Tensor)
def _split_pieces(func: Any, args: tuple, kwargs: dict) -> Any:
    """``split`` (``chunk``): views of the input, each with the input's strides."""
    first, size = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if not _floating_meta(first) or type(size) is not int or size < 1 or type(dim) is not int:
        return None
    if not -first.dim() <= dim < first.dim() or first.shape[dim] == 0:
        return None
    d, n, strides = dim % first.dim(), first.shape[dim], first.stride()
    pieces = []
    for start in range(0, n, size):
        shape = list(first.shape)
        shape[d] = min(size, n - start)
        pieces.append(torch.empty_strided(shape, strides, dtype=first.dtype, device="meta"))
    return pieces


@_shortcut_for(aten.transpose.int)
def _transposed(func: Any, args: tuple, kwargs: dict) -> Any:
    """A transpose: a view of the input with two sizes and strides swapped."""
    first, a, b = args[0], args[1], args[2]
    if not _floating_meta(first) or type(a) is not int or type(b) is not int or first.dim() == 0:
        return None
    if not (-first.dim() <= a < first.dim() and -first.dim() <= b < first.dim()):
        return None
    shape, strides = list(first.shape), list(first.stride())
    a, b = a % first.dim(), b % first.dim()
    shape[a], shape[b], strides[a], strides[b] = shape[b], shape[a], strides[b], strides[a]
    return torch.empty_strided(shape, strides, dtype=first.dtype, device="meta")


@_shortcut_for(aten.native_layer_norm.default)
def _layer_normalized(func: Any, args: tuple, kwargs: dict) -> Any:
    """LayerNorm of a float32/64 tensor: a contiguous tensor of its shape, whatever its strides (the kernel makes
    its input contiguous; transposed tokens, XCiT's, would otherwise run PyTorch's Python decomposition),
    and its per-row mean and 1 / std."""
    first, normalized = args[0], tuple(args[1])
    if not _floating_meta(first) or first.dtype not in (torch.float32, torch.float64) or not normalized:
        return None
    if tuple(first.shape[-len(normalized) :]) != normalized:
        return None
    if any(t is not None and (t.shape != normalized or t.dtype != first.dtype) for t in args[2:4]):
        return None
    stats = (*first.shape[: first.dim() - len(normalized)], *(1,) * len(normalized))
    if _standard_format(first) is torch.contiguous_format:
        out = _like(first)
    elif not first.is_contiguous():  # copied to contiguous memory first: a contiguous result
        out = torch.empty(first.shape, dtype=first.dtype, device="meta")
    else:  # contiguous but for the strides of length-1 dimensions: the kernel's own rules
        return None
    return out, *(torch.empty(stats, dtype=first.dtype, device="meta") for _ in range(2))


@_shortcut_for(aten._unsafe_view.default, aten.view.default)
def _viewed(func: Any, args: tuple, kwargs: dict) -> Any:
    """A contiguous tensor seen in another shape (``x.view``, ``reshape`` inside ``matmul``): a contiguous tensor.

    Meta tensors hold no data, and the tracer follows tensors, not storage: that the output is not
    a view of its input changes nothing it records.
    """
    first, shape = args[0], list(args[1])
    if not _floating_meta(first) or _standard_format(first) is not torch.contiguous_format or shape.count(-1) > 1:
        return None
    if -1 in shape:
        rest = math.prod(n for n in shape if n != -1)
        if rest <= 0 or first.numel() % rest:
            return None
        shape[shape.index(-1)] = first.numel() // rest
    if math.prod(shape) != first.numel() or min(shape, default=0) < 0:
        return None
    return torch.empty(shape, dtype=first.dtype, device="meta")


@per_operation
def _parameters(func: Any) -> tuple[tuple[str, Any], ...]:
    """``func``'s argument names with their defaults (None where there is none)."""
    return tuple((a.name, a.default_value if a.has_default_value() else None) for a in func._schema.arguments)


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    parameters = _parameters(func)
    bound = {name: value for (name, _), value in zip(parameters, args)}
    for name, default in parameters[len(args) :]:
        bound[name] = kwargs.get(name, default)
    return bound


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``, through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    found: list[torch.Tensor] = []
    _collect(value, found)
    return found


def _collect(value: Any, found: list[torch.Tensor]) -> None:
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ():
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list, dict)):
            _collect(item, found)


def _operands(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an ATen operation's arguments: tensors, or lists of them (``Tensor?[]``)."""
    found = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)) and value and type(value[0]) is not int:  # not sizes, strides
            found += [item for item in value if isinstance(item, torch.Tensor)]
    return found


def _first_output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else flat_tensors(out)[0]
