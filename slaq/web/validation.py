"""Request bodies → :class:`~slaq.platform.admission.GenerationRequest`, or a 400.

Messages and codes follow OpenAI's wording (``invalid_type``, ``missing_required_parameter``,
``integer_below_min_value``, ...) so clients that parse them keep working. Fields we do not know
are ignored, as vLLM does, because benchmark clients send extras; fields we know but cannot
honour (``n > 1``, ``logprobs``, tools, ...) are refused rather than silently dropped.
"""

from __future__ import annotations

import math
from typing import Any

from slaq.gpu_workers.engine.config import MAX_STOP_STRINGS
from slaq.platform.admission import ONLINE_SERVICE_TIERS, GenerationRequest
from slaq.web.errors import ApiError, invalid_request

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_METADATA_KEYS = 16
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return _TYPE_NAMES[t].split(" ", 1)[1]
    return type(value).__name__


def _is(value: Any, kind: type) -> bool:
    # bool is an int in Python but not in JSON; ints are numbers.
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, kind)


class Body:
    """Typed access to a JSON object's fields; every getter raises a 400 ApiError."""

    def __init__(self, body: Any, prefix: str = "") -> None:
        if not isinstance(body, dict):
            raise invalid_request("The request body must be a JSON object.", code="invalid_type")
        self.body = body
        self.prefix = prefix  # where this object sits in the request, for error params

    def get(self, name: str, kind: type, default: Any = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        if not _is(value, kind):
            param = self.prefix + name
            raise invalid_request(
                f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, but got "
                f"{_type_name(value)} instead.", param=param, code="invalid_type")
        return value

    def require(self, name: str, kind: type) -> Any:
        if self.body.get(name) is None:
            param = self.prefix + name
            raise invalid_request(f"Missing required parameter: '{param}'.", param=param,
                                  code="missing_required_parameter")
        return self.get(name, kind)

    def number(self, name: str, default: float, lo: float | None = None,
               hi: float | None = None, kind: type = float) -> Any:
        value = self.get(name, kind, default)
        word = "integer" if kind is int else "decimal"
        if lo is not None and value < lo:
            raise invalid_request(f"Invalid '{name}': {word} below minimum value. Expected a "
                                  f"value >= {lo}, but got {value} instead.", param=name,
                                  code=f"{word}_below_min_value")
        if hi is not None and value > hi:
            raise invalid_request(f"Invalid '{name}': {word} above maximum value. Expected a "
                                  f"value <= {hi}, but got {value} instead.", param=name,
                                  code=f"{word}_above_max_value")
        return value

    def unsupported(self, name: str, allowed: tuple[Any, ...], why: str) -> None:
        value = self.body.get(name)
        if value is not None and value not in allowed:
            raise invalid_request(f"'{name}' is not supported: {why}.", param=name,
                                  code="unsupported_value")


def _stop(body: Body) -> tuple[str, ...]:
    value = body.body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid_request("Invalid type for 'stop': expected a string or an array of "
                              "strings.", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid_request(f"Invalid 'stop': at most {MAX_STOP_STRINGS} sequences allowed.",
                              param="stop", code="array_above_max_length")
    if any(s == "" for s in stops):
        raise invalid_request("Invalid 'stop': sequences must be non-empty.", param="stop",
                              code="invalid_value")
    return tuple(stops)


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is(i, int) for i in value):
        raise invalid_request(f"Invalid type for '{name}': expected an array of integers.",
                              param=name, code="invalid_type")
    return list(value)


def _metadata(body: Body) -> dict[str, str] | None:
    meta = body.get("metadata", dict)
    if meta is None:
        return None
    if len(meta) > MAX_METADATA_KEYS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in meta.items()):
        raise invalid_request("Invalid 'metadata': up to 16 string keys (<= 64 chars) with "
                              "string values (<= 512 chars).", param="metadata",
                              code="invalid_value")
    return dict(meta)


