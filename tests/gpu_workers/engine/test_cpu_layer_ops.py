"""The C layer-op kernels (cpu_kernels/layer_ops.c) against the eager torch ops, and the
engine's choice between them."""

from __future__ import annotations

import pytest
import torch

from slaq.gpu_workers.engine.cpu_kernels import load_layer_ops
from slaq.gpu_workers.engine.models.layer_ops import EAGER_OPS, cpu_kernel_ops

KERNEL = load_layer_ops()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler: kernels not built")


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# 1 and 7 rows stay on one thread; 100 is split across OpenMP threads.
@pytest.mark.parametrize("rows", [1, 7, 100])
def test_norms_match_torch(rows):
    ops = cpu_kernel_ops()
    assert ops is not None
    x, res, w = _rand(rows, 576, seed=1), _rand(rows, 576, seed=2, scale=3.0), _rand(576, seed=3)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), EAGER_OPS.rms_norm(x, w, 1e-5),
                               rtol=2e-6, atol=2e-6)
    want_norm, want_res = EAGER_OPS.add_rms_norm(x, res.clone(), w, 1e-5)
    mine = res.clone()
    got_norm, got_res = ops.add_rms_norm(x, mine, w, 1e-5)
    # The sum is a plain fp32 add, so it is torch's bit for bit; it went into the residual.
    assert torch.equal(got_res, want_res)
    assert got_res.data_ptr() == mine.data_ptr()
    torch.testing.assert_close(got_norm, want_norm, rtol=2e-6, atol=2e-6)


def test_a_strided_norm_weight_is_copied_and_kept_for_the_call():
    x, res = _rand(4, 576, seed=10), _rand(4, 576, seed=11)
    w = _rand(2 * 576, seed=12)[::2]  # not contiguous: the wrapper must hold its copy
    want = EAGER_OPS.add_rms_norm(x, res.clone(), w, 1e-5)
    for got, exp in zip(KERNEL.add_rms_norm(x, res.clone(), w, 1e-5), want, strict=True):
        torch.testing.assert_close(got, exp, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(KERNEL.rms_norm(x, w, 1e-5), EAGER_OPS.rms_norm(x, w, 1e-5),
                               rtol=2e-6, atol=2e-6)


def test_add_rms_norm_takes_a_strided_input():
    x = _rand(5, 2 * 64, seed=4)[:, :64]  # rows 128 floats apart
    res, w = _rand(5, 64, seed=5), _rand(64, seed=6)
    want = EAGER_OPS.add_rms_norm(x, res.clone(), w, 1e-6)
    got = KERNEL.add_rms_norm(x, res.clone(), w, 1e-6)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=2e-6)


EXTREME_GATES = [0.0, -100.0, 100.0, -88.5, 30.0, -1e-30, 87.5, -86.9, -88.0]


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_silu_mul_matches_torch(rows):
    gate_up = _rand(rows, 2 * 1536, seed=rows, scale=4.0)
    # The ends of the exponential's range: SiLU tends to x above and to -0 below (from a
    # gate of -88.38 the kernel's e^-g is +inf; torch's from -88.72, a few 1e-37 apart).
    gate_up[0, :len(EXTREME_GATES)] = torch.tensor(EXTREME_GATES)
    torch.testing.assert_close(KERNEL.silu_mul(gate_up), EAGER_OPS.silu_mul(gate_up.clone()),
                               rtol=3e-6, atol=1e-35)


def test_silu_vector_lanes_and_scalar_tail_agree_bit_for_bit():
    # 1,541 gates a row: the vector loop covers the first 1,536, plain C the last 5.
    inter = 1541
    gate_up = _rand(2, 2 * inter, seed=9, scale=6.0)
    for col, value in enumerate(EXTREME_GATES[:5]):
        gate_up[:, col] = gate_up[:, 1536 + col] = value
    gate_up[:, inter:inter + 5] = gate_up[:, inter + 1536:]
    out = KERNEL.silu_mul(gate_up)
    assert torch.equal(out[:, :5], out[:, 1536:])


def test_silu_mul_keeps_nan_in_vector_lanes_and_tail():
    gate_up = torch.ones(1, 2 * 35)
    gate_up[0, 3] = gate_up[0, 33] = float("nan")  # a vector lane and the scalar tail
    out = KERNEL.silu_mul(gate_up)
    assert torch.isnan(out[0, 3]) and torch.isnan(out[0, 33])
    assert torch.isfinite(out[0, :3]).all() and torch.isfinite(out[0, 4:33]).all()


@pytest.mark.parametrize("tokens", [1, 9, 70])
def test_rotary_is_torch_bit_for_bit_on_a_view_of_qkv(tokens):
    heads, kv_heads, head_dim = 9, 3, 64
    qkv = _rand(tokens, heads + 2 * kv_heads, head_dim, seed=tokens)
    qk = qkv[:, :heads + kv_heads]  # what the attention layer rotates: strided tokens
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(7))
    angles = positions[:, None].float() * _rand(head_dim // 2, seed=8).abs()
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    got = KERNEL.rotary(qk, cos, sin)
    assert got.is_contiguous()
    assert torch.equal(got, EAGER_OPS.rotary(qk, cos, sin))


def test_wrong_inputs_are_refused():
    with pytest.raises(ValueError, match="fp32 CPU"):
        KERNEL.silu_mul(torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="shapes differ"):
        KERNEL.add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        KERNEL.rotary(torch.zeros(2, 3, 8), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))


def test_the_engine_uses_them_on_cpu_and_generates_the_same_tokens(tiny_model_path):
    from slaq.gpu_workers.engine.config import SamplingParams
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.testing import TINY_PROMPTS, engine_config

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    fused = LLMEngine(engine_config(tiny_model_path, max_num_seqs=4))
    plain = LLMEngine(engine_config(tiny_model_path, max_num_seqs=4, fuse_layer_ops=False))
    assert fused.runner.model.ops is not EAGER_OPS
    assert plain.runner.model.ops is EAGER_OPS
    prompts = [fused.tokenizer.encode(p) for p in TINY_PROMPTS[:4]]
    got = [c.token_ids for c in fused.generate(prompts, params)]
    assert got == [c.token_ids for c in plain.generate(prompts, params)]


def test_shapes_the_c_side_would_misread_are_refused():
    with pytest.raises(ValueError, match="odd width"):
        KERNEL.silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="norm weight"):
        KERNEL.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="norm weight"):
        KERNEL.rms_norm(torch.zeros(2, 8), torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        KERNEL.rotary(torch.zeros(2, 3, 8), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="norm weight"):
        KERNEL.rms_norm(torch.zeros(2, 8), torch.ones(1, 8), 1e-6)
    with pytest.raises(ValueError, match="take rows"):
        KERNEL.silu_mul(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="take rows"):
        KERNEL.rms_norm(torch.tensor(1.0), torch.ones(1), 1e-6)
    with pytest.raises(ValueError, match="rotary takes"):
        KERNEL.rotary(torch.zeros(2, 8), torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
