"""Fashion-MNIST classifiers whose receptive fields grow in three different ways.

* :class:`SmallCNN`: stacked 3x3 convolutions and 2x2 max pooling, the textbook way (the default).
* :class:`ResidualCNN`: residual blocks whose skip connections add branches of different depths; strided
  blocks take a 1x1 projection shortcut.
* :class:`DilatedCNN`: dilated 3x3 convolutions (dilation 2 and 4) that widen the field with one pooling only.

Each is a :class:`FashionMNISTClassifier`: ``features`` (named convolution and pooling layers, what a
receptive-field tool walks) followed by ``classifier``, trained with cross-entropy and AdamW.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from typing_extensions import override

from rf_callback.demos.fashion_mnist import CLASSES, IMAGE_SHAPE

__all__ = ["DilatedCNN", "FashionMNISTClassifier", "ResidualBlock", "ResidualCNN", "SmallCNN"]


class FashionMNISTClassifier(lightning.LightningModule):
    """Training, evaluation and optimization shared by the Fashion-MNIST models; subclasses build the layers.

    A subclass sets ``self.features`` (images ``(N, 1, 28, 28)`` to feature maps) and ``self.classifier``
    (feature maps to ``(N, 10)`` logits) and calls ``self.save_hyperparameters()`` so that
    ``load_from_checkpoint`` can rebuild it.

    Logged metrics: ``train_loss`` (every step), ``val_loss`` and ``val_acc`` (every validation epoch),
    ``test_loss`` and ``test_acc``.

    Args:
        lr: AdamW's learning rate; with ``lr_schedule="one_cycle"``, the peak of the one-cycle schedule.
        weight_decay: AdamW's decoupled weight decay.
        lr_schedule: ``"one_cycle"``: warm up to ``lr`` over the first 30% of the run's steps, then anneal to
            almost zero by its last step (needs a run of known length: ``max_epochs`` or ``max_steps``);
            ``"constant"``: ``lr`` throughout.

    Raises:
        TypeError: if this base class is created itself rather than a subclass.
        ValueError: if ``lr`` or ``weight_decay`` is negative, or ``lr_schedule`` is unknown.
    """

    def __init__(
        self,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["one_cycle", "constant"] = "one_cycle",
    ) -> None:
        super().__init__()
        if type(self) is FashionMNISTClassifier:
            raise TypeError(
                "FashionMNISTClassifier is the base class and has no layers. HINT: choose a model, e.g."
                " rf_callback.demos.cnns.SmallCNN, ResidualCNN or DilatedCNN (model.class_path on the command line)."
            )
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self._validate_arguments()
        self.example_input_array = torch.zeros(1, *IMAGE_SHAPE)
        self.features: nn.Module
        self.classifier: nn.Module

    def _validate_arguments(self) -> None:
        name = type(self).__name__
        if self.lr <= 0:
            raise ValueError(f"{name}(lr={self.lr}): the learning rate must be positive, e.g. 3e-3.")
        if self.weight_decay < 0:
            raise ValueError(f"{name}(weight_decay={self.weight_decay}): weight decay must be 0 or more.")
        if self.lr_schedule not in ("one_cycle", "constant"):
            raise ValueError(
                f"{name}(lr_schedule={self.lr_schedule!r}): unknown schedule. Available: 'one_cycle', 'constant'."
            )

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 10)``, in the order of :data:`rf_callback.demos.fashion_mnist.CLASSES`, of images ``(N, 1, 28, 28)``."""
        return self.classifier(self.features(images))

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Literal["val", "test"]) -> None:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), batch_size=len(labels))
        self.log(f"{stage}_acc", accuracy, prog_bar=True, batch_size=len(labels))

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                f"{type(self).__name__}(lr_schedule='one_cycle') needs a run of known length, but the Trainer has"
                " neither max_epochs nor max_steps. HINT: set trainer.max_epochs, or lr_schedule='constant'."
            )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _conv_bn_relu(index: int, in_channels: int, out_channels: int, dilation: int = 1) -> list[tuple[str, nn.Module]]:
    """Named ``conv{index}`` (3x3, same size), ``bn{index}`` and ``relu{index}`` for an ``OrderedDict``."""
    return [
        (f"conv{index}", nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)),
        (f"bn{index}", nn.BatchNorm2d(out_channels)),
        (f"relu{index}", nn.ReLU()),
    ]


def _check_channels(model: str, channels: Sequence[int], count: int) -> tuple[int, ...]:
    if len(channels) != count or any(c < 1 for c in channels):
        raise ValueError(
            f"{model}(channels={list(channels)}): expected {count} positive channel counts, one per convolution."
        )
    return tuple(channels)


