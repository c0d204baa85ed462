"""A tiny LightningModule and data for callback tests, and readers for TensorBoard event files and offline W&B runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyCNN(LightningModule):
    """Convolutions, BatchNorm, dropout and pooling: everything the callback must not disturb."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv1(x))))
        x = F.relu(self.conv2(x))
        return self.head(self.drop(x.mean((2, 3))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_dataset(count: int = 64, classes: int = 4, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, 12, 12, generator=generator)
    labels = torch.arange(count) % classes
    images[:, :, :6] += labels.view(-1, 1, 1, 1) / classes  # something to learn
    return TensorDataset(images, labels)


def loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(tiny_dataset(seed=0), batch_size=batch_size, shuffle=True),
        DataLoader(tiny_dataset(seed=1, count=32), batch_size=batch_size),
    )


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def raw_values(log_dir) -> list[Summary.Value]:
    """Every summary value of the event files in ``log_dir``, in order, as written: not migrated to the
    forms TensorBoard's Python loader turns them into."""
    values = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(path)).Load():
            values.extend(Event.FromString(record).summary.value)
    return values


def read_wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``run-<id>.wandb`` transaction log.

    The log is LevelDB's format behind a 7-byte header (``:W&B``, magic, version): 32 KiB blocks of
    records, each a 7-byte header (CRC-32C, length, type: 1 whole, 2 first, 3 middle, 4 last) and a
    piece of a serialized ``wandb_internal_pb2.Record``. A media value is a dict of its fields
    (``{"_type": "image-file", "path": ..., "width": ..., "height": ...}``), a path relative to
    ``<run_dir>/files``.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    rows, pending, position, block, kind_of_last = [], b"", 7, 32768, None
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            kind_of_last = record.WhichOneof("record_type")
            if kind_of_last == "history":
                row: dict = {}
                for item in record.history.item:
                    key, *field = [item.key] if item.key else list(item.nested_key)
                    value = json.loads(item.value_json)
                    if field:
                        row.setdefault(key, {})[field[0]] = value
                    else:
                        row[key] = value
                rows.append(row)
    assert kind_of_last == "exit", f"{path} ends before its exit record: is the run finished and W&B torn down?"
    return rows
