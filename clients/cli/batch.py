"""`kpisettle settle --batch FILE`: a file of contract periods through one SettleBatch stream.

FILE is chosen by its extension:

- `.csv`: a header line, then one contract period per line. Columns `contract_id`,
  `seller_id`, `market`, `period_start`, `ruleset` (required), optional `period_end`,
  `active_days`, `request_id`, `expected_revision`, and any number of `metric:<name>`
  (a decimal, or "18400 EUR" for an amount in another currency) and `param:<name>`
  columns. An empty cell leaves that field (metric, param) out of the row.
- `.jsonl`: one JSON object per line, the same shape as `settle --file`; blank lines are
  skipped.

Rows are read lazily, while the stream has room for them, so a file of any size never
sits in memory. Each row's request id is its `request_id`, else the one derived from its
input (`derive_request_id`): re-running the same file settles nothing twice, the service
answers every row with the stored decision (`deduplicated`).

Rows are numbered from 1 in the order of the file (the CSV header is not a row). A
malformed row (wrong number of cells, a missing required value, a bad date, a non-decimal
amount, not JSON…) stops the run with exit code 2 and its row number; the rows read before
it are still answered and written to the results. A row the service refuses (an unknown
metric, an unknown ruleset…) is a failed row: its error is written to the results and the
others go on (exit code 1).

`--results OUT` writes one line per row as it is answered: JSONL if OUT ends in `.jsonl`,
CSV if `.csv`, fields `RESULT_COLUMNS`. Progress goes to stderr: a rich progress bar on
a terminal (the file is counted first for its total), else a line every `PROGRESS_EVERY`
rows and at the end; the summary (rows settled now, answered as deduplicated, failed with their reasons,
totals per currency of every settled or deduplicated row, as exact decimal strings) goes
to stdout in the `--format` asked for.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import MAX_PREC, Context, Decimal
from pathlib import Path
from typing import Any, TextIO

import rich.progress
from rich.console import Console

from clients.kpisettle_client import KpisettleClient
from clients.kpisettle_client.batch import MAX_ITEMS_PER_MESSAGE, BatchItem
from clients.kpisettle_client.models import BatchResult

from .inputs import InputError, from_document, parse_document
from .output import Block, Lines, Pairs, Report, Table, emit, is_terminal, jsonable, text

REQUIRED = ("contract_id", "seller_id", "market", "period_start", "ruleset")
OPTIONAL = ("period_end", "active_days", "request_id", "expected_revision")
RESULT_COLUMNS = (
    "row",
    "request_id",
    "name",
    "contract_id",
    "period_start",
    "total",
    "currency",
    "deduplicated",
    "error_code",
    "error_message",
)
PROGRESS_EVERY = 100
#: Failures listed one by one in the summary; the rest are only counted by reason.
FAILURES_LISTED = 20
#: Sums of totals never round, however many rows.
EXACT = Context(prec=MAX_PREC)

#: Options of the single `settle` that make no sense with --batch.
SINGLE_OPTIONS = (
    "file",
    "contract",
    "seller",
    "market",
    "period",
    "period_end",
    "ruleset",
    "metric",
    "param",
    "fx",
    "active_days",
    "request_id",
    "expected_revision",
)


class BatchUsageError(Exception):
    """Bad --batch options (exit 2 before anything is read or sent)."""


def kind_of(path: str, option: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise BatchUsageError(f"kpisettle: {option} {path}: the file must end in .csv or .jsonl")
    return suffix[1:]


# ------------------------------------------------------------------ reading rows


def _whole(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{what} must be a whole number, not {value!r}") from None


def _csv_metric(value: str) -> object:
    amount, _, currency = value.strip().partition(" ")
    return {"amount": amount, "currency": currency.strip()} if currency.strip() else amount


def csv_rows(path: str, stream: TextIO) -> Iterator[BatchItem]:
    reader = csv.reader(stream)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"{path}: line 1: not CSV: {exc}") from None
    if header is None:
        raise InputError(f"{path}: empty file (expected a header line: {', '.join(REQUIRED)}, metric:<name>…, param:<name>…)")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL and not h.startswith(("metric:", "param:"))]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if missing or unknown or duplicated:
        problems = [f"missing columns {', '.join(missing)}"] if missing else []
        problems += [f"unknown columns {', '.join(unknown)} (use metric:<name> or param:<name>)"] if unknown else []
        problems += [f"duplicated columns {', '.join(duplicated)}"] if duplicated else []
        raise InputError(f"{path}: line 1 (header): {'; '.join(problems)}")
    row = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(f"{path}: row {row + 1} (line {reader.line_num}): not CSV: {exc}") from None
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line
        row += 1
        where = f"{path}: row {row} (line {reader.line_num})"
        if len(cells) != len(header):
            raise InputError(f"{where}: {len(cells)} cells where the header has {len(header)} columns")
        document: dict[str, Any] = {"metrics": {}, "params": {}}
        for column, raw in zip(header, cells, strict=True):
            value = raw.strip()
            if not value:
                continue
            if column.startswith("metric:"):
                document["metrics"][column.removeprefix("metric:")] = _csv_metric(value)
            elif column.startswith("param:"):
                document["params"][column.removeprefix("param:")] = value
            elif column in ("active_days", "expected_revision"):
                document[column] = _whole(value, column)
            else:
                document[column] = value
        yield _item(document, where)


def jsonl_rows(path: str, stream: TextIO) -> Iterator[BatchItem]:
    row = 0
    for line_number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        row += 1
        where = f"{path}: row {row} (line {line_number})"
        document = parse_document(line, where)
        yield _item(document, where)


def _item(document: dict[str, Any], where: str) -> BatchItem:
    try:
        request = from_document(document)
    except InputError as exc:
        message = str(exc)
        raise InputError(message if message.startswith(where) else f"{where}: {message}") from None
    return BatchItem(request.input, request.request_id, request.expected_revision)


def read_rows(path: str, kind: str, stream: TextIO) -> Iterator[BatchItem]:
    """The file's rows as batch items, one at a time; `InputError` names the bad row."""
    rows = csv_rows(path, stream) if kind == "csv" else jsonl_rows(path, stream)
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {exc}") from None


