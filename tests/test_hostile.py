"""Hostile rulesets and requests: the process stays alive and every bad input is a clean error.

"Clean" means: `validate_ruleset` returns a report (it never raises for bad input),
`compile_ruleset` raises only `RulesetInvalid`, `settle` raises only `RequestInvalid`, and
nothing crashes, hangs or leaks an exception of another type (durable_rules' own error,
RecursionError, TypeError, ZeroDivision, AssertionError, UnicodeError, ...).

The limits of the durable_rules C core (shared/DURABLE_RULES.md) are each approached —
accepted, and deciding exactly — and crossed — refused with a validation error.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine import (
    CompiledRuleset,
    Decision,
    EngineError,
    Problem,
    RequestInvalid,
    RulesetInvalid,
    SettlementRequest,
    Severity,
    ValidationReport,
    compile_ruleset,
    request_from_mapping,
    validate_ruleset,
)
from engine.source import load_source

ROOT = Path(__file__).resolve().parent.parent
MARCH = datetime.date(2026, 3, 1)
CODE = re.compile(r"[a-z_]+\.[a-z_]+")


# ---------------------------------------------------------------- helpers


def ruleset_text(
    metrics: Mapping[str, str] | Sequence[str],
    penalties: Sequence[str] = (),
    warnings: Sequence[str] = (),
    exemptions: Sequence[str] = (),
    fees: str = "",
) -> str:
    """A small ruleset: metrics (name → type, or names of numbers), one penalty per condition
    (`p0`, `p1`, … each of amount 1), one warning per condition (`w0`, …)."""
    types = dict(metrics) if isinstance(metrics, Mapping) else dict.fromkeys(metrics, "number")
    lines = ["ruleset: hostile", "effective_from: 2026-01-01", "currency: USD", "metrics:"]
    lines += [f"  {name}: {{type: {kind}}}" for name, kind in types.items()]
    if exemptions:
        lines += ["exemptions:"] + [f"  e{i}: {{when: {json.dumps(w)}}}" for i, w in enumerate(exemptions)]
    lines += ["fees:", '  - {id: base, kind: fixed, amount: "100"}']
    lines += [f'  - {{id: p{i}, kind: penalty, when: {json.dumps(w)}, amount: "1"}}' for i, w in enumerate(penalties)]
    if fees:
        lines.append(fees.rstrip("\n"))
    lines += ["markets:", '  US: {multiplier: "1"}', '  JP: {multiplier: "1"}']
    if warnings:
        lines += ["warnings:"] + [f"  - {{id: w{i}, when: {json.dumps(w)}, message: m}}" for i, w in enumerate(warnings)]
    return "\n".join(lines) + "\n"


def at(text: str, needle: str) -> tuple[int, int]:
    assert text.count(needle) == 1, f"{needle!r} occurs {text.count(needle)} times"
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def clean_report(source: str | bytes) -> ValidationReport:
    """validate_ruleset, which must return (never raise) a report of well-formed problems."""
    report = validate_ruleset(source)
    assert isinstance(report, ValidationReport)
    for problem in report.problems:
        assert isinstance(problem, Problem)
        assert CODE.fullmatch(problem.code), problem
        assert problem.severity in (Severity.ERROR, Severity.WARNING)
        assert problem.line >= 0 and problem.column >= 0
        assert problem.message
    return report


def error_codes(report: ValidationReport) -> list[tuple[str, str]]:
    return [(p.code, p.path) for p in report.errors]


def refused(source: str | bytes, code: str, path: str | None = None) -> Problem:
    """The source is refused with `code` (at `path`), by validate_ruleset and compile_ruleset alike."""
    report = clean_report(source)
    assert not report.valid
    matching = [p for p in report.errors if p.code == code and (path is None or p.path == path)]
    assert matching, [str(p) for p in report.problems]
    with pytest.raises(RulesetInvalid) as raised:
        compile_ruleset(source).close()
    assert any(p.code == code for p in raised.value.problems)
    return matching[0]


def request(metrics: Mapping[str, Any], market: str = "US", **extra: Any) -> SettlementRequest:
    return request_from_mapping({"market": market, "metrics": dict(metrics), **extra}, MARCH)


@pytest.fixture
def build() -> Iterator[Callable[[str], CompiledRuleset]]:
    compiled: list[CompiledRuleset] = []

    def make(text: str) -> CompiledRuleset:
        result = compile_ruleset(text)
        compiled.append(result)
        return result

    yield make
    for item in compiled:
        item.close()


def fired(decision: Decision) -> set[str]:
    return {r.rule for r in decision.rules if r.fired}


def penalised(decision: Decision) -> set[str]:
    return {line.id for line in decision.lines if line.kind == "penalty" and line.amount != 0}


# ---------------------------------------------------------------- durable_rules: tests per rule

METRICS_40 = [f"m{i}" for i in range(40)]


def all_of(count: int, start: int = 0) -> str:
    return " and ".join(f"m{i} > 0" for i in range(start, start + count))


def test_a_rule_of_exactly_32_tests_is_accepted_and_decides_exactly(build: Callable[[str], CompiledRuleset]) -> None:
    compiled = build(ruleset_text(METRICS_40, penalties=[all_of(32)]))
    ones = dict.fromkeys(METRICS_40, "1")
    assert penalised(compiled.settle(request(ones))) == {"p0"}
    for i in (0, 17, 31):
        assert penalised(compiled.settle(request({**ones, f"m{i}": "0"}))) == set(), i
        assert penalised(compiled.settle(request({**ones, f"m{i}": "0.0000000001"}))) == {"p0"}, i
    assert penalised(compiled.settle(request({**ones, "m32": "0"}))) == {"p0"}  # not in the rule


@pytest.mark.parametrize(
    "when",
    [
        all_of(33),
        " or ".join(f"m{i} > 0" for i in range(33)),
        " and ".join(f"(m{2 * i} > 0 or m{2 * i + 1} > 0)" for i in range(4)),  # 16 alternatives × 4 tests
        " and ".join(f"m{i} == 0.5" for i in range(17)),  # a fractional == is two tests (floor and ceiling)
        " or ".join(f"m{i} != 0.5" for i in range(17)),
        " and ".join(f"m{i % 40} > {i}" for i in range(60)),
    ],
    ids=["and-33", "or-33", "dnf-64", "eq-34", "neq-34", "and-60"],
)
def test_a_rule_of_more_than_32_tests_is_refused(when: str) -> None:
    text = ruleset_text(METRICS_40, penalties=[when])
    problem = refused(text, "rule.too_complex", "fees[1].when")
    assert (problem.line, problem.column) == at(text, json.dumps(when))
    assert "at most 32" in problem.message


def test_alternatives_expanding_to_exactly_32_tests_decide_like_python(build: Callable[[str], CompiledRuleset]) -> None:
    # (a or b) and (c or d) and (e or f) and g: 8 alternatives of 4 tests
    when = "(m0 > 0 or m1 > 0) and (m2 > 0 or m3 > 0) and (m4 > 0 or m5 > 0) and m6 > 0"
    compiled = build(ruleset_text(METRICS_40, penalties=[when]))
    base = dict.fromkeys(METRICS_40, "0")
    for bits in range(128):
        values = [(bits >> i) & 1 for i in range(7)]
        expected = (values[0] or values[1]) and (values[2] or values[3]) and (values[4] or values[5]) and values[6]
        decision = compiled.settle(request({**base, **{f"m{i}": str(v) for i, v in enumerate(values)}}))
        assert (penalised(decision) == {"p0"}) == bool(expected), values
        # an $or fires once per true alternative: the line is still one penalty of 1
        assert decision.line("p0").amount == (Decimal(-1) if expected else Decimal(0))


Values = dict[str, Decimal]
HALF, ZERO, ONE = Decimal("0.5"), Decimal(0), Decimal(1)

NESTED_SHAPES: dict[str, tuple[Callable[[int], str], Callable[[int, Values], bool]]] = {
    # each fractional `m == 0.5` is `floor == 5 and ceiling == 5`: an $and inside the rule
    "equalities": (
        lambda k: " and ".join(f"m{i} == 0.5" for i in range(k)),
        lambda k, v: all(v[f"m{i}"] == HALF for i in range(k)),
    ),
    "or of equalities": (
        lambda k: " or ".join(f"m{i} == 0.5" for i in range(k)),
        lambda k, v: any(v[f"m{i}"] == HALF for i in range(k)),
    ),
    "or of pairs": (
        lambda k: " or ".join(f"(m{i} > 0 and m{i + 20} > 0)" for i in range(k)),
        lambda k, v: any(v[f"m{i}"] > 0 and v[f"m{i + 20}"] > 0 for i in range(k)),
    ),
}


def nested_inputs() -> list[Values]:
    everything = dict.fromkeys(METRICS_40, HALF)
    return [
        everything,
        {**everything, "m5": Decimal("0.5000000001")},
        {**everything, "m11": Decimal("0.4999999999")},
        dict.fromkeys(METRICS_40, ZERO),
        {**dict.fromkeys(METRICS_40, ZERO), "m3": HALF, "m23": ONE},
        {**dict.fromkeys(METRICS_40, ZERO), "m11": ONE, "m31": ONE},
        {**dict.fromkeys(METRICS_40, ZERO), "m11": ONE, "m30": ONE},
    ]


@pytest.mark.parametrize("size", [12, 14, 15, 16])
@pytest.mark.parametrize("shape", sorted(NESTED_SHAPES))
def test_nested_conditions_near_the_limit_are_decided_or_refused_never_a_core_error(shape: str, size: int) -> None:
    """The validator's count of tests must match the C core's (error 113 past its limit):
    a condition it accepts must compile and decide exactly; one it cannot take is refused."""
    make, reference = NESTED_SHAPES[shape]
    text = ruleset_text(METRICS_40, penalties=[make(size)])
    report = clean_report(text)  # must not raise durable_rules_engine.error
    if not report.valid:
        assert error_codes(report) == [("rule.too_complex", "fees[1].when")]
        return
    compiled = compile_ruleset(text)
    try:
        for values in nested_inputs():
            decision = compiled.settle(request({k: str(v) for k, v in values.items()}))
            assert (penalised(decision) == {"p0"}) is reference(size, values), values
    finally:
        compiled.close()


# ---------------------------------------------------------------- durable_rules: many rules, many fields


def test_more_entries_than_a_section_allows_is_refused_cleanly() -> None:
    text = ruleset_text(["gmv"], penalties=[f"gmv > {i}" for i in range(300)])
    problem = refused(text, "limit.items", "fees")
    assert "301" in problem.message and "200" in problem.message


def test_400_rules_with_distinct_thresholds_are_partitioned_and_fire_exactly(build: Callable[[str], CompiledRuleset]) -> None:
    # 199 penalties + 200 warnings (+ the fixed fee): far beyond 64 conditions true at once
    # and 512 distinct conditions per node if they were given to one durable_rules ruleset
    penalties = [f"gmv > {i * 10}" for i in range(199)]
    warnings = [f"gmv > {2000 + i * 10}" for i in range(200)]
    compiled = build(ruleset_text(["gmv"], penalties=penalties, warnings=warnings))
    for gmv in ["-1", "0", "5", "1000", "1000.01", "2015", "2999.99", "3000", "3995", "3995.0000000001", "999999999999999999"]:
        value = Decimal(gmv)
        decision = compiled.settle(request({"gmv": gmv}))
        assert penalised(decision) == {f"p{i}" for i in range(199) if value > i * 10}, gmv
        assert {w.id for w in decision.warnings} == {f"w{i}" for i in range(200) if value > 2000 + i * 10}, gmv


def test_400_rules_sharing_one_identical_condition_fire_together(build: Callable[[str], CompiledRuleset]) -> None:
    # 256 rules sharing one condition segfault the C core: the matcher must split them
    compiled = build(ruleset_text(["gmv"], penalties=["gmv > 1000"] * 199, warnings=["gmv > 1000"] * 200))
    assert penalised(compiled.settle(request({"gmv": "1000"}))) == set()
    decision = compiled.settle(request({"gmv": "1000.000001"}))
    assert len(penalised(decision)) == 199
    assert len(decision.warnings) == 200
    assert decision.total == Decimal(100 - 199)


def test_200_distinct_metrics_in_conditions(build: Callable[[str], CompiledRuleset]) -> None:
    names = [f"k{i}" for i in range(200)]
    compiled = build(ruleset_text(names, warnings=[f"k{i} > {i}" for i in range(200)]))
    values = {f"k{i}": str(i + 1 if i % 2 == 0 else i) for i in range(200)}
    decision = compiled.settle(request(values))
    assert {w.id for w in decision.warnings} == {f"w{i}" for i in range(0, 200, 2)}
    decision = compiled.settle(request(dict.fromkeys(names, "1000")))
    assert len(decision.warnings) == 200


def test_one_hundred_exemptions_applying_at_once(build: Callable[[str], CompiledRuleset]) -> None:
    exemptions = [f"days > {i}" for i in range(100)]
    fee = '  - {id: waivable, kind: penalty, when: "days >= 0", amount: "5", exempt_by: [' + ", ".join(f"e{i}" for i in range(100)) + "]}"
    compiled = build(ruleset_text({"days": "count"}, exemptions=exemptions, fees=fee))
    decision = compiled.settle(request({"days": "100"}))
    assert sum(e.applied for e in decision.exemptions) == 100
    assert decision.line("waivable").waived_by == tuple(f"e{i}" for i in range(100))
    decision = compiled.settle(request({"days": "0"}))
    assert not any(e.applied for e in decision.exemptions)
    assert decision.line("waivable").amount == Decimal(-5)


def test_a_stepped_bonus_with_200_steps(build: Callable[[str], CompiledRuleset]) -> None:
    steps = "\n".join(f'      - {{from: "{i}", amount: "{i}"}}' for i in range(200))
    fee = f"  - id: ladder\n    kind: bonus\n    steps_on: gmv\n    steps:\n{steps}"
    compiled = build(ruleset_text(["gmv"], fees=fee))
    for gmv, amount in [("-1", "0"), ("0", "0"), ("57.5", "57"), ("199", "199"), ("999999999999999999", "199")]:
        assert compiled.settle(request({"gmv": gmv})).line("ladder").amount == Decimal(amount), gmv


# ---------------------------------------------------------------- durable_rules: numbers


@pytest.mark.parametrize(
    ("literal", "ok"),
    [
        ("9007199254740991", True),
        ("9007199254740992", False),
        ("-9007199254740991", True),
        ("-9007199254740992", False),
        ("900719.9254740991", True),
        ("900719.9254740992", False),
        ("0.0000000001", True),
        ("12345678901234567.12345678", False),
        ("99999999999999999.9", False),
        ("999999999999999999", False),
    ],
)
def test_literals_that_need_more_than_53_bits_when_scaled_are_refused(literal: str, ok: bool) -> None:
    text = ruleset_text(["x"], penalties=[f"x > {literal}"])
    report = clean_report(text)
    if ok:
        assert report.valid, [str(p) for p in report.problems]
    else:
        problem = refused(text, "rule.literal_out_of_range", "fees[1].when")
        assert (problem.line, problem.column) == at(text, json.dumps(f"x > {literal}"))


def test_a_step_threshold_out_of_range_is_refused() -> None:
    fee = '  - id: ladder\n    kind: bonus\n    steps_on: x\n    steps:\n      - {from: "1", amount: "1"}\n      - {from: "12345678901234567.5", amount: "2"}'
    text = ruleset_text(["x"], fees=fee)
    problem = refused(text, "rule.literal_out_of_range", "fees[1].steps[1].from")
    assert (problem.line, problem.column) == at(text, '"12345678901234567.5"')


@pytest.mark.parametrize(
    ("when", "value", "expected"),
    [
        ("x > 100000", "999999999999999999", True),
        ("x < 100000", "999999999999999999", False),
        ("x < -100000", "-999999999999999999", True),
        ("x > -100000", "-999999999999999999", False),
        ("x > 9007199254740991", "9007199254740992", True),
        ("x > 9007199254740991", "9007199254740991", False),
        ("x >= 9007199254740991", "999999999999999999", True),
        ("x <= 9007199254740991", "999999999999999999", False),
        ("x == 9007199254740991", "999999999999999999", False),
        ("x != 9007199254740991", "999999999999999999", True),
        ("x < -9007199254740991", "-9007199254740992", True),
        ("x > 900719.9254740991", "900719.9254740992", True),
        ("x > 900719.9254740991", "900719.9254740991", False),
        ("x > 900719.9254740991", "999999999999999999.9999999999", True),
        ("x < 0.0000000001", "-999999999999999999.9999999999", True),
        ("x * x > 1", "999999999999999999", True),
        ("x * x * x * x < 0", "-999999999999999999", False),
        ("x > 0.5", "0.5000000000", False),
        ("x > 0.5", "0.5000000001", True),
        ("x == 0.5", "0.5000000001", False),
        ("x != 0.5", "0.4999999999", True),
        ("x >= 28%", "0.28", True),
        ("x > 28%", "0.28", False),
    ],
)
def test_extreme_values_are_decided_exactly(build: Callable[[str], CompiledRuleset], when: str, value: str, expected: bool) -> None:
    compiled = build(ruleset_text(["x"], penalties=[when]))
    assert (penalised(compiled.settle(request({"x": value}))) == {"p0"}) is expected


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("ratio > 0", True),
        ("ratio >= 0.0000000001", False),
        ("ratio > 0.0000000001", False),
        ("ratio < 0.0000000001", True),
        ("ratio == 0", False),
        ("ratio != 0", True),
        ("ratio <= 0", False),
        ("-ratio < 0", True),
        ("-ratio >= 0", False),
        ("ratio * 999999999999999999 > 0.0000000001", False),  # 1E-10 × …/… is just below 1E-10
        ("ratio * 999999999999999999 * 10 > 0.0000000001", True),
    ],
)
def test_extremely_small_ratios_are_decided_exactly(build: Callable[[str], CompiledRuleset], when: str, expected: bool) -> None:
    text = ruleset_text(["spend", "sales"], penalties=[when]).replace(
        "fees:", 'kpis:\n  ratio: {formula: "spend / sales", on_zero_division: "0"}\nfees:'
    )
    compiled = build(text)
    decision = compiled.settle(request({"spend": "0.0000000001", "sales": "999999999999999999"}))
    assert dict(decision.kpis)["ratio"] > 0
    assert (penalised(decision) == {"p0"}) is expected


def test_huge_amounts_stay_exact_in_the_lines(build: Callable[[str], CompiledRuleset]) -> None:
    fee = '  - {id: pct, kind: percentage, basis: x, rate: "8%"}\n  - {id: tiers, kind: tiered, basis: x, tiers: [{up_to: "1", rate: "1%"}, {rate: "0.0000000001"}]}'
    compiled = build(ruleset_text(["x"], fees=fee))
    decision = compiled.settle(request({"x": "999999999999999999.99"}))
    assert decision.line("pct").exact == Decimal("79999999999999999.9992")
    assert decision.line("pct").amount == Decimal("80000000000000000.00")  # half up to the cent
    assert decision.line("tiers").amount == Decimal("100000000.01")  # 0.01 + 999999999999999998.99 × 1E-10
    decision = compiled.settle(request({"x": "-999999999999999999"}))
    assert decision.line("pct").amount == Decimal("-79999999999999999.92")
    assert decision.line("tiers").amount == Decimal(0)  # a negative basis earns nothing


@pytest.mark.parametrize(
    "amount",
    ["x * x", "x * x * x", "x * 999999999999999999 * 999999999999999999", "x / 0.0000000001 * x", "-x * x"],
)
def test_line_amounts_beyond_the_precision_are_clean(build: Callable[[str], CompiledRuleset], amount: str) -> None:
    """18-digit inputs may multiply to more digits than 34-digit arithmetic keeps: the
    settlement is refused (RequestInvalid), or decided; decimal.InvalidOperation never escapes."""
    compiled = build(ruleset_text(["x"], fees=f"  - {{id: big, kind: fixed, amount: {json.dumps(amount)}}}"))
    try:
        decision = compiled.settle(request({"x": "999999999999999999"}))
    except RequestInvalid as exc:
        assert all(CODE.fullmatch(p.code) for p in exc.problems)
    else:
        assert decision.line("big").amount == decision.line("big").amount.quantize(Decimal("0.01"))


# ---------------------------------------------------------------- expressions


@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
@pytest.mark.parametrize("terms", [33, 100, 250, 333, 400, 499])
def test_long_flat_chains_under_1000_characters_are_clean(op: str, terms: int) -> None:
    formula = op.join(["x"] * terms)
    assert len(formula) < 1000
    text = ruleset_text(["x"], penalties=["x > 0"]).replace("fees:", f"kpis:\n  k: {{formula: {json.dumps(formula)}}}\nfees:")
    report = clean_report(text)  # a RecursionError must not escape
    assert error_codes(report) in ([], [("expr.too_deep", "kpis.k.formula")])


@pytest.mark.parametrize("terms", [33, 330, 498])
def test_long_chains_in_conditions_are_clean(terms: int) -> None:
    when = "+".join(["x"] * terms) + " > 1"
    assert len(when) < 1000
    report = clean_report(ruleset_text(["x"], penalties=[when]))
    assert error_codes(report) in ([], [("expr.too_deep", "fees[1].when")])


@pytest.mark.parametrize(
    "formula",
    [
        "(" * 499 + "x" + ")" * 499,
        "-" * 999 + "x",
        "- " * 499 + "x",
        "abs(" * 199 + "x" + ")" * 199,
        "min(" * 199 + "x" + ")" * 199,
        "(x+" * 249 + "x" + ")" * 249,
    ],
    ids=["parens", "minus", "spaced-minus", "abs", "min", "mixed"],
)
def test_deep_nesting_is_refused_quickly(formula: str) -> None:
    assert len(formula) <= 1000
    text = ruleset_text(["x"], penalties=["x > 0"]).replace("fees:", f"kpis:\n  k: {{formula: {json.dumps(formula)}}}\nfees:")
    started = time.monotonic()
    report = clean_report(text)
    assert time.monotonic() - started < 5
    assert error_codes(report) == [("expr.too_deep", "kpis.k.formula")]


def test_deeply_nested_not_is_refused() -> None:
    when = "not " * 240 + "x > 1"
    report = clean_report(ruleset_text(["x"], penalties=[when]))
    assert error_codes(report) == [("expr.too_deep", "fees[1].when")]


@pytest.mark.parametrize("length", [1001, 5000, 200_000])
def test_very_long_expressions_are_refused(length: int) -> None:
    when = ("x > 1 and " * (length // 10 + 1))[: length - 5] + "x > 1"
    report = clean_report(ruleset_text(["x"], penalties=[when]))
    assert error_codes(report) == [("expr.too_long", "fees[1].when")]


def test_long_and_or_chains_are_refused_as_too_complex() -> None:
    letters = [f"v{i}" for i in range(26)]
    for joiner in (" and ", " or "):
        when = joiner.join(f"v{i % 26} > {i}" for i in range(100))[:995].rsplit(joiner, 1)[0]
        report = clean_report(ruleset_text(letters, penalties=[when]))
        assert error_codes(report) == [("rule.too_complex", "fees[1].when")]


def test_an_exponential_alternative_expansion_is_checked_quickly() -> None:
    names = [f"{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    pairs = " and ".join(f"({p} > 1 or {q} > 1)" for p, q in zip("acegikmo", "bdfhjlnp", strict=True))
    when = " and ".join([f"({pairs} or z > 1)"] * 5)
    assert len(when) < 1000
    started = time.monotonic()
    report = clean_report(ruleset_text(names, penalties=[when]))
    assert time.monotonic() - started < 5
    assert error_codes(report) == [("rule.too_complex", "fees[1].when")]


@pytest.mark.parametrize(
    ("where", "expression"),
    [
        ("penalty", "1 / 0 > 1"),
        ("penalty", "x > 1 / 0"),
        ("penalty", "x > 1 / (2 - 2)"),
        ("warning", "x / 0 > 1 / 0"),
        ("exemption", "1 / 0 > x"),
        ("steps_on", "1 / 0"),
    ],
)
def test_a_constant_division_by_zero_in_a_condition_is_a_clean_problem(where: str, expression: str) -> None:
    if where == "penalty":
        text, path = ruleset_text(["x"], penalties=[expression]), "fees[1].when"
    elif where == "warning":
        text, path = ruleset_text(["x"], warnings=[expression]), "warnings[0].when"
    elif where == "exemption":
        text, path = ruleset_text(["x"], exemptions=[expression]), "exemptions.e0.when"
    else:
        fee = f'  - id: ladder\n    kind: bonus\n    steps_on: {json.dumps(expression)}\n    steps:\n      - {{from: "1", amount: "1"}}'
        text, path = ruleset_text(["x"], fees=fee), "fees[1].steps"  # steps_on, or the step built on it
    report = clean_report(text)  # ZeroDivision must not escape
    assert not report.valid
    assert any(p.path.startswith(path) for p in report.errors), [str(p) for p in report.problems]
    assert all(p.code.startswith(("expr.", "rule.")) for p in report.errors)


@pytest.mark.parametrize("when", ["market == market", "market != market", "market == market and x > 1"])
def test_comparing_market_with_itself_is_clean(when: str) -> None:
    report = clean_report(ruleset_text(["x"], penalties=[when]))  # AssertionError must not escape
    assert all(p.code.startswith(("expr.", "rule.")) for p in report.errors)


def test_a_literal_computed_with_more_digits_than_the_matcher_takes_is_clean() -> None:
    report = clean_report(ruleset_text(["x"], penalties=["x > 1 / 3"]))
    assert error_codes(report) in ([], [("rule.literal_out_of_range", "fees[1].when")])


def test_division_by_zero_at_settlement_is_a_request_error_and_the_ruleset_keeps_working(
    build: Callable[[str], CompiledRuleset],
) -> None:
    fee = '  - {id: share, kind: fixed, amount: "100 / y"}'
    compiled = build(ruleset_text(["x", "y"], penalties=["x / y > 1"], fees=fee))
    with pytest.raises(RequestInvalid) as raised:
        compiled.settle(request({"x": "5", "y": "0"}))
    assert [p.code for p in raised.value.problems] == ["expr.division_by_zero"]
    decision = compiled.settle(request({"x": "5", "y": "2"}))
    assert penalised(decision) == {"p0"}
    assert decision.line("share").amount == Decimal(50)


# ---------------------------------------------------------------- YAML and JSON documents


def billion_laughs(levels: int = 10) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        name, previous = chr(ord("a") + level), chr(ord("a") + level - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 10])
def test_a_yaml_alias_bomb_is_refused_quickly(levels: int) -> None:
    started = time.monotonic()
    report = clean_report(billion_laughs(levels))
    assert time.monotonic() - started < 1
    assert [p.code for p in report.problems] == ["source.too_many_nodes"]
    assert report.problems[0].line > 0


def test_an_alias_bomb_inside_a_real_section_is_refused_quickly() -> None:
    bomb = "".join(f"  {line}\n" for line in billion_laughs(10).splitlines())
    text = ruleset_text(["x"], penalties=["x > 1"]).replace("ruleset: hostile\n", "ruleset: hostile\ntitle:\n" + bomb)
    started = time.monotonic()
    report = clean_report(text)
    assert time.monotonic() - started < 1
    assert [p.code for p in report.problems] == ["source.too_many_nodes"]
    assert report.problems[0].path.startswith("title.")


@pytest.mark.parametrize("text", ["a: &x [*x]\n", "a: &x {b: *x}\n", "a: &x\n  b: &y\n    c: *x\n"])
def test_recursive_aliases_are_refused(text: str) -> None:
    started = time.monotonic()
    report = clean_report(text)
    assert time.monotonic() - started < 1
    assert [p.code for p in report.problems] in (["source.too_deep"], ["source.too_many_nodes"], ["source.syntax"])


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
        "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']",
        "!!binary aGVsbG8=",
        "!!set {a, b}",
        "!!omap [a: 1]",
        "!custom value",
        "!!python/str demo",
    ],
)
def test_custom_tags_are_refused_and_never_run(tmp_path: Path, value: str) -> None:
    marker = tmp_path / "pwned"
    for text in (f"ruleset: {value}\n", f"{value}\n", f"metrics:\n  x: {value}\n"):
        text = text.replace("{marker}", str(marker))
        report = clean_report(text)
        assert [p.code for p in report.problems] == ["source.tag_not_allowed"], text
        assert report.problems[0].line > 0
        with pytest.raises(RulesetInvalid):
            compile_ruleset(text)
    assert not marker.exists()


@pytest.mark.parametrize("text", ["!!python/str key: v\n", "? !!python/object/apply:os.system ['true']\n: v\n", "a: 1\n<<: {b: 2}\n"])
def test_tagged_or_merge_keys_are_refused(text: str) -> None:
    report = clean_report(text)
    assert report.problems[0].code in ("source.bad_key", "source.tag_not_allowed")


def test_standard_tags_keep_the_text_exact() -> None:
    text = ruleset_text(["x"], penalties=["x > 1"]).replace('amount: "100"', "amount: !!str 100.10")
    text = text.replace('US: {multiplier: "1"}', "US: {multiplier: !!float 1.0}")
    report = clean_report(text)
    assert report.valid, [str(p) for p in report.problems]


def test_a_document_over_256_kib_is_refused() -> None:
    text = ruleset_text(["x"], penalties=["x > 1"])
    big = text + "#" + "x" * (256 * 1024 - len(text.encode()) + 10) + "\n"
    started = time.monotonic()
    for source in (big, big.encode("utf-8")):
        report = clean_report(source)
        assert [p.code for p in report.problems] == ["source.too_large"]
    assert time.monotonic() - started < 1
    # multi-byte text is counted in bytes, not characters
    wide = text + "# " + "断" * 90_000 + "\n"
    assert len(wide) < 256 * 1024 < len(wide.encode())
    assert [p.code for p in clean_report(wide).problems] == ["source.too_large"]


def test_a_document_of_exactly_256_kib_is_accepted() -> None:
    text = ruleset_text(["x"], penalties=["x > 1"])
    padding = 256 * 1024 - len(text.encode()) - 2
    exact = text + "#" + "x" * padding + "\n"
    assert len(exact.encode()) == 256 * 1024
    report = clean_report(exact)
    assert report.valid, [str(p) for p in report.problems]


def test_a_huge_document_is_refused_without_parsing_it() -> None:
    started = time.monotonic()
    report = clean_report("a: [" + "1, " * 5_000_000 + "1]\n")
    assert [p.code for p in report.problems] == ["source.too_large"]
    assert time.monotonic() - started < 2


def test_too_many_plain_nodes_are_refused() -> None:
    text = "ruleset: x\ntitle: [" + ",".join(["1"] * 25_000) + "]\n"
    assert len(text.encode()) < 256 * 1024
    report = clean_report(text)
    assert [p.code for p in report.problems] == ["source.too_many_nodes"]


@pytest.mark.parametrize("depth", [33, 40])
def test_nesting_deeper_than_32_is_refused_with_a_position(depth: int) -> None:
    text = "ruleset: x\ntitle: " + "[" * depth + "]" * depth + "\n"
    report = clean_report(text)
    assert [p.code for p in report.problems] == ["source.too_deep"]
    assert report.problems[0].line == 2


def test_nesting_of_32_is_not_refused_for_its_depth() -> None:
    report = clean_report("ruleset: x\ntitle: " + "[" * 31 + "]" * 31 + "\n")
    assert "source.too_deep" not in [p.code for p in report.problems]


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 20_000 + "]" * 20_000,
        "a: " + "{a: " * 20_000 + "1" + "}" * 20_000,
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"a": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}",
        "".join("  " * i + "- \n" for i in range(2000)),
        "".join("  " * i + f"k{i}:\n" for i in range(3000)),
    ],
    ids=["yaml-flow-lists", "yaml-flow-maps", "json-lists", "json-maps", "yaml-block-lists", "yaml-block-maps"],
)
def test_very_deep_nesting_is_refused_quickly(text: str) -> None:
    started = time.monotonic()
    report = clean_report(text)
    assert time.monotonic() - started < 5
    assert [p.code for p in report.problems] in (["source.too_deep"], ["source.too_large"])


@pytest.mark.parametrize(
    "source",
    [
        b"ruleset: caf\xe9\n",
        b"\xff\xfe\x00\x00",
        "ruleset: x\n".encode("utf-16"),
        b"ruleset: \xed\xa0\x80\n",  # an encoded surrogate
        b"ruleset: \xc0\xaf\n",  # an overlong encoding
        b"\x80",
    ],
)
def test_bytes_that_are_not_utf8_are_refused(source: bytes) -> None:
    report = clean_report(source)
    assert [p.code for p in report.problems] == ["source.encoding"]


def test_text_with_a_lone_surrogate_is_refused() -> None:
    report = clean_report("ruleset: \ud800\n")  # a str that cannot be encoded as UTF-8
    assert not report.valid


@pytest.mark.parametrize("text", ["a: \x00\n", "a: \x07\n", "a: \x1b[31m\n", "a: \ufffe\n", "ruleset: x\ntitle: y\x07\n"])
def test_control_characters_are_refused(text: str) -> None:
    report = clean_report(text)
    assert [p.code for p in report.problems] == ["source.syntax"]
    bad = next(i for i, c in enumerate(text) if c in "\x00\x07\x1b\ufffe")
    assert (report.problems[0].line, report.problems[0].column) == at(text, text[bad])  # where the character is


@pytest.mark.parametrize(
    ("text", "path", "needle"),
    [
        ('"\\uD800"', "", '"\\u'),  # a JSON document that is one lone surrogate
        ('{"ruleset": "x", "title": "a\\udfffb"}', "title", '"a'),
        ('ruleset: x\ntitle: "bell \\x07"\n', "title", '"bell'),
        ('ruleset: x\ntitle: "nul \\0"\n', "title", '"nul'),
        ('ruleset: x\nmetrics:\n  "a\\uD83D": {type: number}\n', "metrics", '"a'),  # in a key
        ('ruleset: x\ntitle: "\\uFFFE"\n', "title", '"\\uFFFE'),
    ],
)
def test_characters_written_as_escapes_are_refused_like_raw_ones(text: str, path: str, needle: str) -> None:
    """An escape in a quoted scalar yields what the reader refuses as raw text (a lone surrogate
    cannot even be encoded to be hashed or stored): refused, with its place."""
    problem = refused(text, "source.character", path)
    assert (problem.line, problem.column) == at(text, needle)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("%YAML 1.1\n---\nruleset: x\n", "key.missing"),  # read (the fuzz found these crashing the composer once)
        ("%YAML 1.2\n%TAG !e! tag:example.com,2000:\n---\nruleset: !e!x y\n", "source.tag_not_allowed"),
        ("%YAML 1.1\n", "source.syntax"),
        ("%YAML 2.0\n---\nruleset: x\n", "source.syntax"),
        ("%YAML 1.1\n%YAML 1.1\n---\nruleset: x\n", "source.syntax"),
        ("%FOO bar\n---\nruleset: x\n", "key.missing"),
    ],
)
def test_yaml_directives_are_read_or_refused_cleanly(text: str, code: str) -> None:
    report = clean_report(text)
    assert not report.valid and report.problems[0].code == code, report.problems
    assert report.problems[0].line >= 1


def test_a_reused_anchor_name_is_read_without_a_warning() -> None:
    """Legal YAML (the later anchor wins); ruamel would warn, and so write every such document to the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = clean_report("ruleset: x\na: &n [1]\nb: &n [2]\nc: *n\n")
    assert caught == []
    assert [p.path for p in report.problems if p.code == "key.unknown"] == ["a", "b", "c"]


