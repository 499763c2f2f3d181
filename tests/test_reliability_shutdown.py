"""Graceful shutdown under load (issue 6, item 3): SIGTERM while unary `Settle` callers and
`SettleBatch` streams are busy.

The unary callers settle one request after another until the server refuses them; the
streams keep two messages in flight and send the second half of their items after the
signal. What must hold:

- every call ends in one of two ways: answered OK with its whole settlement (every item of
  a stream, the stream ending OK), or refused before any work with `UNAVAILABLE` and the
  server's `SHUTTING_DOWN` reason; nothing else (no cancelled stream, no half answer);
- the server exits with status 0;
- nothing half-written: the database holds exactly the answered request ids, each as
  answered; after a restart every refused request, re-sent, is settled as new (it was
  never stored), the calls answered around the signal come back as duplicates, unchanged,
  and the audit chain verifies.

`test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_0` (test_service_security)
checks the mechanism with a few quiet streams; this is the same promise under load.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from kpisettle.v1 import settlement_service_pb2 as ss

from tests.reliability_support import RULESET_LINKS, US_SOURCE, Ack, Database, batch_items, error_reason, varied_input
from tests.server_harness import Callers, Client, ServerProcess

UNARY_CALLERS = 12
STREAMS = 2
STREAM_ITEMS = 400
PER_MESSAGE = 50
DRAIN_DELAY = 1.5  # seconds the server refuses new calls (SHUTTING_DOWN) before it stops
STOP_SENDING_AFTER = 0.6  # unary callers start no call later than this after SIGTERM (inside the drain delay)


@dataclass
class Call:
    request_id: str
    index: int  # the input's number (varied_input)
    sent: float
    answer: Ack | None = None
    refused: bool = False
    other: str = ""  # anything else: a failure of the test


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    stream_answers: list[dict[str, Ack]] = field(default_factory=list)
    stream_last_answer: list[float] = field(default_factory=list)
    stream_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sigterm_at: float | None = None
    sigterm_sent: threading.Event = field(default_factory=threading.Event)


def unary_caller(caller: int, client: Client, load: Load, started: threading.Event) -> None:
    n = 0
    while True:
        sigterm_at = load.sigterm_at
        if sigterm_at is not None and time.monotonic() > sigterm_at + STOP_SENDING_AFTER:
            return
        index = 10_000 + caller * 1000 + n
        call = Call(f"unary-{caller:02d}-{n:03d}", index, time.monotonic())
        with load.lock:
            load.calls.append(call)
        n += 1
        try:
            response = client.call("Settle", ss.SettleRequest(request_id=call.request_id, input=varied_input(index)), "erp", timeout=60)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "SHUTTING_DOWN":
                call.refused = True
                return
            call.other = f"{error.code()} {error_reason(error)} {error.details()}"
            return
        if not response.HasField("settlement") or response.deduplicated:
            call.other = f"half an answer: {response}"
            return
        call.answer = Ack.of(response.settlement)
        if n == 2:
            started.set()


def batch_stream(stream: int, client: Client, callers: Callers, load: Load, started: threading.Event) -> None:
    items = batch_items(f"stream{stream}", STREAM_ITEMS)
    answered = load.stream_answers[stream]
    progress = threading.Condition()

    def messages() -> Iterator[ss.SettleBatchRequest]:
        for start in range(0, STREAM_ITEMS, PER_MESSAGE):
            if start == STREAM_ITEMS // 2:  # the second half is sent after SIGTERM
                assert load.sigterm_sent.wait(60)
            with progress:  # two messages in flight
                progress.wait_for(lambda start=start: len(answered) >= start - PER_MESSAGE, timeout=60)
            yield ss.SettleBatchRequest(items=items[start : start + PER_MESSAGE])

    try:
        for response in client.settlements.SettleBatch(messages(), metadata=callers["erp"].metadata, timeout=120):
            for result in response.results:
                if not result.HasField("settlement") or result.deduplicated:
                    raise AssertionError(f"{result.request_id}: {result.error}")
                with progress:
                    answered[result.request_id] = Ack.of(result.settlement)
                    progress.notify_all()
            load.stream_last_answer[stream] = time.monotonic()
            started.set()
    except BaseException as error:  # reported by the test
        load.stream_errors.append(f"stream {stream}: {error!r}")
        started.set()


def test_sigterm_under_load_answers_or_refuses_every_call_and_half_writes_nothing(database_url: str, tmp_path: Path) -> None:
    began = time.monotonic()
    callers = Callers.fresh()
    tenant = callers.tenant
    tokens = callers.write(tmp_path / "tokens.json")
    load = Load(stream_answers=[{} for _ in range(STREAMS)], stream_last_answer=[0.0] * STREAMS)
    server = ServerProcess(database_url, tokens, "--grace-seconds", "60", "--drain-delay-seconds", str(DRAIN_DELAY))
    restarted: ServerProcess | None = None
    db = Database(database_url)
    try:
        client = Client(server.target, callers)
        client.create_and_approve(US_SOURCE)
        started = [threading.Event() for _ in range(UNARY_CALLERS + STREAMS)]
        threads = [
            threading.Thread(target=unary_caller, args=(c, client, load, started[c]), name=f"unary-{c}") for c in range(UNARY_CALLERS)
        ] + [
            threading.Thread(target=batch_stream, args=(s, client, callers, load, started[UNARY_CALLERS + s]), name=f"stream-{s}")
            for s in range(STREAMS)
        ]
        for thread in threads:
            thread.start()
        for event in started:  # every unary caller has two answers, every stream one
            assert event.wait(60)
        assert not load.stream_errors, load.stream_errors
        load.sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        load.sigterm_sent.set()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert server.process.wait(60) == 0, server.output()
        client.close()

        # Every call answered OK in full, or refused with SHUTTING_DOWN; nothing else.
        assert not load.stream_errors, load.stream_errors
        assert not [call for call in load.calls if call.other], [call.other for call in load.calls if call.other]
        answered = {call.request_id: call.answer for call in load.calls if call.answer is not None}
        refused = [call for call in load.calls if call.refused]
        assert len(answered) + len(refused) == len(load.calls)
        assert refused, "no call was refused: the load did not reach the drain"
        for stream, answers in enumerate(load.stream_answers):
            assert len(answers) == STREAM_ITEMS, (stream, len(answers))
            assert load.stream_last_answer[stream] > load.sigterm_at  # answered after SIGTERM
            answered.update(answers)

        # Nothing half-written: exactly the answered request ids are stored, as answered.
        rows = db.by_request(tenant)
        assert rows.keys() == answered.keys(), (len(rows), len(answered))
        assert not [request_id for request_id, ack in answered.items() if not rows[request_id].matches(ack)]

        restarted = ServerProcess(database_url, tokens)
        again = Client(restarted.target, callers)
        verified = again.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance", timeout=120)
        assert verified.ok and verified.records_checked == RULESET_LINKS + len(rows), verified
        # Re-sent: the refused calls are new; the last two answered calls of each caller (in
        # flight around the signal) are duplicates, answered as the first time.
        last_answered: dict[str, list[Call]] = {}
        for call in load.calls:
            if call.answer is not None:
                caller = call.request_id.rsplit("-", 1)[0]
                last_answered[caller] = [*last_answered.get(caller, [])[-1:], call]
        resent = refused + [call for calls in last_answered.values() for call in calls]
        for call in resent:
            response = again.call("Settle", ss.SettleRequest(request_id=call.request_id, input=varied_input(call.index)), "erp")
            assert response.deduplicated == (call.answer is not None), call.request_id
            if call.answer is not None:
                assert Ack.of(response.settlement) == call.answer, call.request_id
        assert db.count(tenant) == len(rows) + len(refused)
        again.close()
        assert restarted.terminate() == 0, restarted.output()
        restarted = None
        print(
            f"shutdown under load on {database_url.split(':', 1)[0].split('+', 1)[0]}: {len(load.calls)} unary calls "
            f"({len(load.calls) - len(refused)} answered, {len(refused)} refused SHUTTING_DOWN) and {STREAMS} streams of "
            f"{STREAM_ITEMS} items across SIGTERM, exit 0, {len(rows)} records stored = answered, "
            f"{verified.records_checked} chain records verified, {time.monotonic() - began:.1f} s"
        )
    finally:
        server.kill()
        if restarted is not None:
            restarted.kill()
        db.close()
