"""Faults and hostile input: what one failure costs (only itself), and what is kept.

Full disks are real small file systems (tmpfs) where the test may mount one, else a file system whose
writes past a quota raise ``OSError(ENOSPC)`` as the kernel does, after writing what fitted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import rf_callback.monitor
from rf_callback import ProbeMonitor, ReceptiveFieldMonitor, receptive_fields, receptive_maps
from rf_callback.destinations import PngFolderDestination
from rf_callback.saliency import NonFiniteMapWarning
from rf_callback.table import LayerKey
from tests.lightning_helpers import TinyCNN, loaders, read_events

# ---- small disks ---------------------------------------------------------------------------------------------


class QuotaDisk:
    """A folder whose files may hold ``size`` bytes in all: TensorBoard's writes past it write what fits, then
    raise ``OSError(ENOSPC)``, and ``shutil.disk_usage`` reports what is left (for machines that cannot mount)."""

    def __init__(self, folder: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
        from tensorboard.compat.tensorflow_stub.io import gfile

        self.folder, self.size = folder, size
        append, usage = gfile.LocalFileSystem.append, shutil.disk_usage

        def limited_append(filesystem, filename, file_content, binary_mode=False):
            if not os.fsdecode(filename).startswith(str(folder)):  # TensorBoard passes bytes
                return append(filesystem, filename, file_content, binary_mode)
            room = max(0, self.free())
            append(filesystem, filename, file_content[:room], binary_mode)
            if len(file_content) > room:
                raise OSError(errno.ENOSPC, "No space left on device", os.fsdecode(filename))
            return None

        def limited_usage(path):
            found = usage(path)
            return found._replace(free=self.free()) if str(path).startswith(str(folder)) else found

        monkeypatch.setattr(gfile.LocalFileSystem, "append", limited_append)
        monkeypatch.setattr(shutil, "disk_usage", limited_usage)

    def free(self) -> int:
        return self.size - sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())


@contextlib.contextmanager
def small_disk(folder: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A file system of ``size`` bytes at ``folder``: tmpfs when this process may mount one, else a :class:`QuotaDisk`."""
    folder.mkdir(parents=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    mounted = shutil.which("mount") is not None and (
        subprocess.run(command, capture_output=True, check=False, timeout=30).returncode == 0
    )
    if not mounted:
        QuotaDisk(folder, size, monkeypatch)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False, timeout=30)


def fit_on(folder: Path, callback: ReceptiveFieldMonitor, epochs: int = 4, logger=None, model=None) -> Trainer:
    seed_everything(0)
    trainer = Trainer(
        logger=logger if logger is not None else TensorBoardLogger(folder, name="run"),
        callbacks=[callback],
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=folder,
    )
    trainer.fit(model if model is not None else TinyCNN(), *loaders())
    return trainer


def event_bytes(trainer: Trainer) -> int:
    """The bytes of the run's TensorBoard event files."""
    return sum(path.stat().st_size for path in Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))


