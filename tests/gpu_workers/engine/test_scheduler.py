"""Scheduler: continuous batching, chunked prefill, preemption, finishing rules, leases.

The runner is simulated: the sampled token depends only on (request, position), so a
sequence recomputed after preemption produces the same tokens as one never preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.engine.outputs import RunnerOutput, SchedulerOutput
from slaq.gpu_workers.engine.scheduler import PREFILL_DONE, NoRoomError, Scheduler
from slaq.gpu_workers.engine.sequence import PLACEHOLDER_TOKEN_ID, Sequence, SequenceStatus

BS = 4
EOS = 2


def fake_token(seq: Sequence) -> int:
    """Deterministic 'sampled' token for the next position of ``seq`` (never EOS)."""
    return 10 + (sum(map(ord, seq.request_id)) * 31 + seq.num_tokens * 7) % 1000


def make_sched(
    num_blocks: int = 32,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    chunked: bool = True,
    prefix_caching: bool = True,
    preempt_for_priority: bool = True,
) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
    )
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
    return Scheduler(cfg, bm, preempt_for_priority=preempt_for_priority)


def make_seq(
    request_id: str,
    num_prompt: int = 6,
    max_tokens: int = 4,
    rank: int = 1,
    arrival: float = 0.0,
    prompt: list[int] | None = None,
    prefill_only: bool = False,
    **params: object,
) -> Sequence:
    # Distinct prompts per request id unless given: no accidental prefix sharing.
    base = 2000 + sum(map(ord, request_id)) * 37 % 5000
    token_ids = prompt if prompt is not None else [base + i for i in range(num_prompt)]
    return Sequence(
        request_id,
        token_ids,
        SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        rank=rank,
        arrival_time=arrival,
        prefill_only=prefill_only,
    )


@dataclass
class Run:
    outputs: list[SchedulerOutput] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


def step(
    sched: Scheduler,
    token_fn=fake_token,
    eos: int | None = EOS,
) -> tuple[SchedulerOutput, list[Sequence]]:
    """One engine step with a fake runner; checks every invariant afterwards."""
    out = sched.schedule()
    cfg = sched.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert len({s.seq.request_id for s in out.scheduled}) == len(out.scheduled)
    bs = sched.block_manager.block_size
    for item in out.scheduled:
        seq = item.seq
        assert item.num_new_tokens > 0
        assert item.start == seq.num_computed_tokens
        assert len(seq.block_table) * bs >= item.start + item.num_new_tokens, "no KV slots"
    sched.check_integrity()
    sampled = {s.seq.request_id: token_fn(s.seq) for s in out.scheduled if s.sample}
    finished = sched.update(out, RunnerOutput(sampled_token_ids=sampled), eos)
    sched.check_integrity()
    return out, finished


def run_all(sched: Scheduler, max_steps: int = 500, **kwargs: object) -> Run:
    run = Run()
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return run
        out, finished = step(sched, **kwargs)  # type: ignore[arg-type]
        run.outputs.append(out)
        run.finished.extend(finished)
    raise AssertionError("did not finish: livelock?")


def test_requests_run_to_max_tokens_and_free_everything() -> None:
    sched = make_sched()
    for i in range(3):
        sched.add(make_seq(f"r{i}", num_prompt=5 + i, max_tokens=4))
    run = run_all(sched)
    assert sorted(s.request_id for s in run.finished) == ["r0", "r1", "r2"]
    for seq in run.finished:
        assert seq.finish_reason == "length" and seq.num_output_tokens == 4
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
    first = run.outputs[0]
    # (``sample`` is evaluated against the sequence's current length: check starts instead.)
    assert [(s.start, s.num_new_tokens) for s in first.scheduled] == [(0, 5), (0, 6), (0, 7)]
    assert len(run.outputs) == 4  # one prefill step, then three decode steps
    assert sched.block_manager.num_used_blocks == 0
    assert (sched.num_running, sched.num_waiting) == (0, 0)
    assert sched.last_batch_size == 3 and sched.max_batch_size_seen == 3


def test_chunked_prefill_splits_a_long_prompt_and_decodes_go_first() -> None:
    sched = make_sched(max_num_batched_tokens=8)
    sched.add(make_seq("short", num_prompt=3, max_tokens=10, arrival=0.0))
    out, _ = step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("short", 3)]
    sched.add(make_seq("long", num_prompt=20, max_tokens=2, arrival=1.0))
    chunks = []
    while True:
        out, _ = step(sched)
        assert out.scheduled[0].seq.request_id == "short"  # the decode comes first
        assert out.scheduled[0].num_new_tokens == 1
        (item,) = [s for s in out.scheduled if s.seq.request_id == "long"]
        done = item.start + item.num_new_tokens == 20
        chunks.append((item.start, item.num_new_tokens, done))
        if done:
            break
    # 7 tokens of budget left per step after the decode: 7 + 7 + 6.
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    assert out.num_decodes == 1 and out.num_batched_tokens == 7
    long_seq = sched.get("long")
    assert long_seq is not None and long_seq.num_output_tokens == 1


def test_without_chunking_a_prefill_runs_whole_or_waits() -> None:
    sched = make_sched(max_num_batched_tokens=10, chunked=False)
    sched.add(make_seq("a", num_prompt=6, max_tokens=5))
    sched.add(make_seq("b", num_prompt=8, max_tokens=5))
    out, _ = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a"]  # b does not fit in 4 tokens
    out, _ = step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 8)]
    with pytest.raises(ValueError):
        sched.add(make_seq("c", num_prompt=11))


def test_waiting_order_is_rank_then_arrival() -> None:
    sched = make_sched(max_num_seqs=1)
    sched.add(make_seq("batch", rank=3, arrival=0.0, max_tokens=1))
    sched.add(make_seq("default-late", rank=1, arrival=5.0, max_tokens=1))
    sched.add(make_seq("default-early", rank=1, arrival=2.0, max_tokens=1))
    sched.add(make_seq("priority", rank=0, arrival=9.0, max_tokens=1))
    run = run_all(sched, max_steps=10)
    assert [s.request_id for s in run.finished] == [
        "priority",
        "default-early",
        "default-late",
        "batch",
    ]


def test_max_num_seqs_limits_the_batch() -> None:
    sched = make_sched(max_num_seqs=2)
    for i in range(5):
        sched.add(make_seq(f"r{i}", max_tokens=3, arrival=float(i)))
    run = run_all(sched)
    assert max(len(o.scheduled) for o in run.outputs) == 2
    assert sched.max_batch_size_seen == 2
    assert len(run.finished) == 5


def test_decode_preemption_picks_least_important_tier_then_most_recent() -> None:
    # 7 blocks: three prompts of 8 tokens take 2 blocks each; the first decode needs a third.
    sched = make_sched(num_blocks=7, preempt_for_priority=False)
    sched.add(make_seq("vip", num_prompt=8, rank=0, arrival=2.0, max_tokens=20))
    sched.add(make_seq("flex-old", num_prompt=8, rank=2, arrival=0.0, max_tokens=20))
    sched.add(make_seq("flex-new", num_prompt=8, rank=2, arrival=1.0, max_tokens=20))
    step(sched)  # all three prefilled, 6 blocks used
    out, _ = step(sched)
    # vip takes the last free block; flex-old needs one: the victim is flex-new.
    assert out.preempted_ids == ["flex-new"]
    assert [s.seq.request_id for s in out.scheduled] == ["vip", "flex-old"]
    victim = sched.get("flex-new")
    assert victim is not None and victim.status is SequenceStatus.WAITING
    assert victim.num_computed_tokens == 0 and victim.num_output_tokens == 1
    assert victim.num_preemptions == 1 and sched.num_preemptions == 1
    # Continuing, flex-old is the next victim once vip needs another block.
    preempted = []
    for _ in range(8):
        out, _ = step(sched)
        preempted += out.preempted_ids
    assert preempted[0] == "flex-old"
    assert "vip" not in preempted


def test_a_sequence_preempts_itself_when_it_is_the_least_important() -> None:
    sched = make_sched(num_blocks=4, preempt_for_priority=False)
    sched.add(make_seq("vip", num_prompt=8, rank=0, arrival=5.0, max_tokens=20))
    sched.add(make_seq("low", num_prompt=4, rank=3, arrival=0.0, max_tokens=20))
    step(sched)  # 3 blocks used: vip 2, low 1
    out, _ = step(sched)  # vip takes the 4th block; low needs one and is the victim itself
    assert out.preempted_ids == ["low"]
    assert [s.seq.request_id for s in out.scheduled] == ["vip"]


def test_every_request_finishes_under_a_too_small_pool() -> None:
    def workload() -> list[Sequence]:
        return [
            make_seq(f"r{i}", num_prompt=5 + i % 3, max_tokens=12, rank=i % 4, arrival=float(i))
            for i in range(8)
        ]

    roomy = make_sched(num_blocks=64)
    tight = make_sched(num_blocks=8)  # 32 slots; each request needs up to 5 blocks
    for seq in workload():
        roomy.add(seq)
    for seq in workload():
        tight.add(seq)
    expected = {s.request_id: s.output_token_ids for s in run_all(roomy).finished}
    run = run_all(tight, max_steps=2000)
    assert tight.num_preemptions > 0 and roomy.num_preemptions == 0
    assert {s.request_id: s.output_token_ids for s in run.finished} == expected
    assert all(s.finish_reason == "length" for s in run.finished)
    assert tight.block_manager.num_used_blocks == 0


def test_recompute_reuses_the_prefix_cache() -> None:
    sched = make_sched(num_blocks=6, preempt_for_priority=False)
    sched.add(make_seq("a", num_prompt=8, rank=0, max_tokens=30, arrival=0.0))
    sched.add(make_seq("b", num_prompt=8, rank=1, max_tokens=30, arrival=1.0))
    preempted: list[str] = []
    while not preempted:
        out, _ = step(sched)
        preempted = out.preempted_ids
    assert preempted == ["b"]
    # b's full blocks went to the evictable cache; when it comes back they are hits.
    bm = sched.block_manager
    hits_before = bm.num_prefix_hit_tokens
    sched.abort("a")
    out, _ = step(sched)
    b = out.scheduled[0].seq
    assert b.request_id == "b" and out.scheduled[0].start > 0
    assert bm.num_prefix_hit_tokens > hits_before


def test_a_lone_sequence_that_outgrows_the_pool_finishes_with_length() -> None:
    sched = make_sched(num_blocks=2, max_model_len=100)
    sched.add(make_seq("a", num_prompt=6, max_tokens=50))
    run = run_all(sched, max_steps=20)
    (seq,) = run.finished
    # 8 KV slots: tokens 0..7 computed, the 9th token sampled, no room to decode it.
    assert seq.finish_reason == "length" and seq.num_tokens == 9
    assert sched.num_preemptions == 0


def test_add_rejects_what_could_never_run() -> None:
    sched = make_sched(num_blocks=2, max_model_len=16)
    with pytest.raises(ValueError):
        sched.add(make_seq("big", num_prompt=9))  # 3 blocks > pool
    with pytest.raises(ValueError):
        make_sched(max_model_len=8).add(make_seq("long", num_prompt=8))
    sched.add(make_seq("ok", num_prompt=4))
    with pytest.raises(ValueError):
        sched.add(make_seq("ok", num_prompt=4))


def test_eos_stops_unless_ignore_eos() -> None:
    def eos_at_third(seq: Sequence) -> int:
        return EOS if seq.num_output_tokens == 2 else fake_token(seq)

    sched = make_sched()
    sched.add(make_seq("stops", max_tokens=10))
    sched.add(make_seq("ignores", max_tokens=10, ignore_eos=True))
    run = run_all(sched, token_fn=eos_at_third)
    by_id = {s.request_id: s for s in run.finished}
    assert by_id["stops"].finish_reason == "stop"
    assert by_id["stops"].output_token_ids[-1] == EOS and by_id["stops"].num_output_tokens == 3
    assert by_id["ignores"].finish_reason == "length"
    assert by_id["ignores"].num_output_tokens == 10


def test_several_eos_ids_and_stop_token_ids() -> None:
    sched = make_sched()
    sched.add(make_seq("eos-list", max_tokens=10))
    sched.add(make_seq("stop-id", max_tokens=10, stop_token_ids=(555,), ignore_eos=True))

    def tokens(seq: Sequence) -> int:
        if seq.num_output_tokens == 1:
            return 7 if seq.request_id == "eos-list" else 555
        return fake_token(seq)

    run = run_all(sched, token_fn=tokens, eos=None)
    by_id = {s.request_id: s for s in run.finished}
    assert by_id["eos-list"].finish_reason == "length"  # eos=None: no EOS at all
    assert by_id["stop-id"].finish_reason == "stop"
    sched = make_sched()
    sched.add(make_seq("eos-list", max_tokens=10))
    sched.add(make_seq("stop-id", max_tokens=10, stop_token_ids=(555,), ignore_eos=True))
    run = Run()
    while sched.has_unfinished():
        out = sched.schedule()
        sampled = {s.seq.request_id: tokens(s.seq) for s in out.scheduled if s.sample}
        run.finished += sched.update(out, RunnerOutput(sampled), [2, 7])
        sched.check_integrity()
    assert {s.request_id: (s.finish_reason, s.num_output_tokens) for s in run.finished} == {
        "eos-list": ("stop", 2),
        "stop-id": ("stop", 2),
    }


def test_max_model_len_finishes_with_length() -> None:
    sched = make_sched(max_model_len=10)
    sched.add(make_seq("a", num_prompt=6, max_tokens=100))
    (seq,) = run_all(sched).finished
    assert seq.finish_reason == "length" and seq.num_tokens == 10


def test_abort_and_finish_free_blocks_wherever_the_sequence_is() -> None:
    sched = make_sched(max_num_seqs=1)
    sched.add(make_seq("running", max_tokens=10))
    sched.add(make_seq("waiting", max_tokens=10))
    step(sched)
    assert sched.block_manager.num_used_blocks > 0
    waiting = sched.abort("waiting")
    assert waiting is not None and waiting.finish_reason == "abort"
    running = sched.finish("running", "stop")
    assert running is not None and running.finish_reason == "stop"
    assert sched.abort("running") is None and sched.abort("nobody") is None
    sched.check_integrity()
    assert sched.block_manager.num_used_blocks == 0
    assert not sched.has_unfinished()


def test_abort_between_schedule_and_update_is_ignored_by_update() -> None:
    sched = make_sched()
    sched.add(make_seq("a"))
    out = sched.schedule()
    sched.abort("a")
    assert sched.update(out, RunnerOutput({"a": 5}), EOS) == []
    sched.check_integrity()


def test_prefill_only_keeps_its_blocks_until_the_lease_is_freed() -> None:
    sched = make_sched()
    sched.add(make_seq("p", num_prompt=9, max_tokens=16, prefill_only=True))
    out, finished = step(sched)
    (seq,) = finished
    assert seq.finish_reason == PREFILL_DONE and seq.num_output_tokens == 1
    assert sched.leased("p") is seq and sched.num_leased == 1 and sched.num_leased_blocks == 3
    assert len(seq.block_table) == 3 and sched.block_manager.num_used_blocks == 3
    assert not sched.has_unfinished()
    out, finished = step(sched)
    assert out.is_empty and finished == []
    assert sched.free_leased("p") is seq and sched.free_leased("p") is None
    sched.check_integrity()
    assert sched.block_manager.num_used_blocks == 0


def test_prefill_only_that_is_already_done_frees_at_once() -> None:
    sched = make_sched()
    sched.add(make_seq("one", max_tokens=1, prefill_only=True))
    _, finished = step(sched)
    assert finished[0].finish_reason == "length" and sched.num_leased == 0
    assert sched.block_manager.num_used_blocks == 0


def test_a_stop_string_on_a_leased_sequence_releases_it() -> None:
    sched = make_sched()
    sched.add(make_seq("p", max_tokens=16, prefill_only=True))
    step(sched)
    seq = sched.finish("p", "stop")
    assert seq is not None and seq.finish_reason == "stop"
    assert sched.num_leased == 0 and sched.block_manager.num_used_blocks == 0


def test_prefill_then_decode_elsewhere_gives_the_same_tokens() -> None:
    aggregated = make_sched()
    aggregated.add(make_seq("r", num_prompt=10, max_tokens=6))
    (expected,) = run_all(aggregated).finished

    prefill = make_sched()
    prefill.add(make_seq("r", num_prompt=10, max_tokens=6, prefill_only=True))
    _, (prefilled,) = step(prefill)
    decode = make_sched()
    moved = make_seq("r", num_prompt=10, max_tokens=6)
    moved.append_token(prefilled.output_token_ids[0])
    assert decode.can_add_prefilled(moved)
    blocks = decode.add_prefilled(moved, num_cached_tokens=4)
    assert len(blocks) == 3  # KV of the 10 prompt tokens
    assert moved.block_table[:3] == blocks and moved.num_computed_tokens == 10
    assert moved.num_cached_tokens == 4
    decode.check_integrity()
    prefill.free_leased("r")
    out, _ = step(decode)
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(10, 1)]
    run = run_all(decode)
    assert run.finished[0].output_token_ids == expected.output_token_ids


def test_add_prefilled_refuses_without_room_or_work() -> None:
    sched = make_sched(num_blocks=4)
    sched.add_prefilled(_handoff("busy", 7, 4))  # 2 blocks
    seq = make_seq("r", num_prompt=8, max_tokens=4)
    seq.append_token(5)  # 9 tokens: 3 blocks, 2 free: it may wait
    assert not sched.can_add_prefilled(seq)
    with pytest.raises(NoRoomError):
        sched.add_prefilled(seq)
    bigger = make_seq("big", num_prompt=16, max_tokens=4)
    bigger.append_token(5)  # 17 tokens: 5 blocks, more than the pool: it never fits
    with pytest.raises(ValueError, match="more KV blocks than the pool"):
        sched.add_prefilled(bigger)
    done = make_seq("done", num_prompt=3, max_tokens=1)
    done.append_token(5)
    with pytest.raises(ValueError):
        sched.add_prefilled(done)
    with pytest.raises(ValueError):
        sched.add_prefilled(make_seq("no-token", num_prompt=3))
    sched.check_integrity()


def test_waiting_priority_preempts_a_less_important_running_sequence() -> None:
    sched = make_sched(num_blocks=6)
    for i in range(3):
        sched.add(make_seq(f"batch{i}", num_prompt=7, rank=3, arrival=float(i), max_tokens=3))
    step(sched)  # 6 blocks in use; the next decodes still fit in them
    sched.add(make_seq("vip", num_prompt=5, rank=0, arrival=10.0, max_tokens=3))
    out, _ = step(sched)
    ids = [s.seq.request_id for s in out.scheduled]
    assert out.preempted_ids == ["batch2"]  # the most recent of the lowest tier
    assert ids == ["batch0", "batch1", "vip"]
    assert out.num_batched_tokens == 2 + 5  # batch2's decode was given back to the budget
    run = run_all(sched)
    assert {s.request_id for s in run.finished} == {"vip", "batch0", "batch1", "batch2"}


def test_waiting_priority_takes_a_seat_too() -> None:
    sched = make_sched(max_num_seqs=2)
    sched.add(make_seq("flex0", rank=2, arrival=0.0, max_tokens=5))
    sched.add(make_seq("flex1", rank=2, arrival=1.0, max_tokens=5))
    step(sched)
    sched.add(make_seq("vip", rank=0, arrival=2.0, max_tokens=5))
    sched.add(make_seq("flex2", rank=2, arrival=3.0, max_tokens=5))
    out, _ = step(sched)
    assert out.preempted_ids == ["flex1"]
    assert [s.seq.request_id for s in out.scheduled] == ["flex0", "vip"]
    assert out.num_batched_tokens == 1 + 6  # flex1's decode was given back to the budget


def test_same_rank_never_preempts_for_admission() -> None:
    sched = make_sched(max_num_seqs=1)
    sched.add(make_seq("a", rank=1, arrival=0.0, max_tokens=3))
    step(sched)
    sched.add(make_seq("b", rank=1, arrival=1.0, max_tokens=3))
    out, _ = step(sched)
    assert out.preempted_ids == [] and [s.seq.request_id for s in out.scheduled] == ["a"]


def test_no_pointless_preemption_when_victims_cannot_make_room() -> None:
    sched = make_sched(num_blocks=4)
    sched.add(make_seq("vip", num_prompt=8, rank=0, max_tokens=20))
    sched.add(make_seq("low", num_prompt=3, rank=3, max_tokens=2))
    step(sched)  # vip 2 blocks, low 1 block
    sched.add(make_seq("vip2", num_prompt=12, rank=0, arrival=1.0, max_tokens=2))
    out, _ = step(sched)
    # vip2 needs 3 blocks; preempting low frees only 1 of the 2 missing: leave it alone.
    assert out.preempted_ids == []
    assert sched.get("vip2") is not None and sched.get("vip2").status is SequenceStatus.WAITING


def test_prefix_cache_hits_show_in_num_cached_tokens() -> None:
    shared = list(range(500, 512))
    sched = make_sched()
    sched.add(make_seq("first", prompt=shared + [1, 2], max_tokens=2))
    run_all(sched)
    sched.add(make_seq("second", prompt=shared + [3, 4, 5], max_tokens=2))
    out, _ = step(sched)
    item = out.scheduled[0]
    assert (item.start, item.num_new_tokens) == (12, 3)
    assert item.seq.num_cached_tokens == 12
    bm = sched.block_manager
    assert bm.num_prefix_hit_tokens == 12
    assert bm.num_prefix_queries_tokens == 14 + 15


def test_scheduling_is_deterministic() -> None:
    def trace() -> list[tuple[list[tuple[str, int, int]], list[str]]]:
        sched = make_sched(num_blocks=10, max_num_batched_tokens=12, max_num_seqs=4)
        for i in range(10):
            sched.add(make_seq(f"r{i}", num_prompt=3 + i, rank=i % 3, arrival=i / 2, max_tokens=6))
        run = run_all(sched, max_steps=1000)
        return [
            ([(s.seq.request_id, s.start, s.num_new_tokens) for s in o.scheduled], o.preempted_ids)
            for o in run.outputs
        ]

    assert trace() == trace()


def test_out_of_order_arrivals_are_sorted_within_a_rank() -> None:
    sched = make_sched(max_num_seqs=1)
    sched.add(make_seq("late", arrival=5.0, max_tokens=1))
    sched.add(make_seq("early", arrival=1.0, max_tokens=1))
    sched.add(make_seq("middle", arrival=3.0, max_tokens=1))
    run = run_all(sched)
    assert [s.request_id for s in run.finished] == ["early", "middle", "late"]


def _random_workload(seed: int) -> list[tuple[int, Sequence]]:
    """(step to add it at, sequence): shared system prompts, mixed tiers and lengths."""
    import random

    rng = random.Random(seed)
    systems = [[7000 + 10 * k + i for i in range(rng.randint(4, 12))] for k in range(3)]
    workload = []
    for i in range(30):
        tail = [rng.randint(100, 999) for _ in range(rng.randint(1, 10))]
        prompt = (rng.choice(systems) if rng.random() < 0.6 else []) + tail
        seq = make_seq(
            f"r{i}",
            prompt=prompt,
            max_tokens=rng.randint(1, 14),
            rank=rng.randint(0, 3),
            arrival=float(i),
            ignore_eos=True,
        )
        workload.append((rng.randint(0, 40), seq))
    return workload


def _run_workload(sched: Scheduler, seed: int | list[tuple[int, Sequence]],
                  abort_ids: set[str], token_fn=fake_token) -> dict[str, Sequence]:
    """Synchronous steps over a timed workload (a seed of :func:`_random_workload`, or the
    workload itself); the finished sequences by request id."""
    pending = _random_workload(seed) if isinstance(seed, int) else list(seed)
    abort_at = {seq.request_id: n + 2 for n, seq in pending if seq.request_id in abort_ids}
    finished: dict[str, Sequence] = {}
    for n in range(3000):
        for _, seq in [p for p in pending if p[0] == n]:
            sched.add(seq)
        pending = [p for p in pending if p[0] != n]
        for rid in [r for r, at in abort_at.items() if at == n]:
            seq = sched.abort(rid)
            if seq is not None:
                finished[rid] = seq
        if not pending and not sched.has_unfinished():
            return finished
        _, done = step(sched, token_fn=token_fn)
        finished.update((s.request_id, s) for s in done)
    raise AssertionError("did not finish: livelock?")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("num_blocks", "budget", "max_num_seqs"), [(7, 6, 3), (10, 16, 8), (16, 5, 2)]
)
def test_random_workloads_finish_with_the_same_tokens_as_a_roomy_pool(
    seed: int, num_blocks: int, budget: int, max_num_seqs: int
) -> None:
    roomy = _run_workload(make_sched(num_blocks=256, max_num_batched_tokens=256), seed, set())
    sched = make_sched(
        num_blocks=num_blocks, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs
    )
    aborted = {"r3", "r17"}
    got = _run_workload(sched, seed, aborted)
    assert set(got) == set(roomy)
    for rid, seq in got.items():
        if seq.finish_reason == "abort":
            assert rid in aborted
            continue
        expected = roomy[rid].output_token_ids
        if seq.finish_reason == "length" and seq.num_output_tokens < len(expected):
            # Only a sequence that outgrew the whole pool may stop short.
            assert seq.num_tokens > num_blocks * BS
        assert seq.output_token_ids == expected[: seq.num_output_tokens]
    assert sched.block_manager.num_used_blocks == 0
    bm = sched.block_manager
    assert bm.num_prefix_hit_tokens <= bm.num_prefix_queries_tokens


def test_leases_hold_blocks_until_released_then_waiting_work_runs() -> None:
    sched = make_sched(num_blocks=4)
    sched.add(make_seq("p0", num_prompt=8, max_tokens=8, prefill_only=True))
    sched.add(make_seq("p1", num_prompt=8, max_tokens=8, prefill_only=True))
    step(sched)
    assert sched.num_leased == 2 and sched.block_manager.num_free_blocks == 0
    sched.add(make_seq("next", num_prompt=5, max_tokens=2))
    for _ in range(3):
        out, _ = step(sched)
        assert out.is_empty  # no room while the leases are held, and leases are never victims
    sched.free_leased("p0")
    run = run_all(sched)
    assert [s.request_id for s in run.finished] == ["next"]
    sched.free_leased("p1")
    sched.check_integrity()
    assert sched.block_manager.num_used_blocks == 0


def _prefill_items(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled]


def test_a_running_low_tier_prefill_yields_the_chunk_budget_to_a_waiting_higher_tier() -> None:
    sched = make_sched(num_blocks=32, max_num_batched_tokens=8)
    sched.add(make_seq("batch", num_prompt=40, rank=3, arrival=0.0, max_tokens=2))
    out, _ = step(sched)
    assert _prefill_items(out) == [("batch", 0, 8)]
    sched.add(make_seq("vip", num_prompt=5, rank=0, arrival=1.0, max_tokens=2))
    out, _ = step(sched)
    # vip is admitted first with its whole prompt; batch keeps only what is left.
    assert _prefill_items(out) == [("vip", 0, 5), ("batch", 8, 3)]
    assert out.preempted_ids == []  # yielding is not preempting: batch keeps its blocks
    out, done = step(sched)
    assert _prefill_items(out) == [("vip", 5, 1), ("batch", 11, 7)]
    assert [s.request_id for s in done] == ["vip"]
    run = run_all(sched)
    assert [s.request_id for s in run.finished] == ["batch"]
    assert sched.block_manager.num_used_blocks == 0


def test_prefills_and_admissions_interleave_by_rank() -> None:
    sched = make_sched(num_blocks=64, max_num_batched_tokens=8)
    sched.add(make_seq("flex", num_prompt=30, rank=2, arrival=0.0, max_tokens=2))
    out, _ = step(sched)
    assert _prefill_items(out) == [("flex", 0, 8)]
    sched.add(make_seq("prio", num_prompt=12, rank=0, arrival=1.0, max_tokens=2))
    out, _ = step(sched)
    assert _prefill_items(out) == [("prio", 0, 8)]  # flex yields the whole budget
    sched.add(make_seq("default", num_prompt=3, rank=1, arrival=2.0, max_tokens=2))
    out, _ = step(sched)
    # Running prio (rank 0), then waiting default (rank 1), then running flex (rank 2).
    assert _prefill_items(out) == [("prio", 8, 4), ("default", 0, 3), ("flex", 8, 1)]
    run = run_all(sched)
    assert {s.request_id for s in run.finished} == {"flex", "prio", "default"}
    assert sched.block_manager.num_used_blocks == 0


def test_within_a_rank_the_shortest_remaining_prefill_goes_first() -> None:
    sched = make_sched(num_blocks=64, max_num_batched_tokens=8)
    sched.add(make_seq("long", num_prompt=40, rank=0, arrival=0.0, max_tokens=2))
    step(sched)
    sched.add(make_seq("short", num_prompt=5, rank=0, arrival=1.0, max_tokens=2))
    out, _ = step(sched)
    # 32 tokens left of "long" vs 5 of the waiting "short": short first, long gets the rest.
    assert _prefill_items(out) == [("short", 0, 5), ("long", 8, 3)]
    sched.add(make_seq("tie", num_prompt=29, rank=0, arrival=2.0, max_tokens=2))
    out, _ = step(sched)
    # short decodes; long (29 left) and the waiting tie (29) are equal: the running one first.
    assert _prefill_items(out) == [("short", 5, 1), ("long", 11, 7)]
    run = run_all(sched)
    assert {s.request_id for s in run.finished} >= {"long", "tie"}
    assert sched.block_manager.num_used_blocks == 0


def test_running_prefills_of_one_rank_share_the_budget_shortest_first() -> None:
    sched = make_sched(num_blocks=64, max_num_batched_tokens=16)
    sched.add(make_seq("a", num_prompt=30, rank=1, arrival=0.0, max_tokens=2))
    sched.add(make_seq("b", num_prompt=12, rank=1, arrival=1.0, max_tokens=2))
    out, _ = step(sched)
    assert _prefill_items(out) == [("a", 0, 16)]  # b waits: no budget left at admission
    out, _ = step(sched)
    # a has 14 left, b 12 (waiting): b is shorter and goes first.
    assert _prefill_items(out) == [("b", 0, 12), ("a", 16, 4)]


def test_a_yielded_prefill_takes_the_budget_when_the_waiting_head_does_not_fit() -> None:
    sched = make_sched(num_blocks=12, max_num_batched_tokens=8, preempt_for_priority=False)
    sched.add(make_seq("batch", num_prompt=40, rank=3, arrival=0.0, max_tokens=2))
    step(sched)  # batch holds 10 of the 12 blocks
    sched.add(make_seq("vip", num_prompt=12, rank=0, arrival=1.0, max_tokens=2))
    out, _ = step(sched)
    # vip needs 3 blocks and may not preempt: batch's prefill is not held back for nothing.
    assert _prefill_items(out) == [("batch", 8, 8)]
    vip = sched.get("vip")
    assert vip is not None and vip.status is SequenceStatus.WAITING
    run = run_all(sched)
    assert {s.request_id for s in run.finished} == {"batch", "vip"}
    assert sched.block_manager.num_used_blocks == 0


def _handoff(request_id: str, num_prompt: int, max_tokens: int, rank: int = 1) -> Sequence:
    """A prefilled sequence as a decode worker receives it: prompt plus its first token."""
    seq = make_seq(request_id, num_prompt=num_prompt, max_tokens=max_tokens, rank=rank)
    seq.append_token(fake_token(seq))
    return seq


def _alone(seq: Sequence) -> list[int]:
    """The tokens ``seq`` gets decoded on a roomy pool of its own (a fresh copy)."""
    sched = make_sched(num_blocks=64)
    sched.add_prefilled(_handoff(seq.request_id, seq.num_prompt_tokens, seq.params.max_tokens,
                                 seq.rank))
    (done,) = run_all(sched).finished
    return done.output_token_ids


def test_a_hand_off_preempts_less_important_running_sequences_for_room() -> None:
    sched = make_sched(num_blocks=8, max_num_seqs=4)
    low = _handoff("low", 15, 8, rank=3)  # 4 blocks now, 6 at the end
    mid = _handoff("mid", 7, 4, rank=1)  # 2 blocks
    for seq in (low, mid):
        sched.add_prefilled(seq)
    step(sched)
    urgent = _handoff("urgent", 11, 4, rank=0)  # 3 blocks: only low's can make them
    assert not sched.can_add_prefilled(urgent)
    sched.add_prefilled(urgent)
    sched.check_integrity()
    assert sched.num_preemptions == 1 and low.status is SequenceStatus.WAITING
    assert mid.status is SequenceStatus.RUNNING  # just enough victims, least important first
    run = run_all(sched)
    for seq in (low, mid, urgent):  # the victim recomputes: same tokens as alone
        assert seq.output_token_ids == _alone(seq)
    assert {s.request_id for s in run.finished} == {"low", "mid", "urgent"}


def test_a_hand_off_preempts_no_equal_tier_and_nothing_in_vain() -> None:
    sched = make_sched(num_blocks=6, max_num_seqs=4)
    sched.add_prefilled(_handoff("a", 15, 4, rank=1))  # 4 blocks
    sched.add_prefilled(_handoff("b", 3, 4, rank=2))  # 1 block; 1 left free
    same = _handoff("same", 11, 4, rank=1)  # 3 blocks: b's would not do, a is its tier
    with pytest.raises(NoRoomError):
        sched.add_prefilled(same)
    assert sched.num_preemptions == 0 and sched.num_running == 2
    higher = _handoff("higher", 11, 4, rank=0)  # a and b together make the room
    sched.add_prefilled(higher)
    assert sched.num_preemptions == 2 and sched.num_waiting == 2
    sched.check_integrity()


def test_a_hand_off_waits_behind_a_more_important_preempted_sequence() -> None:
    sched = make_sched(num_blocks=8, max_num_seqs=4)
    sched.add_prefilled(_handoff("flex", 15, 8, rank=2))  # 4 blocks
    sched.add_prefilled(_handoff("default", 7, 8, rank=1))  # 2 blocks
    sched.add_prefilled(_handoff("priority", 7, 4, rank=0))  # 2 blocks: the pool is full
    # default needs a block at token 9: it preempts flex (it cannot preempt priority)...
    for _ in range(3):
        step(sched)
    assert sched.num_preemptions >= 1 and sched.num_waiting == 1
    # ...and a batch hand-off must not overtake flex's recompute: flex would preempt it.
    batch = _handoff("batch", 3, 4, rank=3)
    assert not sched.can_add_prefilled(batch)
    flex_again = _handoff("flex2", 3, 4, rank=2)  # the same tier as the waiting one may go
    assert sched.can_add_prefilled(flex_again) == (sched.block_manager.num_free_blocks >= 1)


def test_a_hand_off_whose_pins_a_waiting_sequence_lacks_is_admitted_when_nothing_runs() -> None:
    """With nothing running, deferring to a more important waiting sequence would wait for
    ever when the blocks it lacks are the ones pinned for the hand-off: the hand-off goes in,
    and the waiting one preempts it and runs (found in review: a live loop spun on it)."""
    sched = make_sched(num_blocks=8, max_num_seqs=4)
    bm = sched.block_manager
    warm = make_seq("warm", num_prompt=9, max_tokens=1, rank=2)
    sched.add(warm)
    run_all(sched)  # its two full blocks stay cached
    assert bm.pin_prefix("h", warm.prompt_token_ids) == 2
    p = _handoff("p", 23, 6, rank=1)  # 6 blocks: every unpinned one; 8 at its end
    sched.add_prefilled(p)
    for _ in range(4):  # p grows into a 7th block, which only the pins could give
        if sched.num_running == 0:
            break
        step(sched)
    assert sched.num_running == 0 and sched.num_waiting == 1  # it preempted itself
    assert bm.num_blocks_for(p.num_tokens) > bm.num_free_blocks  # the pins are what it lacks
    h = make_seq("h", prompt=list(warm.prompt_token_ids), max_tokens=4, rank=2)
    h.append_token(fake_token(h))
    assert sched.can_add_prefilled(h)
    sched.add_prefilled(h)
    run = run_all(sched)
    assert {s.request_id for s in run.finished} == {"p", "h"}
    assert p.output_token_ids == _alone(p) and h.status is SequenceStatus.FINISHED


def test_a_hand_off_behind_a_more_important_waiting_sequence_preempts_nothing() -> None:
    """Victims that could make its room are not taken: the waiting sequence would preempt
    the hand-off at the next step, so they would be preempted in vain."""
    sched = make_sched(num_blocks=8, max_num_seqs=4)
    sched.add_prefilled(_handoff("batch", 15, 8, rank=3))  # 4 blocks
    sched.add_prefilled(_handoff("default", 7, 8, rank=1))  # 2 blocks
    urgent = make_seq("urgent", num_prompt=11, max_tokens=4, rank=0)  # 3 blocks
    sched.add(urgent)
    sched.preempt_for_priority = False  # it waits (its admission would preempt batch)
    assert sched.num_waiting == 1
    sched.preempt_for_priority = True
    flex = _handoff("flex", 11, 4, rank=2)  # 3 blocks, 2 free: batch's would make its room
    with pytest.raises(NoRoomError):
        sched.add_prefilled(flex)
    assert sched.num_preemptions == 0 and sched.num_running == 2
    sched.check_integrity()


def test_a_hand_off_with_foreign_pins_preempts_nothing() -> None:
    sched = make_sched(num_blocks=8, max_num_seqs=4)
    bm = sched.block_manager
    warm = make_seq("warm", num_prompt=9, max_tokens=1, rank=2)
    sched.add(warm)
    run_all(sched)
    assert bm.pin_prefix("x", warm.prompt_token_ids) == 2
    sched.add_prefilled(_handoff("low", 15, 8, rank=3))  # 4 blocks: 2 free left
    x = _handoff("x", 19, 4, rank=0)  # another prompt under the pinned key: 3 more blocks
    with pytest.raises(ValueError, match="not its prompt prefix"):
        sched.add_prefilled(x)
    assert sched.num_preemptions == 0 and bm.num_pinned("x") == 0
    sched.check_integrity()


# -- asynchronous scheduling: advance() before a step's tokens are known, resolve() after ----


def eos_sometimes(seq: Sequence) -> int:
    """:func:`fake_token`, but EOS at about one position in nine (a function of the request
    and position only, so every schedule gives the same tokens)."""
    if (sum(map(ord, seq.request_id)) * 13 + seq.num_tokens * 5) % 9 == 0:
        return EOS
    return fake_token(seq)


def _run_ahead(sched: Scheduler, workload: list[tuple[int, Sequence]],
               token_fn=eos_sometimes) -> dict[str, Sequence]:
    """Drive ``sched`` as the engine does under asynchronous scheduling: step N+1 is
    scheduled (and its tokens 'sampled') before step N's tokens are resolved."""
    pending, finished = list(workload), {}
    inflight: tuple[SchedulerOutput, RunnerOutput, list[Sequence]] | None = None
    for n in range(3000):
        for _, seq in [p for p in pending if p[0] == n]:
            sched.add(seq)
        pending = [p for p in pending if p[0] != n]
        if not pending and not sched.has_unfinished() and inflight is None:
            return finished
        out = sched.schedule()
        sampled = {s.seq.request_id: token_fn(s.seq) for s in out.scheduled if s.sample}
        done: list[Sequence] = []
        if inflight is not None:
            prev_out, prev_tokens, early = inflight
            done += early + sched.resolve(prev_out, prev_tokens, EOS)
            inflight = None
        if out.is_empty:
            done += sched.update(out, RunnerOutput(), EOS)
        else:
            inflight = (out, RunnerOutput(sampled_token_ids=sampled), sched.advance(out))
        for seq in done:
            assert seq.request_id not in finished, "finished twice"
            finished[seq.request_id] = seq
        sched.check_integrity()
        for seq in sched.running:  # at most the one placeholder of the step in flight
            assert seq.output_token_ids[:-1].count(PLACEHOLDER_TOKEN_ID) == 0
    raise AssertionError("did not finish: livelock?")


