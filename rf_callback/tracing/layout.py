"""Layout algebra of the tracer: where a tensor's dimensions hold the input's spatial axes, and what it sees.

A tensor dimension is a product of *factors*, each ``(spatial axis or None, length)``; :class:`Traced`
pairs a layout with the :class:`~rf_callback.algebra.Field` of the tensor's units.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from rf_callback.algebra import Field, MisalignedBranchesError
from rf_callback.errors import UnsupportedLayerError

aten = torch.ops.aten

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
