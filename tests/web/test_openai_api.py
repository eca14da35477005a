"""The official openai client against the live API; a scripted worker writes the tokens."""

from __future__ import annotations

import httpx
import openai
import pytest
import redis

from slaq.gpu_workers.engine.loader import apply_chat_template

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_api, api_keys, scripted_worker, web) -> openai.OpenAI:
    return web.client(live_api, api_keys.full)


@pytest.fixture(scope="module")
def model(tiny_model_path) -> str:
    return tiny_model_path.name


@pytest.fixture(scope="module")
def answer(scripted_worker) -> list[tuple[int, str]]:
    return scripted_worker.deltas()


def test_models_list_and_retrieve(client, model):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [model]
    assert listed.data[0].object == "model"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert err.value.code == "model_not_found"


def test_chat_completion(client, model, answer, tiny_tokenizer, web):
    resp = client.chat.completions.create(model=model, messages=QUESTION, user="u1",
                                          metadata={"script": "answer"})
    prompt_ids = apply_chat_template(tiny_tokenizer, QUESTION)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-") and resp.model == model
    assert isinstance(resp.created, int) and resp.system_fingerprint
    assert resp.service_tier == "default"  # auto = the tenant's tier
    (choice,) = resp.choices
    assert (choice.index, choice.message.role) == (0, "assistant")
    assert choice.message.content == web.answer and choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(answer)
    assert resp.usage.total_tokens == len(prompt_ids) + len(answer)
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    row = web.row(resp.id)
    assert list(row.prompt_token_ids) == prompt_ids
    assert row.kind == "chat" and row.tier_used == "default" and row.user == "u1"
    # No max tokens given: the rest of the context window.
    assert row.params["max_tokens"] == web.max_model_len - len(prompt_ids)


def test_max_completion_tokens_is_preferred_and_cuts(client, model, answer, web):
    resp = client.chat.completions.create(model=model, messages=QUESTION,
                                          max_completion_tokens=3, max_tokens=50)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "".join(t for _, t in answer[:3])
    assert resp.usage.completion_tokens == 3
    assert web.row(resp.id).params["max_tokens"] == 3
    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
    assert resp.usage.completion_tokens == 2


def test_sampling_fields_reach_the_ledger(client, model, web):
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "developer", "content": "Be brief."}, *QUESTION],
        temperature=0.5, top_p=0.9, seed=7, stop=["Paris", "\n"], max_tokens=4,
        extra_body={"top_k": 5, "ignore_eos": True, "repetition_penalty": 1.1,
                    "some_unknown_extra": {"nested": 1}})
    params = web.row(resp.id).params
    assert params["temperature"] == 0.5 and params["top_p"] == 0.9 and params["seed"] == 7
    assert params["stop"] == ["Paris", "\n"] and params["top_k"] == 5
    assert params["ignore_eos"] is True and params["repetition_penalty"] == 1.1


def test_chat_stream_chunk_shapes(client, model, answer, tiny_tokenizer, web):
    stream = client.chat.completions.create(model=model, messages=QUESTION, stream=True,
                                            stream_options={"include_usage": True},
                                            service_tier="priority")
    chunks = list(stream)
    # No role-only chunk: the very first chunk carries the role and the first token's text.
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == answer[0][1]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.service_tier == "priority" for c in chunks)
    content = chunks[:-2]
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in content)
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content for c in content) == web.answer
    last = chunks[-2]
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content is None and last.choices[0].delta.role is None
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == len(answer)
    assert usage_chunk.usage.prompt_tokens == len(apply_chat_template(tiny_tokenizer, QUESTION))


def test_stream_without_usage_ends_with_finish_chunk(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, stream=True,
                                                 max_completion_tokens=2))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_raw_sse_framing(live_api, api_keys, model):
    body = {"model": model, "messages": QUESTION, "stream": True, "max_tokens": 3,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live_api.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {api_keys.full}"}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert '"role":"assistant"' in events[0]
    assert '"choices":[]' in events[-3] and '"usage":{' in events[-3]


def test_completions_prompt_forms(client, model, answer, tiny_tokenizer, web):
    ids = tiny_tokenizer.encode("Hello, world!", add_special_tokens=False)
    for prompt in ("Hello, world!", ["Hello, world!"], ids, [ids]):
        resp = client.completions.create(model=model, prompt=prompt)
        assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
        assert resp.choices[0].text == web.answer
        assert resp.usage.prompt_tokens == len(ids)
        row = web.row(resp.id)
        assert list(row.prompt_token_ids) == ids and row.kind == "completion"
        assert row.params["max_tokens"] == 16  # OpenAI's default for completions


def test_completions_stream(client, model, answer):
    chunks = list(client.completions.create(model=model, prompt="Hello", stream=True,
                                            max_tokens=4, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].text == answer[0][1]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "".join(t for _, t in answer[:4])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("asked,used", [("priority", "priority"), ("fast", "priority"),
                                        ("default", "default"), ("flex", "flex"),
                                        ("auto", "default"), (None, "default")])
def test_service_tier_used_is_reported(client, model, web, asked, used):
    extra = {} if asked is None else {"service_tier": asked}
    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1,
                                          **extra)
    assert resp.service_tier == used
    row = web.row(resp.id)
    assert row.tier_used == used


def test_flex_only_tenant_gets_flex_for_auto(live_api, api_keys, model, scripted_worker, web):
    client = web.client(live_api, api_keys.flex_only)
    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1)
    assert resp.service_tier == "flex"
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model=model, messages=QUESTION, service_tier="priority")
    assert err.value.code == "tier_not_allowed"


