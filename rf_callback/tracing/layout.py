"""Layout algebra of the tracer: where a tensor's dimensions hold the input's spatial axes, and what it sees.

A tensor dimension is a product of *factors*, each ``(key, length)``; :class:`Traced` pairs a layout
with the :class:`~rf_callback.algebra.Field` of the tensor's units. A key is

* ``None``: a non-spatial factor (channels, batch, heads);
* an ``int`` axis: the whole of that spatial axis, positions ``0 .. length - 1``;
* a :class:`Part` of an axis split across several factors by a view (a window partition): its
  index ``i`` is position ``i * step``; the axis's position is the sum over its parts, and the
  field is indexed by that position;
* :data:`PREFIX` or :data:`FED`, only first in a dimension: ``length`` extra positions before the
  rest of the dimension (a ViT's class and register tokens), which add to its size rather than
  multiply. :data:`PREFIX` tokens hold constants; an operation that feeds them from the input
  (attention) makes them :data:`FED`, allowed only where every position of the grid already sees
  the same, which the tokens then see too;
* a :class:`Spread`: units that form no grid (a pool straddling the rows of flattened tokens),
  each seeing part of what the field says, until something mixes them all.

Where no factors describe a tensor (a view or pad that no layout follows), :class:`Indexed` gives
each element's position instead, until :func:`from_positions` finds factors again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from rf_callback.algebra import Field, MisalignedBranchesError, OnlyHolesError
from rf_callback.errors import UnsupportedLayerError

aten = torch.ops.aten


class Part(NamedTuple):
    """A factor of spatial ``axis`` split across dimensions: its index ``i`` is position ``i * step``."""

    axis: int
    step: int


class _Prefix:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Spread:
    """The key of a dimension of units that form no grid of the image, each seeing part of what ``field`` says.

    A pool of 16 consecutive tokens of 28-token rows (Next-ViT's ``AvgPool1d`` over flattened
    positions) straddles rows: its outputs have no size, stride or padding along any axis. Their
    field is the union of what all of them see (the positions they tile), a bound for each; it is
    exact for whatever mixes the whole dimension (an attention over all of them), which makes the
    dimension plain again. A row whose layout still holds one is refused, for ``error``.
    """

    def __init__(self, error: UnsupportedLayerError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return "SPREAD"


PREFIX = _Prefix("PREFIX")
"""The key of a dimension's leading class tokens that hold constants: they add to its size."""
FED = _Prefix("FED")
"""The key of a dimension's leading class tokens that see what every position of its grid sees."""


def _prefix(dim: tuple[Factor, ...]) -> _Prefix | None:
    """The class-token key in front of ``dim``, if any."""
    return dim[0][0] if dim and type(dim[0][0]) is _Prefix else None  # type: ignore[return-value]


# A tensor dimension is a product of factors; a factor is (key, length), see the module docstring.
# Non-spatial factors of length 1 are dropped; an axis reduced away is absent from the layout.
Factor = tuple["int | Part | _Prefix | Spread | None", int]
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

    def with_layout(self, layout: Layout) -> Traced:
        """The same units seen through another layout (``dataclasses.replace`` costs several times more)."""
        return Traced(self.field, layout, self.equivariant, self.lost)


@dataclass(frozen=True)
class Unsupported:
    """A tensor computed by an operation that could not be followed, from tensors that depend on the input."""

    error: UnsupportedLayerError


@dataclass(frozen=True, eq=False)
class Indexed:
    """A tensor whose elements' positions no factors describe, each element's position given instead.

    A view or pad that no layout follows (the skew of relative position logits: a flattened
    ``positions x offsets`` map padded at its end and viewed with one column fewer) still moves
    each element to a known place. ``positions`` (``element_positions``' form: ``(axes, *shape)``,
    -1 for constants) says where each came from; views, slices, pads and the like move them, and
    as soon as they form a layout again (``from_positions``), the tensor is :class:`Traced` again.
    Until then it has no receptive field in the table's sense: ``error`` says why.
    """

    field: Field
    positions: torch.Tensor
    error: UnsupportedLayerError


