"""`python -m server --workers N`: several server processes on one port (server/workers.py).

Which worker holds a connection is read from the kernel, the way an operator would with
`ss -tnp`: /proc/<pid>/fd names each socket a process holds and /proc/<pid>/net/tcp{,6}
the state and ports of every socket. A worker is a child of the supervisor that listens
on the service's port; a connection is served by the worker that holds its accepted end.
Nothing in the server exists for these tests. Every channel here opens its own connection
(`grpc.use_local_subchannel_pool`); channels of one process otherwise share one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from kpisettle.v1 import ruleset_service_pb2_grpc as rs_grpc
from kpisettle.v1 import settlement_service_pb2 as ss
from kpisettle.v1 import settlement_service_pb2_grpc as ss_grpc

from server.app import parse_args
from tests.server_harness import ROOT, RULESETS, Callers, Client, ServerProcess, us_input
from tests.test_service_security import Pki, pki_fixture  # noqa: F401  (the test CA and server certificate)

US_SOURCE = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
LISTEN, ESTABLISHED = "0A", "01"  # socket states in /proc/net/tcp
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux (SO_REUSEPORT)")


# --------------------------------------------------------------------------- what the kernel says


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, …
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _sockets(pid: int, port: int) -> list[tuple[str, int]]:
    """(state, peer port) of each TCP socket on local `port` that process `pid` holds."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if with_target.startswith("socket:["):
                inodes.add(with_target[8:-1])
        tables = [Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:] for name in ("tcp", "tcp6")]
    except OSError:
        return []  # exited meanwhile
    out = []
    for row in (line.split() for table in tables for line in table):
        local, remote, state, inode = row[1], row[2], row[3], row[9]
        if inode in inodes and int(local.rsplit(":", 1)[1], 16) == port:
            out.append((state, int(remote.rsplit(":", 1)[1], 16)))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Workers(ServerProcess):
    """`python -m server --workers N` as a child process, with what the kernel says about it."""

    def __init__(self, database_url: str, tokens_file: Path, *extra: str, workers: int = 2) -> None:
        super().__init__(database_url, tokens_file, "--workers", str(workers), "--drain-delay-seconds", "0.2", *extra)

    def worker_pids(self) -> set[int]:
        """The supervisor's children that listen on the service's port."""
        return {pid for pid in _children(self.process.pid) if any(state == LISTEN for state, _ in _sockets(pid, self.port))}

    def connections(self) -> dict[int, set[int]]:
        """Worker pid → the peer (client) ports of the connections it serves."""
        return {pid: {peer for state, peer in _sockets(pid, self.port) if state == ESTABLISHED} for pid in self.worker_pids()}


class OwnConnection(Client):
    """A client whose channel opens a connection of its own."""

    def __init__(self, target: str, callers: Callers, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.callers = callers
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target, options)
        self.settlements = ss_grpc.SettlementServiceStub(self.channel)
        self.rulesets = rs_grpc.RulesetServiceStub(self.channel)


def spread_clients(server: Workers, callers: Callers, per_worker: int) -> list[OwnConnection]:
    """Fresh connections until each worker serves at least `per_worker` of them (the kernel hashes; bounded)."""
    clients: list[OwnConnection] = []
    for _ in range(64):
        client = OwnConnection(server.target, callers)
        client.call("ListSettlements", ss.ListSettlementsRequest(page_size=1), "billing")  # connects
        clients.append(client)
        served = server.connections()
        if len(served) == 2 and min(len(peers) for peers in served.values()) >= per_worker:
            return clients
    raise AssertionError(f"64 connections, and not {per_worker} on each worker: {server.connections()}")


@pytest.fixture(name="callers")
def callers_fixture() -> Callers:
    return Callers.fresh()


@pytest.fixture(name="tokens_file")
def tokens_file_fixture(callers: Callers, tmp_path: Path) -> Path:
    return callers.write(tmp_path / "tokens.json")


@pytest.fixture(name="workers")
def workers_fixture(database_url: str, tokens_file: Path) -> Iterator[Workers]:
    server = Workers(database_url, tokens_file)
    try:
        yield server
    finally:
        server.kill()


def listed(client: Client) -> list[str]:
    names: list[str] = []
    token = ""
    for _ in range(100):
        page = client.call("ListSettlements", ss.ListSettlementsRequest(page_size=100, page_token=token), "billing")
        names += [s.name for s in page.settlements]
        token = page.next_page_token
        if not token:
            return names
    raise AssertionError("the list never ended")


# --------------------------------------------------------------------------- tests


