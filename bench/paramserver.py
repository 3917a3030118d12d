"""Parameter-server benchmark: the hot-path kernels and push+pull over gRPC, each beside its peer in one run.

``python -m bench.paramserver [--repeats-small N] [--repeats-large N] [--skip-kernels] [--skip-gloo]``;
``python -m bench.paramserver --profile`` only breaks a round trip's CPU down by stage (see ``profile``).

a) Kernels (``bench.kernels_bench.run()``): fused aggregation of K = 2, 4, 8 buffers of 16 Mi float32 against
   numpy (copyto then add into the output; target >= 1.8x at K = 8) and against the memory-bandwidth bound
   from ``np.copyto``; the fused Adam step on 16 Mi parameters against ``torch.optim.Adam`` (foreach, fused;
   target >= 1.0x the fastest).
b) Push+pull of N = 1 Mi and 16 Mi float32 over gRPC. The server runs in its own process
   (``python -m services.paramserver``, as users run it, default 64 MiB message limit and 4 MiB stream
   threshold); the model has one tensor of N float32, SGD, ASYNC consistency (every push is applied: the
   NaN/Inf check and the SGD step run on every round trip). Two ways of one round trip, each moving 2 x 4N
   bytes, timed from this process through the SDK (``guardmesh.wire`` on both ends). The parameters are
   received the cheapest way the SDK offers: at 1 Mi as a read-only view of the answer (no copy), at 16 Mi
   into one preallocated array (``into=``, the trainer's parameter storage: the chunks land there directly):
   - ``ParamServerClient.pull()`` then ``push()``: two calls. At N = 1 Mi (4 MiB, at the threshold) unary
     Pull + Push; at 16 Mi (64 MiB) PullStream + PushStream in 4 MiB chunks.
   - ``ParamServerClient.push_pull()``: one call (PushPull; at 16 Mi the bidirectional PushPullStream),
     as ``train_step(fused=True)`` makes it.

   Peer 1, a bare grpcio echo in its own process (generic handlers on raw bytes: no protobuf, no
   interceptors, no tracing; the same message limits and keepalive options, bare ``grpc.insecure_channel``):
   one round trip sends 4N bytes and receives the same 4N bytes back. At 1 Mi: one unary call of a 4 MiB
   message. At 16 Mi: the PS's chunking (message limits NOT raised), one bidirectional stream of 4 MiB chunks,
   store-and-forward (the server reads every chunk, then sends them all back), which mirrors the PS's
   sequence of a full upload and a full download. Throughput = 2 x 4N bytes / round-trip time; target: the
   PS keeps >= 70% of the echo's throughput.

   Peer 2, ``torch.distributed.all_reduce`` (gloo, ``tcp://127.0.0.1``, world size 2, two processes from
   ``torch.multiprocessing.spawn``) of the same N float32: the time of one all_reduce (rank 0, after a
   barrier) beside the time of one PS round trip; informative (no target). A 2-rank ring all_reduce sends
   and receives 4N bytes per rank, the PS round trip moves 4N bytes each way over one connection.

Every timed figure is the median of several repetitions after warm-up (the best is printed too); PS and echo
round trips are interleaved in a shuffled order so that all see the same machine. Records go to
``bench/results/paramserver.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.processes import ECHO_SERVICE, clean_env, free_port, start, stop, wait_serving
from bench.records import record, write_records
from guardmesh import wire
from guardmesh.client import channel_options
from guardmesh.config import load_config
from guardmesh.sdk.paramserver import ParamServerClient, _assemble, asynchronous, sgd
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
#: Message limit of both servers and both clients (the mesh default): 16 Mi float32 travel in chunks.
MAX_MESSAGE_MIB = 64
SIZES = (1 << 20, 16 << 20)
WARMUP = 2
REPEATS = {1 << 20: 40, 16 << 20: 15}
GLOO_WARMUP = 3
GLOO_REPEATS = {1 << 20: 40, 16 << 20: 20}
THROUGHPUT_TARGET = 0.7
ECHO_UNARY = f"/{ECHO_SERVICE}/Unary"
ECHO_STREAM = f"/{ECHO_SERVICE}/Stream"


def label(n: int) -> str:
    """``1Mi`` for 1,048,576 elements."""
    return f"{n >> 20}Mi" if n % MIB == 0 else str(n)


def sdk_chunk(max_message_mib: int) -> int:
    """The chunk size the SDK streams with (``ParamServerClient.chunk``)."""
    return min(4 << 20, (max_message_mib << 20) - (1 << 16))


def summary(times: list[float]) -> dict[str, float]:
    """Median and best of per-repetition times, in seconds."""
    return {"median_s": statistics.median(times), "best_s": min(times), "runs": len(times)}


# -- the bare grpcio echo (peer 1) -------------------------------------------------------------------------


def _echo_unary(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return request


def _echo_stream(request_iterator: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[bytes]:
    chunks = list(request_iterator)  # store and forward: the whole upload, then the whole download
    yield from chunks


def serve_echo(port: int, max_message_mib: int) -> int:
    """Run the bare echo server on ``127.0.0.1:port`` until SIGTERM (the ``--echo-server`` mode)."""
    config = load_config(env={}).with_overrides({"grpc.max_message_mib": max_message_mib})
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.grpc.max_workers),
        options=[*channel_options(config), ("grpc.so_reuseport", 0)],
    )
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_echo_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_echo_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        print(f"echo server: cannot bind 127.0.0.1:{port}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    health_servicer.set(ECHO_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    while not stop.wait(0.5):
        pass
    server.stop(1).wait()
    return 0


# -- b) push+pull against the echo -------------------------------------------------------------------------


def grpc_round_trips(sizes: Sequence[int], repeats: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Start the PS and the echo server, then time interleaved PS and echo round trips per size."""
    out: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-ps-") as tmp:
        env = clean_env(tmp, GUARDMESH__GRPC__MAX_MESSAGE_MIB=str(MAX_MESSAGE_MIB))
        ps_port, echo_port = free_port(), free_port()
        ps_log, echo_log = Path(tmp) / "paramserver.log", Path(tmp) / "echo.log"
        ps_proc = start(
            [sys.executable, "-m", "services.paramserver"],
            {**env, "GUARDMESH__SERVICES__PARAMSERVER__HOST": "127.0.0.1",
             "GUARDMESH__SERVICES__PARAMSERVER__PORT": str(ps_port)},
            ps_log,
        )  # fmt: skip
        echo_proc = start(
            [sys.executable, "-m", "bench.paramserver", "--echo-server", str(echo_port)],
            env,
            echo_log,
        )
        try:
            ps_addr, echo_addr = f"127.0.0.1:{ps_port}", f"127.0.0.1:{echo_port}"
            wait_serving(ps_addr, "paramserver", ps_proc, ps_log)
            wait_serving(echo_addr, ECHO_SERVICE, echo_proc, echo_log)
            config = load_config(env={}).with_overrides(
                {"services.paramserver.port": ps_port, "grpc.max_message_mib": MAX_MESSAGE_MIB}
            )
            echo_channel = grpc.insecure_channel(echo_addr, options=channel_options(config))
            unary = echo_channel.unary_unary(ECHO_UNARY)
            stream = echo_channel.stream_stream(ECHO_STREAM)
            try:
                for n in sizes:
                    out[n] = _compare(n, repeats[n], config, ps_addr, unary, stream)
                    gc.collect()
            finally:
                echo_channel.close()
        finally:
            stop(ps_proc)
            stop(echo_proc)
    return out


