"""Write a :class:`~rf_callback.compare.Comparison`: a side-by-side figure, tables, a chart, a TensorBoard run.

:func:`write_comparison` writes everything or nothing (files are staged beside the target and moved
into place at the end).
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from rf_callback.checkpoints import Checkpoint, brief
from rf_callback.compare import Comparison
from rf_callback.errors import CompareError
from rf_callback.monitor import STATISTICS, TAG, layer_tag
from rf_callback.render import CARD, layer_image
from rf_callback.report import pair, signed

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image, ImageFont

__all__ = ["write_comparison"]

PROBE_PIXELS = 84
"""Screen pixels per probe side in the figure."""


def write_comparison(
    comparison: Comparison, out: str | os.PathLike, tensorboard: str | os.PathLike | None = None
) -> list[Path]:
    """Write the comparison's files into ``out``, all or none.

    Everything is written into a temporary folder next to ``out`` and moved into place at the end (files
    already in ``out`` with the same names are replaced); on any error nothing new is left behind.

    Files: ``comparison.png`` (one row per layer, one column per checkpoint: every probe with its
    saliency heatmap, the unit's analytic box and centre), ``erf.csv`` and ``erf.md`` (the statistics
    of :meth:`Comparison.records`), ``erf_size.png`` (ERF size and ERF / RF against checkpoint, per layer).
    With ``tensorboard``, also a TensorBoard run in that folder, one step per checkpoint (0, 1, ...), with
    the callback's tags: images ``receptive_field/<layer>``, scalars ``receptive_field/<layer>/<stat>``.

    Returns:
        The files written, ``out``'s first.

    Raises:
        CompareError: if ``out`` or ``tensorboard`` is an existing file, or cannot be written.
    """
    targets = [Path(out)] + ([Path(tensorboard)] if tensorboard is not None else [])
    for target in targets:
        if target.exists() and not target.is_dir():
            raise CompareError(f"'{target}' is a file; the comparison needs a folder there. HINT: choose another path.")
    grids = _grids(comparison)
    picture = _picture(comparison, grids)
    stages: list[Path] = []
    try:
        for target in targets:
            stages.append(_stage(target))
        # PNG encoding releases the GIL: it runs in a thread while matplotlib draws the chart.
        with ThreadPoolExecutor(max_workers=1) as pool:
            saved = pool.submit(picture.save, stages[0] / "comparison.png", compress_level=1)
            _write_tables(comparison, stages[0])
            _erf_size_figure(comparison).savefig(stages[0] / "erf_size.png", pil_kwargs={"compress_level": 1})
            if tensorboard is not None:
                _write_tensorboard(comparison, _grids(comparison, fit=CARD), stages[1])
            saved.result()
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
        written = []
        for stage, target in zip(stages, targets):
            for file in sorted(stage.iterdir()):
                os.replace(file, target / file.name)
                written.append(target / file.name)
        return written
    except OSError as error:
        raise CompareError(
            f"cannot write the comparison to {', '.join(map(str, targets))}: {brief(error)}. HINT: choose a folder"
            " you can write to."
        ) from error
    finally:
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)


def _stage(target: Path) -> Path:
    """A new hidden folder beside ``target``, on its file system, so that files move into place by renaming."""
    target = target.absolute()
    parent = target.parent
    while not parent.is_dir():
        parent = parent.parent
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))


def _grids(comparison: Comparison, fit: tuple[int, int] | None = None) -> list[list[Tensor]]:
    """``grids[k][l]``: checkpoint k's probe grid at layer l (uint8 ``(3, H, W)``), the class names under the
    probes; rows of 5 probes of :data:`PROBE_PIXELS` for the figure, or laid out for ``fit`` (a TensorBoard card)."""
    probes = comparison.probes
    return [
        [
            layer_image(
                probes,
                result.maps[:, index],
                result.boxes[:, index],
                result.centers[:, index],
                labels=comparison.probe_labels,
                tile=PROBE_PIXELS if fit is None else 128,
                nrow=min(len(probes), 5) if fit is None else None,
                analytic=result.analytic[index],
                fit=fit,
            )
            for index in range(len(comparison.layers))
        ]
        for result in comparison.maps
    ]


def _write_tables(comparison: Comparison, folder: Path) -> None:
    records = comparison.records()
    with (folder / "erf.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(
            {k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in records
        )
    (folder / "erf.md").write_text(_markdown(comparison) + "\n")


def _markdown(comparison: Comparison) -> str:
    lines = [
        "# ERF statistics across checkpoints",
        "",
        (
            f"{len(comparison.probes)} probes ({comparison.probe_origin}); {_unit_words(comparison)}."
            " ERF size: side of a square with the area of the pixels above 4.55% of the map's peak (Luo et al.);"
            " mass side: the square around the unit's centre holding 95% of the saliency; both in input pixels,"
            " and as a fraction of the analytic RF (clipped to the image); dead: probes whose map is all zero."
        ),
        "",
        comparison.format_table(markdown=True),
        "",
        "## Checkpoints",
        "",
        "| # | checkpoint | epoch | step | TensorBoard step | model | file |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {c.label} | {'-' if c.epoch is None else c.epoch} | {'-' if c.step is None else c.step}"
        f" | {'-' if c.logged_step is None else c.logged_step} | {c.model_class} | {c.path} |"
        for k, c in enumerate(comparison.checkpoints)
    ]
    return "\n".join(lines)


def _unit_words(comparison: Comparison) -> str:
    unit = comparison.unit
    where = f"unit {unit}" if isinstance(unit, tuple) else f"{unit} unit"
    return f"{where}, {'summed over channels' if comparison.channel is None else f'channel {comparison.channel}'}"


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _picture(comparison: Comparison, grids: Sequence[Sequence[Tensor]]) -> Image.Image:
    """The side-by-side figure: rows are layers, columns are checkpoints (``grids[k][l]`` from :func:`_grids`).

    Each cell is the probe grid of that layer and checkpoint, pasted as is (no resampling: one composed
    image rather than many matplotlib axes), with the mean ERF size and its fraction of the analytic RF
    below it. Row labels give the layer (and its RF when every checkpoint has the same one), column labels
    the checkpoint, its epoch and step, and the model class when the checkpoints have several.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    title_font, font = _font(16), _font(13)
    line = font.getbbox("Ag")[3] + 4
    gap = 12
    cell_h, cell_w = max(g.shape[1] for row in grids for g in row), max(g.shape[2] for row in grids for g in row)
    several_classes = len({c.model_class for c in comparison.checkpoints}) > 1
    headers = [[c.label, c.when, *([c.class_name] if several_classes else [])] for c in comparison.checkpoints]
    means = comparison.means
    row_labels = []
    for layer in comparison.layers:
        shapes = {(t[layer].size, t[layer].stride) for t in comparison.tables}
        size, stride = next(iter(shapes))
        row_labels.append([layer, f"RF {pair(size)}, stride {pair(stride)}" if len(shapes) == 1 else "RF differs"])
    label_w = int(max(font.getlength(text) for label in row_labels for text in label)) + 2 * gap
    col_w = cell_w + gap
    title = f"Receptive maps of {len(comparison.probes)} probes, {_unit_words(comparison)}"
    legend = "heat: |d unit / d input|; cyan box: the unit's analytic receptive field; cyan ticks: its centre"
    width = max(label_w + len(grids) * col_w + gap, int(font.getlength(legend)) + 2 * gap)
    width = max(width, int(title_font.getlength(title)) + 2 * gap)
    top = gap + 2 * line + gap
    header_h = len(headers[0]) * line + 4
    row_h = cell_h + line + gap
    height = top + header_h + len(comparison.layers) * row_h + gap

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for k, column in enumerate(grids):
        for index, grid in enumerate(column):
            y, x = top + header_h + index * row_h, label_w + k * col_w
            canvas[y : y + grid.shape[1], x : x + grid.shape[2]] = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((gap, gap), title, fill=(0, 0, 0), font=title_font)
    draw.text((gap, gap + line + 4), legend, fill=(80, 80, 80), font=font)
    for k, header in enumerate(headers):
        for n, text in enumerate(header):
            text = _fit(text, font, cell_w)
            draw.text(
                (label_w + k * col_w, top + n * line), text, fill=(0, 0, 0) if n == 0 else (80, 80, 80), font=font
            )
    for index, label in enumerate(row_labels):
        y = top + header_h + index * row_h
        for n, text in enumerate(label):
            draw.text((gap, y + n * line), text, fill=(0, 0, 0) if n == 0 else (80, 80, 80), font=font)
        for k, (table, mean) in enumerate(zip(comparison.tables, means)):
            layer = comparison.layers[index]
            caption = f"ERF {mean['size'][index]:.1f} px, {mean['size_fraction'][index]:.0%} of RF"
            caption += f" {pair(table[layer].size)}"
            change = mean["size"][index] - means[0]["size"][index]
            caption += f", {signed(change, 1)} px since the first" if k else ""
            dead = mean["dead_fraction"][index]
            caption += f", {dead:.0%} dead" if dead else ""
            draw.text((label_w + k * col_w, y + cell_h + 2), _fit(caption, font, cell_w), fill=(0, 0, 0), font=font)
    return image


