"""Destinations used directly and through real Lightning runs, read back from what each backend wrote.

W&B runs offline in ``tmp_path`` (read back from the run's transaction log and media files), MLflow
with a local store in ``tmp_path`` (read back through ``MlflowClient``): no network, no mocks.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from rf_callback import ReceptiveFieldMonitor
from rf_callback.destinations import (
    MLflowDestination,
    PngFolderDestination,
    TensorBoardDestination,
    WandbDestination,
    mlflow_key,
)
from rf_callback.render import CARD, layer_grid, mean_image
from tests.lightning_helpers import TinyCNN, loaders, read_events, read_wandb_history

LAYERS = ["conv1", "pool", "conv2"]
TAGS = [f"receptive_field/{k:02d}_{layer}" for k, layer in enumerate(LAYERS)]
# Lightning logs an epoch's validation metrics at the index of its last training batch (the
# logger connector's step, `_batches_that_stepped` before it counts that batch); the maps go there too.
VALIDATION_STEPS = [1, 3]
STEPS = [0, *VALIDATION_STEPS]  # the baseline, then with each of two epochs of two batches
PROBES = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
GRID = tuple(layer_grid(PROBES, torch.rand(4, 16, 16), torch.zeros(4, 4), torch.zeros(4, 2), fit=CARD).shape[:0:-1])
MEAN_GRID = tuple(
    mean_image(torch.rand(16, 16), torch.tensor([2, 2, 9, 9]), torch.zeros(2), probes=4, fit=CARD).shape[:0:-1]
)
COLUMNS = ["layer", "RF size"]
ROWS = [["conv1", "3"], ["conv2", "8"]]
WEIRD = "receptive_field/layer1.0.relu[1]:0"  # a module called twice with several outputs


def image(height: int = 6, width: int = 10) -> torch.Tensor:
    return torch.arange(3 * height * width, dtype=torch.uint8).reshape(3, height, width)


def write_a_little(destination) -> None:
    destination.add_table("receptive_field/table", COLUMNS, ROWS, 0)
    destination.add_text("receptive_field/unsupported", "* up: <upsample_nearest2d> has no receptive field", 0)
    destination.add_image("receptive_field/conv1", image(), 3)
    destination.add_image(WEIRD, image(4, 8), 3)
    destination.add_scalars({"receptive_field/conv1/erf_size": 2.5, f"{WEIRD}/erf_size": 1.5}, 3)
    destination.flush()


@pytest.fixture
def wandb(monkeypatch, tmp_path):
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = pytest.importorskip("wandb", reason="W&B tests need the optional package: pip install 'rf-callback[wandb]'")
    yield wandb
    wandb.finish()


@pytest.fixture
def mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return pytest.importorskip(
        "mlflow", reason="MLflow tests need the optional package: pip install 'rf-callback[mlflow]'"
    )


def wandb_rows(run) -> tuple[Path, list[dict]]:
    """The finished offline run's folder and its history rows, each with its step as ``step``."""
    import wandb

    run_dir = Path(run.dir).parent
    run.finish()
    wandb.teardown()  # finish() returns before W&B's service has closed the run's log; teardown waits for it
    rows = read_wandb_history(run_dir)
    for row in rows:
        row["step"] = row.get("trainer/global_step", row["_step"])
    return run_dir, rows


def mlflow_images(client, run_id) -> dict[str, list[tuple[int, tuple[int, int]]]]:
    """Stepped images by key: ``[(step, (width, height)), ...]``, from the artifacts MLflow stored."""
    found: dict[str, list] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = Path(artifact.path).name
        if name.endswith(".png"):  # each also has a smaller "+compressed.webp" for the UI
            key, step = re.fullmatch(r"(.*)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", name).groups()
            local = client.download_artifacts(run_id, artifact.path)
            found.setdefault(key.replace("~", "/"), []).append((int(step), Image.open(local).size))
    return {key: sorted(values) for key, values in found.items()}


