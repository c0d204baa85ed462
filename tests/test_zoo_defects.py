"""Defects found by sweeping public model zoos (issue 15), each on a minimal model written for it."""

import functools
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rf_callback import TraceError, UnsupportedLayerError, receptive_fields
from rf_callback.table import OUTPUT_ROW
from rf_callback.tracing.shortcuts import _shortcut, elementwise
from tests.gradient_support import assert_rows_match_gradient_support

aten = torch.ops.aten

# --------------------------------------------------------------------------------------------
# The meta-kernel shortcut answers exactly what the real meta kernel answers, strides included.
# --------------------------------------------------------------------------------------------

UNARY = [
    (aten.relu.default, ()),
    (aten.relu_.default, ()),
    (aten.hardswish.default, ()),
    (aten.hardswish_.default, ()),
    (aten.gelu_.default, ()),
    (aten.abs_.default, ()),
    (aten.threshold_.default, (0.0, 0.0)),
    (aten.sigmoid.default, ()),
    (aten.clone.default, ()),
    (aten.mul.Scalar, (2.0,)),
]
BINARY = [aten.add.Tensor, aten.mul_.Tensor, aten.sub.Tensor, aten.maximum.default]


def dense(shape, order) -> torch.Tensor:
    """A dense meta tensor of ``shape`` whose dimensions are laid out in ``order``, outermost first."""
    tensor = torch.empty([shape[d] for d in order], device="meta")
    return tensor.permute([list(order).index(d) for d in range(len(order))])


@st.composite
def meta_tensors(draw, ndim: int | None = None) -> torch.Tensor:
    """A meta tensor with small (often length-1) dimensions: contiguous, channels-last, permuted, expanded, sliced,
    or a part of a larger one (narrowed)."""
    ndim = ndim or draw(st.sampled_from([2, 3, 4, 4, 4, 5]))  # 4: where channels-last is a standard layout
    shape = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    kinds = ["contiguous", "channels_last", "channels_last", "permuted", "expanded", "sliced", "narrowed"]
    kind = draw(st.sampled_from(kinds))
    order = list(range(ndim))
    if kind in ("channels_last", "narrowed") and ndim >= 3 and (kind == "channels_last" or draw(st.booleans())):
        order = [0, *range(2, ndim), 1]
    elif kind == "permuted":
        order = draw(st.permutations(order))
    tensor = dense(shape, order)
    if kind == "expanded" and 1 in shape:
        tensor = tensor.expand([n if n > 1 else 2 for n in shape])
    elif kind == "sliced" and shape[-1] > 1:
        tensor = tensor[..., ::2]
    elif kind == "narrowed":  # a part of a larger tensor along one dim, as torch.chunk gives
        d = draw(st.integers(0, ndim - 1))
        tensor = dense([n * 2 if i == d else n for i, n in enumerate(shape)], order).narrow(d, 0, shape[d])
    return tensor


def like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def same_outputs(shortcut, real) -> None:
    shortcuts, reals = (x if isinstance(x, tuple) else (x,) for x in (shortcut, real))
    assert len(shortcuts) == len(reals)
    for a, b in zip(shortcuts, reals):
        assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)


@given(tensor=meta_tensors(), op=st.sampled_from(UNARY))
def test_elementwise_shortcuts_keep_the_real_strides(tensor, op):
    func, extra = op
    shortcut = _shortcut(func, (tensor, *extra), {})
    if shortcut is not None:
        same_outputs(shortcut, func(like(tensor), *extra))
        assert (shortcut is tensor) == func._schema.is_mutable


