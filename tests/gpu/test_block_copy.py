"""The Triton block-copy kernel against ``index_select`` / ``index_copy_``.

Runs on CUDA; on a CPU-only machine it runs under Triton's interpreter when the session was
started with ``TRITON_INTERPRET=1``, and is skipped otherwise. The kernel copies bits as
integers, so bf16 is checked in the interpreter too.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

ON_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                       reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]
DEVICE = "cuda" if ON_CUDA else "cpu"

# (block_size, kv_heads, head_dim): a power-of-two chunk, an odd one, a single element.
CHUNKS = [(4, 2, 8), (3, 5, 3), (1, 1, 1)]
IDS = [[7], [5, 0, 11, 6], [3, 3, 1, 3, 11], list(range(12))]


def _pool(chunk: tuple[int, ...], dtype: torch.dtype, num_blocks: int = 12,
          seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, num_blocks, *chunk, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("ids", IDS)
def test_gather_matches_index_select(dtype, chunk, ids):
    from slaq.gpu_workers.kv_transfer.block_copy import gather_blocks_kernel

    pool = _pool(chunk, dtype)
    expected = pool.index_select(2, torch.tensor(ids, device=DEVICE))
    assert torch.equal(gather_blocks_kernel(pool, ids), expected)


@pytest.mark.parametrize(("first", "n"), [(0, 1), (3, 9), (11, 1), (0, 12)])
def test_gather_run_matches_slicing(first, n):
    from slaq.gpu_workers.kv_transfer.block_copy import gather_run_kernel

    pool = _pool((3, 5, 3), torch.bfloat16)
    assert torch.equal(gather_run_kernel(pool, first, n), pool[:, :, first:first + n])


@pytest.mark.parametrize("tile_bytes", [32, 48, 64])
def test_chunks_split_over_several_uneven_tiles(tile_bytes):
    from slaq.gpu_workers.kv_transfer.block_copy import gather_blocks_kernel

    pool = _pool((3, 5, 3), torch.float16)  # 45 elements: tiles of 16 or 32 leave a tail
    ids = torch.tensor([9, 2, 2, 0], device=DEVICE, dtype=torch.int32)
    got = gather_blocks_kernel(pool, ids, tile_bytes=tile_bytes, num_warps=1)
    assert torch.equal(got, pool.index_select(2, ids.long()))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_scatter_writes_only_the_given_blocks(chunk):
    from slaq.gpu_workers.kv_transfer.block_copy import scatter_blocks_kernel

    kv = _pool(chunk, torch.bfloat16, num_blocks=3, seed=1)
    pool = _pool(chunk, torch.bfloat16, num_blocks=10, seed=2)
    expected = pool.clone()
    dst = [8, 0, 4]
    expected.index_copy_(2, torch.tensor(dst, device=DEVICE), kv)
    scatter_blocks_kernel(kv, pool, dst)
    assert torch.equal(pool, expected)


def test_pool_to_pool_copies_src_ids_to_dst_ids():
    from slaq.gpu_workers.kv_transfer.block_copy import scatter_blocks_kernel

    src = _pool((4, 2, 8), torch.float32, num_blocks=12, seed=3)
    dst = _pool((4, 2, 8), torch.float32, num_blocks=6, seed=4)
    expected = dst.clone()
    src_ids, dst_ids = [11, 2, 2, 7], [5, 0, 3, 1]
    expected[:, :, dst_ids] = src[:, :, src_ids]
    scatter_blocks_kernel(src, dst, dst_ids, src_ids=src_ids)
    assert torch.equal(dst, expected)


def test_pools_that_differ_are_refused():
    from slaq.gpu_workers.kv_transfer.block_copy import copy_chunks

    src = _pool((4, 2, 8), torch.float32)
    ids = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError):
        copy_chunks(src, _pool((4, 2, 8), torch.float16), ids, None)
    with pytest.raises(ValueError):
        copy_chunks(src, _pool((4, 2, 4), torch.float32), ids, None)
    with pytest.raises(ValueError):
        copy_chunks(src, src.clone(), ids, ids[:1])
    with pytest.raises(ValueError):  # not a contiguous pool
        copy_chunks(src.transpose(3, 4), src.transpose(3, 4).contiguous(), ids, None)


@pytest.mark.skipif(not ON_CUDA, reason="a 2 GiB pool: CUDA only")
def test_offsets_past_2_to_the_31_elements():
    from slaq.gpu_workers.kv_transfer.block_copy import gather_blocks_kernel

    chunk = 16 * 8 * 64
    num_blocks = 2**31 // (2 * chunk) + 2  # plane 1's last blocks start past 2**31 elements
    pool = torch.empty((1, 2, num_blocks, 16, 8, 64), dtype=torch.uint8, device=DEVICE)
    ids = [num_blocks - 1, 0, num_blocks - 2]
    for i, b in enumerate(ids):
        pool[:, :, b].fill_(i + 1)
    got = gather_blocks_kernel(pool, ids)
    assert torch.equal(got, pool.index_select(2, torch.tensor(ids, device=DEVICE)))
