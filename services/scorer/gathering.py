"""Concurrent calls gathered into one: the calls that arrive while a group runs form the next group.

The Score path costs per call what it could cost per group: a decision-log write and its commit wait, a
drift-window and monitor update under the line's lock, a hand-off to the batcher. :class:`Gathering` runs a
function over lists (``Scorer.score_many``) for concurrent single calls, the way a group commit runs one
transaction for concurrent writers: a caller that finds no group running runs its own call at once (a lone
caller never waits); callers that arrive meanwhile queue, and when the group ends the first of them runs every
queued call (up to ``max_group``) as the next group, on its own thread, and the others wait for their answer.
No timer, no extra thread: a group is what queued while the previous one ran.

Each call gets its own result; an exception raised by the function itself (not returned for one call)
reaches every call of its group.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

C = TypeVar("C")
R = TypeVar("R")


class _Slot(Generic[C, R]):
    """One caller's call, then its result (or the group's exception), or its turn to run the next group.

    ``ready`` is a plain lock taken at creation: the caller waits by acquiring it, the group that answers
    releases it once. A lock is the cheapest wake-up CPython has (an Event is a Condition around a lock, and
    allocates a further lock per wait): this wait and wake-up happen once per gathered call.
    """

    __slots__ = ("call", "error", "lead", "ready", "result")

    def __init__(self, call: C) -> None:
        self.call = call
        self.result: R | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.ready = threading.Lock()
        self.ready.acquire()


class Gathering(Generic[C, R]):
    """Run ``run_many`` over the calls that queue while the previous group runs; see the module docstring."""

    def __init__(self, run_many: Callable[[Sequence[C]], Sequence[R]], max_group: int) -> None:
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        self.run_many = run_many
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queued: deque[_Slot[C, R]] = deque()
        self._running = False
        #: Groups run and calls answered (for tests and metrics).
        self.groups = 0
        self.calls = 0

    def call(self, call: C) -> R:
        """``call``'s result, run in a group with the calls queued beside it."""
        slot: _Slot[C, R] = _Slot(call)
        with self._lock:
            self._queued.append(slot)
            lead = not self._running
            self._running = True
        if not lead:
            slot.ready.acquire()  # released once: with the answer, or with the turn to run the next group
            if not slot.lead:
                return self._answer(slot)
        self._run_group()
        return self._answer(slot)

    def _run_group(self) -> None:
        """Run the queued calls (this caller's first) as one group; then hand the next group to the first
        caller still queued, or stop running."""
        with self._lock:
            group = [self._queued.popleft() for _ in range(min(self.max_group, len(self._queued)))]
        try:
            results = self.run_many([s.call for s in group])
            if len(results) != len(group):
                raise RuntimeError(f"run_many answered {len(results)} results for {len(group)} calls")
            for s, result in zip(group, results, strict=True):
                s.result = result
        except BaseException as exc:  # the group's failure is every member's
            for s in group:
                s.error = exc
        with self._lock:
            self.groups += 1
            self.calls += len(group)
            following = self._queued[0] if self._queued else None
            if following is None:
                self._running = False
        for s in group[1:]:
            s.ready.release()
        if following is not None:
            following.lead = True
            following.ready.release()

    @staticmethod
    def _answer(slot: _Slot[C, R]) -> R:
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]
