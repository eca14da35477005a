"""``slaq bench prefix``: time to first token of a request whose prompt prefix is cached.

One engine, prefix caching on. Each round draws a fresh shared prefix (``prefix_len`` random
token ids) and two short suffixes that differ in their first token, then runs, one request at
a time, each timed from ``add_request`` to the step that returns its first token:

* ``first``: prefix + suffix A. Nothing of it is cached: a whole prefill.
* ``second_cached``: prefix + suffix B, with the prefix's full blocks in the cache.
* ``second_uncached``: prefix + suffix B again with prefix caching switched off on the same
  engine (no lookup, nothing registered): the baseline, the same request on the same warm
  engine with nothing to hit, so the gain is the cache's and not warm-up's.

Rounds alternate the order of the two second requests, so neither always runs on a hotter
engine; the uncached one registers nothing, so the cached one hits exactly the first
request's prefix either way. The cache is emptied at the start of each round. A warm-up round,
not reported, runs both paths first. The engine's hit counters (``prefix_cache_hits_tokens``)
and each request's ``num_cached_tokens`` are reported; both second requests decode
``new_tokens`` greedy tokens, which must be identical.

Only whole blocks are shared, so the expected hit is ``prefix_len // block_size * block_size``
tokens (the suffix always leaves a token to compute).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slaq.bench.device import device_name

TARGET_SPEEDUP = 5.0  # issue #3: the second request's first token >= 5x sooner


@dataclass(frozen=True, slots=True)
class PrefixBenchConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    prefix_len: int = 1024
    suffix_len: int = 32
    rounds: int = 5
    warmup_rounds: int = 1
    new_tokens: int = 16  # greedy tokens of each second request, compared cached vs uncached
    block_size: int = 16
    use_cuda_graphs: bool = True  # CUDA: the graph runner where Triton works (decode only)
    # CPU threads for the run (None: torch's default). On a loaded shared CPU one thread
    # avoids the stalls of a thread pool waiting for a busy core at every small op.
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prefix_len < self.block_size:
            raise ValueError("prefix_len must be at least one block")
        if self.suffix_len < 1:
            raise ValueError("suffix_len must be >= 1")
        if self.rounds < 1 or self.warmup_rounds < 0:
            raise ValueError("rounds must be >= 1 and warmup_rounds >= 0")
        if self.new_tokens < 1:
            raise ValueError("new_tokens must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    @property
    def expected_hit_tokens(self) -> int:
        return self.prefix_len // self.block_size * self.block_size


@dataclass(slots=True)
class _Timed:
    """One request's TTFT, cache figures and greedy tokens."""

    ttft_s: float
    num_cached_tokens: int
    hit_tokens: int  # growth of the engine's prefix_cache_hits_tokens during the request
    query_tokens: int
    token_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_ms": round(self.ttft_s * 1e3, 3), "num_cached_tokens":
                self.num_cached_tokens, "prefix_cache_hits_tokens": self.hit_tokens,
                "prefix_cache_queries_tokens": self.query_tokens}


def _log(msg: str) -> None:
    print(f"[bench prefix] {msg}", file=sys.stderr, flush=True)


