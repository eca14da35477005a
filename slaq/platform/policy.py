"""The reprioritisation policy: ``decide(snapshot, state, tiers, config) -> (actions, state)``.

Pure and IO-free: the live beat job (``slaq.tasks``) and the simulator (``slaq.sim``) call this
same function once per cycle and apply what it returns. What it does, each part switchable in
:class:`PolicyConfig` (``preset("fifo" | "static" | "slaq")``):

* **gates** per (role, tier) on decode KV pressure with high/low watermarks (hysteresis);
* **ticket order**: :func:`ticket_priority`, the message priority a new ticket gets within its
  tier's queue (shortest prompt first, by length bucket, in ``length_ordered_tiers``);
* **release** of ``flex``/``batch`` only into spare capacity (also with hysteresis);
* **deadline aging**: queued requests whose TTFT slack is small get a ticket one tier up;
* **routing** weights for decode workers from their KV pressure;
* **admission**: per tier, a prompt-token budget that keeps the work queued ahead of a new
  request within its TTFT target (from queued work, prefill capacity and the inflow of more
  important tiers); past it the tier's fallback applies: downgrade or refuse. A short budget
  also cuts prompts longer than a few fair shares of it (``SetAdmission.max_prompt_tokens``,
  also recorded in the decision's inputs), so it serves more requests;
* **orphan recovery**: work of dead workers and queued requests whose ticket was lost;
* the **planner** figure: prefill / decode workers needed at the observed arrival rates.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from slaq.platform.pressure import Heartbeat
from slaq.platform.snapshot import (
    Action,
    Plan,
    Reticket,
    SetAdmission,
    SetGate,
    SetRouting,
    Snapshot,
)
from slaq.platform.tiers import TIER_NAMES, TierTable

RELEASED_TIERS = ("flex", "batch")
AGED_PRIORITY = 9  # Redis-style: the least urgent message priority within a queue


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Knobs of the policy. Capacities are per worker (from the cost model or measured)."""

    enable_gates: bool = True
    enable_release: bool = True
    enable_aging: bool = True
    enable_routing: bool = True
    enable_admission: bool = True
    enable_orphans: bool = True
    # (high, low) decode KV pressure watermarks per gated tier: close at >= high, open at <= low.
    # Default's band is narrow: a wide one (it was 0.95 / 0.85) held default tickets while a
    # tenth of the cluster's KV drained, and those waits were most of default's misses on
    # Mooncake; priority's headroom comes from its queue order (``length_ordered_tiers``).
    watermarks: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "default": (0.98, 0.96), "flex": (0.85, 0.70), "batch": (0.80, 0.65)})
    # Release flex/batch once the queueing delay of priority and default falls under
    # open * their TTFT targets; hold them once it exceeds close * target.
    release_open: float = 0.3
    release_close: float = 0.6
    # Age a queued request once its slack falls under this share of its TTFT target.
    aging_fraction: float = 0.5
    max_retickets: int = 200  # per cycle (least slack first), so one cycle stays fast
    admission_margin: float = 0.9  # admit while predicted TTFT <= margin * target
    # When a tier's budget is short, a request may take at most this many times its fair share
    # of the cycle's budget (budget / expected admitted requests): the longest prompts fall
    # back first, so the budget serves more requests. 0 disables the cut.
    admission_share_factor: float = 2.0
    heartbeat_max_age_s: float = 3.0
    orphan_timeout_s: float = 30.0
    rate_halflife_s: float = 3.0  # EWMA of arrival rates (planner, admission)
    prefill_capacity_tok_s: float = 30000.0
    decode_capacity_tok_s: float = 8000.0
    planner_utilisation: float = 0.8
    routing_exponent: float = 2.0
    # Tiers whose new tickets are ordered shortest prompt first within their queue (message
    # priority by prompt-length bucket, see ticket_priority); others keep arrival order.
    length_ordered_tiers: tuple[str, ...] = ("priority",)
    length_bucket_tokens: int = 1024  # upper bound of the first bucket; each next one doubles

    def __post_init__(self) -> None:
        for tier, (high, low) in self.watermarks.items():
            if tier not in TIER_NAMES or not 0 <= low < high <= 1.0001:
                raise ValueError(f"watermarks[{tier!r}] must be 0 <= low < high <= 1")
        if not 0 < self.release_open <= self.release_close:
            raise ValueError("need 0 < release_open <= release_close")
        if not 0 < self.aging_fraction < 1:
            raise ValueError("aging_fraction must be in (0, 1)")
        if self.prefill_capacity_tok_s <= 0 or self.decode_capacity_tok_s <= 0:
            raise ValueError("capacities must be > 0")
        if self.admission_share_factor < 0:
            raise ValueError("admission_share_factor must be >= 0")
        if not 0 < self.planner_utilisation <= 1:
            raise ValueError("planner_utilisation must be in (0, 1]")
        if any(t not in TIER_NAMES for t in self.length_ordered_tiers):
            raise ValueError(f"length_ordered_tiers must name tiers of {TIER_NAMES}")
        if self.length_bucket_tokens < 1:
            raise ValueError("length_bucket_tokens must be >= 1")

    @classmethod
    def preset(cls, name: str, **overrides) -> PolicyConfig:
        """``fifo`` and ``static`` only recover orphans and plan; ``slaq`` does everything."""
        if name == "slaq":
            return cls(**overrides)
        if name in ("fifo", "static"):
            # No pressure signal: the platform's default router picks decode workers.
            off = dict(enable_gates=False, enable_release=False, enable_aging=False,
                       enable_admission=False, enable_routing=False, length_ordered_tiers=())
            return cls(**{**off, **overrides})
        raise ValueError(f"unknown policy preset {name!r} (fifo, static, slaq)")


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What one cycle hands the next. Treat as immutable; ``decide`` returns a new one."""

    time: float | None = None
    # Gates: absent = open. ``pressure_closed`` and ``release_closed`` are kept apart so each
    # keeps its own hysteresis; a queue is open when neither closes it.
    pressure_closed: frozenset[tuple[str, str]] = frozenset()
    release_closed: frozenset[str] = frozenset()
    # Tier -> (fallback mode, prompt-token budget) last decided.
    admission: MappingProxyType[str, tuple[str, int]] = field(
        default_factory=lambda: MappingProxyType({}))
    # EWMA per tier: (requests/s, prompt tokens/s, output tokens/s).
    rates: MappingProxyType[str, tuple[float, float, float]] = field(
        default_factory=lambda: MappingProxyType({}))
    plan: tuple[int, int, int] | None = None

    def is_open(self, role: str, tier: str) -> bool:
        return (role, tier) not in self.pressure_closed and tier not in self.release_closed


# ---- helpers shared with the simulator and the live router --------------------------------


def live_heartbeats(snapshot: Snapshot, max_age_s: float) -> list[Heartbeat]:
    return [hb for hb in snapshot.heartbeats if hb.is_fresh(snapshot.now, max_age_s)]


def decode_pressure(heartbeats: list[Heartbeat]) -> float:
    """Mean KV pressure of live decode-capable workers (1.0 when there are none)."""
    pool = [hb for hb in heartbeats if hb.role in ("decode", "both")]
    if not pool:
        return 1.0
    return sum(hb.pressure for hb in pool) / len(pool)


def gate_role(heartbeats: list[Heartbeat]) -> str:
    """Gates act on prefill workers when disaggregated, on ``both`` workers when aggregated."""
    return "prefill" if any(hb.role == "prefill" for hb in heartbeats) else "both"


def prefill_capacity(heartbeats: list[Heartbeat], config: PolicyConfig,
                     output_per_prompt: float = 0.0) -> float:
    """Prompt tokens/s the live prefill-capable workers sustain (measured rate if higher).

    An aggregated (``both``) worker also decodes what it prefills, so only its share of time
    left by ``output_per_prompt`` output tokens per prompt token counts.
    """
    cap = config.prefill_capacity_tok_s
    share = 1.0 / (1.0 + output_per_prompt * cap / config.decode_capacity_tok_s)
    total = 0.0
    for hb in heartbeats:
        if hb.role == "prefill":
            total += max(cap, hb.prefill_tokens_per_s)
        elif hb.role == "both":
            total += max(cap * share, hb.prefill_tokens_per_s)
    return total


def choose_weighted(weights: dict[str, float] | MappingProxyType[str, float], u: float) -> str | None:
    """Pick a key with probability proportional to its weight, given ``u`` uniform in [0, 1)."""
    total = sum(weights.values())
    if total <= 0:
        return None
    x = u * total
    last = None
    for name in sorted(weights):
        w = weights[name]
        if w <= 0:
            continue
        last = name
        x -= w
        if x < 0:
            return name
    return last


def ticket_priority(tiers: TierTable, tier: str, num_prompt_tokens: int,
                    config: PolicyConfig) -> int:
    """Message priority (Redis-style, 0 first) of a new ticket on ``prefill.<tier>``.

    In a length-ordered tier, shorter prompts go first: bucket 0 holds prompts of up to
    ``length_bucket_tokens``, each next bucket twice as long, the last (8) everything longer.
    Priority 9 (``AGED_PRIORITY``) stays for requests aged up from the tier below, behind the
    tier's own. Why: a worker takes the head ticket only when its KV pool has room for it, so
    a long prompt at the head holds every worker's pull until that much KV frees, while short
    prompts behind it would fit (and are the ones a 1 s TTFT can still be met for). The
    engine already prefills shortest first; this does it where the backlog waits. Other
    tiers keep arrival order at the tier's ``queue_priority``.
    """
    if tier not in config.length_ordered_tiers:
        return tiers[tier].queue_priority
    bucket, bound = 0, config.length_bucket_tokens
    while num_prompt_tokens > bound and bucket < AGED_PRIORITY - 1:
        bucket += 1
        bound *= 2
    return bucket


# ---- the policy ---------------------------------------------------------------------------


def decide(snapshot: Snapshot, state: PolicyState, tiers: TierTable,
           config: PolicyConfig) -> tuple[list[Action], PolicyState]:
    """One reprioritiser cycle: the actions to apply and the state for the next cycle."""
    live = live_heartbeats(snapshot, config.heartbeat_max_age_s)
    rates = _update_rates(snapshot, state, config)
    actions: list[Action] = []
    new_state = replace(state, time=snapshot.now, rates=rates)
    if config.enable_gates:
        new_state = _pressure_gates(live, new_state, config, actions)
    predicted = _predict(snapshot, live, rates, tiers, config)
    if config.enable_release:
        new_state = _release_gates(live, predicted, new_state, tiers, config, actions)
    if config.enable_aging:
        _age(snapshot, new_state, tiers, config, actions)
    if config.enable_routing:
        _route(live, config, actions)
    if config.enable_admission:
        interval = 1.0 if state.time is None else max(0.0, snapshot.now - state.time)
        new_state = _admission(predicted, rates, interval, new_state, tiers, config, actions)
    if config.enable_orphans:
        _orphans(snapshot, live, tiers, config, actions)
    new_state = _plan(live, rates, new_state, config, actions)
    return actions, new_state


def _update_rates(snapshot: Snapshot, state: PolicyState,
                  config: PolicyConfig) -> MappingProxyType[str, tuple[float, float, float]]:
    dt = None if state.time is None else snapshot.now - state.time
    if dt is None or dt <= 0:
        return state.rates
    alpha = 1.0 - 0.5 ** (dt / config.rate_halflife_s)
    out: dict[str, tuple[float, float, float]] = {}
    for tier in TIER_NAMES:
        a = snapshot.arrivals.get(tier)
        now = (0.0, 0.0, 0.0) if a is None else (
            a.num_requests / dt, a.num_prompt_tokens / dt, a.num_output_tokens / dt)
        old = state.rates.get(tier)
        if old is None:  # the first measurement: no history to average with
            out[tier] = now
        else:
            out[tier] = tuple(o + alpha * (n - o) for o, n in zip(old, now, strict=True))  # type: ignore[assignment]
    return MappingProxyType(out)


def _pressure_gates(live: list[Heartbeat], state: PolicyState, config: PolicyConfig,
                    actions: list[Action]) -> PolicyState:
    pressure = decode_pressure(live)
    role = gate_role(live)
    closed = set(state.pressure_closed)
    for tier, (high, low) in config.watermarks.items():
        key = (role, tier)
        was_open = state.is_open(role, tier)
        if key not in closed and pressure >= high:
            closed.add(key)
            reason = f"decode KV pressure {pressure:.2f} >= high watermark {high:.2f}"
        elif key in closed and pressure <= low:
            closed.discard(key)
            reason = f"decode KV pressure {pressure:.2f} <= low watermark {low:.2f}"
        else:
            continue
        now_open = key not in closed and tier not in state.release_closed
        if now_open != was_open:
            actions.append(SetGate(role, tier, now_open, reason,
                                   {"pressure": round(pressure, 4), "high": high, "low": low}))
    return replace(state, pressure_closed=frozenset(closed))


def _release_gates(live: list[Heartbeat], predicted: dict[str, Prediction], state: PolicyState,
                   tiers: TierTable, config: PolicyConfig, actions: list[Action]) -> PolicyState:
    role = gate_role(live)
    # Spare capacity = the queueing delay of the online tiers is a small share of their TTFT
    # targets (their own prefill time is left out: long prompts are not a lack of capacity).
    load = max(_queueing_ms(predicted["default"]) / tiers["default"].ttft_ms,
               _queueing_ms(predicted["priority"]) / tiers["priority"].ttft_ms)
    closed = set(state.release_closed)
    for tier in RELEASED_TIERS:
        was_open = state.is_open(role, tier)
        if tier in closed and load <= config.release_open:
            closed.discard(tier)
        elif tier not in closed and load > config.release_close:
            closed.add(tier)
        else:
            continue
        now_open = tier not in closed and (role, tier) not in state.pressure_closed
        if now_open != was_open:
            verb = "spare capacity" if now_open else "no spare capacity"
            actions.append(SetGate(role, tier, now_open,
                                   f"{verb}: online load {load:.2f} of TTFT targets",
                                   {"load": round(load, 4)}))
    return replace(state, release_closed=frozenset(closed))


@dataclass(frozen=True, slots=True)
class Prediction:
    """A tier's admission inputs: TTFT of a request arriving now, the prompt tokens ahead of
    it, and the prefill rate left to it after the more important tiers' inflow."""

    ttft_ms: float
    ahead_tokens: float
    avail_tok_s: float
    own_s: float = 0.0  # prefill time of the tier's mean prompt on one worker


