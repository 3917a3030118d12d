"""The per-request cost of the service runtime (issue #22): every service's server, against the bare echo.

Each target is a server in its own process, driven by the scorer benchmark's load generator (separate
processes, grpc.aio, pre-serialised requests, ``--clients`` concurrent callers); per cell: throughput, p50,
p99 and the server's CPU per request (/proc). Targets:

* ``echo``: the bare grpcio echo (``bench.paramserver --echo-server``: a generic handler on raw bytes);
* ``runtime_echo``: the same echo handler served by :func:`guardmesh.runtime.start_service` (health,
  reflection, the metrics, drain-gate, tracing and domain-error interceptors): what every service pays;
* ``runtime_echo_aio`` / ``runtime_echo_async``: the runtime echo on the runtime's grpc.aio server
  (``ServiceDefinition.asyncio``), the handler a plain function on its pool / ``async def`` on its loop (this
  tree only: no ``@before`` twin);
* ``Assign`` (abrouter, no exposure logged), ``PushPull`` (paramserver, asynchronous model, a 16x16 and a 16
  tensor), ``SubmitJob`` (scheduler, 1 shared GPU, 64 nodes of 8 cards): each service's main call;
* ``Score`` (scorer, MLP 100-256-256, batching on); ``ModelInfer`` (the same scorer's Open Inference Protocol
  call, one raw FP32 row per request).

With ``--before DIR`` (a copy of the repository before a change, its generated code and native build
included) every guardmesh target also runs from that tree (``<target>@before``), beside this one (or the
tree ``--after DIR`` names), in the same run; rounds are interleaved (the order rotates every round) and the
median of the rounds is reported. The echo answers the Score request bytes (2.4 KB) in every cell.

``--profile TARGET`` instead runs one guardmesh target under a profiler while the load generator drives it, and
prints where the server's CPU went, per request: with yappi (CPU clock, every thread) the functions with the
most own and inclusive time, its own per-call cost included (it about triples a Score request's); with
``--profiler py-spy`` (``pip install py-spy``; samples of the thread holding the GIL, the server undisturbed)
the samples scaled to the CPU per request measured in the same run, grouped into :data:`COMPONENTS`, the
thread hand-offs by the code that made them, and the top frames.

    python -m bench.runtime [--quick] [--seconds 4] [--rounds 3] [--clients 64] [--before DIR] [--after DIR]
    python -m bench.runtime --profile runtime_echo|Score|Assign|PushPull|SubmitJob [--profiler py-spy] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

THIS = Path(__file__).resolve()
REPO = THIS.parent.parent
#: The runtime echo's proto service name (a generic handler: it is in no descriptor pool).
RUNTIME_ECHO_SERVICE = "bench.RuntimeEcho"
#: Target -> (service started, method called).
TARGETS = {
    "runtime_echo": ("runtime_echo", f"/{RUNTIME_ECHO_SERVICE}/Unary"),
    "runtime_echo_aio": ("runtime_echo_aio", f"/{RUNTIME_ECHO_SERVICE}/Unary"),
    "runtime_echo_async": ("runtime_echo_async", f"/{RUNTIME_ECHO_SERVICE}/Unary"),
    "Assign": ("abrouter", "/guardmesh.v1.ABRouterService/Assign"),
    "PushPull": ("paramserver", "/guardmesh.v1.ParamServerService/PushPull"),
    "SubmitJob": ("scheduler", "/guardmesh.v1.SchedulerService/SubmitJob"),
    "Score": ("scorer", "/guardmesh.v1.ScorerService/Score"),
    "ModelInfer": ("scorer", "/inference.GRPCInferenceService/ModelInfer"),
}
#: Requests per cell's payload list: each client cycles through its own share (unique job ids and push steps).
PAYLOADS = 8192
NODES, GPUS, GPU_MIB, JOB_MIB = 64, 8, 81_920, 1024


# -- the server side: run as a script from a tree (``python .../bench/runtime.py --serve NAME``) ---------------


#: Targets served only by this tree's runtime (the grpc.aio server): no ``@before`` twin.
AFTER_ONLY = ("runtime_echo_aio", "runtime_echo_async")


def _echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return request


async def _echo_async(request: bytes, _context: object) -> bytes:
    return request


class _EchoBinding:
    """The bare echo's handler, as a runtime binding (``on_loop``: as ``async def``, for the aio server)."""

    def __init__(self, on_loop: bool = False) -> None:
        self.on_loop = on_loop

    def add_to_server(self, server: grpc.Server) -> None:
        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(_echo_async if self.on_loop else _echo)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RUNTIME_ECHO_SERVICE, handlers),))

    def start(self) -> None:
        """Nothing to load."""

    def drain(self) -> None:
        """No streams."""

    def close(self) -> None:
        """Nothing held."""


