"""``slaq beat``: Celery beat plus the one worker that runs the reprioritiser.

Design (one process, the simplest that cannot drift): beat runs as a thread (Celery's
``EmbeddedService(thread=True)``, in-memory schedule, no schedule file) and sends
``slaq.reprioritise`` to the ``control`` queue every ``settings.reprioritise_interval_s``; the
main thread is a Celery worker with the ``solo`` pool consuming only ``control``, so cycles run
one after another in this process. Each message expires after two intervals, so a backlog never
replays old cycles, and the Redis lock keeps cycles from overlapping even if two ``slaq beat``
run by mistake. Run exactly one. If this process dies, serving goes on with the last decisions
published in Redis; a new one resumes from the state saved there.
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Celery

from slaq.platform.services import resolve_settings
from slaq.platform.settings import Settings
from slaq.tasks.config import CONTROL_QUEUE, beat_schedule

log = logging.getLogger(__name__)


def create_control_app(settings: Settings) -> Celery:
    """The Celery app of ``slaq beat``: slaq's config, the reprioritiser task and its schedule."""
    from slaq.tasks import reprioritise
    from slaq.tasks.app import create_app

    app = create_app(settings)
    # ``slaq.reprioritise`` is a shared task: importing its module registers it with every
    # app, without the inference tasks that ``create_app(with_tasks=True)`` would import.
    assert reprioritise.REPRIORITISE_TASK in app.tasks
    app.conf.beat_schedule = beat_schedule(settings)
    return app


def run_beat(settings: Settings, *, loglevel: str = "INFO",
             metrics_port: int | None = None) -> int:
    """Run beat and the ``control`` worker until stopped; returns the worker's exit code.

    ``metrics_port`` (or ``SLAQ_BEAT_METRICS_PORT``) serves this process's Prometheus metrics,
    ``slaq_reprioritiser_cycle_seconds`` among them.
    """
    from celery.beat import EmbeddedService, Scheduler

    from slaq.tasks import reprioritise

    settings = resolve_settings(settings)
    app = create_control_app(settings)
    reprioritise.set_current(reprioritise.build_reprioritiser(settings, app=app))
    port = metrics_port or int(os.environ.get("SLAQ_BEAT_METRICS_PORT") or 0)
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
    # The plain Scheduler keeps the schedule in memory: an interval job has nothing to persist
    # (the default PersistentScheduler would write a shelve file into the working directory).
    clock = EmbeddedService(app, thread=True, scheduler_cls=Scheduler)
    clock.start()
    log.info("beat: reprioritiser every %.2fs on queue %s", settings.reprioritise_interval_s,
             CONTROL_QUEUE)
    try:
        worker = app.Worker(hostname=f"control-{os.getpid()}@{socket.gethostname()}",
                            pool_cls="solo", concurrency=1, queues=[CONTROL_QUEUE],
                            loglevel=loglevel, without_gossip=True, without_mingle=True,
                            without_heartbeat=True)
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        clock.stop()
        reprioritise.set_current(None)


def main() -> int:
    """``python -m slaq.tasks.beat``: the same as ``slaq beat``."""
    logging.basicConfig(level=os.environ.get("SLAQ_LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_beat(Settings.from_env())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
