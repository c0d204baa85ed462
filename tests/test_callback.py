"""ReceptiveFieldMonitor inside real Lightning runs, checked through the files it writes."""

import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_SCALAR

import rf_callback.monitor
from rf_callback import ReceptiveFieldMonitor
from tests.lightning_helpers import TinyCNN, loaders, raw_values, read_events

LAYERS = ["conv1", "pool", "conv2"]


def trainer_for(tmp_path, callbacks=(), logger=True, **kwargs):
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="run")
    options = {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True}
    options.update(kwargs)
    return Trainer(default_root_dir=tmp_path, logger=logger, callbacks=list(callbacks), accelerator="cpu", **options)


def fit(tmp_path, callbacks=(), **kwargs):
    seed_everything(0)
    model = TinyCNN()
    trainer = trainer_for(tmp_path, callbacks, **kwargs)
    trainer.fit(model, *loaders())
    return trainer, model


def tag(layer: str) -> str:
    return f"receptive_field/{LAYERS.index(layer):02d}_{layer}"


def test_logs_table_maps_and_scalars_per_epoch(tmp_path):
    monitor = ReceptiveFieldMonitor(layers=LAYERS)
    trainer, _model = fit(tmp_path, [monitor])
    events = read_events(trainer.logger.log_dir)

    assert sorted(events.Tags()["tensors"]) == [
        "receptive_field/table/text_summary",
        "receptive_field/table_all_layers/text_summary",
        "receptive_field/unproductive/text_summary",
    ]
    table = events.Tensors("receptive_field/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| conv2 | Conv2d | 6x6 | 8 | 8 | 2 | 3 |  |" in table
    assert "receptive_field/summary" in events.Tags()["images"]
    val_steps = [s.step for s in events.Scalars("val_acc")]
    assert val_steps == [3, 7]
    for layer in LAYERS:
        images = events.Images(tag(layer))
        assert [image.step for image in images] == [0, *val_steps]  # baseline, then with each epoch's metrics
        picture = Image.open(io.BytesIO(images[-1].encoded_image_string))
        assert picture.size == (images[-1].width, images[-1].height)
        assert sum(len(i.encoded_image_string) for i in images) < 3 * 200_000

    # The last maps were drawn from the final model: its scalars are what the library computes now.
    expected = monitor.monitor.compute().erf.mean()
    for index, layer in enumerate(LAYERS):
        for name, key in [("erf_size", "size"), ("erf_mass_side", "mass_side"), ("erf_size_fraction", "size_fraction")]:
            logged = events.Scalars(f"{tag(layer)}/{name}")
            assert [s.step for s in logged] == [0, *val_steps]
            assert logged[-1].value == pytest.approx(float(expected[key][index]), rel=1e-5)
    assert not any(t.endswith("dead_fraction") for t in events.Tags()["scalars"])  # only when nonzero
    description = events.SummaryMetadata(f"{tag('conv2')}/erf_size").summary_description
    assert description.startswith("ERF size: side (input px) of a square")
    # As written, the described point carries a data class: TensorBoard's fast (Rust) loader, its default,
    # keeps the metadata of a first point only if it has one, and drops the description otherwise.
    first = next(value for value in raw_values(trainer.logger.log_dir) if value.tag == f"{tag('conv2')}/erf_size")
    assert first.HasField("simple_value") and first.metadata.data_class == DATA_CLASS_SCALAR
    assert first.metadata.summary_description == description

    # The probes' mean map, one more image per layer, and the share of the input holding 20/50/99% of it.
    for layer in LAYERS:
        assert [image.step for image in events.Images(f"{tag(layer)}/mean")] == [0, *val_steps]
    for share in (20, 50, 99):
        logged = events.Scalars(f"{tag('conv2')}/erf_mean_area_{share}")
        assert logged[-1].value == pytest.approx(float(expected[f"mean_area_{share}"][2]), rel=1e-5)
        assert 0 < logged[-1].value <= 1
        description = events.SummaryMetadata(f"{tag('conv2')}/erf_mean_area_{share}").summary_description
        assert description.startswith(f"Share of the input (0-1) whose largest values hold {share}%")


def test_a_logger_prefix_keeps_each_scalar_in_one_described_chart(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", prefix="exp")
    trainer, _ = fit(tmp_path, [ReceptiveFieldMonitor(layers=["conv2"])], logger=logger)
    events = read_events(trainer.logger.log_dir)
    chart = "exp-receptive_field/00_conv2/erf_size"
    assert [s.step for s in events.Scalars(chart)] == [0, 3, 7]  # the described first point and the rest
    assert events.SummaryMetadata(chart).summary_description.startswith("ERF size: side (input px)")
    assert not any(t.startswith("receptive_field/") for t in events.Tags()["scalars"])


def test_default_probes_are_one_per_class_from_the_validation_set(tmp_path):
    monitor = ReceptiveFieldMonitor()
    fit(tmp_path, [monitor], max_epochs=1)
    validation = loaders()[1].dataset
    assert monitor.probes.labels == ("0", "1", "2", "3") and monitor.probes.indices == (0, 1, 2, 3)
    assert torch.equal(monitor.probes.images, torch.stack([validation[i][0] for i in range(4)]))


def test_every_n_epochs_counts_training_epochs_and_the_last_epoch_is_always_logged(tmp_path):
    monitor = ReceptiveFieldMonitor(layers=["conv2"], every_n_epochs=2, log_baseline=False)
    trainer, _ = fit(tmp_path, [monitor], max_epochs=3)
    events = read_events(trainer.logger.log_dir)
    assert [i.step for i in events.Images("receptive_field/00_conv2")] == [7, 11]  # epochs 2 and 3 (the last)
    assert not any("conv1" in t for t in events.Tags()["images"])


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain, plain_model = fit(tmp_path / "plain")
    monitored, monitored_model = fit(tmp_path / "monitored", [ReceptiveFieldMonitor(unit="max")])
    for (name, a), (_, b) in zip(plain_model.state_dict().items(), monitored_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert plain.logged_metrics.keys() == monitored.logged_metrics.keys()
    assert all(torch.equal(plain.logged_metrics[k], monitored.logged_metrics[k]) for k in plain.logged_metrics)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in monitored_model.modules())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in monitored_model.parameters())


def test_no_logger_is_an_error_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"no logger \(logger=False\).*HINT: Trainer\(logger="):
        fit(tmp_path, [ReceptiveFieldMonitor()], logger=False)


