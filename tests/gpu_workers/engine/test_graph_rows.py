"""Short prefill chunks as decode-graph rows (``cuda_graphs.graph_rows``), on CPU.

The graph itself needs CUDA (tests/gpu); what is checked here is the layout of a step as rows
and the claim it rests on: one decode row per chunk token, each attending to its own context
length, is the chunk's causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.engine.cuda_graphs import graph_rows
from slaq.gpu_workers.engine.outputs import RunnerOutput
from slaq.gpu_workers.engine.paged_attention.reference import paged_decode_reference
from slaq.gpu_workers.engine.scheduler import Scheduler
from slaq.gpu_workers.engine.sequence import Sequence

BS = 4


def _scheduler() -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    return Scheduler(cfg, BlockManager(64, BS, enable_prefix_caching=True))


def _seq(rid: str, prompt: list[int], **params: object) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=8, ignore_eos=True, **params))


def _run(sched: Scheduler):
    out = sched.schedule()
    sampled = {s.seq.request_id: 7 for s in out.scheduled if s.sample}
    sched.update(out, RunnerOutput(sampled_token_ids=sampled), None)
    sched.check_integrity()
    return out


def test_a_mixed_step_becomes_one_row_per_token():
    sched = _scheduler()
    sched.add(_seq("a", list(range(100, 110))))
    _run(sched)  # "a" prefilled: decodes from now on
    sched.add(_seq("b", list(range(200, 206)), repetition_penalty=1.2))
    out = sched.schedule()
    rows = graph_rows(out.scheduled, BS, max_rows=64, max_context_reads=1000)
    assert rows is not None
    a, b = (next(s for s in out.scheduled if s.seq.request_id == r) for r in ("a", "b"))
    assert a.num_new_tokens == 1 and b.num_new_tokens == 6
    assert len(rows.token_ids) == 7
    # Rows follow the schedule's order; a decode is one row, b's chunk one row per token.
    order = [s.seq.request_id for s in out.scheduled for _ in range(s.num_new_tokens)]
    for i, rid in enumerate(order):
        seq = a.seq if rid == "a" else b.seq
        pos = rows.positions[i]
        assert rows.token_ids[i] == seq.token_id_at(pos)
        assert rows.slots[i] == seq.block_table[pos // BS] * BS + pos % BS
        assert rows.block_tables[i] == seq.block_table[:pos // BS + 1]
    assert [rows.positions[i] for i, r in enumerate(order) if r == "b"] == list(range(6))
    # Only each item's last row is sampled; the penalised request carries its history.
    assert [order[i] for i in rows.sample_indices] == [s.seq.request_id for s in out.scheduled]
    assert all(rows.positions[i] == s.start + s.num_new_tokens - 1
               for i, s in zip(rows.sample_indices, out.scheduled, strict=True))
    by_id = {r.request_id: r for r in rows.requests}
    assert list(by_id["b"].token_ids) == b.seq.token_ids and by_id["a"].token_ids == ()


def test_long_or_wide_steps_stay_on_the_eager_path():
    sched = _scheduler()
    sched.add(_seq("long", list(range(300, 340))))
    out = sched.schedule()
    # 40 rows reading 1 + 2 + ... + 40 = 820 context tokens.
    assert graph_rows(out.scheduled, BS, max_rows=64, max_context_reads=820) is not None
    assert graph_rows(out.scheduled, BS, max_rows=64, max_context_reads=819) is None
    assert graph_rows(out.scheduled, BS, max_rows=39, max_context_reads=10_000) is None


def test_a_non_final_chunk_samples_nothing():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=256)
    sched = Scheduler(cfg, BlockManager(64, BS, enable_prefix_caching=True))
    sched.add(_seq("c", list(range(400, 440))))
    out = sched.schedule()
    [item] = out.scheduled
    assert item.num_new_tokens == 16 and not item.sample
    rows = graph_rows(out.scheduled, BS, max_rows=64, max_context_reads=10_000)
    assert rows is not None and rows.sample_indices == [] and rows.requests == []


def test_rows_compute_the_chunks_causal_attention():
    """Row i of a chunk starting at ``start`` attends to ``start + i + 1`` tokens of the pool:
    the same as causal attention of the chunk's queries over prefix + chunk."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, start, chunk = 8, 2, 16, 10, 6
    num_blocks = 8
    pool = torch.randn(2, num_blocks, BS, kv_heads, dim, generator=gen)
    table = torch.tensor([5, 2, 7, 0], dtype=torch.int32)  # 16 slots, 16 tokens used
    q = torch.randn(chunk, heads, dim, generator=gen)
    lens = torch.arange(start + 1, start + chunk + 1)
    rows = paged_decode_reference(q, pool, table.expand(chunk, -1), lens, dim ** -0.5)

    n = start + chunk
    k = pool[0, table.long()].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, dim=1)
    v = pool[1, table.long()].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, dim=1)
    mask = torch.arange(n)[None, :] <= (start + torch.arange(chunk))[:, None]
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), attn_mask=mask)
    torch.testing.assert_close(rows, want.transpose(0, 1), rtol=1e-5, atol=1e-5)
