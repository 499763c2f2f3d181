"""`make bench`: every benchmark, one table, also written to benchmarks/results.json.

Knobs: see benchmarks/common.py (BENCH_SECONDS, BENCH_QUICK=1, BENCH_ONLY=engine,peer,…).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from benchmarks.common import Row, Settings, machine, render

HOW = {
    "engine": "engine: one thread, settle() and canonical JSON of the full decision (trace, evidence), best of short runs",
    "peer": "peer: the same inputs for all three, converted before timing; kpisettle and zen measured in turns in one process",
    "service": "service: `python -m server` child process; load from spawned grpc.aio client processes sharing the cores; "
    "every call settles a new contract and stores it",
    "memory": "memory: a fresh process settling 1,000 varied inputs in a loop; VmRSS from /proc/self/status",
}


def sections() -> dict[str, Callable[[Settings], list[Row]]]:
    from benchmarks import engine_bench, memory_bench, peer_bench, service_bench

    return {"engine": engine_bench.run, "peer": peer_bench.run, "service": service_bench.run, "memory": memory_bench.run}


def main() -> int:
    settings = Settings.from_environment()
    about = machine()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    for name, run in sections().items():
        if name not in settings.sections:
            continue
        started = time.perf_counter()
        print(f"… {name}", file=sys.stderr, flush=True)
        try:
            rows += run(settings)
        except Exception as exc:  # one broken section must not hide the others
            rows.append(Row(name, "FAILED", None, "", note=f"{type(exc).__name__}: {exc}"[:300]))
        timings[name] = round(time.perf_counter() - started, 1)
    render(rows, about, settings)
    for name in settings.sections:
        print(f"  {HOW[name]}")
    missed = [row for row in rows if row.met is False]
    print(f"  {len(missed)} target(s) missed; written to {settings.results}; took {sum(timings.values()):.0f} s")
    document = {
        "machine": about,
        "settings": {
            "quick": settings.quick,
            "seconds_per_case": settings.seconds,
            "service_seconds_per_case": settings.service_seconds,
            "runs_per_case": settings.runs,
            "sections": list(settings.sections),
            "databases": list(settings.databases),
            "peer_inputs": settings.peer_inputs,
            "memory_settlements": settings.memory_settlements,
        },
        "seconds_per_section": timings,
        "how": {name: HOW[name] for name in settings.sections},
        "rows": [row.as_json() for row in rows],
    }
    settings.results.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
