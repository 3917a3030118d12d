"""gRPC shell of the scheduler: protobuf in, domain calls, protobuf out. No scheduling logic lives here.

Replicas sharing one store run active/standby (:class:`SchedulerBinding`): the replica holding the
``scheduler`` lease row (guardmesh/leadership.py) serves; the others answer every call UNAVAILABLE with
``leader=<address>`` in the message, which the client factory follows, and report health NOT_SERVING so a
load balancer or Consul sends them no traffic (use health for readiness, not liveness: a standby is
alive). A replica that takes over loads the state from the store and every job lease starts a fresh TTL.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from guardmesh.agent import node_spec_to_pb
from guardmesh.config import MeshConfig
from guardmesh.durable import GroupCommitLog, StoreFailure, parse_store_url
from guardmesh.errors import GuardmeshError, InvalidArgument, PermissionDenied, Unavailable
from guardmesh.inventory import GpuDevice, NodeSpec, load_cluster_file
from guardmesh.leadership import Lease, standby_message
from guardmesh.monitoring import observe_scheduler
from guardmesh.runtime import ServiceDefinition
from guardmesh.security import allow, current_principal
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scheduler_pb2 as pb
from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc
from services.scheduler.jobs import Job, JobSpec, JobState, Qos, Topology
from services.scheduler.scaling import NodeShape, ScaleSignal
from services.scheduler.scheduler import Event, NodeView, Scheduler
from services.scheduler.store import Store, open_log

log = logging.getLogger(__name__)
MAX_BATCH = 1000
#: The lease row the scheduler replicas contend for.
LEADER_LEASE = "scheduler"


def _enum(value: int) -> Any:
    """A domain enum's number as the generated enum type (the numbers match by design)."""
    return int(value)


def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def spec_from_pb(msg: pb.JobSpec) -> JobSpec:
    """Domain job spec from its message (field rules are checked by ``JobSpec.validate``)."""
    which = msg.WhichOneof("gpu_memory")
    try:
        topology = Topology(msg.topology or Topology.PREFERRED)
    except ValueError:
        raise InvalidArgument("job.topology", f"unknown value {msg.topology}") from None
    try:
        qos = Qos(msg.qos or Qos.BURSTABLE)
    except ValueError:
        raise InvalidArgument("job.qos", f"unknown value {msg.qos}") from None
    return JobSpec(
        job_id=msg.job_id,
        tenant=msg.tenant,
        replicas=msg.replicas,
        gpus_per_replica=msg.gpus_per_replica,
        memory_mib_per_gpu=msg.memory_mib_per_gpu if which == "memory_mib_per_gpu" else None,
        share_milli=msg.gpu_share_milli if which == "gpu_share_milli" else None,
        qos=qos,
        priority=msg.priority,
        allow_sharing=msg.allow_sharing,
        allowed_models=tuple(msg.allowed_models),
        gang=msg.gang,
        topology=topology,
        node_selector=tuple(sorted(msg.node_selector.items())),
        cpu_milli=msg.cpu_milli_per_replica,
        host_memory_mib=msg.host_memory_mib_per_replica,
        lease_ttl_s=msg.lease_ttl_s,
        owner=_owner(msg.owner),
    )


def _owner(requested: str) -> str:
    """The job's owner: a trainer's jobs are its own; admin (or no authorization) sets any owner."""
    who = current_principal()
    if who.role == "trainer":
        if requested and requested != who.name:
            raise PermissionDenied(f"job.owner: a trainer submits only its own jobs ('{who.name}', not '{requested}')")
        return who.name
    return requested


def spec_to_pb(spec: JobSpec) -> pb.JobSpec:
    """Message form of a job spec."""
    msg = pb.JobSpec(
        job_id=spec.job_id,
        tenant=spec.tenant,
        qos=_enum(spec.qos),
        priority=spec.priority,
        replicas=spec.replicas,
        gpus_per_replica=spec.gpus_per_replica,
        allow_sharing=spec.allow_sharing,
        allowed_models=list(spec.allowed_models),
        gang=spec.gang,
        topology=_enum(spec.topology),
        node_selector=dict(spec.node_selector),
        cpu_milli_per_replica=spec.cpu_milli,
        host_memory_mib_per_replica=spec.host_memory_mib,
        lease_ttl_s=spec.lease_ttl_s,
        owner=spec.owner,
    )
    if spec.memory_mib_per_gpu is not None:
        msg.memory_mib_per_gpu = spec.memory_mib_per_gpu
    elif spec.share_milli is not None:  # neither for a job with no GPU
        msg.gpu_share_milli = spec.share_milli
    return msg


