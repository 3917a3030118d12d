"""Durable scheduler state: nodes, jobs with their placements, and the event log, on SQLite or PostgreSQL.

Every scheduler operation stages its row changes and commits them in one transaction before it answers,
so a placement that was acknowledged survives kill -9. Lease deadlines are not stored: when a scheduler
starts or takes over as leader every lease of a placed job starts a fresh TTL (workers could not renew
while no scheduler was serving). The SQL is portable (:mod:`guardmesh.durable`); the core never learns
which backend it runs on.
"""

from __future__ import annotations

import json
from pathlib import Path

from guardmesh.durable import Fence, GroupCommitLog, Migration, Statement, StoreTarget, Ticket
from guardmesh.inventory import NodeSpec
from services.scheduler.jobs import EventKind, Job, JobSpec, JobState, ReplicaPlacement

#: The scheduler's schema, one step per version. Version 1 is the schema SQLite files had before versions
#: were recorded (``IF NOT EXISTS``: such a file is adopted as it is).
MIGRATIONS = (
    Migration(
        1,
        """
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    spec TEXT NOT NULL,
    state INTEGER NOT NULL,
    placements TEXT NOT NULL,
    pending_reason TEXT NOT NULL,
    submitted_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    preemption_deadline DOUBLE PRECISION,
    preempted_by TEXT NOT NULL,
    lease_ttl_s INTEGER NOT NULL,
    awaiting TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT PRIMARY KEY, kind INTEGER NOT NULL, job_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    message TEXT NOT NULL
)
""",
    ),
    # Nodes come back in registration order on every backend (SQLite files had only their rowid for it).
    Migration(
        2,
        "ALTER TABLE nodes ADD COLUMN position BIGINT NOT NULL DEFAULT 0",
        sqlite="ALTER TABLE nodes ADD COLUMN position BIGINT NOT NULL DEFAULT 0; UPDATE nodes SET position = rowid",
    ),
)

_JOB_COLUMNS = (
    "job_id, seq, spec, state, placements, pending_reason, submitted_at, updated_at, preemption_deadline, "
    "preempted_by, lease_ttl_s, awaiting"
)
_UPSERT_JOB = (
    f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _JOB_COLUMNS.split(", ")[1:])
)


class Store:
    """The scheduler's rows over one :class:`GroupCommitLog`. Callers serialise access (the scheduler
    holds its lock).

    ``target`` is a store URL or SQLite path (the store then owns its log and closes it), or an open log
    shared with others (a leader's successive cores: closing the store leaves the log open). ``fence``
    (lease name, epoch): every batch of this store is written only while the lease holds that epoch.
    """

    def __init__(
        self, target: str | Path | GroupCommitLog, synchronous: str = "FULL", *, fence: Fence | None = None
    ) -> None:
        self.owns_log = not isinstance(target, GroupCommitLog)
        self.log = target if isinstance(target, GroupCommitLog) else open_log(target, synchronous)
        self.path = self.log.path
        self.fence = fence
        self._staged: list[Statement] = []
        self._last: Ticket | None = None
        self._next_position = int(self.log.query("SELECT COALESCE(MAX(position), 0) FROM nodes")[0][0]) + 1

    @property
    def transactions(self) -> int:
        """Transactions committed (several operations may share one: group commit)."""
        return self.log.transactions

    def stage_node(self, spec: NodeSpec) -> None:
        """Write a node at the next commit (a known node keeps its place in the order)."""
        self._staged.append(
            (
                "INSERT INTO nodes (name, spec, position) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                (spec.name, json.dumps(spec.to_dict()), self._next_position),
            )
        )
        self._next_position += 1

    def stage_job(self, job: Job) -> None:
        """Write a job's current state at the next commit."""
        self._staged.append(
            (
                _UPSERT_JOB,
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
        self._staged.append(
            (
                "INSERT INTO events (seq, kind, job_id, at, message) VALUES (?, ?, ?, ?, ?)",
                (seq, int(kind), job_id, at, message),
            )
        )

    def commit(self) -> Ticket | None:
        """Hand everything staged to the committer; the ticket is set once it is committed.

        Called under the scheduler's lock, so batches reach the store in decision order. Concurrent
        operations share one transaction (group commit); each caller waits on its ticket *outside* the
        lock before it acknowledges.
        """
        if not self._staged:
            return None
        staged, self._staged = self._staged, []
        # Chained: once a batch failed, every later batch of this store fails unwritten (fail-stop).
        self._last = self.log.submit(staged, self.fence, after=self._last)
        return self._last

    def mark(self) -> int:
        """Position in the staged writes, for :meth:`rollback_to`."""
        return len(self._staged)

    def rollback_to(self, mark: int) -> None:
        """Drop writes staged after ``mark`` (that part of an operation failed)."""
        del self._staged[mark:]

    def load_nodes(self) -> list[NodeSpec]:
        """Every stored node, in registration order."""
        rows = self.log.query("SELECT spec FROM nodes ORDER BY position, name")
        return [NodeSpec.from_dict(json.loads(r[0])) for r in rows]

    def load_jobs(self) -> list[Job]:
        """Every stored job, in submission order."""
        out = []
        for row in self.log.query(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq"):
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
        rows = self.log.query("SELECT seq, kind, job_id, at, message FROM events ORDER BY seq DESC LIMIT ?", (limit,))
        return [(int(s), int(k), str(j), float(a), str(m)) for s, k, j, a, m in reversed(rows)]

    def max_event_seq(self) -> int:
        """Highest stored event sequence number (0 if none)."""
        return int(self.log.query("SELECT COALESCE(MAX(seq), 0) FROM events")[0][0])

    def close(self) -> None:
        """Flush queued commits; stop the committer and close the store if this store opened it."""
        if self.owns_log:
            self.log.close()


def open_log(target: str | Path | StoreTarget, synchronous: str = "FULL") -> GroupCommitLog:
    """The scheduler's log at ``target`` (store URL or SQLite path), schema created or migrated."""
    return GroupCommitLog(target, MIGRATIONS, synchronous, component="scheduler")
