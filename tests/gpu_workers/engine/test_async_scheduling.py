"""Asynchronous scheduling: step N+1 is scheduled and launched before N's tokens are read.

On CPU ``launch`` computes before it returns, but the bookkeeping (placeholder tokens filled
from the previous step's device tensor, advance/resolve, dropped rows) is the one CUDA runs,
so every scenario must give exactly what the synchronous engine gives.
"""

from __future__ import annotations

from collections import defaultdict

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE
from slaq.gpu_workers.engine.sequence import PLACEHOLDER_TOKEN_ID

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _drain(eng, requests, *, between=None) -> dict[str, dict]:
    """Add ``(rid, prompt, params)`` requests and step to the end; per request: tokens, text,
    finish reason, how many outputs said finished. ``between(eng, step_index)`` runs after
    each step."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    got: dict[str, dict] = defaultdict(lambda: {"ids": [], "text": "", "reason": None,
                                                "num_finished": 0, "logprobs": []})
    i = 0
    while eng.has_unfinished():
        for o in eng.step():
            g = got[o.request_id]
            assert PLACEHOLDER_TOKEN_ID not in o.new_token_ids
            g["ids"] += o.new_token_ids
            g["text"] += o.new_text
            g["logprobs"] += o.logprobs or []
            if o.finished:
                g["reason"] = o.finish_reason
                g["num_finished"] += 1
        eng.scheduler.check_integrity()
        if between is not None:
            between(eng, i)
        i += 1
    return dict(got)


def _both(make_engine, requests, **kw):
    sync = _drain(make_engine(async_output=False, async_scheduling=False, **kw), requests)
    eng = make_engine(async_scheduling=True, **kw)
    assert eng._schedule_ahead
    return sync, _drain(eng, requests), eng


def _assert_clean(eng) -> None:
    st = eng.stats()
    assert st.num_running == 0 and st.num_waiting == 0 and st.num_blocks_used == 0
    eng.scheduler.check_integrity()


def test_greedy_batch_gives_the_same_outputs(make_engine, tiny_prompts):
    requests = [(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=5 + 3 * i,
                                            ignore_eos=True))
                for i, p in enumerate(tiny_prompts)]
    sync, ahead, eng = _both(make_engine, requests)
    assert ahead == sync
    assert all(g["num_finished"] == 1 for g in ahead.values())
    _assert_clean(eng)


def test_steps_mixing_in_sampled_and_logprob_rows_fall_back_and_agree(make_engine,
                                                                      tiny_prompts):
    requests = [(f"g{i}", p, GREEDY) for i, p in enumerate(tiny_prompts)]
    requests.append(("seeded", tiny_prompts[1], SamplingParams(
        temperature=0.9, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)))
    requests.append(("lp", tiny_prompts[0], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)))
    requests.append(("pen", tiny_prompts[2], SamplingParams(
        temperature=0.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3)))
    sync, ahead, eng = _both(make_engine, requests)
    assert ahead == sync
    _assert_clean(eng)


def test_the_next_step_is_launched_before_the_previous_is_read(make_engine, tiny_prompts):
    eng = make_engine(async_scheduling=True)
    runner = eng.runner
    events: list[str] = []
    inner_launch = runner.launch

    class Tracked:
        def __init__(self, step):
            self.step = step

        def collect(self):
            events.append("collect")
            return self.step.collect()

    def launch(out, prev):
        events.append("launch" + ("+prev" if prev is not None else ""))
        return Tracked(inner_launch(out, None if prev is None else prev.step))

    runner.launch = launch
    eng.add_request("a", tiny_prompts[0], SamplingParams(temperature=0.0, max_tokens=4,
                                                         ignore_eos=True))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [len(o.new_token_ids) for o in outs] == [1, 1, 1, 1]
    assert outs[-1].finish_reason == "length"
    # The prefill, then three decodes, each launched before the step ahead of it is read;
    # the last decode ends by length in advance(), so nothing is launched after it.
    assert events == ["launch", "launch+prev", "collect", "launch+prev", "collect",
                      "launch+prev", "collect", "collect"]
    _assert_clean(eng)


def test_a_stop_token_drops_the_row_computed_after_it(make_engine, tiny_prompts):
    ref = make_engine().generate([tiny_prompts[3]], GREEDY)[0]
    # A stop token first sampled mid-way: the next step has already been launched with a
    # row for this sequence, which must vanish.
    k = next(i for i in range(3, len(ref.token_ids))
             if ref.token_ids[i] not in ref.token_ids[:i])
    stop_id = ref.token_ids[k]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=(stop_id,))
    sync, ahead, eng = _both(make_engine, [("s", tiny_prompts[3], params),
                                           ("other", tiny_prompts[0], GREEDY)])
    assert ahead == sync
    assert ahead["s"]["reason"] == "stop" and ahead["s"]["ids"] == ref.token_ids[:k + 1]
    _assert_clean(eng)
    # The same token as the max_tokens-th: advance() ended it by length, resolve() says stop.
    params = SamplingParams(temperature=0.0, max_tokens=k + 1, ignore_eos=True,
                            stop_token_ids=(stop_id,))
    sync, ahead, eng = _both(make_engine, [("s", tiny_prompts[3], params)])
    assert ahead == sync and ahead["s"]["reason"] == "stop"
    _assert_clean(eng)


def test_stop_string(make_engine, tiny_prompts):
    ref = make_engine().generate([tiny_prompts[3]], GREEDY)[0]
    cut = len(ref.text) // 2
    stop = ref.text[cut:cut + 3]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    sync, ahead, eng = _both(make_engine, [("s", tiny_prompts[3], params),
                                           ("other", tiny_prompts[0], GREEDY)])
    assert ahead == sync
    assert ahead["s"]["reason"] == "stop"
    assert ahead["s"]["text"] == ref.text[:ref.text.index(stop)]
    _assert_clean(eng)


def test_preemption_under_a_tight_pool(make_engine, tiny_prompts):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(tiny_prompts)]
    sync, ahead, eng = _both(make_engine, requests, num_blocks=40)
    assert ahead == sync
    # Sequences were preempted while holding a placeholder and came back through a
    # re-prefill whose last token the runner took from the device.
    assert eng.stats().num_preemptions > 0
    _assert_clean(eng)


def test_abort_while_a_step_is_in_flight(make_engine, tiny_prompts):
    eng = make_engine(async_scheduling=True)
    eng.add_request("a", tiny_prompts[0], GREEDY)
    eng.add_request("b", tiny_prompts[1], GREEDY)
    eng.step()
    eng.step()
    assert eng._inflight is not None
    eng.abort("a")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    b = [o for o in outs if o.request_id == "b"]
    assert sum(len(o.new_token_ids) for o in b) == 24 - 1 and b[-1].finish_reason == "length"
    assert all(not o.new_token_ids for o in outs if o.request_id == "a")
    _assert_clean(eng)


def test_requests_added_while_a_step_is_in_flight(make_engine, tiny_prompts):
    requests = [(f"r{i}", p, GREEDY) for i, p in enumerate(tiny_prompts)]
    ref = make_engine(async_output=False, async_scheduling=False).generate(
        [p for _, p, _ in requests], GREEDY)
    eng = make_engine(async_scheduling=True)
    pending = list(requests)

    def add_one(e, _i):
        if pending:
            e.add_request(*pending.pop(0))

    got = _drain(eng, [pending.pop(0)], between=add_one)
    assert [got[rid]["ids"] for rid, _, _ in requests] == [c.token_ids for c in ref]
    _assert_clean(eng)


def test_prefill_only_requests_still_hand_over_their_blocks(make_engine, tiny_prompts):
    eng = make_engine(async_scheduling=True, num_blocks=64)
    eng.add_request("d", tiny_prompts[0], GREEDY)
    eng.step()
    eng.step()  # "d" decodes ahead
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng.add_request("r", tiny_prompts[2], params, prefill_only=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    [first] = [o for o in outs if o.request_id == "r"]
    assert first.finished and first.finish_reason == PREFILL_DONE
    assert len(eng.leased_blocks("r")) == -(-len(tiny_prompts[2]) // 4)
    eng.free_request("r")
    _assert_clean(eng)


def test_calibration_records_the_steps_launched_ahead(make_engine):
    """The cost-model calibration wraps the runner to time each step; a step launched ahead
    is timed too (it once went around the recorder unseen)."""
    from slaq.gpu_workers.engine.cost_model import record_engine

    eng = make_engine(async_scheduling=True)
    samples = record_engine(eng, prompt_lens=(8,), batch_sizes=(2,), max_tokens=4)
    # One prefill step, then three decode steps of the two requests.
    assert [s.chunks for s in samples] == [((0, 8), (0, 8)), ((8, 1), (8, 1)),
                                           ((9, 1), (9, 1)), ((10, 1), (10, 1))]
    assert all(s.seconds > 0 for s in samples)
