"""Applying a step's results to the scheduler's sequences. IO-free.

:meth:`StepResults.update` advances ``num_computed_tokens``, registers newly full blocks in
the prefix cache, appends sampled tokens, finishes sequences (``"stop"``: EOS or a stop token
id; ``"length"``: ``max_tokens`` or ``max_model_len``) and frees their blocks. A
``prefill_only`` sequence finishes after its first token with reason :data:`PREFILL_DONE`
and keeps its blocks (the lease) until ``Scheduler.free_leased``; if that first token already
ends it (EOS, ``max_tokens == 1``) it finishes as usual instead.

Under asynchronous scheduling the same work comes in two halves around the device step:
:meth:`StepResults.advance` before the tokens are known (placeholders), :meth:`StepResults.
resolve` once they are.

This is a part of :class:`~slaq.gpu_workers.engine.scheduler.Scheduler` (a mixin): the
scheduler owns the queues, this module only holds the rules for applying results.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from slaq.gpu_workers.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sequence import PLACEHOLDER_TOKEN_ID, Sequence, SequenceStatus

if TYPE_CHECKING:
    from slaq.gpu_workers.engine.block_manager import BlockManager
    from slaq.gpu_workers.engine.config import SchedulerConfig

PREFILL_DONE = "prefill_done"  # finish reason of a prefill_only sequence that holds a lease


class StepResults:
    """The result-applying methods of :class:`~slaq.gpu_workers.engine.scheduler.Scheduler`."""

    if TYPE_CHECKING:  # the scheduler's state and helpers these methods use
        config: SchedulerConfig
        block_manager: BlockManager
        _running: list[Sequence]
        _leased: dict[str, Sequence]
        _finished_in_schedule: list[Sequence]

        def finish(self, request_id: str, reason: str) -> Sequence | None: ...
        def _forget(self, seq: Sequence) -> None: ...

    def update(
        self,
        out: SchedulerOutput,
        runner_output: RunnerOutput,
        eos_token_id: int | Collection[int] | None,
    ) -> list[Sequence]:
        """Apply a step's results; return the sequences that finished.

        Call it after every :meth:`schedule`, even an empty one: sequences the scheduler had
        to end itself (no KV room ever, reason ``"length"``) are returned here too.
        """
        eos_ids = _eos_ids(eos_token_id)
        sampled = runner_output.sampled_token_ids

        def reason_of(seq: Sequence, token_id: int) -> str | None:
            if self._token_stops(seq, token_id, eos_ids):
                return "stop"
            reason = self._length_reason(seq)
            return PREFILL_DONE if reason is None and seq.prefill_only else reason

        return self._apply(out, lambda seq: sampled[seq.request_id], reason_of)

    def advance(self, out: SchedulerOutput) -> list[Sequence]:
        """The first half of :meth:`update`, for a step whose tokens are not known yet.

        Asynchronous scheduling schedules step N+1 while step N runs: each sampling sequence
        of N gets a placeholder token (``PLACEHOLDER_TOKEN_ID``, which the runner replaces on
        the device by N's sampled token) and :meth:`resolve` fills it in once N's tokens
        reach the host. A sequence that reached ``max_tokens`` or ``max_model_len`` needs no
        token to know that: it finishes here (``"length"``), so N+1 does not compute it.
        Returns those and the sequences :meth:`schedule` ended. Prefill-only sequences are
        never advanced: their lease starts from a known first token.
        """
        def placeholder(seq: Sequence) -> int:
            assert not seq.prefill_only, "a prefill-only step is not scheduled ahead"
            return PLACEHOLDER_TOKEN_ID

        return self._apply(out, placeholder, lambda seq, _token_id: self._length_reason(seq))

    def resolve(self, out: SchedulerOutput, runner_output: RunnerOutput,
                eos_token_id: int | Collection[int] | None) -> list[Sequence]:
        """The second half: put each token of a step that :meth:`advance` applied where its
        placeholder is. A stop token (EOS, ``stop_token_ids``) ends its sequence wherever it
        is by now (running, or preempted since); one that ``advance`` ended by length ends
        by ``"stop"`` instead, as :meth:`update` would say. Returns the sequences ended here;
        the next step may have computed a row for them, which is to be dropped.
        """
        eos_ids = _eos_ids(eos_token_id)
        ended: list[Sequence] = []
        sampled = runner_output.sampled_token_ids
        for item in out.scheduled:
            seq = item.seq
            pos = item.start + item.num_new_tokens
            token_id = sampled.get(seq.request_id)
            if (token_id is None or not item.sample or pos >= seq.num_tokens
                    or seq.token_id_at(pos) != PLACEHOLDER_TOKEN_ID):
                continue  # ended before advance() saw it: it holds no place for this token
            seq.set_token(pos, token_id)
            if not self._token_stops(seq, token_id, eos_ids):
                continue
            if seq.is_finished:
                if seq.finish_reason == "length":
                    seq.finish("stop")
            else:
                self.finish(seq.request_id, "stop")
                ended.append(seq)
        return ended

    def _apply(self, out: SchedulerOutput, token_of: Callable[[Sequence], int],
               reason_of: Callable[[Sequence, int], str | None]) -> list[Sequence]:
        """Advance each scheduled sequence; append ``token_of(seq)`` where it sampled and end
        it where ``reason_of(seq, token)`` says. Returns the ended and the schedule-ended."""
        finished, self._finished_in_schedule = self._finished_in_schedule, []
        for item in out.scheduled:
            if not self._advance(item) or not item.sample:
                continue
            seq = item.seq
            token_id = token_of(seq)
            seq.append_token(token_id)
            reason = reason_of(seq, token_id)
            if reason is not None:
                self._end(seq, reason)
                finished.append(seq)
        if finished:
            self._running = [s for s in self._running if s.status is SequenceStatus.RUNNING]
        return finished

    def _advance(self, item: ScheduledSequence) -> bool:
        """Count a step's computed tokens (and cache the blocks they filled); False for a
        sequence that ended between schedule() and now."""
        seq = item.seq
        if seq.status is not SequenceStatus.RUNNING:
            return False
        assert seq.num_computed_tokens == item.start, f"{seq.request_id}: stale schedule"
        seq.num_computed_tokens += item.num_new_tokens
        self.block_manager.commit_full_blocks(seq)
        return True

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finish a running sequence after a step (the caller prunes ``_running``)."""
        seq.finish(reason)
        if reason == PREFILL_DONE:
            self._leased[seq.request_id] = seq
        else:
            self._forget(seq)

    @staticmethod
    def _token_stops(seq: Sequence, token_id: int, eos_ids: Collection[int]) -> bool:
        params = seq.params
        return (not params.ignore_eos and token_id in eos_ids) or \
            token_id in params.stop_token_ids

    def _length_reason(self, seq: Sequence) -> str | None:
        if seq.num_output_tokens >= seq.params.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None


def _eos_ids(eos_token_id: int | Collection[int] | None) -> Collection[int]:
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return eos_token_id or ()