def _compare(
    n: int,
    repeats: int,
    config: Any,
    ps_addr: str,
    unary: grpc.UnaryUnaryMultiCallable,
    stream: grpc.StreamStreamMultiCallable,
) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    init = rng.standard_normal(n, dtype=np.float32)
    grad = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype(np.float32)
    nbytes = 4 * n
    ps = ParamServerClient.connect(f"bench-{label(n)}", config=config, addresses=[ps_addr])
    try:
        ps.create({"w": init}, sgd(1e-3), asynchronous())
        streamed = nbytes > ps.threshold
        chunk = ps.chunk
        assert chunk == sdk_chunk(MAX_MESSAGE_MIB)
        payload = grad.tobytes()
        chunks = [payload[off : off + chunk] for off in range(0, nbytes, chunk)]
        applied = version = 0

        # How the SDK receives with the least work: a unary answer's tensor is a view of the message (no copy);
        # a streamed one's chunks land in the caller's array (``into``), so no 4N-byte buffer is allocated.
        dest = {"w": np.empty(n, dtype=np.float32)} if streamed else None

        def ps_round_trip() -> None:
            nonlocal applied, version
            pulled = ps.pull(into=dest)
            assert pulled.tensors["w"].size == n
            results = ps.push({"w": grad})
            applied += sum(r.outcome == pb.PUSH_OUTCOME_APPLIED for r in results)
            version = max(r.version for r in results)

        def ps_fused_round_trip() -> None:
            nonlocal applied, version
            results, pulled = ps.push_pull({"w": grad}, into=dest)
            assert pulled.tensors["w"].size == n
            applied += sum(r.outcome == pb.PUSH_OUTCOME_APPLIED for r in results)
            version = max(r.version for r in results)

        def echo_round_trip() -> None:
            got = sum(len(c) for c in stream(iter(chunks))) if streamed else len(unary(payload))
            assert got == nbytes

        fns: dict[str, Callable[[], None]] = {
            "ps": ps_round_trip,
            "ps_fused": ps_fused_round_trip,
            "echo": echo_round_trip,
        }
        for fn in fns.values():
            for _ in range(WARMUP):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        shuffle = np.random.default_rng(7).shuffle
        for _ in range(repeats):
            shuffle(order)  # a call right after another kind of call pays for the switch: no fixed order
            for name in order:
                fn = fns[name]
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        ps.close()
    total = 2 * (WARMUP + repeats)
    if applied != total or version != total:
        raise RuntimeError(f"expected {total} applied pushes, got {applied} (version {version})")
    return {
        "elements": n,
        "bytes_per_round_trip": 2 * nbytes,
        "streamed": streamed,
        "chunk_bytes": chunk if streamed else None,
        "ps": summary(times["ps"]),
        "ps_fused": summary(times["ps_fused"]),
        "echo": summary(times["echo"]),
    }


