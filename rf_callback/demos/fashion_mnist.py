"""Fashion-MNIST as a LightningDataModule: found offline, held in memory, split the same way on every run.

:meth:`FashionMNISTDataModule.prepare_data` puts the four uncompressed IDX files into torchvision's layout,
``<data_dir>/FashionMNIST/raw/``. It takes them, in this order, from that folder itself (uncompressed or
``.gz``), from each of ``source_dirs``, from the Debian package ``dataset-fashion-mnist``
(:data:`DEBIAN_PACKAGE_DIR`), and last from torchvision's download. Source folders are only read: files are
copied or decompressed into ``data_dir``. Every file is checked (IDX magic number, 28x28 images, length) before
it is used, because a ``.gz`` checksum cannot be: Debian's reproducible builds rewrite the gzip header.

:meth:`FashionMNISTDataModule.setup` reads the files with :class:`torchvision.datasets.FashionMNIST` and keeps
the images as one normalized float tensor, served by :class:`~torch.utils.data.TensorDataset`: no per-image
PIL conversion, so an epoch on two CPU cores spends its time in the model.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import FashionMNIST
from typing_extensions import override

__all__ = [
    "CLASSES",
    "DEBIAN_PACKAGE_DIR",
    "IMAGE_SHAPE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "RAW_FILES",
    "FashionMNISTDataModule",
    "FashionMNISTNotFoundError",
    "IdxFormatError",
    "check_idx_file",
]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
"""Class names, indexed by label (torchvision's order)."""

PIXEL_MEAN = 0.2860
"""Mean pixel value of the training images, scaled to [0, 1]."""

PIXEL_STD = 0.3530
"""Standard deviation of the training pixels, scaled to [0, 1]."""

IMAGE_SHAPE = (1, 28, 28)
"""Shape ``(channels, h, w)`` of one image as the data module serves it."""

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
"""The four IDX files of the original release; each may also be found compressed, with ``.gz`` appended."""

DEBIAN_PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four ``.gz`` files."""

_IMAGE_MAGIC = 0x00000803  # unsigned bytes, three dimensions
_LABEL_MAGIC = 0x00000801  # unsigned bytes, one dimension


class FashionMNISTNotFoundError(FileNotFoundError):
    """The four Fashion-MNIST files are in none of the places searched, and download is off or failed.

    Attributes:
        missing: the file names that were not found (without ``.gz``).
        searched: every folder searched, in order.
        raw_dir: the folder where the files belong, ``<data_dir>/FashionMNIST/raw``.
        download_error: why the download failed; ``None`` when download was not allowed.
    """

    def __init__(
        self,
        missing: Sequence[str],
        searched: Sequence[Path],
        raw_dir: Path,
        download_error: BaseException | None,
    ) -> None:
        self.missing = tuple(missing)
        self.searched = tuple(searched)
        self.raw_dir = raw_dir
        self.download_error = download_error
        places = "\n".join(f"  - {place}{'' if place.is_dir() else ' (does not exist)'}" for place in self.searched)
        if download_error is None:
            download = "not tried (download=False)"
            online = "or set download=True on a machine with internet access."
        else:
            download = f"failed: {type(download_error).__name__}: {download_error}".rstrip()
            online = "or run once on a machine with internet access."
        wanted = ", ".join(f"{name}.gz" for name in RAW_FILES)
        super().__init__(
            f"Fashion-MNIST not found: missing {', '.join(self.missing)} (uncompressed or as .gz).\n"
            f"Looked in:\n{places}\nDownload: {download}\n"
            f"HINT: put the four files {wanted} into {raw_dir}/, or pass source_dirs=[...] (--data.source_dirs on"
            " the command line) naming a folder that holds them, or install the Debian package"
            f" dataset-fashion-mnist (apt install dataset-fashion-mnist, files in {DEBIAN_PACKAGE_DIR}), {online}"
        )


class IdxFormatError(ValueError):
    """A file found for Fashion-MNIST is not a valid uncompressed IDX file of 28x28 images or of labels.

    Attributes:
        path: the file.
        problem: what is wrong with it.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class FashionMNISTDataModule(lightning.LightningDataModule):
    """Fashion-MNIST, found offline where possible, held in memory as normalized tensors.

    The 60,000 training images are split into ``60,000 - val_size`` for training and ``val_size`` for
    validation by a permutation drawn from a :class:`torch.Generator` seeded with ``seed``: the split depends
    on ``seed`` only, never on the global random state. The 10,000 test images form the test set. Each batch
    is ``(images, labels)``: images ``float32`` of shape ``(N, 1, 28, 28)``, normalized with
    :data:`PIXEL_MEAN` and :data:`PIXEL_STD`; labels ``int64`` indices into :data:`CLASSES`.

    Args:
        data_dir: the folder that holds (or will hold) ``FashionMNIST/raw/``, as torchvision's ``root``.
        source_dirs: read-only folders to take the four files from when ``data_dir`` lacks them, searched in
            order after ``data_dir`` and before :data:`DEBIAN_PACKAGE_DIR`; folders that do not exist are
            skipped. Relative paths are resolved against the current working directory when the data module
            is created.
        val_size: how many training images to hold out for validation.
        seed: seed of the train/validation split.
        batch_size: images per batch in every loader.
        num_workers: worker processes per loader; 0 (loading in the main process) is fastest for tensors
            already in memory.
        download: whether to download the files with torchvision when they are found nowhere else.

    Raises:
        ValueError: if ``val_size``, ``batch_size`` or ``num_workers`` is out of range.

    Example::
        >>> datamodule = FashionMNISTDataModule(source_dirs=["../shared/data/FashionMNIST/raw"], batch_size=64)
        >>> datamodule.raw_dir.as_posix()
        'data/FashionMNIST/raw'
        >>> datamodule.prepare_data()  # doctest: +SKIP
        >>> datamodule.setup("fit")  # doctest: +SKIP
        >>> images, labels = next(iter(datamodule.train_dataloader()))  # doctest: +SKIP
        >>> images.shape, labels.shape  # doctest: +SKIP
        (torch.Size([64, 1, 28, 28]), torch.Size([64]))
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        source_dirs: Sequence[str | Path] = (),
        val_size: int = 5000,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.source_dirs = tuple(Path(os.path.abspath(Path(source).expanduser())) for source in source_dirs)
        self.val_size = val_size
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self._validate_arguments()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _validate_arguments(self) -> None:
        if self.val_size < 1:
            raise ValueError(
                f"FashionMNISTDataModule(val_size={self.val_size}): the validation set needs at least one image."
                " HINT: the default is 5000 (of 60000 training images)."
            )
        if self.batch_size < 1:
            raise ValueError(f"FashionMNISTDataModule(batch_size={self.batch_size}): batch_size must be at least 1.")
        if self.num_workers < 0:
            raise ValueError(
                f"FashionMNISTDataModule(num_workers={self.num_workers}): num_workers must be 0 (load in the main"
                " process) or more."
            )

    @property
    def raw_dir(self) -> Path:
        """Where torchvision reads the files: ``<data_dir>/FashionMNIST/raw``."""
        return self.data_dir / "FashionMNIST" / "raw"

    @property
    def search_dirs(self) -> tuple[Path, ...]:
        """Every folder :meth:`prepare_data` looks in, in order."""
        return (self.raw_dir, *self.source_dirs, DEBIAN_PACKAGE_DIR)

    @override
    def prepare_data(self) -> None:
        """Put the four checked IDX files into :attr:`raw_dir`, from the first place that has each.

        Raises:
            FashionMNISTNotFoundError: if some file is nowhere and download is off or failed.
            IdxFormatError: if a file found is not a Fashion-MNIST IDX file.
            ValueError: if the image and label files of a split hold different numbers of items.
        """
        missing = [name for name in RAW_FILES if not self._place_raw_file(name)]
        if missing:
            download_error = self._download() if self.download else None
            if not self.download or download_error is not None:
                raise FashionMNISTNotFoundError(missing, self.search_dirs, self.raw_dir, download_error)
        for split in ("train", "t10k"):
            images = check_idx_file(self.raw_dir / f"{split}-images-idx3-ubyte")
            labels = check_idx_file(self.raw_dir / f"{split}-labels-idx1-ubyte")
            if images != labels:
                raise ValueError(
                    f"Fashion-MNIST in {self.raw_dir}: {split}-images-idx3-ubyte holds {images} images but"
                    f" {split}-labels-idx1-ubyte holds {labels} labels. HINT: the two files come from different"
                    " releases; delete both and run again to fetch a matching pair."
                )

    def _download(self) -> BaseException | None:
        """Download the four files with torchvision; the error when that fails, else ``None``."""
        try:
            FashionMNIST(self.data_dir, train=True, download=True)
        except (RuntimeError, OSError) as error:
            return error
        return None

    def _place_raw_file(self, name: str) -> bool:
        """Make sure ``raw_dir/name`` exists and is checked; ``False`` when no searched folder has it."""
        target = self.raw_dir / name
        if target.is_file():
            try:
                check_idx_file(target)
            except IdxFormatError as error:
                raise IdxFormatError(
                    target, f"{error.problem}. HINT: delete it, and run again to copy or download it anew"
                ) from error
            return True
        for folder in self.search_dirs:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    _copy_checked(candidate, target)
                    return True
        return False

    @override
    def setup(self, stage: str) -> None:
        """Load the sets ``stage`` needs: train and validation for ``fit``/``validate``, test otherwise."""
        if stage in ("fit", "validate") and self.train_dataset is None:
            images, labels = self._load(train=True)
            if self.val_size >= len(labels):
                raise ValueError(
                    f"FashionMNISTDataModule(val_size={self.val_size}): the training file holds only {len(labels)}"
                    " images, and at least one must be left for training. HINT: lower val_size."
                )
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(labels), generator=generator)
            val_indices, train_indices = order[: self.val_size], order[self.val_size :]
            self.train_dataset = TensorDataset(images[train_indices], labels[train_indices])
            self.val_dataset = TensorDataset(images[val_indices], labels[val_indices])
            self.val_dataset.classes = list(CLASSES)  # what probes_from_dataset writes under each probe
        if stage in ("test", "predict") and self.test_dataset is None:
            self.test_dataset = TensorDataset(*self._load(train=False))

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        absent = [name for name in RAW_FILES if not (self.raw_dir / name).is_file()]
        if absent:
            raise FileNotFoundError(
                f"FashionMNISTDataModule.setup(): {', '.join(absent)} not in {self.raw_dir}. HINT: call"
                " prepare_data() first; the Trainer does so before setup()."
            )
        dataset = FashionMNIST(self.data_dir, train=train, download=False)
        images = dataset.data.unsqueeze(1).float().div_(255).sub_(PIXEL_MEAN).div_(PIXEL_STD)
        return images, dataset.targets

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "fit", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "fit", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", shuffle=False)

    def _loader(self, dataset: TensorDataset | None, stage: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"FashionMNISTDataModule: call setup({stage!r}) before asking for its data loader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def check_idx_file(path: Path) -> int:
    """Check that ``path`` is an uncompressed Fashion-MNIST IDX file; return how many items it holds.

    An image file (``images`` in its name) must carry magic number 0x803 and 28x28 images, a label file magic
    number 0x801, and both exactly the length their header declares.

    Raises:
        IdxFormatError: naming the file and what is wrong with it.

    Example::
        >>> import tempfile
        >>> labels = Path(tempfile.mkdtemp()) / "t10k-labels-idx1-ubyte"
        >>> _ = labels.write_bytes(struct.pack(">II", 0x801, 3) + bytes([9, 2, 1]))
        >>> check_idx_file(labels)
        3
        >>> _ = labels.write_bytes(struct.pack(">II", 0x801, 4) + bytes([9, 2, 1]))  # one label short
        >>> try:
        ...     check_idx_file(labels)
        ... except IdxFormatError as error:
        ...     print(error.problem)
        11 bytes, but its header declares 4 items (12 bytes)
    """
    images = "images" in path.name
    header_size = 16 if images else 8
    with path.open("rb") as file:
        header = file.read(header_size)
    if len(header) < header_size:
        raise IdxFormatError(path, f"{len(header)} bytes, too short for an IDX header")
    magic, count, *shape = struct.unpack(">IIII" if images else ">II", header)
    expected_magic = _IMAGE_MAGIC if images else _LABEL_MAGIC
    if magic != expected_magic:
        kind = "image" if images else "label"
        raise IdxFormatError(
            path, f"IDX magic number {magic:#x}, expected {expected_magic:#x} (uncompressed Fashion-MNIST {kind} file)"
        )
    if images and shape != [28, 28]:
        raise IdxFormatError(path, f"images of {shape[0]}x{shape[1]} pixels, expected 28x28")
    expected_size = header_size + count * (28 * 28 if images else 1)
    size = path.stat().st_size
    if size != expected_size:
        raise IdxFormatError(path, f"{size} bytes, but its header declares {count} items ({expected_size} bytes)")
    return count


def _copy_checked(source: Path, target: Path) -> None:
    """Copy ``source`` (decompressing a ``.gz``) to ``target`` through a temporary file, checked before use."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with (
            gzip.open(source, "rb") if source.suffix == ".gz" else source.open("rb") as reader,
            partial.open("wb") as writer,
        ):
            shutil.copyfileobj(reader, writer, length=1 << 20)
        try:
            check_idx_file(partial)
        except IdxFormatError as error:
            raise IdxFormatError(
                source,
                f"{error.problem} once decompressed. HINT: replace it with the file of the original release, or"
                " remove its folder from source_dirs",
            ) from error
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
