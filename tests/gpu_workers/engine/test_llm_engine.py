"""LLMEngine end to end on the tiny model: batching, sampling, stops, caching, preemption,
disaggregation, stats."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.loader import apply_chat_template
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE, NoRoomError
from slaq.gpu_workers.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _run(eng, rid: str, prompt: list[int], params: SamplingParams):
    """Run one request alone, collecting every output."""
    eng.add_request(rid, prompt, params)
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs


def test_batch_of_different_lengths_equals_one_at_a_time(make_engine, tiny_prompts):
    eng = make_engine()
    alone = [eng.generate([p], GREEDY)[0].token_ids for p in tiny_prompts]
    together = [c.token_ids for c in eng.generate(tiny_prompts, GREEDY)]
    assert together == alone
    assert eng.stats().max_batch_size_seen == len(tiny_prompts)


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_prompt_ids_out_of_the_vocabulary_are_refused_before_anything_is_queued(
    make_engine, tiny_prompts, bad,
):
    eng = make_engine()
    vocab = eng.model_config.vocab_size
    prompt = [*tiny_prompts[0], vocab if bad == "vocab" else bad]
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, "):
        eng.add_request("bad", prompt, GREEDY)
    assert not eng.has_unfinished()
    edge = [*tiny_prompts[0], 0, vocab - 1]  # both ends of the range are ids
    assert eng.generate([edge], GREEDY)[0].token_ids


def test_small_token_budget_chunks_prefills_without_changing_tokens(make_engine, tiny_prompts):
    ref = [c.token_ids for c in make_engine().generate(tiny_prompts, GREEDY)]
    chunked = make_engine(max_num_batched_tokens=7)
    assert [c.token_ids for c in chunked.generate(tiny_prompts, GREEDY)] == ref


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_16(make_engine, tiny_prompts):
    eng = make_engine()
    seeded = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=7, max_tokens=20,
                            ignore_eos=True)
    [solo] = eng.generate([tiny_prompts[1]], seeded)
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=100 + i)
              for i in range(15)]
    prompts = [tiny_prompts[i % len(tiny_prompts)] for i in range(15)]
    batch = eng.generate([*prompts[:7], tiny_prompts[1], *prompts[7:]],
                         [*others[:7], seeded, *others[7:]])
    assert batch[7].token_ids == solo.token_ids
    greedy = eng.generate([tiny_prompts[1]], GREEDY)[0].token_ids[:20]
    assert solo.token_ids != greedy, "sampling at temperature 0.8 should leave the greedy path"


def test_max_tokens_finishes_with_length(make_engine, tiny_prompts):
    eng = make_engine()
    [c] = eng.generate([tiny_prompts[0]], SamplingParams(temperature=0.0, max_tokens=5,
                                                         ignore_eos=True))
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    assert c.text == eng.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_eos_stops_unless_ignored(make_engine, tiny_prompts):
    eng = make_engine()
    ref = eng.generate([tiny_prompts[2]], GREEDY)[0].token_ids
    eos = ref[5]
    first = ref.index(eos)
    eng.eos_token_ids = (eos,)  # pretend that token is the model's EOS
    [c] = eng.generate([tiny_prompts[2]], SamplingParams(temperature=0.0, max_tokens=24))
    assert c.finish_reason == "stop" and c.token_ids == ref[:first + 1]
    [c] = eng.generate([tiny_prompts[2]], GREEDY)
    assert c.finish_reason == "length" and c.token_ids == ref


def test_stop_strings_are_not_returned_and_finish_the_request(make_engine, tiny_prompts):
    eng = make_engine()
    ref = eng.generate([tiny_prompts[3]], GREEDY)[0]
    # A stop string that starts in the middle of the reference text.
    cut = len(ref.text) // 2
    stop = ref.text[cut:cut + 3]
    assert len(stop) == 3
    expected = ref.text[:ref.text.index(stop)]
    outs = _run(eng, "s", tiny_prompts[3], SamplingParams(temperature=0.0, max_tokens=24,
                                                          ignore_eos=True,
                                                          stop=(stop, "never-seen")))
    text = "".join(o.new_text for o in outs)
    assert text == expected
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert sum(len(o.new_token_ids) for o in outs) < 24
    assert not eng.has_unfinished() and eng.stats().num_blocks_used <= eng.stats().num_blocks_total
    eng.scheduler.check_integrity()


def test_chat_template_and_eos_ids(make_engine):
    eng = make_engine()
    ids = apply_chat_template(eng.tokenizer, [{"role": "user", "content": "Hello, world!"}])
    text = eng.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nHello, world!<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert eng.eos_token_ids == (2,)


def test_prefix_cache_hits_give_the_same_tokens(make_engine, tiny_prompts):
    eng = make_engine()
    prompt = tiny_prompts[2]
    first = _run(eng, "a", prompt, GREEDY)
    second = _run(eng, "b", prompt, GREEDY)
    assert [o.new_token_ids for o in second] == [o.new_token_ids for o in first]
    assert first[-1].num_cached_tokens == 0
    assert second[-1].num_cached_tokens >= len(prompt) - 4
    st = eng.stats()
    assert st.prefix_cache_hits_tokens == second[-1].num_cached_tokens
    assert st.prefix_cache_queries_tokens == 2 * len(prompt)


def test_preemption_by_recompute_keeps_greedy_tokens(make_engine, tiny_prompts):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = [c.token_ids for c in make_engine().generate(tiny_prompts, params)]
    tight = make_engine(num_blocks=40, block_size=4)  # far less than 5 x ~60 tokens
    got = [c.token_ids for c in tight.generate(tiny_prompts, params)]
    assert tight.stats().num_preemptions > 0
    assert got == ref
    tight.scheduler.check_integrity()


def test_disaggregated_prefill_then_decode_equals_aggregated(make_engine, tiny_prompts):
    prompt = tiny_prompts[2]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ref = make_engine().generate([prompt], params)[0]
    prefill, decode = make_engine(num_blocks=64), make_engine(num_blocks=64)
    outs = []
    prefill.add_request("r", prompt, params, prefill_only=True)
    while prefill.has_unfinished():
        outs += prefill.step()
    [first] = outs
    assert first.finished and first.finish_reason == PREFILL_DONE
    assert first.new_token_ids == ref.token_ids[:1]
    blocks = prefill.leased_blocks("r")
    assert len(blocks) == -(-len(prompt) // 4)
    kv = prefill.read_blocks(blocks)
    decode.add_prefilled_request("r", prompt, first.new_token_ids[0], params, kv)
    rest = []
    while decode.has_unfinished():
        rest += decode.step()
    assert first.new_token_ids + [t for o in rest for t in o.new_token_ids] == ref.token_ids
    assert first.new_text + "".join(o.new_text for o in rest) == ref.text
    assert rest[-1].finish_reason == "length"
    used = prefill.stats().num_blocks_used
    prefill.free_request("r")
    assert prefill.leased_blocks("r") == [] and prefill.stats().num_blocks_used < used


def _cached_tokens(engine, prompt: list[int]) -> int:
    """Prompt tokens the engine's prefix cache would supply to a new request."""
    probe = Sequence("probe", [*prompt, 7], SamplingParams(max_tokens=1))
    return engine.block_manager.lookup_prefix(probe)


