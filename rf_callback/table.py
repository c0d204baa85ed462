"""Analytic receptive fields of every module of a PyTorch model.

:func:`receptive_fields` runs the model's ``forward`` once on the *meta* device (shapes only, no
arithmetic, no random numbers) and follows every ATen operation (see :mod:`rf_callback.tracing`),
so residual adds, concatenations, functional calls inside ``forward``, views and permutes are
followed exactly, whatever Python built the graph. Module boundaries come from forward hooks,
removed before the function returns.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import itertools
import math
import operator
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as _attribute
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rf_callback.algebra import Field, MisalignedBranchesError
from rf_callback.errors import TraceError, UnsupportedLayerError
from rf_callback.report import format_rows
from rf_callback.sharding import sharding_of, structure_twin
from rf_callback.tracing import (
    FunctionInterceptor,
    GridDims,
    Layout,
    Traced,
    Tracer,
    Unsupported,
    axis_length,
    flat_tensors,
    grid_dims,
    module_lowering,
    refusal,
    run_module_lowered,
    spread_refusal,
)

__all__ = [
    "OUTPUT_ROW",
    "LayerKey",
    "LayerRF",
    "Placement",
    "ReceptiveFieldTable",
    "TraceError",
    "UnsupportedLayerError",
    "Verdict",
    "receptive_fields",
    "unwrap_model",
]

OUTPUT_ROW = "(output)"
"""Name of the row of the model's own output when the top-level ``forward`` computes it (no module returns it)."""

# --------------------------------------------------------------------------------------------
# Layer keys: the one place that writes and reads them
# --------------------------------------------------------------------------------------------

_KEY = re.compile(r"(?P<module>.*?)(?:\[(?P<call>[0-9]+)\])?(?::(?P<output>[0-9]+))?", re.DOTALL)
_SUFFIX = re.compile(r"(?:\[[0-9]+\]|:[0-9]+)\Z")
"""A module name ending like a call or output index (``head[1]``, ``out:0``): its keys always carry the call."""


@dataclass(frozen=True)
class LayerKey:
    """A row name of :class:`ReceptiveFieldTable`: ``module``, ``module[call]``, ``module:output``, ``module[call]:output``.

    ``call`` is the call index of a module called several times in one forward, ``output`` the index
    among the input-dependent tensors a module returns (``None`` when there is one). The row of the
    model's own output, :data:`OUTPUT_ROW`, names the model itself: :attr:`module_name` is ``""``.
    Every module name parses, newlines and brackets included: a name that itself ends like an index
    (``head[1]``) gets keys with an explicit call (``head[1][0]``).

    Example::
        >>> LayerKey.parse("layer1.0.relu[2]:1")
        LayerKey(module='layer1.0.relu', call=2, output=1)
        >>> str(LayerKey("features.conv1")), str(LayerKey("relu", call=0))
        ('features.conv1', 'relu[0]')
        >>> LayerKey.parse("odd\\nname[1][0]")
        LayerKey(module='odd\\nname[1]', call=0, output=None)
    """

    module: str
    call: int | None = None
    output: int | None = None

    @classmethod
    def parse(cls, key: str) -> LayerKey:
        match = _KEY.fullmatch(key)  # matches every string (DOTALL: newlines too)
        module, call, output = match["module"], match["call"], match["output"]  # type: ignore[index]
        return cls(module, None if call is None else int(call), None if output is None else int(output))

    @property
    def module_name(self) -> str:
        """The name of the module whose forward returns this output in ``model.named_modules()``.

        Example::
            >>> LayerKey.parse("layer1.0.relu[2]").module_name, LayerKey.parse("(output)").module_name
            ('layer1.0.relu', '')
        """
        return "" if self.module == OUTPUT_ROW else self.module

    def __str__(self) -> str:
        return _key(self.module, self.call, self.output)


def _key(module: str, call: int | None, output: int | None) -> str:
    """``str(LayerKey(module, call, output))``, without building the key (a table writes one per row)."""
    if call is None and output is None:
        return module
    return f"{module}{'' if call is None else f'[{call}]'}{'' if output is None else f':{output}'}"


