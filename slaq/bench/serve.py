"""``slaq bench serve``'s client: replay a trace against a running slaq stack.

Every request goes to ``POST /v1/completions`` with ``stream: true`` and
``stream_options.include_usage``. Prompts are lists of token ids of exactly the trace's input
length, and ``max_tokens`` is the trace's output length with ``ignore_eos: true``, so the server
does the work the trace describes (text prompts would change length through the tokenizer and
the chat template). Ids are drawn pseudo-randomly from a small range that every model's
vocabulary holds; requests whose trace rows share a prefix hash id get the same tokens for that
block, so prefix caching sees the sharing the trace recorded.

Timing follows ``vllm bench serve``: TTFT is the first SSE chunk with non-empty ``choices``,
ITL the gaps between later content chunks, E2E the time to ``[DONE]``, all from when the request
was sent. The run is bounded: at most ``max_requests``, no new request after ``max_wall_s``,
and whatever is still open ``drain_timeout_s`` after the last send is cancelled and counted as
lost. The client talks to ``base_url`` only and never follows redirects.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from slaq.sim.traces import MOONCAKE_BLOCK_TOKENS, Trace, TraceRequest

FINISHED, REFUSED, LOST = "finished", "refused", "lost"
OUTCOMES: tuple[str, ...] = (FINISHED, REFUSED, LOST)


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is this machine (``localhost`` or a loopback address)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    """Where to send and the bounds of one run."""

    base_url: str
    api_key: str
    model: str | None = None  # None: the first model GET /v1/models lists
    max_requests: int = 1000
    max_wall_s: float = 600.0  # no request is sent later than this after the start
    drain_timeout_s: float = 120.0  # open requests are cancelled this long after the last send
    request_timeout_s: float = 300.0
    max_in_flight: int = 256
    token_id_range: tuple[int, int] = (100, 400)  # ids every vocabulary holds, past specials
    seed: int = 0
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must be http(s)://…, got {self.base_url!r}")
        if not self.allow_remote and not is_loopback(self.base_url):
            raise ValueError(f"base_url {self.base_url!r} is not loopback; pass allow_remote "
                             "to load a remote server")
        if self.max_requests < 1 or self.max_in_flight < 1:
            raise ValueError("max_requests and max_in_flight must be >= 1")
        if min(self.max_wall_s, self.drain_timeout_s, self.request_timeout_s) <= 0:
            raise ValueError("max_wall_s, drain_timeout_s and request_timeout_s must be > 0")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError("token_id_range must be (lo, hi) with 0 <= lo < hi")


@dataclass(slots=True)
class RequestResult:
    """What happened to one replayed request. Times are seconds from the run's start."""

    index: int
    tier_asked: str
    arrival_s: float  # when the trace (scaled) says it arrives
    num_prompt_tokens: int
    num_output_tokens_asked: int
    outcome: str = LOST
    tier_used: str | None = None  # the response's service_tier
    sent_s: float | None = None
    ttft_s: float | None = None  # from sent_s
    e2e_s: float | None = None  # from sent_s to [DONE]
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    http_status: int | None = None
    error: str | None = None
    response_id: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1); None with fewer than two tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def downgraded(self) -> bool:
        return self.tier_used is not None and self.tier_used != self.tier_asked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestResult:
        return cls(**d)


@dataclass(slots=True)
class ReplayResult:
    """All requests of one run; ``duration_s`` runs from the start to the last request's end."""

    model: str
    started_at: float  # Unix time of the run's start
    duration_s: float
    results: list[RequestResult]


