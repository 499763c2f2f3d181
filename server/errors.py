"""Turning failures into gRPC status, once, at the edge (AIP-193 rich errors).

Handlers raise ServiceError (or let engine and store errors through); `rpc_errors` wraps
every handler and converts them to a google.rpc.Status with ErrorInfo and, for invalid
input, BadRequest field violations listing every problem at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine import Problem, ProblemsError, RequestInvalid, RulesetInvalid
from engine.matcher import MatcherFailure
from server.storage.interface import Conflict, NotFound, StoreError

DOMAIN = "kpisettle.v1"
log = logging.getLogger("kpisettle.errors")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Violation:
    field: str
    description: str
    reason: str = ""


@dataclass
class ServiceError(Exception):
    code: grpc.StatusCode
    reason: str  # stable UPPER_SNAKE
    message: str
    violations: Sequence[Violation] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def invalid(message: str, violations: Iterable[Violation], reason: str = "INVALID_ARGUMENT") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, tuple(violations))


def problem_violations(problems: Sequence[Problem], prefix: str) -> list[Violation]:
    """Engine problems as field violations; ruleset problems carry line and column."""
    out = []
    for problem in problems:
        where = f"{prefix}{problem.path}" if problem.path else prefix.rstrip(".") or "request"
        position = f"{problem.line}:{problem.column}: " if problem.line else ""
        out.append(Violation(where, f"{position}{problem.code}: {problem.message}", problem.code))
    return out


def to_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for any failure a handler can meet."""
    service_error = as_service_error(error)
    details = [error_details_pb2.ErrorInfo(reason=service_error.reason, domain=DOMAIN, metadata=service_error.metadata)]
    if service_error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description, reason=v.reason)
                    for v in service_error.violations
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=service_error.code.value[0], message=service_error.message, details=packed)


def as_service_error(error: BaseException) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, RulesetInvalid):
        return invalid("the ruleset is invalid", problem_violations(error.problems, "source."), "RULESET_INVALID")
    if isinstance(error, RequestInvalid):
        from server.convert import input_violations  # convert builds on this module

        return invalid("the settlement input is invalid", input_violations(error.problems, "input"), "INPUT_INVALID")
    if isinstance(error, ProblemsError):
        return invalid(str(error), problem_violations(error.problems, ""))
    if isinstance(error, NotFound):
        return ServiceError(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", str(error))
    if isinstance(error, Conflict):
        return ServiceError(grpc.StatusCode.ABORTED, error.reason, str(error))
    if isinstance(error, (StoreError, MatcherFailure)):
        log.exception("internal failure")
        return ServiceError(grpc.StatusCode.UNAVAILABLE, "RETRY", "a transient failure; retry with the same request_id")
    log.error("unexpected error", exc_info=error)
    return ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


def rpc_errors(handler: F) -> F:
    """Wrap a unary handler: any failure becomes one rich status."""

    @functools.wraps(handler)
    def wrapped(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except Exception as error:  # the edge: every failure leaves as a status
            context.abort_with_status(rpc_status.to_status(to_status(error)))

    return wrapped  # type: ignore[return-value]


OK = code_pb2.OK
