"""The shipped rulesets: valid, warning-free where it matters, and every example passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Severity, validate_ruleset
from tests.conftest import RULESET_FILES

MARKETS = {"us": "USD", "jp": "JPY", "eu": "EUR", "br": "BRL"}


def test_four_markets_are_shipped() -> None:
    currencies = {}
    for path in RULESET_FILES:
        report = validate_ruleset(path.read_text(encoding="utf-8"))
        currencies[path.name[:2]] = report.examples[0].decision.currency if report.examples[0].decision else None
    assert currencies == MARKETS


@pytest.mark.parametrize("path", RULESET_FILES, ids=lambda p: p.name)
def test_every_example_passes(path: Path) -> None:
    report = validate_ruleset(path.read_text(encoding="utf-8"))
    assert report.errors == []
    assert len(report.examples) >= 3
    for outcome in report.examples:
        assert outcome.passed, (outcome.name, outcome.mismatches)


@pytest.mark.parametrize("path", RULESET_FILES, ids=lambda p: p.name)
def test_no_static_warnings(path: Path) -> None:
    report = validate_ruleset(path.read_text(encoding="utf-8"))
    assert [str(p) for p in report.problems if p.severity is Severity.WARNING] == []
