"""Step-time cost model for the ``sim`` engine and the simulator. IO-free, no torch.

One engine step runs a batch of prefill chunks and decodes (see
:class:`~slaq.gpu_workers.engine.outputs.SchedulerOutput`). Its time is modelled as::

    t = overhead + seq_overhead * sequences
        + max(bytes_moved / (hbm_bw * bw_eff), linear_flops / (peak * mfu))   # roofline
        + attention_flops / (peak * attn_eff)                                 # attention term

where ``linear_flops = 2 * params * batched_tokens`` (every token passes every weight),
``bytes_moved = weight_bytes + kv_bytes_per_token * (context read + tokens written)`` and
``attention_flops = 4 * layers * q_heads * head_dim * sum(new * (past + new / 2))`` (QK^T and PV,
causal). A prefill-heavy step is compute bound (the linear term plus attention); a decode-only
step is bound by the larger of bytes over bandwidth and flops over peak.

Hardware and model constants come from public spec sheets (sources on each profile below).
The efficiency factors (``mfu``, ``bw_eff``, ``attn_eff``, ``overhead_s``) are assumptions, not
specs: they are the fractions of peak that well-tuned serving engines typically reach, and are
what :func:`calibrate` fits when measurements of our own engine are available.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from slaq.gpu_workers.engine.outputs import SchedulerOutput


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of a decoder-only transformer (what the cost model needs of it)."""

    name: str
    num_params: float
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0  # bf16

    def __post_init__(self) -> None:
        if self.num_params <= 0 or self.num_layers < 1 or self.head_dim < 1:
            raise ValueError(f"model {self.name}: sizes must be positive")
        if self.num_kv_heads < 1 or self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name}: q heads must be a multiple of kv heads")

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V for every layer, in the weights' dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """One accelerator group serving one model replica (``num_devices`` > 1 = tensor parallel)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device
    memory_bytes: float  # per device
    link_bandwidth: float  # bytes/s a KV transfer to another replica reaches
    num_devices: int = 1

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.hbm_bandwidth, self.memory_bytes, self.link_bandwidth) <= 0:
            raise ValueError(f"hardware {self.name}: rates and sizes must be positive")
        if self.num_devices < 1:
            raise ValueError("num_devices must be >= 1")


