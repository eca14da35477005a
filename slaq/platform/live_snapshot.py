"""Build the policy's :class:`~slaq.platform.snapshot.Snapshot` from the running stack.

Three sources, each read in one round trip where it can be:

* **heartbeats** — every ``hb:*`` hash (SCAN + one pipelined HGETALL);
* **broker depth** per ``prefill.<tier>`` queue — on Redis, LLEN of kombu's priority sub-lists
  (``<queue>``, ``<queue>\\x06\\x16<p>``) in one pipeline; on RabbitMQ, a passive declare;
* **the ledger** — per-tier counts of queued requests, the queued requests inside their tier's
  aging window (what the policy may age), the oldest queued requests of tiers whose broker
  queue holds fewer tickets than the ledger has queued requests (orphan candidates), in-flight
  requests of workers without a fresh heartbeat or handed off but never claimed by a decode
  worker, and the arrivals since the last cycle (with
  the counts, in one query).

Only what the policy can act on is loaded, so a cycle stays fast with thousands queued.
Tickets the reprioritiser re-sent are remembered in ``ticket:<id>`` (see
:mod:`slaq.platform.decisions`): that tells which queue a request's live ticket is on.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Integer, and_, case, false, func, or_, select
from sqlalchemy.orm import Session

from slaq.platform.decisions import read_tickets
from slaq.platform.keys import HEARTBEAT_PATTERN
from slaq.platform.models import DECODING, PREFILLING, QUEUED, RequestRow
from slaq.platform.policy import PolicyConfig
from slaq.platform.pressure import Heartbeat
from slaq.platform.snapshot import Arrivals, InflightRequest, QueuedRequest, QueueStats, Snapshot
from slaq.platform.tiers import TIER_NAMES, TierTable

log = logging.getLogger(__name__)

# kombu's Redis transport keeps priority p > 0 of queue q in the list q + SEP + str(p).
KOMBU_PRIORITY_SEP = "\x06\x16"
NUM_PRIORITIES = 10  # slaq.tasks.config.NUM_PRIORITIES (priority_steps = range(10))
# Orphan candidates loaded beyond the number of missing tickets (some may be too young).
ORPHAN_SLACK_ROWS = 32


def prefill_queue(tier: str) -> str:
    return f"prefill.{tier}"


def read_heartbeats(client: redis.Redis) -> list[Heartbeat]:
    """Every worker's current heartbeat; malformed or just-expired ones are skipped."""
    keys = list(client.scan_iter(match=HEARTBEAT_PATTERN, count=1000))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    out: list[Heartbeat] = []
    for key, raw in zip(keys, pipe.execute(), strict=True):
        if not raw:
            continue
        try:
            out.append(Heartbeat.from_mapping(raw))
        except ValueError:
            log.warning("skipping malformed heartbeat %r", key)
    return out


class BrokerDepths:
    """Ticket counts of the ``prefill.<tier>`` queues (None per queue when unknown).

    ``fifo``: the deployment runs the ``fifo`` policy, whose tickets of every tier share the
    one ``prefill.fifo`` queue (:meth:`read_fifo`).
    """

    def __init__(self, broker_url: str, redis_client: redis.Redis | None = None,
                 fifo: bool = False) -> None:
        self.broker_url = broker_url
        self.fifo = fifo
        scheme = broker_url.split("://", 1)[0]
        self._is_redis = scheme in ("redis", "rediss", "unix")
        self._r: redis.Redis | None = None
        if self._is_redis:
            self._r = redis_client if redis_client is not None else redis.Redis.from_url(
                broker_url)

    def read(self, tiers: tuple[str, ...] = TIER_NAMES) -> dict[str, int | None]:
        try:
            if self._r is not None:
                return self._read_redis(tiers)
            return self._read_amqp(tiers)
        except Exception:  # noqa: BLE001 - unknown depth only disables orphan detection
            log.warning("cannot read broker queue depths", exc_info=True)
            return dict.fromkeys(tiers)

    def read_fifo(self) -> int | None:
        """Tickets in the one queue of the ``fifo`` policy."""
        return self.read(("fifo",)).get("fifo")

    def _read_redis(self, tiers: tuple[str, ...]) -> dict[str, int | None]:
        assert self._r is not None
        pipe = self._r.pipeline(transaction=False)
        for tier in tiers:
            q = prefill_queue(tier)
            pipe.llen(q)
            for p in range(1, NUM_PRIORITIES):
                pipe.llen(f"{q}{KOMBU_PRIORITY_SEP}{p}")
        lengths = pipe.execute()
        return {tier: sum(lengths[i * NUM_PRIORITIES:(i + 1) * NUM_PRIORITIES])
                for i, tier in enumerate(tiers)}

    def _read_amqp(self, tiers: tuple[str, ...]) -> dict[str, int | None]:
        from kombu import Connection

        out: dict[str, int | None] = {}
        with Connection(self.broker_url) as conn:
            for tier in tiers:
                try:
                    ok = conn.default_channel.queue_declare(prefill_queue(tier), passive=True)
                    out[tier] = int(ok.message_count)
                except Exception:  # noqa: BLE001 - a queue nobody declared yet holds nothing
                    out[tier] = None
        return out

    def close(self) -> None:
        if self._r is not None:
            self._r.close()


