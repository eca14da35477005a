"""The decode flow of a WorkerService when a hand-off cannot complete: nothing is left behind
in the engine, and a hand-off that no room there would ever take is prefilled again (found
in review). Real PostgreSQL ledger, Redis leases and streams, shm transport, tiny model."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from slaq.gpu_workers import service as service_mod
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.testing import prefill_elsewhere
from slaq.gpu_workers.engine_loop import EngineLoop, EngineLoopError, drain, iter_ids
from slaq.gpu_workers.kv_transfer.lease import LeaseStore
from slaq.gpu_workers.kv_transfer.shm import ShmTransport
from slaq.gpu_workers.router import DecodeRouter
from slaq.gpu_workers.service import SqlLedger, WorkerService, engine_request_id
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.tiers import TierTable

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
SHORT_BUSY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)


@dataclass
class Pair:
    pre: WorkerService
    dec: WorkerService
    dec_loop: EngineLoop
    new_request: Callable[..., str]
    state: Callable[[str], tuple[str, int, str | None]]
    prefills: list[tuple]


@pytest.fixture()
def make_pair(make_engine, database_url, redis_url) -> Iterator[Callable[..., Pair]]:
    """A prefill service and a decode service on one Redis and ledger; the decode engine as
    asked, its steps slowed by ``step_delay_s`` (so that a running request holds its room
    while hand-offs arrive)."""
    client = redis.Redis.from_url(redis_url)
    leases = LeaseStore(client, ttl_s=30)
    sessions = session_factory(database_url)
    loops: list[EngineLoop] = []

    def make(step_delay_s: float = 0.005, **decode_kw: object) -> Pair:
        shm_name = f"slaq-test-fail-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        pre_engine = make_engine(kv_shm_name=shm_name)
        dec_engine = make_engine(**decode_kw)
        step = dec_engine.step

        def slow_step():
            time.sleep(step_delay_s)
            return step()

        dec_engine.step = slow_step
        pre_loop = EngineLoop(pre_engine, lease_alive=leases.alive, lease_check_interval_s=0.02)
        dec_loop = EngineLoop(dec_engine)
        prefills: list[tuple] = []

        def service(name: str, role: str, loop: EngineLoop, transport) -> WorkerService:
            return WorkerService(
                name=name, role=role, loop=loop, ledger=SqlLedger(database_url, TierTable()),
                redis_client=client, leases=leases, transport=transport,
                pullers={"shm": ShmTransport()}, router=DecodeRouter(client, max_age_s=30),
                send_prefill=lambda *a: prefills.append(a),
                send_decode=lambda *a, **k: None)

        suffix = uuid.uuid4().hex[:6]
        pre = service(f"pre-f-{suffix}", "prefill", pre_loop,
                      ShmTransport(shm_name, pre_engine.kv_shape, pre_engine.kv_dtype))
        dec = service(f"dec-f-{suffix}", "decode", dec_loop, None)

        def new_request(prompt: list[int], tier: str = "default") -> str:
            with sessions() as s:
                return ledger.create_request(
                    s, kind="completion", model="tiny-random", tier_used=tier,
                    ttft_target_ms=1000, tpot_target_ms=100, prompt_token_ids=prompt,
                    params=PARAMS.to_dict()).id

        def state(rid: str) -> tuple[str, int, str | None]:
            with sessions() as s:
                row = ledger.get_request(s, rid)
                return row.state, row.attempt, row.error

        for loop in (pre_loop, dec_loop):
            loop.start()
            loops.append(loop)
        return Pair(pre, dec, dec_loop, new_request, state, prefills)

    yield make
    for loop in loops:
        loop.stop()


def test_a_hand_off_whose_decode_times_out_is_dropped_from_the_engine(make_pair, tiny_prompts,
                                                                       monkeypatch):
    """The decode task gives up while its hand-off still waits for a seat: the request is
    failed in the ledger and taken out of the engine, so it neither holds its place nor runs
    later for nobody."""
    p = make_pair(max_num_seqs=1, max_model_len=1024)
    pre, dec, dec_loop, new_request, state = p.pre, p.dec, p.dec_loop, p.new_request, p.state
    busy = dec_loop.add_request("busy", tiny_prompts[0], LONG, rank=0)  # the only seat
    rid = new_request(tiny_prompts[2])
    assert pre.prefill(rid, 1).action == "handed_off"
    monkeypatch.setattr(service_mod, "OUTPUT_TIMEOUT_S", 1.0)
    with pytest.raises(EngineLoopError, match="no output"):
        dec.decode(rid, 1)
    assert state(rid)[0] == "failed"
    eid = engine_request_id(rid, 1)
    assert dec_loop.call(lambda e: e.scheduler.get(eid)) is None
    assert dec_loop.call(lambda e: e.pinned_requests()) == set()
    assert dec_loop.stats()[1].num_reserved_blocks == 0
    drain(busy, 60)  # the seat frees: the abandoned hand-off does not take it
    assert dec_loop.call(lambda e: e.scheduler.get(eid)) is None
    assert dec_loop.call(lambda e: e.has_unfinished()) is False


def test_a_hand_off_no_room_would_ever_take_is_prefilled_again(make_pair, make_engine):
    """Nothing runs and the decode worker's two waiting hand-offs each lack blocks pinned for
    the other: the engine loop sends the head back (HandoffRetry), and the decode flow turns
    that into a new attempt on the prefill queue, not a failure; the other one then runs."""
    from slaq.gpu_workers.engine.loader import load_tokenizer

    tok = load_tokenizer(make_engine().config.model)
    prompt_h = tok.encode("The capital of France is Paris. Hello, world! " * 30)[:119]
    prompt_q = tok.encode("Le café est très bon à Paris. " * 30)[:111]
    # Blocks of 4: H takes 30 (20 cached here), Q 28 (15 cached here), 9 left over.
    p = make_pair(step_delay_s=0.1, num_blocks=44)  # busy runs 1.6 s
    loop = p.dec_loop
    rid = p.new_request(prompt_h, tier="priority")  # ahead of Q in the hand-off queue
    assert p.pre.prefill(rid, 1).action == "handed_off"
    out_q, kv_q = prefill_elsewhere(make_engine(), prompt_q, SHORT)
    drain(loop.add_request("warm-h", prompt_h[:80], ONE), 30)
    drain(loop.add_request("warm-q", prompt_q[:60], ONE), 30)
    busy = loop.add_request("busy", prompt_h[:10], SHORT_BUSY, rank=0)  # 5 fresh blocks
    # Cached blocks count as free until pinned: hold H's until its own hand-off pins them.
    assert loop.reserve_prefix("guard", prompt_h) == 20
    assert loop.reserve_prefix("Q", prompt_q) == 15
    handle_q = loop.add_prefilled_request("Q", prompt_q, out_q.new_token_ids[0], SHORT,
                                          kv_q[:, :, 15:], rank=2)  # waits: busy runs
    outcome: list = []
    decode = threading.Thread(target=lambda: outcome.append(p.dec.decode(rid, 1)))
    decode.start()  # pins H's 20, pulls the rest, waits ahead of Q
    deadline = time.monotonic() + 30
    while loop.call(lambda e: len(e.pinned_requests())) < 3:
        assert time.monotonic() < deadline, "the decode flow never pinned H's blocks"
        time.sleep(0.005)
    while loop.stats()[1].num_reserved_blocks <= kv_q.shape[2] - 15:
        assert time.monotonic() < deadline, "H never queued"
        time.sleep(0.005)
    loop.release_prefix("guard")
    assert loop.call(lambda e: e.scheduler.num_running) == 1  # busy still runs
    decode.join(30)
    assert outcome and outcome[0].action == "retried", outcome  # busy ended; neither fits
    assert p.state(rid) == ("queued", 2, "no room on the decode worker")
    assert p.prefills[-1][:2] == (rid, 2)
    got_q = out_q.new_token_ids + iter_ids(drain(handle_q, 30))  # H's pins went back
    assert got_q == make_engine().generate([prompt_q], SHORT)[0].token_ids
    drain(busy, 30)
    assert loop.call(lambda e: e.pinned_requests()) == set()


def test_a_pull_that_fails_in_any_way_releases_the_lease_and_prefills_again(make_pair,
                                                                             tiny_prompts):
    """Found in review: only a TransferError was taken as a failed pull; any other error from
    the copy failed the request and left the prefill worker's blocks leased until the lease
    expired. Now the lease goes back at once and the request gets a new attempt."""
    p = make_pair()
    rid = p.new_request(tiny_prompts[2])
    assert p.pre.prefill(rid, 1).action == "handed_off"
    assert p.pre.loop.call(lambda e: e.scheduler.num_leased) == 1

    class Broken:
        def pull(self, lease):
            raise RuntimeError("device copy failed")

    p.dec.pullers["shm"] = Broken()
    outcome = p.dec.decode(rid, 1)
    assert outcome.action == "retried", outcome
    assert p.state(rid) == ("queued", 2, "kv lease lost")
    assert p.prefills[-1][:2] == (rid, 2)
    assert p.dec.leases.read(rid) is None
    deadline = time.monotonic() + 10
    while p.pre.loop.call(lambda e: e.scheduler.num_leased):  # the owner frees its blocks
        assert time.monotonic() < deadline, "the prefill worker kept the leased blocks"
        time.sleep(0.02)
    assert p.dec_loop.call(lambda e: e.pinned_requests()) == set()


def test_a_decode_its_client_cancelled_says_so_and_leaves_the_engine(make_pair, tiny_prompts,
                                                                     redis_url, monkeypatch):
    """Found in review: the decode flow reported "finished" for a request it had stopped
    because its client went away."""
    from slaq.platform.keys import cancel_key

    p = make_pair(step_delay_s=0.02)
    rid = p.new_request(tiny_prompts[2])
    assert p.pre.prefill(rid, 1).action == "handed_off"
    monkeypatch.setattr(service_mod, "CANCEL_CHECK_INTERVAL_S", 0.0)
    client = redis.Redis.from_url(redis_url)
    client.set(cancel_key(rid), 1, ex=60)
    try:
        outcome = p.dec.decode(rid, 1)
    finally:
        client.delete(cancel_key(rid))
    assert outcome.action == "cancelled", outcome
    eid = engine_request_id(rid, 1)
    assert p.dec_loop.call(lambda e: e.scheduler.get(eid)) is None
    assert p.dec_loop.call(lambda e: e.has_unfinished()) is False
