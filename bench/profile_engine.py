"""Profile our engine on the CPU workload (32 prompts of 64..512 tokens, 128 new tokens)."""

from __future__ import annotations

import slaq  # noqa: F401  (first: it turns on huge pages before torch allocates)

# isort: split
import cProfile
import pstats
import sys
import time

import torch

from slaq.bench.cli import resolve_model
from slaq.bench.engine import EngineBenchConfig, _num_blocks, _prompts, build_engine, run_ours


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    cfg = EngineBenchConfig(model=resolve_model("smollm2"), batch_sizes=(n,), new_tokens=new,
                            prefill_batch=0)
    prompts = _prompts(cfg, n, 49152, cfg.seed + n)
    engine = build_engine(cfg, "eager", n, _num_blocks(cfg))
    run_ours(engine, prompts[:2], 4, "cpu")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = run_ours(engine, prompts, new, "cpu")
    prof.disable()
    print({k: v for k, v in res.items() if k != "tokens"}, time.perf_counter() - t0,
          torch.get_num_threads())
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    main()
