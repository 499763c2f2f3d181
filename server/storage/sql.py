"""The SQL store (SQLAlchemy 2 Core): an embedded SQLite file by default, PostgreSQL in production.

Concurrency model (the same guarantees on both databases, with threads or processes):

- Every write transaction first takes its tenant's chain lock, and does all its checks
  (version numbering, lifecycle transitions, revision and request-id checks) after it, so
  the writes of one tenant are serialized and each one sees everything committed before.
  On PostgreSQL the lock is the tenant's `chain_heads` row (``SELECT … FOR UPDATE``; the
  row is inserted with ``ON CONFLICT DO NOTHING`` on the tenant's first write), taken
  first in a READ COMMITTED transaction. On SQLite every write transaction starts with
  ``BEGIN IMMEDIATE`` (the database's single writer lock, waited for up to the busy
  timeout; the threads of one process first queue on an in-process lock, because SQLite's
  busy handler polls), reads start with a deferred ``BEGIN``; the file runs in WAL mode so
  readers never block the writer. A write that cannot get its lock within the store's
  `lock_timeout` (10 s by default) raises `StoreBusy` (a StoreError; retryable).
- Unique constraints back every rule the checks enforce (request id per tenant, revision
  per contract and period, one successor per revision, version per ruleset, chain seq per
  tenant), so a violation that slipped past them would fail the transaction, never
  store a second row.
- Migrations run to head in `open_store`, under a transaction-scoped advisory lock on
  PostgreSQL and inside a ``BEGIN IMMEDIATE`` transaction on SQLite, so several processes
  may start at once.

Orders: `list_ruleset_versions` by (ruleset_id, version); `list_settlements` and
`settlements_in_period` by (period_start, contract_id, revision), which is a total order
within a tenant (unique), and `after` is the last returned row's
(period_start, contract_id, revision) — for `settlements_in_period`, which yields only latest
revisions, (period_start, contract_id).

Timestamps are stored as TIMESTAMP WITH TIME ZONE on PostgreSQL and as UTC text with
microseconds on SQLite, and always come back timezone-aware in UTC.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import heapq
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from server.storage.chain import (
    GENESIS_HASH,
    KIND_LIFECYCLE_EVENT,
    KIND_RULESET_VERSION,
    KIND_SETTLEMENT,
    ChainReport,
    canonical_content,
    link_hash,
    verify_chain,
)
from server.storage.driver import DriverStatement, as_sqlalchemy_errors, driver_connection, pipeline
from server.storage.file_lock import FileLock
from server.storage.interface import (
    Append,
    ChainEntry,
    Conflict,
    LifecycleAction,
    LifecycleEvent,
    NewSettlement,
    NotFound,
    Rebase,
    RulesetVersionRecord,
    SettlementFilter,
    SettlementRecord,
    StoreError,
    VersionsChanged,
    VersionStatus,
)
from server.write_priority import WritePriority

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
MAX_PAGE_SIZE: Final = 1000
STREAM_BATCH: Final = 500
_KEYS_PER_QUERY: Final = 250  # keys looked up by one statement: well under the databases' limits on bound parameters
WRITE_LOCK_TIMEOUT_S: Final = 10.0  # waiting for a tenant's chain lock (PostgreSQL) or the write lock (SQLite)
MIGRATION_LOCK_KEY: Final = 0x6B7069736574746C  # "kpisettl": pg advisory lock key for migrations

_WRITE_OPTION: Final = "kpisettle_write"
# PostgreSQL write transactions: sent by the store in its pipelines (see SqlStore.__init__).
_BEGIN: Final = "BEGIN"
_COMMIT: Final = "COMMIT"

Clock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime.datetime]):
    """A timezone-aware UTC timestamp with microseconds, identical on PostgreSQL and SQLite."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None, dialect: sa.Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        value = value.astimezone(datetime.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime.datetime | None, dialect: sa.Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC)


# The schema as the code sees it. The migrations in server/storage/migrations create it;
# tests/test_storage.py checks that the two agree.
metadata = sa.MetaData()

