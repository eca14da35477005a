"""CUDA IPC transport: a decode worker on the same host maps the prefill worker's GPU KV pool
once through a CUDA IPC memory handle and copies leased block rows device to device.

The owner exports its pool with torch's own IPC machinery (``reduce_tensor``, as
``torch.multiprocessing`` does) exactly once and publishes the handle, as base64 strings, in
the lease descriptor. The puller opens each pool once (``rebuild_cuda_tensor``) and keeps the
mapping; a pull is a device-to-device gather on the block axis (:func:`gather_blocks`), no host
round trip, and :meth:`CudaIpcTransport.pull_into` copies straight into the puller's own pool.
The owner's pid is checked before and after the copy: rows copied from a dead owner's pool are
discarded (:class:`TransferError`) and the request is re-prefilled.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from typing import TYPE_CHECKING

import torch

from slaq.gpu_workers.kv_transfer import block_copy
from slaq.gpu_workers.kv_transfer.base import TransferError, Transport
from slaq.gpu_workers.kv_transfer.nixl import block_runs

if TYPE_CHECKING:
    from slaq.gpu_workers.kv_transfer.lease import Lease

BLOCK_DIM = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _b64(data: bytes | None) -> str:
    return "" if data is None else base64.b64encode(data).decode()


def _unb64(text: str) -> bytes | None:
    return base64.b64decode(text) if text else None


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def export_pool(pool: torch.Tensor) -> dict[str, str]:
    """The IPC descriptor of a CUDA tensor, as strings (for a lease)."""
    from torch.multiprocessing.reductions import reduce_tensor

    if pool.device.type != "cuda":
        raise ValueError("cuda_ipc needs a CUDA pool")
    _rebuild, args = reduce_tensor(pool)
    (_cls, size, stride, offset, _storage_cls, _dtype, device, handle, size_bytes,
     offset_bytes, _grad, ref_handle, ref_offset, event_handle, event_sync) = args
    return {
        "shape": json.dumps(list(size)), "stride": json.dumps(list(stride)),
        "offset": str(offset), "dtype": _dtype_name(pool.dtype), "device": str(device),
        "handle": _b64(handle), "size_bytes": str(size_bytes),
        "offset_bytes": str(offset_bytes), "ref_handle": _b64(ref_handle),
        "ref_offset": str(ref_offset), "event_handle": _b64(event_handle),
        "event_sync": "1" if event_sync else "0",
    }


def open_pool(d: dict[str, str]) -> torch.Tensor:
    """Map the pool an :func:`export_pool` descriptor names (in another process)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(json.loads(d["shape"])), tuple(json.loads(d["stride"])),
        int(d["offset"]), torch.UntypedStorage, _DTYPES[d["dtype"]], int(d["device"]),
        _unb64(d["handle"]), int(d["size_bytes"]), int(d["offset_bytes"]), False,
        _unb64(d["ref_handle"]), int(d["ref_offset"]), _unb64(d["event_handle"]),
        d["event_sync"] == "1")


MAX_RUN_COPIES = 4  # without the kernel: more runs than this, one index_select is cheaper
KERNEL_MIN_BYTES = block_copy.KERNEL_MIN_BYTES  # see there; a module name tests may patch


