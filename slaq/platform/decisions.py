"""The reprioritiser's decisions: recorded in PostgreSQL, published in Redis, read back cheaply.

Writers (the beat job, :mod:`slaq.tasks.reprioritise`):

* :func:`record_decisions` — one ``scheduling_decisions`` row per policy action;
* :func:`publish_state` — the *whole* current state every cycle (not just changes), so a Redis
  restart loses at most one cycle: hash ``gates`` (``<role>:<tier>`` → ``open``/``closed``),
  hash ``routing`` (worker → weight), hash ``admission`` (tier → JSON of
  :class:`AdmissionState`). These keys carry no TTL: if beat dies, serving goes on with the
  last decisions. The per-cycle prompt-token budgets ``admission:budget:<tier>`` do expire
  (a few intervals): without a reprioritiser nothing is refused or downgraded;
* :func:`remember_tickets` — ``ticket:<request_id>`` (JSON, TTL): which queue and priority a
  re-ticketed request's live ticket is on, so the next cycle does not age it again.

Readers (API processes, prefill workers, the snapshot): :func:`read_admission`,
:class:`AdmissionCache` (``admit(tier, num_prompt_tokens)`` → :class:`AdmissionVerdict`),
:func:`read_routing`, :func:`choose_decode_worker`, :func:`read_gates`, :func:`read_tickets`.
Every reader treats missing state as "no decision": accept, route by pressure, gate open.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import insert
from sqlalchemy.orm import Session

from slaq.platform.keys import admission_key, gates_key, routing_key
from slaq.platform.models import SchedulingDecision
from slaq.platform.policy import choose_weighted
from slaq.platform.pressure import Heartbeat, pick_decode_worker
from slaq.platform.snapshot import (
    ADMISSION_MODES,
    Action,
    Plan,
    Reticket,
    SetAdmission,
    SetGate,
    SetRouting,
)
from slaq.platform.tiers import TIER_NAMES

log = logging.getLogger(__name__)

TICKET_PREFIX = "ticket:"
BUDGET_PREFIX = "admission:budget:"

# takes_budget (slaq.platform.snapshot) as one atomic step, so that API threads admitting at
# once cannot overdraw it: nil when no budget is live (admit, uncounted); -1 when the prompt
# ARGV[1] is over the cut ARGV[2] (when >= 0) or over what is left (fall back, take nothing);
# else what is left after taking it (>= 0). DECRBY keeps the key's TTL.
_TAKE_BUDGET = """
local left = redis.call('GET', KEYS[1])
if not left then return nil end
local n = tonumber(ARGV[1])
local cut = tonumber(ARGV[2])
if cut >= 0 and n > cut then return -1 end
if n > tonumber(left) then return -1 end
return redis.call('DECRBY', KEYS[1], n)
"""


def budget_key(tier: str) -> str:
    """Prompt tokens still admitted as asked for ``tier`` until the next cycle (integer)."""
    return f"{BUDGET_PREFIX}{tier}"


def ticket_key(request_id: str) -> str:
    """Where the live ticket of a re-ticketed request is (JSON ``{queue_tier, priority, ...}``)."""
    return f"{TICKET_PREFIX}{request_id}"


# ---- recording ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    # JSONB rejects NaN/Infinity; an infinite predicted TTFT is recorded as null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def decision_row(action: Action, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``scheduling_decisions`` columns for one action: kind, target, reason, inputs.

    ``inputs`` holds the action's own inputs plus what it decided (so a row can be replayed
    without the action object); ``extra`` adds what applying it found (e.g. ``applied``).
    """
    decided: dict[str, Any]
    if isinstance(action, SetGate):
        decided = {"role": action.role, "tier": action.tier, "open": action.open}
    elif isinstance(action, Reticket):
        decided = {"attempt": action.attempt, "queue_tier": action.queue_tier,
                   "priority": action.priority}
    elif isinstance(action, SetRouting):
        decided = {"weights": {w: round(v, 4) for w, v in action.weights.items()}}
    elif isinstance(action, SetAdmission):
        decided = {"mode": action.mode, "budget_tokens": action.budget_tokens,
                   "predicted_ttft_ms": action.predicted_ttft_ms,
                   "downgrade_to": action.downgrade_to, "retry_after_s": action.retry_after_s,
                   "max_prompt_tokens": action.max_prompt_tokens}
    elif isinstance(action, Plan):
        decided = {"num_prefill": action.num_prefill, "num_decode": action.num_decode,
                   "num_aggregated": action.num_aggregated}
    else:
        raise TypeError(f"not a policy action: {action!r}")
    inputs = {**action.inputs, **decided, **(extra or {})}
    return {"kind": action.kind, "target": action.target, "reason": action.reason,
            "inputs": _jsonable(inputs)}


