"""The tracer's fast path (``rf_callback/tracing/fast.py``) answers exactly what the dispatcher's path answers."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rf_callback import receptive_fields
from rf_callback.algebra import Field
from rf_callback.tracing import Traced, Tracer, fast, flat_tensors
from rf_callback.tracing.shortcuts import _bind

aten = torch.ops.aten


def meta(*shape, channels_last=False) -> torch.Tensor:
    tensor = torch.empty(shape, device="meta")
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def weight(*shape) -> torch.Tensor:
    return nn.Parameter(torch.zeros(shape))  # as a module holds it: a CPU parameter


x, halves = meta(1, 8, 6, 6), meta(1, 16, 6, 6).chunk(2, dim=1)
CALLS = [
    (torch.conv2d, (x, weight(4, 8, 3, 3), weight(4), 2, 1), {}),
    (torch.conv2d, (x, weight(8, 1, 3, 3), None, (1, 2), [1, 0], 2, 8), {}),
    (torch.conv2d, (meta(1, 8, 6, 6, channels_last=True), weight(4, 8, 1, 1)), {}),
    (torch.conv2d, (halves[1], weight(8, 1, 3, 3), None, 1, 1, 1, 8), {}),  # a channel half (ShuffleNet)
    (torch.conv1d, (meta(1, 8, 6), weight(4, 8, 3)), {"padding": 1}),
    (F.batch_norm, (x, weight(8), weight(8)), {"weight": weight(8), "bias": weight(8), "eps": 1e-3}),
    (F.relu, (x,), {}),
    (F.relu, (halves[0],), {"inplace": True}),
    (F.hardswish, (x, True), {}),
    (F.hardsigmoid, (x,), {}),
    (F.silu, (meta(1, 8, 6, 6, channels_last=True),), {"inplace": False}),
    (F.hardtanh, (x, 0.0, 6.0, True), {}),
    (F.relu6, (x,), {}),
    (torch.sigmoid, (x,), {}),
    (torch.Tensor.sigmoid, (x,), {}),
    (torch.Tensor.add, (x, meta(1, 8, 1, 1)), {}),
    (torch.add, (x, x), {}),
    (torch.Tensor.add_, (meta(1, 8, 6, 6), x), {}),
    (torch.Tensor.mul, (x, meta(1, 8, 1, 1)), {}),
    (torch.mul, (meta(1, 8, 1, 1), x), {}),
    (torch.Tensor.mul_, (meta(1, 8, 6, 6), meta(8, 1, 1)), {}),
    (F.adaptive_avg_pool2d, (x, 1), {}),
    (F.adaptive_avg_pool2d, (x, (1, 1)), {}),
    (torch.Tensor.view, (x, 1, 2, 4, 36), {}),
    (torch.Tensor.view, (x, (1, -1)), {}),
    (torch.Tensor.reshape, (x, 1, -1), {}),
    (torch.reshape, (x, (1, 8, 36)), {}),
    (torch.flatten, (x, 1), {}),
    (torch.Tensor.flatten, (x, -3, -2), {}),
    (torch.Tensor.flatten, (x,), {}),
    (torch.transpose, (x, 1, 2), {}),
    (torch.Tensor.transpose, (x, -1, -2), {}),
    (torch.Tensor.transpose, (halves[0], 0, 1), {}),  # a view's strides, swapped
    (torch.Tensor.permute, (x, 0, 2, 3, 1), {}),
    (torch.permute, (x, (0, 2, 3, 1)), {}),
    (torch.Tensor.contiguous, (x.transpose(1, 2),), {}),
    (torch.Tensor.contiguous, (x,), {"memory_format": torch.channels_last}),
    (torch.Tensor.chunk, (x, 2), {"dim": 1}),
    (torch.chunk, (x, 3, -3), {}),
    (torch.chunk, (x.transpose(1, 2), 2, 1), {}),  # pieces of a strided view keep its strides
    (torch.Tensor.chunk, (meta(5, 2), 2), {}),
    (torch.cat, ([x, x],), {}),
    (torch.cat, ((halves[0], halves[1]), 1), {}),
    (torch.cat, (list(halves),), {"dim": -3}),
    (torch.Tensor.mean, (x, [2, 3]), {}),
    (torch.mean, (x, (-1, -2), True), {}),
    (torch.Tensor.mean, (x, 1), {}),
]


class Recorder(TorchDispatchMode):
    """Records every ATen operation it sees, with its arguments as the dispatcher passes them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def comparable(value):
    """Bound arguments with tensors replaced by their identity (tensors do not compare with ==)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, (tuple, list)):
        return [comparable(item) for item in value]
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    return value


def following(*tensors) -> Tracer:
    """A tracer that follows ``tensors`` exactly, as inputs of their own: batch and channels, then spatial axes."""
    tensors = [t for t in flat_tensors(tensors) if t.dim() >= 2]
    tracer = Tracer(tuple(tensors[0].shape[2:]))
    for tensor in tensors:
        spatial = tuple(tensor.shape[2:])
        plain = tuple(((None, n),) if n > 1 else () for n in tensor.shape[:2])
        tracer.info[tensor] = Traced(Field.of_input(spatial), plain + tuple(((a, n),) for a, n in enumerate(spatial)))
    return tracer


def layouts(out):
    return [(t.shape, t.stride(), t.dtype) for t in (out if isinstance(out, (tuple, list)) else (out,))]


def on_meta(value):
    return value.to("meta") if isinstance(value, nn.Parameter) else value


@pytest.mark.parametrize(
    ("function", "args", "kwargs"), CALLS, ids=[f"{f.__name__}-{i}" for i, (f, _, _) in enumerate(CALLS)]
)
def test_each_lowering_is_the_operation_the_dispatcher_runs(function, args, kwargs):
    """The lowering names the one ATen operation the function runs (beside factories that read no input),
    with the same arguments once bound, and the fast path's output has the real one's shape, strides and dtype."""
    real_args, real_kwargs = [on_meta(a) for a in args], {k: on_meta(v) for k, v in kwargs.items()}
    recorder = Recorder()
    with torch.no_grad(), recorder:
        real = function(*real_args, **real_kwargs)
    reads = [(func, a, k) for func, a, k in recorder.calls if not func._schema.name.startswith("aten::empty")]
    lowering = fast._LOWERINGS[function](*real_args, **real_kwargs)
    assert lowering is not None
    operation, lowered_args, lowered_kwargs = lowering
    assert [func for func, _, _ in reads] == [operation]
    assert comparable(_bind(operation, lowered_args, lowered_kwargs)) == comparable(_bind(*reads[0]))

    for tracer in (Tracer((6, 6)), following(args[0])):  # inputs not followed, and followed exactly
        with torch.no_grad():  # as in a trace: parameters stay on their device
            out = fast.run_lowered(tracer, function, (torch.Tensor,), args, kwargs)
        assert layouts(out) == layouts(real)


DECLINED = [
    (torch.conv2d, (meta(8, 6, 6), weight(4, 8, 3, 3)), {}),  # unbatched: ATen adds the batch itself
    (torch.conv2d, (meta(1, 8, 6), weight(4, 8, 3)), {}),  # conv2d of 1-D tensors fails for real
    (torch.conv2d, (x, weight(4, 8, 3, 3)), {"padding": "same"}),
    (F.batch_norm, (x, None, None), {"training": True}),
    (torch.Tensor.add, (x, 1), {}),  # a wrapped number
    (torch.add, (2, x), {}),
    (torch.Tensor.add, (x, x), {"alpha": 2}),
    (F.adaptive_avg_pool2d, (x, 2), {}),
    (F.adaptive_avg_pool2d, (meta(1, 8, 6, 6, channels_last=True), 1), {}),
    (torch.flatten, (x.transpose(2, 3), 1), {}),  # a copy, not a view
    (torch.Tensor.flatten, (x, 1, 1), {}),  # the tensor itself
    (torch.Tensor.contiguous, (x,), {}),
    (torch.Tensor.view, (x, torch.float16), {}),
    (torch.Tensor.mean, (x, [2, 3]), {"dtype": torch.float64}),
    (F.linear, (meta(1, 8), meta(4, 8)), {}),  # a weight computed from the input: the usual path follows it
    (F.linear, (meta(8), weight(4, 8)), {}),  # a vector
]


@pytest.mark.parametrize(
    ("function", "args", "kwargs"), DECLINED, ids=[f"{f.__name__}-{i}" for i, (f, _, _) in enumerate(DECLINED)]
)
def test_lowerings_decline_what_they_cannot_name_for_sure(function, args, kwargs):
    assert fast.run_lowered(Tracer((6, 6)), function, (torch.Tensor,), args, kwargs) is None


MODULES = [
    (nn.Conv2d(8, 4, 3, stride=2, padding=1), x),
    (nn.Conv2d(8, 8, (3, 1), padding=(1, 0), dilation=2, groups=8, bias=False), x),
    (nn.Conv1d(8, 4, 3, padding=1), meta(1, 8, 6)),
    (nn.Conv3d(8, 4, 1), meta(1, 8, 2, 3, 3)),
    (nn.BatchNorm2d(8), x),
    (nn.BatchNorm2d(8), meta(1, 8, 6, 6, channels_last=True)),
    (nn.BatchNorm1d(8), meta(2, 8)),
    (nn.BatchNorm1d(8, eps=1e-3, momentum=0.3), meta(1, 8, 6)),
    (nn.BatchNorm3d(8), meta(1, 8, 2, 3, 3)),
    (nn.AdaptiveAvgPool2d(1), x),
    (nn.AdaptiveAvgPool2d((1, 1)), x),
    (nn.ReLU(), x),
    (nn.ReLU(inplace=True), halves[0]),
    (nn.ReLU6(), x),
    (nn.Hardswish(inplace=True), x),
    (nn.Hardsigmoid(), x),
    (nn.SiLU(), meta(1, 8, 6, 6, channels_last=True)),
]


@pytest.mark.parametrize(
    ("module", "input"), MODULES, ids=[f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(MODULES)]
)
def test_each_module_lowering_is_the_operation_its_forward_runs(module, input):
    """As for functions: the eval-mode forward runs exactly the lowered operation, and the fast path's
    output has the real one's shape, strides and dtype."""
    module = module.eval()
    on_meta = copy.deepcopy(module).to("meta")
    recorder = Recorder()
    with torch.no_grad(), recorder:
        real = on_meta(input)
    reads = [(func, a, k) for func, a, k in recorder.calls if not func._schema.name.startswith("aten::empty")]
    lowering = fast.module_lowering(module)
    assert lowering is not None
    operation, lowered_args, lowered_kwargs = lowering(on_meta, input)
    assert [func for func, _, _ in reads] == [operation]
    assert comparable(_bind(operation, lowered_args, lowered_kwargs)) == comparable(_bind(*reads[0]))

    for tracer in (Tracer((6, 6)), following(input)):
        with torch.no_grad():
            out = fast.run_module_lowered(tracer, lowering, module, (input,), {})
        assert layouts(out) == layouts(real)


