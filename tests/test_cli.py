"""The ``rf-callback table`` command line, run as users run it."""

import json
import subprocess
import sys

import pytest

from rf_callback.cli import main


def test_table_for_people(capsys):
    assert main(["table", "torchvision.models.vgg16", "--input-shape", "3", "224", "224"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "RF", "size", "stride", "padding"]
    assert lines[1].split() == ["features", "Sequential", "7x7", "212", "32", "90"]
    assert "global" in next(line for line in lines if line.startswith("classifier "))


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


def test_unsupported_layers_are_flagged_in_the_table(capsys):
    assert main(["table", "torchvision.models.vit_b_16", "--input-shape", "3", "224", "224"]) == 0
    out = capsys.readouterr().out
    assert "conv_proj" in out and "Unsupported:" in out and "concatenates along a spatial axis" in out
    assert main(["table", "torchvision.models.vit_b_16", "--input-shape", "3", "224", "224", "--strict"]) == 2
    assert "concatenates along a spatial axis" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("torchvision.models.nope", "module 'torchvision.models' has no attribute 'nope'"),
        ("no_such_package.Model", "cannot import module 'no_such_package'"),
        ("json.decoder", "is not a model class or factory"),
        ("collections.OrderedDict", "returned a OrderedDict, not a torch.nn.Module"),
    ],
)
def test_bad_models_fail_with_one_line(capsys, model, message):
    assert main(["table", model, "--input-shape", "3", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
