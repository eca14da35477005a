"""Pick the decode worker for a prefilled request.

Reads every ``hb:*`` hash (one SCAN and one pipelined HGETALL) and the reprioritiser's published
routing weights. The choice is :func:`slaq.platform.decisions.choose_decode_worker` (weighted
among live decode workers, lowest KV pressure when no weights are published), unless, given
the prompt's block hashes, another worker holds a clearly longer prefix of it
(:func:`slaq.platform.affinity.choose_affine_worker`, within the pressure and weight limits it
keeps).
"""

from __future__ import annotations

import logging
import random
import time

import redis

from slaq.platform.affinity import DEFAULT_AFFINITY, AffinityConfig, choose_affine_worker
from slaq.platform.decisions import choose_decode_worker, read_routing
from slaq.platform.live_snapshot import read_heartbeats

log = logging.getLogger(__name__)

__all__ = ["DecodeRouter", "read_heartbeats"]


class DecodeRouter:
    """Chooses a decode worker name, or None (then the ticket goes to ``decode.any``)."""

    def __init__(self, client: redis.Redis, *, max_age_s: float,
                 affinity: AffinityConfig = DEFAULT_AFFINITY) -> None:
        self._r = client
        self.max_age_s = max_age_s
        self.affinity = affinity

    def pick(self, exclude: tuple[str, ...] = (), *, prefix_hashes: list[int] | None = None,
             num_blocks: int = 0) -> str | None:
        """``prefix_hashes``: the prompt's chain hashes (prefix affinity); ``num_blocks``: the
        blocks its hand-off moves without reuse."""
        try:
            heartbeats = read_heartbeats(self._r)
            weights = read_routing(self._r)
        except redis.RedisError:
            log.warning("cannot read heartbeats; routing to decode.any", exc_info=True)
            return None
        now, u = time.time(), random.random()
        chosen = choose_decode_worker(weights, heartbeats, now, self.max_age_s, u, exclude)
        if prefix_hashes:
            better = choose_affine_worker(weights, heartbeats, now, self.max_age_s, u,
                                          prefix_hashes, num_blocks, exclude, chosen,
                                          self.affinity)
            if better is not None:
                return better.worker
        return chosen