def test_two_workers_serve_connections_and_settle_each_request_once_then_drain_on_sigterm(workers: Workers, callers: Callers) -> None:
    pids = workers.worker_pids()
    assert len(pids) == 2 and workers.process.pid not in pids, pids
    clients = spread_clients(workers, callers, per_worker=3)
    served = workers.connections()
    assert sum(len(peers) for peers in served.values()) == len(clients), served  # one connection per channel, no other
    clients[0].create_and_approve(US_SOURCE)

    # Every channel settles every request id, each in another order: each id reaches both workers at once.
    ids = [f"overlap-{k}" for k in range(12)]
    barrier = threading.Barrier(len(clients))

    def settle_all(n: int) -> list[tuple[str, ss.SettleResponse]]:
        client = clients[n]
        barrier.wait(30)
        order = ids[n % len(ids) :] + ids[: n % len(ids)]
        return [(rid, client.settle(rid, us_input(contract_id=f"C-{rid}"))) for rid in order]

    with ThreadPoolExecutor(len(clients)) as pool:
        answers = [answer for answers in pool.map(settle_all, range(len(clients))) for answer in answers]
    assert workers.connections() == served  # the calls went over the same connections, on both workers

    by_id: dict[str, list[ss.SettleResponse]] = {rid: [] for rid in ids}
    for rid, response in answers:
        by_id[rid].append(response)
    for rid, responses in by_id.items():
        assert len(responses) == len(clients)
        assert len({r.settlement.name for r in responses}) == 1, rid
        assert sum(not r.deduplicated for r in responses) == 1, rid
        assert {r.settlement.total.amount for r in responses} == {"11750.00"}, rid
    assert sorted(listed(clients[0])) == sorted(r[0].settlement.name for r in by_id.values())
    verified = clients[0].call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")
    assert verified.ok and verified.records_checked == 3 + len(ids), verified

    # SIGTERM to the supervisor: streams in flight on every connection (so on both workers) finish.
    outcomes = drain_streams(workers, clients)
    assert workers.process.wait(60) == 0, workers.output()
    for n, outcome in enumerate(outcomes):
        assert isinstance(outcome, list), f"stream {n} failed: {outcome!r}"
        assert [r.request_id for r in outcome] == [f"drain-{n}-{m}" for m in range(3)]
        assert all(r.settlement.total.amount == "11750.00" for r in outcome), outcome
    for client in clients:
        client.close()
    output = workers.output()
    assert output.count("kpisettle listening on ") == 1, output
    for pid in pids:
        assert not alive(pid)
        assert f"kpisettle.server[{pid}]: signal 15: draining" in output, output
        assert f"kpisettle.server[{pid}]: stopped" in output, output


