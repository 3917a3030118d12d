"""Durable writes with group commit on SQLite (WAL): acknowledge only what is on disk.

Services hand batches of statements to one committer thread; it writes every batch queued meanwhile in
ONE transaction (one fsync) and then releases each batch's :class:`Ticket`. A caller answers its RPC only
after its ticket says durable, so nothing acknowledged is lost on kill -9, while concurrent callers share
fsyncs. A failed transaction (disk full, I/O error) fails every ticket of it with :class:`StoreFailure`
and none of its writes is kept.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: One statement and its parameters; a list of parameter tuples runs it with ``executemany``.
Statement = tuple[str, tuple[Any, ...] | list[tuple[Any, ...]]]


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

    def wait(self, what: str = "state") -> None:
        """Block until durable; StoreFailure if the transaction failed."""
        self._event.wait()
        if self.error is not None:
            raise StoreFailure(f"{what} could not be written: {self.error}") from self.error


class GroupCommitLog:
    """A SQLite database (WAL) written by one committer thread with group commit."""

    def __init__(self, path: str | Path, schema: str, synchronous: str = "FULL") -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.executescript(schema)
        self._queue: list[tuple[Sequence[Statement], Ticket]] = []
        self._queue_cond = threading.Condition()
        self._closed = False
        #: Transactions committed (several batches may share one: group commit).
        self.transactions = 0
        self._committer = threading.Thread(target=self._commit_loop, name="sqlite-committer", daemon=True)
        self._committer.start()

    def submit(self, statements: Sequence[Statement]) -> Ticket:
        """Queue ``statements`` for the next transaction; the ticket is set once they are durable.

        Batches reach the database in submission order, so a caller that submits under its own lock
        writes in decision order and can wait for the ticket outside that lock.
        """
        ticket = Ticket()
        with self._queue_cond:
            if self._closed:
                raise RuntimeError("store is closed")
            self._queue.append((statements, ticket))
            self._queue_cond.notify()
        return ticket

    def write(self, statements: Sequence[Statement], what: str = "state") -> None:
        """Submit and wait until durable."""
        self.submit(statements).wait(what)

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
                    for statements, _ in batch:
                        for sql, params in statements:
                            if isinstance(params, list):
                                self.db.executemany(sql, params)
                            else:
                                self.db.execute(sql, params)
            except BaseException as exc:
                error = exc
            for _, ticket in batch:
                ticket.done(error)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only query (reads see every committed transaction)."""
        return self.db.execute(sql, params).fetchall()

    def close(self) -> None:
        """Flush queued commits, stop the committer and close the database."""
        with self._queue_cond:
            self._closed = True
            self._queue_cond.notify()
        self._committer.join(timeout=30)
        self.db.close()
