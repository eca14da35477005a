"""Causal prefill attention in C for CPU fp32 chunks (see ``prefill_attention.c`` for why it
beats torch's SDPA there); compiled on first use like the package's other kernels."""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from slaq.gpu_workers.engine.cpu_kernels import compile_shared

log = logging.getLogger(__name__)

PREFILL_SOURCE = Path(__file__).with_name("prefill_attention.c")
# The C source's fixed bounds (MAX_GROUP, MAX_DIM).
MAX_GROUP = 8
MAX_DIM = 128


class PrefillAttentionKernel:
    """``kernel(q, k, v, scale)``: causal attention of a chunk of ``n_q`` tokens to its
    sequence's ``n_k >= n_q`` keys, its own being the last ``n_q`` (so ``n_k == n_q`` for a
    chunk with nothing cached before it); q ``[n_q, H, D]``, k/v ``[n_k, KVH, D]`` (fp32,
    CPU; each token's heads contiguous, tokens may be strided, as views into a fused QKV
    projection are); returns ``[n_q, H, D]``."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn = lib.prefill_attention
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64,
                             i64, ctypes.c_float]
        self._scratch_numel = lib.prefill_attention_scratch_numel
        self._scratch_numel.restype = i64
        self._scratch_numel.argtypes = [i64, i64, i64]

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether the kernel takes this head layout (its fixed-size per-item buffers)."""
        return (num_kv_heads > 0 and num_heads % num_kv_heads == 0
                and num_heads // num_kv_heads <= MAX_GROUP and 0 < head_dim <= MAX_DIM)

    @staticmethod
    def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
        # Raised, not asserted: the C side trusts these layouts with raw pointers.
        if not x.is_cpu or x.dtype != torch.float32:
            raise ValueError(f"the prefill attention kernel takes fp32 CPU tensors ({what})")
        if x.dim() != 3:
            raise ValueError(f"{what} must be [tokens, heads, head_dim], got {tuple(x.shape)}")
        if x.stride(2) != 1 or x.stride(1) != x.shape[2] or x.stride(0) < x.shape[1] * x.shape[2]:
            x = x.contiguous()
        return x

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        q, k, v = self._rows(q, "q"), self._rows(k, "k"), self._rows(v, "v")
        n, num_heads, head_dim = q.shape
        if k.shape != v.shape or k.shape[0] < n or k.shape[2] != head_dim:
            raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        num_kv_heads = k.shape[1]
        if not self.supports(num_heads, num_kv_heads, head_dim):
            raise ValueError(f"the prefill attention kernel does not take {num_heads} query "
                             f"heads, {num_kv_heads} K/V heads of size {head_dim}")
        out = torch.empty(n, num_heads, head_dim, dtype=torch.float32)
        if n == 0:
            return out
        # Per call, not kept: one loaded kernel serves every engine and thread of the process.
        scratch = torch.empty(self._scratch_numel(k.shape[0], num_kv_heads, head_dim),
                              dtype=torch.float32)
        rc = self._fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                      v.stride(0), out.data_ptr(), out.stride(0), scratch.data_ptr(), n,
                      k.shape[0], num_heads, num_kv_heads, head_dim, scale)
        if rc == -2:
            raise MemoryError("prefill attention: no memory for a work buffer")
        if rc != 0:
            raise ValueError("prefill attention: head layout not supported")
        return out


@functools.cache
def load_prefill_attention() -> PrefillAttentionKernel | None:
    """The compiled kernel, or None (logged once) where it cannot be built here."""
    try:
        return PrefillAttentionKernel(ctypes.CDLL(str(compile_shared(PREFILL_SOURCE))))
    except (OSError, RuntimeError, AttributeError) as exc:
        log.warning("CPU prefill attention kernel unavailable, prefill stays on SDPA: %s", exc)
        return None
