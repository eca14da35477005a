"""Discrete-event simulation of a slaq cluster over a trace, in virtual time.

N simulated workers, each the real :class:`Scheduler` + :class:`BlockManager` with a
:class:`SimRunner` (the cost model); prefill/decode disaggregated or aggregated; Celery-like
queues (``prefill.<tier>``, drained in tier order, priority within a queue; or one FIFO queue
for the ``fifo`` policy); and the same :func:`slaq.platform.policy.decide` the live beat job
runs, called every ``policy_interval_s`` of virtual time, its actions applied as the live
system applies them (gates, re-tickets with stale tickets dropped at claim, routing weights,
admission modes).

Worker pull model: a worker takes a ticket only while fewer than one step's worth of prompt
tokens wait inside its engine and its KV pool has room, so the backlog stays in the queues
where the policy can reorder it.

Prefix-aware hand-off (``SimConfig.prefix_handoff``, on by default as in the live stack): a
prefilled request goes to the decode worker the live router would pick
(:func:`slaq.platform.decisions.choose_decode_worker`, then
:func:`slaq.platform.affinity.choose_affine_worker` on the prompt's chain hashes and the
decode workers' heartbeats, which carry ``BlockManager.prefix_summary()``); that worker pins
the prompt's leading cached blocks and the transfer is charged only for the rest.

Leases end as in the live stack: a decode worker holds one ticket per engine seat, and a
ticket pulls the KV (releasing the prefill worker's lease) as soon as it arrives, then waits
in the worker's tier-ordered queue for blocks (``SimWorker.take_pulls``). Only a hand-off
beyond the seats keeps its lease until a seat frees.
"""

from __future__ import annotations

import bisect
import gc
import heapq
import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType

from slaq.gpu_workers.engine.block_manager import block_hashes
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.engine.cost_model import CostProfile, get_profile
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.platform import affinity, policy
from slaq.platform.affinity import DEFAULT_AFFINITY, AffinityConfig
from slaq.platform.decisions import choose_decode_worker
from slaq.platform.policy import PolicyConfig, PolicyState
from slaq.platform.snapshot import (
    Arrivals,
    Plan,
    QueuedRequest,
    QueueStats,
    Reticket,
    SetAdmission,
    SetGate,
    SetRouting,
    Snapshot,
    takes_budget,
)
from slaq.platform.tiers import TIER_NAMES, TierTable
from slaq.sim.capacity import policy_config_for, split_workers, workload_cost
from slaq.sim.traces import Trace
from slaq.sim.worker import Handoff, SimWorker

POLICIES = ("fifo", "static", "slaq")
_MAX_AGE_S = 1e9  # simulated heartbeats never go stale (no worker dies)
FIFO_QUEUE = "fifo"
_ARRIVAL, _STEP, _TRANSFER, _TICK, _HEARTBEAT = range(5)


@dataclass(frozen=True)
class SimConfig:
    """One simulation run. ``disaggregated=None`` = aggregated for ``fifo``, else split."""

    trace: Trace
    policy: str = "slaq"
    num_gpus: int = 8
    profile: str | CostProfile = "llama-8b-h100"
    disaggregated: bool | None = None
    num_prefill: int | None = None  # None: split by the cost model's GPU-time shares
    tiers: TierTable = field(default_factory=TierTable)
    policy_config: PolicyConfig | None = None  # None: the preset, capacities from the model
    policy_interval_s: float = 1.0
    heartbeat_interval_s: float = 0.5
    prefill_chunk: int = 8192  # token budget of a prefill worker's step
    aggregated_chunk: int = 2048  # of an aggregated worker's step (keeps TPOT in bounds)
    max_num_seqs: int = 256
    max_model_len: int = 131072
    enable_prefix_caching: bool = True
    seed: int = 0
    max_drain_s: float = 86400.0  # virtual seconds after the last arrival before giving up
    # Disaggregated: decode workers reuse cached prompt blocks on hand-off (only the rest
    # moves) and routing prefers the worker holding the prompt's prefix (the live stack's
    # prefix-aware hand-off). False: every block moves, routing ignores cached prefixes.
    prefix_handoff: bool = True
    affinity: AffinityConfig = DEFAULT_AFFINITY

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if self.num_gpus < 1:
            raise ValueError("num_gpus must be >= 1")
        if self.policy_interval_s <= 0 or self.heartbeat_interval_s <= 0:
            raise ValueError("intervals must be > 0")

    @property
    def is_disaggregated(self) -> bool:
        if self.disaggregated is None:
            return self.policy != "fifo" and self.num_gpus >= 2
        return self.disaggregated

    @property
    def cost_profile(self) -> CostProfile:
        return get_profile(self.profile) if isinstance(self.profile, str) else self.profile


