"""`kpisettle`: settle, read, explain, audit and review rulesets from a shell.

    kpisettle [--target HOST:PORT] [--token TOKEN] [--tls|--no-tls] [--ca-file PEM]
              [--timeout SECONDS] [--format table|json|csv] COMMAND ...

    settle --file input.json | --contract C --seller S --market US --period 2026-03-01
           --ruleset us-managed-standard --metric NAME=VALUE ... --param NAME=VALUE ...
    settle --batch rows.csv|rows.jsonl [--results OUT.jsonl|OUT.csv] [--items-per-message N]
    get NAME · list [filters] · breakdown NAME · explain NAME [--language en|zh]
    audit verify [--anchor SEQ:HASH] · audit replay NAME...
    export lines|deltas --from D --to D [--market M] [--contract C] [--seller S] [--ruleset R]
           [--skip-zero] [--output FILE]  (billing; see clients/cli/export.py for the columns)
    rulesets validate FILE... (offline) · create FILE · approve NAME · retire NAME
             list [RULESET] · show NAME · diff NAME OTHER · impact CANDIDATE --from D --to D [--page-size N]

`--target` defaults to $KPISETTLE_TARGET or 127.0.0.1:50051, `--token` to $KPISETTLE_TOKEN.

Human output (`--format table`, the default) is drawn with rich: colours on a terminal,
plain text in a pipe or a file; `--format json|csv` is exact (decimal strings). `--format`
may also follow the command.

Exit codes: 0 all good; 1 some items or checks failed (the service refused the request's
content — invalid input, not found, failed precondition, revision mismatch —, a replay
mismatch, a broken audit chain, a ruleset with errors or failing examples, an impact run
where settlements failed); 2 usage or connection errors (bad flags, unreadable or malformed
input files, no token, UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED, DEADLINE_EXCEEDED).
Errors go to stderr with the message and every field violation.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

import grpc

from clients.kpisettle_client import KpisettleClient, KpisettleError

from . import export, views
from .batch import BatchUsageError, check_options, run_batch
from .inputs import InputError, from_args, parse_date
from .output import FORMATS, Report, emit
from .validate import validate_files

DEFAULT_TARGET = "127.0.0.1:50051"
OK, FAILED, USAGE = 0, 1, 2

#: Status codes that mean "cannot talk to the service as this caller" rather than "this item failed".
CONNECTION_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class UsageError(Exception):
    """Bad options discovered after parsing (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `main()` returns 2 in-process."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kpisettle", description="KPI settlement from the command line.")
    parser.add_argument("--target", default=os.environ.get("KPISETTLE_TARGET") or DEFAULT_TARGET, help="host:port of the service")
    parser.add_argument("--token", default=None, help="bearer token (default: $KPISETTLE_TOKEN)")
    parser.add_argument(
        "--tls", action=argparse.BooleanOptionalAction, default=None, help="force TLS on or off (default: TLS unless the host is local)"
    )
    parser.add_argument("--ca-file", help="PEM root certificates to trust (implies TLS)")
    parser.add_argument("--cert-file", help="PEM client certificate chain for mutual TLS")
    parser.add_argument("--key-file", help="PEM client private key for mutual TLS")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call attempt, seconds (default 30)")
    parser.add_argument("--retries", type=int, default=3, help="retries after UNAVAILABLE / DEADLINE_EXCEEDED (default 3)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output: table (people), json or csv (exact decimal strings)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    settle = commands.add_parser("settle", help="settle one contract period from a JSON file and/or flags")
    settle.add_argument("--file", help="JSON file with the SettlementInput fields")
    settle.add_argument("--contract")
    settle.add_argument("--seller")
    settle.add_argument("--market")
    settle.add_argument("--period", help="first day of the period, YYYY-MM-DD")
    settle.add_argument("--period-end", help="last day of the period (inclusive), YYYY-MM-DD")
    settle.add_argument("--ruleset", help='ruleset id, or "rulesets/{id}/versions/{n}"')
    settle.add_argument("--metric", action="append", metavar="NAME=VALUE", help='a metric ("18400 EUR" for another currency); repeatable')
    settle.add_argument("--param", action="append", metavar="NAME=VALUE", help="a contract parameter; repeatable")
    settle.add_argument("--fx", action="append", metavar="BASE/QUOTE=RATE", help="an FX rate, e.g. EUR/USD=1.0870; repeatable")
    settle.add_argument("--active-days", type=int)
    settle.add_argument("--request-id", help="idempotency key (default: derived from the input)")
    settle.add_argument("--expected-revision", type=int, help="the revision last seen (0: none yet), to correct a settlement")
    settle.add_argument(
        "--batch", metavar="FILE", help="settle every row of a .csv or .jsonl file over one stream (see clients/cli/batch.py)"
    )
    settle.add_argument("--results", metavar="OUT", help="with --batch: one result per row, to a .jsonl or .csv file")
    settle.add_argument(
        "--items-per-message", type=int, default=100, metavar="N", help="with --batch: rows per stream message (default 100)"
    )

    commands.add_parser("get", help="one stored settlement").add_argument("name")
    listing = commands.add_parser("list", help="stored settlements")
    listing.add_argument("--contract", default="")
    listing.add_argument("--seller", default="")
    listing.add_argument("--market", default="")
    listing.add_argument("--ruleset", default="")
    listing.add_argument("--from", dest="period_from", help="period start on or after, YYYY-MM-DD")
    listing.add_argument("--to", dest="period_to", help="period start on or before, YYYY-MM-DD")
    listing.add_argument("--include-superseded", action="store_true")
    commands.add_parser("breakdown", help="a settlement's fee breakdown (what billing invoices)").add_argument("name")
    explain = commands.add_parser("explain", help="a decision in plain sentences")
    explain.add_argument("name")
    explain.add_argument("--language", choices=("en", "zh"), default="en")

    audit = commands.add_parser("audit", help="verify the audit chain, replay decisions")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    verify = audit_commands.add_parser("verify", help="walk the tenant's hash chain")
    verify.add_argument(
        "--anchor", metavar="SEQ:HASH", help="a head printed by an earlier verify, kept elsewhere: the chain must still hold it"
    )
    audit_commands.add_parser("replay", help="recompute stored decisions and compare").add_argument("names", nargs="+", metavar="NAME")

    rulesets = commands.add_parser("rulesets", help="validate, create, review and approve rulesets")
    rs = rulesets.add_subparsers(dest="rulesets_command", required=True, parser_class=_Parser)
    rs.add_parser("validate", help="validate files and run their examples, offline").add_argument("files", nargs="+", metavar="FILE")
    rs.add_parser("create", help="store a new DRAFT version (admin)").add_argument("file", metavar="FILE")
    for action in ("approve", "retire"):
        sub = rs.add_parser(action, help=f"{action} a version (compliance)")
        sub.add_argument("name", help='"rulesets/{id}/versions/{n}" or "{id}/versions/{n}"')
        sub.add_argument("--note", default="")
    rs.add_parser("list", help="versions of one ruleset, or of all").add_argument("ruleset", nargs="?")
    show = rs.add_parser("show", help="one version")
    show.add_argument("name")
    show.add_argument("--source", action="store_true", help="also print the YAML source (table format)")
    diff = rs.add_parser("diff", help="what changed from NAME (older) to OTHER (newer)")
    diff.add_argument("name")
    diff.add_argument("other")
    impact = rs.add_parser("impact", help="re-run stored settlements under a candidate version")
    impact.add_argument("candidate")
    impact.add_argument("--from", dest="period_from", required=True, help="YYYY-MM-DD")
    impact.add_argument("--to", dest="period_to", required=True, help="YYYY-MM-DD")
    impact.add_argument(
        "--page-size", type=int, default=0, metavar="N", help="impacts fetched per call (0: the service's default, 1000); all are shown"
    )

    export.add_parser(commands)
    _format_after_commands(parser)
    return parser


def _format_after_commands(parser: argparse.ArgumentParser) -> None:
    """Let `--format` also follow the command (`kpisettle export lines … --format csv`); given
    there, it wins over one given before the command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _format_after_commands(sub)
                if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    sub.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS, help="as the global --format")


def version_name(name: str) -> str:
    return name if name.startswith("rulesets/") else f"rulesets/{name}"


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def read_bytes(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def connect(args: argparse.Namespace) -> KpisettleClient:
    token = args.token or os.environ.get("KPISETTLE_TOKEN", "")
    if not token:
        raise UsageError("kpisettle: no token: pass --token or set KPISETTLE_TOKEN")
    if args.timeout <= 0:
        raise UsageError("kpisettle: --timeout must be positive")
    if args.retries < 0:
        raise UsageError("kpisettle: --retries must not be negative")
    if bool(args.cert_file) != bool(args.key_file):
        raise UsageError("kpisettle: --cert-file and --key-file go together")
    roots = read_bytes(args.ca_file)
    cert, key = read_bytes(args.cert_file), read_bytes(args.key_file)
    client_certificate = (cert, key) if cert is not None and key is not None else None
    return KpisettleClient(
        args.target,
        token,
        tls=args.tls,
        root_certificates=roots,
        client_certificate=client_certificate,
        timeout=args.timeout,
        retries=args.retries,
    )


Command = Callable[[KpisettleClient, argparse.Namespace], tuple[Report, int]]


def _settle(client: KpisettleClient, args: argparse.Namespace) -> tuple[Report, int]:
    request = from_args(args)
    settled = client.settle(request.input, request.request_id, request.expected_revision)
    return views.settlement(settled), OK


def _list(client: KpisettleClient, args: argparse.Namespace) -> tuple[Report, int]:
    items = client.list_settlements(
        contract_id=args.contract,
        seller_id=args.seller,
        market=args.market,
        ruleset=args.ruleset,
        period_from=parse_date(args.period_from, "--from") if args.period_from else None,
        period_to=parse_date(args.period_to, "--to") if args.period_to else None,
        include_superseded=args.include_superseded,
    )
    return views.settlements(list(items)), OK


def parse_anchor(text: str) -> tuple[int, str]:
    sequence, _, digest = text.partition(":")
    if not sequence.isdigit() or int(sequence) < 1 or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise UsageError(f"--anchor: expected SEQ:HASH (a position and 64 lowercase hex digits), got {text!r}")
    return int(sequence), digest


def _audit(client: KpisettleClient, args: argparse.Namespace) -> tuple[Report, int]:
    if args.audit_command == "verify":
        report = client.verify_audit_log(anchor=parse_anchor(args.anchor) if args.anchor else None)
        return views.audit(report), OK if report.ok else FAILED
    results = [(name, client.replay(name)) for name in args.names]
    return views.replays(results), OK if all(r.match for _, r in results) else FAILED


def _rulesets(client: KpisettleClient, args: argparse.Namespace) -> tuple[Report, int]:
    command = args.rulesets_command
    if command == "create":
        return views.version(client.create_ruleset_version(read_text(args.file))), OK
    if command == "approve":
        return views.version(client.approve(version_name(args.name), args.note)), OK
    if command == "retire":
        return views.version(client.retire(version_name(args.name), args.note)), OK
    if command == "list":
        return views.versions(list(client.list_ruleset_versions(args.ruleset))), OK
    if command == "show":
        return views.version(client.get_ruleset_version(version_name(args.name)), with_source=args.source), OK
    if command == "diff":
        return views.changes(client.diff(version_name(args.name), version_name(args.other))), OK
    period_from, period_to = parse_date(args.period_from, "--from"), parse_date(args.period_to, "--to")
    if args.page_size < 0:
        raise InputError("--page-size must not be negative")
    report = client.analyze_impact(version_name(args.candidate), period_from, period_to, page_size=args.page_size)
    return views.impact(report), FAILED if report.settlements_failed else OK


COMMANDS: dict[str, Command] = {
    "settle": _settle,
    "get": lambda client, args: (views.settlement(client.get_settlement(args.name)), OK),
    "list": _list,
    "breakdown": lambda client, args: (views.breakdown(client.get_fee_breakdown(args.name)), OK),
    "explain": lambda client, args: (views.explanation(client.explain(args.name, args.language)), OK),
    "audit": _audit,
    "rulesets": _rulesets,
}


def error_exit(error: KpisettleError) -> int:
    return USAGE if error.code in CONNECTION_CODES else FAILED


def run(argv: Sequence[str] | None, stdout: TextIO, stderr: TextIO) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=stderr)
        print("run `kpisettle --help` for the commands and options", file=stderr)
        return USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else USAGE
    if args.command == "rulesets" and args.rulesets_command == "validate":
        return validate_files(args.files, args.format, stdout, stderr)
    batch = args.command == "settle" and args.batch is not None
    try:
        if batch:
            check_options(args)
        elif args.command == "settle" and (args.results is not None or args.items_per_message != 100):
            raise UsageError("kpisettle: --results and --items-per-message go with --batch")
        with connect(args) as client:
            if batch:
                return run_batch(client, args, stdout, stderr)
            if args.command == "export":
                return export.run_export(client, args, stdout)
            report, code = COMMANDS[args.command](client, args)
    except (UsageError, BatchUsageError) as exc:
        print(exc, file=stderr)
        return USAGE
    except InputError as exc:
        print(f"kpisettle: {exc}", file=stderr)
        return USAGE
    except KpisettleError as exc:
        print(f"kpisettle: {exc}", file=stderr)
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            print(f"kpisettle: is the service running at {args.target}? (--target or KPISETTLE_TARGET)", file=stderr)
        return error_exit(exc)
    emit(report, args.format, stdout)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run the command line on `argv` (default sys.argv[1:]) and return its exit code."""
    try:
        return run(list(argv) if argv is not None else None, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        print("kpisettle: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main", "run"]
