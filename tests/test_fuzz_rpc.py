"""Property-based fuzzing of every RPC over a real port (SPEC §7 "the server never crashes or
hangs on any input", §9 bounded inputs; issue 6 item 4).

A `python -m server` child process on port 0 (SQLite, and PostgreSQL) gets, for every method
of kpisettle.v1.SettlementService and RulesetService:

* well-typed messages with hostile values (hypothesis): wrong, missing and unknown names,
  numbers that are huge, negative, NaN, Infinity, exponents, ``-0``, padded or written in
  other scripts' digits, oversized strings, impossible dates, huge maps, forged page
  tokens, any page size — SettleBatch as streams of such items;
* raw bytes with identity serializers: random bytes, and valid encodings mutated (bytes
  flipped, truncated, unknown fields, wrong wire types, deep nesting, invalid UTF-8);
* messages over the 4 MiB limit, batches over 1000 items, long streams;
* ValidateRuleset and CreateRulesetVersion with random YAML/JSON documents and mutations
  of the shipped rulesets (lines deleted, duplicated, swapped; tokens swapped; huge
  numbers; deep nesting; alias bombs; random bytes).

Every answer must be a clean status — OK or a canonical client error with a parsable
google.rpc.Status (ErrorInfo; BadRequest field violations for INVALID_ARGUMENT) — never
UNKNOWN, INTERNAL, UNAVAILABLE or a deadline; every ruleset problem has a code, a path or
a position. Afterwards the server is alive (health SERVING, a valid Settle works, the
audit chain verifies) and its resident memory grew by less than a generous bound.

The counts (requests actually sent, by RPC and status; rulesets; RSS before and after) are
printed at the end of the module and, when ``KPISETTLE_FUZZ_REPORT`` names a file, written
there as JSON. The default run sends a few thousand requests and several hundred
rulesets; ``pytest -m long tests/test_fuzz_rpc.py`` (part of ``make test-long``) sends
≥ 100,000 requests and ≥ 10,000 rulesets. Hypothesis runs derandomized (no example
database), so every run sends the same inputs.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import re
import secrets
import string
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from server.settlement_service import _filter_digest
from server.storage.interface import SettlementFilter
from tests.server_harness import RULESETS, Callers, Client, ServerProcess, us_input

SHIPPED = {path.stem: path.read_text(encoding="utf-8") for path in sorted(RULESETS.glob("*.yaml"))}
US = "rulesets/us-managed-standard"
MIB = 1024 * 1024

#: Methods of the two services, by short name → full path, with their request types.
METHODS: dict[str, tuple[str, type[Message]]] = {
    **{
        m.name: (f"/{m.containing_service.full_name}/{m.name}", getattr(ss, m.input_type.name))
        for m in ss.DESCRIPTOR.services_by_name["SettlementService"].methods
    },
    **{
        m.name: (f"/{m.containing_service.full_name}/{m.name}", getattr(rs, m.input_type.name))
        for m in rs.DESCRIPTOR.services_by_name["RulesetService"].methods
    },
}
STREAMING = {"SettleBatch"}
#: Who calls each RPC in the fuzz (a role that may; the role matrix is tests/test_service_security.py).
ROLE = {
    "Settle": "erp",
    "SettleBatch": "erp",
    "Simulate": "erp",
    "GetSettlement": "erp",
    "ListSettlements": "billing",
    "GetFeeBreakdown": "billing",
    "ExplainSettlement": "compliance",
    "ReplaySettlement": "compliance",
    "VerifyAuditLog": "compliance",
    "ValidateRuleset": "admin",
    "CreateRulesetVersion": "admin",
    "ApproveRulesetVersion": "compliance",
    "RetireRulesetVersion": "compliance",
    "GetRulesetVersion": "compliance",
    "ListRulesetVersions": "admin",
    "DiffRulesetVersions": "compliance",
    "AnalyzeImpact": "compliance",
}

#: Client errors a hostile request may get. Never UNKNOWN, INTERNAL, UNAVAILABLE (a store
#: failure), DEADLINE_EXCEEDED (a hang) or UNIMPLEMENTED.
CLEAN = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,  # a revision mismatch (expected_revision) or a lost race
        grpc.StatusCode.PERMISSION_DENIED,  # four eyes: the author approving their own version
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
REASON = re.compile(r"[A-Z][A-Z0-9_]*")
YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts as the end of a line
PROBLEM_CODE = re.compile(r"[a-z_]+(\.[a-z_]+)+")
#: Problems about the text as a whole, which have no position in it (too deep: when the
#: parser itself gave up, rather than the depth check).
POSITIONLESS = frozenset({"source.encoding", "source.too_large", "source.empty", "source.too_deep"})


#: Examples per RPC (messages, raw bytes), rulesets, and the long stream (messages × items),
#: per database of the default run; the input handling is the same on both, what reaches the
#: database differs (PostgreSQL refuses a NUL in text, for one), so both get hostile values.
@dataclass(frozen=True)
class Run:
    messages: int  # hypothesis examples per RPC (a quarter for SettleBatch, whose examples are streams)
    raw: int  # examples of raw bytes per RPC
    rulesets: int
    stream: tuple[int, int]  # the long SettleBatch stream: messages, items per message


DEFAULT_RUN = {"sqlite": Run(100, 45, 300, (3, 350)), "postgresql": Run(50, 25, 60, (2, 200))}
LONG_RUN = Run(4_400, 2_000, 10_200, (10, 1000))


# --------------------------------------------------------------------------- the tally


@dataclass
class Tally:
    """What was sent and what came back, to print and to record."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    by_rpc: dict[str, collections.Counter[str]] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    batch_items: int = 0
    item_statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    rulesets: int = 0
    ruleset_statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, kind: str, rpc: str, code: grpc.StatusCode) -> None:
        with self.lock:
            self.requests[kind] += 1
            self.statuses[code.name] += 1
            self.by_rpc[rpc][code.name] += 1

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def report(self) -> dict[str, Any]:
        return {
            "requests": self.total,
            "requests_by_kind": dict(self.requests),
            "statuses": dict(self.statuses),
            "by_rpc": {rpc: dict(codes) for rpc, codes in sorted(self.by_rpc.items())},
            "batch_items": self.batch_items,
            "batch_item_statuses": dict(self.item_statuses),
            "rulesets": self.rulesets,
            "ruleset_outcomes": dict(self.ruleset_statuses),
            "problem_codes": dict(self.problems.most_common()),
        }


