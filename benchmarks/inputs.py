"""Settlement inputs for rulesets/us-managed-standard.yaml: its examples and generated ones.

One input is a plain mapping (`market`, `period_start`, `metrics`, `params`, values as exact
decimal text), the shape of a ruleset example's request. Each engine gets it in its own
form, converted before any clock starts: a `SettlementRequest` for kpisettle, JSON text
with the decimals written as JSON numbers for zen (so nothing passes through a float), a
mapping of text for the durable_rules baseline, a protobuf `SettlementInput` for the
service.
"""

from __future__ import annotations

import datetime
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

from engine import CompiledRuleset, SettlementRequest, compile_ruleset, request_from_mapping

ROOT = Path(__file__).resolve().parent.parent
US_RULESET = ROOT / "rulesets" / "us-managed-standard.yaml"
MARKETS = ("US", "JP", "BR", "EU")
TEXT_FIELDS = ("market", "period_start")

Input = dict[str, Any]


def compile_us() -> CompiledRuleset:
    return compile_ruleset(US_RULESET.read_text(encoding="utf-8"))


def us_examples(compiled: CompiledRuleset | None = None) -> list[Input]:
    """The ruleset's own examples, as inputs (period_start filled in)."""
    compiled = compiled or compile_us()
    inputs = []
    for example in compiled.ruleset.examples:
        request = dict(example.request)
        request.setdefault("period_start", compiled.ruleset.effective_from.isoformat())
        inputs.append(
            {
                "market": str(request["market"]),
                "period_start": str(request["period_start"]),
                "metrics": {str(k): str(v) for k, v in dict(request.get("metrics") or {}).items()},
                "params": {str(k): str(v) for k, v in dict(request.get("params") or {}).items()},
            }
        )
    return inputs


def _cents(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low * 100, high * 100)).scaleb(-2)


def us_inputs(count: int, seed: int = 20260301) -> list[Input]:
    """`count` valid, varied inputs, deterministic for a seed.

    They cover every branch of the ruleset (each bonus step, each penalty, the penalty cap,
    the floor, both exemptions with target proration, the four markets) and hit thresholds
    exactly now and then (ACoS of exactly 28%, ODR of exactly 0.5%, 24 response hours,
    attainment of exactly 1.00, 1.20 and 0.9). Ratios are either 0 or at least 0.0002:
    the durable_rules baseline sends them as JSON floats, and its C core cannot read a
    float printed in exponent form (`5e-05`, error 204).
    """
    rng = random.Random(seed)
    inputs = []
    for i in range(count):
        month = rng.randint(1, 12)
        gross = _cents(rng, 1000, 260000)
        refunds = (gross * Decimal(rng.randint(0, 40)) / 100).quantize(Decimal("0.01"))
        ad_sales = Decimal(0) if rng.random() < 0.05 else _cents(rng, 1000, 300000)
        ad_spend = Decimal(0) if rng.random() < 0.05 else _cents(rng, 100, 90000)
        orders = 0 if rng.random() < 0.05 else rng.randint(50, 5000)
        defective = rng.randint(0, max(1, orders // 60)) if orders else 0
        response = Decimal(rng.randint(0, 480)).scaleb(-1)
        target = _cents(rng, 0, 200000) if rng.random() < 0.97 else Decimal(0)
        review = rng.randint(1, 12) if rng.random() < 0.15 else 0
        stockout = rng.randint(0, 14) if rng.random() < 0.4 else None
        case = i % 12
        if case == 1:  # ACoS exactly 28% (not a breach)
            k = rng.randint(10, 3000)
            ad_sales, ad_spend = Decimal(100 * k), Decimal(28 * k)
        elif case == 2:  # ODR exactly 0.5%
            orders = 200 * rng.randint(1, 20)
            defective = orders // 200
        elif case == 3:
            response = Decimal(24)
        elif case == 7:  # a small store on a reduced fee: the floor applies
            gross, refunds = _cents(rng, 1000, 15000), Decimal(0)
        elif case in (4, 5, 6) and review == 0:  # attainment exactly 1.00, 1.20 or 0.9
            target = Decimal(rng.randint(10, 2000) * 100)
            gross, refunds = {4: Decimal("1.00"), 5: Decimal("1.20"), 6: Decimal("0.9")}[case] * target, Decimal(0)
        metrics = {
            "gross_gmv": str(gross),
            "refunds": str(refunds),
            "ad_spend": str(ad_spend),
            "ad_sales": str(ad_sales),
            "orders": str(orders),
            "defective_orders": str(defective),
            "response_hours": str(response),
        }
        if stockout is not None:
            metrics["stockout_days"] = str(stockout)
        if review:
            metrics["review_days"] = str(review)
        params = {"gmv_target": str(target)}
        if case == 7:
            params["monthly_fee"] = str(_cents(rng, 100, 800))
        elif rng.random() < 0.3:
            params["monthly_fee"] = str(_cents(rng, 100, 5000))
        market = MARKETS[0] if rng.random() < 0.6 else rng.choice(MARKETS[1:])
        inputs.append({"market": market, "period_start": f"2026-{month:02d}-01", "metrics": metrics, "params": params})
    return inputs


def to_request(item: Input) -> SettlementRequest:
    return request_from_mapping(item, datetime.date(2026, 1, 1))


def to_zen_context(item: Input) -> str:
    """JSON text with every decimal written as a JSON number, digit for digit."""
    parts = [f'"market":"{item["market"]}"', f'"period_start":"{item["period_start"]}"']
    for section in ("metrics", "params"):
        for name, value in item[section].items():
            Decimal(value)  # only decimal text goes into the JSON unquoted
            parts.append(f'"{name}":{value}')
    return "{" + ",".join(parts) + "}"
