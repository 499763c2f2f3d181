"""The compiled-version cache of server/versions.py: bounded, least recently used out, and an
evicted version keeps working for whoever still holds it, then is closed once nobody does."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from engine import CompiledRuleset, compile_ruleset, request_from_mapping
from engine.matcher import Matcher
from server.storage.interface import LifecycleAction, RulesetVersionRecord
from server.storage.sql import SqlStore, open_store
from server.versions import DEFAULT_COMPILED_CACHE_SIZE, VersionRegistry

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (ROOT / "rulesets" / "us-managed-standard.yaml").read_text(encoding="utf-8")
TENANT = "acme"
RULESET = "us-managed-standard"
MARCH = datetime.date(2026, 3, 1)
#: The ruleset's first example ("hits the stretch target") and its total, worked out in the file.
EXPECTED_TOTAL = Decimal("11950.05")


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[SqlStore]:
    store = open_store(f"sqlite:///{tmp_path / 'kpisettle.db'}")
    yield store
    store.close()


def create_versions(store: SqlStore, count: int, approve: bool = False) -> list[RulesetVersionRecord]:
    content_hash = compile_ruleset(SOURCE).content_hash
    records = []
    for _ in range(count):
        record = store.create_ruleset_version(TENANT, RULESET, SOURCE, content_hash, datetime.date(2026, 1, 1), "author")
        if approve:
            record = store.record_lifecycle(TENANT, RULESET, record.version, LifecycleAction.APPROVED, "approver")
        records.append(record)
    return records


def settled_total(compiled: CompiledRuleset) -> Decimal:
    example = compiled.ruleset.examples[0]
    return compiled.settle(request_from_mapping(example.request, compiled.ruleset.effective_from)).total


def is_closed(compiled_ref: weakref.ref[CompiledRuleset], matcher: Matcher) -> bool:
    """The version is gone and its native state freed (the matcher refuses to decide)."""
    return compiled_ref() is None and bool(matcher._closed)


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_cap_of_two_evicts_the_least_recently_used_and_closes_it(store: SqlStore) -> None:
    v1, v2, v3 = create_versions(store, 3)
    registry = VersionRegistry(store, compiled_cache_size=2)
    try:
        first = registry.compiled(v1)
        second = registry.compiled(v2)
        assert registry.compiled(v1) is first  # v1 is now the most recently used
        second_ref, second_matcher = weakref.ref(second), second.condition_matcher
        del second
        registry.compiled(v3)
        assert registry.cached(v2) is None
        assert registry.cached(v1) is first and registry.cached(v3) is not None
        assert is_closed(second_ref, second_matcher)  # at once, by reference counting
        assert settled_total(registry.compiled(v2)) == EXPECTED_TOTAL  # compiled again when used again
        assert registry.cached(v1) is None  # v1 was the least recently used of v1, v3
    finally:
        registry.close()


def test_a_held_version_keeps_settling_while_others_evict_it(store: SqlStore) -> None:
    records = create_versions(store, 5)
    registry = VersionRegistry(store, compiled_cache_size=2)
    held: list[CompiledRuleset] = []
    ready, evicted = threading.Barrier(4), threading.Event()
    totals: list[Decimal] = []

    def settle_with_v1() -> None:
        compiled = registry.choose(TENANT, RULESET, 1, MARCH, allow_draft=True).compiled
        held.append(compiled)
        ready.wait()
        evicted.wait()
        totals.extend(settled_total(compiled) for _ in range(20))

    threads = [threading.Thread(target=settle_with_v1) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        ready.wait()
        assert all(compiled is held[0] for compiled in held)
        v1_ref, v1_matcher = weakref.ref(held[0]), held[0].condition_matcher
        held.clear()
        for record in records[1:]:
            registry.compiled(record)
        assert registry.cached(records[0]) is None
        assert v1_ref() is not None and not v1_matcher._closed  # evicted, still held: not closed
        evicted.set()
        for thread in threads:
            thread.join(30)
        assert totals == [EXPECTED_TOTAL] * 60
        assert is_closed(v1_ref, v1_matcher)  # the last holder is done
    finally:
        evicted.set()
        registry.close()


def test_settlements_and_evictions_at_once_give_the_right_totals(store: SqlStore) -> None:
    """Settling threads choose versions while another keeps evicting them (cap 2, 5 versions)."""
    records = create_versions(store, 5, approve=True)
    registry = VersionRegistry(store, compiled_cache_size=2)
    seen: list[weakref.ref[CompiledRuleset]] = []  # every distinct compiled object used
    seen_lock = threading.Lock()
    failures: list[BaseException] = []
    stop = threading.Event()
    settled = [0]

    def settle(offset: int) -> None:
        try:
            for i in range(25):
                pinned = (i + offset) % len(records) + 1
                chosen = registry.choose_kept(TENANT, RULESET, pinned, MARCH, allow_draft=False)
                assert chosen.record.version == pinned and chosen.stamp is not None
                with seen_lock:
                    if not any(ref() is chosen.compiled for ref in seen):
                        seen.append(weakref.ref(chosen.compiled))
                assert settled_total(chosen.compiled) == EXPECTED_TOTAL
                time.sleep(0.03)  # held across a wait, as a call holds it across its store write
                assert settled_total(chosen.compiled) == EXPECTED_TOTAL
                with seen_lock:
                    settled[0] += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def evict() -> None:
        try:
            i = 0
            while not stop.is_set():
                registry.compiled(records[i % len(records)])
                i += 1
        except BaseException as exc:
            failures.append(exc)

    settlers = [threading.Thread(target=settle, args=(offset,)) for offset in range(3)]
    evictor = threading.Thread(target=evict)
    try:
        evictor.start()
        for thread in settlers:
            thread.start()
        for thread in settlers:
            thread.join(60)
        stop.set()
        evictor.join(30)
        assert failures == []
        assert settled[0] == 75
        assert len(seen) > len(records)  # versions were evicted and compiled again meanwhile
        gc.collect()
        assert sum(ref() is not None for ref in seen) <= 2  # once the calls are done, only the cached ones live
    finally:
        stop.set()
        registry.close()


def test_kept_choices_do_not_keep_an_evicted_version_alive(store: SqlStore) -> None:
    v1, v2, v3 = create_versions(store, 3, approve=True)
    registry = VersionRegistry(store, compiled_cache_size=2)
    try:
        chosen = registry.choose_kept(TENANT, RULESET, 1, MARCH, allow_draft=False)
        stamp, v1_ref, v1_matcher = chosen.stamp, weakref.ref(chosen.compiled), chosen.compiled.condition_matcher
        assert stamp is not None
        del chosen
        registry.compiled(v2)
        registry.compiled(v3)
        assert is_closed(v1_ref, v1_matcher)
        again = registry.choose_kept(TENANT, RULESET, 1, MARCH, allow_draft=False)
        assert (again.record, again.stamp) == (v1, stamp)  # the kept choice, with its stamp
        assert settled_total(again.compiled) == EXPECTED_TOTAL
        assert registry.cached(v1) is again.compiled
    finally:
        registry.close()


def test_memory_stays_bounded_over_200_versions(store: SqlStore) -> None:
    """200 versions through a cache of 2: without the cap (or with eviction but no close)
    RSS would grow by ~135 MiB (~0.7 MiB per version; ~0.45 MiB of it native)."""
    (record,) = create_versions(store, 1)
    registry = VersionRegistry(store, compiled_cache_size=2)
    refs: list[weakref.ref[CompiledRuleset]] = []
    try:
        for version in range(1, 6):  # warm up the allocators
            registry.compiled(dataclasses.replace(record, version=-version))
        gc.collect()
        before = rss_bytes()
        gc.disable()  # freed by reference counting alone, as each one is evicted
        try:
            for version in range(1, 201):
                refs.append(weakref.ref(registry.compiled(dataclasses.replace(record, version=version))))
        finally:
            gc.enable()
        grown = rss_bytes() - before
        assert [ref() is not None for ref in refs] == [False] * 198 + [True] * 2
        assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 versions"
    finally:
        registry.close()


def test_the_cap_must_be_positive(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        VersionRegistry(store, compiled_cache_size=0)


def test_the_cap_is_a_server_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.app import parse_args

    assert parse_args([]).compiled_cache_size == DEFAULT_COMPILED_CACHE_SIZE
    assert parse_args(["--compiled-cache-size", "3"]).compiled_cache_size == 3
    monkeypatch.setenv("KPISETTLE_COMPILED_CACHE_SIZE", "7")
    assert parse_args([]).compiled_cache_size == 7
    with pytest.raises(SystemExit):
        parse_args(["--compiled-cache-size", "0"])
