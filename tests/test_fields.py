"""receptive_fields on real models: known answers, gradient-support parity and hygiene."""

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, reject
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as module_globals

from rf_callback import LayerRF, TraceError, UnsupportedLayerError, receptive_fields
from tests.nets import build, specs, well_defined


def geometry(row: LayerRF) -> tuple:
    return row.size, row.stride, row.padding


def test_three_same_convolutions_see_nine_pixels():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2))
    table = receptive_fields(net, (1, 32, 32))
    assert [geometry(table[name]) for name in "012"] == [
        ((3, 3), (1, 1), (1, 1)),
        ((5, 5), (1, 1), (2, 2)),
        ((9, 9), (1, 1), (4, 4)),
    ]
    assert table["2"].box(16, 16) == (12, 12, 21, 21)
    assert table["2"].box(0, 31) == (0, 27, 5, 32)
    assert table["2"].box(0, 31, clip=False) == (-4, 27, 5, 36)


def test_published_values():
    """VGG16 after its last pool: 212 / 32 / 90 (Araujo et al., Distill 2019). AlexNet pool5: 195 / 32."""
    with torch.device("meta"):  # no weights are initialised: tracing never computes
        vgg, alexnet = torchvision.models.vgg16(), torchvision.models.alexnet()
    assert geometry(receptive_fields(vgg, (3, 224, 224))["features"]) == ((212, 212), (32, 32), (90, 90))
    assert geometry(receptive_fields(alexnet, (3, 224, 224))["features"]) == ((195, 195), (32, 32), (66, 66))


def test_torchvision_resnets_by_hand():
    """Unrolled by stage (stem conv 7 / 2 and pool 3 / 2 give 11 at stride 4):

    resnet18 layer4 size: 11 + 4*8 + (2*4 + 3*16) + (2*8 + 3*32) + (2*16 + 3*64) = 435,
    padding: 3 + 1*2 + 4*4 + (4 + 3*8) + (8 + 3*16) + (16 + 3*32) = 217 (centred: (435 - 1) / 2).
    resnet50 (one 3x3 per bottleneck): 11 + 3*8 + (2*4 + 3*16) + (2*8 + 5*32) + (2*16 + 2*64) = 427.
    """
    with torch.device("meta"):
        resnet18, resnet50 = torchvision.models.resnet18(), torchvision.models.resnet50()
    table = receptive_fields(resnet18, (3, 224, 224))
    assert geometry(table["layer4"]) == ((435, 435), (32, 32), (217, 217))
    table = receptive_fields(resnet50, (3, 224, 224))
    assert geometry(table["maxpool"]) == ((11, 11), (4, 4), (5, 5))
    assert geometry(table["layer1"]) == ((35, 35), (4, 4), (17, 17))
    assert geometry(table["layer4"]) == ((427, 427), (32, 32), (213, 213))
    assert table["fc"].is_global and table["fc"].box(0, 0) == (0, 0, 224, 224)


def test_a_module_called_twice_is_never_merged():
    """torchvision's Bottleneck calls one ReLU three times; each call is its own row."""
    with torch.device("meta"):
        resnet50 = torchvision.models.resnet50()
    table = receptive_fields(resnet50, (3, 224, 224))
    assert [table[f"layer1.0.relu[{k}]"].size for k in range(3)] == [(11, 11), (19, 19), (19, 19)]
    with pytest.raises(KeyError, match=r"called 3 times .*layer1\.0\.relu\[0\], layer1\.0\.relu\[1\]"):
        table["layer1.0.relu"]


