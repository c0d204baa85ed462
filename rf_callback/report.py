"""Plain-text and Markdown tables of receptive fields (standard library only)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "COLUMNS",
    "WHOLE",
    "format_rows",
    "format_table",
    "markdown_table",
    "pair",
    "signed",
    "table_rows",
    "unsupported_notes",
]

COLUMNS = ("layer", "type", "output", "RF size", "stride", "padding")
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


def _cells(record: Mapping[str, Any]) -> list[str]:
    head = [record["name"], record["type"], "x".join(str(n) for n in record["output_shape"])]
    if "unsupported" in record:
        return [*head, "unsupported", "-", "-"]
    if record["is_global"]:  # every unit sees the whole input: its size and padding say nothing more
        return [*head, WHOLE[len(record["output_shape"])], "-", "-"]
    return [*head, pair(record["size"]), pair(record["stride"]), pair(record["padding"])]


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
        >>> print(format_rows([{"name": "conv1", "type": "Conv2d", "output_shape": [14, 14],
        ...                     "size": [3, 3], "stride": [2, 2], "padding": [1, 1], "is_global": False}]))
        layer  type    output  RF size  stride  padding
        conv1  Conv2d  14x14   3        2       1
        >>> print(format_rows([{"name": "pool", "type": "AdaptiveAvgPool1d", "output_shape": [1],
        ...                     "size": [64], "stride": [0], "padding": [0], "is_global": True}]))
        layer  type               output  RF size       stride  padding
        pool   AdaptiveAvgPool1d  1       whole signal  -       -
    """
    records = list(records)
    notes = unsupported_notes(records)
    text = format_table(COLUMNS, table_rows(records), markdown)
    if notes:
        text += "\n\nUnsupported:\n" + "\n".join(f"* {note}" if markdown else note for note in notes)
    return text


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
