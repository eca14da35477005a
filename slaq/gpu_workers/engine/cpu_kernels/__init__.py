"""CPU kernels in C, compiled on first use with the machine's C compiler and called via ctypes.

Why C: the CPU decode attention is a scan over each sequence's keys and values with 3 query
rows per K/V head. Expressed in torch (batched matmuls, SDPA) MKL and the flash kernel read
the K/V at about half the memory's bandwidth, and they need the K/V gathered or kept
contiguous first (``decode_cache``). A 100-line loop reads it in place from the paged pool at
the bandwidth. No maintained library ships such a kernel for torch's CPU builds.

Why at first use: ``-march=native`` fits the kernel to the CPU it runs on, and a compile
takes under a second. The shared object is cached under ``SLAQ_KERNEL_CACHE`` (default
``~/.cache/slaq/kernels``), keyed by the source, the flags, the compiler and the CPU. Where no
compiler works, :func:`load_paged_decode` returns None and the caller keeps its torch path.
The kernel links OpenMP; torch has already loaded its ``libgomp.so.1``, so the kernel runs on
torch's threads and honours ``torch.set_num_threads``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
# The C source's fixed bound (MAX_HEADS).
MAX_HEADS = 256
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("SLAQ_KERNEL_CACHE")
                or Path.home() / ".cache" / "slaq" / "kernels")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags (Linux), else the arch."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(keep)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_shared(source: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``source`` into a cached shared object and return its path.

    Raises RuntimeError when there is no compiler or it fails. Concurrent callers are safe:
    each compiles into a temporary file and renames it into place."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             check=False).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(flags), version,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    out = kernel_cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class PagedDecodeKernel:
    """Decode attention over the paged pool (fp32, CPU); see ``paged_decode.c``."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.paged_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 8 + [ctypes.c_float]
        self._fn = fn

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
        """q ``[B, H, D]``, kv_cache ``[2, num_blocks, block_size, KVH, D]``, block_tables
        ``[B, max_blocks]`` and context_lens ``[B]`` (long); returns ``[B, H, D]``.
        ``scratch``: a float buffer to reuse, of at least :meth:`scratch_numel` elements."""
        assert q.dtype == kv_cache.dtype == torch.float32 and q.device.type == "cpu"
        assert block_tables.dtype == context_lens.dtype == torch.long
        assert kv_cache.is_contiguous(), "the kernel reads the pool in place"
        q = q.contiguous()
        block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
        num_seqs, num_heads, head_dim = q.shape
        _, num_blocks, block_size, num_kv_heads, kv_dim = kv_cache.shape
        assert kv_dim == head_dim and block_tables.shape[0] == context_lens.shape[0] == num_seqs
        max_blocks = block_tables.shape[1]
        max_context = max_blocks * block_size
        need = self.scratch_numel(num_seqs, num_heads, max_context, head_dim)
        if scratch is None or scratch.numel() < need:
            scratch = torch.empty(need, dtype=torch.float32)
        out = torch.empty_like(q)
        rc = self._fn(q.data_ptr(), kv_cache.data_ptr(), block_tables.data_ptr(),
                      context_lens.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                      num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks,
                      max_blocks, max_context, scale)
        if rc != 0:
            raise ValueError("paged decode attention: a context length is outside its block "
                             "table, or the head layout is unsupported")
        return out

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether the kernel takes this head layout (its fixed-size per-item buffers)."""
        return (num_kv_heads > 0 and num_heads % num_kv_heads == 0
                and num_heads <= MAX_HEADS and head_dim > 0)

    @staticmethod
    def scratch_numel(num_seqs: int, num_heads: int, max_context: int,
                      head_dim: int) -> int:
        return num_seqs * num_heads * (max_context + 2 * head_dim)


@functools.cache
def load_paged_decode() -> PagedDecodeKernel | None:
    """The compiled kernel, or None (logged once) where it cannot be built here."""
    try:
        return PagedDecodeKernel(ctypes.CDLL(str(compile_shared(SOURCE))))
    except (OSError, RuntimeError) as exc:
        log.warning("CPU paged decode kernel unavailable, decode attention stays on torch: %s",
                    exc)
        return None
