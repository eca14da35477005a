"""The scheduler's waiting queue: one FIFO per rank, most important rank first. IO-free.

A new sequence joins the back of its rank in arrival order (one that arrives out of order, as
a hand-off re-queued after its arrival time, is inserted where its key belongs); a preempted
one goes to the front of its rank, so it is the next of its rank to be recomputed. The
:class:`~slaq.gpu_workers.engine.scheduler.Scheduler` owns the only instance and is the only
caller.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from slaq.gpu_workers.engine.sequence import Sequence


class WaitingQueue:
    """Waiting sequences by ``seq.rank``; ``key`` orders a rank's queue (arrival order)."""

    def __init__(self, key: Callable[[Sequence], Any]) -> None:
        self._key = key
        self._by_rank: dict[int, deque[Sequence]] = {}
        self._ranks: list[int] = []  # sorted keys of _by_rank
        self._num = 0

    def __len__(self) -> int:
        return self._num

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence, in the order they would be admitted."""
        for rank in self._ranks:
            yield from self._by_rank[rank]

    def push(self, seq: Sequence, front: bool) -> None:
        """Queue ``seq`` at the back of its rank (in key order), or at the front."""
        queue = self._by_rank.get(seq.rank)
        if queue is None:
            queue = self._by_rank[seq.rank] = deque()
            bisect.insort(self._ranks, seq.rank)
        if front:
            queue.appendleft(seq)
        elif not queue or self._key(queue[-1]) <= self._key(seq):
            queue.append(seq)
        else:  # arrived out of order: keep the rank's queue sorted by arrival
            queue.insert(bisect.bisect_right(queue, self._key(seq), key=self._key), seq)
        self._num += 1

    def peek(self) -> Sequence:
        """The head: the first of the most important rank that has any. Asserts one waits."""
        for rank in self._ranks:
            if self._by_rank[rank]:
                return self._by_rank[rank][0]
        raise AssertionError("no waiting sequence")

    def pop(self, seq: Sequence) -> None:
        """Take ``seq``, which must be the head of its rank."""
        queue = self._by_rank[seq.rank]
        assert queue[0] is seq, "only the head of a rank is popped"
        queue.popleft()
        self._num -= 1

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` from wherever it waits (a request finished or aborted while queued)."""
        self._by_rank[seq.rank].remove(seq)
        self._num -= 1