class PatchedReLU(nn.ReLU):
    pass


PATCHED = nn.ReLU()
PATCHED.forward = lambda input: input[..., ::2]  # an instance's own forward


@pytest.mark.parametrize(
    ("module", "input"),
    [
        (nn.Conv2d(8, 4, 3, padding="same"), x),
        (nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"), x),
        (nn.Conv2d(8, 4, 3), meta(8, 6, 6)),  # unbatched
        (nn.BatchNorm2d(8).train(), x),
        (nn.BatchNorm2d(8, momentum=None), x),
        (nn.BatchNorm2d(8, track_running_stats=False), x),
        (nn.BatchNorm2d(8), meta(1, 8, 6)),  # the module's own error, from its forward
        (nn.AdaptiveAvgPool2d(2), x),  # not global
        (nn.AdaptiveAvgPool2d(1), meta(1, 8, 6, 6, channels_last=True)),
    ],
    ids=[
        "same",
        "reflect",
        "unbatched",
        "training",
        "cumulative",
        "batch-statistics",
        "wrong-rank",
        "pool-2",
        "pool-cl",
    ],
)
def test_module_lowerings_decline_what_their_forward_must_run(module, input):
    lowering = fast.module_lowering(module)
    assert fast.run_module_lowered(Tracer((6, 6)), lowering, module, (input,), {}) is None


def test_only_forwards_pytorch_defines_are_lowered(monkeypatch):
    """A subclass, a forward patched on the instance or on the class: the module's own forward runs, and the
    table describes it."""
    assert fast.module_lowering(PatchedReLU()) is None and fast.module_lowering(PATCHED) is None
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), PATCHED, nn.Conv2d(1, 1, 3, padding=1))
    assert receptive_fields(net, (1, 8, 8))["2"].output_shape == (8, 4)
    monkeypatch.setattr(nn.Hardswish, "forward", lambda self, input: input[..., ::2])
    assert fast.module_lowering(nn.Hardswish()) is None
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Hardswish(), nn.Conv2d(1, 1, 3, padding=1))
    assert receptive_fields(net, (1, 8, 8))["2"].output_shape == (8, 4)


