"""The Python SDK over real gRPC: docs/sdk.md's examples run for real, then each client on its own (lease
renewal and release, preemption notices, lost leases, placement waits, scoring, experiments, the facade,
TLS with role tokens)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from guardmesh.certs import generate
from guardmesh.config import MeshConfig
from guardmesh.runtime import KNOWN_SERVICES, RunningService, load_definition, start_service
from guardmesh.sdk import (
    ABRouterClient,
    Arm,
    Guardrail,
    ItemError,
    JobEnded,
    JobState,
    Lease,
    Mesh,
    Observation,
    PlacementTimeout,
    Rule,
    SchedulerClient,
    Score,
    ScorerClient,
    adam,
    bounded_staleness,
    experiment_spec,
    job_spec,
    train_loop,
)
from guardmesh.sdk.scheduler import EventKind
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import scheduler_pb2 as spb

from .conftest import REPO, make_config, node_pb

DOC = REPO / "docs" / "sdk.md"
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "GUARDMESH_GPU_MEMORY_FRACTION", "GUARDMESH_GPU_MEMORY_CAP_MIB")
FEATURES = ["amount", "velocity", "age_days"]


@dataclass
class Servers:
    config: MeshConfig
    services: dict[str, RunningService]

    def address(self, name: str) -> str:
        return self.services[name].address


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The four services in-process on free ports, and a config that points at all of them."""
    tmp = tmp_path_factory.mktemp("sdk")
    base = make_config(
        tmp,
        **{
            "services.paramserver.port": 0,
            "services.scorer.port": 0,
            "services.abrouter.port": 0,
            "abrouter.sqlite_synchronous": "NORMAL",
            "abrouter.audit_interval_s": 0.0,
            "scheduler.sqlite_synchronous": "NORMAL",
            "scorer.drift_every": 20,
        },
    )
    started: dict[str, RunningService] = {}
    try:
        started["scorer"] = start_service(load_definition("scorer"), base, port=0)
        config = base.with_overrides({"services.scorer.port": started["scorer"].port})  # the abrouter calls it
        for name in ("scheduler", "paramserver", "abrouter"):
            started[name] = start_service(load_definition(name), config, port=0)
        config = config.with_overrides({f"services.{n}.port": s.port for n, s in started.items()})
        with SchedulerClient(config) as scheduler:
            for i in range(2):
                scheduler.stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb(f"dgx-{i}", 4, 81920, group_size=2)))
            # A small pool of its own for the preemption test: nothing else asks for T4 cards.
            scheduler.stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("t4-0", 1, 16384, model="T4")))
        yield Servers(config, started)
    finally:
        for running in started.values():
            running.stop(grace=0.5)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


# -- the guide ---------------------------------------------------------------------------------------------


def test_docs_examples_run_against_real_servers(servers: Servers) -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 5, "docs/sdk.md: one block per example (trainer x2, scorer, experiments, app)"
    saved = {k: os.environ.get(k) for k in GPU_ENV}
    scopes: list[dict[str, object]] = []
    try:
        for i, code in enumerate(blocks):
            scope: dict[str, object] = {"config": servers.config, "__name__": f"sdk_md_block_{i}"}
            exec(compile(code, f"{DOC}:block{i}", "exec"), scope)
            scopes.append(scope)
        assert os.environ["CUDA_VISIBLE_DEVICES"].startswith("GPU-dgx-")  # the trainer applied its placement
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    trainer, pieces, scoring, experiments, app = scopes
    summary = trainer["summary"]
    assert summary.steps == 160 and not summary.preempted  # type: ignore[attr-defined]
    assert summary.losses[-1] < 0.05 < summary.losses[0]  # type: ignore[attr-defined]
    assert trainer["lease"].renewals >= 1  # type: ignore[attr-defined]
    # A quarter of whichever card the policy chose (a sharing job packs onto the fullest node that fits, which
    # may be the fixture's T4 pool): the cap is a quarter of that card's memory after the reserve.
    swept = pieces["job"].placements[0]  # type: ignore[attr-defined]
    card_mib = 16384 if swept.node == "t4-0" else 81920  # the fixture's two card sizes
    assert swept.gpus[0].memory_cap_mib == (card_mib - 512) // 4
    assert len(scoring["scored"]) == 300 and scoring["feedback"].accepted == 300  # type: ignore[arg-type, attr-defined]
    assert scoring["report"].live_rows > 0 and set(scoring["report"].features) == set(FEATURES)  # type: ignore[attr-defined]
    effect = experiments["effect"]
    assert effect.n_control + effect.n_treatment == 600 and effect.effect > 0.05  # type: ignore[attr-defined]
    assert experiments["audit"].exposures == 600 and not experiments["audit"].srm.alert  # type: ignore[attr-defined]
    assert set(app["arms"]) >= {"checkout-button", "fraud-v2"}  # type: ignore[arg-type]
    with ABRouterClient(servers.config) as ab:
        assert ab.get_experiment("fraud-v2").exposed_units == 1


