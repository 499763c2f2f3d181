"""The values callers hold: what to settle, and what the service decided.

Small frozen dataclasses with `Decimal` amounts and `date` periods. Every output keeps the
message it was read from as `.message` (not part of equality), for the fields this module
leaves out (FX conversions, the stored input and decision JSON, the audit chain fields).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType

from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from .decimals import Amount, decimal_text, to_decimal
from .errors import KpisettleError

RULESETS = "rulesets/"


def _set(instance: object, name: str, value: object) -> None:
    object.__setattr__(instance, name, value)


def _check_date(value: object, what: str) -> None:
    if isinstance(value, datetime.datetime) or not isinstance(value, datetime.date):
        raise TypeError(f"{what} must be a datetime.date, not {type(value).__name__}")


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True, init=False)
class Money:
    """An exact amount and its ISO 4217 code. `amount` is given as Decimal, str or int (a
    float raises TypeError) and kept as a Decimal."""

    amount: Decimal
    currency: str

    def __init__(self, amount: Amount, currency: str) -> None:
        _set(self, "amount", to_decimal(amount, "Money.amount"))
        _set(self, "currency", currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"


@dataclass(frozen=True, init=False)
class FxRate:
    """1 `base` = `rate` `quote`, for a money metric given in another currency than the
    ruleset's. `rate` is given as Decimal, str or int and kept as a Decimal."""

    base: str
    quote: str
    rate: Decimal
    source: str = ""
    as_of: datetime.date | None = None

    def __init__(self, base: str, quote: str, rate: Amount, source: str = "", as_of: datetime.date | None = None) -> None:
        if as_of is not None:
            _check_date(as_of, "FxRate.as_of")
        _set(self, "base", base)
        _set(self, "quote", quote)
        _set(self, "rate", to_decimal(rate, "FxRate.rate"))
        _set(self, "source", source)
        _set(self, "as_of", as_of)


#: A metric value: exact text or number, or Money for an amount in another currency.
MetricValue = Decimal | str | int | Money
#: A contract parameter (target, negotiated fee): exact text or number.
ParamValue = Amount


@dataclass(frozen=True)
class SettlementInput:
    """One contract for one period, as ERP sends it.

    `ruleset` is "rulesets/{ruleset}" (the approved version in effect on `period_start`) or
    "rulesets/{ruleset}/versions/{n}"; a bare "{ruleset}" gets the "rulesets/" prefix.
    Amounts are Decimal, str (sent verbatim, e.g. "130000.50" or "28%") or int; a float
    raises TypeError here, before anything is sent. `period_end` (inclusive) is optional.
    """

    contract_id: str
    seller_id: str
    market: str
    period_start: datetime.date
    ruleset: str
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    fx_rates: Sequence[FxRate] = ()
    active_days: int | None = None
    period_end: datetime.date | None = None

    def __post_init__(self) -> None:
        for name in ("contract_id", "seller_id", "market", "ruleset"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"SettlementInput.{name} must be a str")
        _check_date(self.period_start, "SettlementInput.period_start")
        if self.period_end is not None:
            _check_date(self.period_end, "SettlementInput.period_end")
        if self.active_days is not None and (isinstance(self.active_days, bool) or not isinstance(self.active_days, int)):
            raise TypeError("SettlementInput.active_days must be an int or None")
        if self.ruleset and not self.ruleset.startswith(RULESETS):
            _set(self, "ruleset", RULESETS + self.ruleset)
        metrics: dict[str, MetricValue] = {}
        for name, value in dict(self.metrics).items():
            if not isinstance(value, Money):
                decimal_text(value, f"metric {name!r}")  # refuses floats now, with the metric's name
            metrics[str(name)] = value
        params: dict[str, ParamValue] = {}
        for name, value in dict(self.params).items():
            decimal_text(value, f"param {name!r}")
            params[str(name)] = value
        rates = tuple(self.fx_rates)
        for rate in rates:
            if not isinstance(rate, FxRate):
                raise TypeError("SettlementInput.fx_rates must hold FxRate values")
        _set(self, "metrics", MappingProxyType(metrics))
        _set(self, "params", MappingProxyType(params))
        _set(self, "fx_rates", rates)


