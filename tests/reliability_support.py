"""Shared by the reliability tests (crash, concurrency, shutdown): varied US inputs, SettleBatch
streams, acknowledgments reduced to digests, and what the database holds, read directly.

The tests compare what the server answered with the rows it stored, so they read the
`settlements` table themselves (SQLAlchemy on the same URL) instead of trusting the API.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

import grpc
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import settlement_service_pb2 as ss

from server.storage.sql import create_engine_for, settlements
from tests.server_harness import RULESETS, us_input

US_SOURCE = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
#: The US ruleset version created in a fresh tenant writes three chain links: the version
#: and its CREATED and APPROVED events.
RULESET_LINKS = 3


def varied_input(i: int, contract_id: str | None = None, month: int | None = None) -> pb.SettlementInput:
    """Input number `i` of a deterministic spread over the US ruleset: every commission tier, both
    GMV bonus steps, the ACoS bonus and penalty, the ODR and response penalties (and their
    cap), both exemptions, and all twelve months of 2026, so that neighbouring items settle
    to different decisions."""
    return us_input(
        contract_id or f"C-{i:05d}",
        gross_gmv=str(20000 + (i * 7919) % 180000),
        period=(2026, month or 1 + i % 12),
        refunds=str((i * 31) % 6000),
        ad_spend=("10000", "20000", "30000")[i % 3],  # ACoS 10 %, 20 %, 30 %
        defective_orders=("2", "4", "12")[(i // 3) % 3],  # ODR 0.1 %, 0.2 %, 0.6 %
        response_hours=("6", "30")[(i // 9) % 2],
        stockout_days="8" if i % 11 == 0 else "0",
        review_days="3" if i % 13 == 0 else "0",
    )


def batch_items(prefix: str, count: int) -> list[ss.SettleBatchItem]:
    return [ss.SettleBatchItem(request_id=f"{prefix}-{i:05d}", input=varied_input(i)) for i in range(count)]


def batch_messages(items: Sequence[ss.SettleBatchItem], per_message: int) -> Iterator[ss.SettleBatchRequest]:
    for start in range(0, len(items), per_message):
        yield ss.SettleBatchRequest(items=items[start : start + per_message])


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass(frozen=True)
class Ack:
    """What an answer said about one settlement, reduced to digests (20,000 whole answers are ~100 MB)."""

    settlement_id: str
    revision: int
    record_hash: str
    decision_sha: str
    #: SHA-256 of the whole Settlement message (deterministic serialisation): a retry
    #: must be answered with exactly the answer the first call got.
    answer_sha: str

    @classmethod
    def of(cls, settlement: pb.Settlement) -> Ack:
        return cls(
            settlement_id=settlement.name.removeprefix("settlements/"),
            revision=settlement.revision,
            record_hash=settlement.record_hash,
            decision_sha=sha256(settlement.decision_json),
            answer_sha=sha256(settlement.SerializeToString(deterministic=True)),
        )


@dataclass(frozen=True)
class Row:
    """One stored settlement, as the database holds it."""

    settlement_id: str
    request_id: str
    contract_id: str
    period_start: str
    revision: int
    supersedes_id: str | None
    expected_revision: int | None
    record_hash: str
    decision_sha: str

    def matches(self, ack: Ack) -> bool:
        return (self.settlement_id, self.revision, self.record_hash, self.decision_sha) == (
            ack.settlement_id,
            ack.revision,
            ack.record_hash,
            ack.decision_sha,
        )


class Database:
    """Direct reads of one tenant's stored settlements (a fresh connection per read)."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine_for(database_url)

    def close(self) -> None:
        self.engine.dispose()

    def count(self, tenant: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(settlements).where(settlements.c.tenant == tenant)).scalar_one())

    def rows(self, tenant: str) -> list[Row]:
        s = settlements
        query = sa.select(
            s.c.settlement_id,
            s.c.request_id,
            s.c.contract_id,
            s.c.period_start,
            s.c.revision,
            s.c.supersedes_id,
            s.c.expected_revision,
            s.c.record_hash,
            s.c.decision_json,
        ).where(s.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [
                Row(
                    settlement_id=r.settlement_id,
                    request_id=r.request_id,
                    contract_id=r.contract_id,
                    period_start=r.period_start.isoformat(),
                    revision=r.revision,
                    supersedes_id=r.supersedes_id,
                    expected_revision=r.expected_revision,
                    record_hash=r.record_hash,
                    decision_sha=sha256(bytes(r.decision_json)),
                )
                for r in conn.execute(query)
            ]

    def amounts(self, tenant: str) -> dict[str, tuple[dict[str, Decimal], list[dict[str, str]]]]:
        """Per settlement id: its lines' amounts and its stored deltas."""
        s = settlements
        query = sa.select(s.c.settlement_id, s.c.decision_json, s.c.deltas_json).where(s.c.tenant == tenant)
        with self.engine.connect() as conn:
            return {
                r.settlement_id: (
                    {line["id"]: Decimal(line["amount"]) for line in json.loads(bytes(r.decision_json))["lines"]},
                    json.loads(bytes(r.deltas_json)),
                )
                for r in conn.execute(query)
            }

    def by_request(self, tenant: str) -> dict[str, Row]:
        """The tenant's rows by request id; fails if a request id was stored twice."""
        rows = self.rows(tenant)
        found = {row.request_id: row for row in rows}
        assert len(found) == len(rows), f"{len(rows) - len(found)} request ids stored more than once"
        return found


def assert_revision_chains(
    rows: Iterable[Row], amounts: dict[str, tuple[dict[str, Decimal], list[dict[str, str]]]] | None = None
) -> dict[tuple[str, str], int]:
    """Every (contract, period) has revisions 1..n with no gap, each superseding the one
    before and (given `amounts`) with deltas against exactly that one; returns n per
    (contract, period)."""
    chains: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        chains.setdefault((row.contract_id, row.period_start), []).append(row)
    for key, chain in chains.items():
        chain.sort(key=lambda row: row.revision)
        assert [row.revision for row in chain] == list(range(1, len(chain) + 1)), (key, [row.revision for row in chain])
        assert chain[0].supersedes_id is None, key
        for previous, row in itertools.pairwise(chain):
            assert row.supersedes_id == previous.settlement_id, (key, row.revision)
        if amounts is not None:
            assert amounts[chain[0].settlement_id][1] == [], key
            for previous, row in itertools.pairwise(chain):
                before, (after, deltas) = amounts[previous.settlement_id][0], amounts[row.settlement_id]
                assert {d["id"] for d in deltas} == before.keys() | after.keys(), (key, row.revision)
                for delta in deltas:
                    line = delta["id"]
                    assert Decimal(delta["previous_amount"]) == before.get(line, 0), (key, row.revision, line)
                    assert Decimal(delta["amount"]) == after.get(line, 0), (key, row.revision, line)
                    assert Decimal(delta["delta"]) == after.get(line, 0) - before.get(line, 0), (key, row.revision, line)
    return {key: len(chain) for key, chain in chains.items()}


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a status, or "" when the status carries none
    (a transport failure, not an answer of the service)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


__all__ = [
    "RULESET_LINKS",
    "US_SOURCE",
    "Ack",
    "Database",
    "Row",
    "assert_revision_chains",
    "batch_items",
    "batch_messages",
    "error_reason",
    "sha256",
    "varied_input",
]
