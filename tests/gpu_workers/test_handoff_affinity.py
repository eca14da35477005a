"""A multi-turn chat through the real prefill and decode flows (WorkerService) in one process,
on real Redis and PostgreSQL, with the shm transport: the second turn is routed to the decode
worker that holds the first turn by prefix affinity, which pulls only the blocks it lacks."""

from __future__ import annotations

import os
import re
import uuid

import redis

from slaq.gpu_workers.engine.block_manager import block_hashes
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.testing import prefill_elsewhere
from slaq.gpu_workers.engine_loop import EngineLoop
from slaq.gpu_workers.heartbeat import cache_fields, publish
from slaq.gpu_workers.kv_transfer.lease import LeaseStore
from slaq.gpu_workers.kv_transfer.shm import ShmTransport
from slaq.gpu_workers.router import DecodeRouter
from slaq.gpu_workers.service import SqlLedger, WorkerService
from slaq.platform import ledger, streams
from slaq.platform.db import session_factory
from slaq.platform.pressure import Heartbeat
from slaq.platform.tiers import TierTable

TIERS = TierTable()
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_second_turn_goes_to_the_worker_that_holds_the_first(make_engine, tiny_prompts,
                                                             database_url, redis_url):
    client = redis.Redis.from_url(redis_url)
    leases = LeaseStore(client, ttl_s=30)
    sessions = session_factory(database_url)
    shm_name = f"slaq-test-affinity-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pre_engine, dec_engine = make_engine(kv_shm_name=shm_name), make_engine()
    pre_loop = EngineLoop(pre_engine, lease_alive=leases.alive, lease_check_interval_s=0.02)
    dec_loop = EngineLoop(dec_engine)
    suffix = uuid.uuid4().hex[:6]
    dec, idle = f"dec-aff-{suffix}", f"dec-idle-{suffix}"
    sent: list[tuple[str, int, str | None]] = []

    def service(name: str, role: str, loop: EngineLoop, transport) -> WorkerService:
        return WorkerService(
            name=name, role=role, loop=loop, ledger=SqlLedger(database_url, TIERS),
            redis_client=client, leases=leases, transport=transport,
            pullers={"shm": ShmTransport()}, router=DecodeRouter(client, max_age_s=30),
            send_prefill=lambda *a: None,
            send_decode=lambda rid, attempt, worker, priority=None: sent.append(
                (rid, attempt, worker)))

    prefill = service(f"pre-aff-{suffix}", "prefill", pre_loop,
                      ShmTransport(shm_name, pre_engine.kv_shape, pre_engine.kv_dtype))
    decode = service(dec, "decode", dec_loop, None)

    def beat() -> None:
        # Both decode workers look alike by pressure; the idle one has more room, so it wins
        # unless a prefix is cached elsewhere.
        es = dec_loop.call(lambda e: e.stats())  # fresh (the loop's snapshot lags ~0.1 s)
        publish(client, Heartbeat(worker=dec, role="decode", num_blocks_total=es.num_blocks_total,
                                  num_blocks_used=es.num_blocks_used, time=_now(),
                                  **cache_fields("decode", es)), ttl_s=30)
        publish(client, Heartbeat(worker=idle, role="decode", num_blocks_total=10_000,
                                  time=_now()), ttl_s=30)

    pre_loop.start()
    dec_loop.start()
    try:
        prompt = tiny_prompts[2]
        reuse = []
        for turn in range(2):
            beat()
            with sessions() as s:
                rid = ledger.create_request(
                    s, kind="completion", model="tiny-random", tier_used="default",
                    ttft_target_ms=1000, tpot_target_ms=100, prompt_token_ids=prompt,
                    params=PARAMS.to_dict()).id
            handed = prefill.prefill(rid, 1)
            assert handed.action == "handed_off", handed
            target = sent[-1][2]
            assert target == (idle if turn == 0 else dec)
            outcome = decode.decode(rid, 1)  # run here whatever the target: it is the test
            assert outcome.action == "finished", outcome
            match = re.search(r"(\d+) of (\d+) KV blocks cached here", outcome.detail)
            assert match, outcome.detail
            reuse.append((int(match[1]), int(match[2])))
            tokens = [t for d in streams.read_tokens(client, rid) for t in d.token_ids]
            assert tokens == make_engine().generate([prompt], PARAMS)[0].token_ids
            with sessions() as s:
                assert ledger.get_request(s, rid).state == "finished"
            dec_loop.call(lambda e: e.scheduler.check_integrity())
            prompt = prompt + tokens + tiny_prompts[0]
        assert reuse[0][0] == 0
        assert 0 < reuse[1][0] < reuse[1][1]
        es = dec_loop.call(lambda e: e.stats())
        assert (es.handoff_blocks_reused, es.handoff_blocks_total) == (
            reuse[1][0], reuse[0][1] + reuse[1][1])
        # Without the prompt's hashes the router would have taken the idle worker.
        assert DecodeRouter(client, max_age_s=30).pick() == idle
        assert DecodeRouter(client, max_age_s=30).pick(
            prefix_hashes=block_hashes(prompt, 4), num_blocks=4) == dec
    finally:
        pre_loop.stop()
        dec_loop.stop()
        client.delete(*(f"hb:{n}" for n in (dec, idle)))


def _now() -> float:
    import time

    return time.time()


def test_pins_of_a_hand_off_in_flight_do_not_fail_one_that_waits(make_engine, tiny_prompts):
    """A hand-off that only lacks blocks pinned for another one waits for it (nothing runs);
    the other, queued behind it, goes first, and both finish with greedy tokens."""
    from slaq.gpu_workers.engine.loader import load_tokenizer
    from slaq.gpu_workers.engine_loop import drain, iter_ids

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt_b = tiny_prompts[2]  # 35 tokens: 8 full blocks of 4
    tok = load_tokenizer(make_engine().config.model)
    prompt_a = tok.encode("Le café est très bon à Paris. " * 5)
    n_a = -(-(len(prompt_a) + 1) // 4)
    k = len(prompt_b) // 4
    decode = EngineLoop(make_engine(num_blocks=n_a + k - 1))
    decode.start()
    try:
        drain(decode.add_request("warm", prompt_b, params), 60)  # caches B's prefix
        assert decode.reserve_prefix("B", prompt_b) == k  # B's pull is in flight
        out_a, kv_a = prefill_elsewhere(make_engine(), prompt_a, params)
        first_a = out_a.new_token_ids[0]
        handle_a = decode.add_prefilled_request("A", prompt_a, first_a, params, kv_a)
        assert decode.stats()[1].num_reserved_blocks == kv_a.shape[2]  # waits, not failed
        out_b, kv_b = prefill_elsewhere(make_engine(), prompt_b, params, skip=k)
        first_b = out_b.new_token_ids[0]
        handle_b = decode.add_prefilled_request("B", prompt_b, first_b, params, kv_b)
        got_b = [first_b] + iter_ids(drain(handle_b, 60))
        got_a = [first_a] + iter_ids(drain(handle_a, 60))
        assert handle_b.first_output_at < handle_a.first_output_at
        reference = make_engine()
        assert got_a == reference.generate([prompt_a], params)[0].token_ids
        assert got_b == reference.generate([prompt_b], params)[0].token_ids
        decode.call(lambda e: e.scheduler.check_integrity())
        assert decode.call(lambda e: e.pinned_requests()) == set()
    finally:
        decode.stop()
