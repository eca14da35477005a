"""Benchmarks name the device they ran on: CPU results differ by the CPU's model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slaq.bench.device import device_name
from slaq.host import cpu_family_model, cpu_model_name


def test_the_cpu_is_named_by_its_model_isa_cores_and_threads():
    name = device_name("cpu")
    assert name.startswith(cpu_model_name())
    assert f", {os.cpu_count()} cores, {torch.get_num_threads()} threads)" in name
    assert torch.backends.cpu.get_cpu_capability() in name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")]
        assert cpu_model_name() == (models[0] if models else "cpu")
        families = [line.split(":", 1)[1].strip() for line in lines
                    if line.split(":")[0].strip() == "cpu family"]
        if families:  # x86
            assert cpu_family_model()[0] == f"family {families[0]}"
            assert f"family {families[0]}, model " in name
