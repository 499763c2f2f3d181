"""The per-tenant hash chain: canonical record content, hashing and verification.

Every stored record (ruleset version, lifecycle event, settlement revision) is one link of
its tenant's chain. A link's content is derived from the stored row itself: every column of
the row except ``previous_hash`` and ``record_hash``, in a canonical byte form, so that
editing any column directly in the database changes the recomputed hash. The link's hash is

    record_hash = sha256(previous_hash (64 lowercase hex ASCII bytes) + content).hexdigest()

and ``previous_hash`` is the tenant's previous link's ``record_hash`` (``GENESIS_HASH`` for
the first link). ``chain_seq`` (1, 2, 3… gapless per tenant) is itself a column and so part
of the content, which makes reordering detectable as a hash mismatch. The store also keeps a
per-tenant chain head (last seq and hash), so that deleting the newest links is detected.

Canonical content (version 1): ASCII JSON with sorted keys and no whitespace,

    {"kind": <record kind>, "row": {<column>: <value>, ...}}

with values encoded by column type: text as a JSON string, integers as JSON integers, dates
as ``YYYY-MM-DD``, timestamps in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, bytes as standard
base64 (with padding). NULL columns are left out (so a nullable column added by a later
migration does not change the hashes of older rows).

This module knows nothing of SQL; `server.storage.sql` and any offline verifier share it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import orjson

from server.storage.interface import ChainEntry

GENESIS_HASH: Final = "0" * 64
HASH_COLUMNS: Final = frozenset({"previous_hash", "record_hash"})

KIND_RULESET_VERSION: Final = "ruleset_version"
KIND_LIFECYCLE_EVENT: Final = "lifecycle_event"
KIND_SETTLEMENT: Final = "settlement"


def canonical_value(value: object) -> object:
    """One column value in its canonical JSON form (see the module docstring)."""
    if isinstance(value, bool):  # bool is an int subclass; no column is boolean, refuse it
        raise TypeError("boolean columns have no canonical form")
    if isinstance(value, str | int):
        return value
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("timestamps in the chain must be timezone-aware")
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"no canonical form for {type(value).__name__}")


def canonical_content(kind: str, row: Mapping[str, object]) -> bytes:
    """The canonical bytes of a record: every column except the hash columns; NULLs omitted."""
    # str(name): column names may be a str subclass (SQLAlchemy's quoted_name), which orjson takes for no key
    # Text and integers (most columns) are their own canonical form: no call for them.
    columns = {
        str(name): value if type(value) is str or type(value) is int else canonical_value(value)
        for name, value in row.items()
        if value is not None and name not in HASH_COLUMNS
    }
    document = {"kind": kind, "row": columns}
    try:
        # orjson writes the same bytes as the json call below for a document whose text is
        # ASCII below DEL (which json writes as-is) and whose integers fit 64 bits, in a
        # tenth of the time; for anything else (it escapes nothing beyond control characters,
        # quote and backslash) the json call says what the canonical form is.
        fast = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        pass
    else:
        if fast.isascii() and b"\x7f" not in fast:
            return fast
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def link_hash(previous_hash: str, content: bytes) -> str:
    """sha256(previous_hash + content) as lowercase hex."""
    return hashlib.sha256(previous_hash.encode("ascii") + content).hexdigest()


class ChainProblemKind(StrEnum):
    HASH_MISMATCH = "HASH_MISMATCH"  # a link's stored hash is not the hash of its content (an edited row, or reordered)
    BROKEN_LINK = "BROKEN_LINK"  # a link's previous_hash is not its predecessor's record_hash (edited and re-hashed)
    SEQUENCE_GAP = "SEQUENCE_GAP"  # chain_seq not 1, 2, 3… (a deleted, inserted or duplicated link)
    HEAD_MISMATCH = "HEAD_MISMATCH"  # the chain does not end where the stored head says (truncated or extended tail)
    ANCHOR_MISMATCH = "ANCHOR_MISMATCH"  # the record at an anchor kept elsewhere is gone or has another hash (rewritten)


@dataclass(frozen=True)
class ChainProblem:
    """The first failure found walking a chain.

    ``chain_seq`` is where the chain breaks: the seq of the offending link for a hash or
    link failure; the seq that was expected for a sequence gap (``key`` then names the link
    found in its place); the head's seq for a head mismatch, or the seq of the link beyond
    the head when the chain runs past it.
    """

    kind: ChainProblemKind
    chain_seq: int
    key: str
    message: str


@dataclass(frozen=True)
class ChainReport:
    """The result of verifying one tenant's chain in one snapshot."""

    records: int  # links walked
    head: tuple[int, str] | None  # the stored head (last seq, last hash)
    problem: ChainProblem | None  # the first failure; None if the chain verifies


