"""Redis key names, in one place, so that writers and readers cannot drift apart.

One Redis serves the broker, heartbeats, leases and token streams; these names never collide with
kombu's own keys (``_kombu.*``, ``unacked*`` and the queue names ``prefill.*`` / ``decode.*``).

| key | type | writer → reader |
| --- | --- | --- |
| ``tok:<request_id>`` | stream | workers → API |
| ``hb:<worker>`` | hash + TTL | every worker → router, reprioritiser |
| ``lease:<request_id>`` | hash + TTL | prefill worker → decode worker |
| ``gates`` | hash ``<role>:<tier>`` → ``open`` / ``closed`` | reprioritiser → workers |
| ``routing`` | hash ``<worker>`` → weight | reprioritiser → prefill workers |
| ``admission`` | hash ``<tier>`` → JSON state | reprioritiser → API |
"""

from __future__ import annotations

TOKEN_STREAM_PREFIX = "tok:"
HEARTBEAT_PREFIX = "hb:"
LEASE_PREFIX = "lease:"

# For SCAN MATCH: every live worker's heartbeat.
HEARTBEAT_PATTERN = HEARTBEAT_PREFIX + "*"


def token_stream_key(request_id: str) -> str:
    """The Redis Stream that carries one request's tokens to the API."""
    return f"{TOKEN_STREAM_PREFIX}{request_id}"


def heartbeat_key(worker: str) -> str:
    """The hash a worker refreshes with its KV pressure; ``heartbeat_key("*")`` is a pattern."""
    return f"{HEARTBEAT_PREFIX}{worker}"


def worker_from_heartbeat_key(key: str | bytes) -> str:
    """Inverse of :func:`heartbeat_key` (accepts what SCAN returns)."""
    text = key.decode() if isinstance(key, bytes) else key
    if not text.startswith(HEARTBEAT_PREFIX):
        raise ValueError(f"not a heartbeat key: {text!r}")
    return text[len(HEARTBEAT_PREFIX):]


def cancel_key(request_id: str) -> str:
    """Set by the API when a client goes away; the decoding worker aborts the request."""
    return f"cancel:{request_id}"


def lease_key(request_id: str) -> str:
    """The hash describing KV blocks a prefill worker holds for a decode worker."""
    return f"{LEASE_PREFIX}{request_id}"


def gates_key() -> str:
    """Hash of per-(role, tier) gates; field ``f"{role}:{tier}"``, value ``open`` | ``closed``."""
    return "gates"


def routing_key() -> str:
    """Hash of decode routing weights; field = worker name, value = weight (float as text)."""
    return "routing"


def admission_key() -> str:
    """Hash of per-tier admission state the API reads (predicted TTFT, refuse/downgrade)."""
    return "admission"
