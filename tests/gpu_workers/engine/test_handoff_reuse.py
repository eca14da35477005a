"""Hand-offs that reuse the decode side's prefix cache: pins in the block manager, the
scheduler's add_prefilled over pinned blocks, and the engine pulling fewer blocks with the
same greedy tokens (multi-turn chat on the tiny model)."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.block_manager import (
    BlockManager,
    block_hashes,
    summary_depths,
)
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.engine.scheduler import NoRoomError, Scheduler
from slaq.gpu_workers.engine.sequence import Sequence

BS = 4


def make_seq(request_id: str, token_ids: list[int], first: int | None = None) -> Sequence:
    out = [] if first is None else [first]
    return Sequence(request_id, list(token_ids), SamplingParams(max_tokens=8),
                    output_token_ids=out)


def cache_prefix(bm: BlockManager, rid: str, tokens: list[int]) -> list[int]:
    """Compute ``tokens`` as a sequence would, then free it: its full blocks stay cached
    (evictable). Returns the blocks it had."""
    seq = make_seq(rid, tokens)
    bm.allocate(seq)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq)
    blocks = list(seq.block_table)
    bm.free(seq)
    bm.check_integrity()
    return blocks


def test_block_hashes_are_the_chain_the_cache_registers() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(10))
    blocks = cache_prefix(bm, "a", tokens)
    hashes = block_hashes(tokens, BS)
    assert len(hashes) == 2  # only full blocks
    assert [bm._hash_to_block[h] for h in hashes] == blocks[:2]
    assert block_hashes(tokens, BS, 1) == hashes[:1]
    assert block_hashes(tokens[:3], BS) == []
    assert summary_depths(0, 0) == [] and summary_depths(1, 3) == [1]
    assert summary_depths(20, 7) == [7, 20] and summary_depths(16, 16) == [16]
    with pytest.raises(ValueError):
        block_hashes(tokens, 0)


def test_pinned_prefix_is_reused_and_only_the_rest_receives_kv() -> None:
    bm = BlockManager(8, BS)
    cached = cache_prefix(bm, "turn1", list(range(9)))  # blocks 0,1 full and cached
    prompt = list(range(9)) + [50, 51, 52, 53, 54]  # 14 tokens: 3 full blocks + 2
    assert bm.num_free_blocks == 8  # evictable cached blocks count as free
    assert bm.pin_prefix("turn2", prompt) == 2
    bm.check_integrity()
    assert bm.num_pinned("turn2") == 2 and bm.num_free_blocks == 6  # pinned = in use
    seq = make_seq("turn2", prompt, first=99)  # 15 tokens, 14 computed
    receive = bm.allocate_prefilled(seq, seq.num_tokens - 1)
    bm.check_integrity()
    assert seq.block_table[:2] == cached[:2]
    assert receive == seq.block_table[2:4]  # blocks 2 (full) and 3 (2 tokens + first token)
    assert bm.num_pinned("turn2") == 0
    assert (bm.num_handoff_blocks, bm.num_handoff_reused_blocks) == (4, 2)
    # The new full block is registered under the prompt's chain.
    assert bm._hash_to_block[block_hashes(prompt, BS)[2]] == seq.block_table[2]
    bm.free(seq)
    bm.check_integrity()
    assert bm.num_used_blocks == 0


def test_a_pinned_block_survives_pool_pressure_and_unpin_returns_it_cached() -> None:
    bm = BlockManager(4, BS)
    cached = cache_prefix(bm, "old", list(range(8)))  # 2 cached, evictable blocks
    assert bm.pin_prefix("coming", list(range(8)) + [7]) == 2
    # Another sequence wants the whole pool: the pinned blocks are not free to take.
    hog = make_seq("hog", list(range(100, 116)))  # 4 blocks
    assert not bm.can_allocate(hog)
    small = make_seq("small", list(range(100, 108)))  # 2 blocks: the plain free ones
    bm.allocate(small)
    bm.check_integrity()
    assert not set(small.block_table) & set(cached)
    assert bm.num_free_blocks == 0
    # Unpinned, the blocks go back to the LRU with their hashes (still a prefix hit).
    assert bm.unpin("coming") == 2 and bm.unpin("coming") == 0
    bm.check_integrity()
    assert bm.num_free_blocks == 2
    assert bm.lookup_prefix(make_seq("again", list(range(9)))) == 8


def test_pin_refuses_a_key_in_use_and_counts_shared_blocks() -> None:
    bm = BlockManager(8, BS)
    running = make_seq("run", list(range(9)))
    bm.allocate(running)
    running.num_computed_tokens = 9
    bm.commit_full_blocks(running)
    # Blocks of a running sequence are shared by reference, not copied.
    assert bm.pin_prefix("p", list(range(8))) == 2
    bm.check_integrity()
    assert bm._ref_counts[running.block_table[0]] == 2
    with pytest.raises(ValueError):
        bm.pin_prefix("p", list(range(8)))
    with pytest.raises(ValueError):
        bm.pin_prefix("run", list(range(8)))
    bm.free(running)
    bm.check_integrity()
    assert bm.num_used_blocks == 2  # the pin still holds the prefix
    assert bm.unpin("p") == 2
    assert bm.num_used_blocks == 0
    assert BlockManager(8, BS, enable_prefix_caching=False).pin_prefix("x", range(8)) == 0


def test_pins_for_another_prompt_are_refused_and_released() -> None:
    bm = BlockManager(8, BS)
    cache_prefix(bm, "a", list(range(9)))
    assert bm.pin_prefix("b", list(range(9))) == 2
    wrong = make_seq("b", [7] * 9, first=1)
    with pytest.raises(ValueError):
        bm.allocate_prefilled(wrong, 9)
    bm.check_integrity()
    assert bm.num_pinned("b") == 0 and bm.num_used_blocks == 0


def test_prefix_summary_lists_recent_cached_prefixes_and_drops_evicted_ones() -> None:
    bm = BlockManager(6, BS, summary_size=3)
    seq = make_seq("a", list(range(10)))  # 10 prompt tokens: 2 full prompt blocks
    bm.allocate(seq)
    for t in (10, 11, 12, 13, 14, 15):  # an answer: 16 tokens, 4 blocks in all
        seq.num_computed_tokens = seq.num_tokens
        seq.append_token(t)
        bm.append_slots(seq, 1)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq)
    bm.free(seq)
    bm.check_integrity()
    chain = block_hashes(list(range(16)), BS)
    assert bm.prefix_summary() == [chain[3], chain[1]]  # deepest, then the prompt's last
    b_hash = block_hashes(list(range(100, 108)), BS)[1]
    cache_prefix(bm, "b", list(range(100, 108)))  # the 2 plain free blocks
    assert bm.prefix_summary() == [b_hash, chain[3], chain[1]]
    # c's block evicts a's least recently freed one, its tail (chain[3]); the size cap
    # drops the oldest entry (chain[1]).
    cache_prefix(bm, "c", list(range(200, 204)))
    assert chain[3] not in bm._hash_to_block and chain[1] in bm._hash_to_block
    assert bm.prefix_summary() == [block_hashes(list(range(200, 204)), BS)[0], b_hash]
    with pytest.raises(ValueError):
        BlockManager(4, BS, summary_size=-1)


def test_scheduler_counts_pinned_blocks_as_held() -> None:
    bm = BlockManager(5, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                      max_model_len=64), bm)
    cache_prefix(bm, "t1", list(range(12)))  # 3 cached blocks
    prompt = list(range(12)) + [40, 41, 42, 43, 44, 45, 46, 47]  # 20 tokens: 5 blocks + 1
    seq = make_seq("t2", prompt, first=5)
    assert not sched.can_add_prefilled(seq)  # 6 fresh blocks > 5
    assert bm.pin_prefix("t2", prompt) == 3
    seq2 = make_seq("t2", prompt[:-4], first=5)  # 16 + 1 tokens: 5 blocks, 3 pinned
    assert sched.can_add_prefilled(seq2)
    receive = sched.add_prefilled(seq2)
    sched.check_integrity()
    assert len(receive) == 1 and receive == seq2.block_table[3:4]
    other = make_seq("t3", list(range(200, 212)), first=5)
    assert not sched.can_add_prefilled(other)
    with pytest.raises(NoRoomError):
        sched.add_prefilled(other)
    sched.check_integrity()


# -- the engine: a three-turn chat handed off to the same decode engine ---------------------
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prefill(engine, rid: str, prompt: list[int]):
    engine.add_request(rid, prompt, GREEDY, prefill_only=True)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    [first] = outs
    return first.new_token_ids[0], engine.leased_blocks(rid)


def _decode(engine, rid: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            tokens += out.new_token_ids
        engine.scheduler.check_integrity()
    return tokens


def test_multi_turn_hand_offs_pull_only_uncached_blocks(make_engine, tiny_prompts):
    prefill, decode = make_engine(num_blocks=128), make_engine(num_blocks=128)
    prompt = tiny_prompts[2]
    pulled, reused, expected_reuse = [], [], 0
    for turn in range(3):
        rid = f"turn{turn}"
        first, leased = _prefill(prefill, rid, prompt)
        k = decode.reserve_prefix(rid, prompt)
        decode.scheduler.check_integrity()
        kv = prefill.read_blocks(leased[k:]) if k < len(leased) else None
        pulled.append(len(leased) - k)
        reused.append(k)
        assert k == expected_reuse, f"turn {turn}"
        prefill.free_request(rid)
        decode.add_prefilled_request(rid, prompt, first, GREEDY, kv)
        decode.scheduler.check_integrity()
        tokens = [first] + _decode(decode, rid)
        # Unconstrained: a fresh engine (cold cache) computes the whole prompt itself.
        want = make_engine(num_blocks=128).generate([prompt], GREEDY)[0].token_ids
        assert tokens == want, f"turn {turn}"
        # The decode engine cached every full block of prompt + answer but the last token.
        expected_reuse = (len(prompt) + len(tokens) - 1) // 4
        assert block_hashes(prompt + tokens, 4)[expected_reuse - 1] in decode.stats().prefix_hashes
        # The next turn's prompt: this one, the answer, and a new user message.
        prompt = prompt + tokens + tiny_prompts[turn % 2]
    assert reused[0] == 0 and min(reused[1:]) > 0
    st = decode.stats()
    assert st.handoff_blocks_reused == sum(reused)
    assert st.handoff_blocks_total == sum(pulled) + sum(reused)
    assert st.prefix_hashes  # what a heartbeat would publish
    assert decode.stats().num_blocks_used == 0


def test_reserved_prefix_given_back_on_abort_or_release(make_engine, tiny_prompts):
    decode = make_engine(num_blocks=64)
    prompt = tiny_prompts[2]
    decode.generate([prompt], GREEDY)
    assert decode.reserve_prefix("r", prompt) > 0
    assert decode.stats().num_blocks_used > 0
    with pytest.raises(ValueError):
        decode.reserve_prefix("r", prompt)
    decode.abort("r")
    decode.scheduler.check_integrity()
    assert decode.stats().num_blocks_used == 0
    assert decode.reserve_prefix("s", prompt) > 0
    assert decode.release_prefix("s") > 0 and decode.release_prefix("s") == 0
    assert decode.stats().num_blocks_used == 0


def test_full_kv_is_accepted_after_a_reservation(make_engine, tiny_prompts):
    prefill, decode = make_engine(num_blocks=64), make_engine(num_blocks=64)
    prompt = tiny_prompts[2]
    want = make_engine(num_blocks=64).generate([prompt], GREEDY)[0].token_ids
    decode.generate([prompt], GREEDY)  # the decode engine has the prompt cached
    first, leased = _prefill(prefill, "r", prompt)
    k = decode.reserve_prefix("r", prompt)
    assert 0 < k < len(leased)
    # A caller that pulled everything anyway: the cached part of kv is skipped.
    decode.add_prefilled_request("r", prompt, first, GREEDY, prefill.read_blocks(leased))
    assert [first] + _decode(decode, "r") == want
    # A kv shorter than what is missing is refused, and nothing stays held.
    first, leased = _prefill(prefill, "short", prompt)
    k = decode.reserve_prefix("short", prompt)
    with pytest.raises(ValueError):
        decode.add_prefilled_request("short", prompt, first, GREEDY,
                                     prefill.read_blocks(leased[k + 1:]))
    decode.scheduler.check_integrity()
    assert decode.stats().num_blocks_used == 0


def test_a_fully_cached_prompt_pulls_nothing(make_engine, tiny_prompts):
    prefill, decode = make_engine(num_blocks=64), make_engine(num_blocks=64)
    prompt = tiny_prompts[2][:len(tiny_prompts[2]) // 4 * 4]  # whole blocks only
    want = make_engine(num_blocks=64).generate([prompt], GREEDY)[0].token_ids
    decode.generate([prompt], GREEDY)
    first, leased = _prefill(prefill, "r", prompt)
    assert decode.reserve_prefix("r", prompt) == len(leased)
    decode.add_prefilled_request("r", prompt, first, GREEDY, None)
    decode.scheduler.check_integrity()
    assert [first] + _decode(decode, "r") == want
    st = decode.stats()
    assert st.handoff_blocks_reused == st.handoff_blocks_total == len(leased)


def test_a_refused_hand_off_leaves_no_cached_blocks(make_engine, tiny_prompts):
    """A kv too short is refused before any block is allocated: allocation registers blocks
    in the prefix cache at once, and blocks left there without their KV would hand garbage to
    the next request with the same prompt."""
    prefill, decode = make_engine(num_blocks=64), make_engine(num_blocks=64)
    prompt = tiny_prompts[2]
    first, leased = _prefill(prefill, "r", prompt)
    with pytest.raises(ValueError, match="kv has"):
        decode.add_prefilled_request("r", prompt, first, GREEDY,
                                     prefill.read_blocks(leased[1:]))
    assert decode.block_manager.num_cached_blocks == 0
    decode.scheduler.check_integrity()
    want = make_engine(num_blocks=64).generate([prompt], GREEDY)[0].token_ids
    assert decode.generate([prompt], GREEDY)[0].token_ids == want
