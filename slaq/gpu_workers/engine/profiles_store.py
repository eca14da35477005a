"""Calibrated cost profiles as JSON files: write, read, and find them by name.

A calibrated profile is a :class:`~slaq.gpu_workers.engine.cost_model.CostProfile` fitted to
our own engine's measured steps (``slaq sim calibrate``). Its file carries the whole profile
(model, hardware and the fitted efficiencies, so it does not change when a spec profile is
edited) and where it came from: the base profile, the machine, the date, the grid, and how well
it predicts (median / p90 relative step-time error on the fitted samples and on held-out grid
cells). The raw samples sit beside it in ``NAME.samples.json``.

Committed profiles live in ``slaq/sim/profiles/``; :func:`find_profile` (what
``cost_model.get_profile`` falls back on) also takes the path of any such file. json and
pathlib only: no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from slaq.gpu_workers.engine.cost_model import CostProfile, HardwareSpec, ModelSpec, StepSample

PROFILES_DIR = Path(__file__).resolve().parents[2] / "sim" / "profiles"
SAMPLES_SUFFIX = ".samples.json"
FORMAT = 1  # bump when the file layout changes incompatibly


@dataclass(frozen=True, slots=True)
class CalibratedProfile:
    """A fitted profile and its provenance (see the module docstring)."""

    profile: CostProfile
    base: str  # the profile whose model and hardware figures the fit started from
    measured_on: dict[str, Any]  # device, CPU/GPU name, torch version, threads
    date: str  # ISO 8601, UTC
    num_samples: int
    fit_error: dict[str, Any]  # {"all": {...}, "heldout": {...}} of error_summary
    extra: dict[str, Any] = field(default_factory=dict)  # grid, validation, samples file

    def __post_init__(self) -> None:
        if self.num_samples < 4:
            raise ValueError("a calibrated profile needs at least 4 samples")

    @property
    def name(self) -> str:
        return self.profile.name


# ---- (de)serialisation ------------------------------------------------------------------


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}")
    return cls(**data)


def profile_to_dict(profile: CostProfile) -> dict[str, Any]:
    return asdict(profile)


def profile_from_dict(data: dict[str, Any]) -> CostProfile:
    d = dict(data)
    d["model"] = _build(ModelSpec, d["model"], "model")
    d["hardware"] = _build(HardwareSpec, d["hardware"], "hardware")
    return _build(CostProfile, d, f"profile {d.get('name')!r}")


def record_to_dict(record: CalibratedProfile) -> dict[str, Any]:
    return {"format": FORMAT, "name": record.name, "base": record.base,
            "date": record.date, "measured_on": record.measured_on,
            "num_samples": record.num_samples, "fit_error": record.fit_error,
            **record.extra, "profile": profile_to_dict(record.profile)}


def record_from_dict(data: dict[str, Any]) -> CalibratedProfile:
    if data.get("format") != FORMAT:
        raise ValueError(f"calibrated profile format {data.get('format')!r}, expected {FORMAT}")
    core = {"format", "name", "base", "date", "measured_on", "num_samples", "fit_error",
            "profile"}
    profile = profile_from_dict(data["profile"])
    if profile.name != data["name"]:
        raise ValueError(f"profile name {profile.name!r} != file name field {data['name']!r}")
    return CalibratedProfile(profile, data["base"], data["measured_on"], data["date"],
                             data["num_samples"], data["fit_error"],
                             {k: v for k, v in data.items() if k not in core})


def samples_to_dict(samples: list[StepSample], meta: dict[str, Any]) -> dict[str, Any]:
    """Samples JSON: ``meta`` (how and where they were measured) and one row per step."""
    return {"format": FORMAT, "meta": meta,
            "samples": [{"chunks": [list(c) for c in s.chunks], "seconds": s.seconds,
                         "cell": list(s.cell) if s.cell else None} for s in samples]}


def samples_from_dict(data: dict[str, Any]) -> tuple[list[StepSample], dict[str, Any]]:
    if data.get("format") != FORMAT:
        raise ValueError(f"samples format {data.get('format')!r}, expected {FORMAT}")
    samples = [StepSample(tuple((int(p), int(n)) for p, n in row["chunks"]),
                          float(row["seconds"]),
                          tuple(row["cell"]) if row.get("cell") else None)  # type: ignore[arg-type]
               for row in data["samples"]]
    return samples, dict(data.get("meta") or {})


# ---- files ------------------------------------------------------------------------------


def samples_path(profile_path: str | Path) -> Path:
    """``x/NAME.json`` -> ``x/NAME.samples.json``."""
    p = Path(profile_path)
    return p.with_name(p.name.removesuffix(".json") + SAMPLES_SUFFIX)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_samples(path: str | Path, samples: list[StepSample], meta: dict[str, Any]) -> Path:
    """One sample per line: a batch-128 step has 256 numbers, which indented JSON would put on
    256 lines."""
    path = Path(path)
    data = samples_to_dict(samples, meta)
    rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in data["samples"])
    head = json.dumps({k: v for k, v in data.items() if k != "samples"}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head[:-2] + ',\n  "samples": [\n' + rows + "\n]}\n")
    return path


def read_samples(path: str | Path) -> tuple[list[StepSample], dict[str, Any]]:
    return samples_from_dict(json.loads(Path(path).read_text()))


def write_profile(path: str | Path, record: CalibratedProfile, samples: list[StepSample],
                  samples_meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write the profile JSON and its samples beside it; return both paths."""
    path = Path(path)
    spath = samples_path(path)
    record = CalibratedProfile(record.profile, record.base, record.measured_on, record.date,
                               record.num_samples, record.fit_error,
                               {**record.extra, "samples_file": spath.name})
    _write_json(path, record_to_dict(record))
    write_samples(spath, samples, samples_meta)
    calibrated_profiles.cache_clear()
    return path, spath


def read_profile(path: str | Path) -> CalibratedProfile:
    try:
        return record_from_dict(json.loads(Path(path).read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a calibrated profile ({exc})") from exc


@lru_cache(maxsize=8)
def calibrated_profiles(directory: Path = PROFILES_DIR) -> dict[str, CalibratedProfile]:
    """Every calibrated profile in ``directory`` by name (read once, then cached)."""
    out: dict[str, CalibratedProfile] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        if path.name.endswith(SAMPLES_SUFFIX):
            continue
        record = read_profile(path)
        if record.name in out:
            raise ValueError(f"{path}: profile {record.name!r} is defined twice")
        out[record.name] = record
    return out


def find_profile(name: str) -> CostProfile | None:
    """A committed calibrated profile by name, or the profile in a JSON file at path ``name``;
    None when neither exists."""
    record = calibrated_profiles().get(name)
    if record is not None:
        return record.profile
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return read_profile(path).profile
    return None
