"""Durable model registry of the scorer: registered versions and the active version survive a restart.

Every accepted registration is written as its ``RegisterModelRequest`` (payload, features, threshold, rules,
reference rows) before the call is answered, and the active version of every model after any change
(register with activate, activate, rollback, F1-drop rollback). On start, the versions are registered again
in their original order (each loads and passes its warm-up batch again) and the recorded active versions
are activated, so the scorer serves what it served before kill -9. Files are written atomically
(temporary file, fsync, rename); an unreadable file is logged and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from guardmesh.v1 import scorer_pb2 as pb

log = logging.getLogger(__name__)
ACTIVE_FILE = "active.json"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RegistryStore:
    """Registrations and active versions under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _next_seq(self) -> int:
        seqs = [int(p.name.split("-", 1)[0]) for p in self.folder.glob("*.pb") if p.name.split("-", 1)[0].isdigit()]
        return max(seqs, default=0) + 1

    def save_registration(self, request: pb.RegisterModelRequest) -> None:
        """Record an accepted registration (its activation is recorded separately)."""
        stored = pb.RegisterModelRequest()
        stored.CopyFrom(request)
        stored.activate = False
        name = f"{self._next_seq():08d}-{stored.model.encode().hex()}-{stored.version.encode().hex()}.pb"
        _atomic_write(self.folder / name, stored.SerializeToString())

    def save_active(self, active: dict[str, tuple[str, list[str]]]) -> None:
        """Record the active version of every model and its activation history (for rollback)."""
        data = {model: {"active": a, "history": h} for model, (a, h) in active.items()}
        _atomic_write(self.folder / ACTIVE_FILE, json.dumps(data, sort_keys=True).encode())

    def registrations(self) -> Iterator[pb.RegisterModelRequest]:
        """Every recorded registration, in the order they were accepted."""
        for path in sorted(self.folder.glob("*.pb")):
            request = pb.RegisterModelRequest()
            try:
                request.ParseFromString(path.read_bytes())
            except Exception as exc:
                log.error("unreadable model registration skipped", extra={"file": str(path), "error": str(exc)})
                continue
            yield request

    def active(self) -> dict[str, tuple[str, list[str]]]:
        """The recorded (active version, activation history) of every model (empty if none)."""
        path = self.folder / ACTIVE_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            log.error("unreadable active versions skipped", extra={"file": str(path), "error": str(exc)})
            return {}
        return {str(k): (str(v["active"]), [str(h) for h in v.get("history", [])]) for k, v in data.items()}
