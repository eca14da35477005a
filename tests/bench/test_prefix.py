"""Small real runs of ``slaq bench prefix`` on the tiny model (CPU): structure, hits, parity."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from slaq.bench.prefix import PrefixBenchConfig, run_prefix_bench
from slaq.bench.prefix_cli import prefix


def _check_rounds(data: dict, expected_hit: int, rounds: int, prompt_len: int) -> None:
    assert len(data["rounds"]) == rounds
    assert {r["order"] for r in data["rounds"]} == (
        {"cached_first", "uncached_first"} if rounds > 1 else {"cached_first"})
    for row in data["rounds"]:
        # The first request and the caching-off baseline compute the whole prompt.
        assert row["first"]["num_cached_tokens"] == 0
        assert row["first"]["prefix_cache_hits_tokens"] == 0
        assert row["first"]["prefix_cache_queries_tokens"] == prompt_len
        assert row["second_uncached"]["num_cached_tokens"] == 0
        assert row["second_uncached"]["prefix_cache_hits_tokens"] == 0
        # The cached one takes exactly the prefix's whole blocks, whichever ran first.
        assert row["second_cached"]["num_cached_tokens"] == expected_hit
        assert row["second_cached"]["prefix_cache_hits_tokens"] == expected_hit
        assert row["outputs_identical"] and row["first_divergence"] is None
        for key in ("first", "second_cached", "second_uncached"):
            assert row[key]["ttft_ms"] > 0
    hits = data["hits"]
    assert hits["expected_hit_tokens"] == expected_hit
    assert hits["all_cached_hit_expected"] and hits["all_uncached_missed"]
    # Engine counters over the measured rounds: first + cached second query, one hit each.
    assert hits["prefix_cache_hits_tokens"] == rounds * expected_hit
    assert hits["prefix_cache_queries_tokens"] == rounds * 2 * prompt_len
    assert data["outputs_identical"] == {"rounds": rounds, "identical": rounds}
    medians = data["ttft_ms_median"]
    assert set(medians) == {"first", "second_cached", "second_uncached"}
    assert data["speedup_first_over_cached"] == pytest.approx(
        medians["first"] / medians["second_cached"], rel=0.01)


def test_prefix_bench_cli_hits_the_1024_token_prefix(tiny_model_path, tmp_path):
    out, png = tmp_path / "prefix.json", tmp_path / "prefix.png"
    result = CliRunner().invoke(prefix, [
        "--model", str(tiny_model_path), "--rounds", "2", "--warmup-rounds", "0",
        "--new-tokens", "4", "--threads", "1",
        "--out", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["bench"] == "prefix_cache"
    assert data["config"]["prefix_len"] == 1024 and data["config"]["suffix_len"] == 32
    _check_rounds(data, expected_hit=1024, rounds=2, prompt_len=1024 + 32)
    assert png.stat().st_size > 0


def test_prefix_bench_shares_only_whole_blocks(tiny_model_path):
    # 1024 = 21 * 48 + 16: the prefix's last 16 tokens share a block with the suffix, whose
    # first token differs between the requests, so that block is computed again.
    cfg = PrefixBenchConfig(model=str(tiny_model_path), rounds=1, warmup_rounds=0,
                            new_tokens=3, block_size=48, suffix_len=8)
    data = run_prefix_bench(cfg)
    _check_rounds(data, expected_hit=21 * 48, rounds=1, prompt_len=1024 + 8)


def test_prefix_bench_options_are_validated(tiny_model_path):
    with pytest.raises(ValueError):
        PrefixBenchConfig(model="m", suffix_len=0)
    with pytest.raises(ValueError):
        PrefixBenchConfig(model="m", prefix_len=8, block_size=16)
    result = CliRunner().invoke(prefix, ["--model", str(tiny_model_path), "--rounds", "0"])
    assert result.exit_code != 0
    assert "rounds" in result.output
