"""The smallest and largest field over paths, and the unproductive layers they predict (Richter et al. 2021).

Checked three ways: against an independent enumeration of every path of random branching networks
(Distill's formula per path, no algebra), against the gradient support of their twins with the
longer branches switched off, and against the numbers RFA-Toolbox (Richter's own tool) prints for
published architectures.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math

import torch
import torchvision
from hypothesis import given, reject
from hypothesis import strategies as st
from torch import nn

from rf_callback import receptive_fields
from tests.gradient_support import support
from tests.lightning_helpers import TinyCNN, loaders, read_events
from tests.nets import build, model_examples, specs, well_defined


# ---- an independent enumeration of paths --------------------------------------------------------
def _pair(value, dilation=(1, 1)):
    value = (value, value) if isinstance(value, int) else value
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    return tuple(value), tuple(dilation)


def _conv_step(block: dict) -> tuple[tuple[int, int], ...]:
    """Per axis (dilated kernel, stride) of a spec's convolution."""
    kernel, dilation = _pair(block["kernel"], block["dilation"])
    stride, _ = _pair(block["stride"])
    return tuple((d * (k - 1) + 1, s) for k, d, s in zip(kernel, dilation, stride))


def block_choices(block: dict) -> list[list[tuple[tuple[int, int], ...]]]:
    """The ways through one block of a spec, each a list of per-axis (dilated kernel, stride) steps."""
    one = ((1, 1), (1, 1))
    kind = block["kind"]
    if kind == "conv":
        return [[_conv_step(block)]]
    if kind == "pool":
        k, s, d = block["kernel"], block["stride"], block["dilation"]
        return [[((d * (k - 1) + 1, s),) * 2]]
    if kind == "residual":
        stride, _ = _pair(block["stride"])
        return [[_conv_step(block)], [((1, stride[0]), (1, stride[1]))]]  # the body, or the 1x1 shortcut
    if kind == "concat":
        return [[_conv_step(block), one], [_conv_step(block["other"]), one]]  # either branch, then the 1x1 mix
    return [[one]]  # F.pad and a crop: no growth


def distill_size(steps) -> tuple[int, int]:
    """Distill's r = 1 + sum (k_l - 1) prod_{i<l} s_i, per axis, of one path."""
    sizes = []
    for axis in range(2):
        size, jump = 1, 1
        for step in steps:
            kernel, stride = step[axis]
            size, jump = size + (kernel - 1) * jump, jump * stride
        sizes.append(size)
    return tuple(sizes)


def enumerated(spec: list[dict]) -> list[tuple[list[int], tuple[tuple[int, int], ...]]]:
    """For each block output, the sizes of every path from the input (and the choice of each)."""
    result = []
    for end in range(1, len(spec) + 1):
        options = [range(len(block_choices(block))) for block in spec[:end]]
        paths = []
        for choice in itertools.product(*options):
            steps = [step for block, c in zip(spec, choice) for step in block_choices(block)[c]]
            paths.append((list(choice), distill_size(steps)))
        result.append(paths)
    return result


@model_examples
@given(spec=specs, height=st.integers(5, 18), width=st.integers(5, 18))
def test_smallest_and_largest_field_equal_every_path_enumerated(spec, height, width):
    if not well_defined(build(spec), torch.zeros(1, 1, height, width)):
        reject()  # the spec does not fit this image size
    table = receptive_fields(build(spec), (1, height, width))
    for k, paths in enumerate(enumerated(spec)):
        sizes = [size for _, size in paths]
        row = table[f"blocks.{k}"]
        assert row.min_size == tuple(min(s[a] for s in sizes) for a in range(2)), (k, spec)
        assert row.max_size == tuple(max(s[a] for s in sizes) for a in range(2)), (k, spec)
        assert all(low <= high <= size for low, high, size in zip(row.min_size, row.max_size, row.size))


