"""The service end to end over a real port: create, approve, settle, read, explain, replay, verify."""

from __future__ import annotations

from kpisettle.v1 import settlement_service_pb2 as ss

from tests.server_harness import Running, us_input


def test_settle_and_audit_one_month(running: Running) -> None:
    client = running.client
    versions = client.load_shipped_rulesets()
    assert [v.state for v in versions] == [rs_state_approved()] * 4
    first = client.settle("req-1", us_input())
    assert not first.deduplicated
    settlement = first.settlement
    # base 3000 + commission 50000×5% + 50000×6% + 25000×8% = 7500 + bonus step 2: 1% × 125000 = 1250
    assert settlement.total.amount == "11750.00"
    assert settlement.revision == 1 and settlement.name.startswith("settlements/")
    again = client.settle("req-1", us_input())
    assert again.deduplicated and again.settlement == settlement
    breakdown = client.call("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=settlement.name), "billing")
    assert breakdown.total == settlement.total and [line.id for line in breakdown.lines] == [line.id for line in settlement.lines]
    explained = client.call("ExplainSettlement", ss.ExplainSettlementRequest(name=settlement.name, language_code="zh"), "compliance")
    assert any(settlement.total.amount in sentence for sentence in explained.sentences)
    replay = client.call("ReplaySettlement", ss.ReplaySettlementRequest(name=settlement.name), "compliance")
    assert replay.match, replay.first_difference
    verified = client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")
    assert verified.ok and verified.records_checked == 4 * 2 + 4 + 1  # versions, their CREATED+APPROVED events, one settlement


def rs_state_approved() -> int:
    from kpisettle.v1 import resources_pb2

    return resources_pb2.RulesetVersion.STATE_APPROVED
