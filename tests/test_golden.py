"""Golden settlement cases: every construct of SPEC §3–§4, with amounts checked by hand.

Each expectation carries its arithmetic in a comment. Amounts are compared as exact
decimals (`Decimal` or their text), never as floats. Months used: February 2026 has 28
days, March 31, April 30.
"""

from __future__ import annotations

import datetime
import json
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal

import pytest

from engine import (
    ENGINE_VERSION,
    CompiledRuleset,
    Decision,
    FxRate,
    MoneyAmount,
    RequestInvalid,
    SettlementRequest,
    compile_ruleset,
)

D = Decimal
FEB = datetime.date(2026, 2, 1)  # 28 days
MARCH = datetime.date(2026, 3, 1)  # 31 days
APRIL = datetime.date(2026, 4, 1)  # 30 days

Compile = Callable[[str], CompiledRuleset]


# ------------------------------------------------------------------ helpers


def ruleset(
    fees: str,
    *,
    metrics: str = "",
    params: str = "",
    exemptions: str = "",
    kpis: str = "",
    warnings: str = "",
    caps: str = "",
    markets: str = 'US: {multiplier: "1.00"}',
    multiply: str = "",
    currency: str = "USD",
    period: str = "month",
    rounding: str = "half_up",
) -> str:
    """A minimal ruleset around the given sections (each written without indentation)."""

    def section(name: str, body: str) -> str:
        if not body.strip():
            return ""
        return f"{name}:\n{textwrap.indent(textwrap.dedent(body).strip(), '  ')}\n"

    text = (
        "ruleset: golden\n"
        "title: golden test\n"
        "effective_from: 2026-01-01\n"
        f"currency: {currency}\n"
        f"period: {period}\n"
        f"rounding: {rounding}\n"
        + section("metrics", metrics or "x: {type: number}")
        + section("params", params)
        + section("exemptions", exemptions)
        + section("kpis", kpis)
        + section("fees", fees)
        + section("markets", markets)
        + (f"multiply: {multiply}\n" if multiply else "")
        + section("caps", caps)
        + section("warnings", warnings)
    )
    return text


@pytest.fixture
def build() -> Iterator[Compile]:
    """compile_ruleset that closes everything it compiled when the test ends."""
    compiled: list[CompiledRuleset] = []

    def make(text: str) -> CompiledRuleset:
        result = compile_ruleset(text)
        compiled.append(result)
        return result

    yield make
    for item in compiled:
        item.close()


def settle(
    compiled: CompiledRuleset,
    metrics: Mapping[str, object] | None = None,
    params: Mapping[str, object] | None = None,
    *,
    market: str = "US",
    period_start: datetime.date = MARCH,
    active_days: int | None = None,
    fx_rates: Sequence[FxRate] = (),
) -> Decision:
    request = SettlementRequest(
        market=market,
        period_start=period_start,
        metrics=dict(metrics or {}),  # type: ignore[arg-type]
        params=dict(params or {}),  # type: ignore[arg-type]
        active_days=active_days,
        fx_rates=tuple(fx_rates),
    )
    return compiled.settle(request)


def amounts(decision: Decision) -> dict[str, str]:
    """Line id -> rounded amount as text (the exponent matters: "0.13", "1235")."""
    return {line.id: str(line.amount) for line in decision.lines}


def fired(decision: Decision) -> set[str]:
    return {r.rule for r in decision.rules if r.fired}


def evidence(decision: Decision, rule: str) -> str:
    return next(r.evidence for r in decision.rules if r.rule == rule)


def problem_set(exc: pytest.ExceptionInfo[RequestInvalid]) -> set[tuple[str, str]]:
    return {(p.code, p.path) for p in exc.value.problems}


# ------------------------------------------------------------------ fixed and percentage fees

FIXED = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: "3000", prorate: active_days}
    - {id: flat, kind: fixed, amount: "3000"}
    """
)


@pytest.mark.parametrize(
    ("period_start", "active_days", "prorated"),
    [
        (MARCH, None, "3000.00"),  # active_days defaults to period_days: 3000 × 31/31
        (APRIL, 15, "1500.00"),  # 3000 × 15/30 = 1500
        (MARCH, 10, "967.74"),  # 3000 × 10/31 = 30000/31 = 967.7419… → 967.74
        (MARCH, 0, "0.00"),  # 3000 × 0/31
        (FEB, 7, "750.00"),  # 3000 × 7/28 = 750
        (MARCH, 31, "3000.00"),  # 3000 × 31/31
    ],
)
def test_fixed_fee_with_and_without_proration(build: Compile, period_start: datetime.date, active_days: int | None, prorated: str) -> None:
    decision = settle(build(FIXED), {"x": "0"}, period_start=period_start, active_days=active_days)
    assert amounts(decision) == {"base_fee": prorated, "flat": "3000.00"}  # flat: never prorated
    assert decision.line("flat").kind == "fixed"
    assert decision.total == D(prorated) + D("3000")


def test_prorated_fee_keeps_full_precision_until_rounding(build: Compile) -> None:
    decision = settle(build(FIXED), {"x": "0"}, active_days=10)
    exact = decision.line("base_fee").exact
    # 30000/31 = 967.74193548387096774193548387096774… (34 significant digits kept)
    assert exact.quantize(D("1e-25")) == D("967.7419354838709677419354839")
    assert decision.active_days == 10 and decision.period_days == 31


def test_percentage_fee(build: Compile) -> None:
    text = ruleset(
        "- {id: commission, kind: percentage, basis: gmv, rate: '2.5%'}",
        metrics="gmv: {type: money}",
    )
    decision = settle(build(text), {"gmv": "12345.67"})
    line = decision.line("commission")
    assert line.exact == D("308.64175")  # 12345.67 × 0.025 = 308.64175
    assert str(line.amount) == "308.64"  # 308.64175 → 308.64 (below the half)
    assert line.basis == D("12345.67") and line.rate == D("0.025")
    assert line.kind == "percentage"


# ------------------------------------------------------------------ tiered fees

TIERS = """
tiers:
  - {up_to: "1000", rate: "10%"}
  - {up_to: "5000", rate: "5%"}
  - {rate: "2%"}