# -- scheduler ---------------------------------------------------------------------------------------------


def test_job_spec_maps_pythonic_arguments() -> None:
    spec = job_spec(
        "j",
        tenant="vision",
        gpus=2,
        replicas=3,
        memory_mib=30_000,
        gang=True,
        qos="best-effort",
        priority=5,
        models=["A100-80GB"],
        topology="required",
        node_selector={"zone": "a"},
        lease_ttl_s=7,
        owner="alice",
    )
    assert (spec.tenant, spec.gpus_per_replica, spec.replicas, spec.memory_mib_per_gpu) == ("vision", 2, 3, 30_000)
    assert spec.gang and spec.qos == spb.QOS_CLASS_BEST_EFFORT and spec.priority == 5
    assert spec.topology == spb.TOPOLOGY_PREFERENCE_REQUIRED and dict(spec.node_selector) == {"zone": "a"}
    assert list(spec.allowed_models) == ["A100-80GB"] and spec.lease_ttl_s == 7 and spec.owner == "alice"
    shared = job_spec("s", gpu_share=0.25, allow_sharing=True)
    assert shared.WhichOneof("gpu_memory") == "gpu_share_milli" and shared.gpu_share_milli == 250
    assert shared.allow_sharing and shared.qos == spb.QOS_CLASS_BURSTABLE
    with pytest.raises(ValueError, match="not both"):
        job_spec("x", memory_mib=1, gpu_share=0.5)
    with pytest.raises(TypeError, match="unknown option"):  # the old name is not taken silently
        job_spec("x", gpu_share=0.5, share=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="qos"):
        job_spec("x", memory_mib=1, qos="platinum")  # type: ignore[typeddict-item]


def test_lease_renews_past_its_ttl_and_releases_on_exit(servers: Servers) -> None:
    with SchedulerClient(servers.config) as scheduler:
        unheld = scheduler.submit("lease-unheld", memory_mib=4_000, lease_ttl_s=2)
        assert unheld.state is JobState.RUNNING
        with scheduler.acquire("lease-held", memory_mib=4_000, lease_ttl_s=2) as lease:
            assert lease.job.state is JobState.RUNNING and lease.interval_s == pytest.approx(2 / 3)
            assert lease.placement.gpu_uuids[0].startswith("GPU-dgx-") and lease.placement.memory_caps_mib == [4000]
            time.sleep(3.5)  # well past the TTL
            # Then wait, not assert at once: on a loaded machine the renewal thread and the reaper run late.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not lease.lost and lease.renewals < 4:
                time.sleep(0.05)
            while time.monotonic() < deadline and scheduler.describe("lease-unheld").state is JobState.RUNNING:
                time.sleep(0.05)
            assert lease.active and not lease.lost and lease.renewals >= 4
            assert scheduler.describe("lease-held").state is JobState.RUNNING
            # The control: the same job without renewals was reclaimed.
            assert scheduler.describe("lease-unheld").state is JobState.LEASE_EXPIRED
            assert lease.expires_at is not None and lease.expires_at > unheld.placements[0].lease_expires_at  # type: ignore[operator]
        assert not lease.active
        assert scheduler.describe("lease-held").state is JobState.RELEASED
        kinds = [e.kind for e in scheduler.watch("lease-held")]
        assert kinds == [None]  # an ended job: the snapshot only


