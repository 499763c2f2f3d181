"""SettleBatch stores the new settlements of a message in transactions of up to 250 items.

The store side (`append_settlements`, `settlements_by_requests`, `rebase`) on SQLite and
PostgreSQL, and a differential test of the service: the same items sent in one SettleBatch
message and one by one through Settle (to another tenant) get the same answers.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kpisettle.v1 import settlement_service_pb2 as ss
from sqlalchemy.exc import IntegrityError

from server.settlement_service import MAX_ITEMS_PER_TRANSACTION
from server.storage.interface import Append, Conflict, NewSettlement, SettlementRecord
from server.storage.sql import SqlStore
from tests.reliability_support import US_SOURCE, varied_input
from tests.server_harness import Running

MARCH = datetime.date(2026, 3, 1)


def settlement(tenant: str, request_id: str, contract_id: str, **changes: Any) -> NewSettlement:
    base = NewSettlement(
        tenant=tenant,
        request_id=request_id,
        request_fingerprint="f" * 64,
        contract_id=contract_id,
        seller_id="seller-1",
        market="US",
        period_start=MARCH,
        period_end=datetime.date(2026, 3, 31),
        ruleset_id="us-standard",
        ruleset_version=1,
        content_hash="c" * 64,
        engine_version="1.0.0",
        currency="USD",
        total="10.00",
        request_json=b"{}",
        decision_json=b'{"total":"10.00"}',
        deltas_json=b"[]",
        principal="erp-1",
    )
    return dataclasses.replace(base, **changes)


class Rebases:
    """A rebase callback that records the revisions it was called with."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.seen: list[str | None] = []

    def __call__(self, latest: SettlementRecord | None) -> bytes:
        self.seen.append(None if latest is None else latest.settlement_id)
        return f'[{{"on":"{self.seen[-1]}","by":"{self.label}"}}]'.encode()


def reason(outcome: SettlementRecord | Conflict) -> str:
    assert isinstance(outcome, Conflict), outcome
    return outcome.reason


def test_append_settlements_checks_each_one_and_commits_the_others_together(store: SqlStore, tenant: str) -> None:
    old = store.append_settlement(settlement(tenant, "r-old", "c-old"), None)
    on_a, on_old = Rebases("a"), Rebases("old")
    outcomes = store.append_settlements(
        [
            Append(settlement(tenant, "r-a0", "c-a"), None),
            Append(settlement(tenant, "r-a1", "c-a", total="11.00"), None, on_a),  # on top of r-a0, just added
            Append(settlement(tenant, "r-old", "c-dup"), None),  # a request id already stored
            Append(settlement(tenant, "r-stale", "c-old", expected_revision=0), None),  # c-old is at revision 1
            Append(settlement(tenant, "r-taken", "c-old"), None),  # c-old exists, no rebase: REVISION_TAKEN
            Append(settlement(tenant, "r-old1", "c-old", expected_revision=1), None, on_old),
            Append(settlement(tenant, "r-a0", "c-other"), None),  # a request id added by this very call
        ]
    )
    a0, a1, dup, stale, taken, old1, dup_here = outcomes
    assert [reason(o) for o in (dup, stale, taken, dup_here)] == [
        "DUPLICATE_REQUEST_ID",
        "EXPECTED_REVISION_MISMATCH",
        "REVISION_TAKEN",
        "DUPLICATE_REQUEST_ID",
    ]
    assert isinstance(a0, SettlementRecord) and isinstance(a1, SettlementRecord) and isinstance(old1, SettlementRecord)
    assert (a0.revision, a0.supersedes_id, a0.data.deltas_json) == (1, None, b"[]")
    assert (a1.revision, a1.supersedes_id) == (2, a0.settlement_id)
    assert on_a.seen == [a0.settlement_id] and a1.data.deltas_json == f'[{{"on":"{a0.settlement_id}","by":"a"}}]'.encode()
    assert (old1.revision, old1.supersedes_id, on_old.seen) == (2, old.settlement_id, [old.settlement_id])
    assert [o.chain_seq for o in (old, a0, a1, old1)] == [1, 2, 3, 4]
    for record in (a0, a1, old1):  # stored as returned
        assert store.settlement_by_request(tenant, record.data.request_id) == record
    for request_id in ("r-stale", "r-taken"):
        assert store.settlement_by_request(tenant, request_id) is None
    assert store.chain_head(tenant) == (4, old1.record_hash)
    report = store.verify_tenant_chain(tenant)
    assert report.problem is None and report.records == 4