def refusal(info: Traced | Unsupported | Indexed | None) -> UnsupportedLayerError | None:
    """Why ``info`` has no exact receptive field, or None when it has one (but see :func:`spread_refusal`)."""
    if info is None:
        return None
    return info.lost if type(info) is Traced else info.error  # type: ignore[union-attr]


@functools.lru_cache(maxsize=4096)
def spread_refusal(layout: Layout) -> UnsupportedLayerError | None:
    """Why a dimension of ``layout`` holds units that form no grid (:class:`Spread`), or None: a row with such a
    layout has no receptive field, though the trace follows the tensor on."""
    for dim in layout:
        for key, _ in dim:
            if type(key) is Spread:
                return key.error
    return None


class _Reject(Exception):
    """Raised by an operation handler: the operation has no receptive field (the message says why)."""


# --------------------------------------------------------------------------------------------
# Layout algebra
# --------------------------------------------------------------------------------------------


def _dim_size(dim: tuple[Factor, ...]) -> int:
    if dim and type(dim[0][0]) is _Prefix:
        return dim[0][1] + _dim_size(dim[1:])
    size = 1
    for _, length in dim:
        size *= length
    return size


def _spatial(dim: tuple[Factor, ...]) -> bool:
    for axis, _ in dim:  # a loop, not any(): the trace asks this several times per operation
        if axis is not None:
            return True
    return False


def _plain(size: int) -> tuple[Factor, ...]:
    return ((None, size),) if size > 1 else ()


@functools.lru_cache(maxsize=4096)
def _axes(layout: Layout) -> dict[int, tuple[int | None, int]]:
    """Where each spatial axis of ``layout`` lives: axis -> (dimension, length); dimension None when split."""
    axes: dict[int, tuple[int | None, int]] = {}
    for d, dim in enumerate(layout):
        for key, length in dim:
            if type(key) is int:
                axes[key] = (d, length)
            elif type(key) is Part:
                home, total = axes.get(key.axis, (d, 1))
                axes[key.axis] = (home if home == d else None, total * length)
    return axes


@functools.lru_cache(maxsize=4096)
def _factors(layout: Layout, axis: int) -> tuple[tuple[int, Factor], ...]:
    """The factors of ``axis`` in ``layout``, each with its dimension: ``((d, (key, length)), ...)``."""
    return tuple(
        (d, factor)
        for d, dim in enumerate(layout)
        for factor in dim
        if factor[0] == axis and type(factor[0]) is int or type(factor[0]) is Part and factor[0].axis == axis
    )


def axis_length(layout: Layout, axis: int) -> int:
    place = _axes(layout).get(axis)
    return 1 if place is None else place[1]


def _whole_axis(dim: tuple[Factor, ...], what: str) -> int:
    """The axis a dimension holds whole and alone, or ``_Reject`` naming ``what`` the operation does to it."""
    if len(dim) != 1 or type(dim[0][0]) is not int:
        raise _Reject(f"it {what} a dimension that mixes a spatial axis with others")
    return dim[0][0]


def _merge_parts(layout: Layout) -> Layout:
    """``layout`` with adjacent parts that form one run of positions joined (a window partition undone).

    An axis left with a single part of step 1 is whole again.
    """
    if not any(type(key) is Part for dim in layout for key, _ in dim):
        return layout
    merged = []
    for dim in layout:
        factors: list[Factor] = []
        for key, length in dim:
            if factors and type(key) is Part and type(factors[-1][0]) is Part:
                outer, count = factors[-1]
                if outer.axis == key.axis and outer.step == key.step * length:
                    factors[-1] = (key, count * length)
                    continue
            factors.append((key, length))
        merged.append(factors)
    counts: dict[int, int] = {}
    for factors in merged:
        for key, _ in factors:
            if type(key) is Part:
                counts[key.axis] = counts.get(key.axis, 0) + 1
    return tuple(
        tuple(
            (key.axis, length) if type(key) is Part and key.step == 1 and counts[key.axis] == 1 else (key, length)
            for key, length in factors
        )
        for factors in merged
    )


