"""abrouter replicas on one store (issue #16 item 2), on both backends where the behaviour is the store's:

* two router cores on one store (SQLite file or a real PostgreSQL database from tests/postgres.py): a change
  made through either (create, update weights, stop) is taken in by the other, a change judged against the
  newest stored version, and a sticky unit gets the same arm on both after the weights moved;
* the config watcher: on PostgreSQL a change reaches the other replica by NOTIFY (the resync interval is set
  far beyond the test's wait, so polling cannot be what delivers it); on SQLite by polling the versions;
* kill -9 of a real router process during a logged-Assign run: every acknowledged exposure is in the store;
* an old SQLite file (schema before versions, events numbered by the router) is adopted with its events;
* two real router processes on PostgreSQL: an experiment created on one is served by the other, a sticky
  unit agrees across them, and the periodic checks run on one replica only (the monitor lease).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.errors import FailedPrecondition, Unavailable
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from services.abrouter.experiments import ArmSpec, ExperimentSpec, ExperimentState
from services.abrouter.router import Observation, Router
from services.abrouter.store import MIGRATIONS, SCHEMA, ExposureRow, ObservationRow, RouterStore, Tail
from tests.postgres import PostgresServer
from tests.processes import ServiceProcess

WAIT_S = 30.0  # generous: the machine is shared; what is checked is that it happens, not how fast


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)


def two_cores(url: str, **settings: float) -> tuple[Router, Router]:
    """Two router cores, each with its own connection(s) to the store at ``url``, as two replicas."""
    config = ABRouterSettings(guardrail_interval_s=3600, audit_interval_s=0, **settings)  # type: ignore[arg-type]
    return (
        Router(config, RouterStore(url, "NORMAL", shared=True)),
        Router(config, RouterStore(url, "NORMAL", shared=True)),
    )


def close(*routers: Router) -> None:
    for r in routers:
        r.close()
        assert r.store is not None
        r.store.close()


SPEC = ExperimentSpec(key="shared", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), sticky_bucketing=True)


def test_a_change_through_either_core_is_taken_in_by_the_other(store_url: str) -> None:
    a, b = two_cores(store_url)
    try:
        a.create(SPEC)
        assert b.sync_config() == ["shared"]
        assert b.get("shared")[0].version == 1
        with pytest.raises(Exception, match="already exists"):
            b.create(SPEC)
        # b moves the weights; a, which has not heard of it, stops judging against the stored version 2
        moved = b.update(replace(SPEC, arms=(ArmSpec("control", 0.1), ArmSpec("new", 0.9))), expected_version=1)
        assert moved.version == 2
        with pytest.raises(FailedPrecondition, match="at version 2, not 1"):
            a.update(SPEC, expected_version=1)
        stopped = a.stop("shared", "done")
        assert stopped.version == 3 and stopped.state is ExperimentState.STOPPED
        assert b.sync_config() == ["shared"]
        exp = b.get("shared")[0]
        assert (exp.version, exp.state, exp.weights) == (3, ExperimentState.STOPPED, (0.1, 0.9))
        assert [v for v, *_ in a.history("shared")] == [1, 2, 3]
    finally:
        close(a, b)


def test_a_sticky_unit_gets_one_arm_on_every_core(store_url: str) -> None:
    a, b = two_cores(store_url)
    try:
        a.create(SPEC)
        units = [f"u{i}" for i in range(200)]
        first = {u: a.assign(u, {}, ["shared"], log_exposure=True)[0][0].arm_index for u in units}
        # all traffic to one arm: without the stored sticky arms, b would put every unit in 'new'
        a.update(replace(SPEC, arms=(ArmSpec("control", 0.0), ArmSpec("new", 1.0))))
        b.sync_config()
        assert b.get("shared")[0].weights == (0.0, 1.0)
        on_b = {u: b.assign(u, {}, ["shared"])[0][0].arm_index for u in units}
        assert on_b == first and 0 in set(first.values())
        # a unit first seen by b after the change goes to 'new' on both
        assert b.assign("late", {}, ["shared"], log_exposure=True)[0][0].arm_index == 1
        assert a.assign("late", {}, ["shared"])[0][0].arm_index == 1
    finally:
        close(a, b)


def test_the_watcher_takes_in_a_change_by_itself(store_url: str) -> None:
    # On PostgreSQL the resync is an hour away: only the NOTIFY can bring the change within the wait.
    a, b = two_cores(store_url, config_resync_s=3600)
    a.start("a")
    b.start("b")
    try:
        a.create(SPEC)
        wait_for("b serves the experiment created on a", lambda: "shared" in b.live)
        a.update(replace(SPEC, arms=(ArmSpec("control", 0.3), ArmSpec("new", 0.7))))
        wait_for("b serves a's new weights", lambda: b.get("shared")[0].weights == (0.3, 0.7))
        b.stop("shared", "enough")
        wait_for("a serves b's stop", lambda: a.get("shared")[0].state is ExperimentState.STOPPED)
    finally:
        close(a, b)


def router_process(tmp_path: Path, name: str, store_url: str, **env: str) -> ServiceProcess:
    return ServiceProcess(
        "abrouter",
        tmp_path / name,
        {
            "GUARDMESH__ABROUTER__STORE_URL": store_url,
            "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
            "GUARDMESH__GRPC__GRACE_S": "2",
            **env,
        },
    )


def stub_of(proc: ServiceProcess) -> pb_grpc.ABRouterServiceStub:
    return pb_grpc.ABRouterServiceStub(proc.channel())


def pb_spec(key: str, weights: tuple[float, float] = (0.5, 0.5)) -> pb.ExperimentSpec:
    arms = [pb.Arm(name="control", weight=weights[0]), pb.Arm(name="new", weight=weights[1])]
    return pb.ExperimentSpec(key=key, arms=arms, sticky_bucketing=True)


def test_kill9_during_logged_assigns_loses_no_acknowledged_exposure(tmp_path: Path, store_url: str) -> None:
    proc = router_process(tmp_path, "r", store_url)
    acknowledged: list[str] = []
    try:
        proc.start()
        stub = stub_of(proc)
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=pb_spec("k")))
        stop = threading.Event()

        def hammer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                unit = f"w{worker}-{i}"
                try:
                    resp = stub.Assign(pb.AssignRequest(unit_id=unit, experiment_keys=["k"], log_exposure=True))
                except grpc.RpcError:
                    return  # the process is gone: this call was never acknowledged
                assert resp.assignments[0].exposure_logged
                acknowledged.append(unit)
                i += 1

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        wait_for("200 acknowledged exposures", lambda: len(acknowledged) >= 200)
        proc.kill9()
        stop.set()
        for t in threads:
            t.join()
    finally:
        proc.close()
    store = RouterStore(store_url)
    try:
        stored = {row.unit for row in store.load_exposures() if row.key == "k"}
        sticky = {unit for key, unit, _ in store.load_sticky() if key == "k"}
    finally:
        store.close()
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged exposures lost, e.g. {sorted(missing)[:5]}"
    assert set(acknowledged) <= sticky


def test_an_old_sqlite_file_is_adopted_with_its_events(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO events (seq, kind, key, at, message) VALUES (7, 'config_changed', 'k', 1.0, 'old')")
    db.commit()
    db.close()
    store = RouterStore(path)
    try:
        assert store.log.schema_version == MIGRATIONS[-1].version  # every migration applied
        assert store.load_events(10) == [(7, "config_changed", "k", 1.0, "old")]
        assert store.max_event_seq() == 7
    finally:
        store.close()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@contextmanager
def running_pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two router processes on ``pg_url``: config by NOTIFY only (resync an hour away), monitor every 0.2 s."""
    env = {"GUARDMESH__ABROUTER__CONFIG_RESYNC_S": "3600", "GUARDMESH__ABROUTER__GUARDRAIL_INTERVAL_S": "0.2"}
    a = router_process(tmp_path, "a", pg_url, **env)
    b = router_process(tmp_path, "b", pg_url, **env)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        for proc in (a, b):
            if proc.proc is not None and proc.proc.poll() is None:
                os.kill(proc.proc.pid, signal.SIGCONT)  # a test that failed while it was paused
            proc.close()


