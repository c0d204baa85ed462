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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from rf_callback.report import format_table
from rf_callback.table import LayerKey, LayerRF, ReceptiveFieldTable, evaluating, receptive_fields, unwrap_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ERFStats",
    "ReceptiveMaps",
    "all_layers",
    "check_channel",
    "check_threshold_and_mass",
    "check_unit",
    "check_unit_fits",
    "default_layers",
    "erf_stats",
    "mass_areas",
    "receptive_maps",
]

Unit = Literal["center", "max", "max_logit"] | tuple[int, ...]
"""Which output unit of a layer: the middle one, each probe's most active one (channel sum), each
probe's largest single value (a class logit of a dense prediction), or a position, one index per axis."""

LUO_THRESHOLD = 0.0455
"""1 - 95.45%: Luo et al. count the pixels above this fraction of the peak (a Gaussian's 2-sigma mass)."""

MASS_SHARES = (0.2, 0.5, 0.99)
"""Shares of the probes' mean map's mass whose area :func:`mass_areas` reports (the mean ERF's spread)."""

SPATIAL_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)


@dataclass(frozen=True)
class ERFStats:
    """Effective-receptive-field statistics of maps over ``d`` axes (1, 2 or 3), per probe and layer.

    Each per-probe statistic is a float tensor of shape (N, L); sizes are in input pixels (samples
    for 1-D inputs, voxels for 3-D ones). For ``d = 2`` a "cube" is a square and "volume" an area.

    Attributes:
        count: pixels whose saliency exceeds ``threshold`` times the map's peak (Luo et al.).
        size: ``count ** (1 / d)``, the side of a d-cube of that volume (``sqrt(count)`` for images).
        mass_side: side of the smallest d-cube centred on the unit's RF centre that holds at least
            ``mass`` of the map's total saliency.
        rf_side: ``volume ** (1 / d)`` of the unit's analytic box clipped to the input (the whole
            input for a layer without an analytic field).
        size_fraction: ``size / rf_side``.
        mass_fraction: ``mass_side / rf_side`` (may exceed 1 near the border, where cubes are cut).
        extent: (N, L, d): per axis, the length of the interval that bounds the pixels above the threshold.
        dead: True where the map is all zero (a dead unit); every statistic is 0 there.
        mean_areas: (L, S): for the probes' mean map, the fraction of the input that holds each of
            ``shares`` of its mass, pixels taken from the largest down (:func:`mass_areas`).
        threshold: the fraction of the peak used for ``count``.
        mass: the fraction of the total used for ``mass_side``.
        shares: the shares of ``mean_areas``.
    """

    count: Tensor
    size: Tensor
    mass_side: Tensor
    rf_side: Tensor
    size_fraction: Tensor
    mass_fraction: Tensor
    dead: Tensor
    threshold: float
    mass: float
    extent: Tensor
    mean_areas: Tensor
    shares: tuple[float, ...] = MASS_SHARES

    def mean(self) -> dict[str, Tensor]:
        """Each statistic averaged over the probes whose unit is alive, shape (L,); 0 where all are dead.

        Keys: ``count``, ``size``, ``mass_side``, ``rf_side``, ``size_fraction``, ``mass_fraction`` (the
        attributes above), ``extent`` (shape (L, d)), ``dead_fraction`` (the share of probes whose map is
        all zero) and ``mean_area_<p>`` for each share ``p`` percent of :attr:`shares` (already per layer).
        """
        alive = (~self.dead).to(self.size.dtype)
        counted = alive.sum(0)
        result = {}
        for name in ("count", "size", "mass_side", "rf_side", "size_fraction", "mass_fraction", "extent"):
            values = getattr(self, name)
            weights = alive if values.dim() == 2 else alive[..., None]
            total = (values * weights).sum(0)
            alive_layers = counted if values.dim() == 2 else counted[..., None]
            result[name] = torch.where(alive_layers > 0, total / alive_layers.clamp(min=1), torch.zeros_like(total))
        result["dead_fraction"] = self.dead.to(self.size.dtype).mean(0)
        for index, share in enumerate(self.shares):
            result[mean_area_key(share)] = self.mean_areas[:, index]
        return result