@given(tensor=meta_tensors(), data=st.data())
def test_clone_shortcut_honours_the_memory_format(tensor, data):
    """``x.contiguous(memory_format=torch.channels_last)`` is a clone that changes the strides."""
    formats = [torch.preserve_format, torch.contiguous_format]
    formats += {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(tensor.dim(), [])
    kwargs = {"memory_format": data.draw(st.sampled_from(formats))}
    shortcut = _shortcut(aten.clone.default, (tensor,), kwargs)
    if shortcut is not None:
        same_outputs(shortcut, aten.clone.default(like(tensor), **kwargs))


@given(tensor=meta_tensors(), func=st.sampled_from(BINARY), data=st.data())
def test_binary_shortcuts_keep_the_real_strides(tensor, func, data):
    """The other operand: the same layout, or broadcast (length 1 on some dimensions) in any layout."""
    if data.draw(st.booleans()):
        other = like(tensor)
    else:
        ones = data.draw(st.lists(st.booleans(), min_size=tensor.dim(), max_size=tensor.dim()))
        shape = [1 if one else n for one, n in zip(ones, tensor.shape)][data.draw(st.integers(0, tensor.dim() - 1)) :]
        other = dense(shape, data.draw(st.permutations(range(len(shape)))))
    operands = (tensor, other) if func._schema.is_mutable or data.draw(st.booleans()) else (other, tensor)
    shortcut = _shortcut(func, operands, {})
    if shortcut is not None:
        same_outputs(shortcut, func(*(like(t) for t in operands)))


@given(tensor=meta_tensors(), data=st.data())
def test_reduction_and_concatenation_shortcuts_keep_the_real_strides(tensor, data):
    dims = data.draw(st.lists(st.integers(0, tensor.dim() - 1), min_size=1, max_size=tensor.dim(), unique=True))
    func, keepdim = (
        data.draw(st.sampled_from([aten.mean.dim, aten.sum.dim_IntList, aten.amax.default])),
        data.draw(st.booleans()),
    )
    shortcut = _shortcut(func, (tensor, dims, keepdim), {})
    if shortcut is not None:
        same_outputs(shortcut, func(like(tensor), dims, keepdim))
    d = data.draw(st.integers(0, tensor.dim() - 1))
    longer = list(tensor.shape)
    longer[d] += 1
    orders = [sorted(range(tensor.dim()), key=lambda k: -tensor.stride()[k]), range(tensor.dim())]  # like the first
    orders += [[0, 2, 3, 1]] if tensor.dim() == 4 else []
    tensors = [tensor, dense(longer, data.draw(st.sampled_from(orders)))]
    shortcut = _shortcut(aten.cat.default, (tensors, d), {})
    if shortcut is not None:
        same_outputs(shortcut, aten.cat.default([like(t) for t in tensors], d))


@given(
    tensor=meta_tensors(ndim=4),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)),
    order=st.permutations(range(4)),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    groups=st.sampled_from([1, 1, 2]),
)
def test_convolution_and_batch_norm_shortcuts_keep_the_real_strides(tensor, kernel, order, stride, padding, groups):
    channels = tensor.shape[1]
    groups = groups if channels % groups == 0 else 1
    weight = dense((kernel[0] * groups, channels // groups, kernel[2], kernel[3]), order)
    args = (tensor, weight, None, [stride], [padding], [1], False, [0], groups)
    shortcut = _shortcut(aten.convolution.default, args, {})
    if shortcut is not None:
        same_outputs(shortcut, aten.convolution.default(like(tensor), like(weight), *args[2:]))
    stats = [torch.empty(channels, device="meta") for _ in range(4)]
    shortcut = _shortcut(aten._native_batch_norm_legit_no_training.default, (tensor, *stats, 0.1, 1e-5), {})
    if shortcut is not None:
        same_outputs(shortcut, aten._native_batch_norm_legit_no_training.default(like(tensor), *stats, 0.1, 1e-5))


def test_every_elementwise_operation_is_recognised_whatever_its_tags():
    """PyTorch tags ``hardswish`` and ``gelu_`` not pointwise; the tracer treats them as ``relu_``."""
    for func in (aten.hardswish_.default, aten.hardswish.default, aten.gelu_.default, aten.mish_.default):
        assert elementwise(func), func
    for func in (aten.convolution.default, aten.copy_.default, aten.fill_.Scalar, aten.__and__.Tensor):
        assert not elementwise(func), func
    x = torch.empty(1, 4, 8, 8, device="meta")
    assert _shortcut(aten.hardswish_.default, (x,), {}) is x


class ChannelsLastTokens(nn.Module):
    """halonet-style: a conv output made channels-last, then viewed as (N, H, W * C) tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).contiguous(memory_format=torch.channels_last)
        n, c, h, w = y.shape
        tokens = y.permute(0, 2, 3, 1).view(n, h, w * c)  # legal only on channels-last strides
        return tokens.reshape(n, h, w, c).permute(0, 3, 1, 2)


def test_a_channels_last_copy_traces_like_the_real_thing():
    model = ChannelsLastTokens()
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 8, 8)
    table = receptive_fields(model, (3, 8, 8))
    assert table["conv"].size == (3, 3)


# --------------------------------------------------------------------------------------------
# Gradient truth for the models below (tests/gradient_support.py): float64, their own random weights, no ReLU.
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Issue 15, item 3: what cannot be followed is harmless once every unit sees the whole image.
# --------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class WindowsAfterGate(nn.Module):
    """maxvit: a squeeze-excitation gate, then a window partition (a view that splits H and W) and back."""

    def __init__(self, window: int = 4):
        super().__init__()
        self.window = window
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.se = SqueezeExcite(4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.se(self.conv(x))
        n, c, h, w = x.shape
        s = self.window
        windows = x.view(n, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1).reshape(-1, s * s, c)
        windows = self.mix(windows)
        x = windows.view(n, h // s, w // s, s, s, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
        return self.head(x)


class Attention(nn.Module):
    """Single-head attention over the positions of a feature map; optional relative-position logits."""

    def __init__(self, channels: int, relative: nn.Module | None = None, inline_relative: bool = False):
        super().__init__()
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.relative = relative
        self.table = nn.Parameter(torch.randn(11, channels)) if inline_relative else None

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (N, HW, C) each
        scores = q @ k.transpose(1, 2)
        if self.relative is not None:
            scores = scores + self.relative(q.reshape(n, h, w, c))
        if self.table is not None:
            scores = scores + relative_logits(q.reshape(n, h, w, c), self.table)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, c, h, w)


def relative_logits(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """botnet's relative-position logits along the width: a pad of a flattened (positions x offsets) map."""
    n, h, w, _ = q.shape
    x = (q @ table.transpose(0, 1)).reshape(-1, w, 2 * w - 1)
    x = F.pad(F.pad(x, [0, 1]).flatten(1), [0, w - 1]).reshape(-1, w + 1, 2 * w - 1)
    x = x[:, :w, w - 1 :].reshape(n, h, 1, w, w).expand(-1, -1, h, -1, -1)
    return x.permute(0, 1, 3, 2, 4).reshape(n, h * w, h * w)


class RelativeLogits(nn.Module):
    def __init__(self, channels: int, width: int = 6):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * width - 1, channels))

    def forward(self, q):
        return relative_logits(q, self.table)


