"""slaq.host reads the first processor's block of /proc/cpuinfo (here a file written by the test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slaq import host

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14

processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: another CPU
"""


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(host, "CPUINFO", path)
    return path


def test_the_first_processor_names_the_cpu(cpuinfo: Path) -> None:
    cpuinfo.write_text(CPUINFO)
    assert host.cpu_model_name() == "AMD EPYC 9B14"  # not confused with the "model" key
    assert host.cpu_family_model() == ["family 25", "model 17"]


def test_without_cpuinfo_the_cpu_is_unnamed(cpuinfo: Path) -> None:
    assert not cpuinfo.exists()
    assert host.cpu_model_name() == "cpu"
    assert host.cpu_family_model() == []


def test_a_cpuinfo_without_family_gives_what_it_has(cpuinfo: Path) -> None:
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Neoverse-N1\n")
    assert host.cpu_model_name() == "Neoverse-N1"
    assert host.cpu_family_model() == []


def test_the_capability_is_torchs() -> None:
    assert host.cpu_capability() == torch.backends.cpu.get_cpu_capability()
