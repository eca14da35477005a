"""Bad input over raw HTTP: each case's status, error type and code, and no ledger row."""

from __future__ import annotations

import json

import httpx
import pytest

# Matches LIMIT in tests/web/conftest.py (the live API's context cap).
LIMIT = 128

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"model": "MODEL", "messages": MSGS, **fields}


def completion(**fields) -> dict:
    return {"model": "MODEL", "prompt": "Hello", **fields}


# (id, path, body, status, type, code); "MODEL" is replaced by the served model's name.
CASES = [
    ("missing-model", CHAT, {"messages": MSGS}, 400, "invalid_request_error",
     "missing_required_parameter"),
    ("model-not-string", CHAT, chat(model=5), 400, "invalid_request_error", "invalid_type"),
    ("unknown-model", CHAT, chat(model="gpt-9"), 404, "invalid_request_error",
     "model_not_found"),
    ("missing-messages", CHAT, {"model": "MODEL"}, 400, "invalid_request_error",
     "missing_required_parameter"),
    ("messages-not-array", CHAT, chat(messages="hi"), 400, "invalid_request_error",
     "invalid_type"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "invalid_request_error", "empty_array"),
    ("message-not-object", CHAT, chat(messages=["hi"]), 400, "invalid_request_error",
     "invalid_type"),
    ("message-no-role", CHAT, chat(messages=[{"content": "hi"}]), 400,
     "invalid_request_error", "missing_required_parameter"),
    ("message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "invalid_request_error", "invalid_value"),
    ("message-no-content", CHAT, chat(messages=[{"role": "user"}]), 400,
     "invalid_request_error", "missing_required_parameter"),
    ("content-number", CHAT, chat(messages=[{"role": "user", "content": 7}]), 400,
     "invalid_request_error", "invalid_type"),
    ("content-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "invalid_request_error",
     "invalid_value"),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "invalid_request_error",
     "invalid_type"),
    ("temperature-high", CHAT, chat(temperature=2.5), 400, "invalid_request_error",
     "decimal_above_max_value"),
    ("temperature-negative", CHAT, chat(temperature=-0.1), 400, "invalid_request_error",
     "decimal_below_min_value"),
    ("top-p-high", CHAT, chat(top_p=1.5), 400, "invalid_request_error",
     "decimal_above_max_value"),
    ("top-k-float", CHAT, chat(top_k=2.5), 400, "invalid_request_error", "invalid_type"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-5), 400, "invalid_request_error",
     "integer_below_min_value"),
    ("max-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "invalid_request_error",
     "integer_below_min_value"),
    ("max-tokens-string", CHAT, chat(max_completion_tokens="10"), 400,
     "invalid_request_error", "invalid_type"),
    ("max-tokens-bool", CHAT, chat(max_tokens=True), 400, "invalid_request_error",
     "invalid_type"),
    ("max-tokens-huge", CHAT, chat(max_tokens=10**12), 400, "invalid_request_error",
     "context_length_exceeded"),
    ("max-tokens-just-over", CHAT, chat(max_tokens=LIMIT), 400,
     "invalid_request_error", "context_length_exceeded"),
    ("prompt-too-long", CHAT, chat(messages=[{"role": "user", "content": "Paris " * 400}]),
     400, "invalid_request_error", "context_length_exceeded"),
    ("n-two", CHAT, chat(n=2), 400, "invalid_request_error", "unsupported_value"),
    ("n-string", CHAT, chat(n="1"), 400, "invalid_request_error", "invalid_type"),
    ("stream-string", CHAT, chat(stream="yes"), 400, "invalid_request_error", "invalid_type"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400,
     "invalid_request_error", "invalid_value"),
    ("include-usage-string", CHAT, chat(stream=True, stream_options={"include_usage": "y"}),
     400, "invalid_request_error", "invalid_type"),
    ("tier-unknown", CHAT, chat(service_tier="gold"), 400, "invalid_request_error",
     "invalid_value"),
    ("tier-number", CHAT, chat(service_tier=1), 400, "invalid_request_error", "invalid_type"),
    ("stop-five", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request_error",
     "array_above_max_length"),
    ("stop-number", CHAT, chat(stop=3), 400, "invalid_request_error", "invalid_type"),
    ("stop-empty", CHAT, chat(stop=""), 400, "invalid_request_error", "invalid_value"),
    ("seed-string", CHAT, chat(seed="x"), 400, "invalid_request_error", "invalid_type"),
    ("seed-huge", CHAT, chat(seed=2**70), 400, "invalid_request_error",
     "integer_above_max_value"),
    ("ignore-eos-string", CHAT, chat(ignore_eos="true"), 400, "invalid_request_error",
     "invalid_type"),
    ("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), 400,
     "invalid_request_error", "decimal_below_min_value"),
    ("logprobs", CHAT, chat(logprobs=True), 400, "invalid_request_error",
     "unsupported_value"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "invalid_request_error", "unsupported_value"),
    ("response-format-json", CHAT, chat(response_format={"type": "json_object"}), 400,
     "invalid_request_error", "unsupported_value"),
    ("presence-penalty", CHAT, chat(presence_penalty=1.0), 400, "invalid_request_error",
     "unsupported_value"),
    ("metadata-non-string", CHAT, chat(metadata={"a": 1}), 400, "invalid_request_error",
     "invalid_value"),
    ("user-number", CHAT, chat(user=5), 400, "invalid_request_error", "invalid_type"),
    ("store-string", CHAT, chat(store="yes"), 400, "invalid_request_error", "invalid_type"),
    ("parallel-tool-calls-number", CHAT, chat(parallel_tool_calls=1), 400,
     "invalid_request_error", "invalid_type"),
    ("body-array", CHAT, [1, 2], 400, "invalid_request_error", "invalid_type"),
    ("completion-missing-prompt", COMPLETIONS, {"model": "MODEL"}, 400,
     "invalid_request_error", "missing_required_parameter"),
    ("completion-prompt-number", COMPLETIONS, completion(prompt=5), 400,
     "invalid_request_error", "invalid_type"),
    ("completion-two-prompts", COMPLETIONS, completion(prompt=["a", "b"]), 400,
     "invalid_request_error", "unsupported_value"),
    ("completion-empty-list", COMPLETIONS, completion(prompt=[]), 400,
     "invalid_request_error", "invalid_type"),
    ("completion-empty-prompt", COMPLETIONS, completion(prompt=""), 400,
     "invalid_request_error", "invalid_value"),
    ("completion-out-of-vocab", COMPLETIONS, completion(prompt=[1, 10**7]), 400,
     "invalid_request_error", "invalid_value"),
    ("completion-negative-id", COMPLETIONS, completion(prompt=[[3, -1]]), 400,
     "invalid_request_error", "invalid_value"),
    ("completion-too-long", COMPLETIONS, completion(prompt=list(range(3, 3 + LIMIT))),
     400, "invalid_request_error", "context_length_exceeded"),
    ("completion-best-of", COMPLETIONS, completion(best_of=3), 400, "invalid_request_error",
     "integer_above_max_value"),
    ("completion-echo", COMPLETIONS, completion(echo=True), 400, "invalid_request_error",
     "unsupported_value"),
]


