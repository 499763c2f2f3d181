"""Building and running the gRPC server: services, auth, health, reflection, TLS, SIGTERM.

`--workers N` (N > 1) hands over to server/workers.py: a supervisor process that runs N
copies of what `serve` runs here, all on one port.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kpisettle.v1 import ruleset_service_pb2, ruleset_service_pb2_grpc, settlement_service_pb2, settlement_service_pb2_grpc

from server.auth import AuthInterceptor, TokenBook
from server.gc_tuning import tune_for_serving
from server.ruleset_service import RulesetService
from server.settlement_service import SettlementService
from server.storage.interface import Store
from server.storage.sql import open_store
from server.versions import DEFAULT_COMPILED_CACHE_SIZE, VersionRegistry
from server.write_priority import WritePriority

log = logging.getLogger("kpisettle.server")

DEFAULT_DATABASE_URL = "sqlite:///var/kpisettle.db"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICES = (
    settlement_service_pb2.DESCRIPTOR.services_by_name["SettlementService"].full_name,
    ruleset_service_pb2.DESCRIPTOR.services_by_name["RulesetService"].full_name,
)


@dataclass
class Config:
    listen: str = "127.0.0.1:50051"
    database_url: str = DEFAULT_DATABASE_URL
    tokens_file: Path = Path("var/tokens.json")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    threads: int = 32
    max_concurrent_rpcs: int = 256
    max_message_bytes: int = MAX_MESSAGE_BYTES
    grace_seconds: float = 10.0
    #: On SIGTERM: health says NOT_SERVING and new calls get UNAVAILABLE for this long
    #: (so load balancers notice) before the server stops and drains in-flight calls.
    drain_delay_seconds: float = 0.5
    #: Connections older than this get a GOAWAY (±10 % jitter): the client opens a new one,
    #: through the load balancer or the kernel's SO_REUSEPORT choice, so load re-spreads to
    #: new workers and hosts. Calls in flight on the old connection run to the end. 0: never.
    max_connection_age_seconds: float = 300.0
    #: Server processes on this host (server/workers.py); 1 = this process serves alone.
    workers: int = 1
    #: Unexpected worker exits per minute that the supervisor replaces before it gives up.
    worker_restarts: int = 5
    #: Share the port with other processes (SO_REUSEPORT); only the workers of one supervisor
    #: do. A lone server refuses a port that another process already listens on.
    reuse_port: bool = False
    #: Compiled ruleset versions kept per process (~0.7 MiB each), least recently used out.
    compiled_cache_size: int = DEFAULT_COMPILED_CACHE_SIZE


def parse_args(argv: Sequence[str] | None = None) -> Config:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m server", description="The kpisettle gRPC service.")
    parser.add_argument("--listen", default=env.get("KPISETTLE_LISTEN", Config.listen), help="host:port (port 0 picks a free port)")
    parser.add_argument("--database-url", default=env.get("DATABASE_URL", DEFAULT_DATABASE_URL), help="SQLAlchemy URL; env DATABASE_URL")
    parser.add_argument(
        "--tokens-file", default=env.get("KPISETTLE_TOKENS_FILE", str(Config.tokens_file)), help="JSON file of hashed tokens"
    )
    parser.add_argument("--tls-cert", default=env.get("KPISETTLE_TLS_CERT"), help="PEM certificate chain; enables TLS")
    parser.add_argument("--tls-key", default=env.get("KPISETTLE_TLS_KEY"), help="PEM private key")
    parser.add_argument(
        "--tls-client-ca", default=env.get("KPISETTLE_TLS_CLIENT_CA"), help="PEM CA bundle; requires client certificates (mTLS)"
    )
    parser.add_argument("--threads", type=int, default=int(env.get("KPISETTLE_THREADS", Config.threads)))
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=float(env.get("KPISETTLE_GRACE_SECONDS", Config.grace_seconds)),
        help="on SIGTERM, how long in-flight calls may take to finish",
    )
    parser.add_argument(
        "--drain-delay-seconds",
        type=float,
        default=float(env.get("KPISETTLE_DRAIN_DELAY_SECONDS", Config.drain_delay_seconds)),
        help="on SIGTERM, how long health reports NOT_SERVING before the server stops",
    )
    parser.add_argument(
        "--max-connection-age-seconds",
        type=float,
        default=float(env.get("KPISETTLE_MAX_CONNECTION_AGE_SECONDS", Config.max_connection_age_seconds)),
        help="clients reconnect after this long (so load re-spreads over workers and hosts); 0 = never",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env.get("KPISETTLE_WORKERS", Config.workers)),
        help="server processes sharing the port (Linux SO_REUSEPORT); 1 = this process alone",
    )
    parser.add_argument(
        "--worker-restarts",
        type=int,
        default=int(env.get("KPISETTLE_WORKER_RESTARTS", Config.worker_restarts)),
        help="unexpected worker exits per minute that are replaced; one more and the supervisor stops and exits 1",
    )
    parser.add_argument(
        "--compiled-cache-size",
        type=int,
        default=int(env.get("KPISETTLE_COMPILED_CACHE_SIZE", Config.compiled_cache_size)),
        help="compiled ruleset versions kept in memory per process (about 0.7 MiB each); least recently used out",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.worker_restarts < 0:
        parser.error("--worker-restarts must not be negative")
    if args.compiled_cache_size < 1:
        parser.error("--compiled-cache-size must be at least 1")
    if args.max_connection_age_seconds < 0:
        parser.error("--max-connection-age-seconds must not be negative")
    if args.workers > 1:
        from server.workers import reuse_port_problem  # here: server.workers imports this module

        problem = reuse_port_problem()
        if problem:
            parser.error(f"--workers {args.workers}: {problem}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    return Config(
        listen=args.listen,
        database_url=args.database_url,
        tokens_file=Path(args.tokens_file),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
        threads=args.threads,
        grace_seconds=args.grace_seconds,
        drain_delay_seconds=args.drain_delay_seconds,
        max_connection_age_seconds=args.max_connection_age_seconds,
        workers=args.workers,
        worker_restarts=args.worker_restarts,
        compiled_cache_size=args.compiled_cache_size,
    )


class CannotListen(Exception):
    """The listen address is taken by another process, or cannot be bound at all."""


class Service:
    """A running server and what it owns."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        # Shared by the store and the settlement service (server.write_priority); a store
        # passed in marks its writes elsewhere, or not at all.
        self.write_priority = WritePriority()
        self.store = store or open_store(config.database_url, write_priority=self.write_priority)
        self.registry = VersionRegistry(self.store, compiled_cache_size=config.compiled_cache_size)
        self.health = health.HealthServicer()
        self.draining = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # gRPC turns SO_REUSEPORT on by default on Linux, so a second server started on a
            # taken port would silently get half of its connections; only workers share.
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        ]
        if config.max_connection_age_seconds > 0:
            options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="rpc"),
            interceptors=[AuthInterceptor(TokenBook.load(config.tokens_file), self.draining)],
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        settlements = SettlementService(self.store, self.registry, self.write_priority)
        settlement_service_pb2_grpc.add_SettlementServiceServicer_to_server(settlements, self.server)  # type: ignore[no-untyped-call]
        ruleset_service_pb2_grpc.add_RulesetServiceServicer_to_server(RulesetService(self.store, self.registry), self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            self.port = self._bind()
        except RuntimeError as error:  # gRPC's "Failed to bind to address …"
            raise CannotListen(f"cannot listen on {config.listen}: {error}") from error

    def _bind(self) -> int:
        config = self.config
        if config.tls_cert and config.tls_key:
            client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            return self.server.add_secure_port(config.listen, credentials)
        return self.server.add_insecure_port(config.listen)

    def start(self) -> None:
        self.server.start()
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def begin_drain(self) -> None:
        """Health says NOT_SERVING and new calls get UNAVAILABLE; in-flight calls go on."""
        self.draining.set()
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """Refuse new calls, let in-flight calls finish, then release everything (once)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.begin_drain()
        if drain_delay > 0:
            time.sleep(drain_delay)
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()
        self.registry.close()
        self.store.close()


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(fmt: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=os.environ.get("KPISETTLE_LOG_LEVEL", "INFO"), format=fmt)


def serve(config: Config, on_ready: Callable[[int], None], stop: threading.Event | None = None) -> int:
    """Run one server until SIGTERM/SIGINT (or `stop`), then drain; 0 when it stopped cleanly.

    `on_ready(port)` runs once the server accepts calls.
    """
    stopped = stop if stop is not None else threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not stopped.is_set():
            log.info("signal %s: draining", signum)
        stopped.set()

    # Handlers first: a SIGTERM that arrives while starting still drains and exits 0.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service = Service(config)
    except CannotListen as error:
        log.error("%s", error)
        return 1
    service.start()
    tune_for_serving()
    on_ready(service.port)
    # Wait with a timeout: a signal that lands on one of gRPC's threads only sets a flag,
    # and its Python handler runs when the main thread next wakes; a bare wait() could
    # sleep through SIGTERM for ever.
    while not stopped.wait(0.2):
        pass
    service.stop(drain_delay=config.drain_delay_seconds)
    log.info("stopped")
    return 0


def listen_host(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if config.workers > 1:
        from server.workers import supervise  # here: server.workers imports this module

        return supervise(config)
    configure_logging()

    def announce(port: int) -> None:
        # The first line says where to connect (tests read it); ports may be 0 = any free port.
        print(f"kpisettle listening on {listen_host(config.listen)}:{port}", flush=True)

    return serve(config, announce)


if __name__ == "__main__":
    sys.exit(main())
