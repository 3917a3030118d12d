"""Analysis out of core (issue #20 item 2): the metric analysis fed from the Parquet exposure and observation
tables with DuckDB (per-unit-and-day sums GROUP BY in DuckDB) gives the router's in-memory analysis on the same
data: an EVENT metric (per-unit sum) with pre-period values (CUPED), a CONTINUOUS one (per-unit mean), position
strata, inverse-propensity weights, several days (novelty trend), heavy users; the bootstrap CI with the same
seed over the same unit order.

Tolerance: the per-unit sums are formed in another order (DuckDB's GROUP BY against numpy's bincount), so a
value may differ in its last bit; every estimate is a smooth function of those values (the bootstrap draws the
same units with the same seed: its resampling depends on the unit order and on which values are equal, both
kept), so rel 1e-9 is many orders above that noise and far below any difference a wrong join, a lost or doubled
observation or a wrong day would make (tested below: dropping one observation moves the effect)."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.errors import InvalidArgument
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.export import ExportCorrupt, ExposureExporter
from services.abrouter.metrics import MetricKind
from services.abrouter.router import AnalysisOptions, Observation, Router
from services.abrouter.store import RouterStore
from services.abrouter.warehouse_analysis import (
    ObservationExporter,
    analyze_table,
    export_observations,
    observation_files,
)

SPEC = ExperimentSpec(
    key="rank",
    arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.3), ArmSpec("newer", 0.2)),
    metrics=("clicks", "dwell"),
    metric_kinds={"dwell": MetricKind.CONTINUOUS},
)
START = 1_760_000_000.0


def populated(tmp_path: Path, store_url: str = "") -> Router:
    router = Router(ABRouterSettings(), RouterStore(store_url or tmp_path / "r.db", "NORMAL"))
    router.create(SPEC)
    rng = np.random.default_rng(11)
    observations = []
    for i in range(2600):  # control + new above SCIPY_BOOTSTRAP_MAX_UNITS, control + newer below
        at = START + float(rng.uniform(0, 3 * 86_400))
        unit = f"u{i}"
        router.assign(unit, {}, ["rank"], log_exposure=True, categorical={"position": str(i % 4)}, timestamp=at)
        heavy = 25.0 if i % 97 == 0 else 1.0
        observations.append(Observation(unit, "clicks", float(rng.poisson(2)), pre_period=True, timestamp=at - 86_400))
        for _ in range(int(rng.integers(0, 6))):
            later = at + float(rng.uniform(0, 12 * 86_400))
            observations.append(Observation(unit, "clicks", heavy * float(rng.poisson(1.5)), timestamp=later))
            observations.append(Observation(unit, "dwell", float(rng.gamma(2.0, 7.3)), timestamp=later))
    for lo in range(0, len(observations), 1000):
        router.record_metrics("rank", observations[lo : lo + 1000])
    return router


@pytest.fixture
def tables(tmp_path: Path) -> Iterator[tuple[Router, str, str]]:
    """The populated router, its exposures exported to a Parquet table and its observations to another."""
    router = populated(tmp_path)
    assert router.store is not None
    try:
        exposures, observations = str(tmp_path / "exposures"), str(tmp_path / "observations")
        exporter = ExposureExporter(router.store, exposures)
        while exporter.export_once():
            pass
        assert export_observations(router.store, observations) > 0
        assert export_observations(router.store, observations) == 0  # idempotent: nothing new
        yield router, exposures, observations
    finally:
        router.close()
        router.store.close()


def close(a: object, b: object, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), where
        else:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    elif dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        for f in dataclasses.fields(a):
            close(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, tuple) and isinstance(b, tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position_covariate": "position"},
        {"inverse_propensity": True},
    ],
)
def test_the_table_analysis_gives_the_in_memory_answers(
    tables: tuple[Router, str, str], options: dict[str, object]
) -> None:
    router, exposures, observations = tables
    opts = AnalysisOptions(n_resamples=300, seed=5, **options)  # type: ignore[arg-type]
    in_memory, exp, _ = router.analyze("rank", opts)
    from_table, exposed = analyze_table(exposures, observations, exp, opts)
    assert exposed == 2600
    assert [(m.metric, m.treatment) for m in from_table] == [(m.metric, m.treatment) for m in in_memory]
    assert len(in_memory) == 4
    clicks = in_memory[0]
    assert clicks.cuped_effect is not None and len(clicks.daily) >= 3 and clicks.ci is not None
    assert "scipy" not in clicks.ci_method and "scipy" in in_memory[1].ci_method  # both bootstrap paths
    for a, b in zip(from_table, in_memory, strict=True):
        close(a, b, f"{a.metric}/{a.treatment}")


def test_a_lost_observation_shows_in_the_table_analysis(tables: tuple[Router, str, str]) -> None:
    """The comparison above can fail: one observation fewer in the table moves the estimates."""
    router, exposures, observations = tables
    options = AnalysisOptions(n_resamples=100, seed=5)
    in_memory, exp, _ = router.analyze("rank", options)
    (path,) = observation_files(observations)
    con = duckdb.connect()
    con.execute(
        f"COPY (SELECT * FROM read_parquet('{path}') WHERE observation_id <> "
        f"(SELECT max(observation_id) FROM read_parquet('{path}') "
        "WHERE metric = 'clicks' AND NOT pre AND value > 0)) "
        f"TO '{path}.tmp' (FORMAT parquet)"
    )
    con.close()
    Path(f"{path}.tmp").rename(path)
    from_table, _ = analyze_table(exposures, observations, exp, options)
    assert any(a.effect != pytest.approx(b.effect, rel=1e-9) for a, b in zip(from_table, in_memory, strict=True))


def test_a_corrupt_observation_file_fails_the_table_analysis_naming_the_table(tables: tuple[Router, str, str]) -> None:
    router, exposures, observations = tables
    (path,) = observation_files(observations)
    Path(path).write_bytes(Path(path).read_bytes()[:200])
    with pytest.raises(ExportCorrupt, match="observation table"):
        analyze_table(exposures, observations, router.live["rank"].experiment, AnalysisOptions(n_resamples=100))


def test_table_reads_run_below_the_serving_threads_cpu_priority(
    tables: tuple[Router, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit and the analysis over the tables open DuckDB (whose workers inherit the opening thread's nice
    value) on a thread BACKGROUND_NICE below the caller's priority, so Assign wins a contended core; the
    caller's own priority is unchanged and errors still reach it."""
    import os

    from services.abrouter import warehouse
    from services.abrouter.warehouse import BACKGROUND_NICE, audit_table

    router, exposures, observations = tables
    opened_at: list[int] = []
    open_connection = warehouse._connection

    def watched() -> object:
        opened_at.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return open_connection()

    monkeypatch.setattr(warehouse, "_connection", watched)
    monkeypatch.setattr("services.abrouter.warehouse_analysis._connection", watched)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    exp = router.live["rank"].experiment
    assert audit_table(exposures, exp, 1).exposures == 2600
    analyze_table(exposures, observations, exp, AnalysisOptions(n_resamples=10))
    assert len(opened_at) >= 3 and set(opened_at) == {min(base + BACKGROUND_NICE, 19)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    with pytest.raises(InvalidArgument, match="window_covariates"):
        audit_table(exposures, exp, 1, window_covariates=["nope"])


def exported_ids(url: str) -> list[int]:
    """Every observation id in the table at ``url``, sorted (repeats kept)."""
    listed = ", ".join(f"'{f}'" for f in observation_files(url))
    with duckdb.connect() as con:
        rows = con.sql(f"SELECT observation_id FROM read_parquet([{listed}]) ORDER BY 1").fetchall()
    return [int(n) for (n,) in rows]


def stored_ids(store: RouterStore) -> list[int]:
    return [int(n) for (n,) in store.query("SELECT seq FROM observations ORDER BY seq")]


def test_the_observation_export_waits_for_an_id_still_committing(tmp_path: Path, store_url: str) -> None:
    """A row numbered below rows already committed (another replica's transaction still committing: here
    taken out of the store and put back under its number) is exported once it commits, not passed over."""
    router = populated(tmp_path, store_url)
    store = router.store
    assert store is not None
    try:
        url = str(tmp_path / "observations")
        everything = stored_ids(store)
        late = everything[len(everything) // 2]
        (row,) = store.query("SELECT key, unit, metric, value, at, pre FROM observations WHERE seq = ?", (late,))
        store.log.transaction(lambda tx: tx.execute("DELETE FROM observations WHERE seq = ?", (late,)))
        exporter = ObservationExporter(store, url)
        assert exporter.export_once() == everything.index(late)  # up to the hole, not past it
        assert exported_ids(url) == everything[: everything.index(late)]
        store.log.transaction(
            lambda tx: tx.execute(
                "INSERT INTO observations (seq, key, unit, metric, value, at, pre) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (late, *row),
            )
        )
        assert exporter.export_once() == len(everything) - everything.index(late)
        assert exported_ids(url) == everything
    finally:
        router.close()
        store.close()


def test_an_observation_round_cut_short_is_redone_and_replicas_export_each_observation_once(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = populated(tmp_path, store_url)
    store = router.store
    assert store is not None
    try:
        url = str(tmp_path / "observations")
        write_file = ObservationExporter._write_file

        def written_then_killed(self: ObservationExporter, *args: object) -> None:
            write_file(self, *args)  # type: ignore[arg-type]
            raise KeyboardInterrupt("killed after the file, before the range is marked done")

        monkeypatch.setattr(ObservationExporter, "_write_file", written_then_killed)
        with pytest.raises(KeyboardInterrupt):
            ObservationExporter(store, url).export_once()
        monkeypatch.undo()
        done, pending = ObservationExporter(store, url).state()
        assert pending > done and exported_ids(url) == stored_ids(store)  # the file is there, the round is not
        # two replicas' exporters (one store, one table) racing while observations keep arriving
        exporters = [ObservationExporter(store, url), ObservationExporter(store, url)]
        errors: list[BaseException] = []

        def export(exporter: ObservationExporter) -> None:
            try:
                for _ in range(15):
                    exporter.export_once()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=export, args=(e,)) for e in exporters]
        for t in threads:
            t.start()
        for i in range(15):
            router.record_metrics("rank", [Observation(f"u{i}", "clicks", float(i), timestamp=START + 86_400)])
        for t in threads:
            t.join()
        assert not errors, errors
        for e in exporters:
            e.export_once()
        assert exported_ids(url) == stored_ids(store)  # every observation once: none lost, none twice
        assert ObservationExporter(store, url).state()[0] == stored_ids(store)[-1]
    finally:
        router.close()
        store.close()
