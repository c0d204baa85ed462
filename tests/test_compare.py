"""``rf-callback compare`` on checkpoints of real (short) training runs, checked through the files it writes."""

import csv
import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn

from rf_callback import ReceptiveFieldMonitor, receptive_maps
from rf_callback.checkpoints import load_checkpoint
from rf_callback.cli import main
from rf_callback.compare import compare_checkpoints
from rf_callback.errors import CompareError
from rf_callback.export import PROBE_PIXELS
from rf_callback.render import layer_grid
from tests.lightning_helpers import TinyCNN, loaders, read_events

LAYERS = ["conv1", "pool", "conv2"]
STATS = {
    "erf_size": "size",
    "erf_size_fraction": "size_fraction",
    "erf_mass_side": "mass_side",
    "erf_mass_fraction": "mass_fraction",
    "dead_fraction": "dead_fraction",
}


class WideCNN(TinyCNN):
    """TinyCNN's conv1 and pool, a 5x5 conv2 (a wider field under the same name) and an extra conv3."""

    def __init__(self, classes: int = 4):
        super().__init__(classes)
        self.conv2 = nn.Conv2d(4, 8, 5, padding=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv1(x))))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.head(self.drop(x.mean((2, 3))))


class FlatNet(LightningModule):
    """No convolution, no pooling: nothing with a receptive field to compare."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.fc = nn.Linear(144, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(folder: Path, model: LightningModule, epochs: int, layers=LAYERS) -> list[Path]:
    """Fit with a ReceptiveFieldMonitor and keep a checkpoint after every epoch."""
    seed_everything(0)
    trainer = Trainer(
        default_root_dir=folder,
        max_epochs=epochs,
        logger=TensorBoardLogger(folder, name="run"),
        callbacks=[ReceptiveFieldMonitor(layers), ModelCheckpoint(folder / "ckpt", save_top_k=-1, every_n_epochs=1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, *loaders())
    return sorted((folder / "ckpt").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tiny = train(root / "tiny", TinyCNN(), epochs=2)
    wide = train(root / "wide", WideCNN(), epochs=1, layers=[*LAYERS, "conv3"])
    trainer = Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FlatNet(), loaders()[0])
    trainer.save_checkpoint(root / "flat.ckpt")
    return {"tiny": tiny, "wide": wide[0], "flat": root / "flat.ckpt", "root": root}


def stored(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["callbacks"]
    return next(value for key, value in state.items() if key.startswith("ReceptiveFieldMonitor"))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_tables_hold_the_statistics_of_the_loaded_models_on_the_stored_probes(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", *map(str, runs["tiny"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "erf.csv", "erf.md", "erf_size.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    rows = read_csv(out / "erf.csv")
    labels = ["epoch=0-step=4", "epoch=1-step=8"]
    assert [(r["layer"], r["checkpoint"], r["epoch"], r["step"]) for r in rows] == [
        (layer, label, label[6], label[-1]) for layer in LAYERS for label in labels
    ]
    assert [(r["rf_size"], r["rf_stride"]) for r in rows[::2]] == [("3", "1"), ("4", "2"), ("8", "2")]
    for k, path in enumerate(runs["tiny"]):
        model = TinyCNN.load_from_checkpoint(path, map_location="cpu")
        expected = receptive_maps(model, stored(path)["probes"], LAYERS).erf.mean()
        for index, layer in enumerate(LAYERS):
            row = rows[2 * index + k]
            for tag, key in STATS.items():
                assert float(row[tag]) == pytest.approx(float(expected[key][index]), rel=1e-6, abs=1e-9), (layer, tag)

    console = capsys.readouterr().out
    assert "4 probes (stored by ReceptiveFieldMonitor in epoch=0-step=4)" in console
    size = f"{float(rows[-1]['erf_size']):.2f}"
    assert any(
        line.split()[:2] == ["conv2", "epoch=1-step=8"] and size in line.split() for line in console.splitlines()
    )
    markdown = (out / "erf.md").read_text()
    assert "| layer | checkpoint | epoch | step | model | RF size | stride | ERF size |" in markdown
    assert f"| conv2 | epoch=1-step=8 | 1 | 8 (TB 7) | TinyCNN | 8 | 2 | {size} |" in markdown
    assert "Layers not compared" not in markdown


def find(image: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) where ``patch`` (h, w, 3) sits in ``image`` exactly."""
    h, w = patch.shape[:2]
    middle = patch[h // 2].tobytes()
    hits = []
    for y in range(image.shape[0] - h + 1):
        line = image[y + h // 2].tobytes()
        start = line.find(middle)
        while start != -1:
            x = start // 3
            if start % 3 == 0 and np.array_equal(image[y : y + h, x : x + w], patch):
                hits.append((y, x))
            start = line.find(middle, start + 1)
    return hits


def test_figure_holds_every_probe_grid_in_its_row_and_column(runs, tmp_path):
    layers = ["conv1", "conv2"]
    assert main(["compare", *map(str, runs["tiny"]), "--layers", *layers, "--out", str(tmp_path / "two")]) == 0
    figure = np.asarray(Image.open(tmp_path / "two" / "comparison.png").convert("RGB"))
    positions = {}
    for k, path in enumerate(runs["tiny"]):
        model = TinyCNN.load_from_checkpoint(path, map_location="cpu")
        probes = stored(path)["probes"]
        result = receptive_maps(model, probes, layers)
        for index, layer in enumerate(layers):
            maps, boxes, centers = result.maps[:, index], result.boxes[:, index], result.centers[:, index]
            labels = stored(path)["labels"]  # the class names the callback stored, under the probes
            grid = layer_grid(probes, maps, boxes, centers, labels=labels, tile=PROBE_PIXELS, nrow=5)
            hits = find(figure, grid.permute(1, 2, 0).numpy())
            assert len(hits) == 1, (k, layer, hits)
            positions[k, index] = hits[0]
    (y00, x00), (y01, x01), (y10, x10), (y11, x11) = (positions[k, i] for k in (0, 1) for i in (0, 1))
    assert x00 == x01 < x10 == x11 and y00 == y10 < y01 == y11  # columns: checkpoints; rows: layers

    # A column more per checkpoint, a row more per layer.
    three = [*map(str, runs["tiny"]), str(runs["tiny"][1])]
    assert main(["compare", *three, "--layers", *layers, "--out", str(tmp_path / "columns")]) == 0
    assert main(["compare", *map(str, runs["tiny"]), "--layers", *LAYERS, "--out", str(tmp_path / "rows")]) == 0
    width, height = Image.open(tmp_path / "two" / "comparison.png").size
    assert Image.open(tmp_path / "columns" / "comparison.png").size == (width + x10 - x00, height)
    assert Image.open(tmp_path / "rows" / "comparison.png").size == (width, height + y01 - y00)
    assert x10 - x00 > grid.shape[2] and y01 - y00 > grid.shape[1]
    chart = Image.open(tmp_path / "two" / "erf_size.png")
    assert chart.size[0] >= 600 and chart.size[1] >= 400


def test_checkpoints_name_the_step_tensorboard_shows_their_maps_at(runs, tmp_path, capsys):
    # Lightning logs an epoch's validation at the index of its last batch, one below the global step a
    # checkpoint saved after it holds: the callback's state says where its maps of that state are.
    events = read_events(runs["root"] / "tiny" / "run" / "version_0")
    map_steps = [image.step for image in events.Images("receptive_field/00_conv1")][1:]  # after the baseline
    assert map_steps == [s.step for s in events.Scalars("val_acc")] == [3, 7]
    loaded = [load_checkpoint(path) for path in runs["tiny"]]
    assert [(c.step, c.logged_step) for c in loaded] == [(4, 3), (8, 7)]
    assert loaded[0].when == "epoch 0, step 4 (TensorBoard step 3)"
    out = tmp_path / "out"
    assert main(["compare", *map(str, runs["tiny"]), "--out", str(out)]) == 0
    assert [r["logged_step"] for r in read_csv(out / "erf.csv")[:2]] == ["3", "7"]
    printed = capsys.readouterr().out
    assert "4 (TB 3)" in printed and "8 (TB 7)" in printed


def test_max_logit_is_a_unit_the_command_line_takes(runs, tmp_path):
    out = tmp_path / "out"
    assert main(["compare", str(runs["tiny"][1]), "--unit", "max_logit", "--out", str(out)]) == 0
    assert "max_logit unit, summed over channels" in (out / "erf.md").read_text()


def test_tensorboard_run_has_one_step_per_checkpoint(runs, tmp_path):
    out, board = tmp_path / "out", tmp_path / "board"
    assert main(["compare", *map(str, runs["tiny"]), "--out", str(out), "--tensorboard", str(board)]) == 0
    events = read_events(board)
    rows = read_csv(out / "erf.csv")
    for index, layer in enumerate(LAYERS):
        images = events.Images(f"receptive_field/{index:02d}_{layer}")
        assert [image.step for image in images] == [0, 1]
        picture = Image.open(io.BytesIO(images[0].encoded_image_string))
        assert picture.size == (images[0].width, images[0].height)
        for tag in STATS:
            scalars = events.Scalars(f"receptive_field/{index:02d}_{layer}/{tag}")
            assert [s.step for s in scalars] == [0, 1]
            csv_values = [float(rows[2 * index + k][tag]) for k in (0, 1)]
            assert [s.value for s in scalars] == pytest.approx(csv_values, rel=1e-6)
    assert "receptive_field/comparison/text_summary" in events.Tags()["tensors"]


def test_two_architectures_compare_the_layers_they_share(runs, tmp_path, capsys):
    tiny, wide = runs["tiny"][1], runs["wide"]
    out = tmp_path / "out"
    assert main(["compare", str(tiny), str(wide), "--out", str(out)]) == 0
    rows = read_csv(out / "erf.csv")
    assert sorted({r["layer"] for r in rows}) == sorted(LAYERS)
    conv2 = {r["model"]: (r["rf_size"], r["rf_stride"]) for r in rows if r["layer"] == "conv2"}
    assert conv2 == {"TinyCNN": ("8", "2"), "WideCNN": ("12", "2")}  # each checkpoint's own field
    note = "conv3: missing from epoch=1-step=8; only in epoch=0-step=4"
    assert note in capsys.readouterr().out
    markdown = (out / "erf.md").read_text()
    assert "Layers not compared (not in every checkpoint):" in markdown and f"* {note}" in markdown
    assert "tests.test_compare.WideCNN" in markdown

    # The same file names in two runs: labels take the folder names too.
    twins = [runs["tiny"][0], runs["wide"]]  # both epoch=0-step=4.ckpt
    comparison = compare_checkpoints(twins, layers=["conv1"])
    assert [c.label for c in comparison.checkpoints] == ["tiny/ckpt/epoch=0-step=4", "wide/ckpt/epoch=0-step=4"]


def test_probes_from_a_file(runs, tmp_path, capsys):
    probes = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.save(probes, tmp_path / "probes.pt")
    out = tmp_path / "out"
    argv = ["compare", str(runs["tiny"][0]), "--probes", str(tmp_path / "probes.pt"), "--unit", "1,2", "--out"]
    assert main([*argv, str(out)]) == 0
    model = TinyCNN.load_from_checkpoint(runs["tiny"][0], map_location="cpu")
    expected = receptive_maps(model, probes, LAYERS, unit=(1, 2)).erf.mean()
    assert [float(r["erf_size"]) for r in read_csv(out / "erf.csv")] == pytest.approx(expected["size"].tolist())
    assert f"3 probes (from {tmp_path / 'probes.pt'})" in capsys.readouterr().out


def test_without_stored_probes_the_error_says_how_to_give_them(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompareError, match=r"^flat holds no ReceptiveFieldMonitor probes.*HINT: --probes FILE"):
        compare_checkpoints([runs["flat"]], model_class=FlatNet)
    assert list(tmp_path.iterdir()) == []


def bad_inputs(runs, tmp_path):
    """(name, argv, message) of every input the command must refuse in one line."""
    first = runs["tiny"][0]
    contents = torch.load(first, weights_only=True)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    weights = tmp_path / "weights.pt"
    torch.save(contents["state_dict"], weights)
    renamed = tmp_path / "renamed.ckpt"
    key = next(k for k in contents["callbacks"] if k.startswith("ReceptiveFieldMonitor"))
    contents["callbacks"][key]["model_class"] = "no_such_package.models.Net"
    torch.save(contents, renamed)
    torch.save(torch.rand(2, 1, 12, 12), tmp_path / "probes.pt")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "taken").write_text("a file where --out should go")
    return [
        ("missing", [tmp_path / "nope.ckpt"], "nope.ckpt: no such file"),
        ("folder", [tmp_path / "a_folder"], "a_folder: is a folder, not a checkpoint file"),
        ("truncated", [truncated], "truncated.ckpt: cannot be read as a checkpoint"),
        ("text", [text], "notes.ckpt: cannot be read as a checkpoint"),
        ("state dict", [weights], "weights.pt: not a Lightning checkpoint: it holds a dict with keys conv1.weight"),
        (
            "class gone",
            [renamed],
            "it names its model class 'no_such_package.models.Net', from a module that is not imported here",
        ),
        ("class gone, imported", [renamed, "--import-class"], "its model class 'no_such_package.models.Net' cannot be"),
        ("--model gone", [first, "--model", "no_such_package:Net"], "cannot import 'no_such_package:Net'"),
        (
            "wrong --model",
            [first, "--model", "tests.test_compare:FlatNet"],
            "cannot rebuild tests.test_compare.FlatNet",
        ),
        ("no class", [runs["flat"]], "flat.ckpt: does not name its model class"),
        (
            "no spatial layer",
            [runs["flat"], "--model", "tests.test_compare:FlatNet", "--probes", tmp_path / "probes.pt"],
            "flat (FlatNet) has no convolution or pooling layer with a receptive field: there is nothing to compare",
        ),
        (
            "layer",
            [first, "--layers", "conv9"],
            (
                "layer 'conv9' is no layer in epoch=0-step=4 (TinyCNN). Layers that can be compared: conv1, bn,"
                " pool, conv2, drop, head."
            ),
        ),
        ("layer elsewhere", [runs["tiny"][1], runs["wide"], "--layers", "conv3"], "'conv3' is no layer in epoch=1"),
        ("unit", [first, "--unit", "middle"], "--unit middle: choose center (or centre), max, max_logit or a unit"),
        ("unit outside", [first, "--unit", "40,0"], "unit=(40, 0): layer 'conv1' has an output of"),
        ("out is a file", [first, "--out", tmp_path / "taken"], "taken' is a file; the comparison needs a folder"),
        ("out in a file", [first, "--out", tmp_path / "taken" / "out"], "cannot write the comparison to"),
    ]


CASES = [
    "missing",
    "folder",
    "truncated",
    "text",
    "state dict",
    "class gone",
    "class gone, imported",
    "--model gone",
    "wrong --model",
    "no class",
    "no spatial layer",
    "layer",
    "layer elsewhere",
    "unit",
    "unit outside",
    "out is a file",
    "out in a file",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_no_files(runs, tmp_path, capsys, case):
    _name, argv, message = next(c for c in bad_inputs(runs, tmp_path) if c[0] == case)
    before = sorted(tmp_path.iterdir())
    out = [] if "--out" in argv else ["--out", tmp_path / "out"]
    assert main(["compare", *map(str, argv), *map(str, out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("rf-callback compare: error: ") and captured.err.count("\n") == 1
    assert message in captured.err, captured.err
    assert sorted(tmp_path.iterdir()) == before  # no --out, no staging folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_one_line(runs, tmp_path, capsys):
    locked = tmp_path / "locked.ckpt"
    locked.write_bytes(runs["tiny"][0].read_bytes())
    locked.chmod(0)
    assert main(["compare", str(locked), "--out", str(tmp_path / "out")]) == 2
    assert "locked.ckpt: cannot be read as a checkpoint (PermissionError" in capsys.readouterr().err


def test_python_dash_m_reports_a_broken_checkpoint_in_one_line(runs, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(runs["tiny"][0].read_bytes()[:1000])
    completed = subprocess.run(
        [sys.executable, "-m", "rf_callback", "compare", str(runs["tiny"][0]), str(broken), "--out", tmp_path / "out"]
        + ["--model", "tests.lightning_helpers:TinyCNN"],
        check=False,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "broken.ckpt: cannot be read as a checkpoint" in completed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ckpt"]


def test_labels_are_built_one_way_and_changes_are_measured_from_the_first(runs, tmp_path):
    comparison = compare_checkpoints([*runs["tiny"], runs["wide"]], layers=["conv1"])
    assert [c.label for c in comparison.checkpoints] == [
        "tiny/ckpt/epoch=0-step=4",
        "tiny/ckpt/epoch=1-step=8",
        "wide/ckpt/epoch=0-step=4",
    ]
    rows = comparison.records()
    assert rows[0]["erf_size_change"] == 0.0
    assert rows[1]["erf_size_change"] == pytest.approx(rows[1]["erf_size"] - rows[0]["erf_size"])
    assert "change" in comparison.format_table().splitlines()[0]


def damaged_copy(path: Path, into: Path, tensor: torch.Tensor) -> Path:
    """A copy of the checkpoint with up to 4 KiB overwritten inside the stored bytes of ``tensor`` (a bad disk)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if archive.read(i) == tensor.numpy().tobytes())
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)  # the local file header
    start = member.header_offset + 30 + name_length + extra_length  # torch.save stores records uncompressed
    end = start + min(4096, member.file_size)
    data[start:end] = bytes(reversed(data[start:end]))
    into.write_bytes(bytes(data))
    return into


def test_a_damaged_checkpoint_is_refused_in_one_line(runs, tmp_path, capsys):
    first = runs["tiny"][0]
    damaged = damaged_copy(first, tmp_path / "damaged.ckpt", stored(first)["probes"])
    assert not torch.equal(stored(damaged)["probes"], stored(first)["probes"])  # torch.load alone does not notice
    assert main(["compare", str(damaged), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"rf-callback compare: error: {damaged}: is damaged: the checksum of '") and err.count("\n") == 1
    )
    assert "does not match its bytes" in err
    # the same file given as probes
    assert main(["compare", str(first), "--probes", str(damaged), "--out", str(tmp_path / "out")]) == 2
    assert f"probes {damaged}: is damaged" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.ckpt"]


def test_a_checkpoint_never_chooses_the_code_that_runs(runs, tmp_path):
    """A checkpoint naming a module next to it: refused without importing it, unless the user allows it."""
    (tmp_path / "planted.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran.txt').write_text('planted code ran')\n"
        "from tests.lightning_helpers import TinyCNN as Model\n"
    )
    contents = torch.load(runs["tiny"][0], weights_only=True)
    key = next(k for k in contents["callbacks"] if k.startswith("ReceptiveFieldMonitor"))
    contents["callbacks"][key]["model_class"] = "planted.Model"
    torch.save(contents, tmp_path / "planted.ckpt")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(tmp_path)])}

    def compare(*options: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "rf_callback", "compare", "planted.ckpt", "--out", "out", *options]
        return subprocess.run(
            argv, check=False, capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300
        )

    refused = compare()
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "it names its model class 'planted.Model', from a module that is not imported here" in refused.stderr
    assert "HINT: name the class yourself: --model planted.Model" in refused.stderr
    assert not (tmp_path / "ran.txt").exists()
    with pytest.raises(CompareError, match="from a module that is not imported here"):
        compare_checkpoints([tmp_path / "planted.ckpt"])
    assert not (tmp_path / "ran.txt").exists()

    named = compare("--model", "tests.lightning_helpers:TinyCNN")  # the user names the class: the file's is unused
    assert named.returncode == 0, named.stderr
    assert not (tmp_path / "ran.txt").exists()
    allowed = compare("--import-class")  # the user allows importing the module the checkpoint names
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "ran.txt").read_text() == "planted code ran"


def test_a_class_already_imported_needs_no_permission(runs):
    """In the process that trained it (or a notebook that imported it), the named class is found, not imported."""
    comparison = compare_checkpoints(runs["tiny"][:1])
    assert comparison.checkpoints[0].model_class == "tests.lightning_helpers.TinyCNN"


class Planted:
    """A pickled object whose unpickling would write a file: what a crafted checkpoint could hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickled code ran"))


def test_a_crafted_pickle_is_refused_and_runs_nothing(runs, tmp_path, capsys):
    contents = torch.load(runs["tiny"][0], weights_only=True)
    contents["hyper_parameters"] = {"planted": Planted(tmp_path / "ran.txt")}
    torch.save(contents, tmp_path / "crafted.ckpt")  # a valid archive: its checksums match
    crafted = str(tmp_path / "crafted.ckpt")
    for argv in ([crafted], [str(runs["tiny"][0]), "--probes", crafted]):
        assert main(["compare", *argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "crafted.ckpt" in err and "cannot be read" in err and err.count("\n") == 1
    assert not (tmp_path / "ran.txt").exists()
