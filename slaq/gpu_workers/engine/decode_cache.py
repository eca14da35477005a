"""Contiguous K/V of the running decode batch, extended in place one token per step (CPU).

The portable decode path gathers every sequence's blocks out of the paged pool on every step
and every layer: at batch 32 and a few hundred tokens of context that copy moves more bytes
than the model's weights. On CPU the batch of a decode phase rarely changes from one step to
the next, so :class:`DecodeKVCache` keeps the gathered K/V of the last decode step
(``[layers, 2, batch, kv_heads, capacity, head_dim]``) and, while the same sequences continue
with one more token each, only writes the new token's K/V into it. Any other change (a
sequence joins, leaves, is re-prefilled, its KV is overwritten by a transfer, or the context
outgrows the buffer) triggers one gather from the pool, which stays the source of truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from slaq.gpu_workers.engine.kv_pool import gather_blocks

# Extra tokens of capacity when the buffer is (re)allocated: about that many decode steps
# before the next reallocation.
GROWTH_TOKENS = 256
ALIGN_TOKENS = 64
MIN_ROWS = 8

T = TypeVar("T")


class DecodeKVCache:
    """The decode batch's K/V for one model, within a byte budget (``max_bytes``)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_bytes = dtype, device, max_bytes
        self._elem = torch.empty((), dtype=dtype).element_size()
        self.buf: torch.Tensor | None = None  # [L, 2, rows, KVH, capacity, D]
        self._seqs: list[object] = []  # the last decode step's sequences, in batch order
        self._lens: list[int] = []  # and their context lengths then
        self.num_kept = 0  # rows [0, num_kept) are appended to; the rest are gathered
        self._written = 0  # columns [0, _written) of rows [0, num_rows) hold finite values
        self.num_rows = 0
        self.max_len = 0
        self.append_index: torch.Tensor | None = None  # long [B * KVH] into the flat rows
        # float [B, 1, 1, max_len]: 0 where a key is in the row's context, -inf past its end
        self.bias: torch.Tensor | None = None
        self.num_rebuilds = 0  # steps that gathered every row
        self.num_extends = 0  # steps that appended to some rows and gathered newcomers
        # (first row, end row, keys to read): rows sorted longest first, cut where reading a
        # group only up to its own longest row saves more than a group's fixed cost
        self.groups: list[tuple[int, int, int]] = []

    def invalidate(self) -> None:
        """Forget the batch: the next decode step gathers from the pool."""
        self._seqs, self._lens = [], []

    def touches(self, seq: object) -> bool:
        return any(s is seq for s in self._seqs)

    def arrange(self, items: list[T], seq: Callable[[T], object],
                context_len: Callable[[T], int], order: Callable[[T], Any]) -> list[T]:
        """The batch order for the next decode step of ``items``.

        When every row this copy holds continues (one token longer), those rows keep their
        places and the newcomers follow, ordered by ``order``: the step appends to the kept
        rows and gathers only the new ones. Otherwise all rows are ordered by ``order`` (the
        step rebuilds)."""
        by_seq = {id(seq(it)): it for it in items}
        kept = [by_seq.get(id(s)) for s in self._seqs]
        if not kept or any(it is None or context_len(it) != n + 1
                           for it, n in zip(kept, self._lens, strict=True)):
            return sorted(items, key=order)
        held = {id(s) for s in self._seqs}
        return [*kept, *sorted((it for it in items if id(seq(it)) not in held), key=order)]

    def plan(self, seqs: Sequence[object], context_lens: Sequence[int]) -> bool:
        """Get ready for a decode step of ``seqs`` (in batch order) at ``context_lens``.

        Rows that continue the last step at the same place are appended to; the others are
        gathered from the pool (all of them after a membership change other than newcomers
        at the end, see :meth:`arrange`). Returns False, and forgets the batch, when it does
        not fit the byte budget (the caller then uses the pool-gathering path)."""
        n, longest = len(seqs), max(context_lens)
        num_kept = len(self._seqs)
        if not (num_kept <= n
                and all(a is b for a, b in zip(seqs, self._seqs, strict=False))
                and all(c == p + 1 for c, p in zip(context_lens, self._lens, strict=False))):
            num_kept = 0
        buf = self.buf
        if buf is None or buf.shape[2] < n or buf.shape[4] < longest:
            shape = self._new_shape(n, longest)
            self.buf = None  # drop the old one before allocating its successor
            if shape is None:
                self.invalidate()
                return False
            # Not zeroed: a fresh gigabyte costs its page faults where it is touched, and
            # only the columns a step reads are (see _clear_columns).
            self.buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            num_kept = 0
        assert self.buf is not None
        if num_kept:
            self._clear_columns(num_kept, longest)
        self.num_kept = num_kept
        self.num_rebuilds += num_kept == 0
        self.num_extends += 0 < num_kept < n
        self._seqs, self._lens = list(seqs), list(context_lens)
        self.num_rows, self.max_len = n, longest
        cap, kvh, dev = self.buf.shape[4], self.num_kv_heads, self.device
        lens = torch.tensor(context_lens[:num_kept], device=dev)
        # Row r = b * KVH + h of the flattened [rows * KVH, capacity] view.
        rows = torch.arange(num_kept * kvh, device=dev).view(num_kept, kvh)
        self.append_index = (rows * cap + (lens - 1)[:, None]).flatten()
        if num_kept == n:  # every row grew by one: same cuts, each group one key longer
            self.groups = [(a, b, m + 1) for a, b, m in self.groups]
        else:
            self.groups = length_groups(context_lens)
        key_pos = torch.arange(longest, device=dev)
        past_end = (key_pos[None, :] >= torch.tensor(context_lens, device=dev)[:, None])
        self.bias = torch.zeros(past_end.shape, dtype=self.dtype, device=dev).masked_fill_(
            past_end, float("-inf"))[:, None, None, :]
        return True

    def _clear_columns(self, num_kept: int, longest: int) -> None:
        """Zero the columns the kept rows' read window grows into, unless a gather wrote them.

        Masked-off keys still enter the arithmetic (with weight 0), and 0 * NaN from
        uninitialised memory would poison a row. Every column below ``max_len`` of every row
        is therefore either gathered from the pool (``_written`` columns of the kept rows,
        the whole padded table of a gathered row) or zeroed here when it entered the window;
        a row reaching that column later overwrites it."""
        if longest > self._written:
            assert self.buf is not None
            self.buf[:, :, :num_kept, :, self._written:longest].zero_()
            self._written = longest

    def _new_shape(self, n: int, longest: int) -> tuple[int, ...] | None:
        """The buffer for ``n`` rows up to ``longest`` tokens, with headroom in both where the
        byte budget allows (rows first dropped to exactly ``n``); None when nothing fits."""
        cap = -(-(longest + GROWTH_TOKENS) // ALIGN_TOKENS) * ALIGN_TOKENS
        old_rows = 0 if self.buf is None else self.buf.shape[2]
        for rows in (max(_row_capacity(n), old_rows), n):
            shape = (self.num_layers, 2, rows, self.num_kv_heads, cap, self.head_dim)
            if _numel(shape) * self._elem <= self.max_bytes:
                return shape
        return None

    def layer_kv(self, layer: int, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, block_size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, KVH, max_len, D]`` of ``layer`` including this step's token, whose
        ``k``/``v`` (``[B, KVH, D]``) are already in ``kv_cache`` (the layer's pool)."""
        assert self.buf is not None and self.append_index is not None
        n, kept, dense = self.num_rows, self.num_kept, self.buf[layer]
        if kept:
            cap, d = dense.shape[3], self.head_dim
            flat = dense.view(2, -1, d)  # [2, rows * KVH * capacity, D]
            flat[0].index_copy_(0, self.append_index, k[:kept].reshape(-1, d))
            flat[1].index_copy_(0, self.append_index, v[:kept].reshape(-1, d))
            assert flat.shape[1] == dense.shape[1] * self.num_kv_heads * cap
        if kept < n:
            tables = block_tables[kept:]
            width = tables.shape[1] * block_size
            gathered = gather_blocks(kv_cache, tables).view(
                2, n - kept, width, self.num_kv_heads, self.head_dim).transpose(2, 3)
            width = min(width, dense.shape[3])  # a last block may reach past the capacity
            dense[:, kept:n, :, :width].copy_(gathered[..., :width, :])
            # Kept rows hold at least max_len columns (_clear_columns ran in plan).
            self._written = width if kept == 0 else min(self._written, width)
        return dense[0, :n, :, :self.max_len], dense[1, :n, :, :self.max_len]


# What one more attention group costs, in padded keys read per row: ~5 extra ops of ~15 us
# each against ~0.1 us per key (1.5 KB of K/V per layer at ~15 GB/s), measured on CPU.
GROUP_COST_KEYS = 750


def length_groups(context_lens: Sequence[int]) -> list[tuple[int, int, int]]:
    """Cut rows, in their order, into contiguous groups ``(start, end, longest)`` that
    minimise keys read (each row reads up to its group's longest) plus ``GROUP_COST_KEYS``
    per group. Rows sorted longest first cut best; newcomers appended after kept rows
    (:meth:`DecodeKVCache.arrange`) usually form groups of their own."""
    n = len(context_lens)
    best = [0] * (n + 1)  # best[j]: cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest, best[j], cut[j] = 0, -1, 0
        for i in range(j - 1, -1, -1):  # group [i, j), growing to the left
            longest = max(longest, context_lens[i])
            cost = best[i] + (j - i) * longest + GROUP_COST_KEYS
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        i = cut[j]
        groups.append((i, j, max(context_lens[i:j])))
        j = i
    return groups[::-1]


def _row_capacity(n: int) -> int:
    """Rows to allocate for ``n``: a power of two (at least ``MIN_ROWS``), so a batch that
    fills up one sequence at a time reallocates a handful of times, not once per join."""
    rows = MIN_ROWS
    while rows < n:
        rows *= 2
    return rows


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for s in shape:
        total *= s
    return total