def serve(name: str, port: int, profile: str) -> int:
    """Run ``name`` (a service or ``runtime_echo``) from the guardmesh on sys.path until SIGTERM; with
    ``profile``, under yappi, its statistics written there (pstat) on the way out."""
    from guardmesh.config import load_config
    from guardmesh.logs import setup_logging
    from guardmesh.runtime import ServiceDefinition, load_definition, start_service

    config = load_config()
    setup_logging(name, config.logging.level, config.logging.format)
    if name.startswith("runtime_echo"):
        # runtime_echo: the sync server; _aio: the grpc.aio server, the plain handler on its pool; _async: the
        # aio server, the handler async def on its loop
        on_loop = name == "runtime_echo_async"
        # (only named when set: an older tree's runtime, the --before one, has no such field)
        aio: dict[str, Any] = {"asyncio": True} if name != "runtime_echo" else {}
        definition = ServiceDefinition(name, (RUNTIME_ECHO_SERVICE,), lambda _config: _EchoBinding(on_loop), **aio)
    else:
        definition = load_definition(name)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if profile:
        import yappi

        yappi.set_clock_type("cpu")
        yappi.start(builtins=True)  # every thread, those the server starts later included
    running = start_service(definition, config, port=port, host="127.0.0.1")
    import guardmesh.runtime as runtime_module

    freeze = getattr(runtime_module, "freeze_startup_objects", None)  # as guardmesh.runtime.serve (a newer tree's)
    if freeze is not None:
        freeze()
    stop.wait()
    if profile:
        yappi.stop()
        yappi.get_func_stats().save(profile, type="pstat")
    running.stop(grace=5.0)
    return 0


# -- the driving side ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(name: str, tree: Path, profile: str = "") -> Iterator[tuple[str, int]]:
    """``name`` from ``tree`` on a free port, in its own process; yield (address, pid) once it serves."""
    from bench.processes import clean_env, free_port, stop, wait_serving

    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"guardmesh-bench-runtime-{name}-") as tmp:
        env = clean_env(tmp, GUARDMESH__SCORER__DRIFT_EVERY="1000000")
        env["PYTHONPATH"] = str(tree)  # this tree's guardmesh and services, not the editable install's
        for service in ("scheduler", "abrouter"):
            env[f"GUARDMESH__{service.upper()}__SQLITE_SYNCHRONOUS"] = "NORMAL"
        log = Path(tmp) / "server.log"
        cmd = [sys.executable, str(THIS), "--serve", name, "--port", str(port), "--profile-out", profile]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=out)
        try:
            wait_serving(f"127.0.0.1:{port}", "" if name.startswith("runtime_echo") else name, proc, log, timeout=120)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            stop(proc)
            if proc.returncode not in (0, -signal.SIGTERM):
                print(f"  {name} from {tree} exited {proc.returncode}: {log.read_text()[-1500:]}", flush=True)