def test_escaped_tabs_newlines_and_non_bmp_characters_are_text() -> None:
    report = clean_report('ruleset: x\ntitle: "a\\tb\\nc \\U0001F600 \\u00e9"\n')
    assert "source.character" not in [p.code for p in report.problems]


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("", "source.empty"),
        (b"", "source.empty"),
        ("\n\n\n", "source.empty"),
        ("# nothing\n", "source.empty"),
        ("42", "type.mapping"),
        ("'just text'", "type.mapping"),
        ("true", "type.mapping"),
        ("null", "type.mapping"),
        ("- 1\n- 2\n", "type.mapping"),
        ("[]", "type.mapping"),
        ('"text"', "type.mapping"),
        ("{}", "key.missing"),
        ("---\na: 1\n---\nb: 2\n", "source.syntax"),
    ],
)
def test_documents_that_are_not_a_ruleset(source: str | bytes, code: str) -> None:
    report = clean_report(source)
    assert report.problems[0].code == code
    assert not report.valid
    with pytest.raises(RulesetInvalid):
        compile_ruleset(source)


def test_a_very_long_key_is_refused() -> None:
    text = ruleset_text(["x"], penalties=["x > 1"]).replace("metrics:\n", "metrics:\n  " + "a" * 5000 + ": {type: number}\n")
    report = clean_report(text)
    assert not report.valid


