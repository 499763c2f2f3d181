"""Ruleset validation (SPEC §3, docs/ruleset-format.md): every problem at once, each with a
stable code, the path of the offending node and its 1-based line and column in the source.

Positions are not hard-coded: a test names a marker in its own source text, and `at()`
turns the marker into the line and column where the offending node starts. A `§` inside a
marker says where, within the marker, the node starts (the rest makes the marker unique).
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

import engine
from engine import (
    Problem,
    RulesetInvalid,
    Severity,
    ValidationReport,
    compile_ruleset,
    request_from_mapping,
    validate_ruleset,
)
from engine.source import load_source

MARCH = datetime.date(2026, 3, 1)

# A ruleset that uses every construct, validates without a single problem and whose
# examples pass. Every test below starts from it and changes one thing (or five).
BASE = """\
ruleset: demo
title: Demo store terms
effective_from: 2026-01-01
currency: USD
period: month
rounding: half_up
metrics:
  gross_gmv: {type: money}
  refunds: {type: money, default: "0"}
  ad_spend: {type: money}
  ad_sales: {type: money}
  orders: {type: count}
  defective_orders: {type: count}
  stockout_days: {type: count, default: "0"}
params:
  gmv_target: {type: money, target: true}
  monthly_fee: {type: money, default: "3000"}
exemptions:
  stockout: {when: "stockout_days >= 7", label: {en: Stockout, zh: 断货期}}
kpis:
  net_gmv: {formula: "gross_gmv - refunds", type: money}
  acos: {formula: "ad_spend / ad_sales", on_zero_division: "0"}
  odr: {formula: "defective_orders / orders", on_zero_division: "0"}
  attainment: {formula: "net_gmv / gmv_target", on_zero_division: "0"}
fees:
  - id: base_fee
    kind: fixed
    amount: monthly_fee
  - id: commission
    kind: tiered
    basis: net_gmv
    mode: graduated
    tiers:
      - {up_to: "50000", rate: "5%"}
      - {up_to: "100000", rate: "6%"}
      - {rate: "8%"}
  - id: gmv_bonus
    kind: bonus
    steps_on: attainment
    steps:
      - {from: "1.00", amount: "500"}
      - {from: "1.20", rate: "1%", of: net_gmv}
  - id: acos_penalty
    kind: penalty
    when: "acos > 28%"
    rate: "10%"
    of: base_fee
    exempt_by: [stockout]
  - id: odr_penalty
    kind: penalty
    when: "odr >= 0.5%"
    amount: "300"
markets:
  US: {multiplier: "1.00"}
  JP: {multiplier: "1.20"}
multiply: [base_fee, commission]
caps:
  penalties: {max_rate: "30%", of: base_fee}
  total: {min: "1000"}
warnings:
  - {id: gmv_behind, when: "attainment < 0.85", message: {en: GMV behind target, zh: GMV低于目标}}
examples:
  - name: stretch target
    market: US
    metrics: {gross_gmv: "130000", refunds: "5000", ad_spend: "20000", ad_sales: "100000", orders: "2000", defective_orders: "4"}
    params: {gmv_target: "100000"}
    expect:
      total: "11750.00"
      lines: {commission: "7500.00", gmv_bonus: "1250.00"}
      warnings: []
  - name: penalties in Japan
    market: JP
    metrics: {gross_gmv: "40000", ad_spend: "15000", ad_sales: "50000", orders: "100", defective_orders: "1"}
    params: {gmv_target: "100000"}
    expect:
      total: "5400.00"
      lines: {acos_penalty: "-300.00", odr_penalty: "-300.00", market_multiplier: "1000.00"}
      warnings: [gmv_behind]
"""


# ---------------------------------------------------------------- helpers


def at(text: str, marker: str) -> tuple[int, int]:
    """1-based line and column where `marker` (its `§`, if any) starts in `text`; unique."""
    offset = marker.index("§") if "§" in marker else 0
    needle = marker.replace("§", "")
    assert text.count(needle) == 1, f"marker {needle!r} occurs {text.count(needle)} times"
    index = text.index(needle) + offset
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def edit(text: str, *changes: tuple[str, str]) -> str:
    """Apply replacements, each of text that occurs exactly once."""
    for old, new in changes:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


def errors_of(report: ValidationReport) -> list[tuple[str, str]]:
    """Errors other than failing examples, as (code, path)."""
    return [(p.code, p.path) for p in report.errors if p.code != "example.failed"]


def only(report: ValidationReport, code: str, path: str) -> Problem:
    found = [p for p in report.problems if p.code == code and p.path == path]
    assert len(found) == 1, (code, path, [str(p) for p in report.problems])
    return found[0]


def located(problem: Problem) -> tuple[str, str, int, int]:
    return (problem.code, problem.path, problem.line, problem.column)


# ---------------------------------------------------------------- the base ruleset


def test_the_base_ruleset_is_clean_and_its_examples_pass() -> None:
    report = validate_ruleset(BASE)
    assert report.problems == ()
    assert report.valid and report.examples_pass
    assert report.ruleset_id == "demo"
    assert [o.name for o in report.examples] == ["stretch target", "penalties in Japan"]
    assert all(o.passed for o in report.examples)
    compiled = compile_ruleset(BASE)
    try:
        assert compiled.warnings == ()
    finally:
        compiled.close()


# ---------------------------------------------------------------- one mistake at a time


@dataclass(frozen=True)
class Case:
    name: str
    changes: tuple[tuple[str, str], ...]
    code: str
    path: str
    marker: str  # where the offending node starts in the changed text
    severity: Severity = Severity.ERROR
    also: frozenset[str] = frozenset()  # other error codes this mistake may also cause

    def __str__(self) -> str:
        return self.name


def case(name: str, old: str, new: str, code: str, path: str, marker: str, **kw: object) -> Case:
    return Case(name, ((old, new),), code, path, marker, **kw)  # type: ignore[arg-type]


TIERS = """\
    tiers:
      - {up_to: "50000", rate: "5%"}
      - {up_to: "100000", rate: "6%"}
      - {rate: "8%"}
"""
STEPS = """\
    steps:
      - {from: "1.00", amount: "500"}
      - {from: "1.20", rate: "1%", of: net_gmv}
