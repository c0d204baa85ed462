"""Users' own tiny LightningModules and data under Lightning's Trainer options: every promise holds.

Each case runs on the CPU in a few seconds: the callback must complete, log maps at the documented
steps, leave training bit-identical, and refuse bad configurations before the first optimizer step.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from rf_callback import ReceptiveFieldMonitor
from tests.lightning_helpers import TinyCNN, loaders, read_events, tiny_dataset
from tests.test_saliency_dims import TinyUNet


def run(tmp_path, model, callbacks=(), train=None, val=None, **options):
    """Seed, build ``model()`` and fit it for two epochs of four batches; returns the trainer and the model."""
    seed_everything(0)
    model = model()
    settings = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "logger": TensorBoardLogger(tmp_path, name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
    }
    settings.update(options)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=list(callbacks), **settings)
    default_train, default_val = loaders()
    trainer.fit(model, train or default_train, val if val is not None else default_val)
    return trainer, model


def image_steps(trainer, tag="receptive_field/00_conv2"):
    return [image.step for image in read_events(trainer.logger.log_dir).Images(tag)]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- compiled models -----------------------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that counts the graphs Dynamo hands it, and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


class CompiledSubmodule(TinyCNN):
    """A user's module with ``self.features = torch.compile(...)`` inside."""

    def __init__(self, backend=None):
        super().__init__()
        features = nn.Sequential(self.conv1, self.bn, nn.ReLU(), self.pool, self.conv2, nn.ReLU())
        self.features = torch.compile(features, backend=backend) if backend is not None else features

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean((2, 3))))


@pytest.mark.parametrize("whole", [False, True], ids=["submodule", "whole-model"])
def test_compiled_models_are_not_recompiled_and_train_bit_identically(tmp_path, whole):
    torch._dynamo.reset()
    results = []
    for name, callbacks in [("plain", []), ("monitored", [ReceptiveFieldMonitor(layers=["conv2"])])]:
        backend = CountingBackend()

        def build(backend=backend):
            if not whole:
                return CompiledSubmodule(backend)
            model = TinyCNN()
            model.forward = torch.compile(model.forward, backend=backend)
            return model

        trainer, model = run(tmp_path / name, build, callbacks)
        results.append((model, backend.graphs, trainer))
        torch._dynamo.reset()
    (plain, plain_graphs, _), (monitored, monitored_graphs, trainer) = results
    assert monitored_graphs == plain_graphs  # the callback made Dynamo compile nothing more
    assert same_weights(plain, monitored)
    assert image_steps(trainer, "receptive_field/00_conv2") == [0, 3, 7]


def test_a_compiled_submodule_keeps_its_own_layer_names(tmp_path):
    """``self.features = torch.compile(...)``: layers are ``features.2``, never ``features._orig_mod.2``."""
    torch._dynamo.reset()
    monitor = ReceptiveFieldMonitor(layers=["features.2"])
    trainer, _ = run(tmp_path, lambda: CompiledSubmodule(CountingBackend()), [monitor], max_epochs=1)
    assert not any("_orig_mod" in key for key in monitor.monitor.table)
    assert "features.5" in monitor.monitor.table and image_steps(trainer, "receptive_field/00_features.2") == [0, 3]
    torch._dynamo.reset()


# ---- schedules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "steps"),
    [
        ({"check_val_every_n_epoch": 2, "num_sanity_val_steps": 0, "max_epochs": 3}, [0, 4, 7, 12]),
        ({"limit_val_batches": 0}, [0, 4, 8]),
        ({"val_check_interval": 2}, [0, 3, 7]),
        ({"num_sanity_val_steps": 2}, [0, 3, 7]),
        ({"max_steps": 6, "max_epochs": -1}, [0, 3, 6]),
    ],
    ids=["val-every-2-epochs", "no-validation", "val-twice-an-epoch", "sanity-steps", "max-steps"],
)
def test_schedules_complete_and_log_when_the_docs_say(tmp_path, options, steps):
    _, plain = run(tmp_path / "plain", TinyCNN, **options)
    trainer, model = run(tmp_path / "monitored", TinyCNN, [ReceptiveFieldMonitor(layers=["conv2"])], **options)
    assert set(steps) <= set(image_steps(trainer))
    assert same_weights(plain, model)