# --------------------------------------------------------------------------- the server


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Fuzzed:
    """The server under fuzz, its callers, the objects that exist in it, and the tally."""

    database: str
    server: ServerProcess
    client: Client
    callers: Callers
    tally: Tally
    settlements: list[str]
    approved: list[str]
    drafts: list[str]
    retirable: list[str]
    other_tenant_settlement: str
    other_tenant_total: str
    other_tenant_version: str
    page_tokens: dict[str, list[str]]
    seed_totals: dict[str, str]
    rss_start_kib: int = 0
    valid_samples: dict[str, list[bytes]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def channel(self) -> grpc.Channel:
        return self.client.channel

    def metadata(self, rpc: str) -> tuple[tuple[str, str], ...]:
        return self.callers[ROLE[rpc]].metadata

    def rss(self) -> int:
        return rss_kib(self.server.process.pid)

    def alive(self) -> None:
        """Health SERVING; a valid Settle works (in the other tenant, whose versions the fuzz
        cannot touch: it may have retired this tenant's); reads work; both audit chains verify."""
        assert self.server.process.poll() is None, self.server.output()[-5000:]
        health = health_pb2_grpc.HealthStub(self.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        contract = f"ALIVE-{secrets.token_hex(3)}"
        settled = self.client.settle(f"alive-{contract}", us_input(contract_id=contract), as_="other-erp")
        assert settled.settlement.total.amount == self.other_tenant_total and not settled.deduplicated
        for name, total in self.seed_totals.items():
            seed = self.client.call("GetSettlement", ss.GetSettlementRequest(name=name), "erp").settlement
            assert seed.total.amount == total, (name, seed.total)
        for who in ("compliance", "other-compliance"):
            verified = self.client.call("VerifyAuditLog", ss.VerifyAuditLogRequest(), who)
            assert verified.ok, (who, verified)


def _server(database_url: str, tmp_path: Path, database: str) -> Iterator[Fuzzed]:
    callers = Callers.fresh()
    server = ServerProcess(database_url, callers.write(tmp_path / "tokens.json"), "--drain-delay-seconds", "0")
    client = Client(server.target, callers)
    try:
        for source in SHIPPED.values():
            client.create_and_approve(source)
        us_source = SHIPPED["us-managed-standard"]
        drafts = [
            client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=us_source), "admin").ruleset_version.name
            for _ in range(3)
        ]
        # Versions of their own for the fuzz to retire (it could otherwise retire the version every Settle needs).
        retirable_source = us_source.replace("ruleset: us-managed-standard", "ruleset: retirable", 1)
        retirable = [client.create_and_approve(retirable_source).name] + [
            client.call("CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=retirable_source), "admin").ruleset_version.name
            for _ in range(2)
        ]
        seeds = [client.settle(f"seed-{i}", us_input(contract_id=f"SEED-{i % 3}", gross_gmv=str(100000 + i))).settlement for i in range(6)]
        settlements = [seed.name for seed in seeds]
        client.create_and_approve(us_source, author="other-admin", approver="other-compliance")  # what the alive check settles on
        # Names of versions are per tenant (the other tenant has its own us-managed-standard
        # version 1, and that name means ours to us): one only the other tenant has.
        other_only = us_source.replace("ruleset: us-managed-standard", "ruleset: other-tenant-only", 1)
        other = client.create_and_approve(other_only, author="other-admin", approver="other-compliance")
        other_settlement = client.settle("seed-other", us_input(contract_id="SEED-OTHER"), as_="other-erp").settlement
        tokens = {
            "settlements": [client.call("ListSettlements", ss.ListSettlementsRequest(page_size=2), "billing").next_page_token],
            "rulesets": [
                client.call("ListRulesetVersions", rs.ListRulesetVersionsRequest(parent="rulesets/-", page_size=2), "admin").next_page_token
            ],
            "impact": [client.call("AnalyzeImpact", impact_first_page(drafts[0]), "compliance").next_page_token],
        }
        assert all(tokens["settlements"]) and all(tokens["rulesets"]) and all(tokens["impact"])
        fuzzed = Fuzzed(
            database=database,
            server=server,
            client=client,
            callers=callers,
            tally=Tally(),
            settlements=settlements,
            approved=[f"rulesets/{name}/versions/1" for name in SHIPPED],
            drafts=drafts,
            retirable=retirable,
            other_tenant_settlement=other_settlement.name,
            other_tenant_total=other_settlement.total.amount,
            other_tenant_version=other.name,
            page_tokens=tokens,
            seed_totals={seed.name: seed.total.amount for seed in seeds},
        )
        warm_up(fuzzed)
        fuzzed.rss_start_kib = fuzzed.rss()
        yield fuzzed
        report = fuzzed.tally.report()
        report.update(
            database=database,
            rss_start_kib=fuzzed.rss_start_kib,
            rss_end_kib=fuzzed.rss(),
            seconds=round(time.monotonic() - fuzzed.started, 1),
        )
        print(f"\nfuzz report ({database}): {json.dumps(report)}")
        path = os.environ.get("KPISETTLE_FUZZ_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(report) + "\n")
    finally:
        client.close()
        server.kill()


def warm_up(fuzzed: Fuzzed) -> None:
    """One of each kind of call, so that the memory baseline includes what every server holds anyway."""
    client = fuzzed.client
    for source in SHIPPED.values():
        client.call("ValidateRuleset", rs.ValidateRulesetRequest(source=source), "admin")
    for name in fuzzed.settlements[:2]:
        client.call("ReplaySettlement", ss.ReplaySettlementRequest(name=name), "compliance")
        client.call("ExplainSettlement", ss.ExplainSettlementRequest(name=name, language_code="zh"), "compliance")
        client.call("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=name), "billing")
    client.call("Simulate", ss.SimulateRequest(input=us_input()), "erp")
    client.call("DiffRulesetVersions", rs.DiffRulesetVersionsRequest(name=fuzzed.approved[0], other_name=fuzzed.approved[1]), "compliance")
    client.call("ListSettlements", ss.ListSettlementsRequest(page_size=200), "billing")
    client.call("ListRulesetVersions", rs.ListRulesetVersionsRequest(parent="rulesets/-"), "admin")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"], name="fuzzed")
def fuzzed_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp_path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    url = f"sqlite:///{tmp_path / 'fuzz.db'}" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))
    yield from _server(url, tmp_path, request.param)


# --------------------------------------------------------------------------- checking answers


def check_status(status_code: grpc.StatusCode, status: Any, where: str) -> None:
    """A failure must be a canonical client error carrying ErrorInfo (and BadRequest for INVALID_ARGUMENT)."""
    assert status_code in CLEAN, f"{where}: {status_code} {getattr(status, 'message', '')}"
    assert status is not None, f"{where}: {status_code} carries no google.rpc.Status"
    reasons, violations = [], []
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reasons.append(info)
        elif detail.Unpack(bad):
            violations.extend(bad.field_violations)
    assert len(reasons) == 1, f"{where}: {status_code} {status.message}: ErrorInfo {reasons}"
    assert REASON.fullmatch(reasons[0].reason) and reasons[0].domain == "kpisettle.v1", (where, reasons[0])
    assert status.message, where
    if status_code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violations, f"{where}: INVALID_ARGUMENT {status.message} without field violations"
        for violation in violations:
            assert violation.field and violation.description, (where, violation)


def check_error(error: grpc.RpcError, where: str) -> grpc.StatusCode:
    code = error.code()
    status = rpc_status.from_call(error)  # raises if the status in the trailers disagrees with the call's
    if status is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # gRPC's own message-size limit answers before any handler runs: no rich status there
        assert "larger than max" in (error.details() or ""), (where, error.details())
        return code
    check_status(code, status, where)
    return code


def check_settlement(settlement: pb.Settlement, where: str) -> None:
    """A decision that was given: its lines add up to its total, in its currency."""
    total = sum((Decimal(line.amount.amount) for line in settlement.lines), Decimal(0))
    assert Decimal(settlement.total.amount) == total, where
    assert all(line.amount.currency_code == settlement.currency_code for line in settlement.lines), where


def check_reply(rpc: str, reply: Any, where: str) -> None:
    if rpc in ("Settle", "Simulate", "GetSettlement"):
        check_settlement(reply.settlement, where)
    elif rpc == "ListSettlements":
        for settlement in reply.settlements:
            check_settlement(settlement, where)
    elif rpc == "ValidateRuleset":
        check_problems(reply.problems, None, where)


def call_unary(fuzzed: Fuzzed, rpc: str, request: Message, kind: str, timeout: float = 60) -> tuple[grpc.StatusCode, Any]:
    path, _ = METHODS[rpc]
    stub = fuzzed.channel.unary_unary(path, request_serializer=type(request).SerializeToString, response_deserializer=None)
    try:
        raw = stub(request, metadata=fuzzed.metadata(rpc), timeout=timeout)
    except grpc.RpcError as error:
        code = check_error(error, f"{rpc} {kind}")
        fuzzed.tally.count(kind, rpc, code)
        return code, None
    fuzzed.tally.count(kind, rpc, grpc.StatusCode.OK)
    return grpc.StatusCode.OK, raw


def call_batch(fuzzed: Fuzzed, messages: Sequence[ss.SettleBatchRequest | bytes], kind: str, timeout: float = 120) -> grpc.StatusCode:
    """A SettleBatch stream; every item answered is checked (its error a clean status)."""
    path, _ = METHODS["SettleBatch"]

    def serialize(message: ss.SettleBatchRequest | bytes) -> bytes:
        return message if isinstance(message, bytes) else message.SerializeToString()

    stub = fuzzed.channel.stream_stream(path, request_serializer=serialize, response_deserializer=ss.SettleBatchResponse.FromString)
    sent_items = sum(len(m.items) for m in messages if not isinstance(m, bytes))
    answered: list[ss.SettleBatchResult] = []
    code = grpc.StatusCode.OK
    try:
        for response in stub(iter(messages), metadata=fuzzed.metadata("SettleBatch"), timeout=timeout):
            answered.extend(response.results)
    except grpc.RpcError as error:
        code = check_error(error, f"SettleBatch {kind}")
    items: collections.Counter[str] = collections.Counter()
    for result in answered:
        if result.HasField("error"):
            item_code = CODES_BY_NUMBER[result.error.code]
            check_status(item_code, result.error, f"SettleBatch item {result.item_index}")
            items[item_code.name] += 1
        else:
            check_settlement(result.settlement, f"SettleBatch item {result.item_index}")
            items["OK"] += 1
    assert [r.item_index for r in answered] == list(range(len(answered)))
    if code == grpc.StatusCode.OK:
        assert len(answered) == sent_items, (len(answered), sent_items)
    with fuzzed.tally.lock:
        fuzzed.tally.batch_items += len(answered)
        fuzzed.tally.item_statuses.update(items)
    fuzzed.tally.count(kind, "SettleBatch", code)
    return code


def call_raw(fuzzed: Fuzzed, rpc: str, payloads: Sequence[bytes], kind: str) -> grpc.StatusCode:
    """Bytes as the request (identity serializers); a stream for SettleBatch, one message otherwise."""
    path, _ = METHODS[rpc]
    metadata = fuzzed.metadata(rpc)
    try:
        if rpc in STREAMING:
            list(fuzzed.channel.stream_stream(path)(iter(payloads), metadata=metadata, timeout=60))
        else:
            fuzzed.channel.unary_unary(path)(payloads[0], metadata=metadata, timeout=60)
    except grpc.RpcError as error:
        code = check_error(error, f"{rpc} {kind} {payloads[0][:64]!r}")
    else:
        code = grpc.StatusCode.OK
    fuzzed.tally.count(kind, rpc, code)
    return code


#: a path: plain keys joined by dots, list indexes, and keys that are not plain as JSON strings in brackets
PATH = re.compile(r'(?:[^.\[\]"]+|\[\d+\]|\["(?:[^"\\]|\\.)*"\])(?:\.[^.\[\]"]+|\[\d+\]|\["(?:[^"\\]|\\.)*"\])*')


def check_problems(problems: Sequence[pb.RulesetProblem], source: str | None, where: str) -> None:
    """Every problem has a stable code, a severity, a well-formed path ("" is the document) and,
    unless it is about the text as a whole, a line and column inside the text."""
    lines = len(YAML_LINE_BREAK.split(source)) if source is not None else None
    for problem in problems:
        assert PROBLEM_CODE.fullmatch(problem.code), (where, problem)
        assert problem.severity in ("ERROR", "WARNING"), (where, problem)
        assert problem.message, (where, problem)
        assert problem.path == "" or PATH.fullmatch(problem.path), (where, problem)
        assert problem.line >= 0 and problem.column >= 0, (where, problem)
        assert (problem.line == 0) == (problem.column == 0), (where, problem)
        if lines is not None:
            assert problem.line <= lines, (where, problem, lines)
        if problem.code not in POSITIONLESS:
            assert problem.line >= 1, (where, problem)


# --------------------------------------------------------------------------- hostile values

HOSTILE_NUMBERS = [
    "NaN", "nan", "-NaN", "sNaN", "Infinity", "-Infinity", "inf", "-inf", "Inf", "1e999999", "-1e999999", "1E+3", "1e-7",
    "1e999999999999", "0E-1000000", "-0", "+0", "-0.00", "0.0", "00000", "+1", " 1", "1 ", "\t1", "1\n", "1_000", "1,000",
    "0x10", "1.", ".5", "-.5", "--1", "1e", "%", "28%", "-28%", "28%%", "1/3", "", " ", "-", ".",
    "١٢٣", "١٢٣.٤٥", "１２３", "१२३", "๑๒๓", "²", "½", "Ⅻ", "𝟙𝟚𝟛", "\u200b1", "1\u00a0000", "1\x00", "\x00",
    "9" * 18, "9" * 19, "-" + "9" * 18, "9" * 40, "1" + "0" * 400, "0." + "0" * 9 + "1", "0." + "0" * 10 + "1",
    "0.00000000001", "9" * 18 + "." + "9" * 10, "12345678901234567890.5", "-99999999999999999999999999999999",
    "1e308", "1.7976931348623157e308", "4.9e-324", "2e-1", "true", "null", "[]", "{}", "'1'", '"1"',
]  # fmt: skip
HOSTILE_TEXT = [
    "", " ", "\x00", "a\x00b", "\t", "\n", "\r\n", "\u202e", "\ufeff", "\ufffd", "🙂", "中文", "ü", "\u0301",
    "../../etc/passwd", "' OR 1=1 --", "'; DROP TABLE settlements; --", "%s%n%x", "${jndi:ldap://x}", "{{7*7}}",
    "<script>", "\\", "/", "rulesets/-", "rulesets/", "settlements/", "settlements/..", "settlements/%00",
    "rulesets/us-managed-standard/versions/0", "rulesets/us-managed-standard/versions/-1",
    "rulesets/us-managed-standard/versions/999999999", "rulesets/us-managed-standard/versions/9999999999999",
    "rulesets/US-MANAGED", "rulesets/us-managed-standard/versions/1/x", "RULESETS/us-managed-standard",
]  # fmt: skip
UNICODE_DIGITS = "٠١٢٣٤٥٦٧٨٩０１２３４５６７８９०१२३४५६७८९๐๑๒"

CONTROL_CHARACTERS = ["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\x9f", "\u2028", "\ufeff", "\U0010ffff"]
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=6), st.sampled_from(CONTROL_CHARACTERS), st.text(max_size=6)),
    st.text(max_size=24),
    st.text(alphabet=string.printable, max_size=40),
    st.sampled_from([("A", 128), ("A", 129), ("A", 257), ("a", 2000), ("中", 300), ("z", 5000), ("x", 70_000), ("z", 200_000)]).map(
        lambda repeat: repeat[0] * repeat[1]
    ),
)
hostile_number = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(alphabet="0123456789.-+eE%" + UNICODE_DIGITS + " _,", min_size=1, max_size=24),
    st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{1,14})?", fullmatch=True),
)
int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]))
int64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, 2, -1, 2**31, 2**63 - 1, -(2**63)]))
page_size = st.one_of(int32, st.sampled_from([0, 1, 2, 49, 50, 199, 200, 201, 999, 1000, 1001]))
good_dates = st.builds(
    lambda month, year: date_pb2.Date(year=year, month=month, day=1), st.integers(1, 12), st.sampled_from([2025, 2026, 2027])
)
bad_dates = st.builds(
    lambda y, m, d: date_pb2.Date(year=y, month=m, day=d),
    st.one_of(int32, st.sampled_from([0, 1, 1969, 2026, 9999, 10000])),
    st.one_of(int32, st.integers(0, 13)),
    st.one_of(int32, st.integers(0, 32)),
)
any_date = st.one_of(good_dates, bad_dates)
currency = st.one_of(st.sampled_from(["USD", "EUR", "JPY", "BRL", "CNY", "XXX", "XAU", "usd", "US", "USDD", ""]), hostile_text)
US_METRICS = [
    "gross_gmv",
    "refunds",
    "ad_spend",
    "ad_sales",
    "orders",
    "defective_orders",
    "response_hours",
    "stockout_days",
    "review_days",
]
metric_name = st.one_of(st.sampled_from(US_METRICS), st.sampled_from(["gmv_target", "monthly_fee", "market", "period_days"]), hostile_text)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=max_leaves
    )


