"""server.write_priority: deciding threads pause while a write holds a tenant's lock, and the store marks those writes."""

from __future__ import annotations

import threading

from server.storage.interface import SettlementRecord
from server.storage.sql import open_store
from server.write_priority import WritePriority
from tests.test_storage import settlement


def paused_thread(priority: WritePriority, timeout: float) -> tuple[threading.Thread, threading.Event]:
    """A thread that waits for writers once, and an event set when it is through."""
    through = threading.Event()

    def decide() -> None:
        priority.let_writers_first(timeout)
        through.set()

    thread = threading.Thread(target=decide, daemon=True)
    thread.start()
    return thread, through


def test_no_writer_no_pause() -> None:
    priority = WritePriority()
    assert not priority.writing
    thread, through = paused_thread(priority, timeout=60)
    assert through.wait(10)
    thread.join(10)


def test_a_decider_waits_until_the_last_writer_lets_go() -> None:
    priority = WritePriority()
    first_writer, second_writer = priority.holding_lock(), priority.holding_lock()
    first_writer.__enter__()
    second_writer.__enter__()  # writes of two tenants overlap
    assert priority.writing
    thread, through = paused_thread(priority, timeout=60)
    first_writer.__exit__(None, None, None)
    assert not through.wait(0.3)  # one writer still holds its lock
    assert priority.writing
    second_writer.__exit__(None, None, None)
    assert through.wait(10)
    assert not priority.writing
    thread.join(10)


def test_the_pause_is_bounded() -> None:
    priority = WritePriority()
    with priority.holding_lock():  # a writer that never lets go in time
        thread, through = paused_thread(priority, timeout=0.05)
        assert through.wait(10)
        assert priority.writing
    thread.join(10)


def test_a_writer_that_fails_lets_go() -> None:
    priority = WritePriority()
    try:
        with priority.holding_lock():
            raise RuntimeError("the transaction failed")
    except RuntimeError:
        pass
    assert not priority.writing


def test_the_store_marks_writes_that_hold_the_lock(database_url: str, tenant: str) -> None:
    """A rebase runs under the tenant's lock: the store says it writes then, and not after."""
    priority = WritePriority()
    store = open_store(database_url, write_priority=priority)
    try:
        first = store.append_settlement(settlement(tenant, "r-1"), None)
        assert not priority.writing
        seen: list[bool] = []

        def rebase(latest: SettlementRecord | None) -> bytes:
            seen.append(priority.writing)
            assert latest is not None and latest.settlement_id == first.settlement_id
            return b"[]"

        second = store.append_settlement(settlement(tenant, "r-2"), None, rebase)
        assert seen == [True]
        assert second.revision == 2
        assert not priority.writing
    finally:
        store.close()
