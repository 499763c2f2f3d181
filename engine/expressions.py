"""The expression language of rulesets: tokenizer, parser, type checker, compiled evaluator.

Hand-written recursive descent; nothing reaches Python `eval`. An expression is parsed
once when the ruleset is compiled and turned into closures over `Decimal` arithmetic in
the engine's exact context, so evaluating it per settlement costs a few calls.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from engine.money import ARITHMETIC, DecimalTextError, parse_decimal, plain

MAX_LENGTH = 1000
MAX_DEPTH = 32  # nesting: parentheses, not, unary minus, function calls
MAX_HEIGHT = 64  # operations on any path from the root, a flat chain a+b+c… included

Scalar = Decimal | bool | str
Env = Mapping[str, Scalar]


class Type(StrEnum):
    NUMBER = "number"
    BOOL = "boolean"
    STRING = "string"


class ExpressionError(Exception):
    """A problem in an expression's text or types; `offset` is 0-based into the text."""

    def __init__(self, code: str, message: str, offset: int = 0) -> None:
        self.code = code
        self.offset = offset
        super().__init__(message)


class ZeroDivision(ArithmeticError):
    """Division by zero while evaluating; the caller decides (on_zero_division or an error)."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        super().__init__(f"division by zero in {expression!r}")


# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class Num:
    value: Decimal
    text: str


@dataclass(frozen=True, slots=True)
class Str:
    value: str


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    offset: int


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Node


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Arith:
    op: str  # + - * /
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # < <= > >= == !=
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # and | or
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Call:
    function: str  # min | max | abs
    args: tuple[Node, ...]
    offset: int


Node = Num | Str | Bool | Name | Neg | Not | Arith | Compare | Logic | Call

FUNCTIONS = ("min", "max", "abs")
KEYWORDS = ("and", "or", "not", "true", "false")
COMPARISONS = ("<=", ">=", "==", "!=", "<", ">")
NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
MIRRORED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}

# ---------------------------------------------------------------- tokens

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:[ ]*%)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>'[^'\\\n]{0,64}'|"[^"\\\n]{0,64}")
  | (?P<op><=|>=|==|!=|[-+*/()<>,])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number | name | string | op | end
    text: str
    offset: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise ExpressionError("expr.syntax", f"unexpected character {text[position]!r}", position)
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), position))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


# ---------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0
        self.heights: dict[int, int] = {}

    def made(self, node: Node) -> Node:
        """Record the new node's height; refuse trees too tall for later recursive walks."""
        height = 1 + max((self.heights.get(id(child), 1) for child in children(node)), default=0)
        if height > MAX_HEIGHT:
            raise ExpressionError("expr.too_deep", f"more than {MAX_HEIGHT} operations in a row", self.token.offset)
        self.heights[id(node)] = height
        return node

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, text: str) -> None:
        if self.token.text != text:
            found = self.token.text or "the end"
            raise ExpressionError("expr.syntax", f"expected {text!r}, found {found!r}", self.token.offset)
        self.advance()

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError("expr.too_deep", f"nested deeper than {MAX_DEPTH}", self.token.offset)

    def parse(self) -> Node:
        node = self.disjunction()
        if self.token.kind != "end":
            raise ExpressionError("expr.syntax", f"unexpected {self.token.text!r}", self.token.offset)
        return node

    def disjunction(self) -> Node:
        operands = [self.conjunction()]
        while self.token.kind == "name" and self.token.text == "or":
            self.advance()
            operands.append(self.conjunction())
        return operands[0] if len(operands) == 1 else self.made(Logic("or", tuple(operands)))

    def conjunction(self) -> Node:
        operands = [self.negation()]
        while self.token.kind == "name" and self.token.text == "and":
            self.advance()
            operands.append(self.negation())
        return operands[0] if len(operands) == 1 else self.made(Logic("and", tuple(operands)))

    def negation(self) -> Node:
        if self.token.kind == "name" and self.token.text == "not":
            self.advance()
            self.enter()
            node = self.made(Not(self.negation()))
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        left = self.additive()
        if self.token.text in COMPARISONS:
            op = self.advance().text
            right = self.additive()
            if self.token.text in COMPARISONS:
                raise ExpressionError("expr.syntax", "comparisons cannot be chained; use 'and'", self.token.offset)
            return self.made(Compare(op, left, right))
        return left

    def additive(self) -> Node:
        node = self.multiplicative()
        while self.token.text in ("+", "-"):
            op = self.advance().text
            node = self.made(Arith(op, node, self.multiplicative()))
        return node

    def multiplicative(self) -> Node:
        node = self.unary()
        while self.token.text in ("*", "/"):
            op = self.advance().text
            node = self.made(Arith(op, node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.token.text == "-":
            self.advance()
            self.enter()
            node = self.made(Neg(self.unary()))
            self.depth -= 1
            return node
        if self.token.text == "+":
            self.advance()
            return self.unary()
        return self.atom()

    def atom(self) -> Node:
        token = self.advance()
        if token.kind == "number":
            try:
                value = parse_decimal(token.text.replace(" ", ""), allow_percent=True)
            except DecimalTextError as exc:
                raise ExpressionError("expr.bad_number", str(exc), token.offset) from exc
            return Num(value, token.text.replace(" ", ""))
        if token.kind == "string":
            return Str(token.text[1:-1])
        if token.kind == "name":
            if token.text in ("true", "false"):
                return Bool(token.text == "true")
            if token.text in ("and", "or", "not"):
                raise ExpressionError("expr.syntax", f"unexpected {token.text!r}", token.offset)
            if self.token.text == "(":
                return self.call(token)
            return Name(token.text, token.offset)
        if token.text == "(":
            self.enter()
            node = self.disjunction()
            self.expect(")")
            self.depth -= 1
            return node
        found = token.text or "the end"
        raise ExpressionError("expr.syntax", f"expected a value, found {found!r}", token.offset)

    def call(self, name: _Token) -> Node:
        if name.text not in FUNCTIONS:
            raise ExpressionError("expr.unknown_function", f"{name.text}() is not a function; use min, max or abs", name.offset)
        self.advance()  # (
        self.enter()
        args = [self.disjunction()]
        while self.token.text == ",":
            self.advance()
            args.append(self.disjunction())
        self.expect(")")
        self.depth -= 1
        if name.text == "abs" and len(args) != 1:
            raise ExpressionError("expr.arity", "abs() takes exactly one argument", name.offset)
        return self.made(Call(name.text, tuple(args), name.offset))


def parse(text: str) -> Node:
    """Parse an expression. Raises ExpressionError with a stable code and an offset."""
    if not isinstance(text, str):
        raise ExpressionError("expr.not_text", "an expression must be text")
    if len(text) > MAX_LENGTH:
        raise ExpressionError("expr.too_long", f"{len(text)} characters; at most {MAX_LENGTH}")
    if not text.strip():
        raise ExpressionError("expr.empty", "the expression is empty")
    return _Parser(text).parse()


# ---------------------------------------------------------------- inspection


def names(node: Node) -> list[tuple[str, int]]:
    """Every name the expression refers to, with its offset, in order of appearance."""
    found: list[tuple[str, int]] = []

    def visit(n: Node) -> None:
        if isinstance(n, Name):
            found.append((n.name, n.offset))
        for child in children(n):
            visit(child)

    visit(node)
    return found


def constant_zero_divisions(node: Node) -> list[int]:
    """Offsets of divisions whose divisor is a constant equal to zero (`x / (2 - 2)`)."""
    found: list[int] = []
    if isinstance(node, Arith) and node.op == "/" and not names(node.right):
        try:
            divisor = compile_node(node.right)({})
        except ZeroDivision:
            divisor = Decimal(1)  # reported where it happens, deeper down
        if isinstance(divisor, Decimal) and divisor.is_zero():
            found.append(_first_offset(node.right))
    for child in children(node):
        found.extend(constant_zero_divisions(child))
    return found


def _first_offset(node: Node) -> int:
    if isinstance(node, (Name, Call)):
        return node.offset
    return next((_first_offset(c) for c in children(node)), 0)


def children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, (Neg, Not)):
        return (node.operand,)
    if isinstance(node, (Arith, Compare)):
        return (node.left, node.right)
    if isinstance(node, Logic):
        return node.operands
    if isinstance(node, Call):
        return node.args
    return ()


def source_text(node: Node) -> str:
    """Re-print a node in normal form (used for evidence and for de-duplicating probes)."""
    if isinstance(node, Num):
        return node.text
    if isinstance(node, Str):
        return f"'{node.value}'"
    if isinstance(node, Bool):
        return "true" if node.value else "false"
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Neg):
        return f"-{_wrapped(node.operand)}"
    if isinstance(node, Not):
        return f"not {_wrapped(node.operand)}"
    if isinstance(node, (Arith, Compare)):
        return f"{_wrapped(node.left)} {node.op} {_wrapped(node.right)}"
    if isinstance(node, Logic):
        return f" {node.op} ".join(_wrapped(o) for o in node.operands)
    return f"{node.function}({', '.join(source_text(a) for a in node.args)})"


