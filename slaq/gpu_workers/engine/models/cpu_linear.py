"""Fast fp32 matmuls on CPU: linear layers with oneDNN-prepacked weights (the default), or
oneDNN's bf16 math mode where the CPU has bf16 instructions and the mode is accurate.

**bf16 math mode** (:class:`Bf16MathLinear`, :func:`fp32_matmul_precision`): with
``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` fp32 matmuls go to oneDNN, which may
use the CPU's bf16 dot-product instructions while inputs, outputs and accumulation stay fp32.
Only the linear layers take it: oneDNN copies strided operands first, so the decode attention's
batched matmuls over views of the K/V copy ran 2.5x slower under it (1.10 ms against 0.45 ms for
32 rows of 400 keys). It is used only with ``EngineConfig.cpu_matmul_precision="bf16"``, and
only where :func:`bf16_matmul_available` finds it accurate. On the 2-core AVX512-BF16 EPYC of
stops 9-12 it ran the model's projections about 2x faster than MKL's ``sgemm`` with errors of
fp32's order (about 1e-6 of the output's scale). On stop 14's Zen 4 EPYC (also AVX512-BF16) it
was not bf16 arithmetic: the same mode applied to prepacked weights gave bitwise the outputs of
strict fp32, and the packed strict layers below were faster than it at every row count (30
layers of SmolLM2's projections at 1 / 8 / 32 / 128 / 1,024 rows: 21 / 18 / 49 / 140 / 1,062 ms
packed, 24 / 32 / 61 / 152 / 1,153 ms under the mode, ``F.linear`` 36 / 51 / 86 / 190 / 1,293
ms; the 49152x576 LM head at 32 rows 11.8 ms packed, 15.5 ms under the mode, 30.0 ms
``F.linear``). On an Intel Xeon with AMX the mode rounds inputs to bf16 (2.4e-3 of the output's
scale), and the probe keeps it off there.

**Prepacked weights** (:class:`PackedLinear`): ``F.linear`` goes to MKL's ``sgemm``, which
re-packs the weight into its blocked layout on every call; at decode's handful of rows that
packing costs about as much as the arithmetic. oneDNN's linear with the weight reordered once
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what Inductor uses when
it freezes a CPU model) takes any row count. On stop 13's 2-core AVX2 AMD EPYC, SmolLM2-135M's
30 layers of projections (distinct weights, so nothing stays in cache) took 25 / 32 / 84 /
226 / 1,533 ms at 1 / 8 / 32 / 128 / 1,024 rows, against ``F.linear``'s 40 / 73 / 135 / 244 /
1,588 ms and MKL's own prepacked ``sgemm`` (one packing per row count, the path it replaced)
at 31 / 94 / 129 / 276 ms; the 49152x576 LM head at 32 rows 17 ms against 33 ms. Errors are
fp32's (about 2.6e-6 of the LM head's outputs against fp64, ``F.linear`` 1e-6).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


# Largest error a probe matmul may show under the bf16 math mode, over its output's largest
# value (strict fp32: about 5e-7; inputs rounded to bf16: about 2.5e-3).
FP32_ERROR_BOUND = 1e-5


# The weight shape probed when no model's shapes are given: SmolLM2-135M's gate/up half.
DEFAULT_PROBE_SHAPE = (1536, 576)
# Output features probed at most per shape (a 49152-row LM head is probed on its first rows:
# the fp64 reference would otherwise cost seconds).
MAX_PROBE_OUT_FEATURES = 4096
_PROBE_LOCK = threading.Lock()


def bf16_matmul_available(shapes: Iterable[tuple[int, int]] = (DEFAULT_PROBE_SHAPE,)) -> bool:
    """True where oneDNN runs fp32 matmuls faster with bf16 instructions *and* keeps fp32's
    accuracy doing so for every weight shape in ``shapes`` (``(out_features, in_features)``).

    What the mode does is the CPU's and oneDNN's choice, so it is measured, not inferred from
    the CPU's flags: on an AVX512-BF16 AMD EPYC (torch 2.13) it kept errors of fp32's order,
    while on an Intel Xeon with AMX the same setting rounds the inputs to bf16 (2.4e-3 of the
    output's scale; greedy outputs diverged from HF's in 3 of 32 benchmark requests). There
    the engine keeps strict fp32. oneDNN picks its kernel by shape, so each shape is probed."""
    if not bf16_instructions_available():
        return False
    return all(bf16_math_error(*shape) < FP32_ERROR_BOUND for shape in set(shapes))


def bf16_instructions_available() -> bool:
    """Whether oneDNN is built in and the CPU has bf16 instructions (AVX512-BF16 or AMX):
    where the mode could be fast at all, whatever it does to accuracy."""
    if not torch.backends.mkldnn.is_available():
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@functools.cache
def bf16_math_error(out_features: int = DEFAULT_PROBE_SHAPE[0],
                    in_features: int = DEFAULT_PROBE_SHAPE[1]) -> float:
    """The bf16 math mode's largest error against fp64 for a random weight of this shape at a
    few row counts, relative to the output's largest value (once per shape and process;
    tens of milliseconds)."""
    with _PROBE_LOCK:  # the mode is process-wide: two probes at once could leave it set
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(min(out_features, MAX_PROBE_OUT_FEATURES), in_features,
                        generator=gen) / in_features ** 0.5
        worst = 0.0
        for rows in (2, 32, 512):  # oneDNN picks its kernel by the row count too
            x = torch.randn(rows, in_features, generator=gen)
            ref = x.double() @ w.double().T
            with fp32_matmul_precision("bf16"):
                got = F.linear(x, w)
            worst = max(worst, float((got.double() - ref).abs().max() / ref.abs().max()))
        return worst


@contextmanager
def fp32_matmul_precision(precision: str) -> Iterator[None]:
    """oneDNN's fp32 matmul precision (``"ieee"`` or ``"bf16"``) inside the block.

    The setting is process-wide: the previous value comes back on exit, so code running
    after the block (an HF baseline in a benchmark) computes as before. A matmul another
    thread runs meanwhile takes the mode too: the engine enters it only where
    :func:`bf16_matmul_available` found it accurate, so there only that matmul's speed
    changes; elsewhere (the probe, a benchmark's ``--hf-bf16`` run) it would round."""
    if precision not in ("ieee", "bf16"):
        raise ValueError(f"precision must be 'ieee' or 'bf16', got {precision!r}")
    matmul = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = saved


class Bf16MathLinear(nn.Module):
    """``F.linear`` under oneDNN's bf16 math mode (fp32 in and out) for inputs of at least
    ``min_rows`` rows; shares the wrapped layer's parameters (a tied ``lm_head`` stays tied).

    A single row stays on MKL's strict path: there oneDNN's call overhead outweighs the
    arithmetic (SmolLM2's four projections of a layer took 0.36 ms against 0.19 ms; from two
    rows on the bf16 mode is faster, 0.35 against 0.39)."""

    def __init__(self, linear: nn.Linear, min_rows: int = 2) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] < self.min_rows:
            return F.linear(x, self.weight, self.bias)
        with fp32_matmul_precision("bf16"):
            return F.linear(x, self.weight, self.bias)