class ConvOverAttention(nn.Module):
    """efficientformerv2's talking heads: convolutions over the (queries x keys) attention map."""

    def __init__(self, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.qk = nn.Conv2d(4, 8, 1)
        self.talk = nn.Conv2d(1, 1, kernel, padding=kernel // 2)

    def forward(self, x):
        x = self.conv(x)
        q, k = self.qk(x).flatten(2).chunk(2, dim=1)  # (N, C, HW)
        attention = (q.transpose(1, 2) @ k).unsqueeze(1)  # (N, 1, HW, HW)
        return self.talk(attention).squeeze(1) @ x.flatten(2).transpose(1, 2)


class TokenPool(nn.Module):
    """nextvit: an AvgPool1d over the flattened positions (tokens) of a feature map."""

    def __init__(self, kernel: int, gate: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.se = SqueezeExcite(4) if gate else nn.Identity()
        self.pool = nn.AvgPool1d(kernel)
        self.head = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.head(self.pool(self.se(self.conv(x)).flatten(2)))


def test_a_window_view_after_a_gate_is_global():
    model = WindowsAfterGate()
    table = receptive_fields(model, (2, 8, 8))
    assert not table["conv"].is_global and table["se"].is_global
    assert all(table[name].is_global for name in ("mix", "head"))
    assert_rows_match_gradient_support(model, (2, 8, 8), ["conv", "se", "mix", "head"], reinitialize=False)


def test_a_window_view_of_local_features_is_followed_exactly():
    """Without the gate the window partition splits H and W of local features: followed as window parts."""
    model = WindowsAfterGate()
    model.se = nn.Identity()
    table = receptive_fields(model, (2, 8, 8))
    assert table["mix"].size == (3, 3) and table["mix"].tensor_shape == (4, 16, 4)
    assert (table["head"].size, table["head"].stride) == ((5, 5), (1, 1))
    assert_rows_match_gradient_support(model, (2, 8, 8), ["conv", "head"], reinitialize=False)


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_convolution_over_an_attention_map(kernel):
    """1x1: the identity on any dimension, followed exactly. 3x3: the map is already global."""
    model = ConvOverAttention(kernel)
    table = receptive_fields(model, (2, 6, 6))
    assert table["talk"].is_global and table["(output)"].is_global
    assert_rows_match_gradient_support(model, (2, 6, 6), ["conv", "talk"], reinitialize=False)


def test_a_1x1_convolution_over_tokens_keeps_their_fields():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(2), nn.Unflatten(1, (1, 4)), nn.Conv2d(1, 1, 1))
    table = receptive_fields(model, (2, 6, 6))
    assert table["3"].size == (3, 3) and table["3"].box(0, 0) == (0, 0, 2, 2)


def test_relative_position_logits_inside_attention_are_global():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), Attention(4, inline_relative=True))
    table = receptive_fields(model, (2, 6, 6))
    assert table["1"].is_global
    assert_rows_match_gradient_support(model, (2, 6, 6), ["0", "1"], reinitialize=False)


