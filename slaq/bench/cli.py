"""``slaq bench engine | transfer``: the click group the main CLI attaches as ``bench``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise click.BadParameter("expected at least one integer")
    return values


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError as exc:
        raise click.BadParameter(f"expected N or MIN:MAX, got {text!r}") from exc


def _emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


def resolve_model(model: str) -> str:
    """A directory, ``smollm2`` (pulled once through the model store) or
    ``llama-3.2-1b-random`` (built in a temporary directory)."""
    if model == "smollm2":
        from slaq.gpu_workers.model_store import pull
        from slaq.platform.settings import Settings

        return str(pull("SmolLM2-135M-Instruct", Settings.from_env().models_dir,
                        progress=False))
    if model == "llama-3.2-1b-random":
        import torch

        from slaq.bench.engine import make_random_llama

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return str(make_random_llama(Path(tempfile.mkdtemp(prefix="slaq-llama1b-")) / "model",
                                     device=device))
    if not Path(model).is_dir():
        raise click.BadParameter(f"{model!r} is not a model directory")
    return model


@click.group()
def bench() -> None:
    """Benchmarks that print JSON with their baseline measured in the same run."""


@bench.command()
@click.option("--model", default="smollm2", show_default=True,
              help="Model directory, 'smollm2' or 'llama-3.2-1b-random'.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 "
              "(default: float32 on CPU, bfloat16 on CUDA).")
@click.option("--batch-sizes", default="32", show_default=True, help="Comma-separated.")
@click.option("--prompt-len", default="64:512", show_default=True, help="N or MIN:MAX.")
@click.option("--new-tokens", default=128, show_default=True, type=int)
@click.option("--prefill-batch", default=8, show_default=True, type=int,
              help="Prompts in the prefill comparison (0 skips it).")
@click.option("--prefill-len", default=2048, show_default=True, type=int)
@click.option("--runners", default=None,
              help="Comma-separated among eager,triton,graphs,graphs-sync,graphs-plain "
                   "(graphs-sync: without asynchronous scheduling; default: eager on CPU, "
                   "eager,graphs on CUDA).")
@click.option("--no-hf", is_flag=True, help="Skip the HF transformers baseline.")
@click.option("--out", default=None, help="Also write the JSON here.")
@click.option("--plot", default=None, help="Write a PNG chart here.")
def engine(model: str, device: str, dtype: str | None, batch_sizes: str, prompt_len: str,
           new_tokens: int, prefill_batch: int, prefill_len: int, runners: str | None,
           no_hf: bool, out: str | None, plot: str | None) -> None:
    """Our engine vs HF transformers generate (batched, padded) on the same prompts."""
    from slaq.bench.engine import EngineBenchConfig, plot_engine, run_engine_bench

    on_cuda = device.startswith("cuda")
    names = tuple(r for r in (runners or ("eager,graphs" if on_cuda else "eager")).split(","))
    try:
        cfg = EngineBenchConfig(
            model=resolve_model(model), device=device,
            dtype=dtype or ("bfloat16" if on_cuda else "float32"),
            batch_sizes=_ints(batch_sizes), prompt_len=_range(prompt_len),
            new_tokens=new_tokens, prefill_batch=prefill_batch, prefill_len=prefill_len,
            runners=names, hf=not no_hf)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    result = run_engine_bench(cfg)
    if plot:
        plot_engine(result, plot)
    _emit(result, out)


@bench.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--sizes-mb", default="8,32,128", show_default=True, help="Comma-separated.")
@click.option("--iters", default=20, show_default=True, type=int)
@click.option("--transports", default=None,
              help="Comma-separated (default: every one that works on the device).")
@click.option("--redis-url", default=None,
              help="Redis for the lease timings (default: SLAQ_REDIS_URL, else a throwaway "
                   "redis-server).")
@click.option("--dtype", default=None, help="KV dtype (default: float32 on CPU, as the CPU "
              "engine runs; bfloat16 on CUDA).")
@click.option("--layout", type=click.Choice(["scattered", "consecutive"]), default="scattered",
              show_default=True, help="Leased block ids: random, or one run.")
@click.option("--out", default=None, help="Also write the JSON here.")
@click.option("--plot", default=None, help="Write a PNG chart here.")
def transfer(device: str, sizes_mb: str, iters: int, transports: str | None,
             redis_url: str | None, dtype: str | None, layout: str, out: str | None,
             plot: str | None) -> None:
    """Each KV transport vs a plain in-process copy of the same bytes."""
    from slaq.bench.transfer import TransferBenchConfig, plot_transfer, run_transfer_bench

    try:
        cfg = TransferBenchConfig(
            device=device, sizes_mb=_ints(sizes_mb), iters=iters,
            transports=tuple(transports.split(",")) if transports else None,
            redis_url=redis_url, layout=layout,
            dtype=dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    result = run_transfer_bench(cfg)
    if plot:
        plot_transfer(result, plot)
    _emit(result, out)
