"""Synthetic exposure tables for the warehouse audit's benchmark and tests, written by DuckDB itself.

The files have the exporter's schema and layout (``services.abrouter.export``: one folder per experiment and
UTC day, ``part-<first id>-<last id>.parquet``, exposure ids rising with time), so ``audit_table`` reads them
as it reads an exported table. Units are hashed into [0, 1) at GrowthBook hash v2's resolution (10,000 values)
and land in arm 0 below ``split`` and arm 1 above, as the router assigns them. Every ``repeat_every``-th
exposure is a repeat of a unit exposed 5 ids earlier (same unit, arm, bucket and covariates; only its first
exposure counts). Covariates, at the resolution they are measured in (``continuous`` adds one at full float64
precision, every value distinct): ``lesion_mm`` (0.1 mm), ``age`` (years), ``dose`` (0.1 units, log-normal);
``device`` (8 scanner models) and ``region`` (12). Deterministic: every random value is a hash of the unit
number and a stream number.
"""

from __future__ import annotations

import datetime as dt
import os

import duckdb

_DAY0 = dt.date(2026, 1, 5)


def _uniform(stream: int) -> str:
    """A uniform in (0, 1) from the hash of ``16 j + stream`` (53 bits; ``hash(j, stream)``, of two values, is
    correlated across streams)."""
    return f"(((hash(j * 16 + {stream}) >> 11)::DOUBLE + 0.5) / 9007199254740992.0)"


def _normal(stream: int) -> str:
    """A standard normal (Box-Muller over two uniforms)."""
    return f"(sqrt(-2 * ln({_uniform(stream)})) * cos(2 * pi() * {_uniform(stream + 1)}))"


def write_exposure_table(
    root: str,
    n: int,
    *,
    key: str = "bench",
    days: int = 120,
    repeat_every: int = 10,
    split: float = 0.5,
    continuous: bool = False,
    coverage: float = 1.0,
    sessions: int = 0,
    first_id: int = 1,
    unit_offset: int = 0,
    threads: int = 2,
) -> None:
    """Write ``n`` exposures of experiment ``key`` (ids ``first_id`` ..) over ``days`` UTC days under ``root``.

    With ``coverage`` below 1 only the units hashed into the covered ranges (GrowthBook's: ``[0, split *
    coverage)`` and ``[split, split + (1 - split) * coverage)``) are exposed. ``unit_offset`` shifts the unit
    numbers (two experiments written with overlapping numbers share units). ``sessions`` > 0 adds an id-like
    categorical ``session`` with that many values.
    """
    con = duckdb.connect(config={"threads": threads, "memory_limit": "1GB"})
    con.execute("SET enable_progress_bar = false")
    try:
        per_day = -(-n // days)
        numeric_names = ["lesion_mm", "age", "dose"] + (["score"] if continuous else [])
        numeric_values = [
            f"round(20 + 4 * {_normal(2)}, 1)",
            f"round(55 + 12 * {_normal(4)})",
            f"round(exp(1.5 + 0.6 * {_normal(6)}), 1)",
        ] + ([f"{_normal(10)}"] if continuous else [])
        names = ", ".join(f"'{name}'" for name in numeric_names)
        session_key = ", 'session'" if sessions else ""
        session_value = f", 's-' || (hash(j * 16 + 12) % {sessions})::VARCHAR" if sessions else ""
        for d in range(days):
            lo, hi = d * per_day, min(n, (d + 1) * per_day)
            if lo >= hi:
                break
            folder = f"{root}/experiment={key}/day={_DAY0 + dt.timedelta(days=d)}"
            os.makedirs(folder, exist_ok=True)
            unit = f"CASE WHEN i % {repeat_every} = {repeat_every - 1} THEN i - 5 ELSE i END + {unit_offset}"
            con.execute(
                f"""COPY (
                SELECT i + {first_id} AS exposure_id,
                  TIMESTAMPTZ '{_DAY0} 00:00:00+00' + INTERVAL {d} DAY
                    + to_microseconds(((i - {lo}) * 86399999999 // {hi - lo})::BIGINT) AS time,
                  '{key}' AS experiment, 1::BIGINT AS revision, 'user-' || lpad(j::VARCHAR, 10, '0') AS unit,
                  (b >= {split})::INT AS arm, CASE WHEN b >= {split} THEN 'treatment' ELSE 'control' END AS arm_name,
                  b AS bucket, 2 AS hash_version,
                  CASE WHEN b >= {split} THEN {1 - split} ELSE {split} END AS propensity,
                  map([{names}], [{", ".join(numeric_values)}]) AS numeric_covariates,
                  map(['device', 'region'{session_key}], ['CT-' || (hash(j * 16 + 8) % 8)::VARCHAR,
                      'region-' || (hash(j * 16 + 9) % 12)::VARCHAR{session_value}]) AS categorical_covariates
                FROM (SELECT i, j, floor({_uniform(1)} * 10000) / 10000 AS b
                      FROM (SELECT i, {unit} AS j FROM range({lo}, {hi}) t(i)))
                WHERE b < {split * coverage} OR (b >= {split} AND b < {split + (1 - split) * coverage})
                ORDER BY exposure_id)
                TO '{folder}/part-{lo + first_id}-{hi - 1 + first_id}.parquet' (FORMAT parquet)"""
            )
    finally:
        con.close()
