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

from collections.abc import Sequence
from itertools import pairwise

import torch

from slaq.gpu_workers.engine.kv_pool import gather_blocks

# Extra tokens of capacity when the buffer is (re)allocated: about that many decode steps
# before the next reallocation.
GROWTH_TOKENS = 256
ALIGN_TOKENS = 64
MIN_ROWS = 8


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
        self.rebuild = True  # this step gathers from the pool instead of appending
        self._written = 0  # columns [0, _written) of rows [0, num_rows) hold finite values
        self.num_rows = 0
        self.max_len = 0
        self.append_index: torch.Tensor | None = None  # long [B * KVH] into the flat rows
        # float [B, 1, 1, max_len]: 0 where a key is in the row's context, -inf past its end
        self.bias: torch.Tensor | None = None
        self.num_rebuilds = 0
        # (first row, end row, keys to read): rows sorted longest first, cut where reading a
        # group only up to its own longest row saves more than a group's fixed cost
        self.groups: list[tuple[int, int, int]] = []

    def invalidate(self) -> None:
        """Forget the batch: the next decode step gathers from the pool."""
        self._seqs, self._lens = [], []

    def touches(self, seq: object) -> bool:
        return any(s is seq for s in self._seqs)

    def plan(self, seqs: Sequence[object], context_lens: Sequence[int]) -> bool:
        """Get ready for a decode step of ``seqs`` (in batch order) at ``context_lens``.

        Returns False, and forgets the batch, when it does not fit the byte budget (the
        caller then uses the pool-gathering path)."""
        n, longest = len(seqs), max(context_lens)
        continuing = (len(self._seqs) == n and all(a is b for a, b in zip(seqs, self._seqs, strict=True))
                      and all(c == p + 1 for c, p in zip(context_lens, self._lens, strict=True)))
        buf = self.buf
        if buf is None or buf.shape[2] < n or buf.shape[4] < longest:
            shape = self._new_shape(n, longest)
            self.buf = None  # drop the old one before allocating its successor
            if shape is None:
                self.invalidate()
                return False
            # Not zeroed: a fresh gigabyte costs its page faults where it is touched, and
            # only the columns a step reads are (see _clear_new_column).
            self.buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            continuing = False
        assert self.buf is not None
        if continuing:
            self._clear_new_column(n, longest)
        self.rebuild = not continuing
        self.num_rebuilds += self.rebuild
        self._seqs, self._lens = list(seqs), list(context_lens)
        self.num_rows, self.max_len = n, longest
        cap, kvh, dev = self.buf.shape[4], self.num_kv_heads, self.device
        lens = torch.tensor(context_lens, device=dev)
        # Row r = b * KVH + h of the flattened [rows * KVH, capacity] view.
        rows = torch.arange(n * kvh, device=dev).view(n, kvh)
        self.append_index = (rows * cap + (lens - 1)[:, None]).flatten()
        if not continuing or len(self.groups) != 1 or n == 1:
            self.groups = length_groups(context_lens)
        else:  # every row grew by one: same boundaries, each group one key longer
            self.groups = [(a, b, m + 1) for a, b, m in self.groups]
        key_pos = torch.arange(longest, device=dev)
        past_end = (key_pos[None, :] >= lens[:, None])[:, None, None, :]
        self.bias = torch.zeros(past_end.shape, dtype=self.dtype, device=dev).masked_fill_(
            past_end, float("-inf"))
        return True

    def _clear_new_column(self, n: int, longest: int) -> None:
        """Zero the column the read window grows into, unless a rebuild already wrote it.

        Masked-off keys still enter the arithmetic (with weight 0), and 0 * NaN from
        uninitialised memory would poison a row. Every column below ``max_len`` is therefore
        either gathered from the pool at the last rebuild (``_written`` columns) or zeroed here
        when it entered the window; a row reaching that column later overwrites it."""
        column = longest - 1
        if column >= self._written:
            assert self.buf is not None and column == self._written
            self.buf[:, :, :n, :, column].zero_()
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
        n, dense = self.num_rows, self.buf[layer]
        if self.rebuild:
            b, width = block_tables.shape[0], block_tables.shape[1] * block_size
            gathered = gather_blocks(kv_cache, block_tables).view(
                2, b, width, self.num_kv_heads, self.head_dim).transpose(2, 3)
            dense[:, :n, :, :width].copy_(gathered)
            self._written = width
        else:
            cap, d = dense.shape[3], self.head_dim
            flat = dense.view(2, -1, d)  # [2, rows * KVH * capacity, D]
            flat[0].index_copy_(0, self.append_index, k.reshape(-1, d))
            flat[1].index_copy_(0, self.append_index, v.reshape(-1, d))
            assert flat.shape[1] == dense.shape[1] * self.num_kv_heads * cap
        return dense[0, :n, :, :self.max_len], dense[1, :n, :, :self.max_len]


# What one more attention group costs, in padded keys read per row: ~5 extra ops of ~15 us
# each against ~0.1 us per key (1.5 KB of K/V per layer at ~15 GB/s), measured on CPU.
GROUP_COST_KEYS = 750


def length_groups(context_lens: Sequence[int]) -> list[tuple[int, int, int]]:
    """Cut rows into contiguous groups ``(start, end, longest)`` that minimise keys read
    (each row reads its group's longest) plus ``GROUP_COST_KEYS`` per group. Rows that are
    not sorted longest first make one group (the cut would not be contiguous)."""
    n = len(context_lens)
    if n < 2 or any(a < b for a, b in pairwise(context_lens)):
        return [(0, n, max(context_lens, default=0))]
    best = [0] * (n + 1)  # best[j]: cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + (j - i) * context_lens[i] + GROUP_COST_KEYS, i)
                              for i in range(j))
    groups, j = [], n
    while j:
        i = cut[j]
        groups.append((i, j, context_lens[i]))
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
