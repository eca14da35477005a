"""The policy's configuration from the environment, shared by the beat job and the API.

Kept apart from :mod:`slaq.platform.policy`, which stays a pure function of its inputs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from slaq.platform.policy import PolicyConfig


def policy_config_from_env(env: dict[str, str] | None = None) -> PolicyConfig:
    """``SLAQ_POLICY`` (preset: ``slaq`` | ``static`` | ``fifo``) and ``SLAQ_POLICY_OVERRIDES``
    (JSON of :class:`PolicyConfig` fields, e.g. ``{"orphan_timeout_s": 10}``)."""
    env = dict(os.environ if env is None else env)
    overrides = json.loads(env.get("SLAQ_POLICY_OVERRIDES") or "{}")
    if not isinstance(overrides, dict):
        raise ValueError("SLAQ_POLICY_OVERRIDES must be a JSON object")
    # JSON has lists where the config holds tuples (watermarks, length_ordered_tiers, ...).
    overrides = {k: _tuples(v) for k, v in overrides.items()}
    return PolicyConfig.preset(env.get("SLAQ_POLICY") or "slaq", **overrides)


def _tuples(value: Any) -> Any:
    """``value`` with every JSON list, at any depth, as a tuple."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value