chain_heads = sa.Table(
    "chain_heads",
    metadata,
    sa.Column("tenant", sa.String, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
    sa.PrimaryKeyConstraint("tenant", name="pk_chain_heads"),
)

ruleset_versions = sa.Table(
    "ruleset_versions",
    metadata,
    sa.Column("tenant", sa.String, nullable=False),
    sa.Column("ruleset_id", sa.String, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String, nullable=False),
    sa.Column("effective_from", sa.Date, nullable=False),
    sa.Column("author", sa.String, nullable=False),
    sa.Column("create_time", UTCDateTime, nullable=False),
    sa.Column("chain_seq", sa.BigInteger, nullable=False),
    sa.Column("previous_hash", sa.String(64), nullable=False),
    sa.Column("record_hash", sa.String(64), nullable=False),
    sa.PrimaryKeyConstraint("tenant", "ruleset_id", "version", name="pk_ruleset_versions"),
    sa.UniqueConstraint("tenant", "chain_seq", name="uq_ruleset_versions_chain_seq"),
)

lifecycle_events = sa.Table(
    "lifecycle_events",
    metadata,
    sa.Column("tenant", sa.String, nullable=False),
    sa.Column("ruleset_id", sa.String, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("principal", sa.String, nullable=False),
    sa.Column("event_time", UTCDateTime, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("chain_seq", sa.BigInteger, nullable=False),
    sa.Column("previous_hash", sa.String(64), nullable=False),
    sa.Column("record_hash", sa.String(64), nullable=False),
    sa.PrimaryKeyConstraint("tenant", "ruleset_id", "version", "action", name="pk_lifecycle_events"),
    sa.UniqueConstraint("tenant", "chain_seq", name="uq_lifecycle_events_chain_seq"),
    sa.ForeignKeyConstraint(
        ["tenant", "ruleset_id", "version"],
        ["ruleset_versions.tenant", "ruleset_versions.ruleset_id", "ruleset_versions.version"],
        name="fk_lifecycle_events_version",
    ),
)

settlements = sa.Table(
    "settlements",
    metadata,
    sa.Column("settlement_id", sa.String(32), nullable=False),
    sa.Column("tenant", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("request_fingerprint", sa.String, nullable=False),
    sa.Column("contract_id", sa.String, nullable=False),
    sa.Column("seller_id", sa.String, nullable=False),
    sa.Column("market", sa.String, nullable=False),
    sa.Column("period_start", sa.Date, nullable=False),
    sa.Column("period_end", sa.Date, nullable=False),
    sa.Column("ruleset_id", sa.String, nullable=False),
    sa.Column("ruleset_version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String, nullable=False),
    sa.Column("engine_version", sa.String, nullable=False),
    sa.Column("currency", sa.String, nullable=False),
    sa.Column("total", sa.Text, nullable=False),
    sa.Column("request_json", sa.LargeBinary, nullable=False),
    sa.Column("decision_json", sa.LargeBinary, nullable=False),
    sa.Column("deltas_json", sa.LargeBinary, nullable=False),
    sa.Column("principal", sa.String, nullable=False),
    sa.Column("expected_revision", sa.Integer, nullable=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("supersedes_id", sa.String(32), nullable=True),
    sa.Column("create_time", UTCDateTime, nullable=False),
    sa.Column("chain_seq", sa.BigInteger, nullable=False),
    sa.Column("previous_hash", sa.String(64), nullable=False),
    sa.Column("record_hash", sa.String(64), nullable=False),
    sa.PrimaryKeyConstraint("settlement_id", name="pk_settlements"),
    sa.UniqueConstraint("tenant", "request_id", name="uq_settlements_request_id"),
    sa.UniqueConstraint("tenant", "period_start", "contract_id", "revision", name="uq_settlements_revision"),
    sa.UniqueConstraint("supersedes_id", name="uq_settlements_supersedes_id"),
    sa.UniqueConstraint("tenant", "chain_seq", name="uq_settlements_chain_seq"),
    sa.ForeignKeyConstraint(["supersedes_id"], ["settlements.settlement_id"], name="fk_settlements_supersedes"),
    sa.Index("ix_settlements_contract", "tenant", "contract_id", "period_start"),
    sa.Index("ix_settlements_seller", "tenant", "seller_id", "period_start"),
)

_ALLOWED_TRANSITIONS: Final[Mapping[LifecycleAction, frozenset[VersionStatus]]] = {
    LifecycleAction.APPROVED: frozenset({VersionStatus.DRAFT}),
    LifecycleAction.RETIRED: frozenset({VersionStatus.DRAFT, VersionStatus.APPROVED}),
}


def _versions_select() -> sa.Select[Any]:
    """Every version of the tenant bound as `tenant`, with its approval and retirement."""
    v = ruleset_versions
    approved = lifecycle_events.alias("approved")
    retired = lifecycle_events.alias("retired")

    def joined(alias: sa.FromClause, action: LifecycleAction) -> sa.ColumnElement[bool]:
        return sa.and_(
            alias.c.tenant == v.c.tenant,
            alias.c.ruleset_id == v.c.ruleset_id,
            alias.c.version == v.c.version,
            alias.c.action == action.value,
        )

    return (
        sa.select(
            v.c.tenant,
            v.c.ruleset_id,
            v.c.version,
            v.c.source,
            v.c.content_hash,
            v.c.effective_from,
            v.c.author,
            v.c.create_time,
            approved.c.principal.label("approver"),
            approved.c.event_time.label("approve_time"),
            retired.c.event_time.label("retire_time"),
        )
        .select_from(
            v.outerjoin(approved, joined(approved, LifecycleAction.APPROVED)).outerjoin(retired, joined(retired, LifecycleAction.RETIRED))
        )
        .where(v.c.tenant == sa.bindparam("tenant"))
    )


# The statements of the settle path, built once: building a statement (and its cache key)
# costs more than running it, and a settlement runs about ten of them.
_VERSIONS: Final = _versions_select()
_VERSION: Final = _VERSIONS.where(
    ruleset_versions.c.ruleset_id == sa.bindparam("ruleset_id"), ruleset_versions.c.version == sa.bindparam("version")
)
_VERSIONS_IN_EFFECT: Final = _VERSIONS.where(
    ruleset_versions.c.ruleset_id == sa.bindparam("ruleset_id"), ruleset_versions.c.effective_from <= sa.bindparam("on")
).order_by(ruleset_versions.c.effective_from.desc(), ruleset_versions.c.version.desc())
_HEAD: Final = sa.select(chain_heads.c.last_seq, chain_heads.c.last_hash).where(chain_heads.c.tenant == sa.bindparam("tenant"))
_HEAD_FOR_UPDATE: Final = _HEAD.with_for_update()
_SAVE_HEAD: Final = chain_heads.update().where(chain_heads.c.tenant == sa.bindparam("head_tenant"))
_SETTLEMENT_BY_REQUEST: Final = sa.select(settlements).where(
    settlements.c.tenant == sa.bindparam("tenant"), settlements.c.request_id == sa.bindparam("request_id")
)
_SETTLEMENT_BY_ID: Final = sa.select(settlements).where(
    settlements.c.tenant == sa.bindparam("tenant"), settlements.c.settlement_id == sa.bindparam("settlement_id")
)
_OF_CONTRACT_PERIOD: Final = (
    settlements.c.tenant == sa.bindparam("tenant"),
    settlements.c.contract_id == sa.bindparam("contract_id"),
    settlements.c.period_start == sa.bindparam("period_start"),
)
_VERSIONS_STAMP: Final = sa.select(sa.func.max(lifecycle_events.c.chain_seq)).where(lifecycle_events.c.tenant == sa.bindparam("tenant"))
_LATEST_OF_KEY: Final = (
    sa.select(settlements.c.settlement_id, settlements.c.revision)
    .where(*_OF_CONTRACT_PERIOD)
    .order_by(settlements.c.revision.desc())
    .limit(1)
)
#: Under the write lock, what one new settlement's checks need: the tenant's versions stamp,
#: whether its request id is taken, and the latest revision of its contract period.
_SINGLE_CHECKS: Final = sa.select(
    _VERSIONS_STAMP.scalar_subquery().label("stamp"),
    sa.select(settlements.c.settlement_id)
    .where(settlements.c.tenant == sa.bindparam("tenant"), settlements.c.request_id == sa.bindparam("request_id"))
    .scalar_subquery()
    .label("taken"),
    _LATEST_OF_KEY.with_only_columns(settlements.c.settlement_id).scalar_subquery().label("latest_id"),
    _LATEST_OF_KEY.with_only_columns(settlements.c.revision).scalar_subquery().label("latest_revision"),
)
_LATEST_SETTLEMENT: Final = sa.select(settlements).where(*_OF_CONTRACT_PERIOD).order_by(settlements.c.revision.desc()).limit(1)


# Lookups of many keys at once: a VALUES list of the keys, with one correlated subquery per
# key that probes the unique index. (An IN list is planned from the table's statistics, and
# without fresh ones PostgreSQL scans the whole tenant for it: the same answer, slower and
# slower as the tenant grows.) The keys are bound parameters of a text statement made once
# per list length, and a list is padded (with its last key) to one of a few lengths:
# SQLAlchemy never caches a statement with a VALUES construct, and compiling one on every
# call cost more than the rest of a Settle together.
_KEY_LIST_LENGTHS: Final = (1, 4, 16, 64, _KEYS_PER_QUERY)


def _padded(keys: Sequence[Any]) -> tuple[int, list[Any]]:
    """The statement length for `keys` (1 to _KEYS_PER_QUERY of them) and the keys padded to it."""
    length = next(n for n in _KEY_LIST_LENGTHS if n >= len(keys))
    return length, [*keys, *([keys[-1]] * (length - len(keys)))]


@functools.cache
def _settled_ids_select(length: int) -> sa.TextClause:
    """(request_id, settlement_id or NULL) for each of `length` request ids bound as r0, r1, …"""
    rows = ", ".join(f"(:r{i})" for i in range(length))
    statement = sa.text(
        f"WITH wanted (request_id) AS (VALUES {rows}) "
        "SELECT wanted.request_id, (SELECT settlements.settlement_id FROM settlements "
        "WHERE settlements.tenant = :tenant AND settlements.request_id = wanted.request_id) AS settlement_id FROM wanted"
    )
    return statement.bindparams(*(sa.bindparam(f"r{i}", type_=sa.String) for i in range(length)), sa.bindparam("tenant", type_=sa.String))


def _settled_ids_params(tenant: str, request_ids: Sequence[str]) -> tuple[int, dict[str, object]]:
    """The statement length for `request_ids` and its parameters (the ids padded to it)."""
    length, padded = _padded(request_ids)
    params: dict[str, object] = {f"r{i}": key for i, key in enumerate(padded)}
    params["tenant"] = tenant
    return length, params


def _settled_ids(conn: Connection, tenant: str, request_ids: Sequence[str]) -> Iterator[sa.Row[Any]]:
    length, params = _settled_ids_params(tenant, request_ids)
    return iter(conn.execute(_settled_ids_select(length), params))


@functools.cache
def _latest_revisions_select(length: int) -> sa.TextClause:
    """(n, latest settlement_id or NULL, its revision or NULL) for each of `length` keys
    bound as c0/p0, c1/p1, …, where n is the key's position in that list (a position, not
    the key: the driver's own rows do not turn SQLite's date text back into a date)."""
    rows = ", ".join(f"({i}, :c{i}, :p{i})" for i in range(length))

    def latest(column: str) -> str:
        return (
            f"(SELECT settlements.{column} FROM settlements WHERE settlements.tenant = :tenant "
            "AND settlements.contract_id = wanted.contract_id AND settlements.period_start = wanted.period_start "
            "ORDER BY settlements.revision DESC LIMIT 1)"
        )

    statement = sa.text(
        f"WITH wanted (n, contract_id, period_start) AS (VALUES {rows}) "
        f"SELECT wanted.n, {latest('settlement_id')} AS settlement_id, {latest('revision')} AS revision FROM wanted"
    )
    binds: list[sa.BindParameter[Any]] = [sa.bindparam("tenant", type_=sa.String)]
    for i in range(length):
        binds += [sa.bindparam(f"c{i}", type_=sa.String), sa.bindparam(f"p{i}", type_=sa.Date)]
    return statement.bindparams(*binds)


_SETTLEMENTS_BY_ID: Final = sa.select(settlements).where(settlements.c.settlement_id.in_(sa.bindparam("settlement_ids", expanding=True)))


_GROUP_COMMIT_MAX: Final = 250  # appends written by one group commit (see SqlStore.append_settlement)


class _Queued:
    """One `append_settlement` call waiting for a group commit, and what became of it."""

    __slots__ = ("append", "done", "error", "outcome")

    def __init__(self, append: Append) -> None:
        self.append = append
        self.done = False
        self.outcome: SettlementRecord | Conflict | None = None
        self.error: Exception | None = None

    def finish(self, outcome: SettlementRecord | Conflict | None, error: Exception | None) -> None:
        self.outcome, self.error, self.done = outcome, error, True


class StoreBusy(StoreError):
    """The write lock was not had in time (another writer holds it); worth retrying (UNAVAILABLE)."""


def _is_lock_timeout(exc: OperationalError) -> bool:
    if getattr(exc.orig, "sqlstate", None) == "55P03":  # PostgreSQL lock_not_available
        return True
    message = str(exc.orig).lower()
    return "database is locked" in message or "database is busy" in message


@functools.cache
def _column_names(table: sa.Table) -> dict[str, None]:
    """The table's column names as plain text, in order (a dict: ordered, and a set for `<=`)."""
    return dict.fromkeys(str(column.name) for column in table.columns)


#: A statement and its parameters, run right after the chain head is locked, in the same
#: round trip on PostgreSQL (see SqlStore._lock_head).
Lookup = tuple[DriverStatement, dict[str, object]]


class _SettlePathStatements:
    """The statements `SqlStore._write` runs on the driver's cursor (see server.storage.driver)."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.head = DriverStatement(_HEAD_FOR_UPDATE if dialect.name == "postgresql" else _HEAD, dialect)
        self.single_checks = DriverStatement(_SINGLE_CHECKS, dialect)
        self.versions_stamp = DriverStatement(_VERSIONS_STAMP, dialect)
        self.insert_settlements = DriverStatement(settlements.insert(), dialect, [column.name for column in settlements.columns])
        self.save_head = DriverStatement(_SAVE_HEAD, dialect, ["last_seq", "last_hash"])
        self._settled_ids = {length: DriverStatement(_settled_ids_select(length), dialect) for length in _KEY_LIST_LENGTHS}
        self._latest = {length: DriverStatement(_latest_revisions_select(length), dialect) for length in _KEY_LIST_LENGTHS}

    def settled_ids(self, tenant: str, request_ids: Sequence[str]) -> Lookup:
        """Rows (request_id, settlement_id or NULL) for 1 to _KEYS_PER_QUERY request ids."""
        length, params = _settled_ids_params(tenant, request_ids)
        statement = self._settled_ids[length]
        return statement, statement.params(params)

    def latest_revisions(self, tenant: str, keys: Sequence[tuple[str, datetime.date]]) -> Lookup:
        """Rows (position in `keys`, latest settlement_id or NULL, its revision or NULL) for
        1 to _KEYS_PER_QUERY (contract_id, period_start) keys."""
        length, padded = _padded(keys)
        params: dict[str, object] = {"tenant": tenant}
        for i, (contract_id, period_start) in enumerate(padded):
            params[f"c{i}"] = contract_id
            params[f"p{i}"] = period_start
        statement = self._latest[length]
        return statement, statement.params(params)


class _ChainWriter:
    """Appends links to one tenant's chain inside a write transaction that holds its lock."""

    def __init__(self, conn: Connection, tenant: str, seq: int, last_hash: str, looked_up: list[list[Any]]) -> None:
        self.conn = conn
        self.tenant = tenant
        self.seq = seq
        self.last_hash = last_hash
        self.start_seq = seq
        #: The rows of each lookup `SqlStore._write` was given, read with the lock held.
        self.looked_up = looked_up
        #: Settlement rows to insert when the transaction ends, with the new head (one round trip on PostgreSQL).
        self.pending_settlements: list[dict[str, object]] = []

    def append(self, table: sa.Table, kind: str, values: Mapping[str, object]) -> dict[str, object]:
        row = self.link(table, kind, values)
        self.conn.execute(table.insert(), row)
        return row

    def link(self, table: sa.Table, kind: str, values: Mapping[str, object]) -> dict[str, object]:
        """The next link's row (seq, previous and record hash), to be inserted by the caller in this transaction."""
        names = _column_names(table)
        if not values.keys() <= names.keys():
            raise ValueError(f"unknown columns for {table.name}: {sorted(set(values) - set(names))}")
        row: dict[str, object] = dict.fromkeys(names)
        row.update(values)
        row["tenant"] = self.tenant
        row["chain_seq"] = self.seq + 1
        row["previous_hash"] = self.last_hash
        row["record_hash"] = link_hash(self.last_hash, canonical_content(kind, row))
        self.seq += 1
        self.last_hash = str(row["record_hash"])
        return row


def _in_key_order(query: sa.Select[Any], key: Sequence[sa.Column[Any]], after: Sequence[object] | None) -> sa.Select[Any]:
    """`query` ordered by the columns of `key`, and with `after` (the last row's key) only
    the rows whose key is greater: keyset paging."""
    if after is not None:
        bounds = (sa.literal(value, column.type) for column, value in zip(key, after, strict=True))
        query = query.where(sa.tuple_(*key) > sa.tuple_(*bounds))
    return query.order_by(*key)


def _check_page_size(page_size: int) -> int:
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    return min(page_size, MAX_PAGE_SIZE)


def _check_date(value: object, name: str) -> None:
    if isinstance(value, datetime.datetime) or not isinstance(value, datetime.date):
        raise TypeError(f"{name} must be a datetime.date")


_SESSION_SET: Final = "kpisettle_session"


def _configure_sessions_on_checkout(engine: Engine, lock_timeout: float) -> None:
    """PostgreSQL: every connection of the store's pool, once, when first checked out:

    - waits at most `lock_timeout` for a lock (the tenant's chain row), rather than a SET
      LOCAL round trip in every write transaction. Reads take no row locks; a read that
      waits on a table lock (a migration's DDL) fails after the same time instead of
      waiting forever;
    - plans each statement for its parameters and the table as it is now
      (``plan_cache_mode = force_custom_plan``). psycopg prepares a statement on its fifth
      use, and PostgreSQL then keeps a generic plan chosen from the statistics of that
      moment. On a new database that is an empty, never-analyzed table, for which a scan
      of the tenant's whole seller index looks as cheap as the request id's unique index:
      a Settle then took longer with every settlement stored (1.1 → 5 ms each after
      20,000, one thread) until autovacuum's first ANALYZE, up to a minute later. Planning
      each time costs the database ~0.13 ms for a lone Settle's checks (pgbench: 0.09 →
      0.22 ms a statement); the statements stay prepared, so parsing is still saved."""
    statements = (f"SET lock_timeout = '{max(1, int(lock_timeout * 1000))}ms'", "SET plan_cache_mode = force_custom_plan")

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.get(_SESSION_SET) == statements:
            return
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
        finally:
            cursor.close()
        if not dbapi_connection.autocommit:
            dbapi_connection.commit()  # session settings: they outlive the pool's rollback on return
        record.info[_SESSION_SET] = statements


class SqlStore:
    """`server.storage.interface.Store` on SQLAlchemy 2 (SQLite or PostgreSQL). Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock | None = None,
        *,
        lock_timeout: float = WRITE_LOCK_TIMEOUT_S,
        write_priority: WritePriority | None = None,
    ) -> None:
        self._engine = engine
        # Marks the writes that hold a tenant's lock, so that this process's deciding threads
        # pause meanwhile (server.write_priority).
        self._write_priority = write_priority or WritePriority()
        # PostgreSQL: the driver is in autocommit and the store sends BEGIN and COMMIT itself,
        # each in the pipeline of the statements next to it. psycopg would otherwise send the
        # BEGIN in a round trip of its own, and end each pipeline with one more (its Sync):
        # a write group took six round trips, three of them spent waiting on nothing.
        self._postgres = engine.dialect.name == "postgresql"
        self._writer = engine.execution_options(**{_WRITE_OPTION: True}, **({"isolation_level": "AUTOCOMMIT"} if self._postgres else {}))
        self._clock: Clock = clock or _utc_now
        self._lock_timeout = lock_timeout  # SQLite: the engine's busy timeout should match (create_engine_for)
        # SQLite has one writer at a time and its busy handler polls: the threads of this
        # process queue on a lock instead, and only other processes meet the busy handler.
        self._local_write_lock = None if self._postgres else threading.Lock()
        # ... and the processes writing one file take turns on a file lock, which changes
        # hands at once, instead of meeting in SQLite's busy handler, which sleeps up to 100 ms
        # between tries (--workers 2, 32 callers: p99 110 → 40 ms, 1,530 → 1,710 req/s).
        self._file_lock = _sqlite_file_lock(engine)
        # SQLite: the writes of this process are one at a time (the lock above), so they
        # keep one connection instead of checking one out of the pool and back each time
        # (a sixth of a Settle's CPU, with the rollback the pool does on every return).
        self._write_connection: Connection | None = None
        # Group commit of append_settlement (see there): the queued calls and a lock per tenant.
        self._queue_guard = threading.Lock()
        self._queues: dict[str, list[_Queued]] = {}
        self._combine_locks: dict[str, threading.Lock] = {}
        if self._postgres:
            _configure_sessions_on_checkout(engine, lock_timeout)
        self._statements = _SettlePathStatements(engine.dialect)
        # Single-statement reads need no transaction around them: on PostgreSQL they run in
        # autocommit, which saves the BEGIN and ROLLBACK round trips of each one.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT") if self._postgres else engine

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        local = self._local_write_lock
        if local is not None and local.acquire(timeout=self._lock_timeout):
            try:
                if self._write_connection is not None:
                    self._write_connection.close()
                    self._write_connection = None
                if self._file_lock is not None:
                    self._file_lock.close()
            finally:
                local.release()
        self._engine.dispose()

    # -- plumbing -----------------------------------------------------------------------

    def _now(self) -> datetime.datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the store's clock must return timezone-aware datetimes")
        return now.astimezone(datetime.UTC)

    @contextmanager
    def _write(self, tenant: str, lookups: Sequence[Lookup] = ()) -> Iterator[_ChainWriter]:
        """One write transaction holding `tenant`'s chain lock; commits on success.

        The writer's `looked_up` holds the rows of each of `lookups`, read right after the
        lock is had. StoreBusy when the lock is not had within the store's lock timeout."""
        busy = f"no write lock on the database within {self._lock_timeout:g} s"
        local = self._local_write_lock
        if local is not None and not local.acquire(timeout=self._lock_timeout):
            raise StoreBusy(busy)
        file_lock = self._file_lock
        try:
            if file_lock is not None and not file_lock.acquire(self._lock_timeout):
                file_lock = None  # not had: nothing to let go of
                raise StoreBusy(busy)
            with self._write_transaction() as conn:
                head, looked_up = self._lock_head(conn, tenant, lookups, begin=True)
                if head is None:  # the tenant's first write: make its head row, then lock it
                    if self._postgres:
                        conn.execute(
                            pg_insert(chain_heads)
                            .values(tenant=tenant, last_seq=0, last_hash=GENESIS_HASH)
                            .on_conflict_do_nothing(index_elements=["tenant"])
                        )
                    else:
                        conn.execute(chain_heads.insert().values(tenant=tenant, last_seq=0, last_hash=GENESIS_HASH))
                    head, looked_up = self._lock_head(conn, tenant, lookups)  # the lookups too: the first ran unlocked
                    assert head is not None
                writer = _ChainWriter(conn, tenant, int(head[0]), str(head[1]), looked_up)
                with self._write_priority.holding_lock():
                    yield writer
                    self._finish(writer)
        except OperationalError as exc:
            if _is_lock_timeout(exc):
                raise StoreBusy(busy) from exc
            raise
        finally:
            if file_lock is not None:
                file_lock.release()
            if local is not None:
                local.release()

    def _lock_head(self, conn: Connection, tenant: str, lookups: Sequence[Lookup], begin: bool = False) -> tuple[Any, list[list[Any]]]:
        """The tenant's chain head (last_seq, last_hash) or None, locked, and the rows of each
        of `lookups`, read after the lock.

        PostgreSQL: the BEGIN (with `begin`), the ``SELECT … FOR UPDATE`` (lock_timeout is
        the session's, see _configure_sessions_on_checkout) and the lookups go in one round
        trip; each lookup starts after the lock is had, so its snapshot sees every write
        committed before. The rows are read once the pipeline has ended: a fetch inside it
        would cost a round trip of its own. SQLite: BEGIN IMMEDIATE already holds the
        database's write lock."""
        raw = driver_connection(conn)
        head_statement = self._statements.head
        with as_sqlalchemy_errors(conn, head_statement.sql):
            with pipeline(raw, self._postgres):
                if begin and self._postgres:
                    raw.execute(_BEGIN)
                head_cursor = raw.cursor()
                head_cursor.execute(head_statement.sql, head_statement.params({"tenant": tenant}))
                cursors = []
                for statement, params in lookups:
                    cursor = raw.cursor()
                    cursor.execute(statement.sql, params)
                    cursors.append(cursor)
            head = head_cursor.fetchone()
            looked_up = [cursor.fetchall() for cursor in cursors]
        return head, looked_up

    def _finish(self, writer: _ChainWriter) -> None:
        """Insert the writer's pending settlements and save the new head; on PostgreSQL also
        commit, all in one round trip (the commit SQLAlchemy then makes has nothing to do)."""
        raw = driver_connection(writer.conn)
        statements = self._statements
        insert, save_head = statements.insert_settlements, statements.save_head
        with as_sqlalchemy_errors(writer.conn, insert.sql), pipeline(raw, self._postgres):
            cursor = raw.cursor()
            if writer.pending_settlements:
                cursor.executemany(insert.sql, [insert.params(row) for row in writer.pending_settlements])
            if writer.seq != writer.start_seq:
                cursor.execute(
                    save_head.sql, save_head.params({"head_tenant": writer.tenant, "last_seq": writer.seq, "last_hash": writer.last_hash})
                )
            if self._postgres:
                cursor.execute(_COMMIT)

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed when the block ends
        without an error, else rolled back. SQLite: on this process's one write connection
        (the caller holds the local write lock); PostgreSQL: on a pooled connection."""
        if self._local_write_lock is None:
            with self._writer.begin() as conn:
                yield conn
            return
        kept = self._write_connection
        if kept is None or kept.closed or kept.invalidated:
            if kept is not None:
                kept.close()
            kept = self._write_connection = self._writer.connect()
        conn = kept
        try:
            with conn.begin():
                yield conn
        except BaseException:
            if conn.invalidated or conn.in_transaction():  # not usable as it is: a fresh one next time
                self._write_connection = None
                conn.close()
            raise

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction whose statements all see one snapshot."""
        with self._engine.connect() as conn:
            if self._postgres:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    # -- ruleset versions ---------------------------------------------------------------

    @staticmethod
    def _version_record(row: sa.Row[Any]) -> RulesetVersionRecord:
        if row.retire_time is not None:
            status = VersionStatus.RETIRED
        elif row.approve_time is not None:
            status = VersionStatus.APPROVED
        else:
            status = VersionStatus.DRAFT
        return RulesetVersionRecord(
            tenant=row.tenant,
            ruleset_id=row.ruleset_id,
            version=row.version,
            source=row.source,
            content_hash=row.content_hash,
            effective_from=row.effective_from,
            author=row.author,
            create_time=row.create_time,
            status=status,
            approver=row.approver,
            approve_time=row.approve_time,
            retire_time=row.retire_time,
        )

    def _load_version(self, conn: Connection, tenant: str, ruleset_id: str, version: int) -> RulesetVersionRecord:
        row = conn.execute(_VERSION, {"tenant": tenant, "ruleset_id": ruleset_id, "version": version}).one_or_none()
        if row is None:
            raise NotFound(f"ruleset {ruleset_id!r} has no version {version}")
        return self._version_record(row)

    def create_ruleset_version(
        self, tenant: str, ruleset_id: str, source: str, content_hash: str, effective_from: datetime.date, author: str
    ) -> RulesetVersionRecord:
        _check_date(effective_from, "effective_from")
        with self._write(tenant) as chain:
            v = ruleset_versions
            last = chain.conn.execute(
                sa.select(sa.func.max(v.c.version)).where(v.c.tenant == tenant, v.c.ruleset_id == ruleset_id)
            ).scalar_one_or_none()
            version = (last or 0) + 1
            now = self._now()
            chain.append(
                v,
                KIND_RULESET_VERSION,
                {
                    "ruleset_id": ruleset_id,
                    "version": version,
                    "source": source,
                    "content_hash": content_hash,
                    "effective_from": effective_from,
                    "author": author,
                    "create_time": now,
                },
            )
            chain.append(
                lifecycle_events,
                KIND_LIFECYCLE_EVENT,
                {
                    "ruleset_id": ruleset_id,
                    "version": version,
                    "action": LifecycleAction.CREATED.value,
                    "principal": author,
                    "event_time": now,
                    "note": "",
                },
            )
        return RulesetVersionRecord(
            tenant=tenant,
            ruleset_id=ruleset_id,
            version=version,
            source=source,
            content_hash=content_hash,
            effective_from=effective_from,
            author=author,
            create_time=now,
            status=VersionStatus.DRAFT,
        )

    def get_ruleset_version(self, tenant: str, ruleset_id: str, version: int) -> RulesetVersionRecord:
        with self._reader.connect() as conn:
            return self._load_version(conn, tenant, ruleset_id, version)

    def list_ruleset_versions(
        self, tenant: str, ruleset_id: str | None, page_size: int, after: tuple[str, int] | None
    ) -> list[RulesetVersionRecord]:
        limit = _check_page_size(page_size)
        v = ruleset_versions
        query = _VERSIONS
        if ruleset_id is not None:
            query = query.where(v.c.ruleset_id == ruleset_id)
        if after is not None:
            query = query.where(sa.tuple_(v.c.ruleset_id, v.c.version) > sa.tuple_(sa.literal(after[0]), sa.literal(after[1])))
        query = query.order_by(v.c.ruleset_id, v.c.version).limit(limit)
        with self._reader.connect() as conn:
            return [self._version_record(row) for row in conn.execute(query, {"tenant": tenant})]

    def version_in_effect(self, tenant: str, ruleset_id: str, on: datetime.date) -> RulesetVersionRecord | None:
        """The APPROVED version with the latest effective_from on or before `on` (ties: highest version)."""
        with self._reader.connect() as conn:
            rows = conn.execute(_VERSIONS_IN_EFFECT, {"tenant": tenant, "ruleset_id": ruleset_id, "on": on})
            for row in rows:
                record = self._version_record(row)
                if record.status is VersionStatus.APPROVED:
                    return record
        return None

    def versions_stamp(self, tenant: str) -> int:
        """The chain seq of the tenant's latest lifecycle event: every version created, approved
        or retired adds one (one probe of the unique (tenant, chain_seq) index)."""
        with self._reader.connect() as conn:
            return int(conn.execute(_VERSIONS_STAMP, {"tenant": tenant}).scalar_one_or_none() or 0)

    def record_lifecycle(
        self, tenant: str, ruleset_id: str, version: int, action: LifecycleAction, principal: str, note: str = ""
    ) -> RulesetVersionRecord:
        action = LifecycleAction(action)
        with self._write(tenant) as chain:
            current = self._load_version(chain.conn, tenant, ruleset_id, version)
            allowed = _ALLOWED_TRANSITIONS.get(action, frozenset())
            if current.status not in allowed:
                raise Conflict(
                    "INVALID_TRANSITION",
                    f"{ruleset_id}@{version} is {current.status.value}; it cannot become {action.value}",
                )
            chain.append(
                lifecycle_events,
                KIND_LIFECYCLE_EVENT,
                {
                    "ruleset_id": ruleset_id,
                    "version": version,
                    "action": action.value,
                    "principal": principal,
                    "event_time": self._now(),
                    "note": note,
                },
            )
            return self._load_version(chain.conn, tenant, ruleset_id, version)

    def lifecycle_events(self, tenant: str, ruleset_id: str, version: int) -> list[LifecycleEvent]:
        e = lifecycle_events
        with self._engine.connect() as conn:
            self._load_version(conn, tenant, ruleset_id, version)  # NotFound for a missing version
            rows = conn.execute(
                sa.select(e).where(e.c.tenant == tenant, e.c.ruleset_id == ruleset_id, e.c.version == version).order_by(e.c.chain_seq)
            )
            return [
                LifecycleEvent(
                    tenant=row.tenant,
                    ruleset_id=row.ruleset_id,
                    version=row.version,
                    action=LifecycleAction(row.action),
                    principal=row.principal,
                    time=row.event_time,
                    note=row.note,
                )
                for row in rows
            ]

    # -- settlements --------------------------------------------------------------------

    @staticmethod
    def _settlement_record(row: sa.Row[Any]) -> SettlementRecord:
        return SettlementRecord(
            settlement_id=row.settlement_id,
            revision=row.revision,
            supersedes_id=row.supersedes_id,
            create_time=row.create_time,
            chain_seq=row.chain_seq,
            record_hash=row.record_hash,
            previous_hash=row.previous_hash,
            data=NewSettlement(
                tenant=row.tenant,
                request_id=row.request_id,
                request_fingerprint=row.request_fingerprint,
                contract_id=row.contract_id,
                seller_id=row.seller_id,
                market=row.market,
                period_start=row.period_start,
                period_end=row.period_end,
                ruleset_id=row.ruleset_id,
                ruleset_version=row.ruleset_version,
                content_hash=row.content_hash,
                engine_version=row.engine_version,
                currency=row.currency,
                total=row.total,
                request_json=bytes(row.request_json),
                decision_json=bytes(row.decision_json),
                deltas_json=bytes(row.deltas_json),
                principal=row.principal,
                expected_revision=row.expected_revision,
            ),
        )

    def _one_settlement(self, query: sa.Select[Any], params: Mapping[str, object]) -> SettlementRecord | None:
        with self._reader.connect() as conn:
            row = conn.execute(query, params).one_or_none()
        return None if row is None else self._settlement_record(row)

    def settlement_by_request(self, tenant: str, request_id: str) -> SettlementRecord | None:
        return self._one_settlement(_SETTLEMENT_BY_REQUEST, {"tenant": tenant, "request_id": request_id})

    def settlements_by_requests(self, tenant: str, request_ids: Sequence[str]) -> dict[str, SettlementRecord]:
        """The stored settlements of those request ids, by request id."""
        wanted = sorted(set(request_ids))
        found: dict[str, SettlementRecord] = {}
        with self._reader.connect() as conn:
            for start in range(0, len(wanted), _KEYS_PER_QUERY):
                ids = [row.settlement_id for row in _settled_ids(conn, tenant, wanted[start : start + _KEYS_PER_QUERY])]
                ids = [settlement_id for settlement_id in ids if settlement_id is not None]
                if ids:
                    for row in conn.execute(_SETTLEMENTS_BY_ID, {"settlement_ids": ids}):
                        if row.tenant == tenant:
                            found[row.request_id] = self._settlement_record(row)
        return found

    def latest_settlement(self, tenant: str, contract_id: str, period_start: datetime.date) -> SettlementRecord | None:
        return self._one_settlement(_LATEST_SETTLEMENT, {"tenant": tenant, "contract_id": contract_id, "period_start": period_start})

    def get_settlement(self, tenant: str, settlement_id: str) -> SettlementRecord:
        record = self._one_settlement(_SETTLEMENT_BY_ID, {"tenant": tenant, "settlement_id": settlement_id})
        if record is None:
            raise NotFound(f"no settlement {settlement_id!r}")
        return record

    @staticmethod
    def _check_append(new: NewSettlement, supersedes: SettlementRecord | None) -> None:
        _check_date(new.period_start, "period_start")
        _check_date(new.period_end, "period_end")
        if supersedes is not None and (
            supersedes.data.tenant != new.tenant
            or supersedes.data.contract_id != new.contract_id
            or supersedes.data.period_start != new.period_start
        ):
            raise ValueError("supersedes must be a revision of the same tenant, contract and period")

    def _next_settlement(
        self,
        chain: _ChainWriter,
        append: Append,
        taken: set[str],
        latest: Mapping[tuple[str, datetime.date], tuple[str, int]],
        added: Mapping[str, SettlementRecord],
    ) -> tuple[SettlementRecord, dict[str, object]]:
        """`append_settlement`'s checks for one settlement, then its record and chain row (not yet inserted)."""
        new, supersedes = append.new, append.supersedes
        if new.request_id in taken:
            raise Conflict("DUPLICATE_REQUEST_ID", f"request id {new.request_id!r} is already settled")
        latest_id, latest_revision = latest.get((new.contract_id, new.period_start), (None, 0))
        if new.expected_revision is not None and new.expected_revision != latest_revision:
            raise Conflict(
                "EXPECTED_REVISION_MISMATCH",
                f"expected revision {new.expected_revision} but the latest revision is {latest_revision}",
            )
        wanted_id = None if supersedes is None else supersedes.settlement_id
        if latest_id != wanted_id:
            if append.rebase is None:
                raise Conflict(
                    "REVISION_TAKEN",
                    f"the latest revision of {new.contract_id} for {new.period_start.isoformat()} is now {latest_revision}",
                )
            current = None
            if latest_id is not None:
                current = added.get(latest_id) or self._settlement_record(
                    chain.conn.execute(_SETTLEMENT_BY_ID, {"tenant": new.tenant, "settlement_id": latest_id}).one()
                )
            new = dataclasses.replace(new, deltas_json=append.rebase(current))
            wanted_id = latest_id
        settlement_id = uuid.uuid4().hex
        revision = latest_revision + 1
        now = self._now()
        row = chain.link(
            settlements,
            KIND_SETTLEMENT,
            {
                "settlement_id": settlement_id,
                "request_id": new.request_id,
                "request_fingerprint": new.request_fingerprint,
                "contract_id": new.contract_id,
                "seller_id": new.seller_id,
                "market": new.market,
                "period_start": new.period_start,
                "period_end": new.period_end,
                "ruleset_id": new.ruleset_id,
                "ruleset_version": new.ruleset_version,
                "content_hash": new.content_hash,
                "engine_version": new.engine_version,
                "currency": new.currency,
                "total": new.total,
                "request_json": bytes(new.request_json),
                "decision_json": bytes(new.decision_json),
                "deltas_json": bytes(new.deltas_json),
                "principal": new.principal,
                "expected_revision": new.expected_revision,
                "revision": revision,
                "supersedes_id": wanted_id,
                "create_time": now,
            },
        )
        record = SettlementRecord(
            settlement_id=settlement_id,
            revision=revision,
            supersedes_id=wanted_id,
            create_time=now,
            chain_seq=int(str(row["chain_seq"])),
            record_hash=str(row["record_hash"]),
            previous_hash=str(row["previous_hash"]),
            data=new,
        )
        return record, row

    def append_settlement(
        self, new: NewSettlement, supersedes: SettlementRecord | None, rebase: Rebase | None = None, versions_stamp: int | None = None
    ) -> SettlementRecord:
        """Append the next revision of (tenant, contract_id, period_start) in one transaction.

        Checks, in this order, under the tenant's chain lock: the request id is new
        (DUPLICATE_REQUEST_ID: the caller re-reads it with `settlement_by_request`); the
        latest revision number equals `new.expected_revision` when that is set
        (EXPECTED_REVISION_MISMATCH); the latest revision is `supersedes` (REVISION_TAKEN).
        With `rebase`, a latest revision other than `supersedes` is no conflict: the new
        revision goes on top of it, with the deltas_json that `rebase(latest)` returns.
        VersionsChanged when `versions_stamp` is set and the tenant's is no longer it.

        Group commit: the appends that threads of this process make for one tenant while
        another one is being written queue, and the next of them to get the tenant's lock
        writes all the queued ones (up to _GROUP_COMMIT_MAX) in one transaction, each
        checked as if alone, in queue order; every caller returns after the commit that
        stored its own. If that transaction fails, each is tried again in a transaction of
        its own, so that one bad value fails only its own call.
        """
        entry = _Queued(Append(new, supersedes, rebase, versions_stamp))
        tenant = new.tenant
        with self._queue_guard:
            queue = self._queues.setdefault(tenant, [])
            lock = self._combine_locks.setdefault(tenant, threading.Lock())
            queue.append(entry)
        if not lock.acquire(timeout=self._lock_timeout):
            with self._queue_guard:
                if entry in queue:  # not taken by a writer: give up
                    queue.remove(entry)
                    raise StoreBusy(f"no write lock on the database within {self._lock_timeout:g} s")
            lock.acquire()  # a writer has it: its answer is coming
        try:
            while not entry.done:
                with self._queue_guard:
                    group = queue[:_GROUP_COMMIT_MAX]
                    del queue[: len(group)]
                self._write_group(group)
        finally:
            lock.release()
        if entry.error is not None:
            raise entry.error
        outcome = entry.outcome
        if isinstance(outcome, Conflict):
            raise outcome
        assert outcome is not None
        return outcome

    def _write_group(self, group: list[_Queued]) -> None:
        """Settle the outcome of every entry of `group` (see `append_settlement`)."""
        try:
            outcomes = self._append_settlements([entry.append for entry in group], stamp_each=True)
        except StoreBusy as exc:
            for entry in group:
                entry.finish(None, exc)
            return
        except Exception as exc:
            if len(group) == 1:
                group[0].finish(None, self._explained(group[0].append, exc))
                return
            for entry in group:  # one at a time tells whose value it was
                try:
                    (outcome,) = self._append_settlements([entry.append], stamp_each=True)
                except Exception as alone:
                    entry.finish(None, self._explained(entry.append, alone))
                else:
                    entry.finish(outcome, None)
            return
        for entry, outcome in zip(group, outcomes, strict=True):
            entry.finish(outcome, None)

    def _explained(self, append: Append, exc: Exception) -> Exception:
        """An IntegrityError (a rule the checks enforce, hit anyway) as the Conflict the checks would have raised."""
        if not isinstance(exc, IntegrityError):
            return exc
        new, supersedes = append.new, append.supersedes
        if self.settlement_by_request(new.tenant, new.request_id) is not None:
            conflict = Conflict("DUPLICATE_REQUEST_ID", f"request id {new.request_id!r} is already settled")
        else:
            current = self.latest_settlement(new.tenant, new.contract_id, new.period_start)
            if (None if current is None else current.settlement_id) == (None if supersedes is None else supersedes.settlement_id):
                return exc
            conflict = Conflict("REVISION_TAKEN", f"the latest revision of {new.contract_id} has changed")
        conflict.__cause__ = exc
        return conflict

    def append_settlements(self, appends: Sequence[Append]) -> list[SettlementRecord | Conflict]:
        """Append several settlements of one tenant in one transaction, in order, each checked
        as `append_settlement` checks it (seeing the ones before it). One that fails a check
        is its Conflict in the result and stores nothing; the others commit together, with
        one commit. Any other error rolls them all back, and so does VersionsChanged (raised
        when one of them has a `versions_stamp` other than the tenant's)."""
        return self._append_settlements(appends, stamp_each=False)

    def _append_settlements(self, appends: Sequence[Append], stamp_each: bool) -> list[SettlementRecord | Conflict]:
        """`append_settlements`; with `stamp_each`, a stale `versions_stamp` is that append's
        VersionsChanged in the result instead of an error for them all."""
        if not appends:
            return []
        tenant = appends[0].new.tenant
        for append in appends:
            if append.new.tenant != tenant:
                raise ValueError("append_settlements takes the settlements of one tenant")
            self._check_append(append.new, append.supersedes)
        request_ids = sorted({append.new.request_id for append in appends})
        keys = sorted({(append.new.contract_id, append.new.period_start) for append in appends})
        outcomes: list[SettlementRecord | Conflict] = []
        stamps = {append.versions_stamp for append in appends if append.versions_stamp is not None}
        statements = self._statements
        lookups: list[Lookup] = []
        if len(appends) == 1:  # a Settle: what its checks need in one statement
            ((contract_id, period_start),) = keys
            checks = {"tenant": tenant, "request_id": request_ids[0], "contract_id": contract_id, "period_start": period_start}
            lookups.append((statements.single_checks, statements.single_checks.params(checks)))
        else:  # the versions stamp, the request ids taken, the latest revision of each key
            id_chunks = [request_ids[start : start + _KEYS_PER_QUERY] for start in range(0, len(request_ids), _KEYS_PER_QUERY)]
            key_chunks = [keys[start : start + _KEYS_PER_QUERY] for start in range(0, len(keys), _KEYS_PER_QUERY)]
            lookups.append((statements.versions_stamp, statements.versions_stamp.params({"tenant": tenant})))
            lookups += [statements.settled_ids(tenant, chunk) for chunk in id_chunks]
            lookups += [statements.latest_revisions(tenant, chunk) for chunk in key_chunks]
        with self._write(tenant, lookups) as chain:
            # What the checks need, read under the lock, then kept up to date in memory as
            # the settlements are added: the request ids taken, and the latest revision of
            # each (contract, period).
            taken: set[str] = set()
            latest: dict[tuple[str, datetime.date], tuple[str, int]] = {}
            if len(appends) == 1:
                ((stamp, taken_id, latest_id, latest_revision),) = chain.looked_up[0]
                if taken_id is not None:
                    taken.add(request_ids[0])
                if latest_id is not None:
                    latest[(contract_id, period_start)] = (str(latest_id), int(latest_revision))
            else:
                ((stamp,),) = chain.looked_up[0]
                for found in chain.looked_up[1 : 1 + len(id_chunks)]:
                    taken.update(str(request_id) for request_id, settlement_id in found if settlement_id is not None)
                for chunk, found in zip(key_chunks, chain.looked_up[1 + len(id_chunks) :], strict=True):
                    for position, settlement_id, revision in found:  # a padding position repeats the chunk's last key
                        if settlement_id is not None:
                            latest[chunk[min(int(position), len(chunk) - 1)]] = (str(settlement_id), int(revision))
            current = int(stamp or 0)
            stale = f"the tenant's ruleset versions changed (stamp {current}) since a version was chosen"
            if stamps and stamps != {current} and not stamp_each:
                raise VersionsChanged(stale)
            added: dict[str, SettlementRecord] = {}
            rows: list[dict[str, object]] = []
            for append in appends:
                if append.versions_stamp is not None and append.versions_stamp != current:  # only with stamp_each
                    outcomes.append(VersionsChanged(stale))
                    continue
                try:
                    record, link = self._next_settlement(chain, append, taken, latest, added)
                except Conflict as conflict:
                    outcomes.append(conflict)
                    continue
                taken.add(record.data.request_id)
                latest[(record.data.contract_id, record.data.period_start)] = (record.settlement_id, record.revision)
                added[record.settlement_id] = record
                rows.append(link)
                outcomes.append(record)
            chain.pending_settlements.extend(rows)
        return outcomes

    @staticmethod
    def _filtered(tenant: str, where: SettlementFilter) -> sa.Select[Any]:
        s = settlements
        query = sa.select(s).where(s.c.tenant == tenant)
        if where.contract_id is not None:
            query = query.where(s.c.contract_id == where.contract_id)
        if where.seller_id is not None:
            query = query.where(s.c.seller_id == where.seller_id)
        if where.market is not None:
            query = query.where(s.c.market == where.market)
        if where.ruleset_id is not None:
            query = query.where(s.c.ruleset_id == where.ruleset_id)
        if where.period_from is not None:
            query = query.where(s.c.period_start >= where.period_from)
        if where.period_to is not None:
            query = query.where(s.c.period_start <= where.period_to)
        if where.latest_only:
            successor = settlements.alias("successor")
            query = query.where(~sa.exists().where(successor.c.supersedes_id == s.c.settlement_id))
        return query

    def list_settlements(
        self, tenant: str, where: SettlementFilter, page_size: int, after: tuple[datetime.date, str, int] | None
    ) -> list[SettlementRecord]:
        """One page ordered by (period_start, contract_id, revision); `after` is the last row's key."""
        limit = _check_page_size(page_size)
        s = settlements
        query = _in_key_order(self._filtered(tenant, where), (s.c.period_start, s.c.contract_id, s.c.revision), after).limit(limit)
        with self._reader.connect() as conn:
            return [self._settlement_record(row) for row in conn.execute(query)]

    def settlements_in_period(
        self, tenant: str, period_from: datetime.date, period_to: datetime.date, after: tuple[datetime.date, str] | None = None
    ) -> Generator[SettlementRecord, None, None]:
        """The latest revision of every (contract, period) with period_start in [from, to], streamed,
        ordered by (period_start, contract_id); with `after`, only those whose key is greater
        (latest revisions are unique per key, so a page of AnalyzeImpact resumes exactly there)."""
        s = settlements
        latest = SettlementFilter(period_from=period_from, period_to=period_to, latest_only=True)
        query = _in_key_order(self._filtered(tenant, latest), (s.c.period_start, s.c.contract_id), after)
        with self._snapshot() as conn:
            for row in conn.execution_options(yield_per=STREAM_BATCH).execute(query):
                yield self._settlement_record(row)

    # -- the chain ----------------------------------------------------------------------

    def _head(self, conn: Connection, tenant: str) -> tuple[int, str] | None:
        row = conn.execute(_HEAD, {"tenant": tenant}).one_or_none()
        return None if row is None else (int(row.last_seq), str(row.last_hash))

    def chain_head(self, tenant: str) -> tuple[int, str] | None:
        """The tenant's stored chain head (last seq, last record_hash); None before its first record."""
        with self._reader.connect() as conn:
            return self._head(conn, tenant)

    @staticmethod
    def _entries(conn: Connection, tenant: str) -> Iterator[ChainEntry]:
        """The tenant's links in chain_seq order: a merge of one ordered stream per table."""

        def stream(table: sa.Table, kind: str, key: Callable[[Mapping[str, Any]], str]) -> Iterator[ChainEntry]:
            query = sa.select(table).where(table.c.tenant == tenant).order_by(table.c.chain_seq)
            for row in conn.execution_options(yield_per=STREAM_BATCH).execute(query):
                values: dict[str, Any] = dict(row._mapping)
                yield ChainEntry(
                    chain_seq=int(values["chain_seq"]),
                    kind=kind,
                    key=key(values),
                    content=canonical_content(kind, values),
                    record_hash=str(values["record_hash"]),
                    previous_hash=str(values["previous_hash"]),
                )

        yield from heapq.merge(
            stream(ruleset_versions, KIND_RULESET_VERSION, lambda r: f"{r['ruleset_id']}@{r['version']}"),
            stream(lifecycle_events, KIND_LIFECYCLE_EVENT, lambda r: f"{r['ruleset_id']}@{r['version']}:{r['action']}"),
            stream(settlements, KIND_SETTLEMENT, lambda r: str(r["settlement_id"])),
            key=lambda entry: entry.chain_seq,
        )

    def audit_chain(self, tenant: str) -> Iterator[ChainEntry]:
        """Stream the tenant's chain in chain_seq order, with content recomputed from the rows."""
        with self._snapshot() as conn:
            yield from self._entries(conn, tenant)

    def verify_tenant_chain(self, tenant: str, anchor: tuple[int, str] | None = None) -> ChainReport:
        """Read the head and walk the chain in one snapshot; report the first problem."""
        with self._snapshot() as conn:
            head = self._head(conn, tenant)
            count = 0

            def counted() -> Iterator[ChainEntry]:
                nonlocal count
                for entry in self._entries(conn, tenant):
                    count += 1
                    yield entry

            problem = verify_chain(counted(), head, anchor)
        return ChainReport(records=count, head=head, problem=problem)


# -- opening and migrating ----------------------------------------------------------------


def _use_wal(cursor: Any, lock_timeout: float) -> None:
    """Switch the file to WAL. SQLite answers "database is locked" at once, without its busy
    handler, when another process is switching or migrating a new file at the same moment
    (seen with two processes opening one fresh file): try again until `lock_timeout`."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.005
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _sqlite_file_lock(engine: Engine) -> FileLock | None:
    """The lock file beside a SQLite database file (`<file>-writer.lock`); None on PostgreSQL
    and for a `file:` URI, whose writers then meet in SQLite's busy handler alone."""
    database = engine.url.database or ""
    if engine.dialect.name != "sqlite" or database.startswith("file:"):
        return None
    return FileLock(Path(database + "-writer.lock"))


def _sqlite_engine(url: sa.URL, lock_timeout: float) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise ValueError("an in-memory SQLite database cannot be shared by connections; use a file (sqlite:///path/to/file.db)")
    if not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": lock_timeout})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {max(1, int(lock_timeout * 1000))}")
            cursor.execute("PRAGMA foreign_keys = ON")
            _use_wal(cursor, lock_timeout)
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        begin = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE_OPTION) else "BEGIN"
        with as_sqlalchemy_errors(conn, begin):  # on the driver: a sixth of the cost through SQLAlchemy
            driver_connection(conn).execute(begin)

    return engine


def create_engine_for(database_url: str, lock_timeout: float = WRITE_LOCK_TIMEOUT_S) -> Engine:
    """An engine for a supported URL: sqlite:///file.db or postgresql[+psycopg]://…"""
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, lock_timeout)
    if backend == "postgresql":
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return sa.create_engine(url, pool_pre_ping=True)
    raise ValueError(f"unsupported database {backend!r}: use sqlite:///file.db or postgresql+psycopg://…")


def alembic_config() -> Config:
    """Alembic configured programmatically for server/storage/migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Run the migrations to head, safe when several processes start at once."""
    config = alembic_config()
    with engine.execution_options(**{_WRITE_OPTION: True}).connect() as conn, conn.begin():
        # One transaction around the whole upgrade (Alembic joins it): on SQLite it began
        # with BEGIN IMMEDIATE; on PostgreSQL the advisory lock is released at commit.
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def open_store(
    database_url: str,
    clock: Clock | None = None,
    *,
    lock_timeout: float = WRITE_LOCK_TIMEOUT_S,
    write_priority: WritePriority | None = None,
) -> SqlStore:
    """Open (and migrate to head) the store at `database_url`.

    `lock_timeout` (seconds) bounds the wait for the write lock (SQLite's busy timeout, the
    tenant's chain lock on PostgreSQL); a write that waits longer raises StoreBusy. The
    store marks its locked writes in `write_priority` (see server.write_priority)."""
    engine = create_engine_for(database_url, lock_timeout)
    try:
        upgrade_to_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine, clock, lock_timeout=lock_timeout, write_priority=write_priority)


__all__ = ["ChainReport", "SqlStore", "StoreBusy", "alembic_config", "create_engine_for", "metadata", "open_store", "upgrade_to_head"]
