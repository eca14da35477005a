"""Where a CPU decode step goes: the benchmark's 32 prompts (64..512 tokens) run until every
request has its first token, then decode steps are timed bare and under ``torch.profiler``.
With ``--profile-prefill`` the phase up to the first tokens runs under the profiler too (its
time then includes the profiler's cost).

    python bench/profile_decode_step.py [--batch 32] [--steps 30] [--profiled-steps 20]
        [--matmul-precision ieee|bf16] [--decode-attention auto|paged|copy] [--torch-ops]
        [--profile-prefill]
"""

from __future__ import annotations

import slaq  # noqa: F401  (first: it turns on huge pages before torch allocates)

# isort: split
import argparse
import contextlib
import json
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from slaq.bench.cli import resolve_model
from slaq.bench.device import device_name
from slaq.bench.engine import EngineBenchConfig, _num_blocks, _prompts, build_engine
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.models.layer_ops import EAGER_OPS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profiled-steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--matmul-precision", choices=("ieee", "bf16"), default="ieee")
    ap.add_argument("--decode-attention", choices=("auto", "paged", "copy"), default="auto")
    ap.add_argument("--torch-ops", action="store_true",
                    help="the layers' element-wise ops in torch, not the C kernels")
    ap.add_argument("--profile-prefill", action="store_true")
    args = ap.parse_args()
    new_tokens = 1 + args.steps + args.profiled_steps + 8
    cfg = EngineBenchConfig(model=resolve_model("smollm2"), batch_sizes=(args.batch,),
                            new_tokens=new_tokens, prefill_batch=0)
    prompts = _prompts(cfg, args.batch, 49152, cfg.seed + args.batch)
    engine = build_engine(cfg, "eager", args.batch, _num_blocks(cfg),
                          cpu_matmul_precision=args.matmul_precision,
                          cpu_decode_attention=args.decode_attention,
                          fuse_layer_ops=not args.torch_ops)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    prefill_prof = profile(activities=[ProfilerActivity.CPU]) if args.profile_prefill else None
    t0 = time.perf_counter()
    with prefill_prof or contextlib.nullcontext():
        while engine.scheduler.num_waiting or any(
                seq.num_output_tokens < 1 for seq in engine.scheduler.running):
            engine.step()
    first_tokens_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profiled_steps):
            engine.step()
    per_step = {e.key: e.self_cpu_time_total / 1e3 / args.profiled_steps
                for e in prof.key_averages()}
    top = sorted(per_step, key=per_step.__getitem__, reverse=True)[:args.top]
    print(json.dumps({
        "device": device_name("cpu"), "batch": args.batch,
        "matmul_precision": engine.runner.matmul_precision,
        "decode_attention": type(engine.runner.backend).__name__,
        "layer_ops": "torch" if engine.runner.model.ops is EAGER_OPS else "c",
        "time_to_all_first_tokens_s": round(first_tokens_s, 2),
        "decode_step_ms": {"median": round(statistics.median(times) * 1e3, 1),
                           "min": round(min(times) * 1e3, 1), "steps": args.steps},
        "profiled_ms_per_step": {k: round(per_step[k], 2) for k in top},
        "profiled_op_total_ms_per_step": round(sum(per_step.values()), 1),
        **(_prefill_ops(prefill_prof, args.top) if prefill_prof else {}),
    }, indent=2))


def _prefill_ops(prof: profile, top: int) -> dict[str, object]:
    """The prefill phase's costliest ops (self time, ms) and the total over all ops."""
    total = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    keys = sorted(total, key=total.__getitem__, reverse=True)[:top]
    return {"prefill_profiled_ms": {k: round(total[k], 1) for k in keys},
            "prefill_profiled_op_total_ms": round(sum(total.values()), 1)}


if __name__ == "__main__":
    main()
