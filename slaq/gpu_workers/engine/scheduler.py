"""Continuous-batching scheduler with chunked prefill and preemption by recompute. IO-free.

One step (:meth:`Scheduler.schedule`) fills a token budget (``max_num_batched_tokens``) and a
seat budget (``max_num_seqs``) in this order:

1. decodes of running sequences, most important first (``(rank, arrival_time)``); when the
   pool has no slot for a decode, the least important, most recently arrived running
   sequence is preempted (possibly the one asking);
2. prefill work by ``(rank, prompt tokens left)``: the next chunks of running sequences
   whose prefill is not done (chunked prefill), merged with the waiting sequences (taken in
   ``(rank, arrival_time)`` order; on a tie the running prefill goes first). So a running
   prefill of a less important rank than the first waiting sequence *yields*: that sequence
   is admitted first and the running prefill gets what budget is left; a long low-tier
   prompt cannot hold the chunk budget while a high-tier request waits. Within a rank the
   shortest remaining prefill goes first: one 100k-token prompt does not hold up every short
   prompt of its tier for seconds (TTFT attainment counts requests); it still gets all the
   budget they leave. A waiting sequence gets blocks for all its tokens and a first chunk of
   what is left of the budget. Admission stops at the first waiting sequence that does not
   fit (no skipping, so big prompts are not starved of KV); the yielded running prefills
   then take the rest of the budget. A waiting sequence may preempt running ones of a
   strictly less important rank to get in (``preempt_for_priority``).

A hand-off (``add_prefilled``, between steps) follows the same rule; its exceptions are in
:mod:`~slaq.gpu_workers.engine.handoff_admission`.

Preempted sequences keep their tokens, lose their KV and go back to the front of their rank
in the waiting queue; they are recomputed as one prefill over prompt + generated tokens.

:meth:`Scheduler.update` applies a step's results (in two halves, ``advance`` and
``resolve``, under asynchronous scheduling): :mod:`~slaq.gpu_workers.engine.step_results`.

Per step the work is O(batch); nothing rescans all tokens. Deterministic: no clocks, no
randomness, ties broken by the order of :meth:`Scheduler.add`.
"""

from __future__ import annotations

import bisect

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SchedulerConfig
from slaq.gpu_workers.engine.handoff_admission import HandoffAdmission, NoRoomError
from slaq.gpu_workers.engine.outputs import ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sequence import Sequence, SequenceStatus
from slaq.gpu_workers.engine.step_results import PREFILL_DONE, StepResults
from slaq.gpu_workers.engine.waiting_queue import WaitingQueue