def test_maps_land_on_the_step_of_the_epochs_validation_metrics(tmp_path):
    trainer, _ = run(tmp_path, TinyCNN, [ReceptiveFieldMonitor(layers=["conv2"])])
    events = read_events(trainer.logger.log_dir)
    assert image_steps(trainer)[1:] == [s.step for s in events.Scalars("val_acc")]


# ---- validation data of every kind ---------------------------------------------------------------------
class ItemDataset(Dataset):
    """Items built on the fly, with labels of a chosen kind; counts how many items were read."""

    def __init__(self, images, labels):
        self.images, self.labels, self.reads = images, labels, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.reads += 1
        return self.images[index], self.labels[index]


def sorted_by_class(count=64, classes=4):
    data = tiny_dataset(count=count, classes=classes, seed=1)
    order = torch.argsort(data.tensors[1], stable=True)
    return data.tensors[0][order], data.tensors[1][order]


@pytest.mark.parametrize("kind", ["class-sorted", "one-hot", "strings", "targets-attribute"])
def test_default_probes_are_one_per_class_whatever_the_labels(tmp_path, kind):
    images, labels = sorted_by_class()
    if kind == "class-sorted":
        dataset = TensorDataset(images, labels)
    elif kind == "one-hot":
        dataset = ItemDataset(images, F.one_hot(labels, 4).float())
    elif kind == "strings":
        dataset = ItemDataset(images, [("coat", "dress", "shirt", "bag")[int(y)] for y in labels])
    else:
        dataset = ItemDataset(images, labels)
        dataset.targets = labels.tolist()
        dataset.classes = ["coat", "dress", "shirt", "bag"]
    monitor = ReceptiveFieldMonitor(layers=["conv2"])
    loader = DataLoader(dataset, batch_size=16)
    run(tmp_path, Unmeasured, [monitor], val=loader, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1)
    assert len(set(monitor.probes.labels)) == 4 and len(monitor.probes.images) == 4
    if kind == "targets-attribute":
        assert (
            monitor.probes.labels == ("coat", "dress", "shirt", "bag") and dataset.reads == 16 + 4
        )  # one validation batch, four probes


class Unmeasured(TinyCNN):
    def validation_step(self, batch, batch_idx):
        return None


class Stream(IterableDataset):
    def __iter__(self):
        return iter(tiny_dataset(count=16))


def test_an_iterable_validation_set_is_a_clear_setup_error(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"cannot be indexed.*HINT: pass probes as a tensor"):
        run(tmp_path, TinyCNN, [ReceptiveFieldMonitor()], val=DataLoader(Stream(), batch_size=8))
    given = ReceptiveFieldMonitor(probes=torch.rand(3, 1, 12, 12), layers=["conv2"])
    trainer, _ = run(tmp_path / "given", TinyCNN, [given], val=DataLoader(Stream(), batch_size=8), max_epochs=1)
    assert len(image_steps(trainer)) == 2


# ---- models users write --------------------------------------------------------------------------------
class SizeChecking(TinyCNN):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, x):
        if x.shape[-2:] != (12, 12):
            if self.error is AssertionError:
                raise AssertionError(f"expected 12x12 images, got {tuple(x.shape)}")
            raise self.error(f"expected 12x12 images, got {tuple(x.shape)}")
        return super().forward(x)


@pytest.mark.parametrize("error", [AssertionError, ValueError])
def test_a_model_that_checks_its_input_size_gets_maps_without_warnings(tmp_path, error, recwarn):
    trainer, _ = run(tmp_path, lambda: SizeChecking(error), [ReceptiveFieldMonitor(layers=["conv1", "conv2"])])
    assert image_steps(trainer, "receptive_field/01_conv2") == [0, 3, 7]
    assert not [w for w in recwarn if "could not log" in str(w.message)]


class LogsInForward(TinyCNN):
    def forward(self, x):
        out = super().forward(x)
        self.log("logit_mean", out.mean())
        return out


def test_self_log_in_forward_is_left_alone(tmp_path):
    _, plain = run(tmp_path / "plain", LogsInForward)
    trainer, model = run(tmp_path / "monitored", LogsInForward, [ReceptiveFieldMonitor(layers=["conv2"])])
    assert trainer.callback_metrics["logit_mean"].device.type == "cpu"
    assert same_weights(plain, model)


