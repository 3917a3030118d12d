"""A PostgreSQL server on this machine for the local mesh (``make up STORE=postgres``) and the tests.

It runs the server binaries found on PATH (or Debian's ``/usr/lib/postgresql/*/bin``) in a folder of its
own, listening on 127.0.0.1 only, with ``trust`` authentication: a development server, never a
production one. PostgreSQL refuses to run as root, so as root every command runs as the ``postgres``
system user (``runuser``), which then owns the folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import psycopg

#: The system user that runs the server when this process is root.
SERVER_USER = "postgres"


def server_binary(name: str) -> str:
    """Path of a PostgreSQL server program; RuntimeError saying how to install it when missing."""
    found = shutil.which(name)
    if found is not None:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(
        f"PostgreSQL's {name} is not on PATH: install the server binaries (Debian: apt-get install postgresql; "
        "`make test` does it when run as root)"
    )


class LocalPostgres:
    """The server whose data lives in ``base / "data"`` (created on :meth:`init`), on ``port``."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.port = port
        self._as_root = os.geteuid() == 0

    def _run(self, *argv: str) -> None:
        cmd = ["runuser", "-u", SERVER_USER, "--", *argv] if self._as_root else list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} {argv[1]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def init(self, *, fsync: bool = True) -> None:
        """Create the folder and the cluster unless it exists (``fsync=False``: a throwaway test server)."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.base, user.pw_uid, user.pw_gid)
        if (self.data / "PG_VERSION").exists():
            return
        extra = () if fsync else ("--no-sync",)
        self._run(server_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", *extra)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c max_connections=200"
        self._run(
            server_binary("pg_ctl"),
            "start",
            "-w",
            "-t",
            "120",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        self._run(server_binary("pg_ctl"), "stop", "-w", "-t", "120", "-D", str(self.data), "-m", mode)

    def pid(self) -> int:
        """The running server's process id (0 when it is not running)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def url(self, database: str = "postgres", password: str = "") -> str:
        """Connection URL of ``database`` (a password only where a test checks it is never printed)."""
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def ensure_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
