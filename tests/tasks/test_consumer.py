"""The worker's consumer reconnects on slaq's schedule, not kombu's 2 s default.

A real Celery worker controller (thread pool, not started) whose broker is a Redis port nobody
listens on: the consumer's connect gives up after two retries, and what it logged says how long
it waited before each (Celery logs sub-second waits as "now", kombu's default as "in 2.00
seconds"). ``scripts/redis_restart_probe.py`` measures the effect on a restarted Redis.
"""

from __future__ import annotations

import logging
import socket

import pytest
from kombu.exceptions import OperationalError

from slaq.platform.settings import Settings
from slaq.tasks.app import create_app
from slaq.tasks.config import RECONNECT_INTERVALS
from slaq.tasks.consumer import QuickReconnectConsumer, retry_intervals


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_retry_intervals_come_from_the_transport_options() -> None:
    assert retry_intervals({"interval_start": 0.05, "visibility_timeout": 10}) == {
        "interval_start": 0.05}
    assert retry_intervals({}) == {}


def test_the_worker_consumer_retries_within_a_second(caplog) -> None:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{unused_port()}/0"))
    app.conf.broker_connection_max_retries = 2
    worker = app.WorkController(hostname="reconnect@test", pool_cls="threads", concurrency=1,
                                without_gossip=True, without_mingle=True,
                                without_heartbeat=True)
    assert isinstance(worker.consumer, QuickReconnectConsumer)
    assert RECONNECT_INTERVALS["interval_max"] < 2.0
    with caplog.at_level(logging.ERROR), pytest.raises(OperationalError):
        worker.consumer.connect()
    retries = [r.getMessage() for r in caplog.records if "Cannot connect" in r.getMessage()]
    assert len(retries) == 2
    assert all("Trying again now" in m for m in retries), retries
