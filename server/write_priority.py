"""Writers first: while a thread of this process holds a tenant's write lock, the threads
that decide settlements pause between items.

The threads of a process share one interpreter lock (the GIL), handed from one to the next
every few milliseconds. A writer that holds a tenant's lock (the SQLite file's writer lock,
the chain head's row lock on PostgreSQL) needs the GIL to link and insert its rows; with
three SettleBatch streams deciding beside it, it had a quarter of it, so it held the
tenant's lock about four times as long, and every other writer of that tenant, in this
process and in the other workers, waited that long too: the CPUs sat idle while everyone
waited for a writer that was waiting for the GIL. SettleBatch with `--workers 2`, 8
streams, measured in turns on this 2-core machine: 4,100-4,200 → 5,700-6,000 stored/s on
SQLite, 4,250-5,060 → 5,460-5,630 on PostgreSQL (see README, Performance).

The pause is bounded (`MAX_PAUSE_S`): a writer whose transaction stalls on the database
cannot stop the deciding for long.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

#: The longest a decider waits for writers in one pause: a group of 250 settlements is
#: linked and written in 10-30 ms.
MAX_PAUSE_S: Final = 0.1


class WritePriority:
    """Shared by a process's store (which marks its writes) and its settlers (which pause)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._writers = 0
        self._no_writer = threading.Event()
        self._no_writer.set()

    @property
    def writing(self) -> bool:
        """Whether a thread of this process holds a tenant's write lock now."""
        return not self._no_writer.is_set()

    @contextmanager
    def holding_lock(self) -> Iterator[None]:
        """Mark the block as a write that holds a tenant's lock (writes may overlap: several tenants)."""
        with self._guard:
            self._writers += 1
            self._no_writer.clear()
        try:
            yield
        finally:
            with self._guard:
                self._writers -= 1
                if self._writers == 0:
                    self._no_writer.set()

    def let_writers_first(self, timeout: float = MAX_PAUSE_S) -> None:
        """Wait (at most `timeout`) while a writer holds a lock; at once when none does.
        Call it between items of CPU work, never while holding a write lock."""
        if not self._no_writer.is_set():
            self._no_writer.wait(timeout)
