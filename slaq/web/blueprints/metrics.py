"""``GET /metrics``: Prometheus metrics read live from the heartbeats and the ledger.

No API key: Prometheus scrapes it. Nothing is counted in this process. Each scrape builds a
fresh registry around :class:`SlaqCollector`, which reads

* Redis: every worker's heartbeat (``hb:*``), the published gates and admission state, and the
  reprioritiser's recent cycle times (``reprioritiser:cycles``);
* PostgreSQL: ONE grouped query over ``requests`` (by model, tier and state) that yields the
  request counts, SLA verdicts, token totals and the latency histograms,

so every API process answers the same numbers, and a scrape costs one SCAN plus one pipelined
``HGETALL``, a few small reads and one aggregate query.

Names: our own ``slaq_*`` series, plus the per-worker vLLM-compatible series that gateways
already scrape (``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, ...), labelled
``model_name`` and ``worker``. Base units (seconds), counters end ``_total``. A source that
cannot be read drops its series and sets ``slaq_metrics_source_up{source}`` to 0 instead of
failing the scrape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import redis
from flask import Blueprint, Response
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, func, literal_column, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from slaq.gpu_workers.router import read_heartbeats
from slaq.platform.decisions import read_admission, read_gates
from slaq.platform.models import FINISHED, REQUEST_STATES, RequestRow
from slaq.platform.pressure import ROLES, Heartbeat
from slaq.platform.tiers import TIER_NAMES
from slaq.tasks.reprioritise import CYCLES_KEY, percentile
from slaq.web import context

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

CYCLE_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 1.0)


@bp.get("/metrics")
def metrics() -> Response:
    """The Prometheus text exposition (format 0.0.4), whatever the scraper prefers.

    Not negotiated: prometheus-client 0.26's OpenMetrics writer escapes the colon in sample
    names (``vllm:…`` becomes ``vllm_…``) unless the scraper asks for ``escaping=allow-utf-8``,
    which would break the vLLM-compatible names; every Prometheus version accepts 0.0.4.
    """
    ctx = context()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SlaqCollector(ctx.redis, ctx.session_factory))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)


# ---- the ledger: one grouped query ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistogramSpec:
    """A latency histogram computed in SQL over finished requests.

    ``value`` is in seconds; ``weight`` is what one request adds to a bucket (1 for per-request
    histograms; the number of inter-token gaps for the inter-token latency histogram, where every
    gap of a request is taken to be that request's mean TPOT, since the ledger keeps only it).
    """

    key: str
    value: ColumnElement[float]
    weight: ColumnElement[int]
    buckets: tuple[float, ...]


_FINISHED = RequestRow.state == FINISHED
_GAPS = RequestRow.completion_tokens - 1
_ONE = literal_column("1")
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
HISTOGRAMS: tuple[HistogramSpec, ...] = (
    HistogramSpec("ttft", RequestRow.ttft_ms / 1000.0, _ONE, _TTFT_BUCKETS),
    HistogramSpec("tpot", RequestRow.tpot_ms / 1000.0, _ONE, _TPOT_BUCKETS),
    HistogramSpec("itl", RequestRow.tpot_ms / 1000.0, _GAPS, _TPOT_BUCKETS),
    HistogramSpec("e2e", func.extract("epoch", RequestRow.finished_at - RequestRow.received_at),
                  _ONE, _E2E_BUCKETS),
)


@dataclass(slots=True)
class Histogram:
    """Cumulative bucket counts (one per bound, then +Inf) and the sum of observed values."""

    bounds: tuple[float, ...]
    counts: list[float]
    total: float = 0.0

    def add(self, other: Histogram) -> None:
        assert self.bounds == other.bounds
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def buckets(self) -> list[tuple[str, float]]:
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        return list(zip(les, self.counts, strict=True))


@dataclass(slots=True)
class LedgerGroup:
    """The totals of one (model, tier_used, state) group of ``requests``."""

    model: str
    tier: str
    state: str
    num_requests: int
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    num_sla_met: int
    num_sla_missed: int
    histograms: dict[str, Histogram] = field(default_factory=dict)


def _sum(expr: ColumnElement, where: ColumnElement[bool]) -> ColumnElement:
    return func.coalesce(func.sum(expr).filter(where), 0)


def _histogram_columns(spec: HistogramSpec) -> list[ColumnElement]:
    observed = _FINISHED & spec.value.is_not(None) & (spec.weight > 0)
    cols = [_sum(spec.weight, observed & (spec.value <= b)) for b in spec.buckets]
    return [*cols, _sum(spec.weight, observed), _sum(spec.value * spec.weight, observed)]


def ledger_totals(session: Session) -> list[LedgerGroup]:
    """Request counts, SLA verdicts, token totals and histograms in one grouped query.

    Prompt tokens (and prefix-cache hits) count once a request has its first token, i.e. once
    its prompt was processed; generated tokens count when it finishes.
    """
    prefilled = RequestRow.first_token_at.is_not(None)
    columns = [RequestRow.model, RequestRow.tier_used, RequestRow.state, func.count(),
               _sum(RequestRow.prompt_tokens, prefilled),
               _sum(RequestRow.completion_tokens, _FINISHED),
               _sum(func.coalesce(RequestRow.cached_tokens, 0), prefilled),
               func.count().filter(RequestRow.sla_met.is_(True)),
               func.count().filter(RequestRow.sla_met.is_(False))]
    for spec in HISTOGRAMS:
        columns += _histogram_columns(spec)
    stmt = select(*columns).group_by(RequestRow.model, RequestRow.tier_used, RequestRow.state)
    out: list[LedgerGroup] = []
    for row in session.execute(stmt):
        model, tier, state, *numbers = row
        group = LedgerGroup(model, tier, state, *(int(n) for n in numbers[:6]))
        rest = numbers[6:]
        for spec in HISTOGRAMS:
            n = len(spec.buckets) + 1
            counts, total = [float(c) for c in rest[:n]], float(rest[n])
            group.histograms[spec.key] = Histogram(spec.buckets, counts, total)
            rest = rest[n + 1:]
        out.append(group)
    return out


def _merged(groups: Iterable[LedgerGroup], key: str,
            label: Callable[[LedgerGroup], str]) -> dict[str, Histogram]:
    out: dict[str, Histogram] = {}
    for g in groups:
        h = g.histograms[key]
        if label(g) in out:
            out[label(g)].add(h)
        else:
            out[label(g)] = Histogram(h.bounds, list(h.counts), h.total)
    return out


def ledger_metrics(groups: list[LedgerGroup]) -> Iterator[Metric]:
    """``slaq_requests``, SLA counters, token counters and latency histograms."""
    requests_ = GaugeMetricFamily("slaq_requests", "Requests in the ledger by state and tier",
                                  labels=["state", "tier"])
    counts = {(s, t): 0 for s in REQUEST_STATES for t in TIER_NAMES}
    for g in groups:
        counts[(g.state, g.tier)] = counts.get((g.state, g.tier), 0) + g.num_requests
    for (state, tier), n in sorted(counts.items()):
        requests_.add_metric([state, tier], n)
    yield requests_

    tiers = sorted({*TIER_NAMES, *(g.tier for g in groups)})
    for name, doc, attr in (
        ("slaq_sla_met", "Finished requests that met every SLO of their tier", "num_sla_met"),
        ("slaq_sla_missed", "Finished requests that missed an SLO of their tier",
         "num_sla_missed"),
        ("slaq_prompt_tokens", "Prompt tokens processed, by tier", "prompt_tokens"),
        ("slaq_generation_tokens", "Tokens generated by finished requests, by tier",
         "generation_tokens"),
    ):
        family = CounterMetricFamily(name, doc, labels=["tier"])
        for tier in tiers:
            family.add_metric([tier], sum(getattr(g, attr) for g in groups if g.tier == tier))
        yield family

    models = sorted({g.model for g in groups})
    for name, doc, attr in (
        ("vllm:prompt_tokens", "Prompt tokens processed", "prompt_tokens"),
        ("vllm:generation_tokens", "Generated tokens", "generation_tokens"),
        ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
         "prompt_tokens"),
        ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", "cached_tokens"),
    ):
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        for model in models:
            family.add_metric([model], sum(getattr(g, attr) for g in groups if g.model == model))
        yield family

    for name, doc, key in (
        ("vllm:time_to_first_token_seconds", "Time to first token", "ttft"),
        ("vllm:inter_token_latency_seconds",
         "Inter-token latency (each gap taken as its request's mean TPOT)", "itl"),
        ("vllm:e2e_request_latency_seconds", "End-to-end request latency", "e2e"),
    ):
        family = HistogramMetricFamily(name, doc, labels=["model_name"])
        for model, h in sorted(_merged(groups, key, lambda g: g.model).items()):
            family.add_metric([model], h.buckets(), h.total)
        yield family
    for name, doc, key in (
        ("slaq_request_ttft_seconds", "Time to first token of finished requests", "ttft"),
        ("slaq_request_tpot_seconds", "Mean time per output token of finished requests",
         "tpot"),
        ("slaq_request_e2e_seconds", "Received-to-finished time of finished requests", "e2e"),
    ):
        family = HistogramMetricFamily(name, doc, labels=["tier"])
        for tier, h in sorted(_merged(groups, key, lambda g: g.tier).items()):
            family.add_metric([tier], h.buckets(), h.total)
        yield family


# ---- the workers: heartbeats -------------------------------------------------------------


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def worker_metrics(heartbeats: list[Heartbeat], now: float) -> Iterator[Metric]:
    """Per-worker series from the live heartbeats (a worker whose key expired has none)."""
    hbs = sorted(heartbeats, key=lambda hb: hb.worker)
    workers = _gauge("slaq_workers", "Live workers by role", ["role"])
    for role in ROLES:
        workers.add_metric([role], sum(1 for hb in hbs if hb.role == role))
    yield workers

    info = InfoMetricFamily("slaq_worker", "A live worker and what it runs on",
                            labels=["worker", "role"])
    for hb in hbs:
        info.add_metric([hb.worker, hb.role], {"device": hb.device, "model_name": hb.model,
                                               "host": hb.host, "pid": str(hb.pid)})
    yield info

    wr = ["worker", "role"]
    per_worker: list[tuple[GaugeMetricFamily | CounterMetricFamily,
                           Callable[[Heartbeat], float | None]]] = [
        (_gauge("slaq_kv_pressure", "(used + reserved) / total KV blocks", wr),
         lambda hb: hb.pressure),
        (_gauge("slaq_kv_capacity_blocks", "KV blocks in the worker's pool", wr),
         lambda hb: hb.num_blocks_total),
        (_gauge("slaq_kv_leased_blocks", "KV blocks held for decode workers (part of used)",
                wr), lambda hb: hb.num_blocks_leased),
        (_gauge("slaq_worker_heartbeat_age_seconds", "Seconds since the last heartbeat", wr),
         lambda hb: max(0.0, now - hb.time)),
        (_gauge("slaq_worker_ttft_seconds", "Recent mean time to first token", wr),
         lambda hb: None if hb.ttft_ms is None else hb.ttft_ms / 1000.0),
        (_gauge("slaq_worker_tpot_seconds", "Recent mean time per output token", wr),
         lambda hb: None if hb.tpot_ms is None else hb.tpot_ms / 1000.0),
        (CounterMetricFamily("slaq_worker_finished_requests",
                             "Requests the worker finished since it started", labels=wr),
         lambda hb: hb.num_finished),
        # Decode side of a hand-off: blocks of the prompts it took over, and of those the ones
        # it found in its own prefix cache instead of pulling (reused / total = reuse share).
        (CounterMetricFamily("slaq_worker_handoff_blocks",
                             "KV blocks of handed-off prompts the worker took over since it "
                             "started", labels=wr),
         lambda hb: hb.num_handoff_blocks),
        (CounterMetricFamily("slaq_worker_handoff_reused_blocks",
                             "Of those hand-off blocks, the ones found in the worker's prefix "
                             "cache instead of pulled", labels=wr),
         lambda hb: hb.num_handoff_blocks_reused),
        (_gauge("slaq_worker_prefix_hashes",
                "Prefix hashes the worker publishes for affinity routing", wr),
         lambda hb: len(hb.prefix_hashes)),
    ]
    for family, value in per_worker:
        for hb in hbs:
            v = value(hb)
            if v is not None:
                family.add_metric([hb.worker, hb.role], v)
        yield family

    blocks = _gauge("slaq_kv_blocks", "KV blocks by use (used + reserved + free = capacity)",
                    [*wr, "state"])
    rates = _gauge("slaq_worker_tokens_per_second", "Recent token throughput",
                   [*wr, "phase"])
    batch = _gauge("slaq_worker_batch_size", "Sequences in the last / largest batch",
                   [*wr, "kind"])
    for hb in hbs:
        for state, n in (("used", hb.num_blocks_used), ("reserved", hb.num_blocks_reserved),
                         ("free", hb.num_blocks_free)):
            blocks.add_metric([hb.worker, hb.role, state], n)
        rates.add_metric([hb.worker, hb.role, "prefill"], hb.prefill_tokens_per_s)
        rates.add_metric([hb.worker, hb.role, "decode"], hb.decode_tokens_per_s)
        batch.add_metric([hb.worker, hb.role, "last"], hb.last_batch_size)
        batch.add_metric([hb.worker, hb.role, "max"], hb.max_batch_size)
    yield from (blocks, rates, batch)
    yield from _vllm_worker_metrics(hbs)


def _vllm_worker_metrics(hbs: list[Heartbeat]) -> Iterator[Metric]:
    labels = ["model_name", "worker"]
    series: list[tuple[GaugeMetricFamily | CounterMetricFamily,
                       Callable[[Heartbeat], float]]] = [
        (_gauge("vllm:num_requests_running", "Requests in the running batch", labels),
         lambda hb: hb.num_running),
        (_gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", labels),
         lambda hb: hb.num_waiting),
        # vLLM's usage counts blocks in use only; slaq_kv_pressure adds the reserved ones.
        (_gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1 (1 = full)", labels),
         lambda hb: (min(1.0, hb.num_blocks_used / hb.num_blocks_total)
                     if hb.num_blocks_total > 0 else 0.0)),
        (CounterMetricFamily("vllm:num_preemptions", "Preemptions since the worker started",
                             labels=labels), lambda hb: hb.num_preemptions),
    ]
    for family, value in series:
        for hb in hbs:
            family.add_metric([hb.model, hb.worker], value(hb))
        yield family


# ---- the control plane: gates, admission, reprioritiser cycles -------------------------------


@dataclass(slots=True)
class ControlState:
    gates: dict[tuple[str, str], bool]
    predicted_ttft_s: dict[str, float]
    admission_modes: dict[str, str]
    cycle_seconds: list[float]  # newest first


def read_control_state(client: redis.Redis) -> ControlState:
    admission = read_admission(client)
    cycles = [float(x) for x in client.lrange(CYCLES_KEY, 0, -1)]
    return ControlState(
        gates=read_gates(client),
        predicted_ttft_s={t: a.predicted_ttft_ms / 1000.0 for t, a in admission.items()
                          if a.predicted_ttft_ms is not None
                          and math.isfinite(a.predicted_ttft_ms)},
        admission_modes={t: a.mode for t, a in admission.items()},
        cycle_seconds=cycles)


def control_metrics(state: ControlState) -> Iterator[Metric]:
    gates = _gauge("slaq_gate_open", "1 while the reprioritiser keeps a (role, tier) gate open",
                   ["role", "tier"])
    for (role, tier), is_open in sorted(state.gates.items()):
        gates.add_metric([role, tier], 1.0 if is_open else 0.0)
    yield gates
    predicted = _gauge("slaq_admission_predicted_ttft_seconds",
                       "The reprioritiser's predicted TTFT for new requests", ["tier"])
    for tier, seconds in sorted(state.predicted_ttft_s.items()):
        predicted.add_metric([tier], seconds)
    yield predicted
    modes = _gauge("slaq_admission_mode", "1 for the admission mode each tier is in",
                   ["tier", "mode"])
    for tier, mode in sorted(state.admission_modes.items()):
        modes.add_metric([tier, mode], 1.0)
    yield modes

    # The beat process serves the cycle histogram itself (slaq_reprioritiser_cycle_seconds);
    # here only its recent window is visible, so these are gauges under other names.
    cycles = state.cycle_seconds
    yield GaugeMetricFamily("slaq_reprioritiser_recent_cycles",
                            "Reprioritiser cycles in the recent window", value=len(cycles))
    if not cycles:
        return
    yield GaugeMetricFamily("slaq_reprioritiser_last_cycle_seconds",
                            "Duration of the latest reprioritiser cycle", value=cycles[0])
    recent = _gauge("slaq_reprioritiser_recent_cycle_seconds",
                    "Quantiles of the recent reprioritiser cycle durations", ["quantile"])
    for q in CYCLE_QUANTILES:
        recent.add_metric([floatToGoString(q)], percentile(cycles, q * 100.0))
    yield recent


# ---- the collector -------------------------------------------------------------------------


class SlaqCollector(Collector):
    """Reads Redis and the ledger on every ``collect()``; holds no counts of its own."""

    def __init__(self, client: redis.Redis, session_factory: sessionmaker[Session]) -> None:
        self._r = client
        self._sessions = session_factory

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("slaq_metrics_source_up",
                               "1 when this scrape could read the source", labels=["source"])
        try:
            heartbeats = read_heartbeats(self._r)
            control = read_control_state(self._r)
        except redis.RedisError:
            log.warning("metrics: cannot read Redis", exc_info=True)
            heartbeats, control = None, None
        try:
            with self._sessions() as session:
                groups = ledger_totals(session)
        except SQLAlchemyError:
            log.warning("metrics: cannot read the ledger", exc_info=True)
            groups = None
        up.add_metric(["redis"], 0.0 if control is None else 1.0)
        up.add_metric(["database"], 0.0 if groups is None else 1.0)
        yield up
        if heartbeats is not None and control is not None:
            yield from worker_metrics(heartbeats, time.time())
            yield from control_metrics(control)
        if groups is not None:
            yield from ledger_metrics(groups)
