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
        ("torchvision.models.nope", "module 'torchvision.models' has no attribute 'nope'"),
        ("no_such_package.Model", "cannot import 'no_such_package.Model': No module named"),
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
        (["torchvision.models.resnet18", "--input-shape", "1", "32", "32"], "ResNet.forward fails on a real input"),
        (["torchvision.models.resnet18", "--input-shape", "3", "32", "32", "--kwargs", "oops"], "write key=value"),
    ],
)
def test_bad_shapes_and_arguments_fail_with_one_line(capsys, argv, message):
    assert main(["table", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_factory_keyword_arguments_and_row_filters(capsys):
    argv = ["table", "torchvision.models.resnet18", "--input-shape", "3", "64", "64", "--kwargs", "num_classes=7"]
    assert main([*argv, "--types", "Conv2d"]) == 0
    rows = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]  # the verdicts' legend follows
    assert rows and all(" Conv2d " in row for row in rows)
    assert main([*argv, "--layers", "layer4*"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "layer3" not in out and "BatchNorm2d" not in out  # elementwise rows hidden
    assert main([*argv, "--layers", "layer4*", "--all"]) == 0
    assert "BatchNorm2d" in capsys.readouterr().out


def test_a_model_next_to_the_working_directory_is_importable(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n\nclass Net(nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["table", "mynet.Net", "--input-shape", "1", "16", "16"]) == 0
    assert "Conv2d" in capsys.readouterr().out
