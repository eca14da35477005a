"""The worker's broker consumer: Celery's, reconnecting on slaq's retry intervals.

When the broker goes away (a Redis restart), Celery's consumer tries to reconnect at once
and, if the broker is not back yet, sleeps kombu's default ``interval_start`` of 2 s before
the next try. Celery passes no intervals to ``Connection.ensure_connection`` and has no setting
for them (5.7), so a restart of a few milliseconds cost every idle worker 2 s, and every
request sent meanwhile 2 s of TTFT (``scripts/redis_restart_probe.py`` measures it).

:class:`QuickReconnectConsumer` (``worker_consumer`` in :mod:`slaq.tasks.config`) passes the
intervals of ``broker_transport_options`` (``interval_start``, ``interval_step``,
``interval_max``: the keys kombu itself reads there when a producer reconnects), so consumers
and producers retry on one schedule.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer

INTERVAL_KEYS = ("interval_start", "interval_step", "interval_max")


def retry_intervals(transport_options: dict[str, Any]) -> dict[str, float]:
    """The reconnect intervals set in ``broker_transport_options`` (kombu's defaults if unset)."""
    return {k: float(transport_options[k]) for k in INTERVAL_KEYS if k in transport_options}


class QuickReconnectConsumer(Consumer):
    """Celery's consumer; its reconnect attempts follow :func:`retry_intervals`."""

    def ensure_connected(self, conn: Any) -> Any:
        intervals = retry_intervals(self.app.conf.broker_transport_options or {})
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) with kombu's
        # interval defaults; bind ours to this connection object (a new one per reconnect).
        if intervals and "ensure_connection" not in vars(conn):
            conn.ensure_connection = functools.partial(conn.ensure_connection, **intervals)
        return super().ensure_connected(conn)
