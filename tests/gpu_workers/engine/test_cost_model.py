"""The cost model's arithmetic, its calibration, and the SimRunner built on it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slaq.gpu_workers.engine.block_manager import BlockManager
from slaq.gpu_workers.engine.config import SamplingParams, SchedulerConfig
from slaq.gpu_workers.engine.cost_model import (
    PROFILES,
    StepSample,
    calibrate,
    calibrate_engine,
    get_profile,
)
from slaq.gpu_workers.engine.scheduler import Scheduler
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.sim_runner import SimRunner

H100 = get_profile("llama-8b-h100")


def test_llama_8b_h100_constants_follow_the_public_specs():
    m, hw = H100.model, H100.hardware
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16
    assert m.weight_bytes == pytest.approx(16.06e9)
    assert (hw.peak_flops, hw.hbm_bandwidth, hw.memory_bytes) == (989.4e12, 3.35e12, 80e9)
    free = 80e9 * 0.9 - 16.06e9 - 4e9
    assert H100.num_kv_blocks == int(free // (m.kv_bytes_per_token * 16))
    assert H100.kv_capacity_tokens > 300_000


def test_every_named_profile_has_room_for_a_kv_cache():
    assert {"llama-8b-h100", "llama-70b-h100x4", "smollm2-135m-cpu"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.num_kv_blocks > 0
    with pytest.raises(ValueError, match="known"):
        get_profile("gpt-5-on-a-toaster")


def test_decode_is_bandwidth_bound_and_prefill_compute_bound():
    m = H100.model
    one = H100.decode_step_time(1, 1000)
    expected = H100.overhead_s + (m.weight_bytes + m.kv_bytes_per_token * 1001) / (
        3.35e12 * H100.bw_eff)
    attn = 4 * 32 * 32 * 128 * 1 * (1000 + 0.5) / (989.4e12 * H100.attn_eff)
    assert one == pytest.approx(expected + attn)
    # A bigger decode batch costs little more: the weights are read once per step.
    assert H100.decode_step_time(64, 1000) < 2 * one
    prefill = H100.step_time([(0, 8192)])
    linear = 2 * m.num_params * 8192 / (989.4e12 * H100.mfu)
    assert prefill > linear  # plus overhead and the attention term
    assert prefill == pytest.approx(
        H100.overhead_s + linear + 4 * 32 * 32 * 128 * 8192 * 4096 / (989.4e12 * H100.attn_eff))


def test_step_time_grows_with_tokens_and_context():
    assert H100.step_time([]) == 0.0
    assert H100.step_time([(0, 2048)]) < H100.step_time([(0, 4096)])
    assert H100.step_time([(0, 2048)]) < H100.step_time([(30_000, 2048)])
    assert H100.prefill_time(20_000) > 2 * H100.prefill_time(10_000) * 0.99  # attention is O(n^2)
    assert H100.transfer_time(1000) == pytest.approx(1000 * 131072 / 450e9)


def test_tensor_parallel_profile_is_faster_per_token_than_its_size_alone_suggests():
    p70 = get_profile("llama-70b-h100x4")
    ratio = p70.prefill_time(4096) / H100.prefill_time(4096)
    assert 70.6 / 8.03 / 4 < ratio < 70.6 / 8.03  # 4 GPUs help, not perfectly (tp_eff)


def test_calibrate_recovers_the_coefficients_of_a_linear_engine():
    base = get_profile("smollm2-135m-cpu")
    truth = replace(base, overhead_s=0.004, mfu=0.2, attn_eff=0.1, bw_eff=0.25)
    m = base.model
    flops = base.hardware.peak_flops
    bw = base.hardware.hbm_bandwidth
    samples = []
    for chunks in ([(0, 16)], [(0, 256)], [(0, 1024)], [(512, 512)], [(100, 1)] * 8,
                   [(900, 1)] * 32, [(0, 64), (300, 1), (40, 1)], [(2000, 1)] * 4):
        n = sum(c[1] for c in chunks)
        ctx = sum(p + c for p, c in chunks)
        attn = sum(c * (p + c / 2) for p, c in chunks)
        t = (truth.overhead_s + 2 * m.num_params * n / (flops * truth.mfu)
             + 4 * m.num_layers * m.num_q_heads * m.head_dim * attn / (flops * truth.attn_eff)
             + (m.weight_bytes + m.kv_bytes_per_token * ctx) / (bw * truth.bw_eff))
        samples.append(StepSample(tuple(chunks), t))
    fitted = calibrate(base, samples, name="cpu-measured")
    assert fitted.name == "cpu-measured"
    assert fitted.overhead_s == pytest.approx(0.004, rel=1e-3)
    assert fitted.mfu == pytest.approx(0.2, rel=1e-3)
    assert fitted.attn_eff == pytest.approx(0.1, rel=1e-3)
    assert fitted.bw_eff == pytest.approx(0.25, rel=1e-3)
    assert not fitted.overlap  # it predicts with the same sum it was fitted with
    for s in samples:
        assert fitted.step_time(s.chunks) == pytest.approx(s.seconds, rel=1e-3)
    with pytest.raises(ValueError):
        calibrate(base, samples[:2])


def test_calibrate_pins_a_term_the_data_cannot_resolve():
    base = get_profile("smollm2-135m-cpu")
    m, flops = base.model, base.hardware.peak_flops
    samples = []
    for n, batch in ((16, 1), (256, 1), (1024, 1), (1, 8), (1, 32), (64, 4)):
        chunks = ((0, n),) * batch
        # An engine whose time is overhead plus compute only: no visible memory term.
        t = 0.01 + 2 * m.num_params * n * batch / (flops * 0.3)
        samples.append(StepSample(chunks, t))
    fitted = calibrate(base, samples)
    assert fitted.overhead_s >= 0 and fitted.bw_eff == 1.0
    for s in samples:
        assert fitted.step_time(s.chunks) > 0


def test_calibrate_engine_records_real_steps(tiny_model_path):
    from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model_path), device="cpu",
                                    cache=CacheConfig(num_blocks=256), use_cuda_graphs=False))
    runner = engine.runner
    profile, samples = calibrate_engine(engine, get_profile("smollm2-135m-cpu"),
                                        prompt_lens=(8, 32), batch_sizes=(1, 4), max_tokens=3)
    assert engine.runner is runner  # the recorder is taken off again
    assert len(samples) >= 4 * 3  # every request decodes a few steps
    assert any(any(n > 1 for _, n in s.chunks) for s in samples)  # prefill steps
    assert any(all(n == 1 for _, n in s.chunks) for s in samples)  # decode steps
    assert all(s.seconds > 0 for s in samples)
    for eff in (profile.mfu, profile.attn_eff, profile.bw_eff):
        assert 0 < eff <= 1
    assert profile.overhead_s >= 0


def test_sim_runner_samples_where_the_scheduler_asks_and_charges_the_model():
    bm = BlockManager(H100.num_kv_blocks, 16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8192, max_model_len=131072), bm)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    sched.add(Sequence("long", list(range(10_000)), params))
    sched.add(Sequence("short", list(range(20_000, 20_100)), params))
    runner = SimRunner(H100, filler_token_id=7)
    out = sched.schedule()
    res = runner.execute(out)
    # 8,192 tokens of "long" only: nothing completes its prompt yet, nothing is sampled.
    assert res.sampled_token_ids == {}
    assert runner.last_step_s == pytest.approx(H100.scheduler_step_time(out))
    sched.update(out, res, None)
    total = 0
    charged = runner.last_step_s
    while sched.has_unfinished():
        out = sched.schedule()
        res = runner.execute(out)
        charged += runner.last_step_s
        for item in out.scheduled:
            assert (item.seq.request_id in res.sampled_token_ids) == item.sample
        assert set(res.sampled_token_ids.values()) <= {7}
        total += len(sched.update(out, res, None))
    assert total == 2
    st = runner.stats
    assert st.num_prefill_tokens == 10_100
    assert st.num_decode_tokens == 2 * 2  # the tokens after each first one
    assert st.busy_s == pytest.approx(charged)
    assert st.busy_s > H100.prefill_time(10_000)
    with pytest.raises(ValueError):
        SimRunner(H100, time_scale=0)