def _aligned(info: Traced, ndim: int) -> Traced:
    """``info`` with its layout right-aligned to ``ndim`` dimensions, as broadcasting does."""
    if len(info.layout) == ndim:  # most operands: no copy
        return info
    return info.with_layout(((),) * (ndim - len(info.layout)) + info.layout)


@functools.lru_cache(maxsize=4096)  # blocks of a stage view the same layouts alike
def _reshape(layout: Layout, shape: Sequence[int]) -> Layout:
    """Layout after a view/reshape to ``shape``.

    Spatial axes may be merged, and split into :class:`Part` s (``(56,) -> (8, 7)``: window ``i // 7``
    and offset ``i % 7``); a dimension with class tokens moves whole.
    """
    if tuple(shape) == tuple(_dim_size(dim) for dim in layout):
        return layout
    queue: list[Factor | tuple[tuple[Factor, ...], int]] = []  # factors; a prefixed dimension as (dim, size)
    for dim in layout:
        if _prefix(dim) is not None:
            queue.append((dim, _dim_size(dim)))
            continue
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
            key, length = queue[0]
            if type(key) is tuple:  # a dimension with class tokens: only as a whole dimension
                if dim or remaining != length:
                    raise _Reject(f"a view to {tuple(shape)} splits a dimension holding class tokens")
                dim.extend(queue.pop(0)[0])  # type: ignore[arg-type]
                remaining = 1
            elif remaining % length == 0:
                dim.append(queue.pop(0))  # type: ignore[arg-type]
                remaining //= length
            elif length % remaining == 0:  # split: ``remaining`` outer positions, the rest inner
                inner = length // remaining
                if type(key) is Spread:
                    raise _Reject(f"a view to {tuple(shape)} splits a dimension of units that form no grid")
                if key is None:
                    dim.append((None, remaining))
                    queue[0] = (None, inner)
                else:
                    part = key if type(key) is Part else Part(key, 1)
                    dim.append((Part(part.axis, part.step * inner), remaining))
                    queue[0] = (part, inner)
                remaining = 1
            else:
                raise _Reject(f"a view to {tuple(shape)} that this engine cannot follow")
        result.append(tuple(dim))
    if queue:
        raise _Reject(f"a view to {tuple(shape)} that this engine cannot follow")
    return _merge_parts(tuple(result))


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
    if not any(_axis_of(key) in mixed for dim in info.layout for key, _ in dim):
        return info
    layout = []
    for dim in info.layout:
        factors: list[Factor] = []
        for key, length in dim:
            if type(key) is _Prefix or (key is not None and _axis_of(key) not in mixed):
                factors.append((key, length))
            elif factors and factors[-1][0] is None:  # plain, merged with its plain neighbour
                factors[-1] = (None, factors[-1][1] * length)
            elif length > 1:
                factors.append((None, length))
        if _prefix(tuple(factors)) is not None and not _spatial(tuple(factors[1:])):
            factors = list(_plain(_dim_size(tuple(factors))))  # class tokens among plain ones: plain
        layout.append(tuple(factors))
    return info.with_layout(tuple(layout))


def _axis_of(key: int | Part | _Prefix | None) -> int | None:
    """The spatial axis a factor's key belongs to (None for non-spatial factors and class tokens)."""
    return key if type(key) is int else key.axis if type(key) is Part else None  # type: ignore[union-attr]


def _fed(info: Traced, dims: Sequence[int]) -> Traced:
    """``info`` after an operation that fed the class tokens of ``dims`` from the input: they are :data:`FED`.

    Exact when every grid position of such a dimension sees the same (after attention): the tokens
    see that too. Otherwise ``_Reject``, since one field cannot hold what the tokens and the grid see.
    """
    layout = list(info.layout)
    for d in dims:
        dim = layout[d]
        if _prefix(dim) is None:
            continue
        axes = {_axis_of(key) for key, _ in dim[1:]} - {None}
        if any(info.field.rfs[a].jump != 0 and info.field.length(a) > 1 for a in axes):  # type: ignore[index]
            raise _Reject("it feeds class tokens from positions that see different parts of the input")
        layout[d] = ((FED, dim[0][1]),) + dim[1:]
    return info.with_layout(tuple(layout))


