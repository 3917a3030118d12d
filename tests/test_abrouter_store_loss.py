"""The abrouter's store lost at run time (issue #16): health NOT_SERVING and UNAVAILABLE naming the store (never
the password), nothing acknowledged that did not commit, memory consistent with the store, and service resumes
by itself when the store is back. A write refused for a real reason (a constraint) still stops the router:
tests/test_abrouter_failstop.py.

* which failures mean "the store is away" (:func:`services.abrouter.router.store_away`), on real errors of both
  backends: a refused connection, a server shut down, a pool timeout and a file locked by another process count;
  a constraint or a bad statement does not;
* two real router processes on a real PostgreSQL server of this module's own (stopping the session's shared
  server would cut the other tests' databases): logged Assigns under load, the server stopped, both replicas
  NOT_SERVING and every call UNAVAILABLE (a live exposure stream ends UNAVAILABLE), the server started, both
  SERVING again without a restart, every acknowledged exposure in the store and in both replicas' memory, a
  change through either replica served by the other again;
* SQLite: a real router process whose file another connection holds locked (``BEGIN EXCLUSIVE``, as a backup
  tool or a second writer would) past the busy timeout: the same behaviour. An unwritable file is not used: the
  tests run as root, whom file modes do not stop, so it would test nothing;
* one core: what a config write, an Assign and a create refused while the store is away leave in memory at that
  moment (nothing), before any reload; a guardrail rollback that cannot be written is put back and decided
  again once the store is back; a write that failed before a resume does not mark the store away again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg_pool import ConnectionPool, PoolTimeout

from guardmesh import durable
from guardmesh.config import ABRouterSettings
from guardmesh.durable import StoreFailure
from guardmesh.errors import Unavailable
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from services.abrouter.experiments import ArmSpec, ExperimentSpec, ExperimentState
from services.abrouter.guardrails import Guardrail
from services.abrouter.router import Observation, Router, store_away
from services.abrouter.store import RouterStore
from tests import test_abrouter_replicas as replicas
from tests.postgres import PostgresServer
from tests.processes import ServiceProcess, assert_exits_on_unreachable_store, free_port
from tests.test_abrouter_replicas import pb_spec

WAIT_S = 90.0  # generous: the machine is shared; what is checked is that it happens, not how fast
PASSWORD = "hunter2-secret"  # the test server trusts every local connection: the password is only carried


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Poll ``check`` until true; fail naming ``what`` after :data:`WAIT_S`."""
    replicas.wait_for(what, check, WAIT_S)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for this module alone: its tests stop and start it."""
    server = PostgresServer()
    yield server
    server.close()


def router_process(tmp_path: Path, name: str, store_url: str) -> ServiceProcess:
    """A router process that looks at the store every second (so an idle replica finds it away)."""
    return replicas.router_process(tmp_path, name, store_url, GUARDMESH__ABROUTER__CONFIG_RESYNC_S="1")


def weights_of(stub: pb_grpc.ABRouterServiceStub, key: str) -> list[float]:
    try:
        return list(stub.GetExperiment(pb.GetExperimentRequest(key=key), timeout=10).experiment.weights)
    except grpc.RpcError:
        return []


def exposed_units(stub: pb_grpc.ABRouterServiceStub, key: str) -> int:
    try:
        return int(stub.GetExperiment(pb.GetExperimentRequest(key=key), timeout=10).experiment.exposed_units)
    except grpc.RpcError:
        return -1


class Hammer:
    """Threads sending logged Assigns of fresh units; which were acknowledged, and which answered an error."""

    def __init__(self, stub: pb_grpc.ABRouterServiceStub, key: str, threads: int = 4) -> None:
        self.stub, self.key = stub, key
        self.acknowledged: list[str] = []
        self.refused: dict[str, grpc.StatusCode] = {}
        self.details: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            unit = f"w{worker}-{i}"
            i += 1
            try:
                resp = self.stub.Assign(
                    pb.AssignRequest(unit_id=unit, experiment_keys=[self.key], log_exposure=True), timeout=60
                )
            except grpc.RpcError as err:
                self.refused[unit] = err.code()
                self.details.append(err.details() or "")
                time.sleep(0.05)
                continue
            assert resp.assignments[0].exposure_logged
            self.acknowledged.append(unit)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def stored_units(url: str, key: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [u for (u,) in conn.execute("SELECT unit FROM exposures WHERE key = %s", (key,))]


# -- which failures mean the store is away -------------------------------------------------------------------------


def test_store_away_on_real_postgresql_errors(own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database()
    with pytest.raises(psycopg.OperationalError) as refused:  # nobody listens there
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout=5)
    assert store_away(refused.value)
    assert not store_away(StoreFailure("abrouter state could not be written"))  # no cause: not known to be away
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (k INT PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation) as duplicate:
            conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(psycopg.errors.DivisionByZero) as bad_value:
            conn.execute("SELECT 1 / 0")
    assert not store_away(duplicate.value) and not store_away(bad_value.value)
    # the same errors as the committer reports them: wrapped in StoreFailure
    wrapped = StoreFailure("abrouter state could not be written")
    wrapped.__cause__ = duplicate.value
    assert not store_away(wrapped)
    wrapped.__cause__ = refused.value
    assert store_away(wrapped)
    # a server shut down under an open connection, and a pool that cannot hand out a connection
    conn = psycopg.connect(url)
    own_postgres.stop("fast")
    try:
        with pytest.raises(psycopg.OperationalError) as shut:
            conn.execute("SELECT 1")
        assert store_away(shut.value), repr(shut.value)
        pool = ConnectionPool(url, min_size=0, max_size=1, timeout=1, reconnect_timeout=0, open=True)
        with pool, pytest.raises(PoolTimeout) as timed_out, pool.connection():
            pass
        assert store_away(timed_out.value)
    finally:
        conn.close()
        own_postgres.start()


def test_the_committers_own_errors_say_away_or_refused_as_psycopgs_do(own_postgres: PostgresServer) -> None:
    """The group committer sends its batches through libpq directly: a connection the server cut still
    reads as away (OperationalError, no SQLSTATE) and the next batch connects again; a refused row still
    carries its SQLSTATE class and does not."""
    url = own_postgres.create_database()
    log = durable.GroupCommitLog(url, (durable.Migration(1, "CREATE TABLE t (k INT PRIMARY KEY)"),), component="t")
    try:
        log.submit([("INSERT INTO t (k) VALUES (?)", (1,))]).wait("t")
        with pytest.raises(StoreFailure) as refused:
            log.submit([("INSERT INTO t (k) VALUES (?)", [(2,), (1,)])]).wait("t")
        assert isinstance(refused.value.__cause__, psycopg.errors.UniqueViolation)
        assert not store_away(refused.value)
        with psycopg.connect(url, autocommit=True) as conn:  # the server cuts the committer's connection
            cut = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database() AND state = 'idle'"
            ).fetchall()
        assert cut, "no idle connection of the committer to cut"
        with pytest.raises(StoreFailure) as lost:
            log.submit([("INSERT INTO t (k) VALUES (?)", (3,))]).wait("t")
        assert isinstance(lost.value.__cause__, psycopg.OperationalError), repr(lost.value.__cause__)
        assert store_away(lost.value)
        log.submit([("INSERT INTO t (k) VALUES (?)", (4,))]).wait("t")  # connected again
        assert log.query("SELECT k FROM t ORDER BY k") == [(1,), (4,)]
    finally:
        log.close()


def test_store_away_on_real_sqlite_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    holder.execute("INSERT INTO t VALUES (1)")
    other = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    with pytest.raises(sqlite3.IntegrityError) as duplicate:
        other.execute("INSERT INTO t VALUES (1)")
    assert not store_away(duplicate.value)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            other.execute("BEGIN IMMEDIATE")
        assert store_away(locked.value), locked.value.sqlite_errorname
    finally:
        holder.execute("ROLLBACK")
    with pytest.raises(sqlite3.OperationalError) as no_table:
        other.execute("SELECT * FROM missing")
    assert not store_away(no_table.value)  # a bad statement is the write's fault, not the store's
    holder.close()
    other.close()


# -- two router processes on PostgreSQL, the server stopped and started ------------------------------------------


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_store_lost_at_run_time_then_back_on_postgresql(tmp_path: Path, own_postgres: PostgresServer) -> None:
    name = f"loss_{free_port()}"
    own_postgres.ensure_database(name)
    url = own_postgres.url(name, password=PASSWORD)
    a = router_process(tmp_path, "a", url)
    b = router_process(tmp_path, "b", url)
    try:
        a.start()
        b.start()
        stub_a, stub_b = pb_grpc.ABRouterServiceStub(a.channel()), pb_grpc.ABRouterServiceStub(b.channel())
        stub_a.CreateExperiment(pb.CreateExperimentRequest(spec=pb_spec("k")))
        wait_for("b serves 'k'", lambda: weights_of(stub_b, "k") == [0.5, 0.5])
        hammer = Hammer(stub_a, "k")
        watch_ended: list[grpc.StatusCode] = []

        def watch() -> None:
            try:
                for _ in stub_b.WatchExposures(pb.WatchExposuresRequest(experiment_key="k"), timeout=WAIT_S * 2):
                    pass
            except grpc.RpcError as err:
                watch_ended.append(err.code())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            wait_for("100 acknowledged exposures", lambda: len(hammer.acknowledged) >= 100)
            own_postgres.stop("fast")
            try:
                wait_for("a NOT_SERVING", lambda: a.health() == "NOT_SERVING")
                wait_for("b NOT_SERVING (its resync found the store away)", lambda: b.health() == "NOT_SERVING")
                for stub in (stub_a, stub_b):
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.Assign(pb.AssignRequest(unit_id="during", experiment_keys=["k"], log_exposure=True))
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    message = refused.value.details() or ""
                    assert f"database={name}" in message and "host=127.0.0.1" in message, message
                    assert PASSWORD not in message
                    with pytest.raises(grpc.RpcError) as config:
                        stub.UpdateExperiment(pb.UpdateExperimentRequest(spec=pb_spec("k", (0.9, 0.1))))
                    assert config.value.code() == grpc.StatusCode.UNAVAILABLE
                with pytest.raises(grpc.RpcError) as metrics:
                    stub_a.RecordMetrics(
                        pb.RecordMetricsRequest(
                            experiment_key="k",
                            observations=[pb.MetricObservation(unit_id=hammer.acknowledged[0], metric="m", value=1)],
                        )
                    )
                assert metrics.value.code() == grpc.StatusCode.UNAVAILABLE
                wait_for("the live exposure stream ended", lambda: bool(watch_ended))
                assert watch_ended == [grpc.StatusCode.UNAVAILABLE]
                refused_while_away = len(hammer.refused)
                wait_for("Assigns refused while the store is away", lambda: len(hammer.refused) > refused_while_away)
            finally:
                own_postgres.start()
            wait_for("a SERVING again, without a restart", lambda: a.health() == "SERVING")
            wait_for("b SERVING again, without a restart", lambda: b.health() == "SERVING")
            acknowledged_before = len(hammer.acknowledged)
            wait_for("Assigns acknowledged again", lambda: len(hammer.acknowledged) > acknowledged_before + 50)
        finally:
            hammer.stop()
            watcher.join(timeout=WAIT_S * 2)
        assert a.lives == 1 and b.lives == 1 and a.proc is not None and a.proc.poll() is None
        assert {code for code in hammer.refused.values()} == {grpc.StatusCode.UNAVAILABLE}, hammer.details[:3]
        assert all(PASSWORD not in d for d in hammer.details)
        stored = stored_units(own_postgres.url(name), "k")
        assert len(stored) == len(set(stored))
        missing = set(hammer.acknowledged) - set(stored)
        assert not missing, f"{len(missing)} acknowledged exposures not in the store, e.g. {sorted(missing)[:5]}"
        # what is stored was sent: acknowledged, or refused while its commit's fate was unknown
        assert set(stored) <= set(hammer.acknowledged) | set(hammer.refused)
        # memory reloaded from the store: both replicas count exactly the stored exposures
        wait_for("a's memory matches the store", lambda: exposed_units(stub_a, "k") == len(stored))
        wait_for("b's memory matches the store", lambda: exposed_units(stub_b, "k") == len(stored))
        # config propagates between the replicas again, both ways
        stub_b.UpdateExperiment(pb.UpdateExperimentRequest(spec=pb_spec("k", (0.2, 0.8))))
        wait_for("a serves b's change", lambda: weights_of(stub_a, "k") == [0.2, 0.8])
        stub_a.UpdateExperiment(pb.UpdateExperimentRequest(spec=pb_spec("k", (0.7, 0.3))))
        wait_for("b serves a's change", lambda: weights_of(stub_b, "k") == [0.7, 0.3])
        after = stub_a.Assign(pb.AssignRequest(unit_id="after", experiment_keys=["k"], log_exposure=True))
        assert after.assignments[0].exposure_logged
    finally:
        a.close()
        b.close()


# -- one router process on SQLite, its file locked by another process ----------------------------------------------


def test_store_locked_at_run_time_then_free_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "router.db"
    with router_process(tmp_path, "solo", f"sqlite:///{path}") as solo:
        solo.start()
        stub = pb_grpc.ABRouterServiceStub(solo.channel())
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=pb_spec("k")))
        hammer = Hammer(stub, "k", threads=2)
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            wait_for("50 acknowledged exposures", lambda: len(hammer.acknowledged) >= 50)
            holder.execute("BEGIN EXCLUSIVE")  # held past the router's busy timeout (10 s)
            try:
                wait_for("NOT_SERVING while the file is locked", lambda: solo.health() == "NOT_SERVING")
                with pytest.raises(grpc.RpcError) as refused:
                    stub.UpdateExperiment(pb.UpdateExperimentRequest(spec=pb_spec("k", (0.9, 0.1))))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"sqlite file {path}" in (refused.value.details() or ""), refused.value.details()
            finally:
                holder.execute("ROLLBACK")
            wait_for("SERVING again once the lock is gone, without a restart", lambda: solo.health() == "SERVING")
            acknowledged_before = len(hammer.acknowledged)
            wait_for("Assigns acknowledged again", lambda: len(hammer.acknowledged) > acknowledged_before + 20)
        finally:
            hammer.stop()
            holder.close()
        assert solo.lives == 1 and solo.proc is not None and solo.proc.poll() is None
        assert set(hammer.refused.values()) == {grpc.StatusCode.UNAVAILABLE}, hammer.details[:3]
        store = RouterStore(path)
        try:
            stored = [row.unit for row in store.load_exposures() if row.key == "k"]
            version = store.versions()["k"]
        finally:
            store.close()
        assert not set(hammer.acknowledged) - set(stored)
        assert set(stored) <= set(hammer.acknowledged) | set(hammer.refused)
        assert version == 1  # the refused update left nothing in the store ...
        experiment = stub.GetExperiment(pb.GetExperimentRequest(key="k")).experiment
        assert (experiment.version, list(experiment.weights)) == (1, [0.5, 0.5])  # ... nor in memory
        assert experiment.exposed_units == len(stored)
        updated = stub.UpdateExperiment(pb.UpdateExperimentRequest(spec=pb_spec("k", (0.9, 0.1)))).experiment
        assert updated.version == 2


def test_a_write_refused_while_the_store_is_away_leaves_memory_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one core, what each kind of write leaves in memory at the moment it fails, before any reload."""
    monkeypatch.setattr(durable, "SQLITE_BUSY_TIMEOUT_MS", 200)  # the lock below is met within 0.2 s, not 10
    path = tmp_path / "r.db"
    store = RouterStore(path, "NORMAL")
    router = Router(ABRouterSettings(), store)
    health: list[bool] = []
    router.on_store = health.append
    spec = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), metrics=("m",), sticky_bucketing=True)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        router.create(spec)
        router.assign("u0", {}, ["k"], log_exposure=True)
        events = list(router.events)
        holder.execute("BEGIN EXCLUSIVE")
        with router.lock:
            late = router._submit([("SELECT 1", ())])  # a write whose caller looks at it only after the resume
        moved = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.1), ArmSpec("b", 0.9)), metrics=("m",))
        with pytest.raises(Unavailable, match=f"store away \\(sqlite file {path}\\).*database is locked"):
            router.update(moved)
        live = router.live["k"]
        assert (live.experiment.version, live.experiment.weights) == (1, (0.5, 0.5))
        assert list(router.events) == events and health == [False]
        # every call is refused while the store is away, reads included (nothing stale is served)
        for call in (
            lambda: router.assign("u1", {}, ["k"], log_exposure=True),
            lambda: router.get("k"),
            lambda: router.stop("k"),
            lambda: router.create(ExperimentSpec(key="k2", arms=(ArmSpec("a", 1.0),))),
        ):
            with pytest.raises(Unavailable, match="store away"):
                call()
        assert len(live.table) == 1 and live.pending_sticky == {} and live.pending_exposures == 0
        assert "k2" not in router.live
        assert not router._resume()  # still locked
        holder.execute("ROLLBACK")
        assert router._resume() and health == [False, True] and router.store_away_reason == ""
        with pytest.raises(Unavailable, match="database is locked"):  # that write failed: not acknowledged ...
            router._durable(late)
        assert health == [False, True] and router.store_away_reason == ""  # ... but settled by the reload
        assert router.update(moved).version == 2
        assert router.assign("u1", {}, ["k"], log_exposure=True)[0][1]
        assert router.get("k")[1] == 2
    finally:
        holder.close()
        router.close()
        store.close()


