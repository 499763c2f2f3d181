"""Tamper evidence and immutability over the wire (SPEC §5, §6; issue 6 item 5), on SQLite and PostgreSQL.

Someone with full write access to the database — constraints switched off (SQLite's foreign
keys are off on a plain connection; PostgreSQL: ``session_replication_role = replica``) —
edits, deletes, inserts and reorders stored decisions, ruleset versions and lifecycle
events with plain SQL. ``VerifyAuditLog`` must report every such change, at the record
where the chain breaks, and report nothing once the rows are back as they were:

* every column of every stored record edited, one at a time (and nullable columns cleared);
* every record deleted, one at a time; the chain head edited;
* records inserted: a forged decision, a forged approval, a forged version, with correctly
  computed hashes, appended or inserted in the middle with the later links renumbered;
* records reordered: chain positions swapped within a table and across tables, contents
  swapped between rows;
* random sequences of such changes (hypothesis): the log verifies exactly when the rows
  are, in the end, what was stored.

What a hash chain kept in the same database cannot show (README, Reliability): a writer who
appends correctly hashed links *and* moves the stored head, or rewrites the whole chain,
or removes a tenant's every record together with its head. An auditor who keeps the head
(`head_sequence`, `head_hash`) elsewhere and passes it back as the anchor of a later
`VerifyAuditLog` detects those too (ANCHOR_MISMATCH; the last tests below).

Stored ruleset versions never change through the API either: re-creating the same text
makes a new version; approving twice, approving a retired version, retiring twice are
refused; there is no RPC that edits or deletes a version; the source and content hash read
back byte for byte, and decisions made under a version still replay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from server.storage.chain import KIND_LIFECYCLE_EVENT, KIND_RULESET_VERSION, KIND_SETTLEMENT, canonical_content, link_hash
from server.storage.sql import chain_heads, lifecycle_events, ruleset_versions, settlements
from tests.server_harness import RULESETS, Client, Running, running_service, us_input

US_SOURCE = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
US = "rulesets/us-managed-standard"
TABLES = {"ruleset_versions": ruleset_versions, "lifecycle_events": lifecycle_events, "settlements": settlements}
KINDS = {"ruleset_versions": KIND_RULESET_VERSION, "lifecycle_events": KIND_LIFECYCLE_EVENT, "settlements": KIND_SETTLEMENT}
Row = dict[str, Any]


def record_name(table: str, row: Row) -> str:
    """How VerifyAuditLog names a record (failed_record)."""
    if table == "settlements":
        return f"settlements/{row['settlement_id']}"
    name = f"rulesets/{row['ruleset_id']}/versions/{row['version']}"
    return f"{name} {row['action']} event" if table == "lifecycle_events" else name


@dataclasses.dataclass
class Chain:
    """A tenant's chain of ten links, the rows as stored, and SQL access with the foreign keys off.

    1 v1, 2 v1 CREATED, 3 v1 APPROVED, 4 v2, 5 v2 CREATED, 6 s1 (C-1 rev 1), 7 s2 (C-1 rev 2,
    supersedes s1), 8 v2 APPROVED, 9 s3 (C-2), 10 v2 RETIRED.
    """

    running: Running
    engine: sa.Engine
    tenant: str
    rows: dict[str, list[Row]]
    head: Row
    settlements: list[pb.Settlement]

    @property
    def client(self) -> Client:
        return self.running.client

    @property
    def links(self) -> list[tuple[str, Row]]:
        """(table, row) in chain order."""
        return sorted(((t, r) for t, rows in self.rows.items() for r in rows), key=lambda link: int(link[1]["chain_seq"]))

    @contextlib.contextmanager
    def unguarded(self) -> Iterator[sa.Connection]:
        """A transaction in which no foreign key holds (what a database owner can do)."""
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
            yield conn

    def audit(self, who: str = "compliance") -> ss.VerifyAuditLogResponse:
        return self.client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), who)

    def broken(self, kinds: set[str], sequence: int, record: str | None = None) -> ss.VerifyAuditLogResponse:
        report = self.audit()
        assert not report.ok, report
        assert report.failure in kinds and report.failed_sequence == sequence, report
        if record is not None:
            assert report.failed_record == record, report
        return report

    def snapshot(self, tenants: tuple[str, ...] | None = None) -> tuple[dict[str, list[Row]], list[Row]]:
        """The rows of these tenants (default: the chain's), ordered by table and chain_seq, and the heads."""
        tenants = tenants or (self.tenant,)
        with self.engine.connect() as conn:
            rows = {
                name: [dict(r._mapping) for r in conn.execute(sa.select(t).where(t.c.tenant.in_(tenants)).order_by(t.c.chain_seq))]
                for name, t in TABLES.items()
            }
            heads = [dict(r._mapping) for r in conn.execute(sa.select(chain_heads).where(chain_heads.c.tenant.in_(tenants)))]
        return rows, heads

    def restore(self, *moved_to: str) -> None:
        """Every row of the tenant (and of tenants rows were moved to) back as stored; the log verifies."""
        tenants = (self.tenant, *moved_to)
        with self.unguarded() as conn:
            for table in TABLES.values():
                conn.execute(table.delete().where(table.c.tenant.in_(tenants)))
            conn.execute(chain_heads.delete().where(chain_heads.c.tenant.in_(tenants)))
            for name, table in TABLES.items():
                conn.execute(table.insert(), self.rows[name])
            conn.execute(chain_heads.insert(), [self.head])
        report = self.audit()
        assert report.ok and report.records_checked == 10, report

    def update(self, table: str, row: Row, **values: Any) -> None:
        t = TABLES[table]
        with self.unguarded() as conn:
            changed = conn.execute(t.update().where(t.c.tenant == row["tenant"], t.c.chain_seq == row["chain_seq"]).values(**values))
            assert changed.rowcount == 1

    def insert(self, table: str, row: Row) -> None:
        with self.unguarded() as conn:
            conn.execute(TABLES[table].insert(), [row])

    def forge(self, table: str, template: Row, chain_seq: int, previous_hash: str, **values: Any) -> Row:
        """A row like `template` with `values`, at `chain_seq`, hashed exactly as the store hashes."""
        row = {**template, **values, "chain_seq": chain_seq, "previous_hash": previous_hash}
        row["record_hash"] = link_hash(previous_hash, canonical_content(KINDS[table], row))
        return row


def build_chain(running: Running) -> Iterator[Chain]:
    client = running.client
    v1 = client.create_and_approve(US_SOURCE)
    v2 = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=US_SOURCE), "admin").ruleset_version
    s1 = client.settle("tamper-1", us_input("C-1")).settlement
    s2 = client.settle("tamper-2", us_input("C-1", gross_gmv="140000")).settlement
    client.call("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=v2.name, note="ok"), "compliance")
    s3 = client.settle("tamper-3", us_input("C-2")).settlement
    client.call("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=v2.name, note="superseded"), "compliance")
    assert (v1.name, v2.name, s2.supersedes, s2.revision) == (f"{US}/versions/1", f"{US}/versions/2", s1.name, 2)
    engine = sa.create_engine(running.database_url)
    try:
        built = Chain(running, engine, running.callers.tenant, {}, {}, [s1, s2, s3])
        built.rows, heads = built.snapshot()
        built.head = heads[0]
        assert [(t, r["chain_seq"]) for t, r in built.links] == [
            ("ruleset_versions", 1),
            ("lifecycle_events", 2),
            ("lifecycle_events", 3),
            ("ruleset_versions", 4),
            ("lifecycle_events", 5),
            ("settlements", 6),
            ("settlements", 7),
            ("lifecycle_events", 8),
            ("settlements", 9),
            ("lifecycle_events", 10),
        ]
        assert (built.head["last_seq"], built.head["last_hash"]) == (10, built.links[-1][1]["record_hash"])
        report = built.audit()
        assert report.ok and report.records_checked == 10
        yield built
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"], name="module_chain")
def module_chain_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """One server and chain per database for the module (each test leaves the rows as stored)."""
    tmp_path = tmp_path_factory.mktemp(f"tamper-{request.param}")
    url = f"sqlite:///{tmp_path / 'tamper.db'}" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))
    with contextlib.contextmanager(running_service)(url, tmp_path) as running:
        yield from build_chain(running)


