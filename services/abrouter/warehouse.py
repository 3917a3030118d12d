"""Audits out of core (issue #20 item 2): the exposure table (Parquet, services/abrouter/export.py) audited
with DuckDB instead of the router's in-memory snapshot.

Everything that grows with the number of units runs inside DuckDB (memory limit :data:`MEMORY_LIMIT`, spilling
to a temporary folder beyond it) and comes back as small tables of counts; the statistics are then computed
from those counts by the same functions the in-memory audit (:func:`services.abrouter.audit.full_audit`) uses,
so the two give the same answers on the same data (tests compare them). Per audit:

1. **first exposures**: each unit's first exposure (lowest exposure id), as the router's table keeps it: a
   ``GROUP BY`` on a 64-bit hash of the unit ``HAVING count(*) > 1`` finds the repeated units and their first
   id, a join on the hash drops the rest (16 bytes per repeated unit; units sharing the hash are told apart by
   a second one, read for the repeated hashes' rows only, and then the audit keys by the unit string);
2. **covariates**: the map keys of the leading rows (the scan of step 3 counts any other name a first exposure
   logged, and the audit starts again knowing all), and each categorical's values in order of first appearance;
3. **one scan with GROUPING SETS** counts units per arm (SRM, also since the weight change), per hash bin
   (uniformity), per arm x window (arm shares; days, categorical values), per arm x window x category
   (chi-square balance) and per arm x window x numeric value (KS balance), kept in a DuckDB temporary table;
   the sets without a numeric or the bin are summed from one joint set (arm, revision, day, categoricals) when
   that stays small (:data:`JOINT_GROUPS`): each set counted from the rows costs a hash-table insert per row;
   the numeric sets by categorical are then summed from one set per numeric keyed by a hash of the row's
   categorical values (its cell, :data:`CELL_HASH`), mapped back through the joint set's cells. Covariate
   values are found by their key's position in the map's key list (half the CPU of the map subscript);
4. **KS from per-value counts**, exact: per window the per-value counts of each arm, cumulated in value order
   (a DuckDB window function), give ``S = n_b C_a - n_a C_b`` at every distinct value, and ``D = max |S| /
   (n_a n_b)`` is the in-memory statistic bit for bit (integers, see ``guardmesh.stats.ks_statistic_grouped``);
   week, season and overall windows coarsen the day windows through a small day -> window table. Count, sum
   and sum of squares (centred at the covariate's mean) per window and arm give the standardised mean
   difference;
5. **id tests** on the same deterministic sample the in-memory audit draws (``audit.ID_SAMPLE_MAX`` rows of the
   first-exposure order, drawn by the same seeded generator in chunks), found without ranking every first
   exposure: step 3 counts first exposures per block of ids (:data:`SAMPLE_BLOCK_BITS`), which places each
   sampled rank in a block, and only the blocks holding one are read and ranked;
6. **carry-over**: per other experiment, its first arm per unit joined with ours, counted per arm pair.

What comes back to Python is bounded by arms x windows x distinct values: a numeric covariate with as many
distinct values as units (a continuous measurement at full float precision) makes step 3's table that large,
but it stays in DuckDB (spilled to disk), and only one row per window returns. Nothing is held by the router
and its lock is never taken, so Assign keeps answering while an audit runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardmesh.errors import InvalidArgument, ResourceExhausted
from guardmesh.stats import ks_p_value, mean_var, standardized_mean_difference
from services.abrouter import audit as audit_mod
from services.abrouter.columns import MISSING_CODE, CategoricalColumn, ExposureColumns
from services.abrouter.experiments import Experiment
from services.abrouter.export import ExportCorrupt, exposure_files

#: DuckDB's memory limit for one audit (it spills to a temporary folder beyond it).
MEMORY_LIMIT = "1GB"
#: DuckDB worker threads per audit.
THREADS = 2
#: Rows the deterministic id sample is drawn in at a time (bounds its memory at 100 M units).
SAMPLE_CHUNK = 1 << 22
#: The id sample's first exposures are found by block of 2^SAMPLE_BLOCK_BITS exposure ids: the scan counts the
#: first exposures per block, which places each sampled rank in a block, and only the blocks holding one are
#: read again and ranked (at 100 M exposures about 6 % of the rows instead of a sort of all 90 M first ones).
SAMPLE_BLOCK_BITS = 5
#: The 64-bit hash of a row's categorical values (its cell) that keys the numeric sets by categorical (DuckDB
#: SQL, ``{}`` the value columns); cells sharing it are found and then counted without it.
CELL_HASH = "hash({})"
#: Leading rows whose covariate names start the audit (names only on later rows cost one more scan).
KEY_SAMPLE = 100_000
#: The 64-bit hash the per-unit aggregate keys units by, and the second one that tells units sharing it apart
#: (DuckDB SQL over ``unit``).
UNIT_HASH = "hash(unit)"
UNIT_CHECK_HASH = "hash(reverse(unit))"
#: Largest product of arms x 2 x days x categorical values (each categorical's values in the leading rows) for
#: which one grouping set counts units by all of them and the narrower per-window counts are summed from it.
JOINT_GROUPS = 2_000_000

_MIN_N = 20  # the in-memory audit's per-window minimum (full_audit passes 20)

#: How much lower than the serving threads' the CPU priority of table reads is (nice increment of the threads
#: that run them, inherited by the workers DuckDB starts from those threads): on a loaded machine the audit,
#: not Assign, waits for a core (issue #20: Assign p99 while an audit runs). DuckDB holds no GIL while it runs
#: a query, so CPU share is what the two compete for.
BACKGROUND_NICE = 10
#: Table reads (audits, analyses) running at once in one process; more wait their turn (each may use
#: MEMORY_LIMIT of DuckDB memory).
BACKGROUND_READS = 2

_P = ParamSpec("_P")
_R = TypeVar("_R")
_background = threading.local()


def _lower_priority() -> None:
    _background.inside = True
    if sys.platform.startswith("linux"):  # there a thread's nice value is its own (POSIX: the process's)
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)


_READS = ThreadPoolExecutor(BACKGROUND_READS, thread_name_prefix="warehouse-read", initializer=_lower_priority)


def at_background_priority(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run on one of the table-read threads (nice + BACKGROUND_NICE), the caller waiting for its result
    or its exception; called directly when already on one."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if getattr(_background, "inside", False):
            return fn(*args, **kwargs)
        return _READS.submit(fn, *args, **kwargs).result()

    return run


def _files(table_url: str, key: str | None = None) -> list[str]:
    files = exposure_files(table_url)
    return [f for f in files if key is None or f"/experiment={key}/" in f]


def _literal(value: str) -> str:
    """A SQL string literal (DuckDB views take no parameters)."""
    return "'" + value.replace("'", "''") + "'"


@contextlib.contextmanager
def _connection() -> Iterator[duckdb.DuckDBPyConnection]:
    with tempfile.TemporaryDirectory(prefix="guardmesh-warehouse-") as spill:
        con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "threads": THREADS, "temp_directory": spill})
        con.execute("SET enable_progress_bar = false")  # a server's log is no terminal
        try:
            yield con
        finally:
            con.close()


def _query(files: list[str], sql: str, params: Sequence[object] = ()) -> pa.Table:
    with _connection() as con:
        return table_sql(con, sql, [files, *params], table="exposure table", at=table_root(files[0]))


def table_root(path: str) -> str:
    """The root of the table holding the partition file ``path`` (the folder above ``experiment=<key>``)."""
    return path.rsplit("/experiment=", 1)[0]


def table_sql(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[object] = (), *, table: str, at: str
) -> pa.Table:
    """``sql`` on ``con`` as an Arrow table (empty for a statement without result), with the table reads' error
    mapping, one for the audit and the analysis: past DuckDB's memory limit ResourceExhausted naming
    warehouse.MEMORY_LIMIT (the table is not at fault); any other DuckDB error ExportCorrupt naming ``table``
    ("exposure table") and its root ``at``: a corrupt or cut-short file is reported, never skipped."""
    try:
        result = con.sql(sql, params=list(params) or None)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.OutOfMemoryException as exc:
        raise ResourceExhausted(
            f"reading the {table} needs more than warehouse.MEMORY_LIMIT ({MEMORY_LIMIT}) "
            f"of DuckDB memory: {str(exc).splitlines()[0]}"
        ) from exc
    except duckdb.Error as exc:
        raise ExportCorrupt(f"{table} at {at}: {exc}") from exc


# ---------------------------------------------------------------------------------------- per-unit columns


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
    """Each unit's first exposure to ``key`` as in-memory audit columns, and the revision each was exposed
    under: per-unit data, for small tables and for comparing with the in-memory path (:func:`audit_table`
    does not use it)."""
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


# ---------------------------------------------------------------------------------------- the audit in DuckDB


def id_sample_rows(n: int) -> np.ndarray | None:
    """The rows ``audit._id_sample(n)`` picks (the same seeded draws), drawn ``SAMPLE_CHUNK`` at a time so that
    100 M units need no 800 MB array of uniforms; None when every row is used."""
    if n <= audit_mod.ID_SAMPLE_MAX:
        return None
    rng = np.random.default_rng(audit_mod.ID_SAMPLE_SEED)
    rate = 0.995 * audit_mod.ID_SAMPLE_MAX / n
    picked = []
    for lo in range(0, n, SAMPLE_CHUNK):
        picked.append(lo + np.flatnonzero(rng.random(min(SAMPLE_CHUNK, n - lo)) < rate))
    return np.concatenate(picked)[: audit_mod.ID_SAMPLE_MAX]


@dataclass(frozen=True)
class _Grouping:
    """Windows over a base column (``day`` or a categorical): base value -> window index, names in order."""

    kind: str
    base: str  # column of the scan the windows coarsen
    names: tuple[str, ...]
    mapping: pa.Table  # columns b (base value), w (window index)


class _NamesMissed(Exception):
    """The leading rows' covariate names are not all the first exposures' names."""


class _Audit:
    """One experiment's first exposures as DuckDB views over the Parquet files, and the aggregates over them."""

    def __init__(self, con: duckdb.DuckDBPyConnection, files: list[str], key: str) -> None:
        self.con, self.where = con, files[0]
        #: UTC days the files cover (partition folders day=<date>), bounding the day windows
        self.days = len({f.split("/day=", 1)[1].split("/", 1)[0] if "/day=" in f else f for f in files})
        listed = ", ".join(_literal(f) for f in files)
        self.sql(
            "CREATE TEMP VIEW raw AS SELECT exposure_id, unit, arm, bucket, revision, "
            "floor(epoch_us(time) / 1e6 / 86400.0)::BIGINT AS day, numeric_covariates AS nc, "
            f"categorical_covariates AS cc FROM read_parquet([{listed}], hive_partitioning = false) "
            f"WHERE experiment = {_literal(key)}"
        )
        # the repeated units and their first id (the later exposures are dropped): the one per-unit aggregate,
        # keyed by a 64-bit hash of the unit, so that it and the join that drops the later exposures hold 16
        # bytes per repeated unit, not the string (at 100 M exposures the aggregate scan through the
        # string-keyed join took 177 CPU seconds, through this one 94, loaded machine). Two units sharing the
        # hash are told apart by a second hash of the reversed string, compared within each group by a second
        # read of the rows of repeated hashes only (in the aggregate, the second hash's min and max over all
        # 100 M rows cost 28 of its 47 CPU seconds, this read 10); where it differs within a group the audit
        # keys by the unit itself instead. Distinct units equal in both hashes go unseen: about n^2 / 2^129,
        # 1e-23 at 100 M units.
        self.sql(
            f"CREATE TEMP TABLE repeats AS SELECT {UNIT_HASH} AS h, min(exposure_id) AS first_id FROM raw "
            "GROUP BY h HAVING count(*) > 1"
        )
        shared = self.sql(
            f"SELECT count(*) AS n FROM (SELECT repeats.h FROM raw JOIN repeats ON repeats.h = {UNIT_HASH} "
            f"GROUP BY repeats.h HAVING min({UNIT_CHECK_HASH}) <> max({UNIT_CHECK_HASH}))"
        )
        if shared["n"][0].as_py():
            self.sql("DROP TABLE repeats")
            self.sql(
                "CREATE TEMP TABLE repeats AS SELECT unit AS h, min(exposure_id) AS first_id FROM raw "
                "GROUP BY unit HAVING count(*) > 1"
            )
            self.sql("CREATE TEMP MACRO unit_key(unit) AS unit")
        else:
            self.sql(f"CREATE TEMP MACRO unit_key(unit) AS {UNIT_HASH}")
        self.sql(f"CREATE TEMP VIEW first AS {self.first_of('raw')}")
        #: Numeric and categorical covariate names, sorted (as the in-memory columns order them): first those of
        #: the leading KEY_SAMPLE rows (reading every map's keys costs as much as the rest of the audit); the
        #: aggregate scan counts the keys of the first exposures it does not know, and :meth:`discover` finds
        #: them all when any is left.
        self.sql(f"CREATE TEMP TABLE head AS SELECT nc, cc FROM raw LIMIT {KEY_SAMPLE}")
        self.numeric, self.categorical = self._keys("head")
        self.complete = False
        #: Values of each categorical among the leading rows (at most its vocabulary's size).
        self.leading_values: dict[str, int] = {}
        if self.categorical:
            counts = self.sql(
                "SELECT " + ", ".join(f"count(DISTINCT cc[{_literal(k)}])" for k in self.categorical) + " FROM head"
            )
            self.leading_values = {k: int(counts.column(i)[0].as_py()) for i, k in enumerate(self.categorical)}
        self.sql("DROP TABLE head")

    @staticmethod
    def first_of(rows: str) -> str:
        """SQL: the first exposures among ``rows`` (raw's columns; a table or a parenthesised query)."""
        return (
            f"SELECT r.* FROM {rows} r LEFT JOIN repeats p ON p.h = unit_key(r.unit) "
            "WHERE p.first_id IS NULL OR p.first_id = r.exposure_id"
        )

    def _keys(self, rows: str) -> tuple[list[str], list[str]]:
        keys = self.sql(
            "SELECT list_sort(list_distinct(flatten(list(map_keys(nc))))) AS nk, "
            f"list_sort(list_distinct(flatten(list(map_keys(cc))))) AS ck FROM {rows}"
        )
        return list(keys["nk"][0].as_py() or ()), list(keys["ck"][0].as_py() or ())

    def discover(self) -> None:
        """Every covariate name logged with a first exposure (a scan of all their maps)."""
        self.numeric, self.categorical = self._keys("first")
        self.complete = True

    @staticmethod
    def names_logged() -> str:
        """SQL over :data:`_SPLIT_MAPS` rows: per exposure, how many covariate names its maps hold."""
        return "(coalesce(len(nk), 0) + coalesce(len(ck), 0))"

    @staticmethod
    def unknown_keys(extracted: Sequence[str]) -> str:
        """SQL over a row with ``names`` (:meth:`names_logged`) and the known names' values already extracted
        (columns ``extracted``): at least how many of its names are not known ones (0 only when none is). Each
        known name present with a value counts once; a map value that is NULL (the exporter writes none) would
        count as unknown too, which costs a scan of the maps (:meth:`discover`), never an answer. (Counting the
        known names with map_contains searched every map once more per name: ~12 % of the audit's CPU.)"""
        present = " + ".join(f"({c} IS NOT NULL)::INT" for c in extracted) or "0"
        return f"(names - ({present}))"

    def sql(self, sql: str, params: Sequence[object] = ()) -> pa.Table:
        return table_sql(self.con, sql, params, table="exposure table", at=table_root(self.where))


