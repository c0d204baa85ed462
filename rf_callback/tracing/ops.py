"""The tracer's operation handlers: each ATen operation (or function) it follows, and its geometry.

A handler ``(tracer, func, bound arguments, meta output) -> info of the output(s)`` raises
``_Reject`` when the operation has no receptive field; ``_register`` adds handlers to the registry
the engine dispatches on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from rf_callback.algebra import PadMode, layer
from rf_callback.tracing.layout import (
    PREFIX,
    Traced,
    Unsupported,
    _aligned,
    _dim_size,
    _normalize_dim,
    _plain,
    _prefix,
    _Reject,
    _reshape,
    _spatial,
    _whole_axis,
    settled,
)
from rf_callback.tracing.shortcuts import _first_output, _registry, _to_meta, elementwise, flat_tensors

if TYPE_CHECKING:
    from rf_callback.tracing.engine import Tracer

aten = torch.ops.aten

# --------------------------------------------------------------------------------------------
# Operation handlers: each returns the info of the output(s), or raises _Reject.
# --------------------------------------------------------------------------------------------

_HANDLERS: dict[Any, Any] = {}
_register = _registry(_HANDLERS)


@_register(aten.convolution.default)
def _convolution(tracer: Tracer, func, bound, out):
    if bound["transposed"]:
        return _transposed_convolution(tracer, bound, out)
    info = tracer.traced(bound["input"])
    if _spatial(info.layout[1]):  # channels are summed over; plain ones mix nothing
        info = _summed_channels(tracer, info)
    result = tracer.window(info, out, bound["weight"].shape[2:], bound["stride"], bound["padding"], bound["dilation"])
    return result.with_layout((result.layout[0], _plain(out.shape[1]), *result.layout[2:]))


def _summed_channels(tracer: Tracer, info: Traced) -> Traced:
    """``info`` after an operation that sums over its channels (dimension 1), which hold part of a spatial axis.

    Space-to-depth written as views (TResNet's stem) moves each axis's offsets within a block into
    the channels: a convolution sums them, so every position sees its whole block, and the blocks
    left in the spatial dimensions are the axis, on a coarser grid (:func:`settled`).
    """
    info = tracer.mix(info, [1])
    if _prefix(info.layout[1]) is not None:
        return info
    return settled(info.with_layout((info.layout[0], _plain(_dim_size(info.layout[1])), *info.layout[2:])))


@_register(aten.im2col.default)
def _im2col(tracer, func, bound, out):
    """``nn.Unfold``: each column holds one window (its offsets in the channels), like a convolution's."""
    source = bound["self"]
    lengths = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, d, p, s in zip(
            source.shape[-2:], bound["kernel_size"], bound["dilation"], bound["padding"], bound["stride"]
        )
    ]
    info = tracer.mix(tracer.traced(source), [source.dim() - 3])  # a column holds every channel
    grid = torch.empty(lengths, device="meta")
    result = tracer.window(info, grid, bound["kernel_size"], bound["stride"], bound["padding"], bound["dilation"])
    layout = result.layout[:-3] + (_plain(out.shape[-2]), result.layout[-2] + result.layout[-1])
    return result.with_layout(layout)


@_register(aten.col2im.default)
def _col2im(tracer, func, bound, out):
    """``F.fold`` (VOLO's outlook attention): each output pixel sums the columns of the windows that cover it.

    The adjoint of ``nn.Unfold``: the columns' last dimension holds the grid of windows (whole axes,
    row-major), their channels the offsets; output position ``o`` reads window ``i`` where
    ``o = i * stride - padding + j * dilation`` for an offset ``j``, as a transposed convolution does.
    """
    source = bound["self"]
    info = tracer.traced(source)
    if _spatial(info.layout[-2]):
        raise _Reject("it folds columns whose channels hold spatial positions")
    kernel, stride, padding, dilation = (bound[name] for name in ("kernel_size", "stride", "padding", "dilation"))
    sizes = list(bound["output_size"])
    grid = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, d, p, s in zip(sizes, kernel, dilation, padding, stride)]
    windows = info.layout[-1]
    if _spatial(windows):  # the windows' grid, flattened: each axis whole, in order
        if _prefix(windows) is not None or [length for _, length in windows] != grid:
            raise _Reject("it folds columns that are not one grid of windows")
        axes = [key for key, _ in windows]
        if any(type(key) is not int for key in axes):
            raise _Reject("it folds columns that are not one grid of windows")
        dims = tuple(((key, n),) for key, n in zip(axes, grid))
    else:
        dims = tuple(_plain(n) for n in grid)
    info = info.with_layout(info.layout[:-1] + dims)

    def sources_of(i: int, n: int, m: int) -> Sources:
        return _transposed_sources(n, m, kernel[i], stride[i], padding[i], dilation[i])

    result = _resampled(tracer, info, out, 2, sources_of)
    return result.with_layout(result.layout[:-3] + (_plain(out.shape[-3]),) + result.layout[-2:])


