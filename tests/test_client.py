"""The Python client library (clients/kpisettle_client) against a real server, on SQLite and PostgreSQL.

What ERP, billing and compliance do with it: settle with exact Decimals and read back,
retries that reuse the request_id, errors with every field violation, batches with a
bound on unanswered items, list iterators over every page, the ruleset review flow, TLS.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from kpisettle.v1 import settlement_service_pb2 as ss

from clients.kpisettle_client import (
    Aborted,
    AlreadyExists,
    BatchItem,
    FailedPrecondition,
    FxRate,
    InvalidArgument,
    KpisettleClient,
    Money,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RulesetState,
    SettlementInput,
    Unauthenticated,
    Unavailable,
    derive_request_id,
)
from clients.kpisettle_client.batch import BatchRun
from clients.kpisettle_client.convert import input_message
from clients.kpisettle_client.retry import RetryPolicy
from clients.kpisettle_client.transport import Methods, service_paths, use_tls
from tests.server_harness import RULESETS, Running, us_input
from tests.test_service_security import Pki, pki_fixture, tls_service  # noqa: F401  (the pki fixture)

US = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
MARCH = datetime.date(2026, 3, 1)
US_METRICS = {name: value.value for name, value in us_input().metrics.items()}


def us(contract_id: str = "C-1", gross_gmv: str | Decimal = "130000", period: datetime.date = MARCH, **metrics: Any) -> SettlementInput:
    """The harness's US input (its total is 11750.00 at the default GMV) as a library value."""
    return SettlementInput(
        contract_id=contract_id,
        seller_id="S-1",
        market="US",
        period_start=period,
        ruleset="rulesets/us-managed-standard",
        metrics={**US_METRICS, "gross_gmv": gross_gmv, **metrics},
        params={"gmv_target": Decimal("100000")},
    )


def connect(running: Running, who: str, **options: Any) -> KpisettleClient:
    return KpisettleClient(running.client.target, running.callers[who].token, **options)


def edit(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, old
    return source.replace(old, new)


class FakeRpcError(grpc.RpcError, grpc.Call):
    """A failed call as gRPC raises it, with no rich status."""

    def __init__(self, code: grpc.StatusCode, details: str = "injected") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class FailOnce(grpc.UnaryUnaryClientInterceptor):
    """Fails the first call of `method` with `code`: after the server answered it (`after=True`,
    a lost answer) or before sending it. Records the request_id of every Settle attempt."""

    def __init__(self, method: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, after: bool = True) -> None:
        self.method, self.code, self.after = method, code, after
        self.failed = False
        self.attempts: list[str] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        if not details.method.endswith("/" + self.method):
            return continuation(details, request)
        self.attempts.append(getattr(request, "request_id", ""))
        if self.failed:
            return continuation(details, request)
        self.failed = True
        if self.after:
            continuation(details, request).result()  # the server did the work; the answer is "lost"
        raise FakeRpcError(self.code)


class BreakStreamOnce(grpc.StreamStreamClientInterceptor):
    """Ends the first SettleBatch stream with UNAVAILABLE after its first answer, once the
    server has had time to store more items (whose answers are then lost)."""

    def __init__(self) -> None:
        self.streams = 0

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, requests: Any) -> Any:
        call = continuation(details, requests)
        self.streams += 1
        if self.streams > 1:
            return call

        class Breaking:
            def __iter__(self) -> Iterator[ss.SettleBatchResponse]:
                yield next(iter(call))
                time.sleep(0.3)
                call.cancel()
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

            def cancel(self) -> bool:
                return bool(call.cancel())

        return Breaking()


# ------------------------------------------------------------------ no server needed


def test_the_client_covers_every_rpc_of_both_services() -> None:
    with grpc.insecure_channel("127.0.0.1:9") as channel:
        assert Methods(channel).paths() == service_paths()
    assert len(service_paths()) == 9 + 8


