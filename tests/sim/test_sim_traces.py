"""Loading and scaling the public traces (the real files in shared/traces)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from slaq.sim.traces import (
    TraceRequest,
    assign_tiers,
    load_azure,
    load_mooncake,
    load_trace,
    replicate,
    scale_time,
    scale_tokens,
    token_totals,
    window,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
AZURE = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = TRACES / "mooncake" / "conversation_trace.jsonl"

pytestmark = pytest.mark.skipif(not AZURE.exists() or not MOONCAKE.exists(),
                                reason="shared/traces not present")


def test_azure_rows_become_requests_relative_to_the_first_arrival():
    tr = load_azure(AZURE, limit=4)
    # 18:15:46.6805900, 18:15:50.9951690, ... from the file's first rows.
    assert [r.num_prompt_tokens for r in tr.requests] == [374, 396, 879, 91]
    assert [r.num_output_tokens for r in tr.requests] == [44, 109, 55, 16]
    assert tr.requests[0].arrival_s == 0.0
    assert tr.requests[1].arrival_s == pytest.approx(50.9951690 - 46.6805900)
    assert all(r.hash_ids == () for r in tr.requests)


def test_whole_traces_match_their_published_statistics():
    az = load_trace(AZURE)
    assert len(az) == 19_366
    assert az.duration_s == pytest.approx(3501.7, abs=0.1)
    mc = load_trace(MOONCAKE)
    assert len(mc) == 12_031
    assert mc.duration_s == pytest.approx(3537.0)
    prompt, output = token_totals(mc)
    assert prompt / len(mc) == pytest.approx(12_035, abs=1)
    assert all(len(r.hash_ids) == -(-r.num_prompt_tokens // 512) for r in mc.requests[:500])
    with pytest.raises(ValueError):
        load_trace("trace.parquet")


def test_mooncake_hash_ids_give_shared_prefix_tokens():
    tr = load_mooncake(MOONCAKE, limit=3)
    a, b = tr.requests[0], tr.requests[1]
    assert a.hash_ids[0] == b.hash_ids[0] == 0 and a.hash_ids[1] != b.hash_ids[1]
    ta, tb = a.prompt_token_ids(0), b.prompt_token_ids(1)
    assert len(ta) == a.num_prompt_tokens and len(tb) == b.num_prompt_tokens
    assert ta[:512] == tb[:512] and ta[512:1024] != tb[512:1024]
    no_hash = TraceRequest(0.0, 100, 5)
    assert no_hash.prompt_token_ids(1) != no_hash.prompt_token_ids(2)


def test_time_scaling_multiplies_the_rate_and_window_rebases():
    tr = window(load_azure(AZURE, limit=2000), 60.0, 120.0)
    assert tr.requests[0].arrival_s == 0.0 and tr.duration_s < 120.0
    fast = scale_time(tr, 4.0)
    assert fast.rate == pytest.approx(4.0 * tr.rate)
    assert [r.num_prompt_tokens for r in fast.requests] == [r.num_prompt_tokens
                                                            for r in tr.requests]


def test_replication_keeps_arrival_times_and_separates_prefixes():
    tr = load_mooncake(MOONCAKE, limit=300)
    rep = replicate(tr, 2.5, seed=1)
    assert 2.3 * len(tr) < len(rep) < 2.7 * len(tr)
    assert {r.arrival_s for r in rep.requests} == {r.arrival_s for r in tr.requests}
    span = 1 + max(h for r in tr.requests for h in r.hash_ids)
    copies = Counter(r.hash_ids[0] // span for r in rep.requests)
    assert set(copies) == {0, 1, 2}  # the third copy for about half the requests
    assert replicate(tr, 2.5, seed=1) == rep


def test_token_scaling_trims_hash_ids_to_the_new_length():
    tr = load_mooncake(MOONCAKE, limit=50)
    half = scale_tokens(tr, prompt_factor=0.5, output_factor=2.0)
    for old, new in zip(tr.requests, half.requests, strict=True):
        assert new.num_prompt_tokens == max(1, round(old.num_prompt_tokens * 0.5))
        assert new.num_output_tokens == max(1, round(old.num_output_tokens * 2.0))
        assert len(new.hash_ids) == -(-new.num_prompt_tokens // 512)
    with pytest.raises(ValueError):
        scale_tokens(tr, prompt_factor=0)


def test_tier_mix_is_seeded_and_close_to_20_50_15_15():
    tr = load_azure(AZURE)
    a = assign_tiers(tr, seed=7)
    assert a == assign_tiers(tr, seed=7)
    assert a != assign_tiers(tr, seed=8)
    counts = Counter(r.tier for r in a.requests)
    for tier, share in {"priority": 0.2, "default": 0.5, "flex": 0.15, "batch": 0.15}.items():
        assert counts[tier] / len(a) == pytest.approx(share, abs=0.02)
    only_flex = assign_tiers(tr, {"flex": 1.0})
    assert {r.tier for r in only_flex.requests} == {"flex"}
    with pytest.raises(ValueError):
        assign_tiers(tr, {"gold": 1.0})
