"""The sampler on fixed logits: greedy, filters, penalties, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.sampler import (
    Sampler,
    SampleRequest,
    apply_repetition_penalty,
    apply_top_k_top_p,
    greedy_argmax,
)

V = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _row(rid: str, history: tuple[int, ...] = (1,), **kw) -> SampleRequest:
    return SampleRequest(rid, SamplingParams(**kw), history)


def test_greedy_is_argmax():
    logits = _logits(4)
    out = Sampler(torch.device("cpu")).sample(logits, [_row(f"r{i}", temperature=0.0)
                                                       for i in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


@pytest.mark.parametrize("vocab", [50, 49152, 128256, 1000003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_argmax_equals_argmax(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=gen).to(dtype)
    # Ties: the maximum repeated within a chunk and across chunks; the first index must win.
    logits[1, [vocab // 3, vocab // 3 + 1, vocab - 1]] = 100.0
    logits[2] = 0.0
    assert greedy_argmax(logits).tolist() == logits.argmax(-1).tolist()
    assert greedy_argmax(logits)[2].item() == 0


def test_precomputed_greedy_ids_are_used_only_when_nothing_else_is_asked():
    logits = _logits(2)
    wrong = torch.tensor([7, 9])  # not the argmax: shows which path produced the tokens
    assert logits.argmax(-1).tolist() != wrong.tolist()
    greedy = [_row("a", temperature=0.0), _row("b", temperature=0.0)]
    out = Sampler(torch.device("cpu")).sample(logits, greedy, wrong)
    assert out.token_ids == [7, 9] and out.logprobs == [None, None]
    for extra in ({"logprobs": 2}, {"repetition_penalty": 1.3}, {"temperature": 0.7, "seed": 1}):
        rows = [_row("a", temperature=0.0), _row("b", **({"temperature": 0.0} | extra))]
        out = Sampler(torch.device("cpu")).sample(logits, rows, wrong)
        assert out.token_ids[0] == logits[0].argmax().item(), extra


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits(6, seed=1)
    rows = [_row("a", temperature=1.5, top_k=1), _row("b", temperature=1.0, top_p=1e-6)] * 3
    rows = [SampleRequest(f"{r.request_id}{i}", r.params, r.token_ids) for i, r in enumerate(rows)]
    for _ in range(5):
        out = Sampler(torch.device("cpu")).sample(logits, rows)
        assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    rows = [_row("k", top_k=2), _row("p", top_p=0.7)]
    masked = apply_top_k_top_p(logits, rows)
    assert torch.isfinite(masked[0]).tolist() == [True, True, False, False]
    # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: the nucleus is the first two tokens.
    assert torch.isfinite(masked[1]).tolist() == [True, True, False, False]
    assert torch.equal(masked[0, :2], logits[0, :2])


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = _logits(3, seed=2)
    histories = [(1, 5, 5, 9), (2,), (7, 8, 40, 41, 42, 7)]
    rows = [_row(f"r{i}", h, repetition_penalty=p)
            for i, (h, p) in enumerate(zip(histories, [1.3, 1.0, 0.8], strict=True))]
    ours = apply_repetition_penalty(logits, rows)
    for i, (h, p) in enumerate(zip(histories, [1.3, 1.0, 0.8], strict=True)):
        ref = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[i:i + 1].clone())
        assert torch.allclose(ours[i], ref[0])
    assert torch.equal(logits, _logits(3, seed=2)), "input logits must not be modified"


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = _logits(16, seed=3)
    target = 5
    alone = Sampler(torch.device("cpu"))
    row = _row("s", temperature=1.0, seed=1234)
    solo = [alone.sample(logits[target:target + 1], [row]).token_ids[0] for _ in range(8)]
    batched = Sampler(torch.device("cpu"))
    rows = [_row(f"o{i}", temperature=0.9, top_p=0.9) for i in range(16)]
    rows[target] = row
    together = [batched.sample(logits, rows).token_ids[target] for _ in range(8)]
    assert together == solo
    assert len(set(solo)) > 1, "a temperature-1 draw over 50 tokens should vary"
    # A new request with the same seed starts the same stream again.
    batched.forget("s")
    assert batched.sample(logits[target:target + 1], [row]).token_ids[0] == solo[0]


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(4000, 4)
    rows = [_row(f"r{i}", temperature=1.0, seed=i) for i in range(4000)]
    counts = torch.bincount(torch.tensor(Sampler(torch.device("cpu")).sample(logits, rows)
                                         .token_ids), minlength=4)
    freq = counts.float() / counts.sum()
    assert counts[3] == 0
    # 4000 draws: 5 standard errors of the largest cell is ~0.04.
    assert torch.allclose(freq[:3], probs[:3], atol=0.04), freq


def test_logprobs_are_the_model_distribution():
    logits = _logits(2, seed=4)
    rows = [_row("a", temperature=0.0, logprobs=3), _row("b", temperature=0.7, logprobs=0)]
    out = Sampler(torch.device("cpu")).sample(logits, rows)
    lp = torch.log_softmax(logits, -1)
    a = out.logprobs[0]
    assert a[0][0] == out.token_ids[0] and math.isclose(a[0][1], lp[0, a[0][0]].item(),
                                                        rel_tol=1e-5)
    assert [t for t, _ in a[1:]] == lp[0].topk(3).indices.tolist()
    b = out.logprobs[1]
    assert len(b) == 1 and b[0][0] == out.token_ids[1]
    assert math.isclose(b[0][1], lp[1, out.token_ids[1]].item(), rel_tol=1e-5)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0.0}, {"top_k": -1},
                                 {"repetition_penalty": 0.0}, {"logprobs": 21}])
def test_sampling_params_reject_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
