"""``make load``: a multi-process gRPC load generator over every service's main RPCs, beside a bare echo.

    python -m bench.load [--seconds 15] [--processes 4] [--threads 4] [--deadline 5]

The four services run as their own processes (``python -m services.<name>`` through
``bench.processes.service_process``: a free loopback port, state in a temp dir, ``logging.level = WARNING``,
SQLite ``synchronous = NORMAL`` for the scheduler and the abrouter; the abrouter's ``services.scorer.port``
points at the scorer so that Route reaches it). Set-up, in this process, before any load:

* scheduler: 8 simulated nodes of 8 A100-80GB cards;
* paramserver: model ``load`` (64x64 + 64 + 64x64 + 64 float32, SGD, bounded staleness 16);
* scorer: a TorchScript MLP (16 features, 32-32 hidden) registered with 1,000 reference rows, active;
* abrouter: experiment ``load-exp`` (control/treatment 50/50, metric ``conversion``, model = the MLP).

The generator is ``--processes`` spawned processes of ``--threads`` client threads each; every thread owns
one channel, drives one service (threads are dealt to services in turn, so the four services get the same
number of threads) and makes one call at a time, each with a deadline. A thread's cycle per service:

* scheduler: SubmitJob (1 GPU, 1,024 MiB, shared, so every job fits), RenewLease and DescribeJob of one of
  its running jobs, ReleaseJob of its oldest job once it holds more than 16 (capacity never runs out);
* paramserver: Pull (every tensor), then Push of gradients for every tensor on the pulled version;
* scorer: Score (16 features);
* abrouter: Assign (``log_exposure=true``, covariates), Route (through the scorer), RecordMetrics of a unit
  the thread's Assign exposed.

All processes start at once after every thread is connected and stop issuing calls after ``--seconds``.
An RPC error is counted under its status code, never raised. Then the same generator (same processes,
threads and duration) drives a bare grpcio echo server in its own process (``python -m bench.paramserver
--echo-server PORT``: a generic unary handler on raw bytes, no protobuf, no interceptors) with the
serialized bytes of the requests above: the per-call floor of this harness and gRPC on this machine.

Per RPC: calls (all finished calls, errors included), ok, QPS (calls / seconds), p50/p99/p99.9 latency in
ms over all calls, errors by status code, notes (e.g. SubmitJob answers that were PENDING). Printed as a
table and written to ``bench/results/load.json``: a list whose first element is the header
(``kind = "header"``: machine, duration, processes, threads, ...), then one dict per RPC (``kind = "rpc"``),
the echo line last (``peer = true``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import queue
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as ppb
from guardmesh.v1 import paramserver_pb2_grpc as ppb_grpc
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as cpb
from guardmesh.v1 import scorer_pb2_grpc as cpb_grpc

SERVICES = ("scheduler", "paramserver", "scorer", "abrouter")
#: RPCs per service in report order.
OPS = {
    "scheduler": ("SubmitJob", "RenewLease", "DescribeJob", "ReleaseJob"),
    "paramserver": ("Pull", "Push"),
    "scorer": ("Score",),
    "abrouter": ("Assign", "Route", "RecordMetrics"),
}
ECHO_NAME = "peer: bare grpcio echo"
ECHO_METHOD = "/bench.Echo/Unary"

NODES, GPUS_PER_NODE, GPU_MIB = 8, 8, 81_920
JOB_MIB = 1024
JOBS_HELD = 16
PS_MODEL = "load"
PS_TENSORS = {"w1": (64, 64), "b1": (64,), "w2": (64, 64), "b2": (64,)}
SCORER_MODEL = "load-mlp"
FEATURES = tuple(f"f{i}" for i in range(16))
EXPERIMENT = "load-exp"
METRIC = "conversion"
RESULTS = Path(__file__).resolve().parent / "results" / "load.json"


# -- the client side (runs in the spawned processes) ------------------------------------------------------


class _Stop(Exception):
    """The measurement window is over: the thread issues no further call."""


class Recorder:
    """One thread's figures: latencies (s) per RPC, errors by status code, notes (non-error outcomes)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.end = float("inf")
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, Counter[str]] = defaultdict(Counter)
        self.notes: dict[str, Counter[str]] = defaultdict(Counter)
        self.recording = False

    def call(self, op: str, fn: Callable[..., Any], request: Any) -> Any:
        """Make one call with a deadline; None when it failed (the failure is counted, not raised)."""
        start = time.perf_counter()
        if start >= self.end:
            raise _Stop
        response = None
        code = None
        try:
            response = fn(request, timeout=self.deadline_s)
        except grpc.RpcError as exc:
            status = exc.code() if callable(getattr(exc, "code", None)) else None
            code = status.name if status is not None else "UNKNOWN"
        except Exception as exc:  # a client-side failure is counted like any other error
            code = f"client:{type(exc).__name__}"
        if self.recording:
            self.latencies[op].append(time.perf_counter() - start)
            if code is not None:
                self.errors[op][code] += 1
        return response

    def note(self, op: str, what: str) -> None:
        if self.recording:
            self.notes[op][what] += 1


