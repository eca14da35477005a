"""One typed settings object, read from ``SLAQ_*`` environment variables.

Unset service URLs mean "start the embedded one" (see :mod:`slaq.platform.services`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "slaq"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Scheduling modes (``SLAQ_POLICY``). API, beat and workers read the same variable, so a stack
# runs one mode end to end: ``fifo`` = one prefill queue, no tier order anywhere (the common
# default of serving stacks); ``static`` = tier queues and tier ranks, no pressure-driven
# actions; ``slaq`` = everything.
POLICIES: tuple[str, ...] = ("fifo", "static", "slaq")


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration. Build with :meth:`from_env`; tests pass explicit values."""

    data_dir: Path = field(default_factory=_default_data_dir)
    database_url: str | None = None
    redis_url: str | None = None
    broker_url: str | None = None
    # A model name known to the model store, or a path to an HF-style directory.
    model: str = DEFAULT_MODEL_NAME
    # Path to a JSON file overriding tier targets (see slaq.platform.tiers).
    tiers_file: str | None = None
    # Seconds a KV lease lives before its owner frees the blocks.
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 3.0
    # Celery's Redis visibility timeout: must exceed the longest generation.
    visibility_timeout_s: int = 7200
    reprioritise_interval_s: float = 1.0
    # One context limit for the API's admission check and every worker's engine.
    max_model_len: int = 2048
    policy: str = "slaq"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_interval_s > 0")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        data_dir = Path(env["SLAQ_DATA_DIR"]) if env.get("SLAQ_DATA_DIR") else _default_data_dir()
        return cls(
            data_dir=data_dir,
            database_url=env.get("SLAQ_DATABASE_URL") or None,
            redis_url=env.get("SLAQ_REDIS_URL") or None,
            broker_url=env.get("SLAQ_BROKER_URL") or None,
            model=env.get("SLAQ_MODEL") or DEFAULT_MODEL_NAME,
            tiers_file=env.get("SLAQ_TIERS_FILE") or None,
            lease_ttl_s=_env_float("SLAQ_LEASE_TTL_S", 30.0),
            heartbeat_interval_s=_env_float("SLAQ_HEARTBEAT_INTERVAL_S", 1.0),
            heartbeat_ttl_s=_env_float("SLAQ_HEARTBEAT_TTL_S", 3.0),
            visibility_timeout_s=_env_int("SLAQ_VISIBILITY_TIMEOUT_S", 7200),
            reprioritise_interval_s=_env_float("SLAQ_REPRIORITISE_INTERVAL_S", 1.0),
            max_model_len=_env_int("SLAQ_MAX_MODEL_LEN", 2048),
            policy=env.get("SLAQ_POLICY") or "slaq",
        )

    @property
    def fifo(self) -> bool:
        """One queue and one rank for every tier (see :data:`POLICIES`)."""
        return self.policy == "fifo"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"
