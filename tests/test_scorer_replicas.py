"""Two real scorer processes on one real PostgreSQL server (and one artefact folder): a model registered on A
is listed and served by B; Feedback sent to B for requests A scored is accepted and counts once; a
rollback on A is served by B within about a second (polled with a deadline, never a timed assertion)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from guardmesh.config import load_config
from guardmesh.sdk.scorer import ScorerClient
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from tests.postgres import PostgresServer
from tests.processes import ServiceProcess

from .test_scorer import FEATURES, logistic, register, score


def replica(tmp_path: Path, name: str, store_url: str) -> ServiceProcess:
    """One scorer replica (its own port and state folder) on the shared store and artefact folder."""
    return ServiceProcess(
        "scorer",
        tmp_path / name,
        {
            "GUARDMESH__SCORER__STORE_URL": store_url,
            "GUARDMESH__SCORER__ARTEFACT_URL": str(tmp_path / "artefacts"),
            "GUARDMESH__SCORER__MIN_LABELS": "20",
            "GUARDMESH__SCORER__DEVICE": "cpu",
        },
    )


@pytest.fixture
def replicas(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    url = postgres_server.create_database()
    a, b = replica(tmp_path, "a", url), replica(tmp_path, "b", url)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()


def wait_for(what: str, check: object, timeout_s: float = 60.0) -> float:
    """Poll ``check`` until true; the seconds it took (for the failure message only)."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def active_on(stub: pb_grpc.ScorerServiceStub) -> str:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    return models[0].active_version if models else ""


@pytest.mark.timeout(600)  # process starts and replica waits, each generous for a loaded machine
def test_two_replicas_share_models_feedback_and_rollback(replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    a, b = replicas
    stub_a, stub_b = pb_grpc.ScorerServiceStub(a.channel()), pb_grpc.ScorerServiceStub(b.channel())
    register(stub_a, "v1", logistic([1.0, 0.0, 0.0, 0.0], 0.0), activate=True)
    # Listed and served by B (it hears A's NOTIFY; its counter poll is the safety net).
    wait_for("B to list v1", lambda: active_on(stub_b) == "v1")
    [line] = stub_b.ListModels(pb.ListModelsRequest()).models
    assert [v.version for v in line.versions] == ["v1"] and list(line.features) == FEATURES
    out = score(stub_b, "b-0", np.array([2.0, 0.0, 0.0, 0.0]))
    assert out.model_version == "v1" and out.score == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-5)

    # Cross-replica feedback: A scores, B takes the labels; a label counts once whichever replica gets it.
    for i in range(10):
        score(stub_a, f"a-{i}", np.array([1.0, 0.0, 0.0, 0.0]))  # positive decisions
    labels = [pb.Label(request_id=f"a-{i}", label=True) for i in range(10)]
    got = stub_b.Feedback(pb.FeedbackRequest(model="risk", labels=labels))
    assert (got.accepted, got.unknown) == (10, 0) and got.precision == 1.0
    again = stub_a.Feedback(pb.FeedbackRequest(model="risk", labels=labels))
    assert (again.accepted, again.unknown) == (0, 10)

    # A rollback on A is served by B: B's ListModels and B's Score answer with v1.
    register(stub_a, "v2", logistic([-1.0, 0.0, 0.0, 0.0], 0.0), activate=True)
    wait_for("B to serve v2", lambda: score(stub_b, "probe-v2", np.zeros(4)).model_version == "v2")
    assert stub_a.RollbackModel(pb.RollbackModelRequest(model="risk")).active_version == "v1"
    took = wait_for("B to serve v1 after A's rollback", lambda: active_on(stub_b) == "v1")
    assert score(stub_b, "after", np.zeros(4)).model_version == "v1", f"B listed v1 after {took:.2f} s"

    # Drift: each replica reports its own live window; merged, the pooled windows of both.
    own_a = stub_a.GetDriftReport(pb.GetDriftReportRequest(model="risk"))
    own_b = stub_b.GetDriftReport(pb.GetDriftReportRequest(model="risk"))
    assert len(own_a.replicas) == 1 and len(own_b.replicas) == 1 and own_a.replicas != own_b.replicas

    def merged() -> pb.GetDriftReportResponse:
        return stub_a.GetDriftReport(pb.GetDriftReportRequest(model="risk", merge_replicas=True))

    # B publishes its window every second: wait for the one holding all of B's rows (no more are scored now).
    pooled_rows = own_a.live_rows + own_b.live_rows
    wait_for("B's current live window in the store", lambda: merged().live_rows == pooled_rows)
    both = merged()
    assert sorted(both.replicas) == sorted([*own_a.replicas, *own_b.replicas]) and both.live_rows == pooled_rows
    with ScorerClient(load_config(env={}), address=b.address) as client:  # the SDK asks for the same
        through_sdk = client.drift_report("risk", merge_replicas=True)
        assert sorted(through_sdk.replicas) == sorted(both.replicas) and through_sdk.live_rows == pooled_rows
        assert client.drift_report("risk").replicas == tuple(own_b.replicas)


