"""``slaq bench serve``: replay a public trace against a running stack; JSON and PNG report.

The click command is attached to the ``bench`` group by ``slaq/bench/cli.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from slaq.platform.tiers import TIER_NAMES
from slaq.sim import traces

TRACE_FILES = {
    "azure": "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "mooncake": "mooncake/conversation_trace.jsonl",
}


def traces_dir() -> Path:
    """``SLAQ_TRACES_DIR``, else ``shared/traces`` beside the checkout or inside it."""
    if env := os.environ.get("SLAQ_TRACES_DIR"):
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for cand in (root.parent / "shared" / "traces", root / "shared" / "traces"):
        if cand.is_dir():
            return cand
    return Path("../shared/traces")


def resolve_trace(name: str) -> Path:
    """``azure``, ``mooncake`` or a path to a ``.csv`` / ``.jsonl`` trace."""
    path = traces_dir() / TRACE_FILES[name] if name in TRACE_FILES else Path(name)
    if not path.is_file():
        raise click.BadParameter(f"trace file {path} not found", param_hint="--trace")
    return path


def parse_tier_mix(text: str | None) -> dict[str, float]:
    """``"priority=0.2,default=0.5,flex=0.3"``; default 20/50/15/15 (flex and batch share 30%)."""
    if not text:
        return dict(traces.DEFAULT_TIER_MIX)
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or name not in TIER_NAMES or weight < 0:
            raise click.BadParameter(f"expected tier=weight pairs over {TIER_NAMES}, "
                                     f"got {part!r}", param_hint="--tier-mix")
        mix[name] = weight
    if sum(mix.values()) <= 0:
        raise click.BadParameter("tier weights sum to 0", param_hint="--tier-mix")
    return mix


def build_trace(trace: str, start_s: float, duration_s: float | None, time_scale: float,
                token_scale: float, max_input_tokens: int | None,
                max_output_tokens: int | None, mix: dict[str, float], seed: int,
                max_requests: int) -> traces.Trace:
    """Load, take the window, scale, fit lengths, assign tiers, cap the count."""
    from slaq.bench.serve import fit_lengths

    path = resolve_trace(trace)
    t = traces.load_trace(path)
    if start_s or duration_s is not None:
        t = traces.window(t, start_s, duration_s if duration_s is not None else float("inf"))
    t = traces.scale_time(t, time_scale)
    if token_scale != 1.0:
        t = traces.scale_tokens(t, token_scale, token_scale)
    t = fit_lengths(t, max_input_tokens, max_output_tokens)
    t = traces.assign_tiers(t, mix, seed)
    return traces.Trace(t.name, t.requests[:max_requests])


def trace_options(*, duration_s: float, time_scale: float, token_scale: float,
                  max_input_tokens: int | None, max_output_tokens: int | None,
                  max_requests: int) -> Callable[[Callable], Callable]:
    """The trace-selection options shared by ``bench serve`` and ``bench chaos`` (each with
    its own defaults): which trace, which slice, how scaled, which tier mix."""
    options = [
        click.option("--trace", "trace_name", default="azure", show_default=True,
                     help="azure | mooncake | PATH (.csv Azure, .jsonl Mooncake)."),
        click.option("--start-s", default=0.0, show_default=True, type=float,
                     help="Where in the original trace to start (s)."),
        click.option("--duration-s", default=duration_s, show_default=True, type=float,
                     help="Seconds of the original trace to take."),
        click.option("--time-scale", default=time_scale, show_default=True, type=float,
                     help="Compress arrivals: rate multiplied by this."),
        click.option("--token-scale", default=token_scale, show_default=True, type=float,
                     help="Multiply prompt and output lengths."),
        click.option("--max-input-tokens", default=max_input_tokens, show_default=True,
                     type=int, help="Clip prompt lengths."),
        click.option("--max-output-tokens", default=max_output_tokens, show_default=True,
                     type=int, help="Clip output lengths."),
        click.option("--tier-mix", default=None,
                     help="e.g. priority=0.2,default=0.5,flex=0.3 (default 20/50/15/15)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--max-requests", default=max_requests, show_default=True, type=int),
    ]

    def apply(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def resolve_model_path(model: str | None) -> str:
    """A model directory: ``model`` itself, or a model-store name pulled once (default
    ``SLAQ_MODEL``). Launched sim stacks only need its tokenizer."""
    from slaq.gpu_workers.model_store import pull
    from slaq.platform.settings import Settings

    settings = Settings.from_env()
    name = model or settings.model
    if Path(name).is_dir():
        return str(name)
    return str(pull(name, settings.models_dir, progress=True))


def launch_options(fn: Callable) -> Callable:
    """``--launch`` and what the launched stacks are made of."""
    options = [
        click.option("--launch", is_flag=True,
                     help="Start a fresh stack per policy (own Redis, fresh database, API, "
                          "beat, sim workers) and compare them on the same trace."),
        click.option("--policies", default="fifo,static,slaq,slaq-agg", show_default=True,
                     help="With --launch: runs, among fifo, static, slaq, slaq-agg, "
                          "static-agg, fifo-disagg."),
        click.option("--workers", "num_workers", default=4, show_default=True, type=int),
        click.option("--prefill-workers", "num_prefill", default=None, type=int,
                     help="Prefill workers of disaggregated runs (default: the cost model's "
                          "GPU-time split)."),
        click.option("--sim-profile", default="llama-8b-h100", show_default=True,
                     help="Hardware each sim worker stands in for (cost-model profile)."),
        click.option("--sim-speed", default=1.0, show_default=True, type=float,
                     help="Sim workers' speed relative to the profile (0.1 = ten times "
                          "slower), so a CPU-bound API can overload them."),
        click.option("--num-blocks", default=None, type=int,
                     help="KV blocks per sim worker (default: what the profile's memory "
                          "holds)."),
        click.option("--max-num-seqs", default=None, type=int),
        click.option("--settle-timeout-s", default=180.0, show_default=True, type=float),
        click.option("--database-url", default=None,
                     help="PostgreSQL server for --launch (a fresh database per run); "
                          "default SLAQ_DATABASE_URL."),
        click.option("--keep-database", is_flag=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("serve")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="The slaq API (without /v1).")
@click.option("--api-key", envvar="SLAQ_API_KEY", default=None,
              help="Bearer key (or SLAQ_API_KEY); not needed with --launch.")
@click.option("--model", default=None, help="Model name (default: the first of /v1/models).")
@trace_options(duration_s=60.0, time_scale=1.0, token_scale=1.0, max_input_tokens=None,
               max_output_tokens=None, max_requests=5000)
@click.option("--max-wall-s", default=600.0, show_default=True, type=float,
              help="Send nothing later than this after the start.")
@click.option("--drain-timeout-s", default=120.0, show_default=True, type=float,
              help="Cancel (count as lost) what is still open this long after the last send.")
@click.option("--request-timeout-s", default=300.0, show_default=True, type=float)
@click.option("--max-in-flight", default=256, show_default=True, type=int)
@click.option("--token-ids", default="100:400", show_default=True,
              help="LO:HI, the range prompt token ids are drawn from (inside the vocabulary).")
@click.option("--allow-remote", is_flag=True, help="Allow a base URL that is not loopback.")
@click.option("--out", "out_dir", default="bench-serve", show_default=True,
              help="Directory for report.json, requests.jsonl and PNGs.")
@click.option("--plot/--no-plot", default=True, show_default=True)
@click.option("--policy-label", default=None,
              help="Name of the policy the stack runs (fifo, static, slaq, …), for the report.")
@launch_options
def serve(base_url: str, api_key: str | None, model: str | None, trace_name: str,
          start_s: float, duration_s: float, time_scale: float, token_scale: float,
          max_input_tokens: int | None, max_output_tokens: int | None, tier_mix: str | None,
          seed: int, max_requests: int, max_wall_s: float, drain_timeout_s: float,
          request_timeout_s: float, max_in_flight: int, token_ids: str, allow_remote: bool,
          out_dir: str, plot: bool, policy_label: str | None, launch: bool, policies: str,
          num_workers: int, num_prefill: int | None, sim_profile: str, sim_speed: float,
          num_blocks: int | None, max_num_seqs: int | None, settle_timeout_s: float,
          database_url: str | None, keep_database: bool) -> None:
    """Replay a trace through the streaming API; report TTFT/TPOT/E2E, SLA attainment and
    goodput per tier. With --launch: start a fresh stack for each of --policies in turn,
    replay the same trace through each, reconcile with the ledger, and compare."""
    from slaq.bench.serve import ServeConfig, replay
    from slaq.bench.serve_report import format_table, write_report

    if time_scale <= 0 or token_scale <= 0 or duration_s <= 0:
        raise click.UsageError("--time-scale, --token-scale and --duration-s must be > 0")
    if not launch and not api_key:
        raise click.UsageError("--api-key (or SLAQ_API_KEY) is required without --launch")
    mix = parse_tier_mix(tier_mix)
    lo, _, hi = token_ids.partition(":")
    if not (lo.isdigit() and hi.isdigit()):
        raise click.BadParameter(f"expected LO:HI, got {token_ids!r}", param_hint="--token-ids")
    try:
        cfg = ServeConfig(base_url="http://127.0.0.1:1" if launch else base_url,
                          api_key=api_key or "-", model=model,
                          max_requests=max_requests, max_wall_s=max_wall_s,
                          drain_timeout_s=drain_timeout_s, request_timeout_s=request_timeout_s,
                          max_in_flight=max_in_flight, token_id_range=(int(lo), int(hi)),
                          seed=seed, allow_remote=allow_remote)
        trace = build_trace(trace_name, start_s, duration_s, time_scale, token_scale,
                            max_input_tokens, max_output_tokens, mix, seed, max_requests)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    meta = {"trace": {"name": trace.name, "requests": len(trace), "start_s": start_s,
                      "duration_s": duration_s, "time_scale": time_scale,
                      "token_scale": token_scale, "max_input_tokens": max_input_tokens,
                      "max_output_tokens": max_output_tokens, "rate": trace.rate},
            "tier_mix": mix, "seed": seed}
    if launch:
        _launch(trace, cfg, meta, out_dir=out_dir, plot=plot, policies=policies,
                num_workers=num_workers, num_prefill=num_prefill, sim_profile=sim_profile,
                sim_speed=sim_speed, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                settle_timeout_s=settle_timeout_s, database_url=database_url,
                keep_database=keep_database, model=model)
        return
    meta["base_url"] = base_url
    click.echo(f"replaying {len(trace)} requests of {trace.name} over {trace.duration_s:.1f} s "
               f"({trace.rate:.2f} req/s) against {base_url}", err=True)
    result = replay(trace, cfg)
    report = write_report(result, out_dir, label=policy_label, meta=meta, plot=plot)
    click.echo(format_table(report), err=True)
    click.echo(json.dumps({"label": policy_label, "overall": report["overall"],
                           "files": report["files"]}, indent=2))


def _launch(trace: traces.Trace, serve_cfg: Any, meta: dict[str, Any], *, out_dir: str,
            plot: bool, policies: str, num_workers: int, num_prefill: int | None,
            sim_profile: str, sim_speed: float, num_blocks: int | None,
            max_num_seqs: int | None, settle_timeout_s: float, database_url: str | None,
            keep_database: bool, model: str | None) -> None:
    from dataclasses import replace

    from slaq.bench.serve_launch import LaunchConfig, parse_runs, run_launch

    try:
        cfg = LaunchConfig(
            server_database_url=database_url or os.environ.get("SLAQ_DATABASE_URL")
            or DEFAULT_DATABASE_URL, model_path=resolve_model_path(model), out_dir=out_dir,
            runs=parse_runs(policies), num_workers=num_workers, num_prefill=num_prefill,
            sim_profile=sim_profile, sim_speed=sim_speed, num_blocks=num_blocks,
            max_num_seqs=max_num_seqs, settle_timeout_s=settle_timeout_s,
            keep_database=keep_database, plot=plot)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # The launched stacks serve the model by its directory name; the client asks /v1/models.
    combined = run_launch(trace, cfg, replace(serve_cfg, model=None), meta,
                          echo=lambda line: click.echo(line, err=True))
    click.echo(combined["table"], err=True)
    click.echo(json.dumps({"offered_load": combined["offered_load"],
                           "policies": {k: {"overall": v["overall"],
                                            "lost": {"client": v["reconciliation"]["lost_client"],
                                                     "ledger": v["reconciliation"]["lost_ledger"]}}
                                        for k, v in combined["policies"].items()},
                           "files": combined["files"]}, indent=2, default=str))


@click.command("serve-compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True))
def serve_compare(reports: tuple[str, ...]) -> None:
    """Tabulate several ``report.json`` files (e.g. one per policy, same trace); goodput is
    shown relative to the first."""
    from slaq.bench.serve_report import format_comparison

    loaded = [json.loads(Path(p).read_text()) for p in reports]
    names = {json.dumps(r.get("trace"), sort_keys=True) for r in loaded}
    if len(names) > 1:
        click.echo("warning: the reports were made from different trace settings", err=True)
    click.echo(format_comparison(loaded))
