"""A whole slaq stack as child processes of a benchmark, and the ledger checks run against it.

:class:`Stack` starts its own ``redis-server`` on a free port **with persistence off** (so a
restart loses every queue, ticket, heartbeat, lease and token stream), a fresh database on the
PostgreSQL server of :attr:`StackConfig.server_database_url`, the API, beat (the reprioritiser)
and ``num_workers`` sim-engine workers: all ``both`` (aggregated), or ``prefill`` and
``decode`` ones (disaggregated; half each unless ``num_prefill`` says otherwise). Every process
gets the same ``SLAQ_POLICY``, so API, beat and workers run one scheduling mode end to end.
``slaq bench chaos`` and ``slaq bench serve --launch`` both use it.

After a replay, :func:`wait_settled`, :func:`ledger_rows` and :func:`reconcile` account for
every request the client sent: finished in the ledger, refused with HTTP 429 (refusals never
enter the ledger), or lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from slaq.bench.serve import FINISHED, REFUSED, ReplayResult
from slaq.child_process import Proc
from slaq.platform.settings import POLICIES
from slaq.platform.tiers import TIER_NAMES

READY_TIMEOUT_S = 180.0
REDIS_READY_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class StackConfig:
    """What to start: services, policy, and the sim workers."""

    server_database_url: str  # a PostgreSQL server; a fresh database is made on it
    model_path: str  # an HF-style directory (the sim engine only needs its tokenizer)
    num_workers: int = 4
    disaggregated: bool = False  # False: all ``both``; True: prefill and decode workers
    num_prefill: int | None = None  # disaggregated: prefill workers (None: half)
    policy: str = "slaq"  # SLAQ_POLICY for every process
    sim_profile: str = "llama-8b-h100"
    sim_speed: float = 1.0  # SLAQ_SIM_SPEED: the sim workers' speed relative to the profile
    num_blocks: int | None = None  # KV pool per worker (None: what the profile's memory holds)
    max_num_seqs: int | None = None
    orphan_timeout_s: float = 30.0
    # Other PolicyConfig fields for beat (SLAQ_POLICY_OVERRIDES), e.g. capacities.
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    reprioritise_interval_s: float = 1.0
    # Scheduling priority of beat (``nice`` increment; negative needs CAP_SYS_NICE, else it
    # runs at 0): the control plane should not queue for CPU behind the load it schedules.
    beat_nice: int = -5
    keep_database: bool = False
    # A streaming response holds an API thread to its end: an overloaded run needs enough of
    # them that requests reach the ledger (and the scheduler) instead of waiting to be accepted.
    api_threads: int = 128
    name: str = "stack"  # in the database name and the worker names

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.num_workers < (2 if self.disaggregated else 1):
            raise ValueError("num_workers must be >= 1 (>= 2 disaggregated)")
        if self.sim_speed <= 0 or self.orphan_timeout_s <= 0:
            raise ValueError("sim_speed and orphan_timeout_s must be > 0")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.num_prefill is not None and not 1 <= self.num_prefill < self.num_workers:
            raise ValueError("num_prefill must be in [1, num_workers)")

    def roles(self) -> list[tuple[str, str]]:
        """(worker name, role) of every worker; disaggregated: prefill ones first."""
        if not self.disaggregated:
            return [(f"{self.name}-w{i}", "both") for i in range(self.num_workers)]
        num_prefill = self.num_prefill or self.num_workers // 2
        return [(f"{self.name}-p{i}", "prefill") for i in range(num_prefill)] + [
            (f"{self.name}-d{i}", "decode") for i in range(self.num_workers - num_prefill)]


class Stack:
    """Redis, a fresh database, API, beat and sim workers as child processes of this one."""

    def __init__(self, cfg: StackConfig, work_dir: Path) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.logs = work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        safe = re.sub(r"\W", "_", cfg.name)
        self.database_name = f"slaq_{safe}_{uuid.uuid4().hex[:10]}"
        self.database_url = ""
        self.api_key = ""
        self.redis_proc: Proc | None = None
        self.api: Proc | None = None
        self.beat: Proc | None = None
        self.workers: list[Proc] = []
        self._num_redis_starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- services -----------------------------------------------------------------------
    def start_redis(self) -> None:
        """``redis-server`` without persistence (no RDB snapshots, no AOF)."""
        self._num_redis_starts += 1
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.work_dir),
                "--dbfilename", "stack-unused.rdb"]
        self.redis_proc = Proc(f"redis-{self._num_redis_starts}", argv,
                               self.logs / "redis.log")
        self.redis_proc.start(dict(os.environ))
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{self.redis_proc.tail()}")

    def restart_redis(self) -> float:
        """Stop Redis (its data is gone: persistence is off) and start it again; returns the
        seconds it was down."""
        assert self.redis_proc is not None and self.redis_proc.popen is not None
        t0 = time.monotonic()
        self.redis_proc.popen.send_signal(signal.SIGTERM)
        self.redis_proc.popen.wait(timeout=10)
        self.start_redis()
        return time.monotonic() - t0

    def _admin_url(self) -> str:
        from sqlalchemy.engine import make_url

        server = make_url(self.cfg.server_database_url)
        admin = server.set(drivername="postgresql", database=server.database or "postgres")
        return admin.render_as_string(hide_password=False)

    def create_database(self) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        from slaq.platform.db import migrate

        with psycopg.connect(self._admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database_name}"')
        self.database_url = make_url(self.cfg.server_database_url).set(
            database=self.database_name).render_as_string(hide_password=False)
        migrate(self.database_url)

    def drop_database(self) -> None:
        import psycopg

        from slaq.platform.db import dispose_engines

        dispose_engines()
        with psycopg.connect(self._admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')

    def make_api_key(self) -> None:
        from slaq.platform.db import session_factory
        from slaq.platform.tenants import create_api_key, create_tenant

        with session_factory(self.database_url)() as session:
            tenant = create_tenant(session, self.cfg.name, allowed_tiers=TIER_NAMES)
            self.api_key = create_api_key(session, tenant.id)

    # -- processes ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        cfg = self.cfg
        env = dict(os.environ)
        env.update(
            SLAQ_DATABASE_URL=self.database_url, SLAQ_REDIS_URL=self.redis_url,
            SLAQ_BROKER_URL=self.redis_url, SLAQ_MODEL=cfg.model_path,
            SLAQ_DATA_DIR=str(self.work_dir), SLAQ_SIM_PROFILE=cfg.sim_profile,
            SLAQ_SIM_SPEED=repr(cfg.sim_speed), SLAQ_POLICY=cfg.policy,
            SLAQ_REPRIORITISE_INTERVAL_S=str(cfg.reprioritise_interval_s),
            SLAQ_POLICY_OVERRIDES=json.dumps({**cfg.policy_overrides,
                                              "orphan_timeout_s": cfg.orphan_timeout_s}),
            SLAQ_BEAT_METRICS_PORT=str(self.metrics_port), PYTHONUNBUFFERED="1")
        return env

    def _slaq(self, *args: str) -> list[str]:
        """``slaq ARGS`` with this interpreter (the console script may not be on PATH)."""
        return [sys.executable, "-m", "slaq.cli", *args]

    def start_worker(self, name: str, role: str = "both") -> Proc:
        # ``slaq worker``, the command a user runs (pool size follows --max-num-seqs there).
        argv = self._slaq("worker", "--role", role, "--engine", "sim", "--device", "cpu",
                          "--name", name)
        if self.cfg.num_blocks is not None:
            argv += ["--num-blocks", str(self.cfg.num_blocks)]
        if self.cfg.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.cfg.max_num_seqs)]
        proc = Proc(name, argv, self.logs / f"{name}.log")
        proc.start(self.env())
        self.workers.append(proc)
        return proc

    def start(self) -> None:
        self.start_redis()
        self.create_database()
        self.make_api_key()
        env = self.env()
        self.api = Proc("api", self._slaq("api", "--host", "127.0.0.1", "--port",
                                          str(self.api_port), "--threads",
                                          str(self.cfg.api_threads)), self.logs / "api.log")
        self.api.start(env)
        self.beat = Proc("beat", self._slaq("beat"), self.logs / "beat.log",
                         nice=self.cfg.beat_nice)
        self.beat.start(env)
        for name, role in self.cfg.roles():
            self.start_worker(name, role)
        self.wait_ready([w.name for w in self.workers])

    def wait_ready(self, workers: list[str], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the API answers /healthz and every named worker has a heartbeat."""
        from slaq.platform.keys import heartbeat_key

        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for proc in [self.api, self.beat, *self.workers]:
                    if proc is not None and proc.name in (*workers, "api", "beat") \
                            and not proc.alive():
                        raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
                try:
                    api_ok = httpx.get(f"{self.base_url}/healthz", timeout=2.0,
                                       trust_env=False).status_code == 200
                    hb_ok = all(client.exists(heartbeat_key(w)) for w in workers)
                except (httpx.HTTPError, redis.RedisError):
                    api_ok = hb_ok = False
                if api_ok and hb_ok:
                    return
                time.sleep(0.5)
        finally:
            client.close()
        raise RuntimeError("the stack was not ready in time")

    def kill_worker(self, name: str) -> int:
        """SIGKILL a worker (no clean-up at all); returns its pid."""
        proc = next(w for w in self.workers if w.name == name)
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)
        return proc.popen.pid

    def stop(self) -> None:
        # All at once: each warm shutdown takes seconds, and they do not wait on each other.
        procs = [p for p in (self.api, *self.workers, self.beat) if p is not None]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait_or_kill()
        if self.redis_proc is not None:
            self.redis_proc.stop()
        if not self.cfg.keep_database and self.database_url:
            self.drop_database()


