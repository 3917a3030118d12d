"""Router memory bounded by what assignment needs (issue #20 items 3 and 4): with ``abrouter.exposures_in_memory =
false`` the router holds exposed units per arm and per-arm metric moments as counters, the units seen most recently
in bounded caches, and asks the store for the others; a restart reads SQL aggregates, not the rows; audits, analysis
and the continuous audit read the exposure table.

On both store backends, on the same traffic as a router in the default mode (units exposed again, observations of
units long evicted from the caches, pre-period values, a repeat after the cache forgot the unit), the bounded router
gives the same exposed counts, per-arm moments, guardrail verdicts, SRM and audit, analysis and bandit rewards, also
after a restart that never calls the row loaders. Memory: caches at capacity and no per-unit container after 20,000
units. Two replicas on PostgreSQL exposing and observing the same units agree on every counter with each other and
with a restart. Bounded mode without an exposure table is a configuration error naming both settings.

Tolerances: per-arm sums are accumulated in another order (per observation here, per unit in SQL), so they may
differ in the last bits; rel 1e-9 is far above that and far below one observation lost or counted twice.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guardmesh import durable
from guardmesh.config import ABRouterSettings, ConfigError, load_config
from guardmesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from guardmesh.runtime import load_definition, start_service
from guardmesh.sdk.abrouter import ABRouterClient
from guardmesh.v1 import abrouter_pb2 as pb
from services.abrouter.bandit import RewardKind
from services.abrouter.experiments import AllocationMode, ArmSpec, BanditSpec, ExperimentSpec
from services.abrouter.export import ExposureExporter
from services.abrouter.guardrails import Guardrail
from services.abrouter.metrics import CachedArmStatistics, MetricKind
from services.abrouter.router import AnalysisOptions, Observation, Router
from services.abrouter.store import ExposureRow, ObservationRow, RouterStore
from services.abrouter.warehouse_analysis import ObservationExporter, observation_table_url
from tests.conftest import make_config
from tests.postgres import PostgresServer
from tests.test_abrouter_replicas import wait_for
from tests.test_abrouter_warehouse import same
from tests.test_abrouter_warehouse_analysis import close
from tests.test_abrouter_warehouse_rpc import record, stub_of
from tests.test_abrouter_warehouse_rpc import same as same_message

KEY = "rank"
START = 1_760_000_000.0
DAY_S = 86_400.0
CAPACITY = 40
SPEC = ExperimentSpec(
    key=KEY,
    arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)),
    metrics=("clicks", "dwell"),
    metric_kinds={"dwell": MetricKind.CONTINUOUS},
    guardrails=(Guardrail("clicks", min_units=20), Guardrail("dwell", higher_is_better=False, min_units=20)),
)


def bounded(**changes: Any) -> ABRouterSettings:
    settings = {"exposures_in_memory": False, "unit_cache_units": CAPACITY, "audit_min_sample": 50, **changes}
    return ABRouterSettings(**settings)


class LogFailingStore(RouterStore):
    """A store whose log loaders fail: a restart that calls them (replays the log) fails the test."""

    def load_numbered_exposures(self, upto: int | None = None) -> Iterator[tuple[int, ExposureRow]]:
        raise AssertionError("the restart read the exposure rows")

    def load_numbered_observations(self, upto: int | None = None) -> Iterator[tuple[int, ObservationRow]]:
        raise AssertionError("the restart read the observation rows")


class RowlessStore(LogFailingStore):
    """A store whose row loaders fail, the sticky arms' too."""

    def load_sticky(self) -> Iterator[tuple[str, str, int]]:
        raise AssertionError("the restart read every sticky arm")


def with_tables(router: Router, table_url: str) -> Router:
    """Give a bounded router its exposure and observation tables (what the server's export does)."""
    assert router.store is not None
    exposures = ExposureExporter(router.store, table_url)
    observations = ObservationExporter(router.store, observation_table_url(table_url))

    def current(with_observations: bool) -> tuple[str, str]:
        while exposures.export_once() >= exposures.batch_rows:
            pass
        if with_observations:
            observations.export_once()
        return table_url, observations.url

    router.tables = current
    return router