def test_make_up_replicas_runs_scorer_replicas_on_the_store(tmp_path: Path) -> None:
    """``make up REPLICAS=2 STORE=postgres``: two scorer processes, ports ``port + 100 i``, on the store."""
    from guardmesh.mesh import REPLICA_PORT_STEP, instances

    from .conftest import make_config

    config = make_config(tmp_path)
    port = config.services["scorer"].port
    scorers = [
        (name, env) for service, name, env in instances(config, 2, "postgresql://u@h:1/db") if service == "scorer"
    ]
    assert [name for name, _ in scorers] == ["scorer-0", "scorer-1"]
    assert [env["GUARDMESH__SERVICES__SCORER__PORT"] for _, env in scorers] == [
        str(port),
        str(port + REPLICA_PORT_STEP),
    ]
    assert {env["GUARDMESH__SCORER__STORE_URL"] for _, env in scorers} == {"postgresql://u@h:1/db"}
    routers = [env for service, _, env in instances(config, 2, "postgresql://u@h:1/db") if service == "abrouter"]
    host = config.services["scorer"].host
    assert routers and all(  # every router replica calls every scorer replica
        json.loads(env["GUARDMESH__SERVICES__SCORER__REPLICAS"])
        == [f"{host}:{port}", f"{host}:{port + REPLICA_PORT_STEP}"]
        for env in routers
    )
    assert [name for service, name, _ in instances(config) if service == "scorer"] == ["scorer"]  # plain make up


@pytest.mark.timeout(600)  # process starts and replica waits, each generous for a loaded machine
def test_mesh_up_runs_two_scorer_replicas_on_a_local_postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make up REPLICAS=2 STORE=postgres`` (the scorer only, on free ports): both replicas serve; a model
    registered on scorer-0 is served by scorer-1; ``make down`` stops the replicas and the server."""
    import grpc

    from guardmesh import mesh
    from tests.processes import postgres_mesh

    with postgres_mesh(monkeypatch, "scorer") as config:
        mesh.up(config, timeout=180)
        health = {rec.service: h for rec, h in mesh.status(config)}
        assert health["postgres"] == "RUNNING" and health["scorer-0"] == health["scorer-1"] == "SERVING"
        records = {r.service: r for r in mesh.read_records(config)}
        with (
            grpc.insecure_channel(records["scorer-0"].address) as c0,
            grpc.insecure_channel(records["scorer-1"].address) as c1,
        ):
            register(pb_grpc.ScorerServiceStub(c0), "v1", logistic([1.0, 0.0, 0.0, 0.0], 0.0), activate=True)
            wait_for("scorer-1 to serve v1", lambda: active_on(pb_grpc.ScorerServiceStub(c1)) == "v1")
        mesh.down(config)
        wait_for("postgres to stop", lambda: not mesh.pid_alive(records["postgres"].pid), 60)
        assert not mesh.pid_alive(records["scorer-0"].pid) and not mesh.pid_alive(records["scorer-1"].pid)


def test_store_unreachable_at_start_names_host_and_database_not_the_password(tmp_path: Path) -> None:
    from tests.processes import assert_exits_on_unreachable_store, free_port

    url = f"postgresql://scorer:hunter2-secret@127.0.0.1:{free_port()}/models"
    assert_exits_on_unreachable_store(replica(tmp_path, "nowhere", url), "models", "hunter2-secret")


@pytest.mark.timeout(600)  # process starts and replica waits, each generous for a loaded machine
def test_store_lost_at_run_time_then_back(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """PostgreSQL stops under a serving scorer process: health NOT_SERVING and Score UNAVAILABLE; when the
    server is back the scorer serves again, and what it acknowledged before is still there."""
    import grpc

    with replica(tmp_path, "solo", postgres_server.create_database()) as solo:
        solo.start()
        stub = pb_grpc.ScorerServiceStub(solo.channel())
        register(stub, "v1", logistic([1.0, 0.0, 0.0, 0.0], 0.0), activate=True)
        score(stub, "before", np.array([1.0, 0.0, 0.0, 0.0]))
        postgres_server.stop("immediate")
        try:
            wait_for("NOT_SERVING while the store is gone", lambda: solo.health() == "NOT_SERVING", 90)
            with pytest.raises(grpc.RpcError) as refused:
                score(stub, "during", np.array([1.0, 0.0, 0.0, 0.0]))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            postgres_server.start()
        wait_for("SERVING once the store is back", lambda: solo.health() == "SERVING", 90)

        def answered() -> bool:
            try:
                score(stub, "after", np.array([1.0, 0.0, 0.0, 0.0]))
                return True
            except grpc.RpcError:
                return False

        wait_for("a Score answered again", answered, 60)
        labels = [pb.Label(request_id=r, label=True) for r in ("before", "during", "after")]
        got = stub.Feedback(pb.FeedbackRequest(model="risk", labels=labels))
        assert (got.accepted, got.unknown) == (2, 1)
