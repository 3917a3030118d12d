"""services.scorer.gathering: concurrent single calls run as groups (issue #22). A lone caller runs at once on its
own thread; the calls that queue while a group runs form the next group, run by the first of them; every call
gets its own result; a failure of the group function reaches its group only; groups never exceed their bound.
Real threads; every wait polls with a generous timeout."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from services.scorer.gathering import Gathering

WAIT_S = 30.0


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class _Gate:
    """``run_many`` doubling each call; the first group it runs waits until released."""

    def __init__(self) -> None:
        self.groups: list[tuple[list[int], str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def run_many(self, calls: Sequence[int]) -> list[int]:
        self.groups.append((list(calls), threading.current_thread().name))
        if len(self.groups) == 1:
            self.entered.set()
            assert self.release.wait(WAIT_S)
        return [2 * c for c in calls]


def _callers(gathering: Gathering[int, int], calls: list[int], answers: dict[int, object]) -> list[threading.Thread]:
    def caller(c: int) -> None:
        try:
            answers[c] = gathering.call(c)
        except Exception as exc:
            answers[c] = exc

    threads = [threading.Thread(target=caller, args=(c,), name=f"caller-{c}") for c in calls]
    for t in threads:
        t.start()
    return threads


def _first_then_queued(
    gathering: Gathering[int, int], entered: threading.Event, release: threading.Event, queued: list[int]
) -> dict[int, object]:
    """Call 0 alone; once its group runs (``entered``), the ``queued`` calls; then ``release`` the first
    group; every call's answer (or exception)."""
    answers: dict[int, object] = {}
    threads = _callers(gathering, [0], answers)
    assert entered.wait(WAIT_S)
    threads += _callers(gathering, queued, answers)
    _until(lambda: len(gathering._queued) == len(queued))  # every one waits behind the running group
    release.set()
    for t in threads:
        t.join(WAIT_S)
    return answers


def test_a_lone_caller_runs_its_call_at_once_on_its_own_thread() -> None:
    gate = _Gate()
    gate.release.set()
    gathering = Gathering(gate.run_many, max_group=8)
    assert gathering.call(21) == 42
    assert gate.groups == [([21], threading.current_thread().name)]
    assert (gathering.groups, gathering.calls) == (1, 1)


@pytest.mark.parametrize(("max_group", "sizes"), [(64, [1, 10]), (4, [1, 4, 4, 2])])
def test_calls_queued_while_a_group_runs_form_the_next_groups_within_the_bound_each_answered_its_own(
    max_group: int, sizes: list[int]
) -> None:
    gate = _Gate()
    gathering = Gathering(gate.run_many, max_group=max_group)
    answers = _first_then_queued(gathering, gate.entered, gate.release, list(range(1, 11)))
    assert answers == {c: 2 * c for c in range(11)}
    assert [len(calls) for calls, _ in gate.groups] == sizes
    assert sorted(c for calls, _ in gate.groups for c in calls) == list(range(11))  # each call in one group
    later_runners = {runner for _, runner in gate.groups[1:]}
    assert all(r.startswith("caller-") and r != "caller-0" for r in later_runners)  # run by queued callers
    assert (gathering.groups, gathering.calls) == (len(sizes), 11)


def test_a_failing_group_fails_its_own_calls_only_and_the_next_group_is_served() -> None:
    entered, release = threading.Event(), threading.Event()
    runs: list[list[int]] = []

    def run_many(calls: Sequence[int]) -> list[int]:
        runs.append(list(calls))
        if len(runs) == 1:
            entered.set()
            assert release.wait(WAIT_S)
            raise RuntimeError("model crashed")
        return [-c for c in calls]

    gathering = Gathering(run_many, max_group=64)
    answers = _first_then_queued(gathering, entered, release, [1, 2, 3])
    assert isinstance(answers[0], RuntimeError) and str(answers[0]) == "model crashed"
    assert {c: answers[c] for c in (1, 2, 3)} == {1: -1, 2: -2, 3: -3}
    assert gathering.call(5) == -5  # still serving, nothing left running
    assert not gathering._running


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_group"):
        Gathering(lambda calls: list(calls), max_group=0)


def test_submitted_calls_run_on_the_runner_thread_and_queue_into_the_next_group_while_the_loop_stays_free() -> None:
    """Calls submitted from an event loop (the aio server's Score): the first runs alone on the gathering's
    runner thread; while it runs, the loop is free (it submits ten more, and a timer of its own fires); those
    ten form the next group (within the bound) and each awaits its own answer."""
    gate = _Gate()
    gathering = Gathering(gate.run_many, max_group=8)

    async def burst() -> tuple[int, list[int], bool]:
        loop = asyncio.get_running_loop()
        first = gathering.submit(21)
        assert await loop.run_in_executor(None, gate.entered.wait, WAIT_S)
        rest = [gathering.submit(c) for c in range(1, 11)]
        ticked = asyncio.Event()
        loop.call_soon(ticked.set)
        await asyncio.wait_for(ticked.wait(), WAIT_S)  # the loop runs while the group waits on its thread
        assert len(gathering._queued) == 10
        gate.release.set()
        return await asyncio.wait_for(first, WAIT_S), list(await asyncio.gather(*rest)), ticked.is_set()

    first, rest, ticked = asyncio.run(burst())
    assert (first, rest, ticked) == (42, [2 * c for c in range(1, 11)], True)
    assert [calls for calls, _ in gate.groups] == [[21], list(range(1, 9)), [9, 10]]
    assert {thread for _, thread in gate.groups} == {"scorer-gathering"}
    assert (gathering.groups, gathering.calls) == (3, 11)
    assert not gathering._running


