"""The C causal prefill attention (cpu_kernels/prefill_attention.c) against attention computed
in fp64, on the strided views the model passes it, and the paged backend's use of it."""

from __future__ import annotations

import pytest
import torch

from slaq.gpu_workers.engine.attention import (
    AttentionMetadata,
    CpuPagedBackend,
    PrefillSpan,
    TorchSDPABackend,
    get_attention_backend,
)
from slaq.gpu_workers.engine.cpu_kernels import load_paged_decode
from slaq.gpu_workers.engine.cpu_kernels.prefill import (
    PREFILL_SOURCE,
    PrefillAttentionKernel,
    load_prefill_attention,
)

KERNEL = load_prefill_attention()
DECODE = load_paged_decode()
needs_kernel = pytest.mark.skipif(KERNEL is None or DECODE is None,
                                  reason="no C compiler: kernels not built")


@pytest.fixture(params=["native", "no-avx512"])
def kernel(request, without_avx512) -> PrefillAttentionKernel:
    """The kernel as built here, and as for a CPU without AVX-512 (its plain C paths)."""
    if KERNEL is None:
        pytest.skip("no C compiler: kernel not built")
    if request.param == "native":
        return KERNEL
    return PrefillAttentionKernel(without_avx512(PREFILL_SOURCE))