def _eos_workload(seed: int) -> list[tuple[int, Sequence]]:
    workload = _random_workload(seed)
    for _, seq in workload:
        seq.params = replace(seq.params, ignore_eos=False)
    return workload


def test_advance_holds_a_place_for_the_token_and_ends_by_length_at_once() -> None:
    sched = make_sched()
    sched.add(make_seq("a", num_prompt=5, max_tokens=2))
    out = sched.schedule()
    assert sched.advance(out) == []
    seq = out.scheduled[0].seq
    assert seq.output_token_ids == [PLACEHOLDER_TOKEN_ID] and seq.num_computed_tokens == 5
    out2 = sched.schedule()  # the decode of the token not known yet
    assert [(s.start, s.num_new_tokens) for s in out2.scheduled] == [(5, 1)]
    assert sched.resolve(out, RunnerOutput({"a": 77}), EOS) == []
    assert seq.output_token_ids == [77]
    # Its second token is its last: advance() ends it now, resolve() fills the token in.
    assert sched.advance(out2) == [seq] and seq.finish_reason == "length"
    assert sched.block_manager.num_used_blocks == 0 and sched.schedule().is_empty
    assert sched.resolve(out2, RunnerOutput({"a": EOS}), EOS) == []
    assert seq.output_token_ids == [77, EOS] and seq.finish_reason == "stop"  # as update()
    sched.check_integrity()


