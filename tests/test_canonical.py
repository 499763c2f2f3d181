"""Canonical JSON: the bytes that replay compares, today and in five years."""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.decision import canonical_json
from engine.money import plain

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_json_is_the_standard_librarys_sorted_compact_utf8(value: object) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_json(value) == expected


def test_non_ascii_is_written_as_utf8_not_escaped() -> None:
    assert canonical_json({"zh": "断货期", "b": 1, "a": None}) == '{"a":null,"b":1,"zh":"断货期"}'.encode()


@settings(max_examples=500, deadline=None)
@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_plain_is_fixed_point_text_without_negative_zero(value: Decimal) -> None:
    expected = format(value, "f")
    if value.is_zero():
        expected = expected.lstrip("-")
    assert plain(value) == expected