def mean_area_key(share: float) -> str:
    """The :meth:`ERFStats.mean` key of a mass share: ``mean_area_50`` for 0.5.

    Example::
        >>> [mean_area_key(share) for share in MASS_SHARES]
        ['mean_area_20', 'mean_area_50', 'mean_area_99']
    """
    return f"mean_area_{100 * share:g}".replace(".", "_")


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
    """

    layers: tuple[str, ...]
    maps: Tensor
    gradients: Tensor
    units: Tensor
    boxes: Tensor
    centers: Tensor
    erf: ERFStats
    analytic: tuple[bool, ...]

    @property
    def mean_maps(self) -> Tensor:
        """The probes' mean map per layer, scaled to its peak (Luo et al.'s averaged ERF), (L, *spatial).

        A layer whose maps are all zero gives zeros.
        """
        mean = self.maps.mean(0)
        peak = mean.flatten(1).amax(1).view(-1, *(1,) * (mean.dim() - 1))
        return torch.where(peak > 0, mean / peak.clamp(min=torch.finfo(mean.dtype).tiny), torch.zeros_like(mean))

    def plot(
        self,
        probes: Tensor,
        layers: str | Sequence[str] | None = None,
        *,
        select: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        tile: int = 128,
    ) -> Figure:
        """The picture the callback logs, as a matplotlib figure: one grid of probes per layer.

        Args:
            probes: the inputs the maps were computed for ``(N, C, *spatial)``.
            layers: one layer key or several (default: all of them).
            select: which probes to show (default: all).
            labels: a caption per probe.
            tile: screen pixels per probe side.

        Example::

            maps = receptive_maps(model, probes)
            maps.plot(probes, "layer3", select=[0, 1, 2])  # a Figure; in Jupyter it shows itself
        """
        from rf_callback.render import plot_maps

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

        Columns: ``ERF size`` (side of a d-cube with the volume of the pixels above the threshold, input
        px), ``ERF/RF`` (that over the side of the analytic box), ``mass side`` (the cube around the
        unit's centre holding ``mass`` of the saliency), ``mass/RF``, ``dead`` (probes with an all-zero
        map). ``RF`` is the whole input for a layer without an analytic field, marked ``*``.
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
        return table


def check_unit(unit: object) -> Unit:
    """``unit`` in its one canonical form, or a ``ValueError`` that lists the choices.

    ``"centre"`` is accepted for ``"center"``; a list ``[i, j]`` becomes a tuple. A position has one
    index per spatial axis: ``(i,)`` for sequences, ``(i, j)`` for images, ``(k, i, j)`` for volumes.

    Example::
        >>> check_unit("centre"), check_unit([3, 4]), check_unit((7,))
        ('center', (3, 4), (7,))
    """
    if unit == "centre":
        return "center"
    if unit in ("center", "max", "max_logit"):
        return unit  # type: ignore[return-value]
    if (
        isinstance(unit, (list, tuple))
        and 1 <= len(unit) <= 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in unit)
    ):
        return tuple(unit)
    raise ValueError(
        f"unit={unit!r}: choose 'center' (or 'centre'), 'max', 'max_logit' or a unit position, one int >= 0 per"
        " axis: (i, j) for images, (i,) for sequences, (k, i, j) for volumes."
    )


def check_unit_fits(unit: Unit, row: LayerRF) -> None:
    """A ``ValueError`` unless ``unit`` (checked by :func:`check_unit`) names a position of ``row``'s output.

    Example::
        >>> from torch import nn
        >>> row = receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 8, 8))["0"]
        >>> check_unit_fits((5, 5), row)  # inside the 6x6 output
        >>> check_unit_fits((6, 0), row)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: unit=(6, 0): layer '0' has an output of 6x6 positions (2 indices per unit)...
    """
    if not isinstance(unit, tuple):
        return
    shape = row.output_shape
    if len(unit) != len(shape) or not all(0 <= i < n for i, n in zip(unit, shape)):
        raise ValueError(
            f"unit={unit}: layer '{row.name}' has an output of {'x'.join(map(str, shape))} positions"
            f" ({len(shape)} ind{'ex' if len(shape) == 1 else 'ices'} per unit). HINT: choose 'center', 'max',"
            " 'max_logit', or a position inside every monitored layer."
        )


def check_threshold_and_mass(threshold: float, mass: float) -> tuple[float, float]:
    """The ERF thresholds if ``0 < threshold < 1`` and ``0 < mass <= 1``, else a ``ValueError``.

    Example::
        >>> check_threshold_and_mass(LUO_THRESHOLD, 0.95)
        (0.0455, 0.95)
    """
    if not 0 < threshold < 1 or not 0 < mass <= 1:
        raise ValueError(f"threshold={threshold}, mass={mass}: need 0 < threshold < 1 and 0 < mass <= 1.")
    return threshold, mass


def check_channel(channel: object) -> int | None:
    """``channel`` if it is None (sum over channels) or an int >= 0, else a ``ValueError``.

    Example::
        >>> check_channel(None), check_channel(3)
        (None, 3)
    """
    if channel is None or (isinstance(channel, int) and not isinstance(channel, bool) and channel >= 0):
        return channel
    raise ValueError(f"channel={channel!r}: None (sum over channels) or an int >= 0.")


def _mappable(row: LayerRF) -> bool:
    """Whether a row can have a receptive map: its output is laid out as the input, ``(N, C, *spatial)``.

    Rows without an analytic field (after an upsampling, say) qualify too: gradients need no geometry.
    """
    return len(row.tensor_shape) == len(row.input_shape) + 2 and tuple(row.tensor_shape[2:]) == row.output_shape


_SHAPES = {1: "a sequence (N, C, l)", 2: "an image (N, C, h, w)", 3: "a volume (N, C, d, h, w)"}


def default_layers(table: ReceptiveFieldTable) -> list[str]:
    """One layer per resolution stage: for each output resolution, the last layer of the shallowest depth.

    Depth counts the dots of the module name, so a stage's container (``layer1`` of a ResNet,
    ``features.1`` of a ConvNeXt) wins over the layers inside it and over the first layer of the
    next stage that still runs at its resolution. Containers holding more than one change of
    resolution (a whole ``features`` block) and rows with a single output position (heads) are
    left out, and so are rows without an analytic field (name them, or pass ``"all"``). torchvision's
    ResNets give ``relu, layer1, layer2, layer3, layer4``.

    Example::
        >>> from torch import nn
        >>> conv = nn.Conv2d(4, 4, 3, padding=1)
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), conv, nn.MaxPool2d(2))
        >>> default_layers(receptive_fields(net, (1, 32, 32)))  # the last at 32x32, at 16x16, at 8x8
        ['1', '3', '4']
    """
    rows = {key: row for key, row in table.items() if row.supported and _mappable(row)}
    inside: dict[str, set[tuple[int, ...]]] = {}  # module -> resolutions of the rows of modules inside it
    for key, row in rows.items():
        parts = LayerKey.parse(key).module.split(".")
        for end in range(len(parts)):
            inside.setdefault(".".join(parts[:end]), set()).add(row.output_shape)
    chosen: dict[tuple[int, ...], tuple[int, str]] = {}  # resolution -> (depth, key)
    for key, row in rows.items():
        module = LayerKey.parse(key).module
        if math.prod(row.output_shape) == 1 or len(inside.get(module, ())) > 2:
            continue  # a head, or a container of several stages
        depth = module.count(".")
        best = chosen.get(row.output_shape)
        if best is None or depth <= best[0]:
            chosen[row.output_shape] = (depth, key)
    keys = {key for _, key in chosen.values()}
    return [key for key in table if key in keys]


def all_layers(table: ReceptiveFieldTable) -> list[str]:
    """Every row that can have a receptive map (an output laid out as the input), in call order."""
    return [key for key, row in table.items() if _mappable(row)]


class _Stop(BaseException):
    """Raised from the last needed hook to skip the rest of forward (BaseException: user code's
    ``except Exception`` does not swallow it)."""


def resolve_layers(table: ReceptiveFieldTable, layers: str | Sequence[str] | None) -> list[str]:
    """The layer keys to map: ``None`` for :func:`default_layers`, ``"all"`` for :func:`all_layers`, or names.

    A named row without an analytic receptive field is accepted when its output is laid out as the
    input: its maps come from whole inputs (``ReceptiveMaps.analytic``).

    Raises:
        ValueError: for an unknown name (close matches and the valid names listed), or a row whose
            output is not laid out as the input (``(N, C, h, w)`` for images).
    """
    if layers is None or layers == "all":
        chosen = default_layers(table) if layers is None else all_layers(table)
        if not chosen:
            raise ValueError(
                "no layer with a receptive field that varies across the input: nothing to map. Rows:"
                f" {', '.join(table) or 'none'}. HINT: check the input shape, or pass layers=[...]."
            )
        return chosen
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"layers={layers!r}: give None, 'all', or a non-empty list of layer names.")
    valid = ", ".join(all_layers(table)) or "none"
    for name in names:
        try:
            row = table[name]
        except KeyError as error:
            raise ValueError(f"layers={names!r}: {error.args[0]} Layers that have maps: {valid}.") from None
        if not _mappable(row):
            raise ValueError(
                f"layers={names!r}: '{name}' ({row.module_type}) gives an output of shape"
                f" {tuple(row.tensor_shape)} for one input, not {_SHAPES.get(len(row.input_shape), 'laid out as the input')},"
                f" so it has no receptive map. Layers that have maps: {valid}."
            )
    return list(dict.fromkeys(names))


class _CropFailed(Exception):
    """The model cannot run on crops of the probes (it checks its input size, cuts at fixed places...)."""


_UNCROPPABLE: weakref.WeakKeyDictionary[nn.Module, set[frozenset[str]]] = weakref.WeakKeyDictionary()
"""Per model, the layer sets whose crops failed once, so that they are not tried again (weak keys:
the cache never keeps a model alive)."""


def _capture(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layers: Sequence[str],
    probes: Tensor,
    pick: Callable[[str, Tensor], Tensor],
    *,
    cropped: bool = False,
) -> dict[str, Tensor]:
    """Run ``model(probes)`` until every wanted layer is seen; return ``pick(layer, output)`` by layer.

    ``pick`` runs inside the forward hook, on the output as the layer returned it. The model may
    later modify that tensor in place (``out += branch(x)``, ``out.relu_()``); what ``pick`` took
    from it (an indexed copy, tied by autograd to the output's history at that moment) does not
    change, so a layer's result never depends on how far the forward runs. ``pick``'s own errors
    are raised as they are; with ``cropped``, an error of the model's forward (an input-size check,
    a fixed reshape) is raised as :class:`_CropFailed`.
    """
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
                    captured[key] = pick(key, _input_dependent(output)[position])
                except Exception as error:  # ours, not the model's: stop, and raise it below as it is
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


def _per_unit(units: Tensor, function: Callable[..., tuple]) -> list[tuple]:
    """``function(*unit)`` for each probe's unit, computed once per distinct unit."""
    cache: dict[tuple[int, ...], tuple] = {}
    results = []
    for unit in map(tuple, units.tolist()):
        if unit not in cache:
            cache[unit] = function(*unit)
        results.append(cache[unit])
    return results