def test_resolve_ends_a_sequence_preempted_since_its_step_was_launched() -> None:
    sched = make_sched(num_blocks=3)
    sched.add(make_seq("low", num_prompt=8, max_tokens=8, rank=2))
    out = sched.schedule()
    sched.advance(out)  # low: 9 tokens in 3 blocks, its token still to come
    sched.add(make_seq("high", num_prompt=6, max_tokens=2, rank=0))
    out2 = sched.schedule()  # high preempts low, which holds a placeholder
    assert out2.preempted_ids == ["low"]
    low = out.scheduled[0].seq
    assert low.status is SequenceStatus.WAITING
    assert sched.resolve(out, RunnerOutput({"low": EOS}), EOS) == [low]
    assert low.finish_reason == "stop" and low.output_token_ids == [EOS]
    assert sched.num_waiting == 0
    sched.check_integrity()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("num_blocks", "budget", "max_num_seqs"), [(7, 6, 3), (16, 5, 2)])
def test_scheduling_ahead_gives_the_tokens_of_synchronous_steps(
    seed: int, num_blocks: int, budget: int, max_num_seqs: int
) -> None:
    roomy = make_sched(num_blocks=256, max_num_batched_tokens=256)
    expected = _run_workload(roomy, _eos_workload(seed), set(), token_fn=eos_sometimes)
    sched = make_sched(num_blocks=num_blocks, max_num_batched_tokens=budget,
                       max_num_seqs=max_num_seqs)
    got = _run_ahead(sched, _eos_workload(seed))
    assert set(got) == set(expected)
    assert any(s.finish_reason == "stop" for s in got.values())
    for rid, seq in got.items():
        want = expected[rid]
        if seq.finish_reason == "length" and seq.num_output_tokens < want.num_output_tokens:
            assert seq.num_tokens > num_blocks * BS  # only one that outgrew the whole pool
            assert seq.output_token_ids == want.output_token_ids[:seq.num_output_tokens]
            continue
        assert (seq.output_token_ids, seq.finish_reason) == (want.output_token_ids,
                                                             want.finish_reason)
    assert sched.block_manager.num_used_blocks == 0
    assert sched.num_preemptions > 0
