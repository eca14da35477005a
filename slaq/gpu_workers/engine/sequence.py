"""A request inside the engine. ``Sequence`` owns its token counters; the block manager owns
its ``block_table`` (only the block manager mutates it). IO-free.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from slaq.gpu_workers.engine.config import SamplingParams

# Stands for a sampled token not known yet: with asynchronous scheduling the next step is
# scheduled (and its input taken from the device) before the host sees this step's tokens.
PLACEHOLDER_TOKEN_ID = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token state of one request.

    Invariants: ``num_computed_tokens <= num_tokens``; the KV of the first
    ``num_computed_tokens`` tokens lives in ``block_table``; ``num_cached_tokens`` counts
    prompt tokens whose KV came from the prefix cache (or a transfer) rather than compute.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    rank: int = 1  # tier rank: 0 most important; preemption takes the highest rank first
    arrival_time: float = 0.0
    # Prefill-only sequences (disaggregated prefill worker) stop after their first token and
    # keep their blocks until ``free`` is called for them.
    prefill_only: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must have at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_id_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def slots(self, start: int, end: int, block_size: int) -> list[int]:
        """The pool slots (``block * block_size + offset``) of tokens ``[start, end)``."""
        table = self.block_table
        return [table[pos // block_size] * block_size + pos % block_size
                for pos in range(start, end)]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def set_token(self, index: int, token_id: int) -> None:
        """Put the sampled ``token_id`` where a placeholder holds its place (position
        ``index`` of prompt + output)."""
        i = index - len(self.prompt_token_ids)
        assert 0 <= i and self.output_token_ids[i] == PLACEHOLDER_TOKEN_ID, "no placeholder there"
        self.output_token_ids[i] = token_id

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: generated tokens stay, their KV is dropped."""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
