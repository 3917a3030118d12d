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

A caller on an event loop (the scorer's grpc.aio handlers) uses :meth:`Gathering.submit` instead: it queues its
call and awaits an asyncio future, holding neither the loop nor a thread. Groups led by such calls run on the
gathering's one runner thread; their answers go back to the loop once per group
(``loop.call_soon_threadsafe``), so the loop goes on taking calls up, parsing and answering them while a group
runs, and the calls that arrive meanwhile form the next group. Both kinds of caller may share a group.

One wait, for submitted calls only: when a group ends with nothing queued, its callers, answered together,
call again together, but their calls reach the loop one by one; a group started by the first of them would
hold one call, and the others the next group (twice the model runs). So a submitted call that finds no group
running waits, up to ``max_wait_s``, until as many calls as the last group held are queued, then its group
runs. A lone caller (its last group held one call) never waits; fewer callers than before cost the wait once.

A group of submitted calls only may be answered later than it ran (``run_many_later``, the scorer's
decision-log commit): it returns the results and a function that returns once they may be given (the
group's decisions stored); the gathering's one committer thread calls it and answers the group, while the
runner goes on with the next group (one group in commit at a time, in order; a group that says ``barrier``
is waited for before the next one runs). If that function raises, its group gets the exception instead.
"""

from __future__ import annotations

import asyncio
import queue
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

    __slots__ = ("answer", "call", "error", "lead", "ready", "result")

    def __init__(self, call: C, answer: asyncio.Future[R] | None = None) -> None:
        self.call = call
        self.result: R | None = None
        self.error: BaseException | None = None
        self.lead = False
        #: A caller on an event loop awaits this future instead of ``ready``.
        self.answer = answer
        self.ready = threading.Lock()
        if answer is None:
            self.ready.acquire()


class Gathering(Generic[C, R]):
    """Run ``run_many`` over the calls that queue while the previous group runs; see the module docstring."""

    def __init__(
        self,
        run_many: Callable[[Sequence[C]], Sequence[R]],
        max_group: int,
        max_wait_s: float = 0.0,
        run_many_later: Callable[[Sequence[C]], tuple[Sequence[R], Callable[[], None] | None, bool]] | None = None,
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        self.run_many = run_many
        self.run_many_later = run_many_later
        self._commits: queue.SimpleQueue[tuple[list[_Slot[C, R]], Callable[[], None]]] = queue.SimpleQueue()
        self._commit_slot = threading.Semaphore(1)  # one group in commit at a time
        self._committer: threading.Thread | None = None
        self.max_group = max_group
        self.max_wait_s = max_wait_s
        self._last_group = 0  # calls in the last group run
        # A submitted group waiting for its peers (see the module docstring): (calls expected, its timer).
        self._waiting: tuple[int, asyncio.TimerHandle] | None = None
        self._lock = threading.Lock()
        self._queued: deque[_Slot[C, R]] = deque()
        self._running = False
        #: Groups run and calls answered (for tests and metrics).
        self.groups = 0
        self.calls = 0
        self._runner: threading.Thread | None = None  # started by the first submit()
        self._runner_turn = threading.Semaphore(0)  # released once per group the runner is to lead

    def submit(self, call: C) -> asyncio.Future[R]:
        """``call``'s result as a future of the running event loop (see the module docstring)."""
        loop = asyncio.get_running_loop()
        slot: _Slot[C, R] = _Slot(call, loop.create_future())
        with self._lock:
            self._queued.append(slot)
            lead = not self._running
            self._running = True
            if self._runner is None:
                self._runner = threading.Thread(target=self._run_turns, name="scorer-gathering", daemon=True)
                self._runner.start()
                if self.run_many_later is not None:
                    self._committer = threading.Thread(
                        target=self._commit_turns, name="scorer-gathering-commit", daemon=True
                    )
                    self._committer.start()
        if lead:
            expected = min(self._last_group, self.max_group)
            if expected > 1 and self.max_wait_s > 0:
                self._waiting = (expected, loop.call_later(self.max_wait_s, self._runners_turn))
            else:
                self._runner_turn.release()
        elif self._waiting is not None and len(self._queued) >= self._waiting[0]:
            self._waiting[1].cancel()
            self._runners_turn()
        return slot.answer  # type: ignore[return-value]

    def _runners_turn(self) -> None:
        """On the loop: the waiting group runs now."""
        self._waiting = None
        self._runner_turn.release()

    def _run_turns(self) -> None:
        """The runner thread: lead a group when given the turn, and the next ones while they are submitted."""
        while True:
            self._runner_turn.acquire()
            while self._run_group(None):
                pass

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
        if self._run_group(slot):
            self._runner_turn.release()
        return self._answer(slot)

    def _run_group(self, own: _Slot[C, R] | None) -> bool:
        """Run the queued calls (a sync leader's ``own`` call first) as one group; then hand the next group to
        the first caller still queued (the runner, for a submitted call), or stop running. True: the next
        group is the runner's."""
        with self._lock:
            group = [self._queued.popleft() for _ in range(min(self.max_group, len(self._queued)))]
        # answered later (after its commit) only a group of submitted calls: a blocking caller returns at once
        later = self.run_many_later if own is None and all(s.answer is not None for s in group) else None
        complete: Callable[[], None] | None = None
        barrier = False
        try:
            if later is not None:
                results, complete, barrier = later([s.call for s in group])
            else:
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
            self._last_group = len(group)
            following = self._queued[0] if self._queued else None
            if following is None:
                self._running = False
        if complete is not None:
            self._commit_slot.acquire()  # the previous group's commit is answered
            self._commits.put((group, complete))
            if barrier:  # the next group waits for this one's rows
                self._commit_slot.acquire()
                self._commit_slot.release()
        else:
            self._answer_group(group, own)
        if following is None:
            return False
        if following.answer is not None:  # a submitted call: the runner leads its group
            return True
        following.lead = True
        following.ready.release()
        return False

    @staticmethod
    def _answer_group(group: list[_Slot[C, R]], own: _Slot[C, R] | None) -> None:
        """Give a group's calls their results or error (a sync leader's ``own`` call returns by itself)."""
        answered: dict[asyncio.AbstractEventLoop, list[_Slot[C, R]]] = {}
        for s in group:
            if s.answer is not None:
                answered.setdefault(s.answer.get_loop(), []).append(s)
            elif s is not own:
                s.ready.release()
        for loop, slots in answered.items():
            loop.call_soon_threadsafe(_settle, slots)

    def _commit_turns(self) -> None:
        """The committer thread: wait for each later-answered group's commit, in order, then answer it."""
        while True:
            group, complete = self._commits.get()
            try:
                complete()
            except BaseException as exc:  # the results must not be given: the group fails
                for s in group:
                    s.error = exc
            self._answer_group(group, None)
            self._commit_slot.release()

    @staticmethod
    def _answer(slot: _Slot[C, R]) -> R:
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]


def _settle(slots: list[_Slot[C, R]]) -> None:
    """On the loop: answer the submitted calls of a group (a call whose caller left is skipped)."""
    for s in slots:
        answer = s.answer
        assert answer is not None
        if answer.done():
            continue
        if s.error is not None:
            answer.set_exception(s.error)
        else:
            answer.set_result(s.result)  # type: ignore[arg-type]