# --------------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a row's positions are in its output tensor: ``(N, C, H, W)``, channels-last, or tokens.

    ``dims[d]`` describes tensor dimension ``d + 1`` (after the batch): the class tokens in front
    of it, then its factors ``(axis or None, length)`` in row-major order (``((0, 14), (1, 14))``
    for 196 patch tokens). :meth:`view` turns such an output into ``(N, C, *grid)``.
    """

    dims: GridDims
    grid: tuple[int, ...]

    @classmethod
    def image(cls, tensor_shape: Sequence[int]) -> Placement:
        """The usual ``(N, C, *spatial)`` layout."""
        channels = ((None, tensor_shape[1]),) if tensor_shape[1] > 1 else ()
        grid = tuple(tensor_shape[2:])
        return cls(((0, channels), *((0, ((a, n),)) for a, n in enumerate(grid))), grid)

    @property
    def is_image(self) -> bool:
        """Whether outputs are already ``(N, C, *grid)``."""
        return self == Placement.image((1, _size(self.dims[0][1]), *self.grid)) if self.dims else False

    def view(self, output: Tensor) -> Tensor:
        """``output`` (any batch size) as ``(N, C, *grid)``: class tokens dropped, channels first, axes in order.

        Example::
            >>> tokens = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)  # a class token + 2x2 patches, 3 features
            >>> grid = Placement(((1, ((0, 2), (1, 2))), (0, ((None, 3),))), (2, 2)).view(tokens)
            >>> tuple(grid.shape), grid[0, :, 0, 1].tolist()  # patch (0, 1) is token 2
            ((2, 3, 2, 2), [6.0, 7.0, 8.0])
        """
        if self.is_image:
            return output
        for d, (tokens, _) in enumerate(self.dims):
            if tokens:
                output = output.narrow(d + 1, tokens, output.shape[d + 1] - tokens)
        factors = [factor for _, dim in self.dims for factor in dim]
        output = output.reshape(output.shape[0], *(length for _, length in factors))
        plain = [1 + i for i, (axis, _) in enumerate(factors) if axis is None]
        axes = {axis: 1 + i for i, (axis, _) in enumerate(factors) if axis is not None}
        output = output.permute(0, *plain, *(axes[a] for a in sorted(axes)))
        return output.reshape(output.shape[0], -1, *self.grid)


def _size(factors: Sequence[tuple[int | None, int]]) -> int:
    return math.prod(length for _, length in factors)


Verdict = Literal["productive", "border", "critical", "unproductive", "global", "unknown"]
"""What a row's fields say about its use at the input size it was traced at: see :attr:`LayerRF.verdict`."""


