"""Typed boundary objects between engine steps. IO-free.

``Scheduler.schedule() -> SchedulerOutput``; ``ModelRunner.execute(out) -> RunnerOutput``;
``Scheduler.update(out, runner_output)``; ``LLMEngine.step() -> list[RequestOutput]``;
``LLMEngine.stats() -> EngineStats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slaq.gpu_workers.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step: tokens ``[start, start + num_new_tokens)`` are computed.

    The KV slots for those tokens are already allocated in ``seq.block_table``. A logit is
    sampled only when ``start + num_new_tokens == seq.num_tokens`` (``sample`` is True): the
    last chunk of a prefill, or a decode step.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    # Fixed at scheduling time: after ``Scheduler.update`` appends a token, the live sequence
    # length no longer tells whether this chunk was the sampling one.
    sample: bool = field(init=False)
    is_prefill: bool = field(init=False)

    def __post_init__(self) -> None:
        self.sample = self.start + self.num_new_tokens == self.seq.num_tokens
        self.is_prefill = self.start < self.seq.num_prompt_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What runs in one step. Prefill chunks and decodes may be mixed (chunked prefill)."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if not s.is_prefill)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    """Sampled token per request id, for each scheduled sequence whose ``sample`` was True."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # Optional top logprobs per request id: list of (token_id, logprob), chosen token first.
    logprobs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass(slots=True)
class RequestOutput:
    """What a step produced for one request: new tokens and text since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(slots=True)
class EngineStats:
    """A snapshot for heartbeats and metrics."""

    num_blocks_total: int
    num_blocks_used: int
    num_running: int
    num_waiting: int
    num_leased: int
    num_preemptions: int
    last_batch_size: int
    max_batch_size_seen: int
    num_steps: int
    num_prompt_tokens_total: int  # prompt tokens computed (prefix-cache hits excluded)
    num_generation_tokens_total: int  # tokens sampled
    prefill_tokens_per_s: float  # over the last RATE_WINDOW_S
    decode_tokens_per_s: float
    prefix_cache_queries_tokens: int
    prefix_cache_hits_tokens: int
    # Hand-offs: blocks of transferred KV prefilled requests needed, and those found cached
    # here (their KV was not pulled).
    handoff_blocks_total: int = 0
    handoff_blocks_reused: int = 0
    # Chain hashes of recently cached prefixes (BlockManager.prefix_summary), for routing.
    prefix_hashes: list[int] = field(default_factory=list)

    @property
    def max_batch_size(self) -> int:
        return self.max_batch_size_seen

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, 0..1."""
        return self.num_blocks_used / self.num_blocks_total if self.num_blocks_total else 0.0
