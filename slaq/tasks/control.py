"""Apply the policy's actions to the running stack: gates and re-tickets.

**Gates** (:class:`GateReconciler`). A closed gate ``(role, tier)`` means the workers of that
role stop consuming ``prefill.<tier>``: Celery remote control ``cancel_consumer`` /
``add_consumer``, sent without waiting for replies. Rather than only forwarding each
:class:`~slaq.platform.snapshot.SetGate`, every cycle reconciles what each live worker should
consume with what it was told, keyed by (worker name, pid): a worker that starts (or restarts)
after a gate closed consumes every queue, and is told to cancel on the next cycle. A worker seen
for the first time is told its full set (add and cancel), so a reprioritiser that lost its
state (Redis restart) re-opens what a previous one closed. ``add_consumer`` of a queue already
consumed is a no-op in Celery, as is cancelling one that is not.

**Re-tickets** (:func:`bump_attempts`, then :func:`send_tickets`). The attempt is bumped as
``ledger.retry`` does (so the stale ticket is dropped at claim), in the caller's transaction
and only for requests still in the state and attempt the policy saw; once that commits, the
new tickets go out at the action's queue and priority (``tickets.send_prefill_ticket``). A
ticket that fails to send leaves a queued request without a ticket, which orphan recovery
finds again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import Integer, Text, column, func, update, values
from sqlalchemy.orm import Session

from slaq.platform.models import QUEUED, RequestRow
from slaq.platform.policy import PolicyState
from slaq.platform.pressure import Heartbeat
from slaq.platform.snapshot import Reticket
from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.tasks.tickets import send_prefill_ticket

log = logging.getLogger(__name__)

GATED_ROLES: tuple[str, ...] = ("prefill", "both")


def prefill_queue(tier: str) -> str:
    return f"prefill.{tier}"


def worker_hostname(hb: Heartbeat) -> str:
    """The Celery node name of a slaq worker (``slaq.gpu_workers.worker`` uses name@host)."""
    return f"{hb.worker}@{hb.host}" if hb.host else hb.worker


def closed_tiers(state: PolicyState, role: str) -> frozenset[str]:
    """Tiers whose prefill queue workers of ``role`` must not consume under ``state``."""
    return frozenset(t for t in TIER_NAMES if not state.is_open(role, t))


def gate_table(state: PolicyState) -> dict[tuple[str, str], bool]:
    """``{(role, tier): open}`` for every gated role and tier (what :mod:`decisions` publishes)."""
    return {(role, tier): state.is_open(role, tier) for role in GATED_ROLES for tier in TIER_NAMES}


@dataclass(slots=True)
class GateCommands:
    """Remote-control commands of one cycle: queue -> destinations."""

    cancel: dict[str, list[str]] = field(default_factory=dict)
    add: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.cancel or self.add)


@dataclass(slots=True)
class GateReconciler:
    """What each live gated worker was last told to skip, and how to bring it in line.

    ``applied`` maps worker name -> ``{"pid": int, "closed": [tier, ...]}``; it is persisted
    between cycles with the policy state.
    """

    applied: dict[str, dict[str, Any]] = field(default_factory=dict)

    def plan(self, heartbeats: Iterable[Heartbeat], state: PolicyState, now: float,
             max_age_s: float) -> GateCommands:
        """The commands that make every live gated worker obey ``state``; updates ``applied``."""
        commands = GateCommands()
        seen: dict[str, dict[str, Any]] = {}
        for hb in heartbeats:
            if hb.role not in GATED_ROLES or not hb.is_fresh(now, max_age_s):
                continue
            want = closed_tiers(state, hb.role)
            known = self.applied.get(hb.worker)
            node = worker_hostname(hb)
            if known is None or known.get("pid") != hb.pid:
                # New to us: state it in full (a fresh worker consumes all; ours may be stale).
                to_cancel, to_add = set(want), set(TIER_NAMES) - want
            else:
                had = set(known.get("closed", ()))
                to_cancel, to_add = want - had, had - want
            for tier in sorted(to_cancel):
                commands.cancel.setdefault(prefill_queue(tier), []).append(node)
            for tier in sorted(to_add):
                commands.add.setdefault(prefill_queue(tier), []).append(node)
            seen[hb.worker] = {"pid": hb.pid, "closed": sorted(want)}
        # Workers without a fresh heartbeat are forgotten; if they come back they are new.
        self.applied = seen
        return commands


def send_gate_commands(app: Celery, commands: GateCommands) -> None:
    """Broadcast ``cancel_consumer`` / ``add_consumer`` to the named workers (no replies)."""
    for queue, nodes in commands.cancel.items():
        app.control.cancel_consumer(queue, destination=nodes, reply=False)
    for queue, nodes in commands.add.items():
        app.control.add_consumer(queue, destination=nodes, reply=False)


def expected_state(action: Reticket) -> str:
    """The state the policy saw the request in: queued, or the claimed state of an orphan."""
    return str(action.inputs.get("state", QUEUED)) if action.why == "orphan" else QUEUED


def bump_attempts(session: Session, retickets: list[Reticket]) -> list[bool]:
    """Retry every action's request in ONE statement, in the caller's transaction (no commit).

    What ``ledger.retry`` sets (back to ``queued``, ``attempt + 1``, ``enqueued_at = now()``,
    owners and claim stamps cleared, ``error`` = why an orphan's attempt was abandoned), but
    only where the request is still in the state *and* attempt the policy saw: ``ledger.retry``
    alone would also pull back a request that a worker claimed since the snapshot, and one
    statement keeps a burst of re-tickets within the cycle's time budget. True where the row
    moved to exactly the action's attempt; False where it had moved on (then send nothing).
    """
    if not retickets:
        return []
    seen: dict[str, Reticket] = {}
    for a in retickets:
        seen.setdefault(a.request_id, a)  # a duplicate action finds the attempt moved on
    observed = values(column("id", Text), column("attempt", Integer), column("state", Text),
                      column("error", Text), name="observed").data(
        [(a.request_id, a.attempt - 1, expected_state(a),
          a.reason if a.why == "orphan" else None) for a in seen.values()])
    stmt = (update(RequestRow)
            .where(RequestRow.id == observed.c.id, RequestRow.attempt == observed.c.attempt,
                   RequestRow.state == observed.c.state)
            .values(state=QUEUED, attempt=RequestRow.attempt + 1, enqueued_at=func.now(),
                    prefill_worker=None, decode_worker=None, prefill_started_at=None,
                    decode_started_at=None,
                    error=func.coalesce(observed.c.error, RequestRow.error))
            .returning(RequestRow.id, RequestRow.attempt)
            .execution_options(synchronize_session=False))
    moved = dict(session.execute(stmt).all())
    out = []
    for a in retickets:
        ok = seen.get(a.request_id) is a and moved.get(a.request_id) == a.attempt
        out.append(ok)
    return out


def send_tickets(app: Celery, retickets: Iterable[Reticket], tiers: TierTable) -> list[Reticket]:
    """Send the new prefill tickets (after the commit); returns the ones that went out."""
    sent = []
    for a in retickets:
        try:
            send_prefill_ticket(a.request_id, a.attempt, a.queue_tier, app=app,
                                priority=a.priority, tiers=tiers)
        except Exception:  # noqa: BLE001 - orphan recovery re-sends it later
            log.exception("could not send the ticket for %s attempt %s", a.request_id,
                          a.attempt)
            continue
        sent.append(a)
    return sent
