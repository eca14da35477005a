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
from slaq.platform.live_snapshot import read_heartbeats

log = logging.getLogger(__name__)

__all__ = ["DecodeRouter", "read_heartbeats"]


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
