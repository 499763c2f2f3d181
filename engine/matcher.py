"""Deciding conditions with durable_rules — the only module that imports it.

Follows ../shared/DURABLE_RULES.md: the low-level `durable_rules_engine` module; one wide
fact of scaled integers per evaluation, asserted into a primed, pooled session, every
action drained, the fact retracted; one lock per compiled matcher. Conditions are split
into partitions small enough that no limit of the C core can be reached, and every
literal and fact value is an integer within ±2^53 chosen so that the C core's integer
comparison decides exactly what the decimal comparison decides:

    v >  c  ⇔  ceil(v·S)  >  c·S        v >= c  ⇔  floor(v·S) >= c·S
    v <  c  ⇔  floor(v·S) <  c·S        v <= c  ⇔  ceil(v·S)  <= c·S

with S = 10^(decimal places of c), so that c·S is an integer. Values beyond ±2^53 are
clamped, which keeps every comparison with a literal inside that range unchanged.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import durable_rules_engine as durable
import orjson

from engine.conditions import All, Any, Atom, Condition, Constant
from engine.expressions import Env, Name, Type, ZeroDivision, compile_node, source_text
from engine.money import ARITHMETIC
from engine.problems import EngineError

VALUE_LIMIT = 2**53
MAX_TESTS_PER_RULE = 32  # tests after the C core's expansion into alternatives
MAX_GROUPS_PER_RULE = 15  # $and/$or groups in one pattern; 16 or more: error 113 (measured)
MAX_TESTS_PER_PARTITION = 60  # below 64 tests true at once among siblings, 256 sharers, 512 conditions
MAX_FIELDS_PER_FACT = 200  # below ~252 properties per fact
_SID = "s0"
_FACT_ID = "f"
_SENTINEL = "zz_sentinel"
_names = itertools.count(1)

Json = dict[str, object]


class MatcherLimitError(ValueError):
    """A condition the C core cannot take safely; `code` is stable."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class MatcherFailure(EngineError):
    """The C core reported an error during an evaluation (the matcher rebuilt itself)."""


@dataclass(frozen=True)
class _Field:
    name: str
    probe: str  # probe text
    places: int  # S = 10**places
    rounding: str  # ROUND_FLOOR | ROUND_CEILING | "" for values known to be integers


@dataclass
class _Rule:
    name: str
    test: Json
    fields: list[_Field]
    weight: int


class _Translator:
    """Turns normal-form conditions into durable_rules JSON tests over fact fields."""

    def __init__(self, name_types: Mapping[str, Type], integral: set[str], markets: Sequence[str]) -> None:
        self.name_types = name_types
        self.integral = integral
        self.market_codes = {code: index for index, code in enumerate(sorted(markets))}
        self.fields: dict[tuple[str, int, str], _Field] = {}
        self.probes: dict[str, Callable[[Env], Decimal]] = {}

    def rule(self, name: str, condition: Condition) -> _Rule:
        used: list[_Field] = []
        test = _flattened(self._test(condition, used))
        groups = _groups(test)
        if groups > MAX_GROUPS_PER_RULE:
            raise MatcherLimitError(
                "rule.too_complex", f"needs {groups} nested and/or groups; the matcher takes at most {MAX_GROUPS_PER_RULE}"
            )
        terms, weight = _expanded_size(test)
        if weight > MAX_TESTS_PER_RULE:
            raise MatcherLimitError(
                "rule.too_complex",
                f"expands to {terms} alternatives with {weight} tests; at most {MAX_TESTS_PER_RULE}",
            )
        return _Rule(name, test, used, weight)

    def _test(self, condition: Condition, used: list[_Field]) -> Json:
        if isinstance(condition, All):
            return {"$and": [self._test(p, used) for p in condition.parts]}
        if isinstance(condition, Any):
            return {"$or": [self._test(p, used) for p in condition.parts]}
        if isinstance(condition, Constant):
            raise AssertionError("constant conditions never reach the matcher")
        return self._atom(condition, used)

    def _atom(self, atom: Atom, used: list[_Field]) -> Json:
        text = atom.probe_text
        if isinstance(atom.constant, str):  # market code
            literal = self.market_codes.get(atom.constant, -1)
            self._probe(text, lambda env: Decimal(self.market_codes[str(env["market"])]))
            places, modes = 0, [""]
        else:
            places = max(0, -int(atom.constant.as_tuple().exponent))
            scaled = atom.constant.scaleb(places, ARITHMETIC)
            literal = int(scaled)
            if abs(literal) >= VALUE_LIMIT:
                raise MatcherLimitError("rule.literal_out_of_range", f"{atom.constant} needs more than 53 bits at {places} decimal places")
            self._numeric_probe(atom)
            if text in self.integral and places == 0:
                modes = [""]
            else:
                modes = {">": [ROUND_CEILING], "<=": [ROUND_CEILING], ">=": [ROUND_FLOOR], "<": [ROUND_FLOOR]}.get(
                    atom.op, [ROUND_FLOOR, ROUND_CEILING]
                )
        fields = [self._field(text, places, mode) for mode in modes]
        used.extend(fields)
        op = {">": "$gt", ">=": "$gte", "<": "$lt", "<=": "$lte"}.get(atom.op)
        if op:
            return {op: {fields[0].name: literal}}
        if atom.op == "==":
            tests: list[Json] = [{f.name: literal} for f in fields]
            return tests[0] if len(tests) == 1 else {"$and": tests}
        tests = [{"$neq": {f.name: literal}} for f in fields]
        return tests[0] if len(tests) == 1 else {"$or": tests}

    def _numeric_probe(self, atom: Atom) -> None:
        probe = atom.probe
        if isinstance(probe, Name) and self.name_types.get(probe.name) is Type.BOOL:
            key = probe.name
            self._probe(source_text(probe), lambda env: Decimal(1) if env[key] else Decimal(0))
        else:
            evaluate = compile_node(probe)
            self._probe(source_text(probe), evaluate)  # type: ignore[arg-type]

    def _probe(self, text: str, evaluate: Callable[[Env], Decimal]) -> None:
        self.probes.setdefault(text, evaluate)

    def _field(self, probe: str, places: int, rounding: str) -> _Field:
        key = (probe, places, rounding)
        if key not in self.fields:
            self.fields[key] = _Field(f"v{len(self.fields)}", probe, places, rounding)
        return self.fields[key]


