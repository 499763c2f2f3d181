"""The `kpisettle` command line (clients/cli) against a real server, on SQLite and PostgreSQL.

`main(argv)` runs in-process with stdout and stderr captured; one test runs
`python -m clients.cli rulesets validate` as a child process (offline, no server).
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from clients.cli.export import LINE_COLUMNS
from clients.cli.main import main, run
from tests.server_harness import ROOT, RULESETS, Running

US = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
US_METRICS = {
    "gross_gmv": "130000",
    "refunds": "5000",
    "ad_spend": "20000",
    "ad_sales": "100000",
    "orders": "2000",
    "defective_orders": "4",
    "response_hours": "6",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KPISETTLE_TOKEN", raising=False)
    monkeypatch.delenv("KPISETTLE_TARGET", raising=False)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def as_(running: Running, caller: str, *rest: str) -> list[str]:
    """Global options for `caller` on this test's server, then the command."""
    return ["--target", f"127.0.0.1:{running.service.port}", "--token", running.callers[caller].token, *rest]


def flag_args(contract: str) -> list[str]:
    args = ["settle", "--contract", contract, "--seller", "S-1", "--market", "US", "--period", "2026-03-01"]
    args += ["--ruleset", "us-managed-standard", "--param", "gmv_target=100000"]
    for name, value in US_METRICS.items():
        args += ["--metric", f"{name}={value}"]
    return args


def summary(out: str) -> dict[str, str]:
    """The "key: value" lines a table output starts with."""
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.split("\n\n")[0].splitlines())}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_settle_read_explain_and_audit_in_every_format(running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    running.client.load_shipped_rulesets()
    document = {
        "contract_id": "C-1",
        "seller_id": "S-1",
        "market": "US",
        "period_start": "2026-03-01",
        "ruleset": "us-managed-standard",
        "metrics": US_METRICS,
        "params": {"gmv_target": "100000"},
        "request_id": "cli-test-c1",
    }
    input_file = tmp_path / "input.json"
    input_file.write_text(json.dumps(document), encoding="utf-8")

    # from a file, as a table
    code, out, err = cli(capsys, *as_(running, "erp", "settle", "--file", str(input_file)))
    assert (code, err) == (0, "")
    assert "11750.00" in out and "commission" in out
    head = summary(out)
    name = head["name"]
    assert name.startswith("settlements/") and head["total"] == "11750.00" and head["currency"] == "USD"
    # the same file again: deduplicated, nothing written twice
    code, out, _ = cli(capsys, *as_(running, "erp", "settle", "--file", str(input_file)))
    assert code == 0 and summary(out)["deduplicated"] == "true" and summary(out)["name"] == name

    # from flags, as JSON: exact decimal strings
    code, out, err = cli(capsys, *as_(running, "erp", "--format", "json", *flag_args("C-2")))
    assert (code, err) == (0, "")
    settled = json.loads(out)
    assert settled["total"] == "11750.00" and settled["contract_id"] == "C-2" and settled["revision"] == 1
    assert all(isinstance(line["amount"], str) for line in settled["lines"])
    second = settled["name"]

    # get (json), list (csv and table)
    code, out, _ = cli(capsys, *as_(running, "billing", "--format", "json", "get", name))
    assert code == 0 and json.loads(out)["total"] == "11750.00" and json.loads(out)["name"] == name
    code, out, _ = cli(
        capsys, *as_(running, "erp", "--format", "csv", "list", "--market", "US", "--from", "2026-03-01", "--to", "2026-03-31")
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["contract_id"], r["total"], r["currency"]) for r in rows] == [
        ("C-1", "11750.00", "USD"),
        ("C-2", "11750.00", "USD"),
    ]
    code, out, _ = cli(capsys, *as_(running, "erp", "list", "--contract", "C-2"))
    assert code == 0 and second in out and "C-1" not in out

    # breakdown: invoice lines as CSV, summing to the total
    code, out, _ = cli(capsys, *as_(running, "billing", "--format", "csv", "breakdown", name))
    lines = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and lines and {r["settlement"] for r in lines} == {name}
    assert sum(Decimal(r["amount"]) for r in lines) == Decimal("11750.00")
    code, out, _ = cli(capsys, *as_(running, "billing", "breakdown", name))
    assert code == 0 and "total_delta:" in out and "11750.00" in out

    # explain in Chinese and English
    code, zh, _ = cli(capsys, *as_(running, "compliance", "explain", name, "--language", "zh"))
    code_en, en, _ = cli(capsys, *as_(running, "compliance", "--format", "json", "explain", name))
    assert code == code_en == 0 and zh.strip() and any("\u4e00" <= ch <= "\u9fff" for ch in zh)
    assert json.loads(en)["language"] == "en" and json.loads(en)["sentences"]

    # audit, and again against the head kept from the first verification
    code, out, _ = cli(capsys, *as_(running, "compliance", "audit", "verify"))
    assert code == 0 and summary(out)["ok"] == "true"
    head = summary(out)["head"]
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", "audit", "verify", "--anchor", head))
    assert code == 0 and f"{json.loads(out)['head_sequence']}:{json.loads(out)['head_hash']}" == head
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", "audit", "verify", "--anchor", head[:-1] + "x"))
    assert code == 2
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", "audit", "verify", "--anchor", "1:" + "0" * 64))
    assert code == 1 and json.loads(out)["failure"] == "ANCHOR_MISMATCH"
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", "audit", "replay", name, second))
    assert code == 0 and [r["match"] for r in json.loads(out)] == [True, True]


