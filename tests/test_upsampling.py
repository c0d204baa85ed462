"""Upsampling paths (issue 11): transposed convolution, interpolation, pixel shuffle, U-Nets.

The oracle is the gradient support of a linearized twin (positive constant weights, no bias,
float64): the network is linear, so running it on a batch of one-hot images gives its whole
Jacobian in one forward, and the bounding box of the pixels with a nonzero entry for a unit must
equal ``box`` of that unit, for every unit of every row checked.
"""

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from rf_callback import UnsupportedLayerError, receptive_fields
from rf_callback.algebra import AxisRF, Field, merge
from rf_callback.report import pair
from tests.nets import model_examples

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def linearized(net: nn.Module) -> nn.Module:
    """``net`` with positive constant weights, zero biases, in float64 and eval mode."""
    for name, parameter in net.named_parameters():
        nn.init.constant_(parameter, 0.0 if name.endswith("bias") else 0.5)
    return net.double().eval()


def jacobian_supports(net: nn.Module, spatial: tuple[int, ...], names: list[str]) -> dict[str, torch.Tensor]:
    """For each module in ``names``: a bool tensor ``(*spatial, *output)``, True where the input pixel reaches the unit."""
    count = math.prod(spatial)
    images = torch.eye(count, dtype=torch.float64).reshape(count, 1, *spatial)
    outputs, modules = {}, dict(net.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, k=name: outputs.__setitem__(k, out)) for name in names
    ]
    try:
        with torch.no_grad():
            net(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: out.ne(0).any(1).reshape(*spatial, *out.shape[2:]) for name, out in outputs.items()}