def test_relative_position_logits_of_their_own_follow_their_queries():
    """botnet's PosEmbedRel (issue 25): the skew that turns relative logits into absolute ones (a flattened
    positions x offsets map padded at its end, viewed one column narrower, sliced) leaves every logit in its
    query's row, which no layout follows through the view; followed element by element, the row is exact."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), Attention(4, relative=RelativeLogits(4)))
    table = receptive_fields(model, (2, 6, 6))
    relative = table["1.relative"]
    assert (relative.size, relative.stride, relative.output_shape) == ((3, 3), (1, 1), (6, 6))
    assert relative.box(0, 0) == (0, 0, 2, 2) and relative.tensor_shape == (1, 36, 36)
    assert table["1"].is_global
    assert assert_rows_match_gradient_support(model, (2, 6, 6), ["0", "1.relative", "1"], reinitialize=False) > 72


def test_a_pool_over_tokens_within_rows_is_a_pool_along_the_width():
    model = TokenPool(kernel=2, gate=False)
    table = receptive_fields(model, (2, 6, 6))
    assert (table["pool"].size, table["pool"].stride, table["pool"].output_shape) == ((3, 4), (1, 2), (6, 3))
    assert table["pool"].box(2, 1) == (1, 1, 4, 5)


def test_a_pool_over_tokens_across_rows_is_global_after_a_gate():
    with pytest.raises(UnsupportedLayerError, match=r"avg_pool2d.* in 'pool' \(AvgPool1d\)"):
        receptive_fields(TokenPool(kernel=4, gate=False), (2, 6, 6))
    model = TokenPool(kernel=4, gate=True)
    table = receptive_fields(model, (2, 6, 6))
    assert table["pool"].is_global and table["head"].is_global
    assert_rows_match_gradient_support(model, (2, 6, 6), ["se", "pool", "head"], reinitialize=False)


class PooledKeys(nn.Module):
    """nextvit's E-MHSA: queries at every token, keys and values from an AvgPool1d of 4 consecutive tokens of
    6-token rows (so straddling them)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.sr = nn.AvgPool1d(4)
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (N, 36, C)
        pooled = self.sr(tokens.transpose(1, 2)).transpose(1, 2)  # (N, 9, C): no grid of the image
        attention = (self.q(tokens) @ self.k(pooled).transpose(1, 2)).softmax(-1)
        return attention @ self.v(pooled)