def token(kind: str, value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": kind, "v": value}).encode()).decode("ascii")


DEFAULT_DIGEST = _filter_digest(SettlementFilter(latest_only=True))


def impact_first_page(candidate: str) -> rs.AnalyzeImpactRequest:
    """A first AnalyzeImpact page of two over the seeds' year: its token is a real one to mutate."""
    return rs.AnalyzeImpactRequest(
        candidate=candidate,
        period_start_from_date=date_pb2.Date(year=2026, month=1, day=1),
        period_start_to_date=date_pb2.Date(year=2026, month=12, day=1),
        page_size=2,
    )


@st.composite
def page_tokens(draw: st.DrawFn, fuzzed: Fuzzed, kind: str) -> str:
    """Real tokens, damaged tokens, and forged ones (right shape and digest, hostile values)."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.sampled_from(fuzzed.page_tokens[kind]))
    if choice == 1:
        real = draw(st.sampled_from(fuzzed.page_tokens[kind]))
        cut = draw(st.integers(0, len(real)))
        return real[:cut] + draw(st.text(max_size=4))
    if choice == 2:
        return token(draw(st.sampled_from(["settlements", "rulesets", "impact", "x", ""])), draw(json_values()))
    if choice == 3:  # nested far beyond any parser's patience
        depth = draw(st.sampled_from([10, 600, 1100, 50_000]))
        return base64.urlsafe_b64encode(b'{"k":"%s","v":' % kind.encode() + b"[" * depth + b"]" * depth + b"}").decode()
    if choice == 4 and kind == "impact":  # the candidate and range of the real token, a hostile position
        real = json.loads(base64.urlsafe_b64decode(draw(st.sampled_from(fuzzed.page_tokens[kind]))))["v"]
        start = draw(st.one_of(st.sampled_from(["2026-03-01", "0001-01-01", "9999-12-31", "2026-13-01", "20260301", ""]), json_values(2)))
        contract = draw(st.one_of(st.sampled_from(["SEED-1", "\x00", "", "x" * 200]), hostile_text, json_values(2)))
        return token(kind, [*real[:3], start, contract])
    if choice == 4:
        if kind == "settlements":
            start = draw(
                st.one_of(
                    st.sampled_from(["2026-03-01", "0001-01-01", "9999-12-31", "2026-13-01", "", "2026-03-01T00:00"]), st.text(max_size=12)
                )
            )
            contract = draw(st.one_of(st.sampled_from(["SEED-1", "\x00", "a\x00b", "", "x" * 200]), hostile_text))
            revision = draw(st.one_of(int64, st.sampled_from([True, 1.5, "1", None]), st.integers(2**63, 2**70)))
            return token(kind, [start, contract, revision, DEFAULT_DIGEST])
        ruleset = draw(st.one_of(st.sampled_from(["us-managed-standard", "a\x00", ""]), hostile_text))
        version = draw(st.one_of(int64, st.sampled_from([True, 1.5, "1", None]), st.integers(2**63, 2**70)))
        return token(kind, [draw(st.sampled_from(["rulesets/-", US, "\x00"])), ruleset, version])
    if choice == 5:
        return base64.urlsafe_b64encode(draw(st.binary(max_size=64))).decode()
    return draw(st.one_of(st.just(""), hostile_text))


@st.composite
def settlement_names(draw: st.DrawFn, fuzzed: Fuzzed) -> str:
    return draw(
        st.one_of(
            st.sampled_from(fuzzed.settlements),
            st.just(fuzzed.other_tenant_settlement),
            st.builds(lambda s: "settlements/" + s, st.one_of(st.text(max_size=70), st.sampled_from(["0" * 32, "f" * 64, "f" * 65]))),
            hostile_text,
        )
    )


@st.composite
def version_names(draw: st.DrawFn, fuzzed: Fuzzed) -> str:
    return draw(
        st.one_of(
            st.sampled_from(fuzzed.approved + fuzzed.drafts),
            st.just(fuzzed.other_tenant_version),
            st.builds(lambda r, v: f"rulesets/{r}/versions/{v}", st.sampled_from([*SHIPPED, "nope", "x" * 64, "x" * 65]), int64),
            hostile_text,
        )
    )


@st.composite
def settlement_inputs(draw: st.DrawFn, fuzzed: Fuzzed) -> pb.SettlementInput:
    """A valid US input with some of its parts replaced by hostile values."""
    message = us_input(contract_id=draw(st.sampled_from(["F-1", "F-2", "F-3"])))
    # pinned: the fuzz approves versions of its own (CreateRulesetVersion, ApproveRulesetVersion),
    # and a later one in effect would refuse these inputs before the engine sees them
    message.ruleset = f"{US}/versions/1"
    mutations = draw(st.one_of(st.just([]), st.lists(st.integers(0, 15), min_size=1, max_size=4)))
    for mutation in mutations:
        if mutation == 0:
            message.contract_id = draw(hostile_text)
        elif mutation == 1:
            message.seller_id = draw(hostile_text)
        elif mutation == 2:
            message.market = draw(st.one_of(st.sampled_from(["US", "JP", "EU", "BR", "XX", "", "us", "US "]), hostile_text))
        elif mutation == 3:
            message.period_start_date.CopyFrom(draw(any_date))
        elif mutation == 4:
            if draw(st.booleans()):
                message.ClearField("period_start_date")
            else:
                message.period_end_date.CopyFrom(draw(any_date))
        elif mutation == 5:
            message.ruleset = draw(
                st.one_of(st.sampled_from([US, *fuzzed.approved, *fuzzed.drafts, fuzzed.other_tenant_version]), hostile_text)
            )
        elif mutation in (6, 7, 8):
            message.metrics[draw(metric_name)].value = draw(hostile_number)
        elif mutation == 9:
            name = draw(st.sampled_from(US_METRICS))
            if name in message.metrics:
                del message.metrics[name]
        elif mutation == 10:
            message.metrics[draw(metric_name)].currency_code = draw(currency)
        elif mutation == 11:
            message.params[draw(st.one_of(st.sampled_from(["gmv_target", "monthly_fee"]), hostile_text))] = draw(hostile_number)
        elif mutation == 12:
            for _ in range(draw(st.integers(1, 3))):
                rate = message.fx_rates.add(
                    base_currency_code=draw(currency),
                    quote_currency_code=draw(currency),
                    rate=draw(hostile_number),
                    source=draw(hostile_text),
                )
                if draw(st.booleans()):
                    rate.as_of_date.CopyFrom(draw(any_date))
        elif mutation == 13:
            message.active_days = draw(st.one_of(int32, st.integers(0, 32)))
        elif mutation == 14:  # a huge map
            size = draw(st.sampled_from([100, 499, 501, 3000, 20_000]))
            value = draw(st.sampled_from(["1", "NaN", "9" * 18]))
            for i in range(size):
                message.params[f"p{i}"] = value
        else:
            message.fx_rates.extend(
                pb.FxRate(base_currency_code="EUR", quote_currency_code="USD", rate="1.1")
                for _ in range(draw(st.sampled_from([2, 51, 400])))
            )
    return message


REQUEST_IDS = st.one_of(st.sampled_from([f"fuzz-{i}" for i in range(12)]), st.builds(lambda: f"fuzz-{secrets.token_hex(6)}"), hostile_text)
EXPECTED_REVISION = st.one_of(st.none(), int64, st.integers(0, 3))


@st.composite
def settle_requests(draw: st.DrawFn, fuzzed: Fuzzed) -> ss.SettleRequest:
    request = ss.SettleRequest(request_id=draw(REQUEST_IDS), input=draw(settlement_inputs(fuzzed)))
    expected = draw(EXPECTED_REVISION)
    if expected is not None:
        request.expected_revision = expected
    return request


@st.composite
def batch_streams(draw: st.DrawFn, fuzzed: Fuzzed) -> list[ss.SettleBatchRequest]:
    messages = []
    for _ in range(draw(st.integers(0, 3))):
        items = []
        for _ in range(draw(st.integers(0, 4))):
            settle = draw(settle_requests(fuzzed))
            item = ss.SettleBatchItem(request_id=settle.request_id, input=settle.input)
            if settle.HasField("expected_revision"):
                item.expected_revision = settle.expected_revision
            items.append(item)
        messages.append(ss.SettleBatchRequest(items=items))
    return messages


def request_strategies(fuzzed: Fuzzed) -> dict[str, st.SearchStrategy[Any]]:
    """A well-typed request with hostile values, per RPC."""
    names, versions = settlement_names(fuzzed), version_names(fuzzed)
    ruleset_text = st.one_of(st.sampled_from(list(SHIPPED.values())), hostile_text, rulesets())
    note = st.one_of(hostile_text, st.sampled_from(["x" * 2000, "x" * 2001]))
    return {
        "Settle": settle_requests(fuzzed),
        "SettleBatch": batch_streams(fuzzed),
        "Simulate": st.builds(ss.SimulateRequest, input=settlement_inputs(fuzzed)),
        "GetSettlement": st.builds(ss.GetSettlementRequest, name=names),
        "ListSettlements": st.builds(
            ss.ListSettlementsRequest,
            page_size=page_size,
            page_token=page_tokens(fuzzed, "settlements"),
            contract_id=st.one_of(st.just(""), st.sampled_from(["SEED-1", "F-1"]), hostile_text),
            seller_id=st.one_of(st.just(""), st.just("S-1"), hostile_text),
            market=st.one_of(st.just(""), st.just("US"), hostile_text),
            ruleset=st.one_of(st.just(""), st.just(US), hostile_text),
            period_start_from_date=st.one_of(st.none(), any_date),
            period_start_to_date=st.one_of(st.none(), any_date),
            include_superseded=st.booleans(),
        ),
        "GetFeeBreakdown": st.builds(ss.GetFeeBreakdownRequest, name=names),
        "ExplainSettlement": st.builds(
            ss.ExplainSettlementRequest, name=names, language_code=st.one_of(st.sampled_from(["", "en", "zh", "EN", "fr"]), hostile_text)
        ),
        "ReplaySettlement": st.builds(ss.ReplaySettlementRequest, name=names),
        "VerifyAuditLog": st.just(ss.VerifyAuditLogRequest()),
        "ValidateRuleset": st.builds(rs.ValidateRulesetRequest, source=ruleset_text),
        "CreateRulesetVersion": st.builds(rs.CreateRulesetVersionRequest, source=ruleset_text),
        "ApproveRulesetVersion": st.builds(rs.ApproveRulesetVersionRequest, name=versions, note=note),
        "RetireRulesetVersion": st.builds(
            rs.RetireRulesetVersionRequest,
            name=st.one_of(st.sampled_from(fuzzed.retirable), st.just(fuzzed.other_tenant_version), hostile_text),
            note=note,
        ),
        "GetRulesetVersion": st.builds(rs.GetRulesetVersionRequest, name=versions),
        "ListRulesetVersions": st.builds(
            rs.ListRulesetVersionsRequest,
            parent=st.one_of(st.sampled_from(["rulesets/-", US, "rulesets/nope"]), hostile_text),
            page_size=page_size,
            page_token=page_tokens(fuzzed, "rulesets"),
        ),
        "DiffRulesetVersions": st.builds(rs.DiffRulesetVersionsRequest, name=versions, other_name=versions),
        "AnalyzeImpact": st.one_of(
            st.builds(
                rs.AnalyzeImpactRequest,
                candidate=versions,
                period_start_from_date=st.one_of(st.none(), any_date),
                period_start_to_date=st.one_of(st.none(), any_date),
                page_size=st.one_of(st.just(0), page_size, st.sampled_from([9_999, 10_000, 10_001])),
                page_token=st.one_of(st.just(""), page_tokens(fuzzed, "impact")),
            ),
            # the next page of a real analysis, asked again with any page size, by any candidate
            st.builds(
                lambda candidate, size: rs.AnalyzeImpactRequest(
                    candidate=candidate,
                    period_start_from_date=date_pb2.Date(year=2026, month=1, day=1),
                    period_start_to_date=date_pb2.Date(year=2026, month=12, day=1),
                    page_size=size,
                    page_token=fuzzed.page_tokens["impact"][0],
                ),
                st.one_of(st.just(fuzzed.drafts[0]), versions),
                page_size,
            ),
        ),
    }


# --------------------------------------------------------------------------- rulesets

YAML_FRAGMENTS = [
    "a: &a [1, 2]\nb: *a\n",
    "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]\n" for i in range(9)),
    "x: !!python/object/apply:os.system ['true']\n",
    "x: !custom 1\n",
    "<<: {a: 1}\n",
    "a: &x [*x]\n",
    "? [a, b]\n: c\n",
    "%YAML 1.1\n---\n",
    "---\na: 1\n---\nb: 2\n",
    "a: 'unterminated\n",
    "\t- tab\n",
    "a: {b: [c, {d: e}]}\n",
    "[" * 40 + "]" * 40 + "\n",
    "{" * 5000 + "\n",
    "- " * 100 + "x\n",
    "key: " + "9" * 400 + "\n",
    "key: 1e999999\n",
    "key: .nan\n",
    "key: -.inf\n",
    "key: 0x1F\n",
    "key: 2026-13-45\n",
    "key: ~\n",
    "key: \x07\n",
    "key: \ufffe\n",
    "key: \u202e\n",
]
SHAPED_KEYS = [
    "ruleset", "title", "effective_from", "currency", "period", "rounding", "metrics", "params", "exemptions", "kpis", "fees",
    "markets", "multiply", "caps", "warnings", "examples", "type", "definition", "default", "target", "when", "formula",
    "on_zero_division", "id", "kind", "amount", "basis", "mode", "tiers", "up_to", "rate", "steps_on", "steps", "from", "of",
    "exempt_by", "prorate", "prorate_targets_by", "multiplier", "penalties", "total", "max_rate", "min", "max", "message", "label",
    "en", "zh", "name", "market", "expect", "lines", "metrics_", "x",
]  # fmt: skip
SHAPED_SCALARS = [
    "us-managed-standard", "fuzz-rs", "USD", "JPY", "XXX", "month", "quarter", "week", "half_up", "half_even", "money", "count",
    "number", "ratio", "fixed", "percentage", "tiered", "bonus", "penalty", "graduated", "volume", "2026-01-01", "2026-02-30",
    "0", "-1", "1.5", "30%", "1e5", "NaN", "gross_gmv", "gross_gmv - refunds", "acos > 28%", "a / 0", "min(1, 2)", "x.y",
    "__import__('os')", "not not not 1", "(" * 40 + "1" + ")" * 40, "1 +" * 400 + " 1", "true", "null", "", "9" * 30,
]  # fmt: skip


def shaped_values(max_leaves: int = 40) -> st.SearchStrategy[Any]:
    """JSON-like values whose keys and scalars are the ruleset format's own words."""
    scalars = st.one_of(st.sampled_from(SHAPED_SCALARS), st.text(max_size=10), st.integers().map(str), st.booleans(), st.none())
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(SHAPED_KEYS), inner, max_size=6),
        max_leaves=max_leaves,
    )


