"""Concurrency: many clients (threads here and separate processes) hammer one scheduler over real gRPC.

Each client runs a seeded random mix of SubmitJob (exclusive and shared, memory- and share-based, gangs,
every QoS class, guaranteed jobs that preempt), ReleaseJob, RenewLease and DescribeJob, and checks the card
invariant and the job/GPU consistency after every step (see ``tests/hammer_worker.py``). Some jobs carry a
1-2 s lease (half of them never renewed, the others now and then) and the preemption grace is 0.3 s, so
lease reclaims and revocations by the reaper race with the clients; a node agent re-registers nodes and
reports usage meanwhile. At the end the test quiesces the scheduler and checks the whole state, the event
log, and that no lease was reclaimed before the latest deadline a client was given for it.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import cast

import grpc
import pytest

from guardmesh.runtime import load_definition, start_service
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from services.scheduler.server import SchedulerBinding
from tests.conftest import REPO, check_invariant, make_config, node_pb
from tests.hammer_worker import GPU_MEMORY_MIB, HOLDING, SHORT_TTLS, TERMINAL, Worker, run_worker, state_name

RESERVE_MIB = 512
THREADS = 16
THREAD_STEPS = 50
PROCESSES = 3
PROCESS_STEPS = 100
DEFAULT_TTL_S = 600  # longer than the whole run: a job that is not given a short lease must never expire
#: How long the threads and processes may take together: a wait, not a speed check (a loaded 2-core machine).
HAMMER_WAIT_S = 300

TERMINAL_EVENT = {
    spb.EVENT_KIND_PREEMPTED: spb.JOB_STATE_PREEMPTED,
    spb.EVENT_KIND_RELEASED: spb.JOB_STATE_RELEASED,
    spb.EVENT_KIND_LEASE_EXPIRED: spb.JOB_STATE_LEASE_EXPIRED,
}


def _all_events(stub: spb_grpc.SchedulerServiceStub) -> list[spb.Event]:
    out: list[spb.Event] = []
    while True:
        after = out[-1].seq if out else 0
        page = stub.ListEvents(spb.ListEventsRequest(after_seq=after, limit=10_000), timeout=30).events
        if not page:
            return out
        out.extend(page)


def _on_gpu(nodes: spb.ListNodesResponse) -> dict[str, set[tuple[int, str, int]]]:
    held: dict[str, set[tuple[int, str, int]]] = {}
    for node in nodes.nodes:
        for gpu in node.gpus:
            for a in gpu.allocations:
                held.setdefault(a.job_id, set()).add((a.replica, gpu.device.uuid, a.memory_cap_mib))
    return held


def _quiesce(stub: spb_grpc.SchedulerServiceStub, deadline_s: float) -> list[str]:
    """Withdraw pending jobs, then wait until no revocation or short lease is left to reclaim."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for job in stub.ListJobs(spb.ListJobsRequest(state=spb.JOB_STATE_PENDING), timeout=30).jobs:
            stub.ReleaseJob(spb.ReleaseJobRequest(job_id=job.spec.job_id), timeout=30)
        left = [
            f"{j.spec.job_id} {state_name(j.state)} (lease {j.spec.lease_ttl_s}s)"
            for j in stub.ListJobs(spb.ListJobsRequest(), timeout=30).jobs
            if j.state == spb.JOB_STATE_PENDING
            or j.state == spb.JOB_STATE_PREEMPTING
            or (j.state == spb.JOB_STATE_RUNNING and j.spec.lease_ttl_s in SHORT_TTLS)
        ]
        if not left:
            return []
        time.sleep(0.1)
    return left


