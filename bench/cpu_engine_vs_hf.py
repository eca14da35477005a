"""CPU check of the issue's target: our engine vs HF ``generate`` in the same invocation.

SmolLM2-135M (fp32), 32 requests with prompts spread over 64..512 tokens, 128 new tokens each,
greedy, EOS ignored. HF runs one left-padded batch with an explicit attention mask; our engine
takes all requests at once. Rounds alternate which side goes first, so background load on a
shared machine hits both alike; the JSON has every round's figures and their ratio.

    python bench/cpu_engine_vs_hf.py [--rounds 2] [--batch 32] [--new-tokens 128] [--out f]
        [--with-bf16] [--with-unpacked] [--with-copy] [--with-gather] [--with-torch-ops]
        [--with-sdpa-prefill] [--hf-bf16]

Our engine runs its CPU fp32 matmuls in strict fp32 with oneDNN-prepacked weights
(``EngineConfig.cpu_matmul_precision``, see models/cpu_linear); HF runs with torch's defaults
(strict fp32, MKL). ``--with-bf16`` adds our engine with unpacked linears under oneDNN's bf16
math mode (where the CPU has it and a probe finds it accurate; the option is refused elsewhere),
``--with-unpacked`` with plain ``F.linear``, ``--with-copy`` / ``--with-gather`` with the decode
attention on the contiguous K/V copy / on blocks gathered every step instead of the C paged
kernel, ``--with-torch-ops`` with each layer's element-wise ops in torch instead of the C
layer-op kernels, ``--with-sdpa-prefill`` with torch's SDPA for prefill chunks instead of the C
prefill attention kernel, ``--hf-bf16`` HF under oneDNN's bf16 math mode: all in the same rounds, so
what each piece gives is measured beside the headline. Both sides run in this process, so both
get the huge pages slaq turns on.
"""

from __future__ import annotations

import slaq  # noqa: F401  (first: it turns on huge pages before torch allocates)

