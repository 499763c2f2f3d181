"""kpisettle engine: rulesets in, exact and auditable settlement decisions out.

No gRPC and no database here. The public API is what `__all__` lists.
"""

from engine.compiler import CompiledRuleset, compile_ruleset
from engine.decision import Decision, ExemptionOutcome, FxUsed, Line, RaisedWarning, RuleOutcome
from engine.diff import Change, diff_rulesets
from engine.examples import ExampleOutcome, Mismatch, run_examples
from engine.explain import explain_decision
from engine.problems import EngineError, Problem, ProblemsError, RequestInvalid, RulesetInvalid, Severity
from engine.request import FxRate, MoneyAmount, SettlementRequest, request_from_mapping
from engine.validate import ValidationReport, validate_ruleset
from engine.version import ENGINE_VERSION

__version__ = ENGINE_VERSION

__all__ = [
    "ENGINE_VERSION",
    "Change",
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
    "diff_rulesets",
    "explain_decision",
    "request_from_mapping",
    "run_examples",
    "validate_ruleset",
]
