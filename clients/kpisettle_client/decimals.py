"""Exact amounts in and out: Decimal, str or int go to the service as decimal text; floats never do.

A float such as 0.1 is not the number its literal shows (it is 0.1000000000000000055…), so
an amount given as a float raises TypeError before anything is sent. Strings are sent
exactly as given (the service validates them and lists every problem at once; ratios
may be written "28%"). Every amount the service returns is a `Decimal`.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

#: What callers may pass wherever the service expects an exact number.
Amount = Decimal | str | int


def _float_refused(value: float, what: str) -> TypeError:
    return TypeError(
        f"{what} is the float {value!r}; floats are not exact, so kpisettle refuses them: "
        f"pass a Decimal or a string instead, e.g. Decimal({str(value)!r}) or {str(value)!r}"
    )


def plain(value: Decimal) -> str:
    """Decimal text without exponent: Decimal("1E+3") → "1000", Decimal("-0") → "0"."""
    if value.is_zero():
        value = value.copy_abs()
    return format(value, "f")


def decimal_text(value: object, what: str) -> str:
    """The text sent for an exact number; TypeError for a float (or anything not Decimal, str or int)."""
    if isinstance(value, bool):  # bool is an int, but True is no amount
        raise TypeError(f"{what} is a bool; pass a Decimal, str or int")
    if isinstance(value, float):
        raise _float_refused(value, what)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{what} is {value}; only finite amounts can be settled")
        return plain(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"{what} is a {type(value).__name__}; pass a Decimal, str or int")


def to_decimal(value: object, what: str) -> Decimal:
    """An exact Decimal from Decimal, str or int; TypeError for a float, ValueError for bad text."""
    text = decimal_text(value, what)
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{what} is {text!r}, which is not a decimal number") from None
    if not number.is_finite():
        raise ValueError(f"{what} is {text!r}; only finite amounts can be settled")
    return number


def parse(text: str) -> Decimal:
    """A decimal the service returned ("" reads as 0, as the API documents for absent amounts)."""
    return Decimal(text) if text else Decimal(0)


def parse_optional(text: str) -> Decimal | None:
    """A decimal the service may leave empty ("if any"): None when empty."""
    return Decimal(text) if text else None


__all__ = ["Amount", "decimal_text", "parse", "parse_optional", "plain", "to_decimal"]
