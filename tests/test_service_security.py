"""Security of the service (SPEC §9, §7) over a real port.

The role × RPC matrix (every RPC against every role and against missing, wrong and
malformed tokens), another tenant's data, public health and reflection, deny by default,
tokens never logged, TLS and mutual TLS, deadlines, bounded message sizes and the SIGTERM
drain.

Auth does not touch storage, so the matrix, health, reflection, TLS and size tests run on
SQLite only (one server for the module); what depends on storage (tenants, deadlines on
writes, the drain with its audit chain) runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from server.app import Config, Service, parse_args
from server.auth import PERMISSIONS, AuthInterceptor, Principal, TokenBook, allowed_roles, bearer_token, hash_token
from tests.server_harness import RULESETS, Callers, Client, Running, ServerProcess, running_service, us_input

US_SOURCE = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
US = "rulesets/us-managed-standard"
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

# --------------------------------------------------------------------------- the matrix

#: SPEC §9, written out here on purpose (not imported from server.auth), so that a wrong
#: PERMISSIONS entry fails the matrix. erp: settle, simulate, read settlements; billing:
#: read settlements and breakdowns; compliance: read rulesets, approve, retire, diff,
#: impact, replay, verify, explain; admin: create ruleset versions. ValidateRuleset (not
#: named in §9; it stores and reads nothing) goes with creating (admin) and reviewing
#: (compliance) a ruleset text.
EXPECTED_ROLES: dict[str, frozenset[str]] = {
    "Settle": frozenset({"erp"}),
    "SettleBatch": frozenset({"erp"}),
    "Simulate": frozenset({"erp"}),
    "GetSettlement": frozenset({"erp", "billing", "compliance"}),
    "ListSettlements": frozenset({"erp", "billing", "compliance"}),
    "GetFeeBreakdown": frozenset({"billing"}),
    "ExplainSettlement": frozenset({"compliance"}),
    "ReplaySettlement": frozenset({"compliance"}),
    "VerifyAuditLog": frozenset({"compliance"}),
    "ValidateRuleset": frozenset({"admin", "compliance"}),
    "CreateRulesetVersion": frozenset({"admin"}),
    "ApproveRulesetVersion": frozenset({"compliance"}),
    "RetireRulesetVersion": frozenset({"compliance"}),
    "GetRulesetVersion": frozenset({"compliance", "admin"}),
    "ListRulesetVersions": frozenset({"compliance", "admin"}),
    "DiffRulesetVersions": frozenset({"compliance"}),
    "AnalyzeImpact": frozenset({"compliance"}),
}
ROLES = ("erp", "billing", "compliance", "admin")
#: Who calls: a role's caller, or a bad credential → the metadata it sends (built per world).
BAD_CREDENTIALS = ("no-token", "wrong-token", "basic-scheme", "bearer-empty", "bearer-blank", "two-headers")
WHO = (*BAD_CREDENTIALS, *ROLES)

SERVICE_METHODS = {
    **{m.name: f"/{m.containing_service.full_name}/{m.name}" for m in ss.DESCRIPTOR.services_by_name["SettlementService"].methods},
    **{m.name: f"/{m.containing_service.full_name}/{m.name}" for m in rs.DESCRIPTOR.services_by_name["RulesetService"].methods},
}


def test_the_table_covers_every_rpc_and_permissions_names_only_real_methods() -> None:
    assert len(SERVICE_METHODS) == 17
    assert set(EXPECTED_ROLES) == set(SERVICE_METHODS)
    assert set(PERMISSIONS) == set(SERVICE_METHODS.values()), "PERMISSIONS names a method that does not exist, or misses one"


@dataclass
class World:
    """One SQLite server for the module with a settlement and three ruleset versions in its tenant."""

    running: Running
    settlement: str
    approved: str
    draft: str
    to_retire: str

    @property
    def client(self) -> Client:
        return self.running.client

    def metadata(self, who: str) -> tuple[tuple[str, str], ...]:
        if who not in BAD_CREDENTIALS:
            return self.running.callers[who].metadata
        token = self.running.callers["erp"].token  # valid, but not sent as one Bearer header
        return {
            "no-token": (),
            "wrong-token": (("authorization", "Bearer tok-wrong-0123456789abcdef"),),
            "basic-scheme": (("authorization", f"Basic {token}"),),
            "bearer-empty": (("authorization", "Bearer"),),
            "bearer-blank": (("authorization", "Bearer    "),),
            "two-headers": (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")),
        }[who]

    def request(self, rpc: str) -> Any:
        """A minimal valid request for each RPC, on this world's objects."""
        period = (datetime.date(2026, 1, 1), datetime.date(2026, 12, 1))
        return {
            "Settle": lambda: ss.SettleRequest(request_id="matrix-settle", input=us_input(contract_id="C-matrix")),
            "SettleBatch": lambda: ss.SettleBatchRequest(
                items=[ss.SettleBatchItem(request_id="matrix-batch", input=us_input(contract_id="C-batch"))]
            ),
            "Simulate": lambda: ss.SimulateRequest(input=us_input()),
            "GetSettlement": lambda: ss.GetSettlementRequest(name=self.settlement),
            "ListSettlements": lambda: ss.ListSettlementsRequest(),
            "GetFeeBreakdown": lambda: ss.GetFeeBreakdownRequest(name=self.settlement),
            "ExplainSettlement": lambda: ss.ExplainSettlementRequest(name=self.settlement, language_code="en"),
            "ReplaySettlement": lambda: ss.ReplaySettlementRequest(name=self.settlement),
            "VerifyAuditLog": lambda: ss.VerifyAuditLogRequest(),
            "ValidateRuleset": lambda: rs.ValidateRulesetRequest(source=US_SOURCE),
            "CreateRulesetVersion": lambda: rs.CreateRulesetVersionRequest(source=US_SOURCE),
            "ApproveRulesetVersion": lambda: rs.ApproveRulesetVersionRequest(name=self.draft),
            "RetireRulesetVersion": lambda: rs.RetireRulesetVersionRequest(name=self.to_retire),
            "GetRulesetVersion": lambda: rs.GetRulesetVersionRequest(name=self.approved),
            "ListRulesetVersions": lambda: rs.ListRulesetVersionsRequest(parent="rulesets/-"),
            "DiffRulesetVersions": lambda: rs.DiffRulesetVersionsRequest(name=self.approved, other_name=self.draft),
            "AnalyzeImpact": lambda: rs.AnalyzeImpactRequest(
                candidate=self.draft, period_start_from_date=date_message(period[0]), period_start_to_date=date_message(period[1])
            ),
        }[rpc]()

    def call(self, rpc: str, who: str, timeout: float = 30) -> grpc.RpcError | None:
        """None when the call succeeded, else its error."""
        return call_error(self.client, rpc, self.request(rpc), self.metadata(who), timeout)


