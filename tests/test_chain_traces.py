"""Traces across the chain, assembled from spans the way a trace backend (Jaeger) does.

The four services run as real processes exporting OTLP to :class:`tests.otlp_receiver.OtlpReceiver`; this
process plays the application and the trainer, and its own spans are collected in memory. Two flows:

* an application request: Route on the abrouter -> live Score on the scorer, and the shadow Score as a
  child span of the same trace, with the attributes someone investigating a wrong decision needs;
* a training step: a lease renewal on the scheduler, then the paramserver pull and push (with version and
  staleness) inside the SDK's ``guardmesh.train_step`` span: one trace.

Edges (caller service -> callee service) are derived from parent links between a CLIENT span and the
SERVER span it caused, as Jaeger's dependency view does.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guardmesh.client import open_channel
from guardmesh.sdk.paramserver import ParamServerClient
from guardmesh.tracing import tracer_provider
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import paramserver_pb2 as ppb
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as scpb
from guardmesh.v1 import scorer_pb2_grpc as scpb_grpc
from tests.conftest import make_config, node_pb
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.processes import ServiceProcess, free_port, start_all, stop_all

SERVICES = ("scheduler", "paramserver", "scorer", "abrouter")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[dict[str, int], OtlpReceiver, dict[str, ServiceProcess]]]:
    receiver = OtlpReceiver()
    ports = {s: free_port() for s in SERVICES}
    env = {f"GUARDMESH__SERVICES__{s.upper()}__PORT": str(p) for s, p in ports.items()}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "120000",  # spans arrive through the flush on SIGTERM
        "GUARDMESH__MESH__STATE_DIR": str(tmp_path / "state"),
        "GUARDMESH__GRPC__GRACE_S": "2.0",
        "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
    }
    procs = {s: ServiceProcess(s, tmp_path, env, port=ports[s]) for s in SERVICES}
    try:
        start_all(procs.values())  # START_TIMEOUT_S: four torch imports at once on a loaded machine
        yield ports, receiver, procs
    finally:
        stop_all(procs.values(), timeout_s=60)
        receiver.stop()


def _local_spans(exporter: InMemorySpanExporter, service: str) -> list[ReceivedSpan]:
    out = []
    for s in exporter.get_finished_spans():
        ctx = s.get_span_context()
        parent = s.parent.span_id if s.parent is not None else 0
        out.append(
            ReceivedSpan(
                trace_id=format(ctx.trace_id, "032x"),
                span_id=format(ctx.span_id, "016x"),
                parent_span_id=format(parent, "016x") if parent else "",
                name=s.name,
                kind=s.kind.name,
                service_name=service,
                attributes=dict(s.attributes or {}),
            )
        )
    return out


def edges(spans: list[ReceivedSpan]) -> set[tuple[str, str, str]]:
    """(caller service, callee service, RPC) for every SERVER span whose parent is another service's span."""
    by_id = {s.span_id: s for s in spans}
    out = set()
    for s in spans:
        parent = by_id.get(s.parent_span_id)
        if s.kind == "SERVER" and parent is not None and parent.service_name != s.service_name:
            out.add((parent.service_name, s.service_name, s.name.rsplit("/", 1)[-1]))
    return out


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


def _torchscript() -> bytes:
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid()).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