class SmallCNN(FashionMNISTClassifier):
    """Two blocks of two 3x3 convolutions, each block ending in 2x2 max pooling, then a linear classifier.

    ``features``: ``conv1 → conv2 → pool1`` at 28x28, ``conv3 → conv4 → pool2`` at 14x14 (each convolution
    followed by batch norm and ReLU), ending at 7x7 with a receptive field of 16x16 pixels.
    ``classifier``: ``flatten → dropout → fc``.

    Args:
        channels: output channels of ``conv1`` to ``conv4``.
        dropout: dropout probability before ``fc``.
        lr: see :class:`FashionMNISTClassifier`.
        weight_decay: see :class:`FashionMNISTClassifier`.
        lr_schedule: see :class:`FashionMNISTClassifier`.

    Example::
        >>> model = SmallCNN()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [name for name, _ in model.features.named_children() if "conv" in name or "pool" in name]
        ['conv1', 'conv2', 'pool1', 'conv3', 'conv4', 'pool2']
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 16, 32, 32),
        dropout: float = 0.2,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["one_cycle", "constant"] = "one_cycle",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule)
        self.save_hyperparameters()
        c1, c2, c3, c4 = _check_channels("SmallCNN", channels, 4)
        self.features = nn.Sequential(
            OrderedDict(
                [
                    *_conv_bn_relu(1, IMAGE_SHAPE[0], c1),
                    *_conv_bn_relu(2, c1, c2),
                    ("pool1", nn.MaxPool2d(2)),
                    *_conv_bn_relu(3, c2, c3),
                    *_conv_bn_relu(4, c3, c4),
                    ("pool2", nn.MaxPool2d(2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("dropout", nn.Dropout(dropout)),
                    ("fc", nn.Linear(c4 * 7 * 7, len(CLASSES))),
                ]
            )
        )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to a shortcut of the input, then ReLU (ResNet's basic block).

    The shortcut is the identity when the block keeps the shape, else a 1x1 convolution with the block's
    stride followed by batch norm (a projection), so both branches see the same input pixels.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of ``conv1`` and of the projection; 2 halves the height and width.

    Example::
        >>> block = ResidualBlock(16, 32, stride=2)
        >>> block(torch.zeros(1, 16, 28, 28)).shape, type(block.shortcut).__name__
        (torch.Size([1, 32, 14, 14]), 'Sequential')
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    [
                        ("conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)),
                        ("bn", nn.BatchNorm2d(out_channels)),
                    ]
                )
            )
        self.relu2 = nn.ReLU()

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(residual + self.shortcut(x))


class ResidualCNN(FashionMNISTClassifier):
    """A small ResNet: a 3x3 stem, three residual blocks (the last two strided), global average pooling.

    ``features``: ``stem`` (conv, batch norm, ReLU) and ``block1`` at 28x28, ``block2`` at 14x14 and
    ``block3`` at 7x7, each a :class:`ResidualBlock`; ``block2`` and ``block3`` halve the size and take a
    1x1 projection shortcut. ``classifier``: ``pool`` (global average) ``→ flatten → fc``.

    Args:
        channels: output channels of ``stem``/``block1``, ``block2`` and ``block3``.
        lr: see :class:`FashionMNISTClassifier`.
        weight_decay: see :class:`FashionMNISTClassifier`.
        lr_schedule: see :class:`FashionMNISTClassifier`.

    Example::
        >>> model = ResidualCNN()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [name for name, _ in model.features.named_children()]
        ['stem', 'block1', 'block2', 'block3']
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["one_cycle", "constant"] = "one_cycle",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule)
        self.save_hyperparameters()
        c1, c2, c3 = _check_channels("ResidualCNN", channels, 3)
        self.features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "stem",
                        nn.Sequential(
                            OrderedDict(
                                [
                                    ("conv", nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1, bias=False)),
                                    ("bn", nn.BatchNorm2d(c1)),
                                    ("relu", nn.ReLU()),
                                ]
                            )
                        ),
                    ),
                    ("block1", ResidualBlock(c1, c1)),
                    ("block2", ResidualBlock(c1, c2, stride=2)),
                    ("block3", ResidualBlock(c2, c3, stride=2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("pool", nn.AdaptiveAvgPool2d(1)),
                    ("flatten", nn.Flatten()),
                    ("fc", nn.Linear(c3, len(CLASSES))),
                ]
            )
        )


class DilatedCNN(FashionMNISTClassifier):
    """3x3 convolutions with growing dilation and a single 2x2 max pooling, then global average pooling.

    ``features``: ``conv1`` (dilation 1) and ``conv2`` (dilation 2) at 28x28, ``pool1``, then ``conv3``
    (dilation 2) and ``conv4`` (dilation 4) at 14x14, each convolution followed by batch norm and ReLU. The
    receptive field reaches 32x32 pixels, more than the image, with the feature maps still at 14x14.
    ``classifier``: ``pool`` (global average) ``→ flatten → fc``.

    Args:
        channels: output channels of ``conv1`` to ``conv4``.
        lr: see :class:`FashionMNISTClassifier`.
        weight_decay: see :class:`FashionMNISTClassifier`.
        lr_schedule: see :class:`FashionMNISTClassifier`.

    Example::
        >>> model = DilatedCNN()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [module.dilation for module in model.features if isinstance(module, nn.Conv2d)]
        [(1, 1), (2, 2), (2, 2), (4, 4)]
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 32, 64, 64),
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["one_cycle", "constant"] = "one_cycle",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule)
        self.save_hyperparameters()
        c1, c2, c3, c4 = _check_channels("DilatedCNN", channels, 4)
        self.features = nn.Sequential(
            OrderedDict(
                [
                    *_conv_bn_relu(1, IMAGE_SHAPE[0], c1),
                    *_conv_bn_relu(2, c1, c2, dilation=2),
                    ("pool1", nn.MaxPool2d(2)),
                    *_conv_bn_relu(3, c2, c3, dilation=2),
                    *_conv_bn_relu(4, c3, c4, dilation=4),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("pool", nn.AdaptiveAvgPool2d(1)),
                    ("flatten", nn.Flatten()),
                    ("fc", nn.Linear(c4, len(CLASSES))),
                ]
            )
        )