class SchedulerDriver:
    """SubmitJob, RenewLease + DescribeJob of a held job, ReleaseJob of the oldest beyond JOBS_HELD."""

    def __init__(self, channel: grpc.Channel, tag: str) -> None:
        self.stub = spb_grpc.SchedulerServiceStub(channel)
        self.tag = tag
        self.held: deque[str] = deque()
        self.n = 0

    def requests(self) -> list[bytes]:
        return [self._submit("echo").SerializeToString()]

    def _submit(self, job_id: str) -> spb.SubmitJobRequest:
        return spb.SubmitJobRequest(
            job=spb.JobSpec(
                job_id=job_id,
                tenant="load",
                qos=spb.QOS_CLASS_BURSTABLE,
                replicas=1,
                gpus_per_replica=1,
                memory_mib_per_gpu=JOB_MIB,
                allow_sharing=True,
                lease_ttl_s=3600,
            )
        )

    def step(self, rec: Recorder) -> None:
        job_id = f"{self.tag}-{self.n}"
        self.n += 1
        resp = rec.call("SubmitJob", self.stub.SubmitJob, self._submit(job_id))
        if resp is not None:
            if resp.job.state == spb.JOB_STATE_RUNNING:
                self.held.append(job_id)
            else:
                rec.note("SubmitJob", spb.JobState.Name(resp.job.state))
                rec.call("ReleaseJob", self.stub.ReleaseJob, spb.ReleaseJobRequest(job_id=job_id))
        if self.held:
            target = self.held[self.n % len(self.held)]
            rec.call("RenewLease", self.stub.RenewLease, spb.RenewLeaseRequest(job_id=target, replica=0))
            rec.call("DescribeJob", self.stub.DescribeJob, spb.DescribeJobRequest(job_id=target))
        if len(self.held) > JOBS_HELD:
            rec.call("ReleaseJob", self.stub.ReleaseJob, spb.ReleaseJobRequest(job_id=self.held.popleft()))


class ParamServerDriver:
    """Pull every tensor, then Push a gradient for every tensor on the pulled version."""

    def __init__(self, channel: grpc.Channel, tag: str) -> None:
        self.stub = ppb_grpc.ParamServerServiceStub(channel)
        self.tag = tag
        self.base = 0
        self.step_id = 0
        rng = np.random.default_rng(zlib.crc32(tag.encode()))
        self.gradients = [
            ppb.NamedTensor(
                name=name,
                tensor=common_pb2.Tensor(
                    dtype=common_pb2.D_TYPE_FLOAT32,
                    shape=list(shape),
                    data=(rng.standard_normal(shape) * 1e-3).astype("<f4").tobytes(),
                ),
            )
            for name, shape in PS_TENSORS.items()
        ]

    def _push(self) -> ppb.PushRequest:
        return ppb.PushRequest(
            model=PS_MODEL, worker_id=self.tag, base_version=self.base, step_id=self.step_id, gradients=self.gradients
        )

    def requests(self) -> list[bytes]:
        return [ppb.PullRequest(model=PS_MODEL).SerializeToString(), self._push().SerializeToString()]

    def step(self, rec: Recorder) -> None:
        resp = rec.call("Pull", self.stub.Pull, ppb.PullRequest(model=PS_MODEL))
        if resp is not None:
            self.base = resp.version
        push = rec.call("Push", self.stub.Push, self._push())
        self.step_id += 1
        if push is not None and push.outcome != ppb.PUSH_OUTCOME_APPLIED:
            rec.note("Push", ppb.PushOutcome.Name(push.outcome))


