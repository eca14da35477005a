"""``slaq bench serve --launch``: several policies on the live stack, one trace, one report.

For each policy in turn the runner starts a fresh :class:`~slaq.bench.stack.Stack` (own Redis,
fresh database, API, beat, sim workers), replays the *same* trace through the streaming API,
waits for the ledger to settle, reconciles every request the client sent against the ledger,
writes that policy's serve report, and stops the stack. Then it writes one JSON with every
policy's per-tier figures, a Markdown table and comparison plots.

Runs (as the simulator's ``slaq sim compare`` names them): ``fifo`` (one queue, no tiers,
aggregated), ``static`` (tier queues and ranks, no pressure signal, disaggregated), ``slaq``
(everything, disaggregated), ``slaq-agg`` (everything, aggregated); ``static-agg`` and
``fifo-disagg`` also exist. Disaggregated stacks split the workers by the cost model's GPU-time
shares of prefill and decode (as the simulator does) unless ``num_prefill`` says otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slaq.bench.serve import ReplayResult, ServeConfig, replay
from slaq.bench.stack import (
    Stack,
    StackConfig,
    decision_counts,
    ledger_rows,
    reconcile,
    wait_settled,
)
from slaq.platform.tiers import TierTable
from slaq.sim.compare import DEFAULT_RUNS
from slaq.sim.compare import RUNS as SIM_RUNS
from slaq.sim.traces import Trace

# The simulator's run names (name -> (policy, disaggregated)), plus a disaggregated fifo.
RUNS: dict[str, tuple[str, bool]] = {**SIM_RUNS, "fifo-disagg": ("fifo", True)}
Echo = Callable[[str], None]


def parse_runs(text: str) -> tuple[str, ...]:
    """``fifo,static,slaq,slaq-agg`` -> the run names, checked and without duplicates."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise ValueError(f"unknown runs {unknown}; known: {sorted(RUNS)}")
    return names


