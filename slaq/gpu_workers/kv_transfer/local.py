"""In-process transport: both engines live in one process (tests, single-process tools).

Owners register a ``read_blocks`` callable under their worker name; a pull calls it. The
callable must be safe to call from the pulling thread (an ``EngineLoop`` runs it on the
engine thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from slaq.gpu_workers.kv_transfer.base import TransferError, Transport

if TYPE_CHECKING:
    import torch

    from slaq.gpu_workers.kv_transfer.lease import Lease

ReadBlocks = Callable[[list[int]], "torch.Tensor"]

_registry: dict[str, ReadBlocks] = {}
_lock = threading.Lock()


class LocalTransport(Transport):
    """Pulls through the owner's ``read_blocks`` in the same process."""

    name = "local"

    def __init__(self, worker: str, read_blocks: ReadBlocks | None = None) -> None:
        self.worker = worker
        if read_blocks is not None:
            with _lock:
                _registry[worker] = read_blocks

    def describe(self) -> dict[str, str]:
        return {"worker": self.worker}

    def pull(self, lease: Lease) -> torch.Tensor:
        with _lock:
            read = _registry.get(lease.prefill_worker)
        if read is None:
            raise TransferError(f"no local engine registered as {lease.prefill_worker!r}")
        return read(list(lease.block_ids)).clone()

    def close(self) -> None:
        with _lock:
            _registry.pop(self.worker, None)