def fit(tmp_path, logger):
    seed_everything(0)
    monitor = ReceptiveFieldMonitor(LAYERS, probes=PROBES)
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=[monitor],
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyCNN(), *loaders())
    return trainer, monitor


# ---- each destination on its own --------------------------------------------------------------------------
def test_the_module_imports_without_lightning_wandb_or_mlflow():
    code = "import sys; sys.modules.update(lightning=None, wandb=None, mlflow=None); import rf_callback.destinations"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_png_folder_writes_tags_as_paths_and_scalars_as_csv(tmp_path):
    destination = PngFolderDestination(tmp_path)
    write_a_little(destination)
    assert Image.open(tmp_path / "receptive_field/conv1/step_00000003.png").size == (10, 6)
    assert Image.open(tmp_path / "receptive_field/layer1.0.relu_1__0/step_00000003.png").size == (8, 4)
    table = (tmp_path / "receptive_field/table.md").read_text()
    assert table == "| layer | RF size |\n|---|---|\n| conv1 | 3 |\n| conv2 | 8 |\n"
    assert (tmp_path / "receptive_field/unsupported.md").read_text().startswith("* up: <upsample_nearest2d>")
    with (tmp_path / "scalars.csv").open() as file:
        assert list(csv.reader(file)) == [
            ["step", "tag", "value"],
            ["3", "receptive_field/conv1/erf_size", "2.5"],
            ["3", f"{WEIRD}/erf_size", "1.5"],
        ]
    assert destination.describe() == f"PNG files under {tmp_path}"


def test_tensorboard_destination(tmp_path):
    writer = SummaryWriter(tmp_path)
    write_a_little(TensorBoardDestination(writer))
    writer.close()
    events = read_events(tmp_path)
    assert [(i.step, i.width, i.height) for i in events.Images(WEIRD)] == [(3, 8, 4)]
    assert [(s.step, s.value) for s in events.Scalars("receptive_field/conv1/erf_size")] == [(3, 2.5)]
    table = events.Tensors("receptive_field/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| conv2 | 8 |" in table
    note = events.Tensors("receptive_field/unsupported/text_summary")[0].tensor_proto.string_val[0].decode()
    assert note.startswith("* up: <upsample_nearest2d>")


def test_wandb_destination_logs_one_row_per_step_under_the_tensorboard_tags(wandb, tmp_path):
    run = wandb.init(project="rf-callback-tests")
    write_a_little(WandbDestination(run))
    assert "offline" in WandbDestination(run).describe()
    run_dir, rows = wandb_rows(run)

    assert [row["step"] for row in rows] == [0, 3]
    assert rows[0]["receptive_field/table"]["_type"] == "table-file"
    assert rows[0]["receptive_field/table"]["nrows"] == 2
    note = (run_dir / "files" / rows[0]["receptive_field/unsupported"]["path"]).read_text()
    assert "* up: &lt;upsample_nearest2d&gt;" in note
    assert rows[1]["receptive_field/conv1/erf_size"] == 2.5 and rows[1][f"{WEIRD}/erf_size"] == 1.5
    for tag, size in [("receptive_field/conv1", (10, 6)), (WEIRD, (8, 4))]:
        logged = rows[1][tag]
        assert logged["_type"] == "image-file" and (logged["width"], logged["height"]) == size
        assert Image.open(run_dir / "files" / logged["path"]).size == size


def test_mlflow_destination_keys_steps_and_artifacts(mlflow, tmp_path):
    client = mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    run_id = client.create_run(client.create_experiment("destinations")).info.run_id
    write_a_little(MLflowDestination(client, run_id))

    key = mlflow_key(WEIRD)
    assert key == "receptive_field/layer1.0.relu_1__0"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, f"{key}/erf_size")] == [(3, 1.5)]
    assert mlflow_images(client, run_id) == {"receptive_field/conv1": [(3, (10, 6))], key: [(3, (8, 4))]}
    table = Path(client.download_artifacts(run_id, "receptive_field/table.md")).read_text()
    assert table.splitlines()[-1] == "| conv2 | 8 |"
    note = Path(client.download_artifacts(run_id, "receptive_field/unsupported.md")).read_text()
    assert note.startswith("* up: <upsample_nearest2d>")