# isort: split
import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from slaq.bench.cli import resolve_model
from slaq.bench.device import device_name
from slaq.bench.engine import (
    EngineBenchConfig,
    _num_blocks,
    _prompts,
    build_engine,
    load_hf,
    parity,
    run_hf,
    run_ours,
)
from slaq.gpu_workers.engine.models.cpu_linear import bf16_math_error, fp32_matmul_precision
from slaq.gpu_workers.engine.models.layer_ops import EAGER_OPS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", default="64:512")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--with-gather", action="store_true",
                    help="also run our engine with the CPU decode K/V copy off (the gather "
                         "path it replaced), in the same rounds")
    ap.add_argument("--with-unpacked", action="store_true",
                    help="also run our engine in strict fp32 with plain F.linear (MKL sgemm, "
                         "not oneDNN-packed) linears, in the same rounds")
    ap.add_argument("--with-bf16", action="store_true",
                    help="also run our engine with its linears under oneDNN's bf16 math mode "
                         "(cpu_matmul_precision='bf16', where the CPU has it and it is "
                         "accurate), in the same rounds")
    ap.add_argument("--with-copy", action="store_true",
                    help="also run our engine with the decode attention on the contiguous "
                         "K/V copy and batched matmuls instead of the C paged kernel, in the "
                         "same rounds")
    ap.add_argument("--with-torch-ops", action="store_true",
                    help="also run our engine with the layers' element-wise ops (norms, SiLU, "
                         "rotary) in torch instead of the C kernels, in the same rounds")
    ap.add_argument("--with-sdpa-prefill", action="store_true",
                    help="also run our engine with its prefill chunks' attention in torch's SDPA "
                         "instead of the C prefill kernel, in the same rounds")
    ap.add_argument("--hf-bf16", action="store_true",
                    help="also run HF generate under oneDNN's bf16 math mode, in the same rounds")
    args = ap.parse_args()
    lo, _, hi = args.prompt_len.partition(":")
    cfg = EngineBenchConfig(model=resolve_model(args.model), batch_sizes=(args.batch,),
                            prompt_len=(int(lo), int(hi or lo)), new_tokens=args.new_tokens,
                            prefill_batch=0)
    hf_model = load_hf(cfg)
    engine = build_engine(cfg, "eager", args.batch, _num_blocks(cfg))
    prompts = _prompts(cfg, args.batch, engine.model_config.vocab_size, cfg.seed + args.batch)
    setup = {"ours_matmul_precision": engine.runner.matmul_precision,
             "ours_decode_attention": type(engine.runner.backend).__name__,
             "ours_layer_ops": "c" if engine.runner.model.ops is not EAGER_OPS else "torch",
             "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    print(json.dumps(setup), flush=True)
    variants = {}
    if args.with_bf16:
        variants["bf16"] = build_engine(cfg, "eager", args.batch, _num_blocks(cfg), "bf16")
        if variants["bf16"].runner.matmul_precision != "bf16":
            # The engine falls back to strict fp32 where the mode is missing or inexact: the
            # variant would measure the headline again under another name.
            raise SystemExit("--with-bf16: oneDNN's bf16 math mode is missing or inexact on "
                             "this CPU (see models/cpu_linear.bf16_matmul_available)")
    if args.with_copy:
        variants["copy"] = build_engine(cfg, "eager", args.batch, _num_blocks(cfg),
                                        cpu_decode_attention="copy")
    if args.with_gather:
        # The portable path: every decode step gathers the batch's blocks from the pool.
        variants["gather"] = build_engine(cfg, "eager", args.batch, _num_blocks(cfg),
                                          cpu_decode_attention="copy")
        variants["gather"].runner.decode_kv = None
    if args.with_unpacked:
        from slaq.gpu_workers.engine.models.cpu_linear import unpack_linears

        # Our engine with MKL's F.linear, as it ran before the prepacked matmuls.
        variants["unpacked"] = build_engine(cfg, "eager", args.batch, _num_blocks(cfg), "ieee")
        unpack_linears(variants["unpacked"].runner.model)
    if args.with_torch_ops:
        variants["torch_ops"] = build_engine(cfg, "eager", args.batch, _num_blocks(cfg),
                                             fuse_layer_ops=False)
    if args.with_sdpa_prefill:
        variants["sdpa_prefill"] = build_engine(cfg, "eager", args.batch, _num_blocks(cfg),
                                                cpu_prefill_kernel=False)
    for other in variants.values():
        run_ours(other, prompts[:2], 4, "cpu")
    run_hf(hf_model, prompts[:2], 2, "cpu")  # warm up both
    run_ours(engine, prompts[:2], 4, "cpu")
    rounds = []
    for r in range(args.rounds):
        order = ("hf", "ours") if r % 2 == 0 else ("ours", "hf")
        res = {}
        for side in order:
            res[side] = (run_hf(hf_model, prompts, cfg.new_tokens, "cpu") if side == "hf"
                         else run_ours(engine, prompts, cfg.new_tokens, "cpu"))
        extra = {name: run_ours(other, prompts, cfg.new_tokens, "cpu")
                 for name, other in variants.items()}
        if args.hf_bf16:
            with fp32_matmul_precision("bf16"):
                extra["hf_bf16"] = run_hf(hf_model, prompts, cfg.new_tokens, "cpu")
        rounds.append({
            "order": list(order),
            "hf_tok_per_s": res["hf"]["output_tok_per_s"],
            "hf_seconds": res["hf"]["seconds"],
            "ours_tok_per_s": res["ours"]["output_tok_per_s"],
            "ours_seconds": res["ours"]["seconds"],
            "ours_time_to_all_first_tokens_s": res["ours"]["time_to_all_first_tokens_s"],
            "ours_decode_tok_per_s": res["ours"]["decode_tok_per_s"],
            "speedup_vs_hf": round(res["ours"]["output_tok_per_s"]
                                   / res["hf"]["output_tok_per_s"], 2),
            "greedy_parity": parity(res["ours"]["tokens"], res["hf"]["tokens"]),
        })
        for name, run in extra.items():
            key = name if name.startswith("hf") else f"ours_{name}"
            rounds[-1][f"{key}_tok_per_s"] = run["output_tok_per_s"]
            rounds[-1][f"{key}_seconds"] = run["seconds"]
            rounds[-1][f"{key}_parity"] = parity(run["tokens"], res["hf"]["tokens"])
            if name.startswith("hf"):  # ours as run above against HF under that mode
                rounds[-1][f"speedup_vs_{key}"] = round(
                    res["ours"]["output_tok_per_s"] / run["output_tok_per_s"], 2)
            else:
                rounds[-1][f"{key}_speedup_vs_hf"] = round(
                    run["output_tok_per_s"] / res["hf"]["output_tok_per_s"], 2)
        print(json.dumps(rounds[-1]), flush=True)
    result = {
        "bench": "cpu_engine_vs_hf", "device": device_name("cpu"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": cfg.model, "batch": args.batch,
        **setup,
        "bf16_math_error": bf16_math_error(),
        "prompt_len": list(cfg.prompt_len), "new_tokens": cfg.new_tokens,
        "rounds": rounds,
        "median_speedup_vs_hf": statistics.median(r["speedup_vs_hf"] for r in rounds),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