def test_lost_lease_surfaces_the_rpc_error(servers: Servers) -> None:
    lost = threading.Event()
    with SchedulerClient(servers.config) as scheduler:
        lease = scheduler.acquire("lease-lost", memory_mib=4_000, lease_ttl_s=1, on_lost=lambda _: lost.set())
        placed_before = lease.job
        with lease:
            scheduler.release("lease-lost")  # someone else releases it
            assert lost.wait(60)
            assert lease.lost and not lease.active
            with pytest.raises(grpc.RpcError) as err:
                lease.should_stop()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert lease.error is err.value
        # Holding a job without allocations fails in the caller's thread.
        with pytest.raises(ValueError, match="holds no allocation"):
            scheduler.lease("lease-lost")
        # A stale snapshot that still says RUNNING: the scheduler's answer is raised as it is.
        with pytest.raises(grpc.RpcError) as err:
            scheduler.lease(placed_before).start()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            scheduler.describe("no-such-job")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_preemption_notice_reaches_the_lease_and_stops_the_train_loop(servers: Servers) -> None:
    notices: list[Lease] = []
    with Mesh(servers.config) as mesh:
        scheduler = mesh.scheduler
        victim = scheduler.acquire(
            "victim", memory_mib=12_000, models=["T4"], qos="best-effort", lease_ttl_s=2, on_preemption=notices.append
        )
        with victim:
            events = scheduler.watch("victim", timeout=60)
            assert next(events).kind is None
            guaranteed = scheduler.submit("guaranteed-t4", memory_mib=12_000, models=["T4"], qos="guaranteed")
            assert guaranteed.state is JobState.PENDING
            notice = next(events)
            assert notice.kind is EventKind.PREEMPTION_NOTICE and notice.job.state is JobState.PREEMPTING
            deadline = time.monotonic() + 60
            while not victim.preempting and time.monotonic() < deadline:
                time.sleep(0.05)
            assert victim.should_stop() and notices == [victim] and victim.preemption_deadline is not None
            model = torch.nn.Linear(2, 1)
            ps = mesh.paramserver("preempted-model")
            ps.create_from_module(model, optimizer=adam(0.1), consistency=bounded_staleness(1))
            batches = [torch.ones(4, 2)] * 3
            summary = train_loop(ps, model, batches, lambda b: model(b).sum(), lease=victim)
            assert summary.preempted and summary.steps == 0
        # Releasing the victim lets the guaranteed job in at once.
        placed = scheduler.wait_until_placed("guaranteed-t4", timeout=60)
        assert placed.state is JobState.RUNNING and placed.placement().gpus[0].model == "T4"
        scheduler.release("guaranteed-t4")


