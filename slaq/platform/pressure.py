"""The heartbeat schema and KV-pressure maths. IO-free.

Every worker writes a :class:`Heartbeat` to the Redis hash ``hb:<worker>`` (with a TTL) every
``heartbeat_interval_s``; the decode router, the reprioritiser, ``slaq status`` and the
simulator read it back with :meth:`Heartbeat.from_mapping`. Redis hashes hold strings, so the
mapping is flat: numbers as decimal text, lists as JSON, "absent" as the empty string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

ROLES: tuple[str, ...] = ("prefill", "decode", "both")


def kv_pressure(num_blocks_used: int, num_blocks_reserved: int, num_blocks_total: int) -> float:
    """(used + reserved) / total, in [0, 1]; a pool of size 0 counts as full."""
    if num_blocks_total <= 0:
        return 1.0
    return min(1.0, max(0.0, (num_blocks_used + num_blocks_reserved) / num_blocks_total))


@dataclass(slots=True)
class Heartbeat:
    """One worker's report: what it is, how full its KV pool is, and how fast it runs."""

    worker: str
    role: str
    device: str = "cpu"
    model: str = ""
    num_blocks_total: int = 0
    num_blocks_used: int = 0
    # Blocks promised to admitted work that does not hold them yet (e.g. waiting prefills).
    num_blocks_reserved: int = 0
    # Blocks held for decode workers that have not pulled them yet (part of used).
    num_blocks_leased: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    last_batch_size: int = 0
    max_batch_size: int = 0
    ttft_ms: float | None = None  # recent mean
    tpot_ms: float | None = None  # recent mean
    num_finished: int = 0
    queues: list[str] = field(default_factory=list)
    pid: int = 0
    host: str = ""
    time: float = 0.0  # Unix seconds when written
    # Chain hashes of recently cached prefixes, bounded (prefix-affinity routing:
    # slaq.platform.affinity); hand-off KV blocks received and, of those, found cached here.
    prefix_hashes: list[int] = field(default_factory=list)
    num_handoff_blocks: int = 0
    num_handoff_blocks_reused: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.num_blocks_total < 0 or self.num_blocks_used < 0 or self.num_blocks_reserved < 0:
            raise ValueError("block counts must be >= 0")

    @property
    def pressure(self) -> float:
        return kv_pressure(self.num_blocks_used, self.num_blocks_reserved, self.num_blocks_total)

    @property
    def num_blocks_free(self) -> int:
        return max(0, self.num_blocks_total - self.num_blocks_used - self.num_blocks_reserved)

    def is_fresh(self, now: float, max_age_s: float) -> bool:
        """Written within ``max_age_s`` of ``now`` (Redis' TTL also drops stale hashes)."""
        return now - self.time <= max_age_s

    def to_mapping(self) -> dict[str, str]:
        """Flat string mapping for ``HSET``; includes the derived ``pressure`` for readers."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = ""
            elif isinstance(value, list):
                out[f.name] = json.dumps(value)
            elif isinstance(value, bool):
                out[f.name] = "1" if value else "0"
            else:
                out[f.name] = str(value)
        out["pressure"] = f"{self.pressure:.6f}"
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str] | Mapping[bytes, bytes]) -> Heartbeat:
        """Inverse of :meth:`to_mapping`; accepts ``bytes`` or ``str`` keys and values.

        Unknown keys are ignored (a newer writer may add fields); missing ones take defaults.
        """
        if not mapping:
            raise ValueError("empty heartbeat")
        raw = {_text(k): _text(v) for k, v in mapping.items()}
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            kwargs[f.name] = _parse(f.name, raw[f.name])
        if "worker" not in kwargs or "role" not in kwargs:
            raise ValueError("heartbeat lacks worker or role")
        return cls(**kwargs)  # type: ignore[arg-type]


_INT_FIELDS = frozenset({
    "num_blocks_total", "num_blocks_used", "num_blocks_reserved", "num_blocks_leased",
    "num_running", "num_waiting", "num_preemptions", "last_batch_size", "max_batch_size",
    "num_finished", "pid", "num_handoff_blocks", "num_handoff_blocks_reused",
})
_FLOAT_FIELDS = frozenset({"prefill_tokens_per_s", "decode_tokens_per_s", "time"})
_OPTIONAL_FLOAT_FIELDS = frozenset({"ttft_ms", "tpot_ms"})


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _parse(name: str, value: str) -> object:
    try:
        if name in _INT_FIELDS:
            return int(value or 0)
        if name in _FLOAT_FIELDS:
            return float(value or 0.0)
        if name in _OPTIONAL_FLOAT_FIELDS:
            return float(value) if value else None
        if name == "queues":
            return list(json.loads(value)) if value else []
        if name == "prefix_hashes":
            return [int(h) for h in json.loads(value)] if value else []
    except (ValueError, TypeError) as exc:
        raise ValueError(f"heartbeat field {name}={value!r}: {exc}") from exc
    return value


def pick_decode_worker(heartbeats: Iterable[Heartbeat], now: float, max_age_s: float,
                       exclude: Iterable[str] = ()) -> Heartbeat | None:
    """The live decode worker with the lowest KV pressure (ties: most free blocks, then name).

    ``None`` when no decode worker is alive; the caller then uses the shared ``decode.any``.
    """
    excluded = set(exclude)
    live = [hb for hb in heartbeats
            if hb.role == "decode" and hb.worker not in excluded and hb.is_fresh(now, max_age_s)]
    if not live:
        return None
    return min(live, key=lambda hb: (hb.pressure, -hb.num_blocks_free, hb.worker))
