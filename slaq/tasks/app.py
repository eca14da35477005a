"""The Celery app factory.

``create_app(settings)`` builds an app from :class:`~slaq.platform.settings.Settings`;
``get_app()`` is the process-wide one, built from the environment on first use, which is what
:mod:`slaq.tasks.tickets` sends through.
"""

from __future__ import annotations

import threading

from celery import Celery

from slaq.platform.settings import Settings
from slaq.tasks.config import celery_config

TASK_MODULES = ("slaq.tasks.inference",)

_lock = threading.Lock()
_app: Celery | None = None


def create_app(settings: Settings, *, extra_queues: tuple[str, ...] = (),
               with_tasks: bool = False) -> Celery:
    """A configured Celery app. ``with_tasks`` imports the task modules (workers only; they
    import the engine lazily, but senders need only task names)."""
    app = Celery("slaq", include=list(TASK_MODULES) if with_tasks else [],
                 set_as_current=False)
    app.conf.update(celery_config(settings, extra_queues))
    if with_tasks:
        app.loader.import_default_modules()
    return app


def get_app() -> Celery:
    """The process-wide app (from ``SLAQ_*`` env vars unless :func:`set_app` chose one)."""
    global _app
    with _lock:
        if _app is None:
            _app = create_app(Settings.from_env())
        return _app


def set_app(app: Celery | None) -> None:
    """Make ``app`` the process-wide one (workers, tests); ``None`` forgets it."""
    global _app
    with _lock:
        _app = app