# ---------------------------------------------------------------- numbers in every numeric position

FULL = """\
ruleset: numbers
effective_from: 2026-01-01
currency: USD
metrics:
  gmv: {type: money}
  orders: {type: count, default: "0"}
  acos: {type: ratio}
  days: {type: count, default: "0"}
params:
  fee: {type: money, default: "100"}
  target: {type: money, default: "1000", target: true}
exemptions:
  stock: {when: "days >= 7", prorate_targets_by: days}
kpis:
  net: {formula: "gmv * 2", on_zero_division: "0"}
  attainment: {formula: "net / target", on_zero_division: "0"}
fees:
  - id: base_fee
    kind: fixed
    amount: fee
  - id: commission
    kind: tiered
    basis: net
    tiers:
      - {up_to: "1000", rate: "5%"}
      - {from: "1000", up_to: "2000", rate: "6%"}
      - {rate: "8%"}
  - id: pct
    kind: percentage
    basis: gmv
    rate: "1%"
  - id: bonus
    kind: bonus
    steps_on: attainment
    steps:
      - {from: "1", amount: "5"}
      - {from: "2", rate: "1%", of: net}
  - id: acos_penalty
    kind: penalty
    when: "acos > 28% and orders > 0"
    rate: "10%"
    of: base_fee
    exempt_by: [stock]
  - id: flat_penalty
    kind: penalty
    when: "orders > 10"
    amount: "7"
markets:
  US: {multiplier: "1.5"}
multiply: [base_fee]
caps:
  penalties: {max_rate: "30%", of: base_fee}
  total: {min: "10", max: "100000"}
warnings:
  - {id: high_acos, when: "acos > 50%", message: {en: high, zh: 高}}
examples:
  - name: one
    market: US
    metrics: {gmv: "1000", orders: "3", acos: "30%"}
    expect: {total: "280.00", lines: {commission: "110.00", market_multiplier: "50.00"}}
"""

