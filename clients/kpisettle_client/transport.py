"""The channel (plaintext, TLS or mutual TLS) and one typed callable per RPC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

#: Bigger than any answer the service sends (its own limit is 4 MiB by default).
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

_SETTLEMENTS = ss.DESCRIPTOR.services_by_name["SettlementService"]
_RULESETS = rs.DESCRIPTOR.services_by_name["RulesetService"]


def method_path(service: Any, method: str) -> str:
    """ "/kpisettle.v1.SettlementService/Settle"; KeyError for a method the service lacks."""
    return f"/{service.full_name}/{service.methods_by_name[method].name}"


def host_of(target: str) -> str:
    """The host part of a gRPC target ("dns:///h:1", "ipv4:h:1", "h:1", "[::1]:1")."""
    rest = target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    if rest.startswith("["):
        return rest[: rest.find("]") + 1] if "]" in rest else rest
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def is_local(target: str) -> bool:
    return target.startswith(("unix:", "unix-abstract:")) or host_of(target).lower() in LOCAL_HOSTS


def use_tls(target: str, tls: bool | None, root_certificates: bytes | None, client_certificate: tuple[bytes, bytes] | None) -> bool:
    """TLS unless told otherwise, except on this machine with no certificates given.

    tls=None chooses TLS when certificates are given or the target is not local
    (localhost, 127.0.0.1, ::1, unix sockets), so a bearer token never crosses a network in
    plaintext by accident; tls=False forces plaintext (and refuses certificates)."""
    if tls is False:
        if root_certificates is not None or client_certificate is not None:
            raise ValueError("root_certificates and client_certificate need tls=True (or tls=None)")
        return False
    if tls is True:
        return True
    return root_certificates is not None or client_certificate is not None or not is_local(target)


def open_channel(
    target: str,
    *,
    tls: bool,
    root_certificates: bytes | None,
    client_certificate: tuple[bytes, bytes] | None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `target`. `client_certificate` is (certificate_chain_pem, private_key_pem)."""
    # gRPC keeps the first of repeated keys: the caller's options come first so that they win
    channel_options = [*options, ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    if not tls:
        return grpc.insecure_channel(target, options=channel_options)
    chain: bytes | None = None
    key: bytes | None = None
    if client_certificate is not None:
        chain, key = client_certificate
        if b"PRIVATE KEY" in chain and b"PRIVATE KEY" not in key:
            raise ValueError("client_certificate is (certificate_chain, private_key): the private key came first")
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=key, certificate_chain=chain)
    return grpc.secure_channel(target, credentials, options=channel_options)


