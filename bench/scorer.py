"""Scorer serving benchmark: guardmesh against NVIDIA Triton and a bare grpcio echo, side by side (issue #22).

Every cell of the matrix is measured in the same run, on servers that all run at once, each in its own process:

* ``score_on`` / ``score_off``: guardmesh Score (``python -m services.scorer``), dynamic batching on, and off
  (``scorer.max_batch_size = 1``); ``score_before`` too when ``--before DIR`` names a copy of the repository
  before a change (the same server from that tree: before/after in one run);
* ``score_ahead``: Score on a scorer with ``scorer.commit_ahead`` on (the next group runs while a group's
  decision-log commit is in flight), started only when named in ``--targets``;
* ``oip``: guardmesh ModelInfer (Open Inference Protocol) on the batching scorer, raw FP32 rows (``oip_before``:
  on the ``--before`` tree's scorer);
* ``triton_on`` / ``triton_off``: a real ``tritonserver`` (nvidia-pytriton's, Python backend, CPU) running the same
  TorchScript module with and without Triton's dynamic batcher (:mod:`bench.triton_server`), the same
  ModelInfer request bytes as ``oip``;
* ``echo``: the bare grpcio echo (generic handler on raw bytes) answering the Score request bytes;

for both models (MLP 100-256-256 and 1024-4096-4096-1) and 1, 16, 64 and 256 concurrent clients. The load
generator is separate processes (``--load-procs``), each a grpc.aio channel with its share of the clients,
each client sending one pre-serialised request at a time (no protobuf work in the generator). Per cell:
throughput, p50, p99, failed calls, and the server's CPU per request (user + system time of the server's
process tree from /proc over the cell, divided by the calls answered). Rounds are interleaved (the order of the
targets rotates every round) and the median of the rounds is reported. Both guardmesh scorers compute the drift
score once per 1,000,000 rows (``drift_every``), as before: every row still enters the live window, the decision
log and the monitors; the periodic drift recomputation is what is left out.

    python -m bench.scorer [--quick] [--seconds 6] [--rounds 3] [--clients 1,16,64,256] [--before DIR]

``--quick`` measures 1 and 64 clients for 2 s per cell (to prove the benchmark on a loaded machine). The
records go to bench/results/scorer.json (``RECORD=1``) beside those of other benchmarks (kept); each cell is a
record with its peer (Triton with dynamic batching, the anchor, for throughput), then the issue's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from bench.processes import ECHO_SERVICE, clean_env, free_port, start, stop, wait_serving
from bench.records import RESULTS, machine, record, results_path, write_records
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from inference import grpc_predict_v2_pb2 as oip_pb
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from inference import model_repository_pb2 as repo_pb
from services.scorer.registry import mlp

#: The two models: name -> (label, features, hidden widths).
MODELS = {"small": ("MLP 100-256-256", 100, (256, 256)), "heavy": ("MLP 1024-4096-4096-1", 1024, (4096, 4096))}
FEATURES = [f"x{i}" for i in range(100)]
CLIENTS = (1, 16, 64, 256)
QUICK_CLIENTS = (1, 64)
#: Target -> label in the records.
TARGETS = {
    "score_on": "guardmesh Score, batching on",
    "score_off": "guardmesh Score, batching off",
    "score_before": "guardmesh Score, batching on, code before the change",
    "score_ahead": "guardmesh Score, batching on, commit ahead",
    "oip": "guardmesh ModelInfer (OIP), batching on",
    "oip_before": "guardmesh ModelInfer (OIP), batching on, code before the change",
    "triton_on": "Triton, dynamic batching",
    "triton_off": "Triton, no batching",
    "echo": "bare grpcio echo",
}
#: Messages as large as the heavy model's registration (84 MB of weights).
MAX_MESSAGE_MIB = 256
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_MIB << 20),
    ("grpc.max_receive_message_length", MAX_MESSAGE_MIB << 20),
]


def batch_vs_single(address: str, repeats: int = 5) -> dict[str, float]:
    """ScoreBatch of 256 rows vs the same 256 rows as Score calls one after another (one client): the
    median wall time of ``repeats`` rounds each, and the model executions one round took (ModelStatistics)."""
    rows = np.random.default_rng(2).standard_normal((256, len(FEATURES))).astype(np.float32)
    channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)  # plain: the mesh's config may be mid-edit
    stub = pb_grpc.ScorerServiceStub(channel)
    oip = oip_grpc.GRPCInferenceServiceStub(channel)

    def executions() -> int:
        stats = oip.ModelStatistics(repo_pb.ModelStatisticsRequest(name="small", version="v1"))
        return int(stats.model_stats[0].execution_count)

    def requests(tag: str) -> list[pb.ScoreRequest]:
        return [
            pb.ScoreRequest(
                model="small", request_id=f"{tag}-{i}", features=dict(zip(FEATURES, map(float, r), strict=True))
            )
            for i, r in enumerate(rows)
        ]

    batch_ms, single_ms = [], []
    batch_runs = single_runs = 0
    for k in range(repeats):
        batch = pb.ScoreBatchRequest(requests=requests(f"b{k}"))
        before = executions()
        t0 = time.perf_counter()
        stub.ScoreBatch(batch)
        batch_ms.append((time.perf_counter() - t0) * 1000)
        batch_runs = executions() - before
        single = requests(f"s{k}")
        before = executions()
        t0 = time.perf_counter()
        for r in single:
            stub.Score(r)
        single_ms.append((time.perf_counter() - t0) * 1000)
        single_runs = executions() - before
    channel.close()
    out = {
        "batch_ms": statistics.median(batch_ms),
        "single_ms": statistics.median(single_ms),
        "batch_runs": float(batch_runs),
        "single_runs": float(single_runs),
    }
    print(
        f"ScoreBatch of 256 rows: {out['batch_ms']:7.1f} ms in {batch_runs} model runs;"
        f" 256 Score calls: {out['single_ms']:7.1f} ms in {single_runs} model runs"
    )
    return out


# -- the load generator: separate processes, grpc.aio, pre-serialised requests ---------------------------------


@dataclass
class Job:
    """One cell's share for one load process: ``clients`` concurrent callers of ``method`` at ``address``."""

    address: str
    method: str
    payloads: list[bytes]
    clients: int
    seconds: float
    start_at: float  # time.time() at which every process starts sending