NUMERIC_POSITIONS = {
    "metric default": ('default: "0"}\n  acos', "default: {}}}\n  acos", "metrics.orders.default"),
    "param default": ('default: "100"', "default: {}", "params.fee.default"),
    "on_zero_division": ('on_zero_division: "0"}\n  attainment', "on_zero_division: {}}}\n  attainment", "kpis.net.on_zero_division"),
    "tier up_to": ('{up_to: "1000", rate: "5%"}', '{{up_to: {}, rate: "5%"}}', "fees[1].tiers[0].up_to"),
    "tier rate": ('{up_to: "1000", rate: "5%"}', '{{up_to: "1000", rate: {}}}', "fees[1].tiers[0].rate"),
    "tier from": ('from: "1000"', "from: {}", "fees[1].tiers[1].from"),
    "percentage rate": ('rate: "1%"\n', "rate: {}\n", "fees[2].rate"),
    "step from": ('from: "1", amount', "from: {}, amount", "fees[3].steps[0].from"),
    "step rate": ('rate: "1%", of: net', "rate: {}, of: net", "fees[3].steps[1].rate"),
    "penalty rate": ('rate: "10%"', "rate: {}", "fees[4].rate"),
    "multiplier": ('multiplier: "1.5"', "multiplier: {}", "markets.US.multiplier"),
    "cap rate": ('max_rate: "30%"', "max_rate: {}", "caps.penalties.max_rate"),
    "floor": ('min: "10"', "min: {}", "caps.total.min"),
    "cap": ('max: "100000"', "max: {}", "caps.total.max"),
}
AMOUNT_POSITIONS = {
    "fixed amount": ("amount: fee", "amount: {}", "fees[0].amount"),
    "step amount": ('amount: "5"', "amount: {}", "fees[3].steps[0].amount"),
    "penalty amount": ('amount: "7"', "amount: {}", "fees[5].amount"),
}
BAD_NUMBERS = [
    ".nan", ".inf", "-.inf", '"NaN"', '"-Infinity"', "1e5", '"1E-3"', "0x10", "1_000", '"1,000"', '"1234567890123456789"',
    '"0.12345678901"', '"' + "9" * 400 + '"', "null", "true", "[1]", "{a: 1}", '" "', '"--1"', '"١٢"',
]  # fmt: skip