def test_floats_are_refused_and_amounts_stay_exact() -> None:
    with pytest.raises(TypeError, match=r"metric 'refunds' is the float 0\.1.*Decimal\('0\.1'\)"):
        us(refunds=0.1)
    with pytest.raises(TypeError, match="param 'gmv_target' is the float"):
        SettlementInput("C", "S", "US", MARCH, "rulesets/x", params={"gmv_target": 1e5})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="float"):
        Money(0.5, "EUR")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float"):
        FxRate("EUR", "USD", 1.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        us(refunds=Decimal("NaN"))
    with pytest.raises(TypeError, match=r"datetime\.date"):
        SettlementInput("C", "S", "US", "2026-03-01", "rulesets/x")  # type: ignore[arg-type]
    value = SettlementInput(
        "C",
        "S",
        "US",
        MARCH,
        "us-managed-standard",  # the "rulesets/" prefix is added
        metrics={"gross_gmv": Decimal("1.3E+5"), "orders": 2000, "acos": "28%", "ad_spend": Money("100.50", "EUR")},
        fx_rates=[FxRate("EUR", "USD", "1.0850", "ECB", MARCH)],
    )
    message = input_message(value)
    assert value.ruleset == "rulesets/us-managed-standard"
    assert {k: (v.value, v.currency_code) for k, v in message.metrics.items()} == {
        "gross_gmv": ("130000", ""),
        "orders": ("2000", ""),
        "acos": ("28%", ""),
        "ad_spend": ("100.50", "EUR"),
    }
    assert (message.fx_rates[0].rate, message.fx_rates[0].as_of_date.day) == ("1.0850", 1)
    assert value.fx_rates[0].rate == Decimal("1.0850") and isinstance(value.fx_rates[0].rate, Decimal)


def test_derived_request_ids_are_stable_and_follow_the_payload() -> None:
    first = derive_request_id(input_message(us()))
    assert first == derive_request_id(input_message(us())) and first.startswith("C-1/2026-03-01/")
    assert derive_request_id(input_message(us(gross_gmv="130001"))) != first
    assert derive_request_id(input_message(us()), expected_revision=1) != first
    long_id = derive_request_id(input_message(us(contract_id="K" * 128)))
    assert len(long_id) <= 128 and long_id != derive_request_id(input_message(us(contract_id="K" * 127 + "L")))


def test_tls_is_the_default_away_from_this_machine() -> None:
    assert not use_tls("127.0.0.1:50051", None, None, None) and not use_tls("localhost:1", None, None, None)
    assert not use_tls("[::1]:50051", None, None, None) and not use_tls("unix:/tmp/k.sock", None, None, None)
    assert use_tls("kpisettle.example.com:443", None, None, None) and use_tls("10.0.0.5:50051", None, None, None)
    assert use_tls("127.0.0.1:50051", None, b"ca", None) and use_tls("127.0.0.1:1", True, None, None)
    assert not use_tls("kpisettle.example.com:443", False, None, None)
    with pytest.raises(ValueError, match="tls=True"):
        use_tls("h:1", False, b"ca", None)


class FakeServer:
    """SettleBatch in memory: stores by request_id, fails the stream once after `fail_after`
    messages (having stored the items of the message it fails on), never answers twice."""

    def __init__(self, fail_after: int | None = None, end_after: int | None = None) -> None:
        self.fail_after, self.end_after = fail_after, end_after
        self.stored: dict[str, int] = {}
        self.received: list[str] = []
        self.streams = 0

    def open(self, requests: Iterator[ss.SettleBatchRequest]) -> Any:
        self.streams += 1
        server = self

        class Stream:
            def __iter__(self) -> Iterator[ss.SettleBatchResponse]:
                for count, batch in enumerate(requests):
                    response = ss.SettleBatchResponse()
                    for item in batch.items:
                        server.received.append(item.request_id)
                        deduplicated = item.request_id in server.stored
                        server.stored.setdefault(item.request_id, len(server.stored))
                        result = response.results.add(request_id=item.request_id, deduplicated=deduplicated)
                        result.settlement.request_id = item.request_id
                    if server.fail_after is not None and count == server.fail_after and server.streams == 1:
                        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
                    yield response
                    if server.end_after is not None and count == server.end_after and server.streams == 1:
                        return  # ends the stream, status OK, before the caller's last item

            def cancel(self) -> bool:
                return True

        return Stream()


def test_a_failed_batch_stream_resends_the_unanswered_items_with_their_request_ids() -> None:
    server = FakeServer(fail_after=1)
    inputs = [(f"r-{i}", us(f"C-{i}")) for i in range(10)]
    run = BatchRun(server.open, inputs, items_per_message=3, max_in_flight=6, policy=RetryPolicy(retries=2), sleep=lambda _: None)
    results = list(run)
    assert server.streams == 2
    assert [r.request_id for r in results] == [f"r-{i}" for i in range(10)] and [r.index for r in results] == list(range(10))
    # items 3-5 were stored when the stream failed; the retry re-sent them (and what was unsent) with the same ids
    assert [r.deduplicated for r in results] == [False] * 3 + [True] * 3 + [False] * 4
    assert sorted(server.stored) == sorted(f"r-{i}" for i in range(10)) and len(server.received) == len(set(server.received)) + 3

    # A stream that ends (status OK) before every item was answered is resumed the same way.
    ending = FakeServer(end_after=0)
    results = list(BatchRun(ending.open, inputs, items_per_message=3, policy=RetryPolicy(retries=1), sleep=lambda _: None))
    assert ending.streams == 2 and [r.request_id for r in results] == [f"r-{i}" for i in range(10)]


def test_a_batch_stream_that_keeps_failing_raises_and_a_failing_iterable_is_raised_after_its_answers() -> None:
    class Down:
        def open(self, requests: Iterator[ss.SettleBatchRequest]) -> Any:
            class Stream:
                def __iter__(self) -> Iterator[ss.SettleBatchResponse]:
                    next(requests)
                    raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

                def cancel(self) -> bool:
                    return True

            return Stream()

    sleeps: list[float] = []
    with pytest.raises(Unavailable):
        list(BatchRun(Down().open, [us()], policy=RetryPolicy(retries=2), sleep=sleeps.append))
    assert len(sleeps) == 2

    def broken() -> Iterator[SettlementInput]:
        yield us("C-1")
        yield us("C-2")
        raise OSError("the CSV went away")

    # The iterable is read lazily: an endless one is fine, and stopping early stops reading.
    read: list[int] = []

    def endless() -> Iterator[SettlementInput]:
        for i in itertools.count():
            read.append(i)
            yield us(f"E-{i}")

    results = iter(BatchRun(FakeServer().open, endless(), items_per_message=4, max_in_flight=8))
    assert [r.index for r in itertools.islice(results, 5)] == [0, 1, 2, 3, 4]
    results.close()
    assert len(read) <= 5 + 8

    seen: list[str] = []
    with pytest.raises(OSError, match="CSV"):
        for result in BatchRun(FakeServer().open, broken(), items_per_message=1):
            seen.append(result.input.contract_id)
    assert seen == ["C-1", "C-2"]


# ------------------------------------------------------------------ against the server


def test_settle_and_read_back_with_exact_decimals(running: Running) -> None:
    running.client.load_shipped_rulesets()
    with connect(running, "erp") as erp, connect(running, "billing") as billing, connect(running, "compliance") as compliance:
        settled = erp.settle(us())
        # base 3000 + commission 7500 + bonus step 2: 1% × 125000 = 1250
        assert settled.total == Decimal("11750.00") and str(settled.total) == "11750.00"
        assert (settled.currency, settled.revision, settled.deduplicated, settled.supersedes) == ("USD", 1, False, "")
        assert settled.request_id == derive_request_id(input_message(us()))
        assert settled.period_start == MARCH and settled.period_end == datetime.date(2026, 3, 31)
        assert sum(line.amount for line in settled.lines) == settled.total
        assert all(isinstance(line.amount, Decimal) and isinstance(line.exact, Decimal) for line in settled.lines)
        assert settled.line("base_fee").amount == Decimal("3000.00") and settled.line("commission").basis == Decimal("125000")
        assert settled.kpis["acos"] == Decimal("0.2") and settled.ruleset_version == "rulesets/us-managed-standard/versions/1"

        again = erp.settle(us())  # the same input: the same derived request id, nothing written
        assert again.deduplicated and again.name == settled.name and again.total == settled.total

        read = billing.get_settlement(settled.name)
        assert (read.name, read.total, read.lines, read.request_id) == (settled.name, settled.total, settled.lines, settled.request_id)
        assert billing.get_settlement(settled.name.removeprefix("settlements/")).name == settled.name

        corrected = erp.settle(us(gross_gmv=Decimal("135000.00")), expected_revision=1)
        assert (corrected.revision, corrected.supersedes) == (2, settled.name)
        assert {d.id: d.delta for d in corrected.deltas}["commission"] == Decimal("400.00")
        breakdown = billing.get_fee_breakdown(corrected.name)
        assert (breakdown.previous_total, breakdown.total, breakdown.total_delta) == (
            Decimal("11750.00"),
            corrected.total,
            corrected.total - Decimal("11750.00"),
        )

        simulated = erp.simulate(us(gross_gmv="80000"))
        assert (simulated.name, simulated.revision, simulated.total) == ("", 0, Decimal("7000.00"))

        explained = compliance.explain(corrected.name, language="zh")
        assert explained.language == "zh" and any(str(corrected.total) in s for s in explained.sentences)
        assert compliance.explain(corrected.name).language == "en"
        assert compliance.replay(settled.name).match
        audit = compliance.verify_audit_log()
        assert audit.ok and audit.records_checked > 0 and audit.failure == ""


def test_a_retry_after_a_lost_answer_reuses_the_request_id(running: Running) -> None:
    running.client.load_shipped_rulesets()
    lost = FailOnce("Settle")
    with connect(running, "erp", interceptors=[lost]) as erp:
        settled = erp.settle(us("C-retry"))
    # The first attempt was stored; the retry carried the same id and got that decision back.
    assert lost.attempts == [settled.request_id] * 2 and settled.deduplicated
    with connect(running, "erp") as erp:
        assert [s.name for s in erp.list_settlements(contract_id="C-retry", include_superseded=True)] == [settled.name]

        slow = FailOnce("Simulate", grpc.StatusCode.DEADLINE_EXCEEDED, after=False)
        with connect(running, "erp", interceptors=[slow]) as flaky:
            assert flaky.simulate(us()).total == Decimal("11750.00") and len(slow.attempts) == 2

    # A batch stream that fails: the unanswered items go again on a new stream, with their ids.
    broken = BreakStreamOnce()
    with connect(running, "erp", interceptors=[broken]) as erp:
        results = list(erp.settle_batch((us(f"R-{i:02}") for i in range(60)), items_per_message=10, max_in_flight=40))
        assert broken.streams == 2 and [r.index for r in results] == list(range(60)) and all(r.ok for r in results)
        assert 0 < sum(r.deduplicated for r in results) <= 40  # stored before the failure, answered after it
        stored = list(erp.list_settlements(include_superseded=True, period_from=MARCH, period_to=MARCH))
        assert sorted(s.contract_id for s in stored if s.contract_id.startswith("R-")) == [f"R-{i:02}" for i in range(60)]

    # Creating a version is not retried after a lost answer (it would store a second draft).
    lost_create = FailOnce("CreateRulesetVersion")
    with connect(running, "admin", interceptors=[lost_create]) as admin, pytest.raises(Unavailable):
        admin.create_ruleset_version(US)
    assert len(lost_create.attempts) == 1
    # Nor is anything retried more than `retries` times.
    with connect(running, "erp", interceptors=[FailOnce("Settle", after=False)], retries=0) as erp, pytest.raises(Unavailable):
        erp.settle(us("C-no-retry"))


def test_errors_carry_the_code_reason_metadata_and_every_violation(running: Running) -> None:
    running.client.load_shipped_rulesets()
    with connect(running, "erp") as erp:
        bad = SettlementInput(
            contract_id="C-bad",
            seller_id="",
            market="US",
            period_start=datetime.date(2026, 3, 2),
            ruleset="rulesets/us-managed-standard",
            metrics={**US_METRICS, "orders": "many", "refunds": "-"},
            params={"gmv_target": "100000"},
        )
        with pytest.raises(InvalidArgument) as caught:
            erp.settle(bad)
        error = caught.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INPUT_INVALID" and error.domain == "kpisettle.v1"
        assert len(error.violations) >= 3 and {"input.seller_id", "input.metrics.orders"} <= set(error.fields)
        assert all(v.description for v in error.violations) and "input.seller_id" in str(error)

        with pytest.raises(NotFound):
            erp.get_settlement("settlements/nope")
        first = erp.settle(us("C-err"), request_id="err-1")
        with pytest.raises(AlreadyExists) as reused:
            erp.settle(us("C-err", gross_gmv="1"), request_id="err-1")
        assert reused.value.reason == "REQUEST_ID_REUSED" and reused.value.metadata["settlement"] == first.name
        with pytest.raises(Aborted) as stale:
            erp.settle(us("C-err", gross_gmv="140000"), expected_revision=0)
        assert stale.value.reason == "REVISION_MISMATCH" and stale.value.metadata["latestRevision"] == "1"
    with connect(running, "billing") as billing, pytest.raises(PermissionDenied) as denied:
        billing.settle(us())
    assert denied.value.reason == "ROLE_NOT_PERMITTED"
    with KpisettleClient(running.client.target, "not-a-token") as stranger, pytest.raises(Unauthenticated):
        stranger.verify_audit_log()


def test_settle_batch_bounds_unanswered_items_and_answers_every_item(running: Running) -> None:
    running.client.load_shipped_rulesets()
    count, bad_at, max_in_flight = 300, 137, 50
    lock = threading.Lock()
    state = {"read": 0, "yielded": 0, "peak": 0}

    def inputs() -> Iterator[SettlementInput | tuple[str, SettlementInput]]:
        for i in range(count):
            with lock:  # read by gRPC's sending thread, while the test thread takes the results
                state["read"] += 1
                state["peak"] = max(state["peak"], state["read"] - state["yielded"])
            metrics: dict[str, Any] = {"orders": "lots"} if i == bad_at else {}
            value = us(f"B-{i:03}", gross_gmv=str(100000 + i), **metrics)
            yield (f"batch-{i}", value) if i % 2 else value

    with connect(running, "erp") as erp:
        results = []
        for result in erp.settle_batch(inputs(), items_per_message=20, max_in_flight=max_in_flight):
            with lock:
                state["yielded"] += 1
            results.append(result)
        assert 0 < state["peak"] <= max_in_flight and state["read"] == count
        assert [r.index for r in results] == list(range(count))
        assert [r.input.contract_id for r in results] == [f"B-{i:03}" for i in range(count)]
        assert [r.request_id for r in results][1:4] == ["batch-1", results[2].request_id, "batch-3"]
        failed = [r for r in results if not r.ok]
        assert [r.index for r in failed] == [bad_at] and failed[0].settlement is None
        assert isinstance(failed[0].error, InvalidArgument) and "input.metrics.orders" in failed[0].error.fields
        settled = [r.settlement for r in results if r.settlement is not None]
        assert len(settled) == count - 1 and all(s.revision == 1 and not s.deduplicated for s in settled)
        # B-000: net GMV 95000, attainment 0.95: 3000 + 2500 + 45000×6% = 8200.00
        assert settled[0].total == Decimal("8200.00")

        # Re-running the same items settles nothing twice; BatchItem guards corrections.
        again = list(erp.settle_batch(inputs(), items_per_message=100))
        assert sum(r.deduplicated for r in again) == count - 1
        guarded = list(erp.settle_batch([BatchItem(us("B-000", gross_gmv="1"), expected_revision=5)]))
        assert isinstance(guarded[0].error, Aborted) and guarded[0].error.reason == "REVISION_MISMATCH"
        # the list iterator walks every page
        listed = list(erp.list_settlements(market="US", period_from=MARCH, period_to=MARCH, page_size=40))
        assert [s.contract_id for s in listed] == sorted(f"B-{i:03}" for i in range(count) if i != bad_at)


def test_compliance_reviews_diffs_assesses_and_approves_a_new_version(running: Running) -> None:
    with connect(running, "admin") as admin, connect(running, "compliance") as compliance, connect(running, "erp") as erp:
        v1 = admin.create_ruleset_version(US)
        assert v1.state == RulesetState.DRAFT and v1.author == running.callers["admin"].principal
        with pytest.raises(PermissionDenied):
            admin.approve(v1.name)
        v1 = compliance.approve(v1.name, note="standard terms")
        assert v1.state == "APPROVED" and v1.approver == running.callers["compliance"].principal
        assert [e.action for e in v1.events] == ["CREATED", "APPROVED"] and v1.events[1].note == "standard terms"
        erp.settle(us("C-1"))  # 11750.00
        erp.settle(us("C-2", gross_gmv="205000"))  # net 200000: 18500.00

        candidate_source = edit(US, '{rate: "8%"}', '{rate: "9%"}')
        checked = compliance.validate_ruleset(candidate_source)
        assert checked.valid and not checked.examples_pass and checked.ruleset_id == "us-managed-standard"
        assert any(not e.passed and e.mismatches for e in checked.examples)
        broken = compliance.validate_ruleset(edit(US, "currency: USD", "currency: XXY"))
        assert not broken.valid and broken.errors and broken.errors[0].line > 0

        v2 = admin.create_ruleset_version(candidate_source)
        assert (v2.ruleset, v2.version, v2.state, v2.examples_pass) == ("rulesets/us-managed-standard", 2, RulesetState.DRAFT, False)
        changes = compliance.diff(v1.name, v2.name)
        assert [(c.change, c.path, c.before, c.after) for c in changes] == [("CHANGED", "fees[1].tiers[2].rate", "8%", "9%")]
        report = compliance.analyze_impact(v2.name, MARCH, datetime.date(2026, 3, 31))
        assert [(i.contract_id, i.old_total, i.new_total, i.delta) for i in report.impacts] == [
            ("C-1", Decimal("11750.00"), Decimal("12000.00"), Decimal("250.00")),
            ("C-2", Decimal("18500.00"), Decimal("19500.00"), Decimal("1000.00")),
        ]
        assert [(t.currency, t.delta) for t in report.totals] == [("USD", Decimal("1250.00"))] and report.settlements_failed == 0
        # one impact a page: the client walks the pages (a lost page is fetched again) and sums
        # their totals and counts, exactly
        lost_page = FailOnce("AnalyzeImpact")
        with connect(running, "compliance", interceptors=[lost_page]) as paging:
            paged = paging.analyze_impact(v2.name, MARCH, datetime.date(2026, 3, 31), page_size=1)
        assert len(lost_page.attempts) == 3  # page 1 twice, page 2 once
        assert paged == report and [(t.old_total, t.new_total, t.delta) for t in paged.totals] == [
            (Decimal("30250.00"), Decimal("31500.00"), Decimal("1250.00"))
        ]
        assert (paged.settlements_analyzed, paged.settlements_failed) == (2, 0)
        assert [i.contract_id for i in paged.message.impacts] == ["C-1", "C-2"] and paged.message.next_page_token == ""
        assert [(t.old_total, t.new_total, t.delta) for t in paged.message.totals] == [("30250.00", "31500.00", "1250.00")]
        with pytest.raises(InvalidArgument):
            compliance.analyze_impact(v2.name, MARCH, datetime.date(2026, 3, 31), page_size=-1)
        with pytest.raises(FailedPrecondition):  # its examples fail, so it cannot be approved
            compliance.approve(v2.name)
        retired = compliance.retire(v2.name, note="examples not updated")
        assert retired.state == RulesetState.RETIRED and retired.retire_time is not None

        assert compliance.get_ruleset_version(v1.name).source == US
        for size in (1, 50):
            assert [v.name for v in compliance.list_ruleset_versions("us-managed-standard", page_size=size)] == [v1.name, v2.name]
        assert [v.name for v in admin.list_ruleset_versions()] == [v1.name, v2.name]


def test_tls_and_mutual_tls_options(tmp_path: Path, pki: Pki) -> None:
    with tls_service(tmp_path, pki, mutual=False) as (service, callers):
        target = f"127.0.0.1:{service.port}"
        with KpisettleClient(target, callers["compliance"].token, root_certificates=pki.ca) as client:
            assert client.tls and list(client.list_ruleset_versions()) == []
        with KpisettleClient(target, callers["compliance"].token, tls=False, retries=0, timeout=5) as plain, pytest.raises(Unavailable):
            plain.verify_audit_log()
    with tls_service(tmp_path, pki, mutual=True) as (service, callers):
        target = f"localhost:{service.port}"
        certificate = (pki.client_cert, pki.client_key)
        with KpisettleClient(target, callers["compliance"].token, root_certificates=pki.ca, client_certificate=certificate) as client:
            assert client.verify_audit_log().ok
        with pytest.raises(ValueError, match="private key came first"):
            KpisettleClient(target, "t", root_certificates=pki.ca, client_certificate=(pki.client_key, pki.client_cert))


def test_channel_options_reach_the_channel(running: Running) -> None:
    """The caller's `options` win over the client's own: a tiny receive limit makes a read fail locally."""
    running.client.load_shipped_rulesets()
    with connect(running, "erp") as client:
        stored = client.settle(us())
    with connect(running, "erp", options=[("grpc.max_receive_message_length", 64)], retries=0) as tiny, pytest.raises(ResourceExhausted):
        tiny.get_settlement(stored.name)
    with connect(running, "erp", options=[("grpc.lb_policy_name", "round_robin")]) as spread:
        assert spread.get_settlement(stored.name).total == stored.total
