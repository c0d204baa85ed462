"""The engine of the tracer: a ``TorchDispatchMode`` that follows every ATen operation of a meta forward."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from rf_callback.algebra import Field, MisalignedBranchesError, OnlyHolesError, merge
from rf_callback.errors import UnsupportedLayerError
from rf_callback.tracing.fast import run_lowered
from rf_callback.tracing.layout import (
    FED,
    Factor,
    Indexed,
    Layout,
    Part,
    Spread,
    Traced,
    Unsupported,
    _aligned,
    _axes,
    _axis_of,
    _dim_size,
    _factors,
    _fed,
    _forget_mixed_axes,
    _plain,
    _prefix,
    _reason,
    _Reject,
    _sees_everything,
    _spatial,
    _step,
    _whole_axis,
    element_positions,
    from_positions,
    refusal,
    settled,
)
from rf_callback.tracing.ops import _FUNCTIONS, _HANDLERS, _MOVES, _reduction, moved_positions
from rf_callback.tracing.shortcuts import (
    _bind,
    _first_output,
    _operands,
    _shortcut,
    _to_meta,
    elementwise,
    flat_tensors,
    per_operation,
)

aten = torch.ops.aten


_META = torch.device("meta")
_ONLY_MOVE = frozenset(
    getattr(getattr(aten, name), overload)
    for name, overloads in {
        "constant_pad_nd": ["default"],
        **{f"{kind}_pad{d}d": ["default"] for kind in ("reflection", "replication") for d in (1, 2, 3)},
        "slice": ["Tensor"],
        "select": ["int"],
        "view": ["default"],
        "_unsafe_view": ["default"],
        "reshape": ["default"],
        "_reshape_alias": ["default"],
        "view_copy": ["default"],
        "alias": ["default"],
        "detach": ["default"],
        "clone": ["default"],
        "_to_copy": ["default"],
        "contiguous": ["default"],
        "permute": ["default"],
        "transpose": ["int"],
        "t": ["default"],
        "squeeze": ["default", "dim", "dims"],
        "unsqueeze": ["default"],
        "expand": ["default"],
    }.items()
    for overload in overloads
)
"""Operations that move values without computing any (views, pads, slices, copies): a module call that runs only
these on input-dependent tensors computes nothing (:attr:`Tracer.computed`)."""
_REFUSED = object()  # no result yet: the operation goes through Tracer.follow
_UNREAD = object()  # the inputs' fields not read yet


@per_operation
def _takes_device(func: Any) -> bool:
    """Whether ``func`` has a keyword-only ``device`` argument (a factory)."""
    return any(a.name == "device" for a in func._schema.arguments if a.kwarg_only)


@per_operation
def _handler(func: Any) -> Any:
    """What follows ``func``: its registered handler, the elementwise or the reduction rule; None if none."""
    handler = _HANDLERS.get(func) or _HANDLERS.get(func.overloadpacket)
    if handler is not None:
        return handler
    if elementwise(func):
        return Tracer.pointwise
    if torch.Tag.reduction in func.tags:
        return _reduction
    return None


@contextlib.contextmanager
def _untraced() -> Any:
    """Real tensors, made and computed on the CPU, unseen by the trace (the positions of followed elements)."""
    with _disable_current_modes(), torch._C.DisableTorchFunction(), torch.no_grad():
        yield


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
        # id(field of pooled indices) -> (it, windows per axis, flat lengths): ops.py's _keep_windows, _max_unpool
        self.pool_windows: dict[int, tuple[Field, dict[int, Any], tuple[int, ...]]] = {}
        self.computed = 0  # operations so far that computed values from the input (not only moved them)
        # The graph of the forward, over fields: id(field) -> (the field, the fields of the tensors read by the
        # operation that made it; None where one of them was not followed). A field passed on unchanged
        # (activations, BatchNorm, views, 1x1 convolutions) keeps the entry of the operation that made it.
        self.sources: dict[int, tuple[Field, tuple[Field, ...] | None]] = {}
        self.operation: Any = None  # the operation being followed, for the errors of rules deep inside it
        self.spread = False  # whether a Spread dimension was made: rows must then be checked for one
        self.no_grid: dict[int, tuple[Traced, Unsupported]] = {}  # rows refused for one, by their info's id

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
        kwargs = kwargs or {}
        if "device" in kwargs or _takes_device(func):
            kwargs = {**kwargs, "device": _META}  # factories must not allocate, compute or draw
        out = _shortcut(func, args, kwargs)
        if out is None:
            out = func(*_to_meta(args), **{key: _to_meta(value) for key, value in kwargs.items()})
        if not self.transparent:
            self.record(func, args, kwargs, out)
        return out

    def record(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Files what ``out`` sees, the output of the ATen operation ``func`` on ``args`` and ``kwargs``."""
        self.operation = func
        tensors = [t for t in _operands(args, kwargs) if t in self.info]
        outputs = flat_tensors(out)
        if not tensors:
            for tensor in outputs:  # an in-place write of constants (x.zero_()) forgets the input
                self.info.pop(tensor, None)
            return
        if func not in _ONLY_MOVE:
            self.computed += 1
        bound = _bind(func, args, kwargs)
        results = _REFUSED
        if len(tensors) == 1 and type(info := self.info[tensors[0]]) is Traced and info.lost is None:
            try:  # the usual case, as follow() runs it; a refusal goes through follow() and its rules
                results = self.settle(self.handle(func, bound, [info], out))
            except (_Reject, MisalignedBranchesError, OnlyHolesError):
                pass
        if results is _REFUSED and any(type(self.info[t]) is Indexed for t in tensors):
            results = self.follow_elements(tensors, lambda positions: moved_positions(func, bound, positions, out))
        elif results is _REFUSED:

            def step(infos: list[Traced]) -> Any:
                return self.settle(self.handle(func, bound, infos, out))

            def elements(infos: list[Traced], error: UnsupportedLayerError) -> Indexed | Traced | None:
                return self.elements(tensors, infos, error, lambda p: moved_positions(func, bound, p, out))

            results = self.follow(func, tensors, step, elements)
        self.file(tensors, outputs, results)

    def file(self, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], results: Any) -> None:
        """Files ``results`` (one, or one per output) as what ``outputs`` see, and the fields ``tensors`` had as the
        sources of each field the operation made (:attr:`sources`)."""
        if not isinstance(results, tuple):
            results = (results,) * len(outputs)
        read: Any = _UNREAD
        for tensor, info in zip(outputs, results):
            if info is None:
                self.info.pop(tensor, None)
                continue
            if type(info) is Traced and id(info.field) not in self.sources:
                if read is _UNREAD:  # before the first write: an in-place operation overwrites its input's info
                    infos = [self.info.get(t) for t in tensors]
                    clean = all(type(i) is Traced and i.lost is None for i in infos)
                    read = tuple(i.field for i in infos) if clean else None  # type: ignore[union-attr]
                if read is None or all(info.field is not field for field in read):
                    self.sources[id(info.field)] = (info.field, read)
            self.info[tensor] = info

    def settle(self, result: Any) -> Any:
        """A handler's ``result`` with split axes made whole where parts were summed away (see :func:`settled`)."""
        if type(result) is Traced:
            return settled(result)
        if type(result) is tuple:
            return tuple(settled(r) if type(r) is Traced else r for r in result)
        return result

    def follow_elements(self, tensors: Sequence[torch.Tensor], move: Any) -> Any:
        """The info of an operation's output from one :class:`Indexed` input: its elements' positions moved by
        ``move`` (None: the operation does more than move elements), :class:`Traced` again where factors
        describe them. Anything else is :class:`Unsupported`, for the reason the elements were followed."""
        infos = [self.info[t] for t in tensors]
        indexed = next(info for info in infos if type(info) is Indexed)
        with _untraced():
            positions = move(indexed.positions) if len(infos) == 1 else None
            if positions is None:
                return Unsupported(indexed.error)
            return from_positions(indexed.field, positions) or Indexed(indexed.field, positions, indexed.error)

    def elements(
        self, tensors: Sequence[torch.Tensor], infos: list[Traced], error: UnsupportedLayerError, move: Any
    ) -> Indexed | Traced | None:
        """A view or pad that no layout follows, followed element by element (see :class:`Indexed`), or None."""
        info = infos[0] if len(infos) == 1 else None
        if info is None or any(_prefix(dim) is FED for dim in info.layout) or tensors[0].numel() > 1 << 20:
            return None  # (``info`` is followed exactly: :meth:`follow` passes ``elements`` on only then)
        with _untraced():
            try:
                positions = element_positions(info.layout, tensors[0].shape, len(self.image))
            except ValueError:  # a layout that does not hold this tensor's shape: nothing to move
                return None
            moved = move(positions)
            if moved is None:
                return None
            return from_positions(info.field, moved) or Indexed(info.field, moved, error)

    def follow(self, operation: Any, tensors: Sequence[torch.Tensor], step: Any, elements: Any = None) -> Any:
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
            return self._attempt(operation, tensors, infos, step, elements)  # the usual case: all followed so far
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

    def _attempt(
        self, operation: Any, tensors: list[torch.Tensor], infos: list[Traced], step: Any, elements: Any = None
    ) -> Any:
        """``step`` on the followed ``tensors``; again with their mixed axes forgotten if it refuses; then, for an
        operation that only moves elements, ``elements(infos, error)`` (see :meth:`elements`)."""
        try:
            return step(infos)
        except (_Reject, MisalignedBranchesError, OnlyHolesError) as refused:
            error = self.error(str(operation), _reason(refused))
        forgotten = [_forget_mixed_axes(info) for info in infos]
        if any(new is not old for new, old in zip(forgotten, infos)):
            try:
                for tensor, info in zip(tensors, forgotten):
                    self.info[tensor] = info
                return step(forgotten)
            except (_Reject, MisalignedBranchesError, OnlyHolesError):
                pass
            finally:
                for tensor, info in zip(tensors, infos):
                    self.info[tensor] = info
        followed = elements(infos, error) if elements is not None else None
        return followed if followed is not None else Unsupported(error)

    def _bound(self, result: Any, lost: UnsupportedLayerError) -> Any:
        """``result`` computed with some inputs unknown: a lower bound, exact if it already sees everything."""
        if not isinstance(result, Traced):
            return Unsupported(lost) if result is None or isinstance(result, Unsupported) else result
        if _sees_everything(result.field, self.image):
            return replace(result, equivariant=False, lost=None)
        return replace(result, equivariant=False, lost=lost)

    def handle(self, func, bound: dict[str, Any], inputs: list, out: Any) -> Any:
        handler = _handler(func)
        if handler is not None:
            return handler(self, func, bound, out)
        if all(not any(_spatial(dim) for dim in info.layout) for info in inputs):
            # No spatial position is left to tell apart: whatever the operation does, each output
            # depends on the union of what the inputs see (classifier heads, argmax, indexing...).
            shape = _first_output(out).shape
            return self.combine([i.with_layout(()) for i in inputs], tuple(_plain(n) for n in shape), func)
        raise _Reject("it is not a known spatial operation; only operations whose geometry is known are followed")

    # ---- shared rules --------------------------------------------------------------------------
    def combine(self, operands: Sequence[Traced], layout: Layout, where: Any) -> Traced:
        """Geometry of an output with ``layout`` whose units see the union of what ``operands`` see there.

        Each operand's layout must already be aligned to the output's dimensions. An operand axis
        that is absent there (broadcast) or sits in another dimension than in the output (attention
        scores) is seen whole by every output position; a window part that does (attention within
        windows), window by window. Class tokens of the output fed by an operand without them
        become :data:`FED`.
        """
        fields = []
        equivariant = all(info.equivariant for info in operands)
        axes = _axes(layout)
        prefixed = [d for d, dim in enumerate(layout) if _prefix(dim) is not None]  # mostly none
        fed: set[int] = set()  # dimensions whose class tokens receive values from the input
        for info in operands:
            field = info.field
            own = _axes(info.layout)
            for axis in range(len(self.image)):
                extent = axes[axis][1] if axis in axes else 1
                if extent == 1:  # a single output position along this axis
                    field = field.first(axis)
                elif axis not in own or own[axis][1] == 1:
                    field, equivariant = field.broadcast(axis, extent), False
                elif own[axis][0] is None or own[axis][0] != axes[axis][0]:
                    field, moved = _misplaced(field, info.layout, layout, axis, extent)
                    equivariant = equivariant and not moved
            fields.append(field)
            fed.update(d for d in prefixed if info.layout[d] != layout[d])
        try:
            field = merge(fields)
        except MisalignedBranchesError as misaligned:  # named only now: formatting it every time costs
            raise MisalignedBranchesError(f"{where} in {self.describe()}", misaligned.branches) from None
        result = Traced(field, layout, equivariant)
        return _fed(result, sorted(fed)) if fed else result

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
                        if spatial[1:] != dim[1:] or _prefix(spatial) is None or _prefix(dim) is None:
                            raise _Reject("it combines tensors whose spatial axes are laid out differently")
                        dim = ((FED, dim[0][1]),) + dim[1:]  # constant and fed class tokens: fed
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
        """Every position along ``dims`` now sees what all of them saw (softmax, normalisation...).

        A :class:`Part` of a split axis mixes within its windows only; class tokens in ``dims``
        receive what the grid sees (:data:`FED`).
        """
        field, equivariant, layout = info.field, info.equivariant, info.layout
        for d in dims:
            for key, length in info.layout[d]:
                if type(key) is int:
                    field, equivariant = field.mix(key), False
                elif type(key) is Part:
                    field, equivariant = _mix_part(field, key, length), False
                elif type(key) is Spread:  # every unit now sees what all of them saw: the field says just that
                    layout = (
                        layout[:d] + (tuple((None, n) if k is key else (k, n) for k, n in layout[d]),) + layout[d + 1 :]
                    )
        result = Traced(field, layout, equivariant, info.lost)
        if any(_prefix(info.layout[d]) is not None for d in dims):
            return _fed(result, dims)
        return result

    def _spread(
        self,
        field: Field,
        dim: tuple[Factor, ...],
        size: int,
        kernel: int,
        stride: int,
        padding: int,
        dilation: int,
        refused: _Reject,
    ) -> tuple[Field, tuple[Factor, ...]]:
        """Windows along a dimension of flattened positions that straddle its rows: units that form no grid.

        Where the windows read every position of the dimension, what they see together is the union of
        its positions' fields: a :class:`Spread` dimension (exact once something mixes it). Otherwise
        ``refused``.
        """
        length = _dim_size(dim)
        if padding or _prefix(dim) is not None or any(type(key) is Part for key, _ in dim):
            raise refused
        if all(field.rfs[key].jump == 0 for key, _ in dim if type(key) is int):
            raise refused  # positions that all see the same: forgotten, and the window followed on plain ones
        read = {u * stride + j * dilation for u in range(size) for j in range(kernel)}
        if read != set(range(length)):
            raise refused
        for key, _ in dim:
            if type(key) is int:
                field = field.mix(key)
        self.spread = True
        return field, ((Spread(self.error(str(self.operation), _reason_of_spread(kernel, dim))), size),)

    def window(self, info: Traced, result: torch.Tensor, kernel, stride, padding, dilation) -> Traced:
        """Sliding windows over the last ``len(kernel)`` dims (convolution, pooling).

        ``stride`` may be empty (defaults to the kernel); one-element lists apply to every axis.
        """
        count = len(kernel)
        stride = stride if len(stride) else kernel
        kernel, stride, padding, dilation = [
            value * count if len(value) == 1 else value for value in (kernel, stride, padding, dilation)
        ]
        field, equivariant = info.field, info.equivariant
        layout = list(info.layout[: len(info.layout) - count])
        windows = []  # along whole axes: done together, so that equal axes share the work
        rescaled: dict[int, tuple[int, int]] = {}  # axis -> (old, new) length of its innermost part
        for i in range(count):
            dim = info.layout[len(info.layout) - count + i]
            size = result.shape[result.dim() - count + i]
            if not _spatial(dim):
                layout.append(_plain(size))
            elif kernel[i] == stride[i] == 1 and padding[i] == 0:
                layout.append(dim)  # a 1x1 window is the identity, whatever the dimension holds
            elif len(dim) == 1 and type(dim[0][0]) is Part:
                field, windows = field.windows(windows), []  # in order
                part, length = dim[0]
                field = _window_within_part(
                    field, info.layout, dim[0], size, kernel[i], stride[i], padding[i], dilation[i]
                )
                rescaled[part.axis], equivariant = (length, size), False
                layout.append(((part, size),))
            elif len(dim) == 1:
                axis = _whole_axis(dim, "slides a window over")
                windows.append((axis, kernel[i], stride[i], padding[i], size, dilation[i]))
                layout.append(((axis, size),))
            else:
                field, windows = field.windows(windows), []  # in order
                try:
                    field, inner = _window_within_rows(field, dim, size, kernel[i], stride[i], padding[i], dilation[i])
                    layout.append(dim[:-1] + inner)
                except _Reject as refused:
                    field, spread = self._spread(
                        field, dim, size, kernel[i], stride[i], padding[i], dilation[i], refused
                    )
                    layout.append(spread)
                    equivariant = False
        if windows:
            field = field.windows(windows)
        if rescaled:  # the windows' parts now count whole windows of the new length
            layout = [
                tuple(
                    (Part(key.axis, key.step // rescaled[key.axis][0] * rescaled[key.axis][1]), n)
                    if type(key) is Part and key.axis in rescaled and key.step > 1
                    else (key, n)
                    for key, n in dim
                )
                for dim in layout
            ]
        return Traced(field, tuple(layout), equivariant)


def _mix_part(field: Field, part: Part, length: int) -> Field:
    """``field`` after each position along ``part.axis`` read the positions that differ from it only in ``part``.

    That is attention within windows: with ``(56,)`` split into 8 windows of 7 (``Part(axis, 7)``, 8
    and ``Part(axis, 1)``, 7), mixing the second part unites each window.
    """
    n = field.length(part.axis)
    sources = []
    for position in range(n):
        base = position - (position // part.step) % length * part.step
        sources.append(tuple(base + j * part.step for j in range(length)))
    return field.resample(part.axis, sources)


def _misplaced(field: Field, own: Layout, layout: Layout, axis: int, extent: int) -> tuple[Field, bool]:
    """An operand's ``field`` seen from an output ``layout`` that holds some of its factors of ``axis`` elsewhere.

    Every output unit sees what the operand's units that differ only in those factors see: the
    whole axis if no factor stays in place, the windows of the factors moved otherwise. Returns the
    field and whether any factor moved.
    """
    factors = _factors(own, axis)
    moved = [factor for d, factor in factors if factor not in layout[d]]
    if not moved:
        return field, False
    if field.length(axis) != extent or any(_partner(own, layout, d, f) not in (None, f) for d, f in factors):
        return _regridded(field, own, layout, axis, extent), True
    if len(moved) == len(factors):
        return field.mix(axis).broadcast(axis, extent), True
    for key, length in moved:
        field = _mix_part(field, key, length)
    return field, True


def _partner(own: Layout, layout: Layout, d: int, factor: Factor) -> Factor | None:
    """The output's factor of the same axis at ``factor``'s place in dimension ``d``, if any.

    A factor sits at the same place when dimension ``d`` splits alike in the operand and the output
    (the same lengths, in order) and the output's factor there belongs to the same axis, maybe with
    another step: the same index along both, on grids that may differ (Hiera's keys, at the tokens'
    resolution, and its pooled queries, at half of it: mask unit ``u`` is ``Part(axis, 8)`` of the
    one and ``Part(axis, 4)`` of the other).
    """
    mine, theirs = own[d], layout[d]
    if len(mine) != len(theirs) or any(a[1] != b[1] for a, b in zip(mine, theirs)):
        return None
    other = theirs[mine.index(factor)]
    return other if _axis_of(other[0]) == _axis_of(factor[0]) else None


def _regridded(field: Field, own: Layout, layout: Layout, axis: int, extent: int) -> Field:
    """An operand's ``field`` along ``axis`` seen from an output ``layout`` that holds that axis on another grid.

    Output position ``p`` reads the operand's positions whose factors agree with ``p``'s where the
    operand and the output hold a factor of the axis at the same place (:func:`_partner`, or the
    same factor); every other factor of the operand is read whole (it was summed over, moved into
    another dimension or broadcast). Exact: an elementwise operation pairs elements by their
    indices, whatever the positions mean.
    """
    pairs = []
    for d, factor in _factors(own, axis):
        partner = _partner(own, layout, d, factor)
        if partner is None and factor in layout[d] and field.length(axis) == extent:
            partner = factor
        if partner is not None:
            pairs.append((factor, partner))
    if not pairs:
        return field.mix(axis).broadcast(axis, extent)
    groups: dict[tuple[int, ...], list[int]] = {}
    for q in range(field.length(axis)):
        groups.setdefault(tuple(q // _step(g[0]) % g[1] for g, _ in pairs), []).append(q)
    sources = [groups.get(tuple(p // _step(f[0]) % f[1] for _, f in pairs), []) for p in range(extent)]
    return field.resample(axis, sources)


def _reason_of_spread(kernel: int, dim: tuple[Factor, ...]) -> str:
    rows = f" (of {dim[-1][1]} positions)" if _axis_of(dim[-1][0]) is not None else ""
    return (
        f"its windows of {kernel} consecutive positions of a flattened grid straddle the grid's rows{rows}: its outputs"
        " form no grid of the image, so no size, stride or padding describes them (what mixes all of them, an"
        " attention over them, is followed exactly)"
    )


def _window_within_part(
    field: Field, layout: Layout, factor: Factor, size: int, kernel: int, stride: int, padding: int, dilation: int
) -> Field:
    """A window over the innermost part of a split axis, alone in its dimension: within each window partition.

    EfficientViT's local attention runs a depthwise convolution over each window of its partition:
    padding at the window's edges, never across them. Output offset ``o`` of window ``w`` reads
    offsets ``o * stride - padding + j * dilation`` of window ``w`` (inside it), and becomes position
    ``w * size + o`` of the axis, whose windows now hold ``size`` positions. ``_Reject`` unless the
    axis's other parts are whole windows (steps that are multiples of the part's length).
    """
    part, length = factor
    if part.step != 1 or any(_step(key) % length for _, (key, _) in _factors(layout, part.axis) if key != part):
        raise _Reject("it slides a window over a dimension that holds part of a split spatial axis")
    n = field.length(part.axis)
    sources = []
    for position in range(n // length * size):
        base, offset = position // size * length, position % size * stride - padding
        sources.append(tuple(base + o for j in range(kernel) if 0 <= (o := offset + j * dilation) < length))
    return field.resample(part.axis, sources)


def _window_within_rows(
    field: Field, dim: tuple[Factor, ...], size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[Field, tuple[Factor, ...]]:
    """A 1-D window over a dimension holding several factors (tokens: ``h * w``), or ``_Reject``.

    Windows that never cross a row of the last factor (no padding, no overlap, a stride that divides
    the row) slide along that factor only: a pool of ``k`` consecutive tokens with stride ``k`` is a
    ``1 x k`` pool of the image when ``k`` divides its width.
    """
    axis, length = dim[-1]
    if (
        padding
        or length % stride
        or dilation * (kernel - 1) + 1 > stride
        or size * stride != _dim_size(dim)
        or any(type(key) is Part for key, _ in dim)
        or _prefix(dim) is not None
    ):
        raise _Reject("it slides a window over a dimension that mixes a spatial axis with others")
    if axis is not None:
        field = field.window(axis, kernel, stride, 0, length // stride, dilation)
    return field, ((axis, length // stride),) if axis is not None else _plain(length // stride)


class FunctionInterceptor(TorchFunctionMode):
    """Catches functions before they reach ATen: the lowered ones and those registered with ``_intercept``.

    A lowered function (:mod:`~rf_callback.tracing.fast`) is followed as the one ATen operation it
    runs, without the dispatcher. A handler ``(tracer, func, args, kwargs) -> (out, operation,
    inputs, step)`` makes the meta output unseen by the tracer; ``step`` then says what the output
    sees, through :meth:`Tracer.follow` and its refusal rules.
    """

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = run_lowered(self.tracer, func, types, args, kwargs)
        if out is not None:
            return out
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
            self.tracer.computed += func not in _MOVES  # a pad only moves values
            outputs = flat_tensors(out)
            moves = _MOVES.get(func)

            def move(positions: torch.Tensor) -> torch.Tensor | None:
                return None if moves is None else moves(args, kwargs, positions)

            if any(type(self.tracer.info[t]) is Indexed for t in traced):
                results = self.tracer.follow_elements(traced, move)
            else:

                def elements(infos: list[Traced], error: UnsupportedLayerError) -> Indexed | Traced | None:
                    return self.tracer.elements(traced, infos, error, move)

                results = self.tracer.follow(operation, traced, lambda infos: self.tracer.settle(step(infos)), elements)
            self.tracer.file(traced, outputs, results)
        return out
