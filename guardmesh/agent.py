"""Node agent: registers a node's GPUs with the scheduler and reports their memory use and utilisation.

On a machine with NVIDIA GPUs the inventory and usage come from NVML (``nvidia-ml-py``); NVLink peers
form topology groups. Without GPUs, a cluster description file supplies the nodes (for development and
trace replay) and usage reports carry what NVML would have said of idle cards.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig
from guardmesh.inventory import GpuDevice, NodeSpec, load_cluster_file
from guardmesh.v1 import scheduler_pb2 as pb
from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MIB = 1024 * 1024


def node_spec_to_pb(spec: NodeSpec) -> pb.NodeSpec:
    """Message form of a node's description (what the agent registers and the scheduler lists)."""
    return pb.NodeSpec(
        name=spec.name,
        labels=dict(spec.labels),
        cpu_milli=spec.cpu_milli,
        host_memory_mib=spec.host_memory_mib,
        gpus=[
            pb.GpuDevice(
                index=g.index, uuid=g.uuid, model=g.model, memory_mib=g.memory_mib, topology_group=g.topology_group
            )
            for g in spec.gpus
        ],
    )


def nvml_node(name: str) -> tuple[NodeSpec, list[tuple[str, int, float]]] | None:
    """This machine's GPUs and their usage through NVML, or None if NVML or GPUs are absent."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [pynvml.nvmlDeviceGetUUID(h) for h in handles]
        groups = _nvlink_groups(pynvml, handles, uuids)
        gpus, usage = [], []
        for i, h in enumerate(handles):
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            model = pynvml.nvmlDeviceGetName(h)
            gpus.append(GpuDevice(i, uuids[i], str(model), int(mem.total // MIB), groups[i]))
            usage.append((uuids[i], int(mem.used // MIB), util.gpu / 100.0))
        return NodeSpec(name, tuple(gpus)), usage
    finally:
        pynvml.nvmlShutdown()


def _nvlink_groups(pynvml: object, handles: list[object], uuids: list[str]) -> list[str]:
    """Connected components of the NVLink graph, named after their smallest GPU index."""
    parent = list(range(len(handles)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pci_to_index = {}
    for i, h in enumerate(handles):
        try:
            pci_to_index[pynvml.nvmlDeviceGetPciInfo(h).busId] = i  # type: ignore[attr-defined]
        except Exception:
            continue
    for i, h in enumerate(handles):
        for link in range(18):
            try:
                if not pynvml.nvmlDeviceGetNvLinkState(h, link):  # type: ignore[attr-defined]
                    continue
                peer = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId  # type: ignore[attr-defined]
            except Exception:
                break
            j = pci_to_index.get(peer)
            if j is not None:
                parent[find(i)] = find(j)
    return [
        f"nvlink{find(i)}" if any(find(k) == find(i) for k in range(len(handles)) if k != i) else ""
        for i in range(len(handles))
    ]


def run_agent(
    config: MeshConfig,
    *,
    node: str | None = None,
    cluster_file: Path | None = None,
    interval: float = 5.0,
    once: bool = False,
) -> None:
    """Register and keep reporting until interrupted (or once)."""
    channel = open_channel("scheduler", config)
    stub = pb_grpc.SchedulerServiceStub(channel)
    name = node or socket.gethostname()
    if cluster_file is not None:
        nodes = load_cluster_file(cluster_file)
        found = None
    else:
        found = nvml_node(name)
        if found is None:
            raise SystemExit("no NVIDIA GPU visible through NVML; pass --cluster-file to describe nodes")
        nodes = [found[0]]

    for spec in nodes:
        stub.RegisterNode(pb.RegisterNodeRequest(node=node_spec_to_pb(spec)))
        log.info("registered node", extra={"node": spec.name, "gpus": len(spec.gpus)})
    while True:
        for spec in nodes:
            usage = nvml_node(spec.name)[1] if found is not None else [(g.uuid, 0, 0.0) for g in spec.gpus]  # type: ignore[index]
            stub.ReportNodeStatus(
                pb.ReportNodeStatusRequest(
                    node=spec.name,
                    gpus=[pb.GpuUsage(uuid=u, used_memory_mib=m, utilization=x) for u, m, x in usage],
                )
            )
        if once:
            break
        time.sleep(interval)
    channel.close()
