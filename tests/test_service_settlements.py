"""SettlementService over a real port, on SQLite and PostgreSQL (SPEC §4, §5, §7, §8).

Amounts are hand-checked against the worked examples in the comments of
rulesets/us-managed-standard.yaml (the "ex1" … "ex5" below are its examples 1 … 5).
Every test gets its own tenants, so the PostgreSQL tests share the session's database.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2, status_pb2
from google.type import date_pb2
from grpc_status import rpc_status
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss
from ruamel.yaml import YAML

from engine import ENGINE_VERSION
from server.storage.chain import KIND_SETTLEMENT, canonical_content, link_hash
from server.storage.sql import chain_heads, ruleset_versions, settlements
from tests.server_harness import RULESETS, Client, Running, ServerProcess, us_input

SHIPPED_LINKS = 4 * 3  # four shipped versions: each a version row, a CREATED and an APPROVED event
US_LINKS = 3  # the US version alone
US_SOURCE = (RULESETS / "us-managed-standard.yaml").read_text(encoding="utf-8")
NAME = re.compile(r"settlements/[0-9a-f]{32}")
HEX64 = re.compile(r"[0-9a-f]{64}")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
US = "rulesets/us-managed-standard"


# ------------------------------------------------------------------------------ helpers


def load_us(client: Client) -> pb.RulesetVersion:
    """Create and approve rulesets/us-managed-standard (version 1: the chain's first three links)."""
    return client.create_and_approve(US_SOURCE)


def ex1(contract_id: str = "C-1", period: tuple[int, int] = (2026, 3)) -> pb.SettlementInput:
    """US example 1: total 11950.05 (net GMV 125000.50, stretch step, low-ACoS bonus)."""
    return us_input(contract_id, gross_gmv="130000.50", period=period, ad_spend="14000")


def ex2(contract_id: str = "C-1", period: tuple[int, int] = (2026, 3)) -> pb.SettlementInput:
    """US example 2: total 5650.00 (three penalties, penalty cap +300.00)."""
    message = us_input(
        contract_id,
        gross_gmv="62000",
        period=period,
        refunds="2000",
        ad_spend="18600",
        ad_sales="60000",
        orders="1500",
        defective_orders="12",
        response_hours="30",
    )
    message.params["gmv_target"] = "80000"
    return message


EX1_LINES = {
    "base_fee": "3000.00",
    "commission": "7500.04",
    "gmv_bonus": "1250.01",
    "low_acos_bonus": "200.00",
    "acos_penalty": "0.00",
    "odr_penalty": "0.00",
    "response_penalty": "0.00",
}
EX2_LINES = {
    "base_fee": "3000.00",
    "commission": "3100.00",
    "gmv_bonus": "0.00",
    "low_acos_bonus": "0.00",
    "acos_penalty": "-300.00",
    "odr_penalty": "-300.00",
    "response_penalty": "-150.00",
    "penalty_cap": "300.00",
}


def day(year: int, month: int, dd: int) -> date_pb2.Date:
    return date_pb2.Date(year=year, month=month, day=dd)


def lines_of(settlement: pb.Settlement | ss.GetFeeBreakdownResponse) -> dict[str, str]:
    return {line.id: line.amount.amount for line in settlement.lines}


def deltas_of(message: pb.Settlement | ss.GetFeeBreakdownResponse) -> list[tuple[str, str, str, str]]:
    return [(d.id, d.previous_amount, d.amount, d.delta) for d in message.deltas]


@dataclass
class Rich:
    """A failed call's canonical code, message and google.rpc details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None
    violations: list[error_details_pb2.BadRequest.FieldViolation] = field(default_factory=list)

    @property
    def fields(self) -> set[str]:
        return {v.field for v in self.violations}

    def reasons(self) -> dict[str, str]:
        return {v.field: v.reason for v in self.violations}


def unpack(status: status_pb2.Status) -> Rich:
    info, violations = None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    return Rich(code, status.message, info, violations)


def fails(call: Callable[[], Any], code: grpc.StatusCode, reason: str | None = None) -> Rich:
    """Run `call`; it must fail with `code` (and ErrorInfo `reason`); return the rich status."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == code, (error.code(), error.details())
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    rich = unpack(status)
    assert rich.info is not None and rich.info.domain == "kpisettle.v1"
    if reason is not None:
        assert rich.info.reason == reason, rich
    return rich


def audit(client: Client) -> ss.VerifyAuditLogResponse:
    return client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")


def records(client: Client) -> int:
    """How many links the tenant's chain has; it must verify."""
    report = audit(client)
    assert report.ok, report
    return int(report.records_checked)


def get(client: Client, name: str, as_: str = "erp") -> pb.Settlement:
    return client.call("GetSettlement", ss.GetSettlementRequest(name=name), as_).settlement


def listed(client: Client, as_: str = "erp", **filters: Any) -> list[pb.Settlement]:
    """Every settlement of a list, following page tokens."""
    out: list[pb.Settlement] = []
    token = ""
    for _ in range(100):
        page = client.call("ListSettlements", ss.ListSettlementsRequest(page_token=token, **filters), as_)
        out.extend(page.settlements)
        token = page.next_page_token
        if not token:
            return out
    raise AssertionError("the list never ended")


def key_of(settlement: pb.Settlement) -> tuple[str, str, int]:
    p = settlement.period_start_date
    return (f"{p.year:04}-{p.month:02}-{p.day:02}", settlement.contract_id, settlement.revision)


def load_examples() -> list[tuple[str, dict[str, Any]]]:
    """Every example of every shipped ruleset: (ruleset id, example)."""
    out = []
    for path in sorted(RULESETS.glob("*.yaml")):
        document = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        out.extend((str(document["ruleset"]), example) for example in document["examples"])
    return out


def example_input(ruleset_id: str, example: dict[str, Any], contract_id: str) -> pb.SettlementInput:
    """A ruleset example as a SettlementInput (money metrics in another currency, FX rates, active days)."""
    start = datetime.date.fromisoformat(str(example["period_start"]))
    message = pb.SettlementInput(
        contract_id=contract_id,
        seller_id=f"S-{ruleset_id[:2]}",
        market=example["market"],
        ruleset=f"rulesets/{ruleset_id}",
        params={k: str(v) for k, v in (example.get("params") or {}).items()},
        period_start_date=day(start.year, start.month, start.day),
    )
    for name, value in example["metrics"].items():
        if isinstance(value, dict):
            message.metrics[name].CopyFrom(pb.MetricValue(value=str(value["amount"]), currency_code=str(value["currency"])))
        else:
            message.metrics[name].value = str(value)
    for rate in example.get("fx_rates") or []:
        as_of = datetime.date.fromisoformat(str(rate["as_of"]))
        message.fx_rates.append(
            pb.FxRate(
                base_currency_code=rate["base"],
                quote_currency_code=rate["quote"],
                rate=str(rate["rate"]),
                source=str(rate.get("source", "")),
                as_of_date=day(as_of.year, as_of.month, as_of.day),
            )
        )
    if example.get("active_days") is not None:
        message.active_days = int(example["active_days"])
    return message


@contextlib.contextmanager
def server_processes(running: Running, count: int) -> Iterator[list[Client]]:
    """`count` more server processes on the test's database; each stopped with SIGTERM and exiting 0."""
    processes: list[ServerProcess] = []
    clients: list[Client] = []
    try:
        for _ in range(count):
            processes.append(ServerProcess(running.database_url, running.tokens_file))
            clients.append(Client(processes[-1].target, running.callers))
        yield clients
    finally:
        for client in clients:
            client.close()
        codes = []
        for process in processes:
            try:
                codes.append(process.terminate(timeout=30))
            finally:
                process.kill()
    assert codes == [0] * count, codes


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released together; each result or the RpcError it raised."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        try:
            return call()
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# ------------------------------------------------------------------------------ Settle


def test_settle_stores_the_whole_decision(running: Running) -> None:
    client = running.client
    us_version = load_us(client)
    assert records(client) == US_LINKS

    settled = client.settle("req-ex1", ex1("C-ex1"))
    assert not settled.deduplicated
    s = settled.settlement
    assert NAME.fullmatch(s.name)
    assert (s.contract_id, s.seller_id, s.market) == ("C-ex1", "S-1", "US")
    assert (s.period_start_date, s.period_end_date) == (day(2026, 3, 1), day(2026, 3, 31))
    assert (s.revision, s.supersedes, s.request_id, s.principal) == (1, "", "req-ex1", "erp-user")
    assert s.ruleset_version == f"{US}/versions/1"
    assert s.ruleset_content_hash == us_version.content_hash and HEX64.fullmatch(s.ruleset_content_hash)
    assert s.engine_version == ENGINE_VERSION
    assert s.currency_code == "USD"
    # ex1: 3000.00 + (2500 + 3000 + 25000.50 × 8% = 7500.04) + 1% × 125000.50 = 1250.005 → 1250.01 (half up) + 200.00
    assert s.total == pb.Money(amount="11950.05", currency_code="USD")
    assert lines_of(s) == EX1_LINES
    assert list(lines_of(s)) == list(EX1_LINES)  # the ruleset's order
    assert all(line.amount.currency_code == "USD" for line in s.lines)
    commission = s.lines[1]
    assert (commission.kind, commission.basis, Decimal(commission.exact_amount)) == ("tiered", "125000.50", Decimal("7500.04"))
    bonus = s.lines[2]
    assert (bonus.kind, bonus.basis, bonus.rate, Decimal(bonus.exact_amount)) == ("bonus", "125000.50", "0.01", Decimal("1250.005"))
    assert (bonus.label, bonus.label_zh) == ("GMV target bonus", "GMV达标奖金")
    assert sum(Decimal(v) for v in lines_of(s).values()) == Decimal(s.total.amount)
    assert [(k.name, Decimal(k.value)) for k in s.kpis] == [
        ("net_gmv", Decimal("125000.50")),
        ("acos", Decimal("0.14")),
        ("odr", Decimal("0.002")),
        ("gmv_attainment", Decimal("1.250005")),
    ]
    assert [(e.name, e.applied) for e in s.exemptions] == [("stockout", False), ("platform_review", False)]
    fired = {r.rule for r in s.rules if r.fired}
    assert fired == {"gmv_bonus.steps[0]", "gmv_bonus.steps[1]", "low_acos_bonus"}
    assert {r.rule: r.evidence for r in s.rules}["acos_penalty"] == "acos 0.1400 > 0.2800"
    assert list(s.warnings) == [] and list(s.deltas) == [] and list(s.fx_conversions) == []
    # the record: inputs as received, the engine's decision, when, and the chain
    stored_input = orjson.loads(s.input_json)["input"]
    assert stored_input["contract_id"] == "C-ex1" and stored_input["metrics"]["gross_gmv"]["value"] == "130000.50"
    decision = orjson.loads(s.decision_json)
    assert decision["total"] == "11950.05" and decision["ruleset"]["content_hash"] == s.ruleset_content_hash
    assert s.HasField("create_time")
    assert abs(s.create_time.ToDatetime(datetime.UTC) - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)
    assert s.chain_sequence == US_LINKS + 1
    assert HEX64.fullmatch(s.record_hash) and HEX64.fullmatch(s.previous_hash) and s.record_hash != s.previous_hash
    assert records(client) == US_LINKS + 1

    # stored as answered: every reader sees the same message
    for role in ("erp", "billing"):
        assert get(client, s.name, role) == s

    # the next record links to this one; ex5 (a JP store on the US template) adds a market multiplier
    jp = us_input("C-ex5", gross_gmv="40000.35", refunds="0", ad_spend="4000", ad_sales="40000", orders="800", defective_orders="1")
    jp.market, jp.params["gmv_target"] = "JP", "40000"
    jp.metrics["response_hours"].value = "8"
    second = client.settle("req-ex5", jp).settlement
    assert second.total.amount == "6700.02"
    assert lines_of(second)["commission"] == "2000.02" and lines_of(second)["market_multiplier"] == "1000.00"
    multiplier = second.lines[-1]
    assert (multiplier.kind, Decimal(multiplier.rate), Decimal(multiplier.exact_amount)) == (
        "adjustment",
        Decimal("0.20"),
        Decimal("1000.0035"),
    )
    assert second.chain_sequence == s.chain_sequence + 1 and second.previous_hash == s.record_hash


def test_settle_examples_of_the_us_ruleset_and_fx(running: Running) -> None:
    """ex2 (penalty cap), ex3 (platform review: target prorated, penalties waived), ex4 (floor at the boundary), FX."""
    client = running.client
    load_us(client)
    s2 = client.settle("ex2", ex2("C-2")).settlement
    assert (s2.total.amount, lines_of(s2)) == ("5650.00", EX2_LINES)
    assert [w.id for w in s2.warnings] == ["gmv_behind", "acos_high"]

    april = us_input("C-3", gross_gmv="85000", period=(2026, 4), refunds="1000", ad_spend="26000", ad_sales="80000")
    april.metrics["orders"].value, april.metrics["defective_orders"].value = "1500", "9"
    april.metrics["response_hours"].value, april.metrics["review_days"].value = "30", "6"
    s3 = client.settle("ex3", april).settlement
    assert s3.total.amount == "8040.00" and s3.period_end_date == day(2026, 4, 30)
    assert {line.id: list(line.waived_by) for line in s3.lines if line.waived_by} == {
        "acos_penalty": ["platform_review"],
        "odr_penalty": ["platform_review"],
        "response_penalty": ["platform_review"],
    }
    assert [e.name for e in s3.exemptions if e.applied] == ["platform_review"]
    assert {k.name: Decimal(k.value) for k in s3.kpis}["gmv_attainment"] == Decimal("1.05")  # 84000 / (100000 × 24/30)

    small = us_input("C-4", gross_gmv="9000", refunds="1000", ad_spend="1120", ad_sales="4000", orders="200", defective_orders="0")
    small.metrics["response_hours"].value = "10"
    small.params.update({"gmv_target": "40000", "monthly_fee": "500"})
    s4 = client.settle("ex4", small).settlement
    assert s4.total.amount == "1000.00" and lines_of(s4)["total_floor"] == "100.00"
    assert lines_of(s4)["acos_penalty"] == "0.00"  # acos exactly 28% is not above 28%

    # gross GMV in EUR at the rate given: 130000 × 1.10 = 143000.00 USD; net 138000;
    # commission 2500 + 3000 + 38000 × 8% = 8540.00; attainment 1.38 → 1% × 138000 = 1380.00; ACoS 0.20: no bonus
    in_euro = us_input("C-fx")
    in_euro.metrics["gross_gmv"].currency_code = "EUR"
    rate = pb.FxRate(base_currency_code="EUR", quote_currency_code="USD", rate="1.10", source="ECB", as_of_date=day(2026, 3, 31))
    in_euro.fx_rates.append(rate)
    fx = client.settle("fx", in_euro).settlement
    assert (fx.total.amount, lines_of(fx)["commission"], lines_of(fx)["gmv_bonus"]) == ("12920.00", "8540.00", "1380.00")
    (conversion,) = fx.fx_conversions
    assert (conversion.metric, conversion.amount, Decimal(conversion.converted_amount), conversion.rate) == (
        "gross_gmv",
        "130000",
        Decimal("143000"),
        rate,
    )


def test_settle_reports_every_problem_of_the_input_at_once(running: Running) -> None:
    client = running.client
    load_us(client)
    before = records(client)

    # no input at all: every required field at once
    rich = fails(lambda: client.call("Settle", ss.SettleRequest(request_id="r-empty"), "erp"), INVALID, "INPUT_INVALID")
    assert rich.fields == {"input.contract_id", "input.seller_id", "input.market", "input.period_start_date", "input.ruleset"}

    # shape problems and the engine's problems together
    message = us_input(contract_id="")
    del message.metrics["refunds"]
    message.metrics["bogus"].value = "1"
    message.metrics["gross_gmv"].value = "1e5"
    message.metrics["orders"].value = "-3"
    message.metrics["defective_orders"].value = "2.5"
    message.params["gmv_target"] = "NaN"
    rich = fails(lambda: client.settle("", message), INVALID, "INPUT_INVALID")
    assert rich.reasons() == {
        "request_id": "request.request_id",
        "input.contract_id": "request.id",
        "input.metrics.refunds": "request.missing",
        "input.metrics.bogus": "request.unknown_name",
        "input.metrics.gross_gmv": "request.number",
        "input.metrics.orders": "request.count",
        "input.metrics.defective_orders": "request.count",
        "input.params.gmv_target": "request.number",
    }, rich.violations
    assert "no exponent" in next(v.description for v in rich.violations if v.field == "input.metrics.gross_gmv")

    def problems(mutate: Callable[[pb.SettlementInput], None], request_id: str = "r-bad", **extra: Any) -> Rich:
        bad = us_input()
        mutate(bad)
        return fails(lambda: client.settle(request_id, bad, **extra), INVALID, "INPUT_INVALID")

    assert problems(lambda m: setattr(m, "market", "CN")).reasons() == {"input.market": "request.market"}
    rich = problems(lambda m: m.metrics["gross_gmv"].MergeFrom(pb.MetricValue(currency_code="EUR")))  # FX missing
    assert rich.reasons() == {"input.metrics.gross_gmv": "request.fx_missing"} and "EUR→USD" in rich.violations[0].description
    assert problems(lambda m: setattr(m.period_start_date, "day", 15)).reasons() == {"input.period_start_date": "request.period"}
    assert problems(lambda m: setattr(m.period_start_date, "month", 13)).fields == {"input.period_start_date"}
    assert problems(lambda m: m.period_end_date.CopyFrom(day(2026, 3, 30))).fields == {"input.period_end_date"}
    assert problems(lambda m: m.period_end_date.CopyFrom(day(2026, 2, 30))).fields == {"input.period_end_date"}
    assert problems(lambda m: setattr(m, "active_days", 32)).fields == {"input.active_days"}
    assert problems(lambda m: setattr(m, "active_days", -1)).fields == {"input.active_days"}
    for malformed in ("us-managed-standard", "rulesets/US", "rulesets/us-managed-standard/versions/0", "rulesets/x/versions/v1", ""):
        assert problems(lambda m, name=malformed: setattr(m, "ruleset", name)).reasons() == {"input.ruleset": "request.ruleset_name"}
    assert problems(lambda m: None, request_id="x" * 129).fields == {"request_id"}
    assert problems(lambda m: None, expected_revision=-1).fields == {"expected_revision"}
    # two shape problems and an engine problem in one answer
    rich = problems(lambda m: (setattr(m, "seller_id", " "), m.period_end_date.CopyFrom(day(2026, 3, 1)), setattr(m, "market", "XX")))
    assert rich.fields == {"input.seller_id", "input.period_end_date", "input.market"}
    assert records(client) == before  # nothing was written

    # the period end given right is fine
    good = us_input("C-end")
    good.period_end_date.CopyFrom(day(2026, 3, 31))
    assert client.settle("r-good", good).settlement.total.amount == "11750.00"


def test_settle_chooses_an_existing_approved_version(running: Running) -> None:
    """A ruleset that does not exist (in this tenant) is NOT_FOUND; one with no APPROVED version in
    effect on the period's first day is FAILED_PRECONDITION (SPEC §6); a pinned version must exist and be APPROVED."""
    client = running.client
    load_us(client)
    before = records(client)

    def settle_with(ruleset: str, period: tuple[int, int] = (2026, 3)) -> Any:
        message = us_input(period=period)
        message.ruleset = ruleset
        return client.settle(f"r-{ruleset}-{period}", message)

    rich = fails(lambda: settle_with("rulesets/no-such-ruleset"), grpc.StatusCode.NOT_FOUND, "RULESET_NOT_FOUND")
    assert rich.info is not None and rich.info.metadata["ruleset"] == "rulesets/no-such-ruleset"
    rich = fails(lambda: settle_with(f"{US}/versions/9"), grpc.StatusCode.NOT_FOUND, "RULESET_VERSION_NOT_FOUND")
    assert rich.info is not None and rich.info.metadata["rulesetVersion"] == f"{US}/versions/9"
    rich = fails(lambda: settle_with(US, period=(2025, 12)), grpc.StatusCode.FAILED_PRECONDITION, "NO_VERSION_IN_EFFECT")
    assert rich.info is not None and rich.info.metadata["periodStartDate"] == "2025-12-01"

    # another tenant's ruleset is not there for this one
    other = ex1()
    fails(lambda: client.call("Settle", ss.SettleRequest(request_id="o-1", input=other), "other-erp"), grpc.StatusCode.NOT_FOUND)

    # a draft exists: the ruleset is known, but nothing settles under a draft
    draft_source = US_SOURCE.replace("title: US managed store", "title: US store")
    draft = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=draft_source), "admin").ruleset_version
    assert draft.name == f"{US}/versions/2" and draft.state == pb.RulesetVersion.STATE_DRAFT
    fails(lambda: settle_with(draft.name), grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_USABLE")
    assert records(client) == before + 2  # the draft's version and its CREATED event
    assert settle_with(f"{US}/versions/1").settlement.ruleset_version == f"{US}/versions/1"
    assert settle_with(US).settlement.ruleset_version == f"{US}/versions/1"  # the draft is not chosen


# ------------------------------------------------------------------------------ idempotency


def test_same_request_id_and_payload_returns_the_stored_decision_and_writes_nothing(running: Running) -> None:
    client = running.client
    load_us(client)
    first = client.settle("idem-1", ex1("C-idem"))
    after_first = audit(client)
    assert after_first.ok and after_first.records_checked == US_LINKS + 1
    for _ in range(3):
        again = client.settle("idem-1", ex1("C-idem"))
        assert again.deduplicated and again.settlement == first.settlement
    assert audit(client) == after_first  # nothing written
    # a correction by another request does not change what the retry returns
    correction = client.settle("idem-2", ex2("C-idem")).settlement
    assert correction.revision == 2
    retry = client.settle("idem-1", ex1("C-idem"))
    assert retry.deduplicated and retry.settlement == first.settlement
    assert records(client) == US_LINKS + 2
    # the version that settled it is retired: the retry still gets the stored decision
    client.call("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=f"{US}/versions/1"), "compliance")
    retry = client.settle("idem-1", ex1("C-idem"))
    assert retry.deduplicated and retry.settlement == first.settlement
    fails(lambda: client.settle("idem-3", ex1("C-new")), grpc.StatusCode.FAILED_PRECONDITION, "NO_VERSION_IN_EFFECT")


def test_same_request_id_with_another_payload_is_already_exists(running: Running) -> None:
    client = running.client
    load_us(client)
    first = client.settle("reuse-1", ex1("C-reuse")).settlement
    count = records(client)
    variants = [ex1("C-other"), ex2("C-reuse"), ex1("C-reuse", period=(2026, 4))]
    with_end = ex1("C-reuse")
    with_end.period_end_date.CopyFrom(day(2026, 3, 31))  # the same period, said differently, is another payload
    variants.append(with_end)
    for variant in variants:
        rich = fails(lambda v=variant: client.settle("reuse-1", v), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
        assert rich.info is not None
        assert dict(rich.info.metadata) == {"requestId": "reuse-1", "settlement": first.name}
        assert first.name in rich.message
    fails(lambda: client.settle("reuse-1", ex1("C-reuse"), expected_revision=0), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert records(client) == count
    # request ids belong to the tenant: another tenant may use the same one
    source = US_SOURCE
    client.create_and_approve(source, author="other-admin", approver="other-compliance")
    theirs = client.call("Settle", ss.SettleRequest(request_id="reuse-1", input=ex1("C-reuse")), "other-erp")
    assert not theirs.deduplicated and theirs.settlement.name != first.name
    assert theirs.settlement.total == first.total
    assert records(client) == count


def test_concurrent_duplicates_store_one_record(running: Running) -> None:
    client = running.client
    load_us(client)
    before = records(client)
    results = race([lambda: client.settle("dup-1", ex1("C-dup")) for _ in range(8)])
    assert all(isinstance(r, ss.SettleResponse) for r in results), results
    assert len({r.settlement.name for r in results}) == 1
    assert sum(not r.deduplicated for r in results) == 1
    assert all(r.settlement == results[0].settlement for r in results)
    assert records(client) == before + 1
    # the same id with two payloads at once: one is stored, the other payload is refused
    results = race([lambda i=i: client.settle("dup-2", ex1("C-dup2") if i % 2 else ex2("C-dup2")) for i in range(8)])
    stored = [r for r in results if isinstance(r, ss.SettleResponse)]
    refused = [r for r in results if isinstance(r, grpc.Call)]
    assert len({r.settlement.name for r in stored}) == 1 and sum(not r.deduplicated for r in stored) == 1
    assert len(stored) == 4 and len(refused) == 4
    assert all(e.code() == grpc.StatusCode.ALREADY_EXISTS for e in refused)
    assert records(client) == before + 2


def test_concurrent_corrections_get_consecutive_revisions(running: Running) -> None:
    client = running.client
    load_us(client)
    before = records(client)
    results = race([lambda i=i: client.settle(f"corr-{i}", us_input("C-race", gross_gmv=str(100000 + 1000 * i))) for i in range(8)])
    assert all(isinstance(r, ss.SettleResponse) and not r.deduplicated for r in results), results
    by_revision = {r.settlement.revision: r.settlement for r in results}
    assert sorted(by_revision) == list(range(1, 9))
    for revision in range(2, 9):
        current, previous = by_revision[revision], by_revision[revision - 1]
        assert current.supersedes == previous.name
        prev_lines, lines = lines_of(previous), lines_of(current)
        for line_id, previous_amount, amount, delta in deltas_of(current):
            assert Decimal(previous_amount) == Decimal(prev_lines.get(line_id, "0"))
            assert Decimal(amount) == Decimal(lines.get(line_id, "0"))
            assert Decimal(delta) == Decimal(amount) - Decimal(previous_amount)
    assert records(client) == before + 8
    assert [s.revision for s in listed(client, contract_id="C-race")] == [8]


def test_concurrent_duplicates_from_two_server_processes_store_one_record(running: Running) -> None:
    rounds = 3
    load_us(running.client)
    before = records(running.client)
    with server_processes(running, 2) as clients:
        for round_ in range(rounds):
            results = race([lambda i=i, r=round_: clients[i % 2].settle(f"proc-dup-{r}", ex1(f"C-proc-{r}")) for i in range(8)])
            assert all(isinstance(r, ss.SettleResponse) for r in results), results
            assert len({r.settlement.name for r in results}) == 1
            assert sum(not r.deduplicated for r in results) == 1
        # corrections of one contract period from both processes at once: consecutive revisions
        results = race(
            [lambda i=i: clients[i % 2].settle(f"proc-corr-{i}", us_input("C-proc-corr", gross_gmv=str(90000 + i))) for i in range(6)]
        )
        assert all(isinstance(r, ss.SettleResponse) for r in results), results
        revisions = sorted((r.settlement.revision, r.settlement.supersedes, r.settlement.name) for r in results)
        assert [r[0] for r in revisions] == [1, 2, 3, 4, 5, 6]
        assert all(revisions[i][1] == revisions[i - 1][2] for i in range(1, 6)) and revisions[0][1] == ""
    assert records(running.client) == before + rounds + 6


# ------------------------------------------------------------------------------ corrections


def test_a_correction_is_the_next_revision_with_exact_deltas(running: Running) -> None:
    client = running.client
    load_us(client)
    first = client.settle("fix-1", ex1("C-fix")).settlement
    second = client.settle("fix-2", ex2("C-fix")).settlement
    assert (second.revision, second.supersedes, second.total.amount) == (2, first.name, "5650.00")
    assert deltas_of(second) == [
        ("base_fee", "3000.00", "3000.00", "0.00"),
        ("commission", "7500.04", "3100.00", "-4400.04"),
        ("gmv_bonus", "1250.01", "0.00", "-1250.01"),
        ("low_acos_bonus", "200.00", "0.00", "-200.00"),
        ("acos_penalty", "0.00", "-300.00", "-300.00"),
        ("odr_penalty", "0.00", "-300.00", "-300.00"),
        ("response_penalty", "0.00", "-150.00", "-150.00"),
        ("penalty_cap", "0", "300.00", "300.00"),  # a new line
    ]
    assert sum(Decimal(d.delta) for d in second.deltas) == Decimal("-6300.05")
    third = client.settle("fix-3", ex1("C-fix")).settlement
    assert (third.revision, third.supersedes, third.total.amount) == (3, second.name, "11950.05")
    assert deltas_of(third)[-1] == ("penalty_cap", "300.00", "0", "-300.00")  # a line that is gone comes last
    assert [d.id for d in third.deltas] == [*EX1_LINES, "penalty_cap"]

    # what billing needs for the credit or debit note
    breakdown = client.call("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=second.name), "billing")
    assert (breakdown.settlement, breakdown.revision, breakdown.supersedes) == (second.name, 2, first.name)
    assert (breakdown.contract_id, breakdown.seller_id, breakdown.market, breakdown.currency_code) == ("C-fix", "S-1", "US", "USD")
    assert (breakdown.period_start_date, breakdown.period_end_date) == (day(2026, 3, 1), day(2026, 3, 31))
    assert lines_of(breakdown) == EX2_LINES and list(breakdown.lines) == list(second.lines)
    assert breakdown.total == pb.Money(amount="5650.00", currency_code="USD")
    assert breakdown.previous_total == pb.Money(amount="11950.05", currency_code="USD")
    assert breakdown.total_delta == pb.Money(amount="-6300.05", currency_code="USD")
    assert list(breakdown.deltas) == list(second.deltas)
    original = client.call("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=first.name), "billing")
    assert (original.previous_total.amount, original.total_delta.amount, original.supersedes) == ("0", "11950.05", "")
    assert list(original.deltas) == []

    # the same contract in another period, and another contract in this one, start at revision 1
    assert client.settle("fix-4", ex1("C-fix", period=(2026, 4))).settlement.revision == 1
    assert client.settle("fix-5", ex1("C-fix-b")).settlement.revision == 1
    # the superseded revisions stay readable as they were
    assert get(client, first.name) == first and get(client, second.name) == second


def test_expected_revision_guards_against_lost_updates(running: Running) -> None:
    client = running.client
    load_us(client)
    first = client.settle("er-1", ex1("C-er"), expected_revision=0).settlement
    assert first.revision == 1
    count = records(client)
    for stale in (0, 2, 7):
        rich = fails(
            lambda e=stale: client.settle(f"er-stale-{e}", ex2("C-er"), expected_revision=e), grpc.StatusCode.ABORTED, "REVISION_MISMATCH"
        )
        assert rich.info is not None
        assert dict(rich.info.metadata) == {"expectedRevision": str(stale), "latestRevision": "1", "latestSettlement": first.name}
    assert records(client) == count
    second = client.settle("er-2", ex2("C-er"), expected_revision=1).settlement
    assert (second.revision, second.supersedes) == (2, first.name)
    # the retry of a stored request is answered from the record, whatever the revision is now
    retry = client.settle("er-1", ex1("C-er"), expected_revision=0)
    assert retry.deduplicated and retry.settlement == first
    # a first settlement expected to be a correction
    rich = fails(lambda: client.settle("er-3", ex1("C-er-new"), expected_revision=1), grpc.StatusCode.ABORTED, "REVISION_MISMATCH")
    assert rich.info is not None and rich.info.metadata["latestRevision"] == "0"
    assert records(client) == count + 1


# ------------------------------------------------------------------------------ SettleBatch


def batch_item(index: int) -> ss.SettleBatchItem:
    return ss.SettleBatchItem(request_id=f"batch-{index}", input=us_input(f"B-{index:03}", gross_gmv=str(100000 + index)))


def test_settle_batch_answers_every_item_in_order(running: Running) -> None:
    client = running.client
    load_us(client)
    before = records(client)
    items = [batch_item(i) for i in range(150)]
    items[7].input.metrics["bogus"].value = "1"  # unknown metric
    items[60].input.market = "CN"  # not a market of the ruleset
    items[61].request_id = ""  # no request id
    items[100] = copy.deepcopy(items[99])  # a duplicate within the batch
    items[101] = ss.SettleBatchItem(request_id=items[99].request_id, input=us_input("B-other"))  # the id again, another payload
    items[120].input.ruleset = "rulesets/missing"  # no such ruleset
    for i in (130, 131, 132):  # corrections of one contract period within the batch
        items[i].input.contract_id = "B-corr"
    items[133].expected_revision = 5  # a stale guard
    messages = [ss.SettleBatchRequest(items=items[k : k + 50]) for k in range(0, 150, 50)]
    responses = list(client.settlements.SettleBatch(iter(messages), metadata=running.callers["erp"].metadata, timeout=120))
    assert [len(r.results) for r in responses] == [50, 50, 50]
    results = [result for response in responses for result in response.results]
    assert [r.item_index for r in results] == list(range(150))
    assert [r.request_id for r in results] == [item.request_id for item in items]

    def error(i: int) -> Rich:
        assert results[i].WhichOneof("result") == "error", results[i]
        return unpack(results[i].error)

    assert error(7).code == INVALID and error(7).fields == {"input.metrics.bogus"}
    assert error(7).info is not None and error(7).info.reason == "INPUT_INVALID"
    assert error(60).code == INVALID and error(60).fields == {"input.market"}
    assert error(61).code == INVALID and error(61).fields == {"request_id"}
    assert error(101).code == grpc.StatusCode.ALREADY_EXISTS and error(101).info.reason == "REQUEST_ID_REUSED"  # type: ignore[union-attr]
    assert error(120).code == grpc.StatusCode.NOT_FOUND
    assert error(133).code == grpc.StatusCode.ABORTED and error(133).info.reason == "REVISION_MISMATCH"  # type: ignore[union-attr]
    bad = {7, 60, 61, 101, 120, 133}
    good = [r for i, r in enumerate(results) if i not in bad]
    assert all(r.WhichOneof("result") == "settlement" for r in good)
    assert results[100].deduplicated and results[100].settlement == results[99].settlement
    assert sum(r.deduplicated for r in results) == 1
    assert len({r.settlement.name for r in good}) == len(good) - 1
    assert [results[i].settlement.revision for i in (130, 131, 132)] == [1, 2, 3]
    assert results[131].settlement.supersedes == results[130].settlement.name
    assert results[132].settlement.supersedes == results[131].settlement.name
    # item 149: 100149 - 5000 = 95149 net; 2500 + 45149 × 6% = 2708.94 → 3000 + 5208.94 (no bonus: attainment 0.95149 < 1)
    assert results[149].settlement.total.amount == "8208.94"
    assert results[149].settlement.request_id == "batch-149" and results[149].settlement.principal == "erp-user"
    assert records(client) == before + 150 - len(bad) - 1
    for i in (0, 62, 149):
        assert get(client, results[i].settlement.name) == results[i].settlement


def test_settle_batch_item_is_stored_when_answered(running: Running) -> None:
    client = running.client
    load_us(client)
    outbox: queue.Queue[ss.SettleBatchRequest | None] = queue.Queue()

    def requests() -> Iterator[ss.SettleBatchRequest]:
        while (message := outbox.get(timeout=60)) is not None:
            yield message

    responses = client.settlements.SettleBatch(requests(), metadata=running.callers["erp"].metadata, timeout=120)
    try:
        for round_ in range(3):
            outbox.put(ss.SettleBatchRequest(items=[batch_item(round_ * 10 + i) for i in range(10)]))
            answer = next(responses)
            assert [r.item_index for r in answer.results] == list(range(round_ * 10, round_ * 10 + 10))
            for result in answer.results:  # readable before the next message is even sent
                assert get(client, result.settlement.name, "billing") == result.settlement
        outbox.put(ss.SettleBatchRequest())  # an empty message gets an empty answer
        assert list(next(responses).results) == []
    finally:
        outbox.put(None)
    assert list(responses) == []
    assert records(client) == US_LINKS + 30


def test_settle_batch_refuses_a_message_of_more_than_1000_items(running: Running) -> None:
    client = running.client
    load_us(client)
    messages = [
        ss.SettleBatchRequest(items=[batch_item(0), batch_item(1)]),
        ss.SettleBatchRequest(items=[batch_item(2 + i) for i in range(1001)]),
        ss.SettleBatchRequest(items=[batch_item(5000)]),
    ]
    responses = client.settlements.SettleBatch(iter(messages), metadata=running.callers["erp"].metadata, timeout=120)
    first = next(responses)
    assert [r.WhichOneof("result") for r in first.results] == ["settlement", "settlement"]
    rich = fails(lambda: next(responses), grpc.StatusCode.RESOURCE_EXHAUSTED, "BATCH_TOO_LARGE")
    assert rich.info is not None and rich.info.metadata["maxItems"] == "1000"
    assert records(client) == US_LINKS + 2  # nothing of the refused message, nothing after it
    # exactly 1000 is fine
    thousand = ss.SettleBatchRequest(items=[batch_item(10_000 + i) for i in range(1000)])
    for item in thousand.items:
        item.input.ruleset = "not-a-ruleset-name"  # cheap to refuse: every item gets its own error
    (answer,) = client.settlements.SettleBatch(iter([thousand]), metadata=running.callers["erp"].metadata, timeout=120)
    assert len(answer.results) == 1000 and all(r.error.code == INVALID.value[0] for r in answer.results)


# ------------------------------------------------------------------------------ Simulate


def test_simulate_stores_nothing_and_may_use_a_draft(running: Running) -> None:
    client = running.client
    load_us(client)
    before = records(client)
    simulated = client.call("Simulate", ss.SimulateRequest(input=ex1("C-sim")), "erp").settlement
    assert simulated.total.amount == "11950.05" and lines_of(simulated) == EX1_LINES
    assert (simulated.name, simulated.revision, simulated.request_id, simulated.principal) == ("", 0, "", "")
    assert (simulated.chain_sequence, simulated.record_hash, simulated.previous_hash) == (0, "", "")
    assert not simulated.HasField("create_time")
    assert (simulated.contract_id, simulated.seller_id, simulated.ruleset_version) == ("C-sim", "S-1", f"{US}/versions/1")
    assert records(client) == before and listed(client) == []

    # the stored decision of the same input is the simulated one, byte for byte
    settled = client.settle("sim-then-settle", ex1("C-sim")).settlement
    assert settled.decision_json == simulated.decision_json and list(settled.lines) == list(simulated.lines)

    # a draft may be simulated (pinned), never settled, and is never chosen
    source = US_SOURCE
    draft_source = source.replace(
        'monthly_fee:\n    type: money\n    default: "3000"', 'monthly_fee:\n    type: money\n    default: "3500"'
    )
    assert draft_source != source
    draft = client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=draft_source), "admin").ruleset_version
    assert draft.state == pb.RulesetVersion.STATE_DRAFT
    pinned = ex1("C-sim")
    pinned.ruleset = draft.name
    on_draft = client.call("Simulate", ss.SimulateRequest(input=pinned), "erp").settlement
    assert (on_draft.ruleset_version, on_draft.ruleset_content_hash) == (draft.name, draft.content_hash)
    assert lines_of(on_draft)["base_fee"] == "3500.00" and on_draft.total.amount == "12450.05"
    assert client.call("Simulate", ss.SimulateRequest(input=ex1("C-sim")), "erp").settlement.ruleset_version == f"{US}/versions/1"
    fails(lambda: client.settle("on-draft", pinned), grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_USABLE")
    assert records(client) == before + 1 + 2  # the settlement, the draft and its CREATED event

    # the same checks as Settle
    bad = ex1()
    bad.metrics["bogus"].value = "1"
    bad.seller_id = ""
    rich = fails(lambda: client.call("Simulate", ss.SimulateRequest(input=bad), "erp"), INVALID, "INPUT_INVALID")
    assert rich.fields == {"input.seller_id", "input.metrics.bogus"}
    missing = ex1()
    missing.ruleset = "rulesets/missing"
    fails(lambda: client.call("Simulate", ss.SimulateRequest(input=missing), "erp"), grpc.StatusCode.NOT_FOUND, "RULESET_NOT_FOUND")


# ------------------------------------------------------------------------------ reads


def test_reading_a_settlement_by_name(running: Running) -> None:
    client = running.client
    load_us(client)
    name = client.settle("read-1", ex1()).settlement.name
    missing = "settlements/" + "0" * 32
    reads: list[tuple[str, Callable[[str], Any], str]] = [
        ("GetSettlement", lambda n: ss.GetSettlementRequest(name=n), "erp"),
        ("GetFeeBreakdown", lambda n: ss.GetFeeBreakdownRequest(name=n), "billing"),
        ("ExplainSettlement", lambda n: ss.ExplainSettlementRequest(name=n), "compliance"),
        ("ReplaySettlement", lambda n: ss.ReplaySettlementRequest(name=n), "compliance"),
    ]
    for rpc, build, role in reads:
        client.call(rpc, build(name), role)
        fails(lambda rpc=rpc, build=build, role=role: client.call(rpc, build(missing), role), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        # another tenant's settlement does not exist for this caller
        fails(lambda rpc=rpc, build=build, role=role: client.call(rpc, build(name), f"other-{role}"), grpc.StatusCode.NOT_FOUND)
        for malformed in (
            "",
            name.removeprefix("settlements/"),
            "settlement/abc",
            "settlements/",
            "settlements/a/b",
            "settlements/" + "x" * 65,
        ):
            rich = fails(lambda rpc=rpc, build=build, role=role, m=malformed: client.call(rpc, build(m), role), INVALID)
            assert rich.fields == {"name"}


def test_list_settlements_filters_and_pages(running: Running) -> None:
    client = running.client
    client.load_shipped_rulesets()
    a01 = client.settle("l-1", ex1("L-A", period=(2026, 1))).settlement
    b02 = us_input("L-B", period=(2026, 2))
    b02.seller_id = "S-2"
    b02s = client.settle("l-2", b02).settlement
    a03r1 = client.settle("l-3", ex1("L-A")).settlement
    a03r2 = client.settle("l-4", ex2("L-A")).settlement
    c03 = us_input("L-C")
    c03.market = "JP"
    c03s = client.settle("l-5", c03).settlement
    jp_name, jp_example = next((r, e) for r, e in load_examples() if r == "jp-managed-standard")
    j03 = client.settle("l-6", example_input(jp_name, jp_example, "L-J")).settlement
    assert j03.total == pb.Money(amount=jp_example["expect"]["total"], currency_code="JPY")

    everything = [a01, b02s, a03r1, a03r2, c03s, j03]
    latest = [a01, b02s, a03r2, c03s, j03]
    assert listed(client) == latest
    assert listed(client, include_superseded=True) == everything
    assert [key_of(s) for s in everything] == sorted(key_of(s) for s in everything)
    assert listed(client, contract_id="L-A") == [a01, a03r2]
    assert listed(client, contract_id="L-A", include_superseded=True) == [a01, a03r1, a03r2]
    assert listed(client, seller_id="S-1") == [a01, a03r2, c03s]
    assert listed(client, market="JP") == [c03s, j03]
    assert listed(client, ruleset="rulesets/jp-managed-standard") == [j03]
    assert listed(client, ruleset=US) == [a01, b02s, a03r2, c03s]
    assert listed(client, ruleset="rulesets/unknown") == []
    assert listed(client, period_start_from_date=day(2026, 2, 1), period_start_to_date=day(2026, 3, 1)) == [b02s, a03r2, c03s, j03]
    assert (
        listed(client, period_start_from_date=day(2026, 2, 2))
        == [a03r2, c03s, j03]
        == listed(client, period_start_from_date=day(2026, 3, 1))
    )
    assert listed(client, period_start_to_date=day(2026, 1, 31)) == [a01]
    assert listed(client, seller_id="S-1", market="US", period_start_from_date=day(2026, 3, 1)) == [a03r2]
    assert listed(client, "billing", include_superseded=True) == everything
    assert listed(client, "other-erp") == []

    # pages of two, with tokens; the last page has no token
    pages = []
    token = ""
    while True:
        page = client.call("ListSettlements", ss.ListSettlementsRequest(page_size=2, page_token=token, include_superseded=True), "erp")
        pages.append(list(page.settlements))
        token = page.next_page_token
        if not token:
            break
    assert pages == [everything[0:2], everything[2:4], everything[4:6]]
    one = client.call("ListSettlements", ss.ListSettlementsRequest(page_size=5), "erp")
    assert list(one.settlements) == latest and one.next_page_token == ""
    assert list(client.call("ListSettlements", ss.ListSettlementsRequest(page_size=100_000), "erp").settlements) == latest

    def list_fails(**fields: Any) -> Rich:
        return fails(lambda: client.call("ListSettlements", ss.ListSettlementsRequest(**fields), "erp"), INVALID)

    assert list_fails(page_size=-1).fields == {"page_size"}
    assert list_fails(page_token="garbage").fields == {"page_token"}
    first_page = client.call("ListSettlements", ss.ListSettlementsRequest(page_size=2), "erp")
    assert first_page.next_page_token
    forgeries = ['{"k":"settlements","v":"x"}', '{"k":"settlements"}', '{"k":"versions","v":["a",1]}', "[]", "null"]
    real = orjson.loads(base64.urlsafe_b64decode(first_page.next_page_token))
    for position, value in ((0, "2026-13-01"), (0, 20260301), (1, ["L-A"]), (1, "x" * 1000), (2, 2**40), (2, True), (2, -1), (3, "0")):
        changed = copy.deepcopy(real)
        changed["v"][position] = value
        forgeries.append(orjson.dumps(changed).decode())
    for forged in forgeries:
        assert list_fails(page_size=2, page_token=base64.urlsafe_b64encode(forged.encode()).decode()).fields == {"page_token"}, forged
    # a token is for the filters it was made with
    assert list_fails(page_size=2, page_token=first_page.next_page_token, market="JP").fields == {"page_token"}
    assert list_fails(ruleset=f"{US}/versions/1").fields == {"ruleset"}
    assert list_fails(ruleset="us-managed-standard").fields == {"ruleset"}
    rich = list_fails(period_start_from_date=day(2026, 13, 1), period_start_to_date=day(2026, 2, 30), page_size=-5)
    assert rich.fields == {"period_start_from_date", "period_start_to_date", "page_size"}


def test_explain_settlement_in_english_and_chinese(running: Running) -> None:
    client = running.client
    load_us(client)
    first = client.settle("ex-1", ex1("C-explain")).settlement
    second = client.settle("ex-2", ex2("C-explain")).settlement

    def explain(name: str, language: str) -> ss.ExplainSettlementResponse:
        return client.call("ExplainSettlement", ss.ExplainSettlementRequest(name=name, language_code=language), "compliance")

    for settlement in (first, second):
        english, chinese = explain(settlement.name, "en"), explain(settlement.name, "zh")
        assert english.language_code == "en" and chinese.language_code == "zh"
        assert any(settlement.total.amount in sentence for sentence in english.sentences)
        assert any(settlement.total.amount in sentence for sentence in chinese.sentences)
        assert any(re.search(r"[\u4e00-\u9fff]", sentence) for sentence in chinese.sentences)
        assert english.sentences != chinese.sentences
        assert explain(settlement.name, "") == english  # English by default
    assert any("1250.01" in sentence for sentence in explain(first.name, "en").sentences)  # the stretch bonus line
    for unsupported in ("fr", "EN", "zh-CN", "x" * 100):
        rich = fails(lambda lang=unsupported: explain(first.name, lang), INVALID)
        assert rich.fields == {"language_code"}


# ------------------------------------------------------------------------------ replay and audit


def test_replay_matches_for_every_stored_decision(running: Running) -> None:
    client = running.client
    client.load_shipped_rulesets()
    examples = load_examples()
    assert len(examples) == 17  # br 4, eu 4, jp 4, us 5
    by_contract: dict[str, pb.Settlement] = {}
    for i, (ruleset_id, example) in enumerate(examples):
        settled = client.settle(f"mix-{i}", example_input(ruleset_id, example, f"M-{i}")).settlement
        assert settled.total.amount == str(example["expect"]["total"]), (ruleset_id, example["name"])
        assert {k: v for k, v in lines_of(settled).items() if k in example["expect"]["lines"]} == example["expect"]["lines"]
        by_contract[f"M-{i}"] = settled
    # the EU example converts its USD ad spend at the rate given, and records the rate
    eu = next(s for s in by_contract.values() if s.fx_conversions)
    (fx,) = eu.fx_conversions
    assert (fx.metric, fx.amount, Decimal(fx.converted_amount)) == ("ad_spend", "4000", Decimal("3680"))
    assert fx.rate == pb.FxRate(base_currency_code="USD", quote_currency_code="EUR", rate="0.92", source="ECB", as_of_date=day(2026, 3, 31))
    # corrections, a batch and an active-days input join the workload
    assert examples[12][0] == "us-managed-standard"  # M-12 is US example 1, in March
    client.settle("mix-corr-1", ex2("M-12"))
    client.settle("mix-corr-2", ex1("M-12"), expected_revision=2)
    batch = ss.SettleBatchRequest(
        items=[ss.SettleBatchItem(request_id=f"mix-b-{i}", input=ex1(f"M-B-{i}", period=(2026, 1 + i))) for i in range(3)]
    )
    list(client.settlements.SettleBatch(iter([batch]), metadata=running.callers["erp"].metadata, timeout=60))

    stored = listed(client, "billing", include_superseded=True, page_size=7)
    assert len(stored) == 17 + 2 + 3
    for settlement in stored:
        replay = client.call("ReplaySettlement", ss.ReplaySettlementRequest(name=settlement.name), "compliance")
        assert replay.match, (settlement.name, replay.first_difference)
        assert (replay.first_difference, replay.engine_version) == ("", ENGINE_VERSION)
    assert records(client) == SHIPPED_LINKS + 22


def _engine(running: Running) -> sa.Engine:
    return sa.create_engine(running.database_url)


def test_verify_audit_log_detects_rows_changed_in_the_database(running: Running) -> None:
    client = running.client
    load_us(client)
    tenant = running.callers.tenant
    names = [client.settle(f"audit-{i}", ex1(f"A-{i}")).settlement.name for i in range(3)]
    ids = [name.removeprefix("settlements/") for name in names]
    seq = {sid: US_LINKS + 1 + i for i, sid in enumerate(ids)}  # 13, 14, 15
    s = settlements
    engine = _engine(running)

    def row(sid: str) -> dict[str, Any]:
        with engine.connect() as conn:
            return dict(conn.execute(sa.select(s).where(s.c.settlement_id == sid)).one()._mapping)

    originals = {sid: row(sid) for sid in ids}

    def change(*statements: Any) -> None:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(statement)

    def restore() -> None:
        with engine.begin() as conn:
            conn.execute(s.delete().where(s.c.tenant == tenant))
            conn.execute(s.insert(), [originals[sid] for sid in ids])
        report = audit(client)
        assert report.ok and report.records_checked == US_LINKS + 3, report

    def broken(kind: str, sequence: int, record: str) -> None:
        report = audit(client)
        assert (report.ok, report.failure, report.failed_sequence, report.failed_record) == (False, kind, sequence, record), report

    try:
        assert records(client) == US_LINKS + 3
        # an edited total (the decision says otherwise: replay notices too)
        change(s.update().where(s.c.settlement_id == ids[1]).values(total="1.00"))
        broken("HASH_MISMATCH", seq[ids[1]], names[1])
        restore()
        decision = bytes(originals[ids[1]]["decision_json"]).replace(b'"total":"11950.05"', b'"total":"11950.06"')
        change(s.update().where(s.c.settlement_id == ids[1]).values(decision_json=decision))
        broken("HASH_MISMATCH", seq[ids[1]], names[1])
        replay = client.call("ReplaySettlement", ss.ReplaySettlementRequest(name=names[1]), "compliance")
        assert not replay.match and replay.first_difference == "total: stored '11950.06', recomputed '11950.05'"
        restore()
        # a deleted row in the middle, and the newest row
        change(s.delete().where(s.c.settlement_id == ids[1]))
        broken("SEQUENCE_GAP", seq[ids[1]], names[2])
        restore()
        change(s.delete().where(s.c.settlement_id == ids[2]))
        broken("HEAD_MISMATCH", seq[ids[2]], names[1])
        restore()
        # two rows' chain_seq swapped
        change(
            s.update().where(s.c.settlement_id == ids[0]).values(chain_seq=-1),
            s.update().where(s.c.settlement_id == ids[1]).values(chain_seq=seq[ids[0]]),
            s.update().where(s.c.settlement_id == ids[0]).values(chain_seq=seq[ids[1]]),
        )
        broken("HASH_MISMATCH", seq[ids[0]], names[1])
        restore()
        # a forged row appended with a correctly computed hash (the stored head does not know it)
        forged = dict(originals[ids[2]], settlement_id="f" * 32, request_id="forged", contract_id="A-forged", total="0.00")
        forged["chain_seq"], forged["previous_hash"] = seq[ids[2]] + 1, originals[ids[2]]["record_hash"]
        forged["record_hash"] = link_hash(forged["previous_hash"], canonical_content(KIND_SETTLEMENT, forged))
        change(s.insert().values(forged))
        broken("HEAD_MISMATCH", seq[ids[2]] + 1, "settlements/" + "f" * 32)
        # …and one forged into the middle, the later rows renumbered
        change(s.delete().where(s.c.settlement_id == "f" * 32))
        change(
            s.update().where(s.c.settlement_id == ids[2]).values(chain_seq=seq[ids[2]] + 1),
            s.insert().values(dict(forged, chain_seq=seq[ids[2]], previous_hash=originals[ids[1]]["record_hash"])),
        )
        broken("HASH_MISMATCH", seq[ids[2]], "settlements/" + "f" * 32)
        restore()
        # a ruleset version edited (the chain's first link)
        v = ruleset_versions
        where = sa.and_(v.c.tenant == tenant, v.c.ruleset_id == "us-managed-standard", v.c.version == 1)
        change(v.update().where(where).values(effective_from=datetime.date(2025, 1, 1)))
        broken("HASH_MISMATCH", 1, f"{US}/versions/1")
        change(v.update().where(where).values(effective_from=datetime.date(2026, 1, 1)))
        assert audit(client).ok
        # the head moved back
        with engine.connect() as conn:
            head = conn.execute(sa.select(chain_heads).where(chain_heads.c.tenant == tenant)).one()
        change(chain_heads.update().where(chain_heads.c.tenant == tenant).values(last_seq=head.last_seq - 1))
        broken("HEAD_MISMATCH", head.last_seq, names[2])
        change(chain_heads.update().where(chain_heads.c.tenant == tenant).values(last_seq=head.last_seq))
        # another tenant's chain is its own: tampering here is not reported there
        assert audit_as(client, "other-compliance").ok
    finally:
        engine.dispose()
    assert records(client) == US_LINKS + 3


def audit_as(client: Client, role: str) -> ss.VerifyAuditLogResponse:
    return client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), role)


def test_a_restarted_server_keeps_everything(running: Running, tmp_path: Path) -> None:
    load_us(running.client)
    with server_processes(running, 1) as (client,):
        first = client.settle("restart-1", ex1("C-restart")).settlement
        correction = client.settle("restart-2", ex2("C-restart")).settlement
    with server_processes(running, 1) as (client,):
        assert get(client, first.name) == first and get(client, correction.name) == correction
        again = client.settle("restart-1", ex1("C-restart"))
        assert again.deduplicated and again.settlement == first
        assert records(client) == US_LINKS + 2
        replay = client.call("ReplaySettlement", ss.ReplaySettlementRequest(name=correction.name), "compliance")
        assert replay.match, replay.first_difference
        third = client.settle("restart-3", ex1("C-restart")).settlement
        assert (third.revision, third.supersedes, third.chain_sequence) == (3, correction.name, US_LINKS + 3)
        assert third.previous_hash == correction.record_hash
        breakdown = client.call("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=third.name), "billing")
        assert (breakdown.previous_total.amount, breakdown.total_delta.amount) == ("5650.00", "6300.05")
    assert records(running.client) == US_LINKS + 3


def test_a_version_approved_or_retired_through_another_process_is_used_by_the_next_settlement(running: Running) -> None:
    """The server keeps the version in effect per tenant; a lifecycle change made through
    another server process on the same database must still decide the next Settle and
    SettleBatch item here (and a retry of an earlier request still gets its stored decision)."""
    load_us(running.client)
    here = running.client
    first = here.settle("v-1", ex1("C-v1")).settlement
    assert first.ruleset_version == f"{US}/versions/1"
    renamed = US_SOURCE.replace("title: US managed store, standard terms", "title: US managed store, standard terms (v2)")
    with server_processes(running, 1) as (there,):
        draft = there.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=renamed), "admin").ruleset_version
        assert here.settle("v-2", ex1("C-v2")).settlement.ruleset_version == f"{US}/versions/1"  # a draft decides nothing
        there.call("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=draft.name), "compliance")
        assert here.settle("v-3", ex1("C-v3")).settlement.ruleset_version == draft.name
        there.call("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=draft.name), "compliance")
        batch = ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id=f"v-b{i}", input=ex1(f"C-b{i}")) for i in range(3)])
        answers = [result for response in here.settlements.SettleBatch(iter([batch]), metadata=running.callers["erp"].metadata, timeout=30)
                   for result in response.results]  # fmt: skip
        assert [result.settlement.ruleset_version for result in answers] == [f"{US}/versions/1"] * 3
        there.call("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=f"{US}/versions/1"), "compliance")
        again = here.settle("v-1", ex1("C-v1"))
        assert again.deduplicated and again.settlement == first
        fails(lambda: here.settle("v-4", ex1("C-v4")), grpc.StatusCode.FAILED_PRECONDITION, "NO_VERSION_IN_EFFECT")
    records(here)
