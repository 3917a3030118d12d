"""The monitoring matrix as Prometheus sees it: real service processes serve /metrics, scraped over HTTP and
parsed with prometheus_client's own text parser, after real traffic."""

from __future__ import annotations

import io
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from guardmesh.monitoring import PROMETHEUS_NAMES
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as scpb
from guardmesh.v1 import scorer_pb2_grpc as scpb_grpc

from .conftest import REPO, node_pb
from .processes import ServiceProcess, free_port, start_all


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
                "GUARDMESH__SCORER__MIN_LABELS": "50",
            },
            state=tmp_path / name,
        )
        self.grpc = self.channel()

    def exposition(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as resp:
            assert resp.status == 200
            return resp.read().decode()  # type: ignore[no-any-return]

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.exposition()):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out


@pytest.fixture
def services(tmp_path: Path) -> Iterator[dict[str, Service]]:
    started: dict[str, Service] = {}
    try:
        for name in ("scheduler", "paramserver", "scorer", "abrouter"):
            started[name] = Service(name, tmp_path)
        # Overlapping start-ups with START_TIMEOUT_S each: one after the other with 60 s each did not fit
        # four imports of torch on a loaded machine.
        start_all(started.values())
        yield started
    finally:
        for s in started.values():
            s.close(timeout_s=30, must_exit=True)


def _find(metrics: dict[str, list[tuple[dict[str, str], float]]], prefix: str) -> list[tuple[dict[str, str], float]]:
    found = [v for name, values in metrics.items() if name.startswith(prefix) for v in values]
    assert found, f"no metric {prefix}* in {sorted(metrics)}"
    return found


def test_every_service_serves_its_part_of_the_monitoring_matrix(services: dict[str, Service]) -> None:
    _drive_matrix(services)


def _drive_matrix(services: dict[str, Service]) -> None:
    """Traffic to the scheduler, scorer and abrouter, checking each one's gauges and RPC metrics."""
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
    with pytest.raises(grpc.RpcError) as bad:
        sched.SubmitJob(spb.SubmitJobRequest(job=spb.JobSpec(job_id="bad", tenant="t", replicas=0)))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    allocated = _find(services["scheduler"].scrape(), "guardmesh_scheduler_gpu_memory_allocated_ratio")
    assert [(lbl["pool"], round(v, 3)) for lbl, v in allocated] == [("T4", round((16384 - 512) / (2 * 16384), 3))]
    busy = _find(services["scheduler"].scrape(), "guardmesh_scheduler_gpu_utilization_ratio")
    assert [(lbl["pool"], v) for lbl, v in busy] == [("T4", 0.0)]  # no agent reported NVML utilisation
    rpcs = {
        (lbl["rpc_method"], lbl["rpc_grpc_status_code"]): v
        for lbl, v in _find(services["scheduler"].scrape(), "rpc_server_duration_milliseconds_count")
        if lbl["rpc_service"] == "guardmesh.v1.SchedulerService"
    }
    # OpenTelemetry's RPC conventions: requests by method, errors by status code (3: INVALID_ARGUMENT).
    assert rpcs[("SubmitJob", "0")] == 2.0 and rpcs[("SubmitJob", "3")] == 1.0 and rpcs[("RegisterNode", "0")] == 1.0
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
            baseline_f1=0.9,
            max_f1_drop=1.0,  # the F1 drop is observed, never acted on, here
            reference=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[500, 2], data=reference.tobytes()),
        )
    )
    for i in range(100):
        features = {"a": 0.5} if i % 10 == 0 else {"a": 0.5, "b": 0.1}  # b missing in 10% of requests
        scorer.Score(scpb.ScoreRequest(model="risk", request_id=f"r{i}", features=features))
        scorer.Feedback(scpb.FeedbackRequest(model="risk", labels=[scpb.Label(request_id=f"r{i}", label=i % 2 == 0)]))
    metrics = services["scorer"].scrape()
    missing = {labels["feature"]: v for labels, v in _find(metrics, "guardmesh_scorer_feature_missing_ratio")}
    assert missing["a"] == 0.0 and missing["b"] == pytest.approx(0.1)
    f1 = _find(metrics, "guardmesh_scorer_f1_ratio")
    assert any(labels.get("version") == "v1" and 0.0 <= v <= 1.0 for labels, v in f1)
    (drop,) = [v for labels, v in _find(metrics, "guardmesh_scorer_f1_drop_ratio") if labels.get("version") == "v1"]
    (f1_v1,) = [v for labels, v in f1 if labels.get("version") == "v1"]
    assert drop == pytest.approx((0.9 - f1_v1) / 0.9)
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
    deadline = time.monotonic() + 60
    while True:
        metrics = services["abrouter"].scrape()
        srm = [
            v for name, values in metrics.items() if name.startswith("guardmesh_abrouter_srm_p_value") for v in values
        ]
        if srm or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert srm and 0.0 <= srm[0][1] <= 1.0 and srm[0][0]["experiment"] == "exp"
    assert "guardmesh_abrouter_srm_p_value_ratio" in metrics
    state = _find(metrics, "guardmesh_abrouter_guardrail_state")
    assert state == [({"experiment": "exp"}, 0.0)] or [(lbl["experiment"], v) for lbl, v in state] == [("exp", 0.0)]
    exposed = _find(metrics, "guardmesh_abrouter_exposed_units")
    assert exposed[0][1] == 300.0


def _drive_paramserver(services: dict[str, Service]) -> None:
    """Three applied pushes (staleness 0) and one rejected as 3 versions stale under a bound of 1."""
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


def test_paramserver_staleness_and_rejections_are_scraped(services: dict[str, Service]) -> None:
    _drive_paramserver(services)
    metrics = services["paramserver"].scrape()
    pushes = {
        labels["outcome"]: v for labels, v in _find(metrics, "guardmesh_paramserver_pushes") if "outcome" in labels
    }
    assert pushes["APPLIED"] == 3.0 and pushes["REJECTED_FAILED_PRECONDITION"] == 1.0
    (count,) = [v for _, v in metrics["guardmesh_paramserver_staleness_versions_count"]]
    assert count == 3.0
    # A bucket per version at the small end: a bound of 1 or 2 can be read off the histogram.
    bounds = sorted(float(lbl["le"]) for lbl, _ in metrics["guardmesh_paramserver_staleness_versions_bucket"])
    assert bounds[:5] == [0.0, 1.0, 2.0, 3.0, 4.0]


def _readme_metric_names() -> set[str]:
    """The metric names in the first column of the README's monitoring table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Monitoring") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([a-z0-9_]+)(?:\{[^}]*\})?`", row.split(" | ")[0])}


def test_readme_monitoring_table_lists_exactly_the_exported_names() -> None:
    assert _readme_metric_names() == set(PROMETHEUS_NAMES)


def test_every_exported_name_is_scraped_with_help_and_no_empty_labels(services: dict[str, Service]) -> None:
    _drive_matrix(services)
    _drive_paramserver(services)
    for name, owner in PROMETHEUS_NAMES.items():
        owners = list(services) if owner == "every service" else [owner]
        for owner_name in owners:
            families = {f.name: f for f in text_string_to_metric_families(services[owner_name].exposition())}
            family = families.get(name) or families.get(name.removesuffix("_total"))
            assert family is not None, f"{name} not served by {owner_name}: {sorted(families)}"
            assert family.documentation.strip(), f"{name}: no HELP text"
            assert family.samples, name
    for process in services.values():
        text = process.exposition()
        assert "otel_scope_" not in text
        assert not re.search(r'[a-z_]+=""', text), "an empty label"
