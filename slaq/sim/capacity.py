"""Capacity arithmetic from the cost model: per-request GPU time, the prefill/decode split,
per-worker capacities for the policy, and the analytic sustainable rate of a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from slaq.gpu_workers.engine.cost_model import CostProfile
from slaq.platform.policy import PolicyConfig
from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.sim.traces import Trace


@dataclass(frozen=True, slots=True)
class WorkloadCost:
    """Mean GPU seconds a request of the trace costs in each phase, on one replica."""

    mean_prompt: float
    mean_output: float
    prefill_s: float
    decode_s: float
    decode_batch: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def workload_cost(trace: Trace, profile: CostProfile, prefill_chunk: int | None = None,
                  sample: int = 2000) -> WorkloadCost:
    """Prefill: each sampled prompt alone in chunks; decode: a full batch at the mean context
    (batch limited by ``max_num_seqs`` and by how many mean contexts fit the KV pool)."""
    reqs = trace.requests
    step = max(1, len(reqs) // sample)
    picked = reqs[::step]
    mean_prompt = sum(r.num_prompt_tokens for r in picked) / len(picked)
    mean_output = sum(r.num_output_tokens for r in picked) / len(picked)
    prefill_s = sum(profile.prefill_time(r.num_prompt_tokens, prefill_chunk)
                    for r in picked) / len(picked)
    context = int(mean_prompt + mean_output / 2)
    batch = max(1, min(profile.max_num_seqs, profile.kv_capacity_tokens // max(1, context)))
    per_token = profile.decode_step_time(batch, context) / batch
    return WorkloadCost(mean_prompt, mean_output, prefill_s, mean_output * per_token, batch)


def split_workers(num_gpus: int, cost: WorkloadCost) -> int:
    """Prefill workers for a disaggregated cluster: GPU time shares, at least one of each."""
    if num_gpus < 2:
        raise ValueError("disaggregation needs at least 2 GPUs")
    n = round(num_gpus * cost.prefill_s / cost.total_s)
    return min(num_gpus - 1, max(1, n))


def sustainable_rate(num_gpus: int, cost: WorkloadCost) -> float:
    """Requests/s a cluster of ``num_gpus`` replicas completes when every GPU is busy."""
    return num_gpus / cost.total_s


def policy_config_for(preset: str, cost: WorkloadCost, **overrides) -> PolicyConfig:
    """The policy's per-worker capacities from the cost model (what a live deployment would
    measure): prompt tokens/s of a prefill worker, output tokens/s of a decode worker."""
    prefill = cost.mean_prompt / cost.prefill_s
    decode = cost.mean_output / cost.decode_s
    return PolicyConfig.preset(preset, prefill_capacity_tok_s=prefill,
                               decode_capacity_tok_s=decode, **overrides)


def infeasible_shares(trace: Trace, profile: CostProfile, tiers: TierTable,
                      ways: tuple[int, ...], prefill_chunk: int | None = None
                      ) -> dict[str, dict[int, float]]:
    """Per tier of the trace, per ``k`` in ``ways``: the share of its requests whose prompt
    alone takes longer than the tier's TTFT target even when ``k`` idle replicas prefill it
    together with perfect scaling (``prefill_time / k``: context parallelism at no cost).

    No scheduler can meet those TTFTs, so ``1 - share`` bounds the tier's TTFT attainment
    from above; ``k = 1`` is the report's "infeasible" column.
    """
    if not ways or min(ways) < 1:
        raise ValueError("ways must be integers >= 1")
    seconds: dict[int, float] = {}
    out: dict[str, dict[int, float]] = {}
    for name in TIER_NAMES:
        reqs = [r for r in trace.requests if r.tier == name]
        if not reqs:
            continue
        target_s = tiers[name].ttft_ms / 1000.0
        times = []
        for r in reqs:
            n = r.num_prompt_tokens
            if n not in seconds:
                seconds[n] = profile.prefill_time(n, prefill_chunk)
            times.append(seconds[n])
        out[name] = {k: sum(1 for t in times if t / k > target_s) / len(times) for k in ways}
    return out