def set_up(target: str, address: str) -> None:
    """What ``target``'s calls need on the server at ``address``: an experiment, a model, nodes."""

    from guardmesh.v1 import abrouter_pb2 as apb
    from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
    from guardmesh.v1 import paramserver_pb2 as ppb
    from guardmesh.v1 import paramserver_pb2_grpc as ppb_grpc
    from guardmesh.v1 import scheduler_pb2 as spb
    from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

    with grpc.insecure_channel(address) as channel:
        if target == "Assign":
            apb_grpc.ABRouterServiceStub(channel).CreateExperiment(
                apb.CreateExperimentRequest(
                    spec=apb.ExperimentSpec(
                        key="bench-exp",
                        arms=[apb.Arm(name="control", weight=0.5), apb.Arm(name="treatment", weight=0.5)],
                        metrics=["conversion"],
                    )
                ),
                timeout=60,
            )
        elif target == "PushPull":
            tensors = ps_tensors(1.0)
            ppb_grpc.ParamServerServiceStub(channel).CreateModel(
                ppb.CreateModelRequest(
                    model="bench",
                    tensors=tensors,
                    optimizer=ppb.OptimizerConfig(kind=ppb.OPTIMIZER_KIND_SGD, learning_rate=0.01),
                    consistency=ppb.ConsistencyConfig(mode=ppb.CONSISTENCY_MODE_ASYNC),
                    checkpoint_every=0,
                ),
                timeout=60,
            )
        elif target == "SubmitJob":
            stub = spb_grpc.SchedulerServiceStub(channel)
            for n in range(NODES):
                gpus = [
                    spb.GpuDevice(index=i, uuid=f"GPU-b{n}-{i}", model="A100-80GB", memory_mib=GPU_MIB)
                    for i in range(GPUS)
                ]
                stub.RegisterNode(spb.RegisterNodeRequest(node=spb.NodeSpec(name=f"b{n}", gpus=gpus)), timeout=60)
        elif target in ("Score", "ModelInfer"):
            from bench.scorer import register, torchscript

            register(address, "small", torchscript("small"))


def ps_tensors(scale: float) -> list[Any]:
    """The parameter server model's tensors (a 16x16 and a 16), normal values times ``scale``."""
    import numpy as np

    from guardmesh.v1 import common_pb2
    from guardmesh.v1 import paramserver_pb2 as ppb

    rng = np.random.default_rng(0)
    return [
        ppb.NamedTensor(
            name=name,
            tensor=common_pb2.Tensor(
                dtype=common_pb2.D_TYPE_FLOAT32,
                shape=list(shape),
                data=(rng.standard_normal(shape) * scale).astype("<f4").tobytes(),
            ),
        )
        for name, shape in (("w", (16, 16)), ("b", (16,)))
    ]


def payloads(target: str, tag: str, clients: int) -> list[bytes]:
    """:data:`PAYLOADS` serialised requests of ``target``; client ``k`` sends those at ``k, k + clients, ...``,
    so its pushes are one worker's steps in order, and every job id is new (``tag`` tells cells apart)."""

    from guardmesh.v1 import abrouter_pb2 as apb
    from guardmesh.v1 import paramserver_pb2 as ppb
    from guardmesh.v1 import scheduler_pb2 as spb

    if target.startswith("runtime_echo") or target == "Score":
        from bench.scorer import request_bodies

        return request_bodies("small")[0]
    if target == "ModelInfer":
        from bench.scorer import request_bodies

        return request_bodies("small")[1]
    out: list[bytes] = []
    gradients = ps_tensors(1e-3)
    for i in range(PAYLOADS):
        if target == "Assign":
            message: Any = apb.AssignRequest(unit_id=f"{tag}-u{i}", experiment_keys=["bench-exp"], log_exposure=False)
        elif target == "PushPull":
            message = ppb.PushPullRequest(
                model="bench",
                worker_id=f"{tag}-w{i % clients}",
                base_version=0,
                step_id=i // clients,
                gradients=gradients,
            )
        else:
            message = spb.SubmitJobRequest(
                job=spb.JobSpec(
                    job_id=f"{tag}-j{i}",
                    tenant="bench",
                    qos=spb.QOS_CLASS_BURSTABLE,
                    replicas=1,
                    gpus_per_replica=1,
                    memory_mib_per_gpu=JOB_MIB,
                    allow_sharing=True,
                    lease_ttl_s=3600,
                )
            )
        out.append(message.SerializeToString())
    return out


