"""Queues, priorities and routes, checked against the real Redis broker through kombu."""

from __future__ import annotations

import os

import pytest
from kombu import Consumer

from slaq.platform.settings import Settings
from slaq.platform.tiers import TierTable
from slaq.tasks.app import create_app
from slaq.tasks.config import (
    DECODE_ANY_QUEUE,
    DEFAULT_PRIORITY,
    FIFO_QUEUE,
    PREFILL_QUEUES,
    RECONNECT_INTERVALS,
    broker_priority,
    celery_config,
    decode_queue,
    make_queue,
    queues_for_role,
)
from slaq.tasks.tickets import send_decode_ticket, send_prefill_ticket


def test_queues_for_roles():
    assert PREFILL_QUEUES == ("prefill.priority", "prefill.default", "prefill.flex",
                              "prefill.batch")
    assert queues_for_role("prefill", "p0") == list(PREFILL_QUEUES)
    assert queues_for_role("decode", "d0") == ["decode.d0", DECODE_ANY_QUEUE]
    assert queues_for_role("both", "b0")[:4] == list(PREFILL_QUEUES)
    assert "decode.b0" in queues_for_role("both", "b0")
    assert decode_queue(None) == DECODE_ANY_QUEUE
    with pytest.raises(ValueError):
        queues_for_role("sideways", "x")


def test_priority_translation_redis_vs_amqp():
    assert broker_priority(0, "redis://h/0") == 0
    assert broker_priority(9, "redis://h/0") == 9
    # RabbitMQ serves the highest number first.
    assert broker_priority(0, "amqp://guest@h//") == 9
    assert broker_priority(9, "pyamqp://guest@h//") == 0
    with pytest.raises(ValueError):
        broker_priority(10, "redis://h/0")
    assert make_queue("prefill.flex").queue_arguments == {"x-max-priority": 9}


def test_celery_config_delivery_settings():
    conf = celery_config(Settings(redis_url="redis://h:6379/3", visibility_timeout_s=1234))
    assert conf["broker_url"] == "redis://h:6379/3"
    opts = conf["broker_transport_options"]
    assert opts["priority_steps"] == list(range(10))
    assert opts["queue_order_strategy"] == "priority"
    assert opts["visibility_timeout"] == 1234
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["beat_schedule"]["reprioritise"]["options"]["queue"] == "control"
    names = [q.name for q in conf["task_queues"]]
    assert names[:4] == list(PREFILL_QUEUES) and "control" in names
    amqp = celery_config(Settings(broker_url="amqp://guest@localhost//", redis_url="redis://h"))
    assert amqp["broker_url"].startswith("amqp://")
    assert amqp["task_default_priority"] == 9 - conf["task_default_priority"]
    with pytest.raises(ValueError):
        celery_config(Settings())
    # A worker takes a ticket only with a free pool thread (Celery honours this on Redis only).
    assert conf["worker_disable_prefetch"] is True and amqp["worker_disable_prefetch"] is False
    # Reconnects after a broker loss on our schedule, for producers and the worker alike.
    for key, value in RECONNECT_INTERVALS.items():
        assert opts[key] == value
    assert conf["worker_consumer"] == "slaq.tasks.consumer:QuickReconnectConsumer"


def _drain(app, queue_names: list[str], limit: int) -> list[dict]:
    """Take up to ``limit`` messages, one at a time, in the order the broker serves them."""
    got: list[dict] = []

    def on_message(body, message):
        got.append({"args": body[0] if isinstance(body, list) else body,
                    "queue": message.delivery_info.get("routing_key"),
                    "priority": message.properties.get("priority")})
        message.ack()

    with app.connection_for_read() as conn:
        queues = [make_queue(n)(conn.default_channel) for n in queue_names]
        with Consumer(conn, queues=queues, callbacks=[on_message], accept=["json"],
                      prefetch_count=1):
            while len(got) < limit:
                try:
                    conn.drain_events(timeout=2)
                except TimeoutError:
                    break
    return got


