"""The CPU decode K/V copy (decode_cache) against the pool-gathering path it replaces, and
both against the C paged kernel (cpu_kernels) that reads the pool in place."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from slaq.gpu_workers.engine.attention import dense_decode_attention
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.decode_cache import DecodeKVCache, length_groups
from slaq.gpu_workers.engine.model_runner import ModelRunner
from slaq.gpu_workers.engine.outputs import ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.testing import engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
BS = 4


def _runner(path, mode: str) -> ModelRunner:
    """``"copy"``: the contiguous K/V copy; ``"gather"``: gather from the pool every step;
    ``"paged"``: the C kernel (skips the test where it cannot be built)."""
    r = ModelRunner(engine_config(path, num_blocks=160, block_size=BS,
                                  cpu_decode_attention="auto" if mode == "paged" else "copy"))
    if mode == "paged" and not r.backend.reads_pool:
        pytest.skip("the CPU paged decode kernel is unavailable here (no C compiler)")
    if mode == "gather":
        r.decode_kv = None
    return r


def _staggered(runner: ModelRunner, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Requests join one step apart and leave after ``num_tokens`` each; one is re-prefilled
    from scratch midway (as a preemption by recompute would), so the decode batch keeps
    changing: joins, leaves, recompute."""
    seqs = []
    for i, p in enumerate(prompts):
        s = Sequence(f"r{i}", list(p), GREEDY)
        s.block_table = list(range(i * 30, i * 30 + 30))[::-1]  # scattered, reversed
        seqs.append(s)
    active: list[Sequence] = []
    step = 0
    while step < len(seqs) or active:
        items = [(s, s.num_tokens - 1, 1) for s in active]
        if step == 3 and active:  # recompute the first active sequence's whole context
            victim = active[0]
            items[0] = (victim, 0, victim.num_tokens)
        if step < len(seqs):
            items.append((seqs[step], 0, seqs[step].num_prompt_tokens))
            active.append(seqs[step])
        out = SchedulerOutput([ScheduledSequence(s, a, n) for s, a, n in items])
        sampled = runner.execute(out).sampled_token_ids
        for s, _, _ in items:
            s.append_token(sampled[s.request_id])
        active = [s for s in active if s.num_output_tokens < num_tokens]
        step += 1
    return [s.output_token_ids for s in seqs]


def test_dense_decode_equals_gather_path(tiny_model_path, tiny_prompts):
    dense = _runner(tiny_model_path, "copy")
    gather = _runner(tiny_model_path, "gather")
    assert dense.decode_kv is not None
    ours = _staggered(dense, tiny_prompts, 12)
    assert ours == _staggered(gather, tiny_prompts, 12)
    # Most steps continued the same batch; only membership changes rebuilt it.
    assert 0 < dense.decode_kv.num_rebuilds < 12 + len(tiny_prompts)
    assert dense.decode_kv.num_extends > 0  # joins gathered only the newcomers


def test_paged_kernel_decodes_like_the_copy(tiny_model_path, tiny_prompts):
    """Joins, leaves, a recompute and scattered, reversed block tables: the kernel reading
    the pool in place gives the copy's tokens."""
    paged = _runner(tiny_model_path, "paged")
    assert paged.decode_kv is None  # nothing kept beside the pool
    assert _staggered(paged, tiny_prompts, 12) == _staggered(_runner(tiny_model_path, "copy"),
                                                             tiny_prompts, 12)


def test_appends_match_a_fresh_gather():
    torch.manual_seed(0)
    layers, kvh, d, bs = 2, 2, 8, 4
    pool = torch.randn(layers, 2, 12, bs, kvh, d)
    cache = DecodeKVCache(layers, kvh, d, torch.float32, torch.device("cpu"), 1 << 20)
    seqs, tables = [object(), object()], torch.tensor([[3, 7, 1], [5, 0, 0]])
    for step, lens in enumerate(([9, 2], [10, 3], [11, 4, 6], [12, 5, 7])):
        if step == 2:  # a newcomer joins after the kept rows: only it is gathered
            seqs.append(object())
            tables = torch.tensor([[3, 7, 1], [5, 0, 0], [2, 9, 0]])
        assert cache.plan(seqs, lens)
        for layer in range(layers):
            slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)]
            flat = pool[layer].view(2, -1, kvh, d)
            k, v = flat[0, slots], flat[1, slots]
            kc, vc = cache.layer_kv(layer, pool[layer], tables, k, v, bs)
            for b, n in enumerate(lens):
                ref = pool[layer][:, tables[b]].flatten(1, 2)[:, :n].transpose(1, 2)
                assert torch.equal(kc[b, :, :n], ref[0]) and torch.equal(vc[b, :, :n], ref[1])
    assert (cache.num_rebuilds, cache.num_extends) == (1, 1)
    assert not cache.plan([object()], [10 ** 6])  # over the byte budget: caller gathers