def _feature_rows(seed: int, n: int = 64) -> list[dict[str, float]]:
    rows = np.random.default_rng(seed).standard_normal((n, len(FEATURES)))
    return [dict(zip(FEATURES, map(float, r), strict=True)) for r in rows]


class ScorerDriver:
    """Score one row of features."""

    def __init__(self, channel: grpc.Channel, tag: str) -> None:
        self.stub = cpb_grpc.ScorerServiceStub(channel)
        self.tag = tag
        self.rows = _feature_rows(zlib.crc32(tag.encode()))
        self.n = 0

    def _score(self) -> cpb.ScoreRequest:
        return cpb.ScoreRequest(
            model=SCORER_MODEL, request_id=f"{self.tag}-{self.n}", features=self.rows[self.n % len(self.rows)]
        )

    def requests(self) -> list[bytes]:
        return [self._score().SerializeToString()]

    def step(self, rec: Recorder) -> None:
        rec.call("Score", self.stub.Score, self._score())
        self.n += 1


class ABRouterDriver:
    """Assign (exposure logged), Route through the scorer, RecordMetrics of an exposed unit."""

    def __init__(self, channel: grpc.Channel, tag: str) -> None:
        self.stub = apb_grpc.ABRouterServiceStub(channel)
        self.tag = tag
        self.rows = _feature_rows(zlib.crc32(tag.encode()) + 1)
        self.exposed: deque[str] = deque(maxlen=256)
        self.n = 0

    def _assign(self) -> apb.AssignRequest:
        return apb.AssignRequest(
            unit_id=f"{self.tag}-u{self.n}",
            experiment_keys=[EXPERIMENT],
            log_exposure=True,
            covariates=apb.Covariates(
                numeric={"age": float(20 + self.n % 50)}, categorical={"device": ("ios", "android", "web")[self.n % 3]}
            ),
        )

    def _route(self) -> apb.RouteRequest:
        unit = f"{self.tag}-r{self.n}"
        return apb.RouteRequest(
            experiment_key=EXPERIMENT,
            unit_id=unit,
            request_id=unit,
            features=self.rows[self.n % len(self.rows)],
            log_exposure=True,
        )

    def _metrics(self, unit: str) -> apb.RecordMetricsRequest:
        return apb.RecordMetricsRequest(
            experiment_key=EXPERIMENT,
            observations=[apb.MetricObservation(unit_id=unit, metric=METRIC, value=float(self.n % 2))],
        )

    def requests(self) -> list[bytes]:
        return [r.SerializeToString() for r in (self._assign(), self._route(), self._metrics("u"))]

    def step(self, rec: Recorder) -> None:
        unit = f"{self.tag}-u{self.n}"
        resp = rec.call("Assign", self.stub.Assign, self._assign())
        if resp is not None and resp.assignments and resp.assignments[0].exposure_logged:
            self.exposed.append(unit)
        rec.call("Route", self.stub.Route, self._route())
        if self.exposed:
            rec.call("RecordMetrics", self.stub.RecordMetrics, self._metrics(self.exposed.popleft()))
        self.n += 1


class EchoDriver:
    """The peer: the same thread sends the serialized bytes of its service's requests to the bare echo."""

    def __init__(self, channel: grpc.Channel, payloads: list[bytes]) -> None:
        self.call = channel.unary_unary(ECHO_METHOD)
        self.payloads = payloads
        self.n = 0

    def step(self, rec: Recorder) -> None:
        rec.call("Unary", self.call, self.payloads[self.n % len(self.payloads)])
        self.n += 1


DRIVERS: dict[str, Callable[[grpc.Channel, str], Any]] = {
    "scheduler": SchedulerDriver,
    "paramserver": ParamServerDriver,
    "scorer": ScorerDriver,
    "abrouter": ABRouterDriver,
}


def _thread_service(process: int, thread: int, threads: int) -> str:
    return SERVICES[(process * threads + thread) % len(SERVICES)]