# ---- the ledger's side of a run -----------------------------------------------------------


def ledger_rows(database_url: str) -> dict[str, dict[str, Any]]:
    """Every request row by its client request id (``x-request-id``)."""
    from sqlalchemy import select

    from slaq.platform.db import session_factory
    from slaq.platform.models import RequestRow

    cols = (RequestRow.client_request_id, RequestRow.id, RequestRow.state, RequestRow.attempt,
            RequestRow.tier_asked, RequestRow.tier_used, RequestRow.completion_tokens,
            RequestRow.finish_reason, RequestRow.prefill_worker, RequestRow.decode_worker,
            RequestRow.error, RequestRow.sla_met)
    with session_factory(database_url)() as session:
        rows = session.execute(select(*cols)).all()
    return {r[0]: dict(zip([c.key for c in cols], r, strict=True)) for r in rows if r[0]}


def wait_settled(database_url: str, timeout_s: float) -> int:
    """Wait until no request is queued, prefilling or decoding; returns how many still are."""
    from sqlalchemy import func, select

    from slaq.platform.db import session_factory
    from slaq.platform.models import ACTIVE_STATES, RequestRow

    sessions = session_factory(database_url)
    deadline = time.monotonic() + timeout_s
    while True:
        with sessions() as session:
            active = session.execute(select(func.count()).where(
                RequestRow.state.in_(ACTIVE_STATES))).scalar_one()
        if active == 0 or time.monotonic() >= deadline:
            return int(active)
        time.sleep(1.0)


