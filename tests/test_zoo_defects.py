"""Defects found by sweeping public model zoos (issue 15), each on a minimal model written for it."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rf_callback import receptive_fields
from rf_callback.tracing import _shortcut, elementwise

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
    """A meta tensor with small (often length-1) dimensions: contiguous, channels-last, permuted, expanded, sliced."""
    ndim = ndim or draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    kind = draw(st.sampled_from(["contiguous", "channels_last", "permuted", "expanded", "sliced"]))
    order = list(range(ndim))
    if kind == "channels_last" and ndim >= 3:
        order = [0, *range(2, ndim), 1]
    elif kind == "permuted":
        order = draw(st.permutations(order))
    tensor = dense(shape, order)
    if kind == "expanded" and 1 in shape:
        tensor = tensor.expand([n if n > 1 else 2 for n in shape])
    elif kind == "sliced" and shape[-1] > 1:
        tensor = tensor[..., ::2]
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


@given(tensor=meta_tensors(), func=st.sampled_from(BINARY))
def test_binary_shortcuts_keep_the_real_strides(tensor, func):
    other = like(tensor)
    shortcut = _shortcut(func, (tensor, other), {})
    if shortcut is not None:
        same_outputs(shortcut, func(like(tensor), like(other)))


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
