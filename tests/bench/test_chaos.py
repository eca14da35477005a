"""A short chaos run of the real stack: sim workers, a SIGKILL, a Redis restart, zero lost.

Real processes throughout (redis-server, PostgreSQL, gunicorn API, Celery beat and workers);
the ledger is the judge: every request the client sent must be finished there or have been
refused with a 429.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
import redis

from slaq.bench.chaos import ChaosConfig, free_port, run_chaos
from slaq.bench.serve import ServeConfig
from slaq.platform import streams
from slaq.sim.traces import Trace, TraceRequest

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="needs redis-server")

DEFAULT_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TIERS = ("priority", "default", "default", "flex", "batch")


def _trace(num_requests: int, span_s: float) -> Trace:
    # Short prompts and 50-80 output tokens: on the CPU-speed profile a request decodes for a
    # few seconds, so the SIGKILL and the restart land on generations in flight.
    gap = span_s / num_requests
    return Trace("chaos-test", tuple(
        TraceRequest(arrival_s=i * gap, num_prompt_tokens=16 + (i * 7) % 32,
                     num_output_tokens=50 + (i * 5) % 30, tier=TIERS[i % len(TIERS)])
        for i in range(num_requests)))


def _redis_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


@needs_redis_server
def test_token_stream_survives_a_redis_restart_and_falls_back_to_the_ledger():
    port = free_port()
    servers = [_redis_server(port)]
    r = redis.Redis(port=port)
    asked: list[str] = []

    def ledger(text_so_far: str) -> streams.TokenDelta | None:
        # The first question finds the request still running; the next finds it finished.
        asked.append(text_so_far)
        if len(asked) == 1:
            return None
        return streams.TokenDelta([], "cd", finish_reason="stop", completion_tokens=4)

    try:
        streams.append_tokens(r, "req-1", [1, 2], "ab")
        reader = streams.follow_tokens(r, "req-1", idle_timeout_s=60, block_ms=100,
                                       final_row=ledger)
        assert next(reader).text == "ab"
        servers[0].terminate()
        servers[0].wait()
        # The writer waits for Redis to come back instead of failing the generation.
        restart = threading.Timer(0.5, lambda: servers.append(_redis_server(port)))
        restart.start()
        streams.append_tokens(r, "req-2", [3], "x", finish_reason="stop")
        restart.join()
        assert streams.read_tokens(r, "req-2")[0].finish_reason == "stop"
        # req-1's stream died with Redis: the reader asks the ledger and ends with its row.
        last = next(reader)
        assert (last.text, last.finish_reason, last.completion_tokens) == ("cd", "stop", 4)
        assert asked == ["ab", "ab"]
        with pytest.raises(StopIteration):
            next(reader)
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_redis_server
def test_sigkill_and_redis_restart_lose_nothing(tiny_model_path, tmp_path):
    server = (os.environ.get("SLAQ_TEST_DATABASE_URL") or os.environ.get("SLAQ_DATABASE_URL")
              or DEFAULT_SERVER_URL)
    trace = _trace(36, 24.0)
    cfg = ChaosConfig(server_database_url=server, model_path=str(tiny_model_path),
                      out_dir=str(tmp_path / "chaos"), num_workers=2,
                      sim_profile="smollm2-135m-cpu", kill_at_s=8.0, redis_restart_at_s=16.0,
                      settle_timeout_s=90.0, orphan_timeout_s=3.0, plot=False)
    serve = ServeConfig(base_url="http://127.0.0.1:1", api_key="-", max_wall_s=30.0,
                        drain_timeout_s=120.0, request_timeout_s=150.0)
    report = run_chaos(trace, cfg, serve)

    recon = report["reconciliation"]
    assert recon["sent"] == len(trace)
    # Every request the client sent is accounted for: finished in the ledger or refused (429).
    for tier, counts in recon["per_tier"].items():
        assert counts["finished"] + counts["refused"] == counts["sent"], (tier, recon)
    assert report["lost"] == {"client": 0, "ledger": 0}, recon
    assert report["still_active_in_ledger"] == 0
    kinds = [e["kind"] for e in report["events"]]
    assert kinds == ["sigkill_worker", "redis_restart"]
    # The killed worker's generations were recovered by the reprioritiser (a new attempt).
    kill = report["events"][0]["detail"]
    assert kill["in_flight_ids"], "the killed worker had nothing in flight; nothing was tested"
    for rid, row in kill["in_flight_final"].items():
        assert row == {"state": "finished", "attempt": row["attempt"]} and row["attempt"] > 1, rid
    assert report["reprioritiser_cycles"]["count"] > 0
