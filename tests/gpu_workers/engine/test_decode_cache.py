"""The CPU decode K/V copy (decode_cache) against the pool-gathering path it replaces."""

from __future__ import annotations

import torch

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.decode_cache import DecodeKVCache
from slaq.gpu_workers.engine.model_runner import ModelRunner
from slaq.gpu_workers.engine.outputs import ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.testing import engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
BS = 4


def _runner(path, dense: bool) -> ModelRunner:
    r = ModelRunner(engine_config(path, num_blocks=160, block_size=BS))
    if not dense:
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
    dense = _runner(tiny_model_path, dense=True)
    gather = _runner(tiny_model_path, dense=False)
    assert dense.decode_kv is not None
    ours = _staggered(dense, tiny_prompts, 12)
    assert ours == _staggered(gather, tiny_prompts, 12)
    # Most steps continued the same batch; only membership changes rebuilt it.
    assert 0 < dense.decode_kv.num_rebuilds < 12 + len(tiny_prompts)


def test_appends_match_a_fresh_gather():
    torch.manual_seed(0)
    layers, kvh, d, bs = 2, 2, 8, 4
    pool = torch.randn(layers, 2, 12, bs, kvh, d)
    cache = DecodeKVCache(layers, kvh, d, torch.float32, torch.device("cpu"), 1 << 20)
    seqs, tables = [object(), object()], torch.tensor([[3, 7, 1], [5, 0, 0]])
    for lens in ([9, 2], [10, 3], [11, 4]):
        assert cache.plan(seqs, lens)
        for layer in range(layers):
            slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)]
            flat = pool[layer].view(2, -1, kvh, d)
            k, v = flat[0, slots], flat[1, slots]
            kc, vc = cache.layer_kv(layer, pool[layer], tables, k, v, bs)
            for b, n in enumerate(lens):
                ref = pool[layer][:, tables[b]].flatten(1, 2)[:, :n].transpose(1, 2)
                assert torch.equal(kc[b, :, :n], ref[0]) and torch.equal(vc[b, :, :n], ref[1])
    assert cache.num_rebuilds == 1
    assert not cache.plan([object()], [10 ** 6])  # over the byte budget: caller gathers