@pytest.fixture
def two_processes(tmp_path: Path, pg_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    with running_pair(tmp_path, pg_url) as pair:
        yield pair


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_two_processes_serve_one_config_and_agree_on_sticky_arms(
    two_processes: tuple[ServiceProcess, ServiceProcess], pg_url: str
) -> None:
    a, b = (stub_of(p) for p in two_processes)
    a.CreateExperiment(pb.CreateExperimentRequest(spec=pb_spec("shared")))

    def served_by_b() -> bool:
        try:
            return b.GetExperiment(pb.GetExperimentRequest(key="shared")).experiment.version == 1
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return False

    wait_for("b serves the experiment created on a (NOTIFY; resync an hour away)", served_by_b)
    units = [f"u{i}" for i in range(100)]
    first = {
        u: a.Assign(pb.AssignRequest(unit_id=u, experiment_keys=["shared"], log_exposure=True)).assignments[0].arm
        for u in units
    }
    b.UpdateExperiment(pb.UpdateExperimentRequest(spec=pb_spec("shared", (0.0, 1.0)), expected_version=1))
    wait_for(
        "a serves b's weights",
        lambda: list(a.GetExperiment(pb.GetExperimentRequest(key="shared")).experiment.weights) == [0.0, 1.0],
    )
    on_b = {u: b.Assign(pb.AssignRequest(unit_id=u, experiment_keys=["shared"])).assignments[0].arm for u in units}
    assert on_b == first and "control" in set(first.values())
    # one replica holds the monitor lease; the other runs no periodic checks
    store = RouterStore(pg_url)
    try:
        wait_for("a monitor lease holder", lambda: bool(store.log.query("SELECT holder FROM leases")))
        rows = store.log.query("SELECT holder, epoch FROM leases WHERE name = 'abrouter-monitor'")
        assert len(rows) == 1 and rows[0][0] and rows[0][1] >= 1
    finally:
        store.close()


def test_tail_waits_for_a_hole_then_passes_it() -> None:
    tail = Tail(0, gap_timeout_s=30)
    assert tail.take([1, 2, 4], now=0.0) == [1, 2, 4]
    assert tail.low == 2  # 3 may still be committing
    assert tail.take([4], now=1.0) == []  # 4 again (above low): not taken twice
    assert tail.take([3, 4, 5], now=2.0) == [3, 5] and tail.low == 5
    assert tail.take([7], now=3.0) == [7] and tail.low == 5
    assert tail.take([7], now=20.0) == [] and tail.low == 5
    assert tail.take([7], now=40.0) == [] and tail.low == 7  # 6 rolled back: passed after the timeout


def test_the_tail_reads_other_writers_rows_and_only_the_numbers_of_its_own(store_url: str) -> None:
    """A replica's tail gets every row number (its low-water mark must pass its own rows too) but the columns
    only of rows other writers logged: it holds its own in memory already."""
    store = RouterStore(store_url, "NORMAL", shared=True)
    try:
        rows = [
            ExposureRow("shared", f"u{i}", i % 2, 0.5, 0.5, 100.0 + i, 1, {"x": 1.5}, {"d": "ios"}) for i in range(4)
        ]
        for i, row in enumerate(rows):
            store.submit([RouterStore.exposures([row], "mine" if i % 2 else "theirs")]).wait("exposures")
        observed = [ObservationRow("shared", f"u{i}", "m", float(i), 200.0, False) for i in range(3)]
        store.submit(
            [RouterStore.observations(observed[:2], "theirs"), RouterStore.observations(observed[2:], "mine")]
        ).wait("observations")
        tail = store.others_exposures_after(0, "mine")
        assert [n for n, _ in tail] == [1, 2, 3, 4]
        assert [row for _, row in tail] == [rows[0], None, rows[2], None]
        assert store.others_exposures_after(2, "mine") == [(3, rows[2]), (4, None)]
        assert store.others_observations_after(0, "mine") == [(1, observed[0]), (2, observed[1]), (3, None)]
    finally:
        store.close()


def test_an_srm_alert_raised_by_one_replica_is_not_raised_again_by_another(store_url: str) -> None:
    """The once-per-weighting SRM alert holds across replicas and process lives: a replica whose memory has
    not seen it (another monitor-lease holder, a restart) asks the store first; new weights re-arm it."""
    a, b = two_cores(store_url, audit_min_sample=1000)
    for r in (a, b):
        r.restore()
    try:
        a.create(replace(SPEC, key="leaky", sticky_bucketing=False))
        b.sync_config()
        counter = iter(range(10**9))

        def log_leaky(n: int) -> None:
            logged = 0
            while logged < n:
                unit = f"u{next(counter)}"
                if a.assign(unit, {}, ["leaky"])[0][0].arm_index == 0 or next(counter) % 5 != 0:
                    a.assign(unit, {}, ["leaky"], log_exposure=True)  # a fifth of the new arm's lost
                    logged += 1

        def stored_alerts() -> int:
            assert a.store is not None
            return int(a.store.query("SELECT COUNT(*) FROM events WHERE kind = 'srm_alert'")[0][0])

        log_leaky(3000)
        a.audit_running()
        assert a.last_audits["leaky"].srm.alert and stored_alerts() == 1
        b.take_in_others()
        b.audit_running()  # b sees the same mismatch; its memory has no alert, the store has
        assert b.last_audits["leaky"].srm.alert
        assert stored_alerts() == 1
        assert not [e for e in b.list_events("leaky") if e.kind == "srm_alert"]
        b.update(
            replace(SPEC, key="leaky", sticky_bucketing=False, arms=(ArmSpec("control", 0.6), ArmSpec("new", 0.4)))
        )
        a.sync_config()
        log_leaky(3000)
        b.take_in_others()
        b.audit_running()  # new weights, still leaking: a new alert, once
        a.audit_running()
        assert stored_alerts() == 2
    finally:
        close(a, b)


def test_every_core_sees_every_replicas_exposures_and_observations(store_url: str) -> None:
    a, b = two_cores(store_url)
    for r in (a, b):
        r.restore()
    try:
        a.create(replace(SPEC, metrics=("m",)))
        b.sync_config()
        on_a = [f"a{i}" for i in range(300)]
        on_b = [f"b{i}" for i in range(200)]
        for u in on_a:
            a.assign(u, {}, ["shared"], log_exposure=True)
        for u in on_b:
            b.assign(u, {}, ["shared"], log_exposure=True)
        # b takes in a unit exposed on a on demand: an observation of it sent to b is accepted
        assert b.record_metrics("shared", [Observation("a0", "m", 1.0)]) == 1
        assert a.record_metrics("shared", [Observation("b0", "m", 2.0)]) == 1
        for r in (a, b):
            r.take_in_others()
        for r in (a, b):
            assert r.get("shared")[1] == 500
            assert r.audit("shared", min_sample=1).exposures == 500
        audit_a, audit_b = a.audit("shared", min_sample=1), b.audit("shared", min_sample=1)
        assert audit_a.srm == audit_b.srm and audit_a.uniformity == audit_b.uniformity
        # every observation counted once in each replica's per-arm statistics
        for r in (a, b):
            live = r.live["shared"]
            stats = live.metrics["m"].statistics
            assert sum(stats.observed[arm].count for arm in range(2)) == 2
            assert sum(stats.observed[arm].total for arm in range(2)) == pytest.approx(3.0)
    finally:
        close(a, b)


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_a_guardrail_rollback_is_decided_once_across_two_processes(
    two_processes: tuple[ServiceProcess, ServiceProcess], pg_url: str
) -> None:
    a, b = (stub_of(p) for p in two_processes)
    guard = pb.Guardrail(metric="conversion", higher_is_better=True, max_relative_drop=0.05, min_units=200)
    spec = pb_spec("risky")
    spec.metrics.append("conversion")
    spec.guardrails.append(guard)
    a.CreateExperiment(pb.CreateExperimentRequest(spec=spec))

    def served(stub: pb_grpc.ABRouterServiceStub) -> bool:
        try:
            return stub.GetExperiment(pb.GetExperimentRequest(key="risky")).experiment.version >= 1
        except grpc.RpcError:
            return False

    wait_for("b serves 'risky'", lambda: served(b))
    # exposures through both replicas (no outcome yet: nothing to trip on), then each unit's outcome sent to the
    # OTHER replica
    arms = {}
    for i in range(1200):
        via = a if i % 2 else b
        resp = via.Assign(pb.AssignRequest(unit_id=f"user-{i}", experiment_keys=["risky"], log_exposure=True))
        assert resp.assignments[0].exposure_logged
        arms[i] = resp.assignments[0].arm_index
    for i in range(1200):
        other = b if i % 2 else a
        converted = (i % 10) < (3 if arms[i] == 0 else 1)  # 30 % vs 10 %
        other.RecordMetrics(
            pb.RecordMetricsRequest(
                experiment_key="risky",
                observations=[pb.MetricObservation(unit_id=f"user-{i}", metric="conversion", value=float(converted))],
            )
        )

    def rolled_back(stub: pb_grpc.ABRouterServiceStub) -> bool:
        return stub.GetExperiment(pb.GetExperimentRequest(key="risky")).experiment.state == (
            pb.EXPERIMENT_STATE_ROLLED_BACK
        )

    wait_for("a serves the rollback", lambda: rolled_back(a))
    wait_for("b serves the rollback", lambda: rolled_back(b))
    for stub in (a, b):
        assert stub.GetExperiment(pb.GetExperimentRequest(key="risky")).experiment.exposed_units == 1200
        assert stub.AuditExperiment(pb.AuditExperimentRequest(key="risky")).exposures == 1200
    time.sleep(1.0)  # several more monitor rounds (interval 0.2 s): a second decision would land now
    store = RouterStore(pg_url)
    try:
        tripped = store.log.query("SELECT COUNT(*) FROM events WHERE kind = 'guardrail_tripped' AND key = 'risky'")
        revisions = store.log.query("SELECT change FROM revisions WHERE key = 'risky' ORDER BY version")
    finally:
        store.close()
    assert tripped[0][0] == 1
    assert [c for (c,) in revisions] == ["created", "rolled_back"]


def test_make_up_with_replicas_runs_n_routers_on_their_own_database(tmp_path: Path) -> None:
    from guardmesh.mesh import instances
    from tests.conftest import make_config

    config = make_config(tmp_path)
    url = "postgresql://postgres@127.0.0.1:55432/guardmesh_scheduler"
    routers = [(name, env) for service, name, env in instances(config, 2, url) if service == "abrouter"]
    port = config.services["abrouter"].port
    assert [name for name, _ in routers] == ["abrouter-0", "abrouter-1"]
    assert [env["GUARDMESH__SERVICES__ABROUTER__PORT"] for _, env in routers] == [str(port), str(port + 100)]
    assert {env["GUARDMESH__ABROUTER__STORE_URL"] for _, env in routers} == {
        "postgresql://postgres@127.0.0.1:55432/guardmesh_abrouter"
    }
    assert all(env["GUARDMESH__SECURITY__CLIENT_ROLE"] == "app" for _, env in routers)
    # plain `make up`: one router, its SQLite file
    assert [(s, n) for s, n, _ in instances(config) if s == "abrouter"] == [("abrouter", "abrouter")]


def test_a_store_that_cannot_answer_a_read_is_unavailable_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_cores(f"sqlite:///{tmp_path / 's.db'}")
    try:
        a.create(SPEC)
        b.sync_config()
        assert b.store is not None

        def broken(*_: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(b.store, "sticky_arm", broken)
        monkeypatch.setattr(b.store, "load_experiment", broken)
        with pytest.raises(Unavailable, match=r"sticky arm of unit 'u1'.*disk I/O error"):
            b.assign("u1", {}, ["shared"], log_exposure=True)
        with pytest.raises(Unavailable, match="stored version"):
            b.update(replace(SPEC, arms=(ArmSpec("control", 0.2), ArmSpec("new", 0.8))))
        live = b.live["shared"]
        assert len(live.table) == 0 and live.pending_sticky == {} and live.experiment.version == 1
        assert b.store.log.query("SELECT COUNT(*) FROM exposures")[0][0] == 0
    finally:
        close(a, b)
