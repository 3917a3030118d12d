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

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from guardmesh.durable import (
    GroupCommitLog,
    Migration,
    StoreError,
    StoreFailure,
    StoreTarget,
    Ticket,
    Transaction,
)
from guardmesh.errors import AlreadyExists, Unavailable
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


# -- the shared registry: several replicas on one store ----------------------------------------------------

#: The scorer's schema in the shared store (``guardmesh.durable``): versions (the registration record; the
#: bytes live in the artefact store, named by their SHA-256), the active version and rollback history per
#: model, one change counter replicas poll, the decision log and the labelled decisions (the F1 windows).
_LABEL_ID = "{id}"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS scorer_versions (
    model TEXT NOT NULL, version TEXT NOT NULL, seq BIGINT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS scorer_active (model TEXT PRIMARY KEY, active TEXT NOT NULL, history TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scorer_changes (name TEXT PRIMARY KEY, counter BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS scorer_decisions (
    model TEXT NOT NULL, request_id TEXT NOT NULL, version TEXT NOT NULL, positive INTEGER NOT NULL,
    replica TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (model, request_id)
);
CREATE TABLE IF NOT EXISTS scorer_labels (
    {id}, model TEXT NOT NULL, version TEXT NOT NULL, predicted INTEGER NOT NULL, label INTEGER NOT NULL,
    replica TEXT NOT NULL, at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS scorer_labels_by_version ON scorer_labels (model, version, id)
"""
MIGRATIONS = (
    Migration(
        1,
        _SCHEMA.replace(_LABEL_ID, "id BIGSERIAL PRIMARY KEY"),
        sqlite=_SCHEMA.replace(_LABEL_ID, "id INTEGER PRIMARY KEY AUTOINCREMENT"),
    ),
    # Each replica's live window (float32 rows, little-endian, base64), for drift reports merged over replicas.
    Migration(
        2,
        "CREATE TABLE IF NOT EXISTS scorer_live_windows (model TEXT NOT NULL, replica TEXT NOT NULL, "
        "features BIGINT NOT NULL, rows_b64 TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (model, replica))",
    ),
    # The decision log is pruned to the newest decisions per model (by time).
    Migration(3, "CREATE INDEX IF NOT EXISTS scorer_decisions_by_time ON scorer_decisions (model, at)"),
)
#: The NOTIFY channel of registry changes (PostgreSQL); SQLite replicas poll the change counter.
CHANNEL = "scorer_registry"
#: Labels matched per statement (SQL ``IN`` lists stay short).
_MATCH_CHUNK = 500


class ArtefactStore:
    """Model bytes and reference rows under an fsspec URL (a local folder by default), each file named by
    its SHA-256: writing one twice is harmless, and a reader checks what it reads against the name."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
            self.fs.makedirs(self.root, exist_ok=True)
        except (ValueError, ImportError, OSError) as exc:  # unknown protocol, missing driver, no access
            raise StoreError(f"scorer.artefact_url {url!r} cannot be used: {type(exc).__name__}: {exc}") from None
        self.local = isinstance(self.fs, LocalFileSystem)

    def put(self, data: bytes) -> str:
        """Store ``data`` (durably, before returning); its SHA-256 (hex), which names it."""
        digest = hashlib.sha256(data).hexdigest()
        final = f"{self.root}/{digest}"
        if self.fs.exists(final):
            return digest
        if self.local:  # atomic and fsync'd, as every other write of the service
            _atomic_write(Path(final), data)
        else:  # an object store's put is atomic by itself
            self.fs.pipe_file(final, data)
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes named ``digest``; ValueError if they are missing or do not match it."""
        data = bytes(self.fs.cat_file(f"{self.root}/{digest}"))
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"artefact {digest} in {self.url} does not match its checksum")
        return data


def _unavailable(exc: StoreFailure) -> Unavailable:
    return Unavailable(f"scorer store unavailable: {exc}")


class SharedRegistry:
    """The registry, active versions, decision log and labels of every replica, in one store.

    ``log`` is the scorer's :class:`GroupCommitLog` (SQLite or PostgreSQL); ``artefacts`` holds the bytes.
    Registrations and activations are short transactions (one replica's write is visible to the next read
    of any other); an activation is a compare-and-set on the model's row, so two replicas deciding on the
    same state (two F1 rollbacks) change it once. Decisions go through group commit. Store failures are
    UNAVAILABLE; nothing is changed in memory before the store has it.
    """

    def __init__(self, log: GroupCommitLog, artefacts: ArtefactStore, replica: str) -> None:
        self.log = log
        self.artefacts = artefacts
        self.replica = replica

    def _run(self, body: Any) -> Any:
        try:
            return self.log.transaction(body)
        except StoreFailure as exc:
            raise _unavailable(exc) from None

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query, in a short transaction of its own. Never on the committer's connection (the
        log's ``query`` on SQLite): a read in flight there from another thread can fail the committer's
        COMMIT ('database is locked'), and with it a batch of decisions."""
        return list(self._run(lambda tx: tx.fetchall(sql, params)))

    def _bump(self, tx: Transaction) -> None:
        tx.execute(
            "INSERT INTO scorer_changes (name, counter) VALUES ('registry', 1) "
            "ON CONFLICT (name) DO UPDATE SET counter = scorer_changes.counter + 1"
        )
        sql, params = self.log.notify(CHANNEL, self.replica)
        tx.execute(sql, params)  # type: ignore[arg-type]

    def save_registration(self, registration: Registration) -> None:
        """Store the bytes, then the record; AlreadyExists if any replica registered that version first."""
        r = registration
        record = record_json(r)
        record["payload_sha256"] = self.artefacts.put(r.payload)
        if r.reference is not None:
            rows = st_save({"rows": np.ascontiguousarray(r.reference, dtype=np.float32)})
            record["reference_sha256"] = self.artefacts.put(rows)

        def insert(tx: Transaction) -> bool:
            if tx.fetchall("SELECT 1 FROM scorer_versions WHERE model = ? AND version = ?", (r.model, r.version)):
                return False
            tx.execute(
                "INSERT INTO scorer_versions (model, version, seq, record) "
                "SELECT ?, ?, COALESCE(MAX(seq), 0) + 1, ? FROM scorer_versions",
                (r.model, r.version, json.dumps(record, sort_keys=True)),
            )
            self._bump(tx)
            return True

        if not self._run(insert):
            raise AlreadyExists(f"model {r.model!r} version {r.version!r} exists (registered by another replica)")

    def registrations(
        self, skip: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()
    ) -> Iterator[Registration]:
        """Recorded registrations in the order they were accepted, but those in ``skip`` (already loaded);
        an unreadable one (artefact missing or corrupt) is logged and left out."""
        rows = self._read("SELECT model, version, record FROM scorer_versions ORDER BY seq, model, version")
        for model, version, text in rows:
            if (model, version) in skip:
                continue
            try:
                data = json.loads(text)
                reference = None
                if data.get("reference_sha256"):
                    reference = st_load(self.artefacts.get(data["reference_sha256"]))["rows"]
                yield registration_from_json(data, self.artefacts.get(data["payload_sha256"]), reference)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error(
                    "unreadable model registration skipped",
                    extra={"model": model, "version": version, "error": str(exc)},
                )

    def active(self) -> dict[str, tuple[str, list[str]]]:
        """The stored (active version, activation history) of every model."""
        rows = self._read("SELECT model, active, history FROM scorer_active")
        return {str(m): (str(a), [str(h) for h in json.loads(hist)]) for m, a, hist in rows}

    def save_active(self, active: dict[str, tuple[str, list[str]]]) -> None:
        """Set the stored active versions of these models as given (used to adopt an old registry folder)."""

        def write(tx: Transaction) -> None:
            for model, (version, history) in active.items():
                tx.execute(
                    "INSERT INTO scorer_active (model, active, history) VALUES (?, ?, ?) "
                    "ON CONFLICT (model) DO UPDATE SET active = excluded.active, history = excluded.history",
                    (model, version, json.dumps(history)),
                )
            self._bump(tx)

        self._run(write)

    def change_active(self, model: str, expected: tuple[str | None, list[str]], new: tuple[str, list[str]]) -> bool:
        """Compare-and-set of a model's active version and history: written (True) only if the store still
        holds ``expected`` (active None: no row yet); False when another replica changed it first."""

        def cas(tx: Transaction) -> bool:
            version, history = new
            if expected[0] is None:
                changed = tx.execute(
                    "INSERT INTO scorer_active (model, active, history) VALUES (?, ?, ?) "
                    "ON CONFLICT (model) DO NOTHING",
                    (model, version, json.dumps(history)),
                )
            else:
                changed = tx.execute(
                    "UPDATE scorer_active SET active = ?, history = ? WHERE model = ? AND active = ? AND history = ?",
                    (version, json.dumps(history), model, expected[0], json.dumps(expected[1])),
                )
            if changed == 1:
                self._bump(tx)
            return changed == 1

        return bool(self._run(cas))

    def changes(self) -> int:
        """The registry's change counter (rises with every registration and activation of any replica)."""
        rows = self._read("SELECT counter FROM scorer_changes WHERE name = 'registry'")
        return int(rows[0][0]) if rows else 0

    def listen(self, callback: Any) -> Any:
        """Call ``callback`` when another replica changes the registry (PostgreSQL NOTIFY; on SQLite only
        this process's changes: poll :meth:`changes`)."""
        return self.log.listen(CHANNEL, callback)

    def record_decisions(self, model: str, decided: list[tuple[str, str, bool]]) -> Ticket:
        """Queue (request id, version, positive) decisions for the next group commit; the ticket says when
        they are in the store (a later decision for the same request id replaces the earlier one)."""
        now = time.time()
        rows = [(model, rid, version, int(positive), self.replica, now) for rid, version, positive in decided]
        return self.log.submit(
            [
                (
                    "INSERT INTO scorer_decisions (model, request_id, version, positive, replica, at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model, request_id) DO UPDATE SET "
                    "version = excluded.version, positive = excluded.positive, replica = excluded.replica, "
                    "at = excluded.at",
                    rows,
                )
            ]
        )

    def match_labels(self, model: str, labels: list[tuple[str, bool]]) -> list[tuple[str, bool, bool]]:
        """Match labels to stored decisions of any replica, in one transaction: each matched decision is
        taken out of the log (a label counts once, whichever replica got it) and kept as a labelled
        decision. Returns (version, predicted, label) per matched label, in the order given."""

        def match(tx: Transaction) -> list[tuple[str, bool, bool]]:
            wanted = list(dict.fromkeys(rid for rid, _ in labels))
            found: dict[str, tuple[str, bool]] = {}
            for i in range(0, len(wanted), _MATCH_CHUNK):
                chunk = wanted[i : i + _MATCH_CHUNK]
                marks = ", ".join("?" * len(chunk))
                for rid, version, positive in tx.fetchall(
                    "SELECT request_id, version, positive FROM scorer_decisions "
                    f"WHERE model = ? AND request_id IN ({marks})",
                    (model, *chunk),
                ):
                    found[str(rid)] = (str(version), bool(positive))
                tx.execute(f"DELETE FROM scorer_decisions WHERE model = ? AND request_id IN ({marks})", (model, *chunk))
            matched = []
            for rid, label in labels:
                hit = found.pop(rid, None)  # a request id labelled twice in one batch counts once
                if hit is not None:
                    matched.append((hit[0], hit[1], label))
            now = time.time()
            tx.executemany(
                "INSERT INTO scorer_labels (model, version, predicted, label, replica, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(model, v, int(p), int(a), self.replica, now) for v, p, a in matched],
            )
            return matched

        return list(self._run(match))

    def labelled(
        self, model: str, version: str, last: int, first: int
    ) -> tuple[list[tuple[bool, bool]], list[tuple[bool, bool]]]:
        """(the first ``first``, the last ``last``) labelled decisions (predicted, label) of a version, oldest
        first, from every replica: what its F1 baseline and rolling F1 are computed on."""
        base = "SELECT predicted, label FROM scorer_labels WHERE model = ? AND version = ? ORDER BY id"
        head = self._read(f"{base} LIMIT ?", (model, version, first))
        tail = self._read(f"{base} DESC LIMIT ?", (model, version, last))
        return [(bool(p), bool(a)) for p, a in head], [(bool(p), bool(a)) for p, a in reversed(tail)]

    def prune_decisions(self, model: str, keep: int) -> int:
        """Drop all but the newest ``keep`` (>= 1) stored decisions of ``model`` (ties at the boundary are
        kept); how many were dropped."""
        return int(
            self._run(
                lambda tx: tx.execute(
                    "DELETE FROM scorer_decisions WHERE model = ? AND at < (SELECT at FROM scorer_decisions "
                    "WHERE model = ? ORDER BY at DESC LIMIT 1 OFFSET ?)",
                    (model, model, keep - 1),
                )
            )
        )

    def prune_labels(self, model: str, version: str, first: int, last: int) -> int:
        """Drop the labelled decisions of a version but its first ``first`` (>= 1; what a learned F1
        baseline is computed on) and last ``last`` (>= 1; the rolling window); how many were dropped."""
        of_version = "FROM scorer_labels WHERE model = ? AND version = ? ORDER BY id"
        return int(
            self._run(
                lambda tx: tx.execute(
                    f"DELETE FROM scorer_labels WHERE model = ? AND version = ? "
                    f"AND id > (SELECT id {of_version} LIMIT 1 OFFSET ?) "
                    f"AND id < (SELECT id {of_version} DESC LIMIT 1 OFFSET ?)",
                    (model, version, model, version, first - 1, model, version, last - 1),
                )
            )
        )

    def publish_live(self, model: str, rows: np.ndarray) -> None:
        """Store this replica's live window of ``model`` (rows x features, float32; NaN = missing)."""
        data = base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode()
        self._run(
            lambda tx: tx.execute(
                "INSERT INTO scorer_live_windows (model, replica, features, rows_b64, at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (model, replica) DO UPDATE SET features = excluded.features, "
                "rows_b64 = excluded.rows_b64, at = excluded.at",
                (model, self.replica, int(rows.shape[1]), data, time.time()),
            )
        )

    def live_windows(self, model: str, since: float) -> list[tuple[str, np.ndarray]]:
        """(replica, rows) of each replica's live window of ``model`` published at or after ``since``."""
        found = self._read(
            "SELECT replica, features, rows_b64 FROM scorer_live_windows WHERE model = ? AND at >= ? ORDER BY replica",
            (model, since),
        )
        return [
            (str(name), np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(-1, int(n)).astype(np.float32))
            for name, n, data in found
        ]

    def adopt_folder(self, folder: RegistryStore) -> int:
        """Copy the registrations and active versions of an old registry folder into the store once (what
        the store already holds is left as it is). Returns how many versions were copied."""
        known = {(m, v) for m, v in self._read("SELECT model, version FROM scorer_versions")}
        copied = 0
        for registration in folder.registrations():
            if (registration.model, registration.version) not in known:
                self.save_registration(registration)
                copied += 1
        stored = self.active()
        missing = {m: a for m, a in folder.active().items() if m not in stored}
        if missing:
            self.save_active(missing)
        if copied:
            log.info("registry folder adopted by the store", extra={"versions": copied, "folder": str(folder.folder)})
        return copied


def open_shared_registry(store_url: str | StoreTarget, artefact_url: str, replica: str) -> SharedRegistry:
    """The scorer's shared registry: its store (schema created or migrated) and artefact store."""
    artefacts = ArtefactStore(artefact_url)  # checked first: a bad URL leaves no store connection open
    return SharedRegistry(GroupCommitLog(store_url, MIGRATIONS, "FULL", component="scorer"), artefacts, replica)
