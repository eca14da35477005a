"""Admission under the reprioritiser's published state: downgrade, refuse (429), accept.

A published state limits a tier through a per-cycle prompt-token budget; budget 0 means the
very next request of that tier is over it.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import redis

from slaq.platform.decisions import AdmissionState, publish_state
from slaq.platform.keys import admission_key

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def publish(redis_url):
    r = redis.Redis.from_url(redis_url)

    def publish(*states: AdmissionState) -> None:
        publish_state(r, gates={}, routing={}, admission={s.tier: s for s in states})

    yield publish
    r.delete(admission_key())


@pytest.fixture(scope="module")
def client(live_api, api_keys, scripted_worker, web) -> openai.OpenAI:
    return web.client(live_api, api_keys.full)


def test_downgrade_shows_in_service_tier_and_ledger(client, publish, tiny_model_path, web):
    publish(AdmissionState("default", "downgrade", budget_tokens=0, downgrade_to="flex"))
    resp = client.chat.completions.create(model=tiny_model_path.name, messages=QUESTION,
                                          max_tokens=2, service_tier="default")
    assert resp.service_tier == "flex"
    row = web.row(resp.id)
    assert (row.tier_asked, row.tier_used) == ("default", "flex")
    assert row.ttft_target_ms == 30000  # the targets of the tier actually used
    # Other tiers are untouched.
    resp = client.chat.completions.create(model=tiny_model_path.name, messages=QUESTION,
                                          max_tokens=2, service_tier="priority")
    assert resp.service_tier == "priority"


def test_refused_flex_is_429_with_retry_headers_and_no_row(live_api, api_keys, publish,
                                                           tiny_model_path, web):
    publish(AdmissionState("flex", "refuse", budget_tokens=0, retry_after_s=7))
    before = web.count_rows()
    resp = httpx.post(live_api.base_url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {api_keys.full}"},
                      json={"model": tiny_model_path.name, "messages": QUESTION,
                            "service_tier": "flex"})
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "resource_unavailable")
    assert resp.headers["retry-after"] == "7" and resp.headers["retry-after-ms"] == "7000"
    assert web.count_rows() == before


def test_refuse_is_ignored_for_tiers_that_may_not_be_refused(client, publish,
                                                             tiny_model_path):
    publish(AdmissionState("priority", "refuse", budget_tokens=0))
    resp = client.chat.completions.create(model=tiny_model_path.name, messages=QUESTION,
                                          max_tokens=2, service_tier="priority")
    assert resp.service_tier == "priority"


def test_no_published_state_accepts(client, tiny_model_path):
    resp = client.chat.completions.create(model=tiny_model_path.name, messages=QUESTION,
                                          max_tokens=2, service_tier="flex")
    assert resp.service_tier == "flex"


def test_model_not_pulled_is_503_and_listed_by_name(web_config, api_keys, tmp_path, web):
    from slaq.web import create_app

    config = {**web_config, "MODEL": "SmolLM2-135M-Instruct", "MODELS_DIR": str(tmp_path)}
    server = web.start_server(create_app(config))
    headers = {"Authorization": f"Bearer {api_keys.full}"}
    before = web.count_rows()
    try:
        listed = httpx.get(server.base_url + "/v1/models", headers=headers, timeout=10)
        resp = httpx.post(server.base_url + "/v1/chat/completions", headers=headers,
                          timeout=30, json={"model": "SmolLM2-135M-Instruct",
                                            "messages": QUESTION})
    finally:
        server.stop()
    assert [m["id"] for m in listed.json()["data"]] == ["SmolLM2-135M-Instruct"]
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "model_unavailable"
    assert web.count_rows() == before


def test_queue_down_fails_the_row_and_answers_503(web_config, api_keys, tiny_model_path, web):
    from sqlalchemy import select

    from slaq.platform.db import session_factory
    from slaq.platform.models import RequestRow
    from slaq.web import create_app

    def broken_sender(request_id: str, attempt: int, tier: str, priority: int | None) -> None:
        raise ConnectionError("broker unreachable")

    server = web.start_server(create_app({**web_config, "TICKET_SENDER": broken_sender}))
    try:
        resp = httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {api_keys.full}",
                                   "x-request-id": "queue-down-1"},
                          json={"model": tiny_model_path.name, "messages": QUESTION})
    finally:
        server.stop()
    assert resp.status_code == 503
    assert resp.headers["x-should-retry"] == "true" and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "server_error"
    with session_factory(web.database_url)() as s:
        row = s.scalars(select(RequestRow).where(
            RequestRow.client_request_id == "queue-down-1")).one()
        assert row.state == "failed" and "broker unreachable" in row.error


def test_priority_tickets_are_ordered_by_prompt_length(web_config, api_keys, tiny_model_path,
                                                       web):
    """The API sends each ticket at the policy's message priority: priority-tier prompts by
    length bucket (here 8, 16, 32 ... tokens, through POLICY_OVERRIDES as beat reads them),
    other tiers at their own queue priority; under ``static`` the tier's own for everyone."""
    from slaq.platform.tiers import DEFAULT_TIERS
    from slaq.web import create_app

    def post(server, tier: str, words: int) -> None:
        messages = [{"role": "user", "content": " ".join(["Paris"] * words)}]
        resp = httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {api_keys.full}"},
                          json={"model": tiny_model_path.name, "messages": messages,
                                "max_tokens": 1, "service_tier": tier})
        assert resp.status_code == 503  # the recording sender fails every ticket

    sent: dict[str, list[tuple[str, int | None]]] = {}
    for policy in ("slaq", "static"):
        got = sent.setdefault(policy, [])

        def record(request_id, attempt, tier, priority, got=got):
            got.append((tier, priority))
            raise ConnectionError("recorded")  # fails the row at once: no worker needed

        config = {**web_config, "TICKET_SENDER": record, "POLICY": policy,
                  "POLICY_OVERRIDES": '{"length_bucket_tokens": 8}'}
        server = web.start_server(create_app(config))
        try:
            for tier, words in (("priority", 1), ("priority", 40), ("default", 1)):
                post(server, tier, words)
        finally:
            server.stop()
    [(_, short), (_, long_), (_, default)] = sent["slaq"]
    assert short is not None and long_ is not None and short < long_ <= 8
    assert default == DEFAULT_TIERS["default"].queue_priority
    assert [p for _, p in sent["static"]] == [DEFAULT_TIERS["priority"].queue_priority] * 2 + [
        DEFAULT_TIERS["default"].queue_priority]
