"""The lease protocol: how a prefill worker hands KV blocks to a decode worker.

1. Prefill finishes a ``prefill_only`` request; the engine keeps its blocks.
2. Prefill writes ``lease:<request_id>`` (hash, TTL ``lease_ttl_s``) naming itself, the
   transport and its descriptor, the block ids, the token count and the first token, then sends
   the decode ticket.
3. Decode reads the lease, pulls the blocks, then deletes the key. A delete that removed
   nothing means the lease expired during the pull, so the blocks may have been reused and the
   copy is discarded. Leading blocks the decode engine has cached itself (a multi-turn
   conversation's earlier turns) are not pulled: it pulls :meth:`Lease.tail` only.
4. The owner frees the blocks of every lease whose key is gone (pulled, or expired).

A decode worker that finds no lease (or one of another attempt) re-prefills the request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from slaq.platform.keys import lease_key

if TYPE_CHECKING:  # the GPU check machine may lack redis-py; only LeaseStore needs a client
    import redis


@dataclass(slots=True)
class Lease:
    """KV blocks kept by ``prefill_worker`` for request ``request_id``, attempt ``attempt``."""

    request_id: str
    attempt: int
    prefill_worker: str
    transport: str
    block_ids: list[int]
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token_id: int
    expires_at: float  # Unix seconds; informative, the key's TTL is what counts
    descriptor: dict[str, str] = field(default_factory=dict)  # transport-specific

    def __post_init__(self) -> None:
        if not self.block_ids:
            raise ValueError("a lease needs at least one block")
        if self.num_tokens < 1:
            raise ValueError("num_tokens must be >= 1")

    def tail(self, num_skipped_blocks: int, block_size: int) -> Lease | None:
        """The same lease without its first ``num_skipped_blocks`` blocks (what a puller that
        has them cached copies), or None when nothing is left. Every transport pulls exactly
        ``block_ids``, so a pull of the tail moves only those bytes."""
        if num_skipped_blocks < 0 or block_size < 1:
            raise ValueError("need num_skipped_blocks >= 0 and block_size >= 1")
        if num_skipped_blocks == 0:
            return self
        if num_skipped_blocks >= len(self.block_ids):
            return None
        return replace(self, block_ids=self.block_ids[num_skipped_blocks:],
                       num_tokens=max(1, self.num_tokens - num_skipped_blocks * block_size))

    def to_mapping(self) -> dict[str, str]:
        return {
            "request_id": self.request_id, "attempt": str(self.attempt),
            "prefill_worker": self.prefill_worker, "transport": self.transport,
            "block_ids": json.dumps(self.block_ids), "num_tokens": str(self.num_tokens),
            "first_token_id": str(self.first_token_id), "expires_at": repr(self.expires_at),
            "descriptor": json.dumps(self.descriptor),
        }

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str] | Mapping[bytes, bytes]) -> Lease:
        raw = {_text(k): _text(v) for k, v in mapping.items()}
        try:
            return cls(
                request_id=raw["request_id"], attempt=int(raw["attempt"]),
                prefill_worker=raw["prefill_worker"], transport=raw["transport"],
                block_ids=[int(b) for b in json.loads(raw["block_ids"])],
                num_tokens=int(raw["num_tokens"]), first_token_id=int(raw["first_token_id"]),
                expires_at=float(raw["expires_at"]),
                descriptor={str(k): str(v) for k, v in json.loads(raw["descriptor"]).items()},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"malformed lease: {exc}") from exc


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


class LeaseStore:
    """Leases in Redis. Safe to share between threads (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("lease ttl must be > 0")
        self._r = client
        self.ttl_s = ttl_s

    def write(self, lease: Lease) -> None:
        """Create or replace the lease and (re)start its TTL."""
        key = lease_key(lease.request_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=lease.to_mapping())
        pipe.pexpire(key, max(1, int(self.ttl_s * 1000)))
        pipe.execute()

    def new_expiry(self) -> float:
        return time.time() + self.ttl_s

    def read(self, request_id: str) -> Lease | None:
        """The lease, or None when absent, expired or unreadable."""
        raw = self._r.hgetall(lease_key(request_id))
        if not raw:
            return None
        try:
            return Lease.from_mapping(raw)
        except ValueError:
            return None

    def release(self, request_id: str) -> bool:
        """Delete the lease (the owner may now free). False if it had already expired."""
        return bool(self._r.delete(lease_key(request_id)))

    def alive(self, refs: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which (request_id, attempt) leases still exist, in one round trip."""
        refs = list(refs)
        if not refs:
            return set()
        pipe = self._r.pipeline(transaction=False)
        for request_id, _ in refs:
            pipe.hget(lease_key(request_id), "attempt")
        attempts = pipe.execute()
        return {ref for ref, got in zip(refs, attempts, strict=True)
                if got is not None and int(got) == ref[1]}
