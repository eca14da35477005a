"""Serving the API with gunicorn: ``serve(host, port, settings)`` or ``gunicorn 'slaq.web.wsgi:app_from_env()'``.

One gthread worker process with many threads: a streaming response holds a thread for its whole
generation, so the thread count is the number of concurrent streams (and waiting non-stream
requests) the API can carry. One process keeps one tokenizer in memory; the work itself happens
in the GPU workers.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from slaq.platform.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_THREADS = 128


def app_from_env() -> Flask:
    """The app configured from ``SLAQ_*`` env vars (gunicorn's factory entry point)."""
    from slaq.web import config_from_settings, create_app

    return create_app(config_from_settings(Settings.from_env()))


def gunicorn_options(host: str, port: int, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """gunicorn settings for the API."""
    if threads < 1:
        raise ValueError("threads must be >= 1")
    return {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        # Connections (incl. idle keep-alive ones) one worker holds open at most.
        "worker_connections": max(1000, 4 * threads),
        # The gthread main loop keeps heartbeating while request threads stream, so this only
        # catches a wedged process, not long generations.
        "timeout": 120,
        "graceful_timeout": 10,
        # Idle keep-alive connections close after 5 s; longer would also stall a graceful stop.
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
    }


class _Server(BaseApplication):
    """gunicorn driven from Python; the app is built inside the worker, after the fork, so no
    database or Redis connection crosses the fork."""

    def __init__(self, config: dict[str, Any], options: dict[str, Any]) -> None:
        self._config = config
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from slaq.web import create_app

        app = create_app(self._config)
        try:  # load the tokenizer now rather than in the first request
            app.extensions["slaq"].model.max_model_len  # noqa: B018
        except Exception:
            log.exception("could not load the model's tokenizer; requests will retry")
        return app


def serve(host: str, port: int, settings: Settings, services: Any = None,
          threads: int = DEFAULT_THREADS) -> None:
    """Run the API in the foreground until SIGTERM/SIGINT.

    ``services`` (from :func:`slaq.platform.services.ensure_services`) supplies the database,
    Redis and broker URLs when the settings leave them unset (embedded services).
    """
    from slaq.web import config_from_settings

    config = config_from_settings(
        settings,
        database_url=getattr(services, "database_url", None),
        redis_url=getattr(services, "redis_url", None),
        broker_url=getattr(services, "broker_url", None))
    _Server(config, gunicorn_options(host, port, threads)).run()
