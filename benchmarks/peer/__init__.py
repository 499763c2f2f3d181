"""The same US decision written for other engines, and what is compared between them.

`Outcome` is what every engine must agree on for an input, to the cent: the total, each
fee line, the adjustment lines (a missing one counts as 0.00) and the warnings raised.
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple

from engine import Decision

#: The lines of rulesets/us-managed-standard.yaml that every engine reports.
LINES = (
    "base_fee",
    "commission",
    "gmv_bonus",
    "low_acos_bonus",
    "penalties",  # acos_penalty + odr_penalty + response_penalty, each rounded first
    "market_multiplier",
    "penalty_cap",
    "total_floor",
)
PENALTIES = ("acos_penalty", "odr_penalty", "response_penalty")


class Outcome(NamedTuple):
    total: Decimal
    lines: tuple[tuple[str, Decimal], ...]  # in LINES order
    warnings: tuple[str, ...]  # sorted


def outcome(total: Decimal, lines: dict[str, Decimal], warnings: list[str]) -> Outcome:
    return Outcome(total, tuple((name, lines.get(name, Decimal(0))) for name in LINES), tuple(sorted(warnings)))


def kpisettle_outcome(decision: Decision) -> Outcome:
    amounts = {line.id: line.amount for line in decision.lines}
    amounts["penalties"] = sum((amounts[p] for p in PENALTIES), Decimal(0))
    return outcome(decision.total, amounts, [w.id for w in decision.warnings])


def same(a: Outcome, b: Outcome) -> bool:
    """Equal to the cent (Decimal equality: 5650 == 5650.00)."""
    return a == b