def test_arrange_keeps_held_rows_fills_holes_and_appends_newcomers():
    cache = DecodeKVCache(1, 1, 4, torch.float32, torch.device("cpu"), 1 << 20)
    a, b, c, d, e = (object() for _ in range(5))

    def arrange(items):
        return [it[0] for it in cache.arrange(items, seq=lambda it: it[0],
                                              context_len=lambda it: it[1],
                                              order=lambda it: -it[1])]

    assert cache.plan([a, b], [29, 30])  # held in this order
    assert arrange([(c, 50), (b, 31), (a, 30)]) == [a, b, c]  # kept in place, c appended
    # a left: b, the last kept row, moves into its place; the newcomer follows.
    assert arrange([(c, 50), (b, 31)]) == [b, c]
    # A held row that did not grow by one (recomputed) is gathered again, as a newcomer.
    assert arrange([(a, 5), (b, 31)]) == [b, a]
    # Keeping places would read 25% more keys than sorting everyone: everyone is sorted.
    assert cache.plan([a, b, c], [500, 30, 510])
    assert arrange([(b, 31), (c, 511), (d, 505), (e, 40)]) == [c, d, e, b]


def test_length_groups_cut_sorted_rows_where_it_pays():
    lens = [500, 480, 470, 120, 100, 90, 80]
    groups = length_groups(lens)
    assert [g[:2] for g in groups] == [(0, 3), (3, 7)]
    assert [g[2] for g in groups] == [500, 120]  # each group reads up to its own longest row
    # Close lengths: one more group would cost more than the padding it saves.
    assert length_groups([300, 290, 280, 270]) == [(0, 4, 300)]
    # Any order: rows appended after kept ones form their own group when that pays.
    assert length_groups([100, 500, 90]) == [(0, 3, 500)]
    assert length_groups([500, 490, 480, 60, 50]) == [(0, 3, 500), (3, 5, 60)]
    assert length_groups([60, 50, 500, 490]) == [(0, 2, 60), (2, 4, 500)]
    assert length_groups([]) == []
    for n in (1, 5, 33):
        lens = sorted(range(64, 64 + 17 * n, 17), reverse=True)
        groups = length_groups(lens)
        assert groups[0][0] == 0 and groups[-1][1] == n  # contiguous cover of every row
        assert all(a[1] == b[0] for a, b in pairwise(groups))
        assert all(m == max(lens[start:end]) for start, end, m in groups)


def test_keys_past_a_row_end_are_finite_though_the_buffer_is_not_zeroed():
    """Masked-off keys are read with weight 0: they must never be NaN/inf garbage, however
    far the window grows past what the last rebuild gathered."""
    layers, kvh, d, bs = 1, 1, 4, 4
    pool = torch.randn(layers, 2, 8, bs, kvh, d)
    cache = DecodeKVCache(layers, kvh, d, torch.float32, torch.device("cpu"), 1 << 20)
    seqs, tables = [object(), object()], torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0]])
    lens = [6, 2]
    for step in range(8):
        assert cache.plan(seqs, lens)
        if step == 0:
            cache.buf.fill_(float("nan"))  # what uninitialised memory may hold
        slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)]
        flat = pool[0].view(2, -1, kvh, d)
        width = -(-max(lens) // bs)  # the runner pads tables to the longest row's blocks
        kc, vc = cache.layer_kv(0, pool[0], tables[:, :width], flat[0, slots], flat[1, slots],
                                bs)
        assert kc.shape[2] == max(lens)
        assert torch.isfinite(kc).all() and torch.isfinite(vc).all()
        q = torch.randn(2, kvh, d)
        out = dense_decode_attention(q, kc, vc, cache.bias, d ** -0.5)
        assert torch.isfinite(out).all()
        lens = [n + 1 for n in lens]
    assert cache.num_rebuilds == 1
    assert max(lens) - 1 > 2 * bs  # the window grew well past the 8 columns rebuilt at first


def test_grouped_attention_equals_one_group():
    torch.manual_seed(2)
    b, kvh, g, d, s = 6, 2, 3, 8, 40
    lens = torch.tensor([40, 37, 30, 12, 9, 3])
    k, v = torch.randn(b, kvh, s, d), torch.randn(b, kvh, s, d)
    q = torch.randn(b, kvh * g, d)
    bias = torch.zeros(b, 1, 1, s).masked_fill_(
        (torch.arange(s)[None, :] >= lens[:, None])[:, None, None, :], float("-inf"))
    whole = dense_decode_attention(q, k, v, bias, 0.3)
    ref = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=bias, scale=0.3,
                                         enable_gqa=True).squeeze(2)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-6)
    for start, end, n in length_groups(lens.tolist()):
        part = dense_decode_attention(q[start:end], k[start:end, :, :n], v[start:end, :, :n],
                                      bias[start:end, ..., :n], 0.3)
        torch.testing.assert_close(part, whole[start:end], rtol=1e-5, atol=1e-6)


