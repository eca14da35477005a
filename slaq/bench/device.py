"""What a benchmark ran on, for its JSON: CPU results differ by vendor as much as by core count
(oneDNN's bf16 math mode is exact on some CPUs and rounds to bf16 on others)."""

from __future__ import annotations

import os

import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name with its cores and torch's threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("cpu" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "cpu")
    except OSError:  # not Linux: no cpuinfo to read
        return "cpu"
