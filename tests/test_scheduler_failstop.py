"""Fail-stop is total (issue 17 item 6): after a failed write nothing later reaches the store.

A real SQLite file; the failure is a real SQLite error raised inside the scheduler's transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guardmesh.errors import Unavailable
from guardmesh.inventory import uniform_node
from services.scheduler.jobs import EventKind, JobState
from services.scheduler.store import Store
from tests.test_scheduler_core import FakeClock, make_sched, spec

# -- fail-stop ------------------------------------------------------------------------------------------


def _fail_inserts_of(db_path: Path, job_id: str) -> None:
    """A real SQLite failure inside the scheduler's transaction: a trigger aborts the job's PLACED event."""
    with sqlite3.connect(db_path) as db:
        db.execute(
            f"CREATE TRIGGER lose_{job_id} BEFORE INSERT ON events WHEN NEW.job_id = '{job_id}' "
            f"AND NEW.kind = {int(EventKind.PLACED)} "
            "BEGIN SELECT RAISE(ABORT, 'injected write failure (disk full)'); END"
        )


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_after_a_failed_write_nothing_later_reaches_the_store(tmp_path: Path) -> None:
    """The failed submit's batch is in flight when the lease reaper stages its own (the jobs' leases lapsed):
    the reaper's batch must not be written on top of the lost one. After restart: no job the client was
    told failed, no reaper write, and event sequence numbers without a gap."""
    db_path = tmp_path / "scheduler.db"
    clock = FakeClock()
    sched, _ = make_sched([uniform_node("node-a", "A", 2, 16000)], store=Store(db_path), clock=clock, lease_ttl_s=10)
    assert sched.submit(spec("kept")).state == JobState.RUNNING
    _fail_inserts_of(db_path, "lost")

    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the committer waits with "lost" in hand
    outcomes: dict[str, BaseException | object] = {}

    def call(name: str, fn: Callable[[], object]) -> None:
        try:
            outcomes[name] = fn()
        except BaseException as exc:
            outcomes[name] = exc

    log = sched.store.log  # type: ignore[union-attr]
    submit_thread = threading.Thread(target=call, args=("submit", lambda: sched.submit(spec("lost"))))
    kept_ticket = sched.last_ticket
    submit_thread.start()
    _wait(lambda: sched.last_ticket is not kept_ticket and not log._queue)  # the committer took the batch
    clock.advance(60)  # every lease lapses: the reaper frees "kept" (and "lost")
    tick_thread = threading.Thread(target=call, args=("tick", sched.tick))
    tick_thread.start()
    _wait(lambda: len(log._queue) == 1)  # the reaper's batch waits behind the failing one
    blocker.execute("ROLLBACK")
    blocker.close()
    submit_thread.join(30)
    tick_thread.join(30)
    assert isinstance(outcomes["submit"], Unavailable)
    assert isinstance(outcomes["tick"], Unavailable)
    # Fail-stop: later calls are refused and the reaper writes nothing.
    with pytest.raises(Unavailable):
        sched.submit(spec("later"))
    transactions = log.transactions
    assert sched.tick() == []
    assert log.transactions == transactions
    sched.close()

    with sqlite3.connect(db_path) as db:
        db.execute("DROP TRIGGER lose_lost")
    again, _ = make_sched([], store=Store(db_path), clock=clock)
    assert {j.job_id: j.state for j in again.list_jobs()} == {"kept": JobState.RUNNING}
    seqs = [e.seq for e in again.events_after(0, 10_000)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert again.submit(spec("next")).state in (JobState.RUNNING, JobState.PENDING)
    assert [e.seq for e in again.events_after(0, 10_000)][len(seqs)] == len(seqs) + 1
    again.close()
