"""Our engine against HF transformers: first-step logits (fp32, 1e-3) and greedy tokens.

The tiny random model runs in every test run (untied, tied embeddings, and llama3 RoPE
scaling); the real SmolLM2-135M-Instruct, pulled through the model store, is ``slow``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.loader import apply_chat_template, load_model_config
from slaq.gpu_workers.engine.models.llama import rope_inv_freq
from slaq.gpu_workers.engine.testing import (
    hf_causal_lm,
    hf_greedy,
    last_token_logits,
    make_tiny_model,
)

NUM_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _check_parity(eng, hf, prompts: list[list[int]]) -> None:
    for prompt in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].float()
        ours = last_token_logits(eng.runner, prompt)
        assert (ours - ref).abs().max().item() < 1e-3
    ours_tokens = [c.token_ids for c in eng.generate(prompts, GREEDY)]
    assert ours_tokens == [hf_greedy(hf, p, NUM_TOKENS) for p in prompts]


def test_tiny_model_matches_hf(make_engine, tiny_hf, tiny_prompts):
    _check_parity(make_engine(), tiny_hf, tiny_prompts)


@pytest.mark.parametrize("variant", [
    {"tie_word_embeddings": True, "seed": 1},
    # Positions past the original 16 cross all three llama3 frequency bands.
    {"rope_scaling": LLAMA3_SCALING, "seed": 2},
], ids=["tied", "llama3-rope"])
def test_tiny_variants_match_hf(tmp_path, make_engine, tiny_prompts, variant):
    seed = variant.pop("seed")
    path = make_tiny_model(tmp_path / "variant", seed=seed, **variant)
    if "rope_scaling" in variant:  # the scaling must really change the frequencies
        scaled = rope_inv_freq(load_model_config(path))[0]
        plain = rope_inv_freq(replace(load_model_config(path), rope_scaling=None))[0]
        assert torch.allclose(scaled[-1], plain[-1] / 8) and scaled[0] < plain[0]
    _check_parity(make_engine(path), hf_causal_lm(path), tiny_prompts)


@pytest.fixture(scope="module")
def smol_engine(smollm2_path):
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.testing import engine_config

    eng = LLMEngine(engine_config(smollm2_path, num_blocks=256, block_size=16))
    yield eng
    eng.close()


@pytest.mark.slow
def test_smollm2_matches_hf(smol_engine, smollm2_path):
    tok = smol_engine.tokenizer
    prompts = [apply_chat_template(tok, [{"role": "user", "content": c}]) for c in CHATS]
    _check_parity(smol_engine, hf_causal_lm(smollm2_path), prompts)


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smol_engine):
    prompt = apply_chat_template(smol_engine.tokenizer,
                                 [{"role": "user", "content": CHATS[0]}])
    [c] = smol_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32))
    assert c.text == "The capital of France is Paris."
    assert c.finish_reason == "stop" and c.token_ids[-1] == 2  # <|im_end|>
