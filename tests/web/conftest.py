"""The API under a real WSGI server (werkzeug, threaded) on real PostgreSQL, Redis and Celery.

No GPU worker runs here: :class:`ScriptedWorker` plays one by watching the ledger for new rows
and writing tokens to their Redis streams exactly as a worker does (slaq.platform.streams).
What it writes is chosen per request through ``metadata={"script": ...}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import redis
from flask import Flask
from sqlalchemy import func, select
from werkzeug.serving import BaseWSGIServer, make_server

from slaq.platform import streams
from slaq.platform.db import session_factory
from slaq.platform.models import RequestRow
from slaq.web import create_app

ANSWER = "The capital of France is Paris."
MAX_MODEL_LEN = 128
WAIT_S = 15.0


@dataclass(slots=True)
class LiveServer:
    app: Flask
    server: BaseWSGIServer
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)
        self.server.server_close()


def start_server(app: Flask) -> LiveServer:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return LiveServer(app, server, thread)


@dataclass(frozen=True, slots=True)
class Keys:
    full: str  # all online tiers, default tier "default"
    flex_only: str  # only "flex" (also its default)
    tenant_ids: tuple[Any, ...]


@pytest.fixture(scope="session")
def api_keys(database_url) -> Keys:
    from slaq.platform import tenants

    with session_factory(database_url)() as s:
        full = tenants.create_tenant(s, "web-full", default_tier="default",
                                     allowed_tiers=["priority", "default", "flex"])
        flex = tenants.create_tenant(s, "web-flex", default_tier="flex",
                                     allowed_tiers=["flex"])
        s.flush()
        keys = Keys(tenants.create_api_key(s, full.id), tenants.create_api_key(s, flex.id),
                    (full.id, flex.id))
        s.commit()
    return keys


@pytest.fixture(scope="session")
def web_config(database_url, redis_url, tiny_model_path) -> dict[str, Any]:
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "BROKER_URL": redis_url,
            "MODEL": str(tiny_model_path), "MAX_MODEL_LEN": MAX_MODEL_LEN,
            "STREAM_IDLE_TIMEOUT_S": WAIT_S, "ADMISSION_TTL_S": 0}


@pytest.fixture(scope="session")
def live_api(web_config, api_keys) -> Iterator[LiveServer]:
    server = start_server(create_app(web_config))
    yield server
    server.stop()


def client_for(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0,
                         timeout=60)


def count_rows(database_url: str) -> int:
    with session_factory(database_url)() as s:
        return s.scalar(select(func.count()).select_from(RequestRow))


def row_for(database_url: str, response_id: str) -> RequestRow:
    request_id = response_id.split("-", 1)[1]
    with session_factory(database_url)() as s:
        row = s.get(RequestRow, request_id)
        assert row is not None, f"no ledger row for {response_id}"
        s.expunge(row)
        return row


def wait_until(condition: Callable[[], Any], timeout: float = WAIT_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


@dataclass(slots=True)
class ScriptedWorker:
    """Answers new ledger rows by writing to their token streams, like a decode worker.

    Scripts (``metadata["script"]``): ``answer`` (default: :data:`ANSWER`, one token per
    entry, cut at max_tokens), ``error_after_first``, ``error``, ``hold`` (write nothing; the
    test writes), ``cached`` (final entry reports 3 cached prompt tokens), ``real`` (left to a
    real worker process).
    """

    database_url: str
    r: redis.Redis
    tokenizer: Any
    seen: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with session_factory(self.database_url)() as s:
                rows = s.scalars(select(RequestRow).where(RequestRow.state == "queued")).all()
                todo = [(str(r.id), r.params, r.request_metadata or {}) for r in rows
                        if str(r.id) not in self.seen]
            for request_id, params, meta in todo:
                self.seen.add(request_id)
                self.answer(request_id, params["max_tokens"], meta.get("script", "answer"))
            time.sleep(0.01)

    def deltas(self, text: str = ANSWER) -> list[tuple[int, str]]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        out, prev = [], ""
        for i, token_id in enumerate(ids):
            now = self.tokenizer.decode(ids[: i + 1])
            out.append((token_id, now[len(prev):]))
            prev = now
        return out

    def answer(self, request_id: str, max_tokens: int, script: str) -> None:
        if script == "hold":
            self.held.append(request_id)
            return
        if script == "real":  # a real worker process answers this one
            return
        if script == "error":
            streams.append_error(self.r, request_id, "engine crashed")
            return
        deltas = self.deltas()
        finish = "length" if max_tokens < len(deltas) else "stop"
        deltas = deltas[:max_tokens]
        for i, (token_id, text) in enumerate(deltas):
            last = i == len(deltas) - 1
            if script == "error_after_first" and i == 1:
                streams.append_error(self.r, request_id, "engine crashed")
                return
            streams.append_tokens(self.r, request_id, [token_id], text,
                                  finish_reason=finish if last else None,
                                  cached_tokens=(3 if script == "cached" else 0) if last else None)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from slaq.gpu_workers.engine.loader import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def scripted_worker(database_url, redis_url, tiny_tokenizer) -> Iterator[ScriptedWorker]:
    worker = ScriptedWorker(database_url, redis.Redis.from_url(redis_url), tiny_tokenizer)
    worker.start()
    yield worker
    worker.stop()



@dataclass(frozen=True, slots=True)
class WebHelpers:
    """Helpers for tests/web, handed out as a fixture (test modules cannot import conftest)."""

    database_url: str
    answer: str = ANSWER
    max_model_len: int = MAX_MODEL_LEN

    def count_rows(self) -> int:
        return count_rows(self.database_url)

    def row(self, response_id: str) -> RequestRow:
        return row_for(self.database_url, response_id)

    client = staticmethod(client_for)
    start_server = staticmethod(start_server)
    wait_until = staticmethod(wait_until)


@pytest.fixture(scope="session")
def web(database_url) -> WebHelpers:
    return WebHelpers(database_url)