def gather_blocks(pool: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """A copy of ``pool[:, :, block_ids]`` for a pool ``[L, 2, NB, ...]``.

    On CUDA, from :data:`KERNEL_MIN_BYTES` up, the Triton block-copy kernel
    (:mod:`~slaq.gpu_workers.kv_transfer.block_copy`) copies every (layer, k|v, block) chunk
    as one contiguous run: for 256 scattered 512 KiB blocks on an H100 (GPU time) it copies
    1.40 TB/s, ``index_select`` 0.62, a contiguous copy of as many bytes 1.45. Smaller pulls, and pulls without
    the kernel (CPU, no triton), take one strided copy per run for a few runs of consecutive
    ids (what a fresh allocator hands out) and one ``index_select`` for scattered ids.
    """
    n = len(block_ids)
    if n == 0:
        return copy_runs(pool, [])
    first = block_ids[0]
    # Checked without block_runs: on a pull of a few MB the CPU time is felt.
    one_run = block_ids[-1] - first == n - 1 and block_ids == list(range(first, first + n))
    block_bytes = pool.numel() // max(1, pool.shape[BLOCK_DIM]) * pool.element_size()
    if (n * block_bytes >= KERNEL_MIN_BYTES
            and block_copy.kernel_usable(pool) and pool.is_contiguous()):
        if one_run:
            return block_copy.gather_run_kernel(pool, first, n)
        return block_copy.gather_blocks_kernel(pool, block_ids)
    if one_run:
        return copy_runs(pool, [(first, 0, n)])
    runs = block_runs(block_ids)
    if len(runs) > MAX_RUN_COPIES:
        return block_copy.gather_blocks_torch(pool, block_ids)
    return copy_runs(pool, runs)


def copy_runs(pool: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """The blocks of ``runs`` (:func:`block_runs`), one strided copy per run."""
    out = torch.empty((*pool.shape[:2], sum(n for _, _, n in runs), *pool.shape[3:]),
                      dtype=pool.dtype, device=pool.device)
    for first, row, n in runs:
        out.narrow(BLOCK_DIM, row, n).copy_(pool.narrow(BLOCK_DIM, first, n))
    return out


def _owner_alive(d: dict[str, str]) -> bool:
    if d.get("host") != socket.gethostname():
        return False  # an IPC handle means nothing on another host
    try:
        os.kill(int(d["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class CudaIpcTransport(Transport):
    """Owner side (``pool`` given): exports the pool once. Puller side: maps each owner's pool
    once and copies leased rows to ``device`` (the owner's GPU when None)."""

    name = "cuda_ipc"

    def __init__(self, worker: str, pool: torch.Tensor | None = None,
                 device: str | torch.device | None = None) -> None:
        self.worker = worker
        self.device = torch.device(device) if device is not None else None
        self._lock = threading.Lock()
        self._maps: dict[tuple[str, str, str], torch.Tensor] = {}
        self._pool = pool
        self._descriptor: dict[str, str] | None = None
        if pool is not None:
            if pool.dim() != 6:
                raise ValueError("the KV pool must be a 6-d tensor")
            # Exported once: every export takes a fresh slot in torch's IPC ref-counter file.
            self._descriptor = {**export_pool(pool), "host": socket.gethostname(),
                                "pid": str(os.getpid())}

    def describe(self) -> dict[str, str]:
        if self._descriptor is None:
            raise TransferError("this cuda_ipc transport has no pool to describe")
        return dict(self._descriptor)

    def pull(self, lease: Lease) -> torch.Tensor:
        d = lease.descriptor
        pool = self._map(d)
        self._check_ids(pool, lease.block_ids)
        kv = gather_blocks(pool, list(lease.block_ids))
        if self.device is not None and self.device != kv.device:
            kv = kv.to(self.device)
        self._vouch(d, kv.device)
        return kv

    def pull_into(self, lease: Lease, pool: torch.Tensor, block_ids: list[int]) -> None:
        """Copy the leased blocks straight into ``pool[:, :, block_ids]`` (the puller's own
        pool): on one GPU one kernel launch, pool to pool, with no intermediate tensor.

        On :class:`TransferError` the destination blocks hold garbage: the caller frees them.
        """
        if len(block_ids) != len(lease.block_ids):
            raise ValueError(f"{len(block_ids)} destination blocks for "
                             f"{len(lease.block_ids)} leased ones")
        d = lease.descriptor
        src = self._map(d)
        self._check_ids(src, lease.block_ids)
        if src.device == pool.device:
            block_copy.scatter_blocks(src, pool, list(block_ids), src_ids=list(lease.block_ids))
        else:
            block_copy.scatter_blocks(gather_blocks(src, list(lease.block_ids)), pool,
                                      list(block_ids))
        self._vouch(d, pool.device)

    @staticmethod
    def _check_ids(pool: torch.Tensor, block_ids: list[int]) -> None:
        num_blocks = pool.shape[BLOCK_DIM]
        if min(block_ids) < 0 or max(block_ids) >= num_blocks:
            raise TransferError(f"block ids out of range for a pool of {num_blocks}")

    @staticmethod
    def _vouch(d: dict[str, str], device: torch.device) -> None:
        # The copy must be complete before the liveness check can vouch for it.
        torch.cuda.current_stream(device).synchronize()
        if not _owner_alive(d):
            raise TransferError(f"owner of the pool ({d.get('pid')}) died during the pull")

    def _map(self, d: dict[str, str]) -> torch.Tensor:
        try:
            key = (d["host"], d["pid"], d["handle"])
        except KeyError as exc:
            raise TransferError(f"lease has no cuda_ipc descriptor: {exc}") from exc
        if not _owner_alive(d):
            with self._lock:
                self._maps.pop(key, None)
            raise TransferError(f"owner of the pool ({d['host']}:{d['pid']}) is gone")
        with self._lock:
            pool = self._maps.get(key)
            if pool is None:
                try:
                    pool = open_pool(d)
                except (KeyError, ValueError, RuntimeError) as exc:
                    raise TransferError(f"cannot open the CUDA IPC pool: {exc}") from exc
                self._maps[key] = pool
            return pool

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
