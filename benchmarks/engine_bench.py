"""Settlements per second on one core: full decision with trace and canonical JSON.

`make bench` runs this. It prints a table and writes it to benchmarks/results.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from engine import CompiledRuleset, SettlementRequest, compile_ruleset, request_from_mapping

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("BENCH_SECONDS", "4.0"))  # per case
RUNS = 10


def generated_ruleset(conditions: int) -> str:
    """A ruleset with `conditions` penalty rules over five KPIs, thresholds spread out."""
    lines = [
        "ruleset: generated",
        "effective_from: 2026-01-01",
        "currency: USD",
        "metrics:",
        *[f"  m{i}: {{type: number}}" for i in range(5)],
        "fees:",
        "  - {id: base_fee, kind: fixed, amount: '1000'}",
    ]
    for i in range(conditions):
        metric = f"m{i % 5}"
        op = ("<", "<=", ">", ">=")[i % 4]
        lines.append(f"  - {{id: p{i}, kind: penalty, when: '{metric} {op} {i}.5', amount: '{i + 1}'}}")
    lines += ["markets: {US: {multiplier: '1'}}"]
    return "\n".join(lines) + "\n"


def generated_request(conditions: int) -> SettlementRequest:
    import datetime

    return SettlementRequest("US", datetime.date(2026, 3, 1), {f"m{i}": f"{conditions // 2}.25" for i in range(5)})


def measure(compiled: CompiledRuleset, requests: list[SettlementRequest]) -> float:
    """Settlements per second (decision + canonical JSON): the best of RUNS short runs.

    The best run is the one least disturbed by the rest of the machine (timeit's rule);
    on a shared 2-core VM single runs vary by ±15%.
    """
    best = 0.0
    for _ in range(RUNS):
        count, started = 0, time.perf_counter()
        deadline = started + SECONDS / RUNS
        while time.perf_counter() < deadline:
            for request in requests:
                compiled.settle(request).to_canonical_json()
            count += len(requests)
        best = max(best, count / (time.perf_counter() - started))
    return best


def main() -> int:
    rows: list[dict[str, object]] = []
    for path in sorted((ROOT / "rulesets").glob("*.yaml")):
        compiled = compile_ruleset(path.read_text(encoding="utf-8"))
        requests = [request_from_mapping(e.request, compiled.ruleset.effective_from) for e in compiled.ruleset.examples]
        rows.append({"case": path.name, "rules": len(compiled.rules), "settlements_per_s": round(measure(compiled, requests))})
        compiled.close()
    for size in (5, 20, 50):
        compiled = compile_ruleset(generated_ruleset(size))
        rows.append(
            {
                "case": f"generated, {size} conditions",
                "rules": size,
                "settlements_per_s": round(measure(compiled, [generated_request(size)])),
            }
        )
        compiled.close()
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds_per_case": SECONDS,
        "runs_per_case": RUNS,
    }
    print(f"engine, one thread, best of {RUNS} runs; {machine['cpus']} cores, Python {machine['python']} ({machine['machine']})")
    print(f"{'case':34} {'rules':>5} {'settlements/s':>14}")
    for row in rows:
        print(f"{row['case']:34} {row['rules']:>5} {row['settlements_per_s']:>14,}")
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps({"machine": machine, "engine": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
