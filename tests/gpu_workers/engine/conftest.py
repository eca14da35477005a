"""Shared by the C kernel tests: a kernel built as for a CPU without AVX-512, so that its
plain and AVX2 paths run here too."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import pytest

from slaq.gpu_workers.engine.cpu_kernels import FLAGS, compile_shared


@pytest.fixture
def without_avx512() -> Callable[[Path], ctypes.CDLL]:
    """``without_avx512(source)``: the library compiled with ``-mno-avx512f``; skips the test
    where the compiler does not take that flag (not x86)."""
    def build(source: Path) -> ctypes.CDLL:
        try:
            return ctypes.CDLL(str(compile_shared(source, (*FLAGS, "-mno-avx512f"))))
        except RuntimeError:
            pytest.skip("the compiler takes no -mno-avx512f here")
    return build
