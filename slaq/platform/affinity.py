"""Prefix-affinity decode routing: prefer the decode worker that already holds the prompt's
leading KV blocks. Pure (no Redis, no torch).

A decode worker caches every full block it computed or received under a chain hash (the
block manager's :func:`~slaq.gpu_workers.engine.block_manager.block_hashes`: the hash of block
``i`` stands for the whole prefix up to it). Its heartbeat carries a bounded sample of those
hashes (``Heartbeat.prefix_hashes``: the deepest block of each recently finished sequence and
its prompt's last full block). The prefill worker hashes the prompt the same way; the deepest prompt
hash a worker published tells how many leading blocks a hand-off to it would not have to
move. In a multi-turn conversation turn N+1's prompt starts with turn N's prompt and answer,
which the worker that decoded turn N published when it finished.

Affinity overrides the usual choice (``baseline``: what
:func:`slaq.platform.decisions.choose_decode_worker` picked by weights and pressure) only when
it is worth it: a worker must hold at least ``min_gain`` of the prompt's blocks (a fraction,
and at least ``min_blocks``) more than the baseline worker. So a short prefix most workers
share (a system prompt) does not pull every request onto the first worker that cached it
(which then evicts faster, so everyone loses), while a conversation's next turn follows its
earlier turns. Candidates are the workers routing would accept anyway: live decode workers,
with a published weight when the reprioritiser publishes weights, room for the blocks that
would still move, pressure under ``max_pressure`` and within ``pressure_slack`` of the least
pressed live worker. Among them the longest cached prefix wins; ties go by weight (random,
``u``) or else to the lowest pressure, at random (``u``) among equals.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from slaq.platform.policy import choose_weighted
from slaq.platform.pressure import Heartbeat


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    """When a cached prefix may outweigh pressure."""

    max_pressure: float = 0.9  # never prefer a worker above this KV pressure
    pressure_slack: float = 0.2  # nor one this much more pressed than the least pressed
    min_blocks: int = 1  # shortest cached prefix (blocks) worth preferring a worker for
    # Fraction of the prompt's blocks a worker must hold beyond the baseline worker's.
    min_gain: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_pressure <= 1.0:
            raise ValueError("max_pressure must be in [0, 1]")
        if self.pressure_slack < 0.0:
            raise ValueError("pressure_slack must be >= 0")
        if self.min_blocks < 1:
            raise ValueError("min_blocks must be >= 1")
        if not 0.0 <= self.min_gain <= 1.0:
            raise ValueError("min_gain must be in [0, 1]")


DEFAULT_AFFINITY = AffinityConfig()


@dataclass(slots=True)
class AffinityChoice:
    """The preferred worker and how many of the prompt's leading blocks it holds."""

    worker: str
    cached_blocks: int


def cached_depth(prefix_hashes: Sequence[int], published: Collection[int]) -> int:
    """Leading blocks of a prompt (chain ``prefix_hashes``) a worker that published
    ``published`` holds: the deepest ``i`` whose hash ``prefix_hashes[i - 1]`` it listed.

    A chain hash covers its whole prefix, so one deep match is enough; shallower blocks of it
    may have been evicted meanwhile (eviction frees a sequence's tail first), which the pull
    corrects by moving whatever is missing.
    """
    if not published:
        return 0
    for i in range(len(prefix_hashes), 0, -1):
        if prefix_hashes[i - 1] in published:
            return i
    return 0


def choose_affine_worker(weights: Mapping[str, float], heartbeats: Iterable[Heartbeat],
                         now: float, max_age_s: float, u: float,
                         prefix_hashes: Sequence[int], num_blocks: int,
                         exclude: Iterable[str] = (), baseline: str | None = None,
                         config: AffinityConfig = DEFAULT_AFFINITY) -> AffinityChoice | None:
    """The decode worker holding the longest prefix of the prompt, among those routing
    accepts (see the module doc); None when none holds enough more than ``baseline`` (the
    worker chosen without affinity, if any) to be worth it: then route to the baseline.

    ``num_blocks``: blocks the hand-off moves without reuse (the lease's); ``u`` uniform in
    [0, 1) breaks ties.
    """
    if not prefix_hashes:
        return None
    excluded = set(exclude)
    live = [hb for hb in heartbeats if hb.role == "decode" and hb.worker not in excluded
            and hb.is_fresh(now, max_age_s)]
    if not live:
        return None
    weighted = any(weights.get(hb.worker, 0.0) > 0 for hb in live)
    floor = min(hb.pressure for hb in live)
    base = next((hb for hb in live if hb.worker == baseline), None)
    base_depth = 0 if base is None else cached_depth(prefix_hashes, set(base.prefix_hashes))
    need = max(config.min_blocks, base_depth + math.ceil(config.min_gain * len(prefix_hashes)))
    best: list[Heartbeat] = []
    best_depth = need - 1
    for hb in live:
        if weighted and weights.get(hb.worker, 0.0) <= 0:
            continue  # the reprioritiser routes nothing here now
        if hb.pressure > config.max_pressure or hb.pressure > floor + config.pressure_slack:
            continue
        depth = cached_depth(prefix_hashes, set(hb.prefix_hashes))
        if hb.num_blocks_free < max(0, num_blocks - depth):
            continue  # no room for the blocks that would still move
        if depth > best_depth:
            best, best_depth = [hb], depth
        elif depth == best_depth and best:
            best.append(hb)
    if not best:
        return None
    if len(best) == 1:
        return AffinityChoice(best[0].worker, best_depth)
    if weighted:
        chosen = choose_weighted({hb.worker: weights[hb.worker] for hb in best}, u)
        assert chosen is not None  # every candidate has a positive weight
        return AffinityChoice(chosen, best_depth)
    low = min(h.pressure for h in best)
    calm = sorted(h.worker for h in best if h.pressure == low)
    return AffinityChoice(calm[min(int(u * len(calm)), len(calm) - 1)], best_depth)

