"""RulesetService over a real port, on SQLite and PostgreSQL (SPEC §2, §6, §7, §9).

Validation, the version lifecycle (create, four-eyes approval, retire), reads and pages,
business-level diffs, impact analysis that writes nothing, and the effective-dated choice
of a version for a settlement. Variants of the shipped US ruleset are made by replacing
text in rulesets/us-managed-standard.yaml; every replaced text must occur exactly once.
"""

from __future__ import annotations

import base64
import datetime
import re
import threading
from decimal import Decimal
from typing import Any

import grpc
import orjson
import pytest
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from tests.server_harness import RULESETS, Running, us_input

US_PATH = RULESETS / "us-managed-standard.yaml"
US = US_PATH.read_text(encoding="utf-8")
US_NAME = "rulesets/us-managed-standard"
DRAFT, APPROVED, RETIRED = pb.RulesetVersion.STATE_DRAFT, pb.RulesetVersion.STATE_APPROVED, pb.RulesetVersion.STATE_RETIRED


# ------------------------------------------------------------------ helpers


def edit(source: str, *pairs: tuple[str, str]) -> str:
    """`source` with each (old, new) replaced; each old text must occur exactly once."""
    for old, new in pairs:
        assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times"
        source = source.replace(old, new)
    return source


def position(source: str, line_text: str, token: str) -> tuple[int, int]:
    """1-based line and column of `token` on the one line containing `line_text`."""
    lines = [i for i, line in enumerate(source.splitlines()) if line_text in line]
    assert len(lines) == 1, line_text
    line = source.splitlines()[lines[0]]
    return lines[0] + 1, line.index(token) + 1


def failure(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {error}")


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend((v.field, v.description) for v in bad.field_violations)
    return found


def assert_error(error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert (info.reason, info.domain) == (reason, "kpisettle.v1"), info


def day(year: int, month: int, day_: int) -> date_pb2.Date:
    return date_pb2.Date(year=year, month=month, day=day_)


def create(running: Running, source: str, as_: str = "admin") -> pb.RulesetVersion:
    response = running.client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=source), as_)
    return response.ruleset_version  # type: ignore[no-any-return]


def approve(running: Running, name: str, as_: str = "compliance", note: str = "") -> pb.RulesetVersion:
    return running.client.call("ApproveRulesetVersion", rs.ApproveRulesetVersionRequest(name=name, note=note), as_).ruleset_version  # type: ignore[no-any-return]


def retire(running: Running, name: str, as_: str = "compliance", note: str = "") -> pb.RulesetVersion:
    return running.client.call("RetireRulesetVersion", rs.RetireRulesetVersionRequest(name=name, note=note), as_).ruleset_version  # type: ignore[no-any-return]


def get(running: Running, name: str, as_: str = "compliance") -> pb.RulesetVersion:
    return running.client.call("GetRulesetVersion", rs.GetRulesetVersionRequest(name=name), as_).ruleset_version  # type: ignore[no-any-return]


def list_page(running: Running, parent: str, page_size: int = 0, page_token: str = "", as_: str = "compliance") -> Any:
    return running.client.call(
        "ListRulesetVersions", rs.ListRulesetVersionsRequest(parent=parent, page_size=page_size, page_token=page_token), as_
    )


def list_all(running: Running, parent: str, page_size: int) -> tuple[list[str], int]:
    """Every version name under `parent`, walking the pages; and the number of pages."""
    names: list[str] = []
    token, pages = "", 0
    while True:
        page = list_page(running, parent, page_size, token)
        pages += 1
        assert len(page.ruleset_versions) <= page_size
        names.extend(v.name for v in page.ruleset_versions)
        token = page.next_page_token
        if not token:
            return names, pages
        assert pages < 100


def records_checked(running: Running) -> int:
    verified = running.client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), "compliance")
    assert verified.ok, verified
    return int(verified.records_checked)


def utc(stamp: Any) -> datetime.datetime:
    return stamp.ToDatetime(tzinfo=datetime.UTC)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ ValidateRuleset


SHIPPED = sorted(RULESETS.glob("*.yaml"))


def test_validate_shipped_rulesets(running: Running) -> None:
    for path in SHIPPED:
        source = path.read_text(encoding="utf-8")
        report = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=source), "compliance")
        assert report.valid and report.examples_pass, (path.name, report.problems)
        assert report.ruleset_id == path.stem
        assert re.fullmatch(r"[0-9a-f]{64}", report.content_hash)
        assert [p for p in report.problems if p.severity == "ERROR"] == []
        assert report.examples and all(e.passed and not e.mismatches for e in report.examples)
    # the US ruleset in detail: its five examples by name, in order; admin may validate too
    report = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=US), "admin")
    assert [e.name for e in report.examples] == [
        "hits the stretch target",
        "misses target with ACoS, ODR and response penalties, penalty cap applies",
        "platform review in April, target prorated and penalties waived",
        "small store on a reduced fee, total floor applies",
        "Japan-market store on the US template, market multiplier",
    ]
    # the hash does not depend on comments or layout
    again = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source="# a comment\n" + US), "admin")
    assert again.content_hash == report.content_hash


INVALID_EDITS = (
    ('formula: "gross_gmv - refunds"', 'formula: "gross_gmv - refundz"'),
    ('{up_to: "100000", rate: "6%"}', '{up_to: "40000", rate: "6%"}'),
    ("exempt_by: [stockout, platform_review]", "exempt_by: [stockout, holiday]"),
)


def invalid_source() -> tuple[str, list[tuple[str, str, int, int]]]:
    """A US variant with three errors, and each error's (code, path, line, column)."""
    source = edit(US, *INVALID_EDITS)
    expected = [
        ("expr.unknown_name", "kpis.net_gmv.formula", *position(source, "gross_gmv - refundz", '"gross_gmv')),
        ("tiers.not_increasing", "fees[1].tiers[1].up_to", *position(source, '{up_to: "40000"', '"40000"')),
        ("penalty.unknown_exemption", "fees[4].exempt_by[1]", *position(source, "[stockout, holiday]", "holiday")),
    ]
    return source, expected


