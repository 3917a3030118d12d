"""Durability and drain of the real scheduler process (``python -m services.scheduler``).

* kill -9 right after acknowledged submits and releases (one of them while another thread is submitting),
  restart on the same state folder: every acknowledged placement, release and pending job is back with the
  same nodes and GPUs, nothing acknowledged is lost, the event log continues its sequence, the card
  invariant holds, and every lease starts a fresh TTL;
* SIGTERM during a burst of submits and slow submits: in-flight calls complete, a WatchJob stream ends,
  health turns NOT_SERVING, the process exits 0, and every acknowledged submit is there after a restart;
* a bad configuration value makes the process exit with code 2 naming the key.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from tests.conftest import REPO, check_invariant, node_pb
from tests.processes import START_TIMEOUT_S, ServiceProcess

RESERVE_MIB = 512
#: Lease of the short jobs and the preemption grace in the kill -9 test: long enough to survive the steps
#: before the kill, and the checks after the restart, on a loaded 2-core machine (4 s was not: a few dozen
#: calls there can take that long); shorter than the time the scheduler stays down.
SHORT_TTL_S = 10
GRACE_S = 10
MODEL = "A100-40GB"
GPU_MIB = 40960
CLUSTER_TOML = f"""
[[nodes]]
name = "node-a"
model = "{MODEL}"
gpus = 4
memory_mib = {GPU_MIB}
nvlink_group_size = 2

[[nodes]]
name = "node-b"
model = "{MODEL}"
gpus = 4
memory_mib = {GPU_MIB}
nvlink_group_size = 2

[[nodes]]
name = "node-c"
model = "{MODEL}"
gpus = 4
memory_mib = {GPU_MIB}
"""
T4_TOML = """
[[nodes]]
name = "node-t"
model = "T4"
gpus = 16
memory_mib = 16384
"""


class SchedulerProcess(ServiceProcess):
    """The scheduler as a child process on a fixed port and state folder, restartable."""

    def __init__(self, tmp_path: Path, cluster_toml: str = CLUSTER_TOML, **env: str) -> None:
        cluster = tmp_path / "cluster.toml"
        cluster.write_text(cluster_toml)
        super().__init__(
            "scheduler",
            tmp_path,
            {
                "GUARDMESH__SCHEDULER__CLUSTER_FILE": str(cluster),
                "GUARDMESH__SCHEDULER__REAP_INTERVAL_S": "0.05",
                "GUARDMESH__SCHEDULER__GPU_RESERVE_MIB": str(RESERVE_MIB),
                "GUARDMESH__GRPC__GRACE_S": "8",
                **env,
            },
        )

    def serve(self, timeout_s: float = START_TIMEOUT_S) -> spb_grpc.SchedulerServiceStub:
        """Spawn the process and wait until health says SERVING; return a stub on a fresh channel."""
        self.start(timeout_s)
        return spb_grpc.SchedulerServiceStub(self.channel())


@pytest.fixture
def scheduler_process(tmp_path: Path) -> Iterator[SchedulerProcess]:
    sched = SchedulerProcess(tmp_path, GUARDMESH__SCHEDULER__PREEMPTION_GRACE_S=str(GRACE_S))
    yield sched
    sched.close()


def job(
    job_id: str, *, mem: int | None = None, share: int | None = None, replicas: int = 1, gpus: int = 1, **kw: Any
) -> spb.JobSpec:
    kw.setdefault("qos", spb.QOS_CLASS_BURSTABLE)
    kw.setdefault("topology", spb.TOPOLOGY_PREFERENCE_PREFERRED)
    spec = spb.JobSpec(job_id=job_id, tenant="durability", replicas=replicas, gpus_per_replica=gpus, **kw)
    if mem is not None:
        spec.memory_mib_per_gpu = mem
    else:
        spec.gpu_share_milli = share or 1000
    return spec


Where = list[tuple[int, str, tuple[tuple[str, int, int, str], ...]]]


def where(j: spb.Job) -> Where:
    """A job's placements as comparable values: replica, node, and per GPU its uuid, index, cap, group."""
    return sorted(
        (p.replica, p.node, tuple((g.uuid, g.index, g.memory_cap_mib, g.topology_group) for g in p.gpus))
        for p in j.placements
    )


def ts(t: object) -> float:
    return t.seconds + t.nanos / 1e9  # type: ignore[attr-defined]