@dataclass(frozen=True)
class LayerRF:
    """Receptive field of one module's output, in input pixels.

    Pairs follow the input's spatial axes: ``(h, w)`` for images, ``(l,)`` for sequences.

    Attributes:
        name: the module's name in ``model.named_modules()``; ``name[k]`` for the ``k``-th call of
            a module called several times in one forward; ``name:i`` for the ``i``-th of several
            input-dependent tensors a module returns (a bare name when it returns one).
            ``"(output)"`` (:data:`OUTPUT_ROW`) is the model's output when its top-level ``forward``
            computes it after the last module (a final resize, a flatten...).
        module_type: the module's class name (the model's own for ``"(output)"``).
        input_shape: spatial shape of the model input, e.g. ``(28, 28)``.
        output_shape: spatial shape of this output; 1 on an axis the layer reduced or flattened away.
            It counts grid positions only: a ViT's class tokens and a window partition's layout are
            in ``tensor_shape``, not here.
        field: the geometry (:class:`~rf_callback.algebra.Field`): ``field.rfs[a]`` is Distill's
            triple of axis ``a`` (size, jump = stride, start = -padding), ``field.box`` the exact boxes.
        equivariant: whether this output shifts with the input (no global mixing, fixed-position
            cuts or positional constants upstream), so that a unit can be computed from a crop of
            the input around its box.
        unsupported: why this row has no receptive field (``None`` when it has one).
        tensor_shape: the whole output tensor's shape for a batch of one, e.g. ``(1, 64, 56, 56)``;
            it tells an image-shaped ``(N, C, H, W)`` output from a flattened or channels-last one.
        placement: where the positions are in that tensor (:class:`Placement`), so that maps can
            read channels-last and token outputs; None where they are not one grid (windows).
        dtype: the output's dtype; an integer or boolean output (``MaxPool2d(return_indices=True)``'s
            indices) keeps its row and geometry, but carries no gradient, so it has no receptive map.
        inputs: the fields of the tensors read by the operation that made this output's field (its
            direct predecessors in the graph of the forward, as the trace saw it). An operation that
            passes a field on unchanged (an activation, BatchNorm, dropout, a view, a 1x1 convolution)
            makes none, so a BatchNorm shares its convolution's inputs, and a block's output those of
            its last operation (a residual add). None where one of them could not be followed, and for
            the input itself.
        layout: which image axes (whole, or split into window parts) each dimension of that tensor
            holds, as the tracer follows them (see :mod:`rf_callback.tracing.layout`); with
            ``element_positions`` it tells which unit any element of the output is, windows included.

    Example::
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
        >>> rf = receptive_fields(net, (1, 28, 28))["2"]
        >>> rf.size, rf.stride, rf.padding, rf.output_shape
        ((8, 8), (2, 2), (3, 3), (14, 14))
        >>> rf.box(0, 0), rf.box(0, 0, clip=False), rf.center(5, 5)
        ((0, 0, 5, 5), (-3, -3, 5, 5), (10.5, 10.5))
    """

    name: str
    module_type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    field: Field | None = None
    equivariant: bool = False
    unsupported: UnsupportedLayerError | None = None
    tensor_shape: tuple[int, ...] = ()
    placement: Placement | None = None
    dtype: torch.dtype | None = None
    inputs: tuple[Field, ...] | None = None
    layout: Layout | None = _attribute(default=None, compare=False, repr=False)

    def _geometry(self) -> Field:
        if self.unsupported is not None or self.field is None:
            raise self.unsupported  # type: ignore[misc]
        return self.field

    @property
    def supported(self) -> bool:
        return self.unsupported is None

    @property
    def size(self) -> tuple[int, ...]:
        """Receptive-field size per axis (padding does not change it)."""
        return tuple(rf.size for rf in self._geometry().rfs)

    @property
    def min_size(self) -> tuple[int, ...]:
        """Per axis, the smallest receptive-field size over all paths from the input to this output.

        A path's size is its analytic size (padding moves a field, never sizes it; dilation and
        strides enter as in :attr:`size`; after upsampling, the largest over the unit positions).
        After a residual add the identity shortcut is a path, so on a ResNet the minimum stays at the
        stem's size however deep the block: Richter et al.'s ``r_min``. Equal to :attr:`size` on a
        network with a single path.

        A path through a layer that mixes all positions (global pooling, attention, flatten + Linear)
        has the size of the union of what it mixed: on a ResNet-18 at 32 px, whose last stage has one
        position, the shortest path into ``fc`` still sees only 11 pixels of each axis.
        """
        return self._geometry().min_size

    @property
    def max_size(self) -> tuple[int, ...]:
        """Per axis, the largest receptive-field size over all paths from the input (``r_max``).

        At most :attr:`size`, the size of the union of every path's field (equal where the paths'
        fields are centred alike, as in torchvision's ResNets).
        """
        return self._geometry().max_size

    @property
    def verdict(self) -> Verdict:
        """What the fields say about this layer at the input size the table was traced at.

        Following Richter et al. ("Should You Go Deeper?", ICMLA 2021; the rule of RFA-Toolbox's
        ``is_border``), a field *covers* the input when its analytic size reaches the input's length
        on every axis (``size >= length``; an axis still short of it leaves the layer context to add
        along that axis, so a non-square input is judged axis by axis and all must be covered). The
        analytic size, not the box clipped to the image, is compared, as the papers do: it is what
        the layer integrates in the interior, the same for every unit, and it makes the numbers
        comparable with theirs.

        * ``"unproductive"``: the smallest field of this output (:attr:`min_size`) and the smallest
          field of every tensor read by the operation that made it (its direct predecessors,
          :attr:`inputs`; a BatchNorm or an activation that passes a convolution's field on is judged
          with the convolution) cover the input: even its shortest path had seen everything before
          it, so it adds no context.
        * ``"border"``: its smallest field covers the input but one of its inputs' does not (or an
          input could not be followed): the last layer that still adds context on its shortest path.
        * ``"critical"``: its largest field covers the input, its smallest does not.
        * ``"global"``: every path from the input went through a layer that mixes all positions on
          every axis (global pooling, attention, flatten + Linear): the network's head or a global
          gate, which widens nothing; the rule does not judge it (RFA-Toolbox gives dense layers an
          infinite field and so marks every one after the first, the classifier included).
        * ``"productive"`` otherwise, ``"unknown"`` for a row without a receptive field.

        Successors are not part of the rule. Along the paths through this layer they see at least
        what it sees (a path's field only grows, but for a slice that keeps an upsampling's narrower
        phases), so "all its successors cover the input" follows from its own; over all their
        paths it would fail at every residual add (whose shortest path is the identity shortcut) and
        call every layer of a ResNet productive (RFA-Toolbox leaves that clause commented out and marks
        the blocks' convolutions). Layers that see small fields again after a skip (a U-Net's decoder)
        are judged by their own fields and inputs, not by their place in the call order.

        Example::
            >>> from torch import nn
            >>> net = nn.Sequential(*(nn.Conv2d(1, 1, 5, padding=2) for _ in range(3)))
            >>> table = receptive_fields(net, (1, 8, 8))
            >>> [(row.min_size, row.verdict) for row in table.values()]
            [((5, 5), 'productive'), ((9, 9), 'border'), ((13, 13), 'unproductive')]
        """
        if self.unsupported is not None or self.field is None:
            return "unknown"
        field = self.field
        if all(rf.jump == 0 for paths in field.paths for rf in paths):
            return "global"
        if not _covers(field.min_size, self.input_shape):
            return "critical" if _covers(field.max_size, self.input_shape) else "productive"
        if self.inputs and all(_covers(read.min_size, self.input_shape) for read in self.inputs):
            return "unproductive"
        return "border"

    @property
    def stride(self) -> tuple[int | Fraction, ...]:
        """Effective stride per axis: input pixels between neighbouring units (0: all units share one field).

        After upsampling it is the average advance per unit, an exact ``Fraction`` where it is not
        whole (``Fraction(1, 2)`` after one 2x downsampling and two 2x upsamplings), and ``size``
        the largest field over the positions; ``box`` stays exact per unit (see
        :class:`~rf_callback.algebra.AxisRF`). Tables print it as ``1/2``.
        """
        return tuple(rf.jump for rf in self._geometry().rfs)

    @property
    def padding(self) -> tuple[int, ...]:
        """Effective padding per axis: how far unit 0's field reaches before the first input pixel."""
        return tuple(rf.padding for rf in self._geometry().rfs)

    @property
    def is_global(self) -> bool:
        """Whether every unit sees the whole input (global pooling, flatten + Linear, attention...)."""
        field = self._geometry()
        fixed = all(rf.jump == 0 or n == 1 for rf, n in zip(field.rfs, self.output_shape))
        return fixed and field.box((0,) * len(self.output_shape)) == tuple((0, n) for n in self.input_shape)

    def _check_index(self, index: Sequence[int]) -> None:
        if len(index) != len(self.output_shape):
            raise IndexError(f"{self.name}: a unit has {len(self.output_shape)} coordinates, got {tuple(index)}.")
        for i, extent in zip(index, self.output_shape):
            if not 0 <= i < extent:
                raise IndexError(
                    f"{self.name}: unit {tuple(index)} is outside the output of shape {self.output_shape}."
                )

    def center(self, *index: int) -> tuple[float, ...]:
        """Input coordinates (y, x) of the centre of unit ``index``'s receptive field."""
        self._check_index(index)
        return tuple(rf.center(i) for rf, i in zip(self._geometry().rfs, index))

    def box(self, *index: int, clip: bool = True) -> tuple[int, ...]:
        """Half-open box ``(top, left, bottom, right)`` of the input that can influence unit ``index``.

        ``x[..., top:bottom, left:right]`` is exactly that region: the bounding box of the pixels
        with a path to the unit. It is empty (``top == bottom``) for a unit that sees only padding.
        ``clip=False`` gives the analytic box instead, which may extend past the image.
        """
        self._check_index(index)
        field = self._geometry()
        intervals = [rf.interval(i) or (round(rf.center(i)),) * 2 for rf, i in zip(field.rfs, index)]
        if clip:
            exact = field.box([min(i, field.length(a) - 1) for a, i in enumerate(index)])
            empty = [(min(max(low, 0), n),) * 2 for (low, _), n in zip(intervals, self.input_shape)]
            intervals = list(exact) if exact is not None else empty
        return (*(low for low, _ in intervals), *(high for _, high in intervals))

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict of this row; a fractional stride is a string such as ``"1/2"`` (``Fraction("1/2")`` reads it)."""
        record: dict[str, Any] = {"name": self.name, "type": self.module_type, "output_shape": list(self.output_shape)}
        if self.unsupported is not None:
            record["unsupported"] = self.unsupported.cause
            return record
        record.update(
            size=list(self.size),
            min_size=list(self.min_size),
            max_size=list(self.max_size),
            stride=[str(s) if isinstance(s, Fraction) else s for s in self.stride],  # JSON: "1/2"
            padding=list(self.padding),
            is_global=self.is_global,
            verdict=self.verdict,
        )
        return record


def _covers(sizes: Sequence[int], lengths: Sequence[int]) -> bool:
    """Whether fields of ``sizes`` reach the input's ``lengths`` on every axis."""
    return all(size >= length for size, length in zip(sizes, lengths))


