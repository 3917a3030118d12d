"""Pods through kube-scheduler's extender and the controller, with the official ``kubernetes`` client.

The API server is tests/kube_emulator.py, a labelled STAND-IN (kmock's KubernetesEmulator): it stores
and serves objects but does not set ``spec.nodeName`` on a Binding nor delete a pod on eviction, so these
tests assert the calls guardmesh makes (the Binding object, annotations, the eviction request, the Event)
and guardmesh's own state, never what only a real API server would do with them.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from guardmesh.client import open_channel
from guardmesh.config import ExtenderSettings, SchedulerSettings
from guardmesh.runtime import load_definition, start_service
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from services.scheduler.extender import Extender, ExtenderHttpServer, PodRequest, job_id_of
from services.scheduler.jobs import JobSpec, JobState, Qos
from services.scheduler.kube import GPUS_ANNOTATION, Controller, KubeApi, PodFacts
from services.scheduler.scheduler import Scheduler
from services.scheduler.store import Store
from tests.conftest import make_config
from tests.kube_emulator import KubeEmulator

RESOURCE = "guardmesh.io/gpu-memory-mib"
NS = "team-a"


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    """The API server stand-in."""
    with KubeEmulator() as emulator:
        yield emulator


@pytest.fixture
def v1(kube: KubeEmulator) -> client.CoreV1Api:
    """The official client against the stand-in."""
    return client.CoreV1Api(kube.api_client())


def gpu_node(v1: client.CoreV1Api, name: str, cards: int, mib: int) -> None:
    """A Node whose guardmesh.io/gpus annotation lists its GPUs (as the agent DaemonSet writes it)."""
    gpus = [{"index": i, "uuid": f"GPU-{name}-{i}", "model": "A100", "memory_mib": mib} for i in range(cards)]
    meta = client.V1ObjectMeta(
        name=name, labels={"kubernetes.io/hostname": name}, annotations={GPUS_ANNOTATION: json.dumps(gpus)}
    )
    v1.create_node(client.V1Node(metadata=meta))


def gpu_pod(v1: client.CoreV1Api, name: str, mib: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """Create a pod asking for ``mib`` MiB of GPU memory; its JSON as kube-scheduler would send it."""
    res = client.V1ResourceRequirements(limits={RESOURCE: str(mib)}, requests={RESOURCE: str(mib)})
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace=NS, uid=f"uid-{name}", annotations=annotations or {}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="train", image="trainer:1", resources=res)]),
    )
    created = v1.create_namespaced_pod(NS, pod)
    return dict(client.ApiClient().sanitize_for_serialization(created))


class Cluster:
    """A scheduler core, its extender over HTTP and its controller, wired to the stand-in."""

    def __init__(self, kube: KubeEmulator, core: Scheduler, **settings: Any) -> None:
        self.core = core
        self.api = KubeApi(kube.api_client())
        self.settings = ExtenderSettings(port=0, **settings)
        self.extender = Extender(core, self.api, self.settings)
        self.server = ExtenderHttpServer(self.extender, "127.0.0.1", 0).start()
        self.controller = Controller(core, self.api, self.settings, orphan_grace_s=3600)
        self.base = f"http://127.0.0.1:{self.server.port}"

    def post(self, verb: str, doc: Any) -> Any:
        req = urllib.request.Request(f"{self.base}/{verb}", data=json.dumps(doc).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def schedule(self, pod: dict[str, Any], nodes: list[str]) -> tuple[str, str]:
        """What kube-scheduler does with the extender: filter, prioritize, pick the best, bind."""
        passed = self.post("filter", {"Pod": pod, "NodeNames": nodes})
        assert passed["Error"] == "", passed
        if not passed["NodeNames"]:
            return "", json.dumps(passed["FailedNodes"] | passed["FailedAndUnresolvableNodes"])
        scores = self.post("prioritize", {"Pod": pod, "NodeNames": passed["NodeNames"]})
        best = max(scores, key=lambda hp: hp["Score"])["Host"]
        meta = pod["metadata"]
        bound = self.post(
            "bind", {"PodName": meta["name"], "PodNamespace": meta["namespace"], "PodUID": meta["uid"], "Node": best}
        )
        return best, bound["Error"]

    def close(self) -> None:
        self.controller.stop()
        self.server.stop()


@pytest.fixture
def cluster(kube: KubeEmulator, v1: client.CoreV1Api) -> Iterator[Cluster]:
    """Two nodes of 2 x 40 GiB registered through the controller from their annotations."""
    gpu_node(v1, "gpu-a", 2, 40960)
    gpu_node(v1, "gpu-b", 2, 40960)
    c = Cluster(
        kube,
        Scheduler(SchedulerSettings(gpu_reserve_mib=0, preemption_grace_s=60), policy="best-fit"),
        gang_wait_s=60.0,  # members scheduled one after the other may be seconds apart on a loaded machine
        resync_s=1.0,
    )
    done = c.controller.reconcile()
    assert sorted(done.registered) == ["gpu-a", "gpu-b"] and done.errors == []
    yield c
    c.close()


def binding_targets(kube: KubeEmulator) -> dict[str, str]:
    """Pod name -> node of every Binding the stand-in received."""
    out = {}
    for key in list(kube.kube.objects.keys()):
        resource, _, name = key
        if resource.plural == "bindings":
            out[name] = kube.kube.objects[key]["target"]["name"]
    return out


def test_pod_lifecycle_filter_prioritize_bind_annotate_delete_release(
    cluster: Cluster, kube: KubeEmulator, v1: client.CoreV1Api
) -> None:
    pod = gpu_pod(v1, "trainer-0", 30000)
    node, error = cluster.schedule(pod, ["gpu-a", "gpu-b"])
    assert error == "" and node in ("gpu-a", "gpu-b")
    assert binding_targets(kube) == {"trainer-0": node}
    job = cluster.core.describe(job_id_of("uid-trainer-0"))
    assert job.state == JobState.RUNNING and job.placements[0].node == node
    notes = PodFacts.of(v1.read_namespaced_pod("trainer-0", NS)).annotations
    grant = job.placements[0].gpus[0]
    assert notes["guardmesh.io/job-id"] == job.job_id
    assert notes["guardmesh.io/gpu-uuids"] == grant.uuid and grant.uuid.startswith(f"GPU-{node}-")
    assert notes["guardmesh.io/gpu-memory-cap-mib"] == "30000"
    assert json.loads(notes["guardmesh.io/env"])["CUDA_VISIBLE_DEVICES"] == grant.uuid
    # One annotation per variable, for the downward API to map onto the container's environment.
    assert notes["guardmesh.io/env.CUDA_VISIBLE_DEVICES"] == grant.uuid
    assert notes["guardmesh.io/env.GUARDMESH_GPU_MEMORY_CAP_MIB"] == "30000"

    # A second 30 GiB pod goes to the other card or node: the first one's memory is held.
    node2, error2 = cluster.schedule(gpu_pod(v1, "trainer-1", 30000), ["gpu-a", "gpu-b"])
    assert error2 == ""
    held = {g.uuid for j in cluster.core.list_jobs(state=JobState.RUNNING) for g in j.placements[0].gpus}
    assert len(held) == 2

    v1.delete_namespaced_pod("trainer-0", NS)
    done = cluster.controller.reconcile()
    assert done.released == [job.job_id]
    assert cluster.core.describe(job.job_id).state == JobState.RELEASED
    assert cluster.core.describe(job_id_of("uid-trainer-1")).state == JobState.RUNNING
    assert cluster.controller.reconcile().released == []  # level-triggered: a second pass finds nothing to do
    del node2


def test_finished_pod_releases_its_job(cluster: Cluster, v1: client.CoreV1Api) -> None:
    pod = gpu_pod(v1, "batch", 10000)
    assert cluster.schedule(pod, ["gpu-a"])[1] == ""
    v1.patch_namespaced_pod_status("batch", NS, {"status": {"phase": "Succeeded"}})
    assert cluster.controller.reconcile().released == [job_id_of("uid-batch")]


def test_running_controller_releases_on_a_watch_event(cluster: Cluster, v1: client.CoreV1Api) -> None:
    assert cluster.schedule(gpu_pod(v1, "w", 10000), ["gpu-a"])[1] == ""
    cluster.controller.start()
    v1.delete_namespaced_pod("w", NS)
    deadline = time.monotonic() + 60
    while cluster.core.describe(job_id_of("uid-w")).state != JobState.RELEASED:
        assert time.monotonic() < deadline, "the controller did not release the deleted pod's job"
        time.sleep(0.05)


def test_guardmesh_preemption_evicts_the_pod_with_an_event(
    cluster: Cluster, kube: KubeEmulator, v1: client.CoreV1Api
) -> None:
    # Fill both nodes with burstable pods, then a guaranteed job submitted to guardmesh needs a whole node.
    for i, node in enumerate(["gpu-a", "gpu-a", "gpu-b", "gpu-b"]):
        assert cluster.schedule(gpu_pod(v1, f"b{i}", 40000), [node])[1] == ""
    cluster.core.submit(
        JobSpec("urgent", "ops", 1, 1, memory_mib_per_gpu=40000, qos=Qos.GUARANTEED, allow_sharing=True)
    )
    preempting = [j.job_id for j in cluster.core.list_jobs(state=JobState.PREEMPTING)]
    assert len(preempting) == 1  # the fewest victims: one pod's card
    victim = "b" + str(["uid-b0", "uid-b1", "uid-b2", "uid-b3"].index(preempting[0][4:]))
    kube.refuse_evictions = True  # a PodDisruptionBudget forbids it for now: no Event, retried next pass
    done = cluster.controller.reconcile()
    assert done.evicted == [] and len(done.errors) == 1 and "429" in done.errors[0]
    assert v1.list_namespaced_event(NS).items == []
    assert cluster.core.describe(preempting[0]).state == JobState.PREEMPTING
    kube.refuse_evictions = False
    done = cluster.controller.reconcile()
    assert done.evicted == [f"{NS}/{victim}"]
    assert kube.evictions == [(NS, victim)]
    events = [e for e in v1.list_namespaced_event(NS).items if e.involved_object.name == victim]
    assert [e.reason for e in events] == ["Preempted"]
    assert "guaranteed job urgent" in str(events[0].message) and events[0].type == "Warning"
    # The API server deletes an evicted pod; once it is gone, the card goes to the guaranteed job.
    v1.delete_namespaced_pod(victim, NS)
    cluster.controller.reconcile()
    assert cluster.core.describe("urgent").state == JobState.RUNNING


def test_expired_lease_evicts_the_pod(kube: KubeEmulator, v1: client.CoreV1Api) -> None:
    gpu_node(v1, "gpu-a", 1, 40960)
    now = [1000.0]
    core = Scheduler(SchedulerSettings(gpu_reserve_mib=0, lease_ttl_s=5), clock=lambda: now[0])
    c = Cluster(kube, core)
    try:
        c.controller.reconcile()
        # The pod's worker renews its lease itself (through the SDK): the controller leaves it alone.
        assert c.schedule(gpu_pod(v1, "idle", 10000, {"guardmesh.io/lease-ttl-s": "5"}), ["gpu-a"])[1] == ""
        assert c.controller.reconcile().renewed == []
        now[0] += 10  # the worker never renewed
        core.tick()
        assert core.describe(job_id_of("uid-idle")).state == JobState.LEASE_EXPIRED
        done = c.controller.reconcile()
        assert done.evicted == [f"{NS}/idle"] and kube.evictions == [(NS, "idle")]
        assert [e.reason for e in v1.list_namespaced_event(NS).items] == ["LeaseExpired"]
    finally:
        c.close()


def bind_all(c: Cluster, pods: list[tuple[dict[str, Any], str]]) -> dict[str, str]:
    """Bind pods concurrently, as kube-scheduler's binding cycles run; pod name -> Error."""
    for pod, node in pods:
        assert c.post("filter", {"Pod": pod, "NodeNames": [node]})["Error"] == ""
    errors: dict[str, str] = {}

    def bind(pod: dict[str, Any], node: str) -> None:
        meta = pod["metadata"]
        args = {"PodName": meta["name"], "PodNamespace": NS, "PodUID": meta["uid"], "Node": node}
        errors[meta["name"]] = c.post("bind", args)["Error"]

    threads = [threading.Thread(target=bind, args=p) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


GANG = {"guardmesh.io/pod-group": "allreduce", "guardmesh.io/pod-group-size": "3"}


def test_gang_of_three_binds_all_together(cluster: Cluster, kube: KubeEmulator, v1: client.CoreV1Api) -> None:
    pods = [(gpu_pod(v1, f"g{i}", 40000, GANG), node) for i, node in enumerate(["gpu-a", "gpu-a", "gpu-b"])]
    assert bind_all(cluster, pods) == {"g0": "", "g1": "", "g2": ""}
    assert binding_targets(kube) == {"g0": "gpu-a", "g1": "gpu-a", "g2": "gpu-b"}
    assert {j.job_id for j in cluster.core.list_jobs(state=JobState.RUNNING)} == {
        job_id_of(f"uid-g{i}") for i in range(3)
    }


def test_gang_of_three_that_cannot_all_fit_binds_none_and_holds_nothing(
    cluster: Cluster, kube: KubeEmulator, v1: client.CoreV1Api
) -> None:
    # gpu-a has two cards: a third member pointed at it cannot fit beside the other two.
    pods = [(gpu_pod(v1, f"g{i}", 40000, GANG), "gpu-a") for i in range(3)]
    errors = bind_all(cluster, pods)
    assert set(errors) == {"g0", "g1", "g2"}
    assert all("no pod of the group was bound" in e for e in errors.values()), errors
    assert binding_targets(kube) == {}
    assert cluster.core.list_jobs(state=JobState.RUNNING) == []
    # No partial hold: another pod takes both cards of gpu-a at once.
    other = gpu_pod(v1, "solo", 40000, {"guardmesh.io/gpus": "2"})
    assert cluster.schedule(other, ["gpu-a"]) == ("gpu-a", "")


def test_gang_whose_members_do_not_all_arrive_reserves_nothing(kube: KubeEmulator, v1: client.CoreV1Api) -> None:
    gpu_node(v1, "gpu-a", 2, 40960)
    c = Cluster(kube, Scheduler(SchedulerSettings(gpu_reserve_mib=0)), gang_wait_s=0.5)
    try:
        c.controller.reconcile()
        pods = [(gpu_pod(v1, f"g{i}", 40000, GANG), "gpu-a") for i in range(2)]
        errors = bind_all(c, pods)
        assert all("2 of 3 pods asked to bind" in e or "1 of 3 pods asked to bind" in e for e in errors.values()), (
            errors
        )
        assert binding_targets(kube) == {} and c.core.list_jobs() == []
    finally:
        c.close()


def test_restart_reconciles_from_the_api_server_and_the_store(
    kube: KubeEmulator, v1: client.CoreV1Api, tmp_path: Path
) -> None:
    gpu_node(v1, "gpu-a", 2, 40960)
    db = tmp_path / "scheduler.db"
    c = Cluster(kube, Scheduler(SchedulerSettings(gpu_reserve_mib=0), Store(db)))
    c.controller.reconcile()
    assert c.schedule(gpu_pod(v1, "kept", 20000), ["gpu-a"])[1] == ""
    assert c.schedule(gpu_pod(v1, "gone", 20000), ["gpu-a"])[1] == ""
    # A reservation made just before a crash, before its pod was annotated or bound.
    orphan = gpu_pod(v1, "orphan", 20000)
    c.post("filter", {"Pod": orphan, "NodeNames": ["gpu-a"]})
    request = c.extender.filtered["uid-orphan"]
    assert isinstance(request, PodRequest)
    with c.core.lock:
        c.extender._reserve(request, "gpu-a")
    c.close()
    c.core.close()

    # The stand-in does not set nodeName on a Binding; a real API server does: write what it would have.
    v1.patch_namespaced_pod("kept", NS, {"spec": {"nodeName": "gpu-a"}})
    v1.delete_namespaced_pod("gone", NS)  # deleted while the scheduler was down
    core = Scheduler(SchedulerSettings(gpu_reserve_mib=0), Store(db))
    fresh = Cluster(kube, core)
    fresh.controller.orphan_grace_s = 0.0
    try:
        done = fresh.controller.reconcile()
        assert sorted(done.released) == [job_id_of("uid-gone"), job_id_of("uid-orphan")]
        assert core.describe(job_id_of("uid-kept")).state == JobState.RUNNING
        # The orphaned pod is scheduled again from scratch (a fresh reservation, not the lost one).
        assert fresh.schedule(orphan, ["gpu-a"]) == ("gpu-a", "")
        assert core.describe(job_id_of("uid-orphan") + ".1").state == JobState.RUNNING
    finally:
        fresh.close()
        core.close()


def test_malformed_node_annotation_is_reported_and_skipped(kube: KubeEmulator, v1: client.CoreV1Api) -> None:
    v1.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="bad", annotations={GPUS_ANNOTATION: "[{]"})))
    gpu_node(v1, "good", 1, 16384)
    core = Scheduler(SchedulerSettings(gpu_reserve_mib=0))
    done = Controller(core, KubeApi(kube.api_client())).reconcile()
    assert done.registered == ["good"]
    assert len(done.errors) == 1 and "node bad: annotation guardmesh.io/gpus must be a JSON list" in done.errors[0]