def _flattened(test: Json) -> Json:
    """Merge an $and inside an $and (an $or inside an $or): same meaning, fewer groups."""
    for key in ("$and", "$or"):
        if key in test:
            parts: list[Json] = []
            for part in test[key]:  # type: ignore[attr-defined]
                part = _flattened(part)
                parts.extend(part.get(key, [part]))  # type: ignore[arg-type]
            return {key: parts}
    return test


def _groups(test: Json) -> int:
    for key in ("$and", "$or"):
        if key in test:
            parts: list[Json] = test[key]  # type: ignore[assignment]
            return 1 + sum(_groups(part) for part in parts)
    return 0


def _expanded_size(test: Json) -> tuple[int, int]:
    """(alternatives, tests) after the C core's expansion of $and/$or into DNF."""
    if "$and" in test:
        terms, tests = 1, 0
        for part in test["$and"]:  # type: ignore[attr-defined]
            t, w = _expanded_size(part)
            tests = tests * t + w * terms
            terms *= t
        return terms, tests
    if "$or" in test:
        sizes = [_expanded_size(p) for p in test["$or"]]  # type: ignore[attr-defined]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    return 1, 1


class _Partition:
    """One durable_rules ruleset with its primed session."""

    def __init__(self, rules: list[_Rule]) -> None:
        self.rules = rules
        self.fields = sorted({f.name: f for r in rules for f in r.fields}.values(), key=lambda f: f.name)
        self.definition = json.dumps(
            {
                **{r.name: {"all": [{"m": r.test}]} for r in rules},
                _SENTINEL: {"all": [{"m": {_SENTINEL: 1}}]},
            },
            sort_keys=True,
        )
        # (field name, index of its probe in Matcher.probe_order, decimal places, to integer) for each field, in order
        self.plan: list[tuple[str, int, int, Callable[[Decimal], int]]] = []
        self.handle = -1
        self.build()

    def build(self) -> None:
        self.handle = durable.create_ruleset(f"kpisettle-{next(_names)}", self.definition)
        fired = self.fire({"sid": _SID, "id": _FACT_ID, _SENTINEL: 1})
        if fired != [_SENTINEL]:
            raise MatcherFailure(f"priming fired {fired}, expected only the sentinel")

    def fire(self, values: Mapping[str, int | str]) -> list[str]:
        """Assert one fact (its `sid` and `id` are the engine's own), drain, retract."""
        fact = orjson.dumps(values).decode()
        result = durable.assert_fact(self.handle, fact)
        fired: list[str] = []
        try:
            if result[0] == 0:
                started = durable.start_action_for_state(self.handle, result[1])
                message = started[1] if started else None
                while message:
                    # the message is {"<rule>": {...}}; rule names are generated (r0, r1, …)
                    fired.append(message[2 : message.index('"', 2)])
                    message = durable.complete_and_start_action(self.handle, result[1])
        finally:
            durable.retract_fact(self.handle, fact)
        return fired

    def close(self) -> None:
        durable.delete_state(self.handle, _SID)
        durable.delete_ruleset(self.handle)


