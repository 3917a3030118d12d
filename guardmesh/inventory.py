"""Nodes and GPUs: their description, validation, and loaders for cluster files and the Alibaba trace."""

from __future__ import annotations

import csv
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardmesh.errors import InvalidArgument

NODE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
MAX_GPU_MEMORY_MIB = 1_048_576

#: Card memory of the Alibaba 2023 trace's models. G1-G3 are undisclosed internal codes; we assume
#: G1 = 16 GiB, G2 = 24 GiB and G3 = 32 GiB (stated wherever results on the trace are reported).
ALIBABA_MODEL_MEMORY_MIB = {
    "V100M32": 32 * 1024,
    "V100M16": 16 * 1024,
    "T4": 16 * 1024,
    "P100": 16 * 1024,
    "A10": 24 * 1024,
    "G1": 16 * 1024,
    "G2": 24 * 1024,
    "G3": 32 * 1024,
}


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as registered."""

    index: int
    uuid: str
    model: str
    memory_mib: int
    topology_group: str = ""


@dataclass(frozen=True)
class NodeSpec:
    """A node's static description."""

    name: str
    gpus: tuple[GpuDevice, ...]
    labels: tuple[tuple[str, str], ...] = ()
    cpu_milli: int = 0
    host_memory_mib: int = 0

    def validate(self) -> None:
        """Check the node's rules; raise InvalidArgument naming the field."""
        if not NODE_NAME_RE.match(self.name):
            raise InvalidArgument("node.name", "must be 1 to 253 characters of [A-Za-z0-9._-]")
        if not 1 <= len(self.gpus) <= 64:
            raise InvalidArgument("node.gpus", f"must list 1 to 64 GPUs (got {len(self.gpus)})")
        if self.cpu_milli < 0:
            raise InvalidArgument("node.cpu_milli", "must be >= 0")
        if self.host_memory_mib < 0:
            raise InvalidArgument("node.host_memory_mib", "must be >= 0")
        seen_idx: set[int] = set()
        seen_uuid: set[str] = set()
        for i, gpu in enumerate(self.gpus):
            where = f"node.gpus[{i}]"
            if not 0 <= gpu.index <= 63:
                raise InvalidArgument(f"{where}.index", "must be 0 to 63")
            if gpu.index in seen_idx:
                raise InvalidArgument(f"{where}.index", f"duplicate index {gpu.index} on the node")
            if not 1 <= len(gpu.uuid) <= 128:
                raise InvalidArgument(f"{where}.uuid", "must be 1 to 128 characters")
            if gpu.uuid in seen_uuid:
                raise InvalidArgument(f"{where}.uuid", f"duplicate uuid {gpu.uuid!r}")
            if not 1 <= len(gpu.model) <= 64:
                raise InvalidArgument(f"{where}.model", "must be 1 to 64 characters")
            if not 1 <= gpu.memory_mib <= MAX_GPU_MEMORY_MIB:
                raise InvalidArgument(
                    f"{where}.memory_mib", f"must be 1 to {MAX_GPU_MEMORY_MIB} MiB (got {gpu.memory_mib})"
                )
            seen_idx.add(gpu.index)
            seen_uuid.add(gpu.uuid)
        for key, value in self.labels:
            if not 1 <= len(key) <= 63 or len(value) > 256:
                raise InvalidArgument("node.labels", "keys must be 1 to 63 characters, values at most 256")

    def to_dict(self) -> dict[str, Any]:
        """Plain form for storage."""
        return {
            "name": self.name,
            "gpus": [g.__dict__ for g in self.gpus],
            "labels": [list(kv) for kv in self.labels],
            "cpu_milli": self.cpu_milli,
            "host_memory_mib": self.host_memory_mib,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=d["name"],
            gpus=tuple(GpuDevice(**g) for g in d["gpus"]),
            labels=tuple((k, v) for k, v in d.get("labels", [])),
            cpu_milli=int(d.get("cpu_milli", 0)),
            host_memory_mib=int(d.get("host_memory_mib", 0)),
        )