GridDims = tuple[tuple[int, tuple[tuple[int | None, int], ...]], ...]
"""Per tensor dimension after the batch: its class tokens, then its factors ``(axis or None, length)``."""


def grid_dims(layout: Layout) -> GridDims | None:
    """Where the positions of a tensor with ``layout`` are, if it holds each image axis whole and its batch first.

    None for window layouts (an axis split across dimensions) and for a batch dimension that holds
    more than the batch (windows, or tokens first).

    Example::
        >>> grid_dims(((), ((PREFIX, 1), (0, 14), (1, 14)), ((None, 768),)))  # a ViT's tokens
        ((1, ((0, 14), (1, 14))), (0, ((None, 768),)))
    """
    if layout[0] or any(type(key) is Part for dim in layout for key, _ in dim):
        return None
    return tuple(
        (dim[0][1], dim[1:]) if _prefix(dim) is not None else (0, dim)  # type: ignore[misc]
        for dim in layout[1:]
    )


def element_positions(layout: Layout, shape: Sequence[int], axes: int) -> torch.Tensor:
    """Where each element of a tensor of ``shape`` laid out as ``layout`` is: its position along each image axis.

    Returns an int64 tensor ``(axes, *shape)``: the position of every element along each of the
    ``axes`` image axes (0 along an axis absent from the layout), or -1 along every axis for a
    class token (its field is not a position's). Window layouts included: a position is the sum
    of its parts' indices times their steps. It is how gradient checks find a unit's elements.

    Example::
        >>> windows = (((Part(0, 2), 2),), ((Part(0, 1), 2),), ((None, 3),))  # 4 rows as 2 windows of 2
        >>> element_positions(windows, (2, 2, 3), 1)[0, :, :, 0].tolist()
        [[0, 1], [2, 3]]
        >>> element_positions(((), ((PREFIX, 1), (0, 2)),), (1, 3), 1)[0].tolist()  # a class token, then 2 tokens
        [[-1, 0, 1]]
    """
    positions = torch.zeros((axes, *shape), dtype=torch.int64)
    token = torch.zeros(tuple(shape), dtype=torch.bool)
    for d, (dim, n) in enumerate(zip(layout, shape)):
        if _dim_size(dim) != n:
            raise ValueError(f"dimension {d} of {tuple(shape)} does not hold {n} positions in layout {layout}")
        index = torch.arange(n).reshape([n if e == d else 1 for e in range(len(shape))])
        factors = dim
        if _prefix(dim) is not None:
            tokens = dim[0][1]
            token |= index < tokens
            index, factors = (index - tokens).clamp(min=0), dim[1:]
        inner = n if _prefix(dim) is None else n - dim[0][1]
        for key, length in factors:
            inner //= length
            axis = _axis_of(key)
            if axis is not None and axis < axes:
                positions[axis] += (index // inner % length) * _step(key)
    positions[:, token] = -1
    return positions


def from_positions(field: Field, positions: torch.Tensor) -> Traced | None:
    """The :class:`Traced` tensor whose elements sit at ``positions`` (``element_positions``' form), if factors
    describe them: class tokens (-1) only in front of dimensions, and each dimension's positions a sum of
    factors (an axis's part with a step, or a plain factor) independent of the other dimensions'. An axis
    whose positions are every ``step``-th from ``start`` is sliced so (``Field.take``). None otherwise.

    Example::
        >>> field = Field.of_input((4,))
        >>> from_positions(field, torch.tensor([[[-1, -1], [0, 1], [2, 3]]])).layout  # a constant row, then 2 x 2
        (((PREFIX, 1), (Part(axis=0, step=2), 2)), ((Part(axis=0, step=1), 2),))
        >>> from_positions(field, torch.tensor([[[0, 1], [1, 2]]])) is None  # overlapping: no factors
        True
    """
    axes, shape = positions.shape[0], tuple(positions.shape[1:])
    constant = positions[0] < 0 if axes else torch.zeros(shape, dtype=torch.bool)
    tokens = []
    for d, n in enumerate(shape):
        rows = constant.movedim(d, 0).reshape(n, -1).all(1).tolist() if n else []
        tokens.append(next((i for i, row in enumerate(rows) if not row), n))
    core = positions[(slice(None), *(slice(t, None) for t in tokens))]
    expected = torch.zeros(shape, dtype=torch.bool)
    for d, t in enumerate(tokens):
        expected |= (torch.arange(shape[d]) < t).reshape([-1 if e == d else 1 for e in range(len(shape))])
    if core.numel() == 0 or (core < 0).any() or not torch.equal(constant, expected):
        return None
    for axis in range(axes):
        found = core[axis].unique()
        start, step = int(found[0]), int(found[1] - found[0]) if len(found) > 1 else 1
        if not torch.equal(found, start + step * torch.arange(len(found))):
            return None
        if (start, step, len(found)) != (0, 1, field.length(axis)):  # a slice of the axis: its positions renamed
            try:
                field = field.take(axis, start, step, len(found))
            except OnlyHolesError:
                return None
            positions = positions.clone()
            positions[axis] = torch.where(constant, -1, (positions[axis] - start) // step)
            core = positions[(slice(None), *(slice(t, None) for t in tokens))]
    if core.flatten(1)[:, 0].any():  # the first element must be position 0 along every axis
        return None
    dims = []
    for d in range(len(shape)):
        profile = core[(slice(None), *(slice(None) if e == d else 0 for e in range(len(shape))))]
        factors = _factorized(profile)
        if factors is None:
            return None
        dims.append((((PREFIX, tokens[d]),) if tokens[d] else ()) + factors)
    layout = _merge_parts(tuple(dims))
    if any(axis_length(layout, axis) != field.length(axis) for axis in range(axes)):
        return None  # parts that overlap, or positions repeated by a view rather than by a plain factor
    if not torch.equal(element_positions(layout, shape, axes), positions):
        return None  # the dimensions' positions do not add up (they depend on one another)
    return Traced(field, layout, equivariant=False)


def _factorized(profile: torch.Tensor) -> tuple[Factor, ...] | None:
    """Factors (outermost first) whose positions along one dimension are ``profile`` (``(axes, length)``), or None."""
    factors: list[Factor] = []
    length, block = profile.shape[1], 1
    while block < length:
        delta = profile[:, block] - profile[:, 0]
        moving = delta.nonzero().flatten().tolist()
        if len(moving) > 1 or (delta < 0).any():
            return None
        count = 1
        while block * (count + 1) <= length and torch.equal(profile[:, block * count], delta * count):
            count += 1
        while (length // block) % count:
            count -= 1
        if count < 2:
            return None
        key = Part(moving[0], int(delta[moving[0]])) if moving else None
        factors.append((key, count))
        block *= count
    return tuple(reversed(factors))


def settled(info: Traced) -> Traced:
    """``info`` with each split axis whose parts no longer cover its field made coarser, or ``_Reject``.

    An operation that sums over the dimension of some parts (attention within windows, then a
    reduction over the window; Hiera's max over its mask units) leaves the others. Every position
    that differs only in the parts summed away saw the same, so when the parts left form one run of
    every ``step``-th position, that run is the axis now (``take`` of every ``step``-th position).
    """
    field, layout = info.field, info.layout
    for axis, (_, total) in _axes(layout).items():
        if total == field.length(axis):
            continue
        factors = sorted(_factors(layout, axis), key=lambda found: -_step(found[1][0]))
        steps = [_step(key) for _, (key, _) in factors]
        chained = all(steps[i] == steps[i + 1] * length for i, (_, (_, length)) in enumerate(factors[1:]))
        if total > field.length(axis) or not chained:
            raise _Reject("it keeps part of a split spatial axis and sums over the rest")
        field = field.take(axis, 0, steps[-1], total)
        coarse = {factor: (Part(axis, _step(factor[0]) // steps[-1]), factor[1]) for _, factor in factors}
        layout = _merge_parts(tuple(tuple(coarse.get(factor, factor) for factor in dim) for dim in layout))
    return info if field is info.field else replace(info, field=field, layout=layout, equivariant=False)


def _step(key: int | Part | _Prefix | None) -> int:
    return key.step if type(key) is Part else 1  # type: ignore[union-attr]


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