def _wrapped(node: Node) -> str:
    text = source_text(node)
    return f"({text})" if isinstance(node, (Arith, Compare, Logic, Neg, Not)) else text


def type_of(node: Node, name_types: Mapping[str, Type]) -> Type:
    """Check types; every name must be in `name_types`. Raises ExpressionError."""
    if isinstance(node, Num):
        return Type.NUMBER
    if isinstance(node, Str):
        return Type.STRING
    if isinstance(node, Bool):
        return Type.BOOL
    if isinstance(node, Name):
        if node.name not in name_types:
            raise ExpressionError("expr.unknown_name", f"unknown name {node.name!r}", node.offset)
        return name_types[node.name]
    if isinstance(node, Neg):
        _want(node.operand, Type.NUMBER, name_types, "'-'")
        return Type.NUMBER
    if isinstance(node, Not):
        _want(node.operand, Type.BOOL, name_types, "'not'")
        return Type.BOOL
    if isinstance(node, Arith):
        _want(node.left, Type.NUMBER, name_types, f"'{node.op}'")
        _want(node.right, Type.NUMBER, name_types, f"'{node.op}'")
        return Type.NUMBER
    if isinstance(node, Compare):
        left, right = type_of(node.left, name_types), type_of(node.right, name_types)
        if left is Type.BOOL or right is Type.BOOL:
            raise ExpressionError("expr.type", f"'{node.op}' compares numbers or market codes, not conditions")
        if left != right:
            raise ExpressionError("expr.type", f"'{node.op}' compares a {left.value} with a {right.value}")
        if left is Type.STRING and node.op not in ("==", "!="):
            raise ExpressionError("expr.type", f"market codes compare only with == and !=, not {node.op!r}")
        return Type.BOOL
    if isinstance(node, Logic):
        for operand in node.operands:
            _want(operand, Type.BOOL, name_types, f"'{node.op}'")
        return Type.BOOL
    for arg in node.args:
        _want(arg, Type.NUMBER, name_types, f"{node.function}()")
    return Type.NUMBER


