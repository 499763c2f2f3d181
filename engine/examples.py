"""Running a ruleset's `examples:` and reporting every mismatch, line by line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.compiler import CompiledRuleset
from engine.decision import Decision
from engine.money import DecimalTextError, parse_decimal, plain
from engine.problems import Problem, ProblemsError, Severity
from engine.request import request_from_mapping


@dataclass(frozen=True)
class Mismatch:
    field: str  # total | lines.<id> | waived | exemptions | warnings | error
    expected: str
    actual: str


@dataclass(frozen=True)
class ExampleOutcome:
    name: str
    path: str
    mismatches: tuple[Mismatch, ...]
    decision: Decision | None

    @property
    def passed(self) -> bool:
        return not self.mismatches


def run_examples(compiled: CompiledRuleset) -> list[ExampleOutcome]:
    outcomes = []
    for example in compiled.ruleset.examples:
        try:
            request = request_from_mapping(example.request, compiled.ruleset.effective_from)
            decision = compiled.settle(request)
        except ProblemsError as exc:
            detail = "; ".join(f"{p.code} at {p.path}: {p.message}" for p in exc.problems)
            outcomes.append(ExampleOutcome(example.name, example.path, (Mismatch("error", "a decision", detail),), None))
            continue
        outcomes.append(ExampleOutcome(example.name, example.path, tuple(_compare(example.expect, decision)), decision))
    return outcomes


def example_problems(outcomes: Sequence[ExampleOutcome]) -> list[Problem]:
    """Failing examples as validation problems (code `example.failed`), one per mismatch."""
    return [
        Problem(
            "example.failed",
            f"{o.path}.expect.{m.field}" if m.field != "error" else o.path,
            f"example {o.name!r}: {m.field} expected {m.expected}, got {m.actual}",
            Severity.ERROR,
        )
        for o in outcomes
        for m in o.mismatches
    ]


def _compare(expect: dict[str, Any], decision: Decision) -> list[Mismatch]:
    mismatches: list[Mismatch] = []
    _money("total", expect.get("total"), plain(decision.total), mismatches)
    actual_lines = {line.id: plain(line.amount) for line in decision.lines}
    lines = expect.get("lines") or {}
    if isinstance(lines, dict):
        for line_id, expected in lines.items():
            _money(f"lines.{line_id}", expected, actual_lines.get(line_id, "(no such line)"), mismatches)
    for key, actual in (
        ("waived", sorted(line.id for line in decision.lines if line.waived_by)),
        ("exemptions", sorted(e.name for e in decision.exemptions if e.applied)),
        ("warnings", sorted(w.id for w in decision.warnings)),
    ):
        if key in expect:
            wanted = expect[key] or []
            if not isinstance(wanted, list) or sorted(map(str, wanted)) != actual:
                mismatches.append(Mismatch(key, str(wanted), str(actual)))
    return mismatches


def _money(field: str, expected: Any, actual: str, mismatches: list[Mismatch]) -> None:
    try:
        same = parse_decimal(expected) == parse_decimal(actual)
    except DecimalTextError:
        same = False
    if not same:
        mismatches.append(Mismatch(field, str(expected), actual))
