"""The narrow storage interface the service uses, and the records it stores.

Everything stored is append-only: ruleset versions, lifecycle events and settlement
revisions are inserted, never updated or deleted (a version's status is the latest of its
lifecycle events). Every record joins its tenant's hash chain when it is inserted:
`chain_seq` is gapless per tenant, `record_hash` = SHA-256 over the record's canonical
content and `previous_hash`, so any edit, deletion, insertion or reordering is detected by
walking the chain (`Store.audit_chain`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.storage.chain import ChainReport


class VersionStatus(StrEnum):
    DRAFT = "DRAFT"
    APPROVED = "APPROVED"
    RETIRED = "RETIRED"


class LifecycleAction(StrEnum):
    CREATED = "CREATED"
    APPROVED = "APPROVED"
    RETIRED = "RETIRED"


class StoreError(Exception):
    """Base of storage errors the service maps to gRPC status."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """A uniqueness rule was hit (duplicate request id, a revision taken, a bad transition)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason  # DUPLICATE_REQUEST_ID | REVISION_TAKEN | EXPECTED_REVISION_MISMATCH | INVALID_TRANSITION | VERSIONS_CHANGED
        super().__init__(message)


class VersionsChanged(Conflict):
    """A settlement was decided with a version chosen before the tenant's versions last
    changed (another process or thread created, approved or retired one): choose again."""

    def __init__(self, message: str) -> None:
        super().__init__("VERSIONS_CHANGED", message)


@dataclass(frozen=True)
class RulesetVersionRecord:
    tenant: str
    ruleset_id: str
    version: int  # 1, 2, 3… per (tenant, ruleset_id), assigned by the store
    source: str  # the YAML/JSON text exactly as submitted
    content_hash: str
    effective_from: datetime.date
    author: str
    create_time: datetime.datetime
    status: VersionStatus  # derived from lifecycle events
    approver: str | None = None
    approve_time: datetime.datetime | None = None
    retire_time: datetime.datetime | None = None


@dataclass(frozen=True)
class LifecycleEvent:
    tenant: str
    ruleset_id: str
    version: int
    action: LifecycleAction
    principal: str
    time: datetime.datetime
    note: str = ""


@dataclass(frozen=True)
class NewSettlement:
    """What the service asks the store to append (the store adds ids, revision, chain)."""

    tenant: str
    request_id: str
    request_fingerprint: str  # SHA-256 of the canonical request payload (idempotency check)
    contract_id: str
    seller_id: str
    market: str
    period_start: datetime.date
    period_end: datetime.date
    ruleset_id: str
    ruleset_version: int
    content_hash: str
    engine_version: str
    currency: str
    total: str  # exact decimal text
    request_json: bytes  # canonical JSON of the request as received
    decision_json: bytes  # canonical JSON of the engine's decision
    deltas_json: bytes  # canonical JSON of per-line deltas against the superseded revision
    principal: str
    expected_revision: int | None = None  # None: no check; 0: must be the first revision


@dataclass(frozen=True)
class SettlementRecord:
    settlement_id: str  # opaque, unique
    revision: int  # 1, 2… per (tenant, contract_id, period_start)
    supersedes_id: str | None
    create_time: datetime.datetime
    chain_seq: int
    record_hash: str
    previous_hash: str
    data: NewSettlement


#: Given the latest revision of a contract period (None: there is none), the deltas_json of
#: a new revision against it. `append_settlement` calls it under the write lock when the
#: latest revision is not the one the caller read, so corrections queue instead of retrying.
Rebase = Callable[[SettlementRecord | None], bytes]


@dataclass(frozen=True)
class Append:
    """One settlement for `Store.append_settlements`: `append_settlement`'s arguments."""

    new: NewSettlement
    supersedes: SettlementRecord | None
    rebase: Rebase | None = None
    #: The tenant's `versions_stamp` when the version it settles with was chosen: if the
    #: tenant's versions have changed since (a version created, approved or retired), the
    #: whole call raises VersionsChanged and stores nothing. None: not checked.
    versions_stamp: int | None = None


