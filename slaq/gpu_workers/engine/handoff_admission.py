"""Admission of hand-offs: sequences whose prompt KV arrives from a prefill worker. IO-free.

A hand-off (:meth:`HandoffAdmission.add_prefilled`, called between steps) runs at once: every
token but its last counts as computed and its next step is a decode. It follows the rule a
waiting admission follows (:mod:`~slaq.gpu_workers.engine.scheduler`): it may preempt running
sequences of a strictly less important rank when they can make its room, and it is not
admitted while a preempted sequence of a more important rank waits, since that one would
preempt it at the next step.

One exception keeps this live: when nothing runs and the waiting sequence cannot get in, what
it lacks may be exactly the blocks pinned for the hand-off, so deferring would wait for ever;
the hand-off goes first.

Known limit: a preempted sequence waits behind hand-offs of its own rank, which are admitted
while it cannot fit; a steady stream of them can keep it waiting. A bound on how many pass it
was tried and dropped: counted per head it did not bound the wait of a sequence
behind the head, and deferring to a head that lacks the blocks pinned for the deferring
hand-offs starved both while anything more important ran.

This is a part of :class:`~slaq.gpu_workers.engine.scheduler.Scheduler` (a mixin): the
scheduler owns the queues, this module only holds the hand-off half of its rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slaq.gpu_workers.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from slaq.gpu_workers.engine.block_manager import BlockManager
    from slaq.gpu_workers.engine.config import SchedulerConfig
    from slaq.gpu_workers.engine.outputs import SchedulerOutput
    from slaq.gpu_workers.engine.waiting_queue import WaitingQueue


class NoRoomError(RuntimeError):
    """No seat or KV blocks for a prefilled sequence now (see :meth:`Scheduler.add_prefilled`)."""


class HandoffAdmission:
    """The hand-off methods of :class:`~slaq.gpu_workers.engine.scheduler.Scheduler`."""

    if TYPE_CHECKING:  # the scheduler's state and helpers these methods use
        config: SchedulerConfig
        block_manager: BlockManager
        _waiting: WaitingQueue
        _running: list[Sequence]
        _seqs: dict[str, Sequence]

        def _fits(self, seq: Sequence) -> bool: ...
        def _never_fits(self, num_tokens: int) -> bool: ...
        def _victims_make_room(self, seq: Sequence, num_new_blocks: int) -> bool: ...
        def _preempt(self, seq: Sequence, out: SchedulerOutput | None) -> None: ...
        def _register(self, seq: Sequence) -> None: ...
        def _insert_running(self, seq: Sequence) -> None: ...

    def add_prefilled(self, seq: Sequence, num_cached_tokens: int = 0) -> list[int]:
        """Run a sequence whose KV for all but its last token arrives by transfer.

        ``seq`` carries the prompt and at least the first sampled token in
        ``output_token_ids``. Its leading blocks are those the block manager pinned under its
        request id (:meth:`BlockManager.pin_prefix`: cached here, their KV needs no transfer);
        the rest are fresh. Every token but the last counts as computed, and it runs (its next
        step is a decode of the last token). ``num_cached_tokens`` is what the prefill side
        reported as cache hits (for usage).
        Returns the block ids that must receive the transferred KV, in order, before the next
        :meth:`schedule`: those after the pinned ones up to token ``num_tokens - 1``.
        When it does not fit, running sequences of a strictly less important rank are
        preempted for it (``preempt_for_priority``), as for a waiting admission, if they can
        make the room. Raises ValueError for a sequence with nothing left to generate, one
        the whole pool could not hold, or pins that are not its prefix, and
        :class:`NoRoomError` when there is no room now.
        """
        if seq.request_id in self._seqs:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if seq.num_output_tokens < 1 or seq.block_table:
            raise ValueError("a prefilled sequence carries its first token and no blocks")
        if (
            seq.num_output_tokens >= seq.params.max_tokens
            or seq.num_tokens >= self.config.max_model_len
        ):
            raise ValueError(f"request {seq.request_id!r} has nothing left to generate")
        bm = self.block_manager
        if self._never_fits(seq.num_tokens):
            raise ValueError(f"request {seq.request_id!r} needs more KV blocks than the pool "
                             f"has ({bm.num_blocks})")
        # Before any victim is preempted for it: a hand-off that fails anyway preempts none.
        bm.check_pins(seq, seq.num_tokens - 1)
        if not self.can_add_prefilled(seq) and not self._make_room_for_prefilled(seq):
            raise NoRoomError(f"no seat or KV blocks for {seq.request_id!r}")
        blocks = bm.allocate_prefilled(seq, seq.num_tokens - 1)
        self._register(seq)
        seq.num_cached_tokens = num_cached_tokens
        seq.status = SequenceStatus.RUNNING
        self._insert_running(seq)
        return blocks

    def can_add_prefilled(self, seq: Sequence) -> bool:
        """Whether :meth:`add_prefilled` admits ``seq`` now without preempting anything: a
        seat and blocks are free (blocks pinned for it are held already) and no more
        important preempted sequence waits (see the module doc). False does not mean
        :meth:`add_prefilled` fails: it may preempt less important sequences to make the
        room."""
        bm = self.block_manager
        num_new = bm.num_prefilled_new_blocks(seq)
        return (
            len(self._running) < self.config.max_num_seqs
            and num_new <= bm.num_free_blocks
            and not self._waits_for_more_important(seq)
        )

    def _waits_for_more_important(self, seq: Sequence) -> bool:
        """A waiting sequence (a preempted one, on a decode worker) of a more important rank
        goes first: admitted before it, ``seq`` would be preempted by it at the next step.

        Unless that one cannot get in now and nothing runs whose end would free room: then
        what it lacks may be exactly the blocks pinned for ``seq``, and deferring would wait
        for ever (admitted, ``seq`` runs until the waiting one preempts it)."""
        if not self._waiting:
            return False
        head = self._waiting.peek()
        return head.rank < seq.rank and (bool(self._running) or self._fits(head))

    def _make_room_for_prefilled(self, seq: Sequence) -> bool:
        """Preempt for a hand-off as ``Scheduler._make_room`` does for a waiting sequence;
        whether it now fits. Nothing is preempted when the victims cannot make the room."""
        bm = self.block_manager
        num_new = bm.num_prefilled_new_blocks(seq)
        if self._waits_for_more_important(seq) or not self._victims_make_room(seq, num_new):
            return False
        while not self.can_add_prefilled(seq):
            if not self._running or self._running[-1].rank <= seq.rank:
                return False  # estimate was off (shared blocks); the victims wait to rerun
            self._preempt(self._running[-1], None)
        return True
