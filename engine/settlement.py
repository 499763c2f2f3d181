"""Computing one settlement in the normative order of SPEC §4."""

from __future__ import annotations

import calendar
import datetime
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, DecimalException
from typing import TYPE_CHECKING, Any

from engine.decision import Decision, ExemptionOutcome, FxUsed, Line, RaisedWarning, RuleOutcome
from engine.expressions import Env, Explainer, Scalar, ZeroDivision
from engine.model import Fee, FeeKind, Input, Payout, Period, TierMode, ValueType
from engine.money import (
    ARITHMETIC,
    PLAIN_COUNT,
    PLAIN_DECIMAL,
    QUANTA,
    DecimalTextError,
    is_currency,
    parse_decimal,
    round_to_currency,
)
from engine.problems import Problem, RequestInvalid
from engine.request import MoneyAmount, SettlementRequest
from engine.version import ENGINE_VERSION

if TYPE_CHECKING:
    from engine.compiler import CompiledRuleset

ZERO = Decimal(0)
ONE = Decimal(1)
MAX_NAME_COUNT = 500
_COUNT = ValueType.COUNT  # a module constant: reading a member off an enum class costs a metaclass call
# The parts of a decision are NamedTuples; dozens are made per settlement, and tuple.__new__
# with all fields in order (what NamedTuple._make does) skips the generated __new__'s frame.
_new = tuple.__new__
ctx = ARITHMETIC


#: A rule's name, kind and its precompiled evidence writer, unpacked once per rule per settlement:
#: a plain tuple, because CPython unpacks only exact tuples without making an iterator.
Explained = tuple[str, str, Explainer]


def period_bounds(start: datetime.date, period: Period) -> tuple[datetime.date, datetime.date] | None:
    """First and last day of the period starting at `start`, or None if misaligned."""
    return _period_bounds(start, period is Period.QUARTER)  # cached by a bool: an enum member hashes in Python


@functools.lru_cache(maxsize=4096)
def _period_bounds(start: datetime.date, quarter: bool) -> tuple[datetime.date, datetime.date] | None:
    if start.day != 1 or (quarter and start.month % 3 != 1):
        return None
    months = 3 if quarter else 1
    end_month = start.month + months - 1
    last_day = calendar.monthrange(start.year, end_month)[1]
    return start, datetime.date(start.year, end_month, last_day)


def settle(compiled: CompiledRuleset, request: SettlementRequest) -> Decision:
    """The decision for one request, or RequestInvalid listing what is wrong with it."""
    try:
        return _settle(compiled, request)
    except DecimalException as exc:  # e.g. a value with more digits than exact arithmetic keeps
        raise RequestInvalid(
            [Problem("request.out_of_range", "", f"the values are too large to compute exactly ({type(exc).__name__})")]
        ) from exc


