"""What a benchmark ran on, for its JSON: CPU results differ by vendor as much as by core count
(oneDNN's bf16 math mode is exact on some CPUs and rounds to bf16 on others)."""

from __future__ import annotations

import os

import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name with its family and model numbers, the vector
    ISA torch dispatches to, its cores and torch's threads. (Two "AMD EPYC" VMs of this
    project differed 2x in fp32 GEMM rate: the family tells their generations apart.)"""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    details = [*cpu_family_model(), torch.backends.cpu.get_cpu_capability(),
               f"{os.cpu_count()} cores", f"{torch.get_num_threads()} threads"]
    return f"{cpu_model_name()} ({', '.join(details)})"


def cpu_family_model() -> list[str]:
    """``["family 25", "model 17"]`` from ``/proc/cpuinfo`` (x86 Linux), else ``[]``."""
    fields = {"cpu family": "family", "model": "model"}
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in fields and key not in found:
                    found[key] = f"{fields[key]} {value.strip()}"
                if len(found) == len(fields) or not line.strip():
                    break
    except OSError:  # not Linux: no cpuinfo to read
        return []
    return [found[k] for k in fields if k in found]


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("cpu" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "cpu")
    except OSError:  # not Linux: no cpuinfo to read
        return "cpu"
