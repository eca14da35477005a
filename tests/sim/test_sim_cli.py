"""``slaq sim``: compare policies on a short window of the real Azure trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slaq.sim.cli import sim

AZURE = (Path(__file__).resolve().parents[3] / "shared" / "traces" / "azure_llm_2023"
         / "AzureLLMInferenceTrace_conv.csv")


@pytest.mark.skipif(not AZURE.exists(), reason="shared/traces not present")
def test_compare_writes_tables_json_and_plot(tmp_path):
    result = CliRunner().invoke(sim, [
        "compare", "--trace", str(AZURE), "--gpus", "2", "--duration", "60",
        "--runs", "fifo,slaq-agg", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| fifo | priority |" in result.output and "| slaq-agg |" in result.output
    stem = "AzureLLMInferenceTrace_conv-2gpu-llama-8b-h100"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["fifo", "slaq-agg"]
    # The trace was scaled to 1.3x the capacity measured for this cluster.
    assert data["arrival_rate"] == pytest.approx(1.3 * data["sustainable_rate_measured"],
                                                 rel=0.01)
    assert all(r["num_lost"] == 0 for r in data["runs"])
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    assert (tmp_path / f"{stem}.md").read_text().startswith("| run |")


def test_profiles_and_policy_bench_commands():
    runner = CliRunner()
    out = runner.invoke(sim, ["profiles"])
    assert out.exit_code == 0
    profiles = json.loads(out.output)
    assert profiles["llama-8b-h100"]["hardware"]["hbm_bandwidth"] == 3.35e12
    out = runner.invoke(sim, ["bench-policy", "--workers", "8", "--queued", "200"])
    assert out.exit_code == 0
    assert json.loads(out.output)["num_workers"] == 8


def test_calibrate_command_fits_our_engine(tiny_model_path):
    out = CliRunner().invoke(sim, ["calibrate", "--model", str(tiny_model_path)])
    assert out.exit_code == 0, out.output
    profile = json.loads(out.output)
    assert profile["name"] == "smollm2-135m-cpu-measured" and profile["overlap"] is False
    assert profile["num_samples"] >= 9 * 8  # 3 lengths x 3 batch sizes, 8 tokens each
    for key in ("mfu", "attn_eff", "bw_eff"):
        assert 0 < profile[key] <= 1


def test_feasibility_command_reports_a_ceiling_per_tier(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 * i, "input_length": n, "output_length": 8, "hash_ids": []}
            for i, n in enumerate([500, 2_000, 150_000] * 20)]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runner = CliRunner()
    out = runner.invoke(sim, ["feasibility", "--trace", str(trace), "--ways", "1,8"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["num_requests"] == 60
    for tier, by_k in data["infeasible_share"].items():
        assert by_k["1"] >= by_k["8"]
        assert data["attainment_ceiling"][tier]["1"] == pytest.approx(1 - by_k["1"])
    assert data["infeasible_share"]["priority"]["1"] > 0  # the 150k-token prompts
    assert data["infeasible_share"]["batch"]["1"] == 0
    bad = runner.invoke(sim, ["feasibility", "--trace", str(trace), "--ways", "0"])
    assert bad.exit_code != 0 and "--ways" in bad.output
