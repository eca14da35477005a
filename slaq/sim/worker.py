"""One simulated worker: the real Scheduler and BlockManager around a SimRunner.

The simulator owns the clock; a worker only knows how to start a step (returning its
duration), finish it, take prefilled work from a transfer, and describe itself as a
:class:`~slaq.platform.pressure.Heartbeat`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SchedulerConfig
from slaq.gpu_workers.engine.cost_model import CostProfile
from slaq.gpu_workers.engine.outputs import RunnerOutput, SchedulerOutput
from slaq.gpu_workers.engine.scheduler import Scheduler
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.sim_runner import SimRunner
from slaq.platform.pressure import Heartbeat


@dataclass(slots=True)
class Handoff:
    """A prefilled request on its way to (or waiting at) a decode worker."""

    seq: Sequence  # the decode-side sequence: prompt + first token, no blocks
    prefill_worker: str
    ready_s: float


class SimWorker:
    """A worker of role ``prefill``, ``decode`` or ``both`` in virtual time."""

    def __init__(self, name: str, role: str, profile: CostProfile, config: SchedulerConfig,
                 enable_prefix_caching: bool = True) -> None:
        self.name = name
        self.role = role
        self.profile = profile
        self.block_manager = BlockManager(profile.num_kv_blocks, profile.block_size,
                                          enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.runner = SimRunner(profile)
        self.busy = False
        self.current: SchedulerOutput | None = None
        self._runner_out = RunnerOutput()
        self.pending: deque[Handoff] = deque()  # decode side: transfers waiting for room
        # Pulled sequences not yet given their first chunk, by id -> prompt tokens.
        self.unstarted: dict[str, int] = {}
        self.unstarted_tokens = 0
        self._window_start = 0.0
        self._window_prefill = 0
        self._window_decode = 0
        self.prefill_rate = 0.0
        self.decode_rate = 0.0

    # ---- capacity to take more work -----------------------------------------------------

    @property
    def pulls(self) -> bool:
        return self.role in ("prefill", "both")

    def wants_more(self, num_prompt_tokens: int) -> bool:
        """Take another ticket? Only one step's worth of prompts waits inside the engine, so
        the queues (which the policy can reorder) keep the rest; and only if KV has room."""
        sched, bm = self.scheduler, self.block_manager
        cfg = sched.config
        if self.unstarted_tokens >= cfg.max_num_batched_tokens:
            return False
        if sched.num_running + sched.num_waiting >= cfg.max_num_seqs:
            return False
        need = bm.num_blocks_for(num_prompt_tokens + self.unstarted_tokens + 1)
        return need <= bm.num_free_blocks or not (sched.num_running or sched.num_waiting)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self.unstarted[seq.request_id] = seq.num_prompt_tokens
        self.unstarted_tokens += seq.num_prompt_tokens

    def admit_pending(self) -> list[Handoff]:
        """Move transfers that now fit into the running batch; returns those admitted."""
        done = []
        sched = self.scheduler
        while self.pending and sched.can_add_prefilled(self.pending[0].seq):
            h = self.pending.popleft()
            sched.add_prefilled(h.seq)
            done.append(h)
        return done

    # ---- steps --------------------------------------------------------------------------

    def start_step(self) -> float | None:
        """Schedule and cost one step; None when there is nothing to run."""
        out = self.scheduler.schedule()
        if out.is_empty:
            self.scheduler.update(out, RunnerOutput(), None)
            return None
        for item in out.scheduled:
            n = self.unstarted.pop(item.seq.request_id, None)
            if n is not None:
                self.unstarted_tokens -= n
        self.current = out
        self.busy = True
        self._runner_out = self.runner.execute(out)
        return self.runner.last_step_s

    def finish_step(self) -> tuple[list[Sequence], list[Sequence]]:
        """Apply the running step; returns the sequences that sampled after a prefill (their
        first token, or a recompute's) and those that finished."""
        out, self.current = self.current, None
        assert out is not None
        self.busy = False
        firsts = [s.seq for s in out.scheduled if s.sample and s.is_prefill]
        return firsts, self.scheduler.update(out, self._runner_out, None)

    # ---- reporting ----------------------------------------------------------------------

    def reserved_blocks(self) -> int:
        bm = self.block_manager
        return sum(bm.num_blocks_for(h.seq.num_tokens) for h in self.pending)

    def heartbeat(self, now: float) -> Heartbeat:
        """This worker's heartbeat at ``now`` (token rates over the time since the last one)."""
        st = self.runner.stats
        dt = now - self._window_start
        if dt > 0:
            self.prefill_rate = (st.num_prefill_tokens - self._window_prefill) / dt
            self.decode_rate = (st.num_decode_tokens - self._window_decode) / dt
            self._window_start = now
            self._window_prefill = st.num_prefill_tokens
            self._window_decode = st.num_decode_tokens
        bm, sched = self.block_manager, self.scheduler
        return Heartbeat(
            worker=self.name, role=self.role, device="sim", model=self.profile.name,
            num_blocks_total=bm.num_blocks, num_blocks_used=bm.num_used_blocks,
            num_blocks_reserved=min(bm.num_free_blocks, self.reserved_blocks()),
            num_running=sched.num_running, num_waiting=sched.num_waiting + len(self.pending),
            num_preemptions=sched.num_preemptions, prefill_tokens_per_s=self.prefill_rate,
            decode_tokens_per_s=self.decode_rate, last_batch_size=sched.last_batch_size,
            max_batch_size=sched.max_batch_size_seen, time=now,
        )
