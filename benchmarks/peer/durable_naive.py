"""The naive baseline: rulesets/us-managed-standard.yaml written with durable_rules' `durable.lang`.

This is what a Python developer writes first with durable_rules' documented high-level
API: the contract's conditions as `when_all(m.field > x)` rules whose actions record what
fired, facts asserted with `assert_fact` and retracted afterwards, KPIs and amounts in
Python `Decimal` (money is never a float) and handed to the rules as floats (`durable.lang`
serialises facts with `json.dumps`, which cannot write a Decimal). Exemptions are decided
first (they prorate the target), then every other condition, in a second ruleset.

What it does not do, unlike kpisettle: validation of the request, evidence per rule,
decimal-exact comparisons (a float near a threshold can be misjudged; the inputs of this
benchmark stay clear of that), limits on what the C core can take, a canonical record.

Two traps found while writing it, both documented in ../shared/DURABLE_RULES.md:
`post` (events) fires only the first matching rule, so facts are used; and `durable.lang`'s
host starts two timer threads that dispatch pending actions every 0.2 s on their own
thread, which can run an action of this thread's fact before this thread does. They are
stopped here (`stop_timers`), since nothing in this baseline uses timers.

Import this module in a process of its own (the benchmark uses a subprocess): durable.lang
registers the rulesets in a process-wide host, once.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime
import itertools
import threading
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from durable.engine import MessageNotHandledException  # type: ignore[import-untyped]
from durable.lang import assert_fact, get_host, m, retract_fact, ruleset, when_all  # type: ignore[import-untyped]

from benchmarks.peer import Outcome, outcome

CENT = Decimal("0.01")
ZERO = Decimal(0)
MULTIPLIERS = {"US": Decimal("1.00"), "JP": Decimal("1.20"), "BR": Decimal("1.30"), "EU": Decimal("1.15")}

_fired: dict[str, set[str]] = {}
_ids = itertools.count()

with ruleset("us_exemptions"):

    @when_all(m.stockout_days >= 7)  # type: ignore[untyped-decorator]
    def stockout(c: Any) -> None:
        _fired[c.m.id].add("stockout")

    @when_all(m.review_days > 0)  # type: ignore[untyped-decorator]
    def platform_review(c: Any) -> None:
        _fired[c.m.id].add("platform_review")


with ruleset("us_conditions"):

    @when_all(m.gmv_attainment >= 1.0)  # type: ignore[untyped-decorator]
    def gmv_step_1(c: Any) -> None:
        _fired[c.m.id].add("gmv_step_1")

    @when_all(m.gmv_attainment >= 1.2)  # type: ignore[untyped-decorator]
    def gmv_step_2(c: Any) -> None:
        _fired[c.m.id].add("gmv_step_2")

    @when_all((m.acos < 0.15) & (m.gmv_attainment >= 0.9))  # type: ignore[untyped-decorator]
    def low_acos_bonus(c: Any) -> None:
        _fired[c.m.id].add("low_acos_bonus")

    @when_all(m.acos > 0.28)  # type: ignore[untyped-decorator]
    def acos_penalty(c: Any) -> None:
        _fired[c.m.id].add("acos_penalty")

    @when_all(m.odr >= 0.005)  # type: ignore[untyped-decorator]
    def odr_penalty(c: Any) -> None:
        _fired[c.m.id].add("odr_penalty")

    @when_all(m.response_hours > 24)  # type: ignore[untyped-decorator]
    def response_penalty(c: Any) -> None:
        _fired[c.m.id].add("response_penalty")

    @when_all(m.gmv_attainment < 0.85)  # type: ignore[untyped-decorator]
    def gmv_behind(c: Any) -> None:
        _fired[c.m.id].add("gmv_behind")

    @when_all(m.acos > 0.25)  # type: ignore[untyped-decorator]
    def acos_high(c: Any) -> None:
        _fired[c.m.id].add("acos_high")


def stop_timers() -> None:
    """Stop the host's dispatch threads (see the module docstring); they re-arm themselves."""
    host = get_host()
    for _ in range(50):
        timers = [host._d_timer, host._t_timer]
        for timer in timers:
            timer.cancel()
        threading.Event().wait(0.01)
        if [host._d_timer, host._t_timer] == timers:
            return


