"""The initial schema: chain heads, ruleset versions, lifecycle events, settlements.

Revision ID: 0001
Revises:
Create Date: 2026-11-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _chain_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("chain_seq", sa.BigInteger, nullable=False),
        sa.Column("previous_hash", sa.String(64), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "chain_heads",
        sa.Column("tenant", sa.String, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("tenant", name="pk_chain_heads"),
    )
    op.create_table(
        "ruleset_versions",
        sa.Column("tenant", sa.String, nullable=False),
        sa.Column("ruleset_id", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("content_hash", sa.String, nullable=False),
        sa.Column("effective_from", sa.Date, nullable=False),
        sa.Column("author", sa.String, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        *_chain_columns(),
        sa.PrimaryKeyConstraint("tenant", "ruleset_id", "version", name="pk_ruleset_versions"),
        sa.UniqueConstraint("tenant", "chain_seq", name="uq_ruleset_versions_chain_seq"),
    )
    op.create_table(
        "lifecycle_events",
        sa.Column("tenant", sa.String, nullable=False),
        sa.Column("ruleset_id", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("principal", sa.String, nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        *_chain_columns(),
        sa.PrimaryKeyConstraint("tenant", "ruleset_id", "version", "action", name="pk_lifecycle_events"),
        sa.UniqueConstraint("tenant", "chain_seq", name="uq_lifecycle_events_chain_seq"),
        sa.ForeignKeyConstraint(
            ["tenant", "ruleset_id", "version"],
            ["ruleset_versions.tenant", "ruleset_versions.ruleset_id", "ruleset_versions.version"],
            name="fk_lifecycle_events_version",
        ),
    )
    op.create_table(
        "settlements",
        sa.Column("settlement_id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String, nullable=False),
        sa.Column("request_id", sa.String, nullable=False),
        sa.Column("request_fingerprint", sa.String, nullable=False),
        sa.Column("contract_id", sa.String, nullable=False),
        sa.Column("seller_id", sa.String, nullable=False),
        sa.Column("market", sa.String, nullable=False),
        sa.Column("period_start", sa.Date, nullable=False),
        sa.Column("period_end", sa.Date, nullable=False),
        sa.Column("ruleset_id", sa.String, nullable=False),
        sa.Column("ruleset_version", sa.Integer, nullable=False),
        sa.Column("content_hash", sa.String, nullable=False),
        sa.Column("engine_version", sa.String, nullable=False),
        sa.Column("currency", sa.String, nullable=False),
        sa.Column("total", sa.Text, nullable=False),
        sa.Column("request_json", sa.LargeBinary, nullable=False),
        sa.Column("decision_json", sa.LargeBinary, nullable=False),
        sa.Column("deltas_json", sa.LargeBinary, nullable=False),
        sa.Column("principal", sa.String, nullable=False),
        sa.Column("expected_revision", sa.Integer, nullable=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("supersedes_id", sa.String(32), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        *_chain_columns(),
        sa.PrimaryKeyConstraint("settlement_id", name="pk_settlements"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_settlements_request_id"),
        sa.UniqueConstraint("tenant", "period_start", "contract_id", "revision", name="uq_settlements_revision"),
        sa.UniqueConstraint("supersedes_id", name="uq_settlements_supersedes_id"),
        sa.UniqueConstraint("tenant", "chain_seq", name="uq_settlements_chain_seq"),
        sa.ForeignKeyConstraint(["supersedes_id"], ["settlements.settlement_id"], name="fk_settlements_supersedes"),
    )
    op.create_index("ix_settlements_contract", "settlements", ["tenant", "contract_id", "period_start"])
    op.create_index("ix_settlements_seller", "settlements", ["tenant", "seller_id", "period_start"])


def downgrade() -> None:
    op.drop_index("ix_settlements_seller", table_name="settlements")
    op.drop_index("ix_settlements_contract", table_name="settlements")
    op.drop_table("settlements")
    op.drop_table("lifecycle_events")
    op.drop_table("ruleset_versions")
    op.drop_table("chain_heads")