"""


def tiered(mode: str) -> str:
    fee = f"- id: commission\n  kind: tiered\n  basis: gmv\n  mode: {mode}\n" + textwrap.indent(TIERS.strip(), "  ")
    return ruleset(fee, metrics="gmv: {type: money}")


@pytest.mark.parametrize(
    ("basis", "exact", "amount"),
    [
        ("0", "0", "0.00"),
        ("500", "50", "50.00"),  # first tier: 500 × 10% = 50
        ("999.99", "99.999", "100.00"),  # 999.99 × 10% = 99.999 → 100.00
        ("1000", "100", "100.00"),  # boundary: 1000 × 10% + 0 × 5% = 100
        ("1000.01", "100.0005", "100.00"),  # 100 + 0.01 × 5% = 100.0005
        ("3000", "200", "200.00"),  # 100 + 2000 × 5% = 200
        ("5000", "300", "300.00"),  # boundary: 100 + 4000 × 5% = 300
        ("5000.5", "300.01", "300.01"),  # 300 + 0.5 × 2% = 300.01
        ("7000", "340", "340.00"),  # last tier: 300 + 2000 × 2% = 340
        ("-50", "0", "0.00"),  # a negative basis earns 0
    ],
)
def test_tiered_graduated(build: Compile, basis: str, exact: str, amount: str) -> None:
    decision = settle(build(tiered("graduated")), {"gmv": basis})
    line = decision.line("commission")
    assert line.exact == D(exact)
    assert str(line.amount) == amount
    assert line.kind == "tiered"
    assert decision.total == D(amount)


@pytest.mark.parametrize(
    ("basis", "rate", "exact", "amount"),
    [
        ("500", "0.10", "50", "50.00"),  # 500 × 10%
        ("999.99", "0.10", "99.999", "100.00"),  # just below 1000: still 10%; 99.999 → 100.00
        ("1000", "0.05", "50", "50.00"),  # exactly up_to: the NEXT tier's rate, 1000 × 5%
        ("4999", "0.05", "249.95", "249.95"),  # 4999 × 5%
        ("5000", "0.02", "100", "100.00"),  # exactly up_to: 5000 × 2%
        ("7000", "0.02", "140", "140.00"),  # last tier: 7000 × 2%
    ],
)
def test_tiered_volume(build: Compile, basis: str, rate: str, exact: str, amount: str) -> None:
    decision = settle(build(tiered("volume")), {"gmv": basis})
    line = decision.line("commission")
    assert line.rate == D(rate)
    assert line.exact == D(exact)
    assert str(line.amount) == amount


@pytest.mark.parametrize("basis", ["-50", "0"])
def test_tiered_volume_non_positive_basis_earns_zero(build: Compile, basis: str) -> None:
    decision = settle(build(tiered("volume")), {"gmv": basis})
    line = decision.line("commission")
    assert line.exact == 0 and str(line.amount) == "0.00"  # never a negative commission
    assert decision.total == 0


# ------------------------------------------------------------------ bonuses

STEPS = ruleset(
    """
    - id: gmv_bonus
      kind: bonus
      steps_on: att
      steps:
        - {from: "1.00", amount: "500"}
        - {from: "1.20", rate: "1%", of: gmv}
        - {from: "1.50", amount: "2500"}
    """,
    metrics="gmv: {type: money}\natt: {type: ratio}",
)


@pytest.mark.parametrize(
    ("att", "reached", "amount"),
    [
        ("0.9999", set(), "0.00"),  # below the first step: a zero line
        ("1.00", {0}, "500.00"),  # exactly at a step's `from` reaches it
        ("1.1999", {0}, "500.00"),  # between steps: the step below
        ("1.20", {0, 1}, "1234.57"),  # 1% × 123456.78 = 1234.5678 → 1234.57
        ("1.4999", {0, 1}, "1234.57"),
        ("1.50", {0, 1, 2}, "2500.00"),  # highest step
        ("9", {0, 1, 2}, "2500.00"),
    ],
)
def test_bonus_steps(build: Compile, att: str, reached: set[int], amount: str) -> None:
    decision = settle(build(STEPS), {"gmv": "123456.78", "att": att})
    line = decision.line("gmv_bonus")
    assert str(line.amount) == amount
    assert line.kind == "bonus"
    assert fired(decision) == {f"gmv_bonus.steps[{i}]" for i in reached}
    assert {r.rule for r in decision.rules} == {f"gmv_bonus.steps[{i}]" for i in range(3)}  # every rule recorded
    assert all(r.kind == "bonus_step" for r in decision.rules)


def test_bonus_step_with_rate_of_records_basis_and_rate(build: Compile) -> None:
    decision = settle(build(STEPS), {"gmv": "123456.78", "att": "1.20"})
    line = decision.line("gmv_bonus")
    assert line.basis == D("123456.78") and line.rate == D("0.01")
    assert line.exact == D("1234.5678")  # 123456.78 × 0.01
    assert evidence(decision, "gmv_bonus.steps[1]") == "att 1.2000 >= 1.2000"
    assert evidence(decision, "gmv_bonus.steps[2]") == "att 1.2000 >= 1.5000"


CONDITIONAL = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: "3000"}
    - {id: low_acos_bonus, kind: bonus, when: "acos < 15% and att >= 0.9", amount: "200"}
    - {id: share_bonus, kind: bonus, when: "acos < 15%", rate: "2%", of: base_fee}
    """,
    metrics="acos: {type: ratio}\natt: {type: ratio}",
)


@pytest.mark.parametrize(
    ("acos", "att", "low_acos", "share"),
    [
        ("0.1499", "0.9", "200.00", "60.00"),  # both hold; share: 3000 × 2% = 60
        ("0.15", "0.9", "0.00", "0.00"),  # acos exactly 15% is not below 15%
        ("0.10", "0.8999", "0.00", "60.00"),  # att just below 0.9
        ("15%", "1", "0.00", "0.00"),  # a ratio metric may be sent as a percentage
    ],
)
def test_conditional_bonus(build: Compile, acos: str, att: str, low_acos: str, share: str) -> None:
    decision = settle(build(CONDITIONAL), {"acos": acos, "att": att})
    assert amounts(decision) == {"base_fee": "3000.00", "low_acos_bonus": low_acos, "share_bonus": share}
    assert ("low_acos_bonus" in fired(decision)) == (low_acos != "0.00")
    assert decision.total == D("3000") + D(low_acos) + D(share)


def test_conditional_bonus_evidence(build: Compile) -> None:
    decision = settle(build(CONDITIONAL), {"acos": "0.1499", "att": "0.9"})
    assert evidence(decision, "low_acos_bonus") == "acos 0.1499 < 0.1500 and att 0.9000 >= 0.9000"
    share = decision.line("share_bonus")
    assert share.basis == D("3000") and share.rate == D("0.02")


# ------------------------------------------------------------------ penalties and exemptions

