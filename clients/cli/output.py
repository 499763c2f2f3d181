"""What the command line prints: rich tables for people, JSON and CSV with exact decimal strings for machines.

Every command builds a `Report`: `data` (JSON-ready: dicts, lists, str, int, bool, None —
amounts already decimal strings), `rows` and `columns` (what CSV writes, one header line
then one line per row) and `human` (the blocks `--format table` shows: "key: value"
pairs, tables, verbatim lines). `emit` writes the one the `--format` option names.

Tables are drawn by rich with one style everywhere: a header underlined, columns
separated by spaces, numbers right-aligned, no outer frame. On a terminal headers are bold
and negative amounts red, and a table wider than the terminal runs on rather than being
squeezed (names and amounts are never cut). Anywhere else (a pipe, a file, a test) there
is no colour or other escape sequence, nothing is wrapped and no line ends in spaces, so
the output can be read by `grep` and `diff`. `NO_COLOR` turns colours off on a terminal
too.

Decimals are never floats anywhere: `text()` turns them into plain decimal strings
("11750.00", never "1.175E+4").
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table as RichTable
from rich.text import Text

from clients.kpisettle_client.decimals import plain

FORMATS = ("table", "json", "csv")
#: Wide enough that rich never wraps a table written to a pipe or a file.
UNWRAPPED_WIDTH = 100_000

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


# ------------------------------------------------------------------ human blocks


@dataclass(frozen=True)
class Pairs:
    """A record as "key: value" lines, values aligned."""

    values: Row


@dataclass(frozen=True)
class Table:
    """Rows under a header; `empty` is shown instead when there are no rows."""

    rows: Sequence[Row]
    columns: Sequence[str]
    empty: str = "(none)"


@dataclass(frozen=True)
class Lines:
    """Text shown exactly as it is (sentences, compiler-style problems with carets)."""

    text: str


Block = Pairs | Table | Lines


def _cell(value: object, terminal: bool) -> Text:
    style = "red" if terminal and isinstance(value, Decimal) and value < 0 else ""
    return Text(text(value), style=style)


def _table(block: Table, terminal: bool) -> RenderableType:
    if not block.rows:
        return Text(block.empty, style="dim" if terminal else "")
    table = RichTable(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if terminal else "",
        highlight=False,
    )
    for column in block.columns:
        values = [row.get(column) for row in block.rows]
        right = any(_numeric(v) for v in values) and all(_numeric(v) or v is None for v in values)
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for row in block.rows:
        table.add_row(*(_cell(row.get(c), terminal) for c in block.columns))
    return table


def _pairs(block: Pairs, terminal: bool) -> RenderableType:
    grid = RichTable.grid(padding=(0, 1))
    grid.add_column(style="bold" if terminal else "", no_wrap=True)
    grid.add_column(no_wrap=True)
    for key, value in block.values.items():
        grid.add_row(Text(f"{key}:"), _cell(value, terminal))
    return grid


def _renderable(block: Block, terminal: bool) -> RenderableType:
    if isinstance(block, Table):
        return _table(block, terminal)
    if isinstance(block, Pairs):
        return _pairs(block, terminal)
    return Text(block.text)


def _print(console: Console, blocks: Sequence[Block], terminal: bool) -> None:
    shown = [b for b in blocks if not (isinstance(b, Pairs) and not b.values) and not (isinstance(b, Lines) and not b.text)]
    for i, block in enumerate(shown):
        if i:
            console.print()
        console.print(_renderable(block, terminal), soft_wrap=isinstance(block, Lines))


def human_text(blocks: Sequence[Block]) -> str:
    """The blocks as plain text: no escape sequences, no wrapping, no trailing spaces."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=UNWRAPPED_WIDTH,
        force_terminal=False,
        color_system=None,
        no_color=True,
        highlight=False,
        markup=False,
        emoji=False,
        legacy_windows=False,
    )
    _print(console, blocks, terminal=False)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    return "\n".join(lines).strip("\n") + "\n"


def print_human(blocks: Sequence[Block], stream: TextIO) -> None:
    """The blocks on a terminal: bold headers, red negative amounts.

    A table wider than the terminal is drawn at its full width and the terminal wraps its
    lines: squeezing it would cut names and amounts."""
    console = Console(file=stream, highlight=False, markup=False, emoji=False)
    terminal = console.is_terminal
    unbounded = console.options.update_width(UNWRAPPED_WIDTH)
    widest = max(
        (Measurement.get(console, unbounded, _renderable(b, terminal)).maximum for b in blocks if not isinstance(b, Lines)), default=0
    )
    console.width = max(console.width, widest)
    _print(console, blocks, terminal=terminal)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


# ------------------------------------------------------------------ machine formats


def csv_text(rows: Sequence[Row], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([text(row.get(c)) for c in columns])
    return buffer.getvalue()


@dataclass
class Report:
    """One command's output in every format. Without `human`, the table format shows `rows`."""

    data: Any
    rows: Sequence[Row] = ()
    columns: Sequence[str] = ()
    human: Sequence[Block] = field(default_factory=tuple)

    def blocks(self) -> Sequence[Block]:
        return self.human if self.human else (Table(self.rows, self.columns),)

    def render(self, fmt: str) -> str:
        """The text `fmt` asks for, as written to a pipe or a file (no colours)."""
        if fmt == "json":
            return json.dumps(jsonable(self.data), indent=2, ensure_ascii=False) + "\n"
        if fmt == "csv":
            return csv_text(self.rows, self.columns)
        return human_text(self.blocks())


def emit(report: Report, fmt: str, stream: TextIO) -> None:
    """Write `report` to `stream`: with colours when it is a terminal and the format is table."""
    if fmt == "table" and is_terminal(stream):
        print_human(report.blocks(), stream)
    else:
        stream.write(report.render(fmt))


__all__ = [
    "FORMATS",
    "Block",
    "Lines",
    "Pairs",
    "Report",
    "Table",
    "csv_text",
    "emit",
    "human_text",
    "is_terminal",
    "jsonable",
    "text",
]