@pytest.fixture(scope="module")
def http(live_api, api_keys):
    with httpx.Client(base_url=live_api.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {api_keys.full}"}) as client:
        yield client


def _fill_model(body, model: str):
    if isinstance(body, dict) and body.get("model") == "MODEL":
        return {**body, "model": model}
    return body


def _assert_error(resp: httpx.Response, status: int, type_: str, code: str | None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert (error["type"], error["code"]) == (type_, code), error
    return error


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_without_a_ledger_row(case, http, tiny_model_path, web):
    assert web.max_model_len == LIMIT
    _, path, body, status, type_, code = case
    before = web.count_rows()
    resp = http.post(path, json=_fill_model(body, tiny_model_path.name))
    error = _assert_error(resp, status, type_, code)
    if code not in ("context_length_exceeded", "model_not_found"):
        assert error["param"] is not None or code == "invalid_type"
    assert web.count_rows() == before


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"model": "x",}', b"\xff\xfe",
                                 b"[" * 100_000, b"null"],
                         ids=["broken", "empty", "trailing-comma", "not-utf8", "deep", "null"])
def test_malformed_json(raw, http, web):
    before = web.count_rows()
    resp = http.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
    _assert_error(resp, 400, "invalid_request_error", "invalid_json")
    assert web.count_rows() == before


@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer sk-wrong", "Basic abc", "sk-x"])
def test_missing_or_bad_key(auth, live_api, tiny_model_path, web):
    before = web.count_rows()
    headers = {"Authorization": auth} if auth else {}
    resp = httpx.post(live_api.base_url + CHAT, headers=headers, timeout=30,
                      json=chat(model=tiny_model_path.name))
    _assert_error(resp, 401, "invalid_request_error", "invalid_api_key")
    resp = httpx.get(live_api.base_url + "/v1/models", headers=headers, timeout=30)
    _assert_error(resp, 401, "invalid_request_error", "invalid_api_key")
    assert web.count_rows() == before


def test_tier_not_allowed_is_403(live_api, api_keys, tiny_model_path, web):
    before = web.count_rows()
    for tier in ("priority", "fast", "default"):
        resp = httpx.post(live_api.base_url + CHAT, timeout=30,
                          headers={"Authorization": f"Bearer {api_keys.flex_only}"},
                          json=chat(model=tiny_model_path.name, service_tier=tier))
        error = _assert_error(resp, 403, "permission_error", "tier_not_allowed")
        assert error["param"] == "service_tier"
    assert web.count_rows() == before


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/nothing-here", 404, "not_found"),
    ("POST", "/v2/chat/completions", 404, "not_found"),
    ("GET", CHAT, 405, "method_not_allowed"),
    ("DELETE", COMPLETIONS, 405, "method_not_allowed"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
])
def test_unknown_routes_answer_in_the_error_shape(method, path, status, code, http):
    _assert_error(http.request(method, path), status, "invalid_request_error", code)


WRONG_VALUES = [None, True, -1, 0, 1.5, 1e308, "", "x", [], [1], {}, {"a": "b"}]
FIELDS = ["store", "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "stop", "seed", "stream", "stream_options", "service_tier", "user",
          "metadata", "ignore_eos", "repetition_penalty", "logprobs", "top_logprobs",
          "presence_penalty", "tools", "response_format", "unknown_extra"]


def test_no_500_for_any_wrong_type(http, tiny_model_path, scripted_worker):
    """Every field with every JSON type: answered, never a 500 (valid ones complete)."""
    for name in FIELDS:
        for value in WRONG_VALUES:
            body = chat(model=tiny_model_path.name, max_tokens=2,
                        metadata={"script": "answer"})
            body[name] = value
            if name == "stream" and value is True:
                continue  # a valid stream; covered elsewhere
            resp = http.post(CHAT, content=json.dumps(body).encode())
            assert resp.status_code < 500, (name, value, resp.text)
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param", [
    (chat(messages=[{"role": "user", "content": "hi"}, {"content": "x"}]), "messages[1].role"),
    (chat(messages=[{"role": 3, "content": "x"}]), "messages[0].role"),
    (chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
    (chat(max_tokens=-1), "max_tokens"),
])
def test_error_param_names_the_field(body, param, http, tiny_model_path):
    resp = http.post(CHAT, json=_fill_model(body, tiny_model_path.name))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
