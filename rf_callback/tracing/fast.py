"""The tracer's fast path: the commonest functions followed before they reach ATen's dispatcher.

Through the dispatcher, each operation of a trace costs tens of microseconds of Python (the
dispatch mode and its wrappers, Python meta kernels, decompositions into several operations),
more than a small mobile network spends computing it for real. A *lowering* names the one ATen
operation a function runs, with the arguments the dispatcher would pass it (``F.relu(x,
inplace=True)`` is ``aten.relu_.default(x)``); :func:`run_lowered` then does what the dispatch
mode would do with that operation (the same meta output, the same handler, the same refusal
rules), without the trip. A lowering returns None wherever it is not certain of the operation
(unusual arguments or layouts): the function then runs as usual.

Two extensions of the same idea:

* ``F.linear`` is lowered to the composite ``aten.linear`` itself, which the dispatcher would split
  into a transpose, views and a matrix product; the tracer has a handler for it whole.
* A module whose whole ``forward`` is one lowered function (``nn.Conv2d``, eval ``nn.BatchNorm2d``,
  ``nn.ReLU``, ``nn.Linear``...) is followed by :func:`run_module_lowered` from the trace's wrapper
  of its forward, skipping the forward's Python and the function mode as well.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rf_callback.tracing.layout import Traced
from rf_callback.tracing.shortcuts import (
    _like,
    _operands,
    _registry,
    _shortcut,
    _standard_format,
    _to_meta,
    _writes_first,
    per_operation,
)

if TYPE_CHECKING:
    from rf_callback.tracing.engine import Tracer

aten = torch.ops.aten

Lowering = tuple[Any, tuple, dict]
"""An ATen operation with its positional and keyword arguments, as the dispatcher passes them."""

_LOWERINGS: dict[Any, Any] = {}
_lowers = _registry(_LOWERINGS)


def run_lowered(tracer: Tracer, func: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` followed through its lowering, or None where the usual path must run it.

    Tensor subclasses with their own ``__torch_function__`` take the usual path (they may wrap the
    output), and so does everything inside a function the interceptor makes the tracer ignore.
    """
    lower = _LOWERINGS.get(func)
    if lower is None or tracer.transparent or any(kind is not torch.Tensor for kind in types):
        return None
    try:
        lowering = lower(*args, **kwargs)
    except TypeError:  # arguments the lowering does not take (alpha=, out=...): the usual path handles them
        return None
    return None if lowering is None else _run(tracer, lowering)


def module_lowering(module: torch.nn.Module) -> Any:
    """``(module, input) -> Lowering | None`` for a module whose whole forward is one lowered function, or None.

    Only the exact classes, running the ``forward`` PyTorch defines (not one patched on the class or
    the instance), called on one plain tensor.
    """
    found = _MODULE_LOWERINGS.get(type(module))
    if found is None or "forward" in vars(module) or type(module).forward is not found[0]:
        return None
    return found[1]


