"""RulesetService: validation, versions, four-eyes approval, diff and impact (SPEC §6)."""

from __future__ import annotations

import datetime
import hashlib
import re
import threading
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
from kpisettle.v1 import resources_pb2 as pb
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import ruleset_service_pb2_grpc as rs_grpc

from engine import CompiledRuleset, Problem, ProblemsError, ValidationReport, compile_ruleset, run_examples, validate_ruleset
from engine.diff import diff_rulesets
from engine.money import plain
from engine.source import MAX_SOURCE_BYTES  # 256 KiB of UTF-8, the engine's limit
from server import convert
from server.auth import current_principal
from server.errors import ServiceError, Violation, invalid, problem_violations, rpc_errors
from server.paging import decode_token, encode_token, page_size
from server.storage.interface import Conflict, LifecycleAction, RulesetVersionRecord, SettlementRecord, Store, VersionStatus
from server.versions import VersionRegistry

MAX_NOTE_CHARS = 2000
#: Summaries of stored sources (title, currency, warnings, examples) kept in memory.
SUMMARY_CACHE_SIZE = 4096
#: AnalyzeImpact pages (AIP-158): 0 → the default; above the maximum → the maximum. Each page
#: also stops before IMPACT_MAX_PAGE_BYTES, well below gRPC's 4 MiB default message limit
#: (an impact of a US settlement is ~107 bytes; one with a long error can be far larger).
IMPACT_DEFAULT_PAGE_SIZE = 1000
IMPACT_MAX_PAGE_SIZE = 10_000
IMPACT_MAX_PAGE_BYTES = 3 * 1024 * 1024
IMPACT_TOKEN = "impact"
_TOKEN_RULESET = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class _Summary:
    """What a RulesetVersion message shows besides the stored record; fixed by the source."""

    title: str
    currency: str
    warnings: tuple[pb.RulesetProblem, ...]
    examples_pass: bool


def problem_message(problem: Problem) -> pb.RulesetProblem:
    return pb.RulesetProblem(
        code=problem.code,
        path=problem.path,
        message=problem.message,
        severity=problem.severity.value.upper(),
        line=problem.line,
        column=problem.column,
    )


def _source(text: str) -> str:
    if not text.strip():
        raise invalid("source is required", [Violation("source", "the ruleset text is empty")])
    size = len(text.encode("utf-8"))
    if size > MAX_SOURCE_BYTES:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RULESET_TOO_LARGE",
            f"the ruleset has {size} bytes (UTF-8); at most {MAX_SOURCE_BYTES} (256 KiB) are accepted",
            metadata={"maxBytes": str(MAX_SOURCE_BYTES), "bytes": str(size)},
        )
    return text


def _note(note: str) -> str:
    """A lifecycle note: free text, but bounded and without control characters (a NUL cannot even
    be stored in PostgreSQL text; newlines and tabs are fine)."""
    if len(note) > MAX_NOTE_CHARS:
        raise invalid("note is too long", [Violation("note", f"at most {MAX_NOTE_CHARS} characters", "request.too_long")])
    control = _CONTROL.search(note)
    if control:
        described = f"U+{ord(control.group()):04X} at position {control.start()}: no control characters other than newline and tab"
        raise invalid("note has a control character", [Violation("note", described, "request.control_character")])
    return note


def _transition_refused(conflict: Conflict, name: str) -> ServiceError:
    """A lifecycle change another call made first (the store re-checks the state under its lock)."""
    if conflict.reason == "INVALID_TRANSITION":
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION", f"{name}: {conflict}")
    return ServiceError(grpc.StatusCode.ABORTED, conflict.reason, str(conflict))


def _list_token(parent: str, token: str) -> tuple[str, int] | None:
    """The (ruleset_id, version) after which a page starts; the token must come from the same parent."""
    key: Any = decode_token("rulesets", token)  # a token that does not decode is refused there
    if key is None:
        return None
    if (
        isinstance(key, list)
        and len(key) == 3
        and key[0] == parent
        and isinstance(key[1], str)
        and _TOKEN_RULESET.fullmatch(key[1])
        and type(key[2]) is int
        and 0 < key[2] < 2**31
    ):
        return key[1], key[2]
    raise invalid(
        "page_token is not a token this list returned", [Violation("page_token", "unknown or damaged token, or one of another parent")]
    )


