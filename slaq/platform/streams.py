"""Token streams: how workers hand generated tokens to the API.

One Redis Stream per request, key ``tok:<request_id>`` (see :mod:`slaq.platform.keys`). Each entry
is a delta with fields ``ids`` (JSON list of token ids), ``text`` (the detokenised text of those
ids, stop strings already removed), and on the last entry ``finish_reason`` (``stop`` | ``length``)
or ``error`` (a message). The last entry may also carry ``cached_tokens`` (prompt tokens served
from the prefix cache) so that the API can report usage without a ledger round trip.

Keys expire so that streams nobody reads do not pile up: every write refreshes a TTL, and the final
entry shortens it to :data:`FINISHED_TTL_S` (long enough for a slow reader to catch up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

from slaq.platform.keys import token_stream_key

# Lifetime of a stream that is still being written; each append pushes it forward.
STREAM_TTL_S = 3600
# How long a writer or a reader rides out a Redis that is unreachable (e.g. restarting)
# before giving up; a restart takes well under a second, a failover a few seconds.
REDIS_OUTAGE_S = 30.0
RETRY_PAUSE_S = 0.2
# While a reader waits with nothing arriving, it asks the ledger this often whether the request
# already ended (its final entry may have been lost with a Redis that restarted empty).
LEDGER_CHECK_S = 2.0
REDIS_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# Lifetime once the final entry is written.
FINISHED_TTL_S = 600
FINISH_REASONS = ("stop", "length")


class StreamTimeout(TimeoutError):
    """No entry arrived on a token stream within the allowed time."""


@dataclass(slots=True)
class TokenDelta:
    """One entry of a token stream."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int | None = None
    entry_id: str = field(default="", compare=False)
    # The whole generation's token count, when the delta comes from the ledger's final row
    # rather than the stream (never written to Redis).
    completion_tokens: int | None = field(default=None, compare=False)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def to_fields(self) -> dict[str, str]:
        fields = {"ids": json.dumps(self.token_ids), "text": self.text}
        if self.finish_reason is not None:
            fields["finish_reason"] = self.finish_reason
        if self.error is not None:
            fields["error"] = self.error
        if self.cached_tokens is not None:
            fields["cached_tokens"] = str(self.cached_tokens)
        return fields

    @classmethod
    def from_fields(cls, entry_id: str | bytes, raw: dict) -> TokenDelta:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        cached = fields.get("cached_tokens")
        return cls(
            token_ids=[int(i) for i in json.loads(fields.get("ids") or "[]")],
            text=fields.get("text", ""),
            finish_reason=fields.get("finish_reason") or None,
            error=fields.get("error") or None,
            cached_tokens=int(cached) if cached else None,
            entry_id=_text(entry_id),
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_entries(reply: list | dict) -> list:
    # redis-py answers [[key, entries]] with RESP2 and {key: [entries]} (or {key: entries},
    # depending on its version) with RESP3; entries are (id, fields) tuples.
    if isinstance(reply, dict):
        value = next(iter(reply.values()))
        return value[0] if value and isinstance(value[0], list) else value
    return reply[0][1]


def _write(r: redis.Redis, request_id: str, delta: TokenDelta) -> str:
    key = token_stream_key(request_id)
    ttl = FINISHED_TTL_S if delta.is_final else STREAM_TTL_S
    give_up = time.monotonic() + REDIS_OUTAGE_S
    while True:
        try:
            pipe = r.pipeline(transaction=True)
            pipe.xadd(key, delta.to_fields())
            pipe.expire(key, ttl)
            entry_id, _ = pipe.execute()
            return _text(entry_id)
        except REDIS_DOWN_ERRORS:
            # A generation outlives a Redis restart: wait for it rather than fail the request
            # (at worst an entry is written twice, which readers tolerate).
            if time.monotonic() >= give_up:
                raise
            time.sleep(RETRY_PAUSE_S)


def append_tokens(r: redis.Redis, request_id: str, token_ids: list[int], text: str, *,
                  finish_reason: str | None = None,
                  cached_tokens: int | None = None) -> str:
    """Append a delta (and, with ``finish_reason``, end the stream); returns the entry id."""
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    delta = TokenDelta(list(token_ids), text, finish_reason=finish_reason,
                       cached_tokens=cached_tokens)
    return _write(r, request_id, delta)


def append_error(r: redis.Redis, request_id: str, message: str) -> str:
    """End the stream with an error the API forwards to the client."""
    if not message:
        raise ValueError("error message must be non-empty")
    return _write(r, request_id, TokenDelta([], "", error=message))


def read_tokens(r: redis.Redis, request_id: str, after: str = "0-0", *,
                block_ms: int | None = None, count: int | None = None) -> list[TokenDelta]:
    """Entries after entry id ``after``; with ``block_ms`` wait that long for the first one."""
    key = token_stream_key(request_id)
    reply = r.xread({key: after}, count=count, block=block_ms)
    if not reply:
        return []
    entries = _stream_entries(reply)
    return [TokenDelta.from_fields(entry_id, fields) for entry_id, fields in entries]


def follow_tokens(r: redis.Redis, request_id: str, *, idle_timeout_s: float,
                  block_ms: int = 1000,
                  final_row: Callable[[str], TokenDelta | None] | None = None
                  ) -> Iterator[TokenDelta]:
    """Yield deltas as they arrive until the final one (included).

    Raises :class:`StreamTimeout` when nothing arrives for ``idle_timeout_s`` seconds. Blocking
    reads are short (``block_ms``) so that a closed generator frees its connection promptly.

    A Redis that goes away is waited for (up to :data:`REDIS_OUTAGE_S`). A Redis restarted
    without persistence has lost the stream, perhaps its final entry: ``final_row(text_so_far)``
    — the request's end as the ledger records it, or None while it is still running — is asked
    after every outage and every :data:`LEDGER_CHECK_S` without an entry; what it returns is
    yielded as the final delta.
    """
    after = "0-0"
    text_so_far: list[str] = []
    last_progress = last_check = time.monotonic()
    down_since: float | None = None
    while True:
        try:
            deltas = read_tokens(r, request_id, after, block_ms=block_ms)
        except REDIS_DOWN_ERRORS:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > REDIS_OUTAGE_S:
                raise
            time.sleep(RETRY_PAUSE_S)
            continue
        if down_since is not None:
            # Entries written before the outage may be gone: time the idleness from now.
            down_since, last_progress, last_check = None, time.monotonic(), 0.0
        if not deltas:
            now = time.monotonic()
            if final_row is not None and now - last_check >= LEDGER_CHECK_S:
                last_check = now
                final = final_row("".join(text_so_far))
                if final is not None:
                    yield final
                    return
            if now - last_progress > idle_timeout_s:
                raise StreamTimeout(f"no tokens for request {request_id} in {idle_timeout_s}s")
            continue
        last_progress = last_check = time.monotonic()
        for delta in deltas:
            text_so_far.append(delta.text)
            yield delta
            if delta.is_final:
                return
        after = deltas[-1].entry_id


def delete_stream(r: redis.Redis, request_id: str) -> None:
    """Drop a stream (e.g. after a retried request restarts from scratch)."""
    r.delete(token_stream_key(request_id))
