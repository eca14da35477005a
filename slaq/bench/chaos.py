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

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from slaq.bench.serve import ServeConfig, replay
from slaq.bench.stack import (
    Stack,
    StackConfig,
    decision_counts,
    free_port,
    ledger_rows,
    prometheus_cycles,
    reconcile,
    wait_settled,
)
from slaq.platform.tiers import TierTable
from slaq.sim.traces import Trace

__all__ = ["ChaosConfig", "ChaosStack", "free_port", "run_chaos"]


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

    def stack_config(self) -> StackConfig:
        """The stack it runs on: aggregated sim workers under the ``slaq`` policy."""
        return StackConfig(
            server_database_url=self.server_database_url, model_path=self.model_path,
            num_workers=self.num_workers, sim_profile=self.sim_profile, policy="slaq",
            orphan_timeout_s=self.orphan_timeout_s,
            reprioritise_interval_s=self.reprioritise_interval_s, beat_nice=self.beat_nice,
            keep_database=self.keep_database, name="chaos")


@dataclass(slots=True)
class Event:
    """A fault the runner injected, at ``t_s`` seconds after the replay's start."""

    kind: str
    t_s: float
    detail: dict[str, Any] = field(default_factory=dict)


class ChaosStack(Stack):
    """The shared :class:`~slaq.bench.stack.Stack`, configured from a :class:`ChaosConfig`."""

    def __init__(self, cfg: ChaosConfig, work_dir: Path) -> None:
        super().__init__(cfg.stack_config(), work_dir)
        self.chaos = cfg


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
    cfg = stack.chaos
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