def to_yaml(value: Any, indent: int = 0) -> str:
    """A small block-style YAML writer for generated documents (flow style for scalars)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "".join(f"\n{pad}{json.dumps(str(k))}: {to_yaml(v, indent + 1)}" for k, v in value.items())
    if isinstance(value, list):
        if not value:
            return "[]"
        return "".join(f"\n{pad}- {to_yaml(v, indent + 1).lstrip()}" for v in value)
    return json.dumps(value)


@st.composite
def mutated_shipped(draw: st.DrawFn) -> str:
    """A shipped ruleset, mutated: lines deleted, duplicated, swapped or inserted; tokens swapped or replaced."""
    text = draw(st.sampled_from(list(SHIPPED.values())))
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 8))
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        if kind == 0:
            del lines[i]
        elif kind == 1:
            lines.insert(i, lines[i])
        elif kind == 2:
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == 3:
            lines.insert(i, draw(st.sampled_from(YAML_FRAGMENTS)).rstrip("\n"))
        elif kind == 4:  # swap two tokens of one line
            words = re.split(r"(\s+)", lines[i])
            if len(words) >= 3:
                a, b = draw(st.integers(0, len(words) - 1)), draw(st.integers(0, len(words) - 1))
                words[a], words[b] = words[b], words[a]
                lines[i] = "".join(words)
        elif kind == 5:  # a number replaced by a hostile one
            lines[i] = re.sub(r'"?[0-9][0-9.]*%?"?', lambda _m: json.dumps(draw(hostile_number)), lines[i], count=1)
        elif kind == 6:
            lines[i] = (
                lines[i][: draw(st.integers(0, len(lines[i])))]
                + draw(st.text(max_size=6))
                + lines[i][draw(st.integers(0, len(lines[i]))) :]
            )
        elif kind == 7:  # re-indent a line
            lines[i] = " " * draw(st.integers(0, 9)) + lines[i].lstrip()
        else:
            lines[i] = lines[i].replace(":", draw(st.sampled_from(["", "::", ": &a", ": *a", ": !!str", ": [", ": {"])), 1)
        if not lines:
            lines = [""]
    return "\n".join(lines)


@st.composite
def rulesets(draw: st.DrawFn) -> str:
    """Ruleset texts: generated YAML or JSON documents, mutations of the shipped rulesets, fragments, bytes."""
    kind = draw(st.integers(0, 11))
    if kind <= 4:
        return draw(mutated_shipped())
    if kind == 5:
        return json.dumps(draw(shaped_values()))
    if kind == 6:
        return to_yaml(draw(shaped_values())).lstrip("\n") + "\n"
    if kind == 7:  # a shipped ruleset with a generated section
        base = draw(st.sampled_from(list(SHIPPED.values())))
        section = draw(st.sampled_from(["metrics", "kpis", "fees", "markets", "caps", "warnings", "examples", "exemptions", "params"]))
        return re.sub(
            rf"^{section}:.*?(?=^\S)", lambda _m: f"{section}:{to_yaml(draw(shaped_values()), 1)}\n", base, count=1, flags=re.M | re.S
        )
    if kind == 8:
        return "".join(draw(st.lists(st.sampled_from(YAML_FRAGMENTS), min_size=1, max_size=4)))
    if kind == 9:
        return draw(st.binary(max_size=300)).decode("utf-8", "replace")
    if kind == 10:  # size at and around the 256 KiB limit
        body = draw(st.sampled_from(list(SHIPPED.values())))
        target = draw(st.sampled_from([256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 300_000]))
        filler = draw(st.sampled_from(["#", "é", "中"]))
        room = target - len(body.encode("utf-8")) - 2
        return body + "\n#" + filler * max(0, room // len(filler.encode("utf-8")))
    return draw(st.text(max_size=200))


# --------------------------------------------------------------------------- raw bytes


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    return varint((number << 3) | wire_type) + payload


def valid_samples(fuzzed: Fuzzed) -> dict[str, list[bytes]]:
    """Encodings of valid requests, per RPC, to mutate (made once per server)."""
    if not fuzzed.valid_samples:
        us = SHIPPED["us-managed-standard"]
        samples: dict[str, list[Message]] = {
            "Settle": [ss.SettleRequest(request_id="raw-1", input=us_input())],
            "SettleBatch": [ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id="raw-b", input=us_input(contract_id="RAW-B"))])],
            "Simulate": [ss.SimulateRequest(input=us_input())],
            "GetSettlement": [ss.GetSettlementRequest(name=fuzzed.settlements[0])],
            "ListSettlements": [
                ss.ListSettlementsRequest(
                    page_size=2, contract_id="SEED-1", period_start_from_date=date_pb2.Date(year=2026, month=1, day=1)
                )
            ],
            "GetFeeBreakdown": [ss.GetFeeBreakdownRequest(name=fuzzed.settlements[1])],
            "ExplainSettlement": [ss.ExplainSettlementRequest(name=fuzzed.settlements[0], language_code="zh")],
            "ReplaySettlement": [ss.ReplaySettlementRequest(name=fuzzed.settlements[2])],
            "VerifyAuditLog": [ss.VerifyAuditLogRequest()],
            "ValidateRuleset": [rs.ValidateRulesetRequest(source=us)],
            "CreateRulesetVersion": [rs.CreateRulesetVersionRequest(source=us)],
            "ApproveRulesetVersion": [rs.ApproveRulesetVersionRequest(name=fuzzed.drafts[0], note="ok")],
            "RetireRulesetVersion": [rs.RetireRulesetVersionRequest(name=fuzzed.retirable[-1], note="old")],
            "GetRulesetVersion": [rs.GetRulesetVersionRequest(name=fuzzed.approved[0])],
            "ListRulesetVersions": [rs.ListRulesetVersionsRequest(parent=US, page_size=1)],
            "DiffRulesetVersions": [rs.DiffRulesetVersionsRequest(name=fuzzed.approved[0], other_name=fuzzed.drafts[0])],
            "AnalyzeImpact": [
                rs.AnalyzeImpactRequest(
                    candidate=fuzzed.drafts[0],
                    period_start_from_date=date_pb2.Date(year=2026, month=1, day=1),
                    period_start_to_date=date_pb2.Date(year=2026, month=12, day=1),
                ),
                rs.AnalyzeImpactRequest(
                    candidate=fuzzed.drafts[0],
                    period_start_from_date=date_pb2.Date(year=2026, month=1, day=1),
                    period_start_to_date=date_pb2.Date(year=2026, month=12, day=1),
                    page_size=2,
                    page_token=fuzzed.page_tokens["impact"][0],
                ),
            ],
        }
        fuzzed.valid_samples.update({rpc: [m.SerializeToString() for m in messages] for rpc, messages in samples.items()})
    return fuzzed.valid_samples


@st.composite
def raw_payloads(draw: st.DrawFn, valid: Sequence[bytes]) -> bytes:
    """Random bytes, or a valid encoding mutated."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=512))
    base = bytearray(draw(st.sampled_from(list(valid))))
    if kind == 1 and base:  # bytes flipped
        for _ in range(draw(st.integers(1, 8))):
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
    elif kind == 2:  # truncated
        return bytes(base[: draw(st.integers(0, max(0, len(base) - 1)))])
    elif kind == 3:  # random bytes inserted
        at = draw(st.integers(0, len(base)))
        base[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == 4:  # unknown fields, of every wire type (6 and 7 do not exist)
        number = draw(st.one_of(st.integers(1, 40), st.integers(1000, (1 << 29) - 1)))
        wire = draw(st.integers(0, 7))
        payload = {
            0: varint(draw(st.integers(0, 2**64 - 1))),
            1: draw(st.binary(min_size=8, max_size=8)),
            5: draw(st.binary(min_size=4, max_size=4)),
        }.get(wire, varint(len(b := draw(st.binary(max_size=40)))) + b)
        extra = field_bytes(number, wire, payload if wire != 3 else b"")
        at = draw(st.sampled_from([0, len(base)]))
        base[at:at] = extra
    elif kind == 5:  # a known field with the wrong wire type
        number = draw(st.integers(1, 12))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        base += field_bytes(number, wire, {0: varint(2**63), 1: b"\xff" * 8, 2: varint(3) + b"\xff\xfe\xfd", 5: b"\x00" * 4}[wire])
    elif kind == 6:  # invalid UTF-8 in field 1 (every request's first field but VerifyAuditLog's is a string)
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\xc0\xafb", b"\xe2\x82"]))
        base = bytearray(field_bytes(1, 2, varint(len(bad)) + bad)) + base
    elif kind == 7:  # a length that runs past the end, or a huge varint
        base += field_bytes(draw(st.integers(1, 9)), 2, varint(draw(st.sampled_from([10**6, 2**31, 2**63]))))
    elif kind == 8:  # deep nesting in field 2 (a message in Settle, Simulate, ...)
        depth = draw(st.sampled_from([50, 101, 400]))
        inner = b""
        for _ in range(depth):
            inner = field_bytes(2, 2, varint(len(inner)) + inner)
        base += inner
    else:  # an open group that never closes
        base += field_bytes(draw(st.integers(1, 50)), 3)
    return bytes(base)


# --------------------------------------------------------------------------- the runs

HYPOTHESIS = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "print_blob": True,
    "phases": (Phase.explicit, Phase.generate, Phase.shrink),
    "suppress_health_check": (
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ),
}