def test_validate_invalid_ruleset_reports_every_problem(running: Running) -> None:
    source, expected = invalid_source()
    report = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=source), "compliance")
    assert not report.valid and not report.examples_pass
    errors = [(p.code, p.path, p.line, p.column) for p in report.problems if p.severity == "ERROR"]
    assert errors == expected
    by_code = {p.code: p.message for p in report.problems}
    assert "refundz" in by_code["expr.unknown_name"]
    assert "40000" in by_code["tiers.not_increasing"]
    assert "holiday" in by_code["penalty.unknown_exemption"]
    assert list(report.examples) == []  # examples do not run for a ruleset that does not compile


def test_validate_ruleset_whose_example_fails(running: Running) -> None:
    source = edit(US, ('total: "11950.05"', 'total: "11950.06"'))
    report = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=source), "compliance")
    assert report.valid and not report.examples_pass
    assert [(e.passed, list(e.mismatches)) for e in report.examples] == [
        (False, ["total: expected 11950.06, got 11950.05"]),
        (True, []),
        (True, []),
        (True, []),
        (True, []),
    ]
    line, column = position(source, 'total: "11950.06"', '"11950.06"')
    assert [(p.code, p.path, p.severity, p.line, p.column) for p in report.problems] == [
        ("example.failed", "examples[0].expect.total", "ERROR", line, column)
    ]
    assert "11950.06" in report.problems[0].message and "11950.05" in report.problems[0].message


def test_validate_refuses_empty_and_oversized_text(running: Running) -> None:
    for source in ("", "  \n\t "):
        error = failure(lambda s=source: running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=s), "admin"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations(error)] == ["source"]
    huge = US + "#" + "x" * (300 * 1024) + "\n"
    error = failure(lambda: running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=huge), "admin"))
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "RULESET_TOO_LARGE")


# ------------------------------------------------------------------ CreateRulesetVersion


def test_create_numbers_versions_per_ruleset_and_records_who_and_when(running: Running) -> None:
    expected_hash = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=US), "admin").content_hash
    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)
    first = create(running, US)
    after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=5)
    assert first.name == f"{US_NAME}/versions/1"
    assert first.state == DRAFT
    assert first.content_hash == expected_hash
    assert first.author == "admin-user" and first.approver == ""
    assert first.source == US  # exactly as sent
    assert (first.effective_from_date.year, first.effective_from_date.month, first.effective_from_date.day) == (2026, 1, 1)
    assert (first.title, first.currency_code) == ("US managed store, standard terms", "USD")
    assert first.examples_pass
    assert not first.HasField("approve_time") and not first.HasField("retire_time")
    assert [(e.action, e.principal) for e in first.events] == [("CREATED", "admin-user")]
    assert before <= utc(first.events[0].time) <= after
    assert utc(first.create_time) == utc(first.events[0].time)

    second_source = edit(US, ("title: US managed store, standard terms", "title: US managed store, 2026 terms"))
    second = create(running, second_source, "admin-compliance")
    third = create(running, US)  # the same text again is a new version
    other = create(running, edit(US, ("ruleset: us-managed-standard", "ruleset: us-managed-premium")))
    assert [second.name, third.name, other.name] == [
        f"{US_NAME}/versions/2",
        f"{US_NAME}/versions/3",
        "rulesets/us-managed-premium/versions/1",
    ]
    assert second.author == "admin-compliance-user" and second.title == "US managed store, 2026 terms"
    assert second.content_hash != first.content_hash and third.content_hash == first.content_hash
    assert [e.principal for e in second.events] == ["admin-compliance-user"]
    # a read shows the same version
    assert get(running, first.name) == first


def test_create_refuses_an_invalid_ruleset_listing_every_problem(running: Running) -> None:
    source, expected = invalid_source()
    error = failure(lambda: create(running, source))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "RULESET_INVALID")
    report = running.client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=source), "admin")
    messages = {p.code: p.message for p in report.problems}
    assert violations(error) == [(f"source.{path}", f"{line}:{column}: {code}: {messages[code]}") for code, path, line, column in expected]
    for source_text in ("", " \n "):
        error = failure(lambda s=source_text: create(running, s))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(error) == [("source", "the ruleset text is empty")]
    error = failure(lambda: create(running, "ruleset: [unclosed"))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "RULESET_INVALID")
    assert len(violations(error)) == 1 and re.match(r"\d+:\d+: source\.syntax: ", violations(error)[0][1])
    huge = US + "#" + "x" * (300 * 1024) + "\n"
    assert_error(failure(lambda: create(running, huge)), grpc.StatusCode.RESOURCE_EXHAUSTED, "RULESET_TOO_LARGE")
    # nothing was stored: the first version created now is version 1
    assert list(list_page(running, "rulesets/-").ruleset_versions) == []
    assert create(running, US).name == f"{US_NAME}/versions/1"


def test_create_stores_a_draft_whose_examples_fail(running: Running) -> None:
    created = create(running, edit(US, ('total: "11950.05"', 'total: "11950.06"')))
    assert created.state == DRAFT and not created.examples_pass


# ------------------------------------------------------------------ ApproveRulesetVersion


