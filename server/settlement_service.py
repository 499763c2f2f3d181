"""SettlementService: idempotent settlement, corrections, batches, reads, explanation, audit."""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
from grpc_status import rpc_status
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import settlement_service_pb2 as ss
from kpisettle.v1 import settlement_service_pb2_grpc as ss_grpc

from engine import ENGINE_VERSION, Decision, RequestInvalid
from engine.decision import canonical_json
from engine.explain import explain_decision
from engine.money import plain
from engine.settlement import period_bounds
from server import convert
from server.auth import Principal, current_principal
from server.errors import ServiceError, Violation, invalid, rpc_errors, to_status
from server.paging import decode_token, encode_token, page_size
from server.storage.interface import (
    Append,
    Conflict,
    NewSettlement,
    NotFound,
    SettlementFilter,
    SettlementRecord,
    Store,
    StoreError,
    VersionsChanged,
)
from server.versions import Chosen, VersionRegistry
from server.write_priority import WritePriority

log = logging.getLogger("kpisettle.settle")

MAX_REQUEST_ID = 128
MAX_BATCH_ITEMS_PER_MESSAGE = 1000
MAX_RESPONSE_BYTES = 1024 * 1024  # well under the 4 MiB message limit
MAX_SETTLEMENTS_PAGE = 200  # full settlements: a page stays under the 4 MiB message limit
MAX_REVISION_RETRIES = 8
#: SettleBatch stores the new settlements of this many items per transaction: one commit
#: (the fsync) for all of them, and the tenant's write lock held for well under a second.
MAX_ITEMS_PER_TRANSACTION = 250


@dataclass(frozen=True)
class Settled:
    record: SettlementRecord
    decision: dict[str, Any]
    deltas: list[dict[str, str]]
    deduplicated: bool

    @classmethod
    def of(cls, record: SettlementRecord, deduplicated: bool = False) -> Settled:
        """A stored record with its decision and deltas read back."""
        return cls(record, convert.load_json(record.data.decision_json), convert.load_json(record.data.deltas_json), deduplicated)

    def message(self, into: pb.Settlement | None = None) -> pb.Settlement:
        """The Settlement, filled into `into` (an empty field of a response) when given: no copy."""
        data = self.record.data
        return convert.settlement_message(self.decision, data.decision_json, self.record, self.deltas, data.request_json, into)


@dataclass(frozen=True)
class _Request:
    """A settle request that passed its shape checks, with the payload its fingerprint is of."""

    request_id: str
    message: pb.SettlementInput
    expected_revision: int | None
    checked: convert.CheckedInput
    payload: bytes
    fingerprint: str


class _Draft:
    """A decision on its way to the store, and the deltas it is stored with."""

    def __init__(self, principal: Principal, request: _Request, chosen: Chosen, decision_object: Decision) -> None:
        self.request = request
        self.stamp = chosen.stamp
        self.decision = decision_object.to_dict()
        self.deltas: list[dict[str, str]] = []
        message = request.message
        self.new = NewSettlement(
            tenant=principal.tenant,
            request_id=request.request_id,
            request_fingerprint=request.fingerprint,
            contract_id=message.contract_id,
            seller_id=message.seller_id,
            market=message.market,
            period_start=datetime.date.fromisoformat(decision_object.period_start),
            period_end=datetime.date.fromisoformat(decision_object.period_end),
            ruleset_id=chosen.record.ruleset_id,
            ruleset_version=chosen.record.version,
            content_hash=chosen.record.content_hash,
            engine_version=decision_object.engine_version,
            currency=decision_object.currency,
            total=self.decision["total"],
            request_json=request.payload,
            decision_json=canonical_json(self.decision),
            deltas_json=canonical_json(self.deltas),  # a first revision's; `rebase` gives a correction's
            principal=principal.name,
            expected_revision=request.expected_revision,
        )

    def rebase(self, latest: SettlementRecord | None) -> bytes:
        """The deltas against `latest`, as stored (the store calls this under the write lock)."""
        self.deltas = convert.line_deltas(convert.load_json(latest.data.decision_json) if latest else None, self.decision)
        return canonical_json(self.deltas)

    def settled(self, record: SettlementRecord) -> Settled:
        return Settled(record, self.decision, self.deltas, False)

    def append(self) -> Append:
        """What the store is given: no revision read beforehand (the new one goes on top of
        whatever is latest under the write lock), and the stamp of the version's choice."""
        return Append(self.new, None, self.rebase, self.stamp)