def bf16_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` in ``model`` by a :class:`Bf16MathLinear`;
    returns how many (0 where :func:`bf16_matmul_available` is False for any of the model's
    weight shapes: all of them take the mode or none does)."""
    shapes = {tuple(mod.weight.shape) for mod in model.modules() if _fp32_cpu_linear(mod)}
    if not shapes or not bf16_matmul_available(shapes):
        log.info("oneDNN's bf16 math mode is missing or inexact here: CPU linears stay "
                 "strict fp32")
        return 0
    return _swap_modules(model,
                         lambda mod: Bf16MathLinear(mod) if _fp32_cpu_linear(mod) else None)


def onednn_packing_available() -> bool:
    """True where torch has oneDNN and exposes its prepacked-linear ops (x86 builds)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """``F.linear`` with the weight reordered once into oneDNN's blocked layout.

    Shares the wrapped layer's parameters (a tied ``lm_head`` stays tied); the packing is a
    copy (the weight's bytes once more), so the weights must not change afterwards (they are
    frozen for inference). One packing serves every row count.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        assert self.weight.dtype == torch.float32 and self.weight.device.type == "cpu", (
            "oneDNN packs fp32 CPU weights here")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias,
                                                  "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` in ``model`` by a :class:`PackedLinear`; returns
    how many.

    Does nothing (returns 0) where oneDNN's packed linear is unavailable: the plain layers
    are correct everywhere, only slower."""
    if not onednn_packing_available():
        log.info("oneDNN packed linear unavailable: CPU linears stay unpacked")
        return 0
    return _swap_modules(model, lambda mod: PackedLinear(mod) if _fp32_cpu_linear(mod) else None)


def _fp32_cpu_linear(mod: nn.Module) -> bool:
    """A plain ``nn.Linear`` with fp32 weights on CPU: what both swaps above replace."""
    return (isinstance(mod, nn.Linear) and mod.weight.dtype == torch.float32
            and mod.weight.device.type == "cpu")


def unpack_linears(model: nn.Module) -> int:
    """Put plain ``nn.Linear`` layers back (sharing the weights) where :func:`pack_linears` or
    :func:`bf16_linears` swapped them; returns how many. For comparing against the plain
    model in one process."""
    def plain(mod: nn.Module) -> nn.Linear | None:
        if not isinstance(mod, PackedLinear | Bf16MathLinear):
            return None
        out_features, in_features = mod.weight.shape
        layer = nn.Linear(in_features, out_features, bias=mod.bias is not None, device="meta")
        layer.weight, layer.bias = mod.weight, mod.bias
        return layer

    return _swap_modules(model, plain)


def _swap_modules(model: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace each submodule for which ``replace`` returns a module; returns how many."""
    swaps = [(name, new) for name, mod in model.named_modules()
             if (new := replace(mod)) is not None]
    for name, new in swaps:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return len(swaps)
