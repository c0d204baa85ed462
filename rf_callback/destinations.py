"""Where the monitor's images, scalars and tables go: TensorBoard, Weights & Biases, MLflow or PNG files.

Every destination implements :class:`Destination`, one small protocol: images are uint8 tensors
``(3, H, W)`` (as :mod:`rf_callback.render` draws them), scalars a mapping from tag to float,
tables rows of strings, and every call carries the step. Tags are the TensorBoard tags
(``receptive_field/<layer>``...); each destination keeps them as close as its backend allows:

* :class:`TensorBoardDestination`: ``add_image`` / ``add_scalar`` / ``add_text`` (tables as Markdown);
* :class:`WandbDestination`: ``wandb.Image``, scalars and ``wandb.Table`` under the same keys;
* :class:`MLflowDestination`: ``log_image(key=, step=)``, metrics with their step, ``<tag>.md`` artifacts;
* :class:`PngFolderDestination`: ``<folder>/<tag>/step_<step>.png``, ``scalars.csv``, ``<tag>.md``.

Each takes an optional ``log_metrics(values, step)``: when the destination is built from a
Lightning logger, pass the logger's own ``log_metrics`` so scalars get the logger's prefix and its
step bookkeeping (W&B's ``trainer/global_step``, which lines them up with the validation metrics).
No Lightning here: the glue in :mod:`rf_callback.callback` maps a Trainer's loggers to these.
``wandb`` and ``mlflow`` are imported only by the methods that need them.
"""

from __future__ import annotations

import csv
import html
import inspect
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from rf_callback.render import pil_image, save_png
from rf_callback.report import markdown_table

if TYPE_CHECKING:
    import os

    from mlflow import MlflowClient
    from torch.utils.tensorboard import SummaryWriter
    from wandb.sdk.wandb_run import Run

__all__ = [
    "Destination",
    "MLflowDestination",
    "PngFolderDestination",
    "TensorBoardDestination",
    "WandbDestination",
    "mlflow_key",
]

LogMetrics = Callable[[Mapping[str, Any], int], None]


class Destination(Protocol):
    """What the monitor logs, and where: one implementation per backend."""

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        """One uint8 image ``(3, H, W)``."""

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars by tag."""

    def add_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[str]], step: int) -> None:
        """A small table of strings (the receptive fields of the layers)."""

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        """Free text in Markdown."""

    def flush(self) -> None:
        """Write out what is buffered; the monitor calls it after each logging pass."""

    def describe(self) -> str:
        """Where things go, in one line for messages."""


class TensorBoardDestination:
    """A TensorBoard ``SummaryWriter`` (torch's or tensorboardX's): tables as Markdown text."""

    def __init__(
        self,
        writer: SummaryWriter,
        log_metrics: LogMetrics | None = None,
        descriptions: Mapping[str, str] | None = None,
        metric_prefix: str = "",
    ) -> None:
        """``metric_prefix``: what ``log_metrics`` puts in front of a tag (a Lightning logger's
        ``prefix`` and separator), so that a described first point lands in the same chart."""
        self.writer = writer
        self._log_metrics = log_metrics
        self._descriptions = dict(descriptions or {})
        self._described: set[str] = set()
        self._metric_prefix = metric_prefix

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars; the first point of a tag whose last part has a description carries it (TensorBoard's
        Scalars tab shows the description of a tag's first event behind an (i) on its chart)."""
        rest = dict(values)
        for tag, value in values.items():
            description = self._descriptions.get(tag.rpartition("/")[2])
            if description is not None and tag not in self._described:
                self._write_described(tag, float(value), description, step)
                del rest[tag]
        if self._log_metrics is not None:
            self._log_metrics(rest, step)
            return
        for tag, value in rest.items():
            self.writer.add_scalar(tag, value, step)

    def _write_described(self, tag: str, value: float, description: str, step: int) -> None:
        """The first point of ``tag``, with its description: TensorBoard's Scalars tab shows it behind an (i)
        on the chart. The data class marks the metadata as complete: without it TensorBoard's fast loader
        (its default since 2.5) replaces the metadata of a ``simple_value`` by its own, description dropped."""
        from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_SCALAR, Summary

        point = Summary.Value(tag=self._metric_prefix + tag, simple_value=value)
        point.metadata.display_name = self._metric_prefix + tag
        point.metadata.summary_description = description
        point.metadata.plugin_data.plugin_name = "scalars"
        point.metadata.data_class = DATA_CLASS_SCALAR
        self.writer._get_file_writer().add_summary(Summary(value=[point]), step)
        self._described.add(tag)

    def add_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[str]], step: int) -> None:
        self.add_text(tag, markdown_table(columns, rows), step)

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def flush(self) -> None:
        self.writer.flush()

    def describe(self) -> str:
        return f"TensorBoard ({self.writer.get_logdir()})"