# ------------------------------------------------------------------ results and summary


def result_row(result: BatchResult) -> dict[str, Any]:
    s, error = result.settlement, result.error
    return {
        "row": result.index + 1,
        "request_id": result.request_id,
        "name": s.name if s else None,
        "contract_id": result.input.contract_id,
        "period_start": result.input.period_start,
        "total": s.total if s else None,
        "currency": s.currency if s else None,
        "deduplicated": result.deduplicated if s else None,
        "error_code": error.code.name if error else None,
        "error_message": str(error) if error else None,
    }


class ResultsWriter:
    """One line per answered row, flushed as it goes (so an interrupted run leaves what it did)."""

    def __init__(self, stream: TextIO, kind: str) -> None:
        self._stream = stream
        self._kind = kind
        self._csv = csv.writer(stream, lineterminator="\n") if kind == "csv" else None
        if self._csv is not None:
            self._csv.writerow(RESULT_COLUMNS)

    def write(self, row: dict[str, Any]) -> None:
        if self._csv is not None:
            self._csv.writerow([text(row[c]) for c in RESULT_COLUMNS])
        else:
            self._stream.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
        self._stream.flush()


@dataclass
class Summary:
    rows: int = 0
    settled: int = 0
    deduplicated: int = 0
    failed: int = 0
    totals: dict[str, Decimal] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: BatchResult) -> None:
        self.rows += 1
        s, error = result.settlement, result.error
        if s is not None:
            if s.deduplicated:
                self.deduplicated += 1
            else:
                self.settled += 1
            self.totals[s.currency] = EXACT.add(self.totals.get(s.currency, Decimal(0)), s.total)
            self.counts[s.currency] += 1
        elif error is not None:
            self.failed += 1
            reason = error.code.name + (f" {error.reason}" if error.reason else "")
            self.reasons[reason] += 1
            if len(self.failures) < FAILURES_LISTED:
                self.failures.append({"row": result.index + 1, "request_id": result.request_id, "error": str(error)})

    def report(self, results: str | None, stopped: str | None) -> Report:
        totals = [{"currency": c, "settlements": self.counts[c], "total": self.totals[c]} for c in sorted(self.totals)]
        reasons = [{"reason": r, "rows": n} for r, n in sorted(self.reasons.items())]
        data: dict[str, Any] = {
            "rows": self.rows,
            "settled": self.settled,
            "deduplicated": self.deduplicated,
            "failed": self.failed,
            "totals": totals,
            "failure_reasons": reasons,
            "failures": self.failures,
            "results": results,
            "stopped": stopped,
        }
        rows: list[dict[str, Any]] = [
            {"item": "rows", "value": self.rows},
            {"item": "settled", "value": self.settled},
            {"item": "deduplicated", "value": self.deduplicated},
            {"item": "failed", "value": self.failed},
            *({"item": f"total {t['currency']}", "value": t["total"]} for t in totals),
            *({"item": f"failed {r['reason']}", "value": r["rows"]} for r in reasons),
        ]
        head: dict[str, Any] = {k: data[k] for k in ("rows", "settled", "deduplicated", "failed")}
        if results:
            head["results"] = results
        if stopped:
            head["stopped"] = stopped
        blocks: list[Block] = [Pairs(head), Table(totals, ("currency", "settlements", "total"), empty="(no totals)")]
        if reasons:
            blocks.append(Table(reasons, ("reason", "rows")))
        # each failure with its reason: the error, then every field violation on its own line
        listed: list[str] = []
        for failure in self.failures:
            first, *violations = failure["error"].strip().splitlines()
            listed.append("\n    ".join([f"row {failure['row']}: {first}", *(v.strip() for v in violations)]))
        if self.failed > len(self.failures):
            listed.append(f"… {self.failed - len(self.failures)} more failed rows (see the results)")
        if listed:
            blocks.append(Lines("\n".join(listed)))
        return Report(data, rows, ("item", "value"), blocks)


