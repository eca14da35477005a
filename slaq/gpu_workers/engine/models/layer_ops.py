"""The element-wise pieces of a decoder layer: eager, fused by ``torch.compile`` (CUDA), or
in C (CPU fp32, :func:`cpu_kernel_ops`).

A decode step of a small model at batch 1 is a few hundred kernels, most of them tiny
element-wise ones (residual adds, norms, the rotary rotation, SiLU * up) that each cost a launch
slot of a few microseconds even inside a CUDA graph. Inductor fuses each function below into one
kernel; matmuls and attention stay as they are. On CPU the same dispatch cost per op is paid
without a launch queue to hide it, so each function there is one C call (see
``cpu_kernels/layer_ops.c``; the rotation is bitwise torch's, the norm and SiLU within a few
ulp).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, D]`` (rotate-half convention, as HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One op instead of six; equal to the reference within rounding in every dtype.
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: a residual add and the next norm."""
    residual = x + residual
    return F.rms_norm(residual, weight.shape, weight, eps), residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for the fused gate/up projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    # In place: at a prefill chunk of thousands of tokens each temporary is ~100 MB.
    return F.silu(gate).mul_(up)


@dataclass(frozen=True, slots=True)
class LayerOps:
    """The element-wise functions a decoder layer calls.

    ``add_rms_norm(x, residual, ...)`` may write the sum into ``residual`` (the C kernels do):
    a caller must not read ``residual`` afterwards except through the returned tensor."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]
    rotary: Callable[..., torch.Tensor]


EAGER_OPS = LayerOps(rms_norm, add_rms_norm, silu_mul, apply_rotary)


class _FallbackCompiled:
    """``torch.compile(fn)``, falling back to ``fn`` for good if compiling fails: a missing
    compiler toolchain must cost speed, never a worker."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=True,
                                                                 fullgraph=True)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                log.warning("torch.compile of %s failed, running it eagerly: %s",
                            self.fn.__name__, exc)
                self.compiled = None
        return self.fn(*args)


@functools.cache
def compiled_ops() -> LayerOps:
    """The same functions through Inductor (CUDA: one Triton kernel each); one set per
    process, so every engine in it shares the compiled kernels."""
    return LayerOps(*(_FallbackCompiled(getattr(EAGER_OPS, f.name)) for f in fields(LayerOps)))


def cpu_kernel_ops() -> LayerOps | None:
    """The functions as C kernels for fp32 CPU tensors, or None where they cannot be built
    (no C compiler): the caller keeps the eager ones."""
    # Imported on use: every model imports this module, and CUDA engines never need the
    # C loader.
    from slaq.gpu_workers.engine.cpu_kernels import load_layer_ops

    kernel = load_layer_ops()
    if kernel is None:
        return None
    return LayerOps(kernel.rms_norm, kernel.add_rms_norm, kernel.silu_mul, kernel.rotary)