def _settle(compiled: CompiledRuleset, request: SettlementRequest) -> Decision:
    ruleset = compiled.ruleset
    problems: list[Problem] = []
    # 1. the request
    if request.market not in ruleset.markets:
        problems.append(
            Problem("request.market", "market", f"{request.market!r} is not a market of this ruleset ({', '.join(ruleset.markets)})")
        )
    bounds = period_bounds(request.period_start, ruleset.period)
    if bounds is None:
        problems.append(
            Problem("request.period", "period_start", f"{request.period_start} is not the first day of a {ruleset.period.value}")
        )
        period_days = 30
    else:
        period_days = (bounds[1] - bounds[0]).days + 1
    active_days = period_days if request.active_days is None else request.active_days
    if isinstance(active_days, bool) or not isinstance(active_days, int) or not 0 <= active_days <= period_days:
        problems.append(Problem("request.active_days", "active_days", f"{request.active_days!r} is not between 0 and {period_days}"))
        active_days = period_days
    env: dict[str, Scalar] = {"market": request.market, "period_days": Decimal(period_days), "active_days": Decimal(active_days)}
    fx_used: list[FxUsed] = []
    _read_inputs(ruleset.metrics, request.metrics, "metrics", env, problems, compiled, request, fx_used)
    _read_inputs(ruleset.params, request.params, "params", env, problems, compiled, request, fx_used)
    if problems:
        raise RequestInvalid(problems)
    assert bounds is not None

    # 3. exemptions, decided by the matcher over metrics and params
    applied = _decide(compiled.exemption_matcher.decide, env, "exemptions")
    memo: dict[Any, str] = {}  # shown values of this settlement's evidence (exemptions)
    exemptions = tuple(
        [_new(ExemptionOutcome, (name, name in applied, explain(env, memo), en, zh)) for name, explain, en, zh in compiled.exemption_plans]
    )
    # 4. target proration
    days = ZERO
    for exemption in ruleset.exemptions:
        if exemption.name in applied and exemption.prorate_by is not None:
            days = ctx.add(days, _number(exemption.prorate_by.evaluate, env, f"exemptions.{exemption.name}.prorate_targets_by"))
    factor = ONE
    if days:
        days = max(ZERO, min(days, Decimal(period_days)))
        factor = ctx.divide(ctx.subtract(Decimal(period_days), days), Decimal(period_days))
        for param in ruleset.params:
            if param.target:
                env[param.name] = ctx.multiply(env[param.name], factor)  # type: ignore[arg-type]
    for exemption in ruleset.exemptions:
        env[exemption.name] = exemption.name in applied
    # 5. KPIs in order
    for kpi in ruleset.kpis:
        try:
            env[kpi.name] = kpi.formula.evaluate(env)
        except ZeroDivision as exc:
            if kpi.on_zero_division is None:
                raise RequestInvalid(
                    [Problem("kpi.division_by_zero", f"kpis.{kpi.name}", f"{exc}; the KPI declares no on_zero_division")]
                ) from exc
            env[kpi.name] = kpi.on_zero_division
    # 6. every condition, decided by the matcher
    fired = _decide(compiled.condition_matcher.decide, env, "conditions")
    memo = {}  # values may have changed since the exemptions (targets, KPIs): a fresh memo
    rules = tuple([_new(RuleOutcome, (rule, kind, rule in fired, explain(env, memo))) for rule, kind, explain in compiled.rules])
    # 7. fee lines
    lines: list[Line] = []
    penalty_ids: list[str] = []
    places, rounding = ruleset.minor_units, ruleset.rounding
    quantum, mode = QUANTA[places], rounding.decimal_mode  # round_to_currency, inlined for the lines
    for plan in compiled.fee_plans:
        basis, rate, exact, waived_by = plan.compute(env, fired, applied, active_days, period_days)
        env[plan.id] = exact
        amount = exact.quantize(quantum, mode, ctx)
        lines.append(_new(Line, (plan.id, plan.kind, plan.label_en, plan.label_zh, basis, rate, exact, amount, waived_by)))
        if plan.penalty:
            penalty_ids.append(plan.id)
    # 8. market multiplier
    multiplier = ruleset.markets[request.market]
    if multiplier != ONE and ruleset.multiply:
        base = ZERO
        for line in lines:
            if line.id in ruleset.multiply:
                base = ctx.add(base, line.exact)
        rate = ctx.subtract(multiplier, ONE)
        exact = ctx.multiply(rate, base)
        lines.append(
            _adjustment(
                "market_multiplier",
                "Market multiplier",
                "市场系数",
                exact,
                round_to_currency(exact, places, rounding),
                base,
                rate,
            )
        )
    # 10. every line above was rounded as it was made; caps and floors use rounded lines
    # 9. caps and floors
    cap = ruleset.penalty_cap
    if cap is not None and penalty_ids:
        if cap.max is not None:
            limit = cap.max
        else:
            assert cap.max_rate is not None and cap.of is not None
            limit = ctx.multiply(cap.max_rate, _number(cap.of.evaluate, env, "caps.penalties.of"))
        limit = round_to_currency(max(limit, ZERO), places, rounding)
        penalties = -sum((ln.amount for ln in lines if ln.id in penalty_ids), ZERO)
        if penalties > limit:
            excess = ctx.subtract(penalties, limit)
            lines.append(
                _adjustment(
                    "penalty_cap",
                    "Penalty cap",
                    "罚款上限",
                    excess,
                    round_to_currency(excess, places, rounding),
                    penalties,
                    None,
                )
            )
    limits = ruleset.total_limits
    if limits is not None:
        subtotal = ZERO
        for line in lines:
            subtotal = ctx.add(subtotal, line.amount)
        if limits.min is not None and subtotal < limits.min:
            lines.append(
                _adjustment(
                    "total_floor",
                    "Minimum fee",
                    "最低费用",
                    ctx.subtract(limits.min, subtotal),
                    round_to_currency(ctx.subtract(limits.min, subtotal), places, rounding),
                    subtotal,
                    None,
                )
            )
        elif limits.max is not None and subtotal > limits.max:
            lines.append(
                _adjustment(
                    "total_cap",
                    "Maximum fee",
                    "最高费用",
                    ctx.subtract(limits.max, subtotal),
                    round_to_currency(ctx.subtract(limits.max, subtotal), places, rounding),
                    subtotal,
                    None,
                )
            )
    total = ZERO
    for line in lines:
        total = ctx.add(total, line.amount)
    # 11. warnings: a fired warning's evidence is its rule's, written in step 6 (conditions cannot
    # use fee lines, the only names added since, so writing it again would give the same text)
    warnings = tuple([_new(RaisedWarning, (wid, en, zh, rules[i].evidence)) for i, wid, en, zh in compiled.warning_plans if wid in fired])
    # positional, in Decision's field order (tuple.__new__ skips the generated __new__ with 21 keywords)
    return _new(
        Decision,
        (
            ruleset.id,  # ruleset_id
            compiled.version,  # ruleset_version
            compiled.content_hash,
            ENGINE_VERSION,
            ruleset.currency,
            rounding.value,  # rounding
            request.market,  # market
            bounds[0].isoformat(),  # period_start
            bounds[1].isoformat(),  # period_end
            period_days,
            active_days,
            request.as_given(),  # inputs
            tuple(fx_used),  # fx_rates
            exemptions,
            factor,  # target_factor
            tuple([(p.name, env[p.name]) for p in ruleset.params]),  # params
            tuple([(k.name, env[k.name]) for k in ruleset.kpis]),  # kpis
            rules,
            tuple(lines),
            total,
            warnings,
        ),
    )


