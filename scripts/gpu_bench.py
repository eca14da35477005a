"""The GPU check's benchmark steps (called by scripts/gpu_check.sh); JSON into a directory.

    python scripts/gpu_bench.py transfer OUT_DIR
    python scripts/gpu_bench.py kernels OUT_DIR
    python scripts/gpu_bench.py engine OUT_DIR     # Llama-3.2-1B-shaped random model, bf16
    python scripts/gpu_bench.py parity OUT_DIR     # same model in fp32: greedy parity with HF

Calls the library functions directly, so the machine needs no click (only torch, triton,
transformers and, for the lease timings, redis-py plus a redis-server).
"""

from __future__ import annotations

import json
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

    cfg = EngineBenchConfig(model=_model(), device="cuda", dtype="bfloat16",
                            batch_sizes=(1, 32, 128), prompt_len=(512, 512), new_tokens=128,
                            prefill_batch=8, prefill_len=2048, runners=("graphs", "eager"))
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

    from slaq.gpu_workers.engine.paged_attention.triton_decode import paged_decode

    rows = []
    heads, kv_heads, head_dim, bs = 32, 8, 64, 16
    for batch, ctx in ((1, 640), (32, 640), (128, 640), (128, 2048)):
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
        for name, fn in (("triton_paged", triton_paged), ("gather_sdpa", gather_sdpa)):
            us = _time_cuda(fn)
            row[name] = {"us": round(us, 1), "kv_gb_per_s": round(kv_bytes / us / 1e3, 1)}
        err = (triton_paged().float() - gather_sdpa().float()).abs().max().item()
        row["max_abs_diff"] = err
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(out, "kernels", {"bench": "decode_attention_kernels",
                            "device": torch.cuda.get_device_name(), "results": rows})


def main() -> None:
    step, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"transfer": transfer, "engine": engine, "parity": parity, "kernels": kernels}[step](out)


if __name__ == "__main__":
    main()