# ------------------------------------------------------------------ settlements


@dataclass(frozen=True)
class Line:
    """A fee, bonus, penalty or adjustment. `amount` is rounded to the currency's minor unit;
    `exact` is before rounding; `basis` and `rate` are None when the line has none."""

    id: str
    kind: str
    label: str
    label_zh: str
    basis: Decimal | None
    rate: Decimal | None
    exact: Decimal
    amount: Decimal
    waived_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class LineDelta:
    """A line's change against the superseded revision (0 where the line did not exist)."""

    id: str
    previous_amount: Decimal
    amount: Decimal
    delta: Decimal


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    kind: str
    fired: bool
    evidence: str


@dataclass(frozen=True)
class ExemptionOutcome:
    name: str
    applied: bool
    evidence: str


@dataclass(frozen=True)
class SettlementWarning:
    id: str
    message: str
    message_zh: str
    evidence: str


@dataclass(frozen=True)
class Settlement:
    """A stored decision (one revision), or a simulated one (no name, revision 0)."""

    name: str
    contract_id: str
    seller_id: str
    market: str
    period_start: datetime.date | None
    period_end: datetime.date | None
    revision: int
    supersedes: str
    request_id: str
    ruleset_version: str
    currency: str
    total: Decimal
    lines: tuple[Line, ...]
    deltas: tuple[LineDelta, ...]
    kpis: Mapping[str, Decimal]
    rules: tuple[RuleOutcome, ...]
    exemptions: tuple[ExemptionOutcome, ...]
    warnings: tuple[SettlementWarning, ...]
    engine_version: str
    principal: str
    create_time: datetime.datetime | None
    #: True when Settle found this request_id already settled with this payload (nothing written).
    deduplicated: bool = False
    message: pb.Settlement = field(default_factory=pb.Settlement, repr=False, compare=False)

    def line(self, line_id: str) -> Line:
        """The line with this id; KeyError if the decision has none."""
        for line in self.lines:
            if line.id == line_id:
                return line
        raise KeyError(line_id)


@dataclass(frozen=True)
class FeeBreakdown:
    """What billing invoices: lines, total, and against the superseded revision the total's delta."""

    settlement: str
    contract_id: str
    seller_id: str
    market: str
    period_start: datetime.date | None
    period_end: datetime.date | None
    revision: int
    supersedes: str
    currency: str
    lines: tuple[Line, ...]
    total: Decimal
    previous_total: Decimal
    #: total - previous_total: what a credit or debit note carries.
    total_delta: Decimal
    deltas: tuple[LineDelta, ...]
    message: ss.GetFeeBreakdownResponse = field(default_factory=ss.GetFeeBreakdownResponse, repr=False, compare=False)


@dataclass(frozen=True)
class Explanation:
    language: str
    sentences: tuple[str, ...]

    def __str__(self) -> str:
        return "\n".join(self.sentences)


@dataclass(frozen=True)
class ReplayResult:
    """Whether recomputing a stored decision gives the same bytes; else the first difference."""

    match: bool
    first_difference: str
    engine_version: str


@dataclass(frozen=True)
class AuditReport:
    """The tenant's hash chain: ok, or the first failing record and how it fails."""

    ok: bool
    records_checked: int
    failed_sequence: int
    failure: str
    failed_record: str
    #: The stored head (last position and hash): keep it outside the database and pass it
    #: back as `anchor` later to detect a chain rewritten with recomputed hashes.
    head_sequence: int = 0
    head_hash: str = ""


# ------------------------------------------------------------------ rulesets


class RulesetState(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    DRAFT = "DRAFT"
    APPROVED = "APPROVED"
    RETIRED = "RETIRED"


@dataclass(frozen=True)
class RulesetProblem:
    """A validation error or warning; `line` and `column` are 1-based, 0 when unknown."""

    code: str
    path: str
    message: str
    severity: str
    line: int
    column: int

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}: " if self.line else ""
        return f"{where}{self.code}: {self.message}"


@dataclass(frozen=True)
class LifecycleEvent:
    action: str
    principal: str
    time: datetime.datetime | None
    note: str