def _decide(decide: Callable[[Env], set[str]], env: Env, what: str) -> set[str]:
    try:
        return decide(env)
    except ZeroDivision as exc:
        raise RequestInvalid([Problem("expr.division_by_zero", what, str(exc))]) from exc


def _number(evaluate: Callable[[Env], Scalar], env: Env, path: str) -> Decimal:
    try:
        value = evaluate(env)
    except ZeroDivision as exc:
        raise RequestInvalid([Problem("expr.division_by_zero", path, str(exc))]) from exc
    assert isinstance(value, Decimal)
    return value


def _read_inputs(
    declared: tuple[Input, ...],
    given: object,
    section: str,
    env: dict[str, Scalar],
    problems: list[Problem],
    compiled: CompiledRuleset,
    request: SettlementRequest,
    fx_used: list[FxUsed],
) -> None:
    if type(given) is not dict and not isinstance(given, Mapping):  # a dict first: an ABC check costs more
        problems.append(Problem("request.type", section, f"{section} must be a mapping of names to decimal text"))
        return
    if len(given) > MAX_NAME_COUNT:
        problems.append(Problem("request.too_many", section, f"{len(given)} entries; at most {MAX_NAME_COUNT}"))
        return
    known = compiled.input_names[section]
    if not known.issuperset(given):
        for name in given:
            if name not in known:
                shown = name if isinstance(name, str) and len(name) <= 64 else f"{str(name)[:64]}…"
                problems.append(Problem("request.unknown_name", f"{section}.{shown}", f"{shown!r} is not a {section[:-1]} of this ruleset"))
    for item in declared:
        name = item.name
        raw = given.get(name)
        if type(raw) is str and (PLAIN_COUNT if item.type is _COUNT else PLAIN_DECIMAL).fullmatch(raw):
            env[name] = Decimal(raw)  # the common case, checked in one step
        elif raw is None:
            if item.default is None:
                problems.append(Problem("request.missing", f"{section}.{name}", f"{name!r} is required"))
            else:
                env[name] = item.default
        elif isinstance(raw, MoneyAmount):
            value = _money(raw, item, f"{section}.{name}", problems, compiled.ruleset.currency, request, fx_used)
            if value is not None:
                env[name] = value
        else:
            value = _parse(raw, item, section, problems)
            if value is not None:
                env[name] = value


