"""The abrouter over real gRPC: experiments and their history, GrowthBook-compatible assignment, sticky
bucketing, the durable exposure log (kill -9 of the real process), audits, balance, analysis, guardrails,
bandits, shadow traffic through a real scorer, and bad input that leaves state unchanged."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2
from growthbook import Experiment as GBExperiment
from growthbook import GrowthBook
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardmesh.client import open_channel
from guardmesh.config import ABRouterSettings, MeshConfig
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from guardmesh.v1 import scorer_pb2 as spb
from guardmesh.v1 import scorer_pb2_grpc as spb_grpc
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.router import Router

from .conftest import REPO, make_config
from .processes import ServiceProcess

Stub = pb_grpc.ABRouterServiceStub


def start_router(tmp_path: Path, **overrides: object) -> tuple[RunningService, MeshConfig, Stub, grpc.Channel]:
    config = make_config(
        tmp_path,
        **{
            "services.abrouter.port": 0,
            "abrouter.guardrail_interval_s": 0.1,
            "abrouter.audit_interval_s": 0.0,
            "abrouter.sqlite_synchronous": "NORMAL",
            **overrides,
        },
    )
    running = start_service(load_definition("abrouter"), config, port=0)
    channel = open_channel("abrouter", config, address=running.address)
    return running, config, pb_grpc.ABRouterServiceStub(channel), channel


def serve_router(tmp_path: Path) -> Iterator[Stub]:
    """A router over real gRPC for the length of a test (the body of every ``router`` fixture)."""
    running, _, stub, channel = start_router(tmp_path)
    yield stub
    channel.close()
    running.stop(grace=0.5)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Stub]:
    yield from serve_router(tmp_path)


def spec(key: str = "exp", weights: tuple[float, ...] = (0.5, 0.5), **kw: object) -> pb.ExperimentSpec:
    arms = [pb.Arm(name=("control" if i == 0 else f"treatment{i}"), weight=w) for i, w in enumerate(weights)]
    return pb.ExperimentSpec(key=key, arms=arms, **kw)  # type: ignore[arg-type]


def create(stub: Stub, key: str = "exp", weights: tuple[float, ...] = (0.5, 0.5), **kw: object) -> pb.Experiment:
    return stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec(key, weights, **kw))).experiment


def assign_one(stub: Stub, key: str, unit: str, *, log: bool = True, **kw: object) -> pb.Assignment:
    resp = stub.Assign(pb.AssignRequest(unit_id=unit, experiment_keys=[key], log_exposure=log, **kw))  # type: ignore[arg-type]
    return resp.assignments[0]


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_lifecycle_versions_history_and_events(router: Stub) -> None:
    exp = create(router, weights=(0.5, 0.5), metrics=["clicks"])
    assert exp.version == 1 and exp.state == pb.EXPERIMENT_STATE_RUNNING and list(exp.weights) == [0.5, 0.5]
    updated = router.UpdateExperiment(
        pb.UpdateExperimentRequest(
            spec=spec(weights=(0.2, 0.8), metrics=["clicks"]), expected_version=1, comment="ramp"
        )
    ).experiment
    assert updated.version == 2 and list(updated.weights) == [0.2, 0.8]
    code, msg = code_of(
        lambda: router.UpdateExperiment(pb.UpdateExperimentRequest(spec=spec(weights=(0.5, 0.5)), expected_version=1))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "expected_version" in msg and "version 2" in msg
    stopped = router.StopExperiment(pb.StopExperimentRequest(key="exp", reason="done")).experiment
    assert stopped.state == pb.EXPERIMENT_STATE_STOPPED and stopped.version == 3 and stopped.reason == "done"
    assert assign_one(router, "exp", "u1").reason == "stopped"
    code, _ = code_of(lambda: router.StopExperiment(pb.StopExperimentRequest(key="exp")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    history = router.GetExperimentHistory(pb.GetExperimentHistoryRequest(key="exp")).revisions
    assert [(r.version, r.change) for r in history] == [(1, "created"), (2, "updated"), (3, "stopped")]
    assert history[1].comment == "ramp" and list(history[1].experiment.weights) == [0.2, 0.8]
    events = router.ListRouterEvents(pb.ListRouterEventsRequest(experiment_key="exp")).events
    assert [e.kind for e in events] == [pb.ROUTER_EVENT_KIND_CONFIG_CHANGED] * 3
    listed = router.ListExperiments(pb.ListExperimentsRequest()).experiments
    assert [(e.spec.key, e.state) for e in listed] == [("exp", pb.EXPERIMENT_STATE_STOPPED)]


def test_assign_over_grpc_is_growthbooks_and_targets_with_its_conditions(router: Stub) -> None:
    condition = {"country": {"$in": ["US", "CA"]}}
    create(router, "gb", (0.3, 0.7), coverage=0.8, hash_version=2, condition_json=json.dumps(condition))
    gb_exp = GBExperiment(
        key="gb", variations=[0, 1], weights=[0.3, 0.7], coverage=0.8, hashVersion=2, condition=condition
    )
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(300):
        uid = f"user-{i}" if i % 3 else f"ü-{i}-日本😀"
        country = str(rng.choice(["US", "CA", "FR"]))
        attrs = struct_pb2.Struct()
        attrs.update({"country": country})
        a = router.Assign(pb.AssignRequest(unit_id=uid, attributes=attrs, experiment_keys=["gb"])).assignments[0]
        theirs = GrowthBook(attributes={"id": uid, "country": country}).run(gb_exp)
        assert a.in_experiment == theirs.inExperiment
        seen.add(a.reason)
        if theirs.inExperiment:
            assert a.arm_index == theirs.variationId and a.bucket == theirs.bucket
            assert a.propensity == pytest.approx([0.3, 0.7][a.arm_index])
        assert a.hash_version == 2 and a.config_version == 1 and not a.exposure_logged
    assert {"assigned", "not_targeted", "not_covered"} <= seen


def test_every_running_experiment_when_none_is_named_and_namespaces_exclude(router: Stub) -> None:
    create(router, "left", namespace=pb.Namespace(name="layer", start=0.0, end=0.5))
    create(router, "right", namespace=pb.Namespace(name="layer", start=0.5, end=1.0))
    create(router, "other")
    both = 0
    for i in range(400):
        resp = router.Assign(pb.AssignRequest(unit_id=f"u{i}"))
        assert [a.experiment_key for a in resp.assignments] == ["left", "other", "right"]
        by_key = {a.experiment_key: a for a in resp.assignments}
        assert by_key["left"].in_experiment != by_key["right"].in_experiment  # mutually exclusive, full layer
        both += by_key["other"].in_experiment
    assert both == 400


def test_sticky_bucketing_keeps_exposed_units_when_weights_change(router: Stub) -> None:
    create(router, "sticky", (0.5, 0.5), sticky_bucketing=True)
    create(router, "loose", (0.5, 0.5))
    units = [f"user-{i}" for i in range(300)]
    first = {k: {u: assign_one(router, k, u).arm_index for u in units} for k in ("sticky", "loose")}
    for key in ("sticky", "loose"):
        router.UpdateExperiment(
            pb.UpdateExperimentRequest(spec=spec(key, (0.1, 0.9), sticky_bucketing=key == "sticky"))
        )
    after_sticky = [assign_one(router, "sticky", u) for u in units]
    assert all(a.arm_index == first["sticky"][u] for a, u in zip(after_sticky, units, strict=True))
    assert {a.reason for a in after_sticky} == {"sticky"}
    moved = sum(assign_one(router, "loose", u).arm_index != first["loose"][u] for u in units)
    assert moved > 50  # without stickiness, ranges moved and so did units
    new = assign_one(router, "sticky", "newcomer-1")
    assert new.reason == "assigned" and new.config_version == 2


def test_batch_assignment_equals_single_assignment(router: Stub) -> None:
    create(router, "batch", (0.25, 0.25, 0.5), coverage=0.9, holdout=pb.Holdout(name="global", share=0.05))
    ids = [f"device-{i}" for i in range(2000)]
    batch = router.AssignBatch(pb.AssignBatchRequest(experiment_key="batch", unit_ids=ids))
    assert list(batch.arms) == ["control", "treatment1", "treatment2"] and batch.config_version == 1
    for i in range(0, 2000, 37):
        one = assign_one(router, "batch", ids[i], log=False)
        assert batch.arm_indices[i] == one.arm_index and batch.buckets[i] == one.bucket
    assert -1 in batch.arm_indices
    create(router, "targeted", condition_json='{"country": "US"}')
    code, msg = code_of(lambda: router.AssignBatch(pb.AssignBatchRequest(experiment_key="targeted", unit_ids=["a"])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "condition" in msg


def _state(stub: Stub, key: str = "exp") -> tuple[int, int, list[float]]:
    e = stub.GetExperiment(pb.GetExperimentRequest(key=key)).experiment
    return e.version, e.exposed_units, list(e.weights)


def test_bad_input_is_refused_with_field_and_rule_and_changes_nothing(router: Stub) -> None:
    create(router, metrics=["clicks"])
    exposed = assign_one(router, "exp", "u-1")
    before = _state(router)
    analysis_before = router.ListRouterEvents(pb.ListRouterEventsRequest()).events
    bad_struct = struct_pb2.Struct()
    bad_struct.update({"device_id": {"nested": True}})
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (lambda: create(router, "w", (0.5, 0.6)), grpc.StatusCode.INVALID_ARGUMENT, "spec.arms.weight: weights must"),
        (lambda: create(router, "exp"), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (lambda: create(router, "bad key"), grpc.StatusCode.INVALID_ARGUMENT, "spec.key"),
        (lambda: create(router, "c", condition_json="{nope"), grpc.StatusCode.INVALID_ARGUMENT, "spec.condition_json"),
        (
            lambda: create(router, "g", guardrails=[pb.Guardrail(metric="nope")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.guardrails[0].metric",
        ),
        (
            lambda: create(router, "b", mode=pb.ALLOCATION_MODE_BANDIT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.bandit",
        ),
        (
            lambda: router.UpdateExperiment(pb.UpdateExperimentRequest(spec=spec(weights=(0.9, 0.2)))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "weights must sum to 1",
        ),
        (lambda: assign_one(router, "nope", "u"), grpc.StatusCode.NOT_FOUND, "'nope' does not exist"),
        (lambda: assign_one(router, "exp", ""), grpc.StatusCode.INVALID_ARGUMENT, "unit_id: empty"),
        (
            lambda: assign_one(router, "exp", "u-2", covariates=pb.Covariates(numeric={"age": float("nan")})),
            grpc.StatusCode.INVALID_ARGUMENT,
            "covariates.numeric[age]: must be finite",
        ),
        (
            lambda: router.Assign(pb.AssignRequest(unit_id="u", experiment_keys=["exp", "exp"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "experiment_keys[1]",
        ),
        (
            lambda: router.RecordMetrics(
                pb.RecordMetricsRequest(
                    experiment_key="exp",
                    observations=[
                        pb.MetricObservation(unit_id="u-1", metric="clicks", value=1.0),
                        pb.MetricObservation(unit_id="u-1", metric="clicks", value=1.0, arm="ghost"),
                    ],
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "observations[1].arm: experiment 'exp' has no arm 'ghost'",
        ),
        (
            lambda: router.RecordMetrics(
                pb.RecordMetricsRequest(
                    experiment_key="exp", observations=[pb.MetricObservation(unit_id="u-1", metric="revenue", value=1)]
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "observations[0].metric",
        ),
        (
            lambda: router.RecordMetrics(
                pb.RecordMetricsRequest(
                    experiment_key="exp",
                    observations=[pb.MetricObservation(unit_id="never", metric="clicks", value=1)],
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "has no logged exposure",
        ),
        (
            lambda: router.RecordMetrics(
                pb.RecordMetricsRequest(
                    experiment_key="exp",
                    observations=[pb.MetricObservation(unit_id="u-1", metric="clicks", value=float("inf"))],
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "observations[0].value: must be finite",
        ),
        (
            lambda: router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="exp")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "observations",
        ),
        (
            lambda: router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="exp", metrics=["revenue"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "metrics[0]",
        ),
        (
            lambda: router.AuditExperiment(pb.AuditExperimentRequest(key="exp", other_experiments=["ghost"])),
            grpc.StatusCode.NOT_FOUND,
            "other_experiments[0]",
        ),
        (
            lambda: router.Route(pb.RouteRequest(experiment_key="exp", unit_id="u", request_id="r")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "spec.model",
        ),
    ]
    for call, code, text in cases:
        got, msg = code_of(call)
        assert got == code and text in msg, (text, got, msg)
    create(router, "dev", hash_attribute="device_id")
    before_dev = _state(router, "dev")
    code, msg = code_of(
        lambda: router.Assign(pb.AssignRequest(unit_id="u", attributes=bad_struct, experiment_keys=["dev"]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "attributes.device_id: must be a string or a number" in msg
    assert _state(router) == before and _state(router, "dev") == before_dev
    assert assign_one(router, "exp", "u-1", log=False).arm_index == exposed.arm_index
    assert router.ListRouterEvents(pb.ListRouterEventsRequest()).events[: len(analysis_before)] == analysis_before
    assert [e.spec.key for e in router.ListExperiments(pb.ListExperimentsRequest()).experiments] == ["dev", "exp"]


def _log_population(
    stub: Stub,
    key: str,
    n: int,
    covariates: Callable[[int, int], pb.Covariates],
    *,
    drop: Callable[[int, int], bool] = lambda i, arm: False,
    timestamp: Callable[[int], float] = lambda i: 0.0,
) -> list[int]:
    """Assign n units; log each exposure (with covariates that may depend on the arm) unless ``drop`` says so."""
    arms = []

    def one(i: int) -> int:
        uid = f"patient-{i:06d}"
        arm = assign_one(stub, key, uid, log=False).arm_index
        if arm >= 0 and not drop(i, arm):
            assign_one(stub, key, uid, covariates=covariates(i, arm), timestamp=timestamp(i))
        return arm

    with ThreadPoolExecutor(8) as pool:
        arms = list(pool.map(one, range(n)))
    return arms


def test_audit_finds_sample_ratio_mismatch_and_covariate_imbalance(router: Stub) -> None:
    create(router, "trial")
    create(router, "clean")
    rng = np.random.default_rng(1)
    lesions = rng.normal(20.0, 4.0, 4000)
    scanners = rng.choice(["CT-A", "CT-B", "CT-C"], 4000)
    day0 = 1_780_000_000.0

    def biased(i: int, arm: int) -> pb.Covariates:  # larger lesions and one scanner model in treatment
        scanner = "CT-C" if arm == 1 and i % 4 == 0 else str(scanners[i])
        return pb.Covariates(
            numeric={"lesion_mm": float(lesions[i] + (2.0 if arm == 1 else 0.0))},
            categorical={"device": scanner},
        )

    def fair(i: int, arm: int) -> pb.Covariates:
        return pb.Covariates(numeric={"lesion_mm": float(lesions[i])}, categorical={"device": str(scanners[i])})

    # Treatment exposures lost 12% of the time: a logging bug that shows as a sample-ratio mismatch.
    _log_population(
        router,
        "trial",
        4000,
        biased,
        drop=lambda i, arm: arm == 1 and i % 8 == 0,
        timestamp=lambda i: day0 + (i % 40) * 86400.0,
    )
    _log_population(router, "clean", 4000, fair, timestamp=lambda i: day0 + (i % 40) * 86400.0)
    trial = router.AuditExperiment(pb.AuditExperimentRequest(key="trial"))
    assert trial.srm.alert and trial.srm.p_value < 0.001 and trial.alert
    assert sum(trial.srm.observed) == trial.exposures
    overall = {(b.covariate, b.window): b for b in trial.imbalances}
    lesion = overall[("lesion_mm", "all")]
    assert lesion.arm_a == 0 and lesion.arm_b == 1 and lesion.effect_size > 0.3 and lesion.test == "ks"
    assert ("device", "all") in overall and overall[("device", "all")].test == "chi2"
    clean = router.AuditExperiment(pb.AuditExperimentRequest(key="clean"))
    assert not clean.srm.alert and clean.srm.p_value > 0.001
    assert not [b for b in clean.imbalances if b.window == "all"]
    assert clean.uniformity.name and not clean.uniformity.alert
    names = {t.name for t in clean.clustering}
    assert {"id_sequential", "id_prefix", "carry_over:trial"} <= names
    assert not any(t.alert for t in clean.clustering if t.name.startswith("id_"))
    assert any(b.window.startswith("day:") for b in clean.balance)


def test_check_balance_before_the_test_flags_a_covariate_clustered_by_arm(router: Stub) -> None:
    create(router, "plan", hash_version=2)
    gb_exp = GBExperiment(key="plan", variations=[0, 1], hashVersion=2)
    units = []
    for i in range(3000):
        uid = f"site-{i}"
        arm = GrowthBook(attributes={"id": uid}).run(gb_exp).variationId
        size = 25.0 if arm == 1 and i % 3 == 0 else 20.0 + (i % 7)  # clustered larger lesions in one arm
        units.append(pb.PlannedUnit(unit_id=uid, covariates=pb.Covariates(numeric={"lesion_mm": size})))
    resp = router.CheckBalance(pb.CheckBalanceRequest(key="plan", units=units))
    assert sum(resp.units_per_arm) == 3000
    assert any(b.covariate == "lesion_mm" and b.window == "all" for b in resp.imbalances)
    assert _state(router, "plan")[1] == 0  # nothing was logged


def test_analysis_over_grpc_cuped_novelty_and_position(router: Stub) -> None:
    create(router, "news", metrics=["clicks"])
    rng = np.random.default_rng(2)
    n = 3000
    day0 = 1_780_000_000.0
    positions = {}

    def cov(i: int, arm: int) -> pb.Covariates:
        slot = "top" if rng.random() < (0.7 if arm == 1 else 0.3) else "bottom"  # treatment got better slots
        positions[i] = (arm, slot)
        return pb.Covariates(categorical={"position": slot})

    _log_population(router, "news", n, cov, timestamp=lambda i: day0)
    observations = []
    for i, (arm, slot) in positions.items():
        uid = f"patient-{i:06d}"
        pre = rng.normal(5.0, 2.0)
        observations.append(pb.MetricObservation(unit_id=uid, metric="clicks", value=pre, pre_period=True))
        for day in range(6):
            base = pre + (1.0 if slot == "top" else 0.0)  # no true treatment effect: only position matters
            novelty = 2.0 if arm == 1 and day < 2 else 0.0
            value = base + novelty + rng.normal(0, 0.5)
            observations.append(
                pb.MetricObservation(unit_id=uid, metric="clicks", value=value, timestamp=day0 + day * 86400 + 60)
            )
    for start in range(0, len(observations), 20000):
        router.RecordMetrics(
            pb.RecordMetricsRequest(experiment_key="news", observations=observations[start : start + 20000])
        )
    resp = router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="news", bootstrap_resamples=500, seed=1))
    [m] = resp.metrics
    assert (m.metric, m.control, m.treatment) == ("clicks", "control", "treatment1")
    assert m.n_control + m.n_treatment == resp.exposed_units == len(positions)
    assert m.ci.low < m.effect < m.ci.high and m.effect > 1.0  # novelty + slots inflate the raw effect
    assert m.variance_reduction > 0.5 and m.cuped_ci.high - m.cuped_ci.low < m.ci.high - m.ci.low
    assert m.novelty and m.novelty_slope < 0 and len(m.daily) == 6
    assert m.daily[0].effect > m.daily[5].effect + 1.0
    assert abs(m.position_corrected_effect) < abs(m.effect)
    assert m.correction_factor == pytest.approx(m.corrected_effect / m.effect)


def test_guardrail_sends_traffic_back_to_control(router: Stub) -> None:
    create(
        router,
        "risky",
        metrics=["conversion"],
        guardrails=[pb.Guardrail(metric="conversion", higher_is_better=True, max_relative_drop=0.05, min_units=200)],
    )
    observations = []
    for i in range(1200):
        uid = f"user-{i}"
        arm = assign_one(router, "risky", uid).arm_index
        converted = (i % 10) < (3 if arm == 0 else 1)  # 30% vs 10%
        observations.append(pb.MetricObservation(unit_id=uid, metric="conversion", value=float(converted)))
    router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="risky", observations=observations))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        exp = router.GetExperiment(pb.GetExperimentRequest(key="risky")).experiment
        if exp.state == pb.EXPERIMENT_STATE_ROLLED_BACK:
            break
        time.sleep(0.1)
    assert exp.state == pb.EXPERIMENT_STATE_ROLLED_BACK and list(exp.weights) == [1.0, 0.0]
    assert "conversion" in exp.reason
    events = router.ListRouterEvents(pb.ListRouterEventsRequest(experiment_key="risky")).events
    assert events[-1].kind == pb.ROUTER_EVENT_KIND_GUARDRAIL_TRIPPED
    a = assign_one(router, "risky", "user-3")
    assert (a.arm, a.in_experiment, a.reason) == ("control", False, "rolled_back")


def test_bandit_moves_weight_to_the_better_arm_and_logs_propensities(router: Stub) -> None:
    create(
        router,
        "bandit",
        metrics=["reward"],
        mode=pb.ALLOCATION_MODE_BANDIT,
        bandit=pb.BanditConfig(
            reward_metric="reward",
            kind=pb.REWARD_KIND_BERNOULLI,
            update_interval_s=0.05,
            min_weight=0.05,
            min_rewards=50,
        ),
        sticky_bucketing=True,
    )
    rng = np.random.default_rng(3)
    propensities = set()

    def bandit_updates() -> int:
        history = router.GetExperimentHistory(pb.GetExperimentHistoryRequest(key="bandit")).revisions
        return sum(r.change == "bandit" for r in history)

    for round_ in range(6):
        observations = []
        for i in range(200):
            uid = f"r{round_}-u{i}"
            a = assign_one(router, "bandit", uid)
            propensities.add(round(a.propensity, 6))
            p = 0.05 if a.arm_index == 0 else 0.4
            observations.append(pb.MetricObservation(unit_id=uid, metric="reward", value=float(rng.random() < p)))
        router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="bandit", observations=observations))
        # Wait for two more updates (the first may have read the rewards before these): a fixed pause let
        # the next round start on the old weights when the updater thread ran late.
        seen, deadline = bandit_updates(), time.monotonic() + 60
        while bandit_updates() < seen + 2:
            assert time.monotonic() < deadline, f"no bandit update after round {round_}"
            time.sleep(0.05)
    exp = router.GetExperiment(pb.GetExperimentRequest(key="bandit")).experiment
    assert exp.weights[1] > 0.8 and exp.weights[0] >= 0.05 - 1e-9
    changes = [r.change for r in router.GetExperimentHistory(pb.GetExperimentHistoryRequest(key="bandit")).revisions]
    assert "bandit" in changes
    assert len(propensities) > 2  # the propensity logged followed the weights
    analysis = router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="bandit", inverse_propensity=True))
    assert analysis.metrics[0].weighted_effect > 0.2


def _logistic_torchscript(weights: list[float], bias: float) -> bytes:
    linear = torch.nn.Linear(len(weights), 1)
    model = torch.nn.Sequential(linear, torch.nn.Sigmoid())
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([weights]))
        linear.bias.fill_(bias)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buf)
    return buf.getvalue()


def test_route_scores_with_the_arms_model_and_mirrors_shadow_traffic(tmp_path: Path) -> None:
    scorer_config = make_config(tmp_path / "scorer", **{"services.scorer.port": 0})
    scorer = start_service(load_definition("scorer"), scorer_config, port=0)
    try:
        sch = open_channel("scorer", scorer_config, address=scorer.address)
        sstub = spb_grpc.ScorerServiceStub(sch)
        for version, w in (("v1", [1.0, -1.0]), ("v2", [2.0, 0.5]), ("v3", [-1.0, 1.0])):
            sstub.RegisterModel(
                spb.RegisterModelRequest(
                    model="risk",
                    version=version,
                    features=["a", "b"],
                    format=spb.MODEL_FORMAT_TORCHSCRIPT,
                    payload=_logistic_torchscript(w, 0.0),
                    activate=version == "v1",
                )
            )
        running, _, stub, channel = start_router(tmp_path / "router", **{"services.scorer.port": scorer.port})
        try:
            create(
                stub,
                "model-ab",
                model="risk",
                shadow=pb.ShadowConfig(version="v3", fraction=0.5),
            )
            stub.UpdateExperiment(
                pb.UpdateExperimentRequest(
                    spec=pb.ExperimentSpec(
                        key="model-ab",
                        arms=[pb.Arm(name="control", weight=0.5), pb.Arm(name="new", weight=0.5, model_version="v2")],
                        model="risk",
                        shadow=pb.ShadowConfig(version="v3", fraction=0.5),
                    )
                )
            )
            shadowed = 0
            for i in range(200):
                r = stub.Route(
                    pb.RouteRequest(
                        experiment_key="model-ab",
                        unit_id=f"user-{i}",
                        request_id=f"req-{i}",
                        features={"a": 0.3, "b": -0.2},
                        log_exposure=True,
                    )
                )
                expected = "v2" if r.assignment.arm == "new" else "v1"
                assert r.score.model_version == expected and r.assignment.exposure_logged
                shadowed += r.shadowed
            assert 60 < shadowed < 140
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                report = stub.GetShadowReport(pb.GetShadowReportRequest(key="model-ab"))
                if report.compared == shadowed:
                    break
                time.sleep(0.05)
            assert report.shadow_version == "v3" and report.mirrored == shadowed == report.compared
            assert report.errors == 0 and report.dropped == 0
            assert 0.0 <= report.decision_agreement < 1.0 and report.mean_abs_score_diff > 0.0
            # the scorer kept no decision of the shadow calls: feedback on a shadowed request id finds v1/v2 only
            models = sstub.ListModels(spb.ListModelsRequest()).models
            assert models[0].active_version == "v1"
        finally:
            channel.close()
            running.stop(grace=0.5)
    finally:
        sch.close()
        scorer.stop(grace=0.5)


def test_state_survives_a_restart_in_process(tmp_path: Path) -> None:
    running, _, stub, channel = start_router(tmp_path)
    create(stub, "keep", (0.5, 0.5), sticky_bucketing=True, metrics=["m"])
    arms = {f"u{i}": assign_one(stub, "keep", f"u{i}").arm_index for i in range(200)}
    stub.RecordMetrics(
        pb.RecordMetricsRequest(
            experiment_key="keep", observations=[pb.MetricObservation(unit_id=u, metric="m", value=1.0) for u in arms]
        )
    )
    stub.UpdateExperiment(
        pb.UpdateExperimentRequest(spec=spec("keep", (0.9, 0.1), sticky_bucketing=True, metrics=["m"]))
    )
    before = stub.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="keep", bootstrap_resamples=200))
    channel.close()
    running.stop(grace=0.5)
    running, _, stub, channel = start_router(tmp_path)
    try:
        assert _state(stub, "keep") == (2, 200, [0.9, 0.1])
        assert all(assign_one(stub, "keep", u, log=False).arm_index == a for u, a in arms.items())
        after = stub.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="keep", bootstrap_resamples=200))
        assert after == before
    finally:
        channel.close()
        running.stop(grace=0.5)


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_acknowledged_exposures_survive_kill_9(tmp_path: Path) -> None:
    router = ServiceProcess("abrouter", tmp_path, {"GUARDMESH__ABROUTER__SQLITE_SYNCHRONOUS": "NORMAL"})

    def spawn() -> tuple[Stub, grpc.Channel]:
        router.start()  # START_TIMEOUT_S: an import of torch on a loaded machine can take longer than 30 s
        channel = router.channel()
        return pb_grpc.ABRouterServiceStub(channel), channel

    stub, channel = spawn()
    create(stub, "durable", metrics=["m"])
    acknowledged: list[str] = []
    errors: list[grpc.StatusCode] = []
    stop = False

    def writer(worker: int) -> None:
        i = 0
        while not stop:
            uid = f"w{worker}-{i}"
            try:
                a = assign_one(stub, "durable", uid)
            except grpc.RpcError as err:
                errors.append(err.code())
                return
            if a.exposure_logged:
                acknowledged.append(uid)
            i += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(writer, w) for w in range(4)]
        deadline = time.monotonic() + 120
        while len(acknowledged) < 300:
            # A writer that met an error has returned: fail with its error instead of waiting for ever.
            assert not all(f.done() for f in futures), f"every writer stopped before the kill: {errors}"
            assert time.monotonic() < deadline, f"only {len(acknowledged)} exposures acknowledged: {errors}"
            time.sleep(0.01)
        router.kill9()
        stop = True
        for f in futures:
            f.result()
    channel.close()
    stub, channel = spawn()
    try:
        exposed = _state(stub, "durable")[1]
        assert exposed >= len(acknowledged)
        observations = [pb.MetricObservation(unit_id=u, metric="m", value=1.0) for u in acknowledged]
        assert stub.RecordMetrics(
            pb.RecordMetricsRequest(experiment_key="durable", observations=observations)
        ).recorded == len(acknowledged)
    finally:
        channel.close()
        assert router.stop(timeout_s=60) == 0, router.log_tail()


def test_continuous_audit_raises_one_srm_event(tmp_path: Path) -> None:
    # The audit waits for the whole population (about 2,625 units logged): on part of it, while the log still
    # grows, the SRM p-value can cross the threshold more than once, which is a new alert each time.
    running, _, stub, channel = start_router(
        tmp_path, **{"abrouter.audit_interval_s": 0.2, "abrouter.audit_min_sample": 2500}
    )
    try:
        create(stub, "leaky")
        _log_population(
            stub, "leaky", 3000, lambda i, arm: pb.Covariates(), drop=lambda i, arm: arm == 1 and i % 4 == 0
        )
        deadline = time.monotonic() + 60
        kinds: list[int] = []
        while time.monotonic() < deadline and pb.ROUTER_EVENT_KIND_SRM_ALERT not in kinds:
            time.sleep(0.2)
            kinds = [e.kind for e in stub.ListRouterEvents(pb.ListRouterEventsRequest(experiment_key="leaky")).events]
        assert pb.ROUTER_EVENT_KIND_SRM_ALERT in kinds
        time.sleep(0.6)  # several more audits: the alert is raised once while it lasts
        kinds = [e.kind for e in stub.ListRouterEvents(pb.ListRouterEventsRequest(experiment_key="leaky")).events]
        assert kinds.count(pb.ROUTER_EVENT_KIND_SRM_ALERT) == 1
    finally:
        channel.close()
        running.stop(grace=0.5)


def test_an_srm_alert_is_raised_once_per_weighting_even_when_the_p_value_recrosses() -> None:
    """A borderline mismatch on a growing log can fall below the threshold, rise above it and fall again: that
    is one fault, one alert. New weights (a new population to judge) re-arm it; an audit that ran while the
    weights moved decides nothing for the new ones."""
    core = Router(ABRouterSettings(audit_interval_s=0, guardrail_interval_s=3600, audit_min_sample=1000))
    spec = ExperimentSpec(key="leaky", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)))
    core.create(spec)
    counter = iter(range(10**9))

    def log(n: int, keep: Callable[[int], bool]) -> None:
        """Log n more exposures, each only if ``keep(arm)`` (a leak drops the others unlogged)."""
        logged = 0
        while logged < n:
            unit = f"u{next(counter)}"
            arm = core.assign(unit, {}, ["leaky"])[0][0].arm_index
            if keep(arm):
                core.assign(unit, {}, ["leaky"], log_exposure=True)
                logged += 1

    def leaky(arm: int) -> bool:
        return arm == 0 or next(counter) % 5 != 0  # a fifth of the new arm's exposures lost

    def srm_events() -> list[str]:
        return [e.message for e in core.list_events("leaky") if e.kind == "srm_alert"]

    def reweight(control: float) -> None:
        core.update(dataclasses.replace(spec, arms=(ArmSpec("control", control), ArmSpec("new", 1 - control))))

    log(3000, leaky)
    core.audit_running()
    assert core.last_audits["leaky"].srm.alert and len(srm_events()) == 1
    counts = core.audit("leaky").srm.observed
    log(int(counts[0] - counts[1]), lambda arm: arm == 1)  # the log catches up: the split is even again
    core.audit_running()
    assert not core.last_audits["leaky"].srm.alert
    log(3000, leaky)  # and leaks again
    core.audit_running()
    assert core.last_audits["leaky"].srm.alert
    assert len(srm_events()) == 1  # the same fault: not a second alert
    core.update(dataclasses.replace(spec), comment="same weights")  # a new version, the same population
    core.audit_running()
    assert len(srm_events()) == 1

    audit = core.audit

    def audit_while_reweighted(key: str) -> object:
        report = audit(key)
        reweight(0.6)  # an operator moves the weights while the audit of the old ones runs
        return report

    core.audit = audit_while_reweighted  # type: ignore[method-assign]
    core.audit_running()
    core.audit = audit  # type: ignore[method-assign]
    assert len(srm_events()) == 1  # the old weighting's report says nothing about the new one
    log(3000, leaky)
    core.audit_running()
    assert len(srm_events()) == 2  # the new weighting leaks too: alerted, once
    core.audit_running()
    assert len(srm_events()) == 2
    core.close()


def test_reweighting_by_covariate_bins_removes_a_mix_bias(router: Stub) -> None:
    """Treatment over-represents high spenders (a logging filter dropped low-spender treatment exposures):
    the raw effect is biased, reweighting treatment to control's mix of segments recovers the null."""
    create(router, "mix", metrics=["revenue"])
    rng = np.random.default_rng(4)
    segments: dict[int, str] = {}

    def cov(i: int, arm: int) -> pb.Covariates:
        segments[i] = "high" if i % 4 == 0 else "low"
        return pb.Covariates(categorical={"segment": segments[i]})

    _log_population(router, "mix", 4000, cov, drop=lambda i, arm: arm == 1 and i % 4 != 0 and i % 3 == 0)
    observations = [
        pb.MetricObservation(
            unit_id=f"patient-{i:06d}", metric="revenue", value=float(rng.normal(50 if s == "high" else 10, 2))
        )
        for i, s in sorted(segments.items())  # unit order, not the order the logging threads finished in
    ]
    router.RecordMetrics(pb.RecordMetricsRequest(experiment_key="mix", observations=observations))
    raw = router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="mix", bootstrap_resamples=200)).metrics[0]
    fixed = router.AnalyzeExperiment(
        pb.AnalyzeExperimentRequest(key="mix", bootstrap_resamples=200, reweight_covariates=["segment"])
    ).metrics[0]
    assert raw.effect > 3.0  # biased: treatment holds more high spenders
    assert abs(fixed.weighted_effect) < 0.5 and abs(fixed.corrected_effect) < 0.5
    assert np.isnan(raw.weighted_effect)
    code, msg = code_of(
        lambda: router.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="mix", reweight_covariates=["nope"]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "reweight_covariates[0]" in msg


def test_report_cli_prints_the_table_and_writes_plots(tmp_path: Path) -> None:
    running, _, stub, channel = start_router(tmp_path)
    try:
        create(stub, "cli", metrics=["clicks", "revenue"])
        day0 = 1_780_000_000.0
        _log_population(stub, "cli", 600, lambda i, arm: pb.Covariates(), timestamp=lambda i: day0)
        rng = np.random.default_rng(5)
        observations = [
            pb.MetricObservation(
                unit_id=f"patient-{i:06d}", metric=m, value=float(rng.poisson(3)), timestamp=day0 + d * 86400 + 1
            )
            for i in range(600)
            for m in ("clicks", "revenue")
            for d in range(3)
        ]
        stub.RecordMetrics(pb.RecordMetricsRequest(experiment_key="cli", observations=observations))
        out = tmp_path / "report"
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("guardmesh")),
                "abrouter",
                "report",
                "cli",
                "--address",
                running.address,
                "--out",
                str(out),
                "--resamples",
                "200",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert proc.returncode == 0, proc.stderr
        assert "clicks" in proc.stdout and "revenue" in proc.stdout and "SRM" in proc.stdout
        pngs = sorted(out.glob("*.png"))
        assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        bad = subprocess.run(
            [
                str(Path(sys.executable).with_name("guardmesh")),
                "abrouter",
                "report",
                "ghost",
                "--address",
                running.address,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    finally:
        channel.close()
        running.stop(grace=0.5)


def test_a_failed_write_turns_health_not_serving(tmp_path: Path) -> None:
    running, _, stub, channel = start_router(tmp_path)
    try:
        create(stub, "k")
        running.binding.store.log.db.execute("DROP TABLE exposures")  # type: ignore[attr-defined]  # a broken disk
        code, msg = code_of(lambda: assign_one(stub, "k", "u1"))
        assert code == grpc.StatusCode.UNAVAILABLE and "store failed" in msg
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="abrouter"))
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, _ = code_of(lambda: assign_one(stub, "k", "u2", log=False))
        assert code == grpc.StatusCode.UNAVAILABLE  # refuses everything until restarted
    finally:
        channel.close()
        running.stop(grace=0.5)