def _impact_position(token: str, bound: list[str], start: datetime.date, end: datetime.date) -> tuple[datetime.date, str] | None:
    """The (period_start, contract_id) after which an AnalyzeImpact page starts. A token is
    bound to the candidate and range it was issued for (`bound`): pages of another analysis
    would mix two candidates' totals."""
    key: Any = decode_token(IMPACT_TOKEN, token)  # a token that does not decode is refused there
    if key is None:
        return None
    try:
        *issued_for, period_start, contract_id = key
        if (
            issued_for == bound
            and isinstance(period_start, str)
            and isinstance(contract_id, str)
            and convert.ID_TEXT.fullmatch(contract_id)
        ):
            day = datetime.date.fromisoformat(period_start)
            if start <= day <= end:
                return day, contract_id
    except (TypeError, ValueError):
        pass
    raise invalid(
        "page_token is not a token this analysis returned",
        [Violation("page_token", "unknown or damaged token, or one of another candidate or period range")],
    )


class RulesetService(rs_grpc.RulesetServiceServicer):
    def __init__(self, store: Store, registry: VersionRegistry) -> None:
        self._store = store
        self._registry = registry
        self._summaries: OrderedDict[str, _Summary] = OrderedDict()
        self._summaries_lock = threading.Lock()

    def _summary(self, record: RulesetVersionRecord, report: ValidationReport | None = None) -> _Summary:
        """Title, currency, warnings and examples of a stored source, cached by the source's digest
        (a stored source never changes; the cache is bounded)."""
        key = hashlib.sha256(record.source.encode("utf-8")).hexdigest()
        with self._summaries_lock:
            found = self._summaries.get(key)
            if found is not None:
                self._summaries.move_to_end(key)
                return found
        compiled = self._registry.cached(record)
        transient: CompiledRuleset | None = None
        if compiled is None:  # listing must not fill the registry with versions nobody settles
            try:
                compiled = transient = compile_ruleset(record.source, record.version)
            except ProblemsError as exc:  # stored before an engine change: still readable, never approvable
                return _Summary("", "", tuple(problem_message(p) for p in exc.problems), False)
        try:
            if report is not None:
                warnings, examples_pass = report.warnings, report.examples_pass
            else:
                warnings, examples_pass = list(compiled.warnings), all(o.passed for o in run_examples(compiled))
            summary = _Summary(
                title=compiled.ruleset.title,
                currency=compiled.ruleset.currency,
                warnings=tuple(problem_message(p) for p in warnings),
                examples_pass=examples_pass,
            )
        finally:
            if transient is not None:
                transient.close()
        with self._summaries_lock:
            self._summaries[key] = summary
            while len(self._summaries) > SUMMARY_CACHE_SIZE:
                self._summaries.popitem(last=False)
        return summary

    def _message(self, record: RulesetVersionRecord, with_source: bool = True, report: ValidationReport | None = None) -> pb.RulesetVersion:
        summary = self._summary(record, report)
        events = self._store.lifecycle_events(record.tenant, record.ruleset_id, record.version)
        return convert.ruleset_version_message(
            record,
            events,
            title=summary.title,
            currency=summary.currency,
            warnings=summary.warnings,
            examples_pass=summary.examples_pass,
            with_source=with_source,
        )

    @rpc_errors
    def ValidateRuleset(self, request: rs.ValidateRulesetRequest, context: grpc.ServicerContext) -> rs.ValidateRulesetResponse:
        report = validate_ruleset(_source(request.source))
        return rs.ValidateRulesetResponse(
            valid=report.valid,
            examples_pass=report.examples_pass,
            problems=[problem_message(p) for p in report.problems],
            examples=[
                rs.ExampleResult(
                    name=o.name, passed=o.passed, mismatches=[f"{m.field}: expected {m.expected}, got {m.actual}" for m in o.mismatches]
                )
                for o in report.examples
            ],
            ruleset_id=report.ruleset_id or "",
            content_hash=report.content_hash or "",
        )

    @rpc_errors
    def CreateRulesetVersion(
        self, request: rs.CreateRulesetVersionRequest, context: grpc.ServicerContext
    ) -> rs.CreateRulesetVersionResponse:
        source = _source(request.source)
        report = validate_ruleset(source)
        if not report.valid or report.ruleset_id is None:
            errors = [p for p in report.errors if p.code != "example.failed"]
            raise invalid("the ruleset is invalid", problem_violations(errors, "source."), "RULESET_INVALID")
        assert report.effective_from is not None
        principal = current_principal()
        record = self._store.create_ruleset_version(
            principal.tenant, report.ruleset_id, source, report.content_hash or "", report.effective_from, principal.name
        )
        return rs.CreateRulesetVersionResponse(ruleset_version=self._message(record, report=report))

    def _record(self, name: str, field: str = "name") -> RulesetVersionRecord:
        ruleset_id, version = convert.ruleset_name(name, field, versioned=True)
        assert version is not None
        return self._store.get_ruleset_version(current_principal().tenant, ruleset_id, version)

    @rpc_errors
    def ApproveRulesetVersion(
        self, request: rs.ApproveRulesetVersionRequest, context: grpc.ServicerContext
    ) -> rs.ApproveRulesetVersionResponse:
        note = _note(request.note)
        record = self._record(request.name)
        principal = current_principal()
        if record.status is not VersionStatus.DRAFT:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_DRAFT", f"{request.name} is {record.status.value}; only a DRAFT can be approved"
            )
        if record.author == principal.name:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "FOUR_EYES",
                f"{principal.name} created {request.name}; another principal must approve it",
            )
        report = validate_ruleset(record.source)  # the examples run again, now, under this engine
        if not report.examples_pass:
            failures = [p for p in report.errors if p.code == "example.failed"] or list(report.errors)
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "EXAMPLES_FAIL",
                f"{request.name} cannot be approved: its examples do not pass",
                problem_violations(failures, "source."),
            )
        try:
            updated = self._store.record_lifecycle(
                principal.tenant, record.ruleset_id, record.version, LifecycleAction.APPROVED, principal.name, note
            )
        except Conflict as conflict:
            raise _transition_refused(conflict, request.name) from conflict
        return rs.ApproveRulesetVersionResponse(ruleset_version=self._message(updated, report=report))

    @rpc_errors
    def RetireRulesetVersion(
        self, request: rs.RetireRulesetVersionRequest, context: grpc.ServicerContext
    ) -> rs.RetireRulesetVersionResponse:
        note = _note(request.note)
        record = self._record(request.name)
        principal = current_principal()
        if record.status is VersionStatus.RETIRED:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_RETIRED", f"{request.name} is already RETIRED")
        try:
            updated = self._store.record_lifecycle(
                principal.tenant, record.ruleset_id, record.version, LifecycleAction.RETIRED, principal.name, note
            )
        except Conflict as conflict:
            raise _transition_refused(conflict, request.name) from conflict
        return rs.RetireRulesetVersionResponse(ruleset_version=self._message(updated))

    @rpc_errors
    def GetRulesetVersion(self, request: rs.GetRulesetVersionRequest, context: grpc.ServicerContext) -> rs.GetRulesetVersionResponse:
        return rs.GetRulesetVersionResponse(ruleset_version=self._message(self._record(request.name)))

    @rpc_errors
    def ListRulesetVersions(self, request: rs.ListRulesetVersionsRequest, context: grpc.ServicerContext) -> rs.ListRulesetVersionsResponse:
        if request.parent == "rulesets/-":
            ruleset_id = None
        else:
            ruleset_id, _ = convert.ruleset_name(request.parent, "parent", versioned=False)
        size = page_size(request.page_size)
        after = _list_token(request.parent, request.page_token)
        tenant = current_principal().tenant
        # The store caps a page at the largest page size, so ask for exactly one page and,
        # when it is full, look for one more version after it.
        records = self._store.list_ruleset_versions(tenant, ruleset_id, size, after)
        token = ""
        if len(records) >= size and records:
            last = (records[-1].ruleset_id, records[-1].version)
            if self._store.list_ruleset_versions(tenant, ruleset_id, 1, last):
                token = encode_token("rulesets", [request.parent, *last])
        return rs.ListRulesetVersionsResponse(
            ruleset_versions=[self._message(r, with_source=False) for r in records], next_page_token=token
        )

    @rpc_errors
    def DiffRulesetVersions(self, request: rs.DiffRulesetVersionsRequest, context: grpc.ServicerContext) -> rs.DiffRulesetVersionsResponse:
        old, new = self._record(request.name), self._record(request.other_name, "other_name")
        changes = diff_rulesets(old.source, new.source)
        return rs.DiffRulesetVersionsResponse(
            changes=[
                rs.RulesetChange(change=c.change, path=c.path, description=c.description, before=c.before, after=c.after) for c in changes
            ]
        )

    @rpc_errors
    def AnalyzeImpact(self, request: rs.AnalyzeImpactRequest, context: grpc.ServicerContext) -> rs.AnalyzeImpactResponse:
        candidate = self._record(request.candidate, "candidate")
        violations: list[Violation] = []
        start = convert.to_date(request.period_start_from_date, "period_start_from_date", violations)
        end = convert.to_date(request.period_start_to_date, "period_start_to_date", violations)
        if request.page_size < 0:
            violations.append(Violation("page_size", f"{request.page_size} is negative"))
        if violations:
            raise invalid("the impact request is invalid", violations)
        assert start is not None and end is not None
        if end < start:
            raise invalid("the period range is empty", [Violation("period_start_to_date", "is before period_start_from_date")])
        size = page_size(request.page_size, IMPACT_MAX_PAGE_SIZE, default=IMPACT_DEFAULT_PAGE_SIZE)
        bound = [convert.version_name(candidate.ruleset_id, candidate.version), start.isoformat(), end.isoformat()]
        after = _impact_position(request.page_token, bound, start, end)
        compiled = self._registry.compiled(candidate)
        response = rs.AnalyzeImpactResponse()
        sums: dict[str, list[Decimal]] = {}
        last = after
        more = False
        page_bytes = 0
        stored_settlements = self._store.settlements_in_period(current_principal().tenant, start, end, after)
        with closing(stored_settlements):  # a full page leaves the rest of the stream unread
            for stored in stored_settlements:
                if not context.is_active():  # the caller is gone: nobody reads this page
                    more = True
                    break
                data = stored.data
                if data.ruleset_id != candidate.ruleset_id:
                    continue
                if len(response.impacts) >= size:  # one more to analyse: there is a next page (not run here)
                    more = True
                    break
                impact, new_total = self._impact(compiled, stored)
                page_bytes += impact.ByteSize() + 8  # its tag and length, with room to spare
                if page_bytes > IMPACT_MAX_PAGE_BYTES and response.impacts:  # it starts the next page instead
                    more = True
                    break
                response.impacts.append(impact)
                last = (data.period_start, data.contract_id)
                response.settlements_analyzed += 1
                if impact.error:
                    response.settlements_failed += 1
                elif new_total is not None and impact.new_total.currency_code == data.currency:
                    pair = sums.setdefault(data.currency, [Decimal(0), Decimal(0)])
                    pair[0] += Decimal(data.total)
                    pair[1] += new_total
        response.totals.extend(
            rs.ImpactTotal(currency_code=code, old_total=plain(old), new_total=plain(new), delta=plain(new - old))
            for code, (old, new) in sorted(sums.items())
        )
        if more and last is not None:
            response.next_page_token = encode_token(IMPACT_TOKEN, [*bound, last[0].isoformat(), last[1]])
        return response

    @staticmethod
    def _impact(compiled: CompiledRuleset, stored: SettlementRecord) -> tuple[rs.SettlementImpact, Decimal | None]:
        """One stored settlement re-run under the candidate, and its new total (None when the
        impact's `error` says why it could not be)."""
        data = stored.data
        impact = rs.SettlementImpact(
            settlement=f"settlements/{stored.settlement_id}",
            contract_id=data.contract_id,
            period_start_date=convert.from_date(data.period_start),
            old_total=pb.Money(amount=data.total, currency_code=data.currency),
        )
        try:
            message = convert.input_from_dict(convert.load_json(data.request_json)["input"])
            decision = compiled.settle(convert.engine_request(message))
        except ProblemsError as exc:
            impact.error = "; ".join(f"{p.code}: {p.message}" for p in exc.problems)
            return impact, None
        if decision.period_end != data.period_end.isoformat():
            impact.error = (
                f"period.mismatch: the candidate's period ends {decision.period_end}, the settlement's {data.period_end.isoformat()}"
            )
            return impact, None
        impact.new_total.CopyFrom(pb.Money(amount=plain(decision.total), currency_code=decision.currency))
        impact.delta = plain(decision.total - Decimal(data.total)) if decision.currency == data.currency else ""
        return impact, decision.total
