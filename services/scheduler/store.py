"""Durable scheduler state in SQLite (WAL): nodes, jobs with their placements, and the event log.

Every scheduler operation stages its row changes and commits them in one transaction before it answers,
so a placement that was acknowledged survives kill -9. Lease deadlines are not stored: on restart every
lease of a placed job starts a fresh TTL (workers could not renew while the scheduler was down).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from services.scheduler.inventory import NodeSpec
from services.scheduler.jobs import EventKind, Job, JobSpec, JobState, ReplicaPlacement

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state INTEGER NOT NULL,
    placements TEXT NOT NULL,
    pending_reason TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    preemption_deadline REAL,
    preempted_by TEXT NOT NULL,
    lease_ttl_s INTEGER NOT NULL,
    awaiting TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, kind INTEGER NOT NULL, job_id TEXT NOT NULL, at REAL NOT NULL, message TEXT NOT NULL
);
"""


class StoreFailure(RuntimeError):
    """A commit failed (disk full, I/O error): nothing of that batch was acknowledged."""


class Ticket:
    """Completion of one group-committed batch."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.error: BaseException | None = None

    def done(self, error: BaseException | None) -> None:
        """Mark durable (or failed)."""
        self.error = error
        self._event.set()

    def wait(self) -> None:
        """Block until durable; StoreFailure if the transaction failed."""
        self._event.wait()
        if self.error is not None:
            raise StoreFailure(f"scheduler state could not be written: {self.error}") from self.error


class Store:
    """SQLite persistence. Callers serialise access (the scheduler holds its lock)."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.executescript(SCHEMA)
        self._staged: list[tuple[str, tuple[Any, ...]]] = []
        self._queue: list[tuple[list[tuple[str, tuple[Any, ...]]], Ticket]] = []
        self._queue_cond = threading.Condition()
        self._closed = False
        #: Transactions committed (several operations may share one: group commit).
        self.transactions = 0
        self._committer = threading.Thread(target=self._commit_loop, name="sqlite-committer", daemon=True)
        self._committer.start()

    def stage_node(self, spec: NodeSpec) -> None:
        """Write a node at the next commit."""
        self._staged.append(
            ("INSERT OR REPLACE INTO nodes (name, spec) VALUES (?, ?)", (spec.name, json.dumps(spec.to_dict())))
        )

    def stage_job(self, job: Job) -> None:
        """Write a job's current state at the next commit."""
        self._staged.append(
            (
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.seq,
                    json.dumps(job.spec.to_dict()),
                    int(job.state),
                    json.dumps([p.to_dict() for p in job.placements.values()]),
                    job.pending_reason,
                    job.submitted_at,
                    job.updated_at,
                    job.preemption_deadline,
                    job.preempted_by,
                    job.lease_ttl_s,
                    json.dumps(sorted(job.awaiting_victims)),
                ),
            )
        )

    def stage_event(self, seq: int, kind: EventKind, job_id: str, at: float, message: str) -> None:
        """Append an event at the next commit."""
        self._staged.append(("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (seq, int(kind), job_id, at, message)))

    def commit(self) -> Ticket | None:
        """Hand everything staged to the committer; the ticket is set once it is durable.

        Called under the scheduler's lock, so batches reach the database in decision order. Concurrent
        operations share one transaction and one fsync (group commit); each caller waits on its ticket
        *outside* the lock before it acknowledges.
        """
        if not self._staged:
            return None
        staged, self._staged = self._staged, []
        ticket = Ticket()
        with self._queue_cond:
            if self._closed:
                raise RuntimeError("store is closed")
            self._queue.append((staged, ticket))
            self._queue_cond.notify()
        return ticket

    def commit_now(self) -> None:
        """Commit what is staged and wait for it (used where no lock is held)."""
        ticket = self.commit()
        if ticket is not None:
            ticket.wait()

    def _commit_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._closed:
                    self._queue_cond.wait()
                if not self._queue and self._closed:
                    return
                batch, self._queue = self._queue, []
            error: BaseException | None = None
            self.transactions += 1
            try:
                with self.db:  # BEGIN ... COMMIT, rolled back on error
                    self.db.execute("BEGIN")
                    for staged, _ in batch:
                        for sql, params in staged:
                            self.db.execute(sql, params)
            except BaseException as exc:
                error = exc
            for _, ticket in batch:
                ticket.done(error)

    def mark(self) -> int:
        """Position in the staged writes, for :meth:`rollback_to`."""
        return len(self._staged)

    def rollback_to(self, mark: int) -> None:
        """Drop writes staged after ``mark`` (that part of an operation failed)."""
        del self._staged[mark:]

    def load_nodes(self) -> list[NodeSpec]:
        """Every stored node."""
        rows = self.db.execute("SELECT spec FROM nodes ORDER BY rowid").fetchall()
        return [NodeSpec.from_dict(json.loads(r[0])) for r in rows]

    def load_jobs(self) -> list[Job]:
        """Every stored job, in submission order."""
        out = []
        for row in self.db.execute("SELECT * FROM jobs ORDER BY seq"):
            (_job_id, seq, spec, state, placements, reason, submitted, updated, deadline, by, ttl, awaiting) = row
            job = Job(
                spec=JobSpec.from_dict(json.loads(spec)),
                seq=seq,
                submitted_at=submitted,
                state=JobState(state),
                pending_reason=reason,
                updated_at=updated,
                preemption_deadline=deadline,
                preempted_by=by,
                lease_ttl_s=ttl,
                awaiting_victims=set(json.loads(awaiting)),
            )
            for p in json.loads(placements):
                rp = ReplicaPlacement.from_dict(p)
                job.placements[rp.replica] = rp
            out.append(job)
        return out

    def load_events(self, limit: int) -> list[tuple[int, int, str, float, str]]:
        """The newest ``limit`` events, oldest first."""
        rows = self.db.execute("SELECT * FROM events ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return list(reversed(rows))

    def max_event_seq(self) -> int:
        """Highest stored event sequence number (0 if none)."""
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def close(self) -> None:
        """Flush queued commits, stop the committer and close the database."""
        with self._queue_cond:
            self._closed = True
            self._queue_cond.notify()
        self._committer.join(timeout=30)
        self.db.close()