def fuzz_messages(fuzzed: Fuzzed, rpc: str, examples: int) -> None:
    strategy = request_strategies(fuzzed)[rpc]

    @settings(max_examples=examples, **HYPOTHESIS)
    @given(request=strategy)
    def run(request: Any) -> None:
        if rpc in STREAMING:
            call_batch(fuzzed, request, "message")
            return
        _, raw = call_unary(fuzzed, rpc, request, "message")
        if raw is not None:
            check_reply(rpc, reply_type(rpc).FromString(raw), rpc)

    run()


def reply_type(rpc: str) -> type[Message]:
    module = ss if hasattr(ss, f"{rpc}Response") else rs
    return getattr(module, f"{rpc}Response")  # type: ignore[no-any-return]


def fuzz_raw(fuzzed: Fuzzed, rpc: str, examples: int) -> None:
    valid = valid_samples(fuzzed)[rpc]

    @settings(max_examples=examples, **HYPOTHESIS)
    @given(payloads=st.lists(raw_payloads(valid), min_size=1, max_size=3 if rpc in STREAMING else 1))
    def run(payloads: list[bytes]) -> None:
        call_raw(fuzzed, rpc, payloads, "raw")

    run()


def fuzz_rulesets(fuzzed: Fuzzed, examples: int) -> None:
    @settings(max_examples=examples, **HYPOTHESIS)
    @given(source=rulesets(), create=st.integers(0, 3))
    def run(source: str, create: int) -> None:
        with fuzzed.tally.lock:
            fuzzed.tally.rulesets += 1
        code, raw = call_unary(fuzzed, "ValidateRuleset", rs.ValidateRulesetRequest(source=source), "ruleset")
        size = len(source.encode("utf-8"))
        if code != grpc.StatusCode.OK:
            # only a blank text or one over 256 KiB is refused without a report
            if source.strip():
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and size > 256 * 1024, (code, size)
                fuzzed.tally.ruleset_statuses["too large"] += 1
            else:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, code
                fuzzed.tally.ruleset_statuses["blank"] += 1
            return
        assert size <= 256 * 1024, size
        report = rs.ValidateRulesetResponse.FromString(raw)
        check_problems(report.problems, source, "ValidateRuleset")
        fuzzed.tally.problems.update(p.code for p in report.problems if p.severity == "ERROR")
        errors = [p for p in report.problems if p.severity == "ERROR" and p.code != "example.failed"]
        assert report.valid == (not errors), report
        fuzzed.tally.ruleset_statuses["valid" if report.valid else "invalid"] += 1
        if create != 0:
            return
        created, reply = call_unary(fuzzed, "CreateRulesetVersion", rs.CreateRulesetVersionRequest(source=source), "ruleset")
        # Validate and Create agree: a valid text is stored as a draft with the same hash; an invalid one is refused, listing its errors
        if report.valid:
            assert created == grpc.StatusCode.OK, (created, report.problems[:3])
            version = rs.CreateRulesetVersionResponse.FromString(reply).ruleset_version
            assert version.content_hash == report.content_hash and version.source == source
            assert version.state == pb.RulesetVersion.STATE_DRAFT
        else:
            assert created == grpc.StatusCode.INVALID_ARGUMENT, created

    run()


