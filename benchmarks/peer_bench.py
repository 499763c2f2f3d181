"""Peer: the US ruleset on kpisettle, on GoRules zen-engine and on a naive durable.lang baseline.

All three get the same inputs (the ruleset's examples and generated ones, see
benchmarks/inputs.py), each converted to its engine's form before any clock starts, and
must agree on every input to the cent (total, every line, warnings). kpisettle and zen
are measured in alternating short runs in this process, so that a noisy neighbour slows
both alike; the durable.lang baseline runs in a process of its own (durable.lang keeps a
process-wide host with timer threads).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

from benchmarks.common import Row, Settings, cycle
from benchmarks.inputs import Input, compile_us, to_request, to_zen_context, us_examples, us_inputs
from benchmarks.peer import Outcome, kpisettle_outcome
from benchmarks.peer.zen_peer import ZenPeer

ZEN_RATIO_TARGET = 3.0


def peer_inputs(generated: int) -> list[Input]:
    return us_examples() + us_inputs(generated)


def kpisettle_outcomes(items: Sequence[Input]) -> list[Outcome]:
    compiled = compile_us()
    try:
        return [kpisettle_outcome(compiled.settle(to_request(item))) for item in items]
    finally:
        compiled.close()


def zen_outcomes(items: Sequence[Input]) -> tuple[list[Outcome], int]:
    """zen's outcomes, and how many float totals (rounded to the cent) differ from its text totals."""
    peer = ZenPeer()
    outcomes, float_differs = [], 0
    for item in items:
        result = peer.evaluate(to_zen_context(item))
        found = ZenPeer.outcome(result)
        outcomes.append(found)
        float_differs += ZenPeer.float_total(result) != found.total
    return outcomes, float_differs


def _durable_worker(items: Sequence[Input], seconds: float, runs: int) -> tuple[list[Outcome], float]:
    from benchmarks.common import best_rate
    from benchmarks.peer import durable_naive

    durable_naive.stop_timers()
    outcomes = [durable_naive.settle(item) for item in items]
    rate = best_rate(cycle(items, durable_naive.settle), seconds, runs) if seconds > 0 else 0.0
    return outcomes, rate


def durable_outcomes(items: Sequence[Input], seconds: float = 0.0, runs: int = 1) -> tuple[list[Outcome], float]:
    """The durable.lang baseline's outcomes and (if seconds > 0) its settlements/s, in a subprocess."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_durable_worker, (list(items), seconds, runs))


def mismatches(expected: Sequence[Outcome], found: Sequence[Outcome]) -> list[int]:
    """Positions where two engines disagree (any line, the total or the warnings)."""
    return [i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b]


def alternating_rates(works: dict[str, Callable[[], int]], seconds: float, runs: int) -> dict[str, float]:
    """Items per second of each work: the best of `runs` short runs, taken in turns."""
    import time

    best = dict.fromkeys(works, 0.0)
    for _ in range(runs):
        for name, work in works.items():
            count, started = 0, time.perf_counter()
            deadline = started + seconds / runs
            while True:
                count += work()
                now = time.perf_counter()
                if now >= deadline:
                    break
            best[name] = max(best[name], count / (now - started))
    return best


def run(settings: Settings) -> list[Row]:
    items = peer_inputs(settings.peer_inputs)
    n = len(items)
    compiled = compile_us()
    requests = [to_request(item) for item in items]
    contexts = [to_zen_context(item) for item in items]
    zen_peer = ZenPeer()
    rates = alternating_rates(
        {
            "kpisettle": cycle(requests, lambda r: compiled.settle(r).to_canonical_json()),
            "zen": cycle(contexts, zen_peer.decision.evaluate),
        },
        2 * settings.seconds,
        settings.runs,
    )
    compiled.close()
    expected = kpisettle_outcomes(items)
    zen_found, float_differs = zen_outcomes(items)
    zen_bad = mismatches(expected, zen_found)
    durable_found, durable_rate = durable_outcomes(items, settings.seconds, settings.runs)
    durable_bad = mismatches(expected, durable_found)
    ratio = rates["kpisettle"] / rates["zen"]
    same_inputs = f"{n} inputs (5 examples + {n - 5} generated), in turns"
    rows = [
        Row(
            "peer",
            "kpisettle: decision with trace, evidence, canonical JSON",
            rates["kpisettle"],
            "settlements/s",
            note=same_inputs,
        ),
        Row(
            "peer",
            f"zen-engine {version('zen-engine')}: JDM graph, 7 tables + 3 expression nodes",
            rates["zen"],
            "evaluations/s",
            note="one decision created once, sync evaluate(), JSON text in, no trace",
        ),
        Row(
            "peer",
            "kpisettle ÷ zen-engine",
            ratio,
            "×",
            target=f"≥ {ZEN_RATIO_TARGET:.0f}×",
            met=ratio >= ZEN_RATIO_TARGET,
        ),
        Row(
            "peer",
            f"durable.lang {version('durable_rules')}: naive baseline",
            durable_rate,
            "settlements/s",
            note="assert/retract facts, Decimal amounts, float facts, no trace; own process",
        ),
        Row("peer", "kpisettle ÷ durable.lang", rates["kpisettle"] / durable_rate if durable_rate else None, "×"),
        _agreement("zen-engine", n, zen_bad, f"total compared as text; float total rounded to the cent differs on {float_differs}"),
        _agreement("durable.lang", n, durable_bad, "Decimal amounts, float comparisons"),
    ]
    rows[0].extra = {"inputs": n}
    return rows


def _agreement(engine: str, n: int, bad: list[int], note: str) -> Row:
    agreeing = n - len(bad)
    extra: dict[str, Any] = {"inputs": n, "mismatching_inputs": bad[:20]}
    return Row(
        "peer",
        f"{engine} = kpisettle to the cent (total, lines, warnings)",
        agreeing,
        f"of {n} inputs",
        target=f"{n} of {n}",
        met=not bad,
        note=note,
        extra=extra,
    )
