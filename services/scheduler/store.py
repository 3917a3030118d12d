"""Durable scheduler state in SQLite (WAL): nodes, jobs with their placements, and the event log.

Every scheduler operation stages its row changes and commits them in one transaction before it answers,
so a placement that was acknowledged survives kill -9. Lease deadlines are not stored: on restart every
lease of a placed job starts a fresh TTL (workers could not renew while the scheduler was down).
"""

from __future__ import annotations

import json
from pathlib import Path

from guardmesh.durable import GroupCommitLog, Statement, Ticket
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


class Store:
    """SQLite persistence. Callers serialise access (the scheduler holds its lock)."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.log = GroupCommitLog(path, SCHEMA, synchronous)
        self.path = self.log.path
        self.db = self.log.db
        self._staged: list[Statement] = []

    @property
    def transactions(self) -> int:
        """Transactions committed (several operations may share one: group commit)."""
        return self.log.transactions

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
        return self.log.submit(staged)

    def commit_now(self) -> None:
        """Commit what is staged and wait for it (used where no lock is held)."""
        ticket = self.commit()
        if ticket is not None:
            ticket.wait("scheduler state")

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
        self.log.close()
