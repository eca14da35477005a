"""Database engines, sessions and migrations.

Engines are cached per URL and per process: a forked child (Celery prefork, gunicorn) gets its
own pool rather than sharing sockets with its parent. ``postgresql://`` URLs are rewritten to the
psycopg 3 driver, the only one installed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_ID = 0x51A0_0001

_lock = threading.Lock()
_engines: dict[str, tuple[int, Engine]] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def normalize_url(url: str) -> str:
    """Rewrite ``postgres://`` / ``postgresql://`` to ``postgresql+psycopg://``; keep others."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """The process's engine for ``url`` (created on first use)."""
    key = normalize_url(url)
    pid = os.getpid()
    with _lock:
        cached = _engines.get(key)
        if cached is not None and cached[0] == pid:
            return cached[1]
        if cached is not None:
            # Inherited over fork: drop the parent's connections without closing them under it.
            cached[1].dispose(close=False)
            _factories.pop(key, None)
        engine = create_engine(key, pool_pre_ping=True)
        _engines[key] = (pid, engine)
        return engine


def session_factory(url: str) -> sessionmaker[Session]:
    """A cached ``sessionmaker`` bound to :func:`make_engine` of ``url``.

    ``expire_on_commit=False`` so rows returned by ledger functions stay readable after commit.
    """
    engine = make_engine(url)
    key = normalize_url(url)
    with _lock:
        factory = _factories.get(key)
        if factory is None or factory.kw.get("bind") is not engine:
            factory = sessionmaker(bind=engine, expire_on_commit=False)
            _factories[key] = factory
        return factory


def dispose_engines() -> None:
    """Close every cached engine's pool (tests, shutdown)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _factories.clear()
    for pid, engine in engines:
        engine.dispose(close=pid == os.getpid())


def migrations_dir() -> Path:
    """The Alembic script directory: ``migrations/`` at the repository root.

    The project is installed editable (``pip install -e .``, also in the Docker images), so the
    package's parent is the checkout that holds ``migrations/``.
    """
    path = Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise RuntimeError(f"Alembic migrations not found at {path}; install slaq with "
                           "'pip install -e .' from its checkout")
    return path


def alembic_config(url: str):
    """An Alembic ``Config`` for ``url`` that works from any working directory."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation: a literal % in the URL (escaped password) must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` on ``url``.

    An advisory lock serialises concurrent callers (several processes starting at once).
    """
    from alembic import command

    cfg = alembic_config(url)
    with make_engine(url).begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(url: str, revision: str) -> None:
    """Run ``alembic downgrade <revision>`` on ``url`` (tests, manual rollbacks)."""
    from alembic import command

    cfg = alembic_config(url)
    with make_engine(url).begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
