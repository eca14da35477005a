"""One simulated worker: the real Scheduler and BlockManager around a SimRunner.

The simulator owns the clock; a worker only knows how to start a step (returning its
duration), finish it, take prefilled work from a transfer, and describe itself as a
:class:`~slaq.platform.pressure.Heartbeat` (with its block manager's ``prefix_summary()``, as a
live heartbeat carries it, for prefix-affinity routing).

Decode side of a hand-off, as the live engine loop does it: :meth:`SimWorker.reserve_prefix`
pins the prompt's leading cached blocks (``BlockManager.pin_prefix``, what
``LLMEngine.reserve_prefix`` calls) when the hand-off is routed here, so only the rest moves;
``Scheduler.add_prefilled`` takes the pins over on admission. Pins are given back when the
add fails and by :meth:`SimWorker.release_pins` when the run ends with hand-offs undelivered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SchedulerConfig
from slaq.gpu_workers.engine.cost_model import CostProfile
from slaq.gpu_workers.engine.outputs import RunnerOutput, SchedulerOutput
from slaq.gpu_workers.engine.scheduler import NoRoomError, Scheduler
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.sim_runner import SimRunner
from slaq.platform.pressure import Heartbeat


@dataclass(slots=True)
class Handoff:
    """A prefilled request on its way to (or waiting at) a decode worker."""

    seq: Sequence  # the decode-side sequence: prompt + first token, no blocks
    prefill_worker: str
    ready_s: float
    # Its KV was pulled into the decode worker's host memory, so the prefill worker's lease
    # is released (the live decode task pulls as soon as it holds the ticket, then waits).
    pulled: bool = False


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
        self.num_pins_dropped = 0  # blocks unpinned so that a waiting head could fit

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
        """Move transfers that now fit into the running batch; returns those admitted. As the
        live engine loop: the head is offered to ``Scheduler.add_prefilled``, which may
        preempt less important running sequences for it."""
        done = []
        sched = self.scheduler
        while self.pending:
            if self._try_admit(self.pending[0]):
                done.append(self.pending.popleft())
                continue
            if sched.can_progress():
                return done  # running requests will free room (or a waiting one gets in)
            # Nothing runs, and no waiting sequence can get in (the engine loop's rule).
            # Blocks pinned for hand-offs queued behind may be what the head lacks: one of
            # them that fits goes first and gives them back when it finishes; pins of
            # transfers still in flight end when they arrive.
            behind = next((h for h in list(self.pending)[1:] if self._try_admit(h)), None)
            if behind is not None:
                self.pending.remove(behind)
                done.append(behind)
                continue
            waiting = {h.seq.request_id for h in self.pending}
            if self.block_manager.pinned_keys() - waiting:
                return done
            # Where the live loop sends the head back to be prefilled again (HandoffRetry),
            # give back the pins of those behind it instead (their KV stays modelled as
            # moved): a request is never lost to pins.
            head = self.pending[0].seq.request_id
            freed = sum(self.block_manager.unpin(k) for k in waiting - {head})
            self.num_pins_dropped += freed
            if not freed or not sched.can_add_prefilled(self.pending[0].seq):
                return done  # it never fits (as without pins)
        return done

    def take_pulls(self) -> list[Handoff]:
        """Waiting transfers that now hold a decode ticket seat, and so pull their KV; marks
        and returns them. Live, a decode worker runs one ticket per engine seat
        (``max_num_seqs``): a ticket pulls at once and then waits for room in the engine,
        and holds its seat until its request ends, also while the engine has it preempted.
        So running plus preempted plus pulled-and-waiting never exceeds the seats."""
        sched = self.scheduler
        seats = (sched.config.max_num_seqs - sched.num_running - sched.num_waiting
                 - sum(1 for h in self.pending if h.pulled))
        pulled = []
        for h in self.pending:  # tier order: the decode queue hands out its most urgent first
            if seats <= 0:
                break
            if not h.pulled:
                h.pulled = True
                seats -= 1
                pulled.append(h)
        return pulled

    def _try_admit(self, h: Handoff) -> bool:
        """``Scheduler.add_prefilled``; False (pins kept, it waits) when there is no room."""
        try:
            self.scheduler.add_prefilled(h.seq)
        except NoRoomError:
            return False
        except BaseException:
            self.release_prefix(h.seq.request_id)  # keep pins balanced on every path
            raise
        return True

    def reserve_prefix(self, request_id: str, prompt_token_ids: list[int]) -> int:
        """Pin the prompt's leading cached blocks for a hand-off coming here (as
        ``LLMEngine.reserve_prefix``); returns how many (their KV need not move)."""
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request {request_id!r} is already in this engine")
        return self.block_manager.pin_prefix(request_id, prompt_token_ids)

    def release_prefix(self, request_id: str) -> int:
        """Give back what :meth:`reserve_prefix` pinned (no-op once admitted)."""
        return self.block_manager.unpin(request_id)

    def release_pins(self) -> int:
        """Give back every pin (the run ended with hand-offs not admitted); how many blocks."""
        return sum(self.block_manager.unpin(k) for k in self.block_manager.pinned_keys())

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
        """Blocks waiting hand-offs still need (pinned ones are held, so counted as used)."""
        bm = self.block_manager
        return sum(bm.num_prefilled_new_blocks(h.seq) for h in self.pending)

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
            prefix_hashes=bm.prefix_summary(), num_handoff_blocks=bm.num_handoff_blocks,
            num_handoff_blocks_reused=bm.num_handoff_reused_blocks,
        )