def job_to_pb(job: Job) -> pb.Job:
    """Message form of a job."""
    msg = pb.Job(
        spec=spec_to_pb(job.spec),
        state=_enum(job.state),
        pending_reason=job.pending_reason,
        submitted_at=_ts(job.submitted_at),
        updated_at=_ts(job.updated_at),
        preempted_by=job.preempted_by,
        lease_ttl_s=job.lease_ttl_s,
    )
    if job.state == JobState.PREEMPTING and job.preemption_deadline is not None:
        msg.preemption_deadline.CopyFrom(_ts(job.preemption_deadline))
    for r in sorted(job.placements):
        rp = job.placements[r]
        placement = msg.placements.add(replica=r, node=rp.node, env=rp.env(job.spec.allow_sharing))
        for g in rp.gpus:
            placement.gpus.add(
                uuid=g.uuid,
                index=g.index,
                model=g.model,
                memory_cap_mib=g.memory_cap_mib,
                memory_fraction=g.memory_fraction,
                topology_group=g.topology_group,
            )
        expiry = job.lease_expiry.get(r)
        if expiry is not None:
            placement.lease_expires_at.CopyFrom(_ts(expiry))
    return msg


def node_from_pb(msg: pb.NodeSpec) -> NodeSpec:
    """Domain node from its message."""
    return NodeSpec(
        name=msg.name,
        gpus=tuple(GpuDevice(g.index, g.uuid, g.model, g.memory_mib, g.topology_group) for g in msg.gpus),
        labels=tuple(sorted(msg.labels.items())),
        cpu_milli=msg.cpu_milli,
        host_memory_mib=msg.host_memory_mib,
    )


def node_to_pb(view: NodeView) -> pb.NodeStatus:
    """Message form of a node view."""
    msg = pb.NodeStatus(
        spec=node_spec_to_pb(view.spec),
        last_seen=_ts(view.last_seen),
        reserve_mib=view.reserve_mib,
    )
    for g in view.gpus:
        msg.gpus.add(
            device=pb.GpuDevice(
                index=g.index, uuid=g.uuid, model=g.model, memory_mib=g.memory_mib, topology_group=g.topology_group
            ),
            allocations=[
                pb.GpuAllocation(job_id=j, replica=r, memory_cap_mib=c, shared=s) for j, r, c, s in g.allocations
            ],
            allocatable_mib=g.allocatable_mib,
            used_memory_mib=g.used_memory_mib,
            utilization=g.utilization,
        )
    return msg


def event_to_pb(ev: Event) -> pb.Event:
    """Message form of an event."""
    return pb.Event(seq=ev.seq, kind=_enum(ev.kind), job_id=ev.job_id, at=_ts(ev.at), message=ev.message)


