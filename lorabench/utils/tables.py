"""Markdown and CSV tables from column specs: what every table lorabench prints or writes is made of (the
papers' tables, the claims ledger, the continual score matrix)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


@dataclass(frozen=True)
class Column:
    """One column of a table: its header and how one row (whatever the table iterates over) prints in it, and
    what it is in the table's CSV (:func:`csv_of`): ``csv`` pairs of a header and a row's raw value (a
    markdown column may be several CSV columns, or none). A column with no ``label`` is in the CSV only."""

    label: Optional[str]
    cell: Optional[Callable[[Any], str]] = None
    csv: Sequence[tuple[str, Callable[[Any], Any]]] = ()


def markdown(columns: Sequence[Column | str], rows: Sequence[Any]) -> str:
    """A markdown table: a header from ``columns`` (a :class:`Column` or a header string), then one line per
    row: each :class:`Column`'s ``cell(row)``, or, for header strings, the row itself (a sequence of cells)."""
    columns = [c for c in columns if not isinstance(c, Column) or c.label is not None]
    head = [c.label if isinstance(c, Column) else c for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [c.cell(row) for c in columns] if all(isinstance(c, Column) for c in columns) else list(row)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def csv_of(columns: Sequence[Column], rows: Sequence[Any]) -> str:
    """The CSV text of the table ``columns`` make of ``rows``: the columns' ``csv`` parts, in order (raw values:
    the numbers a markdown cell rounds, None as an empty field)."""
    parts = [part for c in columns for part in c.csv]
    return csv_text([[head for head, _ in parts], *[[value(row) for _, value in parts] for row in rows]])


def csv_text(rows: Sequence[Sequence]) -> str:
    """Rows (the header first) as CSV text."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def duration(seconds: float) -> str:
    """A duration for a table cell: milliseconds below a second (``0.4 ms``), else seconds (``12.3 s``)."""
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"