def _ts(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class LedgerView:
    """The ledger queries of one snapshot, all in the caller's session."""

    def __init__(self, session: Session, tiers: TierTable, config: PolicyConfig) -> None:
        self.s = session
        self.tiers = tiers
        self.config = config

    def tier_stats(self, since: float | None, now: float
                   ) -> tuple[dict[str, tuple[int, int]], dict[str, Arrivals]]:
        """Per tier used, in one query: ``(num_queued, queued prompt tokens)``, and the
        arrivals received in ``(since, now]`` (none when ``since`` is None)."""
        queued = RequestRow.state == QUEUED
        columns: list[Any] = [RequestRow.tier_used, func.count().filter(queued),
                              func.coalesce(func.sum(RequestRow.prompt_tokens).filter(queued), 0)]
        where: Any = queued
        counting = since is not None and since < now
        if counting:
            assert since is not None
            arrived = and_(RequestRow.received_at > _utc(since),
                           RequestRow.received_at <= _utc(now))
            max_tokens = RequestRow.params["max_tokens"].astext.cast(Integer)
            columns += [func.count().filter(arrived),
                        func.coalesce(func.sum(RequestRow.prompt_tokens).filter(arrived), 0),
                        func.coalesce(func.sum(max_tokens).filter(arrived), 0)]
            where = or_(queued, arrived)
        counts: dict[str, tuple[int, int]] = {}
        arrivals: dict[str, Arrivals] = {}
        for tier, n, tokens, *arr in self.s.execute(
                select(*columns).where(where).group_by(RequestRow.tier_used)):
            counts[tier] = (int(n), int(tokens))
            if arr and arr[0]:
                arrivals[tier] = Arrivals(int(arr[0]), int(arr[1]), int(arr[2]))
        return counts, arrivals

    def _queued_columns(self) -> Any:
        return select(RequestRow.id, RequestRow.attempt, RequestRow.tier_used,
                      RequestRow.received_at, RequestRow.prompt_tokens, RequestRow.enqueued_at)

    def at_risk(self, now: float) -> list[Any]:
        """Queued requests whose TTFT slack is in (0, aging_fraction × target]."""
        frac = self.config.aging_fraction
        windows = []
        for tier in self.tiers:
            target_s = tier.ttft_ms / 1000.0
            windows.append(and_(RequestRow.tier_used == tier.name,
                                RequestRow.received_at > _utc(now - target_s),
                                RequestRow.received_at <= _utc(now - (1 - frac) * target_s)))
        stmt = (self._queued_columns().where(RequestRow.state == QUEUED, or_(*windows))
                .order_by(RequestRow.received_at).limit(max(1000, 5 * self.config.max_retickets)))
        return list(self.s.execute(stmt))

    def orphan_candidates(self, tier: str, num_missing: int, now: float) -> list[Any]:
        """The oldest-ticketed queued requests of ``tier`` past the orphan timeout."""
        ticketed = func.coalesce(RequestRow.enqueued_at, RequestRow.received_at)
        cutoff = _utc(now - self.config.orphan_timeout_s)
        stmt = (self._queued_columns()
                .where(RequestRow.state == QUEUED, RequestRow.tier_used == tier,
                       ticketed <= cutoff)
                .order_by(ticketed).limit(num_missing + ORPHAN_SLACK_ROWS))
        return list(self.s.execute(stmt))

    def inflight_without(self, live_workers: set[str], now: float,
                         handoff_timeout_s: float | None = None) -> list[InflightRequest]:
        """Claimed requests without a live owner (the policy re-checks the heartbeat age).

        Ownerless too, reported with ``worker=None``: a request still ``prefilling`` whose
        first token of this attempt came out more than ``handoff_timeout_s`` ago — its KV
        lease has expired and no decode worker claimed it, so its decode ticket is lost (e.g.
        with a Redis restart) while its prefill worker lives on.
        """
        owner = case((RequestRow.state == DECODING, RequestRow.decode_worker),
                     else_=RequestRow.prefill_worker)
        stuck: Any = false()
        if handoff_timeout_s is not None:
            stuck = and_(RequestRow.state == PREFILLING, RequestRow.first_token_at.is_not(None),
                         RequestRow.first_token_at >= RequestRow.prefill_started_at,
                         RequestRow.first_token_at < _utc(now - handoff_timeout_s))
        stmt = select(RequestRow.id, RequestRow.attempt, RequestRow.tier_used, RequestRow.state,
                      owner, stuck, RequestRow.received_at, RequestRow.prefill_started_at,
                      RequestRow.first_token_at, RequestRow.decode_started_at).where(
            RequestRow.state.in_((PREFILLING, DECODING)))
        if live_workers:
            stmt = stmt.where(or_(owner.is_(None), owner.not_in(sorted(live_workers)), stuck))
        out = []
        for rid, attempt, tier, state, worker, is_stuck, *stamps in self.s.execute(stmt):
            updated = max(t for t in (_ts(s) for s in stamps) if t is not None)
            out.append(InflightRequest(rid, attempt, tier, state,
                                       None if is_stuck else worker, updated))
        return out


class LiveSnapshotSource:
    """Reads heartbeats, broker depths and the ledger into one :class:`Snapshot`."""

    def __init__(self, client: redis.Redis, depths: BrokerDepths, tiers: TierTable,
                 config: PolicyConfig, handoff_timeout_s: float | None = None) -> None:
        self._r = client
        self.depths = depths
        self.tiers = tiers
        self.config = config
        self.handoff_timeout_s = handoff_timeout_s

    def build(self, session: Session, now: float, since: float | None) -> Snapshot:
        """The snapshot at ``now``; arrivals are counted over ``(since, now]`` (none if None)."""
        heartbeats = tuple(read_heartbeats(self._r))
        view = LedgerView(session, self.tiers, self.config)
        counts, arrivals = view.tier_stats(since, now)
        depth = (self._fifo_depths(view, counts, now) if self.depths.fifo
                 else self.depths.read())
        queues = {t: QueueStats(*counts.get(t, (0, 0)), broker_depth=depth.get(t))
                  for t in TIER_NAMES}
        rows = {r.id: r for r in view.at_risk(now)}
        for tier, stats in queues.items():
            if stats.broker_depth is not None and stats.num_queued > stats.broker_depth:
                missing = stats.num_queued - stats.broker_depth
                rows.update((r.id, r) for r in view.orphan_candidates(tier, missing, now))
        live = {hb.worker for hb in heartbeats
                if hb.is_fresh(now, self.config.heartbeat_max_age_s)}
        inflight = tuple(view.inflight_without(live, now, self.handoff_timeout_s))
        return Snapshot(now=now, heartbeats=heartbeats, queues=queues,
                        queued=self._queued(list(rows.values())), inflight=inflight,
                        arrivals=arrivals)

    def _fifo_depths(self, view: LedgerView, counts: dict[str, tuple[int, int]],
                     now: float) -> dict[str, int | None]:
        """Per-tier depths for one shared queue: the ledger's queued rows beyond the queue's
        length are taken to be the oldest-ticketed ones (those a broker restart lost), and
        each tier's depth is its queued count less its share of them."""
        total = self.depths.read_fifo()
        queued = {t: counts.get(t, (0, 0))[0] for t in TIER_NAMES}
        if total is None:
            return dict.fromkeys(TIER_NAMES)
        missing = sum(queued.values()) - total
        if missing <= 0:
            return dict(queued)
        candidates = [r for t in TIER_NAMES for r in view.orphan_candidates(t, missing, now)]
        candidates.sort(key=lambda r: _ts(r.enqueued_at) or r.received_at.timestamp())
        lost = Counter(r.tier_used for r in candidates[:missing])
        return {t: queued[t] - lost[t] for t in TIER_NAMES}

    def _queued(self, rows: list[Any]) -> tuple[QueuedRequest, ...]:
        tickets = read_tickets(self._r, [r.id for r in rows])
        out = []
        for r in rows:
            queue_tier, priority = r.tier_used, self.tiers[r.tier_used].queue_priority
            ticketed = _ts(r.enqueued_at) or r.received_at.timestamp()
            t = tickets.get(r.id)
            # Only a record of the ticket for the current attempt says where it is.
            if t is not None and t.get("attempt") == r.attempt and t.get("queue_tier") in \
                    TIER_NAMES:
                queue_tier, priority = t["queue_tier"], int(t["priority"])
                ticketed = max(ticketed, float(t.get("at") or 0.0))
            out.append(QueuedRequest(r.id, r.attempt, r.tier_used, r.received_at.timestamp(),
                                     r.prompt_tokens, queue_tier, priority, ticketed))
        out.sort(key=lambda q: q.arrival_time)
        return tuple(out)