def test_submitted_and_blocking_calls_share_groups_and_each_gets_its_answer_or_its_groups_error() -> None:
    """A blocking caller queued behind submitted calls is answered by the runner's group, and leads the group
    after it when it is first in the queue; a group function that raises fails that group's calls only."""
    entered, release = threading.Event(), threading.Event()
    ran: list[list[int]] = []

    def run_many(calls: Sequence[int]) -> list[int]:
        ran.append(list(calls))
        if len(ran) == 1:
            entered.set()
            assert release.wait(WAIT_S)
        if 13 in calls:
            raise RuntimeError("unlucky group")
        return [-c for c in calls]

    gathering = Gathering(run_many, max_group=2)
    answers: dict[int, object] = {}

    async def mixed() -> list[object]:
        loop = asyncio.get_running_loop()
        first = gathering.submit(1)
        assert await loop.run_in_executor(None, entered.wait, WAIT_S)
        second = gathering.submit(2)
        threads = _callers(gathering, [3], answers)
        await loop.run_in_executor(None, _until, lambda: len(gathering._queued) == 2)
        unlucky = gathering.submit(13)
        release.set()
        for t in threads:
            await loop.run_in_executor(None, t.join, WAIT_S)
        return list(await asyncio.gather(first, second, unlucky, return_exceptions=True))

    first, second, unlucky = asyncio.run(mixed())
    assert (first, second, answers[3]) == (-1, -2, -3)
    assert isinstance(unlucky, RuntimeError)
    assert ran == [[1], [2, 3], [13]]
    assert not gathering._running


def test_a_submitted_call_finding_no_group_waits_for_as_many_calls_as_the_last_group_held_or_the_wait() -> None:
    """Callers answered together call again one by one: the first of them waits (up to ``max_wait_s``) until
    as many calls as the last group held are queued, so they run as one group again, not as one call and the
    rest. A lone caller never waits; fewer callers than last time wait the bound once."""
    ran: list[list[int]] = []

    def run_many(calls: Sequence[int]) -> list[int]:
        ran.append(list(calls))
        return list(calls)

    gathering = Gathering(run_many, max_group=8, max_wait_s=WAIT_S)

    async def rounds() -> None:
        assert await gathering.submit(1) == 1  # a lone caller: its last group held none, it runs at once
        assert await gathering.submit(2) == 2  # the last group held one call: still no wait
        gathering._last_group = 3  # as if three callers had been answered together
        first = gathering.submit(3)
        await asyncio.sleep(0.05)  # nothing runs while fewer than three are queued
        assert ran == [[1], [2]] and not first.done()
        rest = [gathering.submit(4), gathering.submit(5)]  # the third call: the group runs now
        assert await asyncio.wait_for(asyncio.gather(first, *rest), WAIT_S) == [3, 4, 5]
        gathering.max_wait_s = 0.2  # now only two of the three come back: they wait the bound, then run
        began = time.monotonic()
        assert await asyncio.wait_for(asyncio.gather(gathering.submit(6), gathering.submit(7)), WAIT_S) == [6, 7]
        assert time.monotonic() - began >= 0.19  # (the loop may run a timer up to its clock resolution early)

    asyncio.run(rounds())
    assert ran == [[1], [2], [3, 4, 5], [6, 7]]


def test_a_later_answered_group_is_answered_after_its_commit_while_the_next_group_runs() -> None:
    """``run_many_later`` (the scorer's decision-log commit): the first group's callers wait for its commit,
    and the next group runs meanwhile; a commit that fails fails its own group only; a barrier group is
    waited for before the next group runs; commits complete in order."""
    commit_started = [threading.Event() for _ in range(4)]
    commit_release = [threading.Event() for _ in range(4)]
    ran: list[list[int]] = []
    committed: list[int] = []

    def run_many_later(calls: Sequence[int]) -> tuple[list[int], Callable[[], None] | None, bool]:
        k = len(ran)
        ran.append(list(calls))

        def complete() -> None:
            commit_started[k].set()
            assert commit_release[k].wait(WAIT_S)
            committed.append(k)
            if calls[0] < 0:
                raise RuntimeError("commit failed")

        return [2 * c for c in calls], complete, calls[0] == 100

    gathering: Gathering[int, int] = Gathering(lambda calls: [2 * c for c in calls], 8, 0.0, run_many_later)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = gathering.submit(1)
        assert await loop.run_in_executor(None, commit_started[0].wait, WAIT_S)
        second = gathering.submit(-2)  # its group runs while the first one's commit is held
        await loop.run_in_executor(None, _until, lambda: len(ran) == 2)
        assert not first.done() and not second.done()  # nobody answered before their commit
        commit_release[0].set()
        assert await asyncio.wait_for(first, WAIT_S) == 2
        assert await loop.run_in_executor(None, commit_started[1].wait, WAIT_S)
        commit_release[1].set()
        with pytest.raises(RuntimeError, match="commit failed"):
            await asyncio.wait_for(second, WAIT_S)
        barrier = gathering.submit(100)
        assert await loop.run_in_executor(None, commit_started[2].wait, WAIT_S)
        after = gathering.submit(3)
        await asyncio.sleep(0.2)
        assert len(ran) == 3  # the barrier's commit is held: the next group has not run
        commit_release[2].set()
        commit_release[3].set()
        assert await asyncio.wait_for(barrier, WAIT_S) == 200
        assert await asyncio.wait_for(after, WAIT_S) == 6

    asyncio.run(scenario())
    assert ran == [[1], [-2], [100], [3]] and committed == [0, 1, 2, 3]