"""
WARNING = "- {id: gmv_behind, "

CASES = [
    # document and top level
    case("unknown currency", "currency: USD", "currency: XYZ", "currency.unknown", "currency", "XYZ"),
    case("currency without minor unit", "currency: USD", "currency: XAU", "currency.unknown", "currency", "XAU"),
    case("currency as a number", "currency: USD", "currency: 840", "currency.unknown", "currency", "840"),
    case("impossible date", "effective_from: 2026-01-01", "effective_from: 2026-02-30", "date.invalid", "effective_from", "2026-02-30"),
    case("period", "period: month", "period: week", "value.invalid", "period", "week"),
    case("rounding", "rounding: half_up", "rounding: bankers", "value.invalid", "rounding", "bankers"),
    case("ruleset id", "ruleset: demo", "ruleset: Demo Store", "name.invalid", "ruleset", "Demo Store"),
    case("ruleset id not text", "ruleset: demo", "ruleset: [demo]", "type.text", "ruleset", "[demo]"),
    case("ruleset id too long", "ruleset: demo", "ruleset: " + "d" * 2001, "limit.text", "ruleset", "d" * 2001),
    case("unknown top-level key", "title: Demo store terms", "title: Demo store terms\ntitel: typo", "key.unknown", "titel", "titel: typo"),
    case(
        "unknown key in a fee",
        "    mode: graduated\n",
        "    mode: graduated\n    colour: blue\n",
        "key.unknown",
        "fees[1].colour",
        "colour: blue",
    ),
    case(
        "section of the wrong type",
        "  orders: {type: count}",
        "  orders: count",
        "type.mapping",
        "metrics.orders",
        "orders: §count",
        also=frozenset({"key.missing"}),
    ),
    case(
        "missing metric type",
        "  orders: {type: count}",
        "  orders: {definition: Orders}",
        "key.missing",
        "metrics.orders",
        "{definition: Orders}",
    ),
    case("missing fee kind", "    kind: fixed\n", "", "key.missing", "fees[0]", "id: base_fee"),
    case("list expected", "exempt_by: [stockout]", "exempt_by: stockout", "type.list", "fees[3].exempt_by", "exempt_by: §stockout"),
    case(
        "too many entries",
        "multiply: [base_fee, commission]",
        "multiply: [" + ", ".join(["base_fee"] * 201) + "]",
        "limit.items",
        "multiply",
        "multiply: §[",
    ),
    # metrics and params
    case("metric type", "ad_spend: {type: money}", "ad_spend: {type: currency}", "value.invalid", "metrics.ad_spend.type", "currency}"),
    case(
        "count default not whole",
        'stockout_days: {type: count, default: "0"}',
        'stockout_days: {type: count, default: "1.5"}',
        "number.count",
        "metrics.stockout_days.default",
        '"1.5"',
    ),
    case(
        "count default negative",
        'stockout_days: {type: count, default: "0"}',
        'stockout_days: {type: count, default: "-2"}',
        "number.count",
        "metrics.stockout_days.default",
        '"-2"',
    ),
    case("target not boolean", "target: true}", 'target: "yes"}', "type.boolean", "params.gmv_target.target", '"yes"'),
    case(
        "count as a target",
        "params:\n",
        "params:\n  visits: {type: count, target: true}\n",
        "param.target_count",
        "params.visits.target",
        "count, target: §true",
    ),
    # names
    case(
        "invalid metric name",
        "metrics:\n",
        "metrics:\n  Sessions: {type: count}\n",
        "name.invalid",
        "metrics.Sessions",
        "§Sessions: {type: count}",
    ),
    case("invalid fee id", "- id: odr_penalty", "- id: ODR-penalty", "name.invalid", "fees[4].id", "ODR-penalty"),
    case(
        "reserved metric name",
        "metrics:\n",
        "metrics:\n  market: {type: number}\n",
        "name.reserved",
        "metrics.market",
        "§market: {type: number}",
    ),
    case("reserved fee id", "- id: odr_penalty", "- id: total_floor", "name.reserved", "fees[4].id", "total_floor"),
    case(
        "name used in two sections",
        "params:\n",
        "params:\n  acos: {type: ratio}\n",
        "name.duplicate",
        "kpis.acos",
        '§acos: {formula: "ad_spend',
    ),
    case(
        "warning id equal to a fee id", "{id: gmv_behind", "{id: odr_penalty", "name.duplicate", "warnings[0].id", "{id: §odr_penalty, when"
    ),
    # expressions and scopes
    case(
        "unknown name",
        '"gross_gmv - refunds"',
        '"gross_gmv - refundz"',
        "expr.unknown_name",
        "kpis.net_gmv.formula",
        '"gross_gmv - refundz"',
    ),
    case(
        "later KPI",
        '"gross_gmv - refunds"',
        '"gross_gmv - refunds + acos * 0"',
        "kpi.later_reference",
        "kpis.net_gmv.formula",
        '"gross_gmv - refunds + acos',
    ),
    case(
        "later fee",
        "amount: monthly_fee",
        'amount: "monthly_fee + commission * 0"',
        "fee.later_reference",
        "fees[0].amount",
        '"monthly_fee + commission',
    ),
    case("fee refers to itself", "amount: monthly_fee", 'amount: "base_fee"', "fee.later_reference", "fees[0].amount", '"base_fee"'),
    case(
        "fee line in a penalty condition",
        '"acos > 28%"',
        '"acos > 28% and base_fee > 0"',
        "expr.fee_in_condition",
        "fees[3].when",
        '"acos > 28% and base_fee',
    ),
    case(
        "fee line in a KPI",
        '"ad_spend / ad_sales"',
        '"ad_spend / ad_sales + base_fee"',
        "expr.fee_in_condition",
        "kpis.acos.formula",
        '"ad_spend / ad_sales + base_fee"',
    ),
    case(
        "fee line in steps_on",
        "steps_on: attainment",
        "steps_on: base_fee",
        "expr.fee_in_condition",
        "fees[2].steps_on",
        "steps_on: §base_fee",
    ),
    case(
        "fee line in a warning",
        '"attainment < 0.85"',
        '"commission < 0.85"',
        "expr.fee_in_condition",
        "warnings[0].when",
        '"commission < 0.85"',
    ),
    case(
        "KPI in an exemption",
        '"stockout_days >= 7"',
        '"stockout_days >= 7 and acos > 0"',
        "expr.out_of_scope",
        "exemptions.stockout.when",
        '"stockout_days >= 7 and',
    ),
    case(
        "warning used in a KPI",
        '"ad_spend / ad_sales"',
        '"ad_spend / ad_sales + gmv_behind"',
        "expr.warning_reference",
        "kpis.acos.formula",
        '"ad_spend / ad_sales + gmv_behind"',
    ),
    case("condition that is a number", '"acos > 28%"', '"acos"', "expr.type", "fees[3].when", '"acos"'),
    case("expression that is a list", 'when: "acos > 28%"', "when: [acos > 28%]", "expr.not_text", "fees[3].when", "[acos > 28%]"),
    case("empty expression", "amount: monthly_fee", 'amount: " "', "expr.empty", "fees[0].amount", 'amount: §" "'),
    # fees
    case("fee kind", "kind: fixed", "kind: flat", "value.invalid", "fees[0].kind", "flat"),
    case("tier mode", "mode: graduated", "mode: stepped", "value.invalid", "fees[1].mode", "stepped"),
    case(
        "prorate",
        "amount: monthly_fee\n",
        "amount: monthly_fee\n    prorate: period_days\n",
        "value.invalid",
        "fees[0].prorate",
        "prorate: §period_days",
    ),
    case("rate not a number", 'rate: "10%"', 'rate: "ten percent"', "number.invalid", "fees[3].rate", '"ten percent"'),
    case(
        "penalty exempted by an undefined exemption",
        "exempt_by: [stockout]",
        "exempt_by: [stockout, holiday]",
        "penalty.unknown_exemption",
        "fees[3].exempt_by[1]",
        "holiday",
    ),
    case("payout missing", '    amount: "300"\n', "", "payout.shape", "fees[4]", "- §id: odr_penalty"),
    case(
        "payout twice",
        '    amount: "300"\n',
        '    amount: "300"\n    rate: "1%"\n    of: base_fee\n',
        "payout.shape",
        "fees[4]",
        "- §id: odr_penalty",
    ),
    case("rate without of", '    amount: "300"\n', '    rate: "1%"\n', "payout.shape", "fees[4]", "- §id: odr_penalty"),
    case(
        "tiers not increasing",
        '{up_to: "100000", rate: "6%"}',
        '{up_to: "45000", rate: "6%"}',
        "tiers.not_increasing",
        "fees[1].tiers[1].up_to",
        '"45000"',
    ),
    case(
        "tier ending at zero",
        '{up_to: "50000", rate: "5%"}',
        '{up_to: "0", rate: "5%"}',
        "tiers.not_increasing",
        "fees[1].tiers[0].up_to",
        'up_to: §"0"',
    ),
    case("closed last tier", '{rate: "8%"}', '{up_to: "500000", rate: "8%"}', "tiers.last_closed", "fees[1].tiers[2].up_to", '"500000"'),
    case(
        "open tier not last", '{up_to: "50000", rate: "5%"}', '{rate: "5%"}', "tiers.open_not_last", "fees[1].tiers[0]", '- §{rate: "5%"}'
    ),
    case("no tiers", TIERS, "    tiers: []\n", "tiers.empty", "fees[1].tiers", "tiers: §[]"),
    case("tier that is not a mapping", '- {rate: "8%"}', '- "8%"', "type.mapping", "fees[1].tiers[2]", '- §"8%"'),
    case("steps not increasing", '{from: "1.20"', '{from: "0.90"', "steps.not_increasing", "fees[2].steps[1].from", '"0.90"'),
    case("no steps", STEPS, "    steps: []\n", "steps.empty", "fees[2].steps", "steps: §[]"),
    # markets, multiply, caps
    case(
        "market code",
        '  JP: {multiplier: "1.20"}\n',
        '  JP: {multiplier: "1.20"}\n  Japan: {multiplier: "1"}\n',
        "market.invalid",
        "markets.Japan",
        '§Japan: {multiplier: "1"}',
    ),
    case(
        "negative multiplier", 'JP: {multiplier: "1.20"}', 'JP: {multiplier: "-1.20"}', "number.range", "markets.JP.multiplier", '"-1.20"'
    ),
    case(
        "no markets",
        'markets:\n  US: {multiplier: "1.00"}\n  JP: {multiplier: "1.20"}\n',
        "markets: {}\n",
        "markets.empty",
        "markets",
        "markets: §{}",
    ),
    case(
        "multiply an unknown fee",
        "multiply: [base_fee, commission]",
        "multiply: [base_fee, comission]",
        "multiply.unknown_fee",
        "multiply[1]",
        "comission",
    ),
    case(
        "multiply a metric",
        "multiply: [base_fee, commission]",
        "multiply: [base_fee, orders]",
        "multiply.unknown_fee",
        "multiply[1]",
        "base_fee, §orders]",
    ),
    case(
        "penalty cap shape",
        'penalties: {max_rate: "30%", of: base_fee}',
        'penalties: {max_rate: "30%"}',
        "cap.shape",
        "caps.penalties",
        'penalties: §{max_rate: "30%"}',
    ),
    case(
        "floor above cap",
        'total: {min: "1000"}',
        'total: {min: "1000", max: "500"}',
        "cap.inverted",
        "caps.total",
        'total: §{min: "1000", max',
    ),
    case(
        "floor in fractions of a cent",
        'total: {min: "1000"}',
        'total: {min: "1000.005"}',
        "money.minor_units",
        "caps.total.min",
        '"1000.005"',
    ),
    case("negative cap rate", 'max_rate: "30%"', 'max_rate: "-30%"', "number.range", "caps.penalties.max_rate", '"-30%"'),
    case("unknown name in a cap", "of: base_fee}", "of: base_fees}", "expr.unknown_name", "caps.penalties.of", "base_fees"),
    # the matcher's limits, as the validator reports them
    case(
        "literal beyond 2^53 when scaled",
        '"acos > 28%"',
        '"acos > 12345678901234567.12345678"',
        "rule.literal_out_of_range",
        "fees[3].when",
        '"acos > 1234',
    ),
    case(
        "rule too complex",
        '"acos > 28%"',
        '"' + " or ".join(f"acos > {i}" for i in range(33)) + '"',
        "rule.too_complex",
        "fees[3].when",
        '"acos > 0 or',
    ),
    # warnings (the ruleset stays valid)
    case(
        "tier gap",
        '{up_to: "100000", rate: "6%"}',
        '{from: "60000", up_to: "100000", rate: "6%"}',
        "tiers.gap",
        "fees[1].tiers[1].from",
        '"60000"',
        severity=Severity.WARNING,
    ),
    case(
        "tier overlap",
        '{up_to: "100000", rate: "6%"}',
        '{from: "45000", up_to: "100000", rate: "6%"}',
        "tiers.overlap",
        "fees[1].tiers[1].from",
        '"45000"',
        severity=Severity.WARNING,
    ),
    case(
        "two steps from the same value",
        '{from: "1.20"',
        '{from: "1.00"',
        "steps.unreachable",
        "fees[2].steps[1].from",
        'from: §"1.00", rate',
        severity=Severity.WARNING,
    ),
    case(
        "unused metric",
        "metrics:\n",
        "metrics:\n  sessions: {type: count}\n",
        "metric.unused",
        "metrics.sessions",
        "sessions: §{type: count}",
        severity=Severity.WARNING,
    ),
    case(
        "unused param",
        "params:\n",
        "params:\n  bonus_pool: {type: money}\n",
        "param.unused",
        "params.bonus_pool",
        "bonus_pool: §{type",
        severity=Severity.WARNING,
    ),
    case(
        "unused KPI",
        "kpis:\n",
        'kpis:\n  spare: {formula: "orders * 2"}\n',
        "kpi.unused",
        "kpis.spare",
        'spare: §{formula: "orders',
        severity=Severity.WARNING,
    ),
    case(
        "penalty that always holds", '"odr >= 0.5%"', '"1 < 2"', "rule.always_fires", "fees[4].when", '"1 < 2"', severity=Severity.WARNING
    ),
    case(
        "penalty that is literally true",
        '"odr >= 0.5%"',
        '"true"',
        "rule.always_fires",
        "fees[4].when",
        '"true"',
        severity=Severity.WARNING,
    ),
    case(
        "or true",
        '"odr >= 0.5%"',
        '"odr >= 0.5% or true"',
        "rule.always_fires",
        "fees[4].when",
        '"odr >= 0.5% or true"',
        severity=Severity.WARNING,
    ),
    case(
        "warning that can never fire: count below 0",
        '"attainment < 0.85"',
        '"orders < 0"',
        "rule.never_fires",
        "warnings[0].when",
        '"orders < 0"',
        severity=Severity.WARNING,
    ),
    case(
        "warning that can never fire: empty range",
        '"attainment < 0.85"',
        '"acos > 0.5 and acos < 0.2"',
        "rule.never_fires",
        "warnings[0].when",
        '"acos > 0.5 and',
        severity=Severity.WARNING,
    ),
    case(
        "penalty that can never fire: constant",
        '"odr >= 0.5%"',
        '"not true"',
        "rule.never_fires",
        "fees[4].when",
        '"not true"',
        severity=Severity.WARNING,
    ),
    case(
        "exemption that can never apply",
        '"stockout_days >= 7"',
        '"stockout_days < 0"',
        "rule.never_fires",
        "exemptions.stockout.when",
        '"stockout_days < 0"',
        severity=Severity.WARNING,
    ),
    Case(
        "step beyond the days of any period",
        (("steps_on: attainment", "steps_on: active_days"), ('{from: "1.20"', '{from: "150"')),
        "steps.unreachable",
        "fees[2].steps[1].from",
        '"150"',
        severity=Severity.WARNING,
    ),
]


@pytest.mark.parametrize("c", CASES, ids=str)
def test_each_mistake_is_reported_with_code_path_and_position(c: Case) -> None:
    text = edit(BASE, *c.changes)
    report = validate_ruleset(text)
    problem = only(report, c.code, c.path)
    assert (problem.line, problem.column) == at(text, c.marker), str(problem)
    assert problem.severity is c.severity
    assert problem.message.strip()
    assert str(problem).startswith(f"{problem.line}:{problem.column}: {c.severity.value} {c.code}: ")
    if c.severity is Severity.WARNING:
        assert report.valid, [str(p) for p in report.errors]
        assert errors_of(report) == []
    else:
        assert not report.valid
        others = {code for code, path in errors_of(report) if (code, path) != (c.code, c.path)}
        assert others <= c.also, [str(p) for p in report.errors]
        with pytest.raises(RulesetInvalid) as raised:
            compile_ruleset(text)
        assert located(problem) in [located(p) for p in raised.value.problems]


def engine_problem_codes() -> set[str]:
    """Every problem code the engine can report about a ruleset, read from its source."""
    makers = {"report", "warn", "ExpressionError", "MatcherLimitError", "Problem", "_fail", "bad"}
    codes: set[str] = set()
    for path in Path(engine.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple) and len(node.elts) == 2:  # scope checks return (code, message)
                first = node.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str) and re.fullmatch(r"[a-z_]+\.[a-z_]+", first.value):
                    codes.add(first.value)
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in makers:
                continue
            for arg in node.args[:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.fullmatch(r"[a-z_]+\.[a-z_]+", arg.value):
                    codes.add(arg.value)
    codes |= {"metric.unused", "param.unused", "kpi.unused"}  # f"{section}.unused"
    return {c for c in codes if not c.startswith("request.")} - {"kpi.division_by_zero", "expr.division_by_zero"}


def test_every_ruleset_problem_code_of_the_engine_has_a_test() -> None:
    """A new code in engine/ must come with a test that produces it (here or in test_hostile.py)."""
    codes = engine_problem_codes()
    assert {"currency.unknown", "tiers.gap", "source.too_deep", "expr.too_long"} <= codes  # the scan works
    here = Path(__file__).read_text(encoding="utf-8")
    hostile = (Path(__file__).parent / "test_hostile.py").read_text(encoding="utf-8")
    missing = sorted(c for c in codes if f'"{c}"' not in here and f'"{c}"' not in hostile)
    assert missing == []


def test_a_tier_from_that_matches_the_tier_below_is_no_gap_nor_overlap() -> None:
    text = edit(BASE, ('{up_to: "100000", rate: "6%"}', '{from: "50000", up_to: "100000", rate: "6%"}'))
    report = validate_ruleset(text)
    assert report.problems == ()
    assert report.examples_pass


def test_minor_units_follow_the_currency() -> None:
    # JPY has no minor unit: a floor of 1000.5 yen is refused, 1000 yen is fine.
    text = edit(BASE, ("currency: USD", "currency: JPY"), ('total: {min: "1000"}', 'total: {min: "1000.5"}'))
    report = validate_ruleset(text)
    problem = only(report, "money.minor_units", "caps.total.min")
    assert (problem.line, problem.column) == at(text, '"1000.5"')
    assert "0 decimals" in problem.message


def test_a_key_that_is_not_plain_text_reads_one_way_in_its_path() -> None:
    # Found by the long fuzz run: a text starting "0[# …: …" is a mapping whose first key is
    # "0[# …"; written bare, its path could not be told from an index or a nested key.
    text = "0[# notes: x\n" + BASE
    report = validate_ruleset(text)
    problem = only(report, "key.unknown", '["0[# notes"]')
    assert (problem.line, problem.column) == (1, 1)
    text = edit(BASE, ("currency: USD", 'currency: USD\n"a.b": 1'))
    problem = only(report := validate_ruleset(text), "key.unknown", '["a.b"]')
    assert (problem.line, problem.column) == at(text, '"a.b"')
    assert not report.valid


# ---------------------------------------------------------------- all problems at once


def test_five_independent_mistakes_are_all_reported_at_once() -> None:
    text = edit(
        BASE,
        ("currency: USD", "currency: XYZ"),
        ('"gross_gmv - refunds"', '"gross_gmv - refundz"'),
        ('{up_to: "100000", rate: "6%"}', '{up_to: "45000", rate: "6%"}'),
        ("exempt_by: [stockout]", "exempt_by: [holiday]"),
        ('JP: {multiplier: "1.20"}', 'JP: {multiplier: "NaN"}'),
    )
    expected = [
        ("currency.unknown", "currency", *at(text, "XYZ")),
        ("expr.unknown_name", "kpis.net_gmv.formula", *at(text, '"gross_gmv - refundz"')),
        ("tiers.not_increasing", "fees[1].tiers[1].up_to", *at(text, '"45000"')),
        ("penalty.unknown_exemption", "fees[3].exempt_by[0]", *at(text, "holiday")),
        ("number.invalid", "markets.JP.multiplier", *at(text, '"NaN"')),
    ]
    report = validate_ruleset(text)
    assert sorted(located(p) for p in report.errors) == sorted(expected)
    assert report.examples == ()  # an invalid ruleset runs no examples
    with pytest.raises(RulesetInvalid) as raised:
        compile_ruleset(text)
    assert sorted(located(p) for p in raised.value.problems if p.severity is Severity.ERROR) == sorted(expected)
    for problem in expected:
        assert problem[0] in str(raised.value) or "more" in str(raised.value)


def test_a_broken_expression_does_not_make_the_names_it_uses_look_unused() -> None:
    """`gross_gmv - refundz` uses gross_gmv and refunds: only the unknown name is a problem."""
    text = edit(BASE, ('"gross_gmv - refunds"', '"gross_gmv - refundz"'))
    report = validate_ruleset(text)
    assert [(p.code, p.path) for p in report.problems] == [("expr.unknown_name", "kpis.net_gmv.formula")]


def test_many_mistakes_in_every_section_are_all_reported() -> None:
    text = edit(
        BASE,
        ("period: month", "period: fortnight"),
        ("  orders: {type: count}", "  orders: {type: integer}"),
        ('monthly_fee: {type: money, default: "3000"}', 'monthly_fee: {type: money, default: "3,000"}'),
        ('"stockout_days >= 7"', '"stockout_day >= 7"'),
        ('{rate: "8%"}', '{up_to: "1000000", rate: "8%"}'),
        ('{from: "1.20"', '{from: "0.5"'),
        ('"odr >= 0.5%"', '"odr >= 0.5% and commission > 0"'),
        ("multiply: [base_fee, commission]", "multiply: [base_fee, comission]"),
        ('total: {min: "1000"}', 'total: {min: "1000.001"}'),
        ('"attainment < 0.85"', '"attainment < 0.85 and market == 1"'),
    )
    report = validate_ruleset(text)
    assert sorted(errors_of(report)) == sorted(
        [
            ("value.invalid", "period"),
            ("value.invalid", "metrics.orders.type"),
            ("number.invalid", "params.monthly_fee.default"),
            ("expr.unknown_name", "exemptions.stockout.when"),
            ("tiers.last_closed", "fees[1].tiers[2].up_to"),
            ("steps.not_increasing", "fees[2].steps[1].from"),
            ("expr.fee_in_condition", "fees[4].when"),
            ("multiply.unknown_fee", "multiply[1]"),
            ("money.minor_units", "caps.total.min"),
            ("expr.type", "warnings[0].when"),
        ]
    )
    for problem in report.errors:
        assert problem.line > 0 and problem.column > 0, str(problem)


# ---------------------------------------------------------------- KPI order and cycles


def test_a_kpi_cycle_is_reported_on_every_kpi_in_it() -> None:
    text = edit(BASE, ('"gross_gmv - refunds"', '"gross_gmv - refunds + attainment * 0"'))
    report = validate_ruleset(text)
    cycles = [p for p in report.errors if p.code == "kpi.cycle"]
    assert sorted(p.path for p in cycles) == ["kpis.attainment.formula", "kpis.net_gmv.formula"]
    net = only(report, "kpi.cycle", "kpis.net_gmv.formula")
    assert (net.line, net.column) == at(text, '"gross_gmv - refunds + attainment')
    assert "net_gmv → attainment → net_gmv" in net.message
    attainment = only(report, "kpi.cycle", "kpis.attainment.formula")
    assert (attainment.line, attainment.column) == at(text, '"net_gmv / gmv_target"')
    assert "attainment → net_gmv → attainment" in attainment.message
    # the forward reference itself is also named
    assert ("kpi.later_reference", "kpis.net_gmv.formula") in errors_of(report)
    assert {code for code, _ in errors_of(report)} == {"kpi.cycle", "kpi.later_reference"}


def test_two_kpis_referring_to_each_other_directly() -> None:
    text = edit(BASE, ("kpis:\n", 'kpis:\n  a: {formula: "b + 1"}\n  b: {formula: "a + 1"}\n'))
    report = validate_ruleset(text)
    assert sorted(p.path for p in report.errors if p.code == "kpi.cycle") == ["kpis.a.formula", "kpis.b.formula"]
    assert "a → b → a" in only(report, "kpi.cycle", "kpis.a.formula").message


def test_a_kpi_referring_to_itself() -> None:
    text = edit(BASE, ('"gross_gmv - refunds"', '"gross_gmv - refunds + net_gmv"'))
    report = validate_ruleset(text)
    assert "net_gmv → net_gmv" in only(report, "kpi.cycle", "kpis.net_gmv.formula").message


def test_a_later_kpi_without_a_cycle_is_only_a_later_reference() -> None:
    text = edit(BASE, ('"gross_gmv - refunds"', '"gross_gmv - refunds + odr * 0"'))
    report = validate_ruleset(text)
    assert errors_of(report) == [("kpi.later_reference", "kpis.net_gmv.formula")]
    assert "'odr'" in report.errors[0].message


def test_an_earlier_kpi_an_earlier_fee_and_any_fee_in_a_cap_are_fine() -> None:
    text = edit(
        BASE,
        ('amount: "300"', 'amount: "min(300, base_fee + commission * 0)"'),
        ("of: base_fee}", 'of: "base_fee + odr_penalty * 0"}'),
    )
    report = validate_ruleset(text)
    assert errors_of(report) == []
    assert report.examples_pass


# ---------------------------------------------------------------- examples


def test_a_failing_example_names_expected_and_actual_and_the_ruleset_stays_valid() -> None:
    text = edit(BASE, ('total: "11750.00"', 'total: "11000.00"'), ('commission: "7500.00"', 'commission: "7400"'))
    report = validate_ruleset(text)
    assert report.valid
    assert not report.examples_pass
    total = only(report, "example.failed", "examples[0].expect.total")
    assert (total.line, total.column) == at(text, '"11000.00"')
    assert "expected 11000.00" in total.message and "got 11750.00" in total.message
    assert "stretch target" in total.message
    commission = only(report, "example.failed", "examples[0].expect.lines.commission")
    assert (commission.line, commission.column) == at(text, '"7400"')
    assert "expected 7400" in commission.message and "got 7500.00" in commission.message
    assert [o.passed for o in report.examples] == [False, True]
    first = report.examples[0]
    assert {(m.field, m.expected, m.actual) for m in first.mismatches} == {
        ("total", "11000.00", "11750.00"),
        ("lines.commission", "7400", "7500.00"),
    }
    # compiling does not run examples: the version can be stored as a draft
    compiled = compile_ruleset(text)
    compiled.close()


def test_an_example_expecting_a_warning_that_is_not_raised() -> None:
    text = edit(BASE, ("      warnings: []\n", "      warnings: [gmv_behind]\n"))
    report = validate_ruleset(text)
    problem = only(report, "example.failed", "examples[0].expect.warnings")
    assert "expected ['gmv_behind']" in problem.message and "got []" in problem.message
    assert report.valid and not report.examples_pass


def test_an_example_naming_a_line_that_does_not_exist() -> None:
    text = edit(BASE, ('lines: {commission: "7500.00", gmv_bonus', 'lines: {comission: "7500.00", gmv_bonus'))
    report = validate_ruleset(text)
    problem = only(report, "example.failed", "examples[0].expect.lines.comission")
    assert "(no such line)" in problem.message


def test_an_example_whose_request_is_refused() -> None:
    text = edit(BASE, ("    market: JP\n", "    market: BR\n"))
    report = validate_ruleset(text)
    problem = only(report, "example.failed", "examples[1]")
    assert (problem.line, problem.column) == at(text, "- §name: penalties in Japan")
    assert "request.market" in problem.message
    assert report.valid and not report.examples_pass
    assert report.examples[1].decision is None


def test_an_example_with_a_bad_metric_value() -> None:
    text = edit(BASE, ('orders: "100"', 'orders: "-100"'))
    report = validate_ruleset(text)
    problem = only(report, "example.failed", "examples[1]")
    assert "request.count" in problem.message and "metrics.orders" in problem.message


def test_an_example_without_expect_is_a_validation_error() -> None:
    text = edit(BASE, ('      total: "5400.00"\n', ""))
    report = validate_ruleset(text)
    assert errors_of(report) == [("key.missing", "examples[1].expect")]


# ---------------------------------------------------------------- warnings about dead rules


def test_a_step_on_a_count_below_zero_is_never_the_highest_step() -> None:
    """orders >= 0 always holds, so the step from -5 is always overtaken by the step from 0."""
    text = edit(
        BASE,
        ("steps_on: attainment", "steps_on: orders"),
        ('{from: "1.00", amount: "500"}', '{from: "-5", amount: "500"}'),
        ('{from: "1.20", rate: "1%", of: net_gmv}', '{from: "0", rate: "1%", of: net_gmv}'),
    )
    report = validate_ruleset(text)
    assert report.valid
    problem = only(report, "steps.unreachable", "fees[2].steps[0].from")
    assert problem.severity is Severity.WARNING
    assert (problem.line, problem.column) == at(text, '"-5"')


def test_a_condition_that_can_hold_draws_no_warning() -> None:
    text = edit(BASE, ('"attainment < 0.85"', '"acos > 0.5 or acos < 0.2"'))
    report = validate_ruleset(text)
    assert report.valid
    assert report.warnings == []


def test_a_ruleset_with_only_warnings_compiles_and_keeps_them() -> None:
    text = edit(BASE, ("metrics:\n", "metrics:\n  sessions: {type: count}\n"), ('"attainment < 0.85"', '"orders < 0"'))
    compiled = compile_ruleset(text)
    try:
        assert sorted((p.code, p.path) for p in compiled.warnings) == [
            ("metric.unused", "metrics.sessions"),
            ("rule.never_fires", "warnings[0].when"),
        ]
        assert all(p.severity is Severity.WARNING for p in compiled.warnings)
    finally:
        compiled.close()


# ---------------------------------------------------------------- YAML syntax


@pytest.mark.parametrize(
    ("text", "code", "line", "column"),
    [
        ("ruleset: demo\n  currency: USD\n", "source.syntax", 2, 11),
        ("ruleset: [demo\ncurrency: USD\n", "source.syntax", 2, 9),
        ("ruleset: demo\nruleset: other\n", "source.duplicate_key", 2, 1),
        ("ruleset: demo\n? [a, b]\n: c\n", "source.bad_key", 2, 3),
        ("a: &x 1\nb: *y\n", "source.syntax", 2, 4),
        ("\t- a\n", "source.syntax", 1, 1),
    ],
)
def test_yaml_syntax_errors_are_positioned(text: str, code: str, line: int, column: int) -> None:
    report = validate_ruleset(text)
    assert [(p.code, p.line, p.column) for p in report.problems] == [(code, line, column)]
    assert not report.valid and report.ruleset_id is None
    with pytest.raises(RulesetInvalid) as raised:
        compile_ruleset(text)
    assert [p.code for p in raised.value.problems] == [code]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_an_empty_document(text: str) -> None:
    report = validate_ruleset(text)
    assert [p.code for p in report.problems] == ["source.empty"]


@pytest.mark.parametrize(("text", "kind"), [("hello", "'hello'"), ("- a\n- b\n", "a list"), ("42", "'42'"), ("~", "nothing")])
def test_a_document_that_is_not_a_mapping(text: str, kind: str) -> None:
    report = validate_ruleset(text)
    assert [(p.code, p.path, p.line, p.column) for p in report.problems] == [("type.mapping", "", 1, 1)]
    assert kind in report.problems[0].message


# ---------------------------------------------------------------- JSON rulesets


def as_json(yaml_text: str) -> dict[str, object]:
    data = load_source(yaml_text).data
    assert isinstance(data, dict)
    return data


def test_a_json_ruleset_validates_like_its_yaml() -> None:
    text = json.dumps(as_json(BASE), indent=2, ensure_ascii=False)
    report = validate_ruleset(text)
    assert report.problems == ()
    assert report.examples_pass
    assert report.content_hash == validate_ruleset(BASE).content_hash  # layout does not matter


def test_json_mistakes_are_positioned_in_the_json_text() -> None:
    data = as_json(BASE)
    data["currency"] = "XYZ"
    data["fees"][1]["tiers"][1]["up_to"] = "45000"  # type: ignore[index]
    data["fees"][3]["exempt_by"] = ["holiday"]  # type: ignore[index]
    data["kpis"]["net_gmv"]["formula"] = "gross_gmv - refundz"  # type: ignore[index]
    data["markets"]["JP"]["multiplier"] = "1e3"  # type: ignore[index]
    text = json.dumps(data, indent=2, ensure_ascii=False)
    report = validate_ruleset(text)
    assert sorted(located(p) for p in report.errors) == sorted(
        [
            ("currency.unknown", "currency", *at(text, '"XYZ"')),
            ("expr.unknown_name", "kpis.net_gmv.formula", *at(text, '"gross_gmv - refundz"')),
            ("tiers.not_increasing", "fees[1].tiers[1].up_to", *at(text, '"45000"')),
            ("penalty.unknown_exemption", "fees[3].exempt_by[0]", *at(text, '"holiday"')),
            ("number.invalid", "markets.JP.multiplier", *at(text, '"1e3"')),
        ]
    )


def test_json_numbers_are_read_as_the_exact_text_written() -> None:
    text = json.dumps(as_json(BASE), indent=2, ensure_ascii=False)
    text = edit(text, ('"up_to": "50000"', '"up_to": 50000.00'), ('"rate": "6%"', '"rate": 0.06'), ('"max_rate": "30%"', '"max_rate": 0.3'))
    report = validate_ruleset(text)
    assert report.problems == ()
    assert report.examples_pass
    decision = report.examples[0].decision
    assert decision is not None and decision.line("commission").amount == Decimal("7500.00")


@pytest.mark.parametrize(("number", "code"), [("1e3", "number.invalid"), ("1E-2", "number.invalid"), ("-0.5", "number.range")])
def test_json_exponent_numbers_are_refused(number: str, code: str) -> None:
    text = json.dumps(as_json(BASE), indent=2, ensure_ascii=False)
    text = edit(text, ('"multiplier": "1.20"', f'"multiplier": {number}'))
    report = validate_ruleset(text)
    assert [located(p) for p in report.errors] == [(code, "markets.JP.multiplier", *at(text, number))]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('{\n  "ruleset": "demo",\n  "fees": [1, 2,]\n}', 3, 17),
        ('{\n  "ruleset": "demo"\n  "currency": "USD"\n}', 3, 3),
        ('{\n  "ruleset": "demo",\n  "currency": \n}', 4, 1),
        ('{"ruleset": "demo", "currency": "USD"', 1, 38),
    ],
)
def test_json_syntax_errors_give_line_and_column(text: str, line: int, column: int) -> None:
    report = validate_ruleset(text)
    assert [(p.code, p.line, p.column) for p in report.problems] == [("source.syntax", line, column)]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_refused_with_a_position(constant: str) -> None:
    text = json.dumps(as_json(BASE), indent=2, ensure_ascii=False)
    text = edit(text, ('"multiplier": "1.20"', f'"multiplier": {constant}'))
    report = validate_ruleset(text)
    assert not report.valid
    assert len(report.errors) == 1
    problem = report.errors[0]
    assert problem.code in ("source.syntax", "number.invalid")
    assert (problem.line, problem.column) == at(text, constant), str(problem)


def test_json_duplicate_keys_are_refused() -> None:
    report = validate_ruleset('{"ruleset": "demo",\n "ruleset": "other"}')
    assert [(p.code, p.path, p.line) for p in report.problems] == [("source.duplicate_key", "ruleset", 2)]


# ---------------------------------------------------------------- the expression language

EXPR = """\
ruleset: expr
effective_from: 2026-01-01
currency: USD
metrics:
  x: {type: number}
  y: {type: number}
  n: {type: count}
