"""Guards of the A/B router over real gRPC (issue #18): guardrails count what the analysis counts, a true drop
trips the sequential guardrail, bandits keep exposed units on their arm (GrowthBook parity of targeting and
weights: test_abrouter_targeting.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from guardmesh.sdk.abrouter import ABRouterClient, Bandit, Guardrail
from guardmesh.v1 import abrouter_pb2 as pb

from .test_abrouter import (
    Stub,
    assign_one,
    code_of,
    create,
    serve_router,
    spec,
    start_router,
)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Stub]:
    yield from serve_router(tmp_path)


def _wait_state(stub: Stub, key: str, state: int, timeout: float = 30.0) -> pb.Experiment:
    deadline = time.monotonic() + timeout
    while True:
        exp = stub.GetExperiment(pb.GetExperimentRequest(key=key)).experiment
        if exp.state == state or time.monotonic() > deadline:
            return exp
        time.sleep(0.1)


def test_event_metric_recorded_only_when_it_happens_trips_and_matches_the_analysis(router: Stub) -> None:
    """Conversions are recorded only for converting units (30 % control, 10 % treatment): silent exposed units
    count 0 in the guardrail exactly as in the analysis, so the guardrail rolls the experiment back."""
    create(
        router,
        "events",
        metrics=["conversion"],
        metric_kinds={"conversion": pb.METRIC_KIND_EVENT},
        guardrails=[pb.Guardrail(metric="conversion", higher_is_better=True, max_relative_drop=0.05, min_units=200)],
    )
    observations = []
    exposed, converted = [0, 0], [0, 0]
    for i in range(1200):
        uid = f"user-{i}"
        arm = assign_one(router, "events", uid).arm_index
        exposed[arm] += 1
        if (i % 10) < (3 if arm == 0 else 1):
            converted[arm] += 1
            observations.append(pb.MetricObservation(unit_id=uid, metric="conversion", value=1.0))
    router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="events", observations=observations))
    exp = _wait_state(router, "events", pb.EXPERIMENT_STATE_ROLLED_BACK)
    assert exp.state == pb.EXPERIMENT_STATE_ROLLED_BACK, exp.reason
    assert "sequential p=" in exp.reason and "upper bound" in exp.reason

    status = router.GetGuardrailStatus(pb.GetGuardrailStatusRequest(key="events"))
    [v] = status.verdicts
    assert status.state == pb.EXPERIMENT_STATE_ROLLED_BACK and v.tripped and v.arm == "treatment1"
    assert [v.n_control, v.n_arm] == exposed  # every exposed unit counts, silent ones as 0
    assert v.control_mean == pytest.approx(converted[0] / exposed[0])
    assert v.arm_mean == pytest.approx(converted[1] / exposed[1])
    assert v.relative_change < v.upper_bound < -0.05 and v.sequential_p_value < 0.05

    analysis = router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="events", bootstrap_resamples=50))
    [m] = analysis.metrics
    assert (m.n_control, m.n_treatment) == (v.n_control, v.n_arm)
    assert m.control_mean == pytest.approx(v.control_mean) and m.treatment_mean == pytest.approx(v.arm_mean)
    assert m.relative_effect == pytest.approx(v.relative_change)
    code, details = code_of(
        lambda: router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="events", aggregate="mean"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("aggregate:") and "EVENT" in details


def test_continuous_metric_leaves_silent_units_out_of_guardrail_and_analysis(router: Stub) -> None:
    create(
        router,
        "latency",
        metrics=["latency_ms"],
        metric_kinds={"latency_ms": pb.METRIC_KIND_CONTINUOUS},
        guardrails=[pb.Guardrail(metric="latency_ms", higher_is_better=False, max_relative_drop=0.05, min_units=50)],
    )
    rng = np.random.default_rng(1)
    observations = []
    for i in range(400):
        uid = f"u{i}"
        arm = assign_one(router, "latency", uid).arm_index
        if i % 4 == 0:
            continue  # a quarter of the units never report a latency
        for _ in range(2):  # two requests each: the unit's value is their mean
            value = rng.normal(100.0 if arm == 0 else 100.5, 5.0)
            observations.append(pb.MetricObservation(unit_id=uid, metric="latency_ms", value=float(value)))
    router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="latency", observations=observations))
    [v] = router.GetGuardrailStatus(pb.GetGuardrailStatusRequest(key="latency")).verdicts
    assert v.n_control + v.n_arm == 300 and not v.tripped
    [m] = router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="latency", bootstrap_resamples=50)).metrics
    assert (m.n_control, m.n_treatment) == (v.n_control, v.n_arm)
    assert m.control_mean == pytest.approx(v.control_mean) and m.treatment_mean == pytest.approx(v.arm_mean)
    code, details = code_of(
        lambda: create(router, "bad-kind", metrics=["a"], metric_kinds={"b": pb.METRIC_KIND_CONTINUOUS})
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.metric_kinds[b]:")


def test_a_true_drop_in_a_continuous_metric_trips_the_sequential_guardrail(router: Stub) -> None:
    create(
        router,
        "revenue",
        metrics=["revenue"],
        metric_kinds={"revenue": pb.METRIC_KIND_CONTINUOUS},
        guardrails=[pb.Guardrail(metric="revenue", higher_is_better=True, max_relative_drop=0.02, min_units=100)],
    )
    rng = np.random.default_rng(2)
    observations = []
    for i in range(1000):
        uid = f"u{i}"
        arm = assign_one(router, "revenue", uid).arm_index
        value = rng.normal(10.0 if arm == 0 else 9.0, 2.0)  # a true 10 % drop
        observations.append(pb.MetricObservation(unit_id=uid, metric="revenue", value=float(value)))
    router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="revenue", observations=observations))
    exp = _wait_state(router, "revenue", pb.EXPERIMENT_STATE_ROLLED_BACK)
    assert exp.state == pb.EXPERIMENT_STATE_ROLLED_BACK and list(exp.weights) == [1.0, 0.0]
    events = router.ListRouterEvents(pb.ListRouterEventsRequest(experiment_key="revenue")).events
    assert events[-1].kind == pb.ROUTER_EVENT_KIND_GUARDRAIL_TRIPPED


def _bandit(**kw: object) -> pb.ExperimentSpec:
    return spec(
        "bandit",
        (0.5, 0.5),
        metrics=["reward"],
        mode=pb.ALLOCATION_MODE_BANDIT,
        bandit=pb.BanditConfig(
            reward_metric="reward",
            kind=pb.REWARD_KIND_BERNOULLI,
            update_interval_s=0.05,
            min_weight=0.05,
            min_rewards=50,
        ),
        **kw,
    )


def test_bandits_require_sticky_bucketing_and_keep_exposed_units_on_their_arm(router: Stub) -> None:
    code, details = code_of(lambda: router.CreateExperiment(pb.CreateExperimentRequest(spec=_bandit())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.sticky_bucketing:")
    router.CreateExperiment(pb.CreateExperimentRequest(spec=_bandit(sticky_bucketing=True)))
    rng = np.random.default_rng(3)
    first: dict[str, pb.Assignment] = {}
    observations = []
    for i in range(300):
        uid = f"u{i}"
        a = first[uid] = assign_one(router, "bandit", uid)
        p = 0.05 if a.arm_index == 0 else 0.5
        observations.append(pb.MetricObservation(unit_id=uid, metric="reward", value=float(rng.random() < p)))
    router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="bandit", observations=observations))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        exp = router.GetExperiment(pb.GetExperimentRequest(key="bandit")).experiment
        if exp.weights[1] > 0.7:
            break
        time.sleep(0.1)
    assert exp.weights[1] > 0.7, list(exp.weights)  # the bandit moved the weights
    again = {uid: assign_one(router, "bandit", uid) for uid in first}
    assert all(again[u].arm_index == first[u].arm_index for u in first)
    assert {a.reason for a in again.values()} == {"sticky"}
    accepted = router.RecordMetrics(
        pb.RecordMetricsRequest(
            experiment_key="bandit",
            observations=[
                pb.MetricObservation(unit_id=u, metric="reward", value=0.0, arm=a.arm) for u, a in again.items()
            ],
        )
    )
    assert accepted.recorded == 300


def test_audit_windows_by_every_logged_categorical_covariate(router: Stub) -> None:
    create(router, "sites")
    rng = np.random.default_rng(4)
    for i in range(400):
        covariates = pb.Covariates(numeric={"age": float(rng.normal(50, 10))}, categorical={"site": f"s{i % 2}"})
        assign_one(router, "sites", f"u{i}", covariates=covariates)
    report = router.AuditExperiment(pb.AuditExperimentRequest(key="sites", min_sample=100))
    windows = {b.window for b in report.balance if b.covariate == "age"}
    assert {"site:s0", "site:s1"} <= windows
    assert "arm_share:site" in {t.name for t in report.clustering}
    code, details = code_of(
        lambda: router.AuditExperiment(pb.AuditExperimentRequest(key="sites", window_covariates=["device"]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("window_covariates[0]:")


def test_sdk_declares_metric_kinds_bandits_sticky_and_reads_guardrail_status(tmp_path: Path) -> None:
    running, config, _, channel = start_router(tmp_path)
    try:
        with ABRouterClient(config, address=running.address) as ab:
            ab.create_experiment(
                "sdk",
                {"control": 0.5, "treatment": 0.5},
                metrics=["latency_ms"],
                metric_kinds={"latency_ms": "continuous"},
                guardrails=[Guardrail("latency_ms", higher_is_better=False, min_units=2)],
            )
            exp = ab.create_experiment("sdk-bandit", {"a": 0.5, "b": 0.5}, metrics=["r"], bandit=Bandit("r"))
            assert exp.spec.sticky_bucketing  # the SDK asks for what a bandit requires
            for i in range(20):
                ab.assign_one(f"u{i}", "sdk", log_exposure=True)
            ab.record_metrics("sdk", [(f"u{i}", "latency_ms", 100.0 + i % 3) for i in range(0, 20, 2)])
            state, checks = ab.guardrail_status("sdk")
            assert state == "running" and [c.metric for c in checks] == ["latency_ms"]
            assert checks[0].n_control + checks[0].n_arm == 10 and not checks[0].tripped
            assert math.isfinite(checks[0].upper_bound) and 0.0 <= checks[0].sequential_p_value <= 1.0
    finally:
        channel.close()
        running.stop(grace=0.5)
