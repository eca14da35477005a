"""KV transfer between a prefill and a decode engine: transports and the lease protocol.

``local`` (same process) and ``shm`` (same host, CPU pools in POSIX shared memory) are here;
``cuda_ipc`` and ``nixl`` plug in behind the same :class:`Transport` interface.
"""

from __future__ import annotations

from slaq.gpu_workers.kv_transfer.base import TransferError, Transport

TRANSPORTS: tuple[str, ...] = ("local", "shm")

__all__ = ["TRANSPORTS", "TransferError", "Transport"]
