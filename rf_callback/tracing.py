"""The tracer behind :func:`rf_callback.receptive_fields`.

The model runs on the meta device under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that follows every ATen operation. Each tensor that depends on the input carries a
:class:`~rf_callback.algebra.Field` and a *layout*: which of its dimensions hold which input axis.
A registry maps each spatial operation to its geometry (kernel, stride, padding, dilation);
elementwise operations merge fields; anything else that touches the input's positions is
reported as unsupported, never guessed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rf_callback.algebra import Field, MisalignedBranchesError, PadMode, merge
from rf_callback.errors import UnsupportedLayerError

aten = torch.ops.aten
_EVAL_BATCH_NORMS = (aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default)

# A tensor dimension is a product of factors; a factor is (spatial axis or None, length).
# Non-spatial factors of length 1 are dropped; an axis reduced away is absent from the layout.
Factor = tuple[int | None, int]
Layout = tuple[tuple[Factor, ...], ...]


@dataclass(frozen=True)
class Traced:
    """What a traced tensor knows: the field of its units and where the input's axes live in it.

    ``equivariant`` holds while every operation so far commutes with shifting the input by a
    multiple of the stride (convolutions, pooling, padding, elementwise ops, ``[::k]`` slices):
    then a unit can be computed from a crop of the input around its box. Global mixing, slices
    that cut at fixed positions, adaptive pooling and position-dependent constants end it.

    ``lost`` is set when an operand upstream could not be followed (``error`` says where). Then
    ``field`` is a lower bound: what the tensor sees through the operands that were followed. Every
    unit sees at most the whole image, so the bound is exact, and ``lost`` cleared, as soon as it
    reaches the whole image at every unit (after attention or global pooling, say).
    """

    field: Field
    layout: Layout
    equivariant: bool = True
    lost: UnsupportedLayerError | None = None


@dataclass(frozen=True)
class Unsupported:
    """A tensor computed by an operation that could not be followed, from tensors that depend on the input."""

    error: UnsupportedLayerError


def refusal(info: Traced | Unsupported | None) -> UnsupportedLayerError | None:
    """Why ``info`` has no exact receptive field, or None when it has one."""
    return info.error if isinstance(info, Unsupported) else info.lost if info is not None else None


class _Reject(Exception):
    """Raised by an operation handler: the operation has no receptive field (the message says why)."""


# --------------------------------------------------------------------------------------------
# Layout algebra
# --------------------------------------------------------------------------------------------


def _dim_size(dim: tuple[Factor, ...]) -> int:
    size = 1
    for _, length in dim:
        size *= length
    return size


def _spatial(dim: tuple[Factor, ...]) -> bool:
    return any(axis is not None for axis, _ in dim)


def _plain(size: int) -> tuple[Factor, ...]:
    return ((None, size),) if size > 1 else ()


@functools.lru_cache(maxsize=4096)
def _axes(layout: Layout) -> dict[int, tuple[int, int]]:
    """Where each spatial axis of ``layout`` lives: axis -> (dimension, length)."""
    return {axis: (d, length) for d, dim in enumerate(layout) for axis, length in dim if axis is not None}


def axis_length(layout: Layout, axis: int) -> int:
    place = _axes(layout).get(axis)
    return 1 if place is None else place[1]


def _home(layout: Layout, axis: int) -> int | None:
    """The dimension holding ``axis``, or None when the axis is absent (length 1 there)."""
    place = _axes(layout).get(axis)
    return None if place is None else place[0]


def _aligned(info: Traced, ndim: int) -> Traced:
    """``info`` with its layout right-aligned to ``ndim`` dimensions, as broadcasting does."""
    return replace(info, layout=((),) * (ndim - len(info.layout)) + info.layout)


def _reshape(layout: Layout, shape: Sequence[int]) -> Layout:
    """Layout after a view/reshape to ``shape``; spatial axes may be merged, not split."""
    if tuple(shape) == tuple(_dim_size(dim) for dim in layout):
        return layout
    queue: list[Factor] = []
    for dim in layout:
        for factor in dim:
            if factor[1] == 1:
                continue
            if factor[0] is None and queue and queue[-1][0] is None:
                queue[-1] = (None, queue[-1][1] * factor[1])
            else:
                queue.append(factor)
    result = []
    for size in shape:
        dim: list[Factor] = []
        remaining = size
        while remaining > 1:
            if not queue:
                raise _Reject(f"a view to {tuple(shape)} that this engine cannot follow")
            axis, length = queue[0]
            if remaining % length == 0:
                dim.append(queue.pop(0))
                remaining //= length
            elif axis is None and length % remaining == 0:
                dim.append((None, remaining))
                queue[0] = (None, length // remaining)
                remaining = 1
            else:
                raise _Reject(f"a view to {tuple(shape)} splits a spatial axis (space-to-depth)")
        result.append(tuple(dim))
    if queue:
        raise _Reject(f"a view to {tuple(shape)} that this engine cannot follow")
    return tuple(result)


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _forget_mixed_axes(info: Traced) -> Traced:
    """``info`` with the axes along which every unit sees the same interval made plain.

    That is an axis of stride 0 (mixed by attention, global pooling, a squeeze-excitation gate) or
    of a single position. Where such an axis lies in the tensor no longer matters, so any view, pad,
    resize or window of it is followed as of a non-spatial dimension; the axis is then absent from
    the layout (length 1).
    """
    field = info.field
    mixed = {a for a, rf in enumerate(field.rfs) if rf.jump == 0 or field.length(a) == 1}
    if not any(axis in mixed for dim in info.layout for axis, _ in dim):
        return info
    layout = []
    for dim in info.layout:
        factors: list[Factor] = []
        for axis, length in dim:
            if axis not in mixed and axis is not None:
                factors.append((axis, length))
            elif factors and factors[-1][0] is None:  # plain, merged with its plain neighbour
                factors[-1] = (None, factors[-1][1] * length)
            elif length > 1:
                factors.append((None, length))
        layout.append(tuple(factors))
    return replace(info, layout=tuple(layout))


def _sees_everything(field: Field, image: Sequence[int]) -> bool:
    """Whether every unit of ``field`` sees the whole image."""
    if any(rf.jump != 0 and field.length(a) > 1 for a, rf in enumerate(field.rfs)):
        return False
    return field.box((0,) * len(image)) == tuple((0, n) for n in image)


def _reason(refused: Exception) -> str:
    if isinstance(refused, MisalignedBranchesError):
        jumps = ", ".join(str(rf.jump) for rf in refused.branches)
        return (
            f"the branches merged here move at different effective strides ({jumps}), so no single receptive"
            " field describes the result; resample them to one stride before merging"
        )
    return str(refused)


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------


def _to_meta(value: Any) -> Any:
    """``value`` with every tensor in it (in tuples and lists too) replaced by a meta tensor like it."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
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