def record_decisions(session: Session, actions: Iterable[Action], at: datetime,
                     extras: Mapping[int, Mapping[str, Any]] | None = None) -> int:
    """Insert one ``scheduling_decisions`` row per action (one batched INSERT); no commit.

    ``extras`` maps an action's index in ``actions`` to more inputs for its row.
    """
    if at.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    extras = extras or {}
    rows = [{**decision_row(a, extras.get(i)), "at": at} for i, a in enumerate(actions)]
    if rows:
        session.execute(insert(SchedulingDecision), rows)
    return len(rows)


# ---- publishing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdmissionState:
    """How the API admits new requests of one tier until the next decision.

    Up to ``budget_tokens`` prompt tokens (counted down in Redis) are admitted as asked; a
    request that does not fit what is left gets ``mode``: ``downgrade`` to ``downgrade_to`` or
    ``refuse`` with ``Retry-After: retry_after_s``, and takes nothing from the budget (the rule
    is :func:`slaq.platform.snapshot.takes_budget`, which the simulator applies too).
    ``accept`` or ``budget_tokens=None`` admits everything. A limited tier also sends a prompt
    longer than ``max_prompt_tokens`` (when set) to the fallback without touching the budget:
    a short budget then serves more requests.
    """

    tier: str
    mode: str = "accept"
    budget_tokens: int | None = None
    predicted_ttft_ms: float | None = None
    downgrade_to: str | None = None
    retry_after_s: int = 1
    at: float = 0.0  # Unix seconds of the decision
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ADMISSION_MODES:
            raise ValueError(f"admission mode must be one of {ADMISSION_MODES}")
        if self.mode == "downgrade" and self.downgrade_to not in TIER_NAMES:
            raise ValueError("a downgrade needs a tier to downgrade to")
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise ValueError("budget_tokens must be >= 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1")

    @property
    def limited(self) -> bool:
        return self.mode != "accept" and self.budget_tokens is not None

    @classmethod
    def from_action(cls, action: SetAdmission, at: float) -> AdmissionState:
        p = action.predicted_ttft_ms
        return cls(action.tier, action.mode, action.budget_tokens,
                   p if math.isfinite(p) else None, action.downgrade_to, action.retry_after_s,
                   at, action.max_prompt_tokens)

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "budget_tokens": self.budget_tokens,
                           "predicted_ttft_ms": self.predicted_ttft_ms,
                           "downgrade_to": self.downgrade_to,
                           "retry_after_s": self.retry_after_s, "at": self.at,
                           "max_prompt_tokens": self.max_prompt_tokens})

    @classmethod
    def from_json(cls, tier: str, text: str | bytes) -> AdmissionState:
        d = json.loads(text)
        budget = d.get("budget_tokens")
        cut = d.get("max_prompt_tokens")
        return cls(tier, d.get("mode", "accept"), None if budget is None else int(budget),
                   d.get("predicted_ttft_ms"), d.get("downgrade_to"),
                   int(d.get("retry_after_s") or 1), float(d.get("at") or 0.0),
                   None if cut is None else int(cut))


@dataclass(frozen=True, slots=True)
class AdmissionVerdict:
    """What the API does with one request: serve it as ``tier``, or refuse it (429)."""

    tier: str
    refused: bool = False
    retry_after_s: int = 1
    reason: str = ""


def publish_state(client: redis.Redis, *, gates: Mapping[tuple[str, str], bool],
                  routing: Mapping[str, float], admission: Mapping[str, AdmissionState],
                  budget_ttl_s: float = 10.0) -> None:
    """Replace the published hashes and the admission budgets in one MULTI (readers never see
    half a cycle). A budget lives ``budget_ttl_s``: without a reprioritiser to renew it, the
    API admits as asked rather than refusing on a stale count."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(gates_key(), routing_key(), admission_key(),
                *(budget_key(t) for t in TIER_NAMES))
    if gates:
        pipe.hset(gates_key(), mapping={f"{role}:{tier}": "open" if is_open else "closed"
                                        for (role, tier), is_open in gates.items()})
    if routing:
        pipe.hset(routing_key(), mapping={w: repr(float(v)) for w, v in routing.items()})
    if admission:
        pipe.hset(admission_key(), mapping={t: a.to_json() for t, a in admission.items()})
    for tier, a in admission.items():
        if a.limited:
            pipe.set(budget_key(tier), int(a.budget_tokens or 0),
                     px=max(1, int(budget_ttl_s * 1000)))
    pipe.execute()


def remember_tickets(client: redis.Redis, tickets: Iterable[tuple[Reticket, float]],
                     ttl_s: float) -> None:
    """Record where each re-ticketed request's live ticket now is (``ticket:<id>``, TTL)."""
    pipe = client.pipeline(transaction=False)
    n = 0
    for action, at in tickets:
        pipe.set(ticket_key(action.request_id),
                 json.dumps({"attempt": action.attempt, "queue_tier": action.queue_tier,
                             "priority": action.priority, "at": at}),
                 px=max(1, int(ttl_s * 1000)))
        n += 1
    if n:
        pipe.execute()