def test_mlflow_destination_falls_back_to_image_artifacts(mlflow, tmp_path):
    """MLflow before 2.12 has no stepped images: each image is an artifact whose path holds tag and step."""
    client = mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    run_id = client.create_run(client.create_experiment("old")).info.run_id
    destination = MLflowDestination(client, run_id)
    destination._stepped_images = False
    destination.add_image(WEIRD, image(), 7)
    path = client.download_artifacts(run_id, f"{mlflow_key(WEIRD)}/step_00000007.png")
    assert Image.open(path).size == (10, 6)


# ---- through Lightning's loggers ---------------------------------------------------------------------------
def test_wandb_logger_gets_maps_and_scalars_at_the_validation_steps(wandb, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="rf-callback-tests", save_dir=tmp_path, offline=True)
    fit(tmp_path, logger)
    run_dir, rows = wandb_rows(logger.experiment)

    maps = [row for row in rows if TAGS[2] in row]
    assert [row["step"] for row in maps] == STEPS
    assert [row["step"] for row in rows if "val_loss" in row] == VALIDATION_STEPS
    for row in maps:
        for tag in TAGS:
            logged = row[tag]
            assert (logged["width"], logged["height"]) == GRID
            assert Image.open(run_dir / "files" / logged["path"]).size == GRID
            assert row[f"{tag}/erf_size"] > 0
    (first,) = [row for row in rows if "receptive_field/table" in row]
    assert first["step"] == 0 and first["receptive_field/summary"]["_type"] == "image-file"
    table = json.loads((run_dir / "files" / first["receptive_field/table"]["path"]).read_text())
    assert table["columns"] == ["layer", "type", "output", "RF size", "RF min-max", "stride", "padding", "verdict"]
    assert ["conv2", "Conv2d", "8x8", "8", "8", "2", "3", ""] in table["data"]


