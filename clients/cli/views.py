"""The client library's values as `Report`s: what `get`, `list`, `breakdown`, `rulesets show`… print."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clients.kpisettle_client import (
    AuditReport,
    Explanation,
    FeeBreakdown,
    ImpactReport,
    Line,
    ReplayResult,
    RulesetChange,
    RulesetVersion,
    Settlement,
)

from .output import Block, Lines, Pairs, Report, Table

SETTLEMENT_COLUMNS = (
    "name",
    "contract_id",
    "seller_id",
    "market",
    "period_start",
    "period_end",
    "revision",
    "ruleset_version",
    "currency",
    "total",
)
LINE_COLUMNS = ("id", "kind", "label", "basis", "rate", "exact", "amount", "waived_by")
BREAKDOWN_COLUMNS = (
    "settlement",
    "contract_id",
    "seller_id",
    "period_start",
    "revision",
    "currency",
    "line",
    "kind",
    "label",
    "basis",
    "rate",
    "amount",
    "previous_amount",
    "delta",
)
VERSION_COLUMNS = ("name", "state", "title", "currency", "effective_from", "author", "approver", "examples_pass")
CHANGE_COLUMNS = ("change", "path", "description", "before", "after")
IMPACT_COLUMNS = ("settlement", "contract_id", "period_start", "currency", "old_total", "new_total", "delta", "error")
REPLAY_COLUMNS = ("name", "match", "first_difference", "engine_version")


def line_row(line: Line) -> dict[str, Any]:
    return {
        "id": line.id,
        "kind": line.kind,
        "label": line.label,
        "label_zh": line.label_zh,
        "basis": line.basis,
        "rate": line.rate,
        "exact": line.exact,
        "amount": line.amount,
        "waived_by": " ".join(line.waived_by),
    }


def settlement_columns(s: Settlement) -> dict[str, Any]:
    """The columns that say which contract period and revision a row belongs to."""
    return {
        "contract_id": s.contract_id,
        "seller_id": s.seller_id,
        "market": s.market,
        "period_start": s.period_start,
        "period_end": s.period_end,
        "revision": s.revision,
        "ruleset_version": s.ruleset_version,
    }


def settlement_row(s: Settlement) -> dict[str, Any]:
    return {"name": s.name, **settlement_columns(s), "currency": s.currency, "total": s.total}


def settlement_data(s: Settlement) -> dict[str, Any]:
    return {
        **settlement_row(s),
        "supersedes": s.supersedes,
        "request_id": s.request_id,
        "deduplicated": s.deduplicated,
        "lines": [{**line_row(line), "waived_by": list(line.waived_by)} for line in s.lines],
        "deltas": [{"id": d.id, "previous_amount": d.previous_amount, "amount": d.amount, "delta": d.delta} for d in s.deltas],
        "kpis": dict(s.kpis),
        "rules": [{"rule": r.rule, "kind": r.kind, "fired": r.fired, "evidence": r.evidence} for r in s.rules],
        "exemptions": [{"name": e.name, "applied": e.applied, "evidence": e.evidence} for e in s.exemptions],
        "warnings": [{"id": w.id, "message": w.message, "message_zh": w.message_zh, "evidence": w.evidence} for w in s.warnings],
        "engine_version": s.engine_version,
        "principal": s.principal,
        "create_time": s.create_time,
    }


def settlement(s: Settlement) -> Report:
    """One decision: its summary, then its lines (CSV: the summary row)."""
    head = settlement_row(s)
    if s.supersedes:
        head["supersedes"] = s.supersedes
    if s.deduplicated:
        head["deduplicated"] = True
    blocks: list[Block] = [Pairs(head), Table([line_row(line) for line in s.lines], LINE_COLUMNS, empty="(no lines)")]
    if s.revision > 1:  # a correction: what changed against the revision it supersedes
        changed = [
            {"line": d.id, "previous_amount": d.previous_amount, "amount": d.amount, "delta": d.delta} for d in s.deltas if d.delta != 0
        ]
        blocks.append(Table(changed, ("line", "previous_amount", "amount", "delta"), empty="(no line changed)"))
    if s.kpis:
        blocks.append(Table([{"kpi": k, "value": v} for k, v in s.kpis.items()], ("kpi", "value")))
    if s.warnings:
        blocks.append(Lines("\n".join(f"warning {w.id}: {w.message}" for w in s.warnings)))
    return Report(settlement_data(s), [settlement_row(s)], SETTLEMENT_COLUMNS, blocks)


def settlements(items: Sequence[Settlement]) -> Report:
    rows = [settlement_row(s) for s in items]
    return Report(rows, rows, SETTLEMENT_COLUMNS, [Table(rows, SETTLEMENT_COLUMNS, empty="(no settlements)")])


def breakdown(b: FeeBreakdown) -> Report:
    """What billing invoices. CSV: one row per invoice line, with the settlement's columns repeated."""
    deltas = {d.id: d for d in b.deltas}
    head: dict[str, Any] = {
        "settlement": b.settlement,
        "contract_id": b.contract_id,
        "seller_id": b.seller_id,
        "market": b.market,
        "period_start": b.period_start,
        "period_end": b.period_end,
        "revision": b.revision,
        "supersedes": b.supersedes,
        "currency": b.currency,
        "total": b.total,
        "previous_total": b.previous_total,
        "total_delta": b.total_delta,
    }
    rows: list[dict[str, Any]] = []
    for line in b.lines:
        delta = deltas.get(line.id)
        rows.append(
            {
                "settlement": b.settlement,
                "contract_id": b.contract_id,
                "seller_id": b.seller_id,
                "period_start": b.period_start,
                "revision": b.revision,
                "currency": b.currency,
                "line": line.id,
                "kind": line.kind,
                "label": line.label,
                "label_zh": line.label_zh,
                "basis": line.basis,
                "rate": line.rate,
                "exact": line.exact,
                "amount": line.amount,
                "previous_amount": delta.previous_amount if delta else None,
                "delta": delta.delta if delta else None,
            }
        )
    data = {
        **head,
        "lines": rows,
        "deltas": [{"id": d.id, "previous_amount": d.previous_amount, "amount": d.amount, "delta": d.delta} for d in b.deltas],
    }
    shown = ("line", "kind", "label", "basis", "rate", "amount", "previous_amount", "delta")
    return Report(data, rows, BREAKDOWN_COLUMNS, [Pairs(head), Table(rows, shown, empty="(no lines)")])


