"""The server's garbage-collector settings (server/gc_tuning.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from server.gc_tuning import THRESHOLDS, tune_for_serving


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tuning_freezes_what_exists_and_raises_the_thresholds(restored_collector: None) -> None:
    assert gc.get_threshold() != THRESHOLDS
    tune_for_serving()
    assert gc.get_threshold() == THRESHOLDS
    assert gc.get_freeze_count() > 10_000  # modules, descriptors, metadata: out of the collector's walks


def test_reference_cycles_are_still_collected() -> None:
    # In a process of its own: a cycle made after tuning is freed once enough is allocated.
    program = """
import gc, weakref
from server.gc_tuning import tune_for_serving
tune_for_serving()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
junk = [[i] for i in range(300_000)]  # containers: enough allocations for a collection
assert gone() is None, "a cycle survived 300,000 allocations"
print("collected")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "collected"
