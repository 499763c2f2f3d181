"""Proto messages ↔ engine values and stored records. No business logic here."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from google.type import date_pb2
from kpisettle.v1 import resources_pb2 as pb

from engine import FxRate, MoneyAmount, Problem, SettlementRequest
from engine.decision import canonical_json
from engine.money import plain
from server.errors import Violation, invalid
from server.storage.interface import LifecycleEvent, RulesetVersionRecord, SettlementRecord, VersionStatus

MAX_ID = 128
MAX_TEXT = 256
MAX_ENTRIES = 500
ID_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")
RULESET_NAME = re.compile(r"rulesets/([a-z][a-z0-9_-]{0,63})(?:/versions/([1-9][0-9]{0,8}))?")
SETTLEMENT_NAME = re.compile(r"settlements/([A-Za-z0-9_-]{1,64})")


# ------------------------------------------------------------------ dates and times


def to_date(value: date_pb2.Date, field: str, violations: list[Violation]) -> datetime.date | None:
    try:
        return datetime.date(value.year, value.month, value.day)
    except ValueError:
        violations.append(Violation(field, f"{value.year:04}-{value.month:02}-{value.day:02} is not a date", "request.date"))
        return None


def from_date(value: datetime.date | str) -> date_pb2.Date:
    day = datetime.date.fromisoformat(value) if isinstance(value, str) else value
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)


def timestamp(value: datetime.datetime) -> Timestamp:
    stamp = Timestamp()
    _set_timestamp(stamp, value)
    return stamp


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _set_timestamp(stamp: Timestamp, value: datetime.datetime) -> None:
    """Seconds and nanos since the epoch, set directly (FromDatetime converts through a time tuple)."""
    if value.tzinfo is None:  # local time, as astimezone takes it
        value = value.astimezone(datetime.UTC)
    since = value - _EPOCH
    stamp.seconds = since.days * 86400 + since.seconds
    stamp.nanos = since.microseconds * 1000


# ------------------------------------------------------------------ names


_RULESET_SHAPES = {
    True: "rulesets/{ruleset}/versions/{version}",
    False: "rulesets/{ruleset}",
    None: "rulesets/{ruleset}[/versions/{version}]",
}


def parse_ruleset_name(value: str, field: str, versioned: bool | None, violations: list[Violation]) -> tuple[str, int | None] | None:
    """Like `ruleset_name`, but a malformed name adds a violation and gives None."""
    match = RULESET_NAME.fullmatch(value or "")
    if not match or (versioned is True and not match.group(2)) or (versioned is False and match.group(2)):
        shape = _RULESET_SHAPES[versioned]
        described = f"{value[:80]!r} is not {shape}" if value else f"required: {shape}"
        violations.append(Violation(field, described, "request.ruleset_name"))
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None


def ruleset_name(value: str, field: str, versioned: bool | None) -> tuple[str, int | None]:
    """Parse "rulesets/{id}" and/or "rulesets/{id}/versions/{n}" (versioned: required / forbidden / either)."""
    violations: list[Violation] = []
    parsed = parse_ruleset_name(value, field, versioned, violations)
    if parsed is None:
        raise invalid(f"{field} must look like {_RULESET_SHAPES[versioned]}", violations)
    return parsed


def version_name(ruleset_id: str, version: int) -> str:
    return f"rulesets/{ruleset_id}/versions/{version}"


def settlement_id(name: str, field: str = "name") -> str:
    match = SETTLEMENT_NAME.fullmatch(name or "")
    if not match:
        raise invalid(f"{field} must look like settlements/{{settlement}}", [Violation(field, f"{name[:80]!r} is not a settlement name")])
    return match.group(1)


# ------------------------------------------------------------------ settlement input


def input_dict(message: pb.SettlementInput) -> dict[str, Any]:
    """The input as plain values: stored verbatim and hashed for idempotency."""
    metrics, params = read_entries(message)
    return _input_dict(message, metrics, params)


def read_entries(message: pb.SettlementInput) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The metrics as {name: (value, currency code)} and the params as {name: value}, in the maps' order.

    Reading a map of a freshly parsed message is the costly part (a wrapper per entry),
    so the settle path reads each map once, here, and works on plain dicts after."""
    metrics, params = message.metrics, message.params
    return {key: (m.value, m.currency_code) for key in metrics for m in [metrics[key]]}, {key: params[key] for key in params}


