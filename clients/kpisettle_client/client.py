"""KpisettleClient: every RPC of SettlementService and RulesetService, Decimal in and out."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from . import convert
from .batch import BatchInput, BatchRun, ResponseStream
from .models import (
    AuditReport,
    BatchResult,
    Explanation,
    FeeBreakdown,
    ImpactReport,
    ReplayResult,
    RulesetChange,
    RulesetVersion,
    Settlement,
    SettlementInput,
    Validation,
)
from .request_ids import derive_request_id
from .retry import RetryPolicy, call_with_retry
from .transport import Methods, open_channel, use_tls

T = TypeVar("T")

#: The page size the list iterators ask for (the service's default is 50, its maximum 1000).
DEFAULT_PAGE_SIZE = 200
ALL_RULESETS = "rulesets/-"

Interceptor = grpc.UnaryUnaryClientInterceptor | grpc.StreamStreamClientInterceptor


def settlement_name(name: str) -> str:
    """ "settlements/{id}" from a name or a bare id."""
    return name if name.startswith("settlements/") else f"settlements/{name}"


def ruleset_parent(ruleset: str | None) -> str:
    """ "rulesets/{ruleset}" from a name or a bare id; "rulesets/-" (every ruleset) for None."""
    if not ruleset:
        return ALL_RULESETS
    return ruleset if ruleset.startswith("rulesets/") else f"rulesets/{ruleset}"


class KpisettleClient:
    """A connection to a kpisettle server, authenticated with one bearer token.

    `target` is "host:port" (any gRPC target). TLS: `tls=None` (the default) uses TLS when
    certificates are given or the host is not this machine (localhost, 127.0.0.1, ::1, unix
    sockets); `tls=True` forces it (system roots unless `root_certificates`), `tls=False`
    forces plaintext. `client_certificate` is (certificate_chain_pem, private_key_pem) for
    mutual TLS. `timeout` is the deadline of each attempt of a unary call, in seconds;
    `retries` bounds the retries of a call (see `kpisettle_client.retry` for which calls are
    retried). `interceptors` are gRPC client interceptors applied to the channel; `options`
    are gRPC channel options, e.g. `("grpc.lb_policy_name", "round_robin")` with a `dns:///`
    target to spread calls over several servers (docs/deployment.md).

    Use it as a context manager, or call `close()`. It is safe to share between threads.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        interceptors: Sequence[Interceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not token:
            raise ValueError("a bearer token is required")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.target = target
        self.timeout = timeout
        self.retry_policy = RetryPolicy(retries=retries)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.tls = use_tls(target, tls, root_certificates, client_certificate)
        self._channel = open_channel(
            target, tls=self.tls, root_certificates=root_certificates, client_certificate=client_certificate, options=options
        )
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._rpc = Methods(channel)

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KpisettleClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KpisettleClient({self.target!r}, tls={self.tls})"

    # -------------------------------------------------------------- plumbing

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Any, T], request: Any, timeout: float | None, *, idempotent: bool = True) -> T:
        deadline = timeout or self.timeout

        def attempt() -> T:
            return method(request, timeout=deadline, metadata=self._metadata)

        return call_with_retry(attempt, self.retry_policy, idempotent=idempotent)

    def _pages(self, fetch: Callable[[str], tuple[list[T], str]]) -> Iterator[T]:
        token = ""
        while True:
            items, token = fetch(token)
            yield from items
            if not token:
                return

    # -------------------------------------------------------------- SettlementService

    def settle(
        self, input: SettlementInput, request_id: str | None = None, expected_revision: int | None = None, *, timeout: float | None = None
    ) -> Settlement:
        """Settle one contract period and return the stored decision.

        Without `request_id`, the id is derived from the input (see
        `kpisettle_client.request_ids`): sending the same input again returns the stored
        decision (`deduplicated=True`) and writes nothing. `expected_revision` guards a
        correction: the revision last seen for this contract period (0: none yet); a
        mismatch raises `Aborted` (reason REVISION_MISMATCH, metadata latestRevision).
        Retries after UNAVAILABLE or DEADLINE_EXCEEDED reuse the same request_id."""
        message = convert.input_message(input)
        request = ss.SettleRequest(request_id=request_id or derive_request_id(message, expected_revision), input=message)
        if expected_revision is not None:
            request.expected_revision = expected_revision
        response = self._call(self._rpc.settle, request, timeout)
        return convert.settlement(response.settlement, response.deduplicated)

    def settle_batch(
        self,
        inputs: Iterable[BatchInput],
        *,
        items_per_message: int = 100,
        max_in_flight: int = 1000,
        timeout: float | None = None,
    ) -> Generator[BatchResult, None, None]:
        """Settle many items over one SettleBatch stream; yields each item's result in input order.

        Items are `SettlementInput` (request id derived as in `settle`), `(request_id,
        input)` or `BatchItem`. The iterable is read lazily: at most `max_in_flight` items
        are read and not yet yielded back at any time. A bad item yields a result with
        `.error`; the others settle. `timeout` is the deadline of the whole stream (None: no
        deadline). Stream failures (UNAVAILABLE, DEADLINE_EXCEEDED) re-send the unanswered
        items on a new stream with the same request ids. Closing the generator early cancels
        the stream (items already sent may have been settled). See `kpisettle_client.batch`."""

        def open_stream(requests: Iterator[ss.SettleBatchRequest]) -> ResponseStream:
            return self._rpc.settle_batch(requests, timeout=timeout, metadata=self._metadata)

        run = BatchRun(open_stream, inputs, items_per_message=items_per_message, max_in_flight=max_in_flight, policy=self.retry_policy)
        return iter(run)

    def simulate(self, input: SettlementInput, *, timeout: float | None = None) -> Settlement:
        """The decision for `input`, computed and not stored (no name, revision 0). The ruleset
        may pin a DRAFT version ("rulesets/{ruleset}/versions/{n}") to try it out."""
        response = self._call(self._rpc.simulate, ss.SimulateRequest(input=convert.input_message(input)), timeout)
        return convert.settlement(response.settlement)

    def get_settlement(self, name: str, *, timeout: float | None = None) -> Settlement:
        """One stored revision, by "settlements/{id}" (or the bare id)."""
        response = self._call(self._rpc.get_settlement, ss.GetSettlementRequest(name=settlement_name(name)), timeout)
        return convert.settlement(response.settlement)

    def list_settlements(
        self,
        *,
        contract_id: str = "",
        seller_id: str = "",
        market: str = "",
        ruleset: str = "",
        period_from: datetime.date | None = None,
        period_to: datetime.date | None = None,
        include_superseded: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
    ) -> Iterator[Settlement]:
        """Every stored settlement matching the filters (latest revisions unless
        `include_superseded`), ordered by period start, contract id and revision; pages are
        fetched lazily as the iterator advances. Periods filter on the period's first day,
        both bounds inclusive."""
        request = ss.ListSettlementsRequest(
            page_size=page_size,
            contract_id=contract_id,
            seller_id=seller_id,
            market=market,
            ruleset=ruleset_parent(ruleset) if ruleset else "",
            include_superseded=include_superseded,
        )
        if period_from is not None:
            request.period_start_from_date.CopyFrom(convert.date_message(period_from))
        if period_to is not None:
            request.period_start_to_date.CopyFrom(convert.date_message(period_to))

        def fetch(token: str) -> tuple[list[Settlement], str]:
            page = ss.ListSettlementsRequest()
            page.CopyFrom(request)
            page.page_token = token
            response = self._call(self._rpc.list_settlements, page, timeout)
            return [convert.settlement(m) for m in response.settlements], response.next_page_token

        return self._pages(fetch)

    def get_fee_breakdown(self, name: str, *, timeout: float | None = None) -> FeeBreakdown:
        """What billing invoices for one revision: lines, total, previous total, delta and line deltas."""
        response = self._call(self._rpc.get_fee_breakdown, ss.GetFeeBreakdownRequest(name=settlement_name(name)), timeout)
        return convert.fee_breakdown(response)

    def explain(self, name: str, language: str = "en", *, timeout: float | None = None) -> Explanation:
        """The decision in plain sentences: language "en" or "zh"."""
        request = ss.ExplainSettlementRequest(name=settlement_name(name), language_code=language)
        return convert.explanation(self._call(self._rpc.explain, request, timeout))

    def replay(self, name: str, *, timeout: float | None = None) -> ReplayResult:
        """Recompute a stored decision from its stored inputs and ruleset version."""
        return convert.replay(self._call(self._rpc.replay, ss.ReplaySettlementRequest(name=settlement_name(name)), timeout))

    def verify_audit_log(self, *, anchor: tuple[int, str] | None = None, timeout: float | None = None) -> AuditReport:
        """Walk the tenant's hash chain; `ok`, or the first failing record. `anchor` is a
        (head_sequence, head_hash) of an earlier report, kept outside the database: the
        chain must still hold it."""
        request = ss.VerifyAuditLogRequest(anchor_sequence=anchor[0], anchor_hash=anchor[1]) if anchor else ss.VerifyAuditLogRequest()
        return convert.audit(self._call(self._rpc.verify_audit_log, request, timeout))

    # -------------------------------------------------------------- RulesetService

    def validate_ruleset(self, source: str, *, timeout: float | None = None) -> Validation:
        """Validate a ruleset text and run its examples; stores nothing."""
        return convert.validation(self._call(self._rpc.validate_ruleset, rs.ValidateRulesetRequest(source=source), timeout))

    def create_ruleset_version(self, source: str, *, timeout: float | None = None) -> RulesetVersion:
        """Store a new DRAFT version of the ruleset the source names (admin). Not retried
        after a lost answer (it would store a second draft)."""
        request = rs.CreateRulesetVersionRequest(source=source)
        response = self._call(self._rpc.create_ruleset_version, request, timeout, idempotent=False)
        return convert.ruleset_version(response.ruleset_version)

    def approve(self, name: str, note: str = "", *, timeout: float | None = None) -> RulesetVersion:
        """Approve a DRAFT (compliance; never its own author; every example must pass)."""
        request = rs.ApproveRulesetVersionRequest(name=name, note=note)
        response = self._call(self._rpc.approve, request, timeout, idempotent=False)
        return convert.ruleset_version(response.ruleset_version)

    def retire(self, name: str, note: str = "", *, timeout: float | None = None) -> RulesetVersion:
        """Stop a version from being chosen for new settlements; it stays readable and replayable."""
        request = rs.RetireRulesetVersionRequest(name=name, note=note)
        response = self._call(self._rpc.retire, request, timeout, idempotent=False)
        return convert.ruleset_version(response.ruleset_version)

    def get_ruleset_version(self, name: str, *, timeout: float | None = None) -> RulesetVersion:
        """One version with its source, by "rulesets/{ruleset}/versions/{n}"."""
        response = self._call(self._rpc.get_ruleset_version, rs.GetRulesetVersionRequest(name=name), timeout)
        return convert.ruleset_version(response.ruleset_version)

    def list_ruleset_versions(
        self, ruleset: str | None = None, *, page_size: int = DEFAULT_PAGE_SIZE, timeout: float | None = None
    ) -> Iterator[RulesetVersion]:
        """Every version of one ruleset ("rulesets/{ruleset}" or the bare id), or of every
        ruleset when None; without `source` (use get_ruleset_version). Pages are fetched lazily."""
        parent = ruleset_parent(ruleset)

        def fetch(token: str) -> tuple[list[RulesetVersion], str]:
            request = rs.ListRulesetVersionsRequest(parent=parent, page_size=page_size, page_token=token)
            response = self._call(self._rpc.list_ruleset_versions, request, timeout)
            return [convert.ruleset_version(m) for m in response.ruleset_versions], response.next_page_token

        return self._pages(fetch)

    def diff(self, name: str, other_name: str, *, timeout: float | None = None) -> list[RulesetChange]:
        """What changed from version `name` (older) to `other_name` (newer), in business terms."""
        request = rs.DiffRulesetVersionsRequest(name=name, other_name=other_name)
        return [convert.change(c) for c in self._call(self._rpc.diff, request, timeout).changes]

    def analyze_impact(
        self,
        candidate: str,
        period_from: datetime.date,
        period_to: datetime.date,
        *,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> ImpactReport:
        """Re-run the stored settlements whose period starts in [period_from, period_to] under
        the candidate version (a DRAFT is fine); writes nothing.

        Fetches every page (`page_size` impacts each; 0: the service's default, 1000) and
        returns one report: the impacts in (period_start, contract_id) order, the totals and
        counts summed over the pages. `timeout` applies to each page."""
        request = rs.AnalyzeImpactRequest(candidate=candidate, page_size=page_size)
        request.period_start_from_date.CopyFrom(convert.date_message(period_from))
        request.period_start_to_date.CopyFrom(convert.date_message(period_to))
        pages: list[rs.AnalyzeImpactResponse] = []
        while True:
            page = self._call(self._rpc.analyze_impact, request, timeout)
            pages.append(page)
            if not page.next_page_token:
                return convert.impact(pages)
            request.page_token = page.next_page_token


__all__ = ["DEFAULT_PAGE_SIZE", "KpisettleClient", "ruleset_parent", "settlement_name"]
