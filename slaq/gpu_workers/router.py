"""Pick the decode worker for a prefilled request.

Reads every ``hb:*`` hash (one SCAN and one pipelined HGETALL) and the reprioritiser's published
routing weights; the choice is :func:`slaq.platform.decisions.choose_decode_worker` (weighted
among live decode workers, lowest KV pressure when no weights are published).
"""

from __future__ import annotations

import logging
import random
import time

import redis

from slaq.platform.decisions import choose_decode_worker, read_routing
from slaq.platform.keys import heartbeat_key
from slaq.platform.pressure import Heartbeat

log = logging.getLogger(__name__)


def read_heartbeats(client: redis.Redis) -> list[Heartbeat]:
    """Every worker's current heartbeat (malformed ones are skipped)."""
    pattern = heartbeat_key("*")
    keys = list(client.scan_iter(match=pattern, count=500))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    out: list[Heartbeat] = []
    for key, raw in zip(keys, pipe.execute(), strict=True):
        if not raw:
            continue  # expired between SCAN and HGETALL
        try:
            out.append(Heartbeat.from_mapping(raw))
        except ValueError:
            log.warning("skipping malformed heartbeat %r", key)
    return out


class DecodeRouter:
    """Chooses a decode worker name, or None (then the ticket goes to ``decode.any``)."""

    def __init__(self, client: redis.Redis, *, max_age_s: float) -> None:
        self._r = client
        self.max_age_s = max_age_s

    def pick(self, exclude: tuple[str, ...] = ()) -> str | None:
        try:
            heartbeats = read_heartbeats(self._r)
            weights = read_routing(self._r)
        except redis.RedisError:
            log.warning("cannot read heartbeats; routing to decode.any", exc_info=True)
            return None
        return choose_decode_worker(weights, heartbeats, time.time(), self.max_age_s,
                                    random.random(), exclude)
