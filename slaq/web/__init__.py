"""The Flask app: OpenAI-compatible API over the ledger, the queues and the token streams.

``create_app(config)`` takes a mapping (keys below); ``create_app()`` reads ``SLAQ_*`` env vars.
Views stay thin (validate, call a service, return); the services live in ``app.extensions``.

Config keys: ``DATABASE_URL``, ``REDIS_URL`` (required), ``BROKER_URL`` (defaults to the Redis
URL), ``MODEL`` (model-store name or path), ``MODELS_DIR``, ``MAX_MODEL_LEN`` (caps the model's
own context length), ``TIERS_FILE``, ``STREAM_IDLE_TIMEOUT_S`` (default: the tier's deadline),
``TICKET_SENDER`` (a ``(request_id, attempt, tier, priority) -> None`` callable, priority None
for the tier's own; default: Celery),
``ADMISSION_TTL_S`` (how long the reprioritiser's admission state is cached; default 0.5 s),
``REDIS_MAX_CONNECTIONS`` (default 2048), ``POLICY`` (``SLAQ_POLICY``: which queue tickets go to
and in what order, with ``POLICY_OVERRIDES``, JSON as ``SLAQ_POLICY_OVERRIDES``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from flask import Flask, current_app
from sqlalchemy.orm import Session, sessionmaker

from slaq.gpu_workers.engine.config import SchedulerConfig
from slaq.platform.admission import AdmissionService, Admitted, ServedModel, TicketSender
from slaq.platform.decisions import AdmissionCache
from slaq.platform.keys import cancel_key
from slaq.platform.policy import ticket_priority
from slaq.platform.policy_env import policy_config_from_env
from slaq.platform.settings import Settings
from slaq.platform.tiers import TierTable

EXTENSION = "slaq"
# Prompts are token-limited later; this only stops absurd bodies early (413).
MAX_BODY_BYTES = 32 * 1024 * 1024


log = logging.getLogger(__name__)

@dataclass(slots=True)
class WebContext:
    """The services the views use, one set per app."""

    session_factory: sessionmaker[Session]
    redis: redis.Redis
    model: ServedModel
    tiers: TierTable
    admission: AdmissionService
    stream_idle_timeout_s: float | None

    def idle_timeout_s(self, admitted: Admitted) -> float:
        """How long to wait for a request's next token before giving up on it."""
        if self.stream_idle_timeout_s is not None:
            return self.stream_idle_timeout_s
        return admitted.deadline_s

    def cancel(self, request_id: str) -> None:
        """Best effort: the client went away, so stop spending work on the request."""
        from slaq.platform import ledger

        with self.session_factory() as session:
            cancelled = ledger.cancel_request(session, request_id, reason="client disconnected")
        if cancelled:
            # The ledger says cancelled; this key tells the worker generating it to stop now.
            try:
                self.redis.set(cancel_key(request_id), 1, ex=CANCEL_KEY_TTL_S)
            except redis.RedisError:
                # The worker then generates to the end; its finish claim fails on the row.
                log.warning("could not signal the cancel of %s to its worker", request_id)


CANCEL_KEY_TTL_S = 3600


def context() -> WebContext:
    """The current app's :class:`WebContext`."""
    return current_app.extensions[EXTENSION]


def config_from_settings(settings: Settings, database_url: str | None = None,
                         redis_url: str | None = None,
                         broker_url: str | None = None) -> dict[str, Any]:
    """An app config from :class:`Settings` (explicit URLs win, e.g. embedded services)."""
    return {
        # The same cap the workers' engines use, so admission and engine agree.
        "MAX_MODEL_LEN": settings.max_model_len,
        "DATABASE_URL": database_url or settings.database_url,
        "REDIS_URL": redis_url or settings.redis_url,
        "BROKER_URL": broker_url or settings.broker_url,
        "MODEL": settings.model,
        "MODELS_DIR": str(settings.models_dir),
        "TIERS_FILE": settings.tiers_file,
        "POLICY": settings.policy,
        # Beat reads the same variable (policy_config_from_env): one policy config for both.
        "POLICY_OVERRIDES": os.environ.get("SLAQ_POLICY_OVERRIDES", ""),
    }


def _celery_sender(config: Mapping[str, Any], tiers: TierTable) -> TicketSender:
    from slaq.tasks.app import create_app as create_celery_app
    from slaq.tasks.tickets import send_prefill_ticket

    celery = create_celery_app(Settings(redis_url=config["REDIS_URL"],
                                        broker_url=config.get("BROKER_URL"),
                                        policy=config.get("POLICY") or "slaq"))

    def send(request_id: str, attempt: int, tier: str, priority: int | None = None) -> None:
        send_prefill_ticket(request_id, attempt, tier, app=celery, tiers=tiers, priority=priority)

    return send


def _build_context(config: Mapping[str, Any]) -> WebContext:
    from slaq.platform.db import session_factory

    for key in ("DATABASE_URL", "REDIS_URL"):
        if not config.get(key):
            raise ValueError(f"create_app: {key} is required")
    tiers = TierTable.from_file(config.get("TIERS_FILE"))
    models_dir = config.get("MODELS_DIR") or Settings().models_dir
    max_model_len = config.get("MAX_MODEL_LEN") or SchedulerConfig().max_model_len
    model = ServedModel(str(config.get("MODEL") or Settings().model), Path(models_dir),
                        int(max_model_len))
    sessions = session_factory(config["DATABASE_URL"])
    sender = config.get("TICKET_SENDER") or _celery_sender(config, tiers)
    # Every open stream holds a connection while it waits for tokens: redis-py's default pool
    # of 100 refused streams past the 100th ("Too many connections"). Connections open lazily,
    # so a cap above any thread count costs nothing.
    client = redis.Redis.from_url(config["REDIS_URL"], socket_connect_timeout=5,
                                  health_check_interval=30,
                                  max_connections=int(config.get("REDIS_MAX_CONNECTIONS", 2048)))
    admit = AdmissionCache(client, ttl_s=float(config.get("ADMISSION_TTL_S", 0.5))).admit
    # The beat job's policy config: its ticket order (shortest priority prompts first) is
    # applied here, where tickets are first sent.
    policy = policy_config_from_env({
        "SLAQ_POLICY": config.get("POLICY") or "slaq",
        "SLAQ_POLICY_OVERRIDES": config.get("POLICY_OVERRIDES") or ""})

    def priority_for(tier: str, num_prompt_tokens: int) -> int:
        return ticket_priority(tiers, tier, num_prompt_tokens, policy)

    timeout = config.get("STREAM_IDLE_TIMEOUT_S")
    return WebContext(
        session_factory=sessions, redis=client, model=model, tiers=tiers,
        admission=AdmissionService(sessions, model, tiers, sender, admit, priority_for),
        stream_idle_timeout_s=float(timeout) if timeout is not None else None)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the API app. ``None`` reads the environment (``Settings.from_env()``)."""
    from slaq.web.blueprints import register_blueprints
    from slaq.web.errors import install_conventions, register_error_handlers

    if config is None:
        config = config_from_settings(Settings.from_env())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.config.update({k: v for k, v in config.items() if k != "TICKET_SENDER"})
    app.extensions[EXTENSION] = _build_context(config)
    register_error_handlers(app)
    install_conventions(app)
    register_blueprints(app)
    return app
