"""Contiguous K/V of the running decode batch, extended in place one token per step (CPU).

The portable decode path gathers every sequence's blocks out of the paged pool on every step
and every layer: at batch 32 and a few hundred tokens of context that copy moves more bytes
than the model's weights. On CPU the batch of a decode phase rarely changes from one step to
the next, so :class:`DecodeKVCache` keeps the gathered K/V of the last decode step
(``[layers, 2, batch, kv_heads, capacity, head_dim]``) and, while the same sequences continue
with one more token each, only writes the new token's K/V into it. A sequence that joins is
gathered alone, one that leaves has its row taken by the last row (:meth:`DecodeKVCache.
arrange`); anything else (a sequence re-prefilled, KV overwritten by a transfer, a context
outgrowing the buffer) gathers every row from the pool, which stays the source of truth.
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
        self.num_moved_rows = 0  # kept rows copied into the places of rows that left
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

        Rows this copy holds that continue (one token longer) stay where they are, except
        that the last ones move into the places of rows that left; newcomers follow, ordered
        by ``order``. The step then appends to the kept rows, copies the few that moved, and
        gathers only the newcomers. When that order would read 25% more keys than sorting
        everything by ``order`` (see :func:`length_groups`), everything is sorted instead
        (the step rebuilds)."""
        by_seq = {id(seq(it)): it for it in items}
        place: list[T | None] = [None] * len(self._seqs)
        for i, (s, n) in enumerate(zip(self._seqs, self._lens, strict=True)):
            it = by_seq.get(id(s))
            if it is not None and context_len(it) == n + 1:
                place[i] = it
        num_kept = sum(it is not None for it in place)
        if num_kept == len(place) == len(items):
            return place  # type: ignore[return-value]  # the same batch: nothing to decide
        ranked = sorted(items, key=order)
        if not num_kept:
            return ranked
        holes = (i for i in range(num_kept) if place[i] is None)
        for i in range(num_kept, len(place)):  # the last kept rows fill the holes
            if place[i] is not None:
                place[next(holes)], place[i] = place[i], None
        kept = {id(seq(it)) for it in place if it is not None}
        arranged = [*place[:num_kept], *(it for it in ranked if id(seq(it)) not in kept)]
        if (_keys_read([context_len(it) for it in arranged])
                > 1.25 * _keys_read([context_len(it) for it in ranked])):
            return ranked
        return arranged  # type: ignore[return-value]

    def plan(self, seqs: Sequence[object], context_lens: Sequence[int]) -> bool:
        """Get ready for a decode step of ``seqs`` (in batch order) at ``context_lens``.

        The longest prefix of rows that this copy holds, one token longer, is kept: rows
        that moved (see :meth:`arrange`) are copied to their new places and all are appended
        to; the rest are gathered from the pool. Returns False, and forgets the batch, when
        it does not fit the byte budget (the caller then uses the pool-gathering path)."""
        n, longest = len(seqs), max(context_lens)
        moves = self._kept_rows(seqs, context_lens)
        num_kept = len(moves)
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
            self._move_rows([(src, dst) for dst, src in enumerate(moves) if src != dst])
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
        if num_kept == n and all(src == dst for dst, src in enumerate(moves)):
            # every row grew by one in place: same cuts, each group one key longer
            self.groups = [(a, b, m + 1) for a, b, m in self.groups]
        else:
            self.groups = length_groups(context_lens)
        key_pos = torch.arange(longest, device=dev)
        past_end = (key_pos[None, :] >= torch.tensor(context_lens, device=dev)[:, None])
        self.bias = torch.zeros(past_end.shape, dtype=self.dtype, device=dev).masked_fill_(
            past_end, float("-inf"))[:, None, None, :]
        return True

    def _kept_rows(self, seqs: Sequence[object], context_lens: Sequence[int]) -> list[int]:
        """For the longest prefix of ``seqs`` held here one token shorter: each one's row now.
        Empty when the first row is not such a sequence."""
        row_of = {id(s): i for i, s in enumerate(self._seqs)}
        moves: list[int] = []
        for s, n in zip(seqs, context_lens, strict=True):
            row = row_of.get(id(s))
            if row is None or self._lens[row] + 1 != n:
                break
            moves.append(row)
        return moves

    def _move_rows(self, moves: list[tuple[int, int]]) -> None:
        """Copy rows ``src -> dst`` (every layer, the ``_written`` columns all rows hold).
        The sources are read into a copy before any destination is written, so the moves may
        form any permutation."""
        if not moves:
            return
        assert self.buf is not None
        src = torch.tensor([m[0] for m in moves], device=self.device)
        dst = torch.tensor([m[1] for m in moves], device=self.device)
        w = self._written
        self.buf[:, :, :, :, :w].index_copy_(2, dst, self.buf[:, :, :, :, :w].index_select(2, src))
        self.num_moved_rows += len(moves)

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


def _keys_read(context_lens: Sequence[int]) -> int:
    return sum((end - start) * longest for start, end, longest in length_groups(context_lens))


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
