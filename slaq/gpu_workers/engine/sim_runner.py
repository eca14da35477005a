"""The ``sim`` engine's runner: same interface as ``ModelRunner``, no math.

``SimRunner.execute(SchedulerOutput) -> RunnerOutput`` samples a filler token for every
sequence that needs one and charges the step's time from a
:class:`~slaq.gpu_workers.engine.cost_model.CostProfile`: the simulator reads
``last_step_s`` and advances its virtual clock; a live ``sim`` worker passes ``realtime=True``
and the runner sleeps for the step, so real Celery workers on a CPU stand in for GPUs.
With the real :class:`Scheduler` and :class:`BlockManager` around it, this *is* the sim engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from slaq.gpu_workers.engine.cost_model import CostProfile
from slaq.gpu_workers.engine.outputs import RunnerOutput, SchedulerOutput


@dataclass(slots=True)
class RunnerStats:
    """Totals since the runner was made (for heartbeat token rates and utilisation)."""

    num_steps: int = 0
    busy_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


class SimRunner:
    """A ``ModelRunner`` stand-in whose step times come from a cost model."""

    def __init__(self, profile: CostProfile, *, realtime: bool = False, time_scale: float = 1.0,
                 filler_token_id: int = 0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.profile = profile
        self.realtime = realtime
        # >1 runs a live sim worker faster than the modelled hardware (compressed replays).
        self.time_scale = time_scale
        self.filler_token_id = filler_token_id
        self.last_step_s = 0.0
        self.stats = RunnerStats()

    @property
    def num_kv_blocks(self) -> int:
        """KV pool size the modelled hardware would have (use it for the BlockManager)."""
        return self.profile.num_kv_blocks

    def execute(self, out: SchedulerOutput,
                overlap: Callable[[], None] | None = None) -> RunnerOutput:
        """Run one step: a filler token for each sampling sequence, time from the cost model."""
        if overlap is not None:
            overlap()
        sampled: dict[str, int] = {}
        chunks = []
        num_prefill = num_tokens = 0
        for item in out.scheduled:
            chunks.append((item.start, item.num_new_tokens))
            num_tokens += item.num_new_tokens
            if item.start < item.seq.num_prompt_tokens:
                num_prefill += item.num_new_tokens
            if item.start + item.num_new_tokens == item.seq.num_tokens:
                sampled[item.seq.request_id] = self.filler_token_id
        dt = self.profile.step_time(chunks) / self.time_scale
        self.last_step_s = dt
        st = self.stats
        st.num_steps += 1
        st.busy_s += dt
        st.num_prefill_tokens += num_prefill
        st.num_decode_tokens += num_tokens - num_prefill
        if self.realtime and dt > 0:
            time.sleep(dt)
        return RunnerOutput(sampled_token_ids=sampled)