def reconcile(result: ReplayResult, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Account for every request the client sent: finished in the ledger, or refused (429)."""
    ledger_lost: list[dict[str, Any]] = []
    by_tier = {t: {"sent": 0, "finished": 0, "refused": 0, "lost": 0} for t in TIER_NAMES}
    num_retried = 0
    for res in result.results:
        row = rows.get(f"bench-{res.index}")
        tier = by_tier[res.tier_asked]
        tier["sent"] += 1
        if row is not None and row["attempt"] > 1:
            num_retried += 1
        if row is not None and row["state"] == FINISHED:
            tier["finished"] += 1
        elif row is None and res.outcome == REFUSED:
            tier["refused"] += 1
        else:
            tier["lost"] += 1
            ledger_lost.append({"index": res.index, "client_outcome": res.outcome,
                                "client_error": res.error,
                                "ledger": None if row is None else {
                                    k: row[k] for k in ("id", "state", "attempt", "error")}})
    client_lost = [{"index": r.index, "error": r.error} for r in result.results
                   if r.outcome not in (FINISHED, REFUSED)]
    return {"sent": len(result.results), "num_ledger_rows": len(rows),
            "lost_ledger": len(ledger_lost), "lost_client": len(client_lost),
            "retried_in_ledger": num_retried, "per_tier": by_tier,
            "lost_ledger_examples": ledger_lost[:20], "lost_client_examples": client_lost[:20]}


def decision_counts(database_url: str) -> dict[str, int]:
    """The reprioritiser's recorded decisions by kind."""
    from sqlalchemy import func, select

    from slaq.platform.db import session_factory
    from slaq.platform.models import SchedulingDecision

    with session_factory(database_url)() as session:
        rows = session.execute(select(SchedulingDecision.kind, func.count())
                               .group_by(SchedulingDecision.kind)).all()
    return {k: int(n) for k, n in rows}


def prometheus_cycles(port: int) -> dict[str, Any] | None:
    """``slaq_reprioritiser_cycle_seconds`` as beat's /metrics shows it (count, sum, buckets)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0, trust_env=False).text
    except httpx.HTTPError:
        return None
    out: dict[str, Any] = {"buckets": {}}
    for line in text.splitlines():
        if not line.startswith("slaq_reprioritiser_cycle_seconds"):
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith("_count"):
            out["count"] = float(value)
        elif name.endswith("_sum"):
            out["sum_s"] = float(value)
        elif "_bucket" in name:
            out["buckets"][name.split('le="')[1].split('"')[0]] = float(value)
    return out