def test_approve_needs_four_eyes_passing_examples_and_a_draft(running: Running) -> None:
    own = create(running, US, "admin-compliance")
    error = failure(lambda: approve(running, own.name, "admin-compliance"))
    assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "FOUR_EYES")
    assert get(running, own.name).state == DRAFT

    error = failure(lambda: approve(running, own.name, "admin"))  # not the compliance role
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert get(running, own.name).state == DRAFT

    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)
    approved = approve(running, own.name, "compliance", note="reviewed against the signed contract")
    assert approved.state == APPROVED
    assert (approved.author, approved.approver) == ("admin-compliance-user", "compliance-user")
    assert [(e.action, e.principal, e.note) for e in approved.events] == [
        ("CREATED", "admin-compliance-user", ""),
        ("APPROVED", "compliance-user", "reviewed against the signed contract"),
    ]
    assert before <= utc(approved.approve_time) == utc(approved.events[1].time)
    assert utc(approved.events[0].time) <= utc(approved.events[1].time)
    assert get(running, own.name) == approved

    for caller in ("compliance", "compliance2"):  # an APPROVED version cannot be approved again
        error = failure(lambda c=caller: approve(running, own.name, c))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "APPROVED" in (error.details() or "")

    failing = create(running, edit(US, ('total: "11950.05"', 'total: "11950.06"')))
    error = failure(lambda: approve(running, failing.name))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "EXAMPLES_FAIL")
    assert [field for field, _ in violations(error)] == ["source.examples[0].expect.total"]
    assert "example.failed" in violations(error)[0][1] and "11950.06" in violations(error)[0][1]
    assert get(running, failing.name).state == DRAFT

    retire(running, own.name)
    error = failure(lambda: approve(running, own.name, "compliance2"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "RETIRED" in (error.details() or "")

    missing = failure(lambda: approve(running, f"{US_NAME}/versions/99"))
    assert_error(missing, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    error = failure(lambda: approve(running, failing.name, note="x" * 5000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations(error)] == ["note"]


def at_once(running: Running, action: Any, name: str, callers: tuple[str, ...]) -> list[grpc.StatusCode]:
    """Run `action(running, name, caller)` for every caller at the same moment; the status codes."""
    outcomes: list[grpc.StatusCode] = []
    barrier = threading.Barrier(len(callers))

    def run(caller: str) -> None:
        barrier.wait()
        try:
            action(running, name, caller)
            outcomes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            outcomes.append(error.code())

    threads = [threading.Thread(target=run, args=(caller,)) for caller in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return sorted(outcomes, key=str)


def test_concurrent_approvals_and_retirements_record_one_event(running: Running) -> None:
    """The losers of a race see FAILED_PRECONDITION (the state is wrong now), not ABORTED."""
    created = create(running, US)
    callers = ("compliance", "compliance2") * 3
    expected = sorted([grpc.StatusCode.OK] + [grpc.StatusCode.FAILED_PRECONDITION] * 5, key=str)
    assert at_once(running, approve, created.name, callers) == expected
    assert at_once(running, retire, created.name, callers) == expected
    assert [e.action for e in get(running, created.name).events] == ["CREATED", "APPROVED", "RETIRED"]


# ------------------------------------------------------------------ RetireRulesetVersion


def test_retire_drafts_and_approved_versions_which_stay_readable(running: Running) -> None:
    draft = create(running, US)
    retired = retire(running, draft.name, note="superseded before review")
    assert retired.state == RETIRED and retired.approver == ""
    assert [(e.action, e.principal, e.note) for e in retired.events] == [
        ("CREATED", "admin-user", ""),
        ("RETIRED", "compliance-user", "superseded before review"),
    ]
    assert utc(retired.retire_time) == utc(retired.events[1].time)

    approved = running.client.create_and_approve(US)
    settled = running.client.settle("retire-1", us_input("C-retire")).settlement
    assert settled.ruleset_version == approved.name
    retired_approved = retire(running, approved.name, "compliance2")
    assert retired_approved.state == RETIRED and retired_approved.approver == "compliance-user"
    assert [(e.action, e.principal) for e in retired_approved.events] == [
        ("CREATED", "admin-user"),
        ("APPROVED", "compliance-user"),
        ("RETIRED", "second-compliance-user"),
    ]

    for name in (draft.name, approved.name):
        error = failure(lambda n=name: retire(running, n))
        assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_RETIRED")
    # still readable, with its source, listed, and the settlement it made replays
    read = get(running, approved.name)
    assert read.state == RETIRED and read.source == US and read == retired_approved
    assert [(v.name, v.state) for v in list_page(running, US_NAME).ruleset_versions] == [(draft.name, RETIRED), (approved.name, RETIRED)]
    replay = running.client.call("ReplaySettlement", ss.ReplaySettlementRequest(name=settled.name), "compliance")
    assert replay.match, replay.first_difference
    assert failure(lambda: retire(running, f"{US_NAME}/versions/7")).code() == grpc.StatusCode.NOT_FOUND
    assert failure(lambda: retire(running, draft.name, "admin")).code() == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------------ GetRulesetVersion


def test_get_not_found_and_malformed_names(running: Running) -> None:
    created = create(running, US)
    assert get(running, created.name).source == US
    for name in (f"{US_NAME}/versions/2", "rulesets/no-such-ruleset/versions/1"):
        assert_error(failure(lambda n=name: get(running, n)), grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    for name in (
        "",
        US_NAME,
        f"{US_NAME}/versions/0",
        f"{US_NAME}/versions/-1",
        f"{US_NAME}/versions/one",
        f"{US_NAME}/versions/1/extra",
        "rulesets/US-Managed/versions/1",
        "rulesets//versions/1",
        "settlements/abc",
        f"{US_NAME}/versions/1 ",
        "rulesets/" + "a" * 100 + "/versions/1",
    ):
        error = failure(lambda n=name: get(running, n))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [f for f, _ in violations(error)] == ["name"], name


# ------------------------------------------------------------------ ListRulesetVersions


def test_list_and_paginate(running: Running) -> None:
    premium = edit(US, ("ruleset: us-managed-standard", "ruleset: us-managed-premium"))
    for _ in range(5):
        create(running, US)
    for _ in range(2):
        create(running, premium)
    standard = [f"{US_NAME}/versions/{n}" for n in range(1, 6)]
    every = [f"rulesets/us-managed-premium/versions/{n}" for n in (1, 2)] + standard

    page = list_page(running, US_NAME)
    assert [v.name for v in page.ruleset_versions] == standard and page.next_page_token == ""
    for item in page.ruleset_versions:  # list items carry everything but the source
        assert item.source == "" and item.content_hash and item.state == DRAFT and item.author == "admin-user"
        assert item.title == "US managed store, standard terms" and item.examples_pass
        assert [e.action for e in item.events] == ["CREATED"]
    assert [v.name for v in list_page(running, "rulesets/-").ruleset_versions] == every
    assert list(list_page(running, "rulesets/no-such-ruleset").ruleset_versions) == []

    # page_size 0 is the default (50), above the maximum is coerced: one page either way
    for size in (0, 1000, 5000, 2**31 - 1):
        page = list_page(running, "rulesets/-", size)
        assert [v.name for v in page.ruleset_versions] == every and page.next_page_token == ""
    # walking pages: every version once, in order
    assert list_all(running, US_NAME, 2) == (standard, 3)
    assert list_all(running, "rulesets/-", 3) == (every, 3)
    assert list_all(running, "rulesets/-", 1) == (every, 7)
    assert list_all(running, US_NAME, 5) == (standard, 1)  # an exactly full last page ends the list

    error = failure(lambda: list_page(running, US_NAME, -1))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert [f for f, _ in violations(error)] == ["page_size"]

    token = list_page(running, US_NAME, 2).next_page_token
    assert token
    forged = [
        base64.urlsafe_b64encode(orjson.dumps(value)).decode()
        for value in (
            {"k": "rulesets", "v": 5},
            {"k": "rulesets", "v": [US_NAME, "us-managed-standard", "x"]},
            {"k": "rulesets", "v": [US_NAME, 1, 2]},
            {"k": "rulesets", "v": [US_NAME, "us-managed-standard", 2**40]},
            {"k": "rulesets", "v": ["us-managed-standard", 2]},
            {"k": "settlements", "v": ["2026-03-01", "C-1", 1]},
            {"k": "rulesets"},
        )
    ]
    for bad in ("garbage", "!!!", "e30=", token[:-4], *forged):
        error = failure(lambda t=bad: list_page(running, US_NAME, 2, t))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [f for f, _ in violations(error)] == ["page_token"], bad
    # a token belongs to the parent it was issued for
    error = failure(lambda: list_page(running, "rulesets/-", 2, token))
    assert [f for f, _ in violations(error)] == ["page_token"]

    for parent in ("", "rulesets", f"{US_NAME}/versions/1", "rulesets/-/versions", "rulesets/UPPER", "settlements/-"):
        error = failure(lambda p=parent: list_page(running, p))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [f for f, _ in violations(error)] == ["parent"], parent


def test_a_full_page_of_the_largest_size_still_has_a_next_page(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store caps a page at the largest page size; a full page of that size must still
    point to the next. Shrunk to a largest size of 3 here (both limits are the same 1000)."""
    import server.paging
    import server.storage.sql

    monkeypatch.setattr(server.paging, "MAX_PAGE_SIZE", 3)
    monkeypatch.setattr(server.storage.sql, "MAX_PAGE_SIZE", 3)
    for _ in range(4):
        create(running, US)
    first = list_page(running, US_NAME, 3)
    assert len(first.ruleset_versions) == 3 and first.next_page_token
    assert list_all(running, US_NAME, 100) == ([f"{US_NAME}/versions/{n}" for n in range(1, 5)], 2)


# ------------------------------------------------------------------ DiffRulesetVersions


def test_diff_shows_a_threshold_and_a_tier_rate_in_business_terms(running: Running) -> None:
    old = create(running, US)
    new = create(
        running, edit(US, ('when: "acos > 28%"', 'when: "acos > 30%"'), ('{up_to: "100000", rate: "6%"}', '{up_to: "100000", rate: "7%"}'))
    )
    diff = running.client.call("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=old.name, other_name=new.name), "compliance")
    assert [(c.change, c.path, c.before, c.after, c.description) for c in diff.changes] == [
        ("CHANGED", "fees[1].tiers[1].rate", "6%", "7%", "commission tier 2 (50000–100000) rate 6% → 7%"),
        ("CHANGED", "fees[4].when", "acos > 28%", "acos > 30%", "acos_penalty condition: acos > 28% → acos > 30%"),
    ]
    back = running.client.call("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=new.name, other_name=old.name), "compliance")
    assert [(c.path, c.before, c.after) for c in back.changes] == [
        ("fees[1].tiers[1].rate", "7%", "6%"),
        ("fees[4].when", "acos > 30%", "acos > 28%"),
    ]
    same = running.client.call("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=old.name, other_name=old.name), "compliance")
    assert list(same.changes) == []
    missing = f"{US_NAME}/versions/9"
    error = failure(
        lambda: running.client.call("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=old.name, other_name=missing), "compliance")
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = failure(
        lambda: running.client.call("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=old.name, other_name="x"), "compliance")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations(error)] == ["other_name"]


# ------------------------------------------------------------------ AnalyzeImpact


def impact(running: Running, candidate: str, start: date_pb2.Date, end: date_pb2.Date) -> Any:
    request = rs.AnalyzeImpactRequest(candidate=candidate, period_start_from_date=start, period_start_to_date=end)
    return running.client.call("AnalyzeImpact", request, "compliance")


def test_analyze_impact_reruns_stored_settlements_and_writes_nothing(running: Running) -> None:
    client = running.client
    v1 = client.create_and_approve(US)
    # Under v1 (net GMV = gross - 5000 refunds; ACoS 20%: no ACoS bonus or penalty):
    #   C-1 first settled at net 125000, then corrected to net 130000 (only the correction counts):
    #       3000 + (2500 + 3000 + 30000×8% = 7900) + 1%×130000 = 1300  → 12200.00
    #   C-2 net 75000, attainment 0.75: 3000 + (2500 + 25000×6% = 4000)  → 7000.00
    #   C-3 net 200000, attainment 2.0: 3000 + (2500 + 3000 + 100000×8% = 13500) + 2000  → 18500.00
    #   C-4 settles April: outside the range.
    client.settle("imp-1a", us_input("C-1", "130000"))
    assert client.settle("imp-1b", us_input("C-1", "135000")).settlement.total.amount == "12200.00"
    assert client.settle("imp-2", us_input("C-2", "80000")).settlement.total.amount == "7000.00"
    assert client.settle("imp-3", us_input("C-3", "205000")).settlement.total.amount == "18500.00"
    client.settle("imp-4", us_input("C-4", "205000", period=(2026, 4)))
    # v2, a draft: the top tier at 9% instead of 8% (its examples fail; a draft is fine)
    v2 = create(running, edit(US, ('{rate: "8%"}', '{rate: "9%"}')))
    assert v2.state == DRAFT and not v2.examples_pass
    checked = records_checked(running)

    result = impact(running, v2.name, day(2026, 3, 1), day(2026, 3, 31))
    # Under v2: C-1 +30000×1% = 12500.00; C-2 unchanged 7000.00; C-3 +100000×1% = 19500.00
    rows = [(i.contract_id, i.old_total.amount, i.new_total.amount, i.delta, i.old_total.currency_code, i.error) for i in result.impacts]
    assert rows == [
        ("C-1", "12200.00", "12500.00", "300.00", "USD", ""),
        ("C-2", "7000.00", "7000.00", "0.00", "USD", ""),
        ("C-3", "18500.00", "19500.00", "1000.00", "USD", ""),
    ]
    assert all(
        i.new_total.currency_code == "USD" and (i.period_start_date.month, i.period_start_date.day) == (3, 1) for i in result.impacts
    )
    assert [(t.currency_code, t.old_total, t.new_total, t.delta) for t in result.totals] == [("USD", "37700.00", "39000.00", "1300.00")]
    assert (result.settlements_analyzed, result.settlements_failed) == (3, 0)
    # the impacts name the latest revisions
    latest = client.call("ListSettlements", ss.ListSettlementsRequest(contract_id="C-1"), "erp").settlements
    assert [s.revision for s in latest] == [2] and result.impacts[0].settlement == latest[0].name
    # the approved version itself: no change; a range with nothing in it: nothing
    same = impact(running, v1.name, day(2026, 3, 1), day(2026, 4, 1))
    assert [i.delta for i in same.impacts] == ["0.00"] * 4
    assert [(t.old_total, t.new_total, t.delta) for t in same.totals] == [("56200.00", "56200.00", "0.00")]
    empty = impact(running, v2.name, day(2025, 1, 1), day(2025, 12, 31))
    assert (list(empty.impacts), list(empty.totals), empty.settlements_analyzed) == ([], [], 0)
    one_day = impact(running, v2.name, day(2026, 4, 1), day(2026, 4, 1))
    assert [(i.contract_id, i.old_total.amount, i.new_total.amount) for i in one_day.impacts] == [("C-4", "18500.00", "19500.00")]

    # a candidate that cannot settle these inputs: each impact says why, nothing is summed
    no_us = create(running, edit(US, ('  US: {multiplier: "1.00"}\n', "")))
    failed = impact(running, no_us.name, day(2026, 3, 1), day(2026, 3, 31))
    assert (failed.settlements_analyzed, failed.settlements_failed, list(failed.totals)) == (3, 3, [])
    assert all(i.error and "US" in i.error and not i.HasField("new_total") and i.delta == "" for i in failed.impacts)
    assert [i.old_total.amount for i in failed.impacts] == ["12200.00", "7000.00", "18500.00"]

    # a candidate settling quarters cannot stand in for monthly settlements
    quarterly = create(running, edit(US, ("period: month", "period: quarter")))
    mismatch = impact(running, quarterly.name, day(2026, 4, 1), day(2026, 4, 30))
    assert mismatch.settlements_failed == 1 and "period" in mismatch.impacts[0].error

    # analysis wrote nothing: the audit chain holds only the two versions created since
    assert records_checked(running) == checked + 2 * 2


def test_analyze_impact_refuses_a_bad_period_range(running: Running) -> None:
    candidate = create(running, US)
    cases = {
        "inverted": (day(2026, 4, 1), day(2026, 3, 31), ["period_start_to_date"]),
        "not a date": (day(2026, 2, 30), day(2026, 3, 31), ["period_start_from_date"]),
        "missing": (date_pb2.Date(), date_pb2.Date(), ["period_start_from_date", "period_start_to_date"]),
    }
    for label, (start, end, fields) in cases.items():
        error = failure(lambda s=start, e=end: impact(running, candidate.name, s, e))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert [f for f, _ in violations(error)] == fields, label
    error = failure(lambda: impact(running, f"{US_NAME}/versions/2", day(2026, 3, 1), day(2026, 3, 31)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = failure(lambda: impact(running, US_NAME, day(2026, 3, 1), day(2026, 3, 31)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations(error)] == ["candidate"]


MARCH_1, APRIL_30 = day(2026, 3, 1), day(2026, 4, 30)


def impact_page(running: Running, candidate: str, page_size: int = 0, page_token: str = "", end: date_pb2.Date = APRIL_30) -> Any:
    request = rs.AnalyzeImpactRequest(
        candidate=candidate, period_start_from_date=MARCH_1, period_start_to_date=end, page_size=page_size, page_token=page_token
    )
    return running.client.call("AnalyzeImpact", request, "compliance")


def impact_pages(running: Running, candidate: str, page_size: int) -> list[Any]:
    """Every page of March–April, walking the tokens."""
    pages = [impact_page(running, candidate, page_size)]
    while pages[-1].next_page_token:
        pages.append(impact_page(running, candidate, page_size, pages[-1].next_page_token))
        assert len(pages) < 50
    return pages


def page_rows(page: Any) -> tuple[list[str], list[tuple[str, str, str, str]], tuple[int, int]]:
    return (
        [i.contract_id for i in page.impacts],
        [(t.currency_code, t.old_total, t.new_total, t.delta) for t in page.totals],
        (page.settlements_analyzed, page.settlements_failed),
    )


def seed_impact_range(running: Running) -> tuple[pb.RulesetVersion, pb.RulesetVersion]:
    """Six US settlements in March–April (C-1 corrected once) and, interleaved and after the
    last of them, two of another ruleset that the analysis skips; v1 approved, v2 a draft
    with the top tier at 9%. Old → new totals (see the test above for the arithmetic):
    C-1 12200.00 → 12500.00, C-2 7000.00 → 7000.00, C-3 18500.00 → 19500.00,
    C-4 11750.00 → 12000.00, C-5 7000.00 → 7000.00, C-6 (April) 18500.00 → 19500.00."""
    client = running.client
    v1 = client.create_and_approve(US)
    client.create_and_approve(edit(US, ("ruleset: us-managed-standard", "ruleset: us-other")))
    client.settle("pg-1a", us_input("C-1", "130000"))
    client.settle("pg-1b", us_input("C-1", "135000"))
    for contract, gross in (("C-2", "80000"), ("C-3", "205000"), ("C-4", "130000"), ("C-5", "80000")):
        client.settle(f"pg-{contract}", us_input(contract, gross))
    client.settle("pg-C-6", us_input("C-6", "205000", period=(2026, 4)))
    for contract, period in (("C-2A", (2026, 3)), ("Z-9", (2026, 4))):
        other = us_input(contract, "130000", period=period)
        other.ruleset = "rulesets/us-other"
        assert client.settle(f"pg-{contract}", other).settlement.total.amount == "11750.00"
    v2 = create(running, edit(US, ('{rate: "8%"}', '{rate: "9%"}')))
    return v1, v2


def test_analyze_impact_pages_through_a_range(running: Running) -> None:
    _, v2 = seed_impact_range(running)
    everything = ["C-1", "C-2", "C-3", "C-4", "C-5", "C-6"]
    whole = impact_page(running, v2.name)  # page_size 0: the default, 1000
    assert page_rows(whole) == (everything, [("USD", "74950.00", "77500.00", "2550.00")], (6, 0))
    assert whole.next_page_token == ""

    pages = impact_pages(running, v2.name, 2)
    assert [page_rows(p) for p in pages] == [
        (["C-1", "C-2"], [("USD", "19200.00", "19500.00", "300.00")], (2, 0)),
        (["C-3", "C-4"], [("USD", "30250.00", "31500.00", "1250.00")], (2, 0)),
        (["C-5", "C-6"], [("USD", "25500.00", "26500.00", "1000.00")], (2, 0)),
    ]
    assert [bool(p.next_page_token) for p in pages] == [True, True, False]  # Z-9 follows C-6, but is not the candidate's
    # every impact exactly once, in order, identical to the unpaged answer; the pages' totals add up to the cent
    assert [i for p in pages for i in p.impacts] == list(whole.impacts)
    summed = [sum((Decimal(getattr(t, f)) for p in pages for t in p.totals), Decimal(0)) for f in ("old_total", "new_total", "delta")]
    assert summed == [Decimal("74950.00"), Decimal("77500.00"), Decimal("2550.00")]
    assert [str(s) for s in summed] == [whole.totals[0].old_total, whole.totals[0].new_total, whole.totals[0].delta]
    assert sum(p.settlements_analyzed for p in pages) == whole.settlements_analyzed == 6

    assert [[i.contract_id for i in p.impacts] for p in impact_pages(running, v2.name, 4)] == [everything[:4], everything[4:]]
    assert [[i.contract_id for i in p.impacts] for p in impact_pages(running, v2.name, 5)] == [everything[:5], everything[5:]]
    exactly_full = impact_pages(running, v2.name, 6)  # a full page with no more of the candidate's: the last
    assert len(exactly_full) == 1 and exactly_full[0].impacts == whole.impacts
    for huge in (10_000, 10_001, 10**6, 2**31 - 1):  # above the maximum: coerced, not refused
        page = impact_page(running, v2.name, huge)
        assert page_rows(page) == page_rows(whole) and page.next_page_token == ""
    # page_size may change between pages: the token is a position
    first = impact_page(running, v2.name, 2)
    rest = impact_page(running, v2.name, 10, first.next_page_token)
    assert page_rows(rest)[0] == everything[2:] and rest.next_page_token == ""

    # a candidate that settles none of them: each page counts its own failures, sums nothing
    no_us = create(running, edit(US, ('  US: {multiplier: "1.00"}\n', "")))
    assert [page_rows(p) for p in impact_pages(running, no_us.name, 4)] == [(everything[:4], [], (4, 4)), (everything[4:], [], (2, 2))]


def test_analyze_impact_refuses_bad_page_sizes_and_tokens(running: Running) -> None:
    v1, v2 = seed_impact_range(running)
    for size in (-1, -(2**31)):
        error = failure(lambda s=size: impact_page(running, v2.name, s))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [f for f, _ in violations(error)] == ["page_size"]
    token = impact_page(running, v2.name, 2).next_page_token
    assert token and impact_page(running, v2.name, 2, token).impacts[0].contract_id == "C-3"

    def forged(value: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).decode()

    bound = [v2.name, "2026-03-01", "2026-04-30"]
    list_token = list_page(running, US_NAME, 1).next_page_token
    bad_tokens = {
        "garbage": "garbage",
        "not base64": "!!!",
        "empty object": "e30=",
        "cut short": token[:-4],
        "another list's": list_token,
        "no key": forged({"k": "impact"}),
        "a number": forged({"k": "impact", "v": 5}),
        "too short": forged({"k": "impact", "v": [*bound, "2026-03-01"]}),
        "not a date": forged({"k": "impact", "v": [*bound, "2026-13-01", "C-2"]}),
        "a date outside the range": forged({"k": "impact", "v": [*bound, "2026-05-01", "C-2"]}),
        "a contract id of no shape": forged({"k": "impact", "v": [*bound, "2026-03-01", "C\x002"]}),
        "a contract id that is a number": forged({"k": "impact", "v": [*bound, "2026-03-01", 2]}),
        "a settlements token": forged({"k": "settlements", "v": ["2026-03-01", "C-2", 1, "x"]}),
    }
    for label, bad in bad_tokens.items():
        error = failure(lambda t=bad: impact_page(running, v2.name, 2, t))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [f for f, _ in violations(error)] == ["page_token"], label
    # a well-formed token of this analysis is accepted (the forgery above failed for its content only)
    assert page_rows(impact_page(running, v2.name, 2, forged({"k": "impact", "v": [*bound, "2026-03-01", "C-2"]})))[0] == ["C-3", "C-4"]
    # a token belongs to the candidate and the range it was issued for
    replays = {
        "another candidate": lambda: impact_page(running, v1.name, 2, token),
        "another end": lambda: impact_page(running, v2.name, 2, token, end=day(2026, 5, 31)),
        "another start": lambda: running.client.call(
            "AnalyzeImpact",
            rs.AnalyzeImpactRequest(
                candidate=v2.name, period_start_from_date=day(2026, 2, 1), period_start_to_date=APRIL_30, page_size=2, page_token=token
            ),
            "compliance",
        ),
    }
    for label, replay in replays.items():
        error = failure(replay)
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [f for f, _ in violations(error)] == ["page_token"], label


def test_analyze_impact_page_limits(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default and the largest page size, and the byte budget that keeps a page under
    gRPC's 4 MiB, lowered here so that six settlements show them."""
    import server.ruleset_service

    _, v2 = seed_impact_range(running)
    whole = impact_page(running, v2.name)
    monkeypatch.setattr(server.ruleset_service, "IMPACT_DEFAULT_PAGE_SIZE", 4)
    monkeypatch.setattr(server.ruleset_service, "IMPACT_MAX_PAGE_SIZE", 3)
    assert [len(p.impacts) for p in impact_pages(running, v2.name, 0)] == [3, 3]  # the default, capped by the maximum
    assert [len(p.impacts) for p in impact_pages(running, v2.name, 100)] == [3, 3]
    monkeypatch.setattr(server.ruleset_service, "IMPACT_MAX_PAGE_SIZE", 10)
    assert [len(p.impacts) for p in impact_pages(running, v2.name, 0)] == [4, 2]
    assert [len(p.impacts) for p in impact_pages(running, v2.name, 1)] == [1] * 6

    # bytes: a page ends before the impact that would take it over the budget; the first always fits
    sizes = [i.ByteSize() + 8 for i in whole.impacts]
    monkeypatch.setattr(server.ruleset_service, "IMPACT_MAX_PAGE_BYTES", sum(sizes[:3]))
    pages = impact_pages(running, v2.name, 0)
    assert len(pages[0].impacts) == 3 and [i for p in pages for i in p.impacts] == list(whole.impacts)
    monkeypatch.setattr(server.ruleset_service, "IMPACT_MAX_PAGE_BYTES", sum(sizes[:3]) - 1)
    pages = impact_pages(running, v2.name, 0)
    assert len(pages[0].impacts) == 2 and [i for p in pages for i in p.impacts] == list(whole.impacts)
    monkeypatch.setattr(server.ruleset_service, "IMPACT_MAX_PAGE_BYTES", 1)
    pages = impact_pages(running, v2.name, 0)
    assert [len(p.impacts) for p in pages] == [1] * 6 and [i for p in pages for i in p.impacts] == list(whole.impacts)


@pytest.mark.long
def test_analyze_impact_pages_a_month_too_big_for_one_message(running: Running) -> None:
    """45,000 stored settlements, whose impacts together are over gRPC's 4 MiB message limit
    (one response used to carry them all), analysed with the service's real page limits.
    Three inputs in turn, 15,000 of each; old → new totals under v2 (top tier 9%) as in
    seed_impact_range: 11750.00 → 12000.00, 7000.00 → 7000.00, 18500.00 → 19500.00."""
    from server.ruleset_service import IMPACT_DEFAULT_PAGE_SIZE, IMPACT_MAX_PAGE_SIZE

    client = running.client
    client.create_and_approve(US)
    count, grosses = 45_000, ("130000", "80000", "205000")

    def messages() -> Any:
        for start in range(0, count, 500):
            batch = ss.SettleBatchRequest()
            for i in range(start, start + 500):
                batch.items.add(request_id=f"big-{i}", input=us_input(f"C-{i:05d}", grosses[i % 3]))
            yield batch

    stored = 0
    for response in client.settlements.SettleBatch(messages(), metadata=running.callers["erp"].metadata, timeout=600):
        stored += sum(1 for result in response.results if result.HasField("settlement"))
    assert stored == count
    v2 = create(running, edit(US, ('{rate: "8%"}', '{rate: "9%"}')))

    def month(size: int) -> list[Any]:
        request = rs.AnalyzeImpactRequest(candidate=v2.name, period_start_from_date=MARCH_1, period_start_to_date=MARCH_1, page_size=size)
        pages = [client.call("AnalyzeImpact", request, "compliance", timeout=120)]
        while pages[-1].next_page_token:
            request.page_token = pages[-1].next_page_token
            pages.append(client.call("AnalyzeImpact", request, "compliance", timeout=120))
        return pages

    pages = month(0)
    assert [len(p.impacts) for p in pages] == [IMPACT_DEFAULT_PAGE_SIZE] * (count // IMPACT_DEFAULT_PAGE_SIZE)
    assert [i.contract_id for p in pages for i in p.impacts] == [f"C-{i:05d}" for i in range(count)]
    assert sum(p.ByteSize() for p in pages) > 4 * 1024 * 1024  # what one response would have had to carry
    sums = [sum((Decimal(getattr(t, f)) for p in pages for t in p.totals), Decimal(0)) for f in ("old_total", "new_total", "delta")]
    assert sums == [Decimal("558750000.00"), Decimal("577500000.00"), Decimal("18750000.00")]  # 15,000 × (37250.00 → 38500.00)
    assert (sum(p.settlements_analyzed for p in pages), sum(p.settlements_failed for p in pages)) == (count, 0)
    largest = month(10**6)
    assert [len(p.impacts) for p in largest] == [IMPACT_MAX_PAGE_SIZE] * 4 + [count - 4 * IMPACT_MAX_PAGE_SIZE]
    assert [i for p in largest for i in p.impacts] == [i for p in pages for i in p.impacts]


# ------------------------------------------------------------------ effective dating


def dated(effective_from: str, title: str) -> str:
    return edit(
        US,
        ("effective_from: 2026-01-01", f"effective_from: {effective_from}"),
        ("title: US managed store, standard terms", f"title: {title}"),
    )


def test_effective_dating_chooses_the_version_in_effect(running: Running) -> None:
    client = running.client
    v1 = client.create_and_approve(US)
    v2 = client.create_and_approve(dated("2026-04-01", "April terms"))
    used = {
        (2026, 1): v1.name,
        (2026, 3): v1.name,
        (2026, 4): v2.name,
        (2026, 6): v2.name,
    }
    for (year, month), expected in used.items():
        settled = client.settle(f"eff-{year}-{month}", us_input(f"C-{month}", period=(year, month))).settlement
        assert settled.ruleset_version == expected, (year, month)
        assert settled.ruleset_content_hash == (v1 if expected == v1.name else v2).content_hash

    # two APPROVED versions effective the same day: the higher version
    v3 = client.create_and_approve(dated("2026-04-01", "April terms, corrected"))
    assert client.settle("eff-tie", us_input("C-tie", period=(2026, 5))).settlement.ruleset_version == v3.name
    # a DRAFT effective even earlier is never chosen
    v4 = create(running, dated("2026-02-01", "A draft"))
    assert client.settle("eff-draft", us_input("C-draft", period=(2026, 3))).settlement.ruleset_version == v1.name
    simulated = client.call("Simulate", ss.SimulateRequest(input=us_input("C-sim", period=(2026, 5))), "erp").settlement
    assert simulated.ruleset_version == v3.name and simulated.name == ""
    # a RETIRED version is not chosen: retiring v3 brings back v2
    retire(running, v3.name)
    assert client.settle("eff-retired", us_input("C-retired", period=(2026, 5))).settlement.ruleset_version == v2.name

    # a pinned DRAFT: Settle refuses it, Simulate uses it
    pinned = us_input("C-pinned")
    pinned.ruleset = v4.name
    error = failure(lambda: client.settle("eff-pinned", pinned))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_USABLE")
    simulated = client.call("Simulate", ss.SimulateRequest(input=pinned), "erp").settlement
    assert simulated.ruleset_version == v4.name and simulated.total.amount == "11750.00"
    # a pinned RETIRED version: refused by both
    pinned.ruleset = v3.name
    assert failure(lambda: client.settle("eff-pinned-retired", pinned)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure(lambda: client.call("Simulate", ss.SimulateRequest(input=pinned), "erp")).code() == grpc.StatusCode.FAILED_PRECONDITION
    # a pinned APPROVED version is used even outside its dates' turn
    pinned.ruleset = v1.name
    assert client.settle("eff-pinned-v1", pinned).settlement.ruleset_version == v1.name
    # a pinned version that does not exist
    pinned.ruleset = f"{US_NAME}/versions/42"
    assert failure(lambda: client.settle("eff-pinned-42", pinned)).code() == grpc.StatusCode.NOT_FOUND

    # no version in effect before the first effective_from
    error = failure(lambda: client.settle("eff-none", us_input("C-none", period=(2025, 12))))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "NO_VERSION_IN_EFFECT")
    assert dict(error_info(error).metadata) == {"ruleset": "us-managed-standard", "periodStartDate": "2025-12-01"}
    error = failure(lambda: client.call("Simulate", ss.SimulateRequest(input=us_input("C-none", period=(2025, 12))), "erp"))
    assert_error(error, grpc.StatusCode.FAILED_PRECONDITION, "NO_VERSION_IN_EFFECT")
    # nor for a ruleset with only drafts and retired versions
    create(running, edit(US, ("ruleset: us-managed-standard", "ruleset: us-managed-premium")))
    other = us_input("C-premium")
    other.ruleset = "rulesets/us-managed-premium"
    assert_error(failure(lambda: client.settle("eff-premium", other)), grpc.StatusCode.FAILED_PRECONDITION, "NO_VERSION_IN_EFFECT")


# ------------------------------------------------------------------ tenants


def test_another_tenant_never_sees_these_versions(running: Running) -> None:
    client = running.client
    approved = client.create_and_approve(US)
    draft = create(running, edit(US, ('{rate: "8%"}', '{rate: "9%"}')))
    client.settle("tenant-1", us_input("C-1"))
    for name in (approved.name, draft.name):
        error = failure(lambda n=name: get(running, n, "other-compliance"))
        assert_error(error, grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        assert failure(lambda n=name: approve(running, n, "other-compliance")).code() == grpc.StatusCode.NOT_FOUND
        assert failure(lambda n=name: retire(running, n, "other-compliance")).code() == grpc.StatusCode.NOT_FOUND
    for parent in ("rulesets/-", US_NAME):
        page = list_page(running, parent, as_="other-compliance")
        assert list(page.ruleset_versions) == [] and page.next_page_token == ""
    # a token of this tenant's list walks nothing in the other tenant
    create(running, US)
    token = list_page(running, US_NAME, 1).next_page_token
    assert token and list(list_page(running, US_NAME, 1, token, as_="other-compliance").ruleset_versions) == []
    diff = rs.DiffRulesetVersionsRequest(name=approved.name, other_name=draft.name)
    assert failure(lambda: client.call("DiffRulesetVersions", diff, "other-compliance")).code() == grpc.StatusCode.NOT_FOUND
    analyze = rs.AnalyzeImpactRequest(candidate=draft.name, period_start_from_date=day(2026, 1, 1), period_start_to_date=day(2026, 12, 1))
    assert failure(lambda: client.call("AnalyzeImpact", analyze, "other-compliance")).code() == grpc.StatusCode.NOT_FOUND
    # settling in the other tenant: the ruleset does not exist there, nor does a pinned version
    assert failure(lambda: client.settle("tenant-2", us_input("C-1"), as_="other-erp")).code() == grpc.StatusCode.NOT_FOUND
    pinned = us_input("C-1")
    pinned.ruleset = approved.name
    assert failure(lambda: client.settle("tenant-3", pinned, as_="other-erp")).code() == grpc.StatusCode.NOT_FOUND
    # the other tenant numbers its own versions from 1; its impact analysis sees none of ours
    theirs = create(running, US, "other-admin")
    assert theirs.name == f"{US_NAME}/versions/1" and theirs.author == "other-admin-user"
    analyze.candidate = theirs.name
    assert client.call("AnalyzeImpact", analyze, "other-compliance").settlements_analyzed == 0
    assert get(running, approved.name).state == APPROVED and get(running, f"{US_NAME}/versions/1").author == "admin-user"
