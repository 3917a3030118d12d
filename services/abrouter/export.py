"""The exposure table out of the router (issue #20 item 1): Parquet files partitioned by experiment and day,
written through fsspec (a local directory by default, any object-store URL fsspec knows).

Layout: ``<root>/experiment=<key>/day=<YYYY-MM-DD>/part-<first id>-<last id>.parquet`` (hive partitioning,
so DuckDB, Spark and pyarrow read the partition columns back). One row per logged exposure, columns
:data:`COLUMNS`; ``exposure_id`` is the store's row number, unique per store.

Idempotent by exposure id, kill -9 and replicas included (:class:`RangeExporter`, which the observation
table's exporter shares): each round first claims the range of ids it is about to write in the store
(``export_state``: a compare-and-set that succeeds only while no range is pending, so one range per
starting id, claimed once, by one exporter), then writes the files (each to a temporary name, renamed
when complete), then records the range as done. A range pending when a round starts (cut short by kill -9,
or another replica's in progress) is written again for exactly that range, under the same names, never
under two. Only ids below every hole in the numbering (a transaction still committing; see
:class:`services.abrouter.store.Tail`) are exported, so a late commit is never passed over.

Reading (:func:`read_exposures`) opens every ``*.parquet`` file; one that does not read as an exposure file
(corrupt, cut short, another schema) raises :class:`ExportCorrupt` naming it, never skipped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guardmesh.durable import StoreFailure
from guardmesh.leadership import Lease
from services.abrouter.store import ExposureRow, RouterStore, Tail

log = logging.getLogger(__name__)

#: The exposure table's columns and what each means (also carried in each file's schema as field metadata).
COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "exposure_id": (pa.int64(), "the store's row number of the exposure: unique per store, rising; the dedup key"),
    "time": (pa.timestamp("us", tz="UTC"), "when the unit was exposed (the request's timestamp, else the router's)"),
    "experiment": (pa.string(), "experiment key (also the partition folder experiment=<key>)"),
    "revision": (pa.int64(), "the experiment's config version in force at the exposure (see GetExperimentHistory)"),
    "unit": (pa.string(), "the hashed unit: the unit id, or the hash attribute's value"),
    "arm": (pa.int32(), "arm index in the revision's spec, 0-based"),
    "arm_name": (pa.string(), "arm name in that revision"),
    "bucket": (pa.float64(), "the unit's hash bucket in [0, 1)"),
    "hash_version": (pa.int32(), "GrowthBook hash version (1 or 2) of the revision"),
    "propensity": (pa.float64(), "probability of this arm for this unit at the exposure (0, 1]"),
    "numeric_covariates": (pa.map_(pa.string(), pa.float64()), "numeric covariates logged with the exposure"),
    "categorical_covariates": (pa.map_(pa.string(), pa.string()), "categorical covariates logged with it"),
}
EXPOSURE_SCHEMA = pa.schema(
    [pa.field(name, kind, nullable=False, metadata={"doc": doc}) for name, (kind, doc) in COLUMNS.items()]
)

#: Exposures written per round at most (bounds the exporter's memory).
BATCH_ROWS = 200_000
_STATE = "parquet"


class ExportCorrupt(RuntimeError):
    """A file of the exposure table cannot be read as one (corrupt, cut short, or another schema)."""


def _arm_name(arm: int, names: tuple[str, ...]) -> str:
    return names[arm] if arm < len(names) else ""


class Revisions:
    """(hash version, arm names) of each experiment revision, read once from the store."""

    def __init__(self, store: RouterStore) -> None:
        self.store = store
        self._known: dict[tuple[str, int], tuple[int, tuple[str, ...]]] = {}

    def of(self, key: str, version: int) -> tuple[int, tuple[str, ...]]:
        """(hash version, arm names) of revision ``version`` of ``key`` ((0, ()) if unknown)."""
        found = self._known.get((key, version))
        if found is None:
            for v, _at, _change, _comment, exp in self.store.load_revisions(key):
                self._known[(key, v)] = (exp.spec.hash_version, tuple(a.name for a in exp.spec.arms))
            found = self._known.get((key, version), (0, ()))
        return found


@dataclass(frozen=True)
class SettledExposure:
    """One exposure as the table and the live stream give it."""

    exposure_id: int
    row: ExposureRow
    hash_version: int
    arm_name: str


class ExposureStream:
    """Every replica's exposures in id order, each once it settled (committed, no lower id still committing):
    the core of WatchExposures. ``after``: the last id the consumer has; ``key``: one experiment or all."""

    def __init__(self, store: RouterStore, after: int = 0, key: str = "") -> None:
        self.store = store
        self.key = key
        self.tail = Tail(after)
        self.sent = after
        self._revisions = Revisions(store)

    def next_batch(self, limit: int = 1000) -> list[SettledExposure]:
        """The exposures that settled since the previous call (possibly none)."""
        rows = self.store.exposures_after(self.tail.low, limit=limit)
        self.tail.take([n for n, _, _ in rows], time.monotonic())
        out = []
        for n, _, row in rows:
            if self.sent < n <= self.tail.low and (not self.key or row.key == self.key):
                hash_version, names = self._revisions.of(row.key, row.config_version)
                out.append(SettledExposure(n, row, hash_version, _arm_name(row.arm, names)))
        self.sent = max(self.sent, self.tail.low)
        return out


RowT = TypeVar("RowT")

#: No bound on the rows of one round.
UNBOUNDED = 2**62


class RangeExporter(Generic[RowT]):
    """Exports the rows of one store table, numbered by the store, to files named after ranges of those
    numbers, idempotent by number across kill -9 and across replicas (the exposure and the observation table).

    The store's ``export_state`` row ``state_name`` holds (done, pending): every number up to ``done`` is in
    the table; ``(done, pending]`` is the range in progress when ``pending > done``. A round claims
    ``(done, last]`` with a compare-and-set that succeeds only while nothing is pending, so for each ``done``
    exactly one range is ever claimed, by one exporter, and every writer of it uses the same file names. The
    files are written, then the range is marked done (again a compare-and-set on ``done``: a writer that lost
    a race changes nothing). A round that finds a range pending (cut short, or another exporter's in progress)
    writes exactly that range again, under the same names: the files are replaced, never doubled. Only
    numbers below every hole still committing (:class:`services.abrouter.store.Tail`, kept between rounds)
    are claimed, so a late commit is never passed over.

    Subclasses give the rows (:meth:`_rows_after`) and write one range's files (:meth:`_write_files`).
    """

    def __init__(self, store: RouterStore, url: str, state_name: str, batch_rows: int = UNBOUNDED) -> None:
        self.store = store
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.batch_rows = batch_rows
        self._state = state_name
        store.log.transaction(
            lambda tx: tx.execute(
                "INSERT INTO export_state (name, done, pending) VALUES (?, 0, 0) ON CONFLICT (name) DO NOTHING",
                (state_name,),
            )
        )
        self.tail = Tail(self.state()[0])

    def state(self) -> tuple[int, int]:
        """(last id exported, last id of the round in progress; equal when none is)."""
        done, pending = self.store.query("SELECT done, pending FROM export_state WHERE name = ?", (self._state,))[0]
        return int(done), int(pending)

    def export_once(self) -> int:
        """One round: any range pending written again, then every settled row not exported yet (up to
        ``batch_rows``) claimed and written; the number of rows written."""
        written = 0
        while True:
            done, pending = self.state()
            if pending > done:
                written += self._redo(done, pending)
                continue
            if self.tail.low < done:  # another exporter got further
                self.tail = Tail(done)
            rows = self._rows_after(done, UNBOUNDED, self.batch_rows)
            self.tail.take([n for n, _ in rows], time.monotonic())
            last = max((n for n, _ in rows if n <= self.tail.low), default=done)
            if last <= done:
                return written
            if self._claim(done, last):  # else another exporter claimed a range first: start over
                return written + self._write_range(done, last, rows)

    def _redo(self, done: int, pending: int) -> int:
        log.info("writing a pending export range again", extra={"table": self.url, "first": done + 1, "last": pending})
        return self._write_range(done, pending, self._rows_after(done, pending, UNBOUNDED))

    def _claim(self, done: int, last: int) -> bool:
        """Record ``(done, last]`` as the range in progress, unless another exporter moved the state first."""
        changed = self.store.log.transaction(
            lambda tx: tx.execute(
                "UPDATE export_state SET pending = ? WHERE name = ? AND done = ? AND pending = ?",
                (last, self._state, done, done),
            )
        )
        return changed == 1

    def _write_range(self, done: int, last: int, rows: list[tuple[int, RowT]]) -> int:
        in_range = [(n, r) for n, r in rows if done < n <= last]
        self._write_files(f"part-{done + 1:020d}-{last:020d}.parquet", in_range)
        self.store.log.transaction(
            lambda tx: tx.execute(
                "UPDATE export_state SET done = ?, pending = ? WHERE name = ? AND done = ? AND pending = ?",
                (last, last, self._state, done, last),
            )
        )
        return len(in_range)

    def _rows_after(self, done: int, upto: int, limit: int) -> list[tuple[int, RowT]]:
        """(number, row) of the rows numbered in ``(done, upto]``, the first ``limit``, in number order."""
        raise NotImplementedError

    def _write_files(self, name: str, rows: list[tuple[int, RowT]]) -> None:
        """Write the files of one range, each called ``name`` in its partition folder."""
        raise NotImplementedError

    def _write_file(self, folder: str, name: str, table: pa.Table) -> None:
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.inprogress"
        with self.fs.open(temporary, "wb") as out:
            pq.write_table(table, out, compression="zstd")
        self.fs.mv(temporary, f"{folder}/{name}")  # complete files only ever carry the final name


class ExposureExporter(RangeExporter[ExposureRow]):
    """Exports a router store's exposures to the Parquet table at ``url`` (see the module docstring); a range
    left pending (kill -9) is written again as the exporter starts."""

    def __init__(self, store: RouterStore, url: str, *, batch_rows: int = BATCH_ROWS) -> None:
        super().__init__(store, url, _STATE, batch_rows)
        self._revisions = Revisions(store)
        done, pending = self.state()
        if pending > done:
            self._redo(done, pending)

    def retire(self, before: float) -> int:
        """Retention: delete from the store the exposures logged before unix time ``before`` that are in the
        table already (never one not exported); the number deleted. Sticky arms and observations stay."""
        done, _ = self.state()
        return self.store.log.transaction(
            lambda tx: tx.execute("DELETE FROM exposures WHERE seq <= ? AND at < ?", (done, before))
        )

    def _rows_after(self, done: int, upto: int, limit: int) -> list[tuple[int, ExposureRow]]:
        return [(n, r) for n, _, r in self.store.exposures_after(done, upto=upto, limit=limit)]

    def _write_files(self, name: str, rows: list[tuple[int, ExposureRow]]) -> None:
        parts: dict[tuple[str, str], list[tuple[int, ExposureRow]]] = defaultdict(list)
        for n, row in rows:
            day = datetime.fromtimestamp(row.at, UTC).strftime("%Y-%m-%d")
            parts[(row.key, day)].append((n, row))
        for (key, day), part in sorted(parts.items()):
            self._write_file(f"{self.root}/experiment={key}/day={day}", name, self._table(part))

    def _table(self, part: list[tuple[int, ExposureRow]]) -> pa.Table:
        revisions = [self._revisions.of(r.key, r.config_version) for _, r in part]
        micros = np.array([round(r.at * 1_000_000) for _, r in part], dtype=np.int64)
        return pa.Table.from_arrays(
            [
                pa.array([n for n, _ in part], pa.int64()),
                pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                pa.array([r.key for _, r in part], pa.string()),
                pa.array([r.config_version for _, r in part], pa.int64()),
                pa.array([r.unit for _, r in part], pa.string()),
                pa.array([r.arm for _, r in part], pa.int32()),
                pa.array([_arm_name(r.arm, names) for (_, r), (_, names) in zip(part, revisions, strict=True)]),
                pa.array([r.bucket for _, r in part], pa.float64()),
                pa.array([hv for hv, _ in revisions], pa.int32()),
                pa.array([r.propensity for _, r in part], pa.float64()),
                pa.array([list(r.numeric.items()) for _, r in part], pa.map_(pa.string(), pa.float64())),
                pa.array([list(r.categorical.items()) for _, r in part], pa.map_(pa.string(), pa.string())),
            ],
            schema=EXPOSURE_SCHEMA,
        )


def exposure_files(url: str) -> list[str]:
    """Every complete file of the exposure table at ``url`` (sorted; files being written are not listed)."""
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(
        p for p in fs.glob(f"{root}/experiment=*/day=*/*.parquet") if not p.rsplit("/", 1)[-1].startswith(".")
    )


def read_exposures(url: str) -> pa.Table:
    """The whole exposure table at ``url`` (tests and small tables; DuckDB reads large ones in place).
    ExportCorrupt naming the first file that does not read as an exposure file."""
    fs, _ = fsspec.core.url_to_fs(url)
    tables = []
    for path in exposure_files(url):
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, partitioning=None)
        except Exception as exc:
            raise ExportCorrupt(f"exposure file {path}: cannot be read: {type(exc).__name__}: {exc}") from exc
        if not table.schema.equals(EXPOSURE_SCHEMA, check_metadata=False):
            raise ExportCorrupt(f"exposure file {path}: not the exposure schema: {table.schema}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else EXPOSURE_SCHEMA.empty_table()


class ExportWorker:
    """Runs :meth:`ExposureExporter.export_once` every ``interval_s`` (the bound on the table's lag behind
    the store) on a thread; on a shared store only while this replica holds the export lease."""

    def __init__(
        self, exporter: ExposureExporter, interval_s: float, lease: Lease | None = None, retention_s: float = 0.0
    ) -> None:
        self.exporter = exporter
        self.interval_s = interval_s
        self.retention_s = retention_s
        self.lease = lease
        #: Held during a round: an on-demand round (ExportExposures) never runs beside a continuous one.
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abrouter-export", daemon=True)

    def start(self) -> None:
        """Start the rounds."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.lease is not None and not self.lease.claim().leader:
                    continue
                with self.lock:
                    while self.exporter.export_once() >= self.exporter.batch_rows and not self._stop.is_set():
                        pass  # behind: keep going without waiting
                    if self.retention_s:
                        self.exporter.retire(time.time() - self.retention_s)
            except StoreFailure as exc:
                log.warning("exposure export round failed; retried next round", extra={"error": str(exc)})
            except Exception:
                log.exception("exposure export round failed; retried next round")

    def close(self) -> None:
        """Stop after the round in progress."""
        self._stop.set()
        self._thread.join(timeout=30)
