"""Ruleset diffs in business terms (SPEC §6, DiffRulesetVersions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import RulesetInvalid, compile_ruleset
from engine.diff import ADDED, CHANGED, REMOVED, Change, diff_rulesets
from engine.source import load_source

ROOT = Path(__file__).resolve().parent.parent
US = (ROOT / "rulesets" / "us-managed-standard.yaml").read_text(encoding="utf-8")


def parsed(text: str) -> Any:
    return load_source(text).data


def edit(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence (so a test never edits something it did not mean to)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


ODR_PENALTY = """  - id: odr_penalty
    kind: penalty
    when: "odr >= 0.5%"
    amount: "300"
    exempt_by: [platform_review]
    label: {en: "Order defect rate 0.5% or more", zh: "订单缺陷率达到0.5%罚款"}
"""
RESPONSE_PENALTY = """  - id: response_penalty
    kind: penalty
    when: "response_hours > 24"
    amount: "150"
    exempt_by: [platform_review]
    label: {en: "Buyer messages answered in more than 24 hours", zh: "买家消息回复超过24小时罚款"}
"""
ACOS_HIGH = """  - id: acos_high
    when: "acos > 25%"
    message: {en: "ACoS above 25%, close to the 28% penalty threshold", zh: "ACoS高于25%，接近28%的罚款线"}
"""
AD_FEE = """  - id: ad_management_fee
    kind: percentage
    basis: ad_spend
    rate: "2%"
    label: {en: "Advertising management fee", zh: "广告管理费"}
