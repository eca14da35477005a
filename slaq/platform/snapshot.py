"""What the reprioritiser sees (:class:`Snapshot`) and what it decides (the actions). IO-free.

The live beat job builds a snapshot from Redis heartbeats, broker queue lengths and the
ledger; the simulator builds one from its simulated workers. Both hand it to
:func:`slaq.platform.policy.decide`, and both apply the actions that come back. Every action
can describe itself for the ``scheduling_decisions`` table (``kind``, ``target``, ``reason``,
``inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slaq.platform.pressure import Heartbeat
from slaq.platform.tiers import TIER_NAMES


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One tier's backlog: what the ledger says is queued, and what the broker holds.

    ``broker_depth`` is None when unknown (then orphan detection by count is skipped).
    """

    num_queued: int = 0
    num_prompt_tokens: int = 0
    broker_depth: int | None = None

    def __post_init__(self) -> None:
        if self.num_queued < 0 or self.num_prompt_tokens < 0:
            raise ValueError("queue counts must be >= 0")


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request the ledger holds as ``queued``: its tier, age, and where its ticket is."""

    request_id: str
    attempt: int
    tier: str  # the tier used (after any downgrade): its targets apply
    arrival_time: float
    num_prompt_tokens: int
    queue_tier: str  # the queue its live ticket is on (differs from tier once aged)
    priority: int  # Redis-style message priority of that ticket, 0 most urgent
    ticketed_at: float

    def __post_init__(self) -> None:
        if self.tier not in TIER_NAMES or self.queue_tier not in TIER_NAMES:
            raise ValueError("unknown tier")


@dataclass(frozen=True, slots=True)
class InflightRequest:
    """A request a worker has claimed (``prefilling`` or ``decoding``)."""

    request_id: str
    attempt: int
    tier: str
    state: str
    worker: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class Arrivals:
    """Requests admitted since the previous snapshot, per tier (feeds the rate estimate)."""

    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # requested max tokens (an upper bound of the decode work)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one policy cycle reads. ``now`` is in the same clock as heartbeat times."""

    now: float
    heartbeats: tuple[Heartbeat, ...] = ()
    queues: dict[str, QueueStats] = field(default_factory=dict)
    queued: tuple[QueuedRequest, ...] = ()
    inflight: tuple[InflightRequest, ...] = ()
    arrivals: dict[str, Arrivals] = field(default_factory=dict)

    def queue(self, tier: str) -> QueueStats:
        return self.queues.get(tier) or QueueStats()


# ---- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetGate:
    """Open or close the ``prefill.<tier>`` (or aggregated) queue for workers of ``role``.

    Live: Celery ``cancel_consumer`` / ``add_consumer`` on the workers of that role.
    """

    role: str
    tier: str
    open: bool
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)

    kind = "gate"

    @property
    def target(self) -> str:
        return f"{self.role}:{self.tier}"


@dataclass(frozen=True, slots=True)
class Reticket:
    """Send a new prefill ticket for ``request_id`` with ``attempt`` (the ledger's attempt is
    bumped to it first, so the old ticket is stale and dropped at claim)."""

    request_id: str
    attempt: int
    queue_tier: str
    priority: int
    reason: str
    why: str = "age"  # "age" (deadline near) or "orphan" (lost ticket or dead worker)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.why

    @property
    def target(self) -> str:
        return self.request_id


@dataclass(frozen=True, slots=True)
class SetRouting:
    """Decode routing weights per worker (sum 1; absent = 0). Prefill workers choose a decode
    worker with probability proportional to its weight."""

    weights: MappingProxyType[str, float]
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)

    kind = "routing"
    target = "decode"


@dataclass(frozen=True, slots=True)
class SetAdmission:
    """How the API admits new requests of ``tier`` until the next decision.

    Up to ``budget_tokens`` prompt tokens are admitted as asked (``None`` = no limit; the API
    keeps the count, e.g. with Redis ``DECRBY``); past the budget ``mode`` applies:
    ``downgrade`` (serve as ``downgrade_to``; the response's ``service_tier`` shows it) or
    ``refuse`` (429 with ``Retry-After: retry_after_s``). ``accept`` has no budget.
    While a budget is live, a prompt longer than ``max_prompt_tokens`` (``None`` = no cut)
    goes to the fallback at once without taking from the budget; see :func:`takes_budget`.
    """

    tier: str
    mode: str
    predicted_ttft_ms: float
    reason: str
    budget_tokens: int | None = None
    downgrade_to: str | None = None
    retry_after_s: int = 1
    inputs: dict[str, Any] = field(default_factory=dict)
    # Last, so that positional construction of the fields above stays as it was.
    max_prompt_tokens: int | None = None

    kind = "admission"

    def __post_init__(self) -> None:
        if self.mode not in ADMISSION_MODES:
            raise ValueError(f"admission mode must be one of {ADMISSION_MODES}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1")

    @property
    def target(self) -> str:
        return self.tier


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's figure: workers needed to meet every tier's SLA at the observed rates."""

    num_prefill: int
    num_decode: int
    num_aggregated: int
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)

    kind = "plan"
    target = "cluster"


Action = SetGate | Reticket | SetRouting | SetAdmission | Plan
ADMISSION_MODES = ("accept", "downgrade", "refuse")


def takes_budget(budget_left: int | None, num_prompt_tokens: int,
                 max_prompt_tokens: int | None = None) -> bool:
    """The one admission rule, shared by the live API and the simulator: is a request of
    ``num_prompt_tokens`` admitted as asked, taking them from its tier's budget?

    * no live budget (``None``: no decision, or it expired) admits everything, uncounted;
    * a prompt over the cut ``max_prompt_tokens`` falls back and takes nothing;
    * otherwise it is admitted, and takes its tokens, only if they fit what is left;
      one that does not fit falls back and **takes nothing**, so the budget never goes
      negative and a later, shorter prompt that still fits is admitted within the cycle.

    The caller subtracts ``num_prompt_tokens`` when this is True. The API does the check and
    the take in one Lua script (:meth:`slaq.platform.decisions.AdmissionCache.admit`), so
    concurrent API threads cannot overdraw the budget between the two.
    """
    if budget_left is None:
        return True
    if max_prompt_tokens is not None and num_prompt_tokens > max_prompt_tokens:
        return False
    return num_prompt_tokens <= budget_left
