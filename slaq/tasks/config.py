"""Celery configuration: queues, routes, priorities, delivery guarantees, beat schedule.

Redis is the default broker; ``amqp://`` (RabbitMQ) works with the same queues. The two
disagree on what a message priority means (Redis: 0 is the most urgent; RabbitMQ: the highest
number is), so callers give the Redis-style priority of :mod:`slaq.platform.tiers` and
:func:`broker_priority` translates it for the broker in use.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from slaq.platform.settings import Settings
from slaq.platform.tiers import TIER_NAMES

PREFILL_TASK = "slaq.prefill"
DECODE_TASK = "slaq.decode"

# The order a prefill worker drains them in (queue_order_strategy "priority").
PREFILL_QUEUES: tuple[str, ...] = tuple(f"prefill.{tier}" for tier in TIER_NAMES)
# The one prefill queue of the ``fifo`` policy: every tier's tickets, in arrival order.
FIFO_QUEUE = "prefill.fifo"
DECODE_ANY_QUEUE = "decode.any"
CONTROL_QUEUE = "control"

NUM_PRIORITIES = 10  # Redis-style 0 (most urgent) .. 9
# Seconds between broker reconnect attempts: the first right away, then 0.05, 0.1, ... 1.0.
RECONNECT_INTERVALS = {"interval_start": 0.05, "interval_step": 0.05, "interval_max": 1.0}
# Messages sent without a priority: as urgent as the default tier, not the top bucket.
DEFAULT_PRIORITY = 3
# The app's scheduling mode (``Settings.policy``), read by the ticket senders.
POLICY_CONF_KEY = "slaq_policy"


def prefill_queue(tier: str, policy: str = "slaq") -> str:
    """Where a prefill ticket of ``tier`` goes: its tier's queue, or the one fifo queue."""
    if tier not in TIER_NAMES:
        raise ValueError(f"unknown tier {tier!r}")
    return FIFO_QUEUE if policy == "fifo" else f"prefill.{tier}"


def prefill_queues(policy: str = "slaq") -> list[str]:
    """The prefill queues a worker drains, in drain order."""
    return [FIFO_QUEUE] if policy == "fifo" else list(PREFILL_QUEUES)


def decode_queue(worker: str | None) -> str:
    """The decode queue of one worker, or the shared one when no worker is known."""
    return f"decode.{worker}" if worker else DECODE_ANY_QUEUE


def is_amqp(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0].startswith(("amqp", "pyamqp", "librabbitmq"))


def broker_priority(priority: int, broker_url: str) -> int:
    """Translate a Redis-style priority (0 most urgent) into the broker's own scale."""
    if not 0 <= priority < NUM_PRIORITIES:
        raise ValueError(f"priority must be in 0..{NUM_PRIORITIES - 1}, got {priority}")
    return NUM_PRIORITIES - 1 - priority if is_amqp(broker_url) else priority


def make_queue(name: str) -> Queue:
    """A queue with its own direct exchange; x-max-priority makes RabbitMQ honour priorities
    (the Redis transport ignores queue arguments and uses ``priority_steps`` instead)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name,
                 queue_arguments={"x-max-priority": NUM_PRIORITIES - 1})


def queues_for_role(role: str, worker: str, policy: str = "slaq") -> list[str]:
    """What a worker with this role consumes, in drain order (``fifo``: one prefill queue)."""
    if role == "prefill":
        return prefill_queues(policy)
    if role == "decode":
        return [decode_queue(worker), DECODE_ANY_QUEUE]
    if role == "both":
        # An aggregated worker decodes what it prefills; it also drains stray decode tickets.
        return [*prefill_queues(policy), decode_queue(worker), DECODE_ANY_QUEUE]
    raise ValueError(f"role must be prefill, decode or both, got {role!r}")


def broker_url_of(settings: Settings) -> str:
    url = settings.broker_url or settings.redis_url
    if not url:
        raise ValueError("set SLAQ_BROKER_URL or SLAQ_REDIS_URL (or start the embedded services)")
    return url


def celery_config(settings: Settings, extra_queues: tuple[str, ...] = ()) -> dict:
    """The Celery settings dict for :func:`slaq.tasks.app.create_app`."""
    broker = broker_url_of(settings)
    names = [*PREFILL_QUEUES, FIFO_QUEUE, DECODE_ANY_QUEUE, CONTROL_QUEUE, *extra_queues]
    return {
        "broker_url": broker,
        POLICY_CONF_KEY: settings.policy,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # kombu's Redis transport keeps one list per step; default [0, 3, 6, 9] would
            # merge tiers, so give every priority its own list.
            "priority_steps": list(range(NUM_PRIORITIES)),
            "queue_order_strategy": "priority",
            # An un-acked ticket is redelivered after this long even while still running.
            "visibility_timeout": settings.visibility_timeout_s,
            # No ack emulation (no ``unacked`` hash): with it, a broker connection lost while
            # acks_late tickets run makes kombu restore them through the dead connection, which
            # raises and kills the worker (every busy worker dies when Redis restarts). A ticket
            # taken by a worker that then dies is recovered from the ledger by the
            # reprioritiser's orphan sweep instead (claims keep redelivery idempotent), so the
            # visibility timeout above no longer applies on Redis.
            "ack_emulation": False,
            # Reconnect schedule after a broker loss (kombu's default starts at 2 s; a Redis
            # restart of milliseconds then cost 2 s of TTFT). Kombu reads these keys for
            # producers; QuickReconnectConsumer (worker_consumer below) for the worker.
            **RECONNECT_INTERVALS,
        },
        "worker_consumer": "slaq.tasks.consumer:QuickReconnectConsumer",
        "task_queues": [make_queue(n) for n in dict.fromkeys(names)],
        "task_queue_max_priority": NUM_PRIORITIES - 1,
        "task_default_queue": "prefill.default",
        "task_default_priority": broker_priority(DEFAULT_PRIORITY, broker),
        "task_routes": {
            PREFILL_TASK: {"queue": "prefill.default"},
            DECODE_TASK: {"queue": DECODE_ANY_QUEUE},
        },
        # Tickets are idempotent (the ledger claim decides), so redelivery is safe.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Redis only (Celery ignores it on AMQP, with a warning): take a ticket only while a
        # pool thread is free, so a worker never holds more tickets than its pool (sized to
        # its engine's seats) can run; the rest stay in the broker, in priority order.
        "worker_disable_prefetch": not is_amqp(broker),
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
        "beat_schedule": beat_schedule(settings),
    }


def beat_schedule(settings: Settings) -> dict:
    """Periodic jobs for ``slaq beat``: the reprioritiser every ``reprioritise_interval_s``."""
    from slaq.tasks.reprioritise import schedule_entry  # late: it imports the ledger

    return schedule_entry(settings)
