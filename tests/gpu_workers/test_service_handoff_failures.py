"""The decode flow of a WorkerService when a hand-off cannot complete: nothing is left behind
in the engine (found in review). Real PostgreSQL ledger, Redis leases and streams, shm
transport, tiny model."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from slaq.gpu_workers import service as service_mod
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine_loop import EngineLoop, EngineLoopError, drain
from slaq.gpu_workers.kv_transfer.lease import LeaseStore
from slaq.gpu_workers.kv_transfer.shm import ShmTransport
from slaq.gpu_workers.router import DecodeRouter
from slaq.gpu_workers.service import SqlLedger, WorkerService, engine_request_id
from slaq.platform import ledger
from slaq.platform.db import session_factory
from slaq.platform.tiers import TierTable

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def pair(make_engine, database_url, redis_url):
    """A prefill service and a decode service with one seat, on one Redis and ledger."""
    client = redis.Redis.from_url(redis_url)
    leases = LeaseStore(client, ttl_s=30)
    shm_name = f"slaq-test-fail-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pre_engine = make_engine(kv_shm_name=shm_name)
    dec_engine = make_engine(max_num_seqs=1, max_model_len=1024)
    step = dec_engine.step

    def slow_step():  # the busy request holds the only seat for seconds
        import time

        time.sleep(0.005)
        return step()

    dec_engine.step = slow_step
    pre_loop = EngineLoop(pre_engine, lease_alive=leases.alive, lease_check_interval_s=0.02)
    dec_loop = EngineLoop(dec_engine)

    def make(name: str, role: str, loop: EngineLoop, transport) -> WorkerService:
        return WorkerService(
            name=name, role=role, loop=loop, ledger=SqlLedger(database_url, TierTable()),
            redis_client=client, leases=leases, transport=transport,
            pullers={"shm": ShmTransport()}, router=DecodeRouter(client, max_age_s=30),
            send_prefill=lambda *a: None,
            send_decode=lambda *a, **k: None)

    suffix = uuid.uuid4().hex[:6]
    pre = make(f"pre-f-{suffix}", "prefill", pre_loop,
               ShmTransport(shm_name, pre_engine.kv_shape, pre_engine.kv_dtype))
    dec = make(f"dec-f-{suffix}", "decode", dec_loop, None)
    sessions = session_factory(database_url)

    def new_request(prompt: list[int]) -> str:
        with sessions() as s:
            return ledger.create_request(
                s, kind="completion", model="tiny-random", tier_used="default",
                ttft_target_ms=1000, tpot_target_ms=100, prompt_token_ids=prompt,
                params=PARAMS.to_dict()).id

    def state(rid: str) -> tuple[str, int, str | None]:
        with sessions() as s:
            row = ledger.get_request(s, rid)
            return row.state, row.attempt, row.error

    pre_loop.start()
    dec_loop.start()
    try:
        yield pre, dec, dec_loop, new_request, state
    finally:
        pre_loop.stop()
        dec_loop.stop()


def test_a_hand_off_whose_decode_times_out_is_dropped_from_the_engine(pair, tiny_prompts,
                                                                       monkeypatch):
    """The decode task gives up while its hand-off still waits for a seat: the request is
    failed in the ledger and taken out of the engine, so it neither holds its place nor runs
    later for nobody."""
    pre, dec, dec_loop, new_request, state = pair
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
