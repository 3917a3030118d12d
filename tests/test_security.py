"""Transport security and authorization over real gRPC: mTLS between clients and services (and service to
service: the abrouter calling the scorer), TLS with role tokens, UNAUTHENTICATED / PERMISSION_DENIED, lease
ownership between two trainers, and tokens kept out of logs and spans. The plain profile is what every other
test runs."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guardmesh.certs import generate
from guardmesh.client import open_channel
from guardmesh.config import MeshConfig
from guardmesh.runtime import KNOWN_SERVICES, RunningService, load_definition, start_service
from guardmesh.tracing import setup_tracing
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as scpb
from guardmesh.v1 import scorer_pb2_grpc as scpb_grpc

from .conftest import make_config, node_pb


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("certs")
    tokens = generate(folder, KNOWN_SERVICES, extra_tokens={"trainer-b": "trainer"})
    return folder, tokens


def secure_config(tmp_path: Path, certs_dir: Path, mode: str, authorization: bool, **overrides: object) -> MeshConfig:
    return make_config(
        tmp_path,
        **{
            "security.mode": mode,
            "security.certs_dir": str(certs_dir),
            "security.authorization": authorization,
            "services.abrouter.port": 0,
            "services.scorer.port": 0,
            "abrouter.audit_interval_s": 0.0,
            **overrides,
        },
    )


@pytest.fixture
def mtls_mesh(tmp_path: Path, certs: tuple[Path, dict[str, str]]) -> Iterator[dict[str, object]]:
    folder, _ = certs
    server_config = secure_config(tmp_path, folder, "mtls", True)
    scorer = start_service(load_definition("scorer"), server_config, port=0)
    router_config = server_config.with_overrides({"services.scorer.port": scorer.port, "security.client_role": "app"})
    router = start_service(load_definition("abrouter"), router_config, port=0)
    scheduler = start_service(load_definition("scheduler"), server_config, port=0)
    yield {"config": server_config, "scorer": scorer, "router": router, "scheduler": scheduler, "certs": folder}
    for running in (router, scorer, scheduler):
        running.stop(grace=0.5)


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


def _model_payload() -> bytes:
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid()).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def test_mtls_end_to_end_with_roles_from_client_certificates(mtls_mesh: dict[str, object]) -> None:
    config: MeshConfig = mtls_mesh["config"]  # type: ignore[assignment]
    router: RunningService = mtls_mesh["router"]  # type: ignore[assignment]
    scorer: RunningService = mtls_mesh["scorer"]  # type: ignore[assignment]
    admin = open_channel("abrouter", config, address=router.address)  # client-admin.pem by default
    app_config = config.with_overrides({"security.client_role": "app"})
    app = open_channel("abrouter", app_config, address=router.address)
    with open_channel("scorer", config, address=scorer.address) as sch:
        scpb_grpc.ScorerServiceStub(sch).RegisterModel(
            scpb.RegisterModelRequest(
                model="risk",
                version="v1",
                features=["a", "b"],
                format=scpb.MODEL_FORMAT_TORCHSCRIPT,
                payload=_model_payload(),
                activate=True,
            )
        )
    try:
        spec = apb.ExperimentSpec(
            key="secure", arms=[apb.Arm(name="control", weight=0.5), apb.Arm(name="new", weight=0.5)], model="risk"
        )
        apb_grpc.ABRouterServiceStub(admin).CreateExperiment(apb.CreateExperimentRequest(spec=spec))
        app_stub = apb_grpc.ABRouterServiceStub(app)
        a = app_stub.Assign(apb.AssignRequest(unit_id="u1", experiment_keys=["secure"]))
        assert a.assignments[0].in_experiment
        # service to service: the abrouter (client-app certificate) calls the scorer over mTLS
        routed = app_stub.Route(
            apb.RouteRequest(experiment_key="secure", unit_id="u1", request_id="r1", features={"a": 1.0, "b": 0.0})
        )
        assert routed.score.model_version == "v1"
        code, msg = code_of(lambda: app_stub.CreateExperiment(apb.CreateExperimentRequest(spec=spec)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "role 'app' may not call" in msg
        assert "ABRouterService/CreateExperiment" in msg
    finally:
        admin.close()
        app.close()


def test_mtls_refuses_plain_clients_and_foreign_certificates(mtls_mesh: dict[str, object], tmp_path: Path) -> None:
    router: RunningService = mtls_mesh["router"]  # type: ignore[assignment]
    folder: Path = mtls_mesh["certs"]  # type: ignore[assignment]
    with grpc.insecure_channel(router.address) as plain:
        code, _ = code_of(lambda: health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE
    ca = (folder / "ca.pem").read_bytes()
    with grpc.secure_channel(router.address, grpc.ssl_channel_credentials(ca)) as no_cert:
        code, _ = code_of(
            lambda: health_pb2_grpc.HealthStub(no_cert).Check(health_pb2.HealthCheckRequest(), timeout=30)
        )
        assert code == grpc.StatusCode.UNAVAILABLE  # handshake refused: no client certificate
    other = tmp_path / "other-ca"
    generate(other, ["abrouter"])
    foreign = grpc.ssl_channel_credentials(
        ca, (other / "client-admin-key.pem").read_bytes(), (other / "client-admin.pem").read_bytes()
    )
    with grpc.secure_channel(router.address, foreign) as bad:
        code, _ = code_of(lambda: health_pb2_grpc.HealthStub(bad).Check(health_pb2.HealthCheckRequest(), timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE
    good = grpc.ssl_channel_credentials(
        ca, (folder / "client-app-key.pem").read_bytes(), (folder / "client-app.pem").read_bytes()
    )
    with grpc.secure_channel(router.address, good) as ok:
        resp = health_pb2_grpc.HealthStub(ok).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def token_scheduler(tmp_path: Path, certs: tuple[Path, dict[str, str]]) -> Iterator[tuple[MeshConfig, str]]:
    folder, _ = certs
    config = secure_config(tmp_path, folder, "tls", True, **{"scheduler.reap_interval_s": 0.05})
    running = start_service(load_definition("scheduler"), config, port=0)
    yield config, running.address
    running.stop(grace=0.5)


def stub_for(config: MeshConfig, address: str, token: str) -> spb_grpc.SchedulerServiceStub:
    return spb_grpc.SchedulerServiceStub(
        open_channel("scheduler", config.with_overrides({"security.token": token}), address=address)
    )


def job(job_id: str, owner: str = "") -> spb.JobSpec:
    return spb.JobSpec(
        job_id=job_id, tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=1024, owner=owner, lease_ttl_s=60
    )


def test_role_tokens_over_tls_and_lease_ownership(
    token_scheduler: tuple[MeshConfig, str], certs: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    config, address = token_scheduler
    _, tokens = certs
    spans = InMemorySpanExporter()
    setup_tracing("tests").add_span_processor(SimpleSpanProcessor(spans))
    caplog.set_level(logging.DEBUG)
    admin = stub_for(config, address, tokens["admin"])
    trainer = stub_for(config, address, tokens["trainer"])
    other = stub_for(config, address, tokens["trainer-b"])
    app = stub_for(config, address, tokens["app"])
    nobody = stub_for(config, address, "")
    forged = stub_for(config, address, "not-a-token")

    admin.RegisterNode(spb.RegisterNodeRequest(node=node_pb("n1", gpus=2, memory_mib=16384)))
    code, msg = code_of(lambda: nobody.ListNodes(spb.ListNodesRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing credentials" in msg
    code, msg = code_of(lambda: forged.ListNodes(spb.ListNodesRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in msg
    code, msg = code_of(
        lambda: trainer.RegisterNode(spb.RegisterNodeRequest(node=node_pb("n2", gpus=1, memory_mib=8192)))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "role 'trainer'" in msg
    code, _ = code_of(lambda: app.SubmitJob(spb.SubmitJobRequest(job=job("j-app"))))
    assert code == grpc.StatusCode.PERMISSION_DENIED

    placed = trainer.SubmitJob(spb.SubmitJobRequest(job=job("j-1"))).job
    assert placed.spec.owner == "trainer" and placed.state == spb.JOB_STATE_RUNNING
    code, msg = code_of(lambda: trainer.SubmitJob(spb.SubmitJobRequest(job=job("j-2", owner="trainer-b"))))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "job.owner" in msg
    trainer.RenewLease(spb.RenewLeaseRequest(job_id="j-1", replica=0))
    for call in (
        lambda: other.RenewLease(spb.RenewLeaseRequest(job_id="j-1", replica=0)),
        lambda: other.ReleaseJob(spb.ReleaseJobRequest(job_id="j-1")),
        lambda: other.DescribeJob(spb.DescribeJobRequest(job_id="j-1")),
    ):
        code, msg = code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "belongs to 'trainer', not to 'trainer-b'" in msg
    assert admin.DescribeJob(spb.DescribeJobRequest(job_id="j-1")).job.state == spb.JOB_STATE_RUNNING
    trainer.ReleaseJob(spb.ReleaseJobRequest(job_id="j-1"))

    with grpc.secure_channel(
        address, grpc.ssl_channel_credentials((Path(config.security.certs_dir) / "ca.pem").read_bytes())
    ) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # no credentials needed for health

    text = "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
    dumped = "\n".join(str(s.to_json()) for s in spans.get_finished_spans())
    assert spans.get_finished_spans()  # spans were recorded...
    for token in tokens.values():
        assert token not in text and token not in dumped  # ...without any token


def test_roles_file_with_an_unknown_role_is_a_config_error(tmp_path: Path, certs: tuple[Path, dict[str, str]]) -> None:
    from guardmesh.config import ConfigError

    bad = tmp_path / "roles.toml"
    bad.write_text('[certificates]\n"client-x" = "root"\n')
    config = secure_config(tmp_path, certs[0], "plain", True, **{"security.roles_file": str(bad)})
    with pytest.raises(ConfigError, match="unknown role 'root'"):
        start_service(load_definition("scheduler"), config, port=0)
