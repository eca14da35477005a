"""The reprioritiser: same policy function as the simulator, one decision row per action, the
lock, state between cycles, gate reconciliation, and — with real worker and beat processes —
an orphaned request re-ticketed and finished while a gate closes and reopens on a real worker.
"""

from __future__ import annotations

import dis
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, ModuleType

import pytest
import redis
from sqlalchemy import select

import slaq.platform.policy as policy
import slaq.sim.simulator as simulator
import slaq.tasks.reprioritise as live
from slaq.gpu_workers.heartbeat import publish
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.decisions import read_admission, read_gates, read_routing, read_tickets
from slaq.platform.live_snapshot import BrokerDepths
from slaq.platform.models import RequestRow, SchedulingDecision
from slaq.platform.policy import PolicyConfig, PolicyState
from slaq.platform.pressure import Heartbeat
from slaq.platform.settings import Settings
from slaq.platform.snapshot import Plan, Reticket, SetGate
from slaq.platform.tiers import TierTable
from slaq.tasks.app import create_app
from slaq.tasks.control import GateReconciler, bump_attempts
from slaq.tasks.reprioritise import (
    LOCK_KEY,
    Reprioritiser,
    ReprioritiserState,
    load_scaling_hook,
    load_state,
    policy_config_from_env,
    read_cycle_seconds,
)

TIERS = TierTable()


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db_url(module_database_url: str) -> str:
    """The module's own database: the session's has other tests' rows (and the web tests'
    scripted worker claims queued ones)."""
    return module_database_url


@pytest.fixture()
def rurl(private_redis_url: str) -> str:
    return private_redis_url


@pytest.fixture()
def factory(clean_ledger):
    return clean_ledger


