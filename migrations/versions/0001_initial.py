"""Initial schema: tenants, api_keys, requests (the ledger), scheduling_decisions.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TSTZ = sa.DateTime(timezone=True)
STATES = ("queued", "prefilling", "decoding", "finished", "failed", "cancelled", "rejected")


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("default_tier", sa.Text(), server_default="default", nullable=False),
        sa.Column("allowed_tiers", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("created_at", TSTZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("created_at", TSTZ, server_default=sa.func.now(), nullable=False),
        sa.Column("revoked_at", TSTZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE",
                                name="fk_api_keys_tenant_id_tenants"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])

    op.create_table(
        "requests",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("tier_asked", sa.Text(), nullable=False),
        sa.Column("tier_used", sa.Text(), nullable=False),
        sa.Column("ttft_target_ms", sa.Double(), nullable=False),
        sa.Column("tpot_target_ms", sa.Double(), nullable=False),
        sa.Column("deadline_at", TSTZ, nullable=True),
        sa.Column("state", sa.Text(), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("received_at", TSTZ, server_default=sa.func.now(), nullable=False),
        sa.Column("enqueued_at", TSTZ, nullable=True),
        sa.Column("prefill_started_at", TSTZ, nullable=True),
        sa.Column("first_token_at", TSTZ, nullable=True),
        sa.Column("decode_started_at", TSTZ, nullable=True),
        sa.Column("finished_at", TSTZ, nullable=True),
        sa.Column("prompt_token_ids", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column("params", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cached_tokens", sa.Integer(), nullable=True),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("tpot_ms", sa.Double(), nullable=True),
        sa.Column("sla_met", sa.Boolean(), nullable=True),
        sa.Column("prefill_worker", sa.Text(), nullable=True),
        sa.Column("decode_worker", sa.Text(), nullable=True),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output_text", sa.Text(), nullable=True),
        sa.Column("client_request_id", sa.Text(), nullable=True),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_requests"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="SET NULL",
                                name="fk_requests_tenant_id_tenants"),
        sa.CheckConstraint(_in_list("state", STATES), name="ck_requests_state"),
        sa.CheckConstraint(_in_list("kind", ("chat", "completion")), name="ck_requests_kind"),
        sa.CheckConstraint("attempt >= 1", name="ck_requests_attempt"),
    )
    op.create_index("ix_requests_state", "requests", ["state"])
    op.create_index("ix_requests_tier_used_state", "requests", ["tier_used", "state"])
    op.create_index("ix_requests_received_at", "requests", ["received_at"])

    op.create_table(
        "scheduling_decisions",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("at", TSTZ, server_default=sa.func.now(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("inputs", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scheduling_decisions"),
    )
    op.create_index("ix_scheduling_decisions_at", "scheduling_decisions", ["at"])


def downgrade() -> None:
    op.drop_table("scheduling_decisions")
    op.drop_table("requests")
    op.drop_table("api_keys")
    op.drop_table("tenants")
