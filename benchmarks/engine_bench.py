"""Engine: settlements per second in one thread, full decision with trace and canonical JSON.

For each ruleset in rulesets/ (cycling through its examples) and for generated rulesets
of 5, 20, 50 and 200 conditions (how the cost grows with the number of rules).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from benchmarks.common import ROOT, Row, Settings, best_rate, cycle
from engine import CompiledRuleset, SettlementRequest, compile_ruleset, request_from_mapping

GENERATED_SIZES = (5, 20, 50, 200)
MAX_SECTION_ENTRIES = 200  # the format's limit on the entries of one section (fees, warnings…)
US_TARGET = 10_000


def generated_ruleset(conditions: int) -> str:
    """A ruleset with `conditions` conditions over five metrics, thresholds spread out.

    Conditions are penalties; since a section holds at most 200 entries and the base fee
    is one of the fees, conditions beyond 199 are warnings (also decided by the matcher
    and reported with evidence in every decision, like a penalty's condition).
    """
    penalties = min(conditions, MAX_SECTION_ENTRIES - 1)
    lines = [
        "ruleset: generated",
        "effective_from: 2026-01-01",
        "currency: USD",
        "metrics:",
        *[f"  m{i}: {{type: number}}" for i in range(5)],
        "fees:",
        "  - {id: base_fee, kind: fixed, amount: '1000'}",
    ]
    for i in range(penalties):
        lines.append(f"  - {{id: p{i}, kind: penalty, when: '{_condition(i)}', amount: '{i + 1}'}}")
    if conditions > penalties:
        lines.append("warnings:")
        for i in range(penalties, conditions):
            lines.append(f"  - {{id: w{i}, when: '{_condition(i)}', message: 'condition {i}'}}")
    lines += ["markets: {US: {multiplier: '1'}}"]
    return "\n".join(lines) + "\n"


def _condition(i: int) -> str:
    return f"m{i % 5} {('<', '<=', '>', '>=')[i % 4]} {i}.5"


def generated_request(conditions: int) -> SettlementRequest:
    return SettlementRequest("US", datetime.date(2026, 3, 1), {f"m{i}": f"{conditions // 2}.25" for i in range(5)})


def rate(compiled: CompiledRuleset, requests: list[SettlementRequest], settings: Settings) -> float:
    """Settlements per second: decision and canonical JSON, the best of the short runs."""
    return best_rate(cycle(requests, lambda r: compiled.settle(r).to_canonical_json()), settings.seconds, settings.runs)


def ruleset_requests(compiled: CompiledRuleset) -> list[SettlementRequest]:
    return [request_from_mapping(e.request, compiled.ruleset.effective_from) for e in compiled.ruleset.examples]


def run(settings: Settings) -> list[Row]:
    rows: list[Row] = []
    paths: list[Path] = sorted((ROOT / "rulesets").glob("*.yaml"))
    for path in paths:
        compiled = compile_ruleset(path.read_text(encoding="utf-8"))
        try:
            value = rate(compiled, ruleset_requests(compiled), settings)
        finally:
            compiled.close()
        us = path.name == "us-managed-standard.yaml"
        rows.append(
            Row(
                "engine",
                f"{path.name} ({len(compiled.rules)} rules, its {len(compiled.ruleset.examples)} examples)",
                value,
                "settlements/s",
                target=f"≥ {US_TARGET:,}" if us else "",
                met=value >= US_TARGET if us else None,
            )
        )
    for size in GENERATED_SIZES:
        compiled = compile_ruleset(generated_ruleset(size))
        try:
            value = rate(compiled, [generated_request(size)], settings)
            partitions = len(compiled.condition_matcher.partitions)
        finally:
            compiled.close()
        rows.append(
            Row(
                "engine",
                f"generated, {size} conditions",
                value,
                "settlements/s",
                note=f"{partitions} matcher partition{'s' if partitions > 1 else ''}",
            )
        )
    return rows
