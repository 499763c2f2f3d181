"""What the README shows must work as shown."""

from __future__ import annotations

import re

from engine import validate_ruleset
from tests.conftest import ROOT


def test_the_readme_ruleset_tour_is_a_valid_ruleset_whose_example_passes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tour = readme[readme.index("## A short tour of the ruleset format") :]
    block = re.search(r"```yaml\n(.*?)```", tour, re.DOTALL)
    assert block is not None
    report = validate_ruleset(block.group(1))
    assert report.errors == [], [str(p) for p in report.errors]
    assert report.examples and all(outcome.passed for outcome in report.examples)


def test_the_readme_documents_the_development_tokens_the_bootstrap_writes() -> None:
    from server.dev import DEV_TOKENS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for token, (principal, roles) in DEV_TOKENS.items():
        assert f"| `{token}` | {principal} | {', '.join(roles)} |" in readme
