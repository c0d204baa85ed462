"""What to map: the layers (one per resolution stage by default), the unit and the channel, checked once.

The one owner of these rules: :func:`~rf_callback.receptive_maps`, :class:`~rf_callback.ProbeMonitor`,
the Lightning callback and the command line all call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from rf_callback.table import LayerKey, LayerRF, ReceptiveFieldTable

__all__ = [
    "Unit",
    "all_layers",
    "border_layers",
    "check_channel",
    "check_unit",
    "check_unit_fits",
    "default_layers",
    "mappable",
    "resolve_layers",
]


Unit = Literal["center", "max", "max_logit"] | tuple[int, ...]
"""Which output unit of a layer: the middle one, each probe's most active one (channel sum), each
probe's largest single value (a class logit of a dense prediction), or a position, one index per axis."""


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
        >>> from rf_callback import receptive_fields
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


def check_channel(channel: object) -> int | None:
    """``channel`` if it is None (sum over channels) or an int >= 0, else a ``ValueError``.

    Example::
        >>> check_channel(None), check_channel(3)
        (None, 3)
    """
    if channel is None or (isinstance(channel, int) and not isinstance(channel, bool) and channel >= 0):
        return channel
    raise ValueError(f"channel={channel!r}: None (sum over channels) or an int >= 0.")


def mappable(row: LayerRF) -> bool:
    """Whether a row can have a receptive map: floating-point values whose positions form one grid.

    That is ``(N, C, *spatial)``, channels-last, or tokens (a ViT's, class tokens first); not
    windows. Rows without an analytic field qualify when laid out as the input: gradients need no
    geometry. Integer and boolean outputs (``MaxPool2d(return_indices=True)``'s indices) carry no
    gradient: they stay in the table, never mapped.
    """
    return row.placement is not None and (row.dtype is None or row.dtype.is_floating_point)


_SHAPES = {1: "a sequence (N, C, l)", 2: "an image (N, C, h, w)", 3: "a volume (N, C, d, h, w)"}


def default_layers(table: ReceptiveFieldTable) -> list[str]:
    """One layer per resolution stage: for each output resolution, the last layer of the shallowest depth.

    They come in the order their outputs are computed (a container after the blocks inside it).

    Depth counts the dots of the module name, so a stage's container (``layer1`` of a ResNet,
    ``features.1`` of a ConvNeXt) wins over the layers inside it and over the first layer of the
    next stage that still runs at its resolution. Containers holding more than one change of
    resolution (a whole ``features`` block) and rows with a single output position (heads) are
    left out, and so are rows without an analytic field (name them, or pass ``"all"``); so is a
    flattened copy of the layer before it, and every module that computes nothing from its input
    (``table.relays``: ``Identity``, dropout, padding, ``Flatten``), whose maps are those of the
    layer that feeds it: a stage is represented by a module that does its work. torchvision's ResNets give ``relu, layer1, layer2,
    layer3, layer4``; its Swins ``features.1, .3, .5, norm``. Where that gives fewer than three
    layers (an isotropic network, whose blocks all run at one resolution: ViT, MLP-Mixer), four evenly
    spaced blocks of its longest run of sibling modules of one type are added: a ViT-B/16 gets
    ``encoder.layers.encoder_layer_0, _4, _7, _11`` and ``encoder``. Where the table predicts
    unproductive layers at its input size, the :func:`border_layers` are added, so that the maps
    show both sides of the border.

    Example::
        >>> from torch import nn
        >>> from rf_callback import receptive_fields
        >>> conv = nn.Conv2d(4, 4, 3, padding=1)
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), conv, nn.MaxPool2d(2))
        >>> default_layers(receptive_fields(net, (1, 32, 32)))  # the last at 32x32, at 16x16, at 8x8
        ['1', '3', '4']
        >>> padded = nn.Sequential(conv, nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, stride=2), nn.Dropout())
        >>> default_layers(receptive_fields(padded, (4, 16, 16)))  # not the 17x17 padding, nor the dropout
        ['0', '2']
    """
    rows = {key: row for key, row in table.items() if row.supported and mappable(row) and key not in table.relays}
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
        if best is None or depth < best[0] or (depth == best[0] and not _flattened_copy(row, rows[best[1]])):
            chosen[row.output_shape] = (depth, key)
    keys = {key for _, key in chosen.values()}
    if len(keys) < 3:  # an isotropic network (ViT, MLP-Mixer, ConvMixer): follow its repeated blocks too
        keys.update(_spaced_blocks(rows))
    keys.update(border_layers(table))
    return [key for key in table.output_order if key in keys]


