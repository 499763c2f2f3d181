"""Conditions in normal form: atoms `probe op constant` under all/any, negations pushed in.

Both the matcher (which turns atoms into durable_rules tests on scaled integers) and the
static checks (which find conditions that can never hold) work on this form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from engine.expressions import (
    MIRRORED,
    NEGATED,
    Arith,
    Bool,
    Compare,
    Logic,
    Name,
    Neg,
    Node,
    Not,
    Num,
    Str,
    Type,
    compile_node,
    names,
    source_text,
)


@dataclass(frozen=True, slots=True)
class Atom:
    """`probe op constant`; probe is a numeric expression, a flag name, or `market`."""

    probe: Node
    op: str
    constant: Decimal | str

    @property
    def probe_text(self) -> str:
        return source_text(self.probe)


@dataclass(frozen=True, slots=True)
class All:
    parts: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Any:
    parts: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Constant:
    value: bool


Condition = Atom | All | Any | Constant


def is_constant(node: Node) -> bool:
    return not names(node)


def normalize(node: Node, name_types: Mapping[str, Type], negate: bool = False) -> Condition:
    """Normal form of a checked boolean expression. Constant parts are folded."""
    if isinstance(node, Bool):
        return Constant(node.value != negate)
    if isinstance(node, Not):
        return normalize(node.operand, name_types, not negate)
    if isinstance(node, Name):  # an exemption flag
        return Atom(node, "!=" if negate else "==", Decimal(1))
    if isinstance(node, Logic):
        parts = tuple(normalize(o, name_types, negate) for o in node.operands)
        conjunction = (node.op == "and") != negate
        return _simplify(All(parts) if conjunction else Any(parts))
    assert isinstance(node, Compare), f"not a condition: {source_text(node)}"
    op = NEGATED[node.op] if negate else node.op
    left, right = node.left, node.right
    if isinstance(left, Str) or isinstance(right, Str) or _is_string(left, name_types):
        if isinstance(left, Str) and isinstance(right, Str):
            return Constant((left.value == right.value) == (op == "=="))
        if not isinstance(left, Str) and not isinstance(right, Str):  # market == market
            return Constant(op == "==")
        probe, literal = (right, left) if isinstance(left, Str) else (left, right)
        assert isinstance(literal, Str)
        return Atom(probe, op, literal.value)
    if is_constant(left) and is_constant(right):
        return Constant(bool(compile_node(Compare(op, left, right))({})))
    # A written literal becomes the rule's literal; a computed constant such as 1/3 may not
    # be representable as a scaled integer, so it stays on the probe side: x - 1/3 > 0.
    number = _literal(right)
    if number is not None:
        return Atom(left, op, number)
    number = _literal(left)
    if number is not None:
        return Atom(right, MIRRORED[op], number)
    return Atom(Arith("-", left, right), op, Decimal(0))


def _literal(node: Node) -> Decimal | None:
    """A number as written: `28%`, `0.5`, `-3`."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Neg) and isinstance(node.operand, Num):
        return -node.operand.value
    return None


def _is_string(node: Node, name_types: Mapping[str, Type]) -> bool:
    return isinstance(node, Name) and name_types.get(node.name) is Type.STRING


def _simplify(condition: All | Any) -> Condition:
    is_all = isinstance(condition, All)
    kept: list[Condition] = []
    for part in condition.parts:
        if isinstance(part, Constant):
            if part.value != is_all:  # false in an all, true in an any: decides everything
                return part
            continue
        if isinstance(part, type(condition)):
            kept.extend(part.parts)
        else:
            kept.append(part)
    if not kept:
        return Constant(is_all)
    if len(kept) == 1:
        return kept[0]
    return All(tuple(kept)) if is_all else Any(tuple(kept))


def atoms(condition: Condition) -> list[Atom]:
    if isinstance(condition, Atom):
        return [condition]
    if isinstance(condition, (All, Any)):
        return [a for part in condition.parts for a in atoms(part)]
    return []


def dnf_size(condition: Condition) -> int:
    """How many alternatives the matcher expands the condition into (it expands to DNF)."""
    if isinstance(condition, All):
        size = 1
        for part in condition.parts:
            size *= dnf_size(part)
        return size
    if isinstance(condition, Any):
        return sum(dnf_size(p) for p in condition.parts)
    return 1


# ---------------------------------------------------------------- satisfiability

Bounds = tuple[Decimal | None, bool, Decimal | None, bool]  # low, low inclusive, high, high inclusive
UNBOUNDED: Bounds = (None, False, None, False)


def can_hold(condition: Condition, known: Mapping[str, Bounds]) -> bool:
    """False when the condition can be shown never to hold (a dead rule); True otherwise.

    Sound but incomplete: intervals per probe, intersected within each conjunction.
    `known` gives bounds of probes by their text (e.g. counts are >= 0).
    """
    return any(_conjunction_holds(term, known) for term in _terms(condition, limit=256))


def _terms(condition: Condition, limit: int) -> list[list[Atom | Constant]]:
    if isinstance(condition, (Atom, Constant)):
        return [[condition]]
    if isinstance(condition, Any):
        out: list[list[Atom | Constant]] = []
        for part in condition.parts:
            out.extend(_terms(part, limit))
        return out[:limit]
    product: list[list[Atom | Constant]] = [[]]
    for part in condition.parts:
        product = [left + right for left in product for right in _terms(part, limit)][:limit]
    return product


def _conjunction_holds(term: list[Atom | Constant], known: Mapping[str, Bounds]) -> bool:
    intervals: dict[str, Bounds] = {}
    excluded: dict[str, set[Decimal]] = {}
    for item in term:
        if isinstance(item, Constant):
            if not item.value:
                return False
            continue
        if isinstance(item.constant, str):
            continue
        key = item.probe_text
        current = intervals.get(key, known.get(key, UNBOUNDED))
        if item.op == "!=":
            excluded.setdefault(key, set()).add(item.constant)
            continue
        current = _intersect(current, _interval(item.op, item.constant))
        intervals[key] = current
    for key, (low, low_in, high, high_in) in intervals.items():
        if low is not None and high is not None:
            if low > high or (low == high and not (low_in and high_in)):
                return False
            if low == high and low in excluded.get(key, set()):
                return False
    return True


def _interval(op: str, c: Decimal) -> Bounds:
    return {
        "<": (None, False, c, False),
        "<=": (None, False, c, True),
        ">": (c, False, None, False),
        ">=": (c, True, None, False),
        "==": (c, True, c, True),
    }[op]


def _intersect(a: Bounds, b: Bounds) -> Bounds:
    low, low_in = _tighter(a[0], a[1], b[0], b[1], higher=True)
    high, high_in = _tighter(a[2], a[3], b[2], b[3], higher=False)
    return (low, low_in, high, high_in)


def _tighter(x: Decimal | None, x_in: bool, y: Decimal | None, y_in: bool, higher: bool) -> tuple[Decimal | None, bool]:
    if x is None:
        return y, y_in
    if y is None or x == y:
        return (x, x_in and y_in) if y is not None else (x, x_in)
    pick_x = (x > y) == higher
    return (x, x_in) if pick_x else (y, y_in)
