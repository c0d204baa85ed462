"""Gradient-saliency receptive maps: where a unit *does* look (its effective receptive field).

The theoretical receptive field (:func:`~rf_callback.receptive_fields`) says where a unit can
look; the gradient of the unit with respect to the input says where it does (Luo, Li, Urtasun
and Zemel, "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks",
NIPS 2016). :func:`receptive_maps` computes these maps for a batch of probes (images, 1-D signals
or 3-D volumes) and many layers at once, leaving no trace on the model: a few forward passes, each
on whole inputs or on only the pixels its layers' units can see (crops, or, for images, their boxes
tiled side by side), and at most one backward pass per layer.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from rf_callback.crops import _Layout, _passes, _per_unit
from rf_callback.erf import LUO_THRESHOLD, ERFStats, check_threshold_and_mass, erf_stats, finite_maps, finite_mean
from rf_callback.errors import TraceError
from rf_callback.probes import check_finite
from rf_callback.report import format_table
from rf_callback.selection import _SHAPES, Unit, check_channel, check_unit, check_unit_fits, resolve_layers
from rf_callback.sharding import sharding_of
from rf_callback.table import (
    LayerKey,
    LayerRF,
    ReceptiveFieldTable,
    evaluating,
    named_modules,
    receptive_fields,
    unwrap_model,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["NonFiniteMapWarning", "ReceptiveMaps", "probe_mismatch", "receptive_maps"]


@dataclass(frozen=True)
class ReceptiveMaps:
    """Gradient receptive maps of N probes at L layers, over the probes' ``d`` spatial axes.

    For images (``d = 2``) ``*spatial`` is ``(H, W)`` and boxes are ``(top, left, bottom, right)``; for
    1-D signals ``(L,)`` and ``(start, stop)``; for volumes ``(D, H, W)`` and ``(front, top, left,
    back, bottom, right)``.

    Attributes:
        layers: the layer names (keys of the receptive-field table), in order.
        maps: ``|d unit / d input|`` summed over input channels, float32 (N, L, *spatial).
        gradients: the signed gradient, float32 (N, L, C, *spatial).
        units: the chosen unit, one index per axis of each layer's output, int64 (N, L, d).
        boxes: that unit's box, half-open ``(lows..., highs...)`` clipped to the input, int64 (N, L, 2d);
            the whole input for a layer without an analytic field (see ``analytic``).
        centers: the centre of that unit's unclipped receptive field, float32 (N, L, d); without an
            analytic field, the unit's position scaled to the input (``(i + 0.5) * H / h - 0.5``).
        erf: the statistics of each map (:class:`ERFStats`).
        analytic: per layer, whether it has an analytic receptive field (``LayerRF.supported``); a
            layer the tracer cannot follow (after an upsampling, say) still gets maps, from whole inputs.
        probes: the inputs the maps were computed from, a copy on the CPU (N, C, *spatial), which
            :meth:`plot` draws; None where the maps were built without them.
    """

    layers: tuple[str, ...]
    maps: Tensor
    gradients: Tensor
    units: Tensor
    boxes: Tensor
    centers: Tensor
    erf: ERFStats
    analytic: tuple[bool, ...]
    probes: Tensor | None = None

    @property
    def finite(self) -> Tensor:
        """(N, L) bool: False where a map holds NaN or inf values (see :attr:`ERFStats.finite`)."""
        return self.erf.finite

    @property
    def mean_maps(self) -> Tensor:
        """The probes' mean map per layer, scaled to its peak (Luo et al.'s averaged ERF), (L, *spatial).

        Maps holding NaN or inf are left out (:attr:`finite`); a layer whose finite maps are all zero
        gives zeros, one without a finite map NaN.
        """
        mean = finite_mean(self.maps, self.finite)
        peak = mean.flatten(1).amax(1).view(-1, *(1,) * (mean.dim() - 1))
        return torch.where(peak > 0, mean / peak.clamp(min=torch.finfo(mean.dtype).tiny), mean * 0)  # NaN stays

    def plot(
        self,
        probes: Tensor | None = None,
        layers: str | Sequence[str] | None = None,
        *,
        layer: str | None = None,
        select: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        tile: int | None = None,
    ) -> Figure:
        """The picture the callback logs, as a matplotlib figure: one grid of probes per layer.

        Args:
            probes: the inputs to draw ``(N, C, *spatial)`` (default: those the maps were computed from).
            layers: one layer key or several (default: all of them).
            layer: one layer key (``plot(layer=key)`` is ``plot(layers=key)``).
            select: which probes to show (default: all).
            labels: a caption per probe.
            tile: screen pixels per probe side, at most (default: as large as fills a notebook's width).

        Example::

            maps = receptive_maps(model, probes)
            maps.plot(layer="layer3", select=[0, 1, 2])  # a Figure; in Jupyter it shows itself
        """
        from rf_callback.render import plot_maps

        if layer is not None:
            if layers is not None:
                raise TypeError(f"ReceptiveMaps.plot: pass layer={layer!r} or layers={layers!r}, not both.")
            layers = layer
        if probes is None:
            if self.probes is None:
                raise ValueError("ReceptiveMaps.plot: these maps hold no probes; pass them: plot(probes, ...).")
            probes = self.probes
        names = [layers] if isinstance(layers, str) else list(layers) if layers is not None else list(self.layers)
        missing = [name for name in names if name not in self.layers]
        if missing:
            raise KeyError(f"ReceptiveMaps.plot: no maps for {missing}; these maps have {list(self.layers)}.")
        columns = [self.layers.index(name) for name in names]
        rows = list(select) if select is not None else list(range(len(probes)))
        captions = [labels[n] for n in rows] if labels is not None else None
        return plot_maps(
            probes[rows],
            self.maps[rows][:, columns],
            self.boxes[rows][:, columns],
            self.centers[rows][:, columns],
            labels=captions,
            layer_names=names,
            analytic=[self.analytic[k] for k in columns],
            tile=tile,
        )

    def summary(self) -> str:
        """Per layer, the ERF statistics averaged over the probes, as an aligned table (``print(maps.summary())``).

        Columns: ``ERF size`` (side of a d-cube with the volume of the pixels above the threshold share
        of the map's peak, input px), ``ERF/RF`` (that over the side of a d-cube with the volume of the
        unit's box clipped to the input), ``mass side`` (the cube around the unit's centre holding
        ``mass`` of the saliency), ``mass/RF`` (that over the side of the cube around the same centre
        that holds the whole clipped box; both fractions are in [0, 1]), ``dead`` (the share of probes
        with an all-zero map). ``RF`` is the whole input for a layer without an analytic field, marked ``*``.
        """
        means = self.erf.mean()
        rows = [
            [
                layer if self.analytic[k] else f"{layer} *",
                f"{means['size'][k]:.1f}",
                f"{means['size_fraction'][k]:.2f}",
                f"{means['mass_side'][k]:.1f}",
                f"{means['mass_fraction'][k]:.2f}",
                f"{means['dead_fraction'][k]:.0%}",
            ]
            for k, layer in enumerate(self.layers)
        ]
        table = format_table(["layer", "ERF size", "ERF/RF", "mass side", "mass/RF", "dead"], rows)
        if not all(self.analytic):
            table += "\n* no analytic receptive field: RF is the whole input"
        for k, layer in enumerate(self.layers):
            bad = (~self.finite[:, k]).nonzero().flatten().tolist()
            if bad:
                table += f"\n! {layer}: non-finite maps (NaN or inf) of probe{'s' * (len(bad) > 1)}"
                table += f" {', '.join(map(str, bad))}, left out"
        return table


class _Stop(BaseException):
    """Raised from the last needed hook to skip the rest of forward (BaseException: user code's
    ``except Exception`` does not swallow it)."""


class _CropFailed(Exception):
    """The model cannot run on crops of the probes (it checks its input size, cuts at fixed places...)."""


_UNCROPPABLE: weakref.WeakKeyDictionary[nn.Module, set[frozenset[str]]] = weakref.WeakKeyDictionary()
"""Per model, the layer sets whose crops failed once, so that they are not tried again (weak keys:
the cache never keeps a model alive)."""


def _capture(
    model: nn.Module,
    modules: dict[str, nn.Module],
    fields: ReceptiveFieldTable,
    layers: Sequence[str],
    probes: Tensor,
    pick: Callable[[str, Tensor], Tensor],
    *,
    cropped: bool = False,
) -> dict[str, Tensor]:
    """Run ``model(probes)`` until every wanted layer is seen; return ``pick(layer, output)`` by layer.

    ``pick`` runs inside the forward hook, on the output viewed as ``(N, C, *grid)`` (its row's
    :class:`~rf_callback.table.Placement`: channels-last and token outputs too). The model may
    later modify that tensor in place (``out += branch(x)``, ``out.relu_()``); what ``pick`` took
    from it (an indexed copy, tied by autograd to the output's history at that moment) does not
    change, so a layer's result never depends on how far the forward runs. ``pick``'s own errors
    are raised as they are; with ``cropped``, an error of the model's forward (an input-size check,
    a fixed reshape) is raised as :class:`_CropFailed`.
    """
    views = {key: fields[key].placement.view for key in layers}  # type: ignore[union-attr]  # mappable rows
    wanted: dict[str, dict[int, list[tuple[str, int]]]] = {}
    for key in layers:
        parsed = LayerKey.parse(key)  # the model's own output row hooks the model itself
        wanted.setdefault(parsed.module_name, {}).setdefault(parsed.call or 0, []).append((key, parsed.output or 0))
    captured: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    errors: list[Exception] = []

    def hook_for(name: str):
        def hook(_module, _args, output):
            index = calls.get(name, 0)
            calls[name] = index + 1
            for key, position in wanted[name].get(index, ()):
                try:
                    captured[key] = pick(key, views[key](_input_dependent(output)[position]))
                except Exception as error:  # noqa: BLE001 - ours, not the model's: stop, and raise it below as it is
                    errors.append(error)
                    raise _Stop from None
            if len(captured) == len(layers):
                raise _Stop

        return hook

    handles = []
    try:
        for name in wanted:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        with contextlib.suppress(_Stop):
            model(probes)
    except Exception as error:
        if not cropped:
            raise
        raise _CropFailed(f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    missing = [key for key in layers if key not in captured]
    if missing:
        message = f"receptive_maps: forward never produced the outputs of {missing}."
        raise _CropFailed(message) if cropped else RuntimeError(message)
    return captured


def _input_dependent(output: object) -> list[Tensor]:
    """The tensors a module returned, in order, through tuples, lists and dicts (what ``name:i`` keys count)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _input_dependent(item)]
    return []