@pytest.mark.timeout(600)
def test_application_request_and_training_step_are_each_one_trace_across_services(
    tmp_path: Path, mesh: tuple[dict[str, int], OtlpReceiver, dict[str, ServiceProcess]]
) -> None:
    ports, receiver, procs = mesh
    config = make_config(tmp_path, **{f"services.{s}.port": p for s, p in ports.items()})
    local = InMemorySpanExporter()
    tracer_provider().add_span_processor(SimpleSpanProcessor(local))
    tracer = tracer_provider().get_tracer("tests.chain")

    # -- set-up (admin calls, not part of the traces checked)
    with open_channel("scorer", config) as ch:
        scpb_grpc.ScorerServiceStub(ch).RegisterModel(
            scpb.RegisterModelRequest(
                model="risk",
                version="v1",
                features=["a", "b"],
                format=scpb.MODEL_FORMAT_TORCHSCRIPT,
                payload=_torchscript(),
                activate=True,
            )
        )
        scpb_grpc.ScorerServiceStub(ch).RegisterModel(
            scpb.RegisterModelRequest(
                model="risk",
                version="v2",
                features=["a", "b"],
                format=scpb.MODEL_FORMAT_TORCHSCRIPT,
                payload=_torchscript(),
            )
        )
    router_channel = open_channel("abrouter", config)
    router = apb_grpc.ABRouterServiceStub(router_channel)
    router.CreateExperiment(
        apb.CreateExperimentRequest(
            spec=apb.ExperimentSpec(
                key="model-ab",
                model="risk",
                arms=[apb.Arm(name="control", weight=0.5), apb.Arm(name="new", weight=0.5)],
                shadow=apb.ShadowConfig(version="v2", fraction=1.0),
            )
        )
    )
    sched_channel = open_channel("scheduler", config)
    sched = spb_grpc.SchedulerServiceStub(sched_channel)
    sched.RegisterNode(spb.RegisterNodeRequest(node=node_pb("n1", gpus=2, memory_mib=16384)))
    sched.SubmitJob(
        spb.SubmitJobRequest(
            job=spb.JobSpec(job_id="train", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=4096)
        )
    )
    model = torch.nn.Linear(4, 1)
    ps = ParamServerClient.connect("chain", config=config, addresses=[f"127.0.0.1:{ports['paramserver']}"])
    ps.create_from_module(
        model,
        ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_SGD, learning_rate=0.1),
        ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_ASYNC),
    )

    # -- flow 1: one application request
    with tracer.start_as_current_span("app.request") as app_root:
        routed = router.Route(
            apb.RouteRequest(
                experiment_key="model-ab",
                unit_id="user-7",
                request_id="req-7",
                features={"a": 0.2, "b": 1.0},
                log_exposure=True,
            )
        )
    assert routed.shadowed
    deadline = time.monotonic() + 60
    while router.GetShadowReport(apb.GetShadowReportRequest(key="model-ab")).compared < 1:
        assert time.monotonic() < deadline, "the shadow call never completed"
        time.sleep(0.05)

    # -- flow 2: one training step with its lease heartbeat
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    with tracer.start_as_current_span("trainer.loop") as train_root:
        sched.RenewLease(spb.RenewLeaseRequest(job_id="train", replica=0))

        def compute() -> float:
            loss = model(x).pow(2).mean()
            loss.backward()
            return float(loss.item())

        ps.train_step(model, compute)
    ps.close()
    router_channel.close()
    sched_channel.close()

    codes = stop_all(procs.values(), timeout_s=60)  # flush every service's spans (SIGTERM drain)
    assert codes == dict.fromkeys(SERVICES, 0), codes
    deadline = time.monotonic() + 10
    app_trace = format(app_root.get_span_context().trace_id, "032x")
    train_trace = format(train_root.get_span_context().trace_id, "032x")

    def collected() -> list[ReceivedSpan]:
        return receiver.spans + _local_spans(local, "client")

    while time.monotonic() < deadline:
        names = {(s.service_name, s.name) for s in collected() if s.trace_id in (app_trace, train_trace)}
        if ("paramserver", "/guardmesh.v1.ParamServerService/Push") in names and sum(
            1 for n in names if n[0] == "scorer"
        ) >= 1:
            break
        time.sleep(0.1)
    spans = collected()

    app = [s for s in spans if s.trace_id == app_trace]
    by_id = {s.span_id: s for s in app}
    assert edges(app) >= {("client", "abrouter", "Route"), ("abrouter", "scorer", "Score")}
    route = next(s for s in app if s.service_name == "abrouter" and s.kind == "SERVER")
    for attr in (
        "guardmesh.experiment",
        "guardmesh.arm",
        "guardmesh.model_version",
        "guardmesh.drift_score",
        "guardmesh.threshold",
        "guardmesh.decision_path",
        "guardmesh.config_version",
    ):
        assert attr in route.attributes, attr
    assert route.attributes["guardmesh.experiment"] == "model-ab"
    scores = [s for s in app if s.service_name == "scorer" and s.kind == "SERVER"]
    assert len(scores) == 2  # the live call and the shadow call, in the same trace
    shadow = [s for s in scores if s.attributes.get("guardmesh.shadow")]
    live = [s for s in scores if not s.attributes.get("guardmesh.shadow")]
    assert len(shadow) == 1 and len(live) == 1
    assert live[0].attributes["guardmesh.model_version"] == routed.score.model_version
    assert shadow[0].attributes["guardmesh.model_version"] == "v2"
    chain = ancestors(shadow[0], by_id)
    assert any(s.name == "abrouter.shadow" and s.service_name == "abrouter" for s in chain)
    assert route in chain  # the shadow span hangs under the Route request it mirrors

    train = [s for s in spans if s.trace_id == train_trace]
    assert edges(train) >= {
        ("client", "scheduler", "RenewLease"),
        ("client", "paramserver", "Pull"),
        ("client", "paramserver", "Push"),
    }
    push = next(s for s in train if s.service_name == "paramserver" and s.name.endswith("/Push") and s.kind == "SERVER")
    assert push.attributes["guardmesh.version"] >= 1 and "guardmesh.staleness" in push.attributes
    step = next(s for s in train if s.name == "guardmesh.train_step")
    assert step.attributes["guardmesh.model"] == "chain" and step.attributes["guardmesh.staleness"] == (0,)