def test_tickets_land_on_tier_queues_and_obey_priority(private_redis_url):
    app = create_app(Settings(redis_url=private_redis_url))
    tiers = TierTable()
    # Same queue, three priorities: the most urgent (lowest number) must come out first.
    send_prefill_ticket("r-late", 1, "default", app=app, tiers=tiers, priority=9)
    send_prefill_ticket("r-urgent", 1, "default", app=app, tiers=tiers, priority=0)
    send_prefill_ticket("r-tier", 2, "default", app=app, tiers=tiers)
    got = _drain(app, ["prefill.default"], 3)
    assert [m["args"] for m in got] == [["r-urgent", 1], ["r-tier", 2], ["r-late", 1]]
    assert [m["priority"] for m in got] == [0, tiers["default"].queue_priority, 9]


def test_prefill_worker_drains_queues_in_tier_order(private_redis_url):
    app = create_app(Settings(redis_url=private_redis_url))
    tiers = TierTable()
    for i, tier in enumerate(["batch", "flex", "default", "priority"]):
        send_prefill_ticket(f"r{i}", 0, tier, app=app, tiers=tiers)
    got = _drain(app, list(PREFILL_QUEUES), 4)
    assert [m["args"][0] for m in got] == ["r3", "r2", "r1", "r0"]


def test_fifo_tickets_share_one_queue_in_arrival_order(private_redis_url):
    assert queues_for_role("prefill", "p0", "fifo") == [FIFO_QUEUE]
    assert queues_for_role("both", "b0", "fifo") == [FIFO_QUEUE, "decode.b0", DECODE_ANY_QUEUE]
    assert queues_for_role("decode", "d0", "fifo") == ["decode.d0", DECODE_ANY_QUEUE]
    # The sender takes the policy from the app, as the API's and beat's senders do.
    app = create_app(Settings(redis_url=private_redis_url, policy="fifo"))
    tiers = TierTable()
    order = ["batch", "flex", "default", "priority", "default"]
    for i, tier in enumerate(order):
        # An explicit (aged) priority does not jump the line either.
        send_prefill_ticket(f"f{i}", 1, tier, app=app, tiers=tiers,
                            priority=0 if tier == "default" else None)
    assert _drain(app, list(PREFILL_QUEUES), 5) == []  # no tier queue holds any of them
    got = _drain(app, [FIFO_QUEUE], 5)
    assert [m["args"][0] for m in got] == [f"f{i}" for i in range(len(order))]
    assert {m["priority"] for m in got} == {DEFAULT_PRIORITY}
    assert {m["queue"] for m in got} == {FIFO_QUEUE}


def test_policy_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLAQ_POLICY", "fifo")
    assert Settings.from_env().policy == "fifo" and Settings.from_env().fifo
    monkeypatch.delenv("SLAQ_POLICY")
    assert Settings.from_env().policy == "slaq"
    monkeypatch.setenv("SLAQ_POLICY", "lifo")
    with pytest.raises(ValueError):
        Settings.from_env()


def test_decode_ticket_routes_to_worker_queue(private_redis_url):
    app = create_app(Settings(redis_url=private_redis_url))
    send_decode_ticket("r9", 3, "dec-7", app=app)
    send_decode_ticket("r10", 1, None, app=app)
    assert _drain(app, ["decode.dec-7"], 1)[0]["args"] == ["r9", 3]
    assert _drain(app, [DECODE_ANY_QUEUE], 1)[0]["args"] == ["r10", 1]
    with pytest.raises(ValueError):
        send_prefill_ticket("r11", 0, "platinum", app=app, tiers=TierTable())


def test_amqp_broker_serves_the_most_urgent_first():
    """The same tickets through RabbitMQ (x-max-priority, inverted priority numbers)."""
    url = os.environ.get("SLAQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    app = create_app(Settings(broker_url=url, redis_url="redis://unused"))
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any connection failure means no broker here
        pytest.skip(f"no RabbitMQ at {url}: {exc}")
    with app.connection_for_write() as conn:
        make_queue("prefill.flex")(conn.default_channel).declare()
        conn.default_channel.queue_purge("prefill.flex")
    tiers = TierTable()
    send_prefill_ticket("a-late", 1, "flex", app=app, tiers=tiers, priority=9)
    send_prefill_ticket("a-urgent", 1, "flex", app=app, tiers=tiers, priority=0)
    send_prefill_ticket("a-tier", 1, "flex", app=app, tiers=tiers)
    got = _drain(app, ["prefill.flex"], 3)
    assert [m["args"][0] for m in got] == ["a-urgent", "a-tier", "a-late"]
    assert [m["priority"] for m in got] == [9, 9 - tiers["flex"].queue_priority, 0]
