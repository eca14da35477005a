"""Paged attention for the GPU: a Triton decode kernel that reads K/V from the block pool
through the block tables (no gather copy), and the plain-torch CPU reference it is tested
against.

:class:`TritonPagedBackend` implements the engine's
:class:`~slaq.gpu_workers.engine.attention.AttentionBackend`: KV writes and decodes run in
Triton; prefill chunks keep the portable SDPA path (FlashAttention underneath on CUDA).
"""

from __future__ import annotations

import torch

from slaq.gpu_workers.engine.attention import AttentionMetadata, TorchSDPABackend
from slaq.gpu_workers.engine.paged_attention.reference import paged_decode_reference

__all__ = ["TritonPagedBackend", "paged_decode_reference", "triton_available"]


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run for ``device`` (CUDA and an importable triton)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class TritonPagedBackend:
    """Triton KV store + split-K paged decode; SDPA for prefill chunks.

    ``max_context`` pins the decode partition count (CUDA graphs replay one launch
    configuration); by default it follows the width of each step's block tables. Prefill
    chunks go through the portable backend (K/V heads expanded, so that CUDA's flash kernel
    takes them).
    """

    reads_pool = True

    def __init__(self, max_context: int | None = None) -> None:
        self.max_context = max_context
        self._portable = TorchSDPABackend(expand_kv=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from slaq.gpu_workers.engine.paged_attention.triton_decode import paged_decode, store_kv

        store_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for span in meta.prefills:
            sl = slice(span.token_start, span.token_start + span.num_tokens)
            out[sl] = self._portable._prefill(q[sl], k[sl], v[sl], kv_cache, span,
                                              meta.block_size, scale)
        if meta.num_decodes:
            tables = meta.decode_block_tables
            assert tables is not None and meta.decode_context_lens is not None
            max_context = self.max_context or tables.shape[1] * meta.block_size
            paged_decode(q[meta.num_prefill_tokens:], kv_cache, tables,
                         meta.decode_context_lens, scale, max_context,
                         out=out[meta.num_prefill_tokens:])
        return out
