"""One thread that owns an ``LLMEngine``; Celery task threads submit work and wait.

The engine is not thread-safe, so every touch of it (adding requests, reading or freeing
blocks, stats) runs on the loop thread: callers enqueue a command and wait on a future, and
each request's outputs arrive on its own queue. Requests submitted while others run join the
next step, which is what makes concurrent tickets share batches (continuous batching).

The loop also keeps the prefill side of the lease protocol: blocks held for a decode worker
are freed once their lease is gone (pulled, or expired), checked every
``lease_check_interval_s``. On the decode side, :meth:`EngineLoop.reserve_prefix` pins the
blocks of a coming hand-off's prompt that the engine has cached, before the pull, so that only
the rest is pulled; the pin lasts until the request is added (however long it waits for room),
aborted or released. Pinning and adding both run on the loop thread, and a pinned block holds
a reference, so no step in between can evict it.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.outputs import RequestOutput
from slaq.gpu_workers.engine.scheduler import NoRoomError

log = logging.getLogger(__name__)

T = TypeVar("T")
LeaseAlive = Callable[[list[Hashable]], set[Hashable]]

RECENT_WINDOW = 64  # requests whose TTFT/TPOT make up the "recent" means


class EngineLoopError(RuntimeError):
    """The loop is stopped or the engine failed; the request cannot complete here."""


class HandoffRetry(EngineLoopError):
    """A hand-off waited for room that nothing here would free (no request runs and the
    blocks it lacks are pinned for other waiting hand-offs, or held by waiting sequences that
    cannot get in either): it was dropped, its pins given back, and the request should be
    prefilled again (a new attempt) rather than failed."""


@dataclass(slots=True)
class LoopStats:
    """What the loop adds to the engine's own stats (for heartbeats)."""

    num_leases: int = 0
    num_leased_blocks: int = 0
    num_reserved_blocks: int = 0  # prefilled requests waiting for room
    last_batch_size: int = 0
    max_batch_size: int = 0
    num_steps: int = 0
    num_finished: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(slots=True)
class _Pending:
    """A prefilled request waiting for a seat and blocks."""

    request_id: str
    add: Callable[[Any], None]
    num_blocks: int
    rank: int