def use_kubeconfig_of(kube: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point ``KUBECONFIG`` at a file under ``tmp_path`` naming the stand-in API server ``kube`` (no auth)."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": {"server": kube.url}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "stand-in", "user": "u"}}],
        "current-context": "c",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))


def test_the_scheduler_service_serves_the_extender_and_reconciles_when_enabled(
    kube: KubeEmulator, v1: client.CoreV1Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_kubeconfig_of(kube, tmp_path, monkeypatch)
    overrides = {"extender.enabled": True, "extender.host": "127.0.0.1", "extender.port": 0, "extender.resync_s": 1.0}
    running = start_service(load_definition("scheduler"), make_config(tmp_path, **overrides), port=0)
    try:
        side = running.binding.kube  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{side.http.port}"
        gpu_node(v1, "gpu-a", 1, 40960)  # the running controller registers it from its annotation
        pod = gpu_pod(v1, "svc-pod", 10000)
        deadline = time.monotonic() + 60
        while True:
            req = urllib.request.Request(
                f"{base}/filter", data=json.dumps({"Pod": pod, "NodeNames": ["gpu-a"]}).encode()
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                if json.loads(resp.read())["NodeNames"] == ["gpu-a"]:
                    break
            assert time.monotonic() < deadline, "the controller did not register the annotated node"
            time.sleep(0.1)
        args = {"PodName": "svc-pod", "PodNamespace": NS, "PodUID": "uid-svc-pod", "Node": "gpu-a"}
        req = urllib.request.Request(f"{base}/bind", data=json.dumps(args).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read()) == {"Error": ""}
        channel = open_channel("scheduler", running.config, address=running.address)
        try:
            stub = spb_grpc.SchedulerServiceStub(channel)
            job = stub.DescribeJob(spb.DescribeJobRequest(job_id=job_id_of("uid-svc-pod")), timeout=30).job
            assert job.state == spb.JOB_STATE_RUNNING
        finally:
            channel.close()
    finally:
        running.stop(grace=0.5)


def test_the_controller_renews_the_lease_of_a_pod_that_does_not_speak_guardmesh(
    kube: KubeEmulator, v1: client.CoreV1Api
) -> None:
    gpu_node(v1, "gpu-a", 1, 40960)
    now = [1000.0]
    core = Scheduler(SchedulerSettings(gpu_reserve_mib=0, lease_ttl_s=5), clock=lambda: now[0])
    c = Cluster(kube, core)
    try:
        c.controller.reconcile()
        assert c.schedule(gpu_pod(v1, "plain", 10000), ["gpu-a"])[1] == ""
        job_id = job_id_of("uid-plain")
        assert c.controller.period <= 5 / 3  # passes come often enough for the lease
        for _ in range(4):  # 16 s, three times the TTL, with a pass every 4 s
            now[0] += 4
            assert c.controller.reconcile().renewed == [job_id]
            core.tick()
        assert core.describe(job_id).state == JobState.RUNNING and kube.evictions == []
        v1.delete_namespaced_pod("plain", NS)
        assert c.controller.reconcile().released == [job_id]
    finally:
        c.close()


def test_gang_members_scheduled_one_by_one_are_spread_so_the_group_fits(
    cluster: Cluster, kube: KubeEmulator, v1: client.CoreV1Api
) -> None:
    # kube-scheduler schedules members one at a time; each waits in bind. Were the waiting members invisible
    # to filter, all three would be sent to the same (best-scored) node and the group could never bind.
    results: dict[str, tuple[str, str]] = {}

    def schedule(name: str, pod: dict[str, Any]) -> None:
        results[name] = cluster.schedule(pod, ["gpu-a", "gpu-b"])

    threads = []
    for i in range(3):
        pod = gpu_pod(v1, f"g{i}", 40000, GANG)
        t = threading.Thread(target=schedule, args=(f"g{i}", pod))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 60
        while i < 2 and sum(len(m) for m in cluster.extender._groups.values()) < i + 1:
            assert time.monotonic() < deadline, "a member did not reach bind"
            time.sleep(0.02)
    for t in threads:
        t.join(120)
    assert {name: error for name, (_, error) in results.items()} == {"g0": "", "g1": "", "g2": ""}
    placed = sorted(node for node, _ in results.values())
    assert placed == ["gpu-a", "gpu-a", "gpu-b"] or placed == ["gpu-a", "gpu-b", "gpu-b"]
    assert binding_targets(kube) == {name: node for name, (node, _) in results.items()}


def test_the_extender_follows_leadership_between_two_scheduler_replicas(
    kube: KubeEmulator, v1: client.CoreV1Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_kubeconfig_of(kube, tmp_path, monkeypatch)
    gpu_node(v1, "gpu-a", 1, 40960)
    pod = gpu_pod(v1, "p", 10000)
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    overrides = {
        "scheduler.store_url": store,
        # Long enough that a loaded machine does not let it lapse; the stopping leader hands it back anyway.
        "scheduler.leader_lease_s": 5.0,
        "extender.enabled": True,
        "extender.host": "127.0.0.1",
        "extender.port": 0,
        "extender.resync_s": 0.5,
    }
    replicas = [
        start_service(load_definition("scheduler"), make_config(tmp_path / name, **overrides), port=0)
        for name in ("r1", "r2")
    ]

    def answer(running: Any) -> dict[str, Any]:
        port = running.binding.kube.http.port
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/filter", data=json.dumps({"Pod": pod, "NodeNames": ["gpu-a"]}).encode()
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    try:
        leaders = [r for r in replicas if not r.binding.servicer.standby]  # type: ignore[attr-defined]
        assert len(leaders) == 1
        leader, standby = leaders[0], next(r for r in replicas if r is not leaders[0])
        assert "standby" in answer(standby)["Error"]
        assert standby.binding.kube.controller is None  # type: ignore[attr-defined]  # reconciles nothing
        deadline = time.monotonic() + 60
        while answer(leader)["NodeNames"] != ["gpu-a"]:  # its controller registered the annotated node
            assert time.monotonic() < deadline, "the leader's controller did not register the node"
            time.sleep(0.1)
        leader.stop(grace=0.5)  # hands the lease back: the standby takes over
        deadline = time.monotonic() + 60
        while True:
            doc = answer(standby)
            if doc["Error"] == "" and doc["NodeNames"] == ["gpu-a"]:
                break
            assert time.monotonic() < deadline, f"the standby did not take over the extender: {doc}"
            time.sleep(0.1)
        assert standby.binding.kube.controller is not None  # type: ignore[attr-defined]
    finally:
        for r in replicas:
            r.stop(grace=0.5)
