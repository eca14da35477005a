"""``slaq sim``: simulate a trace in virtual time; compare policies; list cost profiles."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import click

from slaq.sim.compare import DEFAULT_RUNS, NO_PREFIX_SUFFIX, RUNS, CompareConfig, compare

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
    f = click.option("--prefix-handoff/--no-prefix-handoff", default=True, show_default=True,
                     help="Disaggregated runs: decode workers reuse cached prompt blocks on "
                          "hand-off and routing prefers the worker holding the prefix "
                          f"(off for one run only: a run name ending in {NO_PREFIX_SUFFIX}).")(f)
    return f


@click.group()
def sim() -> None:
    """Discrete-event simulation over public traces (same policy, scheduler, block manager)."""


@sim.command("compare")
@_trace_options
@click.option("--runs", default=",".join(DEFAULT_RUNS), show_default=True,
              help=f"Comma-separated, from: {', '.join(RUNS)} (each optionally with "
                   f"{NO_PREFIX_SUFFIX}, e.g. slaq,slaq{NO_PREFIX_SUFFIX}).")
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
    """The named cost profiles and their constants (calibrated ones with their provenance)."""
    from slaq.gpu_workers.engine.cost_model import all_profiles
    from slaq.gpu_workers.engine.profiles_store import calibrated_profiles

    calibrated = calibrated_profiles()
    out = {}
    for name, p in all_profiles().items():
        out[name] = {**asdict(p), "num_kv_blocks": p.num_kv_blocks}
        if name in calibrated:
            r = calibrated[name]
            out[name]["calibration"] = {"base": r.base, "date": r.date,
                                        "measured_on": r.measured_on,
                                        "num_samples": r.num_samples, "fit_error": r.fit_error}
    click.echo(json.dumps(out, indent=2))


@sim.command("bench-policy")
@click.option("--workers", default=64, show_default=True, type=int)
@click.option("--queued", default=10_000, show_default=True, type=int)
def bench_policy_cmd(workers: int, queued: int) -> None:
    """Time one reprioritiser cycle on a synthetic snapshot."""
    from slaq.sim.policy_bench import bench_policy

    click.echo(json.dumps(bench_policy(workers, queued), indent=2))


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@sim.command("feasibility")
@click.option("--trace", "trace_path", default=DEFAULT_TRACE, show_default=True,
              help="Mooncake .jsonl or Azure .csv trace.")
@click.option("--profile", default="llama-8b-h100", show_default=True)
@click.option("--ways", default="1,2,4,5,8", show_default=True,
              help="Replicas prefilling one prompt together (perfect scaling).")
@click.option("--chunk", default=8192, show_default=True, type=click.IntRange(1),
              help="Prefill chunk (tokens per step).")
@click.option("--prompt-scale", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Tier draw.")
@click.option("--tiers-file", default=None, type=click.Path(exists=True, dir_okay=False))
def feasibility_cmd(trace_path: str, profile: str, ways: str, chunk: int, prompt_scale: float,
                    seed: int, tiers_file: str | None) -> None:
    """Per tier: the share of requests no scheduler can serve within the TTFT target, even
    with k idle replicas prefilling each prompt together (a ceiling on TTFT attainment)."""
    from slaq.gpu_workers.engine.cost_model import get_profile
    from slaq.platform.tiers import TierTable
    from slaq.sim.capacity import infeasible_shares
    from slaq.sim.traces import assign_tiers, load_trace, scale_tokens

    trace = load_trace(trace_path)
    if prompt_scale != 1.0:
        trace = scale_tokens(trace, prompt_factor=prompt_scale)
    trace = assign_tiers(trace, seed=seed)
    tiers = TierTable.from_file(tiers_file)
    try:
        shares = infeasible_shares(trace, get_profile(profile), tiers, _ints(ways), chunk)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ways") from None
    click.echo(json.dumps({
        "trace": trace.name, "profile": profile, "num_requests": len(trace.requests),
        "chunk": chunk, "seed": seed,
        "ttft_target_ms": {t: tiers[t].ttft_ms for t in shares},
        "infeasible_share": {t: {str(k): round(v, 4) for k, v in by_k.items()}
                             for t, by_k in shares.items()},
        "attainment_ceiling": {t: {str(k): round(1 - v, 4) for k, v in by_k.items()}
                               for t, by_k in shares.items()},
    }, indent=2))


@sim.command("calibrate")
@click.option("--model", "model_path", default=None,
              help="HF-style model directory to measure (or a model-store name).")
@click.option("--samples", "samples_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="Fit recorded samples (a *.samples.json) instead of measuring.")
@click.option("--base", default=None,
              help="Profile whose model and hardware figures the fit starts from "
                   "[default: the samples file's own, else smollm2-135m-cpu].")
@click.option("--name", default=None, help="Name of the fitted profile [default: BASE-measured].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--prompt-lens", default="16,64,256", show_default=True,
              callback=lambda ctx, param, v: _ints(v))
@click.option("--batch-sizes", default="1,4,16", show_default=True,
              callback=lambda ctx, param, v: _ints(v))
@click.option("--max-tokens", default=8, show_default=True, type=int)
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1),
              help="Measure the grid (and the validation) this many times; each step's "
                   "fastest time counts (a shared machine slows some runs down).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch CPU threads [default: torch's, one per core]; recorded with the "
                   "profile.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="Write the profile JSON here and the samples beside it (NAME.samples.json).")
@click.option("--validate", is_flag=True,
              help="Also time 8 requests (prompts 64-256, 32 new tokens) on the --model engine "
                   "and compare with the sim engine's prediction (with --samples too).")
def calibrate_cmd(model_path: str | None, samples_file: str | None, base: str | None,
                  name: str | None, device: str, dtype: str, prompt_lens: tuple[int, ...],
                  batch_sizes: tuple[int, ...], max_tokens: int, repeats: int,
                  threads: int | None, out_file: str | None, validate: bool) -> None:
    """Measure our torch engine on a grid of prompts and batches (or read recorded samples),
    fit a cost profile, report its error on held-out grid cells; print the profile."""
    from slaq.gpu_workers.engine import profiles_store as store
    from slaq.gpu_workers.engine.cost_model import get_profile
    from slaq.sim import calibration

    if model_path is None and samples_file is None:
        raise click.UsageError("give --model (measure it) or --samples (fit recorded steps)")
    if validate and model_path is None:
        raise click.UsageError("--validate runs the engine: it needs --model")
    if samples_file and model_path and not validate:
        raise click.UsageError("with --samples, --model only serves --validate")
    meta: dict = {}
    if samples_file:
        samples, meta = store.read_samples(samples_file)
        measured_on = meta.get("measured_on") or {}
        extra = {"grid": meta.get("grid"), "samples_from": Path(samples_file).name}
    if base is None and "base_profile" in meta:
        base_profile = store.profile_from_dict(meta["base_profile"])
        base = base_profile.name
    else:
        base = base or meta.get("base") or "smollm2-135m-cpu"
        base_profile = get_profile(base)
    name = name or f"{base}-measured"
    engine = None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if model_path is not None:
        grid = calibration.Grid(prompt_lens, batch_sizes, max_tokens)
        engine = calibration.build_engine(_model_dir(model_path), device, dtype, grid)
    try:
        if not samples_file:
            before = calibration.host_info(device)
            samples = _measure_with_progress(calibration, engine, grid, repeats)
            # The load average says whether others shared the cores while we measured.
            measured_on = {**calibration.host_info(device), "model": Path(model_path).name,
                           "dtype": dtype, "load_avg_1m_before": before.get("load_avg_1m")}
            extra = {"grid": {"prompt_lens": list(prompt_lens),
                              "batch_sizes": list(batch_sizes), "max_tokens": max_tokens,
                              "repeats": repeats}}
            meta = {"base": base, "measured_on": measured_on, "grid": extra["grid"]}
        record = calibration.fit(base_profile, base, samples, name, measured_on, extra)
        if validate:
            check = calibration.validate(engine, record.profile, repeats=repeats)
            record = replace(record, extra={**record.extra, "validation": check})
    finally:
        if engine is not None:
            engine.close()
    if out_file:
        path, spath = store.write_profile(out_file, record, samples, meta)
        click.echo(f"wrote {path} and {spath}", err=True)
    click.echo(json.dumps({**asdict(record.profile), "num_samples": record.num_samples,
                           "fit_error": record.fit_error,
                           **{k: v for k, v in record.extra.items() if k == "validation"}},
                          indent=2))


def _model_dir(name_or_path: str) -> Path:
    from slaq.gpu_workers.model_store import resolve_model
    from slaq.platform.settings import Settings

    return resolve_model(name_or_path, Settings.from_env().models_dir)


def _measure_with_progress(calibration, engine, grid, repeats: int) -> list:
    """Measure with a progress bar on stderr (none when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    cells = len(grid.prompt_lens) * len(grid.batch_sizes) * repeats
    with Progress(TextColumn("measuring grid cells"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("cells", total=cells)
        return calibration.measure(engine, grid, repeats=repeats,
                                   progress=lambda done, total: bar.update(task, completed=done))
