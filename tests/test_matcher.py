"""The durable_rules matcher on its own: exact decisions on scaled integers, safe shapes."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from engine.conditions import All, Any, Atom, Constant
from engine.expressions import Name, Type, parse
from engine.matcher import MAX_TESTS_PER_PARTITION, VALUE_LIMIT, Matcher, MatcherLimitError, check_condition

TYPES = {"x": Type.NUMBER, "y": Type.NUMBER, "n": Type.NUMBER, "flag": Type.BOOL, "market": Type.STRING}
INTEGRAL = {"n", "market"}
MARKETS = ["US", "JP"]


def atom(probe: str, op: str, constant: str) -> Atom:
    return Atom(parse(probe), op, Decimal(constant))


def decide(rules: list[tuple[str, object]], env: dict[str, object]) -> set[str]:
    matcher = Matcher(rules, TYPES, INTEGRAL, MARKETS)  # type: ignore[arg-type]
    try:
        return matcher.decide(env)  # type: ignore[arg-type]
    finally:
        matcher.close()


@pytest.mark.parametrize(
    ("op", "value", "fires"),
    [
        (">", "0.28", False), (">", "0.2800000000000000000000000001", True), (">", "0.2799999", False),
        (">=", "0.28", True), (">=", "0.2799999999999999999999999999", False),
        ("<", "0.28", False), ("<", "0.2799999999999999999999999999", True),
        ("<=", "0.28", True), ("<=", "0.2800000000000000000000000001", False),
        ("==", "0.28", True), ("==", "0.280000000001", False), ("==", "0.279999999999", False),
        ("!=", "0.28", False), ("!=", "0.280000000001", True), ("!=", "0.279999999999", True),
    ],
)  # fmt: skip
def test_every_operator_decides_like_decimal_at_the_boundary(op: str, value: str, fires: bool) -> None:
    assert decide([("rule", atom("x", op, "0.28"))], {"x": Decimal(value)}) == ({"rule"} if fires else set())


def test_one_third_against_a_rounded_literal() -> None:
    third = Decimal(1) / Decimal(3)
    rules = [("gt", atom("x", ">", "0.333333")), ("lt", atom("x", "<", "0.333334")), ("eq", atom("x", "==", "0.333333"))]
    assert decide(rules, {"x": third}) == {"gt", "lt"}


@pytest.mark.parametrize("value", ["999999999999999999", "-999999999999999999", "9007199254740993", "-9007199254740993"])
def test_values_beyond_2_53_are_clamped_without_changing_the_decision(value: str) -> None:
    big = Decimal(value)
    rules = [("above", atom("x", ">", "100000.5")), ("below", atom("x", "<", "-100000.5")), ("near", atom("x", ">=", "9007199254740991"))]
    expected = {name for name, a in rules if (big > a.constant if a.op == ">" else big < a.constant if a.op == "<" else big >= a.constant)}  # type: ignore[operator]
    assert decide(rules, {"x": big}) == expected


def test_literal_needing_more_than_53_bits_is_refused() -> None:
    with pytest.raises(MatcherLimitError) as caught:
        check_condition(atom("x", ">", "123456789012.12345678"), TYPES, INTEGRAL, MARKETS)
    assert caught.value.code == "rule.literal_out_of_range"
    assert VALUE_LIMIT <= 123456789012_12345678


def test_or_fires_once_and_and_needs_every_part() -> None:
    either = Any((atom("x", ">", "1"), atom("y", ">", "1")))
    both = All((atom("x", ">", "1"), atom("y", ">", "1")))
    assert decide([("either", either), ("both", both)], {"x": Decimal(2), "y": Decimal(2)}) == {"either", "both"}
    assert decide([("either", either), ("both", both)], {"x": Decimal(2), "y": Decimal(0)}) == {"either"}


def test_flags_and_market_codes() -> None:
    rules = [
        ("flagged", Atom(Name("flag", 0), "==", Decimal(1))),
        ("in_jp", Atom(Name("market", 0), "==", "JP")),
        ("not_us", Atom(Name("market", 0), "!=", "US")),
        ("unknown_market", Atom(Name("market", 0), "==", "XX")),
    ]
    assert decide(rules, {"flag": True, "market": "JP"}) == {"flagged", "in_jp", "not_us"}
    assert decide(rules, {"flag": False, "market": "US"}) == set()


def test_constant_conditions_need_no_matching() -> None:
    assert decide([("always", Constant(True)), ("never", Constant(False))], {}) == {"always"}


def test_too_complex_rule_is_refused() -> None:
    wide = All(tuple(Any((atom("x", ">", str(i)), atom("y", ">", str(i)))) for i in range(6)))  # 2^6 alternatives
    with pytest.raises(MatcherLimitError) as caught:
        check_condition(wide, TYPES, INTEGRAL, MARKETS)
    assert caught.value.code == "rule.too_complex"


def test_many_rules_are_split_into_partitions_within_the_limits() -> None:
    rules = [(f"r{i}", atom("x", ">=", str(i))) for i in range(300)]
    matcher = Matcher(rules, TYPES, INTEGRAL, MARKETS)  # type: ignore[arg-type]
    try:
        assert len(matcher.partitions) >= 300 // MAX_TESTS_PER_PARTITION
        for partition in matcher.partitions:
            assert sum(rule.weight for rule in partition.rules) <= MAX_TESTS_PER_PARTITION
        assert matcher.decide({"x": Decimal("149.5")}) == {f"r{i}" for i in range(150)}
        assert matcher.decide({"x": Decimal(-1)}) == set()
    finally:
        matcher.close()


def test_no_rule_can_match_the_engines_own_state_fact() -> None:
    """Every compiled test names a generated field (v0, v1, …) or the sentinel; the state
    fact ({sid, id, $s}) has none of them, so the known infinite loop cannot happen."""
    rules = [("a", atom("x", "!=", "5")), ("b", Any((atom("y", "<", "0"), atom("x", "==", "1"))))]
    matcher = Matcher(rules, TYPES, INTEGRAL, MARKETS)  # type: ignore[arg-type]
    try:
        for partition in matcher.partitions:
            fields = _tested_fields(json.loads(partition.definition))
            assert fields, "every rule tests something"
            assert not fields & {"sid", "id", "$s"}
            assert all(f.startswith("v") or f == "zz_sentinel" for f in fields)
            assert "$nex" not in partition.definition and "$mt" not in partition.definition
    finally:
        matcher.close()


def _tested_fields(node: object) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key.startswith("$") and key not in ("$and", "$or"):
                found |= set(value)
            elif key in ("$and", "$or", "all"):
                for part in value:
                    found |= _tested_fields(part)
            elif isinstance(value, dict):
                found |= _tested_fields(value) if not key.startswith("v") else {key}
            elif not key.startswith("$") and key not in ("pri",):
                found.add(key)
    return found


def test_close_is_idempotent_and_decisions_survive_many_evaluations() -> None:
    matcher = Matcher([("r", atom("x", ">", "0"))], TYPES, INTEGRAL, MARKETS)
    for i in range(2000):
        assert matcher.decide({"x": Decimal(i % 3 - 1)}) == ({"r"} if i % 3 == 2 else set())
    matcher.close()
    matcher.close()


def test_a_closed_matcher_refuses_instead_of_deciding_nothing() -> None:
    from engine.matcher import MatcherFailure

    matcher = Matcher([("r", atom("x", ">", "0"))], TYPES, INTEGRAL, MARKETS)
    matcher.close()
    with pytest.raises(MatcherFailure):
        matcher.decide({"x": Decimal(1)})
