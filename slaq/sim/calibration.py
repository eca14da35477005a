"""Calibrating a cost profile against our own engine, and checking what it predicts.

``measure`` records engine steps on a grid (prompt lengths x batch sizes), ``fit`` turns the
samples into a :class:`~slaq.gpu_workers.engine.profiles_store.CalibratedProfile` (fitted on
every sample; error reported on those and, from a second fit on a checkerboard of the grid's
cells, on cells that fit never saw), and ``validate`` runs a different workload through the
real engine and through the ``sim`` engine (same scheduler, step times from the profile) and
compares total times. Used by ``slaq sim calibrate`` and ``scripts/gpu_calibrate.py`` (which
has no click), so nothing here imports click; torch only inside the engine-building calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slaq.gpu_workers.engine.cost_model import (
    CostProfile,
    ModelSpec,
    StepSample,
    calibrate,
    error_summary,
    holdout_split,
    record_engine,
)
from slaq.gpu_workers.engine.profiles_store import CalibratedProfile
from slaq.host import cpu_capability, cpu_family_model, cpu_model_name


@dataclass(frozen=True, slots=True)
class Grid:
    """Where to measure: every prompt length with every batch size, ``max_tokens`` each."""

    prompt_lens: tuple[int, ...] = (16, 64, 256)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    max_tokens: int = 8

    def __post_init__(self) -> None:
        if not self.prompt_lens or not self.batch_sizes:
            raise ValueError("the grid needs at least one prompt length and one batch size")
        if min(self.prompt_lens) < 1 or min(self.batch_sizes) < 1 or self.max_tokens < 2:
            raise ValueError("lengths and batches must be >= 1, max_tokens >= 2")

    @property
    def max_len(self) -> int:
        return max(self.prompt_lens) + self.max_tokens


def host_info(device: str) -> dict[str, Any]:
    """What the samples were measured on (no host name: it says nothing about speed)."""
    import torch

    info: dict[str, Any] = {"device": device, "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    # The host's CPU matters on a GPU too: it runs the scheduler and launches the steps.
    info["cpu"] = cpu_model_name()
    info["cpu_family_model"] = ", ".join(cpu_family_model())
    info["cpu_capability"] = cpu_capability()
    # Not every OS has a load average: the record is then without it.
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = os.getloadavg()[0]
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def model_spec(model_dir: str | Path, name: str, bytes_per_param: float) -> ModelSpec:
    """A Llama-style model's shape and parameter count, from its ``config.json``."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, inter, vocab = (c["hidden_size"], c["num_hidden_layers"],
                               c["intermediate_size"], c["vocab_size"])
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
    params = vocab * h * (1 if c.get("tie_word_embeddings") else 2) + layers * per_layer + h
    return ModelSpec(name, num_params=float(params), num_layers=layers, num_q_heads=heads,
                     num_kv_heads=kv, head_dim=hd, bytes_per_param=bytes_per_param)