def _want(node: Node, wanted: Type, name_types: Mapping[str, Type], where: str) -> None:
    found = type_of(node, name_types)
    if found is not wanted:
        raise ExpressionError("expr.type", f"{where} needs a {wanted.value}, got a {found.value}: {source_text(node)!r}")


# ---------------------------------------------------------------- evaluation

Evaluator = Callable[[Env], Scalar]


def compile_node(node: Node) -> Evaluator:
    """Turn a checked tree into a closure over the exact arithmetic context."""
    ctx = ARITHMETIC
    if isinstance(node, Num):
        num = node.value
        return lambda env: num
    if isinstance(node, Str):
        text = node.value
        return lambda env: text
    if isinstance(node, Bool):
        flag = node.value
        return lambda env: flag
    if isinstance(node, Name):
        return operator.itemgetter(node.name)  # env[name], without a Python frame
    if isinstance(node, Neg):
        inner = compile_node(node.operand)
        return lambda env: ctx.minus(inner(env))  # type: ignore[arg-type]
    if isinstance(node, Not):
        inner = compile_node(node.operand)
        return lambda env: not inner(env)
    if isinstance(node, Arith):
        left, right = compile_node(node.left), compile_node(node.right)
        if node.op == "+":
            return lambda env: ctx.add(left(env), right(env))  # type: ignore[arg-type]
        if node.op == "-":
            return lambda env: ctx.subtract(left(env), right(env))  # type: ignore[arg-type]
        if node.op == "*":
            return lambda env: ctx.multiply(left(env), right(env))  # type: ignore[arg-type]
        text = source_text(node)

        def divide(env: Env) -> Scalar:
            divisor = right(env)
            if not divisor:
                raise ZeroDivision(text)
            return ctx.divide(left(env), divisor)  # type: ignore[arg-type]

        return divide
    if isinstance(node, Compare):
        left, right = compile_node(node.left), compile_node(node.right)
        return _COMPARATORS[node.op](left, right)
    if isinstance(node, Logic):
        parts = tuple(compile_node(o) for o in node.operands)
        if node.op == "and":
            return lambda env: all(p(env) for p in parts)
        return lambda env: any(p(env) for p in parts)
    args = tuple(compile_node(a) for a in node.args)
    if node.function == "abs":
        only = args[0]
        return lambda env: ctx.abs(only(env))  # type: ignore[arg-type]
    if node.function == "min":
        return lambda env: min(a(env) for a in args)
    return lambda env: max(a(env) for a in args)


