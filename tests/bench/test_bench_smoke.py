"""Small real runs of ``slaq bench engine`` and ``slaq bench transfer`` (CPU, tiny sizes)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from slaq.bench.cli import bench


def test_engine_bench_matches_hf_and_writes_json_and_plot(tiny_model_path, tmp_path):
    out, png = tmp_path / "engine.json", tmp_path / "engine.png"
    result = CliRunner().invoke(bench, [
        "engine", "--model", str(tiny_model_path), "--batch-sizes", "1,3",
        "--prompt-len", "5:40", "--new-tokens", "6", "--prefill-batch", "2",
        "--prefill-len", "32", "--out", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [row["batch"] for row in data["decode"]] == [1, 3]
    for row in data["decode"]:
        ours = row["ours"]["eager"]
        assert ours["output_tokens"] == row["batch"] * 6
        assert row["hf_generate"]["output_tokens"] == row["batch"] * 6
        # Same fp32 model, same prompts, greedy: identical tokens.
        assert ours["greedy_parity"]["num_identical"] == row["batch"]
    assert data["prefill"]["ours"]["eager"]["prompt_tokens"] == 64
    assert data["prefill"]["hf_forward"]["prompt_tokens"] == 64
    assert png.stat().st_size > 0


def test_engine_bench_rejects_gpu_runners_on_cpu(tiny_model_path):
    result = CliRunner().invoke(bench, ["engine", "--model", str(tiny_model_path),
                                        "--runners", "graphs", "--no-hf"])
    assert result.exit_code != 0
    assert "CUDA" in result.output


def test_transfer_bench_checks_every_cpu_transport(tmp_path, redis_url):
    from slaq.gpu_workers.kv_transfer.nixl import nixl_available

    out, png = tmp_path / "transfer.json", tmp_path / "transfer.png"
    result = CliRunner().invoke(bench, [
        "transfer", "--sizes-mb", "1,2", "--iters", "3", "--redis-url", redis_url,
        "--out", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["lease_store"] == "redis"
    expected = {"local", "shm"} | ({"nixl"} if nixl_available() else set())
    assert {r["transport"] for r in data["results"]} == expected
    for row in data["results"]:
        assert row["correct"], row
        assert row["num_blocks"] == row["size_mb"]  # 1 MiB fp32 blocks on CPU
        assert row["lease_to_pulled_ms_p50"] > 0
    assert [b["size_mb"] for b in data["baseline"]["results"]] == [1, 2]
    assert png.stat().st_size > 0


def test_bench_options_are_validated():
    runner = CliRunner()
    assert runner.invoke(bench, ["transfer", "--sizes-mb", "x"]).exit_code != 0
    assert runner.invoke(bench, ["transfer", "--sizes-mb", "0"]).exit_code != 0
    with pytest.raises(ValueError):
        from slaq.bench.engine import EngineBenchConfig

        EngineBenchConfig(model="m", prompt_len=(10, 5))