def _stream_flags(body: Body) -> tuple[bool, bool]:
    stream = body.get("stream", bool, False)
    options = body.get("stream_options", dict)
    if options is None:
        return stream, False
    if not stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is "
                              "enabled.", param="stream_options", code="invalid_value")
    include_usage = Body(options, "stream_options.").get("include_usage", bool, False)
    return stream, include_usage


def _max_tokens(body: Body, names: tuple[str, ...]) -> int | None:
    for name in names:  # the first given wins: max_completion_tokens is preferred
        if body.body.get(name) is not None:
            return body.number(name, 0, lo=1, kind=int)
    return None


# OpenAI fields that change nothing here; still type-checked so a wrong type is a 400.
IGNORED_FIELDS: dict[str, type] = {
    "store": bool, "parallel_tool_calls": bool, "prompt_cache_key": str,
    "safety_identifier": str, "reasoning_effort": str, "modalities": list,
}


def _common(body: Body, kind: str) -> dict[str, Any]:
    """Fields chat and text completions share, type- and range-checked."""
    for name, kind_ in IGNORED_FIELDS.items():
        body.get(name, kind_)
    if body.number("n", 1, lo=1, kind=int) != 1:
        raise invalid_request("Only n=1 is supported.", param="n", code="unsupported_value")
    body.unsupported("logit_bias", ({},), "logit bias is not implemented")
    body.number("presence_penalty", 0.0, lo=-2, hi=2)
    body.unsupported("presence_penalty", (0, 0.0), "use repetition_penalty")
    body.number("frequency_penalty", 0.0, lo=-2, hi=2)
    body.unsupported("frequency_penalty", (0, 0.0), "use repetition_penalty")
    stream, include_usage = _stream_flags(body)
    tier = body.get("service_tier", str)
    if tier is not None and tier not in ONLINE_SERVICE_TIERS:
        raise invalid_request(f"Invalid 'service_tier': expected one of "
                              f"{', '.join(ONLINE_SERVICE_TIERS)}, but got '{tier}'.",
                              param="service_tier", code="invalid_value")
    top_k = body.number("top_k", 0, lo=-1, kind=int)
    stop_ids = body.body.get("stop_token_ids")
    return {
        "kind": kind,
        "model": body.require("model", str),
        "temperature": float(body.number("temperature", 1.0, lo=0, hi=2)),
        # OpenAI accepts top_p=0 (keep only the top token); the sampler needs it > 0.
        "top_p": float(body.number("top_p", 1.0, lo=0, hi=1)) or 1e-9,
        "top_k": max(top_k, 0),  # vLLM spells "off" as -1
        "seed": _seed(body),
        "stop": _stop(body),
        "stop_token_ids": tuple(_token_ids(stop_ids, "stop_token_ids")) if stop_ids else (),
        "ignore_eos": body.get("ignore_eos", bool, False),
        "repetition_penalty": float(body.number("repetition_penalty", 1.0, lo=1e-6, hi=10)),
        "stream": stream,
        "include_usage": include_usage,
        "service_tier": tier,
        "user": body.get("user", str),
        "metadata": _metadata(body),
    }


def _seed(body: Body) -> int | None:
    if body.get("seed", int) is None:
        return None
    return body.number("seed", 0, lo=-(2**63), hi=2**63 - 1, kind=int)  # OpenAI's int64