def _queueing_ms(p: Prediction) -> float:
    if p.avail_tok_s <= 0:
        return math.inf
    return 1000.0 * p.ahead_tokens / p.avail_tok_s


def _predict(snapshot: Snapshot, live: list[Heartbeat],
             rates: MappingProxyType[str, tuple[float, float, float]],
             tiers: TierTable, config: PolicyConfig) -> dict[str, Prediction]:
    """Work ahead of a new request is the prompt tokens queued in tiers at least as important;
    it drains at the prefill capacity left after the inflow of the more important tiers."""
    prompt_rate = sum(r[1] for r in rates.values())
    ratio = sum(r[2] for r in rates.values()) / prompt_rate if prompt_rate > 0 else 0.0
    capacity = prefill_capacity(live, config, ratio)
    num_prefill = sum(1 for hb in live if hb.role in ("prefill", "both"))
    per_worker = capacity / num_prefill if num_prefill else 0.0
    out: dict[str, Prediction] = {}
    ahead = 0.0
    inflow = 0.0
    for tier in sorted(tiers, key=lambda t: t.rank):
        ahead += snapshot.queue(tier.name).num_prompt_tokens
        avail = capacity - inflow
        if capacity <= 0 or avail <= 0.05 * capacity:
            out[tier.name] = Prediction(math.inf, ahead, 0.0)
        else:
            rate = rates.get(tier.name, (0.0, 0.0, 0.0))
            own_s = (rate[1] / rate[0] if rate[0] > 0 else 0.0) / per_worker
            out[tier.name] = Prediction(1000.0 * (ahead / avail + own_s), ahead, avail, own_s)
        inflow += rates.get(tier.name, (0.0, 0.0, 0.0))[1]
    return out


