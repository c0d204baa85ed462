"""Probe images: a fixed set of inputs to look through, picked once from a dataset.

:func:`probes_from_dataset` picks the first item of each class, in class order, the same way for the
Lightning callback, :mod:`rf_callback.compare` and the demos. It reads labels from the dataset's
label array when it has one (``targets`` or ``labels``, as torchvision's datasets; the label tensor of
a ``TensorDataset``; through ``Subset``), so that a class-sorted dataset still gives one probe per
class without decoding its images; otherwise it scans items by index, bounded in count and time. It
draws nothing from the global random state: items are read by index (never through a DataLoader
iterator), inside an isolated random state that undoes what a random transform draws.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

__all__ = ["Probes", "as_probes", "check_finite", "probe_source", "probes_from_dataset"]

SCAN_ITEMS = 20_000
"""At most this many items are read to find the classes of a dataset without a label array."""
SCAN_SECONDS = 5.0
"""... and for at most this long."""


@dataclass(frozen=True)
class Probes:
    """Probe images and, when known, their labels and where they came from.

    Attributes:
        images: float tensor ``(N, C, *spatial)``, as the model takes it.
        labels: a caption per probe (class names when the dataset has them), or ``None``.
        indices: the dataset index of each probe, or ``None`` for given tensors.
    """

    images: Tensor
    labels: tuple[str, ...] | None = None
    indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() < 3 or len(self.images) == 0:
            found = (
                f"a tensor of shape {tuple(self.images.shape)}"
                if isinstance(self.images, Tensor)
                else (f"a {type(self.images).__name__}")
            )
            raise ValueError(
                f"probes must be a tensor (N, C, H, W) with N >= 1 ((N, C, L) or (N, C, D, H, W) for 1-D or 3-D"
                f" models); got {found}. HINT: torch.stack the images, or pass dataset indices."
            )
        for name in ("labels", "indices"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.images):
                raise ValueError(f"Probes: {len(self.images)} images but {len(value)} {name}.")
        check_finite(self.images)


def check_finite(images: Tensor) -> None:
    """A ``ValueError`` naming the probes of ``images`` ``(N, C, ...)`` that hold NaN or infinite values.

    Example::
        >>> check_finite(torch.tensor([[[0.0, 1.0]], [[float("nan"), 0.0]]]))
        Traceback (most recent call last):
        ValueError: probes hold NaN or infinite values (probe 1), so every map of them would too. HINT: give finite \
images (torch.nan_to_num), or other probes.
    """
    if not images.is_floating_point() and not images.is_complex():
        return
    bad = (~torch.isfinite(images.detach()).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(
            f"probes hold NaN or infinite values (probe{'s' if len(bad) > 1 else ''} {shown}), so every map of them"
            " would too. HINT: give finite images (torch.nan_to_num), or other probes."
        )


def probe_source(value: Any) -> tuple[Probes | None, list[int] | None]:
    """What a ``probes=`` argument asks for: given images, dataset indices, or neither (``None``).

    Raises:
        TypeError: for anything else (a string, an array, a list of non-ints), said in one short line.

    Example::
        >>> probe_source([3, 1])
        (None, [3, 1])
    """
    if value is None:
        return None, None
    if isinstance(value, Tensor):
        return as_probes(value), None
    if (
        isinstance(value, (list, tuple, range))
        and len(value) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    ):
        return None, list(value)
    return as_probes(value), None  # raises, naming what was found


def as_probes(value: Any) -> Probes:
    """``value`` as :class:`Probes`: Probes as they are, a tensor ``(N, C, ...)`` as images without labels.

    Numpy arrays and nested lists are refused with a short message (never the whole array).

    Example::
        >>> as_probes(torch.zeros(2, 1, 4, 4)).images.shape
        torch.Size([2, 1, 4, 4])
    """
    if isinstance(value, Probes):
        return value
    if isinstance(value, Tensor):
        return Probes(value.detach().float().cpu().clone())
    shape = getattr(value, "shape", None)
    described = f"a {type(value).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")
    raise TypeError(
        f"probes must be a torch.Tensor (N, C, H, W) or dataset indices (a list of ints); got {described}."
        " HINT: torch.as_tensor(array).float(), or [0, 17, 42]."
    )


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and CUDA) global random states, restored on exit."""
    python_state = random.getstate()
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        numpy, numpy_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def image_and_label(item: Any) -> tuple[Tensor, Hashable | None]:
    """A dataset item as ``(image, label or None)``: ``(x, y, ...)``, ``{"image": x, "label": y}`` or ``x``.

    Tensor labels become ints; one-hot (or probability) vectors become their argmax; strings stay strings.

    Example::
        >>> image_and_label((torch.zeros(1, 2, 2), torch.tensor([0.0, 1.0, 0.0])))[1]
        1
    """
    if isinstance(item, dict):
        image = next((item[k] for k in ("image", "images", "input", "x", "pixel_values") if k in item), None)
        label = next((item[k] for k in ("label", "labels", "target", "targets", "y") if k in item), None)
    elif isinstance(item, (tuple, list)):
        image, label = item[0], (item[1] if len(item) > 1 else None)
    else:
        image, label = item, None
    if not isinstance(image, Tensor):
        raise TypeError(
            f"dataset items must hold the image as a tensor; got {type(image).__name__}. HINT: add"
            " transforms.ToTensor() to the dataset, or pass probes as a tensor (N, C, H, W)."
        )
    return image, _label(label)


