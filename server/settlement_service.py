"""SettlementService: idempotent settlement, corrections, batches, reads, explanation, audit."""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import settlement_service_pb2 as ss
from kpisettle.v1 import settlement_service_pb2_grpc as ss_grpc

from engine import RequestInvalid, compile_ruleset
from engine.decision import canonical_json
from engine.explain import explain_decision
from engine.money import plain
from server import convert
from server.auth import Principal, current_principal
from server.errors import ServiceError, Violation, invalid, rpc_errors, to_status
from server.paging import decode_token, encode_token, page_size
from server.storage.interface import Conflict, NewSettlement, SettlementFilter, SettlementRecord, Store
from server.versions import VersionRegistry

log = logging.getLogger("kpisettle.settle")

MAX_REQUEST_ID = 128
MAX_BATCH_ITEMS_PER_MESSAGE = 1000
MAX_REVISION_RETRIES = 8


@dataclass(frozen=True)
class Settled:
    record: SettlementRecord
    decision: dict[str, Any]
    deltas: list[dict[str, str]]
    deduplicated: bool

    def message(self) -> pb.Settlement:
        return convert.settlement_message(self.decision, self.record, self.deltas, self.record.data.request_json)


class Settler:
    """The settle path shared by Settle and SettleBatch (SPEC §7 idempotency and corrections)."""

    def __init__(self, store: Store, registry: VersionRegistry) -> None:
        self._store = store
        self._registry = registry

    def settle(self, principal: Principal, request_id: str, message: pb.SettlementInput, expected_revision: int | None) -> Settled:
        _check_request_id(request_id)
        violations = convert.check_input(message, "input")
        if violations:
            raise invalid("the settlement input is invalid", violations, "INPUT_INVALID")
        if expected_revision is not None and expected_revision < 0:
            raise invalid("expected_revision must not be negative", [Violation("expected_revision", "negative")])
        payload = convert.fingerprint_payload(message, expected_revision)
        fingerprint = hashlib.sha256(payload).hexdigest()
        tenant = principal.tenant
        existing = self._store.settlement_by_request(tenant, request_id)
        if existing is not None:
            return self._replayed(existing, fingerprint)
        ruleset_id, pinned = convert.ruleset_name(message.ruleset, "input.ruleset", versioned=None)
        request = convert.engine_request(message)
        chosen = self._registry.choose(tenant, ruleset_id, pinned, request.period_start, allow_draft=False)
        decision_object = chosen.compiled.settle(request)
        _check_period_end(message, decision_object.period_end)
        decision = decision_object.to_dict()
        decision_json = decision_object.to_canonical_json()
        for _ in range(MAX_REVISION_RETRIES):
            latest = self._store.latest_settlement(tenant, message.contract_id, request.period_start)
            previous = convert.load_json(latest.data.decision_json) if latest else None
            deltas = convert.line_deltas(previous, decision)
            new = NewSettlement(
                tenant=tenant,
                request_id=request_id,
                request_fingerprint=fingerprint,
                contract_id=message.contract_id,
                seller_id=message.seller_id,
                market=message.market,
                period_start=request.period_start,
                period_end=_date(decision_object.period_end),
                ruleset_id=chosen.record.ruleset_id,
                ruleset_version=chosen.record.version,
                content_hash=chosen.record.content_hash,
                engine_version=decision_object.engine_version,
                currency=decision_object.currency,
                total=decision["total"],
                request_json=payload,
                decision_json=decision_json,
                deltas_json=canonical_json(deltas),
                principal=principal.name,
                expected_revision=expected_revision,
            )
            try:
                record = self._store.append_settlement(new, latest)
            except Conflict as conflict:
                if conflict.reason == "DUPLICATE_REQUEST_ID":  # a concurrent duplicate won
                    winner = self._store.settlement_by_request(tenant, request_id)
                    if winner is None:
                        raise
                    return self._replayed(winner, fingerprint)
                if conflict.reason == "EXPECTED_REVISION_MISMATCH":
                    current = latest.revision if latest else 0
                    raise ServiceError(
                        grpc.StatusCode.ABORTED,
                        "REVISION_MISMATCH",
                        f"expected revision {expected_revision}, but the latest revision of this contract period is {current}",
                        metadata={"expectedRevision": str(expected_revision), "latestRevision": str(current)},
                    ) from conflict
                if conflict.reason == "REVISION_TAKEN" and expected_revision is None:
                    continue  # another correction landed first: recompute the deltas against it
                raise
            return Settled(record, decision, deltas, False)
        raise ServiceError(grpc.StatusCode.ABORTED, "CONTENTION", "too many concurrent corrections of this contract period; retry")

    def _replayed(self, existing: SettlementRecord, fingerprint: str) -> Settled:
        if existing.data.request_fingerprint != fingerprint:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "REQUEST_ID_REUSED",
                f"request_id {existing.data.request_id!r} was already used with a different payload (settlements/{existing.settlement_id})",
                metadata={"requestId": existing.data.request_id, "settlement": f"settlements/{existing.settlement_id}"},
            )
        return Settled(existing, convert.load_json(existing.data.decision_json), convert.load_json(existing.data.deltas_json), True)


