"""How long after a Redis restart does a Celery worker (slaq's config) consume a new task?

Starts a throwaway ``redis-server`` (persistence off) on ``--port`` (default 6390; never the
shared 6379), a worker process with slaq's Celery config and the worker's pool options
(threads, no gossip/mingle) consuming one ``probe`` queue, then ``--rounds`` times: restarts
Redis, sends a probe task as soon as Redis answers PING again, and times until the worker ran
it. ``SLAQ_PROBE_CONF`` (JSON) is merged into the Celery config of both sides, to compare
settings without editing slaq::

    .venv/bin/python scripts/redis_restart_probe.py --rounds 10
    SLAQ_PROBE_CONF='{"broker_transport_options": {"health_check_interval": 1}}' \\
        .venv/bin/python scripts/redis_restart_probe.py

Prints one JSON line: per-round seconds (``consume_s``: send to run; ``send_s``: how long the
send itself took; ``down_s``: the restart), and their median and max.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

QUEUE = "probe"
TASK = "slaq.probe"


def make_app(url: str) -> Any:
    from slaq.platform.settings import Settings
    from slaq.tasks.app import create_app

    app = create_app(Settings(redis_url=url), extra_queues=(QUEUE,))
    extra = json.loads(os.environ.get("SLAQ_PROBE_CONF") or "{}")
    opts = {**app.conf.broker_transport_options, **extra.pop("broker_transport_options", {})}
    app.conf.update(broker_transport_options=opts, **extra)
    return app


def run_worker(url: str) -> None:
    """The worker side: record when each probe ran, in Redis (``probe:<id>``)."""
    app = make_app(url)
    client = redis.Redis.from_url(url)

    @app.task(name=TASK)
    def probe(probe_id: str) -> None:
        client.set(f"probe:{probe_id}", repr(time.time()), ex=600)

    worker = app.Worker(hostname=f"probe@{socket.gethostname()}", pool_cls="threads",
                        concurrency=4, queues=[QUEUE], loglevel="INFO", without_gossip=True,
                        without_mingle=True, optimization="fair")
    worker.start()


def start_redis(port: int, work_dir: Path) -> None:
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(work_dir), "--daemonize", "yes",
                    "--pidfile", str(work_dir / "redis.pid")], check=True,
                   stdout=subprocess.DEVNULL)


def wait_ping(url: str, timeout_s: float = 20.0) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.01)
    raise RuntimeError("redis did not come back")


def stop_redis(port: int) -> None:
    # SHUTDOWN NOSAVE on our own server only (the port is ours; see --port).
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def wait_probe(client: redis.Redis, probe_id: str, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            raw = client.get(f"probe:{probe_id}")
        except redis.RedisError:
            raw = None
        if raw is not None:
            return float(raw)
        time.sleep(0.005)
    return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=6390)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=40.0)
    p.add_argument("--down-s", type=float, default=0.0,
                   help="keep Redis down this long in each restart (default: restart at once)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default=os.environ.get("SLAQ_PROBE_CONF") or "slaq config")
    args = p.parse_args()
    if args.port == 6379:
        p.error("6379 is the shared Redis: use a port of your own")
    url = f"redis://127.0.0.1:{args.port}/0"
    if args.worker:
        run_worker(url)
        return 0
    work = Path(tempfile.mkdtemp(prefix="redis-probe-"))
    start_redis(args.port, work)
    wait_ping(url)
    log = open(work / "worker.log", "wb")  # noqa: SIM115 (kept open for the child)
    worker = subprocess.Popen([sys.executable, __file__, "--worker", "--port", str(args.port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = make_app(url)
    client = redis.Redis.from_url(url)
    rounds: list[dict[str, float | None]] = []
    try:
        app.send_task(TASK, args=["warmup"], queue=QUEUE)
        if wait_probe(client, "warmup", 60.0) is None:
            raise RuntimeError("the worker never ran the warm-up probe; see " + str(work))
        for i in range(args.rounds):
            time.sleep(1.0)  # the worker sits in BRPOP, as an idle one does
            t_down = time.time()
            stop_redis(args.port)
            time.sleep(args.down_s)
            start_redis(args.port, work)
            wait_ping(url)
            t0 = time.time()
            app.send_task(TASK, args=[f"r{i}"], queue=QUEUE)
            t_sent = time.time()
            ran = wait_probe(client, f"r{i}", args.timeout_s)
            rounds.append({"down_s": round(t0 - t_down, 3), "send_s": round(t_sent - t0, 3),
                           "consume_s": None if ran is None else round(ran - t0, 3)})
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        stop_redis(args.port)
    done = [r["consume_s"] for r in rounds if r["consume_s"] is not None]
    print(json.dumps({"label": args.label, "rounds": rounds, "lost": len(rounds) - len(done),
                      "consume_median_s": statistics.median(done) if done else None,
                      "consume_max_s": max(done) if done else None,
                      "worker_log": str(work / "worker.log")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