@pytest.fixture(name="chain")
def chain_fixture(module_chain: Chain) -> Iterator[Chain]:
    """The module's chain, verified intact before the test and put back as stored after it."""
    report = module_chain.audit()
    assert report.ok and report.records_checked == 10, report
    yield module_chain
    module_chain.restore()


# --------------------------------------------------------------------------- edits


def altered(value: Any) -> Any:
    """A different value of the same type, changed as little as it can be: one more microsecond, one
    more day, one bit, one hex digit of an id or hash, one character more (numbers move by 1000,
    clear of every other row's, so that no unique key stops the edit)."""
    if isinstance(value, bool):
        raise TypeError("no boolean columns")
    if isinstance(value, int):
        return value + 1000
    if isinstance(value, datetime.datetime):
        return value + datetime.timedelta(microseconds=1)
    if isinstance(value, datetime.date):
        return value + datetime.timedelta(days=1)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytearray(value)
        data[len(data) // 2] ^= 0x01
        return bytes(data)
    if isinstance(value, str):
        if len(value) in (32, 64):  # ids and hashes, fixed-length columns: one hex digit changed
            return value[:-1] + ("0" if value[-1] != "0" else "1")
        return value + "~"
    raise TypeError(type(value))


def edits() -> Iterator[tuple[str, int, str, str]]:
    """(table, chain_seq, column, kind of edit) for every column of every record: changed, and cleared when nullable."""
    layout = {
        "ruleset_versions": (1, 4),
        "lifecycle_events": (2, 3, 5, 8, 10),
        "settlements": (6, 7, 9),
    }
    for name, seqs in layout.items():
        for seq in seqs:
            for column in TABLES[name].columns:
                yield name, seq, column.name, "changed"
                if column.nullable:
                    yield name, seq, column.name, "cleared"


EDITS = list(edits())


def test_the_edits_cover_every_column_of_every_kind_of_record() -> None:
    assert {(t, c) for t, _, c, _ in EDITS} == {(t, c.name) for t, table in TABLES.items() for c in table.columns}
    assert len({seq for _, seq, _, _ in EDITS}) == 10
    assert len(EDITS) == 2 * 11 + 5 * 10 + 3 * (26 + 2)


def test_every_column_of_every_record_edited_is_detected(chain: Chain) -> None:
    """One field at a time, each record of the chain, each column: reported where it is, until restored."""
    by_seq = {int(r["chain_seq"]): (t, r) for t, r in chain.links}
    outcomes: dict[str, int] = {}
    for table, seq, column, kind in EDITS:
        _, row = by_seq[seq]
        if kind == "cleared":
            if row[column] is None:
                continue  # already NULL (no expected_revision, nothing superseded): "changed" gives it a value
            new = None
        else:
            new = altered(row[column]) if row[column] is not None else ("x" if column == "supersedes_id" else 0)
        chain.update(table, row, **{column: new})
        edited = {**row, column: new}
        if column == "tenant":  # the record left the chain: a gap, or a chain shorter than its head
            report = chain.broken({"SEQUENCE_GAP", "HEAD_MISMATCH"}, seq)
        elif column == "chain_seq":  # moved out of its place: the place is empty
            report = chain.broken({"SEQUENCE_GAP"}, seq)
        else:
            report = chain.broken({"HASH_MISMATCH"}, seq, record_name(table, edited))
        outcomes[report.failure] = outcomes.get(report.failure, 0) + 1
        chain.restore(*([new] if column == "tenant" else []))
    print("edits detected:", outcomes)
    nulls = sum(1 for table, seq, column, kind in EDITS if kind == "cleared" and by_seq[seq][1][column] is None)
    assert nulls == 5  # expected_revision of s1, s2, s3 and supersedes_id of s1 and s3
    assert sum(outcomes.values()) == len(EDITS) - nulls == 151


def test_the_chain_head_edited_is_detected(chain: Chain) -> None:
    for values in ({"last_seq": 9}, {"last_seq": 11}, {"last_hash": altered(chain.head["last_hash"])}):
        with chain.unguarded() as conn:
            conn.execute(chain_heads.update().where(chain_heads.c.tenant == chain.tenant).values(**values))
        # a head behind the chain: reported at the first link past it; ahead of it, or another hash: at the head
        chain.broken({"HEAD_MISMATCH"}, {9: 10, 11: 11}.get(values.get("last_seq", 0), 10))
        chain.restore()
    with chain.unguarded() as conn:  # records without a head
        conn.execute(chain_heads.delete().where(chain_heads.c.tenant == chain.tenant))
    chain.broken({"HEAD_MISMATCH"}, 1)
    chain.restore()


# --------------------------------------------------------------------------- deletions


def test_every_record_deleted_is_detected(chain: Chain) -> None:
    links = chain.links
    for seq, (table, row) in enumerate(links, start=1):
        with chain.unguarded() as conn:
            t = TABLES[table]
            assert conn.execute(t.delete().where(t.c.tenant == chain.tenant, t.c.chain_seq == seq)).rowcount == 1
        if seq == 10:  # the newest: the chain ends before its head
            chain.broken({"HEAD_MISMATCH"}, 10, record_name(*links[-2]))
        else:  # the next link is found where this one should be
            chain.broken({"SEQUENCE_GAP"}, seq, record_name(*links[seq]))
        chain.restore()
        assert row in chain.snapshot()[0][table]


def test_deleting_the_newest_records_and_moving_the_head_back_is_seen_against_a_kept_head(chain: Chain) -> None:
    kept = chain.audit()  # what an auditor writes down: records checked and the head (see the anchor tests below)
    ninth = chain.links[8][1]
    with chain.unguarded() as conn:
        conn.execute(lifecycle_events.delete().where(lifecycle_events.c.tenant == chain.tenant, lifecycle_events.c.chain_seq == 10))
        conn.execute(chain_heads.update().where(chain_heads.c.tenant == chain.tenant).values(last_seq=9, last_hash=ninth["record_hash"]))
    report = chain.audit()
    assert report.ok and report.records_checked == kept.records_checked - 1  # consistent, but shorter than recorded
    chain.restore()


# --------------------------------------------------------------------------- insertions


def test_a_forged_decision_approval_or_version_appended_is_detected(chain: Chain) -> None:
    last = chain.links[-1][1]
    s3 = chain.rows["settlements"][2]
    forged = {
        "settlements": chain.forge(
            "settlements", s3, 11, last["record_hash"], settlement_id="f" * 32, request_id="forged", contract_id="C-forged", total="0.00"
        ),
        "lifecycle_events": chain.forge(
            "lifecycle_events",
            chain.rows["lifecycle_events"][2],
            11,
            last["record_hash"],
            ruleset_id="us-managed-standard",
            version=1,
            action="RETIRED",
        ),
        "ruleset_versions": chain.forge(
            "ruleset_versions", chain.rows["ruleset_versions"][0], 11, last["record_hash"], version=3, source="fees: []\n"
        ),
    }
    for table, row in forged.items():
        chain.insert(table, row)
        chain.broken({"HEAD_MISMATCH"}, 11, record_name(table, row))  # the chain runs past its head
        chain.restore()


def test_a_forged_record_inserted_in_the_middle_is_detected(chain: Chain) -> None:
    """A correctly hashed record of each kind put at seq 7, the links from 7 on renumbered (and
    the head moved): the first renumbered link's content no longer matches its hash."""
    for table in sorted(TABLES):
        links = chain.links
        before = links[5][1]  # seq 6
        template = chain.rows[table][0]
        changes = {
            "settlements": {"settlement_id": "e" * 32, "request_id": "forged", "contract_id": "C-forged", "supersedes_id": None},
            "lifecycle_events": {"version": 2, "action": "REVIEWED"},
            "ruleset_versions": {"version": 7},
        }[table]
        forged = chain.forge(table, template, 7, before["record_hash"], **changes)
        with chain.unguarded() as conn:
            for t in TABLES.values():  # make room: highest first, so no two rows share a seq on the way
                for seq in range(10, 6, -1):
                    conn.execute(t.update().where(t.c.tenant == chain.tenant, t.c.chain_seq == seq).values(chain_seq=seq + 1))
            conn.execute(TABLES[table].insert(), [forged])
            conn.execute(chain_heads.update().where(chain_heads.c.tenant == chain.tenant).values(last_seq=11))
        chain.broken({"HASH_MISMATCH"}, 8, record_name(*links[6]))
        chain.restore()
        # Without renumbering: two links claim one place (one of another table, so no unique key
        # stops it), and the chain is one link longer than its head says at the next place.
        shared = 8 if table == "settlements" else 7
        chain.insert(table, chain.forge(table, template, shared, links[shared - 2][1]["record_hash"], **changes))
        chain.broken({"SEQUENCE_GAP"}, shared + 1)
        chain.restore()


# --------------------------------------------------------------------------- reordering


def test_swapped_positions_within_and_across_tables_are_detected(chain: Chain) -> None:
    pairs = [(6, 7), (6, 9), (2, 3), (3, 8), (1, 4), (5, 6), (8, 9), (9, 10), (1, 10)]
    by_seq = {int(r["chain_seq"]): (t, r) for t, r in chain.links}
    for a, b in pairs:
        (ta, ra), (tb, rb) = by_seq[a], by_seq[b]
        with chain.unguarded() as conn:
            conn.execute(TABLES[ta].update().where(TABLES[ta].c.tenant == chain.tenant, TABLES[ta].c.chain_seq == a).values(chain_seq=-1))
            conn.execute(TABLES[tb].update().where(TABLES[tb].c.tenant == chain.tenant, TABLES[tb].c.chain_seq == b).values(chain_seq=a))
            conn.execute(TABLES[ta].update().where(TABLES[ta].c.tenant == chain.tenant, TABLES[ta].c.chain_seq == -1).values(chain_seq=b))
        chain.broken({"HASH_MISMATCH"}, a, record_name(tb, rb))  # the record now at `a` was hashed at `b`
        chain.restore()
        assert ra in chain.snapshot()[0][ta]


def test_contents_swapped_between_two_decisions_are_detected(chain: Chain) -> None:
    """Two settlements' decisions and totals exchanged, positions and hashes left in place."""
    s1, s3 = chain.rows["settlements"][0], chain.rows["settlements"][2]
    fields = ("decision_json", "total", "request_json", "request_fingerprint")
    chain.update("settlements", s1, **{f: s3[f] for f in fields})
    chain.update("settlements", s3, **{f: s1[f] for f in fields})
    chain.broken({"HASH_MISMATCH"}, 6, record_name("settlements", s1))
    chain.restore()


def test_all_decisions_in_reverse_order_are_detected(chain: Chain) -> None:
    seqs = [6, 7, 9]
    with chain.unguarded() as conn:
        for row, seq in zip(chain.rows["settlements"], seqs, strict=True):
            conn.execute(settlements.update().where(settlements.c.settlement_id == row["settlement_id"]).values(chain_seq=-seq))
        for row, seq in zip(chain.rows["settlements"], reversed(seqs), strict=True):
            conn.execute(settlements.update().where(settlements.c.settlement_id == row["settlement_id"]).values(chain_seq=seq))
    chain.broken({"HASH_MISMATCH"}, 6, record_name("settlements", chain.rows["settlements"][2]))
    chain.restore()


# --------------------------------------------------------------------------- random tampering


@dataclasses.dataclass(frozen=True)
class Tamper:
    """One change to the database: an edit, a deletion, a copy under a new key, or two positions swapped."""

    op: str
    table: str
    index: int
    column: str = ""
    other: int = 0

    def apply(self, chain: Chain, current: dict[str, list[Row]], serial: int) -> None:
        """Make the change (a change a unique key refuses is not made: the database rolled it back)."""
        rows = current[self.table]
        if not rows:
            return
        row = rows[self.index % len(rows)]
        t = TABLES[self.table]
        where = sa.and_(t.c.tenant == chain.tenant, t.c.chain_seq == row["chain_seq"])
        with contextlib.suppress(sa.exc.IntegrityError), chain.unguarded() as conn:
            if self.op == "edit":
                value = row[self.column]
                new = altered(value) if value is not None else ("y" * 32 if self.column == "supersedes_id" else 3)
                if self.column == "tenant":
                    new = value  # an edit to the same value: no change at all (moving rows out is tested above)
                conn.execute(t.update().where(where).values(**{self.column: new}))
            elif self.op == "delete":
                conn.execute(t.delete().where(where))
            elif self.op == "copy":  # the same record again, at a free seq past the head, under a new key
                key: dict[str, Any] = {
                    "settlements": {
                        "settlement_id": f"{serial:032d}",
                        "request_id": f"copy-{serial}",
                        "supersedes_id": None,
                        "revision": 100 + serial,
                    },
                    "ruleset_versions": {"version": 100 + serial},
                    "lifecycle_events": {"action": f"COPY{serial}"},
                }[self.table]
                conn.execute(t.insert(), [{**row, **key, "chain_seq": 5000 + serial}])
            else:  # swap positions with another record (of any table)
                other_table = sorted(TABLES)[self.other % 3]
                others = current[other_table]
                peer = others[self.other % len(others)] if others else row
                if peer is row:
                    return
                o = TABLES[other_table]
                conn.execute(t.update().where(where).values(chain_seq=-7))
                conn.execute(
                    o.update().where(o.c.tenant == chain.tenant, o.c.chain_seq == peer["chain_seq"]).values(chain_seq=row["chain_seq"])
                )
                conn.execute(t.update().where(t.c.tenant == chain.tenant, t.c.chain_seq == -7).values(chain_seq=peer["chain_seq"]))


def tampers() -> st.SearchStrategy[Tamper]:
    def build(op: str, table: str, index: int, column_index: int, other: int) -> Tamper:
        columns = [c.name for c in TABLES[table].columns]
        return Tamper(op, table, index, columns[column_index % len(columns)], other)

    return st.builds(
        build,
        st.sampled_from(["edit", "edit", "delete", "copy", "swap"]),
        st.sampled_from(sorted(TABLES)),
        st.integers(0, 9),
        st.integers(0, 30),
        st.integers(0, 9),
    )


def test_random_tampering_is_detected_exactly_when_the_rows_differ(chain: Chain) -> None:
    """Any sequence of changes: the log verifies if and only if the tenant's rows are, in the end, as stored
    (a swap undone, an edit of a value to itself — anything else is reported)."""
    original = chain.snapshot()
    seen = {"detected": 0, "unchanged": 0}

    @settings(max_examples=40, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(tampers(), min_size=1, max_size=4))
    def run(changes: list[Tamper]) -> None:
        try:
            for serial, change in enumerate(changes):
                change.apply(chain, chain.snapshot()[0], serial)
            now = chain.snapshot()
            report = chain.audit()
            assert report.ok == (now == original), (changes, report)
            seen["unchanged" if report.ok else "detected"] += 1
        finally:
            chain.restore()

    run()
    print("random tampering:", seen)
    assert seen["detected"] > 30


# --------------------------------------------------------------------------- immutability through the API


def status_reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo")


def refused(code: grpc.StatusCode, reason: str, call: Callable[[], Any]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert (caught.value.code(), status_reason(caught.value)) == (code, reason), caught.value.details()


def test_stored_ruleset_versions_never_change_through_the_api(running: Running) -> None:
    client = running.client
    v1 = client.create_and_approve(US_SOURCE)
    settled = client.settle("immutable-1", us_input("C-immutable")).settlement
    engine = sa.create_engine(running.database_url)

    def stored() -> list[Row]:
        with engine.connect() as conn:
            query = (
                sa.select(ruleset_versions).where(ruleset_versions.c.tenant == running.callers.tenant).order_by(ruleset_versions.c.version)
            )
            return [dict(r._mapping) for r in conn.execute(query)]

    def call(rpc: str, request: Any, who: str) -> Any:
        return client.call(rpc, request, who)

    try:
        rows_before = stored()
        get = lambda name=v1.name: call("GetRulesetVersion", rs.GetRulesetVersionRequest(name=name), "compliance").ruleset_version  # noqa: E731
        # the same text again, and the same text with a version number written in: a new version or refused, never v1 rewritten
        again = call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=US_SOURCE), "admin").ruleset_version
        assert again.name == f"{US}/versions/2" and again.content_hash == v1.content_hash and again.state == pb.RulesetVersion.STATE_DRAFT
        for text in (
            US_SOURCE + "version: 1\n",
            US_SOURCE.replace("ruleset: us-managed-standard", "ruleset: us-managed-standard/versions/1"),
        ):
            refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "RULESET_INVALID",
                lambda text=text: call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=text), "admin"),
            )
        # a create request carrying a name field it does not have (unknown field 2): ignored, the next number
        raw = client.channel.unary_unary(
            "/kpisettle.v1.RulesetService/CreateRulesetVersion", response_deserializer=rs.CreateRulesetVersionResponse.FromString
        )
        name = f"{US}/versions/1".encode()
        smuggled = rs.CreateRulesetVersionRequest(source=US_SOURCE).SerializeToString() + b"\x12" + bytes([len(name)]) + name
        assert raw(smuggled, metadata=running.callers["admin"].metadata, timeout=30).ruleset_version.name == f"{US}/versions/3"
        # lifecycle: approve twice, approve after retiring, retire twice; concurrent approvals: one wins
        approve = lambda name, note="": call("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=name, note=note), "compliance2")  # noqa: E731
        retire = lambda name: call("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=name, note="r"), "compliance")  # noqa: E731
        refused(grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_DRAFT", lambda: approve(v1.name, "again"))
        retire(f"{US}/versions/3")
        refused(grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_DRAFT", lambda: approve(f"{US}/versions/3"))
        refused(grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_RETIRED", lambda: retire(f"{US}/versions/3"))
        outcomes: list[str] = []

        def racer() -> None:
            try:
                approve(again.name)
                outcomes.append("OK")
            except grpc.RpcError as error:
                outcomes.append(status_reason(error))

        threads = [threading.Thread(target=racer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # one approval; the others find it approved (or lose the race inside the store's lock)
        assert outcomes.count("OK") == 1 and set(outcomes) <= {"OK", "NOT_A_DRAFT", "INVALID_TRANSITION"}, outcomes
        assert [e.action for e in get(again.name).events] == ["CREATED", "APPROVED"]
        # no RPC edits or deletes a version: none exists, and an invented one is not served
        methods = {m.name for m in rs.DESCRIPTOR.services_by_name["RulesetService"].methods}
        assert not {m for m in methods if m.startswith(("Update", "Delete", "Patch", "Set", "Replace", "Edit"))}, methods
        invented = client.channel.unary_unary("/kpisettle.v1.RulesetService/UpdateRulesetVersion")
        with pytest.raises(grpc.RpcError) as caught:
            invented(b"", metadata=running.callers["admin"].metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # v1 reads back as created: source byte for byte, hash, state, one approval; its stored row is untouched
        after = get()
        assert after.source == US_SOURCE and after.content_hash == v1.content_hash and after.state == pb.RulesetVersion.STATE_APPROVED
        assert [(e.action, e.principal) for e in after.events] == [("CREATED", "admin-user"), ("APPROVED", "compliance-user")]
        assert stored()[0] == rows_before[0]
        assert call("ValidateRuleset", rs.ValidateRulesetRequest(source=after.source), "admin").content_hash == v1.content_hash
        replay = call("ReplaySettlement", ss.ReplaySettlementRequest(name=settled.name), "compliance")
        assert replay.match, replay
        report = call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")
        assert report.ok and report.records_checked == 3 + 1 + 3 + 3, (
            report
        )  # v1 and its events, the settlement, v2 created and approved, v3 created and retired
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- anchors kept outside the database


def test_a_chain_rewritten_with_recomputed_hashes_is_seen_only_against_an_anchor_kept_elsewhere(chain: Chain) -> None:
    """Rewriting s2 (seq 7) and re-hashing every later link, head moved along, verifies on its
    own; the head an auditor kept from an earlier verification shows it (ANCHOR_MISMATCH)."""
    kept = chain.audit()
    assert kept.ok and (kept.head_sequence, kept.head_hash) == (10, chain.head["last_hash"])
    anchor = ss.VerifyAuditLogRequest(anchor_sequence=kept.head_sequence, anchor_hash=kept.head_hash)
    assert chain.client.call("VerifyAuditLog", anchor, "compliance").ok
    links = chain.links
    previous_hash = links[5][1]["record_hash"]
    rewritten: list[tuple[str, Row]] = []
    for table, row in links[6:]:
        values = {"total": "1.00"} if table == "settlements" and row["chain_seq"] == 7 else {}
        forged = chain.forge(table, row, int(row["chain_seq"]), previous_hash, **values)
        rewritten.append((table, forged))
        previous_hash = forged["record_hash"]
    with chain.unguarded() as conn:
        for table, row in rewritten:
            t = TABLES[table]
            conn.execute(t.delete().where(t.c.tenant == chain.tenant, t.c.chain_seq == row["chain_seq"]))
            conn.execute(t.insert(), [row])
        conn.execute(chain_heads.update().where(chain_heads.c.tenant == chain.tenant).values(last_hash=previous_hash))
    alone = chain.audit()
    assert alone.ok and alone.head_hash == previous_hash != kept.head_hash  # consistent in itself
    report = chain.client.call("VerifyAuditLog", anchor, "compliance")
    assert (report.ok, report.failure, report.failed_sequence) == (False, "ANCHOR_MISMATCH", 10), report
    earlier = ss.VerifyAuditLogRequest(anchor_sequence=6, anchor_hash=links[5][1]["record_hash"])
    assert chain.client.call("VerifyAuditLog", earlier, "compliance").ok  # what came before the rewrite is intact
    chain.restore()


def test_an_anchor_past_a_truncated_chain_is_reported(chain: Chain) -> None:
    kept = chain.audit()
    ninth = chain.links[8][1]
    with chain.unguarded() as conn:
        conn.execute(lifecycle_events.delete().where(lifecycle_events.c.tenant == chain.tenant, lifecycle_events.c.chain_seq == 10))
        conn.execute(chain_heads.update().where(chain_heads.c.tenant == chain.tenant).values(last_seq=9, last_hash=ninth["record_hash"]))
    anchor = ss.VerifyAuditLogRequest(anchor_sequence=kept.head_sequence, anchor_hash=kept.head_hash)
    report = chain.client.call("VerifyAuditLog", anchor, "compliance")
    assert (report.ok, report.failure, report.failed_sequence, report.head_sequence) == (False, "ANCHOR_MISMATCH", 10, 9), report
    chain.restore()