PENALTIES = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: "10.005"}
    - {id: odr_penalty, kind: penalty, when: "odr >= 0.5%", amount: "300"}
    - {id: acos_penalty, kind: penalty, when: "acos > 28%", rate: "50%", of: base_fee, exempt_by: [stockout, review]}
    """,
    metrics="""
    odr: {type: ratio}
    acos: {type: ratio}
    stockout_days: {type: count, default: "0"}
    review_days: {type: count, default: "0"}
    """,
    exemptions="""
    stockout: {when: "stockout_days >= 7"}
    review: {when: "review_days > 0"}
    """,
)


def test_penalty_with_amount(build: Compile) -> None:
    compiled = build(PENALTIES)
    hit = settle(compiled, {"odr": "0.005", "acos": "0"})  # odr exactly 0.5% → fires
    assert str(hit.line("odr_penalty").amount) == "-300.00"
    assert hit.line("odr_penalty").kind == "penalty"
    assert evidence(hit, "odr_penalty") == "odr 0.0050 >= 0.0050"
    miss = settle(compiled, {"odr": "0.0049", "acos": "0"})
    assert str(miss.line("odr_penalty").amount) == "0.00" and "odr_penalty" not in fired(miss)
    # 10.005 → 10.01 (half_up); 10.01 - 300 = -289.99
    assert hit.total == D("-289.99") and miss.total == D("10.01")


def test_penalty_rate_of_an_earlier_fee_uses_its_exact_value(build: Compile) -> None:
    decision = settle(build(PENALTIES), {"odr": "0", "acos": "0.2801"})
    line = decision.line("acos_penalty")
    # 50% of the base_fee line as computed in step 7 (10.005, not the rounded 10.01):
    # -(10.005 × 0.5) = -5.0025 → -5.00   (50% of 10.01 would be -5.005 → -5.01)
    assert line.exact == D("-5.0025")
    assert str(line.amount) == "-5.00"
    assert line.basis == D("10.005") and line.rate == D("0.5")
    assert line.waived_by == ()
    assert decision.total == D("5.01")  # 10.01 + 0 - 5.00


def test_waived_penalty_names_the_exemption(build: Compile) -> None:
    decision = settle(build(PENALTIES), {"odr": "0", "acos": "0.31", "stockout_days": "7"})
    line = decision.line("acos_penalty")
    assert line.amount == 0 and line.exact == 0
    assert line.waived_by == ("stockout",)
    assert "acos_penalty" in fired(decision)  # the condition held; the exemption waived it
    assert evidence(decision, "acos_penalty") == "acos 0.3100 > 0.2800"
    outcomes = {e.name: e for e in decision.exemptions}
    assert outcomes["stockout"].applied and not outcomes["review"].applied
    assert outcomes["stockout"].evidence == "stockout_days 7 >= 7"
    assert decision.total == D("10.01")


def test_exemption_just_missed_does_not_waive(build: Compile) -> None:
    decision = settle(build(PENALTIES), {"odr": "0", "acos": "0.31", "stockout_days": "6"})
    line = decision.line("acos_penalty")
    assert line.waived_by == ()
    assert line.exact == D("-5.0025")  # -(10.005 × 50%)
    assert not decision.exemptions[0].applied
    assert decision.exemptions[0].evidence == "stockout_days 6 >= 7"


def test_waived_by_names_only_the_applied_exemptions(build: Compile) -> None:
    decision = settle(build(PENALTIES), {"odr": "0", "acos": "0.31", "review_days": "1"})
    assert decision.line("acos_penalty").waived_by == ("review",)
    both = settle(build(PENALTIES), {"odr": "0", "acos": "0.31", "review_days": "1", "stockout_days": "9"})
    assert both.line("acos_penalty").waived_by == ("stockout", "review")


def test_penalty_whose_condition_is_false_is_zero_and_not_waived(build: Compile) -> None:
    # the stockout exemption applies, but acos 0.28 does not exceed 28%
    decision = settle(build(PENALTIES), {"odr": "0", "acos": "0.28", "stockout_days": "10"})
    line = decision.line("acos_penalty")
    assert line.amount == 0 and line.waived_by == ()
    assert "acos_penalty" not in fired(decision)
    assert decision.exemptions[0].applied


def test_every_fee_always_produces_a_line_in_order(build: Compile) -> None:
    decision = settle(build(PENALTIES), {"odr": "0", "acos": "0"})
    assert [ln.id for ln in decision.lines] == ["base_fee", "odr_penalty", "acos_penalty"]
    assert amounts(decision) == {"base_fee": "10.01", "odr_penalty": "0.00", "acos_penalty": "0.00"}


# ------------------------------------------------------------------ comparison operators at the boundary

OPERATORS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def operator_ruleset(metric: str, threshold: str, metric_type: str = "number") -> str:
    fees = "\n".join(f'- {{id: {name}, kind: penalty, when: "{metric} {op} {threshold}", amount: "1"}}' for name, op in OPERATORS.items())
    return ruleset(fees, metrics=f"{metric}: {{type: {metric_type}}}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.2799999999", {"lt", "le", "ne"}),  # one 10th-decimal step below
        ("0.28", {"le", "ge", "eq"}),  # exactly at the threshold
        ("0.2800000001", {"gt", "ge", "ne"}),  # one 10th-decimal step above
        ("0.2799", {"lt", "le", "ne"}),
        ("0.2801", {"gt", "ge", "ne"}),
        ("0.280000", {"le", "ge", "eq"}),  # the same number written with more zeros
    ],
)
def test_every_operator_at_and_around_a_percentage_threshold(build: Compile, value: str, expected: set[str]) -> None:
    decision = settle(build(operator_ruleset("acos", "28%")), {"acos": value})
    assert fired(decision) == expected
    # every penalty that fires costs 1.00
    assert decision.total == -len(expected)
    assert {ln.id for ln in decision.lines if ln.amount == D("-1")} == expected


def test_evidence_at_the_threshold(build: Compile) -> None:
    decision = settle(build(operator_ruleset("acos", "28%")), {"acos": "0.28"})
    assert {r.rule: r.evidence for r in decision.rules} == {name: f"acos 0.2800 {op} 0.2800" for name, op in OPERATORS.items()}
    assert {r.rule: r.fired for r in decision.rules} == {
        "lt": False,
        "le": True,
        "gt": False,
        "ge": True,
        "eq": True,
        "ne": False,
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("6", {"lt", "le", "ne"}),
        ("7", {"le", "ge", "eq"}),
        ("8", {"gt", "ge", "ne"}),
    ],
)
def test_every_operator_on_a_count(build: Compile, value: str, expected: set[str]) -> None:
    decision = settle(build(operator_ruleset("days", "7", "count")), {"days": value})
    assert fired(decision) == expected
    assert evidence(decision, "ge") == f"days {value} >= 7"  # whole numbers shown without decimals


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-0.5001", {"lt", "le", "ne"}),
        ("-0.5", {"le", "ge", "eq"}),
        ("-0.4999", {"gt", "ge", "ne"}),
    ],
)
def test_every_operator_at_a_negative_threshold(build: Compile, value: str, expected: set[str]) -> None:
    decision = settle(build(operator_ruleset("growth", "-0.5")), {"growth": value})
    assert fired(decision) == expected


@pytest.mark.parametrize(
    ("when", "value", "fires"),
    [
        ("28% < acos", "0.28", False),  # the literal on the left: mirrored, same decision
        ("28% <= acos", "0.28", True),
        ("28% > acos", "0.2799999999", True),
        ("not (acos > 28%)", "0.28", True),
        ("not (acos >= 28%)", "0.28", False),
        ("acos > limit", "0.28", False),  # two names: acos - limit > 0
        ("acos >= limit", "0.28", True),
        ("acos > limit", "0.2800000001", True),
    ],
)
def test_mirrored_negated_and_two_sided_comparisons(build: Compile, when: str, value: str, fires: bool) -> None:
    text = ruleset(
        f'- {{id: pen, kind: penalty, when: "{when}", amount: "1"}}',
        metrics="acos: {type: ratio}\nlimit: {type: ratio}",
    )
    decision = settle(build(text), {"acos": value, "limit": "0.28"})
    assert ("pen" in fired(decision)) is fires
    assert decision.total == (D("-1") if fires else D("0"))


@pytest.mark.parametrize(
    ("ad_spend", "ad_sales"),
    [
        ("0.07", "0.25"),  # 0.07 / 0.25 = 0.28 (in binary floating point this one happens to round to 0.28 too)
        ("0.21", "0.75"),  # 0.28 exactly; binary floating point gives 0.27999999999999997
        ("0.35", "1.25"),  # 0.28 exactly; binary floating point gives 0.27999999999999997
        ("1.96", "7"),  # 0.28 exactly; binary floating point gives 0.27999999999999997
    ],
)
def test_decimal_not_binary_floating_point_decides_acos(build: Compile, ad_spend: str, ad_sales: str) -> None:
    text = ruleset(
        """
        - {id: over, kind: penalty, when: "acos > 28%", amount: "100"}
        - {id: at_least, kind: penalty, when: "acos >= 28%", amount: "10"}
        - {id: equal, kind: penalty, when: "acos == 0.28", amount: "1"}
        """,
        metrics="ad_spend: {type: money}\nad_sales: {type: money}",
        kpis="acos: {formula: ad_spend / ad_sales}",
    )
    decision = settle(build(text), {"ad_spend": ad_spend, "ad_sales": ad_sales})
    assert dict(decision.kpis)["acos"] == D("0.28")  # exactly, in decimal
    assert fired(decision) == {"at_least", "equal"}
    assert evidence(decision, "over") == "acos 0.2800 > 0.2800"
    assert decision.total == D("-11.00")  # -10 - 1


def test_decimal_not_binary_floating_point_decides_a_sum(build: Compile) -> None:
    assert 0.1 + 0.2 != 0.3  # premise: 0.30000000000000004 in binary floating point
    assert 0.21 / 0.75 < 0.28  # and the other side: 0.27999999999999997
    text = ruleset(
        """
        - {id: eq, kind: bonus, when: "s == 0.3", amount: "1"}
        - {id: gt, kind: bonus, when: "s > 0.3", amount: "10"}
        - {id: ne, kind: bonus, when: "s != 0.3", amount: "100"}
        - {id: le, kind: bonus, when: "a + b <= 0.3", amount: "1000"}
        """,
        metrics="a: {type: number}\nb: {type: number}",
        kpis="s: {formula: a + b}",
    )
    decision = settle(build(text), {"a": "0.1", "b": "0.2"})
    assert dict(decision.kpis)["s"] == D("0.3")
    assert fired(decision) == {"eq", "le"}
    assert decision.total == D("1001.00")  # 1 + 1000


# ------------------------------------------------------------------ rounding


@pytest.mark.parametrize(
    ("rounding", "currency", "amount", "fee", "penalty"),
    [
        ("half_up", "USD", "0.125", "0.13", "-0.13"),  # ties away from zero, both signs
        ("half_up", "USD", "0.135", "0.14", "-0.14"),
        ("half_up", "USD", "0.1249999999", "0.12", "-0.12"),  # not a tie
        ("half_even", "USD", "0.125", "0.12", "-0.12"),  # ties to the even cent
        ("half_even", "USD", "0.135", "0.14", "-0.14"),
        ("half_even", "USD", "0.1250000001", "0.13", "-0.13"),  # above the tie
        ("half_up", "EUR", "2.675", "2.68", "-2.68"),  # 2.675 is 2.67499999… as a float
        ("half_up", "JPY", "1234.5", "1235", "-1235"),  # JPY has 0 minor units
        ("half_even", "JPY", "1234.5", "1234", "-1234"),
        ("half_even", "JPY", "1235.5", "1236", "-1236"),
        ("half_up", "JPY", "0.5", "1", "-1"),
        ("half_even", "JPY", "0.5", "0", "0"),  # no negative zero
    ],
)
def test_rounding_ties(build: Compile, rounding: str, currency: str, amount: str, fee: str, penalty: str) -> None:
    text = ruleset(
        f"""
        - {{id: fee, kind: fixed, amount: "{amount}"}}
        - {{id: pen, kind: penalty, when: "x > 0", amount: "{amount}"}}
        """,
        currency=currency,
        rounding=rounding,
    )
    decision = settle(build(text), {"x": "1"})
    assert str(decision.line("fee").amount) == fee
    assert json.loads(decision.to_canonical_json())["lines"][1]["amount"] == penalty
    assert decision.line("pen").amount == D(penalty)
    assert decision.total == D(fee) + D(penalty) == 0


@pytest.mark.parametrize(
    ("rounding", "amount", "line", "total"),
    [
        # three lines of 0.005: each 0.01 (half_up) → total 0.03; the exact sum 0.015 would give 0.02
        ("half_up", "0.005", "0.01", "0.03"),
        # three lines of 1.004: each 1.00 → 3.00; the exact sum 3.012 would give 3.01
        ("half_up", "1.004", "1.00", "3.00"),
        # three lines of 0.015: each 0.02 (half_even) → 0.06; the exact sum 0.045 would give 0.04
        ("half_even", "0.015", "0.02", "0.06"),
    ],
)
def test_total_is_the_sum_of_rounded_lines(build: Compile, rounding: str, amount: str, line: str, total: str) -> None:
    text = ruleset(
        "\n".join(f'- {{id: f{i}, kind: fixed, amount: "{amount}"}}' for i in range(3)),
        rounding=rounding,
    )
    decision = settle(build(text), {"x": "0"})
    assert amounts(decision) == {"f0": line, "f1": line, "f2": line}
    assert str(decision.total) == total
    assert decision.total == sum((ln.amount for ln in decision.lines), D(0))


def test_jpy_total_has_no_minor_units(build: Compile) -> None:
    text = ruleset(
        """
        - {id: commission, kind: percentage, basis: gmv, rate: "3.5%"}
        - {id: base_fee, kind: fixed, amount: "50000"}
        """,
        metrics="gmv: {type: money}",
        currency="JPY",
        markets='JP: {multiplier: "1"}',
    )
    decision = settle(build(text), {"gmv": "1234567"}, market="JP")
    # 1234567 × 3.5% = 43209.845 → 43210; + 50000 = 93210
    assert amounts(decision) == {"commission": "43210", "base_fee": "50000"}
    assert str(decision.total) == "93210"
    assert decision.currency == "JPY"


# ------------------------------------------------------------------ market multiplier

MARKETS = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: "1000"}
    - {id: commission, kind: percentage, basis: gmv, rate: "10%"}
    - {id: extra, kind: fixed, amount: "100"}
    """,
    metrics="gmv: {type: money}",
    markets="""
    US: {multiplier: "1.00"}
    JP: {multiplier: "1.20"}
    BR: {multiplier: "1.50"}
    EU: {multiplier: "0.90"}
    """,
    multiply="[base_fee, commission]",
)


