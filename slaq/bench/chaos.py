"""``slaq bench chaos``: the real stack under a trace replay, with a worker SIGKILLed and Redis
restarted mid-run; then every request the client sent is reconciled against the ledger.

The runner starts everything itself, as separate processes: its own ``redis-server`` on a free
port **with persistence off** (``--save '' --appendonly no``, so a restart loses every queue,
ticket, heartbeat, lease and token stream — the worst case orphan recovery and the ledger must
survive), a fresh database on the PostgreSQL server of ``SLAQ_DATABASE_URL``, the API, beat (the
reprioritiser) and ``num_workers`` aggregated (``both``) sim-engine workers. It replays the
trace with :func:`slaq.bench.serve.replay`; at ``kill_at_s`` it SIGKILLs one worker and starts a
replacement under a new name (as a supervisor would; reusing the name would make the dead
worker's requests look owned), and at ``redis_restart_at_s`` it stops Redis and starts it again
on the same port.

Reconciliation: every request the client sent must end ``finished`` in the ledger or have been
refused with HTTP 429 (refusals never enter the ledger). ``lost`` is counted from both sides:
the client's (no ``[DONE]``, an error, a timeout) and the ledger's (a sent request whose row is
missing or not finished).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from slaq.bench.serve import FINISHED, REFUSED, ReplayResult, ServeConfig, replay
from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.sim.traces import Trace

READY_TIMEOUT_S = 180.0
REDIS_READY_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run: the stack, the faults and their times (seconds after the replay starts)."""

    server_database_url: str  # a PostgreSQL server; a fresh database is made on it
    model_path: str  # an HF-style directory (the sim engine only needs its tokenizer)
    out_dir: str = "bench-chaos"
    num_workers: int = 4
    sim_profile: str = "llama-8b-h100"
    kill_at_s: float | None = 200.0  # None: no SIGKILL
    redis_restart_at_s: float | None = 400.0  # None: no restart
    settle_timeout_s: float = 180.0  # after the replay, wait this long for the ledger to settle
    orphan_timeout_s: float = 5.0  # queued without a live ticket this long => re-ticketed
    reprioritise_interval_s: float = 1.0
    # Scheduling priority of beat (``nice`` increment; negative needs CAP_SYS_NICE, else it
    # runs at 0): the control plane should not queue for CPU behind the load it schedules.
    beat_nice: int = -5
    keep_database: bool = False
    plot: bool = True

    def __post_init__(self) -> None:
        if self.num_workers < 2:
            raise ValueError("num_workers must be >= 2 (one is killed)")
        for name in ("kill_at_s", "redis_restart_at_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.settle_timeout_s <= 0 or self.orphan_timeout_s <= 0:
            raise ValueError("settle_timeout_s and orphan_timeout_s must be > 0")


def _renice(increment: int):
    def apply() -> None:
        try:
            os.nice(increment)
        except PermissionError:  # not privileged: run at the default priority
            pass

    return apply


@dataclass(slots=True)
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    nice: int = 0

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_renice(self.nice) if self.nice else None)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""


@dataclass(slots=True)
class Event:
    """A fault the runner injected, at ``t_s`` seconds after the replay's start."""

    kind: str
    t_s: float
    detail: dict[str, Any] = field(default_factory=dict)


class ChaosStack:
    """Redis, a fresh database, API, beat and sim workers as child processes of this one."""

    def __init__(self, cfg: ChaosConfig, work_dir: Path) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.logs = work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.database_name = f"slaq_chaos_{uuid.uuid4().hex[:10]}"
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
                "--dbfilename", "chaos-unused.rdb"]
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

    def create_database(self) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        from slaq.platform.db import migrate

        server = make_url(self.cfg.server_database_url)
        admin = server.set(drivername="postgresql", database=server.database or "postgres")
        with psycopg.connect(admin.render_as_string(hide_password=False),
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database_name}"')
        self.database_url = server.set(database=self.database_name).render_as_string(
            hide_password=False)
        migrate(self.database_url)

    def drop_database(self) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        from slaq.platform.db import dispose_engines

        dispose_engines()
        server = make_url(self.cfg.server_database_url)
        admin = server.set(drivername="postgresql", database=server.database or "postgres")
        with psycopg.connect(admin.render_as_string(hide_password=False),
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')

    def make_api_key(self) -> None:
        from slaq.platform.db import session_factory
        from slaq.platform.tenants import create_api_key, create_tenant

        with session_factory(self.database_url)() as session:
            tenant = create_tenant(session, "chaos", allowed_tiers=TIER_NAMES)
            self.api_key = create_api_key(session, tenant.id)

    # -- processes ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SLAQ_DATABASE_URL=self.database_url, SLAQ_REDIS_URL=self.redis_url,
            SLAQ_BROKER_URL=self.redis_url, SLAQ_MODEL=self.cfg.model_path,
            SLAQ_DATA_DIR=str(self.work_dir), SLAQ_SIM_PROFILE=self.cfg.sim_profile,
            SLAQ_REPRIORITISE_INTERVAL_S=str(self.cfg.reprioritise_interval_s),
            SLAQ_POLICY_OVERRIDES=json.dumps({"orphan_timeout_s": self.cfg.orphan_timeout_s}),
            SLAQ_BEAT_METRICS_PORT=str(self.metrics_port), PYTHONUNBUFFERED="1")
        return env

    def _slaq(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "slaq.cli", *args]

    def start_worker(self, name: str) -> Proc:
        proc = Proc(name, self._slaq("worker", "--role", "both", "--engine", "sim", "--device",
                                     "cpu", "--name", name), self.logs / f"{name}.log")
        proc.start(self.env())
        self.workers.append(proc)
        return proc

    def start(self) -> None:
        self.start_redis()
        self.create_database()
        self.make_api_key()
        env = self.env()
        self.api = Proc("api", self._slaq("api", "--host", "127.0.0.1", "--port",
                                          str(self.api_port)), self.logs / "api.log")
        self.api.start(env)
        self.beat = Proc("beat", self._slaq("beat"), self.logs / "beat.log",
                         nice=self.cfg.beat_nice)
        self.beat.start(env)
        for i in range(self.cfg.num_workers):
            self.start_worker(f"chaos-w{i}")
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
        for proc in [self.api, *self.workers, self.beat]:
            if proc is not None:
                proc.stop()
        if self.redis_proc is not None:
            self.redis_proc.stop()
        if not self.cfg.keep_database and self.database_url:
            self.drop_database()