def test_a_longer_newcomer_leaves_no_garbage_in_the_kept_rows():
    layers, kvh, d, bs = 1, 1, 4, 4
    pool = torch.randn(layers, 2, 12, bs, kvh, d)
    cache = DecodeKVCache(layers, kvh, d, torch.float32, torch.device("cpu"), 1 << 20)
    tables = torch.tensor([[1, 2, 3, 4, 0], [5, 0, 0, 0, 0], [6, 7, 8, 9, 10]])

    def step(seqs, lens, poison=False):
        assert cache.plan(seqs, lens)
        if poison:  # all but what this and the next steps gather or append is garbage
            cache.buf.fill_(float("nan"))
        width = -(-max(lens) // bs)
        slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)]
        flat = pool[0].view(2, -1, kvh, d)
        return cache.layer_kv(0, pool[0], tables[:len(lens), :width], flat[0, slots],
                              flat[1, slots], bs)

    seqs = [object(), object()]
    step(seqs, [5, 2], poison=True)  # rebuild: gathers columns [0, 8) of both rows
    step(seqs, [6, 3])
    kc, vc = step([*seqs, object()], [7, 4, 19])  # the newcomer widens the window to 19
    assert cache.num_extends == 1
    assert torch.isfinite(kc).all() and torch.isfinite(vc).all()
    for b, n in enumerate([7, 4, 19]):
        ref = pool[0][:, tables[b]].flatten(1, 2)[:, :n].transpose(1, 2)
        assert torch.equal(kc[b, :, :n], ref[0]) and torch.equal(vc[b, :, :n], ref[1])


def test_a_leave_moves_the_last_row_into_its_place_and_keeps_appending():
    torch.manual_seed(3)
    layers, kvh, d, bs = 2, 2, 8, 4
    pool = torch.randn(layers, 2, 16, bs, kvh, d)
    cache = DecodeKVCache(layers, kvh, d, torch.float32, torch.device("cpu"), 1 << 20)
    table_of = {}
    seqs = [object() for _ in range(4)]
    for i, s in enumerate(seqs):
        table_of[id(s)] = [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]
    lens_of = {id(s): n for s, n in zip(seqs, [9, 7, 5, 3], strict=True)}

    def step(batch):
        batch = [it[0] for it in cache.arrange(
            [(s, lens_of[id(s)]) for s in batch], seq=lambda it: it[0],
            context_len=lambda it: it[1], order=lambda it: -it[1])]
        lens = [lens_of[id(s)] for s in batch]
        width = -(-max(lens) // bs)
        tables = torch.tensor([table_of[id(s)][:width] for s in batch])
        assert cache.plan(batch, lens)
        for layer in range(layers):
            slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs
                     for b, n in enumerate(lens)]
            flat = pool[layer].view(2, -1, kvh, d)
            kc, vc = cache.layer_kv(layer, pool[layer], tables, flat[0, slots], flat[1, slots],
                                    bs)
            for b, n in enumerate(lens):
                ref = pool[layer][:, tables[b]].flatten(1, 2)[:, :n].transpose(1, 2)
                assert torch.equal(kc[b, :, :n], ref[0]) and torch.equal(vc[b, :, :n], ref[1])
        for s in batch:
            lens_of[id(s)] += 1
        return batch

    assert step(seqs) == seqs  # rebuild, sorted longest first
    assert step(seqs[1:]) == [seqs[3], seqs[1], seqs[2]]  # the last row fills row 0
    assert step(seqs[1:]) == [seqs[3], seqs[1], seqs[2]]  # and the order holds
    assert (cache.num_rebuilds, cache.num_moved_rows) == (1, 1)


def test_plan_keeps_rows_given_in_any_order():
    """plan() alone (without arrange) may be handed held rows swapped: still exact."""
    torch.manual_seed(4)
    layers, kvh, d, bs = 1, 1, 4, 4
    pool = torch.randn(layers, 2, 8, bs, kvh, d)
    cache = DecodeKVCache(layers, kvh, d, torch.float32, torch.device("cpu"), 1 << 20)
    a, b = object(), object()
    tables = {id(a): [1, 2, 3], id(b): [4, 5, 6]}
    for seqs, lens in (([a, b], [5, 3]), ([b, a], [4, 6])):
        width = -(-max(lens) // bs)
        tab = torch.tensor([tables[id(s)][:width] for s in seqs])
        assert cache.plan(seqs, lens)
        slots = [int(tab[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(lens)]
        flat = pool[0].view(2, -1, kvh, d)
        kc, _ = cache.layer_kv(0, pool[0], tab, flat[0, slots], flat[1, slots], bs)
        for i, n in enumerate(lens):
            assert torch.equal(kc[i, :, :n], pool[0][0, tab[i]].flatten(0, 1)[:n].transpose(0, 1))
    assert (cache.num_rebuilds, cache.num_moved_rows) == (1, 2)
