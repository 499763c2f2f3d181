"""Crash safety (issue 6, item 1): SIGKILL a real server process in the middle of a 20,000-item
SettleBatch stream, restart it on the same database and re-send the whole batch with the
same request ids. Every item is settled exactly once, every item acknowledged before the
crash comes back byte for byte as it was acknowledged, and the audit chain verifies.

Runs on SQLite and on PostgreSQL (`database_url`). The kill lands while the server is
settling a message whose answers the caller has not had yet (the test waits until the
database holds more rows than were acknowledged; the server stores a message's items in
transactions of up to 250), so some items are stored but unacknowledged at the crash: the re-sent batch must answer exactly those, and the
acknowledged ones, as duplicates. A long soak (`-m long`) kills the server three times,
once while it is answering duplicates of a re-sent batch.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from kpisettle.v1 import settlement_service_pb2 as ss

from tests.reliability_support import RULESET_LINKS, US_SOURCE, Ack, Database, Row, batch_items, batch_messages
from tests.server_harness import Callers, Client, ServerProcess

ITEMS = 20_000
PER_MESSAGE = 500
KILL_AFTER = 3_000  # items acknowledged in the first run before the SIGKILL


@dataclass
class Figures:
    database: str
    items: int
    kills: int = 0
    restarts: int = 0
    acknowledged_before_kills: list[int] = field(default_factory=list)
    stored_at_kills: list[int] = field(default_factory=list)
    deduplicated: int = 0
    records_checked: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"crash safety on {self.database}: {self.items} items, {self.kills} SIGKILL(s), {self.restarts} restart(s), "
            f"acknowledged before each kill {self.acknowledged_before_kills}, stored at each kill {self.stored_at_kills}, "
            f"{self.deduplicated} answered as duplicates when re-sent, {self.records_checked} chain records verified, "
            f"{self.seconds:.1f} s"
        )


def kill_in_the_middle(server: ServerProcess, db: Database, tenant: str, answered: int) -> None:
    """SIGKILL once the database holds an item the caller has no answer for yet, a moment
    later, when the server is deciding or storing the next group of items."""
    deadline = time.monotonic() + 60
    while db.count(tenant) <= answered:
        assert time.monotonic() < deadline, "the server stored nothing beyond what it had answered"
        time.sleep(0.005)
    time.sleep(0.02)
    server.process.send_signal(signal.SIGKILL)
    assert server.process.wait(30) == -signal.SIGKILL


def crash_and_resend(database_url: str, tmp_path: Path, items_count: int, kill_points: list[int]) -> Figures:
    """Send the batch once per run; run r is killed after `kill_points[r]` answers, the last
    run goes to the end. Checks everything stored and answered after each run."""
    started = time.monotonic()
    figures = Figures(database_url.split(":", 1)[0].split("+", 1)[0], items_count)
    callers = Callers.fresh()
    tenant = callers.tenant
    tokens = callers.write(tmp_path / "tokens.json")
    items = batch_items("crash", items_count)
    request_ids = [item.request_id for item in items]
    db = Database(database_url)
    acked: dict[str, Ack] = {}  # every answer the caller ever received, first one wins
    stored: dict[str, Row] = {}  # what the database held when the last run began
    server: ServerProcess | None = None
    try:
        for run in range(len(kill_points) + 1):
            server = ServerProcess(database_url, tokens)
            if run:
                figures.restarts += 1
            client = Client(server.target, callers)
            if run == 0:
                client.create_and_approve(US_SOURCE)
            kill_after = kill_points[run] if run < len(kill_points) else None
            answered = 0
            killed = False
            stream = client.settlements.SettleBatch(batch_messages(items, PER_MESSAGE), metadata=callers["erp"].metadata, timeout=900)
            try:
                for answer in stream:
                    for result in answer.results:
                        request_id = result.request_id
                        assert (result.item_index, request_id) == (answered, request_ids[answered])  # answered in order
                        assert result.HasField("settlement"), (request_id, result.error)
                        # Stored before this run (acknowledged or not): answered as a duplicate, unchanged.
                        assert result.deduplicated == (request_id in stored), request_id
                        ack = Ack.of(result.settlement)
                        assert ack.revision == 1, request_id
                        if request_id in acked:
                            assert ack == acked[request_id], f"{request_id} answered differently after the crash"
                        elif request_id in stored:
                            assert stored[request_id].matches(ack), request_id
                        acked.setdefault(request_id, ack)
                        figures.deduplicated += result.deduplicated
                        answered += 1
                    if kill_after is not None and not killed and answered >= kill_after:
                        figures.acknowledged_before_kills.append(answered)
                        kill_in_the_middle(server, db, tenant, answered)
                        killed = True
                        figures.kills += 1
            except grpc.RpcError as error:
                assert killed, f"the stream broke without a kill: {error.code()} {error.details()}"
                assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
            else:
                assert not killed, "the stream ended normally although the server was killed"
            finally:
                client.close()

            now = db.by_request(tenant)
            # Items are settled in order: what is stored is exactly a prefix of the batch.
            assert sorted(now) == request_ids[: len(now)]
            assert all(row.revision == 1 and row.supersedes_id is None for row in now.values())
            missing = [request_id for request_id in acked if request_id not in now]
            assert not missing, f"acknowledged but not stored: {missing[:5]}"
            changed = [request_id for request_id, ack in acked.items() if not now[request_id].matches(ack)]
            assert not changed, f"acknowledged and then changed: {changed[:5]}"
            changed = [request_id for request_id, row in stored.items() if now[request_id] != row]
            assert not changed, f"stored and then changed: {changed[:5]}"
            if killed:
                figures.stored_at_kills.append(len(now))
                assert len(now) > answered  # the kill interrupted a message the caller had no answer for
                server = None
            else:
                assert answered == items_count and len(now) == items_count
                assert acked.keys() == now.keys()
                again = Client(server.target, callers)
                try:
                    verified = again.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance", timeout=300)
                finally:
                    again.close()
                assert verified.ok, verified
                assert verified.records_checked == RULESET_LINKS + items_count
                figures.records_checked = verified.records_checked
                assert server.terminate() == 0, server.output()
                server = None
            stored = now
    finally:
        if server is not None:
            server.kill()
        db.close()
    figures.seconds = time.monotonic() - started
    return figures


def test_sigkill_during_a_20000_item_batch_then_resend_settles_each_item_once(database_url: str, tmp_path: Path) -> None:
    figures = crash_and_resend(database_url, tmp_path, ITEMS, [KILL_AFTER])
    print(figures.line())
    assert (figures.kills, figures.restarts) == (1, 1)
    # re-sent: exactly the items stored before the crash (acknowledged or not) were duplicates
    assert figures.deduplicated == figures.stored_at_kills[0]


@pytest.mark.long
def test_three_sigkills_one_while_answering_duplicates(database_url: str, tmp_path: Path) -> None:
    # run 2 is killed while it still answers duplicates of run 1's items; runs 3 and 4 settle new ones
    figures = crash_and_resend(database_url, tmp_path, 50_000, [8_000, 4_000, 25_000])
    print(figures.line())
    assert (figures.kills, figures.restarts) == (3, 3)
    assert figures.acknowledged_before_kills[1] < figures.stored_at_kills[0]  # the second kill came while answering duplicates
