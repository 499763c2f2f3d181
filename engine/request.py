"""A settlement request as the engine takes it: exact decimal text, never numbers."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.problems import Problem, RequestInvalid


@dataclass(frozen=True)
class MoneyAmount:
    """A money metric in a currency other than (or stated as) the settlement currency."""

    amount: str
    currency: str


@dataclass(frozen=True)
class FxRate:
    """1 `base` = `rate` `quote`, from `source` as of `as_of`."""

    base: str
    quote: str
    rate: str
    source: str = ""
    as_of: str = ""


@dataclass(frozen=True)
class SettlementRequest:
    market: str
    period_start: datetime.date
    metrics: Mapping[str, str | MoneyAmount]
    params: Mapping[str, str] = field(default_factory=dict)
    active_days: int | None = None
    fx_rates: Sequence[FxRate] = ()

    def as_given(self) -> dict[str, Any]:
        """The request as plain JSON values, recorded verbatim in the decision."""
        return {
            "market": self.market,
            "period_start": self.period_start.isoformat(),
            "metrics": {
                name: {"amount": v.amount, "currency": v.currency} if isinstance(v, MoneyAmount) else v for name, v in self.metrics.items()
            },
            "params": dict(self.params),
            "active_days": self.active_days,
            "fx_rates": [{"base": r.base, "quote": r.quote, "rate": r.rate, "source": r.source, "as_of": r.as_of} for r in self.fx_rates],
        }


def request_from_mapping(data: Any, default_period_start: datetime.date | None = None, path: str = "") -> SettlementRequest:
    """Build a request from JSON-like values (examples, files); every problem at once."""
    problems: list[Problem] = []

    def bad(where: str, code: str, message: str) -> None:
        problems.append(Problem(code, f"{path}.{where}" if path else where, message))

    if not isinstance(data, Mapping):
        raise RequestInvalid([Problem("request.type", path, "expected a mapping")])
    market = data.get("market")
    if not isinstance(market, str):
        bad("market", "request.market", "market is required (e.g. US)")
        market = ""
    period_start = default_period_start
    raw_period = data.get("period_start")
    if raw_period is not None:
        try:
            period_start = datetime.date.fromisoformat(str(raw_period))
        except ValueError:
            bad("period_start", "request.period", f"{raw_period!r} is not a date YYYY-MM-DD")
    if period_start is None:
        bad("period_start", "request.period", "period_start is required")
    metrics: dict[str, str | MoneyAmount] = {}
    raw_metrics = data.get("metrics", {})
    if not isinstance(raw_metrics, Mapping):
        bad("metrics", "request.type", "metrics must be a mapping")
        raw_metrics = {}
    for name, value in raw_metrics.items():
        if isinstance(value, Mapping):
            amount, currency = value.get("amount"), value.get("currency")
            if not isinstance(amount, str) or not isinstance(currency, str):
                bad(f"metrics.{name}", "request.type", "a money amount needs 'amount' and 'currency' as text")
                continue
            metrics[str(name)] = MoneyAmount(amount, currency)
        else:
            metrics[str(name)] = value
    params = data.get("params", {}) or {}
    if not isinstance(params, Mapping):
        bad("params", "request.type", "params must be a mapping")
        params = {}
    active_days = data.get("active_days")
    if active_days is not None:
        try:
            active_days = int(str(active_days))
        except ValueError:
            bad("active_days", "request.active_days", f"{active_days!r} is not a whole number of days")
            active_days = None
    rates: list[FxRate] = []
    raw_rates = data.get("fx_rates", []) or []
    if not isinstance(raw_rates, list):
        bad("fx_rates", "request.type", "fx_rates must be a list")
        raw_rates = []
    for i, rate in enumerate(raw_rates):
        if not isinstance(rate, Mapping) or not all(isinstance(rate.get(k), str) for k in ("base", "quote", "rate")):
            bad(f"fx_rates[{i}]", "request.type", "an FX rate needs base, quote and rate as text")
            continue
        rates.append(FxRate(rate["base"], rate["quote"], rate["rate"], str(rate.get("source", "")), str(rate.get("as_of", ""))))
    if problems:
        raise RequestInvalid(problems)
    assert period_start is not None
    return SettlementRequest(market, period_start, metrics, {str(k): v for k, v in params.items()}, active_days, tuple(rates))
