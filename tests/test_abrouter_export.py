"""The exposure table out of the router (issue #20 item 1), on both store backends:

* the Parquet table holds every logged exposure once, with the documented columns (revision, arm name, hash
  version, propensity, covariates), partitioned by experiment and day, read back by DuckDB too;
* a round cut short after some files were written is redone for the same range: no duplicate ids;
* two replicas' exporters on one store (each its own connection) racing while exposures arrive claim their
  ranges in the store: every exposure in the table exactly once, including when one finds the other's range
  in progress (it writes that range again under the same names, not a longer one);
* kill -9 of a real router process while it exports under logged-Assign load: after a restart's round every
  acknowledged exposure is in the table exactly once;
* a corrupt or cut-short file is reported naming it, never skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import grpc
import pyarrow.parquet as pq
import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from services.abrouter import export as export_mod
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.export import ExportCorrupt, ExposureExporter, exposure_files, read_exposures
from services.abrouter.router import Observation, Router
from services.abrouter.store import RouterStore
from tests.processes import ServiceProcess
from tests.test_abrouter_replicas import wait_for


def logged_router(store_url: str) -> Router:
    router = Router(ABRouterSettings(), RouterStore(store_url, "NORMAL"))
    router.create(ExperimentSpec(key="one", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), hash_version=1))
    router.create(ExperimentSpec(key="two", arms=(ArmSpec("a", 0.2), ArmSpec("b", 0.8))))
    return router


def test_the_table_holds_every_exposure_once_with_its_columns(tmp_path: Path, store_url: str) -> None:
    router = logged_router(store_url)
    table_url = str(tmp_path / "table")
    try:
        day1, day2 = 1_700_000_000.0, 1_700_000_000.0 + 86_400
        for i in range(150):
            router.assign(
                f"u{i}", {}, ["one", "two"], log_exposure=True, numeric={"age": float(i)}, categorical={"dev": "ios"}
            )
            router.assign(f"v{i}", {}, ["one"], log_exposure=True, timestamp=day1 if i % 2 else day2)
        assert router.store is not None
        exporter = ExposureExporter(router.store, table_url, batch_rows=1000)
        assert exporter.export_once() == 450
        assert exporter.export_once() == 0  # nothing new: nothing written again
        table = read_exposures(table_url).to_pylist()
        stored = router.store.exposures_after(0)
        assert sorted(r["exposure_id"] for r in table) == [n for n, _, _ in stored]
        by_id = {r["exposure_id"]: r for r in table}
        for n, _, row in stored:
            got = by_id[n]
            assert (got["experiment"], got["unit"], got["arm"], got["revision"]) == (
                row.key,
                row.unit,
                row.arm,
                row.config_version,
            )
            assert got["arm_name"] == ("control", "new")[row.arm] if row.key == "one" else ("a", "b")[row.arm]
            assert got["hash_version"] == (1 if row.key == "one" else 2)
            assert got["propensity"] == pytest.approx(row.propensity)
            assert got["bucket"] == pytest.approx(row.bucket)
            assert dict(got["numeric_covariates"]) == dict(row.numeric)
            assert dict(got["categorical_covariates"]) == dict(row.categorical)
            assert got["time"].timestamp() == pytest.approx(row.at, abs=1e-6)
        folders = {Path(p).parent.relative_to(Path(table_url)).as_posix() for p in exposure_files(table_url)}
        assert "experiment=one/day=2023-11-14" in folders and "experiment=one/day=2023-11-15" in folders
        # more exposures: the next round adds only them
        router.assign("late", {}, ["two"], log_exposure=True)
        assert exporter.export_once() == 1
        # DuckDB reads the table in place, partitions included
        found = (
            duckdb.connect()
            .execute(
                f"SELECT COUNT(*), COUNT(DISTINCT unit) FROM read_parquet('{table_url}/*/*/*.parquet', "
                "hive_partitioning = true) WHERE experiment = 'one'"
            )
            .fetchone()
        )
        assert found == (300, 300)
    finally:
        router.close()
        assert router.store is not None
        router.store.close()


def test_a_round_cut_short_is_redone_for_the_same_range(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = logged_router(store_url)
    table_url = str(tmp_path / "table")
    assert router.store is not None
    try:
        for i in range(100):
            router.assign(f"u{i}", {}, ["one", "two"], log_exposure=True)
        exporter = ExposureExporter(router.store, table_url)
        real_write = ExposureExporter._write_file
        written: list[str] = []

        def crash_after_first(self: ExposureExporter, folder: str, name: str, table: object) -> None:
            if written:
                raise KeyboardInterrupt("the process dies here")  # not an Exception: nothing catches it
            written.append(name)
            real_write(self, folder, name, table)  # type: ignore[arg-type]

        monkeypatch.setattr(ExposureExporter, "_write_file", crash_after_first)
        with pytest.raises(KeyboardInterrupt):
            exporter.export_once()
        monkeypatch.setattr(ExposureExporter, "_write_file", real_write)
        assert len(exposure_files(table_url)) == 1
        done, pending = exporter.state()
        assert (done, pending) == (0, 200)
        for i in range(100, 150):  # more exposures arrive meanwhile: they must not join the interrupted range
            router.assign(f"u{i}", {}, ["one"], log_exposure=True)
        restarted = ExposureExporter(router.store, table_url)  # redoes exactly ids 1..200
        assert restarted.state() == (200, 200)
        assert restarted.export_once() == 50
        ids = [r["exposure_id"] for r in read_exposures(table_url).to_pylist()]
        assert len(ids) == len(set(ids)) == 250
    finally:
        router.close()
        router.store.close()


def table_ids(table_url: str) -> list[int]:
    return sorted(r["exposure_id"] for r in read_exposures(table_url).select(["exposure_id"]).to_pylist())


def assert_each_stored_exposure_once(store: RouterStore, table_url: str) -> None:
    ids = table_ids(table_url)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} exposure ids are in the table twice"
    assert ids == [n for n, _, _ in store.exposures_after(0)], "the table is not the store's exposures"


def test_an_exporter_finding_another_replicas_range_in_progress_writes_that_range(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica a claims ids 1..100 and is slow writing them; meanwhile 50 more exposures arrive and replica b
    exports: b writes a's range (the same names) and then its own, never one range 1..150 beside a's 1..100."""
    router = logged_router(store_url)
    table_url = str(tmp_path / "table")
    assert router.store is not None
    other = RouterStore(store_url)  # replica b's own connection to the store
    try:
        for i in range(50):
            router.assign(f"u{i}", {}, ["one", "two"], log_exposure=True)
        a, b = ExposureExporter(router.store, table_url), ExposureExporter(other, table_url)
        real_write = ExposureExporter._write_file
        meanwhile: list[int] = []

        def a_slow(self: ExposureExporter, folder: str, name: str, table: object) -> None:
            if self is a and not meanwhile:  # a has claimed its range: the rest happens before its first file
                for i in range(50, 100):
                    router.assign(f"u{i}", {}, ["one"], log_exposure=True)
                meanwhile.append(b.export_once())
            real_write(self, folder, name, table)  # type: ignore[arg-type]

        monkeypatch.setattr(ExposureExporter, "_write_file", a_slow)
        assert a.export_once() == 100
        assert meanwhile == [150]  # b wrote a's 100 again, then the 50 that arrived
        assert a.state() == b.state() == (150, 150)
        assert a.export_once() == b.export_once() == 0
        assert_each_stored_exposure_once(router.store, table_url)
    finally:
        router.close()
        router.store.close()
        other.close()