def test_unknown_layers_are_named_with_the_valid_ones(tmp_path):
    message = r"^ReceptiveFieldMonitor on TinyCNN: layers=\['conv9'\]: .*Layers that have maps: conv1, bn, pool"
    with pytest.raises(MisconfigurationException, match=message):
        fit(tmp_path, [ReceptiveFieldMonitor(layers=["conv9"])])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, r"every_n_epochs=0\): must be an int >= 1"),
        ({"unit": "middle"}, r"unit='middle': choose 'center' \(or 'centre'\), 'max', 'max_logit' or a unit position"),
        ({"probes": torch.rand(12, 12)}, r"probes must be a tensor \(N, C, H, W\).*got a tensor of shape \(12, 12\)"),
        ({"probes": "all"}, r"or dataset indices \(a list of ints\); got a str\. HINT"),
        ({"probes": np.zeros((2, 1, 12, 12))}, r"got a ndarray of shape \(2, 1, 12, 12\)\. HINT"),
        ({"threshold": 0}, r"need 0 < threshold < 1"),
        ({"channel": -1}, r"channel=-1: None \(sum over channels\) or an int >= 0"),
    ],
)
def test_bad_arguments_fail_at_once(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message) as raised:
        ReceptiveFieldMonitor(**kwargs)
    assert len(str(raised.value)) < 400  # never the whole array


