"""BlockManager: paged allocation, prefix caching with ref counts, LRU eviction, integrity."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.sequence import Sequence

BS = 4


def make_seq(request_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(request_id, list(token_ids), SamplingParams(max_tokens=8))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler's update does once a whole prefill ran."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq)
    bm.check_integrity()


def test_allocate_and_free_round_trip() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq("a", list(range(10)))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    bm.check_integrity()
    assert len(seq.block_table) == 3
    assert (bm.num_used_blocks, bm.num_free_blocks) == (3, 5)
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    bm.free(seq)
    bm.check_integrity()
    assert seq.block_table == []
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_cannot_allocate_past_the_pool() -> None:
    bm = BlockManager(2, BS)
    big = make_seq("big", list(range(9)))  # 3 blocks
    assert not bm.can_allocate(big)
    small = make_seq("small", list(range(8)))
    assert bm.can_allocate(small)


def test_append_slots_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(4, BS)
    seq = make_seq("a", list(range(3)))
    bm.allocate(seq)
    compute_all(bm, seq)
    seq.append_token(100)  # 4 tokens, 3 computed: the 4th fits in block 0
    assert bm.can_append(seq, 1)
    bm.append_slots(seq, 1)
    assert len(seq.block_table) == 1
    compute_all(bm, seq)
    seq.append_token(101)
    bm.append_slots(seq, 1)
    assert len(seq.block_table) == 2
    assert bm.can_append(seq, 4 + 4) and not bm.can_append(seq, 4 + 4 + 4 + 1)
    bm.check_integrity()


def test_prefix_blocks_are_shared_with_ref_counts() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(10)))
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2  # two full blocks; the partial third is not cached
    b = make_seq("b", list(range(8)) + [50, 51, 52])
    assert bm.lookup_prefix(b) == 8
    bm.allocate(b)
    bm.check_integrity()
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.num_used_blocks == 3 + 1  # b only added its own third block
    assert (bm.num_prefix_queries_tokens, bm.num_prefix_hit_tokens) == (10 + 11, 8)
    bm.free(a)
    bm.check_integrity()
    assert bm.num_used_blocks == 3  # b still holds the shared prefix and its own block
    bm.free(b)
    bm.check_integrity()
    assert bm.num_free_blocks == 16


def test_a_hit_never_covers_the_whole_sequence() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(8)))
    bm.allocate(a)
    compute_all(bm, a)
    twin = make_seq("twin", list(range(8)))  # block-aligned and fully cached
    bm.allocate(twin)
    # The last block is recomputed so that there is a logit to sample.
    assert twin.num_computed_tokens == 4
    assert twin.block_table[0] == a.block_table[0]
    assert twin.block_table[1] != a.block_table[1]
    one_more = make_seq("one_more", list(range(9)))
    assert bm.lookup_prefix(one_more) == 8


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute_all(bm, a)
    # Same second block, different first block: no hit at all.
    b = make_seq("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.lookup_prefix(b) == 0


def test_freed_cached_blocks_are_evicted_lru_first() -> None:
    bm = BlockManager(6, BS)
    a = make_seq("a", list(range(9)))  # 3 blocks, 2 full
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq("b", list(range(100, 109)))
    bm.allocate(b)
    compute_all(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)  # freed first: least recently used
    bm.free(b)
    bm.check_integrity()
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    # The two partial blocks went to the plain free list and are used first.
    c = make_seq("c", list(range(200, 208)))  # 2 blocks
    bm.allocate(c)
    assert sorted(c.block_table) == sorted([a_blocks[2], b_blocks[2]])
    assert bm.num_cached_blocks == 4
    # Next fresh block evicts a's tail block (freed before its head, and a before b).
    d = make_seq("d", list(range(300, 303)))
    bm.allocate(d)
    bm.check_integrity()
    assert d.block_table == [a_blocks[1]]
    assert bm.lookup_prefix(make_seq("a2", list(range(9)))) == 4  # a's first block survives
    assert bm.lookup_prefix(make_seq("b2", list(range(100, 109)))) == 8
    e = make_seq("e", list(range(400, 403)))
    bm.allocate(e)
    assert e.block_table == [a_blocks[0]]
    assert bm.lookup_prefix(make_seq("a3", list(range(9)))) == 0
    bm.check_integrity()


def test_hit_on_an_evictable_block_takes_it_out_of_the_lru() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    again = make_seq("again", list(range(9)))
    # 2 cached blocks are free but will be taken by reference, plus 1 fresh block.
    assert bm.num_blocks_to_allocate(again) == 3
    bm.allocate(again)
    bm.check_integrity()
    assert again.num_computed_tokens == 8
    assert bm.num_free_blocks == 1
    # A sequence needing 2 fresh blocks must not count the hit blocks as free any more.
    assert not bm.can_allocate(make_seq("x", list(range(500, 508))))


def test_can_allocate_accounts_for_evictable_hits() -> None:
    bm = BlockManager(3, BS)
    a = make_seq("a", list(range(8)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    # 3 free blocks (2 of them cached). b hits block 0 and needs 2 fresh: 3 in all, fits.
    b = make_seq("b", list(range(4)) + [9, 9, 9, 9, 9])
    assert bm.num_blocks_to_allocate(b) == 3
    assert bm.can_allocate(b)
    bm.allocate(b)
    bm.check_integrity()
    assert b.num_computed_tokens == 4


def test_duplicate_full_block_is_not_registered_twice() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    b = make_seq("b", list(range(9)))
    bm.allocate(a)
    bm.allocate(b)  # both before either computed: no sharing
    assert set(a.block_table).isdisjoint(b.block_table)
    compute_all(bm, a)
    compute_all(bm, b)
    assert bm.num_cached_blocks == 2
    bm.free(a)
    bm.free(b)
    bm.check_integrity()
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2


def test_decode_tokens_fill_and_commit_blocks() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", [1, 2, 3])
    bm.allocate(a)
    compute_all(bm, a)
    for token in (4, 5, 6):
        a.append_token(token)
        bm.append_slots(a, 1)
        compute_all(bm, a)
    # Tokens 1..4 and 5,6 computed: block 0 is full and cached (prompt + output token).
    assert bm.num_cached_blocks == 1
    b = make_seq("b", [1, 2, 3, 4, 5])
    assert bm.lookup_prefix(b) == 4


def test_allocate_prefilled_registers_transferred_blocks() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq("p", list(range(8)))
    seq.append_token(77)  # first token from the prefill worker
    blocks = bm.allocate_prefilled(seq, num_computed_tokens=8)
    bm.check_integrity()
    assert len(seq.block_table) == 3  # room for the first token's KV too
    assert blocks == seq.block_table[:2]
    assert seq.num_computed_tokens == 8 and seq.num_cached_tokens == 0
    assert bm.lookup_prefix(make_seq("q", list(range(9)))) == 8
    with pytest.raises(ValueError):
        bm.allocate_prefilled(make_seq("r", [1]), num_computed_tokens=2)


def test_allocate_prefilled_without_room_raises() -> None:
    bm = BlockManager(2, BS)
    seq = make_seq("p", list(range(12)))
    with pytest.raises(RuntimeError):
        bm.allocate_prefilled(seq, num_computed_tokens=12)
    bm.check_integrity()


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    b = make_seq("b", list(range(9)))
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert bm.num_prefix_queries_tokens == 0
    bm.free(a)
    bm.free(b)
    bm.check_integrity()


def test_reset_prefix_cache_drops_only_evictable_blocks() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(8)))
    b = make_seq("b", list(range(100, 108)))
    for s in (a, b):
        bm.allocate(s)
        compute_all(bm, s)
    bm.free(a)
    assert bm.reset_prefix_cache() == 2
    bm.check_integrity()
    assert bm.num_cached_blocks == 2  # b's held blocks stay cached
    assert bm.lookup_prefix(make_seq("a2", list(range(9)))) == 0


def test_num_exclusive_blocks() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq("b", list(range(9)))
    bm.allocate(b)
    assert bm.num_exclusive_blocks(a) == 1 and bm.num_exclusive_blocks(b) == 1


def test_check_integrity_detects_corruption() -> None:
    bm = BlockManager(4, BS)
    seq = make_seq("a", list(range(5)))
    bm.allocate(seq)
    seq.block_table.append(seq.block_table[0])  # a block listed twice by mistake
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
