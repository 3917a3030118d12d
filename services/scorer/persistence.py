"""Durable model registry of the scorer: registered versions and the active versions survive a restart.

Every accepted registration is written before the call is answered, as the domain's own record: one folder
``<seq>-<model hex>-<version hex>/`` holding ``registration.json`` (model, version, features, format,
architecture, options and the version's settings: threshold policy, rules, cleaning, alert rate, F1
settings), ``model.bin`` (the model's bytes as registered) and, when given, ``reference.safetensors`` (the
reference rows). ``active.json`` holds the active version of every model and its activation history, written
after every change (register with activate, activate, rollback, F1-drop rollback). On start the versions are
registered again in their original order (each loads and passes its warm-up again) and the recorded active
versions restored, so the scorer serves what it served before kill -9.

Writes are atomic (a temporary file or folder, fsync, rename). An unreadable record is logged and skipped,
never fatal. State folders from before this format kept protobuf requests (``*.pb``): :meth:`legacy_records`
lists them so the service shell, which reads protobuf, can migrate them (:meth:`save_registration` with
their sequence number, then :meth:`retire_legacy`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from services.scorer.decision import Rule, RuleAction, ThresholdPolicy
from services.scorer.monitoring import CleaningPolicy
from services.scorer.registry import ModelFormat
from services.scorer.scorer import Registration, VersionConfig

log = logging.getLogger(__name__)
ACTIVE_FILE = "active.json"
RECORD_FILE = "registration.json"
PAYLOAD_FILE = "model.bin"
REFERENCE_FILE = "reference.safetensors"
#: Version of the record layout, written into every record; a newer one is refused with a clear message.
RECORD_FORMAT = 1


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def record_json(r: Registration) -> dict[str, Any]:
    """The JSON part of a registration record (everything but the model bytes and the reference rows)."""
    c = r.config
    return {
        "format_version": RECORD_FORMAT,
        "model": r.model,
        "version": r.version,
        "features": list(r.features),
        "format": r.fmt.value,
        "architecture": r.arch,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in r.options.items()},
        "threshold": {"base": c.policy.base, "k": c.policy.k, "lower": c.policy.lower, "upper": c.policy.upper},
        "rules": [{"name": x.name, "feature": x.feature, "limit": x.limit, "action": x.action.value} for x in c.rules],
        "cleaning": c.cleaning.value,
        "missing_alert_rate": c.missing_alert_rate,
        "baseline_f1": c.baseline_f1,
        "max_f1_drop": c.max_f1_drop,
        "reference_rows": c.reference_rows,
    }


def registration_from_json(data: dict[str, Any], payload: bytes, reference: np.ndarray | None) -> Registration:
    """The registration a record describes; ValueError naming what is wrong."""
    if data.get("format_version") != RECORD_FORMAT:
        raise ValueError(f"record format {data.get('format_version')!r}; this scorer reads format {RECORD_FORMAT}")
    t = data["threshold"]
    config = VersionConfig(
        policy=ThresholdPolicy(base=t["base"], k=t["k"], lower=t["lower"], upper=t["upper"]),
        rules=tuple(Rule(x["name"], x["feature"], float(x["limit"]), RuleAction(x["action"])) for x in data["rules"]),
        cleaning=CleaningPolicy(data["cleaning"]),
        missing_alert_rate=float(data["missing_alert_rate"]),
        baseline_f1=data["baseline_f1"],
        max_f1_drop=float(data["max_f1_drop"]),
        reference_rows=int(data["reference_rows"]),
    )
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    return Registration(
        model=data["model"],
        version=data["version"],
        features=tuple(data["features"]),
        fmt=ModelFormat(data["format"]),
        payload=payload,
        config=config,
        arch=data["architecture"],
        options=options,
        reference=reference,
    )


class RegistryStore:
    """Registrations and active versions under one folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _seq(path: Path) -> int | None:
        head = path.name.split("-", 1)[0]
        return int(head) if head.isdigit() else None

    def _next_seq(self) -> int:
        seqs = [s for p in self.folder.iterdir() if (s := self._seq(p)) is not None]
        return max(seqs, default=0) + 1

    def save_registration(self, registration: Registration, *, seq: int | None = None) -> None:
        """Record an accepted registration (its activation is recorded separately by :meth:`save_active`)."""
        r = registration
        name = f"{seq or self._next_seq():08d}-{r.model.encode().hex()}-{r.version.encode().hex()}"
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write(tmp / RECORD_FILE, json.dumps(record_json(r), sort_keys=True, indent=1).encode())
        _write(tmp / PAYLOAD_FILE, r.payload)
        if r.reference is not None:
            _write(tmp / REFERENCE_FILE, st_save({"rows": np.ascontiguousarray(r.reference, dtype=np.float32)}))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.folder)

    def save_active(self, active: dict[str, tuple[str, list[str]]]) -> None:
        """Record the active version of every model and its activation history (for rollback)."""
        data = {model: {"active": a, "history": h} for model, (a, h) in active.items()}
        _atomic_write(self.folder / ACTIVE_FILE, json.dumps(data, sort_keys=True).encode())

    def registrations(self) -> Iterator[Registration]:
        """Every recorded registration, in the order they were accepted."""
        records = sorted((s, p) for p in self.folder.iterdir() if p.is_dir() and (s := self._seq(p)) is not None)
        for _, path in records:
            try:
                data = json.loads((path / RECORD_FILE).read_bytes())
                reference = None
                if (path / REFERENCE_FILE).exists():
                    reference = st_load((path / REFERENCE_FILE).read_bytes())["rows"]
                registration = registration_from_json(data, (path / PAYLOAD_FILE).read_bytes(), reference)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable model registration skipped", extra={"file": str(path), "error": str(exc)})
                continue
            yield registration

    def has_record(self, seq: int) -> bool:
        """Whether a registration with sequence number ``seq`` is recorded in the current format."""
        return any(p.is_dir() and self._seq(p) == seq for p in self.folder.iterdir())

    def legacy_records(self) -> list[tuple[int, Path]]:
        """(sequence, path) of registrations in the old format (protobuf requests, ``*.pb``), oldest first."""
        return sorted((s, p) for p in self.folder.glob("*.pb") if (s := self._seq(p)) is not None)

    def retire_legacy(self, path: Path) -> None:
        """Keep a migrated old record aside (``.pb.migrated``) so it is neither read again nor lost."""
        os.replace(path, path.with_name(path.name + ".migrated"))
        _fsync_dir(self.folder)

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
