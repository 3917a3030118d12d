"""Trainer-side client of the scheduler: submit, wait for a placement, hold the lease, release.

A worker in a few lines::

    from guardmesh.sdk import SchedulerClient

    with SchedulerClient() as scheduler:
        with scheduler.acquire("resnet-42", memory_mib=30_000, gpus=2, qos="guaranteed") as lease:
            lease.placement.apply_env()           # CUDA_VISIBLE_DEVICES, memory caps: before CUDA starts
            while not lease.should_stop():        # True on a preemption notice; raises if the lease is lost
                train_one_step()
        # leaving the block stops the renewals and releases the job

Every call goes through :func:`guardmesh.client.open_channel` (discovery, default deadline, retries on
UNAVAILABLE, tracing, TLS and the role token). Server errors reach the caller as :class:`grpc.RpcError`
with the status code the proto documents; errors of the background renewals are kept on the
:class:`Lease` and raised by :meth:`Lease.check`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from types import TracebackType
from typing import Literal, TypedDict, Unpack

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.v1 import scheduler_pb2 as pb
from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Status codes a renewal treats as passing trouble (retried until the lease would lapse).
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

QosName = Literal["guaranteed", "burstable", "best-effort", "best_effort"]
TopologyName = Literal["preferred", "required", "none"]

_QOS = {
    "guaranteed": pb.QOS_CLASS_GUARANTEED,
    "burstable": pb.QOS_CLASS_BURSTABLE,
    "best-effort": pb.QOS_CLASS_BEST_EFFORT,
    "best_effort": pb.QOS_CLASS_BEST_EFFORT,
}
_TOPOLOGY = {
    "preferred": pb.TOPOLOGY_PREFERENCE_PREFERRED,
    "required": pb.TOPOLOGY_PREFERENCE_REQUIRED,
    "none": pb.TOPOLOGY_PREFERENCE_NONE,
}


class JobState(IntEnum):
    """Life-cycle state of a job; values equal ``guardmesh.v1.JobState``."""

    PENDING = pb.JOB_STATE_PENDING
    RUNNING = pb.JOB_STATE_RUNNING
    PREEMPTING = pb.JOB_STATE_PREEMPTING
    PREEMPTED = pb.JOB_STATE_PREEMPTED
    RELEASED = pb.JOB_STATE_RELEASED
    LEASE_EXPIRED = pb.JOB_STATE_LEASE_EXPIRED

    @property
    def terminal(self) -> bool:
        """True for PREEMPTED, RELEASED and LEASE_EXPIRED: the job will never run again."""
        return self in (JobState.PREEMPTED, JobState.RELEASED, JobState.LEASE_EXPIRED)

    @property
    def placed(self) -> bool:
        """True while the job holds allocations (RUNNING or PREEMPTING)."""
        return self in (JobState.RUNNING, JobState.PREEMPTING)


class EventKind(IntEnum):
    """Kind of a scheduling event; values equal ``guardmesh.v1.EventKind``."""

    PENDING = pb.EVENT_KIND_PENDING
    PLACED = pb.EVENT_KIND_PLACED
    PREEMPTION_NOTICE = pb.EVENT_KIND_PREEMPTION_NOTICE
    PREEMPTED = pb.EVENT_KIND_PREEMPTED
    RELEASED = pb.EVENT_KIND_RELEASED
    LEASE_EXPIRED = pb.EVENT_KIND_LEASE_EXPIRED


def _time(msg: pb.Job | pb.ReplicaPlacement | pb.RenewLeaseResponse | pb.Event, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class GpuAssignment:
    """One GPU given to a replica, with the memory cap its process must stay under."""

    uuid: str
    index: int
    model: str
    memory_cap_mib: int
    #: ``memory_cap_mib`` / the card's memory, for ``torch.cuda.set_per_process_memory_fraction``.
    memory_fraction: float
    topology_group: str


@dataclass(frozen=True)
class Placement:
    """Where one replica runs and the environment its worker must apply before CUDA initialises."""

    replica: int
    node: str
    gpus: list[GpuAssignment]
    env: dict[str, str]
    lease_expires_at: datetime | None

    @classmethod
    def from_pb(cls, msg: pb.ReplicaPlacement) -> Placement:
        """Convert a ``ReplicaPlacement`` message."""
        return cls(
            replica=msg.replica,
            node=msg.node,
            gpus=[
                GpuAssignment(g.uuid, g.index, g.model, g.memory_cap_mib, g.memory_fraction, g.topology_group)
                for g in msg.gpus
            ],
            env=dict(msg.env),
            lease_expires_at=_time(msg, "lease_expires_at"),
        )

    @property
    def gpu_uuids(self) -> list[str]:
        """GPU UUIDs in ``CUDA_VISIBLE_DEVICES`` order."""
        return [g.uuid for g in self.gpus]

    @property
    def memory_caps_mib(self) -> list[int]:
        """Memory cap of each GPU, MiB, in ``CUDA_VISIBLE_DEVICES`` order."""
        return [g.memory_cap_mib for g in self.gpus]

    def apply_env(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Set the placement's environment (``os.environ`` by default); call it before CUDA initialises."""
        target = os.environ if environ is None else environ
        target.update(self.env)

    def apply_memory_limits(self) -> int:
        """Cap PyTorch's allocator on each visible GPU at its share; returns the devices capped (0 on CPU).

        Call it after :meth:`apply_env` in the worker process; it initialises CUDA.
        """
        import torch

        if not torch.cuda.is_available():
            return 0
        count = min(len(self.gpus), torch.cuda.device_count())
        for i in range(count):
            torch.cuda.set_per_process_memory_fraction(self.gpus[i].memory_fraction, i)
        return count