def run_module_lowered(tracer: Tracer, lowering: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)``'s output followed through its lowering, or None where its forward must run it.

    Skips the forward's Python and the function mode, as :func:`run_lowered` skips the dispatcher.
    """
    if tracer.transparent or kwargs or len(args) != 1 or type(args[0]) is not torch.Tensor:
        return None
    with torch._C.DisableTorchFunction():  # what the tracer reads and makes, the function mode does not see
        found = lowering(module, args[0])
        return None if found is None else _run(tracer, found)


def _run(tracer: Tracer, lowering: Lowering) -> Any:
    operation, operation_args, operation_kwargs = lowering
    # Activations and BatchNorm of an input followed exactly, nothing else input-dependent: its very info.
    result_info = tracer.info.get(operation_args[0]) if _same_units(operation) else None
    exact = type(result_info) is Traced and result_info.lost is None
    # (Traced tensors are meta tensors: a module's parameters, on their device, need no lookup.)
    if not exact or any(t.is_meta and t in tracer.info for t in _operands(operation_args[1:], {})):
        result_info = None
    # As inside the dispatch mode, the tracer does not see its own work (the meta output, the
    # tensors a handler makes to measure a piece).
    with torch._C._DisableTorchDispatch():
        first, first_output = operation_args[0], _first_output(operation)
        if result_info is not None and _standard_format(first) is not None:
            # What the shortcuts answer for these (an in-place one its input, the others a tensor like it),
            # without their checks; BatchNorm's statistics are not made, as nobody reads them.
            out = first if _writes_first(operation) else _like(first)
            out = (out,) if first_output else out
        else:
            out = _shortcut(operation, operation_args, operation_kwargs)
        if out is None:
            out = operation(*_to_meta(operation_args), **{k: _to_meta(v) for k, v in operation_kwargs.items()})
        result = out[0] if first_output else tuple(out) if isinstance(out, list) else out
        if result_info is not None:
            tracer.info[result] = result_info  # what the handler would answer
            tracer.computed += 1
        else:
            tracer.record(operation, operation_args, operation_kwargs, out)
    return result


_SAME_UNITS = {
    aten.relu.default,
    aten.relu_.default,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.hardsigmoid.default,
    aten.hardsigmoid_.default,
    aten.silu.default,
    aten.silu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.sigmoid.default,
    aten.native_batch_norm.default,
}
"""Lowered operations whose (first) output's units see what their first argument's units see, no more: elementwise
activations and eval-mode BatchNorm. The handlers give that output the input's very info; so does the fast path,
without them, where that input has been followed exactly and nothing else depends on the input."""


_FIRST_OUTPUT = {aten.native_batch_norm.default}
"""Operations of several outputs whose function returns the first (the others are saved statistics)."""

_same_units = per_operation(_SAME_UNITS.__contains__)
_first_output = per_operation(_FIRST_OUTPUT.__contains__)


def _sizes(value: Any, count: int) -> list[int] | None:
    """An ``int[count]`` argument as ATen receives it: an int repeated, a sequence as a list; None otherwise."""
    if type(value) is int:
        return [value] * count
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return list(value)
    return None


def _convolution(count: int) -> Any:
    """The lowering of ``conv{count}d``: a batched, real-valued convolution with numeric padding is ``aten.convolution``."""

    def lower(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Lowering | None:
        if input.dim() != count + 2 or weight.dim() != count + 2 or input.is_complex() or type(groups) is not int:
            return None
        sizes = [_sizes(value, count) for value in (stride, padding, dilation)]
        if any(size is None for size in sizes) or (bias is not None and bias.dtype != input.dtype):
            return None
        return aten.convolution.default, (input, weight, bias, *sizes, False, [0] * count, groups), {}

    return lower


for _count, _function in enumerate((torch.conv1d, torch.conv2d, torch.conv3d), start=1):
    _LOWERINGS[_function] = _convolution(_count)


@_lowers(F.linear)
def _linear(input, weight, bias=None) -> Lowering | None:
    """``input @ weight.T + bias`` over the last dim of a batched input, with parameters: ``aten.linear`` whole.

    Unlike the other lowerings this is not the operation the dispatcher runs: it splits the composite
    ``aten.linear`` into a transpose, views and a matrix product, which cost several times more to
    follow. The tracer follows it whole (its handler: the input's last dimension mixes). A weight or
    bias that is itself traced (on the meta device) takes the usual path.
    """
    if input.dim() < 2 or input.is_complex() or weight.dim() != 2 or weight.is_meta or weight.dtype != input.dtype:
        return None
    if bias is not None and (bias.is_meta or bias.dtype != input.dtype or bias.dim() != 1):
        return None
    return aten.linear.default, (input, weight, bias), {}


@_lowers(F.batch_norm)
def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
) -> Lowering | None:
    """Eval-mode BatchNorm with running statistics: ``aten.native_batch_norm``.

    Statistics of another length than the input's channels take the usual path, whose check refuses them.
    """
    if training or running_mean is None or running_var is None or eps < 0 or input.dim() < 2:
        return None
    channels = input.shape[1]
    if any(t is not None and t.numel() != channels for t in (running_mean, running_var, weight, bias)):
        return None
    arguments = (input, weight, bias, running_mean, running_var, False, float(momentum), float(eps))
    return aten.native_batch_norm.default, arguments, {}


def _activation(operation: Any, in_place: Any) -> Any:
    def lower(input, inplace=False) -> Lowering:
        return (in_place if inplace else operation), (input,), {}

    return lower


for _function, _operation, _in_place in (
    (F.relu, aten.relu.default, aten.relu_.default),
    (F.hardswish, aten.hardswish.default, aten.hardswish_.default),
    (F.hardsigmoid, aten.hardsigmoid.default, aten.hardsigmoid_.default),
    (F.silu, aten.silu.default, aten.silu_.default),
):
    _LOWERINGS[_function] = _activation(_operation, _in_place)


@_lowers(F.hardtanh)
def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False) -> Lowering | None:
    if min_val > max_val:
        return None
    return (aten.hardtanh_.default if inplace else aten.hardtanh.default), (input, min_val, max_val), {}


@_lowers(F.relu6)
def _relu6(input, inplace=False) -> Lowering:
    return (aten.hardtanh_.default if inplace else aten.hardtanh.default), (input, 0, 6), {}


@_lowers(torch.sigmoid, torch.Tensor.sigmoid)
def _sigmoid(input) -> Lowering:
    return aten.sigmoid.default, (input,), {}


def _binary(operation: Any) -> Any:
    def lower(input, other) -> Lowering | None:
        both = isinstance(input, torch.Tensor) and isinstance(other, torch.Tensor)  # not x + 1: a wrapped number
        return (operation, (input, other), {}) if both else None

    return lower


for _functions, _operation in (
    ((torch.add, torch.Tensor.add), aten.add.Tensor),
    ((torch.Tensor.add_,), aten.add_.Tensor),
    ((torch.mul, torch.Tensor.mul), aten.mul.Tensor),
    ((torch.Tensor.mul_,), aten.mul_.Tensor),
):
    for _function in _functions:
        _LOWERINGS[_function] = _binary(_operation)


@_lowers(F.adaptive_avg_pool2d)
def _adaptive_avg_pool2d(input, output_size) -> Lowering | None:
    """Global average pooling of a contiguous image: ``aten.mean`` over its last two dims, kept."""
    sizes = [output_size] * 2 if type(output_size) is int else list(output_size)
    unambiguous = input.is_contiguous() and not input.is_contiguous(memory_format=torch.channels_last)
    if sizes != [1, 1] or input.dim() != 4 or not unambiguous:
        return None
    return aten.mean.dim, (input, [-1, -2], True), {}


def _ints(values: Any) -> list[int] | None:
    """A shape or a list of dims as ATen receives it, from ``f(1, -1)`` or ``f((1, -1))``; None if not all ints."""
    if len(values) == 1 and isinstance(values[0], (tuple, list)):  # torch.Size is a tuple
        values = values[0]
    return list(values) if all(type(v) is int for v in values) else None


def _dim(dim: Any, ndim: int) -> int | None:
    """``dim`` wrapped into ``0 .. ndim - 1``, or None where ATen would refuse it."""
    if type(dim) is not int or not -ndim <= dim < max(ndim, 1):
        return None
    return dim + ndim if dim < 0 else dim


@_lowers(torch.Tensor.view)
def _view(input, *shape) -> Lowering | None:
    sizes = _ints(shape)
    return (aten.view.default, (input, sizes), {}) if sizes is not None else None


@_lowers(torch.Tensor.reshape, torch.reshape)
def _reshape(input, *shape) -> Lowering | None:
    """A reshape of a contiguous tensor is a view, and ATen passes it the shape asked for (with its -1)."""
    sizes = _ints(shape)
    return (aten.view.default, (input, sizes), {}) if sizes is not None and input.is_contiguous() else None


@_lowers(torch.Tensor.flatten, torch.flatten)
def _flatten(input, start_dim=0, end_dim=-1) -> Lowering | None:
    """Flattening dims ``start .. end`` of a contiguous tensor: a view to the shape ATen computes."""
    start, end = _dim(start_dim, input.dim()), _dim(end_dim, input.dim())
    if start is None or end is None or start >= end or not input.is_contiguous():
        return None  # one dim (ATen returns the tensor itself), a scalar, an error, or a copy
    shape = list(input.shape)
    return aten.view.default, (input, [*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :]]), {}


@_lowers(torch.Tensor.transpose, torch.transpose)
def _transpose(input, dim0, dim1) -> Lowering | None:
    return (aten.transpose.int, (input, dim0, dim1), {}) if type(dim0) is type(dim1) is int else None


@_lowers(torch.Tensor.permute, torch.permute)
def _permute(input, *dims) -> Lowering | None:
    order = _ints(dims)
    return (aten.permute.default, (input, order), {}) if order is not None else None


@_lowers(torch.Tensor.contiguous)
def _contiguous(input, memory_format=torch.contiguous_format) -> Lowering | None:
    """A copy in ``memory_format``; None where ATen returns the tensor itself."""
    if input.is_contiguous(memory_format=memory_format):
        return None
    return aten.clone.default, (input,), {"memory_format": memory_format}


@_lowers(torch.Tensor.chunk, torch.chunk)
def _chunk(input, chunks, dim=0) -> Lowering | None:
    """``chunks`` pieces of ``ceil(length / chunks)``: ``aten.split`` (the default dim left out, as ATen does)."""
    d = _dim(dim, input.dim())
    if d is None or type(chunks) is not int or chunks < 1 or input.shape[d] == 0:
        return None
    size = -(-input.shape[d] // chunks)
    return aten.split.Tensor, (input, size) if dim == 0 else (input, size, dim), {}


@_lowers(torch.cat)
def _cat(tensors, dim=0) -> Lowering | None:
    if not isinstance(tensors, (tuple, list)) or not tensors or type(dim) is not int:
        return None
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return aten.cat.default, (list(tensors),) if dim == 0 else (list(tensors), dim), {}


@_lowers(torch.Tensor.mean, torch.mean)
def _mean(input, dim, keepdim=False) -> Lowering | None:
    """A mean over some dims, in the input's dtype: ``aten.mean.dim`` (``keepdim=False`` left out, as ATen does)."""
    dims = [dim] if type(dim) is int else _ints((dim,))
    if not dims or type(keepdim) is not bool:
        return None
    return aten.mean.dim, (input, dims, True) if keepdim else (input, dims), {}


# --------------------------------------------------------------------------------------------
# Modules whose forward is one lowered function (in eval mode, as the trace runs them)
# --------------------------------------------------------------------------------------------

_MODULE_LOWERINGS: dict[type, tuple[Any, Any]] = {}
"""Module class -> (its ``forward`` as PyTorch defines it, the lowering of a call)."""


def _lowers_module(kind: type, lower: Any) -> None:
    _MODULE_LOWERINGS[kind] = (kind.forward, lower)


def _module_convolution(count: int) -> Any:
    def lower_module(module, input) -> Lowering | None:
        padding, bias = module.padding, module.bias
        if module.padding_mode != "zeros" or type(padding) is str or input.dim() != count + 2 or input.is_complex():
            return None  # the weight is the module's own: its rank and groups are right
        if bias is not None and bias.dtype != input.dtype:
            return None
        stride, dilation = list(module.stride), list(module.dilation)
        return (
            aten.convolution.default,
            (input, module.weight, bias, stride, list(padding), dilation, False, [0] * count, module.groups),
            {},
        )

    return lower_module


for _count, _kind in enumerate((torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d), start=1):
    _lowers_module(_kind, _module_convolution(_count))


def _module_batch_norm(dims: tuple[int, ...]) -> Any:
    def lower_module(module, input) -> Lowering | None:
        """BatchNorm with running statistics, as ``_BatchNorm.forward`` runs it in eval mode."""
        if module.training or input.dim() not in dims or module.momentum is None:
            return None
        buffers, parameters = module._buffers, module._parameters  # not through Module.__getattr__
        return _batch_norm(
            input,
            buffers["running_mean"],
            buffers["running_var"],
            parameters["weight"],
            parameters["bias"],
            False,
            module.momentum,
            module.eps,
        )

    return lower_module


for _dims, _kind in (((2, 3), torch.nn.BatchNorm1d), ((4,), torch.nn.BatchNorm2d), ((5,), torch.nn.BatchNorm3d)):
    _lowers_module(_kind, _module_batch_norm(_dims))


def _module_activation(function: Any) -> Any:
    lower = _LOWERINGS[function]

    def lower_module(module, input) -> Lowering:
        return lower(input, module.inplace)

    return lower_module


def _module_global_pool(module, input) -> Lowering | None:
    return _adaptive_avg_pool2d(input, module.output_size)


_lowers_module(torch.nn.AdaptiveAvgPool2d, _module_global_pool)


def _module_linear(module, input) -> Lowering | None:
    return _linear(input, module.weight, module.bias)


_lowers_module(torch.nn.Linear, _module_linear)


for _kind, _function in (
    (torch.nn.ReLU, F.relu),
    (torch.nn.ReLU6, F.relu6),
    (torch.nn.Hardswish, F.hardswish),
    (torch.nn.Hardsigmoid, F.hardsigmoid),
    (torch.nn.SiLU, F.silu),
):
    _lowers_module(_kind, _module_activation(_function))