def drain_streams(server: Workers, clients: list[OwnConnection]) -> list[list[ss.SettleBatchResult] | BaseException]:
    """One SettleBatch stream per client; SIGTERM after each got its first answer; the rest is sent after."""
    sigterm_sent = threading.Event()
    first_answers = [threading.Event() for _ in clients]
    outcomes: list[list[ss.SettleBatchResult] | BaseException] = [[] for _ in clients]

    def requests(n: int) -> Iterator[ss.SettleBatchRequest]:
        for m in range(3):
            if m == 1:
                assert sigterm_sent.wait(30)
                time.sleep(0.3)  # past the drain delay: the server is stopping now
            yield ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id=f"drain-{n}-{m}", input=us_input(f"C-drain-{n}-{m}"))])

    def run(n: int) -> None:
        client = clients[n]
        try:
            for answer in client.settlements.SettleBatch(requests(n), metadata=client.callers["erp"].metadata, timeout=60):
                results = outcomes[n]
                assert isinstance(results, list)
                results.extend(answer.results)
                first_answers[n].set()
        except BaseException as error:  # reported by the caller
            outcomes[n] = error
            first_answers[n].set()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for event in first_answers:
        assert event.wait(30)
    server.process.send_signal(signal.SIGTERM)
    sigterm_sent.set()
    for thread in threads:
        thread.join(60)
    return outcomes


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_killed_worker_is_replaced_until_the_restart_budget_is_spent(database_url: str, tokens_file: Path, callers: Callers) -> None:
    server = Workers(database_url, tokens_file, "--worker-restarts", "1")
    try:
        first, second = sorted(server.worker_pids())
        os.kill(first, signal.SIGKILL)
        # Once it is gone, the other worker serves every new connection. (A connection that
        # arrives while the kernel tears the dead listener down is reset: clients retry that.)
        # Gone means reaped by the supervisor: a zombie leader's other threads may still hold
        # the listening socket, but a process is reaped only after all its threads exited.
        wait_for(lambda: not Path(f"/proc/{first}").exists(), "the killed worker to be reaped")
        client = OwnConnection(server.target, callers)
        client.create_and_approve(US_SOURCE)
        assert client.settle("while-one-is-down", us_input()).settlement.total.amount == "11750.00"
        client.close()
        wait_for(lambda: len(server.worker_pids() - {first, second}) == 1 and second in server.worker_pids(), "a replacement worker")
        (replacement,) = server.worker_pids() - {second}
        wait_for(lambda: f"worker {replacement} ready" in server.output(), "the replacement to be ready")
        assert f"worker {first} exited (killed by SIGKILL): replaced by worker {replacement}" in server.output()
        clients = spread_clients(server, callers, per_worker=1)  # the replacement serves connections too
        assert replacement in server.connections()
        assert [c.settle("after", us_input()).deduplicated for c in clients] == [False] + [True] * (len(clients) - 1)
        for c in clients:
            c.close()

        # A second death within the minute: a crash loop. The other worker drains, exit 1.
        os.kill(replacement, signal.SIGKILL)
        assert server.process.wait(30) == 1
        assert not alive(second)
        output = server.output()
        assert f"worker {replacement} exited (killed by SIGKILL); 1 replaced in the last 60 s, --worker-restarts 1: stopping" in output
        assert f"kpisettle.server[{second}]: stopped" in output, output
    finally:
        server.kill()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_workers_stop_when_the_supervisor_is_killed(workers: Workers) -> None:
    pids = workers.worker_pids()
    assert len(pids) == 2
    workers.kill()  # SIGKILL: no chance to forward anything
    wait_for(lambda: not any(alive(pid) for pid in pids), "the orphaned workers to exit")


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "server", "--workers", "2", "--listen", "127.0.0.1:0"]
    command += ["--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}", "--tokens-file", str(tmp_path / "missing.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "kpisettle listening on" not in done.stdout
    assert "exited before it was ready (exit status 1): stopping" in done.stderr, done.stderr
    assert "missing.json" in done.stderr


def test_a_taken_port_is_refused_by_workers_and_by_a_lone_server(tmp_path: Path, tokens_file: Path) -> None:
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = ServerProcess(database, tokens_file, "--drain-delay-seconds", "0")
    try:
        for workers in ("2", "1"):
            command = [sys.executable, "-m", "server", "--workers", workers, "--listen", first.target]
            command += ["--database-url", database, "--tokens-file", str(tokens_file)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 1, (workers, done.stdout, done.stderr)
            assert "kpisettle listening on" not in done.stdout
            assert f"cannot listen on {first.target}" in done.stderr, done.stderr
        assert first.terminate() == 0
    finally:
        first.kill()


def test_over_tls_one_channel_reaches_both_workers_by_reconnecting_at_the_maximum_connection_age(tmp_path: Path, pki: Pki) -> None:
    callers = Callers.fresh()
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--max-connection-age-seconds", "0.5")
    server = Workers(f"sqlite:///{tmp_path / 'db.sqlite'}", callers.write(tmp_path / "tokens.json"), *tls)
    try:
        client = OwnConnection(server.target, callers, grpc.ssl_channel_credentials(root_certificates=pki.ca))
        seen: set[tuple[int, int]] = set()  # (worker pid, client port): one per connection
        deadline = time.monotonic() + 60
        while len({pid for pid, _ in seen}) < 2:  # each reconnection lands on either worker
            assert time.monotonic() < deadline, seen
            client.call("ListSettlements", ss.ListSettlementsRequest(page_size=1), "billing", timeout=10)  # none fails
            seen |= {(pid, peer) for pid, peers in server.connections().items() for peer in peers}
            time.sleep(0.05)
        client.close()
        assert server.terminate() == 0
    finally:
        server.kill()


def test_several_workers_are_refused_where_connections_cannot_be_spread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")  # SO_REUSEPORT exists there but does not spread connections
    with pytest.raises(SystemExit) as exited:
        parse_args(["--workers", "2"])
    assert exited.value.code == 2
    assert "--workers 2: several workers need Linux" in capsys.readouterr().err
    assert parse_args(["--workers", "1"]).workers == 1


def test_worker_options_are_checked() -> None:
    assert parse_args(["--workers", "4"]).workers == 4
    assert parse_args([]).workers == 1
    assert parse_args([]).max_connection_age_seconds == 300
    for wrong in (["--workers", "0"], ["--worker-restarts", "-1"], ["--max-connection-age-seconds", "-1"]):
        with pytest.raises(SystemExit) as exited:
            parse_args(wrong)
        assert exited.value.code == 2