def test_append_settlements_stores_nothing_when_the_database_refuses_one(store: SqlStore, tenant: str) -> None:
    first = store.append_settlement(settlement(tenant, "r-1", "c-1"), None)
    head = store.chain_head(tenant)
    bad = settlement(tenant, "r-bad", "c-bad", total=None)  # NOT NULL: refused by the database itself
    with pytest.raises(IntegrityError):
        store.append_settlements(
            [Append(settlement(tenant, "r-2", "c-2"), None), Append(bad, None), Append(settlement(tenant, "r-3", "c-1"), first)]
        )
    assert store.chain_head(tenant) == head
    assert [store.settlement_by_request(tenant, r) for r in ("r-2", "r-bad", "r-3")] == [None, None, None]
    assert store.verify_tenant_chain(tenant).records == 1


def test_append_settlements_takes_one_tenant(store: SqlStore, tenant: str) -> None:
    assert store.append_settlements([]) == []
    with pytest.raises(ValueError, match="one tenant"):
        store.append_settlements([Append(settlement(tenant, "r-1", "c-1"), None), Append(settlement(f"{tenant}-2", "r-1", "c-1"), None)])
    assert store.chain_head(tenant) is None


def test_a_stale_correction_with_rebase_goes_on_top_of_the_latest(store: SqlStore, tenant: str) -> None:
    first = store.append_settlement(settlement(tenant, "r-1", "c-1"), None)
    second = store.append_settlement(settlement(tenant, "r-2", "c-1"), first)
    with pytest.raises(Conflict) as refused:
        store.append_settlement(settlement(tenant, "r-3", "c-1"), first)  # read before r-2 landed
    assert refused.value.reason == "REVISION_TAKEN"
    rebase = Rebases("r-3")
    third = store.append_settlement(settlement(tenant, "r-3", "c-1"), first, rebase)
    assert (third.revision, third.supersedes_id, rebase.seen) == (3, second.settlement_id, [second.settlement_id])
    assert store.settlement_by_request(tenant, "r-3") == third
    not_called = Rebases("r-4")  # the latest is what the caller read: no rebase
    fourth = store.append_settlement(settlement(tenant, "r-4", "c-1", deltas_json=b'["mine"]'), third, not_called)
    assert (fourth.revision, fourth.data.deltas_json, not_called.seen) == (4, b'["mine"]', [])


def test_append_settlements_reads_the_checks_of_more_keys_than_one_lookup_takes(store: SqlStore, tenant: str) -> None:
    """301 keys: two lookups of each kind (250 + 51, the second padded to 64 with its last
    key), read in the round trip that locks the chain head; every answer lands on its key."""
    firsts = store.append_settlements([Append(settlement(tenant, f"r-{i:03d}", f"c-{i:03d}"), None) for i in range(0, 301, 3)])
    latest = {record.data.contract_id: record for record in firsts if isinstance(record, SettlementRecord)}
    assert len(latest) == 101
    rebase = Rebases("batch")
    outcomes = store.append_settlements(
        [Append(settlement(tenant, f"r2-{i:03d}", f"c-{i:03d}"), None, rebase) for i in range(301)]
        + [Append(settlement(tenant, f"r-{i:03d}", "c-any"), None) for i in (0, 249, 252, 300)]  # taken, in both lookups
    )
    corrections, resent = outcomes[:301], outcomes[301:]
    for i, outcome in enumerate(corrections):
        assert isinstance(outcome, SettlementRecord)
        before = latest.get(f"c-{i:03d}")
        assert (outcome.revision, outcome.supersedes_id) == ((2, before.settlement_id) if before else (1, None)), i
    assert rebase.seen == [record.settlement_id for record in firsts if isinstance(record, SettlementRecord)]
    assert [reason(o) for o in resent] == ["DUPLICATE_REQUEST_ID"] * 4
    assert store.verify_tenant_chain(tenant).records == 101 + 301