def fit_lengths(trace: Trace, max_input_tokens: int | None = None,
                max_output_tokens: int | None = None) -> Trace:
    """Clip prompt and output lengths (a small model's context); prefix hash ids trimmed."""
    out = []
    for r in trace.requests:
        n_in = min(r.num_prompt_tokens, max_input_tokens or r.num_prompt_tokens)
        n_out = min(r.num_output_tokens, max_output_tokens or r.num_output_tokens)
        n_blocks = -(-n_in // MOONCAKE_BLOCK_TOKENS)
        out.append(replace(r, num_prompt_tokens=n_in, num_output_tokens=n_out,
                           hash_ids=r.hash_ids[:n_blocks]))
    return Trace(trace.name, tuple(out))


def prompt_token_ids(req: TraceRequest, index: int, token_id_range: tuple[int, int],
                     seed: int = 0) -> list[int]:
    """Exactly ``req.num_prompt_tokens`` ids: one fixed pseudo-random block per prefix hash id
    (shared prefixes stay shared), then ids of this request's own."""
    lo, hi = token_id_range
    ids: list[int] = []
    for h in req.hash_ids:
        if len(ids) >= req.num_prompt_tokens:
            break
        rng = random.Random(f"block:{seed}:{h}")
        ids.extend(rng.randrange(lo, hi) for _ in range(MOONCAKE_BLOCK_TOKENS))
    rng = random.Random(f"request:{seed}:{index}")
    ids.extend(rng.randrange(lo, hi) for _ in range(req.num_prompt_tokens - len(ids)))
    return ids[: req.num_prompt_tokens]


def request_body(model: str, req: TraceRequest, ids: list[int]) -> dict[str, Any]:
    """The ``/v1/completions`` body for one trace request."""
    return {"model": model, "prompt": ids, "max_tokens": req.num_output_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "service_tier": req.tier}


def _read_event(res: RequestResult, payload: dict[str, Any], now: float,
                last_chunk: list[float]) -> None:
    """Fold one SSE JSON event into ``res``; raises RuntimeError on an error event."""
    if "error" in payload:
        raise RuntimeError(str(payload["error"].get("message") or payload["error"]))
    res.response_id = res.response_id or payload.get("id")
    if payload.get("service_tier"):
        res.tier_used = payload["service_tier"]
    if payload.get("usage"):
        res.num_output_tokens = int(payload["usage"].get("completion_tokens") or 0)
        details = payload["usage"].get("prompt_tokens_details") or {}
        res.num_cached_tokens = int(details.get("cached_tokens") or 0)
    choices = payload.get("choices") or []
    if not choices:
        return
    if res.ttft_s is None:
        res.ttft_s = now
        last_chunk.append(now)
    elif choices[0].get("text") or (choices[0].get("delta") or {}).get("content"):
        res.itl_s.append(now - last_chunk[-1])
        last_chunk.append(now)


async def _stream_one(client: httpx.AsyncClient, res: RequestResult, body: dict[str, Any],
                      t_sent: float) -> None:
    """Send one request and read its SSE stream into ``res`` (times relative to ``t_sent``)."""
    async with client.stream("POST", "/v1/completions", json=body,
                             headers={"x-request-id": f"bench-{res.index}"}) as resp:
        res.http_status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")[:300]
            res.outcome = REFUSED if resp.status_code == 429 else LOST
            res.error = f"HTTP {resp.status_code}: {text}"
            return
        last_chunk: list[float] = []
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            now = time.perf_counter() - t_sent
            if data == "[DONE]":
                res.e2e_s = now
                break
            _read_event(res, json.loads(data), now, last_chunk)
    if res.e2e_s is None:
        raise RuntimeError("stream ended without [DONE]")
    if res.ttft_s is None:
        raise RuntimeError("stream ended without a token")
    if res.num_output_tokens == 0:  # no usage chunk: count content chunks instead
        res.num_output_tokens = len(last_chunk)
    res.outcome = FINISHED


async def _send(client: httpx.AsyncClient, res: RequestResult, body: dict[str, Any], t0: float,
                timeout_s: float, slots: asyncio.Semaphore) -> None:
    try:
        async with slots:
            t_sent = time.perf_counter()
            res.sent_s = t_sent - t0
            await asyncio.wait_for(_stream_one(client, res, body, t_sent), timeout_s)
    except TimeoutError:
        res.outcome, res.error = LOST, f"timeout after {timeout_s:g}s"
    except asyncio.CancelledError:
        res.outcome, res.error = LOST, "cancelled at the end of the run"
        raise
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        res.outcome, res.error = LOST, f"{type(exc).__name__}: {exc}"


async def _model_name(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


Progress = Callable[[dict[str, Any]], None]


def progress_counts(results: list[RequestResult], total: int, t_s: float) -> dict[str, Any]:
    """Where a replay stands: sent so far of ``total``, and how the sent ones ended."""
    done = {k: 0 for k in OUTCOMES}
    in_flight = 0
    for r in results:
        if r.e2e_s is None and r.error is None and r.http_status in (None, 200):
            in_flight += 1
        else:
            done[r.outcome] += 1
    return {"t_s": round(t_s, 1), "sent": len(results), "total": total,
            "in_flight": in_flight, **done}


async def _report_progress(progress: Progress, results: list[RequestResult], total: int,
                           t0: float, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        progress(progress_counts(results, total, time.perf_counter() - t0))


async def replay_async(trace: Trace, cfg: ServeConfig, progress: Progress | None = None,
                       progress_interval_s: float = 10.0) -> ReplayResult:
    """Send ``trace``'s requests at their arrival times; return one result per request sent.

    ``progress`` (if given) is called every ``progress_interval_s`` with
    :func:`progress_counts`."""
    requests = trace.requests[: cfg.max_requests]
    base = cfg.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    limits = httpx.Limits(max_connections=cfg.max_in_flight,
                          max_keepalive_connections=cfg.max_in_flight)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout,
                                 follow_redirects=False, trust_env=False) as client:
        model = cfg.model or await _model_name(client)
        slots = asyncio.Semaphore(cfg.max_in_flight)
        started_at, t0 = time.time(), time.perf_counter()
        results: list[RequestResult] = []
        tasks: list[asyncio.Task] = []
        total = sum(1 for r in requests if r.arrival_s <= cfg.max_wall_s)
        reporter = None if progress is None else asyncio.create_task(
            _report_progress(progress, results, total, t0, progress_interval_s))
        for i, req in enumerate(requests):
            if req.arrival_s > cfg.max_wall_s:
                break
            body = request_body(model, req,
                                prompt_token_ids(req, i, cfg.token_id_range, cfg.seed))
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            res = RequestResult(i, req.tier, req.arrival_s, req.num_prompt_tokens,
                                req.num_output_tokens)
            results.append(res)
            tasks.append(asyncio.create_task(
                _send(client, res, body, t0, cfg.request_timeout_s, slots)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=cfg.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            progress(progress_counts(results, total, time.perf_counter() - t0))
        ends = [r.sent_s + r.e2e_s for r in results
                if r.sent_s is not None and r.e2e_s is not None]
        duration = max(ends, default=time.perf_counter() - t0)
    return ReplayResult(model, started_at, duration, results)


def replay(trace: Trace, cfg: ServeConfig, progress: Progress | None = None,
           progress_interval_s: float = 10.0) -> ReplayResult:
    """Blocking form of :func:`replay_async`."""
    return asyncio.run(replay_async(trace, cfg, progress, progress_interval_s))
