"""Copy whole KV blocks between pools at copy bandwidth: a Triton block-copy kernel.

A pool ``[L, 2, NB, block_size, kv_heads, head_dim]`` is, seen flat, ``L*2`` planes of ``NB``
chunks of ``C = block_size*kv_heads*head_dim`` contiguous elements. Moving blocks is copying
chunks: ``dst[p, dst_ids[j]] = src[p, src_ids[j]]`` for every plane ``p`` and position ``j``.
``index_select`` on the block axis does this element by element with index arithmetic per
element; the kernel instead gives each program one tile of one chunk (up to 16 KiB), so every
load and store is a long run of aligned 16-byte vectors and there are thousands of programs to
keep the memory system busy. On an H100, 128 MB of scattered 512 KiB blocks (GPU time alone):
index_select 0.63 TB/s, this kernel 1.40, a plain contiguous copy of as many bytes 1.45.

Elements are only loaded and stored, never converted, so the copy is bit-exact for any dtype
(bf16 too, also under ``TRITON_INTERPRET=1``). Offsets are int64: a large pool passes 2**31
elements. Where Triton is missing or the tensors are not on CUDA, the same copy is
done with ``index_select`` / ``index_copy_``.
"""

from __future__ import annotations

from array import array
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from math import prod

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (and CI) have no triton
    triton = None

BLOCK_DIM = 2
TILE_BYTES = 16384  # bytes one program copies at most
# Below this many bytes a pull is mostly launch overhead, and the Triton launch (~20-35 us of
# Python on the H100 host) costs what the faster copy saves. Measured there, per pull launch to
# synchronised: 8 MiB 71 us kernel vs 49 us index_select, 32 MiB 92 vs 93, 64 MiB 145 vs 225,
# 128 MiB 162 vs 272 (scattered); one run: 8 MiB 43 vs 32 us copy_, 128 MiB 132 vs 190.
KERNEL_MIN_BYTES = 32 << 20


def triton_available() -> bool:
    return triton is not None


def kernel_usable(*tensors: torch.Tensor) -> bool:
    """True where :func:`copy_chunks` runs on the GPU: triton importable, all on one CUDA device."""
    return (triton is not None and all(t.is_cuda for t in tensors)
            and len({t.device for t in tensors}) == 1)


