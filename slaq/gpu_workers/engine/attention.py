"""Attention over the paged KV pool, behind a small backend interface.

The model calls ``backend.forward(q, k, v, kv_cache, meta)`` once per layer. A backend first
writes the new keys/values into the pool at ``meta.slot_mapping`` and then attends each query to
everything its sequence has in the cache. :class:`TorchSDPABackend` is the portable path
(gather the blocks of each sequence, then ``scaled_dot_product_attention``; on CPU decodes
read a contiguous copy of the batch's K/V kept across steps, ``meta.decode_kv``).
:class:`CpuPagedBackend` keeps SDPA for prefill chunks and reads decodes' K/V in place from
the pool with a C kernel (``cpu_kernels``); the Triton kernel does the same on CUDA
(``paged_attention``). :func:`get_attention_backend` picks one for the device.

Token layout in a step (built by the model runner): all prefill chunks first, one after the
other, then all decodes (one token each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from slaq.gpu_workers.engine.config import CPU_DECODE_ATTENTION
from slaq.gpu_workers.engine.kv_pool import gather_blocks

if TYPE_CHECKING:
    from slaq.gpu_workers.engine.cpu_kernels import PagedDecodeKernel
    from slaq.gpu_workers.engine.cpu_kernels.prefill import PrefillAttentionKernel
    from slaq.gpu_workers.engine.decode_cache import DecodeKVCache


@dataclass(slots=True)
class PrefillSpan:
    """One prefill chunk: flattened tokens ``[token_start, token_start + num_tokens)``.

    ``context_start`` is the absolute position of its first token; the ``context_start`` tokens
    before it are already in the cache (earlier chunks or prefix-cache hits).
    """

    token_start: int
    num_tokens: int
    context_start: int
    block_table: torch.Tensor  # long [ceil((context_start + num_tokens) / block_size)]

    @property
    def context_len(self) -> int:
        return self.context_start + self.num_tokens


@dataclass(slots=True)
class AttentionMetadata:
    """Where one step's tokens live in the pool and what each may attend to."""

    block_size: int
    slot_mapping: torch.Tensor  # long [num_tokens]: block_table[pos // bs] * bs + pos % bs
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    # Decodes, batched: block tables padded to the longest context, and a key mask.
    decode_block_tables: torch.Tensor | None = None  # long [B, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # long [B]
    # bool [B, 1, 1, max_blocks * block_size]; derived from the lengths when None
    decode_mask: torch.Tensor | None = None
    # CPU: the decode batch's K/V kept contiguous across steps (used instead of the gather)
    decode_kv: DecodeKVCache | None = None
    layer_idx: int = 0  # set by the model before each layer's attention

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_block_tables is None else self.decode_block_tables.shape[0]


class AttentionBackend(Protocol):
    """Paged attention for one layer. Shapes: q ``[T, H, D]``, k/v ``[T, KVH, D]``,
    kv_cache ``[2, num_blocks, block_size, KVH, D]``; returns ``[T, H, D]``.

    ``reads_pool``: decodes read K/V from the pool in place, so the runner keeps no
    contiguous copy for them (``decode_kv``) and builds no key mask."""

    reads_pool: bool

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        ...


def span_kv(kv_cache: torch.Tensor, span: PrefillSpan) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill span's whole context, cached tokens and its own, gathered from its blocks:
    keys and values ``[context_len, KVH, D]`` (a copy; the pool is not read in place)."""
    kv = gather_blocks(kv_cache, span.block_table).flatten(1, 2)[:, :span.context_len]
    return kv[0], kv[1]


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values at their slots (the pool is flat over block * offset)."""
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


