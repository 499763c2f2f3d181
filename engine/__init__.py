"""kpisettle engine: rulesets in, exact and auditable settlement decisions out.

No gRPC and no database here. The public API is what `__all__` lists.
"""

from engine.compiler import CompiledRuleset, compile_ruleset
from engine.decision import Decision, ExemptionOutcome, FxUsed, Line, RaisedWarning, RuleOutcome
from engine.examples import ExampleOutcome, Mismatch, run_examples
from engine.problems import EngineError, Problem, ProblemsError, RequestInvalid, RulesetInvalid, Severity
from engine.request import FxRate, MoneyAmount, SettlementRequest, request_from_mapping
from engine.validate import ValidationReport, validate_ruleset
from engine.version import ENGINE_VERSION

__version__ = ENGINE_VERSION

__all__ = [
    "ENGINE_VERSION",
    "CompiledRuleset",
    "Decision",
    "EngineError",
    "ExampleOutcome",
    "ExemptionOutcome",
    "FxRate",
    "FxUsed",
    "Line",
    "Mismatch",
    "MoneyAmount",
    "Problem",
    "ProblemsError",
    "RaisedWarning",
    "RequestInvalid",
    "RuleOutcome",
    "RulesetInvalid",
    "SettlementRequest",
    "Severity",
    "ValidationReport",
    "compile_ruleset",
    "request_from_mapping",
    "run_examples",
    "validate_ruleset",
]
