"""``collect_status`` / ``slaq status`` on real services: configured URLs, a Redis that is down,
and embedded servers (started and stopped by the call, or reused and left running)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from slaq.cli import main
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.heartbeat import publish
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.decisions import publish_state
from slaq.platform.keys import heartbeat_key
from slaq.platform.pressure import Heartbeat
from slaq.platform.services import EmbeddedRedis
from slaq.platform.settings import Settings
from slaq.status import collect_status


def _settings(tmp_path: Path, database_url: str | None, redis_url: str | None) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, redis_url=redis_url)


def _new_request(database_url: str, tier: str) -> str:
    with session_factory(database_url)() as s:
        return ledger.create_request(s, kind="completion", model="status-model", tier_used=tier,
                                     ttft_target_ms=1000.0, tpot_target_ms=100.0,
                                     prompt_token_ids=[1, 2, 3],
                                     params=SamplingParams().to_dict(),
                                     # the web tests' scripted worker ignores "real" rows
                                     request_metadata={"script": "real"}).id


@pytest.fixture()
def worker(redis_url):
    """A decode worker's heartbeat, written as a worker writes it; removed afterwards."""
    r = redis.Redis.from_url(redis_url)
    hb = Heartbeat(worker=f"decode-{uuid.uuid4().hex[:8]}", role="decode", device="cpu",
                   model="tiny", num_blocks_total=64, num_blocks_used=16, num_blocks_reserved=16,
                   num_running=2, num_waiting=1, tpot_ms=30.0, queues=["decode.any"],
                   pid=99, host="h", time=time.time())
    publish(r, hb, ttl_s=60)
    yield hb
    r.delete(heartbeat_key(hb.worker))
    r.close()


def test_workers_and_request_counts(tmp_path, database_url, redis_url, worker) -> None:
    settings = _settings(tmp_path, database_url, redis_url)
    before = collect_status(settings)
    queued = _new_request(database_url, "flex")
    other = _new_request(database_url, "flex")
    with session_factory(database_url)() as s:
        assert ledger.start_prefill(s, other, 1, "w")
        assert ledger.fail_request(s, other, 1, "boom")
    r = redis.Redis.from_url(redis_url)
    publish_state(r, gates={("prefill", "flex"): False}, routing={}, admission={})
    try:
        status = collect_status(settings)
    finally:
        publish_state(r, gates={}, routing={}, admission={})
        r.close()
        with session_factory(database_url)() as s:  # leave nothing active for other tests
            ledger.cancel_request(s, queued)

    assert status["errors"] == {}
    assert status["services"]["embedded"] == []
    entry = next(w for w in status["workers"] if w["worker"] == worker.worker)
    assert entry["role"] == "decode"
    assert entry["kv_pressure"] == 0.5
    assert entry["num_blocks_free"] == 32
    assert entry["num_running"] == 2 and entry["num_waiting"] == 1
    assert entry["tpot_ms"] == 30.0 and entry["ttft_ms"] is None
    assert entry["queues"] == ["decode.any"]
    assert entry["fresh"] is True and 0 <= entry["age_s"] < 60
    assert status["num_workers"]["decode"] >= 1
    assert status["gates"] == {"prefill:flex": "closed"}

    req, req0 = status["requests"], before["requests"]
    assert req["by_state"]["queued"] == req0["by_state"]["queued"] + 1
    assert req["by_state"]["failed"] == req0["by_state"]["failed"] + 1
    flex0 = req0["by_tier"].get("flex", {})
    assert req["by_tier"]["flex"]["queued"] == flex0.get("queued", 0) + 1
    assert req["by_tier"]["flex"]["failed"] == flex0.get("failed", 0) + 1
    assert req["total"] == req0["total"] + 2
    assert req["active"] == req0["active"] + 1
    json.dumps(status)  # plain JSON, as the CLI prints it


def test_the_cli_prints_the_status(database_url, redis_url, worker, tmp_path) -> None:
    env = {"SLAQ_DATABASE_URL": database_url, "SLAQ_REDIS_URL": redis_url,
           "SLAQ_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(main, ["status"], env=env)
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert worker.worker in {w["worker"] for w in status["workers"]}
    assert set(status["requests"]["by_state"]) >= {"queued", "finished", "failed"}


def test_prefix_hashes_show_as_a_count_with_the_handoff_counters(tmp_path, database_url,
                                                                 redis_url) -> None:
    r = redis.Redis.from_url(redis_url)
    hashes = [(i * 2654435761) % 2**61 for i in range(128)]  # as a worker publishes them
    busy = Heartbeat(worker=f"decode-{uuid.uuid4().hex[:8]}", role="decode", time=time.time(),
                     prefix_hashes=hashes, num_handoff_blocks=40, num_handoff_blocks_reused=10)
    idle = Heartbeat(worker=f"decode-{uuid.uuid4().hex[:8]}", role="decode", time=time.time())
    publish(r, busy, ttl_s=60)
    publish(r, idle, ttl_s=60)
    try:
        status = collect_status(_settings(tmp_path, database_url, redis_url))
    finally:
        r.delete(heartbeat_key(busy.worker), heartbeat_key(idle.worker))
        r.close()
    entries = {w["worker"]: w for w in status["workers"]}
    b, i = entries[busy.worker], entries[idle.worker]
    assert "prefix_hashes" not in b
    assert b["num_prefix_hashes"] == 128
    assert b["num_handoff_blocks"] == 40 and b["num_handoff_blocks_reused"] == 10
    assert b["handoff_reuse_fraction"] == 0.25
    # No hand-off yet: no share to show, rather than a made-up 0.
    assert i["num_prefix_hashes"] == 0 and i["num_handoff_blocks"] == 0
    assert i["handoff_reuse_fraction"] is None
    assert str(hashes[-1]) not in json.dumps(status)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_redis_that_is_down_is_reported(tmp_path, database_url) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    status = collect_status(_settings(tmp_path, database_url, url))
    assert "redis" in status["errors"]
    assert status["workers"] == []
    assert status["requests"]["total"] >= 0


def _answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@pytest.mark.embedded
def test_embedded_redis_is_started_and_stopped(tmp_path, database_url) -> None:
    settings = _settings(tmp_path, database_url, None)
    status = collect_status(settings)
    assert status["services"]["embedded"] == ["redis"]
    assert status["errors"] == {}
    assert status["workers"] == []
    state = json.loads((settings.data_dir / "redis" / "server.json").read_text())
    assert not _answers(int(state["port"]))


@pytest.mark.embedded
def test_a_running_embedded_redis_is_reused_and_left_running(tmp_path, database_url) -> None:
    settings = _settings(tmp_path, database_url, None)
    server = EmbeddedRedis.start(settings.data_dir / "redis")
    try:
        hb = Heartbeat(worker="embedded-worker", role="both", time=time.time())
        publish(redis.Redis.from_url(server.url), hb, ttl_s=60)
        status = collect_status(settings)
        assert [w["worker"] for w in status["workers"]] == ["embedded-worker"]
        assert status["num_workers"]["both"] == 1
        assert _answers(server.port)  # not ours to stop
    finally:
        server.stop()
    assert not _answers(server.port)


@pytest.mark.embedded
def test_a_fresh_embedded_database_reports_the_missing_ledger(tmp_path, redis_url) -> None:
    # Embedded PostgreSQL, not migrated yet: the ledger error is reported, the command works.
    settings = _settings(tmp_path, None, redis_url)
    status = collect_status(settings)
    assert status["services"]["embedded"] == ["postgres"]
    assert status["requests"] is None
    assert "requests" in status["errors"]["database"]
