"""Helpers of ``tests/test_chaos.py``: service processes (:mod:`tests.processes`) set up for it, and client threads
that drive traffic through the normal clients and record only what was acknowledged.

A driver retries a call that answers UNAVAILABLE (after the channel's own retries gave up) with the same
request on the same channel: the channel, not the test, has to reconnect to the restarted process.
Every other status is an error the test reports, unless the driver documents it as part of the protocol
(a paramserver push rejected as stale or ABORTED after a restore asks for a re-pull).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import traceback
import zlib
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from guardmesh.sdk.paramserver import ParamServerClient, PullResult, StalePush
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import paramserver_pb2 as ppb
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as cpb
from guardmesh.v1 import scorer_pb2_grpc as cpb_grpc
from tests.processes import ServiceProcess

#: How long one logical call keeps retrying UNAVAILABLE before the driver reports it as an error.
RETRY_BUDGET_S = 45.0
#: Pause before retrying a call that answered UNAVAILABLE.
RETRY_PAUSE_S = 0.1
#: Deadline of every unary call a driver makes.
CALL_TIMEOUT_S = 10.0


# -- processes ----------------------------------------------------------------------------------------------


def chaos_process(name: str, root: Path, **env: str) -> ServiceProcess:
    """``python -m services.<name>`` with its logs and state folder under ``root``, a short drain (grace 2 s,
    no drain delay) and one OpenMP thread; ``env`` overrides on top."""
    chaos_env = {"GUARDMESH__GRPC__GRACE_S": "2", "GUARDMESH__GRPC__DRAIN_DELAY_S": "0", "OMP_NUM_THREADS": "1"}
    return ServiceProcess(name, root, {**chaos_env, **env})


# -- drivers ------------------------------------------------------------------------------------------------


class Stopped(Exception):
    """The driver was asked to stop while a call was being retried."""


class Driver(threading.Thread):
    """A client thread: ``step`` repeatedly until stopped, with a pause between steps."""

    service = ""

    def __init__(self, name: str, stop: threading.Event, pace_s: float = 0.01) -> None:
        super().__init__(name=name, daemon=True)
        self.stop_event = stop
        self.pace_s = pace_s
        self.calls = 0
        self.unavailable = 0
        self.aborted = 0
        self.ack_times: list[float] = []
        self.errors: list[str] = []
        self.crash = ""

    @property
    def acked(self) -> int:
        return len(self.ack_times)

    def acks_after(self, t: float) -> int:
        return sum(1 for a in self.ack_times[-1000:] if a >= t)

    def first_ack_after(self, t: float) -> float | None:
        return next((a for a in self.ack_times[-1000:] if a >= t), None)

    def ack(self) -> None:
        self.ack_times.append(time.monotonic())

    def error(self, what: str, err: grpc.RpcError | Exception) -> None:
        if isinstance(err, grpc.RpcError):
            self.errors.append(f"{self.name} {what}: {err.code().name}: {err.details()}")
        else:
            self.errors.append(f"{self.name} {what}: {type(err).__name__}: {err}")

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.step()
                self.stop_event.wait(self.pace_s)
        except Stopped:
            pass
        except BaseException:
            self.crash = traceback.format_exc()

    def step(self) -> None:
        raise NotImplementedError

    def rpc(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; UNAVAILABLE is counted and retried with the same arguments (same channel)."""
        deadline = time.monotonic() + RETRY_BUDGET_S
        while True:
            self.calls += 1
            try:
                return fn(*args, **kwargs)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.unavailable += 1
                if self.stop_event.is_set():
                    raise Stopped from None
                if time.monotonic() > deadline:
                    self.error(f"{what} still UNAVAILABLE after {RETRY_BUDGET_S:.0f}s", err)
                    raise Stopped from None
                time.sleep(RETRY_PAUSE_S)


Where = list[tuple[int, str, tuple[tuple[str, int, int], ...]]]


def where(job: spb.Job) -> Where:
    """A job's placements as comparable values: replica, node, and per GPU its uuid, index and cap."""
    return sorted(
        (p.replica, p.node, tuple((g.uuid, g.index, g.memory_cap_mib) for g in p.gpus)) for p in job.placements
    )


