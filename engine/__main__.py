"""`python -m engine check FILE...` and `python -m engine demo FILE`: the engine on its own.

`check` validates rulesets and runs their examples (exit 1 if any fails); `demo` prints one
settlement of the first example as canonical JSON. The service replaces this as `make run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine import compile_ruleset, request_from_mapping, validate_ruleset
from engine.problems import Severity


def check(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        report = validate_ruleset(text)
        lines = text.splitlines()
        for problem in report.problems:
            print(f"{path}:{problem.line}:{problem.column}: {problem.severity.value}: {problem.code}: {problem.message}")
            if 0 < problem.line <= len(lines):
                print(f"    {lines[problem.line - 1]}\n    {' ' * max(problem.column - 1, 0)}^")
        passed = sum(o.passed for o in report.examples)
        status = "ok" if report.examples_pass else "FAILED"
        errors = sum(p.severity is Severity.ERROR for p in report.problems)
        print(f"{path}: {status} ({passed}/{len(report.examples)} examples pass, {errors} errors)")
        failed += not report.examples_pass
    return 1 if failed else 0


def demo(path: str) -> int:
    compiled = compile_ruleset(Path(path).read_text(encoding="utf-8"))
    example = compiled.ruleset.examples[0]
    decision = compiled.settle(request_from_mapping(example.request, compiled.ruleset.effective_from))
    print(f"# {compiled.id}: example {example.name!r}")
    print(json.dumps(decision.to_dict(), indent=2, ensure_ascii=False))
    compiled.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="validate rulesets and run their examples").add_argument("paths", nargs="+")
    commands.add_parser("demo", help="print one settlement").add_argument("path")
    args = parser.parse_args(argv)
    return check(args.paths) if args.command == "check" else demo(args.path)


if __name__ == "__main__":
    sys.exit(main())