class Settler:
    """The settle path shared by Settle, SettleBatch and Simulate (SPEC §7 idempotency and corrections)."""

    def __init__(self, store: Store, registry: VersionRegistry, write_priority: WritePriority | None = None) -> None:
        self._store = store
        self._registry = registry
        # The store's: decisions pause between items while this process writes (see there).
        self._write_priority = write_priority or WritePriority()

    def settle(self, principal: Principal, request_id: str, message: pb.SettlementInput, expected_revision: int | None) -> Settled:
        tenant = principal.tenant
        request = self._checked(tenant, request_id, message, expected_revision)
        draft: _Draft | None = None
        for _ in range(MAX_REVISION_RETRIES):
            if draft is None:
                try:
                    draft = self._draft(principal, request, None)
                except Exception as error:
                    # Idempotency (AIP-155): a retry gets the stored decision even if it would
                    # no longer compute (the version in effect has changed since, …).
                    try:
                        existing = self._store.settlement_by_request(tenant, request_id)
                    except Exception:
                        raise error from None  # the store is unreachable or the like: the first failure says so
                    if existing is not None:
                        return self._replayed(existing, request.fingerprint)
                    raise
            try:
                # The request id is checked under the write lock (a retry is a
                # DUPLICATE_REQUEST_ID there, answered with the stored decision); the new
                # revision goes on top of whatever is latest there (rebase), so concurrent
                # corrections of one contract period queue instead of failing and retrying.
                record = self._store.append_settlement(draft.new, None, draft.rebase, draft.stamp)
            except VersionsChanged:  # a version was approved or retired since it was chosen: choose again
                self._registry.forget(tenant)
                draft = None
                continue
            except Conflict as conflict:
                if conflict.reason == "REVISION_TAKEN":  # only when a unique constraint caught what the checks did not
                    continue  # recompute the deltas against the latest revision (the store rechecks expected_revision)
                return self._refused(tenant, draft, conflict)
            return draft.settled(record)
        raise ServiceError(grpc.StatusCode.ABORTED, "CONTENTION", "too many concurrent corrections of this contract period; retry")

    def settle_many(
        self, principal: Principal, items: Sequence[ss.SettleBatchItem], active: Callable[[], bool]
    ) -> Iterator[Settled | Exception]:
        """The items of one SettleBatch message, answered in order exactly as `settle` would
        answer them one after another, but with the new settlements of up to
        MAX_ITEMS_PER_TRANSACTION items stored in one transaction (one commit, one lock).
        A run of items is cut where a request id comes again, so that a repeat is looked
        up after its first occurrence is stored. Stops (ends the iterator) when `active()`
        turns false: the caller went away or the deadline passed."""
        run: list[tuple[ss.SettleBatchItem, int | None]] = []
        seen: set[str] = set()
        for item in items:
            if item.request_id in seen:
                if not (yield from self._settle_run(principal, run, active)):
                    return
                run, seen = [], set()
            run.append((item, item.expected_revision if item.HasField("expected_revision") else None))
            seen.add(item.request_id)
        if run:
            yield from self._settle_run(principal, run, active)

    def _settle_run(
        self, principal: Principal, run: Sequence[tuple[ss.SettleBatchItem, int | None]], active: Callable[[], bool]
    ) -> Generator[Settled | Exception, None, bool]:
        """Items with distinct request ids: checked, looked up at once, decided, stored in
        groups; their outcomes in order. Returns False if it stopped because `active()` did."""
        if not active():
            return False
        tenant = principal.tenant
        outcomes: list[Settled | Exception | None] = [None] * len(run)
        requests: list[tuple[int, _Request]] = []
        let_writers_first = self._write_priority.let_writers_first
        for i, (item, expected) in enumerate(run):
            let_writers_first()
            try:
                requests.append((i, self._checked(tenant, item.request_id, item.input, expected)))
            except Exception as error:  # every item gets an answer
                outcomes[i] = error
        try:
            stored = self._store.settlements_by_requests(tenant, [request.request_id for _, request in requests]) if requests else {}
        except Exception as error:  # the store is unreachable or the like: each item gets the error
            for i, _ in requests:
                outcomes[i] = error
            requests = []
        versions: dict[tuple[str, int | None, datetime.date], Chosen] = {}
        drafts: list[tuple[int, _Draft]] = []
        for i, request in requests:
            let_writers_first()
            try:
                existing = stored.get(request.request_id)
                if existing is not None:
                    outcomes[i] = self._replayed(existing, request.fingerprint)
                else:
                    drafts.append((i, self._draft(principal, request, versions)))
            except Exception as error:
                outcomes[i] = error
        for start in range(0, len(drafts), MAX_ITEMS_PER_TRANSACTION):
            if not active():  # also after the drafting: deciding 1,000 items may outlast a deadline
                break
            self._store_group(principal, drafts[start : start + MAX_ITEMS_PER_TRANSACTION], outcomes, versions)
        for outcome in outcomes:
            if outcome is None:  # not stored: active() turned false
                return False
            yield outcome
        return True

    def _store_group(
        self,
        principal: Principal,
        group: list[tuple[int, _Draft]],
        outcomes: list[Settled | Exception | None],
        versions: dict[tuple[str, int | None, datetime.date], Chosen],
    ) -> None:
        """Store the drafts of `group` in one transaction; each item's outcome goes to `outcomes`."""
        tenant = principal.tenant
        for _ in range(MAX_REVISION_RETRIES):
            try:
                results = self._store.append_settlements([draft.append() for _, draft in group])
            except VersionsChanged:  # a version was approved or retired since they were decided: decide again
                self._registry.forget(tenant)
                versions.clear()
                redrafted: list[tuple[int, _Draft]] = []
                for i, draft in group:
                    try:
                        redrafted.append((i, self._draft(principal, draft.request, versions)))
                    except Exception as error:
                        outcomes[i] = error
                group = redrafted
                if not group:
                    return
                continue
            except StoreError as error:  # the lock was not had, or the like: each item gets the error
                for i, _ in group:
                    outcomes[i] = error
                return
            except Exception:  # e.g. a value the database refuses: nothing was stored; one at a time tells which
                log.info("a group of %d settlements was rolled back; settling them one at a time", len(group))
                for i, draft in group:
                    request = draft.request
                    try:
                        outcomes[i] = self.settle(principal, request.request_id, request.message, request.expected_revision)
                    except Exception as error:
                        outcomes[i] = error
                return
            for (i, draft), result in zip(group, results, strict=True):
                try:
                    outcomes[i] = self._refused(tenant, draft, result) if isinstance(result, Conflict) else draft.settled(result)
                except Exception as error:
                    outcomes[i] = error
            return
        contention = ServiceError(grpc.StatusCode.ABORTED, "CONTENTION", "the tenant's ruleset versions kept changing; retry")
        for i, _ in group:
            outcomes[i] = contention

    def _checked(self, tenant: str, request_id: str, message: pb.SettlementInput, expected_revision: int | None) -> _Request:
        """The request after its shape checks (INVALID_ARGUMENT lists every problem), with its fingerprint."""
        checked = convert.check_input(message, "input")
        violations = _request_id_violations(request_id) + checked.violations
        if expected_revision is not None and expected_revision < 0:
            violations.append(Violation("expected_revision", f"{expected_revision} is negative", "request.expected_revision"))
        if violations:
            raise self._invalid(tenant, message, checked, violations, allow_draft=False)
        payload = convert.fingerprint_payload(message, expected_revision, checked)
        return _Request(request_id, message, expected_revision, checked, payload, hashlib.sha256(payload).hexdigest())

    def _draft(
        self, principal: Principal, request: _Request, versions: dict[tuple[str, int | None, datetime.date], Chosen] | None
    ) -> _Draft:
        chosen, decision = self.compute(principal.tenant, request.message, request.checked, allow_draft=False, versions=versions)
        return _Draft(principal, request, chosen, decision)

    def _refused(self, tenant: str, draft: _Draft, conflict: Conflict) -> Settled:
        """What a conflict of the store means for the caller: the winner of a concurrent
        duplicate (replayed), or ABORTED for a stale expected_revision."""
        request = draft.request
        if conflict.reason == "DUPLICATE_REQUEST_ID":  # a concurrent duplicate won
            winner = self._store.settlement_by_request(tenant, request.request_id)
            if winner is None:
                raise conflict
            return self._replayed(winner, request.fingerprint)
        if conflict.reason == "EXPECTED_REVISION_MISMATCH":
            current = self._store.latest_settlement(tenant, request.message.contract_id, draft.new.period_start)
            latest_revision = current.revision if current else 0
            metadata = {"expectedRevision": str(request.expected_revision), "latestRevision": str(latest_revision)}
            if current is not None:
                metadata["latestSettlement"] = f"settlements/{current.settlement_id}"
            raise ServiceError(
                grpc.StatusCode.ABORTED,
                "REVISION_MISMATCH",
                f"expected revision {request.expected_revision}, but the latest revision of this contract period is {latest_revision}",
                metadata=metadata,
            ) from conflict
        raise conflict

    def simulate(self, tenant: str, message: pb.SettlementInput) -> Decision:
        checked = convert.check_input(message, "input")
        if checked.violations:
            raise self._invalid(tenant, message, checked, list(checked.violations), allow_draft=True)
        return self.compute(tenant, message, checked, allow_draft=True)[1]

    def compute(
        self,
        tenant: str,
        message: pb.SettlementInput,
        checked: convert.CheckedInput,
        allow_draft: bool,
        versions: dict[tuple[str, int | None, datetime.date], Chosen] | None = None,
    ) -> tuple[Chosen, Decision]:
        """The version in effect (or pinned) and the engine's decision; INVALID_ARGUMENT lists every problem.

        `versions` keeps the versions chosen for the items of one SettleBatch message."""
        assert checked.ruleset is not None and checked.period_start is not None
        key = (*checked.ruleset, checked.period_start)
        chosen = versions.get(key) if versions is not None else None
        if chosen is None:
            chosen = self.choose(tenant, checked.ruleset, checked.period_start, allow_draft, kept=not allow_draft)
            if versions is not None:
                versions[key] = chosen
        violations: list[Violation] = []
        decision = self._run_engine(chosen, message, violations, checked)
        if violations or decision is None:
            raise invalid("the settlement input is invalid", violations, "INPUT_INVALID")
        return chosen, decision

    def choose(
        self, tenant: str, ruleset: tuple[str, int | None], period_start: datetime.date, allow_draft: bool, kept: bool = False
    ) -> Chosen:
        """The registry's choice, with NOT_FOUND for a ruleset or pinned version that does not exist.

        `kept`: a choice the registry keeps (for a settlement the store writes with its stamp checked).

        A ruleset with no version at all in the caller's tenant is NOT_FOUND (the name is
        wrong, or another tenant's); one whose versions exist but none is APPROVED and in
        effect on the period's first day is FAILED_PRECONDITION (SPEC §6)."""
        ruleset_id, pinned = ruleset
        try:
            if kept:
                return self._registry.choose_kept(tenant, ruleset_id, pinned, period_start, allow_draft=allow_draft)
            return self._registry.choose(tenant, ruleset_id, pinned, period_start, allow_draft=allow_draft)
        except NotFound as missing:
            name = f"rulesets/{ruleset_id}/versions/{pinned}"
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                "RULESET_VERSION_NOT_FOUND",
                f"{name} does not exist",
                metadata={"rulesetVersion": name},
            ) from missing
        except ServiceError as error:
            if error.reason == "NO_VERSION_IN_EFFECT" and not self._store.list_ruleset_versions(tenant, ruleset_id, 1, None):
                raise ServiceError(
                    grpc.StatusCode.NOT_FOUND,
                    "RULESET_NOT_FOUND",
                    f"rulesets/{ruleset_id} does not exist",
                    metadata={"ruleset": f"rulesets/{ruleset_id}"},
                ) from error
            raise

    @staticmethod
    def _run_engine(
        chosen: Chosen, message: pb.SettlementInput, violations: list[Violation], checked: convert.CheckedInput | None = None
    ) -> Decision | None:
        """Settle with the engine; its request problems (and a wrong period_end_date) go to `violations`."""
        request = convert.engine_request(message, checked)
        bounds = period_bounds(request.period_start, chosen.compiled.ruleset.period)
        if bounds is not None:  # a misaligned start is the engine's to report
            _check_period_end(message, bounds[1].isoformat(), violations)
        try:
            decision = chosen.compiled.settle(request)
        except RequestInvalid as exc:
            reported = {v.field for v in violations}
            violations.extend(v for v in convert.input_violations(exc.problems, "input") if v.field not in reported)
            return None
        return decision

    def _invalid(
        self, tenant: str, message: pb.SettlementInput, checked: convert.CheckedInput, violations: list[Violation], allow_draft: bool
    ) -> ServiceError:
        """INVALID_ARGUMENT for the shape violations, plus the engine's own findings when it can run,
        so that the caller learns of every problem at once."""
        if checked.computable:
            assert checked.ruleset is not None and checked.period_start is not None
            try:
                chosen = self.choose(tenant, checked.ruleset, checked.period_start, allow_draft)
            except (ServiceError, StoreError):
                pass  # no version to check against: the shape problems are what there is to report
            else:
                self._run_engine(chosen, message, violations)
        return invalid("the settlement input is invalid", violations, "INPUT_INVALID")

    def _replayed(self, existing: SettlementRecord, fingerprint: str) -> Settled:
        if existing.data.request_fingerprint != fingerprint:
            name = f"settlements/{existing.settlement_id}"
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "REQUEST_ID_REUSED",
                f"request_id {existing.data.request_id!r} was already used with a different payload ({name})",
                metadata={"requestId": existing.data.request_id, "settlement": name},
            )
        return Settled.of(existing, deduplicated=True)