def test_two_replicas_exporting_at_once_while_exposures_arrive_export_each_once(tmp_path: Path, store_url: str) -> None:
    """Exposures keep arriving all through, so two exporters that read the state at once see different
    settled tails: each must still take a range of its own or the other's, never a second one from one id."""
    router = logged_router(store_url)
    table_url = str(tmp_path / "table")
    assert router.store is not None
    stores = [RouterStore(store_url), RouterStore(store_url)]  # two replicas, each its own connection(s)
    exporters = [ExposureExporter(s, table_url) for s in stores]
    rounds = [0, 0]  # rounds that wrote something, per exporter
    arriving = threading.Event()
    errors: list[BaseException] = []

    def export(which: int) -> None:
        try:
            while arriving.is_set():
                rounds[which] += exporters[which].export_once() > 0
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        arriving.set()
        threads = [threading.Thread(target=export, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        logged = 0
        while min(rounds) < 5 and not errors:  # until both have exported a few times while exposures arrive
            assert time.monotonic() < deadline, f"the exporters did not both run 5 rounds: {rounds}"
            router.assign(f"u{logged}", {}, ["one", "two"] if logged % 3 else ["one"], log_exposure=True)
            logged += 1
        arriving.clear()
        for t in threads:
            t.join()
        assert not errors, errors
        while exporters[0].export_once() or exporters[1].export_once():
            pass
        assert_each_stored_exposure_once(router.store, table_url)
        assert len(table_ids(table_url)) == logged + sum(1 for i in range(logged) if i % 3)
    finally:
        router.close()
        router.store.close()
        for s in stores:
            s.close()


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_two_router_processes_exporting_on_demand_at_once_export_each_exposure_once(
    tmp_path: Path, postgres_server: object
) -> None:
    """The issue's case end to end: two router processes on one PostgreSQL store, ExportExposures called on
    both at once, over and over, while both log exposures (the on-demand path runs beside the other
    replica's rounds: the export lease does not cover it)."""
    from tests.postgres import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    url = postgres_server.create_database()
    table_url = str(tmp_path / "table")
    env = {
        "GUARDMESH__ABROUTER__STORE_URL": url,
        "GUARDMESH__ABROUTER__EXPORT_URL": table_url,
        "GUARDMESH__ABROUTER__EXPORT_INTERVAL_S": "0.05",
        "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
    }
    acknowledged: list[str] = []
    exports = [0, 0]  # ExportExposures calls that wrote something, per process
    errors: list[BaseException] = []
    with ServiceProcess("abrouter", tmp_path / "a", env) as a, ServiceProcess("abrouter", tmp_path / "b", env) as b:
        a.start()
        b.start()
        stubs = [pb_grpc.ABRouterServiceStub(a.channel()), pb_grpc.ABRouterServiceStub(b.channel())]
        arms = [pb.Arm(name="control", weight=0.5), pb.Arm(name="new", weight=0.5)]
        stubs[0].CreateExperiment(pb.CreateExperimentRequest(spec=pb.ExperimentSpec(key="k", arms=arms)))
        wait_for(
            "b serves k",
            lambda: "k" in [e.spec.key for e in stubs[1].ListExperiments(pb.ListExperimentsRequest()).experiments],
        )
        stop = threading.Event()

        def log_exposures(worker: int) -> None:
            i = 0
            while not stop.is_set():
                unit = f"w{worker}-{i}"
                stubs[worker % 2].Assign(pb.AssignRequest(unit_id=unit, experiment_keys=["k"], log_exposure=True))
                acknowledged.append(unit)
                i += 1

        def export(which: int) -> None:
            while not stop.is_set():
                exports[which] += stubs[which].ExportExposures(pb.ExportExposuresRequest()).exported > 0

        def guarded(work: Callable[[int], None], arg: int) -> None:
            try:
                work(arg)
            except BaseException as exc:  # reported below
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=guarded, args=(log_exposures, w)) for w in range(2)]
        threads += [threading.Thread(target=guarded, args=(export, w)) for w in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for("both processes exported while exposures arrived", lambda: min(exports) >= 5 or stop.is_set(), 240)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        for stub in stubs:
            stub.ExportExposures(pb.ExportExposuresRequest())
    store = RouterStore(url)
    try:
        assert_each_stored_exposure_once(store, table_url)
    finally:
        store.close()
    units = [r["unit"] for r in read_exposures(table_url).select(["unit"]).to_pylist()]
    assert sorted(units) == sorted(acknowledged)  # every acknowledged exposure, once


def test_kill9_while_exporting_loses_and_duplicates_nothing(tmp_path: Path, store_url: str) -> None:
    table_url = str(tmp_path / "table")
    proc = ServiceProcess(
        "abrouter",
        tmp_path / "r",
        {
            "GUARDMESH__ABROUTER__STORE_URL": store_url,
            "GUARDMESH__ABROUTER__EXPORT_URL": table_url,
            "GUARDMESH__ABROUTER__EXPORT_INTERVAL_S": "0.05",
            "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
        },
    )
    acknowledged: list[str] = []
    try:
        proc.start()
        stub = pb_grpc.ABRouterServiceStub(proc.channel())
        arms = [pb.Arm(name="control", weight=0.5), pb.Arm(name="new", weight=0.5)]
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=pb.ExperimentSpec(key="k", arms=arms)))
        stop = threading.Event()

        def hammer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                unit = f"w{worker}-{i}"
                try:
                    stub.Assign(pb.AssignRequest(unit_id=unit, experiment_keys=["k"], log_exposure=True))
                except grpc.RpcError:
                    return
                acknowledged.append(unit)
                i += 1

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        # kill while rounds are running: after a few files exist and while exposures keep arriving
        wait_for(
            "the exporter wrote files", lambda: len(exposure_files(table_url)) >= 3 and len(acknowledged) > 300, 60
        )
        proc.kill9()
        stop.set()
        for t in threads:
            t.join()
    finally:
        proc.close()
    store = RouterStore(store_url)
    try:
        exporter = ExposureExporter(store, table_url)
        while exporter.export_once():
            pass
    finally:
        store.close()
    units = [r["unit"] for r in read_exposures(table_url).to_pylist()]
    ids = [r["exposure_id"] for r in read_exposures(table_url).to_pylist()]
    assert len(ids) == len(set(ids)), "an exposure id is in the table twice"
    missing = set(acknowledged) - set(units)
    assert not missing, f"{len(missing)} acknowledged exposures not exported, e.g. {sorted(missing)[:5]}"


