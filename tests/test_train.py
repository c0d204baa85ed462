"""train.py end to end on the real Fashion-MNIST files, as a newcomer runs it (a few batches)."""

import subprocess
import sys
from pathlib import Path

from tests.lightning_helpers import read_events

ROOT = Path(__file__).parents[1]
LAYERS = ["features.conv1", "features.conv2", "features.pool1", "features.conv3", "features.conv4", "features.pool2"]


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
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    log_dir = tmp_path / "logs" / "small_cnn" / "version_0"
    assert f"tensorboard --logdir {log_dir}" in completed.stdout
    assert "features.pool2  MaxPool2d  7x7     16       4       6" in completed.stderr + completed.stdout

    events = read_events(log_dir)
    table = events.Tensors("receptive_field/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| features.pool2 | MaxPool2d | 7x7 | 16 | 4 | 6 |" in table
    for layer in LAYERS:
        images = events.Images(f"receptive_field/{layer}")
        assert [image.step for image in images] == [0, 5]
        assert (images[0].width, images[0].height) == (5 * 114 + 2, 2 * 114 + 2 + 19)  # 10 probes, 28 px at 4x, legend
        sizes = events.Scalars(f"receptive_field/{layer}/erf_size")
        assert [s.step for s in sizes] == [0, 5] and all(s.value > 0 for s in sizes)
    assert "val_acc" in events.Tags()["scalars"]