class SchedulerDriver(Driver):
    """Submits jobs (exclusive and shared), renews the leases of its running jobs and releases the oldest,
    keeping at most ``keep`` of its jobs alive."""

    service = "scheduler"

    def __init__(self, name: str, stop: threading.Event, channel: grpc.Channel, keep: int = 6) -> None:
        super().__init__(name, stop, pace_s=0.04)
        self.stub = spb_grpc.SchedulerServiceStub(channel)
        self.keep = keep
        self.i = 0
        self.live: deque[str] = deque()
        #: The last acknowledged view of every job this driver touched.
        self.acked_jobs: dict[str, spb.Job] = {}
        self.tried: set[str] = set()
        self.counts: Counter[str] = Counter()

    def spec(self, job_id: str) -> spb.JobSpec:
        spec = spb.JobSpec(
            job_id=job_id,
            tenant="chaos",
            qos=spb.QOS_CLASS_BURSTABLE,
            replicas=1,
            gpus_per_replica=1,
            lease_ttl_s=600,  # the drivers renew; a lease never lapses during the test
        )
        if self.i % 2:
            spec.gpu_share_milli = 250
            spec.allow_sharing = True
        else:
            spec.memory_mib_per_gpu = 6144
        return spec

    def step(self) -> None:
        job_id = f"{self.name}-{self.i}"
        spec = self.spec(job_id)
        self.i += 1
        self.tried.add(job_id)
        try:
            job = self.rpc("SubmitJob", self.stub.SubmitJob, spb.SubmitJobRequest(job=spec), timeout=CALL_TIMEOUT_S).job
        except grpc.RpcError as err:
            self.error(f"SubmitJob {job_id}", err)
            return
        self.acked_jobs[job_id] = job
        self.live.append(job_id)
        self.counts["placed" if job.state == spb.JOB_STATE_RUNNING else spb.JobState.Name(job.state)] += 1
        self.ack()
        for jid in list(self.live):
            if self.acked_jobs[jid].state != spb.JOB_STATE_RUNNING:
                continue
            try:
                renewed = self.rpc(
                    "RenewLease",
                    self.stub.RenewLease,
                    spb.RenewLeaseRequest(job_id=jid, replica=0),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.RpcError as err:  # FAILED_PRECONDITION here: an acknowledged placement was lost
                self.error(f"RenewLease {jid}", err)
                continue
            if renewed.state != spb.JOB_STATE_RUNNING:
                self.errors.append(f"{self.name} RenewLease {jid}: state {spb.JobState.Name(renewed.state)}")
            self.counts["renewed"] += 1
        while len(self.live) > self.keep:
            jid = self.live.popleft()
            try:
                released = self.rpc(
                    "ReleaseJob", self.stub.ReleaseJob, spb.ReleaseJobRequest(job_id=jid), timeout=CALL_TIMEOUT_S
                ).job
            except grpc.RpcError as err:
                self.error(f"ReleaseJob {jid}", err)
                continue
            if released.state != spb.JOB_STATE_RELEASED:
                self.errors.append(f"{self.name} ReleaseJob {jid}: state {spb.JobState.Name(released.state)}")
            self.acked_jobs[jid] = released
            self.counts["released"] += 1


class ParamServerDriver(Driver):
    """A training worker: pull, a fake gradient (toward a fixed target), push; a stale or ABORTED push
    re-pulls and recomputes under the same step id, as the SDK's ``train_step`` does. With ``fused``, a step
    is one PushPull whose answer holds the parameters of the next step (re-pulled only after a failure)."""

    service = "paramserver"

    def __init__(
        self,
        name: str,
        stop: threading.Event,
        client: ParamServerClient,
        target: dict[str, np.ndarray],
        fused: bool = False,
    ) -> None:
        super().__init__(name, stop, pace_s=0.02)
        self.client = client
        self.target = target
        self.fused = fused
        self.step_id = 0
        self.repulls = 0
        self.held: PullResult | None = None  # fused: the last answer, the parameters of the next step
        #: (incarnation of the pull, base version, version answered, outcome) of every acknowledged push.
        self.pushes: list[tuple[str, int, int, int]] = []

    def step(self) -> None:
        try:
            pulled = self.held if self.held is not None else self.rpc("Pull", self.client.pull)
            self.held = None
            grads = {n: (v - self.target[n]).astype(np.float32) for n, v in pulled.tensors.items()}
            self.calls += 1
            if self.fused:
                results, answer = self.client.push_pull(grads, step_id=self.step_id)
            else:
                results, answer = self.client.push(grads, step_id=self.step_id), None
        except StalePush as stale:
            self.repulls += 1
            if stale.code == grpc.StatusCode.ABORTED:
                self.aborted += 1
            return
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                # Not retried as is: the server may come back restored to an older version. Re-pull and
                # recompute under the same step id, as the SDK's train_step does.
                self.unavailable += 1
                time.sleep(RETRY_PAUSE_S)
            else:
                self.error(f"step {self.step_id}", err)
            return
        self.step_id += 1
        for r in results:
            self.pushes.append((pulled.incarnations[0], pulled.versions[0], r.version, r.outcome))
        self.held = answer
        self.ack()


class ScorerDriver(Driver):
    """Scores random rows with the registered model; NOT_FOUND answers are timed (a lost registry)."""

    service = "scorer"

    def __init__(self, name: str, stop: threading.Event, channel: grpc.Channel, model: str, features: list[str]):
        super().__init__(name, stop, pace_s=0.02)
        self.stub = cpb_grpc.ScorerServiceStub(channel)
        self.model = model
        self.features = features
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.i = 0
        self.versions: Counter[str] = Counter()
        #: (sent, answered) of each NOT_FOUND answer, monotonic seconds.
        self.not_found: list[tuple[float, float]] = []

    def step(self) -> None:
        row = self.rng.standard_normal(len(self.features))
        req = cpb.ScoreRequest(
            model=self.model,
            request_id=f"{self.name}-{self.i}",
            features=dict(zip(self.features, map(float, row), strict=True)),
        )
        self.i += 1
        sent = time.monotonic()
        try:
            resp = self.rpc("Score", self.stub.Score, req, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                self.not_found.append((sent, time.monotonic()))
            else:
                self.error("Score", err)
            return
        self.versions[resp.model_version] += 1
        self.ack()


class ABRouterDriver(Driver):
    """Assigns new units with ``log_exposure``; remembers the arm of every unit whose exposure was logged."""

    service = "abrouter"

    def __init__(self, name: str, stop: threading.Event, channel: grpc.Channel, experiment: str) -> None:
        super().__init__(name, stop, pace_s=0.02)
        self.stub = apb_grpc.ABRouterServiceStub(channel)
        self.experiment = experiment
        self.i = 0
        #: unit -> arm name, for every acknowledged exposure.
        self.exposed: dict[str, str] = {}

    def step(self) -> None:
        unit = f"{self.name}-{self.i}"
        self.i += 1
        req = apb.AssignRequest(
            unit_id=unit,
            experiment_keys=[self.experiment],
            log_exposure=True,
            covariates=apb.Covariates(numeric={"age": float(self.i % 50)}, categorical={"device": "ios"}),
        )
        try:
            got = self.rpc("Assign", self.stub.Assign, req, timeout=CALL_TIMEOUT_S).assignments[0]
        except grpc.RpcError as err:
            self.error(f"Assign {unit}", err)
            return
        if got.exposure_logged:
            self.exposed.setdefault(unit, got.arm)
            self.ack()
        else:
            self.errors.append(f"{self.name} Assign {unit}: exposure not logged ({got.reason})")


# -- paramserver checkpoints on disk -------------------------------------------------------------------------


def checkpoint_folder(state: Path, replica: str, model: str, shard: int = 0) -> Path:
    return state / "checkpoints" / replica / f"shard-{shard}" / model


def verified_checkpoints(state: Path, replicas: list[str], model: str) -> dict[str, set[int]]:
    """Per replica, the checkpoint versions whose data matches their manifest (size and SHA-256)."""
    out: dict[str, set[int]] = {}
    for replica in replicas:
        folder = checkpoint_folder(state, replica, model)
        found: set[int] = set()
        if folder.is_dir():
            for manifest_path in folder.glob("v*.json"):
                try:
                    manifest = json.loads(manifest_path.read_bytes())
                    data = manifest_path.with_suffix(".safetensors").read_bytes()
                except (OSError, ValueError):
                    continue
                if len(data) == manifest.get("bytes") and hashlib.sha256(data).hexdigest() == manifest.get("sha256"):
                    found.add(int(manifest["version"]))
        out[replica] = found
    return out


def model_info(stub: Any, model: str) -> ppb.ModelInfo:
    return stub.DescribeModel(ppb.DescribeModelRequest(model=model), timeout=CALL_TIMEOUT_S).model


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> float:
    """Wait until ``cond()``; return the seconds waited; AssertionError naming ``what`` on timeout."""
    began = time.monotonic()
    while not cond():
        assert time.monotonic() - began < timeout_s, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(poll_s)
    return time.monotonic() - began


def until_available(call: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """``call()`` until it answers something other than UNAVAILABLE.

    The first calls after a restart can meet the channel's reconnect backoff (gRPC waits 1 s, then 1.6 s,
    ... before it dials a dead address again): the process is SERVING, the channel has not noticed yet.
    """
    end = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                raise
            time.sleep(0.05)