def all_events(stub: spb_grpc.SchedulerServiceStub, after: int = 0) -> list[spb.Event]:
    return list(stub.ListEvents(spb.ListEventsRequest(after_seq=after, limit=10_000), timeout=10).events)


def assert_consistent(stub: spb_grpc.SchedulerServiceStub) -> dict[str, spb.Job]:
    """Card invariant, and GPUs held by exactly the placements of running or preempting jobs."""
    nodes = stub.ListNodes(spb.ListNodesRequest(), timeout=10)
    jobs = {j.spec.job_id: j for j in stub.ListJobs(spb.ListJobsRequest(), timeout=10).jobs}
    assert check_invariant(nodes, RESERVE_MIB) == []
    held: dict[str, set[tuple[int, str, int]]] = {}
    for n in nodes.nodes:
        for g in n.gpus:
            for a in g.allocations:
                held.setdefault(a.job_id, set()).add((a.replica, g.device.uuid, a.memory_cap_mib))
    for jid, j in jobs.items():
        placed = {(p.replica, g.uuid, g.memory_cap_mib) for p in j.placements for g in p.gpus}
        if j.state in (spb.JOB_STATE_RUNNING, spb.JOB_STATE_PREEMPTING):
            assert held.get(jid, set()) == placed, f"{jid}: holds {held.get(jid)} but placed {placed}"
            if j.spec.gang:
                assert len(j.placements) == j.spec.replicas, jid
        else:
            assert jid not in held, f"{jid} is {spb.JobState.Name(j.state)} but holds {held[jid]}"
    assert set(held) <= set(jobs)
    return jobs


def assert_events_continue(before: list[spb.Event], after: list[spb.Event]) -> None:
    """The log after a restart starts with exactly the events seen before it and has no gap."""
    assert [e.seq for e in after] == list(range(1, len(after) + 1))
    assert len(after) >= len(before)
    assert after[: len(before)] == before


