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

File names and MLflow keys are made safe and bounded: a part longer than :data:`MAX_NAME` characters
is shortened, with a stable hash of the whole so that two long names stay apart. A destination that
writes to this machine's disk says where (``local_folder``), so that the monitor can check the free
space before it writes images (see :class:`~rf_callback.ProbeMonitor`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import html
import inspect
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from rf_callback.render import pil_image, save_png
from rf_callback.report import markdown_table

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch.utils.tensorboard import SummaryWriter
    from wandb.sdk.wandb_run import Run

__all__ = [
    "MAX_NAME",
    "Destination",
    "MLflowDestination",
    "MetricsDestination",
    "PngFolderDestination",
    "TensorBoardDestination",
    "WandbDestination",
    "bounded",
    "mlflow_key",
    "no_space_left",
]

LogMetrics = Callable[[Mapping[str, Any], int], None]

MAX_NAME = 120
"""The longest file-name part (or, doubled, MLflow key) the destinations write: far below the 255 bytes of
common file systems, with room for suffixes (``.md``)."""


def bounded(text: str, limit: int = MAX_NAME) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and a stable hash of the whole.

    Example::
        >>> bounded("conv1"), bounded("x" * 300)[-14:], len(bounded("x" * 300))
        ('conv1', 'x-02fd68253071', 120)
    """
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{text[: limit - 13]}-{digest}"


def no_space_left(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, says the disk is full (``ENOSPC``) or over quota.

    Example::
        >>> no_space_left(ValueError("could not log")), no_space_left(OSError(errno.ENOSPC, "No space left"))
        (False, True)
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


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

    # Optional: ``local_folder() -> Path | None``, the folder on this machine's disk the images go to.


class TensorBoardDestination:
    """A TensorBoard ``SummaryWriter`` (torch's or tensorboardX's): tables as Markdown text.

    A ``SummaryWriter`` writes from a thread, and after one failed write (a full disk) every later call
    raises that error again: Lightning's own logging through the same writer would die with it. So when a
    write of this destination fails for lack of space, it cuts what it wrote since its last :meth:`flush`
    off the event file and lets the ``SummaryWriter`` open a new event file at its next write (as after
    ``close()``): the others' logging goes on. :attr:`recovery` says what was done.
    """

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
        self._start: tuple[str, int] | None = None  # the event file and its size before this pass's first write
        self.recovery: str | None = None  # after a write failed for lack of space: what was done about it

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        with self._writing():
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars; the first point of a tag whose last part has a description carries it (TensorBoard's
        Scalars tab shows the description of a tag's first event behind an (i) on its chart)."""
        with self._writing():
            self._add_scalars(values, step)

    def _add_scalars(self, values: Mapping[str, float], step: int) -> None:
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
        with self._writing():
            self.writer.add_text(tag, markdown, step)

    def flush(self) -> None:
        with self._writing():
            self.writer.flush()
        self._start = None

    def describe(self) -> str:
        return f"TensorBoard ({self.writer.get_logdir()})"

    def local_folder(self) -> Path:
        return Path(self.writer.get_logdir())

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Note where the event file stood before this pass's first write; after a write that failed for lack
        of space, restore the writer for its other users."""
        if self._start is None:
            self._start = self._event_file_position()
        try:
            yield
        except Exception as error:
            if no_space_left(error):
                self.recovery = self._restore()
            raise

    def _event_file_position(self) -> tuple[str, int] | None:
        """The event file and its size once everything queued before (the loggers' own records) is written."""
        self.writer.flush()
        file_writer = self.writer._get_file_writer()
        path = getattr(getattr(file_writer, "event_writer", None), "_file_name", None)
        return (path, os.path.getsize(path)) if isinstance(path, str) and os.path.isfile(path) else None

    def _restore(self) -> str:
        """Cut this pass's records off the event file (they freed the space they took) and drop the broken file
        writer: the ``SummaryWriter`` opens a new event file at its next write, as it does after ``close()``."""
        if not hasattr(self.writer, "all_writers") or not hasattr(self.writer, "file_writer"):
            return "this SummaryWriter cannot be restarted: its other users' writes may fail too"
        start, self._start = self._start, None
        if start is not None:
            with contextlib.suppress(OSError):
                os.truncate(*start)
        broken = self.writer.file_writer
        self.writer.file_writer = self.writer.all_writers = None
        with contextlib.suppress(Exception):  # its thread is dead: closing only releases the file
            broken.close()
        return (
            "what this pass wrote was cut off the event file and the SummaryWriter goes on in a new event file, so"
            " the loggers' own records (val_loss...) still land"
        )


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

    def local_folder(self) -> Path:
        return Path(self.run.dir)  # media files are written here first, online or not


def mlflow_key(tag: str) -> str:
    """``tag`` as an MLflow metric name and image key: each character outside ``A-Za-z0-9_-./`` and space
    becomes ``_`` (the set both MLflow's ``log_image`` and Lightning's ``MLFlowLogger`` accept unchanged).

    Keys longer than MLflow's 250 characters are shortened with a hash (:func:`bounded`).

    Example::
        >>> mlflow_key("receptive_field/layer1.0.relu[1]:0/erf_size")
        'receptive_field/layer1.0.relu_1__0/erf_size'
    """
    return bounded(re.sub(r"[^A-Za-z0-9_\-./ ]", "_", tag), 2 * MAX_NAME)


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
        self._artifacts: tuple[Path | None] | None = None  # (where artifacts go on this machine,), once asked

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

    def local_folder(self) -> Path | None:
        """The run's artifact folder when it is on this machine (``file:`` URIs), else ``None`` (asked once)."""
        from urllib.parse import unquote, urlparse

        if self._artifacts is None:
            location = urlparse(self.client.get_run(self.run_id).info.artifact_uri)
            self._artifacts = (Path(unquote(location.path)) if location.scheme in ("", "file") else None,)
        return self._artifacts[0]


class PngFolderDestination:
    """Files in a folder, for loggers that hold no images (Lightning's ``CSVLogger``, custom loggers).

    Images are ``<folder>/<tag>/step_<step:08d>.png``, tables and text ``<folder>/<tag>.md``
    (rewritten when logged again), each part of the tag made a safe file name of at most
    :data:`MAX_NAME` characters. Scalars go to ``log_metrics`` when given (the logger keeps them), else
    they are appended to ``<folder>/scalars.csv`` as ``step,tag,value`` rows; ``scalars=False`` leaves
    them to other destinations (a :class:`MetricsDestination` per logger). A file that cannot be written
    whole (a full disk) is removed.
    """

    def __init__(self, folder: str | os.PathLike, log_metrics: LogMetrics | None = None, scalars: bool = True) -> None:
        self.folder = Path(folder)
        self._log_metrics = log_metrics
        self._scalars = scalars

    def path(self, tag: str) -> Path:
        """Where ``tag`` goes, without a suffix: one folder per ``/``-separated part.

        Example::
            >>> PngFolderDestination("logs").path("receptive_field/00_a\\nb/mean").as_posix()
            'logs/receptive_field/00_a_b/mean'
        """
        parts = [re.sub(r"[^A-Za-z0-9_.-]", "_", part) for part in tag.split("/")]
        return self.folder.joinpath(*[bounded(part) if part.strip(".") else "_" for part in parts])

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        path = self.path(tag) / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with _whole(path):
            save_png(image, path)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        if not self._scalars:
            return
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
        with _whole(path):
            path.write_text(markdown + "\n")

    def flush(self) -> None:
        """Nothing to do: every file is complete when its call returns."""

    def describe(self) -> str:
        return f"PNG files under {self.folder}"

    def local_folder(self) -> Path:
        return self.folder


@contextlib.contextmanager
def _whole(path: Path) -> Iterator[None]:
    """Remove ``path`` if writing it fails: no half-written file stays (and its space is free again)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


class MetricsDestination:
    """Scalars only, through a logger's ``log_metrics`` (Lightning's ``CSVLogger``, a custom logger): images,
    tables and text are another destination's (a :class:`PngFolderDestination` with ``scalars=False``).

    Example::
        >>> rows = []
        >>> destination = MetricsDestination(lambda values, step: rows.append((step, dict(values))), "my logger")
        >>> destination.add_scalars({"receptive_field/00_conv/erf_size": 3.0}, step=7)
        >>> rows, destination.describe()
        ([(7, {'receptive_field/00_conv/erf_size': 3.0})], 'my logger')
    """

    def __init__(self, log_metrics: LogMetrics, name: str) -> None:
        self._log_metrics = log_metrics
        self.name = name

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        """Images go elsewhere."""

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._log_metrics(values, step)

    def add_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[str]], step: int) -> None:
        """Tables go elsewhere."""

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        """Text goes elsewhere."""

    def flush(self) -> None:
        """Nothing to do: the logger flushes its own files."""

    def describe(self) -> str:
        return self.name
