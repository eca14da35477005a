"""``slaq bench prefix``: the click command (``slaq/cli.py`` attaches it to ``bench``)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("prefix")
@click.option("--model", default="smollm2", show_default=True,
              help="Model directory, 'smollm2' or 'llama-3.2-1b-random'.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda[:N]")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 "
              "(default: float32 on CPU, bfloat16 on CUDA).")
@click.option("--prefix-len", default=1024, show_default=True, type=int,
              help="Tokens of the prefix the two requests share.")
@click.option("--suffix-len", default=32, show_default=True, type=int,
              help="Tokens of each request's own suffix.")
@click.option("--rounds", default=5, show_default=True, type=int,
              help="Measured rounds (medians over them).")
@click.option("--warmup-rounds", default=1, show_default=True, type=int)
@click.option("--new-tokens", default=16, show_default=True, type=int,
              help="Greedy tokens of each second request, compared cached vs uncached.")
@click.option("--block-size", default=16, show_default=True, type=int)
@click.option("--no-cuda-graphs", is_flag=True, help="CUDA: the eager runner.")
@click.option("--threads", default=None, type=int,
              help="CPU threads (default: torch's); 1 is steadier on a loaded shared CPU.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, help="Also write the JSON here.")
@click.option("--plot", default=None, help="Write a PNG chart here.")
def prefix(model: str, device: str, dtype: str | None, prefix_len: int, suffix_len: int,
           rounds: int, warmup_rounds: int, new_tokens: int, block_size: int,
           no_cuda_graphs: bool, threads: int | None, seed: int, out: str | None, plot: str | None) -> None:
    """TTFT of a second request sharing a long prefix with the first, prefix cache hit vs
    emptied, on one engine; hit counters and greedy parity. JSON to stdout."""
    # Imported here: slaq.bench.cli may itself import this module to register the command.
    from slaq.bench.cli import resolve_model
    from slaq.bench.prefix import PrefixBenchConfig, plot_prefix, run_prefix_bench

    try:
        cfg = PrefixBenchConfig(
            model=resolve_model(model), device=device,
            dtype=dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
            prefix_len=prefix_len, suffix_len=suffix_len, rounds=rounds,
            warmup_rounds=warmup_rounds, new_tokens=new_tokens, block_size=block_size,
            use_cuda_graphs=not no_cuda_graphs, threads=threads, seed=seed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    result = run_prefix_bench(cfg)
    if plot:
        plot_prefix(result, plot)
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)
