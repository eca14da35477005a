"""Asynchronous scheduling: step N+1 is scheduled and launched before N's tokens are read.

On CPU ``launch`` computes before it returns, but the bookkeeping (placeholder tokens filled
from the previous step's device tensor, advance/resolve, dropped rows) is the one CUDA runs,
so every scenario must give exactly what the synchronous engine gives.
"""

from __future__ import annotations

from collections import defaultdict

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.testing import drain_outputs

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _both(make_engine, requests, **kw):
    sync = drain_outputs(make_engine(async_output=False, async_scheduling=False, **kw),
                         requests)
    eng = make_engine(async_scheduling=True, **kw)
    assert eng._schedule_ahead
    return sync, drain_outputs(eng, requests), eng


def _assert_clean(eng) -> None:
    st = eng.stats()
    assert st.num_running == 0 and st.num_waiting == 0 and st.num_blocks_used == 0
    eng.scheduler.check_integrity()


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


def test_requests_added_while_a_step_is_in_flight(make_engine, tiny_prompts):
    requests = [(f"r{i}", p, GREEDY) for i, p in enumerate(tiny_prompts)]
    ref = make_engine(async_output=False, async_scheduling=False).generate(
        [p for _, p, _ in requests], GREEDY)
    eng = make_engine(async_scheduling=True)
    pending = list(requests)

    def add_one(e, _i):
        if pending:
            e.add_request(*pending.pop(0))

    got = drain_outputs(eng, [pending.pop(0)], between=add_one)
    assert [got[rid]["ids"] for rid, _, _ in requests] == [c.token_ids for c in ref]
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


# -- found in review ---------------------------------------------------------------------


def test_a_step_run_at_once_leaves_out_a_sequence_the_step_ahead_ended(make_engine,
                                                                        tiny_prompts):
    """A greedy sequence's token read at a step that cannot run ahead (a seeded row joined it)
    is a stop token: that step was scheduled with a row for it, whose blocks are gone by the
    time it runs. It crashed ("KV slots not allocated"); now the row is left out."""
    ref = make_engine().generate([tiny_prompts[3]], GREEDY)[0]
    k = next(i for i in range(3, len(ref.token_ids))
             if ref.token_ids[i] not in ref.token_ids[:i])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=(ref.token_ids[k],))
    seeded = SamplingParams(temperature=0.9, seed=3, max_tokens=4, ignore_eos=True)
    eng = make_engine(async_scheduling=True)
    eng.add_request("s", tiny_prompts[3], params)
    got: dict[str, list[int]] = defaultdict(list)
    reasons: dict[str, str | None] = {}
    # The seeded request arrives with the step that reads the stop token.
    while len(got["s"]) < k:
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    eng.add_request("t", tiny_prompts[0], seeded)
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        eng.scheduler.check_integrity()
    assert got["s"] == ref.token_ids[:k + 1] and reasons["s"] == "stop"
    alone = make_engine(async_scheduling=False, async_output=False).generate(
        [tiny_prompts[0]], seeded)[0]
    assert got["t"] == alone.token_ids and reasons["t"] == "length"
    _assert_clean(eng)


def _one_finish_then_reuse(eng, prompt, params, reuse_prompt, reuse_params):
    log = []
    reused = False
    for _ in range(16):
        for o in eng.step():
            log.append((o.request_id, o.new_token_ids, o.finished, o.finish_reason))
            if o.request_id == "a" and o.finished and not reused:
                reused = True
                eng.add_request("a", reuse_prompt, reuse_params)
        eng.scheduler.check_integrity()
    return log


def test_a_sequence_that_outgrows_the_pool_is_reported_finished_once(make_engine,
                                                                      tiny_prompts):
    """It outgrew the whole pool while its last token was on its way: the end went out with
    that token and then once more, to the request that reused the id. Both the asynchronous
    modes had it."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for mode in ({"async_scheduling": True},
                 {"async_scheduling": False, "async_output": True}):
        eng = make_engine(num_blocks=4, block_size=4, **mode)  # 16 tokens in all
        eng.add_request("a", tiny_prompts[2][:12], params)
        log = _one_finish_then_reuse(eng, tiny_prompts[2][:12], params, tiny_prompts[0], short)
        ends = [entry for entry in log if entry[2]]
        assert [e[3] for e in ends] == ["length", "length"], (mode, log)
        # The first end is the outgrown one; the second, the new request's own, after its
        # three tokens.
        first = log.index(ends[0])
        assert sum(len(e[1]) for e in log[first + 1:]) == 3, (mode, log)
        _assert_clean(eng)


def test_an_abort_drops_the_end_on_its_way_to_a_request_that_reuses_the_id(make_engine,
                                                                            tiny_prompts):
    """Its length end was decided but not yet reported when it was aborted; the id was then
    reused, and the old last token and end went to the new request, whose text was lost."""
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = make_engine(async_scheduling=False, async_output=False).generate(
        [tiny_prompts[1]], params)[0]
    for mode in ({"async_scheduling": True},
                 {"async_scheduling": False, "async_output": True}):
        eng = make_engine(**mode)
        eng.add_request("x", tiny_prompts[0], params)
        for _ in range(3):
            eng.step()
        eng.abort("x")
        eng.add_request("x", tiny_prompts[1], params)
        ids, text, ends = [], "", []
        while eng.has_unfinished():
            for o in eng.step():
                ids += o.new_token_ids
                text += o.new_text
                if o.finished:
                    ends.append(o.finish_reason)
        assert (ids, text, ends) == (expected.token_ids, expected.text, ["length"]), mode
        _assert_clean(eng)