def test_no_multiplier_line_when_the_multiplier_is_one(build: Compile) -> None:
    decision = settle(build(MARKETS), {"gmv": "1234.56"}, market="US")
    assert [ln.id for ln in decision.lines] == ["base_fee", "commission", "extra"]
    assert decision.total == D("1223.46")  # 1000 + 123.456→123.46 + 100


def test_market_multiplier_line(build: Compile) -> None:
    decision = settle(build(MARKETS), {"gmv": "1234.56"}, market="JP")
    line = decision.line("market_multiplier")
    assert line.kind == "adjustment"
    # listed lines: 1000 + 1234.56 × 10% = 1000 + 123.456 = 1123.456 (exact)
    assert line.basis == D("1123.456") and line.rate == D("0.2")
    assert line.exact == D("224.6912")  # (1.20 - 1) × 1123.456
    assert amounts(decision) == {"base_fee": "1000.00", "commission": "123.46", "extra": "100.00", "market_multiplier": "224.69"}
    assert decision.total == D("1448.15")  # 1000 + 123.46 + 100 + 224.69
    assert [ln.id for ln in decision.lines][-1] == "market_multiplier"


def test_market_multiplier_uses_exact_lines_before_rounding(build: Compile) -> None:
    decision = settle(build(MARKETS), {"gmv": "0.25"}, market="BR")
    # commission 0.25 × 10% = 0.025 → 0.03; multiplier (1.50 - 1) × (1000 + 0.025) = 500.0125 → 500.01
    # (on rounded lines it would be 0.5 × 1000.03 = 500.015 → 500.02)
    assert decision.line("market_multiplier").exact == D("500.0125")
    assert amounts(decision)["market_multiplier"] == "500.01"
    assert decision.total == D("1600.04")  # 1000 + 0.03 + 100 + 500.01


def test_market_multiplier_below_one_is_a_negative_adjustment(build: Compile) -> None:
    decision = settle(build(MARKETS), {"gmv": "1234.56"}, market="EU")
    # (0.90 - 1) × 1123.456 = -112.3456 → -112.35
    assert decision.line("market_multiplier").exact == D("-112.3456")
    assert amounts(decision)["market_multiplier"] == "-112.35"
    assert decision.total == D("1111.11")  # 1000 + 123.46 + 100 - 112.35


# ------------------------------------------------------------------ caps and floors

PENALTY_CAP = """
- {id: base_fee, kind: fixed, amount: "1000"}
- {id: p1, kind: penalty, when: "a > 0", amount: a}
- {id: p2, kind: penalty, when: "b > 0", amount: b}
"""