@pytest.fixture()
def r(rurl: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(rurl)
    yield client
    client.close()


def make_reprioritiser(db_url: str, rurl: str, r: redis.Redis,
                       config: PolicyConfig | None = None) -> Reprioritiser:
    settings = Settings(database_url=db_url, redis_url=rurl)
    return Reprioritiser(redis_client=r, session_factory=session_factory(db_url),
                         app=create_app(settings), tiers=TIERS,
                         config=config or PolicyConfig(), depths=BrokerDepths(rurl, r))


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def add(factory, tier: str, received: float) -> str:
    with factory() as s:
        return ledger.create_request(
            s, kind="completion", model="m", tier_used=tier,
            ttft_target_ms=TIERS[tier].ttft_ms, tpot_target_ms=TIERS[tier].tpot_ms,
            prompt_token_ids=[1, 2, 3, 4, 5], params={"max_tokens": 4},
            received_at=at(received)).id


def decisions(factory) -> list[SchedulingDecision]:
    with factory() as s:
        return list(s.scalars(select(SchedulingDecision).order_by(SchedulingDecision.id)))


def busy_cluster(r: redis.Redis, now: float) -> None:
    """One prefill worker and two full decode workers (mean pressure 0.995: every gate's
    close mark, default's 0.98 included, with room to spare)."""
    publish(r, Heartbeat("p1", "prefill", num_blocks_total=100, host="h", pid=11, time=now), 10)
    publish(r, Heartbeat("d1", "decode", num_blocks_total=100, num_blocks_used=99, host="h",
                         time=now), 10)
    publish(r, Heartbeat("d2", "decode", num_blocks_total=100, num_blocks_used=100, host="h",
                         time=now), 10)


# ---- same policy function -----------------------------------------------------------------


def decide_calls(module: ModuleType) -> list[tuple[str, object]]:
    """Every ``decide`` the module's functions and methods load, resolved to the object they
    would call: a global ``decide`` or ``<global>.decide`` (e.g. ``policy.decide``)."""
    functions = [f for f in vars(module).values() if inspect.isfunction(f)
                 and f.__module__ == module.__name__]
    for cls in vars(module).values():
        if inspect.isclass(cls) and cls.__module__ == module.__name__:
            functions += [f for f in vars(cls).values() if inspect.isfunction(f)]
    found = []
    for f in functions:
        prev = None
        for ins in dis.get_instructions(f):
            if ins.opname == "LOAD_GLOBAL" and ins.argval == "decide":
                found.append((f.__qualname__, f.__globals__["decide"]))
            elif (ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval == "decide"
                  and prev is not None and prev.opname == "LOAD_GLOBAL"):
                found.append((f.__qualname__, f.__globals__[prev.argval].decide))
            prev = ins
    return found


def test_beat_job_and_simulator_call_the_same_policy_function(factory, db_url, rurl, r) -> None:
    live_calls = decide_calls(live)
    sim_calls = decide_calls(simulator)
    assert [name for name, _ in live_calls] == ["Reprioritiser._run"]
    assert sim_calls, "the simulator calls no decide()"
    assert all(fn is policy.decide for _, fn in live_calls + sim_calls)
    # ...and what the live cycle applied is exactly what decide() returns for its snapshot.
    now = time.time()
    busy_cluster(r, now)
    add(factory, "default", now - 2.0)
    result = make_reprioritiser(db_url, rurl, r).cycle(now)
    assert result.ran and result.snapshot is not None and result.previous is not None
    expected, _ = policy.decide(result.snapshot, result.previous, TIERS, PolicyConfig())
    assert result.actions == expected
    assert [(d.kind, d.target) for d in decisions(factory)] == [(a.kind, a.target)
                                                                  for a in expected]


# ---- a cycle ------------------------------------------------------------------------------


def test_cycle_applies_records_and_publishes(factory, db_url, rurl, r) -> None:
    now = time.time()
    busy_cluster(r, now)
    aged = add(factory, "default", now - 2.0)  # slack 1 s < 50% of 3 s: age it
    orphan = add(factory, "flex", now - 120.0)  # no ticket anywhere, queued for 2 minutes
    rep = make_reprioritiser(db_url, rurl, r)
    result = rep.cycle(now)

    kinds = Counter(a.kind for a in result.actions)
    assert kinds["gate"] >= 3 and kinds["age"] == 1 and kinds["orphan"] == 1
    assert kinds["routing"] == 1 and kinds["plan"] == 1
    rows = decisions(factory)
    assert len(rows) == len(result.actions)
    assert Counter(row.kind for row in rows) == kinds
    assert all(row.inputs["applied"] for row in rows if row.kind in ("age", "orphan"))
    assert result.num_sent == 2

    with factory() as s:
        assert s.get(RequestRow, aged).attempt == 2
        assert s.get(RequestRow, orphan).attempt == 2
    # The aged ticket sits on the priority queue; the orphan's on its own.
    depths = BrokerDepths(rurl, r).read()
    assert depths["priority"] == 1 and depths["flex"] == 1
    assert read_tickets(r, [aged])[aged]["queue_tier"] == "priority"

    gates = read_gates(r)
    assert gates[("prefill", "default")] is False and gates[("prefill", "priority")] is True
    routing = read_routing(r)
    assert set(routing) == {"d1", "d2"} and routing["d1"] > routing["d2"]
    assert set(read_admission(r)) == {"priority", "default", "flex", "batch"}
    state = load_state(r)
    assert state is not None and ("prefill", "default") in state.policy.pressure_closed
    assert state.gates_applied == {"p1": {"pid": 11, "closed": ["batch", "default", "flex"]}}
    cycles = read_cycle_seconds(r)
    assert cycles and cycles[0] == pytest.approx(result.seconds, abs=1e-5)

    # Next cycle: the gate stays closed (no new gate action), nothing is aged twice.
    again = rep.cycle(now + 0.5)
    assert not [a for a in again.actions if isinstance(a, SetGate)]
    assert not [a for a in again.actions if isinstance(a, Reticket)]
    assert len(decisions(factory)) == len(result.actions) + len(again.actions)


def test_reticket_of_a_request_claimed_meanwhile_is_refused(factory) -> None:
    now = time.time()
    rid = add(factory, "default", now - 2.0)
    dup = add(factory, "default", now - 2.0)
    # The policy saw both queued at attempt 1; a worker claimed the first one since.
    with factory() as s:
        assert ledger.start_prefill(s, rid, 1, "p1", at=at(now))
    with factory() as s:
        applied = bump_attempts(s, [Reticket(rid, 2, "priority", 0, "age"),
                                    Reticket(dup, 2, "priority", 0, "age"),
                                    Reticket(dup, 2, "priority", 0, "age")])
        s.commit()
    assert applied == [False, True, False]  # the duplicate action finds attempt 2 already
    with factory() as s:
        row = s.get(RequestRow, rid)
        assert (row.state, row.attempt, row.prefill_worker) == ("prefilling", 1, "p1")
        assert s.get(RequestRow, dup).attempt == 2


def test_orphan_of_a_dead_worker_is_retried_from_its_claimed_state(factory) -> None:
    now = time.time()
    rid = add(factory, "flex", now - 60.0)
    with factory() as s:
        assert ledger.start_prefill(s, rid, 1, "gone", at=at(now - 30))
    orphan = Reticket(rid, 2, "flex", 6, "worker gone", "orphan",
                      {"state": "prefilling", "worker": "gone"})
    with factory() as s:
        assert bump_attempts(s, [orphan]) == [True]
        s.commit()
    with factory() as s:
        row = s.get(RequestRow, rid)
        assert (row.state, row.attempt, row.prefill_worker) == ("queued", 2, None)
        assert row.error == "worker gone"


def test_planner_figure_goes_to_the_scaling_hook(factory, db_url, rurl, r) -> None:
    plans: list[Plan] = []
    rep = make_reprioritiser(db_url, rurl, r)
    rep.scaling_hook = plans.append
    rep.cycle()
    assert len(plans) == 1 and plans[0].num_prefill >= 1
    rep.cycle()
    assert len(plans) == 1  # same figure, no new plan
    assert load_scaling_hook("slaq.tasks.reprioritise:percentile") is live.percentile
    assert load_scaling_hook(None) is None
    with pytest.raises(ValueError):
        load_scaling_hook("no-colon")


def test_only_one_cycle_at_a_time(factory, db_url, rurl, r) -> None:
    rep = make_reprioritiser(db_url, rurl, r)
    held = r.lock(LOCK_KEY, timeout=5)
    assert held.acquire(blocking=False)
    try:
        assert rep.cycle().ran is False
        assert decisions(factory) == []
    finally:
        held.release()
    assert rep.cycle().ran is True


def test_state_survives_json() -> None:
    state = ReprioritiserState(
        PolicyState(time=12.5, pressure_closed=frozenset({("prefill", "flex")}),
                    release_closed=frozenset({"batch"}),
                    admission=MappingProxyType({"default": ("downgrade", 1200)}),
                    rates=MappingProxyType({"default": (1.0, 20.0, 30.0)}), plan=(1, 2, 3)),
        {"p1": {"pid": 3, "closed": ["flex"]}})
    back = ReprioritiserState.from_json(state.to_json())
    assert back == state


def test_policy_config_from_env() -> None:
    cfg = policy_config_from_env({"SLAQ_POLICY": "fifo",
                                  "SLAQ_POLICY_OVERRIDES": json.dumps(
                                      {"orphan_timeout_s": 5,
                                       "watermarks": {"flex": [0.5, 0.4]}})})
    assert cfg.enable_gates is False and cfg.orphan_timeout_s == 5
    assert cfg.watermarks == {"flex": (0.5, 0.4)}
    assert policy_config_from_env({}) == PolicyConfig()
    with pytest.raises(ValueError):
        policy_config_from_env({"SLAQ_POLICY": "lifo"})


# ---- gate reconciliation ------------------------------------------------------------------


def test_gate_reconciler_tells_each_worker_once_and_again_after_a_restart() -> None:
    closed = PolicyState(pressure_closed=frozenset({("prefill", "flex")}))
    p1 = Heartbeat("p1", "prefill", host="h", pid=1, time=10.0)
    d1 = Heartbeat("d1", "decode", host="h", pid=2, time=10.0)
    rec = GateReconciler()
    first = rec.plan([p1, d1], closed, now=10.0, max_age_s=3)
    # New to the reconciler: told its whole set (decode workers have no prefill gates).
    assert first.cancel == {"prefill.flex": ["p1@h"]}
    assert set(first.add) == {"prefill.priority", "prefill.default", "prefill.batch"}
    assert not rec.plan([p1, d1], closed, now=10.5, max_age_s=3)
    reopened = rec.plan([p1], PolicyState(), now=11.0, max_age_s=3)
    assert reopened.add == {"prefill.flex": ["p1@h"]} and not reopened.cancel
    restarted = replace(p1, pid=99)
    again = rec.plan([restarted], closed, now=12.0, max_age_s=3)
    assert again.cancel == {"prefill.flex": ["p1@h"]}
    # A worker whose heartbeat went stale is forgotten.
    assert not rec.plan([replace(p1, time=0.0)], closed, now=12.0, max_age_s=3)
    assert rec.applied == {}


# ---- real processes -----------------------------------------------------------------------


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


REPO = Path(__file__).resolve().parents[2]


def start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A child in the log's directory (nothing it writes lands in the checkout)."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps it
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, *args], env={**env, "PYTHONPATH": path},
                            stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FakeDecodeWorker:
    """A heartbeat of a full decode worker, refreshed in a thread (raises decode pressure)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            publish(self.r, Heartbeat("full-decoder", "decode", num_blocks_total=10,
                                      num_blocks_used=10, host="nowhere", time=time.time()), 2)
            self._stop.wait(0.3)

    def __enter__(self) -> FakeDecodeWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.r.delete("hb:full-decoder")


@pytest.mark.slow
def test_beat_recovers_an_orphan_and_gates_a_real_worker(factory, db_url, rurl, r,
                                                         tiny_model_path, tmp_path) -> None:
    env = {**os.environ, "SLAQ_DATABASE_URL": db_url, "SLAQ_REDIS_URL": rurl,
           "SLAQ_BROKER_URL": rurl, "SLAQ_MODEL": str(tiny_model_path),
           "SLAQ_DATA_DIR": str(tmp_path), "SLAQ_REPRIORITISE_INTERVAL_S": "0.3",
           "SLAQ_HEARTBEAT_INTERVAL_S": "0.3", "SLAQ_HEARTBEAT_TTL_S": "2",
           # flex closes once mean decode pressure reaches 0.4 and reopens at 0.3 or below.
           "SLAQ_POLICY_OVERRIDES": json.dumps({"watermarks": {"flex": [0.4, 0.3]}}),
           "PYTHONUNBUFFERED": "1"}
    name = f"w{uuid.uuid4().hex[:6]}"
    worker = start(["-m", "slaq.gpu_workers.worker", "--role", "both", "--name", name,
                    "--concurrency", "4", "--num-blocks", "64"], env, tmp_path / "worker.log")
    beat = start(["-m", "slaq.tasks.beat"], env, tmp_path / "beat.log")
    app = create_app(Settings(database_url=db_url, redis_url=rurl))
    node = f"{name}@{socket.gethostname()}"

    def consumed() -> set[str]:
        replies = app.control.inspect(destination=[node], timeout=1.0).active_queues() or {}
        return {q["name"] for q in replies.get(node, [])}

    try:
        wait_for(lambda: r.exists(f"hb:{name}"), 120, "the worker's heartbeat")
        # Queued two minutes ago, its ticket never sent: only the reprioritiser can save it.
        rid = add(factory, "default", time.time() - 120.0)

        def finished() -> RequestRow | None:
            with factory() as s:
                row = s.get(RequestRow, rid)
                return row if row.state == "finished" else None

        row = wait_for(finished, 60, "the orphan to finish")
        assert row.attempt == 2 and row.completion_tokens == 4
        orphans = [d for d in decisions(factory) if d.kind == "orphan"]
        assert [(d.target, d.inputs["applied"]) for d in orphans] == [(rid, True)]

        # Gates through Celery remote control on the real worker, with hysteresis.
        # (Before the worker's first heartbeat, no decode capacity at all reads as pressure
        # 1.0, so flex may have closed and reopened once already.)
        assert "prefill.flex" in wait_for(consumed, 30, "the worker's queues")
        num_before = len(decisions(factory))
        with FakeDecodeWorker(r):  # mean pressure (1.0 + 0.0) / 2 = 0.5 >= 0.4
            wait_for(lambda: "prefill.flex" not in consumed(), 30, "flex gate closed")
            assert read_gates(r)[("both", "flex")] is False
            assert "prefill.default" in consumed()
        wait_for(lambda: "prefill.flex" in consumed(), 30, "flex gate reopened")
        gate_rows = [(d.target, d.inputs["open"]) for d in decisions(factory)[num_before:]
                     if d.kind == "gate"]
        assert gate_rows == [("both:flex", False), ("both:flex", True)]
        assert len(read_cycle_seconds(r)) >= 3
        assert not list(tmp_path.glob("celerybeat-schedule*"))  # beat keeps it in memory
    except BaseException:
        for path in ("worker.log", "beat.log"):
            print(f"---- {path}\n{(tmp_path / path).read_text(errors='replace')[-6000:]}")
        raise
    finally:
        stop(beat)
        stop(worker)
