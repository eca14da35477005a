"""Decisions: one scheduling_decisions row per action; published state and its readers.

Real PostgreSQL (a database of this module's own, so rows of other tests never mix in) and a
real Redis db of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import MappingProxyType

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import select, text

from slaq.platform.db import session_factory
from slaq.platform.decisions import (
    AdmissionCache,
    AdmissionState,
    AdmissionVerdict,
    budget_key,
    choose_decode_worker,
    decision_row,
    publish_state,
    read_admission,
    read_gates,
    read_routing,
    read_tickets,
    record_decisions,
    remember_tickets,
)
from slaq.platform.models import SchedulingDecision
from slaq.platform.pressure import Heartbeat
from slaq.platform.snapshot import Plan, Reticket, SetAdmission, SetGate, SetRouting
from slaq.platform.tiers import TIER_NAMES


@pytest.fixture(scope="module")
def db_url(module_database_url: str) -> str:
    """The module's own database: the session's has other tests' rows (and the web tests'
    scripted worker claims queued ones)."""
    return module_database_url


@pytest.fixture()
def r(private_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(private_redis_url)
    yield client
    client.close()


def all_kinds() -> list:
    return [
        SetGate("prefill", "flex", False, "pressure high", {"pressure": 0.91}),
        Reticket("req-1", 2, "priority", 0, "slack small", "age", {"slack_s": 0.4}),
        Reticket("req-2", 3, "default", 3, "lost ticket", "orphan", {"tier": "default"}),
        SetRouting(MappingProxyType({"d1": 0.75, "d2": 0.25}), "weights", {"d1": 0.1}),
        SetAdmission("default", "downgrade", math.inf, "too slow", budget_tokens=0,
                     downgrade_to="flex", retry_after_s=120),
        Plan(2, 3, 4, "arrivals", {"prompt_tok_s": 10.0}),
    ]


def test_one_decision_row_per_action(db_url: str) -> None:
    factory = session_factory(db_url)
    with factory() as s:
        s.execute(text("TRUNCATE scheduling_decisions"))
        s.commit()
    actions = all_kinds()
    at = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    with factory() as s:
        n = record_decisions(s, actions, at, {1: {"applied": True}, 2: {"applied": False}})
        s.commit()
    assert n == len(actions)
    with factory() as s:
        rows = s.scalars(select(SchedulingDecision).order_by(SchedulingDecision.id)).all()
    assert [(r.kind, r.target) for r in rows] == [
        ("gate", "prefill:flex"), ("age", "req-1"), ("orphan", "req-2"), ("routing", "decode"),
        ("admission", "default"), ("plan", "cluster")]
    assert all(r.at == at for r in rows)
    assert [r.reason for r in rows] == [a.reason for a in actions]
    gate, age, orphan, routing, admission, plan = (r.inputs for r in rows)
    assert gate == {"pressure": 0.91, "role": "prefill", "tier": "flex", "open": False}
    assert age["attempt"] == 2 and age["queue_tier"] == "priority" and age["applied"] is True
    assert orphan["applied"] is False and orphan["tier"] == "default"
    assert routing["weights"] == {"d1": 0.75, "d2": 0.25}
    # JSONB has no Infinity: an unbounded prediction is stored as null.
    assert admission["predicted_ttft_ms"] is None and admission["downgrade_to"] == "flex"
    assert admission["budget_tokens"] == 0
    assert plan["num_decode"] == 3 and plan["prompt_tok_s"] == 10.0


def test_record_needs_aware_time(db_url: str) -> None:
    with session_factory(db_url)() as s, pytest.raises(ValueError):
        record_decisions(s, all_kinds(), datetime(2026, 1, 1))


def test_readers_default_to_no_decision(r: redis.Redis) -> None:
    assert read_gates(r) == {}
    assert read_routing(r) == {}
    assert read_admission(r) == {t: AdmissionState(t) for t in TIER_NAMES}
    assert all(a.mode == "accept" for a in read_admission(r).values())


def test_publish_replaces_the_whole_state(r: redis.Redis) -> None:
    down = AdmissionState("default", "downgrade", 100, 4500.0, "flex", 2, 100.0)
    publish_state(r, gates={("prefill", "flex"): False, ("prefill", "default"): True},
                  routing={"d1": 0.6, "d2": 0.4}, admission={"default": down})
    assert read_gates(r) == {("prefill", "flex"): False, ("prefill", "default"): True}
    assert read_routing(r) == {"d1": 0.6, "d2": 0.4}
    adm = read_admission(r)
    assert adm["default"] == down
    assert adm["priority"].mode == "accept"
    # The next cycle's state replaces it entirely (a worker that left keeps no weight).
    publish_state(r, gates={("prefill", "flex"): True}, routing={"d2": 1.0}, admission={})
    assert read_gates(r) == {("prefill", "flex"): True}
    assert read_routing(r) == {"d2": 1.0}
    assert read_admission(r)["default"].mode == "accept"


def test_admission_state_validates() -> None:
    with pytest.raises(ValueError):
        AdmissionState("default", "maybe")
    with pytest.raises(ValueError):
        AdmissionState("default", "downgrade", downgrade_to=None)
    with pytest.raises(ValueError):
        AdmissionState("flex", "refuse", budget_tokens=-1)
    a = AdmissionState.from_action(
        SetAdmission("flex", "refuse", math.inf, "full", 50, None, 7), at=5.0)
    assert a == AdmissionState("flex", "refuse", 50, None, None, 7, 5.0)


def test_admission_cache_reads_at_most_once_per_ttl(r: redis.Redis) -> None:
    cache = AdmissionCache(r, ttl_s=60.0)
    assert cache.get("flex").mode == "accept"
    publish_state(r, gates={}, routing={},
                  admission={"flex": AdmissionState("flex", "refuse", 0, 9e4, None, 30, 1.0)})
    assert cache.get("flex").mode == "accept"  # still the cached read
    fresh = AdmissionCache(r, ttl_s=0.0)
    assert fresh.get("flex").mode == "refuse"
    assert fresh.get("flex").retry_after_s == 30


def test_admit_counts_the_budget_down_then_applies_the_fallback(r: redis.Redis) -> None:
    publish_state(r, gates={}, routing={}, admission={
        "default": AdmissionState("default", "downgrade", 100, 5000.0, "flex", 3, 1.0),
        "flex": AdmissionState("flex", "refuse", 10, 60000.0, None, 45, 1.0),
        "batch": AdmissionState("batch", "refuse", None, None, None, 1, 1.0)})
    cache = AdmissionCache(r, ttl_s=0.0)
    assert cache.admit("default", 60) == AdmissionVerdict("default")
    assert cache.admit("default", 40) == AdmissionVerdict("default")  # exactly the budget
    late = cache.admit("default", 1)
    assert (late.tier, late.refused) == ("flex", False) and "default" in late.reason
    assert cache.admit("flex", 10).refused is False
    refused = cache.admit("flex", 1)
    assert refused.refused and refused.retry_after_s == 45 and refused.tier == "flex"
    assert cache.admit("priority", 10**6) == AdmissionVerdict("priority")  # no decision
    assert cache.admit("batch", 10**6) == AdmissionVerdict("batch")  # no budget = no limit
    # The budget expires with the cycle that set it: without a reprioritiser, admit as asked.
    assert 0 < r.pttl(budget_key("flex")) <= 10_000
    r.delete(budget_key("flex"))
    assert cache.admit("flex", 1) == AdmissionVerdict("flex")


def test_prompts_over_the_cut_fall_back_without_spending_the_budget(r: redis.Redis) -> None:
    cut = AdmissionState("default", "downgrade", 100, 5000.0, "flex", 3, 1.0, 50)
    assert AdmissionState.from_json("default", cut.to_json()) == cut
    action = SetAdmission("default", "downgrade", 5000.0, "short", 100, "flex", 3,
                          {"ahead_tokens": 7}, max_prompt_tokens=50)
    assert AdmissionState.from_action(action, at=1.0) == cut
    publish_state(r, gates={}, routing={}, admission={"default": cut})
    cache = AdmissionCache(r, ttl_s=0.0)
    long = cache.admit("default", 51)
    assert (long.tier, long.refused) == ("flex", False) and "over 50 tokens" in long.reason
    assert int(r.get(budget_key("default"))) == 100  # the long prompt took nothing
    assert cache.admit("default", 50) == AdmissionVerdict("default")
    assert cache.admit("default", 50) == AdmissionVerdict("default")
    assert cache.admit("default", 1).tier == "flex"  # now the budget itself is spent
    # Without a live budget (no reprioritiser) the cut does not apply either.
    r.delete(budget_key("default"))
    assert cache.admit("default", 10**6) == AdmissionVerdict("default")
    with pytest.raises(ValueError):
        AdmissionState("default", "downgrade", 100, None, "flex", max_prompt_tokens=0)
    with pytest.raises(ValueError):
        SetAdmission("default", "downgrade", 1.0, "x", 100, "flex", max_prompt_tokens=0)
    # The ledger row keeps the typed cut among the decision's inputs.
    assert decision_row(action)["inputs"]["max_prompt_tokens"] == 50
    assert decision_row(action)["inputs"]["ahead_tokens"] == 7


def test_a_request_that_does_not_fit_the_budget_falls_back_and_takes_nothing(
        r: redis.Redis) -> None:
    # The simulator's numbers (tests/sim/test_simulator.py): one rule, takes_budget.
    publish_state(r, gates={}, routing={}, admission={
        "flex": AdmissionState("flex", "refuse", 250, 60000.0, None, 5, 1.0)})
    cache = AdmissionCache(r, ttl_s=0.0)
    assert cache.admit("flex", 100) == AdmissionVerdict("flex")
    assert cache.admit("flex", 200).refused
    assert int(r.get(budget_key("flex"))) == 150  # the refused request took nothing
    assert cache.admit("flex", 150) == AdmissionVerdict("flex")  # so this one still fits
    assert cache.admit("flex", 50).refused
    assert int(r.get(budget_key("flex"))) == 0  # never below zero
    assert 0 < r.pttl(budget_key("flex"))  # taking keeps the cycle's expiry


def test_admission_cache_admits_when_redis_is_down() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    cache = AdmissionCache(dead, ttl_s=0.0)
    assert cache.get("default") == AdmissionState("default")
    assert cache.admit("flex", 100) == AdmissionVerdict("flex")


def hb(worker: str, pressure_used: int, *, role: str = "decode", t: float = 100.0) -> Heartbeat:
    return Heartbeat(worker=worker, role=role, num_blocks_total=100,
                     num_blocks_used=pressure_used, time=t)


def test_choose_decode_worker_follows_weights_among_live_workers() -> None:
    hbs = [hb("d1", 10), hb("d2", 90), hb("p1", 0, role="prefill"), hb("old", 0, t=50.0)]
    weights = {"d1": 0.2, "d2": 0.8, "old": 5.0}
    # u below d1's share of the live weights picks d1, above it d2 ("old" is dead).
    assert choose_decode_worker(weights, hbs, now=100.5, max_age_s=3, u=0.1) == "d1"
    assert choose_decode_worker(weights, hbs, now=100.5, max_age_s=3, u=0.5) == "d2"
    assert choose_decode_worker(weights, hbs, 100.5, 3, 0.5, exclude=("d2",)) == "d1"


def test_choose_decode_worker_without_weights_picks_lowest_pressure() -> None:
    hbs = [hb("d1", 50), hb("d2", 20)]
    assert choose_decode_worker({}, hbs, now=100.0, max_age_s=3, u=0.99) == "d2"
    assert choose_decode_worker({"gone": 1.0}, hbs, now=100.0, max_age_s=3, u=0.0) == "d2"
    assert choose_decode_worker({}, [hb("d1", 0, t=0.0)], now=100.0, max_age_s=3, u=0) is None


def test_tickets_are_remembered_with_a_ttl(r: redis.Redis) -> None:
    now = time.time()
    remember_tickets(r, [(Reticket("a", 2, "priority", 0, "age"), now)], ttl_s=30)
    got = read_tickets(r, ["a", "b"])
    assert got == {"a": {"attempt": 2, "queue_tier": "priority", "priority": 0, "at": now}}
    assert 0 < r.pttl("ticket:a") <= 30_000
    assert read_tickets(r, []) == {}
