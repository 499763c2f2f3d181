"""`make bench` in quick mode, and the cross-check of the peer engines against kpisettle.

The peer section compares kpisettle with a GoRules zen decision graph and a durable.lang
baseline written for rulesets/us-managed-standard.yaml. These tests hold both to exactly
kpisettle's totals, lines and warnings on every example of the ruleset and on a few
hundred generated inputs, so that the benchmark compares engines that make the same
decision. Nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from benchmarks.inputs import compile_us, to_zen_context, us_examples, us_inputs
from benchmarks.peer.zen_peer import ZenPeer
from benchmarks.peer_bench import durable_outcomes, kpisettle_outcomes, mismatches, zen_outcomes

ROOT = Path(__file__).resolve().parent.parent
GENERATED = 300


@pytest.fixture(scope="module", name="inputs")
def inputs_fixture() -> list[dict[str, object]]:
    return us_examples() + us_inputs(GENERATED)


def test_generated_inputs_reach_every_branch(inputs: list[dict[str, object]]) -> None:
    """The cross-check means something only if the inputs exercise every rule and adjustment."""
    compiled = compile_us()
    lines: set[str] = set()
    rules: set[str] = set()
    exemptions: set[str] = set()
    waived: set[str] = set()
    from benchmarks.inputs import to_request

    for item in inputs:
        decision = compiled.settle(to_request(item))
        lines |= {line.id for line in decision.lines if line.amount != 0}
        waived |= {line.id for line in decision.lines if line.waived_by}
        rules |= {rule.rule for rule in decision.rules if rule.fired}
        exemptions |= {e.name for e in decision.exemptions if e.applied}
    compiled.close()
    assert lines == {
        "base_fee",
        "commission",
        "gmv_bonus",
        "low_acos_bonus",
        "acos_penalty",
        "odr_penalty",
        "response_penalty",
        "market_multiplier",
        "penalty_cap",
        "total_floor",
    }
    assert rules == {name for name, _kind, _explain in compile_us().rules}
    assert exemptions == {"stockout", "platform_review"}
    assert waived == {"acos_penalty", "odr_penalty", "response_penalty"}


def test_zen_graph_gives_the_ruleset_examples_expected_totals() -> None:
    """Independently of kpisettle: the zen graph reproduces the totals written in the ruleset."""
    compiled = compile_us()
    peer = ZenPeer()
    for example, item in zip(compiled.ruleset.examples, us_examples(compiled), strict=True):
        result = peer.evaluate(to_zen_context(item))
        assert Decimal(result["total_text"]) == Decimal(str(example.expect["total"])), example.name
    compiled.close()


def test_zen_graph_agrees_with_kpisettle_to_the_cent(inputs: list[dict[str, object]]) -> None:
    expected = kpisettle_outcomes(inputs)
    found, float_totals_differing = zen_outcomes(inputs)
    assert mismatches(expected, found) == []
    assert float_totals_differing == 0
    assert len(found) == len(inputs) == 5 + GENERATED


def test_durable_lang_baseline_agrees_with_kpisettle_to_the_cent(inputs: list[dict[str, object]]) -> None:
    expected = kpisettle_outcomes(inputs)
    found, rate = durable_outcomes(inputs)
    assert rate == 0.0  # not measured here
    assert mismatches(expected, found) == []
    assert len(found) == len(inputs)


def test_a_wrong_total_is_caught(inputs: list[dict[str, object]]) -> None:
    """The comparison is not vacuous: one cent off on one line is a mismatch."""
    expected = kpisettle_outcomes(inputs[:3])
    changed = list(expected)
    total, lines, warnings = changed[1]
    changed[1] = type(changed[1])(total + Decimal("0.01"), lines, warnings)
    assert mismatches(expected, changed) == [1]


def test_make_bench_quick_writes_one_table_and_the_json(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    env = {
        **os.environ,
        "BENCH_QUICK": "1",
        "BENCH_ONLY": "engine,peer,memory",
        "BENCH_SECONDS": "0.05",
        "BENCH_PEER_INPUTS": "20",
        "BENCH_MEMORY_SETTLEMENTS": "2000",
        "BENCH_RESULTS": str(results),
    }
    done = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    document = json.loads(results.read_text(encoding="utf-8"))
    assert document["machine"]["cores"] == os.cpu_count()
    assert document["machine"]["cpu"]
    assert document["machine"]["python"].endswith(".".join(map(str, sys.version_info[:3])))
    rows = document["rows"]
    assert not [row for row in rows if row["case"] == "FAILED"]
    cases = [row["case"] for row in rows if row["section"] == "engine"]
    assert [c for c in cases if c.startswith("generated")] == [f"generated, {n} conditions" for n in (5, 20, 50, 200)]
    assert sorted(c.split(" ")[0] for c in cases if not c.startswith("generated")) == sorted(
        p.name for p in (ROOT / "rulesets").glob("*.yaml")
    )
    agreement = [row for row in rows if "to the cent" in row["case"]]
    assert [(row["value"], row["met"]) for row in agreement] == [(25, True), (25, True)]
    memory = [row for row in rows if row["section"] == "memory"]
    assert [row.get("extra", {}).get("settlements") for row in memory] == [None, 2000]
    assert all(row["value"] > 0 for row in rows if row["section"] in ("engine", "memory") or row["unit"].endswith("/s"))
    for text in ("kpisettle make bench", "engine", "peer", "memory", "zen-engine", "durable.lang"):
        assert text in done.stdout


@pytest.mark.long
def test_make_bench_quick_service_section_on_sqlite(tmp_path: Path) -> None:
    """The service section end to end (server child process, spawned load generators), briefly."""
    results = tmp_path / "results.json"
    env = {
        **os.environ,
        "BENCH_QUICK": "1",
        "BENCH_ONLY": "service",
        "BENCH_DATABASES": "sqlite",
        "BENCH_SERVICE_SECONDS": "0.5",
        "BENCH_RESULTS": str(results),
    }
    done = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads(results.read_text(encoding="utf-8"))["rows"]
    assert not [row for row in rows if row["case"] in ("FAILED", "skipped")], rows
    closed = [row for row in rows if "closed loop" in row["case"] and not row["case"].startswith("--workers")]
    assert [row["case"] for row in closed] == [
        "Settle, 1 caller (closed loop)",
        "Settle, 8 callers (closed loop)",
        "Settle, 32 callers (closed loop)",
    ]
    assert all(row["value"] > 0 and row["p50_ms"] <= row["p99_ms"] for row in closed)
    assert any(row["case"].startswith("SettleBatch") and row["extra"]["stored"] > 0 for row in rows)
