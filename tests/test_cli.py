"""The `kpisettle` command line (clients/cli) against a real server, on SQLite and PostgreSQL.

`main(argv)` runs in-process with stdout and stderr captured; one test runs
`python -m clients.cli rulesets validate` as a child process (offline, no server).
"""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from clients.cli.main import main
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

    # audit
    code, out, _ = cli(capsys, *as_(running, "compliance", "audit", "verify"))
    assert code == 0 and summary(out)["ok"] == "true"
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
    assert cli(capsys, *as_(running, "erp", *flag_args("C-1")))[0] == 0

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
        ("C-1", "11750.00", "12000.00", "250.00")
    ]
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
