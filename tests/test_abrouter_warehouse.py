"""Audits out of core (issue #20 item 2): the audit over the Parquet exposure table with DuckDB gives the same
answers as the router's in-memory audit on the same exposures (SRM, uniformity, clustering incl. carry-over,
covariate balance overall and by window), including SRM since a weight change; a corrupt file is reported."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from guardmesh.config import ABRouterSettings
from services.abrouter.audit import AuditReport
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.export import ExportCorrupt, ExposureExporter, exposure_files
from services.abrouter.router import Router
from services.abrouter.store import ExposureRow, RouterStore
from services.abrouter.warehouse import audit_table, exposure_columns

SPEC = ExperimentSpec(key="main", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)))


def populated(tmp_path: Path) -> Router:
    """A router with 3,000 exposures of 'main' (covariates, days, repeats, a weight change) and 'other'."""
    router = Router(ABRouterSettings(), RouterStore(tmp_path / "r.db", "NORMAL"))
    router.create(SPEC)
    router.create(ExperimentSpec(key="other", arms=(ArmSpec("a", 0.3), ArmSpec("b", 0.7))))
    rng = np.random.default_rng(7)
    start = 1_760_000_000.0
    for i in range(3000):
        at = start + float(rng.uniform(0, 20 * 86_400))
        numeric = {"age": float(rng.normal(40, 10))} if i % 7 else {}
        categorical = {"device": str(rng.choice(["ios", "android", "web"]))} if i % 5 else {}
        if i % 3 == 0:
            categorical["country"] = str(rng.choice(["de", "fr"]))
        router.assign(
            f"user-{i}",
            {},
            ["main", "other"],
            log_exposure=True,
            numeric=numeric,
            categorical=categorical,
            timestamp=at,
        )
        if i % 10 == 0:  # a repeat exposure: only the first counts
            router.assign(f"user-{i}", {}, ["main"], log_exposure=True, timestamp=at + 60)
        if i == 2000:
            router.update(replace(SPEC, arms=(ArmSpec("control", 0.4), ArmSpec("new", 0.6))))
    return router


def same(a: AuditReport, b: AuditReport) -> None:
    assert a.exposures == b.exposures
    assert a.srm.observed == b.srm.observed and a.srm.expected == pytest.approx(b.srm.expected)
    assert a.srm.p_value == pytest.approx(b.srm.p_value, rel=1e-9, abs=1e-12)
    assert (a.srm.alert, a.srm.reason) == (b.srm.alert, b.srm.reason)
    assert a.uniformity.p_value == pytest.approx(b.uniformity.p_value, rel=1e-9, abs=1e-12)
    assert [(t.name, t.alert) for t in a.clustering] == [(t.name, t.alert) for t in b.clustering]
    for x, y in zip(a.clustering, b.clustering, strict=True):
        assert x.p_value == pytest.approx(y.p_value, rel=1e-6, abs=1e-12), x.name
    assert [(r.covariate, r.window, r.arm_a, r.arm_b, r.test) for r in a.balance] == [
        (r.covariate, r.window, r.arm_a, r.arm_b, r.test) for r in b.balance
    ]
    for p, q in zip(a.balance, b.balance, strict=True):
        assert p.p_value == pytest.approx(q.p_value, rel=1e-6, abs=1e-12), (p.covariate, p.window)
        assert p.imbalanced == q.imbalanced
    assert a.alert == b.alert and a.reasons == b.reasons


def test_the_table_audit_gives_the_in_memory_answers(tmp_path: Path) -> None:
    router = populated(tmp_path)
    assert router.store is not None
    try:
        table_url = str(tmp_path / "table")
        exporter = ExposureExporter(router.store, table_url)
        while exporter.export_once():
            pass
        columns, _ = exposure_columns(table_url, "main")
        assert len(columns) == 3000 and set(columns.categorical) == {"device", "country"}
        for key in ("main", "other"):
            live = router.live[key]
            in_memory = router.audit(key, min_sample=100)
            from_table = audit_table(table_url, live.experiment, live.weights_since, min_sample=100)
            same(in_memory, from_table)
        # the weight change shows: SRM over units exposed since version 2 on both paths
        assert "since version 2" in router.audit("main", min_sample=100).srm.reason
        windowed = router.audit("main", min_sample=100, window_covariates=["country"])
        same(
            windowed,
            audit_table(table_url, router.live["main"].experiment, 2, min_sample=100, window_covariates=["country"]),
        )
    finally:
        router.close()
        router.store.close()


def test_a_corrupt_file_fails_the_table_audit_naming_the_table(tmp_path: Path) -> None:
    router = populated(tmp_path)
    assert router.store is not None
    try:
        table_url = str(tmp_path / "table")
        ExposureExporter(router.store, table_url).export_once()
        victim = Path(next(f for f in exposure_files(table_url) if "experiment=main" in f))
        victim.write_bytes(victim.read_bytes()[:100])
        with pytest.raises(ExportCorrupt, match="exposure table"):
            audit_table(table_url, router.live["main"].experiment, 1)
    finally:
        router.close()
        router.store.close()


def test_assign_keeps_answering_while_a_table_audit_runs(tmp_path: Path) -> None:
    router = Router(ABRouterSettings(), RouterStore(tmp_path / "r.db", "NORMAL"))
    assert router.store is not None
    router.create(SPEC)
    rng = np.random.default_rng(1)
    n = 200_000
    arms = rng.integers(0, 2, n)
    for lo in range(0, n, 50_000):
        rows = [
            ExposureRow(
                "main",
                f"bulk-{i}",
                int(arms[i]),
                float(rng.random()),
                0.5,
                1_760_000_000.0 + i,
                1,
                {"age": float(i % 90)},
                {"device": ("ios", "web")[i % 2]},
            )
            for i in range(lo, lo + 50_000)
        ]
        router.store.submit([RouterStore.exposures(rows)]).wait()
    table_url = str(tmp_path / "table")
    exporter = ExposureExporter(router.store, table_url)
    while exporter.export_once():
        pass
    running = threading.Event()
    finished = threading.Event()
    result: list[AuditReport] = []

    def audit() -> None:
        running.set()
        try:
            result.append(router.audit_from_table(table_url, "main", min_sample=1000))
        finally:
            finished.set()

    try:
        worker = threading.Thread(target=audit)
        worker.start()
        assert running.wait(30)
        answered_meanwhile = 0
        i = 0
        while not finished.is_set():
            router.assign(f"live-{i}", {}, ["main"], log_exposure=True)
            i += 1
            if not finished.is_set():
                answered_meanwhile += 1
        worker.join()
        assert result and result[0].exposures == n  # the audit saw the table as exported
        assert answered_meanwhile > 0, "no assignment was answered while the table audit ran"
    finally:
        router.close()
        router.store.close()


def test_audit_from_table_over_grpc_matches_the_in_memory_audit(tmp_path: Path) -> None:
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
    from tests.conftest import make_config
    from tests.processes import ServiceProcess

    env = {"GUARDMESH__ABROUTER__EXPORT_URL": str(tmp_path / "table"), "GUARDMESH__ABROUTER__EXPORT_INTERVAL_S": "3600"}
    with ServiceProcess("abrouter", tmp_path / "r", env) as proc:
        proc.start()
        stub = pb_grpc.ABRouterServiceStub(proc.channel())
        arms = [pb.Arm(name="control", weight=0.5), pb.Arm(name="new", weight=0.5)]
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=pb.ExperimentSpec(key="main", arms=arms)))
        for i in range(1200):
            covariates = pb.Covariates(numeric={"age": float(i % 70)}, categorical={"device": ("ios", "web")[i % 2]})
            stub.Assign(
                pb.AssignRequest(unit_id=f"u{i}", experiment_keys=["main"], log_exposure=True, covariates=covariates)
            )
        in_memory = stub.AuditExperiment(pb.AuditExperimentRequest(key="main", min_sample=100))
        from_table = stub.AuditExperiment(pb.AuditExperimentRequest(key="main", min_sample=100, from_table=True))
        assert from_table.exposures == in_memory.exposures == 1200
        assert from_table.srm == in_memory.srm
        assert from_table.uniformity == in_memory.uniformity
        assert list(from_table.balance) == list(in_memory.balance)
        assert [t.name for t in from_table.clustering] == [t.name for t in in_memory.clustering]
        from guardmesh.sdk.abrouter import ABRouterClient

        with ABRouterClient(make_config(tmp_path / "client"), address=proc.address) as client:
            via_sdk = client.audit("main", min_sample=100, from_table=True)
        assert via_sdk.exposures == 1200 and via_sdk.srm.p_value == in_memory.srm.p_value
        with pytest.raises(grpc.RpcError) as info:
            stub.AuditExperiment(pb.AuditExperimentRequest(key="main", from_table=True, window_covariates=["nope"]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "window_covariates[0]" in str(
            info.value.details()
        )
