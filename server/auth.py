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
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_status import rpc_status

from server.errors import ServiceError, Violation, invalid, to_status

log = logging.getLogger("kpisettle.auth")

ROLES = ("erp", "billing", "compliance", "admin")

_S = "/kpisettle.v1.SettlementService/"
_R = "/kpisettle.v1.RulesetService/"

#: Who may call what (SPEC §9). A method not listed here is denied to everyone.
#: erp: settle, simulate, read settlements. billing: read settlements and breakdowns.
#: compliance: read rulesets, approve, retire, diff, impact, replay, verify, explain — and
#: read settlements, since auditing a decision starts with finding it (a decision of ours).
#: admin: create ruleset versions, and read them (to see what was created).
#: ValidateRuleset stores and reads nothing: it is the dry run of creating a version
#: (admin) and a check of a text under review (compliance).
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


def allowed_roles(method: str) -> frozenset[str]:
    """The roles that may call a full method name; none for a method not in PERMISSIONS."""
    return PERMISSIONS.get(method, frozenset())


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the one `authorization: Bearer <token>` header, or None.

    The scheme is case-insensitive (RFC 7235); anything else — no header, two headers,
    another scheme, an empty or blank token, a token with spaces — is no token at all.
    """
    values = [value for key, value in metadata if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None
    return token


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call and authorises it against PERMISSIONS.

    Health and reflection are public. While `draining` is set (the server is shutting
    down) every other new call is refused with UNAVAILABLE; calls already running go on.
    """

    def __init__(self, tokens: TokenBook, draining: threading.Event | None = None) -> None:
        self._tokens = tokens
        self._draining = draining if draining is not None else threading.Event()

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        handler = continuation(details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        return _guarded(handler, allowed_roles(method), self._tokens, method, self._draining)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> NoReturn:
    context.abort_with_status(rpc_status.to_status(to_status(ServiceError(code, reason, message, metadata=metadata))))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _authorise(
    context: grpc.ServicerContext, allowed: frozenset[str], tokens: TokenBook, method: str, draining: threading.Event
) -> Principal:
    short = method.rsplit("/", 1)[-1]
    if draining.is_set():
        _abort(context, grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another server")
    token = bearer_token(context.invocation_metadata() or ())
    principal = tokens.principal(token) if token else None
    if principal is None:
        # Never log the token or the header: only that a call came without a valid one.
        log.info("unauthenticated call to %s from %s", method, context.peer())
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "a valid bearer token is required")
    if not principal.roles & allowed:
        log.info("denied %s to %s (roles %s)", method, principal.name, sorted(principal.roles))
        _abort(context, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_PERMITTED", f"{principal.name} may not call {short}", method=short)
    return principal


def _parser(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes, grpc.ServicerContext], Any]:
    """Parse a request's bytes once the caller is authorised.

    gRPC would parse them before any handler runs and answer bytes that are not the
    message (corrupt wire format, bad UTF-8 in a string, truncated) with INTERNAL; here
    they are the caller's mistake: INVALID_ARGUMENT, with a field violation."""
    short = method.rsplit("/", 1)[-1]

    def parse(raw: bytes, context: grpc.ServicerContext) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, or whatever else a parser raises on bytes
            reason = str(exc).rsplit(": ", 1)[-1][:200]
            error = invalid(
                f"the request is not a valid {short} request message",
                [Violation("request", f"{len(raw)} bytes that do not parse: {reason}", "request.malformed")],
                "MALFORMED_REQUEST",
            )
            context.abort_with_status(rpc_status.to_status(to_status(error)))
            raise AssertionError("abort_with_status returned") from exc  # pragma: no cover

    return parse


def _guarded(handler: Any, allowed: frozenset[str], tokens: TokenBook, method: str, draining: threading.Event) -> Any:
    """The handler behind authorisation, parsing its request bytes itself (see `_parser`)."""
    parse = _parser(handler.request_deserializer, method)

    def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: bytes, context: grpc.ServicerContext) -> Any:
            principal = _authorise(context, allowed, tokens, method, draining)
            token = _current.set(principal)
            try:
                return behaviour(parse(request, context), context)
            finally:
                _current.reset(token)

        return run

    def wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: bytes, context: grpc.ServicerContext) -> Any:
            principal = _authorise(context, allowed, tokens, method, draining)
            token = _current.set(principal)
            try:
                yield from behaviour(parse(request, context), context)
            finally:
                _current.reset(token)

        return run

    def parsed(requests: Iterable[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        for raw in requests:
            yield parse(raw, context)

    def wrap_client_stream(behaviour: Callable[..., Any], streaming_response: bool) -> Callable[..., Any]:
        def run(requests: Iterable[bytes], context: grpc.ServicerContext) -> Any:
            principal = _authorise(context, allowed, tokens, method, draining)
            token = _current.set(principal)
            try:
                return behaviour(parsed(requests, context), context)
            finally:
                _current.reset(token)

        def run_streaming(requests: Iterable[bytes], context: grpc.ServicerContext) -> Any:
            principal = _authorise(context, allowed, tokens, method, draining)
            token = _current.set(principal)
            try:
                yield from behaviour(parsed(requests, context), context)
            finally:
                _current.reset(token)

        return run_streaming if streaming_response else run

    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), None, serialize)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(wrap_client_stream(handler.stream_stream, True), None, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), None, serialize)
    return grpc.stream_unary_rpc_method_handler(wrap_client_stream(handler.stream_unary, False), None, serialize)