def _switched_off(spec: list[dict], choice: list[int]) -> tuple[nn.Module, list[dict]]:
    """The linearized twin of ``spec`` with the branches ``choice`` does not take zeroed, and that one path's spec."""
    twin = build(spec, twin=True)
    path = []
    for block, module, c in zip(spec, twin.blocks, choice):
        if block["kind"] == "residual":
            skip = {"kind": "conv", "kernel": (1, 1), "stride": block["stride"], "padding": 0, "dilation": (1, 1)}
            path.append({**block, "kind": "conv"} if c == 0 else {**skip, "mode": "zeros"})
            off = module.skip if c == 0 else module.body
        elif block["kind"] == "concat":
            path.append({**(block if c == 0 else block["other"]), "kind": "conv"})  # (then a 1x1 mix)
            off = module.right if c == 0 else module.left
        else:
            path.append(block)
            continue
        with torch.no_grad():
            for parameter in off.parameters():
                parameter.zero_()
    return twin, path


@model_examples
@given(spec=specs, size=st.integers(12, 30), axis=st.integers(0, 1))
def test_the_smallest_field_is_the_gradient_support_of_the_shortest_path(spec, size, axis):
    """On the twin with the longer branches switched off, a unit's gradient spans exactly ``min_size`` along ``axis``."""
    if not any(block["kind"] in ("residual", "concat") for block in spec):
        reject()
    if not well_defined(build(spec), torch.zeros(1, 1, size, size)):
        reject()
    row = receptive_fields(build(spec), (1, size, size))[f"blocks.{len(spec) - 1}"]
    choice, sizes = min(enumerated(spec)[-1], key=lambda path: path[1][axis])
    assert sizes[axis] == row.min_size[axis]
    twin, path_spec = _switched_off(spec, choice)
    alone = receptive_fields(build(path_spec), (1, size, size))[f"blocks.{len(spec) - 1}"]
    assert alone.size == alone.min_size == alone.max_size == sizes  # one path: its size is Distill's
    h, w = alone.output_shape
    inside = [  # units whose every tap along ``axis`` reads the image (exact box = analytic box), seeing something
        (i, j)
        for i in range(h)
        for j in range(w)
        if alone.box(i, j, clip=False)[axis::2] == (exact := alone.box(i, j))[axis::2]
        and exact[0] < exact[2]
        and exact[1] < exact[3]
    ]
    if not inside:
        reject()  # every unit's field reaches padding (or pixels a crop dropped) on that axis
    outputs = {}
    hook = twin.blocks[-1].register_forward_hook(lambda m, a, out: outputs.__setitem__("last", out))
    image = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    twin(image)
    hook.remove()
    i, j = inside[len(inside) // 2]
    box = support(outputs["last"][0, :, i, j].sum(), image)
    assert box[axis + 2] - box[axis] == row.min_size[axis], (spec, choice)


# ---- published architectures --------------------------------------------------------------------
# RFA-Toolbox's own figures (github.com/MLRichter/receptive_field_analysis_toolbox, images/resnet18.png,
# images/vgg16.PNG, which shows a VGG-19, and images/alexnet.PNG), r(min) and r(max) of each layer.
RFA_RESNET18 = {
    "conv1": (7, 7), "maxpool": (11, 11),
    "layer1.0.conv1": (19, 19), "layer1.0.conv2": (27, 27), "layer1.0": (11, 27),
    "layer1.1.conv1": (19, 35), "layer1.1.conv2": (27, 43), "layer1.1": (11, 43),
    "layer2.0.conv1": (19, 51), "layer2.0.conv2": (35, 67), "layer2.0.downsample.0": (11, 43), "layer2.0": (11, 67),
    "layer2.1.conv1": (27, 83), "layer2.1.conv2": (43, 99), "layer2.1": (11, 99),
    "layer3.0.conv1": (27, 115), "layer3.0.conv2": (59, 147), "layer3.0.downsample.0": (11, 99), "layer3.0": (11, 147),
    "layer3.1.conv1": (43, 179), "layer3.1.conv2": (75, 211), "layer3.1": (11, 211),
    "layer4.0.conv1": (43, 243), "layer4.0.conv2": (107, 307), "layer4.0.downsample.0": (11, 211), "layer4.0": (11, 307),
    "layer4.1.conv1": (75, 371), "layer4.1.conv2": (139, 435), "layer4.1": (11, 435),
}  # fmt: skip
RFA_VGG19 = [3, 5, 6, 10, 14, 16, 24, 32, 40, 48, 52, 68, 84, 100, 116, 124, 156, 188, 220, 252, 268]
RFA_ALEXNET = [11, 11, 19, 51, 51, 67, 99, 99, 131, 131, 163, 163, 195]


def test_resnet18_at_32_pixels_matches_rfa_toolbox_and_names_its_unproductive_convolutions():
    table = receptive_fields(torchvision.models.resnet18(), (3, 32, 32))
    assert {name: (table[name].min_size[0], table[name].max_size[0]) for name in RFA_RESNET18} == RFA_RESNET18
    assert all(row.min_size[0] == row.min_size[1] for row in table.values())
    convolutions = [name for name in table.unproductive() if table[name].module_type == "Conv2d"]
    assert convolutions == ["layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv2"]  # their inputs cover 32 px too
    # The border: the last layers to add context on their shortest path; each BatchNorm shares its convolution's.
    assert [name for name in table.with_verdict("border") if table[name].module_type == "Conv2d"] == [
        "layer2.0.conv2", "layer2.1.conv2", "layer3.0.conv2", "layer3.1.conv1", "layer4.0.conv1", "layer4.1.conv1",
    ]  # fmt: skip
    assert table["layer4.0.bn2"].verdict == "unproductive" and table["layer2.0.bn2"].verdict == "border"
    # A residual sum's shortest path is the identity shortcut: 11 px, so the blocks themselves stay productive.
    assert table["layer4"].verdict == "critical" and table["fc"].min_size == (11, 11)
    assert table["fc"].verdict == "global"  # the head: every path mixed everything; the rule does not judge it


def test_resnet50_at_32_pixels_has_no_unproductive_layer():
    """Each bottleneck's 3x3 convolution reads a 1x1 convolution of the block input, whose shortest path is the
    shortcut: by the rule, none is unproductive at 32 px (ResNet-18's second 3x3 convolutions are)."""
    model = torchvision.models.resnet50()
    table = receptive_fields(model, (3, 32, 32))
    assert list(table.unproductive()) == []
    # An independent enumeration of the 2^16 paths through its blocks (Distill's formula per path).
    stages = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            body = [(1, 1), (3, block.conv2.stride[0]), (1, 1)]
            shortcut = [(1, block.downsample[0].stride[0])] if block.downsample is not None else []
            stages.append((body, shortcut))
    sizes = set()
    for choice in itertools.product((0, 1), repeat=len(stages)):
        size, jump = 1, 1
        steps = [(7, 2), (3, 2)] + [step for (body, skip), c in zip(stages, choice) for step in (body, skip)[c]]
        for kernel, stride in steps:
            size, jump = size + (kernel - 1) * jump, jump * stride
        sizes.add(size)
    assert table["layer4"].min_size == (min(sizes),) * 2 and table["layer4"].max_size == (max(sizes),) * 2


def test_vgg19_and_alexnet_match_rfa_toolbox():
    vgg = receptive_fields(torchvision.models.vgg19(), (3, 32, 32), strict=False)  # its 1 -> 7 average pool: refused
    layers = [name for name, row in vgg.items() if name.startswith("features.") and row.module_type != "ReLU"]
    assert [vgg[name].min_size[0] for name in layers] == RFA_VGG19
    verdicts = [vgg[name].verdict for name in layers]
    assert verdicts == ["productive"] * 7 + ["border"] + ["unproductive"] * 13  # 32 px reached by features.12
    # torchvision's AlexNet cannot run at 32 px (its last pooling has no window left); its fields do not depend on it.
    alexnet = receptive_fields(torchvision.models.alexnet(), (3, 224, 224))
    assert [alexnet[f"features.{k}"].min_size[0] for k in range(13)] == RFA_ALEXNET


# ---- the graph: residual shortcuts, dense concatenations, U-Net skips ---------------------------------
def test_densenet_judges_each_layer_by_what_its_concatenation_reads():
    table = receptive_fields(torchvision.models.densenet121(), (3, 32, 32))
    block4 = [name for name in table if name.startswith("features.denseblock4.")]
    verdicts = {name: table[name].verdict for name in block4}
    # Its first layer's BatchNorm, ReLU and 1x1 convolution pass on the transition's field: they share its verdict.
    passed = [name for name in block4 if table[name].field is table["features.transition3.pool"].field]
    assert passed == [f"features.denseblock4.denselayer1.{m}" for m in ("norm1", "relu1", "conv1", "norm2", "relu2")]
    assert {verdicts[name] for name in passed} == {table["features.transition3.pool"].verdict} == {"border"}
    assert {verdict for name, verdict in verdicts.items() if name not in passed} == {"unproductive"}
    # In block 3 the concatenation still holds the 23-px transition output: every layer is productive.
    block3 = [name for name in table if name.startswith("features.denseblock3.") and name.endswith("conv2")]
    assert {table[name].verdict for name in block3} == {"border"}
    assert table["features.denseblock3.denselayer24.conv1"].min_size == (23, 23)


def test_unet_decoder_after_a_skip_is_productive_again():
    from tests.test_upsampling import UNet

    table = receptive_fields(UNet(), (1, 16, 16))
    assert table["bottom.1"].verdict == "border" and table["up2"].verdict == "unproductive"
    assert table["dec2.0"].min_size == (12, 12) and table["dec1.0"].min_size == (5, 5)  # the skips' shortest paths
    assert {table[name].verdict for name in ("dec2.0", "dec1.0", "head")} == {"critical"}  # not unproductive


def test_a_non_square_input_is_judged_on_every_axis():
    net = nn.Sequential(*(nn.Conv2d(1, 1, 5, padding=2) for _ in range(4)))
    table = receptive_fields(net, (1, 8, 32))
    assert [table[k].min_size for k in table] == [(5, 5), (9, 9), (13, 13), (17, 17)]
    assert [table[k].verdict for k in table] == ["productive"] * 4  # the height is covered, the width is not
    square = receptive_fields(net, (1, 8, 8))
    assert [row.verdict for row in square.values()] == ["productive", "border", "unproductive", "unproductive"]


def test_a_single_path_network_has_min_and_max_equal_to_its_size():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2, padding=2), nn.MaxPool2d(2), nn.Conv2d(2, 2, (3, 5), padding=1))
    for row in receptive_fields(net, (1, 20, 24)).values():
        assert row.min_size == row.max_size == row.size


