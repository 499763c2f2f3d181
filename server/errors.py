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
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DataError

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


#: A status leaves in the call's trailers (grpc-message, percent-encoded, and
#: grpc-status-details-bin, base64), and gRPC clients refuse trailers over 8 KiB (some of
#: them, at random, between 8 and 16 KiB). So the text of a status is bounded whatever the
#: input it speaks of: the message, each violation, and the violations together (those that
#: do not fit are counted in one last violation and in ErrorInfo's `violationsOmitted`).
MAX_STATUS_MESSAGE_BYTES = 512
MAX_VIOLATION_TEXT_BYTES = 400
MAX_DETAILS_BYTES = 3072


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked with … when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "…"


def _bounded_violations(violations: Sequence[Violation], budget: int) -> tuple[list[error_details_pb2.BadRequest.FieldViolation], int]:
    """The violations that fit in `budget` bytes, in order, and how many were left out."""
    kept: list[error_details_pb2.BadRequest.FieldViolation] = []
    used = 0
    for index, violation in enumerate(violations):
        message = error_details_pb2.BadRequest.FieldViolation(
            field=clip(violation.field, 200),
            description=clip(violation.description, MAX_VIOLATION_TEXT_BYTES),
            reason=clip(violation.reason, 100),
        )
        size = message.ByteSize() + 4
        if used + size > budget:
            omitted = len(violations) - index
            kept.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field=message.field,
                    description=f"… and {omitted} more problems, not listed: an error status is limited in size",
                    reason="request.more_problems",
                )
            )
            return kept, omitted
        kept.append(message)
        used += size
    return kept, 0


def to_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for any failure a handler can meet (bounded in size, see above)."""
    service_error = as_service_error(error)
    metadata = {clip(k, 64): clip(v, 200) for k, v in list(service_error.metadata.items())[:16]}
    violations, omitted = _bounded_violations(service_error.violations, MAX_DETAILS_BYTES - 400)
    if omitted:
        metadata["violationsOmitted"] = str(omitted)
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=service_error.reason, domain=DOMAIN, metadata=metadata)]
    if violations:
        details.append(error_details_pb2.BadRequest(field_violations=violations))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    message = clip(service_error.message, MAX_STATUS_MESSAGE_BYTES)
    return status_pb2.Status(code=service_error.code.value[0], message=message, details=packed)


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
    if isinstance(error, DataError):
        # The database refused a value of the request (PostgreSQL: a NUL in text, a number out
        # of a column's range): the caller's input, not a failure to retry. The edge checks
        # should have caught it first; this keeps any that slips through a client error.
        log.warning("the database refused a value of a request (%s)", type(error.orig).__name__)
        return invalid(
            "a value in the request cannot be stored or looked up (a NUL character, or a number out of range)",
            [Violation("request", "a value the database refuses", "request.unstorable")],
            "VALUE_NOT_STORABLE",
        )
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