class Signal1D(LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoConvolution(Signal1D):
    def __init__(self):
        super().__init__()
        self.flat = nn.Linear(144, 4)

    def forward(self, x):
        return self.head(self.flat(x.flatten(1)))


class StepCounting(TinyCNN):
    steps = 0

    def training_step(self, batch, batch_idx):
        StepCounting.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (StepCounting, {"unit": (99, 99), "layers": ["conv2"]}, r"unit=\(99, 99\): layer 'conv2' has an output of 6x6"),
        (StepCounting, {"channel": 10_000, "layers": ["conv2"]}, r"channel=10000: layer 'conv2' has 8 channels"),
        (StepCounting, {"layers": "conv9"}, r"'conv9'.*Layers that have maps: conv1, bn, pool, conv2"),
        (StepCounting, {"probes": [0, 1000]}, r"probes=\[0, 1000\]\): .*\[1000\] outside the dataset of 32 items"),
        (
            StepCounting,
            {"probes": torch.rand(2, 3, 12, 12)},
            r"3 channels, but .* 'conv1' \(Conv2d\), takes \(N, 1, H, W\)",
        ),
        (
            StepCounting,
            {"probes": torch.rand(1, 12, 12)},
            r"read as \(N, C, L\).*unsqueeze\(0\), of shape \(1, 1, 12, 12\)",
        ),
        (NoConvolution, {}, r"no layer with a receptive field that varies across the input.*nothing to map"),
        (
            Signal1D,
            {"probes": torch.rand(2, 1, 32), "unit": (3, 3)},
            r"unit=\(3, 3\): layer 'conv' has an output of 30",
        ),
    ],
    ids=["unit", "channel", "one-name", "index", "channels", "unbatched", "no-conv", "conv1d-unit"],
)
def test_bad_configurations_fail_before_the_first_step(tmp_path, model, kwargs, message):
    StepCounting.steps = 0
    with pytest.raises(MisconfigurationException, match=message) as raised:
        run(tmp_path, model, [ReceptiveFieldMonitor(**kwargs)])
    assert StepCounting.steps == 0 and len(str(raised.value)) < 1500


