"""``slaq bench engine``: our engine against HF transformers on the same model and prompts.

For each batch size, the same random prompts go through our engine (all requests at once,
continuous batching, greedy, EOS ignored) and through HF ``generate`` as one left-padded batch;
output tokens per second of both, and our decode-phase rate (after every request has its first
token). Prefill: our engine's prompt tokens per second against HF's forward over the same
batch. Parity: how many requests produced exactly HF's greedy tokens.

Models: an HF-style directory, ``smollm2`` (SmolLM2-135M-Instruct from the model store) or a
random model shaped like Llama-3.2-1B (``llama-3.2-1b-random``, built in code, for GPUs).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slaq.bench.device import device_name

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
# To show what each part buys: "graphs-sync" is the graphs runner without asynchronous
# scheduling (each step waits for the previous one's tokens); "graphs-plain" also drops the
# fused layer ops and asynchronous output processing (the engine as first measured).
RUNNERS = ("eager", "triton", "graphs", "graphs-sync", "graphs-plain")
_RUNNER_OPTIONS: dict[str, dict[str, bool]] = {
    "graphs-sync": {"async_scheduling": False},
    "graphs-plain": {"fuse_layer_ops": False, "async_output": False, "async_scheduling": False},
}
RANDOM_MARKER = "random_model.json"  # written last by make_random_llama


@dataclass(frozen=True, slots=True)
class EngineBenchConfig:
    """What to run. ``prompt_len`` is ``(min, max)``: lengths spread evenly between them."""

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (32,)
    prompt_len: tuple[int, int] = (64, 512)
    new_tokens: int = 128
    prefill_batch: int = 8
    prefill_len: int = 2048
    runners: tuple[str, ...] = ("eager",)
    hf: bool = True
    # None: 8192 on CUDA; the engine's own default on CPU, where a 2048-token step ran the
    # same prefill about 10% faster than an 8192-token one (its temporaries stay cached).
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    seed: int = 0

    @property
    def token_budget(self) -> int:
        from slaq.gpu_workers.engine.config import SchedulerConfig

        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.device.startswith("cuda") else SchedulerConfig().max_num_batched_tokens

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch sizes must be >= 1")
        if not 1 <= self.prompt_len[0] <= self.prompt_len[1]:
            raise ValueError("prompt_len must be (min, max) with 1 <= min <= max")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2")
        if any(r not in RUNNERS for r in self.runners):
            raise ValueError(f"runners must be among {RUNNERS}")
        if self.device == "cpu" and set(self.runners) - {"eager"}:
            raise ValueError("the triton and graphs runners need CUDA")


def make_random_llama(path: str | Path, config: dict[str, Any] | None = None, seed: int = 0,
                      device: str = "cpu") -> Path:
    """An HF-style directory with a random model of ``config`` (default: Llama-3.2-1B's shape)
    and a small trained tokenizer (ids past its vocabulary decode to nothing)."""
    from safetensors.torch import save_file

    from slaq.gpu_workers.engine.testing import make_tiny_model

    cfg = dict(config or LLAMA_1B)
    path = make_tiny_model(path, seed=seed)  # tokenizer and side files
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def rand(*shape: int, scale: float, offset: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, device=device) * scale + offset
        return t.to(torch.bfloat16).cpu()

    # Unit-gain linears keep activations O(1), so the greedy argmax is well separated.
    w = {"model.embed_tokens.weight": rand(cfg["vocab_size"], hidden, scale=0.5),
         "model.norm.weight": rand(hidden, scale=0.1, offset=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, (o, n) in {"self_attn.q_proj": (q_out, hidden),
                             "self_attn.k_proj": (kv_out, hidden),
                             "self_attn.v_proj": (kv_out, hidden),
                             "self_attn.o_proj": (hidden, q_out),
                             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                             "mlp.down_proj": (hidden, inter)}.items():
            w[p + name + ".weight"] = rand(o, n, scale=n ** -0.5)
        w[p + "input_layernorm.weight"] = rand(hidden, scale=0.1, offset=1.0)
        w[p + "post_attention_layernorm.weight"] = rand(hidden, scale=0.1, offset=1.0)
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = rand(cfg["vocab_size"], hidden, scale=hidden ** -0.5)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / RANDOM_MARKER).write_text(json.dumps({"seed": seed}))
    return path


def _prompts(cfg: EngineBenchConfig, n: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = cfg.prompt_len
    lens = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
    # Ids from the low range: every tokenizer and model knows them.
    return [torch.randint(3, min(vocab, 32000), (ln,), generator=gen).tolist() for ln in lens]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- our engine ---------------------------------------------------------------------------


def build_engine(cfg: EngineBenchConfig, runner: str, max_num_seqs: int, num_blocks: int,
                 cpu_matmul_precision: str = "ieee", cpu_decode_attention: str = "auto",
                 fuse_layer_ops: bool = True, cpu_prefill_kernel: bool = True) -> Any:
    from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.loader import load_model_config

    mc = load_model_config(cfg.model)
    max_len = min(max(cfg.prompt_len[1] + cfg.new_tokens, cfg.prefill_len + 1),
                  mc.max_position_embeddings)
    config = EngineConfig(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=cfg.token_budget,
                                  max_model_len=max_len),
        cache=CacheConfig(block_size=cfg.block_size, num_blocks=num_blocks,
                          enable_prefix_caching=False),
        use_cuda_graphs=runner.startswith("graphs"), cpu_matmul_precision=cpu_matmul_precision,
        cpu_decode_attention=cpu_decode_attention, cpu_prefill_kernel=cpu_prefill_kernel,
        # A runner's own options (graphs-plain turns fusing off) win.
        **{"fuse_layer_ops": fuse_layer_ops, **_RUNNER_OPTIONS.get(runner, {})})
    if runner == "eager":
        return LLMEngine(config)
    from slaq.gpu_workers.engine.cuda_graphs import CudaGraphModelRunner

    return LLMEngine(config, runner=CudaGraphModelRunner(config, mc))


def run_ours(engine: Any, prompts: list[list[int]], new_tokens: int,
             device: str) -> dict[str, Any]:
    """All prompts at once; throughput overall and in the decode phase; the tokens."""
    from slaq.gpu_workers.engine.config import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tag = f"b{time.monotonic_ns()}"
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    _sync(device)
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    first_done = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if first_done is None and all(tokens.values()):
            first_done = time.perf_counter()
    _sync(device)
    end = time.perf_counter()
    total = sum(len(t) for t in tokens.values())
    decode_s = end - (first_done or end)
    return {
        "seconds": round(end - t0, 4), "output_tokens": total,
        "output_tok_per_s": round(total / (end - t0), 2),
        "time_to_all_first_tokens_s": round((first_done or end) - t0, 4),
        "decode_tok_per_s": round((total - len(prompts)) / decode_s, 2) if decode_s else None,
        "tokens": [tokens[rid] for rid in ids],
    }


PREFILL_REPEATS = 3  # one shot of ~0.1 s on a GPU is noisy: report the median of three


def _prefill_summary(times: list[float], n: int) -> dict[str, Any]:
    dt = statistics.median(times)
    return {"seconds": round(dt, 4), "seconds_all": [round(t, 4) for t in times],
            "prompt_tokens": n, "tok_per_s": round(n / dt, 1)}


def run_ours_prefill(engine: Any, prompts: list[list[int]], device: str) -> dict[str, Any]:
    """Prompt tokens per second of whole prefills (one sampled token each)."""
    from slaq.gpu_workers.engine.config import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for _ in range(PREFILL_REPEATS):
        _sync(device)
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _prefill_summary(times, sum(len(p) for p in prompts))


# -- HF transformers ----------------------------------------------------------------------


def load_hf(cfg: EngineBenchConfig) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(cfg.model, torch_dtype=dtype)
    return model.to(device=cfg.device, dtype=dtype).eval()


def run_hf(model: Any, prompts: list[list[int]], new_tokens: int,
           device: str) -> dict[str, Any]:
    """HF ``generate``, one left-padded batch, greedy, exactly ``new_tokens`` each."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)
    _sync(device)
    dt = time.perf_counter() - t0
    total = len(prompts) * new_tokens
    return {"seconds": round(dt, 4), "output_tokens": total,
            "output_tok_per_s": round(total / dt, 2),
            "tokens": out[:, width:].tolist()}


def run_hf_prefill(model: Any, prompts: list[list[int]], device: str) -> dict[str, Any]:
    ids = torch.tensor(prompts, device=device)
    times = []
    with torch.inference_mode():
        model(ids[:1, :16])  # warm up
        for _ in range(PREFILL_REPEATS):
            _sync(device)
            t0 = time.perf_counter()
            model(ids)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return _prefill_summary(times, ids.numel())


def parity(ours: list[list[int]], hf: list[list[int]]) -> dict[str, Any]:
    """How many requests match HF exactly, and where the others first differ."""
    prefixes = []
    for a, b in zip(ours, hf, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
        prefixes.append(k)
    return {"num_requests": len(ours),
            "num_identical": sum(a == b for a, b in zip(ours, hf, strict=True)),
            "first_divergence": [p for p in prefixes if p < len(hf[0])]}


# -- the whole benchmark ------------------------------------------------------------------


def _num_blocks(cfg: EngineBenchConfig) -> int:
    per_seq = -(-(cfg.prompt_len[1] + cfg.new_tokens) // cfg.block_size)
    prefill = cfg.prefill_batch * -(-(cfg.prefill_len + 1) // cfg.block_size)
    return max(max(cfg.batch_sizes) * per_seq, prefill) + 64


def _hf_part(cfg: EngineBenchConfig, prompt_sets: dict[int, list[list[int]]],
             prefill_prompts: list[list[int]]) -> tuple[dict[int, Any], Any]:
    model = load_hf(cfg)
    run_hf(model, prompt_sets[min(prompt_sets)][:1], 2, cfg.device)  # warm up
    decode = {b: run_hf(model, prompts, cfg.new_tokens, cfg.device)
              for b, prompts in prompt_sets.items()}
    prefill = run_hf_prefill(model, prefill_prompts, cfg.device) if cfg.prefill_batch else None
    del model
    _free_memory(cfg.device)
    return decode, prefill


def _ours_part(cfg: EngineBenchConfig, runner: str, prompt_sets: dict[int, list[list[int]]],
               prefill_prompts: list[list[int]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = build_engine(cfg, runner, max(cfg.batch_sizes), _num_blocks(cfg))
    setup_s = time.perf_counter() - t0
    # Warm up: kernels compile and autotune, the allocator settles. On CUDA every batch runs
    # once as measured, or whichever runner goes first pays compiles in its time to first
    # token and the next one looks faster for it: with only every batch's prefill warmed
    # (4 new tokens), the first runner's batch-128 time to all first tokens was still 1.24 s
    # against the next runner's 0.42 s (H100, 2026-11-28).
    cuda = cfg.device.startswith("cuda")
    warm = prompt_sets if cuda else {0: prompt_sets[min(prompt_sets)][:2]}
    for prompts in warm.values():
        run_ours(engine, prompts, cfg.new_tokens if cuda else 4, cfg.device)
    decode = {b: run_ours(engine, prompts, cfg.new_tokens, cfg.device)
              for b, prompts in prompt_sets.items()}
    prefill = (run_ours_prefill(engine, prefill_prompts, cfg.device) if cfg.prefill_batch
               else None)
    engine.close()
    del engine
    _free_memory(cfg.device)
    return {"setup_s": round(setup_s, 2), "decode": decode, "prefill": prefill}


def run_engine_bench(cfg: EngineBenchConfig,
                     on_partial: Callable[[dict[str, Any]], None] | None = None,
                     ) -> dict[str, Any]:
    """Run HF (when asked) and each of our runners on the same prompts; a JSON-ready dict.

    ``on_partial`` gets the result so far after each stage (a run cut short keeps them).
    """
    from slaq.gpu_workers.engine.loader import load_model_config

    mc = load_model_config(cfg.model)
    prompt_sets = {b: _prompts(cfg, b, mc.vocab_size, cfg.seed + b) for b in cfg.batch_sizes}
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    prefill_prompts = [torch.randint(3, min(mc.vocab_size, 32000), (cfg.prefill_len,),
                                     generator=gen).tolist() for _ in range(cfg.prefill_batch)]
    hf_decode, hf_prefill = (_hf_part(cfg, prompt_sets, prefill_prompts) if cfg.hf
                             else ({}, None))
    ours: dict[str, Any] = {}
    errors: dict[str, str] = {}
    result = _assemble(cfg, mc, hf_decode, hf_prefill, ours)
    for r in cfg.runners:
        if on_partial is not None:
            on_partial(result)
        try:
            ours[r] = _ours_part(cfg, r, prompt_sets, prefill_prompts)
        except Exception as exc:  # one broken runner must not hide the others' figures
            import traceback

            traceback.print_exc()
            errors[r] = f"{type(exc).__name__}: {exc}"
            _free_memory(cfg.device)
        result = _assemble(cfg, mc, hf_decode, hf_prefill, ours)
        result["errors"] = dict(errors)
    return result


def _assemble(cfg: EngineBenchConfig, mc: Any, hf_decode: dict[int, Any], hf_prefill: Any,
              ours: dict[str, Any]) -> dict[str, Any]:
    decode_rows = []
    for b in cfg.batch_sizes:
        row: dict[str, Any] = {"batch": b, "prompt_len": list(cfg.prompt_len),
                               "new_tokens": cfg.new_tokens, "ours": {}}
        hf = hf_decode.get(b)
        if hf is not None:
            row["hf_generate"] = {k: v for k, v in hf.items() if k != "tokens"}
        for r, res in ours.items():
            mine = res["decode"][b]
            entry = {k: v for k, v in mine.items() if k != "tokens"}
            if hf is not None:
                entry["speedup_vs_hf"] = round(mine["output_tok_per_s"]
                                               / hf["output_tok_per_s"], 2)
                entry["greedy_parity"] = parity(mine["tokens"], hf["tokens"])
            row["ours"][r] = entry
        decode_rows.append(row)
    prefill: dict[str, Any] = {"batch": cfg.prefill_batch, "prompt_len": cfg.prefill_len,
                               "hf_forward": hf_prefill,
                               "ours": {r: res["prefill"] for r, res in ours.items()}}
    if hf_prefill:
        for res in prefill["ours"].values():
            if res:
                res["ratio_vs_hf_forward"] = round(res["tok_per_s"] / hf_prefill["tok_per_s"],
                                                   3)
    return {
        "bench": "engine", "device": device_name(cfg.device), "torch": torch.__version__,
        "model": {"path": cfg.model, "dtype": cfg.dtype, "num_layers": mc.num_layers,
                  "hidden_size": mc.hidden_size, "vocab_size": mc.vocab_size},
        "setup_s": {r: res["setup_s"] for r, res in ours.items()},
        "decode": decode_rows, "prefill": prefill,
    }


def plot_engine(result: dict[str, Any], path: str | Path) -> None:
    """Output tokens per second per batch size: each of our runners against HF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["decode"]
    labels = [str(r["batch"]) for r in rows]
    series: dict[str, list[float]] = {}
    if all("hf_generate" in r for r in rows):
        series["HF generate"] = [r["hf_generate"]["output_tok_per_s"] for r in rows]
    for name in rows[0]["ours"] if rows else ():
        series[f"slaq ({name})"] = [r["ours"][name]["output_tok_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_yscale("log")
    ax.set_title(f"{Path(result['model']['path']).name} ({result['model']['dtype']}), "
                 f"{result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
