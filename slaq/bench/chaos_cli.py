"""``slaq bench chaos``: the click command (the lead attaches it to the ``bench`` group)."""

from __future__ import annotations

import json
import os

import click

from slaq.bench.serve_cli import DEFAULT_DATABASE_URL, resolve_model_path, trace_options


@click.command("chaos")
# Tokens scaled down: the CPU API relays every token of four simulated GPUs.
@trace_options(duration_s=600.0, time_scale=2.0, token_scale=0.25, max_input_tokens=1536,
               max_output_tokens=256, max_requests=100_000)
@click.option("--workers", "num_workers", default=4, show_default=True, type=int)
@click.option("--sim-profile", default="llama-8b-h100", show_default=True,
              help="Hardware each sim worker stands in for (cost-model profile).")
@click.option("--kill-at-s", default=None, type=float,
              help="SIGKILL a worker this long after the start (default: 1/3 of the replay).")
@click.option("--redis-restart-at-s", default=None, type=float,
              help="Restart Redis this long after the start (default: 2/3 of the replay).")
@click.option("--no-kill", is_flag=True)
@click.option("--no-redis-restart", is_flag=True)
@click.option("--orphan-timeout-s", default=5.0, show_default=True, type=float)
@click.option("--beat-nice", default=-5, show_default=True, type=int,
              help="nice increment for beat (the control plane); 0 = none.")
@click.option("--drain-timeout-s", default=180.0, show_default=True, type=float)
@click.option("--max-in-flight", default=256, show_default=True, type=int)
@click.option("--database-url", default=None,
              help="PostgreSQL server (a fresh database is made); default SLAQ_DATABASE_URL.")
@click.option("--model", default=None, help="Model dir or store name (its tokenizer is used).")
@click.option("--keep-database", is_flag=True)
@click.option("--out", "out_dir", default="bench-chaos", show_default=True)
@click.option("--plot/--no-plot", default=True, show_default=True)
def chaos(trace_name: str, start_s: float, duration_s: float, time_scale: float,
          token_scale: float, max_input_tokens: int, max_output_tokens: int,
          tier_mix: str | None, seed: int, max_requests: int, num_workers: int,
          sim_profile: str, kill_at_s: float | None, redis_restart_at_s: float | None,
          no_kill: bool, no_redis_restart: bool, orphan_timeout_s: float, beat_nice: int,
          drain_timeout_s: float, max_in_flight: int, database_url: str | None,
          model: str | None, keep_database: bool, out_dir: str, plot: bool) -> None:
    """Run the whole stack (own Redis without persistence, fresh database, API, beat, sim
    workers), replay a trace, SIGKILL a worker and restart Redis mid-run, then reconcile every
    request with the ledger. Prints the JSON report."""
    from slaq.bench.chaos import ChaosConfig, run_chaos
    from slaq.bench.serve import ServeConfig
    from slaq.bench.serve_cli import build_trace, parse_tier_mix

    if time_scale <= 0 or token_scale <= 0 or duration_s <= 0:
        raise click.UsageError("--time-scale, --token-scale and --duration-s must be > 0")
    trace = build_trace(trace_name, start_s, duration_s, time_scale, token_scale,
                        max_input_tokens, max_output_tokens, parse_tier_mix(tier_mix), seed,
                        max_requests)
    span = trace.duration_s
    kill = None if no_kill else (kill_at_s if kill_at_s is not None else span / 3)
    restart = None if no_redis_restart else (
        redis_restart_at_s if redis_restart_at_s is not None else 2 * span / 3)
    try:
        cfg = ChaosConfig(
            server_database_url=database_url or os.environ.get("SLAQ_DATABASE_URL")
            or DEFAULT_DATABASE_URL, model_path=resolve_model_path(model), out_dir=out_dir,
            num_workers=num_workers, sim_profile=sim_profile, kill_at_s=kill,
            redis_restart_at_s=restart, orphan_timeout_s=orphan_timeout_s, beat_nice=beat_nice,
            keep_database=keep_database, plot=plot)
        serve = ServeConfig(base_url="http://127.0.0.1:1", api_key="-", seed=seed,
                            max_requests=max_requests, max_wall_s=span + 1.0,
                            drain_timeout_s=drain_timeout_s, max_in_flight=max_in_flight)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"chaos: {len(trace)} requests of {trace.name} over {span:.1f} s "
               f"({trace.rate:.2f} req/s); SIGKILL at {kill}, Redis restart at {restart}",
               err=True)
    report = run_chaos(trace, cfg, serve)
    summary = {k: report[k] for k in ("per_tier", "overall", "lost", "reprioritiser_cycles",
                                      "events", "goals", "decisions", "files")}
    click.echo(json.dumps(summary, indent=2, default=str))