def test_the_numbers_ruleset_is_valid() -> None:
    report = clean_report(FULL)
    assert report.problems == ()
    assert report.examples_pass


@pytest.mark.parametrize("position", sorted(NUMERIC_POSITIONS))
def test_bad_numbers_in_every_numeric_position_are_number_invalid(position: str) -> None:
    old, template, path = NUMERIC_POSITIONS[position]
    assert FULL.count(old) == 1
    for bad in BAD_NUMBERS:
        text = FULL.replace(old, template.format(bad))
        report = clean_report(text)
        assert error_codes(report) == [("number.invalid", path)], (bad, [str(p) for p in report.problems])
        assert report.errors[0].line > 0


@pytest.mark.parametrize("position", sorted(AMOUNT_POSITIONS))
def test_bad_numbers_in_amount_expressions_are_expression_errors(position: str) -> None:
    old, template, path = AMOUNT_POSITIONS[position]
    assert FULL.count(old) == 1
    for bad in BAD_NUMBERS:
        if bad == '"--1"':
            continue  # a valid expression: minus minus one
        text = FULL.replace(old, template.format(bad))
        report = clean_report(text)
        codes = error_codes(report)
        assert len(codes) == 1 and codes[0][1] == path and codes[0][0].startswith("expr."), (bad, codes)


