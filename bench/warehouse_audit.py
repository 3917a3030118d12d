"""g) The full audit over the Parquet exposure table at warehouse scale (issue #20): 10 M and 100 M generated
exposures (``bench.exposure_table``, written by DuckDB: 120 days, every 10th exposure a repeat, 3 numeric
covariates at measurement resolution and 2 categorical ones), target 100 M in <= 60 s with peak RSS <= 2 GB.

* ours: ``services.abrouter.warehouse.audit_table`` (aggregates inside DuckDB, statistics from the counts);
* peer 1, the same checks as straightforward DuckDB SQL: first exposures materialised with ``QUALIFY
  row_number()``, then one query per check (SRM, uniformity, id blocks / prefix / last character over all
  units, arm x window counts, category x arm per window, KS per window from the counts per value and arm
  cumulated in value order, means and SDs per window), scipy on the small results. (KS as a window function
  over the rows themselves took 824 s at 300,000 exposures: not a peer anyone would run at 10 M);
* peer 2, pandas + scipy (10 M only): the table read with pyarrow, maps flattened, ``drop_duplicates`` after
  sorting by exposure id, ``pd.crosstab`` + ``chi2_contingency``, ``ks_2samp`` per window.

Each runs in its own spawned process so that its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from bench.exposure_table import write_exposure_table
from bench.records import record

KEY = "bench"
NUMERIC = ("lesion_mm", "age", "dose")
CATEGORICAL = ("device", "region")
SEASON = (
    "CASE WHEN month(time) IN (12, 1, 2) THEN 'winter' WHEN month(time) IN (3, 4, 5) THEN 'spring' "
    "WHEN month(time) IN (6, 7, 8) THEN 'summer' ELSE 'autumn' END"
)


def ours(root: str) -> dict[str, Any]:
    """The audit as served."""
    from services.abrouter.experiments import ArmSpec, Experiment, ExperimentSpec, ExperimentState
    from services.abrouter.warehouse import audit_table

    spec = ExperimentSpec(key=KEY, arms=(ArmSpec("control", 0.5), ArmSpec("treatment", 0.5)))
    exp = Experiment(spec, 1, ExperimentState.RUNNING, spec.weights, 0.0, 0.0)
    report = audit_table(root, exp, 1, min_sample=1000)
    return {"units": report.exposures, "tests": 2 + len(report.clustering) + len(report.balance), "alert": report.alert}


def _chi2(table: np.ndarray) -> float:
    t = np.asarray(table, dtype=np.float64)
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0]
    if t.shape[0] < 2 or t.shape[1] < 2:
        return 1.0
    return float(stats.chi2_contingency(t, correction=False).pvalue)


def sql_peer(root: str) -> dict[str, Any]:
    """The same checks as straightforward DuckDB SQL (see the module docstring)."""
    import duckdb

    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-sql-") as spill:
        con = duckdb.connect(config={"memory_limit": "1GB", "threads": 2, "temp_directory": spill})
        con.execute("SET enable_progress_bar = false")
        numeric = ", ".join(f"numeric_covariates['{n}'] AS {n}" for n in NUMERIC)
        categorical = ", ".join(f"categorical_covariates['{c}'] AS {c}" for c in CATEGORICAL)
        con.execute(
            f"CREATE TEMP TABLE f AS SELECT unit, arm, bucket, strftime(time, '%Y-%m-%d') AS day, "
            f"strftime(time, '%G-W%V') AS week, {SEASON} || '-' || year(time) AS season, {numeric}, {categorical} "
            f"FROM read_parquet('{root}/experiment={KEY}/*/*.parquet') WHERE experiment = '{KEY}' "
            "QUALIFY row_number() OVER (PARTITION BY unit ORDER BY exposure_id) = 1"
        )
        p = []
        counts = con.sql("SELECT count(*) FILTER (WHERE arm = 0), count(*) FILTER (WHERE arm = 1) FROM f").fetchall()
        p.append(stats.chisquare(counts[0]).pvalue)
        bins = con.sql("SELECT least(floor(bucket * 100), 99) AS b, count(*) FROM f GROUP BY b ORDER BY b").fetchall()
        p.append(stats.chisquare([c for _, c in bins]).pvalue)

        def crosstab(sql: str) -> np.ndarray:
            rows = con.sql(sql).fetchall()
            keys = sorted({r[0] for r in rows})
            index = {k: i for i, k in enumerate(keys)}
            table = np.zeros((2, len(keys)))
            for k, arm, n in rows:
                table[arm, index[k]] += n
            return table

        for what in (
            "ntile(20) OVER (ORDER BY unit)",
            "split_part(unit, '-', 1)",
            "right(unit, 1)",
        ):
            p.append(_chi2(crosstab(f"SELECT k, arm, count(*) FROM (SELECT {what} AS k, arm FROM f) GROUP BY ALL")))
        windows = ("day", "week", "season", *CATEGORICAL)
        for w in windows:
            p.append(_chi2(crosstab(f"SELECT {w}, arm, count(*) FROM f GROUP BY ALL")))
        for w in ("'all'", *windows):
            for c in CATEGORICAL:
                if c == w:
                    continue
                rows = con.sql(f"SELECT {w} AS w, {c}, arm, count(*) FROM f GROUP BY ALL").fetchall()
                by_window: dict[Any, dict[tuple[Any, int], int]] = {}
                for win, value, arm, n in rows:
                    by_window.setdefault(win, {})[(value, arm)] = n
                for cells in by_window.values():
                    values = sorted({v for v, _ in cells})
                    table = np.array([[cells.get((v, a), 0) for v in values] for a in (0, 1)])
                    p.append(_chi2(table))
            for n in NUMERIC:
                ks = con.sql(
                    f"SELECT w, max(abs(ca / na - cb / nb)) AS d, any_value(na), any_value(nb) FROM ("
                    "SELECT w, sum(c0) OVER win AS ca, sum(c1) OVER win AS cb, sum(c0) OVER (PARTITION BY w) AS na, "
                    "sum(c1) OVER (PARTITION BY w) AS nb FROM ("
                    f"SELECT {w} AS w, {n} AS v, count(*) FILTER (WHERE arm = 0) AS c0, "
                    f"count(*) FILTER (WHERE arm = 1) AS c1 FROM f WHERE isfinite({n}) GROUP BY ALL) "
                    "WINDOW win AS (PARTITION BY w ORDER BY v ROWS UNBOUNDED PRECEDING)) GROUP BY w"
                ).fetchall()
                con.sql(f"SELECT {w}, arm, avg({n}), stddev_samp({n}), count({n}) FROM f GROUP BY ALL").fetchall()
                for _, d, na, nb in ks:
                    if na and nb:
                        p.append(float(stats.kstwobign.sf(np.sqrt(na * nb / (na + nb)) * d)))
        units = con.sql("SELECT count(*) FROM f").fetchall()[0][0]
        con.close()
    return {"units": int(units), "tests": len(p), "alert": None}


def pandas_peer(root: str) -> dict[str, Any]:
    """pandas + scipy over the table read into memory (see the module docstring)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(f"{root}/experiment={KEY}", format="parquet").to_table(
        columns=["exposure_id", "unit", "arm", "bucket", "time", "numeric_covariates", "categorical_covariates"]
    )
    columns = {c: table[c] for c in ("exposure_id", "unit", "arm", "bucket", "time")}
    for n in NUMERIC:
        columns[n] = pc.map_lookup(table["numeric_covariates"], pa.scalar(n), "first")
    for c in CATEGORICAL:
        columns[c] = pc.map_lookup(table["categorical_covariates"], pa.scalar(c), "first")
    del table
    df = pa.table(columns).to_pandas()
    df = df.sort_values("exposure_id").drop_duplicates("unit", keep="first")
    p = [stats.chisquare(df["arm"].value_counts().sort_index().to_numpy()).pvalue]
    p.append(stats.chisquare(np.histogram(df["bucket"], bins=100, range=(0, 1))[0]).pvalue)
    order = df["unit"].str.rsplit("-", n=1).str[1].astype(np.int64).rank(method="first")
    p.append(_chi2(pd.crosstab(df["arm"], pd.qcut(order, 20, labels=False)).to_numpy()))
    p.append(_chi2(pd.crosstab(df["arm"], df["unit"].str.split("-").str[0]).to_numpy()))
    p.append(_chi2(pd.crosstab(df["arm"], df["unit"].str[-1]).to_numpy()))
    df["all"] = "all"
    df["day"] = df["time"].dt.strftime("%Y-%m-%d")
    iso = df["time"].dt.isocalendar()
    df["week"] = iso["year"].astype(str) + "-W" + iso["week"].astype(str).str.zfill(2)
    month = df["time"].dt.month
    df["season"] = np.select(
        [month.isin([12, 1, 2]), month.isin([3, 4, 5]), month.isin([6, 7, 8])], ["winter", "spring", "summer"], "autumn"
    )
    windows = ("day", "week", "season", *CATEGORICAL)
    for w in windows:
        p.append(_chi2(pd.crosstab(df["arm"], df[w]).to_numpy()))
    for w in ("all", *windows):
        for _, part in df.groupby(w):
            control, treatment = part[part["arm"] == 0], part[part["arm"] == 1]
            for n in NUMERIC:
                a, b = control[n].dropna().to_numpy(), treatment[n].dropna().to_numpy()
                if a.size and b.size:
                    p.append(stats.ks_2samp(a, b).pvalue)
                    _ = (a.mean(), a.std(ddof=1), b.mean(), b.std(ddof=1))
            for c in CATEGORICAL:
                if c != w:
                    p.append(_chi2(pd.crosstab(part["arm"], part[c]).to_numpy()))
    return {"units": len(df), "tests": len(p), "alert": None}


