"""Decode CUDA graphs: the graph runner gives the eager runner's greedy tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from dataclasses import replace  # noqa: E402 - after the skips above

from slaq.gpu_workers.engine.config import SamplingParams  # noqa: E402
from slaq.gpu_workers.engine.cuda_graphs import CudaGraphModelRunner, bucket_sizes  # noqa: E402
from slaq.gpu_workers.engine.llm_engine import LLMEngine  # noqa: E402
from slaq.gpu_workers.engine.testing import (  # noqa: E402
    TINY_PROMPTS,
    engine_config,
    hf_causal_lm,
    hf_greedy,
)


def _graph_engine(path, **config) -> tuple[CudaGraphModelRunner, LLMEngine]:
    """An engine on the graph runner, over the tiny model on CUDA."""
    cfg = engine_config(path, device="cuda", **config)
    runner = CudaGraphModelRunner(cfg)
    return runner, LLMEngine(cfg, runner=runner)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(128)[-2:] == [96, 128]
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_graph_runner_matches_hf_greedy_in_fp32(tiny_model_path):
    runner, engine = _graph_engine(tiny_model_path, max_num_seqs=8)
    prompts = [engine.tokenizer.encode(p) for p in TINY_PROMPTS]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert runner.graphs is not None and runner.graphs.num_replays >= 20
    hf = hf_causal_lm(tiny_model_path)
    assert got == [hf_greedy(hf, p, 24) for p in prompts]


def test_graph_replay_matches_the_same_runner_without_graphs_in_bf16(tiny_model_path):
    config = engine_config(tiny_model_path, device="cuda", dtype="bfloat16", max_num_seqs=8)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    eager_runner = CudaGraphModelRunner(replace(config, use_cuda_graphs=False))
    assert eager_runner.graphs is None
    eager = LLMEngine(config, runner=eager_runner)
    prompts = [eager.tokenizer.encode(p) for p in TINY_PROMPTS]
    expected = [c.token_ids for c in eager.generate(prompts, params)]
    runner = CudaGraphModelRunner(config)
    got = [c.token_ids for c in LLMEngine(config, runner=runner).generate(prompts, params)]
    assert runner.graphs is not None and runner.graphs.num_replays >= 20
    # Buckets pad the batch, so GEMM shapes differ from the eager steps: allow a late
    # bf16 tie-break, not an early one.
    assert all(a[:8] == b[:8] for a, b in zip(got, expected, strict=True))


def test_short_prefill_chunks_replay_the_graph_and_match_hf_in_fp32(tiny_model_path):
    """The first prompt (38 tokens) is too long for graph rows in the tiny model's read budget
    and prefills eagerly; the second (42 tokens) shares its first 32, cached, so its 10-token
    chunk runs as graph rows. Both give HF's greedy tokens."""
    # 16 seats: the second chunk (10 tokens) must fit the largest graph.
    runner, engine = _graph_engine(tiny_model_path, max_num_seqs=16)
    assert runner.graphs is not None
    prefix = engine.tokenizer.encode(TINY_PROMPTS[2])
    prompts = [prefix + engine.tokenizer.encode(" and then"),
               prefix + engine.tokenizer.encode(" or else")]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    hf = hf_causal_lm(tiny_model_path)
    prefilled_in_graph, cached = [], []
    for i, prompt in enumerate(prompts):
        before = runner.graphs.num_replays
        engine.add_request(f"r{i}", prompt, params)
        outs = engine.step()  # the prefill step
        prefilled_in_graph.append(runner.graphs.num_replays > before)
        while not outs:  # asynchronous scheduling: its token comes with the next step
            outs = engine.step()
        tokens = [t for o in outs for t in o.new_token_ids]
        cached += [o.num_cached_tokens for o in outs]
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.new_token_ids]
        assert tokens == hf_greedy(hf, prompt, 16)
    assert prefilled_in_graph == [False, True]
    assert cached == [0, 32]


def test_asynchronous_scheduling_gives_the_synchronous_tokens_in_fp32(tiny_model_path):
    """Steps launched ahead (placeholders filled on the device from the previous step's
    argmax) give what synchronous steps give: with a stop token mid-way, whose sequence has
    a row in the step already launched, and with a pool small enough to preempt."""
    prompts_text = TINY_PROMPTS * 2
    sync_cfg = dict(max_num_seqs=16, num_blocks=48, async_scheduling=False)
    _, sync = _graph_engine(tiny_model_path, **sync_cfg)
    prompts = [sync.tokenizer.encode(p) for p in prompts_text]
    ref = sync.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                ignore_eos=True))
    stop_id = ref[0].token_ids[10]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                            stop_token_ids=(stop_id,))
    expected = [c.token_ids for c in sync.generate(prompts, params)]
    runner, ahead = _graph_engine(tiny_model_path, **{**sync_cfg, "async_scheduling": True})
    assert ahead._schedule_ahead
    got = [c.token_ids for c in ahead.generate(prompts, params)]
    assert got == expected
    assert expected[0][-1] == stop_id and len(expected[0]) <= 11
    assert runner.graphs is not None and runner.graphs.num_replays >= 20
    assert ahead.stats().num_preemptions > 0 and ahead.stats().num_blocks_used == 0
