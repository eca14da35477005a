"""Record our engine's step times on a GPU for a calibrated cost profile; JSON into a directory.

    python scripts/gpu_calibrate.py OUT_DIR                   # Llama-3.2-1B-shaped random bf16
    python scripts/gpu_calibrate.py OUT_DIR --tiny --device cpu   # the CPU smoke test's model

Writes ``OUT_DIR/calib.samples.json`` (every measured step, and the base profile: the model's
shape from its config.json on the GPU's datasheet figures) and ``OUT_DIR/calib.json`` (the
profile fitted on the spot, its held-out error and a validation run). Back on any machine,
``slaq sim calibrate --samples OUT_DIR/calib.samples.json --out slaq/sim/profiles/NAME.json``
refits them into a committed profile. The random model is built where scripts/gpu_bench.py
builds it, so a GPU check that ran its engine step first reuses it. Takes about a minute on an
H100 (``--budget-s`` caps the measuring after the warm-up); needs torch, not click.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed slaq
    sys.path.insert(0, str(ROOT))

MODEL_DIR = Path(tempfile.gettempdir()) / "slaq-gpu-check" / "llama-3.2-1b-random"
# (prompt lengths, batch sizes, new tokens, per-step token budget) per device kind.
GRIDS = {"cuda": ((64, 256, 1024, 2048), (1, 8, 32, 128), 16, 8192),
         "cpu": ((8, 32), (1, 4), 4, 512)}
# Validation workload per device kind: (requests, (min, max) prompt length, new tokens).
VALIDATION = {"cuda": (32, (128, 1024), 64), "cpu": (4, (16, 48), 8)}


def _hardware(device: str):
    """Datasheet figures of the GPU (H100 or H200), or the CPU placeholders."""
    from dataclasses import replace

    from slaq.gpu_workers.engine.cost_model import CPU_2CORE, H100_SXM

    if not device.startswith("cuda"):
        return CPU_2CORE
    import torch

    gpu = torch.cuda.get_device_name(device)
    if "H200" in gpu:
        # NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16 (as H100), 4.8 TB/s HBM3e, 141 GB.
        return replace(H100_SXM, name="h200-sxm", hbm_bandwidth=4.8e12, memory_bytes=141e9)
    return H100_SXM


def _model(tiny: bool, device: str) -> Path:
    from slaq.bench.engine import RANDOM_MARKER, make_random_llama
    from slaq.gpu_workers.engine.testing import make_tiny_model

    if tiny:
        return make_tiny_model(Path(tempfile.mkdtemp(prefix="slaq-calib-tiny-")))
    if not (MODEL_DIR / RANDOM_MARKER).exists():
        t0 = time.perf_counter()
        make_random_llama(MODEL_DIR, device=device if device.startswith("cuda") else "cpu")
        print(f"built the random model in {time.perf_counter() - t0:.1f}s", flush=True)
    return MODEL_DIR


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (tests, CPU)")
    ap.add_argument("--budget-s", type=float, default=30.0,
                    help="start no grid cell later than this many seconds after the warm-up")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measure the grid this many times; each step's fastest time counts")
    args = ap.parse_args(argv)
    t_start = time.monotonic()

    from slaq.gpu_workers.engine.cost_model import CostProfile
    from slaq.gpu_workers.engine.profiles_store import (
        profile_to_dict,
        record_to_dict,
        write_samples,
    )
    from slaq.sim import calibration

    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    lens, batches, max_tokens, budget_tokens = GRIDS[kind]
    grid = calibration.Grid(lens, batches, max_tokens)
    dtype = "bfloat16" if kind == "cuda" else "float32"
    model_dir = _model(args.tiny, args.device)
    hw = _hardware(args.device)
    model_name = "tiny-random" if args.tiny else "llama-3.2-1b-random"
    spec = calibration.model_spec(model_dir, model_name, 2.0 if dtype == "bfloat16" else 4.0)
    base = CostProfile(f"{model_name}-{hw.name}", spec, hw, max_num_seqs=max(batches),
                       max_num_batched_tokens=budget_tokens,
                       overlap=kind == "cuda",
                       **({} if kind == "cuda" else {"activation_bytes": 0.2e9,
                                                       "memory_util": 0.5}))
    engine = calibration.build_engine(model_dir, args.device, dtype, grid,
                                      max_num_batched_tokens=budget_tokens)
    print(f"engine ready at +{time.monotonic() - t_start:.1f}s", flush=True)

    def progress(done: int, total: int) -> None:
        print(f"cell {done}/{total} at +{time.monotonic() - t_start:.1f}s", flush=True)

    samples = calibration.measure(engine, grid, repeats=args.repeats, progress=progress,
                                  budget_s=args.budget_s)
    measured_on = {**calibration.host_info(args.device), "model": model_name, "dtype": dtype}
    grid_meta = {"prompt_lens": list(lens), "batch_sizes": list(batches),
                 "max_tokens": max_tokens, "max_num_batched_tokens": budget_tokens,
                 "repeats": args.repeats}
    meta = {"base": base.name, "base_profile": profile_to_dict(base),
            "measured_on": measured_on, "grid": grid_meta}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_samples(args.out_dir / "calib.samples.json", samples, meta)
    print(f"{len(samples)} samples written at +{time.monotonic() - t_start:.1f}s", flush=True)

    record = calibration.fit(base, base.name, samples, f"{base.name}-measured", measured_on,
                             {"grid": grid_meta, "samples_file": "calib.samples.json"})
    n, plen, new = VALIDATION[kind]
    try:
        check = calibration.validate(engine, record.profile, num_requests=n, prompt_len=plen,
                                     max_tokens=new, repeats=args.repeats)
    finally:
        engine.close()
    result = record_to_dict(record)
    result["validation"] = check
    (args.out_dir / "calib.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"fit_error": record.fit_error, "validation": check}), flush=True)
    print(f"done in {time.monotonic() - t_start:.1f}s", flush=True)
    return result


if __name__ == "__main__":
    main()
