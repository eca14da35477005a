"""Paged decode attention in Triton: each program reads K/V rows straight from the block pool
through the block table (no gather copy), for all query heads that share one KV head.

Split-K ("flash-decoding"): the context is cut into partitions so that a batch of one still
fills the GPU; every (sequence, KV head, partition) program keeps an online softmax, writes its
partial max / sum / accumulator, and a second kernel merges the partials. The partition size
is chosen per launch shape (:func:`partition_size`): small batches get short partitions (many
programs of one or two iterations: at batch 1 a 512-token partition left an H100 with 16
programs and took 67 us per layer), large batches longer ones. Partitions past a sequence's
context exit at once, so a fixed partition count (as CUDA graphs need) costs little. A ``slot < 0`` in :func:`store_kv` and ``context_len == 0``
in :func:`paged_decode` mark padding rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PARTITION_SIZES = (256, 128, 64)  # tokens per split-K partition, largest first
BLOCK_N = 64  # tokens per inner iteration (every partition size is a multiple)
PROGRAMS_PER_SM = 4  # enough resident programs to keep loads in flight
MAX_PARTS = 64  # partials per head the merge kernel reads at once


@triton.jit
def _decode_partial(q_ptr, kv_ptr, bt_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, scale,
                    stride_qb, stride_qh, stride_kv, stride_blk, stride_tok, stride_kvh,
                    stride_btb, num_parts,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = part * PARTITION
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    head = kvh * GROUP + offs_g
    # Partial results are laid out [B, H, num_parts] (acc adds HEAD_DIM).
    ml_off = (b * (tl.num_programs(1) * GROUP) + head) * num_parts + part
    if start >= ctx:
        tl.store(m_ptr + ml_off, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g_mask)
        tl.store(l_ptr + ml_off, tl.zeros([GROUP_PAD], tl.float32), mask=g_mask)
        return
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(q_ptr.dtype.element_ty)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    end = tl.minimum(start + PARTITION, ctx)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(bt_ptr + b * stride_btb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        row = blk.to(tl.int64) * stride_blk + (offs_n % BLOCK_SIZE) * stride_tok + kvh * stride_kvh
        k = tl.load(kv_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(kv_ptr + stride_kv + row[:, None] + offs_d[None, :], mask=n_mask[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [GROUP_PAD, BLOCK_N], already in log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    tl.store(m_ptr + ml_off, m_i, mask=g_mask)
    tl.store(l_ptr + ml_off, l_i, mask=g_mask)
    tl.store(acc_ptr + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_reduce(m_ptr, l_ptr, acc_ptr, out_ptr, lens_ptr, stride_ob, stride_oh, num_heads,
                   num_parts, PARTS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PARTITION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    ctx = tl.load(lens_ptr + b)
    out = out_ptr + b * stride_ob + h * stride_oh + offs_d
    if ctx == 0:
        tl.store(out, tl.zeros([HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty))
        return
    used = tl.cdiv(ctx, PARTITION)
    offs_p = tl.arange(0, PARTS_PAD)
    p_mask = offs_p < used
    base = (b * num_heads + h) * num_parts
    m = tl.load(m_ptr + base + offs_p, mask=p_mask, other=float("-inf"))
    l_ = tl.load(l_ptr + base + offs_p, mask=p_mask, other=0.0)
    acc = tl.load(acc_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=p_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(p_mask, tl.exp2(m - m_max), 0.0)
    total = tl.sum(l_ * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _store_kv(k_ptr, v_ptr, kv_ptr, slot_ptr, stride_kt, stride_vt, stride_kv, stride_slot,
              ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    dst = kv_ptr + slot.to(tl.int64) * stride_slot + offs
    tl.store(dst, tl.load(k_ptr + t * stride_kt + offs, mask=mask), mask=mask)
    tl.store(dst + stride_kv, tl.load(v_ptr + t * stride_vt + offs, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` ``[T, KVH, D]`` at their slots of ``kv_cache`` ``[2, NB, BS, KVH, D]``;
    rows whose slot is negative (CUDA-graph padding) are skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    k2, v2 = k.reshape(num_tokens, row), v.reshape(num_tokens, row)
    assert kv_cache.stride(2) == row and kv_cache.stride(1) == kv_cache.shape[2] * row
    _store_kv[(num_tokens,)](k2, v2, kv_cache, slot_mapping, k2.stride(0), v2.stride(0),
                             kv_cache.stride(0), row, ROW=row,
                             ROW_PAD=triton.next_power_of_2(row))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def partition_size(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """The largest partition (tokens) that still gives ``PROGRAMS_PER_SM`` programs per SM,
    among those that keep a head's partials to ``MAX_PARTS``."""
    sizes = [s for s in PARTITION_SIZES if num_partitions(max_context, s) <= MAX_PARTS]
    if not sizes:  # very long contexts: the fewest BLOCK_N multiples that fit MAX_PARTS
        return BLOCK_N * -(-max_context // (MAX_PARTS * BLOCK_N))
    for size in sizes:
        if batch * num_kv_heads * num_partitions(max_context, size) >= PROGRAMS_PER_SM * num_sms:
            return size
    return sizes[-1]


def num_partitions(max_context: int, partition: int) -> int:
    """Split-K partitions of ``partition`` tokens for contexts up to ``max_context``."""
    return max(1, -(-max_context // partition))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, max_context: int,
                 out: torch.Tensor | None = None, partition: int | None = None) -> torch.Tensor:
    """Decode attention, ``q`` ``[B, H, D]`` over ``kv_cache`` ``[2, NB, BS, KVH, D]``.

    ``block_tables`` ``[B, W]`` int32/int64 and ``context_lens`` ``[B]`` (0 = padding row) are
    device tensors; ``max_context`` (a Python int, >= every context length) fixes the
    partition count, so one value serves a whole CUDA graph. ``partition`` overrides
    :func:`partition_size` (tests, kernel sweeps).
    """
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = kv_cache.shape
    assert kv_dim == head_dim and num_heads % num_kv_heads == 0
    assert kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = num_heads // num_kv_heads
    if partition is None:
        num_sms = _num_sms(q.device.index or 0) if q.device.type == "cuda" else 1
        partition = partition_size(batch, num_kv_heads, max_context, num_sms)
    assert partition % BLOCK_N == 0, "partitions are whole inner iterations"
    parts = num_partitions(max_context, partition)
    m = torch.empty((batch, num_heads, parts), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty((batch, num_heads, parts, head_dim), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    _decode_partial[(batch, num_kv_heads, parts)](
        q, kv_cache, block_tables, context_lens, m, lse, acc, scale,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), block_tables.stride(0), parts,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, PARTITION=partition, num_warps=4)
    parts_pad = max(2, triton.next_power_of_2(parts))
    _decode_reduce[(batch, num_heads)](
        m, lse, acc, out, context_lens, out.stride(0), out.stride(1), num_heads, parts,
        PARTS_PAD=parts_pad, HEAD_DIM=head_dim, PARTITION=partition,
        num_warps=1 if parts_pad <= 16 else 4)
    return out
