"""LLMEngine: scheduler + block manager + model runner + detokenizer behind one facade.

Not thread-safe. One engine thread owns an engine and makes every call on it (the worker's
:mod:`~slaq.gpu_workers.engine_loop`); other threads hand it work through that loop.

The same facade drives the ``sim`` engine: ``LLMEngine(config, runner="sim")`` swaps the model
runner for :class:`~slaq.gpu_workers.engine.sim_runner.SimRunner` (cost-model step times, filler
tokens) around the same scheduler and block accounting.

Asynchronous output processing (``EngineConfig.async_output``; on by default for CUDA): a
step's outputs are built (detokenised, stop strings checked) during the *next* step, while
the device runs its forward, instead of between steps while the device idles. The cost is
one step of latency per output and, when a stop string ends a sequence, one token it already
computed that is thrown away. First tokens are the exception: they come out of the step
that computed them, so time to first token pays nothing.

Asynchronous scheduling (``EngineConfig.async_scheduling``; on by default for CUDA) goes
further where a step's sampled rows are all plain greedy (no penalty, no logprobs, not a
prefill-only hand-off): step N+1 is scheduled and queued on the device before the host reads
step N's tokens. Each sequence N samples holds a placeholder token meanwhile
(:meth:`Scheduler.advance`), which the runner fills on the device from N's output; the host
then reads N's tokens, puts them in place (:meth:`Scheduler.resolve`) and builds N's outputs
while N+1 runs. A sequence that N's token ends (EOS, a stop string) has a row in N+1 that is
computed and dropped; any other step runs as before, after N is resolved.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import Any

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import EngineConfig, SamplingParams
from slaq.gpu_workers.engine.detokenizer import IncrementalDetokenizer
from slaq.gpu_workers.engine.loader import eos_token_ids, load_model_config, load_tokenizer
from slaq.gpu_workers.engine.outputs import (
    EngineStats,
    RequestOutput,
    RunnerOutput,
    ScheduledSequence,
    SchedulerOutput,
)
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE, Scheduler
from slaq.gpu_workers.engine.sequence import Sequence

RATE_WINDOW_S = 10.0  # token rates in stats() are over this recent window


@dataclass(slots=True)
class _StepResult:
    """A step whose outputs are not built yet (asynchronous output processing)."""

    scheduled: list[ScheduledSequence]
    runner_out: RunnerOutput
    finished: list[Sequence]
    # Requests a stop string ended while this step ran: their tokens of it are dropped.
    dropped: set[str]


@dataclass(slots=True)
class _InFlight:
    """A launched step (asynchronous scheduling) whose tokens are not applied yet."""

    out: SchedulerOutput
    launched: Any  # the runner's LaunchedStep
    ended_early: list[Sequence]  # ended by Scheduler.advance: their last token is to come
    dropped: set[str]  # ended between this step's schedule() and advance(): rows dropped
    launch_time: float


@dataclass(slots=True)
class Completion:
    """A whole request's result, from :meth:`LLMEngine.generate`."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[list[tuple[int, float]]] | None = None


