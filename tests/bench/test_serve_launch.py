"""``slaq bench serve --launch``: two policies, each on a fresh real stack, the same trace.

Real processes throughout (redis-server, PostgreSQL, gunicorn API, Celery beat, sim workers);
the ledger is the judge: every request the client sent must be finished there or have been
refused with a 429, in every run.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from slaq.bench.serve import ServeConfig
from slaq.bench.serve_launch import LaunchConfig, parse_runs, run_launch
from slaq.bench.stack import StackConfig
from slaq.sim.traces import Trace, TraceRequest

DEFAULT_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TIERS = ("priority", "default", "default", "flex", "batch")


def test_runs_and_roles():
    assert parse_runs("fifo, slaq-agg,fifo") == ("fifo", "slaq-agg")
    with pytest.raises(ValueError):
        parse_runs("fifo,lifo")
    agg = StackConfig(server_database_url="-", model_path="-", num_workers=3, name="a")
    assert [r for _, r in agg.roles()] == ["both"] * 3
    split = StackConfig(server_database_url="-", model_path="-", num_workers=4,
                        disaggregated=True, num_prefill=1, name="d")
    assert split.roles() == [("d-p0", "prefill"), ("d-d0", "decode"), ("d-d1", "decode"),
                             ("d-d2", "decode")]
    with pytest.raises(ValueError):
        StackConfig(server_database_url="-", model_path="-", policy="lifo")
    for bad in ({"num_blocks": 0}, {"max_num_seqs": 0}):
        with pytest.raises(ValueError):
            StackConfig(server_database_url="-", model_path="-", **bad)
        with pytest.raises(ValueError):
            LaunchConfig(server_database_url="-", model_path="-", **bad)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_launch_runs_each_policy_on_its_own_stack_and_accounts_for_every_request(
        tiny_model_path, tmp_path):
    server = (os.environ.get("SLAQ_TEST_DATABASE_URL") or os.environ.get("SLAQ_DATABASE_URL")
              or DEFAULT_SERVER_URL)
    trace = Trace("launch-test", tuple(
        TraceRequest(arrival_s=i * 0.25, num_prompt_tokens=24 + (i * 11) % 40,
                     num_output_tokens=6 + i % 5, tier=TIERS[i % len(TIERS)])
        for i in range(10)))
    # fifo aggregated, slaq disaggregated (1 prefill + 1 decode: KV goes over the sim
    # transport), so both hand-off paths and both queue layouts run.
    cfg = LaunchConfig(server_database_url=server, model_path=str(tiny_model_path),
                       out_dir=str(tmp_path / "launch"), runs=("fifo", "slaq"), num_workers=2,
                       sim_profile="llama-8b-h100", settle_timeout_s=60.0, plot=True,
                       num_blocks=256, max_num_seqs=8)
    serve = ServeConfig(base_url="http://127.0.0.1:1", api_key="-", max_wall_s=30.0,
                        drain_timeout_s=60.0, request_timeout_s=60.0)
    lines: list[str] = []
    combined = run_launch(trace, cfg, serve, {"trace": {"name": trace.name}}, echo=lines.append)

    assert list(combined["policies"]) == ["fifo", "slaq"]
    for run, summary in combined["policies"].items():
        recon = summary["reconciliation"]
        assert recon["sent"] == len(trace), (run, recon)
        for tier, counts in recon["per_tier"].items():
            assert counts["finished"] + counts["refused"] == counts["sent"], (run, tier, recon)
        assert (recon["lost_client"], recon["lost_ledger"]) == (0, 0), (run, recon)
        assert summary["still_active_in_ledger"] == 0
        assert summary["overall"]["sent"] == len(trace)
        assert set(summary["tiers"]) == {"priority", "default", "flex", "batch"}
        run_report = json.loads((tmp_path / "launch" / run / "report.json").read_text())
        assert run_report["label"] == run
        # Workers are `slaq worker` processes: KV pool and seats as asked, a thread per seat.
        logs = sorted((tmp_path / "launch" / run / "logs").glob(f"{run}-[wpd]*.log"))
        assert len(logs) == 2
        for path in logs:
            text = path.read_text()
            assert "8 seats, 256 KV blocks, 8 threads" in text, text[-3000:]
            assert "concurrency: 8 (thread)" in text
    assert combined["policies"]["fifo"]["stack"] == {
        "policy": "fifo", "disaggregated": False, "roles": {"both": 2}}
    assert combined["policies"]["slaq"]["stack"] == {
        "policy": "slaq", "disaggregated": True, "roles": {"prefill": 1, "decode": 1}}
    on_disk = json.loads((tmp_path / "launch" / "compare.json").read_text())
    assert list(on_disk["policies"]) == ["fifo", "slaq"]
    for key in ("comparison", "attainment", "ttft_cdf"):
        assert os.path.exists(on_disk["files"][key]), key
    assert "| slaq | all |" in combined["table"]
    # Progress: which run, and how far through the trace.
    assert any(line.startswith("== run 2/2: slaq") for line in lines)
    assert any(line.startswith("[fifo] t=") and "sent 10/10" in line for line in lines)