def _check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise invalid("request_id is required", [Violation("request_id", f"1 to {MAX_REQUEST_ID} printable characters")])


def _check_period_end(message: pb.SettlementInput, period_end: str) -> None:
    if message.HasField("period_end_date"):
        given = f"{message.period_end_date.year:04}-{message.period_end_date.month:02}-{message.period_end_date.day:02}"
        if given != period_end:
            raise invalid(
                "period_end_date does not end the ruleset's period",
                [Violation("input.period_end_date", f"{given}; the period ends {period_end}")],
            )


def _date(text: str) -> datetime.date:
    return datetime.date.fromisoformat(text)


class SettlementService(ss_grpc.SettlementServiceServicer):  # type: ignore[misc]
    def __init__(self, store: Store, registry: VersionRegistry) -> None:
        self._store = store
        self._registry = registry
        self._settler = Settler(store, registry)

    @rpc_errors
    def Settle(self, request: ss.SettleRequest, context: grpc.ServicerContext) -> ss.SettleResponse:
        expected = request.expected_revision if request.HasField("expected_revision") else None
        settled = self._settler.settle(current_principal(), request.request_id, request.input, expected)
        return ss.SettleResponse(settlement=settled.message(), deduplicated=settled.deduplicated)

    def SettleBatch(self, requests: Iterator[ss.SettleBatchRequest], context: grpc.ServicerContext) -> Iterator[ss.SettleBatchResponse]:
        principal = current_principal()
        index = 0
        for batch in requests:
            if len(batch.items) > MAX_BATCH_ITEMS_PER_MESSAGE:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_BATCH_ITEMS_PER_MESSAGE} items per message")
            response = ss.SettleBatchResponse()
            for item in batch.items:
                result = ss.SettleBatchResult(request_id=item.request_id, item_index=index)
                index += 1
                expected = item.expected_revision if item.HasField("expected_revision") else None
                try:
                    settled = self._settler.settle(principal, item.request_id, item.input, expected)
                except Exception as error:  # every item gets an answer; the stream goes on
                    result.error.CopyFrom(to_status(error))
                else:
                    result.settlement.CopyFrom(settled.message())
                    result.deduplicated = settled.deduplicated
                response.results.append(result)
            yield response

    @rpc_errors
    def Simulate(self, request: ss.SimulateRequest, context: grpc.ServicerContext) -> ss.SimulateResponse:
        message = request.input
        violations = convert.check_input(message, "input")
        if violations:
            raise invalid("the settlement input is invalid", violations, "INPUT_INVALID")
        ruleset_id, pinned = convert.ruleset_name(message.ruleset, "input.ruleset", versioned=None)
        engine_request = convert.engine_request(message)
        chosen = self._registry.choose(current_principal().tenant, ruleset_id, pinned, engine_request.period_start, allow_draft=True)
        decision = chosen.compiled.settle(engine_request)
        _check_period_end(message, decision.period_end)
        settlement = convert.settlement_message(decision.to_dict(), None, [], convert.fingerprint_payload(message, None))
        settlement.contract_id, settlement.seller_id = message.contract_id, message.seller_id
        return ss.SimulateResponse(settlement=settlement)

    def _stored(self, name: str) -> Settled:
        record = self._store.get_settlement(current_principal().tenant, convert.settlement_id(name))
        return Settled(record, convert.load_json(record.data.decision_json), convert.load_json(record.data.deltas_json), False)

    @rpc_errors
    def GetSettlement(self, request: ss.GetSettlementRequest, context: grpc.ServicerContext) -> ss.GetSettlementResponse:
        return ss.GetSettlementResponse(settlement=self._stored(request.name).message())

    @rpc_errors
    def ListSettlements(self, request: ss.ListSettlementsRequest, context: grpc.ServicerContext) -> ss.ListSettlementsResponse:
        violations: list[Violation] = []
        period_from = (
            convert.to_date(request.period_start_from_date, "period_start_from_date", violations)
            if request.HasField("period_start_from_date")
            else None
        )
        period_to = (
            convert.to_date(request.period_start_to_date, "period_start_to_date", violations)
            if request.HasField("period_start_to_date")
            else None
        )
        ruleset_id = convert.ruleset_name(request.ruleset, "ruleset", versioned=False)[0] if request.ruleset else None
        if violations:
            raise invalid("the filter is invalid", violations)
        where = SettlementFilter(
            contract_id=request.contract_id or None,
            seller_id=request.seller_id or None,
            market=request.market or None,
            ruleset_id=ruleset_id,
            period_from=period_from,
            period_to=period_to,
            latest_only=not request.include_superseded,
        )
        size = page_size(request.page_size)
        token = decode_token("settlements", request.page_token)
        after = (_date(token[0]), token[1], int(token[2])) if token else None
        records = self._store.list_settlements(current_principal().tenant, where, size + 1, after)
        more = len(records) > size
        records = records[:size]
        next_token = ""
        if more and records:
            last = records[-1]
            next_token = encode_token("settlements", [last.data.period_start.isoformat(), last.data.contract_id, last.revision])
        messages = [
            Settled(r, convert.load_json(r.data.decision_json), convert.load_json(r.data.deltas_json), False).message() for r in records
        ]
        return ss.ListSettlementsResponse(settlements=messages, next_page_token=next_token)

    @rpc_errors
    def GetFeeBreakdown(self, request: ss.GetFeeBreakdownRequest, context: grpc.ServicerContext) -> ss.GetFeeBreakdownResponse:
        settled = self._stored(request.name)
        message = settled.message()
        previous_total = "0"
        if settled.record.supersedes_id:
            previous = self._store.get_settlement(current_principal().tenant, settled.record.supersedes_id)
            previous_total = previous.data.total
        currency = message.currency_code
        return ss.GetFeeBreakdownResponse(
            settlement=message.name,
            contract_id=message.contract_id,
            seller_id=message.seller_id,
            market=message.market,
            period_start_date=message.period_start_date,
            period_end_date=message.period_end_date,
            revision=message.revision,
            supersedes=message.supersedes,
            currency_code=currency,
            lines=message.lines,
            total=message.total,
            previous_total=pb.Money(amount=previous_total, currency_code=currency),
            total_delta=pb.Money(amount=plain(Decimal(message.total.amount) - Decimal(previous_total)), currency_code=currency),
            deltas=message.deltas,
        )

    @rpc_errors
    def ExplainSettlement(self, request: ss.ExplainSettlementRequest, context: grpc.ServicerContext) -> ss.ExplainSettlementResponse:
        language = request.language_code or "en"
        if language not in ("en", "zh"):
            raise invalid("language_code must be en or zh", [Violation("language_code", f"{language[:16]!r} is not supported")])
        settled = self._stored(request.name)
        return ss.ExplainSettlementResponse(language_code=language, sentences=explain_decision(settled.decision, language))

    @rpc_errors
    def ReplaySettlement(self, request: ss.ReplaySettlementRequest, context: grpc.ServicerContext) -> ss.ReplaySettlementResponse:
        settled = self._stored(request.name)
        data = settled.record.data
        stored_version = self._store.get_ruleset_version(data.tenant, data.ruleset_id, data.ruleset_version)
        compiled = compile_ruleset(stored_version.source, stored_version.version)
        try:
            message = convert.input_from_dict(convert.load_json(data.request_json)["input"])
            try:
                replayed = compiled.settle(convert.engine_request(message)).to_canonical_json()
            except RequestInvalid as exc:
                return ss.ReplaySettlementResponse(match=False, first_difference=f"the stored inputs no longer settle: {exc}")
        finally:
            compiled.close()
        if replayed == data.decision_json:
            return ss.ReplaySettlementResponse(match=True, engine_version=convert.load_json(replayed)["engine_version"])
        return ss.ReplaySettlementResponse(
            match=False,
            first_difference=first_difference(convert.load_json(data.decision_json), convert.load_json(replayed)),
            engine_version=convert.load_json(replayed)["engine_version"],
        )

    @rpc_errors
    def VerifyAuditLog(self, request: ss.VerifyAuditLogRequest, context: grpc.ServicerContext) -> ss.VerifyAuditLogResponse:
        report = self._store.verify_tenant_chain(current_principal().tenant)
        problem = report.problem
        if problem is None:
            return ss.VerifyAuditLogResponse(ok=True, records_checked=report.records)
        return ss.VerifyAuditLogResponse(
            ok=False,
            records_checked=report.records,
            failed_sequence=problem.chain_seq,
            failure=problem.kind.value,
            failed_record=problem.key,
        )


def first_difference(stored: Any, replayed: Any, path: str = "") -> str:
    """The first JSON path where two decisions differ, with both values."""
    if isinstance(stored, dict) and isinstance(replayed, dict):
        for key in sorted(set(stored) | set(replayed)):
            if stored.get(key) != replayed.get(key):
                return first_difference(stored.get(key), replayed.get(key), f"{path}.{key}" if path else key)
    elif isinstance(stored, list) and isinstance(replayed, list):
        for i, (a, b) in enumerate(zip(stored, replayed, strict=False)):
            if a != b:
                return first_difference(a, b, f"{path}[{i}]")
        if len(stored) != len(replayed):
            return f"{path}: {len(stored)} items stored, {len(replayed)} recomputed"
    return f"{path}: stored {stored!r}, recomputed {replayed!r}"