def measure(
    targets: tuple[str, ...],
    clients: int,
    seconds: float,
    rounds: int,
    load_procs: int,
    before: Path | None,
    after: Path = REPO,
) -> dict[str, dict[str, float]]:
    """Every target from ``after`` (and its ``@before`` twin) and the bare echo in ``rounds`` interleaved rounds;
    per cell the median of the rounds."""
    from bench.scorer import LoadGenerator, echo_server, tree_cpu_s

    trees = {"": after} | ({"@before": before} if before is not None else {})
    taken: dict[str, list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, int, str]] = {}  # cell -> (address, pid, method)
        for target in targets:
            name, method = TARGETS[target]
            for suffix, tree in trees.items():
                if suffix and target in AFTER_ONLY:
                    continue
                address, pid = stack.enter_context(server(name, tree))
                set_up(target, address)
                servers[target + suffix] = (address, pid, method)
        echo_address, echo_pid = stack.enter_context(echo_server())
        servers["echo"] = (echo_address, echo_pid, "/bench.Echo/Unary")
        load = LoadGenerator(load_procs)
        stack.callback(load.close)
        cells = list(servers)
        echo_bodies = payloads("Score", "echo", clients)
        for k in range(rounds):
            for cell in cells[k % len(cells) :] + cells[: k % len(cells)]:
                address, pid, method = servers[cell]
                target = cell.split("@")[0]
                body = echo_bodies if cell == "echo" else payloads(target, f"{cell.replace('@', '.')}-r{k}", clients)
                cpu0 = tree_cpu_s(pid)
                r = load.run(address, method, body, clients, seconds)
                r["cpu_ms_per_request"] = (tree_cpu_s(pid) - cpu0) * 1000 / max(r["calls"], 1.0)
                taken.setdefault(cell, []).append(r)
    results = {cell: {key: statistics.median(t[key] for t in runs) for key in runs[0]} for cell, runs in taken.items()}
    for cell, r in results.items():
        print(
            f"{cell:22s} {clients:3d} clients {r['qps']:8,.0f} req/s  p50 {r['p50_ms']:7.2f} ms"
            f"  p99 {r['p99_ms']:7.2f} ms"
            f"  CPU {r['cpu_ms_per_request']:6.3f} ms/req  failed {r['failed']:.0f}",
            flush=True,
        )
    return results


#: Components of a request's CPU, for the py-spy breakdown: the first pattern (in this order) that a frame of a
#: sample matches, from the innermost frame out, names the sample's component.
COMPONENTS = (
    ("proto parse / serialise", ("FromString", "SerializeToString", "_serialize", "_deserialize")),
    ("torch forward", ("torch/",)),
    ("drift window", ("drift.py",)),
    ("decision log", ("persistence.py", "DecisionLog", "durable.py", "sqlite")),
    ("metrics (OpenTelemetry)", ("opentelemetry/sdk/metrics", "opentelemetry/metrics", "monitoring.py")),
    ("spans / trace context", ("tracing.py", "opentelemetry/trace", "opentelemetry/context")),
    ("feature extraction", ("Scorer._parse", "call_from_pb")),
    ("rules, imputation", ("Scorer._prepare", "decision.py")),
    ("batcher hand-off", ("batching.py",)),
    ("decide, outcomes", ("Scorer._finish", "Scorer._observe", "Scorer.score_many", "Scorer._scored")),
    ("response build", ("outcome_to_pb",)),
    ("thread hand-offs (locks, events, futures)", ("threading.py", "gathering.py", "concurrent/futures")),
    ("the scorer's servicer", ("ScorerServicer.Score", "Scorer.score ")),
    (
        "runtime interceptors",
        ("guardmesh/handlers.py", "guardmesh/runtime.py", "guardmesh/errors.py", "grpc/_interceptor"),
    ),
    ("grpc server (as for the echo)", ("grpc/_server.py", "grpc/_common.py", "grpc/_utilities.py")),
)