def build_prefix_engine(cfg: PrefixBenchConfig) -> Any:
    """An engine with prefix caching on and room for a few requests of this shape."""
    from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    seq_len = cfg.prefix_len + cfg.suffix_len + cfg.new_tokens
    per_seq = -(-seq_len // cfg.block_size)
    config = EngineConfig(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype,
        # The whole prompt in one step: the uncached TTFT is one full prefill, not chunks.
        # The engine's default seats, as a worker runs: they also size the decode graphs,
        # which take a short chunk behind a cached prefix as one row per token.
        scheduler=SchedulerConfig(max_num_batched_tokens=max(2048, seq_len),
                                  max_model_len=seq_len + 1),
        cache=CacheConfig(block_size=cfg.block_size, num_blocks=4 * per_seq + 8,
                          enable_prefix_caching=True),
        use_cuda_graphs=cfg.use_cuda_graphs)
    return LLMEngine(config)


def _timed_request(engine: Any, rid: str, prompt: list[int], max_tokens: int) -> _Timed:
    from slaq.gpu_workers.engine.config import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    before = engine.stats()
    tokens: list[int] = []
    ttft = None
    cached = 0
    # The sampled token comes back as a Python int, so the device has finished by then.
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != rid:
                continue
            if out.new_token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    after = engine.stats()
    assert ttft is not None, f"{rid} produced no token"
    return _Timed(ttft, cached,
                  after.prefix_cache_hits_tokens - before.prefix_cache_hits_tokens,
                  after.prefix_cache_queries_tokens - before.prefix_cache_queries_tokens,
                  tokens)


def _uncached_request(engine: Any, rid: str, prompt: list[int], max_tokens: int) -> _Timed:
    """:func:`_timed_request` with the block manager's prefix caching off: the request neither
    looks up nor registers blocks (the flag is read on every call), and the blocks already
    cached stay where they are."""
    bm = engine.block_manager
    bm.enable_prefix_caching = False
    try:
        return _timed_request(engine, rid, prompt, max_tokens)
    finally:
        bm.enable_prefix_caching = True


def _round(engine: Any, cfg: PrefixBenchConfig, index: int, gen: torch.Generator,
           vocab: int) -> dict[str, Any]:
    hi = min(vocab, 32000)  # ids every tokenizer and model knows
    prefix = torch.randint(3, hi, (cfg.prefix_len,), generator=gen).tolist()
    suffix_a = torch.randint(3, hi, (cfg.suffix_len,), generator=gen).tolist()
    suffix_b = torch.randint(3, hi, (cfg.suffix_len,), generator=gen).tolist()
    if suffix_b[0] == suffix_a[0]:  # a shared first suffix token could extend the hit
        suffix_b[0] = 3 + (suffix_a[0] - 2) % (hi - 3)
    tag = f"r{index}-{time.monotonic_ns()}"
    # Only this round's blocks in the cache: plain free blocks for every request, no eviction.
    engine.block_manager.reset_prefix_cache()
    first = _timed_request(engine, f"{tag}-first", prefix + suffix_a, 1)
    second = prefix + suffix_b
    cached_first = index % 2 == 0
    if cached_first:
        cached = _timed_request(engine, f"{tag}-cached", second, cfg.new_tokens)
        uncached = _uncached_request(engine, f"{tag}-uncached", second, cfg.new_tokens)
    else:
        uncached = _uncached_request(engine, f"{tag}-uncached", second, cfg.new_tokens)
        cached = _timed_request(engine, f"{tag}-cached", second, cfg.new_tokens)
    diverge = next((i for i, (x, y) in enumerate(zip(cached.token_ids, uncached.token_ids,
                                                     strict=True)) if x != y), None)
    return {
        "round": index, "order": "cached_first" if cached_first else "uncached_first",
        "first": first.to_dict(), "second_cached": cached.to_dict(),
        "second_uncached": uncached.to_dict(),
        "speedup_first_over_cached": round(first.ttft_s / cached.ttft_s, 2),
        "outputs_identical": diverge is None, "first_divergence": diverge,
    }


def _median_ms(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key]["ttft_ms"] for r in rows), 3)


