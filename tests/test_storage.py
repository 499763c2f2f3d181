"""The SQL store, on SQLite and PostgreSQL: numbering, lifecycle, revisions, idempotency,
pagination, tenancy, concurrency (threads and processes) and tamper evidence."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import multiprocessing
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url

from server.storage.chain import (
    GENESIS_HASH,
    KIND_SETTLEMENT,
    ChainProblemKind,
    canonical_content,
    link_hash,
    verify_chain,
)
from server.storage.interface import (
    Append,
    ChainEntry,
    Conflict,
    LifecycleAction,
    NewSettlement,
    NotFound,
    SettlementFilter,
    SettlementRecord,
    VersionStatus,
)
from server.storage.sql import SqlStore, StoreBusy, alembic_config, create_engine_for, metadata, open_store

MARCH = datetime.date(2026, 3, 1)
APRIL = datetime.date(2026, 4, 1)
MAY = datetime.date(2026, 5, 1)


def settlement(
    tenant: str, request_id: str, contract_id: str = "c-1", period_start: datetime.date = MARCH, **changes: Any
) -> NewSettlement:
    base = NewSettlement(
        tenant=tenant,
        request_id=request_id,
        request_fingerprint="f" * 64,
        contract_id=contract_id,
        seller_id="seller-1",
        market="US",
        period_start=period_start,
        period_end=period_start + datetime.timedelta(days=27),
        ruleset_id="us-standard",
        ruleset_version=1,
        content_hash="c" * 64,
        engine_version="1.0.0",
        currency="USD",
        total="1234.50",
        request_json=b'{"metrics":{"gmv":"100.10"}}',
        decision_json=b'{"total":"1234.50","nul":"\x00\xff"}',
        deltas_json=b"[]",
        principal="erp-1",
    )
    return dataclasses.replace(base, **changes)


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..count-1) in threads started together; return results (or the exceptions raised)."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def assert_chain_ok(store: SqlStore, tenant: str, records: int) -> None:
    report = store.verify_tenant_chain(tenant)
    assert report.problem is None, report.problem
    assert report.records == records
    assert verify_chain(store.audit_chain(tenant), store.chain_head(tenant)) is None
    assert [entry.chain_seq for entry in store.audit_chain(tenant)] == list(range(1, records + 1))


# -- schema and opening ------------------------------------------------------------------


def test_migrations_create_exactly_the_schema_and_reopen(store: SqlStore, database_url: str) -> None:
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0002"
        if store.engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 10000
        if store.engine.dialect.name == "postgresql":  # 0002: the documents compressed with lz4
            compression = conn.execute(
                sa.text(
                    "SELECT attname, attcompression FROM pg_attribute WHERE attrelid = 'settlements'::regclass "
                    "AND attname IN ('request_json', 'decision_json', 'deltas_json')"
                )
            ).all()
            assert sorted(compression) == [("decision_json", "l"), ("deltas_json", "l"), ("request_json", "l")]
    open_store(database_url).close()  # migrating an up-to-date database is a no-op


def test_migrations_downgrade_and_upgrade_by_url(new_database_url: str) -> None:
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", new_database_url.replace("%", "%%"))
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    engine = create_engine_for(new_database_url)
    try:
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    store = open_store(new_database_url)
    try:
        assert store.create_ruleset_version("t", "rs", "x", "h", MARCH, "alice").version == 1
    finally:
        store.close()


def test_open_store_refuses_unsupported_urls() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        open_store("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        open_store("mysql://root@localhost/test")


def test_timestamps_round_trip_in_utc_with_microseconds(database_url: str, tenant: str) -> None:
    moment = datetime.datetime(2026, 3, 31, 23, 59, 59, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=9)))
    store = open_store(database_url, clock=lambda: moment)
    try:
        created = store.create_ruleset_version(tenant, "rs", "src", "h", MARCH, "alice")
        stored = store.get_ruleset_version(tenant, "rs", 1)
        assert stored == created
        assert stored.create_time == moment
        assert stored.create_time.tzinfo == datetime.UTC
        assert stored.create_time.microsecond == 123456
        record = store.append_settlement(settlement(tenant, "r1"), None)
        assert store.get_settlement(tenant, record.settlement_id).create_time == moment
        assert_chain_ok(store, tenant, 3)
    finally:
        store.close()


# -- ruleset versions and lifecycle -----------------------------------------------------


def test_versions_are_numbered_per_ruleset(store: SqlStore, tenant: str) -> None:
    first = store.create_ruleset_version(tenant, "us-standard", "a: 1\n", "h1", MARCH, "alice")
    second = store.create_ruleset_version(tenant, "us-standard", "a: 2\n", "h2", APRIL, "alice")
    other = store.create_ruleset_version(tenant, "jp-standard", "b: 1\n", "h3", MARCH, "bob")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert first.status is VersionStatus.DRAFT and first.approver is None
    assert store.get_ruleset_version(tenant, "us-standard", 2) == second
    assert store.get_ruleset_version(tenant, "us-standard", 1).source == "a: 1\n"
    events = store.lifecycle_events(tenant, "us-standard", 1)
    assert [(e.action, e.principal) for e in events] == [(LifecycleAction.CREATED, "alice")]
    with pytest.raises(NotFound):
        store.get_ruleset_version(tenant, "us-standard", 3)
    with pytest.raises(NotFound):
        store.lifecycle_events(tenant, "nope", 1)
    assert_chain_ok(store, tenant, 6)


def test_concurrent_creates_get_distinct_versions(store: SqlStore, tenant: str) -> None:
    results = run_threads(8, lambda i: store.create_ruleset_version(tenant, "rs", f"v: {i}\n", f"h{i}", MARCH, f"author-{i}"))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.version for r in results) == list(range(1, 9))
    assert_chain_ok(store, tenant, 16)


def test_lifecycle_transitions(store: SqlStore, tenant: str) -> None:
    store.create_ruleset_version(tenant, "rs", "x", "h", MARCH, "alice")
    store.create_ruleset_version(tenant, "rs", "y", "h", MARCH, "alice")
    approved = store.record_lifecycle(tenant, "rs", 1, LifecycleAction.APPROVED, "carol", note="four eyes")
    assert approved.status is VersionStatus.APPROVED
    assert approved.approver == "carol" and approved.approve_time is not None and approved.retire_time is None
    assert store.get_ruleset_version(tenant, "rs", 1) == approved
    for action in (LifecycleAction.APPROVED, LifecycleAction.CREATED):
        with pytest.raises(Conflict) as info:
            store.record_lifecycle(tenant, "rs", 1, action, "carol")
        assert info.value.reason == "INVALID_TRANSITION"
    retired = store.record_lifecycle(tenant, "rs", 1, LifecycleAction.RETIRED, "carol")
    assert retired.status is VersionStatus.RETIRED
    assert retired.approver == "carol" and retired.retire_time is not None and retired.retire_time >= approved.approve_time  # type: ignore[operator]
    for action in (LifecycleAction.APPROVED, LifecycleAction.RETIRED):
        with pytest.raises(Conflict) as info:
            store.record_lifecycle(tenant, "rs", 1, action, "carol")
        assert info.value.reason == "INVALID_TRANSITION"
    # DRAFT → RETIRED directly, then nothing more
    assert store.record_lifecycle(tenant, "rs", 2, LifecycleAction.RETIRED, "dave").status is VersionStatus.RETIRED
    with pytest.raises(Conflict):
        store.record_lifecycle(tenant, "rs", 2, LifecycleAction.APPROVED, "dave")
    with pytest.raises(NotFound):
        store.record_lifecycle(tenant, "rs", 9, LifecycleAction.APPROVED, "dave")
    events = store.lifecycle_events(tenant, "rs", 1)
    assert [(e.action, e.principal, e.note) for e in events] == [
        (LifecycleAction.CREATED, "alice", ""),
        (LifecycleAction.APPROVED, "carol", "four eyes"),
        (LifecycleAction.RETIRED, "carol", ""),
    ]
    assert events[1].time == approved.approve_time
    assert_chain_ok(store, tenant, 7)  # 2 versions + 2 CREATED + APPROVED + 2 RETIRED; failures write nothing


def test_concurrent_approvals_record_one_event(store: SqlStore, tenant: str) -> None:
    store.create_ruleset_version(tenant, "rs", "x", "h", MARCH, "alice")
    results = run_threads(6, lambda i: store.record_lifecycle(tenant, "rs", 1, LifecycleAction.APPROVED, f"approver-{i}"))
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) and r.reason == "INVALID_TRANSITION" for r in results if r not in winners)
    assert len(store.lifecycle_events(tenant, "rs", 1)) == 2


def test_list_ruleset_versions_pages(store: SqlStore, tenant: str) -> None:
    for ruleset_id, count in (("b-rules", 3), ("a-rules", 2)):
        for _ in range(count):
            store.create_ruleset_version(tenant, ruleset_id, "x", "h", MARCH, "alice")
    store.record_lifecycle(tenant, "b-rules", 2, LifecycleAction.APPROVED, "carol")
    keys: list[tuple[str, int]] = []
    after: tuple[str, int] | None = None
    while True:
        page = store.list_ruleset_versions(tenant, None, 2, after)
        assert len(page) <= 2
        keys += [(r.ruleset_id, r.version) for r in page]
        if len(page) < 2:
            break
        after = (page[-1].ruleset_id, page[-1].version)
    assert keys == [("a-rules", 1), ("a-rules", 2), ("b-rules", 1), ("b-rules", 2), ("b-rules", 3)]
    only_b = store.list_ruleset_versions(tenant, "b-rules", 10, None)
    assert [(r.version, r.status) for r in only_b] == [(1, VersionStatus.DRAFT), (2, VersionStatus.APPROVED), (3, VersionStatus.DRAFT)]
    assert store.list_ruleset_versions(tenant, "b-rules", 10, ("b-rules", 2))[0].version == 3
    with pytest.raises(ValueError):
        store.list_ruleset_versions(tenant, None, 0, None)


# -- settlements -------------------------------------------------------------------------


def test_revisions_supersede_in_a_chain(store: SqlStore, tenant: str) -> None:
    assert store.latest_settlement(tenant, "c-1", MARCH) is None
    first = store.append_settlement(settlement(tenant, "r1"), None)
    second = store.append_settlement(settlement(tenant, "r2", total="1300.00", deltas_json=b'[{"line":"x"}]'), first)
    third = store.append_settlement(settlement(tenant, "r3", expected_revision=2), second)
    assert (first.revision, second.revision, third.revision) == (1, 2, 3)
    assert (first.supersedes_id, second.supersedes_id, third.supersedes_id) == (None, first.settlement_id, second.settlement_id)
    assert len({first.settlement_id, second.settlement_id, third.settlement_id}) == 3
    assert store.latest_settlement(tenant, "c-1", MARCH) == third
    assert store.get_settlement(tenant, second.settlement_id) == second
    assert store.settlement_by_request(tenant, "r2") == second
    assert store.settlement_by_request(tenant, "nope") is None
    assert second.data.total == "1300.00" and second.data.decision_json == b'{"total":"1234.50","nul":"\x00\xff"}'
    # another contract and another period start their own revisions
    assert store.append_settlement(settlement(tenant, "r4", contract_id="c-2"), None).revision == 1
    assert store.append_settlement(settlement(tenant, "r5", period_start=APRIL), None).revision == 1
    with pytest.raises(NotFound):
        store.get_settlement(tenant, "0" * 32)
    with pytest.raises(ValueError):  # a revision of another contract cannot be superseded
        store.append_settlement(settlement(tenant, "r6", contract_id="c-2"), third)
    assert_chain_ok(store, tenant, 5)


def test_revision_taken(store: SqlStore, tenant: str) -> None:
    first = store.append_settlement(settlement(tenant, "r1"), None)
    with pytest.raises(Conflict) as info:
        store.append_settlement(settlement(tenant, "r2"), None)
    assert info.value.reason == "REVISION_TAKEN"
    store.append_settlement(settlement(tenant, "r3"), first)
    with pytest.raises(Conflict) as info:
        store.append_settlement(settlement(tenant, "r4"), first)  # stale: r3 superseded it already
    assert info.value.reason == "REVISION_TAKEN"
    assert store.settlement_by_request(tenant, "r2") is None and store.settlement_by_request(tenant, "r4") is None
    assert_chain_ok(store, tenant, 2)


def test_expected_revision(store: SqlStore, tenant: str) -> None:
    with pytest.raises(Conflict) as info:
        store.append_settlement(settlement(tenant, "r0", expected_revision=1), None)
    assert info.value.reason == "EXPECTED_REVISION_MISMATCH"
    first = store.append_settlement(settlement(tenant, "r1", expected_revision=0), None)
    with pytest.raises(Conflict) as info:
        store.append_settlement(settlement(tenant, "r2", expected_revision=0), first)
    assert info.value.reason == "EXPECTED_REVISION_MISMATCH"
    # the expected revision is checked before the superseded one
    with pytest.raises(Conflict) as info:
        store.append_settlement(settlement(tenant, "r3", expected_revision=5), None)
    assert info.value.reason == "EXPECTED_REVISION_MISMATCH"
    assert store.append_settlement(settlement(tenant, "r4", expected_revision=1), first).revision == 2
    assert_chain_ok(store, tenant, 2)


def test_duplicate_request_id(store: SqlStore, tenant: str) -> None:
    first = store.append_settlement(settlement(tenant, "r1"), None)
    # the request id is checked first: whatever else the request says, it was settled already
    for new, supersedes in ((settlement(tenant, "r1", contract_id="c-9"), None), (settlement(tenant, "r1", expected_revision=1), first)):
        with pytest.raises(Conflict) as info:
            store.append_settlement(new, supersedes)
        assert info.value.reason == "DUPLICATE_REQUEST_ID"
    assert_chain_ok(store, tenant, 1)


def test_concurrent_duplicates_store_one_row(store: SqlStore, tenant: str) -> None:
    results = run_threads(8, lambda i: store.append_settlement(settlement(tenant, "same-request", total=f"{i}.00"), None))
    winners = [r for r in results if isinstance(r, SettlementRecord)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) and r.reason == "DUPLICATE_REQUEST_ID" for r in results if r is not winners[0])
    assert store.settlement_by_request(tenant, "same-request") == winners[0]
    assert len(store.list_settlements(tenant, SettlementFilter(), 100, None)) == 1
    assert_chain_ok(store, tenant, 1)


def test_concurrent_corrections_take_one_revision(store: SqlStore, tenant: str) -> None:
    first = store.append_settlement(settlement(tenant, "r0"), None)
    results = run_threads(8, lambda i: store.append_settlement(settlement(tenant, f"fix-{i}"), first))
    winners = [r for r in results if isinstance(r, SettlementRecord)]
    assert [w.revision for w in winners] == [2]
    assert all(isinstance(r, Conflict) and r.reason == "REVISION_TAKEN" for r in results if r is not winners[0])
    assert_chain_ok(store, tenant, 2)


def test_a_held_write_lock_makes_writes_busy_not_hang(database_url: str, tenant: str) -> None:
    store = open_store(database_url, lock_timeout=0.3)
    other = open_store(database_url)
    try:
        store.append_settlement(settlement(tenant, "r1"), None)
        # another process's long write transaction, holding the lock
        if database_url.startswith("sqlite"):
            holder: Any = sqlite3.connect(make_url(database_url).database or "", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
        else:
            holder = other.engine.connect()
            holder.begin()
            holder.execute(sa.text("SELECT 1 FROM chain_heads WHERE tenant = :tenant FOR UPDATE"), {"tenant": tenant})
        try:
            started = time.monotonic()
            with pytest.raises(StoreBusy):
                store.append_settlement(settlement(tenant, "r2", contract_id="c-2"), None)
            assert time.monotonic() - started < 5
            assert store.latest_settlement(tenant, "c-1", MARCH) is not None  # reads go on
        finally:
            holder.rollback()
            holder.close()
        assert store.append_settlement(settlement(tenant, "r2", contract_id="c-2"), None).chain_seq == 2
        assert_chain_ok(store, tenant, 2)
    finally:
        store.close()
        other.close()


def test_a_connection_lost_during_a_write_fails_that_write_alone(postgres_url: str, tenant: str) -> None:
    """PostgreSQL: the server ends the store's connection while a write holds the lock (the
    store's clock runs there). That write fails, stores nothing, and the connection is not
    handed out again: the next writes and reads work and the chain verifies."""
    killer = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    lose_connection = threading.Event()

    def clock() -> datetime.datetime:
        if lose_connection.is_set():
            lose_connection.clear()
            with killer.connect() as conn:  # every other backend of this database: the store's pool
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
        return datetime.datetime.now(datetime.UTC)

    store = open_store(postgres_url, clock)
    try:
        store.append_settlement(settlement(tenant, "r1"), None)
        lose_connection.set()
        with pytest.raises(sa.exc.DBAPIError) as lost:
            store.append_settlement(settlement(tenant, "r2", contract_id="c-2"), None)
        assert lost.value.connection_invalidated
        assert store.settlement_by_request(tenant, "r2") is None
        assert store.append_settlement(settlement(tenant, "r2", contract_id="c-2"), None).chain_seq == 2
        assert_chain_ok(store, tenant, 2)
    finally:
        store.close()
        killer.dispose()


def test_statements_prepared_on_an_empty_table_are_planned_for_the_table_as_it_grows(postgres_server: Any) -> None:
    """PostgreSQL, a new database: a statement prepared while the settlements table is empty
    and never analyzed (as psycopg prepares the store's on their fifth use) must not keep a
    plan made for that empty table. The generic plan PostgreSQL would keep looks a request id
    up by scanning the tenant's whole seller index, so every Settle got slower as the table
    grew. On the store's connections it finds the request id through its unique index."""
    store = open_store(postgres_server.create())
    try:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PREPARE taken(text, text) AS SELECT settlement_id FROM settlements WHERE tenant = $1 AND request_id = $2")
            for i in range(6):  # past PostgreSQL's five custom plans, when it may switch to the generic one
                conn.exec_driver_sql(f"EXECUTE taken('t', 'r-{i}')")
            conn.exec_driver_sql(
                "INSERT INTO settlements SELECT md5(n::text), 't', 'r-' || n, 'f', 'c-' || n, 's-1', 'US', DATE '2026-03-01',"
                " DATE '2026-03-31', 'us', 1, 'h', '1', 'USD', '1.00', '', '', '', 'p', NULL, 1, NULL, now(), n, 'x', 'y'"
                " FROM generate_series(1, 5000) AS n"
            )
            plan = "\n".join(str(row[0]) for row in conn.exec_driver_sql("EXPLAIN EXECUTE taken('t', 'r-77')"))
            conn.rollback()
        assert "uq_settlements_request_id" in plan, plan
    finally:
        store.close()


@pytest.mark.parametrize("count", [1, 3])
def test_a_write_takes_three_round_trips_on_postgresql(postgres_server: Any, tmp_path: Path, count: int) -> None:
    """PostgreSQL: storing settlements, one or a group, is three round trips: the pool's
    ping, then BEGIN with the chain lock and the checks, then the inserts with COMMIT.
    Counted as the server's ReadyForQuery messages in libpq's trace of the connection."""
    store = open_store(postgres_server.create())
    try:
        store.append_settlement(settlement("t", "first", contract_id="c-0"), None)  # the pool's one connection, its statements prepared
        with store.engine.connect() as conn:
            raw = conn.connection.driver_connection
        trace = tmp_path / "libpq.trace"
        with trace.open("w") as out:
            raw.pgconn.trace(out.fileno())
            try:
                if count == 1:
                    store.append_settlement(settlement("t", "r-0", contract_id="c-1"), None)
                else:
                    appends = [Append(settlement("t", f"r-{i}", contract_id=f"c-{i + 1}"), None) for i in range(count)]
                    assert all(isinstance(outcome, SettlementRecord) for outcome in store.append_settlements(appends))
            finally:
                raw.pgconn.untrace()
        assert trace.read_text().count("ReadyForQuery") == 3
        assert [store.settlement_by_request("t", f"r-{i}") is not None for i in range(count)] == [True] * count
    finally:
        store.close()


@pytest.fixture
def populated(store: SqlStore, tenant: str) -> Iterator[dict[str, SettlementRecord]]:
    """c-1 Mar (r1, superseded by r2), c-2 Mar, c-1 Apr (seller-2, JP), c-3 May (ruleset jp)."""
    records: dict[str, SettlementRecord] = {}
    records["c1-mar-1"] = store.append_settlement(settlement(tenant, "a"), None)
    records["c1-mar-2"] = store.append_settlement(settlement(tenant, "b"), records["c1-mar-1"])
    records["c2-mar"] = store.append_settlement(settlement(tenant, "c", contract_id="c-2"), None)
    records["c1-apr"] = store.append_settlement(settlement(tenant, "d", period_start=APRIL, seller_id="seller-2", market="JP"), None)
    records["c3-may"] = store.append_settlement(settlement(tenant, "e", contract_id="c-3", period_start=MAY, ruleset_id="jp"), None)
    yield records


def test_list_settlements_filters(store: SqlStore, tenant: str, populated: dict[str, SettlementRecord]) -> None:
    def ids(where: SettlementFilter) -> list[str]:
        return [r.settlement_id for r in store.list_settlements(tenant, where, 100, None)]

    p = {name: record.settlement_id for name, record in populated.items()}
    assert ids(SettlementFilter()) == [p["c1-mar-1"], p["c1-mar-2"], p["c2-mar"], p["c1-apr"], p["c3-may"]]
    assert ids(SettlementFilter(latest_only=True)) == [p["c1-mar-2"], p["c2-mar"], p["c1-apr"], p["c3-may"]]
    assert ids(SettlementFilter(contract_id="c-1")) == [p["c1-mar-1"], p["c1-mar-2"], p["c1-apr"]]
    assert ids(SettlementFilter(contract_id="c-1", latest_only=True)) == [p["c1-mar-2"], p["c1-apr"]]
    assert ids(SettlementFilter(seller_id="seller-2")) == [p["c1-apr"]]
    assert ids(SettlementFilter(market="JP")) == [p["c1-apr"]]
    assert ids(SettlementFilter(ruleset_id="jp")) == [p["c3-may"]]
    assert ids(SettlementFilter(period_from=APRIL)) == [p["c1-apr"], p["c3-may"]]
    assert ids(SettlementFilter(period_to=APRIL, latest_only=True)) == [p["c1-mar-2"], p["c2-mar"], p["c1-apr"]]
    assert ids(SettlementFilter(period_from=APRIL, period_to=APRIL)) == [p["c1-apr"]]
    assert ids(SettlementFilter(contract_id="nope")) == []


def test_list_settlements_pages(store: SqlStore, tenant: str, populated: dict[str, SettlementRecord]) -> None:
    seen: list[str] = []
    after: tuple[datetime.date, str, int] | None = None
    pages = 0
    while True:
        page = store.list_settlements(tenant, SettlementFilter(), 2, after)
        pages += 1
        assert len(page) <= 2
        seen += [r.settlement_id for r in page]
        if len(page) < 2:
            break
        last = page[-1]
        after = (last.data.period_start, last.data.contract_id, last.revision)
    assert pages == 3
    assert seen == [r.settlement_id for r in store.list_settlements(tenant, SettlementFilter(), 100, None)]
    assert len(set(seen)) == 5
    assert len(store.list_settlements(tenant, SettlementFilter(), 10_000, None)) == 5


def test_settlements_in_period_yields_latest_revisions(store: SqlStore, tenant: str, populated: dict[str, SettlementRecord]) -> None:
    got = list(store.settlements_in_period(tenant, MARCH, APRIL))
    assert [r.settlement_id for r in got] == [populated[k].settlement_id for k in ("c1-mar-2", "c2-mar", "c1-apr")]
    assert got[0] == populated["c1-mar-2"]
    assert list(store.settlements_in_period(tenant, datetime.date(2027, 1, 1), datetime.date(2027, 12, 1))) == []


def test_settlements_in_period_resumes_after_a_key(store: SqlStore, tenant: str, populated: dict[str, SettlementRecord]) -> None:
    """`after` is a (period_start, contract_id) keyset position: strictly greater keys only."""
    p = {name: record.settlement_id for name, record in populated.items()}
    store.append_settlement(settlement(tenant, "f", contract_id="c-10"), None)  # sorts between c-1 and c-2 in March
    c10 = store.latest_settlement(tenant, "c-10", MARCH)
    assert c10 is not None

    def ids(after: tuple[datetime.date, str] | None) -> list[str]:
        return [r.settlement_id for r in store.settlements_in_period(tenant, MARCH, MAY, after)]

    assert ids(None) == [p["c1-mar-2"], c10.settlement_id, p["c2-mar"], p["c1-apr"], p["c3-may"]]
    assert ids((MARCH, "c-1")) == [c10.settlement_id, p["c2-mar"], p["c1-apr"], p["c3-may"]]  # the superseded r1 never shows
    assert ids((MARCH, "c-10")) == [p["c2-mar"], p["c1-apr"], p["c3-may"]]
    assert ids((MARCH, "c-2")) == [p["c1-apr"], p["c3-may"]]
    assert ids((MARCH, "zzz")) == [p["c1-apr"], p["c3-may"]]  # a key nobody has: the next period_start
    assert ids((APRIL, "")) == [p["c1-apr"], p["c3-may"]]
    assert ids((APRIL, "c-1")) == [p["c3-may"]]
    assert ids((MAY, "c-3")) == []
    assert ids((datetime.date(2026, 2, 1), "zzz")) == ids(None)
    # the range still bounds it, and other tenants stay out
    assert [r.settlement_id for r in store.settlements_in_period(tenant, MARCH, MARCH, (MARCH, "c-10"))] == [p["c2-mar"]]
    assert list(store.settlements_in_period(tenant + "-other", MARCH, MAY, (MARCH, "c-1"))) == []
    # walking one row at a time by the last key visits every row once, in order
    walked: list[str] = []
    after: tuple[datetime.date, str] | None = None
    while True:
        stream = store.settlements_in_period(tenant, MARCH, MAY, after)
        row = next(stream, None)
        stream.close()
        if row is None:
            break
        walked.append(row.settlement_id)
        after = (row.data.period_start, row.data.contract_id)
    assert walked == ids(None)


def test_tenants_are_isolated(store: SqlStore, tenant: str) -> None:
    other = tenant + "-other"
    mine = store.append_settlement(settlement(tenant, "same-id"), None)
    theirs = store.append_settlement(settlement(other, "same-id"), None)  # request ids are per tenant
    assert mine.revision == theirs.revision == 1 and mine.chain_seq == theirs.chain_seq == 1
    store.create_ruleset_version(tenant, "rs", "mine", "h", MARCH, "alice")
    assert store.create_ruleset_version(other, "rs", "theirs", "h", MARCH, "alice").version == 1
    with pytest.raises(NotFound):
        store.get_settlement(other, mine.settlement_id)
    assert store.settlement_by_request(other, "same-id") == theirs
    assert store.latest_settlement(other, "c-1", MARCH) == theirs
    assert [r.settlement_id for r in store.list_settlements(tenant, SettlementFilter(), 10, None)] == [mine.settlement_id]
    assert [r.source for r in store.list_ruleset_versions(other, None, 10, None)] == ["theirs"]
    assert [r.settlement_id for r in store.settlements_in_period(other, MARCH, MARCH)] == [theirs.settlement_id]
    assert store.get_ruleset_version(other, "rs", 1).source == "theirs"
    assert {e.key for e in store.audit_chain(other)} == {theirs.settlement_id, "rs@1", "rs@1:CREATED"}
    assert_chain_ok(store, tenant, 3)
    assert_chain_ok(store, other, 3)
    assert store.verify_tenant_chain("nobody").records == 0 and store.chain_head("nobody") is None


# -- tamper evidence ---------------------------------------------------------------------


@dataclasses.dataclass
class Chain:
    """A small chain: rs@1, rs@1:CREATED, rs@1:APPROVED, then settlements s1 (seq 4), s2 (5, supersedes s1), s3 (6), s4 (7)."""

    store: SqlStore
    tenant: str
    settlements: list[SettlementRecord]

    def sql(self, statement: str, **params: Any) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(sa.text(statement), {"tenant": self.tenant, **params})

    def problem(self) -> tuple[ChainProblemKind, int] | None:
        report = self.store.verify_tenant_chain(self.tenant)
        # the stand-alone walk over audit_chain and chain_head agrees
        separate = verify_chain(self.store.audit_chain(self.tenant), self.store.chain_head(self.tenant))
        assert separate == report.problem
        return None if report.problem is None else (report.problem.kind, report.problem.chain_seq)


@pytest.fixture
def chain(store: SqlStore, tenant: str) -> Chain:
    store.create_ruleset_version(tenant, "rs", "fees: []\n", "h", MARCH, "alice")
    store.record_lifecycle(tenant, "rs", 1, LifecycleAction.APPROVED, "carol")
    s1 = store.append_settlement(settlement(tenant, "r1"), None)
    s2 = store.append_settlement(settlement(tenant, "r2", total="99.00"), s1)
    s3 = store.append_settlement(settlement(tenant, "r3", contract_id="c-2"), None)
    s4 = store.append_settlement(settlement(tenant, "r4", contract_id="c-3"), None)
    assert [s.chain_seq for s in (s1, s2, s3, s4)] == [4, 5, 6, 7]
    built = Chain(store, tenant, [s1, s2, s3, s4])
    assert built.problem() is None
    return built


def forged_row(chain: Chain, source: SettlementRecord, chain_seq: int, previous_hash: str, *, rehash: bool) -> dict[str, Any]:
    with chain.store.engine.connect() as conn:
        row = dict(
            conn.execute(sa.text("SELECT * FROM settlements WHERE settlement_id = :id"), {"id": source.settlement_id}).one()._mapping
        )
    row.update(
        settlement_id=uuid.uuid4().hex,
        request_id="forged",
        contract_id="c-forged",
        chain_seq=chain_seq,
        previous_hash=previous_hash,
        supersedes_id=None,
    )
    if rehash:
        typed = dict(row, create_time=source.create_time, period_start=source.data.period_start, period_end=source.data.period_end)
        row["record_hash"] = link_hash(previous_hash, canonical_content(KIND_SETTLEMENT, typed))
    else:
        row["record_hash"] = "e" * 64
    return row


def insert_row(chain: Chain, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    with chain.store.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO settlements ({columns}) VALUES ({', '.join(':' + c for c in row)})"), row)


def test_untouched_chain_verifies(chain: Chain) -> None:
    entries = list(chain.store.audit_chain(chain.tenant))
    assert [(e.chain_seq, e.kind) for e in entries][:4] == [
        (1, "ruleset_version"),
        (2, "lifecycle_event"),
        (3, "lifecycle_event"),
        (4, "settlement"),
    ]
    assert [e.key for e in entries[:3]] == ["rs@1", "rs@1:CREATED", "rs@1:APPROVED"]
    assert entries[0].previous_hash == GENESIS_HASH
    assert all(b.previous_hash == a.record_hash for a, b in itertools.pairwise(entries))
    assert chain.store.chain_head(chain.tenant) == (7, entries[-1].record_hash)
    assert entries[3].record_hash == chain.settlements[0].record_hash and entries[3].key == chain.settlements[0].settlement_id


def test_edited_settlement_column_is_a_hash_mismatch(chain: Chain) -> None:
    chain.sql("UPDATE settlements SET total = '1.00' WHERE tenant = :tenant AND settlement_id = :id", id=chain.settlements[1].settlement_id)
    assert chain.problem() == (ChainProblemKind.HASH_MISMATCH, 5)


@pytest.mark.parametrize(
    ("statement", "seq"),
    [
        ("UPDATE settlements SET decision_json = :blob WHERE tenant = :tenant AND chain_seq = 6", 6),
        ("UPDATE settlements SET create_time = create_time + INTERVAL '1 second' WHERE tenant = :tenant AND chain_seq = 4", 4),
        ("UPDATE settlements SET period_end = period_end + 1 WHERE tenant = :tenant AND chain_seq = 7", 7),
        ("UPDATE lifecycle_events SET principal = 'alice' WHERE tenant = :tenant AND action = 'APPROVED'", 3),
        ("UPDATE ruleset_versions SET source = 'fees: [free]' WHERE tenant = :tenant", 1),
        ("UPDATE settlements SET expected_revision = 0 WHERE tenant = :tenant AND chain_seq = 4", 4),
    ],
    ids=["bytes", "timestamp", "date", "approver", "ruleset-source", "null-to-value"],
)
def test_any_edited_column_is_a_hash_mismatch(chain: Chain, statement: str, seq: int) -> None:
    if chain.store.engine.dialect.name == "sqlite":  # the same edits in SQLite's dialect
        statement = statement.replace("create_time + INTERVAL '1 second'", "datetime(create_time, '+1 second') || substr(create_time, 20)")
        statement = statement.replace("period_end + 1", "date(period_end, '+1 day')")
    chain.sql(statement, blob=b'{"total":"0"}')
    assert chain.problem() == (ChainProblemKind.HASH_MISMATCH, seq)


def test_deleted_row_is_a_sequence_gap(chain: Chain) -> None:
    chain.sql("DELETE FROM settlements WHERE tenant = :tenant AND chain_seq = 6")
    assert chain.problem() == (ChainProblemKind.SEQUENCE_GAP, 6)


def test_swapped_chain_seqs_are_detected(chain: Chain) -> None:
    chain.sql("UPDATE settlements SET chain_seq = -1 WHERE tenant = :tenant AND chain_seq = 6")
    chain.sql("UPDATE settlements SET chain_seq = 6 WHERE tenant = :tenant AND chain_seq = 7")
    chain.sql("UPDATE settlements SET chain_seq = 7 WHERE tenant = :tenant AND chain_seq = -1")
    assert chain.problem() == (ChainProblemKind.HASH_MISMATCH, 6)


def test_forged_row_sharing_a_seq_is_a_sequence_gap(chain: Chain) -> None:
    entries = list(chain.store.audit_chain(chain.tenant))
    insert_row(chain, forged_row(chain, chain.settlements[2], 3, entries[1].record_hash, rehash=True))  # beside rs@1:APPROVED
    assert chain.problem() == (ChainProblemKind.SEQUENCE_GAP, 4)


def test_forged_row_inserted_by_renumbering_is_a_hash_mismatch(chain: Chain) -> None:
    for seq in (7, 6):
        chain.sql("UPDATE settlements SET chain_seq = chain_seq + 1 WHERE tenant = :tenant AND chain_seq = :seq", seq=seq)
    insert_row(chain, forged_row(chain, chain.settlements[2], 6, chain.settlements[1].record_hash, rehash=True))
    assert chain.problem() == (ChainProblemKind.HASH_MISMATCH, 7)


def test_forged_row_with_a_made_up_hash_is_a_hash_mismatch(chain: Chain) -> None:
    chain.sql("DELETE FROM settlements WHERE tenant = :tenant AND chain_seq = 7")
    insert_row(chain, forged_row(chain, chain.settlements[2], 7, chain.settlements[2].record_hash, rehash=False))
    assert chain.problem() == (ChainProblemKind.HASH_MISMATCH, 7)


def test_forged_row_appended_past_the_head_is_a_head_mismatch(chain: Chain) -> None:
    last = chain.settlements[3]
    insert_row(chain, forged_row(chain, last, 8, last.record_hash, rehash=True))
    assert chain.problem() == (ChainProblemKind.HEAD_MISMATCH, 8)


def test_truncated_tail_is_a_head_mismatch(chain: Chain) -> None:
    chain.sql("DELETE FROM settlements WHERE tenant = :tenant AND chain_seq = 7")
    assert chain.problem() == (ChainProblemKind.HEAD_MISMATCH, 7)
    chain.sql("DELETE FROM chain_heads WHERE tenant = :tenant")
    assert chain.problem() == (ChainProblemKind.HEAD_MISMATCH, 1)


def test_edited_and_rehashed_row_is_a_broken_link(chain: Chain) -> None:
    s2 = chain.settlements[1]
    chain.sql("UPDATE settlements SET total = '0.00' WHERE tenant = :tenant AND settlement_id = :id", id=s2.settlement_id)
    entry = next(e for e in chain.store.audit_chain(chain.tenant) if e.chain_seq == 5)
    chain.sql(
        "UPDATE settlements SET record_hash = :hash WHERE tenant = :tenant AND settlement_id = :id",
        id=s2.settlement_id,
        hash=link_hash(entry.previous_hash, entry.content),
    )
    assert chain.problem() == (ChainProblemKind.BROKEN_LINK, 6)


def crafted_chain() -> list[ChainEntry]:
    """Three correctly linked entries, k1 to k3."""
    entries, previous = [], GENESIS_HASH
    for seq in (1, 2, 3):
        content = f"content-{seq}".encode()
        entries.append(ChainEntry(seq, "settlement", f"k{seq}", content, link_hash(previous, content), previous))
        previous = entries[-1].record_hash
    return entries


def test_verify_chain_on_crafted_entries() -> None:
    entries = crafted_chain()
    head = (3, entries[-1].record_hash)
    assert verify_chain(entries, head) is None
    assert verify_chain([], None) is None
    problem = verify_chain(entries, None)
    assert problem is not None and problem.kind is ChainProblemKind.HEAD_MISMATCH
    problem = verify_chain([entries[0], entries[2]], head)
    assert problem is not None and (problem.kind, problem.chain_seq, problem.key) == (ChainProblemKind.SEQUENCE_GAP, 2, "k3")
    problem = verify_chain(entries, (3, "0" * 64))
    assert problem is not None and (problem.kind, problem.chain_seq) == (ChainProblemKind.HEAD_MISMATCH, 3)


# -- several processes -------------------------------------------------------------------

REQUESTS_PER_PROCESS = 24


def _append_correcting(store: SqlStore, new: NewSettlement) -> tuple[bool, int]:
    """Append `new` over the latest revision, re-reading it when another writer took it: (created, retries)."""
    retries = 0
    while True:
        latest = store.latest_settlement(new.tenant, new.contract_id, new.period_start)
        try:
            store.append_settlement(new, latest)
            return True, retries
        except Conflict as exc:
            if exc.reason != "REVISION_TAKEN":
                assert exc.reason == "DUPLICATE_REQUEST_ID", exc.reason
                return False, retries
            retries += 1


def _process_worker(url: str, tenant: str, worker: int, barrier: Any, results: Any) -> None:
    """Open the store (migrating a fresh database, racing the other worker), then append settlements.

    Each worker appends its own requests and tries every shared request id too (worker 0
    ascending, worker 1 descending), all over three contracts, correcting what is there."""
    try:
        barrier.wait(timeout=60)
        store = open_store(url)
        barrier.wait(timeout=60)
        created = duplicates = retries = 0
        shared = list(range(REQUESTS_PER_PROCESS))
        for step, i in enumerate(shared if worker == 0 else shared[::-1]):
            if step % 8 == 0:
                store.create_ruleset_version(tenant, "rs", f"by {worker}", "h", MARCH, f"author-{worker}")
            for request_id in (f"req-{i}", f"own-{worker}-{step}"):
                new = settlement(tenant, request_id, contract_id=f"c-{i % 3}", total=f"{worker}.{i:02d}")
                ok, retried = _append_correcting(store, new)
                created += ok
                duplicates += not ok
                retries += retried
            time.sleep(0.002)  # SQLite's busy handler is not fair: let the other writer in now and then
        store.close()
        results.put((worker, created, duplicates, retries, None))
    except BaseException as exc:
        results.put((worker, 0, 0, 0, repr(exc)))


def test_two_processes_append_to_one_chain(new_database_url: str, tenant: str) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    processes = [context.Process(target=_process_worker, args=(new_database_url, tenant, w, barrier, results)) for w in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert [o[4] for o in outcomes] == [None, None], outcomes
    assert sum(o[1] for o in outcomes) == 3 * REQUESTS_PER_PROCESS  # every shared id once, every own id
    assert sum(o[2] for o in outcomes) == REQUESTS_PER_PROCESS  # every shared id refused once

    store = open_store(new_database_url)
    try:
        rows = store.list_settlements(tenant, SettlementFilter(), 1000, None)
        expected_ids = [f"req-{i}" for i in range(REQUESTS_PER_PROCESS)]
        expected_ids += [f"own-{w}-{step}" for w in (0, 1) for step in range(REQUESTS_PER_PROCESS)]
        assert sorted(r.data.request_id for r in rows) == sorted(expected_ids)
        for contract in ("c-0", "c-1", "c-2"):
            revisions = [r for r in rows if r.data.contract_id == contract]
            assert [r.revision for r in revisions] == list(range(1, len(revisions) + 1))
            assert [r.supersedes_id for r in revisions] == [None] + [r.settlement_id for r in revisions[:-1]]
        versions = store.list_ruleset_versions(tenant, "rs", 100, None)
        assert [v.version for v in versions] == list(range(1, 7))
        assert_chain_ok(store, tenant, len(rows) + 2 * len(versions))
    finally:
        store.close()


def test_an_anchor_must_still_be_in_the_chain() -> None:
    entries = crafted_chain()
    head = (3, entries[-1].record_hash)
    assert verify_chain(entries, head, (2, entries[1].record_hash)) is None
    wrong = verify_chain(entries, head, (2, "0" * 64))
    assert wrong is not None and (wrong.kind, wrong.chain_seq, wrong.key) == (ChainProblemKind.ANCHOR_MISMATCH, 2, entries[1].key)
    gone = verify_chain(entries, head, (4, "0" * 64))
    assert gone is not None and (gone.kind, gone.chain_seq) == (ChainProblemKind.ANCHOR_MISMATCH, 4)
    assert verify_chain([], None, (1, "0" * 64)) is not None
