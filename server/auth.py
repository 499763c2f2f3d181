"""Bearer tokens → principal, tenant, roles; deny by default (SPEC §9).

Tokens are stored as SHA-256 hex digests in a JSON tokens file:
`[{"sha256": "…", "principal": "alice", "tenant": "acme", "roles": ["admin"]}]`.
A token is never logged; only the principal it maps to is.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("kpisettle.auth")

ROLES = ("erp", "billing", "compliance", "admin")

_S = "/kpisettle.v1.SettlementService/"
_R = "/kpisettle.v1.RulesetService/"

#: Who may call what. A method not listed here is denied to everyone.
PERMISSIONS: dict[str, frozenset[str]] = {
    _S + "Settle": frozenset({"erp"}),
    _S + "SettleBatch": frozenset({"erp"}),
    _S + "Simulate": frozenset({"erp"}),
    _S + "GetSettlement": frozenset({"erp", "billing", "compliance"}),
    _S + "ListSettlements": frozenset({"erp", "billing", "compliance"}),
    _S + "GetFeeBreakdown": frozenset({"billing"}),
    _S + "ExplainSettlement": frozenset({"compliance"}),
    _S + "ReplaySettlement": frozenset({"compliance"}),
    _S + "VerifyAuditLog": frozenset({"compliance"}),
    _R + "ValidateRuleset": frozenset({"compliance", "admin"}),
    _R + "CreateRulesetVersion": frozenset({"admin"}),
    _R + "ApproveRulesetVersion": frozenset({"compliance"}),
    _R + "RetireRulesetVersion": frozenset({"compliance"}),
    _R + "GetRulesetVersion": frozenset({"compliance", "admin"}),
    _R + "ListRulesetVersions": frozenset({"compliance", "admin"}),
    _R + "DiffRulesetVersions": frozenset({"compliance"}),
    _R + "AnalyzeImpact": frozenset({"compliance"}),
}

#: Infrastructure any client may call without a token.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


@dataclass(frozen=True)
class Principal:
    name: str
    tenant: str
    roles: frozenset[str]


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("kpisettle_principal")


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by the interceptor)."""
    return _current.get()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenBook:
    """Token digests → principals, loaded from the tokens file."""

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._by_digest = dict(entries)

    @classmethod
    def load(cls, path: Path) -> TokenBook:
        rows = json.loads(path.read_text(encoding="utf-8"))
        entries = {}
        for row in rows:
            roles = frozenset(row["roles"])
            unknown = roles - set(ROLES)
            if unknown:
                raise ValueError(f"{path}: unknown roles {sorted(unknown)} for {row['principal']}")
            entries[row["sha256"]] = Principal(row["principal"], row["tenant"], roles)
        return cls(entries)

    def principal(self, token: str) -> Principal | None:
        return self._by_digest.get(hash_token(token))


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call and authorises it against PERMISSIONS."""

    def __init__(self, tokens: TokenBook) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        handler = continuation(details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        allowed = PERMISSIONS.get(method, frozenset())
        return _guarded(handler, allowed, self._tokens, method)


def _authorise(context: grpc.ServicerContext, allowed: frozenset[str], tokens: TokenBook, method: str) -> Principal:
    token = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            token = value[len("Bearer ") :].strip()
    principal = tokens.principal(token) if token else None
    if principal is None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
    assert principal is not None
    if not principal.roles & allowed:
        log.info("denied %s to %s (roles %s)", method, principal.name, sorted(principal.roles))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{principal.name} may not call {method.rsplit('/', 1)[-1]}")
    return principal


def _guarded(handler: Any, allowed: frozenset[str], tokens: TokenBook, method: str) -> Any:
    def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            principal = _authorise(context, allowed, tokens, method)
            token = _current.set(principal)
            try:
                return behaviour(request, context)
            finally:
                _current.reset(token)

        return run

    def wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            principal = _authorise(context, allowed, tokens, method)
            token = _current.set(principal)
            try:
                yield from behaviour(request, context)
            finally:
                _current.reset(token)

        return run

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
