"""Calibrated cost profiles: the fit, its held-out check, the JSON store, ``slaq sim calibrate``
from recorded samples, and the GPU recorder script run on a CPU with the tiny model."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from slaq.gpu_workers.engine import profiles_store as store
from slaq.gpu_workers.engine.cost_model import (
    PROFILES,
    StepSample,
    all_profiles,
    calibrate,
    error_summary,
    get_profile,
    holdout_split,
)
from slaq.sim.calibration import fastest_of, fit
from slaq.sim.cli import sim

ROOT = Path(__file__).resolve().parents[2]
BASE = get_profile("smollm2-135m-cpu")
# An additive (CPU-like) engine with known constants; its linear rate (120 GFLOP/s) beats the
# base profile's placeholder peak (100 GFLOP/s), which the fit must absorb, not clip.
TRUTH = replace(BASE, overhead_s=0.004, seq_overhead_s=0.002, mfu=1.0, attn_eff=0.1,
                bw_eff=0.25)
TRUTH = replace(TRUTH, hardware=replace(BASE.hardware, peak_flops=120e9))


def grid_samples(profile=TRUTH, lens=(16, 64, 256, 512), batches=(1, 4, 16), decode_steps=3):
    """What a grid measurement of an engine that runs exactly like ``profile`` would record:
    per cell one prefill step, then decode steps at growing context."""
    out = []
    for length in lens:
        for batch in batches:
            chunks = ((0, length),) * batch
            out.append(StepSample(chunks, profile.step_time(chunks), (length, batch)))
            for k in range(decode_steps):
                chunks = ((length + k, 1),) * batch
                out.append(StepSample(chunks, profile.step_time(chunks), (length, batch)))
    return out


def test_calibrate_recovers_a_known_profile_and_predicts_held_out_cells():
    samples = grid_samples()
    fitted = calibrate(BASE, samples, name="known")
    assert fitted.overhead_s == pytest.approx(0.004, rel=1e-6)
    assert fitted.seq_overhead_s == pytest.approx(0.002, rel=1e-6)
    assert fitted.attn_eff * fitted.hardware.peak_flops == pytest.approx(0.1 * 120e9, rel=1e-6)
    assert fitted.bw_eff * fitted.hardware.hbm_bandwidth == pytest.approx(0.25 * 20e9, rel=1e-6)
    # The machine beats the placeholder peak: the peak rises to the achieved rate, mfu 1.
    assert fitted.hardware.name == "cpu-2core-fitted"
    assert fitted.hardware.peak_flops == pytest.approx(120e9, rel=1e-6)
    assert fitted.mfu == pytest.approx(1.0)
    assert error_summary(fitted, samples)["p90_rel_err"] < 1e-6

    fit_part, held = holdout_split(samples)
    assert {s.cell for s in held} == {(16, 4), (64, 1), (64, 16), (256, 4), (512, 1), (512, 16)}
    assert {s.cell[0] for s in fit_part} == {16, 64, 256, 512}  # every length is fitted
    assert {s.cell[1] for s in fit_part} == {1, 4, 16}
    partial = calibrate(BASE, fit_part)
    assert error_summary(partial, held)["max_rel_err"] < 1e-6


def test_fit_reports_held_out_error_and_a_noisy_engine_shows_in_it():
    exact = fit(BASE, BASE.name, grid_samples(), "exact", {"device": "test"})
    assert exact.fit_error["heldout"]["max_rel_err"] < 1e-6
    assert exact.fit_error["heldout"]["num_fitted"] + exact.fit_error["heldout"][
        "num_samples"] == exact.num_samples
    # Every other step 30% slow: no linear profile fits that, and the errors say so.
    noisy = [replace(s, seconds=s.seconds * (1.3 if i % 2 else 1.0))
             for i, s in enumerate(grid_samples())]
    rough = fit(BASE, BASE.name, noisy, "rough", {"device": "test"})
    assert rough.fit_error["all"]["median_rel_err"] > 0.05
    assert rough.fit_error["heldout"]["p90_rel_err"] > 0.05
    with pytest.raises(ValueError, match="2 x 2"):
        holdout_split(grid_samples(lens=(64,), batches=(1, 4)))


def test_fastest_of_keeps_each_steps_fastest_time():
    a = grid_samples(lens=(16,), batches=(1,), decode_steps=2)
    b = [replace(s, seconds=s.seconds * f) for s, f in zip(a, (2.0, 0.5, 1.0), strict=True)]
    best = fastest_of([a, b])
    assert [s.seconds for s in best] == [a[0].seconds, b[1].seconds, a[2].seconds]
    with pytest.raises(ValueError, match="differs"):
        fastest_of([a, list(reversed(a))])
    with pytest.raises(ValueError):
        StepSample(((0, 1),), 0.0)


def test_profile_json_round_trip_and_lookup_by_path(tmp_path):
    samples = grid_samples()
    record = fit(BASE, BASE.name, samples, "round-trip", {"device": "test"},
                 {"grid": {"prompt_lens": [16, 64, 256, 512]}})
    path, spath = store.write_profile(tmp_path / "round-trip.json", record, samples,
                                      {"base": BASE.name})
    assert spath == tmp_path / "round-trip.samples.json"
    back = store.read_profile(path)
    assert back.profile == record.profile
    assert (back.base, back.date, back.num_samples) == (BASE.name, record.date, len(samples))
    assert back.fit_error == json.loads(json.dumps(record.fit_error))
    assert back.extra["samples_file"] == "round-trip.samples.json"
    read, meta = store.read_samples(spath)
    assert read == samples and meta == {"base": BASE.name}
    # A directory of profiles (samples files skipped), and any profile file by its path.
    assert list(store.calibrated_profiles(tmp_path)) == ["round-trip"]
    assert get_profile(str(path)) == record.profile
    bad = tmp_path / "bad" / "x.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({**store.record_to_dict(record), "format": 99}))
    with pytest.raises(ValueError, match="format"):
        store.calibrated_profiles(bad.parent)


def test_get_profile_knows_the_committed_calibrated_profile():
    committed = store.calibrated_profiles()
    assert "smollm2-135m-cpu-measured" in committed
    record = committed["smollm2-135m-cpu-measured"]
    profile = get_profile("smollm2-135m-cpu-measured")
    assert profile is record.profile and "smollm2-135m-cpu-measured" not in PROFILES
    assert profile.model == BASE.model and not profile.overlap
    assert record.base == "smollm2-135m-cpu" and record.measured_on["device"] == "cpu"
    assert record.num_samples >= 4
    for part in ("all", "heldout"):
        assert 0 <= record.fit_error[part]["median_rel_err"] <= record.fit_error[part][
            "p90_rel_err"]
    assert (store.PROFILES_DIR / record.extra["samples_file"]).is_file()
    assert set(PROFILES) | set(committed) == set(all_profiles())
    with pytest.raises(ValueError, match="smollm2-135m-cpu-measured"):
        get_profile("no-such-profile")  # the error lists calibrated names too


def test_cli_fits_recorded_samples_and_lists_the_result(tmp_path):
    samples_file = store.write_samples(tmp_path / "rec.samples.json", grid_samples(),
                                       {"base_profile": store.profile_to_dict(BASE),
                                        "measured_on": {"device": "elsewhere"}})
    out_file = tmp_path / "profiles" / "from-samples.json"
    runner = CliRunner()
    res = runner.invoke(sim, ["calibrate", "--samples", str(samples_file), "--name",
                              "from-samples", "--out", str(out_file)])
    assert res.exit_code == 0, res.output
    record = store.read_profile(out_file)
    assert record.name == "from-samples" and record.base == BASE.name
    assert record.measured_on == {"device": "elsewhere"}
    assert record.profile.overhead_s == pytest.approx(0.004, rel=1e-6)
    assert record.fit_error["heldout"]["max_rel_err"] < 1e-6
    assert store.read_samples(store.samples_path(out_file))[0] == grid_samples()
    res = runner.invoke(sim, ["calibrate"])
    assert res.exit_code != 0 and "give --model" in res.output
    res = runner.invoke(sim, ["calibrate", "--samples", str(samples_file), "--model", "x"])
    assert res.exit_code != 0 and "only serves --validate" in res.output
    res = runner.invoke(sim, ["profiles"])
    listed = json.loads(res.output)
    assert listed["smollm2-135m-cpu-measured"]["calibration"]["base"] == "smollm2-135m-cpu"
    assert "calibration" not in listed["llama-8b-h100"]


def test_gpu_recorder_script_runs_on_a_cpu_with_the_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_calibrate",
                                                  ROOT / "scripts" / "gpu_calibrate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main([str(tmp_path), "--tiny", "--device", "cpu"])
    samples, meta = store.read_samples(tmp_path / "calib.samples.json")
    assert {s.cell for s in samples} == {(8, 1), (8, 4), (32, 1), (32, 4)}
    assert meta["measured_on"]["device"] == "cpu" and meta["grid"]["max_tokens"] == 4
    base = store.profile_from_dict(meta["base_profile"])
    assert base.model.num_layers == 2 and base.model.head_dim == 16
    written = json.loads((tmp_path / "calib.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert store.record_from_dict(written).name == "tiny-random-cpu-2core-measured"
    check = written["validation"]
    # The sim engine on the fitted profile schedules the same steps as the real engine.
    assert check["sim_num_steps"] == check["num_steps"] > 0
    assert check["predicted_s"] == pytest.approx(check["predicted_same_steps_s"], rel=1e-3)
