"""Analysis out of core (issue #20 item 2, second part): the metric analysis (bootstrap CI, CUPED, novelty,
heavy users, position, correction factors: ``services.abrouter.analysis``) fed from the Parquet exposure table
and an observation table with DuckDB, instead of the router's in-memory logs.

DuckDB does the part that grows with the observations: per metric it joins them to each unit's first
exposure and sums them per unit and day since that exposure (``GROUP BY``), and sums the pre-period values per
unit. The estimators need one value per unit (the bootstrap resamples units), so the units' arms, first
exposure times and covariates come back as columns (one row per unit, as the in-memory path holds them); the
observations do not. Those per-(unit, day) sums are handed to :func:`services.abrouter.analysis.analyze_experiment`
as if each were one observation: a unit's sum over its days and a day's sum per unit are the same numbers, so
every estimate is the in-memory one (tests compare both paths). A metric whose per-unit value is a *mean*
(declared kind) gets its observations one by one (a mean of daily sums is not the mean of the observations).

Sums in another order can differ in the last bit from the in-memory ones (floating point); every statistic
then agrees to ~1e-12 relative.

The observation table (:data:`OBSERVATION_SCHEMA`): ``<root>/experiment=<key>/part-<first id>-<last id>.parquet``,
written by :class:`ObservationExporter` from a router store, idempotent by observation id across kill -9 and
replicas (ranges claimed in the store, as the exposure export does). The server keeps it beside the exposure
table's partitions (:func:`observation_table_url`) and brings both up to date before
``AnalyzeExperiment(from_table=true)`` runs :func:`analyze_table`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa

from guardmesh.errors import FailedPrecondition, InvalidArgument
from services.abrouter import analysis as analysis_mod
from services.abrouter.experiments import Experiment, ExperimentSpec
from services.abrouter.export import RangeExporter
from services.abrouter.store import ObservationRow, RouterStore
from services.abrouter.warehouse import _connection, _literal, at_background_priority, exposure_columns, table_sql

if TYPE_CHECKING:
    from services.abrouter.router import AnalysisOptions

#: The observation table's folder under the exposure table's root (``_``: Hive, Spark and DuckDB's hive
#: partitioning skip it, so readers of the exposure table never take it for a partition).
OBSERVATIONS_FOLDER = "_observations"

#: The observation table's columns and what each means (carried in each file's schema as field metadata).
OBSERVATION_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "observation_id": (pa.int64(), "the store's row number of the observation: unique per store, rising"),
    "time": (pa.timestamp("us", tz="UTC"), "when the observation was made (the caller's timestamp, else the router's)"),
    "experiment": (pa.string(), "experiment key (also the partition folder experiment=<key>)"),
    "unit": (pa.string(), "the unit observed (the exposure table's unit)"),
    "metric": (pa.string(), "metric name"),
    "value": (pa.float64(), "the observed value"),
    "pre": (pa.bool_(), "true: a pre-period value (CUPED covariate), summed per unit; false: an outcome"),
}
OBSERVATION_SCHEMA = pa.schema(
    [pa.field(name, kind, nullable=False, metadata={"doc": doc}) for name, (kind, doc) in OBSERVATION_COLUMNS.items()]
)


def observation_table_url(exposure_table_url: str) -> str:
    """Where the observation table of the exposure table at ``exposure_table_url`` lives (beside its partitions)."""
    return f"{exposure_table_url.rstrip('/')}/{OBSERVATIONS_FOLDER}"


def observation_files(url: str) -> list[str]:
    """Every complete file of the observation table at ``url`` (sorted)."""
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(p for p in fs.glob(f"{root}/experiment=*/*.parquet") if not p.rsplit("/", 1)[-1].startswith("."))


_TABLE = "observation table"


class ObservationExporter(RangeExporter[ObservationRow]):
    """Exports a router store's observations to the observation table at ``url``, idempotent by observation id
    across kill -9 and across replicas by the exposure export's mechanism
    (:class:`services.abrouter.export.RangeExporter`): ranges of ids claimed in the store's ``export_state``
    (row ``observations <url>``) with a compare-and-set, one file per experiment named after the range, a
    pending range written again under the same names, only ids below every hole still committing. A pending
    range is not redone as the exporter starts but by its first round."""

    def __init__(self, store: RouterStore, url: str) -> None:
        super().__init__(store, url, f"observations {url}")

    def export_once(self) -> int:
        """Rounds until every settled observation is in the table; the number written."""
        written = 0
        while n := super().export_once():
            written += n
        return written

    def _rows_after(self, done: int, upto: int, limit: int) -> list[tuple[int, ObservationRow]]:
        return [(n, r) for n, _, r in self.store.observations_after(done) if n <= upto][:limit]

    def _write_files(self, name: str, rows: list[tuple[int, ObservationRow]]) -> None:
        parts: dict[str, list[tuple[int, ObservationRow]]] = defaultdict(list)
        for n, row in rows:
            parts[row.key].append((n, row))
        for key, part in sorted(parts.items()):
            self._write_file(f"{self.root}/experiment={key}", name, self._table(part))

    @staticmethod
    def _table(part: list[tuple[int, ObservationRow]]) -> pa.Table:
        rows = [r for _, r in part]
        return pa.Table.from_arrays(
            [
                pa.array([n for n, _ in part], pa.int64()),
                pa.array(np.array([round(r.at * 1_000_000) for r in rows], np.int64)).cast(
                    pa.timestamp("us", tz="UTC")
                ),
                pa.array([r.key for r in rows], pa.string()),
                pa.array([r.unit for r in rows], pa.string()),
                pa.array([r.metric for r in rows], pa.string()),
                pa.array([r.value for r in rows], pa.float64()),
                pa.array([bool(r.pre) for r in rows], pa.bool_()),
            ],
            schema=OBSERVATION_SCHEMA,
        )


def export_observations(store: RouterStore, url: str) -> int:
    """One :meth:`ObservationExporter.export_once` of a fresh exporter (tests, one-off exports)."""
    return ObservationExporter(store, url).export_once()


def check_aggregate(spec: ExperimentSpec, metrics: Sequence[str], aggregate: str) -> None:
    """INVALID_ARGUMENT naming ``aggregate`` unless it is empty or each metric's declared per-unit aggregate
    (guardrails and analysis never count a metric differently)."""
    for m in metrics:
        declared = spec.kind_of(m)
        if aggregate and aggregate != declared.aggregate:
            raise InvalidArgument(
                "aggregate",
                f"metric '{m}' is declared {declared.name} (per-unit {declared.aggregate}); "
                f"'{aggregate}' would count it differently from its guardrails (leave it empty)",
            )


@at_background_priority
def analyze_table(
    exposures_url: str, observations_url: str, experiment: Experiment, options: AnalysisOptions
) -> tuple[list[analysis_mod.MetricAnalysis], int]:
    """The multi-metric table of ``experiment`` (every metric x every treatment arm) and its number of exposed
    units, as ``Router.analyze`` gives them with the same ``options``, from the exposure and observation tables.
    ``options.metrics`` empty: every declared metric with an observation. Errors as the audit over the table:
    ExportCorrupt naming the table that cannot be read, ResourceExhausted past warehouse.MEMORY_LIMIT."""
    from services.abrouter.router import Router  # the router's covariate rules, one place

    key, spec = experiment.key, experiment.spec
    for i, m in enumerate(options.metrics):
        if m not in spec.metrics:
            raise InvalidArgument(f"metrics[{i}]", f"'{m}' is not a metric of experiment '{key}'")
    columns, _ = exposure_columns(exposures_url, key)
    n_arms = len(spec.arms)
    counts = np.bincount(columns.arms, minlength=n_arms) if len(columns) else np.zeros(n_arms, dtype=np.int64)
    files = [f for f in observation_files(observations_url) if f"/experiment={key}/" in f]
    inputs = []
    with _connection() as con:
        con.register(
            "units",
            pa.table(
                {"unit": pa.array(columns.unit_ids.tolist(), pa.string()), "at": columns.timestamps}
            ).append_column("idx", pa.array(np.arange(len(columns)), pa.int64())),
        )
        listed = ", ".join(_literal(f) for f in files)
        source = f"read_parquet([{listed}]) WHERE experiment = {_literal(key)}" if files else None

        def query(sql: str) -> pa.Table:
            return table_sql(con, sql, table=_TABLE, at=observations_url)

        present = set()
        if source is not None:
            present = set(query(f"SELECT DISTINCT metric FROM {source}")["metric"].to_pylist())
        wanted = list(options.metrics) or [m for m in spec.metrics if m in present]
        check_aggregate(spec, wanted, options.aggregate)
        for arm, count in enumerate(counts):
            if count == 0:
                raise FailedPrecondition(f"arm '{spec.arms[arm].name}' of experiment '{key}' has no exposed unit")
        unit_position = Router._position(columns, options.position_covariate)  # the in-memory order of checks
        unit_weights = Router._weights(columns, options, n_arms)
        for metric in wanted:
            if metric not in present or source is None:
                continue
            aggregate = spec.kind_of(metric).aggregate
            day = "floor(greatest(epoch_us(o.time) / 1e6 - u.at, 0.0) / 86400.0)"
            if aggregate == "sum":  # per unit and day since its exposure: the analysis sums them again
                sql = (
                    f"SELECT u.idx, {day} AS day, sum(o.value) AS value FROM (SELECT * FROM {source} "
                    f"AND metric = {_literal(metric)} AND NOT pre) o JOIN units u ON o.unit = u.unit "
                    "GROUP BY ALL ORDER BY u.idx, day"
                )
            else:  # a per-unit mean: every observation
                sql = (
                    f"SELECT u.idx, greatest(epoch_us(o.time) / 1e6 - u.at, 0.0) / 86400.0 AS day, o.value "
                    f"FROM (SELECT * FROM {source} AND metric = {_literal(metric)} AND NOT pre) o "
                    "JOIN units u ON o.unit = u.unit ORDER BY o.observation_id"
                )
            obs = query(sql)
            pre = query(
                f"SELECT u.idx, sum(o.value) AS value FROM (SELECT * FROM {source} AND metric = {_literal(metric)} "
                "AND pre) o JOIN units u ON o.unit = u.unit GROUP BY u.idx"
            )
            unit_pre = None
            if pre.num_rows:
                unit_pre = np.full(len(columns), np.nan)
                unit_pre[pre["idx"].to_numpy()] = pre["value"].to_numpy()
            inputs.append(
                analysis_mod.MetricInput(
                    metric=metric,
                    unit_arms=columns.arms.astype(np.int64),
                    obs_unit=obs["idx"].to_numpy(),
                    obs_value=obs["value"].to_numpy(),
                    obs_days=obs["day"].to_numpy(),
                    unit_pre=unit_pre,
                    unit_position=unit_position,
                    unit_weights=unit_weights,
                    aggregate=aggregate,
                )
            )
    try:
        results = analysis_mod.analyze_experiment(
            inputs,
            n_arms,
            confidence=options.confidence,
            n_resamples=options.n_resamples,
            winsor_quantile=options.winsor_quantile,
            seed=options.seed,
        )
    except ValueError as exc:
        raise InvalidArgument("analysis", str(exc)) from None
    return results, len(columns)
