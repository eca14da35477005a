"""``slaq worker``: its options and their checks, the pool sized to the engine's seats, and a
real worker process that holds no more tickets than it has seats (the rest stay in Redis)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import func, select

from slaq.cli import main as slaq_main
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.worker import WorkerOptions
from slaq.gpu_workers.worker import main as worker_main
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.keys import heartbeat_key
from slaq.platform.models import RequestRow
from slaq.platform.settings import Settings
from slaq.platform.tiers import TierTable
from slaq.tasks.app import create_app
from slaq.tasks.tickets import send_prefill_ticket

TIERS = TierTable()


@pytest.mark.parametrize("option", ["--num-blocks", "--max-num-seqs", "--concurrency"])
def test_counts_below_one_are_usage_errors(option: str) -> None:
    result = CliRunner().invoke(slaq_main, ["worker", "--role", "both", option, "0"])
    assert result.exit_code == 2
    assert option in result.output and "x>=1" in result.output


def test_combinations_the_options_cannot_check_are_usage_errors() -> None:
    result = CliRunner().invoke(slaq_main, ["worker", "--role", "prefill", "--engine", "sim",
                                            "--transport", "nixl"])
    assert result.exit_code == 2 and "sim engine" in result.output
    result = CliRunner().invoke(slaq_main, ["worker", "--role", "both", "--loglevel", "loud"])
    assert result.exit_code == 2 and "--loglevel" in result.output


def test_python_m_worker_is_the_same_command() -> None:
    with pytest.raises(SystemExit) as exc:
        worker_main(["--role", "both", "--max-num-seqs", "0"])
    assert exc.value.code == 2


def test_the_pool_has_one_thread_per_engine_seat() -> None:
    assert WorkerOptions(role="both", max_num_seqs=8).pool_size == 8
    assert WorkerOptions(role="both").pool_size == SchedulerConfig().max_num_seqs
    assert WorkerOptions(role="both", max_num_seqs=8, concurrency=3).pool_size == 3
    for bad in ({"max_num_seqs": 0}, {"concurrency": 0}, {"loglevel": "loud"}):
        with pytest.raises(ValueError):
            WorkerOptions(role="both", **bad)


# -- a real worker: tickets beyond its seats stay in the broker ---------------------------------
SEATS = 2
NUM_REQUESTS = 5


def broker_depth(r: redis.Redis, queue: str) -> int:
    # kombu keeps one list per priority step: "<queue>" and "<queue>\x06\x16<step>".
    return sum(int(r.llen(k)) for k in r.scan_iter(match=f"{queue}*"))


def wait_for(condition, timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture()
def slow_worker(module_database_url: str, private_redis_url: str, tiny_model_path: Path,
                tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "SLAQ_DATABASE_URL": module_database_url,
           "SLAQ_REDIS_URL": private_redis_url, "SLAQ_MODEL": str(tiny_model_path),
           "SLAQ_DATA_DIR": str(tmp_path), "SLAQ_HEARTBEAT_INTERVAL_S": "0.2",
           # One modelled step (10 ms) takes a second: requests outlast the test.
           "SLAQ_SIM_SPEED": "0.01", "PYTHONUNBUFFERED": "1"}
    env.pop("SLAQ_BROKER_URL", None)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slaq.cli", "worker", "--role", "both", "--engine", "sim",
             "--name", name, "--num-blocks", "64", "--max-num-seqs", str(SEATS)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield name, proc, log
    finally:
        if proc.poll() is None:
            # Cold shutdown: a warm one would wait for the slow requests to finish.
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_a_worker_holds_no_more_tickets_than_its_seats(slow_worker, module_database_url,
                                                       private_redis_url) -> None:
    name, proc, log = slow_worker
    r = redis.Redis.from_url(private_redis_url)
    sessions = session_factory(module_database_url)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{log.read_text()}")
        return bool(r.exists(heartbeat_key(name))) and " ready." in log.read_text()

    wait_for(ready, 120, "the worker to start")
    app = create_app(Settings(redis_url=private_redis_url))
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    ids = []
    with sessions() as s:
        for i in range(NUM_REQUESTS):
            ids.append(ledger.create_request(
                s, kind="completion", model="tiny-random", tier_used="default",
                ttft_target_ms=TIERS["default"].ttft_ms, tpot_target_ms=TIERS["default"].tpot_ms,
                prompt_token_ids=[1, 2, 3 + i], params=params.to_dict()).id)
    for rid in ids:
        send_prefill_ticket(rid, 1, "default", app=app, tiers=TIERS)

    def num_claimed() -> int:
        with sessions() as s:
            return int(s.scalar(select(func.count()).where(
                RequestRow.id.in_(ids), RequestRow.state != "queued")) or 0)

    try:
        wait_for(lambda: num_claimed() >= SEATS, 60, f"{SEATS} requests to start")
        # Both seats run for ~100 s; a worker that took more tickets would do so right away
        # (it polls the broker continuously), so a few seconds of nothing more is the answer.
        for _ in range(20):
            assert num_claimed() == SEATS
            assert broker_depth(r, "prefill.default") == NUM_REQUESTS - SEATS
            time.sleep(0.1)
    except BaseException:
        print(log.read_text()[-6000:])
        raise
    finally:
        r.close()