#: The first exposures with each covariate map split into its keys and values: a value found by its key's
#: position (``nv[list_position(nk, 'age')]``, NULL where absent, as ``nc['age']``) costs about half the CPU
#: of the map subscript (at 10 M exposures 1.1 vs 1.9 CPU s for the five covariates; identical values).
_SPLIT_MAPS = (
    "(SELECT *, map_keys(nc) AS nk, map_values(nc) AS nv, map_keys(cc) AS ck, map_values(cc) AS cv FROM first)"
)


def _gid(columns: Sequence[str], grouped: Sequence[str]) -> int:
    """DuckDB's grouping_id of a grouping set: bit set (first column highest) for each column not grouped."""
    return sum(1 << (len(columns) - 1 - i) for i, c in enumerate(columns) if c not in grouped)


def _day_groupings(days: list[int], windows: Sequence[str]) -> list[_Grouping]:
    """The overall window and the day / week / season windows over the distinct UTC days (chronological)."""
    dates = [audit_mod._EPOCH + dt.timedelta(days=d) for d in days]
    out = [_Grouping("all", "day", ("all",), pa.table({"b": pa.array(days, pa.int64()), "w": [0] * len(days)}))]
    for kind in dict.fromkeys(windows):
        labels = [audit_mod._window_label(kind, d) for d in dates]
        names = tuple(dict.fromkeys(labels))
        position = {name: i for i, name in enumerate(names)}
        mapping = pa.table({"b": pa.array(days, pa.int64()), "w": [position[label] for label in labels]})
        out.append(_Grouping(kind, "day", names, mapping))
    return out


