"""The ``slaq`` command: ``up | api | worker | beat | migrate | model | bench | sim | status``."""

from __future__ import annotations

import json
import os
import sys

import click

from slaq.platform.settings import Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
@click.version_option(package_name="slaq")
def main() -> None:
    """slaq: SLA-tiered LLM inference on Celery queues, scheduled by KV-cache pressure."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--prefill-workers", default=1, show_default=True, type=int)
@click.option("--decode-workers", default=1, show_default=True, type=int)
@click.option("--aggregated", is_flag=True, help="One 'both' worker instead of prefill+decode.")
@click.option("--device", default="cpu", show_default=True)
def up(host: str, port: int, prefill_workers: int, decode_workers: int, aggregated: bool,
       device: str) -> None:
    """Start services (embedded or configured), migrate, and run API + workers until Ctrl-C."""
    from slaq.launcher import Launcher, LaunchPlan

    plan = LaunchPlan(host=host, port=port, num_prefill_workers=prefill_workers,
                      num_decode_workers=decode_workers, aggregated=aggregated, device=device)
    sys.exit(Launcher(_settings(), plan).run())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=128, show_default=True, type=int)
def api(host: str, port: int, threads: int) -> None:
    """Serve the OpenAI-compatible API with gunicorn (gthread)."""
    from slaq.platform.services import ensure_services
    from slaq.web.wsgi import serve

    settings = _settings()
    services = ensure_services(settings)
    serve(host=host, port=port, settings=settings, services=services, threads=threads)


_LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_POSITIVE = click.IntRange(min=1)


@main.command()
@click.option("--role", type=click.Choice(["prefill", "decode", "both"]), required=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--name", default=None, help="Worker name (default: <role>-<host>-<pid>).")
@click.option("--concurrency", default=None, type=_POSITIVE,
              help="Celery threads, i.e. tickets held at once (default: --max-num-seqs, one "
                   "per engine seat).")
@click.option("--engine", "engine_kind", type=click.Choice(["torch", "sim"]), default="torch",
              show_default=True)
@click.option("--num-blocks", default=None, type=_POSITIVE,
              help="KV pool size in blocks (default: sized from memory).")
@click.option("--max-num-seqs", default=None, type=_POSITIVE,
              help="Engine seats: sequences run at once (default: 64).")
@click.option("--transport", type=click.Choice(["auto", "nixl"]), default="auto",
              show_default=True,
              help="KV hand-off: auto = shm (CPU) or CUDA IPC (GPU) on one host; nixl across "
                   "hosts.")
@click.option("--loglevel", type=click.Choice(_LOGLEVELS, case_sensitive=False),
              default="INFO", show_default=True)
def worker(role: str, device: str, name: str | None, concurrency: int | None,
           engine_kind: str, num_blocks: int | None, max_num_seqs: int | None, transport: str,
           loglevel: str) -> None:
    """Run a Celery worker bound to one device, holding one engine."""
    import logging

    from slaq.gpu_workers.worker import WorkerOptions, run_worker

    try:  # combinations the options alone cannot check (e.g. sim engine with nixl)
        opts = WorkerOptions(role=role, device=device, name=name, concurrency=concurrency,
                             engine_kind=engine_kind, num_blocks=num_blocks,
                             max_num_seqs=max_num_seqs, transport=transport,
                             loglevel=loglevel.upper())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = _settings()
    # Before Celery sets up its own logging: model loading and "ready" are logged earlier.
    logging.basicConfig(level=opts.loglevel,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_worker(opts, settings))


@main.command()
def beat() -> None:
    """Run Celery beat (the reprioritiser's clock). Run exactly one."""
    from slaq.tasks.beat import run_beat

    run_beat(_settings())


@main.command()
def migrate() -> None:
    """Apply database migrations (Alembic upgrade head)."""
    from slaq.platform.db import migrate as do_migrate
    from slaq.platform.services import ensure_services

    services = ensure_services(_settings())
    try:
        do_migrate(services.database_url)
    finally:
        services.stop()
    click.echo("database at head")


@main.group()
def model() -> None:
    """Model store: pull and list models."""


@model.command("pull")
@click.argument("name", required=False)
def model_pull(name: str | None) -> None:
    """Download and convert a model (default: SLAQ_MODEL or SmolLM2-135M-Instruct)."""
    from slaq.gpu_workers.model_store import pull

    settings = _settings()
    path = pull(name or settings.model, settings.models_dir, progress=True)
    click.echo(str(path))


@main.command()
def status() -> None:
    """Show live workers (heartbeats) and request counts by state."""
    from slaq.status import collect_status

    click.echo(json.dumps(collect_status(_settings()), indent=2, default=str))


def _attach_groups() -> None:
    # bench and sim live in their own packages; attach them so `slaq bench …` / `slaq sim …` work.
    from slaq.bench.chaos_cli import chaos
    from slaq.bench.cli import bench
    from slaq.bench.handoff_cli import handoff
    from slaq.bench.prefix_cli import prefix
    from slaq.bench.serve_cli import serve, serve_compare
    from slaq.sim.cli import sim

    bench.add_command(serve)
    bench.add_command(serve_compare)
    bench.add_command(chaos)
    bench.add_command(prefix)
    bench.add_command(handoff)
    main.add_command(bench)
    main.add_command(sim)


_attach_groups()

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