VALIDATION_STEPS = [1, 3, 5, 7]  # four epochs of two batches: the steps of the validation metrics


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer thread dies
def test_a_full_disk_stops_the_images_and_lightning_logging_goes_on(tmp_path, monkeypatch):
    """The images fill the disk: one warning, no more images, and Lightning's val_loss still lands."""
    monkeypatch.setattr(rf_callback.monitor, "_free_bytes", lambda folder: None)  # no early stop: meet ENOSPC itself
    # A disk that holds the table and the first pass, and half of the next: the second pass meets the full disk.
    one, two = (event_bytes(fit_on(tmp_path / f"sizes_{n}", ReceptiveFieldMonitor("all"), epochs=n)) for n in (1, 2))
    size = one - (two - one) // 2  # one epoch: the table, the baseline and that epoch's pass; a pass: two - one
    with small_disk(tmp_path / "disk", size, monkeypatch) as disk, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_on(disk, ReceptiveFieldMonitor("all"))  # the run goes to its end
        events = read_events(trainer.logger.log_dir)
        files = sorted(p.name for p in Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    failures = [str(w.message) for w in caught if "ReceptiveFieldMonitor could not" in str(w.message)]
    assert len(failures) == 1, failures
    assert "no space left on the disk while writing" in failures[0]
    assert "nothing more goes to TensorBoard" in failures[0]
    assert "the SummaryWriter goes on in a new event file" in failures[0]
    assert len(files) == 2  # the first, cut back to before the pass that failed, and the one Lightning goes on in

    assert [s.step for s in events.Scalars("val_loss")] == VALIDATION_STEPS  # Lightning's own logging survived
    image_steps = sorted({i.step for tag in events.Tags()["images"] for i in events.Images(tag)})
    scalar_steps = [s.step for s in events.Scalars("receptive_field/00_conv1/erf_size")]
    assert image_steps and image_steps == scalar_steps  # the passes before the failure are kept whole
    assert image_steps[-1] < VALIDATION_STEPS[-1]  # and nothing after it


def test_images_stop_before_the_disk_runs_short(tmp_path, monkeypatch):
    """With a margin of free space to keep, images stop while the disk still has room: nothing ever fails."""
    size = 2 * 1024 * 1024
    monkeypatch.setattr(rf_callback.monitor, "MIN_FREE_MB", 1.2)
    with small_disk(tmp_path / "disk", size, monkeypatch) as disk, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_on(disk, ReceptiveFieldMonitor("all"))
        free = shutil.disk_usage(disk).free
        events = read_events(trainer.logger.log_dir)
    failures = [str(w.message) for w in caught if "ReceptiveFieldMonitor could not" in str(w.message)]
    assert len(failures) == 1, failures
    assert "MB free on the disk of" in failures[0] and "1.2 MB are left for the run's own logs" in failures[0]
    assert free > 1.2e6 - 200_000  # the margin held (Lightning's own records took a little of it)
    assert [s.step for s in events.Scalars("val_loss")] == VALIDATION_STEPS
    image_steps = sorted({i.step for tag in events.Tags()["images"] for i in events.Images(tag)})
    assert 0 in image_steps and image_steps[-1] < VALIDATION_STEPS[-1]
    assert [s.step for s in events.Scalars("receptive_field/00_conv1/erf_size")] == [0, *VALIDATION_STEPS]


# ---- non-finite maps ----------------------------------------------------------------------------------------


class ScaledToPeak(nn.Module):
    """Divides each input by its own peak: an all-zero probe gives 0 / 0."""

    def forward(self, x):
        return x / x.abs().amax(dim=(1, 2, 3), keepdim=True)


class PeakNormalizedCNN(TinyCNN):
    def __init__(self):
        super().__init__()
        self.scale = ScaledToPeak()

    def forward(self, x):
        return super().forward(self.scale(x))


def probes_with_a_blank_one() -> torch.Tensor:
    probes = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    probes[2] = 0.0
    return probes


def test_non_finite_maps_are_named_left_out_and_never_dead():
    model, probes = PeakNormalizedCNN().eval(), probes_with_a_blank_one()
    with pytest.warns(NonFiniteMapWarning) as caught:
        maps = receptive_maps(model, probes, ["conv1", "conv2"])
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        "receptive_maps: maps hold NaN or infinite values (probe 2 at layers 'conv1', 'conv2'); the values of probe 2"
        " first became non-finite at aten.div.Tensor in 'scale' (ScaledToPeak)."
    )
    assert maps.finite.tolist() == [[True, True], [True, True], [False, False], [True, True]]
    assert maps.maps[2].isnan().all()  # kept as they are: the library hides nothing
    kept = receptive_maps(model, probes[[0, 1, 3]], ["conv1", "conv2"])  # the same maps without the blank probe
    means, expected = maps.erf.mean(), kept.erf.mean()
    for key in ("size", "mass_side", "size_fraction", "mass_fraction", "mean_area_20", "mean_area_50", "mean_area_99"):
        torch.testing.assert_close(means[key], expected[key])
    assert means["dead_fraction"].tolist() == [0.0, 0.0]  # not dead
    assert means["non_finite_fraction"].tolist() == [0.25, 0.25]
    torch.testing.assert_close(maps.mean_maps, kept.mean_maps)  # never all zeros
    assert maps.erf.size[2].isnan().all() and not maps.erf.dead[2].any()
    assert "! conv1: non-finite maps (NaN or inf) of probe 2, left out" in maps.summary()


def test_a_gradient_that_becomes_non_finite_in_backward_is_named():
    class RootOfMagnitude(nn.Module):
        def forward(self, x):
            return x.abs().sqrt()  # finite forward at 0; its gradient there is 0 * inf

    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), RootOfMagnitude(), nn.Conv2d(2, 2, 3, padding=1))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    said = "the forward values of probe 0 are finite; its gradient first became NaN in SqrtBackward0"
    with pytest.warns(NonFiniteMapWarning, match=said):
        maps = receptive_maps(net, torch.rand(2, 1, 8, 8), ["2"])
    assert not maps.finite.any() and maps.mean_maps.isnan().all()
    assert maps.erf.mean()["size"].isnan().all()  # no finite map: unknown, not 0