def test_wait_until_placed_outlives_the_channel_deadline_and_sees_the_placement(servers: Servers) -> None:
    # (grpcio 1.85 fails every call at once when the service-config deadline is under ~1.5 s.)
    short = servers.config.with_overrides({"client.deadline_s": 2.5})
    with SchedulerClient(short) as scheduler:
        pending = scheduler.submit("island-wait", gpus=4, memory_mib=30_000, topology="required")
        assert pending.state is JobState.PENDING and "topology group" in pending.pending_reason
        started = time.monotonic()
        with pytest.raises(PlacementTimeout) as timeout:
            scheduler.wait_until_placed("island-wait", timeout=2.8)  # past the channel's deadline: re-watched
        assert time.monotonic() - started >= 2.75
        assert timeout.value.job is not None and "topology group" in timeout.value.job.pending_reason
        threading.Timer(0.3, scheduler.release, args=("island-wait",)).start()
        with pytest.raises(JobEnded) as ended:
            scheduler.wait_until_placed("island-wait", timeout=60)
        assert ended.value.job.state is JobState.RELEASED
        # A pending job that is placed while we wait: a blocker takes the T4, then leaves.
        scheduler.submit("t4-blocker", memory_mib=15_000, models=["T4"])
        assert scheduler.submit("t4-waiter", memory_mib=15_000, models=["T4"]).state is JobState.PENDING
        threading.Timer(0.5, scheduler.release, args=("t4-blocker",)).start()
        placed = scheduler.wait_until_placed("t4-waiter", timeout=60)
        assert placed.state is JobState.RUNNING and placed.placement().node == "t4-0"
        with pytest.raises(PlacementTimeout):
            scheduler.acquire("t4-never", memory_mib=15_000, models=["T4"], wait_s=0.3)
        assert scheduler.describe("t4-never").state is JobState.RELEASED  # acquire withdrew it
        scheduler.release("t4-waiter")


# -- scorer ------------------------------------------------------------------------------------------------


def logistic(weights: list[float], bias: float) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(len(weights), 1), torch.nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([weights]))
        model[0].bias.fill_(bias)
    return model


def test_scorer_client_registers_modules_and_scores(servers: Servers) -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((500, 3)).astype(np.float32)
    v1 = logistic([1.0, -1.0, 0.5], 0.1)
    v1.train()
    with ScorerClient(servers.config, address=servers.address("scorer")) as scorer:
        reg = scorer.register_module(
            "sdk-risk",
            "v1",
            v1,
            FEATURES,
            reference=torch.from_numpy(reference),
            threshold=0.55,
            drift_k=0.2,
            rules=[Rule("cap", "amount", 4.0)],
            activate=True,
        )
        assert v1.training  # the caller's module is left as it was
        assert reg.version.version == "v1" and reg.version.format == "torchscript" and reg.version.active
        assert reg.device
        row = {"amount": 0.5, "velocity": -0.2, "age_days": 1.0}
        out = scorer.score("sdk-risk", row, explain=True, request_id="req-1")
        expected = float(v1(torch.tensor([[0.5, -0.2, 1.0]])).detach()[0, 0])
        assert out.request_id == "req-1" and out.score == pytest.approx(expected, rel=1e-5)
        assert out.threshold == pytest.approx(0.55, abs=0.05) and out.decision == (out.score >= out.threshold)
        assert out.path.startswith("model:sdk-risk:v1@threshold=") and out.model_version == "v1" and out.rule is None
        assert set(out.attributions) == set(FEATURES) and out.attribution_method == "linear_shap"
        assert scorer.score("sdk-risk", {**row, "amount": 5.0}).rule == "cap"

        rows = [dict(zip(FEATURES, map(float, r), strict=True)) for r in rng.standard_normal((60, 3))]
        rows.insert(10, {"amount": 1.0, "colour": 2.0})  # an unknown feature: refused on its own
        results = scorer.score_batch("sdk-risk", rows)
        assert len(results) == 61 and isinstance(results[10], ItemError)
        assert results[10].code == grpc.StatusCode.INVALID_ARGUMENT and "colour" in results[10].message
        scored = [r for r in results if isinstance(r, Score)]
        assert len(scored) == 60 and len({r.request_id for r in scored}) == 60
        fb = scorer.feedback("sdk-risk", [(r.request_id, r.decision) for r in scored] + [("never-scored", True)])
        assert (fb.accepted, fb.unknown, fb.active_version, fb.rolled_back) == (60, 1, "v1", False)
        assert fb.f1 == pytest.approx(1.0)
        report = scorer.drift_report("sdk-risk")
        assert report.reference_rows == 500 and report.live_rows >= 60
        assert list(report.features) == FEATURES and report.most_drifted(1)[0] in FEATURES

        v2 = torch.jit.script(logistic([2.0, 0.0, 0.0], 0.0))  # a ScriptModule is saved as it is
        reg2 = scorer.register_module("sdk-risk", "v2", v2, FEATURES, reference=reference)
        assert reg2.version.format == "torchscript" and not reg2.version.active
        assert scorer.activate("sdk-risk", "v2") == "v2"
        assert scorer.score("sdk-risk", row).model_version == "v2"
        assert scorer.score("sdk-risk", row, version="v1").model_version == "v1"
        assert scorer.rollback("sdk-risk") == "v1"
        line = next(m for m in scorer.list_models() if m.model == "sdk-risk")
        assert line.active_version == "v1" and [v.version for v in line.versions] == ["v1", "v2"]
        assert line.features == FEATURES
        assert scorer.events("no-such-model") == []
        with pytest.raises(grpc.RpcError) as err:
            scorer.score("no-such-model", row)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            scorer.register_module("sdk-risk", "v1", v1, FEATURES)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


