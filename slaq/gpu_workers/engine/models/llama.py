"""Llama-family decoder (SmolLM2, TinyLlama, Llama-3.x) over a paged KV pool.

RMSNorm, RoPE (default / linear / llama3 scaling, any ``rope_theta``), grouped-query attention,
SiLU-gated MLP, optionally tied embeddings. Q/K/V and gate/up projections are fused at load
time (one matmul each) and the model computes logits only for the rows that are sampled.
Attention itself lives in :mod:`slaq.gpu_workers.engine.attention`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slaq.gpu_workers.engine.attention import AttentionBackend, AttentionMetadata
from slaq.gpu_workers.engine.models.layer_ops import EAGER_OPS, LayerOps


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture facts the engine needs, read from an HF ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse an HF config dict; accepts both ``rope_theta``/``rope_scaling`` (transformers
        4) and ``rope_parameters`` (transformers 5)."""
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}")
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        num_heads = d["num_attention_heads"]
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                           else None)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, CPU) and the cos/sin scale ("attention factor")."""
    dim = cfg.head_dim
    # fp32 throughout, as the reference implementation computes it.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    elif kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv_freq, 1.0


class RotaryEmbedding:
    """cos/sin tables for positions ``[0, max_positions)``, built once on the model's device."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build(self, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq, attn_factor = rope_inv_freq(self.cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attn_factor).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * attn_factor).to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for ``positions``, shaped ``[T, 1, D]``; once per forward."""
        assert self.cos is not None and self.sin is not None, "call build() first"
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


class RMSNorm(nn.Module):
    """Holds the weight; the math is in :mod:`layer_ops` (``rms_norm`` / ``add_rms_norm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, ops: LayerOps) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x).view(n, -1, self.head_dim)
        # q and k heads are adjacent: one rotation covers both.
        qk = ops.rotary(qkv[:, :self.num_heads + self.num_kv_heads], *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        o = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(n, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size,
                                      bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend,
                ops: LayerOps) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's output still to be added to ``residual`` (None at the
        first layer, where ``x`` is the embedding): each add is fused with the norm after it.
        Returns this layer's MLP output and the residual stream it is to be added to."""
        norm = self.input_layernorm
        if residual is None:
            h, residual = ops.rms_norm(x, norm.weight, norm.eps), x
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, rope, kv_cache, meta, backend, ops)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, ops), residual


# HF checkpoint name fragment -> (our fused parameter, shard index among its parts)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """``forward`` returns hidden states for the flattened tokens; ``compute_logits`` projects
    only the rows that are sampled."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Swapped for fused versions by runners on devices where that pays (see layer_ops).
        self.ops = EAGER_OPS

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            meta.layer_idx = i
            x, residual = layer(x, residual, rope, kv_caches[i], meta, backend, self.ops)
        return self.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Raises if any is missing."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            target, shard = name, None
            for frag, (fused, idx) in _FUSED.items():
                if frag in name:
                    target, shard = name.replace(frag, fused), idx
                    break
            if target not in params:
                raise ValueError(f"unexpected weight {hf_name!r}")
            param = params[target]
            with torch.no_grad():
                if shard is None:
                    param.copy_(tensor)
                else:
                    param[self._shard_slice(target, shard)].copy_(tensor)
            loaded.add(f"{target}#{shard}")
        self._check_loaded(loaded)

    def _shard_slice(self, target: str, shard: int) -> slice:
        cfg = self.config
        if "qkv_proj" in target:
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)][shard]
        inter = cfg.intermediate_size
        return [slice(0, inter), slice(inter, 2 * inter)][shard]

    def _check_loaded(self, loaded: set[str]) -> None:
        expected: set[str] = set()
        for name, _ in self.named_parameters(remove_duplicate=False):
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if "qkv_proj" in name:
                expected |= {f"{name}#{i}" for i in range(3)}
            elif "gate_up_proj" in name:
                expected |= {f"{name}#{i}" for i in range(2)}
            else:
                expected.add(f"{name}#None")
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. "
                             f"{sorted(missing)[:3]}")