def date_message(day: datetime.date) -> date_pb2.Date:
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)


def call_error(client: Client, rpc: str, request: Any, metadata: Any, timeout: float = 30) -> grpc.RpcError | None:
    stub = client.settlements if hasattr(client.settlements, rpc) else client.rulesets
    try:
        if rpc == "SettleBatch":
            list(stub.SettleBatch(iter([request]), metadata=metadata, timeout=timeout))
        else:
            getattr(stub, rpc)(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as error:
        return error
    return None


def code(error: grpc.RpcError | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if error is None else error.code()


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} {error.details()} carries no google.rpc.Status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"{error.code()} {error.details()} has no ErrorInfo")


def expect(code_: grpc.StatusCode, call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    assert caught.value.code() == code_, f"{caught.value.code()}: {caught.value.details()}"
    return caught.value


@contextlib.contextmanager
def sqlite_server(tmp_path: Path, callers: Callers | None = None) -> Iterator[Running]:
    yield from running_service(f"sqlite:///{tmp_path / 'kpisettle.db'}", tmp_path, callers)


@pytest.fixture(scope="module", name="world")
def world_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with sqlite_server(tmp_path_factory.mktemp("security")) as running:
        client = running.client
        approved = client.create_and_approve(US_SOURCE).name
        draft = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=US_SOURCE), "admin").ruleset_version.name
        to_retire = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=US_SOURCE), "admin").ruleset_version.name
        settlement = client.settle("world-1", us_input()).settlement.name
        yield World(running, settlement, approved, draft, to_retire)


# Auth reads metadata and PERMISSIONS only, never storage: the matrix runs on SQLite alone.
@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("rpc", sorted(EXPECTED_ROLES))
def test_role_matrix(world: World, rpc: str, who: str) -> None:
    error = world.call(rpc, who)
    if who in BAD_CREDENTIALS:
        assert code(error) == grpc.StatusCode.UNAUTHENTICATED, (rpc, who, code(error))
        assert error is not None and reason(error) == "UNAUTHENTICATED"
    elif who in EXPECTED_ROLES[rpc]:
        assert code(error) not in DENIED, (rpc, who, code(error), error and error.details())
    else:
        assert code(error) == grpc.StatusCode.PERMISSION_DENIED, (rpc, who, code(error))
        assert error is not None and reason(error) == "ROLE_NOT_PERMITTED"


def test_allowed_calls_are_served(world: World) -> None:
    """Every RPC answers OK to a role that may call it (the matrix requests are valid)."""
    # Approve and Retire change their version's state, so they are checked by the matrix alone.
    for rpc in sorted(set(EXPECTED_ROLES) - {"ApproveRulesetVersion", "RetireRulesetVersion"}):
        for role in sorted(EXPECTED_ROLES[rpc]):
            error = world.call(rpc, role)
            assert error is None, (rpc, role, code(error), error and error.details())


