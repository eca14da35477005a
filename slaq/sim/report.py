"""Per-tier SLA attainment, TTFT/TPOT percentiles and goodput of simulation results; JSON and
PNG output.

Definitions (as ``vllm bench serve`` and DistServe use them): TTFT = first token - arrival;
TPOT = (finish - first token) / (output tokens - 1); a request *meets its SLO* when TTFT and
TPOT are within its tier's targets. Attainment is per tier **asked**: refused, lost and
downgraded requests count as misses unless the asked tier's targets were met anyway;
``ttft_attainment_served`` is the share of the requests served in a tier (tier used) that met
its TTFT target, the figure a tier's SLA covers once admission control has spoken. Goodput = requests meeting every SLO of the tier **used** (what the API told the client) per
second of makespan (first arrival to last completion); ``strict_goodput`` judges by the tier
asked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.sim.simulator import RequestRecord, SimResult


@dataclass(frozen=True, slots=True)
class TierSummary:
    tier: str
    num_requests: int
    ttft_attainment: float
    slo_attainment: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    num_refused: int
    num_downgraded: int
    num_lost: int
    # Requests whose prompt alone takes longer than the tier's TTFT target to prefill on an
    # idle replica: no scheduler can meet them.
    num_infeasible: int
    # TTFT attainment among the requests served in this tier (tier used; downgrades excluded).
    ttft_attainment_served: float | None
    # TTFT attainment (tier asked) among the requests that are feasible on an idle replica:
    # shows how much of the miss is the infeasible share. Not the headline figure.
    ttft_attainment_feasible: float | None = None


@dataclass(frozen=True, slots=True)
class RunSummary:
    name: str
    policy: str
    topology: str
    num_gpus: int
    num_requests: int
    makespan_s: float
    goodput: float
    strict_goodput: float
    goodput_per_gpu: float
    throughput: float
    num_refused: int
    num_downgraded: int
    num_lost: int
    num_preemptions: int
    policy_cycle_p99_ms: float | None
    wall_s: float
    tiers: dict[str, TierSummary]
    decisions: dict[str, int]
    # Planner: (prefill, decode, aggregated) workers, median and max over the arrival span.
    plan_p50: tuple[int, int, int] | None
    plan_max: tuple[int, int, int] | None
    # Disaggregated runs: KV blocks per hand-off (the prompt's) and of those moved (not
    # cached on the decode worker); hand-offs the prefix-affinity rule re-routed.
    prefix_handoff: bool = True
    num_handoffs: int = 0
    kv_blocks_per_handoff: float | None = None
    kv_blocks_moved_per_handoff: float | None = None
    num_affinity_routed: int = 0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _meets(rec: RequestRecord, tiers: TierTable, tier: str) -> bool:
    if rec.refused or rec.finish_s is None:
        return False
    ttft, tpot = rec.ttft_s, rec.tpot_s
    return tiers[tier].meets(None if ttft is None else ttft * 1000.0,
                             None if tpot is None else tpot * 1000.0)


def summarise(result: SimResult, name: str | None = None) -> RunSummary:
    """Tables of one run."""
    cfg = result.config
    tiers = cfg.tiers
    recs = result.records
    profile = cfg.cost_profile
    chunk = cfg.prefill_chunk if result.num_prefill else cfg.aggregated_chunk
    idle: dict[int, float] = {}

    def idle_ms(n: int) -> float:
        if n not in idle:
            idle[n] = 1000.0 * profile.prefill_time(n, chunk)
        return idle[n]

    per_tier = {}
    for t in TIER_NAMES:
        rs = [r for r in recs if r.tier_asked == t]
        if not rs:
            continue
        ttfts = [r.ttft_s * 1000 for r in rs if r.ttft_s is not None]
        tpots = [r.tpot_s * 1000 for r in rs if r.tpot_s is not None]
        target = tiers[t].ttft_ms
        served = [r for r in recs if r.tier_used == t and not r.refused]
        feasible = [r for r in rs if idle_ms(r.num_prompt_tokens) <= target]
        per_tier[t] = TierSummary(
            t, len(rs),
            sum(1 for r in rs if r.ttft_s is not None and r.ttft_s * 1000 <= target) / len(rs),
            sum(1 for r in rs if _meets(r, tiers, t)) / len(rs),
            _pct(ttfts, 50), _pct(ttfts, 99), _pct(tpots, 50), _pct(tpots, 99),
            sum(1 for r in rs if r.refused),
            sum(1 for r in rs if not r.refused and r.tier_used != r.tier_asked),
            sum(1 for r in rs if not r.refused and r.finish_s is None),
            len(rs) - len(feasible),
            (sum(1 for r in served if r.ttft_s is not None and r.ttft_s * 1000 <= target)
             / len(served)) if served else None,
            (sum(1 for r in feasible if r.ttft_s is not None and r.ttft_s * 1000 <= target)
             / len(feasible)) if feasible else None)
    span = max(result.makespan_s, 1e-9)
    good = sum(1 for r in recs if _meets(r, tiers, r.tier_used))
    strict = sum(1 for r in recs if _meets(r, tiers, r.tier_asked))
    topology = ("aggregated" if result.num_aggregated else
                f"disaggregated {result.num_prefill}P+{result.num_decode}D")
    cycles = [c * 1000 for c in result.policy_cycle_s]
    return RunSummary(
        name=name or f"{cfg.policy}-{'agg' if result.num_aggregated else 'disagg'}",
        policy=cfg.policy, topology=topology, num_gpus=cfg.num_gpus, num_requests=len(recs),
        makespan_s=result.makespan_s, goodput=good / span, strict_goodput=strict / span,
        goodput_per_gpu=good / span / cfg.num_gpus,
        throughput=sum(1 for r in recs if r.finish_s is not None) / span,
        num_refused=sum(1 for r in recs if r.refused),
        num_downgraded=sum(1 for r in recs if not r.refused and r.tier_used != r.tier_asked),
        num_lost=sum(1 for r in recs if not r.refused and r.finish_s is None),
        num_preemptions=result.num_preemptions, policy_cycle_p99_ms=_pct(cycles, 99),
        wall_s=result.wall_s, tiers=per_tier, decisions=dict(result.decisions),
        **_plans(result), **_handoffs(result))


def _handoffs(result: SimResult) -> dict[str, object]:
    h = result.handoffs
    moved = h.num_handoffs > 0
    return {"prefix_handoff": result.config.prefix_handoff, "num_handoffs": h.num_handoffs,
            "kv_blocks_per_handoff": h.blocks_per_handoff if moved else None,
            "kv_blocks_moved_per_handoff": h.moved_per_handoff if moved else None,
            "num_affinity_routed": h.num_affinity_routed}


def _plans(result: SimResult) -> dict[str, tuple[int, int, int] | None]:
    span = result.config.trace.duration_s
    pts = [p[1:] for p in result.plans if p[0] <= span] or [p[1:] for p in result.plans]
    if not pts:
        return {"plan_p50": None, "plan_max": None}
    cols = list(zip(*pts, strict=True))
    return {"plan_p50": tuple(int(np.median(c)) for c in cols),
            "plan_max": tuple(int(max(c)) for c in cols)}


def to_jsonable(obj: object) -> object:
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_json(summaries: list[RunSummary], path: str | Path, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"runs": to_jsonable(summaries), **(extra or {})}
    path.write_text(json.dumps(payload, indent=2))
    return path


def format_table(summaries: list[RunSummary]) -> str:
    """Markdown tables: one row per (run, tier), then one per run."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines = ["| run | tier | n | TTFT att. | SLO att. | TTFT att. served | TTFT p50/p99 ms "
             "| TPOT p50/p99 ms | refused | downgr. | infeasible | TTFT att. feasible |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        for t in s.tiers.values():
            lines.append(f"| {s.name} | {t.tier} | {t.num_requests} | {t.ttft_attainment:.1%} | "
                         f"{t.slo_attainment:.1%} | {pct(t.ttft_attainment_served)} | "
                         f"{ms(t.ttft_p50_ms)}/{ms(t.ttft_p99_ms)} | "
                         f"{ms(t.tpot_p50_ms)}/{ms(t.tpot_p99_ms)} | {t.num_refused} | "
                         f"{t.num_downgraded} | {t.num_infeasible} | "
                         f"{pct(t.ttft_attainment_feasible)} |")
    lines += ["", "| run | topology | goodput req/s | per GPU | strict | throughput | makespan s "
              "| lost | preempt. | policy p99 ms | plan p50 P/D/agg | KV blocks moved/hand-off "
              "| wall s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in summaries:
        plan = "-" if s.plan_p50 is None else "/".join(map(str, s.plan_p50))
        cyc = "-" if s.policy_cycle_p99_ms is None else f"{s.policy_cycle_p99_ms:.2f}"
        kv = ("-" if s.kv_blocks_moved_per_handoff is None else
              f"{s.kv_blocks_moved_per_handoff:.0f} of {s.kv_blocks_per_handoff:.0f}")
        lines.append(f"| {s.name} | {s.topology} | {s.goodput:.2f} | {s.goodput_per_gpu:.2f} | "
                     f"{s.strict_goodput:.2f} | {s.throughput:.2f} | {s.makespan_s:.0f} | "
                     f"{s.num_lost} | {s.num_preemptions} | {cyc} | {plan} | {kv} | "
                     f"{s.wall_s:.0f} |")
    return "\n".join(lines)


def plot(summaries: list[RunSummary], path: str | Path, title: str = "") -> Path:
    """Bar charts: TTFT attainment per tier per run, and goodput per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(summaries))
    xs = np.arange(len(TIER_NAMES))
    for k, s in enumerate(summaries):
        vals = [s.tiers[t].ttft_attainment if t in s.tiers else 0.0 for t in TIER_NAMES]
        ax1.bar(xs + k * width, vals, width, label=s.name)
    ax1.set_xticks(xs + width * (len(summaries) - 1) / 2, TIER_NAMES)
    ax1.set_ylabel("TTFT attainment")
    ax1.set_ylim(0, 1.05)
    ax1.legend(fontsize=8)
    ax2.bar([s.name for s in summaries], [s.goodput for s in summaries], color="tab:green")
    ax2.set_ylabel("goodput (req/s meeting every SLO)")
    ax2.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