if triton is not None:

    @triton.jit
    def _copy_chunks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, n, src_start,
                            src_blocks, dst_blocks, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                            HAS_SRC_IDS: tl.constexpr, HAS_DST_IDS: tl.constexpr,
                            EVEN: tl.constexpr):
        # Program (plane * n + j, tile): neighbouring programs write neighbouring output
        # chunks, so a gather's stores stream through memory in order.
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        plane = (pid // n).to(tl.int64)
        j = pid % n
        if HAS_SRC_IDS:
            s = tl.load(src_ids_ptr + j).to(tl.int64)
        else:
            s = src_start + j.to(tl.int64)
        if HAS_DST_IDS:
            d = tl.load(dst_ids_ptr + j).to(tl.int64)
        else:
            d = j.to(tl.int64)
        start = tile * BLOCK
        # CHUNK is a compile-time constant, so the compiler sees how far every chunk start is
        # aligned and emits 16-byte vector accesses when C allows it.
        src = src_ptr + (plane * src_blocks + s) * CHUNK + start
        dst = dst_ptr + (plane * dst_blocks + d) * CHUNK + start
        offs = tl.arange(0, BLOCK)
        if EVEN:
            tl.store(dst + offs, tl.load(src + offs, eviction_policy="evict_first"))
        else:
            mask = start + offs < CHUNK
            tl.store(dst + offs, tl.load(src + offs, mask=mask, eviction_policy="evict_first"),
                     mask=mask)


def _check_pools(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.dtype != dst.dtype or src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:]:
        raise ValueError(f"pools differ: {src.dtype}{tuple(src.shape)} vs "
                         f"{dst.dtype}{tuple(dst.shape)}")
    if src.dim() < 3 or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("block pools must be contiguous tensors [L, 2, NB, ...]")


def _ids(ids: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.int64)
    if not ids:
        return torch.empty(0, dtype=torch.int64, device=device)
    # Through array: half the CPU time of torch.tensor(list), which is felt on a pull of a few
    # MB (the tensor keeps the array alive).
    return torch.frombuffer(array("q", ids), dtype=torch.int64).to(device, non_blocking=True)


@lru_cache(maxsize=64)
def launch_config(chunk: int, element_size: int, tile_bytes: int = TILE_BYTES,
                  num_warps: int | None = None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: a tile of at most ``tile_bytes`` (a power of two of elements).

    16 KiB tiles with 8 warps (4 16-byte vectors a thread in flight) were among the best on an
    H100 for 16 KiB chunks (1.38 TB/s for 128 MB; 4-32 KiB and 2-16 warps all gave 1.2-1.4).
    """
    most = max(16, tile_bytes // element_size)
    block = min(triton.next_power_of_2(chunk), 1 << (most.bit_length() - 1))
    if num_warps is None:
        num_warps = 8 if block * element_size >= 8192 else 4
    return block, num_warps


def copy_chunks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor | None,
                dst_ids: torch.Tensor | None, *, src_start: int = 0, n: int | None = None,
                tile_bytes: int = TILE_BYTES, num_warps: int | None = None) -> None:
    """The kernel: ``dst[:, :, dst_ids[j]] = src[:, :, src_ids[j]]`` for every ``j < n``.

    ``src`` and ``dst`` are contiguous pools of one dtype and one block shape; ``None`` ids mean
    ``src_start + j`` (source) and ``j`` (destination); ``n`` defaults to the ids' length, else
    to ``dst``'s block count; ids are int tensors on the tensors' device (int64 or int32), in
    range (not checked here). Duplicate ``dst_ids`` leave one of the candidates, unspecified
    which, as ``index_copy_`` does. Runs on the current CUDA device, or on CPU under
    ``TRITON_INTERPRET=1``. Kept lean: on a pull of a few MB the launch, not the copy, is
    most of the time.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_pools(src, dst)
    if src_ids is not None and dst_ids is not None and src_ids.numel() != dst_ids.numel():
        raise ValueError("src_ids and dst_ids differ in length")
    ids = src_ids if src_ids is not None else dst_ids
    if n is None:
        n = ids.numel() if ids is not None else dst.shape[BLOCK_DIM]
    shape = src.shape
    planes, chunk = shape[0] * shape[1], prod(shape[3:])
    if n == 0 or planes == 0 or chunk == 0:
        return
    block, warps = launch_config(chunk, src.element_size(), tile_bytes, num_warps)
    # The pools go in whole: the kernel only needs their base pointers. Where ids are
    # implied, a dummy pointer (never read: the flags are constexprs).
    _copy_chunks_kernel[(planes * n, triton.cdiv(chunk, block))](
        src, dst, src if src_ids is None else src_ids, dst if dst_ids is None else dst_ids,
        n, src_start, shape[BLOCK_DIM], dst.shape[BLOCK_DIM], CHUNK=chunk, BLOCK=block,
        HAS_SRC_IDS=src_ids is not None, HAS_DST_IDS=dst_ids is not None,
        EVEN=chunk % block == 0, num_warps=warps)


def _on_device(t: torch.Tensor) -> AbstractContextManager[object]:
    """The tensor's CUDA device made current for a launch (a no-op where it already is)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return nullcontext()


def gather_blocks_kernel(pool: torch.Tensor, block_ids: torch.Tensor | list[int],
                         **launch: int) -> torch.Tensor:
    """A new ``[L, 2, n, ...]`` tensor holding ``pool[:, :, block_ids]``, by the kernel."""
    ids = _ids(block_ids, pool.device)
    out = torch.empty((*pool.shape[:2], ids.numel(), *pool.shape[3:]), dtype=pool.dtype,
                      device=pool.device)
    with _on_device(pool):
        copy_chunks(pool, out, ids, None, **launch)
    return out


def gather_run_kernel(pool: torch.Tensor, first: int, n: int, **launch: int) -> torch.Tensor:
    """A new tensor holding blocks ``first .. first+n-1`` of ``pool``, by the kernel (no ids
    to upload; faster than a strided ``copy_`` of the run once the run is large)."""
    out = torch.empty((*pool.shape[:2], n, *pool.shape[3:]), dtype=pool.dtype,
                      device=pool.device)
    with _on_device(pool):
        copy_chunks(pool, out, None, None, src_start=first, n=n, **launch)
    return out


def scatter_blocks_kernel(kv: torch.Tensor, pool: torch.Tensor,
                          block_ids: torch.Tensor | list[int],
                          src_ids: torch.Tensor | list[int] | None = None, **launch: int) -> None:
    """``pool[:, :, block_ids] = kv[:, :, src_ids]`` in place, by the kernel.

    With ``src_ids`` None, ``kv`` is ``[L, 2, len(block_ids), ...]`` (what a pull returns);
    with ``src_ids``, ``kv`` is another pool (say a mapped remote one) and blocks go straight
    from pool to pool, with no intermediate tensor.
    """
    ids = _ids(block_ids, pool.device)
    sids = None if src_ids is None else _ids(src_ids, pool.device)
    with _on_device(pool):
        copy_chunks(kv, pool, sids, ids, **launch)


def gather_blocks_torch(pool: torch.Tensor, block_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """The reference (and the fallback): ``index_select`` on the block axis."""
    return pool.index_select(BLOCK_DIM, _ids(block_ids, pool.device))


def scatter_blocks_torch(kv: torch.Tensor, pool: torch.Tensor,
                         block_ids: torch.Tensor | list[int],
                         src_ids: torch.Tensor | list[int] | None = None) -> None:
    """The reference (and the fallback) of :func:`scatter_blocks_kernel`."""
    if src_ids is not None:
        kv = kv.index_select(BLOCK_DIM, _ids(src_ids, kv.device))
    pool.index_copy_(BLOCK_DIM, _ids(block_ids, pool.device), kv.to(pool.device))


def scatter_blocks(kv: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor | list[int],
                   src_ids: torch.Tensor | list[int] | None = None) -> None:
    """``pool[:, :, block_ids] = kv[:, :, src_ids or all]``: the kernel where it runs (same
    dtype, one CUDA device, contiguous) and pays (:data:`KERNEL_MIN_BYTES` and up),
    ``index_copy_`` otherwise."""
    num_blocks = len(block_ids)
    block_bytes = kv.numel() // max(1, kv.shape[2]) * kv.element_size()
    if (num_blocks * block_bytes >= KERNEL_MIN_BYTES and kernel_usable(kv, pool)
            and kv.dtype == pool.dtype and kv.is_contiguous() and pool.is_contiguous()):
        scatter_blocks_kernel(kv, pool, block_ids, src_ids)
    else:
        scatter_blocks_torch(kv.to(pool.dtype), pool, block_ids, src_ids)


__all__ = ["TILE_BYTES", "copy_chunks", "gather_blocks_kernel", "gather_blocks_torch",
           "gather_run_kernel", "kernel_usable", "launch_config", "scatter_blocks",
           "scatter_blocks_kernel", "scatter_blocks_torch", "triton_available"]
