"""A tiny LightningModule and data for callback tests, and a reader for TensorBoard event files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
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