@dataclass(frozen=True, slots=True)
class CostProfile:
    """A named (model, hardware, efficiencies) triple; see the module docstring for the formula."""

    name: str
    model: ModelSpec
    hardware: HardwareSpec
    mfu: float = 0.6  # fraction of peak the linear layers reach in big batches
    attn_eff: float = 0.5  # fraction of peak reached by (flash) attention
    bw_eff: float = 0.8  # fraction of HBM bandwidth reached by decode GEMVs
    overhead_s: float = 0.0015  # per-step scheduling / launch cost
    # Per sequence in the step: its logits row, sampling and bookkeeping run once per sequence
    # whatever its token count. Negligible on a GPU (0 in the spec profiles); calibrate fits it.
    seq_overhead_s: float = 0.0
    tp_eff: float = 1.0  # parallel efficiency across num_devices (all-reduce cost)
    memory_util: float = 0.9  # share of device memory the engine may take
    activation_bytes: float = 4e9  # per replica: activations, CUDA graphs, workspace
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # GPU: memory and compute time overlap (roofline max); False adds them (what calibrate
    # fits, closer to a CPU).
    overlap: bool = True

    def __post_init__(self) -> None:
        for name in ("mfu", "attn_eff", "bw_eff", "tp_eff", "memory_util"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if self.overhead_s < 0 or self.seq_overhead_s < 0:
            raise ValueError("overhead_s and seq_overhead_s must be >= 0")
        if self.num_kv_blocks < 1:
            raise ValueError(f"profile {self.name}: the weights leave no room for a KV cache")

    # ---- derived capacities -------------------------------------------------------------

    @property
    def _flops(self) -> float:
        return self.hardware.peak_flops * self.hardware.num_devices * self.tp_eff

    @property
    def _bandwidth(self) -> float:
        return self.hardware.hbm_bandwidth * self.hardware.num_devices * self.tp_eff

    @property
    def num_kv_blocks(self) -> int:
        """KV blocks that fit beside the weights and activations."""
        hw = self.hardware
        free = (hw.memory_bytes * hw.num_devices * self.memory_util
                - self.model.weight_bytes - self.activation_bytes)
        return max(0, int(free // (self.model.kv_bytes_per_token * self.block_size)))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    # ---- step times ---------------------------------------------------------------------

    def step_time(self, chunks: Iterable[tuple[int, int]]) -> float:
        """Seconds for one step computing ``(past_tokens, new_tokens)`` for each sequence."""
        m = self.model
        num_tokens = 0
        num_seqs = 0
        context = 0
        attn_work = 0.0
        for past, new in chunks:
            num_seqs += 1
            num_tokens += new
            context += past + new
            attn_work += new * (past + new / 2)
        if num_tokens == 0:
            return 0.0
        linear_flops = 2.0 * m.num_params * num_tokens
        attn_flops = 4.0 * m.num_layers * m.num_q_heads * m.head_dim * attn_work
        moved = m.weight_bytes + m.kv_bytes_per_token * context
        mem_s = moved / (self._bandwidth * self.bw_eff)
        compute_s = linear_flops / (self._flops * self.mfu)
        roofline = max(mem_s, compute_s) if self.overlap else mem_s + compute_s
        return (self.overhead_s + self.seq_overhead_s * num_seqs + roofline
                + attn_flops / (self._flops * self.attn_eff))

    def scheduler_step_time(self, out: SchedulerOutput) -> float:
        """Step time of a scheduler output (the runner's view)."""
        return self.step_time((s.start, s.num_new_tokens) for s in out.scheduled)

    def prefill_time(self, num_tokens: int, chunk: int | None = None) -> float:
        """Seconds to prefill one prompt alone, in chunks of ``chunk`` tokens."""
        chunk = chunk or self.max_num_batched_tokens
        t, done = 0.0, 0
        while done < num_tokens:
            n = min(chunk, num_tokens - done)
            t += self.step_time([(done, n)])
            done += n
        return t

    def decode_step_time(self, batch: int, mean_context: int) -> float:
        """Seconds of one decode step of ``batch`` sequences of ``mean_context`` tokens each."""
        return self.step_time([(mean_context, 1)] * batch)

    def transfer_time(self, num_tokens: int) -> float:
        """Seconds to move ``num_tokens`` tokens of KV to another replica."""
        return num_tokens * self.model.kv_bytes_per_token / self.hardware.link_bandwidth

    def prefill_rate(self, prompt_tokens: int) -> float:
        """Prompt tokens/s a replica sustains on prompts of this length, one at a time."""
        return prompt_tokens / self.prefill_time(prompt_tokens)


# ---- public specs ----------------------------------------------------------------------

LLAMA_3_1_8B = ModelSpec(
    # Meta Llama 3.1 8B, HF config.json (meta-llama/Llama-3.1-8B): 32 layers, hidden 4096,
    # 32 attention heads, 8 KV heads, head_dim 128; 8.03e9 parameters (model card).
    "llama-3.1-8b", num_params=8.03e9, num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128,
)
LLAMA_3_1_70B = ModelSpec(
    # Meta Llama 3.1 70B, HF config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads,
    # head_dim 128; 70.6e9 parameters (model card).
    "llama-3.1-70b", num_params=70.6e9, num_layers=80, num_q_heads=64, num_kv_heads=8,
    head_dim=128,
)
SMOLLM2_135M = ModelSpec(
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json: 30 layers, hidden 576, 9 heads, 3 KV heads,
    # head_dim 64; 134.5e6 parameters; we run it in fp32 on CPU.
    "smollm2-135m", num_params=134.5e6, num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64,
    bytes_per_param=4.0,
)

H100_SXM = HardwareSpec(
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense BF16 (1,979 with sparsity), 3.35 TB/s
    # HBM3, 80 GB; NVLink 4 900 GB/s total, i.e. 450 GB/s each way between two GPUs.
    "h100-sxm", peak_flops=989.4e12, hbm_bandwidth=3.35e12, memory_bytes=80e9,
    link_bandwidth=450e9,
)
H100_SXM_X4 = replace(H100_SXM, name="h100-sxm-x4", num_devices=4)
CPU_2CORE = HardwareSpec(
    # This project's CI machine: 2 x86 cores. Placeholders meant to be replaced by calibrate():
    # ~100 GFLOP/s fp32 (2 cores x AVX2 FMA), ~20 GB/s DRAM; shared-memory KV copy ~5 GB/s.
    "cpu-2core", peak_flops=100e9, hbm_bandwidth=20e9, memory_bytes=2e9, link_bandwidth=5e9,
)

PROFILES: dict[str, CostProfile] = {
    p.name: p
    for p in (
        CostProfile("llama-8b-h100", LLAMA_3_1_8B, H100_SXM),
        # TP=4: the all-reduce per layer costs ~10-15% at these sizes; tp_eff=0.85 is assumed.
        CostProfile("llama-70b-h100x4", LLAMA_3_1_70B, H100_SXM_X4, tp_eff=0.85,
                    activation_bytes=16e9),
        CostProfile("smollm2-135m-cpu", SMOLLM2_135M, CPU_2CORE, mfu=0.3, attn_eff=0.2,
                    bw_eff=0.5, overhead_s=0.01, activation_bytes=0.2e9, max_num_seqs=64,
                    max_num_batched_tokens=2048, memory_util=0.5, overlap=False),
    )
}


def get_profile(name: str) -> CostProfile:
    """A named profile: a spec profile above, a calibrated one committed under
    ``slaq/sim/profiles/``, or the path of a calibrated profile's JSON file. Raises ValueError
    listing the known names."""
    if name in PROFILES:
        return PROFILES[name]
    # Lazy: the JSON store does file IO; this module stays IO-free for the simulator's core.
    from slaq.gpu_workers.engine.profiles_store import find_profile

    found = find_profile(name)
    if found is None:
        raise ValueError(f"unknown cost profile {name!r}; known: {sorted(all_profiles())}")
    return found


def all_profiles() -> dict[str, CostProfile]:
    """The spec profiles and the calibrated ones, by name."""
    from slaq.gpu_workers.engine.profiles_store import calibrated_profiles

    return {**PROFILES, **{n: r.profile for n, r in calibrated_profiles().items()}}


# ---- calibration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured engine step: its ``(past, new)`` chunks and the seconds it took.

    ``cell`` is the ``(prompt_len, batch)`` point of the measurement grid the step belongs to
    (``None`` outside a grid): :func:`holdout_split` holds whole cells out.
    """

    chunks: tuple[tuple[int, int], ...]
    seconds: float
    cell: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.seconds > 0:  # relative errors divide by it
            raise ValueError(f"a measured step takes time, got {self.seconds} s")


def calibrate(base: CostProfile, samples: Sequence[StepSample], name: str | None = None) -> CostProfile:
    """Fit ``overhead_s``, ``seq_overhead_s``, ``mfu``, ``attn_eff`` and ``bw_eff`` of ``base``
    to measured steps.

    Least squares of relative error on ``t = overhead + d * sequences + a * linear_flops
    + b * attention_flops + c * bytes`` (a linear surrogate of the roofline: on a CPU compute
    and memory time add up more than they overlap), with every coefficient kept >= 0; each coefficient becomes an
    efficiency against the profile's peak figures; where the machine beats a peak figure, the
    fitted profile's hardware (renamed ``NAME-fitted``) gets the achieved rate as its peak. A
    term the data cannot resolve (its coefficient pinned at 0, e.g. bytes moved when the
    weights dominate and so move in step with the overhead) gets efficiency 1: its least
    possible time.
    """
    if len(samples) < 4:
        raise ValueError("calibrate needs at least 4 step samples")
    m = base.model
    rows, y = [], []
    for s in samples:
        num_tokens = sum(n for _, n in s.chunks)
        context = sum(p + n for p, n in s.chunks)
        attn = sum(n * (p + n / 2) for p, n in s.chunks)
        rows.append([1.0, 2.0 * m.num_params * num_tokens,
                     4.0 * m.num_layers * m.num_q_heads * m.head_dim * attn,
                     m.weight_bytes + m.kv_bytes_per_token * context, float(len(s.chunks))])
        y.append(s.seconds)
    # Relative errors: steps span milliseconds (decode) to seconds (long prefills on a CPU),
    # and absolute least squares would fit only the longest.
    yv = np.asarray(y)
    a = np.asarray(rows) / yv[:, None]
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    coef = _nonneg_lstsq(a / scale, np.ones_like(yv)) / scale
    hw = base.hardware
    per_peak = hw.num_devices * base.tp_eff
    c_lin, c_attn, c_bytes, c_seq = (float(c) for c in coef[1:])
    # An achieved rate above the profile's peak (the CPU placeholders are guesses) would need
    # an efficiency above 1, and clipping it would predict the wrong time: raise the peak to
    # the achieved rate instead, so the profile reproduces the fitted coefficients exactly.
    flops_rate = max([1.0 / c for c in (c_lin, c_attn) if c > 0], default=0.0) / per_peak
    bytes_rate = (1.0 / c_bytes if c_bytes > 0 else 0.0) / per_peak
    if flops_rate > hw.peak_flops or bytes_rate > hw.hbm_bandwidth:
        hw = replace(hw, name=f"{hw.name}-fitted", peak_flops=max(hw.peak_flops, flops_rate),
                     hbm_bandwidth=max(hw.hbm_bandwidth, bytes_rate))
    flops, bw = hw.peak_flops * per_peak, hw.hbm_bandwidth * per_peak

    def eff(c: float, peak: float) -> float:
        return 1.0 if c <= 0 else min(1.0, 1.0 / (c * peak))

    return replace(
        base,
        name=name or f"{base.name}-calibrated",
        hardware=hw,
        overhead_s=float(coef[0]),
        seq_overhead_s=c_seq,
        mfu=eff(c_lin, flops),
        attn_eff=eff(c_attn, flops),
        bw_eff=eff(c_bytes, bw),
        overlap=False,
    )


def _nonneg_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0, exactly: the best of the unconstrained fits on
    every subset of columns whose coefficients all come out >= 0 (31 subsets of 5 columns).
    Near-ties go to fewer columns, then to earlier ones (the overhead before bytes moved)."""
    n = a.shape[1]
    coef = np.zeros(n)
    best = np.inf
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sub, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (sub < 0).any():
                continue
            r = float(np.sum((a[:, cols] @ sub - b) ** 2))
            if r < best * (1 - 1e-9) - 1e-15:
                best = r
                coef = np.zeros(n)
                coef[list(cols)] = sub
    return coef


def relative_errors(profile: CostProfile, samples: Sequence[StepSample]) -> np.ndarray:
    """``|predicted - measured| / measured`` of every sample's step time."""
    measured = np.asarray([s.seconds for s in samples], dtype=float)
    predicted = np.asarray([profile.step_time(s.chunks) for s in samples], dtype=float)
    return np.abs(predicted - measured) / np.maximum(measured, 1e-12)


def error_summary(profile: CostProfile, samples: Sequence[StepSample]) -> dict[str, float]:
    """Median and 90th percentile of :func:`relative_errors` (and how many samples)."""
    if not samples:
        raise ValueError("no samples to measure an error on")
    err = relative_errors(profile, samples)
    return {"num_samples": len(samples), "median_rel_err": float(np.median(err)),
            "p90_rel_err": float(np.percentile(err, 90)), "max_rel_err": float(err.max())}


def holdout_split(samples: Sequence[StepSample]) -> tuple[list[StepSample], list[StepSample]]:
    """Split grid samples into (fit, held out) by whole cells, as a checkerboard over the
    grid's prompt lengths x batch sizes: every length and batch size stays in the fit set, and
    each held-out cell is a combination the fit never saw. Samples with no cell are fitted."""
    lens = sorted({s.cell[0] for s in samples if s.cell})
    batches = sorted({s.cell[1] for s in samples if s.cell})
    if len(lens) < 2 or len(batches) < 2:
        raise ValueError("a held-out check needs a grid of at least 2 x 2 cells")
    fit: list[StepSample] = []
    held: list[StepSample] = []
    for s in samples:
        out = s.cell is not None and (lens.index(s.cell[0]) + batches.index(s.cell[1])) % 2
        (held if out else fit).append(s)
    if len(fit) < 4:
        raise ValueError("a held-out check needs at least 4 samples to fit")
    return fit, held


def samples_from_output(out: SchedulerOutput, seconds: float,
                        cell: tuple[int, int] | None = None) -> StepSample:
    """Turn one measured step of our engine (its scheduler output and wall time) into a sample."""
    return StepSample(tuple((s.start, s.num_new_tokens) for s in out.scheduled), seconds, cell)


class RecordingRunner:
    """Wraps a real runner and records every step as a :class:`StepSample` (for calibrate).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after each step so that a
    device's queued work is charged to the step that queued it. ``cell`` tags new samples.
    """

    def __init__(self, inner, sync: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.sync = sync
        self.cell: tuple[int, int] | None = None
        self.samples: list[StepSample] = []

    def execute(self, out: SchedulerOutput, overlap=None):
        return self._timed(out, lambda: self.inner.execute(out, overlap))

    def launch(self, out: SchedulerOutput, prev):
        """A step launched ahead (asynchronous scheduling), timed to its end as ``execute``
        is: with ``sync`` it no longer overlaps the next one."""
        return self._timed(out, lambda: self.inner.launch(out, prev))

    def _timed(self, out: SchedulerOutput, run: Callable[[], Any]) -> Any:
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        result = run()
        if self.sync is not None:
            self.sync()
        self.samples.append(samples_from_output(out, time.perf_counter() - t0, self.cell))
        return result

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def record_engine(engine, prompt_lens: Sequence[int] = (16, 64, 256),
                  batch_sizes: Sequence[int] = (1, 4, 16), max_tokens: int = 8, *,
                  sync: Callable[[], None] | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  deadline: float | None = None) -> list[StepSample]:
    """Measure our own engine (an ``LLMEngine``; duck-typed, no torch import here) on a grid
    of prompt lengths x batch sizes: each cell's requests arrive together and run to the end.

    ``progress(done, total)`` is called after each cell; past ``deadline`` (a
    ``time.monotonic()`` value) the remaining cells are skipped. Returns the non-empty steps.
    """
    from slaq.gpu_workers.engine.config import SamplingParams

    recorder = RecordingRunner(engine.runner, sync)
    engine.runner = recorder
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    cells = [(length, batch) for length in prompt_lens for batch in batch_sizes]
    try:
        n = 0
        for done, (length, batch) in enumerate(cells, 1):
            if deadline is not None and time.monotonic() > deadline:
                break
            recorder.cell = (length, batch)
            for _ in range(batch):
                engine.add_request(f"calib-{n}", _grid_prompt(n, length), params)
                n += 1
            while engine.has_unfinished():
                engine.step()
            if progress is not None:
                progress(done, len(cells))
    finally:
        engine.runner = recorder.inner
    return [s for s in recorder.samples if s.chunks]


def _grid_prompt(n: int, length: int) -> list[int]:
    """The ``n``-th grid prompt: two leading ids spell ``n`` (so no two of 8,100 prompts share a
    first block and the prefix cache never skips measured work), then a ramp of small ids that
    every vocabulary has."""
    head = [3 + n // 90 % 90, 3 + n % 90]
    return (head + [1 + (n + i) % 97 for i in range(length)])[:length]


def calibrate_engine(engine, base: CostProfile, prompt_lens: Sequence[int] = (16, 64, 256),
                     batch_sizes: Sequence[int] = (1, 4, 16), max_tokens: int = 8,
                     name: str | None = None) -> tuple[CostProfile, list[StepSample]]:
    """:func:`record_engine` on a grid, then :func:`calibrate` ``base`` to its step times.

    Returns the calibrated profile and the samples it was fitted to.
    """
    samples = record_engine(engine, prompt_lens, batch_sizes, max_tokens)
    return calibrate(base, samples, name), samples