def test_ticket_lands_on_the_tier_queue(client, model, redis_url):
    r = redis.Redis.from_url(redis_url)

    def queued(tier: str) -> int:
        # kombu's Redis transport keeps one list per priority step, named queue[+sep+step].
        return sum(r.llen(k) for k in r.scan_iter(f"prefill.{tier}*") if r.type(k) == b"list")

    before = queued("flex")
    client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1,
                                   service_tier="flex")
    assert queued("flex") == before + 1


def test_worker_error_mid_stream_is_an_error_event(client, model):
    stream = client.chat.completions.create(model=model, messages=QUESTION, stream=True,
                                            metadata={"script": "error_after_first"})
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 1 and got[0].choices[0].delta.role == "assistant"
    assert "engine crashed" in str(err.value)


def test_worker_error_without_stream_is_500(client, model):
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=model, messages=QUESTION,
                                       metadata={"script": "error"})
    assert "engine crashed" in str(err.value)


def test_cached_tokens_are_reported(client, model):
    resp = client.chat.completions.create(model=model, messages=QUESTION,
                                          metadata={"script": "cached"})
    assert resp.usage.prompt_tokens_details.cached_tokens == 3


def test_x_request_id_is_echoed_and_recorded(live_api, api_keys, model, web,
                                             scripted_worker):
    headers = {"Authorization": f"Bearer {api_keys.full}", "x-request-id": "bench-42"}
    resp = httpx.post(live_api.base_url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": QUESTION, "max_tokens": 1})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "bench-42"
    assert web.row(resp.json()["id"]).client_request_id == "bench-42"
    # Errors echo it too; without one the server makes one up.
    assert httpx.get(live_api.base_url + "/nope", headers=headers).headers[
        "x-request-id"] == "bench-42"
    assert httpx.get(live_api.base_url + "/healthz").headers["x-request-id"].startswith("req_")


def test_client_disconnect_cancels_the_request(live_api, api_keys, model, web,
                                               scripted_worker, redis_url):
    from slaq.platform import streams

    r = redis.Redis.from_url(redis_url)
    body = {"model": model, "messages": QUESTION, "stream": True,
            "metadata": {"script": "hold"}}
    with httpx.stream("POST", live_api.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {api_keys.full}"}, timeout=30) as resp:
        request_id = web.wait_until(lambda: scripted_worker.held and scripted_worker.held[-1],
                                what="the held request")
        streams.append_tokens(r, request_id, [5], "Hi")
        first = next(resp.iter_lines())
        assert '"role":"assistant"' in first
    # The server notices the closed socket on its next write.
    def cancelled() -> bool:
        streams.append_tokens(r, request_id, [6], " there")
        return web.row("x-" + request_id).state == "cancelled"

    web.wait_until(cancelled, what="the abandoned request to be cancelled")


def test_no_tokens_in_time(web_config, api_keys, model, scripted_worker, web):
    from slaq.web import create_app

    server = web.start_server(create_app({**web_config, "STREAM_IDLE_TIMEOUT_S": 0.3}))
    client = web.client(server, api_keys.full)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=model, messages=QUESTION,
                                           metadata={"script": "hold"})
        assert err.value.status_code == 503 and err.value.code == "timeout"
        stream = client.chat.completions.create(model=model, messages=QUESTION, stream=True,
                                                metadata={"script": "hold"})
        with pytest.raises(openai.APIError, match="No tokens"):
            list(stream)
    finally:
        server.stop()
    # Both requests were given up on, so they are cancelled rather than left to run.
    for request_id in scripted_worker.held[-2:]:
        assert web.row("x-" + request_id).state == "cancelled"