def _money(
    raw: MoneyAmount, item: Input, path: str, problems: list[Problem], currency: str, request: SettlementRequest, fx_used: list[FxUsed]
) -> Decimal | None:
    if item.type is not ValueType.MONEY:
        problems.append(Problem("request.type", path, "only money may carry a currency"))
        return None
    value = _parse(raw.amount, item, path.split(".")[0], problems)
    if value is None or raw.currency == currency:
        return value
    converted = _convert(value, raw.currency, currency, request, path, problems, item.name)
    if converted is None:
        return None
    fx_used.append(converted)
    return converted.converted


def _parse(raw: object, item: Input, section: str, problems: list[Problem]) -> Decimal | None:
    try:
        value = parse_decimal(raw, allow_percent=item.type is ValueType.RATIO)
    except DecimalTextError as exc:
        problems.append(Problem("request.number", f"{section}.{item.name}", str(exc)))
        return None
    if item.type is ValueType.COUNT and (value < 0 or value != value.to_integral_value()):
        problems.append(Problem("request.count", f"{section}.{item.name}", f"{raw} is not a non-negative whole number"))
        return None
    return value


def _convert(
    value: Decimal, source: str, target: str, request: SettlementRequest, path: str, problems: list[Problem], metric: str
) -> FxUsed | None:
    if not is_currency(source):
        problems.append(Problem("request.currency", path, f"{source!r} is not an ISO 4217 currency code"))
        return None
    for rate in request.fx_rates:
        if rate.base == source and rate.quote == target:
            try:
                factor = parse_decimal(rate.rate)
            except DecimalTextError as exc:
                problems.append(Problem("request.fx_rate", "fx_rates", str(exc)))
                return None
            if factor <= 0:
                problems.append(Problem("request.fx_rate", "fx_rates", f"{source}/{target} rate {rate.rate} must be positive"))
                return None
            return FxUsed(metric, source, target, factor, rate.source, rate.as_of, value, ctx.multiply(value, factor))
    problems.append(
        Problem(
            "request.fx_missing",
            path,
            f"{metric} is in {source}; the request needs a {source}→{target} rate (base {source}, quote {target})",
        )
    )
    return None


_Computed = tuple[Decimal | None, Decimal | None, Decimal, tuple[str, ...]]  # basis, rate, exact, waived_by
FeeStep = Callable[[Env, set[str], set[str], int, int], _Computed]


@dataclass(frozen=True)
class FeePlan:
    """A fee prepared once per compiled version: what its line says, and how to compute it.

    `compute(env, fired, applied, active_days, period_days)` gives the line's basis, rate,
    exact amount and the exemptions that waive it (SPEC §4 step 7); the choice of kind,
    mode and payout is made here, once, instead of on every settlement.
    """

    id: str
    kind: str
    label_en: str
    label_zh: str
    penalty: bool
    compute: FeeStep


