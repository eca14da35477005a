"""Prefix-aware hand-off in the simulator: decode workers pin the prompt blocks they hold (only
the rest is charged as transfer), routing follows the prefix (the live router's affinity
function), and pins always come back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from slaq.gpu_workers import router
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.engine.cost_model import get_profile
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.platform import affinity, decisions
from slaq.sim import simulator as simulator_module
from slaq.sim.simulator import SimConfig, SimResult, Simulator
from slaq.sim.traces import MOONCAKE_BLOCK_TOKENS, Trace, TraceRequest
from slaq.sim.worker import Handoff, SimWorker

BLOCK = 16  # the profile's KV block size
SUB = MOONCAKE_BLOCK_TOKENS // BLOCK  # engine blocks per trace hash id


def conversations(num_conv: int = 4, turns: int = 3, gap_s: float = 3.0,
                  tier: str = "default") -> Trace:
    """Turn ``t`` (0-based) of conversation ``c`` has hash ids ``c*100 .. c*100 + 2t + 1``:
    its prompt starts with the whole previous turn's prompt (prompts are whole 512-token
    hash blocks, so no partial block makes them diverge). Turns are ``gap_s`` apart, so each
    one finished before the next arrives."""
    reqs = []
    for t in range(turns):
        for c in range(num_conv):
            ids = tuple(range(c * 100, c * 100 + 2 * t + 2))
            reqs.append(TraceRequest(t * gap_s + 0.05 * c, len(ids) * MOONCAKE_BLOCK_TOKENS,
                                     20, tier=tier, hash_ids=ids))
    return Trace("chat", tuple(reqs))


def run(trace: Trace, **kw) -> tuple[Simulator, SimResult]:
    """1 prefill + 3 decode workers under slaq (weighted random routing)."""
    sim = Simulator(SimConfig(trace=trace, policy="slaq", num_gpus=4, num_prefill=1, **kw))
    return sim, sim.run()


def check_clean(sim: Simulator) -> None:
    for w in sim.workers:
        w.block_manager.check_integrity()
        w.scheduler.check_integrity()
        assert not w.block_manager.pinned_keys(), f"{w.name} still pins blocks"
        assert not w.pending and not w.scheduler.has_unfinished()


def by_conversation(res: SimResult, num_conv: int) -> list[list[str | None]]:
    """Decode worker of each turn, per conversation."""
    recs = sorted(res.records, key=lambda r: r.arrival_s)
    return [[r.decode_worker for r in recs[c::num_conv]] for c in range(num_conv)]


def test_reuse_moves_only_the_blocks_the_decode_worker_lacks():
    trace = conversations()
    (on, res_on), (off, res_off) = run(trace), run(trace, prefix_handoff=False)
    for sim, res in ((on, res_on), (off, res_off)):
        check_clean(sim)
        assert all(r.finish_s is not None for r in res.records)
    h_on, h_off = res_on.handoffs, res_off.handoffs
    prompt_blocks = [r.num_prompt_tokens // BLOCK for r in trace.requests]
    assert h_on.num_handoffs == h_off.num_handoffs == len(trace)
    assert h_on.blocks == h_off.blocks == sum(prompt_blocks)
    assert h_off.blocks_moved == h_off.blocks
    # Every later turn found its whole previous prompt (2 hash ids shorter) where it went.
    saved = sum(b - 2 * SUB for b, r in zip(prompt_blocks, trace.requests, strict=True)
                if len(r.hash_ids) > 2)
    assert saved > 0 and h_on.blocks_moved == h_on.blocks - saved < h_off.blocks_moved
    # The block managers' own hand-off counters agree with the simulator's.
    dec = on.decoders
    assert sum(w.block_manager.num_handoff_blocks for w in dec) == h_on.blocks
    assert (sum(w.block_manager.num_handoff_reused_blocks for w in dec)
            == h_on.blocks - h_on.blocks_moved)
    assert sum(w.num_pins_dropped for w in dec) == 0
    # ...and heartbeats carry them, as a live decode worker's do.
    beats = [w.heartbeat(on.now) for w in dec]
    assert sum(hb.num_handoff_blocks_reused for hb in beats) == h_on.blocks - h_on.blocks_moved
    assert any(hb.prefix_hashes for hb in beats)


def test_affinity_sends_each_turn_to_the_worker_holding_the_previous_one():
    trace = conversations()
    (_, on), (_, off) = run(trace), run(trace, prefix_handoff=False)
    placed_on = by_conversation(on, 4)
    for workers in placed_on:
        assert None not in workers and len(set(workers)) == 1, placed_on
    # Without affinity the weighted choice spreads turns (so the check above can fail).
    placed_off = by_conversation(off, 4)
    assert any(len(set(w)) > 1 for w in placed_off), placed_off
    assert on.handoffs.num_affinity_routed > 0
    assert off.handoffs.num_affinity_routed == 0
    # The conversations themselves are spread over the decode workers, not piled on one.
    assert len({w[0] for w in placed_on}) > 1


def test_simulator_and_live_router_call_the_same_affinity_function(monkeypatch):
    assert router.choose_affine_worker is affinity.choose_affine_worker
    assert router.choose_decode_worker is simulator_module.choose_decode_worker
    assert simulator_module.choose_decode_worker is decisions.choose_decode_worker
    calls = []
    real = affinity.choose_affine_worker

    def spy(*args, **kwargs):
        calls.append(args[5])  # the prompt's chain hashes
        return real(*args, **kwargs)

    monkeypatch.setattr(affinity, "choose_affine_worker", spy)
    trace = conversations()
    _, res = run(trace)
    assert len(calls) == res.handoffs.num_handoffs == len(trace)
    # In hand-off order, which here is arrival order (turns far apart, equal prompts per turn).
    assert [len(h) for h in calls] == [r.num_prompt_tokens // BLOCK for r in trace.requests]


def test_pins_of_hand_offs_cut_off_by_the_horizon_are_released(monkeypatch):
    # A slow link: the second turn's transfer is still in flight when the run stops.
    base = get_profile("llama-8b-h100")
    slow = replace(base, hardware=replace(base.hardware, link_bandwidth=2e6))
    reqs = [*conversations(1, 2, gap_s=200.0).requests,
            TraceRequest(200.5, 64, 2, hash_ids=(999,))]
    released = []
    real = SimWorker.release_pins

    def spy(self):
        n = real(self)
        released.append(n)
        return n

    monkeypatch.setattr(SimWorker, "release_pins", spy)
    sim = Simulator(SimConfig(trace=Trace("cut", tuple(reqs)), policy="slaq", num_gpus=2,
                              num_prefill=1, profile=slow, max_drain_s=1.0))
    res = sim.run()
    assert sum(released) == 2 * SUB  # the first turn's prompt, pinned for the second
    assert res.records[1].finish_s is None  # lost to the horizon
    for w in sim.workers:
        w.block_manager.check_integrity()
        assert not w.block_manager.pinned_keys()


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_head_blocked_by_pins_of_waiting_hand_offs_gets_them_back(in_flight):
    w = small_worker(24)
    bm = w.block_manager
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    p1, p2 = list(range(1000, 1096)), list(range(2000, 2096))  # 6 blocks each
    for name, prompt in (("warm1", p1), ("warm2", p2)):  # cache them, as finished turns do
        seq = Sequence(name, prompt, params, output_token_ids=[1])
        bm.allocate_prefilled(seq, len(prompt))
        bm.free(seq)
    head = Sequence("head", list(range(5000, 5240)), params, output_token_ids=[1])  # 16 blocks
    w.pending.append(Handoff(head, "prefill-0", 0.0))
    for rid, prefix in (("h2", p1), ("h3", p2)):  # 19 blocks each, 6 of them pinned
        prompt = prefix + list(range(9000 + len(rid) * 500, 9000 + len(rid) * 500 + 200))
        assert w.reserve_prefix(rid, prompt) == 6
        w.pending.append(Handoff(Sequence(rid, prompt, params, output_token_ids=[1]),
                                 "prefill-0", 0.0))
    if in_flight:  # a transfer still on its way pins too: its arrival may unblock the head
        assert w.reserve_prefix("coming", p1 + [7] * 16) == 6
    # 12 blocks pinned, 12 free: the head needs 16, either one behind it 13.
    admitted = w.admit_pending()
    if in_flight:
        assert admitted == [] and w.num_pins_dropped == 0 and len(w.pending) == 3
        assert w.release_prefix("coming") == 6
        admitted = w.admit_pending()
    assert [h.seq.request_id for h in admitted] == ["head"]
    assert w.num_pins_dropped == 12 and not bm.pinned_keys()
    bm.check_integrity()
    w.scheduler.check_integrity()
    assert [h.seq.request_id for h in w.pending] == ["h2", "h3"]


def small_worker(num_blocks: int) -> SimWorker:
    """A decode SimWorker whose KV pool holds ``num_blocks`` blocks."""
    p = get_profile("llama-8b-h100")
    per_block = p.model.kv_bytes_per_token * p.block_size
    hw = p.hardware
    room = hw.memory_bytes * hw.num_devices * p.memory_util - p.model.weight_bytes
    small = replace(p, activation_bytes=room - (num_blocks + 0.5) * per_block)
    assert small.num_kv_blocks == num_blocks
    return SimWorker("decode-0", "decode", small,
                     SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                                     max_model_len=4096))


def test_cli_switch_compares_with_and_without_in_one_invocation(tmp_path):
    from click.testing import CliRunner

    from slaq.sim.cli import sim

    trace = tmp_path / "chat.jsonl"
    rows = [{"timestamp": int(r.arrival_s * 1000), "input_length": r.num_prompt_tokens,
             "output_length": r.num_output_tokens, "hash_ids": list(r.hash_ids)}
            for r in conversations(6, 4, gap_s=20.0).requests]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["compare", "--trace", str(trace), "--gpus", "4", "--load", "0.1"]
    out = CliRunner().invoke(sim, [*args, "--runs", "slaq,slaq-noprefix",
                                   "--out", str(tmp_path / "both")])
    assert out.exit_code == 0, out.output
    assert "KV blocks moved/hand-off" in out.output
    runs = {r["name"]: r for r in json.loads(
        next((tmp_path / "both").glob("*.json")).read_text())["runs"]}
    on, off = runs["slaq"], runs["slaq-noprefix"]
    assert (on["prefix_handoff"], off["prefix_handoff"]) == (True, False)
    assert on["num_handoffs"] == off["num_handoffs"] == len(rows)
    assert on["kv_blocks_moved_per_handoff"] < off["kv_blocks_moved_per_handoff"]
    assert off["kv_blocks_moved_per_handoff"] == off["kv_blocks_per_handoff"]
    # The switch turns it off for every run of an invocation.
    out = CliRunner().invoke(sim, [*args, "--runs", "slaq", "--no-prefix-handoff",
                                   "--out", str(tmp_path / "off")])
    assert out.exit_code == 0, out.output
    data = json.loads(next((tmp_path / "off").glob("*.json")).read_text())
    assert data["prefix_handoff"] is False
    assert data["runs"][0]["kv_blocks_moved_per_handoff"] == off["kv_blocks_moved_per_handoff"]
    bad = CliRunner().invoke(sim, [*args, "--runs", "slaq-nope", "--out", str(tmp_path)])
    assert bad.exit_code != 0


def test_waiting_hand_offs_pull_while_the_worker_has_ticket_seats():
    """A live decode worker runs one ticket per engine seat; a ticket pulls the KV (ending
    the prefill worker's lease) at once and then waits for blocks. 8 seats here."""
    w = small_worker(12)  # room for 3 of these hand-offs (4 blocks each)
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def handoff(rid: str) -> Handoff:
        return Handoff(Sequence(rid, list(range(60)), params, output_token_ids=[1]),
                       "prefill-0", 0.0)

    w.pending.extend(handoff(f"h{i}") for i in range(10))
    admitted = w.admit_pending()
    assert [h.seq.request_id for h in admitted] == ["h0", "h1", "h2"]  # KV for 3
    pulled = w.take_pulls()  # 3 running + 5 pulled and waiting = the 8 seats
    assert [h.seq.request_id for h in pulled] == ["h3", "h4", "h5", "h6", "h7"]
    assert w.take_pulls() == []  # idempotent: nothing new until a seat frees
    assert [h.pulled for h in w.pending] == [True] * 5 + [False] * 2
    w.scheduler.finish("h0", "stop")  # a running request ends: one seat for the next ticket
    assert [h.seq.request_id for h in w.take_pulls()] == ["h8"]
    w.scheduler.check_integrity()


def test_a_decode_worker_never_stalls_on_pins_a_waiting_sequence_lacks():
    """The review's repro: a preempted rank-1 sequence lacks exactly the blocks pinned for a
    rank-2 hand-off while nothing runs. The worker admits the hand-off (the waiting one then
    preempts it) instead of waiting for room nothing will free."""
    w = small_worker(8)
    bm = w.block_manager
    bs = bm.block_size
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    warm = list(range(1000, 1000 + 2 * bs))
    s = Sequence("warm", warm, params, output_token_ids=[1])
    bm.allocate_prefilled(s, len(warm))
    bm.free(s)  # two cached blocks
    p = Sequence("P", list(range(3000, 3000 + 6 * bs - 1)), params, rank=1,
                 output_token_ids=[1])
    w.pending.append(Handoff(p, "prefill-0", 0.0))
    assert [h.seq.request_id for h in w.admit_pending()] == ["P"]
    prompt_h = [*warm, 5]
    assert w.reserve_prefix("H", prompt_h) == 2
    for _ in range(4):  # P grows into a 7th block, which only the pins could give
        if w.scheduler.num_running == 0:
            break
        if w.start_step() is not None:  # None: the step's only decode preempted itself
            w.finish_step()
    assert w.scheduler.num_running == 0 and w.scheduler.num_waiting == 1
    w.pending.append(Handoff(Sequence("H", prompt_h, params, rank=2, output_token_ids=[1]),
                             "prefill-0", 0.0))
    progressed = False
    for _ in range(5):
        admitted = w.admit_pending()
        if admitted or w.start_step() is not None:
            progressed = True
            break
    assert progressed


def test_preempted_sequences_keep_their_decode_seats():
    """Live, a preempted request's ticket still holds its seat in the decode worker's pool:
    the simulated worker pulls only for the seats left."""
    w = small_worker(64)  # 8 seats
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i in range(3):  # as preempted ones wait: in the scheduler, not running
        w.scheduler.add(Sequence(f"w{i}", [7, 8, 9], params))
    for i in range(8):
        w.pending.append(Handoff(Sequence(f"h{i}", [1, 2, 3], params, output_token_ids=[1]),
                                 "prefill-0", 0.0))
    assert len(w.take_pulls()) == 5
    assert w.take_pulls() == []
