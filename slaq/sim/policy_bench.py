"""How long one policy cycle takes on a big synthetic snapshot (64 workers, 10k queued)."""

from __future__ import annotations

import random
import time

import numpy as np

from slaq.platform.policy import PolicyConfig, PolicyState, decide
from slaq.platform.pressure import Heartbeat
from slaq.platform.snapshot import Arrivals, QueuedRequest, QueueStats, Snapshot
from slaq.platform.tiers import TIER_NAMES, TierTable


def synthetic_snapshot(num_workers: int = 64, num_queued: int = 10_000, now: float = 1000.0,
                       seed: int = 0) -> Snapshot:
    """Half prefill, half decode workers at random pressures; queued requests of every tier
    with ages spread over their TTFT targets (so many are inside the aging window)."""
    rng = random.Random(seed)
    tiers = TierTable()
    hbs = []
    for i in range(num_workers):
        role = "prefill" if i % 2 == 0 else "decode"
        total = 20_000
        hbs.append(Heartbeat(worker=f"w{i}", role=role, num_blocks_total=total,
                             num_blocks_used=rng.randrange(total), num_running=rng.randrange(256),
                             prefill_tokens_per_s=rng.uniform(0, 40_000), time=now - 0.2))
    queued = []
    for i in range(num_queued):
        tier = TIER_NAMES[i % len(TIER_NAMES)]
        age = rng.uniform(0, tiers[tier].ttft_ms / 1000.0)
        queued.append(QueuedRequest(str(i), 0, tier, now - age, rng.randrange(100, 8000), tier,
                                    tiers[tier].queue_priority, now - age))
    queues = {t: QueueStats(num_queued // 4, num_queued // 4 * 1000) for t in TIER_NAMES}
    arrivals = {t: Arrivals(50, 50_000, 10_000) for t in TIER_NAMES}
    return Snapshot(now=now, heartbeats=tuple(hbs), queues=queues, queued=tuple(queued),
                    arrivals=arrivals)


def bench_policy(num_workers: int = 64, num_queued: int = 10_000,
                 repeats: int = 50) -> dict[str, float]:
    """Milliseconds per :func:`decide` call: p50, p99, max over ``repeats`` cycles."""
    tiers = TierTable()
    config = PolicyConfig()
    snap = synthetic_snapshot(num_workers, num_queued)
    state = PolicyState(time=snap.now - 1.0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decide(snap, state, tiers, config)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"num_workers": num_workers, "num_queued": num_queued,
            "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "max_ms": max(times)}