def test_a_caller_with_two_roles_gets_the_union(world: World) -> None:
    client = world.client
    assert (
        call_error(client, "CreateRulesetVersion", world.request("CreateRulesetVersion"), client.callers["admin-compliance"].metadata)
        is None
    )
    assert call_error(client, "GetRulesetVersion", world.request("GetRulesetVersion"), client.callers["admin-compliance"].metadata) is None
    denied = call_error(client, "Settle", world.request("Settle"), client.callers["admin-compliance"].metadata)
    assert code(denied) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),  # the scheme is case-insensitive (RFC 7235)
        ("  Bearer   abc  ", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("abc", None),
        ("Bearer a b", None),
        ("Bearerabc", None),
    ],
)
def test_bearer_token_parsing(header: str, token: str | None) -> None:
    assert bearer_token([("authorization", header)]) == token
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token([("authorization", "Bearer abc"), ("authorization", "Bearer abc")]) is None


# --------------------------------------------------------------------------- deny by default


def test_a_method_not_in_permissions_is_denied_to_every_role(tmp_path: Path) -> None:
    """An RPC someone registers without a PERMISSIONS entry is denied, even to a caller with every role."""
    for method in ("/kpisettle.v1.SettlementService/DropAllTables", "/kpisettle.v1.Internal/Debug"):
        assert allowed_roles(method) == frozenset()
    everything = Principal("root", "t", frozenset(ROLES))
    book = TokenBook({hash_token("all-roles-token"): everything})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[AuthInterceptor(book)])
    reached: list[str] = []

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        reached.append("called")
        return b"done"

    for service, name in (("kpisettle.v1.SettlementService", "DropAllTables"), ("kpisettle.v1.Internal", "Debug")):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {name: grpc.unary_unary_rpc_method_handler(handler)}),)
        )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("/kpisettle.v1.SettlementService/DropAllTables", "/kpisettle.v1.Internal/Debug"):
                call = channel.unary_unary(method)
                expect(
                    grpc.StatusCode.PERMISSION_DENIED,
                    lambda call=call: call(b"x", metadata=(("authorization", "Bearer all-roles-token"),), timeout=10),
                )
                expect(grpc.StatusCode.UNAUTHENTICATED, lambda call=call: call(b"x", timeout=10))
        assert reached == []
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- tenants


def test_another_tenants_data_is_not_found(running: Running) -> None:
    client = running.client
    approved = client.create_and_approve(US_SOURCE).name
    draft = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=US_SOURCE), "admin").ruleset_version.name
    settlement = client.settle("shared-request-id", us_input()).settlement.name
    verified_a = client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")
    assert verified_a.ok and verified_a.records_checked == 2 + 3 + 1  # two versions, three events, one settlement

    period = (date_message(datetime.date(2026, 1, 1)), date_message(datetime.date(2026, 12, 1)))
    not_found: list[tuple[str, Any, str]] = [
        ("GetSettlement", ss.GetSettlementRequest(name=settlement), "other-erp"),
        ("GetSettlement", ss.GetSettlementRequest(name=settlement), "other-billing"),
        ("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=settlement), "other-billing"),
        ("ExplainSettlement", ss.ExplainSettlementRequest(name=settlement), "other-compliance"),
        ("ReplaySettlement", ss.ReplaySettlementRequest(name=settlement), "other-compliance"),
        ("GetRulesetVersion", rs.GetRulesetVersionRequest(name=approved), "other-compliance"),
        ("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=draft), "other-compliance"),
        ("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=approved), "other-compliance"),
        ("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=approved, other_name=draft), "other-compliance"),
        (
            "AnalyzeImpact",
            rs.AnalyzeImpactRequest(candidate=draft, period_start_from_date=period[0], period_start_to_date=period[1]),
            "other-compliance",
        ),
    ]
    covered = set()  # every RPC is tried by the other tenant below
    for rpc, request, who in not_found:
        expect(grpc.StatusCode.NOT_FOUND, lambda rpc=rpc, request=request, who=who: client.call(rpc, request, who))
        covered.add(rpc)
    # Tenant B has no approved ruleset: A's version does not settle or simulate for B, not even
    # with A's request_id (which would return A's decision if ids were shared).
    for rpc, request in (
        ("Settle", ss.SettleRequest(request_id="shared-request-id", input=us_input())),
        ("Simulate", ss.SimulateRequest(input=us_input())),
    ):
        error = call_error(client, rpc, request, running.callers["other-erp"].metadata)
        assert code(error) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), (rpc, code(error))
        covered.add(rpc)
    batch = ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id="shared-request-id", input=us_input())])
    (answer,) = client.settlements.SettleBatch(iter([batch]), metadata=running.callers["other-erp"].metadata, timeout=30)
    (result,) = answer.results
    assert result.WhichOneof("result") == "error" and result.error.code == grpc.StatusCode.NOT_FOUND.value[0], result
    covered.add("SettleBatch")
    # Validating reads nothing stored: B's report of the same text is A's, naming nothing of A's.
    report_a = client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=US_SOURCE), "admin")
    assert client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=US_SOURCE), "other-admin") == report_a
    covered.add("ValidateRuleset")
    for who in ("other-erp", "other-billing"):
        assert list(client.call("ListSettlements", ss.ListSettlementsRequest(), who).settlements) == []
        assert list(client.call("ListSettlements", ss.ListSettlementsRequest(contract_id="C-1"), who).settlements) == []
    for parent in ("rulesets/-", US):
        assert (
            list(client.call("ListRulesetVersions", rs.ListRulesetVersionsRequest(parent=parent), "other-compliance").ruleset_versions)
            == []
        )
    verified_b = client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "other-compliance")
    assert verified_b.ok and verified_b.records_checked == 0
    covered |= {"ListSettlements", "ListRulesetVersions", "VerifyAuditLog"}

    # B's own ruleset and the same request_id: B's own numbering and a new settlement, not A's.
    own = client.create_and_approve(US_SOURCE, author="other-admin", approver="other-compliance")
    assert own.name == f"{US}/versions/1"
    covered.add("CreateRulesetVersion")
    assert covered == set(EXPECTED_ROLES), set(EXPECTED_ROLES) - covered
    settled_b = client.settle("shared-request-id", us_input(), as_="other-erp")
    assert not settled_b.deduplicated and settled_b.settlement.name != settlement
    assert [s.name for s in client.call("ListSettlements", ss.ListSettlementsRequest(), "other-billing").settlements] == [
        settled_b.settlement.name
    ]
    expect(grpc.StatusCode.NOT_FOUND, lambda: client.call("GetSettlement", ss.GetSettlementRequest(name=settled_b.settlement.name), "erp"))
    verified_b = client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "other-compliance")
    assert verified_b.ok and verified_b.records_checked == 1 + 2 + 1
    assert client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance").records_checked == verified_a.records_checked
    assert client.call("GetRulesetVersion", rs.GetRulesetVersionRequest(name=approved), "compliance").ruleset_version.author == "admin-user"


