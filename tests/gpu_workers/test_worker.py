"""The worker binding: engine loop, KV hand-off, heartbeats, routing, and real processes.

The first part runs in-process on the tiny model (engine loops, the lease protocol over the
shm transport, heartbeats and the router on real Redis). The ``slow`` part starts real worker
processes (``python -m slaq.gpu_workers.worker``), inserts requests with the ledger functions,
sends tickets, and checks what the ledger, the token streams and the heartbeats say; requests
are compared with an in-process greedy run of the same model.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig, SamplingParams
from slaq.gpu_workers.engine.testing import prefill_elsewhere
from slaq.gpu_workers.engine_loop import EngineLoop, EngineLoopError, drain, iter_ids
from slaq.gpu_workers.heartbeat import HeartbeatThread
from slaq.gpu_workers.kv_transfer.lease import Lease, LeaseStore
from slaq.gpu_workers.kv_transfer.shm import ShmTransport
from slaq.gpu_workers.router import DecodeRouter, read_heartbeats
from slaq.gpu_workers.worker import WorkerOptions, remove_stale_pools
from slaq.gpu_workers.worker import main as worker_main
from slaq.platform import ledger, streams
from slaq.platform.db import session_factory
from slaq.platform.keys import heartbeat_key, lease_key
from slaq.platform.models import RequestRow
from slaq.platform.pressure import Heartbeat
from slaq.platform.settings import Settings
from slaq.platform.tiers import TierTable
from slaq.tasks.app import create_app
from slaq.tasks.tickets import send_decode_ticket, send_prefill_ticket

NUM_BLOCKS = 96
STARTUP_TIMEOUT_S = 120.0
WAIT_S = 120.0
TIERS = TierTable()
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


# -- in-process: the engine loop and the lease protocol -------------------------------------
@pytest.fixture()
def loops(make_engine) -> Iterator[Callable[..., EngineLoop]]:
    made: list[EngineLoop] = []

    def make(engine=None, **kw) -> EngineLoop:
        loop = EngineLoop(engine or make_engine(), **kw)
        loop.start()
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.stop()


def test_concurrent_submissions_share_steps_and_match_generate(loops, make_engine,
                                                             tiny_prompts):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in make_engine().generate(tiny_prompts, params)]
    loop = loops()
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        handle = loop.add_request(f"r{i}", tiny_prompts[i], params)
        results[i] = iter_ids(drain(handle, 60))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tiny_prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(tiny_prompts))] == expected
    _, stats = loop.stats()
    assert stats.max_batch_size > 1 and stats.num_finished == len(tiny_prompts)
    assert stats.ttft_ms is not None and stats.tpot_ms is not None
    # An id still in the engine cannot be added twice; a finished one can be reused.
    dup = loop.add_request("r0", tiny_prompts[0], params)
    with pytest.raises(ValueError):
        loop.add_request("r0", tiny_prompts[0], params)
    assert iter_ids(drain(dup, 60)) == expected[0]


def test_shm_handoff_follows_the_lease_protocol(loops, make_engine, tiny_prompts, redis_url):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = tiny_prompts[2]
    expected = make_engine().generate([prompt], params)[0].token_ids
    shm_name = f"slaq-test-pool-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    owner = make_engine(kv_shm_name=shm_name)
    leases = LeaseStore(redis.Redis.from_url(redis_url), ttl_s=30)
    prefill = loops(owner, lease_alive=leases.alive, lease_check_interval_s=0.02)
    decode = loops()
    rid = f"handoff-{uuid.uuid4().hex[:8]}"
    first = drain(prefill.add_request(rid, prompt, params, prefill_only=True), 60)[-1]
    assert first.finished and len(first.new_token_ids) == 1
    block_ids = prefill.call(lambda e: e.leased_blocks(rid))
    assert block_ids
    owner_side = ShmTransport(shm_name, owner.kv_shape, owner.kv_dtype)
    leases.write(Lease(rid, 1, "pre", "shm", block_ids, len(prompt), first.new_token_ids[0],
                       leases.new_expiry(), owner_side.describe()))
    prefill.hold_lease(rid, (rid, 1))
    kv = ShmTransport().pull(leases.read(rid))
    # Until the lease is deleted, the owner keeps the blocks.
    time.sleep(0.1)
    assert prefill.call(lambda e: e.leased_blocks(rid)) == block_ids
    assert leases.release(rid)
    wait_for(lambda: prefill.call(lambda e: e.stats().num_blocks_used) == 0, 10, "blocks freed")
    rest = drain(decode.add_prefilled_request(rid, prompt, first.new_token_ids[0], params, kv),
                 60)
    assert first.new_token_ids + iter_ids(rest) == expected
    assert rest[-1].finish_reason == "length"


def test_prefilled_request_waits_for_room(loops, make_engine, tiny_prompts):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = tiny_prompts[2]
    first, kv = prefill_elsewhere(make_engine(), prompt, params)
    expected = make_engine().generate([prompt], params)[0].token_ids
    # A decode engine with one seat: the handed-off request waits for the running one.
    decode = loops(make_engine(max_num_seqs=1))
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    busy = decode.add_request("busy", tiny_prompts[0], long)
    next(busy.outputs(60))  # "busy" holds the only seat now
    waiting = decode.add_prefilled_request("moved", prompt, first.new_token_ids[0], params, kv)
    assert decode.stats()[1].num_reserved_blocks == kv.shape[2]
    assert len(list(busy.outputs(60))) == 199
    assert first.new_token_ids + iter_ids(drain(waiting, 60)) == expected
    assert decode.stats()[1].num_reserved_blocks == 0
    # One that can never fit fails instead of waiting forever.
    tiny = loops(make_engine(num_blocks=2))
    with pytest.raises(EngineLoopError):
        drain(tiny.add_prefilled_request("huge", prompt, first.new_token_ids[0], params, kv), 30)


def test_waiting_hand_offs_are_admitted_by_tier_then_arrival(loops, make_engine, tiny_prompts):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = tiny_prompts[2]
    first, kv = prefill_elsewhere(make_engine(), prompt, params)
    first_token = first.new_token_ids[0]
    decode = loops(make_engine(max_num_seqs=1))
    busy = decode.add_request("busy", tiny_prompts[0], SamplingParams(
        max_tokens=60, temperature=0.0, ignore_eos=True))
    next(busy.outputs(60))  # "busy" holds the only seat
    # Arrival order: batch, flex, priority, batch. Admission order: priority, flex, batch, batch.
    handles = {rid: decode.add_prefilled_request(rid, prompt, first_token, params, kv, rank=rank)
               for rid, rank in (("b1", 3), ("f", 2), ("p", 0), ("b2", 3))}
    finished_at = {}
    for rid, handle in handles.items():
        drain(handle, 60)
        finished_at[rid] = handle.first_output_at
    assert sorted(finished_at, key=finished_at.__getitem__) == ["p", "f", "b1", "b2"]
    drain(busy, 60)


def test_engine_failure_fails_waiters_and_is_reported(loops, make_engine, tiny_prompts):
    engine = make_engine()
    failures: list[BaseException] = []
    loop = loops(engine, on_failure=failures.append)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    handle = loop.add_request("doomed", tiny_prompts[0], params)
    next(handle.outputs(30))

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step  # the next step fails, as a dying GPU would
    with pytest.raises(EngineLoopError, match="device lost"):
        drain(handle, 30)
    wait_for(lambda: not loop.alive, 10, "the loop to stop")
    assert [str(e) for e in failures] == ["device lost"]
    with pytest.raises(EngineLoopError):
        loop.add_request("late", tiny_prompts[0], params)


def test_heartbeats_feed_the_router(redis_url):
    client = redis.Redis.from_url(redis_url)
    used = {"dec-x": 10, "dec-y": 2}

    def builder(name: str, role: str = "decode") -> Callable[[], Heartbeat]:
        return lambda: Heartbeat(worker=name, role=role, num_blocks_total=16,
                                 num_blocks_used=used.get(name, 0), time=time.time())

    threads = [HeartbeatThread(client, builder(n), interval_s=0.05, ttl_s=1.0)
               for n in ("dec-x", "dec-y")]
    threads.append(HeartbeatThread(client, builder("pre-x", "prefill"), interval_s=0.05,
                                   ttl_s=1.0))
    for t in threads:
        t.start()
    try:
        router = DecodeRouter(client, max_age_s=1.0)
        names = {hb.worker for hb in read_heartbeats(client)}
        assert {"dec-x", "dec-y", "pre-x"} <= names
        assert router.pick() == "dec-y"
        used["dec-y"] = 15  # the next beats report dec-y nearly full
        wait_for(lambda: router.pick() == "dec-x", 5, "routing to follow pressure")
        assert client.pttl(heartbeat_key("dec-x")) <= 1000
    finally:
        for t in threads:
            t.stop()
    # A clean stop removes the heartbeat at once; then nothing is left to route to.
    assert not client.exists(heartbeat_key("dec-x"))
    assert DecodeRouter(client, max_age_s=1.0).pick() is None
    with pytest.raises(ValueError):
        HeartbeatThread(client, builder("z"), interval_s=1.0, ttl_s=1.0)


# -- helpers ------------------------------------------------------------------------------
def wait_for(condition: Callable[[], object], timeout_s: float, what: str,
             interval_s: float = 0.05) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class WorkerProc:
    name: str
    role: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Cluster:
    """Worker processes plus the clients a test needs."""

    def __init__(self, tmp: Path, database_url: str, redis_url: str, model: Path,
                 env: dict[str, str]) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.sessions = session_factory(database_url)
        self.r = redis.Redis.from_url(redis_url)
        self.app = create_app(Settings(redis_url=redis_url))
        self.env = {**os.environ, "SLAQ_DATABASE_URL": database_url,
                    "SLAQ_REDIS_URL": redis_url, "SLAQ_MODEL": str(model),
                    "SLAQ_HEARTBEAT_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1", **env}
        self.env.pop("SLAQ_BROKER_URL", None)
        self.workers: list[WorkerProc] = []

    def start(self, role: str, name: str, concurrency: int = 32) -> WorkerProc:
        log_path = self.tmp / f"{name}-{len(self.workers)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "slaq.gpu_workers.worker", "--role", role, "--name",
                 name, "--num-blocks", str(NUM_BLOCKS), "--concurrency", str(concurrency)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        worker = WorkerProc(name, role, proc, log_path)
        self.workers.append(worker)
        return worker

    def wait_ready(self, *workers: WorkerProc) -> None:
        for w in workers:
            def ready(w: WorkerProc = w) -> bool:
                if w.proc.poll() is not None:
                    raise AssertionError(f"{w.name} exited {w.proc.returncode}:\n{w.log()}")
                # The Celery consumer is up once the worker logs "ready".
                return self.r.exists(heartbeat_key(w.name)) and " ready." in w.log()
            wait_for(ready, STARTUP_TIMEOUT_S, f"{w.name} to start", 0.2)

    def heartbeat(self, name: str) -> Heartbeat:
        return Heartbeat.from_mapping(self.r.hgetall(heartbeat_key(name)))

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()

    def add_request(self, prompt_ids: list[int], params: SamplingParams = GREEDY,
                    tier: str = "default") -> str:
        t = TIERS[tier]
        with self.sessions() as s:
            row = ledger.create_request(
                s, kind="completion", model="tiny-random", tier_used=tier,
                ttft_target_ms=t.ttft_ms, tpot_target_ms=t.tpot_ms,
                prompt_token_ids=prompt_ids, params=params.to_dict())
            return row.id

    def prefill_ticket(self, rid: str, attempt: int = 1, tier: str = "default") -> None:
        send_prefill_ticket(rid, attempt, tier, app=self.app, tiers=TIERS)

    def row(self, rid: str) -> RequestRow:
        with self.sessions() as s:
            row = ledger.get_request(s, rid)
            assert row is not None
            s.expunge(row)
            return row

    def wait_state(self, rid: str, states: tuple[str, ...] = ("finished", "failed"),
                   timeout_s: float = WAIT_S) -> RequestRow:
        wait_for(lambda: self.row(rid).state in states, timeout_s, f"{rid} in {states}")
        row = self.row(rid)
        if row.state == "finished":
            # The ledger finishes first, then the stream's last entry goes out
            # (service._finish): read the stream once it has ended, as a client would.
            wait_for(lambda: any(d.is_final for d in self.stream(rid)), timeout_s,
                     f"the end of {rid}'s stream")
        return row

    def stream(self, rid: str) -> list[streams.TokenDelta]:
        return streams.read_tokens(self.r, rid)

    def streamed_ids(self, rid: str) -> list[int]:
        return [t for d in self.stream(rid) for t in d.token_ids]


@pytest.fixture(scope="session")
def reference(tiny_model_path: Path):
    """In-process greedy generation with the same model: what the workers must reproduce."""
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model_path),
                                    cache=CacheConfig(num_blocks=NUM_BLOCKS)))

    def run(prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, params)]

    run.tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    yield run
    engine.close()


def _prompts(reference, n: int, start: int = 0) -> list[list[int]]:
    tok = reference.tokenizer
    return [tok.encode(f"Request {i}: the quick brown fox counts to {i % 7 + 3}.")
            for i in range(start, start + n)]


def _cluster(tmp_path_factory, database_url, redis_url, tiny_model_path, env, specs):
    cluster = Cluster(tmp_path_factory.mktemp("workers"), database_url, redis_url,
                      tiny_model_path, env)
    try:
        workers = [cluster.start(role, name) for role, name in specs]
        cluster.wait_ready(*workers)
    except BaseException:
        cluster.stop_all()
        raise
    return cluster


# -- disaggregated: one prefill worker, one decode worker -----------------------------------
@pytest.fixture(scope="class")
def disagg(tmp_path_factory, database_url, redis_url, tiny_model_path) -> Iterator[Cluster]:
    cluster = _cluster(tmp_path_factory, database_url, redis_url, tiny_model_path,
                       {"SLAQ_HEARTBEAT_TTL_S": "3", "SLAQ_LEASE_TTL_S": "30"},
                       [("prefill", "pre-a"), ("decode", "dec-a")])
    yield cluster
    cluster.stop_all()


@pytest.mark.slow
class TestDisaggregated:
    def test_requests_match_in_process_greedy(self, disagg, reference):
        prompts = _prompts(reference, 3)
        tiers = ["priority", "default", "batch"]
        ids = [disagg.add_request(p, tier=t) for p, t in zip(prompts, tiers, strict=True)]
        for rid, tier in zip(ids, tiers, strict=True):
            disagg.prefill_ticket(rid, tier=tier)
        expected = reference(prompts)
        tok = reference.tokenizer
        for rid, want in zip(ids, expected, strict=True):
            row = disagg.wait_state(rid)
            assert row.state == "finished", row.error
            assert (row.prefill_worker, row.decode_worker) == ("pre-a", "dec-a")
            assert disagg.streamed_ids(rid) == want
            assert row.completion_tokens == len(want)
            assert row.output_text == tok.decode(want)
            assert row.finish_reason == "length" and row.ttft_ms is not None
            deltas = disagg.stream(rid)
            assert deltas[-1].finish_reason == "length"
            assert not any(d.is_final for d in deltas[:-1])
        # Every lease was pulled, so the prefill pool holds nothing any more.
        wait_for(lambda: disagg.heartbeat("pre-a").num_blocks_used == 0, 10, "prefill free")
        assert not list(disagg.r.scan_iter(match=lease_key("*")))

    def test_request_that_ends_at_its_first_token_finishes_in_prefill(self, disagg, reference):
        prompt = _prompts(reference, 1, start=40)[0]
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        rid = disagg.add_request(prompt, one)
        disagg.prefill_ticket(rid)
        row = disagg.wait_state(rid)
        assert row.state == "finished" and row.finish_reason == "length"
        assert row.prefill_worker == "pre-a" and row.decode_worker == "pre-a"
        assert disagg.streamed_ids(rid) == reference([prompt], one)[0]

    def test_duplicate_and_stale_tickets_do_nothing(self, disagg, reference):
        p_dup, p_stale = _prompts(reference, 2, start=20)
        # Three copies of the same ticket in flight at once: exactly one prefill happens.
        rid = disagg.add_request(p_dup)
        for _ in range(3):
            disagg.prefill_ticket(rid)
        row = disagg.wait_state(rid)
        assert row.state == "finished" and row.attempt == 1
        assert disagg.streamed_ids(rid) == reference([p_dup])[0]
        entries = len(disagg.stream(rid))
        # Late duplicates of both tickets for a finished request.
        disagg.prefill_ticket(rid)
        send_decode_ticket(rid, 1, "dec-a", app=disagg.app)
        # A stale ticket: the ledger moved the request on to attempt 2.
        stale = disagg.add_request(p_stale)
        with disagg.sessions() as s:
            assert ledger.retry(s, stale, 1, "test") == 2
        disagg.prefill_ticket(stale, attempt=1)
        pre, dec = disagg.workers[0], disagg.workers[1]
        wait_for(lambda: pre.log().count(f"prefill {rid}#1: dropped") == 3, WAIT_S,
                 "duplicate prefill tickets to be dropped")
        wait_for(lambda: f"decode {rid}#1: dropped" in dec.log(), WAIT_S,
                 "the late decode ticket to be dropped")
        wait_for(lambda: f"prefill {stale}#1: dropped" in pre.log(), WAIT_S,
                 "the stale ticket to be dropped")
        after = disagg.row(rid)
        assert (after.state, after.finished_at, after.output_text) == (
            "finished", row.finished_at, row.output_text)
        assert len(disagg.stream(rid)) == entries
        untouched = disagg.row(stale)
        assert (untouched.state, untouched.attempt, untouched.prefill_worker) == (
            "queued", 2, None)
        assert disagg.stream(stale) == []
        # The current attempt's ticket still works.
        disagg.prefill_ticket(stale, attempt=2)
        assert disagg.wait_state(stale).state == "finished"
        assert disagg.streamed_ids(stale) == reference([p_stale])[0]

    def test_twenty_concurrent_requests_share_decode_batches(self, disagg, reference):
        prompts = _prompts(reference, 20, start=100)
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        tiers = [("priority", "default", "flex", "batch")[i % 4] for i in range(20)]
        ids = [disagg.add_request(p, params, tier=t) for p, t in zip(prompts, tiers, strict=True)]
        for rid, tier in zip(ids, tiers, strict=True):
            disagg.prefill_ticket(rid, tier=tier)
        expected = reference(prompts, params)
        for rid, want in zip(ids, expected, strict=True):
            row = disagg.wait_state(rid)
            assert row.state == "finished", row.error
            assert row.prefill_worker != row.decode_worker
            assert disagg.streamed_ids(rid) == want
        # Heartbeats lag the ledger by up to one interval.
        wait_for(lambda: disagg.heartbeat("dec-a").num_finished >= 20, 10, "a fresh heartbeat")
        hb = disagg.heartbeat("dec-a")
        assert hb.max_batch_size > 1, hb
        assert hb.tpot_ms is not None and hb.decode_tokens_per_s > 0
        assert hb.role == "decode" and hb.queues == ["decode.dec-a", "decode.any"]


# -- aggregated: one `both` worker ---------------------------------------------------------
@pytest.fixture(scope="class")
def aggregated(tmp_path_factory, database_url, redis_url, tiny_model_path) -> Iterator[Cluster]:
    cluster = _cluster(tmp_path_factory, database_url, redis_url, tiny_model_path,
                       {"SLAQ_HEARTBEAT_TTL_S": "3"}, [("both", "both-b")])
    yield cluster
    cluster.stop_all()


@pytest.mark.slow
class TestAggregated:
    def test_both_worker_prefills_and_decodes_itself(self, aggregated, reference):
        prompts = _prompts(reference, 3, start=60)
        ids = [aggregated.add_request(p) for p in prompts]
        for rid in ids:
            aggregated.prefill_ticket(rid)
        for rid, want in zip(ids, reference(prompts), strict=True):
            row = aggregated.wait_state(rid)
            assert row.state == "finished", row.error
            assert row.prefill_worker == row.decode_worker == "both-b"
            assert aggregated.streamed_ids(rid) == want
        assert not list(aggregated.r.scan_iter(match=lease_key("*")))
        wait_for(lambda: aggregated.heartbeat("both-b").num_blocks_used == 0, 10,
                 "the pool to be free")


@pytest.mark.slow
def test_prefill_worker_drains_tier_queues_in_order(tmp_path, database_url, redis_url,
                                                    tiny_model_path):
    cluster = Cluster(tmp_path, database_url, redis_url, tiny_model_path,
                      {"SLAQ_HEARTBEAT_TTL_S": "3"})
    # Tickets queued before any worker runs; none can be claimed (no such rows), so each is
    # dropped as it is taken, and the log shows the order the broker served them.
    order = ["batch", "flex", "default", "priority"]
    for i in range(2):
        for tier in order:
            cluster.prefill_ticket(f"order-{tier}-{i}", tier=tier)
    try:
        worker = cluster.start("prefill", "pre-order", concurrency=1)
        cluster.wait_ready(worker)
        pattern = re.compile(r"prefill order-(\w+)-(\d)#1: dropped")
        wait_for(lambda: len(pattern.findall(worker.log())) == 8, WAIT_S, "8 dropped tickets")
        served = [tier for tier, _ in pattern.findall(worker.log())]
        assert served == [t for t in reversed(order) for _ in range(2)]
    finally:
        cluster.stop_all()


def test_stale_pools_of_dead_workers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"slaq-kv-w1-{dead.pid}").write_bytes(b"x")
    (tmp_path / f"slaq-kv-w1-{os.getpid()}").write_bytes(b"x")  # alive: kept
    (tmp_path / f"slaq-kv-w10-{dead.pid}").write_bytes(b"x")  # another worker: kept
    assert remove_stale_pools("slaq-kv-w1", tmp_path) == [f"slaq-kv-w1-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"slaq-kv-w1-{os.getpid()}", f"slaq-kv-w10-{dead.pid}"])


def test_worker_options_validate():
    assert WorkerOptions(role="decode", name="d1").worker_name == "d1"
    assert WorkerOptions(role="prefill").worker_name.startswith("prefill-")
    for bad in ({"role": "oracle"}, {"role": "decode", "concurrency": 0},
                {"role": "prefill", "engine_kind": "sim", "transport": "nixl"},
                {"role": "both", "num_blocks": 0}):
        with pytest.raises(ValueError):
            WorkerOptions(**bad)
    with pytest.raises(SystemExit):
        worker_main(["--role", "sideways"])


# -- a decode worker dies before it pulls ----------------------------------------------------
@pytest.fixture()
def fragile(tmp_path_factory, database_url, redis_url, tiny_model_path) -> Iterator[Cluster]:
    # Short lease; a heartbeat that outlives the killed worker long enough to be routed to.
    cluster = _cluster(tmp_path_factory, database_url, redis_url, tiny_model_path,
                       {"SLAQ_HEARTBEAT_TTL_S": "6", "SLAQ_LEASE_TTL_S": "1.5"},
                       [("prefill", "pre-c"), ("decode", "dec-c")])
    yield cluster
    cluster.stop_all()


@pytest.mark.slow
def test_lease_expires_when_decode_dies_then_request_is_reprefilled(fragile, reference):
    pre, dec = fragile.workers
    total = fragile.heartbeat("pre-c").num_blocks_total
    dec.kill()  # SIGKILL: its heartbeat lingers until the TTL, so the router still picks it
    prompt = _prompts(reference, 1, start=80)[0]
    rid = fragile.add_request(prompt)
    fragile.prefill_ticket(rid)
    wait_for(lambda: re.search(rf"prefill {rid}#1: handed_off: \d+ blocks to dec-c", pre.log()),
             WAIT_S, "the hand-off to the dead worker")
    # Nobody pulls: the lease expires and the owner frees its blocks.
    wait_for(lambda: not fragile.r.exists(lease_key(rid)), 30, "the lease to expire")

    def pool_full() -> bool:
        hb = fragile.heartbeat("pre-c")
        return hb.num_blocks_used == 0 and hb.num_blocks_leased == 0 and hb.pressure == 0.0
    wait_for(pool_full, 30, "the prefill pool to be back to full")
    assert fragile.heartbeat("pre-c").num_blocks_free == total
    assert fragile.row(rid).state == "prefilling"
    # A decode worker of the same name comes back, finds no lease, and has it re-prefilled.
    fragile.wait_ready(fragile.start("decode", "dec-c"))
    row = fragile.wait_state(rid)
    assert row.state == "finished", row.error
    assert row.attempt == 2 and row.error == "kv lease lost"
    assert (row.prefill_worker, row.decode_worker) == ("pre-c", "dec-c")
    assert fragile.streamed_ids(rid) == reference([prompt])[0]
