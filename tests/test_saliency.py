"""receptive_maps: parity with captum, support equals the analytic box, and no side effects."""

import contextlib
import gc
import random
import re
import warnings
import weakref
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronGradient
from hypothesis import given, reject
from hypothesis import strategies as st
from torch import nn
from torchvision.models import VisionTransformer

from rf_callback.crops import _passes
from rf_callback.demos.cnns import SmallCNN
from rf_callback.erf import erf_stats
from rf_callback.saliency import receptive_maps
from rf_callback.table import receptive_fields
from tests.nets import build, model_examples, specs, well_defined


class Block(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.skip = nn.Conv2d(channels, channels, 1, stride)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.skip(x))


class Probe(nn.Module):
    """Convolutions, BatchNorm, dropout, max pooling, a residual block and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.pool1 = nn.MaxPool2d(2)
        self.block = Block(8, 2)
        self.conv2 = nn.Conv2d(8, 8, 3, dilation=2, padding=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool1(self.drop(F.relu(self.bn1(self.conv1(x)))))
        x = self.conv2(self.block(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = Probe()
    with torch.no_grad():  # non-trivial running statistics
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture
def probes():
    return torch.rand(4, 1, 20, 20, generator=torch.Generator().manual_seed(1))


def captum_gradient(model, layer, probe, unit, channel=None):
    def select(output):
        i, j = unit
        return output[:, channel, i, j] if channel is not None else output[:, :, i, j].sum(1)

    with pytest.warns(UserWarning, match="required_grads has been set automatically"):
        return NeuronGradient(model, layer).attribute(probe, neuron_selector=select)[0]


@pytest.mark.parametrize(("unit", "channel"), [("center", None), ("max", None), ((1, 2), 3), ("max", 5)])
def test_maps_equal_captum_neuron_gradient(model, probes, unit, channel):
    layers = ["conv1", "pool1", "block.conv", "block.skip", "conv2"]
    result = receptive_maps(model, probes, layers, unit=unit, channel=channel)
    assert result.layers == tuple(layers)
    modules = dict(model.named_modules())
    model.eval()  # captum runs the model as it is: match receptive_maps' eval mode
    for n in range(len(probes)):
        for index, name in enumerate(result.layers):
            unit_ij = tuple(result.units[n, index].tolist())
            expected = captum_gradient(model, modules[name], probes[n : n + 1], unit_ij, channel)
            torch.testing.assert_close(result.gradients[n, index], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(result.maps[n, index], expected.abs().sum(0), rtol=1e-5, atol=1e-6)


def test_max_picks_each_probes_strongest_unit(model, probes):
    result = receptive_maps(model, probes, ["conv2"], unit="max")
    captured = {}
    model.conv2.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    model.eval()
    model(probes)
    summed = captured["out"].sum(1).flatten(1)
    expected = torch.stack([summed.argmax(1) // 5, summed.argmax(1) % 5], dim=1)
    assert torch.equal(result.units[:, 0], expected)


def planned(crops: bool):
    """With ``crops``, no per-pass overhead: every crop and mosaic that is valid is planned, even on tiny images."""
    return mock.patch("rf_callback.crops._PASS_OVERHEAD", 0) if crops else contextlib.nullcontext()


@model_examples
@given(
    spec=specs,
    height=st.integers(6, 16),
    width=st.integers(6, 16),
    unit=st.sampled_from(["center", "max"]),
    crops=st.booleans(),
)
def test_random_networks_match_captum(spec, height, width, unit, crops):
    """Covers the crop path (shift-equivariant layers) and the full-image path alike.

    In float64: max pooling routes the gradient to the larger of two near-equal inputs, and
    float32 rounding that differs between batch sizes could flip a near tie.
    """
    net = build(spec).double()
    probes = torch.rand(2, 1, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if not well_defined(net, probes):
        reject()
    with planned(crops):
        result = receptive_maps(net, probes, "all", unit=unit)
    modules = dict(net.named_modules())
    for n in range(2):
        for index, name in enumerate(result.layers):
            unit_ij = tuple(result.units[n, index].tolist())
            expected = captum_gradient(net, modules[name.partition("[")[0]], probes[n : n + 1], unit_ij)
            torch.testing.assert_close(result.gradients[n, index], expected.float(), rtol=1e-5, atol=1e-6)


@model_examples
@given(spec=specs, height=st.integers(5, 16), width=st.integers(5, 16), crops=st.booleans())
def test_support_of_each_map_is_the_analytic_box(spec, height, width, crops):
    twin = build(spec, twin=True)
    probes = torch.rand(2, 1, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if not well_defined(twin, probes):
        reject()
    with planned(crops):
        result = receptive_maps(twin, probes, [f"blocks.{k}" for k in range(len(spec))], unit="max")
    for n in range(2):
        for index in range(len(spec)):
            rows, cols = result.maps[n, index].nonzero(as_tuple=True)
            top, left, bottom, right = result.boxes[n, index].tolist()
            if rows.numel() == 0:
                assert top == bottom or left == right
            else:
                assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (top, left, bottom, right)


def state_of(model):
    return {
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
    }


def assert_same_state(before, after):
    assert [g is None for g in before["grads"]] == [g is None for g in after["grads"]]
    assert all(torch.equal(a, b) for a, b in zip(before["grads"], after["grads"]) if a is not None)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modes"] == after["modes"]
    assert before["buffers"].keys() == after["buffers"].keys()
    assert all(torch.equal(before["buffers"][k], after["buffers"][k]) for k in before["buffers"])
    assert before["hooks"] == after["hooks"]


def test_no_side_effects(model, probes):
    model.train()
    model.block.eval()  # mixed modes are restored module by module
    model.conv1.weight.grad = torch.randn_like(model.conv1.weight)  # an existing gradient is kept bit for bit
    model.head.weight.requires_grad_(False)
    probes = probes.to(memory_format=torch.channels_last)
    original = probes.clone()
    before = state_of(model)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())

    result = receptive_maps(model, probes, "all", unit="max")

    assert_same_state(before, state_of(model))
    assert random.getstate() == rng[0] and np.array_equal(np.random.get_state()[1], rng[1])
    assert torch.equal(torch.get_rng_state(), rng[2])
    assert torch.equal(probes, original) and not probes.requires_grad
    assert probes.is_contiguous(memory_format=torch.channels_last)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not result.maps.requires_grad and result.maps.isfinite().all()


def test_noise_drawn_inside_forward_does_not_move_the_global_generator(probes):
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x + 0.01 * torch.randn_like(x))

    model = Noisy()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    receptive_maps(model, probes)
    assert torch.equal(torch.get_rng_state(), state)


def test_hooks_are_removed_when_forward_raises(probes):
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.late = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            x = self.conv(x)
            if x.device.type != "meta":  # the receptive-field trace passes; the real forward fails midway
                raise RuntimeError("boom")
            return self.late(x)

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        receptive_maps(model, probes, ["late"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training


@pytest.mark.parametrize(
    "context",
    [torch.no_grad, torch.inference_mode, lambda: torch.autocast("cpu", dtype=torch.bfloat16)],
    ids=["no_grad", "inference_mode", "autocast"],
)
def test_works_where_lightning_validates(model, probes, context):
    expected = receptive_maps(model, probes).maps
    with context():
        result = receptive_maps(model, probes)
        assert torch.is_autocast_enabled("cpu") == (context not in (torch.no_grad, torch.inference_mode))
    torch.testing.assert_close(result.maps, expected)
    assert not result.maps.is_inference()


def test_wrapped_models(model, probes, tmp_path):
    expected = receptive_maps(model, probes).maps
    torch.testing.assert_close(receptive_maps(torch.compile(model), probes).maps, expected)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        torch.testing.assert_close(receptive_maps(wrapped, probes).maps, expected)
    finally:
        torch.distributed.destroy_process_group()


def test_a_dead_unit_gives_defined_values_and_a_flag(probes):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # ReLU kills every unit after the first conv
    result = receptive_maps(net, probes, ["2"])
    assert result.erf.dead.all() and (result.maps == 0).all()
    for value in (result.erf.size, result.erf.mass_side, result.erf.size_fraction, result.erf.mass_fraction):
        assert (value == 0).all()
    assert result.erf.mean()["dead_fraction"].tolist() == [1.0]


def test_erf_statistics_by_hand():
    maps = torch.zeros(1, 2, 11, 11)
    maps[0, 0, 4:7, 4:7] = 1.0  # 9 equal pixels around the centre
    maps[0, 0, 5, 5] = 10.0  # a peak: the plateau is 10% of it
    maps[0, 1, 0, 0] = 1.0  # all the mass in the top-left corner, far from the centre
    boxes = torch.tensor([[[0, 0, 11, 11], [0, 0, 11, 11]]])
    centers = torch.tensor([[[5.0, 5.0], [5.0, 5.0]]])
    stats = erf_stats(maps, boxes, centers)
    assert stats.count.tolist() == [[9.0, 1.0]]  # 10% > 4.55% of the peak
    assert erf_stats(maps, boxes, centers, threshold=0.2).count.tolist() == [[1.0, 1.0]]
    assert stats.mass_side.tolist() == [[3.0, 11.0]]  # 18 / 18 of the mass within 1 pixel; the corner is 5 away
    assert erf_stats(maps, boxes, centers, mass=0.5).mass_side.tolist() == [[1.0, 11.0]]  # 10 / 18 at the centre
    assert stats.rf_side.tolist() == [[11.0, 11.0]]
    assert stats.size_fraction[0].tolist() == pytest.approx([3 / 11, 1 / 11])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"layers": ["conv9"]},
            r"layers=\['conv9'\].*No module output named 'conv9'.*Did you mean: conv[12], conv[12]",
        ),
        ({"unit": (30, 30), "layers": ["conv1"]}, r"unit=\(30, 30\).*'conv1' has an output of 20x20"),
        ({"channel": 99, "layers": ["conv1"]}, r"channel=99.*'conv1' has 8 channels"),
        ({"threshold": 2.0}, r"0 < threshold < 1"),
    ],
)
def test_bad_arguments_are_named(model, probes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        receptive_maps(model, probes, **kwargs)


@pytest.mark.parametrize("shape", [(20, 20), (1, 1, 1, 4, 4, 4)])
def test_probes_must_have_one_to_three_spatial_axes(model, shape):
    expected = rf"probes must be \(N, C, H, W\), or \(N, C, L\) or \(N, C, D, H, W\), got shape {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=expected):
        receptive_maps(model, torch.rand(shape))


# --------------------------------------------------------------------------------------------
# Layers whose output the model changes in place later on
# --------------------------------------------------------------------------------------------


class MobileOneBlock(nn.Module):
    """A re-parameterizable block written as MobileOne writes it: the 1x1 branch is added to in place."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Conv2d(channels, channels, 1)
        self.kxk = nn.Conv2d(channels, channels, 5, padding=2)

    def forward(self, x):
        out = self.scale(x)
        out += self.kxk(x)
        return out


