"""Scorer benchmark: Score over gRPC with 1, 16 and 64 concurrent clients, dynamic batching on vs off, for
an MLP (100 features, 256-256 hidden); and the drift statistics vs scipy + numpy (bench.drift_bench).

Each configuration runs the scorer as its own process (``python -m services.scorer``); the clients are
threads of this process, each sending one request at a time for a fixed duration. "Batching off" is the
same server with ``scorer.max_batch_size = 1``. The ceiling record runs the same 64-client harness (same
channels, same request bytes) against a bare grpcio echo in its own process: what this harness and gRPC
can deliver here with no server work, so the most any batching could reach.

    python -m bench.scorer [--seconds 6]
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from typing import Any

import numpy as np
import torch

from bench.processes import ECHO_SERVICE, echo_process, service_process
from bench.records import record, write_records
from guardmesh.client import open_channel
from guardmesh.config import load_config
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from services.scorer.registry import mlp

FEATURES = [f"x{i}" for i in range(100)]
CLIENTS = (1, 16, 64)


def model_payload() -> bytes:
    """The MLP (100 -> 256 -> 256 -> 1) as TorchScript."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(mlp(len(FEATURES), (256, 256)).eval()), buf)
    return buf.getvalue()


def run_clients(address: str, clients: int, seconds: float, echo: bool = False) -> dict[str, float]:
    """``clients`` threads send Score calls back to back for ``seconds``; return QPS and latency percentiles.

    With ``echo`` the same threads, channels and request bytes go to the bare grpcio echo server instead: the
    most this client harness and gRPC can do on this machine with no work at all on the server side.
    """
    config = load_config(env={})
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((256, len(FEATURES))).astype(np.float32)
    requests = [
        pb.ScoreRequest(model="bench", request_id=f"r{i}", features=dict(zip(FEATURES, map(float, r), strict=True)))
        for i, r in enumerate(rows)
    ]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        channel = open_channel("scorer", config, address=address)
        if echo:
            raw = channel.unary_unary(f"/{ECHO_SERVICE}/Unary")
            payloads = [r.SerializeToString() for r in requests]
            call = lambda i: raw(payloads[i % len(payloads)])  # noqa: E731
        else:
            stub = pb_grpc.ScorerServiceStub(channel)
            call = lambda i: stub.Score(requests[i % len(requests)])  # noqa: E731
        call(k)  # warm the channel
        barrier.wait()
        i = k
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            call(i)
            latencies[k].append(time.perf_counter() - t0)
            i += clients
        channel.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    flat = np.array([x for lat in latencies for x in lat]) * 1000
    return {
        "qps": len(flat) / max(seconds, elapsed - 0.0),
        "p50_ms": float(np.percentile(flat, 50)),
        "p99_ms": float(np.percentile(flat, 99)),
        "calls": float(len(flat)),
    }


def serve_and_measure(batching: bool, seconds: float) -> dict[int, dict[str, float]]:
    """Start a scorer (batching on or off), load the MLP, measure every client count."""
    overrides = {"GUARDMESH__SCORER__DEVICE": "auto", "GUARDMESH__SCORER__DRIFT_EVERY": "1000000"}
    if not batching:
        overrides["GUARDMESH__SCORER__MAX_BATCH_SIZE"] = "1"
    out: dict[int, dict[str, float]] = {}
    with service_process("scorer", overrides) as address:
        config = load_config(env={})
        channel = open_channel("scorer", config, address=address)
        stub = pb_grpc.ScorerServiceStub(channel)
        reference = np.random.default_rng(1).standard_normal((1000, len(FEATURES))).astype("<f4")
        stub.RegisterModel(
            pb.RegisterModelRequest(
                model="bench",
                version="v1",
                features=FEATURES,
                format=pb.MODEL_FORMAT_TORCHSCRIPT,
                payload=model_payload(),
                activate=True,
                reference=common_pb2.Tensor(
                    dtype=common_pb2.D_TYPE_FLOAT32, shape=list(reference.shape), data=reference.tobytes()
                ),
            )
        )
        device = stub.ListModels(pb.ListModelsRequest()).device
        channel.close()
        for clients in CLIENTS:
            out[clients] = run_clients(address, clients, seconds)
            mode = "on " if batching else "off"
            r = out[clients]
            print(
                f"batching {mode} {clients:3d} clients: {r['qps']:8,.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                f"  p99 {r['p99_ms']:6.2f} ms  ({device})"
            )
    return out


def echo_ceiling(clients: int, seconds: float) -> dict[str, float]:
    """The bare grpcio echo (its own process) under the same client harness: the throughput ceiling."""
    with echo_process() as address:
        r = run_clients(address, clients, seconds, echo=True)
    print(
        f"bare echo      {clients:3d} clients: {r['qps']:8,.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
        f"  p99 {r['p99_ms']:6.2f} ms"
    )
    return r


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results/scorer.json."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=6.0, help="measurement time per client count")
    args = ap.parse_args(argv)
    on = serve_and_measure(True, args.seconds)
    off = serve_and_measure(False, args.seconds)
    ceiling = echo_ceiling(64, args.seconds)
    records: list[dict[str, Any]] = [
        record(
            "Ceiling: bare grpcio echo, same 64-client harness and request bytes, vs Score batching off",
            "requests/s",
            ceiling["qps"],
            "Score, batching off, 64 clients (same run)",
            off[64]["qps"],
            None,
        )
    ]
    for clients in CLIENTS:
        records.append(
            record(
                f"Score throughput, MLP 100-256-256, {clients} concurrent clients, batching on vs off",
                "requests/s",
                on[clients]["qps"],
                "same server with max_batch_size = 1 (same run)",
                off[clients]["qps"],
                5.0 if clients == 64 else None,
            )
        )
        records.append(
            record(
                f"Score p99 latency, {clients} concurrent clients, batching on",
                "ms",
                on[clients]["p99_ms"],
                "20 ms budget" if clients == 64 else "batching off (same run)",
                20.0 if clients == 64 else off[clients]["p99_ms"],
                1.0 if clients == 64 else None,
                higher_is_better=False,
            )
        )
        records.append(
            record(
                f"Score p50 latency, {clients} concurrent clients, batching on",
                "ms",
                on[clients]["p50_ms"],
                "batching off (same run)",
                off[clients]["p50_ms"],
                None,
                higher_is_better=False,
            )
        )
    from bench import drift_bench

    for r in drift_bench.run():
        records.append(
            record(r["name"], r["unit"], r["ours"], r["peer"], r["peer_value"], r["target"], r["higher_is_better"])
        )
    write_records("scorer", records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