def _fit(text: str, font: Any, width: int) -> str:
    """``text``, shortened from the left with ``...`` until it fits in ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength("..." + text) > width:
        text = text[1:]
    return "..." + text


def _erf_size_figure(comparison: Comparison) -> Figure:
    """ERF size (input pixels) and ERF size / RF size against checkpoint, one line per layer."""
    from matplotlib.figure import Figure

    means = comparison.means
    checkpoints = comparison.checkpoints
    positions = list(range(len(checkpoints)))
    figure = Figure(figsize=(max(6.0, 1.1 * len(positions) + 3.5), 6.0), dpi=100)
    size_axes, fraction_axes = figure.subplots(2, 1, sharex=True)
    # Lines join checkpoints of one model only: across models the axis is categorical.
    runs = [[k for k in positions if checkpoints[k].model_class == name] for name in _models(comparison)]
    for index, layer in enumerate(comparison.layers):
        color = None
        for run in runs:
            line = size_axes.plot(run, [means[k]["size"][index] for k in run], "o-", color=color)[0]
            fraction_axes.plot(run, [means[k]["size_fraction"][index] for k in run], "o-", color=line.get_color())
            if color is None:
                line.set_label(layer)
                color = line.get_color()
    size_axes.set_ylabel("ERF size (input pixels)")
    fraction_axes.set_ylabel("ERF size / RF size")
    fraction_axes.set_ylim(bottom=0)
    several = len(runs) > 1
    labels = [f"{c.label}\n{c.class_name}" if several else _tick(c) for c in checkpoints]
    fraction_axes.set_xticks(positions, labels, fontsize=8)
    fraction_axes.set_xlabel("checkpoint")
    for axes in (size_axes, fraction_axes):
        axes.grid(alpha=0.3)
    size_axes.set_title(f"Effective receptive field per layer, {_unit_words(comparison)}", fontsize=10)
    figure.subplots_adjust(left=0.1, right=0.75, top=0.93, bottom=0.14, hspace=0.08)
    figure.legend(loc="center left", bbox_to_anchor=(0.76, 0.5), title="layer", fontsize=8)
    return figure


def _tick(checkpoint: Checkpoint) -> str:
    """A checkpoint under the chart's axis: its epoch, step and TensorBoard's step (where it differs), a line each."""
    if checkpoint.epoch is None:
        return checkpoint.label
    logged = checkpoint.logged_step
    lines = [f"epoch {checkpoint.epoch}", f"step {checkpoint.step}" if checkpoint.step is not None else ""]
    return "\n".join([*filter(None, lines), *([f"TB {logged}"] if logged not in (None, checkpoint.step) else [])])


def _models(comparison: Comparison) -> list[str]:
    """The model classes of the checkpoints, in order of first appearance."""
    return list(dict.fromkeys(c.model_class for c in comparison.checkpoints))


def _write_tensorboard(comparison: Comparison, grids: list[list[Tensor]], folder: Path) -> None:
    """A TensorBoard run, step k = checkpoint k, with the callback's tags (``grids[k][l]`` from :func:`_grids`,
    laid out for TensorBoard's card)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.add_text(f"{TAG}/comparison", _markdown(comparison), 0)
        for k, (checkpoint, means) in enumerate(zip(comparison.checkpoints, comparison.means)):
            writer.add_text(f"{TAG}/checkpoint", f"{checkpoint.label} ({checkpoint.when}): {checkpoint.path}", k)
            for index, layer in enumerate(comparison.layers):
                tag = layer_tag(index, layer)
                writer.add_image(tag, grids[k][index], k, dataformats="CHW")
                for name, (key, _) in STATISTICS.items():
                    writer.add_scalar(f"{tag}/{name}", means[key][index], k)
    finally:
        writer.close()
