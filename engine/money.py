"""Exact decimals: strict parsing of decimal text, the arithmetic context, currencies, rounding."""

from __future__ import annotations

import re
from decimal import (
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Clamped,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    Subnormal,
    Underflow,
)
from enum import StrEnum

import iso4217

MAX_INTEGER_DIGITS = 18
MAX_FRACTION_DIGITS = 10

_DECIMAL_TEXT = re.compile(r"[+-]?([0-9]+)(?:\.([0-9]+))?")  # ASCII digits only
PLAIN_COUNT = re.compile(r"[0-9]{1,18}")  # a count as usually sent: a non-negative whole number
PLAIN_DECIMAL = re.compile(r"-?[0-9]{1,18}(?:\.[0-9]{1,10})?")  # the common case, checked in one step

#: Every exact computation runs in this context: 34 digits (decimal128), traps on.
ARITHMETIC = Context(
    prec=34,
    rounding=ROUND_HALF_EVEN,
    Emin=-999_999,
    Emax=999_999,
    traps=[InvalidOperation, DivisionByZero, Overflow, Underflow, Subnormal, Clamped],
)


class Rounding(StrEnum):
    """The ruleset's rounding mode; HALF_UP rounds ties away from zero, also for negatives."""

    HALF_UP = "half_up"
    HALF_EVEN = "half_even"

    @property
    def decimal_mode(self) -> str:
        return ROUND_HALF_UP if self is Rounding.HALF_UP else ROUND_HALF_EVEN


class DecimalTextError(ValueError):
    """Text that is not an accepted exact decimal; the message says why."""


def parse_decimal(text: object, *, allow_percent: bool = False) -> Decimal:
    """Read `12.50`, `-3`, or (if allowed) `28%` exactly. No exponent, NaN, Infinity, float."""
    if type(text) is str and PLAIN_DECIMAL.fullmatch(text):
        return Decimal(text)
    if isinstance(text, bool) or not isinstance(text, str):
        raise DecimalTextError(f"expected a decimal written as text, got {_kind(text)}")
    body = text
    percent = body.endswith("%")
    if percent:
        if not allow_percent:
            raise DecimalTextError(f"{text!r}: a percentage is not accepted here")
        body = body[:-1]
    match = _DECIMAL_TEXT.fullmatch(body)
    if not match:
        raise DecimalTextError(f"{text!r} is not a decimal (digits, optional sign and point; no exponent)")
    integer, fraction = match.group(1), match.group(2) or ""
    if len(integer.lstrip("0")) > MAX_INTEGER_DIGITS:
        raise DecimalTextError(f"{text!r} has more than {MAX_INTEGER_DIGITS} digits before the point")
    if len(fraction) > MAX_FRACTION_DIGITS:
        raise DecimalTextError(f"{text!r} has more than {MAX_FRACTION_DIGITS} digits after the point")
    value = Decimal(body)
    return value.scaleb(-2, ARITHMETIC) if percent else value


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, float):
        return "a binary float (write the number as a string)"
    return type(value).__name__


def minor_units(currency: str) -> int:
    """ISO 4217 minor units (JPY 0, USD 2, KWD 3). Raises ValueError for unknown codes."""
    try:
        exponent = iso4217.Currency(currency).exponent
    except ValueError as exc:
        raise ValueError(f"{currency!r} is not an ISO 4217 currency code") from exc
    if exponent is None:
        raise ValueError(f"{currency!r} has no minor unit (not a settlement currency)")
    return int(exponent)


def is_currency(code: object) -> bool:
    if not isinstance(code, str):
        return False
    try:
        minor_units(code)
    except ValueError:
        return False
    return True


QUANTA = [Decimal(1).scaleb(-places) for places in range(5)]  # 1, 0.1, … 0.0001: by a currency's minor units


def round_to_currency(value: Decimal, places: int, rounding: Rounding) -> Decimal:
    """Round to `places` decimals with the ruleset's mode, always passed explicitly.

    On the hot path of every line: arguments are positional (keywords cost a C method
    twice as much) and the mode is chosen by identity (hashing an enum member calls Python).
    """
    return value.quantize(QUANTA[places], ROUND_HALF_UP if rounding is Rounding.HALF_UP else ROUND_HALF_EVEN, ARITHMETIC)


def plain(value: Decimal) -> str:
    """Decimal text without exponent, exactly as computed (`1E+3` → `1000`)."""
    text = str(value)  # plain notation unless the exponent is > 0 or very negative
    if "E" in text:
        text = format(value, "f")
    return text[1:] if text[0] == "-" and value.is_zero() else text
