"""Concurrency (issue 6, item 2): three server processes on one database, many concurrent callers.

Each caller (a thread with its own channel) talks to one of the three processes and does,
in order:

- **overlapping request ids**: every shared request id is sent by four callers that talk
  to all three processes, at about the same time: one record per request id, every
  answer the same settlement, exactly one of them not a duplicate;
- **plain corrections** of two contracts shared by all callers (no `expected_revision`):
  all succeed, as consecutive revisions;
- **guarded corrections**, in rounds: the callers of one hot contract read its latest
  revision, wait for each other, then all send a correction with that `expected_revision`.
  Exactly one per contract and round wins; every other is refused with `ABORTED`
  (`REVISION_MISMATCH`, the README's documented status) and stores nothing, so no update
  is lost.

Then the database is read directly: one row per request id, gapless revisions per
(contract, period), each revision superseding the one before, and `VerifyAuditLog` passes.
The full run is 3 processes x 32 callers on PostgreSQL; a smaller one runs 3 processes on
one SQLite file (WAL, BEGIN IMMEDIATE).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from kpisettle.v1 import settlement_service_pb2 as ss

from tests.reliability_support import RULESET_LINKS, US_SOURCE, Ack, Database, assert_revision_chains, error_reason, varied_input
from tests.server_harness import Callers, Client, ServerProcess

PROCESSES = 3
HOT_MONTH = 3  # the guarded and plain corrections are all of March 2026


@dataclass(frozen=True)
class Plan:
    callers: int
    shared_ids: int  # each sent by `senders` callers
    senders: int
    hot_contracts: int  # callers % hot_contracts == h correct contract HOT-h
    rounds: int
    free_contracts: int
    free_corrections: int  # per caller

    def shared_ids_of(self, caller: int) -> list[int]:
        """Caller c sends the ids k with k ≡ c (mod callers/senders): `senders` callers per id,
        spread over all the processes (caller c talks to process c % PROCESSES)."""
        stride = self.callers // self.senders
        return [k for k in range(self.shared_ids) if k % stride == caller % stride]


@dataclass
class Outcomes:
    shared: dict[str, list[tuple[Ack, bool]]] = field(default_factory=dict)  # request id -> (answer, deduplicated)
    free: list[Ack] = field(default_factory=list)
    guarded_ok: list[tuple[str, int, Ack]] = field(default_factory=list)  # request id, expected revision, answer
    guarded_refused: list[tuple[str, int]] = field(default_factory=list)  # request id, expected revision
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def processes(database_url: str, tokens: Path, count: int) -> Iterator[list[ServerProcess]]:
    """`count` server processes on one database; each stopped with SIGTERM and exiting 0."""
    started: list[ServerProcess] = []
    try:
        for _ in range(count):
            started.append(ServerProcess(database_url, tokens))
        yield started
        codes = [process.terminate() for process in started]
        assert codes == [0] * count, [process.output() for process in started]
    finally:
        for process in started:
            process.kill()


def latest_revision(client: Client, contract_id: str) -> int:
    listed = client.call("ListSettlements", ss.ListSettlementsRequest(contract_id=contract_id), "erp", timeout=60).settlements
    return max((s.revision for s in listed), default=0)


def run_caller(caller: int, client: Client, plan: Plan, out: Outcomes, barrier: threading.Barrier) -> None:
    def settle(request_id: str, message: object, **extra: int) -> ss.SettleResponse:
        response: ss.SettleResponse = client.call(
            "Settle", ss.SettleRequest(request_id=request_id, input=message, **extra), "erp", timeout=60
        )
        return response

    try:
        barrier.wait(60)
        shared = plan.shared_ids_of(caller)
        free_every = max(1, len(shared) // plan.free_corrections)
        free_done = 0
        for n, k in enumerate(shared):
            request_id = f"shared-{k:03d}"
            answer = settle(request_id, varied_input(k, f"SH-{k:03d}"))
            with out.lock:
                out.shared.setdefault(request_id, []).append((Ack.of(answer.settlement), answer.deduplicated))
            if n % free_every == 0 and free_done < plan.free_corrections:
                contract = f"FREE-{caller % plan.free_contracts}"
                answer = settle(f"free-{caller:02d}-{free_done}", varied_input(1000 + 10 * caller + free_done, contract, HOT_MONTH))
                assert not answer.deduplicated
                with out.lock:
                    out.free.append(Ack.of(answer.settlement))
                free_done += 1
        assert free_done == plan.free_corrections
        hot = f"HOT-{caller % plan.hot_contracts}"
        for round_ in range(plan.rounds):
            barrier.wait(120)  # the previous round is over everywhere
            expected = latest_revision(client, hot)
            barrier.wait(120)  # every caller has read its contract's latest revision
            request_id = f"hot-{caller:02d}-{round_}"
            try:
                answer = settle(request_id, varied_input(2000 + 100 * round_ + caller, hot, HOT_MONTH), expected_revision=expected)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.ABORTED or error_reason(error) != "REVISION_MISMATCH":
                    raise
                with out.lock:
                    out.guarded_refused.append((request_id, expected))
            else:
                with out.lock:
                    out.guarded_ok.append((request_id, expected, Ack.of(answer.settlement)))
    except BaseException as error:  # reported by the test; the barrier is broken so nobody waits for ever
        with out.lock:
            out.failures.append(f"caller {caller}: {error!r}")
        barrier.abort()


def run_concurrency(database_url: str, tmp_path: Path, plan: Plan) -> str:
    for k in range(plan.shared_ids):  # the plan sends every shared id to every process
        senders = [c for c in range(plan.callers) if k in plan.shared_ids_of(c)]
        assert len(senders) == plan.senders and {c % PROCESSES for c in senders} == set(range(PROCESSES)), (k, senders)
    started = time.monotonic()
    callers = Callers.fresh()
    tenant = callers.tenant
    tokens = callers.write(tmp_path / "tokens.json")
    out = Outcomes()
    db = Database(database_url)
    try:
        with processes(database_url, tokens, PROCESSES) as servers:
            clients = [Client(server.target, callers) for server in servers]
            try:
                clients[0].create_and_approve(US_SOURCE)
                barrier = threading.Barrier(plan.callers)
                threads = [
                    threading.Thread(target=run_caller, args=(c, clients[c % PROCESSES], plan, out, barrier), name=f"caller-{c}")
                    for c in range(plan.callers)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(600)
                assert not any(thread.is_alive() for thread in threads)
                assert not out.failures, out.failures
                verified = clients[1].call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance", timeout=120)
            finally:
                for client in clients:
                    client.close()
        rows = db.by_request(tenant)  # fails if any request id was stored twice
        amounts = db.amounts(tenant)
    finally:
        db.close()

    # overlapping request ids: one settlement each, answered identically to every sender
    assert len(out.shared) == plan.shared_ids
    for request_id, answers in out.shared.items():
        assert len(answers) == plan.senders, request_id
        assert len({ack for ack, _ in answers}) == 1, f"{request_id} answered differently"
        assert sum(not deduplicated for _, deduplicated in answers) == 1, request_id
        assert rows[request_id].matches(answers[0][0]) and rows[request_id].revision == 1
    # plain corrections: all stored
    assert len(out.free) == plan.callers * plan.free_corrections
    # guarded corrections: exactly one winner per contract and round; the others refused and not stored
    assert len(out.guarded_ok) == plan.rounds * plan.hot_contracts, out.guarded_ok
    assert len(out.guarded_refused) == plan.rounds * (plan.callers - plan.hot_contracts)
    for request_id, expected, ack in out.guarded_ok:
        assert ack.revision == expected + 1  # written on top of the revision its caller had read
        assert rows[request_id].matches(ack) and rows[request_id].expected_revision == expected
    assert not [request_id for request_id, _ in out.guarded_refused if request_id in rows]

    revisions = assert_revision_chains(rows.values(), amounts)
    march = f"2026-{HOT_MONTH:02d}-01"
    for h in range(plan.hot_contracts):
        assert revisions[(f"HOT-{h}", march)] == plan.rounds
    for f in range(plan.free_contracts):
        assert revisions[(f"FREE-{f}", march)] == plan.callers * plan.free_corrections // plan.free_contracts
    stored = plan.shared_ids + plan.callers * plan.free_corrections + plan.rounds * plan.hot_contracts
    assert len(rows) == stored
    assert verified.ok, verified
    assert verified.records_checked == RULESET_LINKS + stored

    calls = plan.shared_ids * plan.senders + plan.callers * (plan.free_corrections + plan.rounds)
    return (
        f"concurrency on {database_url.split(':', 1)[0].split('+', 1)[0]}: {PROCESSES} processes, {plan.callers} callers, "
        f"{calls} Settle calls ({plan.shared_ids * (plan.senders - 1)} duplicates answered from the store, "
        f"{len(out.guarded_refused)} expected_revision conflicts refused), {stored} records, "
        f"{verified.records_checked} chain records verified, {time.monotonic() - started:.1f} s"
    )


def test_three_processes_and_32_callers_on_one_postgresql(postgres_url: str, tmp_path: Path) -> None:
    plan = Plan(callers=32, shared_ids=64, senders=4, hot_contracts=4, rounds=4, free_contracts=2, free_corrections=2)
    print(run_concurrency(postgres_url, tmp_path, plan))


def test_three_processes_and_12_callers_on_one_sqlite_file(tmp_path: Path) -> None:
    plan = Plan(callers=12, shared_ids=24, senders=3, hot_contracts=3, rounds=3, free_contracts=2, free_corrections=2)
    print(run_concurrency(f"sqlite:///{tmp_path / 'shared.db'}", tmp_path, plan))


@pytest.mark.long
def test_three_processes_and_32_callers_many_rounds_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    plan = Plan(callers=32, shared_ids=512, senders=4, hot_contracts=4, rounds=40, free_contracts=2, free_corrections=8)
    print(run_concurrency(postgres_url, tmp_path, plan))
