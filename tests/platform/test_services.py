"""Service discovery: configured URLs as given, or embedded PostgreSQL + Redis under the data dir."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from slaq.platform.db import dispose_engines, migrate, session_factory
from slaq.platform.models import Tenant
from slaq.platform.services import ensure_services
from slaq.platform.settings import Settings
from slaq.platform.tenants import create_tenant


def test_configured_urls_are_used_as_given(tmp_path, database_url, redis_url):
    services = ensure_services(Settings(data_dir=tmp_path, database_url=database_url,
                                        redis_url=redis_url))
    assert (services.database_url, services.redis_url) == (database_url, redis_url)
    assert services.broker_url == redis_url
    assert not services.embedded
    services.stop()  # nothing of ours to stop
    assert not (tmp_path / "pg").exists() and not (tmp_path / "redis").exists()


def test_configured_broker_wins(tmp_path, database_url, redis_url):
    services = ensure_services(Settings(data_dir=tmp_path, database_url=database_url,
                                        redis_url=redis_url, broker_url="amqp://guest@localhost//"))
    assert services.broker_url == "amqp://guest@localhost//"


def test_display_url_hides_the_password(tmp_path, redis_url):
    services = ensure_services(Settings(data_dir=tmp_path,
                                        database_url="postgresql://bob:s3cret@db:5432/slaq",
                                        redis_url=redis_url))
    assert "s3cret" not in services.database_url_display
    assert "bob" in services.database_url_display


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def embedded_data_dir() -> Iterator[Path]:
    # Not under pytest's tmp root: as root, pgserver runs PostgreSQL as another user that must
    # traverse the path, and a concurrent pytest session resets that root to mode 0700.
    path = Path(tempfile.mkdtemp(prefix="slaq-embedded-"))
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.embedded
def test_embedded_services_start_reuse_stop_and_keep_data(embedded_data_dir):
    settings = Settings(data_dir=embedded_data_dir)
    first = ensure_services(settings)
    try:
        assert first.embedded and first.postgres.owned and first.redis.owned
        assert first.broker_url == first.redis_url
        migrate(first.database_url)
        with session_factory(first.database_url)() as s:
            create_tenant(s, "kept")
        r = redis.Redis.from_url(first.redis_url)  # over TCP, as Celery workers connect
        r.set("kept", "yes")
        r.close()
        # Another process (or call) attaches to the running servers instead of starting new ones.
        second = ensure_services(settings)
        assert (second.database_url, second.redis_url) == (first.database_url, first.redis_url)
        assert not second.postgres.owned and not second.redis.owned
        second.stop()  # not the owner: must leave them running
        assert _port_open(first.redis.port)
    finally:
        dispose_engines()
        first.stop()
    assert not _port_open(first.redis.port)
    assert not (first.postgres.pgdata / "postmaster.pid").exists()

    third = ensure_services(settings)
    try:
        assert third.postgres.owned and third.redis.owned
        migrate(third.database_url)  # already at head
        with session_factory(third.database_url)() as s:
            assert s.scalars(select(Tenant.name)).all() == ["kept"]
        r = redis.Redis.from_url(third.redis_url)
        assert r.get("kept") == b"yes"  # saved on shutdown, loaded on start
        r.close()
    finally:
        dispose_engines()
        third.stop()