# ---------------------------------------------------------------- wrong types everywhere


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_of(item, (*prefix, index))


def replaced(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    result = copy.deepcopy(data)
    node = result
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return result


HOSTILE_VALUES: list[Any] = [None, True, ["a", ["b"]], {"k": {"v": "w"}}]


def test_a_wrong_type_anywhere_gives_clean_problems() -> None:
    """Every node of a full ruleset replaced by a list, a mapping, null, a boolean, nested
    containers or odd text: validation reports problems and never raises."""
    data = load_source(FULL).data
    crashes: dict[str, str] = {}
    started = time.monotonic()
    for path in paths_of(data):
        if path[:1] == ("examples",) and len(path) > 1:
            continue  # examples are requests: the request parser has its own tests
        for value in HOSTILE_VALUES:
            text = json.dumps(replaced(data, path, value))
            try:
                clean_report(text)
            except Exception as exc:
                crashes.setdefault(f"{type(exc).__name__}: {exc}"[:100], f"{path} = {value!r}")
    assert time.monotonic() - started < 20
    assert crashes == {}


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("    kind: fixed\n", "    kind:\n", "fees[0].kind"),
        ("    kind: fixed\n", "    kind: null\n", "fees[0].kind"),
        ("  gmv: {type: money}", "  gmv: {type: null}", "metrics.gmv.type"),
        ("  gmv: {type: money}", "  gmv: {type: }", "metrics.gmv.type"),
    ],
)
def test_a_required_key_left_empty_is_an_error(old: str, new: str, path: str) -> None:
    """`kind:` with no value must not silently drop the fee (a later fee refers to it)."""
    text = FULL.replace(old, new)
    report = clean_report(text)  # a KeyError must not escape from the examples
    assert not report.valid
    assert any(p.path in (path, path.rsplit(".", 1)[0]) for p in report.errors), [str(p) for p in report.problems]
    with pytest.raises(RulesetInvalid):
        compile_ruleset(text.split("examples:")[0]).close()


