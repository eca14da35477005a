"""The heartbeat thread: every ``heartbeat_interval_s`` write ``hb:<worker>`` with a TTL.

The hash's schema is :class:`slaq.platform.pressure.Heartbeat`. The key expires
``heartbeat_ttl_s`` after the last write, so a dead worker disappears from routing on its own;
a clean stop deletes it at once.

Workers that decode also publish :func:`cache_fields`: a bounded sample of their prefix
cache's chain hashes, which prefill workers match against a prompt to route its hand-off to
the worker that holds its prefix (:mod:`slaq.platform.affinity`), and their hand-off reuse
counters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from slaq.platform.keys import heartbeat_key
from slaq.platform.pressure import Heartbeat

log = logging.getLogger(__name__)


def cache_fields(role: str, engine_stats: Any) -> dict[str, Any]:
    """The heartbeat fields about the prefix cache and hand-off reuse, from ``LLMEngine.stats()``.

    A prefill worker publishes no hashes: nothing is routed to it by prefix.
    """
    return {
        "prefix_hashes": (list(getattr(engine_stats, "prefix_hashes", ()))
                          if role != "prefill" else []),
        "num_handoff_blocks": int(getattr(engine_stats, "handoff_blocks_total", 0)),
        "num_handoff_blocks_reused": int(getattr(engine_stats, "handoff_blocks_reused", 0)),
    }


def publish(client: redis.Redis, hb: Heartbeat, ttl_s: float) -> None:
    """Write one heartbeat (replacing the previous hash) with its TTL."""
    key = heartbeat_key(hb.worker)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=hb.to_mapping())
    pipe.pexpire(key, max(1, int(ttl_s * 1000)))
    pipe.execute()


class HeartbeatThread:
    """Publishes ``build()`` every ``interval_s`` until stopped."""

    def __init__(self, client: redis.Redis, build: Callable[[], Heartbeat], *,
                 interval_s: float, ttl_s: float) -> None:
        if interval_s <= 0 or ttl_s <= interval_s:
            raise ValueError("need 0 < interval_s < ttl_s")
        self._r = client
        self._build = build
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._worker: str | None = None

    def beat(self) -> Heartbeat:
        """Build and publish one heartbeat now."""
        hb = self._build()
        self._worker = hb.worker
        publish(self._r, hb, self.ttl_s)
        return hb

    def start(self) -> None:
        self.beat()  # routers see the worker as soon as it is up
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s * 2 + 1)
        if self._worker is not None:
            try:
                self._r.delete(heartbeat_key(self._worker))
            except redis.RedisError:
                log.warning("could not delete heartbeat of %s", self._worker)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat must not kill the worker
                log.warning("heartbeat failed", exc_info=True)
