"""Messages ↔ the library's dataclasses. No calls and no policy here."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from decimal import MAX_PREC, Context, Decimal
from typing import Any

from google.type import date_pb2
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from .decimals import decimal_text, parse, parse_optional, plain
from .models import (
    AuditReport,
    ExampleResult,
    ExemptionOutcome,
    Explanation,
    FeeBreakdown,
    ImpactReport,
    ImpactTotal,
    LifecycleEvent,
    Line,
    LineDelta,
    Money,
    ReplayResult,
    RuleOutcome,
    RulesetChange,
    RulesetProblem,
    RulesetState,
    RulesetVersion,
    Settlement,
    SettlementImpact,
    SettlementInput,
    SettlementWarning,
    Validation,
)

#: Sums over pages never round, however many pages.
EXACT = Context(prec=MAX_PREC)

# ------------------------------------------------------------------ dates and times


def date_message(value: datetime.date) -> Any:
    """A google.type.Date."""
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def date_value(message: Any) -> datetime.date | None:
    """A google.type.Date as a date; None when unset (all zero) or not a whole date."""
    try:
        return datetime.date(int(message.year), int(message.month), int(message.day))
    except ValueError:
        return None


def time_value(owner: Any, field: str) -> datetime.datetime | None:
    if not owner.HasField(field):
        return None
    stamp = getattr(owner, field)
    result: datetime.datetime = stamp.ToDatetime(tzinfo=datetime.UTC)
    return result


# ------------------------------------------------------------------ inputs


def input_message(value: SettlementInput) -> pb.SettlementInput:
    """The SettlementInput message; amounts become exact decimal text (floats were refused earlier)."""
    message = pb.SettlementInput(
        contract_id=value.contract_id,
        seller_id=value.seller_id,
        market=value.market,
        ruleset=value.ruleset,
    )
    message.period_start_date.CopyFrom(date_message(value.period_start))
    if value.period_end is not None:
        message.period_end_date.CopyFrom(date_message(value.period_end))
    for name, metric in value.metrics.items():
        if isinstance(metric, Money):
            message.metrics[name].value = decimal_text(metric.amount, f"metric {name!r}")
            message.metrics[name].currency_code = metric.currency
        else:
            message.metrics[name].value = decimal_text(metric, f"metric {name!r}")
    for name, param in value.params.items():
        message.params[name] = decimal_text(param, f"param {name!r}")
    for rate in value.fx_rates:
        fx = message.fx_rates.add(
            base_currency_code=rate.base,
            quote_currency_code=rate.quote,
            rate=decimal_text(rate.rate, "FxRate.rate"),
            source=rate.source,
        )
        if rate.as_of is not None:
            fx.as_of_date.CopyFrom(date_message(rate.as_of))
    if value.active_days is not None:
        message.active_days = value.active_days
    return message


# ------------------------------------------------------------------ settlements


def line(message: pb.Line) -> Line:
    return Line(
        id=message.id,
        kind=message.kind,
        label=message.label,
        label_zh=message.label_zh,
        basis=parse_optional(message.basis),
        rate=parse_optional(message.rate),
        exact=parse(message.exact_amount or message.amount.amount),
        amount=parse(message.amount.amount),
        waived_by=tuple(message.waived_by),
    )


def line_delta(message: pb.LineDelta) -> LineDelta:
    return LineDelta(message.id, parse(message.previous_amount), parse(message.amount), parse(message.delta))


def settlement(message: pb.Settlement, deduplicated: bool = False) -> Settlement:
    return Settlement(
        name=message.name,
        contract_id=message.contract_id,
        seller_id=message.seller_id,
        market=message.market,
        period_start=date_value(message.period_start_date),
        period_end=date_value(message.period_end_date),
        revision=message.revision,
        supersedes=message.supersedes,
        request_id=message.request_id,
        ruleset_version=message.ruleset_version,
        currency=message.currency_code or message.total.currency_code,
        total=parse(message.total.amount),
        lines=tuple(line(m) for m in message.lines),
        deltas=tuple(line_delta(m) for m in message.deltas),
        kpis={k.name: parse(k.value) for k in message.kpis},
        rules=tuple(RuleOutcome(r.rule, r.kind, r.fired, r.evidence) for r in message.rules),
        exemptions=tuple(ExemptionOutcome(e.name, e.applied, e.evidence) for e in message.exemptions),
        warnings=tuple(SettlementWarning(w.id, w.message, w.message_zh, w.evidence) for w in message.warnings),
        engine_version=message.engine_version,
        principal=message.principal,
        create_time=time_value(message, "create_time"),
        deduplicated=deduplicated,
        message=message,
    )


def fee_breakdown(message: ss.GetFeeBreakdownResponse) -> FeeBreakdown:
    return FeeBreakdown(
        settlement=message.settlement,
        contract_id=message.contract_id,
        seller_id=message.seller_id,
        market=message.market,
        period_start=date_value(message.period_start_date),
        period_end=date_value(message.period_end_date),
        revision=message.revision,
        supersedes=message.supersedes,
        currency=message.currency_code,
        lines=tuple(line(m) for m in message.lines),
        total=parse(message.total.amount),
        previous_total=parse(message.previous_total.amount),
        total_delta=parse(message.total_delta.amount),
        deltas=tuple(line_delta(m) for m in message.deltas),
        message=message,
    )


def explanation(message: ss.ExplainSettlementResponse) -> Explanation:
    return Explanation(message.language_code, tuple(message.sentences))


def replay(message: ss.ReplaySettlementResponse) -> ReplayResult:
    return ReplayResult(message.match, message.first_difference, message.engine_version)


def audit(message: ss.VerifyAuditLogResponse) -> AuditReport:
    return AuditReport(
        message.ok,
        message.records_checked,
        message.failed_sequence,
        message.failure,
        message.failed_record,
        message.head_sequence,
        message.head_hash,
    )


# ------------------------------------------------------------------ rulesets

_STATES = {
    pb.RulesetVersion.STATE_DRAFT: RulesetState.DRAFT,
    pb.RulesetVersion.STATE_APPROVED: RulesetState.APPROVED,
    pb.RulesetVersion.STATE_RETIRED: RulesetState.RETIRED,
}


def problem(message: pb.RulesetProblem) -> RulesetProblem:
    return RulesetProblem(message.code, message.path, message.message, message.severity, message.line, message.column)


def ruleset_version(message: pb.RulesetVersion) -> RulesetVersion:
    return RulesetVersion(
        name=message.name,
        state=_STATES.get(message.state, RulesetState.UNSPECIFIED),
        title=message.title,
        currency=message.currency_code,
        effective_from=date_value(message.effective_from_date),
        content_hash=message.content_hash,
        author=message.author,
        approver=message.approver,
        create_time=time_value(message, "create_time"),
        approve_time=time_value(message, "approve_time"),
        retire_time=time_value(message, "retire_time"),
        examples_pass=message.examples_pass,
        warnings=tuple(problem(p) for p in message.warnings),
        events=tuple(LifecycleEvent(e.action, e.principal, time_value(e, "time"), e.note) for e in message.events),
        source=message.source,
        message=message,
    )


def validation(message: rs.ValidateRulesetResponse) -> Validation:
    return Validation(
        valid=message.valid,
        examples_pass=message.examples_pass,
        problems=tuple(problem(p) for p in message.problems),
        examples=tuple(ExampleResult(e.name, e.passed, tuple(e.mismatches)) for e in message.examples),
        ruleset_id=message.ruleset_id,
        content_hash=message.content_hash,
        message=message,
    )


def change(message: rs.RulesetChange) -> RulesetChange:
    return RulesetChange(message.change, message.path, message.description, message.before, message.after)


def impact(pages: Iterable[rs.AnalyzeImpactResponse]) -> ImpactReport:
    """Every page of one AnalyzeImpact as one report. The service's totals and counts cover
    one page each, so they are summed here, per currency, exactly (never rounded)."""
    merged = rs.AnalyzeImpactResponse()
    sums: dict[str, list[Decimal]] = {}
    for page in pages:
        merged.impacts.extend(page.impacts)
        merged.settlements_analyzed += page.settlements_analyzed
        merged.settlements_failed += page.settlements_failed
        for t in page.totals:
            old, new, delta = sums.setdefault(t.currency_code, [Decimal(0), Decimal(0), Decimal(0)])
            sums[t.currency_code] = [
                EXACT.add(old, parse(t.old_total)),
                EXACT.add(new, parse(t.new_total)),
                EXACT.add(delta, parse(t.delta)),
            ]
    totals = tuple(ImpactTotal(code, old, new, delta) for code, (old, new, delta) in sorted(sums.items()))
    merged.totals.extend(
        rs.ImpactTotal(currency_code=t.currency, old_total=plain(t.old_total), new_total=plain(t.new_total), delta=plain(t.delta))
        for t in totals
    )
    impacts = tuple(
        SettlementImpact(
            settlement=i.settlement,
            contract_id=i.contract_id,
            period_start=date_value(i.period_start_date),
            currency=i.old_total.currency_code,
            old_total=parse(i.old_total.amount),
            new_total=parse_optional(i.new_total.amount),
            delta=parse_optional(i.delta),
            error=i.error,
        )
        for i in merged.impacts
    )
    return ImpactReport(impacts, totals, merged.settlements_analyzed, merged.settlements_failed, merged)
