"""The first migration creates exactly what the models describe, and it can be undone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from slaq.platform.db import (
    dispose_engines,
    downgrade,
    make_engine,
    migrate,
    migrations_dir,
    normalize_url,
)
from slaq.platform.models import Base

TABLES = {"tenants", "api_keys", "requests", "scheduling_decisions"}


@pytest.fixture
def scratch_url(database_url) -> Iterator[str]:
    """An empty database of its own, on the same server as ``database_url``."""
    server = make_url(database_url)
    name = f"slaq_mig_{uuid.uuid4().hex[:10]}"
    admin = server.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield server.set(database=name).render_as_string(hide_password=False)
    dispose_engines()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _diff(url: str) -> list:
    with make_engine(url).connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)


def test_models_and_migration_agree(database_url):
    assert _diff(database_url) == []


def test_autogenerate_comparison_sees_a_drift(scratch_url):
    migrate(scratch_url)
    with make_engine(scratch_url).begin() as conn:
        conn.execute(text("DROP INDEX ix_requests_tier_used_state"))
        conn.execute(text("ALTER TABLE requests ALTER COLUMN ttft_ms TYPE integer"))
    diff = _diff(scratch_url)
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in diff}
    assert "add_index" in kinds and "modify_type" in kinds


def test_upgrade_downgrade_upgrade(scratch_url):
    migrate(scratch_url)
    migrate(scratch_url)  # at head: nothing to do
    assert TABLES <= set(inspect(make_engine(scratch_url)).get_table_names())
    downgrade(scratch_url, "base")
    assert not TABLES & set(inspect(make_engine(scratch_url)).get_table_names())
    migrate(scratch_url)
    with make_engine(scratch_url).connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "0001"


def test_urls_are_rewritten_to_psycopg3():
    assert normalize_url("postgresql://u:p@h:5/db").startswith("postgresql+psycopg://u:p@h:5/")
    assert normalize_url("postgres://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert make_engine("postgresql://u@h/db") is make_engine("postgresql+psycopg://u@h/db")


def test_migrations_are_found_from_the_package():
    assert (migrations_dir() / "versions" / "0001_initial.py").is_file()