def verify_chain(entries: Iterable[ChainEntry], head: tuple[int, str] | None, anchor: tuple[int, str] | None = None) -> ChainProblem | None:
    """Walk `entries` (in chain_seq order, as `Store.audit_chain` yields them) and report the first failure.

    `head` is the stored chain head (last seq, last hash), None if the tenant has no chain
    yet. Read the head and the entries in one snapshot (see `SqlStore.verify_tenant_chain`),
    or else links appended in between show up as a HEAD_MISMATCH. `anchor` (seq, hash) is a
    head kept outside the database earlier: the chain must still hold it, which shows a
    chain rewritten with recomputed hashes and a moved head (the one thing it cannot show
    on its own).
    """
    problem = _walk(entries, head, anchor)
    if problem is None and anchor is not None and (head is None or head[0] < anchor[0]):
        return ChainProblem(
            ChainProblemKind.ANCHOR_MISMATCH,
            anchor[0],
            "",
            f"the anchored record at seq {anchor[0]} is gone: the chain ends at seq {head[0] if head else 0}",
        )
    return problem


def _walk(entries: Iterable[ChainEntry], head: tuple[int, str] | None, anchor: tuple[int, str] | None) -> ChainProblem | None:
    expected_seq = 1
    previous_hash = GENESIS_HASH
    last_key = ""
    for entry in entries:
        if head is not None and expected_seq > head[0]:
            return ChainProblem(
                ChainProblemKind.HEAD_MISMATCH,
                entry.chain_seq,
                entry.key,
                f"chain runs past its head (head seq {head[0]}); found seq {entry.chain_seq}",
            )
        if head is None:
            return ChainProblem(
                ChainProblemKind.HEAD_MISMATCH, entry.chain_seq, entry.key, "records exist but the tenant has no chain head"
            )
        if entry.chain_seq != expected_seq:
            what = "missing" if entry.chain_seq > expected_seq else "duplicated or out of order"
            return ChainProblem(
                ChainProblemKind.SEQUENCE_GAP,
                expected_seq,
                entry.key,
                f"expected chain_seq {expected_seq}, found {entry.chain_seq} ({entry.kind} {entry.key}): a link is {what}",
            )
        if link_hash(entry.previous_hash, entry.content) != entry.record_hash:
            return ChainProblem(
                ChainProblemKind.HASH_MISMATCH,
                entry.chain_seq,
                entry.key,
                f"{entry.kind} {entry.key} at seq {entry.chain_seq}: stored hash does not match its content",
            )
        if entry.previous_hash != previous_hash:
            return ChainProblem(
                ChainProblemKind.BROKEN_LINK,
                entry.chain_seq,
                entry.key,
                f"{entry.kind} {entry.key} at seq {entry.chain_seq}: previous_hash does not match the record before it",
            )
        if anchor is not None and entry.chain_seq == anchor[0] and entry.record_hash != anchor[1]:
            return ChainProblem(
                ChainProblemKind.ANCHOR_MISMATCH,
                entry.chain_seq,
                entry.key,
                f"{entry.kind} {entry.key} at seq {entry.chain_seq}: its hash is not the anchor's (the chain was rewritten)",
            )
        previous_hash = entry.record_hash
        last_key = entry.key
        expected_seq += 1
    last_seq = expected_seq - 1
    if head is None:
        return None
    head_seq, head_hash = head
    if last_seq != head_seq or previous_hash != head_hash:
        return ChainProblem(
            ChainProblemKind.HEAD_MISMATCH,
            head_seq,
            last_key,
            f"chain ends at seq {last_seq} but its stored head is seq {head_seq}"
            if last_seq != head_seq
            else f"last link's hash differs from the stored head at seq {head_seq}",
        )
    return None


__all__ = [
    "GENESIS_HASH",
    "KIND_LIFECYCLE_EVENT",
    "KIND_RULESET_VERSION",
    "KIND_SETTLEMENT",
    "ChainProblem",
    "ChainProblemKind",
    "canonical_content",
    "canonical_value",
    "link_hash",
    "verify_chain",
]