def support_boxes(support: torch.Tensor, dims: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per unit of a support ``(*spatial, *output)``: the lows and highs of its bounding box, one tensor ``output``
    per axis, and where the support is empty."""
    lows, highs, empty = [], [], ~support.reshape(-1, *support.shape[dims:]).any(0)
    for a in range(dims):
        along = support.any(dim=tuple(b for b in range(dims) if b != a))  # (n_a, *output)
        n = along.shape[0]
        positions = torch.arange(n).reshape(n, *(1,) * (along.dim() - 1))
        lows.append(torch.where(along, positions, n).amin(0))
        highs.append(torch.where(along, positions + 1, 0).amax(0))
    return lows, highs, empty


def units_of(row) -> list[list[int]]:
    """Every unit of a row, one index per axis."""
    dims = len(row.output_shape)
    return torch.cartesian_prod(*(torch.arange(m) for m in row.output_shape)).reshape(-1, dims).tolist()


def assert_exact_boxes(net: nn.Module, spatial: tuple[int, ...], names: list[str]) -> None:
    table = receptive_fields(net, (1, *spatial))
    dims = len(spatial)
    for name, support in jacobian_supports(net, spatial, names).items():
        row = table[name]
        assert row.output_shape == tuple(support.shape[dims:]), name
        lows, highs, empty = support_boxes(support, dims)
        for unit in units_of(row):
            box = row.box(*unit)
            if empty[tuple(unit)]:
                assert all(box[a] == box[a + dims] for a in range(dims)), (name, unit, box)
                continue
            truth = tuple(int(t[tuple(unit)]) for t in lows) + tuple(int(t[tuple(unit)]) for t in highs)
            assert box == truth, (name, unit, row.field.rfs)
        assert not row.equivariant, name  # maps of upsampled rows use whole images


def sizes(dims: int):
    return st.tuples(*[st.integers(3, {1: 24, 2: 9, 3: 5}[dims])] * dims)


@st.composite
def transposed_nets(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    kernel, stride, dilation = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, dilation * (kernel - 1)))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    groups = draw(st.sampled_from([1, 2]))
    pre = draw(st.sampled_from([(1, 1, 0), (3, 2, 1), (2, 2, 0), (3, 1, 1)]))
    net = nn.Sequential(
        CONV[dims](1, 2, pre[0], stride=pre[1], padding=pre[2]),
        TRANSPOSED[dims](2, 2, kernel, stride, padding, output_padding, groups, dilation=dilation),
        CONV[dims](2, 2, 3, padding=1, padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate"]))),
    )
    return linearized(net), draw(sizes(dims))


@model_examples
@given(case=transposed_nets())
def test_transposed_convolution_boxes_equal_the_gradient_support(case):
    net, spatial = case
    try:
        net(torch.zeros(1, 1, *spatial, dtype=torch.float64))
    except RuntimeError:
        assume(False)  # a negative output length, or reflect padding wider than the map
    try:
        assert_exact_boxes(net, spatial, ["1", "2"])
    except UnsupportedLayerError as refused:  # padding cut every position that reads the input: nothing to map
        assert "none of its output positions reads an input position" in str(refused)
        assert not jacobian_supports(net, spatial, ["1"])["1"].any()


class Interpolate(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())

    def forward(self, x):
        return F.interpolate(x, **self.options)


LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


@st.composite
def interpolating_nets(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    mode = draw(st.sampled_from(["nearest", "nearest-exact", "area", LINEAR[dims], "bicubic" if dims == 2 else "area"]))
    options = {"mode": mode}
    if mode in ("linear", "bilinear", "trilinear", "bicubic"):
        options["align_corners"] = draw(st.sampled_from([None, False, True]))
        if dims == 2:
            options["antialias"] = draw(st.sampled_from([False, False, True]))
    spatial = draw(sizes(dims))
    if draw(st.booleans()):
        options["size"] = tuple(draw(st.integers(1, 3 * n)) for n in spatial)
    else:
        options["scale_factor"] = draw(st.sampled_from([2.0, 3.0, 0.5, 1.5, 2.5, 4.0, (2.0, 0.75, 1.5)[:dims]]))
        options["recompute_scale_factor"] = draw(st.sampled_from([None, True]))
    pre = draw(st.sampled_from([(1, 1, 0), (3, 2, 1), (2, 2, 0)]))
    net = nn.Sequential(
        CONV[dims](1, 2, pre[0], stride=pre[1], padding=pre[2]), Interpolate(**options), CONV[dims](2, 2, 3, padding=1)
    )
    return linearized(net), spatial


@model_examples
@given(case=interpolating_nets())
def test_interpolation_boxes_equal_the_gradient_support(case):
    """Every mode, ``align_corners`` both ways, size or scale factor (up and down), antialiasing."""
    net, spatial = case
    try:
        net(torch.zeros(1, 1, *spatial, dtype=torch.float64))
    except (RuntimeError, ValueError):
        assume(False)  # an empty output
    assert_exact_boxes(net, spatial, ["1", "2"])


@model_examples
@given(
    factor=st.integers(1, 3),
    stride=st.integers(1, 2),
    unshuffle=st.booleans(),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
)
def test_pixel_shuffle_boxes_equal_the_gradient_support(factor, stride, unshuffle, h, w):
    if unshuffle:
        shuffle, channels, spatial = (
            nn.PixelUnshuffle(factor),
            2 * factor * factor,
            (h * factor * stride, w * factor * stride),
        )
        net = nn.Sequential(nn.Conv2d(1, 2, 3, stride, 1), shuffle, nn.Conv2d(channels, 2, 3, padding=1))
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 2 * factor * factor, 3, stride, 1), nn.PixelShuffle(factor), nn.Conv2d(2, 2, 3, padding=1)
        )
        spatial = (h + 2, w + 3)
    assert_exact_boxes(linearized(net), spatial, ["1", "2"])


def test_nearest_after_a_strided_convolution_shares_boxes():
    """Conv stride 2, then nearest 2x: units 2k and 2k + 1 see the same pixels."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Upsample(scale_factor=2))
    row = receptive_fields(net, (1, 16, 16))["1"]
    assert row.box(4, 6) == row.box(5, 7) == (3, 5, 6, 8)  # convolution unit (2, 3)
    assert row.box(6, 6) == (5, 5, 8, 8)
    assert (row.size, row.stride, row.padding) == ((3, 3), (1, 1), (1, 1))
    assert row.field.rfs[0] == AxisRF(size=3, jump=1, start=-1, phases=((-1, 2), (-1, 2)))


class DownUpUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 2, 2, stride=2)
        self.up = nn.Upsample(scale_factor=2)
        self.again = nn.ConvTranspose2d(2, 2, 2, stride=2)

    def forward(self, x):
        return self.again(self.up(self.down(x)))


def test_fractional_strides_are_exact_and_shown_as_fractions():
    table = receptive_fields(DownUpUp(), (1, 8, 12))
    row = table["again"]
    assert row.stride == (Fraction(1, 2), Fraction(1, 2)) and row.size == (2, 2) and row.padding == (0, 0)
    assert row.output_shape == (16, 24)
    assert [row.box(0, u)[1::2] for u in range(6)] == [(0, 2)] * 4 + [(2, 4)] * 2
    record = row.to_record()
    assert record["stride"] == ["1/2", "1/2"] and json.loads(json.dumps(record)) == record
    assert Fraction(record["stride"][0]) == Fraction(1, 2)
    assert pair(row.stride) == "1/2"
    assert "again  ConvTranspose2d  16x24   2        2           1/2     0" in str(table)