exemptions:
  flag: {when: "n > 100"}
kpis:
  k: {formula: FORMULA}
fees:
  - {id: line, kind: fixed, amount: k}
markets:
  US: {multiplier: "1"}
  JP: {multiplier: "1"}
warnings:
  - {id: w, when: CONDITION, message: probe}
"""


def expr_ruleset(formula: str = "x", condition: str = "x > 0") -> str:
    return EXPR.replace("FORMULA", json.dumps(formula)).replace("CONDITION", json.dumps(condition))


def settle_probe(text: str, market: str = "US", x: str = "0", y: str = "0", n: str = "0") -> tuple[Decimal, bool]:
    compiled = compile_ruleset(text)
    try:
        request = request_from_mapping({"market": market, "metrics": {"x": x, "y": y, "n": n}}, MARCH)
        decision = compiled.settle(request)
    finally:
        compiled.close()
    return dict(decision.kpis)["k"], any(w.id == "w" for w in decision.warnings)


def evaluate(formula: str, **metrics: str) -> Decimal:
    return settle_probe(expr_ruleset(formula=formula), **metrics)[0]


def holds(condition: str, **metrics: str) -> bool:
    return settle_probe(expr_ruleset(condition=condition), **metrics)[1]


@pytest.mark.parametrize(
    ("formula", "value"),
    [
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("10 - 4 - 3", "3"),
        ("24 / 4 / 2", "3"),
        ("2 * 3 / 4 * 2", "3"),
        ("-2 * 3", "-6"),
        ("2 * -3", "-6"),
        ("- -2", "2"),
        ("-(2 + 3) * 2", "-10"),
        ("+2", "2"),
        ("28%", "0.28"),
        ("28 %", "0.28"),
        ("50% * 200", "100"),
        ("12.5% * x", "1"),
        ("0.1 + 0.2", "0.3"),
        ("1 / 3", "0.3333333333333333333333333333333333"),
        ("min(3, 1, 2)", "1"),
        ("max(1, 2.5, x)", "8"),
        ("min(x)", "8"),
        ("abs(-4)", "4"),
        ("abs(y - x)", "11"),
        ("max(min(x, y), 0) + abs(y)", "3"),
        ("x * y - x / 4", "-26"),
        ("(x)", "8"),
        ("((((x))))", "8"),
        ("999999999999999999 * 999999999999999999 / 999999999999999999", "999999999999999999"),
        ("0.0000000001 * 0.0000000001", "1E-20"),
    ],
)
def test_arithmetic_precedence_percentages_and_functions(formula: str, value: str) -> None:
    assert evaluate(formula, x="8", y="-3") == Decimal(value)


@pytest.mark.parametrize(
    ("condition", "market", "expected"),
    [
        ("market == 'JP'", "JP", True),
        ("market == 'JP'", "US", False),
        ('market == "JP"', "JP", True),
        ("market != 'JP'", "US", True),
        ("'JP' == market", "JP", True),
        ("market == 'BR'", "JP", False),  # a market the ruleset does not list
        ("not x > 1", "US", False),  # not binds looser than a comparison
        ("not (x > 1)", "US", False),
        ("not not (x > 1)", "US", True),
        ("x > 1 or y > 1 and n > 1", "US", True),  # and binds tighter than or
        ("(x > 1 or y > 1) and n > 1", "US", False),
        ("x > 1 and not flag", "US", True),
        ("flag or x > 100", "US", False),
        ("x == 8", "US", True),
        ("x == 8.0", "US", True),
        ("x != 8", "US", False),
        ("x >= 8 and x <= 8", "US", True),
        ("x > 8", "US", False),
        ("x / 3 > 2.6666666666", "US", True),
        ("x / 3 < 2.6666666667", "US", True),
        ("x * 35% == 2.8", "US", True),
        ("abs(y) == 3 and min(x, y) < 0", "US", True),
        ("y < -2.5", "US", True),
        ("-y > 2.5", "US", True),
        ("x - y > 10", "US", True),
        ("x > y + 11", "US", False),
        ("true", "US", True),
        ("false or x > 1", "US", True),
    ],
)
def test_conditions_decide_like_exact_decimals(condition: str, market: str, expected: bool) -> None:
    assert holds(condition, market=market, x="8", y="-3", n="0") is expected


def test_comparison_at_the_boundary_is_exact() -> None:
    assert holds("x > 28%", x="0.28") is False
    assert holds("x >= 28%", x="0.28") is True
    assert holds("x > 28%", x="0.2800000001") is True
    assert holds("x < 28%", x="0.2799999999") is True
    assert holds("x == 0.1 + 0.2", x="0.3") is True


def expr_problem(formula: str | None = None, condition: str | None = None) -> tuple[Problem, str]:
    text = expr_ruleset(formula="y + 0" if formula is None else formula, condition="y > -1" if condition is None else condition)
    report = validate_ruleset(text)
    path = "kpis.k.formula" if formula is not None else "warnings[0].when"
    expression_errors = [p for p in report.errors if p.path == path]
    assert len(expression_errors) == 1, [str(p) for p in report.problems]
    problem = expression_errors[0]
    assert (problem.line, problem.column) == at(text, json.dumps(formula if formula is not None else condition))
    assert not report.valid
    return problem, text


@pytest.mark.parametrize(
    ("formula", "code"),
    [
        # Python-isms
        ("__import__('os')", "expr.unknown_function"),
        ("__import__('os').system('true')", "expr.syntax"),
        ("open('/etc/passwd')", "expr.unknown_function"),
        ("eval('1')", "expr.unknown_function"),
        ("exec('1')", "expr.unknown_function"),
        ("getattr(x, 'real')", "expr.unknown_function"),
        ("pow(x, 2)", "expr.unknown_function"),
        ("round(x)", "expr.unknown_function"),
        ("x.real", "expr.syntax"),
        ("x.__class__", "expr.syntax"),
        ("x.__class__.__mro__", "expr.syntax"),
        ("1 if x else 2", "expr.syntax"),
        ("x if y > 0 else y", "expr.syntax"),
        ("lambda: 1", "expr.syntax"),
        ("lambda z: z", "expr.syntax"),
        ("x ** 2", "expr.syntax"),
        ("x // 2", "expr.syntax"),
        ("x % 2", "expr.syntax"),
        ("x[0]", "expr.syntax"),
        ("[x, y]", "expr.syntax"),
        ("{x: y}", "expr.syntax"),
        ("x is y", "expr.syntax"),
        ("x in y", "expr.syntax"),
        ("x; y", "expr.syntax"),
        ("x = 1", "expr.syntax"),
        ("x := 1", "expr.syntax"),
        ("f'{x}'", "expr.syntax"),
        ("`x`", "expr.syntax"),
        ("x & y", "expr.syntax"),
        ("x | y", "expr.syntax"),
        ("~x", "expr.syntax"),
        ("x @ y", "expr.syntax"),
        # numbers
        ("1e5", "expr.syntax"),
        ("0x10", "expr.syntax"),
        ("1_000", "expr.syntax"),
        (".5", "expr.syntax"),
        ("5.", "expr.syntax"),
        ("1,000", "expr.syntax"),
        ("1234567890123456789", "expr.bad_number"),
        ("0.12345678901", "expr.bad_number"),
        # structure
        ("(x", "expr.syntax"),
        ("x)", "expr.syntax"),
        ("x +", "expr.syntax"),
        ("x y", "expr.syntax"),
        ("min()", "expr.syntax"),
        ("min(x,)", "expr.syntax"),
        ("abs(x, y)", "expr.arity"),
        ("abs()", "expr.syntax"),
        ("and", "expr.syntax"),
        ("x and", "expr.syntax"),
        ("", "expr.empty"),
        ("   ", "expr.empty"),
        # names and types
        ("z + 1", "expr.unknown_name"),
        ("__builtins__", "expr.unknown_name"),
        ("X", "expr.unknown_name"),
        ("x + (y > 1)", "expr.type"),
        ("x + flag", "expr.type"),
        ("x > 1", "expr.type"),
        ("min(x, y > 1)", "expr.type"),
        ("abs(market)", "expr.type"),
        ("-market", "expr.type"),
        ("market", "expr.type"),
        ("'JP'", "expr.type"),
        ("true", "expr.type"),
        ("x + 'JP'", "expr.type"),
    ],
)
def test_formula_errors_are_clean_expression_errors(formula: str, code: str) -> None:
    problem, _ = expr_problem(formula=formula)
    assert problem.code == code, str(problem)
    assert problem.path == "kpis.k.formula"
    if formula.strip():
        assert repr(formula) in problem.message  # the message quotes the expression


@pytest.mark.parametrize(
    ("condition", "code"),
    [
        ("x", "expr.type"),
        ("not x", "expr.type"),
        ("x and y", "expr.type"),
        ("x > 1 and 1", "expr.type"),
        ("x > 1 or y", "expr.type"),
        ("x == true", "expr.type"),
        ("true == false", "expr.type"),
        ("flag == 1", "expr.type"),
        ("market > 'JP'", "expr.type"),
        ("market == 1", "expr.type"),
        ("x == 'JP'", "expr.type"),
        ("1 < x < 2", "expr.syntax"),
        ("x > 1 = 2", "expr.syntax"),
        ("x <> 1", "expr.syntax"),
        ("x > 1 && y > 1", "expr.syntax"),
        ("x > 1 || y > 1", "expr.syntax"),
        ("!flag", "expr.syntax"),
        ("x > 1 and not", "expr.syntax"),
        ("market == '" + "J" * 65 + "'", "expr.syntax"),  # string literals are short
        ("market == 'JP", "expr.syntax"),
        ("y > 1 if x else y < 1", "expr.syntax"),
    ],
)
def test_condition_errors_are_clean_expression_errors(condition: str, code: str) -> None:
    problem, _ = expr_problem(condition=condition)
    assert problem.code == code, str(problem)


def test_an_expression_error_names_the_character_where_it_is() -> None:
    problem, _ = expr_problem(formula="x * nope")
    assert problem.code == "expr.unknown_name"
    assert "'nope'" in problem.message and "at character 5" in problem.message
    problem, _ = expr_problem(formula="x + y ** 2")
    assert problem.code == "expr.syntax" and "at character 8" in problem.message
    problem, _ = expr_problem(formula="x.real")
    assert "'.'" in problem.message


def wide_min(length: int) -> str:
    """`min(x, 1, 1, …)` padded with spaces to exactly `length` characters; nesting depth 2."""
    body = "min(x" + ", 1" * ((length - 6) // 3) + ")"
    return body + " " * (length - len(body))


@pytest.mark.parametrize(
    ("formula", "code"),
    [
        (wide_min(1001), "expr.too_long"),
        ("x" + " " * 1000, "expr.too_long"),
        ("(" * 33 + "x" + ")" * 33, "expr.too_deep"),
        ("-" * 33 + "x", "expr.too_deep"),
        ("- " * 33 + "x", "expr.too_deep"),
        ("abs(" * 33 + "x" + ")" * 33, "expr.too_deep"),
        ("min(x, " * 33 + "x" + ")" * 33, "expr.too_deep"),
    ],
)
def test_expression_length_and_depth_limits(formula: str, code: str) -> None:
    problem, _ = expr_problem(formula=formula)
    assert problem.code == code, str(problem)
    assert str(len(formula)) in problem.message if code == "expr.too_long" else "32" in problem.message


def test_a_condition_nested_too_deep() -> None:
    problem, _ = expr_problem(condition="not " * 33 + "x > 1")
    assert problem.code == "expr.too_deep"
    problem, _ = expr_problem(condition="(" * 33 + "x > 1" + ")" * 33)
    assert problem.code == "expr.too_deep"


def test_expressions_just_inside_the_limits_are_accepted() -> None:
    assert len(wide_min(1000)) == 1000
    assert evaluate(wide_min(1000), x="0.5") == Decimal("0.5")
    assert evaluate("(" * 31 + "x" + ")" * 31, x="2") == Decimal(2)
    assert evaluate("-" * 31 + "x", x="2") == Decimal(-2)
    assert evaluate("abs(" * 31 + "x" + ")" * 31, x="-2") == Decimal(2)
    assert holds("not " * 29 + "x > 1", x="2") is False  # an odd number of `not`
    assert holds("not " * 30 + "x > 1", x="2") is True
