"""The policy's configuration from the environment, shared by the beat job and the API.

Kept apart from :mod:`slaq.platform.policy`, which stays a pure function of its inputs.
"""

from __future__ import annotations

import json
import os

from slaq.platform.policy import PolicyConfig


def policy_config_from_env(env: dict[str, str] | None = None) -> PolicyConfig:
    """``SLAQ_POLICY`` (preset: ``slaq`` | ``static`` | ``fifo``) and ``SLAQ_POLICY_OVERRIDES``
    (JSON of :class:`PolicyConfig` fields, e.g. ``{"orphan_timeout_s": 10}``)."""
    env = dict(os.environ if env is None else env)
    overrides = json.loads(env.get("SLAQ_POLICY_OVERRIDES") or "{}")
    if not isinstance(overrides, dict):
        raise ValueError("SLAQ_POLICY_OVERRIDES must be a JSON object")
    if "watermarks" in overrides:
        overrides["watermarks"] = {t: tuple(v) for t, v in overrides["watermarks"].items()}
    if "length_ordered_tiers" in overrides:
        overrides["length_ordered_tiers"] = tuple(overrides["length_ordered_tiers"])
    return PolicyConfig.preset(env.get("SLAQ_POLICY") or "slaq", **overrides)