async def _drive(job: Job) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    failed: dict[str, int] = {}
    async with grpc.aio.insecure_channel(job.address, options=GRPC_OPTIONS) as channel:
        call = channel.unary_unary(job.method)  # bytes in, bytes out: no protobuf work here
        await call(job.payloads[0], timeout=120)  # connected and warm before the clock starts
        await asyncio.sleep(max(0.0, job.start_at - time.time()))
        stop_at = time.monotonic() + job.seconds

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    await call(job.payloads[i % len(job.payloads)], timeout=60)
                except grpc.aio.AioRpcError as err:
                    failed[err.code().name] = failed.get(err.code().name, 0) + 1
                else:
                    latencies.append(time.perf_counter() - t0)
                i += job.clients

        await asyncio.gather(*(client(k) for k in range(job.clients)))
    return latencies, failed


def _load_worker(conn: Connection) -> None:
    """A load process: runs each Job it receives, answers (latencies in seconds, failed calls)."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(asyncio.run(_drive(job)))
        except Exception as exc:  # reported to the parent, which raises it
            conn.send(exc)


class LoadGenerator:
    """``procs`` load processes (spawned once, reused for every cell)."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_load_worker, args=(child,), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, address: str, method: str, payloads: list[bytes], clients: int, seconds: float) -> dict[str, float]:
        """Spread ``clients`` over the processes, run them together for ``seconds``; throughput and latency."""
        used = self.conns[: min(clients, len(self.conns))]
        shares = [clients // len(used) + (1 if k < clients % len(used) else 0) for k in range(len(used))]
        start_at = time.time() + 1.0
        for conn, share in zip(used, shares, strict=True):
            conn.send(Job(address, method, payloads, share, seconds, start_at))
        latencies: list[float] = []
        failed: dict[str, int] = {}
        for conn in used:
            answer = conn.recv()
            if isinstance(answer, Exception):
                raise answer
            latencies += answer[0]
            for code, count in answer[1].items():
                failed[code] = failed.get(code, 0) + count
        if failed:
            print(f"  {address} {method}: failed calls by status {failed}", flush=True)
        ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
        return {
            "qps": len(latencies) / seconds,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "calls": float(len(latencies)),
            "failed": float(sum(failed.values())),
        }

    def close(self) -> None:
        """Stop the load processes."""
        for conn in self.conns:
            conn.send(None)
        for p in self.procs:
            p.join(timeout=10)


# -- servers and their CPU ---------------------------------------------------------------------------------------


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and every live descendant (Triton's backend stubs), /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, pp in parents.items() if pp == parent and c not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0.0) for p in tree)


@contextlib.contextmanager
def scorer_process(overrides: dict[str, str], tree: Path | None = None) -> Iterator[tuple[str, int]]:
    """``python -m services.scorer`` (from ``tree``, a copy of the repository, when given) on a free port;
    yield (address, pid) once it serves."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-scorer-") as tmp:
        env = clean_env(tmp, GUARDMESH__SERVICES__SCORER__PORT=str(port), **overrides)
        log = Path(tmp) / "service.log"
        if tree is None:
            proc = start([sys.executable, "-m", "services.scorer"], env, log)
        else:
            # Run in the tree: ``-m`` puts the working directory first on sys.path, so from this repository
            # the tree's PYTHONPATH entry would lose to this repository's code.
            env["PYTHONPATH"] = str(tree)
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "services.scorer"], cwd=tree, env=env, stdout=out, stderr=out
                )
        try:
            wait_serving(f"127.0.0.1:{port}", "scorer", proc, log, timeout=120)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            stop(proc)


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """The bare grpcio echo (``bench.paramserver --echo-server``); yield (address, pid)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-echo-") as tmp:
        log = Path(tmp) / "echo.log"
        proc = start([sys.executable, "-m", "bench.paramserver", "--echo-server", str(port)], clean_env(tmp), log)
        try:
            wait_serving(f"127.0.0.1:{port}", ECHO_SERVICE, proc, log)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            stop(proc)


def torchscript(model: str) -> bytes:
    """The model's TorchScript (seeded: the same weights for every server)."""
    _, n, hidden = MODELS[model]
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(mlp(n, hidden).eval()), buf)
    return buf.getvalue()


def register(address: str, model: str, payload: bytes) -> str:
    """Register and activate ``model`` on the scorer at ``address``; return the device it runs on."""
    channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    stub = pb_grpc.ScorerServiceStub(channel)
    n = MODELS[model][1]
    reference = np.random.default_rng(1).standard_normal((1000, n)).astype("<f4")
    stub.RegisterModel(
        pb.RegisterModelRequest(
            model=model,
            version="v1",
            features=[f"x{i}" for i in range(n)],
            format=pb.MODEL_FORMAT_TORCHSCRIPT,
            payload=payload,
            activate=True,
            reference=common_pb2.Tensor(
                dtype=common_pb2.D_TYPE_FLOAT32, shape=list(reference.shape), data=reference.tobytes()
            ),
        ),
        timeout=300,
    )
    device = stub.ListModels(pb.ListModelsRequest()).device
    channel.close()
    return device


def request_bodies(model: str, rows: int = 256) -> tuple[list[bytes], list[bytes]]:
    """The same ``rows`` rows as serialised ScoreRequests and as ModelInferRequests (raw FP32, output ``score``);
    the ModelInfer model name is a placeholder ``{model}`` swapped per server."""
    n = MODELS[model][1]
    data = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
    names = [f"x{i}" for i in range(n)]
    score = [
        pb.ScoreRequest(
            model=model, request_id=f"r{i}", features=dict(zip(names, map(float, r), strict=True))
        ).SerializeToString()
        for i, r in enumerate(data)
    ]
    infer = [
        oip_pb.ModelInferRequest(
            model_name=model,
            id=f"r{i}",
            inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[1, n])],
            outputs=[oip_pb.ModelInferRequest.InferRequestedOutputTensor(name="score")],
            raw_input_contents=[r.tobytes()],
        ).SerializeToString()
        for i, r in enumerate(data)
    ]
    return score, infer