def test_records_and_the_printed_table_carry_the_verdicts():
    table = receptive_fields(torchvision.models.resnet18(), (3, 32, 32))
    record = table["layer4.0.conv2"].to_record()
    assert (record["min_size"], record["max_size"], record["verdict"]) == ([107, 107], [307, 307], "unproductive")
    text = str(table.filter(layers=["layer3.1.conv1", "layer4.0.conv2"]))
    assert "43-179" in text and "unproductive" in text and "border" in text
    assert "unproductive: its shortest path and its inputs' already cover the input" in text
    assert math.prod(table["layer4.0.conv2"].output_shape) == 1 and table["layer4.0.conv2"].is_global


# ---- what they cost, on the command line, in the monitor and the callback -------------------------
def test_multiply_adds_equal_pytorchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from rf_callback.cost import unproductive_cost

    up = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1))
    for model, shape in [(torchvision.models.resnet18(), (3, 32, 32)), (up, (1, 17, 23))]:
        cost = unproductive_cost(model, receptive_fields(model, shape))
        with FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, *shape))
        assert 2 * cost.total_macs == counter.get_total_flops()  # a multiply-add is two operations
    model = torchvision.models.resnet18()
    cost = unproductive_cost(model, receptive_fields(model, (3, 32, 32)))
    weights = sum(model.get_submodule(f"{name}.{kind}").weight.numel() for name in ("layer3.1", "layer4.0", "layer4.1")
                  for kind in ("conv2", "bn2"))  # fmt: skip
    assert cost.parameters == weights + sum(
        model.get_submodule(f"{n}.bn2").bias.numel() for n in ("layer3.1", "layer4.0", "layer4.1")
    )
    assert cost.layers == ("layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv2")