# ---- 1-D, 3-D and dense models ----------------------------------------------------------------------------
class Spatial(LightningModule):
    """A tiny classifier of 1-D signals (``Conv1d``) or 3-D volumes (``Conv3d``), with a validation metric."""

    def __init__(self, dims: int):
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        self.conv1 = conv(1, 4, 3, padding=1)
        self.conv2 = conv(4, 4, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.flatten(2).mean(-1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def spatial_loaders(shape):
    generator = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(64, *shape, generator=generator), torch.arange(64) % 2)
    val = TensorDataset(torch.rand(32, *shape, generator=generator), torch.arange(32) % 2)
    return DataLoader(train, batch_size=16), DataLoader(val, batch_size=16)


@pytest.mark.parametrize(("dims", "shape"), [(1, (1, 48)), (3, (1, 6, 12, 12))], ids=["conv1d", "conv3d"])
def test_1d_and_3d_models_get_maps_at_the_documented_steps(tmp_path, dims, shape):
    monitor = ReceptiveFieldMonitor(layers=["conv1", "conv2"], unit="max")
    train, val = spatial_loaders(shape)
    trainer, _ = run(tmp_path, lambda: Spatial(dims), [monitor], train=train, val=val)
    events = read_events(trainer.logger.log_dir)
    assert monitor.probes.images.shape == (2, *shape)  # one per class, read from the validation set
    for k, layer in enumerate(["conv1", "conv2"]):
        tag = f"receptive_field/{k:02d}_{layer}"
        assert image_steps(trainer, tag) == [0, 3, 7] and image_steps(trainer, f"{tag}/mean") == [0, 3, 7]
        assert [s.step for s in events.Scalars(f"{tag}/erf_size")] == [0, 3, 7]
    expected = monitor.monitor.compute().erf.mean()  # the last maps were drawn from the final model
    for k, layer in enumerate(["conv1", "conv2"]):
        for name, key in [("erf_size", "size"), ("erf_mean_area_50", "mean_area_50")]:
            logged = events.Scalars(f"receptive_field/{k:02d}_{layer}/{name}")[-1].value
            assert logged == pytest.approx(float(expected[key][k]), rel=1e-5)


class Segmenter(LightningModule):
    """A tiny U-Net (down with stride 2, up with ``nn.Upsample``, a skip concatenation) trained per pixel."""

    def __init__(self):
        super().__init__()
        self.net = TinyUNet(classes=3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), (batch[0][:, 0] * 3).long().clamp(max=2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("unit", ["center", "max_logit"])
def test_a_segmentation_models_prediction_is_monitored_pixel_by_pixel(tmp_path, unit):
    monitor = ReceptiveFieldMonitor(layers=["net.down", "net.head"], unit=unit, probes=torch.rand(3, 1, 12, 12))
    trainer, _ = run(tmp_path, Segmenter, [monitor], limit_val_batches=0)
    assert image_steps(trainer, "receptive_field/01_net.head") == [0, 4, 8]
    assert image_steps(trainer, "receptive_field/01_net.head/mean") == [0, 4, 8]
    result = monitor.monitor.compute()
    assert result.analytic == (True, monitor.monitor.table["net.head"].supported)
    picture = read_events(trainer.logger.log_dir).Images("receptive_field/01_net.head")[-1]
    pixels = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
    boxes_drawn = (pixels == (0, 255, 255)).all(2).any()
    assert boxes_drawn == result.analytic[1]  # no box where the tracer has no field: the maps cover the image


@pytest.mark.parametrize("unit", ["center", "max_logit"])
def test_a_linear_head_is_mapped_over_the_whole_image(tmp_path, unit):
    # The classifier's Linear sees the whole input: its map is the input gradient of the class scores (their
    # sum, or each probe's most confident one), with no box to draw: the whole image is its field.
    monitor = ReceptiveFieldMonitor(layers=["head"], unit=unit)
    trainer, model = run(tmp_path, TinyCNN, [monitor], max_epochs=1)
    assert image_steps(trainer, "receptive_field/00_head") == [0, 3]
    result = monitor.monitor.compute()
    probes = monitor.probes.images.clone().requires_grad_()
    logits = model.eval()(probes)
    score = logits.sum() if unit == "center" else logits.amax(1).sum()
    (gradient,) = torch.autograd.grad(score, probes)
    assert torch.allclose(result.maps[:, 0], gradient.abs().sum(1), rtol=1e-4, atol=1e-8)
    picture = read_events(trainer.logger.log_dir).Images("receptive_field/00_head")[-1]
    pixels = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
    assert not (pixels == (0, 255, 255)).all(2).any()  # "whole image" under each probe, no box


def test_layers_may_be_one_name(tmp_path):
    trainer, _ = run(tmp_path, TinyCNN, [ReceptiveFieldMonitor(layers="conv2")], max_epochs=1)
    assert image_steps(trainer) == [0, 3]


def test_resume_with_other_options_keeps_the_probes_and_a_new_shape_is_named(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ReceptiveFieldMonitor(layers=["conv2"])
    run(tmp_path / "a", TinyCNN, [first, checkpoint], max_epochs=1, enable_checkpointing=True)
    resumed = ReceptiveFieldMonitor(layers=["conv1"], unit="max", channel=0, num_probes=2)
    seed_everything(0)
    trainer = Trainer(
        max_epochs=2, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="b"), callbacks=[resumed],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(TinyCNN(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(resumed.probes.images, first.probes.images)

    class Wider(TinyCNN):
        def forward(self, x):
            assert x.shape[-1] == 16, "this model takes 16x16 images"
            return super().forward(x)

    bigger = ReceptiveFieldMonitor()
    bigger.load_state_dict({"probes": torch.rand(2, 1, 12, 12)})
    with pytest.raises(
        MisconfigurationException, match=r"probes stored in the checkpoint, of shape \(2, 1, 12, 12\), do"
    ):
        run(tmp_path / "c", Wider, [bigger], val=DataLoader(TensorDataset(torch.rand(4, 1, 16, 16), torch.arange(4))))


def test_numpy_probes_get_a_short_message():
    with pytest.raises(MisconfigurationException, match=r"got a ndarray of shape \(10, 1, 28, 28\)") as raised:
        ReceptiveFieldMonitor(probes=np.zeros((10, 1, 28, 28)))
    assert len(str(raised.value)) < 300