def _qkv(n: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """q, k, v as views into one fused projection's output, as the model hands them over."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, heads + 2 * kv_heads, head_dim, generator=gen)
    return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]


def _reference(q, k, v, scale):
    """Causal softmax attention in fp64, K/V heads repeated for their query heads; the queries
    are the last ``len(q)`` of the ``len(k)`` positions."""
    group = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double() * scale, kd)
    n, n_k = q.shape[0], k.shape[0]
    causal = torch.ones(n, n_k, dtype=torch.bool).tril(diagonal=n_k - n)
    w = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", w, vd).float()


@pytest.mark.parametrize(("n", "heads", "kv_heads", "head_dim"), [
    (1, 9, 3, 64), (15, 9, 3, 64), (16, 9, 3, 64), (17, 9, 3, 64),  # query-block edges
    (64, 9, 3, 64), (65, 9, 3, 64), (300, 9, 3, 64),  # key-tile edges; SmolLM2's layout
    (130, 32, 8, 128),  # Llama-3.2-1B's layout
    (70, 16, 2, 128),  # the largest group and head: full per-thread buffers
    (40, 8, 2, 48),  # a head size of three 16-float chunks
    (50, 8, 8, 64),  # no grouping
    (23, 6, 3, 20),  # a head size the vector path does not take
])
def test_kernel_matches_fp64_causal_attention(kernel, n, heads, kv_heads, head_dim):
    q, k, v = _qkv(n, heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    torch.testing.assert_close(kernel(q, k, v, scale), _reference(q, k, v, scale),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(("n_q", "n_k"), [
    (1, 1000), (16, 17), (5, 64), (40, 104), (100, 165), (64, 1088),  # tile edges both ways
])
def test_queries_after_cached_keys(kernel, n_q, n_k):
    """A chunk behind a cached prefix or an earlier chunk: its queries sit at positions
    n_k - n_q ... n_k - 1 and see every key up to their own."""
    gen = torch.Generator().manual_seed(n_q + n_k)
    q = torch.randn(n_q, 9, 64, generator=gen)
    kv = torch.randn(2, n_k, 3, 64, generator=gen)
    torch.testing.assert_close(kernel(q, kv[0], kv[1], 0.125),
                               _reference(q, kv[0], kv[1], 0.125), rtol=1e-5, atol=2e-6)


def test_the_models_layouts_are_read_in_place(kernel):
    """As the model passes them: q and k views of the rotary output, v of the projection
    (three token strides); and a q whose heads are not side by side (copied first)."""
    heads, kv_heads, dim, n = 9, 3, 64, 77
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(n, heads + 2 * kv_heads, dim, generator=gen)
    qk = torch.randn(n, heads + kv_heads, dim, generator=gen)
    q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
    assert len({q.stride(0), k.stride(0), v.stride(0)}) == 2 and k.stride(0) != v.stride(0)
    want = _reference(q, k, v, 0.125)
    torch.testing.assert_close(kernel(q, k, v, 0.125), want, rtol=1e-5, atol=2e-6)
    q_head_major = q.transpose(0, 1).contiguous().transpose(0, 1)  # [n, H, D], heads n*D apart
    torch.testing.assert_close(kernel(q_head_major, k, v, 0.125), want, rtol=1e-5, atol=2e-6)


def test_large_scores_do_not_overflow(kernel):
    q, k, v = _qkv(90, 4, 2, 32, seed=1)
    got = kernel(q * 40, k, v, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(q * 40, k, v, 1.0), rtol=1e-4, atol=1e-4)


def test_a_nan_key_poisons_only_the_rows_that_see_it(kernel):
    """As SDPA: a query whose causal window holds a NaN key gets NaN; earlier ones do not.
    (A NaN value row, by contrast, may reach earlier queries of its tile through their zero
    weights, as in SDPA's block products.)"""
    for bad in (3, 70):  # inside the first key chunk, and in a later tile
        q, k, v = _qkv(100, 4, 2, 32, seed=2)
        k = k.clone()
        k[bad, 0, 5] = float("nan")
        out = kernel(q, k, v, 0.2)
        assert torch.isfinite(out[:bad]).all()
        assert torch.isnan(out[bad:, :2]).all()  # query heads 0-1 read K/V head 0
        assert torch.isfinite(out[:, 2:]).all()


@needs_kernel
def test_what_the_kernel_cannot_take_is_refused():
    q, k, v = _qkv(10, 4, 2, 32)
    with pytest.raises(ValueError, match="fp32"):
        KERNEL(q.double(), k, v, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        KERNEL(q, k[:9], v[:9], 1.0)  # fewer keys than queries
    with pytest.raises(ValueError, match="shapes"):
        KERNEL(q, k, v[:9], 1.0)
    with pytest.raises(ValueError, match="tokens, heads, head_dim"):
        KERNEL(q.flatten(1), k, v, 1.0)
    q16, k16, v16 = _qkv(10, 16, 1, 32)  # 16 query heads per K/V head: past MAX_GROUP
    assert not PrefillAttentionKernel.supports(16, 1, 32)
    with pytest.raises(ValueError, match="does not take"):
        KERNEL(q16, k16, v16, 1.0)
    assert KERNEL(q[:0], k[:0], v[:0], 1.0).shape == (0, 4, 32)


@needs_kernel
def test_the_paged_backend_prefills_like_sdpa():
    """A step with a fresh chunk (the kernel on the step's K/V) and a chunk after cached
    tokens (the kernel on the gathered blocks) gives the portable backend's outputs, and
    writes the same pool."""
    heads, kv_heads, head_dim, bs = 4, 2, 32, 4
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(2, 12, bs, kv_heads, head_dim, generator=gen)
    fresh, later = 9, 5  # the second sequence has 6 tokens cached in blocks 6-7
    q = torch.randn(fresh + later, heads, head_dim, generator=gen)
    k = torch.randn(fresh + later, kv_heads, head_dim, generator=gen)
    v = torch.randn(fresh + later, kv_heads, head_dim, generator=gen)
    table_a, table_b = torch.tensor([0, 1, 2]), torch.tensor([6, 7, 8])
    slots = torch.cat([table_a[torch.arange(fresh) // bs] * bs + torch.arange(fresh) % bs,
                       table_b[torch.arange(6, 11) // bs] * bs + torch.arange(6, 11) % bs])
    meta = AttentionMetadata(block_size=bs, slot_mapping=slots,
                             prefills=[PrefillSpan(0, fresh, 0, table_a),
                                       PrefillSpan(fresh, later, 6, table_b)],
                             num_prefill_tokens=fresh + later)
    scale = head_dim ** -0.5
    pool_a, pool_b = pool.clone(), pool.clone()
    paged = CpuPagedBackend(DECODE, KERNEL).forward(q, k, v, pool_a, meta, scale)
    portable = TorchSDPABackend().forward(q, k, v, pool_b, meta, scale)
    torch.testing.assert_close(paged, portable, rtol=1e-5, atol=2e-6)
    assert torch.equal(pool_a, pool_b)


def test_backend_choice_of_the_prefill_kernel():
    cpu = torch.device("cpu")
    auto = get_attention_backend(cpu, "auto", 9, 3, 64)
    if KERNEL is None or DECODE is None:
        pytest.skip("no C compiler: kernels not built")
    assert isinstance(auto, CpuPagedBackend) and auto.prefill_kernel is KERNEL
    off = get_attention_backend(cpu, "auto", 9, 3, 64, cpu_prefill=False)
    assert isinstance(off, CpuPagedBackend) and off.prefill_kernel is None
    # A layout the prefill kernel does not take keeps SDPA for prefill, the decode kernel.
    wide = get_attention_backend(cpu, "auto", 16, 1, 64)
    assert isinstance(wide, CpuPagedBackend) and wide.prefill_kernel is None