def _client_thread(
    rec: Recorder, driver: Any, ready: threading.Barrier, go: Any, seconds: float, failed: list[str]
) -> None:
    try:
        driver.step(rec)  # warm-up cycle (connects, loads caches), not recorded
    except _Stop:
        pass
    except Exception as exc:  # reported to the parent, which gives up
        failed.append(repr(exc))
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        return
    if not go.wait(timeout=300):
        return
    rec.recording = True
    rec.end = time.perf_counter() + seconds
    while True:
        try:
            driver.step(rec)
        except _Stop:
            return


def worker(
    index: int,
    threads: int,
    mode: str,
    targets: dict[str, str],
    seconds: float,
    deadline_s: float,
    ready_q: Any,
    go: Any,
    out_q: Any,
) -> None:
    """One generator process: ``threads`` client threads, each one call at a time; results to ``out_q``."""
    channels: list[grpc.Channel] = []
    try:
        recorders: list[Recorder] = []
        thread_objs: list[threading.Thread] = []
        failed: list[str] = []
        barrier = threading.Barrier(threads + 1)
        for t in range(threads):
            service = _thread_service(index, t, threads)
            tag = f"p{index}t{t}"
            if mode == "echo":
                channel = grpc.insecure_channel(targets["echo"])
                driver: Any = EchoDriver(channel, DRIVERS[service](channel, tag).requests())
            else:
                channel = grpc.insecure_channel(targets[service])
                driver = DRIVERS[service](channel, tag)
            channels.append(channel)
            rec = Recorder(deadline_s)
            recorders.append(rec)
            th = threading.Thread(target=_client_thread, args=(rec, driver, barrier, go, seconds, failed), daemon=True)
            thread_objs.append(th)
            th.start()
        barrier.wait(timeout=120)
        ready_q.put((index, failed[:]))
        for th in thread_objs:
            th.join(timeout=seconds + 300)
        result: dict[str, dict[str, Any]] = {}
        for t, rec in enumerate(recorders):
            service = ECHO_NAME if mode == "echo" else _thread_service(index, t, threads)
            for op, lat in rec.latencies.items():
                entry = result.setdefault(f"{service}/{op}", {"latencies": [], "errors": Counter(), "notes": Counter()})
                entry["latencies"].extend(lat)
                entry["errors"].update(rec.errors[op])
                entry["notes"].update(rec.notes[op])
        alive = sum(th.is_alive() for th in thread_objs)
        out_q.put((index, result, alive))
    except KeyboardInterrupt:
        pass
    finally:
        for channel in channels:
            channel.close()


def drive(
    mode: str,
    targets: dict[str, str],
    processes: int,
    threads: int,
    seconds: float,
    deadline_s: float,
) -> dict[str, dict[str, Any]]:
    """Spawn the generator processes, start them together, merge their figures by ``service/RPC``."""
    ctx = mp.get_context("spawn")
    ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=worker,
            args=(i, threads, mode, targets, seconds, deadline_s, ready_q, go, out_q),
            name=f"load-{mode}-{i}",
            daemon=True,
        )
        for i in range(processes)
    ]
    merged: dict[str, dict[str, Any]] = {}
    done = False
    try:
        for p in procs:
            p.start()
        ready = _gather(ready_q, procs, timeout=180)
        if len(ready) < processes:
            raise RuntimeError(f"{mode}: {processes - len(ready)} generator process(es) did not get ready")
        for index, failed in ready:
            if failed:
                raise RuntimeError(f"{mode}: generator process {index} failed its warm-up: {failed[0]}")
        go.set()
        print(f"{mode}: {processes} processes x {threads} threads for {seconds:g} s ...", flush=True)
        results = _gather(out_q, procs, timeout=seconds + deadline_s * 4 + 60)
        if len(results) < processes:
            print(f"warning: {processes - len(results)} generator process(es) sent no figures", file=sys.stderr)
        for _, result, stuck in results:
            if stuck:
                print(f"warning: {stuck} client thread(s) still in a call after the window", file=sys.stderr)
            for key, entry in result.items():
                m = merged.setdefault(key, {"latencies": [], "errors": Counter(), "notes": Counter()})
                m["latencies"].extend(entry["latencies"])
                m["errors"].update(entry["errors"])
                m["notes"].update(entry["notes"])
        done = True
    finally:
        for p in procs:  # on an error or an interrupt, at once; else they are exiting anyway
            p.join(timeout=10 if done else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        ready_q.close()
        out_q.close()
    return merged


def _gather(q: Any, procs: list[Any], timeout: float) -> list[Any]:
    """One message (its first item the process index) from each process; fewer when some exit without
    one (what a process put is in the pipe before it exits) or at the timeout."""
    items: list[Any] = []
    reported: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            item = q.get(timeout=0.5)
        except queue.Empty:
            gone = {i for i, p in enumerate(procs) if i not in reported and not p.is_alive()}
            if len(reported) + len(gone) >= len(procs):
                break
            continue
        items.append(item)
        reported.add(item[0])
        if len(reported) == len(procs):
            break
    return items


# -- the set-up and the report (this process) -------------------------------------------------------------


def _mlp_payload() -> bytes:
    import io

    import torch

    from services.scorer.registry import mlp

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(mlp(len(FEATURES), (32, 32)).eval()), buf)
    return buf.getvalue()