def _age(snapshot: Snapshot, state: PolicyState, tiers: TierTable, config: PolicyConfig,
         actions: list[Action]) -> None:
    by_rank = sorted(tiers, key=lambda t: t.rank)
    up = {t.name: by_rank[max(0, i - 1)].name for i, t in enumerate(by_rank)}
    now = snapshot.now
    target_s = {t.name: t.ttft_ms / 1000.0 for t in tiers}
    window = {n: config.aging_fraction * v for n, v in target_s.items()}
    rank = {t.name: t.rank for t in tiers}
    # One tier up from its own, at most: aged work must not crowd out the tier above.
    up_rank = {n: rank[up[n]] for n in rank}
    candidates = []
    for q in snapshot.queued:
        tier = q.tier
        slack = target_s[tier] - (now - q.arrival_time)
        # Hopeless requests (slack <= 0) are left where they are: promoting them would only
        # make a request that can still meet its target late as well.
        if not 0 < slack < window[tier] or rank[q.queue_tier] <= up_rank[tier]:
            continue
        candidates.append((slack, q, up[tier]))
    if len(candidates) > config.max_retickets:
        candidates = heapq.nsmallest(config.max_retickets, candidates, key=lambda c: c[0])
    for slack, q, to in candidates:
        # The back of the queue above: ahead of its own tier's backlog, behind that tier.
        actions.append(Reticket(q.request_id, q.attempt + 1, to, AGED_PRIORITY,
                                f"TTFT slack {slack:.2f}s of {target_s[q.tier]:.1f}s",
                                "age", {"slack_s": round(slack, 3), "from": q.queue_tier}))


