"""Compiled ruleset versions, cached, and the choice of a version for a settlement (SPEC §6).

A compiled version costs about 0.7 MiB, most of it durable_rules state in the C core that
only `close()` frees (dropping the Python object leaks it). The registry keeps at most
`compiled_cache_size` of them (default `DEFAULT_COMPILED_CACHE_SIZE`), least recently used
first out. An evicted version is not closed by the eviction: a thread may still be
settling with it. It is closed by a finalizer when its last reference goes, so a caller
needs no lease: holding the object (or a `Chosen`) is the lease. Kept choices hold the
version's record, not the compiled object, so they never keep an evicted one alive; live
compiled versions are thus at most the cap plus those in use by calls in flight.
"""

from __future__ import annotations

import datetime
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from engine import CompiledRuleset, compile_ruleset
from server.errors import ServiceError
from server.storage.interface import RulesetVersionRecord, Store, VersionStatus

#: Choices kept per tenant; beyond this many (distinct rulesets and period starts) they are dropped and made again.
MAX_CHOICES_PER_TENANT = 4096

#: Compiled versions kept per process (about 0.7 MiB each, ~90 MiB in all); a version
#: evicted is compiled again (~30 ms) when next used.
DEFAULT_COMPILED_CACHE_SIZE = 128

_ChoiceKey = tuple[str, int | None, datetime.date | None, bool]
_VersionKey = tuple[str, str, int]


def _close_all(*closers: Callable[[], None]) -> None:
    """Free a compiled version's native state once nothing references the version any more."""
    for close in closers:
        close()


@dataclass(frozen=True)
class Chosen:
    record: RulesetVersionRecord
    compiled: CompiledRuleset
    #: The tenant's versions stamp (`Store.versions_stamp`) read before the choice was made,
    #: for the store to check when the settlement is written; None when not kept.
    stamp: int | None = None


class VersionRegistry:
    """Stored versions never change, so a compiled version is cached until it is the least
    recently used one beyond the cap (see the module docstring)."""

    def __init__(self, store: Store, compiled_cache_size: int = DEFAULT_COMPILED_CACHE_SIZE) -> None:
        if compiled_cache_size < 1:
            raise ValueError(f"compiled_cache_size must be at least 1, not {compiled_cache_size}")
        self._store = store
        self._cache_size = compiled_cache_size
        self._compiled: OrderedDict[_VersionKey, CompiledRuleset] = OrderedDict()
        # The choices of the settle path, per tenant, with the stamp they were made at. They
        # are used without asking the store again: the store refuses a settlement whose
        # stamp is no longer the tenant's (VersionsChanged), whichever process changed the
        # versions, and the caller then forgets the tenant's choices and chooses again.
        # A choice keeps the record only: the compiled version comes from the bounded cache.
        self._choices: dict[str, tuple[int, dict[_ChoiceKey, RulesetVersionRecord]]] = {}
        self._lock = threading.Lock()

    def compiled(self, record: RulesetVersionRecord) -> CompiledRuleset:
        key = (record.tenant, record.ruleset_id, record.version)
        with self._lock:
            found = self._used(key)
        if found is not None:
            return found
        # Compile outside the lock: one slow compilation must not hold up every other call.
        fresh = compile_ruleset(record.source, record.version)
        # Closed when the last reference goes: after eviction, once no call uses it any more.
        # (The finalizer holds the matchers' close methods, never `fresh` itself.)
        weakref.finalize(fresh, _close_all, fresh.exemption_matcher.close, fresh.condition_matcher.close).atexit = False
        with self._lock:
            found = self._compiled.setdefault(key, fresh)
            self._compiled.move_to_end(key)
            evicted = [self._compiled.popitem(last=False)[1] for _ in range(len(self._compiled) - self._cache_size)]
        if found is not fresh:  # another thread compiled it first
            fresh.close()
        evicted.clear()  # outside the lock: closing an evicted version that nobody holds takes a while
        return found

    def cached(self, record: RulesetVersionRecord) -> CompiledRuleset | None:
        """The compiled version if it is already cached (nothing is compiled)."""
        with self._lock:
            return self._used((record.tenant, record.ruleset_id, record.version))

    def _used(self, key: _VersionKey) -> CompiledRuleset | None:
        """The cached version, marked most recently used; the caller holds the lock."""
        found = self._compiled.get(key)
        if found is not None:
            self._compiled.move_to_end(key)
        return found

    def get(self, tenant: str, ruleset_id: str, version: int) -> Chosen:
        record = self._store.get_ruleset_version(tenant, ruleset_id, version)
        return Chosen(record, self.compiled(record))

    def choose_kept(self, tenant: str, ruleset_id: str, pinned: int | None, period_start: datetime.date, allow_draft: bool) -> Chosen:
        """`choose`, kept for the tenant with the versions stamp read before it (see `forget`).

        Only for a settlement the store writes with that stamp checked: a kept choice may be
        stale until a write finds the stamp changed."""
        key: _ChoiceKey = (ruleset_id, pinned, None if pinned is not None else period_start, allow_draft)
        with self._lock:
            kept = self._choices.get(tenant)
            record = kept[1].get(key) if kept is not None else None
            compiled = self._used((record.tenant, record.ruleset_id, record.version)) if record is not None else None
        if kept is not None and record is not None:  # compiled again if it was evicted since
            return Chosen(record, compiled if compiled is not None else self.compiled(record), kept[0])
        stamp = self._store.versions_stamp(tenant)  # read first: the choice is at least as new as the stamp
        chosen = self.choose(tenant, ruleset_id, pinned, period_start, allow_draft)
        with self._lock:
            kept = self._choices.get(tenant)
            if kept is None or kept[0] < stamp or len(kept[1]) >= MAX_CHOICES_PER_TENANT:
                kept = (stamp, {})
                self._choices[tenant] = kept
            if kept[0] == stamp:
                kept[1][key] = chosen.record
        return Chosen(chosen.record, chosen.compiled, stamp)

    def forget(self, tenant: str) -> None:
        """Drop the tenant's kept choices (the store said its versions changed)."""
        with self._lock:
            self._choices.pop(tenant, None)

    def choose(self, tenant: str, ruleset_id: str, pinned: int | None, period_start: datetime.date, allow_draft: bool) -> Chosen:
        """The pinned version (APPROVED, or DRAFT when simulating), else the APPROVED version
        with the latest effective_from on or before the period's first day (ties: highest)."""
        if pinned is not None:
            record = self._store.get_ruleset_version(tenant, ruleset_id, pinned)
            allowed = {VersionStatus.APPROVED, VersionStatus.DRAFT} if allow_draft else {VersionStatus.APPROVED}
            if record.status not in allowed:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "VERSION_NOT_USABLE",
                    f"rulesets/{ruleset_id}/versions/{pinned} is {record.status.value}; only {' or '.join(sorted(s.value for s in allowed))} versions settle",
                    metadata={"state": record.status.value},
                )
            return Chosen(record, self.compiled(record))
        best = self._store.version_in_effect(tenant, ruleset_id, period_start)
        if best is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "NO_VERSION_IN_EFFECT",
                f"no APPROVED version of rulesets/{ruleset_id} is in effect on {period_start.isoformat()}",
                metadata={"ruleset": ruleset_id, "periodStartDate": period_start.isoformat()},
            )
        return Chosen(best, self.compiled(best))

    def close(self) -> None:
        """Close every cached version now (at shutdown, when no call is in flight)."""
        with self._lock:
            for compiled in self._compiled.values():
                compiled.close()
            self._compiled.clear()
            self._choices.clear()
