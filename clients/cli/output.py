"""What the command line prints: aligned tables for people, JSON and CSV with exact decimal strings for machines.

Every command builds a `Report`: `data` (JSON-ready: dicts, lists, str, int, bool, None —
amounts already decimal strings), `rows` and `columns` (what CSV writes, one header line
then one line per row) and `table` (the human text). `emit` writes the one the
`--format` option names. Decimals are never floats anywhere: `text()` turns them into plain
decimal strings ("11750.00", never "1.175E+4").
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TextIO

from clients.kpisettle_client.decimals import plain

FORMATS = ("table", "json", "csv")

Row = Mapping[str, Any]


def text(value: object) -> str:
    """One cell: Decimal as plain text, dates in ISO 8601, None as "", booleans as true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return plain(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    return str(value)


def jsonable(value: object) -> Any:
    """`value` with every Decimal, date and datetime as a string (JSON keeps ints and booleans)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal | datetime.date):
        return text(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [jsonable(v) for v in value]
    return str(value)


def _numeric(value: object) -> bool:
    return isinstance(value, Decimal | int) and not isinstance(value, bool)


def table(rows: Sequence[Row], columns: Sequence[str], *, empty: str = "(none)") -> str:
    """Rows as aligned columns under a header; numbers right-aligned."""
    if not rows:
        return empty
    cells = [[text(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    right = [all(_numeric(row.get(c)) or row.get(c) is None for row in rows) and any(_numeric(row.get(c)) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def pairs(values: Row) -> str:
    """A record as "key: value" lines, keys aligned."""
    if not values:
        return ""
    width = max(len(k) for k in values)
    return "\n".join(f"{k + ':':<{width + 1}} {text(v)}".rstrip() for k, v in values.items())


def csv_text(rows: Sequence[Row], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([text(row.get(c)) for c in columns])
    return buffer.getvalue()


@dataclass
class Report:
    """One command's output in every format."""

    data: Any
    rows: Sequence[Row] = ()
    columns: Sequence[str] = ()
    table: str = ""

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return json.dumps(jsonable(self.data), indent=2, ensure_ascii=False) + "\n"
        if fmt == "csv":
            return csv_text(self.rows, self.columns)
        body = self.table if self.table else table(self.rows, self.columns)
        return body.rstrip("\n") + "\n"


def emit(report: Report, fmt: str, stream: TextIO) -> None:
    stream.write(report.render(fmt))


__all__ = ["FORMATS", "Report", "csv_text", "emit", "jsonable", "pairs", "table", "text"]