def test_mlflow_logger_gets_maps_and_scalars_at_the_validation_steps(mlflow, tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="rf-callback-tests", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    fit(tmp_path, logger)
    client, run_id = logger.experiment, logger.run_id

    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == VALIDATION_STEPS
    for tag in TAGS:
        assert [m.step for m in client.get_metric_history(run_id, f"{tag}/erf_size")] == STEPS
    images = mlflow_images(client, run_id)
    assert images == {tag: [(step, GRID) for step in STEPS] for tag in TAGS} | {
        f"{tag}/mean": [(step, MEAN_GRID) for step in STEPS] for tag in TAGS
    } | {"receptive_field/summary": [(0, (320, 130))], "receptive_field/coverage": [(s, (320, 158)) for s in STEPS]}
    assert "| conv2 | Conv2d |" in Path(client.download_artifacts(run_id, "receptive_field/table.md")).read_text()


def test_every_logger_at_once_gets_all_it_can_hold(wandb, mlflow, tmp_path):
    """TensorBoard, W&B, MLflow and CSV in one run: same steps, same numbers, one warning."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    weights_and_biases = WandbLogger(project="rf-callback-tests", save_dir=tmp_path, offline=True)
    mlflow_logger = MLFlowLogger(experiment_name="rf-callback-tests", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    csv_logger = CSVLogger(tmp_path, name="csv")
    png = Path(csv_logger.log_dir) / "receptive_field"
    with pytest.warns(UserWarning, match="cannot hold images") as caught:
        fit(tmp_path, [tensorboard, weights_and_biases, mlflow_logger, csv_logger])
    expected = (
        f"ReceptiveFieldMonitor: CSVLogger cannot hold images, so they are written as {png}/<k>_<layer>/step_<step>.png"
        f" and the tables as {png}/<table>.md; the scalars go to CSVLogger. HINT: add a TensorBoardLogger,"
        " WandbLogger or MLFlowLogger to see the images there."
    )
    assert [str(w.message) for w in caught if "cannot hold images" in str(w.message)] == [expected]

    events = read_events(tensorboard.log_dir)
    _, rows = wandb_rows(weights_and_biases.experiment)
    client, run_id = mlflow_logger.experiment, mlflow_logger.run_id
    images = mlflow_images(client, run_id)
    csv_rows = list(csv.DictReader((Path(csv_logger.log_dir) / "metrics.csv").open()))
    for tag in TAGS:
        assert [(i.step, i.width, i.height) for i in events.Images(tag)] == [(step, *GRID) for step in STEPS]
        assert [row["step"] for row in rows if tag in row] == STEPS
        assert images[tag] == [(step, GRID) for step in STEPS]
        folder = png / tag.split("/")[1]
        assert sorted(p.name for p in folder.iterdir()) == ["mean", *(f"step_{step:08d}.png" for step in STEPS)]
        mean = f"{tag}/mean"  # the probes' mean map, everywhere at the same steps
        assert [(i.step, i.width, i.height) for i in events.Images(mean)] == [(step, *MEAN_GRID) for step in STEPS]
        assert [row["step"] for row in rows if mean in row] == STEPS
        assert images[mean] == [(step, MEAN_GRID) for step in STEPS]
        assert sorted(p.name for p in (folder / "mean").iterdir()) == [f"step_{step:08d}.png" for step in STEPS]

        scalar = f"{tag}/erf_size"
        expected = [(s.step, pytest.approx(s.value)) for s in events.Scalars(scalar)]
        assert [(row["step"], row[scalar]) for row in rows if scalar in row] == expected
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, scalar)] == expected
        assert [(int(row["step"]), float(row[scalar])) for row in csv_rows if row.get(scalar)] == expected
    assert (png / "table.md").read_text().startswith("| layer |")


class BrokenLogger(CSVLogger):
    """A custom logger that fails on the monitor's scalars: its scalars are lost, nothing else."""

    def log_metrics(self, metrics, step=None):
        if any(key.startswith("receptive_field/") for key in metrics):
            raise OSError("disk full")
        super().log_metrics(metrics, step)


def test_a_failing_logger_costs_only_its_own_scalars_and_is_named_once(tmp_path):
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    broken = BrokenLogger(tmp_path, name="broken")
    csv_logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning) as caught:
        fit(tmp_path, [broken, csv_logger, tensorboard])
    failures = [str(w.message) for w in caught if "could not" in str(w.message)]
    assert len(failures) == 1, failures  # the first failure only: it fails the same way at every pass
    assert failures[0].startswith(
        f"ReceptiveFieldMonitor could not write the ERF statistics (scalars) to BrokenLogger ({broken.log_dir});"
        " training goes on, and this is not said again while it keeps failing."
    )
    assert "OSError: disk full" in failures[0]

    # everything else landed: the other logger's scalars, the PNG files under the broken logger's folder, TensorBoard
    scalar = f"{TAGS[2]}/erf_size"
    rows = list(csv.DictReader((Path(csv_logger.log_dir) / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows if row.get(scalar)] == STEPS
    assert not any(key.startswith("receptive_field/") for key in csv.DictReader(
        (Path(broken.log_dir) / "metrics.csv").open()).fieldnames or [])  # fmt: skip
    for name in TAGS:
        folder = Path(broken.log_dir) / name
        assert sorted(p.name for p in folder.glob("*.png")) == [f"step_{step:08d}.png" for step in STEPS]
    events = read_events(tensorboard.log_dir)
    assert [i.step for i in events.Images(TAGS[2])] == STEPS
    assert [s.step for s in events.Scalars(scalar)] == STEPS
