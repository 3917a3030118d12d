"""``guardmesh demo``: the whole chain on a local mesh, in a few minutes on a laptop.

:func:`run_demo` starts the four services as real processes (through :mod:`guardmesh.mesh`, on free ports,
with state in a temporary folder) and then plays every role around them, as a client: every call goes through
the SDK (:class:`guardmesh.sdk.Mesh`) and the A/B tables are rendered by :mod:`guardmesh.sdk.report`:

1. **scheduler**: registers a simulated GPU inventory and submits a gang job of three worker replicas;
   the placements (node, GPU UUIDs, memory caps) are printed.
2. **paramserver**: three worker processes (:mod:`guardmesh.demo_worker`) hold their replica's lease and
   train a logistic regression on scikit-learn's breast-cancer data under bounded staleness; one is a
   straggler whose stale pushes are rejected and recomputed after a re-pull.
3. **scorer**: the trained model is published as ``v2`` beside the production ``v1`` (a model trained for
   two steps) and a deliberately bad ``v3`` (the trained weights negated).
4. **abrouter**: ``v1`` against ``v2`` with ``v3`` in shadow, and ``v1`` against ``v3``; traffic built from
   the held-out split shifts halfway (a new imaging device moves the texture features by three standard
   deviations): the drift score rises and the threshold adapts; labels come back as scorer feedback and
   as the ``correct`` metric; ``v3``'s guardrail trips and, promoted by mistake, ``v3`` is rolled back by
   the scorer's F1 monitor.
5. the audit, the analysis, the drift, shadow and event reports, the paramserver's rejections and the ids
   of traces to open in Jaeger.

Everything it started is stopped before it returns, whatever happens. The figures come back as a
:class:`DemoReport`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from guardmesh import mesh as mesh_mod
from guardmesh.config import MeshConfig, load_config
from guardmesh.demo_worker import load_data, logistic_regression
from guardmesh.runtime import KNOWN_SERVICES
from guardmesh.sdk import Mesh
from guardmesh.sdk.abrouter import Arm, ExperimentOptions, Guardrail, Observation, Routed, analysis_from_pb
from guardmesh.sdk.scheduler import JobState, Lease
from guardmesh.sdk.scorer import Score
from guardmesh.tracing import flush_tracing, setup_tracing
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import scheduler_pb2 as spb

MODEL = "breast-cancer"
PS_MODEL = "breast-cancer-logreg"
JOB_ID = "demo-train"
REPLICAS = 3
GPU_MODEL = "A100-40GB"
GPU_MEMORY_MIB = 40_960
#: Features a new imaging device shifts halfway through the traffic, and by how many standard deviations.
SHIFTED = ("mean_texture", "worst_texture", "texture_error")
SHIFT_SD = 3.0
EXP_NEW = "model-v2-rollout"
EXP_BAD = "model-v3-candidate"


@dataclass(frozen=True)
class Scale:
    """How big a run is."""

    steps: int  # training steps per worker
    straggle_s: float  # the straggler's stall before each step's first gradient
    step_sleep_s: float  # every worker's pause between steps
    requests: int  # Route requests
    chunk: int  # requests between two rounds of labels
    live_window: int  # the scorer's drift window (rows)
    drift_every: int
    min_labels: int  # labels before a version's F1 baseline is fixed
    min_units: int  # units per arm before a guardrail may trip
    bootstrap: int
    lease_ttl_s: int
    concurrency: int


QUICK = Scale(
    steps=30,
    straggle_s=0.25,
    step_sleep_s=0.05,
    requests=360,
    chunk=40,
    live_window=150,
    drift_every=10,
    min_labels=40,
    min_units=20,
    bootstrap=300,
    lease_ttl_s=9,
    concurrency=4,
)
FULL = Scale(
    steps=80,
    straggle_s=0.3,
    step_sleep_s=0.05,
    requests=1500,
    chunk=100,
    live_window=300,
    drift_every=25,
    min_labels=100,
    min_units=50,
    bootstrap=2000,
    lease_ttl_s=12,
    concurrency=6,
)


@dataclass
class WorkerResult:
    """What one training worker reported."""

    replica: int
    worker: str
    pid: int
    node: str
    gpus: list[str]
    straggler: bool
    steps: int = 0
    rejections: int = 0
    stale_steps: int = 0
    renewals: int = 0
    lease_lost: str = ""
    seconds: float = 0.0
    loss: float = math.nan
    exit_code: int | None = None


@dataclass
class DemoReport:
    """The figures of one demo run (every section the demo prints)."""

    state_dir: str
    quick: bool
    seconds: float = 0.0
    #: pid of every mesh process (by instance name) and of every worker, for "nothing left running".
    service_pids: dict[str, int] = field(default_factory=dict)
    worker_pids: list[int] = field(default_factory=list)
    # -- scheduler
    nodes: list[str] = field(default_factory=list)
    job_id: str = JOB_ID
    job_state: str = ""
    job_state_after: str = ""
    placements: list[dict[str, Any]] = field(default_factory=list)
    # -- training
    workers: list[WorkerResult] = field(default_factory=list)
    straggler: str = ""
    rejections: dict[str, int] = field(default_factory=dict)
    pushes_accepted: int = 0
    pushes_rejected_stale: int = 0
    staleness_histogram: dict[int, int] = field(default_factory=dict)
    ps_version: int = 0
    # -- models
    versions: list[str] = field(default_factory=list)
    v1_accuracy: float = math.nan
    test_accuracy: float = math.nan
    test_f1: float = math.nan
    v3_accuracy: float = math.nan
    # -- traffic, drift
    requests: int = 0
    route_errors: int = 0
    route_errors_by_code: dict[str, int] = field(default_factory=dict)
    route_error_details: dict[str, str] = field(default_factory=dict)
    drift_before: float = math.nan
    drift_after: float = math.nan
    threshold_before: float = math.nan
    threshold_after: float = math.nan
    served_threshold_before: float = math.nan
    served_threshold_after: float = math.nan
    top_drift: list[dict[str, float | str]] = field(default_factory=list)
    accuracy_by_phase: dict[str, float] = field(default_factory=dict)
    # -- guardrails, rollback
    guardrail_tripped: bool = False
    guardrail_reason: str = ""
    bad_arm_served_after_trip: int = 0
    f1_rollback: bool = False
    active_version: str = ""
    # -- reports
    audit: dict[str, Any] = field(default_factory=dict)
    analysis: list[dict[str, Any]] = field(default_factory=list)
    shadow: dict[str, Any] = field(default_factory=dict)
    router_events: list[str] = field(default_factory=list)
    scorer_events: list[str] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)
    traces: list[tuple[str, str]] = field(default_factory=list)
    otlp_endpoint: str = ""


# -- the mesh ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mesh_env(state_dir: Path, scale: Scale) -> dict[str, str]:
    """The environment of every process the demo starts: this one's, without any other mesh's settings,
    plus the demo mesh's ports, state folder and settings sized for the run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUARDMESH", "CONSUL_"))}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads would only fight over the cores
    for service in KNOWN_SERVICES:
        env[f"GUARDMESH__SERVICES__{service.upper()}__PORT"] = str(_free_port())
        env[f"GUARDMESH__SERVICES__{service.upper()}__METRICS_PORT"] = str(_free_port())
    env |= {
        "GUARDMESH__MESH__STATE_DIR": str(state_dir),
        "GUARDMESH__PARAMSERVER__SHARDS": "1",
        "GUARDMESH__GRPC__GRACE_S": "2.0",
        "GUARDMESH__GRPC__DRAIN_DELAY_S": "0.1",
        "GUARDMESH__SCHEDULER__SQLITE_SYNCHRONOUS": "NORMAL",
        "GUARDMESH__ABROUTER__SQLITE_SYNCHRONOUS": "NORMAL",
        "GUARDMESH__ABROUTER__GUARDRAIL_INTERVAL_S": "0.5",
        "GUARDMESH__ABROUTER__AUDIT_INTERVAL_S": "0",
        "GUARDMESH__ABROUTER__SCORER_DEADLINE_S": "10.0",
        "GUARDMESH__SCORER__LIVE_WINDOW": str(scale.live_window),
        "GUARDMESH__SCORER__DRIFT_EVERY": str(scale.drift_every),
        "GUARDMESH__SCORER__MIN_LABELS": str(scale.min_labels),
    }
    return env


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` replaced by ``env`` for the block (``mesh.up`` hands its own environment on)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def _mesh_console(console: Console) -> Iterator[None]:
    """Route :mod:`guardmesh.mesh`'s own messages (the status table) to the demo's console."""
    saved = mesh_mod.console
    mesh_mod.console = console
    try:
        yield
    finally:
        mesh_mod.console = saved


# -- small helpers -------------------------------------------------------------------------------------------


def _evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, F1 of the positive class) at threshold 0.5."""
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(x))[:, 0].numpy() >= 0.5
    truth = y >= 0.5
    tp = float(np.sum(pred & truth))
    f1 = 2 * tp / max(1.0, float(np.sum(pred) + np.sum(truth)))
    return float(np.mean(pred == truth)), f1


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


# -- the training workers ------------------------------------------------------------------------------------


class _Workers:
    """The worker processes, their stdout read by one thread each into a queue."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self._readers: list[threading.Thread] = []

    def start(self, replica: int, args: list[str], env: dict[str, str]) -> int:
        log = (self.logs / f"worker-{replica}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "guardmesh.demo_worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            start_new_session=True,
        )
        log.close()
        self.procs[replica] = proc
        reader = threading.Thread(target=self._read, args=(replica, proc.stdout), daemon=True)
        reader.start()
        self._readers.append(reader)
        return proc.pid

    def _read(self, replica: int, stream: IO[str] | None) -> None:
        if stream is None:
            return
        for line in stream:
            try:
                self.events.put((replica, json.loads(line)))
            except json.JSONDecodeError:
                continue
        self.events.put((replica, {"event": "eof"}))

    def send(self, line: str, close: bool = False) -> None:
        """A line to every worker's stdin (``go``: start training; ``exit``: stop renewing and exit)."""
        for proc in self.procs.values():
            if proc.stdin is not None and not proc.stdin.closed:
                with suppress(OSError, ValueError):
                    proc.stdin.write(line + "\n")
                    proc.stdin.flush()
                    if close:
                        proc.stdin.close()

    def log_tail(self, replica: int, chars: int = 2000) -> str:
        path = self.logs / f"worker-{replica}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker still running, SIGKILL after ``timeout``; reap them all."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    with suppress(OSError, ValueError):
                        stream.close()
        for reader in self._readers:
            reader.join(timeout=2)


# -- the demo ------------------------------------------------------------------------------------------------


class _Demo:
    def __init__(self, console: Console, scale: Scale, report: DemoReport, env: dict[str, str]) -> None:
        self.console = console
        self.scale = scale
        self.report = report
        self.env = env
        self.config: MeshConfig = load_config(env=env)
        #: The SDK's clients of the four services: every call the demo makes goes through them.
        self.mesh: Mesh | None = None
        self.workers = _Workers(Path(report.state_dir) / "logs")
        self.names, self.x_tr, self.y_tr, self.x_te, self.y_te = load_data()
        self.tracer: Any = None
        self.job_released = False
        self.launcher: Lease | None = None

    # -- plumbing

    @property
    def sdk(self) -> Mesh:
        """The mesh's clients (after :meth:`start_mesh`)."""
        if self.mesh is None:
            raise RuntimeError("the mesh is not up yet")
        return self.mesh

    def phase(self, number: int, title: str) -> None:
        self.console.print()
        self.console.rule(f"[bold cyan]{number}. {title}")

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
        self.workers.stop()
        if self.mesh is not None:
            if not self.job_released:
                with suppress(grpc.RpcError):
                    self.mesh.scheduler.release(JOB_ID)
            self.mesh.close()

    # -- 1. the mesh

    def start_mesh(self) -> None:
        self.phase(1, "the mesh: four services as real processes")
        with _environment(self.env), _mesh_console(self.console):
            records = mesh_mod.up(self.config, timeout=180.0)
        for rec in records:
            self.report.service_pids[rec.service] = rec.pid
        endpoint = self.config.tracing.otlp_endpoint
        if any(r.service == "jaeger" for r in records):
            endpoint = mesh_mod.JAEGER_OTLP
            self.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        self.report.otlp_endpoint = endpoint
        provider = setup_tracing("guardmesh-demo", endpoint)
        self.tracer = provider.get_tracer("guardmesh.demo")
        where = f"spans go to {endpoint}" if endpoint else "no OTLP endpoint: spans are not exported"
        self.console.print(f"state, logs and databases in [bold]{self.report.state_dir}[/]; {where}")
        self.mesh = Mesh(self.config)  # after the demo's own tracing set-up, which the SDK then keeps

    # -- 2. scheduler

    def schedule(self) -> None:
        self.phase(2, "scheduler: a gang of three worker replicas on a simulated GPU inventory")
        sched = self.sdk.scheduler
        nodes = [("sim-node-a", 4), ("sim-node-b", 4)]
        for name, gpus in nodes:
            sched.register_node(
                spb.NodeSpec(
                    name=name,
                    labels={"pool": "demo", "simulated": "true"},
                    gpus=[
                        spb.GpuDevice(
                            index=i,
                            uuid=f"GPU-{name}-{i:02d}-sim",
                            model=GPU_MODEL,
                            memory_mib=GPU_MEMORY_MIB,
                            topology_group=f"{name}/nvlink{i // 2}",
                        )
                        for i in range(gpus)
                    ],
                )
            )
            self.report.nodes.append(name)
        self.console.print(
            f"[yellow]simulated inventory[/]: {len(nodes)} nodes x 4 {GPU_MODEL} ({GPU_MEMORY_MIB} MiB each), "
            "registered with RegisterNode (no real GPU needed)"
        )
        # Another tenant already holds a card exclusively: the gang has to be placed around it.
        sched.submit("research-notebook", tenant="research", replicas=1, gpus=1, memory_mib=30_000, lease_ttl_s=3600)
        job = sched.submit(
            JOB_ID,
            tenant="demo",
            qos="guaranteed",
            replicas=REPLICAS,
            gpus=1,
            memory_mib=16_384,
            gang=True,
            lease_ttl_s=self.scale.lease_ttl_s,
        )
        self.report.job_state = spb.JobState.Name(int(job.state))
        if job.state != JobState.RUNNING:
            raise RuntimeError(f"the gang job was not placed: {job.pending_reason}")
        table = Table(title=f"gang job {JOB_ID}: {REPLICAS} replicas placed all-or-nothing ({self.report.job_state})")
        for col in ("replica", "node", "GPU UUIDs", "memory cap (MiB)", "fraction", "CUDA_VISIBLE_DEVICES"):
            table.add_column(col)
        for p in sorted(job.placements, key=lambda p: p.replica):
            info = {
                "replica": p.replica,
                "node": p.node,
                "gpus": p.gpu_uuids,
                "memory_caps_mib": p.memory_caps_mib,
                "env": dict(p.env),
            }
            self.report.placements.append(info)
            table.add_row(
                str(p.replica),
                p.node,
                ", ".join(p.gpu_uuids),
                ", ".join(str(c) for c in p.memory_caps_mib),
                ", ".join(f"{g.memory_fraction:.2f}" for g in p.gpus),
                p.env.get("CUDA_VISIBLE_DEVICES", ""),
            )
        self.console.print(table)
        usage = Table(title="cards after placement (ListNodes)")
        for col in ("node", "GPU", "allocations", "allocatable MiB"):
            usage.add_column(col)
        for node in sched.list_nodes():
            for g in node.gpus:
                allocs = ", ".join(f"{a.job_id}/{a.replica} cap {a.memory_cap_mib}" for a in g.allocations)
                usage.add_row(node.spec.name, g.device.uuid, allocs or "[dim]free[/]", str(g.allocatable_mib))
        self.console.print(usage)
        # The launcher holds the leases until the worker processes are up (their imports take seconds).
        self.launcher = sched.lease(job, release_on_exit=False).start()
        self.console.print(
            f"each worker renews its replica's lease every {self.scale.lease_ttl_s / 3:.1f}s "
            f"(TTL {self.scale.lease_ttl_s}s); a lease not renewed within the TTL would be reclaimed"
        )

    # -- v1: production before the demo's training

    def register_v1(self) -> None:
        import torch

        torch.manual_seed(0)
        self.initial = logistic_regression(len(self.names))
        v1 = logistic_regression(len(self.names))
        v1.load_state_dict(self.initial.state_dict())
        opt = torch.optim.SGD(v1.parameters(), lr=0.05)
        for s in range(2):  # "last quarter's model": two steps of training
            idx = np.arange(16 * s, 16 * s + 16)
            loss = torch.nn.functional.binary_cross_entropy(
                v1(torch.from_numpy(self.x_tr[idx]))[:, 0], torch.from_numpy(self.y_tr[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.report.v1_accuracy, _ = _evaluate(v1, self.x_te, self.y_te)
        self.sdk.scorer.register_module(
            MODEL, "v1", v1, self.names, reference=self.x_tr, threshold=0.5, drift_k=0.3, activate=True
        )
        self.report.versions.append("v1")
        self.console.print(
            f"scorer: [bold]v1[/] (production, TorchScript, test accuracy {self.report.v1_accuracy:.3f}) "
            f"active, with {len(self.x_tr)} training rows as the drift reference"
        )

    # -- 3. training

    def train(self) -> None:
        from guardmesh.sdk.paramserver import adam, bounded_staleness

        bound = 2
        self.phase(3, f"paramserver: {REPLICAS} worker processes, BOUNDED_STALENESS (s <= {bound}), one straggler")
        ps = self.sdk.paramserver(PS_MODEL, worker_id="demo")
        ps.create_from_module(self.initial, optimizer=adam(0.05), consistency=bounded_staleness(bound))
        straggler = REPLICAS - 1
        self.report.straggler = f"worker-{straggler}"
        self.console.print(
            f"model {PS_MODEL!r} created (logistic regression, {len(self.names)} features, Adam 0.05); "
            f"each worker trains {self.scale.steps} steps on its shard of {len(self.x_tr)} rows; "
            f"worker-{straggler} stalls {self.scale.straggle_s:.2f}s before each step's gradient"
        )
        results: dict[int, WorkerResult] = {}
        placements = {p["replica"]: p for p in self.report.placements}
        for r in range(REPLICAS):
            args = [
                "--job",
                JOB_ID,
                "--replica",
                str(r),
                "--replicas",
                str(REPLICAS),
                "--model",
                PS_MODEL,
                "--steps",
                str(self.scale.steps),
                "--step-sleep",
                str(self.scale.step_sleep_s),
                "--straggle",
                str(self.scale.straggle_s if r == straggler else 0.0),
            ]
            pid = self.workers.start(r, args, self.env)
            self.report.worker_pids.append(pid)
            p = placements[r]
            results[r] = WorkerResult(r, f"worker-{r}", pid, p["node"], p["gpus"], r == straggler)
        self._run_workers(results)
        self.report.workers = [results[r] for r in range(REPLICAS)]
        self.report.rejections = {w.worker: w.rejections for w in self.report.workers}

        stats = ps.stats()
        self.report.pushes_accepted = stats.pushes_accepted
        self.report.pushes_rejected_stale = stats.pushes_rejected_stale
        self.report.staleness_histogram = {int(b.staleness): int(b.count) for b in stats.staleness}
        self.report.ps_version = stats.version
        table = Table(title="training workers (each its own process, its own lease)")
        for col in (
            "worker",
            "pid",
            "node / GPU",
            "steps",
            "stale pushes rejected (re-pulls)",
            "steps re-pulled",
            "lease renewals",
            "seconds",
            "final loss",
        ):
            table.add_column(col)
        for w in self.report.workers:
            name = f"{w.worker} [yellow](straggler)[/]" if w.straggler else w.worker
            rej = f"[bold red]{w.rejections}[/]" if w.rejections else "0"
            table.add_row(
                name,
                str(w.pid),
                f"{w.node} / {', '.join(w.gpus)}",
                str(w.steps),
                rej,
                str(w.stale_steps),
                str(w.renewals) + (f" [red]lost: {w.lease_lost}[/]" if w.lease_lost else ""),
                f"{w.seconds:.1f}",
                _fmt(w.loss),
            )
        self.console.print(table)
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.report.staleness_histogram.items()))
        self.console.print(
            f"paramserver GetStats: version {stats.version}, {stats.pushes_accepted} pushes applied, "
            f"[bold red]{stats.pushes_rejected_stale} rejected as stale[/] (staleness > {bound}); "
            f"staleness of arriving pushes {{{hist}}}"
        )
        job = self.sdk.scheduler.release(JOB_ID)
        self.job_released = True
        self.report.job_state_after = spb.JobState.Name(int(job.state))
        self.console.print(f"scheduler: every replica done, job {JOB_ID} released -> {self.report.job_state_after}")

        pulled = ps.pull()
        import torch

        self.trained = logistic_regression(len(self.names))
        with torch.no_grad():
            for name, p in self.trained.named_parameters():
                p.copy_(torch.from_numpy(np.array(pulled.tensors[name]).reshape(tuple(p.shape))))
        self.report.test_accuracy, self.report.test_f1 = _evaluate(self.trained, self.x_te, self.y_te)
        self.console.print(
            f"trained model (paramserver version {pulled.versions[0]}): held-out accuracy "
            f"[bold green]{self.report.test_accuracy:.3f}[/], F1 {self.report.test_f1:.3f} "
            f"(v1: {self.report.v1_accuracy:.3f})"
        )

    def _run_workers(self, results: dict[int, WorkerResult]) -> None:
        ready: set[int] = set()
        done: set[int] = set()
        try:
            self._worker_events(results, ready, done)
        finally:
            if self.launcher is not None:
                self.launcher.stop()
        self.workers.send("exit", close=True)  # every replica is done: the workers stop renewing and exit
        for r, proc in self.workers.procs.items():
            results[r].exit_code = proc.wait(timeout=30)

    def _worker_events(self, results: dict[int, WorkerResult], ready: set[int], done: set[int]) -> None:
        started = False
        deadline = time.monotonic() + 240
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rejected {task.fields[rejections]}"),
            TextColumn("version {task.fields[version]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            tasks = {
                r: progress.add_task(
                    f"{results[r].worker}{' (straggler)' if results[r].straggler else ''}",
                    total=self.scale.steps,
                    rejections=0,
                    version=0,
                )
                for r in results
            }
            while len(done) < len(results):
                if time.monotonic() > deadline:
                    raise RuntimeError("the training workers did not finish in time")
                try:
                    replica, msg = self.workers.events.get(timeout=0.5)
                except queue.Empty:
                    for r, proc in self.workers.procs.items():
                        if r not in done and proc.poll() is not None and self.workers.events.empty():
                            tail = self.workers.log_tail(r)
                            raise RuntimeError(f"worker-{r} exited with {proc.returncode}:\n{tail}") from None
                    continue
                event = msg.get("event")
                if event == "ready":
                    ready.add(replica)
                    progress.console.print(
                        f"worker-{replica} (pid {msg['pid']}) ready on {msg['node']}: "
                        f"CUDA_VISIBLE_DEVICES={msg['cuda_visible_devices']}, shard of {msg['shard_rows']} rows"
                    )
                    if len(ready) == len(results) and not started:
                        if self.launcher is not None:  # every worker renews its own lease now
                            self.launcher.stop()
                        self.workers.send("go")
                        started = True
                elif event == "step":
                    progress.update(
                        tasks[replica],
                        completed=msg["step"],
                        rejections=msg["rejections"],
                        version=msg["version"],
                    )
                elif event == "done":
                    w = results[replica]
                    w.steps, w.rejections, w.stale_steps = msg["steps"], msg["rejections"], msg["stale_steps"]
                    w.renewals, w.lease_lost, w.seconds = msg["renewals"], msg["lease_lost"], msg["seconds"]
                    w.loss = float(msg["loss"])
                    done.add(replica)
                elif event == "eof" and replica not in done:
                    proc = self.workers.procs[replica]
                    proc.wait(timeout=10)
                    raise RuntimeError(
                        f"worker-{replica} exited with {proc.returncode}:\n{self.workers.log_tail(replica)}"
                    )

    # -- 4. publish

    def publish(self) -> None:
        import torch

        self.phase(4, "scorer: publish v2 beside v1, and a deliberately bad v3")
        scorer = self.sdk.scorer
        scorer.register_module(MODEL, "v2", self.trained, self.names, threshold=0.5, drift_k=0.3)
        bad = logistic_regression(len(self.names))
        with torch.no_grad():
            for (_, p), (_, q) in zip(bad.named_parameters(), self.trained.named_parameters(), strict=True):
                p.copy_(-q)
        self.report.v3_accuracy, _ = _evaluate(bad, self.x_te, self.y_te)
        # v3 claims v2's offline F1 as its baseline: the scorer rolls it back when live labels disagree.
        scorer.register_module(
            MODEL,
            "v3",
            bad,
            self.names,
            threshold=0.5,
            drift_k=0.3,
            baseline_f1=max(0.5, self.report.test_f1),
            max_f1_drop=0.05,
        )
        self.report.versions += ["v2", "v3"]
        table = Table(title=f"scorer model {MODEL!r} (ListModels)")
        for col in ("version", "format", "active", "held-out accuracy", "what it is"):
            table.add_column(col)
        what = {
            "v1": ("production: trained for two steps", self.report.v1_accuracy),
            "v2": ("the gang's model from the paramserver", self.report.test_accuracy),
            "v3": ("v2 with its weights negated (bad on purpose)", self.report.v3_accuracy),
        }
        for line in scorer.list_models():
            if line.model != MODEL:
                continue
            for v in line.versions:
                desc, acc = what.get(v.version, ("", math.nan))
                table.add_row(
                    v.version,
                    v.format,
                    "yes" if v.active else "",
                    _fmt(acc),
                    desc,
                )
        self.console.print(table)

    # -- 5. experiments and traffic

    def experiments(self) -> None:
        self.phase(5, "abrouter: v1 vs v2 (v3 in shadow) and v1 vs v3, with a drift halfway")
        guardrail = Guardrail(
            "correct", higher_is_better=True, max_relative_drop=0.05, alpha=0.05, min_units=self.scale.min_units
        )
        arms = {EXP_NEW: Arm("treatment", 0.5, "v2"), EXP_BAD: Arm("treatment", 0.5, "v3")}
        for key, treatment in arms.items():
            options: ExperimentOptions = {"model": MODEL, "metrics": ["correct"], "guardrails": [guardrail]}
            if key == EXP_NEW:
                options["shadow"] = ("v3", 0.5)
            self.sdk.abrouter.create_experiment(key, [Arm("control", 0.5, "v1"), treatment], **options)
        self.console.print(
            f"[bold]{EXP_NEW}[/]: control -> v1, treatment -> v2, 50% of requests mirrored to v3 in shadow; "
            f"[bold]{EXP_BAD}[/]: control -> v1, treatment -> v3. Metric 'correct' (1 when the served decision "
            f"matches the label), guardrail: a drop of 5% (one-sided, alpha 0.05, >= {self.scale.min_units} units/arm)"
        )
        self._traffic()

    def _traffic(self) -> None:
        scale, report, router = self.scale, self.report, self.sdk.abrouter
        n = scale.requests
        half = n // 2
        rng = np.random.default_rng(42)
        shifted_idx = [self.names.index(f) for f in SHIFTED]
        rows = self.x_te[np.arange(n) % len(self.x_te)] + rng.normal(0, 0.05, (n, len(self.names))).astype(np.float32)
        rows[half:, shifted_idx] += SHIFT_SD
        labels = self.y_te[np.arange(n) % len(self.y_te)] >= 0.5
        devices = rng.choice(["ios", "android", "web"], n)
        traced = {*range(4), *range(half, half + 4), n - 2, n - 1}  # a few requests as their own traces
        records: list[dict[str, Any]] = []
        trip_seen_at: int | None = None
        errors_lock = threading.Lock()

        def route(i: int) -> dict[str, Any] | None:
            key = EXP_BAD if i % 3 == 2 else EXP_NEW
            unit, request_id = f"user-{i:05d}", f"req-{i:05d}"
            features = {f: float(v) for f, v in zip(self.names, rows[i], strict=True)}
            covariates: dict[str, float | int | str | bool] = {
                "mean_radius": float(rows[i][0]),
                "device": str(devices[i]),
            }
            trace_id = ""
            try:
                if i in traced:
                    with self.tracer.start_as_current_span(
                        "demo.request", attributes={"demo.experiment": key, "demo.shifted": i >= half}
                    ) as span:
                        resp = self._route(key, unit, request_id, features, covariates)
                        trace_id = format(span.get_span_context().trace_id, "032x")
                else:
                    resp = self._route(key, unit, request_id, features, covariates)
            except grpc.RpcError as err:
                with errors_lock:
                    report.route_error_details.setdefault(err.code().name, str(err.details()))
                    report.route_errors_by_code[err.code().name] = (
                        report.route_errors_by_code.get(err.code().name, 0) + 1
                    )
                return None
            a, s = resp.assignment, resp.score
            return {
                "i": i,
                "key": key,
                "unit": unit,
                "request_id": request_id,
                "label": bool(labels[i]),
                "decision": bool(s.decision),
                "threshold": s.threshold,
                "drift": s.drift_score,
                "version": s.model_version,
                "arm": a.arm,
                "in_experiment": a.in_experiment,
                "reason": a.reason,
                "logged": a.exposure_logged,
                "trace_id": trace_id,
                "shadowed": resp.shadowed,
                "shifted": i >= half,
            }

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("drift {task.fields[drift]}"),
            TextColumn("threshold {task.fields[threshold]}"),
            TimeElapsedColumn(),
        )
        bounds = [*range(0, half, scale.chunk), *range(half, n, scale.chunk), n]
        with ThreadPoolExecutor(max_workers=scale.concurrency) as pool, Progress(*columns, console=self.console) as bar:
            task = bar.add_task("traffic (test split)", total=n, drift="-", threshold="-")
            for lo, hi in itertools.pairwise(bounds):
                if lo == half:
                    before, thr = self._drift_snapshot()
                    report.drift_before, report.threshold_before = before, thr
                    bar.console.print(
                        f"before the shift: drift score [bold]{before:.3f}[/], threshold in force [bold]{thr:.3f}[/]"
                    )
                    bar.console.print(
                        f"[bold magenta]a new imaging device[/]: {', '.join(SHIFTED)} move by +{SHIFT_SD:g} standard "
                        "deviations from here on"
                    )
                    bar.update(task, description="traffic (shifted)")
                chunk = [r for r in pool.map(route, range(lo, hi)) if r is not None]
                report.route_errors += (hi - lo) - len(chunk)
                records += chunk
                self._labels(chunk)
                if chunk:
                    bar.update(task, drift=f"{chunk[-1]['drift']:.2f}", threshold=f"{chunk[-1]['threshold']:.3f}")
                bar.update(task, completed=hi)
                if trip_seen_at is None:
                    exp = router.get_experiment(EXP_BAD)
                    if exp.state == "rolled_back":
                        trip_seen_at = hi
                        bar.console.print(
                            f"[bold red]guardrail tripped[/] on {EXP_BAD} after {hi} requests: {exp.reason}"
                        )
        report.requests = len(records)
        for code, count in report.route_errors_by_code.items():
            self.console.print(
                f"[yellow]{count} Route call(s) failed with {code}[/]: {report.route_error_details.get(code, '')}"
            )
        # The guardrail check runs on an interval: give it a moment after the last labels.
        deadline = time.monotonic() + 10
        exp = router.get_experiment(EXP_BAD)
        while exp.state != "rolled_back" and time.monotonic() < deadline:
            time.sleep(0.25)
            exp = router.get_experiment(EXP_BAD)
        report.guardrail_tripped = exp.state == "rolled_back"
        report.guardrail_reason = exp.reason
        if report.guardrail_tripped and trip_seen_at is None:
            self.console.print(f"[bold red]guardrail tripped[/] on {EXP_BAD}: {exp.reason}")
        bad = [r for r in records if r["key"] == EXP_BAD]
        served_v3 = [r for r in bad if r["version"] == "v3"]
        if trip_seen_at is not None:
            report.bad_arm_served_after_trip = sum(1 for r in served_v3 if r["i"] >= trip_seen_at)
        self.console.print(
            f"{EXP_BAD}: {len(served_v3)} of {len(bad)} requests served by v3 before the rollback; "
            f"state {exp.state}, weights now {exp.weights} (all traffic to control)"
        )

        pre = [r for r in records if not r["shifted"]]
        post = [r for r in records if r["shifted"]]
        last_pre = [r for r in pre if r["i"] >= half - scale.chunk]
        report.served_threshold_before = float(np.mean([r["threshold"] for r in last_pre])) if last_pre else math.nan
        last = [r for r in post if r["i"] >= n - scale.chunk]
        report.served_threshold_after = float(np.mean([r["threshold"] for r in last])) if last else math.nan
        for name, part in (("before shift", pre), ("after shift", post)):
            for version in ("v1", "v2", "v3"):
                served = [r for r in part if r["version"] == version]
                if served:
                    report.accuracy_by_phase[f"{version} {name}"] = float(
                        np.mean([r["decision"] == r["label"] for r in served])
                    )
        report.traces = [
            (
                r["trace_id"],
                f"{r['key']} -> {r['arm']} ({r['version']})"
                + (" + shadow v3" if r["shadowed"] else "")
                + (", shifted" if r["shifted"] else ""),
            )
            for r in records
            if r["trace_id"]
        ]
        report.trace_ids = [t for t, _ in report.traces]
        after, thr = self._drift_snapshot()
        report.drift_after, report.threshold_after = after, thr
        self.console.print(
            f"drift score {report.drift_before:.3f} -> [bold red]{after:.3f}[/]; threshold "
            f"{report.threshold_before:.3f} -> [bold]{thr:.3f}[/] (base 0.5 x (1 - 0.3 x drift)); "
            f"mean threshold served: {report.served_threshold_before:.3f} just before the shift, "
            f"{report.served_threshold_after:.3f} at the end"
        )

    def _route(
        self,
        key: str,
        unit: str,
        request_id: str,
        features: dict[str, float],
        covariates: dict[str, float | int | str | bool],
        attempts: int = 3,
    ) -> Routed:
        """Route, retried on ABORTED: the experiment's config changed (a guardrail rolled it back) while the
        request was being scored, and the router asks for a retry."""
        for attempt in range(attempts):
            try:
                return self.sdk.abrouter.route(
                    key, unit, features, request_id=request_id, log_exposure=True, covariates=covariates
                )
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ABORTED or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _drift_snapshot(self) -> tuple[float, float]:
        try:
            r = self.sdk.scorer.drift_report(MODEL)
        except grpc.RpcError:
            return math.nan, math.nan
        self.drift = r
        return r.drift_score, r.threshold

    def _labels(self, chunk: list[dict[str, Any]]) -> None:
        """Ground truth comes back: Feedback to the scorer, the 'correct' metric to the abrouter."""
        if not chunk:
            return
        self.sdk.scorer.feedback(MODEL, [(r["request_id"], r["label"]) for r in chunk])
        for key in (EXP_NEW, EXP_BAD):
            observations: list[Observation | tuple[str, str, float]] = [
                Observation(r["unit"], "correct", 1.0 if r["decision"] == r["label"] else 0.0)
                for r in chunk
                if r["key"] == key and r["logged"]
            ]
            if observations:
                self.sdk.abrouter.record_metrics(key, observations)

    # -- the scorer's F1 rollback

    def promote(self) -> None:
        self.phase(6, "scorer: promote v2, then v3 by mistake: the F1 monitor rolls it back")
        scorer = self.sdk.scorer
        scorer.activate(MODEL, "v2")
        self.console.print("v2 won its experiment: ActivateModel v2")
        scorer.activate(MODEL, "v3")
        self.console.print(
            f"an eager operator activates v3 too (it claims F1 {max(0.5, self.report.test_f1):.3f}); "
            f"labels of the next {self.scale.min_labels} decisions come back ..."
        )
        n = self.scale.min_labels
        rng = np.random.default_rng(7)
        idx = rng.integers(0, len(self.x_te), n)
        rows = [{f: float(v) for f, v in zip(self.names, self.x_te[i], strict=True)} for i in idx]
        out = scorer.score_batch(MODEL, rows, request_ids=[f"promo-{j:04d}" for j in range(n)])
        labels = [
            (res.request_id, bool(self.y_te[i] >= 0.5))
            for res, i in zip(out, idx, strict=True)
            if isinstance(res, Score)
        ]
        fb = scorer.feedback(MODEL, labels)
        self.report.f1_rollback = fb.rolled_back
        self.report.active_version = fb.active_version
        style = "bold red" if fb.rolled_back else "yellow"
        self.console.print(
            f"Feedback: rolling F1 of v3 {fb.f1:.3f} (precision {fb.precision:.3f}, recall {fb.recall:.3f}); "
            f"[{style}]rolled back: {fb.rolled_back}[/] -> active version [bold]{fb.active_version}[/]"
        )

    # -- 7. reports

    def reports(self) -> None:
        from guardmesh.sdk.report import analysis_table

        report, router = self.report, self.sdk.abrouter
        self.phase(7, "reports")
        # audit
        audit = router.audit(EXP_NEW).raw  # the whole answer: the table shows every test it ran
        srm = audit.srm
        report.audit = {
            "exposures": audit.exposures,
            "srm_chi2": srm.chi2,
            "srm_p_value": srm.p_value,
            "srm_alert": srm.alert,
            "observed": list(srm.observed),
            "expected": list(srm.expected),
            "uniformity_p_value": audit.uniformity.p_value,
            "balance_tests": len(audit.balance),
            "imbalances": [
                f"{b.covariate} [{b.window}] p={b.p_value:.3g} effect={b.effect_size:.3f}" for b in audit.imbalances
            ],
            "alert": audit.alert,
        }
        table = Table(title=f"audit of {EXP_NEW} (AuditExperiment)")
        table.add_column("check")
        table.add_column("result")
        table.add_row("exposures", str(audit.exposures))
        table.add_row(
            "sample ratio (SRM)",
            f"observed {list(srm.observed)} vs expected {[round(e, 1) for e in srm.expected]}: chi2 {srm.chi2:.3f}, "
            f"[bold]p = {srm.p_value:.3g}[/] ({'ALERT' if srm.alert else 'no alert'}: {srm.reason})",
        )
        table.add_row("bucket uniformity", f"{audit.uniformity.test} p = {audit.uniformity.p_value:.3g}")
        for t in audit.clustering[:4]:
            table.add_row(t.name, f"{t.test} p = {t.p_value:.3g}{' ALERT' if t.alert else ''}")
        table.add_row(
            "covariate balance",
            f"{len(audit.balance)} tests, {len(audit.imbalances)} imbalanced"
            + ("".join(f"\n  {s}" for s in report.audit["imbalances"][:5]) if audit.imbalances else ""),
        )
        self.console.print(table)
        # analysis
        for key in (EXP_NEW, EXP_BAD):
            analysis = router.analyze(key, metrics=["correct"], bootstrap_resamples=self.scale.bootstrap, seed=7)
            results = [analysis_from_pb(m, analysis.arms) for m in analysis.raw.metrics]
            table = analysis_table(results, analysis.arms)
            table.title = f"A/B analysis of {key} ({analysis.exposed_units} exposed units)"
            self.console.print(table)
            for e in analysis.effects:
                report.analysis.append(
                    {
                        "experiment": key,
                        "metric": e.metric,
                        "control": e.control,
                        "treatment": e.treatment,
                        "n_control": e.n_control,
                        "n_treatment": e.n_treatment,
                        "control_mean": e.control_mean,
                        "treatment_mean": e.treatment_mean,
                        "effect": e.effect,
                        "ci": e.ci,
                        "p_value": e.p_value,
                        "prob_treatment_better": e.prob_treatment_better,
                    }
                )
        # drift
        drift = getattr(self, "drift", None)
        if drift is not None:
            table = Table(
                title=f"drift of {MODEL!r}: score {drift.drift_score:.3f}, threshold {drift.threshold:.3f} "
                f"({drift.reference_rows} reference rows, {drift.live_rows} live)"
            )
            for col in ("feature", "PSI", "KS D", "KS p", "SMD (d)", "drift score"):
                table.add_column(col, justify="right" if col != "feature" else "left")
            top = sorted(drift.features.items(), key=lambda kv: (kv[1].drift_score, kv[1].psi), reverse=True)[:6]
            for feature, f in top:
                report.top_drift.append(
                    {"feature": feature, "psi": f.psi, "ks": f.ks_statistic, "drift_score": f.drift_score}
                )
                table.add_row(
                    feature,
                    _fmt(f.psi),
                    _fmt(f.ks_statistic),
                    f"{f.ks_pvalue:.2g}",
                    _fmt(f.standardized_mean_difference, 2),
                    _fmt(f.drift_score),
                )
            self.console.print(table)
        if report.accuracy_by_phase:
            acc = ", ".join(f"{k} {v:.3f}" for k, v in report.accuracy_by_phase.items())
            self.console.print(f"served accuracy: {acc}")
        # shadow
        deadline = time.monotonic() + 10
        shadow = router.shadow_report(EXP_NEW)
        while shadow.compared + shadow.errors + shadow.dropped < shadow.mirrored and time.monotonic() < deadline:
            time.sleep(0.2)
            shadow = router.shadow_report(EXP_NEW)
        report.shadow = {
            "version": shadow.shadow_version,
            "mirrored": shadow.mirrored,
            "compared": shadow.compared,
            "dropped": shadow.dropped,
            "errors": shadow.errors,
            "decision_agreement": shadow.decision_agreement,
            "mean_abs_score_diff": shadow.mean_abs_score_diff,
        }
        self.console.print(
            Panel(
                f"shadow {shadow.shadow_version}: {shadow.mirrored} mirrored, {shadow.compared} compared, "
                f"{shadow.dropped} dropped, {shadow.errors} errors; decision agreement with the live answer "
                f"[bold]{shadow.decision_agreement:.1%}[/], mean |score difference| {shadow.mean_abs_score_diff:.3f} "
                "(never served: the live path did not wait)",
                title=f"shadow report of {EXP_NEW}",
            )
        )
        # events
        table = Table(title="router events (ListRouterEvents)")
        for col in ("seq", "kind", "experiment", "message"):
            table.add_column(col)
        for ev in router.events():
            kind = apb.RouterEventKind.Name(ev.kind).removeprefix("ROUTER_EVENT_KIND_")
            report.router_events.append(f"{kind} {ev.experiment_key}: {ev.message}")
            style = "bold red" if ev.kind == apb.ROUTER_EVENT_KIND_GUARDRAIL_TRIPPED else ""
            table.add_row(str(ev.seq), f"[{style}]{kind}[/]" if style else kind, ev.experiment_key, ev.message)
        self.console.print(table)
        table = Table(title="scorer events (ListScorerEvents)")
        for col in ("kind", "message"):
            table.add_column(col)
        for se in self.sdk.scorer.events(MODEL):
            report.scorer_events.append(f"{se.kind}: {se.message}")
            table.add_row(f"[bold red]{se.kind}[/]" if se.kind == "rollback" else se.kind, se.message)
        self.console.print(table)
        # paramserver rejections
        rej = ", ".join(f"{w.worker}{' (straggler)' if w.straggler else ''}: {w.rejections}" for w in report.workers)
        self.console.print(
            f"paramserver stale pushes rejected per worker: {rej} (server total {report.pushes_rejected_stale})"
        )
        # traces
        flush_tracing()
        table = Table(
            title="traces to open in Jaeger (demo -> abrouter Route -> scorer Score; a shadow Score joins its trace)"
        )
        table.add_column("trace id")
        table.add_column("request")
        jaeger = report.otlp_endpoint and ("127.0.0.1" in report.otlp_endpoint or "localhost" in report.otlp_endpoint)
        for trace_id, what in report.traces:
            table.add_row(trace_id, what)
        self.console.print(table)
        if jaeger and report.trace_ids:
            self.console.print(f"open http://127.0.0.1:16686/trace/{report.trace_ids[0]}")
            if "jaeger" in report.service_pids:
                self.console.print(
                    "[yellow]the Jaeger started for this run stops with the mesh[/]: to keep the traces, run Jaeger "
                    "yourself and set OTEL_EXPORTER_OTLP_ENDPOINT before the demo"
                )
        else:
            self.console.print(
                "[dim]no OTLP endpoint was set: run Jaeger (docker run --rm -p 16686:16686 -p 4317:4317 "
                "jaegertracing/jaeger:latest) and set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 to keep these "
                "traces[/]"
            )


def _summary(console: Console, r: DemoReport) -> None:
    lines = [
        f"gang of {len(r.placements)} replicas on {len({g for p in r.placements for g in p['gpus']})} distinct "
        f"simulated GPUs ({', '.join(sorted({p['node'] for p in r.placements}))}); job {r.job_state_after}",
        f"trained through the paramserver: held-out accuracy {_fmt(r.test_accuracy)} (v1 {_fmt(r.v1_accuracy)}); "
        f"stale pushes rejected {r.rejections} (straggler {r.straggler})",
        f"drift {_fmt(r.drift_before)} -> {_fmt(r.drift_after)}, threshold {_fmt(r.threshold_before)} -> "
        f"{_fmt(r.threshold_after)}",
        f"guardrail tripped on {EXP_BAD}: {r.guardrail_tripped}; F1 rollback of v3: {r.f1_rollback} "
        f"(active: {r.active_version})",
        f"SRM p = {r.audit.get('srm_p_value', math.nan):.3g}; {len(r.audit.get('imbalances', []))} imbalances; "
        f"shadow agreement {r.shadow.get('decision_agreement', math.nan):.1%}",
        f"{r.requests} routed requests, {r.route_errors} errors"
        + (f" {r.route_errors_by_code}" if r.route_errors_by_code else "")
        + f"; {r.seconds:.0f}s",
    ]
    console.print(Panel("\n".join(lines), title="guardmesh demo: summary", border_style="green"))


def run_demo(state_dir: Path | None = None, quick: bool = False, console: Console | None = None) -> DemoReport:
    """Run the whole chain on a fresh local mesh and return its figures; see the module docstring.

    ``state_dir`` holds the mesh's pids, logs and databases (default: a temporary folder, removed after a
    successful run); ``quick`` scales the run down (fewer steps and requests: about a minute);
    ``console`` receives the progress and the reports (default: the terminal). Every process started is
    stopped before this returns or raises.
    """
    console = console or Console()
    started = time.monotonic()
    temporary = state_dir is None
    folder = Path(tempfile.mkdtemp(prefix="guardmesh-demo-")) if state_dir is None else Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    scale = QUICK if quick else FULL
    report = DemoReport(state_dir=str(folder.resolve()), quick=quick)
    env = _mesh_env(folder.resolve(), scale)
    demo: _Demo | None = None
    ok = False
    console.print(
        Panel(
            "scheduler -> paramserver -> scorer -> abrouter, each a real process; "
            f"{'quick run' if quick else 'full run'} on breast cancer (scikit-learn)",
            title="guardmesh demo",
            border_style="cyan",
        )
    )
    try:
        demo = _Demo(console, scale, report, env)
        steps: list[Callable[[], None]] = [
            demo.start_mesh,
            demo.schedule,
            demo.register_v1,
            demo.train,
            demo.publish,
            demo.experiments,
            demo.promote,
            demo.reports,
        ]
        for step in steps:
            step()
        ok = True
    finally:
        if demo is not None:
            demo.close()
        config = demo.config if demo is not None else load_config(env=env)
        if (folder / "mesh.json").exists():
            with _mesh_console(console):
                mesh_mod.down(config)
        report.seconds = time.monotonic() - started
        if not ok:
            console.print(f"[red]the demo failed[/]; logs are in {folder / 'logs'}")
    _summary(console, report)
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
        console.print(f"[dim]temporary state folder {folder} removed (pass state_dir to keep logs and databases)[/]")
    return report
