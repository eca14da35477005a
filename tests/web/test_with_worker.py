"""The API in front of a real Celery worker process (role ``both``, tiny random model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from slaq.platform.db import session_factory
from slaq.platform.keys import heartbeat_key
from slaq.platform.models import RequestRow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def worker(database_url, redis_url, tiny_model_path, tmp_path_factory):
    import redis

    r = redis.Redis.from_url(redis_url)
    # Tickets of earlier tests' requests (answered by the scripted worker) are not for it.
    for key in r.scan_iter("prefill.*"):
        r.delete(key)
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    name = f"web-both-{os.getpid()}"
    env = {**os.environ, "SLAQ_DATABASE_URL": database_url, "SLAQ_REDIS_URL": redis_url,
           "SLAQ_BROKER_URL": redis_url, "SLAQ_MODEL": str(tiny_model_path)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slaq.gpu_workers.worker", "--role", "both", "--device",
             "cpu", "--name", name], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + 120
    while not r.exists(heartbeat_key(name)):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    yield name
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_stream_and_non_stream_agree_with_a_real_worker(worker, live_api, api_keys,
                                                        tiny_model_path, web, database_url):
    client = web.client(live_api, api_keys.full)
    kwargs = {"model": tiny_model_path.name, "messages": QUESTION, "temperature": 0,
              "max_completion_tokens": 8, "service_tier": "priority",
              "metadata": {"script": "real"}}  # the scripted worker leaves these alone
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].finish_reason in ("stop", "length")
    ids = [whole.id.split("-", 1)[1], chunks[0].id.split("-", 1)[1]]

    def finished_rows() -> list[RequestRow]:
        # The worker writes the last token before it records the finish in the ledger.
        with session_factory(database_url)() as s:
            rows = s.scalars(select(RequestRow).where(RequestRow.id.in_(ids))).all()
            return rows if all(r.state == "finished" for r in rows) else []

    rows = web.wait_until(finished_rows, what="both requests finished in the ledger")
    assert len(rows) == 2 and all(r.tier_used == "priority" for r in rows)
    assert all(r.output_text == streamed for r in rows)
