"""receptive_maps on 1-D signals, 3-D volumes and dense outputs: parity with captum, support equals the box.

The 1-D nets are WaveNet/TCN-like stacks (causal padding ``F.pad(x, (d * (k - 1), 0))``, dilations
1, 2, 4, ...); the 3-D ones are anisotropic (a (1, 3, 3) kernel at stride (1, 2, 2), then 3x3x3).
Their linearized twins (positive constant weights, identity activations, average pooling, float64)
have a nonzero input gradient exactly on the pixels with a path to the unit, so the support's
bounding box must equal the analytic box, axis by axis.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronGradient
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rf_callback.erf import erf_stats, mass_areas
from rf_callback.errors import UnsupportedLayerError
from rf_callback.saliency import receptive_maps
from rf_callback.selection import all_layers, default_layers
from rf_callback.table import OUTPUT_ROW, LayerRF, ReceptiveFieldTable, receptive_fields
from tests.nets import model_examples
from tests.test_saliency import planned

CHANNELS = 2


def positive(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.constant_(parameter, 0.5 if parameter.dim() > 1 else 0.0)
    return module


def captum_gradient(model, layer, probe, unit, channel=None):
    """captum's ``NeuronGradient`` of the unit at ``unit`` (any number of axes), channel-summed or one channel."""

    def select(output):
        picked = output[(slice(None), slice(None), *unit)]
        return picked[:, channel] if channel is not None else picked.sum(1)

    with pytest.warns(UserWarning, match="required_grads has been set automatically"):
        return NeuronGradient(model, layer).attribute(probe, neuron_selector=select)[0]


def assert_matches_captum(model, probes, result, channels=None):
    modules = dict(model.named_modules())
    model.eval()
    for n in range(len(probes)):
        for index, name in enumerate(result.layers):
            unit = tuple(result.units[n, index].tolist())
            channel = None if channels is None else channels[n][index]
            expected = captum_gradient(model, modules[name], probes[n : n + 1], unit, channel)
            torch.testing.assert_close(result.gradients[n, index], expected.float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(result.maps[n, index], expected.abs().sum(0).float(), rtol=1e-5, atol=1e-6)


def assert_support_is_the_box(result):
    """For every probe and layer: the bounding box of ``maps != 0`` is ``boxes``, axis by axis."""
    dims = result.units.shape[2]
    for n in range(result.maps.shape[0]):
        for index in range(result.maps.shape[1]):
            box = result.boxes[n, index].tolist()
            support = result.maps[n, index].nonzero()
            if len(support) == 0:
                assert any(box[a] == box[a + dims] for a in range(dims))
            else:
                found = [*support.amin(0).tolist(), *(support.amax(0) + 1).tolist()]
                assert found == box, (result.layers[index], n)


# --------------------------------------------------------------------------------------------
# 1-D: WaveNet/TCN stacks
# --------------------------------------------------------------------------------------------


class CausalBlock(nn.Module):
    """WaveNet's gated, dilated causal convolution with a residual connection; linear in the twin."""

    def __init__(self, dilation: int, kernel: int, residual: bool, twin: bool) -> None:
        super().__init__()
        self.pad, self.residual, self.twin = dilation * (kernel - 1), residual, twin
        self.filter = nn.Conv1d(CHANNELS, CHANNELS, kernel, dilation=dilation)
        self.gate = nn.Conv1d(CHANNELS, CHANNELS, kernel, dilation=dilation)
        self.mix = nn.Conv1d(CHANNELS, CHANNELS, 1)

    def forward(self, x):
        h = F.pad(x, (self.pad, 0))
        if self.twin:
            z = self.filter(h) + self.gate(h)
        else:
            z = torch.tanh(self.filter(h)) * torch.sigmoid(self.gate(h))
        z = self.mix(z)
        return x + z if self.residual else z


class TCN(nn.Module):
    def __init__(self, blocks: int, kernel: int, residual: bool, twin: bool) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, CHANNELS, 1)
        self.blocks = nn.Sequential(*(CausalBlock(2**k, kernel, residual, twin) for k in range(blocks)))
        if twin:
            positive(self).double()

    def forward(self, x):
        return self.blocks(self.stem(x))


