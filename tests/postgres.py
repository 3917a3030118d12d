"""A throwaway PostgreSQL server for the tests (guardmesh/localpg.py), from the server binaries on this machine.

``initdb`` and ``pg_ctl`` run as the ``postgres`` system user when the tests run as root (PostgreSQL refuses
root); the data directory lives in a fresh folder under the system temp dir owned by that user, the
server listens on 127.0.0.1 on a free port, and it is stopped and removed at the end of the session. Each
test gets a fresh database (:meth:`PostgresServer.create_database`).

Missing binaries fail the tests with a message: ``make test`` installs Debian's ``postgresql`` package.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path

from guardmesh.localpg import LocalPostgres

from .processes import free_port


class PostgresServer(LocalPostgres):
    """One server for the session; :meth:`stop` and :meth:`start` may repeat (a test of a lost store)."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="guardmesh-pg-")), free_port())
        self._names = itertools.count(1)
        self.init(fsync=False)
        self.start()

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        return self.ensure_database(f"test_{os.getpid()}_{next(self._names)}")

    def close(self) -> None:
        """Stop the server (if running) and remove its folder."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
