"""FashionMNISTDataModule on tiny IDX files written here: where it finds them, what it builds, what it leaves alone."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from rf_callback.demos import fashion_mnist as data
from rf_callback.demos.fashion_mnist import (
    PIXEL_MEAN,
    PIXEL_STD,
    RAW_FILES,
    FashionMNISTDataModule,
    FashionMNISTNotFoundError,
    IdxFormatError,
)

TRAIN_SIZE, TEST_SIZE = 30, 20


def idx_images(count: int, first_value: int) -> bytes:
    """``count`` images; pixel ``j`` of image ``i`` is ``(first_value + i + j) % 256``, pixel 0 names the image."""
    pixels = bytes((first_value + i + j) % 256 for i in range(count) for j in range(28 * 28))
    return struct.pack(">IIII", 0x803, count, 28, 28) + pixels


def idx_labels(count: int) -> bytes:
    return struct.pack(">II", 0x801, count) + bytes(i % 10 for i in range(count))


def original_files() -> dict[str, bytes]:
    """Uncompressed contents of the four files: 30 training and 20 test images, labels cycling through 0..9."""
    return {
        "train-images-idx3-ubyte": idx_images(TRAIN_SIZE, first_value=0),
        "train-labels-idx1-ubyte": idx_labels(TRAIN_SIZE),
        "t10k-images-idx3-ubyte": idx_images(TEST_SIZE, first_value=7),
        "t10k-labels-idx1-ubyte": idx_labels(TEST_SIZE),
    }


def write_gz(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in original_files().items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))}


@pytest.fixture(autouse=True)
def no_debian_package(monkeypatch, tmp_path):
    """Keep the machine's own Debian package, if installed, out of these tests."""
    monkeypatch.setattr(data, "DEBIAN_PACKAGE_DIR", tmp_path / "usr-share-datasets-fashion-mnist")


def test_source_dir_is_decompressed_into_data_dir_and_split_by_seed(tmp_path):
    source = write_gz(tmp_path / "source")
    datamodule = FashionMNISTDataModule(
        data_dir=tmp_path / "data", source_dirs=[source], val_size=6, batch_size=8, download=False
    )

    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")

    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(path.name for path in raw_dir.iterdir()) == sorted(RAW_FILES)
    for name, content in original_files().items():
        assert (raw_dir / name).read_bytes() == content
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset), len(datamodule.test_dataset)) == (24, 6, 20)

    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    first_image = torch.arange(28 * 28, dtype=torch.float32).remainder(256).reshape(1, 28, 28)
    _, test_labels = datamodule.test_dataset[:]
    torch.testing.assert_close(datamodule.test_dataset[0][0], ((first_image + 7) % 256 / 255 - PIXEL_MEAN) / PIXEL_STD)
    assert test_labels.tolist() == [i % 10 for i in range(TEST_SIZE)]

    def split(seed: int) -> tuple[list[int], list[int]]:
        datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", val_size=6, seed=seed, download=False)
        datamodule.prepare_data()
        datamodule.setup("fit")
        return [
            datamodule.train_dataset.tensors[0][:, 0, 0, 0].tolist(),
            datamodule.val_dataset.tensors[0][:, 0, 0, 0].tolist(),
        ]

    assert split(seed=0) == split(seed=0)
    assert split(seed=0) != split(seed=1)
    train, val = split(seed=0)
    assert len(set(train) | set(val)) == TRAIN_SIZE


def test_files_already_in_data_dir_are_used(tmp_path):
    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, content in original_files().items():
        (raw_dir / name).write_bytes(content)
    before = snapshot(raw_dir)

    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", val_size=5, download=False)
    datamodule.prepare_data()
    datamodule.setup("fit")

    assert snapshot(raw_dir) == before
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset)) == (25, 5)


def test_gz_files_in_data_dir_are_decompressed_beside_them(tmp_path):
    raw_dir = write_gz(tmp_path / "data" / "FashionMNIST" / "raw")

    FashionMNISTDataModule(data_dir=tmp_path / "data", download=False).prepare_data()

    assert sorted(path.name for path in raw_dir.iterdir()) == sorted([*RAW_FILES, *(f"{n}.gz" for n in RAW_FILES)])


def test_nothing_found_names_the_files_and_every_place_searched(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    absent = tmp_path / "absent"
    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", source_dirs=[empty, absent], download=False)

    with pytest.raises(FashionMNISTNotFoundError, match="Fashion-MNIST not found") as caught:
        datamodule.prepare_data()

    message = str(caught.value)
    for name in RAW_FILES:
        assert f"{name}.gz" in message
    for place in (tmp_path / "data" / "FashionMNIST" / "raw", empty, absent, data.DEBIAN_PACKAGE_DIR):
        assert str(place) in message
    assert f"{absent} (does not exist)" in message
    assert "download=False" in message
    assert "source_dirs" in message and "dataset-fashion-mnist" in message
    assert caught.value.missing == RAW_FILES


def test_partly_found_reports_only_the_missing_files(tmp_path):
    source = write_gz(tmp_path / "source")
    (source / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(FashionMNISTNotFoundError, match=r"missing t10k-labels-idx1-ubyte \(") as caught:
        FashionMNISTDataModule(data_dir=tmp_path / "data", source_dirs=[source], download=False).prepare_data()

    assert caught.value.missing == ("t10k-labels-idx1-ubyte",)


def test_source_dir_is_left_unchanged(tmp_path):
    source = write_gz(tmp_path / "source")
    before = snapshot(source)

    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", source_dirs=[source], val_size=5, download=False)
    datamodule.prepare_data()
    datamodule.setup("fit")

    assert snapshot(source) == before


def test_relative_source_dir_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    write_gz(tmp_path / "shared" / "raw")
    monkeypatch.chdir(tmp_path / "shared")
    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", source_dirs=["raw"], download=False)
    monkeypatch.chdir(tmp_path)

    datamodule.prepare_data()

    assert datamodule.source_dirs == (tmp_path / "shared" / "raw",)


def test_damaged_source_file_is_named_and_not_installed(tmp_path):
    source = write_gz(tmp_path / "source")
    (source / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(TRAIN_SIZE, 0)[:-1]))

    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", source_dirs=[source], download=False)
    with pytest.raises(IdxFormatError, match=r"train-images-idx3-ubyte\.gz: 23535 bytes, but its header declares 30"):
        datamodule.prepare_data()

    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert not list((tmp_path / "data" / "FashionMNIST" / "raw").glob("*.partial-*"))


def test_setup_before_prepare_data_says_what_to_do(tmp_path):
    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", download=False)
    with pytest.raises(FileNotFoundError, match=r"call prepare_data\(\) first"):
        datamodule.setup("fit")


def test_val_size_must_leave_training_images(tmp_path):
    write_gz(tmp_path / "data" / "FashionMNIST" / "raw")
    datamodule = FashionMNISTDataModule(data_dir=tmp_path / "data", val_size=TRAIN_SIZE, download=False)
    datamodule.prepare_data()
    with pytest.raises(ValueError, match=r"val_size=30\): the training file holds only 30 images"):
        datamodule.setup("fit")


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"val_size": 0}, r"val_size=0"),
        ({"batch_size": 0}, r"batch_size=0"),
        ({"num_workers": -1}, r"num_workers=-1"),
    ],
)
def test_bad_arguments_are_refused_at_once(arguments, match):
    with pytest.raises(ValueError, match=match):
        FashionMNISTDataModule(**arguments)