def _label(label: Any) -> Hashable | None:
    if isinstance(label, Tensor):
        if label.numel() == 1:
            label = label.item()
        elif label.dim() == 1:
            return int(label.argmax())  # one-hot or class probabilities
        else:
            return None
    if isinstance(label, bool) or label is None:
        return None
    if isinstance(label, float) and label.is_integer():
        return int(label)
    return label if isinstance(label, Hashable) else None


def _label_array(dataset: Any) -> list[Hashable | None] | None:
    """Every item's label without reading the items, when the dataset keeps them in one array."""
    if isinstance(dataset, Subset):
        inner = _label_array(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return [_label(label) for label in dataset.tensors[1]]
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if isinstance(values, Tensor) and values.dim() >= 1 and len(values) == len(dataset):
            return [_label(label) for label in values]
        if isinstance(values, (list, tuple)) and len(values) == len(dataset):
            return [_label(label) for label in values]
    return None


def _class_names(dataset: Any) -> Sequence[str] | None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return names if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names) else None


def _first_of_each_class(dataset: Any, num_probes: int) -> tuple[list[int], list[Hashable | None]]:
    labels = _label_array(dataset)
    if labels is None:  # read items by index until enough classes are seen, bounded in count and time
        labels, deadline = [], time.monotonic() + SCAN_SECONDS
        for i in range(min(len(dataset), SCAN_ITEMS)):
            labels.append(image_and_label(dataset[i])[1])
            if len(set(labels)) >= num_probes or time.monotonic() > deadline:
                break
    first: dict[Hashable, int] = {}
    for index, label in enumerate(labels):
        if label is not None and label not in first:
            first[label] = index
    if not first:  # unlabelled: the first items
        return list(range(min(num_probes, len(dataset)))), [None] * min(num_probes, len(dataset))
    try:
        classes = sorted(first)
    except TypeError:  # labels of mixed types: order of first appearance
        classes = list(first)
    if len(classes) < num_probes and len(labels) < len(dataset):  # classes may hide in the items not read
        warnings.warn(
            f"probes_from_dataset: found {len(classes)} distinct classes in the {len(labels)} labels read, fewer than"
            f" num_probes={num_probes}; using one probe per class found. HINT: pass dataset indices or a tensor.",
            stacklevel=3,
        )
    classes = classes[:num_probes]
    return [first[c] for c in classes], list(classes)


def probes_from_dataset(dataset: Dataset, num_probes: int = 10, indices: Sequence[int] | None = None) -> Probes:
    """The first item of each class (in class order, at most ``num_probes``), or the items at ``indices``.

    Args:
        dataset: a map-style dataset whose items are ``(image, label, ...)``, ``{"image": ..., "label": ...}``
            or bare images. Labels may be ints, tensors, one-hot vectors or strings.
        num_probes: how many classes at most.
        indices: take exactly these items instead.

    Returns:
        :class:`Probes` with class names as labels when the dataset has ``classes``.

    Raises:
        TypeError: for an ``IterableDataset`` (no indices to pick from) or items without a tensor image.
        IndexError: for an index outside the dataset.

    Example::
        >>> data = TensorDataset(torch.rand(6, 1, 4, 4), torch.tensor([2, 2, 0, 1, 0, 1]))
        >>> probes = probes_from_dataset(data, num_probes=3)
        >>> probes.indices, probes.labels
        ((2, 3, 0), ('0', '1', '2'))
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"probes_from_dataset: {type(dataset).__name__} cannot be indexed (an IterableDataset or a stream), so"
            " probes cannot be picked from it. HINT: pass probes as a tensor (N, C, H, W), e.g. one batch of it."
        )
    size = len(dataset)
    with isolated_rng():
        if indices is not None:
            chosen = list(indices)
            bad = [i for i in chosen if not -size <= i < size]
            if bad:
                raise IndexError(
                    f"probes_from_dataset(indices={chosen}): {bad} outside the dataset of {size} items."
                    f" HINT: use indices from 0 to {size - 1}."
                )
            items = [image_and_label(dataset[i]) for i in chosen]
            labels = [label for _, label in items]
        else:
            chosen, labels = _first_of_each_class(dataset, num_probes)
            items = [image_and_label(dataset[i]) for i in chosen]
    images = torch.stack([image.detach().float().cpu() for image, _ in items])
    names = _class_names(dataset)
    captions = None
    if any(label is not None for label in labels):
        captions = tuple(
            ""
            if label is None
            else names[label]
            if names is not None and isinstance(label, int) and 0 <= label < len(names)
            else str(label)
            for label in labels
        )
    return Probes(images, captions, tuple(int(i) % size for i in chosen))