def signal_to_pb(sig: ScaleSignal) -> pb.ScaleSignal:
    """Message form of a scale signal."""
    return pb.ScaleSignal(
        pool=sig.pool,
        direction=_enum(sig.direction),
        nodes=sig.nodes,
        shape=pb.NodeShape(model=sig.shape.model, gpus=sig.shape.gpus, memory_mib_per_gpu=sig.shape.memory_mib_per_gpu),
        utilization=sig.utilization,
        reason=sig.reason,
        at=_ts(sig.at),
    )


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    """Implements ``guardmesh.v1.SchedulerService`` over :class:`Scheduler`."""

    def __init__(self) -> None:
        self._core: Scheduler | None = None
        self.draining = threading.Event()
        #: Set once this replica knows whether it leads; while standby, the leader's address ("" unknown).
        self.standby = False
        self.leader_address = ""
        #: Whether this replica's leader lease is still valid by its own clock (set by the binding).
        self.lease_valid: Callable[[], bool] = lambda: True

    @property
    def core(self) -> Scheduler:
        """The scheduler; UNAVAILABLE until state is restored, and on a standby (naming the leader)."""
        core = self._core
        if core is None:
            if self.standby:
                raise Unavailable(standby_message("scheduler", self.leader_address))
            raise Unavailable("scheduler is starting")
        if not self.lease_valid():
            # Not renewed within the lease (store unreachable, or this process was paused): another replica
            # may take over any moment, so this one answers nothing, reads included, until it renews.
            raise Unavailable("scheduler replica could not renew its leader lease; retry shortly")
        return core

    def RegisterNode(self, request: pb.RegisterNodeRequest, context: grpc.ServicerContext) -> pb.RegisterNodeResponse:
        """See the proto."""
        view = self.core.register_nodes([node_from_pb(request.node)])[0]
        return pb.RegisterNodeResponse(node=node_to_pb(view))

    def ReportNodeStatus(
        self, request: pb.ReportNodeStatusRequest, context: grpc.ServicerContext
    ) -> pb.ReportNodeStatusResponse:
        """See the proto."""
        at = self.core.report_node_status(
            request.node, [(g.uuid, g.used_memory_mib, g.utilization) for g in request.gpus]
        )
        return pb.ReportNodeStatusResponse(recorded_at=_ts(at))

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        """See the proto."""
        return pb.ListNodesResponse(nodes=[node_to_pb(v) for v in self.core.list_nodes(request.model)])

    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.SubmitJobResponse:
        """See the proto."""
        job = self.core.submit(spec_from_pb(request.job))
        span = trace.get_current_span()
        span.set_attribute("guardmesh.job_id", job.job_id)
        span.set_attribute("guardmesh.job_state", job.state.name)
        return pb.SubmitJobResponse(job=job_to_pb(job))

    def SubmitJobs(self, request: pb.SubmitJobsRequest, context: grpc.ServicerContext) -> pb.SubmitJobsResponse:
        """See the proto."""
        if not 1 <= len(request.jobs) <= MAX_BATCH:
            raise InvalidArgument("jobs", f"must hold 1 to {MAX_BATCH} jobs (got {len(request.jobs)})")
        specs: list[JobSpec | GuardmeshError] = []
        for msg in request.jobs:
            try:
                specs.append(spec_from_pb(msg))
            except GuardmeshError as err:
                specs.append(err)
        valid = [s for s in specs if isinstance(s, JobSpec)]
        results = iter(self.core.submit_many(valid))
        resp = pb.SubmitJobsResponse()
        for s in specs:
            outcome = next(results) if isinstance(s, JobSpec) else s
            if isinstance(outcome, GuardmeshError):
                resp.results.add(error=common_pb2.ErrorStatus(code=outcome.code.value[0], message=outcome.message))
            else:
                resp.results.add(job=job_to_pb(outcome))
        return resp

    def _check_owner(self, job_id: str) -> None:
        """A trainer acts only on its own jobs (admin, and calls without authorization, on any)."""
        who = current_principal()
        if who.role == "trainer":
            owner = self.core.describe(job_id).spec.owner
            if owner != who.name:
                raise PermissionDenied(f"job '{job_id}' belongs to '{owner or 'admin'}', not to '{who.name}'")

    def ReleaseJob(self, request: pb.ReleaseJobRequest, context: grpc.ServicerContext) -> pb.ReleaseJobResponse:
        """See the proto."""
        self._check_owner(request.job_id)
        return pb.ReleaseJobResponse(job=job_to_pb(self.core.release(request.job_id)))

    def DescribeJob(self, request: pb.DescribeJobRequest, context: grpc.ServicerContext) -> pb.DescribeJobResponse:
        """See the proto."""
        self._check_owner(request.job_id)
        return pb.DescribeJobResponse(job=job_to_pb(self.core.describe(request.job_id)))

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        """See the proto."""
        state = None
        if request.state:
            try:
                state = JobState(request.state)
            except ValueError:
                raise InvalidArgument("state", f"unknown value {request.state}") from None
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in self.core.list_jobs(request.tenant, state)])

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchJobResponse]:
        """See the proto."""
        self._check_owner(request.job_id)
        core = self.core
        stopped = lambda: self.draining.is_set() or not context.is_active() or self._core is not core  # noqa: E731
        for ev, job in core.watch(request.job_id, stopped):
            msg = pb.WatchJobResponse(job=job_to_pb(job))
            if ev is not None:
                msg.event.CopyFrom(event_to_pb(ev))
            yield msg
        self._check_still_leading(core)

    def RenewLease(self, request: pb.RenewLeaseRequest, context: grpc.ServicerContext) -> pb.RenewLeaseResponse:
        """See the proto."""
        self._check_owner(request.job_id)
        job = self.core.renew(request.job_id, request.replica)
        msg = pb.RenewLeaseResponse(lease_expires_at=_ts(job.lease_expiry[request.replica]), state=_enum(job.state))
        if job.state == JobState.PREEMPTING and job.preemption_deadline is not None:
            msg.preemption_deadline.CopyFrom(_ts(job.preemption_deadline))
        return msg

    def ListEvents(self, request: pb.ListEventsRequest, context: grpc.ServicerContext) -> pb.ListEventsResponse:
        """See the proto."""
        events = self.core.events_after(request.after_seq, request.limit, request.job_id)
        return pb.ListEventsResponse(events=[event_to_pb(e) for e in events])

    def PlanCapacity(self, request: pb.PlanCapacityRequest, context: grpc.ServicerContext) -> pb.PlanCapacityResponse:
        """See the proto."""
        shape = NodeShape(request.shape.model, request.shape.gpus, request.shape.memory_mib_per_gpu)
        plan = self.core.plan(shape, [spec_from_pb(j) for j in request.jobs])
        return pb.PlanCapacityResponse(
            requested_memory_mib=plan.requested_memory_mib,
            free_memory_mib_per_node=plan.free_memory_mib_per_node,
            nodes_by_memory=plan.nodes_by_memory,
            nodes_by_exclusive_gpus=plan.nodes_by_unshared_gpus,
            nodes_needed=plan.nodes_needed,
        )

    def WatchScaleSignals(
        self, request: pb.WatchScaleSignalsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchScaleSignalsResponse]:
        """See the proto."""
        core = self.core
        seen: dict[str, ScaleSignal] = {}
        while not self.draining.is_set() and context.is_active():
            with core.changed:
                current = {s.pool: s for s in core.scale_signals(request.pool)}
                last = core.scale_seq

            def moved(seen: int = last) -> bool:
                return core.scale_seq != seen or self.draining.is_set()

            for pool, sig in current.items():
                if seen.get(pool) != sig:
                    seen[pool] = sig
                    yield pb.WatchScaleSignalsResponse(signal=signal_to_pb(sig))
            with core.changed:
                core.changed.wait_for(moved, timeout=1.0)
            self._check_still_leading(core)

    def _check_still_leading(self, core: Scheduler) -> None:
        """A stream of a core this replica no longer serves (it stood by) ends UNAVAILABLE, naming the
        leader, so the watcher opens it again there rather than waiting on a core nothing changes."""
        if self._core is not core and not self.draining.is_set():
            raise Unavailable(standby_message("scheduler", self.leader_address))