class TorchSDPABackend:
    """Gather-then-SDPA attention: correct on every device, reasonably fast on CPU.

    ``expand_kv``: repeat K/V heads up to the query heads instead of asking SDPA for GQA.
    On CUDA the flash and memory-efficient kernels accept only equal head counts, so without
    it grouped-query attention falls back to slower kernels; on CPU the fused kernel
    handles GQA itself and the copy would only cost time.
    """

    reads_pool = False

    def __init__(self, expand_kv: bool = False) -> None:
        self.expand_kv = expand_kv

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              **kw: object) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        if group > 1 and self.expand_kv:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            group = 1
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1, **kw)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        if not meta.prefills:  # decode-only step: no output to assemble
            return self._decode(q, k, v, kv_cache, meta, scale)
        out = torch.empty_like(q)
        for span in meta.prefills:
            sl = slice(span.token_start, span.token_start + span.num_tokens)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], kv_cache, span, meta.block_size, scale)
        if meta.num_decodes:
            n = meta.num_prefill_tokens
            out[n:] = self._decode(q[n:], k[n:], v[n:], kv_cache, meta, scale)
        return out

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 span: PrefillSpan, block_size: int, scale: float) -> torch.Tensor:
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if span.context_start == 0:
            # Nothing cached before this chunk: attend to the fresh keys, no gather needed.
            kh = k.transpose(0, 1).unsqueeze(0)
            vh = v.transpose(0, 1).unsqueeze(0)
            o = self._sdpa(qh, kh, vh, is_causal=True, scale=scale)
            return o.squeeze(0).transpose(0, 1)
        ctx = span.context_len
        kc, vc = span_kv(kv_cache, span)
        # Query i sits at position context_start + i and sees keys 0..context_start + i.
        q_pos = torch.arange(span.context_start, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = self._sdpa(qh, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                       attn_mask=mask, scale=scale)
        return o.squeeze(0).transpose(0, 1)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        if meta.decode_kv is not None:
            kc, vc = meta.decode_kv.layer_kv(meta.layer_idx, kv_cache, meta.decode_block_tables,
                                             k, v, meta.block_size)
            bias = meta.decode_kv.bias
            assert bias is not None
            groups = meta.decode_kv.groups
            if len(groups) == 1:
                return dense_decode_attention(q, kc, vc, bias, scale)
            out = torch.empty_like(q)
            for a, b, n in groups:  # each group reads keys only up to its longest row
                out[a:b] = dense_decode_attention(q[a:b], kc[a:b, :, :n], vc[a:b, :, :n],
                                                  bias[a:b, ..., :n], scale)
            return out
        # One gather for K and V: [2, B, max_blocks, bs, KVH, D] -> [2, B, KVH, S, D]
        kv = gather_blocks(kv_cache, meta.decode_block_tables).flatten(2, 3).transpose(2, 3)
        kc, vc = kv[0], kv[1]
        mask = meta.decode_mask
        if mask is None:
            key_pos = torch.arange(kc.shape[2], device=q.device)
            mask = (key_pos[None, :] < meta.decode_context_lens[:, None])[:, None, None, :]
        o = self._sdpa(q.unsqueeze(2), kc, vc, attn_mask=mask, scale=scale)
        return o.squeeze(2)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row against contiguous K/V: q ``[B, H, D]``, k/v
    ``[B, KVH, S, D]``, bias ``[B, 1, 1, S]`` (0 or -inf); returns ``[B, H, D]``.

    Two batched matmuls with the query heads of a group stacked as the rows of one matrix,
    so each K/V head is read once per step. On CPU this moves K/V at the memory's bandwidth,
    where SDPA's flash kernel (one query row per call, GQA by re-reading) reached about
    two thirds of it at batch 32. Keys past a row's end must hold finite values: their
    weight is exactly 0, and 0 * inf would poison the row.
    """
    b, h, d = q.shape
    kvh = k.shape[1]
    scores = torch.matmul(q.view(b, kvh, h // kvh, d), k.transpose(2, 3))
    scores.mul_(scale).add_(bias)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).view(b, h, d)


class CpuPagedBackend(TorchSDPABackend):
    """fp32 decodes through the C kernel, which reads each sequence's K/V from the pool
    through its block table (no gather, no copy, no mask); prefill chunks through the C
    prefill kernel where given (``prefill_kernel``; after cached tokens, over the gathered
    blocks), else SDPA.

    A step reads each running sequence's K/V once, up to its own length, with nothing to
    maintain between steps; ``bench/cpu_engine_vs_hf.py --with-copy`` measures it against
    the contiguous copy in the same rounds, ``--with-sdpa-prefill`` the prefill kernel
    against SDPA."""

    reads_pool = True

    def __init__(self, kernel: PagedDecodeKernel,
                 prefill_kernel: PrefillAttentionKernel | None = None) -> None:
        super().__init__()
        self.kernel = kernel
        self.prefill_kernel = prefill_kernel
        self._scratch = torch.empty(0)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 span: PrefillSpan, block_size: int, scale: float) -> torch.Tensor:
        if self.prefill_kernel is None:
            return super()._prefill(q, k, v, kv_cache, span, block_size, scale)
        with record_function("slaq::prefill_attention"):
            if span.context_start == 0:  # nothing cached before: the step's own K/V, in place
                return self.prefill_kernel(q, k, v, scale)
            # After cached tokens (a prefix hit, a later chunk): the sequence's K/V, this
            # chunk's included (forward stored them first), gathered from its blocks.
            return self.prefill_kernel(q, *span_kv(kv_cache, span), scale)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # No fallback to the parent's decode: with reads_pool the runner builds neither its
        # K/V copy nor a mask. get_attention_backend takes this backend for fp32 only, and the
        # kernel refuses anything else (a non-contiguous pool included) with a ValueError.
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        assert tables is not None and lens is not None
        need = self.kernel.scratch_numel(q.shape[0], q.shape[1], tables.shape[1] * meta.block_size,
                                         q.shape[2])
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        # Named for torch.profiler: the ctypes call is invisible to it otherwise.
        with record_function("slaq::paged_decode_attention"):
            return self.kernel(q, kv_cache, tables, lens, scale, self._scratch)


def get_attention_backend(device: torch.device, cpu_decode: str = "auto",
                          num_heads: int = 1, num_kv_heads: int = 1, head_dim: int = 64,
                          dtype: torch.dtype = torch.float32,
                          cpu_prefill: bool = True) -> AttentionBackend:
    """The attention backend for a device: the paged Triton kernel on CUDA when triton is
    importable (it reads K/V from the pool without gather copies), else gather + SDPA.

    On CPU, ``cpu_decode`` picks the decode path for fp32: ``"paged"`` the C kernel
    (RuntimeError where it cannot be built, or for another dtype or a head layout it does
    not take), ``"copy"`` batched matmuls over a contiguous copy kept by the runner,
    ``"auto"`` the kernel where it applies, else the copy. With the paged kernel,
    ``cpu_prefill`` also sends prefill chunks through the C prefill kernel where it builds
    and takes the head layout."""
    if cpu_decode not in CPU_DECODE_ATTENTION:
        raise ValueError(f"cpu_decode must be one of {CPU_DECODE_ATTENTION}, got {cpu_decode!r}")
    if device.type == "cuda":
        from slaq.gpu_workers.engine.paged_attention import TritonPagedBackend, triton_available

        if triton_available(device):
            return TritonPagedBackend()
    elif device.type == "cpu" and cpu_decode != "copy":
        from slaq.gpu_workers.engine.cpu_kernels import PagedDecodeKernel, load_paged_decode

        why = ("it takes fp32 only" if dtype != torch.float32
               else "it does not take this head layout"
               if not PagedDecodeKernel.supports(num_heads, num_kv_heads, head_dim)
               else None)
        kernel = load_paged_decode() if why is None else None
        if kernel is not None:
            return CpuPagedBackend(kernel, _prefill_kernel(num_heads, num_kv_heads, head_dim)
                                   if cpu_prefill else None)
        if cpu_decode == "paged":
            raise RuntimeError("the CPU paged decode kernel cannot run here: "
                               + (why or "it could not be built (see the log)"))
    return TorchSDPABackend(expand_kv=device.type == "cuda")


def _prefill_kernel(num_heads: int, num_kv_heads: int,
                    head_dim: int) -> PrefillAttentionKernel | None:
    from slaq.gpu_workers.engine.cpu_kernels.prefill import (
        PrefillAttentionKernel,
        load_prefill_attention,
    )

    if not PrefillAttentionKernel.supports(num_heads, num_kv_heads, head_dim):
        return None
    return load_prefill_attention()
