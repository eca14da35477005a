"""Asynchronous output processing: a step's outputs are built during the next step's forward.

On CPU nothing actually overlaps, but the bookkeeping is the same as on CUDA, so every
scenario here must give exactly what the synchronous engine gives.
"""

from __future__ import annotations

from collections import defaultdict

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _drain(eng, requests) -> dict[str, dict]:
    """Add ``(rid, prompt, params)`` requests, step to the end; per request: tokens, text,
    finish reason, and how many outputs said finished."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    got: dict[str, dict] = defaultdict(lambda: {"ids": [], "text": "", "reason": None,
                                                "num_finished": 0, "logprobs": []})
    while eng.has_unfinished():
        for o in eng.step():
            g = got[o.request_id]
            g["ids"] += o.new_token_ids
            g["text"] += o.new_text
            g["logprobs"] += o.logprobs or []
            if o.finished:
                g["reason"] = o.finish_reason
                g["num_finished"] += 1
        eng.scheduler.check_integrity()
    return dict(got)


def _both(make_engine, requests, **kw):
    sync = _drain(make_engine(async_output=False, **kw), requests)
    eng = make_engine(async_output=True, **kw)
    return sync, _drain(eng, requests), eng


def test_mixed_batch_gives_the_same_outputs(make_engine, tiny_prompts):
    requests = [(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=5 + 3 * i,
                                            ignore_eos=True))
                for i, p in enumerate(tiny_prompts)]
    requests.append(("seeded", tiny_prompts[1], SamplingParams(
        temperature=0.9, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)))
    requests.append(("lp", tiny_prompts[0], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)))
    sync, async_, eng = _both(make_engine, requests)
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


def test_stop_string_drops_the_token_computed_after_it(make_engine, tiny_prompts):
    ref = make_engine().generate([tiny_prompts[3]], GREEDY)[0]
    cut = len(ref.text) // 2
    stop = ref.text[cut:cut + 3]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    sync, async_, eng = _both(make_engine, [("s", tiny_prompts[3], params),
                                            ("other", tiny_prompts[0], GREEDY)])
    assert async_ == sync
    assert async_["s"]["reason"] == "stop" and async_["s"]["text"] == ref.text[:ref.text.index(
        stop)]
    assert len(async_["s"]["ids"]) < 24
    assert eng.stats().num_blocks_used == 0


def test_preemption_under_a_tight_pool(make_engine, tiny_prompts):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(tiny_prompts)]
    sync, async_, eng = _both(make_engine, requests, num_blocks=40)
    assert async_ == sync
    assert eng.stats().num_preemptions > 0


def test_abort_while_outputs_are_pending(make_engine, tiny_prompts):
    eng = make_engine(async_output=True)
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


def test_prefill_only_requests_still_hand_over_their_blocks(make_engine, tiny_prompts):
    eng = make_engine(async_output=True, num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng.add_request("r", tiny_prompts[2], params, prefill_only=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    [first] = outs
    assert first.finished and first.finish_reason == PREFILL_DONE
    assert len(eng.leased_blocks("r")) == -(-len(tiny_prompts[2]) // 4)
    eng.free_request("r")
    assert eng.stats().num_blocks_used == 0
