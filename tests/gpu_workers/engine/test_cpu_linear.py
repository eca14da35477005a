"""MKL-prepacked fp32 linears (models/cpu_linear) against F.linear and the unpacked model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slaq.gpu_workers.engine.loader import load_model, load_model_config
from slaq.gpu_workers.engine.models.cpu_linear import (
    PackedLinear,
    mkl_packing_available,
    pack_linears,
    packed_row_sizes,
)

needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL")


def test_row_sizes_cover_a_full_decode_batch():
    assert packed_row_sizes(32) == (8, 32)
    assert packed_row_sizes(30) == (8, 32)
    assert packed_row_sizes(64) == (8, 64)
    assert packed_row_sizes(256) == (8, 64)  # larger batches fall back to F.linear
    assert packed_row_sizes(4) == (4,)
    assert packed_row_sizes(1) == (1,)


@needs_mkl
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_linear_for_every_row_count(bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(layer, (8, 32))
    assert packed.weight is layer.weight  # shared, not copied: a tied lm_head stays tied
    with torch.inference_mode():
        for rows in [1, 5, 8, 9, 17, 31, 32, 33, 100]:  # exact, padded and fallback sizes
            x = torch.randn(rows, 96)
            got, want = packed(x), F.linear(x, layer.weight, layer.bias)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_mkl
def test_padding_rows_do_not_leak_into_real_rows():
    torch.manual_seed(1)
    layer = nn.Linear(64, 64, bias=False)
    packed = PackedLinear(layer, (32,))
    x = torch.randn(32, 64)
    with torch.inference_mode():
        full = packed(x)
        for rows in (1, 7, 20):  # the same rows, padded with zeros instead of real data
            torch.testing.assert_close(packed(x[:rows]), full[:rows], rtol=1e-6, atol=1e-6)


@needs_mkl
def test_packed_model_matches_the_unpacked_one(tiny_model_path):
    mc = load_model_config(tiny_model_path)
    plain = load_model(tiny_model_path, mc, "cpu", torch.float32)
    packed = load_model(tiny_model_path, mc, "cpu", torch.float32)
    num = pack_linears(packed, (8, 32))
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


@needs_mkl
def test_a_size_is_packed_only_once_it_is_used():
    packed = PackedLinear(nn.Linear(32, 48, bias=False), (8, 32))
    assert packed._packed == {}
    with torch.inference_mode():
        packed(torch.randn(3, 32))
        packed(torch.randn(100, 32))  # larger than every size: F.linear, nothing packed
    assert set(packed._packed) == {8}
