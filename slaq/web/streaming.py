"""Relay a request's token stream (``tok:<request_id>``) to the client: SSE, or one body.

Chunk order follows OpenAI (and what benchmarks time): no role-only chunk; the first chunk
carries the role *and* the first token's text; then content chunks; then ``delta: {}`` with the
``finish_reason``; then, with ``include_usage``, a ``choices: []`` chunk with usage; then
``[DONE]``. An error after the stream started is sent as ``data: {"error": {...}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis
from flask import Response, g, jsonify, request, stream_with_context

from slaq.platform.admission import Admitted, GenerationRequest
from slaq.platform.streams import StreamTimeout, TokenDelta, follow_tokens
from slaq.web import WebContext, context
from slaq.web.errors import server_error
from slaq.web.responses import (
    SSE_DONE,
    ResponseMeta,
    completion_body,
    content_chunk,
    response_id,
    sse,
    usage,
    usage_chunk,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Completed:
    """A finished generation, gathered from its token stream."""

    text: str
    num_tokens: int
    finish_reason: str
    cached_tokens: int


def _error_payload(message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _timeout_message(admitted: Admitted, idle_timeout_s: float) -> str:
    return (f"No tokens for request {admitted.request_id} within {idle_timeout_s:g}s; "
            f"the '{admitted.tier}' tier's workers may be saturated or down.")


def ledger_final_row(ctx: WebContext, request_id: str) -> Callable[[str], TokenDelta | None]:
    """For :func:`follow_tokens`: the request's end as the ledger records it (None while it
    runs), so that a stream lost with a restarted Redis still ends, with the text not yet
    relayed (``text_so_far`` is what the stream delivered)."""
    from slaq.platform.ledger import get_request
    from slaq.platform.models import FINISHED, TERMINAL_STATES

    def final_row(text_so_far: str) -> TokenDelta | None:
        with ctx.session_factory() as session:
            row = get_request(session, request_id)
            if row is None or row.state not in TERMINAL_STATES:
                return None
            if row.state != FINISHED:
                return TokenDelta([], "", error=row.error or f"the request was {row.state}")
            text = row.output_text or ""
            rest = text[len(text_so_far):] if text.startswith(text_so_far) else ""
            return TokenDelta([], rest, finish_reason=row.finish_reason or "stop",
                              cached_tokens=row.cached_tokens,
                              completion_tokens=row.completion_tokens)

    return final_row


def collect(r: redis.Redis, admitted: Admitted, *, idle_timeout_s: float,
            on_abandon: Callable[[str], None] | None = None,
            final_row: Callable[[str], TokenDelta | None] | None = None) -> Completed:
    """Wait for the whole generation; raises ApiError on a worker error or a timeout.

    ``on_abandon(request_id)`` runs when we stop waiting (timeout): nobody will read the rest.
    ``final_row`` is :func:`follow_tokens`' fallback to the ledger.
    """
    parts: list[str] = []
    num_tokens = 0
    try:
        for delta in follow_tokens(r, admitted.request_id, idle_timeout_s=idle_timeout_s,
                                   final_row=final_row):
            if delta.error is not None:
                raise server_error(f"Generation failed: {delta.error}")
            parts.append(delta.text)
            num_tokens += len(delta.token_ids)
            if delta.completion_tokens is not None:
                num_tokens = delta.completion_tokens
            if delta.finish_reason is not None:
                return Completed("".join(parts), num_tokens, delta.finish_reason,
                                 delta.cached_tokens or 0)
    except StreamTimeout as exc:
        if on_abandon is not None:
            on_abandon(admitted.request_id)
        error = server_error(_timeout_message(admitted, idle_timeout_s), status=503,
                             code="timeout")
        error.headers["x-should-retry"] = "false"
        raise error from exc
    except redis.RedisError as exc:
        log.warning("token stream of %s broke: %s", admitted.request_id, exc)
        raise server_error("The token stream is unavailable.", status=503) from exc
    raise AssertionError("follow_tokens ended without a final entry")


def completion_response(meta: ResponseMeta, admitted: Admitted, done: Completed) -> dict:
    return completion_body(meta, done.text, done.finish_reason,
                           usage(admitted.prompt_tokens, done.num_tokens, done.cached_tokens))


class SseRelay:
    """Turns token-stream deltas into SSE frames for one request."""

    def __init__(self, meta: ResponseMeta, admitted: Admitted, include_usage: bool) -> None:
        self.meta = meta
        self.admitted = admitted
        self.include_usage = include_usage
        self.num_tokens = 0
        self.sent_first = False

    def frames(self, delta: TokenDelta) -> Iterator[str]:
        if delta.error is not None:
            yield sse(_error_payload(f"Generation failed: {delta.error}"))
            yield SSE_DONE
            return
        self.num_tokens += len(delta.token_ids)
        if delta.completion_tokens is not None:
            self.num_tokens = delta.completion_tokens
        # A delta may hold ids whose text is not complete yet (a split multi-byte character);
        # the first token is still sent at once, as the role-carrying chunk.
        if delta.text or (delta.token_ids and not self.sent_first):
            yield sse(content_chunk(self.meta, delta.text, first=not self.sent_first))
            self.sent_first = True
        if delta.finish_reason is not None:
            yield sse(content_chunk(self.meta, "", first=not self.sent_first,
                                    finish_reason=delta.finish_reason))
            if self.include_usage:
                yield sse(usage_chunk(self.meta, usage(self.admitted.prompt_tokens,
                                                       self.num_tokens,
                                                       delta.cached_tokens or 0)))
            yield SSE_DONE


def relay_sse(r: redis.Redis, meta: ResponseMeta, admitted: Admitted, *, include_usage: bool,
              idle_timeout_s: float,
              on_abandon: Callable[[str], None] | None = None,
              final_row: Callable[[str], TokenDelta | None] | None = None) -> Iterator[str]:
    """SSE frames for the whole generation.

    ``on_abandon(request_id)`` runs when the client goes away before the end (the server closes
    this generator) or no token comes in time, so the work can be cancelled. ``final_row`` is
    :func:`follow_tokens`' fallback to the ledger.
    """
    relay = SseRelay(meta, admitted, include_usage)
    completed = False
    # An empty first item makes the server send the 200 and headers now, before the first
    # token (it writes no body bytes, so no client sees an extra event).
    yield ""
    try:
        for delta in follow_tokens(r, admitted.request_id, idle_timeout_s=idle_timeout_s,
                                   final_row=final_row):
            yield from relay.frames(delta)
        completed = True
    except StreamTimeout:
        yield sse(_error_payload(_timeout_message(admitted, idle_timeout_s), code="timeout"))
        yield SSE_DONE
    except redis.RedisError as exc:
        log.warning("token stream of %s broke: %s", admitted.request_id, exc)
        yield sse(_error_payload("The token stream is unavailable."))
        yield SSE_DONE
    finally:
        # Short of the final entry nobody reads the rest (the client left, no token came in
        # time, or Redis broke), so the work is cancelled.
        if not completed and on_abandon is not None:
            on_abandon(admitted.request_id)


def answer(req: GenerationRequest) -> Response:
    """Admit ``req`` for the current tenant and answer it: an SSE stream or one JSON body."""
    ctx = context()
    admitted = ctx.admission.submit(req, g.tenant, client_request_id=request.headers.get(
        "x-request-id"))
    meta = ResponseMeta(id=response_id(admitted.kind, admitted.request_id),
                        created=admitted.created, model=admitted.model,
                        service_tier=admitted.tier, kind=admitted.kind)
    timeout = ctx.idle_timeout_s(admitted)
    if req.stream:
        frames = relay_sse(ctx.redis, meta, admitted, include_usage=req.include_usage,
                           idle_timeout_s=timeout, on_abandon=_cancel_quietly(ctx),
                           final_row=ledger_final_row(ctx, admitted.request_id))
        return Response(stream_with_context(frames), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = collect(ctx.redis, admitted, idle_timeout_s=timeout, on_abandon=_cancel_quietly(ctx),
                   final_row=ledger_final_row(ctx, admitted.request_id))
    return jsonify(completion_response(meta, admitted, done))


def _cancel_quietly(ctx: WebContext) -> Callable[[str], None]:
    def cancel(request_id: str) -> None:
        try:
            ctx.cancel(request_id)
        except Exception:  # the client is gone; nobody to tell
            log.exception("could not cancel abandoned request %s", request_id)

    return cancel