@pytest.mark.parametrize("damage", ["garbage", "cut short"])
def test_a_corrupt_file_is_reported_naming_it(tmp_path: Path, damage: str) -> None:
    router = logged_router(f"sqlite:///{tmp_path / 'r.db'}")
    table_url = str(tmp_path / "table")
    assert router.store is not None
    try:
        for i in range(50):
            router.assign(f"u{i}", {}, ["one", "two"], log_exposure=True)
        ExposureExporter(router.store, table_url).export_once()
    finally:
        router.close()
        router.store.close()
    victim = Path(exposure_files(table_url)[-1])
    data = victim.read_bytes()
    victim.write_bytes(b"not parquet at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ExportCorrupt, match=victim.name):
        read_exposures(table_url)


def test_every_column_is_documented_in_the_files_themselves(tmp_path: Path) -> None:
    router = logged_router(f"sqlite:///{tmp_path / 'r.db'}")
    assert router.store is not None
    try:
        router.assign("u", {}, ["one"], log_exposure=True)
        ExposureExporter(router.store, str(tmp_path / "t")).export_once()
    finally:
        router.close()
        router.store.close()
    schema = pq.read_schema(exposure_files(str(tmp_path / "t"))[0])
    assert schema.names == list(export_mod.COLUMNS)
    for field in schema:
        assert field.metadata[b"doc"].decode() == export_mod.COLUMNS[field.name][1]


def test_export_on_demand_over_grpc_and_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from guardmesh.cli import app

    table_url = str(tmp_path / "table")
    proc = ServiceProcess(
        "abrouter",
        tmp_path / "r",
        {"GUARDMESH__ABROUTER__EXPORT_URL": table_url, "GUARDMESH__ABROUTER__EXPORT_INTERVAL_S": "3600"},
    )
    (tmp_path / "mesh.toml").write_text("")
    monkeypatch.setenv("GUARDMESH_CONFIG", str(tmp_path / "mesh.toml"))
    with proc:
        proc.start()
        stub = pb_grpc.ABRouterServiceStub(proc.channel())
        arms = [pb.Arm(name="control", weight=0.5), pb.Arm(name="new", weight=0.5)]
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=pb.ExperimentSpec(key="k", arms=arms)))
        for i in range(40):
            stub.Assign(pb.AssignRequest(unit_id=f"u{i}", experiment_keys=["k"], log_exposure=True))
        done = stub.ExportExposures(pb.ExportExposuresRequest())
        assert (done.exported, done.exported_through, done.table_url) == (40, 40, table_url)
        for i in range(40, 45):
            stub.Assign(pb.AssignRequest(unit_id=f"u{i}", experiment_keys=["k"], log_exposure=True))
        result = CliRunner().invoke(app, ["abrouter", "export", "--address", proc.address])
        assert result.exit_code == 0, result.output
        assert f"exported 5 exposures; the table at {table_url} holds ids up to 45" in result.output
    assert sorted(r["unit"] for r in read_exposures(table_url).to_pylist()) == sorted(f"u{i}" for i in range(45))


