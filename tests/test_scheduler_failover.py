"""Scheduler replicas on one store (real processes, a real PostgreSQL server from tests/postgres.py):

* kill -9 of the leader during a concurrent submit/renew/release run: a standby takes over, the card
  invariant holds at every check, every acknowledged placement is on the new leader, every acknowledged
  release stays released;
* fencing: a leader paused (SIGSTOP) past its lease is deposed; when it resumes, the call that waited for it
  is refused and nothing of it reaches the store;
* the store lost at run time: UNAVAILABLE and health NOT_SERVING, nothing acknowledged that was not
  committed, service resumes when the store is back;
* kill -9 durability of one scheduler on each backend, and the store unreachable at start.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from guardmesh.client import open_channel
from guardmesh.leadership import leader_in_message
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from tests.conftest import check_invariant, make_config
from tests.postgres import PostgresServer
from tests.processes import ServiceProcess, assert_exits_on_unreachable_store, free_port, postgres_mesh

RESERVE_MIB = 512
LEASE_S = 2.0
CLUSTER_TOML = """
[[nodes]]
name = "node-a"
model = "A100-80GB"
gpus = 4
memory_mib = 81920

[[nodes]]
name = "node-b"
model = "A100-80GB"
gpus = 4
memory_mib = 81920
"""


def replica(tmp_path: Path, name: str, store_url: str, **env: str) -> ServiceProcess:
    """One scheduler replica (its own port and state folder) on ``store_url``."""
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(CLUSTER_TOML)
    return ServiceProcess(
        "scheduler",
        tmp_path / name,
        {
            "GUARDMESH__SCHEDULER__STORE_URL": store_url,
            "GUARDMESH__SCHEDULER__LEADER_LEASE_S": str(LEASE_S),
            "GUARDMESH__SCHEDULER__CLUSTER_FILE": str(cluster),
            "GUARDMESH__SCHEDULER__GPU_RESERVE_MIB": str(RESERVE_MIB),
            "GUARDMESH__SCHEDULER__REAP_INTERVAL_S": "0.1",
            "GUARDMESH__GRPC__GRACE_S": "2",
            **env,
        },
    )


TTL_S = 600


def spec(job_id: str, ttl_s: int = TTL_S) -> spb.JobSpec:
    return spb.JobSpec(
        job_id=job_id,
        tenant="failover",
        replicas=1,
        gpus_per_replica=1,
        memory_mib_per_gpu=30000,
        allow_sharing=True,
        lease_ttl_s=ttl_s,
    )


def placements(job: spb.Job) -> list[tuple[int, str, tuple[str, ...]]]:
    return sorted((p.replica, p.node, tuple(g.uuid for g in p.gpus)) for p in job.placements)


def unavailable_message(address: str) -> str:
    """The details of an UNAVAILABLE answer from ``address`` ("" if it answered otherwise)."""
    with grpc.insecure_channel(address) as channel:
        try:
            spb_grpc.SchedulerServiceStub(channel).ListJobs(spb.ListJobsRequest(), timeout=5)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return err.details() or ""
        return ""


def wait_for(
    what: str, check: Callable[[], bool], timeout_s: float = 90.0, detail: Callable[[], str] = lambda: ""
) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what} {detail()}"
        time.sleep(0.1)


def start_pair(tmp_path: Path, url: str) -> tuple[ServiceProcess, ServiceProcess]:
    """Replica a leads (started first); b stands by, naming a as the leader."""
    a, b = replica(tmp_path, "a", url), replica(tmp_path, "b", url)
    a.start()
    b.spawn()
    wait_for("b to stand by naming a", lambda: leader_in_message(unavailable_message(b.address)) == a.address, 120)
    assert a.health() == "SERVING" and b.health() == "NOT_SERVING"
    return a, b


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    a, b = start_pair(tmp_path, pg_url)
    yield a, b
    for p in (a, b):
        if p.proc is not None and p.proc.poll() is None:
            os.kill(p.proc.pid, signal.SIGCONT)
        p.close()


def test_kill9_of_the_leader_under_load_loses_nothing_acknowledged(
    tmp_path: Path, pair: tuple[ServiceProcess, ServiceProcess]
) -> None:
    a, b = pair
    config = make_config(tmp_path, **{"client.reresolve_s": 0.5})
    channel = open_channel("scheduler", config, addresses=[a.address, b.address])
    stub = spb_grpc.SchedulerServiceStub(channel)
    placed: dict[str, list[tuple[int, str, tuple[str, ...]]]] = {}  # acknowledged RUNNING, not released
    released: set[str] = set()  # acknowledged releases
    lock = threading.Lock()
    stop = threading.Event()
    breaches: list[str] = []
    errors: dict[str, int] = {}

    def worker(w: int) -> None:
        rng = random.Random(w)
        n = 0
        # Jobs this worker submitted that may hold cards without being in ``placed``: answered PENDING (the
        # queue places them later) or not answered at all (the write may have committed before the kill).
        # Each is withdrawn before the next submit, so cards never fill with jobs nobody releases.
        loose: list[str] = []
        while not stop.is_set():
            try:
                if loose:
                    job_id = loose[-1]
                    try:
                        stub.ReleaseJob(spb.ReleaseJobRequest(job_id=job_id), timeout=20)
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                    else:
                        with lock:
                            placed.pop(job_id, None)
                            released.add(job_id)
                    loose.pop()
                    continue
                with lock:
                    mine = [j for j in placed if j.startswith(f"w{w}-")]
                if mine and rng.random() < 0.3:
                    victim = rng.choice(mine)
                    stub.ReleaseJob(spb.ReleaseJobRequest(job_id=victim), timeout=20)
                    with lock:
                        placed.pop(victim, None)
                        released.add(victim)
                elif mine and rng.random() < 0.5:
                    stub.RenewLease(spb.RenewLeaseRequest(job_id=rng.choice(mine), replica=0), timeout=20)
                else:
                    n += 1
                    loose.append(f"w{w}-{n}")
                    job = stub.SubmitJob(spb.SubmitJobRequest(job=spec(f"w{w}-{n}")), timeout=20).job
                    if job.state == spb.JOB_STATE_RUNNING:
                        loose.pop()
                        with lock:
                            placed[job.spec.job_id] = placements(job)
            except grpc.RpcError as err:  # not acknowledged: nothing recorded
                with lock:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                time.sleep(0.05)

    def checker() -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                breaches.extend(check_invariant(stub.ListNodes(spb.ListNodesRequest(), timeout=20), RESERVE_MIB))
            time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)] + [threading.Thread(target=checker)]
    for t in threads:
        t.start()
    try:
        wait_for("work on the first leader", lambda: len(placed) + len(released) >= 12)
        before = len(placed) + len(released)
        killed_at = time.time()
        a.kill9()
        wait_for("b to lead", lambda: b.health() == "SERVING")
        wait_for(
            "work on the new leader",
            lambda: len(placed) + len(released) >= before + 12,
            detail=lambda: f"placed={len(placed)} released={len(released)} before={before} errors={errors}",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert not breaches, breaches
        direct = spb_grpc.SchedulerServiceStub(b.channel())
        for job_id, where in placed.items():
            job = direct.DescribeJob(spb.DescribeJobRequest(job_id=job_id)).job
            assert job.state == spb.JOB_STATE_RUNNING, (job_id, spb.JobState.Name(job.state))
            assert placements(job) == where, job_id
            # Every lease restarted its TTL when b took over (after the kill), renewed since or not.
            expires = job.placements[0].lease_expires_at.ToNanoseconds() / 1e9
            assert expires > killed_at + TTL_S, (job_id, expires - killed_at)
        for job_id in released:
            job = direct.DescribeJob(spb.DescribeJobRequest(job_id=job_id)).job
            assert job.state == spb.JOB_STATE_RELEASED, (job_id, spb.JobState.Name(job.state))
        assert not check_invariant(direct.ListNodes(spb.ListNodesRequest()), RESERVE_MIB)
    finally:
        channel.close()


def test_a_paused_leader_is_fenced_when_it_resumes(
    tmp_path: Path, pair: tuple[ServiceProcess, ServiceProcess], pg_url: str
) -> None:
    a, b = pair
    assert a.proc is not None
    stub_a = spb_grpc.SchedulerServiceStub(a.channel())  # a plain channel: no retries, no following
    stub_a.SubmitJob(spb.SubmitJobRequest(job=spec("before-pause")), timeout=20)
    watch = stub_a.WatchJob(spb.WatchJobRequest(job_id="before-pause"), timeout=120)
    assert next(watch).job.spec.job_id == "before-pause"  # the snapshot; the stream stays open
    os.kill(a.proc.pid, signal.SIGSTOP)
    # Sent while a is paused: it waits in a's socket until a resumes.
    late = stub_a.SubmitJob.future(spb.SubmitJobRequest(job=spec("sent-to-paused-leader")), timeout=120)
    wait_for("b to take over", lambda: b.health() == "SERVING")
    stub_b = spb_grpc.SchedulerServiceStub(b.channel())
    stub_b.SubmitJob(spb.SubmitJobRequest(job=spec("on-new-leader")), timeout=20)
    os.kill(a.proc.pid, signal.SIGCONT)
    with pytest.raises(grpc.RpcError) as refused:
        late.result()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    # The watch stream on the deposed leader ends UNAVAILABLE (to be opened again on the leader).
    with pytest.raises(grpc.RpcError) as ended:
        for _ in watch:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
    wait_for("a to stand by naming b", lambda: leader_in_message(unavailable_message(a.address)) == b.address)
    assert a.health() == "NOT_SERVING"
    # Nothing of the refused call reached the store; what was acknowledged is there.
    with psycopg.connect(pg_url) as conn:
        rows = {r[0] for r in conn.execute("SELECT job_id FROM jobs")}
        epoch = conn.execute("SELECT epoch FROM leases WHERE name = 'scheduler'").fetchone()
    assert rows == {"before-pause", "on-new-leader"}
    assert epoch == (2,)
    with pytest.raises(grpc.RpcError) as missing:
        stub_b.DescribeJob(spb.DescribeJobRequest(job_id="sent-to-paused-leader"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_store_lost_at_run_time_then_back(tmp_path: Path, postgres_server: PostgresServer, pg_url: str) -> None:
    with replica(tmp_path, "solo", pg_url) as solo:
        solo.start()
        stub = spb_grpc.SchedulerServiceStub(solo.channel())
        acked = stub.SubmitJob(spb.SubmitJobRequest(job=spec("acked"))).job
        postgres_server.stop("fast")
        try:
            with pytest.raises(grpc.RpcError) as lost:
                stub.SubmitJob(spb.SubmitJobRequest(job=spec("during-outage")), timeout=60)
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value.details()
            wait_for("NOT_SERVING", lambda: solo.health() == "NOT_SERVING", detail=solo.log_tail)
            with pytest.raises(grpc.RpcError) as still:
                stub.ListJobs(spb.ListJobsRequest(), timeout=20)
            assert still.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            postgres_server.start()
        wait_for("SERVING again", lambda: solo.health() == "SERVING", 120, detail=solo.log_tail)
        back = stub.DescribeJob(spb.DescribeJobRequest(job_id="acked")).job
        assert placements(back) == placements(acked)
        # The call that failed was never acknowledged and is not there: memory was reloaded from the store.
        with pytest.raises(grpc.RpcError) as missing:
            stub.DescribeJob(spb.DescribeJobRequest(job_id="during-outage"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.SubmitJob(spb.SubmitJobRequest(job=spec("after-outage"))).job.state == spb.JOB_STATE_RUNNING


def test_kill9_durability_on_each_backend(tmp_path: Path, store_url: str) -> None:
    with replica(tmp_path, "one", store_url) as one:
        one.start()
        stub = spb_grpc.SchedulerServiceStub(one.channel())
        acked = {}
        for i in range(6):
            job = stub.SubmitJob(spb.SubmitJobRequest(job=spec(f"d{i}"))).job
            acked[job.spec.job_id] = (job.state, placements(job))
        stub.ReleaseJob(spb.ReleaseJobRequest(job_id="d0"))
        acked["d0"] = (spb.JOB_STATE_RELEASED, acked["d0"][1])
        one.kill9()
        one.channels.clear()
        one.start()
        again = spb_grpc.SchedulerServiceStub(one.channel())
        for job_id, (state, where) in acked.items():
            job = again.DescribeJob(spb.DescribeJobRequest(job_id=job_id)).job
            assert job.state == state, job_id
            if state == spb.JOB_STATE_RUNNING:
                assert placements(job) == where
        assert not check_invariant(again.ListNodes(spb.ListNodesRequest()), RESERVE_MIB)


def test_store_unreachable_at_start_names_host_and_database_not_the_password(tmp_path: Path) -> None:
    url = f"postgresql://sched:hunter2-secret@127.0.0.1:{free_port()}/placements"
    assert_exits_on_unreachable_store(replica(tmp_path, "nowhere", url), "placements", "hunter2-secret")


def test_mesh_up_runs_replicas_on_a_local_postgres_and_down_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make up REPLICAS=2 STORE=postgres`` (the scheduler only, on free ports): one replica leads, the other
    stands by; after kill -9 of the leader the other leads; ``make down`` stops the replicas and the server."""
    from guardmesh import mesh

    with postgres_mesh(monkeypatch, "scheduler") as config:
        mesh.up(config, timeout=180)

        def roles() -> dict[str, str]:
            return {rec.service: health for rec, health in mesh.status(config)}

        first = roles()
        assert first["postgres"] == "RUNNING"
        assert sorted(v for k, v in first.items() if k.startswith("scheduler-")) == ["NOT_SERVING", "SERVING"]
        records = {r.service: r for r in mesh.read_records(config)}
        leader = next(k for k, v in first.items() if v == "SERVING")
        other = next(k for k in first if k.startswith("scheduler-") and k != leader)
        os.kill(records[leader].pid, signal.SIGKILL)
        wait_for("the standby to lead", lambda: roles()[other] == "SERVING", 60)
        mesh.down(config)
        wait_for("postgres to stop", lambda: not mesh.pid_alive(records["postgres"].pid), 60)
        assert not mesh.pid_alive(records[other].pid)