class _LeaderView:
    """What metrics read: the current leader core's nodes and jobs (none on a standby)."""

    def __init__(self, servicer: SchedulerServicer) -> None:
        self._servicer = servicer

    def list_nodes(self) -> list[NodeView]:
        core = self._servicer._core
        return core.list_nodes() if core is not None else []

    def list_jobs(self) -> list[Job]:
        core = self._servicer._core
        return core.list_jobs() if core is not None else []


class SchedulerBinding:
    """The scheduler's servicer, its store, leader election, and the reaper thread that runs ``Scheduler.tick``.

    Every replica claims the lease every third of ``scheduler.leader_lease_s``. On winning it, a replica
    loads a fresh core from the store whose writes carry the new epoch (fencing); on losing it, or when a
    write fails (store lost, or fenced because another replica took over), it drops its core and stands
    by, and takes over again (with a new epoch and a fresh load) once it wins the lease back.
    """

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.servicer = SchedulerServicer()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._elector: threading.Thread | None = None
        self._role = threading.Lock()
        self.log: GroupCommitLog | None = None
        self.lease: Lease | None = None
        #: kube-scheduler extender endpoint and controller when ``[extender] enabled`` (services/scheduler/kube.py).
        self.kube: Any = None

    def add_to_server(self, server: grpc.Server) -> None:
        """Add the servicer."""
        pb_grpc.add_SchedulerServiceServicer_to_server(self.servicer, server)

    @property
    def address(self) -> str:
        """Where clients reach this replica: the endpoint's advertised host (or host) and the bound port."""
        endpoint = self.config.services.get("scheduler")
        host = (endpoint.advertise_host or endpoint.host) if endpoint is not None else "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        port = getattr(self, "bound_port", 0) or (endpoint.port if endpoint is not None else 0)
        return f"{host}:{port}"

    def start(self) -> None:
        """Open the store (StoreError if it cannot be used), claim the lease once, start the elector and
        the reaper. A replica that wins serves at once; one that loses starts as a standby."""
        settings = self.config.scheduler
        url = settings.store_url or settings.db_path
        self.log = open_log(parse_store_url(url, self.config.mesh.state_dir), settings.sqlite_synchronous)
        # Host and port cannot be live twice at once; a pid and a nonce keep in-process test servers apart.
        holder = f"{self.address}/{os.getpid()}/{uuid.uuid4().hex[:8]}" if self.address.endswith(":0") else self.address
        self.lease = Lease(self.log, LEADER_LEASE, holder, self.address, settings.leader_lease_s)
        self.servicer.lease_valid = self.lease.valid
        if self.config.extender.enabled:
            from services.scheduler.kube import KubernetesSide  # the kubernetes client only where it is used

            self.kube = KubernetesSide(self.config.extender)
        self._elect()
        if self.config.metrics.enabled:
            observe_scheduler(_LeaderView(self.servicer))
        self._elector = threading.Thread(target=self._run_elector, name="scheduler-elector", daemon=True)
        self._elector.start()
        self._reaper = threading.Thread(target=self._reap, name="scheduler-reaper", daemon=True)
        self._reaper.start()

    def _run_elector(self) -> None:
        assert self.lease is not None
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                self._elect()
            except Exception:
                log.exception("leader election round failed")

    def _elect(self) -> None:
        """One round: claim the lease; take over, stay, or stand by."""
        assert self.lease is not None
        try:
            state = self.lease.claim()
        except StoreFailure as exc:
            log.warning("store unreachable; cannot renew the leader lease", extra={"error": str(exc)})
            if not self.lease.valid():
                self._step_down(f"store unreachable past the lease: {exc}", leader="")
            return
        if state.leader:
            core = self.servicer._core
            if core is None or core.failed:
                self._take_over(state.epoch)
        else:
            self._step_down(f"{state.holder} leads (epoch {state.epoch})", leader=state.address)

    def _take_over(self, epoch: int) -> None:
        assert self.log is not None
        settings = self.config.scheduler
        with self._role:
            # The core's writes carry this epoch: after another replica takes over, none of them lands.
            core = Scheduler(settings, Store(self.log, fence=(LEADER_LEASE, epoch)))
            core.on_fail_stop = self._core_failed
            if settings.cluster_file:
                core.register_nodes(load_cluster_file(Path(settings.cluster_file)))
            self.servicer._core = core
            self.servicer.standby = False
            self.servicer.leader_address = self.address
            if self.kube is not None:
                self.kube.lead(core)
        log.info("leading", extra={"epoch": epoch, "address": self.address, "store": self.log.where})
        self._set_serving(True)

    def _step_down(self, reason: str, leader: str) -> None:
        """Stand by: drop the core (its memory may be ahead of the store) and refuse calls naming ``leader``."""
        with self._role:
            self.servicer.leader_address = leader
            self.servicer.standby = True
            if self.kube is not None:
                self.kube.stand_by()
            core, self.servicer._core = self.servicer._core, None
            if core is not None and self.lease is not None:
                self.lease.forget()  # the next win takes a new epoch: the dropped core can never write again
        if core is not None:
            log.warning("standing by", extra={"reason": reason, "leader": leader})
            core.wake_watchers()
        self._set_serving(False)

    def _core_failed(self, reason: str) -> None:
        """A write failed (store lost, or fenced): stand by until the lease is won back."""
        self._step_down(f"write failed: {reason}", leader="")

    def _set_serving(self, serving: bool) -> None:
        set_serving = getattr(self, "set_serving", None)  # set by the runtime (guardmesh/runtime.py)
        if set_serving is not None:
            set_serving(serving)

    def _reap(self) -> None:
        while not self._stop.wait(self.config.scheduler.reap_interval_s):
            core = self.servicer._core
            if core is None:
                continue
            try:
                for sig in core.tick():
                    log.info(
                        "scale signal",
                        extra={
                            "pool": sig.pool,
                            "direction": sig.direction.name,
                            "nodes": sig.nodes,
                            "reason": sig.reason,
                        },
                    )
            except Exception:
                log.exception("reaper tick failed")

    def drain(self) -> None:
        """End watch streams."""
        self.servicer.draining.set()
        if self.servicer._core is not None:
            self.servicer._core.wake_watchers()

    def close(self) -> None:
        """Stop the elector and the reaper, hand the lease back (a standby takes over at once), close the
        store."""
        self._stop.set()
        for thread in (self._elector, self._reaper):
            if thread is not None:
                thread.join(timeout=5)
        if self.kube is not None:
            self.kube.close()
        if self.servicer._core is not None:
            self.servicer._core.close()  # flushes nothing of its own: the log is shared and closed below
        if self.lease is not None:
            try:
                self.lease.release()
            except StoreFailure as exc:
                log.warning("could not hand the leader lease back", extra={"error": str(exc)})
        if self.log is not None:
            self.log.close()


_SCHEDULER = pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name
SERVICE = ServiceDefinition(
    name="scheduler",
    service_names=(_SCHEDULER,),
    build=SchedulerBinding,
    # Trainers submit and watch their own jobs and renew or release only their own leases (checked per job);
    # nodes, policies and cluster-wide views are admin's.
    roles=allow(
        _SCHEDULER, ("trainer",), "SubmitJob", "SubmitJobs", "ReleaseJob", "DescribeJob", "WatchJob", "RenewLease"
    ),
)