def test_export_off_is_a_failed_precondition(tmp_path: Path) -> None:
    with ServiceProcess("abrouter", tmp_path / "r", {"GUARDMESH__ABROUTER__EXPORT_URL": ""}) as proc:
        proc.start()
        stub = pb_grpc.ABRouterServiceStub(proc.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.ExportExposures(pb.ExportExposuresRequest())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "abrouter.export_url" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.WatchExposures(pb.WatchExposuresRequest(after_exposure_id=-1))))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "after_exposure_id" in str(
            info.value.details()
        )
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.WatchExposures(pb.WatchExposuresRequest(experiment_key="nope"))))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_the_live_stream_carries_every_replicas_exposures_in_id_order(tmp_path: Path, postgres_server: object) -> None:
    from tests.postgres import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    url = postgres_server.create_database()
    env = {"GUARDMESH__ABROUTER__STORE_URL": url, "GUARDMESH__ABROUTER__EXPORT_URL": ""}
    with ServiceProcess("abrouter", tmp_path / "a", env) as a, ServiceProcess("abrouter", tmp_path / "b", env) as b:
        a.start()
        b.start()
        stub_a, stub_b = pb_grpc.ABRouterServiceStub(a.channel()), pb_grpc.ABRouterServiceStub(b.channel())
        arms = [pb.Arm(name="control", weight=0.5), pb.Arm(name="new", weight=0.5)]
        stub_a.CreateExperiment(pb.CreateExperimentRequest(spec=pb.ExperimentSpec(key="k", arms=arms)))
        wait_for(
            "b serves k",
            lambda: "k" in [e.spec.key for e in stub_b.ListExperiments(pb.ListExperimentsRequest()).experiments],
        )
        for i in range(30):
            via = stub_a if i % 2 else stub_b
            via.Assign(pb.AssignRequest(unit_id=f"u{i}", experiment_keys=["k"], log_exposure=True))
        stream = stub_a.WatchExposures(pb.WatchExposuresRequest(experiment_key="k"))
        got: list[pb.Exposure] = []
        for message in stream:
            got.extend(message.exposures)
            if len(got) >= 30:
                break
        # live: exposures logged after the stream opened arrive too
        for i in range(30, 40):
            stub_b.Assign(pb.AssignRequest(unit_id=f"u{i}", experiment_keys=["k"], log_exposure=True))
        for message in stream:
            got.extend(message.exposures)
            if len(got) >= 40:
                break
        stream.cancel()
        ids = [e.exposure_id for e in got]
        assert ids == sorted(ids) and len(set(ids)) == 40
        assert sorted(e.unit for e in got) == sorted(f"u{i}" for i in range(40))
        assert {e.arm_name for e in got} <= {"control", "new"} and all(e.hash_version == 2 for e in got)
        # resume after the 20th: exactly the rest
        resumed = stub_b.WatchExposures(pb.WatchExposuresRequest(after_exposure_id=ids[19]))
        rest: list[int] = []
        for message in resumed:
            rest.extend(e.exposure_id for e in message.exposures)
            if len(rest) >= 20:
                break
        resumed.cancel()
        assert rest == ids[20:]