def profile(target: str, clients: int, seconds: float, load_procs: int, top: int, profiler: str = "yappi") -> None:
    """Drive ``target`` under ``profiler`` for ``seconds`` and print where its CPU went (yappi: every function's
    own and inclusive time, its per-call overhead included; py-spy: samples, the process undisturbed, scaled to
    the CPU per request measured in the same run, and grouped into :data:`COMPONENTS`)."""
    from bench.scorer import LoadGenerator, tree_cpu_s

    name, method = TARGETS[target]
    with tempfile.TemporaryDirectory(prefix="guardmesh-profile-") as tmp:
        out = str(Path(tmp) / ("server.pstat" if profiler == "yappi" else "server.raw"))
        with server(name, REPO, profile=out if profiler == "yappi" else "") as (address, pid):
            set_up(target, address)
            load = LoadGenerator(load_procs)
            spy = None
            if profiler == "py-spy":
                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(max(1, int(seconds))),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--output",
                        out,
                        "--nonblocking",
                        "--gil",  # only the thread holding the GIL: Python CPU, not threads waiting
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            try:
                cpu0 = tree_cpu_s(pid)
                r = load.run(address, method, payloads(target, "profile", clients), clients, seconds)
                cpu = tree_cpu_s(pid) - cpu0
                if spy is not None and spy.wait(timeout=120) != 0:
                    raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode()[-1000:] if spy.stderr else ''}")
            finally:
                load.close()
        calls = max(r["calls"], 1.0)
        print(
            f"{target}: {r['calls']:.0f} calls, {r['qps']:,.0f} req/s under {profiler}, "
            f"process CPU {cpu * 1000 / calls:.3f} ms/call ({profiler} included)"
        )
        if profiler == "py-spy":
            print_samples(Path(out), cpu * 1000 / calls, top)
            return
        import pstats

        stats = pstats.Stats(out)
        rows = list(stats.stats.items())  # type: ignore[attr-defined]
        for title, column in (("own time", 2), ("inclusive time", 3)):
            print(f"\n{title} per call (us), top {top}: own, inclusive, calls per request, function")
            for (file, line, fn), (_cc, nc, tt, ct, _callers) in sorted(rows, key=lambda kv: -kv[1][column])[:top]:
                per = 1e6 / calls
                print(f"  {tt * per:8.1f} {ct * per:8.1f} {nc / calls:6.1f}  {fn}  {file}:{line}")


def _generic(frame: str) -> bool:
    """A frame of the thread machinery itself (not the code that asked for a hand-off)."""
    return any(p in frame for p in ("threading.py", "concurrent/futures", "contextlib.py", "gathering.py"))


