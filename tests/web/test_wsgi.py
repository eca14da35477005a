"""``serve()`` runs gunicorn (gthread) in a real process and carries 64+ concurrent streams."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import redis

from slaq.platform import streams
from slaq.web.wsgi import DEFAULT_THREADS, gunicorn_options

NUM_STREAMS = 70

SERVE = """
import sys
from slaq.platform.settings import Settings
from slaq.web.wsgi import serve
db, rd, model, port = sys.argv[1:5]
serve("127.0.0.1", int(port), Settings(database_url=db, redis_url=rd, broker_url=rd, model=model))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_options():
    opts = gunicorn_options("0.0.0.0", 8000)
    assert opts["worker_class"] == "gthread" and opts["workers"] == 1
    assert opts["threads"] == DEFAULT_THREADS >= 64 and opts["bind"] == "0.0.0.0:8000"
    with pytest.raises(ValueError):
        gunicorn_options("127.0.0.1", 8000, threads=0)


@pytest.fixture(scope="module")
def gunicorn_api(database_url, redis_url, tiny_model_path, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("gunicorn") / "api.log"
    env = {**os.environ, "SLAQ_MAX_MODEL_LEN": "128", "SLAQ_DATA_DIR": str(log_path.parent)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, database_url, redis_url, str(tiny_model_path),
             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log_path.read_text()


def test_many_concurrent_streams(gunicorn_api, api_keys, tiny_model_path, scripted_worker,
                                 redis_url, web):
    body = {"model": tiny_model_path.name, "stream": True, "metadata": {"script": "hold"},
            "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"Authorization": f"Bearer {api_keys.full}"}
    held_before = len(scripted_worker.held)

    def stream_one(_: int) -> str:
        with httpx.stream("POST", gunicorn_api + "/v1/chat/completions", json=body,
                          headers=headers, timeout=60) as resp:
            assert resp.status_code == 200
            return resp.read().decode()

    with cf.ThreadPoolExecutor(NUM_STREAMS) as pool:
        futures = [pool.submit(stream_one, i) for i in range(NUM_STREAMS)]
        # Every request is admitted and waiting at once, before any token exists.
        web.wait_until(lambda: len(scripted_worker.held) >= held_before + NUM_STREAMS,
                       timeout=60, what=f"{NUM_STREAMS} concurrent requests")
        r = redis.Redis.from_url(redis_url)
        for request_id in scripted_worker.held[held_before:]:
            streams.append_tokens(r, request_id, [5], "Hi", finish_reason="stop")
        bodies = [f.result(timeout=60) for f in futures]
    assert all(b.endswith("data: [DONE]\n\n") and '"content":"Hi"' in b for b in bodies)