# -- kill -9 ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)  # three process starts of up to START_TIMEOUT_S each on a loaded machine
def test_kill9_keeps_every_acknowledged_change(scheduler_process: SchedulerProcess) -> None:
    sched = scheduler_process
    stub = sched.serve()
    expect: dict[str, spb.Job] = {}  # the last acknowledged view of every job

    def submit(spec: spb.JobSpec) -> spb.Job:
        got = stub.SubmitJob(spb.SubmitJobRequest(job=spec), timeout=10).job
        expect[spec.job_id] = got
        return got

    def release(job_id: str) -> spb.Job:
        got = stub.ReleaseJob(spb.ReleaseJobRequest(job_id=job_id), timeout=10).job
        assert got.state == spb.JOB_STATE_RELEASED
        expect[job_id] = got
        return got

    # 12 cards: gang 2x2, victim 2, excl 3, short 2, and one card shared by two jobs.
    running = [
        submit(job("gang", mem=30000, replicas=2, gpus=2, gang=True, topology=spb.TOPOLOGY_PREFERENCE_REQUIRED)),
        submit(job("victim", mem=16384, gpus=2, qos=spb.QOS_CLASS_BEST_EFFORT)),
        *(submit(job(f"excl-{i}", mem=20000)) for i in range(3)),
        *(submit(job(f"short-{i}", mem=8192, lease_ttl_s=SHORT_TTL_S)) for i in range(2)),
        *(submit(job(f"shared-{i}", share=333, allow_sharing=True)) for i in range(2)),
    ]
    for j in running:
        assert j.state == spb.JOB_STATE_RUNNING, (j.spec.job_id, j.pending_reason)
    victim_gpus = {g.uuid for p in expect["victim"].placements for g in p.gpus}
    # Fill the cluster with exclusive single-GPU jobs until two of them wait.
    fills: list[str] = []
    for i in range(12):
        got = submit(job(f"fill-{i}", mem=16384))
        if got.state == spb.JOB_STATE_PENDING:
            fills.append(got.spec.job_id)
            if len(fills) == 2:
                break
    assert len(fills) == 2, "the cluster never filled up"
    assert submit(job("gang-wait", mem=16384, replicas=2, gpus=2, gang=True)).state == spb.JOB_STATE_PENDING

    # An acknowledged release places the first waiting job; a read after the ack shows the committed state.
    freed = where(expect["excl-0"])[0][2][0][0]
    release("excl-0")
    expect[fills[0]] = stub.DescribeJob(spb.DescribeJobRequest(job_id=fills[0]), timeout=10).job
    assert expect[fills[0]].state == spb.JOB_STATE_RUNNING
    assert where(expect[fills[0]])[0][2][0][0] == freed

    # A guaranteed job that only the best-effort victim's two cards can make room for: a notice, no revocation yet.
    guar = submit(job("guar", mem=16384, gpus=2, qos=spb.QOS_CLASS_GUARANTEED))
    assert guar.state == spb.JOB_STATE_PENDING and "victim" in guar.pending_reason, guar.pending_reason
    expect["victim"] = stub.DescribeJob(spb.DescribeJobRequest(job_id="victim"), timeout=10).job
    assert expect["victim"].state == spb.JOB_STATE_PREEMPTING and expect["victim"].preempted_by == "guar"
    revoke_at = ts(expect["victim"].preemption_deadline)

    # A node registered over gRPC (not in the cluster file, so only the store can bring it back), with a job.
    # Its cards are too small for anything else that is waiting.
    node_x = node_pb("node-x", 2, 1024, model="L4", pool="x")
    stub.RegisterNode(spb.RegisterNodeRequest(node=node_x), timeout=10)
    on_x = submit(job("on-x", mem=256, node_selector={"pool": "x"}))
    assert on_x.state == spb.JOB_STATE_RUNNING and on_x.placements[0].node == "node-x"

    renewed_at = time.time()
    for i in range(2):
        stub.RenewLease(spb.RenewLeaseRequest(job_id=f"short-{i}", replica=0), timeout=10)
    events_before = all_events(stub)

    # Another thread keeps submitting while we release one more job and kill -9 right after the ack.
    bg_acked: dict[str, spb.Job] = {}
    bg_tried: list[str] = []
    bg_errors: list[grpc.StatusCode] = []
    stop = threading.Event()
    bg_channel = sched.channel()

    def background() -> None:
        # Submits until one fails: the kill -9 below ends it with the call in flight at the crash (or the next
        # one). Stopping it on a flag after the kill could end it between two calls on a loaded machine.
        bg = spb_grpc.SchedulerServiceStub(bg_channel)
        for i in range(100_000):
            if stop.is_set():  # only when the test failed before the kill
                return
            spec = job(f"bg-{i}", mem=1024, allow_sharing=True, qos=spb.QOS_CLASS_BEST_EFFORT)
            bg_tried.append(spec.job_id)
            try:
                bg_acked[spec.job_id] = bg.SubmitJob(spb.SubmitJobRequest(job=spec), timeout=30).job
            except grpc.RpcError as err:
                bg_errors.append(err.code())
                return

    thread = threading.Thread(target=background, name="bg-submit")
    thread.start()
    deadline = time.monotonic() + 60
    while len(bg_acked) < 3 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(bg_acked) >= 3, f"background submits did not get through: {bg_errors}"
    freed = where(expect["excl-1"])[0][2][0][0]
    assert stub.DescribeJob(spb.DescribeJobRequest(job_id="victim"), timeout=10).job.state == spb.JOB_STATE_PREEMPTING
    try:
        release("excl-1")
        sched.kill9()
        thread.join(timeout=60)
    finally:
        stop.set()
    assert not thread.is_alive()
    assert bg_errors, "the background thread was still submitting when the scheduler died"

    # Stay down past the short leases' and the victim's deadlines: a restored lease must start a fresh TTL,
    # not lapse; the restored preemption must still be carried out.
    time.sleep(max(0.0, renewed_at + SHORT_TTL_S + 0.5 - time.time(), revoke_at + 0.2 - time.time()))
    spawned_at = time.time()
    stub = sched.serve()

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = stub.DescribeJob(spb.DescribeJobRequest(job_id="guar"), timeout=10).job
        if got.state == spb.JOB_STATE_RUNNING:
            break
        time.sleep(0.05)
    assert got.state == spb.JOB_STATE_RUNNING, f"guaranteed job not placed after restart: {got.pending_reason}"
    assert {g.uuid for p in got.placements for g in p.gpus} == victim_gpus
    victim = stub.DescribeJob(spb.DescribeJobRequest(job_id="victim"), timeout=10).job
    assert victim.state == spb.JOB_STATE_PREEMPTED and victim.preempted_by == "guar"

    for jid, want in {**expect, **bg_acked}.items():
        got = stub.DescribeJob(spb.DescribeJobRequest(job_id=jid), timeout=10).job
        assert got.spec == want.spec, jid
        if jid in ("guar", "victim"):
            continue
        if jid == fills[1]:
            # Placed in the same transaction as the acknowledged release of excl-1, on the card it freed.
            assert got.state == spb.JOB_STATE_RUNNING, (jid, got.pending_reason)
            assert where(got)[0][2][0][0] == freed
            continue
        assert got.state == want.state, (jid, spb.JobState.Name(got.state), spb.JobState.Name(want.state))
        assert where(got) == where(want), jid
    jobs = assert_consistent(stub)
    nodes = {n.spec.name: n.spec for n in stub.ListNodes(spb.ListNodesRequest(), timeout=10).nodes}
    assert nodes["node-x"] == node_x
    unknown = set(jobs) - set(expect) - set(bg_acked)
    assert unknown <= set(bg_tried) - set(bg_acked), f"jobs nobody submitted: {unknown}"
    assert len(unknown) <= 1, f"more than the one in-flight submit appeared: {unknown}"

    # The event log is intact and continues; excl-1's release precedes the placement it allowed.
    events = all_events(stub)
    assert_events_continue(events_before, events)
    assert (spb.EVENT_KIND_PREEMPTION_NOTICE, "victim") in [(e.kind, e.job_id) for e in events_before]
    tail = [(e.kind, e.job_id) for e in events[len(events_before) :]]
    assert tail.index((spb.EVENT_KIND_RELEASED, "excl-1")) < tail.index((spb.EVENT_KIND_PLACED, fills[1]))
    assert tail.index((spb.EVENT_KIND_PREEMPTED, "victim")) < tail.index((spb.EVENT_KIND_PLACED, "guar"))
    last_seq = events[-1].seq
    release("excl-2")
    new = all_events(stub, after=last_seq)
    assert [e.seq for e in new] == list(range(last_seq + 1, last_seq + 1 + len(new)))
    assert (spb.EVENT_KIND_RELEASED, "excl-2") in [(e.kind, e.job_id) for e in new]

    # Every restored lease got a fresh TTL from the restart; renewing works.
    for jid, ttl in (("short-0", SHORT_TTL_S), ("short-1", SHORT_TTL_S), ("gang", 30), ("shared-0", 30)):
        got = stub.DescribeJob(spb.DescribeJobRequest(job_id=jid), timeout=10).job
        assert got.state == spb.JOB_STATE_RUNNING, jid
        for p in got.placements:
            assert ts(p.lease_expires_at) >= spawned_at + ttl - 0.05, (jid, ts(p.lease_expires_at) - spawned_at)
    for r in range(2):
        renew = stub.RenewLease(spb.RenewLeaseRequest(job_id="gang", replica=r), timeout=10)
        assert renew.state == spb.JOB_STATE_RUNNING
    # short-0 is renewed and lives on; short-1 is not and lapses one TTL after the restart, not before.
    expired_at = None
    deadline = time.time() + SHORT_TTL_S + 5
    while time.time() < deadline:
        asked_at = time.time()
        renew = stub.RenewLease(spb.RenewLeaseRequest(job_id="short-0", replica=0), timeout=10)
        assert renew.state == spb.JOB_STATE_RUNNING
        assert ts(renew.lease_expires_at) >= asked_at + SHORT_TTL_S - 0.05  # (not after the answer: a slow call)
        got = stub.DescribeJob(spb.DescribeJobRequest(job_id="short-1"), timeout=10).job
        if got.state != spb.JOB_STATE_RUNNING:
            expired_at = time.time()
            assert got.state == spb.JOB_STATE_LEASE_EXPIRED
            break
        time.sleep(0.2)
    assert expired_at is not None, "short-1 was never reclaimed after the restart"
    assert expired_at >= spawned_at + SHORT_TTL_S - 0.05

    # Second crash right after an acknowledged submit: the whole state comes back, events continue again.
    snapshot = assert_consistent(stub)
    late = stub.SubmitJob(spb.SubmitJobRequest(job=job("late", mem=4096, allow_sharing=True)), timeout=10).job
    events_before = all_events(stub)
    sched.kill9()
    stub = sched.serve()
    jobs = assert_consistent(stub)
    assert set(jobs) == set(snapshot) | {"late"}
    assert jobs["late"].state == late.state and where(jobs["late"]) == where(late)
    for jid, was in snapshot.items():
        assert (jobs[jid].state, where(jobs[jid])) == (was.state, where(was)), jid
    assert jobs["excl-2"].state == spb.JOB_STATE_RELEASED
    assert jobs["short-1"].state == spb.JOB_STATE_LEASE_EXPIRED
    assert (
        stub.RenewLease(spb.RenewLeaseRequest(job_id="short-0", replica=0), timeout=10).state == spb.JOB_STATE_RUNNING
    )
    assert_events_continue(events_before, all_events(stub))