@dataclass(frozen=True)
class SettlementFilter:
    contract_id: str | None = None
    seller_id: str | None = None
    market: str | None = None
    ruleset_id: str | None = None
    period_from: datetime.date | None = None  # period_start >= this
    period_to: datetime.date | None = None  # period_start <= this
    latest_only: bool = False  # only revisions not superseded


@dataclass(frozen=True)
class ChainEntry:
    """One link of a tenant's hash chain as stored, with what it hashes."""

    chain_seq: int
    kind: str  # ruleset_version | lifecycle_event | settlement
    key: str  # e.g. "us-standard@3", "us-standard@3:APPROVED", a settlement id
    content: bytes  # the canonical bytes the hash covers (besides previous_hash)
    record_hash: str
    previous_hash: str


class Store(Protocol):
    """Every method is one transaction; inserts commit before they return."""

    def create_ruleset_version(
        self, tenant: str, ruleset_id: str, source: str, content_hash: str, effective_from: datetime.date, author: str
    ) -> RulesetVersionRecord: ...

    def get_ruleset_version(self, tenant: str, ruleset_id: str, version: int) -> RulesetVersionRecord: ...

    def list_ruleset_versions(
        self, tenant: str, ruleset_id: str | None, page_size: int, after: tuple[str, int] | None
    ) -> list[RulesetVersionRecord]: ...

    def version_in_effect(self, tenant: str, ruleset_id: str, on: datetime.date) -> RulesetVersionRecord | None:
        """The APPROVED version with the latest effective_from on or before `on` (ties: highest)."""
        ...

    def versions_stamp(self, tenant: str) -> int:
        """A number that changes whenever any of the tenant's versions is created, approved or
        retired (0 before the first): what a choice of version made at that stamp depends on."""
        ...

    def record_lifecycle(
        self, tenant: str, ruleset_id: str, version: int, action: LifecycleAction, principal: str, note: str = ""
    ) -> RulesetVersionRecord: ...

    def lifecycle_events(self, tenant: str, ruleset_id: str, version: int) -> list[LifecycleEvent]: ...

    def settlement_by_request(self, tenant: str, request_id: str) -> SettlementRecord | None: ...

    def latest_settlement(self, tenant: str, contract_id: str, period_start: datetime.date) -> SettlementRecord | None: ...

    def append_settlement(
        self, new: NewSettlement, supersedes: SettlementRecord | None, rebase: Rebase | None = None, versions_stamp: int | None = None
    ) -> SettlementRecord: ...

    def append_settlements(self, appends: Sequence[Append]) -> list[SettlementRecord | Conflict]:
        """Several settlements of one tenant in one transaction, in order; a Conflict per refused one."""
        ...

    def settlements_by_requests(self, tenant: str, request_ids: Sequence[str]) -> dict[str, SettlementRecord]:
        """The stored settlements of those request ids (the ones not stored are absent)."""
        ...

    def get_settlement(self, tenant: str, settlement_id: str) -> SettlementRecord: ...

    def list_settlements(
        self, tenant: str, where: SettlementFilter, page_size: int, after: tuple[datetime.date, str, int] | None
    ) -> list[SettlementRecord]: ...

    def settlements_in_period(
        self, tenant: str, period_from: datetime.date, period_to: datetime.date, after: tuple[datetime.date, str] | None = None
    ) -> Generator[SettlementRecord, None, None]:
        """Latest revisions with period_start in [from, to] by (period_start, contract_id), after `after`."""
        ...

    def audit_chain(self, tenant: str) -> Iterator[ChainEntry]: ...

    def verify_tenant_chain(self, tenant: str, anchor: tuple[int, str] | None = None) -> ChainReport:
        """The head and the whole chain read in one snapshot, and the first failure; `anchor`
        (seq, hash), kept outside the database earlier, must still be in the chain."""
        ...

    def close(self) -> None: ...


__all__: Sequence[str] = [
    "ChainEntry", "Conflict", "LifecycleAction", "LifecycleEvent", "NewSettlement", "NotFound", "RulesetVersionRecord",
    "SettlementFilter", "SettlementRecord", "Store", "StoreError", "VersionStatus", "VersionsChanged",
]  # fmt: skip