def _input_dict(message: pb.SettlementInput, metrics: Mapping[str, tuple[str, str]], params: dict[str, str]) -> dict[str, Any]:
    """The maps in their own order: canonical JSON sorts the keys."""
    return {
        "contract_id": message.contract_id,
        "seller_id": message.seller_id,
        "market": message.market,
        "period_start_date": date_text(message.period_start_date),
        "period_end_date": date_text(message.period_end_date) if message.HasField("period_end_date") else None,
        "ruleset": message.ruleset,
        "metrics": {k: {"value": value, "currency_code": currency} for k, (value, currency) in metrics.items()},
        "params": params,
        "fx_rates": [
            {
                "base_currency_code": r.base_currency_code,
                "quote_currency_code": r.quote_currency_code,
                "rate": r.rate,
                "source": r.source,
                "as_of_date": date_text(r.as_of_date) if r.HasField("as_of_date") else None,
            }
            for r in message.fx_rates
        ],
        "active_days": message.active_days if message.HasField("active_days") else None,
    }


def date_text(value: date_pb2.Date) -> str:
    return f"{value.year:04}-{value.month:02}-{value.day:02}"


def input_from_dict(data: Mapping[str, Any]) -> pb.SettlementInput:
    """Rebuild the proto input from its stored plain form (replay, impact analysis)."""
    message = pb.SettlementInput(
        contract_id=data["contract_id"],
        seller_id=data["seller_id"],
        market=data["market"],
        period_start_date=from_date(data["period_start_date"]),
        ruleset=data["ruleset"],
        params=data["params"],
    )
    if data.get("period_end_date"):
        message.period_end_date.CopyFrom(from_date(data["period_end_date"]))
    for name, value in data["metrics"].items():
        message.metrics[name].CopyFrom(pb.MetricValue(value=value["value"], currency_code=value["currency_code"]))
    for rate in data["fx_rates"]:
        fx = pb.FxRate(
            base_currency_code=rate["base_currency_code"],
            quote_currency_code=rate["quote_currency_code"],
            rate=rate["rate"],
            source=rate["source"],
        )
        if rate.get("as_of_date"):
            fx.as_of_date.CopyFrom(from_date(rate["as_of_date"]))
        message.fx_rates.append(fx)
    if data.get("active_days") is not None:
        message.active_days = data["active_days"]
    return message


@dataclass(frozen=True)
class CheckedInput:
    """What the shape checks learned: the violations, and what the engine checks need."""

    violations: list[Violation]
    ruleset: tuple[str, int | None] | None  # (ruleset id, pinned version) when the name parses
    period_start: datetime.date | None  # when present and a real date
    metrics: dict[str, tuple[str, str]]  # read_entries: the maps as plain values, read once
    params: dict[str, str]

    @property
    def computable(self) -> bool:
        """Whether the engine can run on this input (to report its own problems too)."""
        return self.ruleset is not None and self.period_start is not None


def check_input(message: pb.SettlementInput, field: str) -> CheckedInput:
    """Shape checks the engine cannot make (ids, names, dates, sizes); every problem at once."""
    violations: list[Violation] = []
    for name in ("contract_id", "seller_id"):
        value = getattr(message, name)
        if not ID_TEXT.fullmatch(value):
            violations.append(
                Violation(
                    f"{field}.{name}",
                    "required: 1 to 128 letters, digits or ._:/@- (starting with a letter or digit)",
                    "request.id",
                )
            )
    market = message.market
    if not market or len(market) > 8:
        violations.append(Violation(f"{field}.market", "required: a market code such as US, JP, EU, BR", "request.market"))
    period_start = None
    if not message.HasField("period_start_date"):
        violations.append(Violation(f"{field}.period_start_date", "required", "request.missing"))
    else:
        period_start = to_date(message.period_start_date, f"{field}.period_start_date", violations)
    if message.HasField("period_end_date"):
        to_date(message.period_end_date, f"{field}.period_end_date", violations)
    ruleset = parse_ruleset_name(message.ruleset, f"{field}.ruleset", None, violations)
    metrics, params = read_entries(message)
    if len(metrics) + len(params) > MAX_ENTRIES:
        violations.append(Violation(f"{field}.metrics", f"at most {MAX_ENTRIES} metrics and params together", "request.too_many"))
    for key, (value, _) in metrics.items():
        if len(key) > 64 or len(value) > MAX_TEXT:
            violations.append(_too_long(f"{field}.metrics", key))
    for key, value in params.items():
        if len(key) > 64 or len(value) > MAX_TEXT:
            violations.append(_too_long(f"{field}.params", key))
    for key, (_, currency) in metrics.items():
        if len(currency) > 8:
            violations.append(Violation(f"{field}.metrics.{key[:64]}.currency_code", "an ISO 4217 code such as USD", "request.currency"))
    if len(message.fx_rates) > 50:
        violations.append(Violation(f"{field}.fx_rates", "at most 50 FX rates", "request.too_many"))
    for i, rate in enumerate(message.fx_rates[:50]):
        where = f"{field}.fx_rates[{i}]"
        if max(len(rate.base_currency_code), len(rate.quote_currency_code)) > 8 or len(rate.rate) > MAX_TEXT or len(rate.source) > MAX_TEXT:
            violations.append(
                Violation(where, f"currency codes up to 8 and rate and source up to {MAX_TEXT} characters", "request.too_long")
            )
        if rate.HasField("as_of_date"):
            to_date(rate.as_of_date, f"{where}.as_of_date", violations)
    if message.HasField("active_days") and message.active_days < 0:
        violations.append(Violation(f"{field}.active_days", "must not be negative", "request.active_days"))
    return CheckedInput(violations, ruleset, period_start, metrics, params)