def _fixed_units(shape: tuple[int, ...], unit: Unit, count: int) -> Tensor | None:
    """Each probe's unit, one index per axis, (count, d); None for ``"max"`` units, chosen during the forward."""
    if unit in ("max", "max_logit"):
        return None
    position = tuple(n // 2 for n in shape) if unit == "center" else unit
    return torch.tensor([position] * count, dtype=torch.long).view(count, len(shape))


Pick = int | list[int] | None
"""Which channel of a unit: None sums over channels, an int takes one, a list one per probe (``"max_logit"``)."""


def _strongest(output: Tensor, channel: int | None, single: bool) -> tuple[Tensor, list[int] | None]:
    """Each probe's position of largest activation, (N, d), and for ``single`` its channel.

    ``single`` (``"max_logit"``): the largest single value over positions and channels (of ``channel``
    only, when given); otherwise the largest channel sum (or ``channel``'s value).
    """
    output = output.detach()
    positions = output.shape[2:]
    if channel is not None:
        activation = output[:, channel]
    elif single:
        flat = output.flatten(2).flatten(1).argmax(1).cpu()  # over (channel, position)
        size = math.prod(positions)
        return _unravel(flat % size, positions), (flat // size).tolist()
    else:
        activation = output.sum(1)
    return _unravel(activation.flatten(1).argmax(1).cpu(), positions), None


def _unravel(flat: Tensor, shape: Sequence[int]) -> Tensor:
    """Flat indices (N,) as positions (N, d) in ``shape``."""
    coordinates = []
    for length in reversed(shape):
        coordinates.append(flat % length)
        flat = flat // length
    return torch.stack(coordinates[::-1], dim=1)


def _check_output(output: Tensor, channel: int | None, name: str, dims: int) -> None:
    if output.dim() != dims + 2:
        raise ValueError(
            f"receptive_maps: layer '{name}' gives a {output.dim()}-D output; maps need {_SHAPES.get(dims, dims)}."
        )
    if channel is not None and not 0 <= channel < output.shape[1]:
        raise ValueError(f"receptive_maps(channel={channel}): layer '{name}' has {output.shape[1]} channels.")


def _warn_if_constant_sum(name: str, output: Tensor) -> None:
    """Warn when the channel sum of ``output`` does not depend on the input: its gradient, the map, is rounding noise.

    With several probes that is tested directly: at every position the sum is the same for every
    probe, although the channels themselves differ between probes. That is the output of a LayerNorm
    whose scale is uniform (every transformer at initialization), whose channels always sum to the
    same value, and of such a LayerNorm followed by a position embedding (HF PVT's patch embeddings),
    whose sum then differs from position to position, but not from probe to probe. With one probe,
    the sum being the same at every position stands in for it. Probes that are all alike prove
    nothing and warn of nothing.

    Example::
        >>> tokens = torch.nn.functional.layer_norm(torch.randn(3, 5, 8), (8,)) + torch.randn(5, 8)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _warn_if_constant_sum("embeddings", tokens.transpose(1, 2))  # (N, C, L): same sums for every probe
        >>> "does not depend on the input" in str(caught[0].message)
        True
    """
    values = output.detach().float()
    count, channels = values.shape[:2]
    grid = list(range(2, values.dim()))
    across = [0] if count > 1 else grid  # what the sum should vary over: the probes, or one probe's positions
    if channels < 2 or math.prod(values.shape[d] for d in across) < 2:
        return
    sums = values.sum(1)  # (N, *grid)
    along = [0] if count > 1 else [d - 1 for d in grid]
    spread = float((sums.amax(dim=along) - sums.amin(dim=along)).max())
    if spread > 2e-4 * float(values.abs().amax()) * channels**0.5:  # over the bound of the scale below: no warning
        return
    # How much each channel varies over the same: 0 for a dead layer or probes all alike.
    scale = float(values.std(dim=across).mean()) * channels**0.5
    if 0 < scale and spread <= 1e-4 * scale:
        where = "is the same for every probe at each position" if count > 1 else "is the same at every position"
        warnings.warn(
            f"receptive_maps: the sum of the channels of layer '{name}' does not depend on the input (it {where}:"
            " a LayerNorm with a uniform scale, perhaps followed by a position embedding?), so the gradient of"
            " that sum, the map, is rounding noise. HINT: pass channel=k to follow one channel.",
            stacklevel=2,
        )


def _unit_sum(output: Tensor, units: Sequence[tuple[int, ...]], channel: Pick) -> Tensor:
    """Sum over probes of each probe's unit (its channel sum, one channel, or each probe's own channel)."""
    if len(set(units)) == 1:
        picked = output[(slice(None), slice(None), *units[0])]  # (N, C)
    else:
        coordinates = (torch.tensor(axis, device=output.device) for axis in zip(*units))
        picked = output[(torch.arange(len(units), device=output.device), slice(None), *coordinates)]
    if isinstance(channel, list):
        return picked[torch.arange(len(channel), device=output.device), channel].sum()
    return (picked[:, channel] if channel is not None else picked.sum(1)).sum()


def _move(
    target: Tensor,
    to: Sequence[tuple[int, ...]],
    source: Tensor,
    at: Sequence[tuple[int, ...]],
    size: Sequence[int],
) -> None:
    """``target[n, :, y:y + h, x:x + w] = source[n, :, top:top + h, left:left + w]`` for each probe's corners
    (any number of spatial axes)."""

    def window(corner: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(low, low + length) for low, length in zip(corner, size))

    if len(set(to)) == 1 and len(set(at)) == 1:
        target[(slice(None), slice(None), *window(to[0]))] = source[(slice(None), slice(None), *window(at[0]))]
        return
    for n, (place, corner) in enumerate(zip(to, at)):
        target[(n, slice(None), *window(place))] = source[(n, slice(None), *window(corner))]


def _pass_gradients(
    model: nn.Module,
    modules: dict[str, nn.Module],
    members: Sequence[str],
    fields: ReceptiveFieldTable,
    pixels: Tensor,
    units: dict[str, Tensor],
    layout: _Layout | None,
    picks: dict[str, Pick],
    into: dict[str, Tensor],
    reuse: tuple[Tensor, dict[str, Tensor]] | None = None,
) -> None:
    """Write the input gradient of each member layer's units into ``into[layer]`` (N, C, *spatial).

    One forward on the pass's input (whole inputs, or the probes' pixels laid out by ``layout``),
    then one backward per layer through the shared graph, or a single one for a mosaic. ``reuse``
    is a forward already run on whole inputs: ``(leaf input, unit sums by layer)``. ``picks``: each
    layer's channel choice. With a layout, raises :class:`_CropFailed` if the model cannot run on it;
    the caller then uses whole inputs.
    """
    count, dims = len(pixels), pixels.dim() - 2
    if reuse is not None:
        leaf, targets = reuse
    else:
        if layout is None:
            leaf = pixels.clone()
        else:
            leaf = pixels.new_zeros(*pixels.shape[:2], *layout.size)
            for size, place, corners in {(s, p, tuple(c)) for s, p, c in layout.tiles.values()}:
                _move(leaf, [place] * count, pixels, corners, size)
        leaf.requires_grad_(True)

        local = {name: list(map(tuple, units[name].tolist())) for name in members}  # each probe's unit, in the pass
        if layout is not None:
            for name in members:
                _, place, corners = layout.tiles[name]
                stride = fields[name].stride
                shifts = [tuple((p - c) // s for p, c, s in zip(place, corner, stride)) for corner in corners]
                local[name] = [tuple(i + di for i, di in zip(unit, shift)) for unit, shift in zip(local[name], shifts)]

        def unit_sum(name: str, output: Tensor) -> Tensor:
            pick = picks[name]
            _check_output(output, pick if isinstance(pick, int) else None, name, dims)
            positions = output.shape[2:]
            if layout is not None and not all(0 <= i < n for unit in local[name] for i, n in zip(unit, positions)):
                raise _CropFailed(f"layer '{name}' gives {tuple(positions)} positions on {layout.size}")
            if pick is None:
                _warn_if_constant_sum(name, output)
            return _unit_sum(output, local[name], pick)

        targets = _capture(model, modules, fields, members, leaf, unit_sum, cropped=layout is not None)
    if layout is not None and layout.together:
        (gradient,) = torch.autograd.grad(torch.stack([targets[name] for name in members]).sum(), leaf)
        gradients = dict.fromkeys(members, gradient)
    else:
        gradients = {
            name: torch.autograd.grad(targets[name], leaf, retain_graph=index < len(members) - 1)[0]
            for index, name in enumerate(members)
        }
    for name in members:
        if layout is None:
            into[name][:] = gradients[name]
        else:
            size, place, corners = layout.tiles[name]
            _move(into[name], corners, gradients[name], [place] * count, size)


_AXES = {1: "L", 2: "H, W", 3: "D, H, W"}


def probe_mismatch(model: nn.Module, shape: Sequence[int]) -> str | None:
    """Why probes of ``shape`` ``(N, C, *spatial)`` do not fit the model's first convolution, in words; ``None``
    when they do (or the model has none).

    Said when the trace fails, in place of the model's own error: for a 3-D tensor that is one unbatched
    image, PyTorch's message speaks of a batch of one with one channel.

    Example::
        >>> probe_mismatch(nn.Sequential(nn.Conv2d(3, 8, 3)), (3, 224, 224))  # doctest: +NORMALIZE_WHITESPACE
        "probes of shape (3, 224, 224) are read as (N, C, L): 3 probes of 224 channels along 1 axis, but the
        model's first convolution, '0' (Conv2d), takes (N, 3, H, W). HINT: one image? Add the batch axis:
        probes.unsqueeze(0), of shape (1, 3, 224, 224)."
    """
    shape = tuple(shape)
    first = next(
        ((name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None
    )
    if first is None or len(shape) < 3:
        return None
    name, conv = first
    dims, channels = len(conv.kernel_size), conv.in_channels
    takes = f"the model's first convolution, '{name}' ({type(conv).__name__}), takes (N, {channels}, {_AXES[dims]})"
    axes = len(shape) - 2
    if axes != dims:
        read = f"(N, C, {_AXES.get(axes, '...')})"
        found = f"{shape[0]} probe{'s' * (shape[0] != 1)} of {shape[1]} channels along {axes} ax{'is' if axes == 1 else 'es'}"
        if shape[0] == channels and len(shape) == dims + 1:
            hint = f"one image? Add the batch axis: probes.unsqueeze(0), of shape {(1, *shape)}"
        else:
            hint = f"pass probes (N, {channels}, {_AXES[dims]})"
        return f"probes of shape {shape} are read as {read}: {found}, but {takes}. HINT: {hint}."
    if shape[1] != channels:
        return (
            f"probes of shape {shape} have {shape[1]} channel{'s' * (shape[1] != 1)}, but {takes}. HINT: pass"
            f" probes with {channels} channel{'s' * (channels != 1)}, as the model's data gives them."
        )
    return None


def receptive_maps(
    model: nn.Module,
    probes: Tensor,
    layers: Sequence[str] | None = None,
    *,
    unit: Unit = "center",
    channel: int | None = None,
    threshold: float = LUO_THRESHOLD,
    mass: float = 0.95,
    table: ReceptiveFieldTable | None = None,
) -> ReceptiveMaps:
    """Gradient receptive maps of one unit per (probe, layer), with ERF statistics.

    Probes are images ``(N, C, H, W)``, 1-D signals ``(N, C, L)`` or volumes ``(N, C, D, H, W)``;
    maps, units and boxes have one axis, index or pair of bounds per spatial axis.

    The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off),
    whatever its mode; every module's mode, its parameters and their ``.grad``, its hooks, the
    random state, grad mode, inference mode and autocast are left as found, and the probes are
    cloned. It works under ``torch.no_grad()`` and ``torch.inference_mode()`` (as in Lightning's
    validation), on the model's device and dtype, with channels-last probes, and on DDP or
    ``torch.compile`` wrappers. Autocast is switched off inside, so maps are computed at the
    model's own precision.

    Shift-equivariant layers run on crops of the probes around their units' boxes (any number of
    axes), and, on images, units whose fields meet no padding on their boxes tiled side by side,
    with one backward for all (exact, and cheaper). A model that cannot run on crops (it checks
    its input size, as torchvision's VisionTransformer does, or raises any other exception there)
    gets the same maps from whole inputs; that is decided once per model and set of layers,
    silently, and not tried again. Layers without an analytic receptive field (after an
    upsampling the tracer cannot follow, say; the model's own dense output) get maps from whole
    inputs, with the whole input as their box (``ReceptiveMaps.analytic`` is False there).
    Each layer's unit is read inside its forward hook, so a model that later changes that output
    in place (``out += branch(x)``, ``out.relu_()``) does not change its map: no map depends on
    which other layers are requested.

    Args:
        model: the network; ``model(probes)`` must run.
        probes: inputs (N, C, *spatial) with 1, 2 or 3 spatial axes.
        layers: layer keys from :func:`receptive_fields`; ``None`` (default): one per resolution stage
            (:func:`default_layers`); ``"all"``: every layer whose output is laid out as the input.
        unit: ``"center"`` (the middle output position, as in Luo et al.), ``"max"`` (each probe's
            position of largest activation, summed over channels unless ``channel`` is given),
            ``"max_logit"`` (each probe's largest single value, over positions and channels, and that
            channel alone: the most confident class logit of a dense prediction), or an explicit
            position, one index per axis (``(i, j)`` for images).
        channel: None sums the unit over channels; an int takes that channel only (with
            ``"max_logit"``, the largest value of that channel).
        threshold: fraction of a map's peak above which a pixel counts for ``erf.count``.
        mass: fraction of the total saliency that ``erf.mass_side``'s cube must hold.
        table: the table from :func:`receptive_fields` for this input shape, if already computed.

    Returns:
        A :class:`ReceptiveMaps`.

    Example::
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        >>> result = receptive_maps(net, torch.rand(2, 1, 16, 16), layers=["0", "2"])
        >>> result.layers, tuple(result.maps.shape), result.boxes[0, 1].tolist()
        (('0', '2'), (2, 2, 16, 16), [6, 6, 11, 11])
        >>> signal = nn.Sequential(nn.Conv1d(1, 4, 5, dilation=2), nn.Conv1d(4, 4, 3))
        >>> result = receptive_maps(signal, torch.rand(2, 1, 64), layers=["1"])
        >>> tuple(result.maps.shape), result.boxes[0, 0].tolist()  # (start, stop) of the centre unit's field
        ((2, 1, 64), [27, 38])

    A map that holds NaN or inf values (the model divides by zero, overflows...) is kept as it is in
    ``maps``, marked in ``finite``, left out of the mean maps and the statistics (never counted as
    dead), and named in one :class:`NonFiniteMapWarning` with the first operation whose values became
    non-finite. Probes holding NaN or inf are refused.
    """
    result, non_finite = _receptive_maps(
        model, probes, layers, unit=unit, channel=channel, threshold=threshold, mass=mass, table=table
    )
    if non_finite is not None:
        warnings.warn(non_finite, NonFiniteMapWarning, stacklevel=2)
    return result


def _receptive_maps(
    model: nn.Module,
    probes: Tensor,
    layers: str | Sequence[str] | None,
    *,
    unit: Unit,
    channel: int | None,
    threshold: float,
    mass: float,
    table: ReceptiveFieldTable | None,
) -> tuple[ReceptiveMaps, str | None]:
    """:func:`receptive_maps`, and the warning it gives about maps holding NaN or inf (``None`` when all are finite)."""
    if not 3 <= probes.dim() <= 5:
        raise ValueError(
            f"receptive_maps: probes must be (N, C, H, W), or (N, C, L) or (N, C, D, H, W), got shape"
            f" {tuple(probes.shape)}."
        )
    check_threshold_and_mass(threshold, mass)
    check_finite(probes)
    model = unwrap_model(model)
    sharding = sharding_of(model)
    if sharding is not None:  # its forward is a collective: one rank alone would wait for the others forever
        raise ValueError(
            f"receptive_maps: the parameters of {type(model).__name__} are sharded across ranks ({sharding}), so"
            " its forward needs every rank. HINT: ProbeMonitor(model, probes).compute() on every rank, or"
            " `with rf_callback.sharding.gathered(model) as whole:` on every rank and receptive_maps(whole, ...)"
            " where whole is not None (rank zero)."
        )
    try:
        fields = table if table is not None else receptive_fields(model, tuple(probes.shape[1:]), strict=False)
    except TraceError as error:
        mismatch = probe_mismatch(model, probes.shape)
        if mismatch is None:
            raise
        raise TraceError(f"receptive_maps: {mismatch}") from error
    if tuple(fields.input_shape) != tuple(probes.shape[1:]):
        raise ValueError(
            f"receptive_maps: fields were traced for {fields.input_shape}, probes are {tuple(probes.shape[1:])}."
        )
    unit, channel = check_unit(unit), check_channel(channel)
    names = resolve_layers(fields, layers)
    for name in names:
        check_unit_fits(unit, fields[name])
    spatial = tuple(probes.shape[2:])
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else probes.device
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else probes.dtype

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        stack.enter_context(evaluating(model))
        count = len(probes)
        units = {name: _fixed_units(fields[name].output_shape, unit, count) for name in names}
        picks: dict[str, Pick] = dict.fromkeys(names, channel)
        pixels = probes.detach().to(device=device, dtype=dtype).clone()
        modules = dict(named_modules(model))
        signed = torch.zeros(count, len(names), *probes.shape[1:])  # (N, L, C, *spatial), float32 on the CPU
        into = {name: signed[:, index] for index, name in enumerate(names)}
        reuse = None
        if unit in (
            "max",
            "max_logit",
        ):  # units come from the activations on whole inputs; layers not cropped reuse that pass

            def strongest(name: str, output: Tensor) -> Tensor:
                _check_output(output, channel, name, len(spatial))
                if channel is None and unit == "max":
                    _warn_if_constant_sum(name, output)
                units[name], chosen = _strongest(output, channel, unit == "max_logit")
                if chosen is not None:
                    picks[name] = chosen
                return _unit_sum(output, list(map(tuple, units[name].tolist())), picks[name])

            image = pixels.clone().requires_grad_(True)
            reuse = (image, _capture(model, modules, fields, names, image, strongest))
        layer_set = frozenset(names)
        whole: list[str] = []
        non_finite = None
        for members, layout in _passes(names, fields, units, spatial, reuse is not None):
            if layout is None or layer_set in _UNCROPPABLE.get(model, ()):
                whole += members
                continue
            try:
                _pass_gradients(model, modules, members, fields, pixels, units, layout, picks, into)
            except _CropFailed:  # the same maps from whole inputs; not tried again for this model and layer set
                _UNCROPPABLE.setdefault(model, set()).add(layer_set)
                whole += members
        if whole:
            whole.sort(key=names.index)
            _pass_gradients(model, modules, whole, fields, pixels, units, None, picks, into, reuse)
        finite = finite_maps(signed)  # (N, L)
        if not bool(finite.all()):
            non_finite = _non_finite(model, modules, fields, names, pixels, units, picks, finite)

    with torch.inference_mode(False):  # results are ordinary tensors, even for a caller in inference mode
        units_tensor = torch.stack([units[name].cpu() for name in names], dim=1)
        maps = signed.abs().sum(2)
        analytic = tuple(fields[name].supported for name in names)
        boxes = torch.tensor(
            [_per_unit(units[name], _box_of(fields[name])) for name in names], dtype=torch.long
        ).transpose(0, 1)
        centers = torch.tensor(
            [_per_unit(units[name], _center_of(fields[name])) for name in names], dtype=torch.float32
        ).transpose(0, 1)
        stats = erf_stats(maps, boxes, centers, threshold, mass)
        kept = probes.detach().to("cpu", copy=True)  # for plot(); the caller may change its tensor later
        return ReceptiveMaps(
            tuple(names), maps, signed, units_tensor, boxes, centers, stats, analytic, kept
        ), non_finite


class NonFiniteMapWarning(UserWarning):
    """Some receptive maps hold NaN or infinite values: they are left out of the mean maps and statistics."""


def _non_finite(
    model: nn.Module,
    modules: dict[str, nn.Module],
    fields: ReceptiveFieldTable,
    names: Sequence[str],
    pixels: Tensor,
    units: dict[str, Tensor],
    picks: dict[str, Pick],
    finite: Tensor,
) -> str:
    """The warning about the maps that are not ``finite`` (N, L): which probes at which layers, and where the
    values of the first one became non-finite (one more forward, and if need be backward, of that probe)."""
    pairs = (~finite).nonzero().tolist()  # (probe, layer index), probe-major
    by_probes: dict[tuple[int, ...], list[str]] = {}  # the probes of a layer -> those layers
    for k in sorted({k for _, k in pairs}):
        by_probes.setdefault(tuple(n for n, j in pairs if j == k), []).append(f"'{names[k]}'")
    listed = "; ".join(
        f"probe{'s' * (len(probes) > 1)} {', '.join(map(str, probes))} at layer{'s' * (len(at) > 1)} {', '.join(at)}"
        for probes, at in by_probes.items()
    )
    n, k = pairs[0]
    origin = _first_non_finite(
        model, modules, fields, names[k], pixels[n : n + 1], units[names[k]][n], picks[names[k]], n
    )
    return (
        f"receptive_maps: maps hold NaN or infinite values ({listed}); {origin}. They are left out of the mean maps"
        " and the ERF statistics (not counted as dead) and drawn marked 'non-finite'. HINT: the model's values or"
        " gradients overflow or divide by zero on these probes (an all-zero probe divided by its own maximum?)."
    )


def _first_non_finite(
    model: nn.Module,
    modules: dict[str, nn.Module],
    fields: ReceptiveFieldTable,
    name: str,
    probe: Tensor,
    unit: Tensor,
    pick: Pick,
    index: int,
) -> str:
    """Where the map of ``probe`` (one, ``(1, C, *spatial)``) at layer ``name`` became non-finite, in words.

    The forward runs under a dispatch mode that stops at the first operation whose output holds NaN or inf
    (in which module); if the forward stays finite, the backward of the unit runs under autograd's anomaly
    detection, which names the first backward function that returned NaN.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from rf_callback.tracing import flat_tensors

    inside: list[str] = []  # the modules whose forward is running, outermost first
    found: list[str] = []

    class FirstNonFinite(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            output = func(*args, **(kwargs or {}))
            if not found and any(
                t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in flat_tensors(output)
            ):
                where = f"'{inside[-1]}' ({type(modules[inside[-1]]).__name__})" if inside else "the top-level forward"
                found.append(f"{func} in {where}")
            return output

    def leave(_module: nn.Module, _args: object, _output: object) -> None:
        inside.pop()

    handles = []
    try:
        for module_name, module in modules.items():
            if module_name:
                handles.append(module.register_forward_pre_hook(lambda _m, _a, n=module_name: inside.append(n)))
                handles.append(module.register_forward_hook(leave))
        with torch.no_grad(), FirstNonFinite():
            model(probe.clone())
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return f"the values of probe {index} first became non-finite at {found[0]}"
    leaf = probe.clone().requires_grad_(True)
    target = _capture(model, modules, fields, [name], leaf, lambda _, out: _unit_sum(out, [tuple(unit.tolist())], pick))
    try:
        with warnings.catch_warnings(), torch.autograd.set_detect_anomaly(True, check_nan=True):
            warnings.simplefilter("ignore")  # anomaly mode warns about the forward it did not record
            torch.autograd.grad(target[name], leaf)
    except RuntimeError as error:
        function = re.search(r"Function '(\w+)' returned nan", str(error))
        if function is not None:
            return f"the forward values of probe {index} are finite; its gradient first became NaN in {function[1]}"
    return f"the forward values of probe {index} are finite; its gradient became non-finite in the backward pass"


def _box_of(row: LayerRF) -> Callable[..., tuple[int, ...]]:
    """A unit's box: the exact one, or the whole input for a row without an analytic field."""
    if row.supported:
        return row.box
    whole = (*(0 for _ in row.input_shape), *row.input_shape)
    return lambda *unit: whole


def _center_of(row: LayerRF) -> Callable[..., tuple[float, ...]]:
    """A unit's centre: its field's, or its position scaled to the input for a row without an analytic field."""
    if row.supported:
        return row.center
    scales = [n / m for n, m in zip(row.input_shape, row.output_shape)]
    return lambda *unit: tuple((i + 0.5) * scale - 0.5 for i, scale in zip(unit, scales))