@pytest.fixture
def other_store_url(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A second fresh store on the same backend as ``store_url``."""
    if store_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'other.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


def traffic(routers: list[Router], units: int = 400, seed: int = 3) -> None:
    """The same exposures and observations through each router: covariates and days; every 4th step a unit seen
    long before is exposed again (evicted from a bounded cache by then); observations of new units, of units
    exposed long before and pre-period values; last, observations of the first 60 units."""
    rng = np.random.default_rng(seed)
    steps: list[tuple[str, Any]] = []
    observations: list[Observation] = []
    for i in range(units):
        at = START + float(rng.uniform(0, 3 * DAY_S))
        categorical = {"device": str(rng.choice(["ios", "web"]))} if i % 3 else {}
        steps.append(("assign", (f"u{i}", {"age": float(rng.normal(40, 9))}, categorical, at)))
        if i % 4 == 3:
            j = int(rng.integers(0, i))
            steps.append(("assign", (f"u{j}", {}, {}, at + 60.0)))
        observations.append(
            Observation(f"u{i}", "clicks", float(rng.poisson(2)), pre_period=True, timestamp=at - DAY_S)
        )
        for _ in range(int(rng.integers(0, 4))):
            unit = f"u{int(rng.integers(0, i + 1))}"
            later = at + float(rng.uniform(0, 5 * DAY_S))
            observations.append(Observation(unit, "clicks", float(rng.poisson(1.5)), timestamp=later))
            observations.append(Observation(unit, "dwell", float(rng.gamma(2.0, 7.3)), timestamp=later))
        if len(observations) >= 50:
            steps.append(("record", observations))
            observations = []
    late = [Observation(f"u{i}", "clicks", 3.0, timestamp=START + 9 * DAY_S) for i in range(60)]
    steps.append(("record", observations + late))
    for router in routers:
        for kind, payload in steps:
            if kind == "assign":
                unit, numeric, categorical, at = payload
                router.assign(
                    unit, {}, [KEY], log_exposure=True, numeric=numeric, categorical=categorical, timestamp=at
                )
            else:
                router.record_metrics(KEY, payload)


def verdict_fields(router: Router) -> list[dict[str, object]]:
    return [{k: v for k, v in dataclasses.asdict(v).items() if k != "reason"} for v in router.guardrail_status(KEY)[0]]


def assert_same(default: Router, bounded_router: Router, key: str = KEY) -> None:
    """The bounded router answers as the default one: counts, moments, guardrails, audit, analysis."""
    assert bounded_router.get(key)[1] == default.get(key)[1]
    a, b = default.live[key], bounded_router.live[key]
    assert b.arm_counts(2) == a.arm_counts(2)
    exposed = a.arm_counts(2)
    for metric in ("clicks", "dwell"):
        for arm in (0, 1):
            x = a.metrics[metric].statistics.moments(arm, exposed[arm])
            y = b.metrics[metric].statistics.moments(arm, exposed[arm])
            assert y.count == x.count, (metric, arm)
            assert y.total == pytest.approx(x.total, rel=1e-9), (metric, arm)
            assert y.total_sq == pytest.approx(x.total_sq, rel=1e-9), (metric, arm)
    for x_verdict, y_verdict in zip(verdict_fields(default), verdict_fields(bounded_router), strict=True):
        for name, value in x_verdict.items():
            close(y_verdict[name], value, name)
    same(bounded_router.audit(key, min_sample=50), default.audit(key, min_sample=50))
    options = AnalysisOptions(n_resamples=200, seed=5)
    from_default, _, n_default = default.analyze(key, options)
    from_bounded, _, n_bounded = bounded_router.analyze(key, options)
    assert n_bounded == n_default
    assert [(m.metric, m.treatment) for m in from_bounded] == [(m.metric, m.treatment) for m in from_default]
    for x_analysis, y_analysis in zip(from_default, from_bounded, strict=True):
        close(y_analysis, x_analysis, f"{x_analysis.metric}/{x_analysis.treatment}")


def closing(*routers: Router) -> None:
    for router in routers:
        router.close()
        if router.store is not None:
            router.store.close()


def test_bounded_answers_as_the_default_mode_also_after_a_restart(
    tmp_path: Path, store_url: str, other_store_url: str
) -> None:
    default = Router(ABRouterSettings(audit_min_sample=50), RouterStore(store_url, "NORMAL"))
    table = str(tmp_path / "table")
    router = with_tables(Router(bounded(), RouterStore(other_store_url, "NORMAL")), table)
    restarted: Router | None = None
    try:
        for r in (default, router):
            r.create(SPEC)
        traffic([default, router])
        live = router.live[KEY]
        assert live.counts is not None and live.counts.first.evicted  # the caches forgot units on the way
        assert len(live.table) == 0 and live.metrics["clicks"].rows.size == 0 and not live.metrics["clicks"].pre
        assert_same(default, router)
        # the continuous audit reads the table too
        default.audit_running()
        router.audit_running()
        same(router.last_audits[KEY], default.last_audits[KEY])
        closing(router)
        # a restart reads aggregates: the row loaders are never called
        restarted = with_tables(Router(bounded(), RowlessStore(other_store_url, "NORMAL")), table)
        restarted.restore()
        counts = restarted.live[KEY].counts
        assert counts is not None and len(counts.first) == 0
        assert_same(default, restarted)
        # after the restart, more of the same traffic (units known before the restart among it)
        traffic([default, restarted], units=120, seed=4)
        assert_same(default, restarted)
    finally:
        closing(default, *([restarted] if restarted is not None else [router]))


def test_a_restart_in_the_default_mode_does_read_the_rows(tmp_path: Path) -> None:
    """The check above can fail: the default mode's restart replays the log and trips the store's loaders."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    router = Router(ABRouterSettings(), RouterStore(url, "NORMAL"))
    router.create(SPEC)
    router.assign("u1", {}, [KEY], log_exposure=True)
    closing(router)
    restarted = Router(ABRouterSettings(), LogFailingStore(url, "NORMAL"))
    try:
        with pytest.raises(AssertionError, match="the restart read the exposure rows"):
            restarted.restore()
    finally:
        closing(restarted)


def test_memory_does_not_grow_with_units(tmp_path: Path) -> None:
    router = with_tables(
        Router(bounded(unit_cache_units=500), RouterStore(tmp_path / "r.db", "NORMAL")), str(tmp_path / "t")
    )
    try:
        router.create(SPEC)
        units = 20_000

        def expose(lo: int) -> None:  # four callers: their commits share group commits
            for i in range(lo, units, 4):
                router.assign(f"u{i}", {}, [KEY], log_exposure=True, timestamp=START + i)

        threads = [threading.Thread(target=expose, args=(lo,)) for lo in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for lo in range(0, units, 2000):
            router.record_metrics(KEY, [Observation(f"u{i}", "clicks", 1.0) for i in range(lo, lo + 2000)])
        live = router.live[KEY]
        assert router.get(KEY)[1] == units and sum(live.arm_counts(2)) == units
        assert live.counts is not None and len(live.counts.first) == 500 and live.counts.pending == {}
        statistics = live.metrics["clicks"].statistics
        assert isinstance(statistics, CachedArmStatistics)
        assert len(statistics.units) == 500 and not statistics.unit_sum and not statistics.unit_count
        assert sum(m.count for m in statistics.observed) == units  # every unit's value in the moments
        assert len(live.table) == 0 and live.metrics["clicks"].rows.size == 0 and len(live.sticky) == 0
    finally:
        closing(router)


def test_concurrent_exposures_of_the_same_new_units_count_each_unit_once(tmp_path: Path) -> None:
    router = Router(bounded(unit_cache_units=8), RouterStore(tmp_path / "r.db", "NORMAL"))
    try:
        router.create(SPEC)
        barrier = threading.Barrier(6)

        def expose(seed: int) -> None:
            barrier.wait()
            for i in np.random.default_rng(seed).permutation(300).tolist():
                router.assign(f"u{i}", {}, [KEY], log_exposure=True)

        threads = [threading.Thread(target=expose, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        live = router.live[KEY]
        assert router.get(KEY)[1] == 300 and live.counts is not None and live.counts.pending == {}
        expected = [
            sum(1 for i in range(300) if router.assign(f"u{i}", {}, [KEY])[0][0].arm_index == a) for a in (0, 1)
        ]
        assert live.arm_counts(2) == expected
    finally:
        closing(router)


def test_the_bandit_rewards_are_the_default_modes_also_after_a_restart(
    tmp_path: Path, store_url: str, other_store_url: str
) -> None:
    spec = ExperimentSpec(
        key=KEY,
        arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)),
        metrics=("clicks",),
        mode=AllocationMode.BANDIT,
        bandit=BanditSpec(reward_metric="clicks", kind=RewardKind.BERNOULLI, min_rewards=1),
        sticky_bucketing=True,
    )
    default = Router(ABRouterSettings(), RouterStore(store_url, "NORMAL"))
    router = Router(bounded(), RouterStore(other_store_url, "NORMAL"))
    restarted: Router | None = None
    try:
        rng = np.random.default_rng(2)
        rewards = [Observation(f"u{i % 150}", "clicks", float(rng.random() < 0.3)) for i in range(400)]
        for r in (default, router):
            r.create(spec)
            for i in range(150):
                r.assign(f"u{i}", {}, [KEY], log_exposure=True)
            r.record_metrics(KEY, rewards)

        def rewards_of(r: Router) -> object:
            bandit = r.live[KEY].bandit
            assert bandit is not None
            return bandit.snapshot()

        assert rewards_of(router) == rewards_of(default)
        closing(router)
        restarted = Router(bounded(), RowlessStore(other_store_url, "NORMAL"))
        restarted.restore()
        assert rewards_of(restarted) == rewards_of(default)
    finally:
        closing(default, *([restarted] if restarted is not None else [router]))


def test_bounded_mode_without_an_exposure_table_is_a_config_error() -> None:
    env = {"GUARDMESH__ABROUTER__EXPOSURES_IN_MEMORY": "false", "GUARDMESH__ABROUTER__EXPORT_URL": '""'}
    with pytest.raises(ConfigError, match=r"abrouter\.exposures_in_memory = false needs abrouter\.export_url"):
        load_config(env=env)
    assert not load_config(env={**env, "GUARDMESH__ABROUTER__EXPORT_URL": '"exposures"'}).abrouter.exposures_in_memory
    with pytest.raises(ConfigError, match="needs the durable store"):
        Router(bounded())


def counters(r: Router) -> tuple[object, ...]:
    """Exposed units, per arm, and each metric's per-arm moments (sums rounded below float noise)."""
    live = r.live[KEY]
    moments = {
        m: [(x.count, round(x.total, 6), round(x.total_sq, 6)) for x in live.metrics[m].statistics.observed]
        for m in live.metrics
    }
    return r.get(KEY)[1], live.arm_counts(2), moments


def test_two_replicas_on_postgresql_agree_on_every_counter(postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.create_database()
    table = str(tmp_path / "table")
    a = with_tables(Router(bounded(), RouterStore(url, "NORMAL")), table)
    a.create(SPEC)
    b = with_tables(Router(bounded(), RouterStore(url, "NORMAL")), table)
    replicas = [a, b]
    third: Router | None = None
    try:
        for r in replicas:
            r.restore()
        rng = np.random.default_rng(9)
        for i in range(300):  # each unit exposed on one replica, some again on the other
            first = replicas[i % 2]
            first.assign(f"u{i}", {}, [KEY], log_exposure=True, timestamp=START + i)
            if i % 3 == 0:
                replicas[(i + 1) % 2].assign(f"u{i}", {}, [KEY], log_exposure=True, timestamp=START + i + 1)
            if i % 10 == 9:
                for r in replicas:
                    r.take_in_others()
                batch = [
                    Observation(f"u{int(j)}", m, float(rng.poisson(2)))
                    for j in rng.integers(0, i + 1, 20)
                    for m in ("clicks", "dwell")
                ]
                replicas[int(rng.integers(0, 2))].record_metrics(KEY, batch)
        for r in replicas:
            r.take_in_others()

        assert counters(a) == counters(b)
        assert counters(a)[0] == 300
        third = Router(bounded(), RowlessStore(url, "NORMAL"))
        third.restore()
        assert counters(third) == counters(a)
    finally:
        closing(a, b, *([third] if third is not None else []))


def test_a_bounded_server_answers_audits_and_analyses_as_a_default_one_over_grpc(tmp_path: Path) -> None:
    """Real servers (gRPC, SQLite, export to Parquet): AuditExperiment and AnalyzeExperiment without from_table read
    the table in bounded mode and answer as the default mode's in-memory path; GetExperiment and the guardrails
    agree."""
    answers = []
    for mode in ("default", "bounded"):
        overrides = {
            "services.abrouter.port": 0,
            "abrouter.export_url": str(tmp_path / mode / "table"),
            "abrouter.export_interval_s": 3600.0,
            "abrouter.exposures_in_memory": mode == "default",
            "abrouter.unit_cache_units": CAPACITY,
        }
        config = make_config(tmp_path / mode, **overrides)
        running = start_service(load_definition("abrouter"), config, port=0)
        try:
            with ABRouterClient(config, address=running.address) as client:
                client.create_experiment(
                    "rank",
                    {"control": 0.5, "new": 0.5},
                    metrics=["clicks", "dwell"],
                    metric_kinds={"dwell": "continuous"},
                )
                record(client, range(300), np.random.default_rng(3))
            with stub_of(running, config) as stub:
                audit = stub.AuditExperiment(pb.AuditExperimentRequest(key="rank", min_sample=50), timeout=300)
                audit.seconds = 0.0
                request = pb.AnalyzeExperimentRequest(key="rank", bootstrap_resamples=200, seed=5)
                analysis = stub.AnalyzeExperiment(request, timeout=300)
                experiment = stub.GetExperiment(pb.GetExperimentRequest(key="rank"), timeout=30)
                answers.append((audit, analysis, experiment))
        finally:
            running.stop(grace=0.5)
    (audit, analysis, experiment), (bounded_audit, bounded_analysis, bounded_experiment) = answers
    assert audit.exposures == 300 and len(analysis.metrics) == 2
    same_message(bounded_audit, audit, "audit")
    same_message(bounded_analysis, analysis, "analysis")
    assert bounded_experiment.experiment.exposed_units == experiment.experiment.exposed_units == 300


def test_two_replicas_exposing_the_same_units_at_once_count_each_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Both replicas expose the same 300 new units at the same time (each in its own order, tails running, so
    commits interleave and the tails see rows out of order) and record observations: each counts every unit
    once, and both end with the counters a restart reads from the store."""
    url = postgres_server.create_database()
    settings = bounded(guardrail_interval_s=3600.0, audit_interval_s=0.0, tail_interval_s=0.05)
    replicas = [Router(settings, RouterStore(url, "NORMAL")) for _ in range(2)]
    replicas[0].create(SPEC)
    third: Router | None = None
    try:
        for i, r in enumerate(replicas):
            r.restore()
            r.start(replica=f"replica-{i}")
        barrier = threading.Barrier(2)
        failures: list[BaseException] = []

        def drive(r: Router, seed: int) -> None:
            try:
                rng = np.random.default_rng(seed)
                barrier.wait()
                order = rng.permutation(300).tolist()
                for k, i in enumerate(order):
                    r.assign(f"u{i}", {}, [KEY], log_exposure=True)
                    if k % 10 == 9:
                        units = order[k - 9 : k + 1]
                        r.record_metrics(KEY, [Observation(f"u{j}", "clicks", float(j % 3)) for j in units])
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=drive, args=(r, seed)) for seed, r in enumerate(replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        third = Router(bounded(), RowlessStore(url, "NORMAL"))
        third.restore()
        stored = counters(third)
        assert stored[0] == 300
        for r in replicas:

            def caught_up(r: Router = r) -> bool:
                return counters(r) == stored

            wait_for("the replica's counters reach the store's", caught_up)
    finally:
        closing(*replicas, *([third] if third is not None else []))


def test_a_failed_look_up_of_a_new_unit_holds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store read that fails while an Assign checks whether its unit is new: UNAVAILABLE naming the read, and
    nothing held (no pending unit, no pending sticky arm); the next Assign of the unit counts it once."""
    spec = dataclasses.replace(SPEC, sticky_bucketing=True)
    router = Router(bounded(), RouterStore(tmp_path / "r.db", "NORMAL"))
    try:
        router.create(spec)
        assert router.store is not None
        real = router.store.first_exposures

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("look-up failed")

        monkeypatch.setattr(router.store, "first_exposures", failing)
        with pytest.raises(Unavailable, match="the first exposure of unit 'u1'"):
            router.assign("u1", {}, [KEY], log_exposure=True)
        live = router.live[KEY]
        assert live.counts is not None and live.counts.pending == {} and live.pending_sticky == {}
        monkeypatch.setattr(router.store, "first_exposures", real)
        for _ in range(2):
            router.assign("u1", {}, [KEY], log_exposure=True)
        assert router.get(KEY)[1] == 1 and sum(live.arm_counts(2)) == 1
    finally:
        closing(router)


def test_sticky_arms_are_kept_across_a_restart_that_reads_none(tmp_path: Path) -> None:
    """A sticky experiment's arms after a bounded restart (which reads no sticky row): looked up in the store, so
    every unit keeps its arm although new units all go to 'new' now; arms still cannot be added or removed."""
    spec = ExperimentSpec(key=KEY, arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), sticky_bucketing=True)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    router = Router(bounded(), RouterStore(url, "NORMAL"))
    restarted: Router | None = None
    try:
        router.create(spec)
        before = {f"u{i}": router.assign(f"u{i}", {}, [KEY])[0][0].arm_index for i in range(100)}
        assert set(before.values()) == {0, 1}
        router.update(dataclasses.replace(spec, arms=(ArmSpec("control", 0.0), ArmSpec("new", 1.0))))
        closing(router)
        restarted = Router(bounded(), RowlessStore(url, "NORMAL"))
        restarted.restore()
        assert len(restarted.live[KEY].sticky) == 0
        after = {unit: restarted.assign(unit, {}, [KEY])[0][0].arm_index for unit in before}
        assert after == before
        assert restarted.assign("newcomer", {}, [KEY])[0][0].arm_index == 1
        with pytest.raises(FailedPrecondition, match="arms can be reweighted, not added or removed"):
            three = (ArmSpec("control", 0.4), ArmSpec("new", 0.3), ArmSpec("third", 0.3))
            restarted.update(dataclasses.replace(spec, arms=three))
    finally:
        closing(restarted if restarted is not None else router)


def test_a_store_away_and_back_leaves_the_counters_as_the_store_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite locked by another connection: a logged Assign of a new unit and a RecordMetrics fail UNAVAILABLE and
    hold nothing (no pending unit, no pinned total); once the lock is gone the router reloads its counters from the
    store's aggregates and the same calls count once."""
    monkeypatch.setattr(durable, "SQLITE_BUSY_TIMEOUT_MS", 200)  # the lock below is met within 0.2 s, not 10
    path = tmp_path / "r.db"
    router = Router(bounded(), RouterStore(path, "NORMAL"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        router.create(SPEC)
        for i in range(50):
            router.assign(f"u{i}", {}, [KEY], log_exposure=True)
        router.record_metrics(KEY, [Observation(f"u{i}", "clicks", 1.0) for i in range(50)])
        before = counters(router)
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Unavailable, match="store away"):
            router.assign("new", {}, [KEY], log_exposure=True)
        live = router.live[KEY]
        assert live.counts is not None and live.counts.pending == {}
        assert not router._resume()  # still locked
        holder.execute("ROLLBACK")
        assert router._resume() and router.store_away_reason == ""
        assert counters(router) == before
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Unavailable, match="store away"):
            router.record_metrics(KEY, [Observation("u1", "clicks", 5.0), Observation("u2", "dwell", 2.0)])
        statistics = router.live[KEY].metrics["clicks"].statistics
        assert isinstance(statistics, CachedArmStatistics) and not statistics.units._pins
        holder.execute("ROLLBACK")
        assert router._resume() and counters(router) == before
        router.assign("new", {}, [KEY], log_exposure=True)
        router.record_metrics(KEY, [Observation("u1", "clicks", 5.0), Observation("new", "clicks", 1.0)])
        after = counters(router)
        assert after[0] == 51
        restarted = Router(bounded(), RowlessStore(path, "NORMAL"))
        restarted.restore()
        assert counters(restarted) == after
        closing(restarted)
    finally:
        holder.close()
        closing(router)


def test_a_new_unit_counted_while_another_assign_looks_it_up_is_counted_once(tmp_path: Path) -> None:
    """An Assign looks its new unit up in the store outside the router's lock; its answer ("no exposure yet") goes
    stale if another Assign of the unit counts it meanwhile and the cache then evicts it. The other Assigns run to
    the end while the read waits (the lock is free), and the unit is counted once, as a restart counts it (fails
    with the look-up under the lock, or without the re-check of the units counted since the read)."""
    router = Router(bounded(unit_cache_units=2), RouterStore(tmp_path / "r.db", "NORMAL"))
    restarted: Router | None = None
    try:
        router.create(SPEC)
        assert router.store is not None
        real = router.store.first_exposures
        read, go = threading.Event(), threading.Event()
        problems: list[str] = []

        def held_read(*args: Any, **kwargs: Any) -> Any:
            answer = real(*args, **kwargs)
            if threading.current_thread().name == "looker" and not read.is_set():
                read.set()
                if not go.wait(timeout=120):  # the lock stayed held: nothing else could run
                    problems.append("the other Assigns did not run while the look-up waited")
            return answer

        router.store.first_exposures = held_read  # type: ignore[method-assign]
        looker = threading.Thread(
            target=lambda: router.assign("u", {}, [KEY], log_exposure=True), name="looker", daemon=True
        )
        looker.start()
        assert read.wait(timeout=120)
        router.assign("u", {}, [KEY], log_exposure=True)  # counts "u" (the looker's read said "none")
        for unit in ("a", "b", "c"):  # ... and the cache (2 units) evicts it
            router.assign(unit, {}, [KEY], log_exposure=True)
        assert not problems, problems
        live = router.live[KEY]
        assert live.counts is not None and "u" not in live.counts.first and "u" in live.looking
        go.set()
        looker.join(timeout=120)
        assert not looker.is_alive() and not problems, problems
        assert router.get(KEY)[1] == 4
        assert live.counts.pending == {} and live.looking == {} and live.counted_while_looking == {}
        restarted = Router(bounded(), RowlessStore(tmp_path / "r.db", "NORMAL"))
        restarted.restore()
        assert counters(restarted) == counters(router)
    finally:
        closing(router, *([restarted] if restarted is not None else []))


def test_a_refused_assign_leaves_no_unit_marked_as_looked_up(tmp_path: Path) -> None:
    """A logged Assign of two experiments whose second hashes on an attribute the request lacks: INVALID_ARGUMENT
    naming it, and no unit of the first left marked as being looked up (nor pending); the unit then counts once."""
    router = Router(bounded(), RouterStore(tmp_path / "r.db", "NORMAL"))
    try:
        router.create(SPEC)
        router.create(dataclasses.replace(SPEC, key="by-team", hash_attribute="team"))
        with pytest.raises(InvalidArgument, match=r"attributes\.team"):
            router.assign("u1", {}, [KEY, "by-team"], log_exposure=True)
        live = router.live[KEY]
        assert live.looking == {} and live.counted_while_looking == {}
        assert live.counts is not None and live.counts.pending == {}
        router.assign("u1", {"team": "t1"}, [KEY, "by-team"], log_exposure=True)
        assert router.get(KEY)[1] == 1 and router.get("by-team")[1] == 1 and router.live["by-team"].looking == {}
    finally:
        closing(router)


def test_one_query_looks_up_the_new_units_of_every_experiment_of_an_assign(store_url: str) -> None:
    """The store's batched look-up (one query for an Assign's experiments) answers as one look-up per unit: the
    first of a unit's exposures among the rows held, none for a unit never exposed; and a logged Assign of three
    experiments, one unit new in two of them and known in the third, counts it once in each."""
    store = RouterStore(store_url, "NORMAL")
    router = Router(bounded(), store)
    try:
        keys = [KEY, "second", "third"]
        for key in keys:
            router.create(dataclasses.replace(SPEC, key=key))
        router.assign("old", {}, keys, log_exposure=True)
        router.assign("old", {}, [KEY], log_exposure=True)
        router.assign("once", {}, ["second"], log_exposure=True)
        pairs = [(k, u) for k in keys for u in ("old", "once", "never")]
        expected = {p: first for p in pairs if (first := store.first_exposure(*p)) is not None}
        assert store.first_exposures(pairs) == expected and len(expected) == 4
        router.assign("once", {}, keys, log_exposure=True)
        assert [router.get(k)[1] for k in keys] == [2, 2, 2]
        assert all(router.live[k].looking == {} for k in keys)
    finally:
        closing(router)


def held_store_read(router: Router, thread: str) -> tuple[threading.Event, threading.Event, list[str]]:
    """Make the store's reads of observation totals (batched or per unit) wait, after reading, when called from the
    thread named ``thread`` (the first one only): the events (read: it has read; go: let it return) and the
    problems seen."""
    assert router.store is not None
    read, go = threading.Event(), threading.Event()
    problems: list[str] = []

    def holding(method: str) -> None:
        real = getattr(router.store, method)

        def held(*args: Any, **kwargs: Any) -> Any:
            answer = real(*args, **kwargs)
            if threading.current_thread().name == thread and not read.is_set():
                read.set()
                if not go.wait(timeout=60):  # the lock stayed held: nothing else could run
                    problems.append(f"nothing else ran while {method} waited")
            return answer

        setattr(router.store, method, held)

    holding("units_observations")
    holding("unit_observations")
    return read, go, problems


def test_record_metrics_reads_evicted_units_without_the_lock(tmp_path: Path) -> None:
    """RecordMetrics of units the caches evicted long ago (the usual case at warehouse scale) reads their first
    exposures and running totals from the store before taking the router's lock: Assign (new units and known ones)
    and another RecordMetrics run to the end while its read waits (fails with the reads under the lock). The
    per-arm moments are then those of a router that never evicted anything, and of a restart."""
    router = Router(bounded(unit_cache_units=4), RouterStore(tmp_path / "r.db", "NORMAL"))
    default = Router(ABRouterSettings(audit_min_sample=50), RouterStore(tmp_path / "d.db", "NORMAL"))
    restarted: Router | None = None
    try:
        early = [Observation(f"u{i}", "clicks", float(i % 3)) for i in range(30)]
        early += [Observation(f"u{i}", "dwell", 1.5 * i) for i in range(0, 30, 2)]
        for r in (router, default):
            r.create(SPEC)
            for i in range(40):
                r.assign(f"u{i}", {}, [KEY], log_exposure=True)
            r.record_metrics(KEY, early)
        read, go, problems = held_store_read(router, "recorder")
        late = [Observation(f"u{i}", "clicks", 2.0) for i in range(0, 30, 3)]
        late += [Observation(f"u{i}", "dwell", 0.25 * i) for i in range(1, 30, 4)]
        done: list[int] = []
        recorder = threading.Thread(
            target=lambda: done.append(router.record_metrics(KEY, late)), name="recorder", daemon=True
        )
        recorder.start()
        assert read.wait(timeout=120)
        others = [Observation("u35", "clicks", 4.0)]
        for r in (router, default):
            r.assign("new", {}, [KEY], log_exposure=True)  # the lock is free while the read waits
            r.assign("u39", {}, [KEY], log_exposure=True)
            r.record_metrics(KEY, others)
        go.set()
        recorder.join(timeout=120)
        assert not recorder.is_alive() and not problems and done == [len(late)], problems
        default.record_metrics(KEY, late)
        live = router.live[KEY]
        assert live.reading == {} and live.observed_while_reading == set()
        assert counters(router) == counters(default)
        restarted = Router(bounded(), RowlessStore(tmp_path / "r.db", "NORMAL"))
        restarted.restore()
        assert counters(restarted) == counters(router)
    finally:
        closing(router, default, *([restarted] if restarted is not None else []))


def test_an_observation_taken_in_while_record_metrics_reads_makes_it_read_again(tmp_path: Path) -> None:
    """RecordMetrics' read of a unit's running totals before the lock goes stale if another call observes the unit
    meanwhile and the cache then evicts it: the first call reads that unit again under the lock, so each
    observation is in the moments once, as a restart sums them (fails without the re-read: the unit's totals
    would miss the other call's observation and its next sum of squares would be wrong)."""
    router = Router(bounded(unit_cache_units=2), RouterStore(tmp_path / "r.db", "NORMAL"))
    restarted: Router | None = None
    try:
        router.create(SPEC)
        for unit in ("u", "a", "b", "c"):
            router.assign(unit, {}, [KEY], log_exposure=True)
        router.record_metrics(KEY, [Observation("u", "dwell", 3.0)])
        for unit in ("a", "b", "c"):  # the dwell cache (2 units) evicts "u"
            router.record_metrics(KEY, [Observation(unit, "dwell", 1.0)])
        read, go, problems = held_store_read(router, "recorder")
        recorder = threading.Thread(
            target=lambda: router.record_metrics(KEY, [Observation("u", "dwell", 5.0)]), name="recorder", daemon=True
        )
        recorder.start()
        assert read.wait(timeout=120)  # it read "u": (3.0, 1)
        router.record_metrics(KEY, [Observation("u", "dwell", 7.0)])  # "u" now (10.0, 2) ...
        for unit in ("a", "b"):  # ... and evicted again
            router.record_metrics(KEY, [Observation(unit, "dwell", 1.0)])
        live = router.live[KEY]
        statistics = live.metrics["dwell"].statistics
        assert isinstance(statistics, CachedArmStatistics) and statistics.units.get("u") is None
        assert live.observed_while_reading == {("u", "dwell")}
        go.set()
        recorder.join(timeout=120)
        assert not recorder.is_alive() and not problems, problems
        assert statistics.units.get("u") == (15.0, 3)
        assert live.reading == {} and live.observed_while_reading == set()
        restarted = Router(bounded(), RowlessStore(tmp_path / "r.db", "NORMAL"))
        restarted.restore()
        assert counters(restarted) == counters(router)
    finally:
        closing(router, *([restarted] if restarted is not None else []))


def test_a_failed_read_before_record_metrics_marks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store read that fails while RecordMetrics reads its evicted units: UNAVAILABLE naming the read, nothing
    stored, no pair left marked; a refused call (a metric the experiment lacks) is refused naming the field before
    any read; the call then succeeds once the store answers."""
    router = Router(bounded(unit_cache_units=2), RouterStore(tmp_path / "r.db", "NORMAL"))
    try:
        router.create(SPEC)
        for unit in ("u", "a", "b", "c"):
            router.assign(unit, {}, [KEY], log_exposure=True)
        assert router.store is not None
        real = router.store.units_observations

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("read failed")

        monkeypatch.setattr(router.store, "units_observations", failing)
        with pytest.raises(Unavailable, match="the exposures and observations of 1 units"):
            router.record_metrics(KEY, [Observation("u", "dwell", 3.0)])
        with pytest.raises(InvalidArgument, match=r"observations\[1\]\.metric"):
            router.record_metrics(KEY, [Observation("u", "dwell", 3.0), Observation("u", "nope", 1.0)])
        live = router.live[KEY]
        assert live.reading == {} and live.observed_while_reading == set()
        monkeypatch.setattr(router.store, "units_observations", real)
        assert router.record_metrics(KEY, [Observation("u", "dwell", 3.0)]) == 1
        statistics = live.metrics["dwell"].statistics
        assert isinstance(statistics, CachedArmStatistics) and statistics.units.get("u") == (3.0, 1)
    finally:
        closing(router)


def test_the_batched_look_ups_answer_as_one_per_unit(store_url: str) -> None:
    """The store's batched reads for RecordMetrics (first exposures of many units, running totals of many unit x
    metric pairs, more units than one query names) answer as the per-unit reads: the first exposure among the rows
    held, none for a unit never exposed; (sum, number) without pre-period values, (0, 0) for a pair never
    observed."""
    store = RouterStore(store_url, "NORMAL")
    router = Router(bounded(), store)
    try:
        router.create(SPEC)
        units = [f"u{i}" for i in range(1200)]
        for unit in units[:700]:
            router.assign(unit, {}, [KEY], log_exposure=True)
        router.assign("u3", {}, [KEY], log_exposure=True)  # a repeat: the first stays
        router.record_metrics(KEY, [Observation(u, "clicks", float(i % 5)) for i, u in enumerate(units[:650])])
        router.record_metrics(KEY, [Observation("u3", "clicks", 2.0), Observation("u3", "dwell", 0.5)])
        router.record_metrics(KEY, [Observation("u4", "clicks", 9.0, pre_period=True)])
        asked = [*units, "never"]
        firsts = store.units_first_exposures(KEY, asked)
        assert firsts == {u: f for u in asked if (f := store.first_exposure(KEY, u)) is not None}
        assert len(firsts) == 700
        pairs = [(u, m) for u in asked[::7] for m in ("clicks", "dwell")]
        assert store.units_observations(KEY, pairs) == {p: store.unit_observations(KEY, *p) for p in pairs}
        assert store.units_observations(KEY, [("u3", "clicks"), ("u4", "clicks")]) == {
            ("u3", "clicks"): (5.0, 2),
            ("u4", "clicks"): (4.0, 1),
        }
    finally:
        closing(router)