"""


def test_a_new_version_in_business_terms() -> None:
    new = edit(US, 'when: "acos > 28%"', 'when: "acos > 25%"')  # a penalty threshold
    new = edit(new, '- {up_to: "100000", rate: "6%"}', '- {up_to: "100000", rate: "7%"}')  # a tier rate
    new = edit(new, "  - id: gmv_bonus\n", AD_FEE + "  - id: gmv_bonus\n")  # a fee added
    new = edit(new, ACOS_HIGH, "")  # a warning removed
    new = edit(new, 'JP: {multiplier: "1.20"}', 'JP: {multiplier: "1.25"}')  # a multiplier
    new = edit(new, ODR_PENALTY + RESPONSE_PENALTY, RESPONSE_PENALTY + ODR_PENALTY)  # two fees swapped
    compile_ruleset(new).close()  # a valid version

    assert diff_rulesets(US, new) == [
        Change(CHANGED, "fees[1].tiers[1].rate", "commission tier 2 (50000–100000) rate 6% → 7%", "6%", "7%"),
        Change(ADDED, "fees[2]", "fee ad_management_fee added: percentage 2% of ad_spend", "", "percentage 2% of ad_spend"),
        Change(CHANGED, "fees[5].when", "acos_penalty condition: acos > 28% → acos > 25%", "acos > 28%", "acos > 25%"),
        # one move explains the new order; positions are 1-based in the old and new fee lists
        Change(CHANGED, "fees[6]", "fee response_penalty moved before odr_penalty (position 7 → 7)", "7", "7"),
        Change(CHANGED, "markets.JP.multiplier", "market JP multiplier: 1.20 → 1.25", "1.20", "1.25"),
        Change(
            REMOVED,
            "warnings[1]",
            "warning acos_high removed: when acos > 25%: ACoS above 25%, close to the 28% penalty threshold",
            "when acos > 25%: ACoS above 25%, close to the 28% penalty threshold",
            "",
        ),
    ]


def test_nothing_changed() -> None:
    assert diff_rulesets(US, US) == []
    comments = edit(US, "# US managed store — standard terms.", "# US managed store: standard terms (reviewed 2026-05).")
    comments = edit(comments, "  # --- 1. Stretch month", "  # --- 1. The stretch month")
    assert comments != US
    assert diff_rulesets(US, comments) == []


def test_spelling_and_layout_do_not_count() -> None:
    same = edit(US, 'when: "acos > 28%"', "when: acos>0.28")  # an expression, spelled differently
    same = edit(same, '- {up_to: "50000", rate: "5%"}', "- {up_to: 50000.00, rate: 0.05}")  # numbers
    same = edit(same, "rounding: half_up\n", "")  # the default
    same = edit(same, "    mode: graduated\n", "")  # the default
    same = edit(same, "exempt_by: [stockout, platform_review]", "exempt_by: [platform_review, stockout]")  # a set
    assert diff_rulesets(US, same) == []
    as_json = json.dumps(load_source(US).data, ensure_ascii=False, indent=1)  # the same ruleset written as JSON
    assert diff_rulesets(US, as_json) == []


def test_examples_are_only_counted() -> None:
    changed = edit(US, 'expect:\n      total: "11950.05"', 'expect:\n      total: "11950.06"')
    assert diff_rulesets(US, changed) == []
    data = load_source(US).data
    assert isinstance(data, dict) and isinstance(data["examples"], list)
    fewer = json.dumps({**data, "examples": data["examples"][:3]})
    assert diff_rulesets(US, fewer) == [Change(CHANGED, "examples", "examples: 5 → 3", "5", "3")]


def test_tiers_steps_payouts_caps_and_terms() -> None:
    new = edit(US, "currency: USD", "currency: EUR")
    new = edit(new, "effective_from: 2026-01-01", "effective_from: 2026-07-01")
    new = edit(new, 'monthly_fee:\n    type: money\n    default: "3000"', 'monthly_fee:\n    type: money\n    default: "3500"')
    new = edit(new, 'formula: "ad_spend / ad_sales"', 'formula: "ad_spend / (ad_sales + refunds)"')
    new = edit(new, 'label: {en: "Platform review", zh: "平台审核期"}', 'label: {en: "Platform review hold", zh: "平台审核期"}')
    new = edit(new, '      - {rate: "8%"}', '      - {up_to: "200000", rate: "8%"}\n      - {rate: "9%"}')
    new = edit(new, '{from: "1.20", rate: "1%", of: net_gmv}', '{from: "1.25", amount: "900"}')
    new = edit(
        new, 'amount: "300"\n    exempt_by: [platform_review]', 'rate: "10%"\n    of: base_fee\n    exempt_by: [platform_review, stockout]'
    )
    new = edit(new, 'penalties: {max_rate: "15%", of: base_fee}', 'penalties: {max_rate: "20%", of: base_fee}')
    new = edit(new, 'total: {min: "1000"}', 'total: {min: "1000", max: "50000"}')
    assert diff_rulesets(US, new) == [
        Change(CHANGED, "effective_from", "effective_from: 2026-01-01 → 2026-07-01", "2026-01-01", "2026-07-01"),
        Change(CHANGED, "currency", "currency: USD → EUR", "USD", "EUR"),
        Change(CHANGED, "params.monthly_fee.default", "param monthly_fee default: 3000 → 3500", "3000", "3500"),
        Change(
            CHANGED,
            "exemptions.platform_review.label",
            "exemption platform_review label (en): Platform review → Platform review hold",
            "Platform review",
            "Platform review hold",
        ),
        Change(
            CHANGED,
            "kpis.acos.formula",
            "KPI acos formula: ad_spend / ad_sales → ad_spend / (ad_sales + refunds)",
            "ad_spend / ad_sales",
            "ad_spend / (ad_sales + refunds)",
        ),
        Change(ADDED, "fees[1].tiers[2].up_to", "commission tier 3 upper bound added: 200000", "", "200000"),
        Change(ADDED, "fees[1].tiers[3]", "commission tier 4 (200000 and above) added: rate 9%", "", "rate 9%"),
        Change(CHANGED, "fees[2].steps[1].from", "gmv_bonus step 2 from 1.20 → 1.25", "1.20", "1.25"),
        Change(CHANGED, "fees[2].steps[1].amount", "gmv_bonus step 2 (from 1.25) payout 1% of net_gmv → 900", "1% of net_gmv", "900"),
        Change(CHANGED, "fees[5].rate", "odr_penalty payout: 300 → 10% of base_fee", "300", "10% of base_fee"),
        Change(
            CHANGED,
            "fees[5].exempt_by",
            "odr_penalty exempted by: platform_review → platform_review, stockout",
            "platform_review",
            "platform_review, stockout",
        ),
        Change(CHANGED, "caps.penalties.max_rate", "penalty cap rate: 15% → 20%", "15%", "20%"),
        Change(ADDED, "caps.total.max", "total cap added: 50000", "", "50000"),
    ]


def test_rules_added_and_removed_and_definitions() -> None:
    new = edit(US, "  stockout:\n    when", '  holiday:\n    when: "active_days < 20"\n  stockout:\n    when')
    new = edit(new, "\n  net_gmv:\n    formula", '\n  gmv_ratio: {formula: "net_gmv", definition: Net GMV again}\n  net_gmv:\n    formula')
    new = edit(new, 'caps:\n  penalties: {max_rate: "15%", of: base_fee}\n', "caps:\n")
    new = edit(new, "by refund date, product principal", "by refund-request date, product principal")
    old_definition, new_definition = (parsed(text)["metrics"]["refunds"]["definition"] for text in (US, new))
    assert diff_rulesets(US, new) == [
        Change(CHANGED, "metrics.refunds.definition", "metric refunds definition changed", old_definition, new_definition),
        Change(ADDED, "exemptions.holiday", "exemption holiday added: when active_days < 20", "", "when active_days < 20"),
        Change(
            ADDED,
            "kpis.gmv_ratio",
            "KPI gmv_ratio added: formula net_gmv; definition: Net GMV again",
            "",
            "formula net_gmv; definition: Net GMV again",
        ),
        Change(REMOVED, "caps.penalties", "penalty cap removed: 15% of base_fee", "15% of base_fee", ""),
    ]
    # and back again
    assert [(c.change, c.path) for c in diff_rulesets(new, US)] == [
        (CHANGED, "metrics.refunds.definition"),
        (REMOVED, "exemptions.holiday"),
        (REMOVED, "kpis.gmv_ratio"),
        (ADDED, "caps.penalties"),
    ]


def test_reordering_is_a_move_not_a_removal() -> None:
    data = load_source(US).data
    assert isinstance(data, dict) and isinstance(data["fees"], list)
    fees = data["fees"]
    reversed_penalties = json.dumps({**data, "fees": [*fees[:4], *reversed(fees[4:])]})
    changes = diff_rulesets(US, reversed_penalties)
    # acos, odr, response → response, odr, acos: two moves explain it
    assert [c.description for c in changes] == [
        "fee response_penalty moved before odr_penalty (position 7 → 5)",
        "fee odr_penalty moved before acos_penalty (position 6 → 6)",
    ]
    assert all(c.change == CHANGED for c in changes)
    removed_and_moved = json.dumps({**data, "fees": [fees[1], fees[0], *fees[3:]]})  # gmv_bonus (fees[2]) removed
    assert [c.description for c in diff_rulesets(US, removed_and_moved)] == [
        "fee commission moved before base_fee (position 2 → 1)",
        "fee gmv_bonus removed: bonus on gmv_attainment: from 1.00: 500, from 1.20: 1% of net_gmv",
    ]


def test_versions_that_only_parse_can_be_compared() -> None:
    broken = edit(US, 'when: "acos > 28%"', 'when: "cpc > 2"')  # cpc is not defined anywhere
    broken = edit(broken, "kind: fixed", "kind: flat")
    with pytest.raises(RulesetInvalid):
        compile_ruleset(broken)
    assert diff_rulesets(US, broken) == [
        Change(CHANGED, "fees[0].kind", "base_fee kind: fixed → flat", "fixed", "flat"),
        Change(CHANGED, "fees[4].when", "acos_penalty condition: acos > 28% → cpc > 2", "acos > 28%", "cpc > 2"),
    ]


@pytest.mark.parametrize("bad", ["ruleset: [unclosed", "", "a: !!python/object:os.system x"])
def test_unparsable_sources_are_refused(bad: str) -> None:
    for old, new in ((US, bad), (bad, US)):
        with pytest.raises(RulesetInvalid) as caught:
            diff_rulesets(old, new)
        assert len(caught.value.problems) == 1
        assert caught.value.problems[0].code.startswith("source.")
