"""The transport interface: how the KV rows of leased blocks move between engines.

The prefill side ``describe()``s where its pool lives (written into the lease); the decode
side ``pull(lease)``s the rows of the leased blocks into a tensor shaped like
``LLMEngine.read_blocks``: ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]``, ready
for ``LLMEngine.add_prefilled_request``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from slaq.gpu_workers.kv_transfer.lease import Lease


class TransferError(RuntimeError):
    """The blocks could not be pulled (owner gone, pool unmapped, shape mismatch)."""


class Transport(ABC):
    """One way of moving KV blocks; ``name`` is what leases record."""

    name: str = ""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Prefill side: what a puller needs to find this worker's pool (strings only)."""

    @abstractmethod
    def pull(self, lease: Lease) -> torch.Tensor:
        """Decode side: a copy of the leased blocks' KV rows, owned by the caller."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Drop mappings or connections."""