def fuzz_oversized(fuzzed: Fuzzed, rpcs: Sequence[str]) -> None:
    """Messages over 4 MiB (the limit is gRPC's, before any handler); SettleBatch with more than
    1000 items in a message, and a stream whose second message is over the limit."""
    big = "x" * (4 * MIB + 10)
    for rpc in rpcs:
        request = METHODS[rpc][1]()
        text_fields = [f for f in request.DESCRIPTOR.fields if f.type == f.TYPE_STRING]
        if text_fields:
            setattr(request, text_fields[0].name, big)
            payload = request.SerializeToString()
        else:
            payload = field_bytes(99, 2, varint(len(big)) + big.encode())  # an unknown field carries the bulk
        code = call_raw(fuzzed, rpc, [payload], "oversized")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (rpc, code)
    too_many = ss.SettleBatchRequest(
        items=[ss.SettleBatchItem(request_id=f"many-{i}", input=us_input(contract_id="MANY")) for i in range(1001)]
    )
    assert call_batch(fuzzed, [too_many], "oversized") == grpc.StatusCode.RESOURCE_EXHAUSTED
    first = ss.SettleBatchRequest(items=[ss.SettleBatchItem(request_id="", input=us_input())])  # one bad item, answered
    assert (
        call_batch(fuzzed, [first, field_bytes(99, 2, varint(len(big)) + big.encode())], "oversized") == grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def long_stream(fuzzed: Fuzzed, messages: int, per_message: int, seed: int) -> None:
    """One SettleBatch stream of many messages of hostile items (a few valid): every item answered."""
    rng = random.Random(seed)
    stream = []
    for m in range(messages):
        items = []
        for i in range(per_message):
            item = ss.SettleBatchItem(request_id=f"long-{seed}-{m}-{i}", input=us_input(contract_id=f"LONG-{seed}-{i % 50}"))
            if rng.random() < 0.9:  # mostly bad: a hostile number, a bad date or a missing metric
                which = rng.randrange(3)
                if which == 0:
                    item.input.metrics["gross_gmv"].value = rng.choice(HOSTILE_NUMBERS)
                elif which == 1:
                    item.input.period_start_date.month = 13
                else:
                    del item.input.metrics["orders"]
            items.append(item)
        stream.append(ss.SettleBatchRequest(items=items))
    stream += [ss.SettleBatchRequest() for _ in range(messages)]  # empty messages get empty answers
    assert call_batch(fuzzed, stream, "long-stream", timeout=600) == grpc.StatusCode.OK


def arity_misuse(fuzzed: Fuzzed) -> None:
    """A unary method called as a stream, with no message or with two: gRPC itself answers
    (UNIMPLEMENTED "requires exactly one request message", or the first message is served)."""
    path, _ = METHODS["GetSettlement"]
    valid = valid_samples(fuzzed)["GetSettlement"][0]
    seen = []
    for payloads in ([], [valid, valid], [valid, b"\xff"]):
        call = fuzzed.channel.stream_stream(path)
        try:
            answers = list(call(iter(payloads), metadata=fuzzed.metadata("GetSettlement"), timeout=30))
        except grpc.RpcError as error:
            code = error.code()
        else:
            assert len(answers) == 1
            code = grpc.StatusCode.OK
        fuzzed.tally.count("arity", "GetSettlement", code)
        seen.append(code)
    assert seen[0] == grpc.StatusCode.UNIMPLEMENTED and set(seen[1:]) <= {grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED}, seen


# --------------------------------------------------------------------------- the tests

RPCS = sorted(METHODS)


def test_the_fuzz_covers_every_rpc() -> None:
    assert len(METHODS) == 17 and set(ROLE) == set(METHODS)
    assert {m.name for m in ss.DESCRIPTOR.services_by_name["SettlementService"].methods} | {
        m.name for m in rs.DESCRIPTOR.services_by_name["RulesetService"].methods
    } == set(METHODS)


@pytest.mark.parametrize("rpc", RPCS)
def test_hostile_messages_get_clean_statuses(fuzzed: Fuzzed, rpc: str) -> None:
    before = collections.Counter(fuzzed.tally.item_statuses if rpc in STREAMING else fuzzed.tally.by_rpc[rpc])
    fuzz_messages(fuzzed, rpc, DEFAULT_RUN[fuzzed.database].messages // (4 if rpc in STREAMING else 1))
    seen = (fuzzed.tally.item_statuses if rpc in STREAMING else fuzzed.tally.by_rpc[rpc]) - before  # items of the streams
    # not vacuous: some requests were served, and (but for the one without fields) some refused
    assert seen["OK"] > 0 and (rpc == "VerifyAuditLog" or seen.total() > seen["OK"]), seen


@pytest.mark.parametrize("rpc", RPCS)
def test_raw_and_mutated_bytes_get_clean_statuses(fuzzed: Fuzzed, rpc: str) -> None:
    fuzz_raw(fuzzed, rpc, DEFAULT_RUN[fuzzed.database].raw)
    codes = fuzzed.tally.by_rpc[rpc]
    assert codes["INVALID_ARGUMENT"] > 0, codes  # some bytes did not parse, and said so


def test_oversized_messages_and_long_streams(fuzzed: Fuzzed) -> None:
    # The size limit is gRPC's, the same whatever the database: every RPC on one of them.
    fuzz_oversized(fuzzed, RPCS if fuzzed.database == "sqlite" else ["Settle", "CreateRulesetVersion", "VerifyAuditLog"])
    messages, per_message = DEFAULT_RUN[fuzzed.database].stream
    long_stream(fuzzed, messages=messages, per_message=per_message, seed=1)
    arity_misuse(fuzzed)


def test_random_and_malformed_rulesets(fuzzed: Fuzzed) -> None:
    fuzz_rulesets(fuzzed, DEFAULT_RUN[fuzzed.database].rulesets)
    outcomes = fuzzed.tally.ruleset_statuses
    assert outcomes["valid"] > 0 and outcomes["invalid"] > 0, outcomes


def test_the_server_is_alive_and_its_memory_bounded(fuzzed: Fuzzed) -> None:
    fuzzed.alive()
    grown = fuzzed.rss() - fuzzed.rss_start_kib
    print(f"\n{fuzzed.database}: {fuzzed.tally.total} requests, RSS {fuzzed.rss_start_kib} → {fuzzed.rss()} KiB (+{grown})")
    assert grown < 150 * 1024, f"resident memory grew by {grown} KiB"


# --------------------------------------------------------------------------- the long run


@pytest.mark.long
def test_long_fuzz_run(fuzzed: Fuzzed) -> None:
    """≥ 100,000 requests and ≥ 10,000 rulesets; the server alive and its memory bounded after."""
    start = fuzzed.tally.total
    for rpc in RPCS:
        fuzz_messages(fuzzed, rpc, LONG_RUN.messages // (4 if rpc in STREAMING else 1))
        fuzz_raw(fuzzed, rpc, LONG_RUN.raw)
    fuzz_oversized(fuzzed, RPCS)
    for seed in range(10):
        long_stream(fuzzed, messages=LONG_RUN.stream[0], per_message=LONG_RUN.stream[1], seed=100 + seed)
    fuzz_rulesets(fuzzed, LONG_RUN.rulesets)
    sent = fuzzed.tally.total - start
    print(f"\nlong run ({fuzzed.database}): {sent} requests, {fuzzed.tally.rulesets} rulesets, {fuzzed.tally.batch_items} batch items")
    assert sent >= 100_000 and fuzzed.tally.rulesets >= 10_000
    fuzzed.alive()
    grown = fuzzed.rss() - fuzzed.rss_start_kib
    assert grown < 300 * 1024, f"resident memory grew by {grown} KiB"
