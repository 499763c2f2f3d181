"""Service: Settle and SettleBatch over gRPC against `python -m server`, on SQLite and PostgreSQL.

The server runs as a child process (`python -m server --listen 127.0.0.1:0 …`, and with
`--workers 2` when the server offers it). The load comes from other processes
(multiprocessing, spawned), each an asyncio gRPC client (`grpc.aio`) with one channel per
caller, so that neither the client's GIL nor one connection caps the figure. Client and
server share the machine's cores.

- closed loop: N callers, each sending its next `Settle` when the previous one is
  answered; requests/s and latency percentiles over the measuring window;
- open loop: `Settle` sent on a fixed schedule (500/s) whatever the answers do; latency is
  measured from the scheduled send time, so a slow answer delays nothing and hides
  nothing (no coordinated omission);
- batch: one `SettleBatch` stream per client process, 500 items per message, at most two
  messages unanswered; stored settlements/s counts items answered with a decision.

Every request settles a new (contract, period), so each one computes and stores a
decision. Before the window opens, every client process connects and settles a few
requests (the server compiles the ruleset version on first use).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Row, Settings
from benchmarks.inputs import US_RULESET, Input, us_examples, us_inputs

SETTLE_CALLERS = (1, 8, 32)
OPEN_LOOP_RATE = 500
BATCH_ITEMS = 500
BATCH_IN_FLIGHT_MESSAGES = 2
#: SettleBatch streams per client process, each on a connection of its own: the kernel
#: spreads connections (not streams) over `--workers`: 2 connections land on one worker half
#: the time, 8 split no worse than 3:5 seven times in ten (2:6 or better 93%).
BATCH_STREAMS_PER_PROCESS = 4
#: SettleBatch items are counted from this long after the streams start: the first answers
#: come only when a whole message is settled (8 streams × 2 messages × 500 items in flight),
#: so counting from the start would measure the pipeline filling, not its rate.
BATCH_WARMUP_S = 3.0
CLIENT_PROCESSES = int(os.environ.get("BENCH_CLIENT_PROCESSES", "2"))
WORKERS = 2
P99_TARGET_MS = 10.0
#: Stored settlements/s, on SQLite and on PostgreSQL, judged with `--workers 2` (both of
#: the machine's cores; the issue's multi-process serving is there for that): one process
#: runs its Python on one core, ~0.3 ms per item, so it cannot get near 5,000 on its own.
BATCH_TARGET = 5_000
WORKERS_TARGET = 1_500


# ----------------------------------------------------------------- the server


@dataclass(frozen=True)
class Tokens:
    path: Path
    erp: str
    admin: str
    compliance: str


def write_tokens(directory: Path) -> Tokens:
    from server.auth import hash_token

    tokens = {role: f"bench-{role}-{secrets.token_hex(12)}" for role in ("erp", "admin", "compliance")}
    tenant = f"bench-{secrets.token_hex(4)}"
    rows = [
        {"sha256": hash_token(token), "principal": f"bench-{role}", "tenant": tenant, "roles": [role]} for role, token in tokens.items()
    ]
    path = directory / "tokens.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return Tokens(path, tokens["erp"], tokens["admin"], tokens["compliance"])


def server_offers_workers() -> bool:
    """Whether `python -m server --help` lists --workers."""
    done = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    return "--workers" in done.stdout


class ServerProcess:
    """`python -m server` on a free port; stop() always ends it."""

    def __init__(self, database_url: str, tokens: Tokens, workers: int = 1) -> None:
        command = [
            sys.executable,
            "-m",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--tokens-file",
            str(tokens.path),
        ]
        if workers > 1:
            command += ["--workers", str(workers)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)  # drains the pipe all the time
        self._reader.start()
        self._started.wait(90)
        for line in self.lines:
            if line.startswith("kpisettle listening on "):
                self.target = line.removeprefix("kpisettle listening on ").strip()
                return
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("kpisettle listening on "):
                self._started.set()
        self._started.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def load_us_ruleset(target: str, tokens: Tokens) -> None:
    """Create and approve rulesets/us-managed-standard.yaml (four eyes: admin, then compliance)."""
    import grpc
    from kpisettle.v1 import ruleset_service_pb2 as rs
    from kpisettle.v1 import ruleset_service_pb2_grpc as rs_grpc

    with grpc.insecure_channel(target) as channel:
        stub = rs_grpc.RulesetServiceStub(channel)  # type: ignore[no-untyped-call]
        created = stub.CreateRulesetVersion(
            rs.CreateRulesetVersionRequest(source=US_RULESET.read_text(encoding="utf-8")),
            metadata=(("authorization", f"Bearer {tokens.admin}"),),
            timeout=60,
        )
        stub.ApproveRulesetVersion(
            rs.ApproveRulesetVersionRequest(name=created.ruleset_version.name),
            metadata=(("authorization", f"Bearer {tokens.compliance}"),),
            timeout=60,
        )


class Unavailable(Exception):
    """The database cannot be used; the message says why (shown in the table)."""


@contextlib.contextmanager
def database(kind: str, settings: Settings, directory: Path) -> Iterator[str]:
    """A fresh database: a SQLite file in `directory`, or a new PostgreSQL database, dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / f'bench-{secrets.token_hex(4)}.db'}"
        return
    if kind != "postgresql":
        raise Unavailable(f"unknown database kind {kind!r}")
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    admin_url = make_url(settings.postgres_url)
    if admin_url.drivername == "postgresql":
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"kpisettle_bench_{secrets.token_hex(6)}"
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except DBAPIError as exc:
        engine.dispose()
        first = (str(exc.orig or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Unavailable(f"PostgreSQL not reachable at {admin_url.render_as_string(hide_password=True)}: {first}") from exc
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


# ----------------------------------------------------------------- the load (client processes)


@dataclass(frozen=True)
class Load:
    mode: str  # closed | open | batch
    callers: int = 1  # closed: callers in this process
    rate: float = 0.0  # open: requests/s from this process
    phase: float = 0.0  # open: offset of this process's schedule, seconds
    items: int = BATCH_ITEMS  # batch: items per message
    streams: int = BATCH_STREAMS_PER_PROCESS  # batch: streams (each on its own connection) from this process


@dataclass
class Outcome:
    ok: int = 0  # answered calls (batch: items answered with a decision) inside the window
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds
    sent: int = 0


def _client_process(target: str, token: str, load: Load, prefix: str, inputs: list[Input], pipe: Connection) -> None:
    try:
        asyncio.run(_client(target, token, load, prefix, inputs, pipe))
    except BaseException as exc:  # report, never hang the parent
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise


async def _client(target: str, token: str, load: Load, prefix: str, inputs: list[Input], pipe: Connection) -> None:
    import grpc
    from kpisettle.v1 import settlement_service_pb2 as ss
    from kpisettle.v1 import settlement_service_pb2_grpc as ss_grpc

    templates = [_proto_input(item) for item in inputs]
    metadata = (("authorization", f"Bearer {token}"),)
    counter = iter(range(10**9))
    channel_count = {"closed": load.callers, "open": 8}.get(load.mode, load.streams)
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channel_count)]
    stubs = [ss_grpc.SettlementServiceStub(channel) for channel in channels]  # type: ignore[no-untyped-call]

    def settle_request() -> ss.SettleRequest:
        n = next(counter)
        message = ss.SettleRequest(request_id=f"{prefix}-{n}")
        message.input.CopyFrom(templates[n % len(templates)])
        message.input.contract_id = f"{prefix}-{n}"
        return message

    outcome = Outcome()

    def failed(error: BaseException) -> None:
        key = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        outcome.errors[key] = outcome.errors.get(key, 0) + 1
        if not outcome.first_error:
            outcome.first_error = f"{key}: {error.details() if isinstance(error, grpc.aio.AioRpcError) else error}"[:300]

    # warm up: connect every channel, let the server compile the version, then say ready
    for stub in stubs:
        await stub.Settle(settle_request(), metadata=metadata, timeout=60)
    pipe.send(("ready", None))
    start_wall = pipe.recv()
    start = time.perf_counter() + (start_wall - time.time())
    counted_from = start + (BATCH_WARMUP_S if load.mode == "batch" else 0.0)
    end = counted_from + _duration(pipe)
    await asyncio.sleep(max(0.0, start - time.perf_counter()))

    if load.mode == "closed":

        async def caller(stub: Any) -> None:
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                try:
                    await stub.Settle(settle_request(), metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as error:
                    failed(error)
                    continue
                done = time.perf_counter()
                if done <= end:
                    outcome.ok += 1
                    outcome.latencies.append(done - sent)

        await asyncio.gather(*(caller(stub) for stub in stubs))
    elif load.mode == "open":
        interval = 1.0 / load.rate

        async def one(stub: Any, scheduled: float) -> None:
            try:
                await stub.Settle(settle_request(), metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as error:
                failed(error)
                return
            outcome.ok += 1
            outcome.latencies.append(time.perf_counter() - scheduled)

        tasks = []
        k = 0
        while True:
            scheduled = start + load.phase + k * interval
            if scheduled >= end:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(stubs[k % len(stubs)], scheduled)))
            k += 1
        outcome.sent = k
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(_batch(stub, metadata, settle_request, load.items, counted_from, end, outcome, failed) for stub in stubs))
    for channel in channels:
        await channel.close()
    pipe.send(("done", outcome))


