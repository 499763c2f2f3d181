"""`kpisettle rulesets validate FILE...`: the engine's own validation, offline, compiler-style.

Each problem prints as `file:line:col: code: message` (warnings end in "(warning)"), then
the source line and a caret under the column; then one summary line per file. Exit 0 when
every file is valid and its examples pass, 1 when any has errors or failing examples, 2
when a file cannot be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from engine import validate_ruleset
from engine.problems import Problem, Severity

from .output import Lines, Report, emit

PROBLEM_COLUMNS = ("file", "line", "column", "severity", "code", "path", "message")


def problem_lines(file: str, problem: Problem, source_lines: list[str]) -> list[str]:
    """`file:line:col: code: message`, then the source line and a caret under the column."""
    where = f"{file}:{problem.line}:{problem.column}" if problem.line else file
    tail = " (warning)" if problem.severity is not Severity.ERROR else ""
    out = [f"{where}: {problem.code}: {problem.message}{tail}"]
    if 0 < problem.line <= len(source_lines):
        source = source_lines[problem.line - 1].expandtabs(1)
        out += [f"    {source}", f"    {' ' * max(problem.column - 1, 0)}^"]
    return out


def validate_files(paths: list[str], fmt: str, stdout: TextIO, stderr: TextIO) -> int:
    worst = 0
    data: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    human: list[str] = []
    for file in paths:
        try:
            source = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"kpisettle: cannot read {file}: {exc}", file=stderr)
            worst = 2
            continue
        report = validate_ruleset(source)
        lines = source.splitlines()
        problems = [
            {
                "file": file,
                "line": p.line,
                "column": p.column,
                "severity": p.severity.value,
                "code": p.code,
                "path": p.path,
                "message": p.message,
            }
            for p in report.problems
        ]
        rows += problems
        passed = sum(o.passed for o in report.examples)
        data.append(
            {
                "file": file,
                "ruleset_id": report.ruleset_id,
                "content_hash": report.content_hash,
                "valid": report.valid,
                "examples_pass": report.examples_pass,
                "examples": [{"name": o.name, "passed": o.passed} for o in report.examples],
                "problems": problems,
            }
        )
        for problem in report.problems:
            human += problem_lines(file, problem, lines)
        errors = len(report.errors)
        status = "ok" if report.examples_pass else "FAILED"
        human.append(
            f"{file}: {status} ({report.ruleset_id + ': ' if report.ruleset_id else ''}{passed}/{len(report.examples)} examples pass, "
            f"{errors} errors, {len(report.warnings)} warnings)"
        )
        if not report.examples_pass:
            worst = max(worst, 1)
    out = Report(data, rows, PROBLEM_COLUMNS, [Lines("\n".join(human))])
    if data or fmt != "table":
        emit(out, fmt, stdout)
    return worst
