"""Scale-out benchmarks (``make bench-scale``; records in ``bench/results/scale.json``), each beside its peer
measured in the same run:

* scheduler failover: two replicas on one PostgreSQL store (a throwaway server, guardmesh/localpg.py), a
  client of the client factory given both addresses submitting without pause; kill -9 of the leader; the
  seconds from the kill to the first acknowledged SubmitJob (necessarily on the new leader). Peer: one
  scheduler on the same store restarted at once after kill -9, as a supervisor would (process start,
  imports, state load). The issue's target is 10 s.
* SubmitJob throughput over gRPC (``--threads`` clients, each waiting for its answer, durable before the
  answer) on PostgreSQL vs SQLite (WAL, synchronous=FULL): the same workload on the same cluster.
* abrouter: logged Assign/s of one router on PostgreSQL vs the same on SQLite (4 client processes, the two
  routers driven in turn, ``--assign-rounds`` times; target ratio 0.8) and config propagation p99 between two
  replicas (target 1 s): ``bench.abrouter``'s part e, run here too so that the issue's figures are in one file.
* scorer: Score + Feedback across two replicas vs one, and a rollback's propagation (bench/scale_scorer.py).

``--note`` is added to each record's machine (e.g. ``loaded machine``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from bench.abrouter import replicas_bench
from bench.processes import calls_per_second, clean_env, free_port, start, stop, wait_serving
from bench.records import machine, record, write_records
from bench.scale_scorer import scorer_records
from guardmesh.client import open_channel
from guardmesh.config import load_config
from guardmesh.localpg import LocalPostgres
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

CLUSTER_TOML = "".join(
    f'[[nodes]]\nname = "node-{i}"\nmodel = "A100-80GB"\ngpus = 8\nmemory_mib = 81920\n\n' for i in range(8)
)


class Scheduler:
    """``python -m services.scheduler`` on a free port and ``store_url``, restartable."""

    def __init__(self, folder: Path, store_url: str, name: str) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        cluster = self.folder / "cluster.toml"
        cluster.write_text(CLUSTER_TOML)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = clean_env(
            self.folder,
            GUARDMESH__SERVICES__SCHEDULER__PORT=str(self.port),
            GUARDMESH__SERVICES__SCHEDULER__METRICS_PORT="0",
            GUARDMESH__SCHEDULER__STORE_URL=store_url,
            GUARDMESH__SCHEDULER__CLUSTER_FILE=str(cluster),
        )
        self.lives = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.lives += 1
        self.proc = start([sys.executable, "-m", "services.scheduler"], self.env, self.folder / f"{self.lives}.log")

    def serve(self) -> None:
        self.spawn()
        assert self.proc is not None
        wait_serving(self.address, "scheduler", self.proc, self.folder / f"{self.lives}.log", timeout=180)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@contextlib.contextmanager
def postgres() -> Iterator[LocalPostgres]:
    """A throwaway PostgreSQL server (fsync on, as in production)."""
    base = Path(tempfile.mkdtemp(prefix="guardmesh-bench-pg-"))
    server = LocalPostgres(base, free_port())
    server.init()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop("immediate")
        subprocess.run(["rm", "-rf", str(base)], check=False)


def job(job_id: str) -> spb.JobSpec:
    return spb.JobSpec(
        job_id=job_id, tenant="bench", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=1000, allow_sharing=True
    )


def until_acknowledged(stub: spb_grpc.SchedulerServiceStub, prefix: str, began: float, limit_s: float) -> float:
    """Submit new jobs until one is acknowledged; seconds since ``began``."""
    n = 0
    while time.monotonic() - began < limit_s:
        n += 1
        try:
            stub.SubmitJob(spb.SubmitJobRequest(job=job(f"{prefix}-{n}")), timeout=5)
            return time.monotonic() - began
        except grpc.RpcError:
            time.sleep(0.02)
    raise RuntimeError(f"no submit acknowledged within {limit_s} s")


def failover_once(server: LocalPostgres, folder: Path, i: int) -> tuple[float, float]:
    """(kill -9 of the leader -> first ack on the standby, kill -9 of a lone scheduler -> first ack after
    its immediate restart), on fresh databases of one server."""
    url = server.ensure_database(f"failover_{i}")
    leader, standby = Scheduler(folder, url, f"a{i}"), Scheduler(folder, url, f"b{i}")
    config = load_config(env={}).with_overrides({"client.reresolve_s": 0.5, "client.deadline_s": 5.0})
    leader.serve()
    standby.spawn()
    channel = open_channel("scheduler", config, addresses=[leader.address, standby.address])
    try:
        stub = spb_grpc.SchedulerServiceStub(channel)
        until_acknowledged(stub, f"warm{i}", time.monotonic(), 120)
        time.sleep(1.0)  # the standby has started and claimed (and lost) the lease by now
        began = time.monotonic()
        leader.kill9()
        failover = until_acknowledged(stub, f"after{i}", began, 120)
    finally:
        channel.close()
        standby.stop()
    lone = Scheduler(folder, server.ensure_database(f"restart_{i}"), f"lone{i}")
    lone.serve()
    with grpc.insecure_channel(lone.address) as plain:
        stub = spb_grpc.SchedulerServiceStub(plain)
        until_acknowledged(stub, f"warm{i}", time.monotonic(), 120)
        began = time.monotonic()
        lone.kill9()
        lone.spawn()  # the supervisor's restart, at once
        restart = until_acknowledged(stub, f"after{i}", began, 180)
    lone.stop()
    return failover, restart


def submit_throughput(store_url: str, folder: Path, name: str, jobs: int, threads: int) -> float:
    """Acknowledged SubmitJob calls per second, ``threads`` clients sharing ``jobs`` submits."""
    sched = Scheduler(folder, store_url, name)
    sched.serve()
    try:
        config = load_config(env={})
        with open_channel("scheduler", config, address=sched.address) as channel:
            stub = spb_grpc.SchedulerServiceStub(channel)
            until_acknowledged(stub, "warm", time.monotonic(), 60)

            def submit(t: int, n: int) -> None:
                stub.SubmitJob(spb.SubmitJobRequest(job=job(f"t{t}-{n}")), timeout=30)

            try:
                return calls_per_second(submit, threads, jobs // threads)
            except RuntimeError as exc:
                raise RuntimeError(f"{name}: {exc}") from exc
    finally:
        sched.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--failovers", type=int, default=3, help="kill -9 rounds (each with its peer)")
    parser.add_argument("--jobs", type=int, default=600, help="SubmitJob calls per backend")
    parser.add_argument("--threads", type=int, default=8, help="concurrent SubmitJob clients")
    parser.add_argument("--scorer-pairs", type=int, default=400, help="Score + Feedback pairs per scorer setup")
    parser.add_argument("--assign-seconds", type=float, default=8.0, help="seconds of each logged-Assign turn")
    parser.add_argument("--assign-rounds", type=int, default=3, help="turns of each backend (medians kept)")
    parser.add_argument("--note", default="", help="added to each record's machine (e.g. 'loaded machine')")
    args = parser.parse_args(argv)
    records: list[dict[str, Any]] = []
    with postgres() as server, tempfile.TemporaryDirectory(prefix="guardmesh-bench-scale-") as tmp:
        folder = Path(tmp)
        rounds = [failover_once(server, folder, i) for i in range(args.failovers)]
        failovers, restarts = [r[0] for r in rounds], [r[1] for r in rounds]
        lease_s = load_config(env={}).scheduler.leader_lease_s
        for what, pick in (("median", statistics.median), ("worst", max)):
            rec = record(
                f"scheduler failover, kill -9 of the leader -> first acknowledged SubmitJob on the standby, "
                f"{what} of {len(rounds)} (leader_lease_s={lease_s:g}, PostgreSQL)",
                "s",
                pick(failovers),
                "one scheduler restarted at once after kill -9 (same store)",
                pick(restarts),
                None,
                higher_is_better=False,
            )
            rec["target_s"] = 10.0
            rec["samples_s"] = {"ours": failovers, "peer": restarts}
            records.append(rec)
        pg = submit_throughput(server.ensure_database("throughput"), folder, "pg", args.jobs, args.threads)
        sqlite = submit_throughput(f"sqlite:///{folder / 'throughput.db'}", folder, "sqlite", args.jobs, args.threads)
        records.append(
            record(
                f"scheduler SubmitJob/s over gRPC on PostgreSQL, {args.threads} clients (durable before the answer)",
                "submits/s",
                pg,
                "the same on SQLite (WAL, synchronous=FULL)",
                sqlite,
                None,
            )
        )
        records += scorer_records(server, folder, args.scorer_pairs, clients=4, rollbacks=5)  # bench/scale_scorer.py
    records += replicas_bench(args.assign_seconds, args.assign_rounds)  # its own PostgreSQL server
    if args.note:
        for r in records:
            r["machine"] = f"{machine()}; {args.note}"
    write_records("scale", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