def _content(message: Body, index: int) -> str:
    content = message.body.get("content")
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise invalid_request(f"Invalid '{param}': only text parts are supported.",
                                      param=param, code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid_request(f"Invalid type for '{param}': expected a string or an array of "
                          f"text parts, but got {_type_name(content)} instead.", param=param,
                          code="invalid_type")


def _messages(body: Body) -> list[dict[str, str]]:
    raw = body.require("messages", list)
    if not raw:
        raise invalid_request("Invalid 'messages': empty array. Expected an array with minimum "
                              "length 1.", param="messages", code="empty_array")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise invalid_request(f"Invalid type for 'messages[{i}]': expected an object.",
                                  param=f"messages[{i}]", code="invalid_type")
        message = Body(item, f"messages[{i}].")
        role = message.require("role", str)
        if role not in CHAT_ROLES:
            raise invalid_request(f"Invalid value for 'messages[{i}].role': expected one of "
                                  f"{', '.join(CHAT_ROLES)}.", param=f"messages[{i}].role",
                                  code="invalid_value")
        if role != "assistant" and item.get("content") is None:
            raise invalid_request(f"Missing required parameter: 'messages[{i}].content'.",
                                  param=f"messages[{i}].content",
                                  code="missing_required_parameter")
        # Chat templates know "system"; OpenAI's newer name for it is "developer".
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(message, i)})
    return messages


def parse_chat(raw: Any) -> GenerationRequest:
    """Validate a ``POST /v1/chat/completions`` body."""
    body = Body(raw)
    fields = _common(body, "chat")
    messages = _messages(body)
    body.unsupported("logprobs", (False,), "log probabilities are not returned")
    body.unsupported("top_logprobs", (0,), "log probabilities are not returned")
    body.unsupported("tools", ([],), "tool calling is not implemented")
    body.unsupported("tool_choice", ("none",), "tool calling is not implemented")
    body.unsupported("functions", ([],), "function calling is not implemented")
    fmt = body.get("response_format", dict)
    if fmt is not None and fmt.get("type") != "text":
        raise invalid_request("'response_format' is not supported: only {\"type\": \"text\"}.",
                              param="response_format", code="unsupported_value")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    return _build(messages=messages, max_tokens=max_tokens, **fields)


def _prompt(body: Body) -> tuple[str | None, list[int] | None]:
    prompt = body.body.get("prompt")
    if prompt is None:
        raise invalid_request("Missing required parameter: 'prompt'.", param="prompt",
                              code="missing_required_parameter")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(_is(i, int) for i in prompt):
        return None, list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        (only,) = prompt
        if isinstance(only, str):
            return only, None
        if isinstance(only, list):
            return None, _token_ids(only, "prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and all(
            isinstance(p, (str, list)) for p in prompt):
        raise invalid_request("Only one prompt per request is supported.", param="prompt",
                              code="unsupported_value")
    raise invalid_request("Invalid type for 'prompt': expected a string, an array with one "
                          "string, or an array of token ids.", param="prompt",
                          code="invalid_type")


def parse_completion(raw: Any) -> GenerationRequest:
    """Validate a ``POST /v1/completions`` body (``max_tokens`` defaults to 16)."""
    body = Body(raw)
    fields = _common(body, "completion")
    prompt, prompt_ids = _prompt(body)
    body.number("best_of", 1, lo=1, hi=1, kind=int)
    body.unsupported("echo", (False,), "echo is not implemented")
    body.unsupported("logprobs", (0,), "log probabilities are not returned")
    body.unsupported("suffix", ("",), "suffix is not implemented")
    max_tokens = _max_tokens(body, ("max_tokens", "max_completion_tokens"))
    return _build(prompt=prompt, prompt_token_ids=prompt_ids,
                  max_tokens=16 if max_tokens is None else max_tokens, **fields)


def _build(**fields: Any) -> GenerationRequest:
    try:
        return GenerationRequest(**fields)
    except ValueError as exc:  # an invariant the checks above should already have caught
        raise ApiError(400, str(exc), "invalid_request_error", None, "invalid_value") from exc


def json_body() -> Any:
    """The request's JSON body, whatever its Content-Type; 400 when it does not parse."""
    from flask import request

    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # absurdly deep nesting; json raises this, not ValueError
        body = None
    if body is None:
        raise invalid_request("We could not parse the JSON body of your request. The body "
                              "must be valid JSON.", code="invalid_json")
    return body
