"""What a benchmark ran on, for its JSON: CPU results differ by vendor and generation as much as
by core count (oneDNN's bf16 math mode is exact on some CPUs and rounds to bf16 on others)."""

from __future__ import annotations

import os

import torch

from slaq.host import cpu_capability, cpu_family_model, cpu_model_name


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name with its family and model numbers, the vector
    ISA torch dispatches to, its cores and torch's threads (see :mod:`slaq.host`)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    details = [*cpu_family_model(), cpu_capability(), f"{os.cpu_count()} cores",
               f"{torch.get_num_threads()} threads"]
    return f"{cpu_model_name()} ({', '.join(details)})"