def print_samples(raw: Path, cpu_ms_per_call: float, top: int) -> None:
    """py-spy's collapsed stacks as CPU per request: by component, and the functions with the most own and
    inclusive samples. Python threads only: the gRPC core's own threads are in the process CPU, not here."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";")[1:], int(count)))  # the first is the thread's name
    total = sum(n for _, n in stacks) or 1
    per = cpu_ms_per_call * 1000 / total  # microseconds of one request's CPU per sample
    by_component: dict[str, int] = {}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    hand_offs: dict[str, int] = {}  # the thread hand-offs by the frame that made them
    for stack, n in stacks:
        component = "other"
        for k in range(len(stack) - 1, -1, -1):
            hit = next((c for c, patterns in COMPONENTS if any(p in stack[k] for p in patterns)), None)
            if hit is not None:
                component = hit
                if hit.startswith("thread hand-offs"):
                    site = next((f for f in reversed(stack[:k]) if not _generic(f)), "?")
                    hand_offs[site] = hand_offs.get(site, 0) + n
                break
        by_component[component] = by_component.get(component, 0) + n
        if stack:
            own[stack[-1]] = own.get(stack[-1], 0) + n
        for frame in set(stack):
            inclusive[frame] = inclusive.get(frame, 0) + n
    print(f"\n{total} samples of the Python threads; us of CPU per request (share of the samples):")
    for component, n in sorted(by_component.items(), key=lambda kv: -kv[1]):
        print(f"  {n * per:8.1f}  {n / total:6.1%}  {component}")
    print("\nthread hand-offs by the frame that made them: us per request, share, frame")
    for site, n in sorted(hand_offs.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {n * per:8.1f}  {n / total:6.1%}  {site}")
    for title, table in (("own", own), ("inclusive", inclusive)):
        print(f"\n{title} samples, top {top}: us per request, share, frame")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {n * per:8.1f}  {n / total:6.1%}  {frame}")


def main(argv: list[str] | None = None) -> int:
    """Measure (or profile) and print; ``RECORD=1`` writes bench/results/runtime.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", default="", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--profile", default="", choices=["", *TARGETS], help="profile one target under yappi instead")
    ap.add_argument(
        "--profiler",
        default="yappi",
        choices=["yappi", "py-spy"],
        help="yappi (every call, its overhead included) or py-spy (sampling; pip install py-spy)",
    )
    ap.add_argument("--quick", action="store_true", help="2 s per cell")
    ap.add_argument("--seconds", type=float, default=None, help="measurement time per cell (default 4; quick 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (median reported)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--load-procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}")
    ap.add_argument("--before", type=Path, default=None, help="a copy of the repository before a change")
    ap.add_argument(
        "--after",
        type=Path,
        default=REPO,
        help="the tree measured as the change (default this repository; a copy isolates one change from the "
        "uncommitted work of others in a shared tree)",
    )
    ap.add_argument("--top", type=int, default=30, help="profile rows printed")
    ap.add_argument("--note", default="", help="a note on every record (e.g. how loaded the machine was)")
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.port, args.profile_out)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 4.0)
    if args.profile:
        profile(args.profile, args.clients, seconds, args.load_procs, args.top, args.profiler)
        return 0
    from bench.records import machine, record, write_records

    print(f"machine: {machine()}; load generator: {args.load_procs} processes", flush=True)
    targets = tuple(t for t in args.targets.split(",") if t)
    results = measure(targets, args.clients, seconds, args.rounds, args.load_procs, args.before, args.after)
    echo = results["echo"]
    peer = "bare grpcio echo (same run)"
    records = []
    for cell, r in results.items():
        if cell == "echo":
            continue
        label = f"{cell}, {args.clients} clients"
        records += [
            record(f"runtime: {label}, throughput vs the echo", "req/s", r["qps"], peer, echo["qps"], None),
            record(f"runtime: {label}, p99 vs the echo's", "ms", r["p99_ms"], peer, echo["p99_ms"], None, False),
            record(
                f"runtime: {label}, server CPU per request vs the echo's",
                "ms",
                r["cpu_ms_per_request"],
                peer,
                echo["cpu_ms_per_request"],
                None,
                False,
            ),
        ]
        if "@" not in cell and (old := results.get(f"{cell}@before")) is not None:
            records.append(
                record(
                    f"runtime: {label}, server CPU per request, after vs before (same run)",
                    "ms",
                    r["cpu_ms_per_request"],
                    "the code before the change (same run)",
                    old["cpu_ms_per_request"],
                    None,
                    False,
                )
            )
    note = f"{seconds:g} s per cell, {args.rounds} rounds; {args.note}".strip("; ")
    for rec in records:
        rec["note"] = note
    write_records("runtime", kept_records(results, args.clients) + records)
    return 0


def kept_records(measured: dict[str, dict[str, float]], clients: int) -> list[dict[str, Any]]:
    """The records of bench/results/runtime.json for targets this run did not measure (a run of a subset, e.g.
    ``--targets Score``, keeps the other services' figures with their own notes)."""
    from bench.scorer import recorded

    existing = recorded("runtime.json")
    ours = tuple(f"runtime: {cell}, {clients} clients," for cell in measured)
    return [r for r in existing if not str(r.get("name", "")).startswith(ours)]


if __name__ == "__main__":
    raise SystemExit(main())