@functools.cache
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


@functools.cache
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
    return _floating(value) and value.device.type == "meta"


_FORMATS = {True: (torch.contiguous_format, torch.channels_last), False: (torch.contiguous_format,)}
_SHORTCUTS: dict[Any, Any] = {}
_shortcut_for = _registry(_SHORTCUTS)


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
    special = _SHORTCUTS.get(func)
    if special is not None:
        return special(func, args, kwargs)
    first = args[0] if args else None
    if not elementwise(func) or "dtype" in kwargs or "out" in kwargs or not _floating_meta(first):
        return None
    if func is aten.clone.default and kwargs.get("memory_format") == torch.contiguous_format:
        return _like(first, torch.contiguous_format)  # x.contiguous(), whatever x's strides
    operands = [first, *(a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor))]
    full = first if _writes_first(func) else max(operands, key=lambda t: (t.dim(), t.numel()))
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
    if _writes_first(func):
        return first
    if func.overloadpacket.__name__ in _BOOLEAN_RESULTS or len(func._schema.returns) != 1:
        return None
    if func is aten.clone.default:
        return _like(first, kwargs.get("memory_format") or torch.preserve_format)
    return _like(full)


@_shortcut_for(aten.convolution.default)
def _convolved(func: Any, args: tuple, kwargs: dict) -> Any:
    """A plain convolution of contiguous tensors: a contiguous tensor (the meta kernel spends ~0.3 ms on checks)."""
    first, weight = args[0], args[1]
    if not _floating_meta(first) or args[6] or first.dim() != weight.dim():
        return None
    count = first.dim() - 2
    stride, padding, dilation = (list(v) * count if len(v) == 1 else list(v) for v in (args[3], args[4], args[5]))
    if not len(stride) == len(padding) == len(dilation) == count:
        return None
    spatial = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(first.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    usual = _standard_format(first) == _standard_format(weight) == torch.contiguous_format
    if usual and weight.shape[1] * args[8] == first.shape[1] and min(spatial) > 0:
        return torch.empty((first.shape[0], weight.shape[0], *spatial), dtype=first.dtype, device="meta")
    return None


@_shortcut_for(*_EVAL_BATCH_NORMS)
def _normalized(func: Any, args: tuple, kwargs: dict) -> Any:
    """Eval-mode BatchNorm: a tensor like its input, and two per-channel statistics."""
    first = args[0]
    if not _floating_meta(first) or _standard_format(first) is None or (len(args) > 5 and args[5] is True):
        return None
    channels = (first.shape[1],) if first.dim() > 1 else (0,)
    stats = torch.empty(channels, dtype=first.dtype, device="meta")
    return _like(first), stats, torch.empty_like(stats)


@_shortcut_for(aten.cat.default)
def _concatenated(func: Any, args: tuple, kwargs: dict) -> Any:
    """Contiguous tensors of one dtype, concatenated: a contiguous tensor."""
    tensors = args[0]
    first = tensors[0] if tensors else None
    if not _floating_meta(first) or first.dim() == 0:
        return None
    d = _normalize_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), first.dim())
    for tensor in tensors:
        if tensor.dtype != first.dtype or _standard_format(tensor) is not torch.contiguous_format:
            return None
        others = [n != m for i, (n, m) in enumerate(zip(tensor.shape, first.shape)) if i != d]
        if tensor.dim() != first.dim() or any(others):
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


@_shortcut_for(aten.native_layer_norm.default)
def _layer_normalized(func: Any, args: tuple, kwargs: dict) -> Any:
    """LayerNorm of a contiguous float32/64 tensor: a tensor like it, and its per-row mean and 1 / std."""
    first, normalized = args[0], tuple(args[1])
    if not _floating_meta(first) or first.dtype not in (torch.float32, torch.float64) or not normalized:
        return None
    if _standard_format(first) is not torch.contiguous_format or tuple(first.shape[-len(normalized) :]) != normalized:
        return None
    if any(t is not None and (t.shape != normalized or t.dtype != first.dtype) for t in args[2:4]):
        return None
    stats = (*first.shape[: first.dim() - len(normalized)], *(1,) * len(normalized))
    return _like(first), *(torch.empty(stats, dtype=first.dtype, device="meta") for _ in range(2))


