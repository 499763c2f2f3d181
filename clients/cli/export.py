"""`kpisettle export lines|deltas`: what billing invoices for a period, and what corrections changed.

    kpisettle export lines  --from 2026-03-01 --to 2026-03-31 [filters] [--skip-zero] [--output FILE]
    kpisettle export deltas --from 2026-03-01 --to 2026-03-31 [filters] [--skip-zero] [--output FILE]

Both read every settlement whose period starts within [--from, --to] (both inclusive)
through ListSettlements, page after page (`--page-size`, at most 200 a page), narrowed by
`--market`, `--contract`, `--seller` and `--ruleset`. They need the `billing` role (or
`erp` or `compliance`: any role that may list settlements).

`export lines` — the invoice lines: one row per fee line of every *current* settlement
(the latest revision of each contract period; superseded revisions are left out), in the
service's order (period start, contract id) and the decision's line order. Columns
`LINE_COLUMNS`:

    settlement, contract_id, seller_id, market, period_start, period_end, revision,
    ruleset_version, line, kind, label, label_zh, basis, rate, amount, currency, waived_by

`line` is the fee id of the ruleset (or market_multiplier, penalty_cap, total_floor,
total_cap); `amount` is the rounded amount invoiced, in `currency`; `basis` and `rate` are
empty when the line has none; `waived_by` lists the exemptions that waived a penalty
(space-separated). The amounts of one settlement's rows add up to its total.

`export deltas` — the corrections: one row per line delta of every correcting revision
(revision 2 and later, superseded ones included, so that revisions 2 and 3 of one period
give two sets of rows: 2 against 1, then 3 against 2). Columns `DELTA_COLUMNS`:

    settlement, supersedes, contract_id, seller_id, market, period_start, period_end,
    revision, ruleset_version, line, label, previous_amount, amount, delta, currency,
    create_time

`delta` = `amount` - `previous_amount` (the superseded revision's amount; 0 for a line it
did not have): what a credit (negative) or debit (positive) note carries. `create_time`
is when the correction was stored (UTC, ISO 8601), to tell new corrections from those
already billed. The deltas of one revision add up to its total minus the superseded total.

`--skip-zero` leaves out lines whose amount is 0 (lines) or whose delta is 0 (deltas).

Formats: `csv` (a header, then the rows) and `json` (`{"export", "from", "to", "rows": [...],
"settlements", "totals"}`) are written as the pages arrive, amounts as exact decimal
strings; `table` shows the main columns and the totals per currency. `--output FILE`
writes to FILE through a temporary file renamed at the end, so FILE only ever holds a
complete export, and prints the totals per currency to stdout; without it the export goes
to stdout (check the exit code: a connection lost midway leaves a partial stdout and exits 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import MAX_PREC, Context, Decimal
from pathlib import Path
from typing import Any, TextIO

from clients.kpisettle_client import KpisettleClient, Settlement

from .inputs import InputError, parse_date
from .output import Block, Lines, Report, Table, emit, jsonable, text
from .views import settlement_columns

LINE_COLUMNS = (
    "settlement",
    "contract_id",
    "seller_id",
    "market",
    "period_start",
    "period_end",
    "revision",
    "ruleset_version",
    "line",
    "kind",
    "label",
    "label_zh",
    "basis",
    "rate",
    "amount",
    "currency",
    "waived_by",
)
DELTA_COLUMNS = (
    "settlement",
    "supersedes",
    "contract_id",
    "seller_id",
    "market",
    "period_start",
    "period_end",
    "revision",
    "ruleset_version",
    "line",
    "label",
    "previous_amount",
    "amount",
    "delta",
    "currency",
    "create_time",
)
#: What `--format table` shows of each row (the other columns are in CSV and JSON).
LINE_TABLE = ("contract_id", "seller_id", "market", "period_start", "revision", "line", "amount", "currency")
DELTA_TABLE = ("contract_id", "market", "period_start", "revision", "line", "previous_amount", "amount", "delta", "currency")
#: The service's largest page of settlements.
MAX_PAGE_SIZE = 200
#: Sums never round, however many rows.
EXACT = Context(prec=MAX_PREC)


def add_parser(commands: Any) -> None:
    """The `export` command and its two subcommands, on the main parser's subcommands."""
    export = commands.add_parser(
        "export",
        help="billing exports of a period: invoice lines, correction deltas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = export.add_subparsers(dest="export_command", required=True, parser_class=type(export))
    helps = {
        "lines": "one row per fee line of every current settlement: " + ", ".join(LINE_COLUMNS),
        "deltas": "one row per line delta of every correction (revision N against N-1): " + ", ".join(DELTA_COLUMNS),
    }
    for kind, description in helps.items():
        sub = kinds.add_parser(kind, help=description.split(":")[0], description=description, epilog="See `kpisettle export --help`.")
        sub.add_argument("--from", dest="period_from", required=True, metavar="YYYY-MM-DD", help="period start on or after")
        sub.add_argument("--to", dest="period_to", required=True, metavar="YYYY-MM-DD", help="period start on or before")
        sub.add_argument("--market", default="", help="only this market")
        sub.add_argument("--contract", default="", help="only this contract id")
        sub.add_argument("--seller", default="", help="only this seller id")
        sub.add_argument("--ruleset", default="", help="only settlements under this ruleset id")
        sub.add_argument("--skip-zero", action="store_true", help="leave out zero amounts (lines) or zero deltas (deltas)")
        sub.add_argument("--output", metavar="FILE", help="write here (complete or not at all) instead of stdout")
        sub.add_argument("--page-size", type=int, default=MAX_PAGE_SIZE, metavar="N", help=f"settlements per page (1..{MAX_PAGE_SIZE})")


# ------------------------------------------------------------------ rows


def line_rows(s: Settlement, skip_zero: bool) -> Iterator[dict[str, Any]]:
    for line in s.lines:
        if skip_zero and line.amount == 0:
            continue
        yield {
            "settlement": s.name,
            **settlement_columns(s),
            "line": line.id,
            "kind": line.kind,
            "label": line.label,
            "label_zh": line.label_zh,
            "basis": line.basis,
            "rate": line.rate,
            "amount": line.amount,
            "currency": s.currency,
            "waived_by": " ".join(line.waived_by),
        }


def delta_rows(s: Settlement, skip_zero: bool) -> Iterator[dict[str, Any]]:
    if s.revision < 2:
        return
    labels = {line.id: line.label for line in s.lines}
    for d in s.deltas:
        if skip_zero and d.delta == 0:
            continue
        yield {
            "settlement": s.name,
            "supersedes": s.supersedes,
            **settlement_columns(s),
            "line": d.id,
            "label": labels.get(d.id, ""),
            "previous_amount": d.previous_amount,
            "amount": d.amount,
            "delta": d.delta,
            "currency": s.currency,
            "create_time": s.create_time,
        }


@dataclass
class Totals:
    """Per currency: settlements, rows and the sum of the exported amounts (lines) or deltas."""

    measure: str
    settlements: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    sums: dict[str, Decimal] = field(default_factory=dict)

    def add(self, currency: str, rows: list[dict[str, Any]]) -> None:
        self.settlements[currency] = self.settlements.get(currency, 0) + 1
        self.rows[currency] = self.rows.get(currency, 0) + len(rows)
        total = self.sums.get(currency, Decimal(0))
        for row in rows:
            total = EXACT.add(total, row[self.measure])
        self.sums[currency] = total

    def table(self) -> list[dict[str, Any]]:
        return [
            {"currency": c, "settlements": self.settlements[c], "rows": self.rows[c], self.measure: self.sums[c]} for c in sorted(self.sums)
        ]

    @property
    def count(self) -> int:
        return sum(self.settlements.values())


# ------------------------------------------------------------------ writers


class Writer:
    """Rows to `stream` in one format: CSV and JSON as they come, the table at the end."""

    def __init__(self, stream: TextIO, fmt: str, kind: str, columns: tuple[str, ...], head: dict[str, Any]) -> None:
        self._stream, self._fmt, self._kind, self._columns, self._head = stream, fmt, kind, columns, head
        self._kept: list[dict[str, Any]] = []
        self._first = True
        if fmt == "csv":
            self._csv = csv.writer(stream, lineterminator="\n")
            self._csv.writerow(columns)
        elif fmt == "json":
            stream.write("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(jsonable(v))},\n" for k, v in head.items()) + '  "rows": [')

    def rows(self, rows: list[dict[str, Any]]) -> None:
        if self._fmt == "csv":
            self._csv.writerows([text(row[c]) for c in self._columns] for row in rows)
        elif self._fmt == "json":
            for row in rows:
                self._stream.write(("\n" if self._first else ",\n") + "    " + json.dumps(jsonable(row), ensure_ascii=False))
                self._first = False
        else:
            self._kept.extend(rows)

    def finish(self, totals: Totals) -> None:
        if self._fmt == "csv":
            return
        if self._fmt == "json":
            tail = {"settlements": totals.count, "totals": jsonable(totals.table())}
            self._stream.write(("\n  " if not self._first else "") + "],\n")
            self._stream.write(",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in tail.items()) + "\n}\n")
            return
        shown = LINE_TABLE if self._kind == "lines" else DELTA_TABLE
        n = totals.count
        what = f"current settlement{'s' if n != 1 else ''}" if self._kind == "lines" else f"correction{'s' if n != 1 else ''}"
        blocks: list[Block] = [
            Table(self._kept, shown, empty=f"(no {'lines' if self._kind == 'lines' else 'deltas'} in the period)"),
            Table(totals.table(), ("currency", "settlements", "rows", totals.measure), empty="(no totals)"),
            Lines(f"{n} {what}, {len(self._kept)} rows, periods starting {self._head['from']} to {self._head['to']}"),
        ]
        emit(Report(None, human=blocks), "table", self._stream)


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def run_export(client: KpisettleClient, args: argparse.Namespace, stdout: TextIO) -> int:
    """Write the export `args.export_command` asks for; 0 when complete. Connection and
    permission errors raise `KpisettleError` for the caller (exit 2)."""
    kind = args.export_command
    period_from, period_to = parse_date(args.period_from, "--from"), parse_date(args.period_to, "--to")
    if period_from > period_to:
        raise InputError(f"--from {period_from} is after --to {period_to}")
    if not 1 <= args.page_size <= MAX_PAGE_SIZE:
        raise InputError(f"--page-size must be between 1 and {MAX_PAGE_SIZE}")
    columns = LINE_COLUMNS if kind == "lines" else DELTA_COLUMNS
    rows_of = line_rows if kind == "lines" else delta_rows
    totals = Totals("amount" if kind == "lines" else "delta")
    head = {"export": kind, "from": period_from, "to": period_to}
    settlements = client.list_settlements(
        contract_id=args.contract,
        seller_id=args.seller,
        market=args.market,
        ruleset=args.ruleset,
        period_from=period_from,
        period_to=period_to,
        include_superseded=kind == "deltas",
        page_size=args.page_size,
    )

    def write(stream: TextIO) -> None:
        writer = Writer(stream, args.format, kind, columns, head)
        for settlement in settlements:
            if kind == "deltas" and settlement.revision < 2:
                continue
            rows = list(rows_of(settlement, args.skip_zero))
            totals.add(settlement.currency, rows)
            writer.rows(rows)
        writer.finish(totals)

    if args.output is None:
        write(stdout)
        return 0
    target = Path(args.output)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write {args.output}: {exc}") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            write(stream)
        os.chmod(temporary, 0o666 & ~_umask())  # as `open()` would have created it, not mkstemp's 0600
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # the control totals for the person who ran it; the data is in the file
    rows = sum(totals.rows.values())
    blocks: list[Block] = [
        Table(totals.table(), ("currency", "settlements", "rows", totals.measure), empty="(no totals)"),
        Lines(f"wrote {rows} rows ({args.format}) to {args.output}"),
    ]
    emit(Report(None, human=blocks), "table", stdout)
    return 0


__all__ = ["DELTA_COLUMNS", "LINE_COLUMNS", "add_parser", "run_export"]