def test_keys_pooled_across_rows_have_no_grid_but_attention_over_them_is_exact():
    """Issue 25: the pooled tokens are refused, in words; the attention that reads them all is exact (global)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), PooledKeys())
    with pytest.raises(UnsupportedLayerError, match=r"in '1\.sr' \(AvgPool1d\): .* straddle the grid's rows \(of 6"):
        receptive_fields(model, (2, 6, 6))
    table = receptive_fields(model, (2, 6, 6), strict=False)
    assert [row.name for row in table.unsupported] == ["1.sr", "1.k", "1.v"]
    assert table["1"].is_global and table["1.q"].size == (3, 3)
    assert assert_rows_match_gradient_support(model, (2, 6, 6), ["0", "1.q", "1"], strict=False) == 3 * 36


def test_an_upsampled_global_pool_is_global():
    """deeplabv3's ASPP pooling branch: pool to 1x1, resize back, concatenate with local branches."""

    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.local = nn.Conv2d(2, 2, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return torch.cat([self.local(x), pooled], dim=1)

    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), Pyramid())
    table = receptive_fields(model, (2, 8, 8))
    assert table["1"].is_global
    assert_rows_match_gradient_support(model, (2, 8, 8), ["0", "1"], reinitialize=False)


# --------------------------------------------------------------------------------------------
# Issue 15, item 4: strict=False flags whatever strict=True refuses, the top-level forward too.
# --------------------------------------------------------------------------------------------


class ConvThen(nn.Module):
    """A convolution, then ``then(x, y)`` in the model's own forward (``x`` the input, ``y`` the conv's output)."""

    def __init__(self, then, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=stride, padding=1)
        self.then = then

    def forward(self, x):
        return self.then(x, self.conv(x))


def sample(x, y):
    """A sampling grid (``grid_sample``) in the top-level forward: not followed."""
    return F.grid_sample(y, torch.zeros(1, *y.shape[-2:], 2), align_corners=False)


def unused_resize(x, y):
    F.interpolate(y, scale_factor=2.0)  # computed, never used: no receptive field depends on it
    return y


def test_strict_and_lenient_agree_on_the_top_level_forward():
    with pytest.raises(UnsupportedLayerError, match=r"aten\.grid_sampler_2d.* in the top-level forward \(ConvThen\)"):
        receptive_fields(ConvThen(sample, stride=2), (2, 8, 8))
    table = receptive_fields(ConvThen(sample, stride=2), (2, 8, 8), strict=False)
    assert list(table) == ["conv", OUTPUT_ROW]
    assert [row.name for row in table.unsupported] == [OUTPUT_ROW]
    assert table[OUTPUT_ROW].module_type == "ConvThen" and table[OUTPUT_ROW].output_shape == (4, 4)


def test_an_output_computed_in_forward_has_its_own_row():
    row = receptive_fields(ConvThen(lambda x, y: y[:, :, ::2, ::2]), (2, 8, 8))[OUTPUT_ROW]
    assert (row.size, row.stride, row.output_shape) == ((3, 3), (2, 2), (4, 4))
    assert OUTPUT_ROW not in receptive_fields(nn.Sequential(nn.Conv2d(2, 3, 3)), (2, 8, 8))


def test_an_operation_whose_result_is_unused_refuses_nothing():
    assert list(receptive_fields(ConvThen(unused_resize), (2, 8, 8))) == ["conv"]
    assert not receptive_fields(ConvThen(unused_resize), (2, 8, 8), strict=False).unsupported


# --------------------------------------------------------------------------------------------
# Issue 15, item 6: recurrent layers, and hints that blame the right thing.
# --------------------------------------------------------------------------------------------


