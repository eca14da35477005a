"""The scheduler's waiting queue: ranks in order, arrival order within a rank, preempted
sequences at the front of their rank."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.gpu_workers.engine.waiting_queue import WaitingQueue


def _seq(request_id: str, rank: int, arrival: float) -> Sequence:
    return Sequence(request_id, [5, 6, 7], SamplingParams(max_tokens=2), rank=rank,
                    arrival_time=arrival)


def _queue() -> WaitingQueue:
    return WaitingQueue(key=lambda s: (s.rank, s.arrival_time, s.request_id))


def test_ranks_first_then_arrival_and_preempted_at_the_front():
    q = _queue()
    late_low, early_low = _seq("b", 2, 1.0), _seq("a", 2, 0.5)
    high, preempted = _seq("c", 0, 3.0), _seq("d", 2, 9.0)
    q.push(late_low, front=False)
    q.push(early_low, front=False)  # arrived out of order: goes before "b"
    q.push(high, front=False)
    q.push(preempted, front=True)  # a preempted sequence is its rank's next, whatever its age
    assert [s.request_id for s in q] == ["c", "d", "a", "b"]
    assert len(q) == 4
    assert q.peek() is high
    q.pop(high)
    assert q.peek() is preempted
    with pytest.raises(AssertionError):
        q.pop(early_low)  # only a rank's head can be popped
    q.remove(early_low)  # a finished request leaves from anywhere
    assert [s.request_id for s in q] == ["d", "b"]
    assert len(q) == 2


def test_an_empty_queue_has_no_head():
    q = _queue()
    assert not q and len(q) == 0
    with pytest.raises(AssertionError):
        q.peek()
    s = _seq("a", 1, 0.0)
    q.push(s, front=False)
    q.pop(s)
    assert not q
    with pytest.raises(AssertionError):
        q.peek()  # a rank whose queue emptied still has no head