_PASS_OVERHEAD = 1024
"""What one more forward and backward cost beyond their pixels, counted in pixels of the probes
(one pixel through the network once). Measured on a CPU core with 10 probes, the fixed per-op
cost of a pass is what about 200 pixels cost in resnet18 and resnet50 at 224x224 and 500 in
SmallCNN at 28x28; the cost model ignores depth, which makes a shallow layer's backward in a
deeper pass look dearer than it is, so this leans towards fewer passes. Real networks' crops are
far larger, so only small inputs feel it."""


@dataclass(frozen=True)
class _Layout:
    """Where one pass puts the probes' pixels: layer ``name``'s tile, of ``size`` at ``place`` in the
    pass's input, holds ``input[n, :, corner[0]:corner[0] + size[0], ...]`` for each probe's ``corner``.

    Positions have one coordinate per spatial axis: ``(h, w)`` and ``(y, x)`` for images.

    Attributes:
        size: the spatial size of the pass's input.
        tiles: per layer, ``(size, place, [corner per probe])``.
        together: the tiles are the units' boxes and do not overlap, so one backward of the sum
            of all units gives each layer's gradient on its own tile.
    """

    size: tuple[int, ...]
    tiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, ...]]]]
    together: bool = False

    @property
    def area(self) -> int:
        return math.prod(self.size)


