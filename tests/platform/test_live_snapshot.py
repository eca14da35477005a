"""The live snapshot from real Redis heartbeats, real kombu queues and a real ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from slaq.gpu_workers.heartbeat import publish
from slaq.platform import ledger
from slaq.platform.decisions import remember_tickets
from slaq.platform.live_snapshot import BrokerDepths, LiveSnapshotSource, read_heartbeats
from slaq.platform.policy import PolicyConfig
from slaq.platform.pressure import Heartbeat
from slaq.platform.settings import Settings
from slaq.platform.snapshot import Reticket
from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.tasks.app import create_app
from slaq.tasks.tickets import send_prefill_ticket

TIERS = TierTable()
CONFIG = PolicyConfig(orphan_timeout_s=30.0, heartbeat_max_age_s=3.0)


@pytest.fixture(scope="module")
def db_url(module_database_url: str) -> str:
    """The module's own database: the session's has other tests' rows (and the web tests'
    scripted worker claims queued ones)."""
    return module_database_url


@pytest.fixture()
def factory(clean_ledger):
    return clean_ledger


@pytest.fixture()
def rurl(private_redis_url: str) -> str:
    return private_redis_url


@pytest.fixture()
def r(rurl: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(rurl)
    yield client
    client.close()


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def add(factory, tier: str, received: float, *, max_tokens: int = 8, n_prompt: int = 5) -> str:
    with factory() as s:
        row = ledger.create_request(
            s, kind="completion", model="m", tier_used=tier,
            ttft_target_ms=TIERS[tier].ttft_ms, tpot_target_ms=TIERS[tier].tpot_ms,
            prompt_token_ids=list(range(n_prompt)), params={"max_tokens": max_tokens},
            received_at=at(received))
        return row.id


def test_heartbeats_are_read_back_and_bad_ones_skipped(r: redis.Redis) -> None:
    now = time.time()
    publish(r, Heartbeat("p1", "prefill", num_blocks_total=10, num_blocks_used=3, time=now), 5)
    publish(r, Heartbeat("d1", "decode", num_blocks_total=10, num_blocks_used=9, time=now), 5)
    r.hset("hb:broken", mapping={"worker": "broken", "role": "nonsense"})
    got = {hb.worker: hb for hb in read_heartbeats(r)}
    assert set(got) == {"p1", "d1"}
    assert got["d1"].pressure == pytest.approx(0.9)
    assert got["p1"].role == "prefill"


def test_broker_depth_counts_every_priority_sub_queue(rurl: str, r: redis.Redis) -> None:
    app = create_app(Settings(database_url="postgresql://unused", redis_url=rurl))
    for i, priority in enumerate((0, 3, 3, 9)):
        send_prefill_ticket(f"x{i}", 1, "default", app=app, priority=priority, tiers=TIERS)
    send_prefill_ticket("y", 1, "flex", app=app, tiers=TIERS)
    depths = BrokerDepths(rurl).read()
    assert depths == {"priority": 0, "default": 4, "flex": 1, "batch": 0}
    # kombu keeps one Redis list per priority; the count is over all of them.
    assert r.llen("prefill.default") < 4


def test_broker_depth_unknown_when_unreachable() -> None:
    depths = BrokerDepths("redis://127.0.0.1:1/0").read()
    assert depths == dict.fromkeys(TIER_NAMES)


def test_snapshot_from_ledger_heartbeats_and_queues(factory, rurl: str, r: redis.Redis) -> None:
    now = time.time()
    pri_at_risk = add(factory, "priority", now - 0.7)
    add(factory, "priority", now - 0.1)  # fresh: plenty of slack
    add(factory, "priority", now - 2.0)  # past its target: hopeless, not aged
    dflt_at_risk = add(factory, "default", now - 2.0, n_prompt=7)
    old = add(factory, "default", now - 100.0)  # ticket lost long ago
    dead_owned = add(factory, "default", now - 50.0)
    live_owned = add(factory, "default", now - 50.0)
    handed_off = add(factory, "default", now - 50.0)  # its decode ticket never came
    with factory() as s:
        assert ledger.start_prefill(s, dead_owned, 1, "gone-1", at=at(now - 40))
        assert ledger.start_prefill(s, live_owned, 1, "p1", at=at(now - 40))
        assert ledger.record_first_token(s, live_owned, 1, "p1", at=at(now - 5))
        assert ledger.start_prefill(s, handed_off, 1, "p1", at=at(now - 40))
        assert ledger.record_first_token(s, handed_off, 1, "p1", at=at(now - 39))
    publish(r, Heartbeat("p1", "prefill", num_blocks_total=10, time=now), 5)
    app = create_app(Settings(database_url="postgresql://unused", redis_url=rurl))
    send_prefill_ticket(dflt_at_risk, 1, "default", app=app, tiers=TIERS)
    remember_tickets(r, [(Reticket(dflt_at_risk, 1, "priority", 0, "age"), now - 1.0)], 60)

    source = LiveSnapshotSource(r, BrokerDepths(rurl), TIERS, CONFIG, handoff_timeout_s=33.0)
    with factory() as s:
        snap = source.build(s, now, since=now - 10.0)

    assert snap.now == now
    assert [hb.worker for hb in snap.heartbeats] == ["p1"]
    assert snap.queue("priority").num_queued == 3
    assert snap.queue("default").num_queued == 2
    assert snap.queue("default").num_prompt_tokens == 12
    assert snap.queue("default").broker_depth == 1
    queued = {q.request_id: q for q in snap.queued}
    # Aging window of each tier, plus the oldest queued default request (a ticket is missing).
    assert set(queued) == {pri_at_risk, dflt_at_risk, old}
    assert queued[dflt_at_risk].queue_tier == "priority"  # where its live ticket is
    assert queued[dflt_at_risk].priority == 0
    assert queued[old].queue_tier == "default"
    assert queued[old].ticketed_at == pytest.approx(now - 100.0)
    # The dead worker's request; and one handed off 39 s ago (past the 33 s hand-off timeout)
    # that no decode worker claimed: reported without an owner although p1 lives.
    inflight = {f.request_id: f for f in snap.inflight}
    assert set(inflight) == {dead_owned, handed_off}
    assert (inflight[dead_owned].worker, inflight[dead_owned].state) == ("gone-1", "prefilling")
    assert inflight[dead_owned].updated_at == pytest.approx(now - 40)
    assert inflight[handed_off].worker is None
    assert inflight[handed_off].updated_at == pytest.approx(now - 39)
    # Arrivals in (now - 10, now]: everything but the two received 50 and 100 s ago.
    assert snap.arrivals["priority"].num_requests == 3
    assert snap.arrivals["default"].num_requests == 1
    assert snap.arrivals["default"].num_output_tokens == 8
    assert snap.arrivals["default"].num_prompt_tokens == 7


def test_ticket_record_of_another_attempt_is_ignored(factory, rurl: str,
                                                     r: redis.Redis) -> None:
    now = time.time()
    rid = add(factory, "default", now - 2.0)
    remember_tickets(r, [(Reticket(rid, 2, "priority", 0, "age"), now)], 60)
    source = LiveSnapshotSource(r, BrokerDepths(rurl), TIERS, CONFIG)
    with factory() as s:
        snap = source.build(s, now, since=None)
    (q,) = snap.queued
    assert q.queue_tier == "default" and q.attempt == 1
    assert snap.arrivals == {}


def test_no_orphan_candidates_while_the_broker_holds_every_ticket(
        factory, rurl: str, r: redis.Redis) -> None:
    now = time.time()
    rid = add(factory, "batch", now - 500.0)
    app = create_app(Settings(database_url="postgresql://unused", redis_url=rurl))
    send_prefill_ticket(rid, 1, "batch", app=app, tiers=TIERS)
    source = LiveSnapshotSource(r, BrokerDepths(rurl), TIERS, CONFIG)
    with factory() as s:
        snap = source.build(s, now, since=now - 1)
    assert snap.queued == ()
    assert snap.queue("batch").broker_depth == 1


def test_fifo_queue_depth_is_shared_out_so_only_the_oldest_count_as_lost(
        factory, rurl: str, r: redis.Redis) -> None:
    now = time.time()
    oldest = add(factory, "flex", now - 300.0)  # its ticket was lost (say, a Redis restart)
    older = add(factory, "priority", now - 200.0)
    recent = [add(factory, "default", now - 100.0), add(factory, "batch", now - 90.0)]
    app = create_app(Settings(database_url="postgresql://unused", redis_url=rurl))
    for rid, tier in ((older, "priority"), (recent[0], "default"), (recent[1], "batch")):
        send_prefill_ticket(rid, 1, tier, app=app, tiers=TIERS, policy="fifo")
    depths = BrokerDepths(rurl, fifo=True)
    assert depths.read_fifo() == 3
    source = LiveSnapshotSource(r, depths, TIERS, CONFIG)
    with factory() as s:
        snap = source.build(s, now, since=None)
    # 4 queued in the ledger, 3 tickets in the one queue: the oldest-ticketed one is missing.
    assert {t: snap.queue(t).broker_depth for t in TIER_NAMES} == {
        "priority": 1, "default": 1, "flex": 0, "batch": 1}
    assert oldest in {q.request_id for q in snap.queued}
    send_prefill_ticket(oldest, 1, "flex", app=app, tiers=TIERS, policy="fifo")
    with factory() as s:
        snap = source.build(s, now, since=None)
    assert all(snap.queue(t).broker_depth == snap.queue(t).num_queued for t in TIER_NAMES)