def test_non_finite_maps_in_a_run_warn_once_and_log_only_true_numbers(tmp_path):
    callback = ReceptiveFieldMonitor(["conv1", "conv2"], probes=probes_with_a_blank_one())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_on(tmp_path, callback, epochs=2, model=PeakNormalizedCNN())
    said = [w for w in caught if issubclass(w.category, NonFiniteMapWarning)]
    assert len(said) == 1  # three passes, one warning
    events = read_events(trainer.logger.log_dir)
    kept = receptive_maps(callback.monitor.model, probes_with_a_blank_one()[[0, 1, 3]], ["conv1", "conv2"])
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("receptive")}
    assert last["receptive_field/01_conv2/erf_mean_area_50"] == pytest.approx(float(kept.erf.mean()["mean_area_50"][1]))
    assert last["receptive_field/01_conv2/erf_size"] == pytest.approx(float(kept.erf.mean()["size"][1]))
    assert last["receptive_field/01_conv2/non_finite_fraction"] == 0.25
    assert "receptive_field/01_conv2/dead_fraction" not in last
    assert [i.step for i in events.Images("receptive_field/01_conv2/mean")] == [0, 1, 3]


def test_a_non_finite_map_is_drawn_marked_without_heat_or_box():
    from rf_callback.render import PADDING, layer_image, tile_size

    images, maps = torch.rand(2, 1, 28, 28), torch.rand(2, 28, 28)
    boxes, centers = torch.tensor([[8, 8, 20, 20]] * 2), torch.full((2, 2), 13.5)
    maps[1] = float("nan")
    marked = layer_image(images, maps, boxes, centers, labels=["a", "b"])
    zeroed = torch.stack([maps[0], torch.zeros(28, 28)])
    plain = layer_image(images, zeroed, boxes, centers, labels=["a", "b"], analytic=False)  # no box, as many lines
    height, width = tile_size(28, 28)
    second = (slice(None), slice(PADDING, PADDING + height), slice(2 * PADDING + width, 2 * PADDING + 2 * width))
    assert torch.equal(marked[second], plain[second])  # the probe in grey: no heat, no box
    caption = (slice(None), slice(PADDING + height, None), second[2])
    assert not torch.equal(marked[caption], plain[caption])  # its caption says why


def test_non_finite_probes_are_refused_at_setup():
    probes = torch.rand(3, 1, 12, 12)
    probes[1, 0, 3, 3] = float("inf")
    message = "probes hold NaN or infinite values (probe 1), so every map of them would too."
    with pytest.raises(MisconfigurationException, match=re.escape(message)):
        ReceptiveFieldMonitor(probes=probes)
    with pytest.raises(ValueError, match=re.escape(message)):
        ProbeMonitor(TinyCNN(), probes)
    with pytest.raises(ValueError, match=re.escape(message)):
        receptive_maps(TinyCNN(), probes)


# ---- one failure costs only itself --------------------------------------------------------------------------


LONG = "branch_" * 43  # a legal module name of 301 characters: too long for a file name


class OddlyNamed(TinyCNN):
    """Module names a file system or the tag grammar might not expect: a newline, brackets, 301 characters."""

    def __init__(self):
        super().__init__()
        self.add_module("first\nline", nn.Conv2d(1, 1, 3, padding=1))
        self.add_module(LONG, nn.Conv2d(1, 1, 3, padding=1))
        self.add_module("head[1]", nn.Identity())

    def forward(self, x):
        x = getattr(self, LONG)(getattr(self, "first\nline")(x))
        return getattr(self, "head[1]")(super().forward(x))


def test_every_key_of_odd_module_names_parses_back_to_its_module():
    model = OddlyNamed()
    table = receptive_fields(model, (1, 12, 12))
    modules = dict(model.named_modules())
    assert {"first\nline", LONG, "head[1][0]"} <= set(table)
    for key in table:
        assert str(LayerKey.parse(key)) == key and LayerKey.parse(key).module_name in modules


@given(st.lists(st.text(min_size=1, max_size=12).filter(lambda name: "." not in name), min_size=1, max_size=3))
def test_every_key_the_table_writes_parses_back_whatever_the_module_names(names):
    model = nn.Sequential()
    for name in names:
        try:
            model.add_module(name, nn.Conv2d(1, 1, 3, padding=1))
        except KeyError:  # a name nn.Module keeps for itself ("forward", ...)
            assume(False)
    modules = dict(model.named_modules())
    for key in receptive_fields(model, (1, 8, 8)):
        parsed = LayerKey.parse(key)
        assert str(parsed) == key and parsed.module_name in modules