# --------------------------------------------------------------------------- health and reflection


def test_health_and_reflection_need_no_token(world: World) -> None:
    channel = world.client.channel
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "kpisettle.v1.SettlementService", "kpisettle.v1.RulesetService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    # A wrong token does not break the public services either.
    assert health.Check(health_pb2.HealthCheckRequest(), metadata=world.metadata("wrong-token"), timeout=10).status == 1

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {
        "kpisettle.v1.SettlementService",
        "kpisettle.v1.RulesetService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    assert {m.name for m in pool.FindServiceByName("kpisettle.v1.SettlementService").methods} == {
        name for name, path in SERVICE_METHODS.items() if "SettlementService" in path
    }
    assert len(pool.FindServiceByName("kpisettle.v1.RulesetService").methods) == 8
    assert pool.FindMessageTypeByName("kpisettle.v1.Settlement").fields_by_name["total"].message_type.full_name == "kpisettle.v1.Money"


# --------------------------------------------------------------------------- tokens never logged


def test_tokens_never_appear_in_the_server_output(tmp_path: Path) -> None:
    callers = Callers.fresh()
    tokens_file = callers.write(tmp_path / "tokens.json")
    wrong = "tok-wrong-feedfacecafebeef0123"
    server = ServerProcess(
        f"sqlite:///{tmp_path / 'db.sqlite'}", tokens_file, "--drain-delay-seconds", "0", env={"KPISETTLE_LOG_LEVEL": "DEBUG"}
    )
    try:
        client = Client(server.target, callers)
        client.create_and_approve(US_SOURCE)
        client.settle("log-1", us_input())
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.settle("", us_input()))  # an error path logs too
        expect(grpc.StatusCode.PERMISSION_DENIED, lambda: client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "erp"))
        erp = callers["erp"].token
        for metadata in (
            (("authorization", f"Bearer {wrong}"),),
            (("authorization", f"Basic {erp}"),),
            (("authorization", f"Token {erp}"),),
            (("authorization", f"Bearer {erp} {wrong}"),),
            (),
        ):
            assert code(call_error(client, "ListSettlements", ss.ListSettlementsRequest(), metadata)) == grpc.StatusCode.UNAUTHENTICATED
        client.close()
        assert server.terminate() == 0
    finally:
        server.kill()
    output = server.output()
    assert "unauthenticated call" in output and "denied" in output, output  # the checks below are not vacuous
    for secret in (wrong, *(c.token for c in callers.by_name.values())):
        assert secret not in output, f"a token appears in the server output:\n{output}"
        assert hash_token(secret) not in output


# --------------------------------------------------------------------------- TLS and mutual TLS


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert: bytes
    client_key: bytes
    rogue_cert: bytes
    rogue_key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module", name="pki")
def pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and one from another CA."""
    import ipaddress

    folder = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("kpisettle test CA", ca_key, None, ca=True)
    rogue_ca = _certificate("someone else's CA", rogue_ca_key, None, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _certificate(
        "localhost",
        server_key,
        (ca, ca_key),
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _certificate("erp-gateway", client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate("erp-gateway", rogue_key, (rogue_ca, rogue_ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(_pem_key(server_key))
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    return Pki(
        ca=ca.public_bytes(pem),
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        ca_file=folder / "ca.pem",
        client_cert=client.public_bytes(pem),
        client_key=_pem_key(client_key),
        rogue_cert=rogue.public_bytes(pem),
        rogue_key=_pem_key(rogue_key),
    )


@contextlib.contextmanager
def tls_service(tmp_path: Path, pki: Pki, mutual: bool) -> Iterator[tuple[Service, Callers]]:
    callers = Callers.fresh()
    config = Config(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'tls.db'}",
        tokens_file=callers.write(tmp_path / "tokens.json"),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_file if mutual else None,
        grace_seconds=1,
    )
    service = Service(config)
    service.start()
    try:
        yield service, callers
    finally:
        service.stop(grace=0)


def served(target: str, callers: Callers, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The code of a health check and an authorised RPC over a channel (OK when both work)."""
    client = Client(target, callers, credentials)
    try:
        health = health_pb2_grpc.HealthStub(client.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert (
            list(
                client.call(
                    "ListRulesetVersions", rs.ListRulesetVersionsRequest(parent="rulesets/-"), "compliance", timeout=5
                ).ruleset_versions
            )
            == []
        )
    except grpc.RpcError as error:
        return error.code()
    finally:
        client.close()
    return grpc.StatusCode.OK


def test_tls_accepts_a_tls_client_and_refuses_plaintext(tmp_path: Path, pki: Pki) -> None:
    with tls_service(tmp_path, pki, mutual=False) as (service, callers):
        for host in ("127.0.0.1", "localhost"):
            assert served(f"{host}:{service.port}", callers, grpc.ssl_channel_credentials(root_certificates=pki.ca)) == grpc.StatusCode.OK
        assert served(f"127.0.0.1:{service.port}", callers, None) == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA refuses the server.
        untrusting = grpc.ssl_channel_credentials(root_certificates=pki.rogue_cert)
        assert served(f"127.0.0.1:{service.port}", callers, untrusting) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path: Path, pki: Pki) -> None:
    with tls_service(tmp_path, pki, mutual=True) as (service, callers):
        target = f"127.0.0.1:{service.port}"
        assert served(target, callers, grpc.ssl_channel_credentials(root_certificates=pki.ca)) == grpc.StatusCode.UNAVAILABLE
        rogue = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.rogue_key, certificate_chain=pki.rogue_cert)
        assert served(target, callers, rogue) == grpc.StatusCode.UNAVAILABLE
        assert served(target, callers, None) == grpc.StatusCode.UNAVAILABLE
        good = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert)
        assert served(target, callers, good) == grpc.StatusCode.OK
        # The certificate admits the connection; the call still needs a token.
        with grpc.secure_channel(target, good) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            unauthenticated = Client(target, callers, good)
            try:
                error = call_error(unauthenticated, "VerifyAuditLog", ss.VerifyAuditLogRequest(), ())
                assert code(error) == grpc.StatusCode.UNAUTHENTICATED
            finally:
                unauthenticated.close()


