"""Durable router state in SQLite (WAL, group commit): experiments and every revision, sticky assignments,
the exposure log, metric observations, shadow comparisons and events.

Writes go through :class:`guardmesh.durable.GroupCommitLog`: the router submits a batch under its lock (so
batches land in decision order) and answers only after the batch's ticket says durable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardmesh.durable import GroupCommitLog, Statement, Ticket
from services.abrouter.experiments import Experiment

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (key TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    key TEXT NOT NULL, version INTEGER NOT NULL, at REAL NOT NULL, change TEXT NOT NULL, comment TEXT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (key, version)
);
CREATE TABLE IF NOT EXISTS sticky (
    key TEXT NOT NULL, unit TEXT NOT NULL, arm INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (key, unit)
);
CREATE TABLE IF NOT EXISTS exposures (
    seq INTEGER PRIMARY KEY, key TEXT NOT NULL, unit TEXT NOT NULL, arm INTEGER NOT NULL, bucket REAL NOT NULL,
    propensity REAL NOT NULL, at REAL NOT NULL, config_version INTEGER NOT NULL, covariates TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exposures_key ON exposures (key, seq);
CREATE TABLE IF NOT EXISTS observations (
    seq INTEGER PRIMARY KEY, key TEXT NOT NULL, unit TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    at REAL NOT NULL, pre INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_key ON observations (key, seq);
CREATE TABLE IF NOT EXISTS shadow (
    seq INTEGER PRIMARY KEY, key TEXT NOT NULL, request_id TEXT NOT NULL, live_version TEXT NOT NULL,
    shadow_version TEXT NOT NULL, live_score REAL NOT NULL, shadow_score REAL NOT NULL,
    live_decision INTEGER NOT NULL, shadow_decision INTEGER NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL, message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ExposureRow:
    """One logged exposure."""

    key: str
    unit: str
    arm: int
    bucket: float
    propensity: float
    at: float
    config_version: int
    numeric: Mapping[str, float]
    categorical: Mapping[str, str]


@dataclass(frozen=True)
class ObservationRow:
    """One metric observation."""

    key: str
    unit: str
    metric: str
    value: float
    at: float
    pre: bool


class RouterStore:
    """Statement builders over one group-commit log, and loaders used at start."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.log = GroupCommitLog(path, SCHEMA, synchronous)

    @staticmethod
    def experiment(exp: Experiment, change: str, comment: str) -> list[Statement]:
        """Write an experiment's current state and record it as a revision."""
        data = json.dumps(exp.to_dict())
        return [
            ("INSERT OR REPLACE INTO experiments (key, data) VALUES (?, ?)", (exp.key, data)),
            (
                "INSERT INTO revisions (key, version, at, change, comment, data) VALUES (?, ?, ?, ?, ?, ?)",
                (exp.key, exp.version, exp.updated_at, change, comment, data),
            ),
        ]

    @staticmethod
    def sticky(key: str, rows: list[tuple[str, int, float]]) -> Statement:
        """Record first arms (unit, arm, at) of a sticky experiment."""
        return (
            "INSERT OR IGNORE INTO sticky (key, unit, arm, at) VALUES (?, ?, ?, ?)",
            [(key, unit, arm, at) for unit, arm, at in rows],
        )

    @staticmethod
    def exposures(rows: list[ExposureRow]) -> Statement:
        """Append exposures."""
        return (
            "INSERT INTO exposures (key, unit, arm, bucket, propensity, at, config_version, covariates) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.key,
                    r.unit,
                    r.arm,
                    r.bucket,
                    r.propensity,
                    r.at,
                    r.config_version,
                    json.dumps({"n": dict(r.numeric), "c": dict(r.categorical)}) if r.numeric or r.categorical else "",
                )
                for r in rows
            ],
        )

    @staticmethod
    def observations(rows: list[ObservationRow]) -> Statement:
        """Append metric observations."""
        return (
            "INSERT INTO observations (key, unit, metric, value, at, pre) VALUES (?, ?, ?, ?, ?, ?)",
            [(r.key, r.unit, r.metric, r.value, r.at, int(r.pre)) for r in rows],
        )

    @staticmethod
    def shadow(
        key: str, request_id: str, live: tuple[str, float, bool], shadow: tuple[str, float, bool], at: float
    ) -> Statement:
        """Record one live/shadow comparison."""
        return (
            "INSERT INTO shadow (key, request_id, live_version, shadow_version, live_score, shadow_score, "
            "live_decision, shadow_decision, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, request_id, live[0], shadow[0], live[1], shadow[1], int(live[2]), int(shadow[2]), at),
        )

    @staticmethod
    def event(seq: int, kind: str, key: str, at: float, message: str) -> Statement:
        """Append an event."""
        sql = "INSERT INTO events (seq, kind, key, at, message) VALUES (?, ?, ?, ?, ?)"
        return (sql, (seq, kind, key, at, message))

    def submit(self, statements: list[Statement]) -> Ticket:
        """Queue statements for the next group commit."""
        return self.log.submit(statements)

    def load_experiments(self) -> list[Experiment]:
        """Every stored experiment."""
        return [Experiment.from_dict(json.loads(r[0])) for r in self.log.query("SELECT data FROM experiments")]

    def load_revisions(self, key: str) -> list[tuple[int, float, str, str, Experiment]]:
        """Every revision of ``key``, oldest first."""
        rows = self.log.query(
            "SELECT version, at, change, comment, data FROM revisions WHERE key = ? ORDER BY version", (key,)
        )
        return [(v, at, change, comment, Experiment.from_dict(json.loads(d))) for v, at, change, comment, d in rows]

    def load_sticky(self) -> Iterator[tuple[str, str, int]]:
        """(key, unit, arm) of every sticky record."""
        yield from self.log.query("SELECT key, unit, arm FROM sticky")

    def load_exposures(self) -> Iterator[ExposureRow]:
        """Every exposure, in log order."""
        cursor = self.log.query(
            "SELECT key, unit, arm, bucket, propensity, at, config_version, covariates FROM exposures ORDER BY seq"
        )
        for key, unit, arm, bucket, propensity, at, version, cov in cursor:
            parsed: dict[str, Any] = json.loads(cov) if cov else {}
            yield ExposureRow(key, unit, arm, bucket, propensity, at, version, parsed.get("n", {}), parsed.get("c", {}))

    def load_observations(self) -> Iterator[ObservationRow]:
        """Every metric observation, in log order."""
        cursor = self.log.query("SELECT key, unit, metric, value, at, pre FROM observations ORDER BY seq")
        for key, unit, metric, value, at, pre in cursor:
            yield ObservationRow(key, unit, metric, value, at, bool(pre))

    def load_shadow(self) -> Iterator[tuple[str, float, float, bool, bool]]:
        """(key, live score, shadow score, live decision, shadow decision) of every comparison."""
        cursor = self.log.query(
            "SELECT key, live_score, shadow_score, live_decision, shadow_decision FROM shadow ORDER BY seq"
        )
        for key, ls, ss, ld, sd in cursor:
            yield key, ls, ss, bool(ld), bool(sd)

    def load_events(self, limit: int) -> list[tuple[int, str, str, float, str]]:
        """The newest ``limit`` events, oldest first."""
        rows = self.log.query("SELECT seq, kind, key, at, message FROM events ORDER BY seq DESC LIMIT ?", (limit,))
        return list(reversed(rows))

    def max_event_seq(self) -> int:
        """Highest stored event sequence number (0 if none)."""
        return int(self.log.query("SELECT COALESCE(MAX(seq), 0) FROM events")[0][0])

    def close(self) -> None:
        """Flush and close."""
        self.log.close()