def set_up(targets: dict[str, str], mlp_payload: bytes, deadline_s: float = 30.0) -> dict[str, Any]:
    """Nodes, the PS model, the scorer model (active) and the experiment; what was made, for the header."""
    t = deadline_s
    with grpc.insecure_channel(targets["scheduler"]) as ch:
        stub = spb_grpc.SchedulerServiceStub(ch)
        for n in range(NODES):
            name = f"load-node-{n}"
            gpus = [
                spb.GpuDevice(index=i, uuid=f"GPU-{name}-{i}", model="A100-80GB", memory_mib=GPU_MIB)
                for i in range(GPUS_PER_NODE)
            ]
            stub.RegisterNode(spb.RegisterNodeRequest(node=spb.NodeSpec(name=name, gpus=gpus)), timeout=t)
    with grpc.insecure_channel(targets["paramserver"]) as ch:
        rng = np.random.default_rng(0)
        tensors = [
            ppb.NamedTensor(
                name=name,
                tensor=common_pb2.Tensor(
                    dtype=common_pb2.D_TYPE_FLOAT32,
                    shape=list(shape),
                    data=(rng.standard_normal(shape) * 0.1).astype("<f4").tobytes(),
                ),
            )
            for name, shape in PS_TENSORS.items()
        ]
        ppb_grpc.ParamServerServiceStub(ch).CreateModel(
            ppb.CreateModelRequest(
                model=PS_MODEL,
                tensors=tensors,
                optimizer=ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_SGD, learning_rate=0.01),
                consistency=ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_BOUNDED_STALENESS, max_staleness=16),
                checkpoint_every=0,
            ),
            timeout=t,
        )
    with grpc.insecure_channel(targets["scorer"]) as ch:
        reference = np.random.default_rng(1).standard_normal((1000, len(FEATURES))).astype("<f4")
        cpb_grpc.ScorerServiceStub(ch).RegisterModel(
            cpb.RegisterModelRequest(
                model=SCORER_MODEL,
                version="v1",
                features=list(FEATURES),
                format=cpb.MODEL_FORMAT_TORCHSCRIPT,
                payload=mlp_payload,
                activate=True,
                reference=common_pb2.Tensor(
                    dtype=common_pb2.D_TYPE_FLOAT32, shape=list(reference.shape), data=reference.tobytes()
                ),
            ),
            timeout=t,
        )
    with grpc.insecure_channel(targets["abrouter"]) as ch:
        apb_grpc.ABRouterServiceStub(ch).CreateExperiment(
            apb.CreateExperimentRequest(
                spec=apb.ExperimentSpec(
                    key=EXPERIMENT,
                    arms=[apb.Arm(name="control", weight=0.5), apb.Arm(name="treatment", weight=0.5)],
                    metrics=[METRIC],
                    model=SCORER_MODEL,
                )
            ),
            timeout=t,
        )
    return {
        "scheduler": f"{NODES} nodes x {GPUS_PER_NODE} A100-80GB; jobs 1 GPU x {JOB_MIB} MiB shared, "
        f"<= {JOBS_HELD} held per thread",
        "paramserver": f"model '{PS_MODEL}' "
        + " + ".join("x".join(map(str, s)) for s in PS_TENSORS.values())
        + " float32, SGD, bounded staleness 16",
        "scorer": f"TorchScript MLP {len(FEATURES)}-32-32-1, active",
        "abrouter": f"experiment '{EXPERIMENT}' 50/50, metric '{METRIC}', model '{SCORER_MODEL}'",
    }