def test_a_guardrail_rollback_that_cannot_be_written_is_put_back_and_decided_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "SQLITE_BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "r.db"
    store = RouterStore(path, "NORMAL")
    router = Router(ABRouterSettings(guardrail_interval_s=3600), store)
    guard = Guardrail("conversion", max_relative_drop=0.05, min_units=100)
    spec = ExperimentSpec(
        key="risky", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), metrics=("conversion",), guardrails=(guard,)
    )
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        router.create(spec)
        for i in range(600):  # 30 % conversion on control, 10 % on the new arm: trips
            [(result, _)] = router.assign(f"u{i}", {}, ["risky"], log_exposure=True)
            converted = (i % 10) < (3 if result.arm_index == 0 else 1)
            router.record_metrics("risky", [Observation(f"u{i}", "conversion", float(converted))])
        events = list(router.events)
        holder.execute("BEGIN EXCLUSIVE")
        assert any(v.tripped for v in router.check_guardrails())  # decided, but the rollback cannot be written
        assert router.store_away_reason  # the periodic check does not raise: the router is away
        live = router.live["risky"]
        assert (live.experiment.version, live.experiment.state) == (1, ExperimentState.RUNNING)
        assert list(router.events) == events
        holder.execute("ROLLBACK")
        assert router._resume()
        assert router.get("risky")[0].state is ExperimentState.RUNNING  # the store never had the rollback
        router.check_guardrails()
        exp = router.get("risky")[0]
        assert (exp.version, exp.state) == (2, ExperimentState.ROLLED_BACK)
        assert [k for (k,) in store.log.query("SELECT kind FROM events WHERE key = 'risky' ORDER BY id")] == [
            "config_changed",
            "guardrail_tripped",
        ]
    finally:
        holder.close()
        router.close()
        store.close()


def test_store_unreachable_at_start_names_host_and_database_not_the_password(tmp_path: Path) -> None:
    url = f"postgresql://router:{PASSWORD}@127.0.0.1:{free_port()}/experiments"
    assert_exits_on_unreachable_store(router_process(tmp_path, "nowhere", url), "experiments", PASSWORD)
