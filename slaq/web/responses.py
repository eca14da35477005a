"""Builders for OpenAI response bodies and streaming chunks (chat and text completions).

Shapes follow OpenAI's API so that the official client parses them unchanged: one ``id`` and
``created`` per request shared by all its chunks, ``service_tier`` = the tier actually used, and
``usage`` with ``prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SSE_DONE = "data: [DONE]\n\n"
SYSTEM_FINGERPRINT = "fp_slaq"


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every body and chunk of one request repeats."""

    id: str
    created: int
    model: str
    service_tier: str
    kind: str  # "chat" | "completion"

    def __post_init__(self) -> None:
        if self.kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {self.kind!r}")

    def head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "service_tier": self.service_tier, "system_fingerprint": SYSTEM_FINGERPRINT}


def response_id(kind: str, request_id: str) -> str:
    """The public id; it ends with the ledger's request id so the two can be matched."""
    return f"chatcmpl-{request_id}" if kind == "chat" else f"cmpl-{request_id}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def completion_body(meta: ResponseMeta, text: str, finish_reason: str, usage_: dict) -> dict:
    """A non-streaming ``chat.completion`` or ``text_completion`` body."""
    if meta.kind == "chat":
        choice = {"index": 0,
                  "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason}
        body = meta.head("chat.completion")
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = meta.head("text_completion")
    body["choices"] = [choice]
    body["usage"] = usage_
    return body


def content_chunk(meta: ResponseMeta, text: str, *, first: bool = False,
                  finish_reason: str | None = None) -> dict:
    """A chunk with one choice. The first chat chunk carries the role with the first text."""
    if meta.kind == "chat":
        if finish_reason is not None and not text and not first:
            delta: dict = {}
        else:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = meta.head("chat.completion.chunk")
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = meta.head("text_completion")
    chunk["choices"] = [choice]
    chunk["usage"] = None
    return chunk


def usage_chunk(meta: ResponseMeta, usage_: dict) -> dict:
    """The extra chunk ``stream_options.include_usage`` asks for: no choices, only usage."""
    chunk = meta.head("chat.completion.chunk" if meta.kind == "chat" else "text_completion")
    chunk["choices"] = []
    chunk["usage"] = usage_
    return chunk


def sse(payload: dict) -> str:
    """One Server-Sent Event carrying a JSON payload."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
