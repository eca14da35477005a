"""The engine loop's hand-off queue when room is short: what waits, what goes first, and what
is sent back to be prefilled again, so that nothing waits for ever (found in review)."""

from __future__ import annotations

import time

import pytest

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.testing import prefill_elsewhere
from slaq.gpu_workers.engine_loop import EngineLoop, HandoffRetry, drain, iter_ids

SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def _prefilled(make_engine, prompt: list[int], params: SamplingParams):
    """Prefill ``prompt`` on a separate engine: its first token and all its KV blocks."""
    first, kv = prefill_elsewhere(make_engine(), prompt, params)
    return first.new_token_ids[0], kv


@pytest.fixture()
def tok(make_engine):
    from slaq.gpu_workers.engine.loader import load_tokenizer

    return load_tokenizer(make_engine().config.model)


def test_two_hand_offs_that_each_lack_the_others_pins_do_not_both_wait(make_engine, tok):
    """Nothing runs and each waiting hand-off lacks blocks pinned for the other: the head is
    sent back to be prefilled again (its pins given back), and the other one runs. Before,
    the head was failed as if it could never fit."""
    prompt_h = tok.encode("The capital of France is Paris. Hello, world! " * 30)[:119]
    prompt_p = tok.encode("Le café est très bon à Paris. " * 30)[:111]
    first_h, kv_h = _prefilled(make_engine, prompt_h, SHORT)
    first_p, kv_p = _prefilled(make_engine, prompt_p, SHORT)
    loop = EngineLoop(make_engine(num_blocks=40))  # blocks of 4: H takes 30, P 28
    loop.start()
    try:
        drain(loop.add_request("warm-h", prompt_h[:80], ONE), 30)  # H's first 20 blocks
        drain(loop.add_request("warm-p", prompt_p[:60], ONE), 30)  # P's first 15 blocks
        a, b = loop.reserve_prefix("H", prompt_h), loop.reserve_prefix("P", prompt_p)
        assert (a, b) == (20, 15)  # 5 blocks left: H needs 10 more, P 13
        handle_h = loop.add_prefilled_request("H", prompt_h, first_h, SHORT, kv_h[:, :, a:])
        handle_p = loop.add_prefilled_request("P", prompt_p, first_p, SHORT, kv_p[:, :, b:])
        with pytest.raises(HandoffRetry, match="nothing running here would free room"):
            drain(handle_h, 30)
        got_p = [first_p] + iter_ids(drain(handle_p, 30))
        # The retry: a new attempt brings all of H's KV again; the pool now holds it.
        again = loop.add_prefilled_request("H#2", prompt_h, first_h, SHORT, kv_h)
        got_h = [first_h] + iter_ids(drain(again, 30))
        reference = make_engine()
        assert got_p == reference.generate([prompt_p], SHORT)[0].token_ids
        assert got_h == reference.generate([prompt_h], SHORT)[0].token_ids
        assert loop.call(lambda e: e.pinned_requests()) == set()
        loop.call(lambda e: e.scheduler.check_integrity())
    finally:
        loop.stop()


def test_a_waiting_sequence_that_cannot_get_in_does_not_stall_the_hand_offs(make_engine, tok):
    """A preempted sequence L waits and cannot fit; the hand-off H at the head lacks only the
    blocks pinned for P, queued behind it, which fits. P goes first, then the others. Before,
    the loop saw L as work in progress, never tried P, and stepped empty for ever."""
    prompt_x = tok.encode("one two three four five six seven eight nine ten. " * 9)[:100]
    prompt_l = tok.encode("Le café est très bon à Paris. " * 30)[:160]
    prompt_h = tok.encode("The capital of France is Paris. Hello, world! " * 30)[:170]
    prompt_p = prompt_x + tok.encode("Hello world")[:6]
    first_x, kv_x = _prefilled(make_engine, prompt_x, SHORT)
    first_h, kv_h = _prefilled(make_engine, prompt_h, SHORT)
    first_p, kv_p = _prefilled(make_engine, prompt_p, SHORT)
    engine = make_engine(num_blocks=64, max_num_seqs=1)
    step = engine.step

    def slow_step():  # keeps L running while the hand-offs arrive
        time.sleep(0.01)
        return step()

    engine.step = slow_step
    loop = EngineLoop(engine)
    loop.start()
    try:
        long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
        handle_l = loop.add_request("L", prompt_l, long, rank=2)
        outputs_l = handle_l.outputs(30)
        got_l = list(next(outputs_l).new_token_ids)
        handle_h = loop.add_prefilled_request("H", prompt_h, first_h, SHORT, kv_h, rank=2)
        handle_x = loop.add_prefilled_request("X", prompt_x, first_x, SHORT, kv_x, rank=0)
        k = loop.reserve_prefix("P", prompt_p)  # pins X's prompt blocks
        assert k > 0
        handle_p = loop.add_prefilled_request("P", prompt_p, first_p, SHORT, kv_p[:, :, k:],
                                              rank=2)
        drain(handle_x, 30)
        got_p = [first_p] + iter_ids(drain(handle_p, 20))
        got_h = [first_h] + iter_ids(drain(handle_h, 20))
        got_l += iter_ids(outputs_l)
        reference = make_engine()
        assert got_p == reference.generate([prompt_p], SHORT)[0].token_ids
        assert got_h == reference.generate([prompt_h], SHORT)[0].token_ids
        assert len(got_l) == 80
        assert loop.call(lambda e: e.pinned_requests()) == set()
    finally:
        loop.stop()
