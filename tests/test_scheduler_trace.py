"""Trace input and jobs with no GPU (issue 17 item 2): loader variants, CPU-only placement and stranding."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from guardmesh.errors import InvalidArgument
from guardmesh.inventory import load_alibaba_pods, uniform_node
from guardmesh.v1 import scheduler_pb2 as spb
from services.scheduler.jobs import JobSpec, JobState
from services.scheduler.store import Store
from tests.test_scheduler_core import make_sched, spec
from tests.test_scheduler_grpc import custom_scheduler, describe, submit

FULL_HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time"


def test_pod_list_without_optional_columns_loads(tmp_path: Path) -> None:
    """Some published variants have no gpu_spec (nor qos, times): they read as any model, no QoS, time 0."""
    path = tmp_path / "pods.csv"
    path.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,8000,16384,1,500\np1,4000,8192,0,0\n")
    tasks = load_alibaba_pods(path)
    assert [(t.name, t.num_gpu, t.gpu_milli, t.gpu_spec, t.qos, t.creation_time) for t in tasks] == [
        ("p0", 1, 500, (), "", 0),
        ("p1", 0, 0, (), "", 0),
    ]
    full = tmp_path / "full.csv"
    full.write_text(FULL_HEADER + "\np0,8000,16384,1,500,V100M16|T4,LS,Running,5,9\n")
    assert load_alibaba_pods(full)[0].gpu_spec == ("V100M16", "T4")


def test_pod_list_without_a_required_column_names_it(tmp_path: Path) -> None:
    path = tmp_path / "pods.csv"
    path.write_text("name,cpu_milli,memory_mib,gpu_milli\np0,8000,16384,500\n")
    with pytest.raises(InvalidArgument, match="num_gpu"):
        load_alibaba_pods(path)


def cpu_job(job_id: str, cpu: int, mem: int = 0, **kw: object) -> JobSpec:
    return JobSpec(job_id=job_id, tenant="t", replicas=1, gpus_per_replica=0, cpu_milli=cpu, host_memory_mib=mem, **kw)  # type: ignore[arg-type]


def test_cpu_only_job_is_placed_by_cpu_and_strands_the_gpus_of_its_node(tmp_path: Path) -> None:
    nodes = [
        uniform_node("node-a", "A", 2, 16000, cpu_milli=8000, host_memory_mib=65536),
        uniform_node("node-b", "A", 2, 16000, cpu_milli=8000, host_memory_mib=65536),
    ]
    sched, _ = make_sched(nodes, store=Store(tmp_path / "s.db"), policy="best-fit")
    first = sched.submit(cpu_job("cpu-1", 6000, 4096))
    assert first.state == JobState.RUNNING
    assert first.placements[0].gpus == ()
    node = first.placements[0].node
    # Best fit packs the second CPU job beside the first when it fits there.
    assert sched.submit(cpu_job("cpu-2", 2000)).placements[0].node == node
    # That node's CPU is gone: its idle GPUs are stranded, a GPU job needing CPU goes to the other node.
    gpu = sched.submit(spec("gpu", cpu_milli=1000))
    assert gpu.placements[0].node != node
    assert sched.submit(cpu_job("cpu-3", 8000)).state == JobState.PENDING
    sched.release("cpu-1")
    assert sched.describe("cpu-3").state == JobState.PENDING  # 2000 still held by cpu-2
    sched.release("cpu-2")
    assert sched.describe("cpu-3").state == JobState.RUNNING
    assert sched.describe("cpu-3").placements[0].node == node
    sched.close()
    # Restart: the CPU-only job's charge is restored with it.
    again, _ = make_sched([], store=Store(tmp_path / "s.db"))
    assert again.submit(cpu_job("cpu-4", 1000)).placements[0].node != node
    again.close()


@pytest.mark.parametrize("policy", ["first-fit", "best-fit", "fgd"])
def test_every_policy_places_cpu_only_jobs_within_node_cpu(policy: str) -> None:
    nodes = [uniform_node(f"n{i}", "A", 2, 16000, cpu_milli=4000, host_memory_mib=8192) for i in range(3)]
    sched, _ = make_sched(nodes, policy=policy)
    for i in range(6):
        sched.submit(spec(f"g{i}", share=500, allow_sharing=True, cpu_milli=500))
    for i in range(12):
        sched.submit(cpu_job(f"c{i}", 600, 512))
    state = sched.state
    assert (state.node_cpu_used <= state.node_cpu).all()
    assert (state.node_mem_used <= state.node_mem).all()
    running = sum(1 for j in sched.list_jobs() if j.state == JobState.RUNNING and j.job_id.startswith("c"))
    assert running == 12  # 9,000 milli free in multiples of 500 per node: room for at least 12 x 600


def test_cpu_only_job_over_grpc_and_its_rules(tmp_path: Path) -> None:
    with custom_scheduler(tmp_path) as stub:
        node = spb.NodeSpec(
            name="gpu-1",
            cpu_milli=16000,
            host_memory_mib=65536,
            gpus=[spb.GpuDevice(index=0, uuid="GPU-1", model="A100-80GB", memory_mib=81920)],
        )
        stub.RegisterNode(spb.RegisterNodeRequest(node=node))
        job = submit(
            stub,
            spb.JobSpec(
                job_id="etl",
                tenant="t",
                replicas=1,
                gpus_per_replica=0,
                cpu_milli_per_replica=4000,
                host_memory_mib_per_replica=8192,
            ),
        )
        assert job.state == spb.JOB_STATE_RUNNING
        assert job.placements[0].node == "gpu-1" and not job.placements[0].gpus
        # The echoed spec has no GPU memory either, so a client can resubmit it as it is.
        assert job.spec.WhichOneof("gpu_memory") is None
        assert submit(stub, job.spec).state == spb.JOB_STATE_RUNNING
        cases = [
            (
                spb.JobSpec(
                    job_id="x",
                    tenant="t",
                    replicas=1,
                    gpus_per_replica=0,
                    gpu_share_milli=1000,
                    cpu_milli_per_replica=1,
                ),
                "job.gpu_memory",
            ),
            (spb.JobSpec(job_id="y", tenant="t", replicas=1, gpus_per_replica=0), "job.cpu_milli_per_replica"),
            (
                spb.JobSpec(job_id="z", tenant="t", replicas=1, gpus_per_replica=0, cpu_milli_per_replica=99_000),
                "job.cpu_milli_per_replica",
            ),
        ]
        for msg, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                submit(stub, msg)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (err.value.details() or "")
        assert describe(stub, "etl").state == spb.JOB_STATE_RUNNING
