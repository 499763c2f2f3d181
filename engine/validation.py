"""From a parsed document to a validated Ruleset, collecting every problem at once."""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from engine.conditions import UNBOUNDED, Bounds, Condition, Constant, can_hold, normalize
from engine.expressions import (
    Compare,
    Expression,
    ExpressionError,
    Node,
    Num,
    Type,
    ZeroDivision,
    compile_expression,
    constant_zero_divisions,
)
from engine.matcher import MatcherLimitError, check_condition
from engine.model import (
    Example,
    Exemption,
    Fee,
    FeeKind,
    Input,
    Kpi,
    Label,
    Payout,
    PenaltyCap,
    Period,
    Ruleset,
    Step,
    Tier,
    TierMode,
    TotalLimits,
    ValueType,
    Warning,
)
from engine.money import DecimalTextError, Rounding, minor_units, parse_decimal
from engine.problems import Problem, Severity
from engine.source import SourceDocument, child_path

DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
RULESET_ID = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MARKET = re.compile(r"[A-Z]{2}")
RESERVED = {
    "market", "period_days", "active_days", "and", "or", "not", "min", "max", "abs", "true", "false",
    "market_multiplier", "penalty_cap", "total_floor", "total_cap",
}  # fmt: skip
ADJUSTMENT_LINES = ("market_multiplier", "penalty_cap", "total_floor", "total_cap")
MAX_ITEMS = 200  # entries in any one section
MAX_TEXT = 2000

T = TypeVar("T")


class _Checker:
    def __init__(self, document: SourceDocument) -> None:
        self.document = document
        self.problems: list[Problem] = []

    def report(self, code: str, path: str, message: str, severity: Severity = Severity.ERROR) -> None:
        # a problem with a name that is a mapping key points at the key, not at its value
        about_key = code == "key.unknown" or (
            code in ("name.invalid", "name.duplicate", "name.reserved", "market.invalid") and "." in path and not path.endswith(".id")
        )
        line, column = self.document.key_position(path) if about_key else self.document.position(path)
        self.problems.append(Problem(code, path, message, severity, line, column))

    def warn(self, code: str, path: str, message: str) -> None:
        self.report(code, path, message, Severity.WARNING)

    def mapping(self, value: Any, path: str, required: Iterable[str] = (), optional: Iterable[str] = ()) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.report("type.mapping", path, f"expected a mapping of keys, got {_kind(value)}")
            return None
        allowed = set(required) | set(optional)
        for key in value:
            if key not in allowed:
                self.report("key.unknown", child_path(path, key), f"unknown key {key!r}; expected one of {', '.join(sorted(allowed))}")
        for key in required:
            if key not in value:
                self.report("key.missing", path, f"{key!r} is required")
        return value

    def items(self, value: Any, path: str, as_list: bool) -> list[tuple[str, Any]]:
        """Entries of a named section (a mapping) or a list section, each with its path."""
        if value is None:
            return []
        if as_list:
            if not isinstance(value, list):
                self.report("type.list", path, f"expected a list, got {_kind(value)}")
                return []
            entries = [(child_path(path, i), item) for i, item in enumerate(value)]
        else:
            if not isinstance(value, dict):
                self.report("type.mapping", path, f"expected a mapping of names, got {_kind(value)}")
                return []
            entries = [(child_path(path, key), item) for key, item in value.items()]
        if len(entries) > MAX_ITEMS:
            self.report("limit.items", path, f"{len(entries)} entries; at most {MAX_ITEMS}")
            return entries[:MAX_ITEMS]
        return entries

    def text(self, value: Any, path: str, pattern: re.Pattern[str] | None = None, what: str = "text") -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.report("type.text", path, f"expected {what}, got {_kind(value)}")
            return None
        if len(value) > MAX_TEXT:
            self.report("limit.text", path, f"{len(value)} characters; at most {MAX_TEXT}")
            return None
        if pattern and not pattern.fullmatch(value):
            self.report("name.invalid", path, f"{value!r} is not a valid {what}")
            return None
        return value

    def decimal(self, value: Any, path: str, percent: bool = False, minimum: Decimal | None = None) -> Decimal | None:
        try:
            number = parse_decimal(value, allow_percent=percent)
        except DecimalTextError as exc:
            self.report("number.invalid", path, str(exc))
            return None
        if minimum is not None and number < minimum:
            self.report("number.range", path, f"{value} is below {minimum}")
            return None
        return number

    def choice(self, spec: Mapping[str, Any], key: str, path: str, enum: Callable[[str], T], default: T) -> T:
        """The enum value of `spec[key]`; `default` when the key is absent (null is an error)."""
        if key not in spec:
            return default
        value = spec[key]
        try:
            return enum(value)
        except (ValueError, TypeError):
            options = ", ".join(m.value for m in enum)  # type: ignore[attr-defined]
            self.report("value.invalid", path, f"{value!r} is not one of {options}")
            return default

    def label(self, value: Any, path: str, fallback: str) -> Label:
        if value is None:
            return Label(fallback, fallback)
        if isinstance(value, str):
            return Label(value, value)
        entries = self.mapping(value, path, required=("en",), optional=("zh",))
        if entries is None or not isinstance(entries.get("en"), str):
            return Label(fallback, fallback)
        en = entries["en"]
        zh = entries.get("zh")
        return Label(en, zh if isinstance(zh, str) else en)


