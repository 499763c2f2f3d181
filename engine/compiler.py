"""Compiling a ruleset version: parse, validate, build the matchers, hash the content."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field

from engine.conditions import Condition
from engine.decision import Decision
from engine.expressions import Explainer, compile_evidence
from engine.matcher import Matcher
from engine.model import FeeKind, Ruleset
from engine.problems import Problem, RulesetInvalid, Severity
from engine.request import SettlementRequest
from engine.settlement import Explained, FeePlan, plan_fees, settle
from engine.source import SourceDocument, SourceError, load_source
from engine.validation import RulesetBuilder


@dataclass
class CompiledRuleset:
    """A ruleset version ready to settle. Thread-safe; call close() when retiring it."""

    ruleset: Ruleset
    content_hash: str
    version: int | None
    warnings: tuple[Problem, ...]
    exemption_matcher: Matcher
    condition_matcher: Matcher
    #: per exemption: name, evidence writer, English and Chinese label (plain tuples, unpacked per settlement)
    exemption_plans: tuple[tuple[str, Explainer, str, str], ...]
    rules: tuple[Explained, ...]
    #: per warning: its index in `rules`, id, English and Chinese message
    warning_plans: tuple[tuple[int, str, str, str], ...]
    document: SourceDocument
    input_names: dict[str, frozenset[str]]
    fee_plans: tuple[FeePlan, ...]
    _closed: bool = field(default=False, repr=False)
    _close_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def id(self) -> str:
        return self.ruleset.id

    def settle(self, request: SettlementRequest) -> Decision:
        """Compute the decision (SPEC §4). Raises RequestInvalid listing every problem."""
        return settle(self, request)

    def close(self) -> None:
        """Free the matcher's native sessions; the object must not be used afterwards."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.exemption_matcher.close()
                self.condition_matcher.close()


def content_hash(document: SourceDocument) -> str:
    """SHA-256 of the document's values as compact JSON in source order.

    Comments, quoting and layout do not count; order does, because it is meaning: KPIs,
    fees and exemptions are evaluated and reported in the order written.
    """
    text = json.dumps(document.data, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_and_validate(source: str | bytes) -> tuple[SourceDocument | None, Ruleset | None, list[Problem]]:
    try:
        document = load_source(source)
    except SourceError as exc:
        return None, None, [exc.problem]
    builder = RulesetBuilder(document)
    ruleset, problems = builder.build()
    return document, ruleset, problems


def compile_ruleset(source: str | bytes, version: int | None = None) -> CompiledRuleset:
    """Parse, validate and compile. Raises RulesetInvalid with every problem found."""
    document, ruleset, problems = parse_and_validate(source)
    if ruleset is None or document is None:
        raise RulesetInvalid(problems)
    return _compile(document, ruleset, problems, version)


def _compile(document: SourceDocument, ruleset: Ruleset, problems: list[Problem], version: int | None) -> CompiledRuleset:
    integral = set(ruleset.integral)
    markets = list(ruleset.markets)
    exemption_rules: list[tuple[str, Condition]] = [(e.name, e.condition) for e in ruleset.exemptions]
    condition_rules: list[tuple[str, Condition]] = []
    explained: list[Explained] = []
    warning_plans: list[tuple[int, str, str, str]] = []
    for fee in ruleset.fees:
        if fee.kind is FeeKind.BONUS and fee.steps_on is not None:
            for step in fee.steps:
                condition_rules.append((step.rule, step.condition))
                explained.append((step.rule, "bonus_step", compile_evidence(step.when, integral)))
        elif fee.condition is not None and fee.when is not None:
            condition_rules.append((fee.id, fee.condition))
            explained.append((fee.id, fee.kind.value, compile_evidence(fee.when.tree, integral)))
    for warning in ruleset.warnings:
        condition_rules.append((warning.id, warning.condition))
        warning_plans.append((len(explained), warning.id, warning.message.en, warning.message.zh))
        explained.append((warning.id, "warning", compile_evidence(warning.when.tree, integral)))
    try:
        exemption_matcher = Matcher(exemption_rules, ruleset.name_types, integral, markets)
        condition_matcher = Matcher(condition_rules, ruleset.name_types, integral, markets)
    except ValueError as exc:  # a limit check the validator should already have reported
        raise RulesetInvalid([*problems, Problem(getattr(exc, "code", "rule.limit"), "", str(exc))]) from exc
    return CompiledRuleset(
        ruleset=ruleset,
        content_hash=content_hash(document),
        version=version,
        warnings=tuple(p for p in problems if p.severity is Severity.WARNING),
        exemption_matcher=exemption_matcher,
        condition_matcher=condition_matcher,
        exemption_plans=tuple((e.name, compile_evidence(e.when.tree, integral), e.label.en, e.label.zh) for e in ruleset.exemptions),
        rules=tuple(explained),
        warning_plans=tuple(warning_plans),
        document=document,
        input_names={
            "metrics": frozenset(m.name for m in ruleset.metrics),
            "params": frozenset(p.name for p in ruleset.params),
        },
        fee_plans=plan_fees(ruleset.fees),
    )