class Matcher:
    """Decides a set of named conditions for one compiled ruleset version."""

    def __init__(
        self,
        rules: Sequence[tuple[str, Condition]],
        name_types: Mapping[str, Type],
        integral: set[str],
        markets: Sequence[str],
    ) -> None:
        translator = _Translator(name_types, integral, markets)
        # Constant conditions (the validator warned about them) need no matching.
        self.always = {name for name, condition in rules if condition == Constant(True)}
        live = [(name, condition) for name, condition in rules if not isinstance(condition, Constant)]
        # Rule names inside the C core are generated; only this table maps them back.
        self.rule_names = {f"r{i}": name for i, (name, _) in enumerate(live)}
        compiled = [translator.rule(f"r{i}", condition) for i, (_, condition) in enumerate(live)]
        self.probes = translator.probes
        self.partitions: list[_Partition] = []
        batch: list[_Rule] = []
        for rule in compiled:
            fields = {f.name for r in [*batch, rule] for f in r.fields}
            if batch and (sum(r.weight for r in batch) + rule.weight > MAX_TESTS_PER_PARTITION or len(fields) > MAX_FIELDS_PER_FACT):
                self.partitions.append(_Partition(batch))
                batch = []
            batch.append(rule)
        if batch:
            self.partitions.append(_Partition(batch))
        # Each probe is evaluated once per decision, in the order the fields first need it.
        order = list(dict.fromkeys(f.probe for partition in self.partitions for f in partition.fields))
        self.probe_order = tuple(self.probes[text] for text in order)
        for partition in self.partitions:  # each field with its probe and its scaling, looked up once
            partition.plan = [(f.name, order.index(f.probe), *_scaling(f)) for f in partition.fields]
        self._lock = threading.Lock()
        self._closed = False

    def decide(self, env: Env) -> set[str]:
        """Names of the rules whose conditions hold for `env`. Raises ZeroDivision.

        Runs twice per settlement, so the scaling (see the module header) is written out here."""
        values = [probe(env) for probe in self.probe_order]
        facts: list[dict[str, int | str]] = []
        for partition in self.partitions:
            fact: dict[str, int | str] = {"sid": _SID, "id": _FACT_ID}
            for name, index, places, to_integer in partition.plan:
                value = values[index]
                number = to_integer(value.scaleb(places, ARITHMETIC) if places else value)
                fact[name] = number if -VALUE_LIMIT < number < VALUE_LIMIT else (VALUE_LIMIT if number > 0 else -VALUE_LIMIT)
            facts.append(fact)
        fired: list[str] = []
        with self._lock:
            if self._closed:
                raise MatcherFailure("this ruleset version was closed; compile it again to use it")
            for partition, fact in zip(self.partitions, facts, strict=True):
                try:
                    fired += partition.fire(fact)
                except Exception as exc:  # the C core's error: start clean
                    partition.build()
                    raise MatcherFailure(f"durable_rules failed: {exc}") from exc
        names = self.rule_names
        decided = {names[name] for name in fired if name in names}
        return decided | self.always if self.always else decided

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                for partition in self.partitions:
                    partition.close()


def _scaling(field: _Field) -> tuple[int, Callable[[Decimal], int]]:
    """The places to scale a field's value by and how to make it an integer: int for a value
    known to be an integer (a literal without decimals: no scaling), else floor or ceiling."""
    if not field.rounding:
        return 0, int
    return field.places, math.floor if field.rounding == ROUND_FLOOR else math.ceil


def check_condition(condition: Condition, name_types: Mapping[str, Type], integral: set[str], markets: Sequence[str]) -> None:
    """Raise MatcherLimitError if the condition cannot be given to the C core safely."""
    _Translator(name_types, integral, markets).rule("r0", condition)


__all__ = ["Matcher", "MatcherFailure", "MatcherLimitError", "ZeroDivision", "check_condition"]