@pytest.mark.parametrize(
    ("old", "new", "code", "path"),
    [
        ("exempt_by: [stock]", "exempt_by: [[stock]]", "penalty.unknown_exemption", "fees[4].exempt_by[0]"),
        ("exempt_by: [stock]", "exempt_by: [{stock: 1}]", "penalty.unknown_exemption", "fees[4].exempt_by[0]"),
        ("multiply: [base_fee]", "multiply: [[base_fee]]", "multiply.unknown_fee", "multiply[0]"),
        ("multiply: [base_fee]", "multiply: [{base_fee: 1}]", "multiply.unknown_fee", "multiply[0]"),
    ],
)
def test_a_list_or_mapping_where_a_name_is_expected(old: str, new: str, code: str, path: str) -> None:
    report = clean_report(FULL.replace(old, new))  # TypeError (unhashable) must not escape
    assert (code, path) in error_codes(report)


@pytest.mark.parametrize(
    ("old", "new", "code", "path"),
    [
        ("  - id: flat_penalty", "  - id: 5", "name.invalid", "fees[5].id"),
        ("  - id: flat_penalty", "  - id: null", "name.invalid", "fees[5].id"),
        ("  - id: flat_penalty", "  - id: true", "name.invalid", "fees[5].id"),
        ("  - id: flat_penalty", "  - id: [flat]", "name.invalid", "fees[5].id"),
        ("exempt_by: [stock]", "exempt_by: [5]", "penalty.unknown_exemption", "fees[4].exempt_by[0]"),
        ("exempt_by: [stock]", "exempt_by: [null]", "penalty.unknown_exemption", "fees[4].exempt_by[0]"),
        ("exempt_by: [stock]", "exempt_by: true", "type.list", "fees[4].exempt_by"),
        ("multiply: [base_fee]", "multiply: [5]", "multiply.unknown_fee", "multiply[0]"),
        ("multiply: [base_fee]", "multiply: base_fee", "type.list", "multiply"),
        ("kind: tiered", "kind: [tiered]", "value.invalid", "fees[1].kind"),
        ("kind: tiered", "kind: true", "value.invalid", "fees[1].kind"),
        ("currency: USD", "currency: [USD]", "currency.unknown", "currency"),
        ("currency: USD", "currency: null", "currency.unknown", "currency"),
        ("effective_from: 2026-01-01", "effective_from: 2026/01/01", "date.invalid", "effective_from"),
        ("effective_from: 2026-01-01", "effective_from: [2026]", "date.invalid", "effective_from"),
        ("  gmv: {type: money}", "  gmv: null", "type.mapping", "metrics.gmv"),
        ("  gmv: {type: money}", "  gmv: [money]", "type.mapping", "metrics.gmv"),
        ("  gmv: {type: money}", "  gmv: {type: [money]}", "value.invalid", "metrics.gmv.type"),
        ("  gmv: {type: money}", "  gmv: {type: true}", "value.invalid", "metrics.gmv.type"),
        ("tiers:\n", "tiers: 5\n    xtiers:\n", "type.list", "fees[1].tiers"),
        ("    steps:\n", "    steps: {a: 1}\n    xsteps:\n", "type.list", "fees[3].steps"),
        ("markets:\n", "markets: true\nxmarkets:\n", "type.mapping", "markets"),
        ("caps:\n", "caps: [1]\nxcaps:\n", "type.mapping", "caps"),
        ("warnings:\n", "warnings: {a: 1}\nxwarnings:\n", "type.list", "warnings"),
        ("examples:\n", "examples: 5\nxexamples:\n", "type.list", "examples"),
        ("message: {en: high, zh: 高}", "message: [high]", "type.mapping", "warnings[0].message"),
        ("prorate_targets_by: days", "prorate_targets_by: [days]", "expr.not_text", "exemptions.stock.prorate_targets_by"),
        ("target: true}", "target: 1}", "type.boolean", "params.target.target"),
    ],
)
def test_wrong_types_are_type_or_key_problems(old: str, new: str, code: str, path: str) -> None:
    assert FULL.count(old) == 1, old
    report = clean_report(FULL.replace(old, new))
    assert (code, path) in error_codes(report), [str(p) for p in report.problems]


