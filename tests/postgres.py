"""A throwaway PostgreSQL server for the tests, started from the server binaries on this machine.

``initdb`` and ``pg_ctl`` run as the ``postgres`` system user when the tests run as root (PostgreSQL refuses
root); the data directory lives in a fresh folder under the system temp dir owned by that user, the
server listens on 127.0.0.1 on a free port, and it is stopped and removed at the end of the session. Each
test gets a fresh database (:meth:`PostgresServer.create_database`).

Missing binaries fail the tests with a message: ``make test`` installs Debian's ``postgresql`` package.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg

from .processes import free_port

SERVER_USER = "postgres"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
            return str(candidate)
        raise RuntimeError(
            f"PostgreSQL's {name} is not on PATH: install the server binaries (Debian: apt-get install "
            "postgresql; `make test` does it when run as root)"
        )
    return found


class PostgresServer:
    """One PostgreSQL server in its own data directory; :meth:`stop` and :meth:`start` may repeat."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="guardmesh-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self._created = 0
        self._lock = threading.Lock()
        self._run(_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, *argv: str) -> None:
        cmd = ["runuser", "-u", SERVER_USER, "--", *argv] if self._as_root else list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c max_connections=200"
        self._run(
            _binary("pg_ctl"), "start", "-w", "-t", "120", "-D", str(self.data), "-l", str(self.log), "-o", options
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        self._run(_binary("pg_ctl"), "stop", "-w", "-t", "120", "-D", str(self.data), "-m", mode)

    def url(self, database: str = "postgres", password: str = "") -> str:
        """Connection URL of ``database`` (with a password only to test that it is never printed)."""
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        with self._lock:
            self._created += 1
            name = f"test_{os.getpid()}_{self._created}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stop the server (if running) and remove its folder."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