def test_settlements_by_requests_finds_the_tenants_stored_ones(store: SqlStore, tenant: str) -> None:
    stored = store.append_settlements([Append(settlement(tenant, f"r-{i:03d}", f"c-{i}"), None) for i in range(0, 600, 2)])
    store.append_settlement(settlement(f"{tenant}-other", "r-001", "c-1"), None)  # another tenant's r-001
    wanted = [f"r-{i:03d}" for i in range(600)] + ["r-000", "r-002", "nope"]  # more than one query's worth, repeats
    found = store.settlements_by_requests(tenant, wanted)
    assert found == {record.data.request_id: record for record in stored if isinstance(record, SettlementRecord)}
    assert len(found) == 300
    assert store.settlements_by_requests(tenant, []) == {}


# -- the service: one SettleBatch message answers as Settle would, item by item ---------------------


def view(result: ss.SettleBatchResult, names: dict[str, int]) -> tuple[Any, ...]:
    """What must not depend on how an item was sent: the outcome, without names, times and hashes
    (a supersedes is the index of the item whose answer it names)."""
    if result.HasField("error"):
        info = error_details_pb2.ErrorInfo()
        return ("error", result.error.code, [info.reason for detail in result.error.details if detail.Unpack(info)])
    settlement = result.settlement
    deltas = [(d.id, d.previous_amount, d.amount, d.delta) for d in settlement.deltas]
    supersedes = names[settlement.supersedes] if settlement.supersedes else None
    return ("ok", settlement.revision, result.deduplicated, supersedes, settlement.decision_json, settlement.input_json, deltas)


def first_answers(results: list[ss.SettleBatchResult]) -> dict[str, int]:
    """Settlement name -> the item first answered with it."""
    return {r.settlement.name: i for i, r in enumerate(results) if r.HasField("settlement") and not r.deduplicated}


def test_one_settle_batch_message_answers_as_settle_would_one_by_one(running: Running) -> None:
    client = running.client
    client.create_and_approve(US_SOURCE)
    client.create_and_approve(US_SOURCE, author="other-admin", approver="other-compliance")
    count = 700  # three transactions and a bit, and a run cut by a repeated request id
    assert count > 2 * MAX_ITEMS_PER_TRANSACTION
    items = [ss.SettleBatchItem(request_id=f"d-{i:03d}", input=varied_input(i, f"D-{i % 300:03d}", 3)) for i in range(count)]
    items[10].expected_revision = 0  # D-010's first revision: right
    items[310].expected_revision = 1  # its second: right
    items[610].expected_revision = 1  # its third, guarded by a stale revision: ABORTED
    items[400] = ss.SettleBatchItem(request_id="d-100", input=items[100].input)  # a repeat: deduplicated
    items[401] = ss.SettleBatchItem(request_id="d-101", input=items[400].input)  # the id again, another payload
    items[500].input.metrics["bogus"].value = "1"  # invalid
    responses = client.settlements.SettleBatch(
        iter([ss.SettleBatchRequest(items=items)]), metadata=running.callers["erp"].metadata, timeout=120
    )
    batch_results = [result for response in responses for result in response.results]  # answers span responses (1 MiB each)
    assert [r.item_index for r in batch_results] == list(range(count))
    batch = [view(result, first_answers(batch_results)) for result in batch_results]

    single_results: list[ss.SettleBatchResult] = []
    for item in items:
        result = ss.SettleBatchResult(request_id=item.request_id)
        extra = {"expected_revision": item.expected_revision} if item.HasField("expected_revision") else {}
        try:
            response = client.settle(item.request_id, item.input, "other-erp", **extra)
        except grpc.RpcError as error:
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None, error
            result.error.CopyFrom(status)
        else:
            result.settlement.CopyFrom(response.settlement)
            result.deduplicated = response.deduplicated
        single_results.append(result)
    single = [view(result, first_answers(single_results)) for result in single_results]

    assert batch == single
    assert batch[610][:2] == ("error", grpc.StatusCode.ABORTED.value[0]) and batch[610][2] == ["REVISION_MISMATCH"]
    assert batch[401][2] == ["REQUEST_ID_REUSED"] and batch[500][2] == ["INPUT_INVALID"]
    assert batch[400][2] is True  # deduplicated
    assert [batch[i][1] for i in (10, 310, 600)] == [1, 2, 3]  # revisions across the transactions
    assert batch[600][3] == 300 and batch[300][3] == 0