@pytest.mark.parametrize(
    ("a", "b", "cap_line", "total"),
    [
        ("100", "100", None, "800.00"),  # 200 ≤ cap 300 (30% × 1000): no line
        ("300", "0", None, "700.00"),  # exactly at the cap: no line
        ("250", "100", "50.00", "700.00"),  # 350 - 300 = 50 added back; 1000 - 350 + 50
        # rounded penalties: -150.005 → -150.01 twice = 300.02; the cap adds back 0.02
        # (the exact excess would be 0.01); 1000 - 150.01 - 150.01 + 0.02 = 700.00
        ("150.005", "150.005", "0.02", "700.00"),
    ],
)
def test_penalty_cap(build: Compile, a: str, b: str, cap_line: str | None, total: str) -> None:
    text = ruleset(
        PENALTY_CAP,
        metrics="a: {type: money}\nb: {type: money}",
        caps='penalties: {max_rate: "30%", of: base_fee}',
    )
    decision = settle(build(text), {"a": a, "b": b})
    lines = amounts(decision)
    assert lines.get("penalty_cap") == cap_line
    assert str(decision.total) == total
    if cap_line is not None:
        assert decision.line("penalty_cap").kind == "adjustment"
        net = D(lines["p1"]) + D(lines["p2"]) + D(lines["penalty_cap"])
        assert net == D("-300")  # penalties net of the cap equal the cap exactly


def test_penalty_cap_with_fixed_max(build: Compile) -> None:
    text = ruleset(PENALTY_CAP, metrics="a: {type: money}\nb: {type: money}", caps='penalties: {max: "250"}')
    decision = settle(build(text), {"a": "200", "b": "100"})
    # 300 > 250: adds back 50; 1000 - 200 - 100 + 50 = 750
    assert amounts(decision)["penalty_cap"] == "50.00"
    assert decision.total == D("750.00")


TOTAL_LIMITS = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: fee}
    """,
    metrics="fee: {type: money}",
    caps='total: {min: "1000", max: "2000"}',
)


@pytest.mark.parametrize(
    ("fee", "adjustment", "total"),
    [
        ("500", ("total_floor", "500.00"), "1000.00"),  # 1000 - 500 added
        ("999.994", ("total_floor", "0.01"), "1000.00"),  # 999.994 → 999.99; 1000 - 999.99
        ("999.995", None, "1000.00"),  # rounds to 1000.00: compared after rounding, no floor line
        ("1000", None, "1000.00"),  # exactly at the floor
        ("1500", None, "1500.00"),
        ("2000", None, "2000.00"),  # exactly at the cap
        ("2500.004", ("total_cap", "-500.00"), "2000.00"),  # 2500.004 → 2500.00; 2000 - 2500
        ("2000.005", ("total_cap", "-0.01"), "2000.00"),  # 2000.005 → 2000.01 (half_up); 2000 - 2000.01
    ],
)
def test_total_floor_and_cap(build: Compile, fee: str, adjustment: tuple[str, str] | None, total: str) -> None:
    decision = settle(build(TOTAL_LIMITS), {"fee": fee})
    extra = {k: v for k, v in amounts(decision).items() if k != "base_fee"}
    assert extra == (dict([adjustment]) if adjustment else {})
    assert str(decision.total) == total
    if adjustment:
        assert decision.line(adjustment[0]).kind == "adjustment"


def test_floor_applies_after_penalties_and_caps(build: Compile) -> None:
    text = ruleset(
        PENALTY_CAP,
        metrics="a: {type: money}\nb: {type: money}",
        caps='penalties: {max_rate: "30%", of: base_fee}\ntotal: {min: "800"}',
    )
    decision = settle(build(text), {"a": "250", "b": "100"})
    # 1000 - 250 - 100 = 650; cap adds 50 → 700; floor adds 100 → 800
    assert [ln.id for ln in decision.lines] == ["base_fee", "p1", "p2", "penalty_cap", "total_floor"]
    assert amounts(decision)["penalty_cap"] == "50.00"
    assert amounts(decision)["total_floor"] == "100.00"
    assert decision.total == D("800.00")


# ------------------------------------------------------------------ exemptions that prorate targets

PRORATION = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: monthly_fee}
    - id: gmv_bonus
      kind: bonus
      steps_on: att
      steps:
        - {from: "1.00", amount: "500"}
    """,
    metrics="""
    gmv: {type: money}
    review_days: {type: count, default: "0"}
    outage_days: {type: count, default: "0"}
    promo_days: {type: count, default: "0"}
    """,
    params="""
    gmv_target: {type: money, target: true}
    monthly_fee: {type: money, default: "1000"}
    """,
    exemptions="""
    review: {when: "review_days > 0", prorate_targets_by: review_days}
    outage: {when: "outage_days > 0", prorate_targets_by: outage_days}
    promo: {when: "promo_days > 0"}
    """,
    kpis='att: {formula: gmv / gmv_target, on_zero_division: "0"}',
)


@pytest.mark.parametrize(
    ("period_start", "days", "factor", "target", "bonus", "applied"),
    [
        # no exemption: att 80000/100000 = 0.8 → no step
        (APRIL, {}, "1", "100000", "0.00", set()),
        # (30-6)/30 = 0.8; target 100000 × 0.8 = 80000; att 80000/80000 = 1 → 500
        (APRIL, {"review_days": "6"}, "0.8", "80000", "500.00", {"review"}),
        # two prorating exemptions add their days: (30-(6+9))/30 = 0.5; target 50000; att 1.6 → 500
        (APRIL, {"review_days": "6", "outage_days": "9"}, "0.5", "50000", "500.00", {"review", "outage"}),
        # days capped to the period: 45 → 30; (30-30)/30 = 0; target 0; att on_zero_division 0
        (APRIL, {"review_days": "45"}, "0", "0", "0.00", {"review"}),
        # 20 + 20 = 40 capped to 30 → factor 0
        (APRIL, {"review_days": "20", "outage_days": "20"}, "0", "0", "0.00", {"review", "outage"}),
        # February: (28-7)/28 = 0.75; target 75000; att 80000/75000 = 1.0666… → 500
        (FEB, {"review_days": "7"}, "0.75", "75000", "500.00", {"review"}),
        # an applied exemption without prorate_targets_by scales nothing
        (APRIL, {"promo_days": "10"}, "1", "100000", "0.00", {"promo"}),
    ],
)
def test_exemption_prorates_targets(
    build: Compile,
    period_start: datetime.date,
    days: dict[str, str],
    factor: str,
    target: str,
    bonus: str,
    applied: set[str],
) -> None:
    decision = settle(build(PRORATION), {"gmv": "80000", **days}, {"gmv_target": "100000"}, period_start=period_start)
    assert decision.target_factor == D(factor)
    params = dict(decision.params)
    assert params["gmv_target"] == D(target)
    assert params["monthly_fee"] == D("1000")  # not a target: never scaled (and its default is used)
    assert amounts(decision)["gmv_bonus"] == bonus
    assert {e.name for e in decision.exemptions if e.applied} == applied


def test_proration_feb_worked_example(build: Compile) -> None:
    decision = settle(build(PRORATION), {"gmv": "75000", "review_days": "7"}, {"gmv_target": "100000"}, period_start=FEB)
    # factor (28 - 7)/28 = 0.75; target 100000 × 0.75 = 75000; att 75000/75000 = 1 → step 1.00 reached
    assert decision.target_factor == D("0.75")
    assert dict(decision.kpis)["att"] == D("1")
    assert amounts(decision) == {"base_fee": "1000.00", "gmv_bonus": "500.00"}
    assert decision.total == D("1500.00")


# ------------------------------------------------------------------ FX

FX = ruleset(
    "- {id: commission, kind: percentage, basis: gmv, rate: '10%'}",
    metrics="gmv: {type: money}\nrefunds: {type: money, default: '0'}",
    kpis="net: {formula: gmv - refunds}",
)
ECB = FxRate(base="EUR", quote="USD", rate="1.08", source="ECB", as_of="2026-03-31")


