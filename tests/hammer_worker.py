"""A scheduler hammer: a seeded random mix of calls that checks the scheduler's invariants after every step.

Used by ``tests/test_scheduler_concurrency.py`` both as threads inside the test process
(:func:`run_worker`) and as separate processes::

    python -m tests.hammer_worker --address 127.0.0.1:PORT --seed 7 --steps 300 --prefix p0

which print one JSON object ``{"violations": [...], "stats": {...}}`` on standard output.

Every check is sound under concurrency: states only move forward (PENDING -> RUNNING -> PREEMPTING ->
terminal, or straight to a terminal state), so

* a job this process saw in a terminal state *before* it sent ListNodes must not hold a GPU in that
  ListNodes answer;
* a job holding a GPU in a ListNodes answer must, in any later read, exist and not be PENDING; and if it
  still holds an allocation then, the GPUs it held must be among its placements (all of them for a gang,
  which is placed all at once);
* within one ListJobs or DescribeJob answer (a snapshot under the scheduler's lock) a RUNNING or PREEMPTING
  gang has every replica placed and a PENDING job has no placement.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

HOLDING = {spb.JOB_STATE_RUNNING, spb.JOB_STATE_PREEMPTING}
TERMINAL = {spb.JOB_STATE_PREEMPTED, spb.JOB_STATE_RELEASED, spb.JOB_STATE_LEASE_EXPIRED}
STATE_NAME = {v: k for k, v in spb.JobState.items()}

#: Cluster shape the hammer expects (the tests register it): nodes x GPUs of this much memory.
GPU_MEMORY_MIB = 40960
#: Jobs a worker keeps alive at most; above it the worker releases instead of submitting.
LIVE_CAP = 3
#: Short lease TTLs (seconds): half of the jobs given one are never renewed, the others now and then.
SHORT_TTLS = (1, 2)
#: A call's deadline: one that runs out is a violation, so it is a wait for a loaded machine, not a speed check.
RPC_TIMEOUT_S = 60.0


def state_name(state: int) -> str:
    """Readable job state."""
    return STATE_NAME.get(state, str(state))


@dataclass
class Worker:
    """One hammering client. ``known_terminal`` may be shared by the workers of one process."""

    stub: spb_grpc.SchedulerServiceStub
    seed: int
    prefix: str
    reserve_mib: int
    known_terminal: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.count = 0
        self.specs: dict[str, spb.JobSpec] = {}
        self.first_seen: dict[str, spb.Job] = {}
        self.live: list[str] = []
        self.step_no = 0
        self.seconds = 0.0
        #: Jobs whose leases this worker renews (the others are left to lapse).
        self.renewed: set[str] = set()
        #: Latest lease deadline seen per "job/replica" in any answer: the lease cannot lapse before it.
        self.lease_seen: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------------------

    def bad(self, what: str) -> None:
        self.violations.append(f"[{self.prefix} step {self.step_no}] {what}")

    def call(self, method: str, request: object, *, ok: tuple[grpc.StatusCode, ...] = ()) -> Any:
        """Call ``method``; return the response, or None for an expected error code; record anything else."""
        try:
            return getattr(self.stub, method)(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as err:
            code = err.code()
            if code in ok:
                self.stats[f"{method}:{code.name}"] += 1
                return None
            self.bad(f"{method}({str(request).strip()!r}) failed: {code.name} {err.details()}")
            return None

    def learn(self, job: spb.Job) -> None:
        """Remember what one job message says, and check what a single snapshot of a job must satisfy."""
        self.check_job(job, "snapshot")
        jid = job.spec.job_id
        for p in job.placements:
            if p.HasField("lease_expires_at"):
                self.saw_lease(jid, p.replica, p.lease_expires_at)
        if job.state in TERMINAL:
            self.known_terminal[jid] = job.state
            if jid in self.live:
                self.live.remove(jid)

    def saw_lease(self, jid: str, replica: int, at: Any) -> None:
        key = f"{jid}/{replica}"
        self.lease_seen[key] = max(self.lease_seen.get(key, 0.0), at.seconds + at.nanos / 1e9)

    def check_job(self, job: spb.Job, where: str) -> None:
        jid = job.spec.job_id
        spec = job.spec
        n = len(job.placements)
        if job.state in HOLDING:
            if spec.gang and n != spec.replicas:
                self.bad(f"{where}: gang {jid} is {state_name(job.state)} with {n} of {spec.replicas} replicas placed")
            if n == 0:
                self.bad(f"{where}: {jid} is {state_name(job.state)} without any placement")
        if job.state == spb.JOB_STATE_PENDING and n:
            self.bad(f"{where}: {jid} is PENDING but has {n} placement(s)")
        if job.state == spb.JOB_STATE_PREEMPTING and (not job.HasField("preemption_deadline") or not job.preempted_by):
            self.bad(f"{where}: {jid} is PREEMPTING without a deadline or preempting job")
        if job.state in (spb.JOB_STATE_PREEMPTING, spb.JOB_STATE_PREEMPTED) and spec.qos == spb.QOS_CLASS_GUARANTEED:
            self.bad(f"{where}: guaranteed job {jid} was chosen as a preemption victim")
        if job.state in HOLDING:
            self.check_placements(job, where)

    def check_placements(self, job: spb.Job, where: str) -> None:
        spec = job.spec
        jid = spec.job_id
        seen: set[str] = set()
        for p in job.placements:
            if len({g.uuid for g in p.gpus}) != len(p.gpus):
                self.bad(f"{where}: {jid} replica {p.replica} got one GPU twice: {[g.uuid for g in p.gpus]}")
            if not 0 <= p.replica < spec.replicas:
                self.bad(f"{where}: {jid} has a placement of replica {p.replica}")
            if len(p.gpus) != spec.gpus_per_replica:
                self.bad(f"{where}: {jid} replica {p.replica} has {len(p.gpus)} GPUs, asked {spec.gpus_per_replica}")
            groups = set()
            for g in p.gpus:
                if g.uuid in seen and not spec.allow_sharing:
                    self.bad(f"{where}: exclusive {jid} holds GPU {g.uuid} for two replicas")
                seen.add(g.uuid)
                if not g.uuid.startswith(f"GPU-{p.node}-"):
                    self.bad(f"{where}: {jid} replica {p.replica} on node {p.node} got GPU {g.uuid} of another node")
                if spec.WhichOneof("gpu_memory") == "memory_mib_per_gpu":
                    want = spec.memory_mib_per_gpu
                else:
                    want = max((GPU_MEMORY_MIB - self.reserve_mib) * spec.gpu_share_milli // 1000, 1)
                if g.memory_cap_mib != want:
                    self.bad(f"{where}: {jid} replica {p.replica} cap {g.memory_cap_mib} MiB, expected {want}")
                groups.add(g.topology_group)
            if spec.topology == spb.TOPOLOGY_PREFERENCE_REQUIRED and len(groups) > 1:
                self.bad(f"{where}: {jid} requires one topology group but replica {p.replica} spans {groups}")

    # -- the workload ----------------------------------------------------------------------------------

    def new_spec(self) -> spb.JobSpec:
        rng = self.rng
        self.count += 1
        spec = spb.JobSpec(
            job_id=f"{self.prefix}-{self.count}",
            tenant=self.prefix,
            replicas=1,
            gpus_per_replica=1,
            topology=spb.TOPOLOGY_PREFERENCE_PREFERRED,
        )
        kind = rng.choice(
            [
                "excl-mem",
                "excl-multi",
                "gang",
                "gang",
                "shared-mem",
                "shared-mem",
                "shared-share",
                "shared-share",
                "excl-share",
                "multi-replica",
            ]
        )
        if kind == "excl-mem":
            spec.memory_mib_per_gpu = rng.choice([8192, 20000, GPU_MEMORY_MIB - self.reserve_mib])
        elif kind == "excl-multi":
            spec.gpus_per_replica = 2
            if rng.random() < 0.5:
                spec.memory_mib_per_gpu = 16384
            else:
                spec.gpu_share_milli = 1000
            spec.topology = rng.choice(
                [spb.TOPOLOGY_PREFERENCE_PREFERRED, spb.TOPOLOGY_PREFERENCE_REQUIRED, spb.TOPOLOGY_PREFERENCE_NONE]
            )
        elif kind == "gang":
            spec.gang = True
            spec.replicas = rng.choice([2, 3])
            spec.gpus_per_replica = rng.choice([1, 1, 2])
            spec.allow_sharing = spec.gpus_per_replica == 1 and rng.random() < 0.4
            if spec.allow_sharing and rng.random() < 0.5:
                spec.gpu_share_milli = rng.choice([250, 500])
            else:
                spec.memory_mib_per_gpu = rng.choice([4096, 12000, 30000])
            spec.topology = rng.choice([spb.TOPOLOGY_PREFERENCE_PREFERRED, spb.TOPOLOGY_PREFERENCE_REQUIRED])
        elif kind == "shared-mem":
            spec.allow_sharing = True
            spec.memory_mib_per_gpu = rng.choice([2048, 4096, 10000, 20224])
        elif kind == "shared-share":
            spec.allow_sharing = True
            spec.gpu_share_milli = rng.choice([125, 250, 333, 500, 1000])
        elif kind == "excl-share":
            spec.gpus_per_replica = rng.choice([1, 2])
            spec.gpu_share_milli = 1000 if spec.gpus_per_replica == 2 else rng.choice([500, 1000])
        else:  # multi-replica, not a gang: replicas are placed as room appears
            spec.replicas = rng.choice([2, 3])
            spec.allow_sharing = rng.random() < 0.5
            spec.memory_mib_per_gpu = rng.choice([8192, 16384])
        r = rng.random()
        spec.qos = (
            spb.QOS_CLASS_GUARANTEED
            if r < 0.15
            else (spb.QOS_CLASS_BURSTABLE if r < 0.55 else spb.QOS_CLASS_BEST_EFFORT)
        )
        spec.priority = rng.randint(-5, 5)
        if rng.random() < 0.3:
            spec.lease_ttl_s = rng.choice(SHORT_TTLS)  # lapses unless renewed: the reaper races the clients
        if spec.lease_ttl_s == 0 or rng.random() < 0.5:
            self.renewed.add(spec.job_id)
        self.stats[f"kind:{kind}"] += 1
        return spec

    def op_submit(self) -> None:
        spec = self.new_spec()
        resp = self.call("SubmitJob", spb.SubmitJobRequest(job=spec))
        self.stats["submit"] += 1
        if resp is None:
            return
        job = resp.job
        self.specs[spec.job_id] = spec
        self.first_seen[spec.job_id] = job
        if job.spec != spec:
            self.bad(f"SubmitJob echoed a different spec for {spec.job_id}")
        if job.state not in (spb.JOB_STATE_PENDING, spb.JOB_STATE_RUNNING):
            self.bad(f"SubmitJob returned {spec.job_id} in state {state_name(job.state)}")
        if job.state == spb.JOB_STATE_PENDING and not job.pending_reason:
            self.bad(f"SubmitJob left {spec.job_id} PENDING without a reason")
        self.stats[f"submitted:{state_name(job.state)}"] += 1
        self.live.append(spec.job_id)
        self.learn(job)

    def op_release(self) -> None:
        if not self.live:
            return
        jid = self.rng.choice(self.live)
        resp = self.call("ReleaseJob", spb.ReleaseJobRequest(job_id=jid))
        self.stats["release"] += 1
        if resp is None:
            return
        if resp.job.state not in TERMINAL:
            self.bad(f"ReleaseJob left {jid} in state {state_name(resp.job.state)}")
        self.stats[f"released:{state_name(resp.job.state)}"] += 1
        self.learn(resp.job)
        if jid in self.live:
            self.live.remove(jid)

    def op_renew(self) -> None:
        renewable = [j for j in self.live if j in self.renewed]
        if not renewable:
            return
        jid = self.rng.choice(renewable)
        replica = self.rng.randrange(self.specs[jid].replicas)
        resp = self.call(
            "RenewLease", spb.RenewLeaseRequest(job_id=jid, replica=replica), ok=(grpc.StatusCode.FAILED_PRECONDITION,)
        )
        self.stats["renew"] += 1
        if resp is None:
            self.op_describe(jid)
            return
        if resp.state not in HOLDING:
            self.bad(f"RenewLease of {jid} succeeded in state {state_name(resp.state)}")
        self.saw_lease(jid, replica, resp.lease_expires_at)
        if resp.state == spb.JOB_STATE_PREEMPTING:
            self.stats["renew:preempting"] += 1
            if not resp.HasField("preemption_deadline"):
                self.bad(f"RenewLease of preempting {jid} carries no deadline")
            if self.rng.random() < 0.5:  # a cooperative worker checkpoints and gives its GPUs back
                rel = self.call("ReleaseJob", spb.ReleaseJobRequest(job_id=jid))
                if rel is not None:
                    if rel.job.state not in TERMINAL:
                        self.bad(f"ReleaseJob of preempting {jid} left it {state_name(rel.job.state)}")
                    self.stats["released-on-notice"] += 1
                    self.learn(rel.job)

    def op_describe(self, jid: str | None = None) -> None:
        if jid is None:
            if not self.specs:
                return
            jid = self.rng.choice(list(self.specs))
        resp = self.call("DescribeJob", spb.DescribeJobRequest(job_id=jid))
        self.stats["describe"] += 1
        if resp is None:
            return
        job = resp.job
        if job.spec != self.specs[jid]:
            self.bad(f"DescribeJob returned a different spec for {jid}")
        if jid in self.known_terminal and job.state != self.known_terminal[jid]:
            self.bad(f"{jid} left terminal state {state_name(self.known_terminal[jid])} for {state_name(job.state)}")
        self.stats[f"described:{state_name(job.state)}"] += 1
        self.learn(job)

    def op_resubmit(self) -> None:
        if not self.specs:
            return
        jid = self.rng.choice(list(self.specs))
        spec = self.specs[jid]
        resp = self.call("SubmitJob", spb.SubmitJobRequest(job=spec))
        self.stats["resubmit"] += 1
        if resp is not None:
            if resp.job.submitted_at != self.first_seen[jid].submitted_at:
                self.bad(f"idempotent resubmit of {jid} created a new job")
            self.learn(resp.job)
        other = spb.JobSpec()
        other.CopyFrom(spec)
        other.priority = spec.priority + 1 if spec.priority < 1000 else spec.priority - 1
        if self.call("SubmitJob", spb.SubmitJobRequest(job=other), ok=(grpc.StatusCode.ALREADY_EXISTS,)) is not None:
            self.bad(f"a different spec under the id {jid} was accepted")

    def step(self) -> None:
        self.step_no += 1
        if len(self.live) >= LIVE_CAP:
            op = self.rng.choice([self.op_release, self.op_release, self.op_renew, self.op_describe])
        else:
            op = self.rng.choices(
                [self.op_submit, self.op_release, self.op_renew, self.op_describe, self.op_resubmit],
                weights=[40, 15, 25, 15, 5],
            )[0]
        op()
        self.check()

    # -- the invariant check after every step ----------------------------------------------------------

    def check(self) -> None:
        terminal_before = self.known_terminal.copy()
        nodes = self.call("ListNodes", spb.ListNodesRequest())
        if nodes is None:
            return
        self.stats["checks"] += 1
        for v in check_card_invariant(nodes, self.reserve_mib):
            self.bad(f"card invariant: {v}")
        on_gpu: dict[str, set[tuple[int, str, int]]] = {}
        for node in nodes.nodes:
            for gpu in node.gpus:
                for a in gpu.allocations:
                    on_gpu.setdefault(a.job_id, set()).add((a.replica, gpu.device.uuid, a.memory_cap_mib))
                    if a.replica < 0:
                        self.bad(f"{a.job_id} holds {gpu.device.uuid} as replica {a.replica}")
        for jid in on_gpu:
            if jid in terminal_before:
                self.bad(f"{jid} holds GPUs {sorted(on_gpu[jid])} after it was seen {state_name(terminal_before[jid])}")
        after: dict[str, spb.Job] = {}
        # Two ListJobs cover most holders; the few others (just ended) are described one by one.
        for state in (spb.JOB_STATE_RUNNING, spb.JOB_STATE_PREEMPTING):
            resp = self.call("ListJobs", spb.ListJobsRequest(state=state))
            if resp is None:
                return
            for job in resp.jobs:
                if job.state != state:
                    self.bad(
                        f"ListJobs(state={state_name(state)}) returned {job.spec.job_id} in {state_name(job.state)}"
                    )
                self.check_job(job, "ListJobs")
                after.setdefault(job.spec.job_id, job)
        for jid, held in on_gpu.items():
            job = after.get(jid)
            if job is None:
                resp = self.call("DescribeJob", spb.DescribeJobRequest(job_id=jid))
                if resp is None:
                    self.bad(f"{jid} holds GPUs but cannot be described")
                    continue
                job = resp.job
                self.check_job(job, "DescribeJob")
            if job.state == spb.JOB_STATE_PENDING:
                self.bad(f"{jid} held GPUs {sorted(held)} and is PENDING afterwards")
            if job.state in HOLDING:
                placed = {(p.replica, g.uuid, g.memory_cap_mib) for p in job.placements for g in p.gpus}
                if not held <= placed:
                    self.bad(f"{jid} held {sorted(held - placed)} outside its placements {sorted(placed)}")
                if job.spec.gang and held != placed:
                    self.bad(f"gang {jid} held {sorted(held)} but its placements are {sorted(placed)}")


def check_card_invariant(nodes: spb.ListNodesResponse, reserve_mib: int) -> list[str]:
    """``tests.conftest.check_invariant``, importable without the test package's fixtures."""
    from tests.conftest import check_invariant

    return check_invariant(nodes, reserve_mib)


