"""What a run of ``configs/wandb_mlflow.yaml`` left in TensorBoard, W&B and MLflow, read back from their files.

    python train.py --config configs/wandb_mlflow.yaml --trainer.max_epochs 2
    python docs/destinations_readback.py [lightning_logs]

Prints, for the newest run of each, the receptive-field images (key, size, steps), the ERF scalars,
the validation accuracy's steps and the table: the listing in docs/destinations.md.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.lightning_helpers import read_events, read_wandb_history


def newest(paths) -> Path:
    return max(paths, key=lambda path: path.stat().st_mtime)


def steps(values) -> str:
    return ", ".join(str(step) for step in sorted(set(values)))


def show(images: dict, scalars: dict, validation: list, table: str) -> None:
    """images: key -> [(step, (w, h))]; scalars: key -> [step]; the same layout for every backend."""
    for key, logged in sorted(images.items()):
        sizes = {f"{w}x{h}" for _, (w, h) in logged}
        print(f"  image   {key:<40} {', '.join(sorted(sizes)):>8} px   steps {steps(s for s, _ in logged)}")
    by_stat = defaultdict(list)
    for key, logged in scalars.items():
        by_stat[key.rsplit("/", 1)[-1]].append(logged)  # receptive_field/<k>_<layer>/<statistic>
    for stat, runs in sorted(by_stat.items()):
        print(
            f"  scalar  receptive_field/<k>_<layer>/{stat:<18} x{len(runs)} layers   steps {steps(s for r in runs for s in r)}"
        )
    print(f"  scalar  {'val_acc':<40} {'':>11}   steps {steps(validation)}")
    print(f"  table   {table}")


def tensorboard(root: Path) -> None:
    log_dir = newest(root.glob("small_cnn/version_*"))
    events = read_events(log_dir)
    print(f"TensorBoard: {log_dir}")
    images = {t: [(i.step, (i.width, i.height)) for i in events.Images(t)] for t in events.Tags()["images"]}
    tags = [t for t in events.Tags()["scalars"] if t.startswith("receptive_field/")]
    scalars = {t: [s.step for s in events.Scalars(t)] for t in tags}
    tables = ", ".join(t for t in events.Tags()["tensors"] if "table" in t)
    show(images, scalars, [s.step for s in events.Scalars("val_acc")], f"{tables} (Markdown, Text tab)")


def wandb(root: Path) -> None:
    run_dir = newest(root.glob("wandb/offline-run-*"))
    rows = read_wandb_history(run_dir)
    print(f"Weights & Biases (offline): {run_dir}  [steps are trainer/global_step]")
    images, scalars, validation, table = defaultdict(list), defaultdict(list), [], ""
    for row in rows:
        step = row.get("trainer/global_step")
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "image-file":
                size = Image.open(run_dir / "files" / value["path"]).size
                images[key].append((step, size))
            elif isinstance(value, dict) and value.get("_type") == "table-file":
                table += f"{key} (wandb.Table, {value['nrows']} rows x {value['ncols']} columns) at step {step}; "
            elif key.startswith("receptive_field/"):
                scalars[key].append(step)
        if "val_acc" in row:
            validation.append(step)
    show(images, scalars, validation, table)


def mlflow(root: Path) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rf-callback")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    run_id = run.info.run_id
    print(f"MLflow: run {run_id} in {uri}")
    images = defaultdict(list)
    for artifact in client.list_artifacts(run_id, "images"):
        match = re.fullmatch(r"images/(.*)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", artifact.path)
        if match:
            size = Image.open(client.download_artifacts(run_id, artifact.path)).size
            images[match[1].replace("~", "/")].append((int(match[2]), size))
    keys = [key for key in run.data.metrics if key.startswith("receptive_field/")]
    scalars = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in keys}
    validation = [m.step for m in client.get_metric_history(run_id, "val_acc")]
    files = [a.path for a in client.list_artifacts(run_id, "receptive_field")]
    show(images, scalars, validation, f"artifacts {', '.join(files)}")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "lightning_logs")
    for backend in (tensorboard, wandb, mlflow):
        backend(root)
        print()
