"""KV transfer between a prefill and a decode engine: transports and the lease protocol.

``local`` (same process), ``shm`` (same host, CPU pools in POSIX shared memory), ``cuda_ipc``
(same host, GPU pools opened once through an IPC handle) and ``nixl`` (NIXL over UCX, across
hosts; also CPU memory) sit behind the same :class:`Transport` interface. The worker picks one
from where the two pools live; ``--transport nixl`` forces NIXL.
"""

from __future__ import annotations

from slaq.gpu_workers.kv_transfer.base import TransferError, Transport

TRANSPORTS: tuple[str, ...] = ("local", "shm", "cuda_ipc", "nixl")

__all__ = ["TRANSPORTS", "TransferError", "Transport"]
