"""The engine's public surface is small and deliberate; changing it must be a decision."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

PUBLIC = {
    "ENGINE_VERSION", "Change", "CompiledRuleset", "Decision", "EngineError", "ExampleOutcome", "ExemptionOutcome",
    "FxRate", "FxUsed", "Line", "Mismatch", "MoneyAmount", "Problem", "ProblemsError", "RaisedWarning",
    "RequestInvalid", "RuleOutcome", "RulesetInvalid", "SettlementRequest", "Severity", "ValidationReport",
    "compile_ruleset", "diff_rulesets", "explain_decision", "request_from_mapping", "run_examples", "validate_ruleset",
}  # fmt: skip


def test_all_lists_exactly_the_public_api() -> None:
    assert set(engine.__all__) == PUBLIC
    for name in engine.__all__:
        assert hasattr(engine, name), name


def test_only_the_matcher_imports_durable_rules() -> None:
    importers = []
    for path in Path(engine.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.startswith(("durable", "durable_rules_engine")) for n in names):
                importers.append(path.name)
    assert importers == ["matcher.py"]


def test_engine_knows_nothing_of_grpc_or_databases() -> None:
    forbidden = ("grpc", "sqlalchemy", "psycopg", "sqlite3", "google.protobuf")
    for path in Path(engine.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for module in forbidden:
            assert f"import {module}" not in text and f"from {module}" not in text, (path.name, module)


def test_no_float_or_eval_in_the_engine() -> None:
    for path in Path(engine.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("float", "eval", "exec", "compile"), (path.name, node.lineno)
            if isinstance(node, ast.Constant):
                assert not isinstance(node.value, float), (path.name, node.lineno)