class Sequencer(nn.Module):
    """timm's sequencer2d: recurrent layers scanning the rows and the columns of a feature map."""

    def __init__(self, recurrent=nn.LSTM, bidirectional: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.rows = recurrent(4, 3, batch_first=True, bidirectional=bidirectional)
        self.columns = recurrent(4, 3, batch_first=False, bidirectional=bidirectional)
        self.head = nn.Conv2d(6 if bidirectional else 3, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        along_w = self.rows(x.permute(0, 2, 3, 1).reshape(n * h, w, c))[0].reshape(n, h, w, -1)
        along_h = self.columns(x.permute(2, 0, 3, 1).reshape(h, n * w, c))[0].reshape(h, n, w, -1)
        return self.head((along_w + along_h.permute(1, 0, 2, 3)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("recurrent", [nn.LSTM, nn.GRU, nn.RNN])
def test_bidirectional_recurrent_layers_see_their_whole_sequence(recurrent):
    model = Sequencer(recurrent)
    table = receptive_fields(model, (2, 5, 6))
    sequence, final = table["rows:0"], table["rows:1"]  # the outputs at every step, the last hidden state
    assert (sequence.output_shape, sequence.stride) == ((5, 6), (1, 0))  # tokens (n * h, w): global along w
    assert (final.output_shape, final.stride, final.size) == ((5, 1), (1, 0), (3, 8))
    assert table["head"].is_global
    assert_rows_match_gradient_support(model, (2, 5, 6), ["conv", "head"], reinitialize=False)


def test_one_directional_recurrent_layers_are_refused_by_name():
    with pytest.raises(UnsupportedLayerError, match=r"torch\._VF\.lstm in 'rows' \(LSTM\): a one-directional"):
        receptive_fields(Sequencer(bidirectional=False), (2, 5, 6))
    table = receptive_fields(Sequencer(bidirectional=False), (2, 5, 6), strict=False)
    assert not table["rows:0"].supported and table["rows:1"].stride == (1, 0)  # the last state sees every step


def test_a_size_the_model_cannot_run_at_is_blamed_on_the_model():
    """Branches that disagree in size at odd inputs: the model's own error, not a hint about .item()."""

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.padded = nn.Conv2d(1, 1, 3, stride=2, padding=1)
            self.valid = nn.Conv2d(1, 1, 2, stride=2)

        def forward(self, x):
            return self.padded(x) + self.valid(x)

    assert receptive_fields(TwoPaths(), (1, 8, 8))["valid"].size == (2, 2)
    blame = r"TwoPaths\.forward fails on a real input of shape \(1, 1, 7, 7\) too.*RuntimeError: The size of"
    with pytest.raises(TraceError, match=blame):
        receptive_fields(TwoPaths(), (1, 7, 7))


@given(data=st.data())
def test_matrix_product_and_layer_norm_shortcuts_keep_the_real_strides(data):
    m, k, n, b = (data.draw(st.integers(1, 3)) for _ in range(4))
    batched = data.draw(st.booleans())
    left_shape, right_shape = ((b, m, k), (b, k, n)) if batched else ((m, k), (k, n))
    left, right = (dense(shape, data.draw(st.permutations(range(len(shape))))) for shape in (left_shape, right_shape))
    func = aten.bmm.default if batched else data.draw(st.sampled_from([aten.mm.default, aten.addmm.default]))
    args = (left, right)
    if func is aten.addmm.default:
        args = (torch.empty(data.draw(st.sampled_from([(n,), (m, n), (1, n)])), device="meta"), left, right)
    shortcut = _shortcut(func, args, {})
    if shortcut is not None:
        same_outputs(shortcut, func(*(like(t) for t in args)))
    tensor = data.draw(meta_tensors())
    normalized = list(tensor.shape[-data.draw(st.integers(1, tensor.dim())) :])
    shortcut = _shortcut(aten.native_layer_norm.default, (tensor, normalized, None, None, 1e-5), {})
    if shortcut is not None:
        same_outputs(shortcut, aten.native_layer_norm.default(like(tensor), normalized, None, None, 1e-5))


@given(tensor=meta_tensors(), data=st.data())
def test_view_and_contiguous_copy_shortcuts_keep_the_real_strides(tensor, data):
    shape = [tensor.numel()] if data.draw(st.booleans()) else [-1, *tensor.shape[1:]]
    shortcut = _shortcut(aten._unsafe_view.default, (tensor, shape), {})
    if shortcut is not None:
        same_outputs(shortcut, aten._unsafe_view.default(like(tensor), shape))
    shortcut = _shortcut(aten.clone.default, (tensor,), {"memory_format": torch.contiguous_format})
    if shortcut is not None:
        same_outputs(shortcut, aten.clone.default(like(tensor), memory_format=torch.contiguous_format))


# --------------------------------------------------------------------------------------------
# Issue 15, item 5: speed. Shifted copies must not multiply the branches of a field.
# --------------------------------------------------------------------------------------------


class PatchMerging(nn.Module):
    """swin: the four [::2] phases of a feature map side by side on channels (space-to-depth by slicing)."""

    def forward(self, x):
        return torch.cat([x[..., i::2, j::2] for i in (0, 1) for j in (0, 1)], dim=1)


def test_shifted_copies_fold_into_one_branch_and_stay_exact():
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), PatchMerging(), nn.Conv2d(8, 2, 1), PatchMerging(), PatchMerging()
    )
    table = receptive_fields(model, (2, 16, 16))
    assert [len(table[name].field.branches) for name in ("1", "3", "4")] == [1, 1, 1]  # 4, 16, 64 unfolded
    assert_rows_match_gradient_support(model, (2, 16, 16), ["1", "3", "4"], reinitialize=False)


class CachedIndices(nn.Module):
    """ConViT's GPSA: relative indices computed in forward when the resolution changes, kept in a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.register_buffer("indices", torch.zeros(1), persistent=False)

    def forward(self, x):
        if self.indices.shape[0] != x.shape[-1]:
            self.indices = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
            self.cached_at = x.shape[-1]
        return self.conv(x) * self.indices


def test_what_a_forward_caches_during_the_trace_is_not_kept():
    """Issue 25 (found by the zoo sweep on convit_tiny): the trace's meta buffer broke the next real forward."""
    model = CachedIndices()
    before = model.indices
    assert receptive_fields(model, (1, 6, 6))["conv"].size == (3, 3)
    assert model.indices is before and not hasattr(model, "cached_at")
    assert model(torch.rand(1, 1, 6, 6)).shape == (1, 2, 6, 6) and model.indices.device.type == "cpu"


@functools.lru_cache(maxsize=4)
def _position_offsets(length: int) -> torch.Tensor:
    """A module-level cached helper, as libraries write them: an index made from ``torch.arange``."""
    return torch.arange(length).flip(0)


def _cached_method(function):
    """transformers' ``compile_compatible_method_lru_cache``: the cache hidden in a wrapper's closure."""
    cached = functools.lru_cache(maxsize=4)(function)

    @functools.wraps(function)
    def wrapper(*args):
        return cached(*args)

    return wrapper


class CachedRelativeIndex(nn.Module):
    """HF BEiT's relative position index: a static method cached by input size, behind a wrapper."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.table = nn.Parameter(torch.randn(6))

    @staticmethod
    @_cached_method
    def index(length: int) -> torch.Tensor:
        return torch.arange(length) % 6

    def forward(self, x):
        bias = self.table[self.index(x.shape[-1])] + self.table[_position_offsets(x.shape[-1]) % 6]
        return self.conv(x) + bias


def test_what_a_cached_function_computes_during_the_trace_is_not_kept():
    """Issue 22's sweep: after a trace, HF BEiT's real outputs changed (its lru_cache kept the trace's meta index)."""
    model, image = CachedRelativeIndex(), torch.rand(1, 1, 6, 6)
    expected = model(image)  # computed and cached for width 6 on real tensors: a cache the trace must not empty
    assert receptive_fields(model, (1, 6, 6))["conv"].size == (3, 3)
    assert torch.equal(model(image), expected)
    assert receptive_fields(model, (1, 6, 8))["conv"].size == (3, 3)  # a width the caches had not seen
    assert torch.equal(model(torch.rand(1, 1, 6, 8)).isfinite(), torch.ones(1, 2, 6, 8, dtype=torch.bool))
    assert model.index(8).device.type == "cpu" and _position_offsets(8).device.type == "cpu"


class _MissingExtension:
    """MONAI's stand-in for an optional import that is not installed (``monai._C``): any attribute raises."""

    def __getattr__(self, name):
        raise ImportError(f"import monai._C (No module named 'monai._C'), asked for {name}")

    def __call__(self, *args, **kwargs):
        raise ImportError("import monai._C (No module named 'monai._C')")


class UsesOptionalExtension(nn.Module):
    """A module whose code's module holds the stand-in as a global, as ``monai.networks.layers`` does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x)


def test_a_module_global_that_raises_on_any_attribute_is_no_obstacle(monkeypatch):
    """Found by the external sweep on nine MONAI networks: looking for functools caches among the globals of the
    model's module touched MONAI's placeholder for its missing compiled extension, which raises, and the trace
    failed with "import monai._C"."""
    layers = types.ModuleType("monai_like_layers")
    layers._C = _MissingExtension()
    monkeypatch.setitem(sys.modules, layers.__name__, layers)
    monkeypatch.setattr(UsesOptionalExtension, "__module__", layers.__name__)
    assert receptive_fields(UsesOptionalExtension(), (1, 8, 8))["conv"].size == (3, 3)


class CapturesOutputs(nn.Module):
    """transformers 5's output capturing: the first forward registers hooks on the blocks that collect their outputs,
    and a flag on the model says so (SegFormer's decoder then pairs each collected stage with its projection)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 4, 3, stride=2, padding=1)])
        self.heads = nn.ModuleList([nn.Conv2d(2, 3, 1), nn.Conv2d(4, 3, 1)])

    def forward(self, x):
        if not getattr(self, "_hooks_installed", False):
            for block in self.blocks:
                block.register_forward_hook(lambda module, args, output: self.collected.append(output))
            self._hooks_installed = True
        self.collected = []
        for block in self.blocks:
            x = block(x)
        return sum(head(stage).mean((2, 3)) for stage, head in zip(self.collected, self.heads, strict=True))


def test_hooks_a_forward_registers_during_the_trace_are_not_kept():
    """Found by the external sweep on HF SegFormer: the trace removed the flag of the hooks its forward installed,
    not the hooks; the next real forward installed them again, every stage was collected twice, and the model
    failed (a model that pairs fewer outputs would have computed wrongly, silently)."""
    model, image = CapturesOutputs(), torch.rand(1, 1, 8, 8)
    assert receptive_fields(model, (1, 8, 8))["blocks.1"].size == (5, 5)
    assert not model.blocks[0]._forward_hooks and not hasattr(model, "_hooks_installed")  # the model as found
    assert len(model(image)) == 1 and len(model.collected) == 2
    assert receptive_fields(model, (1, 8, 8))["blocks.1"].size == (5, 5)  # installed before the trace: kept
    assert len(model.blocks[0]._forward_hooks) == 1 and len(model(image)) == 1 and len(model.collected) == 2


class ZigZag(nn.Module):
    """CSATv2's DCT stem: 2x2 blocks transformed by a fixed matrix, the coefficients gathered in a fixed order
    (``x[:, :, order]``, along a dimension that holds no position), then a convolution over the blocks."""

    def __init__(self):
        super().__init__()
        self.register_buffer("transform", torch.randn(4, 4), persistent=False)
        self.register_buffer("order", torch.tensor([0, 2, 1, 3]), persistent=False)
        self.conv = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        blocks = x.reshape(1, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 1, 4) @ self.transform
        coefficients = blocks[:, :, :, self.order].reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
        return self.conv(coefficients)


def test_gathering_along_channels_by_fixed_indices_is_followed():
    table = receptive_fields(ZigZag(), (1, 8, 8))
    assert (table["conv"].size, table["conv"].stride, table["conv"].output_shape) == ((6, 6), (2, 2), (4, 4))
    assert assert_rows_match_gradient_support(ZigZag(), (1, 8, 8), ["conv"], reinitialize=False) == 16