@dataclass(frozen=True)
class Job:
    """A job with its state and placements, as the scheduler last reported it."""

    job_id: str
    tenant: str
    state: JobState
    placements: list[Placement]
    #: Why the job is pending, in words a person can act on; empty otherwise.
    pending_reason: str
    #: Lease TTL in effect, seconds.
    lease_ttl_s: int
    preemption_deadline: datetime | None
    preempted_by: str
    submitted_at: datetime | None
    updated_at: datetime | None
    #: The spec as the scheduler stored it.
    spec: pb.JobSpec = field(repr=False)

    @classmethod
    def from_pb(cls, msg: pb.Job) -> Job:
        """Convert a ``Job`` message."""
        return cls(
            job_id=msg.spec.job_id,
            tenant=msg.spec.tenant,
            state=JobState(msg.state),
            placements=[Placement.from_pb(p) for p in msg.placements],
            pending_reason=msg.pending_reason,
            lease_ttl_s=msg.lease_ttl_s,
            preemption_deadline=_time(msg, "preemption_deadline"),
            preempted_by=msg.preempted_by,
            submitted_at=_time(msg, "submitted_at"),
            updated_at=_time(msg, "updated_at"),
            spec=msg.spec,
        )

    def placement(self, replica: int = 0) -> Placement:
        """Placement of ``replica``; KeyError if that replica is not placed."""
        for p in self.placements:
            if p.replica == replica:
                return p
        raise KeyError(f"job {self.job_id!r}: replica {replica} is not placed (state {self.state.name})")


@dataclass(frozen=True)
class JobEvent:
    """One message of :meth:`SchedulerClient.watch`: an event and the job after it.

    The first message is the snapshot: ``kind`` is None and ``seq`` is 0.
    """

    kind: EventKind | None
    seq: int
    message: str
    at: datetime | None
    job: Job


@dataclass(frozen=True)
class Renewal:
    """Answer of one lease renewal."""

    expires_at: datetime | None
    #: PREEMPTING tells the worker to checkpoint and exit before ``preemption_deadline``.
    state: JobState
    preemption_deadline: datetime | None