class CycleRecorder:
    """Collects the reprioritiser's own cycle times (``reprioritiser:cycles``, newest first).

    The list lives in Redis, which the run restarts without persistence, so it is read just
    before the restart and again at the end."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.saved: list[float] = []

    def read(self) -> list[float]:
        from slaq.tasks.reprioritise import read_cycle_seconds

        client = redis.Redis.from_url(self.redis_url)
        try:
            return read_cycle_seconds(client)
        except redis.RedisError:
            return []
        finally:
            client.close()

    def reset(self) -> None:
        """Forget the cycles so far (the stack's start-up, while workers load)."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            from slaq.tasks.reprioritise import CYCLES_KEY

            client.delete(CYCLES_KEY)
        finally:
            client.close()

    def save_before_restart(self) -> None:
        self.saved.extend(self.read())

    def all(self) -> list[float]:
        return self.saved + self.read()


def _faults(stack: ChaosStack, cycles: CycleRecorder, events: list[Event], t0: float,
            stop: threading.Event) -> None:
    """Inject the configured faults at their times (a thread beside the replay)."""
    cfg = stack.cfg
    plan = sorted([(t, kind) for t, kind in ((cfg.kill_at_s, "sigkill_worker"),
                                            (cfg.redis_restart_at_s, "redis_restart"))
                   if t is not None])
    for at, kind in plan:
        if stop.wait(max(0.0, t0 + at - time.monotonic())):
            return
        now = time.monotonic() - t0
        if kind == "sigkill_worker":
            victim = stack.workers[0].name
            pid = stack.kill_worker(victim)
            in_flight = inflight_on(stack.database_url, victim)
            replacement = f"{victim}-r"
            stack.start_worker(replacement)
            events.append(Event(kind, now, {"worker": victim, "pid": pid,
                                            "replacement": replacement,
                                            "in_flight_ids": in_flight}))
        else:
            cycles.save_before_restart()
            down_s = stack.restart_redis()
            events.append(Event(kind, now, {"down_s": round(down_s, 3), "persistence": False}))


def inflight_on(database_url: str, worker: str) -> list[str]:
    """Ids of the requests ``worker`` was prefilling or decoding, as the ledger says."""
    from sqlalchemy import or_, select

    from slaq.platform.db import session_factory
    from slaq.platform.models import DECODING, PREFILLING, RequestRow

    with session_factory(database_url)() as session:
        return list(session.scalars(select(RequestRow.id).where(
            RequestRow.state.in_((PREFILLING, DECODING)),
            or_(RequestRow.prefill_worker == worker, RequestRow.decode_worker == worker))))


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


def run_chaos(trace: Trace, cfg: ChaosConfig, serve: ServeConfig | None = None) -> dict[str, Any]:
    """Start the stack, replay ``trace`` with the faults, reconcile; returns the report (also
    written to ``<out_dir>/chaos.json``)."""
    from dataclasses import replace

    from slaq.bench.chaos_report import build_chaos_report

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = ChaosStack(cfg, out_dir)
    events: list[Event] = []
    stop = threading.Event()
    try:
        stack.start()
        cycles = CycleRecorder(stack.redis_url)
        cycles.reset()
        serve = replace(serve, base_url=stack.base_url, api_key=stack.api_key) if serve else \
            ServeConfig(base_url=stack.base_url, api_key=stack.api_key)
        t0 = time.monotonic()
        faults = threading.Thread(target=_faults, args=(stack, cycles, events, t0, stop),
                                  name="chaos-faults", daemon=True)
        faults.start()
        result = replay(trace, serve)
        stop.set()
        faults.join(timeout=60)
        still_active = wait_settled(stack.database_url, cfg.settle_timeout_s)
        rows = ledger_rows(stack.database_url)
        recon = reconcile(result, rows)
        by_id = {r["id"]: r for r in rows.values()}
        for e in events:  # what became of the killed worker's requests
            if "in_flight_ids" in e.detail:
                e.detail["in_flight_final"] = {
                    rid: {"state": by_id[rid]["state"], "attempt": by_id[rid]["attempt"]}
                    for rid in e.detail["in_flight_ids"] if rid in by_id}
        report = build_chaos_report(
            result, recon, cycle_seconds=cycles.all(), prometheus=prometheus_cycles(
                stack.metrics_port), events=[asdict(e) for e in events],
            decisions=decision_counts(stack.database_url), still_active=still_active,
            config=asdict(cfg), trace_meta={"name": trace.name, "requests": len(trace),
                                            "duration_s": trace.duration_s, "rate": trace.rate},
            tiers=TierTable.from_file(os.environ.get("SLAQ_TIERS_FILE") or None),
            out_dir=out_dir, plot=cfg.plot)
        return report
    finally:
        stop.set()
        stack.stop()