def _too_long(where: str, key: str) -> Violation:
    return Violation(where, f"{key[:64]!r}: names up to 64 and values up to {MAX_TEXT} characters", "request.too_long")


# Engine request paths → the SettlementInput fields they are about.
_ENGINE_FIELDS = {"market": "market", "period_start": "period_start_date", "active_days": "active_days", "fx_rates": "fx_rates"}


def input_violations(problems: Sequence[Problem], field: str) -> list[Violation]:
    """The engine's request problems as field violations on the proto input's fields.

    Paths the engine reports for a request ("metrics.x", "period_start", …) are mapped to
    the SettlementInput field names; problems found while computing (a division by zero in
    a KPI, values too large) concern the input as a whole."""
    out = []
    for problem in problems:
        head, _, rest = problem.path.partition(".")
        if head in ("metrics", "params"):
            where = f"{field}.{problem.path}"
        elif head in _ENGINE_FIELDS:
            where = f"{field}.{_ENGINE_FIELDS[head]}" + (f".{rest}" if rest else "")
        else:
            where = field
        about = f" ({problem.path})" if where == field and problem.path else ""
        out.append(Violation(where, f"{problem.code}: {problem.message}{about}", problem.code))
    return out


def engine_request(message: pb.SettlementInput, checked: CheckedInput | None = None) -> SettlementRequest:
    """The engine's request; the caller has run check_input (pass what it gave to read the maps only once)."""
    if checked is not None and checked.period_start is not None:
        start = checked.period_start
        entries, params = checked.metrics, checked.params
    else:
        start = datetime.date(message.period_start_date.year, message.period_start_date.month, message.period_start_date.day)
        entries, params = read_entries(message)
    metrics: dict[str, str | MoneyAmount] = {
        name: MoneyAmount(value, currency) if currency else value for name, (value, currency) in entries.items()
    }
    rates = [
        FxRate(r.base_currency_code, r.quote_currency_code, r.rate, r.source, date_text(r.as_of_date) if r.HasField("as_of_date") else "")
        for r in message.fx_rates
    ]
    active = message.active_days if message.HasField("active_days") else None
    return SettlementRequest(message.market, start, metrics, params, active, tuple(rates))


def fingerprint_payload(message: pb.SettlementInput, expected_revision: int | None, checked: CheckedInput | None = None) -> bytes:
    """The canonical bytes the request's fingerprint is of (pass check_input's result to read the maps only once)."""
    metrics, params = (checked.metrics, checked.params) if checked is not None else read_entries(message)
    return canonical_json({"input": _input_dict(message, metrics, params), "expected_revision": expected_revision})


# ------------------------------------------------------------------ decisions


