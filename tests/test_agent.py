"""The node agent against a real scheduler: cluster-file registration and usage reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from guardmesh.agent import nvml_node
from guardmesh.runtime import RunningService
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

REPO = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-c", "from guardmesh.cli import app; app()", "agent"]


def test_agent_registers_cluster_file_nodes(
    tmp_path: Path, scheduler_service: RunningService, scheduler_stub: spb_grpc.SchedulerServiceStub
) -> None:
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        '[[nodes]]\nname = "dgx-1"\nmodel = "A100-80GB"\ngpus = 8\nmemory_mib = 81920\nnvlink_group_size = 4\n'
        'labels = { zone = "a" }\n'
        '[[nodes]]\nname = "t4-1"\ngpus = [{ index = 0, uuid = "GPU-t4-1-0", model = "T4", memory_mib = 15360 }]\n'
    )
    port = scheduler_service.port
    proc = subprocess.run(
        [*AGENT, "--cluster-file", str(cluster), "--once"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "GUARDMESH__SERVICES__SCHEDULER__PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    nodes = {n.spec.name: n for n in scheduler_stub.ListNodes(spb.ListNodesRequest()).nodes}
    assert set(nodes) == {"dgx-1", "t4-1"}
    dgx = nodes["dgx-1"]
    assert len(dgx.gpus) == 8 and dgx.spec.labels["zone"] == "a"
    assert {g.device.topology_group for g in dgx.gpus} == {"dgx-1/nvl0", "dgx-1/nvl1"}
    assert nodes["t4-1"].gpus[0].device.memory_mib == 15360
    # The report arrived: last_seen is set and usage is recorded as idle.
    assert dgx.last_seen.seconds > 0
    assert all(g.used_memory_mib == 0 for g in dgx.gpus)


def test_reported_leak_shrinks_allocatable_memory(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    node = spb.NodeSpec(name="n1", gpus=[spb.GpuDevice(index=0, uuid="GPU-n1-0", model="V100", memory_mib=16384)])
    scheduler_stub.RegisterNode(spb.RegisterNodeRequest(node=node))
    # A dead job leaked 10 GiB on the card: nothing asks for more than what is really free.
    scheduler_stub.ReportNodeStatus(
        spb.ReportNodeStatusRequest(node="n1", gpus=[spb.GpuUsage(uuid="GPU-n1-0", used_memory_mib=10240)])
    )
    listed = scheduler_stub.ListNodes(spb.ListNodesRequest()).nodes[0].gpus[0]
    assert listed.allocatable_mib == 16384 - 512 - 10240
    job = scheduler_stub.SubmitJob(
        spb.SubmitJobRequest(
            job=spb.JobSpec(job_id="big", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=8192)
        )
    ).job
    assert job.state == spb.JOB_STATE_PENDING
    assert "best candidate" in job.pending_reason or "no GPU qualifies" in job.pending_reason
    # The leak is cleaned up: the next report frees the room and the pending job is placed.
    scheduler_stub.ReportNodeStatus(
        spb.ReportNodeStatusRequest(node="n1", gpus=[spb.GpuUsage(uuid="GPU-n1-0", used_memory_mib=0)])
    )
    job = scheduler_stub.DescribeJob(spb.DescribeJobRequest(job_id="big")).job
    assert job.state == spb.JOB_STATE_RUNNING


def test_nvml_inventory_matches_the_driver() -> None:
    # Without a driver the agent must say so rather than invent GPUs; with one, it reports every card.
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert nvml_node("here") is None
        return
    count = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    found = nvml_node("here")
    if count == 0:
        assert found is None
    else:
        assert found is not None
        spec, usage = found
        assert len(spec.gpus) == count and len(usage) == count
        assert all(g.memory_mib > 0 and g.uuid.startswith("GPU-") for g in spec.gpus)