class ReceptiveFieldTable(Mapping[str, LayerRF]):
    """Receptive fields by module name, in the order the modules were called.

    A module called ``k > 1`` times in one forward has rows ``name[0]`` ... ``name[k-1]``; its bare
    name raises a ``KeyError`` that lists them, so calls are never merged silently. ``output_order``
    lists the rows in the order their outputs were computed: a container after the modules inside it.
    ``relays`` holds the rows of module calls that computed nothing from the input: they returned
    what they were given, at most padded, sliced or viewed (``Identity``, dropout in eval mode,
    ``ZeroPad2d``, ``Flatten``); their maps are those of the layer that feeds them.
    """

    def __init__(
        self,
        rows: Sequence[LayerRF],
        input_shape: tuple[int, ...],
        reused: Mapping[str, int],
        output_order: Sequence[str] | None = None,
        relays: Iterable[str] = (),
    ) -> None:
        self._rows = {row.name: row for row in rows}
        self.input_shape = input_shape
        self.reused = dict(reused)
        order = list(self._rows) if output_order is None else output_order
        self.output_order = tuple(key for key in order if key in self._rows)
        self.relays = frozenset(key for key in relays if key in self._rows)

    def __getitem__(self, name: str) -> LayerRF:
        try:
            return self._rows[name]
        except KeyError:
            if name in self.reused:
                calls = ", ".join(f"{name}[{k}]" for k in range(self.reused[name]))
                raise KeyError(f"'{name}' is called {self.reused[name]} times in one forward; use {calls}.") from None
            close = difflib.get_close_matches(name, self._rows, n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            shown = ", ".join(list(self._rows)[:40]) + (", ..." if len(self) > 40 else "")
            raise KeyError(
                f"No module output named '{name}' has a receptive field.{hint} Layers: {shown or 'none'}."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"ReceptiveFieldTable({len(self)} layers, input_shape={self.input_shape})"

    def __str__(self) -> str:
        """The table aligned for a terminal: ``print(table)``."""
        return format_rows(row.to_record() for row in self.values())

    def to_markdown(self) -> str:
        """The table as Markdown (for notebooks, READMEs and TensorBoard's Text tab)."""
        return format_rows((row.to_record() for row in self.values()), markdown=True)

    def filter(
        self, *, types: str | Sequence[str] | None = None, layers: Sequence[str] | None = None
    ) -> ReceptiveFieldTable:
        """The rows of some module types (``"Conv2d"``, ``["Conv2d", "MaxPool2d"]``) and/or some layer keys.

        Example::
            >>> from torch import nn
            >>> table = receptive_fields(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)), (1, 8, 8))
            >>> print(table.filter(types=["Conv2d", "MaxPool2d"]))
            layer  type       output  RF size  RF min-max  stride  padding  verdict
            0      Conv2d     6x6     3        3           1       0
            2      MaxPool2d  3x3     4        4           2       0
        """
        kinds = {types} if isinstance(types, str) else set(types) if types is not None else None
        keys = set(layers) if layers is not None else None
        rows = [
            row
            for key, row in self._rows.items()
            if (kinds is None or row.module_type in kinds) and (keys is None or key in keys)
        ]
        return ReceptiveFieldTable(rows, self.input_shape, self.reused, self.output_order, self.relays)

    def unproductive(self) -> ReceptiveFieldTable:
        """The rows predicted unproductive at the traced input size (:attr:`LayerRF.verdict`), in call order.

        Example::
            >>> from torch import nn
            >>> net = nn.Sequential(*(nn.Conv2d(1, 1, 5, padding=2) for _ in range(3)))
            >>> list(receptive_fields(net, (1, 8, 8)).unproductive())
            ['2']
        """
        return self.with_verdict("unproductive")

    def computing(self) -> list[str]:
        """The rows whose output's field no row before them had, in the order outputs were computed.

        They are the layers that make a field (a convolution, a pooling, a block's sum), not those that
        pass one on (BatchNorm, activations, dropout, 1x1 convolutions, a container after its last layer).

        Example::
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.MaxPool2d(2))
            >>> receptive_fields(net, (1, 8, 8)).computing()
            ['0', '4']
        """
        seen: set[int] = set()
        found = []
        for key in self.output_order:
            field = self._rows[key].field
            if field is not None and id(field) not in seen:
                seen.add(id(field))
                found.append(key)
        return found

    def with_verdict(self, *verdicts: Verdict) -> ReceptiveFieldTable:
        """The rows whose :attr:`LayerRF.verdict` is one of ``verdicts`` (``"border"``, ``"critical"``...)."""
        return self.filter(layers=[key for key, row in self._rows.items() if row.verdict in verdicts])

    @property
    def unsupported(self) -> list[LayerRF]:
        """Rows without a receptive field (only present with ``strict=False``)."""
        return [row for row in self._rows.values() if not row.supported]


# --------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / Lightning Fabric (``.module``) or ``torch.compile``
    (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            hasattr(model, "_forward_module") and isinstance(getattr(model, "module", None), nn.Module)
        ):  # the last: Fabric's _FabricModule
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as users name them: a ``torch.compile``'d submodule ``net`` is ``net``
    (its original module), not ``net._orig_mod``, and the compile wrapper itself is left out.

    Example::
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3))
        >>> net[0] = torch.compile(net[0])
        >>> [name for name, _ in named_modules(net)]
        ['', '0']
    """
    for name, module in model.named_modules():
        # A compile wrapper holds its module in _modules; hasattr would cost an AttributeError per module.
        if "_orig_mod" not in module._modules or not isinstance(module._modules["_orig_mod"], nn.Module):
            yield (name.replace("._orig_mod", "").removeprefix("_orig_mod.") if "_orig_mod" in name else name), module


@contextlib.contextmanager
def evaluating(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Eval mode for the duration; every module's own ``training`` flag restored afterwards.

    ``modules`` are ``model.modules()`` where the caller has them already (a walk costs).

    Example::
        >>> net = nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2).eval())
        >>> with evaluating(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    modes = [(module, module.training) for module in (model.modules() if modules is None else modules)]
    try:
        if any(mode for _, mode in modes):
            model.eval()
        yield
    finally:
        for module, mode in modes:
            if module.training != mode:  # Module.__setattr__ is slow: set only what eval() changed
                module.training = mode


_ABSENT = object()
"""No instance attribute of that name (as opposed to one set to None)."""


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_HOOK_COMPANIONS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
"""A module's hooks by handle id, and the dicts that hold more about some of them under the same ids."""


