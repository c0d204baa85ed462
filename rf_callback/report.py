"""Plain-text and Markdown tables of receptive fields (standard library only)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "COLUMNS",
    "MARKED",
    "WHOLE",
    "csv_text",
    "format_rows",
    "format_table",
    "markdown_table",
    "pair",
    "signed",
    "span",
    "table_rows",
    "unsupported_notes",
]

COLUMNS = ("layer", "type", "output", "RF size", "RF min-max", "stride", "padding", "verdict")
"""``RF min-max``: the smallest and largest field over all paths from the input (one number where they
agree); ``verdict``: unproductive, border or critical at the input size (blank otherwise)."""

MARKED = {
    "unproductive": "its shortest path and its inputs' already cover the input: it adds no context",
    "border": "its shortest path covers the input, its inputs' do not: the last layer to add context",
    "critical": "only its longest path covers the input",
}
"""Verdicts shown in the ``verdict`` column (``LayerRF.verdict``), with the line that explains each under
a table that shows it; the others are left blank."""

WHOLE = {1: "whole signal", 2: "whole image", 3: "whole volume"}
"""What a unit that sees all of its input sees, by the input's number of spatial axes (tables and pictures)."""


def pair(values: Sequence[int | Fraction | str]) -> str:
    """``(7, 7)`` as ``7``, ``(7, 5)`` as ``7x5``; a fractional stride (after upsampling) as ``1/2``.

    Example::
        >>> pair([212, 212]), pair([3, 5]), pair([9]), pair([Fraction(1, 2), Fraction(1, 2)]), pair(["1/2", 1])
        ('212', '3x5', '9', '1/2', '1/2x1')
    """
    return str(values[0]) if len(set(values)) == 1 else "x".join(str(v) for v in values)


def signed(value: float, digits: int) -> str:
    """``value`` with its sign and ``digits`` decimals; what rounds to zero is ``+0.0``, never ``-0.0``.

    Example::
        >>> signed(-0.04, 1), signed(-0.06, 1), signed(2.345, 2)
        ('+0.0', '-0.1', '+2.35')
    """
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def span(low: Sequence[int], high: Sequence[int]) -> str:
    """The smallest and largest field over paths: ``11-435``, or one number where they agree.

    Example::
        >>> span([11, 11], [435, 435]), span([7, 7], [7, 7]), span([5, 3], [9, 3])
        ('11-435', '7', '5x3-9x3')
    """
    return pair(low) if list(low) == list(high) else f"{pair(low)}-{pair(high)}"


def _cells(record: Mapping[str, Any]) -> list[str]:
    head = [record["name"], record["type"], "x".join(str(n) for n in record["output_shape"])]
    if "unsupported" in record:
        return [*head, "unsupported", "-", "-", "-", ""]
    paths = span(record["min_size"], record["max_size"]) if "min_size" in record else "-"
    verdict = record.get("verdict", "")
    verdict = verdict if verdict in MARKED else ""
    if record["is_global"]:  # every unit sees the whole input: its size and padding say nothing more
        return [*head, WHOLE[len(record["output_shape"])], paths, "-", "-", verdict]
    return [*head, pair(record["size"]), paths, pair(record["stride"]), pair(record["padding"]), verdict]


def table_rows(records: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """The cells under :data:`COLUMNS` of each :meth:`LayerRF.to_record` dict."""
    return [_cells(record) for record in records]


def unsupported_notes(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """``name: reason`` for each record without a receptive field."""
    return [f"{r['name']}: {r['unsupported']}" for r in records if "unsupported" in r]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown pipe table.

    Example::
        >>> print(markdown_table(["layer", "RF size"], [["conv1", "3"]]))
        | layer | RF size |
        |---|---|
        | conv1 | 3 |
    """
    return format_table(columns, rows, markdown=True)


def format_rows(records: Iterable[Mapping[str, Any]], markdown: bool = False) -> str:
    """A table of :meth:`LayerRF.to_record` dicts, aligned for a terminal or as Markdown.

    Example::
        >>> print(format_rows([{"name": "conv1", "type": "Conv2d", "output_shape": [14, 14], "size": [3, 3],
        ...                     "min_size": [3, 3], "max_size": [3, 3], "stride": [2, 2], "padding": [1, 1],
        ...                     "is_global": False, "verdict": "border"}]))
        layer  type    output  RF size  RF min-max  stride  padding  verdict
        conv1  Conv2d  14x14   3        3           2       1        border
        <BLANKLINE>
        At this input size (Richter et al. 2021; a field covers the input when its size reaches it):
        border: its shortest path covers the input, its inputs' do not: the last layer to add context
    """
    records = list(records)
    notes = unsupported_notes(records)
    text = format_table(COLUMNS, table_rows(records), markdown)
    shown = [verdict for verdict in MARKED if any(record.get("verdict") == verdict for record in records)]
    if shown:
        legend = [f"{verdict}: {MARKED[verdict]}" for verdict in shown]
        text += "\n\nAt this input size (Richter et al. 2021; a field covers the input when its size reaches it):\n"
        text += "\n".join(f"* {line}" if markdown else line for line in legend)
    if notes:
        text += "\n\nUnsupported:\n" + "\n".join(f"* {note}" if markdown else note for note in notes)
    return text


def csv_text(records: Iterable[Mapping[str, Any]]) -> str:
    """:meth:`LayerRF.to_record` dicts as CSV, one column per field, a value per axis joined by ``x`` (``7x7``).

    Example::
        >>> print(csv_text([{"name": "conv1", "type": "Conv2d", "output_shape": [14, 14], "size": [3, 3],
        ...                  "min_size": [3, 3], "max_size": [3, 3], "stride": [2, 2], "padding": [1, 1],
        ...                  "is_global": False, "verdict": "productive"}]), end="")
        name,type,output_shape,size,min_size,max_size,stride,padding,is_global,verdict,unsupported
        conv1,Conv2d,14x14,3x3,3x3,3x3,2x2,1x1,False,productive,
    """
    import csv
    import io

    fields = ["name", "type", "output_shape", "size", "min_size", "max_size", "stride", "padding", "is_global"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*fields, "verdict", "unsupported"], lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "x".join(map(str, v)) if isinstance(v, list) else v for k, v in record.items()})
    return buffer.getvalue()


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool = False) -> str:
    """Cells aligned in columns for a terminal, or a Markdown table.

    Example::
        >>> print(format_table(["a", "bb"], [["1", "2"]]))
        a  bb
        1  2
    """
    rows = [list(header), *map(list, rows)]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
