"""The C causal prefill attention against torch's SDPA on CPU, in one process; prints JSON.

    python bench/cpu_prefill_attention.py [--lengths 128,288,512,2048] [--rounds 4] [--out F]

Three parts, each with its baseline in the same run: (1) one chunk of each length with
SmolLM2's heads (9 query heads, 3 K/V heads, head size 64) as views into a fused QKV
output, kernel and SDPA alternating, with the causal GFLOP/s of each; (2) the CPU engine
benchmark's 32 prompts (64-512 tokens) prefilled with one sampled token each, by two engines
that differ only in ``EngineConfig.cpu_prefill_kernel``, alternating over ``--rounds``; (3)
one ``--long-prompt``-token prompt through the same two engines, whose chunks after the first
(the step budget is 2,048 tokens) attend to the cached ones: the kernel over the gathered
blocks against SDPA with a mask.
"""

from __future__ import annotations

import slaq  # noqa: F401  (first: it turns on huge pages before torch allocates)

# isort: split
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slaq.bench.cli import resolve_model
from slaq.bench.device import device_name
from slaq.bench.engine import EngineBenchConfig, _num_blocks, _prompts, build_engine, run_ours
from slaq.gpu_workers.engine.cpu_kernels.prefill import load_prefill_attention


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def chunks(lengths: list[int], heads: int = 9, kv_heads: int = 3, dim: int = 64) -> list[dict]:
    kernel = load_prefill_attention()
    if kernel is None:
        raise SystemExit("the C prefill attention kernel could not be built here")
    out = []
    for n in lengths:
        qkv = torch.randn(n, heads + 2 * kv_heads, dim)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        scale = dim ** -0.5
        reps = max(5, int(2000 / n))
        sdpa_ms = _median_ms(lambda: _sdpa(q, k, v, scale), reps)  # noqa: B023
        kernel_ms = _median_ms(lambda: kernel(q, k, v, scale), reps)  # noqa: B023
        flops = 4 * n * n * heads * dim / 2  # causal: half the score matrix
        out.append({"tokens": n, "sdpa_ms": round(sdpa_ms, 3), "kernel_ms": round(kernel_ms, 3),
                    "sdpa_gflop_s": round(flops / sdpa_ms / 1e6, 1),
                    "kernel_gflop_s": round(flops / kernel_ms / 1e6, 1),
                    "speedup": round(sdpa_ms / kernel_ms, 2),
                    "max_abs_diff": float((kernel(q, k, v, scale)
                                           - _sdpa(q, k, v, scale)).abs().max())})
        print(json.dumps(out[-1]), flush=True)
    return out


def _engines(cfg: EngineBenchConfig, max_num_seqs: int) -> dict:
    engines = {"kernel": build_engine(cfg, "eager", max_num_seqs, _num_blocks(cfg)),
               "sdpa": build_engine(cfg, "eager", max_num_seqs, _num_blocks(cfg),
                                    cpu_prefill_kernel=False)}
    if engines["kernel"].runner.backend.prefill_kernel is None:
        raise SystemExit("the engine did not take the prefill kernel here")
    return engines


def _alternate(engines: dict, prompts: list[list[int]], rounds: int) -> dict:
    for e in engines.values():
        run_ours(e, prompts[:4], 1, "cpu")
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list] = {}
    for r in range(rounds):
        for name in (("kernel", "sdpa") if r % 2 == 0 else ("sdpa", "kernel")):
            res = run_ours(engines[name], prompts, 1, "cpu")
            seconds[name].append(res["seconds"])
            tokens[name] = res["tokens"]
    return {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)),
            "seconds": seconds,
            "median_s": {n: statistics.median(s) for n, s in seconds.items()},
            "first_tokens_identical": tokens["kernel"] == tokens["sdpa"]}


def engine_prefill(rounds: int) -> dict:
    cfg = EngineBenchConfig(model=resolve_model("smollm2"), batch_sizes=(32,), device="cpu",
                            dtype="float32", prompt_len=(64, 512), new_tokens=2)
    engines = _engines(cfg, 32)
    prompts = _prompts(cfg, 32, engines["kernel"].model_config.vocab_size, cfg.seed + 32)
    return _alternate(engines, prompts, rounds)


def long_prompt(tokens: int, rounds: int) -> dict:
    cfg = EngineBenchConfig(model=resolve_model("smollm2"), batch_sizes=(1,), device="cpu",
                            dtype="float32", prompt_len=(tokens, tokens), new_tokens=2)
    engines = _engines(cfg, 1)
    prompts = _prompts(cfg, 1, engines["kernel"].model_config.vocab_size, cfg.seed + 1)
    return {"step_token_budget": cfg.token_budget, **_alternate(engines, prompts, rounds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="128,288,512,2048")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--long-prompt", type=int, default=6144)
    ap.add_argument("--out")
    args = ap.parse_args()
    result = {"device": device_name("cpu"), "threads": torch.get_num_threads(),
              "chunks": chunks([int(x) for x in args.lengths.split(",")]),
              "engine_prefill": engine_prefill(args.rounds),
              "long_prompt": long_prompt(args.long_prompt, args.rounds)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