class Everything(nn.Module):
    """Each lowered function, on views, channels-last copies, constants, and downstream of a refused operation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardswish(True))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
        self.blend = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.register_buffer("scale", torch.ones(1, 8, 1, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x.contiguous(memory_format=torch.channels_last)).contiguous()
        local = x + self.scale
        left, right = local.chunk(2, dim=1)
        mixed = torch.cat([F.relu6(self.blend(local)[:, :4]), right.sigmoid()], 1)
        tokens = mixed.view(1, 2, 4, *mixed.shape[2:]).transpose(1, 2).reshape(1, 8, -1).permute(0, 2, 1)
        pooled = F.silu(tokens.flatten(1).view(1, 8, -1).mean(-1, keepdim=True), inplace=True)
        gated = x * self.gate(x)
        warped = F.grid_sample(left, torch.zeros(1, 8, 8, 2), align_corners=False)  # refused, on local features
        lower_bound = F.relu(self.blend(torch.cat([warped, warped], 1)).add_(1)) + local
        return self.head(pooled.flatten(1)), gated, lower_bound


def rows(table) -> list[tuple]:
    return [
        (key, row.module_type, row.output_shape, row.field, row.equivariant, str(row.unsupported), row.tensor_shape)
        for key, row in table.items()
    ]


def small_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=12, mlp_dim=16
    )


def small_swin():
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2]
    )


MODELS = [
    (Everything, (3, 16, 16)),
    (small_vit, (3, 32, 32)),  # nn.Linear on tokens after a class token
    (small_swin, (3, 32, 32)),  # nn.Linear on channels-last windows
    (lambda: torchvision.models.mobilenet_v3_small(), (3, 64, 64)),
    (lambda: torchvision.models.shufflenet_v2_x0_5(), (3, 64, 64)),
    (lambda: torchvision.models.efficientnet_b0(), (3, 64, 64)),
    (lambda: torchvision.models.regnet_y_400mf(), (3, 64, 64)),
]


@pytest.mark.parametrize(
    ("build", "shape"),
    MODELS,
    ids=["everything", "vit", "swin", "mobilenet_v3", "shufflenet", "efficientnet", "regnet"],
)
def test_tables_are_the_same_without_the_fast_path(build, shape, monkeypatch):
    model = build().eval()
    fast_rows = rows(receptive_fields(model, shape, strict=False))
    monkeypatch.setattr(fast, "_LOWERINGS", {})
    monkeypatch.setattr(fast, "_MODULE_LOWERINGS", {})
    assert fast_rows == rows(receptive_fields(model, shape, strict=False))


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (torchvision.models.mobilenet_v3_small, set()),
        (torchvision.models.shufflenet_v2_x0_5, {aten.max_pool2d_with_indices.default}),
    ],
    ids=["mobilenet_v3", "shufflenet"],
)
def test_a_mobile_network_reaches_the_dispatcher_only_for_its_rare_operations(build, expected, monkeypatch):
    """What the fast path is for: convolutions, BatchNorm, activations, gates, pools, channel shuffles and
    splits never pay the dispatcher, nor do the pieces a handler cuts to measure (chunk's narrowed halves)."""
    seen = set()
    dispatch = Tracer.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        seen.add(func)
        return dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(Tracer, "__torch_dispatch__", spy)
    receptive_fields(build(), (3, 64, 64))
    assert seen == {aten.empty.memory_format} | expected  # the sample
