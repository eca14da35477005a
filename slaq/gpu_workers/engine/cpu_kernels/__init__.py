"""CPU kernels in C, compiled on first use with the machine's C compiler and called via ctypes:
the paged decode attention (``paged_decode.c``), a layer's element-wise ops
(``layer_ops.c``, :class:`LayerOpsKernel`; why they are in C is said there) and the causal
prefill attention (``prefill_attention.c``, loaded by :mod:`.prefill`).

Why C for the attention: the CPU decode attention is a scan over each sequence's keys and
values with a few query rows per K/V head. Expressed in torch (batched matmuls, SDPA) it needs
the K/V gathered or kept contiguous first (``decode_cache``), and MKL and the flash kernel run
such thin matmuls well below the memory's bandwidth. A loop over the block table reads the K/V
in place from the paged pool, each row only up to its length. No maintained library ships
such a kernel for torch's CPU builds.

Why at first use: ``-march=native`` fits a kernel to the CPU it runs on, and a compile takes
under a second. The shared object is cached under ``SLAQ_KERNEL_CACHE`` (default
``~/.cache/slaq/kernels``), keyed by the source and the headers beside it, the flags, the
compiler and the CPU. Where no compiler works, :func:`load_paged_decode` and
:func:`load_layer_ops` return None and the callers keep their torch paths.

The kernels link OpenMP. Where torch's own OpenMP runtime is GNU's ``libgomp.so.1`` (the pip
wheels for Linux), the loader finds it already in the process, so the kernels run on torch's
threads and honour ``torch.set_num_threads``; a torch built on another runtime would leave
them a second thread pool of the system's default size.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import torch

from slaq.host import cpu_info

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
LAYER_OPS_SOURCE = Path(__file__).with_name("layer_ops.c")
# The C source's fixed bound (MAX_HEADS).
MAX_HEADS = 256
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("SLAQ_KERNEL_CACHE")
                or Path.home() / ".cache" / "slaq" / "kernels")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags (Linux), else the arch."""
    info = cpu_info()
    return "\n".join([platform.machine(), info.get("model name", ""), info.get("flags", "")])


# A compile takes well under a second; anything near this is a stuck toolchain.
COMPILE_TIMEOUT_S = 120