def test_tls_flags(tmp_path: Path) -> None:
    config = parse_args(["--tls-cert", "s.pem", "--tls-key", "s.key", "--tls-client-ca", "ca.pem", "--drain-delay-seconds", "2"])
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (Path("s.pem"), Path("s.key"), Path("ca.pem"))
    assert config.drain_delay_seconds == 2
    for wrong in (["--tls-cert", "s.pem"], ["--tls-key", "s.key"], ["--tls-client-ca", "ca.pem"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)


# --------------------------------------------------------------------------- deadlines and sizes


def assert_healthy(client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    verified = client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance", timeout=30)
    assert verified.ok, verified


def test_deadlines_are_honoured_and_the_server_stays_healthy(running: Running) -> None:
    client = running.client
    client.create_and_approve(US_SOURCE)
    expect(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        lambda: client.call("Settle", ss.SettleRequest(request_id="late-1", input=us_input()), "erp", timeout=0.001),
    )
    # A long batch with a short deadline: cut off, the stream ends, nothing hangs.
    # 5,000 items in five messages: more than this machine stores in 0.3 s (about 2,300 items/s).
    items = [ss.SettleBatchItem(request_id=f"late-batch-{i}", input=us_input(contract_id=f"C-late-{i}")) for i in range(5000)]
    messages = [ss.SettleBatchRequest(items=items[start : start + 1000]) for start in range(0, len(items), 1000)]
    started = time.monotonic()
    expect(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        lambda: client.settlements.SettleBatch(iter(messages), metadata=running.callers["erp"].metadata, timeout=0.3),
    )
    assert time.monotonic() - started < 5

    def records() -> int:
        return int(client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance").records_checked)

    time.sleep(0.3)  # the group being stored when the deadline passed may still land
    after_deadline = records()
    time.sleep(0.7)
    assert records() == after_deadline < 3 + 1 + len(items), "the batch went on settling after its deadline"
    assert_healthy(client)
    assert not client.settle("after-deadline", us_input(contract_id="C-after")).deduplicated


def test_messages_over_4_mib_are_refused_and_the_server_lives(world: World) -> None:
    client = world.client
    big = "#" * (4 * 1024 * 1024 + 1)
    for who in ("admin", "no-token"):
        error = call_error(client, "ValidateRuleset", rs.ValidateRulesetRequest(source=big), world.metadata(who))
        assert code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED, (who, code(error))
    huge_input = us_input()
    huge_input.params["padding"] = "9" * (5 * 1024 * 1024)
    assert (
        code(call_error(client, "Settle", ss.SettleRequest(request_id="huge", input=huge_input), world.metadata("erp")))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    batch = ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id="huge", input=huge_input)])
    assert code(call_error(client, "SettleBatch", batch, world.metadata("erp"))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_healthy(client)
    assert world.call("ListSettlements", "erp") is None


# --------------------------------------------------------------------------- bounded inputs, clear refusals


def rich(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[error_details_pb2.BadRequest.FieldViolation]]:
    """The ErrorInfo and the field violations of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, error
    info, violations = None, []
    for detail in status.details:
        found, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(found):
            info = found
        elif detail.Unpack(bad):
            violations.extend(bad.field_violations)
    assert info is not None, error
    return info, violations


def trailer_bytes(error: grpc.RpcError) -> int:
    """What the status costs in the call's trailers (the limit clients enforce is 8 KiB)."""
    return sum(len(key) + len(value) for key, value in error.trailing_metadata() or ()) + len((error.details() or "").encode())


def test_a_ruleset_over_256_kib_of_utf8_is_resource_exhausted_and_at_the_limit_is_read(world: World) -> None:
    client = world.client
    limit = 256 * 1024
    at_limit = US_SOURCE + "#" + "x" * (limit - len(US_SOURCE.encode()) - 2) + "\n"
    assert len(at_limit.encode()) == limit
    report = client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=at_limit), "admin")
    assert report.valid and report.examples_pass  # a comment is no problem at all
    # one byte more, and text whose characters are fewer than 256 Ki but whose UTF-8 is more
    for source in (at_limit + "#", US_SOURCE + "#" + "中" * 90_000 + "\n"):
        assert len(source) < 300_000 and len(source.encode()) > limit
        for rpc, request in (
            ("ValidateRuleset", rs.ValidateRulesetRequest(source=source)),
            ("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=source)),
        ):
            error = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda rpc=rpc, request=request: client.call(rpc, request, "admin"))
            info, _ = rich(error)
            assert info.reason == "RULESET_TOO_LARGE" and info.metadata["maxBytes"] == str(limit)
            assert info.metadata["bytes"] == str(len(source.encode()))


@pytest.mark.parametrize(
    ("text", "code", "path"),
    [
        ("ruleset: x\nmetrics:\n" + "".join(f"  m{i}: [{', '.join(['1'] * 9)}]\n" for i in range(2100)), "source.too_many_nodes", None),
        ("ruleset: x\ntitle: " + "[" * 70 + "]" * 70 + "\n", "source.too_deep", ""),  # refused before parsing
        ("ruleset: x\ntitle:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(40)) + "  " * 41 + "v\n", "source.too_deep", None),
        (
            "a: &a [x, x, x, x, x, x, x, x]\n"
            + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdef", "bcdefg", strict=True)),
            "source.too_many_nodes",
            None,
        ),
    ],
    ids=["nodes", "flow-depth", "block-depth", "alias-bomb"],
)
def test_a_ruleset_with_too_many_nodes_or_too_deep_is_refused_with_its_code_and_place(
    world: World, text: str, code: str, path: str | None
) -> None:
    client = world.client
    report = client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=text), "admin")
    assert not report.valid and [p.code for p in report.problems] == [code]
    problem = report.problems[0]
    assert problem.line >= 1 and problem.column >= 1 and problem.line <= text.count("\n") + 1, problem
    if path is not None:
        assert problem.path == path
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT, lambda: client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=text), "admin")
    )
    info, violations = rich(error)
    assert info.reason == "RULESET_INVALID" and [v.reason for v in violations] == [code]
    assert violations[0].description.startswith(f"{problem.line}:{problem.column}: {code}: ")