def uniform_node(
    name: str,
    model: str,
    gpus: int,
    memory_mib: int,
    *,
    group_size: int = 0,
    cpu_milli: int = 0,
    host_memory_mib: int = 0,
    labels: dict[str, str] | None = None,
) -> NodeSpec:
    """A node of ``gpus`` identical cards; ``group_size`` > 0 splits them into topology groups."""
    devices = tuple(
        GpuDevice(
            index=i,
            uuid=f"GPU-{name}-{i}",
            model=model,
            memory_mib=memory_mib,
            topology_group=f"{name}/nvl{i // group_size}" if group_size else "",
        )
        for i in range(gpus)
    )
    return NodeSpec(name, devices, tuple(sorted((labels or {}).items())), cpu_milli, host_memory_mib)


def load_cluster_file(path: str | Path) -> list[NodeSpec]:
    """Read a cluster description (TOML).

    Either explicit GPUs or a uniform shorthand per node::

        [[nodes]]
        name = "node-1"
        model = "A100-80GB"       # shorthand: count x model x memory, optional NVLink group size
        gpus = 8
        memory_mib = 81920
        nvlink_group_size = 4
        labels = { zone = "a" }

        [[nodes]]
        name = "node-2"
        gpus = [{ index = 0, uuid = "GPU-...", model = "T4", memory_mib = 16384 }]
    """
    with Path(path).open("rb") as fh:
        data = tomllib.load(fh)
    nodes = []
    for i, raw in enumerate(data.get("nodes", [])):
        where = f"{path}: nodes[{i}]"
        try:
            if isinstance(raw.get("gpus"), list):
                node = NodeSpec(
                    name=raw["name"],
                    gpus=tuple(GpuDevice(**g) for g in raw["gpus"]),
                    labels=tuple(sorted(raw.get("labels", {}).items())),
                    cpu_milli=int(raw.get("cpu_milli", 0)),
                    host_memory_mib=int(raw.get("host_memory_mib", 0)),
                )
            else:
                node = uniform_node(
                    raw["name"],
                    raw["model"],
                    int(raw["gpus"]),
                    int(raw["memory_mib"]),
                    group_size=int(raw.get("nvlink_group_size", 0)),
                    cpu_milli=int(raw.get("cpu_milli", 0)),
                    host_memory_mib=int(raw.get("host_memory_mib", 0)),
                    labels=raw.get("labels"),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(where, f"malformed node entry ({exc})") from None
        node.validate()
        nodes.append(node)
    return nodes


def load_alibaba_nodes(path: str | Path) -> list[NodeSpec]:
    """Nodes of the Alibaba 2023 trace's node list (GPU nodes only), with assumed card memory."""
    nodes = []
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            count = int(row["gpu"])
            if count <= 0:
                continue
            model = row["model"]
            nodes.append(
                uniform_node(
                    row["sn"],
                    model,
                    count,
                    ALIBABA_MODEL_MEMORY_MIB[model],
                    cpu_milli=int(row["cpu_milli"]),
                    host_memory_mib=int(row["memory_mib"]),
                )
            )
    return nodes


@dataclass(frozen=True)
class TraceTask:
    """One task of the Alibaba trace."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...]
    qos: str
    creation_time: int
    deletion_time: int


#: Columns every pod list has; the others (gpu_spec, qos, times) are optional and default to empty or 0.
TRACE_REQUIRED_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli")


def load_alibaba_pods(path: str | Path) -> list[TraceTask]:
    """Tasks of the trace's pod list, in creation order.

    Published variants differ in their optional columns (some have no ``gpu_spec``): a missing optional
    column reads as empty (any GPU model, no QoS, time 0); a missing required column is InvalidArgument.
    """
    out = []
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in TRACE_REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InvalidArgument(f"{path}", f"pod list lacks required column(s) {', '.join(missing)}")
        for row in reader:
            out.append(
                TraceTask(
                    name=row["name"],
                    cpu_milli=int(row["cpu_milli"] or 0),
                    memory_mib=int(row["memory_mib"] or 0),
                    num_gpu=int(row["num_gpu"] or 0),
                    gpu_milli=int(row["gpu_milli"] or 0),
                    gpu_spec=tuple(s for s in (row.get("gpu_spec") or "").split("|") if s),
                    qos=row.get("qos") or "",
                    creation_time=int(row.get("creation_time") or 0),
                    deletion_time=int(row.get("deletion_time") or 0),
                )
            )
    return out
