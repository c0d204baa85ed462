"""Where logged pictures and numbers go: TensorBoard, or PNG files in a folder.

Every destination has the same small interface: ``add_image(tag, image, step)`` (uint8 ``(3, H, W)``),
``add_scalars(values, step)``, ``add_text(tag, markdown, step)``, ``add_figure(tag, figure, step)``,
``flush()`` and ``describe()``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from rf_callback.render import save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PngFolderDestination", "TensorBoardDestination"]


class TensorBoardDestination:
    """A ``torch.utils.tensorboard.SummaryWriter`` (what ``TensorBoardLogger.experiment`` is)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def add_figure(self, tag: str, figure: Figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=True)

    def flush(self) -> None:
        self.writer.flush()

    def describe(self) -> str:
        return f"TensorBoard events in {self.writer.log_dir}"


class PngFolderDestination:
    """PNG files under a folder: ``<tag>/step_<step>.png``, scalars in ``scalars.csv``, text as Markdown."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, tag: str, suffix: str) -> Path:
        return self.folder / re.sub(r"[^A-Za-z0-9_.\-/\[\]]", "_", tag).strip("/") / suffix

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        path = self._path(tag, f"step_{step:08d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        path = self.folder / "scalars.csv"
        new = not path.exists()
        with path.open("a", newline="") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(["step", "tag", "value"])
            writer.writerows([step, tag, value] for tag, value in values.items())

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        path = self._path(tag, f"step_{step:08d}.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown + "\n")

    def add_figure(self, tag: str, figure: Figure, step: int) -> None:
        path = self._path(tag, f"step_{step:08d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)

    def flush(self) -> None:
        pass

    def describe(self) -> str:
        return f"PNG files under {self.folder}"
