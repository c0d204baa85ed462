"""train.py end to end on the real Fashion-MNIST files, as a newcomer runs it (a few batches)."""

import re
import subprocess
import sys
from pathlib import Path

from tests.lightning_helpers import read_events

ROOT = Path(__file__).parents[1]
LAYERS = ["features.relu2", "features.relu4", "features.pool2"]  # one per resolution stage


def test_train_py_logs_table_maps_and_scalars(tmp_path):
    command = [
        sys.executable,
        "train.py",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.data_dir={tmp_path / 'data'}",
    ]
    completed = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    log_dir = tmp_path / "logs" / "small_cnn" / "version_0"
    assert f"tensorboard --logdir {tmp_path / 'logs'}" in completed.stdout
    assert re.search(r"features.pool2 +MaxPool2d +7x7 +16 +16 +4 +6", completed.stderr + completed.stdout)
    assert "ReceptiveFieldMonitor: At 28x28, no layer is predicted unproductive" in completed.stderr + completed.stdout

    events = read_events(log_dir)
    table = events.Tensors("receptive_field/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| features.pool2 | MaxPool2d | 7x7 | 16 | 16 | 4 | 6 |  |" in table
    val_steps = [s.step for s in events.Scalars("val_acc")]
    for index, layer in enumerate(LAYERS):
        images = events.Images(f"receptive_field/{index:02d}_{layer}")
        assert [image.step for image in images] == [0, *val_steps]
        sizes = events.Scalars(f"receptive_field/{index:02d}_{layer}/erf_size")
        assert [s.step for s in sizes] == [0, *val_steps] and all(s.value > 0 for s in sizes)
    assert "hp_metric" not in events.Tags()["scalars"]
    assert "val_acc" in events.Tags()["scalars"]


def test_missing_data_is_one_message_without_a_traceback(tmp_path):
    command = [
        sys.executable,
        "train.py",
        f"--data.data_dir={tmp_path / 'data'}",
        "--data.source_dirs=[]",
        "--data.download=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]
    completed = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert "train.py: " in completed.stderr and "Traceback" not in completed.stderr
    assert "train-images-idx3-ubyte" in completed.stderr


def test_a_misconfigured_callback_is_one_message_without_a_traceback(tmp_path):
    config = tmp_path / "nope.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: rf_callback.ReceptiveFieldMonitor\n      init_args:\n"
                      "        layers: [features.nope]\n")  # fmt: skip
    command = [
        sys.executable,
        "train.py",
        f"--config={config}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.data_dir={tmp_path / 'data'}",
    ]
    completed = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "train.py: ReceptiveFieldMonitor on SmallCNN: layers=['features.nope']: " in completed.stderr
    assert "Layers that have maps: features.conv1, features.bn1," in completed.stderr