def _coarsen(values: np.ndarray, windows: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
    np.add.at(out, windows, values)
    return out


@at_background_priority
def audit_table(
    table_url: str,
    experiment: Experiment,
    weights_since: int,
    *,
    others: Sequence[str] = (),
    min_sample: int = 1000,
    min_deviation: float = 0.01,
    window_covariates: Sequence[str] = (),
    alpha_srm: float = 0.001,
    alpha_balance: float = 0.01,
) -> audit_mod.AuditReport:
    """The full audit of ``experiment`` over the exposure table, as :meth:`Router.audit` does it in memory
    (``audit.full_audit`` then ``audit.with_srm_since``), aggregated inside DuckDB (see the module docstring):
    SRM over the units exposed since ``weights_since`` (the revision from which today's weights apply)."""
    started = time.perf_counter()
    files = _files(table_url, experiment.key)
    weights = experiment.propensities()
    if not files:
        columns, versions = exposure_columns(table_url, experiment.key)
        return _in_memory(columns, versions, experiment, weights_since, window_covariates, min_sample, min_deviation)
    with _connection() as con:
        audit = _Audit(con, files, experiment.key)
        if not set(window_covariates) <= set(audit.categorical):
            audit.discover()
        for i, name in enumerate(window_covariates):
            if name not in audit.categorical:
                raise InvalidArgument(
                    f"window_covariates[{i}]", f"'{name}' was never logged as a categorical covariate"
                )
        run = functools.partial(
            _run_audit,
            audit,
            experiment,
            weights,
            weights_since,
            table_url,
            others,
            window_covariates,
            min_sample,
            min_deviation,
            alpha_srm,
            alpha_balance,
            started,
        )
        try:
            return run()
        except _NamesMissed:
            audit.discover()
            return run()


def _in_memory(
    columns: ExposureColumns,
    versions: np.ndarray,
    experiment: Experiment,
    since: int,
    window_covariates: Sequence[str],
    min_sample: int,
    min_deviation: float,
) -> audit_mod.AuditReport:
    for i, name in enumerate(window_covariates):
        if name not in columns.categorical:
            raise InvalidArgument(f"window_covariates[{i}]", f"'{name}' was never logged as a categorical covariate")
    weights = experiment.propensities()
    report = audit_mod.full_audit(
        columns,
        weights,
        min_sample=min_sample,
        min_deviation=min_deviation,
        ranges=experiment.ranges(),
        resolution=1000 if experiment.spec.hash_version == 1 else 10_000,
        by_categorical=tuple(window_covariates) or None,
    )
    return audit_mod.with_srm_since(
        report, columns.arms, versions, since, weights, min_sample=min_sample, min_deviation=min_deviation
    )


def _run_audit(
    audit: _Audit,
    experiment: Experiment,
    weights: Sequence[float],
    since: int,
    table_url: str,
    others: Sequence[str],
    window_covariates: Sequence[str],
    min_sample: int,
    min_deviation: float,
    alpha_srm: float,
    alpha_balance: float,
    started: float,
) -> audit_mod.AuditReport:
    n_arms = len(weights)
    numeric_names = audit.numeric
    cat_col = {name: f"c{i}" for i, name in enumerate(audit.categorical)}
    num_col = {name: f"n{i}" for i, name in enumerate(numeric_names)}
    ranges = experiment.ranges()
    covered = sum(e - s for s, e in ranges) < 1.0 - 1e-12
    resolution = 1000 if experiment.spec.hash_version == 1 else 10_000
    if covered:  # audit.covered_uniformity's hash value index
        bin_sql = (
            f"CASE WHEN isnan(bucket) THEN -1 WHEN bucket < 0 THEN -2 "
            f"ELSE least(round_even(bucket * {resolution}, 0), {resolution - 1}) END"
        )
    else:  # audit.bucket_uniformity's bin (the same float operations)
        bin_sql = (
            "CASE WHEN isnan(bucket) THEN -1 WHEN bucket < 0 OR bucket >= 1 THEN -2 "
            "ELSE least(floor(bucket * 100 + 1e-9), 99) END"
        )
    columns = ["arm", "cur", "bin", "day", *cat_col.values(), *num_col.values(), "blk", "cell"]
    select = [
        "arm",
        f"revision >= {int(since)} AS cur",
        f"({bin_sql})::BIGINT AS bin",
        "day",
        *(f"cv[list_position(ck, {_literal(n)})] AS {c}" for n, c in cat_col.items()),
        *(f"nv[list_position(nk, {_literal(n)})] AS {c}" for n, c in num_col.items()),
        f"exposure_id >> {SAMPLE_BLOCK_BITS} AS blk",
    ]

    def aggregate(by: Sequence[str], by_cell: bool = True) -> None:
        """The one scan: units per grouping set (and the first exposure id in each, for the vocabularies). The
        sets of categoricals and days only are summed from one joint set over all of them (each grouping set
        costs DuckDB a hash table insert per row), the sets with a numeric or the hash bin counted per row.
        With ``by_cell``, when the joint set holds every categorical windowed by, the numeric sets by those
        categoricals are summed from one set per numeric keyed by a 64-bit hash of the row's categorical values
        (its cell): one integer-keyed insert per row and numeric instead of one string-keyed per categorical; the
        joint set's distinct cells map the hash back (hashes shared by two cells: counted again without)."""
        sets: list[tuple[str, ...]] = [("arm", "cur"), ("bin",), ("blk",), *((c,) for c in cat_col.values())]
        for base in ["day", *(cat_col[name] for name in by)]:
            sets.append(("arm", base))
            sets += [("arm", base, c) for c in num_col.values()]
            sets += [("arm", base, c) for c in cat_col.values() if c != base]
        sets = list({frozenset(s): s for s in reversed(sets)}.values())[::-1]  # (a, b, c) is (a, c, b): once
        joint = ["arm", "cur", "day"]
        size = n_arms * 2 * audit.days
        for name, c in cat_col.items():  # the categoricals with few values (values + missing), while it stays small
            values = audit.leading_values.get(name)
            if values is not None and size * (values + 1) <= JOINT_GROUPS:
                joint.append(c)
                size *= values + 1
        cells = [cat_col[name] for name in by]
        by_cell = by_cell and bool(cells) and bool(num_col) and set(cells) <= set(joint)
        by_cells = {("arm", c, n) for c in cells for n in num_col.values()} if by_cell else set()
        from_cells = [g for g in sets if tuple(g) in by_cells]
        sets = [g for g in sets if tuple(g) not in by_cells] + [("arm", "cell", n) for n in num_col.values() if by_cell]
        summed = [g for g in sets if set(g) <= set(joint)]
        counted = [tuple(joint), *(g for g in sets if not set(g) <= set(joint))]
        listed = ", ".join(columns)
        cell = CELL_HASH.format(", ".join(cells)) if by_cell else "NULL::UBIGINT"
        used = [c for c in columns if any(c in g for g in counted)]  # grouping_id takes grouped columns only
        counted_gids = " ".join(f"WHEN {_gid(used, g)} THEN {_gid(columns, g)}" for g in counted)
        rows = f"SELECT exposure_id, {', '.join(select)}, {cell} AS cell FROM {_SPLIT_MAPS}"
        if not audit.complete:  # names the leading rows did not have, counted from the values extracted anyway
            extracted = [*cat_col.values(), *num_col.values()]
            rows = (
                f"SELECT *, {audit.unknown_keys(extracted)} AS unknown FROM "
                f"(SELECT exposure_id, {', '.join(select)}, {cell} AS cell, {audit.names_logged()} AS names "
                f"FROM {_SPLIT_MAPS})"
            )
        audit.sql("DROP TABLE IF EXISTS agg")
        audit.sql("DROP TABLE IF EXISTS counted")
        audit.sql(
            f"CREATE TEMP TABLE counted AS SELECT CASE grouping_id({', '.join(used)}) {counted_gids} END AS gid, "
            f"{', '.join(c if c in used else f'NULL AS {c}' for c in columns)}, count(*) AS n, "
            f"min(exposure_id) AS first_id{'' if audit.complete else ', sum(unknown) AS unknown'} "
            f"FROM ({rows}) "
            f"GROUP BY GROUPING SETS ({', '.join('(' + ', '.join(g) + ')' for g in counted)})"
        )
        joint_gid = _gid(columns, joint)
        if not audit.complete:
            unknown = audit.sql(f"SELECT sum(unknown) AS u FROM counted WHERE gid = {joint_gid}")["u"][0].as_py()
            if unknown:  # a first exposure logged a covariate the leading rows did not: start again knowing all
                raise _NamesMissed
        cell_gids = [_gid(columns, ("arm", "cell", n)) for n in num_col.values()] if by_cell else []
        derived = ""
        if by_cell:
            listed_cells = ", ".join(cells)
            shared = audit.sql(
                f"SELECT count(*) - count(DISTINCT {CELL_HASH.format(listed_cells)}) AS shared FROM "
                f"(SELECT DISTINCT {listed_cells} FROM counted WHERE gid = {joint_gid})"
            )["shared"][0].as_py()
            if shared:  # two cells share the hash: the numeric sets by categorical counted one by one
                aggregate(by, by_cell=False)
                return
            audit.sql(
                f"CREATE OR REPLACE TEMP TABLE cells AS SELECT DISTINCT {CELL_HASH.format(listed_cells)} AS cell, "
                f"{listed_cells} FROM counted WHERE gid = {joint_gid}"
            )
            for n, src in zip(num_col.values(), cell_gids, strict=True):
                mine = [g for g in from_cells if g[2] == n]
                whens = " ".join(f"WHEN {_gid(['arm', *cells, n], g)} THEN {_gid(columns, g)}" for g in mine)
                picked = {"arm": "x.arm", n: f"x.{n}", **{c: f"m.{c}" for c in cells}}
                derived += (
                    f" UNION ALL SELECT CASE grouping_id(x.arm, {', '.join('m.' + c for c in cells)}, x.{n}) "
                    f"{whens} END, {', '.join(picked.get(c, 'NULL') for c in columns)}, sum(x.n)::BIGINT, "
                    f"min(x.first_id) FROM counted x JOIN cells m ON x.cell = m.cell WHERE x.gid = {src} GROUP BY "
                    f"GROUPING SETS ({', '.join('(' + ', '.join(picked[c] for c in g) + ')' for g in mine)})"
                )
        gids = " ".join(f"WHEN {_gid(joint, g)} THEN {_gid(columns, g)}" for g in summed)
        skipped = ", ".join(str(g) for g in [joint_gid, *cell_gids])
        audit.sql(
            f"CREATE TEMP TABLE agg AS SELECT gid, {listed}, n, first_id FROM counted WHERE gid NOT IN ({skipped}) "
            f"UNION ALL SELECT CASE grouping_id({', '.join(joint)}) {gids} END, "
            f"{', '.join(c if c in joint else 'NULL' for c in columns)}, sum(n)::BIGINT, min(first_id) FROM counted "
            f"WHERE gid = {joint_gid} GROUP BY GROUPING SETS ({', '.join('(' + ', '.join(g) + ')' for g in summed)})"
            f"{derived}"
        )
        audit.sql("DROP TABLE counted")

    # windows by every categorical (as audit._prepare) or by those named; a categorical found to have more
    # than MAX_WINDOW_VALUES values (id-like) costs one more scan without it
    by = list(dict.fromkeys(window_covariates)) or list(cat_col)
    aggregate(by)
    vocabularies: dict[str, tuple[str, ...]] = {}
    for name, c in cat_col.items():
        t = audit.sql(f"SELECT {c}, first_id FROM agg WHERE gid = {_gid(columns, (c,))} AND {c} IS NOT NULL")
        if t.num_rows:  # a key logged only on repeat exposures is no column of the first ones
            order = np.argsort(t["first_id"].to_numpy(), kind="stable")
            vocabularies[name] = tuple(t[c].to_pylist()[i] for i in order)
    for i, name in enumerate(window_covariates):
        if name not in vocabularies:
            raise InvalidArgument(f"window_covariates[{i}]", f"'{name}' was never logged as a categorical covariate")
    notes: list[str] = []
    if not window_covariates:
        wide = [name for name in by if len(vocabularies.get(name, ())) > audit_mod.MAX_WINDOW_VALUES]
        notes = [
            f"{name}: {len(vocabularies[name])} values, more than {audit_mod.MAX_WINDOW_VALUES}: no windows by it"
            for name in wide
        ]
        by = [name for name in by if name in vocabularies and name not in wide]
        if wide:
            aggregate(by)

    def rows(*grouped: str) -> dict[str, list[Any]]:
        gid = _gid(columns, grouped)
        return audit.sql(f"SELECT {', '.join(grouped)}, n FROM agg WHERE gid = {gid}").to_pydict()

    # SRM, overall and since the weight change
    srm_rows = rows("arm", "cur")
    per_arm = np.zeros(n_arms, dtype=np.int64)
    per_arm_since = np.zeros(n_arms, dtype=np.int64)
    for arm, cur, n in zip(srm_rows["arm"], srm_rows["cur"], srm_rows["n"], strict=True):
        if not 0 <= arm < n_arms:
            raise ValueError(f"cols.arms: arm index {arm} out of range for {n_arms} arms")
        per_arm[arm] += n
        if cur:
            per_arm_since[arm] += n
    n_units = int(per_arm.sum())
    if n_units == 0:
        empty = np.array([], dtype=np.float64)
        columns_0 = ExposureColumns(np.array([], dtype=object), np.array([], np.int16), empty, empty, empty)
        return _in_memory(columns_0, np.array([], np.int64), experiment, since, (), min_sample, min_deviation)
    srm = audit_mod.sample_ratio_test(
        per_arm, weights, alpha=alpha_srm, min_sample=min_sample, min_deviation=min_deviation
    )
    uniformity = _uniformity_of(rows("bin"), covered, ranges, resolution, alpha_srm)

    # windows: overall, days / weeks / seasons, then each categorical named for windows
    day_rows = rows("arm", "day")
    days = sorted({int(d) for d in day_rows["day"] if d is not None})
    groupings = _day_groupings(days, audit_mod.TIME_WINDOWS)
    for name in by:
        vocabulary = vocabularies[name]
        mapping = pa.table({"b": pa.array(vocabulary, pa.string()), "w": list(range(len(vocabulary)))})
        groupings.append(_Grouping(name, cat_col[name], tuple(f"{name}:{v}" for v in vocabulary), mapping))
    units = [_per_window(rows("arm", g.base), g, g.base, n_arms) for g in groupings]
    clustering = _id_tests(audit, n_units, n_arms, alpha_srm, rows("blk"))
    clustering += _carry_over(audit, table_url, experiment.key, others, per_arm, alpha_srm)
    clustering += [
        audit_mod._arm_share_result(u.T, g.names, f"arm_share:{g.kind}", alpha_srm)
        for g, u in zip(groupings, units, strict=True)
        if g.kind != "all"
    ]

    # covariate balance: every treatment against control (0) in every window
    found: list[tuple[tuple[int, int, int, int], audit_mod.BalanceResult]] = []
    treatments = [t for t in range(1, n_arms) if per_arm[t] > 0]
    if per_arm[0] > 0 and treatments:
        pair_ok = [(u[:, [0]] >= _MIN_N) & (u[:, treatments] >= _MIN_N) for u in units]
        for k, name in enumerate(numeric_names):
            found += _numeric_balance(audit, columns, groupings, pair_ok, name, num_col[name], k, treatments, n_arms)
        offset = len(numeric_names)
        for k, (name, vocabulary) in enumerate(vocabularies.items()):
            c = cat_col[name]
            for pi, g in enumerate(groupings):
                if g.base == c or not pair_ok[pi].any():
                    continue
                found += _categorical_balance(
                    rows("arm", g.base, c), g, pi, c, name, vocabulary, offset + k, pair_ok[pi], treatments, n_arms
                )
    found.sort(key=lambda item: item[0])
    balance = [result for _, result in found]
    report = audit_mod.assemble_report(n_units, srm, uniformity, clustering, balance, alpha_balance, notes, started)
    if per_arm_since.sum() < n_units:  # as audit.with_srm_since: SRM over the units under today's weights
        since_srm = audit_mod.sample_ratio_test(
            per_arm_since, weights, min_sample=min_sample, min_deviation=min_deviation
        )
        since_srm = replace(since_srm, reason=f"{since_srm.reason} (units exposed since version {since})")
        alert = (
            since_srm.alert
            or report.uniformity.alert
            or any(t.alert for t in report.clustering)
            or any(b.imbalanced for b in report.balance)
        )
        report = replace(report, srm=since_srm, alert=alert)
    return replace(report, seconds=time.perf_counter() - started)


def _uniformity_of(
    t: dict[str, list[Any]], covered: bool, ranges: Sequence[tuple[float, float]], resolution: int, alpha: float
) -> audit_mod.TestResult:
    size = resolution if covered else 100
    counts = np.zeros(size, dtype=np.int64)
    unhashed = outside = 0
    for b, n in zip(t["bin"], t["n"], strict=True):
        if b == -1:
            unhashed += n
        elif b == -2:
            outside += n
        else:
            counts[b] += n
    if covered:
        if outside:  # below 0: outside every covered range
            n_all = int(counts.sum()) + outside
            detail = f"{outside} of {n_all} exposed units have hash values outside every covered range"
            return audit_mod.TestResult("bucket_uniformity", "chi2_gof", math.inf, 0.0, 0, True, detail)
        return audit_mod.covered_uniformity_from_counts(counts, ranges, 100, alpha)
    if outside:
        raise ValueError(f"buckets: hash values must be in [0, 1), {outside} units outside")
    return audit_mod.uniformity_from_counts(counts, unhashed, alpha)


def _per_window(t: dict[str, list[Any]], g: _Grouping, base: str, n_arms: int) -> np.ndarray:
    """Units per window and arm (windows x arms) from the units per base value and arm."""
    window = dict(zip(g.mapping["b"].to_pylist(), g.mapping["w"].to_pylist(), strict=True))
    out = np.zeros((len(g.names), n_arms), dtype=np.int64)
    for arm, b, n in zip(t["arm"], t[base], t["n"], strict=True):
        w = window.get(b)
        if w is not None:
            out[w, arm] += n
    return out


def _id_tests(
    audit: _Audit, n_units: int, n_arms: int, alpha: float, blocks: dict[str, list[Any]]
) -> list[audit_mod.TestResult]:
    """``audit.id_structure_tests`` on the rows of the first-exposure order the in-memory audit samples
    (``blocks``: first exposures per block of ids, columns blk and n)."""
    picked = id_sample_rows(n_units)
    if picked is None:
        t = audit.sql("SELECT unit, arm FROM first ORDER BY exposure_id")
    else:
        t = sampled_rows(audit, picked, blocks)
    ids = np.array(t["unit"].to_pylist(), dtype=object)
    results = audit_mod.id_structure_tests(ids, t["arm"].to_numpy(), n_arms, alpha=alpha)
    if picked is None:
        return results
    note = f", on a deterministic random sample of {len(ids)} of {n_units} units"
    return [replace(r, detail=r.detail + note) for r in results]


def sampled_rows(audit: _Audit, picked: np.ndarray, blocks: dict[str, list[Any]]) -> pa.Table:
    """Unit and arm of the first exposures at ranks ``picked`` (ascending) of the first-exposure order, in that
    order, without ranking them all: the per-block counts place each rank in a block of ids (its rank among the
    block's first exposures), and only the blocks holding a picked rank are read (one read) and ranked."""
    block = np.asarray(blocks["blk"], dtype=np.int64)
    count = np.asarray(blocks["n"], dtype=np.int64)
    order = np.argsort(block)
    block, count = block[order], count[order]
    end = np.cumsum(count)  # rank after each block's last first exposure
    where = np.searchsorted(end, picked, side="right")  # the block holding each picked rank
    offset = picked - (end - count)[where]
    held = np.unique(where)
    audit.con.register("held", pa.table({"b": block[held]}))
    # the blocks' rows first, then the join that drops later exposures (a filter on the view itself ran after it)
    held_rows = f"(SELECT * FROM raw SEMI JOIN held ON raw.exposure_id >> {SAMPLE_BLOCK_BITS} = held.b)"
    t = audit.sql(f"SELECT exposure_id, unit, arm FROM ({audit.first_of(held_rows)})")
    audit.con.unregister("held")
    if t.num_rows != count[held].sum():  # the scan and this read saw different tables: never a wrong sample
        raise ExportCorrupt(f"exposure table at {table_root(audit.where)}: changed while it was audited")
    ranked = np.argsort(t["exposure_id"].to_numpy(), kind="stable")
    start = np.cumsum(count[held]) - count[held]  # each held block's first position in the ranked rows
    return t.select(["unit", "arm"]).take(ranked[start[np.searchsorted(held, where)] + offset])


def _carry_over(
    audit: _Audit, table_url: str, key: str, others: Sequence[str], per_arm: np.ndarray, alpha: float
) -> list[audit_mod.TestResult]:
    """``audit.carry_over_tests`` from the units per (our arm, their first arm) of each other experiment."""
    keys = list(others) or sorted({f.split("/experiment=", 1)[1].split("/", 1)[0] for f in _files(table_url)} - {key})
    n_arms = int(np.flatnonzero(per_arm).max()) + 1
    results = []
    for other in keys:
        files = _files(table_url, other)
        if not files:
            continue
        listed = ", ".join(_literal(f) for f in files)
        t = audit.sql(
            f"WITH o AS (SELECT unit, arg_min(arm, exposure_id) AS arm FROM read_parquet([{listed}], "
            f"hive_partitioning = false) WHERE experiment = {_literal(other)} GROUP BY unit) "
            "SELECT f.arm AS mine, o.arm AS theirs, count(*) AS n FROM first f JOIN o ON f.unit = o.unit GROUP BY ALL"
        ).to_pydict()
        k = max((int(x) for x in t["theirs"]), default=0) + 1
        table = np.zeros((n_arms, k), dtype=np.int64)
        for mine, theirs, n in zip(t["mine"], t["theirs"], t["n"], strict=True):
            table[mine, theirs] += n
        note = f"{int(table.sum())} units in both experiments"
        results.append(
            audit_mod._contingency_result(f"carry_over:{other}", table, alpha, f"arms of '{other}'", note=note)
        )
    return results


def _numeric_balance(
    audit: _Audit,
    columns: list[str],
    groupings: list[_Grouping],
    pair_ok: list[np.ndarray],
    name: str,
    col: str,
    index: int,
    treatments: list[int],
    n_arms: int,
) -> list[tuple[tuple[int, int, int, int], audit_mod.BalanceResult]]:
    """KS (from per-value counts, in DuckDB) and standardised mean difference of one numeric covariate in
    every window of every grouping."""
    found = []
    by_base: dict[str, list[int]] = {}
    for pi, g in enumerate(groupings):
        if pair_ok[pi].any():
            by_base.setdefault(g.base, []).append(pi)
    for base, pis in by_base.items():
        gid = _gid(columns, ("arm", base, col))
        mapping = pa.concat_tables(
            [groupings[pi].mapping.append_column("p", pa.array([pi] * groupings[pi].mapping.num_rows)) for pi in pis]
        )
        audit.con.register("windows", mapping)
        values = f"(SELECT {base} AS b, {col} AS v, arm, n FROM agg WHERE gid = {gid} AND isfinite({col}))"
        centre = audit.sql(f"SELECT sum(n * v) / sum(n) AS c FROM {values}")["c"][0].as_py()
        if centre is None:  # no finite value at all
            continue
        moments = audit.sql(
            f"SELECT m.p, m.w, g.arm, sum(g.n) AS cnt, sum(g.n * (g.v - {centre!r})) AS s1, "
            f"sum(g.n * (g.v - {centre!r}) * (g.v - {centre!r})) AS s2 FROM {values} g JOIN windows m ON g.b = m.b "
            "GROUP BY ALL"
        ).to_pydict()
        arms = [0, *treatments]
        cells = ", ".join(f"coalesce(sum(g.n) FILTER (WHERE g.arm = {a}), 0) AS c{a}" for a in arms)
        sums = ", ".join(f"sum(c{a}) OVER win AS s{a}, sum(c{a}) OVER (PARTITION BY p, w) AS t{a}" for a in arms)
        extremes = ", ".join(f"max(abs(s0 * t{t} - s{t} * t0))::DOUBLE AS e{t}" for t in treatments)
        ks = audit.sql(
            f"WITH c AS (SELECT m.p, m.w, g.v, {cells} FROM {values} g JOIN windows m ON g.b = m.b "
            f"GROUP BY m.p, m.w, g.v), s AS (SELECT p, w, {sums} FROM c "
            "WINDOW win AS (PARTITION BY p, w ORDER BY v ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) "
            f"SELECT p, w, {extremes} FROM s GROUP BY p, w"
        ).to_pydict()
        audit.con.unregister("windows")
        for pi in pis:
            g = groupings[pi]
            size = (len(g.names), n_arms)
            cnt, s1, s2 = np.zeros(size, np.int64), np.zeros(size), np.zeros(size)
            for p, w, arm, c, a, b in zip(*(moments[x] for x in ("p", "w", "arm", "cnt", "s1", "s2")), strict=True):
                if p == pi:
                    cnt[w, arm], s1[w, arm], s2[w, arm] = c, a, b
            mean, var = mean_var(cnt, s1, s2)
            mean = mean + centre
            extreme = {
                (w, t): ks[f"e{t}"][i]
                for i, (p, w) in enumerate(zip(ks["p"], ks["w"], strict=True))
                if p == pi
                for t in treatments
            }
            for w, j in zip(*np.nonzero(pair_ok[pi]), strict=True):
                t = treatments[j]
                n_a, n_b = int(cnt[w, 0]), int(cnt[w, t])
                if n_a < _MIN_N or n_b < _MIN_N:
                    continue
                stat = float(extreme[(int(w), t)] / (np.float64(n_a) * np.float64(n_b)))
                p_value = float(ks_p_value(stat, n_a, n_b))
                effect = float(standardized_mean_difference(mean[w, 0], var[w, 0], n_a, mean[w, t], var[w, t], n_b))
                result = audit_mod.BalanceResult(
                    name, g.names[w], 0, t, "ks", stat, p_value, effect, n_a, n_b, p_value < 0.01
                )
                found.append(((pi, int(w), int(j), index), result))
    return found


def _categorical_balance(
    t: dict[str, list[Any]],
    g: _Grouping,
    pi: int,
    col: str,
    name: str,
    vocabulary: tuple[str, ...],
    index: int,
    pair_ok: np.ndarray,
    treatments: list[int],
    n_arms: int,
) -> list[tuple[tuple[int, int, int, int], audit_mod.BalanceResult]]:
    """Chi-square and Cramér's V of one categorical covariate in every window of one grouping (as
    ``audit._categorical_task``, from the units per window, arm and value)."""
    window = dict(zip(g.mapping["b"].to_pylist(), g.mapping["w"].to_pylist(), strict=True))
    code = {v: i for i, v in enumerate(vocabulary)}
    tables = np.zeros((len(g.names), n_arms, len(vocabulary)), dtype=np.int64)
    for arm, b, value, n in zip(t["arm"], t[g.base], t[col], t["n"], strict=True):
        w, c = window.get(b), code.get(value)
        if w is not None and c is not None:
            tables[w, arm, c] += n
    found = []
    for j, tr in enumerate(treatments):
        pair = tables[:, [0, tr], :]
        chi, dof, pv, _, v, _, _ = audit_mod._chi2_tables(pair)
        n_pair = pair.sum(axis=2)
        for w in np.flatnonzero(pair_ok[:, j] & (dof > 0)):
            n_a, n_b = int(n_pair[w, 0]), int(n_pair[w, 1])
            if n_a < _MIN_N or n_b < _MIN_N:
                continue
            p = float(pv[w])
            result = audit_mod.BalanceResult(
                name, g.names[w], 0, tr, "chi2", float(chi[w]), p, float(v[w]), n_a, n_b, p < 0.01
            )
            found.append(((pi, int(w), j, index), result))
    return found