def test_ruleset_review_from_the_command_line(running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    v1_file, v2_file = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1_file.write_text(US, encoding="utf-8")
    assert US.count('{rate: "8%"}') == 1
    v2_file.write_text(US.replace('{rate: "8%"}', '{rate: "9%"}'), encoding="utf-8")

    code, out, _ = cli(capsys, *as_(running, "admin", "--format", "json", "rulesets", "create", str(v1_file)))
    v1 = json.loads(out)
    assert code == 0 and v1["state"] == "DRAFT" and v1["name"] == "rulesets/us-managed-standard/versions/1"
    code, out, _ = cli(capsys, *as_(running, "compliance", "rulesets", "approve", "us-managed-standard/versions/1", "--note", "ok"))
    assert code == 0 and "APPROVED" in out
    for contract in ("C-1", "C-2", "C-3"):
        assert cli(capsys, *as_(running, "erp", *flag_args(contract)))[0] == 0

    # the candidate's examples fail offline (exit 1), but it can be stored as a draft and assessed
    code, out, _ = cli(capsys, "rulesets", "validate", str(v2_file))
    assert code == 1 and "example.failed" in out and "FAILED" in out
    code, out, _ = cli(capsys, *as_(running, "admin", "rulesets", "create", str(v2_file)))
    assert code == 0 and "rulesets/us-managed-standard/versions/2" in out
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "csv", "rulesets", "list", "us-managed-standard"))
    assert code == 0 and [(r["name"][-1], r["state"]) for r in csv.DictReader(io.StringIO(out))] == [("1", "APPROVED"), ("2", "DRAFT")]
    code, out, _ = cli(capsys, *as_(running, "compliance", "rulesets", "show", "us-managed-standard/versions/1", "--source"))
    assert code == 0 and "CREATED" in out and "ruleset: us-managed-standard" in out
    code, out, _ = cli(
        capsys, *as_(running, "compliance", "--format", "json", "rulesets", "diff", v1["name"], "us-managed-standard/versions/2")
    )
    assert code == 0 and [(c["change"], c["path"], c["before"], c["after"]) for c in json.loads(out)] == [
        ("CHANGED", "fees[1].tiers[2].rate", "8%", "9%")
    ]
    impact = ["rulesets", "impact", "us-managed-standard/versions/2", "--from", "2026-03-01", "--to", "2026-03-31"]
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", *impact))
    report = json.loads(out)
    assert code == 0 and [(i["contract_id"], i["old_total"], i["new_total"], i["delta"]) for i in report["impacts"]] == [
        (contract, "11750.00", "12000.00", "250.00") for contract in ("C-1", "C-2", "C-3")
    ]
    assert report["totals"] == [{"currency": "USD", "old_total": "35250.00", "new_total": "36000.00", "delta": "750.00"}]
    assert (report["settlements_analyzed"], report["settlements_failed"]) == (3, 0)
    # one impact a call: the same full report, every page fetched and the totals summed
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", *impact, "--page-size", "1"))
    assert code == 0 and json.loads(out) == report
    code, out, _ = cli(capsys, *as_(running, "compliance", *impact, "--page-size", "2"))
    assert code == 0 and out.count("11750.00") == 3 and "35250.00" in out and "3 analyzed, 0 failed" in out
    code, _, err = cli(capsys, *as_(running, "compliance", *impact, "--page-size", "-1"))
    assert code == 2 and "--page-size" in err
    # approving a candidate whose examples fail is refused: the service says why (exit 1)
    code, _, err = cli(capsys, *as_(running, "compliance", "rulesets", "approve", "us-managed-standard/versions/2"))
    assert code == 1 and "FAILED_PRECONDITION" in err
    code, out, _ = cli(capsys, *as_(running, "compliance", "rulesets", "retire", "us-managed-standard/versions/1"))
    assert code == 0 and "RETIRED" in out