# -- abrouter ----------------------------------------------------------------------------------------------


def test_experiment_spec_maps_keywords() -> None:
    spec = experiment_spec(
        "k",
        {"control": 0.2, "treatment": 0.8},
        seed="s",
        coverage=0.5,
        hash_version=1,
        condition={"country": {"$in": ["US"]}},
        namespace=("layer", 0.0, 0.5),
        holdout=("global", 0.05),
        sticky=True,
        metrics=["m"],
        guardrails=[Guardrail("m", max_relative_drop=0.1)],
        model="fraud",
        model_versions={"treatment": "v2"},
        shadow=("v3", 0.1),
    )
    assert [(a.name, a.weight, a.model_version) for a in spec.arms] == [("control", 0.2, ""), ("treatment", 0.8, "v2")]
    assert spec.HasField("coverage") and spec.coverage == 0.5 and spec.hash_version == 1 and spec.seed == "s"
    assert spec.condition_json == '{"country": {"$in": ["US"]}}' and spec.sticky_bucketing
    assert (spec.namespace.name, spec.namespace.end, spec.holdout.share) == ("layer", 0.5, 0.05)
    assert spec.guardrails[0].max_relative_drop == 0.1 and spec.shadow.version == "v3"
    assert spec.mode == apb.ALLOCATION_MODE_FIXED and spec.model == "fraud"
    assert not experiment_spec("k", [Arm("a", 1.0)]).HasField("coverage")
    with pytest.raises(ValueError, match="arms that do not exist"):
        experiment_spec("k", {"a": 1.0}, model_versions={"b": "v1"})


