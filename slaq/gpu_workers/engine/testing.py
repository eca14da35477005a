"""A tiny random-weight Llama in an HF-style directory, for tests and the ``tiny-random`` model.

The tokenizer is a real byte-level BPE trained (in milliseconds) with the ``tokenizers``
library, so any text round-trips; the chat template and special tokens mirror SmolLM2's
(``<|im_start|>`` = 1, ``<|im_end|>`` = 2 = EOS). Weights are seeded, so the same seed gives
the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slaq.gpu_workers.engine.config import (
    CacheConfig,
    EngineConfig,
    SamplingParams,
    SchedulerConfig,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? "
    "The capital of France is Paris. Hello, world! Once upon a time there was a small model "
    "that answered questions about cities, numbers and colours: one two three four five six "
    "seven eight nine ten. Le café est très bon à Paris; 東京は日本の首都です. "
    "def main():\n    return 42\n"
)


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return tok


def _random_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        # Unit-gain init keeps activations O(1), so attention and MLP visibly shape the output.
        return torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(hidden, generator=gen)

    w = {"model.embed_tokens.weight": 0.5 * torch.randn(cfg["vocab_size"], hidden, generator=gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, q_out)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(cfg["vocab_size"], hidden)
    return {k: v.contiguous() for k, v in w.items()}


def make_tiny_model(path: str | Path, seed: int = 0, *, vocab_size: int = 512,
                    num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
                    num_kv_heads: int = 2, intermediate_size: int = 128,
                    tie_word_embeddings: bool = False,
                    rope_scaling: dict[str, Any] | None = None,
                    max_position_embeddings: int = 4096) -> Path:
    """Write a random Llama with a real tokenizer to ``path`` (by default tiny: hidden 64,
    4 heads, 2 KV heads, 2 layers; larger shapes serve GPU benchmarks)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tok.get_vocab_size(), "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu", "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
        "model_max_length": max_position_embeddings, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    save_file(_random_weights(cfg, seed), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


# -- helpers shared by the engine tests and benchmarks ---------------------------------------

# Prompts for the tiny model (its tokenizer was trained on text like this).
TINY_PROMPTS = [
    "Hello, world!",
    "The capital of France is",
    "one two three four five six seven eight nine ten. " * 3,
    "def main():\n    return",
    "Le café est très bon",
]


def engine_config(path: str | Path, *, num_blocks: int = 256, block_size: int = 4,
                  max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                  max_model_len: int = 1024, **kw: Any) -> EngineConfig:
    """A small-pool engine config for tests (blocks of 4 tokens exercise block boundaries)."""
    return EngineConfig(
        model=str(path),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=max_model_len),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks), **kw)


def hf_causal_lm(path: str | Path) -> Any:
    """The transformers reference model for a directory, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy tokens with EOS ignored. The explicit attention mask matters:
    HF would otherwise mask prompt tokens equal to the pad id (<|im_end|> is the pad token)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def last_token_logits(runner: Any, prompt: list[int]) -> torch.Tensor:
    """Our model's logits after ``prompt``, computed by ``runner`` in blocks ``0..n`` of its
    pool (which it overwrites): for comparisons with a reference implementation."""
    from slaq.gpu_workers.engine.outputs import ScheduledSequence
    from slaq.gpu_workers.engine.sequence import Sequence

    seq = Sequence("logits-probe", list(prompt), SamplingParams(temperature=0.0))
    seq.block_table = list(range(-(-len(prompt) // runner.block_size)))
    batch = runner._prepare([ScheduledSequence(seq, 0, len(prompt))])
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta,
                              runner.backend)
        return runner.model.compute_logits(hidden[-1:])[0].float().cpu()


def prefill_elsewhere(engine: Any, prompt: list[int], params: Any,
                      skip: int = 0) -> tuple[Any, Any]:
    """Prefill ``prompt`` on ``engine`` (a separate one, as a prefill worker would): its
    first output and the prompt's KV blocks after the first ``skip`` (what a decode worker
    with those cached pulls)."""
    engine.add_request("src", prompt, params, prefill_only=True)
    outs: list = []
    while not outs or not outs[-1].finished:
        outs += engine.step()
    return outs[-1], engine.read_blocks(engine.leased_blocks("src")[skip:])


def drain_outputs(engine: Any, requests: list[tuple[str, list[int], Any]],
                  between: Any = None) -> dict[str, dict[str, Any]]:
    """Add ``(request_id, prompt, params)`` requests and step ``engine`` to the end, checking
    the scheduler after every step; per request: ``ids``, ``text``, ``reason``,
    ``num_finished`` (outputs that said finished) and ``logprobs``. ``between(engine, i)``
    runs after step ``i`` (to add or abort requests mid-way)."""
    from collections import defaultdict

    from slaq.gpu_workers.engine.sequence import PLACEHOLDER_TOKEN_ID

    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"ids": [], "text": "", "reason": None, "num_finished": 0, "logprobs": []})
    i = 0
    while engine.has_unfinished():
        for o in engine.step():
            assert PLACEHOLDER_TOKEN_ID not in o.new_token_ids
            g = got[o.request_id]
            g["ids"] += o.new_token_ids
            g["text"] += o.new_text
            g["logprobs"] += o.logprobs or []
            if o.finished:
                g["reason"] = o.finish_reason
                g["num_finished"] += 1
        engine.scheduler.check_integrity()
        if between is not None:
            between(engine, i)
        i += 1
    return dict(got)
