"""abrouter replicas as two real processes on a real PostgreSQL server (issue #16 item 2): the process-level
versions of the two-core tests in test_abrouter_replicas_fencing.py.

* concurrent edits: threads update one experiment through both replicas at once with no expected version, so
  both replicas often decide the same next version. Every answer is OK or ABORTED; the stored revisions are
  1..N without a gap, each acknowledged edit is the stored revision of the version it was answered, and no
  ABORTED edit left anything in the store; both replicas then serve version N.
* the monitor lease across a pause: the replica holding it is stopped (SIGSTOP) past its lease; the other takes
  the lease over and decides the guardrail rollback; the paused one, resumed (SIGCONT), serves the rollback,
  decides nothing again (one ``guardrail_tripped`` event, revisions [created, rolled_back]) and keeps serving.
  Which write a deposed holder would make cannot be timed from outside the process: the refusal of such a
  write inside its transaction is the core test's (test_abrouter_replicas_fencing.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from tests.postgres import PostgresServer
from tests.processes import ServiceProcess
from tests.test_abrouter_replicas import pb_spec, running_pair, stub_of, wait_for

WAIT_S = 60.0  # generous: the machine is shared; what is checked is that it happens, not how fast
#: Edits each thread tries at most; the run ends earlier once both outcomes were seen often enough.
EDITS_PER_THREAD = 150


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    with running_pair(tmp_path, pg_url) as both:
        yield both


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


def served_version(stub: pb_grpc.ABRouterServiceStub, key: str) -> int:
    try:
        return int(stub.GetExperiment(pb.GetExperimentRequest(key=key), timeout=10).experiment.version)
    except grpc.RpcError:
        return 0


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_concurrent_edits_through_two_processes_are_one_history(
    pair: tuple[ServiceProcess, ServiceProcess], pg_url: str
) -> None:
    stubs = [stub_of(p) for p in pair]
    stubs[0].CreateExperiment(pb.CreateExperimentRequest(spec=pb_spec("shared")))
    wait_for("b serves 'shared'", lambda: served_version(stubs[1], "shared") == 1, WAIT_S)
    acknowledged: dict[str, int] = {}  # comment -> version answered
    aborted: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def edit(replica: int, thread: int) -> None:
        stub = stubs[replica]
        for i in range(EDITS_PER_THREAD):
            if enough.is_set():
                return
            comment = f"r{replica}-t{thread}-{i}"
            weight = round(0.1 + 0.8 * ((i * 7 + thread) % 9) / 8, 2)
            request = pb.UpdateExperimentRequest(
                spec=pb_spec("shared", (round(1 - weight, 2), weight)), comment=comment
            )
            try:
                version = stub.UpdateExperiment(request, timeout=60).experiment.version
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED, f"{comment}: {err.code()} {err.details()}"
                assert "written first by another replica" in (err.details() or "")
                with lock:
                    aborted.append(comment)
                continue
            with lock:
                acknowledged[comment] = version
                if len(aborted) >= 3 and len(acknowledged) >= 30:
                    enough.set()

    threads = [threading.Thread(target=edit, args=(r, t)) for r in (0, 1) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert aborted, "no two edits ever raced for one version: the run proved nothing (try more edits)"
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version, comment FROM revisions WHERE key = 'shared'").fetchall()
        revisions = {int(v): str(c) for v, c in rows}
        events = [m for (m,) in conn.execute("SELECT message FROM events WHERE key = 'shared'")]
    top = max(revisions)
    assert sorted(revisions) == list(range(1, top + 1))  # one history, no gap
    assert len(acknowledged) == top - 1  # every stored edit was answered OK ...
    for comment, version in acknowledged.items():
        assert revisions[version] == comment  # ... as the version it was answered
    stored = set(revisions.values())
    assert not stored & set(aborted)  # an ABORTED edit left no revision ...
    assert not [m for m in events if any(m.endswith(f": {c}") for c in aborted)]  # ... and no event
    wait_for("a serves the last version", lambda: served_version(stubs[0], "shared") == top, WAIT_S)
    wait_for("b serves the last version", lambda: served_version(stubs[1], "shared") == top, WAIT_S)


def monitor_holder(pg_url: str) -> tuple[str, int]:
    """(holder, epoch) of the monitor lease ("" before anyone holds it)."""
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT holder, epoch FROM leases WHERE name = 'abrouter-monitor'").fetchone()
    return (str(row[0]), int(row[1])) if row else ("", 0)


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_a_paused_monitor_holder_is_taken_over_and_the_rollback_decided_once(
    pair: tuple[ServiceProcess, ServiceProcess], pg_url: str
) -> None:
    a, b = pair
    guard = pb.Guardrail(metric="conversion", higher_is_better=True, max_relative_drop=0.05, min_units=150)
    spec = pb_spec("risky")
    spec.metrics.append("conversion")
    spec.guardrails.append(guard)
    stub_of(a).CreateExperiment(pb.CreateExperimentRequest(spec=spec))
    wait_for("a monitor lease holder", lambda: bool(monitor_holder(pg_url)[0]), WAIT_S)
    holder, epoch = monitor_holder(pg_url)
    paused, other = (a, b) if f":{a.port}/" in holder else (b, a)
    assert f":{paused.port}/" in holder, holder
    wait_for("the other serves 'risky'", lambda: served_version(stub_of(other), "risky") == 1, WAIT_S)
    assert paused.proc is not None
    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        # the traffic and the outcomes (30 % vs 10 % conversion) through the replica left running
        stub = stub_of(other)
        arms = {}
        for i in range(800):  # exposures first: nothing to trip on yet, so every one is in the experiment
            resp = stub.Assign(pb.AssignRequest(unit_id=f"user-{i}", experiment_keys=["risky"], log_exposure=True))
            assert resp.assignments[0].exposure_logged
            arms[i] = resp.assignments[0].arm_index
        for i, arm in arms.items():
            converted = (i % 10) < (3 if arm == 0 else 1)
            observation = pb.MetricObservation(unit_id=f"user-{i}", metric="conversion", value=float(converted))
            stub.RecordMetrics(pb.RecordMetricsRequest(experiment_key="risky", observations=[observation]))

        def rolled_back(stub: pb_grpc.ABRouterServiceStub) -> bool:
            got = stub.GetExperiment(pb.GetExperimentRequest(key="risky"), timeout=10).experiment
            return got.state == pb.EXPERIMENT_STATE_ROLLED_BACK

        wait_for("the other replica takes the lease over and rolls back", lambda: rolled_back(stub), WAIT_S)
        new_holder, new_epoch = monitor_holder(pg_url)
        assert f":{other.port}/" in new_holder and new_epoch > epoch
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    wait_for("the resumed replica serves the rollback", lambda: rolled_back(stub_of(paused)), WAIT_S)
    assert paused.health() == "SERVING" and paused.lives == 1
    deadline = time.monotonic() + 2.0  # ten monitor rounds (0.2 s) on each: a second decision would land now
    while time.monotonic() < deadline:
        time.sleep(0.2)
    with psycopg.connect(pg_url) as conn:
        tripped = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'guardrail_tripped' AND key = 'risky'")
        changes = [c for (c,) in conn.execute("SELECT change FROM revisions WHERE key = 'risky' ORDER BY version")]
        assert tripped.fetchone() == (1,)
    assert changes == ["created", "rolled_back"]
    assert monitor_holder(pg_url)[1] >= new_epoch
