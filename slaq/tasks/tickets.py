"""Tickets: Celery messages that say "work on request R, attempt A".

Send them only after the ledger commit that made the work claimable. They may be duplicated,
delayed or lost; the ledger's claims make acting on them idempotent.
"""

from __future__ import annotations

import functools
import uuid

from celery import Celery

from slaq.platform.settings import Settings
from slaq.platform.tiers import TierTable
from slaq.tasks.config import (
    DECODE_TASK,
    DEFAULT_PRIORITY,
    POLICY_CONF_KEY,
    PREFILL_TASK,
    broker_priority,
    decode_queue,
    make_queue,
    prefill_queue,
)


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from slaq.tasks.app import get_app

    return get_app()


@functools.cache
def _env_tiers() -> TierTable:
    return TierTable.from_file(Settings.from_env().tiers_file)


def _wire_id(request_id: object) -> int | str:
    # JSON carries ints and strings; UUIDs travel as text.
    if isinstance(request_id, int):
        return request_id
    if isinstance(request_id, (str, uuid.UUID)):
        return str(request_id)
    raise ValueError(f"request_id must be an int, str or UUID, got {type(request_id).__name__}")


def send_prefill_ticket(request_id: object, attempt: int, tier: str, *,
                        app: Celery | None = None, priority: int | None = None,
                        tiers: TierTable | None = None, policy: str | None = None) -> None:
    """Queue a prefill ticket on ``prefill.<tier>``.

    ``priority`` (Redis-style, 0 most urgent) defaults to the tier's ``queue_priority``; the
    reprioritiser passes a lower number to age a ticket whose deadline is near. Under the
    ``fifo`` policy (``policy``, else the one the app was built with) every ticket goes to the
    one fifo queue with the same priority, whatever its tier: arrival order is the only order.
    """
    table = tiers or _env_tiers()
    try:
        tier_priority = table[tier].queue_priority
    except KeyError as exc:
        raise ValueError(f"unknown tier {tier!r}") from exc
    app = _app(app)
    # From the app, built once from its process's settings: no env read per ticket.
    policy = policy or app.conf.get(POLICY_CONF_KEY) or "slaq"
    if policy == "fifo":
        tier_priority, priority = DEFAULT_PRIORITY, None
    queue = make_queue(prefill_queue(tier, policy))
    app.send_task(PREFILL_TASK, args=[_wire_id(request_id), int(attempt)], queue=queue,
                  priority=broker_priority(tier_priority if priority is None else priority,
                                           app.conf.broker_url))


def send_decode_ticket(request_id: object, attempt: int, worker: str | None, *,
                       app: Celery | None = None, priority: int | None = None) -> None:
    """Queue a decode ticket on ``decode.<worker>`` (``decode.any`` when ``worker`` is None)."""
    app = _app(app)
    queue = make_queue(decode_queue(worker))
    app.send_task(DECODE_TASK, args=[_wire_id(request_id), int(attempt)], queue=queue,
                  priority=broker_priority(DEFAULT_PRIORITY if priority is None else priority,
                                           app.conf.broker_url))