def _duration(pipe: Connection) -> float:
    value: float = pipe.recv()
    return value


async def _batch(
    stub: Any, metadata: Any, settle_request: Any, items: int, counted_from: float, end: float, outcome: Outcome, failed: Any
) -> None:
    from kpisettle.v1 import settlement_service_pb2 as ss

    sent, answered = 0, 0
    room = asyncio.Condition()

    def may_send() -> bool:
        return sent - answered < BATCH_IN_FLIGHT_MESSAGES * items or time.perf_counter() >= end

    async def messages() -> Any:
        nonlocal sent
        while time.perf_counter() < end:
            async with room:
                await room.wait_for(may_send)
            if time.perf_counter() >= end:
                return
            batch = ss.SettleBatchRequest()
            for _ in range(items):
                request = settle_request()
                batch.items.add(request_id=request.request_id, input=request.input)
            sent += items
            yield batch

    call = stub.SettleBatch(messages(), metadata=metadata, timeout=600)
    try:
        async for response in call:
            now = time.perf_counter()
            for result in response.results:
                if counted_from <= now <= end:
                    if result.HasField("settlement"):
                        outcome.ok += 1
                    else:
                        key = f"item:{result.error.code}"
                        outcome.errors[key] = outcome.errors.get(key, 0) + 1
                        outcome.first_error = outcome.first_error or result.error.message[:300]
            async with room:
                answered += len(response.results)
                room.notify_all()
    except Exception as error:
        failed(error)
    outcome.sent += sent


