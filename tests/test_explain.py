"""Plain-language explanations of decisions (SPEC §5, ExplainSettlement), English and Chinese.

Decisions come from the shipped rulesets' own examples, whose amounts are checked by hand
in the ruleset files; here the sentences are checked word for word.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine import ENGINE_VERSION, CompiledRuleset, compile_ruleset, request_from_mapping
from engine.explain import explain_decision, percent
from tests.conftest import RULESET_FILES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rulesets() -> Iterator[dict[str, CompiledRuleset]]:
    compiled = {path.name.split("-")[0]: compile_ruleset(path.read_text(encoding="utf-8")) for path in RULESET_FILES}
    yield compiled
    for item in compiled.values():
        item.close()


def decision(compiled: CompiledRuleset, name: str) -> dict[str, Any]:
    example = next(e for e in compiled.ruleset.examples if e.name == name)
    return compiled.settle(request_from_mapping(example.request, compiled.ruleset.effective_from)).to_dict()


US_STRETCH = "hits the stretch target"
US_BAD = "misses target with ACoS, ODR and response penalties, penalty cap applies"
US_REVIEW = "platform review in April, target prorated and penalties waived"
US_FLOOR = "small store on a reduced fee, total floor applies"
US_JP = "Japan-market store on the US template, market multiplier"
EU_FX = "strong growth month with ad spend invoiced in USD"
EU_STOCKOUT = "small store in a stockout month, total floor applies"
JP_PRO_RATA = "store taken over mid-month, base fee pro rata to active days"


def test_whole_explanation_follows_the_computation(rulesets: dict[str, CompiledRuleset]) -> None:
    us = rulesets["us"]
    assert explain_decision(decision(us, US_STRETCH)) == [
        f"Ruleset us-managed-standard, unversioned (content hash {us.content_hash}), was applied by engine {ENGINE_VERSION}.",
        "Period 2026-03-01 to 2026-03-31 (31 days), market US, settlement currency USD.",
        'The exemption "Stockout caused by the seller\'s inventory" did not apply because stockout_days 0 >= 7 is false.',
        'The exemption "Platform review" did not apply because review_days 0 > 0 is false.',
        "Contract parameters used: gmv_target = 100000, monthly_fee = 3000.",
        "KPI values: net_gmv = 125000.50, acos = 0.14, odr = 0.002, gmv_attainment = 1.250005.",
        'Step 1 of the bonus "GMV target bonus" was reached because gmv_attainment 1.250005 >= 1.0000.',
        'Step 2 of the bonus "GMV target bonus" was reached because gmv_attainment 1.250005 >= 1.2000.',
        'The bonus "Efficient advertising bonus" applied because acos 0.1400 < 0.1500 and gmv_attainment 1.250005 >= 0.9000.',
        'The penalty "ACoS above 28%" did not apply because acos 0.1400 > 0.2800 is false.',
        'The penalty "Order defect rate 0.5% or more" did not apply because odr 0.0020 >= 0.0050 is false.',
        'The penalty "Buyer messages answered in more than 24 hours" did not apply because response_hours 6.0000 > 24.0000 is false.',
        "Base service fee: 3000.00 USD.",
        "Commission on net GMV (graduated): 7500.04 USD, graduated tiers on 125000.50 USD.",
        # 1% × 125000.50 = 1250.005, a rounding tie: half_up gives 1250.01
        "GMV target bonus: 1250.01 USD, 1% of 125000.50 USD, rounded half up from 1250.0050 (step 2 reached).",
        "Efficient advertising bonus: 200.00 USD.",
        "ACoS above 28%: 0.00 USD (condition not met).",
        "Order defect rate 0.5% or more: 0.00 USD (condition not met).",
        "Buyer messages answered in more than 24 hours: 0.00 USD (condition not met).",
        "Total payable: 11950.05 USD.",
        "No warnings were raised.",
    ]


def test_a_stored_version_is_named_with_its_number(rulesets: dict[str, CompiledRuleset]) -> None:
    text = (ROOT / "rulesets" / "us-managed-standard.yaml").read_text(encoding="utf-8")
    compiled = compile_ruleset(text, version=3)
    try:
        sentences = {lang: explain_decision(decision(compiled, US_STRETCH), lang)[0] for lang in ("en", "zh")}
    finally:
        compiled.close()
    digest = compiled.content_hash
    assert sentences["en"] == f"Ruleset us-managed-standard version 3 (content hash {digest}) was applied by engine {ENGINE_VERSION}."
    assert sentences["zh"] == f"采用规则集 us-managed-standard 第3版（内容哈希 {digest}），引擎版本 {ENGINE_VERSION}。"


def test_penalties_carry_their_evidence_and_the_cap(rulesets: dict[str, CompiledRuleset]) -> None:
    d = decision(rulesets["us"], US_BAD)
    en, zh = explain_decision(d, "en"), explain_decision(d, "zh")
    assert 'The penalty "ACoS above 28%" applied because acos 0.3100 > 0.2800.' in en
    assert "ACoS above 28%: -300.00 USD, 10% of 3000 USD." in en
    assert "Order defect rate 0.5% or more: -300.00 USD." in en
    assert "Penalty cap: 300.00 USD added back; penalties of 750.00 USD exceed the cap of 450.00 USD." in en
    assert en[-3:] == [
        "Total payable: 5650.00 USD.",
        "Warning: Net GMV more than 15% below target (gmv_attainment 0.7500 < 0.8500).",
        "Warning: ACoS above 25%, close to the 28% penalty threshold (acos 0.3100 > 0.2500).",
    ]
    assert "罚款“ACoS超过28%罚款”适用，因为 acos 0.3100 > 0.2800。" in zh
    assert "ACoS超过28%罚款：-300.00 USD，即 3000 USD 的 10%。" in zh
    assert "罚款上限：退回 300.00 USD；罚款合计 750.00 USD 超过上限 450.00 USD。" in zh
    assert zh[-3:] == [
        "应付总额：5650.00 USD。",
        "预警：净GMV低于目标15%以上（gmv_attainment 0.7500 < 0.8500）。",
        "预警：ACoS高于25%，接近28%的罚款线（acos 0.3100 > 0.2500）。",
    ]


def test_waived_penalties_name_the_exemption_label(rulesets: dict[str, CompiledRuleset]) -> None:
    d = decision(rulesets["us"], US_REVIEW)
    en, zh = explain_decision(d, "en"), explain_decision(d, "zh")
    assert 'The exemption "Platform review" applied because review_days 6 > 0.' in en
    # 100000 × (30 - 6) / 30 = 80000
    assert "Targets were prorated by the factor 0.8 for the exempted days: gmv_target 100000 → 80000.0." in en
    assert (
        'The penalty "ACoS above 28%" would have applied because acos 0.3250 > 0.2800, but it was waived by the exemption "Platform review".'
        in en
    )
    assert 'ACoS above 28%: 0.00 USD, waived by the exemption "Platform review".' in en
    assert "Total payable: 8040.00 USD." in en
    assert "豁免“平台审核期”适用，因为 review_days 6 > 0。" in zh
    assert "因豁免天数，目标按系数 0.8 折算：gmv_target 100000 → 80000.0。" in zh
    assert "罚款“ACoS超过28%罚款”的条件成立（acos 0.3250 > 0.2800），但因豁免“平台审核期”而免除。" in zh
    assert "ACoS超过28%罚款：0.00 USD，因豁免“平台审核期”而免除。" in zh
    assert "订单缺陷率达到0.5%罚款：0.00 USD，因豁免“平台审核期”而免除。" in zh
    assert "应付总额：8040.00 USD。" in zh


def test_floor_market_multiplier_and_fx(rulesets: dict[str, CompiledRuleset]) -> None:
    floor = explain_decision(decision(rulesets["us"], US_FLOOR))
    assert "Minimum fee: 100.00 USD added; the lines add up to 900.00 USD, below the minimum of 1000.00 USD." in floor
    # the boundary: acos exactly 28% does not exceed 28%
    assert 'The penalty "ACoS above 28%" did not apply because acos 0.2800 > 0.2800 is false.' in floor

    jp_market = explain_decision(decision(rulesets["us"], US_JP), "zh")
    assert "市场系数：1000.00 USD，即 5000.0175 USD 的 20%（市场 JP 系数 1.20）。" in jp_market
    assert "净GMV佣金（分段累进）：2000.02 USD，按分段累进费率计于 40000.35 USD，由 2000.0175 四舍五入。" in jp_market

    fx = explain_decision(decision(rulesets["eu"], EU_FX))
    assert fx[2] == "ad_spend: 4000 USD converted at 1 USD = 0.92 EUR (ECB, as of 2026-03-31) to 3680.00 EUR."
    assert "Market multiplier: 1098.77 EUR, 15% of 7325.165 EUR (multiplier 1.15 for market EU)." in fx
    # half_even: 4825.165 → 4825.16
    assert "Commission on net GMV (graduated): 4825.16 EUR, graduated tiers on 95003 EUR, rounded half to even from 4825.165." in fx
    fx_zh = explain_decision(decision(rulesets["eu"], EU_FX), "zh")
    assert fx_zh[2] == "ad_spend：4000 USD 按 1 USD = 0.92 EUR（ECB，2026-03-31）折算为 3680.00 EUR。"
    assert "同比增长奖金：241.26 EUR，即 4825.165 EUR 的 5%，由 241.25825 按四舍六入五成双舍入（达到第2档）。" in fx_zh


def test_sentences_follow_the_normative_order(rulesets: dict[str, CompiledRuleset]) -> None:
    sentences = explain_decision(decision(rulesets["eu"], EU_STOCKOUT), "zh")

    def at(prefix: str) -> int:
        return next(i for i, s in enumerate(sentences) if s.startswith(prefix))

    order = [
        at("采用规则集"),
        at("结算期"),
        at("豁免“卖家库存原因断货”适用"),
        at("所用合同参数"),
        at("KPI 数值"),
        at("奖金“同比增长奖金”第1档"),
        at("罚款“ACoS超过25%罚款”的条件成立"),
        at("基础服务费"),
        at("ACoS超过25%罚款：0.00 EUR，因豁免“卖家库存原因断货”而免除"),
        at("市场系数"),
        at("最低费用：补足 70.00 EUR；各项合计 730.00 EUR，低于最低额 800.00 EUR"),
        at("应付总额：800.00 EUR"),
        at("未触发预警"),
    ]
    assert order == sorted(order)
    assert order[-1] == len(sentences) - 1


def test_pro_rata_and_long_exact_values(rulesets: dict[str, CompiledRuleset]) -> None:
    en = explain_decision(decision(rulesets["jp"], JP_PRO_RATA))
    assert en[1] == "Period 2026-04-01 to 2026-04-30 (30 days, 20 of them active), market JP, settlement currency JPY."
    # 400000 × 20/30, exact to 34 digits, rounded to whole yen
    assert (
        "Base service fee (pro rata to active days): 266667 JPY, 400000 JPY × 20/30 active days, "
        "rounded half up from 266666.6666666666666666666666666667." in en
    )
    assert "Commission on net GMV (volume band): 102911 JPY, 3% of 3430350 JPY, rounded half up from 102910.50." in en
    assert "Total payable: 543493 JPY." in en


@pytest.mark.parametrize("language", ["en", "zh"])
def test_stored_json_explains_exactly_like_the_decision(rulesets: dict[str, CompiledRuleset], language: str) -> None:
    for compiled in rulesets.values():
        for example in compiled.ruleset.examples:
            made = compiled.settle(request_from_mapping(example.request, compiled.ruleset.effective_from))
            stored = json.loads(made.to_canonical_json())
            assert explain_decision(stored, language) == explain_decision(made.to_dict(), language), example.name


def test_every_line_and_rule_is_told(rulesets: dict[str, CompiledRuleset]) -> None:
    for compiled in rulesets.values():
        for example in compiled.ruleset.examples:
            d = decision(compiled, example.name)
            for language in ("en", "zh"):
                sentences = explain_decision(d, language)
                text = "\n".join(sentences)
                for line in d["lines"]:
                    told = f"{line['amount']} {d['currency']}"
                    assert any(s.startswith(line["label"][language]) and told in s for s in sentences), (example.name, line["id"])
                for rule in d["rules"]:
                    if rule["kind"] != "warning" or rule["fired"]:  # warnings not raised are not told
                        assert rule["evidence"] in text, (example.name, rule["rule"])
                assert f"{d['total']} {d['currency']}" in sentences[-1 - len(d["warnings"]) - (not d["warnings"])]


def test_unknown_language_is_refused(rulesets: dict[str, CompiledRuleset]) -> None:
    d = decision(rulesets["us"], US_STRETCH)
    for language in ("fr", "", "EN", "zh-CN"):
        with pytest.raises(ValueError, match="unsupported language"):
            explain_decision(d, language)


@pytest.mark.parametrize(
    ("rate", "shown"),
    [("0.05", "5%"), ("0.125", "12.5%"), ("0.10", "10%"), ("1", "100%"), ("0.0005", "0.05%"), ("0.20", "20%"), ("0", "0%")],
)
def test_percent_is_exact(rate: str, shown: str) -> None:
    assert percent(rate) == shown
    assert percent(Decimal(rate)) == shown
