"""`--workers N`: N server processes on one port, under one supervisor process (Linux).

Why processes: one Python process runs one thread of Python at a time, so one server uses
about one core; N processes use N. How: the way grpcio documents it
(examples/python/multiprocessing in grpc/grpc): one gRPC server per process, each binding
the same port with ``grpc.so_reuseport``, and no gRPC object in the process that creates
them. The workers here are *spawned* (fresh interpreters, not forks), so that rule holds
whatever the supervisor has imported, and a worker can be replaced at any time.

The supervisor

- reserves the port: a bind without SO_REUSEPORT proves that no other process has it,
  then a bound, never-listening SO_REUSEPORT socket holds it for the supervisor's life
  (port 0 is picked once, here; every worker binds that same port). The kernel gives a
  connection only to a listening socket, i.e. to a worker, chosen by a hash of the
  connection's addresses, so one client connection stays on one worker;
- starts the N workers, each a full `server.app.serve` (its own threads, its own database
  pool), and prints ``kpisettle listening on host:port`` once, when all are ready;
- forwards SIGTERM and SIGINT to every worker; each drains as a lone server does (health
  NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish); the supervisor exits 0 when
  every worker exited 0, otherwise 1;
- replaces a worker that exits unexpectedly, up to `Config.worker_restarts` times in any
  60 s; one more, and it stops the others and exits 1. Replacing is the default because the
  other workers keep serving meanwhile (the kernel stops sending connections to a closed
  listener), so one crash costs the host 1/N of its capacity for about a second instead of
  all of it; a crash loop is a lasting fault that only a restart of the whole unit (or a
  person) can handle, so then the orchestrator hears about it. ``--worker-restarts 0``
  hands every worker crash to the orchestrator. A worker that fails before it was first
  ready (database unreachable, bad certificate, …) stops the supervisor at once, exit 1.

Each worker holds one end of a pipe whose other end only the supervisor has (its
lifeline): when the supervisor is gone, even by SIGKILL, the worker reads end-of-file,
drains and exits, so no orphan keeps serving on the port.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from server.app import Config, configure_logging, serve

log = logging.getLogger("kpisettle.workers")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
RESTART_WINDOW_SECONDS = 60.0
#: On stop, workers get drain delay + grace + this before the supervisor kills them.
STOP_MARGIN_SECONDS = 15.0
POLL_SECONDS = 0.2


def reuse_port_problem() -> str | None:
    """Why several workers cannot share a port here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"several workers need Linux, where SO_REUSEPORT spreads connections over processes (this is {sys.platform}); run one process per container instead"
    if not hasattr(socket, "SO_REUSEPORT"):
        return "this Python has no SO_REUSEPORT"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                return "the kernel does not keep SO_REUSEPORT"
    except OSError as error:
        return f"the kernel refuses SO_REUSEPORT ({error})"
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host as written, port)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen wants host:port, not {listen!r}")
    return host, int(port)


class PortReservation:
    """The port every worker binds, held by this process while the workers run."""

    def __init__(self, listen: str) -> None:
        host, port = split_listen(listen)
        name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        addresses = list(dict.fromkeys((int(family), str(sockaddr[0])) for family, *_, sockaddr in infos))
        dual = len({family for family, _ in addresses}) > 1
        # Without SO_REUSEPORT the bind fails if any socket has the port, even one that would
        # share it; closing these unbound-from-peers sockets frees the port at once.
        probes = self._bind_all(addresses, port, reuse_port=False, v6_only=dual)
        self.port = probes[0].getsockname()[1]
        for sock in probes:
            sock.close()
        self.sockets = self._bind_all(addresses, self.port, reuse_port=True, v6_only=dual)
        self.listen = f"{host}:{self.port}"

    @staticmethod
    def _bind_all(addresses: list[tuple[int, str]], port: int, *, reuse_port: bool, v6_only: bool) -> list[socket.socket]:
        bound: list[socket.socket] = []
        try:
            for family, address in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                bound.append(sock)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and v6_only:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
                port = sock.getsockname()[1]  # port 0: the first bind picks it for all
        except OSError:
            for sock in bound:
                sock.close()
            raise
        return bound

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


# --------------------------------------------------------------------------- worker side


def _worker_main(config: Config, lifeline: Connection) -> None:
    """A spawned worker: one server until SIGTERM/SIGINT or until the supervisor is gone."""
    configure_logging(LOG_FORMAT)
    stop = threading.Event()

    def ready(port: int) -> None:
        try:
            lifeline.send(port)
        except OSError:
            log.warning("supervisor gone before this worker was ready: draining")
            stop.set()
            return
        threading.Thread(target=_watch_lifeline, args=(lifeline, stop), name="lifeline", daemon=True).start()

    sys.exit(serve(config, ready, stop))


def _watch_lifeline(lifeline: Connection, stop: threading.Event) -> None:
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()  # the supervisor never sends: this returns when its end is closed
    if not stop.is_set():
        log.warning("supervisor gone: draining")
        stop.set()


# --------------------------------------------------------------------------- supervisor side


