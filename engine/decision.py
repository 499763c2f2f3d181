"""The settlement decision: immutable, complete (SPEC §5, the engine's part), canonical JSON.

Parts are NamedTuples (immutable and cheap to build: a decision has dozens of them).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from engine.money import plain


class FxUsed(NamedTuple):
    metric: str
    base: str
    quote: str
    rate: Decimal
    source: str
    as_of: str
    amount: Decimal  # as received, in `base`
    converted: Decimal  # in the settlement currency, full precision


class ExemptionOutcome(NamedTuple):
    name: str
    applied: bool
    evidence: str
    label_en: str
    label_zh: str


class RuleOutcome(NamedTuple):
    rule: str  # exemption name, fee id, `fee.steps[i]`, or warning id
    kind: str  # exemption | bonus_step | bonus | penalty | warning
    fired: bool
    evidence: str


class Line(NamedTuple):
    id: str
    kind: str  # fixed | percentage | tiered | bonus | penalty | adjustment
    label_en: str
    label_zh: str
    basis: Decimal | None
    rate: Decimal | None
    exact: Decimal  # before rounding
    amount: Decimal  # rounded to the currency's minor units
    waived_by: tuple[str, ...] = ()


class RaisedWarning(NamedTuple):
    id: str
    message_en: str
    message_zh: str
    evidence: str


class Decision(NamedTuple):
    """The complete, immutable decision (a NamedTuple: built once per settlement, cheaply)."""

    ruleset_id: str
    ruleset_version: int | None
    content_hash: str
    engine_version: str
    currency: str
    rounding: str
    market: str
    period_start: str
    period_end: str
    period_days: int
    active_days: int
    inputs: dict[str, Any]  # the request exactly as given
    fx_rates: tuple[FxUsed, ...]
    exemptions: tuple[ExemptionOutcome, ...]
    target_factor: Decimal
    params: tuple[tuple[str, Decimal], ...]  # after defaults and target proration
    kpis: tuple[tuple[str, Decimal], ...]
    rules: tuple[RuleOutcome, ...]
    lines: tuple[Line, ...]
    total: Decimal
    warnings: tuple[RaisedWarning, ...]

    def line(self, line_id: str) -> Line:
        for line in self.lines:
            if line.id == line_id:
                return line
        raise KeyError(line_id)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; every decimal as an exact string.

        The parts are unpacked rather than read field by field: this runs once per
        settlement on the service path, over every rule and line."""
        return {
            "ruleset": {"id": self.ruleset_id, "version": self.ruleset_version, "content_hash": self.content_hash},
            "engine_version": self.engine_version,
            "currency": self.currency,
            "rounding": self.rounding,
            "market": self.market,
            "period": {"start": self.period_start, "end": self.period_end, "days": self.period_days, "active_days": self.active_days},
            "inputs": self.inputs,
            "fx_rates": [
                {
                    "metric": f.metric,
                    "base": f.base,
                    "quote": f.quote,
                    "rate": plain(f.rate),
                    "source": f.source,
                    "as_of": f.as_of,
                    "amount": plain(f.amount),
                    "converted": plain(f.converted),
                }
                for f in self.fx_rates
            ],
            "exemptions": [
                {"name": name, "applied": applied, "evidence": evidence, "label": {"en": en, "zh": zh}}
                for name, applied, evidence, en, zh in self.exemptions
            ],
            "target_factor": plain(self.target_factor),
            # lists, not mappings: canonical JSON sorts keys, and the order of computation matters
            "params": [{"name": name, "value": plain(value)} for name, value in self.params],
            "kpis": [{"name": name, "value": plain(value)} for name, value in self.kpis],
            "rules": [{"rule": rule, "kind": kind, "fired": fired, "evidence": evidence} for rule, kind, fired, evidence in self.rules],
            "lines": [
                {
                    "id": line_id,
                    "kind": kind,
                    "label": {"en": en, "zh": zh},
                    "basis": None if basis is None else plain(basis),
                    "rate": None if rate is None else plain(rate),
                    "exact": plain(exact),
                    "amount": plain(amount),
                    "waived_by": list(waived_by),
                }
                for line_id, kind, en, zh, basis, rate, exact, amount, waived_by in self.lines
            ],
            "total": plain(self.total),
            "warnings": [{"id": w.id, "message": {"en": w.message_en, "zh": w.message_zh}, "evidence": w.evidence} for w in self.warnings],
        }

    def to_canonical_json(self) -> bytes:
        """Sorted keys, no spaces, UTF-8: byte-identical for identical inputs and ruleset version."""
        return canonical_json(self.to_dict())


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8, strings/ints/booleans/null only.

    orjson writes the same bytes as `json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` for these types (a test holds it to that), several times faster.
    """
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