def run_prefix_bench(cfg: PrefixBenchConfig) -> dict[str, Any]:
    """Warm-up, then ``cfg.rounds`` rounds; a JSON-ready dict."""
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: PrefixBenchConfig) -> dict[str, Any]:
    import os

    load_start = os.getloadavg()[0]  # shared CPUs: how busy the machine was matters
    t0 = time.perf_counter()
    engine = build_prefix_engine(cfg)
    setup_s = time.perf_counter() - t0
    mc = engine.model_config
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        for i in range(cfg.warmup_rounds):
            # A round runs both paths (full and cached prefill), so both are warm.
            _round(engine, cfg, i, gen, mc.vocab_size)
            _log(f"warm-up {i + 1}/{cfg.warmup_rounds} done")
        start_stats = engine.stats()
        rows = []
        for i in range(cfg.rounds):
            row = _round(engine, cfg, i, gen, mc.vocab_size)
            rows.append(row)
            _log(f"round {i + 1}/{cfg.rounds}: first {row['first']['ttft_ms']:.1f} ms, "
                 f"cached {row['second_cached']['ttft_ms']:.1f} ms, uncached "
                 f"{row['second_uncached']['ttft_ms']:.1f} ms, cached tokens "
                 f"{row['second_cached']['num_cached_tokens']}, outputs "
                 f"{'identical' if row['outputs_identical'] else 'DIFFER'}")
        end_stats = engine.stats()
    finally:
        engine.close()
    first, cached, uncached = (_median_ms(rows, k)
                               for k in ("first", "second_cached", "second_uncached"))
    expected = cfg.expected_hit_tokens
    speedup = round(first / cached, 2)
    return {
        "bench": "prefix_cache", "device": device_name(cfg.device), "torch": torch.__version__,
        "model": {"path": cfg.model, "dtype": cfg.dtype, "num_layers": mc.num_layers,
                  "hidden_size": mc.hidden_size, "vocab_size": mc.vocab_size},
        "config": {"prefix_len": cfg.prefix_len, "suffix_len": cfg.suffix_len,
                   "rounds": cfg.rounds, "warmup_rounds": cfg.warmup_rounds,
                   "new_tokens": cfg.new_tokens, "block_size": cfg.block_size,
                   "threads": torch.get_num_threads(), "seed": cfg.seed},
        "baseline": "second_uncached: the same second request on the same engine with "
                    "prefix caching switched off for it",
        "setup_s": round(setup_s, 2),
        "load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "ttft_ms_median": {"first": first, "second_cached": cached,
                           "second_uncached": uncached},
        "speedup_first_over_cached": speedup,
        "speedup_uncached_over_cached": round(uncached / cached, 2),
        "target_speedup": TARGET_SPEEDUP, "target_met": speedup >= TARGET_SPEEDUP,
        "hits": {
            "expected_hit_tokens": expected,
            "all_cached_hit_expected": all(
                r["second_cached"]["num_cached_tokens"] == expected
                and r["second_cached"]["prefix_cache_hits_tokens"] == expected for r in rows),
            "all_uncached_missed": all(
                r["second_uncached"]["num_cached_tokens"] == 0
                and r["first"]["num_cached_tokens"] == 0 for r in rows),
            # Engine counters over the reported rounds (warm-up excluded).
            "prefix_cache_queries_tokens": (end_stats.prefix_cache_queries_tokens
                                            - start_stats.prefix_cache_queries_tokens),
            "prefix_cache_hits_tokens": (end_stats.prefix_cache_hits_tokens
                                         - start_stats.prefix_cache_hits_tokens),
        },
        "outputs_identical": {"rounds": len(rows),
                              "identical": sum(r["outputs_identical"] for r in rows)},
        "rounds": rows,
    }


def plot_prefix(result: dict[str, Any], path: str | Path) -> None:
    """Median TTFT of the three requests, each round as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("first", "second_cached", "second_uncached")
    labels = ("1st request\n(cold prefix)", "2nd request\n(prefix cached)",
              "2nd request\n(caching off)")
    colors = ("tab:gray", "tab:green", "tab:orange")
    fig, ax = plt.subplots(figsize=(7, 4))
    medians = [result["ttft_ms_median"][k] for k in keys]
    ax.bar(range(3), medians, color=colors, width=0.6)
    for x, k in enumerate(keys):
        ys = [r[k]["ttft_ms"] for r in result["rounds"]]
        ax.scatter([x] * len(ys), ys, color="black", s=10, zorder=3)
        ax.text(x, medians[x] / 2, f"{medians[x]:.1f} ms", ha="center", va="center",
                color="white", fontweight="bold")
    ax.set_xticks(range(3), labels)
    ax.set_ylabel("time to first token (ms), median")
    cfg, hits = result["config"], result["hits"]
    ax.set_title(f"{Path(result['model']['path']).name} ({result['model']['dtype']}), "
                 f"{result['device']}\nprefix {cfg['prefix_len']} + suffix "
                 f"{cfg['suffix_len']} tokens: {result['speedup_first_over_cached']}x sooner, "
                 f"{hits['expected_hit_tokens']} tokens hit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
