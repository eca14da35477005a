"""SQLAlchemy models: tenants, API keys, the request ledger and scheduling decisions.

The first Alembic migration (``migrations/versions/0001_initial.py``) creates exactly these
tables; ``tests/platform/test_migrations.py`` checks that autogenerate finds no difference.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Request states; see slaq.platform.ledger for the transitions between them.
QUEUED = "queued"
PREFILLING = "prefilling"
DECODING = "decoding"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"
REJECTED = "rejected"
REQUEST_STATES: tuple[str, ...] = (QUEUED, PREFILLING, DECODING, FINISHED, FAILED, CANCELLED,
                                   REJECTED)
ACTIVE_STATES: tuple[str, ...] = (QUEUED, PREFILLING, DECODING)
TERMINAL_STATES: tuple[str, ...] = (FINISHED, FAILED, CANCELLED, REJECTED)
REQUEST_KINDS: tuple[str, ...] = ("chat", "completion")


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# Deterministic constraint names, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[int]: ARRAY(Integer),
        list[str]: ARRAY(Text),
        str: Text,
        float: Double,
    }


class Tenant(Base):
    """A customer: its default tier (what ``service_tier=auto`` means) and the tiers it may use."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    default_tier: Mapped[str] = mapped_column(server_default="default")
    allowed_tiers: Mapped[list[str]]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant",
                                                  cascade="all, delete-orphan")


class ApiKey(Base):
    """An API key; only the sha256 of the plaintext is stored, plus a prefix for display."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           index=True)
    key_hash: Mapped[str] = mapped_column(unique=True)
    prefix: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class RequestRow(Base):
    """One inference call: the ledger row that tickets ``(id, attempt)`` refer to.

    It holds everything a worker needs (prompt ids, sampling params, copied SLA targets), the
    timeline, the result and the SLA verdict.
    """

    __tablename__ = "requests"
    __table_args__ = (
        CheckConstraint(_in_list("state", REQUEST_STATES), name="state"),
        CheckConstraint(_in_list("kind", REQUEST_KINDS), name="kind"),
        CheckConstraint("attempt >= 1", name="attempt"),
        Index(None, "state"),
        Index(None, "tier_used", "state"),
        Index(None, "received_at"),
    )

    id: Mapped[str] = mapped_column(primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"))
    kind: Mapped[str]
    model: Mapped[str]
    tier_asked: Mapped[str]
    tier_used: Mapped[str]
    ttft_target_ms: Mapped[float]
    tpot_target_ms: Mapped[float]
    deadline_at: Mapped[datetime | None]
    state: Mapped[str] = mapped_column(server_default=text("'queued'"))
    attempt: Mapped[int] = mapped_column(server_default=text("1"))

    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    enqueued_at: Mapped[datetime | None]
    prefill_started_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    decode_started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    prompt_token_ids: Mapped[list[int]]
    params: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int | None]
    cached_tokens: Mapped[int | None]
    ttft_ms: Mapped[float | None]
    tpot_ms: Mapped[float | None]
    sla_met: Mapped[bool | None] = mapped_column(Boolean)

    prefill_worker: Mapped[str | None]
    decode_worker: Mapped[str | None]
    finish_reason: Mapped[str | None]
    error: Mapped[str | None]
    output_text: Mapped[str | None]
    client_request_id: Mapped[str | None]
    user: Mapped[str | None]
    # "metadata" is reserved on declarative classes; the column keeps the API's name.
    request_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)

    def __repr__(self) -> str:
        return (f"RequestRow(id={self.id!r}, state={self.state!r}, attempt={self.attempt}, "
                f"tier_used={self.tier_used!r})")


class SchedulingDecision(Base):
    """One reprioritiser action and the inputs it was taken on (for audit and replay)."""

    __tablename__ = "scheduling_decisions"
    __table_args__ = (Index(None, "at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    kind: Mapped[str]
    target: Mapped[str | None]
    reason: Mapped[str | None]
    inputs: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