def test_without_tensorboard_images_are_png_files_with_one_warning(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    folder = Path(logger.log_dir) / "receptive_field"
    with pytest.warns(UserWarning, match=f"CSVLogger cannot hold images, so they are written as {folder}/") as caught:
        trainer, _ = fit(tmp_path, [ReceptiveFieldMonitor(layers=["conv2"])], logger=logger, max_epochs=1)
    assert sum("cannot hold images" in str(w.message) for w in caught) == 1
    assert sorted(p.name for p in (folder / "00_conv2").iterdir()) == ["mean", "step_00000000.png", "step_00000003.png"]
    assert sorted(p.name for p in (folder / "00_conv2" / "mean").iterdir()) == [
        "step_00000000.png",
        "step_00000003.png",
    ]
    assert (folder / "table.md").read_text().startswith("| layer |")
    assert Image.open(folder / "summary" / "step_00000000.png").size == (320, 130)  # for a TensorBoard card
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "receptive_field/00_conv2/erf_size" in metrics


def test_a_failure_while_rendering_costs_only_that_layer_and_training_goes_on(tmp_path, monkeypatch):
    draw, calls = rf_callback.monitor.layer_image, itertools.count(1)

    def broken_for_pool(*args, **kwargs):
        if next(calls) % len(LAYERS) == 2:  # pool, the second layer drawn in each pass
            raise RuntimeError("renderer exploded")
        return draw(*args, **kwargs)

    monkeypatch.setattr(rf_callback.monitor, "layer_image", broken_for_pool)
    with pytest.warns(UserWarning) as caught:
        trainer, _ = fit(tmp_path, [ReceptiveFieldMonitor(LAYERS)], max_epochs=2)
    failures = [str(w.message) for w in caught if "could not" in str(w.message)]
    assert len(failures) == 1 and "renderer exploded" in failures[0]  # once, not at every pass
    assert failures[0].startswith(
        "ReceptiveFieldMonitor could not draw the images of layer 'pool' (receptive_field/01_pool); training goes on,"
        " and this is not said again while it keeps failing."
    )
    assert trainer.current_epoch == 2
    events = read_events(trainer.logger.log_dir)
    assert "receptive_field/01_pool" not in events.Tags()["images"]
    assert [i.step for i in events.Images(tag("conv2"))] == [0, 3, 7]  # the other layers' pictures
    assert [s.step for s in events.Scalars(f"{tag('pool')}/erf_size")] == [0, 3, 7]  # and its own statistics
    with pytest.raises(RuntimeError, match="renderer exploded"):
        fit(tmp_path / "strict", [ReceptiveFieldMonitor(LAYERS, strict=True)], max_epochs=1)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_uses_the_stored_probes_unless_probes_are_given_and_says_which(tmp_path, caplog):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ReceptiveFieldMonitor(probes=[5, 2, 9])
    fit(tmp_path, [first, checkpoint], max_epochs=1)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert torch.equal(state["probes"], first.probes.images) and state["indices"] == (5, 2, 9)
    assert state["model_class"] == "tests.lightning_helpers.TinyCNN"

    # no probes given, new layers, unit and channel: the checkpoint's probes
    resumed = ReceptiveFieldMonitor(layers=["conv1"], unit="max", channel=1)
    seed_everything(0)
    trainer = trainer_for(tmp_path / "resumed", [resumed])
    with caplog.at_level("INFO"):
        trainer.fit(TinyCNN(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(resumed.probes.images, first.probes.images) and resumed.probes.indices == (5, 2, 9)
    said = [r.getMessage() for r in caplog.records if "resumed from a checkpoint" in r.getMessage()]
    assert said == [
        "ReceptiveFieldMonitor: resumed from a checkpoint, looking through the 3 probes stored in it (shape (3, 1, 12, 12))."
    ]
    events = read_events(trainer.logger.log_dir)
    assert [i.step for i in events.Images("receptive_field/00_conv1")] == [7]  # no second baseline

    # probes given explicitly always win, and the log says so
    caplog.clear()
    given = ReceptiveFieldMonitor(probes=[0, 1], layers=["conv1"])
    seed_everything(0)
    trainer = trainer_for(tmp_path / "given", [given])
    with caplog.at_level("INFO"):
        trainer.fit(TinyCNN(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert given.probes.indices == (0, 1) and len(given.probes.images) == 2
    said = [r.getMessage() for r in caplog.records if "resumed from a checkpoint" in r.getMessage()]
    assert said == [
        (
            "ReceptiveFieldMonitor: resumed from a checkpoint, looking through probes=[0, 1] (shape (2, 1, 12, 12)),"
            " not the 3 stored in it."
        )
    ]
    saved = next((tmp_path / "given").rglob("*.ckpt"))
    assert torch.load(saved, weights_only=True)["callbacks"][given.state_key]["indices"] == (0, 1)  # what it used


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_stored_probes_that_no_longer_fit_are_named_as_stored(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ReceptiveFieldMonitor(probes=[5, 2, 9])
    fit(tmp_path, [first, checkpoint], max_epochs=1)
    path = tmp_path / "ckpt" / "last.ckpt"
    contents = torch.load(path, weights_only=True)
    contents["callbacks"][first.state_key]["probes"] = torch.rand(3, 3, 12, 12)  # an RGB run's probes
    torch.save(contents, path)

    with pytest.raises(MisconfigurationException) as raised:
        trainer_for(tmp_path / "resumed", [ReceptiveFieldMonitor()]).fit(TinyCNN(), *loaders(), ckpt_path=path)
    message = str(raised.value)
    assert message.startswith(
        "ReceptiveFieldMonitor: the 3 probes stored in the checkpoint, of shape (3, 3, 12, 12), do not fit TinyCNN now:"
    )
    assert (
        "now: they have 3 channels, but the model's first convolution, 'conv1' (Conv2d), takes (N, 1, H, W)." in message
    )
    assert "input_shape" not in message
    assert message.endswith("probes given to the callback always replace the stored ones.")

    given = ReceptiveFieldMonitor(probes=torch.rand(2, 1, 12, 12))  # the way out the message gives
    trainer = trainer_for(tmp_path / "given", [given])
    trainer.fit(TinyCNN(), *loaders(), ckpt_path=path)
    assert tuple(given.probes.images.shape) == (2, 1, 12, 12)


def test_trainer_validate_logs_maps(tmp_path):
    trainer = trainer_for(tmp_path, [ReceptiveFieldMonitor(probes=torch.rand(2, 1, 12, 12))])
    trainer.validate(TinyCNN(), loaders()[1])
    events = read_events(trainer.logger.log_dir)
    assert [i.step for i in events.Images("receptive_field/00_bn")] == [0]


def test_bf16_mixed_precision(tmp_path):
    trainer, _ = fit(tmp_path, [ReceptiveFieldMonitor()], max_epochs=1, precision="bf16-mixed")
    events = read_events(trainer.logger.log_dir)
    assert len(events.Images("receptive_field/01_conv2")) == 2
    assert all(s.value > 0 for s in events.Scalars("receptive_field/01_conv2/erf_size"))


@pytest.mark.timeout(240)
def test_ddp_two_cpu_processes_log_from_rank_zero_only(tmp_path):
    script = Path(__file__).with_name("ddp_run.py")
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=200,
        cwd=Path(__file__).parents[1],
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    events = read_events(report["log_dir"])
    steps = report["steps_per_epoch"]
    assert [i.step for i in events.Images("receptive_field/00_conv2")] == [0, steps - 1, 2 * steps - 1]
    assert sorted(p.name for p in Path(report["log_dir"]).parent.iterdir()) == ["version_0"]
