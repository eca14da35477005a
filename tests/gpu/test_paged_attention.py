"""The Triton paged decode kernel against the plain-torch reference.

Runs on CUDA; on a CPU-only machine it runs under Triton's interpreter when the session was
started with ``TRITON_INTERPRET=1`` (fp32/fp16 only: the interpreter's bf16 dot is wrong),
and is skipped otherwise.
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
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case(dtype: torch.dtype, lens: list[int], num_blocks: int = 64, block_size: int = 16,
          kv_heads: int = 2, heads: int = 8, head_dim: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    width = max(1, -(-max(lens) // block_size))
    # A shuffled, non-contiguous block table per sequence, as a real pool has.
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    to = {"device": DEVICE}
    return (q.to(**to), kv.to(**to), tables.to(dtype=torch.int32, **to),
            torch.tensor(lens, dtype=torch.int32, **to), width * block_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[1], [700, 37, 16, 17], [1023, 512, 513]])
def test_paged_decode_matches_reference(dtype, lens):
    from slaq.gpu_workers.engine.paged_attention import paged_decode_reference
    from slaq.gpu_workers.engine.paged_attention.triton_decode import paged_decode

    q, kv, tables, ctx, max_context = _case(dtype, lens)
    out = paged_decode(q, kv, tables, ctx, 0.125, max_context)
    ref = paged_decode_reference(q.cpu(), kv.cpu(), tables.cpu(), ctx.cpu(), 0.125)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("partition", [64, 128, 512])
def test_every_partition_size_gives_the_same_attention(partition):
    from slaq.gpu_workers.engine.paged_attention import paged_decode_reference
    from slaq.gpu_workers.engine.paged_attention.triton_decode import paged_decode

    q, kv, tables, ctx, max_context = _case(torch.float32, [700, 1, 129, 64])
    out = paged_decode(q, kv, tables, ctx, 0.125, max_context, partition=partition)
    ref = paged_decode_reference(q.cpu(), kv.cpu(), tables.cpu(), ctx.cpu(), 0.125)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_partition_size_fills_the_device_and_bounds_the_partials():
    from slaq.gpu_workers.engine.paged_attention.triton_decode import (
        MAX_PARTS,
        num_partitions,
        partition_size,
    )

    # Batch 1 on 132 SMs: the shortest partitions; batch 128: the longest that still fill it.
    assert partition_size(1, 8, 640, 132) == 64
    assert partition_size(128, 8, 640, 132) == 256
    assert partition_size(16, 8, 640, 132) == 128
    for max_context in (1, 640, 8192, 16_384, 131_072):
        for batch in (1, 8, 128):
            size = partition_size(batch, 8, max_context, 132)
            assert size % 64 == 0 and num_partitions(max_context, size) <= MAX_PARTS


def test_padding_rows_give_zeros_and_a_larger_max_context_changes_nothing():
    from slaq.gpu_workers.engine.paged_attention.triton_decode import paged_decode

    q, kv, tables, _, max_context = _case(torch.float32, [300, 300, 300])
    ctx = torch.tensor([0, 300, 0], dtype=torch.int32, device=DEVICE)
    out = paged_decode(q, kv, tables, ctx, 0.125, max_context)
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0
    wide = paged_decode(q, kv, tables, ctx, 0.125, 4 * max_context)
    torch.testing.assert_close(out, wide)


def test_store_kv_writes_slots_and_skips_negative_ones():
    from slaq.gpu_workers.engine.paged_attention.triton_decode import store_kv

    kv = torch.zeros(2, 8, 4, 2, 16, device=DEVICE)
    k = torch.randn(3, 2, 16, device=DEVICE)
    v = torch.randn(3, 2, 16, device=DEVICE)
    store_kv(k, v, kv, torch.tensor([5, -1, 31], device=DEVICE))
    flat = kv.view(2, 32, 2, 16)
    assert torch.equal(flat[0, 5], k[0]) and torch.equal(flat[1, 5], v[0])
    assert torch.equal(flat[0, 31], k[2]) and torch.equal(flat[1, 31], v[2])
    written = flat.flatten(2).abs().sum(-1).sum(0).nonzero().flatten().tolist()
    assert written == [5, 31]


def test_engine_with_triton_backend_matches_hf_greedy(tiny_model_path):
    from slaq.gpu_workers.engine.config import SamplingParams
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.paged_attention import TritonPagedBackend
    from slaq.gpu_workers.engine.testing import (
        TINY_PROMPTS,
        engine_config,
        hf_causal_lm,
        hf_greedy,
    )

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eng = LLMEngine(engine_config(tiny_model_path, device=DEVICE))
    eng.runner.backend = TritonPagedBackend()
    prompts = [eng.tokenizer.encode(p) for p in TINY_PROMPTS[:3]]
    got = [c.token_ids for c in eng.generate(prompts, params)]
    hf = hf_causal_lm(tiny_model_path)
    assert got == [hf_greedy(hf, p, 6) for p in prompts]