class FunctionalNet(nn.Module):
    """Every operation is a functional call inside forward; only the weights are modules' parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.w2 = nn.Parameter(torch.randn(4, 4, 5, 5))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = F.relu(F.conv2d(x, self.w1, padding=1))  # 3, stride 1
        b = F.max_pool2d(a, 2)  # 4, stride 2
        c = F.conv2d(b, self.w2, padding="same")  # 4 + 4*2 = 12
        d = torch.add(c, b) + b  # residual: hull of 12 and 4 → 12
        return self.head(torch.cat([d, F.avg_pool2d(F.pad(b, (1, 1, 1, 1)), 3, 1)], dim=1))


def test_functional_operations_inside_forward():
    table = receptive_fields(FunctionalNet(), (1, 16, 16))
    assert geometry(table["head"]) == ((12, 12), (2, 2), (5, 5))
    assert table["head"].output_shape == (8, 8)
    assert table["head"].box(0, 0) == (0, 0, 7, 7)


class Misaligned(nn.Module):
    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(1, 1, 3, stride=2, padding=1)

    def forward(self, x):
        return self.strided(x) + x[:, :, 4:12, 4:12]


def test_misaligned_branches_raise_naming_the_merge():
    with pytest.raises(UnsupportedLayerError, match=r"aten\.add\.Tensor in the top-level forward .*strides \(2, 1\)"):
        receptive_fields(Misaligned(), (1, 16, 16))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.conv(x)
        tokens = x.flatten(2).transpose(1, 2)
        return self.attention(tokens, tokens, tokens, need_weights=False)[0]


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 10)), "2"),
        (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)), "1"),
        (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)), "1"),
        (Attention(), "attention"),
    ],
    ids=["flatten-linear", "global-pool", "group-norm", "attention"],
)
def test_layers_mixing_all_positions_are_global(model, name):
    row = receptive_fields(model, (1, 12, 12))[name]
    assert row.is_global
    assert row.stride == (0, 0)
    assert row.box(0, 0) == (0, 0, 12, 12)


class Decoder(nn.Module):
    def __init__(self, up: nn.Module):
        super().__init__()
        self.encode = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = up
        self.decode = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.decode(self.up(self.encode(x)))


class GridSample(nn.Module):
    def forward(self, x):
        return F.grid_sample(x, torch.zeros(1, 8, 8, 2), align_corners=False)


class Gathered(nn.Module):
    """Columns gathered in an order of the model's own (an index tensor): which column goes where is data."""

    def forward(self, x):
        return x[..., torch.tensor([3, 1, 2, 0, 7, 5, 6, 4])]


@pytest.mark.parametrize(
    ("up", "operation"),
    [
        (GridSample(), "aten.grid_sampler_2d"),
        (Gathered(), "aten.index"),
    ],
    ids=["grid-sample", "gather"],
)
def test_unsupported_layers_are_named_never_guessed(up, operation):
    with pytest.raises(
        UnsupportedLayerError,
        match=rf"{operation}.* in 'up' \((GridSample|Gathered)\)",
    ):
        receptive_fields(Decoder(up), (1, 16, 16))
    table = receptive_fields(Decoder(up), (1, 16, 16), strict=False)
    assert table["encode"].size == (3, 3)
    assert not table["up"].supported and not table["decode"].supported
    assert re.match(operation, table.unsupported[0].unsupported.operation)
    with pytest.raises(UnsupportedLayerError):
        _ = table["decode"].size


def test_one_dimensional_models():
    net = nn.Sequential(
        nn.Conv1d(2, 4, 5, stride=2, padding=2), nn.MaxPool1d(3, 2, 1), nn.Conv1d(4, 4, 3, dilation=4, padding="same")
    )
    table = receptive_fields(net, (2, 64))
    # 5 at stride 2, pool: 5 + 2*2 = 9 at stride 4, dilated 3 (effective 9): 9 + 8*4 = 41; padding 2 + 2 + 4*4
    assert geometry(table["2"]) == ((41,), (4,), (20,))
    assert table["2"].box(0) == (0, 21)
    assert table["2"].center(8) == (32.0,)