class JobOptions(TypedDict, total=False):
    """Keyword arguments that describe a job (see ``JobSpec`` in ``scheduler.proto``)."""

    #: Tenant owning the job (default "default").
    tenant: str
    #: GPUs per replica (default 1); all of a replica's GPUs are on one node.
    gpus: int
    #: Number of replicas (default 1).
    replicas: int
    #: Memory per GPU in MiB. Give this or ``gpu_share``.
    memory_mib: int
    #: Share of each card in (0, 1] (0.25 = a quarter of its memory); only with ``gpus=1`` below 1.
    gpu_share: float
    #: Allow other sharing jobs on the same cards (``JobSpec.allow_sharing``).
    allow_sharing: bool
    #: Place every replica at once or none.
    gang: bool
    #: "guaranteed", "burstable" (default) or "best-effort".
    qos: QosName
    #: Priority within the QoS class, -1,000 to 1,000.
    priority: int
    #: GPU models the job may run on; empty: any.
    models: Sequence[str]
    #: "preferred" (default), "required" or "none".
    topology: TopologyName
    #: Node labels the job requires.
    node_selector: Mapping[str, str]
    #: CPU per replica in thousandths of a core.
    cpu_milli: int
    #: Host memory per replica, MiB.
    host_memory_mib: int
    #: Lease TTL in seconds; 0: the scheduler's default.
    lease_ttl_s: int
    #: Principal that may renew and release the job (with authorization on, a trainer's own name).
    owner: str


def job_spec(job_id: str, **options: Unpack[JobOptions]) -> pb.JobSpec:
    """Build a ``JobSpec`` from keyword arguments; ValueError if both memory forms are given.

    Giving neither ``memory_mib`` nor ``gpu_share`` is left to the scheduler to refuse
    (INVALID_ARGUMENT), as is every other range check.
    """
    unknown = sorted(set(options) - JobOptions.__optional_keys__)
    if unknown:  # a misspelt option would otherwise be dropped silently
        raise TypeError(
            f"job_spec: unknown option(s) {', '.join(unknown)} (known: {sorted(JobOptions.__optional_keys__)})"
        )
    if "memory_mib" in options and "gpu_share" in options:
        raise ValueError("give memory_mib or gpu_share, not both")
    qos = str(options.get("qos", "burstable")).lower()
    topology = str(options.get("topology", "preferred")).lower()
    if qos not in _QOS:
        raise ValueError(f"qos: {qos!r} is not one of {sorted(_QOS)}")
    if topology not in _TOPOLOGY:
        raise ValueError(f"topology: {topology!r} is not one of {sorted(_TOPOLOGY)}")
    spec = pb.JobSpec(
        job_id=job_id,
        tenant=options.get("tenant", "default"),
        qos=_QOS[qos],
        priority=options.get("priority", 0),
        replicas=options.get("replicas", 1),
        gpus_per_replica=options.get("gpus", 1),
        allow_sharing=options.get("allow_sharing", False),
        allowed_models=list(options.get("models", ())),
        gang=options.get("gang", False),
        topology=_TOPOLOGY[topology],
        node_selector=dict(options.get("node_selector", {})),
        cpu_milli_per_replica=options.get("cpu_milli", 0),
        host_memory_mib_per_replica=options.get("host_memory_mib", 0),
        lease_ttl_s=options.get("lease_ttl_s", 0),
        owner=options.get("owner", ""),
    )
    if "memory_mib" in options:
        spec.memory_mib_per_gpu = int(options["memory_mib"])
    elif "gpu_share" in options:
        spec.gpu_share_milli = round(float(options["gpu_share"]) * 1000)
    return spec


class PlacementTimeout(TimeoutError):
    """The job was still pending when the wait ended; ``job.pending_reason`` says why."""

    def __init__(self, job: Job | None, timeout: float) -> None:
        reason = job.pending_reason if job is not None else "no answer yet"
        super().__init__(f"not placed within {timeout:g}s: {reason}")
        self.job = job