def test_an_error_listing_thousands_of_problems_stays_small_enough_for_any_client(world: World) -> None:
    """Every problem at once, as far as a status can carry them: the rest are counted, never a broken call."""
    client = world.client
    many_params = us_input()
    for i in range(499):
        many_params.params[f"unknown_parameter_{i:03}"] = "1"
    many_errors = "ruleset: x\n" + "".join(f"unknown_key_{i}: 1\n" for i in range(3000))
    one_huge_value = "A" * 200_000  # once echoed whole in the message, and the client refused the trailers
    cases: list[tuple[str, Any, str, str]] = [
        ("Settle", ss.SettleRequest(request_id="many-problems", input=many_params), "erp", "INPUT_INVALID"),
        ("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=many_errors), "admin", "RULESET_INVALID"),
        ("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=one_huge_value), "admin", "RULESET_INVALID"),
    ]
    report = client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=many_errors), "admin")
    errors = [p for p in report.problems if p.severity == "ERROR"]
    assert [p.code for p in errors].count("key.unknown") == 3000  # the report lists every one
    for rpc, request, who, expected_reason in cases:
        error = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda rpc=rpc, request=request, who=who: client.call(rpc, request, who))
        info, violations = rich(error)
        assert info.reason == expected_reason
        assert trailer_bytes(error) < 8 * 1024, (rpc, trailer_bytes(error))
        assert all(len(v.description.encode()) <= 400 for v in violations)
        if "violationsOmitted" in info.metadata:
            omitted = int(info.metadata["violationsOmitted"])
            assert violations[-1].reason == "request.more_problems" and f"and {omitted} more problems" in violations[-1].description
            # all counted: 499 unknown params and "too many entries"; every error of the report
            assert len(violations) - 1 + omitted == {"Settle": 500, "CreateRulesetVersion": len(errors)}[rpc], (
                rpc,
                len(violations),
                omitted,
            )
    assert_healthy(client)


def test_request_bytes_that_are_not_the_message_are_invalid_argument_after_authentication(world: World) -> None:
    """gRPC would parse before any check and answer INTERNAL; the server answers for the caller's bytes."""
    channel = world.client.channel
    settle = channel.unary_unary(SERVICE_METHODS["Settle"])
    batch = channel.stream_stream(SERVICE_METHODS["SettleBatch"])
    valid = ss.SettleRequest(request_id="bytes", input=us_input()).SerializeToString()
    for payload, what in (
        (b"\xff\xff\xff", "wire format"),
        (b"\x0a\x02\xc3\x28", "a string that is not UTF-8"),
        (valid[: len(valid) // 2], "truncated"),
        (valid + b"\x0b", "a group never closed"),
    ):
        error = expect(
            grpc.StatusCode.INVALID_ARGUMENT, lambda payload=payload: settle(payload, metadata=world.metadata("erp"), timeout=10)
        )
        info, violations = rich(error)
        assert info.reason == "MALFORMED_REQUEST" and [(v.field, v.reason) for v in violations] == [("request", "request.malformed")], what
        # no token: refused before the bytes are even looked at
        error = expect(grpc.StatusCode.UNAUTHENTICATED, lambda payload=payload: settle(payload, timeout=10))
        assert rich(error)[0].reason == "UNAUTHENTICATED"
    good = ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id="", input=us_input())]).SerializeToString()
    answers: list[bytes] = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in batch(iter([good, b"\xff\xff"]), metadata=world.metadata("erp"), timeout=10):
            answers.append(answer)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rich(caught.value)[0].reason == "MALFORMED_REQUEST"
    assert len(answers) == 1 and len(ss.SettleBatchResponse.FromString(answers[0]).results) == 1  # the message before was answered
    # unknown fields are not an error: a newer client's request is read as far as it is known
    newer = ss.VerifyAuditLogRequest().SerializeToString() + b"\xa2\x06\x03abc"  # field 100, text
    assert ss.VerifyAuditLogResponse.FromString(
        channel.unary_unary(SERVICE_METHODS["VerifyAuditLog"])(newer, metadata=world.metadata("compliance"), timeout=10)
    ).ok
    assert_healthy(world.client)