class Scheduler(HandoffAdmission, StepResults):
    """Owns the waiting and running queues and the leases of one engine. Not thread-safe.

    Hand-offs (``add_prefilled``) are admitted by the rules of
    :mod:`~slaq.gpu_workers.engine.handoff_admission`."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        preempt_for_priority: bool = True,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.preempt_for_priority = preempt_for_priority
        self._waiting = WaitingQueue(key=self._key)
        self._running: list[Sequence] = []  # sorted by _key: most important first
        self._leased: dict[str, Sequence] = {}
        self._seqs: dict[str, Sequence] = {}  # waiting + running + leased, by request id
        self._order: dict[str, int] = {}  # add() order, the final tie-breaker
        self._next_order = 0
        self._finished_in_schedule: list[Sequence] = []
        self.num_preemptions = 0
        self.last_batch_size = 0
        self.max_batch_size_seen = 0

    # ------------------------------------------------------------------ stats

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_leased(self) -> int:
        return len(self._leased)

    @property
    def num_leased_blocks(self) -> int:
        """Blocks held by leases (finished prefill_only sequences awaiting their pull)."""
        return sum(len(s.block_table) for s in self._leased.values())

    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs (leases do not count)."""
        return bool(self._running) or len(self._waiting) > 0

    def can_progress(self) -> bool:
        """Whether the next :meth:`schedule` has work: something runs, or the head of the
        waiting queue fits now or never will (the step ends it). False while only waiting
        sequences that cannot get in remain (what they lack may be blocks pinned for
        hand-offs), so a loop need not step until something changes."""
        if self._running:
            return True
        if not self._waiting:
            return False
        head = self._waiting.peek()
        return self._fits(head) or self._never_fits(head.num_tokens)

    def get(self, request_id: str) -> Sequence | None:
        """The waiting, running or leased sequence with this id."""
        return self._seqs.get(request_id)

    @property
    def running(self) -> tuple[Sequence, ...]:
        """Running sequences, most important first (a snapshot)."""
        return tuple(self._running)

    # ------------------------------------------------------------- requests

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError for one that could never run."""
        cfg, bm = self.config, self.block_manager
        if seq.request_id in self._seqs:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError("only a fresh waiting sequence can be added")
        if seq.num_prompt_tokens >= cfg.max_model_len:
            raise ValueError(
                f"prompt of {seq.num_prompt_tokens} tokens leaves no room under "
                f"max_model_len={cfg.max_model_len}"
            )
        if bm.num_blocks_for(seq.num_prompt_tokens) > bm.num_blocks:
            raise ValueError(
                f"prompt of {seq.num_prompt_tokens} tokens needs more KV blocks than the "
                f"pool has ({bm.num_blocks} x {bm.block_size})"
            )
        if not cfg.enable_chunked_prefill and seq.num_prompt_tokens > cfg.max_num_batched_tokens:
            raise ValueError("prompt exceeds max_num_batched_tokens and chunked prefill is off")
        self._register(seq)
        self._waiting.push(seq, front=False)

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a sequence wherever it is (waiting, running or leased) and free its blocks.

        The detokenizer calls this with ``"stop"`` when a stop string appears. Returns the
        sequence, or None when the id is unknown (already finished).
        """
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        if request_id in self._leased:
            del self._leased[request_id]
        elif seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        seq.finish(reason)
        self._forget(seq)
        return seq

    def discard_pending_end(self, seq: Sequence) -> None:
        """Do not return ``seq`` from the next :meth:`update` / :meth:`advance`: the engine
        has reported the end that :meth:`schedule` decided for it (with the last token of a
        step that ran before)."""
        if self._finished_in_schedule:
            self._finished_in_schedule = [s for s in self._finished_in_schedule if s is not seq]

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request: ``finish(request_id, "abort")``."""
        return self.finish(request_id, "abort")

    def leased(self, request_id: str) -> Sequence | None:
        """A finished prefill_only sequence whose blocks are still held."""
        return self._leased.get(request_id)

    def free_leased(self, request_id: str) -> Sequence | None:
        """Release a lease: free the blocks of a finished prefill_only sequence."""
        seq = self._leased.pop(request_id, None)
        if seq is not None:
            self._forget(seq)
        return seq

    # ------------------------------------------------------------------ step

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work; allocates the KV slots it needs."""
        out = SchedulerOutput()
        budget = self._schedule_decodes(out, self.config.max_num_batched_tokens)
        self._schedule_prefills(out, budget)
        self.last_batch_size = len(out.scheduled)
        self.max_batch_size_seen = max(self.max_batch_size_seen, self.last_batch_size)
        return out

    def check_integrity(self) -> None:
        """Assert queue bookkeeping and the block manager agree (tests, debugging)."""
        self.block_manager.check_integrity()
        waiting = list(self._waiting)
        assert len(waiting) == len(self._waiting)
        assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in waiting)
        assert all(s.status is SequenceStatus.RUNNING and s.block_table for s in self._running)
        assert all(s.finish_reason == PREFILL_DONE for s in self._leased.values())
        keys = [self._key(s) for s in self._running]
        assert keys == sorted(keys), "running queue out of order"
        assert len(self._running) <= self.config.max_num_seqs
        ids = {s.request_id for s in waiting} | {s.request_id for s in self._running}
        assert ids | set(self._leased) == set(self._seqs), "sequence index out of sync"

    # -------------------------------------------------------------- phases

    def _schedule_decodes(self, out: SchedulerOutput, budget: int) -> int:
        bm = self.block_manager
        block_size = bm.block_size
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            if seq.num_uncomputed_tokens != 1:
                i += 1
                continue
            # 15 steps in 16 (blocks of 16) the token's slot is in a block it holds already.
            if seq.num_computed_tokens >= len(seq.block_table) * block_size:
                if self._never_fits(seq.num_computed_tokens + 1):
                    # Outgrew the whole pool: preempting it would only requeue it forever.
                    del self._running[i]
                    seq.finish("length")
                    self._forget(seq)
                    self._finished_in_schedule.append(seq)
                    continue
                while not bm.can_append(seq, 1):
                    victim = self._running[-1]  # never one scheduled already: they come first
                    self._preempt(victim, out)
                    if victim is seq:
                        return budget
                bm.append_slots(seq, 1)
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, 1))
            budget -= 1
            i += 1
        return budget

    def _schedule_prefills(self, out: SchedulerOutput, budget: int) -> int:
        """Running prefill chunks and waiting admissions, merged by ``(rank, tokens left)``
        (see the module doc)."""
        # Snapshot: sequences admitted below are given their first chunk at admission.
        chunks = sorted((s for s in self._running if s.num_uncomputed_tokens > 1),
                        key=self._prefill_key)
        # A victim preempted for an admission may be admitted again later in this step (with
        # its first chunk): its old entry in ``chunks`` must not schedule it twice.
        admitted: set[str] = set()
        i = 0
        while budget > 0:
            head = self._waiting.peek() if self._waiting else None
            while i < len(chunks) and budget > 0 and (
                head is None
                or (chunks[i].rank, chunks[i].num_uncomputed_tokens)
                <= (head.rank, head.num_uncomputed_tokens)
            ):
                budget = self._schedule_chunk(chunks[i], out, budget, admitted)
                i += 1
            if head is None or budget <= 0:
                return budget
            left = self._admit_waiting(head, out, budget)
            if left is None:
                break  # the head does not fit: yielded prefills take what is left
            admitted.add(head.request_id)
            budget = left
        for seq in chunks[i:]:
            if budget <= 0:
                break
            budget = self._schedule_chunk(seq, out, budget, admitted)
        return budget

    def _schedule_chunk(self, seq: Sequence, out: SchedulerOutput, budget: int,
                        admitted: set[str]) -> int:
        if seq.status is not SequenceStatus.RUNNING or seq.request_id in admitted:
            return budget  # preempted by an admission earlier in this step (maybe back)
        num_new = self._chunk_size(seq.num_uncomputed_tokens, budget)
        if num_new == 0:
            return budget
        bm = self.block_manager
        assert bm.can_append(seq, num_new), "prefill blocks are allocated at admission"
        bm.append_slots(seq, num_new)
        out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new))
        return budget - num_new

    def _admit_waiting(self, seq: Sequence, out: SchedulerOutput, budget: int) -> int | None:
        """Admit the head of the waiting queue with a first chunk; the budget left, or None
        when it cannot be admitted now (it stays at the head)."""
        bm = self.block_manager
        refund = self._make_room(seq, out)
        if refund is None:
            if self._never_fits(seq.num_tokens):  # safety net: would block the queue
                self._waiting.pop(seq)
                seq.finish("length")
                self._forget(seq)
                self._finished_in_schedule.append(seq)
                return budget
            return None
        budget += refund
        if not self.config.enable_chunked_prefill:
            left = seq.num_tokens - bm.lookup_prefix(seq)
            if self._chunk_size(left, budget) == 0:
                return None
        self._waiting.pop(seq)
        bm.allocate(seq)
        num_new = self._chunk_size(seq.num_uncomputed_tokens, budget)
        assert num_new > 0
        bm.append_slots(seq, num_new)
        seq.status = SequenceStatus.RUNNING
        self._insert_running(seq)
        out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new))
        return budget - num_new

    # ------------------------------------------------------------- helpers

    def _fits(self, seq: Sequence) -> bool:
        return len(self._running) < self.config.max_num_seqs and self.block_manager.can_allocate(
            seq
        )

    def _make_room(self, seq: Sequence, out: SchedulerOutput) -> int | None:
        """Make ``seq`` admissible, preempting strictly less important ranks if allowed.

        Returns None when it cannot be admitted now, else the budget tokens given back by
        victims that had been scheduled earlier in this step.
        """
        bm = self.block_manager
        if self._fits(seq):
            return 0
        if not self._victims_make_room(seq, bm.num_blocks_to_allocate(seq)):
            return None
        refund = 0
        while not self._fits(seq):
            if not self._running or self._running[-1].rank <= seq.rank:
                return None  # estimate was off (shared prefix); victims are requeued anyway
            victim = self._running[-1]
            for j, item in enumerate(out.scheduled):
                if item.seq is victim:
                    refund += item.num_new_tokens
                    del out.scheduled[j]
                    break
            self._preempt(victim, out)
        return refund

    def _victims_make_room(self, seq: Sequence, num_new_blocks: int) -> bool:
        """Whether preempting running sequences of a strictly less important rank than
        ``seq`` (least important, most recent first) frees the seat and ``num_new_blocks``
        it needs. Counts only the blocks the victims hold alone: a shared block stays in use
        when one of its holders goes."""
        if not self.preempt_for_priority:
            return False
        bm = self.block_manager
        need_seat = len(self._running) >= self.config.max_num_seqs
        short = max(0, num_new_blocks - bm.num_free_blocks)
        freeable, num_victims = 0, 0
        for victim in reversed(self._running):
            if victim.rank <= seq.rank or (freeable >= short and num_victims >= need_seat):
                break
            freeable += bm.num_exclusive_blocks(victim)
            num_victims += 1
        return num_victims > 0 and num_victims >= need_seat and freeable >= short

    def _chunk_size(self, left: int, budget: int) -> int:
        if self.config.enable_chunked_prefill:
            return min(left, budget)
        if left <= budget:
            return left
        # Without chunking a prefill runs whole, except one longer than any step could hold
        # (a recompute that grew past the budget): chunking it is the only way forward.
        return budget if left > self.config.max_num_batched_tokens else 0

    def _never_fits(self, num_tokens: int) -> bool:
        bm = self.block_manager
        return bm.num_blocks_for(num_tokens) > bm.num_blocks

    def _preempt(self, seq: Sequence, out: SchedulerOutput | None) -> None:
        """Requeue ``seq`` for recompute; ``out``: the step being built (None between
        steps, for a hand-off)."""
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self._waiting.push(seq, front=True)
        if out is not None:
            out.preempted_ids.append(seq.request_id)
        self.num_preemptions += 1

    def _prefill_key(self, seq: Sequence) -> tuple[int, int, float, int]:
        return (seq.rank, seq.num_uncomputed_tokens, seq.arrival_time,
                self._order[seq.request_id])

    def _key(self, seq: Sequence) -> tuple[int, float, int]:
        return (seq.rank, seq.arrival_time, self._order[seq.request_id])

    def _register(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        self._order[seq.request_id] = self._next_order
        self._next_order += 1

    def _forget(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._seqs.pop(seq.request_id, None)
        self._order.pop(seq.request_id, None)

    def _insert_running(self, seq: Sequence) -> None:
        bisect.insort(self._running, seq, key=self._key)


__all__ = ["PREFILL_DONE", "NoRoomError", "Scheduler"]