class LLMEngine:
    """Continuous-batching engine over one model on one device."""

    def __init__(self, config: EngineConfig, runner: str | Any = "torch", *,
                 sim_profile: str = "smollm2-135m-cpu") -> None:
        model_config = load_model_config(config.model)
        # Positions past the model's trained range (and its RoPE table) are never scheduled.
        max_len = min(config.scheduler.max_model_len, model_config.max_position_embeddings)
        self.config = config = replace(config, scheduler=replace(config.scheduler,
                                                                 max_model_len=max_len))
        self.model_config = model_config
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(config.model, self.tokenizer, model_config)
        self.runner = self._make_runner(runner, sim_profile)
        num_blocks = (config.cache.num_blocks or getattr(self.runner, "num_blocks", None)
                      or self.runner.num_kv_blocks)
        self.block_manager = BlockManager(num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._num_steps = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._recent: deque[tuple[float, float, int, int]] = deque()  # (end, dt, prefill, dec)
        # Both default to on where a device runs the forward asynchronously to the host.
        on_device = config.device.startswith("cuda") and runner != "sim"
        async_output = on_device if config.async_output is None else config.async_output
        ahead = on_device if config.async_scheduling is None else config.async_scheduling
        self._schedule_ahead = ahead and hasattr(self.runner, "launch")
        self._async_output = async_output and not self._schedule_ahead
        self._pending: _StepResult | None = None
        self._inflight: _InFlight | None = None

    def _make_runner(self, runner: str | Any, sim_profile: str) -> Any:
        if runner == "torch":
            from slaq.gpu_workers.engine.model_runner import ModelRunner

            if self.config.device.startswith("cuda") and self.config.use_cuda_graphs:
                from slaq.gpu_workers.engine.paged_attention import triton_available

                if triton_available(self.config.device):
                    from slaq.gpu_workers.engine.cuda_graphs import CudaGraphModelRunner

                    return CudaGraphModelRunner(self.config, self.model_config)
            return ModelRunner(self.config, self.model_config)
        if runner == "sim":
            from slaq.gpu_workers.engine.cost_model import get_profile
            from slaq.gpu_workers.engine.sim_runner import SimRunner

            return SimRunner(get_profile(sim_profile), realtime=True)
        return runner  # a runner object (tests, other engines)

    # -- properties of the KV pool (for transports) ------------------------------------

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return tuple(self.runner.kv_shape)

    @property
    def kv_dtype(self) -> Any:
        return self.runner.dtype

    def close(self) -> None:
        """Release the runner's resources (its shared-memory pool file)."""
        if hasattr(self.runner, "close"):
            self.runner.close()

    # -- requests ----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    rank: int = 1, prefill_only: bool = False,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError for a prompt that could never run."""
        prompt = self._check_prompt(prompt_token_ids)
        seq = Sequence(request_id, prompt, params, rank=rank, prefill_only=prefill_only,
                       arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self.scheduler.add(seq)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, prompt, params.stop)

    def add_prefilled_request(self, request_id: str, prompt_token_ids: Seq[int],
                              first_token_id: int, params: SamplingParams, kv: Any,
                              rank: int = 1, num_cached_tokens: int = 0) -> None:
        """Continue a request prefilled elsewhere: ``kv`` holds its prompt's KV blocks
        (``[L, 2, n, block_size, kv_heads, head_dim]``, as :meth:`read_blocks` returns).

        When :meth:`reserve_prefix` pinned ``k`` cached blocks for ``request_id``, ``kv`` may
        hold just the blocks after them (what a pull of the rest returns; None when nothing
        is left) or all of them (the first ``k`` are then skipped).
        Raises :class:`~slaq.gpu_workers.engine.scheduler.NoRoomError` when there is no seat
        or room now, ValueError when nothing is left to generate or ``kv`` is too short.
        """
        prompt = self._check_prompt(prompt_token_ids)
        seq = Sequence(request_id, prompt, params, rank=rank, arrival_time=time.monotonic(),
                       output_token_ids=[first_token_id])
        bm = self.block_manager
        num_pinned = bm.num_pinned(request_id)
        # Checked before the scheduler takes it: allocation registers the blocks in the prefix
        # cache at once, so a hand-off aborted after it would leave cached blocks that hold no
        # KV (and could have preempted others for nothing).
        num_needed = bm.num_prefilled_kv_blocks(request_id, seq.num_tokens - 1)
        have = 0 if kv is None else int(kv.shape[2])
        try:
            if kv is not None:
                self.runner.check_blocks(kv)
            if num_needed and have != num_needed and have < num_pinned + num_needed:
                raise ValueError(f"kv has {have} blocks, the prompt needs {num_needed} "
                                 f"past {num_pinned} cached")
            blocks = self.scheduler.add_prefilled(seq, num_cached_tokens)
        except ValueError:
            bm.unpin(request_id)  # refused for good (NoRoomError keeps the pins: it waits)
            raise
        assert len(blocks) == num_needed
        if blocks:
            rows = kv if have == num_needed else kv[:, :, num_pinned:num_pinned + num_needed]
            try:
                self.runner.write_blocks(blocks, rows)
            except BaseException:
                # Allocation registered these blocks in the prefix cache: without their KV
                # they must not be found, and the request must not run for nobody.
                bm.uncache(blocks)
                self.scheduler.abort(request_id)
                raise
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop)
        detok.add([first_token_id])  # its text was streamed by the prefill side
        self._detok[request_id] = detok

    def reserve_prefix(self, request_id: str, prompt_token_ids: Seq[int]) -> int:
        """Pin the prompt's leading full blocks that this engine has cached, for a hand-off
        that :meth:`add_prefilled_request` (same ``request_id``) completes; returns how many.

        Their KV need not be pulled. The pinned blocks cannot be evicted until the request
        is added or :meth:`release_prefix` (or :meth:`abort`) gives them back.
        """
        prompt = self._check_prompt(prompt_token_ids)
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request {request_id!r} is already in this engine")
        return self.block_manager.pin_prefix(request_id, prompt)

    def release_prefix(self, request_id: str) -> int:
        """Give back the blocks :meth:`reserve_prefix` pinned (none: no-op); returns how many."""
        return self.block_manager.unpin(request_id)

    def pinned_requests(self) -> set[str]:
        """Request ids holding blocks :meth:`reserve_prefix` pinned (not added yet)."""
        return self.block_manager.pinned_keys()

    def _check_prompt(self, prompt_token_ids: Seq[int]) -> list[int]:
        prompt = [int(t) for t in prompt_token_ids]
        vocab = self.model_config.vocab_size
        # min/max run in C: a generator over a 100k-token prompt costs milliseconds.
        if prompt and (min(prompt) < 0 or max(prompt) >= vocab):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return prompt

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (waiting, running, leased or only reserved)."""
        self.scheduler.abort(request_id)
        self.block_manager.unpin(request_id)
        self._forget(request_id)
        # A step not read yet may hold its last token (its end already decided): that must
        # reach nobody, least of all a new request that reuses the id.
        for held in (self._pending, self._inflight):
            if held is not None:
                held.dropped.add(request_id)

    def has_unfinished(self) -> bool:
        """True while anything is queued, running, or has outputs not yet returned."""
        return (self._pending is not None or self._inflight is not None
                or self.scheduler.has_unfinished())

    def can_progress(self) -> bool:
        """Whether a :meth:`step` would do work now: outputs are pending, a launched step is
        unread, or the scheduler has work (:meth:`Scheduler.can_progress`)."""
        return (self._pending is not None or self._inflight is not None
                or self.scheduler.can_progress())

    # -- disaggregation ----------------------------------------------------------------

    def leased_blocks(self, request_id: str) -> list[int]:
        """Blocks holding a finished prefill_only request's prompt KV, in token order."""
        seq = self.scheduler.leased(request_id)
        if seq is None:
            return []
        return seq.block_table[:self.block_manager.num_blocks_for(seq.num_computed_tokens)]

    def free_request(self, request_id: str) -> None:
        """The owner releases a lease (its blocks go back to the pool / prefix cache)."""
        self.scheduler.free_leased(request_id)
        self._forget(request_id)

    def read_blocks(self, block_ids: list[int]) -> Any:
        """A copy of KV blocks: ``[num_layers, 2, n, block_size, kv_heads, head_dim]``."""
        return self.runner.read_blocks(block_ids)

    # -- stepping ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run and apply one step; return what each touched request produced.

        With asynchronous output processing the outputs returned are the previous step's,
        built while this step's forward ran; a step with nothing scheduled returns the rest.
        With asynchronous scheduling likewise, and a step with nothing left to launch reads
        and returns the one in flight.
        """
        if self._schedule_ahead:
            return self._step_ahead()
        out = self.scheduler.schedule()
        pending, self._pending = self._pending, None
        ready: list[RequestOutput] = []
        stopped: set[str] = set()

        def build_pending() -> None:
            nonlocal pending
            if pending is not None:
                ready.extend(self._build_outputs(pending, stopped))
                pending = None

        t0 = time.perf_counter()
        if out.is_empty:
            runner_out = RunnerOutput()
        else:
            runner_out = self.runner.execute(out, overlap=build_pending if pending else None)
        build_pending()  # a no-op when the runner already did it during the forward
        for rid in stopped:
            # Its row of this step was sampled after the stop: drop the per-request state
            # the sampler may have made again.
            self._forget(rid)
        finished = self.scheduler.update(out, runner_out, self.eos_token_ids)
        self._record(out, runner_out, time.perf_counter() - t0)
        if not (self._async_output and not out.is_empty):
            return ready + self._build_outputs(
                _StepResult(out.scheduled, runner_out, finished, stopped), set())
        # First tokens are not held back a step: time to first token is what tiers promise
        # (and a prefill-only request's hand-off starts from it). The rest waits for the
        # next step's forward.
        first: list[ScheduledSequence] = []
        rest: list[ScheduledSequence] = []
        for item in out.scheduled:
            (first if item.sample and item.seq.num_output_tokens == 1 else rest).append(item)
        if first:
            ready += self._build_outputs(_StepResult(first, runner_out, [], stopped), set())
            self._pending = (_StepResult(rest, runner_out, finished, stopped)
                             if rest or finished else None)
        else:
            self._pending = _StepResult(out.scheduled, runner_out, finished, stopped)
        return ready

    def _step_ahead(self) -> list[RequestOutput]:
        """One step with asynchronous scheduling (see the module's doc)."""
        prev, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        launched = None
        if not out.is_empty and all(i.seq.params.argmax_only and not i.seq.prefill_only
                                    for i in out.scheduled if i.sample):
            launched = self.runner.launch(out, None if prev is None else prev.launched)
        ended: set[str] = set()  # sequences of `out` ended since it was scheduled
        ready = [] if prev is None else self._apply_launched(prev, ended)
        if launched is not None:
            early = self.scheduler.advance(out)
            self._inflight = _InFlight(out, launched, early, ended, time.perf_counter())
            return ready
        t0 = time.perf_counter()  # a step that must see its tokens at once: after `prev`
        if ended:  # `prev` ended them after `out` was scheduled: their blocks are gone
            out.scheduled = [i for i in out.scheduled if i.seq.request_id not in ended]
        runner_out = RunnerOutput() if out.is_empty else self.runner.execute(out)
        finished = self.scheduler.update(out, runner_out, self.eos_token_ids)
        self._record(out, runner_out, time.perf_counter() - t0)
        return ready + self._build_outputs(
            _StepResult(out.scheduled, runner_out, finished, ended), set())

    def _apply_launched(self, step: _InFlight, ended: set[str]) -> list[RequestOutput]:
        """Read a launched step's tokens, put them in place and build its outputs; the
        requests that this ends go into ``ended``."""
        runner_out = step.launched.collect()
        self._record(step.out, runner_out, time.perf_counter() - step.launch_time)
        resolved = self.scheduler.resolve(step.out, runner_out, self.eos_token_ids)
        ended.update(seq.request_id for seq in resolved)
        return self._build_outputs(
            _StepResult(step.out.scheduled, runner_out, step.ended_early + resolved,
                        step.dropped), ended)

    def _build_outputs(self, result: _StepResult, stopped: set[str]) -> list[RequestOutput]:
        """Detokenise a step's tokens; requests a stop string ends go into ``stopped``."""
        sampled = result.runner_out.sampled_token_ids
        # A request aborted since the step ran gets nothing more (its caller is gone):
        # abort() puts it in the held step's `dropped`.
        outputs = [self._output(item.seq, result.runner_out, stopped)
                   for item in result.scheduled
                   if item.seq.request_id in sampled
                   and item.seq.request_id not in result.dropped]
        # Sequences the scheduler ended without running them (they outgrew the pool).
        outputs += [self._output(seq, result.runner_out, stopped) for seq in result.finished
                    if seq.request_id not in sampled and seq.request_id not in result.dropped]
        return outputs

    def _output(self, seq: Sequence, runner_out: RunnerOutput,
                stopped: set[str]) -> RequestOutput:
        rid = seq.request_id
        token_id = runner_out.sampled_token_ids.get(rid)
        new_ids = [] if token_id is None else [token_id]
        detok = self._detok.get(rid)
        text = detok.add(new_ids) if detok is not None else ""
        reason = seq.finish_reason
        if detok is not None and detok.stopped:
            if not seq.is_finished or reason == PREFILL_DONE:
                self.scheduler.finish(rid, "stop")
                stopped.add(rid)
            reason = "stop"
        elif detok is not None and seq.is_finished and reason != PREFILL_DONE:
            text += detok.flush()
        finished = seq.is_finished
        if finished:
            # Its end goes out now, with its last token: if schedule() decided it (the
            # sequence outgrew the pool while that token was on its way), not once more.
            self.scheduler.discard_pending_end(seq)
        if finished and reason != PREFILL_DONE:
            self._forget(rid)
        lp = runner_out.logprobs.get(rid)
        return RequestOutput(
            request_id=rid, new_token_ids=new_ids, new_text=text, finished=finished,
            finish_reason=reason if finished else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens, logprobs=None if lp is None else [lp])

    def _forget(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        if hasattr(self.runner, "free_request_state"):
            self.runner.free_request_state(request_id)

    def _record(self, out: SchedulerOutput, runner_out: RunnerOutput, dt: float) -> None:
        self._num_steps += 1
        prefill = sum(i.num_new_tokens for i in out.scheduled if i.is_prefill)
        decode = out.num_batched_tokens - prefill
        self._prompt_tokens += prefill
        self._generation_tokens += len(runner_out.sampled_token_ids)
        now = time.monotonic()
        if out.scheduled:
            self._recent.append((now, dt, prefill, decode))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def stats(self) -> EngineStats:
        """Counters and recent token rates (rates over the last RATE_WINDOW_S seconds)."""
        now = time.monotonic()
        recent = [r for r in self._recent if r[0] >= now - RATE_WINDOW_S]
        span = now - min((end - dt for end, dt, _, _ in recent), default=now)
        span = max(span, 1e-6)
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_blocks_total=bm.num_blocks, num_blocks_used=bm.num_used_blocks,
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            num_leased=sched.num_leased, num_preemptions=sched.num_preemptions,
            last_batch_size=sched.last_batch_size,
            max_batch_size_seen=sched.max_batch_size_seen, num_steps=self._num_steps,
            num_prompt_tokens_total=self._prompt_tokens,
            num_generation_tokens_total=self._generation_tokens,
            prefill_tokens_per_s=sum(r[2] for r in recent) / span if recent else 0.0,
            decode_tokens_per_s=sum(r[3] for r in recent) / span if recent else 0.0,
            prefix_cache_queries_tokens=bm.num_prefix_queries_tokens,
            prefix_cache_hits_tokens=bm.num_prefix_hit_tokens,
            handoff_blocks_total=bm.num_handoff_blocks,
            handoff_blocks_reused=bm.num_handoff_reused_blocks,
            prefix_hashes=bm.prefix_summary(),
        )

    # -- convenience -------------------------------------------------------------------

    def generate(self, prompts: Seq[Seq[int]],
                 params: SamplingParams | Seq[SamplingParams]) -> list[Completion]:
        """Run prompts to completion together (tests, benchmarks); results in prompt order."""
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        ids = [f"gen-{self._num_steps}-{i}" for i in range(len(prompts))]
        results = {rid: Completion(rid, [], "", None) for rid in ids}
        for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(rid, prompt, p)
        pending = set(ids)
        while pending:
            for out in self.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.token_ids += out.new_token_ids
                res.text += out.new_text
                if out.logprobs is not None:
                    res.logprobs = (res.logprobs or []) + out.logprobs
                if out.finished:
                    res.finish_reason = out.finish_reason
                    pending.discard(out.request_id)
        return [results[rid] for rid in ids]