def _text_or(value: Any, default: str) -> str:
    return value if isinstance(value, str) else default


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{value!r}"


class RulesetBuilder:
    """Reads every section, then cross-checks names, scopes and the matcher's limits."""

    def __init__(self, document: SourceDocument) -> None:
        self.doc = document
        self.check = _Checker(document)
        self.types: dict[str, Type] = {"market": Type.STRING, "period_days": Type.NUMBER, "active_days": Type.NUMBER}
        self.kinds: dict[str, tuple[str, int]] = {}  # name -> (section, index)
        self.used: set[str] = set()
        self.integral: set[str] = {"period_days", "active_days", "market"}
        self.bounds: dict[str, Bounds] = {
            "period_days": (Decimal(28), True, Decimal(92), True),
            "active_days": (Decimal(0), True, Decimal(92), True),
        }
        self.markets: list[str] = []

    # ------------------------------------------------------------ entry

    def build(self) -> tuple[Ruleset | None, list[Problem]]:
        c = self.check
        top = c.mapping(
            self.doc.data,
            "",
            required=("ruleset", "effective_from", "currency", "metrics", "fees", "markets"),
            optional=("title", "period", "rounding", "params", "exemptions", "kpis", "multiply", "caps", "warnings", "examples"),
        )
        if top is None:
            return None, c.problems
        ruleset_id = c.text(top.get("ruleset"), "ruleset", RULESET_ID, "ruleset id ([a-z][a-z0-9_-]*)") or ""
        title = _text_or(top.get("title"), ruleset_id)
        effective_from = self._date(top.get("effective_from"), "effective_from", "effective_from" in top)
        currency, places = self._currency(top.get("currency"), "currency" in top)
        period = c.choice(top, "period", "period", Period, Period.MONTH)
        rounding = c.choice(top, "rounding", "rounding", Rounding, Rounding.HALF_UP)

        self._declare_names(top)
        self.markets = self._market_codes(top.get("markets"))
        metrics = self._inputs(top.get("metrics"), "metrics", target_allowed=False)
        params = self._inputs(top.get("params"), "params", target_allowed=True)
        exemptions = self._exemptions(top.get("exemptions"))
        kpis = self._kpis(top.get("kpis"))
        fees = self._fees(top.get("fees"), exemptions)
        markets = self._markets(top.get("markets"))
        multiply = self._multiply(top.get("multiply"), fees)
        penalty_cap, total_limits = self._caps(top.get("caps"), places)
        warnings = self._warnings(top.get("warnings"))
        examples = self._examples(top.get("examples"))
        if not any(p.severity is Severity.ERROR for p in c.problems):  # until errors are fixed, "unused" is noise
            self._unused(metrics, params, kpis)

        if any(p.severity is Severity.ERROR for p in c.problems):
            return None, c.problems
        assert effective_from is not None
        ruleset = Ruleset(
            id=ruleset_id,
            title=title,
            effective_from=effective_from,
            currency=currency,
            minor_units=places,
            period=period,
            rounding=rounding,
            metrics=tuple(metrics),
            params=tuple(params),
            exemptions=tuple(exemptions),
            kpis=tuple(kpis),
            fees=tuple(fees),
            markets=markets,
            multiply=tuple(multiply),
            penalty_cap=penalty_cap,
            total_limits=total_limits,
            warnings=tuple(warnings),
            examples=tuple(examples),
            name_types=dict(self.types),
            integral=frozenset(self.integral),
        )
        return ruleset, c.problems

    # ------------------------------------------------------------ names and scopes

    def _declare_names(self, top: Mapping[str, Any]) -> None:
        sections: list[tuple[str, Any, bool, str | None]] = [
            ("metrics", top.get("metrics"), False, None),
            ("params", top.get("params"), False, None),
            ("exemptions", top.get("exemptions"), False, None),
            ("kpis", top.get("kpis"), False, None),
            ("fees", top.get("fees"), True, "id"),
            ("warnings", top.get("warnings"), True, "id"),
        ]
        for section, value, as_list, id_key in sections:
            if as_list:
                entries = list(enumerate(value)) if isinstance(value, list) else []
                names = [(f"{section}[{i}].{id_key}", item.get(id_key)) for i, item in entries if isinstance(item, dict)]
            else:
                names = [(f"{section}.{key}", key) for key in value] if isinstance(value, dict) else []
            for index, (path, name) in enumerate(names):
                if not isinstance(name, str) or not NAME.fullmatch(name):
                    self.check.report("name.invalid", path, f"{name!r} is not a name ([a-z][a-z0-9_]*, at most 64)")
                    continue
                if name in RESERVED:
                    self.check.report("name.reserved", path, f"{name!r} is reserved by the engine")
                    continue
                if name in self.kinds:
                    other = self.kinds[name][0]
                    self.check.report("name.duplicate", path, f"{name!r} is already defined in {other}")
                    continue
                self.kinds[name] = (section, index)
                self.types[name] = Type.BOOL if section == "exemptions" else Type.NUMBER

    def _expression(self, value: Any, path: str, scope: str, want: Type, position: int = 0) -> Expression | None:
        """Compile an expression in a scope: `exemption`, `kpi`, `condition`, `amount`, `cap`."""
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            self.check.report("expr.not_text", path, f"expected an expression, got {_kind(value)}")
            return None
        self.used.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(value)))  # no "unused" noise on errors
        try:
            expression = compile_expression(str(value), self.types, want)
        except ExpressionError as exc:
            where = f" (at character {exc.offset + 1})" if exc.offset else ""
            self.check.report(exc.code, path, f"{exc}{where} in {value!r}")
            return None
        ok = True
        for offset in constant_zero_divisions(expression.tree):
            self.check.report("expr.division_by_zero", path, f"a constant part divides by zero (at character {offset + 1}) in {value!r}")
            ok = False
        for name in expression.names:
            self.used.add(name)
            problem = self._scope_problem(name, scope, position)
            if problem:
                self.check.report(problem[0], path, problem[1])
                ok = False
        return expression if ok else None

    def _scope_problem(self, name: str, scope: str, position: int) -> tuple[str, str] | None:
        if name in ("market", "period_days", "active_days"):
            return None
        section, index = self.kinds[name]
        if section in ("metrics", "params"):
            return None
        if section == "warnings":
            return ("expr.warning_reference", f"{name!r} is a warning; expressions cannot use warnings")
        if scope == "exemption":
            return ("expr.out_of_scope", f"{name!r} is not available here: exemption conditions use metrics and params only")
        if section == "exemptions":
            return None
        if section == "kpis":
            if scope == "kpi" and index >= position:
                return self._kpi_order_problem(name, position)
            return None
        # a fee line
        if scope in ("kpi", "condition"):
            return ("expr.fee_in_condition", f"{name!r} is a fee line; KPIs and conditions are decided before any fee is computed")
        if scope == "amount" and index >= position:
            return ("fee.later_reference", f"{name!r} is not an earlier fee; a fee may refer only to fees before it")
        return None

    def _kpi_order_problem(self, name: str, position: int) -> tuple[str, str]:
        return ("kpi.later_reference", f"{name!r} is not an earlier KPI; KPIs are computed in order")

    # ------------------------------------------------------------ sections

    def _date(self, value: Any, path: str, present: bool = True) -> datetime.date | None:
        if not present:
            return None  # reported as key.missing
        if isinstance(value, str) and DATE.fullmatch(value):
            try:
                return datetime.date.fromisoformat(value)
            except ValueError:
                pass
        self.check.report("date.invalid", path, f"expected a date YYYY-MM-DD, got {_kind(value)}")
        return None

    def _currency(self, value: Any, present: bool) -> tuple[str, int]:
        if not present:
            return "", 2  # reported as key.missing
        if isinstance(value, str):
            try:
                return value, minor_units(value)
            except ValueError as exc:
                self.check.report("currency.unknown", "currency", str(exc))
                return value, 2
        self.check.report("currency.unknown", "currency", f"expected an ISO 4217 code, got {_kind(value)}")
        return "", 2

    def _market_codes(self, value: Any) -> list[str]:
        return [k for k in value if isinstance(k, str) and MARKET.fullmatch(k)] if isinstance(value, dict) else []

    def _inputs(self, value: Any, section: str, target_allowed: bool) -> list[Input]:
        result = []
        optional = ("definition", "default", "target") if target_allowed else ("definition", "default")
        for path, item in self.check.items(value, section, as_list=False):
            name = path.split(".", 1)[1]
            spec = self.check.mapping(item, path, required=("type",), optional=optional)
            if spec is None or self.kinds.get(name, ("", 0))[0] != section:
                continue
            value_type = self.check.choice(spec, "type", child_path(path, "type"), ValueType, ValueType.NUMBER)
            default = None
            if "default" in spec:
                default = self._input_value(spec["default"], child_path(path, "default"), value_type)
            target = spec.get("target", False)
            if not isinstance(target, bool):
                self.check.report("type.boolean", child_path(path, "target"), "expected true or false")
                target = False
            if target and value_type is ValueType.COUNT:
                self.check.report("param.target_count", child_path(path, "target"), "a target must be money, a number or a ratio")
            if value_type is ValueType.COUNT:
                self.integral.add(name)
                self.bounds[name] = (Decimal(0), True, None, False)
            definition = _text_or(spec.get("definition"), "")
            result.append(Input(name, value_type, definition, default, target))
        return result

    def _input_value(self, value: Any, path: str, value_type: ValueType) -> Decimal | None:
        number = self.check.decimal(value, path, percent=value_type is ValueType.RATIO)
        if number is not None and value_type is ValueType.COUNT and (number < 0 or number != number.to_integral_value()):
            self.check.report("number.count", path, f"{value} is not a non-negative whole number")
            return None
        return number

    def _condition(self, tree: Node, path: str, what: str, never_code: str = "rule.never_fires") -> Condition:
        """Normal form of a condition, checked against the matcher's limits and for dead rules."""
        try:
            condition = normalize(tree, self.types)
        except ZeroDivision as exc:
            self.check.report("expr.division_by_zero", path, f"{exc} (a constant part divides by zero)")
            return Constant(False)
        try:
            if not isinstance(condition, Constant):
                check_condition(condition, self.types, self.integral, self.markets)
        except MatcherLimitError as exc:
            self.check.report(exc.code, path, str(exc))
        if isinstance(condition, Constant) and condition.value:
            if what != "step":
                self.check.warn("rule.always_fires", path, f"this {what} always holds")
        elif not can_hold(condition, self.bounds):
            self.check.warn(never_code, path, f"this {what} can never hold")
        return condition

    def _exemptions(self, value: Any) -> list[Exemption]:
        result = []
        for path, item in self.check.items(value, "exemptions", as_list=False):
            name = path.split(".", 1)[1]
            spec = self.check.mapping(item, path, required=("when",), optional=("prorate_targets_by", "label", "definition"))
            if spec is None or self.kinds.get(name, ("", 0))[0] != "exemptions":
                continue
            when = self._expression(spec.get("when"), child_path(path, "when"), "exemption", Type.BOOL)
            prorate = None
            if "prorate_targets_by" in spec:
                prorate = self._expression(spec["prorate_targets_by"], child_path(path, "prorate_targets_by"), "exemption", Type.NUMBER)
            label = self.check.label(spec.get("label"), child_path(path, "label"), name)
            definition = _text_or(spec.get("definition"), "")
            if when is not None:
                condition = self._condition(when.tree, child_path(path, "when"), "exemption")
                result.append(Exemption(name, when, condition, prorate, label, definition))
        return result

    def _kpis(self, value: Any) -> list[Kpi]:
        result = []
        entries = self.check.items(value, "kpis", as_list=False)
        references: dict[str, list[str]] = {}
        for position, (path, item) in enumerate(entries):
            name = path.split(".", 1)[1]
            spec = self.check.mapping(item, path, required=("formula",), optional=("type", "on_zero_division", "definition"))
            if spec is None or self.kinds.get(name, ("", 0))[0] != "kpis":
                continue
            formula = self._expression(spec.get("formula"), child_path(path, "formula"), "kpi", Type.NUMBER, position)
            if formula is None:
                raw = spec.get("formula")
                references[name] = re.findall(r"[a-z][a-z0-9_]*", raw) if isinstance(raw, str) else []
                continue
            references[name] = formula.names
            kpi_type = self.check.choice(spec, "type", child_path(path, "type"), ValueType, ValueType.NUMBER)
            on_zero = None
            if "on_zero_division" in spec:
                on_zero = self.check.decimal(spec["on_zero_division"], child_path(path, "on_zero_division"), percent=True)
            definition = _text_or(spec.get("definition"), "")
            result.append(Kpi(name, formula, on_zero, kpi_type, definition))
        self._kpi_cycles(references)
        return result

    def _kpi_cycles(self, references: Mapping[str, list[str]]) -> None:
        for start in references:
            seen: list[str] = [start]
            frontier = [(start, [start])]
            while frontier:
                current, trail = frontier.pop()
                for name in references.get(current, []):
                    if name == start:
                        chain = " → ".join([*trail, start])
                        self.check.report("kpi.cycle", f"kpis.{start}.formula", f"KPIs refer to each other in a cycle: {chain}")
                        frontier = []
                        break
                    if name in references and name not in seen:
                        seen.append(name)
                        frontier.append((name, [*trail, name]))

    def _fees(self, value: Any, exemptions: list[Exemption]) -> list[Fee]:
        result = []
        exemption_names = {e.name for e in exemptions} | {n for n, (s, _) in self.kinds.items() if s == "exemptions"}
        for position, (path, item) in enumerate(self.check.items(value, "fees", as_list=True)):
            if not isinstance(item, dict):
                self.check.report("type.mapping", path, f"expected a fee, got {_kind(item)}")
                continue
            kind = self.check.choice(item, "kind", child_path(path, "kind"), FeeKind, None)
            fee_id = item.get("id")
            if kind is None or not isinstance(fee_id, str) or self.kinds.get(fee_id) != ("fees", position):
                if "kind" not in item:
                    self.check.report("key.missing", path, "'kind' is required")
                if "id" not in item:
                    self.check.report("key.missing", path, "'id' is required")
                continue
            fee = self._fee(kind, fee_id, item, path, position, exemption_names)
            if fee is not None:
                result.append(fee)
        return result

    def _fee(self, kind: FeeKind, fee_id: str, item: dict[str, Any], path: str, position: int, exemption_names: set[str]) -> Fee | None:
        c = self.check
        common = ("id", "kind", "label")
        label = c.label(item.get("label"), child_path(path, "label"), fee_id)

        def amount_expr(key: str) -> Expression | None:
            return self._expression(item.get(key), child_path(path, key), "amount", Type.NUMBER, position)

        if kind is FeeKind.FIXED:
            c.mapping(item, path, required=(*common[:2], "amount"), optional=("label", "prorate"))
            prorate = item.get("prorate")
            if prorate not in (None, "active_days"):
                c.report("value.invalid", child_path(path, "prorate"), "prorate may only be 'active_days'")
            amount = amount_expr("amount")
            return Fee(fee_id, kind, label, amount=amount, prorate=prorate == "active_days") if amount else None
        if kind is FeeKind.PERCENTAGE:
            c.mapping(item, path, required=(*common[:2], "basis", "rate"), optional=("label",))
            basis = amount_expr("basis")
            rate = c.decimal(item.get("rate"), child_path(path, "rate"), percent=True)
            return Fee(fee_id, kind, label, basis=basis, rate=rate) if basis and rate is not None else None
        if kind is FeeKind.TIERED:
            c.mapping(item, path, required=(*common[:2], "basis", "tiers"), optional=("label", "mode"))
            basis = amount_expr("basis")
            mode = c.choice(item, "mode", child_path(path, "mode"), TierMode, TierMode.GRADUATED)
            tiers = self._tiers(item.get("tiers"), child_path(path, "tiers"))
            return Fee(fee_id, kind, label, basis=basis, mode=mode, tiers=tiers) if basis and tiers else None
        payout_keys = ("amount", "rate", "of")
        if kind is FeeKind.BONUS:
            if "steps_on" in item or "steps" in item:
                c.mapping(item, path, required=(*common[:2], "steps_on", "steps"), optional=("label",))
                steps_on = self._expression(item.get("steps_on"), child_path(path, "steps_on"), "condition", Type.NUMBER)
                if steps_on is None:
                    return None
                steps = self._steps(item.get("steps"), child_path(path, "steps"), fee_id, steps_on, position)
                return Fee(fee_id, kind, label, steps_on=steps_on, steps=steps) if steps else None
            c.mapping(item, path, required=(*common[:2], "when"), optional=("label", *payout_keys))
        else:
            c.mapping(item, path, required=(*common[:2], "when"), optional=("label", "exempt_by", *payout_keys))
        when = self._expression(item.get("when"), child_path(path, "when"), "condition", Type.BOOL)
        payout = self._payout(item, path, position)
        exempt_by = self._exempt_by(item.get("exempt_by"), child_path(path, "exempt_by"), exemption_names)
        if when is None or payout is None:
            return None
        condition = self._condition(when.tree, child_path(path, "when"), kind.value)
        return Fee(fee_id, kind, label, when=when, condition=condition, payout=payout, exempt_by=exempt_by)

    def _payout(self, spec: Mapping[str, Any], path: str, position: int) -> Payout | None:
        c = self.check
        has_amount, has_rate = "amount" in spec, "rate" in spec
        if has_amount == has_rate or (has_rate != ("of" in spec)):
            c.report("payout.shape", path, "give either 'amount', or 'rate' with 'of'")
            return None
        if has_amount:
            amount = self._expression(spec["amount"], child_path(path, "amount"), "amount", Type.NUMBER, position)
            return Payout(amount=amount) if amount else None
        rate = c.decimal(spec["rate"], child_path(path, "rate"), percent=True)
        of = self._expression(spec["of"], child_path(path, "of"), "amount", Type.NUMBER, position)
        return Payout(rate=rate, of=of) if rate is not None and of else None

    def _exempt_by(self, value: Any, path: str, exemption_names: set[str]) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.check.report("type.list", path, f"expected a list of exemptions, got {_kind(value)}")
            return ()
        names = []
        for i, name in enumerate(value):
            if not isinstance(name, str) or name not in exemption_names:
                self.check.report("penalty.unknown_exemption", child_path(path, i), f"{name!r} is not a defined exemption")
            else:
                names.append(name)
                self.used.add(name)
        return tuple(names)

    def _tiers(self, value: Any, path: str) -> tuple[Tier, ...]:
        c = self.check
        entries = c.items(value, path, as_list=True)
        if not entries:
            c.report("tiers.empty", path, "a tiered fee needs at least one tier")
            return ()
        tiers: list[Tier] = []
        previous = Decimal(0)
        ok = True
        for i, (tier_path, item) in enumerate(entries):
            spec = c.mapping(item, tier_path, required=("rate",), optional=("up_to", "from"))
            if spec is None:
                ok = False
                continue
            rate = c.decimal(spec.get("rate"), child_path(tier_path, "rate"), percent=True)
            lower = previous
            if "from" in spec:
                given = c.decimal(spec["from"], child_path(tier_path, "from"))
                if given is not None and given > previous:
                    c.warn(
                        "tiers.gap",
                        child_path(tier_path, "from"),
                        f"tiers leave a gap [{previous}, {given}) that earns the rate of the tier below",
                    )
                elif given is not None and given < previous:
                    c.warn(
                        "tiers.overlap",
                        child_path(tier_path, "from"),
                        f"starts at {given}, inside the tier below (which ends at {previous}); the tier below wins",
                    )
            upper = None
            last = i == len(entries) - 1
            if "up_to" in spec:
                upper = c.decimal(spec["up_to"], child_path(tier_path, "up_to"))
                if last:
                    c.report("tiers.last_closed", child_path(tier_path, "up_to"), "the last tier must be open (no up_to)")
                    ok = False
                if upper is not None and upper <= previous:
                    c.report(
                        "tiers.not_increasing", child_path(tier_path, "up_to"), f"up_to {upper} is not above the tier's start {previous}"
                    )
                    ok = False
            elif not last:
                c.report("tiers.open_not_last", tier_path, "only the last tier may be open (every other tier needs up_to)")
                ok = False
            if rate is None or (upper is None and not last):
                ok = False
                continue
            tiers.append(Tier(lower, upper, rate))
            previous = upper if upper is not None else previous
        return tuple(tiers) if ok else ()

    def _steps(self, value: Any, path: str, fee_id: str, steps_on: Expression, position: int) -> tuple[Step, ...]:
        c = self.check
        steps: list[Step] = []
        entries = c.items(value, path, as_list=True)
        if not entries:
            c.report("steps.empty", path, "a stepped bonus needs at least one step")
        previous: Decimal | None = None
        for i, (step_path, item) in enumerate(entries):
            spec = c.mapping(item, step_path, required=("from",), optional=("amount", "rate", "of"))
            if spec is None:
                continue
            threshold = c.decimal(spec.get("from"), child_path(step_path, "from"), percent=True)
            payout = self._payout(spec, step_path, position)
            if threshold is None or payout is None:
                continue
            if previous is not None and threshold <= previous:
                if threshold == previous:
                    c.warn(
                        "steps.unreachable",
                        child_path(step_path, "from"),
                        f"from {threshold} equals the step before; this step is never the highest reached",
                    )
                else:
                    c.report(
                        "steps.not_increasing",
                        child_path(step_path, "from"),
                        f"from {threshold} is below the step before ({previous}); list steps in increasing order",
                    )
            previous = threshold
            tree = Compare(">=", steps_on.tree, Num(threshold, str(threshold)))
            condition = self._condition(tree, child_path(step_path, "from"), "step", "steps.unreachable")
            steps.append(Step(f"{fee_id}.steps[{i}]", threshold, tree, condition, payout))
        for lower, upper in itertools.pairwise(steps):
            # `lower` is never the highest step reached if `upper` is always reached
            below_upper = Compare("<", steps_on.tree, Num(upper.threshold, str(upper.threshold)))
            try:
                upper_always = not can_hold(normalize(below_upper, self.types), self.bounds)
            except ZeroDivision:
                upper_always = False
            if upper_always and lower.threshold < upper.threshold:
                index = steps.index(lower)
                c.warn(
                    "steps.unreachable",
                    f"{path}[{index}].from",
                    f"the next step (from {upper.threshold}) is always reached, so this one never applies",
                )
        return tuple(steps)

    def _markets(self, value: Any) -> dict[str, Decimal]:
        markets: dict[str, Decimal] = {}
        for path, item in self.check.items(value, "markets", as_list=False):
            code = path.split(".", 1)[1]
            if not MARKET.fullmatch(code):
                self.check.report("market.invalid", path, f"{code!r} is not a market code (two capital letters, e.g. US, JP, EU, BR)")
                continue
            spec = self.check.mapping(item, path, required=("multiplier",))
            if spec is None:
                continue
            multiplier = self.check.decimal(spec.get("multiplier"), child_path(path, "multiplier"), minimum=Decimal(0))
            if multiplier is not None:
                markets[code] = multiplier
        if isinstance(value, dict) and not value:
            self.check.report("markets.empty", "markets", "list at least one market")
        return markets

    def _multiply(self, value: Any, fees: list[Fee]) -> list[str]:
        ids = [f.id for f in fees]
        result = []
        for path, item in self.check.items(value, "multiply", as_list=True):
            if not isinstance(item, str) or item not in self.kinds or self.kinds[item][0] != "fees":
                self.check.report("multiply.unknown_fee", path, f"{item!r} is not a fee id")
            elif item in ids:
                result.append(item)
                self.used.add(item)
        return result

    def _caps(self, value: Any, places: int) -> tuple[PenaltyCap | None, TotalLimits | None]:
        c = self.check
        spec = c.mapping(value, "caps", optional=("penalties", "total")) if value is not None else None
        if not spec:
            return None, None
        penalty_cap = total = None
        if "penalties" in spec:
            path = "caps.penalties"
            cap = c.mapping(spec["penalties"], path, optional=("max_rate", "of", "max"))
            if cap is not None:
                if ("max" in cap) == ("max_rate" in cap) or (("max_rate" in cap) != ("of" in cap)):
                    c.report("cap.shape", path, "give either 'max', or 'max_rate' with 'of'")
                else:
                    max_rate = (
                        c.decimal(cap["max_rate"], child_path(path, "max_rate"), percent=True, minimum=Decimal(0))
                        if "max_rate" in cap
                        else None
                    )
                    of = self._expression(cap["of"], child_path(path, "of"), "cap", Type.NUMBER) if "of" in cap else None
                    maximum = self._money(cap.get("max"), child_path(path, "max"), places) if "max" in cap else None
                    penalty_cap = PenaltyCap(max_rate, of, maximum)
        if "total" in spec:
            path = "caps.total"
            limits = c.mapping(spec["total"], path, optional=("min", "max"))
            if limits is not None:
                low = self._money(limits.get("min"), child_path(path, "min"), places) if "min" in limits else None
                high = self._money(limits.get("max"), child_path(path, "max"), places) if "max" in limits else None
                if low is not None and high is not None and low > high:
                    c.report("cap.inverted", path, f"min {low} is above max {high}")
                total = TotalLimits(low, high)
        return penalty_cap, total

    def _money(self, value: Any, path: str, places: int) -> Decimal | None:
        amount = self.check.decimal(value, path)
        if amount is not None and amount != amount.quantize(Decimal(1).scaleb(-places)):
            self.check.report("money.minor_units", path, f"{value} is not a whole number of the currency's minor units ({places} decimals)")
            return None
        return amount

    def _warnings(self, value: Any) -> list[Warning]:
        result = []
        for path, item in self.check.items(value, "warnings", as_list=True):
            spec = self.check.mapping(item, path, required=("id", "when", "message"))
            if spec is None or not isinstance(spec.get("id"), str) or self.kinds.get(spec["id"], ("", 0))[0] != "warnings":
                continue
            when = self._expression(spec.get("when"), child_path(path, "when"), "condition", Type.BOOL)
            message = self.check.label(spec.get("message"), child_path(path, "message"), spec["id"])
            if when is not None:
                condition = self._condition(when.tree, child_path(path, "when"), "warning")
                result.append(Warning(spec["id"], when, condition, message))
        return result

    def _examples(self, value: Any) -> list[Example]:
        result = []
        for path, item in self.check.items(value, "examples", as_list=True):
            spec = self.check.mapping(
                item, path, required=("name", "market", "metrics", "expect"), optional=("params", "period_start", "active_days", "fx_rates")
            )
            if spec is None:
                continue
            expect = self.check.mapping(
                spec.get("expect"), child_path(path, "expect"), required=("total",), optional=("lines", "waived", "exemptions", "warnings")
            )
            if expect is None:
                continue
            request = {k: v for k, v in spec.items() if k not in ("name", "expect")}
            name = spec["name"] if isinstance(spec.get("name"), str) else path
            result.append(Example(name, path, request, expect))
        return result

    def _unused(self, metrics: list[Input], params: list[Input], kpis: list[Kpi]) -> None:
        for section, entries in (("metrics", metrics), ("params", params), ("kpis", kpis)):
            for entry in entries:
                if entry.name not in self.used:
                    self.check.warn(f"{section[:-1]}.unused", f"{section}.{entry.name}", f"{entry.name!r} is not used by any rule")


def build_ruleset(document: SourceDocument) -> tuple[Ruleset | None, list[Problem]]:
    return RulesetBuilder(document).build()


__all__ = ["ADJUSTMENT_LINES", "UNBOUNDED", "build_ruleset"]