def renamed(bodies: list[bytes], name: str) -> list[bytes]:
    """ModelInferRequests for model ``name`` instead."""
    out = []
    for body in bodies:
        request = oip_pb.ModelInferRequest.FromString(body)
        request.model_name = name
        out.append(request.SerializeToString())
    return out


SCORE_METHOD = "/guardmesh.v1.ScorerService/Score"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def serve_and_measure(
    clients: tuple[int, ...],
    seconds: float,
    rounds: int,
    load_procs: int,
    before: Path | None,
    threads: int,
    settings: dict[str, str] | None = None,
    wanted: tuple[str, ...] = tuple(TARGETS),
    models: tuple[str, ...] = tuple(MODELS),
) -> tuple[dict[tuple[str, int, str], dict[str, float]], dict[str, float] | None, str]:
    """Start every server, register both models, and measure every (model, clients, target) cell in ``rounds``
    interleaved rounds; per figure the median of the rounds. Also ScoreBatch vs Score calls on ``score_on``
    (None unless the small model is measured)."""
    from bench.triton_server import triton_process

    payloads = {m: torchscript(m) for m in models}
    base = {
        "GUARDMESH__SCORER__DEVICE": "auto",
        "GUARDMESH__SCORER__DRIFT_EVERY": "1000000",
        "GUARDMESH__GRPC__MAX_MESSAGE_MIB": str(MAX_MESSAGE_MIB),
    }
    if threads:
        base["GUARDMESH__SCORER__TORCH_THREADS"] = str(threads)
    base.update(settings or {})
    triton_models = {f"{m}_{mode}": (payloads[m], MODELS[m][1], mode == "on") for m in models for mode in ("on", "off")}
    results: dict[tuple[str, int, str], dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, int]] = {
            "score_on": stack.enter_context(scorer_process(base)),
            "score_off": stack.enter_context(scorer_process({**base, "GUARDMESH__SCORER__MAX_BATCH_SIZE": "1"})),
            "echo": stack.enter_context(echo_server()),
        }
        if "score_ahead" in wanted:
            servers["score_ahead"] = stack.enter_context(
                scorer_process({**base, "GUARDMESH__SCORER__COMMIT_AHEAD": "true"})
            )
        if before is not None:
            servers["score_before"] = stack.enter_context(scorer_process(base, before))
            servers["oip_before"] = servers["score_before"]
        if {"triton_on", "triton_off"} & set(wanted):
            address, proc = stack.enter_context(triton_process(triton_models, torch_threads=threads))
            servers["triton_on"] = servers["triton_off"] = (address, proc.pid)
        servers["oip"] = servers["score_on"]
        device = ""
        for target in ("score_on", "score_off", "score_ahead", "score_before"):
            if target in servers:
                for m in models:
                    device = register(servers[target][0], m, payloads[m])
        load = LoadGenerator(load_procs)
        stack.callback(load.close)
        targets = [t for t in TARGETS if t in servers and t in wanted]
        for model in models:
            score, infer = request_bodies(model)
            bodies = {
                "score_on": (SCORE_METHOD, score),
                "score_off": (SCORE_METHOD, score),
                "score_before": (SCORE_METHOD, score),
                "score_ahead": (SCORE_METHOD, score),
                "echo": (f"/{ECHO_SERVICE}/Unary", score),
                "oip": (INFER_METHOD, infer),
                "oip_before": (INFER_METHOD, infer),
                "triton_on": (INFER_METHOD, renamed(infer, f"{model}_on")),
                "triton_off": (INFER_METHOD, renamed(infer, f"{model}_off")),
            }
            for n in clients:
                taken: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
                for k in range(rounds):
                    for target in targets[k % len(targets) :] + targets[: k % len(targets)]:  # rotate the order
                        method, body = bodies[target]
                        pid = servers[target][1]
                        cpu0 = tree_cpu_s(pid)
                        r = load.run(servers[target][0], method, body, n, seconds)
                        r["cpu_ms_per_request"] = (tree_cpu_s(pid) - cpu0) * 1000 / max(r["calls"], 1.0)
                        taken[target].append(r)
                for target in targets:
                    r = results[(model, n, target)] = {
                        key: statistics.median(t[key] for t in taken[target]) for key in taken[target][0]
                    }
                    print(
                        f"{model:5s} {n:3d} clients  {TARGETS[target]:52s} {r['qps']:8,.0f} req/s"
                        f"  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
                        f"  CPU {r['cpu_ms_per_request']:6.3f} ms/req  failed {r['failed']:.0f}",
                        flush=True,
                    )
        # the ScoreBatch comparison runs on the small model: only when it is among the models measured
        batch = batch_vs_single(servers["score_on"][0]) if "small" in models else None
    return results, batch, device


