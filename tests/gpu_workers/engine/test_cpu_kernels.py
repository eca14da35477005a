"""The C paged decode kernel (cpu_kernels) against attention computed in fp64 from gathered
blocks, its build cache, and the backend choice around it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slaq.gpu_workers.engine.attention import (
    AttentionMetadata,
    CpuPagedBackend,
    TorchSDPABackend,
    get_attention_backend,
)
from slaq.gpu_workers.engine.cpu_kernels import (
    SOURCE,
    PagedDecodeKernel,
    compile_shared,
    load_paged_decode,
)

KERNEL = load_paged_decode()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernel not built")


@pytest.fixture(params=["native", "no-avx512"])
def kernel(request, without_avx512) -> PagedDecodeKernel:
    """The kernel as built here, and as for a CPU without AVX-512 (its AVX2 value pass)."""
    if KERNEL is None:
        pytest.skip("no C compiler: kernel not built")
    return KERNEL if request.param == "native" else PagedDecodeKernel(without_avx512(SOURCE))


def _reference(q, pool, tables, lens, scale):
    """Each sequence's keys/values gathered by its block table, softmax in fp64."""
    bs = pool.shape[2]
    kvh = pool.shape[3]
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        kv = pool[:, tables[b]].flatten(1, 2)[:, :n].double()  # [2, n, KVH, D]
        k = kv[0].repeat_interleave(q.shape[1] // kvh, dim=1)  # [n, H, D]
        v = kv[1].repeat_interleave(q.shape[1] // kvh, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double() * scale, k), dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
        assert tables.shape[1] * bs >= n
    return torch.stack(out).float()


def _case(num_seqs, heads, kv_heads, head_dim, block_size, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = num_seqs * max_blocks + 3
    pool = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    # Every sequence gets distinct blocks in a scattered order; padding entries point at 0.
    perm = torch.randperm(num_blocks, generator=gen)[:num_seqs * max_blocks]
    tables = perm.view(num_seqs, max_blocks).clone()
    for b, n in enumerate(lens):
        tables[b, -(-n // block_size):] = 0
    q = torch.randn(num_seqs, heads, head_dim, generator=gen)
    return q, pool, tables, torch.tensor(lens)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "lens"), [
    (9, 3, 64, 16, [1, 15, 16, 17, 200, 333]),  # SmolLM2's layout; block edges; long rows
    (4, 4, 64, 4, [7, 1, 9]),  # no grouping
    (8, 2, 48, 8, [23, 64, 3]),  # 4 heads per K/V head (passes of 3 + 1); 32 + 8 + 8 floats
    (10, 2, 96, 16, [40, 17]),  # 5 heads per K/V head (passes of 3 + 2); 3 x 32 floats
    (8, 1, 128, 16, [9, 300]),  # 8 heads per K/V head (3 + 3 + 2); 4 x 32 floats
    (6, 3, 20, 5, [11, 2, 30, 31]),  # a head size the vector paths do not take
    (32, 8, 64, 16, [513]),  # Llama-3.2-1B's layout, one sequence
])
def test_kernel_matches_fp64_attention(kernel, heads, kv_heads, head_dim, block_size, lens):
    q, pool, tables, ctx = _case(len(lens), heads, kv_heads, head_dim, block_size, lens)
    got = kernel(q, pool, tables, ctx, 0.125)
    want = _reference(q, pool, tables, ctx, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@needs_kernel
def test_a_nan_score_gives_nan_not_a_finite_guess():
    """As SDPA: a NaN in a row's scores (here: in its query) makes that row's output NaN,
    whether the NaN falls in the vector part of the row or its tail, and leaves the others."""
    q, pool, tables, ctx = _case(2, 2, 1, 16, 4, [13, 13])
    for bad_key in (2, 12):  # vector lanes (first 8 keys) and the scalar tail
        p = pool.clone()
        p[0, tables[0, bad_key // 4], bad_key % 4] = float("nan")
        out = KERNEL(q, p, tables, ctx, 1.0)
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


@needs_kernel
def test_large_scores_do_not_overflow():
    """Scores in the hundreds: the softmax subtracts each row's maximum first."""
    q, pool, tables, ctx = _case(2, 2, 1, 16, 4, [9, 30])
    got = KERNEL(q * 40, pool, tables, ctx, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(q * 40, pool, tables, ctx, 1.0),
                               rtol=1e-4, atol=1e-4)


@needs_kernel
def test_what_would_read_outside_the_pool_is_refused():
    q, pool, tables, ctx = _case(2, 2, 1, 16, 4, [5, 12])
    with pytest.raises(ValueError, match="outside its block table"):
        KERNEL(q, pool, tables, torch.tensor([5, 13]), 1.0)  # 13 tokens need 4 blocks of 4
    with pytest.raises(ValueError):
        KERNEL(q, pool, tables, torch.tensor([0, 12]), 1.0)
    for bad_id in (-1, pool.shape[1]):  # a block id outside the pool, in a used entry
        bad = tables.clone()
        bad[1, 1] = bad_id
        with pytest.raises(ValueError, match="block id"):
            KERNEL(q, pool, bad, ctx, 1.0)
    bad = tables.clone()
    bad[0, 2] = -1  # past row 0's two used blocks: padding, never read
    torch.testing.assert_close(KERNEL(q, pool, bad, ctx, 1.0), KERNEL(q, pool, tables, ctx, 1.0))
    with pytest.raises(ValueError, match="fp32"):
        KERNEL(q.double(), pool, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="int64"):
        KERNEL(q, pool, tables.int(), ctx, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        KERNEL(q, pool.transpose(1, 2).contiguous().transpose(1, 2), tables, ctx, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        KERNEL(q, pool, tables[:1], ctx, 1.0)


@needs_kernel
def test_the_backend_decodes_like_sdpa():
    """The paged backend's decodes equal the portable backend's masked SDPA over the
    gathered blocks. (Steps mixing prefill chunks and decodes run in test_decode_cache.)"""
    q, pool, tables, ctx = _case(3, 4, 2, 32, 4, [6, 13, 4])
    scale = 32 ** -0.5
    meta = AttentionMetadata(block_size=4, slot_mapping=torch.zeros(0, dtype=torch.long),
                             prefills=[], num_prefill_tokens=0, decode_block_tables=tables,
                             decode_context_lens=ctx)
    empty = torch.zeros(0, 2, 32)
    paged = CpuPagedBackend(KERNEL).forward(q, empty, empty, pool, meta, scale)
    portable = TorchSDPABackend().forward(q, empty, empty, pool, meta, scale)
    torch.testing.assert_close(paged, portable, rtol=1e-5, atol=1e-5)


def test_backend_choice():
    cpu = torch.device("cpu")
    assert type(get_attention_backend(cpu, "copy", 9, 3, 64)) is TorchSDPABackend
    # The kernel is fp32 only: other dtypes keep the copy, and asking for it is an error.
    assert type(get_attention_backend(cpu, "auto", 9, 3, 64, torch.bfloat16)) is TorchSDPABackend
    with pytest.raises(RuntimeError, match="fp32"):
        get_attention_backend(cpu, "paged", 9, 3, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_decode"):
        get_attention_backend(cpu, "fast", 9, 3, 64)
    auto = get_attention_backend(cpu, "auto", 9, 3, 64)
    if KERNEL is None:
        assert type(auto) is TorchSDPABackend
        with pytest.raises(RuntimeError):
            get_attention_backend(cpu, "paged", 9, 3, 64)
    else:
        assert isinstance(auto, CpuPagedBackend) and auto.reads_pool
        assert isinstance(get_attention_backend(cpu, "paged", 9, 3, 64), CpuPagedBackend)
        assert not PagedDecodeKernel.supports(9, 4, 64)  # heads not a multiple of KV heads
        with pytest.raises(RuntimeError):
            get_attention_backend(cpu, "paged", 9, 4, 64)


@needs_kernel
def test_builds_are_cached_and_failures_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAQ_KERNEL_CACHE", str(tmp_path))
    src = tmp_path / "add_one.c"
    src.write_text("int add_one(int x) { return x + 1; }\n")
    first = compile_shared(src)
    stamp = first.stat().st_mtime_ns
    assert compile_shared(src) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    src.write_text("int add_one(int x) { return x + 2; }\n")
    assert compile_shared(src) != first  # the source is part of the key
    src.write_text("int add_one(int x) { return x + ; }\n")
    with pytest.raises(RuntimeError, match="failed on add_one.c"):
        compile_shared(src)
    # Two builds and the source: no temporary files left behind.
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".c", ".so", ".so"]
    assert first.stat().st_mode & 0o777 == 0o755  # usable from a cache shared by users
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="cannot build add_one.c"):
        compile_shared(src)
    monkeypatch.setenv("CC", "env gcc")  # CC is split as a shell would
    src.write_text("int add_one(int x) { return x + 3; }\n")
    plain = compile_shared(src)
    monkeypatch.setenv("CC", "env gcc -O0")
    assert compile_shared(src) != plain  # the compiler command is part of the key
    monkeypatch.setenv("CC", 'gcc "')
    with pytest.raises(RuntimeError, match="cannot parse CC"):
        compile_shared(src)


def test_every_backend_says_whether_it_reads_the_pool():
    """The runner asks every backend (keeps a K/V copy and a mask only for those that do
    not read the pool): a class without the attribute would fail at its first decode."""
    from slaq.gpu_workers.engine.paged_attention import TritonPagedBackend

    assert TritonPagedBackend.reads_pool and CpuPagedBackend.reads_pool
    assert not TorchSDPABackend.reads_pool


def test_importing_slaq_first_puts_large_tensors_on_huge_pages():
    """slaq sets THP_MEM_ALLOC_ENABLE before torch allocates: a large tensor's pages are
    huge-page eligible where the kernel's THP setting allows it ("madvise" or "always")."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this kernel")
    probe = (
        "import slaq, torch\n"
        "t = torch.ones(64 << 20, dtype=torch.uint8)\n"
        "p, inside = t.data_ptr(), False\n"
        "for line in open('/proc/self/smaps'):\n"
        "    f = line.split()\n"
        "    if '-' in f[0] and ':' not in f[0]:\n"
        "        a, b = (int(x, 16) for x in f[0].split('-'))\n"
        "        inside = a <= p < b\n"
        "    elif inside and f[0] == 'THPeligible:':\n"
        "        print(f[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out == ["1"]
    if "[madvise]" in thp.read_text():  # under "always" every large mapping is eligible
        env["THP_MEM_ALLOC_ENABLE"] = "0"  # the opt-out is honoured
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        assert out == ["0"]
