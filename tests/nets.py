"""Random convolutional networks and their linearized twins, for property tests.

A network is built from a spec (a list of block descriptions). ``build(spec, twin=False)`` is the
real network: max pooling, ReLU, BatchNorm. ``build(spec, twin=True)`` has the same module names
and geometry but is linear with positive weights (identity activations, average pooling or a
positive dilated depthwise convolution in place of max pooling, float64), so ``d unit / d input``
is nonzero exactly on the pixels with a path to the unit: its bounding box is the true field.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

CHANNELS = 2


def _positive(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.constant_(parameter, 0.5 if parameter.dim() > 1 else 0.0)
    return module.double()


def _conv(block: dict, twin: bool) -> nn.Module:
    conv = nn.Conv2d(
        CHANNELS,
        CHANNELS,
        block["kernel"],
        stride=block["stride"],
        padding=block["padding"],
        dilation=block["dilation"],
        padding_mode=block["mode"],
    )
    return _positive(conv) if twin else conv


def _pool(block: dict, twin: bool) -> nn.Module:
    kernel, stride, padding, dilation, ceil = (block[k] for k in ("kernel", "stride", "padding", "dilation", "ceil"))
    if not twin:
        return nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    if dilation == 1:
        return nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil)
    conv = nn.Conv2d(CHANNELS, CHANNELS, kernel, stride, padding, dilation, groups=CHANNELS, bias=False)
    return _positive(conv)


class Residual(nn.Module):
    """``f(x) + skip(x)``, with a strided 1x1 convolution on the skip when the stride is not 1."""

    def __init__(self, block: dict, twin: bool) -> None:
        super().__init__()
        self.body = _conv(block, twin)
        self.act = nn.Identity() if twin else nn.ReLU()
        stride = block["stride"]
        self.skip = (
            _positive(nn.Conv2d(CHANNELS, CHANNELS, 1, stride)) if twin else nn.Conv2d(CHANNELS, CHANNELS, 1, stride)
        )

    def forward(self, x):
        return torch.add(self.act(self.body(x)), self.skip(x))


class Concat(nn.Module):
    """Two branches at the same stride with different kernels, concatenated on channels, then mixed."""

    def __init__(self, block: dict, other: dict, twin: bool) -> None:
        super().__init__()
        self.left = _conv(block, twin)
        self.right = _conv(other, twin)
        self.mix = nn.Conv2d(2 * CHANNELS, CHANNELS, 1)
        if twin:
            _positive(self.mix)

    def forward(self, x):
        return self.mix(torch.cat([self.left(x), self.right(x)], dim=1))


class Functional(nn.Module):
    """Asymmetric ``F.pad`` and a crop by slicing, called inside ``forward``."""

    def __init__(self, pad: tuple[int, int, int, int], crop: tuple[int, int]) -> None:
        super().__init__()
        self.pad, self.crop = pad, crop

    def forward(self, x):
        x = F.pad(x, self.pad)
        top, left = self.crop
        return x[:, :, top:, left:]


class Net(nn.Module):
    def __init__(self, spec: list[dict], twin: bool) -> None:
        super().__init__()
        stem = nn.Conv2d(1, CHANNELS, 1)
        self.stem = _positive(stem) if twin else stem
        self.blocks = nn.ModuleList()
        for block in spec:
            kind = block["kind"]
            if kind == "conv":
                layers = [_conv(block, twin), nn.Identity() if twin else nn.BatchNorm2d(CHANNELS)]
                layers.append(nn.Identity() if twin else nn.ReLU())
                self.blocks.append(nn.Sequential(*layers))
            elif kind == "pool":
                self.blocks.append(_pool(block, twin))
            elif kind == "residual":
                self.blocks.append(Residual(block, twin))
            elif kind == "concat":
                self.blocks.append(Concat(block, block["other"], twin))
            else:
                self.blocks.append(Functional(block["pad"], block["crop"]))
        if twin:
            self.double()

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def build(spec: list[dict], twin: bool = False) -> Net:
    return Net(spec, twin).eval()


def well_defined(net: nn.Module, images: torch.Tensor) -> bool:
    """Whether ``net`` runs on ``images`` with nonempty, finite outputs everywhere.

    A max-pooling window that lies wholly in padding yields -inf and an arbitrary argmax (it even
    differs between batch sizes), so gradients through it are not defined.
    """
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in net.modules()]
    try:
        net(images)
    except RuntimeError:
        return False
    finally:
        for handle in handles:
            handle.remove()
    return all(out.numel() > 0 and out.isfinite().all() for out in outputs)


pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))


@st.composite
def conv_blocks(draw, same: bool = False) -> dict:
    kernel = draw(
        pairs.map(lambda p: (2 * p[0] - 1, 2 * p[1] - 1)) if same else st.tuples(st.integers(1, 4), st.integers(1, 4))
    )
    dilation = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    stride = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
    half = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    if same:
        padding, mode = half, draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    else:
        padding = draw(st.sampled_from(["valid", "same", half, (0, 1), (2, 1)]))
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        if padding == "same":
            stride = (1, 1)
    return {"kind": "conv", "kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "mode": mode}


@st.composite
def blocks(draw) -> dict:
    kind = draw(st.sampled_from(["conv", "conv", "pool", "residual", "concat", "functional"]))
    if kind == "conv":
        return draw(conv_blocks())
    if kind == "pool":
        kernel = draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 2))
        return {
            "kind": "pool",
            "kernel": kernel,
            "stride": draw(st.integers(1, 3)),
            "padding": draw(st.integers(0, kernel // 2)),
            "dilation": dilation,
            "ceil": draw(st.booleans()) if dilation == 1 else False,
        }
    if kind in ("residual", "concat"):
        block = draw(conv_blocks(same=True))
        block["kind"] = kind
        if kind == "concat":
            other = draw(conv_blocks(same=True))
            other["stride"] = block["stride"]
            block["other"] = other
        return block
    return {
        "kind": "functional",
        "pad": draw(st.tuples(*[st.integers(0, 2)] * 4)),
        "crop": draw(st.tuples(st.integers(0, 1), st.integers(0, 1))),
    }


specs = st.lists(blocks(), min_size=1, max_size=5)

# Property tests that run real models: fewer examples by default, many under HYPOTHESIS_PROFILE=stress.
model_examples = settings(max_examples=1000 if os.environ.get("HYPOTHESIS_PROFILE") == "stress" else 40)