def _compiler() -> list[str] | None:
    """The compiler command: ``CC`` as a shell would split it (``ccache gcc``), else cc/gcc."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            return shlex.split(cc)
        except ValueError as exc:
            raise RuntimeError(f"cannot parse CC={cc!r}: {exc}") from exc
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group, so that a timeout kills the compiler driver's
    children (cc1, as, ld) too, not only the driver."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def compile_shared(source: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``source`` into a cached shared object and return its path.

    Raises RuntimeError when there is no compiler, it fails or hangs, or the cache directory
    is not writable. Concurrent callers are safe: each compiles into a temporary file and
    renames it into place."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    try:
        version = _run([*cc, "--version"]).stdout
        # The headers beside the source are part of what it compiles from (exp_poly.h).
        texts = [f.read_text() for f in (source, *sorted(source.parent.glob("*.h")))]
        key = hashlib.sha256("\0".join([*texts, shlex.join(cc), " ".join(flags), version,
                                        _cpu_signature()]).encode()).hexdigest()[:16]
        out = kernel_cache_dir() / f"{source.stem}-{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
        os.close(fd)
        try:
            proc = _run([*cc, *flags, "-o", tmp, str(source), "-lm"])
            if proc.returncode != 0:
                raise RuntimeError(f"{shlex.join(cc)} failed on {source.name}: "
                                   f"{proc.stderr.strip()[-2000:]}")
            umask = os.umask(0)
            os.umask(umask)
            # mkstemp's 0600 would hide it from a shared cache's other users.
            os.chmod(tmp, 0o755 & ~umask)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot build {source.name} with {shlex.join(cc)}: {exc}") from exc
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
        # Raised, not asserted: the C side trusts these shapes with raw pointers.
        tensors = (q, kv_cache, block_tables, context_lens)
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("the paged decode kernel runs on CPU tensors")
        if q.dtype != torch.float32 or kv_cache.dtype != torch.float32:
            raise ValueError("the paged decode kernel takes fp32 queries and pools")
        if block_tables.dtype != torch.long or context_lens.dtype != torch.long:
            raise ValueError("block tables and context lengths must be int64")
        if not kv_cache.is_contiguous():
            raise ValueError("the pool must be contiguous: the kernel reads it in place")
        q = q.contiguous()
        block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
        num_seqs, num_heads, head_dim = q.shape
        _, num_blocks, block_size, num_kv_heads, kv_dim = kv_cache.shape
        if kv_dim != head_dim or not (block_tables.dim() == 2 and block_tables.shape[0]
                                      == context_lens.shape[0] == num_seqs):
            raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, pool "
                             f"{tuple(kv_cache.shape)}, block tables "
                             f"{tuple(block_tables.shape)}, lengths {tuple(context_lens.shape)}")
        max_blocks = block_tables.shape[1]
        max_context = max_blocks * block_size
        need = self.scratch_numel(num_seqs, num_heads, max_context, head_dim)
        if scratch is None or scratch.numel() < need or scratch.dtype != torch.float32:
            scratch = torch.empty(need, dtype=torch.float32)
        out = torch.empty_like(q)
        rc = self._fn(q.data_ptr(), kv_cache.data_ptr(), block_tables.data_ptr(),
                      context_lens.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                      num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks,
                      max_blocks, max_context, scale)
        if rc != 0:
            raise ValueError("paged decode attention: a context length or block id is outside "
                             "its block table or the pool, or the head layout is unsupported")
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


class LayerOpsKernel:
    """A decoder layer's element-wise ops in C (fp32, CPU); see ``layer_ops.c``. Each call
    takes what the model passes the torch version (cos/sin already one row per token, not
    broadcast) and refuses, with a ValueError, anything the C side would misread."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._norm = lib.add_rms_norm
        self._norm.restype = None
        self._norm.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_float]
        self._silu = lib.silu_mul
        self._silu.restype = None
        self._silu.argtypes = [ptr, ptr, i64, i64]
        self._rotary = lib.rotary
        self._rotary.restype = None
        self._rotary.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64]

    @staticmethod
    def _check(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if not t.is_cpu or t.dtype != torch.float32:
                raise ValueError("the layer-op kernels take fp32 CPU tensors")
            if t.dim() == 0 or t.shape[-1] == 0:
                raise ValueError(f"the layer-op kernels take rows, got shape {tuple(t.shape)}")

    @staticmethod
    def _norm_weight(weight: torch.Tensor, dim: int) -> torch.Tensor:
        # F.rms_norm normalises over as many trailing dims as the weight has: only 1 maps.
        if weight.dim() != 1 or weight.numel() != dim:
            raise ValueError(f"norm weight of shape {tuple(weight.shape)} for rows of {dim}")
        return weight.contiguous()

    @staticmethod
    def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``x`` as rows with unit stride inside each row, and the rows' stride."""
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, x2.stride(0)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        self._check(x, weight)
        res = x.contiguous()
        # Held in a name: a temporary's memory would be freed before the C call reads it.
        w = self._norm_weight(weight, res.shape[-1])
        out = torch.empty_like(res)
        self._norm(None, 0, res.data_ptr(), w.data_ptr(), out.data_ptr(),
                   res.numel() // res.shape[-1], res.shape[-1], eps)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(x + residual), x + residual)``; the sum is written into ``residual``
        (in place when it is contiguous), which the model never reads again otherwise."""
        self._check(x, residual, weight)
        if x.shape != residual.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(residual.shape)}")
        w = self._norm_weight(weight, x.shape[-1])
        res = residual.contiguous()
        xr, x_stride = self._rows(x)
        out = torch.empty_like(res)
        self._norm(xr.data_ptr(), x_stride, res.data_ptr(), w.data_ptr(), out.data_ptr(),
                   xr.shape[0], res.shape[-1], eps)
        return out, res

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        self._check(gate_up)
        gu = gate_up.contiguous()
        if gu.shape[-1] % 2:
            raise ValueError(f"gate/up rows of odd width {gu.shape[-1]}")
        inter = gu.shape[-1] // 2
        out = torch.empty(*gu.shape[:-1], inter, dtype=gu.dtype, device=gu.device)
        self._silu(gu.data_ptr(), out.data_ptr(), gu.numel() // gu.shape[-1], inter)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, heads, D]`` (heads contiguous within a token; tokens may be strided),
        cos/sin ``[T, 1, D]``."""
        self._check(x, cos, sin)
        if x.dim() != 3:
            raise ValueError(f"rotary takes [tokens, heads, head_dim], got {tuple(x.shape)}")
        tokens, heads, head_dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != head_dim:
            x = x.contiguous()
        if (head_dim % 2 or cos.shape[0] != tokens or cos.shape[-1] != head_dim
                or cos.numel() != tokens * head_dim or sin.shape != cos.shape):
            raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
        cos, sin = cos.contiguous(), sin.contiguous()
        out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)
        self._rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                     tokens, heads, head_dim)
        return out


@functools.cache
def load_layer_ops() -> LayerOpsKernel | None:
    """The compiled layer ops, or None (logged once) where they cannot be built here."""
    try:
        # No contraction into multiply-adds whatever the compiler's default (clang's is on):
        # the rotation must round as torch's does (see layer_ops.c).
        path = compile_shared(LAYER_OPS_SOURCE, (*FLAGS, "-ffp-contract=off"))
        return LayerOpsKernel(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, AttributeError) as exc:
        log.warning("CPU layer-op kernels unavailable, the layers' element-wise ops stay on "
                    "torch: %s", exc)
        return None
