"""What every benchmark shares: the knobs, the machine, the measuring loop, the table.

Knobs (environment variables):

- ``BENCH_SECONDS`` — seconds per engine case and per peer engine (default 3);
- ``BENCH_SERVICE_SECONDS`` — seconds per service case (default 5; the open loop runs twice as long);
- ``BENCH_QUICK=1`` — a smoke run: short cases, few inputs, 20k memory settlements;
- ``BENCH_ONLY=engine,peer,service,memory`` — the sections to run (default: all);
- ``BENCH_DATABASES=sqlite,postgresql`` — the stores of the service section;
- ``BENCH_POSTGRES_URL`` — the PostgreSQL server (a fresh database is created there and
  dropped afterwards; default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``);
- ``BENCH_CLIENT_PROCESSES`` — load-generating processes of the service section (default 2);
- ``BENCH_PEER_INPUTS`` — generated inputs of the peer section (default 500, plus the 5 examples);
- ``BENCH_MEMORY_SETTLEMENTS`` — the last memory checkpoint (default 1,000,000);
- ``BENCH_RESULTS`` — where the JSON goes (default benchmarks/results.json, git-ignored).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
SECTIONS = ("engine", "peer", "service", "memory")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    quick: bool
    seconds: float  # per engine / peer case
    service_seconds: float  # per service case
    runs: int  # short runs per engine / peer case; the best one counts
    sections: tuple[str, ...]
    databases: tuple[str, ...]
    postgres_url: str
    memory_settlements: int
    peer_inputs: int  # generated inputs of the peer section, besides the ruleset's examples
    results: Path

    @classmethod
    def from_environment(cls) -> Settings:
        env = os.environ
        quick = _flag("BENCH_QUICK")
        only = tuple(s.strip() for s in env.get("BENCH_ONLY", "").split(",") if s.strip())
        unknown = [s for s in only if s not in SECTIONS]
        if unknown:
            raise SystemExit(f"BENCH_ONLY: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        databases = tuple(s.strip() for s in env.get("BENCH_DATABASES", "sqlite,postgresql").split(",") if s.strip())
        return cls(
            quick=quick,
            seconds=float(env.get("BENCH_SECONDS", "0.3" if quick else "3")),
            service_seconds=float(env.get("BENCH_SERVICE_SECONDS", "1" if quick else "5")),
            runs=3 if quick else 10,
            sections=only or SECTIONS,
            databases=databases,
            postgres_url=env.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
            memory_settlements=int(env.get("BENCH_MEMORY_SETTLEMENTS", "20000" if quick else "1000000")),
            peer_inputs=int(env.get("BENCH_PEER_INPUTS", "50" if quick else "500")),
            results=Path(env.get("BENCH_RESULTS") or RESULTS),
        )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, CPU, Python, and how busy the machine was."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "load_average_at_start": [round(x, 2) for x in load],
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def best_rate(work: Callable[[], int], seconds: float, runs: int) -> float:
    """Items per second of `work` (which returns how many items it did): the best of `runs`.

    The best short run is the one least disturbed by the rest of the machine (timeit's
    rule): on a shared 2-core VM single runs vary by ±15%.
    """
    best = 0.0
    for _ in range(runs):
        count, started = 0, time.perf_counter()
        deadline = started + seconds / runs
        while True:
            count += work()
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, count / (now - started))
    return best


def cycle(items: Sequence[Any], call: Callable[[Any], object]) -> Callable[[], int]:
    """Work for best_rate: `call` on every item once."""

    def work() -> int:
        for item in items:
            call(item)
        return len(items)

    return work


@dataclass
class Row:
    """One line of the table."""

    section: str
    case: str
    value: float | None  # None: not measured (see note)
    unit: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", {})}


def figure(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "×":
        return f"{value:,.2f}"
    if unit == "MB":
        return f"{value:,.1f}"
    if unit == "ms":
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def render(rows: Sequence[Row], about: dict[str, Any], settings: Settings) -> None:
    """The one table, with the machine above it."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(200, Console().width), highlight=False)
    console.print(
        f"[bold]kpisettle make bench[/bold] — {about['cores']} cores, {about['cpu']}, {about['python']}, "
        f"{about['platform']}; load average at start {', '.join(map(str, about['load_average_at_start']))}"
        + ("; QUICK (smoke run, figures meaningless)" if settings.quick else "")
    )
    table = Table(box=box.SIMPLE_HEAD, show_lines=False, pad_edge=False)
    for name, justify in (
        ("section", "left"),
        ("case", "left"),
        ("figure", "right"),
        ("unit", "left"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("target", "left"),
        ("", "left"),
        ("note", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "note", overflow="fold")  # type: ignore[arg-type]
    previous = ""
    for row in rows:
        if previous and row.section != previous:
            table.add_section()
        previous = row.section
        table.add_row(
            row.section,
            row.case,
            figure(row.value, row.unit),
            row.unit,
            "" if row.p50_ms is None else f"{row.p50_ms:.2f}",
            "" if row.p99_ms is None else f"{row.p99_ms:.2f}",
            row.target,
            "" if row.met is None else ("ok" if row.met else "MISSED"),
            row.note,
        )
    console.print(table)
