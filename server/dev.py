"""`make run`: the development bootstrap, then the server.

On first start it writes var/tokens.json with the four documented development tokens
(stored hashed) and loads every rulesets/*.yaml as version 1, created by `dev-alice`
(admin) and approved by `dev-bob` (compliance), so the four-eyes rule holds. Later starts
keep what is stored. Never use these tokens outside a laptop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from engine import validate_ruleset
from server.app import main
from server.auth import hash_token
from server.storage.interface import LifecycleAction, NotFound
from server.storage.sql import open_store

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("KPISETTLE_VAR_DIR", ROOT / "var"))  # tests point this elsewhere
TENANT = "dev"
#: token → (principal, roles). Documented in the README.
DEV_TOKENS = {
    "dev-admin-token": ("dev-alice", ["admin"]),
    "dev-compliance-token": ("dev-bob", ["compliance"]),
    "dev-erp-token": ("dev-erp", ["erp"]),
    "dev-billing-token": ("dev-billing", ["billing"]),
}


def write_tokens(path: Path) -> None:
    rows = [{"sha256": hash_token(token), "principal": who, "tenant": TENANT, "roles": roles} for token, (who, roles) in DEV_TOKENS.items()]
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def load_rulesets(database_url: str) -> list[str]:
    store = open_store(database_url)
    loaded = []
    try:
        for path in sorted((ROOT / "rulesets").glob("*.yaml")):
            source = path.read_text(encoding="utf-8")
            report = validate_ruleset(source)
            if not report.examples_pass or report.ruleset_id is None or report.effective_from is None:
                print(f"skipping {path.name}: it does not validate", file=sys.stderr)
                continue
            try:
                store.get_ruleset_version(TENANT, report.ruleset_id, 1)
                continue
            except NotFound:
                pass
            record = store.create_ruleset_version(
                TENANT, report.ruleset_id, source, report.content_hash or "", report.effective_from, "dev-alice"
            )
            store.record_lifecycle(TENANT, record.ruleset_id, record.version, LifecycleAction.APPROVED, "dev-bob", "development bootstrap")
            loaded.append(f"rulesets/{record.ruleset_id}/versions/{record.version}")
    finally:
        store.close()
    return loaded


EXAMPLE = """\
{"request_id": "demo-2026-03-c1001",
 "input": {"contract_id": "C-1001", "seller_id": "S-77", "market": "US",
           "period_start_date": {"year": 2026, "month": 3, "day": 1},
           "ruleset": "rulesets/us-managed-standard",
           "metrics": {"gross_gmv": {"value": "130000"}, "refunds": {"value": "5000"},
                       "ad_spend": {"value": "20000"}, "ad_sales": {"value": "100000"},
                       "orders": {"value": "2000"}, "defective_orders": {"value": "4"},
                       "response_hours": {"value": "6"}},
           "params": {"gmv_target": "100000"}}}"""


def run(argv: list[str]) -> int:
    VAR.mkdir(exist_ok=True)
    tokens = VAR / "tokens.json"
    if not tokens.exists():
        write_tokens(tokens)
    database_url = f"sqlite:///{VAR / 'kpisettle.db'}"
    loaded = load_rulesets(database_url)
    listen = "127.0.0.1:50051"  # `--listen` in argv overrides it (tests use port 0)
    print("kpisettle development server")
    print(f"  store: {database_url}   tokens: {tokens}")
    for name in loaded:
        print(f"  loaded and approved {name}")
    print("  development tokens (tenant 'dev'):")
    for token, (who, roles) in DEV_TOKENS.items():
        print(f"    {token:22} {who:12} {', '.join(roles)}")
    print("  try (grpcurl is installed in .venv by `make setup`):")
    print(f"    .venv/bin/grpcurl -plaintext -H 'authorization: Bearer dev-erp-token' -d '{EXAMPLE}' \\")
    print(f"      {listen} kpisettle.v1.SettlementService/Settle")
    sys.stdout.flush()
    return main(["--listen", listen, "--database-url", database_url, "--tokens-file", str(tokens), *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