@dataclass(frozen=True)
class RulesetVersion:
    """One immutable ruleset version and its lifecycle. `source` is empty in list results."""

    name: str
    state: RulesetState
    title: str
    currency: str
    effective_from: datetime.date | None
    content_hash: str
    author: str
    approver: str
    create_time: datetime.datetime | None
    approve_time: datetime.datetime | None
    retire_time: datetime.datetime | None
    examples_pass: bool
    warnings: tuple[RulesetProblem, ...]
    events: tuple[LifecycleEvent, ...]
    source: str
    message: pb.RulesetVersion = field(default_factory=pb.RulesetVersion, repr=False, compare=False)

    @property
    def ruleset(self) -> str:
        """The parent: "rulesets/{ruleset}"."""
        return self.name.rsplit("/versions/", 1)[0]

    @property
    def version(self) -> int:
        return int(self.name.rsplit("/", 1)[1])


@dataclass(frozen=True)
class ExampleResult:
    name: str
    passed: bool
    mismatches: tuple[str, ...]


@dataclass(frozen=True)
class Validation:
    """ValidateRuleset's answer: `valid` (storable as a draft) and `examples_pass` (approvable)."""

    valid: bool
    examples_pass: bool
    problems: tuple[RulesetProblem, ...]
    examples: tuple[ExampleResult, ...]
    ruleset_id: str
    content_hash: str
    message: rs.ValidateRulesetResponse = field(default_factory=rs.ValidateRulesetResponse, repr=False, compare=False)

    @property
    def errors(self) -> tuple[RulesetProblem, ...]:
        return tuple(p for p in self.problems if p.severity == "ERROR")

    @property
    def warnings(self) -> tuple[RulesetProblem, ...]:
        return tuple(p for p in self.problems if p.severity != "ERROR")


@dataclass(frozen=True)
class RulesetChange:
    """One change between two versions, in business terms (`change` is ADDED, REMOVED or CHANGED)."""

    change: str
    path: str
    description: str
    before: str
    after: str


@dataclass(frozen=True)
class SettlementImpact:
    """A stored settlement re-run under a candidate; `new_total` and `delta` are None if it could not settle."""

    settlement: str
    contract_id: str
    period_start: datetime.date | None
    currency: str
    old_total: Decimal
    new_total: Decimal | None
    delta: Decimal | None
    error: str


@dataclass(frozen=True)
class ImpactTotal:
    currency: str
    old_total: Decimal
    new_total: Decimal
    delta: Decimal


@dataclass(frozen=True)
class ImpactReport:
    """A whole AnalyzeImpact, all its pages: impacts in (period_start, contract_id) order,
    totals per currency and counts summed over the pages.

    `message` is not one response of the service (whose totals cover one page) but the pages
    merged into one AnalyzeImpactResponse: every impact, the summed totals and counts, no
    next_page_token — what the report holds, as a message."""

    impacts: tuple[SettlementImpact, ...]
    totals: tuple[ImpactTotal, ...]
    settlements_analyzed: int
    settlements_failed: int
    message: rs.AnalyzeImpactResponse = field(default_factory=rs.AnalyzeImpactResponse, repr=False, compare=False)


# ------------------------------------------------------------------ batches


@dataclass(frozen=True)
class BatchResult:
    """The answer to one item of `settle_batch`: its settlement, or its own error.

    `index` counts the items from 0 in the order they were given; `input` is the item."""

    index: int
    request_id: str
    input: SettlementInput
    settlement: Settlement | None = None
    error: KpisettleError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def deduplicated(self) -> bool:
        return self.settlement is not None and self.settlement.deduplicated


__all__ = [
    "AuditReport",
    "BatchResult",
    "ExampleResult",
    "ExemptionOutcome",
    "Explanation",
    "FeeBreakdown",
    "FxRate",
    "ImpactReport",
    "ImpactTotal",
    "LifecycleEvent",
    "Line",
    "LineDelta",
    "MetricValue",
    "Money",
    "ParamValue",
    "ReplayResult",
    "RuleOutcome",
    "RulesetChange",
    "RulesetProblem",
    "RulesetState",
    "RulesetVersion",
    "Settlement",
    "SettlementImpact",
    "SettlementInput",
    "SettlementWarning",
    "Validation",
]
