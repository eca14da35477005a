"""The whole path on real parts: `slaq up` + the official openai client + the real SmolLM2."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest
import redis
from sqlalchemy import select

from slaq.platform.db import session_factory
from slaq.platform.keys import heartbeat_key
from slaq.platform.models import RequestRow
from slaq.platform.pressure import Heartbeat

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.api_key, max_retries=0,
                         timeout=300)


def _row(database_url: str, response_id: str) -> RequestRow:
    with session_factory(database_url)() as s:
        rows = s.scalars(select(RequestRow)).all()
        matches = [r for r in rows if response_id.endswith(str(r.id))]
        assert len(matches) == 1, f"no single ledger row for {response_id}"
        return matches[0]


def _assert_finished_priority(row: RequestRow) -> None:
    assert row.tier_asked == "priority" and row.tier_used == "priority"
    assert row.state == "finished"
    assert row.ttft_ms is not None and row.ttft_ms > 0
    assert row.tpot_ms is not None and row.tpot_ms > 0
    assert row.prefill_worker and row.decode_worker
    assert row.prefill_worker != row.decode_worker


def test_capital_of_france(smollm2_stack, database_url):
    resp = _client(smollm2_stack).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, service_tier="priority",
        temperature=0, max_completion_tokens=32)
    assert "Paris" in resp.choices[0].message.content
    assert resp.service_tier == "priority"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 1
    _assert_finished_priority(_row(database_url, resp.id))


def test_capital_of_france_streaming(smollm2_stack, database_url):
    stream = _client(smollm2_stack).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, service_tier="priority",
        temperature=0, max_completion_tokens=32, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    # The first chunk with choices carries the role and real text (TTFT is timed there).
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[0].choices[0].delta.content
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert all(c.id == chunks[0].id for c in chunks)
    _assert_finished_priority(_row(database_url, chunks[0].id))


def test_twenty_concurrent_requests_share_decode_batches(smollm2_stack, database_url, redis_url):
    client = _client(smollm2_stack)
    tiers = ["priority", "default", "flex", "auto"]

    def ask(i: int):
        return client.chat.completions.create(
            model="SmolLM2-135M-Instruct", service_tier=tiers[i % 4], temperature=0,
            max_completion_tokens=24,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 10}."}])

    with cf.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, range(20)))
    assert len(results) == 20
    for r in results:
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens >= 1
        row = _row(database_url, r.id)
        assert row.state == "finished" and row.prefill_worker != row.decode_worker
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    hb = Heartbeat.from_mapping(r.hgetall(heartbeat_key("decode-0")))
    assert hb.max_batch_size > 1, hb
