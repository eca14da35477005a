"""``slaq bench handoff``: the click command (``slaq/cli.py`` attaches it to ``bench``).

The same two parts as ``python -m slaq.bench.handoff`` (which keeps working): the chat on the
tiny model and the Mooncake trace replay. JSON goes to stdout (and ``--out``); progress goes
to stderr, so the JSON can still be piped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from slaq.gpu_workers.engine.block_manager import PREFIX_SUMMARY_SIZE

_POSITIVE = click.IntRange(min=1)


def _progress(message: str) -> None:
    click.echo(f"[handoff] {message}", err=True)


@click.command("handoff")
@click.option("--conversations", default=5, show_default=True, type=_POSITIVE,
              help="Chat: conversations, each one hand-off per turn.")
@click.option("--turns", default=3, show_default=True, type=_POSITIVE)
@click.option("--max-tokens", default=16, show_default=True, type=_POSITIVE,
              help="Chat: greedy tokens per turn.")
@click.option("--block-size", default=16, show_default=True, type=_POSITIVE,
              help="Chat: KV block size in tokens.")
@click.option("--skip-chat", is_flag=True, help="Only the trace replay.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Mooncake conversation trace (JSONL; default: the shared "
                                 "copy, skipped when it is absent).")
@click.option("--max-requests", default=4000, show_default=True, type=_POSITIVE)
@click.option("--workers", default=4, show_default=True, type=_POSITIVE,
              help="Trace: decode workers.")
@click.option("--cache-blocks", default=2000, show_default=True, type=_POSITIVE,
              help="Trace: cached 512-token blocks per decode worker.")
@click.option("--summary-size", default=PREFIX_SUMMARY_SIZE, show_default=True,
              type=_POSITIVE, help="Trace: prefix hashes each worker publishes.")
@click.option("--out", default=None, help="Also write the JSON here.")
def handoff(conversations: int, turns: int, max_tokens: int, block_size: int, skip_chat: bool,
            trace: Path | None, max_requests: int, workers: int, cache_blocks: int,
            summary_size: int, out: str | None) -> None:
    """KV blocks pulled per hand-off without reuse, with decode-side prefix reuse, and with
    prefix-affinity routing: a chat on the tiny model and a Mooncake trace replay."""
    # Imported here: the chat builds torch engines, which `slaq --help` should not load.
    from slaq.bench.cli import _emit
    from slaq.bench.handoff import TRACE, run_chat, run_mooncake

    result: dict[str, Any] = {}
    if not skip_chat:
        _progress(f"chat: {conversations} conversations x {turns} turns, 3 modes, "
                  "tiny model on the CPU")
        start = time.perf_counter()
        result["chat"] = run_chat(conversations, turns, max_tokens=max_tokens,
                                  block_size=block_size, progress=_progress)
        _progress(f"chat done in {time.perf_counter() - start:.1f} s")
    if trace is None and TRACE.exists():
        trace = TRACE
    if trace is None:
        _progress(f"no trace at {TRACE}: replay skipped")
    else:
        _progress(f"replaying up to {max_requests} requests of {trace}")
        result["mooncake"] = run_mooncake(trace, max_requests, workers, cache_blocks,
                                          summary_size)
    _emit(result, out)