def _request_id_violations(request_id: str) -> list[Violation]:
    if request_id and len(request_id) <= MAX_REQUEST_ID and request_id.isprintable():
        return []
    described = f"1 to {MAX_REQUEST_ID} printable characters"
    return [Violation("request_id", described if request_id else f"required: {described}", "request.request_id")]


def _check_period_end(message: pb.SettlementInput, period_end: str, violations: list[Violation]) -> None:
    if message.HasField("period_end_date"):
        given = convert.date_text(message.period_end_date)
        if given != period_end:
            violations.append(Violation("input.period_end_date", f"{given}; the period ends {period_end}", "request.period_end"))


def chain_record_name(key: str) -> str:
    """A chain link's key as the resource it is: settlements/{id}, rulesets/{id}/versions/{n}[ EVENT]."""
    if "@" not in key:
        return f"settlements/{key}" if key else ""
    ruleset_id, _, rest = key.partition("@")
    version, _, action = rest.partition(":")
    name = f"rulesets/{ruleset_id}/versions/{version}"
    return f"{name} {action} event" if action else name


class SettlementService(ss_grpc.SettlementServiceServicer):
    def __init__(self, store: Store, registry: VersionRegistry, write_priority: WritePriority | None = None) -> None:
        self._store = store
        self._registry = registry
        self._write_priority = write_priority or WritePriority()
        self._settler = Settler(store, registry, self._write_priority)

    @rpc_errors
    def Settle(self, request: ss.SettleRequest, context: grpc.ServicerContext) -> ss.SettleResponse:
        expected = request.expected_revision if request.HasField("expected_revision") else None
        settled = self._settler.settle(current_principal(), request.request_id, request.input, expected)
        response = ss.SettleResponse(deduplicated=settled.deduplicated)
        settled.message(response.settlement)
        return response

    def SettleBatch(self, requests: Iterator[ss.SettleBatchRequest], context: grpc.ServicerContext) -> Iterator[ss.SettleBatchResponse]:
        principal = current_principal()
        index = 0
        for batch in requests:
            if len(batch.items) > MAX_BATCH_ITEMS_PER_MESSAGE:
                too_many = ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "BATCH_TOO_LARGE",
                    f"a message carried {len(batch.items)} items; at most {MAX_BATCH_ITEMS_PER_MESSAGE} per message (send more messages)",
                    metadata={"maxItems": str(MAX_BATCH_ITEMS_PER_MESSAGE), "items": str(len(batch.items))},
                )
                context.abort_with_status(rpc_status.to_status(to_status(too_many)))
            response, size = ss.SettleBatchResponse(), 0
            answered = 0
            let_writers_first = self._write_priority.let_writers_first
            # the caller went away or the deadline passed: settle nothing more
            for item, outcome in zip(batch.items, self._settler.settle_many(principal, batch.items, context.is_active), strict=False):
                # made in place: appending a finished result would copy it once more
                result = response.results.add(request_id=item.request_id, item_index=index)
                index += 1
                answered += 1
                let_writers_first()
                if isinstance(outcome, Exception):  # every item gets an answer; the stream goes on
                    result.error.CopyFrom(to_status(outcome))
                else:
                    outcome.message(result.settlement)
                    result.deduplicated = outcome.deduplicated
                size += result.ByteSize()
                if size > MAX_RESPONSE_BYTES:  # answers of one message may span several responses
                    yield response
                    response, size = ss.SettleBatchResponse(), 0
            if answered < len(batch.items):  # settle_many stopped: the caller is gone
                return
            if response.results or not batch.items:  # an empty message gets an empty answer
                yield response

    @rpc_errors
    def Simulate(self, request: ss.SimulateRequest, context: grpc.ServicerContext) -> ss.SimulateResponse:
        message = request.input
        decision = self._settler.simulate(current_principal().tenant, message).to_dict()
        settlement = convert.settlement_message(decision, canonical_json(decision), None, [], convert.fingerprint_payload(message, None))
        settlement.contract_id, settlement.seller_id = message.contract_id, message.seller_id
        return ss.SimulateResponse(settlement=settlement)

    def _stored(self, name: str) -> Settled:
        return Settled.of(self._store.get_settlement(current_principal().tenant, convert.settlement_id(name)))

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
        ruleset = convert.parse_ruleset_name(request.ruleset, "ruleset", False, violations) if request.ruleset else None
        for name in ("contract_id", "seller_id"):  # filters are ids like the ones stored: never a NUL or control character
            value = getattr(request, name)
            if value and not convert.ID_TEXT.fullmatch(value):
                violations.append(Violation(name, "1 to 128 letters, digits or ._:/@- (starting with a letter or digit)", "request.id"))
        if request.market and (len(request.market) > 8 or not request.market.isprintable()):
            violations.append(
                Violation("market", "a market code such as US, JP, EU, BR (at most 8 printable characters)", "request.market")
            )
        if request.page_size < 0:
            violations.append(Violation("page_size", f"{request.page_size} is negative"))
        if violations:
            raise invalid("the list request is invalid", violations)
        where = SettlementFilter(
            contract_id=request.contract_id or None,
            seller_id=request.seller_id or None,
            market=request.market or None,
            ruleset_id=ruleset[0] if ruleset else None,
            period_from=period_from,
            period_to=period_to,
            latest_only=not request.include_superseded,
        )
        size = page_size(request.page_size, MAX_SETTLEMENTS_PAGE)
        after = _list_position(request.page_token, _filter_digest(where))
        records = self._store.list_settlements(current_principal().tenant, where, size + 1, after)
        more = len(records) > size
        records = records[:size]
        next_token = ""
        if more and records:
            last = records[-1]
            next_token = encode_token(
                "settlements", [last.data.period_start.isoformat(), last.data.contract_id, last.revision, _filter_digest(where)]
            )
        response = ss.ListSettlementsResponse(next_page_token=next_token)
        for record in records:
            Settled.of(record).message(response.settlements.add())
        return response

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
        record = self._store.get_settlement(current_principal().tenant, convert.settlement_id(request.name))
        data = record.data
        stored_version = self._store.get_ruleset_version(data.tenant, data.ruleset_id, data.ruleset_version)
        compiled = self._registry.compiled(stored_version)  # the version's source never changes
        try:
            message = convert.input_from_dict(convert.load_json(data.request_json)["input"])
            engine_request = convert.engine_request(message)
        except (ValueError, KeyError, TypeError) as exc:  # the stored request was damaged (VerifyAuditLog says where)
            return ss.ReplaySettlementResponse(
                match=False, first_difference=f"the stored inputs cannot be read: {type(exc).__name__}", engine_version=ENGINE_VERSION
            )
        try:
            replayed = compiled.settle(engine_request).to_canonical_json()
        except RequestInvalid as exc:
            return ss.ReplaySettlementResponse(
                match=False, first_difference=f"the stored inputs no longer settle: {exc}", engine_version=ENGINE_VERSION
            )
        engine_version = str(convert.load_json(replayed)["engine_version"])
        if replayed == data.decision_json:
            return ss.ReplaySettlementResponse(match=True, engine_version=engine_version)
        try:
            stored: Any = convert.load_json(data.decision_json)
        except ValueError:
            stored = data.decision_json.decode("utf-8", "replace")
        difference = first_difference(stored, convert.load_json(replayed))
        if not difference:  # equal values, different bytes
            difference = "decision_json: same values, different bytes"
        return ss.ReplaySettlementResponse(match=False, first_difference=difference, engine_version=engine_version)

    @rpc_errors
    def VerifyAuditLog(self, request: ss.VerifyAuditLogRequest, context: grpc.ServicerContext) -> ss.VerifyAuditLogResponse:
        anchor = audit_anchor(request)
        report = self._store.verify_tenant_chain(current_principal().tenant, anchor)
        head_sequence, head_hash = report.head or (0, "")
        problem = report.problem
        if problem is None:
            return ss.VerifyAuditLogResponse(ok=True, records_checked=report.records, head_sequence=head_sequence, head_hash=head_hash)
        return ss.VerifyAuditLogResponse(
            ok=False,
            records_checked=report.records,
            failed_sequence=problem.chain_seq,
            failure=problem.kind.value,
            failed_record=chain_record_name(problem.key) if problem.key else "",
            head_sequence=head_sequence,
            head_hash=head_hash,
        )


