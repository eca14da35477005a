"""Policies compared on one trace: measure the cluster's sustainable rate, scale the trace to a
multiple of it, run ``fifo`` / ``static`` / ``slaq`` / ``slaq`` aggregated, write JSON + PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slaq.gpu_workers.engine.cost_model import get_profile
from slaq.platform.tiers import TierTable
from slaq.sim.capacity import sustainable_rate, workload_cost
from slaq.sim.report import RunSummary, format_table, plot, summarise, write_json
from slaq.sim.simulator import SimConfig, run_simulation
from slaq.sim.traces import Trace, assign_tiers, load_trace, replicate, scale_time, window

# name -> (policy, disaggregated)
RUNS: dict[str, tuple[str, bool]] = {
    "fifo": ("fifo", False),
    "static": ("static", True),
    "slaq": ("slaq", True),
    "slaq-agg": ("slaq", False),
    "static-agg": ("static", False),
}
DEFAULT_RUNS = ("fifo", "static", "slaq", "slaq-agg")
# A run name with this suffix (``slaq-noprefix``) is that run without the prefix-aware
# hand-off (every KV block moves, routing ignores cached prefixes): both in one invocation.
NO_PREFIX_SUFFIX = "-noprefix"


def run_spec(name: str, prefix_handoff: bool = True) -> tuple[str, bool, bool]:
    """``(policy, disaggregated, prefix_handoff)`` of a run name (see :data:`RUNS`)."""
    if name.endswith(NO_PREFIX_SUFFIX) and name[: -len(NO_PREFIX_SUFFIX)] in RUNS:
        return (*RUNS[name[: -len(NO_PREFIX_SUFFIX)]], False)
    if name not in RUNS:
        raise ValueError(f"unknown run {name!r}; known: {sorted(RUNS)}, each optionally "
                         f"with {NO_PREFIX_SUFFIX!r}")
    return (*RUNS[name], prefix_handoff)


@dataclass(frozen=True)
class CompareConfig:
    """A comparison: which trace, how scaled, which cluster, which runs."""

    trace_path: str
    num_gpus: int = 8
    profile: str = "llama-8b-h100"
    load: float = 1.3  # arrival rate as a multiple of the measured sustainable rate
    scaling: str = "time"  # "time": compress arrivals; "replicate": keep times (and bursts)
    start_s: float = 0.0
    duration_s: float | None = None  # of the original trace; None = all of it
    prompt_scale: float = 1.0
    seed: int = 0
    runs: tuple[str, ...] = DEFAULT_RUNS
    capacity_requests: int | None = None  # None: the whole trace
    tiers: TierTable = field(default_factory=TierTable)
    # False: no run uses the prefix-aware hand-off (SimConfig.prefix_handoff).
    prefix_handoff: bool = True

    def __post_init__(self) -> None:
        if self.load <= 0:
            raise ValueError("load must be > 0")
        if self.scaling not in ("time", "replicate"):
            raise ValueError("scaling must be 'time' or 'replicate'")
        for name in self.runs:
            run_spec(name)  # raises ValueError for an unknown name


@dataclass
class Comparison:
    config: CompareConfig
    trace: Trace
    sustainable_rate: float
    analytic_rate: float
    summaries: list[RunSummary]


def measure_capacity(trace: Trace, num_gpus: int, profile: str, num_requests: int | None = None,
                     tiers: TierTable | None = None) -> float:
    """Sustainable rate (req/s) of ``fifo`` on aggregated workers, measured in saturation.

    The first ``num_requests`` (default all) of the trace arrive, in trace order, at twice
    the analytic capacity, so a backlog forms early and never drains while arrivals go on.
    The cluster's token rate (prefill computed + decoded) over the last three quarters of the
    arrival span, divided by the tokens a request costs on average over the whole run
    (prefix-cache hits and recomputes included), is the request rate it sustains. Token rates
    have no lag, unlike completion counts, which trail arrivals by a request's latency.
    """
    head = Trace(trace.name, trace.requests[:num_requests])
    guess = sustainable_rate(num_gpus, workload_cost(head, get_profile(profile)))
    head = scale_time(head, 2.0 * guess / head.rate)
    # fifo decides nothing: the policy tick only samples the token counters here.
    res = run_simulation(SimConfig(trace=head, policy="fifo", num_gpus=num_gpus, profile=profile,
                                   tiers=tiers or TierTable(),
                                   policy_interval_s=min(1.0, head.duration_s / 40)))
    lo, hi = 0.25 * head.duration_s, head.duration_s
    window_pts = [p for p in res.token_series if lo <= p[0] <= hi]
    done = sum(1 for r in res.records if r.finish_s is not None)
    if len(window_pts) < 2 or done == 0:
        raise ValueError("trace too short to measure capacity")
    (t0, p0, d0), (t1, p1, d1) = window_pts[0], window_pts[-1]
    _, p_end, d_end = res.token_series[-1]
    tokens_per_request = (p_end + d_end) / done
    return (p1 + d1 - p0 - d0) / (t1 - t0) / tokens_per_request


def prepare_trace(cfg: CompareConfig) -> tuple[Trace, float, float]:
    """Load, cut, tier and scale the trace to ``cfg.load`` x the sustainable rate."""
    from slaq.sim.traces import scale_tokens

    trace = load_trace(cfg.trace_path)
    if cfg.duration_s is not None or cfg.start_s:
        trace = window(trace, cfg.start_s, cfg.duration_s or trace.duration_s + 1)
    if cfg.prompt_scale != 1.0:
        trace = scale_tokens(trace, prompt_factor=cfg.prompt_scale)
    trace = assign_tiers(trace, seed=cfg.seed)
    profile = get_profile(cfg.profile)
    analytic = sustainable_rate(cfg.num_gpus, workload_cost(trace, profile))
    measured = measure_capacity(trace, cfg.num_gpus, cfg.profile, cfg.capacity_requests,
                                cfg.tiers)
    factor = cfg.load * measured / trace.rate
    if cfg.scaling == "time":
        trace = scale_time(trace, factor)
    else:
        trace = assign_tiers(replicate(trace, factor, seed=cfg.seed), seed=cfg.seed)
    return trace, measured, analytic


def compare(cfg: CompareConfig, out_dir: str | Path | None = None) -> Comparison:
    """Run every configured policy on the same scaled trace; write JSON + PNG to ``out_dir``."""
    trace, measured, analytic = prepare_trace(cfg)
    summaries = []
    for name in cfg.runs:
        policy, disagg, prefix = run_spec(name, cfg.prefix_handoff)
        result = run_simulation(SimConfig(trace=trace, policy=policy, num_gpus=cfg.num_gpus,
                                          profile=cfg.profile, disaggregated=disagg,
                                          tiers=cfg.tiers, seed=cfg.seed,
                                          prefix_handoff=prefix))
        summaries.append(summarise(result, name))
    comp = Comparison(cfg, trace, measured, analytic, summaries)
    if out_dir is not None:
        write_outputs(comp, out_dir)
    return comp


def write_outputs(comp: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    stem = f"{Path(comp.config.trace_path).stem}-{comp.config.num_gpus}gpu-{comp.config.profile}"
    extra = {
        "trace": comp.config.trace_path, "num_requests": len(comp.trace),
        "arrival_rate": comp.trace.rate, "sustainable_rate_measured": comp.sustainable_rate,
        "sustainable_rate_analytic": comp.analytic_rate, "load": comp.config.load,
        "scaling": comp.config.scaling, "profile": comp.config.profile,
        "num_gpus": comp.config.num_gpus, "prompt_scale": comp.config.prompt_scale,
        "prefix_handoff": comp.config.prefix_handoff,
    }
    j = write_json(comp.summaries, out / f"{stem}.json", extra)
    p = plot(comp.summaries, out / f"{stem}.png",
             f"{stem}: {comp.config.load}x sustainable ({comp.sustainable_rate:.1f} req/s)")
    (out / f"{stem}.md").write_text(format_table(comp.summaries) + "\n")
    return j, p
