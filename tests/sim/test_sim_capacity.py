"""Capacity arithmetic from the cost model: GPU time per request, P/D split, policy capacities."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.cost_model import get_profile
from slaq.platform.tiers import TierTable
from slaq.sim.capacity import (
    WorkloadCost,
    infeasible_shares,
    policy_config_for,
    split_workers,
    sustainable_rate,
    workload_cost,
)
from slaq.sim.traces import Trace, TraceRequest

H100 = get_profile("llama-8b-h100")


def trace_of(prompt: int, output: int, n: int = 10) -> Trace:
    return Trace("t", tuple(TraceRequest(float(i), prompt, output) for i in range(n)))


def test_workload_cost_follows_the_profile():
    cost = workload_cost(trace_of(1000, 200), H100)
    assert cost.prefill_s == pytest.approx(H100.prefill_time(1000))
    assert cost.decode_batch == 256  # KV holds far more than 256 contexts of 1.1k tokens
    assert cost.decode_s == pytest.approx(200 * H100.decode_step_time(256, 1100) / 256)
    # Long contexts: the KV pool, not max_num_seqs, limits the decode batch.
    long = workload_cost(trace_of(60_000, 100), H100)
    assert long.decode_batch == H100.kv_capacity_tokens // 60_050


def test_split_and_sustainable_rate():
    cost = WorkloadCost(1000, 200, prefill_s=0.03, decode_s=0.01, decode_batch=256)
    assert split_workers(8, cost) == 6
    assert split_workers(2, cost) == 1
    assert split_workers(8, WorkloadCost(1, 1, 0.001, 1.0, 1)) == 1  # at least one prefill
    assert sustainable_rate(8, cost) == pytest.approx(8 / 0.04)
    with pytest.raises(ValueError):
        split_workers(1, cost)


def test_policy_capacities_come_from_the_cost_model():
    cost = WorkloadCost(1000, 200, prefill_s=0.025, decode_s=0.02, decode_batch=256)
    cfg = policy_config_for("slaq", cost, admission_margin=0.8)
    assert cfg.prefill_capacity_tok_s == pytest.approx(40_000)
    assert cfg.decode_capacity_tok_s == pytest.approx(10_000)
    assert cfg.admission_margin == 0.8 and cfg.enable_admission
    assert not policy_config_for("fifo", cost).enable_admission


def test_infeasible_shares_bound_ttft_attainment_per_tier_and_ways():
    tiers = TierTable()  # priority 1 s, default 3 s
    lengths = (1_000, 30_000, 60_000, 120_000)
    reqs = [TraceRequest(float(i), n, 10, tier=t)
            for i, (n, t) in enumerate((n, t) for t in ("priority", "default") for n in lengths)]
    shares = infeasible_shares(Trace("t", tuple(reqs)), H100, tiers, (1, 2, 8))
    assert set(shares) == {"priority", "default"}  # tiers the trace holds
    for tier, by_k in shares.items():
        target = tiers[tier].ttft_ms / 1000
        for k, share in by_k.items():
            slow = sum(1 for n in lengths if H100.prefill_time(n) / k > target)
            assert share == pytest.approx(slow / len(lengths))
        assert by_k[1] >= by_k[2] >= by_k[8]
    # The 120k-token prompt misses 1 s on one replica; the 1k one never misses.
    assert 0 < shares["priority"][8] <= shares["priority"][1] < 1
    assert shares["priority"][1] > shares["default"][1]
    with pytest.raises(ValueError):
        infeasible_shares(Trace("t", tuple(reqs)), H100, tiers, (0,))
