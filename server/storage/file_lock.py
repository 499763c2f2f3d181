"""An exclusive lock shared by the processes that write one SQLite file (see SqlStore)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Final

#: Pauses between tries while another process holds the lock: short, so that it changes
#: hands within a millisecond (SQLite's busy handler sleeps up to 100 ms between its tries).
FIRST_PAUSE_S: Final = 0.0001
LONGEST_PAUSE_S: Final = 0.001


class FileLock:
    """flock(2) on a file of its own. Only between processes: the threads of one process
    share its open file, and so the lock, so they must take turns on a thread lock first."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pid = os.getpid()
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _descriptor(self) -> int:
        if self._fd is None:
            raise ValueError(f"the lock on {self._path} is closed")
        if os.getpid() != self._pid:  # a forked child: that open file, and its lock, are the parent's too
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = os.getpid()
        return self._fd

    def acquire(self, timeout: float) -> bool:
        """Take the lock, waiting at most `timeout` seconds; False if another process kept it."""
        fd = self._descriptor()
        deadline = time.monotonic() + timeout
        pause = FIRST_PAUSE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_S)

    def release(self) -> None:
        fcntl.flock(self._descriptor(), fcntl.LOCK_UN)

    def close(self) -> None:
        """Let go of the file (and the lock, if held); again is harmless."""
        if self._fd is not None and os.getpid() == self._pid:
            os.close(self._fd)
        self._fd = None
