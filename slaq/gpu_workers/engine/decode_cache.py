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

import torch

# Extra tokens of capacity when the buffer is (re)allocated: about that many decode steps
# before the next reallocation.
GROWTH_TOKENS = 256
ALIGN_TOKENS = 64


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
        self.num_rows = 0
        self.max_len = 0
        self.append_index: torch.Tensor | None = None  # long [B * KVH] into the flat rows
        self.mask: torch.Tensor | None = None  # bool [B, 1, 1, max_len]
        self.num_rebuilds = 0

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
            cap = -(-(longest + GROWTH_TOKENS) // ALIGN_TOKENS) * ALIGN_TOKENS
            rows = max(n, 0 if buf is None else buf.shape[2])
            shape = (self.num_layers, 2, rows, self.num_kv_heads, cap, self.head_dim)
            self.buf = None  # drop the old one before allocating its successor
            if _numel(shape) * self._elem > self.max_bytes:
                self.invalidate()
                return False
            # Zeroed: masked-off keys still enter the kernel's arithmetic, and 0 * NaN from
            # uninitialised memory would poison a row; everything written later is finite.
            self.buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
            continuing = False
        assert self.buf is not None
        self.rebuild = not continuing
        self.num_rebuilds += self.rebuild
        self._seqs, self._lens = list(seqs), list(context_lens)
        self.num_rows, self.max_len = n, longest
        cap, kvh, dev = self.buf.shape[4], self.num_kv_heads, self.device
        lens = torch.tensor(context_lens, device=dev)
        # Row r = b * KVH + h of the flattened [rows * KVH, capacity] view.
        rows = torch.arange(n * kvh, device=dev).view(n, kvh)
        self.append_index = (rows * cap + (lens - 1)[:, None]).flatten()
        key_pos = torch.arange(longest, device=dev)
        self.mask = (key_pos[None, :] < lens[:, None])[:, None, None, :]
        return True

    def layer_kv(self, layer: int, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, block_size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, KVH, max_len, D]`` of ``layer`` including this step's token, whose
        ``k``/``v`` (``[B, KVH, D]``) are already in ``kv_cache`` (the layer's pool)."""
        assert self.buf is not None and self.append_index is not None
        n, dense = self.num_rows, self.buf[layer]
        if self.rebuild:
            width = block_tables.shape[1] * block_size
            gathered = kv_cache[:, block_tables].flatten(2, 3).transpose(2, 3)
            dense[:, :n, :, :width].copy_(gathered)
        else:
            cap, d = dense.shape[3], self.head_dim
            flat = dense.view(2, -1, d)  # [2, rows * KVH * capacity, D]
            flat[0].index_copy_(0, self.append_index, k.reshape(-1, d))
            flat[1].index_copy_(0, self.append_index, v.reshape(-1, d))
            assert flat.shape[1] == dense.shape[1] * self.num_kv_heads * cap
        return dense[0, :n, :, :self.max_len], dense[1, :n, :, :self.max_len]


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for s in shape:
        total *= s
    return total