@dataclass(slots=True)
class RequestRecord:
    """A request's outcome. Times in virtual seconds; None where it never got that far."""

    index: int
    tier_asked: str
    tier_used: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    refused: bool = False
    first_token_s: float | None = None
    finish_s: float | None = None
    num_cached_tokens: int = 0
    attempt: int = 0
    state: str = "queued"  # queued | running | finished | refused
    queue_tier: str = "default"
    decode_worker: str | None = None  # disaggregated: where its hand-off went

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.finish_s is None or self.first_token_s is None or self.num_output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.num_output_tokens - 1)


@dataclass(slots=True)
class HandoffStats:
    """KV moved by hand-offs (disaggregated runs). A hand-off's blocks are its prompt's
    (what the lease holds and the decode side allocates as computed); ``blocks_moved`` are
    those not found cached on the decode worker."""

    num_handoffs: int = 0
    blocks: int = 0
    blocks_moved: int = 0
    num_affinity_routed: int = 0  # the affinity rule overrode the weight/pressure choice

    @property
    def blocks_per_handoff(self) -> float:
        return self.blocks / self.num_handoffs if self.num_handoffs else 0.0

    @property
    def moved_per_handoff(self) -> float:
        return self.blocks_moved / self.num_handoffs if self.num_handoffs else 0.0


@dataclass
class SimResult:
    """Outcome of :func:`run_simulation`."""

    config: SimConfig
    records: list[RequestRecord]
    makespan_s: float
    wall_s: float
    num_prefill: int
    num_decode: int
    num_aggregated: int
    policy_cycle_s: list[float]
    decisions: dict[str, int]
    plans: list[tuple[float, int, int, int]]  # per tick: (time, prefill, decode, aggregated)
    num_preemptions: int
    # Per policy tick: (time, cumulative prefill tokens computed, cumulative decode tokens).
    token_series: list[tuple[float, int, int]] = field(default_factory=list)
    handoffs: HandoffStats = field(default_factory=HandoffStats)