@dataclass(frozen=True)
class LaunchConfig:
    """The stacks to launch (one per run) and how long to wait for each to settle."""

    server_database_url: str
    model_path: str
    out_dir: str = "bench-serve"
    runs: tuple[str, ...] = DEFAULT_RUNS
    num_workers: int = 4
    num_prefill: int | None = None  # disaggregated runs; None: the cost model's split
    sim_profile: str = "llama-8b-h100"
    sim_speed: float = 1.0
    num_blocks: int | None = None
    max_num_seqs: int | None = None
    settle_timeout_s: float = 180.0
    orphan_timeout_s: float = 30.0
    beat_nice: int = -5
    api_threads: int = 512
    keep_database: bool = False
    plot: bool = True

    def __post_init__(self) -> None:
        parse_runs(",".join(self.runs))
        if self.settle_timeout_s <= 0:
            raise ValueError("settle_timeout_s must be > 0")
        # Checked here too, before a long run starts its first stack (each worker is
        # `slaq worker --num-blocks N --max-num-seqs M`, which refuses < 1 as well).
        for name in ("num_blocks", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_prefill is not None and not 1 <= self.num_prefill < self.num_workers:
            raise ValueError("num_prefill must be in [1, num_workers)")


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the cost model says the launched workers sustain on this trace."""

    prefill_tok_s: float  # prompt tokens/s of one prefill worker
    decode_tok_s: float  # output tokens/s of one decode worker
    sustainable_rate: float  # requests/s of the aggregated cluster, every worker busy
    num_prefill: int  # the GPU-time split for disaggregated runs
    decode_batch: int


def capacity(trace: Trace, cfg: LaunchConfig) -> Capacity:
    """Per-worker capacities at the sim speed, with the decode batch capped by the KV pool
    (``num_blocks``) and ``max_num_seqs``, as :mod:`slaq.sim.capacity` computes them."""
    from slaq.gpu_workers.engine.cost_model import get_profile
    from slaq.sim.capacity import split_workers, sustainable_rate, workload_cost

    profile = get_profile(cfg.sim_profile)
    base = workload_cost(trace, profile)
    context = max(1, int(base.mean_prompt + base.mean_output / 2))
    seats = profile.max_num_seqs if cfg.max_num_seqs is None else cfg.max_num_seqs
    if cfg.num_blocks is not None:
        seats = min(seats, cfg.num_blocks * profile.block_size // context)
    cost = workload_cost(trace, replace(profile, max_num_seqs=max(1, seats)))
    s = cfg.sim_speed
    return Capacity(prefill_tok_s=cost.mean_prompt / cost.prefill_s * s,
                    decode_tok_s=cost.mean_output / cost.decode_s * s,
                    sustainable_rate=sustainable_rate(cfg.num_workers, cost) * s,
                    num_prefill=split_workers(cfg.num_workers, cost) if cfg.num_workers > 1
                    else 0, decode_batch=cost.decode_batch)


def stack_config(run: str, cfg: LaunchConfig, cap: Capacity) -> StackConfig:
    policy, disaggregated = RUNS[run]
    overrides = {"prefill_capacity_tok_s": cap.prefill_tok_s,
                 "decode_capacity_tok_s": cap.decode_tok_s}
    return StackConfig(
        server_database_url=cfg.server_database_url, model_path=cfg.model_path,
        num_workers=cfg.num_workers, disaggregated=disaggregated,
        num_prefill=cfg.num_prefill or cap.num_prefill, policy=policy,
        sim_profile=cfg.sim_profile, sim_speed=cfg.sim_speed, num_blocks=cfg.num_blocks,
        max_num_seqs=cfg.max_num_seqs,
        orphan_timeout_s=cfg.orphan_timeout_s,
        policy_overrides=overrides, beat_nice=cfg.beat_nice, api_threads=cfg.api_threads,
        keep_database=cfg.keep_database, name=run)


def _progress_line(run: str, echo: Echo) -> Callable[[dict[str, Any]], None]:
    def show(p: dict[str, Any]) -> None:
        echo(f"[{run}] t={p['t_s']:.0f}s sent {p['sent']}/{p['total']}: finished "
             f"{p['finished']}, refused {p['refused']}, lost {p['lost']}, in flight "
             f"{p['in_flight']}")

    return show


def run_one(run: str, trace: Trace, cfg: LaunchConfig, serve: ServeConfig, cap: Capacity,
            meta: dict[str, Any], echo: Echo) -> tuple[ReplayResult, dict[str, Any]]:
    """One run: fresh stack, replay, settle, reconcile, its own report; the stack is stopped
    whatever happens."""
    from slaq.bench.serve_report import write_report

    out = Path(cfg.out_dir) / run
    out.mkdir(parents=True, exist_ok=True)
    scfg = stack_config(run, cfg, cap)
    roles = [r for _, r in scfg.roles()]
    echo(f"[{run}] starting the stack: policy {scfg.policy}, workers "
         + ", ".join(f"{roles.count(r)} {r}" for r in dict.fromkeys(roles)))
    stack = Stack(scfg, out)
    t_start = time.monotonic()
    try:
        stack.start()
        echo(f"[{run}] ready in {time.monotonic() - t_start:.0f} s; replaying {len(trace)} "
             f"requests over {trace.duration_s:.0f} s")
        result = replay(trace, replace(serve, base_url=stack.base_url, api_key=stack.api_key),
                        progress=_progress_line(run, echo))
        echo(f"[{run}] replay done in {result.duration_s:.0f} s; waiting for the ledger to "
             "settle")
        still_active = wait_settled(stack.database_url, cfg.settle_timeout_s)
        recon = reconcile(result, ledger_rows(stack.database_url))
        decisions = decision_counts(stack.database_url)
    finally:
        stack.stop()
    report = write_report(result, out, label=run, meta=meta, plot=cfg.plot)
    report.update(reconciliation=recon, still_active_in_ledger=still_active,
                  decisions=decisions, stack={"policy": scfg.policy,
                                              "disaggregated": scfg.disaggregated,
                                              "roles": dict((r, roles.count(r)) for r in roles)})
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    echo(f"[{run}] finished {recon['sent'] - recon['lost_ledger']} of {recon['sent']} "
         f"(refused included); lost: client {recon['lost_client']}, ledger "
         f"{recon['lost_ledger']}; still active {still_active}")
    return result, report


def run_launch(trace: Trace, cfg: LaunchConfig, serve: ServeConfig,
               meta: dict[str, Any] | None = None, echo: Echo = print) -> dict[str, Any]:
    """Every run of ``cfg.runs`` on ``trace``; writes ``<out_dir>/compare.json``,
    ``comparison.md`` and the comparison PNGs, and returns the combined report."""
    from slaq.bench.serve_report import (
        format_comparison,
        plot_policy_comparison,
        plot_policy_ttft_cdf,
        run_summary,
    )

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cap = capacity(trace, cfg)
    load = trace.rate / cap.sustainable_rate if cap.sustainable_rate > 0 else None
    meta = {**(meta or {}), "capacity": asdict(cap),
            "offered_load": None if load is None else round(load, 3)}
    echo(f"{len(cfg.runs)} runs ({', '.join(cfg.runs)}) on {len(trace)} requests at "
         f"{trace.rate:.2f} req/s; cost model: the aggregated cluster sustains "
         f"{cap.sustainable_rate:.2f} req/s (offered load {load or 0:.2f}x)")
    results: dict[str, ReplayResult] = {}
    reports: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for i, run in enumerate(cfg.runs):
        echo(f"== run {i + 1}/{len(cfg.runs)}: {run} ({time.monotonic() - t0:.0f} s elapsed)")
        results[run], report = run_one(run, trace, cfg, serve, cap, meta, echo)
        reports.append(report)
    tiers = TierTable()
    combined: dict[str, Any] = {
        **meta, "config": {**asdict(cfg), "serve": {k: v for k, v in asdict(serve).items()
                                                    if k not in ("api_key", "base_url")}},
        "runs": list(cfg.runs), "wall_s": round(time.monotonic() - t0, 1),
        "policies": {r["label"]: run_summary(r) for r in reports},
        "files": {"comparison": str(out / "comparison.md")},
    }
    table = format_comparison(reports)
    (out / "comparison.md").write_text(table + "\n")
    if cfg.plot:
        combined["files"]["attainment"] = str(plot_policy_comparison(
            reports, out / "policies_attainment_goodput.png"))
        combined["files"]["ttft_cdf"] = str(plot_policy_ttft_cdf(
            results, tiers, out / "policies_ttft_cdf.png"))
    (out / "compare.json").write_text(json.dumps(combined, indent=2, default=str) + "\n")
    combined["table"] = table
    return combined
