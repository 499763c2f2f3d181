"""One call that says everything about a ruleset: errors, warnings, and its examples."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from engine.compiler import _compile, content_hash, parse_and_validate
from engine.examples import ExampleOutcome, example_problems, run_examples
from engine.problems import Problem, RulesetInvalid, Severity


@dataclass(frozen=True)
class ValidationReport:
    ruleset_id: str | None
    content_hash: str | None
    problems: tuple[Problem, ...]  # errors and warnings, examples' failures included
    examples: tuple[ExampleOutcome, ...]
    effective_from: datetime.date | None = None

    @property
    def valid(self) -> bool:
        """No error other than failing examples: the ruleset can be stored as a draft."""
        return not any(p.severity is Severity.ERROR and p.code != "example.failed" for p in self.problems)

    @property
    def examples_pass(self) -> bool:
        return self.valid and all(o.passed for o in self.examples)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]


def validate_ruleset(source: str | bytes) -> ValidationReport:
    """Validate and, if the ruleset compiles, run its examples. Never raises for bad input."""
    document, ruleset, problems = parse_and_validate(source)
    if document is None or ruleset is None:
        digest = content_hash(document) if document is not None else None
        return ValidationReport(None, digest, tuple(problems), ())
    try:
        compiled = _compile(document, ruleset, problems, None)
    except RulesetInvalid as exc:
        return ValidationReport(ruleset.id, content_hash(document), exc.problems, (), ruleset.effective_from)
    try:
        outcomes = run_examples(compiled)
    finally:
        compiled.close()
    located = [_locate(p, compiled.document) for p in example_problems(outcomes)]
    return ValidationReport(ruleset.id, compiled.content_hash, (*problems, *located), tuple(outcomes), ruleset.effective_from)


def _locate(problem: Problem, document: object) -> Problem:
    line, column = document.position(problem.path)  # type: ignore[attr-defined]
    return Problem(problem.code, problem.path, problem.message, problem.severity, line, column)
