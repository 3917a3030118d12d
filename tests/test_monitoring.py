"""The monitoring matrix as Prometheus sees it: real service processes serve /metrics, scraped over HTTP and
parsed with prometheus_client's own text parser, after real traffic."""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as scpb
from guardmesh.v1 import scorer_pb2_grpc as scpb_grpc

from .conftest import node_pb
from .processes import ServiceProcess, free_port


class Service(ServiceProcess):
    """A service process that also serves /metrics on a port of its own."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.metrics_port = free_port()
        super().__init__(
            name,
            tmp_path,
            {
                f"GUARDMESH__SERVICES__{name.upper()}__METRICS_PORT": str(self.metrics_port),
                "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0.3",
                "GUARDMESH__ABROUTER__AUDIT_MIN_SAMPLE": "100",
                "GUARDMESH__ABROUTER__GUARDRAIL_INTERVAL_S": "0.2",
            },
            state=tmp_path / name,
        )
        self.start(timeout_s=60)
        self.grpc = self.channel()

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out


@pytest.fixture
def services(tmp_path: Path) -> Iterator[dict[str, Service]]:
    started: dict[str, Service] = {}
    try:
        for name in ("scheduler", "paramserver", "scorer", "abrouter"):
            started[name] = Service(name, tmp_path)
        yield started
    finally:
        for s in started.values():
            s.close(timeout_s=30, must_exit=True)


def _find(metrics: dict[str, list[tuple[dict[str, str], float]]], prefix: str) -> list[tuple[dict[str, str], float]]:
    found = [v for name, values in metrics.items() if name.startswith(prefix) for v in values]
    assert found, f"no metric {prefix}* in {sorted(metrics)}"
    return found


def test_every_service_serves_its_part_of_the_monitoring_matrix(services: dict[str, Service]) -> None:
    # scheduler: one of two T4 cards' memory allocated -> pool utilisation 0.5
    sched = spb_grpc.SchedulerServiceStub(services["scheduler"].grpc)
    sched.RegisterNode(spb.RegisterNodeRequest(node=node_pb("n1", gpus=2, memory_mib=16384, model="T4")))
    sched.SubmitJob(
        spb.SubmitJobRequest(
            job=spb.JobSpec(job_id="j", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=16384 - 512)
        )
    )
    sched.SubmitJob(
        spb.SubmitJobRequest(
            job=spb.JobSpec(
                job_id="big", tenant="t", replicas=2, gpus_per_replica=1, memory_mib_per_gpu=15000, gang=True
            )
        )
    )
    util = _find(services["scheduler"].scrape(), "guardmesh_scheduler_gpu_utilization")
    assert [(labels["pool"], round(v, 3)) for labels, v in util] == [("T4", round((16384 - 512) / (2 * 16384), 3))]
    pending = _find(services["scheduler"].scrape(), "guardmesh_scheduler_pending_jobs")
    assert pending[0][1] == 1.0

    # scorer: missing feature rate and F1 from feedback
    scorer = scpb_grpc.ScorerServiceStub(services["scorer"].grpc)
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid()).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    reference = np.random.default_rng(0).standard_normal((500, 2)).astype("<f4")
    from guardmesh.v1 import common_pb2

    scorer.RegisterModel(
        scpb.RegisterModelRequest(
            model="risk",
            version="v1",
            features=["a", "b"],
            format=scpb.MODEL_FORMAT_TORCHSCRIPT,
            payload=buf.getvalue(),
            activate=True,
            reference=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[500, 2], data=reference.tobytes()),
        )
    )
    for i in range(100):
        features = {"a": 0.5} if i % 10 == 0 else {"a": 0.5, "b": 0.1}  # b missing in 10% of requests
        scorer.Score(scpb.ScoreRequest(model="risk", request_id=f"r{i}", features=features))
        scorer.Feedback(scpb.FeedbackRequest(model="risk", labels=[scpb.Label(request_id=f"r{i}", label=i % 2 == 0)]))
    metrics = services["scorer"].scrape()
    missing = {labels["feature"]: v for labels, v in _find(metrics, "guardmesh_scorer_feature_missing_rate")}
    assert missing["a"] == 0.0 and missing["b"] == pytest.approx(0.1)
    f1 = _find(metrics, "guardmesh_scorer_f1")
    assert any(labels.get("version") == "v1" and 0.0 <= v <= 1.0 for labels, v in f1)
    _find(metrics, "guardmesh_scorer_drift_score")

    # abrouter: SRM p-value of the continuous audit, guardrail state
    router = apb_grpc.ABRouterServiceStub(services["abrouter"].grpc)
    router.CreateExperiment(
        apb.CreateExperimentRequest(
            spec=apb.ExperimentSpec(key="exp", arms=[apb.Arm(name="a", weight=0.5), apb.Arm(name="b", weight=0.5)])
        )
    )
    for i in range(300):
        router.Assign(apb.AssignRequest(unit_id=f"u{i}", experiment_keys=["exp"], log_exposure=True))
    deadline = time.monotonic() + 20
    while True:
        metrics = services["abrouter"].scrape()
        srm = [
            v for name, values in metrics.items() if name.startswith("guardmesh_abrouter_srm_p_value") for v in values
        ]
        if srm or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert srm and 0.0 <= srm[0][1] <= 1.0 and srm[0][0]["experiment"] == "exp"
    state = _find(metrics, "guardmesh_abrouter_guardrail_state")
    assert state == [({"experiment": "exp"}, 0.0)] or [(lbl["experiment"], v) for lbl, v in state] == [("exp", 0.0)]
    exposed = _find(metrics, "guardmesh_abrouter_exposed_units")
    assert exposed[0][1] == 300.0


def test_paramserver_staleness_and_rejections_are_scraped(services: dict[str, Service]) -> None:
    from guardmesh.v1 import common_pb2
    from guardmesh.v1 import paramserver_pb2 as ppb
    from guardmesh.v1 import paramserver_pb2_grpc as ppb_grpc

    ps = ppb_grpc.ParamServerServiceStub(services["paramserver"].grpc)
    zeros = np.zeros(4, dtype="<f4")
    tensor = common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[4], data=zeros.tobytes())
    ps.CreateModel(
        ppb.CreateModelRequest(
            model="m",
            tensors=[ppb.NamedTensor(name="w", tensor=tensor)],
            optimizer=ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_SGD, learning_rate=0.1),
            consistency=ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_BOUNDED_STALENESS, max_staleness=1),
        )
    )
    for step in range(3):  # versions 1, 2, 3
        ps.Push(
            ppb.PushRequest(
                model="m",
                worker_id="w1",
                base_version=step,
                step_id=step,
                gradients=[ppb.NamedTensor(name="w", tensor=tensor)],
            )
        )
    with pytest.raises(grpc.RpcError) as info:  # 3 versions stale, bound 1: rejected
        ps.Push(
            ppb.PushRequest(
                model="m",
                worker_id="w2",
                base_version=0,
                step_id=0,
                gradients=[ppb.NamedTensor(name="w", tensor=tensor)],
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    metrics = services["paramserver"].scrape()
    pushes = {
        labels["outcome"]: v for labels, v in _find(metrics, "guardmesh_paramserver_pushes") if "outcome" in labels
    }
    assert pushes["APPLIED"] == 3.0 and pushes["REJECTED_FAILED_PRECONDITION"] == 1.0
    counts = [
        v
        for name, values in metrics.items()
        if name.startswith("guardmesh_paramserver_staleness") and name.endswith("_count")
        for _, v in values
    ]
    assert counts and counts[0] >= 3.0