def _comparator(test: Callable[[Scalar, Scalar], bool]) -> Callable[[Evaluator, Evaluator], Evaluator]:
    return lambda left, right: lambda env: test(left(env), right(env))


_COMPARATORS: dict[str, Callable[[Evaluator, Evaluator], Evaluator]] = {
    "<": _comparator(lambda a, b: a < b),  # type: ignore[operator]
    "<=": _comparator(lambda a, b: a <= b),  # type: ignore[operator]
    ">": _comparator(lambda a, b: a > b),  # type: ignore[operator]
    ">=": _comparator(lambda a, b: a >= b),  # type: ignore[operator]
    "==": _comparator(lambda a, b: a == b),
    "!=": _comparator(lambda a, b: a != b),
}


@dataclass(frozen=True)
class Expression:
    """A parsed, type-checked expression with its compiled evaluator."""

    text: str
    tree: Node
    type: Type
    evaluate: Evaluator

    @property
    def names(self) -> list[str]:
        return [name for name, _ in names(self.tree)]


def compile_expression(text: str, name_types: Mapping[str, Type], want: Type | None = None) -> Expression:
    tree = parse(text)
    found = type_of(tree, name_types)
    if want is not None and found is not want:
        raise ExpressionError("expr.type", f"expected a {want.value} expression, got a {found.value}")
    return Expression(text, tree, found, compile_node(tree))


# ---------------------------------------------------------------- evidence


Explainer = Callable[[Env, dict[Any, str]], str]  # (values, per-settlement memo of shown values)


