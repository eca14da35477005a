"""The asynchronous modes: a step's outputs are built during the next step's forward
(asynchronous output), and plain greedy steps are also scheduled and launched before the
previous step's tokens are read (asynchronous scheduling; more in test_async_scheduling).

On CPU nothing actually overlaps, but the bookkeeping is the same as on CUDA, so every
scenario here must give exactly what the synchronous engine gives.
"""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE
from slaq.gpu_workers.engine.testing import drain_outputs

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SYNC = {"async_output": False, "async_scheduling": False}
# Both asynchronous modes: outputs built during the next forward, and (on top of that, for
# plain greedy steps) the next step scheduled and launched before this one's tokens are read.
MODES = {"async_output": {"async_output": True, "async_scheduling": False},
         "async_scheduling": {"async_scheduling": True}}


@pytest.fixture(params=list(MODES))
def mode(request) -> dict:
    return MODES[request.param]


def _both(make_engine, requests, mode, **kw):
    sync = drain_outputs(make_engine(**SYNC, **kw), requests)
    eng = make_engine(**mode, **kw)
    return sync, drain_outputs(eng, requests), eng


def test_mixed_batch_gives_the_same_outputs(make_engine, tiny_prompts, mode):
    requests = [(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=5 + 3 * i,
                                            ignore_eos=True))
                for i, p in enumerate(tiny_prompts)]
    requests.append(("seeded", tiny_prompts[1], SamplingParams(
        temperature=0.9, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)))
    requests.append(("lp", tiny_prompts[0], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)))
    requests.append(("pen", tiny_prompts[2], SamplingParams(
        temperature=0.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3)))
    sync, async_, eng = _both(make_engine, requests, mode)
    assert async_ == sync
    assert all(g["num_finished"] == 1 for g in async_.values())
    st = eng.stats()
    assert st.num_running == 0 and st.num_blocks_used == 0


def test_outputs_are_built_while_the_runner_executes(make_engine, tiny_prompts):
    eng = make_engine(async_output=True)
    inner = eng.runner.execute
    calls: list[bool] = []

    def execute(out, overlap=None):
        calls.append(overlap is not None)
        return inner(out, overlap)

    eng.runner.execute = execute
    eng.add_request("a", tiny_prompts[0], SamplingParams(temperature=0.0, max_tokens=4,
                                                         ignore_eos=True))
    # A first token is not held back (time to first token), so the prefill's step returns it.
    first = eng.step()
    assert [len(o.new_token_ids) for o in first] == [1] and eng.has_unfinished()
    # The first decode's token waits for the next step ...
    assert eng.step() == []
    outs = first + eng.step()
    assert sum(len(o.new_token_ids) for o in outs) == 2
    while eng.has_unfinished():
        outs += eng.step()
    assert sum(len(o.new_token_ids) for o in outs) == 4 and outs[-1].finish_reason == "length"
    # ... and is built during that step's forward; so is every later decode step's.
    assert calls == [False, False, True, True]


def test_first_tokens_come_out_of_the_step_that_computed_them(make_engine, tiny_prompts):
    eng = make_engine(async_output=True)
    eng.add_request("a", tiny_prompts[0], GREEDY)
    eng.step()
    eng.step()  # "a" decodes; its token is pending
    eng.add_request("b", tiny_prompts[1], GREEDY)
    outs = eng.step()  # "b"'s prefill and "a"'s next decode in one step
    by_id = {o.request_id: o for o in outs}
    assert len(by_id["b"].new_token_ids) == 1  # b's first token, now
    assert len(by_id["a"].new_token_ids) == 1  # a's token of the previous step
    eng.scheduler.check_integrity()


def test_stop_string_drops_the_token_computed_after_it(make_engine, tiny_prompts, mode):
    ref = make_engine().generate([tiny_prompts[3]], GREEDY)[0]
    cut = len(ref.text) // 2
    stop = ref.text[cut:cut + 3]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    sync, async_, eng = _both(make_engine, [("s", tiny_prompts[3], params),
                                            ("other", tiny_prompts[0], GREEDY)], mode)
    assert async_ == sync
    assert async_["s"]["reason"] == "stop" and async_["s"]["text"] == ref.text[:ref.text.index(
        stop)]
    assert len(async_["s"]["ids"]) < 24
    assert eng.stats().num_blocks_used == 0


def test_preemption_under_a_tight_pool(make_engine, tiny_prompts, mode):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(tiny_prompts)]
    sync, async_, eng = _both(make_engine, requests, mode, num_blocks=40)
    assert async_ == sync
    # Under asynchronous scheduling sequences were preempted while holding a placeholder.
    assert eng.stats().num_preemptions > 0


def test_abort_while_outputs_are_pending(make_engine, tiny_prompts, mode):
    eng = make_engine(**mode)
    eng.add_request("a", tiny_prompts[0], GREEDY)
    eng.add_request("b", tiny_prompts[1], GREEDY)
    eng.step()
    eng.step()
    eng.abort("a")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    b = [o for o in outs if o.request_id == "b"]
    assert b[-1].finish_reason == "length"
    assert all(not o.new_token_ids for o in outs if o.request_id == "a")
    assert eng.stats().num_running == 0 and eng.stats().num_blocks_used == 0
    eng.scheduler.check_integrity()


def test_prefill_only_requests_still_hand_over_their_blocks(make_engine, tiny_prompts, mode):
    eng = make_engine(num_blocks=64, **mode)
    eng.add_request("d", tiny_prompts[0], GREEDY)
    eng.step()
    eng.step()  # "d" decodes (ahead, under asynchronous scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng.add_request("r", tiny_prompts[2], params, prefill_only=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    [first] = [o for o in outs if o.request_id == "r"]
    assert first.finished and first.finish_reason == PREFILL_DONE
    assert len(eng.leased_blocks("r")) == -(-len(tiny_prompts[2]) // 4)
    eng.free_request("r")
    assert eng.stats().num_blocks_used == 0