# ---- readers ------------------------------------------------------------------------------


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def read_gates(client: redis.Redis) -> dict[tuple[str, str], bool]:
    """``{(role, tier): open}`` as last published; a gate not listed is open."""
    out: dict[tuple[str, str], bool] = {}
    for field, value in client.hgetall(gates_key()).items():
        role, _, tier = _text(field).partition(":")
        out[(role, tier)] = _text(value) != "closed"
    return out


def read_routing(client: redis.Redis) -> dict[str, float]:
    """Decode routing weights ``{worker: weight}``; empty = no decision (route by pressure)."""
    out: dict[str, float] = {}
    for field, value in client.hgetall(routing_key()).items():
        try:
            out[_text(field)] = float(_text(value))
        except ValueError:
            log.warning("ignoring malformed routing weight %r=%r", field, value)
    return out


def read_admission(client: redis.Redis) -> dict[str, AdmissionState]:
    """Every tier's admission state; tiers with nothing published are ``accept``."""
    raw = client.hgetall(admission_key())
    out = {tier: AdmissionState(tier) for tier in TIER_NAMES}
    for field, value in raw.items():
        tier = _text(field)
        if tier not in out:
            continue
        try:
            out[tier] = AdmissionState.from_json(tier, value)
        except (ValueError, TypeError):
            log.warning("ignoring malformed admission state for %s: %r", tier, value)
    return out


class AdmissionCache:
    """The API's side of admission: cached states plus the per-request budget count.

    :func:`read_admission` runs at most once per ``ttl_s`` per process (thread-safe);
    :meth:`admit` costs one Redis call, and only for a tier that is limited. Redis errors
    admit as asked: admission must not fail requests because the control plane is away.
    """

    def __init__(self, client: redis.Redis, ttl_s: float = 0.5) -> None:
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        self._r = client
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._states: dict[str, AdmissionState] = {}
        self._read_at = -math.inf
        self._take = client.register_script(_TAKE_BUDGET)

    def get(self, tier: str) -> AdmissionState:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at >= self.ttl_s:
                try:
                    self._states = read_admission(self._r)
                except redis.RedisError:
                    log.warning("cannot read admission state; keeping the last one",
                                exc_info=True)
                self._read_at = now
            return self._states.get(tier) or AdmissionState(tier)

    def admit(self, tier: str, num_prompt_tokens: int) -> AdmissionVerdict:
        """Serve as ``tier``, as its fallback tier, or refuse (the tier's policy says which).

        :func:`~slaq.platform.snapshot.takes_budget` decides, atomically in Redis: a request
        that does not fit the budget left falls back and takes nothing from it.
        """
        state = self.get(tier)
        if not state.limited:
            return AdmissionVerdict(tier)
        n = max(0, int(num_prompt_tokens))
        cut = -1 if state.max_prompt_tokens is None else state.max_prompt_tokens
        try:
            # The cut applies only while a budget is live, like the budget itself.
            left = self._take(keys=[budget_key(tier)], args=[n, cut])
        except redis.RedisError:
            log.warning("cannot take from the admission budget; admitting", exc_info=True)
            return AdmissionVerdict(tier)
        if left is None or int(left) >= 0:
            return AdmissionVerdict(tier)
        why = (f"predicted TTFT of {tier} is over its target"
               + (f" ({state.predicted_ttft_ms:.0f} ms)" if state.predicted_ttft_ms else ""))
        if 0 <= cut < n:
            why += f"; prompts over {cut} tokens fall back first"
        if state.mode == "downgrade" and state.downgrade_to is not None:
            return AdmissionVerdict(state.downgrade_to, reason=why)
        return AdmissionVerdict(tier, refused=True, retry_after_s=state.retry_after_s,
                                reason=why)


def choose_decode_worker(weights: Mapping[str, float], heartbeats: Iterable[Heartbeat],
                         now: float, max_age_s: float, u: float,
                         exclude: Iterable[str] = ()) -> str | None:
    """The decode worker for a prefilled request.

    Weighted choice (``u`` uniform in [0, 1)) among the published weights of live, not
    excluded decode workers; when none of them has a weight (no decision yet, or a new
    worker set), the lowest-pressure live worker; ``None`` when none is alive.
    """
    excluded = set(exclude)
    live = [hb for hb in heartbeats if hb.role == "decode" and hb.worker not in excluded
            and hb.is_fresh(now, max_age_s)]
    usable = {hb.worker: weights[hb.worker] for hb in live if weights.get(hb.worker, 0.0) > 0}
    if usable:
        return choose_weighted(usable, u)
    hb = pick_decode_worker(live, now, max_age_s)
    return hb.worker if hb is not None else None


def read_tickets(client: redis.Redis, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """``{request_id: {attempt, queue_tier, priority, at}}`` for those re-ticketed."""
    if not request_ids:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for rid, raw in zip(request_ids, client.mget([ticket_key(r) for r in request_ids]),
                        strict=True):
        if raw is None:
            continue
        try:
            out[rid] = json.loads(raw)
        except ValueError:
            continue
    return out
