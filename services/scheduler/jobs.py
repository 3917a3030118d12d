"""Jobs as the scheduler's core sees them: what is asked, where it runs, and its life cycle."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from guardmesh.errors import InvalidArgument

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_MEMORY_MIB = 1_048_576
MAX_REPLICAS = 4096
MAX_GPUS_PER_REPLICA = 64


class Qos(IntEnum):
    """QoS class; numbers match ``guardmesh.v1.QosClass``. Lower value = more important."""

    GUARANTEED = 1
    BURSTABLE = 2
    BEST_EFFORT = 3


class Topology(IntEnum):
    """Topology preference; numbers match ``guardmesh.v1.TopologyPreference``."""

    PREFERRED = 1
    REQUIRED = 2
    NONE = 3


class JobState(IntEnum):
    """Life-cycle state; numbers match ``guardmesh.v1.JobState``."""

    PENDING = 1
    RUNNING = 2
    PREEMPTING = 3
    PREEMPTED = 4
    RELEASED = 5
    LEASE_EXPIRED = 6


TERMINAL = frozenset({JobState.PREEMPTED, JobState.RELEASED, JobState.LEASE_EXPIRED})
HOLDS_ALLOCATION = frozenset({JobState.RUNNING, JobState.PREEMPTING})


class EventKind(IntEnum):
    """Scheduling event kinds; numbers match ``guardmesh.v1.EventKind``."""

    PENDING = 1
    PLACED = 2
    PREEMPTION_NOTICE = 3
    PREEMPTED = 4
    RELEASED = 5
    LEASE_EXPIRED = 6


@dataclass(frozen=True)
class JobSpec:
    """What a job asks for. Exactly one of ``memory_mib_per_gpu`` and ``share_milli`` is set."""

    job_id: str
    tenant: str
    replicas: int
    gpus_per_replica: int
    memory_mib_per_gpu: int | None = None
    share_milli: int | None = None
    qos: Qos = Qos.BURSTABLE
    priority: int = 0
    allow_sharing: bool = False
    allowed_models: tuple[str, ...] = ()
    gang: bool = False
    topology: Topology = Topology.PREFERRED
    node_selector: tuple[tuple[str, str], ...] = ()
    cpu_milli: int = 0
    host_memory_mib: int = 0
    lease_ttl_s: int = 0
    owner: str = ""

    def validate(self) -> None:
        """Check every field's rule; raise InvalidArgument naming the first field that breaks one."""
        if not JOB_ID_RE.match(self.job_id):
            raise InvalidArgument("job.job_id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
        if not 1 <= len(self.tenant) <= 128:
            raise InvalidArgument("job.tenant", "must be 1 to 128 characters")
        if len(self.owner) > 128:
            raise InvalidArgument("job.owner", "at most 128 characters")
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise InvalidArgument("job.replicas", f"must be 1 to {MAX_REPLICAS} (got {self.replicas})")
        if not 0 <= self.gpus_per_replica <= MAX_GPUS_PER_REPLICA:
            raise InvalidArgument(
                "job.gpus_per_replica",
                f"must be 0 (no GPU) to {MAX_GPUS_PER_REPLICA} (got {self.gpus_per_replica})",
            )
        if self.gpus_per_replica == 0:
            if self.memory_mib_per_gpu is not None or self.share_milli is not None:
                raise InvalidArgument("job.gpu_memory", "must be unset when gpus_per_replica = 0 (no GPU)")
            if self.cpu_milli == 0 and self.host_memory_mib == 0:
                raise InvalidArgument(
                    "job.cpu_milli_per_replica",
                    "a job with no GPU must ask for CPU or host memory (cpu_milli_per_replica or "
                    "host_memory_mib_per_replica > 0)",
                )
        elif (self.memory_mib_per_gpu is None) == (self.share_milli is None):
            raise InvalidArgument("job.gpu_memory", "set exactly one of memory_mib_per_gpu and gpu_share_milli")
        if self.memory_mib_per_gpu is not None and not 1 <= self.memory_mib_per_gpu <= MAX_MEMORY_MIB:
            raise InvalidArgument(
                "job.memory_mib_per_gpu", f"must be 1 to {MAX_MEMORY_MIB} MiB (got {self.memory_mib_per_gpu})"
            )
        if self.share_milli is not None:
            if not 1 <= self.share_milli <= 1000:
                raise InvalidArgument("job.gpu_share_milli", f"must be 1 to 1000 (got {self.share_milli})")
            if self.share_milli < 1000 and self.gpus_per_replica > 1:
                raise InvalidArgument(
                    "job.gpu_share_milli", "a share below 1000 is only valid with gpus_per_replica = 1"
                )
        if not -1000 <= self.priority <= 1000:
            raise InvalidArgument("job.priority", f"must be -1000 to 1000 (got {self.priority})")
        if not 0 <= self.cpu_milli <= 10_000_000:
            raise InvalidArgument("job.cpu_milli_per_replica", "must be 0 to 10,000,000")
        if not 0 <= self.host_memory_mib <= 67_108_864:
            raise InvalidArgument("job.host_memory_mib_per_replica", "must be 0 to 67,108,864 MiB")
        if not 0 <= self.lease_ttl_s <= 86_400:
            raise InvalidArgument("job.lease_ttl_s", "must be 0 (default) or 1 to 86,400 seconds")
        for model in self.allowed_models:
            if not 1 <= len(model) <= 64:
                raise InvalidArgument("job.allowed_models", "each model name must be 1 to 64 characters")
        for key, _ in self.node_selector:
            if not 1 <= len(key) <= 63:
                raise InvalidArgument("job.node_selector", "keys must be 1 to 63 characters")

    @property
    def total_gpus(self) -> int:
        """GPUs asked by all replicas together."""
        return self.replicas * self.gpus_per_replica

    def to_dict(self) -> dict[str, Any]:
        """Plain form for storage."""
        d = dict(self.__dict__)
        d["qos"] = int(self.qos)
        d["topology"] = int(self.topology)
        d["allowed_models"] = list(self.allowed_models)
        d["node_selector"] = [list(kv) for kv in self.node_selector]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["qos"] = Qos(d["qos"])
        d["topology"] = Topology(d["topology"])
        d["allowed_models"] = tuple(d["allowed_models"])
        d["node_selector"] = tuple((k, v) for k, v in d["node_selector"])
        return cls(**d)


@dataclass(frozen=True)
class GpuGrant:
    """One GPU given to a replica."""

    uuid: str
    index: int
    model: str
    memory_cap_mib: int
    memory_fraction: float
    topology_group: str


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where one replica runs."""

    replica: int
    node: str
    gpus: tuple[GpuGrant, ...]

    def env(self, shared: bool) -> dict[str, str]:
        """Settings the worker applies before CUDA initialises."""
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(g.uuid for g in self.gpus),
            "GUARDMESH_GPU_MEMORY_FRACTION": ",".join(f"{g.memory_fraction:.6f}" for g in self.gpus),
            "GUARDMESH_GPU_MEMORY_CAP_MIB": ",".join(str(g.memory_cap_mib) for g in self.gpus),
        }
        if shared:
            # Hard per-client memory limit when the card runs under CUDA MPS (ordinals of the visible list).
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
                f"{i}={g.memory_cap_mib}M" for i, g in enumerate(self.gpus)
            )
        return env

    def to_dict(self) -> dict[str, Any]:
        """Plain form for storage."""
        return {"replica": self.replica, "node": self.node, "gpus": [g.__dict__ for g in self.gpus]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicaPlacement:
        """Inverse of :meth:`to_dict`."""
        return cls(d["replica"], d["node"], tuple(GpuGrant(**g) for g in d["gpus"]))


@dataclass
class Job:
    """A job and its state. Mutated only under the scheduler's lock."""

    spec: JobSpec
    seq: int
    submitted_at: float
    state: JobState = JobState.PENDING
    placements: dict[int, ReplicaPlacement] = field(default_factory=dict)
    pending_reason: str = ""
    updated_at: float = 0.0
    preemption_deadline: float | None = None
    preempted_by: str = ""
    lease_ttl_s: int = 30
    lease_expiry: dict[int, float] = field(default_factory=dict)
    #: Victims this (guaranteed) job is waiting on after asking for preemption.
    awaiting_victims: set[str] = field(default_factory=set)

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.spec.job_id

    def queue_key(self) -> tuple[int, int, int]:
        """Order of the pending queue: QoS class, then priority (higher first), then submission."""
        return (int(self.spec.qos), -self.spec.priority, self.seq)