class Methods:
    """One multi-callable per RPC of both services, typed by request and response."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._paths: set[str] = set()

        def unary(service: Any, name: str, request: Any, response: Any) -> Any:
            path = method_path(service, name)
            self._paths.add(path)
            return channel.unary_unary(path, request_serializer=request.SerializeToString, response_deserializer=response.FromString)

        s, r = _SETTLEMENTS, _RULESETS
        self.settle: grpc.UnaryUnaryMultiCallable[ss.SettleRequest, ss.SettleResponse] = unary(
            s, "Settle", ss.SettleRequest, ss.SettleResponse
        )
        self.settle_batch: grpc.StreamStreamMultiCallable[ss.SettleBatchRequest, ss.SettleBatchResponse] = channel.stream_stream(
            method_path(s, "SettleBatch"),
            request_serializer=ss.SettleBatchRequest.SerializeToString,
            response_deserializer=ss.SettleBatchResponse.FromString,
        )
        self._paths.add(method_path(s, "SettleBatch"))
        self.simulate: grpc.UnaryUnaryMultiCallable[ss.SimulateRequest, ss.SimulateResponse] = unary(
            s, "Simulate", ss.SimulateRequest, ss.SimulateResponse
        )
        self.get_settlement: grpc.UnaryUnaryMultiCallable[ss.GetSettlementRequest, ss.GetSettlementResponse] = unary(
            s, "GetSettlement", ss.GetSettlementRequest, ss.GetSettlementResponse
        )
        self.list_settlements: grpc.UnaryUnaryMultiCallable[ss.ListSettlementsRequest, ss.ListSettlementsResponse] = unary(
            s, "ListSettlements", ss.ListSettlementsRequest, ss.ListSettlementsResponse
        )
        self.get_fee_breakdown: grpc.UnaryUnaryMultiCallable[ss.GetFeeBreakdownRequest, ss.GetFeeBreakdownResponse] = unary(
            s, "GetFeeBreakdown", ss.GetFeeBreakdownRequest, ss.GetFeeBreakdownResponse
        )
        self.explain: grpc.UnaryUnaryMultiCallable[ss.ExplainSettlementRequest, ss.ExplainSettlementResponse] = unary(
            s, "ExplainSettlement", ss.ExplainSettlementRequest, ss.ExplainSettlementResponse
        )
        self.replay: grpc.UnaryUnaryMultiCallable[ss.ReplaySettlementRequest, ss.ReplaySettlementResponse] = unary(
            s, "ReplaySettlement", ss.ReplaySettlementRequest, ss.ReplaySettlementResponse
        )
        self.verify_audit_log: grpc.UnaryUnaryMultiCallable[ss.VerifyAuditLogRequest, ss.VerifyAuditLogResponse] = unary(
            s, "VerifyAuditLog", ss.VerifyAuditLogRequest, ss.VerifyAuditLogResponse
        )
        self.validate_ruleset: grpc.UnaryUnaryMultiCallable[rs.ValidateRulesetRequest, rs.ValidateRulesetResponse] = unary(
            r, "ValidateRuleset", rs.ValidateRulesetRequest, rs.ValidateRulesetResponse
        )
        self.create_ruleset_version: grpc.UnaryUnaryMultiCallable[rs.CreateRulesetVersionRequest, rs.CreateRulesetVersionResponse] = unary(
            r, "CreateRulesetVersion", rs.CreateRulesetVersionRequest, rs.CreateRulesetVersionResponse
        )
        self.approve: grpc.UnaryUnaryMultiCallable[rs.ApproveRulesetVersionRequest, rs.ApproveRulesetVersionResponse] = unary(
            r, "ApproveRulesetVersion", rs.ApproveRulesetVersionRequest, rs.ApproveRulesetVersionResponse
        )
        self.retire: grpc.UnaryUnaryMultiCallable[rs.RetireRulesetVersionRequest, rs.RetireRulesetVersionResponse] = unary(
            r, "RetireRulesetVersion", rs.RetireRulesetVersionRequest, rs.RetireRulesetVersionResponse
        )
        self.get_ruleset_version: grpc.UnaryUnaryMultiCallable[rs.GetRulesetVersionRequest, rs.GetRulesetVersionResponse] = unary(
            r, "GetRulesetVersion", rs.GetRulesetVersionRequest, rs.GetRulesetVersionResponse
        )
        self.list_ruleset_versions: grpc.UnaryUnaryMultiCallable[rs.ListRulesetVersionsRequest, rs.ListRulesetVersionsResponse] = unary(
            r, "ListRulesetVersions", rs.ListRulesetVersionsRequest, rs.ListRulesetVersionsResponse
        )
        self.diff: grpc.UnaryUnaryMultiCallable[rs.DiffRulesetVersionsRequest, rs.DiffRulesetVersionsResponse] = unary(
            r, "DiffRulesetVersions", rs.DiffRulesetVersionsRequest, rs.DiffRulesetVersionsResponse
        )
        self.analyze_impact: grpc.UnaryUnaryMultiCallable[rs.AnalyzeImpactRequest, rs.AnalyzeImpactResponse] = unary(
            r, "AnalyzeImpact", rs.AnalyzeImpactRequest, rs.AnalyzeImpactResponse
        )

    def paths(self) -> set[str]:
        """Every method path these callables reach (a test compares it with the services' methods)."""
        return set(self._paths)


def service_paths() -> set[str]:
    """Every method of both services, from the descriptors."""
    return {method_path(service, m.name) for service in (_SETTLEMENTS, _RULESETS) for m in service.methods}
