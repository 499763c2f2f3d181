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

import orjson
import zen

from benchmarks.common import Row, Settings, cycle
from benchmarks.inputs import Input, compile_us, to_request, to_zen_context, us_examples, us_inputs
from benchmarks.peer import Outcome, kpisettle_outcome
from benchmarks.peer.zen_peer import ZenPeer

ZEN_RATIO_TARGET = 3.0
TRACE: zen.DecisionEvaluateOptions = {"trace": True}


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
    """Items per second of each work (`seconds` each in all): the best of `runs` short runs, taken in turns."""
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
    evaluate = zen_peer.decision.evaluate
    rates = alternating_rates(
        {
            "kpisettle": cycle(requests, compiled.settle),
            "kpisettle_json": cycle(requests, lambda r: compiled.settle(r).to_canonical_json()),
            "zen": cycle(contexts, evaluate),
            "zen_json": cycle(contexts, lambda c: orjson.dumps(evaluate(c)["result"], option=orjson.OPT_SORT_KEYS)),
            "zen_trace_json": cycle(contexts, lambda c: orjson.dumps(evaluate(c, TRACE), option=orjson.OPT_SORT_KEYS)),
        },
        settings.seconds,
        settings.runs,
    )
    compiled.close()
    expected = kpisettle_outcomes(items)
    zen_found, float_differs = zen_outcomes(items)
    zen_bad = mismatches(expected, zen_found)
    durable_found, durable_rate = durable_outcomes(items, settings.seconds, settings.runs)
    durable_bad = mismatches(expected, durable_found)
    in_memory = rates["kpisettle"] / rates["zen"]
    serialized = rates["kpisettle_json"] / rates["zen_json"]
    traced = rates["kpisettle_json"] / rates["zen_trace_json"]
    target = f"≥ {ZEN_RATIO_TARGET:.0f}×"
    rows = [
        Row("peer", "kpisettle: Decision (trace, evidence per rule)", rates["kpisettle"], "settlements/s", note=f"{n} inputs, in turns"),
        Row("peer", "kpisettle: … and its canonical JSON", rates["kpisettle_json"], "settlements/s"),
        Row(
            "peer",
            f"zen-engine {version('zen-engine')}: result dict",
            rates["zen"],
            "evaluations/s",
            note="JDM: 7 decision tables, 3 expression nodes; sync evaluate()",
        ),
        Row("peer", "zen-engine: … and its JSON (orjson)", rates["zen_json"], "evaluations/s"),
        Row(
            "peer",
            "zen-engine: with its trace, as JSON",
            rates["zen_trace_json"],
            "evaluations/s",
            note="trace: every node's input and output",
        ),
        Row("peer", "kpisettle ÷ zen-engine, results in memory", in_memory, "×", target=target, met=in_memory >= ZEN_RATIO_TARGET),
        Row("peer", "kpisettle ÷ zen-engine, results as JSON", serialized, "×", target=target, met=serialized >= ZEN_RATIO_TARGET),
        Row("peer", "kpisettle ÷ zen-engine, both with a trace, as JSON", traced, "×", target=target, met=traced >= ZEN_RATIO_TARGET),
        Row(
            "peer",
            f"durable.lang {version('durable_rules')}: naive baseline",
            durable_rate,
            "settlements/s",
            note="own process; Decimal amounts, float facts, no trace",
        ),
        Row("peer", "kpisettle ÷ durable.lang, in memory", rates["kpisettle"] / durable_rate if durable_rate else None, "×"),
        _agreement("zen-engine", n, zen_bad, f"float totals rounded to the cent: {n - float_differs} of {n} agree too"),
        _agreement("durable.lang", n, durable_bad, ""),
    ]
    rows[0].extra = {"inputs": n, "generated_inputs": n - 5}
    return rows


def _agreement(engine: str, n: int, bad: list[int], note: str) -> Row:
    agreeing = n - len(bad)
    extra: dict[str, Any] = {"inputs": n, "mismatching_inputs": bad[:20]}
    return Row(
        "peer",
        f"{engine} = kpisettle to the cent",
        agreeing,
        f"of {n} inputs",
        target=f"{n} of {n}",
        met=not bad,
        note=f"total, every line, warnings; {note}" if note else "total, every line, warnings",
        extra=extra,
    )