def test_an_unproductive_layer_without_weights_is_named_not_denied():
    """Found in review: a pooling past the border holds no parameters and no multiply-adds, and the sentence said
    that no layer was unproductive, naming that very pooling as the widest path."""
    from rf_callback.cost import unproductive_cost

    net = nn.Sequential(nn.Conv2d(1, 1, 5, padding=2), nn.Conv2d(1, 1, 5, padding=2), nn.MaxPool2d(3, 1, 1), nn.ReLU())
    cost = unproductive_cost(net, receptive_fields(net, (1, 8, 8)))
    assert cost.layers == () and cost.unproductive == ("2",)
    assert cost.describe().startswith("At 8x8, 1 layer is unproductive") and "): 2. It holds 0 of 52" in cost.describe()


def test_the_command_line_shows_the_unproductive_layers_of_resnet18_at_32_pixels(capsys):
    from rf_callback.cli import main

    argv = ["table", "torchvision.models.resnet18", "--input-shape", "3", "32", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    marked = [line.split()[0] for line in out.splitlines() if line.endswith(" unproductive")]
    assert marked == ["layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv2"]  # BatchNorm rows are hidden by default
    assert "At 32x32, 3 layers are unproductive" in out and "(45.4%)" in out
    assert main([*argv, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    row = next(r for r in document["layers"] if r["name"] == "layer4.1.conv2")
    assert (row["min_size"], row["max_size"], row["verdict"]) == ([139, 139], [435, 435], "unproductive")
    assert document["unproductive"]["layers"] == marked and document["total"]["parameters"] == 11689512
    assert main([*argv, "--csv", "--types", "Conv2d"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["name"]: r["verdict"] for r in rows}["layer3.1.conv1"] == "border"
    assert rows[0] == {**rows[0], "name": "conv1", "min_size": "7x7", "max_size": "7x7", "stride": "2x2"}


class DeepTinyCNN(TinyCNN):
    """TinyCNN (12x12 inputs) with four 5x5 convolutions: the third covers the input, the fourth adds nothing."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(1 if k == 0 else 4, 4, 5, padding=2) for k in range(4)))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.convs(x).mean((2, 3)))


def test_the_callback_names_the_unproductive_layers_at_setup_and_charts_the_border_each_epoch(tmp_path, caplog):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from rf_callback import ReceptiveFieldMonitor

    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    callback = ReceptiveFieldMonitor()
    trainer = Trainer(
        default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[callback], max_epochs=2,
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(DeepTinyCNN(), *loaders())
    assert callback.monitor.layers == ["convs.0", "convs.1", "convs.2", "convs.3", "convs"]  # the border: 2 | 3
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ReceptiveFieldMonitor: At ")]
    assert line.startswith("ReceptiveFieldMonitor: At 12x12, 1 layer is unproductive") and "): convs.3." in line
    events = read_events(trainer.logger.log_dir)
    text = events.Tensors("receptive_field/unproductive/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("At 12x12, 1 layer is unproductive") and "| convs.3 | Conv2d |" in text
    assert [image.step for image in events.Images("receptive_field/coverage")] == [0, 3, 7]  # baseline, each epoch


def test_default_layers_add_both_sides_of_the_border_and_nothing_where_none_is_unproductive():
    from rf_callback.demos import SmallCNN
    from rf_callback.selection import border_layers, default_layers

    table = receptive_fields(torchvision.models.resnet18(), (3, 32, 32))
    assert border_layers(table) == ["layer3.1.conv1", "layer3.1.conv2"]
    assert default_layers(table) == ["relu", "layer1", "layer2", "layer3.1.conv1", "layer3.1.conv2", "layer3"]
    demo = receptive_fields(SmallCNN(), (1, 28, 28))
    assert border_layers(demo) == [] and default_layers(demo) == ["features.relu2", "features.relu4", "features.pool2"]