def test_a_layer_output_changed_in_place_later_keeps_its_own_map():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), MobileOneBlock(2), nn.Conv2d(2, 2, 1)).eval()
    probes = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    image = probes.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net[1].scale(net[0](image))[:, :, 8, 8].sum(), image)

    alone = receptive_maps(net, probes, ["1.scale"])
    together = receptive_maps(net, probes, ["1.scale", "2"])  # the forward now runs past the in-place add

    for result in (alone, together):
        torch.testing.assert_close(result.gradients[:, 0], expected)
        rows, cols = result.maps[0, 0].nonzero(as_tuple=True)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == tuple(result.boxes[0, 0].tolist())


class InPlace(nn.Module):
    """A convolution whose output the block then changes in place: ``+=`` a wider branch, ``relu_`` or ``mul_``."""

    def __init__(self, kind: str, kernel: int, stride: int, twin: bool) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 2, kernel, stride, kernel // 2)
        self.branch = nn.Conv2d(2, 2, kernel + 2, stride, kernel // 2 + 1) if kind == "add_" else None
        if twin:  # positive constant weights: the gradient is nonzero exactly on the analytic box
            for parameter in self.parameters():
                nn.init.constant_(parameter, 0.5 if parameter.dim() > 1 else 0.0)

    def forward(self, x):
        out = self.conv(x)
        if self.kind == "add_":
            out += self.branch(x)
        elif self.kind == "relu_":
            out.relu_()
        elif self.kind == "mul_":
            out.mul_(0.5)
        return out


class InPlaceNet(nn.Module):
    def __init__(self, blocks: list[tuple[str, int, int]], twin: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        if twin:
            nn.init.constant_(self.stem.weight, 0.5)
            nn.init.zeros_(self.stem.bias)
        self.blocks = nn.Sequential(*(InPlace(kind, kernel, stride, twin) for kind, kernel, stride in blocks))
        self.double()

    def forward(self, x):
        return self.blocks(self.stem(x))


in_place_blocks = st.tuples(
    st.sampled_from(["conv", "add_", "relu_", "mul_"]), st.sampled_from([1, 3]), st.integers(1, 2)
)


@model_examples
@given(
    blocks=st.lists(in_place_blocks, min_size=1, max_size=4),
    twin=st.booleans(),
    unit=st.sampled_from(["center", "max"]),
    size=st.integers(8, 16),
    crops=st.booleans(),
    data=st.data(),
)
def test_each_map_is_independent_of_the_other_layers_requested(blocks, twin, unit, size, crops, data):
    """Random subsets of layers, in nets that change layer outputs in place (``+=``, ``relu_``, ``mul_``)."""
    torch.manual_seed(0)
    net = InPlaceNet(blocks, twin).eval()
    probes = torch.rand(2, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    names = [name for name, _ in net.named_modules() if name.startswith("blocks.")]
    subset = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    with planned(crops):
        together = receptive_maps(net, probes, subset, unit=unit)
    for index, name in enumerate(subset):
        alone = receptive_maps(net, probes, [name], unit=unit)
        assert torch.equal(together.units[:, index], alone.units[:, 0])
        torch.testing.assert_close(together.gradients[:, index], alone.gradients[:, 0])
        for n in range(len(probes)):
            rows, cols = together.maps[n, index].nonzero(as_tuple=True)
            top, left, bottom, right = together.boxes[n, index].tolist()
            if rows.numel():
                support = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
                if twin:
                    assert support == (top, left, bottom, right)
                else:
                    assert top <= support[0] and left <= support[1] and support[2] <= bottom and support[3] <= right


# --------------------------------------------------------------------------------------------
# Models that cannot run on crops
# --------------------------------------------------------------------------------------------


class SizeChecked(nn.Module):
    """Refuses any input but 20x20, with ``assert`` (as torchvision's VisionTransformer) or an exception type."""

    def __init__(self, error: type[BaseException] | None) -> None:
        super().__init__()
        self.error = error
        self.checks = True
        self.sizes: list[tuple[int, int]] = []  # the input size of every real forward
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        if x.device.type != "meta":
            self.sizes.append(tuple(x.shape[-2:]))
        if self.checks and self.error is None:
            assert x.shape[-2:] == (20, 20), f"expected 20x20 images, got {tuple(x.shape[-2:])}"
        elif self.checks and x.shape[-2:] != (20, 20):
            raise self.error(f"expected 20x20 images, got {tuple(x.shape[-2:])}")
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("error", [None, ValueError, TypeError], ids=["assert", "ValueError", "TypeError"])
def test_models_that_check_their_input_size_get_maps_from_whole_images(probes, error):
    torch.manual_seed(0)
    model = SizeChecked(error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the maps are the same, only slower
        first = receptive_maps(model, probes)
        assert len(model.sizes) == 2 and model.sizes[1] == (20, 20)  # one cropped forward failed, no other was tried
        model.sizes.clear()
        second = receptive_maps(model, probes)
        assert model.sizes == [(20, 20)]  # nor is any tried again for this model and these layers
    torch.testing.assert_close(first.gradients, second.gradients)
    for index, name in enumerate(first.layers):
        for n in range(len(probes)):
            unit = tuple(first.units[n, index].tolist())
            expected = captum_gradient(model, getattr(model, name), probes[n : n + 1], unit)
            torch.testing.assert_close(first.gradients[n, index], expected, rtol=1e-5, atol=1e-6)


def test_torchvision_vision_transformer_gets_maps_of_its_patch_embedding():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    probes = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = receptive_maps(vit, probes, ["conv_proj"])
    vit.eval()
    for n in range(2):
        expected = captum_gradient(vit, vit.conv_proj, probes[n : n + 1], (2, 2))
        torch.testing.assert_close(result.gradients[n, 0], expected, rtol=1e-5, atol=1e-6)


def test_an_interrupt_in_the_cropped_forward_is_not_taken_for_a_failed_crop(probes):
    model = SizeChecked(KeyboardInterrupt).train()
    with pytest.raises(KeyboardInterrupt):
        receptive_maps(model, probes)
    assert all(not m._forward_hooks for m in model.modules()) and model.training
    model.checks = False
    model.sizes.clear()
    receptive_maps(model, probes)
    assert (20, 20) not in model.sizes  # crops are still tried: the interrupt was not remembered as a failure


def test_remembering_a_failed_crop_keeps_no_model_alive(probes):
    model = SizeChecked(ValueError)
    receptive_maps(model, probes)
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None


class WholeImagesOnly(nn.Module):
    """``inner`` behind an input-size check: every map of it comes from whole images."""

    def __init__(self, inner: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.inner, self.size = inner, size

    def forward(self, x):
        assert x.shape[-2:] == self.size
        return self.inner(x)


@pytest.mark.parametrize("unit", ["center", "max", (2, 5)])
def test_crops_and_mosaics_give_the_maps_of_whole_images(unit):
    """SmallCNN's six centre units share one mosaic of their boxes (one backward for all); units at
    the border ('max' on an untrained net) get crops of their own."""
    torch.manual_seed(0)
    net = SmallCNN().eval()
    probes = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    layers = [f"features.{name}" for name in ("conv1", "conv2", "pool1", "conv3", "conv4", "pool2")]
    result = receptive_maps(net, probes, layers, unit=unit)
    if unit == "center":
        plan = _passes(layers, receptive_fields(net, (1, 28, 28)), dict(zip(layers, result.units.unbind(1))), (28, 28))
        assert [layout is not None and layout.together for _, layout in plan] == [True]
    expected = receptive_maps(WholeImagesOnly(net, (28, 28)), probes, [f"inner.{name}" for name in layers], unit=unit)
    assert torch.equal(result.units, expected.units)
    torch.testing.assert_close(result.gradients, expected.gradients, rtol=1e-5, atol=1e-6)