def test_odd_module_names_get_their_maps_and_files(tmp_path):
    callback = ReceptiveFieldMonitor("all", probes=probes_with_a_blank_one()[[0, 1]])
    csv_logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = [TensorBoardLogger(tmp_path, name="tb"), csv_logger]
        trainer = fit_on(tmp_path, callback, epochs=1, logger=loggers, model=OddlyNamed())
    assert not [str(w.message) for w in caught if "could not" in str(w.message)]
    layers = callback.monitor.layers
    assert "first\nline" in layers and LONG in layers
    events = read_events(trainer.loggers[0].log_dir)
    folder = PngFolderDestination(csv_logger.log_dir)
    for tag in callback.monitor.tags.values():
        assert [i.step for i in events.Images(tag)] == [0, 1]
        written = sorted(p.name for p in folder.path(tag).glob("*.png"))
        assert written == ["step_00000000.png", "step_00000001.png"], tag
        assert all(len(part) <= 120 for part in folder.path(tag).relative_to(folder.folder).parts)


def test_a_layer_that_cannot_be_written_costs_only_its_own_files(tmp_path):
    model = TinyCNN()
    monitor = ProbeMonitor(model, probes_with_a_blank_one(), ["conv1", "pool", "conv2"])
    folder = PngFolderDestination(tmp_path)
    folder.path(monitor.tags["conv1"]).parent.mkdir(parents=True)
    folder.path(monitor.tags["conv1"]).write_text("a file where the first layer's folder goes")
    failures: list[tuple[int, str]] = []
    for step in (0, 1):
        monitor.log(folder, step, on_error=lambda _d, what, _error, step=step: failures.append((step, what)))
    assert [what for step, what in failures if step == 0] == [
        "the image of layer 'conv1' (receptive_field/00_conv1)",
        "the mean image of layer 'conv1' (receptive_field/00_conv1/mean)",
    ]
    for layer in ("pool", "conv2"):  # the later layers are all there
        images = sorted(p.name for p in folder.path(monitor.tags[layer]).glob("*.png"))
        assert images == ["step_00000000.png", "step_00000001.png"]
    assert (tmp_path / "scalars.csv").read_text().count(",receptive_field/00_conv1/erf_size,") == 2


# ---- integer outputs ------------------------------------------------------------------------------------------


class SegNetEncoder(nn.Module):
    """Max pooling that returns its indices, as SegNet's encoder keeps them for its decoder."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        pooled, self.indices = self.pool(self.conv1(x))
        return self.conv2(pooled)


def test_integer_outputs_stay_in_the_table_and_are_never_mapped():
    model, probes = SegNetEncoder(), torch.rand(2, 1, 16, 16)
    table = receptive_fields(model, (1, 16, 16))
    indices = table["pool:1"]
    assert indices.dtype == torch.int64 and indices.size == (4, 4) and indices.stride == (2, 2)  # its geometry
    assert receptive_maps(model, probes, "all").layers == ("conv1", "pool:0", "conv2")
    assert "pool:1" not in receptive_maps(model, probes).layers
    with pytest.raises(ValueError, match=re.escape("'pool:1' (MaxPool2d) gives int64 values (indices or a mask)")):
        receptive_maps(model, probes, ["conv2", "pool:1"])
    with pytest.raises(
        ValueError, match="carry no gradient, so it has no receptive map. Layers that have maps: conv1,"
    ):
        ProbeMonitor(model, probes, ["pool:1"])


# ---- bounded images -------------------------------------------------------------------------------------------


def test_a_pass_draws_at_most_max_image_mb_of_pixels_and_says_which_layers_it_left_out():
    monitor = ProbeMonitor(TinyCNN(), probes_with_a_blank_one(), ["conv1", "pool", "conv2"], max_image_mb=0.5)
    with pytest.warns(UserWarning) as caught:
        images = [monitor.images(monitor.compute()) for _ in range(2)]
    said = [str(w.message) for w in caught if "are not drawn" in str(w.message)]
    assert said == [  # once, not every pass
        (
            "ProbeMonitor: the images of 2 layers (pool, conv2) are not drawn: one pass's images would take more than"
            " max_image_mb=0.5 MB of pixels. Their scalars are logged. HINT: raise max_image_mb, or monitor fewer"
            " layers or probes."
        )
    ]
    for drawn in images:
        assert list(drawn) == ["receptive_field/00_conv1", "receptive_field/00_conv1/mean"]
        assert sum(image.numel() for image in drawn.values()) <= 0.5e6
    logged = {tag.rpartition("/")[0] for tag in monitor.scalars(monitor.compute())}
    assert logged == set(monitor.tags.values())  # every layer's statistics