class Simulator:
    """Runs one :class:`SimConfig`; use :func:`run_simulation`."""

    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.profile = config.cost_profile
        self.tiers = config.tiers
        trace = config.trace
        self.cost = workload_cost(trace, self.profile, config.prefill_chunk)
        self.policy_config = config.policy_config or policy_config_for(config.policy, self.cost)
        self.records = [RequestRecord(i, r.tier, r.tier, r.arrival_s, r.num_prompt_tokens,
                                      r.num_output_tokens) for i, r in enumerate(trace.requests)]
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._events: list[tuple[float, int, int, object]] = []
        self._counter = itertools.count()
        self.workers: list[SimWorker] = []
        self._build_workers()
        self.by_name = {w.name: w for w in self.workers}
        self.fifo = config.policy == "fifo"
        # Queues: tier -> heap of (priority, order, index, attempt); fifo: one deque.
        self.queues: dict[str, list[tuple[int, int, int, int]]] = {t: [] for t in TIER_NAMES}
        self.fifo_queue: deque[tuple[int, int]] = deque()
        # The ledger's view: queued requests and their prompt tokens per tier used.
        self.queue_counts = {t: [0, 0] for t in TIER_NAMES}
        self.by_tier_arrivals: dict[str, list[int]] = {t: [] for t in TIER_NAMES}
        self.by_tier_times: dict[str, list[float]] = {t: [] for t in TIER_NAMES}
        self.gates: set[tuple[str, str]] = set()  # closed (role, tier)
        # tier -> [fallback mode, budget left | None, max_prompt_tokens | None]
        self.admission: dict[str, list] = {}
        self.routing: MappingProxyType[str, float] | None = None
        self.heartbeats = [w.heartbeat(0.0) for w in self.workers]
        self.state = PolicyState()
        self.arrivals = {t: [0, 0, 0] for t in TIER_NAMES}
        self.policy_cycle_s: list[float] = []
        self.decisions: dict[str, int] = {}
        self.plans: list[tuple[float, int, int, int]] = []
        self.token_series: list[tuple[float, int, int]] = []
        self.num_unresolved = len(self.records)
        self.handoff_stats = HandoffStats()

    # ---- setup --------------------------------------------------------------------------

    def _build_workers(self) -> None:
        cfg, p = self.cfg, self.profile

        def sched(chunk: int) -> SchedulerConfig:
            return SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=chunk,
                                   max_model_len=cfg.max_model_len)

        if cfg.is_disaggregated:
            n_prefill = cfg.num_prefill or split_workers(cfg.num_gpus, self.cost)
            if not 1 <= n_prefill < cfg.num_gpus:
                raise ValueError("num_prefill must leave at least one decode worker")
            for i in range(n_prefill):
                self.workers.append(SimWorker(f"prefill-{i}", "prefill", p,
                                              sched(cfg.prefill_chunk), cfg.enable_prefix_caching))
            for i in range(cfg.num_gpus - n_prefill):
                self.workers.append(SimWorker(f"decode-{i}", "decode", p,
                                              sched(cfg.aggregated_chunk),
                                              cfg.enable_prefix_caching))
        else:
            for i in range(cfg.num_gpus):
                self.workers.append(SimWorker(f"both-{i}", "both", p, sched(cfg.aggregated_chunk),
                                              cfg.enable_prefix_caching))
        self.pullers = [w for w in self.workers if w.pulls]
        self.decoders = [w for w in self.workers if w.role == "decode"]

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._counter), kind, payload))

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> SimResult:
        # Millions of short-lived objects, few cycles: a rarer collector saves a lot of time.
        old_gc = gc.get_threshold()
        gc.set_threshold(200_000, 50, 50)
        try:
            return self._run()
        finally:
            gc.set_threshold(*old_gc)

    def _run(self) -> SimResult:
        wall0 = time.perf_counter()
        for i, r in enumerate(self.records):
            self._push(r.arrival_s, _ARRIVAL, i)
        self._push(0.0, _TICK, None)
        self._push(self.cfg.heartbeat_interval_s, _HEARTBEAT, None)
        events = self._events
        horizon = self.cfg.trace.duration_s + self.cfg.max_drain_s
        while events and self.num_unresolved > 0:
            t, _, kind, payload = heapq.heappop(events)
            if t > horizon:
                break  # what is left unresolved is reported as lost
            self.now = t
            if kind == _STEP:
                self._on_step(payload)  # type: ignore[arg-type]
            elif kind == _ARRIVAL:
                self._on_arrival(payload)  # type: ignore[arg-type]
            elif kind == _TRANSFER:
                self._on_transfer(payload)  # type: ignore[arg-type]
            elif kind == _TICK:
                self._on_tick()
                self._push(t + self.cfg.policy_interval_s, _TICK, None)
            else:
                self.heartbeats = [w.heartbeat(t) for w in self.workers]
                self._push(t + self.cfg.heartbeat_interval_s, _HEARTBEAT, None)
        # Hand-offs cut off by the horizon never arrive: their pins go back too.
        for w in self.decoders:
            w.release_pins()
        makespan = max((r.finish_s or r.arrival_s) for r in self.records)
        n_p = sum(1 for w in self.workers if w.role == "prefill")
        return SimResult(
            self.cfg, self.records, makespan, time.perf_counter() - wall0, n_p,
            len(self.decoders), sum(1 for w in self.workers if w.role == "both"),
            self.policy_cycle_s, self.decisions, self.plans,
            sum(w.scheduler.num_preemptions for w in self.workers), self.token_series,
            self.handoff_stats)

    # ---- arrivals and queues --------------------------------------------------------------

    def _on_arrival(self, i: int) -> None:
        rec = self.records[i]
        adm = None if self.fifo else self.admission.get(rec.tier_asked)
        if adm is not None:
            mode, budget, max_prompt = adm
            # The API's rule (takes_budget): only an admitted request takes from the budget.
            if takes_budget(budget, rec.num_prompt_tokens, max_prompt):
                if budget is not None:
                    adm[1] = budget - rec.num_prompt_tokens
            elif mode == "refuse":
                rec.refused, rec.state = True, "refused"
                self.num_unresolved -= 1
                return
            elif mode == "downgrade":
                rec.tier_used = self.tiers[rec.tier_asked].downgrade_to or rec.tier_asked
        a = self.arrivals[rec.tier_used]
        a[0] += 1
        a[1] += rec.num_prompt_tokens
        a[2] += rec.num_output_tokens
        self.by_tier_arrivals[rec.tier_used].append(i)
        self.by_tier_times[rec.tier_used].append(rec.arrival_s)
        c = self.queue_counts[rec.tier_used]
        c[0] += 1
        c[1] += rec.num_prompt_tokens
        queue = FIFO_QUEUE if self.fifo else rec.tier_used
        self._enqueue(i, queue, 0 if self.fifo else policy.ticket_priority(
            self.tiers, queue, rec.num_prompt_tokens, self.policy_config))
        self._dispatch()

    def _enqueue(self, i: int, queue: str, priority: int) -> None:
        rec = self.records[i]
        rec.queue_tier = queue if queue != FIFO_QUEUE else rec.tier_used
        if queue == FIFO_QUEUE:
            self.fifo_queue.append((i, rec.attempt))
        else:
            heapq.heappush(self.queues[queue], (priority, next(self._counter), i, rec.attempt))

    def _open_queues(self, role: str) -> list[str]:
        if self.fifo:
            return [FIFO_QUEUE]
        return [t.name for t in sorted(self.tiers, key=lambda t: t.rank)
                if (role, t.name) not in self.gates]

    def _take_ticket(self, worker: SimWorker) -> int | None:
        """Pop the next live ticket the worker would consume, if it wants it."""
        for queue in self._open_queues(worker.role):
            while True:
                entry = self._peek(queue)
                if entry is None:
                    break
                i, attempt = entry
                rec = self.records[i]
                if rec.attempt != attempt or rec.state != "queued":
                    self._pop(queue)  # stale ticket: dropped at claim
                    continue
                if not worker.wants_more(rec.num_prompt_tokens):
                    return None
                self._pop(queue)
                c = self.queue_counts[rec.tier_used]
                c[0] -= 1
                c[1] -= rec.num_prompt_tokens
                return i
        return None

    def _peek(self, queue: str) -> tuple[int, int] | None:
        if queue == FIFO_QUEUE:
            return self.fifo_queue[0] if self.fifo_queue else None
        heap = self.queues[queue]
        return (heap[0][2], heap[0][3]) if heap else None

    def _pop(self, queue: str) -> None:
        if queue == FIFO_QUEUE:
            self.fifo_queue.popleft()
        else:
            heapq.heappop(self.queues[queue])

    def _dispatch(self) -> None:
        """Let idle pulling workers take tickets and start steps."""
        for w in self.pullers:
            if not w.busy:
                self._kick(w)

    # ---- workers ------------------------------------------------------------------------

    def _kick(self, w: SimWorker) -> None:
        if w.busy:
            return
        if w.pulls:
            self._pull(w)
        for h in w.admit_pending():
            if not h.pulled:
                self._release_lease(h)
        for h in w.take_pulls():
            self._release_lease(h)
        dt = w.start_step()
        if dt is not None:
            self._push(self.now + dt, _STEP, w)

    def _pull(self, w: SimWorker) -> None:
        trace = self.cfg.trace.requests
        while True:
            i = self._take_ticket(w)
            if i is None:
                return
            rec = self.records[i]
            tr = trace[i]
            rec.state = "running"
            max_tokens = rec.num_output_tokens
            rank = 1 if self.fifo else self.tiers[rec.tier_used].rank
            seq = Sequence(
                request_id=str(i), prompt_token_ids=tr.prompt_token_ids(i),
                params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                rank=rank, arrival_time=rec.arrival_s,
                prefill_only=w.role == "prefill" and max_tokens > 1,
            )
            w.add(seq)

    def _on_step(self, w: SimWorker) -> None:
        firsts, finished = w.finish_step()
        records = self.records
        for seq in firsts:
            # The last prefill chunk samples the first token (later recomputes find it set).
            rec = records[int(seq.request_id)]
            if rec.first_token_s is None:
                rec.first_token_s = self.now
                rec.num_cached_tokens = seq.num_cached_tokens
        for seq in finished:
            rec = records[int(seq.request_id)]
            if seq.finish_reason == PREFILL_DONE:
                self._handoff(w, seq)
            else:
                rec.finish_s = self.now
                rec.state = "finished"
                self.num_unresolved -= 1
        self._kick(w)

    def _handoff(self, w: SimWorker, seq: Sequence) -> None:
        prompt = seq.prompt_token_ids
        bs = w.block_manager.block_size
        num_blocks = w.block_manager.num_blocks_for(seq.num_prompt_tokens)  # the lease's
        reuse = self.cfg.prefix_handoff
        target = self._route(block_hashes(prompt, bs) if reuse else [], num_blocks)
        # The decode side pins what it has cached before the pull (EngineLoop.reserve_prefix).
        pinned = target.reserve_prefix(seq.request_id, prompt) if reuse else 0
        dseq = Sequence(request_id=seq.request_id, prompt_token_ids=prompt,
                        params=seq.params, rank=seq.rank, arrival_time=seq.arrival_time,
                        output_token_ids=list(seq.output_token_ids))
        self.records[int(seq.request_id)].decode_worker = target.name
        st = self.handoff_stats
        st.num_handoffs += 1
        st.blocks += num_blocks
        st.blocks_moved += num_blocks - pinned
        ready = self.now + self.profile.transfer_time(seq.num_tokens - pinned * bs)
        self._push(ready, _TRANSFER, (target, Handoff(dseq, w.name, ready)))

    def _route(self, prefix_hashes: list[int], num_blocks: int) -> SimWorker:
        """The live router's choice (``DecodeRouter.pick``) on the sim's heartbeats: weights
        or pressure, unless another worker holds a clearly longer prefix of the prompt."""
        weights = self.routing or {}
        # Drawn only when something consumes it, so runs without weights or affinity keep
        # the random stream they had before affinity existed.
        u = self.rng.random() if (weights or prefix_hashes) else 0.0
        now = self.now
        chosen = choose_decode_worker(weights, self.heartbeats, now, _MAX_AGE_S, u)
        if prefix_hashes:
            # Looked up at call time: the live router calls this very function.
            better = affinity.choose_affine_worker(weights, self.heartbeats, now, _MAX_AGE_S,
                                                   u, prefix_hashes, num_blocks, (), chosen,
                                                   self.cfg.affinity)
            if better is not None:
                if better.worker != chosen:
                    self.handoff_stats.num_affinity_routed += 1
                return self.by_name[better.worker]
        return self.by_name[chosen] if chosen is not None else self.decoders[0]

    def _on_transfer(self, payload: tuple[SimWorker, Handoff]) -> None:
        target, h = payload
        # Most important first, then arrival (what a decode queue with priorities does).
        bisect.insort(target.pending, h, key=_handoff_key)
        self._kick(target)

    def _release_lease(self, h: Handoff) -> None:
        owner = self.by_name[h.prefill_worker]
        owner.scheduler.free_leased(h.seq.request_id)
        if not owner.busy:
            self._kick(owner)

    # ---- the policy -----------------------------------------------------------------------

    def _snapshot(self) -> Snapshot:
        now = self.now
        queues = {t: QueueStats(c[0], c[1]) for t, c in self.queue_counts.items()}
        arrivals = {t: Arrivals(*a) for t, a in self.arrivals.items()}
        self.arrivals = {t: [0, 0, 0] for t in TIER_NAMES}
        return Snapshot(now=now, heartbeats=tuple(w.heartbeat(now) for w in self.workers),
                        queues=queues, queued=self._at_risk(), arrivals=arrivals)

    def _at_risk(self) -> tuple[QueuedRequest, ...]:
        """What the ledger query returns: queued requests within the aging window."""
        out = []
        frac = self.policy_config.aging_fraction
        for tier, idx in self.by_tier_arrivals.items():
            times = self.by_tier_times[tier]
            target = self.tiers[tier].ttft_ms / 1000.0
            lo = bisect.bisect_right(times, self.now - target)
            hi = bisect.bisect_right(times, self.now - (1 - frac) * target)
            for i in idx[lo:hi]:
                rec = self.records[i]
                if rec.state == "queued":
                    out.append(QueuedRequest(str(i), rec.attempt, tier, rec.arrival_s,
                                             rec.num_prompt_tokens, rec.queue_tier,
                                             self.tiers[rec.queue_tier].queue_priority,
                                             rec.arrival_s))
        return tuple(out)

    def _on_tick(self) -> None:
        stats = [w.runner.stats for w in self.workers]
        self.token_series.append((self.now, sum(s.num_prefill_tokens for s in stats),
                                  sum(s.num_decode_tokens for s in stats)))
        snap = self._snapshot()
        t0 = time.perf_counter()
        # Looked up at call time: the live beat job calls this very function.
        actions, self.state = policy.decide(snap, self.state, self.tiers, self.policy_config)
        self.policy_cycle_s.append(time.perf_counter() - t0)
        for a in actions:
            self.decisions[a.kind] = self.decisions.get(a.kind, 0) + 1
            if isinstance(a, SetGate):
                key = (a.role, a.tier)
                (self.gates.discard if a.open else self.gates.add)(key)
            elif isinstance(a, Reticket):
                self._reticket(a)
            elif isinstance(a, SetRouting):
                self.routing = a.weights
            elif isinstance(a, SetAdmission):
                self.admission[a.tier] = [a.mode, a.budget_tokens, a.max_prompt_tokens]
            elif isinstance(a, Plan):
                pass  # recorded per tick below (reported, acted on only by a scaling hook)
        if self.state.plan is not None:
            self.plans.append((self.now, *self.state.plan))
        self._dispatch()

    def _reticket(self, a: Reticket) -> None:
        i = int(a.request_id)
        rec = self.records[i]
        if rec.state != "queued" or a.attempt != rec.attempt + 1:
            return  # claimed meanwhile: the ledger's bump would fail the same way
        rec.attempt = a.attempt
        self._enqueue(i, a.queue_tier, a.priority)


def _handoff_key(h: Handoff) -> tuple[int, float]:
    return (h.seq.rank, h.seq.arrival_time)


def run_simulation(config: SimConfig) -> SimResult:
    """Simulate ``config.trace`` on the configured cluster under the configured policy."""
    return Simulator(config).run()