def _fire(name: str, fact: dict[str, Any]) -> set[str]:
    fact_id = fact["id"]
    _fired[fact_id] = set()
    with contextlib.suppress(MessageNotHandledException):  # raised when no rule matched the fact
        assert_fact(name, fact)
    with contextlib.suppress(MessageNotHandledException):
        retract_fact(name, fact)
    return _fired.pop(fact_id)


def _round(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def settle(item: dict[str, Any]) -> Outcome:
    """One settlement of the US contract, as a developer would hand-write it."""
    metrics, params = item["metrics"], item["params"]
    fact_id = str(next(_ids))
    gross, refunds = Decimal(metrics["gross_gmv"]), Decimal(metrics["refunds"])
    ad_spend, ad_sales = Decimal(metrics["ad_spend"]), Decimal(metrics["ad_sales"])
    orders, defective = Decimal(metrics["orders"]), Decimal(metrics["defective_orders"])
    response_hours = Decimal(metrics["response_hours"])
    stockout_days = int(metrics.get("stockout_days", "0"))
    review_days = int(metrics.get("review_days", "0"))
    target = Decimal(params["gmv_target"])
    base_fee = Decimal(params.get("monthly_fee", "3000"))
    start = datetime.date.fromisoformat(item["period_start"])
    period_days = calendar.monthrange(start.year, start.month)[1]

    exemptions = _fire("us_exemptions", {"id": fact_id, "stockout_days": stockout_days, "review_days": review_days})
    if "platform_review" in exemptions:
        days = min(review_days, period_days)
        target = target * ((period_days - days) / Decimal(period_days))
    net_gmv = gross - refunds
    acos = ad_spend / ad_sales if ad_sales else ZERO
    odr = defective / orders if orders else ZERO
    attainment = net_gmv / target if target else ZERO
    fired = _fire(
        "us_conditions",
        {
            "id": fact_id,
            "acos": float(acos),
            "odr": float(odr),
            "gmv_attainment": float(attainment),
            "response_hours": float(response_hours),
        },
    )

    commission = min(max(net_gmv, ZERO), Decimal(50000)) * Decimal("0.05")
    if net_gmv > 50000:
        commission += (min(net_gmv, Decimal(100000)) - 50000) * Decimal("0.06")
    if net_gmv > 100000:
        commission += (net_gmv - 100000) * Decimal("0.08")
    if "gmv_step_2" in fired:
        gmv_bonus = net_gmv * Decimal("0.01")
    elif "gmv_step_1" in fired:
        gmv_bonus = Decimal(500)
    else:
        gmv_bonus = ZERO
    penalties = ZERO
    if "acos_penalty" in fired and not exemptions:
        penalties -= _round(base_fee * Decimal("0.10"))
    if "odr_penalty" in fired and "platform_review" not in exemptions:
        penalties -= _round(Decimal(300))
    if "response_penalty" in fired and "platform_review" not in exemptions:
        penalties -= _round(Decimal(150))
    lines = {
        "base_fee": _round(base_fee),
        "commission": _round(commission),
        "gmv_bonus": _round(gmv_bonus),
        "low_acos_bonus": _round(Decimal(200) if "low_acos_bonus" in fired else ZERO),
        "penalties": penalties,
        "market_multiplier": _round((MULTIPLIERS[item["market"]] - 1) * (base_fee + commission)),
    }
    limit = _round(max(base_fee * Decimal("0.15"), ZERO))
    if -penalties > limit:
        lines["penalty_cap"] = -penalties - limit
    subtotal = sum(lines.values(), ZERO)
    if subtotal < 1000:
        lines["total_floor"] = 1000 - subtotal
    total = sum(lines.values(), ZERO)
    return outcome(total, lines, [w for w in ("gmv_behind", "acos_high") if w in fired])
