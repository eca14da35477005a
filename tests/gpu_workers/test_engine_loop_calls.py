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


def test_a_request_queued_as_the_loop_ends_is_refused_not_left_waiting(make_engine,
                                                                      tiny_prompts):
    """Found in review: an add queued just before the loop ended ran in the shutdown drain
    and got a handle that no step would ever serve (its caller waited for the output
    timeout)."""
    from slaq.gpu_workers.engine.config import SamplingParams
    from slaq.gpu_workers.engine_loop import EngineLoopError

    loop = EngineLoop(make_engine())  # not started: the command waits in the queue
    params = SamplingParams(temperature=0.0, max_tokens=4)
    result: list[object] = []

    def add() -> None:
        try:
            result.append(loop.add_request("late", tiny_prompts[0], params))
        except EngineLoopError as exc:
            result.append(exc)

    caller = threading.Thread(target=add)
    caller.start()
    deadline = time.monotonic() + 5
    while loop._commands.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    loop._stop.set()
    loop._run()  # ends at once (stopped) and drains the queued add
    caller.join(5)
    assert len(result) == 1 and isinstance(result[0], EngineLoopError)
    assert loop.engine.scheduler.get("late") is None