def count_rows(path: str, kind: str) -> int | None:
    """How many rows the file holds (for the progress bar's total); None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            if kind == "jsonl":
                return sum(1 for line in stream if line.strip())
            records = sum(1 for cells in csv.reader(stream) if cells and any(c.strip() for c in cells))
            return max(records - 1, 0)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


class Progress:
    """Progress on stderr: a rich progress bar on a terminal; elsewhere one counter line every
    `PROGRESS_EVERY` rows and a last one, so logs of long runs show how far they got."""

    def __init__(self, stream: TextIO, total: int | None = None) -> None:
        self._stream = stream
        self._bar: rich.progress.Progress | None = None
        self._task: rich.progress.TaskID | None = None
        if is_terminal(stream):
            self._bar = rich.progress.Progress(
                rich.progress.TextColumn("settling"),
                rich.progress.BarColumn(),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TextColumn("{task.fields[counts]}"),
                rich.progress.TimeElapsedColumn(),
                console=Console(file=stream, highlight=False, markup=False, emoji=False),
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._bar.add_task("settle", total=total, counts="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    @staticmethod
    def counts(summary: Summary) -> str:
        return f"{summary.settled} settled, {summary.deduplicated} deduplicated, {summary.failed} failed"

    def show(self, summary: Summary, *, final: bool = False) -> None:
        if self._bar is not None and self._task is not None:
            if final:  # the bar ends full even when a malformed row stopped the run early
                self._bar.update(self._task, completed=summary.rows, total=summary.rows, counts=self.counts(summary))
            else:
                self._bar.update(self._task, completed=summary.rows, counts=self.counts(summary))
            return
        at_step = summary.rows % PROGRESS_EVERY == 0
        if at_step == final:  # a step's line is written once; the last line only after a partial step
            return
        self._stream.write(f"kpisettle: {summary.rows} rows: {self.counts(summary)}\n")
        self._stream.flush()


# ------------------------------------------------------------------ the command


def check_options(args: argparse.Namespace) -> None:
    given = [f"--{o.replace('_', '-')}" for o in SINGLE_OPTIONS if getattr(args, o) not in (None, [])]
    if given:
        raise BatchUsageError(f"kpisettle: settle --batch takes its inputs from the file, not from {', '.join(given)}")
    if not 1 <= args.items_per_message <= MAX_ITEMS_PER_MESSAGE:
        raise BatchUsageError(f"kpisettle: --items-per-message must be between 1 and {MAX_ITEMS_PER_MESSAGE}")
    kind_of(args.batch, "--batch")
    if args.results:
        kind_of(args.results, "--results")


def run_batch(client: KpisettleClient, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Settle every row of `args.batch`; 0 if all settled, 1 if some failed, 2 for a malformed file.

    Stream failures (connection, permissions) raise `KpisettleError` for the caller to report."""
    kind = kind_of(args.batch, "--batch")
    summary = Summary()
    progress = Progress(stderr, count_rows(args.batch, kind) if is_terminal(stderr) else None)
    stopped: str | None = None
    with ExitStack() as stack:
        try:
            source = stack.enter_context(open(args.batch, encoding="utf-8", newline=""))
        except OSError as exc:
            raise InputError(f"cannot read {args.batch}: {exc}") from None
        writer: ResultsWriter | None = None
        if args.results:
            try:
                out = stack.enter_context(open(args.results, "w", encoding="utf-8", newline=""))
            except OSError as exc:
                raise InputError(f"cannot write {args.results}: {exc}") from None
            writer = ResultsWriter(out, kind_of(args.results, "--results"))
        stack.enter_context(progress)
        try:
            for result in client.settle_batch(read_rows(args.batch, kind, source), items_per_message=args.items_per_message):
                summary.add(result)
                if writer is not None:
                    writer.write(result_row(result))
                progress.show(summary)
        except InputError as exc:
            stopped = str(exc)
        progress.show(summary, final=True)
    emit(summary.report(args.results, stopped), args.format, stdout)
    if stopped is not None:
        print(f"kpisettle: {stopped}", file=stderr)
        print(f"kpisettle: stopped at the malformed row; the {summary.rows} rows before it were answered", file=stderr)
        return 2
    return 1 if summary.failed else 0


__all__ = ["RESULT_COLUMNS", "check_options", "read_rows", "run_batch"]