def _leased_kv(prefill, prompt, params):
    prefill.add_request("r", prompt, params, prefill_only=True)
    [first] = prefill.step()
    return first.new_token_ids[0], prefill.read_blocks(prefill.leased_blocks("r"))


def test_add_prefilled_without_room_raises(make_engine, tiny_prompts):
    prompt = tiny_prompts[2]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    first, kv = _leased_kv(make_engine(num_blocks=64), prompt, params)
    decode = make_engine(num_blocks=64, max_num_seqs=1)
    decode.add_request("busy", tiny_prompts[0], GREEDY)
    decode.step()
    with pytest.raises(NoRoomError):  # no seat now: it may wait
        decode.add_prefilled_request("r", prompt, first, params, kv)
    with pytest.raises(ValueError, match="more KV blocks than the pool"):  # never: refused
        make_engine(num_blocks=2).add_prefilled_request("r", prompt, first, params, kv)


def test_a_hand_off_whose_kv_does_not_fit_the_pool_is_refused_before_it_is_scheduled(
    make_engine, tiny_prompts,
):
    """A prefill worker with another block size sends blocks of another shape: refused
    before the scheduler takes the request (found in review: it used to run for nobody, and
    its never-written blocks stayed in the prefix cache)."""
    prompt = tiny_prompts[2]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    first, kv = _leased_kv(make_engine(num_blocks=64, block_size=2), prompt, params)
    decode = make_engine(num_blocks=64)
    with pytest.raises(ValueError, match="do not fit this engine's pool"):
        decode.add_prefilled_request("r", prompt, first, params, kv)
    assert not decode.has_unfinished() and decode.scheduler.get("r") is None
    assert _cached_tokens(decode, prompt) == 0