class RequestHandle:
    """The outputs of one engine request, as the loop produces them."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        self.submitted_at = time.monotonic()
        self.first_output_at: float | None = None

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def outputs(self, timeout_s: float) -> Iterator[RequestOutput]:
        """Yield outputs until the finished one (included).

        Raises :class:`EngineLoopError` if the engine fails or nothing comes for ``timeout_s``
        (:class:`HandoffRetry` for a hand-off sent back to be prefilled again).
        """
        while True:
            try:
                item = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                raise EngineLoopError(
                    f"request {self.request_id}: no output for {timeout_s}s") from None
            if isinstance(item, EngineLoopError):
                raise item  # already says which request, and its kind matters (HandoffRetry)
            if isinstance(item, BaseException):
                raise EngineLoopError(f"request {self.request_id}: {item}") from item
            yield item
            if item.finished:
                return


class EngineLoop:
    """Runs ``engine.step()`` on a dedicated thread while there is work."""

    def __init__(self, engine: Any, *, lease_alive: LeaseAlive | None = None,
                 lease_check_interval_s: float = 0.1, name: str = "engine-loop",
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._on_failure = on_failure
        self._lease_alive = lease_alive
        self._lease_check_interval_s = lease_check_interval_s
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}
        self._leases: dict[str, Hashable] = {}  # engine request id -> lease ref
        self._pending: collections.deque[_Pending] = collections.deque()
        self._ttft_ms: collections.deque[float] = collections.deque(maxlen=RECENT_WINDOW)
        self._tpot_ms: collections.deque[float] = collections.deque(maxlen=RECENT_WINDOW)
        self._stats = LoopStats()
        self._engine_stats: Any = None
        self._stop = threading.Event()
        self._closed = False  # the loop has ended: requests are refused
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._engine_stats = self.engine.stats()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(lambda: None)  # wake an idle loop
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # -- API for task threads -----------------------------------------------------------
    def call(self, fn: Callable[[Any], T], timeout_s: float = 60.0) -> T:
        """Run ``fn(engine)`` on the loop thread and return its result. On ``TimeoutError``
        a command that had not started is cancelled."""
        fut: Future[T] = Future()

        def command() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)

        self._submit(command)
        try:
            return fut.result(timeout_s)
        except TimeoutError:
            # Not started yet: it never will (a late reserve_prefix would pin for nobody).
            # Already running: it completes, and whatever the caller queues next runs after.
            fut.cancel()
            raise

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, *, rank: int = 1,
                    prefill_only: bool = False) -> RequestHandle:
        """Queue a request; its outputs arrive on the returned handle."""
        def add(engine: Any) -> None:
            engine.add_request(request_id, prompt_token_ids, params, rank=rank,
                               prefill_only=prefill_only)

        return self._add(request_id, add)

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int],
                              first_token_id: int, params: SamplingParams, kv: Any, *,
                              rank: int = 1, num_cached_tokens: int = 0) -> RequestHandle:
        """Queue a request whose prompt KV (and first token) came from a prefill worker.

        ``kv``: the blocks after those :meth:`reserve_prefix` pinned (None when all were), or
        all of them. When the engine has no seat or blocks for it yet, it waits (its blocks
        count as reserved) and is admitted as soon as running requests free enough. A request
        that fails or is aborted before it is added gives its pinned blocks back.
        """
        def add(engine: Any) -> None:
            engine.add_prefilled_request(request_id, prompt_token_ids, first_token_id, params,
                                         kv, rank=rank, num_cached_tokens=num_cached_tokens)

        handle = RequestHandle(request_id)

        def enqueue(_engine: Any) -> None:
            self._check_new(request_id)
            self._handles[request_id] = handle
            # Tier order, then arrival: a waiting priority request takes the first room freed.
            i = next((i for i, p in enumerate(self._pending) if p.rank > rank),
                     len(self._pending))
            num_blocks = 0 if kv is None else int(kv.shape[2])
            self._pending.insert(i, _Pending(request_id, add, num_blocks, rank))
            self._admit_pending()

        self.call(enqueue)
        return handle

    def reserve_prefix(self, request_id: str, prompt_token_ids: list[int]) -> int:
        """Pin the cached leading blocks of a coming hand-off's prompt; how many (their KV
        need not be pulled). :meth:`add_prefilled_request` with the same id takes them over;
        call :meth:`release_prefix` if the hand-off does not happen."""
        def pin(engine: Any) -> int:
            self._check_new(request_id)
            return int(engine.reserve_prefix(request_id, prompt_token_ids))

        return self.call(pin)

    def release_prefix(self, request_id: str) -> None:
        """Give back what :meth:`reserve_prefix` pinned (a no-op once the request was added)."""
        self.call(lambda engine: engine.release_prefix(request_id))

    def abort(self, request_id: str) -> None:
        """Stop a request and drop its blocks (leased and pinned ones too); unknown ids are
        ignored."""
        def do(engine: Any) -> None:
            self._handles.pop(request_id, None)
            self._leases.pop(request_id, None)
            # A hand-off still waiting leaves the queue now, not when it reaches the head:
            # until then its blocks would count as reserved in the heartbeats.
            for pending in [p for p in self._pending if p.request_id == request_id]:
                self._pending.remove(pending)
            engine.abort(request_id)  # also frees a leased request's blocks and pins

        self.call(do)

    def hold_lease(self, request_id: str, ref: Hashable) -> None:
        """Keep ``request_id``'s blocks until ``lease_alive`` stops reporting ``ref``."""
        self.call(lambda _engine: self._leases.__setitem__(request_id, ref))

    def stats(self) -> tuple[Any, LoopStats]:
        """The engine's last stats and the loop's (snapshots, safe to read from any thread)."""
        s = self._stats
        ttft = list(self._ttft_ms)
        tpot = list(self._tpot_ms)
        snapshot = LoopStats(
            num_leases=len(self._leases), num_leased_blocks=s.num_leased_blocks,
            num_reserved_blocks=sum(p.num_blocks for p in list(self._pending)),
            last_batch_size=s.last_batch_size, max_batch_size=s.max_batch_size,
            num_steps=s.num_steps, num_finished=s.num_finished,
            ttft_ms=sum(ttft) / len(ttft) if ttft else None,
            tpot_ms=sum(tpot) / len(tpot) if tpot else None)
        return self._engine_stats, snapshot

    # -- internals --------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        if self._error is not None:
            raise EngineLoopError(f"engine failed: {self._error}")
        if self._stop.is_set():
            raise EngineLoopError("engine loop stopped")
        self._commands.put(command)

    def _add(self, request_id: str, add: Callable[[Any], None]) -> RequestHandle:
        handle = RequestHandle(request_id)

        def do(engine: Any) -> None:
            self._check_new(request_id)
            add(engine)
            self._handles[request_id] = handle

        self.call(do)
        return handle

    def _check_new(self, request_id: str) -> None:
        if self._closed:
            # Queued just before the loop ended: no step would ever serve it.
            raise EngineLoopError(f"engine loop stopped; {request_id} not added")
        if request_id in self._handles or request_id in self._leases:
            raise ValueError(f"request {request_id} is already in this engine")

    def _admit_pending(self) -> None:
        """Admit waiting prefilled requests, most important tier first, while they fit."""
        while self._pending:
            pending = self._pending[0]
            if self._handles.get(pending.request_id) is None:  # aborted while waiting
                self._pending.popleft()
                self.engine.release_prefix(pending.request_id)
                continue
            try:
                pending.add(self.engine)
            except NoRoomError as exc:
                if self.engine.can_progress() or self._leases:
                    return  # running requests (or leases ending) will free room
                # Nothing runs, and the waiting sequences cannot get in either. Blocks pinned
                # for other hand-offs may be what it lacks: one queued behind it that fits goes
                # first (it finishes and gives them back), and pins of pulls still in flight
                # end soon (added or released).
                if self._admit_one_behind():
                    continue
                others = self.engine.pinned_requests() - {pending.request_id}
                if others - {p.request_id for p in self._pending}:
                    return
                # Nothing here would free its room (the pool could hold it: that is checked
                # on add): give its pins back, which may be what the others lack, and let
                # the request be prefilled again.
                self._drop_head(HandoffRetry(f"request {pending.request_id}: {exc}; "
                                             f"nothing running here would free room"))
                continue
            except Exception as exc:  # noqa: BLE001 - belongs to that request only
                self._drop_head(exc)
                continue
            self._pending.popleft()

    def _admit_one_behind(self) -> bool:
        """Admit the first waiting request after the head that fits now; whether one did."""
        for pending in list(self._pending)[1:]:
            if pending.request_id not in self._handles:
                continue  # aborted: dropped when it reaches the head
            try:
                pending.add(self.engine)
            except NoRoomError:
                continue
            except Exception as exc:  # noqa: BLE001 - belongs to that request only
                self._drop(pending, exc)
                continue
            self._pending.remove(pending)
            return True
        return False

    def _drop_head(self, exc: BaseException) -> None:
        self._drop(self._pending[0], exc)

    def _drop(self, pending: _Pending, exc: BaseException) -> None:
        """Fail a waiting request: out of the queue, its pins given back, ``exc`` to its caller."""
        self._pending.remove(pending)
        handle = self._handles.pop(pending.request_id)
        self.engine.release_prefix(pending.request_id)
        handle._put(exc)

    def _run(self) -> None:
        next_lease_check = 0.0
        try:
            while not self._stop.is_set():
                # Waiting sequences that cannot get in do not make the loop busy: stepping
                # would spin; a command (a hand-off, an abort) or a lease check changes that.
                busy = self.engine.can_progress()
                self._drain_commands(block_s=None if busy else self._lease_check_interval_s)
                self._admit_pending()
                if self.engine.can_progress():
                    self._step()
                now = time.monotonic()
                if now >= next_lease_check:
                    next_lease_check = now + self._lease_check_interval_s
                    self._release_leases()
                    self._engine_stats = self.engine.stats()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter
            log.exception("engine loop failed")
            self._error = exc
            for handle in list(self._handles.values()):
                handle._put(exc)
            self._handles.clear()
            if self._on_failure is not None:
                self._on_failure(exc)
        finally:
            self._fail_pending_commands()

    def _drain_commands(self, block_s: float | None) -> None:
        try:
            command = (self._commands.get(timeout=block_s) if block_s
                       else self._commands.get_nowait())
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending_commands(self) -> None:
        # Commands queued after the loop ended run here so that their futures answer: the
        # engine is no longer stepped, so they must not wait for outputs, and a request
        # they would add is refused (_check_new) instead of getting a handle nobody serves.
        self._closed = True
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("command failed after loop stop", exc_info=True)

    def _step(self) -> None:
        outs = self.engine.step()
        self._stats.num_steps += 1
        if outs:
            self._stats.last_batch_size = len(outs)
            self._stats.max_batch_size = max(self._stats.max_batch_size, len(outs))
        now = time.monotonic()
        for out in outs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            if handle.first_output_at is None and out.new_token_ids:
                handle.first_output_at = now
                self._ttft_ms.append((now - handle.submitted_at) * 1000.0)
            handle._put(out)
            if out.finished:
                self._finish(handle, out, now)

    def _finish(self, handle: RequestHandle, out: RequestOutput, now: float) -> None:
        del self._handles[out.request_id]
        self._stats.num_finished += 1
        if handle.first_output_at is not None and out.num_output_tokens > 1:
            span = now - handle.first_output_at
            self._tpot_ms.append(span * 1000.0 / (out.num_output_tokens - 1))

    def _release_leases(self) -> None:
        if not self._leases:
            self._stats.num_leased_blocks = 0
            return
        if self._lease_alive is None:
            return
        try:
            alive = self._lease_alive(list(self._leases.values()))
        except Exception:  # noqa: BLE001 - Redis hiccup: keep the blocks, try again later
            log.warning("lease check failed", exc_info=True)
            return
        for request_id, ref in list(self._leases.items()):
            if ref not in alive:
                del self._leases[request_id]
                self.engine.free_request(request_id)
        self._stats.num_leased_blocks = sum(
            len(self.engine.leased_blocks(r)) for r in self._leases)


def drain(handle: RequestHandle, timeout_s: float) -> list[RequestOutput]:
    """All outputs of a request (convenience for callers that do not stream)."""
    return list(handle.outputs(timeout_s))


def iter_ids(outputs: Iterable[RequestOutput]) -> list[int]:
    """The token ids of a sequence of outputs, in order."""
    return [t for out in outputs for t in out.new_token_ids]