def _overrides(name: str, addresses: dict[str, str]) -> dict[str, str]:
    if name == "scheduler":
        return {"GUARDMESH__SCHEDULER__SQLITE_SYNCHRONOUS": "NORMAL"}
    if name == "abrouter":  # Route's scorer calls go to the scorer started just before
        return {
            "GUARDMESH__ABROUTER__SQLITE_SYNCHRONOUS": "NORMAL",
            "GUARDMESH__SERVICES__SCORER__HOST": "127.0.0.1",
            "GUARDMESH__SERVICES__SCORER__PORT": addresses["scorer"].rsplit(":", 1)[1],
        }
    return {}


@contextlib.contextmanager
def mesh(
    chains: tuple[tuple[str, ...], ...] = (("scorer", "abrouter"), ("scheduler", "paramserver")),
) -> Iterator[dict[str, str]]:
    """The four services, each its own process (``service_process``), started by chains in parallel (the
    abrouter needs the scorer's port); every started one is stopped (SIGTERM, in parallel) on the way out,
    whatever happens, an interrupt during the start included."""
    from bench.processes import service_process

    addresses: dict[str, str] = {}
    entered: list[contextlib.AbstractContextManager[str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    closing = threading.Event()
    finished = [threading.Event() for _ in chains]

    def start(chain: tuple[str, ...], done: threading.Event) -> None:
        try:
            for name in chain:
                if errors or closing.is_set():
                    return
                with lock:
                    cm = service_process(name, _overrides(name, addresses))
                try:
                    address = cm.__enter__()
                except BaseException as exc:  # the generator has cleaned its own process up
                    errors.append(exc)
                    return
                with lock:
                    if not closing.is_set():
                        entered.append(cm)
                        addresses[name] = address
                        continue
                cm.__exit__(None, None, None)  # the mesh went down while this one started: stop it here
                return
        finally:
            done.set()

    threads = [
        threading.Thread(target=start, args=(chain, done), name=f"start-{chain[0]}")
        for chain, done in zip(chains, finished, strict=True)
    ]
    try:
        for t in threads:
            t.start()
        for done in finished:
            done.wait()
        if errors:
            raise RuntimeError(f"the mesh did not start: {errors[0]}") from errors[0]
        yield dict(addresses)
    finally:
        with lock:
            closing.set()
        stoppers = [threading.Thread(target=cm.__exit__, args=(None, None, None)) for cm in entered]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for done in finished:  # starts still in flight (an interrupt) stop what they started themselves
            done.wait()


@contextlib.contextmanager
def echo_server() -> Iterator[Callable[[], str]]:
    """The bare grpcio echo in its own process, as bench/abrouter.py starts it; started at once, it yields
    a function that waits until it serves and returns its address. Stopped (SIGTERM) on the way out."""
    from bench.processes import ECHO_SERVICE, clean_env, free_port, start, stop, wait_serving

    with tempfile.TemporaryDirectory(prefix="guardmesh-load-echo-") as tmp:
        port = free_port()
        address = f"127.0.0.1:{port}"
        log = Path(tmp) / "echo.log"
        proc = start([sys.executable, "-m", "bench.paramserver", "--echo-server", str(port)], clean_env(tmp), log)

        def ready() -> str:
            wait_serving(address, ECHO_SERVICE, proc, log)
            return address

        try:
            yield ready
        finally:
            stop(proc)


def summarize(merged: dict[str, dict[str, Any]], seconds: float, peer: bool) -> list[dict[str, Any]]:
    """One dict per RPC, in service order."""
    order = [f"{s}/{op}" for s in SERVICES for op in OPS[s]] + [f"{ECHO_NAME}/Unary"]
    keys = sorted(merged, key=lambda k: order.index(k) if k in order else len(order))
    rows = []
    for key in keys:
        service, op = key.split("/", 1)
        entry = merged[key]
        lat = np.asarray(entry["latencies"], dtype=np.float64) * 1e3
        errors = dict(sorted(entry["errors"].items()))
        calls = int(lat.size)

        def pct(q: float, lat: np.ndarray = lat) -> float | None:
            return float(np.percentile(lat, q)) if lat.size else None

        rows.append(
            {
                "kind": "rpc",
                "service": service,
                "rpc": op,
                "peer": peer,
                "calls": calls,
                "ok": calls - sum(errors.values()),
                "qps": calls / seconds,
                "p50_ms": pct(50),
                "p99_ms": pct(99),
                "p999_ms": pct(99.9),
                "errors": errors,
                "notes": dict(sorted(entry["notes"].items())),
            }
        )
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Print the table and write bench/results/load.json."""
    from rich.console import Console
    from rich.table import Table

    from bench.records import results_path, say_where

    path = results_path(RESULTS.name)
    path.write_text(json.dumps([header, *rows], indent=2) + "\n", encoding="utf-8")
    table = Table(
        title=f"guardmesh load: {header['processes']} processes x {header['threads_per_process']} threads, "
        f"{header['duration_s']:g} s per run ({header['machine']})"
    )
    for col in ("service", "rpc", "calls", "QPS", "p50 ms", "p99 ms", "p99.9 ms", "errors"):
        table.add_column(col, justify="left" if col in ("service", "rpc", "errors") else "right", overflow="fold")
    mesh_rows = [r for r in rows if not r["peer"]]
    for r in rows:
        if r["peer"] and mesh_rows:
            total = sum(m["calls"] for m in mesh_rows)
            failed = sum(m["calls"] - m["ok"] for m in mesh_rows)
            table.add_row(
                "all services", "-", f"{total:,}", f"{total / header['duration_s']:,.0f}", "", "", "", f"{failed:,}"
            )
            table.add_section()
        errors = ", ".join(f"{k} {v:,}" for k, v in r["errors"].items()) or "0"
        if r["notes"]:
            errors += " (" + ", ".join(f"{k} {v:,}" for k, v in r["notes"].items()) + ")"
        table.add_row(
            r["service"],
            r["rpc"],
            f"{r['calls']:,}",
            f"{r['qps']:,.1f}",
            _ms(r["p50_ms"]),
            _ms(r["p99_ms"]),
            _ms(r["p999_ms"]),
            errors,
        )
    Console(width=160).print(table)
    say_where(path)


def main(argv: list[str] | None = None) -> int:
    """Set up the mesh, drive it, drive the echo, report."""
    from bench.records import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="load time of each run (mesh, then echo)")
    ap.add_argument("--processes", type=int, default=4, help="generator processes")
    ap.add_argument("--threads", type=int, default=4, help="client threads per process")
    ap.add_argument("--deadline", type=float, default=5.0, help="deadline of every call, seconds")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.processes < 1 or args.threads < 1 or args.deadline <= 0:
        ap.error("--seconds and --deadline must be > 0, --processes and --threads >= 1")
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(1))
            payload = pool.submit(_mlp_payload)  # torch's import overlaps the services' start
            echo_ready = stack.enter_context(echo_server())  # idle until the mesh is down
            with mesh() as targets:
                started = time.monotonic() - t0
                setup = set_up(targets, payload.result())
                setup_s = time.monotonic() - t0
                print(f"mesh up in {started:.1f} s, set up at {setup_s:.1f} s: {targets}", flush=True)
                merged = drive("mesh", targets, args.processes, args.threads, args.seconds, args.deadline)
            rows = summarize(merged, args.seconds, peer=False)
            echo = {"echo": echo_ready()}
            merged = drive("echo", echo, args.processes, args.threads, args.seconds, args.deadline)
            rows += summarize(merged, args.seconds, peer=True)
    except KeyboardInterrupt:
        print("interrupted: every process was stopped", file=sys.stderr)
        return 130
    header = {
        "kind": "header",
        "machine": machine(),
        "duration_s": args.seconds,
        "processes": args.processes,
        "threads_per_process": args.threads,
        "threads_per_service": args.processes * args.threads / len(SERVICES),
        "deadline_s": args.deadline,
        "setup": setup,
        "setup_s": setup_s,
        "total_s": time.monotonic() - t0,
        "latency": "ms over every finished call, errors included; qps = calls / duration_s",
        "peer": "bare grpcio echo (python -m bench.paramserver --echo-server), generic unary on raw bytes, "
        "same processes, threads and duration, each thread sending its service's serialized requests",
    }
    report(header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