@contextlib.contextmanager
def _attributes_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The modules' buffers, the set of their attributes, and their hooks put back after the trace.

    A forward that caches what it computes (ConViT's relative indices, stored in a buffer when the
    resolution changes) would otherwise keep the meta tensor of the trace, which the next real
    forward reads and fails on. Buffers are compared by identity (a tensor's ``==`` compares values)
    and attributes the trace added are removed: a few microseconds per module (journaling
    ``nn.Module.__setattr__`` instead costs a fifth of a mobile network's trace, its code deoptimized).
    Hooks the forward registered go too, with the attribute that says they are there (transformers'
    output capturing: hooks kept without their flag are registered again by the next forward, which
    then collects every output twice).
    """
    # (A TorchScript module's buffers are not a dict, and its compiled forward caches nothing in Python.)
    saved = [
        (
            module,
            module._buffers.copy() if type(module._buffers) is dict else {},
            len(module.__dict__),
            [len(module.__dict__.get(name, ())) for name in _HOOK_DICTS],
        )
        for module in modules
    ]
    try:
        yield
    finally:
        for module, buffers, count, hook_counts in saved:
            now = module._buffers
            if buffers and (len(now) != len(buffers) or any(map(operator.is_not, now.values(), buffers.values()))):
                now.clear()
                now.update(buffers)
            if len(module.__dict__) != count:  # attributes set for the first time, by the trace's forward
                for name in list(module.__dict__)[count:]:
                    if name != "forward":  # the trace's own wrapper, which it removes itself
                        del module.__dict__[name]
            for name, hook_count in zip(_HOOK_DICTS, hook_counts):
                hooks = module.__dict__.get(name, ())
                if len(hooks) > hook_count:  # registered by the trace's forward (handle ids only grow)
                    for key in list(hooks)[hook_count:]:
                        del hooks[key]
                        for companion in _HOOK_COMPANIONS:
                            module.__dict__.get(companion, {}).pop(key, None)


@contextlib.contextmanager
def _caches_cleared(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Empties, after the trace, every ``functools`` cache of the model's code that the trace added to.

    A function cached with ``lru_cache`` (HF BEiT's ``generate_relative_position_index``, a static method
    behind transformers' own decorator) would keep what it computed on the trace's meta tensors and hand
    it to every later real forward: wrong numbers, or a crash. The caches looked at are those the
    modules' own classes and the modules defining them hold (class attributes, module globals, and the
    functions those wrap); one that missed during the trace is cleared, which costs a recomputation.
    """
    kinds = frozenset(type(module) for module in modules)
    caches = _CACHES.get(kinds)
    if caches is None:
        caches = _CACHES[kinds] = _model_caches(kinds)
    misses = [cache.cache_info().misses for cache in caches]
    try:
        yield
    finally:
        for cache, before in zip(caches, misses):
            if cache.cache_info().misses != before:
                cache.cache_clear()


_CACHES: dict[frozenset[type], list[Any]] = {}
"""The ``functools`` caches found for a set of module classes, looked for once."""


def _model_caches(kinds: Iterable[type]) -> list[Any]:
    """The ``functools`` caches that the module classes ``kinds`` (PyTorch's own left out) and their modules hold."""
    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if id(value) in seen or depth > 2 or not callable(value):
            return
        seen.add(id(value))
        if _getattr_or_none(value, "cache_clear") is not None and _getattr_or_none(value, "cache_info") is not None:
            found[id(value)] = value
        wrapped = _getattr_or_none(value, "__wrapped__")
        if wrapped is not None:
            visit(wrapped, depth + 1)
        for cell in _getattr_or_none(value, "__closure__") or ():
            try:
                visit(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                continue

    namespaces: dict[int, dict[str, Any]] = {}
    for kind in kinds:
        for cls in kind.__mro__:
            if cls.__module__.startswith("torch.") or cls is object:
                continue
            namespaces.setdefault(id(cls), vars(cls))
            module = sys.modules.get(cls.__module__)
            if module is not None:
                namespaces.setdefault(id(module), vars(module))
    for namespace in namespaces.values():
        for value in list(namespace.values()):
            if not isinstance(value, type):  # classes are walked through the modules' own
                visit(value)
    return list(found.values())


def _getattr_or_none(value: Any, name: str) -> Any:
    """``getattr(value, name, None)``, and None where looking raises: MONAI's stand-ins for optional imports that
    are not installed (``monai._C``) raise on any attribute, and the model's code holds them as globals."""
    try:
        return getattr(value, name, None)
    except Exception:  # noqa: BLE001 - whatever a stranger's __getattr__ raises, it is no cache
        return None


def _no_autocast() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not 2 <= len(shape) <= 4 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(
            f"input_shape must be (C, H, W) for images (or (C, L), (C, D, H, W)) without the batch, with positive"
            f" ints; got {input_shape!r}."
        )
    return shape


def receptive_fields(model: nn.Module, input_shape: Sequence[int], *, strict: bool = True) -> ReceptiveFieldTable:
    """Analytic receptive field of every module whose output depends on the input's positions.

    The model runs once on the meta device: no arithmetic, no random numbers, no memory for
    activations. It is evaluated as in ``model.eval()`` (BatchNorm uses running statistics, dropout
    is off); every module's ``training`` flag, hooks, parameters and device are left as found.

    A model whose parameters are sharded across ranks (FSDP2, FSDP, DeepSpeed ZeRO-3) is never run: its
    structure is traced on a twin (:func:`~rf_callback.sharding.structure_twin`: the same modules and
    forward, meta parameters of the full shapes, none of its hooks), so no collective, lazy
    initialisation or framework state is involved and each rank can trace on its own.

    Args:
        model: any ``nn.Module`` whose ``forward`` takes one tensor (DDP and ``torch.compile``
            wrappers are unwrapped).
        input_shape: ``(C, H, W)`` without the batch; ``(C, L)`` for 1-D models.
        strict: raise :class:`UnsupportedLayerError` at the first row that depends on an operation
            without a receptive field (sampling grids, misaligned branches...),
            naming that operation. Such an operation is harmless, and refused nowhere, where every
            unit of its inputs already sees the same interval along the axes it touches (global
            pooling, attention, a squeeze-excitation gate upstream). With ``False`` the table still
            lists the rows that depend on it, flagged (``row.supported`` is False).

    Returns:
        A :class:`ReceptiveFieldTable` from module name to :class:`LayerRF`, in call order, ending
        with a row ``"(output)"`` for the model's output when the top-level ``forward`` computes it
        after the last module (so that, with ``strict=False``, an operation refused there is flagged).

    Raises:
        UnsupportedLayerError: in strict mode, naming the module, its type and the operation.
        TraceError: if ``forward`` cannot run on the meta device (it reads tensor values), or cannot
            run at this input size at all (the model's own error is shown).

    Example::
        >>> from torch import nn
        >>> net = nn.Sequential(
        ...     nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2)
        ... )
        >>> receptive_fields(net, (1, 32, 32))["2"].size
        (9, 9)
    """
    model = unwrap_model(model)
    sharding = sharding_of(model)
    if sharding is not None:
        model = structure_twin(model, sharding)
    shape = _check_input_shape(input_shape)
    spatial = shape[1:]
    tracer = Tracer(spatial, type(model).__name__)
    calls: list[_Call] = []  # in call order
    counts: dict[str, int] = {}  # calls so far, by module name
    running: list[_Call] = []
    clock = itertools.count()  # orders the calls by when their outputs were computed
    handles = []
    wrapped: list[tuple[nn.Module, Any]] = []  # modules whose forward announces its calls, and what to restore

    def enter(place: tuple[str, str]) -> None:  # (module name, module type)
        name, kind = place
        index = counts.get(name, 0)
        counts[name] = index + 1
        call = _Call(name, kind, index, [], started=tracer.computed)
        calls.append(call)
        running.append(call)
        tracer.stack.append(place)

    def leave(output: Any) -> None:
        tracer.stack.pop()
        call = running.pop()
        call.outputs, call.finished = _traced_outputs(tracer, output, strict), next(clock)
        call.relays = tracer.computed == call.started

    def announcing(module: nn.Module, place: tuple[str, str]) -> Any:
        forward, lowering = module.forward, module_lowering(module)

        def traced_forward(*args: Any, **kwargs: Any) -> Any:
            enter(place)
            output = None if lowering is None else run_module_lowered(tracer, lowering, module, args, kwargs)
            if output is None:
                output = forward(*args, **kwargs)
            leave(output)
            return output

        return traced_forward

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    failure: Exception | None = None
    walked = list(named_modules(model))
    try:
        for name, module in walked:
            if not name:
                continue
            place = (name, type(module).__name__)
            if module._forward_pre_hooks or module._forward_hooks:
                # Hooks of its own run first, as they always have: one may replace the module's output.
                handles.append(module.register_forward_pre_hook(lambda _m, _a, place=place: enter(place)))
                handles.append(module.register_forward_hook(lambda _m, _a, output: leave(output)))
            else:
                # Its forward, wrapped for the trace in the instance's own dict (restored below, a TorchScript
                # module's compiled forward too: those take no hooks): hooks, even global ones, send every
                # module call down PyTorch's slow path, which costs more than a mobile network's forward.
                wrapped.append((module, module.__dict__.get("forward", _ABSENT)))
                module.__dict__["forward"] = announcing(module, place)
        # Outside inference mode and autocast, so that composite operations decompose as usual.
        modules = [module for _, module in walked]
        with (
            _attributes_kept(modules),
            _caches_cleared(modules),
            evaluating(model, modules),
            _gc_paused(),  # the trace allocates many small tuples; the cyclic collector would double its time
            torch.inference_mode(False),
            torch.no_grad(),
            _no_autocast(),
            FunctionInterceptor(tracer),
            tracer,
        ):
            sample = torch.empty((1, *shape), dtype=dtype, device="meta")
            identity = tuple(((None, n),) if n > 1 else () for n in sample.shape[:2])
            tracer.info[sample] = Traced(
                Field.of_input(spatial), identity + tuple(((a, n),) for a, n in enumerate(spatial))
            )
            try:
                output = model(sample)
            except (UnsupportedLayerError, MisalignedBranchesError):
                raise
            except Exception as error:  # noqa: BLE001 - the model's own code may raise anything: said below
                failure = error
    finally:
        for handle in handles:
            handle.remove()
        for module, forward in wrapped:
            if forward is _ABSENT:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = forward
    if failure is not None:
        raise _trace_error(model, shape, dtype, failure, try_real=sharding is None) from failure
    # The model's outputs that no module returned (computed in the top-level forward) get rows too.
    returned = {(id(t), id(info)) for call in calls for t, info in call.outputs}
    final = _traced_outputs(tracer, output, strict)
    if any((id(t), id(info)) not in returned for t, info in final):
        calls.append(_Call(OUTPUT_ROW, type(model).__name__, 0, final, next(clock)))
        counts[OUTPUT_ROW] = 1
    return _build_table(calls, counts, shape, tracer.sources)


def _trace_error(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, error: Exception, try_real: bool = True
) -> TraceError:
    """Why ``model`` could not be traced: its own forward fails at this size, or it reads values on the meta device.

    ``try_real=False`` (a sharded model's twin, which has no real parameters) skips the real forward.
    """
    real = _real_forward_error(model, shape, dtype) if try_real else None
    name, batch = type(model).__name__, f"(1, {', '.join(map(str, shape))})"
    first = next(
        ((key, m) for key, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))), None
    )
    wanted = getattr(first[1], "in_channels", None) if first is not None else None
    if real is not None and wanted is not None and wanted != shape[0]:
        layer, kind, plural = first[0], type(first[1]).__name__, "s" * (wanted != 1)  # type: ignore[index]
        return TraceError(
            f"{name} takes {wanted} input channel{plural} (its first layer, '{layer}', is a {kind} with in_channels={wanted}),"
            f" the input {batch} has {shape[0]}: {type(real).__name__}: {' '.join(str(real).split()).rstrip('.')}."
            f" HINT: give inputs of {wanted} channel{plural}."
        )
    if real is not None:
        return TraceError(
            f"{name}.forward fails on a real input of shape {batch} too, so this size cannot be traced:"
            f" {type(real).__name__}: {str(real).rstrip('.')}. HINT: pass an input_shape that the model accepts"
            " (the size it was built for, or a multiple of its total stride)."
        )
    checked = f" (it runs on a real input of shape {batch})" if try_real else " (its parameters are sharded)"
    return TraceError(
        f"Could not run {name}.forward on the meta device to trace receptive fields{checked}:"
        f" {type(error).__name__}: {str(error).rstrip('.')}. HINT: forward must take one tensor and must not read"
        " tensor values (no .item(), no data-dependent control flow)."
    )


def _real_forward_error(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> Exception | None:
    """The error of one real eval-mode forward of zeros, or None; modes and random state are left as found."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    try:
        with evaluating(model), torch.random.fork_rng(devices=devices), torch.no_grad(), _no_autocast():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except Exception as error:  # noqa: BLE001 - whatever the model raises is the answer
        return error
    return None


def _traced_outputs(tracer: Tracer, output: Any, strict: bool) -> list[tuple[torch.Tensor, Traced | Unsupported]]:
    """The input-dependent tensors of a module's (or the model's) output with what the tracer knows of them.

    Raises:
        UnsupportedLayerError: with ``strict``, when one of them has no exact receptive field: the
            error names the operation that could not be followed, where it ran.
    """
    if type(output) is Tensor:  # most modules: one tensor
        info = tracer.info.get(output)
        found = [] if info is None else [(output, info)]
    else:
        found = [(t, info) for t in flat_tensors(output) if (info := tracer.info.get(t)) is not None]
    if tracer.spread:  # units that form no grid (see tracing.layout.Spread): no row, though the trace goes on
        found = [(t, _no_grid(tracer, info)) for t, info in found]
    if strict:
        for _, info in found:
            if refusal(info) is not None:
                raise refusal(info)
    return found


def _no_grid(tracer: Tracer, info: Traced | Unsupported) -> Traced | Unsupported:
    """``info``, or :class:`Unsupported` (the same object for the same info) where its units form no grid."""
    error = spread_refusal(info.layout) if type(info) is Traced else None
    if error is None:
        return info
    return tracer.no_grid.setdefault(id(info), (info, Unsupported(error)))[1]


@dataclass(slots=True)
class _Call:
    """One call of a module during the trace, and the input-dependent tensors it returned."""

    name: str
    module_type: str
    index: int  # among the calls of this module
    outputs: list[tuple[torch.Tensor, Traced | Unsupported]]
    finished: int = 0  # when its outputs were computed, among all calls
    started: int = 0  # the tracer's computations when it began
    relays: bool = False  # it computed nothing: it returned what it was given, moved (padded, viewed) at most


def _build_table(
    calls: list[_Call],
    counts: dict[str, int],
    shape: tuple[int, ...],
    sources: Mapping[int, tuple[Field, tuple[Field, ...] | None]],
) -> ReceptiveFieldTable:
    spatial = shape[1:]
    rows = []
    reused = {name: count for name, count in counts.items() if count > 1}
    placed: dict[Layout, tuple[tuple[int, ...], Placement | None]] = {}  # layout -> output shape, placement
    finished: list[tuple[int, int, str]] = []  # (when computed, position, key)
    relays = set()
    for call in calls:
        name, module_type, outputs = call.name, call.module_type, call.outputs
        for k, (output, info) in enumerate(outputs):
            numbered = name in reused or _SUFFIX.search(name) is not None
            key = _key(name, call.index if numbered else None, k if len(outputs) > 1 else None)
            finished.append((call.finished, len(finished), key))
            if call.relays:
                relays.add(key)
            refused = refusal(info)
            if refused is not None:
                image = output.dim() == len(shape) + 1
                output_shape = tuple(output.shape[2:]) if image else (1,) * len(spatial)
                placement = Placement.image(output.shape) if image else None
                tensor = (output.shape, placement, output.dtype)  # what the row says of the output tensor
                rows.append(LayerRF(key, module_type, spatial, output_shape, None, False, refused, *tensor))
                continue
            layout = info.layout
            found = placed.get(layout)
            if found is None:  # many outputs share a layout (a stage's blocks, BN and ReLU after a conv)
                output_shape = tuple(axis_length(layout, axis) for axis in range(len(spatial)))
                dims = grid_dims(layout)
                found = placed[layout] = output_shape, Placement(dims, output_shape) if dims is not None else None
            inputs = sources.get(id(info.field), (None, None))[1]  # what the operation that made it read
            tensor = (output.shape, found[1], output.dtype, inputs, layout)
            rows.append(LayerRF(key, module_type, spatial, found[0], info.field, info.equivariant, None, *tensor))
    return ReceptiveFieldTable(rows, shape, reused, [key for _, _, key in sorted(finished)], relays)