class JobEnded(RuntimeError):
    """The job reached a terminal state (released, preempted, lease expired) instead of being placed."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.job_id!r} ended as {job.state.name} before it was placed")
        self.job = job


class SchedulerClient:
    """Submit jobs, wait for placements, renew leases and release jobs.

    ``config`` defaults to :func:`guardmesh.config.load_config`; ``address`` (``host:port``) bypasses
    discovery. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, config: MeshConfig | None = None, *, address: str | None = None) -> None:
        self.config = config or load_config()
        self.channel = open_channel("scheduler", self.config, address=address)
        #: The raw stub, for the RPCs this client does not wrap (nodes, events, capacity planning).
        self.stub = pb_grpc.SchedulerServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> SchedulerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- jobs ------------------------------------------------------------------------------------------

    def submit(self, job_id: str, **options: Unpack[JobOptions]) -> Job:
        """Submit a job (see :class:`JobOptions`); RUNNING with placements or PENDING with a reason.

        Idempotent: the same spec under the same id returns the current job (ALREADY_EXISTS for another).
        """
        return self.submit_spec(job_spec(job_id, **options))

    def submit_spec(self, spec: pb.JobSpec) -> Job:
        """Submit a ready-made ``JobSpec``."""
        return Job.from_pb(self.stub.SubmitJob(pb.SubmitJobRequest(job=spec)).job)

    def describe(self, job_id: str) -> Job:
        """One job's state, placements and lease TTL (NOT_FOUND for an unknown id)."""
        return Job.from_pb(self.stub.DescribeJob(pb.DescribeJobRequest(job_id=job_id)).job)

    def release(self, job_id: str) -> Job:
        """Release a job's allocations (or withdraw it while pending); a no-op on an ended job."""
        return Job.from_pb(self.stub.ReleaseJob(pb.ReleaseJobRequest(job_id=job_id)).job)

    def list_jobs(self, tenant: str = "", state: JobState | None = None) -> list[Job]:
        """Jobs in submission order, optionally of one tenant and in one state."""
        request = pb.ListJobsRequest(tenant=tenant, state=int(state) if state is not None else 0)  # type: ignore[arg-type]
        return [Job.from_pb(j) for j in self.stub.ListJobs(request).jobs]

    def register_node(self, node: pb.NodeSpec) -> None:
        """Register (or re-register) a node and its GPUs, e.g. a simulated inventory (INVALID_ARGUMENT names
        the field a malformed spec breaks)."""
        self.stub.RegisterNode(pb.RegisterNodeRequest(node=node))

    def list_nodes(self) -> list[pb.NodeStatus]:
        """Every node, by name, with each GPU's allocations and allocatable memory (``NodeStatus`` messages)."""
        return list(self.stub.ListNodes(pb.ListNodesRequest()).nodes)

    def renew(self, job_id: str, replica: int = 0) -> Renewal:
        """Renew one replica's lease once (FAILED_PRECONDITION once the job holds no allocation)."""
        resp = self.stub.RenewLease(pb.RenewLeaseRequest(job_id=job_id, replica=replica))
        return Renewal(_time(resp, "lease_expires_at"), JobState(resp.state), _time(resp, "preemption_deadline"))

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobEvent]:
        """Stream a job's snapshot, then its events, until it ends (or ``timeout``: DEADLINE_EXCEEDED).

        The channel's default deadline (``client.deadline_s``) also bounds the stream; use
        :meth:`wait_until_placed` to wait longer than that.
        """
        call = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)
        try:
            for msg in call:
                job = Job.from_pb(msg.job)
                if msg.HasField("event"):
                    ev = msg.event
                    yield JobEvent(EventKind(ev.kind), ev.seq, ev.message, _time(ev, "at"), job)
                else:
                    yield JobEvent(None, 0, "", None, job)
        finally:
            # A plain call has cancel(); through the tracing interceptor the stream is a generator, whose
            # close() drops the call (cancelled when collected).
            stop = getattr(call, "cancel", None) or getattr(call, "close", None)
            if stop is not None:
                stop()

    def wait_until_placed(self, job_id: str, timeout: float = 60.0) -> Job:
        """Block until the job holds allocations (RUNNING or PREEMPTING) and return it.

        Raises :class:`PlacementTimeout` if it is still pending after ``timeout`` seconds and
        :class:`JobEnded` if it ends first (withdrawn, preempted). Watches with WatchJob, re-opening the
        stream within the channel's default deadline.
        """
        deadline = time.monotonic() + timeout
        last: Job | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PlacementTimeout(last, timeout)
            try:
                for update in self.watch(job_id, timeout=min(remaining, self.config.client.deadline_s)):
                    last = update.job
                    if last.state.placed:
                        return last
                    if last.state.terminal:
                        raise JobEnded(last)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                continue
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))  # the stream ended (a draining server)

    # -- leases ----------------------------------------------------------------------------------------

    def lease(
        self,
        job: Job | str,
        *,
        replicas: Sequence[int] | None = None,
        renew_fraction: float = 1 / 3,
        release_on_exit: bool = True,
        on_preemption: Callable[[Lease], None] | None = None,
        on_lost: Callable[[Lease], None] | None = None,
    ) -> Lease:
        """A :class:`Lease` over a placed job (not started: enter it, or call :meth:`Lease.start`).

        ``replicas`` defaults to every placed replica; ValueError when the job holds no allocation.
        """
        placed = job if isinstance(job, Job) else self.describe(job)
        return Lease(
            self,
            placed,
            replicas=replicas,
            renew_fraction=renew_fraction,
            release_on_exit=release_on_exit,
            on_preemption=on_preemption,
            on_lost=on_lost,
        )

    def acquire(
        self,
        job_id: str,
        *,
        wait_s: float = 60.0,
        renew_fraction: float = 1 / 3,
        on_preemption: Callable[[Lease], None] | None = None,
        on_lost: Callable[[Lease], None] | None = None,
        **options: Unpack[JobOptions],
    ) -> Lease:
        """Submit, wait up to ``wait_s`` for the placement and return the started :class:`Lease`.

        If the job is not placed in time it is withdrawn (released) and :class:`PlacementTimeout` is
        raised. Use the lease as a context manager so the job is released when the block ends.
        """
        self.submit(job_id, **options)
        try:
            job = self.wait_until_placed(job_id, timeout=wait_s)
        except BaseException:
            try:
                self.release(job_id)
            except grpc.RpcError:
                log.warning("could not withdraw job %s after the failed wait", job_id, exc_info=True)
            raise
        lease = self.lease(job, renew_fraction=renew_fraction, on_preemption=on_preemption, on_lost=on_lost)
        return lease.start()