def compile_evidence(node: Node, integral: Collection[str] = ()) -> Explainer:
    """Evidence for a condition with the values it saw, e.g. `acos 0.3100 > 0.2800`.

    Numbers show at least 4 decimals (more if a literal has more; none when both sides
    are whole by type) and never round (see shown_value); the decision never reads this
    text. Everything static is prepared here so that a call only formats values.
    """
    if isinstance(node, Compare):
        places = 0 if is_integral(node.left, integral) and is_integral(node.right, integral) else _literal_places(node)
        op = node.op
        constant = _constant_text(node.right, places)
        if constant is not None:  # the usual `probe > 0.28`: the right side is text made once
            return _side(node.left, places, f" {op} {constant}")  # one call per condition, not two
        left, right = _side(node.left, places), _side(node.right, places)
        return lambda env, memo: f"{left(env, memo)} {op} {right(env, memo)}"
    if isinstance(node, Logic):
        parts = tuple((compile_evidence(o, integral), isinstance(o, Logic)) for o in node.operands)
        joiner = f" {node.op} "
        return lambda env, memo: joiner.join([f"({p(env, memo)})" if nested else p(env, memo) for p, nested in parts])
    if isinstance(node, Not):
        inner = compile_evidence(node.operand, integral)
        return lambda env, memo: f"not ({inner(env, memo)})"
    value_of, text = compile_node(node), source_text(node)

    def value(env: Env, memo: dict[Any, str]) -> str:
        try:
            v = value_of(env)
        except ZeroDivision:
            return f"{text} undefined (division by zero)"
        return f"{text} {('true' if v else 'false') if isinstance(v, bool) else v}"

    return value


def is_integral(node: Node, integral: Collection[str]) -> bool:
    """True when the node's value is a whole number by its types alone."""
    if isinstance(node, Num):
        return node.value == node.value.to_integral_value()
    if isinstance(node, Name):
        return node.name in integral
    if isinstance(node, Str):
        return True
    if isinstance(node, Arith) and node.op != "/":
        return is_integral(node.left, integral) and is_integral(node.right, integral)
    if isinstance(node, Neg):
        return is_integral(node.operand, integral)
    return False


def _literal_places(node: Compare) -> int:
    literals = [-int(n.value.as_tuple().exponent) for n in (node.left, node.right) if isinstance(n, Num)]
    return max([4, *literals])


EVIDENCE_EXTRA_PLACES = 8


def shown_value(value: Decimal, places: int) -> str:
    """`places` decimals when that is exact, else up to 8 more, else truncated with `…`.

    Never rounds: a value just above a threshold must not read as equal to it.
    """
    try:
        shown = value.quantize(_QUANTA[places], ROUND_DOWN, ARITHMETIC)  # positional: keywords cost more than the call
        if shown == value:
            return plain(shown)
        longer = value.quantize(_QUANTA[places + EVIDENCE_EXTRA_PLACES], ROUND_DOWN, ARITHMETIC)
    except InvalidOperation:  # more digits than exact arithmetic keeps: show it as it is
        return plain(value)
    return plain(value) if longer == value else plain(longer) + "…"


_QUANTA = {p: Decimal(1).scaleb(-p) for p in range(64)}


def _constant_text(node: Node, places: int) -> str | None:
    """How a literal side of a comparison reads in evidence; None for any other side."""
    if isinstance(node, Num):
        return shown_value(node.value, places)
    if isinstance(node, Str):
        return node.value
    return None


def _side(node: Node, places: int, tail: str = "") -> Explainer:
    """How one side of a comparison reads, followed by `tail` (the rest of the evidence, if constant)."""
    constant = _constant_text(node, places)
    if constant is not None:
        text = constant + tail
        return lambda env, memo: text
    value_of, prefix = compile_node(node), source_text(node) + " "
    # The same probe shown the same way in several rules is formatted once; one string as
    # the key (its hash is kept), unique since the prefix ends in a space and places has none.
    key = f"{prefix}{places}"

    def side(env: Env, memo: dict[Any, str]) -> str:
        text = memo.get(key)
        if text is None:
            try:
                value = value_of(env)
            except ZeroDivision:  # only reachable in a part the condition's outcome does not depend on
                text = prefix + "undefined (division by zero)"
            else:
                text = prefix + (shown_value(value, places) if isinstance(value, Decimal) else str(value))
            memo[key] = text
        return text + tail  # an empty tail returns the text itself

    return side
