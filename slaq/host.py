"""What CPU this process runs on, for the records benchmarks and calibrations write.

Two 2-core "AMD EPYC" VMs of this project with the same flags ran the CPU benchmark's prefill
in about 7 s (stop 12) and 13 s (stop 14, a Zen 4: family 25 model 17): the model name alone
does not tell such machines apart; the family and model numbers and the vector ISA torch
dispatches to go some way.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_info() -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` as key -> value ({} where there is no
    such file: not Linux)."""
    fields: dict[str, str] = {}
    try:
        with CPUINFO.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def cpu_model_name() -> str:
    """The CPU's model name ("cpu" where there is none to read)."""
    return cpu_info().get("model name", "cpu")


def cpu_family_model() -> list[str]:
    """``["family 25", "model 17"]`` on x86 Linux; what of it is known elsewhere (often [])."""
    info = cpu_info()
    return [f"{label} {info[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
            if key in info]


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to ("AVX512", "AVX2", "DEFAULT", ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