def plan_fees(fees: Sequence[Fee]) -> tuple[FeePlan, ...]:
    return tuple(FeePlan(f.id, f.kind.value, f.label.en, f.label.zh, f.kind is FeeKind.PENALTY, _fee_step(f)) for f in fees)


def _fee_step(fee: Fee) -> FeeStep:
    kind, path = fee.kind, fee.id
    if kind is FeeKind.FIXED:
        assert fee.amount is not None
        amount = fee.amount.evaluate
        if fee.prorate:

            def prorated(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
                basis = _number(amount, env, path)
                rate = ctx.divide(Decimal(active_days), Decimal(period_days))
                return basis, rate, ctx.multiply(basis, rate), ()

            return prorated

        def fixed(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
            return None, None, _number(amount, env, path), ()

        return fixed
    if kind is FeeKind.PERCENTAGE:
        assert fee.basis is not None and fee.rate is not None
        of, fixed_rate = fee.basis.evaluate, fee.rate

        def percentage(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
            basis = _number(of, env, path)
            return basis, fixed_rate, ctx.multiply(basis, fixed_rate), ()

        return percentage
    if kind is FeeKind.TIERED:
        assert fee.basis is not None
        of = fee.basis.evaluate
        if fee.mode is TierMode.VOLUME:

            def volume(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
                basis = _number(of, env, path)
                rate = _volume_rate(fee, basis)
                return basis, rate, ctx.multiply(max(basis, ZERO), rate), ()

            return volume

        def graduated(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
            basis = _number(of, env, path)
            return basis, None, _graduated(fee, basis), ()

        return graduated
    if kind is FeeKind.BONUS and fee.steps_on is not None:
        # the highest step reached pays; stable sort keeps max()'s choice among equal thresholds
        steps = sorted(fee.steps, key=lambda step: step.threshold, reverse=True)

        def stepped(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
            for step in steps:
                if step.rule in fired:
                    return (*_payout(step.payout, env, path), ())
            return None, None, ZERO, ()

        return stepped
    payout, exempt_by, penalty = fee.payout, fee.exempt_by, kind is FeeKind.PENALTY

    def conditional(env: Env, fired: set[str], applied: set[str], active_days: int, period_days: int) -> _Computed:
        if path not in fired:
            return None, None, ZERO, ()
        basis, rate, exact = _payout(payout, env, path)
        if not penalty:
            return basis, rate, exact, ()
        waived_by = tuple(name for name in exempt_by if name in applied)
        return basis, rate, ZERO if waived_by else ctx.minus(exact), waived_by

    return conditional


def _graduated(fee: Fee, basis: Decimal) -> Decimal:
    """Each slice [from, up_to) of the basis at its tier's rate; nothing below zero."""
    total = ZERO
    for tier in fee.tiers:
        top = basis if tier.upper is None else min(basis, tier.upper)
        if top <= tier.lower:
            break
        total = ctx.add(total, ctx.multiply(ctx.subtract(top, tier.lower), tier.rate))
    return total


def _volume_rate(fee: Fee, basis: Decimal) -> Decimal:
    """The rate of the tier the basis reaches, [from, up_to); a basis below zero earns nothing."""
    if basis <= 0:
        return ZERO
    return next(t.rate for t in fee.tiers if t.upper is None or basis < t.upper)


def _payout(payout: Payout, env: Env, path: str) -> tuple[Decimal | None, Decimal | None, Decimal]:
    if payout.amount is not None:
        return None, None, _number(payout.amount.evaluate, env, path)
    assert payout.rate is not None and payout.of is not None
    basis = _number(payout.of.evaluate, env, path)
    return basis, payout.rate, ctx.multiply(basis, payout.rate)


def _adjustment(line_id: str, en: str, zh: str, exact: Decimal, amount: Decimal, basis: Decimal | None, rate: Decimal | None) -> Line:
    return Line(line_id, "adjustment", en, zh, basis, rate, exact, amount)
