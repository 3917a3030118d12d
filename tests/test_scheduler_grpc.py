"""The scheduler over real gRPC: a real server on an ephemeral port, a real channel, real SQLite."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from guardmesh.client import open_channel
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from tests.conftest import check_invariant, make_config, node_pb

RESERVE = 512
MODEL = "A100-80GB"
CARD = 81920
USABLE = CARD - RESERVE
Code = grpc.StatusCode


def job_pb(
    job_id: str,
    *,
    gpus: int = 1,
    replicas: int = 1,
    mem: int | None = None,
    share: int | None = None,
    tenant: str = "team-a",
    **kw: Any,
) -> spb.JobSpec:
    msg = spb.JobSpec(job_id=job_id, tenant=tenant, replicas=replicas, gpus_per_replica=gpus, **kw)
    if mem is not None:
        msg.memory_mib_per_gpu = mem
    if share is not None:
        msg.gpu_share_milli = share
    if mem is None and share is None:
        msg.gpu_share_milli = 1000
    return msg


def register(stub: spb_grpc.SchedulerServiceStub, *nodes: spb.NodeSpec) -> None:
    for n in nodes:
        stub.RegisterNode(spb.RegisterNodeRequest(node=n))


def submit(stub: spb_grpc.SchedulerServiceStub, spec: spb.JobSpec) -> spb.Job:
    return stub.SubmitJob(spb.SubmitJobRequest(job=spec)).job


def describe(stub: spb_grpc.SchedulerServiceStub, job_id: str) -> spb.Job:
    return stub.DescribeJob(spb.DescribeJobRequest(job_id=job_id)).job


def list_nodes(stub: spb_grpc.SchedulerServiceStub) -> spb.ListNodesResponse:
    return stub.ListNodes(spb.ListNodesRequest())


def observable(stub: spb_grpc.SchedulerServiceStub) -> tuple[spb.ListJobsResponse, spb.ListNodesResponse]:
    return stub.ListJobs(spb.ListJobsRequest()), list_nodes(stub)


def holders(stub: spb_grpc.SchedulerServiceStub) -> dict[str, set[tuple[str, int]]]:
    out: dict[str, set[tuple[str, int]]] = {}
    for node in list_nodes(stub).nodes:
        for g in node.gpus:
            for a in g.allocations:
                out.setdefault(a.job_id, set()).add((node.spec.name, g.device.index))
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@contextlib.contextmanager
def custom_scheduler(tmp_path: Path, **overrides: object) -> Iterator[spb_grpc.SchedulerServiceStub]:
    """A scheduler server with config overrides, and a stub to it."""
    config = make_config(tmp_path, **overrides)
    running = start_service(load_definition("scheduler"), config, port=0)
    channel = open_channel("scheduler", config, address=running.address)
    try:
        yield spb_grpc.SchedulerServiceStub(channel)
    finally:
        channel.close()
        running.stop(grace=1.0)


def core_violations(service: RunningService) -> list[str]:
    return service.binding.servicer.core.violations()  # type: ignore[attr-defined,no-any-return]


# --------------------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------------------


def test_register_node_and_list_nodes_round_trip(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    big = node_pb("gpu-1", 4, CARD, group_size=2, zone="a")
    small = node_pb("gpu-0", 2, 16384, model="T4")
    resp = scheduler_stub.RegisterNode(spb.RegisterNodeRequest(node=big))
    assert resp.node.spec == big
    assert resp.node.reserve_mib == RESERVE
    assert resp.node.HasField("last_seen")
    assert [g.device for g in resp.node.gpus] == list(big.gpus)
    assert all(g.allocatable_mib == USABLE and not g.allocations for g in resp.node.gpus)
    register(scheduler_stub, small)

    nodes = list_nodes(scheduler_stub).nodes
    assert [n.spec.name for n in nodes] == ["gpu-0", "gpu-1"]
    assert nodes[0].spec == small and nodes[1].spec == big
    assert [g.allocatable_mib for g in nodes[0].gpus] == [16384 - RESERVE] * 2
    only_t4 = scheduler_stub.ListNodes(spb.ListNodesRequest(model="T4")).nodes
    assert [n.spec.name for n in only_t4] == ["gpu-0"]
    assert not scheduler_stub.ListNodes(spb.ListNodesRequest(model="H100")).nodes

    # Updating a node (labels) keeps it in place.
    relabelled = node_pb("gpu-1", 4, CARD, group_size=2, zone="b")
    register(scheduler_stub, relabelled)
    nodes = list_nodes(scheduler_stub).nodes
    assert len(nodes) == 2
    assert dict(nodes[1].spec.labels) == {"zone": "b"}


def test_submit_before_any_node_is_failed_precondition(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        submit(scheduler_stub, job_pb("early"))
    assert exc.value.code() == Code.FAILED_PRECONDITION
    assert not scheduler_stub.ListJobs(spb.ListJobsRequest()).jobs


# --------------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------------


def test_submit_job_placement_carries_env_and_caps(
    scheduler_stub: spb_grpc.SchedulerServiceStub, scheduler_service: RunningService
) -> None:
    register(scheduler_stub, node_pb("gpu-1", 4, CARD, group_size=2))
    before = time.time()
    train = submit(scheduler_stub, job_pb("train", gpus=2, mem=40000))
    assert train.state == spb.JOB_STATE_RUNNING
    assert train.pending_reason == ""
    assert len(train.placements) == 1
    rp = train.placements[0]
    assert rp.replica == 0 and rp.node == "gpu-1"
    uuids = [g.uuid for g in rp.gpus]
    assert len(set(uuids)) == 2 and all(u.startswith("GPU-gpu-1-") for u in uuids)
    assert rp.env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)
    assert rp.env["GUARDMESH_GPU_MEMORY_FRACTION"] == ",".join([f"{40000 / CARD:.6f}"] * 2)
    assert rp.env["GUARDMESH_GPU_MEMORY_CAP_MIB"] == "40000,40000"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in rp.env
    for g in rp.gpus:
        assert g.memory_cap_mib == 40000
        assert g.memory_fraction == pytest.approx(40000 / CARD, abs=1e-6)
        assert g.model == MODEL
    assert len({g.topology_group for g in rp.gpus}) == 1
    expires = rp.lease_expires_at.ToNanoseconds() / 1e9
    assert before + 29 <= expires <= time.time() + 31

    infer = submit(scheduler_stub, job_pb("infer", share=250, allow_sharing=True))
    assert infer.state == spb.JOB_STATE_RUNNING
    g = infer.placements[0].gpus[0]
    cap = USABLE * 250 // 1000
    assert g.memory_cap_mib == cap
    assert g.uuid not in uuids
    env = infer.placements[0].env
    assert env["CUDA_VISIBLE_DEVICES"] == g.uuid
    assert env["GUARDMESH_GPU_MEMORY_CAP_MIB"] == str(cap)
    assert env["GUARDMESH_GPU_MEMORY_FRACTION"] == f"{cap / CARD:.6f}"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={cap}M"

    held = holders(scheduler_stub)
    assert held["train"] == {("gpu-1", g.index) for g in rp.gpus}
    nodes = list_nodes(scheduler_stub)
    assert check_invariant(nodes, RESERVE) == []
    allocs = {(a.job_id, a.memory_cap_mib, a.shared) for n in nodes.nodes for gs in n.gpus for a in gs.allocations}
    assert allocs == {("train", 40000, False), ("infer", cap, True)}
    assert core_violations(scheduler_service) == []


def test_describe_list_and_release_jobs(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    register(scheduler_stub, node_pb("gpu-1", 2, CARD))
    submit(scheduler_stub, job_pb("a1", tenant="tenant-a"))
    submit(scheduler_stub, job_pb("b1", tenant="tenant-b"))
    a2 = submit(scheduler_stub, job_pb("a2", tenant="tenant-a"))
    assert a2.state == spb.JOB_STATE_PENDING
    assert a2.pending_reason and not a2.placements

    def ids(**kw: Any) -> list[str]:
        return [j.spec.job_id for j in scheduler_stub.ListJobs(spb.ListJobsRequest(**kw)).jobs]

    assert ids() == ["a1", "b1", "a2"]
    assert ids(tenant="tenant-a") == ["a1", "a2"]
    assert ids(state=spb.JOB_STATE_PENDING) == ["a2"]
    assert ids(state=spb.JOB_STATE_RUNNING) == ["a1", "b1"]
    assert ids(tenant="tenant-b", state=spb.JOB_STATE_RUNNING) == ["b1"]
    assert ids(tenant="tenant-c") == []
    d = describe(scheduler_stub, "a2")
    # Unset QoS and topology come back as their documented defaults.
    defaults = {"qos": spb.QOS_CLASS_BURSTABLE, "topology": spb.TOPOLOGY_PREFERENCE_PREFERRED}
    assert d.spec == job_pb("a2", tenant="tenant-a", **defaults)
    assert d.state == spb.JOB_STATE_PENDING and d.pending_reason == a2.pending_reason

    released = scheduler_stub.ReleaseJob(spb.ReleaseJobRequest(job_id="a1")).job
    assert released.state == spb.JOB_STATE_RELEASED
    held = holders(scheduler_stub)
    assert "a1" not in held
    assert describe(scheduler_stub, "a2").state == spb.JOB_STATE_RUNNING
    assert ids(state=spb.JOB_STATE_RELEASED) == ["a1"]
    events = scheduler_stub.ListEvents(spb.ListEventsRequest()).events
    # Releasing again changes nothing.
    again = scheduler_stub.ReleaseJob(spb.ReleaseJobRequest(job_id="a1")).job
    assert again.state == spb.JOB_STATE_RELEASED
    assert scheduler_stub.ListEvents(spb.ListEventsRequest()).events == events
    # Withdrawing a pending job.
    submit(scheduler_stub, job_pb("a3", tenant="tenant-a"))
    assert describe(scheduler_stub, "a3").state == spb.JOB_STATE_PENDING
    assert scheduler_stub.ReleaseJob(spb.ReleaseJobRequest(job_id="a3")).job.state == spb.JOB_STATE_RELEASED
    assert check_invariant(list_nodes(scheduler_stub), RESERVE) == []


def test_renew_lease_and_expiry(tmp_path: Path) -> None:
    with custom_scheduler(tmp_path, **{"scheduler.lease_ttl_s": 1}) as stub:
        register(stub, node_pb("gpu-1", 2, CARD))
        kept = submit(stub, job_pb("kept", lease_ttl_s=5))
        first = kept.placements[0].lease_expires_at.ToNanoseconds()
        lapses = submit(stub, job_pb("lapses"))  # default TTL from the config: 1 s
        assert lapses.lease_ttl_s == 1 and kept.lease_ttl_s == 5
        time.sleep(0.2)
        renewed = stub.RenewLease(spb.RenewLeaseRequest(job_id="kept", replica=0))
        assert renewed.state == spb.JOB_STATE_RUNNING
        assert renewed.lease_expires_at.ToNanoseconds() >= first + 150_000_000
        assert not renewed.HasField("preemption_deadline")
        assert describe(stub, "kept").placements[0].lease_expires_at == renewed.lease_expires_at
        # The reaper reclaims the lease that nobody renews.
        assert wait_for(lambda: describe(stub, "lapses").state == spb.JOB_STATE_LEASE_EXPIRED)
        assert "lapses" not in holders(stub)
        kinds = [e.kind for e in stub.ListEvents(spb.ListEventsRequest(job_id="lapses")).events]
        assert kinds == [spb.EVENT_KIND_PLACED, spb.EVENT_KIND_LEASE_EXPIRED]
        with pytest.raises(grpc.RpcError) as exc:
            stub.RenewLease(spb.RenewLeaseRequest(job_id="lapses", replica=0))
        assert exc.value.code() == Code.FAILED_PRECONDITION
        assert describe(stub, "kept").state == spb.JOB_STATE_RUNNING


def test_list_events(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    register(scheduler_stub, node_pb("gpu-1", 1, CARD))
    submit(scheduler_stub, job_pb("one"))
    submit(scheduler_stub, job_pb("two"))
    scheduler_stub.ReleaseJob(spb.ReleaseJobRequest(job_id="one"))
    events = scheduler_stub.ListEvents(spb.ListEventsRequest()).events
    assert [(e.seq, e.job_id, e.kind) for e in events] == [
        (1, "one", spb.EVENT_KIND_PLACED),
        (2, "two", spb.EVENT_KIND_PENDING),
        (3, "one", spb.EVENT_KIND_RELEASED),
        (4, "two", spb.EVENT_KIND_PLACED),
    ]
    assert all(e.HasField("at") and e.message for e in events)
    assert "gpu-1" in events[0].message
    assert [e.seq for e in scheduler_stub.ListEvents(spb.ListEventsRequest(after_seq=2)).events] == [3, 4]
    assert [e.seq for e in scheduler_stub.ListEvents(spb.ListEventsRequest(limit=2)).events] == [1, 2]
    assert [e.seq for e in scheduler_stub.ListEvents(spb.ListEventsRequest(job_id="two")).events] == [2, 4]
    assert not scheduler_stub.ListEvents(spb.ListEventsRequest(after_seq=4)).events


def test_plan_capacity(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    register(scheduler_stub, node_pb("gpu-1", 1, CARD))
    shape = spb.NodeShape(model=MODEL, gpus=4, memory_mib_per_gpu=CARD)
    free = 4 * USABLE
    jobs = [job_pb("x", replicas=10, mem=70000, allow_sharing=True), job_pb("y", replicas=9, mem=1000)]
    plan = scheduler_stub.PlanCapacity(spb.PlanCapacityRequest(shape=shape, jobs=jobs))
    requested = 10 * 70000 + 9 * 1000
    assert plan.requested_memory_mib == requested
    assert plan.free_memory_mib_per_node == free
    assert plan.nodes_by_memory == math.ceil(requested / free) == 3
    assert plan.nodes_by_exclusive_gpus == math.ceil(9 / 4) == 3
    assert plan.nodes_needed == 3
    # No jobs given: the pending jobs the model admits.
    submit(scheduler_stub, job_pb("fill"))
    submit(scheduler_stub, job_pb("waits", replicas=6, mem=60000, allow_sharing=True))
    plan = scheduler_stub.PlanCapacity(spb.PlanCapacityRequest(shape=shape))
    assert plan.requested_memory_mib == 6 * 60000
    assert plan.nodes_by_memory == math.ceil(360000 / free) == 2
    assert plan.nodes_needed == 2


# --------------------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------------------


def test_watch_job_streams_snapshot_then_events(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    register(scheduler_stub, node_pb("gpu-1", 1, CARD))
    submit(scheduler_stub, job_pb("blocker"))
    submit(scheduler_stub, job_pb("watched"))
    stream = scheduler_stub.WatchJob(spb.WatchJobRequest(job_id="watched"), timeout=60)
    with ThreadPoolExecutor(1) as pool:
        first = next(stream)
        assert not first.HasField("event")
        assert first.job.state == spb.JOB_STATE_PENDING

        pool.submit(scheduler_stub.ReleaseJob, spb.ReleaseJobRequest(job_id="blocker")).result(60)
        placed = next(stream)
        assert placed.event.kind == spb.EVENT_KIND_PLACED
        assert placed.event.job_id == "watched"
        assert placed.job.state == spb.JOB_STATE_RUNNING
        assert placed.job.placements[0].env["CUDA_VISIBLE_DEVICES"] == "GPU-gpu-1-0"

        pool.submit(scheduler_stub.ReleaseJob, spb.ReleaseJobRequest(job_id="watched")).result(60)
        released = next(stream)
        assert released.event.kind == spb.EVENT_KIND_RELEASED
        assert released.job.state == spb.JOB_STATE_RELEASED
        assert released.event.seq > placed.event.seq
        # The job ended: the stream ends.
        assert list(stream) == []


def test_watch_job_streams_preemption_notice_and_preempted(tmp_path: Path) -> None:
    # The grace must outlast the notice's trip to the watcher and the renewal after it on a loaded machine
    # (0.5 s did not: the renewal then found the job already PREEMPTED).
    overrides = {"scheduler.preemption_grace_s": 3.0, "scheduler.policy": "first-fit"}
    with custom_scheduler(tmp_path, **overrides) as stub, ThreadPoolExecutor(1) as pool:
        register(stub, node_pb("gpu-1", 1, CARD))
        submit(stub, job_pb("victim", qos=spb.QOS_CLASS_BEST_EFFORT))
        stream = stub.WatchJob(spb.WatchJobRequest(job_id="victim"), timeout=60)
        first = next(stream)
        assert not first.HasField("event") and first.job.state == spb.JOB_STATE_RUNNING

        g = pool.submit(submit, stub, job_pb("guar", qos=spb.QOS_CLASS_GUARANTEED)).result(60)
        assert g.state == spb.JOB_STATE_PENDING
        notice = next(stream)
        assert notice.event.kind == spb.EVENT_KIND_PREEMPTION_NOTICE
        assert notice.job.state == spb.JOB_STATE_PREEMPTING
        assert notice.job.preempted_by == "guar"
        assert notice.job.HasField("preemption_deadline")
        # The worker's heartbeat tells it the job is being preempted, and when allocations go.
        renew = stub.RenewLease(spb.RenewLeaseRequest(job_id="victim", replica=0))
        assert renew.state == spb.JOB_STATE_PREEMPTING
        assert renew.preemption_deadline == notice.job.preemption_deadline

        preempted = next(stream)
        assert preempted.event.kind == spb.EVENT_KIND_PREEMPTED
        assert preempted.job.state == spb.JOB_STATE_PREEMPTED
        assert list(stream) == []
        assert describe(stub, "guar").state == spb.JOB_STATE_RUNNING
        assert holders(stub) == {"guar": {("gpu-1", 0)}}


def test_watch_scale_signals_reports_pending_demand(tmp_path: Path) -> None:
    with custom_scheduler(tmp_path, **{"scheduler.scale_window_s": 0.5}) as stub:
        register(stub, node_pb("gpu-1", 2, CARD))
        submit(stub, job_pb("fill-0"))
        submit(stub, job_pb("fill-1"))
        waits = submit(stub, job_pb("waits", replicas=3, mem=70000, allow_sharing=True))
        assert waits.state == spb.JOB_STATE_PENDING
        stream = stub.WatchScaleSignals(spb.WatchScaleSignalsRequest(), timeout=60)
        expected_nodes = math.ceil(3 * 70000 / (2 * USABLE))
        seen = []
        try:
            for msg in stream:
                seen.append(msg.signal)
                if msg.signal.direction == spb.SCALE_DIRECTION_OUT and msg.signal.nodes == expected_nodes:
                    break
        finally:
            # The tracing interceptor hands back a generator over the call; closing it ends our side.
            stream.close()
        sig = seen[-1]
        assert sig.pool == MODEL
        assert sig.direction == spb.SCALE_DIRECTION_OUT
        assert sig.nodes == expected_nodes == 2
        assert sig.shape == spb.NodeShape(model=MODEL, gpus=2, memory_mib_per_gpu=CARD)
        assert "pending" in sig.reason
        assert sig.utilization == pytest.approx(1.0)
        # A filtered watch for another pool sees nothing of this one.
        other = stub.WatchScaleSignals(spb.WatchScaleSignalsRequest(pool="T4"), timeout=1.5)
        with pytest.raises(grpc.RpcError) as exc:
            list(other)
        assert exc.value.code() == Code.DEADLINE_EXCEEDED


# --------------------------------------------------------------------------------------------------------
# Bad input: the right status, the field named, nothing changed
# --------------------------------------------------------------------------------------------------------


def test_bad_inputs_return_status_and_change_nothing(
    scheduler_stub: spb_grpc.SchedulerServiceStub, scheduler_service: RunningService
) -> None:
    stub = scheduler_stub
    register(stub, node_pb("gpu-1", 2, CARD))
    submit(stub, job_pb("run"))
    submit(stub, job_pb("wait", gpus=2))
    dup_uuid = node_pb("gpu-9", 1, CARD)
    dup_uuid.gpus[0].uuid = "GPU-gpu-1-0"

    def watch_first(job_id: str) -> Any:
        return next(stub.WatchJob(spb.WatchJobRequest(job_id=job_id), timeout=5))

    shape = spb.NodeShape(model=MODEL, gpus=4, memory_mib_per_gpu=CARD)
    cases: list[tuple[str, Callable[[], Any], grpc.StatusCode, str | None]] = [
        ("node name", lambda: register(stub, node_pb("bad name", 1, CARD)), Code.INVALID_ARGUMENT, "node.name"),
        ("node no gpus", lambda: register(stub, spb.NodeSpec(name="empty")), Code.INVALID_ARGUMENT, "node.gpus"),
        (
            "gpu memory",
            lambda: register(stub, node_pb("gpu-2", 1, 0)),
            Code.INVALID_ARGUMENT,
            "node.gpus[0].memory_mib",
        ),
        ("gpu uuid taken", lambda: register(stub, dup_uuid), Code.INVALID_ARGUMENT, "node.gpus[0].uuid"),
        ("shrink busy gpu", lambda: register(stub, node_pb("gpu-1", 2, 40000)), Code.FAILED_PRECONDITION, None),
        (
            "report unknown node",
            lambda: stub.ReportNodeStatus(spb.ReportNodeStatusRequest(node="nope")),
            Code.NOT_FOUND,
            None,
        ),
        (
            "report unknown gpu",
            lambda: stub.ReportNodeStatus(
                spb.ReportNodeStatusRequest(node="gpu-1", gpus=[spb.GpuUsage(uuid="GPU-x", used_memory_mib=1)])
            ),
            Code.INVALID_ARGUMENT,
            "gpus[0].uuid",
        ),
        (
            "report utilisation",
            lambda: stub.ReportNodeStatus(
                spb.ReportNodeStatusRequest(
                    node="gpu-1", gpus=[spb.GpuUsage(uuid="GPU-gpu-1-1", used_memory_mib=1, utilization=2.0)]
                )
            ),
            Code.INVALID_ARGUMENT,
            "gpus[0].utilization",
        ),
        ("replicas", lambda: submit(stub, job_pb("x", replicas=0)), Code.INVALID_ARGUMENT, "job.replicas"),
        (
            "no memory",
            lambda: submit(stub, spb.JobSpec(job_id="x", tenant="t", replicas=1, gpus_per_replica=1)),
            Code.INVALID_ARGUMENT,
            "job.gpu_memory",
        ),
        (
            "memory too big",
            lambda: submit(stub, job_pb("x", mem=CARD)),
            Code.INVALID_ARGUMENT,
            "job.memory_mib_per_gpu",
        ),
        (
            "share with 2 gpus",
            lambda: submit(stub, job_pb("x", gpus=2, share=500)),
            Code.INVALID_ARGUMENT,
            "job.gpu_share_milli",
        ),
        (
            "unknown model",
            lambda: submit(stub, job_pb("x", allowed_models=["H100"])),
            Code.INVALID_ARGUMENT,
            "job.allowed_models",
        ),
        (
            "gang too big",
            lambda: submit(stub, job_pb("x", replicas=3, gang=True)),
            Code.INVALID_ARGUMENT,
            "job.replicas",
        ),
        ("gpus per replica", lambda: submit(stub, job_pb("x", gpus=3)), Code.INVALID_ARGUMENT, "job.gpus_per_replica"),
        ("qos value", lambda: submit(stub, job_pb("x", qos=9)), Code.INVALID_ARGUMENT, "job.qos"),
        ("topology value", lambda: submit(stub, job_pb("x", topology=9)), Code.INVALID_ARGUMENT, "job.topology"),
        ("empty id", lambda: submit(stub, job_pb("")), Code.INVALID_ARGUMENT, "job.job_id"),
        ("id taken", lambda: submit(stub, job_pb("run", mem=1000)), Code.ALREADY_EXISTS, None),
        ("describe empty", lambda: describe(stub, ""), Code.INVALID_ARGUMENT, "job_id"),
        ("describe unknown", lambda: describe(stub, "nope"), Code.NOT_FOUND, None),
        ("release empty", lambda: stub.ReleaseJob(spb.ReleaseJobRequest()), Code.INVALID_ARGUMENT, "job_id"),
        ("release unknown", lambda: stub.ReleaseJob(spb.ReleaseJobRequest(job_id="nope")), Code.NOT_FOUND, None),
        ("list state", lambda: stub.ListJobs(spb.ListJobsRequest(state=42)), Code.INVALID_ARGUMENT, "state"),  # type: ignore[arg-type]
        (
            "renew pending",
            lambda: stub.RenewLease(spb.RenewLeaseRequest(job_id="wait")),
            Code.FAILED_PRECONDITION,
            None,
        ),
        (
            "renew replica",
            lambda: stub.RenewLease(spb.RenewLeaseRequest(job_id="run", replica=1)),
            Code.INVALID_ARGUMENT,
            "replica",
        ),
        ("renew unknown", lambda: stub.RenewLease(spb.RenewLeaseRequest(job_id="nope")), Code.NOT_FOUND, None),
        ("renew empty", lambda: stub.RenewLease(spb.RenewLeaseRequest()), Code.INVALID_ARGUMENT, "job_id"),
        (
            "events seq",
            lambda: stub.ListEvents(spb.ListEventsRequest(after_seq=-1)),
            Code.INVALID_ARGUMENT,
            "after_seq",
        ),
        ("events limit", lambda: stub.ListEvents(spb.ListEventsRequest(limit=10_001)), Code.INVALID_ARGUMENT, "limit"),
        (
            "events negative limit",
            lambda: stub.ListEvents(spb.ListEventsRequest(limit=-1)),
            Code.INVALID_ARGUMENT,
            "limit",
        ),
        (
            "plan model",
            lambda: stub.PlanCapacity(spb.PlanCapacityRequest(shape=spb.NodeShape(gpus=1))),
            Code.INVALID_ARGUMENT,
            "shape.model",
        ),
        (
            "plan gpus",
            lambda: stub.PlanCapacity(
                spb.PlanCapacityRequest(shape=spb.NodeShape(model=MODEL, memory_mib_per_gpu=CARD))
            ),
            Code.INVALID_ARGUMENT,
            "shape.gpus",
        ),
        (
            "plan job",
            lambda: stub.PlanCapacity(spb.PlanCapacityRequest(shape=shape, jobs=[job_pb("x", replicas=0)])),
            Code.INVALID_ARGUMENT,
            "jobs[0].replicas",
        ),
        ("watch unknown", lambda: watch_first("nope"), Code.NOT_FOUND, None),
        ("watch empty", lambda: watch_first(""), Code.INVALID_ARGUMENT, "job_id"),
    ]
    before = observable(stub)
    events = stub.ListEvents(spb.ListEventsRequest()).events
    problems = []
    for name, call, code, field in cases:
        try:
            call()
        except grpc.RpcError as err:
            if err.code() != code:
                problems.append(f"{name}: {err.code()} != {code} ({err.details()})")
            elif field is not None and not (err.details() or "").startswith(field):
                problems.append(f"{name}: details {err.details()!r} do not name {field!r}")
        else:
            problems.append(f"{name}: no error")
        if observable(stub) != before:
            problems.append(f"{name}: ListJobs/ListNodes changed")
        if stub.ListEvents(spb.ListEventsRequest()).events != events:
            problems.append(f"{name}: events changed")
    assert problems == []
    # Resubmitting the same spec is idempotent.
    again = submit(stub, job_pb("run"))
    assert again == describe(stub, "run")
    assert observable(stub) == before
    assert check_invariant(list_nodes(stub), RESERVE) == []
    assert core_violations(scheduler_service) == []


def test_invariant_holds_over_a_mixed_sequence(
    scheduler_stub: spb_grpc.SchedulerServiceStub, scheduler_service: RunningService
) -> None:
    stub = scheduler_stub
    register(stub, node_pb("gpu-1", 4, CARD, group_size=2), node_pb("gpu-2", 2, CARD))
    specs = [
        job_pb("s1", share=300, allow_sharing=True),
        job_pb("s2", mem=50000, allow_sharing=True),
        job_pb("e1", gpus=2, mem=1000),
        job_pb("s3", replicas=3, share=400, allow_sharing=True),
        job_pb("g1", replicas=2, gpus=2, gang=True),
        job_pb("e2", replicas=2),
        job_pb("s4", mem=USABLE, allow_sharing=True),
    ]
    for i, spec in enumerate(specs):
        submit(stub, spec)
        nodes = list_nodes(stub)
        assert check_invariant(nodes, RESERVE) == [], spec.job_id
        if i % 2:
            stub.ReleaseJob(spb.ReleaseJobRequest(job_id=specs[i - 1].job_id))
            assert check_invariant(list_nodes(stub), RESERVE) == []
    gang = describe(stub, "g1")
    assert len(gang.placements) in (0, 2)
    assert (gang.state == spb.JOB_STATE_RUNNING) == (len(gang.placements) == 2)
    assert core_violations(scheduler_service) == []


def test_submit_jobs_batch_gives_each_job_its_result(scheduler_stub) -> None:  # type: ignore[no-untyped-def]
    from guardmesh.v1 import scheduler_pb2 as spb

    from .conftest import node_pb

    scheduler_stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("b1", 2, 40960)))
    jobs = [
        spb.JobSpec(job_id="ok-1", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=20000),
        spb.JobSpec(job_id="bad", tenant="t", replicas=0, gpus_per_replica=1, memory_mib_per_gpu=1),
        spb.JobSpec(job_id="ok-2", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=20000),
        spb.JobSpec(job_id="ok-1", tenant="t", replicas=1, gpus_per_replica=2, memory_mib_per_gpu=1),
        spb.JobSpec(job_id="wait", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=20000),
    ]
    results = scheduler_stub.SubmitJobs(spb.SubmitJobsRequest(jobs=jobs)).results
    assert [r.WhichOneof("result") for r in results] == ["job", "error", "job", "error", "job"]
    assert results[1].error.code == 3 and results[1].error.message.startswith("job.replicas")
    assert results[3].error.code == 6  # ALREADY_EXISTS: same id, different spec
    assert results[0].job.state == results[2].job.state == spb.JOB_STATE_RUNNING
    assert results[4].job.state == spb.JOB_STATE_PENDING
    listed = {j.spec.job_id for j in scheduler_stub.ListJobs(spb.ListJobsRequest()).jobs}
    assert listed == {"ok-1", "ok-2", "wait"}
    for bad in ([], jobs[:1] * 1001):
        with pytest.raises(grpc.RpcError) as err:
            scheduler_stub.SubmitJobs(spb.SubmitJobsRequest(jobs=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "jobs" in err.value.details()
