"""The tier table and SLA arithmetic.

Defaults live here and only here; ``SLAQ_TIERS_FILE`` (JSON: ``{"flex": {"ttft_ms": 5000}}``)
overrides fields per tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

TIER_NAMES: tuple[str, ...] = ("priority", "default", "flex", "batch")
# What clients may send as service_tier; "auto" resolves to the tenant's tier,
# "fast" and "scale" are OpenAI names we answer with our nearest tier.
TIER_ALIASES: dict[str, str] = {"fast": "priority", "scale": "priority"}


@dataclass(frozen=True)
class Tier:
    """One service class. Redis priority semantics: 0 is the most urgent queue priority."""

    name: str
    ttft_ms: float
    tpot_ms: float
    deadline_s: float
    queue_priority: int
    rank: int  # 0 = most important; preemption picks the highest rank first
    preemptible: bool
    downgrade_to: str | None  # tier used when admission cannot meet this one's SLA
    refusable: bool  # may admission answer 429 instead of queueing?

    def __post_init__(self) -> None:
        if self.name not in TIER_NAMES:
            raise ValueError(f"unknown tier {self.name!r}")
        if self.ttft_ms <= 0 or self.tpot_ms <= 0 or self.deadline_s <= 0:
            raise ValueError(f"tier {self.name}: targets must be > 0")
        if not 0 <= self.queue_priority <= 9:
            raise ValueError(f"tier {self.name}: queue_priority must be in 0..9")
        if self.downgrade_to is not None and self.downgrade_to not in TIER_NAMES:
            raise ValueError(f"tier {self.name}: downgrade_to {self.downgrade_to!r} is not a tier")

    def meets(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """True when measured TTFT and TPOT are within this tier's targets."""
        if ttft_ms is None or ttft_ms > self.ttft_ms:
            return False
        return tpot_ms is None or tpot_ms <= self.tpot_ms


DEFAULT_TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier("priority", ttft_ms=1000, tpot_ms=100, deadline_s=60, queue_priority=0, rank=0,
             preemptible=False, downgrade_to=None, refusable=False),
        Tier("default", ttft_ms=3000, tpot_ms=200, deadline_s=300, queue_priority=3, rank=1,
             preemptible=True, downgrade_to="flex", refusable=False),
        Tier("flex", ttft_ms=30000, tpot_ms=500, deadline_s=900, queue_priority=6, rank=2,
             preemptible=True, downgrade_to=None, refusable=True),
        Tier("batch", ttft_ms=3_600_000, tpot_ms=2000, deadline_s=86400, queue_priority=9,
             rank=3, preemptible=True, downgrade_to=None, refusable=False),
    )
}


class TierTable:
    """Tier lookup with overrides; resolves client-facing names ("auto", "fast")."""

    def __init__(self, tiers: dict[str, Tier] | None = None) -> None:
        self._tiers = dict(tiers or DEFAULT_TIERS)
        missing = set(TIER_NAMES) - set(self._tiers)
        if missing:
            raise ValueError(f"tier table lacks {sorted(missing)}")

    @classmethod
    def from_file(cls, path: str | Path | None) -> TierTable:
        if path is None:
            return cls()
        overrides = json.loads(Path(path).read_text())
        return cls.with_overrides(overrides)

    @classmethod
    def with_overrides(cls, overrides: dict[str, dict]) -> TierTable:
        allowed = {f.name for f in fields(Tier)} - {"name"}
        tiers = dict(DEFAULT_TIERS)
        for name, values in overrides.items():
            if name not in tiers:
                raise ValueError(f"unknown tier {name!r} in overrides")
            unknown = set(values) - allowed
            if unknown:
                raise ValueError(f"tier {name}: unknown fields {sorted(unknown)}")
            tiers[name] = replace(tiers[name], **values)
        return cls(tiers)

    def __getitem__(self, name: str) -> Tier:
        return self._tiers[name]

    def __iter__(self):
        return iter(self._tiers[n] for n in TIER_NAMES)

    def resolve(self, asked: str | None, tenant_tier: str) -> str:
        """Map a client's ``service_tier`` to a tier name; raises ValueError if unknown."""
        if asked is None or asked == "auto":
            return tenant_tier
        asked = TIER_ALIASES.get(asked, asked)
        if asked not in self._tiers:
            raise ValueError(f"unknown service_tier {asked!r}")
        return asked