def matrix_records(
    results: dict[tuple[str, int, str], dict[str, float]], clients: tuple[int, ...], rounds: int, device: str
) -> list[dict[str, Any]]:
    """One record per cell (throughput beside Triton with dynamic batching, the anchor; latency, CPU and
    failures as fields), then the targets of issue #22 (each against its peer in the same run)."""
    out: list[dict[str, Any]] = []
    for (model, n, target), r in results.items():
        anchor = results.get((model, n, "triton_on"))
        rec = record(
            f"Serving matrix: {MODELS[model][0]}, {n} clients, {TARGETS[target]}",
            "requests/s",
            r["qps"],
            "Triton, dynamic batching (same run)" if anchor else "none measured in this run",
            anchor["qps"] if anchor else None,
            None,
        )
        rec.update(
            p50_ms=r["p50_ms"],
            p99_ms=r["p99_ms"],
            server_cpu_ms_per_request=r["cpu_ms_per_request"],
            failed_calls=r["failed"],
            rounds=rounds,
            device=device,
        )
        out.append(rec)

    def cell(model: str, n: int, target: str) -> dict[str, float] | None:
        return results.get((model, n, target))

    def goal(
        name: str, unit: str, ours: float, peer: str, value: float, goal: float | None, higher: bool = True
    ) -> None:
        out.append(record(f"Target (#22): {name}", unit, ours, peer, value, goal, higher_is_better=higher))

    small, heavy = MODELS["small"][0], MODELS["heavy"][0]
    if (
        (s := cell("small", 64, "score_on"))
        and (t := cell("small", 64, "triton_off"))
        and (e := cell("small", 64, "echo"))
    ):
        goal(
            f"Score, {small}, 64 clients, vs Triton without batching",
            "requests/s",
            s["qps"],
            "Triton, no batching (same run)",
            t["qps"],
            1.0,
        )
        goal(
            f"Score, {small}, 64 clients, vs the bare echo",
            "requests/s",
            s["qps"],
            "bare grpcio echo (same run)",
            e["qps"],
            0.7,
        )
        goal(
            f"Score p99, {small}, 64 clients, vs the bare echo's (<= 1.5x)",
            "ms",
            s["p99_ms"],
            "bare grpcio echo p99 (same run)",
            e["p99_ms"],
            1 / 1.5,
            higher=False,
        )
        goal(
            f"server CPU per Score request, {small}, 64 clients, vs the echo's (<= 2x)",
            "ms",
            s["cpu_ms_per_request"],
            "bare grpcio echo (same run)",
            e["cpu_ms_per_request"],
            0.5,
            higher=False,
        )
        a = cell("small", 64, "triton_on")
        assert a is not None
        goal(
            f"anchor: Score, {small}, 64 clients, vs Triton with dynamic batching",
            "requests/s",
            s["qps"],
            "Triton, dynamic batching (same run)",
            a["qps"],
            None,
        )
    if (
        (s := cell("heavy", 64, "score_on"))
        and (t := cell("heavy", 64, "triton_on"))
        and (o := cell("heavy", 64, "score_off"))
    ):
        goal(
            f"Score batching on, {heavy}, 64 clients, vs Triton with dynamic batching",
            "requests/s",
            s["qps"],
            "Triton, dynamic batching (same run)",
            t["qps"],
            0.8,
        )
        goal(
            f"Score batching on vs off, {heavy}, 64 clients",
            "requests/s",
            s["qps"],
            "Score, batching off (same run)",
            o["qps"],
            4.0,
        )
    for model in MODELS:
        if (s := cell(model, 1, "score_on")) and (o := cell(model, 1, "score_off")):
            goal(
                f"Score batching on vs off, {MODELS[model][0]}, 1 client",
                "requests/s",
                s["qps"],
                "Score, batching off (same run)",
                o["qps"],
                0.9,
            )
            goal(
                f"Score p50 batching on vs off, {MODELS[model][0]}, 1 client",
                "ms",
                s["p50_ms"],
                "Score, batching off (same run)",
                o["p50_ms"],
                0.9,
                higher=False,
            )
    for model in MODELS:
        for n in clients:
            if (s := cell(model, n, "score_on")) and (b := cell(model, n, "score_before")):
                goal(
                    f"Score after vs before the change, {MODELS[model][0]}, {n} clients",
                    "requests/s",
                    s["qps"],
                    "the same server from the code before the change (same run)",
                    b["qps"],
                    None,
                )
            if (s := cell(model, n, "score_ahead")) and (b := cell(model, n, "score_on")):
                goal(
                    f"Score with commit ahead vs without, {MODELS[model][0]}, {n} clients",
                    "requests/s",
                    s["qps"],
                    "Score, batching on, each group waiting for its commit (same run)",
                    b["qps"],
                    None,
                )
            if (s := cell(model, n, "oip")) and (b := cell(model, n, "oip_before")):
                goal(
                    f"ModelInfer after vs before the change, {MODELS[model][0]}, {n} clients",
                    "requests/s",
                    s["qps"],
                    "the same server from the code before the change (same run)",
                    b["qps"],
                    None,
                )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results/scorer.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 64 clients, 2 s per cell (to prove it runs)")
    ap.add_argument("--seconds", type=float, default=None, help="measurement time per cell (default 6; quick 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (median reported)")
    ap.add_argument("--clients", default="", help="comma-separated client counts (default 1,16,64,256)")
    ap.add_argument(
        "--load-procs", type=int, default=max(2, min(8, (os.cpu_count() or 2) // 2)), help="load generator processes"
    )
    ap.add_argument("--targets", default="", help=f"comma-separated subset of {', '.join(TARGETS)}")
    ap.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a copy of the repository before a change: its scorer runs beside this one (score_before, oip_before)",
    )
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="intra-op threads for every model server (0: torch's default)"
    )
    ap.add_argument(
        "--scorer-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a GUARDMESH__ override for the guardmesh scorers (e.g. GUARDMESH__GRPC__MAX_WORKERS=8); repeatable",
    )
    ap.add_argument("--skip-drift", action="store_true", help="leave the drift statistics records as they are")
    ap.add_argument("--note", default="", help="a note on every record of this run (e.g. how loaded the machine was)")
    args = ap.parse_args(argv)
    clients = (
        tuple(int(c) for c in args.clients.split(",")) if args.clients else (QUICK_CLIENTS if args.quick else CLIENTS)
    )
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 6.0)
    print(f"machine: {machine()}; load generator: {args.load_procs} processes", flush=True)
    settings = dict(kv.split("=", 1) for kv in args.scorer_setting)
    wanted = tuple(args.targets.split(",")) if args.targets else tuple(TARGETS)
    models = tuple(args.models.split(",")) if args.models else tuple(MODELS)
    results, batch, device = serve_and_measure(
        clients, seconds, args.rounds, args.load_procs, args.before, args.torch_threads, settings, wanted, models
    )
    records = matrix_records(results, clients, args.rounds, device)
    records.extend(
        record(
            f"ScoreBatch of 256 rows, one call ({batch['batch_runs']:.0f} model runs) vs 256 Score calls one after "
            f"another ({batch['single_runs']:.0f} model runs), MLP 100-256-256, median of 5",
            "ms",
            batch["batch_ms"],
            "256 Score calls, one client (same server, same run)",
            batch["single_ms"],
            None,
            higher_is_better=False,
        )
        for batch in ([batch] if batch is not None else [])
    )
    from bench import drift_bench

    for r in [] if args.skip_drift else drift_bench.run():
        records.append(
            record(r["name"], r["unit"], r["ours"], r["peer"], r["peer_value"], r["target"], r["higher_is_better"])
        )
    note = f"{'quick mode; ' if args.quick else ''}{seconds:g} s per cell, {args.rounds} rounds; {args.note}".strip(
        "; "
    )
    for r in records:
        r["note"] = note
    write_records("scorer", keep_others(records))
    return 0


def recorded(name: str) -> list[dict[str, Any]]:
    """The records of results file ``name`` where this run writes (bench/results/local/ unless recording),
    else the tracked ones; none if neither can be read."""
    for path in (results_path(name), RESULTS / name):
        try:
            return list(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return []


def keep_others(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of bench/results/scorer.json that this run did not produce (other benchmarks write
    there too), followed by this run's."""
    existing = recorded("scorer.json")
    ours = {r["name"] for r in records}
    # Names that carry the run's figures, and the records of the serving benchmark before the matrix (its
    # threads-in-one-process harness), which the matrix replaces.
    replaced = (
        "ScoreBatch of 256 rows",
        "Ceiling: bare grpcio echo",
        "Score throughput,",
        "Score p99 latency,",
        "Score p50 latency,",
        "Target (#22)",
        "Serving matrix:",
    )
    kept = [r for r in existing if r.get("name") not in ours and not str(r.get("name", "")).startswith(replaced)]
    return kept + records


if __name__ == "__main__":
    raise SystemExit(main())