class WandbDestination:
    """A Weights & Biases run: images as ``wandb.Image`` under the TensorBoard tags, tables as ``wandb.Table``.

    Everything given for one step is logged in one call, at :meth:`flush` or when a later step
    arrives, so each logging pass is one history row and one position of W&B's media slider.
    Without ``log_metrics`` that call is ``run.log(values, step=step)``, which W&B accepts only for
    steps that never go back: pass the logger's ``log_metrics`` when something else logs to the
    same run (Lightning's ``WandbLogger.log_metrics`` records the step as ``trainer/global_step``).
    """

    def __init__(self, run: Run, log_metrics: LogMetrics | None = None) -> None:
        self.run = run
        self._log_metrics = log_metrics
        self._pending: dict[str, Any] = {}
        self._step: int | None = None

    def _add(self, values: Mapping[str, Any], step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._pending.update(values)
        self._step = step

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        import wandb

        self._add({tag: wandb.Image(pil_image(image))}, step)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._add({tag: float(value) for tag, value in values.items()}, step)

    def add_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[str]], step: int) -> None:
        import wandb

        self._add({tag: wandb.Table(columns=list(columns), data=[list(row) for row in rows])}, step)

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        import wandb

        self._add({tag: wandb.Html(f"<pre>{html.escape(markdown)}</pre>")}, step)

    def flush(self) -> None:
        if self._step is None:
            return
        values, step = self._pending, self._step
        self._pending, self._step = {}, None  # a failing log must not send the same row again
        if self._log_metrics is not None:
            self._log_metrics(values, step)
        else:
            self.run.log(values, step=step)

    def describe(self) -> str:
        where = f"offline, {self.run.dir}" if self.run.offline else self.run.url  # run.url warns when offline
        return f"Weights & Biases run {self.run.name} ({where})"


def mlflow_key(tag: str) -> str:
    """``tag`` as an MLflow metric name and image key: each character outside ``A-Za-z0-9_-./`` and space
    becomes ``_`` (the set both MLflow's ``log_image`` and Lightning's ``MLFlowLogger`` accept unchanged).

    Example::
        >>> mlflow_key("receptive_field/layer1.0.relu[1]:0/erf_size")
        'receptive_field/layer1.0.relu_1__0/erf_size'
    """
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", tag)


class MLflowDestination:
    """An MLflow run: stepped images, metrics with their step, tables and text as Markdown artifacts.

    Tags become keys through :func:`mlflow_key`. Images go through ``log_image(key=, step=)``, which
    MLflow's UI shows with a step slider (MLflow >= 2.12); older clients get artifacts
    ``<key>/step_<step>.png``. Tables and text are the artifact ``<key>.md``, rewritten when logged again.
    """

    def __init__(self, client: MlflowClient, run_id: str, log_metrics: LogMetrics | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self._log_metrics = log_metrics
        self._stepped_images = "key" in inspect.signature(client.log_image).parameters

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        key = mlflow_key(tag)
        if self._stepped_images:
            self.client.log_image(self.run_id, pil_image(image), key=key, step=step)
        else:
            self.client.log_image(self.run_id, pil_image(image), artifact_file=f"{key}/step_{step:08d}.png")

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        metrics = {mlflow_key(tag): float(value) for tag, value in values.items()}
        if self._log_metrics is not None:
            self._log_metrics(metrics, step)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def add_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[str]], step: int) -> None:
        self.add_text(tag, markdown_table(columns, rows), step)

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        self.client.log_text(self.run_id, markdown + "\n", f"{mlflow_key(tag)}.md")

    def flush(self) -> None:
        """Nothing to do: every call above has been written when it returns."""

    def describe(self) -> str:
        return f"MLflow run {self.run_id} ({self.client.tracking_uri})"


class PngFolderDestination:
    """Files in a folder, for loggers that hold no images (Lightning's ``CSVLogger``, custom loggers).

    Images are ``<folder>/<tag>/step_<step:08d>.png``, tables and text ``<folder>/<tag>.md``
    (rewritten when logged again), each part of the tag made a safe file name. Scalars go to
    ``log_metrics`` when given (the logger keeps them), else they are appended to
    ``<folder>/scalars.csv`` as ``step,tag,value`` rows.
    """

    def __init__(self, folder: str | os.PathLike, log_metrics: LogMetrics | None = None) -> None:
        self.folder = Path(folder)
        self._log_metrics = log_metrics

    def path(self, tag: str) -> Path:
        """Where ``tag`` goes, without a suffix: one folder per ``/``-separated part."""
        parts = [re.sub(r"[^A-Za-z0-9_.-]", "_", part) for part in tag.split("/")]
        return self.folder.joinpath(*[part if part.strip(".") else "_" for part in parts])

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        path = self.path(tag) / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._log_metrics is not None:
            self._log_metrics(values, step)
            return
        path = self.folder / "scalars.csv"
        new = not path.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(["step", "tag", "value"])
            writer.writerows([step, tag, float(value)] for tag, value in values.items())

    def add_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[str]], step: int) -> None:
        self.add_text(tag, markdown_table(columns, rows), step)

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        path = self.path(tag)
        path = path.with_name(f"{path.name}.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown + "\n")

    def flush(self) -> None:
        """Nothing to do: every file is complete when its call returns."""

    def describe(self) -> str:
        return f"PNG files under {self.folder}"