def test_abrouter_client_lifecycle_assignment_metrics_and_analysis(servers: Servers) -> None:
    with ABRouterClient(servers.config) as ab:
        exp = ab.create_experiment(
            "sdk-exp", {"control": 0.5, "treatment": 0.5}, metrics=["clicks"], condition={"tier": {"$ne": "bot"}}
        )
        assert (exp.key, exp.version, exp.state, exp.arms, exp.weights) == (
            "sdk-exp",
            1,
            "running",
            ["control", "treatment"],
            [0.5, 0.5],
        )
        bot = ab.assign_one("u-bot", "sdk-exp", attributes={"tier": "bot"}, log_exposure=True)
        assert not bot.in_experiment and bot.reason == "not_targeted" and not bot.exposure_logged
        assignments = {}
        for i in range(200):
            a = ab.assign_one(
                f"u{i}",
                "sdk-exp",
                log_exposure=True,
                covariates={"age": 20 + i % 50, "device": "ios", "vip": i % 2 == 0},
            )
            assert a.in_experiment and a.exposure_logged and a.propensity == pytest.approx(0.5)
            assignments[f"u{i}"] = a.arm
        again = ab.assign("u7", ["sdk-exp"])
        assert list(again) == ["sdk-exp"] and again["sdk-exp"].arm == assignments["u7"]  # deterministic
        with pytest.raises(grpc.RpcError) as err:
            ab.assign_batch("sdk-exp", ["u1"])  # a targeting condition needs attributes
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        observations: list[Observation | tuple[str, str, float]] = [
            (u, "clicks", 2.0 if arm == "treatment" else 1.0) for u, arm in assignments.items()
        ]
        observations.append(Observation("u0", "clicks", 0.5, pre_period=True))
        assert ab.record_metrics("sdk-exp", observations) == 201
        with pytest.raises(grpc.RpcError) as err:
            ab.record_metrics("sdk-exp", [("u1", "revenue", 1.0)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "revenue" in (err.value.details() or "")

        audit = ab.audit("sdk-exp", min_sample=50)
        assert audit.exposures == 200 and sum(audit.srm.observed) == 200 and audit.raw.exposures == 200
        assert 0.0 <= audit.uniformity_p_value <= 1.0
        analysis = ab.analyze("sdk-exp", bootstrap_resamples=200, seed=3)
        effect = analysis.effect("clicks")
        assert analysis.arms == ["control", "treatment"] and analysis.exposed_units == 200
        assert effect.effect == pytest.approx(1.0) and effect.ci[0] <= 1.0 <= effect.ci[1]
        assert effect.n_control + effect.n_treatment == 200 and effect.raw.metric == "clicks"
        with pytest.raises(KeyError):
            analysis.effect("revenue")

        updated = ab.update_experiment(
            "sdk-exp", {"control": 0.2, "treatment": 0.8}, expected_version=1, comment="ramp", metrics=["clicks"]
        )
        assert updated.version == 2 and updated.weights == [0.2, 0.8]
        with pytest.raises(grpc.RpcError) as err:
            ab.update_experiment("sdk-exp", {"control": 0.5, "treatment": 0.5}, expected_version=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stopped = ab.stop_experiment("sdk-exp", reason="done")
        assert stopped.state == "stopped" and stopped.reason == "done"
        assert ab.get_experiment("sdk-exp").version == 3
        assert "sdk-exp" in {e.key for e in ab.list_experiments()}

        batch_exp = ab.create_experiment("sdk-batch", [Arm("a", 0.25), Arm("b", 0.75)], hash_version=1)
        batch = ab.assign_batch("sdk-batch", ["x1", "x2", "x3"])
        assert batch.arms == ["a", "b"] and batch.config_version == batch_exp.version
        for i, unit in enumerate(batch.unit_ids):
            assert batch.arm_of(i) == ab.assign_one(unit, "sdk-batch").arm
        with pytest.raises(grpc.RpcError) as err:
            ab.create_experiment("sdk-bad", {"control": 0.5, "treatment": 0.6})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_route_serves_each_arm_its_model_version(servers: Servers) -> None:
    with Mesh(servers.config) as mesh:
        mesh.scorer.register_module("sdk-route", "a", logistic([1.0, 0.0, 0.0], 0.0), FEATURES, activate=True)
        mesh.scorer.register_module("sdk-route", "b", logistic([0.0, 1.0, 0.0], 0.0), FEATURES)
        mesh.abrouter.create_experiment(
            "sdk-route-exp", {"control": 0.5, "treatment": 0.5}, model="sdk-route", model_versions={"treatment": "b"}
        )
        seen = set()
        for i in range(30):
            routed = mesh.abrouter.route("sdk-route-exp", f"r{i}", {"amount": 1.0, "velocity": -1.0, "age_days": 0.0})
            want = "b" if routed.assignment.arm == "treatment" else "a"
            assert routed.score.model_version == want and routed.score.request_id
            assert routed.score.score == pytest.approx(1 / (1 + np.exp(-1.0 if want == "a" else 1.0)), rel=1e-5)
            seen.add(routed.assignment.arm)
        assert seen == {"control", "treatment"}


# -- the facade and the shared channel settings --------------------------------------------------------------


def test_mesh_creates_clients_lazily_shares_them_and_closes_them(servers: Servers) -> None:
    mesh = Mesh(servers.config)
    assert mesh._clients == {}  # nothing opened before first use
    scheduler = mesh.scheduler
    assert mesh.scheduler is scheduler and set(mesh._clients) == {"scheduler"}
    ps = mesh.paramserver("facade-model", worker_id="w1")
    assert mesh.paramserver("facade-model", worker_id="w1") is ps
    assert mesh.paramserver("facade-model", worker_id="w2") is not ps
    assert ps.addresses == [servers.address("paramserver")]
    mesh.scorer.list_models()
    mesh.abrouter.list_experiments()
    assert set(mesh._clients) == {"scheduler", "scorer", "abrouter"}
    mesh.close()
    with pytest.raises(ValueError):  # the channel is closed
        scheduler.list_jobs()
    with pytest.raises(RuntimeError, match="closed"):
        _ = mesh.scorer

    # Address overrides beat the configuration (here pointing nowhere).
    nowhere = servers.config.with_overrides(
        {"services.scheduler.port": 1, "services.paramserver.port": 1, "client.deadline_s": 8.0}
    )
    with Mesh(nowhere) as broken:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            broken.scheduler.list_jobs()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # not swallowed, after the channel's retries
        assert time.monotonic() - started > 0.2  # the retry policy's backoff (0.1 s, doubling) was waited out
    overrides = {"scheduler": servers.address("scheduler"), "paramserver": [servers.address("paramserver")]}
    with Mesh(nowhere, addresses=overrides) as fixed:
        assert fixed.scheduler.submit("override-job", memory_mib=1_000).state is JobState.RUNNING
        assert fixed.scheduler.release("override-job").state is JobState.RELEASED
        model = torch.nn.Linear(2, 1)
        ps2 = fixed.paramserver("facade-linear")
        ps2.create_from_module(model, optimizer=adam(0.1), consistency=bounded_staleness(1))
        assert train_loop(ps2, model, [torch.ones(2, 2)], lambda b: model(b).pow(2).mean()).steps == 1


def test_mesh_without_config_reads_the_environment(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARDMESH_CONFIG", raising=False)
    monkeypatch.setenv("GUARDMESH__SERVICES__SCHEDULER__PORT", str(servers.services["scheduler"].port))
    with Mesh() as mesh:
        assert mesh.config.endpoint("scheduler").port == servers.services["scheduler"].port
        mesh.scheduler.submit("env-config-job", memory_mib=1_000)
        assert mesh.scheduler.release("env-config-job").state is JobState.RELEASED


def test_clients_carry_tls_and_the_role_token(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    tokens = generate(certs, KNOWN_SERVICES, extra_tokens={"trainer-b": "trainer"})
    config = make_config(
        tmp_path, **{"security.mode": "tls", "security.certs_dir": str(certs), "security.authorization": True}
    )
    running = start_service(load_definition("scheduler"), config, port=0)
    try:
        as_ = {who: config.with_overrides({"security.token": tokens[who]}) for who in ("admin", "trainer", "trainer-b")}
        with SchedulerClient(as_["admin"], address=running.address) as admin:
            admin.stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("secure-0", 2, 40960)))
        with SchedulerClient(as_["trainer"], address=running.address) as trainer:
            with trainer.acquire("mine", memory_mib=1_000) as lease:
                assert lease.job.spec.owner == "trainer" and lease.renewals == 1
                with SchedulerClient(as_["trainer-b"], address=running.address) as other:
                    with pytest.raises(grpc.RpcError) as err:
                        other.lease("mine")
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert trainer.describe("mine").state is JobState.RELEASED
        with SchedulerClient(config, address=running.address) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.list_jobs()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=0.5)