def _route(live: list[Heartbeat], config: PolicyConfig, actions: list[Action]) -> None:
    decode = [hb for hb in live if hb.role == "decode"]
    if not decode:
        return
    raw = {hb.worker: max(0.0, 1.0 - hb.pressure) ** config.routing_exponent for hb in decode}
    total = sum(raw.values())
    if total <= 0:
        # Every decode pool is full: spread evenly and let admission/gates hold new work.
        raw = {w: 1.0 for w in raw}
        total = float(len(raw))
    weights = {w: v / total for w, v in raw.items()}
    actions.append(SetRouting(MappingProxyType(weights), "weights ~ (1 - KV pressure)^2",
                              {w: round(hb.pressure, 3) for w, hb in
                               ((hb.worker, hb) for hb in decode)}))


def _admission(predicted: dict[str, Prediction],
               rates: MappingProxyType[str, tuple[float, float, float]], interval: float,
               state: PolicyState, tiers: TierTable, config: PolicyConfig,
               actions: list[Action]) -> PolicyState:
    """Per tier that may be downgraded or refused: a prompt-token budget that keeps the work
    ahead of its last admitted request within its TTFT target; past it, the tier's fallback.
    With a short budget, prompts longer than a few fair shares of it fall back at once."""
    modes = dict(state.admission)
    for tier in tiers:
        fallback = ("downgrade" if tier.downgrade_to is not None
                    else "refuse" if tier.refusable else None)
        p = predicted[tier.name]
        if fallback is None:
            continue
        # The last request admitted must find at most (target - own prefill) of work ahead.
        room = ((config.admission_margin * tier.ttft_ms / 1000.0 - p.own_s) * p.avail_tok_s
                - p.ahead_tokens)
        budget = int(max(0.0, room)) if math.isfinite(room) else 0
        # Emitted every cycle: the budget counts from this decision to the next.
        modes[tier.name] = (fallback, budget)
        max_prompt = _max_prompt_tokens(budget, rates.get(tier.name), interval, config)
        over_s = (p.ttft_ms - tier.ttft_ms) / 1000.0 if math.isfinite(p.ttft_ms) else 120.0
        actions.append(SetAdmission(
            tier.name, fallback, p.ttft_ms,
            f"budget {budget} prompt tokens keeps predicted TTFT under {tier.ttft_ms:.0f} ms",
            budget, tier.downgrade_to if fallback == "downgrade" else None,
            int(min(120, max(1, math.ceil(over_s)))),
            {"predicted_ttft_ms": round(p.ttft_ms, 1), "ahead_tokens": int(p.ahead_tokens),
             "avail_tok_s": round(p.avail_tok_s, 1)}, max_prompt_tokens=max_prompt))
    return replace(state, admission=MappingProxyType(modes))


