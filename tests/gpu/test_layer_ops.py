"""Fused (torch.compile) layer ops on CUDA: the same math as the eager ones."""

from __future__ import annotations

import pytest
import torch

from slaq.gpu_workers.engine.models.layer_ops import EAGER_OPS, compiled_ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 128])
def test_compiled_ops_match_eager(dtype, num_tokens):
    fused = compiled_ops()
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2,
                                                                       "rtol": 2e-2}
    x, res, w = rand(num_tokens, 256), rand(num_tokens, 256), rand(256)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), EAGER_OPS.rms_norm(x, w, 1e-5), **tol)
    for got, want in zip(fused.add_rms_norm(x, res, w, 1e-5),
                         EAGER_OPS.add_rms_norm(x, res, w, 1e-5), strict=True):
        torch.testing.assert_close(got, want, **tol)
    gate_up = rand(num_tokens, 512)
    torch.testing.assert_close(fused.silu_mul(gate_up.clone()),
                               EAGER_OPS.silu_mul(gate_up.clone()), **tol)
    qk, cos, sin = rand(num_tokens, 6, 64), rand(num_tokens, 1, 64), rand(num_tokens, 1, 64)
    torch.testing.assert_close(fused.rotary(qk, cos, sin), EAGER_OPS.rotary(qk, cos, sin),
                               **tol)


def test_graphs_capture_with_fused_ops_and_prefill_stays_eager(tiny_model_path):
    from slaq.gpu_workers.engine.config import SamplingParams
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.testing import TINY_PROMPTS, engine_config

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fused = LLMEngine(engine_config(tiny_model_path, device="cuda", max_num_seqs=4))
    plain = LLMEngine(engine_config(tiny_model_path, device="cuda", max_num_seqs=4,
                                    fuse_layer_ops=False))
    assert fused.runner.model.ops is EAGER_OPS  # restored after capture
    prompts = [fused.tokenizer.encode(p) for p in TINY_PROMPTS[:4]]
    got = [c.token_ids for c in fused.generate(prompts, params)]
    assert got == [c.token_ids for c in plain.generate(prompts, params)]