def test_fx_conversion_is_recorded(build: Compile) -> None:
    decision = settle(build(FX), {"gmv": MoneyAmount("1000", "EUR")}, fx_rates=[ECB])
    # 1000 EUR × 1.08 = 1080 USD; commission 1080 × 10% = 108
    assert decision.line("commission").basis == D("1080")
    assert amounts(decision)["commission"] == "108.00"
    (used,) = decision.fx_rates
    assert (used.metric, used.base, used.quote, used.source, used.as_of) == ("gmv", "EUR", "USD", "ECB", "2026-03-31")
    assert used.rate == D("1.08") and used.amount == D("1000") and used.converted == D("1080")
    (recorded,) = json.loads(decision.to_canonical_json())["fx_rates"]
    assert D(recorded.pop("converted")) == D("1080")  # 1080 or 1080.00: same exact value
    assert recorded == {
        "metric": "gmv",
        "base": "EUR",
        "quote": "USD",
        "rate": "1.08",
        "source": "ECB",
        "as_of": "2026-03-31",
        "amount": "1000",
    }


def test_fx_conversion_at_full_precision(build: Compile) -> None:
    rate = FxRate(base="EUR", quote="USD", rate="1.0837", source="ECB", as_of="2026-03-31")
    decision = settle(build(FX), {"gmv": MoneyAmount("1234.5678", "EUR")}, fx_rates=[rate])
    # 1234.5678 × 1.0837 = 1234.5678 + 98.765424 (×0.08) + 4.56790086 (×0.0037) = 1337.90112486
    assert decision.fx_rates[0].converted == D("1337.90112486")  # not rounded to cents
    assert decision.line("commission").basis == D("1337.90112486")
    assert decision.line("commission").exact == D("133.790112486")  # × 10%
    assert amounts(decision)["commission"] == "133.79"


def test_fx_amount_in_the_settlement_currency_needs_no_rate(build: Compile) -> None:
    decision = settle(build(FX), {"gmv": MoneyAmount("1000", "USD")})
    assert decision.fx_rates == ()
    assert amounts(decision)["commission"] == "100.00"


def test_fx_two_metrics_converted_before_the_kpi(build: Compile) -> None:
    decision = settle(
        build(FX),
        {"gmv": MoneyAmount("0.03", "EUR"), "refunds": MoneyAmount("0.01", "EUR")},
        fx_rates=[FxRate(base="EUR", quote="USD", rate="1.25")],
    )
    # 0.03 × 1.25 = 0.0375 and 0.01 × 1.25 = 0.0125, unrounded; net = 0.0375 - 0.0125 = 0.025
    # (converting to cents first would give 0.04 - 0.01 = 0.03)
    assert dict(decision.kpis)["net"] == D("0.025")
    assert [f.metric for f in decision.fx_rates] == ["gmv", "refunds"]


@pytest.mark.parametrize(
    "rates",
    [
        [],
        [FxRate(base="USD", quote="EUR", rate="0.92")],  # the reverse direction is not the rate asked for
        [FxRate(base="GBP", quote="USD", rate="1.27")],
    ],
)
def test_fx_missing_rate(build: Compile, rates: list[FxRate]) -> None:
    with pytest.raises(RequestInvalid) as exc:
        settle(build(FX), {"gmv": MoneyAmount("1000", "EUR")}, fx_rates=rates)
    assert problem_set(exc) == {("request.fx_missing", "metrics.gmv")}


# ------------------------------------------------------------------ periods

QUARTER = ruleset('- {id: base_fee, kind: fixed, amount: "9000", prorate: active_days}', period="quarter")


@pytest.mark.parametrize(
    ("start", "days", "end"),
    [
        (datetime.date(2026, 1, 1), 90, "2026-03-31"),  # 31 + 28 + 31
        (datetime.date(2026, 4, 1), 91, "2026-06-30"),  # 30 + 31 + 30
        (datetime.date(2026, 7, 1), 92, "2026-09-30"),  # 31 + 31 + 30
        (datetime.date(2026, 10, 1), 92, "2026-12-31"),  # 31 + 30 + 31
        (datetime.date(2024, 1, 1), 91, "2024-03-31"),  # leap year: 31 + 29 + 31
    ],
)
def test_quarter_periods(build: Compile, start: datetime.date, days: int, end: str) -> None:
    compiled = build(QUARTER)
    decision = settle(compiled, {"x": "0"}, period_start=start)
    assert (decision.period_days, decision.period_start, decision.period_end) == (days, start.isoformat(), end)
    assert decision.total == D("9000.00")  # all days active
    half = settle(compiled, {"x": "0"}, period_start=start, active_days=45)
    # 9000 × 45/days: 90 → 4500.00; 91 → 4450.549… → 4450.55; 92 → 4402.173… → 4402.17
    assert str(half.total) == {90: "4500.00", 91: "4450.55", 92: "4402.17"}[days]


@pytest.mark.parametrize(
    ("period", "start"),
    [
        ("month", datetime.date(2026, 3, 15)),
        ("month", datetime.date(2026, 3, 31)),
        ("quarter", datetime.date(2026, 2, 1)),  # first of a month, not of a quarter
        ("quarter", datetime.date(2026, 1, 2)),
    ],
)
def test_period_start_must_be_the_first_day_of_the_period(build: Compile, period: str, start: datetime.date) -> None:
    text = ruleset('- {id: base_fee, kind: fixed, amount: "1"}', period=period)
    with pytest.raises(RequestInvalid) as exc:
        settle(build(text), {"x": "0"}, period_start=start)
    assert problem_set(exc) == {("request.period", "period_start")}


@pytest.mark.parametrize(("start", "active_days"), [(MARCH, 32), (APRIL, 31), (FEB, 29), (MARCH, -1)])
def test_active_days_out_of_range(build: Compile, start: datetime.date, active_days: int) -> None:
    with pytest.raises(RequestInvalid) as exc:
        settle(build(FIXED), {"x": "0"}, period_start=start, active_days=active_days)
    assert problem_set(exc) == {("request.active_days", "active_days")}


def test_active_days_limits_follow_the_quarter(build: Compile) -> None:
    compiled = build(QUARTER)
    decision = settle(compiled, {"x": "0"}, period_start=datetime.date(2026, 7, 1), active_days=92)
    assert decision.total == D("9000.00")
    with pytest.raises(RequestInvalid) as exc:
        settle(compiled, {"x": "0"}, period_start=datetime.date(2026, 1, 1), active_days=91)
    assert problem_set(exc) == {("request.active_days", "active_days")}


# ------------------------------------------------------------------ request errors

