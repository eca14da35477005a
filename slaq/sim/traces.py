"""Public workload traces: load, scale, and give each request a tier by a seeded mix.

Formats (see ``shared/traces/README.md``): Mooncake FAST'25 JSONL (``timestamp`` ms,
``input_length``, ``output_length``, ``hash_ids`` of 512-token prefix blocks) and the Azure
LLM inference 2023 CSV (``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from slaq.platform.tiers import TIER_NAMES

MOONCAKE_BLOCK_TOKENS = 512  # the trace's hash_ids each stand for 512 prompt tokens
DEFAULT_TIER_MIX: dict[str, float] = {"priority": 0.2, "default": 0.5, "flex": 0.15, "batch": 0.15}


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace; ``hash_ids`` (if known) name its shared prefix blocks."""

    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    tier: str = "default"
    hash_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.num_output_tokens < 1:
            raise ValueError("trace requests need >= 1 prompt and output token")
        if self.tier not in TIER_NAMES:
            raise ValueError(f"unknown tier {self.tier!r}")

    def prompt_token_ids(self, index: int, vocab_size: int = 1 << 30) -> list[int]:
        """Synthetic prompt ids: equal ``hash_ids`` give equal prefix tokens (prefix caching);
        without hash ids every request's tokens are its own (``index`` keeps them apart)."""
        n = self.num_prompt_tokens
        ids: list[int] = []
        for h in self.hash_ids:
            ids.extend(_run((h * MOONCAKE_BLOCK_TOKENS) % vocab_size, MOONCAKE_BLOCK_TOKENS,
                            vocab_size))
            if len(ids) >= n:
                return ids[:n]
        # No (or too few) hash ids: the rest is unique to this request.
        ids.extend(_run((index * 1_000_003) % vocab_size, n - len(ids), vocab_size))
        return ids


def _run(start: int, length: int, vocab_size: int) -> list[int]:
    """``length`` consecutive ids from ``start``, wrapping at ``vocab_size`` (built in C)."""
    end = start + length
    if end <= vocab_size:
        return list(range(start, end))
    return list(range(start, vocab_size)) + _run(0, end - vocab_size, vocab_size)


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests sorted by arrival, starting at 0 s."""

    name: str
    requests: tuple[TraceRequest, ...]

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Mean arrivals per second over the trace's span."""
        return len(self.requests) / self.duration_s if self.duration_s > 0 else 0.0

    def __len__(self) -> int:
        return len(self.requests)


def _normalise(name: str, reqs: Iterable[TraceRequest]) -> Trace:
    ordered = sorted(reqs, key=lambda r: r.arrival_s)
    if not ordered:
        raise ValueError(f"trace {name} has no requests")
    t0 = ordered[0].arrival_s
    return Trace(name, tuple(replace(r, arrival_s=r.arrival_s - t0) for r in ordered))


def load_mooncake(path: str | Path, limit: int | None = None) -> Trace:
    """Load a Mooncake FAST'25 JSONL trace (timestamps in ms)."""
    reqs = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            reqs.append(TraceRequest(row["timestamp"] / 1000.0, int(row["input_length"]),
                                     max(1, int(row["output_length"])),
                                     hash_ids=tuple(row.get("hash_ids") or ())))
            if limit is not None and len(reqs) >= limit:
                break
    return _normalise(Path(path).stem, reqs)


def _parse_azure_time(s: str) -> float:
    # 7 fractional digits (100 ns) do not fit %f; parse seconds and fraction apart.
    whole, _, frac = s.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure(path: str | Path, limit: int | None = None) -> Trace:
    """Load an Azure LLM inference 2023 CSV trace."""
    reqs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            reqs.append(TraceRequest(_parse_azure_time(row["TIMESTAMP"]),
                                     int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            if limit is not None and len(reqs) >= limit:
                break
    return _normalise(Path(path).stem, reqs)


def load_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Load by extension: ``.jsonl`` = Mooncake, ``.csv`` = Azure."""
    suffix = Path(path).suffix
    if suffix == ".jsonl":
        return load_mooncake(path, limit)
    if suffix == ".csv":
        return load_azure(path, limit)
    raise ValueError(f"unknown trace format {suffix!r} (want .jsonl or .csv)")


def scale_time(trace: Trace, factor: float) -> Trace:
    """Compress (factor > 1) or stretch arrivals: the arrival rate is multiplied by ``factor``."""
    if factor <= 0:
        raise ValueError("time scale factor must be > 0")
    return Trace(trace.name, tuple(replace(r, arrival_s=r.arrival_s / factor) for r in trace.requests))


def replicate(trace: Trace, factor: float, seed: int = 0) -> Trace:
    """Multiply the load keeping the arrival times (and so the trace's burst pattern).

    Each request appears ``floor(factor)`` times plus once more with probability
    ``factor - floor(factor)``; copies get disjoint prefix hash ids, like independent users.
    """
    if factor <= 0:
        raise ValueError("replication factor must be > 0")
    rng = random.Random(seed)
    span = 1 + max((h for r in trace.requests for h in r.hash_ids), default=0)
    out = []
    for r in trace.requests:
        copies = int(math.floor(factor)) + (1 if rng.random() < factor - math.floor(factor) else 0)
        for c in range(copies):
            out.append(replace(r, hash_ids=tuple(h + c * span for h in r.hash_ids)))
    return _normalise(trace.name, out)


def scale_tokens(trace: Trace, prompt_factor: float = 1.0, output_factor: float = 1.0) -> Trace:
    """Scale prompt and output lengths (at least one token each; hash ids trimmed to fit)."""
    if prompt_factor <= 0 or output_factor <= 0:
        raise ValueError("token scale factors must be > 0")
    out = []
    for r in trace.requests:
        n_in = max(1, round(r.num_prompt_tokens * prompt_factor))
        n_blocks = math.ceil(n_in / MOONCAKE_BLOCK_TOKENS)
        out.append(replace(r, num_prompt_tokens=n_in,
                           num_output_tokens=max(1, round(r.num_output_tokens * output_factor)),
                           hash_ids=r.hash_ids[:n_blocks]))
    return Trace(trace.name, tuple(out))


def window(trace: Trace, start_s: float, duration_s: float) -> Trace:
    """The requests arriving in ``[start_s, start_s + duration_s)``, re-based to 0."""
    sel = [r for r in trace.requests if start_s <= r.arrival_s < start_s + duration_s]
    return _normalise(trace.name, sel)


def assign_tiers(trace: Trace, mix: dict[str, float] | None = None, seed: int = 0) -> Trace:
    """Give every request a tier drawn from ``mix`` (default 20/50/15/15) with a seeded RNG."""
    mix = dict(DEFAULT_TIER_MIX if mix is None else mix)
    unknown = set(mix) - set(TIER_NAMES)
    if unknown:
        raise ValueError(f"unknown tiers in mix: {sorted(unknown)}")
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise ValueError("tier mix weights must be >= 0 and not all 0")
    names = list(mix)
    weights = [mix[n] / total for n in names]
    rng = random.Random(seed)
    tiers = rng.choices(names, weights=weights, k=len(trace.requests))
    return Trace(trace.name, tuple(replace(r, tier=t) for r, t in zip(trace.requests, tiers,
                                                                      strict=True)))


def token_totals(trace: Trace) -> tuple[int, int]:
    """(sum of prompt tokens, sum of output tokens)."""
    return (sum(r.num_prompt_tokens for r in trace.requests),
            sum(r.num_output_tokens for r in trace.requests))
