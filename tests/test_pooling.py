"""Pyramid pooling and SegNet's unpooling (issue 22): adaptive pooling with unequal windows, max unpooling.

The oracle is the gradient support on linearized twins, as in ``tests/test_upsampling.py``: every
unit of every row checked. Max unpooling puts each pooled value where its window's maximum was,
which depends on the data; its box is what can affect a unit for *some* input, so it is checked
over many inputs: each one's gradient support lies inside the box, and together they fill it.
"""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from rf_callback import UnsupportedLayerError, receptive_fields
from tests.nets import model_examples
from tests.test_upsampling import (
    CONV,
    assert_exact_boxes,
    jacobian_supports,
    linearized,
    sizes,
    support_boxes,
    units_of,
)


@pytest.fixture(autouse=True, scope="module")
def _unpooling_runs():
    """PyTorch's max unpooling has no deterministic kernel, and a ``Trainer(deterministic=True)`` elsewhere in
    the session leaves deterministic algorithms on: off for these tests, as found after them."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
ADAPTIVE_MAX = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
MAX_UNPOOL = {1: nn.MaxUnpool1d, 2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}


# --------------------------------------------------------------------------------------------
# Adaptive pooling: bin i of m over n positions reads [floor(i n / m), ceil((i + 1) n / m))
# --------------------------------------------------------------------------------------------


def adaptive_net(dims: int, pre: tuple[int, int, int], output_size, pool=ADAPTIVE_AVG) -> nn.Sequential:
    return nn.Sequential(
        CONV[dims](1, 2, pre[0], stride=pre[1], padding=pre[2]), pool[dims](output_size), CONV[dims](2, 2, 3, padding=1)
    )


@st.composite
def adaptive_nets(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    spatial = draw(sizes(dims))
    pre = draw(st.sampled_from([(1, 1, 0), (3, 1, 1), (3, 2, 1), (2, 2, 0)]))
    lengths = [(n + 2 * pre[2] - pre[0]) // pre[1] + 1 for n in spatial]
    output = tuple(draw(st.one_of(st.none(), st.integers(1, n + 2))) for n in lengths)
    assume(any(m is not None and m != n for m, n in zip(output, lengths)))  # a real pooling on some axis
    return linearized(adaptive_net(dims, pre, output if dims > 1 else output[0])), spatial


@model_examples
@given(case=adaptive_nets())
def test_adaptive_average_pooling_boxes_equal_the_gradient_support(case):
    """1/2/3-D, any output size (smaller, larger, ``None`` to keep an axis), bins equal or not."""
    net, spatial = case
    assert_exact_boxes(net, spatial, ["1", "2"])


@pytest.mark.parametrize(
    ("spatial", "output"),
    [((16, 16), 3), ((13, 13), 2), ((26, 26), 6), ((16, 13), (6, None)), ((13, 26), (2, 6)), ((5, 7), (9, 3))],
)
def test_pyramid_bins_equal_the_gradient_support(spatial, output):
    """16 -> 3 and 26 -> 6 overlap by one position, 13 -> 2 too; 16 -> 6 mixes windows of 3 and 4."""
    net = linearized(adaptive_net(2, (3, 1, 1), output))
    assert_exact_boxes(net, spatial, ["1", "2"])


def test_sixteen_positions_into_three_bins():
    row = receptive_fields(nn.Sequential(nn.AdaptiveAvgPool1d(3)), (1, 16))["0"]
    assert [row.box(i) for i in range(3)] == [(0, 6), (5, 11), (10, 16)]
    assert (row.size, row.stride, row.padding) == ((6,), (5,), (0,))  # bins of 6, moving by 5: exact for all three
    row = receptive_fields(nn.Sequential(nn.AdaptiveAvgPool1d(6)), (1, 26))["0"]
    assert [row.box(i) for i in range(6)] == [(0, 5), (4, 9), (8, 13), (13, 18), (17, 22), (21, 26)]
    assert row.stride == (pytest.approx(26 / 6),)  # one period of three bins advancing 13 positions


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_adaptive_max_pooling_has_the_windows_of_average_pooling(dims):
    """The same bins: the same fields; a real maximum's gradient (its argmax only) lies inside them."""
    spatial, output = {1: ((13,), 3), 2: ((16, 13), (3, 2)), 3: ((5, 7, 6), (2, None, 4))}[dims]
    maximum, average = adaptive_net(dims, (3, 1, 1), output, ADAPTIVE_MAX), adaptive_net(dims, (3, 1, 1), output)
    fields = receptive_fields(maximum, (1, *spatial)), receptive_fields(average, (1, *spatial))
    assert [(k, r.field) for k, r in fields[0].items()] == [(k, r.field) for k, r in fields[1].items()]
    row = fields[0]["1"]
    image = torch.rand(1, 1, *spatial, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pooled = maximum[:2](image)
    for unit in units_of(row):
        (grad,) = torch.autograd.grad(pooled[(0, slice(None), *unit)].sum(), image, retain_graph=True)
        found = grad[0, 0].nonzero()
        box = row.box(*unit)
        assert all(box[a] <= found[:, a].min() and found[:, a].max() < box[a + dims] for a in range(dims)), unit


class Pyramid(nn.Module):
    """PSPNet's pyramid pooling: bins of 1, 2, 3 and 6 positions, each upsampled back and concatenated."""

    def __init__(self, align_corners: bool, bins=(1, 2, 3, 6)):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(b) for b in bins)
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 1) for _ in bins)
        self.align_corners = align_corners
        self.fuse = nn.Conv2d(2 * (len(bins) + 1), 2, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        size, mode = x.shape[-2:], "bilinear"
        up = [
            nn.functional.interpolate(conv(pool(x)), size=size, mode=mode, align_corners=self.align_corners)
            for pool, conv in zip(self.pools, self.convs)
        ]
        return self.fuse(torch.cat([*up, x], 1))


@pytest.mark.parametrize("spatial", [(16, 16), (13, 13), (26, 26)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_pyramid_pooling_equals_the_gradient_support(spatial, align_corners):
    """Each bin row exactly; the concatenation sees the whole image through its one-bin branch."""
    net = linearized(Pyramid(align_corners))
    assert_exact_boxes(net, spatial, [f"convs.{k}" for k in range(4)] + ["fuse"])
    assert receptive_fields(net, (1, *spatial))["fuse"].is_global


def test_pyramid_without_a_whole_image_bin_is_still_refused_where_strides_differ():
    """Without the one-bin branch, bins upsampled with ``align_corners=True`` move at other strides than the
    features they are concatenated with: no single receptive field, and the error says so."""
    with pytest.raises(UnsupportedLayerError, match="different effective strides"):
        receptive_fields(Pyramid(align_corners=True, bins=(2, 3, 6)), (1, 16, 16))


def test_pyramid_pooling_models_are_traced_in_strict_mode():
    smp = pytest.importorskip("segmentation_models_pytorch")
    for build in (smp.PSPNet, smp.UPerNet):
        with torch.device("meta"):
            model = build(encoder_name="resnet18", encoder_weights=None, classes=3)
        table = receptive_fields(model, (3, 128, 128))
        assert table["decoder.psp.blocks.2.0" if build is smp.UPerNet else "decoder.psp.blocks.2.pool.0"].supported
        assert table["segmentation_head"].is_global  # the one-bin branch reaches every output pixel


def test_hugging_face_upernet_is_traced_in_strict_mode():
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32)
    model = transformers.UperNetForSemanticSegmentation(config)
    table = receptive_fields(model, (3, 96, 96))
    pooled = [key for key, row in table.items() if row.module_type == "AdaptiveAvgPool2d"]
    assert [table[key].output_shape for key in pooled] == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert table["(output)"].is_global


# --------------------------------------------------------------------------------------------
# Max unpooling
# --------------------------------------------------------------------------------------------


class Unpooling(nn.Module):
    """Max pooling with indices, a convolution on the values, unpooling, a convolution (SegNet's decoder step).

    The twin takes its values from a positive depthwise convolution with the pooling's windows (linear, and
    every pixel of the window counts); ``frozen`` indices, when set, replace the pooling's, so that the
    twin is linear in its input and a batch of one-hot images gives its Jacobian at the input they came from.
    With ``every_writer``, values whose indices coincide are added rather than one of them kept.
    """

    def __init__(self, dims: int, kernel: int, stride: int, padding: int, dilation: int, output_size, twin: bool):
        super().__init__()
        self.pool = MAX_POOL[dims](kernel, stride, padding, dilation, return_indices=True)
        self.values = CONV[dims](1, 1, kernel, stride, padding, dilation, bias=False) if twin else None
        self.mid = CONV[dims](1, 1, 3, padding=1)
        self.unpool = MAX_UNPOOL[dims](kernel, stride, padding)
        self.post = CONV[dims](1, 2, 3, padding=1)
        self.output_size = output_size
        self.frozen: torch.Tensor | None = None
        self.every_writer = False

    def forward(self, x):
        values, indices = self.pool(x)
        if self.values is not None:
            values = self.values(x)
        if self.frozen is not None:
            indices = self.frozen.expand_as(indices)
        values = self.mid(values)
        if self.every_writer:
            plane = torch.zeros(*values.shape[:2], math.prod(x.shape[2:]), dtype=values.dtype)
            unpooled = plane.scatter_add(2, indices.flatten(2), values.flatten(2)).view(*values.shape[:2], *x.shape[2:])
        else:
            unpooled = self.unpool(values, indices, output_size=self.output_size)
        return self.post(unpooled)


@st.composite
def unpooling_nets(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    spatial = tuple(draw(st.integers(3, {1: 16, 2: 7, 3: 4}[dims])) for _ in range(dims))
    kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, kernel // 2))
    assume(all(n + 2 * padding >= dilation * (kernel - 1) + 1 for n in spatial))
    output_size = spatial if dims > 1 or draw(st.booleans()) else None  # 1-D: the default size may differ
    return dims, (kernel, stride, padding, dilation, output_size), spatial


def gradient_supports(net: Unpooling, image: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The twin's gradient supports at ``image``: its indices frozen, its Jacobian from one-hot images."""
    with torch.no_grad():
        net.frozen = net.pool(image)[1]
    try:
        return jacobian_supports(net, tuple(image.shape[2:]), names)
    finally:
        net.frozen = None


def assert_inside(table, supports: dict[str, torch.Tensor], dims: int) -> None:
    for name, support in supports.items():
        row = table[name]
        lows, highs, empty = support_boxes(support, dims)
        for unit in units_of(row):
            if not empty[tuple(unit)]:
                box, at = row.box(*unit), tuple(unit)
                assert all(box[a] <= lows[a][at] and highs[a][at] <= box[a + dims] for a in range(dims)), (name, unit)


@model_examples
@given(case=unpooling_nets(), seed=st.integers(0, 2**16))
def test_unpooling_boxes_hold_every_gradient_support_and_their_union(case, seed):
    """Each random input's gradient support lies inside the box; over inputs that make each pixel the maximum of
    every window covering it, the supports together fill the box.

    Where windows overlap, two of them may pick one position: PyTorch keeps one value there, which one
    depending on the device (the CPU keeps the last window's). The box counts every window that can
    write a position, so that fill is checked with coinciding values added, the inclusion with PyTorch's own.
    """
    dims, options, spatial = case
    twin = linearized(Unpooling(dims, *options, twin=True))
    try:
        twin(torch.rand(4, 1, *spatial, dtype=torch.float64))
    except (RuntimeError, ValueError):  # an output size that does not fit the pooling
        assume(False)
    table = receptive_fields(Unpooling(dims, *options, twin=False), (1, *spatial))
    names = ["unpool", "post"]
    assert [(k, receptive_fields(twin, (1, *spatial))[k].field) for k in names] == [(k, table[k].field) for k in names]
    noise = torch.rand(16, 1, *spatial, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for image in noise:
        assert_inside(table, gradient_supports(twin, image[None], names), dims)
    count = math.prod(spatial)
    hot = 0.5 * noise[:1] + torch.eye(count, dtype=torch.float64).reshape(count, 1, *spatial)
    twin.every_writer = True
    union: dict[str, torch.Tensor] = {}
    for image in hot:
        supports = gradient_supports(twin, image[None], names)
        assert_inside(table, supports, dims)
        union = {name: support | union[name] if name in union else support for name, support in supports.items()}
    for name, support in union.items():
        row = table[name]
        lows, highs, empty = support_boxes(support, dims)
        for unit in units_of(row):
            box = row.box(*unit)
            if empty[tuple(unit)]:  # a position no window covers receives nothing
                assert all(box[a] == box[a + dims] for a in range(dims)), (name, unit, box)
                continue
            truth = tuple(int(t[tuple(unit)]) for t in lows) + tuple(int(t[tuple(unit)]) for t in highs)
            assert box == truth, (name, unit, row.field.rfs)


class SegNet(nn.Module):
    """Two encoder stages pooled with indices, two decoder stages unpooled with them."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec2, self.dec1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        x, first = self.pool(self.enc1(x).relu())
        size = x.shape
        x, second = self.pool(self.enc2(x).relu())
        x = self.dec2(self.unpool(x, second, output_size=size).relu())
        return self.dec1(self.unpool(x, first).relu())


def test_segnet_is_traced_in_strict_mode():
    table = receptive_fields(SegNet(), (3, 20, 28))
    assert table["unpool[1]"].output_shape == (20, 28)
    # Pixel (0, 0) after both unpoolings is in the first window of each: it sees the first unit pooled twice,
    # [0, 7) (enc1, pool, enc2, pool), and dec2 and dec1 read only positions of those same windows.
    assert table["dec1"].box(0, 0) == (0, 0, 7, 7)
    assert table["dec1"].stride == (1, 1)


def test_unpooling_to_another_row_length_is_refused_by_name():
    """Indices are flat over the pooled plane: unpooling 9x9 pooled by 2 to its default 8x8 moves them to other
    rows (PyTorch puts values where no window was); ``output_size`` fixes it."""
    net = Unpooling(2, 2, 2, 0, 1, None, twin=False)
    with pytest.raises(UnsupportedLayerError, match=r"flat over 9x9.*output_size"):
        receptive_fields(net, (1, 9, 9))
    net.output_size = (9, 9)
    row = receptive_fields(net, (1, 9, 9))["unpool"]
    assert row.box(8, 8) == (8, 8, 8, 8)  # the last row and column are no window's: they receive nothing


class ForeignIndices(nn.Module):
    def forward(self, x):
        return nn.functional.max_unpool2d(x, torch.zeros_like(x, dtype=torch.long), 2)


def test_unpooling_indices_that_no_pooling_made_is_refused_by_name():
    with pytest.raises(UnsupportedLayerError, match="indices do not come from a max pooling"):
        receptive_fields(ForeignIndices(), (1, 4, 4))
