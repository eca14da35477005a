"""The reprioritiser: the beat-scheduled ``slaq.reprioritise`` task on the ``control`` queue.

One cycle (:meth:`Reprioritiser.cycle`):

1. take the Redis lock ``reprioritiser:lock`` (SET NX PX, via redis-py's ``Lock``) or skip;
2. load the previous :class:`ReprioritiserState` (JSON in ``reprioritiser:state``);
3. build a :class:`~slaq.platform.snapshot.Snapshot` (:mod:`slaq.platform.live_snapshot`);
4. call :func:`slaq.platform.policy.decide` — the very function the simulator calls;
5. bump the attempts of re-tickets and record one ``scheduling_decisions`` row per action, in
   one transaction; after the commit send the new tickets;
6. reconcile gates with Celery remote control; publish gates, routing and admission to Redis;
7. save the state; hand a new planner figure to the scaling hook, if one is configured
   (``SLAQ_SCALING_HOOK``); record the cycle time (Redis list ``reprioritiser:cycles`` and
   the Prometheus histogram ``slaq_reprioritiser_cycle_seconds``).

Nothing here is needed for serving: if beat dies, workers and the API keep reading the last
published decisions.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import redis
from celery import Celery, shared_task
from prometheus_client import Histogram
from redis.exceptions import LockError
from sqlalchemy.orm import Session, sessionmaker

from slaq.platform.decisions import (
    AdmissionState,
    publish_state,
    record_decisions,
    remember_tickets,
)
from slaq.platform.live_snapshot import BrokerDepths, LiveSnapshotSource
from slaq.platform.policy import PolicyConfig, PolicyState, decide
from slaq.platform.policy_env import policy_config_from_env
from slaq.platform.settings import Settings
from slaq.platform.snapshot import Action, Plan, Reticket, SetAdmission, SetRouting, Snapshot
from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.tasks.config import CONTROL_QUEUE
from slaq.tasks.control import (
    GateReconciler,
    bump_attempts,
    gate_table,
    send_gate_commands,
    send_tickets,
)

log = logging.getLogger(__name__)

REPRIORITISE_TASK = "slaq.reprioritise"
STATE_KEY = "reprioritiser:state"
LOCK_KEY = "reprioritiser:lock"
CYCLES_KEY = "reprioritiser:cycles"
NUM_CYCLES_KEPT = 4096

CYCLE_SECONDS = Histogram(
    "slaq_reprioritiser_cycle_seconds", "Time of one reprioritiser cycle (lock to state saved)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))


# ---- state between cycles -----------------------------------------------------------------


@dataclass(slots=True)
class ReprioritiserState:
    """The policy's state plus what the live job needs to re-publish and reconcile."""

    policy: PolicyState = field(default_factory=PolicyState)
    gates_applied: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        p = self.policy
        return json.dumps({
            "policy": {
                "time": p.time,
                "pressure_closed": sorted([list(k) for k in p.pressure_closed]),
                "release_closed": sorted(p.release_closed),
                "admission": {t: list(a) for t, a in p.admission.items()},
                "rates": {t: list(r) for t, r in p.rates.items()},
                "plan": list(p.plan) if p.plan is not None else None,
            },
            "gates_applied": self.gates_applied,
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> ReprioritiserState:
        d = json.loads(text)
        p = d.get("policy") or {}
        policy = PolicyState(
            time=p.get("time"),
            pressure_closed=frozenset((r, t) for r, t in p.get("pressure_closed", ())),
            release_closed=frozenset(p.get("release_closed", ())),
            admission=MappingProxyType({t: (str(a[0]), int(a[1]))
                                        for t, a in (p.get("admission") or {}).items()}),
            rates=MappingProxyType({t: tuple(float(x) for x in r)
                                    for t, r in (p.get("rates") or {}).items()}),
            plan=tuple(p["plan"]) if p.get("plan") else None)
        return cls(policy, dict(d.get("gates_applied") or {}))


def load_state(client: redis.Redis) -> ReprioritiserState | None:
    """The saved state, or None when there is none (first cycle, Redis restarted) or it is bad."""
    raw = client.get(STATE_KEY)
    if raw is None:
        return None
    try:
        return ReprioritiserState.from_json(raw)
    except (ValueError, TypeError, KeyError):
        log.warning("discarding an unreadable reprioritiser state")
        return None


def save_state(client: redis.Redis, state: ReprioritiserState) -> None:
    client.set(STATE_KEY, state.to_json())


# ---- one cycle ----------------------------------------------------------------------------


@dataclass(slots=True)
class CycleResult:
    """What one cycle did (``ran`` is False when another cycle held the lock)."""

    ran: bool
    seconds: float = 0.0
    snapshot: Snapshot | None = None
    previous: PolicyState | None = None
    actions: list[Action] = field(default_factory=list)
    num_sent: int = 0

    def summary(self) -> str:
        if not self.ran:
            return "skipped: another cycle holds the lock"
        kinds: dict[str, int] = {}
        for a in self.actions:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        return f"{self.seconds * 1000:.1f} ms; actions {kinds}; tickets sent {self.num_sent}"


class Reprioritiser:
    """Turns heartbeats + queues + ledger into applied, recorded decisions, once per cycle."""

    def __init__(self, *, redis_client: redis.Redis, session_factory: sessionmaker[Session],
                 app: Celery, tiers: TierTable, config: PolicyConfig,
                 depths: BrokerDepths, interval_s: float = 1.0,
                 handoff_timeout_s: float | None = None,
                 scaling_hook: Callable[[Plan], None] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.r = redis_client
        self.session_factory = session_factory
        self.app = app
        self.tiers = tiers
        self.config = config
        self.source = LiveSnapshotSource(redis_client, depths, tiers, config, handoff_timeout_s)
        self.scaling_hook = scaling_hook
        # A cycle that hangs (or a process that died holding the lock) blocks others this long.
        self.lock_ttl_s = max(10.0, 5 * interval_s)
        # A budget outlives a late cycle or two, not a dead reprioritiser.
        self.budget_ttl_s = max(5.0, 5 * interval_s)
        # A re-ticket's record must outlive the longest wait before it could be aged again.
        self.ticket_ttl_s = max(60.0, 2 * max(t.ttft_ms for t in tiers) / 1000.0)

    def cycle(self, now: float | None = None) -> CycleResult:
        """Run one cycle unless another holds the lock; records its own duration."""
        lock = self.r.lock(LOCK_KEY, timeout=self.lock_ttl_s, blocking=False)
        if not lock.acquire(blocking=False):
            return CycleResult(ran=False)
        t0 = time.perf_counter()
        try:
            result = self._run(time.time() if now is None else now)
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("the reprioritiser lock expired during a cycle")
        result.seconds = time.perf_counter() - t0
        self._record_time(result.seconds)
        return result

    def _run(self, now: float) -> CycleResult:
        state = load_state(self.r) or ReprioritiserState()
        with self.session_factory() as session:
            snapshot = self.source.build(session, now, state.policy.time)
            actions, policy_state = decide(snapshot, state.policy, self.tiers, self.config)
            retickets = [a for a in actions if isinstance(a, Reticket)]
            applied = bump_attempts(session, retickets)
            ok = dict(zip((id(a) for a in retickets), applied, strict=True))
            extras = {i: {"applied": ok[id(a)]} for i, a in enumerate(actions)
                      if isinstance(a, Reticket)}
            record_decisions(session, actions, datetime.fromtimestamp(now, UTC), extras)
            session.commit()
        sent = send_tickets(self.app, [a for a in retickets if ok[id(a)]], self.tiers)
        remember_tickets(self.r, [(a, now) for a in sent], self.ticket_ttl_s)
        new_state = ReprioritiserState(policy_state, state.gates_applied)
        self._apply_gates(snapshot, new_state, now)
        # Routing and admission are decided afresh every cycle; what is not decided is free.
        routing = next((dict(a.weights) for a in reversed(actions)
                        if isinstance(a, SetRouting)), {})
        admission = {t: AdmissionState(t) for t in TIER_NAMES}
        admission.update((a.tier, AdmissionState.from_action(a, now)) for a in actions
                         if isinstance(a, SetAdmission))
        publish_state(self.r, gates=gate_table(policy_state), routing=routing,
                      admission=admission, budget_ttl_s=self.budget_ttl_s)
        save_state(self.r, new_state)
        self._scale([a for a in actions if isinstance(a, Plan)])
        return CycleResult(ran=True, snapshot=snapshot, previous=state.policy, actions=actions,
                           num_sent=len(sent))

    def _apply_gates(self, snapshot: Snapshot, state: ReprioritiserState, now: float) -> None:
        reconciler = GateReconciler(dict(state.gates_applied))
        commands = reconciler.plan(snapshot.heartbeats, state.policy, now,
                                   self.config.heartbeat_max_age_s)
        if commands:
            try:
                send_gate_commands(self.app, commands)
            except Exception:  # noqa: BLE001 - retried next cycle (applied stays as it was)
                log.exception("could not send gate commands")
                return
        state.gates_applied = reconciler.applied

    def _scale(self, plans: list[Plan]) -> None:
        # The planner's figure is only reported (decisions table) unless a hook acts on it.
        if self.scaling_hook is None or not plans:
            return
        try:
            self.scaling_hook(plans[-1])
        except Exception:  # noqa: BLE001 - a scaler's failure must not stop scheduling
            log.exception("the scaling hook failed")

    def _record_time(self, seconds: float) -> None:
        CYCLE_SECONDS.observe(seconds)
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.lpush(CYCLES_KEY, f"{seconds:.6f}")
            pipe.ltrim(CYCLES_KEY, 0, NUM_CYCLES_KEPT - 1)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not record the cycle time", exc_info=True)


def read_cycle_seconds(client: redis.Redis) -> list[float]:
    """The latest cycle durations (newest first, up to ``NUM_CYCLES_KEPT``)."""
    return [float(x) for x in client.lrange(CYCLES_KEY, 0, -1)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, math.ceil(q / 100.0 * len(ordered)) - 1)
    return ordered[min(k, len(ordered) - 1)]


# ---- the process-wide reprioritiser and the task ---------------------------------------------


def load_scaling_hook(spec: str | None) -> Callable[[Plan], None] | None:
    """``"package.module:function"`` (``SLAQ_SCALING_HOOK``), called with each new
    :class:`~slaq.platform.snapshot.Plan`; None when unset."""
    if not spec:
        return None
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"scaling hook must look like 'package.module:function', got {spec!r}")
    hook = getattr(importlib.import_module(module), name)
    if not callable(hook):
        raise ValueError(f"scaling hook {spec!r} is not callable")
    return hook


def build_reprioritiser(settings: Settings, app: Celery | None = None,
                        config: PolicyConfig | None = None) -> Reprioritiser:
    """A reprioritiser over ``settings``' services (their URLs must be resolved)."""
    from slaq.platform.db import session_factory
    from slaq.tasks.app import create_app
    from slaq.tasks.config import broker_url_of

    if not settings.database_url or not settings.redis_url:
        raise ValueError("the reprioritiser needs database_url and redis_url")
    client = redis.Redis.from_url(settings.redis_url)
    broker = broker_url_of(settings)
    depths = BrokerDepths(broker, client if broker == settings.redis_url else None,
                          fifo=settings.fifo)
    return Reprioritiser(
        redis_client=client, session_factory=session_factory(settings.database_url),
        app=app or create_app(settings), tiers=TierTable.from_file(settings.tiers_file),
        config=config or policy_config_from_env(), depths=depths,
        interval_s=settings.reprioritise_interval_s,
        # Past its lease (plus a heartbeat's slack), an unclaimed hand-off is lost.
        handoff_timeout_s=settings.lease_ttl_s + settings.heartbeat_ttl_s,
        scaling_hook=load_scaling_hook(os.environ.get("SLAQ_SCALING_HOOK")))


_current: Reprioritiser | None = None
_current_lock = threading.Lock()


def set_current(reprioritiser: Reprioritiser | None) -> None:
    """Install the process's reprioritiser (``run_beat`` does; tests may)."""
    global _current
    with _current_lock:
        _current = reprioritiser


def current() -> Reprioritiser:
    """The process's reprioritiser, built from ``SLAQ_*`` on first use."""
    global _current
    with _current_lock:
        if _current is None:
            from slaq.platform.services import resolve_settings

            _current = build_reprioritiser(resolve_settings(Settings.from_env()))
        return _current


@shared_task(name=REPRIORITISE_TASK, ignore_result=True)
def reprioritise() -> str:
    """One reprioritiser cycle (beat sends this every ``reprioritise_interval_s``)."""
    return current().cycle().summary()


def schedule_entry(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat schedule entry; a cycle not started within two intervals is dropped."""
    interval = settings.reprioritise_interval_s
    return {"reprioritise": {
        "task": REPRIORITISE_TASK, "schedule": interval,
        "options": {"queue": CONTROL_QUEUE, "expires": max(1.0, 2 * interval)}}}