REQUEST_CHECKS = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: "a + b + c + d + e + f + g + h + i + monthly_fee"}
    - {id: cnt, kind: penalty, when: "n1 + n2 > 0", amount: "1"}
    - {id: pct, kind: percentage, basis: gmv, rate: "1%"}
    """,
    metrics="""
    gmv: {type: money}
    a: {type: number}
    b: {type: number}
    c: {type: number}
    d: {type: number}
    e: {type: number}
    f: {type: number}
    g: {type: number}
    h: {type: number}
    i: {type: number, default: "4"}
    n1: {type: count}
    n2: {type: count}
    """,
    params="""
    monthly_fee: {type: money}
    """,
)


def test_every_request_problem_is_reported_at_once(build: Compile) -> None:
    request = SettlementRequest(
        market="XX",  # not listed
        period_start=MARCH,
        metrics={
            "bogus": "1",  # unknown metric
            # gmv missing
            "a": "abc",  # not decimal text
            "b": "1e5",  # exponent
            "c": "NaN",
            "d": "Infinity",
            "e": 1.5,  # a Python float  # type: ignore[dict-item]
            "f": "-Infinity",
            "g": "1.2.3",
            "h": "1,000",
            "n1": "-1",  # negative count
            "n2": "1.5",  # fractional count
        },
        params={},  # monthly_fee missing
        active_days=32,  # March has 31 days
    )
    with pytest.raises(RequestInvalid) as exc:
        build(REQUEST_CHECKS).settle(request)
    assert problem_set(exc) == {
        ("request.market", "market"),
        ("request.active_days", "active_days"),
        ("request.unknown_name", "metrics.bogus"),
        ("request.missing", "metrics.gmv"),
        ("request.missing", "params.monthly_fee"),
        ("request.number", "metrics.a"),
        ("request.number", "metrics.b"),
        ("request.number", "metrics.c"),
        ("request.number", "metrics.d"),
        ("request.number", "metrics.e"),
        ("request.number", "metrics.f"),
        ("request.number", "metrics.g"),
        ("request.number", "metrics.h"),
        ("request.count", "metrics.n1"),
        ("request.count", "metrics.n2"),
    }
    assert len(exc.value.problems) == 15  # each problem once


@pytest.mark.parametrize(
    "value",
    ["1e5", "1E5", "NaN", "nan", "Infinity", "inf", "-Infinity", "", " ", "0x10", "1_000", "12345678901234567890", "0.12345678901"],
)
def test_number_text_that_is_rejected(build: Compile, value: str) -> None:
    values = dict.fromkeys("abcdefgh", "0") | {"gmv": "0", "n1": "0", "n2": "0", "a": value}
    with pytest.raises(RequestInvalid) as exc:
        settle(build(REQUEST_CHECKS), values, {"monthly_fee": "0"})
    assert problem_set(exc) == {("request.number", "metrics.a")}


@pytest.mark.parametrize("value", [1.5, 0.28, 1, True])
def test_non_text_values_are_rejected(build: Compile, value: object) -> None:
    values = dict.fromkeys("abcdefgh", "0") | {"gmv": "0", "n1": "0", "n2": "0", "a": value}
    with pytest.raises(RequestInvalid) as exc:
        settle(build(REQUEST_CHECKS), values, {"monthly_fee": "0"})
    assert problem_set(exc) == {("request.number", "metrics.a")}


def test_counts_accept_whole_numbers_and_defaults_fill_omitted_metrics(build: Compile) -> None:
    values = dict.fromkeys("abcdefgh", "1") | {"gmv": "250", "n1": "0", "n2": "3"}
    decision = settle(build(REQUEST_CHECKS), values, {"monthly_fee": "3000"})
    # base_fee: 8 × 1 + i (default 4) + 3000 = 3012; cnt: n1 + n2 = 3 > 0 → -1; pct: 250 × 1% = 2.50
    assert amounts(decision) == {"base_fee": "3012.00", "cnt": "-1.00", "pct": "2.50"}
    assert decision.total == D("3013.50")
    assert "i" not in decision.inputs["metrics"]  # inputs are recorded exactly as given


def test_param_default_is_used_when_omitted(build: Compile) -> None:
    decision = settle(build(PRORATION), {"gmv": "0"}, {"gmv_target": "1"})
    assert dict(decision.params)["monthly_fee"] == D("1000")
    assert amounts(decision)["base_fee"] == "1000.00"
    assert decision.total == D("1000.00")


def test_percentage_only_for_ratio_metrics(build: Compile) -> None:
    text = ruleset(
        '- {id: pen, kind: penalty, when: "r > 28%", amount: "1"}',
        metrics="r: {type: ratio}\nn: {type: number, default: '0'}",
    )
    compiled = build(text)
    assert "pen" in fired(settle(compiled, {"r": "28.01%"}))  # 0.2801 > 0.28
    assert "pen" not in fired(settle(compiled, {"r": "28%"}))
    with pytest.raises(RequestInvalid) as exc:
        settle(compiled, {"r": "0", "n": "5%"})
    assert problem_set(exc) == {("request.number", "metrics.n")}


# ------------------------------------------------------------------ KPI division by zero

ZERO_DIVISION = """
- {id: pen, kind: penalty, when: "acos > 28%", amount: "100"}
- {id: bonus, kind: bonus, when: "acos == 1.5", amount: "7"}
"""


def test_kpi_division_by_zero_without_fallback_is_an_error(build: Compile) -> None:
    text = ruleset(
        ZERO_DIVISION,
        metrics="ad_spend: {type: money}\nad_sales: {type: money}",
        kpis="acos: {formula: ad_spend / ad_sales}",
    )
    compiled = build(text)
    with pytest.raises(RequestInvalid) as exc:
        settle(compiled, {"ad_spend": "10", "ad_sales": "0"})
    assert [p.code for p in exc.value.problems] == ["kpi.division_by_zero"]
    assert exc.value.problems[0].path == "kpis.acos"
    ok = settle(compiled, {"ad_spend": "10", "ad_sales": "40"})  # 10/40 = 0.25: fine
    assert dict(ok.kpis)["acos"] == D("0.25")


@pytest.mark.parametrize(
    ("fallback", "value", "fired_rules", "total"), [("0", "0", set(), "0.00"), ("1.5", "1.5", {"pen", "bonus"}, "-93.00")]
)
def test_kpi_division_by_zero_with_fallback(build: Compile, fallback: str, value: str, fired_rules: set[str], total: str) -> None:
    text = ruleset(
        ZERO_DIVISION,
        metrics="ad_spend: {type: money}\nad_sales: {type: money}",
        kpis=f'acos: {{formula: ad_spend / ad_sales, on_zero_division: "{fallback}"}}',
    )
    decision = settle(build(text), {"ad_spend": "10", "ad_sales": "0"})
    assert dict(decision.kpis)["acos"] == D(value)
    assert fired(decision) == fired_rules
    assert str(decision.total) == total  # 1.5: -100 + 7 = -93


# ------------------------------------------------------------------ warnings

WARNINGS = ruleset(
    '- {id: base_fee, kind: fixed, amount: "1"}',
    metrics="att: {type: ratio}",
    warnings='- {id: gmv_behind, when: "att < 0.85", message: {en: "GMV more than 15% below target", zh: "GMV低于目标15%以上"}}',
)


@pytest.mark.parametrize(("att", "raised"), [("0.85", False), ("0.8499", True), ("0.8500000001", False)])
def test_warning_at_its_threshold(build: Compile, att: str, raised: bool) -> None:
    decision = settle(build(WARNINGS), {"att": att})
    assert [w.id for w in decision.warnings] == (["gmv_behind"] if raised else [])
    assert {r.rule: r.fired for r in decision.rules} == {"gmv_behind": raised}
    if raised:
        assert decision.warnings[0].evidence == "att 0.8499 < 0.8500"
        assert decision.warnings[0].message_en == "GMV more than 15% below target"


# ------------------------------------------------------------------ determinism and the canonical JSON

FULL = ruleset(
    """
    - {id: base_fee, kind: fixed, amount: monthly_fee, prorate: active_days}
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
      steps_on: gmv_attainment
      steps:
        - {from: "1.00", amount: "500"}
        - {from: "1.20", rate: "1%", of: net_gmv}
    - {id: acos_penalty, kind: penalty, when: "acos > 28%", rate: "10%", of: base_fee, exempt_by: [stockout]}
    - {id: odr_penalty, kind: penalty, when: "odr >= 0.5%", amount: "300"}
    """,
    metrics="""
    gross_gmv: {type: money}
    refunds: {type: money}
    ad_spend: {type: money}
    ad_sales: {type: money}
    orders: {type: count}
    defective_orders: {type: count}
    stockout_days: {type: count, default: "0"}
    """,
    params="""
    gmv_target: {type: money, target: true}
    monthly_fee: {type: money, default: "3000"}
    """,
    exemptions='stockout: {when: "stockout_days >= 7", label: {en: Stockout, zh: 断货期}}',
    kpis="""
    net_gmv: {formula: "gross_gmv - refunds", type: money}
    acos: {formula: "ad_spend / ad_sales", on_zero_division: "0"}
    odr: {formula: "defective_orders / orders", on_zero_division: "0"}
    gmv_attainment: {formula: "net_gmv / gmv_target"}
    """,
    markets='US: {multiplier: "1.00"}\nJP: {multiplier: "1.20"}',
    multiply="[base_fee, commission]",
    caps='penalties: {max_rate: "30%", of: base_fee}\ntotal: {min: "1000"}',
    warnings='- {id: gmv_behind, when: "gmv_attainment < 0.85", message: {en: "GMV behind", zh: "GMV落后"}}',
)

FULL_METRICS = {
    "gross_gmv": MoneyAmount("130000", "EUR"),
    "refunds": "5000",
    "ad_spend": "31000",
    "ad_sales": "100000",
    "orders": "2000",
    "defective_orders": "10",
}


def full_request(**changes: object) -> SettlementRequest:
    fields: dict[str, object] = {
        "market": "JP",
        "period_start": MARCH,
        "metrics": FULL_METRICS,
        "params": {"gmv_target": "100000"},
        "active_days": 30,
        "fx_rates": (ECB,),
    }
    fields.update(changes)
    return SettlementRequest(**fields)  # type: ignore[arg-type]


def test_full_ruleset_worked_example(build: Compile) -> None:
    decision = build(FULL).settle(full_request())
    # gross 130000 EUR × 1.08 = 140400; net 140400 - 5000 = 135400; attainment 1.354
    # base_fee 3000 × 30/31 = 2903.2258064516… → 2903.23
    # commission 50000×5% + 50000×6% + 35400×8% = 2500 + 3000 + 2832 = 8332
    # bonus: step 1.20 reached: 1% × 135400 = 1354
    # acos 31000/100000 = 0.31 > 0.28: -(10% × 2903.2258064516…) = -290.32258… → -290.32
    # odr 10/2000 = 0.005 >= 0.005: -300
    # penalties 590.32 ≤ cap 30% × 2903.2258… = 870.967… → 870.97: no cap line
    # multiplier 0.20 × (2903.2258064516… + 8332) = 0.2 × 11235.2258064516… = 2247.0451612903… → 2247.05
    # total 2903.23 + 8332 + 1354 - 290.32 - 300 + 2247.05 = 14245.96
    assert amounts(decision) == {
        "base_fee": "2903.23",
        "commission": "8332.00",
        "gmv_bonus": "1354.00",
        "acos_penalty": "-290.32",
        "odr_penalty": "-300.00",
        "market_multiplier": "2247.05",
    }
    assert decision.total == D("14245.96")
    assert dict(decision.kpis) == {"net_gmv": D("135400"), "acos": D("0.31"), "odr": D("0.005"), "gmv_attainment": D("1.354")}
    assert decision.warnings == ()


def test_same_request_gives_identical_bytes(build: Compile) -> None:
    first, second = build(FULL), build(FULL)
    a = first.settle(full_request())
    b = first.settle(full_request())
    c = second.settle(full_request())
    assert a.to_canonical_json() == b.to_canonical_json() == c.to_canonical_json()
    assert a == b == c
    other = first.settle(full_request(active_days=31))
    assert other.to_canonical_json() != a.to_canonical_json()  # and it does depend on the inputs


def test_canonical_json_has_no_floats_and_names_its_versions(build: Compile) -> None:
    compiled = build(FULL)
    raw = compiled.settle(full_request()).to_canonical_json()

    def no_float(text: str) -> object:
        raise AssertionError(f"a binary float in the decision JSON: {text}")

    data = json.loads(raw, parse_float=no_float)
    assert data["engine_version"] == ENGINE_VERSION
    assert data["ruleset"]["content_hash"] == compiled.content_hash
    assert re.fullmatch(r"[0-9a-f]{64}", compiled.content_hash)
    assert data["total"] == "14245.96"
    assert data["target_factor"] == "1"
    assert {"name": "acos", "value": "0.31"} in data["kpis"]
    assert all(isinstance(line["amount"], str) and isinstance(line["exact"], str) for line in data["lines"])
    assert data["inputs"]["metrics"]["gross_gmv"] == {"amount": "130000", "currency": "EUR"}  # as received
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()  # canonical form
    plain_decimal = re.compile(r"-?[0-9]+(\.[0-9]+)?")
    decimals = [data["total"], data["target_factor"], *[k["value"] for k in data["kpis"]], *[p["value"] for p in data["params"]]]
    decimals += [line[key] for line in data["lines"] for key in ("amount", "exact", "basis", "rate") if line[key] is not None]
    decimals += [fx[key] for fx in data["fx_rates"] for key in ("rate", "amount", "converted")]
    assert all(isinstance(text, str) and plain_decimal.fullmatch(text) for text in decimals), decimals  # no exponent


def test_negative_zero_is_never_shown(build: Compile) -> None:
    text = ruleset('- {id: pen, kind: penalty, when: "x > 0", amount: "0.004"}')
    decision = settle(build(text), {"x": "1"})
    # -0.004 → -0.00, written as 0.00
    data = json.loads(decision.to_canonical_json())
    assert data["lines"][0]["amount"] == "0.00"
    assert data["total"] == "0.00"


def test_content_hash_ignores_layout_and_comments_but_not_rates(build: Compile) -> None:
    text = ruleset("- {id: commission, kind: percentage, basis: gmv, rate: '10%'}", metrics="gmv: {type: money}")
    relaid = (
        "# a comment at the top\n"
        + text.replace(
            "- {id: commission, kind: percentage, basis: gmv, rate: '10%'}",
            '- id: commission   # inline\n    kind: percentage\n    basis: gmv\n    rate: "10%"\n',
        ).replace("currency: USD", "currency:    USD   # dollars")
        + "\n\n# the end\n"
    )
    changed = text.replace("rate: '10%'", "rate: '11%'")
    assert relaid != text
    base, same, other = build(text), build(relaid), build(changed)
    assert base.content_hash == same.content_hash
    assert base.content_hash != other.content_hash
    d1, d2 = settle(base, {"gmv": "100"}), settle(same, {"gmv": "100"})
    assert d1.to_canonical_json() == d2.to_canonical_json()
    assert settle(other, {"gmv": "100"}).total == D("11.00")  # 100 × 11%


def test_equal_content_hash_means_identical_decisions(build: Compile) -> None:
    # The same exemptions written in another order: the canonical form may ignore mapping
    # order, but then the decision must not depend on it either (SPEC §4: same inputs and
    # same ruleset content → byte-identical result; the hash is what identifies the content).
    def text(first: str, second: str) -> str:
        return ruleset(
            '- {id: pen, kind: penalty, when: "acos > 28%", amount: "10", exempt_by: [stockout, review]}',
            metrics="acos: {type: ratio}\nstockout_days: {type: count, default: '0'}\nreview_days: {type: count, default: '0'}",
            exemptions=f"{first}\n{second}",
        )

    stockout, review = 'stockout: {when: "stockout_days >= 7"}', 'review: {when: "review_days > 0"}'
    one, two = build(text(stockout, review)), build(text(review, stockout))
    metrics = {"acos": "0.31", "stockout_days": "7", "review_days": "2"}
    same_bytes = settle(one, metrics).to_canonical_json() == settle(two, metrics).to_canonical_json()
    assert same_bytes or one.content_hash != two.content_hash