def settlement_message(
    decision: Mapping[str, Any],
    decision_json: bytes,
    record: SettlementRecord | None,
    deltas: Sequence[Mapping[str, str]],
    input_json: bytes,
    into: pb.Settlement | None = None,
) -> pb.Settlement:
    """A Settlement from the decision (values and its canonical bytes, as stored) and, when stored, its record.

    Filled into `into` (an empty message, e.g. a response's field) when given, saving a copy:
    this runs once per settled item, so it sets fields one by one rather than building
    nested messages from keyword arguments."""
    message = pb.Settlement() if into is None else into
    currency = decision["currency"]
    ruleset = decision["ruleset"]
    period = decision["period"]
    message.market = decision["market"]
    _set_date(message.period_start_date, period["start"])
    _set_date(message.period_end_date, period["end"])
    message.ruleset_version = version_name(ruleset["id"], ruleset["version"] or 0)
    message.ruleset_content_hash = ruleset["content_hash"]
    message.engine_version = decision["engine_version"]
    message.currency_code = currency
    total = message.total
    total.amount = decision["total"]
    total.currency_code = currency
    add_line = message.lines.add
    for line in decision["lines"]:
        label = line["label"]
        out = add_line()
        out.id = line["id"]
        out.kind = line["kind"]
        out.label = label["en"]
        out.label_zh = label["zh"]
        if line["basis"]:  # empty strings are proto3's default: nothing to set
            out.basis = line["basis"]
        if line["rate"]:
            out.rate = line["rate"]
        out.exact_amount = line["exact"]
        amount = out.amount
        amount.amount = line["amount"]
        amount.currency_code = currency
        if line["waived_by"]:
            out.waived_by.extend(line["waived_by"])
    add_delta = message.deltas.add
    for delta in deltas:
        add_delta(**delta)
    add_exemption = message.exemptions.add
    for e in decision["exemptions"]:
        exemption = add_exemption()
        exemption.name = e["name"]
        if e["applied"]:  # false is proto3's default, like empty text: nothing to set
            exemption.applied = True
        exemption.evidence = e["evidence"]
    add_kpi = message.kpis.add
    for k in decision["kpis"]:
        kpi = add_kpi()
        kpi.name = k["name"]
        kpi.value = k["value"]
    add_rule = message.rules.add
    for r in decision["rules"]:
        rule = add_rule()
        rule.rule = r["rule"]
        rule.kind = r["kind"]
        if r["fired"]:
            rule.fired = True
        rule.evidence = r["evidence"]
    add_warning = message.warnings.add
    for w in decision["warnings"]:
        text = w["message"]
        add_warning(id=w["id"], message=text["en"], message_zh=text["zh"], evidence=w["evidence"])
    for f in decision["fx_rates"]:
        conversion = message.fx_conversions.add(metric=f["metric"], amount=f["amount"], converted_amount=f["converted"])
        _fill_fx_rate(conversion.rate, f)
    # The UTF-8 bytes as they are: a string field takes them (checking them) without a str in between.
    message.input_json = input_json  # type: ignore[assignment]
    message.decision_json = decision_json  # type: ignore[assignment]
    if record is not None:
        data = record.data
        message.name = f"settlements/{record.settlement_id}"
        message.contract_id = data.contract_id
        message.seller_id = data.seller_id
        message.revision = record.revision
        if record.supersedes_id:
            message.supersedes = f"settlements/{record.supersedes_id}"
        message.request_id = data.request_id
        message.principal = data.principal
        message.chain_sequence = record.chain_seq
        message.record_hash = record.record_hash
        message.previous_hash = record.previous_hash
        _set_timestamp(message.create_time, record.create_time)
    return message


def _set_date(field: date_pb2.Date, value: str) -> None:
    day = datetime.date.fromisoformat(value)
    field.year, field.month, field.day = day.year, day.month, day.day


def _fill_fx_rate(rate: pb.FxRate, used: Mapping[str, Any]) -> None:
    """An FX rate the decision used, with the day it is quoted for when the request gave one."""
    rate.base_currency_code = used["base"]
    rate.quote_currency_code = used["quote"]
    rate.rate = used["rate"]
    rate.source = used["source"]
    try:
        if used.get("as_of"):
            _set_date(rate.as_of_date, used["as_of"])
    except ValueError:
        pass  # recorded in decision_json as given


def line_deltas(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per-line changes against the superseded decision, in the order of the current lines."""
    if previous is None:
        return []
    before = {line["id"]: Decimal(line["amount"]) for line in previous["lines"]}
    after = {line["id"]: Decimal(line["amount"]) for line in current["lines"]}
    ids = [line["id"] for line in current["lines"]] + [i for i in before if i not in after]
    return [
        {
            "id": line_id,
            "previous_amount": plain(before.get(line_id, Decimal(0))),
            "amount": plain(after.get(line_id, Decimal(0))),
            "delta": plain(after.get(line_id, Decimal(0)) - before.get(line_id, Decimal(0))),
        }
        for line_id in ids
    ]


def load_json(data: bytes) -> Any:
    return orjson.loads(data)


# ------------------------------------------------------------------ ruleset versions

_STATES = {
    VersionStatus.DRAFT: pb.RulesetVersion.STATE_DRAFT,
    VersionStatus.APPROVED: pb.RulesetVersion.STATE_APPROVED,
    VersionStatus.RETIRED: pb.RulesetVersion.STATE_RETIRED,
}


def ruleset_version_message(
    record: RulesetVersionRecord,
    events: Sequence[LifecycleEvent],
    *,
    title: str,
    currency: str,
    warnings: Sequence[pb.RulesetProblem],
    examples_pass: bool,
    with_source: bool = True,
) -> pb.RulesetVersion:
    message = pb.RulesetVersion(
        name=version_name(record.ruleset_id, record.version),
        source=record.source if with_source else "",
        content_hash=record.content_hash,
        state=_STATES[record.status],
        effective_from_date=from_date(record.effective_from),
        title=title,
        currency_code=currency,
        author=record.author,
        approver=record.approver or "",
        warnings=warnings,
        examples_pass=examples_pass,
        events=[pb.LifecycleEvent(action=e.action.value, principal=e.principal, time=timestamp(e.time), note=e.note) for e in events],
    )
    message.create_time.CopyFrom(timestamp(record.create_time))
    if record.approve_time:
        message.approve_time.CopyFrom(timestamp(record.approve_time))
    if record.retire_time:
        message.retire_time.CopyFrom(timestamp(record.retire_time))
    return message