def border_layers(table: ReceptiveFieldTable) -> list[str]:
    """The two sides of the border: the first unproductive layer that computes a field, and the one it reads.

    Richter et al. predict that a layer whose inputs already see the whole input adds nothing
    (:attr:`~rf_callback.table.LayerRF.verdict`); mapping it beside the layer before it shows, over
    training, whether its effective field still grows past that layer's. Empty where no layer is
    unproductive (or the pair has no maps). On a ResNet-18 at 32 px: ``layer3.1.conv1, layer3.1.conv2``.

    Example::
        >>> from torch import nn
        >>> from rf_callback import receptive_fields
        >>> net = nn.Sequential(*(nn.Conv2d(1, 1, 5, padding=2) for _ in range(4)))
        >>> border_layers(receptive_fields(net, (1, 8, 8)))
        ['1', '2']
    """
    first = {}  # id(field) -> the first row that had it
    for key in table.computing():
        row = table[key]
        first[id(row.field)] = key
        if row.verdict == "unproductive" and mappable(row):
            read = [first[id(field)] for field in row.inputs or () if id(field) in first]
            read = [name for name in read if mappable(table[name])]
            if read:
                return [read[0], key]
    return []


def _spaced_blocks(rows: dict[str, LayerRF], count: int = 4) -> list[str]:
    """``count`` evenly spaced rows of the longest run of sibling modules of one type (a ViT's encoder blocks).

    Example::
        >>> from torch import nn
        >>> from rf_callback import receptive_fields
        >>> blocks = [nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()) for _ in range(8)]
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(*blocks))
        >>> default_layers(receptive_fields(net, (1, 16, 16)))  # one resolution: the blocks 0, 2, 5, 7 too
        ['1.0', '1.2', '1.5', '1.7', '1']
    """
    runs: dict[tuple[str, str], list[str]] = {}  # (parent module, type) -> sibling keys in call order
    for key, row in rows.items():
        parsed = LayerKey.parse(key)
        if parsed.call is None and parsed.output is None and "." in parsed.module and math.prod(row.output_shape) > 1:
            runs.setdefault((parsed.module.rsplit(".", 1)[0], row.module_type), []).append(key)
    longest = max(runs.values(), key=len, default=[])
    if len(longest) < count:
        return []
    return [longest[round(i * (len(longest) - 1) / (count - 1))] for i in range(count)]


def _flattened_copy(row: LayerRF, image: LayerRF) -> bool:
    """Whether ``row`` sees what the image-shaped ``image`` row sees, only laid out otherwise (a flatten)."""
    return image.placement.is_image and not row.placement.is_image and row.field == image.field  # type: ignore[union-attr]


def all_layers(table: ReceptiveFieldTable) -> list[str]:
    """Every row that can have a receptive map (its positions form one grid), in the order outputs are computed."""
    return [key for key in table.output_order if mappable(table[key])]


def resolve_layers(table: ReceptiveFieldTable, layers: str | Sequence[str] | None) -> list[str]:
    """The layer keys to map: ``None`` for :func:`default_layers`, ``"all"`` for :func:`all_layers`, or names.

    A named row without an analytic receptive field is accepted when its output is laid out as the
    input: its maps come from whole inputs (``ReceptiveMaps.analytic``).

    Raises:
        ValueError: for an unknown name (close matches and the valid names listed), a row whose
            output is not laid out as the input (``(N, C, h, w)`` for images), or one of integer or
            boolean values.
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
        if row.dtype is not None and not row.dtype.is_floating_point:
            raise ValueError(
                f"layers={names!r}: '{name}' ({row.module_type}) gives {str(row.dtype).removeprefix('torch.')}"
                " values (indices or a mask), which carry no gradient, so it has no receptive map. Layers that"
                f" have maps: {valid}."
            )
        if not mappable(row):
            raise ValueError(
                f"layers={names!r}: '{name}' ({row.module_type}) gives an output of shape"
                f" {tuple(row.tensor_shape)} for one input whose positions are not one grid (windows, a flattened"
                f" output or one whose batch is not first), so it has no receptive map. Layers that have maps: {valid}."
            )
    return list(dict.fromkeys(names))