# -- c) torch.distributed gloo all_reduce (peer 2) ---------------------------------------------------------


def _gloo_worker(rank: int, world: int, port: int, sizes: list[int], repeats: dict[int, int], out_path: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        for n in sizes:
            t = torch.full((n,), 1e-3, dtype=torch.float32)
            for _ in range(GLOO_WARMUP):
                dist.all_reduce(t)
            times = []
            for _ in range(repeats[n]):
                t.fill_(1e-3)
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                times.append(time.perf_counter() - t0)
            results[str(n)] = summary(times)
        if rank == 0:
            Path(out_path).write_text(json.dumps(results), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def gloo_all_reduce(sizes: Sequence[int], repeats: dict[int, int]) -> dict[int, dict[str, float]]:
    """Time of one all_reduce of each size, 2 processes on loopback (rank 0's figures)."""
    import torch.multiprocessing as tmp_mp

    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-gloo-") as tmp:
        out_path = str(Path(tmp) / "gloo.json")
        tmp_mp.spawn(_gloo_worker, args=(2, free_port(), list(sizes), dict(repeats), out_path), nprocs=2, join=True)
        raw = json.loads(Path(out_path).read_text(encoding="utf-8"))
    return {int(k): v for k, v in raw.items()}


# -- profiling --------------------------------------------------------------------------------------------


class _Context:
    """The little of ``grpc.ServicerContext`` the handlers use on this path."""

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


class _Sink:
    """A stand-in stub that keeps the bytes the SDK would send, as a channel would."""

    last: list[bytes] = []

    def Push(self, request: bytes) -> pb.PushResponse:
        self.last = [request]
        return pb.PushResponse()

    def PushStream(self, requests: Iterator[bytes]) -> pb.PushStreamResponse:
        self.last = list(requests)
        return pb.PushStreamResponse()


def _stage(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median ms, minor page faults per call) of ``fn`` after one warm-up call."""
    import resource

    fn()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return statistics.median(times) * 1e3, faults / repeats


def _round_trip_stages(servicer: Any, model: str, n: int, chunk: int, streamed: bool) -> dict[str, Callable[[], Any]]:
    """The stages of one round trip as the SDK and the servicer run them (``guardmesh.wire`` on both ends),
    without the transport. A push stage frames a new step id each time (a repeated step is not applied)."""
    ctx: Any = _Context()
    shard = servicer.core.models[model]
    grad = np.full(n, 1e-3, dtype=np.float32)
    steps = itertools.count(1)
    sink = _Sink()
    client: Any = ParamServerClient.__new__(ParamServerClient)  # the SDK's message building, without channels
    client.model, client.worker_id, client.versions, client.incarnations = model, "prof", [0], [""]
    client.session = "prof"
    client.threshold, client.chunk, client.stubs = 4 * n - 1 if streamed else 4 * n, chunk, [sink]

    def apply_only() -> Any:
        return shard.push("apply-only", shard.version, next(steps), {"w": grad})

    def client_push() -> list[bytes]:
        client._push_shard(0, {"w": grad}, next(steps), 0.0)
        return sink.last

    if not streamed:
        pull_bytes = servicer.Pull(pb.PullRequest(model=model), ctx)
        decode_push = wire.deserializer(pb.PushRequest)

        def client_pull() -> np.ndarray:
            nt = wire.decode(pb.PullResponse.DESCRIPTOR, pull_bytes).tensors[0]
            return np.frombuffer(nt.tensor.data, np.float32)

        return {
            "server DescribeModel": lambda: servicer.DescribeModel(pb.DescribeModelRequest(model=model), ctx),
            "server Pull: handler, framed under the lock": lambda: servicer.Pull(pb.PullRequest(model=model), ctx),
            "client Pull: decode": client_pull,
            "client Push: frame (SDK)": client_push,
            "client Push: frame + server decode + handler": lambda: servicer.Push(decode_push(client_push()[0]), ctx),
            "  of which shard.push (aggregate + SGD step)": apply_only,
        }
    pull_req = pb.PullStreamRequest(pull=pb.PullRequest(model=model), chunk_bytes=chunk)
    pull_frames = list(servicer.PullStream(pull_req, ctx))
    decode_stream = wire.deserializer(pb.PushStreamRequest)

    return {
        "server PullStream: handler, framed under the lock": lambda: list(servicer.PullStream(pull_req, ctx)),
        "client PullStream: decode chunks + assemble": lambda: _assemble(
            wire.decode(pb.PullStreamResponse.DESCRIPTOR, f) for f in pull_frames
        ),
        "client PushStream: frame chunks (SDK)": client_push,
        "client PushStream: frame + server decode + assemble + apply": lambda: servicer.PushStream(
            (decode_stream(f) for f in client_push()), ctx
        ),
        "  of which shard.push (aggregate + SGD step)": apply_only,
    }


def profile(sizes: Sequence[int], top: int = 15) -> None:
    """Where a round trip's CPU goes, without the transport.

    The servicer runs in this process and messages are (de)serialized as gRPC would; each stage is timed
    (median) with its minor page faults (memory touched for the first time), then cProfile over whole runs.
    """
    import cProfile
    import pstats

    from guardmesh.sdk.paramserver import _creation_stream
    from services.paramserver.server import ParamServerServicer

    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-prof-") as tmp:
        config = load_config(env={}).with_overrides({"mesh.state_dir": tmp, "grpc.max_message_mib": MAX_MESSAGE_MIB})
        threshold = int(config.paramserver.stream_threshold_mib * MIB)
        servicer = ParamServerServicer(config)
        servicer.core.start()
        for n in sizes:
            reps = 20 if n <= SIZES[0] else 5
            model = f"prof-{label(n)}"
            create = pb.CreateModelRequest(model=model, optimizer=sgd(1e-3), consistency=asynchronous())
            nt = create.tensors.add(name="w")
            nt.tensor.dtype, nt.tensor.data = common_pb2.D_TYPE_FLOAT32, np.zeros(n, dtype=np.float32).tobytes()
            nt.tensor.shape.append(n)
            servicer.CreateModelStream(iter(list(_creation_stream(create))), _Context())
            streamed = 4 * n > threshold
            stages = _round_trip_stages(servicer, model, n, sdk_chunk(MAX_MESSAGE_MIB), streamed)
            print(f"\n{label(n)} float32 ({4 * n >> 20} MiB), {'streamed' if streamed else 'unary'}, median of {reps}:")
            for what, fn in stages.items():
                ms, faults = _stage(fn, reps)
                touched = faults * 4 / 1024
                print(f"  {what:<52} {ms:8.2f} ms {faults:8.0f} minor faults ({touched:5.1f} MiB first touched)")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(reps):
                for fn in stages.values():
                    fn()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(top)
            del servicer.core.models[model]
            gc.collect()


# -- main --------------------------------------------------------------------------------------------------


def kernel_records() -> list[dict[str, Any]]:
    """The kernel figures of ``bench.kernels_bench`` as records."""
    from bench import kernels_bench

    return [
        record(r["name"], r["unit"], r["ours"], r["peer"], r["peer_value"], r["target"], r["higher_is_better"])
        for r in kernels_bench.run()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--echo-server PORT``, only the echo server); return the exit code."""
    ap = argparse.ArgumentParser(prog="python -m bench.paramserver", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats-small", type=int, default=REPEATS[SIZES[0]], help="timed round trips at 1 Mi")
    ap.add_argument("--repeats-large", type=int, default=REPEATS[SIZES[1]], help="timed round trips at 16 Mi")
    ap.add_argument("--skip-kernels", action="store_true", help="leave out the kernel figures")
    ap.add_argument("--skip-gloo", action="store_true", help="leave out the gloo all_reduce peer")
    ap.add_argument("--profile", action="store_true", help="only profile the round trip's stages in process")
    ap.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.echo_server is not None:
        return serve_echo(args.echo_server, int(os.environ.get("GUARDMESH__GRPC__MAX_MESSAGE_MIB", MAX_MESSAGE_MIB)))

    if args.profile:
        profile(SIZES)
        return 0
    began = time.perf_counter()
    repeats = {SIZES[0]: args.repeats_small, SIZES[1]: args.repeats_large}
    records: list[dict[str, Any]] = []
    if not args.skip_kernels:
        print("a) native kernels (bench.kernels_bench) ...", flush=True)
        records += kernel_records()
        gc.collect()

    print(
        f"b) push+pull over gRPC: server process `python -m services.paramserver` (1 shard, SGD, ASYNC, "
        f"{MAX_MESSAGE_MIB} MiB message limit) vs a bare grpcio echo process; median of "
        f"{repeats[SIZES[0]]} / {repeats[SIZES[1]]} round trips after {WARMUP} warm-up ...",
        flush=True,
    )
    rt = grpc_round_trips(SIZES, repeats)
    gloo: dict[int, dict[str, float]] = {}
    if not args.skip_gloo:
        print("c) torch.distributed all_reduce, gloo, 2 processes on loopback ...", flush=True)
        gloo = gloo_all_reduce(SIZES, GLOO_REPEATS)

    print(f"\n{'N float32':>10} {'what':<44} {'median ms':>10} {'best ms':>10} {'MB/s (median)':>14}")
    for n in SIZES:
        r = rt[n]
        moved = r["bytes_per_round_trip"]
        rows = [
            ("PS pull + push (two calls)", r["ps"]),
            ("PS PushPull (one call)", r["ps_fused"]),
            ("echo round trip", r["echo"]),
        ]
        if n in gloo:
            rows.append(("gloo all_reduce (2 ranks)", gloo[n]))
        for what, s in rows:
            mbps = moved / s["median_s"] / 1e6 if "all_reduce" not in what else float("nan")
            print(f"{label(n):>10} {what:<44} {s['median_s'] * 1e3:10.2f} {s['best_s'] * 1e3:10.2f} {mbps:14,.0f}")

    for n in SIZES:
        r = rt[n]
        moved = r["bytes_per_round_trip"]
        chunks = f"in {r['chunk_bytes'] >> 20} MiB chunks" if r["streamed"] else ""
        ways = {
            "ps": f"SDK PullStream + PushStream {chunks}" if r["streamed"] else "SDK unary Pull + Push",
            "ps_fused": f"SDK PushPullStream, one bidi call {chunks}" if r["streamed"] else "SDK PushPull, one call",
        }
        echo = (
            "echo: one bidi stream of the same chunks, store-and-forward" if r["streamed"] else "echo: one unary call"
        )
        for key, how in ways.items():
            records.append(
                record(
                    f"push+pull round trip, {label(n)} float32 ({moved >> 20} MiB moved), throughput ({how}; {echo})",
                    "MB/s",
                    moved / r[key]["median_s"] / 1e6,
                    f"bare grpcio echo process, {moved >> 21} MiB each way, same message limits (median)",
                    moved / r["echo"]["median_s"] / 1e6,
                    THROUGHPUT_TARGET,
                )
            )
    for n in SIZES:
        if n not in gloo:
            continue
        streamed = rt[n]["streamed"]
        for key, how in (
            ("ps", "PullStream + PushStream" if streamed else "Pull + Push, two calls"),
            ("ps_fused", "PushPullStream, one call" if streamed else "PushPull, one call"),
        ):
            records.append(
                record(
                    f"time of one PS push+pull round trip (1 worker, gRPC, {how}) vs one gloo all_reduce "
                    f"(2 ranks), {label(n)} float32",
                    "ms",
                    rt[n][key]["median_s"] * 1e3,
                    "torch.distributed all_reduce, gloo, tcp://127.0.0.1, world size 2 (median, rank 0)",
                    gloo[n]["median_s"] * 1e3,
                    None,
                    higher_is_better=False,
                )
            )
    write_records("paramserver", records)
    print(f"elapsed {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
