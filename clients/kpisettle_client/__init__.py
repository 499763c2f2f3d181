"""The kpisettle Python client: settle, read, explain and audit without writing gRPC code.

    from datetime import date
    from decimal import Decimal
    from clients.kpisettle_client import KpisettleClient, SettlementInput

    with KpisettleClient("127.0.0.1:50051", token) as client:
        settled = client.settle(SettlementInput(
            contract_id="C-1", seller_id="S-1", market="US", period_start=date(2026, 3, 1),
            ruleset="rulesets/us-managed-standard",
            metrics={"gross_gmv": Decimal("130000"), "refunds": "5000", ...},
            params={"gmv_target": "100000"},
        ))
        settled.total  # Decimal("11750.00")

Amounts go in as Decimal, str or int (a float raises TypeError) and come out as Decimal.
Failures raise `KpisettleError` subclasses carrying the status code, the ErrorInfo reason
and metadata, and every field violation. Modules: `client` (the calls), `models` (the
values), `batch` (settle_batch), `retry` (what is retried), `request_ids` (stable ids),
`errors`, `decimals`, `convert` and `transport` (messages and the channel).
"""

from .batch import MAX_ITEMS_PER_MESSAGE, BatchInput, BatchItem
from .client import KpisettleClient
from .decimals import Amount
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    KpisettleError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from .models import (
    AuditReport,
    BatchResult,
    ExampleResult,
    ExemptionOutcome,
    Explanation,
    FeeBreakdown,
    FxRate,
    ImpactReport,
    ImpactTotal,
    LifecycleEvent,
    Line,
    LineDelta,
    MetricValue,
    Money,
    ParamValue,
    ReplayResult,
    RuleOutcome,
    RulesetChange,
    RulesetProblem,
    RulesetState,
    RulesetVersion,
    Settlement,
    SettlementImpact,
    SettlementInput,
    SettlementWarning,
    Validation,
)
from .request_ids import derive_request_id
from .retry import RetryPolicy

__all__ = [
    "MAX_ITEMS_PER_MESSAGE",
    "Aborted",
    "AlreadyExists",
    "Amount",
    "AuditReport",
    "BatchInput",
    "BatchItem",
    "BatchResult",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "ExampleResult",
    "ExemptionOutcome",
    "Explanation",
    "FailedPrecondition",
    "FeeBreakdown",
    "FieldViolation",
    "FxRate",
    "ImpactReport",
    "ImpactTotal",
    "Internal",
    "InvalidArgument",
    "KpisettleClient",
    "KpisettleError",
    "LifecycleEvent",
    "Line",
    "LineDelta",
    "MetricValue",
    "Money",
    "NotFound",
    "OutOfRange",
    "ParamValue",
    "PermissionDenied",
    "ReplayResult",
    "ResourceExhausted",
    "RetryPolicy",
    "RuleOutcome",
    "RulesetChange",
    "RulesetProblem",
    "RulesetState",
    "RulesetVersion",
    "Settlement",
    "SettlementImpact",
    "SettlementInput",
    "SettlementWarning",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "Validation",
    "derive_request_id",
]
