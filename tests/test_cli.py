"""The ``rf-callback table`` command line, run as users run it."""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rf_callback.cli import main


def test_table_for_people(capsys):
    assert main(["table", "torchvision.models.vgg16", "--input-shape", "3", "224", "224"]) == 0
    lines = capsys.readouterr().out.splitlines()
    columns = ["layer", "type", "output", "RF size", "RF min-max", "stride", "padding", "verdict"]
    assert [cell.strip() for cell in re.split(r"\s{2,}", lines[0])] == columns
    assert lines[1].split() == ["features", "Sequential", "7x7", "212", "212", "32", "90"]
    assert "whole image" in next(line for line in lines if line.startswith("classifier "))


def test_table_as_json_for_programs():
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "rf_callback",
            "table",
            "torchvision.models:resnet18",
            "--input-shape",
            "3",
            "64",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(completed.stdout)
    assert report["input_shape"] == [3, 64, 64]
    layer4 = next(row for row in report["layers"] if row["name"] == "layer4")
    assert (layer4["size"], layer4["stride"], layer4["padding"], layer4["output_shape"]) == (
        [435, 435],
        [32, 32],
        [217, 217],
        [2, 2],
    )


class Warped(nn.Module):
    """A convolution, then a sampling grid: ``grid_sample`` has no receptive field."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.grid_sample(self.conv(x), torch.zeros(1, 8, 8, 2), align_corners=False)


def test_unsupported_layers_are_flagged_in_the_table(capsys):
    assert main(["table", "tests.test_cli.Warped", "--input-shape", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "Unsupported:" in out and "grid_sampler_2d" in out
    assert main(["table", "tests.test_cli.Warped", "--input-shape", "3", "32", "32", "--strict"]) == 2
    assert "grid_sampler_2d" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("torchvision.models.nope", "module 'torchvision.models' has no attribute 'nope'."),
        (
            "torchvision.models.resnet19",
            (
                "cannot import 'torchvision.models.resnet19': module 'torchvision.models' has no attribute 'resnet19'."
                " Did you mean: resnet18,"
            ),
        ),
        ("torchvision.modelz.resnet18", "module 'torchvision' has no attribute 'modelz'. Did you mean: models?"),
        (
            "resnet19",
            (
                "cannot import 'resnet19': there is no module 'resnet19' here. HINT: give the full path,"
                " package.module.Name (e.g. torchvision.models.resnet18)"
            ),
        ),
        ("no_such_package.Model", "cannot import 'no_such_package.Model': there is no module 'no_such_package' here."),
        ("torch.nn..Conv2d", "cannot import 'torch.nn..Conv2d': not a Python name."),
        ("json.decoder", "is not a model class or factory"),
        ("collections.OrderedDict", "is not a model class or factory"),
        ("torch.nn.Conv2d", "cannot build 'torch.nn.Conv2d' with no arguments: TypeError"),
        ("math.sqrt", "cannot build 'math.sqrt' with no arguments"),
        ("builtins.dict", "is not a model class or factory"),
    ],
)
def test_bad_models_fail_with_one_line(capsys, model, message):
    assert main(["table", model, "--input-shape", "3", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["torchvision.models.resnet18", "--input-shape", "3"], "--input-shape 3: give C H W"),
        (["torchvision.models.resnet18", "--input-shape", "1", "3", "32", "32", "8"], "give C H W"),
        (
            ["torchvision.models.resnet18", "--input-shape", "1", "32", "32"],
            (
                "ResNet takes 3 input channels (its first layer, 'conv1', is a Conv2d with in_channels=3), the input"
                " (1, 1, 32, 32) has 1"
            ),
        ),
        (["torchvision.models.resnet18", "--input-shape", "3", "32", "32", "--kwargs", "oops"], "write key=value"),
    ],
)
def test_bad_shapes_and_arguments_fail_with_one_line(capsys, argv, message):
    assert main(["table", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def names_printed(out: str) -> list[str]:
    """The row names of a printed table (a blank line, then the verdicts' legend and the cost, follow it)."""
    return [line.split()[0] for line in out.split("\n\n")[0].splitlines()[1:]]


def test_factory_keyword_arguments_and_row_filters(capsys):
    argv = ["table", "torchvision.models.resnet18", "--input-shape", "3", "64", "64", "--kwargs", "num_classes=7"]
    assert main([*argv, "--json", "--all"]) == 0
    every = json.loads(capsys.readouterr().out)["layers"]
    layer4 = [row["name"] for row in every if row["name"].startswith("layer4")]
    assert main([*argv, "--types", "Conv2d"]) == 0
    rows = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]  # the verdicts' legend follows
    assert rows and all(" Conv2d " in row for row in rows)
    assert main([*argv, "--layers", "layer4*"]) == 0
    shown = names_printed(capsys.readouterr().out)
    hidden = {"BatchNorm2d", "ReLU"}
    assert shown == [row["name"] for row in every if row["name"] in layer4 and row["type"] not in hidden]
    # --all shows the hidden rows of the filter, not every row (the README's example)
    assert main([*argv, "--layers", "layer4*", "--all"]) == 0
    assert names_printed(capsys.readouterr().out) == layer4
    assert main([*argv, "--layers", "layer4*", "--types", "Conv2d", "BatchNorm2d", "--all"]) == 0
    assert names_printed(capsys.readouterr().out) == [
        row["name"] for row in every if row["name"] in layer4 and row["type"] in ("Conv2d", "BatchNorm2d")
    ]
    # a module called twice: its name matches every call
    assert main([*argv, "--layers", "layer1.0.relu", "--all"]) == 0
    assert names_printed(capsys.readouterr().out) == ["layer1.0.relu[0]", "layer1.0.relu[1]"]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (["--layers", "nope"], "--layers nope: no layer matches. HINT: names are model.named_modules() paths"),
        (["--layers", "layer4.0.conv"], "--layers layer4.0.conv: no layer matches. Did you mean: layer4.0.conv2,"),
        (["--layers", "layer4*", "nope"], "--layers nope: no layer matches."),
        (["--types", "conv2d"], "--types conv2d: no layer of that type. Did you mean: Conv2d? Types here: Conv2d,"),
        (["--layers", "layer4*", "--types", "MaxPool2d"], "--layers layer4* --types MaxPool2d: no layer matches both"),
        (["--layers", "layer4.0.relu"], "--layers layer4.0.relu: matches only rows hidden by default (ReLU: they"),
    ],
)
def test_a_filter_that_matches_nothing_is_an_error_with_close_matches(capsys, filters, message):
    assert main(["table", "torchvision.models.resnet18", "--input-shape", "3", "64", "64", *filters]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"rf-callback table: error: {message}"), captured.err
    assert captured.err.count("\n") == 1


def test_a_model_next_to_the_working_directory_is_importable(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n\nclass Net(nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["table", "mynet.Net", "--input-shape", "1", "16", "16"]) == 0
    assert "Conv2d" in capsys.readouterr().out
    assert main(["table", "mynet.Nett", "--input-shape", "1", "16", "16"]) == 2
    assert capsys.readouterr().err == (
        "rf-callback table: error: cannot import 'mynet.Nett': module 'mynet' has no attribute 'Nett'. Did you mean:"
        " Net?\n"
    )
    assert main(["table", "mynet:Nett", "--input-shape", "1", "16", "16"]) == 2
    assert "module 'mynet' has no attribute 'Nett'. Did you mean: Net?" in capsys.readouterr().err