def run_worker(
    address: str,
    seed: int,
    steps: int,
    prefix: str,
    reserve_mib: int,
    known_terminal: dict[str, int] | None = None,
    start: threading.Event | None = None,
) -> Worker:
    """Run one worker for ``steps`` steps on its own channel; return it with its violations and stats."""
    channel = grpc.insecure_channel(address)
    try:
        worker = Worker(
            spb_grpc.SchedulerServiceStub(channel),
            seed,
            prefix,
            reserve_mib,
            {} if known_terminal is None else known_terminal,
        )
        if start is not None:
            start.wait()
        began = time.monotonic()
        for _ in range(steps):
            try:
                worker.step()
            except Exception as exc:  # a crash in the worker is a finding too, not a silent stop
                worker.bad(f"worker raised {type(exc).__name__}: {exc}")
        worker.seconds = round(time.monotonic() - began, 3)
        return worker
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    """Process entry point: run one worker and print its report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--reserve-mib", type=int, default=512)
    args = parser.parse_args(argv)
    worker = run_worker(args.address, args.seed, args.steps, args.prefix, args.reserve_mib)
    report = {
        "violations": worker.violations,
        "stats": dict(worker.stats),
        "seconds": worker.seconds,
        "lease_seen": worker.lease_seen,
    }
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
