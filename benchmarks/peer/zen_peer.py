"""GoRules zen-engine running rulesets/us-managed-standard.yaml as a JDM decision graph.

The graph (`us-managed-standard.jdm.json`, next to this file, written for this benchmark)
has what a zen user would build from the contract: an expression node for defaults and
the period, decision tables for the market multiplier, the exemptions, the graduated
commission slices (collect), the GMV bonus steps (first hit), the low-ACoS bonus, the
penalties (collect, with the exemptions as columns) and the warnings (collect), and a last
expression node that rounds every line to the cent and applies the multiplier, the
penalty cap and the floor.

zen computes with rust_decimal (28 significant digits; `round` rounds ties away from
zero, like the ruleset's half_up), so it can be exact; its Python binding returns numbers
as binary floats. The graph therefore rounds every line itself and also returns the total
as text (`string(total)`), which is what is compared. The float total, rounded to the cent
in Python, is checked to agree as well.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import zen

from benchmarks.peer import LINES, Outcome, outcome

GRAPH = Path(__file__).resolve().parent / "us-managed-standard.jdm.json"
CENT = Decimal("0.01")


class ZenPeer:
    """One engine and one decision, created once and reused for every evaluation."""

    def __init__(self) -> None:
        self.engine = zen.ZenEngine()
        self.decision = self.engine.create_decision(GRAPH.read_text(encoding="utf-8"))

    def evaluate(self, context: str) -> dict[str, Any]:
        result: dict[str, Any] = self.decision.evaluate(context)["result"]
        return result

    @staticmethod
    def outcome(result: dict[str, Any]) -> Outcome:
        lines = {name: _cents(result[name]) for name in LINES if name != "penalties"}
        lines["penalties"] = _cents(result["penalty_lines"])
        return outcome(Decimal(result["total_text"]), lines, list(result["warnings"]))

    @staticmethod
    def float_total(result: dict[str, Any]) -> Decimal:
        """The total as a zen user reading the float would get it: rounded to the cent."""
        return Decimal(repr(result["total"])).quantize(CENT, rounding=ROUND_HALF_UP)


def _cents(value: float) -> Decimal:
    return Decimal(repr(value)).quantize(CENT, rounding=ROUND_HALF_UP)
