"""Same-host CPU transport: the prefill engine's KV pool lives in POSIX shared memory.

The owner starts its engine with ``EngineConfig(kv_shm_name=...)`` so that its pool tensor
``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` is backed by
``/dev/shm/<name>``. The lease carries the name, shape and dtype; the puller maps the file
(once per pool, kept while its inode is unchanged) and copies the rows of the leased blocks.
No bytes cross a socket.
"""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING

import torch

from slaq.gpu_workers.engine.kv_pool import open_shm_pool, shm_path
from slaq.gpu_workers.kv_transfer.base import TransferError, Transport

if TYPE_CHECKING:
    from slaq.gpu_workers.kv_transfer.lease import Lease

BLOCK_DIM = 2  # the pool's block axis

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


class ShmTransport(Transport):
    """Owner side: describes its pool. Puller side: maps other pools and copies rows."""

    name = "shm"

    def __init__(self, shm_name: str | None = None, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.shm_name = shm_name
        self.shape = tuple(shape) if shape is not None else None
        self.dtype = dtype
        self._maps: dict[tuple[str, tuple[int, ...], str], tuple[int, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, str]:
        if self.shm_name is None or self.shape is None or self.dtype is None:
            raise TransferError("this worker's KV pool is not in shared memory")
        return {"shm_name": self.shm_name, "shape": json.dumps(list(self.shape)),
                "dtype": dtype_name(self.dtype)}

    def pull(self, lease: Lease) -> torch.Tensor:
        try:
            name = lease.descriptor["shm_name"]
            shape = tuple(int(x) for x in json.loads(lease.descriptor["shape"]))
            dtype = lease.descriptor["dtype"]
        except (KeyError, ValueError) as exc:
            raise TransferError(f"lease has no shm descriptor: {exc}") from exc
        pool = self._map(name, shape, dtype)
        if max(lease.block_ids) >= shape[BLOCK_DIM] or min(lease.block_ids) < 0:
            raise TransferError(f"block ids out of range for pool of {shape[BLOCK_DIM]}")
        index = torch.tensor(lease.block_ids, dtype=torch.long)
        # index_select copies, so the result no longer aliases the owner's pool.
        return pool.index_select(BLOCK_DIM, index)

    def _map(self, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        if dtype not in _DTYPES:
            raise TransferError(f"unsupported KV dtype {dtype!r}")
        try:
            inode = os.stat(shm_path(name)).st_ino
        except (FileNotFoundError, ValueError) as exc:
            raise TransferError(f"shared-memory pool {name!r} is gone") from exc
        key = (name, shape, dtype)
        with self._lock:
            cached = self._maps.get(key)
            # A restarted owner recreates the file: a new inode means a new pool.
            if cached is not None and cached[0] == inode:
                return cached[1]
            try:
                pool = open_shm_pool(name, shape, _DTYPES[dtype])
            except (OSError, ValueError) as exc:
                raise TransferError(f"cannot map shared-memory pool {name!r}: {exc}") from exc
            self._maps[key] = (inode, pool)
            return pool

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
