"""Failed calls as exceptions: the status code, the ErrorInfo and every BadRequest field violation.

The service answers every failure with a `google.rpc.Status` (AIP-193): an `ErrorInfo`
with a stable UPPER_SNAKE `reason` and lowerCamel `metadata`, and, for invalid input, a
`BadRequest` listing every problem at once. `KpisettleError` carries all of it; one
subclass per canonical code lets callers catch what they handle, e.g. `except NotFound`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one request field, e.g. `input.metrics.orders`."""

    field: str
    description: str
    reason: str = ""


class KpisettleError(Exception):
    """A call the service (or the transport) refused. Subclasses name the status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        #: ErrorInfo.reason, a stable UPPER_SNAKE code such as "INPUT_INVALID" ("" if the
        #: failure came from the transport rather than the service).
        self.reason = reason
        self.domain = domain
        #: ErrorInfo.metadata (lowerCamel keys), e.g. {"latestRevision": "2"}.
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Every BadRequest field violation, in the order the service listed them.
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    def __str__(self) -> str:
        head = f"{self.code.name}: {self.message}"
        if self.reason:
            head += f" [{self.reason}]"
        return "\n".join([head, *(f"  {v.field}: {v.description}" for v in self.violations)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r}, violations={len(self.violations)})"

    @property
    def fields(self) -> list[str]:
        """The violated fields, in order (convenient in assertions and logs)."""
        return [v.field for v in self.violations]


class Cancelled(KpisettleError):
    code = grpc.StatusCode.CANCELLED


class Unknown(KpisettleError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(KpisettleError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(KpisettleError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(KpisettleError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KpisettleError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(KpisettleError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(KpisettleError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(KpisettleError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(KpisettleError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(KpisettleError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(KpisettleError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(KpisettleError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(KpisettleError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(KpisettleError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(KpisettleError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[KpisettleError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[KpisettleError]:
    """The exception class for a status code (`KpisettleError` itself for OK, which never fails)."""
    return _BY_CODE.get(code, KpisettleError)


def from_status(status: Any) -> KpisettleError:
    """A `google.rpc.Status` (as a batch item's error carries it) as an exception."""
    code = _CODE_BY_NUMBER.get(int(status.code), grpc.StatusCode.UNKNOWN)
    reason, domain, metadata = "", "", {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations)
    return error_class(code)(
        str(status.message), code=code, reason=str(reason), domain=str(domain), metadata=metadata, violations=violations
    )


def from_rpc_error(error: grpc.RpcError) -> KpisettleError:
    """The exception for a failed call: the rich status when the service sent one, else code and details."""
    status: Any = None
    if isinstance(error, grpc.Call):
        try:
            status = rpc_status.from_call(error)
        except ValueError:  # a status whose code disagrees with the call's: trust the call
            status = None
    if status is not None:
        converted = from_status(status)
    else:
        code_method = getattr(error, "code", None)
        code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
        details_method = getattr(error, "details", None)
        message = (details_method() if callable(details_method) else None) or str(error) or code.name
        converted = error_class(code)(str(message), code=code)
    converted.__cause__ = error
    return converted


__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "KpisettleError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_class",
    "from_rpc_error",
    "from_status",
]