def explanation(e: Explanation) -> Report:
    rows = [{"n": i, "sentence": s} for i, s in enumerate(e.sentences, 1)]
    return Report({"language": e.language, "sentences": list(e.sentences)}, rows, ("n", "sentence"), [Lines("\n".join(e.sentences))])


def audit(a: AuditReport) -> Report:
    row: dict[str, Any] = {
        "ok": a.ok,
        "records_checked": a.records_checked,
        "failed_sequence": a.failed_sequence if not a.ok else None,
        "failure": a.failure,
        "failed_record": a.failed_record,
        "head_sequence": a.head_sequence,
        "head_hash": a.head_hash,
    }
    shown = row if not a.ok else {"ok": True, "records_checked": a.records_checked, "head": f"{a.head_sequence}:{a.head_hash}"}
    return Report(row, [row], tuple(row), [Pairs(shown)])


def replays(results: Sequence[tuple[str, ReplayResult]]) -> Report:
    rows = [{"name": n, "match": r.match, "first_difference": r.first_difference, "engine_version": r.engine_version} for n, r in results]
    return Report(rows, rows, REPLAY_COLUMNS, [Table(rows, REPLAY_COLUMNS)])


def version_row(v: RulesetVersion) -> dict[str, Any]:
    return {
        "name": v.name,
        "state": v.state.value,
        "title": v.title,
        "currency": v.currency,
        "effective_from": v.effective_from,
        "author": v.author,
        "approver": v.approver,
        "examples_pass": v.examples_pass,
    }


def version(v: RulesetVersion, *, with_source: bool = False) -> Report:
    row = version_row(v)
    data: dict[str, Any] = {
        **row,
        "content_hash": v.content_hash,
        "create_time": v.create_time,
        "approve_time": v.approve_time,
        "retire_time": v.retire_time,
        "warnings": [{"code": p.code, "path": p.path, "message": p.message, "line": p.line, "column": p.column} for p in v.warnings],
        "events": [{"action": e.action, "principal": e.principal, "time": e.time, "note": e.note} for e in v.events],
        "source": v.source,
    }
    head = {**row, "content_hash": v.content_hash}
    blocks: list[Block] = [Pairs(head)]
    if v.events:
        events = [{"action": e.action, "principal": e.principal, "time": e.time, "note": e.note} for e in v.events]
        blocks.append(Table(events, ("action", "principal", "time", "note")))
    if v.warnings:
        blocks.append(Lines("\n".join(f"warning: {p}" for p in v.warnings)))
    if with_source and v.source:
        blocks.append(Lines(v.source.rstrip("\n")))
    return Report(data, [row], VERSION_COLUMNS, blocks)


def versions(items: Sequence[RulesetVersion]) -> Report:
    rows = [version_row(v) for v in items]
    return Report(rows, rows, VERSION_COLUMNS, [Table(rows, VERSION_COLUMNS, empty="(no ruleset versions)")])


def changes(items: Sequence[RulesetChange]) -> Report:
    rows = [{"change": c.change, "path": c.path, "description": c.description, "before": c.before, "after": c.after} for c in items]
    return Report(rows, rows, CHANGE_COLUMNS, [Table(rows, CHANGE_COLUMNS, empty="(no changes)")])


def impact(r: ImpactReport) -> Report:
    rows = [
        {
            "settlement": i.settlement,
            "contract_id": i.contract_id,
            "period_start": i.period_start,
            "currency": i.currency,
            "old_total": i.old_total,
            "new_total": i.new_total,
            "delta": i.delta,
            "error": i.error,
        }
        for i in r.impacts
    ]
    totals = [{"currency": t.currency, "old_total": t.old_total, "new_total": t.new_total, "delta": t.delta} for t in r.totals]
    data = {"settlements_analyzed": r.settlements_analyzed, "settlements_failed": r.settlements_failed, "impacts": rows, "totals": totals}
    blocks: list[Block] = [
        Table(rows, IMPACT_COLUMNS, empty="(no settlements in the period)"),
        Table(totals, ("currency", "old_total", "new_total", "delta"), empty="(no totals)"),
        Lines(f"{r.settlements_analyzed} analyzed, {r.settlements_failed} failed"),
    ]
    return Report(data, rows, IMPACT_COLUMNS, blocks)
