"""EngineLoop.call: a command whose caller stopped waiting does not run later (found in
review: a reserve_prefix that timed out could still pin blocks for nobody)."""

from __future__ import annotations

import threading
import time

import pytest

from slaq.gpu_workers.engine_loop import EngineLoop


def test_a_call_that_times_out_before_it_starts_never_runs(make_engine):
    loop = EngineLoop(make_engine())
    loop.start()
    release = threading.Event()
    ran: list[str] = []
    try:
        blocker = threading.Thread(target=lambda: loop.call(lambda e: release.wait(10)))
        blocker.start()
        time.sleep(0.05)  # the loop thread is inside the blocking command now
        with pytest.raises(TimeoutError):
            loop.call(lambda e: ran.append("late"), timeout_s=0.05)
        release.set()
        blocker.join(10)
        assert loop.call(lambda e: "after") == "after"  # the loop goes on
        assert ran == []
    finally:
        release.set()
        loop.stop()
