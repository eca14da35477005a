"""The GPU check's benchmark steps (called by scripts/gpu_check.sh); JSON into a directory.

    python scripts/gpu_bench.py transfer OUT_DIR
    python scripts/gpu_bench.py kernels OUT_DIR
    python scripts/gpu_bench.py engine OUT_DIR     # Llama-3.2-1B-shaped random model, bf16
    python scripts/gpu_bench.py parity OUT_DIR     # same model in fp32: greedy parity with HF
    python scripts/gpu_bench.py breakdown OUT_DIR  # one decode step: device time vs host time
    python scripts/gpu_bench.py prefix OUT_DIR     # TTFT with a cached 1,024-token prefix

Calls the library functions directly, so the machine needs no click (only torch, triton,
transformers and, for the lease timings, redis-py plus a redis-server).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODEL_DIR = Path(tempfile.gettempdir()) / "slaq-gpu-check" / "llama-3.2-1b-random"


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def _model() -> str:
    from slaq.bench.engine import RANDOM_MARKER, make_random_llama

    if not (MODEL_DIR / RANDOM_MARKER).exists():
        t0 = time.perf_counter()
        make_random_llama(MODEL_DIR, device="cuda")
        print(f"built the random model in {time.perf_counter() - t0:.1f}s", flush=True)
    return str(MODEL_DIR)


def _plot(fn: Any, result: dict[str, Any], path: Path) -> None:
    try:
        fn(result, path)
    except ImportError as exc:  # matplotlib is optional on the GPU machine
        print(f"no plot ({exc})", flush=True)


def transfer(out: Path) -> None:
    from slaq.bench.transfer import TransferBenchConfig, plot_transfer, run_transfer_bench

    for layout in ("scattered", "consecutive"):
        result = run_transfer_bench(TransferBenchConfig(device="cuda", sizes_mb=(8, 32, 128),
                                                        iters=50, warmup=5, layout=layout))
        name = "transfer" if layout == "scattered" else f"transfer_{layout}"
        _write(out, name, result)
        _plot(plot_transfer, result, out / f"{name}.png")


def engine(out: Path) -> None:
    from slaq.bench.engine import EngineBenchConfig, plot_engine, run_engine_bench

    # SLAQ_GPU_BATCHES / SLAQ_GPU_RUNNERS (comma-separated) trim the run to a short budget.
    batches = tuple(int(b) for b in os.environ.get("SLAQ_GPU_BATCHES", "1,32,128").split(","))
    runners = tuple(os.environ.get("SLAQ_GPU_RUNNERS", "graphs,graphs-plain,eager").split(","))
    cfg = EngineBenchConfig(model=_model(), device="cuda", dtype="bfloat16",
                            batch_sizes=batches, prompt_len=(512, 512), new_tokens=128,
                            prefill_batch=8, prefill_len=2048, runners=runners)
    result = run_engine_bench(cfg, on_partial=lambda r: _write(out, "engine", r))
    _write(out, "engine", result)
    _plot(plot_engine, result, out / "engine.png")


def parity(out: Path) -> None:
    from slaq.bench.engine import EngineBenchConfig, run_engine_bench

    cfg = EngineBenchConfig(model=_model(), device="cuda", dtype="float32",
                            batch_sizes=(4,), prompt_len=(64, 256), new_tokens=32,
                            prefill_batch=0, runners=("graphs",))
    _write(out, "parity_fp32", run_engine_bench(cfg))


def _time_cuda(fn: Any, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # microseconds


def kernels(out: Path) -> None:
    """One layer's decode attention (Llama-1B shape), Triton paged vs gather + SDPA."""
    import torch.nn.functional as F

    from slaq.gpu_workers.engine.paged_attention.triton_decode import (
        paged_decode,
        partition_size,
    )

    rows = []
    heads, kv_heads, head_dim, bs = 32, 8, 64, 16
    for batch, ctx in ((1, 640), (1, 8192), (32, 640), (128, 640), (128, 2048)):
        width = -(-ctx // bs)
        num_blocks = batch * width + 8
        kv = torch.randn(2, num_blocks, bs, kv_heads, head_dim, device="cuda",
                         dtype=torch.bfloat16)
        tables = torch.randperm(num_blocks, device="cuda")[:batch * width].view(batch, width)
        tables32 = tables.to(torch.int32)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        mask = (torch.arange(width * bs, device="cuda")[None, :] < lens[:, None])[:, None, None]

        def gather_sdpa(q=q, kv=kv, tables=tables, mask=mask):
            kc = kv[0, tables].flatten(1, 2).transpose(1, 2)
            vc = kv[1, tables].flatten(1, 2).transpose(1, 2)
            return F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask,
                                                  enable_gqa=True).squeeze(2)

        def triton_paged(q=q, kv=kv, tables32=tables32, lens=lens, ctx=ctx):
            return paged_decode(q, kv, tables32, lens, head_dim ** -0.5, max_context=ctx)

        kv_bytes = batch * ctx * kv_heads * head_dim * 2 * 2
        row: dict[str, Any] = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
        sweep = {f"triton_partition_{p}": (lambda p=p, a=(q, kv, tables32, lens), c=ctx:
                                           paged_decode(*a, head_dim ** -0.5, max_context=c,
                                                        partition=p))
                 for p in (64, 128, 256, 512)}
        for name, fn in (("triton_paged", triton_paged), ("gather_sdpa", gather_sdpa),
                         *sweep.items()):
            us = _time_cuda(fn)
            row[name] = {"us": round(us, 1), "kv_gb_per_s": round(kv_bytes / us / 1e3, 1)}
        row["auto_partition"] = partition_size(batch, kv_heads, ctx,
                                               torch.cuda.get_device_properties(0)
                                               .multi_processor_count)
        err = (triton_paged().float() - gather_sdpa().float()).abs().max().item()
        row["max_abs_diff"] = err
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(out, "kernels", {"bench": "decode_attention_kernels",
                            "device": torch.cuda.get_device_name(), "results": rows})


