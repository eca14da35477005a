"""Kernel-level profile of decode steps on CUDA (used by ``gpu_bench.py breakdown``).

For one running batch it records, with ``torch.profiler``, a few whole engine steps (graph
replays included: CUPTI reports the kernels inside a CUDA graph) and the same decode forward run
eagerly, and reports per step: wall time, the sum of kernel times (device busy), and the kernels
that take the most device time. Busy time well under the wall time means the host (or launch
gaps) is what a step waits for; busy time near it means the kernels themselves.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def _kernel_table(prof: Any, num_steps: int, top: int = 25) -> dict[str, Any]:
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans: list[tuple[float, float]] = []
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        dur = float(evt.time_range.elapsed_us())
        if dur <= 0:
            continue
        name = evt.name
        per_name[name][0] += dur
        per_name[name][1] += 1
        start = float(evt.time_range.start)
        spans.append((start, start + dur))
    busy = sum(v[0] for v in per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    first = min((s for s, _ in spans), default=0.0)
    last = max((e for _, e in spans), default=0.0)
    return {
        "num_kernels_per_step": round(sum(v[1] for v in per_name.values()) / num_steps, 1),
        "device_busy_us_per_step": round(busy / num_steps, 1),
        "device_span_us_per_step": round((last - first) / num_steps, 1),
        "top_kernels_us_per_step": [
            {"name": name[:120], "us": round(v[0] / num_steps, 2),
             "calls": round(v[1] / num_steps, 2)}
            for name, v in ranked[:top]],
    }


def profile_decode(engine: Any, num_steps: int = 20) -> dict[str, Any]:
    """Profile ``num_steps`` engine steps of the batch now running (all in decode), then the
    same number of eager forwards of the decode graph's inputs."""
    result: dict[str, Any] = {"batch": engine.scheduler.num_running}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    result["engine_steps"] = {"wall_us_per_step": round(wall / num_steps * 1e6, 1),
                              **_kernel_table(prof, num_steps)}
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is not None:
        n = next(s for s in graphs.sizes if s >= max(1, result["batch"]))
        with torch.inference_mode():
            graphs._forward(n)  # warm: the eager path's kernels are compiled already
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(num_steps):
                    graphs._forward(n)
                torch.cuda.synchronize()
        result["eager_forward"] = _kernel_table(prof, num_steps)
    return result
