"""Audits out of core (issue #20 item 2, first part): the exposure table (Parquet, services/abrouter/export.py)
read with DuckDB instead of the router's in-memory snapshot.

DuckDB does the part that grows with the log: it scans the experiment's partition, keeps each unit's first
exposure (by exposure id, as the router's table does) and hands back only the audited columns as Arrow; the
checks then run through the same :func:`services.abrouter.audit.full_audit` as the in-memory path, so the two
give the same answers on the same data (tests compare them). Nothing of it is held by the router, and the
router's lock is never taken, so Assign keeps answering while it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardmesh.errors import InvalidArgument
from services.abrouter import audit as audit_mod
from services.abrouter.columns import MISSING_CODE, CategoricalColumn, ExposureColumns
from services.abrouter.experiments import Experiment
from services.abrouter.export import ExportCorrupt, exposure_files

#: DuckDB's memory limit for one audit (it spills to disk beyond it).
MEMORY_LIMIT = "1GB"


def _files(table_url: str, key: str | None = None) -> list[str]:
    files = exposure_files(table_url)
    return [f for f in files if key is None or f"/experiment={key}/" in f]


def _query(files: list[str], sql: str, params: Sequence[object] = ()) -> pa.Table:
    con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "threads": 2})
    try:
        return con.sql(sql, params=[files, *params]).to_arrow_table()
    except duckdb.Error as exc:  # a corrupt or cut-short file: reported, never skipped
        raise ExportCorrupt(f"exposure table at {files[0].rsplit('/experiment=', 1)[0]}: {exc}") from exc
    finally:
        con.close()


_FIRST = (
    "SELECT unit, arm, bucket, epoch_us(time) AS at_us, propensity, revision, numeric_covariates, "
    "categorical_covariates FROM read_parquet(?, hive_partitioning = false) WHERE experiment = ? "
    "QUALIFY row_number() OVER (PARTITION BY unit ORDER BY exposure_id) = 1 ORDER BY exposure_id"
)


def _codes_in_order(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """int32 codes by first appearance (as the router's table numbers them), -1 where missing."""
    present = np.array([v is not None for v in values], dtype=bool)
    codes = np.full(len(values), MISSING_CODE, dtype=np.int32)
    if not present.any():
        return codes, ()
    labels = values[present].astype(str)
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    codes[present] = rank[inverse]
    return codes, tuple(str(u) for u in uniq[order])


def _map_keys(column: pa.ChunkedArray) -> list[str]:
    keys: set[str] = set()
    for chunk in column.chunks:
        keys.update(str(k) for k in pc.unique(chunk.keys).to_pylist())
    return sorted(keys)


def exposure_columns(table_url: str, key: str) -> tuple[ExposureColumns, np.ndarray]:
    """Each unit's first exposure to ``key`` as audit columns, and the revision each was exposed under."""
    files = _files(table_url, key)
    if not files:
        empty = np.array([], dtype=np.float64)
        return ExposureColumns(np.array([], dtype=object), np.array([], np.int16), empty, empty, empty), np.array(
            [], np.int64
        )
    t = _query(files, _FIRST, [key])
    numeric = {}
    for name in _map_keys(t["numeric_covariates"]):
        values = pc.map_lookup(t["numeric_covariates"], pa.scalar(name), "first")
        numeric[name] = values.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
    categorical = {}
    for name in _map_keys(t["categorical_covariates"]):
        labels = np.array(pc.map_lookup(t["categorical_covariates"], pa.scalar(name), "first").to_pylist(), object)
        codes, vocabulary = _codes_in_order(labels)
        categorical[name] = CategoricalColumn(codes, vocabulary)
    columns = ExposureColumns(
        unit_ids=np.array(t["unit"].to_pylist(), dtype=object),
        arms=t["arm"].to_numpy().astype(np.int16),
        buckets=t["bucket"].to_numpy(),
        timestamps=t["at_us"].to_numpy().astype(np.float64) / 1e6,
        propensity=t["propensity"].to_numpy(),
        numeric=numeric,
        categorical=categorical,
    )
    return columns, t["revision"].to_numpy()


def _other_arms(table_url: str, key: str, units: np.ndarray, others: Sequence[str]) -> dict[str, np.ndarray]:
    """For carry-over: each other experiment's first arm of the audited units (-1 where not exposed)."""
    all_files = _files(table_url)
    keys = list(others) or sorted({f.split("/experiment=", 1)[1].split("/", 1)[0] for f in all_files} - {key})
    out = {}
    for other in keys:
        files = _files(table_url, other)
        if not files:
            continue
        t = _query(
            files,
            "SELECT unit, arm FROM read_parquet(?, hive_partitioning = false) WHERE experiment = ? "
            "QUALIFY row_number() OVER (PARTITION BY unit ORDER BY exposure_id) = 1",
            [other],
        )
        arm_of = dict(zip(t["unit"].to_pylist(), t["arm"].to_pylist(), strict=True))
        out[other] = np.fromiter((arm_of.get(u, -1) for u in units), dtype=np.int64, count=len(units))
    return out


def audit_table(
    table_url: str,
    experiment: Experiment,
    weights_since: int,
    *,
    others: Sequence[str] = (),
    min_sample: int = 1000,
    min_deviation: float = 0.01,
    window_covariates: Sequence[str] = (),
) -> audit_mod.AuditReport:
    """The full audit of ``experiment`` over the exposure table, as :meth:`Router.audit` does it in memory:
    SRM over the units exposed since ``weights_since`` (the revision from which today's weights apply)."""
    columns, versions = exposure_columns(table_url, experiment.key)
    for i, name in enumerate(window_covariates):
        if name not in columns.categorical:
            raise InvalidArgument(f"window_covariates[{i}]", f"'{name}' was never logged as a categorical covariate")
    weights = experiment.propensities()
    report = audit_mod.full_audit(
        columns,
        weights,
        other_arms=_other_arms(table_url, experiment.key, columns.unit_ids, others),
        min_sample=min_sample,
        min_deviation=min_deviation,
        ranges=experiment.ranges(),
        resolution=1000 if experiment.spec.hash_version == 1 else 10_000,
        by_categorical=tuple(window_covariates) or None,
    )
    return audit_mod.with_srm_since(
        report, columns.arms, versions, weights_since, weights, min_sample=min_sample, min_deviation=min_deviation
    )
