"""Problems found in a ruleset or a settlement request, and the errors that carry them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: a stable code, where it is, and a sentence for people.

    `line` and `column` are 1-based positions in the ruleset source (0 when unknown or
    when the problem is about a request, which has no source text).
    """

    code: str
    path: str
    message: str
    severity: Severity = Severity.ERROR
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}: " if self.line else ""
        path = f" ({self.path})" if self.path else ""
        return f"{where}{self.severity.value} {self.code}: {self.message}{path}"


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class ProblemsError(EngineError):
    """An error that lists every problem found at once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        summary = "; ".join(str(p) for p in self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(summary + more)


class RulesetInvalid(ProblemsError):
    """The ruleset cannot be compiled; `problems` lists every error (and warning)."""


class RequestInvalid(ProblemsError):
    """A settlement request fails the checks of SPEC §4 step 1 (or a later arithmetic check)."""


def errors_only(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.ERROR]