# ---------------------------------------------------------------- hostile requests


@pytest.mark.parametrize(
    "value",
    ["NaN", "nan", "Infinity", "-inf", "1e5", "1E-3", "0x10", "1_000", "1,000", "", " ", "--1", "1.2.3", "1" * 19, "0." + "1" * 11,
     "9" * 100_000, None, 1.5, 5, True, [], {}, ["1"], b"1", Decimal("1")],
)  # fmt: skip
def test_bad_metric_values_are_request_errors(build: Callable[[str], CompiledRuleset], value: Any) -> None:
    compiled = build(FULL)
    with pytest.raises(RequestInvalid) as raised:
        compiled.settle(request({"gmv": value, "acos": "0.1"}))
    assert [(p.code, p.path) for p in raised.value.problems] in (
        [("request.number", "metrics.gmv")],
        [("request.type", "metrics.gmv")],
        [("request.missing", "metrics.gmv")],  # None
    )


def test_hostile_request_shapes_are_request_errors(build: Callable[[str], CompiledRuleset]) -> None:
    compiled = build(FULL)
    good = {"gmv": "1000", "acos": "0.1"}
    hostile: list[tuple[Callable[[], Any], str]] = [
        (lambda: compiled.settle(request({**good, "n" * 1_000_000: "1"})), "request.unknown_name"),
        (lambda: compiled.settle(request({**good, **{f"extra{i}": "1" for i in range(600)}})), "request.too_many"),
        (lambda: compiled.settle(request(good, market="X" * 1_000_000)), "request.market"),
        (lambda: compiled.settle(request(good, market="us")), "request.market"),
        (lambda: compiled.settle(request({**good, "orders": "2.5"})), "request.count"),
        (lambda: compiled.settle(request({**good, "orders": "-1"})), "request.count"),
        (lambda: compiled.settle(request({"acos": "0.1"})), "request.missing"),
        (lambda: compiled.settle(request({**good, "gmv": {"amount": "5", "currency": "EUR"}})), "request.fx_missing"),
        (lambda: compiled.settle(request({**good, "gmv": {"amount": "5", "currency": "ZZZ"}})), "request.currency"),
        (lambda: compiled.settle(request(good, active_days=-1)), "request.active_days"),
        (lambda: compiled.settle(request(good, active_days=32)), "request.active_days"),
        (lambda: compiled.settle(request(good, active_days="x")), "request.active_days"),
        (lambda: compiled.settle(request(good, period_start="2026-03-02")), "request.period"),
        (lambda: compiled.settle(request(good, period_start="not a date")), "request.period"),
        (lambda: compiled.settle(request(good, params={"fee": "1e3"})), "request.number"),
        (lambda: compiled.settle(request(good, params=[1])), "request.type"),
        (lambda: compiled.settle(request(good, fx_rates="EUR")), "request.type"),
        (lambda: request_from_mapping([1, 2], MARCH), "request.type"),
        (lambda: request_from_mapping({"market": 5, "metrics": good}, MARCH), "request.market"),
    ]
    for call, code in hostile:
        started = time.monotonic()
        with pytest.raises(RequestInvalid) as raised:
            call()
        assert code in [p.code for p in raised.value.problems], (code, [str(p) for p in raised.value.problems])
        assert time.monotonic() - started < 2
        assert all(len(p.path) < 200 for p in raised.value.problems)
    # and the compiled ruleset still settles correctly afterwards
    assert compiled.settle(request(good)).line("pct").amount == Decimal("10.00")


# ---------------------------------------------------------------- threads and lifecycle


def us_requests() -> tuple[str, list[SettlementRequest]]:
    text = (ROOT / "rulesets" / "us-managed-standard.yaml").read_text(encoding="utf-8")
    compiled = compile_ruleset(text)
    try:
        requests = [request_from_mapping(e.request, compiled.ruleset.effective_from) for e in compiled.ruleset.examples]
    finally:
        compiled.close()
    assert len(requests) >= 3
    return text, requests


def test_eight_threads_settling_on_one_ruleset_agree_with_sequential(build: Callable[[str], CompiledRuleset]) -> None:
    text, requests = us_requests()
    compiled = build(text)
    expected = [compiled.settle(r).to_canonical_json() for r in requests]
    rounds = 200
    results: list[list[bytes]] = [[] for _ in range(8)]
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def work(slot: int) -> None:
        try:
            start.wait()
            for i in range(rounds):
                results[slot].append(compiled.settle(requests[(slot + i) % len(requests)]).to_canonical_json())
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    for slot in range(8):
        assert results[slot] == [expected[(slot + i) % len(requests)] for i in range(rounds)]
    assert time.monotonic() - started < 30


def test_threads_compiling_settling_and_closing_at_once() -> None:
    text, requests = us_requests()
    reference = compile_ruleset(text)
    try:
        expected = [reference.settle(r).to_canonical_json() for r in requests]
    finally:
        reference.close()
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                compiled = compile_ruleset(text)
                try:
                    assert [compiled.settle(r).to_canonical_json() for r in requests] == expected
                finally:
                    compiled.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []


def test_compiling_and_closing_50_times() -> None:
    text, requests = us_requests()
    first = None
    for _ in range(50):
        compiled = compile_ruleset(text)
        try:
            decision = compiled.settle(requests[0]).to_canonical_json()
        finally:
            compiled.close()
        first = first or decision
        assert decision == first
    compiled.close()  # closing twice is harmless


def test_more_settlements_than_the_core_has_sessions(build: Callable[[str], CompiledRuleset]) -> None:
    """durable_rules allows 1024 live sessions per ruleset: sessions must be pooled, not made per request."""
    text, requests = us_requests()
    compiled = build(text)
    expected = [compiled.settle(r).to_canonical_json() for r in requests]
    for i in range(1100):
        assert compiled.settle(requests[i % len(requests)]).to_canonical_json() == expected[i % len(requests)]


def test_many_live_rulesets_at_once() -> None:
    text = ruleset_text(["x"], penalties=["x > 1"], warnings=["x > 2"])
    compiled = [compile_ruleset(text) for _ in range(60)]
    try:
        for item in compiled:
            assert penalised(item.settle(request({"x": "1.5"}))) == {"p0"}
    finally:
        for item in compiled:
            item.close()


def test_settling_on_a_closed_ruleset_is_an_error_not_a_silent_wrong_decision() -> None:
    compiled = compile_ruleset(ruleset_text(["x"], penalties=["x > 1"]))
    assert penalised(compiled.settle(request({"x": "5"}))) == {"p0"}
    compiled.close()
    with pytest.raises(EngineError):
        compiled.settle(request({"x": "5"}))
