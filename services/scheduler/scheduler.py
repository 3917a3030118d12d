"""The scheduler's core: jobs, the pending queue, preemption, leases and events over the cluster state.

Every public method takes one lock, so decisions are serialised and the card invariant holds under any
concurrency; each method stages its durable changes and commits them before it returns. The core knows
nothing of gRPC: ``server.py`` translates protobuf to these calls and domain errors to status codes.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from guardmesh.config import SchedulerSettings
from guardmesh.durable import StoreFailure, Ticket
from guardmesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    GuardmeshError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from guardmesh.inventory import NodeSpec
from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import (
    HOLDS_ALLOCATION,
    TERMINAL,
    EventKind,
    GpuGrant,
    Job,
    JobSpec,
    JobState,
    Qos,
    ReplicaPlacement,
)
from services.scheduler.placement import (
    Choice,
    FirstFit,
    ReplicaShape,
    caps_for,
    could_host,
    make_policy,
    model_mask,
    pending_reason,
    place,
)
from services.scheduler.preemption import fewest_victims
from services.scheduler.scaling import CapacityPlan, NodeShape, ScaleAdvisor, ScaleSignal, plan_capacity
from services.scheduler.store import Store

log = logging.getLogger(__name__)

#: Feasibility only: the preemption simulation asks whether a replica fits, not where it scores best.
FEASIBILITY = FirstFit()


@dataclass(frozen=True)
class Event:
    """A scheduling event."""

    seq: int
    kind: EventKind
    job_id: str
    at: float
    message: str


@dataclass(frozen=True)
class GpuView:
    """A GPU with its allocations, as ListNodes reports it."""

    index: int
    uuid: str
    model: str
    memory_mib: int
    topology_group: str
    allocations: tuple[tuple[str, int, int, bool], ...]
    allocatable_mib: int
    used_memory_mib: int
    utilization: float


@dataclass(frozen=True)
class NodeView:
    """A node with its GPUs, as ListNodes reports it."""

    spec: NodeSpec
    gpus: tuple[GpuView, ...]
    last_seen: float
    reserve_mib: int


class Scheduler:
    """Places jobs on GPUs by memory; see the module docstring."""

    def __init__(
        self,
        settings: SchedulerSettings,
        store: Store | None = None,
        *,
        clock: Callable[[], float] = time.time,
        policy: str | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        #: Called once a write failed: this core refuses every call from then on, and its owner (the server)
        #: drops it and stands by until it holds the lease again and reloads what is durable.
        self.on_fail_stop: Callable[[str], None] | None = None
        self.state = ClusterState(settings.gpu_reserve_mib)
        self.policy = make_policy(policy or settings.policy)
        self.policy.attach(self.state)
        self.jobs: dict[str, Job] = {}
        self.pending: dict[str, Job] = {}
        self.events: deque[Event] = deque(maxlen=settings.event_retention)
        self.event_seq = 0
        self.job_seq = 0
        self.node_seen: dict[str, float] = {}
        self.scale = ScaleAdvisor(
            settings.scale_out_utilization,
            settings.scale_in_utilization,
            settings.scale_window_s,
            settings.gpu_reserve_mib,
        )
        self.scale_seq = 0
        #: Set when a write failed: memory is ahead of disk, so every call answers UNAVAILABLE.
        self.failed = ""
        #: The newest commit handed to the store; a read of possibly undurable state waits for it.
        self.last_ticket: Ticket | None = None
        if store is not None:
            self._restore(store)

    # -- restore ---------------------------------------------------------------------------------------

    def _restore(self, store: Store) -> None:
        now = self.clock()
        nodes = store.load_nodes()
        if nodes:
            self.state.set_nodes(nodes)
            for n in nodes:
                self.node_seen[n.name] = now
        for job in store.load_jobs():
            self.jobs[job.job_id] = job
            self.job_seq = max(self.job_seq, job.seq)
            if job.state in HOLDS_ALLOCATION:
                for rp in job.placements.values():
                    gpus = [self.state.uuid_index[g.uuid] for g in rp.gpus]
                    caps = [g.memory_cap_mib for g in rp.gpus]
                    self.state.allocate(
                        job.job_id,
                        rp.replica,
                        gpus,
                        caps,
                        job.spec.allow_sharing,
                        job.spec.cpu_milli,
                        job.spec.host_memory_mib,
                        node=self.state.node_index[rp.node],
                    )
                    # Workers could not renew while we were down: every lease starts a fresh TTL.
                    job.lease_expiry[rp.replica] = now + job.lease_ttl_s
            waiting = job.state not in TERMINAL and job.state != JobState.PREEMPTING
            if waiting and len(job.placements) < job.spec.replicas:
                self.pending[job.job_id] = job
        for seq, kind, job_id, at, message in store.load_events(self.settings.event_retention):
            self.events.append(Event(seq, EventKind(kind), job_id, at, message))
        self.event_seq = store.max_event_seq()
        log.info(
            "restored state",
            extra={"nodes": len(nodes), "jobs": len(self.jobs), "pending": len(self.pending)},
        )

    # -- helpers ---------------------------------------------------------------------------------------

    def _emit(self, kind: EventKind, job: Job, message: str) -> None:
        self.event_seq += 1
        ev = Event(self.event_seq, kind, job.job_id, self.clock(), message)
        self.events.append(ev)
        if self.store is not None:
            self.store.stage_event(ev.seq, ev.kind, ev.job_id, ev.at, ev.message)

    def _save(self, job: Job) -> None:
        job.updated_at = self.clock()
        if self.store is not None:
            self.store.stage_job(job)

    def _commit(self) -> Ticket | None:
        """Hand staged writes to the group committer (under the lock); wait on the ticket outside it."""
        ticket = self.store.commit() if self.store is not None else None
        if ticket is not None:
            self.last_ticket = ticket
        self.changed.notify_all()
        return ticket

    def _durable(self, ticket: Ticket | None) -> None:
        """Wait until an operation's writes are durable; a failed write stops this core (fail-stop): its memory
        is then ahead of the store, so it answers UNAVAILABLE; the server stands by and a core reloaded from
        what is durable takes over once the lease is held again."""
        if ticket is None:
            return
        try:
            ticket.wait("scheduler state")
        except StoreFailure as exc:
            self.failed = str(exc)
            log.critical(
                "store failure; this core stops, the replica stands by until it reloads from the store",
                extra={"error": str(exc)},
            )
            if self.on_fail_stop is not None:
                self.on_fail_stop(self.failed)
            raise Unavailable(
                f"scheduler store failed ({exc}); this replica stands by until it reloads from the store"
            ) from exc

    def _stopped(self) -> bool:
        """True once a write failed, even if no waiter has seen its ticket yet (under the lock)."""
        last = self.last_ticket
        if not self.failed and last is not None and last.error is not None:
            self.failed = str(last.error)
        return bool(self.failed)

    def _check_alive(self) -> None:
        if self._stopped():
            raise Unavailable(
                f"scheduler store failed ({self.failed}); this replica stands by until it reloads from the store"
            )

    def _get(self, job_id: str) -> Job:
        if not job_id:
            raise InvalidArgument("job_id", "must not be empty")
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    @staticmethod
    def snapshot(job: Job) -> Job:
        """A copy of ``job`` safe to read outside the lock."""
        return replace(
            job,
            placements=dict(job.placements),
            lease_expiry=dict(job.lease_expiry),
            awaiting_victims=set(job.awaiting_victims),
        )

    def _grants(self, choice: Choice) -> tuple[GpuGrant, ...]:
        grants = []
        for g, cap in zip(choice.gpus, choice.caps, strict=True):
            node, pos = self.state.gpu_device(g)
            dev = node.gpus[pos]
            grants.append(
                GpuGrant(dev.uuid, dev.index, dev.model, cap, round(cap / dev.memory_mib, 6), dev.topology_group)
            )
        return tuple(grants)

    # -- nodes -----------------------------------------------------------------------------------------

    def register_nodes(self, specs: list[NodeSpec]) -> list[NodeView]:
        """Register or update nodes; pending jobs are retried against the new capacity."""
        for spec in specs:
            spec.validate()
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InvalidArgument("node.name", "duplicate node names in one registration")
        with self.lock:
            self._check_alive()
            self.state.set_nodes(specs)
            now = self.clock()
            for spec in specs:
                self.node_seen[spec.name] = now
                if self.store is not None:
                    self.store.stage_node(spec)
            self._schedule_pending()
            ticket = self._commit()
            views = [self._node_view(self.state.node_index[s.name]) for s in specs]
        self._durable(ticket)
        return views

    def report_node_status(self, node: str, usage: list[tuple[str, int, float]]) -> float:
        """Record per-GPU (uuid, used MiB, utilisation) for ``node``; returns the recorded time."""
        with self.lock:
            self._check_alive()
            if node not in self.state.node_index:
                raise NotFound(f"node {node!r} is not registered")
            spec = self.state.nodes[self.state.node_index[node]]
            own = {g.uuid: g for g in spec.gpus}
            for i, (uuid, used, util) in enumerate(usage):
                dev = own.get(uuid)
                if dev is None:
                    raise InvalidArgument(f"gpus[{i}].uuid", f"{uuid!r} is not a GPU of node {node}")
                if not 0 <= used <= dev.memory_mib:
                    raise InvalidArgument(
                        f"gpus[{i}].used_memory_mib", f"must be 0 to the GPU's {dev.memory_mib} MiB (got {used})"
                    )
                if not (0.0 <= util <= 1.0):
                    raise InvalidArgument(f"gpus[{i}].utilization", f"must be 0.0 to 1.0 (got {util})")
            gained = False
            for uuid, used, util in usage:
                gained |= self.state.observe(self.state.uuid_index[uuid], used, util)
            now = self.clock()
            self.node_seen[node] = now
            n = self.state.node_index[node]
            revived = not self.state.node_alive[n]
            self.state.node_alive[n] = True
            if gained or revived:  # heartbeats are frequent: retry the queue only when room appeared
                self._schedule_pending()
            ticket = self._commit()
        self._durable(ticket)
        return now

    def _node_view(self, n: int) -> NodeView:
        spec = self.state.nodes[n]
        first = int(self.state.node_first[n])
        gpus = []
        for j, dev in enumerate(spec.gpus):
            g = first + j
            allocs = tuple(
                (a.job_id, a.replica, a.cap_mib, a.allow_sharing)
                for a in sorted(self.state.allocs[g].values(), key=lambda a: (a.job_id, a.replica))
            )
            gpus.append(
                GpuView(
                    dev.index,
                    dev.uuid,
                    dev.model,
                    dev.memory_mib,
                    dev.topology_group,
                    allocs,
                    int(self.state.gpu_avail[g]),
                    int(self.state.gpu_used[g]),
                    float(self.state.gpu_util[g]),
                )
            )
        return NodeView(spec, tuple(gpus), self.node_seen.get(spec.name, 0.0), self.state.reserve_mib)

    def list_nodes(self, model: str = "") -> list[NodeView]:
        """Nodes (optionally those with a GPU of ``model``) with their allocations, by name."""
        with self.lock:
            out = [
                self._node_view(n)
                for n, spec in enumerate(self.state.nodes)
                if not model or any(g.model == model for g in spec.gpus)
            ]
        return sorted(out, key=lambda v: v.spec.name)

    # -- jobs ------------------------------------------------------------------------------------------

    def _check_static(self, spec: JobSpec) -> None:
        """Reject what no state of this cluster could ever place."""
        state = self.state
        for i, model in enumerate(spec.allowed_models):
            if model not in state.model_index:
                raise InvalidArgument(
                    f"job.allowed_models[{i}]",
                    f"GPU model {model!r} does not exist in the cluster (known: {', '.join(state.models) or 'none'})",
                )
        if state.gpu_count == 0:
            raise FailedPrecondition("the cluster has no registered GPUs; register nodes first")
        shape = ReplicaShape.of(spec)
        if shape.gpus == 0:
            if not could_host(state, shape).any():
                raise InvalidArgument(
                    "job.cpu_milli_per_replica",
                    f"no node has {spec.cpu_milli} CPU milli and {spec.host_memory_mib} MiB host memory "
                    "(with the selector) even when empty",
                )
            return
        key = ("static", shape.models, shape.memory_mib, shape.share_milli)
        cached = state.cache.get(key)
        if cached is None:
            allowed = model_mask(state, shape)
            caps = caps_for(state, shape)
            fits_card = allowed & (state.gpu_usable >= caps)
            largest = int(state.gpu_usable[allowed].max()) if allowed.any() else 0
            n = len(state.nodes)
            per_node = np.bincount(state.gpu_node[fits_card], minlength=n)
            # Shared replicas can stack on one card: count the slots each fitting card offers.
            slots = np.where(fits_card, state.gpu_usable // np.maximum(caps, 1), 0)
            per_node_slots = np.bincount(state.gpu_node, weights=slots, minlength=n).astype(np.int64)
            cached = state.cache[key] = np.concatenate(([largest], per_node, per_node_slots))
        n = len(state.nodes)
        largest, per_node, per_node_slots = int(cached[0]), cached[1 : 1 + n], cached[1 + n :]
        if per_node.max() == 0:
            raise InvalidArgument(
                "job.memory_mib_per_gpu",
                f"no card of an allowed model has {spec.memory_mib_per_gpu} MiB allocatable; "
                f"the largest has {largest} MiB after the {state.reserve_mib} MiB reserve",
            )
        if per_node.max() < spec.gpus_per_replica:
            raise InvalidArgument(
                "job.gpus_per_replica",
                f"no node has {spec.gpus_per_replica} GPUs that can hold the request (largest: {per_node.max()})",
            )
        if spec.gang:
            # An upper bound on how many replicas the empty cluster could hold at once.
            per = per_node_slots if spec.allow_sharing else per_node
            capacity = int((per // spec.gpus_per_replica).sum())
            if capacity < spec.replicas:
                raise InvalidArgument(
                    "job.replicas",
                    f"gang of {spec.replicas} x {spec.gpus_per_replica} GPUs is larger than the cluster, "
                    f"which holds at most {capacity} such replicas",
                )

    def submit(self, spec: JobSpec) -> Job:
        """Submit a job: place it now if room exists, else queue it (and preempt for guaranteed jobs).

        Acknowledged (returned) only once durable. Resubmitting the same spec returns the job.
        """
        spec.validate()
        with self.lock:
            self._check_alive()
            job = self._submit_locked(spec)
            ticket = self._commit() or self.last_ticket
        self._durable(ticket)
        return job

    def submit_many(self, specs: list[JobSpec]) -> list[Job | GuardmeshError]:
        """Submit jobs in order under one lock and one transaction; each gets its job or its own error."""
        out: list[Job | GuardmeshError] = []
        with self.lock:
            self._check_alive()
            for spec in specs:
                try:
                    spec.validate()
                    out.append(self._submit_locked(spec))
                except GuardmeshError as err:
                    out.append(err)
            ticket = self._commit() or self.last_ticket
        self._durable(ticket)
        return out

    def _submit_locked(self, spec: JobSpec) -> Job:
        existing = self.jobs.get(spec.job_id)
        if existing is not None:
            if existing.spec == spec:
                return self.snapshot(existing)
            raise AlreadyExists(f"job {spec.job_id!r} exists with a different spec")
        self._check_static(spec)
        self.job_seq += 1
        now = self.clock()
        job = Job(
            spec=spec,
            seq=self.job_seq,
            submitted_at=now,
            updated_at=now,
            lease_ttl_s=spec.lease_ttl_s or self.settings.lease_ttl_s,
        )
        self.jobs[spec.job_id] = job
        self.policy.observe(ReplicaShape.of(spec))
        mark = self.store.mark() if self.store is not None else 0
        try:
            # A new job does not skip the queue: behind a blocked head it may only backfill.
            head = self._queue_head()
            behind = head if head is not None and head.queue_key() < job.queue_key() else None
            placed = self._try_place(job, behind)
            if not placed:
                self.pending[job.job_id] = job
                if job.state == JobState.PENDING:
                    self._emit(EventKind.PENDING, job, job.pending_reason)
                if behind is None:
                    self._try_preempt(job)
            self._save(job)
        except Exception:
            # An unexpected failure mid-decision: undo this job entirely, in memory and in what is staged.
            self.state.free(job.job_id)
            self.jobs.pop(job.job_id, None)
            self.pending.pop(job.job_id, None)
            if self.store is not None:
                self.store.rollback_to(mark)
            raise
        return self.snapshot(job)

    def _queue_head(self) -> Job | None:
        """The pending job first in queue order (see :meth:`Job.queue_key`), or None."""
        return min(self.pending.values(), key=Job.queue_key, default=None)

    def _try_place(self, job: Job, behind: Job | None = None) -> bool:
        """Place the job's missing replicas (all or none for a gang); True when every replica is placed.

        Behind a blocked ``behind`` (the queue's head) the job only backfills: it may use no node that
        could hold a replica of the head, so it never delays the head's placement. Without run-time
        estimates this is the only backfill that provably does not.
        """
        spec = job.spec
        shape = ReplicaShape.of(spec)
        allowed = None if behind is None else ~could_host(self.state, ReplicaShape.of(behind.spec))
        missing = [r for r in range(spec.replicas) if r not in job.placements]
        placed: list[tuple[int, Choice]] = []
        for r in missing:
            choice = place(self.state, shape, self.policy, allowed)
            if choice is None:
                break
            self.state.allocate(
                job.job_id,
                r,
                list(choice.gpus),
                list(choice.caps),
                spec.allow_sharing,
                spec.cpu_milli,
                spec.host_memory_mib,
                node=choice.node,
            )
            placed.append((r, choice))
        complete = len(placed) == len(missing)
        queued = f"queued behind {behind.job_id} (backfill only on nodes it cannot use); " if behind else ""
        if spec.gang and not complete:
            self.state.free(job.job_id)  # no partial reservation is ever kept for a gang
            job.pending_reason = (
                f"{queued}gang of {spec.replicas} x {spec.gpus_per_replica} GPUs: only {len(placed)} of "
                f"{spec.replicas} replicas fit at once; {pending_reason(self.state, shape)}"
            )
            return False
        now = self.clock()
        for r, choice in placed:
            node = self.state.nodes[choice.node].name
            job.placements[r] = ReplicaPlacement(r, node, self._grants(choice))
            job.lease_expiry[r] = now + job.lease_ttl_s
        if placed:
            job.state = JobState.RUNNING
            where = ", ".join(f"r{r}@{self.state.nodes[c.node].name}" for r, c in placed)
            self._emit(EventKind.PLACED, job, f"placed {where}")
        if complete:
            job.pending_reason = ""
            self.pending.pop(job.job_id, None)
        else:
            job.pending_reason = (
                f"{queued}{len(job.placements)} of {spec.replicas} replicas placed; {pending_reason(self.state, shape)}"
            )
        return complete

    # -- preemption ------------------------------------------------------------------------------------

    def _victim_order(self, job_id: str) -> tuple[int, int, int, int]:
        v = self.jobs[job_id]
        preempting = 0 if v.state == JobState.PREEMPTING else 1
        # Already-preempting jobs cost nothing; then best-effort before burstable, low priority, newest.
        return (preempting, -int(v.spec.qos), v.spec.priority, -v.seq)

    def _try_preempt(self, job: Job) -> None:
        """For a guaranteed job that does not fit: notify the fewest victims that make room.

        The replicas are placed one by one on a simulation of the cluster; a replica that does not fit
        evicts the smallest victim set on one node (``preemption.fewest_victims``). The live state is only
        read: the victims keep their cards until they release or the grace ends.
        """
        if job.spec.qos != Qos.GUARANTEED or job.awaiting_victims:
            return
        spec = job.spec
        shape = ReplicaShape.of(spec)
        eligible = {
            jid
            for jid, j in self.jobs.items()
            if j.state in HOLDS_ALLOCATION and j.spec.qos in (Qos.BEST_EFFORT, Qos.BURSTABLE)
        }
        sim = self.state.simulation()
        chosen: list[str] = []
        for r in range(spec.replicas):
            if r in job.placements:
                continue
            choice = place(sim, shape, FEASIBILITY)
            if choice is None:
                plan = fewest_victims(sim, shape, eligible - set(chosen), self._victim_order)
                if plan is None:
                    job.pending_reason += "; preempting every best-effort and burstable job would not make room"
                    return
                for vid in plan:
                    sim.free(vid)
                chosen.extend(plan)
                choice = place(sim, shape, FEASIBILITY)
                if choice is None:  # fewest_victims checked this fit with the placement filter's rules
                    raise AssertionError(f"victims {plan} freed no room for a replica of {job.job_id}")
            sim.allocate(
                job.job_id,
                r,
                list(choice.gpus),
                list(choice.caps),
                spec.allow_sharing,
                spec.cpu_milli,
                spec.host_memory_mib,
                node=choice.node,
            )
        if not chosen:
            return
        deadline = self.clock() + self.settings.preemption_grace_s
        job.awaiting_victims = set(chosen)
        for vid in chosen:
            v = self.jobs[vid]
            if v.state == JobState.PREEMPTING:
                continue
            v.state = JobState.PREEMPTING
            v.preemption_deadline = deadline
            v.preempted_by = job.job_id
            self.pending.pop(vid, None)
            self._emit(
                EventKind.PREEMPTION_NOTICE,
                v,
                f"preempted for guaranteed job {job.job_id}; release by the deadline ({deadline:.3f})",
            )
            self._save(v)
        job.pending_reason = (
            f"waiting for {len(job.awaiting_victims)} preempted job(s) to vacate: "
            f"{', '.join(sorted(job.awaiting_victims))}"
        )

    # -- queue -----------------------------------------------------------------------------------------

    def _schedule_pending(self) -> None:
        """Retry pending jobs in queue order (QoS, priority, age); once one stays blocked (the head),
        the rest only backfill around it, and only the head may preempt."""
        head: Job | None = None
        for job in sorted(self.pending.values(), key=Job.queue_key):
            if job.job_id not in self.pending:
                continue
            job.awaiting_victims = {v for v in job.awaiting_victims if self.jobs[v].state in HOLDS_ALLOCATION}
            before = (job.state, len(job.placements), job.pending_reason)
            placed = self._try_place(job, head)
            if not placed and head is None:
                self._try_preempt(job)
                head = job
            if (job.state, len(job.placements), job.pending_reason) != before:
                self._save(job)

    def _end(self, job: Job, state: JobState, kind: EventKind, message: str) -> None:
        self.state.free(job.job_id)
        job.state = state
        job.lease_expiry.clear()
        job.preemption_deadline = None if state != JobState.PREEMPTED else job.preemption_deadline
        self.pending.pop(job.job_id, None)
        self._emit(kind, job, message)
        self._save(job)

    def release(self, job_id: str) -> Job:
        """Release a job's allocations or withdraw it; releasing an ended job changes nothing."""
        with self.lock:
            self._check_alive()
            job = self._get(job_id)
            if job.state not in TERMINAL:
                self._end(job, JobState.RELEASED, EventKind.RELEASED, "released by its owner")
                self._schedule_pending()
            ticket = self._commit() or self.last_ticket
            snap = self.snapshot(job)
        self._durable(ticket)
        return snap

    def describe(self, job_id: str) -> Job:
        """One job."""
        with self.lock:
            return self.snapshot(self._get(job_id))

    def list_jobs(self, tenant: str = "", state: JobState | None = None) -> list[Job]:
        """Jobs in submission order, optionally filtered."""
        with self.lock:
            return [
                self.snapshot(j)
                for j in sorted(self.jobs.values(), key=lambda j: j.seq)
                if (not tenant or j.spec.tenant == tenant) and (state is None or j.state == state)
            ]

    # -- leases ----------------------------------------------------------------------------------------

    def renew(self, job_id: str, replica: int) -> Job:
        """Renew one replica's lease; returns the job (its state tells a worker about preemption)."""
        with self.lock:
            job = self._get(job_id)
            if not 0 <= replica < job.spec.replicas:
                raise InvalidArgument("replica", f"must be 0 to {job.spec.replicas - 1} (got {replica})")
            if job.state not in HOLDS_ALLOCATION:
                raise FailedPrecondition(f"job {job_id!r} holds no allocation (state {job.state.name})")
            if replica not in job.placements:
                raise FailedPrecondition(f"replica {replica} of job {job_id!r} is not placed")
            job.lease_expiry[replica] = self.clock() + job.lease_ttl_s
            return self.snapshot(job)

    def tick(self) -> list[ScaleSignal]:
        """Reclaim lapsed leases, revoke preempted jobs past their deadline, mark silent nodes, and
        evaluate scale signals. Returns the scale signals that changed. After a failed write: nothing."""
        with self.lock:
            if self._stopped():
                return []  # fail-stop: memory may be ahead of the store, so background work writes nothing
            now = self.clock()
            freed = False
            for job in list(self.jobs.values()):
                if job.state not in HOLDS_ALLOCATION:
                    continue
                if (
                    job.state == JobState.PREEMPTING
                    and job.preemption_deadline is not None
                    and job.preemption_deadline <= now
                ):
                    self._end(
                        job,
                        JobState.PREEMPTED,
                        EventKind.PREEMPTED,
                        f"allocations revoked for guaranteed job {job.preempted_by}",
                    )
                    freed = True
                    continue
                lapsed = sorted(r for r, t in job.lease_expiry.items() if t <= now)
                if lapsed:
                    self._end(
                        job,
                        JobState.LEASE_EXPIRED,
                        EventKind.LEASE_EXPIRED,
                        f"lease of replica {lapsed[0]} not renewed within {job.lease_ttl_s}s; allocations reclaimed",
                    )
                    freed = True
            if self.settings.node_ttl_s > 0:
                for name, seen in self.node_seen.items():
                    n = self.state.node_index[name]
                    alive = now - seen <= self.settings.node_ttl_s
                    if self.state.node_alive[n] != alive:
                        self.state.node_alive[n] = alive
                        freed = freed or alive
            if freed:
                self._schedule_pending()
            ticket = self._commit()
            changed: list[ScaleSignal] = []
            if self.state.gpu_count:
                changed = self.scale.evaluate(self.state, self._unplaced_demand(), now)
                if changed:
                    self.scale_seq += 1
                    self.changed.notify_all()
        self._durable(ticket)
        return changed

    # -- watching --------------------------------------------------------------------------------------

    def events_after(self, after_seq: int, limit: int = 1000, job_id: str = "") -> list[Event]:
        """Retained events with seq > ``after_seq``, oldest first."""
        if after_seq < 0:
            raise InvalidArgument("after_seq", "must be >= 0")
        if not 0 <= limit <= 10_000:
            raise InvalidArgument("limit", "must be 0 (default 1,000) to 10,000")
        limit = limit or 1000
        with self.lock:
            out = []
            for ev in self.events:
                if ev.seq > after_seq and (not job_id or ev.job_id == job_id):
                    out.append(ev)
                    if len(out) >= limit:
                        break
            return out

    def watch(self, job_id: str, stopped: Callable[[], bool]) -> Iterator[tuple[Event | None, Job]]:
        """Yield a snapshot, then (event, job) for each of the job's events until it ends or ``stopped``."""
        with self.lock:
            job = self._get(job_id)
            last = self.event_seq
            first = self.snapshot(job)
        # Yield outside the lock: the consumer may take its time, and nobody else must wait for it.
        yield None, first
        if first.state in TERMINAL:
            return
        while not stopped():
            with self.changed:
                self.changed.wait_for(partial(self._moved_past, last, stopped), timeout=1.0)
                if self.event_seq == last:
                    continue
                fresh = []
                for ev in reversed(self.events):
                    if ev.seq <= last:
                        break
                    if ev.job_id == job_id:
                        fresh.append(ev)
                last = self.event_seq
                snap = self.snapshot(self.jobs[job_id])
            for ev in reversed(fresh):
                yield ev, snap
            if fresh and snap.state in TERMINAL:
                return

    def _moved_past(self, seq: int, stopped: Callable[[], bool]) -> bool:
        return self.event_seq > seq or stopped()

    def _unplaced_demand(self, model: str = "") -> list[JobSpec]:
        """Pending jobs as specs of their replicas not yet placed (optionally those ``model`` admits)."""
        out = []
        for j in self.pending.values():
            if model and j.spec.allowed_models and model not in j.spec.allowed_models:
                continue
            missing = j.spec.replicas - len(j.placements)
            if missing > 0:
                out.append(replace(j.spec, replicas=missing))
        return out

    def wake_watchers(self) -> None:
        """Wake every waiting watcher (used when draining)."""
        with self.changed:
            self.changed.notify_all()

    def scale_signals(self, pool: str = "") -> list[ScaleSignal]:
        """Current scale recommendations."""
        with self.lock:
            return [s for p, s in sorted(self.scale.current.items()) if not pool or p == pool]

    # -- planning and checks ---------------------------------------------------------------------------

    def plan(self, shape: NodeShape, jobs: list[JobSpec]) -> CapacityPlan:
        """Capacity planning for ``jobs`` (or the pending jobs the shape's model admits)."""
        if not shape.model:
            raise InvalidArgument("shape.model", "must not be empty")
        if not 1 <= shape.gpus <= 64:
            raise InvalidArgument("shape.gpus", f"must be 1 to 64 (got {shape.gpus})")
        if not 1 <= shape.memory_mib_per_gpu <= 1_048_576:
            raise InvalidArgument("shape.memory_mib_per_gpu", "must be 1 to 1,048,576 MiB")
        for i, j in enumerate(jobs):
            try:
                j.validate()
            except InvalidArgument as exc:
                raise InvalidArgument(f"jobs[{i}].{exc.field.removeprefix('job.')}", exc.rule) from None
        with self.lock:
            if not jobs:
                jobs = self._unplaced_demand(shape.model)
            return plan_capacity(shape, copy.copy(jobs), self.settings.gpu_reserve_mib)

    def violations(self) -> list[str]:
        """Breaches of the card invariant (expected: none)."""
        with self.lock:
            return self.state.violations()

    def close(self) -> None:
        """Close the store."""
        with self.lock:
            if self.store is not None:
                self.store.close()
                self.store = None