def test_a_write_under_a_superseded_epoch_is_refused_in_the_store(tmp_path: Path, pg_url: str) -> None:
    """The fence itself, at process level: the lease is taken over in the store behind the leader's back (as a
    replica on a skewed clock could) while the leader's own clock still says it leads (a long lease: no
    renewal runs meanwhile). Its next write is refused inside the transaction and nothing of it lands."""
    with replica(tmp_path, "solo", pg_url, GUARDMESH__SCHEDULER__LEADER_LEASE_S="120") as solo:
        solo.start()
        stub = spb_grpc.SchedulerServiceStub(solo.channel())
        stub.SubmitJob(spb.SubmitJobRequest(job=spec("kept")), timeout=20)
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                "UPDATE leases SET epoch = epoch + 1, holder = 'intruder', address = '10.9.9.9:1', "
                "expires_at = 1e12 WHERE name = 'scheduler'"
            )
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitJob(spb.SubmitJobRequest(job=spec("fenced")), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "epoch 1 is stale" in (refused.value.details() or ""), refused.value.details()
        with psycopg.connect(pg_url) as conn:
            assert {r[0] for r in conn.execute("SELECT job_id FROM jobs")} == {"kept"}
        # It stood by at once; the next call names no leader yet, and after its next claim the intruder.
        assert solo.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as standby:
            stub.ListJobs(spb.ListJobsRequest(), timeout=20)
        assert standby.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "standby" in (standby.value.details() or "")
