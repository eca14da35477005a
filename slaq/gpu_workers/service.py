"""What a prefill or decode ticket does, given a worker's engine loop (the tasks are thin).

Prefill (``slaq.prefill``): claim queued→prefilling; run the prompt; publish the first token;
finish here if that already ends the request; otherwise lease the KV blocks and send the decode
ticket to the least-pressured decode worker. A ``both`` worker instead keeps decoding in its
own engine (no transfer).

Decode (``slaq.decode``): claim prefilling→decoding; pin the prompt's leading blocks the
decode engine has cached itself (an earlier turn of the conversation), pull the other leased
blocks and delete the lease; stream the remaining tokens; finish in the ledger. No lease →
re-prefill.

Routing: the prefill side sends the decode ticket to the worker :class:`DecodeRouter` picks
from the prompt's block hashes (prefix affinity, :mod:`slaq.platform.affinity`) and pressure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from slaq.gpu_workers.engine.block_manager import block_hashes
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.outputs import RequestOutput
from slaq.gpu_workers.engine_loop import EngineLoop, EngineLoopError, HandoffRetry
from slaq.gpu_workers.kv_transfer.base import TransferError, Transport
from slaq.gpu_workers.kv_transfer.lease import Lease, LeaseStore
from slaq.gpu_workers.router import DecodeRouter
from slaq.platform import streams
from slaq.platform.keys import cancel_key
from slaq.platform.tiers import TierTable

log = logging.getLogger(__name__)

# How long a task waits for the next output of its request before giving up.
OUTPUT_TIMEOUT_S = 600.0
# How often a decoding request checks whether its client cancelled it.
CANCEL_CHECK_INTERVAL_S = 0.5
# Attempts after which a request whose KV keeps getting lost fails instead of re-prefilling.
MAX_ATTEMPTS = 5
# Under the fifo policy every sequence gets this one rank (the engine then orders by arrival
# only, as the simulator's fifo does) and every decode ticket the default message priority.
FIFO_RANK = 1


@dataclass(slots=True)
class WorkItem:
    """What a worker needs from a ledger row."""

    request_id: str
    attempt: int
    tier: str
    prompt_token_ids: list[int]
    params: SamplingParams
    rank: int
    queue_priority: int
    first_token_streamed: bool  # an earlier attempt already sent the client a first token


class SqlLedger:
    """The ledger operations a worker uses, each in its own short session.

    ``fifo``: the work items it loads carry no tier order (one rank, one ticket priority)."""

    def __init__(self, database_url: str, tiers: TierTable, *, fifo: bool = False) -> None:
        from slaq.platform.db import session_factory

        self._sessions = session_factory(database_url)
        self._tiers = tiers
        self._fifo = fifo

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._sessions() as session:
            return fn(session, *args, **kwargs)

    def load(self, request_id: str) -> WorkItem:
        from slaq.platform.ledger import get_request

        row = self._run(get_request, request_id)
        if row is None:
            raise LookupError(f"request {request_id} is not in the ledger")
        tier = self._tiers[row.tier_used]
        rank, queue_priority = tier.rank, tier.queue_priority
        if self._fifo:
            from slaq.tasks.config import DEFAULT_PRIORITY

            rank, queue_priority = FIFO_RANK, DEFAULT_PRIORITY
        return WorkItem(request_id=row.id, attempt=row.attempt, tier=row.tier_used,
                        prompt_token_ids=list(row.prompt_token_ids),
                        params=SamplingParams.from_dict(row.params or {}), rank=rank,
                        queue_priority=queue_priority,
                        first_token_streamed=row.first_token_at is not None)

    def start_prefill(self, request_id: str, attempt: int, worker: str) -> bool:
        from slaq.platform.ledger import start_prefill

        return self._run(start_prefill, request_id, attempt, worker)

    def record_first_token(self, request_id: str, attempt: int, worker: str) -> bool:
        from slaq.platform.ledger import record_first_token

        return self._run(record_first_token, request_id, attempt, worker)

    def start_decode(self, request_id: str, attempt: int, worker: str) -> bool:
        from slaq.platform.ledger import start_decode

        return self._run(start_decode, request_id, attempt, worker)

    def finish(self, request_id: str, attempt: int, *, output_text: str, finish_reason: str,
               completion_tokens: int, cached_tokens: int, worker: str) -> bool:
        from slaq.platform.ledger import finish_request

        return self._run(finish_request, request_id, attempt, output_text=output_text,
                         finish_reason=finish_reason, completion_tokens=completion_tokens,
                         cached_tokens=cached_tokens, worker=worker)

    def fail(self, request_id: str, attempt: int, error: str) -> bool:
        from slaq.platform.ledger import fail_request

        return self._run(fail_request, request_id, attempt, error)

    def retry(self, request_id: str, attempt: int, reason: str) -> int | None:
        from slaq.platform.ledger import retry

        return self._run(retry, request_id, attempt, reason)


@dataclass(slots=True)
class Outcome:
    """What a ticket did; tasks return ``str(outcome)`` for logs and tests."""

    action: str  # dropped | finished | handed_off | retried | cancelled
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action}: {self.detail}" if self.detail else self.action


@dataclass(slots=True)
class _Progress:
    """Tokens and text produced so far for one request (for the ledger's final row)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


def engine_request_id(request_id: str, attempt: int) -> str:
    # An attempt gets its own engine id: a re-prefill may land where the old attempt's leased
    # blocks are still waiting to be freed.
    return f"{request_id}#{attempt}"


def _api_finish_reason(reason: str | None) -> str:
    # The API speaks OpenAI's vocabulary (stop | length).
    return reason if reason in streams.FINISH_REASONS else "stop"


class WorkerService:
    """The prefill and decode flows of one worker process."""

    def __init__(self, *, name: str, role: str, loop: EngineLoop, ledger: SqlLedger,
                 redis_client: redis.Redis, leases: LeaseStore, transport: Transport,
                 pullers: dict[str, Transport], router: DecodeRouter,
                 send_prefill: Callable[[str, int, str], None],
                 send_decode: Callable[..., None]) -> None:
        if role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be prefill, decode or both, got {role!r}")
        self.name = name
        self.role = role
        self.loop = loop
        self.ledger = ledger
        self.r = redis_client
        self.leases = leases
        self.transport = transport
        self.pullers = pullers
        self.router = router
        self._send_prefill = send_prefill
        self._send_decode = send_decode

    # -- prefill ----------------------------------------------------------------------
    def prefill(self, request_id: str, attempt: int) -> Outcome:
        """Handle a prefill ticket (idempotent: a ticket that cannot claim does nothing)."""
        if not self.ledger.start_prefill(request_id, attempt, self.name):
            return Outcome("dropped", "stale or duplicate prefill ticket")
        item = self.ledger.load(request_id)
        eid = engine_request_id(request_id, attempt)
        try:
            if self.role == "both":
                return self._prefill_and_decode(item, attempt, eid)
            return self._prefill_only(item, attempt, eid)
        except Exception as exc:
            self._abandon(eid)
            self._fail(item, attempt, exc)
            raise

    def _prefill_only(self, item: WorkItem, attempt: int, eid: str) -> Outcome:
        handle = self.loop.add_request(eid, item.prompt_token_ids, item.params, rank=item.rank,
                                       prefill_only=True)
        progress = _Progress()
        for out in handle.outputs(OUTPUT_TIMEOUT_S):
            progress.add(out)
        done = progress.finish_reason in ("stop", "length", "abort")
        self._publish_first(item, attempt, progress, final=done)
        if done:  # the engine already freed the blocks of a finished request
            return Outcome("finished", "at the first token")
        lease = self._lease(item, attempt, eid, progress)  # on failure prefill() aborts eid
        target = self.router.pick(prefix_hashes=self._prefix_hashes(item.prompt_token_ids),
                                  num_blocks=len(lease.block_ids))
        self._send_decode(item.request_id, attempt, target, priority=item.queue_priority)
        return Outcome("handed_off", f"{len(lease.block_ids)} blocks to {target or 'decode.any'}")

    def _prefix_hashes(self, prompt_token_ids: list[int]) -> list[int]:
        # The chain hashes decode workers' prefix caches use (same block size on both sides:
        # a hand-off moves whole blocks). The config is frozen: safe to read off the loop.
        block_size = self.loop.engine.config.cache.block_size
        return block_hashes(prompt_token_ids, block_size)

    def _lease(self, item: WorkItem, attempt: int, eid: str, progress: _Progress) -> Lease:
        block_ids = self.loop.call(lambda e: list(e.leased_blocks(eid)))
        lease = Lease(request_id=item.request_id, attempt=attempt, prefill_worker=self.name,
                      transport=self.transport.name, block_ids=block_ids,
                      num_tokens=len(item.prompt_token_ids),
                      first_token_id=progress.token_ids[0], expires_at=self.leases.new_expiry(),
                      descriptor={**self.transport.describe(), "first_text": progress.text,
                                  "cached_tokens": str(progress.num_cached_tokens)})
        self.leases.write(lease)
        self.loop.hold_lease(eid, (item.request_id, attempt))
        return lease

    def _prefill_and_decode(self, item: WorkItem, attempt: int, eid: str) -> Outcome:
        handle = self.loop.add_request(eid, item.prompt_token_ids, item.params, rank=item.rank)
        outputs = handle.outputs(OUTPUT_TIMEOUT_S)
        progress = _Progress()
        for out in outputs:
            progress.add(out)
            if progress.token_ids or progress.finish_reason:
                break
        final = progress.finish_reason is not None
        self._publish_first(item, attempt, progress, final=final)
        if not final:
            if not self.ledger.start_decode(item.request_id, attempt, self.name):
                self.loop.abort(eid)
                return Outcome("dropped", "the request moved on before decoding")
            if not self._stream(item, attempt, outputs, progress):
                return _cancelled(progress)
        return Outcome("finished", f"{len(progress.token_ids)} tokens")

    def _publish_first(self, item: WorkItem, attempt: int, progress: _Progress,
                       final: bool) -> None:
        self.ledger.record_first_token(item.request_id, attempt, self.name)
        # After a re-prefill the client already holds a first token; do not send it twice.
        ids, text = ([], "") if item.first_token_streamed else (progress.token_ids, progress.text)
        if final:
            self._finish(item, attempt, progress, ids, text)
        elif ids:
            streams.append_tokens(self.r, item.request_id, ids, text)

    # -- decode -----------------------------------------------------------------------
    def decode(self, request_id: str, attempt: int) -> Outcome:
        """Handle a decode ticket: pull the leased KV (less what is cached here), stream the
        rest, finish."""
        if not self.ledger.start_decode(request_id, attempt, self.name):
            return Outcome("dropped", "stale or duplicate decode ticket")
        item = self.ledger.load(request_id)
        eid = engine_request_id(request_id, attempt)
        try:
            pulled = self._pull(item, attempt, eid)
            if pulled is None:
                return self._re_prefill(item, attempt, "kv lease lost")
            kv, lease, reused = pulled
            cached = int(lease.descriptor.get("cached_tokens", "0") or 0)
            handle = self.loop.add_prefilled_request(  # on failure _abandon unpins
                eid, item.prompt_token_ids, lease.first_token_id, item.params, kv,
                rank=item.rank, num_cached_tokens=cached)
            progress = _Progress(token_ids=[lease.first_token_id],
                                 text=lease.descriptor.get("first_text", ""),
                                 num_cached_tokens=cached)
            try:
                done = self._stream(item, attempt, handle.outputs(OUTPUT_TIMEOUT_S), progress)
            except HandoffRetry as exc:  # dropped before it ever ran: nothing was streamed
                log.warning("%s", exc)
                return self._re_prefill(item, attempt, "no room on the decode worker")
            if not done:
                return _cancelled(progress)
            return Outcome("finished", f"{len(progress.token_ids)} tokens; "
                                       f"{reused} of {len(lease.block_ids)} KV blocks cached here")
        except Exception as exc:
            self._abandon(eid)
            self._fail(item, attempt, exc)
            raise

    def _re_prefill(self, item: WorkItem, attempt: int, reason: str) -> Outcome:
        """Give the request a new attempt from the prefill queue (a hand-off that could not
        be completed here); fails it after :data:`MAX_ATTEMPTS`."""
        if attempt >= MAX_ATTEMPTS:
            raise TransferError(f"KV hand-off failed {attempt} times ({reason})")
        new_attempt = self.ledger.retry(item.request_id, attempt, reason)
        if new_attempt is None:
            return Outcome("dropped", "the request moved on")
        self._send_prefill(item.request_id, new_attempt, item.tier)
        return Outcome("retried", f"{reason}; re-prefill as attempt {new_attempt}")

    def _abandon(self, eid: str) -> None:
        """Drop a failed attempt from the engine (a hand-off still waiting for room, a
        request whose outputs timed out): otherwise it runs, or holds its pins, for nobody."""
        try:
            self.loop.abort(eid)
        except Exception:  # noqa: BLE001 - a dead loop holds nothing any more
            log.debug("could not abort %s", eid, exc_info=True)

    def _pull(self, item: WorkItem, attempt: int,
              eid: str) -> tuple[Any, Lease, int] | None:
        """``(kv, lease, reused)``: the leased KV past the ``reused`` leading blocks pinned in
        this engine's prefix cache (kv None when every block was), or None when the lease is
        gone or the pull failed (nothing stays pinned then)."""
        lease = self.leases.read(item.request_id)
        if lease is None or lease.attempt != attempt:
            return None
        puller = self.pullers.get(lease.transport)
        if puller is None:
            raise TransferError(f"this worker cannot pull over {lease.transport!r}")
        pulled = False  # until then, any way out gives the pins back
        try:
            # In the try: a reserve whose call timed out may still pin after it, and the
            # unpin queued behind it on the loop gives those pins back.
            reused = self._reserve(eid, item, lease)
            part = lease.tail(reused, self.loop.engine.config.cache.block_size)
            try:
                kv = None if part is None else puller.pull(part)
            except Exception:  # noqa: BLE001 - any failed copy: the prompt is prefilled again
                # A TransferError (the owner died, ids out of range) or anything the copy
                # raised: re-prefilling (bounded by MAX_ATTEMPTS) loses nothing, and releasing
                # the lease lets the owner free its blocks now, not when the lease expires.
                log.warning("pull of %s from %s failed; re-prefilling", item.request_id,
                            lease.prefill_worker, exc_info=True)
                self.leases.release(item.request_id)
                return None
            # Deleting the lease is what lets the owner free the blocks. If it had expired
            # meanwhile, the owner may have reused them during our copy: discard it.
            if not self.leases.release(item.request_id):
                return None
            pulled = True
        finally:
            if not pulled:
                self._unpin(eid)
        return kv, lease, reused

    def _reserve(self, eid: str, item: WorkItem, lease: Lease) -> int:
        """Pin the leading leased blocks this engine has cached; how many (0 when the lease's
        blocks are not this engine's block size, whose hashes would not match)."""
        block_size = self.loop.engine.config.cache.block_size
        if len(lease.block_ids) != -(-len(item.prompt_token_ids) // block_size):
            return 0
        return self.loop.reserve_prefix(eid, item.prompt_token_ids)

    def _unpin(self, eid: str) -> None:
        try:
            self.loop.release_prefix(eid)
        except Exception:  # noqa: BLE001 - a stopped loop has no pins to give back
            log.debug("could not release the pins of %s", eid, exc_info=True)

    def _stream(self, item: WorkItem, attempt: int, outputs: Iterator[RequestOutput],
                progress: _Progress) -> bool:
        """Append each delta to the token stream; the last one goes out after the ledger.
        True once finished; False when it stopped early because the API cancelled the
        request (its client went away)."""
        next_check = time.monotonic() + CANCEL_CHECK_INTERVAL_S
        for out in outputs:
            progress.add(out)
            if not out.finished and time.monotonic() >= next_check:
                next_check = time.monotonic() + CANCEL_CHECK_INTERVAL_S
                if self._cancelled(item.request_id):
                    self.loop.abort(engine_request_id(item.request_id, attempt))
                    log.info("request %s cancelled by its client", item.request_id)
                    return False
            if out.finished:
                self._finish(item, attempt, progress, out.new_token_ids, out.new_text)
                return True
            if out.new_token_ids or out.new_text:
                streams.append_tokens(self.r, item.request_id, out.new_token_ids, out.new_text)
        raise EngineLoopError(f"request {item.request_id}: outputs ended before it finished")

    def _cancelled(self, request_id: str) -> bool:
        try:
            return bool(self.r.exists(cancel_key(request_id)))
        except redis.RedisError:  # Redis restarting: ask again at the next check
            return False

    # -- endings ----------------------------------------------------------------------
    def _finish(self, item: WorkItem, attempt: int, progress: _Progress,
                last_ids: list[int], last_text: str) -> None:
        """Finish in the ledger, then end the stream: a client that saw the end finds the row
        finished."""
        reason = _api_finish_reason(progress.finish_reason)
        if not self.ledger.finish(item.request_id, attempt, output_text=progress.text,
                                  finish_reason=reason, completion_tokens=len(progress.token_ids),
                                  cached_tokens=progress.num_cached_tokens, worker=self.name):
            log.warning("request %s attempt %s was taken from %s before it finished",
                        item.request_id, attempt, self.name)
        streams.append_tokens(self.r, item.request_id, last_ids, last_text,
                              finish_reason=reason, cached_tokens=progress.num_cached_tokens)

    def _fail(self, item: WorkItem, attempt: int, exc: BaseException) -> None:
        log.error("request %s attempt %s failed on %s: %s", item.request_id, attempt,
                  self.name, exc, exc_info=exc)
        message = f"{type(exc).__name__}: {exc}"
        try:
            if self.ledger.fail(item.request_id, attempt, message):
                streams.append_error(self.r, item.request_id, message)
        except Exception:  # noqa: BLE001 - the original error matters more
            log.exception("could not record the failure of %s", item.request_id)


_current: WorkerService | None = None
_current_lock = threading.Lock()


def set_current(service: WorkerService | None) -> None:
    """Install the process's service (the worker does this before consuming)."""
    global _current
    with _current_lock:
        _current = service


def current() -> WorkerService:
    """The process's service; tasks fail loudly in a process that is not a slaq worker."""
    if _current is None:
        raise RuntimeError("no slaq worker service in this process (run `slaq worker`)")
    return _current


def _cancelled(progress: _Progress) -> Outcome:
    """The outcome of a request whose client cancelled it while it streamed."""
    return Outcome("cancelled", f"by its client after {len(progress.token_ids)} tokens")