@model_examples
@given(
    blocks=st.integers(1, 6),
    kernel=st.integers(2, 3),
    residual=st.booleans(),
    length=st.integers(4, 96),
    unit=st.sampled_from(["center", "max", "max_logit", "first", "last"]),
    crops=st.booleans(),
)
def test_tcn_twin_support_is_the_causal_box(blocks, kernel, residual, length, unit, crops):
    twin = TCN(blocks, kernel, residual, twin=True).eval()
    probes = torch.rand(2, 1, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    unit = {"first": (0,), "last": (length - 1,)}.get(unit, unit)
    layers = [f"blocks.{k}" for k in range(blocks)] + [f"blocks.{k}.filter" for k in range(blocks)]
    with planned(crops):
        result = receptive_maps(twin, probes, layers, unit=unit)
    assert_support_is_the_box(result)
    table = receptive_fields(twin, (1, length))
    for index, name in enumerate(layers):  # causal: the field ends at the unit and reaches back rf - 1 samples
        i = int(result.units[0, index])
        assert result.boxes[0, index].tolist() == [max(0, i - table[name].size[0] + 1), i + 1]


def test_tcn_receptive_field_in_samples_and_its_maps_match_captum():
    torch.manual_seed(0)
    net = TCN(blocks=10, kernel=2, residual=True, twin=False).eval()  # dilations 1 ... 512
    table = receptive_fields(net, (1, 2048))
    assert table["blocks.9"].size == (1024,) and table["blocks.9"].stride == (1,)
    probes = torch.randn(2, 1, 2048, generator=torch.Generator().manual_seed(1))
    result = receptive_maps(net, probes, ["blocks.3", "blocks.9"], unit="max", table=table)
    assert result.maps.shape == (2, 2, 2048) and result.units.shape == (2, 2, 1) and result.boxes.shape == (2, 2, 2)
    assert_matches_captum(net, probes, result)


class Signal(nn.Module):
    """A 1-D classifier's trunk: BatchNorm, max and average pooling, a dilated convolution, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 5, padding=2)
        self.bn = nn.BatchNorm1d(4)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(4, 4, 3, dilation=2, padding=2)
        self.avg = nn.AvgPool1d(3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv1(x))))
        return self.head(self.avg(F.relu(self.conv2(x))).mean(-1))


@pytest.mark.parametrize(
    ("unit", "channel"), [("center", None), ("max", None), ((3,), 2), ("max", 1), ("max_logit", None)]
)
def test_1d_maps_equal_captum_neuron_gradient(unit, channel):
    torch.manual_seed(0)
    net = Signal()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    probes = torch.rand(3, 2, 40, generator=torch.Generator().manual_seed(1))
    layers = ["conv1", "pool", "conv2", "avg"]
    result = receptive_maps(net, probes, layers, unit=unit, channel=channel)
    channels = None
    if unit == "max_logit":
        channels = [
            [picked_channel(net, name, probes[n], result.units[n, k]) for k, name in enumerate(layers)]
            for n in range(3)
        ]
    assert_matches_captum(net, probes, result, channels if channels is not None else [[channel] * 4] * 3)


def picked_channel(model, name, probe, unit):
    """The channel of the largest value at ``unit`` of layer ``name``'s output (what ``"max_logit"`` follows)."""
    captured = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        model.eval()(probe[None])
    finally:
        handle.remove()
    return int(captured["out"][(0, slice(None), *unit.tolist())].argmax())


# --------------------------------------------------------------------------------------------
# 3-D: anisotropic volumes
# --------------------------------------------------------------------------------------------


class Volume(nn.Module):
    """In-plane first ((1, 3, 3) at stride (1, 2, 2)), then 3x3x3, then pooling; linear in the twin."""

    def __init__(self, twin: bool) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, CHANNELS, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.act = nn.Identity() if twin else nn.ReLU()
        self.bn = nn.Identity() if twin else nn.BatchNorm3d(CHANNELS)
        self.body = nn.Conv3d(CHANNELS, CHANNELS, 3, padding=1)
        self.pool = nn.AvgPool3d((1, 2, 2)) if twin else nn.MaxPool3d((1, 2, 2))
        self.deep = nn.Conv3d(CHANNELS, CHANNELS, (3, 1, 1), padding=(1, 0, 0))
        if twin:
            positive(self).double()

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        return self.deep(self.pool(self.act(self.body(x))))


@model_examples
@given(
    depth=st.integers(3, 8),
    height=st.integers(8, 16),
    width=st.integers(8, 16),
    unit=st.sampled_from(["center", "max", "corner"]),
    crops=st.booleans(),
)
def test_anisotropic_3d_twin_support_is_the_box(depth, height, width, unit, crops):
    twin = Volume(twin=True).eval()
    probes = torch.rand(2, 1, depth, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    unit = (0, 0, 0) if unit == "corner" else unit
    with planned(crops):
        result = receptive_maps(twin, probes, ["stem", "body", "pool", "deep"], unit=unit)
    assert result.maps.shape == (2, 4, depth, height, width) and result.boxes.shape == (2, 4, 6)
    assert_support_is_the_box(result)
    table = receptive_fields(twin, (1, depth, height, width))
    assert table["stem"].size == (1, 3, 3) and table["body"].size == (3, 7, 7) and table["deep"].stride == (1, 4, 4)


@pytest.mark.parametrize(("unit", "channel"), [("center", None), ("max", None), ((1, 2, 3), 1), ("max_logit", None)])
def test_3d_maps_equal_captum_neuron_gradient(unit, channel):
    torch.manual_seed(0)
    net = Volume(twin=False)
    probes = torch.rand(2, 1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    layers = ["stem", "body", "pool", "deep"]
    result = receptive_maps(net, probes, layers, unit=unit, channel=channel)
    if unit == "max_logit":
        channels = [
            [picked_channel(net, name, probes[n], result.units[n, k]) for k, name in enumerate(layers)]
            for n in range(2)
        ]
    else:
        channels = [[channel] * 4] * 2
    assert_matches_captum(net, probes, result, channels)


def test_erf_statistics_in_1d_and_3d_by_hand():
    signal = torch.zeros(1, 1, 11)
    signal[0, 0, 4:7] = 1.0
    signal[0, 0, 9] = 0.01  # below 4.55% of the peak, inside the mass
    stats = erf_stats(signal, torch.tensor([[[2, 11]]]), torch.tensor([[[5.0]]]))
    assert (stats.count.item(), stats.size.item(), stats.extent[0, 0].tolist()) == (3.0, 3.0, [3.0])
    assert stats.mass_side.item() == 3.0 and stats.rf_side.item() == 9.0  # 3 / 3.01 of the mass within 1 sample
    assert erf_stats(signal, torch.tensor([[[2, 11]]]), torch.tensor([[[5.0]]]), mass=1.0).mass_side.item() == 9.0

    volume = torch.zeros(1, 1, 5, 7, 9)
    volume[0, 0, 1:4, 2:5, 3:6] = 1.0  # a 3x3x3 cube around (2, 3, 4)
    volume[0, 0, 2, 3, 1] = 0.5  # stretches the extent along the last axis
    stats = erf_stats(volume, torch.tensor([[[0, 0, 0, 5, 7, 9]]]), torch.tensor([[[2.0, 3.0, 4.0]]]))
    assert stats.count.item() == 28.0 and stats.size.item() == pytest.approx(28 ** (1 / 3))
    assert stats.extent[0, 0].tolist() == [3.0, 3.0, 5.0]
    assert stats.mass_side.item() == 3.0  # 27 / 27.5 of the mass in the 3-cube around the centre
    assert stats.rf_side.item() == pytest.approx(315 ** (1 / 3))
    cube = torch.zeros(1, 1, 5, 5, 5)
    cube[0, 0, 1:4, 1:4, 1:4] = 1.0
    assert erf_stats(cube, torch.tensor([[[0, 0, 0, 5, 5, 5]]]), torch.full((1, 1, 3), 2.0)).size.item() == 3.0


def test_mean_maps_and_mass_areas():
    maps = torch.zeros(2, 1, 10)
    maps[0, 0, 4] = 4.0
    maps[1, 0, 5] = 2.0
    maps[1, 0, 4] = 2.0
    areas = mass_areas(maps.mean(0))  # mean: 3 at 4, 1 at 5; 20% and 50% need one sample, 99% two
    assert areas.tolist() == [[0.1, 0.1, 0.2]] or torch.allclose(areas, torch.tensor([[0.1, 0.1, 0.2]]))
    stats = erf_stats(maps, torch.tensor([[[0, 10]], [[0, 10]]]), torch.tensor([[[4.0]], [[4.0]]]))
    torch.testing.assert_close(stats.mean_areas, areas)
    assert stats.mean()["mean_area_99"].tolist() == pytest.approx([0.2])
    assert mass_areas(torch.zeros(1, 3, 3)).tolist() == [[0.0, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------
# Dense outputs: a U-Net's prediction, rows without an analytic field, the model's own output
# --------------------------------------------------------------------------------------------


class TinyUNet(nn.Module):
    """Down with stride 2, up with ``nn.Upsample`` (or a top-level ``F.interpolate``), a skip concatenation."""

    def __init__(self, classes: int = 3, final_resize: bool = False) -> None:
        super().__init__()
        self.final_resize = final_resize
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.fuse = nn.Conv2d(12, 4, 3, padding=1)
        self.head = nn.Conv2d(4, classes, 1)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        deep = F.relu(self.down(skip))
        if self.final_resize:  # the prediction at half resolution, resized in the top-level forward (FCN-style)
            return F.interpolate(
                self.head(F.relu(self.fuse(torch.cat([skip[..., ::2, ::2], deep], 1)))), scale_factor=2
            )
        return self.head(F.relu(self.fuse(torch.cat([skip, self.up(deep)], 1))))


def without_field(table: ReceptiveFieldTable, names: list[str]) -> ReceptiveFieldTable:
    """``table`` with the rows ``names`` flagged as the tracer flags what it cannot follow."""
    rows = [
        dataclasses.replace(
            row,
            field=None,
            equivariant=False,
            unsupported=UnsupportedLayerError(row.name, row.module_type, "aten.test", "a test"),
        )
        if row.name in names
        else row
        for row in table.values()
    ]
    return ReceptiveFieldTable(rows, table.input_shape, table.reused)


def test_rows_without_an_analytic_field_get_whole_input_maps_flagged():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 2, 3)
    ).eval()
    probes = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    table = without_field(receptive_fields(net, (1, 16, 16)), ["2", "3"])
    assert "2" not in default_layers(table) and {"2", "3"} <= set(all_layers(table))
    result = receptive_maps(net, probes, ["0", "2", "3"], unit="max", table=table)
    expected = receptive_maps(net, probes, ["0", "2", "3"], unit="max")  # the same gradients, with analytic boxes
    torch.testing.assert_close(result.gradients, expected.gradients)
    assert result.analytic == (True, False, False) and expected.analytic == (True, True, True)
    assert result.boxes[:, 1:].tolist() == [[[0, 0, 16, 16]] * 2] * 2
    torch.testing.assert_close(result.erf.rf_side[:, 1:], torch.full((2, 2), 16.0))
    torch.testing.assert_close(result.erf.size_fraction[:, 1:], result.erf.size[:, 1:] / 16)
    unit = result.units[0, 2].tolist()  # 6x6 output on 16x16: the unit's position scaled to the input
    assert table["3"].output_shape == (6, 6)
    assert result.centers[0, 2].tolist() == pytest.approx([(i + 0.5) * 16 / 6 - 0.5 for i in unit])
    assert "* no analytic receptive field" in result.summary()


@pytest.mark.parametrize("unit", ["center", (5, 7), "max_logit"])
def test_unet_prediction_pixels_are_units(unit):
    torch.manual_seed(0)
    net = TinyUNet().eval()
    probes = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    table = receptive_fields(net, (1, 16, 16), strict=False)
    assert "head" in all_layers(table)
    result = receptive_maps(net, probes, ["down", "head"], unit=unit, table=table)
    assert result.analytic == (True, table["head"].supported)
    if not table["head"].supported:  # until the tracer follows upsampling: the whole input
        assert result.boxes[:, 1].tolist() == [[0, 0, 16, 16]] * 2
    channels = [[None, None]] * 2
    if unit == "max_logit":
        channels = [
            [
                picked_channel(net, "down", probes[n], result.units[n, 0]),
                picked_channel(net, "head", probes[n], result.units[n, 1]),
            ]
            for n in range(2)
        ]
        logits = net(probes).detach()
        for n in range(2):
            assert logits[n].amax(0)[tuple(result.units[n, 1].tolist())] == logits[n].max()
    assert_matches_captum(net, probes, result, channels)


def with_output_row(table: ReceptiveFieldTable, model: nn.Module, probes: torch.Tensor) -> ReceptiveFieldTable:
    """``table`` with the model's own output row, as the tracer adds it for an output computed in ``forward``."""
    if OUTPUT_ROW in table:
        return table
    shape = tuple(model(probes[:1]).shape)
    error = UnsupportedLayerError("", type(model).__name__, "aten.upsample_nearest2d.vec", "an upsampling")
    row = LayerRF(
        OUTPUT_ROW, type(model).__name__, table.input_shape[1:], shape[2:], unsupported=error, tensor_shape=shape
    )
    return ReceptiveFieldTable([*table.values(), row], table.input_shape, table.reused)


def test_the_models_own_output_row_is_mapped():
    torch.manual_seed(0)
    net = TinyUNet(final_resize=True).eval()
    probes = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    table = with_output_row(receptive_fields(net, (1, 16, 16), strict=False), net, probes)
    result = receptive_maps(net, probes, [OUTPUT_ROW, "head"], unit=(3, 3), table=table)
    image = probes.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(image)[:, :, 3, 3].sum(), image)
    torch.testing.assert_close(result.gradients[:, 0], expected)
    assert result.units[:, 0].tolist() == [[3, 3]] * 2
    assert all(not m._forward_hooks for m in net.modules())
