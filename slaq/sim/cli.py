"""``slaq sim``: simulate a trace in virtual time; compare policies; list cost profiles."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from slaq.sim.compare import DEFAULT_RUNS, RUNS, CompareConfig, compare

DEFAULT_TRACE = "../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"


def _trace_options(f):
    f = click.option("--trace", "trace_path", default=DEFAULT_TRACE, show_default=True,
                     help="Mooncake .jsonl or Azure .csv trace.")(f)
    f = click.option("--gpus", "num_gpus", default=8, show_default=True, type=int)(f)
    f = click.option("--profile", default="llama-8b-h100", show_default=True,
                     help="Cost profile (see `slaq sim profiles`).")(f)
    f = click.option("--load", default=1.3, show_default=True, type=float,
                     help="Arrival rate as a multiple of the measured sustainable rate.")(f)
    f = click.option("--scaling", type=click.Choice(["time", "replicate"]), default="time",
                     show_default=True,
                     help="time: compress arrivals; replicate: copy requests, keep times.")(f)
    f = click.option("--start", "start_s", default=0.0, show_default=True, type=float,
                     help="Start of the window of the original trace (s).")(f)
    f = click.option("--duration", "duration_s", default=None, type=float,
                     help="Length of that window (s); default: the whole trace.")(f)
    f = click.option("--prompt-scale", default=1.0, show_default=True, type=float)(f)
    f = click.option("--seed", default=0, show_default=True, type=int)(f)
    f = click.option("--tiers-file", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="JSON overrides of tier targets (as SLAQ_TIERS_FILE).")(f)
    f = click.option("--out", "out_dir", default="sim-results", show_default=True,
                     help="Directory for JSON, PNG and Markdown tables.")(f)
    return f


@click.group()
def sim() -> None:
    """Discrete-event simulation over public traces (same policy, scheduler, block manager)."""


@sim.command("compare")
@_trace_options
@click.option("--runs", default=",".join(DEFAULT_RUNS), show_default=True,
              help=f"Comma-separated, from: {', '.join(RUNS)}.")
def compare_cmd(runs: str, out_dir: str, tiers_file: str | None, **kwargs) -> None:
    """Run several policies on the same scaled trace; print the tables."""
    from slaq.platform.tiers import TierTable
    from slaq.sim.report import format_table

    cfg = CompareConfig(runs=tuple(r.strip() for r in runs.split(",") if r.strip()),
                        tiers=TierTable.from_file(tiers_file), **kwargs)
    comp = compare(cfg, out_dir)
    click.echo(f"trace: {len(comp.trace)} requests at {comp.trace.rate:.2f} req/s = {cfg.load}x "
               f"sustainable {comp.sustainable_rate:.2f} req/s (analytic "
               f"{comp.analytic_rate:.2f}); outputs in {out_dir}/")
    click.echo(format_table(comp.summaries))


@sim.command("run")
@_trace_options
@click.option("--policy", type=click.Choice(list(RUNS)), default="slaq", show_default=True)
def run_cmd(policy: str, out_dir: str, tiers_file: str | None, **kwargs) -> None:
    """One policy (``slaq-agg`` = slaq on aggregated workers)."""
    from slaq.platform.tiers import TierTable
    from slaq.sim.report import format_table

    comp = compare(CompareConfig(runs=(policy,), tiers=TierTable.from_file(tiers_file),
                                 **kwargs), out_dir)
    click.echo(format_table(comp.summaries))


@sim.command("profiles")
def profiles_cmd() -> None:
    """The named cost profiles and their constants."""
    from slaq.gpu_workers.engine.cost_model import PROFILES

    out = {name: {**asdict(p), "num_kv_blocks": p.num_kv_blocks} for name, p in PROFILES.items()}
    click.echo(json.dumps(out, indent=2))


@sim.command("bench-policy")
@click.option("--workers", default=64, show_default=True, type=int)
@click.option("--queued", default=10_000, show_default=True, type=int)
def bench_policy_cmd(workers: int, queued: int) -> None:
    """Time one reprioritiser cycle on a synthetic snapshot."""
    from slaq.sim.policy_bench import bench_policy

    click.echo(json.dumps(bench_policy(workers, queued), indent=2))


@sim.command("calibrate")
@click.option("--model", "model_path", required=True, help="HF-style model directory.")
@click.option("--base", default="smollm2-135m-cpu", show_default=True,
              help="Profile whose model and hardware figures the fit starts from.")
@click.option("--device", default="cpu", show_default=True)
def calibrate_cmd(model_path: str, base: str, device: str) -> None:
    """Measure our torch engine on a grid of prompts and batches; print the fitted profile."""
    from slaq.gpu_workers.engine.config import EngineConfig
    from slaq.gpu_workers.engine.cost_model import calibrate_engine, get_profile
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_path, device=device))
    try:
        profile, samples = calibrate_engine(engine, get_profile(base), name=f"{base}-measured")
    finally:
        engine.close()
    out = {**asdict(profile), "num_samples": len(samples)}
    click.echo(json.dumps(out, indent=2))
