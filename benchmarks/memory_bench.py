"""Memory: resident set size after 10k, 100k and 1M in-process settlements.

A fresh interpreter (`python -m benchmarks.memory_bench N`) compiles the US ruleset,
settles 1,000 varied inputs in a loop (decision and canonical JSON, results dropped, as a
server does after storing them) and prints VmRSS from /proc/self/status as JSON lines: once
before the first settlement and at each checkpoint. The growth over the run is what a
leak would show; the target is < 50 MB over 1M settlements.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, Row, Settings

CHECKPOINTS = (10_000, 100_000, 1_000_000)
GROWTH_TARGET_MB = 50.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def checkpoints(last: int) -> list[int]:
    return sorted({c for c in CHECKPOINTS if c < last} | {last})


def main(last: int) -> int:
    import gc

    from benchmarks.inputs import compile_us, to_request, us_examples, us_inputs

    compiled = compile_us()
    requests = [to_request(item) for item in us_examples(compiled) + us_inputs(995)]
    gc.collect()
    print(json.dumps({"settlements": 0, "rss_mb": rss_mb()}), flush=True)
    done = 0
    for checkpoint in checkpoints(last):
        while done < checkpoint:
            for request in requests[: checkpoint - done]:
                compiled.settle(request).to_canonical_json()
            done += min(len(requests), checkpoint - done)
        print(json.dumps({"settlements": done, "rss_mb": rss_mb()}), flush=True)
    compiled.close()
    return 0


def run(settings: Settings) -> list[Row]:
    last = settings.memory_settlements
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_bench", str(last)], cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False
    )
    if done.returncode != 0:
        return [Row("memory", "in-process settlements", None, "", note=f"FAILED: {done.stderr.strip().splitlines()[-1:]}")]
    points = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    start = points[0]["rss_mb"]
    rows = [Row("memory", "RSS before the first settlement", start, "MB", note="US ruleset compiled, 1,000 inputs built")]
    for point in points[1:]:
        is_last = point["settlements"] == last
        growth = point["rss_mb"] - start
        rows.append(
            Row(
                "memory",
                f"RSS after {point['settlements']:,} settlements",
                point["rss_mb"],
                "MB",
                target=f"growth < {GROWTH_TARGET_MB:.0f} MB" if is_last else "",
                met=growth < GROWTH_TARGET_MB if is_last else None,
                note=f"growth {growth:+.1f} MB",
                extra={"settlements": point["settlements"], "growth_mb": round(growth, 2)},
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else CHECKPOINTS[-1]))
