"""The validated ruleset: plain immutable values the evaluator runs on."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from engine.conditions import Condition
from engine.expressions import Expression, Node, Type
from engine.money import Rounding


class ValueType(StrEnum):
    MONEY = "money"
    COUNT = "count"
    NUMBER = "number"
    RATIO = "ratio"


class Period(StrEnum):
    MONTH = "month"
    QUARTER = "quarter"


class FeeKind(StrEnum):
    FIXED = "fixed"
    PERCENTAGE = "percentage"
    TIERED = "tiered"
    BONUS = "bonus"
    PENALTY = "penalty"


class TierMode(StrEnum):
    GRADUATED = "graduated"
    VOLUME = "volume"


@dataclass(frozen=True)
class Label:
    en: str
    zh: str


@dataclass(frozen=True)
class Input:
    """A metric (sent per settlement) or a param (a per-contract term)."""

    name: str
    type: ValueType
    definition: str
    default: Decimal | None
    target: bool = False


@dataclass(frozen=True)
class Exemption:
    name: str
    when: Expression
    condition: Condition
    prorate_by: Expression | None
    label: Label
    definition: str


@dataclass(frozen=True)
class Kpi:
    name: str
    formula: Expression
    on_zero_division: Decimal | None
    type: ValueType
    definition: str


@dataclass(frozen=True)
class Tier:
    lower: Decimal
    upper: Decimal | None
    rate: Decimal


@dataclass(frozen=True)
class Payout:
    """What a bonus step, a bonus or a penalty pays: a fixed amount, or a rate of something."""

    amount: Expression | None = None
    rate: Decimal | None = None
    of: Expression | None = None


@dataclass(frozen=True)
class Step:
    rule: str  # the rule name, e.g. gmv_bonus.steps[1]
    threshold: Decimal
    when: Node  # `steps_on >= threshold`, for evidence
    condition: Condition
    payout: Payout


@dataclass(frozen=True)
class Fee:
    id: str
    kind: FeeKind
    label: Label
    amount: Expression | None = None
    prorate: bool = False
    basis: Expression | None = None
    rate: Decimal | None = None
    mode: TierMode = TierMode.GRADUATED
    tiers: tuple[Tier, ...] = ()
    steps_on: Expression | None = None
    steps: tuple[Step, ...] = ()
    when: Expression | None = None
    condition: Condition | None = None
    payout: Payout = field(default_factory=Payout)
    exempt_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Warning:
    id: str
    when: Expression
    condition: Condition
    message: Label


@dataclass(frozen=True)
class PenaltyCap:
    max_rate: Decimal | None
    of: Expression | None
    max: Decimal | None


@dataclass(frozen=True)
class TotalLimits:
    min: Decimal | None
    max: Decimal | None


@dataclass(frozen=True)
class Example:
    name: str
    path: str
    request: dict[str, Any]  # the request part, as written
    expect: dict[str, Any]


@dataclass(frozen=True)
class Ruleset:
    id: str
    title: str
    effective_from: datetime.date
    currency: str
    minor_units: int
    period: Period
    rounding: Rounding
    metrics: tuple[Input, ...]
    params: tuple[Input, ...]
    exemptions: tuple[Exemption, ...]
    kpis: tuple[Kpi, ...]
    fees: tuple[Fee, ...]
    markets: dict[str, Decimal]
    multiply: tuple[str, ...]
    penalty_cap: PenaltyCap | None
    total_limits: TotalLimits | None
    warnings: tuple[Warning, ...]
    examples: tuple[Example, ...]
    name_types: dict[str, Type]  # every name an expression may use, and its type
    integral: frozenset[str]  # names whose values are whole numbers by type (counts, days, market)
