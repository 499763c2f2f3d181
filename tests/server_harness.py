"""A real kpisettle server on a real port (port 0) for the service tests, on SQLite and PostgreSQL.

`running_service` starts the server in this process (real TCP, generated stubs, the
interceptor chain); `ServerProcess` runs `python -m server` as a child process for tests
that need restarts or signals. Each test gets its own tenants, so tests can share the
session's PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import ruleset_service_pb2_grpc as rs_grpc
from kpisettle.v1 import settlement_service_pb2 as ss
from kpisettle.v1 import settlement_service_pb2_grpc as ss_grpc

from server.app import Config, Service
from server.auth import ROLES, hash_token

ROOT = Path(__file__).resolve().parent.parent
RULESETS = ROOT / "rulesets"


@dataclass(frozen=True)
class Caller:
    token: str
    principal: str
    tenant: str
    roles: tuple[str, ...]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


@dataclass
class Callers:
    """One caller per role in the main tenant, plus a second admin and callers of another tenant."""

    tenant: str
    other_tenant: str
    by_name: dict[str, Caller] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Caller:
        return self.by_name[name]

    @classmethod
    def fresh(cls) -> Callers:
        suffix = secrets.token_hex(4)
        callers = cls(tenant=f"acme-{suffix}", other_tenant=f"globex-{suffix}")
        for role in ROLES:
            callers.add(role, f"{role}-user", callers.tenant, (role,))
            callers.add(f"other-{role}", f"other-{role}-user", callers.other_tenant, (role,))
        callers.add("compliance2", "second-compliance-user", callers.tenant, ("compliance",))
        callers.add("admin-compliance", "admin-compliance-user", callers.tenant, ("admin", "compliance"))
        return callers

    def add(self, name: str, principal: str, tenant: str, roles: tuple[str, ...]) -> None:
        self.by_name[name] = Caller(f"tok-{name}-{secrets.token_hex(8)}", principal, tenant, roles)

    def write(self, path: Path) -> Path:
        rows = [
            {"sha256": hash_token(c.token), "principal": c.principal, "tenant": c.tenant, "roles": list(c.roles)}
            for c in self.by_name.values()
        ]
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path


class Client:
    """Generated stubs over one channel, with the caller's token attached per call."""

    def __init__(self, target: str, callers: Callers, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.callers = callers
        self.channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self.settlements = ss_grpc.SettlementServiceStub(self.channel)
        self.rulesets = rs_grpc.RulesetServiceStub(self.channel)

    def call(self, rpc: str, request: Any, as_: str, timeout: float = 30) -> Any:
        stub = self.settlements if hasattr(self.settlements, rpc) else self.rulesets
        return getattr(stub, rpc)(request, metadata=self.callers[as_].metadata, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    # -- conveniences used by many tests

    def create_and_approve(self, source: str, author: str = "admin", approver: str = "compliance") -> pb.RulesetVersion:
        created = self.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=source), author).ruleset_version
        return self.call("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=created.name), approver).ruleset_version

    def load_shipped_rulesets(self) -> list[pb.RulesetVersion]:
        return [self.create_and_approve(path.read_text(encoding="utf-8")) for path in sorted(RULESETS.glob("*.yaml"))]

    def settle(self, request_id: str, input: pb.SettlementInput, as_: str = "erp", **extra: Any) -> ss.SettleResponse:
        return self.call("Settle", ss.SettleRequest(request_id=request_id, input=input, **extra), as_)


def us_input(
    contract_id: str = "C-1", gross_gmv: str = "130000", period: tuple[int, int] = (2026, 3), **metrics: str
) -> pb.SettlementInput:
    """An input for rulesets/us-managed-standard.yaml (its first example's metrics by default)."""
    values = {
        "gross_gmv": gross_gmv,
        "refunds": "5000",
        "ad_spend": "20000",
        "ad_sales": "100000",
        "orders": "2000",
        "defective_orders": "4",
        "response_hours": "6",
        **metrics,
    }
    message = pb.SettlementInput(
        contract_id=contract_id,
        seller_id="S-1",
        market="US",
        ruleset="rulesets/us-managed-standard",
        params={"gmv_target": "100000"},
    )
    message.period_start_date.year, message.period_start_date.month, message.period_start_date.day = period[0], period[1], 1
    for name, value in values.items():
        message.metrics[name].value = value
    return message


@dataclass
class Running:
    service: Service
    client: Client
    callers: Callers
    database_url: str
    tokens_file: Path


def running_service(database_url: str, tmp_path: Path, callers: Callers | None = None) -> Iterator[Running]:
    callers = callers or Callers.fresh()
    tokens = callers.write(tmp_path / f"tokens-{secrets.token_hex(3)}.json")
    service = Service(Config(listen="127.0.0.1:0", database_url=database_url, tokens_file=tokens, grace_seconds=2))
    service.start()
    client = Client(f"127.0.0.1:{service.port}", callers)
    try:
        yield Running(service, client, callers, database_url, tokens)
    finally:
        client.close()
        service.stop(grace=1)


@pytest.fixture(name="running")
def running_fixture(database_url: str, tmp_path: Path) -> Iterator[Running]:
    """A server with its own tenants on this test's database (SQLite file or PostgreSQL)."""
    yield from running_service(database_url, tmp_path)


class ServerProcess:
    """`python -m server` as a child process on a free port; always stopped by the test."""

    def __init__(self, database_url: str, tokens_file: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        command = [
            sys.executable,
            "-m",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--tokens-file",
            str(tokens_file),
            *extra,
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        self._lines: list[str] = []
        self._started = threading.Event()
        # drain the pipe all the time, so that a chatty server never blocks on a full pipe
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_for_port()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)
            if line.startswith("kpisettle listening on "):
                self._started.set()
        self._started.set()

    def _wait_for_port(self) -> int:
        self._started.wait(60)
        for line in self._lines:
            if line.startswith("kpisettle listening on "):
                return int(line.rsplit(":", 1)[1])
        self.kill()
        raise RuntimeError("the server did not start:\n" + "".join(self._lines))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 30) -> int:
        self.process.terminate()
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        """Everything the process printed (complete once it has exited)."""
        if self.process.poll() is not None:
            self._reader.join(10)
        return "".join(self._lines)


__all__ = [
    "Caller",
    "Callers",
    "Client",
    "Running",
    "ServerProcess",
    "running_fixture",
    "running_service",
    "us_input",
]