@given(spec=specs, height=st.integers(5, 18), width=st.integers(5, 18))
def test_boxes_equal_the_support_of_the_gradient(spec, height, width):
    """On a linearized twin the bounding box of nonzero d unit / d input is exactly ``box``."""
    real, twin = build(spec), build(spec, twin=True)
    if not well_defined(real, torch.zeros(1, 1, height, width)):
        reject()  # the spec does not fit this image size
    table = receptive_fields(real, (1, height, width))
    assert {name: geometry(row) for name, row in table.items()} == {
        name: geometry(row) for name, row in receptive_fields(twin, (1, height, width)).items()
    }
    outputs = {}
    hooks = [
        block.register_forward_hook(lambda m, a, out, k=k: outputs.__setitem__(f"blocks.{k}", out))
        for k, block in enumerate(twin.blocks)
    ]
    image = torch.rand(1, 1, height, width, dtype=torch.float64, requires_grad=True)
    twin(image)
    for hook in hooks:
        hook.remove()
    for name, output in outputs.items():
        h, w = output.shape[2:]
        units = {
            (0, 0),
            (0, w - 1),
            (h - 1, 0),
            (h - 1, w - 1),
            (0, w // 2),
            (h // 2, 0),
            (h - 1, w // 2),
            (h // 2, w // 2),
        }
        for i, j in units:
            (grad,) = torch.autograd.grad(output[0, :, i, j].sum(), image, retain_graph=True)
            rows, cols = grad[0, 0].nonzero(as_tuple=True)
            top, left, bottom, right = table[name].box(i, j)
            if rows.numel() == 0:
                assert top == bottom or left == right, (name, i, j)
            else:
                found = (rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1)
                assert (top, left, bottom, right) == found, (name, (i, j), spec)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_the_model_is_left_as_found():
    model = Hooked()
    model.train()
    model.features[1].eval()
    seen = []
    model.features.register_forward_hook(lambda *args: seen.append("user hook"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    model.features[0].weight.requires_grad_(False)

    global_hooks = (dict(module_globals._global_forward_pre_hooks), dict(module_globals._global_forward_hooks))
    patched = model.features[2].forward  # a forward some library set on the instance stays the instance's
    model.features[2].forward = patched

    receptive_fields(model, (1, 8, 8))

    assert (module_globals._global_forward_pre_hooks, module_globals._global_forward_hooks) == global_hooks
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(state[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == [0, 1, 0, 0, 0, 0]
    assert not model.features[0].weight.requires_grad and model.head.weight.requires_grad
    assert seen == ["user hook"]  # the user's hook ran once, on the meta tensors
    assert [m for m in model.modules() if "forward" in vars(m)] == [model.features[2]]
    assert vars(model.features[2])["forward"] is patched


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_scripted_submodule_is_traced_and_left_as_found():
    """TorchScript modules take no hooks and hold their compiled forward in the instance: the trace wraps and
    restores it like any other (their own children run inside TorchScript, so they have no rows)."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU())))
    forwards = [vars(m).get("forward") for m in net.modules()]
    table = receptive_fields(net, (1, 16, 16))
    assert list(table.keys()) == ["0", "1"] and table["1"].size == (5, 5)
    assert [vars(m).get("forward") for m in net.modules()] == forwards


def test_a_module_whose_own_hook_replaces_its_output_gets_the_replacement():
    """The table describes what the model's forward sees, after the user's hooks: here every other column."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    model[0].register_forward_hook(lambda module, args, output: output[..., ::2])
    table = receptive_fields(model, (1, 8, 8))
    assert geometry(table["0"]) == ((3, 3), (1, 2), (1, 1))
    assert geometry(table["1"]) == ((5, 7), (1, 2), (2, 3))


def test_a_forward_that_reads_values_fails_clearly():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(1, 1, 3), DataDependent())
    with pytest.raises(TraceError, match=r"Sequential\.forward on the meta device.*must not read tensor values"):
        receptive_fields(model, (1, 8, 8))
    assert not any("forward" in vars(m) for m in model.modules())  # the trace's wrappers are gone


def test_wrappers_are_unwrapped_and_shapes_validated():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert receptive_fields(torch.compile(net), (3, 8, 8))["0"].size == (3, 3)
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\).*got \(8, 8, -1\)"):
        receptive_fields(net, (8, 8, -1))