def _child(fn: Callable[[str], dict[str, Any]], root: str, out: Any) -> None:
    started = time.perf_counter()
    result = fn(root)
    result["seconds"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["rss_mb"] = usage.ru_maxrss / 1024
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # on a loaded machine the steadier figure
    out.send(result)


def _measure(fn: Callable[[str], dict[str, Any]], root: str) -> dict[str, Any]:
    """``fn(root)`` in a spawned process: its result, seconds and peak RSS."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, root, there))
    proc.start()
    result: dict[str, Any] = here.recv()
    proc.join()
    return result


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) when it ended"


def warehouse_bench(
    sizes: list[int], pandas_max: int = 10_000_000, sql_max: int = 100_000_000, tables: str | None = None
) -> list[dict[str, Any]]:
    """Records of g) for each size in ``sizes`` (exposures). ``tables``: a folder keeping the generated tables
    (``<tables>/<n>``, generated when missing) for later runs (100 M takes minutes to write), else temporary."""
    records = []
    for n in sizes:
        with contextlib.ExitStack() as stack:
            if tables is None:
                root = stack.enter_context(tempfile.TemporaryDirectory(prefix="guardmesh-bench-warehouse-"))
            else:
                root = os.path.join(tables, str(n))
            started = time.perf_counter()
            if not os.path.exists(os.path.join(root, f"experiment={KEY}")):
                write_exposure_table(root, n, key=KEY)
            generated = time.perf_counter() - started
            mine = _measure(ours, root)
            note = _load_note()
            label = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)
            print(
                f"{n:,} exposures ({mine['units']:,} units; generated in {generated:.0f} s): table audit "
                f"{mine['seconds']:.1f} s ({mine['cpu_s']:.0f} CPU s), peak RSS {mine['rss_mb']:.0f} MB, "
                f"{mine['tests']} tests; {note}",
                flush=True,
            )
            records.append(
                record(f"warehouse_audit_{label}_peak_rss", "MB", mine["rss_mb"], "target", 2048.0, 1.0, False)
            )
            if n >= 100_000_000:
                timed = record(f"warehouse_audit_{label}", "s", mine["seconds"], f"target ({note})", 60.0, 1.0, False)
                timed["cpu_s"] = mine["cpu_s"]
                records.append(timed)
            if n <= sql_max:
                sql = _measure(sql_peer, root)
                print(
                    f"  straightforward DuckDB SQL: {sql['seconds']:.1f} s, peak RSS {sql['rss_mb']:.0f} MB, "
                    f"{sql['tests']} tests",
                    flush=True,
                )
                versus = record(
                    f"warehouse_audit_{label}_vs_plain_sql",
                    "s",
                    mine["seconds"],
                    f"the same checks as straightforward DuckDB SQL ({note})",
                    sql["seconds"],
                    None,
                    False,
                )
                versus["cpu_s"] = {"ours": mine["cpu_s"], "peer": sql["cpu_s"]}
                records.append(versus)
            if n <= pandas_max:
                pdp = _measure(pandas_peer, root)
                print(
                    f"  pandas + scipy: {pdp['seconds']:.1f} s, peak RSS {pdp['rss_mb']:.0f} MB, {pdp['tests']} tests",
                    flush=True,
                )
                records += [
                    record(
                        f"warehouse_audit_{label}_vs_pandas",
                        "s",
                        mine["seconds"],
                        f"pandas + scipy, same checks ({note})",
                        pdp["seconds"],
                        None,
                        False,
                    ),
                    record(
                        f"warehouse_audit_{label}_peak_rss_vs_pandas",
                        "MB",
                        mine["rss_mb"],
                        "pandas + scipy",
                        pdp["rss_mb"],
                        None,
                        False,
                    ),
                ]
    return records
