"""ModelRunner against hand-made schedules and block tables (no scheduler involved)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from slaq.gpu_workers.engine.attention import TorchSDPABackend
from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig, SamplingParams
from slaq.gpu_workers.engine.kv_pool import open_shm_pool, shm_path
from slaq.gpu_workers.engine.model_runner import ModelRunner
from slaq.gpu_workers.engine.outputs import ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.testing import engine_config, hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
BS = 4  # block size of these tests


@pytest.fixture(scope="module")
def runner(tiny_model_path: Path) -> ModelRunner:
    return ModelRunner(engine_config(tiny_model_path, num_blocks=128, block_size=BS))


def _seq(rid: str, prompt: list[int], blocks: list[int]) -> Sequence:
    seq = Sequence(rid, list(prompt), GREEDY)
    seq.block_table = list(blocks)
    return seq


def _step(runner: ModelRunner, *items: tuple[Sequence, int, int]) -> dict[str, int]:
    out = SchedulerOutput([ScheduledSequence(s, start, n) for s, start, n in items])
    return runner.execute(out).sampled_token_ids


def _decode_loop(runner: ModelRunner, seq: Sequence, num_tokens: int) -> list[int]:
    """Prefill then greedy decodes, appending tokens as the scheduler would."""
    seq.append_token(_step(runner, (seq, 0, seq.num_prompt_tokens))[seq.request_id])
    for _ in range(num_tokens - 1):
        seq.append_token(_step(runner, (seq, seq.num_tokens - 1, 1))[seq.request_id])
    return list(seq.output_token_ids)


def test_prefill_logits_match_hf(runner, tiny_hf, tiny_prompts):
    for prompt in tiny_prompts:
        with torch.no_grad():
            ref = tiny_hf(torch.tensor([prompt])).logits[0, -1]
        seq = _seq("a", prompt, range(100 - 30, 100))
        out = SchedulerOutput([ScheduledSequence(seq, 0, len(prompt))])
        batch = runner._prepare(out.scheduled)
        with torch.inference_mode():
            hidden = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta,
                                  runner.backend)
            logits = runner.model.compute_logits(hidden[-1:])[0]
        assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()


def test_decode_through_scattered_blocks_matches_hf(runner, tiny_hf, tiny_prompts):

    prompt = tiny_prompts[1]
    # Blocks in no particular order: the block table, not contiguity, defines the layout.
    blocks = [17, 3, 90, 41, 8, 77, 5, 60, 33, 12, 101, 2, 55, 70, 9, 99]
    seq = _seq("a", prompt, blocks)
    assert _decode_loop(runner, seq, 24) == hf_greedy(tiny_hf, prompt, 24)


def test_chunked_prefill_equals_whole_prefill(runner, tiny_prompts):
    prompt = tiny_prompts[2]
    whole = _decode_loop(runner, _seq("w", prompt, range(0, 40)), 8)
    seq = _seq("c", prompt, range(40, 80))
    # Uneven chunks, one of them a single token (takes the batched-decode path).
    cuts = [0, 5, 6, 17, len(prompt)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        sampled = _step(runner, (seq, a, b - a))
        assert ("c" in sampled) == (b == len(prompt))
    seq.append_token(sampled["c"])
    for _ in range(7):
        seq.append_token(_step(runner, (seq, seq.num_tokens - 1, 1))["c"])
    assert seq.output_token_ids == whole


def test_mixed_batch_equals_one_at_a_time(runner, tiny_prompts):
    alone = {}
    for i, prompt in enumerate(tiny_prompts):
        alone[i] = _decode_loop(runner, _seq(f"s{i}", prompt, range(i * 20, i * 20 + 20)), 10)
    # Together: staggered starts, so prefills and decodes of various lengths share steps.
    seqs = [_seq(f"t{i}", p, range(i * 20, i * 20 + 20)) for i, p in enumerate(tiny_prompts)]
    active: list[Sequence] = []
    for step in range(10 + len(seqs)):
        items = []
        for s in active:
            if s.num_output_tokens < 10:
                items.append((s, s.num_tokens - 1, 1))
        if step < len(seqs):
            new = seqs[step]
            items.append((new, 0, new.num_prompt_tokens))
            active.append(new)
        if not items:
            break
        sampled = _step(runner, *items)
        assert len(sampled) == len(items)
        for s, _, _ in items:
            s.append_token(sampled[s.request_id])
    assert {i: s.output_token_ids for i, s in enumerate(seqs)} == alone


def test_expanded_kv_heads_give_the_same_tokens(tiny_model_path, tiny_prompts):
    # The CUDA path repeats K/V heads instead of SDPA's GQA mode; check it here on CPU.
    plain = ModelRunner(engine_config(tiny_model_path, num_blocks=64, block_size=BS))
    expanded = ModelRunner(engine_config(tiny_model_path, num_blocks=64, block_size=BS))
    expanded.backend = TorchSDPABackend(expand_kv=True)
    for i, prompt in enumerate(tiny_prompts[:3]):
        seqs = [_seq(f"{i}", prompt, range(0, 30)) for _ in range(2)]
        # A chunked prefill (start > 0 takes the masked path), then decodes.
        for r, s in zip((plain, expanded), seqs, strict=True):
            _step(r, (s, 0, 3))
            s.append_token(_step(r, (s, 3, len(prompt) - 3))[s.request_id])
            for _ in range(8):
                s.append_token(_step(r, (s, s.num_tokens - 1, 1))[s.request_id])
        assert seqs[0].output_token_ids == seqs[1].output_token_ids


def test_sample_flag_controls_outputs(runner, tiny_prompts):
    prompt = tiny_prompts[0]
    seq = _seq("p", prompt, range(0, 10))
    assert _step(runner, (seq, 0, len(prompt) - 2)) == {}
    assert set(_step(runner, (seq, len(prompt) - 2, 2))) == {"p"}
    assert runner.execute(SchedulerOutput()).sampled_token_ids == {}


def test_blocks_copied_to_another_pool_continue_the_sequence(runner, tiny_model_path,
                                                             tiny_prompts):
    prompt = tiny_prompts[3]
    ref = _decode_loop(runner, _seq("r", prompt, range(0, 20)), 6)
    src = _seq("x", prompt, [9, 4, 30, 31, 2, 7, 50, 51])
    first = _step(runner, (src, 0, len(prompt)))["x"]
    n = -(-len(prompt) // BS)
    kv = runner.read_blocks(src.block_table[:n])
    assert kv.shape == (2, 2, n, BS, 2, 16)
    other = ModelRunner(engine_config(tiny_model_path, num_blocks=32, block_size=BS))
    dst = _seq("y", prompt, [20 + i for i in range(8)])
    other.write_blocks(dst.block_table[:n], kv)
    assert torch.equal(other.read_blocks(dst.block_table[:n]), kv)
    dst.append_token(first)
    dst.num_computed_tokens = len(prompt)
    for _ in range(5):
        dst.append_token(_step(other, (dst, dst.num_tokens - 1, 1))["y"])
    assert dst.output_token_ids == ref
    with pytest.raises(ValueError, match="shape"):
        other.write_blocks([1], kv)


def test_pool_sized_from_memory_budget(tiny_model_path):
    cfg = EngineConfig(model=str(tiny_model_path),
                       cache=CacheConfig(block_size=16, cpu_pool_bytes=1 << 20))
    r = ModelRunner(cfg)
    # 2 layers x (K, V) x 16 slots x 2 kv heads x 16 dims x 4 bytes = 8 KiB per block
    assert r.bytes_per_block == 8192
    assert r.num_blocks == (1 << 20) // 8192
    assert tuple(r.kv_cache.shape) == (2, 2, 128, 16, 2, 16)


def test_shared_memory_pool_is_visible_to_another_mapping(tiny_model_path, tiny_prompts):
    name = f"slaq-test-runner-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    r = ModelRunner(engine_config(tiny_model_path, num_blocks=16, block_size=BS,
                                  kv_shm_name=name))
    try:
        assert shm_path(name).is_file()
        view = open_shm_pool(name, r.kv_shape, r.dtype)
        seq = _seq("a", tiny_prompts[0], [3, 4, 5, 6])
        _step(r, (seq, 0, seq.num_prompt_tokens))
        assert view[:, :, 3].abs().sum() > 0  # the forward wrote K/V there
        assert torch.equal(view[:, :, [3, 4]], r.read_blocks([3, 4]))
        with pytest.raises(ValueError, match="bytes"):
            open_shm_pool(name, (1, 2, 3), r.dtype)
    finally:
        r.close()
    assert not shm_path(name).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runner_matches_cpu(runner, tiny_model_path, tiny_prompts):
    gpu = ModelRunner(engine_config(tiny_model_path, num_blocks=128, block_size=BS,
                                    device="cuda"))
    for i, prompt in enumerate(tiny_prompts):
        cpu_tokens = _decode_loop(runner, _seq(f"c{i}", prompt, range(0, 30)), 16)
        gpu_tokens = _decode_loop(gpu, _seq(f"g{i}", prompt, range(30, 60)), 16)
        assert gpu_tokens == cpu_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_engine_batches_like_one_at_a_time(make_engine, tiny_prompts, dtype):
    eng = make_engine(device="cuda", dtype=dtype)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = [eng.generate([p], greedy)[0].token_ids for p in tiny_prompts]
    assert [c.token_ids for c in eng.generate(tiny_prompts, greedy)] == alone
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True)
    [solo] = eng.generate([tiny_prompts[0]], seeded)
    batch = eng.generate(tiny_prompts * 3, [seeded] + [greedy] * (3 * len(tiny_prompts) - 1))
    assert batch[0].token_ids == solo.token_ids
    if dtype == "float32":
        cpu = make_engine()
        assert [c.token_ids for c in cpu.generate(tiny_prompts, greedy)] == alone


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_both_cpu_matmul_precisions_decode_hf_greedy(tiny_model_path, tiny_hf, tiny_prompts,
                                                     precision):
    from slaq.gpu_workers.engine.models.cpu_linear import (
        Bf16MathLinear,
        PackedLinear,
        bf16_matmul_available,
    )

    before = torch.backends.mkldnn.matmul.fp32_precision
    runner = ModelRunner(engine_config(tiny_model_path, num_blocks=64, block_size=BS,
                                       cpu_matmul_precision=precision))
    bf16 = precision == "bf16" and bf16_matmul_available()
    assert runner.matmul_precision == ("bf16" if bf16 else "ieee")
    # Asked for and accurate here, the bf16 math mode takes the place of the prepacked linears.
    assert any(isinstance(m, PackedLinear) for m in runner.model.modules()) != bf16
    assert any(isinstance(m, Bf16MathLinear) for m in runner.model.modules()) == bf16
    for i, prompt in enumerate(tiny_prompts[:3]):
        seq = _seq(f"p{i}", prompt, range(i * 20, i * 20 + 20))
        assert _decode_loop(runner, seq, 12) == hf_greedy(tiny_hf, prompt, 12)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # only inside the linears
    with pytest.raises(ValueError):
        EngineConfig(model=str(tiny_model_path), cpu_matmul_precision="tf32")
