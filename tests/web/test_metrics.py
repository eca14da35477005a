"""``GET /metrics`` on real Redis and PostgreSQL: heartbeats written the way workers write them,
ledger rows moved through the real claims, the scrape parsed with prometheus_client's parser.

The database and Redis db are shared with the other web tests of the session, so ledger
assertions use a model name of their own or compare before/after scrapes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.heartbeat import publish
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.keys import heartbeat_key
from slaq.platform.pressure import Heartbeat
from slaq.tasks.reprioritise import CYCLES_KEY
from slaq.web import create_app

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def app(web_config) -> Flask:
    return create_app({**web_config, "TICKET_SENDER": lambda *_: None})


@pytest.fixture()
def r(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def scrape(app: Flask, accept: str | None = None) -> tuple[Samples, dict[str, str], str]:
    """All samples by (name, labels), the family types by name, and the content type."""
    headers = {"Accept": accept} if accept else {}
    resp = app.test_client().get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    families = list(text_string_to_metric_families(resp.get_data(as_text=True)))
    samples: Samples = {}
    for family in families:
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples, {f.name: f.type for f in families}, resp.content_type


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_is_served_without_an_api_key(app) -> None:
    client = app.test_client()
    assert client.get("/v1/models").status_code == 401  # the API itself still wants a key
    samples, types, content_type = scrape(app)
    assert content_type.startswith("text/plain")
    assert value(samples, "slaq_metrics_source_up", source="redis") == 1.0
    assert value(samples, "slaq_metrics_source_up", source="database") == 1.0
    assert types["slaq_requests"] == "gauge"
    assert types["slaq_sla_met"] == "counter"
    assert types["vllm:time_to_first_token_seconds"] == "histogram"


def test_vllm_names_survive_a_scraper_that_prefers_openmetrics(app, r) -> None:
    # Prometheus 2.x asks for OpenMetrics first; the colon in vllm:* names must stay.
    hb = _heartbeat(f"om-{uuid.uuid4().hex[:8]}", "both", num_preemptions=5)
    publish(r, hb, ttl_s=60)
    try:
        samples, types, content_type = scrape(
            app, "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                 "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    finally:
        r.delete(heartbeat_key(hb.worker))
    assert content_type.startswith("text/plain; version=0.0.4")
    assert types["vllm:num_preemptions"] == "counter"
    assert value(samples, "vllm:num_preemptions_total", model_name="tiny-random",
                 worker=hb.worker) == 5
    assert value(samples, "slaq_worker_info", worker=hb.worker, role="both", device="cpu",
                 model_name="tiny-random", host="testhost", pid="4321") == 1


def _heartbeat(worker: str, role: str, **fields: Any) -> Heartbeat:
    return Heartbeat(worker=worker, role=role, device="cpu", model="tiny-random",
                     host="testhost", pid=4321, time=time.time(), **fields)


def test_worker_series_follow_the_heartbeats(app, r) -> None:
    tag = uuid.uuid4().hex[:8]
    prefill = _heartbeat(f"prefill-{tag}", "prefill", num_blocks_total=200,
                         num_blocks_used=50, num_blocks_reserved=30, num_blocks_leased=10,
                         num_running=3, num_waiting=7, num_preemptions=2,
                         prefill_tokens_per_s=1500.0, last_batch_size=3, max_batch_size=8,
                         ttft_ms=120.0, num_finished=40)
    decode = _heartbeat(f"decode-{tag}", "decode", num_blocks_total=100, num_blocks_used=90,
                        num_running=12, decode_tokens_per_s=300.0, tpot_ms=25.0)
    publish(r, prefill, ttl_s=60)
    publish(r, decode, ttl_s=60)
    try:
        s, types, _ = scrape(app)
        p, d = prefill.worker, decode.worker
        assert value(s, "vllm:num_requests_running", model_name="tiny-random", worker=p) == 3
        assert value(s, "vllm:num_requests_waiting", model_name="tiny-random", worker=p) == 7
        assert value(s, "vllm:kv_cache_usage_perc", model_name="tiny-random", worker=p) == 0.25
        assert value(s, "vllm:kv_cache_usage_perc", model_name="tiny-random", worker=d) == 0.9
        assert value(s, "vllm:num_preemptions_total", model_name="tiny-random", worker=p) == 2
        assert types["vllm:num_preemptions"] == "counter"
        assert value(s, "slaq_kv_pressure", worker=p, role="prefill") == pytest.approx(0.4)
        assert value(s, "slaq_kv_pressure", worker=d, role="decode") == pytest.approx(0.9)
        assert value(s, "slaq_kv_blocks", worker=p, role="prefill", state="free") == 120
        assert value(s, "slaq_kv_blocks", worker=p, role="prefill", state="reserved") == 30
        assert value(s, "slaq_kv_leased_blocks", worker=p, role="prefill") == 10
        assert value(s, "slaq_kv_capacity_blocks", worker=d, role="decode") == 100
        assert value(s, "slaq_worker_ttft_seconds", worker=p, role="prefill") == 0.12
        assert value(s, "slaq_worker_tpot_seconds", worker=d, role="decode") == 0.025
        # No recent TTFT on the decode worker: no sample rather than a made-up zero.
        assert value(s, "slaq_worker_ttft_seconds", worker=d, role="decode") is None
        assert value(s, "slaq_worker_tokens_per_second", worker=p, role="prefill",
                     phase="prefill") == 1500.0
        assert value(s, "slaq_worker_batch_size", worker=p, role="prefill", kind="max") == 8
        assert value(s, "slaq_worker_finished_requests_total", worker=p, role="prefill") == 40
        assert value(s, "slaq_worker_info", worker=p, role="prefill", device="cpu",
                     model_name="tiny-random", host="testhost", pid="4321") == 1
        assert 0 <= value(s, "slaq_worker_heartbeat_age_seconds", worker=p, role="prefill") < 60
        # Other tests' heartbeats may expire meanwhile: compare within one scrape.
        info = [dict(labels) for name, labels in s if name == "slaq_worker_info"]
        for role in ("prefill", "decode", "both"):
            assert value(s, "slaq_workers", role=role) == sum(i["role"] == role for i in info)
    finally:
        r.delete(heartbeat_key(prefill.worker), heartbeat_key(decode.worker))
    after, _, _ = scrape(app)
    assert value(after, "vllm:num_requests_running", model_name="tiny-random",
                 worker=prefill.worker) is None
    assert value(after, "slaq_kv_pressure", worker=decode.worker, role="decode") is None


def _create(session, model: str, tier: str, received: datetime, num_prompt: int = 10) -> str:
    # Real params; script "real" makes the web tests' scripted worker ignore the row.
    row = ledger.create_request(session, kind="chat", model=model, tier_used=tier,
                                ttft_target_ms=500.0, tpot_target_ms=50.0,
                                prompt_token_ids=list(range(num_prompt)), received_at=received,
                                params=SamplingParams().to_dict(),
                                request_metadata={"script": "real"})
    return row.id


def _finish(session, rid: str, received: datetime, ttft_s: float, tpot_s: float,
            num_tokens: int, cached: int = 0) -> None:
    first = received + timedelta(seconds=ttft_s)
    done = first + timedelta(seconds=tpot_s * (num_tokens - 1))
    assert ledger.start_prefill(session, rid, 1, "w-prefill", at=received)
    assert ledger.record_first_token(session, rid, 1, "w-prefill", at=first)
    assert ledger.start_decode(session, rid, 1, "w-decode", at=first)
    assert ledger.finish_request(session, rid, 1, output_text="x", finish_reason="stop",
                                 completion_tokens=num_tokens, cached_tokens=cached,
                                 worker="w-decode", at=done)


def test_ledger_counts_tokens_and_latencies(app, database_url) -> None:
    model = f"metrics-model-{uuid.uuid4().hex[:8]}"
    before, _, _ = scrape(app)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    with session_factory(database_url)() as s:
        # met: TTFT 0.2 s <= 0.5 s, TPOT 0.02 s <= 0.05 s
        fast = _create(s, model, "priority", t0, num_prompt=12)
        _finish(s, fast, t0, ttft_s=0.2, tpot_s=0.02, num_tokens=11, cached=4)
        # missed: TTFT 3 s
        slow = _create(s, model, "priority", t0, num_prompt=8)
        _finish(s, slow, t0, ttft_s=3.0, tpot_s=0.04, num_tokens=5)
        # missed: TPOT 0.2 s; in another tier
        flex = _create(s, model, "flex", t0, num_prompt=6)
        _finish(s, flex, t0, ttft_s=0.3, tpot_s=0.2, num_tokens=3)
        queued = _create(s, model, "flex", t0)
        started = _create(s, model, "default", t0, num_prompt=7)
        assert ledger.start_prefill(s, started, 1, "w-prefill", at=t0)
        failed = _create(s, model, "default", t0)
        assert ledger.fail_request(s, failed, 1, "boom")
    try:
        after, _, _ = scrape(app)
    finally:
        with session_factory(database_url)() as s:  # leave nothing active for other tests
            assert ledger.cancel_request(s, queued) and ledger.cancel_request(s, started)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - (value(before, name, **labels) or 0.0)

    assert delta("slaq_requests", state="finished", tier="priority") == 2
    assert delta("slaq_requests", state="finished", tier="flex") == 1
    assert delta("slaq_requests", state="queued", tier="flex") == 1
    assert delta("slaq_requests", state="prefilling", tier="default") == 1
    assert delta("slaq_requests", state="failed", tier="default") == 1
    assert delta("slaq_requests", state="decoding", tier="batch") == 0
    assert delta("slaq_sla_met_total", tier="priority") == 1
    assert delta("slaq_sla_missed_total", tier="priority") == 1
    assert delta("slaq_sla_missed_total", tier="flex") == 1
    assert delta("slaq_sla_met_total", tier="flex") == 0

    # Only requests whose prompt was processed count their prompt tokens.
    m = {"model_name": model}
    assert value(after, "vllm:prompt_tokens_total", **m) == 12 + 8 + 6
    assert value(after, "vllm:generation_tokens_total", **m) == 11 + 5 + 3
    assert value(after, "vllm:prefix_cache_queries_total", **m) == 12 + 8 + 6
    assert value(after, "vllm:prefix_cache_hits_total", **m) == 4

    ttft = "vllm:time_to_first_token_seconds"
    assert value(after, ttft + "_count", **m) == 3
    assert value(after, ttft + "_sum", **m) == pytest.approx(3.5, abs=1e-3)
    assert value(after, ttft + "_bucket", le="0.1", **m) == 0
    assert value(after, ttft + "_bucket", le="0.25", **m) == 1
    assert value(after, ttft + "_bucket", le="0.5", **m) == 2
    assert value(after, ttft + "_bucket", le="2.5", **m) == 2
    assert value(after, ttft + "_bucket", le="5.0", **m) == 3
    assert value(after, ttft + "_bucket", le="+Inf", **m) == 3
    # Inter-token latency counts gaps: 10 at 0.02 s, 4 at 0.04 s, 2 at 0.2 s.
    itl = "vllm:inter_token_latency_seconds"
    assert value(after, itl + "_count", **m) == 16
    assert value(after, itl + "_sum", **m) == pytest.approx(10 * 0.02 + 4 * 0.04 + 2 * 0.2,
                                                           abs=1e-3)
    assert value(after, itl + "_bucket", le="0.025", **m) == 10
    assert value(after, itl + "_bucket", le="0.05", **m) == 14
    e2e = "vllm:e2e_request_latency_seconds"
    # 0.2 + 10 * 0.02 = 0.4 s; 3 + 4 * 0.04 = 3.16 s; 0.3 + 2 * 0.2 = 0.7 s
    assert value(after, e2e + "_sum", **m) == pytest.approx(0.4 + 3.16 + 0.7, abs=1e-3)
    assert value(after, e2e + "_bucket", le="0.5", **m) == 1
    assert value(after, e2e + "_bucket", le="1.0", **m) == 2

    assert delta("slaq_request_ttft_seconds_count", tier="priority") == 2
    assert delta("slaq_request_ttft_seconds_bucket", tier="priority", le="0.25") == 1
    assert delta("slaq_request_tpot_seconds_count", tier="flex") == 1
    assert delta("slaq_request_tpot_seconds_bucket", tier="flex", le="0.1") == 0
    assert delta("slaq_request_tpot_seconds_bucket", tier="flex", le="0.25") == 1
    assert delta("slaq_prompt_tokens_total", tier="priority") == 20
    assert delta("slaq_generation_tokens_total", tier="flex") == 3


def test_reprioritiser_cycles_and_control_state(app, r) -> None:
    from slaq.platform.decisions import AdmissionState, publish_state

    r.delete(CYCLES_KEY)
    s, _, _ = scrape(app)
    assert value(s, "slaq_reprioritiser_recent_cycles") == 0
    assert value(s, "slaq_reprioritiser_last_cycle_seconds") is None
    # Newest first, as the reprioritiser pushes them.
    for seconds in [0.001 * i for i in range(1, 101)]:
        r.lpush(CYCLES_KEY, f"{seconds:.6f}")
    publish_state(r, gates={("prefill", "flex"): False, ("prefill", "priority"): True},
                  routing={}, admission={
                      "flex": AdmissionState("flex", mode="refuse", budget_tokens=100,
                                             predicted_ttft_ms=2500.0)})
    try:
        s, _, _ = scrape(app)
        assert value(s, "slaq_reprioritiser_recent_cycles") == 100
        assert value(s, "slaq_reprioritiser_last_cycle_seconds") == 0.1
        assert value(s, "slaq_reprioritiser_recent_cycle_seconds", quantile="0.5") == 0.05
        assert value(s, "slaq_reprioritiser_recent_cycle_seconds", quantile="0.99") == 0.099
        assert value(s, "slaq_reprioritiser_recent_cycle_seconds", quantile="1.0") == 0.1
        assert value(s, "slaq_gate_open", role="prefill", tier="flex") == 0
        assert value(s, "slaq_gate_open", role="prefill", tier="priority") == 1
        assert value(s, "slaq_admission_predicted_ttft_seconds", tier="flex") == 2.5
        assert value(s, "slaq_admission_mode", tier="flex", mode="refuse") == 1
        assert value(s, "slaq_admission_mode", tier="priority", mode="accept") == 1
    finally:
        publish_state(r, gates={}, routing={}, admission={})
        r.delete(CYCLES_KEY)


def test_a_dead_redis_drops_only_its_series(web_config) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app({**web_config, "REDIS_URL": f"redis://127.0.0.1:{port}/0",
                      "TICKET_SENDER": lambda *_: None})
    s, types, _ = scrape(app)
    assert value(s, "slaq_metrics_source_up", source="redis") == 0
    assert value(s, "slaq_metrics_source_up", source="database") == 1
    assert "slaq_requests" in types
    assert "vllm:num_requests_running" not in types


def test_handoff_counters_per_worker(app, r) -> None:
    tag = uuid.uuid4().hex[:8]
    decode = _heartbeat(f"decode-{tag}", "decode", num_handoff_blocks=40,
                        num_handoff_blocks_reused=25, prefix_hashes=list(range(-64, 64)))
    prefill = _heartbeat(f"prefill-{tag}", "prefill")
    publish(r, decode, ttl_s=60)
    publish(r, prefill, ttl_s=60)
    try:
        s, types, _ = scrape(app)
    finally:
        r.delete(heartbeat_key(decode.worker), heartbeat_key(prefill.worker))
    d, p = decode.worker, prefill.worker
    assert types["slaq_worker_handoff_blocks"] == "counter"
    assert types["slaq_worker_handoff_reused_blocks"] == "counter"
    assert types["slaq_worker_prefix_hashes"] == "gauge"
    assert value(s, "slaq_worker_handoff_blocks_total", worker=d, role="decode") == 40
    assert value(s, "slaq_worker_handoff_reused_blocks_total", worker=d, role="decode") == 25
    assert value(s, "slaq_worker_prefix_hashes", worker=d, role="decode") == 128
    # A worker that took no hand-off over reports zeros, not a missing series.
    assert value(s, "slaq_worker_handoff_blocks_total", worker=p, role="prefill") == 0
    assert value(s, "slaq_worker_handoff_reused_blocks_total", worker=p, role="prefill") == 0
    assert value(s, "slaq_worker_prefix_hashes", worker=p, role="prefill") == 0
    # The hashes themselves are routing state, never label values.
    assert not any("-64" in dict(labels).values() for _, labels in s)