@dataclass
class _Worker:
    slot: int
    pid: int
    process: SpawnProcess
    lifeline: Connection
    ready: bool = False


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """Starts, watches, replaces and stops the workers (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.stopping = threading.Event()
        self.signum = signal.SIGTERM
        self.restarts: collections.deque[float] = collections.deque()

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping.is_set():
            log.info("signal %s: draining all workers", signum)
            self.signum = signal.Signals(signum)
        self.stopping.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            reservation = PortReservation(self.config.listen)
        except (OSError, ValueError) as error:
            log.error("cannot listen on %s: %s", self.config.listen, error)
            return 1
        worker_config = replace(self.config, listen=reservation.listen, workers=1, reuse_port=True)
        try:
            for slot in range(self.config.workers):
                self.workers.append(self._spawn(slot, worker_config))
            if not self._wait_until_ready(reservation.port):
                return self._stop(failed=not self.stopping.is_set())
            print(f"kpisettle listening on {reservation.listen}", flush=True)
            log.info("%d workers ready on %s: pids %s", len(self.workers), reservation.listen, " ".join(str(w.pid) for w in self.workers))
            return self._watch(worker_config, reservation.port)
        finally:
            reservation.close()

    def _spawn(self, slot: int, config: Config) -> _Worker:
        ours, theirs = self.context.Pipe(duplex=True)
        # daemon: should the supervisor itself fail, multiprocessing's exit handler sends
        # the workers SIGTERM (a drain) instead of waiting for them for ever.
        process = self.context.Process(target=_worker_main, args=(config, theirs), name=f"kpisettle-worker-{slot}", daemon=True)
        process.start()
        theirs.close()  # only the worker holds this end now: its lifeline breaks when we go
        assert process.pid is not None  # started
        return _Worker(slot, process.pid, process, ours)

    def _poll(self, port: int) -> list[_Worker]:
        """Wait a moment; note workers that became ready; return the workers that exited."""
        waitables: list[Connection | int] = [w.process.sentinel for w in self.workers]
        waitables += [w.lifeline for w in self.workers if not w.ready]
        multiprocessing.connection.wait(waitables, timeout=POLL_SECONDS)
        for worker in self.workers:
            if not worker.ready and worker.lifeline.poll():
                try:
                    bound = worker.lifeline.recv()
                except (EOFError, OSError):
                    continue  # it exited: its sentinel says so
                if bound != port:  # cannot happen unless gRPC bound elsewhere
                    log.error("worker %d bound port %s, not %d", worker.pid, bound, port)
                    os.kill(worker.pid, signal.SIGKILL)
                    continue
                worker.ready = True
        return [w for w in self.workers if not w.process.is_alive()]

    def _wait_until_ready(self, port: int) -> bool:
        while not all(w.ready for w in self.workers):
            if self.stopping.is_set():
                return False
            for worker in self._poll(port):
                log.error("worker %d exited before it was ready (%s): stopping", worker.pid, describe_exit(worker.process.exitcode))
                self._forget(worker)
                return False
        return True

    def _watch(self, config: Config, port: int) -> int:
        while not self.stopping.is_set():
            was_ready = {w.pid for w in self.workers if w.ready}
            exited = self._poll(port)
            for worker in self.workers:
                if worker.ready and worker.pid not in was_ready:
                    log.info("worker %d ready (replacing one in slot %d)", worker.pid, worker.slot)
            for worker in exited:
                if self.stopping.is_set():
                    break
                what = describe_exit(worker.process.exitcode)
                now = time.monotonic()
                while self.restarts and now - self.restarts[0] > RESTART_WINDOW_SECONDS:
                    self.restarts.popleft()
                if len(self.restarts) >= config.worker_restarts:
                    log.error(
                        "worker %d exited (%s); %d replaced in the last %g s, --worker-restarts %d: stopping",
                        worker.pid,
                        what,
                        len(self.restarts),
                        RESTART_WINDOW_SECONDS,
                        config.worker_restarts,
                    )
                    self._forget(worker)
                    return self._stop(failed=True)
                self.restarts.append(now)
                self._forget(worker)
                replacement = self._spawn(worker.slot, config)
                self.workers.insert(worker.slot, replacement)
                log.warning("worker %d exited (%s): replaced by worker %d", worker.pid, what, replacement.pid)
        return self._stop(failed=False)

    def _forget(self, worker: _Worker) -> None:
        self.workers.remove(worker)
        worker.process.join()
        worker.lifeline.close()
        worker.process.close()

    def _stop(self, *, failed: bool) -> int:
        """Forward the signal to every worker, wait for their drains; 0 when all went well."""
        for worker in self.workers:
            if worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, self.signum)
        config = self.config
        deadline = time.monotonic() + config.drain_delay_seconds + config.grace_seconds + STOP_MARGIN_SECONDS
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process.is_alive():
                log.error("worker %d did not stop in time: killing it", worker.pid)
                worker.process.kill()
                worker.process.join()
                failed = True
            elif worker.process.exitcode != 0:
                if worker.ready:
                    log.error("worker %d stopped badly (%s)", worker.pid, describe_exit(worker.process.exitcode))
                    failed = True
                else:  # stopped while still starting: nothing was in flight there
                    log.info("worker %d stopped while starting (%s)", worker.pid, describe_exit(worker.process.exitcode))
            worker.lifeline.close()
        log.info("stopped" if not failed else "stopped after a failure")
        return 1 if failed else 0


def supervise(config: Config) -> int:
    """`python -m server --workers N` with N > 1 (server.app.main hands over here)."""
    configure_logging(LOG_FORMAT)
    return Supervisor(config).run()


__all__ = ["LOG_FORMAT", "PortReservation", "Supervisor", "reuse_port_problem", "split_listen", "supervise"]
