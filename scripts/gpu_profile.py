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
from pathlib import Path
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


def profile_prefix(engine: Any, prefix: list[int], suffix: list[int], rounds: int = 5,
                   top: int = 25) -> dict[str, Any]:
    """Where the time to first token of a request whose prefix is cached goes.

    ``engine`` has ``prefix`` cached already. Each round sends ``prefix + suffix`` (a fresh
    request id, one token) and records it with ``torch.profiler`` (host ops and kernels) and,
    in a separate run, with ``cProfile`` (Python functions): the TTFT's host share is the wall
    time minus the kernels' busy time."""
    import cProfile
    import pstats

    from slaq.gpu_workers.engine.config import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def one(tag: str) -> float:
        t0 = time.perf_counter()
        engine.add_request(tag, prefix + suffix, params)
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    one("warm-0")
    walls = [one(f"plain-{i}") for i in range(rounds)]
    with profile(activities=activities) as prof:
        for i in range(rounds):
            one(f"prof-{i}")
        if cuda:
            torch.cuda.synchronize()
    host_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    prof_py = cProfile.Profile()
    prof_py.enable()
    for i in range(rounds):
        one(f"cprof-{i}")
    prof_py.disable()
    stats = pstats.Stats(prof_py)
    funcs = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:top]  # cumulative time
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # own time
    return {
        "ttft_ms": [round(w * 1e3, 3) for w in walls],
        "kernels": _kernel_table(prof, rounds, top),
        "host_ops_self_us_per_request": [
            {"name": e.key[:100], "us": round(e.self_cpu_time_total / rounds, 1),
             "calls": round(e.count / rounds, 2)} for e in host_ops],
        "python_cumulative_us_per_request": [
            {"func": f"{Path(f[0]).name}:{f[1]}:{f[2]}", "us": round(v[3] / rounds * 1e6, 1),
             "calls": round(v[1] / rounds, 2)} for f, v in funcs],
        "python_own_us_per_request": [
            {"func": f"{Path(f[0]).name}:{f[1]}:{f[2]}", "us": round(v[2] / rounds * 1e6, 1),
             "calls": round(v[1] / rounds, 2)} for f, v in own],
    }