@_shortcut_for(aten._unsafe_view.default)
def _viewed(func: Any, args: tuple, kwargs: dict) -> Any:
    """A contiguous tensor seen in another shape (``reshape`` inside ``matmul``): a contiguous tensor."""
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


@functools.cache
def _parameters(func: Any) -> tuple[tuple[str, Any], ...]:
    """``func``'s argument names with their defaults (None where there is none)."""
    return tuple((a.name, a.default_value if a.has_default_value() else None) for a in func._schema.arguments)


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip((name for name, _ in _parameters(func)), args))
    for name, default in _parameters(func)[len(args) :]:
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


class TensorInfos:
    """What the tracer knows of each tensor, by identity.

    A plain dict keyed by ``id``, which is several times faster than a weak-key dictionary on the
    hot path; it holds its tensors (meta tensors, with no storage), so no ``id`` is reused while
    the trace runs.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[torch.Tensor, Traced | Unsupported]] = {}

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._items

    def __getitem__(self, tensor: torch.Tensor) -> Traced | Unsupported:
        return self._items[id(tensor)][1]

    def __setitem__(self, tensor: torch.Tensor, info: Traced | Unsupported) -> None:
        self._items[id(tensor)] = (tensor, info)

    def __delitem__(self, tensor: torch.Tensor) -> None:
        del self._items[id(tensor)]

    def get(self, tensor: torch.Tensor) -> Traced | Unsupported | None:
        item = self._items.get(id(tensor))
        return None if item is None else item[1]

    def pop(self, tensor: torch.Tensor, default: Any = None) -> Any:
        item = self._items.pop(id(tensor), None)
        return default if item is None else item[1]


class Tracer(TorchDispatchMode):
    def __init__(self, input_spatial: tuple[int, ...], model_type: str = "forward") -> None:
        super().__init__()
        self.image = input_spatial
        self.model_type = model_type
        self.info = TensorInfos()
        self.stack: list[tuple[str, str]] = []  # (module name, module type) being run
        self.transparent = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    def where(self) -> tuple[str, str]:
        return self.stack[-1] if self.stack else ("", self.model_type)

    def error(self, operation: str, reason: str) -> UnsupportedLayerError:
        name, kind = self.where()
        return UnsupportedLayerError(name, kind, operation, reason)

    def get(self, value: Any) -> Traced | Unsupported | None:
        if isinstance(value, torch.Tensor):
            return self.info.get(value)
        return None

    def traced(self, value: Any) -> Traced:
        info = self.get(value)
        assert isinstance(info, Traced)
        return info

    # ---- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs or any(a.name == "device" for a in func._schema.arguments if a.kwarg_only):
            kwargs["device"] = torch.device("meta")  # factories must not allocate, compute or draw
        out = _shortcut(func, args, kwargs)
        if out is None:
            out = func(*_to_meta(args), **{key: _to_meta(value) for key, value in kwargs.items()})
        if self.transparent:
            return out
        tensors = [t for t in _operands(args, kwargs) if t in self.info]
        outputs = flat_tensors(out)
        if not tensors:
            for tensor in outputs:  # an in-place write of constants (x.zero_()) forgets the input
                self.info.pop(tensor, None)
            return out
        bound = _bind(func, args, kwargs)
        results = self.follow(func, tensors, lambda infos: self.handle(func, bound, infos, out))
        if not isinstance(results, tuple):
            results = (results,) * len(outputs)
        for tensor, info in zip(outputs, results):
            if info is None:
                self.info.pop(tensor, None)
            else:
                self.info[tensor] = info
        return out

    def follow(self, operation: Any, tensors: Sequence[torch.Tensor], step: Any) -> Any:
        """The info of an operation's output(s): ``step(infos of the followed inputs)``, with the refusal rules.

        * An input that could not be followed (:class:`Unsupported`) counts as a constant, and the
          result as a lower bound (``lost``), exact once it sees the whole image (:class:`Traced`).
        * An operation that cannot be followed (``step`` raises ``_Reject`` or
          ``MisalignedBranchesError``) is harmless along an axis where every unit of every input sees
          the same interval (stride 0: after attention, global pooling, a squeeze-excitation gate):
          that axis is forgotten (its factors become plain) and ``step`` tried again. Only when that
          fails too is the result :class:`Unsupported`.
        """
        if len(tensors) > 1:
            tensors = list({id(t): t for t in tensors}.values())
        infos = [self.info[t] for t in tensors]
        if all(type(info) is Traced and info.lost is None for info in infos):
            return self._attempt(operation, tensors, infos, step)  # the usual case: everything followed so far
        lost = next(refusal(info) for info in infos if refusal(info) is not None)
        hidden = [(t, info) for t, info in zip(tensors, infos) if isinstance(info, Unsupported)]
        if len(hidden) == len(infos):
            return Unsupported(lost)
        for tensor, _ in hidden:
            del self.info[tensor]
        try:
            followed = [(t, info) for t, info in zip(tensors, infos) if isinstance(info, Traced)]
            results = self._attempt(operation, [t for t, _ in followed], [info for _, info in followed], step)
        finally:
            for tensor, info in hidden:
                self.info[tensor] = info
        if isinstance(results, tuple):
            return tuple(self._bound(result, lost) for result in results)
        return self._bound(results, lost)

    def _attempt(self, operation: Any, tensors: list[torch.Tensor], infos: list[Traced], step: Any) -> Any:
        """``step`` on the followed ``tensors``; again with their mixed axes forgotten if it refuses."""
        try:
            return step(infos)
        except (_Reject, MisalignedBranchesError) as refused:
            error = self.error(str(operation), _reason(refused))
        forgotten = [_forget_mixed_axes(info) for info in infos]
        if all(new is old for new, old in zip(forgotten, infos)):
            return Unsupported(error)
        try:
            for tensor, info in zip(tensors, forgotten):
                self.info[tensor] = info
            return step(forgotten)
        except (_Reject, MisalignedBranchesError):
            return Unsupported(error)
        finally:
            for tensor, info in zip(tensors, infos):
                self.info[tensor] = info

    def _bound(self, result: Any, lost: UnsupportedLayerError) -> Any:
        """``result`` computed with some inputs unknown: a lower bound, exact if it already sees everything."""
        if not isinstance(result, Traced):
            return Unsupported(lost) if result is None or isinstance(result, Unsupported) else result
        if _sees_everything(result.field, self.image):
            return replace(result, equivariant=False, lost=None)
        return replace(result, equivariant=False, lost=lost)

    def handle(self, func, bound: dict[str, Any], inputs: list, out: Any) -> Any:
        handler = _HANDLERS.get(func) or _HANDLERS.get(func.overloadpacket)
        if handler is not None:
            return handler(self, func, bound, out)
        if elementwise(func):
            return self.pointwise(func, bound, out)
        if torch.Tag.reduction in func.tags:
            return _reduction(self, func, bound, out)
        if all(not any(_spatial(dim) for dim in info.layout) for info in inputs):
            # No spatial position is left to tell apart: whatever the operation does, each output
            # depends on the union of what the inputs see (classifier heads, argmax, indexing...).
            shape = _first_output(out).shape
            return self.combine([replace(i, layout=()) for i in inputs], tuple(_plain(n) for n in shape), func)
        raise _Reject("it is not a known spatial operation; only operations whose geometry is known are followed")

    # ---- shared rules --------------------------------------------------------------------------
    def combine(self, operands: Sequence[Traced], layout: Layout, where: Any) -> Traced:
        """Geometry of an output with ``layout`` whose units see the union of what ``operands`` see there.

        Each operand's layout must already be aligned to the output's dimensions. An operand axis
        that is absent there (broadcast) or sits in another dimension than in the output (attention
        scores) is seen whole by every output position.
        """
        fields = []
        equivariant = all(info.equivariant for info in operands)
        for info in operands:
            field = info.field
            for axis in range(len(self.image)):
                home, extent, place = _home(layout, axis), axis_length(layout, axis), _home(info.layout, axis)
                if extent == 1:  # a single output position along this axis
                    field = field.first(axis)
                elif place is None or axis_length(info.layout, axis) == 1:
                    field, equivariant = field.broadcast(axis, extent), False
                elif place != home:
                    field, equivariant = field.mix(axis).broadcast(axis, extent), False
            fields.append(field)
        try:
            field = merge(fields)
        except MisalignedBranchesError as misaligned:  # named only now: formatting it every time costs
            raise MisalignedBranchesError(f"{where} in {self.describe()}", misaligned.branches) from None
        return Traced(field, layout, equivariant)

    @staticmethod
    def varies_with_position(constants: Sequence[Sequence[int]], layout: Layout) -> bool:
        """Whether a constant operand (shape given; no input dependence) varies along a spatial dim of ``layout``."""
        for shape in constants:
            offset = len(layout) - len(shape)
            if any(n > 1 and _spatial(layout[offset + d]) for d, n in enumerate(shape) if offset + d >= 0):
                return True
        return False

    def describe(self) -> str:
        name, kind = self.where()
        return f"'{name}' ({kind})" if name else f"the top-level forward ({kind})"

    def broadcast(self, operands: Sequence[Traced], shape: Sequence[int]) -> Layout:
        """Output layout of a broadcasting op over operands already aligned to ``shape``."""
        layout = []
        for d, size in enumerate(shape):
            spatial = None
            for info in operands:
                dim = info.layout[d]
                if _dim_size(dim) == size and _spatial(dim):
                    if spatial is not None and spatial != dim:
                        raise _Reject("it combines tensors whose spatial axes are laid out differently")
                    spatial = dim
            layout.append(spatial if spatial is not None else _plain(size))
        return tuple(layout)

    def pointwise(self, func, bound: dict[str, Any], out: Any, operands: Sequence[Any] | None = None) -> Any:
        if operands is None:
            operands = [value for key, value in bound.items() if key != "out"]
        every = flat_tensors(operands)
        tensors = [t for t in every if t in self.info]
        if not tensors:
            return None
        shape = _first_output(out).shape
        if len(every) == 1 and every[0].shape == shape:
            return self.traced(every[0])  # relu, sigmoid, dropout...: the same units see the same
        infos = [_aligned(self.traced(t), len(shape)) for t in tensors]
        result = self.combine(infos, self.broadcast(infos, shape), func)
        if self.varies_with_position([t.shape for t in every if t not in self.info], result.layout):
            result = replace(result, equivariant=False)  # a positional encoding, a fixed mask...
        return result

    def mix(self, info: Traced, dims: Sequence[int]) -> Traced:
        """Every position along ``dims`` now sees what all of them saw (softmax, normalisation...)."""
        field, equivariant = info.field, info.equivariant
        for d in dims:
            for axis, _ in info.layout[d]:
                if axis is not None:
                    field, equivariant = field.mix(axis), False
        return replace(info, field=field, equivariant=equivariant)

    def window(self, info: Traced, result: torch.Tensor, kernel, stride, padding, dilation) -> Traced:
        """Sliding windows over the last ``len(kernel)`` dims (convolution, pooling).

        ``stride`` may be empty (defaults to the kernel); one-element lists apply to every axis.
        """
        count = len(kernel)
        stride = list(stride) if len(stride) else list(kernel)
        kernel, stride, padding, dilation = (
            list(value) * count if len(value) == 1 else list(value) for value in (kernel, stride, padding, dilation)
        )
        field = info.field
        layout = list(info.layout[: len(info.layout) - count])
        for i in range(count):
            dim = info.layout[len(info.layout) - count + i]
            size = result.shape[result.dim() - count + i]
            if not _spatial(dim):
                layout.append(_plain(size))
            elif kernel[i] == stride[i] == 1 and padding[i] == 0:
                layout.append(dim)  # a 1x1 window is the identity, whatever the dimension holds
            elif len(dim) == 1:
                axis = dim[0][0]
                field = field.window(axis, kernel[i], stride[i], padding[i], size, dilation[i])
                layout.append(((axis, size),))
            else:
                field, inner = _window_within_rows(field, dim, size, kernel[i], stride[i], padding[i], dilation[i])
                layout.append(dim[:-1] + inner)
        return Traced(field, tuple(layout), info.equivariant)


def _window_within_rows(
    field: Field, dim: tuple[Factor, ...], size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[Field, tuple[Factor, ...]]:
    """A 1-D window over a dimension holding several factors (tokens: ``h * w``), or ``_Reject``.

    Windows that never cross a row of the last factor (no padding, no overlap, a stride that divides
    the row) slide along that factor only: a pool of ``k`` consecutive tokens with stride ``k`` is a
    ``1 x k`` pool of the image when ``k`` divides its width.
    """
    axis, length = dim[-1]
    if padding or length % stride or dilation * (kernel - 1) + 1 > stride or size * stride != _dim_size(dim):
        raise _Reject("it slides a window over a dimension that mixes a spatial axis with others")
    if axis is not None:
        field = field.window(axis, kernel, stride, 0, length // stride, dilation)
    return field, ((axis, length // stride),) if axis is not None else _plain(length // stride)


def _first_output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else flat_tensors(out)[0]


# --------------------------------------------------------------------------------------------
# Operation handlers: each returns the info of the output(s), or raises _Reject.
# --------------------------------------------------------------------------------------------

_HANDLERS: dict[Any, Any] = {}
_register = _registry(_HANDLERS)


@_register(aten.convolution.default)
def _convolution(tracer: Tracer, func, bound, out):
    if bound["transposed"]:
        raise _Reject("a transposed convolution upsamples, so a unit has no single input interval")
    info = tracer.mix(tracer.traced(bound["input"]), [1])  # channels are summed over
    kernel = list(bound["weight"].shape[2:])
    result = tracer.window(info, out, kernel, bound["stride"], bound["padding"], bound["dilation"])
    layout = list(result.layout)
    layout[1] = _plain(out.shape[1])
    return replace(result, layout=tuple(layout))


def _pool(tracer, bound, out, has_dilation: bool) -> Traced:
    result = _first_output(out)
    dilation = bound["dilation"] if has_dilation else [1]
    padding = bound["padding"]
    padding = [padding] if isinstance(padding, int) else padding
    return tracer.window(tracer.traced(bound["self"]), result, bound["kernel_size"], bound["stride"], padding, dilation)


@_register(
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.max_pool1d_with_indices.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
)
def _max_pool(tracer, func, bound, out):
    result = _pool(tracer, bound, out, has_dilation=True)
    return (result, result) if isinstance(out, (tuple, list)) else result


@_register(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
def _avg_pool(tracer, func, bound, out):
    return _pool(tracer, bound, out, has_dilation=False)


@_register(
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool3d.default,
    aten.adaptive_max_pool1d.default,
    aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool3d.default,
)
def _adaptive_pool(tracer, func, bound, out):
    source = bound["self"]
    sizes = list(bound["output_size"])
    kernel = []
    for n, m in zip(source.shape[source.dim() - len(sizes) :], sizes):
        if n % m:
            raise _Reject(f"adaptive pooling from {n} to {m} positions uses windows of different sizes")
        kernel.append(n // m)
    result = tracer.window(tracer.traced(source), _first_output(out), kernel, kernel, [0], [1])
    if any(k > 1 for k in kernel):
        result = replace(result, equivariant=False)  # the window grows with the input
    return (result, result) if isinstance(out, (tuple, list)) else result


def _pad(tracer: Tracer, source: torch.Tensor, pad: Sequence[int], out: torch.Tensor, mode: PadMode) -> Traced:
    info = tracer.traced(source)
    field = info.field
    layout = list(info.layout)
    for i in range(len(pad) // 2):
        d = source.dim() - 1 - i
        before = pad[2 * i]
        dim = info.layout[d]
        if _spatial(dim):
            if len(dim) != 1:
                raise _Reject("it pads a dimension that mixes a spatial axis with others")
            axis = dim[0][0]
            field = field.pad(axis, before, out.shape[d], mode)
            layout[d] = ((axis, out.shape[d]),)
        else:
            layout[d] = _plain(out.shape[d])
    # Reflect, replicate and circular padding copy pixels from the border: on a crop they would copy
    # from the crop's border instead.
    return Traced(field, tuple(layout), info.equivariant and mode == "constant")


@_register(
    aten.constant_pad_nd.default,
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
)
def _padding(tracer, func, bound, out):
    name = func.overloadpacket.__name__
    mode = "reflect" if name.startswith("reflection") else "replicate" if name.startswith("replication") else "constant"
    return _pad(tracer, bound["self"], bound.get("pad") or bound.get("padding"), out, mode)


def _cut(tracer: Tracer, source: torch.Tensor, d: int, start: int, step: int, out: torch.Tensor) -> Traced:
    """A slice ``[start::step]`` of length ``out.shape[d]`` along dim ``d``."""
    info = tracer.traced(source)
    dim = info.layout[d]
    layout = list(info.layout)
    field, equivariant = info.field, info.equivariant
    if _spatial(dim):
        if len(dim) != 1:
            raise _Reject("it slices a dimension that mixes a spatial axis with others")
        axis = dim[0][0]
        field = field.take(axis, start, step, out.shape[d])
        layout[d] = ((axis, out.shape[d]),)
        # Only [::step] shifts with the input; a cut at fixed positions does not.
        equivariant = equivariant and start == 0 and out.shape[d] == -(-source.shape[d] // step)
    else:
        layout[d] = _plain(out.shape[d])
    return Traced(field, tuple(layout), equivariant)


@_register(aten.slice.Tensor)
def _slice(tracer, func, bound, out):
    source = bound["self"]
    d = _normalize_dim(bound["dim"], source.dim())
    n = source.shape[d]
    start = bound["start"] if bound["start"] is not None else 0
    start = min(max(start + n if start < 0 else start, 0), n)
    return _cut(tracer, source, d, start, bound["step"], out)


@_register(aten.select.int)
def _select(tracer, func, bound, out):
    source = bound["self"]
    d = _normalize_dim(bound["dim"], source.dim())
    index = bound["index"] % source.shape[d]
    result = _cut(tracer, source, d, index, 1, source.narrow(d, index, 1))
    return replace(result, layout=result.layout[:d] + result.layout[d + 1 :])


@_register(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
def _split(tracer, func, bound, out):
    source = bound["self"]
    d = _normalize_dim(bound["dim"], source.dim())
    results, start = [], 0
    for piece in out:
        length = 1 if func is aten.unbind.int else piece.shape[d]
        result = _cut(tracer, source, d, start, 1, source.narrow(d, start, length))
        if func is aten.unbind.int:
            result = replace(result, layout=result.layout[:d] + result.layout[d + 1 :])
        results.append(result)
        start += length
    return tuple(results)


@_register(
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten._reshape_alias.default,
    aten.view_copy.default,
)
def _view(tracer, func, bound, out):
    info = tracer.traced(bound["self"])
    return replace(info, layout=_reshape(info.layout, out.shape))


@_register(
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
)
def _same(tracer, func, bound, out):
    return tracer.traced(bound["self"])


@_register(aten.permute.default, aten.transpose.int, aten.t.default, aten.movedim.int)
def _permute(tracer, func, bound, out):
    source = bound["self"]
    info = tracer.traced(source)
    order = list(range(source.dim()))
    if func is aten.permute.default:
        order = [_normalize_dim(d, source.dim()) for d in bound["dims"]]
    elif func is aten.t.default:
        order.reverse()
    elif func is aten.transpose.int:
        a, b = _normalize_dim(bound["dim0"], source.dim()), _normalize_dim(bound["dim1"], source.dim())
        order[a], order[b] = order[b], order[a]
    else:
        a, b = _normalize_dim(bound["source"], source.dim()), _normalize_dim(bound["destination"], source.dim())
        order.insert(b, order.pop(a))
    return replace(info, layout=tuple(info.layout[d] for d in order))


@_register(aten.unsqueeze.default)
def _unsqueeze(tracer, func, bound, out):
    info = tracer.traced(bound["self"])
    d = _normalize_dim(bound["dim"], out.dim())
    return replace(info, layout=info.layout[:d] + ((),) + info.layout[d:])


@_register(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(tracer, func, bound, out):
    source = bound["self"]
    info = tracer.traced(source)
    if func is aten.squeeze.default:
        dims = set(range(source.dim()))
    else:
        dims = bound["dim"] if isinstance(bound["dim"], (list, tuple)) else [bound["dim"]]
        dims = {_normalize_dim(d, source.dim()) for d in dims}
    layout = tuple(dim for d, dim in enumerate(info.layout) if not (d in dims and source.shape[d] == 1))
    return replace(info, layout=layout)


@_register(aten.expand.default)
def _expand(tracer, func, bound, out):
    source = bound["self"]
    info = tracer.traced(source)
    lead = out.dim() - source.dim()
    layout = [_plain(n) for n in out.shape[:lead]]
    for d, dim in enumerate(info.layout):
        size = out.shape[lead + d]
        layout.append(dim if _dim_size(dim) == size else _plain(size))
    return replace(info, layout=tuple(layout))


@_register(aten.repeat.default)
def _repeat(tracer, func, bound, out):
    source = bound["self"]
    info = tracer.traced(source)
    lead = out.dim() - source.dim()
    layout = [_plain(n) for n in out.shape[:lead]]
    for d, dim in enumerate(info.layout):
        if bound["repeats"][lead + d] != 1 and _spatial(dim):
            raise _Reject("it tiles the tensor along a spatial axis")
        layout.append(dim if _dim_size(dim) == out.shape[lead + d] else _plain(out.shape[lead + d]))
    return replace(info, layout=tuple(layout))


@_register(aten.cat.default, aten.stack.default)
def _cat(tracer, func, bound, out):
    d = _normalize_dim(bound["dim"], out.dim())
    operands, constants = [], []
    for tensor in bound["tensors"]:
        info = tracer.get(tensor)
        if info is None:
            shape = list(tensor.shape)
            if func is aten.stack.default:
                shape.insert(d, 1)
            constants.append(shape)
            continue
        layout = list(info.layout)
        if func is aten.stack.default:
            layout.insert(d, ())
        elif _spatial(layout[d]):
            raise _Reject("it concatenates along a spatial axis")
        layout[d] = ()  # the concatenated dimension carries no position
        operands.append(replace(info, layout=tuple(layout)))
    layout = list(tracer.broadcast(operands, [1 if i == d else n for i, n in enumerate(out.shape)]))
    layout[d] = _plain(out.shape[d])
    result = tracer.combine(operands, tuple(layout), func)
    if tracer.varies_with_position(constants, result.layout):
        result = replace(result, equivariant=False)  # coordinate channels (CoordConv) and the like
    return result


@_register(aten.copy_.default)
def _copy(tracer, func, bound, out):
    return tracer.pointwise(func, bound, out, operands=[bound["src"]])


@_register(aten.fill_.Scalar, aten.zero_.default)
def _constant(tracer, func, bound, out):
    return None


@_register(
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
)
def _fresh(tracer, func, bound, out):
    return None  # a new tensor of the same shape: its values do not depend on the input


@_register(aten.glu.default, aten.channel_shuffle.default, aten.native_channel_shuffle.default)
def _along_channels(tracer, func, bound, out):
    """Operations that only move values along one non-spatial dimension (GLU halves, channel shuffle)."""
    source = bound["self"]
    info = tracer.traced(source)
    d = _normalize_dim(bound.get("dim", 1), source.dim())
    if _spatial(info.layout[d]):
        raise _Reject("it rearranges values along a spatial axis")
    return replace(info, layout=info.layout[:d] + (_plain(out.shape[d]),) + info.layout[d + 1 :])


@_register(aten.native_dropout.default, aten.log_sigmoid_forward.default)
def _pointwise_pair(tracer, func, bound, out):
    result = tracer.pointwise(func, bound, out, operands=[bound.get("input", bound.get("self"))])
    return (result, result)


@_register(
    aten.native_batch_norm.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten._native_batch_norm_legit_no_training.default,
    aten._batch_norm_no_update.default,
    aten._batch_norm_with_update.default,
)
def _batch_norm(tracer, func, bound, out):
    source = bound["input"]
    info = tracer.traced(source)
    training = bound.get("training", func is aten._batch_norm_with_update.default)
    if not training:  # running statistics: elementwise; the saved statistics are the constants
        return (info,) + (None,) * (len(out) - 1)
    info = tracer.mix(info, [d for d in range(source.dim()) if d != 1])  # batch statistics mix every position
    return (info,) * len(out)


@_register(aten.native_layer_norm.default)
def _layer_norm(tracer, func, bound, out):
    source = bound["input"]
    count = len(bound["normalized_shape"])
    info = tracer.mix(tracer.traced(source), range(source.dim() - count, source.dim()))
    return (info,) + (info,) * (len(out) - 1)


@_register(aten.native_group_norm.default)
def _group_norm(tracer, func, bound, out):
    source = bound["input"]
    info = tracer.mix(tracer.traced(source), range(1, source.dim()))
    return (info,) + (info,) * (len(out) - 1)


@_register(aten._softmax.default, aten._log_softmax.default, aten._safe_softmax.default)
def _softmax(tracer, func, bound, out):
    source = bound["self"]
    return tracer.mix(tracer.traced(source), [_normalize_dim(bound["dim"], source.dim())])


def _reduction(tracer: Tracer, func, bound, out):
    source = bound["self"]
    dims = bound.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(source.dim()))
    elif isinstance(dims, int):
        dims = [dims]
    dims = sorted({_normalize_dim(d, source.dim()) for d in dims})
    info = tracer.mix(tracer.traced(source), dims)
    if bound.get("keepdim"):
        layout = tuple(() if d in dims else dim for d, dim in enumerate(info.layout))
    else:
        layout = tuple(dim for d, dim in enumerate(info.layout) if d not in dims)
    info = replace(info, layout=layout)
    return (info,) * len(out) if isinstance(out, (tuple, list)) else info


@_register(
    aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.mv.default, aten.dot.default
)
def _matmul(tracer, func, bound, out):
    """``left @ right`` (+ bias): the contracted dimension mixes whatever positions it holds."""
    if func in (aten.addmm.default, aten.baddbmm.default):
        left, right = bound.get("mat1", bound.get("batch1")), bound.get("mat2", bound.get("batch2"))
    else:
        left, right = bound["self"], bound.get("mat2", bound.get("vec", bound.get("tensor")))
    operands = []
    if left in tracer.info:
        info = tracer.mix(tracer.traced(left), [left.dim() - 1])
        tail = ((),) if right.dim() > 1 else ()
        operands.append(replace(info, layout=info.layout[:-1] + tail))
    if right in tracer.info:
        info = tracer.traced(right)
        if right.dim() == 1:
            operands.append(replace(tracer.mix(info, [0]), layout=((),) * out.dim()))
        else:
            info = tracer.mix(info, [right.dim() - 2])
            middle = ((),) if left.dim() > 1 else ()
            operands.append(replace(info, layout=info.layout[:-2] + middle + info.layout[-1:]))
    if func in (aten.addmm.default, aten.baddbmm.default) and bound["self"] in tracer.info:
        operands.append(_aligned(tracer.traced(bound["self"]), out.dim()))
    operands = [_aligned(info, out.dim()) for info in operands]
    layout, seen = [], set()
    for d, size in enumerate(out.shape):
        dim = next(
            (info.layout[d] for info in operands if _spatial(info.layout[d]) and _dim_size(info.layout[d]) == size),
            _plain(size),
        )
        if any(axis in seen for axis, _ in dim):
            dim = _plain(size)  # the same axis on both sides (attention scores): each unit sees them all
        seen.update(axis for axis, _ in dim if axis is not None)
        layout.append(dim)
    return tracer.combine(operands, tuple(layout), func)


# --------------------------------------------------------------------------------------------
# Functions caught before they decompose: F.pad (mode='circular' becomes copies) and the
# recurrent layers (their kernels refuse meta inputs with real weights).
# --------------------------------------------------------------------------------------------

_FUNCTIONS: dict[Any, Any] = {}
_intercept = _registry(_FUNCTIONS)


class FunctionInterceptor(TorchFunctionMode):
    """Catches the functions registered with ``_intercept`` before they reach ATen.

    A handler ``(tracer, func, args, kwargs) -> (out, operation, inputs, step)`` makes the meta
    output unseen by the tracer; ``step`` then says what the output sees, through
    :meth:`Tracer.follow` and its refusal rules.
    """

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTIONS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        self.tracer.transparent += 1
        try:
            out, operation, inputs, step = handler(self.tracer, func, args, kwargs)
        finally:
            self.tracer.transparent -= 1
        traced = [t for t in inputs if t in self.tracer.info]
        if traced:
            outputs = flat_tensors(out)
            results = self.tracer.follow(operation, traced, step)
            results = results if isinstance(results, tuple) else (results,) * len(outputs)
            for tensor, info in zip(outputs, results):
                self.tracer.info[tensor] = info
        return out


@_intercept(torch.nn.functional.pad, torch._C._nn.pad)
def _functional_pad(tracer: Tracer, func, args, kwargs):
    bound = dict(zip(("input", "pad", "mode", "value"), args), **kwargs)
    source, mode, pad = bound["input"], bound.get("mode", "constant"), list(bound["pad"])
    out = func(*args, **kwargs)
    return out, f"F.pad(mode={mode!r})", [source], lambda infos: _pad(tracer, source, pad, out, mode)


@_intercept(torch._VF.lstm, torch._VF.gru, torch._VF.rnn_tanh, torch._VF.rnn_relu)
def _recurrent(tracer: Tracer, func, args, kwargs):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: run on meta weights; a bidirectional layer mixes its sequence.

    Every output step of a bidirectional layer, and the final states of any layer, read the whole
    sequence: global along the scanned axis. A one-directional layer's step ``t`` reads steps
    ``0 .. t``, a field that grows along the sequence: refused, unless the sequence is already mixed.
    """
    name = f"torch._VF.{func.__name__}"
    packed = not isinstance(args[3], bool)  # (data, batch_sizes, hx, params, ...) vs (input, hx, params, bias, ...)
    source, states = args[0], flat_tensors(args[2] if packed else args[1])
    bidirectional, batch_first = args[-1] if packed else args[-2], False if packed else args[-1]
    if packed:
        out = func(*_to_meta(args), **kwargs)
    else:  # the shapes alone: the meta kernels would run every step of the sequence in Python
        features = (2 if bidirectional else 1) * states[0].shape[-1]
        sequence = torch.empty((*source.shape[:-1], features), dtype=source.dtype, device="meta")
        out = (sequence, *(torch.empty(state.shape, dtype=state.dtype, device="meta") for state in states))

    def step(infos):
        if packed:
            raise _Reject("it runs over a packed sequence, whose steps have different batch sizes")
        if any(state in tracer.info for state in states):
            raise _Reject("its initial state depends on the input")
        time, batch = (1, 0) if batch_first else (0, 1)
        info = tracer.traced(source)
        final = tracer.mix(info, [time, 2])
        if bidirectional or not _spatial(info.layout[time]):
            sequence = tracer.mix(info, [time, 2] if bidirectional else [2])
            results: list[Any] = [replace(sequence, layout=info.layout[:2] + (_plain(out[0].shape[2]),))]
        else:  # the final states still read the whole sequence
            reason = "a one-directional recurrent layer's step t sees steps 0 .. t: no single receptive field"
            results = [Unsupported(tracer.error(name, reason))]
        for state in out[1:]:
            results.append(replace(final, layout=(_plain(state.shape[0]), info.layout[batch], _plain(state.shape[2]))))
        return tuple(results)

    return out, name, [source, *states], step