def _proto_input(item: Input) -> Any:
    from kpisettle.v1 import resources_pb2 as pb

    message = pb.SettlementInput(seller_id="S-bench", market=item["market"], ruleset="rulesets/us-managed-standard")
    year, month, day = (int(part) for part in item["period_start"].split("-"))
    message.period_start_date.year, message.period_start_date.month, message.period_start_date.day = year, month, day
    for name, value in item["metrics"].items():
        message.metrics[name].value = value
    for name, value in item["params"].items():
        message.params[name] = value
    return message


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its descendants (the workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(encoding="utf-8")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier += children
    return sum(used.get(p, 0.0) for p in tree)


def run_load(
    target: str,
    token: str,
    loads: Sequence[Load],
    seconds: float,
    inputs: list[Input],
    server_pid: int | None = None,
    warmup: float = 0.0,
) -> tuple[list[Outcome], float | None]:
    """Run one load per client process over the same window (which starts `warmup` seconds
    after the load does): their outcomes, and the server's CPU seconds in the window (None
    without `server_pid`)."""
    context = multiprocessing.get_context("spawn")
    run_id = secrets.token_hex(4)
    pipes, processes = [], []
    for i, load in enumerate(loads):
        parent, child = context.Pipe()
        process = context.Process(target=_client_process, args=(target, token, load, f"{run_id}-{i}", inputs, child), daemon=True)
        process.start()
        pipes.append(parent)
        processes.append(process)
    try:
        for pipe in pipes:
            _expect(pipe, "ready", 120)
        start = time.time() + 0.3
        for pipe in pipes:
            pipe.send(start)
            pipe.send(seconds)
        cpu = None
        if server_pid is not None:
            time.sleep(max(0.0, start + warmup - time.time()))
            before = process_tree_cpu(server_pid)
            time.sleep(max(0.0, start + warmup + seconds - time.time()))
            cpu = process_tree_cpu(server_pid) - before
        return [_expect(pipe, "done", warmup + seconds + 180) for pipe in pipes], cpu
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


def _expect(pipe: Connection, what: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a client process sent nothing for {timeout:.0f} s (waiting for {what!r})")
    try:
        kind, value = pipe.recv()
    except EOFError:
        raise RuntimeError(f"a client process exited without a word (waiting for {what!r})") from None
    if kind != what:
        raise RuntimeError(f"a client process failed: {value}")
    return value


# ----------------------------------------------------------------- the rows


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _merge(outcomes: Sequence[Outcome]) -> Outcome:
    merged = Outcome()
    for outcome in outcomes:
        merged.ok += outcome.ok
        merged.sent += outcome.sent
        merged.latencies += outcome.latencies
        for key, count in outcome.errors.items():
            merged.errors[key] = merged.errors.get(key, 0) + count
        merged.first_error = merged.first_error or outcome.first_error
    return merged


def _errors_note(outcome: Outcome) -> str:
    if not outcome.errors:
        return ""
    counts = ", ".join(f"{k} ×{v}" for k, v in sorted(outcome.errors.items()))
    return f"ERRORS {counts} ({outcome.first_error})"


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts) if total // parts + (1 if i < total % parts else 0)]


def _cpu_note(cpu: float | None, count: int, what: str = "req") -> str:
    if cpu is None or not count:
        return ""
    return f"server CPU {1000 * cpu / count:.2f} ms/{what}"


def measure_server(
    section: str, server: ServerProcess, tokens: Tokens, settings: Settings, workers: int, inputs: list[Input], judge_batch: bool = True
) -> list[Row]:
    """The service rows of one server. `judge_batch`: whether its SettleBatch row is held to
    the target (not a lone process when the `--workers 2` run follows: see BATCH_TARGET)."""
    rows: list[Row] = []
    target, pid = server.target, server.process.pid
    seconds = settings.service_seconds
    prefix = f"--workers {workers}: " if workers > 1 else ""
    callers_list = SETTLE_CALLERS if workers == 1 else (8, 32)
    for callers in callers_list:
        loads = [Load("closed", callers=n) for n in _split(callers, CLIENT_PROCESSES)]
        outcomes, cpu = run_load(target, tokens.erp, loads, seconds, inputs, pid)
        merged = _merge(outcomes)
        throughput = merged.ok / seconds
        meets_workers = workers > 1 and callers == 32
        rows.append(
            Row(
                section,
                f"{prefix}Settle, {callers} caller{'s' if callers > 1 else ''} (closed loop)",
                throughput,
                "req/s",
                percentile(merged.latencies, 50),
                percentile(merged.latencies, 99),
                target=f"≥ {WORKERS_TARGET:,}" if meets_workers else "",
                met=throughput >= WORKERS_TARGET if meets_workers else None,
                note=_errors_note(merged) or _cpu_note(cpu, merged.ok),
                extra={"calls": merged.ok, "seconds": seconds, "client_processes": len(loads), "server_cpu_seconds": cpu},
            )
        )
    processes = CLIENT_PROCESSES
    loads = [Load("open", rate=OPEN_LOOP_RATE / processes, phase=i / OPEN_LOOP_RATE) for i in range(processes)]
    open_seconds = 2 * seconds
    outcomes, cpu = run_load(target, tokens.erp, loads, open_seconds, inputs, pid)
    merged = _merge(outcomes)
    p99 = percentile(merged.latencies, 99)
    rows.append(
        Row(
            section,
            f"{prefix}Settle, open loop at {OPEN_LOOP_RATE} req/s",
            merged.ok / open_seconds,
            "req/s",
            percentile(merged.latencies, 50),
            p99,
            target=f"p99 ≤ {P99_TARGET_MS:.0f} ms",
            met=p99 is not None and p99 <= P99_TARGET_MS and not merged.errors,
            note=_errors_note(merged) or _cpu_note(cpu, merged.ok),
            extra={"calls": merged.ok, "sent": merged.sent, "seconds": open_seconds, "server_cpu_seconds": cpu},
        )
    )
    items = 50 if settings.quick else BATCH_ITEMS  # a smoke run's window is too short for 500
    loads = [Load("batch", items=items) for _ in range(processes)]
    outcomes, cpu = run_load(target, tokens.erp, loads, seconds, inputs, pid, warmup=BATCH_WARMUP_S)
    merged = _merge(outcomes)
    stored = merged.ok / seconds
    rows.append(
        Row(
            section,
            f"{prefix}SettleBatch, {processes * BATCH_STREAMS_PER_PROCESS} streams × {items} items/message",
            stored,
            "stored/s",
            target=f"≥ {BATCH_TARGET:,}" if judge_batch else f"(≥ {BATCH_TARGET:,}: --workers {WORKERS})",
            met=stored >= BATCH_TARGET and not merged.errors if judge_batch else None,
            note=_errors_note(merged) or "; ".join(filter(None, [_cpu_note(cpu, merged.ok, "item"), "" if judge_batch else "one process"])),
            extra={"stored": merged.ok, "seconds": seconds, "server_cpu_seconds": cpu},
        )
    )
    return rows


def run(settings: Settings) -> list[Row]:
    inputs = us_examples() + us_inputs(200)
    rows: list[Row] = []
    worker_counts = [1]
    offers_workers = server_offers_workers()
    if offers_workers:
        worker_counts.append(WORKERS)
    with tempfile.TemporaryDirectory(prefix="kpisettle-bench-") as tmp:
        directory = Path(tmp)
        for kind in settings.databases:
            section = f"service·{kind}"
            for workers in worker_counts:
                try:
                    with database(kind, settings, directory) as url:
                        tokens = write_tokens(directory)
                        server = ServerProcess(url, tokens, workers)
                        try:
                            load_us_ruleset(server.target, tokens)
                            judge_batch = workers > 1 or not offers_workers
                            rows += measure_server(section, server, tokens, settings, workers, inputs, judge_batch)
                        finally:
                            server.stop()
                except Unavailable as reason:
                    rows.append(Row(section, "skipped", None, "", note=str(reason)))
                    break
    if not offers_workers:
        rows.append(Row("service", "--workers 2", None, "", note="skipped: `python -m server --help` does not offer --workers"))
    return rows