def build_engine(model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                 grid: Grid | None = None, *, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int | None = None) -> Any:
    """An ``LLMEngine`` (torch runner; CUDA graphs on a GPU) with room for ``grid``'s largest
    cell. Prefix caching is off: every measured step computes what it is charged for."""
    from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    grid = grid or Grid()
    seqs = max_num_seqs or max(64, max(grid.batch_sizes))
    block = 16
    blocks = max(grid.batch_sizes) * -(-grid.max_len // block) + 64
    return LLMEngine(EngineConfig(
        model=str(model_dir), device=device, dtype=dtype,
        scheduler=SchedulerConfig(max_num_seqs=seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=max(2048, grid.max_len)),
        cache=CacheConfig(block_size=block, num_blocks=max(blocks, 1024),
                          enable_prefix_caching=False)))


def _sync_for(engine: Any) -> Callable[[], None] | None:
    """What waits for the engine's device: CUDA runs asynchronously to the host."""
    if str(engine.config.device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


def measure(engine: Any, grid: Grid, *, repeats: int = 1,
            progress: Callable[[int, int], None] | None = None,
            budget_s: float | None = None, warmup: bool = True) -> list[StepSample]:
    """Record the engine's steps on ``grid`` ``repeats`` times and keep each step's fastest
    time (see :func:`fastest_of`), after an unrecorded pass over the first prompt length
    (every length on a GPU) so that one-off costs such as kernel compilation are not fitted.
    ``progress(done, total)`` counts grid cells over all repeats; no cell starts more than
    ``budget_s`` after the warm-up."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sync = _sync_for(engine)
    cuda = sync is not None
    if warmup:
        lens = grid.prompt_lens if cuda else grid.prompt_lens[:1]
        record_engine(engine, lens, grid.batch_sizes, 2, sync=sync)
    cells = len(grid.prompt_lens) * len(grid.batch_sizes)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    runs = []
    for r in range(repeats):
        def step(done: int, total: int, r: int = r) -> None:
            if progress is not None:
                progress(r * cells + done, repeats * cells)

        runs.append(record_engine(engine, grid.prompt_lens, grid.batch_sizes, grid.max_tokens,
                                  sync=sync, progress=step, deadline=deadline))
    return fastest_of(runs)


def fastest_of(runs: list[list[StepSample]]) -> list[StepSample]:
    """Each step's fastest time over repeated runs of the same grid. The engine schedules a
    grid the same way every time, so the i-th steps of two runs do the same work; a slower
    copy is the same work slowed by something else on the machine (a shared CPU), which the
    profile should not learn. Runs cut short by a deadline add only the steps they reached."""
    if not runs:
        return []
    out = list(runs[0])
    for run in runs[1:]:
        for i, s in enumerate(run):
            if i >= len(out):
                out.append(s)
            elif s.chunks == out[i].chunks and s.cell == out[i].cell:
                if s.seconds < out[i].seconds:
                    out[i] = s
            else:
                raise ValueError(f"step {i} differs between repeats: {s.chunks} vs "
                                 f"{out[i].chunks}")
    return out


def fit(base: CostProfile, base_name: str, samples: list[StepSample], name: str,
        measured_on: dict[str, Any], extra: dict[str, Any] | None = None) -> CalibratedProfile:
    """Fit ``base`` to every sample; report its error on them, and the error on held-out
    grid cells of a fit that did not see them (when the samples cover a 2 x 2 grid or more)."""
    profile = calibrate(base, samples, name)
    errors: dict[str, Any] = {"all": error_summary(profile, samples)}
    try:
        fit_part, held = holdout_split(samples)
    except ValueError as exc:
        errors["heldout"] = {"skipped": str(exc)}
    else:
        partial = calibrate(base, fit_part, name)
        errors["heldout"] = {**error_summary(partial, held), "num_fitted": len(fit_part),
                             "cells": sorted({s.cell for s in held if s.cell})}
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return CalibratedProfile(profile, base_name, measured_on, date, len(samples), errors,
                             dict(extra or {}))


def _validation_prompts(n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1234)
    lens = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
    return [torch.randint(3, min(vocab, 32000), (ln,), generator=gen).tolist() for ln in lens]


def validate(engine: Any, profile: CostProfile, *, num_requests: int = 8,
             prompt_len: tuple[int, int] = (64, 256), max_tokens: int = 32,
             repeats: int = 1) -> dict[str, Any]:
    """Run one workload (all requests at once, greedy, EOS ignored) through ``engine``
    (``repeats`` times; the fastest counts, as in :func:`measure`) and, with the same scheduler
    settings and prompts, through the ``sim`` engine on ``profile``.

    Returns measured seconds (the whole engine loop, and the runner's steps alone) against
    the predicted ones: the sim engine's total, and the profile applied to the real run's own
    steps (equal when both engines schedule alike)."""
    from slaq.gpu_workers.engine.config import SamplingParams
    from slaq.gpu_workers.engine.cost_model import RecordingRunner
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.sim_runner import SimRunner

    prompts = _validation_prompts(num_requests, *prompt_len, engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def run(eng: Any, tag: str) -> float:
        for i, p in enumerate(prompts):
            eng.add_request(f"validate-{tag}-{i}", p, params)
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        return time.perf_counter() - t0

    load_before = os.getloadavg()[0]
    totals: list[tuple[float, float]] = []
    for r in range(repeats):
        recorder = RecordingRunner(engine.runner, _sync_for(engine))
        engine.runner = recorder
        try:
            total = run(engine, f"real{r}")
        finally:
            engine.runner = recorder.inner
        steps = [s for s in recorder.samples if s.chunks]
        totals.append((total, sum(s.seconds for s in steps)))
    measured, runner_s = min(totals)
    cfg = engine.config
    # Same pool and the same output mode (asynchronous outputs shift when a request's
    # last token frees its seat), so that both engines schedule the same steps.
    sim_cfg = replace(cfg, cache=replace(cfg.cache, num_blocks=engine.block_manager.num_blocks),
                      async_output=getattr(engine, "_async_output", cfg.async_output))
    sim_runner = SimRunner(profile)
    sim = LLMEngine(sim_cfg, runner=sim_runner)
    run(sim, "sim")
    predicted = sim_runner.stats.busy_s
    return {
        "workload": {"num_requests": num_requests, "prompt_len": list(prompt_len),
                     "max_tokens": max_tokens},
        "num_steps": len(steps), "sim_num_steps": sim_runner.stats.num_steps,
        "measured_s": round(measured, 4), "measured_runner_s": round(runner_s, 4),
        "measured_all_s": [round(t, 4) for t, _ in totals],
        "predicted_s": round(predicted, 4),
        "predicted_same_steps_s": round(sum(profile.step_time(s.chunks) for s in steps), 4),
        "rel_err": round((predicted - measured) / measured, 4),
        "rel_err_vs_runner": round((predicted - runner_s) / runner_s, 4),
        # Others on a shared machine slow the measured side only.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