def _decode_step_times(engine: Any, prompts: list[list[int]], steps: int,
                       profile: Any = None) -> dict[str, Any]:
    """Bring every request into decode, then time whole engine steps and, on the same inputs,
    the graph replay alone (device time plus input copies) and the sampler."""
    from slaq.gpu_workers.engine.config import SamplingParams
    from slaq.gpu_workers.engine.sampler import SampleRequest

    params = SamplingParams(max_tokens=4 * steps, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bd-{time.monotonic_ns()}-{i}", p, params)
    sched, bs = engine.scheduler, engine.block_manager.block_size
    while sched.num_waiting or any(s.num_output_tokens == 0 for s in sched.running):
        engine.step()
    for _ in range(3):
        engine.step()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    profiled = profile(engine) if profile is not None else None
    seqs = list(sched.running)
    pos = [s.num_tokens - 2 for s in seqs]  # a position whose KV slot exists: rewritten, same
    ids = [s.token_id_at(p) for s, p in zip(seqs, pos, strict=True)]
    slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos, strict=True)]
    tables = [s.block_table[:p // bs + 1] for s, p in zip(seqs, pos, strict=True)]
    graphs = engine.runner.graphs

    def replay():
        return graphs.run(ids, pos, slots, tables)

    rows = [SampleRequest(s.request_id, s.params, ()) for s in seqs]
    logits, greedy_ids = replay()
    replay_us = _time_cuda(replay, iters=steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.runner.sampler.sample(logits, rows)
    sample_us = (time.perf_counter() - t0) / steps * 1e6
    t0 = time.perf_counter()
    for _ in range(steps):  # the path greedy batches take: argmax already done in the graph
        engine.runner.sampler.sample(logits, rows, greedy_ids)
    greedy_us = (time.perf_counter() - t0) / steps * 1e6
    while engine.has_unfinished():
        engine.step()
    med = sorted(walls)[len(walls) // 2]
    return {"batch": len(seqs), "step_ms_median": round(med * 1e3, 3),
            "step_ms_mean": round(sum(walls) / len(walls) * 1e3, 3),
            "tok_per_s_at_median_step": round(len(seqs) / med, 1),
            "graph_replay_ms": round(replay_us / 1e3, 3),
            "sampler_ms": round(sample_us / 1e3, 3),
            "sampler_greedy_in_graph_ms": round(greedy_us / 1e3, 3),
            "host_ms_not_hidden": round(med * 1e3 - replay_us / 1e3, 3),
            "profile": profiled}


def breakdown(out: Path) -> None:
    """Where a decode step's time goes, for the default runner and the plain one."""
    from slaq.bench.engine import EngineBenchConfig, _num_blocks, _prompts, build_engine
    from slaq.gpu_workers.engine.loader import load_model_config

    model = _model()
    vocab = load_model_config(model).vocab_size
    cfg = EngineBenchConfig(model=model, device="cuda", dtype="bfloat16", batch_sizes=(128,),
                            prompt_len=(512, 512), new_tokens=160, prefill_batch=0,
                            runners=("graphs",))
    result: dict[str, Any] = {"bench": "decode_step_breakdown",
                              "device": torch.cuda.get_device_name(), "runners": {}}
    from gpu_profile import profile_decode

    runners = os.environ.get("SLAQ_BREAKDOWN_RUNNERS", "graphs,graphs-plain").split(",")
    for runner in runners:
        engine = build_engine(cfg, runner, 128, _num_blocks(cfg))
        rows = []
        for b in (1, 128):
            rows.append(_decode_step_times(engine, _prompts(cfg, b, vocab, b), steps=40,
                                           profile=profile_decode))
            print(runner, json.dumps(rows[-1])[:2000], flush=True)
            result["runners"][runner] = rows
            _write(out, "breakdown", result)
        engine.close()
        del engine
        torch.cuda.empty_cache()


def prefix(out: Path) -> None:
    """Time to first token of a request whose 1,024-token prefix is cached vs not."""
    from slaq.bench.prefix import PrefixBenchConfig, plot_prefix, run_prefix_bench

    result = run_prefix_bench(PrefixBenchConfig(model=_model(), device="cuda",
                                                dtype="bfloat16", rounds=10))
    _write(out, "prefix_cache", result)
    _plot(plot_prefix, result, out / "prefix_cache.png")


def prefix_profile(out: Path) -> None:
    """Where the TTFT of a request behind a cached 1,024-token prefix goes (host vs kernels)."""
    from gpu_profile import profile_prefix

    from slaq.bench.prefix import PrefixBenchConfig, build_prefix_engine
    from slaq.gpu_workers.engine.config import SamplingParams

    cfg = PrefixBenchConfig(model=_model(), device="cuda", dtype="bfloat16")
    engine = build_prefix_engine(cfg)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 32000, (cfg.prefix_len,), generator=gen).tolist()
    suffix = torch.randint(3, 32000, (cfg.suffix_len,), generator=gen).tolist()
    engine.add_request("first", prefix + [1] * cfg.suffix_len,
                       SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    result = {"bench": "prefix_profile", "device": torch.cuda.get_device_name(),
              **profile_prefix(engine, prefix, suffix)}
    _write(out, "prefix_profile", result)
    engine.close()


def main() -> None:
    step, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"transfer": transfer, "engine": engine, "parity": parity, "kernels": kernels,
     "breakdown": breakdown, "prefix": prefix,
     "prefix_profile": prefix_profile}[step](out)


if __name__ == "__main__":
    main()