def test_retention_moves_old_exposures_out_of_the_store_and_audits_still_see_them(
    tmp_path: Path, store_url: str
) -> None:
    from services.abrouter.warehouse import audit_table

    router = Router(ABRouterSettings(), RouterStore(store_url, "NORMAL"))
    router.create(ExperimentSpec(key="k", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), metrics=("m",)))
    table_url = str(tmp_path / "table")
    now = time.time()
    old, recent = now - 40 * 86_400, now - 3600
    try:
        for i in range(300):
            router.assign(f"old-{i}", {}, ["k"], log_exposure=True, timestamp=old + i)
        for i in range(200):
            router.assign(f"new-{i}", {}, ["k"], log_exposure=True, timestamp=recent + i)
        router.record_metrics("k", [Observation("old-0", "m", 1.0), Observation("new-0", "m", 2.0)])
        assert router.store is not None
        exporter = ExposureExporter(router.store, table_url)
        exporter.export_once()
        for i in range(50):  # old but not exported yet: must stay in the store
            router.assign(f"late-old-{i}", {}, ["k"], log_exposure=True, timestamp=old + i)
        assert exporter.retire(now - 30 * 86_400) == 300
        left = {row.unit for row in router.store.load_exposures()}
        assert len(left) == 250 and not any(u.startswith("old-") for u in left)
        exporter.export_once()
        assert audit_table(table_url, router.live["k"].experiment, 1, min_sample=1).exposures == 550
    finally:
        router.close()
        assert router.store is not None
        router.store.close()
    # a restart reads only the hot horizon; the table keeps every exposure
    restarted = Router(ABRouterSettings(), RouterStore(store_url, "NORMAL"))
    try:
        restarted.restore()
        assert restarted.get("k")[1] == 250
        assert restarted.audit("k", min_sample=1).exposures == 250
        assert restarted.audit_from_table(table_url, "k", min_sample=1).exposures == 550
        stats = restarted.live["k"].metrics["m"].statistics
        assert sum(m.count for m in stats.observed) == 1  # new-0's; old-0's exposure left the hot store
    finally:
        restarted.close()
        assert restarted.store is not None
        restarted.store.close()