def _max_prompt_tokens(budget: int, rate: tuple[float, float, float] | None, interval: float,
                       config: PolicyConfig) -> int | None:
    """The longest prompt admitted as asked this cycle (None: no cut).

    Attainment counts requests, and a budget is tokens: when the budget is short, spending it
    first-come on a few long prompts would turn away many short ones. A request may take up
    to ``admission_share_factor`` times its fair share, budget / requests admitted per cycle
    (EWMA). The cut finds its own level: while it leaves budget unused, the fair share grows
    and the cut loosens; while the budget runs out, the fair share is the mean admitted prompt
    and the cut tightens towards prompts the budget can serve in number. With a roomy budget
    the cut lies far above any prompt and does nothing.
    """
    if config.admission_share_factor <= 0 or rate is None or budget <= 0:
        return None
    num_requests = rate[0] * interval
    if num_requests < 1.0:
        return None  # too few requests to speak of a share
    return max(1, int(config.admission_share_factor * budget / num_requests))


def _orphans(snapshot: Snapshot, live: list[Heartbeat], tiers: TierTable,
             config: PolicyConfig, actions: list[Action]) -> None:
    alive = {hb.worker for hb in live}
    now = snapshot.now
    for r in snapshot.inflight:
        if r.worker in alive or now - r.updated_at < config.heartbeat_max_age_s:
            continue
        actions.append(Reticket(r.request_id, r.attempt + 1, r.tier, tiers[r.tier].queue_priority,
                                f"worker {r.worker} presumed dead (no heartbeat)", "orphan",
                                {"state": r.state, "worker": r.worker}))
    # Tickets lost with the broker: the ledger holds more queued requests than the queue.
    missing = {t: s.num_queued - s.broker_depth for t, s in snapshot.queues.items()
               if s.broker_depth is not None and s.num_queued > s.broker_depth}
    if not missing:
        return
    for q in sorted(snapshot.queued, key=lambda q: q.ticketed_at):
        if missing.get(q.tier, 0) <= 0 or now - q.ticketed_at < config.orphan_timeout_s:
            continue
        missing[q.tier] -= 1
        actions.append(Reticket(q.request_id, q.attempt + 1, q.queue_tier, q.priority,
                                f"queued {now - q.ticketed_at:.0f}s; broker lacks its ticket",
                                "orphan", {"tier": q.tier}))


def _plan(live: list[Heartbeat], rates: MappingProxyType[str, tuple[float, float, float]],
          state: PolicyState, config: PolicyConfig, actions: list[Action]) -> PolicyState:
    prompt = sum(r[1] for r in rates.values())
    output = sum(r[2] for r in rates.values())
    u = config.planner_utilisation
    n_prefill = math.ceil(prompt / (config.prefill_capacity_tok_s * u))
    n_decode = math.ceil(output / (config.decode_capacity_tok_s * u))
    n_agg = math.ceil((prompt / config.prefill_capacity_tok_s
                       + output / config.decode_capacity_tok_s) / u)
    plan = (max(1, n_prefill), max(1, n_decode), max(1, n_agg))
    if plan == state.plan:
        return state
    actions.append(Plan(*plan, reason=(f"arrivals {prompt:.0f} prompt tok/s, {output:.0f} "
                                       f"output tok/s at {u:.0%} utilisation"),
                        inputs={"prompt_tok_s": round(prompt, 1), "output_tok_s": round(output, 1),
                                "live_workers": len(live)}))
    return replace(state, plan=plan)