_HEX64 = re.compile(r"[0-9a-f]{64}")


def audit_anchor(request: ss.VerifyAuditLogRequest) -> tuple[int, str] | None:
    """The (sequence, hash) the chain must still hold, or None when the request names no anchor."""
    if request.anchor_sequence == 0 and not request.anchor_hash:
        return None
    violations = []
    if request.anchor_sequence < 1:
        violations.append(Violation("anchor_sequence", "a chain position counts from 1", "request.anchor"))
    if not _HEX64.fullmatch(request.anchor_hash):
        violations.append(Violation("anchor_hash", "64 lowercase hex digits (a head_hash of an earlier verification)", "request.anchor"))
    if violations:
        raise invalid("the audit anchor is invalid", violations, "ANCHOR_INVALID")
    return request.anchor_sequence, request.anchor_hash


def _filter_digest(where: SettlementFilter) -> str:
    """Binds a page token to the filters it was made for (AIP-158)."""
    fields = [
        where.contract_id,
        where.seller_id,
        where.market,
        where.ruleset_id,
        where.period_from.isoformat() if where.period_from else None,
        where.period_to.isoformat() if where.period_to else None,
        where.latest_only,
    ]
    return hashlib.sha256(canonical_json(fields)).hexdigest()[:16]


def _list_position(token: str, digest: str) -> tuple[datetime.date, str, int] | None:
    """The position a ListSettlements page token continues from; INVALID_ARGUMENT for any other token."""
    key = decode_token("settlements", token)  # a token that does not decode is refused there
    if key is None:
        return None
    try:
        start, contract_id, revision, bound = key
        if (
            bound == digest
            and isinstance(start, str)
            and isinstance(contract_id, str)
            and convert.ID_TEXT.fullmatch(contract_id)
            and type(revision) is int
            and 0 < revision < 2**31
        ):
            return datetime.date.fromisoformat(start), contract_id, revision
    except (TypeError, ValueError):
        pass
    raise invalid(
        "page_token is not a token this list returned for these filters",
        [Violation("page_token", "unknown or damaged token, or one made for other filters")],
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