def test_exit_codes_and_errors(running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    running.client.load_shipped_rulesets()
    # connection refused: 2, with the target named
    code, out, err = cli(capsys, "--target", f"127.0.0.1:{closed_port()}", "--token", "t", "--retries", "0", "--timeout", "5", "get", "x")
    assert (code, out) == (2, "") and "UNAVAILABLE" in err and "is the service running" in err
    # a token the service does not know: UNAUTHENTICATED, 2; no token at all: 2 before any call
    code, _, err = cli(capsys, "--target", f"127.0.0.1:{running.service.port}", "--token", "nope", "list")
    assert code == 2 and "UNAUTHENTICATED" in err
    code, _, err = cli(capsys, "--target", f"127.0.0.1:{running.service.port}", "list")
    assert code == 2 and "KPISETTLE_TOKEN" in err
    # the wrong role: PERMISSION_DENIED, 2
    code, _, err = cli(capsys, *as_(running, "billing", *flag_args("C-9")))
    assert code == 2 and "PERMISSION_DENIED" in err
    # invalid input: the service lists every field violation, exit 1
    bad = [*flag_args("C-3"), "--metric", "orders=many", "--metric", "refunds=1e999999"]
    code, out, err = cli(capsys, *as_(running, "erp", *bad))
    assert (code, out) == (1, "") and "INVALID_ARGUMENT" in err and "input.metrics.orders" in err and "input.metrics.refunds" in err
    code, _, err = cli(capsys, *as_(running, "erp", "get", "settlements/does-not-exist"))
    assert code == 1 and "NOT_FOUND" in err
    # usage errors: 2
    assert cli(capsys, "settle", "--bogus")[0] == 2
    assert cli(capsys, "--format", "xml", "list")[0] == 2
    code, _, err = cli(capsys, *as_(running, "erp", "settle", "--contract", "C-1"))
    assert code == 2 and "--seller" in err and "--period" in err
    code, _, err = cli(capsys, *as_(running, "erp", "settle", "--file", str(tmp_path / "missing.json")))
    assert code == 2 and "cannot read" in err
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('{"contract_id": ', encoding="utf-8")
    code, _, err = cli(capsys, *as_(running, "erp", "settle", "--file", str(broken_json)))
    assert code == 2 and "not JSON" in err
    code, _, err = cli(capsys, *as_(running, "erp", *flag_args("C-4"), "--period", "March"))
    assert code == 2 and "YYYY-MM-DD" in err


def test_validate_runs_offline_as_a_module(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(US.replace("\ncurrency: USD\n", "\ncurrency: USDX\n"), encoding="utf-8")
    line = US.splitlines().index("currency: USD") + 1
    command = [sys.executable, "-m", "clients.cli", "rulesets", "validate"]
    result = subprocess.run([*command, str(broken)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    out = result.stdout.splitlines()
    first = out.index(next(o for o in out if o.startswith(f"{broken}:{line}:11: ")))
    assert out[first] == f"{broken}:{line}:11: currency.unknown: 'USDX' is not an ISO 4217 currency code"
    assert out[first + 1] == "    currency: USDX"
    assert out[first + 2] == "    " + " " * 10 + "^"
    good = subprocess.run([*command, "rulesets/us-managed-standard.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "ok" in good.stdout and good.stderr == ""


# ------------------------------------------------------------------ settle --batch

BATCH_HEADER = ["contract_id", "seller_id", "market", "period_start", "ruleset", "param:gmv_target", *(f"metric:{m}" for m in US_METRICS)]


def batch_row(contract: str) -> list[str]:
    return [contract, "S-1", "US", "2026-03-01", "us-managed-standard", "100000", *US_METRICS.values()]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def records_checked(running: Running, capsys: pytest.CaptureFixture[str]) -> int:
    code, out, _ = cli(capsys, *as_(running, "compliance", "--format", "json", "audit", "verify"))
    assert code == 0 and json.loads(out)["ok"] is True
    return int(json.loads(out)["records_checked"])


def test_settle_batch_csv_and_rerun_settles_nothing_twice(running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    running.client.load_shipped_rulesets()
    rows = write_csv(tmp_path / "month.csv", BATCH_HEADER, [batch_row(f"C-{n:03}") for n in range(1, 51)])
    results = tmp_path / "results.jsonl"
    before = records_checked(running, capsys)

    batch = ["--format", "json", "settle", "--batch", str(rows), "--items-per-message", "7"]
    code, out, err = cli(capsys, *as_(running, "erp", *batch, "--results", str(results)))
    assert code == 0, err
    report = json.loads(out)
    assert (report["rows"], report["settled"], report["deduplicated"], report["failed"]) == (50, 50, 0, 0)
    assert report["totals"] == [{"currency": "USD", "settlements": 50, "total": "587500.00"}]
    assert "50 rows: 50 settled" in err
    answers = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    assert [a["row"] for a in answers] == list(range(1, 51))
    assert [a["contract_id"] for a in answers] == [f"C-{n:03}" for n in range(1, 51)]
    assert {(a["total"], a["currency"], a["deduplicated"], a["error_code"]) for a in answers} == {("11750.00", "USD", False, None)}
    assert all(a["name"].startswith("settlements/") and a["request_id"].startswith(a["contract_id"] + "/2026-03-01/") for a in answers)
    assert all(a["period_start"] == "2026-03-01" for a in answers)
    after = records_checked(running, capsys)
    assert after > before

    # the same file again, results as CSV and the summary as a table: everything deduplicated, nothing stored
    again = tmp_path / "again.csv"
    code, out, err = cli(capsys, *as_(running, "erp", "settle", "--batch", str(rows), "--results", str(again)))
    assert code == 0, err
    head = summary(out)
    assert (head["rows"], head["settled"], head["deduplicated"], head["failed"]) == ("50", "0", "50", "0")
    assert "587500.00" in out
    rerun = list(csv.DictReader(again.open(encoding="utf-8", newline="")))
    assert [r["name"] for r in rerun] == [a["name"] for a in answers]
    assert {(r["total"], r["deduplicated"], r["error_code"]) for r in rerun} == {("11750.00", "true", "")}
    assert records_checked(running, capsys) == after
    code, out, _ = cli(capsys, *as_(running, "erp", "--format", "json", "list", "--market", "US"))
    assert code == 0 and len(json.loads(out)) == 50


def test_settle_batch_failed_rows_jsonl_and_malformed_files(running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    running.client.load_shipped_rulesets()
    # one row with an unknown metric: that row fails with its reason (exit 1), the others settle
    header = [*BATCH_HEADER, "metric:bogus_metric", "request_id"]
    rows = [[*batch_row(f"B-{n}"), "7" if n == 3 else "", f"bad-row-test-{n}" if n == 5 else ""] for n in range(1, 6)]
    source = write_csv(tmp_path / "bad.csv", header, rows)
    results = tmp_path / "bad-results.csv"
    code, out, err = cli(capsys, *as_(running, "erp", "--format", "json", "settle", "--batch", str(source), "--results", str(results)))
    report = json.loads(out)
    assert code == 1, err
    assert (report["settled"], report["failed"]) == (4, 1) and report["totals"][0]["total"] == "47000.00"
    assert report["failures"][0]["row"] == 3 and "INVALID_ARGUMENT" in report["failures"][0]["error"]
    answers = list(csv.DictReader(results.open(encoding="utf-8", newline="")))
    assert [(a["row"], a["error_code"]) for a in answers] == [("1", ""), ("2", ""), ("3", "INVALID_ARGUMENT"), ("4", ""), ("5", "")]
    assert "bogus_metric" in answers[2]["error_message"] and answers[2]["total"] == "" and answers[2]["contract_id"] == "B-3"
    assert answers[4]["request_id"] == "bad-row-test-5"

    # JSONL: the --file shape, one object a line; the first line is a row of the CSV above (deduplicated)
    documents = [
        {
            "contract_id": f"B-{n}",
            "seller_id": "S-1",
            "market": "US",
            "period_start": "2026-03-01",
            "ruleset": "us-managed-standard",
            "metrics": US_METRICS,
            "params": {"gmv_target": "100000"},
        }
        for n in (1, 6)
    ]
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n".join(json.dumps(d) for d in documents) + "\n\n", encoding="utf-8")
    code, out, err = cli(
        capsys, *as_(running, "erp", "--format", "csv", "settle", "--batch", str(lines), "--results", str(tmp_path / "r.jsonl"))
    )
    assert code == 0, err
    assert {r["item"]: r["value"] for r in csv.DictReader(io.StringIO(out))} == {
        "rows": "2",
        "settled": "1",
        "deduplicated": "1",
        "failed": "0",
        "total USD": "23500.00",
    }

    # malformed: a row with a missing cell stops the run with exit 2 and the row number
    broken = batch_row("M-3")
    del broken[2]
    malformed = write_csv(tmp_path / "malformed.csv", BATCH_HEADER, [batch_row("M-1"), batch_row("M-2"), broken, batch_row("M-4")])
    code, out, err = cli(capsys, *as_(running, "erp", "--format", "json", "settle", "--batch", str(malformed)))
    assert code == 2 and "row 3 (line 4)" in err and "cells" in err
    assert json.loads(out)["rows"] == 2
    # a header without a required column, a bad date in JSONL, a wrong extension: 2
    no_market = write_csv(tmp_path / "no-market.csv", [c for c in BATCH_HEADER if c != "market"], [])
    code, _, err = cli(capsys, *as_(running, "erp", "settle", "--batch", str(no_market)))
    assert code == 2 and "missing columns market" in err
    bad_date = tmp_path / "bad-date.jsonl"
    bad_date.write_text(json.dumps({**documents[0], "period_start": "March"}) + "\n", encoding="utf-8")
    code, _, err = cli(capsys, *as_(running, "erp", "settle", "--batch", str(bad_date)))
    assert code == 2 and "row 1 (line 1)" in err and "YYYY-MM-DD" in err
    assert cli(capsys, *as_(running, "erp", "settle", "--batch", str(tmp_path / "rows.txt")))[0] == 2
    assert cli(capsys, *as_(running, "erp", "settle", "--batch", str(lines), "--contract", "C-1"))[0] == 2
    # connection refused: 2
    code, _, err = cli(capsys, "--target", f"127.0.0.1:{closed_port()}", "--token", "t", "--retries", "0", "settle", "--batch", str(lines))
    assert code == 2 and "UNAVAILABLE" in err


# ------------------------------------------------------------------ billing exports


class FakeTerminal(io.StringIO):
    """A captured stream that says it is a terminal, as a person's shell would."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def colour_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A colour terminal whatever the environment the tests run in (CI sets no TERM, some set NO_COLOR)."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLORTERM"):
        monkeypatch.delenv(name, raising=False)


ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def settle_json(running: Running, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    code, out, err = cli(capsys, *as_(running, "erp", "--format", "json", *args))
    assert code == 0, err
    return dict(json.loads(out))


@pytest.mark.usefixtures("colour_terminal")
def test_export_lines_and_deltas_for_billing(running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    running.client.load_shipped_rulesets()
    march = [batch_row(f"E-{n}") for n in range(1, 6)]
    april = [*batch_row("E-1")[:3], "2026-04-01", *batch_row("E-1")[4:]]
    source = write_csv(tmp_path / "march.csv", BATCH_HEADER, [*march, april])
    assert cli(capsys, *as_(running, "erp", "settle", "--batch", str(source)))[0] == 0
    # E-2 corrected twice: refunds 5000 -> 9000 -> 20000; the table of a correction shows what changed
    code, out, _ = cli(capsys, *as_(running, "erp", *flag_args("E-2"), "--metric", "refunds=9000", "--expected-revision", "1"))
    assert code == 0 and summary(out)["revision"] == "2" and summary(out)["total"] == "11390.00"
    changed = out.split("\n\n")[2].splitlines()
    assert changed[0].split() == ["line", "previous_amount", "amount", "delta"]
    assert [line.split() for line in changed[2:]] == [
        ["commission", "7500.00", "7180.00", "-320.00"],
        ["gmv_bonus", "1250.00", "1210.00", "-40.00"],
    ]
    third = settle_json(running, capsys, *flag_args("E-2"), "--metric", "refunds=20000", "--expected-revision", "2")
    assert (third["revision"], third["total"]) == (3, "9800.00")

    period = ["--from", "2026-03-01", "--to", "2026-03-31"]
    # lines, CSV: every line of the five current March settlements (E-2 at revision 3), April left out
    code, out, err = cli(capsys, *as_(running, "billing", "export", "lines", *period, "--format", "csv", "--page-size", "2"))
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == ",".join(LINE_COLUMNS)
    lines = list(csv.DictReader(io.StringIO(out)))
    assert len(lines) == 35 and {r["contract_id"] for r in lines} == {f"E-{n}" for n in range(1, 6)}
    assert {r["period_start"] for r in lines} == {"2026-03-01"} and {r["currency"] for r in lines} == {"USD"}
    assert {r["revision"] for r in lines if r["contract_id"] == "E-2"} == {"3"}
    per_settlement: dict[str, Decimal] = {}
    for r in lines:
        per_settlement[r["contract_id"]] = per_settlement.get(r["contract_id"], Decimal(0)) + Decimal(r["amount"])
    assert per_settlement == {
        "E-1": Decimal("11750.00"),
        "E-2": Decimal("9800.00"),
        "E-3": Decimal("11750.00"),
        "E-4": Decimal("11750.00"),
        "E-5": Decimal("11750.00"),
    }
    assert [(r["line"], r["amount"], r["basis"]) for r in lines[:3]] == [
        ("base_fee", "3000.00", ""),
        ("commission", "7500.00", "125000"),
        ("gmv_bonus", "1250.00", "125000"),
    ]
    # pages of 2 and one page of 200 give the same export
    code, whole, _ = cli(capsys, *as_(running, "billing", "--format", "csv", "export", "lines", *period))
    assert code == 0 and whole == out
    code, out, _ = cli(capsys, *as_(running, "billing", "--format", "csv", "export", "lines", *period, "--skip-zero", "--contract", "E-1"))
    assert code == 0 and [(r["line"], r["amount"]) for r in csv.DictReader(io.StringIO(out))] == [
        ("base_fee", "3000.00"),
        ("commission", "7500.00"),
        ("gmv_bonus", "1250.00"),
    ]
    code, out, _ = cli(capsys, *as_(running, "billing", "--format", "csv", "export", "lines", *period, "--market", "JP"))
    assert code == 0 and out == ",".join(LINE_COLUMNS) + "\n"

    # deltas, JSON: revisions 2 and 3 of E-2, each against the one before; zero deltas left out
    code, out, _ = cli(capsys, *as_(running, "billing", "--format", "json", "export", "deltas", *period, "--skip-zero", "--page-size", "1"))
    report = json.loads(out)
    assert code == 0 and (report["export"], report["from"], report["to"], report["settlements"]) == (
        "deltas",
        "2026-03-01",
        "2026-03-31",
        2,
    )
    assert [(r["revision"], r["line"], r["previous_amount"], r["amount"], r["delta"]) for r in report["rows"]] == [
        (2, "commission", "7500.00", "7180.00", "-320.00"),
        (2, "gmv_bonus", "1250.00", "1210.00", "-40.00"),
        (3, "commission", "7180.00", "6300.00", "-880.00"),
        (3, "gmv_bonus", "1210.00", "500.00", "-710.00"),
    ]
    assert report["rows"][2]["supersedes"] == report["rows"][0]["settlement"] and report["rows"][2]["settlement"] == third["name"]
    assert report["totals"] == [{"currency": "USD", "settlements": 2, "rows": 4, "delta": "-1950.00"}]
    code, out, _ = cli(capsys, *as_(running, "billing", "--format", "csv", "export", "deltas", *period))
    deltas = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(deltas) == 14 and sum(Decimal(r["delta"]) for r in deltas) == Decimal("-1950.00")
    assert all(r["create_time"].endswith("+00:00") for r in deltas)

    # table: the main columns and the totals per currency; plain text when not a terminal
    code, out, _ = cli(capsys, *as_(running, "billing", "export", "deltas", *period, "--skip-zero"))
    assert code == 0 and "\x1b" not in out and all(line == line.rstrip() for line in out.splitlines())
    assert out.splitlines()[-1] == "2 corrections, 4 rows, periods starting 2026-03-01 to 2026-03-31"
    assert ["USD", "2", "4", "-1950.00"] in [line.split() for line in out.splitlines()]
    # on a terminal: colours (negative amounts red), the same figures once the escapes are gone
    terminal = FakeTerminal()
    code = run([*as_(running, "billing", "export", "deltas", *period, "--skip-zero")], terminal, io.StringIO())
    assert code == 0 and "\x1b[" in terminal.getvalue() and "\x1b[31m" in terminal.getvalue()
    assert [line.rstrip() for line in ESCAPES.sub("", terminal.getvalue()).splitlines()] == out.splitlines()

    # --output: the file is whole, the control totals go to stdout
    target = tmp_path / "exports" / "lines.csv"
    target.parent.mkdir()
    code, out, _ = cli(capsys, *as_(running, "billing", "export", "lines", *period, "--format", "csv", "--output", str(target)))
    assert code == 0 and target.read_text(encoding="utf-8") == whole
    assert ["USD", "5", "35", "56800.00"] in [line.split() for line in out.splitlines()]
    assert out.splitlines()[-1] == f"wrote 35 rows (csv) to {target}"
    # a lost connection writes no file at all
    failed = tmp_path / "exports" / "failed.csv"
    closed = ["--target", f"127.0.0.1:{closed_port()}", "--token", "t", "--retries", "0"]
    code, _, err = cli(capsys, *closed, "export", "lines", *period, "--output", str(failed))
    assert code == 2 and "UNAVAILABLE" in err and sorted(p.name for p in target.parent.iterdir()) == ["lines.csv"]

    # usage: 2
    code, _, err = cli(capsys, *as_(running, "billing", "export", "lines", "--from", "2026-03-31", "--to", "2026-03-01"))
    assert code == 2 and "after --to" in err
    code, _, err = cli(capsys, *as_(running, "billing", "export", "deltas", "--from", "March", "--to", "2026-03-31"))
    assert code == 2 and "YYYY-MM-DD" in err
    assert cli(capsys, *as_(running, "billing", "export", "lines", *period, "--page-size", "201"))[0] == 2
    assert cli(capsys, *as_(running, "billing", "export", "lines", "--to", "2026-03-31"))[0] == 2
    assert cli(capsys, *as_(running, "billing", "export", "invoices", *period))[0] == 2
    code, _, err = cli(capsys, *as_(running, "billing", "export", "lines", *period, "--output", str(tmp_path / "missing" / "x.csv")))
    assert code == 2 and "cannot write" in err


@pytest.mark.usefixtures("colour_terminal")
def test_batch_on_a_terminal_shows_a_progress_bar_and_failures_with_their_reasons(
    running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    running.client.load_shipped_rulesets()
    header = [*BATCH_HEADER, "metric:bogus_metric"]
    source = write_csv(tmp_path / "rows.csv", header, [[*batch_row(f"T-{n}"), "1" if n == 2 else ""] for n in range(1, 4)])
    progress, out = FakeTerminal(), io.StringIO()
    code = run([*as_(running, "erp", "settle", "--batch", str(source))], out, progress)
    assert code == 1
    shown = ESCAPES.sub("", progress.getvalue())
    assert "3/3" in shown and "2 settled, 0 deduplicated, 1 failed" in shown
    text = out.getvalue()
    assert "\x1b" not in text and summary(text)["failed"] == "1"
    row = text.splitlines().index(next(line for line in text.splitlines() if line.startswith("row 2: ")))
    assert text.splitlines()[row].startswith("row 2: INVALID_ARGUMENT")
    assert text.splitlines()[row + 1].startswith("    input.metrics.bogus_metric: ")