def test_branches_at_the_same_fractional_stride_merge():
    """A U-Net's skip: two branches upsampled to one resolution merge; different strides still raise."""
    image = Field.of_input((16,))
    down = image.window(0, kernel=2, stride=2, padding=0, length=8).window(0, 2, 2, 0, 4)
    left = down.resample(0, [[u // 4] for u in range(16)]).resample(0, [[u // 2] for u in range(32)])
    right = image.window(0, 2, 2, 0, 8).resample(0, [[u // 4] for u in range(32)])
    both = merge([left, right])
    assert both.rfs[0].jump == Fraction(1, 2)
    assert [both.box((u,)) for u in (0, 7, 8, 31)] == [((0, 4),), ((0, 4),), ((4, 8),), ((12, 16),)]
    half, quarter = image.resample(0, [[u // 2] for u in range(32)]), image.resample(0, [[u // 4] for u in range(32)])
    assert half.rfs[0].jump == Fraction(1, 2) and quarter.rfs[0].jump == Fraction(1, 4)
    with pytest.raises(ValueError, match=r"different effective strides \(1/2, 1/4\)"):
        merge([half, quarter])


class UNet(nn.Module):
    """Two levels, skip concatenations, a transposed convolution and a bilinear upsampling."""

    def __init__(self, twin: bool = False):
        super().__init__()
        act = nn.Identity if twin else nn.ReLU
        pool = nn.AvgPool2d if twin else nn.MaxPool2d
        self.enc1 = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), act())
        self.enc2 = nn.Sequential(pool(2), nn.Conv2d(2, 2, 3, padding=1), act())
        self.bottom = nn.Sequential(pool(2), nn.Conv2d(2, 2, 3, padding=1), act())
        self.up2 = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), act())
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), act())
        self.head = nn.Conv2d(2, 1, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(a)
        c = self.bottom(b)
        d = self.dec2(torch.cat([b, self.up2(c)], 1))
        return self.head(self.dec1(torch.cat([a, self.up1(d)], 1)))


def test_unet_output_pixels_equal_the_gradient_support():
    twin = linearized(UNet(twin=True))
    assert_exact_boxes(twin, (12, 16), ["up2", "dec2", "up1", "dec1", "head"])
    real, table = UNet(), receptive_fields(twin, (1, 12, 16))
    assert {k: (r.size, r.stride, r.padding) for k, r in receptive_fields(real, (1, 12, 16)).items()} == {
        k: (r.size, r.stride, r.padding) for k, r in table.items()
    }
    assert table["head"].stride == (1, 1) and table["head"].output_shape == (12, 16)


class Kernel(nn.Module):
    """An ATen interpolation kernel called directly, as decompositions and ``torch._C._nn`` callers do."""

    def __init__(self, func, *args):
        super().__init__()
        self.func, self.args = func, args

    def forward(self, x):
        return self.func(x, *self.args)


aten = torch.ops.aten


@pytest.mark.parametrize(
    ("func", "args", "spatial"),
    [
        (aten.upsample_nearest2d.default, ([11, 7], None, None), (5, 4)),
        (aten.upsample_nearest2d.vec, (None, [2.5, 1.5]), (5, 4)),
        (aten._upsample_nearest_exact1d.default, ([13], 2.6), (5,)),
        (aten.upsample_bilinear2d.default, ([9, 12], True, None, None), (5, 4)),
        (aten.upsample_bilinear2d.vec, (None, False, [2.0, 3.0]), (5, 4)),
        (aten.upsample_bicubic2d.default, ([9, 7], False, None, None), (4, 5)),
        (aten.upsample_linear1d.vec, ([7], False, None), (16,)),
        (aten.upsample_trilinear3d.default, ([6, 4, 5], False, None, None, None), (3, 3, 4)),
        (aten._upsample_bilinear2d_aa.default, ([3, 9], False, None, None), (8, 4)),
    ],
    ids=lambda value: str(value) if isinstance(value, torch._ops.OpOverload) else None,
)
def test_aten_interpolation_kernels_called_directly(func, args, spatial):
    dims = len(spatial)
    net = nn.Sequential(CONV[dims](1, 2, 3, padding=1), Kernel(func, *args), CONV[dims](2, 2, 3, padding=1))
    assert_exact_boxes(linearized(net), spatial, ["1", "2"])


def dense_gradient_boxes(model: nn.Module, shape: tuple[int, ...], row, pick, units) -> list[tuple[int, ...]]:
    """Bounding boxes of the nonzero input gradient of ``pick(model(image))[0, :, i, j].sum()`` for each unit."""
    model = model.double().eval()
    image = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    output = pick(model(image))
    boxes = []
    for i, j in units:
        (grad,) = torch.autograd.grad(output[0, :, i, j].sum(), image, retain_graph=True)
        ys, xs = grad[0].abs().sum(0).nonzero(as_tuple=True)
        boxes.append((ys.min().item(), xs.min().item(), ys.max().item() + 1, xs.max().item() + 1))
    return boxes


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"])
def test_segmentation_models_have_exact_tables(name):
    """torchvision's segmentation models, resized back to the input in their own forward: no row refused."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    table = receptive_fields(model, (3, 64, 64))
    output = table["(output)"]
    assert output.output_shape == (64, 64)
    if name == "fcn_resnet50":  # output stride 8, resized back: 1 on average, units in steps of 0 and 1
        assert output.stride == (1, 1) and not output.is_global
        assert table["backbone"].stride == (8, 8)
    else:  # the pooled branch (ASPP's image pooling, LR-ASPP's gate) makes every pixel see the image
        assert output.is_global


def test_fcn_and_fpn_boxes_equal_the_gradient_support():
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    fcn = torchvision.models.get_model("fcn_resnet50", weights=None, weights_backbone=None)
    row = receptive_fields(fcn, (3, 48, 48))["(output)"]
    units = [(0, 0), (47, 47), (20, 31)]
    assert [row.box(*unit) for unit in units] == dense_gradient_boxes(fcn, (3, 48, 48), row, lambda o: o["out"], units)
    fpn = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    table = receptive_fields(fpn, (3, 64, 64))
    assert [table[f"fpn:{k}"].stride for k in range(5)] == [(4, 4), (8, 8), (16, 16), (32, 32), (64, 64)]
    row = table["fpn:0"]  # the finest level sums the lateral path and three upsampled coarser ones
    units = [(0, 0), (15, 15), (7, 9), (3, 12)]
    assert [row.box(*unit) for unit in units] == dense_gradient_boxes(fpn, (3, 64, 64), row, lambda o: o["0"], units)


class Roll(nn.Module):
    def __init__(self, shifts, dims):
        super().__init__()
        self.shifts, self.dims = shifts, dims

    def forward(self, x):
        return torch.roll(x, self.shifts, self.dims)


@pytest.mark.parametrize(("shifts", "dims"), [((3, -2), (2, 3)), (-1, 3), ((0, 9), (-2, -1))])
def test_rolls_are_followed_exactly(shifts, dims):
    """Swin's shifted windows roll the feature map: each position reads ``(u - shift) mod n``."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), Roll(shifts, dims), nn.Conv2d(2, 2, 3, padding=1))
    assert_exact_boxes(linearized(net), (10, 13), ["1", "2"])


def test_antialiasing_when_another_axis_ends_at_one_position():
    """PyTorch's antialiased bilinear kernel gives every output row the first row's inputs when the
    other axis ends at one position (4x3 -> 2x1): the boxes follow the kernel, not the formula."""
    options = {"mode": "bilinear", "scale_factor": 0.5, "antialias": True}
    net = nn.Sequential(nn.Conv2d(1, 2, 1), Interpolate(**options), nn.Conv2d(2, 2, 3, padding=1))
    assert_exact_boxes(linearized(net), (4, 3), ["1", "2"])
    assert receptive_fields(net, (1, 4, 3))["1"].box(1, 0) == (0, 0, 3, 3)


class Holes(nn.Module):
    """Keeps only the holes of a transposed convolution whose kernel (1) is smaller than its stride (3)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 1, 1, stride=3)

    def forward(self, x):
        return self.up(x)[..., 1::3, 1::3]


def test_keeping_only_the_holes_of_an_upsampling_is_named():
    with pytest.raises(UnsupportedLayerError, match=r"aten\.slice.* reads only holes of an upsampling"):
        receptive_fields(Holes(), (1, 4, 4))