class Lease:
    """Holds a job's lease: renews it in a background thread and releases the job on exit.

    Renewals run every ``renew_fraction`` x the job's lease TTL for each held replica (by default every
    placed replica). A renewal that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried until the lease
    would lapse; any other error (FAILED_PRECONDITION: the job was released, preempted or expired) ends
    the renewals at once. Either way :attr:`lost` becomes true, :attr:`error` keeps the
    :class:`grpc.RpcError` and :meth:`check` raises it. A preemption notice sets :attr:`preempting` and
    :attr:`preemption_deadline` (and calls ``on_preemption`` once); the worker should checkpoint and exit.
    """

    def __init__(
        self,
        client: SchedulerClient,
        job: Job,
        *,
        replicas: Sequence[int] | None = None,
        renew_fraction: float = 1 / 3,
        release_on_exit: bool = True,
        on_preemption: Callable[[Lease], None] | None = None,
        on_lost: Callable[[Lease], None] | None = None,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ValueError("renew_fraction must be in (0, 1)")
        self.client = client
        self.job = job
        self.replicas = list(replicas) if replicas is not None else [p.replica for p in job.placements]
        if not job.state.placed or not self.replicas:
            raise ValueError(f"job {job.job_id!r} holds no allocation (state {job.state.name})")
        self.ttl_s = float(job.lease_ttl_s or client.config.scheduler.lease_ttl_s)
        #: Seconds between renewals.
        self.interval_s = max(0.05, self.ttl_s * renew_fraction)
        self.release_on_exit = release_on_exit
        self.on_preemption = on_preemption
        self.on_lost = on_lost
        #: Successful renewal rounds (every held replica renewed once).
        self.renewals = 0
        self.expires_at: datetime | None = None
        self.preemption_deadline: datetime | None = None
        self.error: grpc.RpcError | None = None
        self._preempting = False
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._valid_until = time.monotonic() + self.ttl_s
        self._thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        """Id of the held job."""
        return self.job.job_id

    @property
    def placement(self) -> Placement:
        """Placement of the first held replica."""
        return self.job.placement(self.replicas[0] if self.replicas else 0)

    @property
    def placements(self) -> list[Placement]:
        """Placements of the held replicas."""
        return [self.job.placement(r) for r in self.replicas]

    @property
    def preempting(self) -> bool:
        """True once a renewal reported a preemption notice."""
        return self._preempting

    @property
    def lost(self) -> bool:
        """True once renewals failed for good: the allocation is (or will soon be) gone."""
        return self._lost.is_set()

    @property
    def active(self) -> bool:
        """True while the background renewals run."""
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise the renewal's :class:`grpc.RpcError` if the lease was lost; return otherwise."""
        if self._lost.is_set() and self.error is not None:
            raise self.error

    def should_stop(self) -> bool:
        """For training loops: :meth:`check`, then True once a preemption notice arrived."""
        self.check()
        return self._preempting

    def renew_now(self) -> None:
        """Renew every held replica once, synchronously; raises :class:`grpc.RpcError`."""
        timeout = max(1.0, min(self.client.config.client.deadline_s, self.interval_s))
        expiry: datetime | None = None
        for replica in self.replicas:
            resp = self.client.stub.RenewLease(
                pb.RenewLeaseRequest(job_id=self.job_id, replica=replica), timeout=timeout
            )
            renewal = Renewal(_time(resp, "lease_expires_at"), JobState(resp.state), _time(resp, "preemption_deadline"))
            expiry = (
                renewal.expires_at if expiry is None or renewal.expires_at is None else min(expiry, renewal.expires_at)
            )
            if renewal.state == JobState.PREEMPTING:
                self._note_preemption(renewal.preemption_deadline)
        with self._lock:
            self.renewals += 1
            self.expires_at = expiry
            self._valid_until = time.monotonic() + self.ttl_s

    def _note_preemption(self, deadline: datetime | None) -> None:
        first = not self._preempting
        self._preempting = True
        self.preemption_deadline = deadline
        if first:
            log.warning("job %s: preemption notice, deadline %s", self.job_id, deadline)
            if self.on_preemption is not None:
                self.on_preemption(self)

    def start(self) -> Lease:
        """Renew once now (raising :class:`grpc.RpcError` if that fails), then keep renewing in a thread."""
        if self._thread is not None:
            return self
        self.renew_now()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            try:
                self.renew_now()
                wait = self.interval_s
            except grpc.RpcError as err:
                transient = err.code() in TRANSIENT_CODES
                if transient and time.monotonic() + min(self.interval_s, 0.5) < self._valid_until:
                    log.info("job %s: renewal failed (%s), retrying", self.job_id, err.code().name)
                    wait = min(self.interval_s, 0.5)
                    continue
                self.error = err
                self._lost.set()
                log.error("job %s: lease lost: %s %s", self.job_id, err.code().name, err.details())
                if self.on_lost is not None:
                    self.on_lost(self)
                return

    def stop(self) -> None:
        """Stop renewing (without releasing the job)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def close(self) -> Job | None:
        """Stop renewing and release the job (unless ``release_on_exit`` is false); returns the job."""
        self.stop()
        if not self.release_on_exit:
            return None
        self.job = self.client.release(self.job_id)
        return self.job

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except grpc.RpcError:
            if exc is None:
                raise
            # The block's own exception is the one that matters; the failed release is logged.
            log.error("job %s: release failed while leaving on %s", self.job_id, exc_type, exc_info=True)
