"""server.storage.file_lock: the SQLite writers of several processes take turns on a file lock."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from server.storage.file_lock import FileLock
from server.storage.sql import StoreBusy, open_store
from tests.test_storage import settlement


def test_one_holder_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite-writer.lock"
    first, second = FileLock(path), FileLock(path)  # two open files, as two processes have
    try:
        assert first.acquire(1.0)
        assert not second.acquire(0.05)
        first.release()
        assert second.acquire(1.0)
        assert not first.acquire(0.0)
        second.release()
    finally:
        first.close()
        second.close()


def _try_in_child(lock: FileLock, answer: multiprocessing.SimpleQueue[bool]) -> None:
    answer.put(lock.acquire(0.05))


def test_a_forked_child_does_not_share_the_parents_lock(tmp_path: Path) -> None:
    """A child inherits the open file; flock on it would succeed while the parent holds it."""
    lock = FileLock(tmp_path / "db.sqlite-writer.lock")
    context = multiprocessing.get_context("fork")
    answer: multiprocessing.SimpleQueue[bool] = context.SimpleQueue()
    try:
        assert lock.acquire(1.0)
        child = context.Process(target=_try_in_child, args=(lock, answer))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert answer.get() is False
    finally:
        lock.close()


def test_a_closed_lock_says_so(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock")
    lock.close()
    lock.close()
    with pytest.raises(ValueError, match="closed"):
        lock.acquire(0.0)


def test_a_store_waits_for_another_process_then_is_busy(tmp_path: Path, tenant: str) -> None:
    """The store takes the lock beside its file: while another process holds it, a write is
    StoreBusy after the lock timeout and stores nothing; once it is free, writes go on."""
    database = tmp_path / "kpisettle.db"
    store = open_store(f"sqlite:///{database}", lock_timeout=0.2)
    other = FileLock(Path(f"{database}-writer.lock"))
    try:
        assert other.acquire(1.0)
        with pytest.raises(StoreBusy):
            store.append_settlement(settlement(tenant, "r-1"), None)
        assert store.settlement_by_request(tenant, "r-1") is None
        other.release()
        assert store.append_settlement(settlement(tenant, "r-1"), None).revision == 1
        assert other.acquire(0.0)  # the store let go after its write
        other.release()
    finally:
        other.close()
        store.close()