def test_a_hand_off_whose_kv_write_fails_leaves_nothing_scheduled_or_cached(
    make_engine, tiny_prompts,
):
    prompt = tiny_prompts[2]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    first, kv = _leased_kv(make_engine(num_blocks=64), prompt, params)
    decode = make_engine(num_blocks=64)
    free = decode.block_manager.num_free_blocks

    def broken(block_ids, rows):  # a device that runs out of memory mid-copy
        raise RuntimeError("out of memory")

    decode.runner.write_blocks = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        decode.add_prefilled_request("r", prompt, first, params, kv)
    assert not decode.has_unfinished() and decode.scheduler.get("r") is None
    assert _cached_tokens(decode, prompt) == 0
    assert decode.block_manager.num_free_blocks == free
    decode.block_manager.check_integrity()


def test_abort_frees_everything(make_engine, tiny_prompts):
    eng = make_engine()
    eng.add_request("a", tiny_prompts[0], GREEDY)
    eng.add_request("b", tiny_prompts[1], GREEDY)
    eng.step()
    eng.abort("a")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert {o.request_id for o in outs} == {"b"}
    assert eng.stats().num_running == 0
    eng.scheduler.check_integrity()


def test_logprobs_and_stats(make_engine, tiny_prompts):
    eng = make_engine()
    [c] = eng.generate([tiny_prompts[0]], SamplingParams(temperature=0.0, max_tokens=6,
                                                         ignore_eos=True, logprobs=2))
    assert c.logprobs is not None and len(c.logprobs) == 6
    for token_id, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert entry[0][0] == token_id and len(entry) == 3
        assert entry[1][0] == token_id  # greedy: the chosen token is the most likely
    st = eng.stats()
    assert st.num_prompt_tokens_total == len(tiny_prompts[0])
    assert st.num_generation_tokens_total == 6
    assert st.decode_tokens_per_s > 0 and st.num_steps == 6
    assert st.num_blocks_used == 0 and st.kv_usage == 0.0


def test_bad_requests_are_refused(make_engine):
    eng = make_engine()
    with pytest.raises(ValueError):
        eng.add_request("x", [10**6], GREEDY)
    with pytest.raises(ValueError):
        eng.add_request("y", [1] * 2000, GREEDY)  # over max_model_len
    assert not eng.has_unfinished()


def test_sim_runner_behind_the_same_facade(tiny_model_path):
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.testing import engine_config

    eng = LLMEngine(engine_config(tiny_model_path, num_blocks=64), runner="sim")
    [c] = eng.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3,
                                                   ignore_eos=True))
    assert len(c.token_ids) == 3 and c.finish_reason == "length"