@pytest.mark.timeout(600)
def test_hammer_from_threads_and_processes(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        **{
            "scheduler.gpu_reserve_mib": RESERVE_MIB,
            "scheduler.preemption_grace_s": 0.3,
            "scheduler.lease_ttl_s": DEFAULT_TTL_S,
            "scheduler.reap_interval_s": 0.05,
            # Durability is tested in test_scheduler_durability.py; here fewer fsyncs mean more interleavings.
            "scheduler.sqlite_synchronous": "NORMAL",
        },
    )
    running = start_service(load_definition("scheduler"), config, port=0)
    channel = grpc.insecure_channel(running.address)
    stub = spb_grpc.SchedulerServiceStub(channel)
    procs: list[subprocess.Popen[str]] = []
    began = time.monotonic()
    try:
        # 3 nodes x 4 cards; two nodes have NVLink pairs, one has no topology information.
        for name, group in (("node-a", 2), ("node-b", 2), ("node-c", 0)):
            stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb(name, 4, GPU_MEMORY_MIB, group_size=group)))

        for i in range(PROCESSES):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.hammer_worker",
                        "--address",
                        running.address,
                        "--seed",
                        str(1000 + i),
                        "--steps",
                        str(PROCESS_STEPS),
                        "--prefix",
                        f"p{i}",
                        "--reserve-mib",
                        str(RESERVE_MIB),
                    ],
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )

        # A node agent re-registers nodes (flipping a label) and reports usage while the clients hammer.
        agent_errors: list[str] = []
        agent_stop = threading.Event()
        agent_rounds = [0]

        def agent() -> None:
            rng = random.Random(99)
            while not agent_stop.wait(0.15):
                name, group = rng.choice((("node-a", 2), ("node-b", 2), ("node-c", 0)))
                node = node_pb(name, 4, GPU_MEMORY_MIB, group_size=group, rack=str(agent_rounds[0] % 2))
                usage = [
                    spb.GpuUsage(uuid=g.uuid, used_memory_mib=rng.choice([0, 1024, 4096]), utilization=rng.random())
                    for g in node.gpus
                ]
                try:
                    stub.RegisterNode(spb.RegisterNodeRequest(node=node), timeout=30)
                    stub.ReportNodeStatus(spb.ReportNodeStatusRequest(node=name, gpus=usage), timeout=30)
                except grpc.RpcError as err:
                    agent_errors.append(f"node agent: {err.code().name} {err.details()}")
                    return
                agent_rounds[0] += 1

        agent_thread = threading.Thread(target=agent, name="node-agent")
        agent_thread.start()

        known_terminal: dict[str, int] = {}
        start = threading.Event()
        workers: list[Worker | BaseException] = [RuntimeError("did not finish")] * THREADS

        def run(i: int) -> None:
            try:
                workers[i] = run_worker(running.address, i, THREAD_STEPS, f"t{i}", RESERVE_MIB, known_terminal, start)
            except BaseException as exc:
                workers[i] = exc

        threads = [threading.Thread(target=run, args=(i,), name=f"hammer-{i}") for i in range(THREADS)]
        for t in threads:
            t.start()
        start.set()
        joined_by = time.monotonic() + HAMMER_WAIT_S
        for t in threads:
            t.join(timeout=max(0.0, joined_by - time.monotonic()))
        agent_stop.set()
        agent_thread.join(timeout=30)

        violations: list[str] = list(agent_errors)
        stats: Counter[str] = Counter()
        lease_seen: dict[str, float] = {}
        for i, w in enumerate(workers):
            if isinstance(w, BaseException):
                violations.append(f"thread {i}: {type(w).__name__}: {w}")
            else:
                violations.extend(w.violations)
                stats.update(w.stats)
                lease_seen.update(w.lease_seen)
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=max(30.0, joined_by - time.monotonic()))
            if p.returncode != 0:
                violations.append(f"process {i} exited {p.returncode}: {err[-2000:]}")
                continue
            report = json.loads(out.strip().splitlines()[-1])
            violations.extend(report["violations"])
            stats.update(report["stats"])
            lease_seen.update(report["lease_seen"])
        hammer_s = time.monotonic() - began
        # Idle cards report no use again, so that the final state is judged on allocations alone.
        for node in stub.ListNodes(spb.ListNodesRequest(), timeout=30).nodes:
            stub.ReportNodeStatus(
                spb.ReportNodeStatusRequest(
                    node=node.spec.name,
                    gpus=[spb.GpuUsage(uuid=g.device.uuid, used_memory_mib=0, utilization=0.0) for g in node.gpus],
                ),
                timeout=30,
            )

        # -- quiesce, then check the whole state strictly --------------------------------------------------
        left = _quiesce(stub, deadline_s=60.0)
        assert not left, f"still pending, preempting or holding a short lease after the run: {left[:10]}"
        jobs = {j.spec.job_id: j for j in stub.ListJobs(spb.ListJobsRequest(), timeout=30).jobs}
        nodes = stub.ListNodes(spb.ListNodesRequest(), timeout=30)
        violations.extend(f"final card invariant: {v}" for v in check_invariant(nodes, RESERVE_MIB))
        violations.extend(
            f"final core invariant: {v}" for v in cast(SchedulerBinding, running.binding).servicer.core.violations()
        )
        held = _on_gpu(nodes)
        for jid, job in jobs.items():
            placed = {(p.replica, g.uuid, g.memory_cap_mib) for p in job.placements for g in p.gpus}
            if job.state in HOLDING:
                if held.get(jid, set()) != placed:
                    violations.append(
                        f"final: {jid} {state_name(job.state)} placements {sorted(placed)} "
                        f"but holds {sorted(held.get(jid, set()))}"
                    )
                if job.spec.gang and len(job.placements) != job.spec.replicas:
                    violations.append(f"final: gang {jid} runs with {len(job.placements)}/{job.spec.replicas}")
            elif jid in held:
                violations.append(f"final: {jid} is {state_name(job.state)} but holds {sorted(held[jid])}")
            if job.state == spb.JOB_STATE_LEASE_EXPIRED and job.spec.lease_ttl_s == 0:
                violations.append(f"final: {jid} lost its {DEFAULT_TTL_S}s lease during a shorter run")
            if job.state == spb.JOB_STATE_PREEMPTED:
                by = jobs.get(job.preempted_by)
                if by is None or by.spec.qos != spb.QOS_CLASS_GUARANTEED:
                    violations.append(f"final: {jid} preempted by {job.preempted_by!r}, not a guaranteed job")
        for jid in held:
            if jid not in jobs:
                violations.append(f"final: unknown job {jid} holds GPUs")

        # -- the event log: gap-free, one terminal event per job, last, matching the job's state ------------
        events = _all_events(stub)
        seqs = [e.seq for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            gaps = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))[:10]
            violations.append(f"event sequence is not 1..{len(seqs)} without gaps (missing {gaps})")
        per_job: dict[str, list[spb.Event]] = {}
        for e in events:
            per_job.setdefault(e.job_id, []).append(e)
        for jid, evs in per_job.items():
            kinds = [e.kind for e in evs]
            job = jobs.get(jid)
            if job is None:
                violations.append(f"events for unknown job {jid}")
                continue
            if kinds[0] not in (spb.EVENT_KIND_PENDING, spb.EVENT_KIND_PLACED):
                violations.append(f"{jid}: first event is {spb.EventKind.Name(kinds[0])}")
            ends = [k for k in kinds if k in TERMINAL_EVENT]
            if len(ends) > 1 or (ends and kinds[-1] != ends[0]):
                violations.append(f"{jid}: events {[spb.EventKind.Name(k) for k in kinds]}")
            if job.state in TERMINAL and (not ends or TERMINAL_EVENT[ends[0]] != job.state):
                violations.append(
                    f"{jid}: ended {state_name(job.state)} but its events are {[spb.EventKind.Name(k) for k in kinds]}"
                )
            if spb.EVENT_KIND_PREEMPTED in kinds and spb.EVENT_KIND_PREEMPTION_NOTICE not in kinds:
                violations.append(f"{jid}: revoked without a preemption notice")
        # A lease is never reclaimed before the latest deadline any client was given for it.
        for e in events:
            if e.kind != spb.EVENT_KIND_LEASE_EXPIRED:
                continue
            m = re.search(r"replica (\d+)", e.message)
            if m is None:
                violations.append(f"{e.job_id}: lease expiry does not name the replica: {e.message!r}")
                continue
            promised = lease_seen.get(f"{e.job_id}/{m.group(1)}", 0.0)
            at = e.at.seconds + e.at.nanos / 1e9
            if at < promised - 1e-3:
                violations.append(
                    f"{e.job_id}: lease of replica {m.group(1)} reclaimed at {at:.3f}, "
                    f"before its deadline {promised:.3f}"
                )
        for jid in jobs:
            if jid not in per_job:
                violations.append(f"{jid} has no event at all")

        assert not violations, f"{len(violations)} violation(s), first ones:\n" + "\n".join(violations[:40])

        # -- the run must really have raced what it claims to race -----------------------------------------
        kind_counts = Counter(spb.EventKind.Name(e.kind) for e in events)
        gangs_placed = {e.job_id for e in events if e.kind == spb.EVENT_KIND_PLACED and jobs[e.job_id].spec.gang}
        shared_placed = {
            e.job_id for e in events if e.kind == spb.EVENT_KIND_PLACED and jobs[e.job_id].spec.allow_sharing
        }
        clients = {jid.split("-")[0] for jid in jobs}
        summary = (
            f"{hammer_s:.1f}s, {agent_rounds[0]} node agent rounds, events {dict(kind_counts)}, stats {dict(stats)}"
        )
        print(summary)
        assert clients == {f"t{i}" for i in range(THREADS)} | {f"p{i}" for i in range(PROCESSES)}, summary
        assert stats["checks"] >= THREADS * THREAD_STEPS + PROCESSES * PROCESS_STEPS, summary
        assert agent_rounds[0] >= 10, summary
        assert kind_counts["EVENT_KIND_PREEMPTION_NOTICE"] > 0, summary
        assert kind_counts["EVENT_KIND_PREEMPTED"] > 0, summary
        assert kind_counts["EVENT_KIND_LEASE_EXPIRED"] > 0, summary
        assert kind_counts["EVENT_KIND_RELEASED"] > 0, summary
        assert gangs_placed and shared_placed, summary
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        channel.close()
        running.stop(grace=1.0)