def _crop(
    names: Sequence[str], fields: ReceptiveFieldTable, boxes: dict[str, list[tuple]], image: tuple[int, ...]
) -> _Layout | None:
    """One crop per probe from which every named layer's unit can be computed exactly; None: use the input.

    ``boxes`` holds each shift-equivariant layer's (``row.equivariant``: zero padding, no global
    mixing; strides > 0) analytic boxes, padding included, one per probe. A unit's gradient lives
    inside its box: running the network on a crop that holds that box, starts on a multiple of the
    effective stride and meets the input's border wherever the box runs past it gives the unit
    exactly, and backward then costs the crop's area instead of the input's. Any number of axes.
    """
    dims = len(image)
    hulls = [_hull(probe_boxes) for probe_boxes in zip(*(boxes[name] for name in names))]  # per probe
    corners, size = [], []
    for axis, length in enumerate(image):
        stride = math.lcm(*(fields[name].stride[axis] for name in names))
        lows = [min(max(hull[axis], 0), length - 1) // stride * stride for hull in hulls]
        highs = [min(hull[axis + dims], length) for hull in hulls]
        extent = max(max(high - low for low, high in zip(lows, highs)), 1)
        extent = min(extent + (length - extent) % stride, length)  # so that length - extent is a multiple of stride
        corners.append([min(low, length - extent) for low in lows])
        size.append(extent)
    if tuple(size) == tuple(image):
        return None
    crop = tuple(size)
    return _Layout(crop, {name: (crop, (0,) * dims, list(zip(*corners))) for name in names})


def _hull(boxes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The smallest box ``(lows..., highs...)`` holding all of ``boxes``."""
    dims = len(boxes[0]) // 2
    return (*(min(b[a] for b in boxes) for a in range(dims)), *(max(b[a] for b in boxes) for a in range(dims, 2 * dims)))


def _mosaic(names: Sequence[str], fields: ReceptiveFieldTable, boxes: dict[str, list[tuple]]) -> _Layout:
    """The boxes of units that lie inside the image, side by side on one canvas per probe (images only).

    Such a unit reads only the pixels of its box (its field meets no padding), wherever they sit,
    as long as they move by a multiple of its effective stride. So the tiles of several layers can
    share one input; their boxes do not overlap, so one backward of the sum of their units gives
    every layer's gradient on its own tile. Shelf packing, tallest first, at the width of least area.
    """
    sizes = {name: (boxes[name][0][2] - boxes[name][0][0], boxes[name][0][3] - boxes[name][0][1]) for name in names}
    order = sorted(names, key=lambda name: sizes[name], reverse=True)
    widths = [sizes[name][1] + fields[name].stride[1] - 1 for name in order]  # with room to align
    best: _Layout | None = None
    for limit in sorted({sum(widths[: k + 1]) for k in range(len(order))}):
        places, y0, x, bottom, right = {}, 0, 0, 0, 0
        for name in order:
            (h, w), (top, left, _, _), stride = sizes[name], boxes[name][0], fields[name].stride
            here = x + (left - x) % stride[1]  # the first column at or after x that keeps the unit on its grid
            if x and here + w > limit:  # a new shelf
                y0, x = bottom, 0
                here = left % stride[1]
            places[name] = (y0 + (top - y0) % stride[0], here)
            x = here + w
            bottom, right = max(bottom, places[name][0] + h), max(right, x)
        if best is None or bottom * right < best.area:
            tiles = {name: (sizes[name], places[name], [box[:2] for box in boxes[name]]) for name in names}
            best = _Layout((bottom, right), tiles, together=True)
    assert best is not None
    return best


def _cost(passes: Sequence[tuple[list[str], _Layout | None]], image: tuple[int, ...], paid: bool) -> int:
    """A plan's cost in pixels of the probes: per pass, its overhead, one forward and its backward
    passes; ``paid``: the forward on whole inputs has run already."""
    total = 0
    for members, layout in passes:
        area = math.prod(image) if layout is None else layout.area
        backward = area if layout is not None and layout.together else area * len(members)
        total += backward + (0 if paid and layout is None else _PASS_OVERHEAD + area)
    return total


def _grouped(
    names: Sequence[str],
    fields: ReceptiveFieldTable,
    boxes: dict[str, list[tuple]],
    image: tuple[int, ...],
    whole: Sequence[str],
    paid: bool,
) -> list[tuple[list[str], _Layout | None]]:
    """Crop passes for ``names``, ``whole`` on whole inputs: each layer runs on its own crop unless
    joining a pass with a larger one costs less. Forward and backward each cost about a pass's
    area, so a pass of its own costs a layer ``overhead + 2a``; joining a pass of area ``A``
    (with it) adds its backward, ``A``. Layers go from the largest crop down, each joining the
    smallest pass opened so far or opening the next. ``paid``: the forward on whole inputs has
    run already, so a layer can join that pass for its backward alone."""
    full = math.prod(image)
    own = {name: _crop([name], fields, boxes, image) for name in names}
    passes: list[tuple[list[str], _Layout | None]] = []
    first = [*whole, *(name for name in names if own[name] is None)]
    if first or paid:
        passes.append((first, None))
    for name in sorted((name for name in names if own[name] is not None), key=lambda name: -own[name].area):
        alone = own[name].area
        if passes:
            members, layout = passes[-1]
            merged = layout and _crop([*members, name], fields, boxes, image)
            if (full if merged is None else merged.area) <= 2 * alone + _PASS_OVERHEAD:
                passes[-1] = ([*members, name], merged)
                continue
        passes.append(([name], own[name]))
    whole_pass = [name for members, layout in passes if layout is None for name in members]
    return ([(whole_pass, None)] if whole_pass else []) + [(m, layout) for m, layout in passes if layout is not None]


_LAST_PLAN: list[tuple[weakref.ref, tuple, list]] = []
"""The last plan made, with a weak reference to its table: a callback asks for the same one every epoch."""


def _passes(
    names: Sequence[str],
    fields: ReceptiveFieldTable,
    units: dict[str, Tensor],
    image: tuple[int, ...],
    paid: bool = False,
) -> list[tuple[list[str], _Layout | None]]:
    """The layers grouped into passes (one forward each) on crops, mosaics, or (``None``) whole inputs.

    Shift-equivariant layers run on crops around their units' boxes (:func:`_grouped`). On images,
    units whose boxes lie inside the image can instead share a mosaic of their boxes with one
    backward for all (:func:`_mosaic`): the smallest ``k`` of them do, for the ``k`` of least cost.
    Layers without an analytic field run on whole inputs. ``paid``: a forward on whole inputs has
    run already (for ``unit="max"``).
    """
    key = (tuple(names), image, paid, tuple(tuple(map(tuple, units[name].tolist())) for name in names))
    if _LAST_PLAN and _LAST_PLAN[0][0]() is fields and _LAST_PLAN[0][1] == key:
        return _LAST_PLAN[0][2]
    plan = _plan(names, fields, units, image, paid)
    _LAST_PLAN[:] = [(weakref.ref(fields), key, plan)]
    return plan


def _plan(
    names: Sequence[str], fields: ReceptiveFieldTable, units: dict[str, Tensor], image: tuple[int, ...], paid: bool
) -> list[tuple[list[str], _Layout | None]]:
    boxes = {
        name: _per_unit(units[name], lambda *unit, row=fields[name]: row.box(*unit, clip=False))
        for name in names
        if fields[name].supported and fields[name].equivariant and min(fields[name].stride) > 0
    }
    whole = [name for name in names if name not in boxes]
    best = _grouped(list(boxes), fields, boxes, image, whole, paid)
    inside = []  # units whose fields meet no padding (images only: the mosaic packs rectangles)
    if len(image) == 2:
        height, width = image
        inside = [
            name
            for name in boxes
            if all(b[0] >= 0 and b[1] >= 0 and b[2] <= height and b[3] <= width for b in boxes[name])
        ]
    inside.sort(key=lambda name: fields[name].size[0] * fields[name].size[1])
    for k in range(2, min(len(inside), 16) + 1):
        tiled = inside[:k]
        plan = _grouped([n for n in boxes if n not in tiled], fields, boxes, image, whole, paid)
        plan.append((tiled, _mosaic(tiled, fields, boxes)))
        if _cost(plan, image, paid) < _cost(best, image, paid):
            best = plan
    order = {name: index for index, name in enumerate(names)}
    return [(sorted(members, key=order.__getitem__), layout) for members, layout in best]


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
            return _unit_sum(output, local[name], pick)

        targets = _capture(model, modules, members, leaf, unit_sum, cropped=layout is not None)
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
    """
    if not 3 <= probes.dim() <= 5:
        raise ValueError(
            f"receptive_maps: probes must be (N, C, H, W), or (N, C, L) or (N, C, D, H, W), got shape"
            f" {tuple(probes.shape)}."
        )
    check_threshold_and_mass(threshold, mass)
    model = unwrap_model(model)
    fields = table if table is not None else receptive_fields(model, tuple(probes.shape[1:]), strict=False)
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
        modules = dict(model.named_modules())
        signed = torch.zeros(count, len(names), *probes.shape[1:])  # (N, L, C, *spatial), float32 on the CPU
        into = {name: signed[:, index] for index, name in enumerate(names)}
        reuse = None
        if unit in ("max", "max_logit"):  # units come from the activations on whole inputs; layers not cropped reuse that pass

            def strongest(name: str, output: Tensor) -> Tensor:
                _check_output(output, channel, name, len(spatial))
                units[name], chosen = _strongest(output, channel, unit == "max_logit")
                if chosen is not None:
                    picks[name] = chosen
                return _unit_sum(output, list(map(tuple, units[name].tolist())), picks[name])

            image = pixels.clone().requires_grad_(True)
            reuse = (image, _capture(model, modules, names, image, strongest))
        layer_set = frozenset(names)
        whole: list[str] = []
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
        return ReceptiveMaps(tuple(names), maps, signed, units_tensor, boxes, centers, stats, analytic)


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


def erf_stats(
    maps: Tensor,
    boxes: Tensor,
    centers: Tensor,
    threshold: float = LUO_THRESHOLD,
    mass: float = 0.95,
    shares: Sequence[float] = MASS_SHARES,
) -> ERFStats:
    """ERF statistics of saliency maps (N, L, *spatial), with the boxes (N, L, 2d) and centres (N, L, d).

    Example::
        >>> maps = torch.zeros(1, 2, 9, 9)
        >>> maps[0, 0, 3:6, 3:6] = 1.0  # a 3x3 plateau; the second map is dead
        >>> stats = erf_stats(maps, torch.tensor([[[0, 0, 9, 9]] * 2]), torch.tensor([[[4.0, 4.0]] * 2]))
        >>> stats.count.tolist(), stats.mass_side.tolist(), stats.dead.tolist(), stats.extent[0, 0].tolist()
        ([[9.0, 0.0]], [[3.0, 0.0]], [[False, True]], [3.0, 3.0])
    """
    maps = maps.float()
    count_probes, layers, *spatial = maps.shape
    dims = len(spatial)
    expand = (1,) * dims
    peak = maps.flatten(2).amax(2)
    dead = ~(peak > 0)
    limit = threshold * peak.view(count_probes, layers, *expand)
    count = (maps > limit).flatten(2).sum(2).float()
    count = torch.where(dead, torch.zeros_like(count), count)
    size = _side(count, dims)

    # Per axis, the interval that bounds the pixels above the threshold (empty for a dead map).
    extents = []
    for axis, length in enumerate(spatial):
        others = tuple(2 + other for other in range(dims) if other != axis)
        along = (maps.amax(dim=others) if others else maps) > limit.flatten(2)  # (N, L, length): a pixel above it
        index = torch.arange(length)
        first = torch.where(along, index, length).amin(2)
        last = torch.where(along, index, -1).amax(2)
        extents.append((last - first + 1).clamp(min=0).float())
    extent = torch.stack(extents, dim=2)

    # A cube of side s centred on the unit's RF centre holds the pixels whose Chebyshev distance d
    # from it is at most (s - 1) / 2. Centres sit on whole or half pixels, so s = 2d + 1 is a whole
    # number: bucket the saliency by it and find the first side whose cumulative mass is enough.
    distance = None
    for axis, length in enumerate(spatial):
        shape = [1, 1, *expand]
        shape[2 + axis] = length
        coordinates = torch.arange(length, dtype=torch.float32).view(shape)
        offset = (coordinates - centers[..., axis].float().view(count_probes, layers, *expand)).abs()
        distance = offset if distance is None else torch.maximum(distance, offset)
    side = (2 * distance).round().long().flatten(2)  # side - 1
    buckets = maps.new_zeros(*side.shape[:2], int(side.max()) + 1).scatter_add_(2, side, maps.flatten(2))
    cumulative = buckets.cumsum(2)
    total = cumulative[..., -1:]
    first = (cumulative >= mass * total - 1e-6 * total).float().argmax(2)
    mass_side = (first + 1).float()
    mass_side = torch.where(dead, torch.zeros_like(mass_side), mass_side)

    volume = (boxes[..., dims:] - boxes[..., :dims]).clamp(min=0).prod(-1).float()
    rf_side = _side(volume, dims)
    safe = rf_side.clamp(min=1)
    zero = torch.zeros_like(size)
    return ERFStats(
        count=count,
        size=size,
        mass_side=mass_side,
        rf_side=rf_side,
        size_fraction=torch.where(rf_side > 0, size / safe, zero),
        mass_fraction=torch.where(rf_side > 0, mass_side / safe, zero),
        dead=dead,
        threshold=threshold,
        mass=mass,
        extent=extent,
        mean_areas=mass_areas(maps.mean(0), shares),
        shares=tuple(shares),
    )


def _side(volume: Tensor, dims: int) -> Tensor:
    """The side of a ``dims``-cube of each ``volume`` (in float64 first, so that 27 voxels give 3.0 exactly)."""
    if dims == 2:
        return volume.sqrt()
    return volume.double().pow(1.0 / dims).float()


def mass_areas(maps: Tensor, shares: Sequence[float] = MASS_SHARES) -> Tensor:
    """For each map (L, *spatial), the fraction of its pixels, largest first, that holds each share of its mass.

    A compact map (a peak) needs few pixels, a flat one many: for a uniform map, a share ``p`` of the
    mass needs a share ``p`` of the pixels. An all-zero map gives 0.

    Returns:
        float32 (L, len(shares)), each in (0, 1].

    Example::
        >>> maps = torch.zeros(2, 10)
        >>> maps[0, 3] = 1.0  # all the mass in one pixel out of ten
        >>> maps[1] = 1.0  # uniform
        >>> mass_areas(maps, (0.2, 0.5, 0.99)).tolist()
        [[0.10000000149011612, 0.10000000149011612, 0.10000000149011612], [0.20000000298023224, 0.5, 1.0]]
    """
    flat = maps.float().flatten(1)
    fractions = torch.zeros(len(flat), len(shares))
    for row, values in enumerate(flat):  # only the nonzero pixels are sorted: shallow layers' maps are small
        values = values[values > 0].sort(descending=True).values
        if len(values):
            cumulative = values.cumsum(0)
            total = cumulative[-1]
            wanted = torch.tensor(shares, dtype=cumulative.dtype) * total - 1e-6 * total
            fractions[row] = (torch.searchsorted(cumulative, wanted) + 1).clamp(max=len(values)).float() / flat.shape[1]
    return fractions
