"""Shared helpers for the engine tests."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import CompiledRuleset, compile_ruleset
from tests.db_fixtures import *  # noqa: F403  (database_url, postgres_url, store, tenant…: one PostgreSQL database per session)
from tests.server_harness import running_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
RULESET_FILES = sorted((ROOT / "rulesets").glob("*.yaml"))
MARCH = datetime.date(2026, 3, 1)


@pytest.fixture
def compile_text() -> Iterator[object]:
    """compile_ruleset that closes what it compiled at the end of the test."""
    compiled: list[CompiledRuleset] = []

    def build(text: str) -> CompiledRuleset:
        result = compile_ruleset(text)
        compiled.append(result)
        return result

    yield build
    for item in compiled:
        item.close()