def test_values_the_database_cannot_hold_are_client_errors(running: Running) -> None:
    """A NUL cannot be stored in PostgreSQL text: a note or a list filter with one is refused
    before the store, the same on both databases — never INTERNAL."""
    client = running.client
    draft = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=US_SOURCE), "admin").ruleset_version.name
    for rpc, request in (
        ("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=draft, note="ok\x00")),
        ("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=draft, note="\x1b[31m")),
    ):
        error = expect(grpc.StatusCode.INVALID_ARGUMENT, lambda rpc=rpc, request=request: client.call(rpc, request, "compliance"))
        assert [(v.field, v.reason) for v in rich(error)[1]] == [("note", "request.control_character")]
    assert (
        client.call("GetRulesetVersion", rs.GetRulesetVersionRequest(name=draft), "compliance").ruleset_version.state == 1
    )  # still a draft
    for request, field in (
        (ss.ListSettlementsRequest(contract_id="C\x001"), "contract_id"),
        (ss.ListSettlementsRequest(seller_id="\x00"), "seller_id"),
        (ss.ListSettlementsRequest(market="U\x00S"), "market"),
    ):
        error = call_error(client, "ListSettlements", request, running.callers["billing"].metadata)
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT and error is not None
        assert [v.field for v in rich(error)[1]] == [field]
    assert_healthy(client)


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_0(database_url: str, tmp_path: Path) -> None:
    callers = Callers.fresh()
    tokens_file = callers.write(tmp_path / "tokens.json")
    streams, messages, per_message = 4, 4, 10
    server = ServerProcess(database_url, tokens_file, "--grace-seconds", "30", "--drain-delay-seconds", "1")
    restarted: ServerProcess | None = None
    try:
        client = Client(server.target, callers)
        client.create_and_approve(US_SOURCE)
        sigterm_sent = threading.Event()
        first_answers = [threading.Event() for _ in range(streams)]
        results: list[list[ss.SettleBatchResponse] | BaseException] = [[] for _ in range(streams)]

        def requests(stream: int) -> Iterator[ss.SettleBatchRequest]:
            for message in range(messages):
                if message == 1:  # the rest of the stream is sent after SIGTERM
                    assert sigterm_sent.wait(30)
                    time.sleep(0.05)
                yield ss.SettleBatchRequest(
                    items=[
                        ss.SettleBatchItem(
                            request_id=f"drain-{stream}-{message}-{i}", input=us_input(contract_id=f"C-{stream}-{message}-{i}")
                        )
                        for i in range(per_message)
                    ]
                )
                time.sleep(0.1)

        def run(stream: int) -> None:
            try:
                for answer in client.settlements.SettleBatch(requests(stream), metadata=callers["erp"].metadata, timeout=60):
                    answers = results[stream]
                    assert isinstance(answers, list)
                    answers.append(answer)
                    first_answers[stream].set()
            except BaseException as error:  # reported below
                results[stream] = error
                first_answers[stream].set()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for event in first_answers:
            assert event.wait(30)
        server.process.send_signal(signal.SIGTERM)
        sigterm_sent.set()

        # Health says NOT_SERVING first; new calls are refused with UNAVAILABLE.
        watcher = grpc.insecure_channel(server.target)
        health = health_pb2_grpc.HealthStub(watcher)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never left SERVING"
            time.sleep(0.02)
        refused = expect(grpc.StatusCode.UNAVAILABLE, lambda: client.settle("after-sigterm", us_input(contract_id="C-late")))
        assert reason(refused) == "SHUTTING_DOWN"
        fresh = Client(server.target, callers)
        expect(grpc.StatusCode.UNAVAILABLE, lambda: fresh.call("ListSettlements", ss.ListSettlementsRequest(), "erp", timeout=5))
        fresh.close()
        watcher.close()

        for thread in threads:
            thread.join(60)
        for stream, outcome in enumerate(results):
            assert isinstance(outcome, list), f"stream {stream} failed: {outcome!r}"
            items = [result for answer in outcome for result in answer.results]
            assert len(items) == messages * per_message, (stream, len(items))
            assert all(result.HasField("settlement") for result in items), [r.error for r in items if not r.HasField("settlement")]
        assert server.process.wait(60) == 0, server.output()
        expect(grpc.StatusCode.UNAVAILABLE, lambda: client.call("ListSettlements", ss.ListSettlementsRequest(), "erp", timeout=3))
        client.close()

        # Everything answered was stored, once, and the chain holds after a restart.
        restarted = ServerProcess(database_url, tokens_file, "--drain-delay-seconds", "0")
        again = Client(restarted.target, callers)
        verified = again.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")
        settled = streams * messages * per_message
        assert verified.ok and verified.records_checked == 1 + 2 + settled, verified
        names: list[str] = []
        token = ""
        while True:
            page = again.call("ListSettlements", ss.ListSettlementsRequest(page_size=100, page_token=token), "billing")
            names += [s.name for s in page.settlements]
            token = page.next_page_token
            if not token:
                break
        assert len(set(names)) == settled
        assert list(again.call("ListSettlements", ss.ListSettlementsRequest(contract_id="C-late"), "erp").settlements) == []
        again.close()
        assert restarted.terminate() == 0
    finally:
        server.kill()
        if restarted is not None:
            restarted.kill()


def test_the_sigterm_path_says_not_serving_before_it_stops(tmp_path: Path) -> None:
    """Service.stop (what SIGTERM runs) sets health NOT_SERVING and refuses new calls before the server stops."""
    with sqlite_server(tmp_path) as running:
        service, client = running.service, running.client
        health = health_pb2_grpc.HealthStub(client.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        stopping = threading.Thread(target=service.stop, kwargs={"grace": 1, "drain_delay": 1.0})
        stopping.start()
        try:
            deadline = time.monotonic() + 5
            while not service.draining.is_set():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for name in ("", "kpisettle.v1.SettlementService", "kpisettle.v1.RulesetService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            refused = expect(grpc.StatusCode.UNAVAILABLE, lambda: client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance"))
            assert reason(refused) == "SHUTTING_DOWN"
        finally:
            stopping.join(10)
        assert not stopping.is_alive()
