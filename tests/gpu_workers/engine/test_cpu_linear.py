"""Fast CPU fp32 matmuls (models/cpu_linear): oneDNN's bf16 math mode keeps fp32 accuracy;
oneDNN-prepacked linears against F.linear, fp64 and the unpacked model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slaq.gpu_workers.engine.loader import load_model, load_model_config
from slaq.gpu_workers.engine.models.cpu_linear import (
    FP32_ERROR_BOUND,
    Bf16MathLinear,
    PackedLinear,
    bf16_instructions_available,
    bf16_linears,
    bf16_math_error,
    bf16_matmul_available,
    fp32_matmul_precision,
    onednn_packing_available,
    pack_linears,
    unpack_linears,
)

needs_onednn = pytest.mark.skipif(not onednn_packing_available(),
                                  reason="torch built without oneDNN")
needs_bf16 = pytest.mark.skipif(
    not bf16_matmul_available(),
    reason="no oneDNN, no bf16 instructions, or a bf16 mode that loses fp32 accuracy here")


def test_the_precision_mode_is_scoped_and_validated():
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with pytest.raises(KeyError), fp32_matmul_precision("bf16"):
        assert matmul.fp32_precision == "bf16"
        raise KeyError("an error inside the block still restores the mode")
    assert matmul.fp32_precision == before
    with pytest.raises(ValueError), fp32_matmul_precision("tf32"):
        raise AssertionError("an unknown precision is refused before the block runs")
    assert matmul.fp32_precision == before


@needs_bf16
@pytest.mark.parametrize("rows", [1, 32, 600])
def test_bf16_math_mode_keeps_fp32_accuracy(rows):
    """fp32 in and out, errors of fp32's order: rounding the inputs to bf16 instead would be
    about 2e-3 of the output's scale, strict fp32 is about 5e-7."""
    torch.manual_seed(0)
    w = torch.randn(1536, 576) * 0.05
    x = torch.randn(rows, 576)
    ref = x.double() @ w.double().T
    with fp32_matmul_precision("bf16"):
        got = F.linear(x, w)
    assert got.dtype == torch.float32
    rounded = x.bfloat16().double() @ w.bfloat16().double().T
    scale = ref.abs().max()
    assert (rounded - ref).abs().max() / scale > 1e-3  # what plain bf16 would cost
    assert (got.double() - ref).abs().max() / scale < 1e-5


def test_the_bf16_mode_is_taken_only_where_it_keeps_fp32_accuracy(tiny_model_path):
    """Some CPUs (Intel with AMX) honour the mode by rounding inputs to bf16: the probe must
    see it and leave the model's linears strict there; where it swaps them, each of the
    model's own layers keeps fp32's accuracy at a row count the probe did not try."""
    mc = load_model_config(tiny_model_path)
    model = load_model(tiny_model_path, mc, "cpu", torch.float32)
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    swapped = bf16_linears(model)
    torch.manual_seed(2)
    if swapped:
        assert bf16_matmul_available(shapes)
        assert swapped == 4 * mc.num_layers + 1
        for layer in (m for m in model.modules() if isinstance(m, Bf16MathLinear)):
            x = torch.randn(48, layer.weight.shape[1])
            ref = x.double() @ layer.weight.double().T
            with torch.inference_mode():
                err = (layer(x).double() - ref).abs().max() / ref.abs().max()
            assert err < FP32_ERROR_BOUND
    else:
        assert not bf16_matmul_available(shapes)
        assert not any(isinstance(m, Bf16MathLinear) for m in model.modules())
        if bf16_instructions_available():  # refused for accuracy: some shape really loses it
            assert max(bf16_math_error(*shape) for shape in shapes) >= FP32_ERROR_BOUND


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_linear_for_every_row_count(bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(layer)
    assert packed.weight is layer.weight  # shared, not copied: a tied lm_head stays tied
    with torch.inference_mode():
        for rows in [1, 5, 8, 9, 17, 31, 32, 33, 100, 700]:  # decode to prefill sizes
            x = torch.randn(rows, 96)
            got, want = packed(x), F.linear(x, layer.weight, layer.bias)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 32, 600])
def test_packed_keeps_fp32_accuracy(rows):
    """Errors of fp32's order against fp64 (bf16 inputs would be about 2e-3 of the scale)."""
    torch.manual_seed(0)
    layer = nn.Linear(576, 1536, bias=False)
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        got = PackedLinear(layer)(x)
    ref = x.double() @ layer.weight.double().T
    assert (got.double() - ref).abs().max() / ref.abs().max() < FP32_ERROR_BOUND


@needs_onednn
def test_rows_do_not_depend_on_the_batch_around_them():
    """A sequence's logits must not change with who else is in the batch (seeded sampling
    alone or in a batch of 16 relies on it)."""
    torch.manual_seed(1)
    layer = nn.Linear(64, 64, bias=False)
    packed = PackedLinear(layer)
    x = torch.randn(32, 64)
    with torch.inference_mode():
        full = packed(x)
        for rows in (1, 7, 20):
            torch.testing.assert_close(packed(x[:rows]), full[:rows], rtol=1e-6, atol=1e-6)


@needs_bf16
def test_bf16_math_model_matches_the_strict_one(tiny_model_path):
    mc = load_model_config(tiny_model_path)
    plain = load_model(tiny_model_path, mc, "cpu", torch.float32)
    fast = load_model(tiny_model_path, mc, "cpu", torch.float32)
    assert bf16_linears(fast) == 4 * mc.num_layers + 1
    assert all(type(m) is not nn.Linear for m in fast.modules())
    if mc.tie_word_embeddings:
        assert fast.lm_head.weight is fast.embed_tokens.weight
    assert isinstance(fast.lm_head, Bf16MathLinear)
    hidden = torch.randn(12, mc.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(fast.compute_logits(hidden), plain.compute_logits(hidden),
                                   rtol=1e-5, atol=1e-5)
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # set only inside a layer
    assert unpack_linears(fast) == 4 * mc.num_layers + 1
    assert not any(isinstance(m, Bf16MathLinear) for m in fast.modules())


def test_a_single_row_stays_on_the_strict_path():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    fast = Bf16MathLinear(layer)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        assert torch.equal(fast(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_packed_model_matches_the_unpacked_one(tiny_model_path):
    mc = load_model_config(tiny_model_path)
    plain = load_model(tiny_model_path, mc, "cpu", torch.float32)
    packed = load_model(tiny_model_path, mc, "cpu", torch.float32)
    num = pack_linears(packed)
    assert num == 4 * mc.num_layers + 1  # qkv, o, gate_up, down per layer, and lm_head
    assert all(type(m) is not nn.Linear for m in packed.modules())
    if mc.tie_word_embeddings:
        assert packed.lm_head.weight is packed.embed_tokens.weight
    hidden = torch.randn(12, mc.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(packed.compute_logits(hidden), plain.compute_logits(hidden),
                                   rtol=1e-5, atol=1e-5)
        for a, b in zip(packed.layers, plain.layers, strict=True):
            torch.testing.assert_close(a.mlp(hidden, packed.ops), b.mlp(hidden, plain.ops),
                                       rtol=1e-5, atol=1e-5)
    assert unpack_linears(packed) == num
    assert all(not isinstance(m, PackedLinear) for m in packed.modules())
