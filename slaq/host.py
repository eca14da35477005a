"""What CPU this process runs on, for the records benchmarks and calibrations write.

Two "AMD EPYC" VMs of this project differed 2x in fp32 GEMM rate (a Zen 4 part runs AVX-512 at
half width): the model name alone does not tell their results apart, the family and model
numbers and the vector ISA torch dispatches to do.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _first_processor() -> dict[str, str]:
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
    return _first_processor().get("model name", "cpu")


def cpu_family_model() -> list[str]:
    """``["family 25", "model 17"]`` on x86 Linux; what of it is known elsewhere (often [])."""
    info = _first_processor()
    return [f"{label} {info[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
            if key in info]


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to ("AVX512", "AVX2", "DEFAULT", ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