# -- SIGTERM ------------------------------------------------------------------------------------------------


#: The SIGTERM test's grace: long enough that no call in flight runs out of it however loaded the machine; the
#: drain must still end well before it (an open stream or a stuck call would hold it to the end).
SIGTERM_GRACE_S = 120.0  # (60 s left the drain bound below, half of it, within reach of a slow drain)


@pytest.mark.timeout(600)  # two process starts and a drain of up to START_TIMEOUT_S each on a loaded machine
def test_sigterm_drains_in_flight_calls_and_streams(tmp_path: Path) -> None:
    # The drain delay (serving while health says NOT_SERVING) lets the slow submits, sent just before the
    # signal, be taken up by the server even when its serving thread lags under load.
    sched = SchedulerProcess(
        tmp_path,
        CLUSTER_TOML + T4_TOML,
        GUARDMESH__GRPC__GRACE_S=str(SIGTERM_GRACE_S),
        GUARDMESH__GRPC__DRAIN_DELAY_S="2",
    )
    try:
        _sigterm_drain(sched)
    finally:
        sched.close()


def _sigterm_drain(sched: SchedulerProcess) -> None:
    stub = sched.serve()
    watched = stub.SubmitJob(spb.SubmitJobRequest(job=job("watched", mem=8192)), timeout=10).job
    assert watched.state == spb.JOB_STATE_RUNNING

    # A WatchJob stream and a health Watch stream, both open across the SIGTERM.
    watch_msgs: list[spb.WatchJobResponse] = []
    watch_end: dict[str, object] = {}

    def watch_job() -> None:
        try:
            for msg in stub.WatchJob(spb.WatchJobRequest(job_id="watched"), timeout=2 * SIGTERM_GRACE_S):
                watch_msgs.append(msg)
            watch_end["code"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            watch_end["code"] = err.code()
        watch_end["at"] = time.monotonic()

    health_seen: list[int] = []

    def watch_health() -> None:
        stream = health_pb2_grpc.HealthStub(sched.channel()).Watch(
            health_pb2.HealthCheckRequest(service="guardmesh.v1.SchedulerService"), timeout=2 * SIGTERM_GRACE_S
        )
        try:
            for resp in stream:
                health_seen.append(resp.status)
                if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    stream.cancel()  # an open health stream would otherwise hold the drain for the full grace
                    return
        except grpc.RpcError:
            pass

    watchers = [threading.Thread(target=watch_job), threading.Thread(target=watch_health)]
    for t in watchers:
        t.start()
    deadline = time.monotonic() + SIGTERM_GRACE_S  # a wait, not a speed check: generous under load
    while (not watch_msgs or not health_seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watch_msgs and watch_msgs[0].job.state == spb.JOB_STATE_RUNNING
    assert health_seen == [health_pb2.HealthCheckResponse.SERVING]

    # A burst of small submits from several threads, each on its own connection.
    acked: dict[str, spb.Job] = {}
    acked_at: dict[str, float] = {}
    failures: list[tuple[str, grpc.StatusCode]] = []
    stop = threading.Event()

    def burst(t: int) -> None:
        s = spb_grpc.SchedulerServiceStub(sched.channel())
        for i in range(10_000):
            if stop.is_set():
                return
            spec = job(
                f"burst-{t}-{i}", mem=256, allow_sharing=True, allowed_models=[MODEL], qos=spb.QOS_CLASS_BEST_EFFORT
            )
            try:
                acked[spec.job_id] = s.SubmitJob(spb.SubmitJobRequest(job=spec), timeout=SIGTERM_GRACE_S).job
                acked_at[spec.job_id] = time.monotonic()
            except grpc.RpcError as err:
                failures.append((spec.job_id, err.code()))
                return

    bursters = [threading.Thread(target=burst, args=(t,), name=f"burst-{t}") for t in range(6)]
    for t in bursters:
        t.start()
    deadline = time.monotonic() + SIGTERM_GRACE_S  # a wait, not a speed check: generous under load
    while len(acked) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acked) >= 20, f"burst did not get going: {failures}"

    # Slow submits: 4096 replicas each; they queue on the scheduler's lock, so all are in flight at SIGTERM.
    slow_stub = spb_grpc.SchedulerServiceStub(sched.channel())
    slow: dict[str, Future[spb.SubmitJobResponse]] = {}
    for k in range(3):
        spec = job(f"slow-{k}", share=1, replicas=4096, allow_sharing=True, allowed_models=["T4"])
        slow[spec.job_id] = slow_stub.SubmitJob.future(spb.SubmitJobRequest(job=spec), timeout=SIGTERM_GRACE_S)
    time.sleep(0.3)
    assert sched.proc is not None
    slow_done = sum(f.done() for f in slow.values())
    assert slow_done < len(slow), "the slow submits were not slow enough to be in flight"
    signalled = time.monotonic()
    sched.proc.send_signal(signal.SIGTERM)

    for jid, fut in slow.items():
        resp = fut.result(timeout=SIGTERM_GRACE_S)  # raises if the drain cut the call off
        assert resp.job.state == spb.JOB_STATE_RUNNING and len(resp.job.placements) == 4096, jid
    rc = sched.proc.wait(timeout=SIGTERM_GRACE_S)
    exited = time.monotonic()
    stop.set()
    for t in [*bursters, *watchers]:
        t.join(timeout=10)
        assert not t.is_alive(), t.name
    drained = [jid for jid, at in acked_at.items() if at > signalled]
    print(
        f"drain: {exited - signalled:.2f}s, {len(acked)} burst submits acknowledged, {len(drained)} of them "
        f"after SIGTERM, refused: {failures}, slow submits done before SIGTERM: {slow_done}"
    )
    assert rc == 0, sched.log_tail()
    assert drained, "no burst submit that was in flight at SIGTERM completed during the drain"
    assert exited - signalled < SIGTERM_GRACE_S / 2, f"drain took {exited - signalled:.1f}s, held by a stream or call"
    assert watch_end.get("code") == grpc.StatusCode.OK, watch_end
    assert signalled <= watch_end["at"] <= exited  # type: ignore[operator]
    assert health_seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    # Calls that reached the draining server completed; later ones were refused as UNAVAILABLE, never cut.
    assert {code for _, code in failures} <= {grpc.StatusCode.UNAVAILABLE}, failures

    stub = sched.serve()
    jobs = assert_consistent(stub)
    for jid, want in acked.items():
        got = jobs.get(jid)
        assert got is not None, f"acknowledged submit {jid} lost by the drain"
        assert (got.state, where(got)) == (want.state, where(want)), jid
    for jid, fut in slow.items():
        want = fut.result().job
        assert (jobs[jid].state, where(jobs[jid])) == (want.state, where(want)), jid
    assert set(jobs) <= {"watched", *slow, *acked, *(jid for jid, _ in failures)}
    sched.proc.send_signal(signal.SIGTERM)
    assert sched.proc.wait(timeout=SIGTERM_GRACE_S) == 0, sched.log_tail()


# -- configuration errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("GUARDMESH__SCHEDULER__LEASE_TTL_S", "-1", "scheduler.lease_ttl_s"),
        ("GUARDMESH__SCHEDULER__POLICY", "round-robin", "scheduler.policy"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, variable: str, value: str, key: str) -> None:
    sched = SchedulerProcess(tmp_path, **{variable: value})
    proc = subprocess.run(
        [sys.executable, "-m", "services.scheduler"],
        cwd=REPO,
        env=sched.env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert key in proc.stderr, proc.stderr[-2000:]
    assert value in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "state" / "scheduler.db").exists()


def test_port_in_use_exits_2_naming_the_key(tmp_path: Path) -> None:
    sched = SchedulerProcess(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", sched.port))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "services.scheduler"],
            cwd=REPO,
            env=sched.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "services.scheduler.port" in proc.stderr, proc.stderr[-2000:]