@_register(aten.unfold.default)
def _unfold(tracer, func, bound, out):
    """``Tensor.unfold(d, size, step)`` (HaloNet's key windows): sliding windows along one dimension, the window's
    offsets in a new last dimension, which is treated like a convolution's channels (each holds the window)."""
    source = bound["self"]
    info = tracer.traced(source)
    d = _normalize_dim(bound["dimension"], source.dim())
    layout = list(info.layout)
    if _spatial(layout[d]):
        axis = _whole_axis(layout[d], "slides a window over")
        windows = out.shape[d]
        field = info.field.window(axis, bound["size"], bound["step"], 0, windows)
        layout[d] = ((axis, windows),)
        return Traced(field, (*layout, _plain(out.shape[-1])), info.equivariant)
    layout[d] = _plain(out.shape[d])
    return info.with_layout((*layout, _plain(out.shape[-1])))


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
    if not isinstance(out, (tuple, list)):
        return result
    count = len(bound["kernel_size"])
    options = [bound["kernel_size"], bound["stride"] or bound["kernel_size"], bound["padding"], bound["dilation"]]
    kernel, stride, padding, dilation = (list(v) * count if len(v) == 1 else list(v) for v in options)
    lengths = zip(bound["self"].shape[-count:], out[0].shape[-count:])
    windows = [(n, _pool_windows(n, m, *rest)) for (n, m), *rest in zip(lengths, kernel, stride, padding, dilation)]
    _keep_windows(tracer, result, windows)
    return (result, result)


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
    """Adaptive pooling: bin ``i`` of ``m`` over ``n`` positions reads ``[floor(i * n / m), ceil((i + 1) * n / m))``.

    Where ``m`` divides ``n`` the bins are the windows of an ordinary pooling (kernel and stride
    ``n / m``); otherwise their sizes differ, or neighbours overlap, and each bin's field is the
    union of the positions it reads (exact, through :meth:`~rf_callback.algebra.Field.resample`).
    """
    source, result = bound["self"], _first_output(out)
    sizes = list(bound["output_size"])
    lengths = source.shape[source.dim() - len(sizes) :]
    if all(n % m == 0 for n, m in zip(lengths, sizes)):
        kernel = [n // m for n, m in zip(lengths, sizes)]
        traced = tracer.window(tracer.traced(source), result, kernel, kernel, [0], [1])
        if any(k > 1 for k in kernel):
            traced = replace(traced, equivariant=False)  # the window grows with the input
    else:
        traced = _resampled(tracer, tracer.traced(source), result, len(sizes), lambda i, n, m: _adaptive_bins(n, m))
    if not isinstance(out, (tuple, list)):
        return traced
    _keep_windows(tracer, traced, [(n, _adaptive_bins(n, m)) for n, m in zip(lengths, sizes)])
    return (traced, traced)


def _adaptive_bins(n: int, m: int) -> Sources:
    """The positions each of the ``m`` bins of adaptive pooling over ``n`` positions reads.

    Example::
        >>> _adaptive_bins(16, 3)  # bins of 6 positions, overlapping by one
        ((0, 1, 2, 3, 4, 5), (5, 6, 7, 8, 9, 10), (10, 11, 12, 13, 14, 15))
        >>> _adaptive_bins(5, 2)
        ((0, 1, 2), (2, 3, 4))
    """
    return tuple(tuple(range(i * n // m, -(-(i + 1) * n // m))) for i in range(m))


def _pool_windows(n: int, m: int, kernel: int, stride: int, padding: int, dilation: int) -> Sources:
    """The input positions (of ``n``) each of the ``m`` windows of a pooling reads: ``u * stride - padding + j * dilation``."""
    return tuple(
        tuple(q for j in range(kernel) if 0 <= (q := u * stride - padding + j * dilation) < n) for u in range(m)
    )


def _keep_windows(tracer: Tracer, pooled: Traced, windows: Sequence[tuple[int, Sources]]) -> None:
    """Files the windows of a max pooling that returns indices, under its output's field, for :func:`_max_unpool`.

    ``windows`` holds, per pooled dimension (the last ones), the input length and the positions
    each window reads. The indices carry the pooled field through views (``squeeze``,
    ``unsqueeze``, ``clone``) unchanged, so an unpooling finds the windows from its indices,
    however far from the pooling it runs. Kept: the windows of each spatial axis, and the input
    lengths (other than 1) over which the indices are flat.
    """
    dims = pooled.layout[len(pooled.layout) - len(windows) :]
    along = {dim[0][0]: reads for dim, (_, reads) in zip(dims, windows) if len(dim) == 1 and type(dim[0][0]) is int}
    lengths = tuple(n for n, _ in windows if n > 1)
    tracer.pool_windows[id(pooled.field)] = (pooled.field, along, lengths)


@_register(aten.max_unpool2d.default, aten.max_unpool3d.default)
def _max_unpool(tracer, func, bound, out):
    """``nn.MaxUnpool1d/2d/3d``: each pooled value goes back to the position of its window's maximum.

    Which position receives a value depends on the data; which input pixels *can* affect an output
    position does not: those seen by the values and indices of every pooled unit whose window
    covers that position (one window, unless windows overlap). That union is the field, "pixels
    that can affect this unit, for some input"; a position no window covers receives nothing, and
    sees nothing. The windows come from the max pooling that made the indices (:func:`_keep_windows`).
    """
    values, indices, count = bound["self"], bound["indices"], len(bound["output_size"])
    index_info = tracer.get(indices)
    found = tracer.pool_windows.get(id(index_info.field)) if type(index_info) is Traced else None
    if found is None or found[0] is not index_info.field:
        raise _Reject(
            "its indices do not come from a max pooling followed here (return_indices=True), so where its values"
            " land is unknown"
        )
    _, windows, lengths = found
    unpooled = tuple(n for n in out.shape[out.dim() - count :] if n > 1)
    if unpooled[1:] != lengths[1:]:  # indices are flat over the pooled input: only the first axis may differ
        raise _Reject(
            f"it unpools indices that are flat over {'x'.join(map(str, lengths))} positions to"
            f" {'x'.join(map(str, unpooled))}, so they land on other rows; pass output_size= the pooled input's size"
        )
    operands = [_aligned(info, out.dim()) for t in (values, indices) if type(info := tracer.get(t)) is Traced]
    info = tracer.combine(operands, tracer.broadcast(operands, values.shape), func)
    dims = info.layout[len(info.layout) - count :]

    def sources_of(i: int, n: int, m: int) -> Sources:
        dim = dims[i]
        if not _spatial(dim):  # no position to tell apart: every output reads what every input sees
            return (tuple(range(n)),) * m
        reads = windows.get(dim[0][0]) if len(dim) == 1 else None
        if reads is None or len(reads) != n:
            raise _Reject("its indices were not pooled along the axes its values hold")
        receivers: list[list[int]] = [[] for _ in range(m)]
        for u, window in enumerate(reads):
            for p in window:
                if p < m:
                    receivers[p].append(u)
        return tuple(map(tuple, receivers))

    return _resampled(tracer, info, out, count, sources_of)


def _pad(tracer: Tracer, source: torch.Tensor, pad: Sequence[int], out: torch.Tensor, mode: PadMode) -> Traced:
    info = tracer.traced(source)
    field = info.field
    layout = list(info.layout)
    equivariant = info.equivariant
    for i in range(len(pad) // 2):
        d = source.dim() - 1 - i
        before = pad[2 * i]
        dim = info.layout[d]
        if _spatial(dim) and (len(dim) > 1 or type(dim[0][0]) is not int):
            layout[d], equivariant = _tokens_in_front(dim, before, pad[2 * i + 1], mode), False
        elif _spatial(dim):
            axis = dim[0][0]
            field = field.pad(axis, before, out.shape[d], mode)
            layout[d] = ((axis, out.shape[d]),)
        else:
            layout[d] = _plain(out.shape[d])
    # Reflect, replicate and circular padding copy pixels from the border: on a crop they would copy
    # from the crop's border instead.
    return Traced(field, tuple(layout), equivariant and mode == "constant")


def _tokens_in_front(dim: tuple, before: int, after: int, mode: PadMode) -> tuple:
    """A dimension of flattened positions (tokens) padded with ``before`` constants in front: class tokens.

    CoaT's convolutional relative position encoding pads its grid of tokens with a zero in front, in
    the place of the class token it left out. Anything else along such a dimension has no place in a
    grid, hence ``_Reject``.
    """
    if mode != "constant" or after != 0 or before <= 0:
        raise _Reject("it pads a dimension that mixes a spatial axis with others")
    key, rest = (PREFIX, dim) if _prefix(dim) is None else (_prefix(dim), dim[1:])
    count = before + (dim[0][1] if _prefix(dim) is not None else 0)
    return ((key, count), *rest)


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


def _cut(tracer: Tracer, source: torch.Tensor, d: int, start: int, step: int, length: int) -> Traced | None:
    """A slice ``[start::step]`` of ``length`` positions along dim ``d``.

    Along a dimension with class tokens, a slice of tokens only is a constant (None) or, once they
    are fed, sees what the whole grid sees; the slice of everything after them is the grid.
    """
    info = tracer.traced(source)
    dim = info.layout[d]
    layout = list(info.layout)
    field, equivariant = info.field, info.equivariant
    if _prefix(dim) is not None:
        tokens = dim[0][1]
        if start + step * (length - 1) < tokens:
            if _prefix(dim) is PREFIX:
                return None  # class tokens only: parameters, not the input
            layout[d] = _plain(length)
            return Traced(field, tuple(layout), False)
        if start != tokens or step != 1 or start + length != source.shape[d]:
            raise _Reject("it slices a dimension of class tokens and positions other than at their boundary")
        layout[d] = dim[1:]
        return Traced(field, tuple(layout), False)
    if _spatial(dim):
        axis = _whole_axis(dim, "slices")
        field = field.take(axis, start, step, length)
        layout[d] = ((axis, length),)
        # Only [::step] shifts with the input; a cut at fixed positions does not.
        equivariant = equivariant and start == 0 and length == -(-source.shape[d] // step)
    else:
        layout[d] = _plain(length)
    return Traced(field, tuple(layout), equivariant)


@_register(aten.slice.Tensor)
def _slice(tracer, func, bound, out):
    source = bound["self"]
    d = _normalize_dim(bound["dim"], source.dim())
    n = source.shape[d]
    start = bound["start"] if bound["start"] is not None else 0
    start = min(max(start + n if start < 0 else start, 0), n)
    return _cut(tracer, source, d, start, bound["step"], out.shape[d])


@_register(aten.select.int)
def _select(tracer, func, bound, out):
    source = bound["self"]
    d = _normalize_dim(bound["dim"], source.dim())
    index = bound["index"] % source.shape[d]
    result = _cut(tracer, source, d, index, 1, 1)
    return None if result is None else result.with_layout(result.layout[:d] + result.layout[d + 1 :])


@_register(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
def _split(tracer, func, bound, out):
    source = bound["self"]
    d = _normalize_dim(bound["dim"], source.dim())
    results, start = [], 0
    for piece in out:
        length = 1 if func is aten.unbind.int else piece.shape[d]
        result = _cut(tracer, source, d, start, 1, length)
        if func is aten.unbind.int and result is not None:
            result = result.with_layout(result.layout[:d] + result.layout[d + 1 :])
        results.append(result)
        start += length
    return tuple(results)


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._reshape_alias.default)
_COPIES = (
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
)


@_register(*_VIEWS, aten.view_copy.default)
def _view(tracer, func, bound, out):
    info = tracer.traced(bound["self"])
    return info.with_layout(_reshape(info.layout, out.shape))


@_register(*_COPIES, aten.to.dtype, aten.to.device, aten.to.dtype_layout)
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
    return info.with_layout(tuple(info.layout[d] for d in order))


@_register(aten.unsqueeze.default)
def _unsqueeze(tracer, func, bound, out):
    info = tracer.traced(bound["self"])
    d = _normalize_dim(bound["dim"], out.dim())
    return info.with_layout(info.layout[:d] + ((),) + info.layout[d:])


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
    return info.with_layout(layout)


@_register(aten.expand.default)
def _expand(tracer, func, bound, out):
    source = bound["self"]
    info = tracer.traced(source)
    lead = out.dim() - source.dim()
    layout = [_plain(n) for n in out.shape[:lead]]
    for d, dim in enumerate(info.layout):
        size = out.shape[lead + d]
        layout.append(dim if _dim_size(dim) == size else _plain(size))
    return info.with_layout(tuple(layout))


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
    return info.with_layout(tuple(layout))


def _class_tokens(tracer: Tracer, tensors: Sequence[torch.Tensor], d: int) -> Traced | None:
    """``cat([tokens, x], d)`` where ``x`` holds positions along ``d`` and the tokens are constants (a ViT's
    class token): ``x`` with :data:`PREFIX` tokens in front. None for any other concatenation."""
    *tokens, last = tensors
    info = tracer.get(last)
    if type(info) is not Traced or not _spatial(info.layout[d]) or any(t in tracer.info for t in tokens):
        return None
    dim, count, key = info.layout[d], sum(t.shape[d] for t in tokens), PREFIX
    if _prefix(dim) is not None:  # more tokens in front of class tokens: fed if any of them are
        count, key, dim = count + dim[0][1], _prefix(dim), dim[1:]
    layout = info.layout[:d] + (((key, count),) + dim,) + info.layout[d + 1 :]
    return Traced(info.field, layout, False)


@_register(aten.cat.default, aten.stack.default)
def _cat(tracer, func, bound, out):
    d = _normalize_dim(bound["dim"], out.dim())
    if func is aten.cat.default:
        prefixed = _class_tokens(tracer, bound["tensors"], d)
        if prefixed is not None:
            return prefixed
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
        operands.append(info.with_layout(tuple(layout)))
    layout = list(tracer.broadcast(operands, [1 if i == d else n for i, n in enumerate(out.shape)]))
    layout[d] = _plain(out.shape[d])
    result = tracer.combine(operands, tuple(layout), func)
    if tracer.varies_with_position(constants, result.layout):
        result = replace(result, equivariant=False)  # coordinate channels (CoordConv) and the like
    return result


@_register(aten.index.Tensor)
def _index(tracer, func, bound, out):
    """``x[..., order]``: gathering along one dimension that holds no position (channels, coefficients) by fixed
    indices (CSATv2's zig-zag order of DCT coefficients). Along a spatial axis, or by indices that depend on
    the input, which elements go where is data: refused."""
    source, indices = bound["self"], bound["indices"]
    info = tracer.traced(source)
    picked = [d for d, index in enumerate(indices) if index is not None]
    if any(index in tracer.info for index in indices if index is not None):
        raise _Reject("its indices depend on the input")
    if len(picked) != 1 or _spatial(info.layout[picked[0]]):
        raise _Reject("it gathers positions by indices")
    d, width = picked[0], indices[picked[0]].dim() if indices[picked[0]].dtype != torch.bool else 1
    middle = tuple(_plain(n) for n in out.shape[d : d + width])
    return info.with_layout(info.layout[:d] + middle + info.layout[d + 1 :])


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
    return info.with_layout(info.layout[:d] + (_plain(out.shape[d]),) + info.layout[d + 1 :])


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
    info = info.with_layout(layout)
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
        operands.append(info.with_layout(info.layout[:-1] + tail))
    if right in tracer.info:
        info = tracer.traced(right)
        if right.dim() == 1:
            operands.append(tracer.mix(info, [0]).with_layout(((),) * out.dim()))
        else:
            info = tracer.mix(info, [right.dim() - 2])
            middle = ((),) if left.dim() > 1 else ()
            operands.append(info.with_layout(info.layout[:-2] + middle + info.layout[-1:]))
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


@_register(aten.linear.default)
def _linear(tracer, func, bound, out):
    """``nn.Linear`` (reached only through the fast path, which checks that its weight and bias are parameters):
    each output feature sums the input's last dimension; the other dimensions stay as they are."""
    source = bound["input"]
    info = tracer.mix(tracer.traced(source), [source.dim() - 1])
    return tracer.combine(
        [info.with_layout(info.layout[:-1] + ((),))], info.layout[:-1] + (_plain(out.shape[-1]),), func
    )


# --------------------------------------------------------------------------------------------
# Elements followed one by one (see layout.Indexed): the operations that only move them.
# --------------------------------------------------------------------------------------------

_RESHAPES = {*_VIEWS, aten.view_copy.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims}


def moved_positions(func: Any, bound: dict[str, Any], positions: torch.Tensor, out: Any) -> torch.Tensor | None:
    """Where each element of ``out`` comes from, for an operation that only moves elements (views, permutes,
    slices, constant pads, elementwise operations): ``positions`` (``(axes, *input shape)``, see
    ``element_positions``) moved the same way; -1 for the constants a pad adds. None for any other operation.
    The tracer calls it with its modes off (``engine._untraced``), as it calls :func:`padded_positions`.
    """
    if not isinstance(out, torch.Tensor):
        return None
    source = bound.get("self", bound.get("input"))
    if func in _RESHAPES:
        return positions.reshape(positions.shape[0], *out.shape)
    if func in _COPIES or (elementwise(func) and tuple(out.shape) == tuple(positions.shape[1:])):
        return positions
    if func is aten.permute.default:
        return positions.permute(0, *(1 + _normalize_dim(d, source.dim()) for d in bound["dims"]))
    if func is aten.transpose.int:
        a, b = (_normalize_dim(bound[name], source.dim()) for name in ("dim0", "dim1"))
        return positions.transpose(a + 1, b + 1)
    if func is aten.unsqueeze.default:
        return positions.unsqueeze(1 + _normalize_dim(bound["dim"], out.dim()))
    if func is aten.expand.default:
        lead = [1] * (out.dim() - source.dim())
        return positions.reshape(positions.shape[0], *lead, *source.shape).expand(positions.shape[0], *out.shape)
    if func is aten.slice.Tensor:
        d = _normalize_dim(bound["dim"], source.dim())
        cut = slice(bound["start"], bound["end"], bound["step"])
        return positions[(slice(None),) * (d + 1) + (cut,)]
    if func is aten.select.int:
        return positions.select(1 + _normalize_dim(bound["dim"], source.dim()), bound["index"])
    if func is aten.constant_pad_nd.default:
        return torch.nn.functional.pad(positions, list(bound["pad"]), value=-1)
    return None


def padded_positions(mode: str, pad: Sequence[int], positions: torch.Tensor) -> torch.Tensor | None:
    """``positions`` after ``F.pad(..., pad, mode)``: -1 for the constants a constant pad adds; None for other modes."""
    if mode != "constant":
        return None
    return torch.nn.functional.pad(positions, list(pad), value=-1)


# --------------------------------------------------------------------------------------------
# Functions caught before they decompose: F.pad (mode='circular' becomes copies) and the
# recurrent layers (their kernels refuse meta inputs with real weights).
# --------------------------------------------------------------------------------------------


_FUNCTIONS: dict[Any, Any] = {}
_intercept = _registry(_FUNCTIONS)


_PAD_ARGUMENTS = ("input", "pad", "mode", "value")


@_intercept(torch.nn.functional.pad, torch._C._nn.pad)
def _functional_pad(tracer: Tracer, func, args, kwargs):
    bound = dict(zip(_PAD_ARGUMENTS, args), **kwargs)
    source, mode, pad = bound["input"], bound.get("mode", "constant"), list(bound["pad"])
    out = func(*args, **kwargs)
    return out, f"F.pad(mode={mode!r})", [source], lambda infos: _pad(tracer, source, pad, out, mode)


def _pad_moves(args: tuple, kwargs: dict, positions: torch.Tensor) -> torch.Tensor | None:
    bound = dict(zip(_PAD_ARGUMENTS, args), **kwargs)
    return padded_positions(bound.get("mode", "constant"), bound["pad"], positions)


_MOVES = {torch.nn.functional.pad: _pad_moves, torch._C._nn.pad: _pad_moves}
"""Intercepted functions that only move elements: ``(args, kwargs, positions) -> positions`` (see ``Indexed``)."""


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
            results: list[Any] = [sequence.with_layout(info.layout[:2] + (_plain(out[0].shape[2]),))]
        else:  # the final states still read the whole sequence
            reason = "a one-directional recurrent layer's step t sees steps 0 .. t: no single receptive field"
            results = [Unsupported(tracer.error(name, reason))]
        for state in out[1:]:
            results.append(final.with_layout((_plain(state.shape[0]), info.layout[batch], _plain(state.shape[2]))))
        return tuple(results)

    return out, name, [source, *states], step


# --------------------------------------------------------------------------------------------
# Upsampling: every output position reads a set of input positions, known exactly.
# --------------------------------------------------------------------------------------------

Sources = tuple[tuple[int, ...], ...]


def _resampled(tracer: Tracer, info: Traced, out: torch.Tensor, count: int, sources_of: Any) -> Traced:
    """``info`` after a layer that resamples its last ``count`` dims: ``sources_of(i, n, m)`` says which of
    the ``n`` input positions of the ``i``-th of them each of its ``m`` output positions reads.

    The boxes stay exact (unions of the boxes read); the rows are not shift-equivariant (a crop
    would resample on another grid), so maps of them use whole images.
    """
    field = info.field
    lead = len(info.layout) - count
    layout = list(info.layout[:lead])
    for i in range(count):
        dim, m = info.layout[lead + i], out.shape[out.dim() - count + i]
        if not _spatial(dim):  # one position, or an axis every unit sees whole: the same field everywhere
            if not any(sources_of(i, _dim_size(dim), m)):
                raise _Reject("none of its output positions reads an input position")
            layout.append(_plain(m))
            continue
        axis, n = _whole_axis(dim, "resamples"), dim[0][1]
        sources = sources_of(i, n, m)
        if not any(sources):
            raise _Reject("none of its output positions reads an input position")
        field = field.resample(axis, sources)
        layout.append(((axis, m),))
    return Traced(field, tuple(layout), equivariant=False)


def _transposed_sources(n: int, m: int, kernel: int, stride: int, padding: int, dilation: int) -> Sources:
    """Which inputs each output of a transposed convolution reads: ``o = i * stride - padding + j * dilation``."""
    return tuple(
        tuple(
            q // stride
            for j in range(kernel)
            if (q := o + padding - j * dilation) % stride == 0 and 0 <= q // stride < n
        )
        for o in range(m)
    )


def _transposed_convolution(tracer: Tracer, bound, out) -> Traced:
    info = _summed_channels(tracer, tracer.traced(bound["input"]))
    kernel = list(bound["weight"].shape[2:])
    count = len(kernel)
    stride, padding, dilation = (
        list(value) * count if len(value) == 1 else list(value)
        for value in (bound["stride"], bound["padding"], bound["dilation"])
    )

    def sources_of(i: int, n: int, m: int) -> Sources:
        return _transposed_sources(n, m, kernel[i], stride[i], padding[i], dilation[i])

    result = _resampled(tracer, info, out, count, sources_of)
    layout = list(result.layout)
    layout[1] = _plain(out.shape[1])
    return result.with_layout(tuple(layout))


@_register(aten.pixel_shuffle.default, aten.pixel_unshuffle.default)
def _pixel_shuffle(tracer, func, bound, out):
    """Channels to space (each output position reads position ``u // r``) and back (a ``r x r`` block)."""
    info = tracer.traced(bound["self"])
    channels = info.layout[-3] if len(info.layout) >= 3 else ()
    if _spatial(channels):
        raise _Reject("it moves values between a spatial axis and the channels")
    if func is aten.pixel_shuffle.default:
        r = bound["upscale_factor"]
        result = _resampled(tracer, info, out, 2, lambda i, n, m: tuple((u // r,) for u in range(m)))
    else:
        r = bound["downscale_factor"]
        result = _resampled(
            tracer, info, out, 2, lambda i, n, m: tuple(tuple(range(u * r, u * r + r)) for u in range(m))
        )
    layout = list(result.layout)
    layout[-3] = _plain(out.shape[-3])
    return result.with_layout(tuple(layout))


@_register(aten.roll.default)
def _roll(tracer, func, bound, out):
    """A circular shift (Swin's shifted windows): output position ``u`` reads ``(u - shift) mod n``.

    The boxes are exact, wrap-around included; the geometry (size, stride, padding) is the shift's
    in the interior, as interpolation's is, not the whole axis that the wrap-around makes one period.
    """
    source = bound["self"]
    info = tracer.traced(source)
    shifts, dims = list(bound["shifts"]), list(bound["dims"] or [])
    if not dims:  # the flattened tensor is rolled
        if any(_spatial(dim) for dim in info.layout):
            raise _Reject("it rolls the flattened tensor across a spatial axis")
        return info
    field, layout = info.field, list(info.layout)
    for shift, d in zip(shifts, (_normalize_dim(d, source.dim()) for d in dims)):
        dim = info.layout[d]
        if not _spatial(dim) or shift % source.shape[d] == 0:
            continue
        axis, n = _whole_axis(dim, "rolls"), dim[0][1]
        field = field.resample(axis, tuple(((u - shift) % n,) for u in range(n)), layer(padding=shift))
    return Traced(field, tuple(layout), equivariant=False)


def _axis_scales(value: Any, count: int) -> list[Any]:
    if value is None:
        return [None] * count
    return (
        list(value) * count
        if isinstance(value, (list, tuple)) and len(value) == 1
        else (list(value) if isinstance(value, (list, tuple)) else [value] * count)
    )


_SOURCES: dict[tuple, Sources] = {}


def _probed_sources(
    key: tuple, count: int, axis: int, n: int, m: int, dtype: torch.dtype, run: Any, lengths: Sequence[int]
) -> Sources:
    """Which of ``n`` inputs each of ``m`` outputs of an interpolation reads with a nonzero weight along ``axis``.

    Interpolation is separable, so the real operation ``run`` on the ``n`` one-hot signals along
    ``axis`` (the other axes of ``lengths``, see :func:`_probe_lengths`) answers it exactly, as the
    kernel computes it (clamping, ``align_corners`` and its floating-point index arithmetic
    included), for ``dtype``. ``key`` names everything the answer depends on; answers are kept.
    """
    found = _SOURCES.get(key)
    if found is not None:
        return found
    lengths = [n if b == axis else lengths[b] for b in range(count)]
    with _disable_current_modes(), torch.no_grad():
        signals = torch.eye(n, dtype=dtype).reshape(n, 1, *(n if b == axis else 1 for b in range(count)))
        result = run(signals.expand(n, 1, *lengths).contiguous())
        weights = result[(slice(None), 0, *(slice(None) if b == axis else 0 for b in range(count)))]
        if weights.shape[1] != m:
            raise _Reject(f"its output length {m} along axis {axis} could not be reproduced")
        nonzero = weights.ne(0).T.tolist()
    found = _SOURCES[key] = tuple(tuple(i for i, read in enumerate(row) if read) for row in nonzero)
    return found


def _real_axes(axis: int, out: torch.Tensor, count: int) -> list[bool]:
    """The other axes a probe along ``axis`` keeps as they are: those that end at one output position.

    The others get length 2 and scale 1 (cheap, and the weights along ``axis`` are the same); but
    PyTorch's antialiasing kernels weigh ``axis`` differently when another axis ends at one position
    (every output row then reads the first row's inputs), and the probe must see what the kernel does.
    """
    return [b != axis and out.shape[out.dim() - count + b] == 1 for b in range(count)]


def _probe_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@_intercept(torch.nn.functional.interpolate)
def _interpolate(tracer: Tracer, func, args, kwargs):
    """``F.interpolate`` / ``nn.Upsample`` in every mode, caught before it can decompose into indexing."""
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    bound = dict(zip(names, args), **kwargs)
    source, mode = bound["input"], bound.get("mode", "nearest")
    out = func(*args, **kwargs)
    count = source.dim() - 2
    sizes, scales = _axis_scales(bound.get("size"), count), _axis_scales(bound.get("scale_factor"), count)
    options = (mode, bound.get("align_corners"), bound.get("recompute_scale_factor"), bound.get("antialias", False))
    dtype = _probe_dtype(source)

    def sources_of(i: int, n: int, m: int) -> Sources:
        real = _real_axes(i, out, count)
        size = None if sizes[i] is None else tuple(sizes[b] if b == i or real[b] else 2 for b in range(count))
        scale = (
            None if size is not None else tuple(float(scales[b]) if b == i or real[b] else 1.0 for b in range(count))
        )
        lengths = [source.shape[2 + b] if real[b] else 2 for b in range(count)]

        def run(signals):
            return func(signals, size, scale, mode, options[1], options[2], options[3])

        key = ("interpolate", count, i, n, m, dtype, size, scale, options, tuple(lengths))
        return _probed_sources(key, count, i, n, m, dtype, run, lengths)

    def step(infos):
        return _resampled(tracer, tracer.traced(source), out, count, sources_of)

    return out, f"F.interpolate(mode={mode!r})", [source], step


_UPSAMPLING = [
    getattr(getattr(aten, name), overload)
    for name in (
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d",
        "_upsample_nearest_exact3d",
        "upsample_linear1d",
        "upsample_bilinear2d",
        "upsample_trilinear3d",
        "upsample_bicubic2d",
        "_upsample_bilinear2d_aa",
        "_upsample_bicubic2d_aa",
        "_upsample_lanczos2d_aa",
    )
    if hasattr(aten, name)
    for overload in ("default", "vec")
]


@_register(*_UPSAMPLING)
def _upsampling(tracer, func, bound, out):
    """The ATen interpolation kernels, called directly (``torch._C._nn.upsample_*``) or by decompositions."""
    names = [argument.name for argument in func._schema.arguments]
    source = bound[names[0]]
    count = source.dim() - 2
    scale_names = [name for name in names if name.startswith("scales")]
    dtype = _probe_dtype(source)

    def sources_of(i: int, n: int, m: int) -> Sources:
        real = _real_axes(i, out, count)
        values = []
        for name in names[1:]:
            value = bound[name]
            if name == "output_size" and value is not None:
                value = [m if b == i else 1 if real[b] else 2 for b in range(count)]
            elif name == "scale_factors" and value is not None:
                value = [float(value[b]) if b == i or real[b] else 1.0 for b in range(count)]
            elif name in scale_names:
                index = scale_names.index(name)
                value = value if index == i or real[index] else None
            values.append(tuple(value) if isinstance(value, list) else value)
        lengths = [source.shape[2 + b] if real[b] else 2 for b in range(count)]

        def run(signals):
            return func(signals, *(list(v) if isinstance(v, tuple) else v for v in values))

        key = (str(func), count, i, n, m, dtype, *values, tuple(lengths))
        return _probed_sources(key, count, i, n, m, dtype, run, lengths)

    return _resampled(tracer, tracer.traced(source), out, count, sources_of)
