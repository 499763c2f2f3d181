"""`kpisettle settle` input: a JSON file with the SettlementInput fields, flags, or both (flags win).

The JSON file:

    {"contract_id": "C-1", "seller_id": "S-1", "market": "US", "period_start": "2026-03-01",
     "ruleset": "us-managed-standard",
     "metrics": {"gross_gmv": "130000", "ad_spend": {"amount": "18400", "currency": "EUR"}},
     "params": {"gmv_target": "100000"},
     "fx_rates": [{"base": "EUR", "quote": "USD", "rate": "1.0870", "source": "ECB", "as_of": "2026-03-31"}],
     "active_days": 31, "period_end": "2026-03-31", "request_id": "optional"}

Amounts are decimal strings; JSON numbers are read exactly from their text (never through a
float). Anything wrong raises `InputError` (exit 2) before a call is made.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from clients.kpisettle_client import FxRate, MetricValue, Money, ParamValue, SettlementInput

FIELDS = {
    "contract_id",
    "seller_id",
    "market",
    "period_start",
    "period_end",
    "ruleset",
    "metrics",
    "params",
    "fx_rates",
    "active_days",
    "request_id",
    "expected_revision",
}


class InputError(Exception):
    """A bad input file or flag: reported with exit code 2."""


@dataclass(frozen=True)
class SettleRequest:
    input: SettlementInput
    request_id: str | None
    expected_revision: int | None


def parse_date(text: object, what: str) -> datetime.date:
    if not isinstance(text, str):
        raise InputError(f"{what} must be a date written YYYY-MM-DD, not {text!r}")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{what} must be a date written YYYY-MM-DD, not {text!r}") from None


def _amount(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise InputError(f"{what} must be a decimal string, not {value!r}")
    return value if isinstance(value, str) else str(value)


def _metric(name: str, value: object) -> MetricValue:
    if isinstance(value, Mapping):
        unknown = set(value) - {"amount", "currency"}
        if unknown or "amount" not in value or not isinstance(value.get("currency"), str):
            raise InputError(f'metric {name!r} must be a decimal string or {{"amount": "...", "currency": "XXX"}}')
        return Money(_amount(value["amount"], f"metric {name!r} amount"), value["currency"])
    return _amount(value, f"metric {name!r}")


def _fx(value: object, index: int) -> FxRate:
    what = f"fx_rates[{index}]"
    if not isinstance(value, Mapping) or not {"base", "quote", "rate"} <= set(value):
        raise InputError(f'{what} must be {{"base": "EUR", "quote": "USD", "rate": "1.08"}} (source and as_of optional)')
    as_of = parse_date(value["as_of"], f"{what}.as_of") if value.get("as_of") else None
    return FxRate(str(value["base"]), str(value["quote"]), _amount(value["rate"], f"{what}.rate"), str(value.get("source", "")), as_of)


def read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    return parse_document(text, path)


def parse_document(text: str, where: str) -> dict[str, Any]:
    """One JSON object with SettlementInput fields (numbers read exactly); `where` prefixes errors."""
    try:
        document = json.loads(text, parse_float=Decimal, parse_int=int)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    if not isinstance(document, dict):
        raise InputError(f"{where}: expected a JSON object with the settlement input fields")
    unknown = sorted(set(document) - FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown fields {', '.join(unknown)} (expected some of {', '.join(sorted(FIELDS))})")
    return document


def pairs_of(items: list[str] | None, what: str) -> dict[str, str]:
    """`name=value` flags as a dict."""
    values: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--{what} {item!r}: expected NAME=VALUE")
        values[name.strip()] = value.strip()
    return values


def _flag_metric(text: str) -> object:
    """ "130000" or "18400 EUR" (an amount in another currency)."""
    amount, _, currency = text.partition(" ")
    if currency.strip():
        return {"amount": amount, "currency": currency.strip()}
    return text


def from_args(args: argparse.Namespace) -> SettleRequest:
    document: dict[str, Any] = read_file(args.file) if args.file else {}
    flags = {
        "contract_id": args.contract,
        "seller_id": args.seller,
        "market": args.market,
        "period_start": args.period,
        "period_end": args.period_end,
        "ruleset": args.ruleset,
        "active_days": args.active_days,
        "request_id": args.request_id,
        "expected_revision": args.expected_revision,
    }
    document.update({k: v for k, v in flags.items() if v is not None})
    metrics = document.get("metrics") or {}
    params = document.get("params") or {}
    if not isinstance(metrics, dict) or not isinstance(params, dict):
        raise InputError("metrics and params must be JSON objects")
    metrics = dict(metrics)
    metrics.update({k: _flag_metric(v) for k, v in pairs_of(args.metric, "metric").items()})
    params = dict(params)
    params.update(pairs_of(args.param, "param"))
    fx = list(document.get("fx_rates") or [])
    for name, rate in pairs_of(args.fx, "fx").items():
        base, _, quote = name.partition("/")
        fx.append({"base": base, "quote": quote, "rate": rate})
    document.update(metrics=metrics, params=params, fx_rates=fx)
    return from_document(document, flags=FLAGS)


#: The flag that sets each required field, named when it is missing.
FLAGS = {
    "contract_id": "--contract",
    "seller_id": "--seller",
    "market": "--market",
    "period_start": "--period",
    "ruleset": "--ruleset",
}


def from_document(document: Mapping[str, Any], *, flags: Mapping[str, str] | None = None) -> SettleRequest:
    """A request from a JSON-shaped document (a `--file`, a JSONL line or a CSV row); `InputError` if wrong."""
    missing = [f for f in ("contract_id", "seller_id", "market", "period_start", "ruleset") if not document.get(f)]
    if missing:
        raise InputError("missing " + ", ".join(f"{m} ({flags[m]})" if flags else m for m in missing))
    metrics = document.get("metrics") or {}
    params = document.get("params") or {}
    fx = document.get("fx_rates") or []
    for name in ("contract_id", "seller_id", "market", "ruleset"):
        if not isinstance(document[name], str):
            raise InputError(f"{name} must be a string")
    active_days = document.get("active_days")
    if active_days is not None and (isinstance(active_days, bool) or not isinstance(active_days, int)):
        raise InputError("active_days must be a whole number")
    expected = document.get("expected_revision")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
        raise InputError("expected_revision must be a whole number")
    request_id = document.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError("request_id must be a string")
    if not isinstance(metrics, Mapping) or not isinstance(params, Mapping):
        raise InputError("metrics and params must be JSON objects")
    if not isinstance(fx, list):
        raise InputError("fx_rates must be a JSON array")
    metric_values = {str(k): _metric(str(k), v) for k, v in metrics.items()}
    param_values: dict[str, ParamValue] = {str(k): _amount(v, f"param {k!r}") for k, v in params.items()}
    try:
        settlement_input = SettlementInput(
            contract_id=document["contract_id"],
            seller_id=document["seller_id"],
            market=document["market"],
            period_start=parse_date(document["period_start"], "period_start"),
            period_end=parse_date(document["period_end"], "period_end") if document.get("period_end") else None,
            ruleset=document["ruleset"],
            metrics=metric_values,
            params=param_values,
            fx_rates=[_fx(v, i) for i, v in enumerate(fx)],
            active_days=active_days,
        )
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
    return SettleRequest(settlement_input, request_id or None, expected)
