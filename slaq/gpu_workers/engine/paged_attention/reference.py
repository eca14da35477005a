"""The CPU reference for paged decode attention: plain torch, one sequence at a time.

It gathers each sequence's blocks (a copy the GPU kernel avoids) and is the ground truth the
Triton kernel is tested against.
"""

from __future__ import annotations

import torch


def paged_decode_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    ``q`` ``[B, H, D]``; ``kv_cache`` ``[2, num_blocks, block_size, KVH, D]``;
    ``block_tables`` ``[B, max_blocks]`` (entries past a context are ignored);
    ``context_lens`` ``[B]`` (0 gives a zero row). Returns ``[B, H, D]`` in ``q``'s dtype,
    computed in fp32.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:n].float()  # [n, KVH, D]
        v = kv_cache[1, blocks].flatten(0, 1)[:n].float()
        k = k.repeat_interleave(group, dim=1)  # [n, H, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        probs = scores.softmax(dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out
