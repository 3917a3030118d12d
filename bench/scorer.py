"""Scorer benchmark: Score over gRPC with 1, 16 and 64 concurrent clients, dynamic batching on vs off, for
an MLP (100 features, 256-256 hidden); ScoreBatch of 256 rows vs the same 256 rows as Score calls one after
another (and the model executions each took, from the server's own OIP ModelStatistics); and the drift
statistics vs scipy + numpy (bench.drift_bench).

Both configurations run side by side, each the scorer as its own process (``python -m services.scorer``),
measured in interleaved rounds (median reported); the clients are threads of this process, each sending
one request at a time for a fixed duration. "Batching off" is the same server with
``scorer.max_batch_size = 1``. The ceiling record runs the same 64-client harness (same
channels, same request bytes) against a bare grpcio echo in its own process: what this harness and gRPC
can deliver here with no server work, so the most any batching could reach.

    python -m bench.scorer [--seconds 6]

Records of other benchmarks in bench/results/scorer.json (names this run does not produce, e.g. the drift
false-alarm figures) are kept.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch

from bench.processes import ECHO_SERVICE, echo_process, service_process
from bench.records import RESULTS, record, results_path, write_records
from guardmesh.client import open_channel
from guardmesh.config import load_config
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from inference import model_repository_pb2 as repo_pb
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


def batch_vs_single(address: str, repeats: int = 5) -> dict[str, float]:
    """ScoreBatch of 256 rows vs the same 256 rows as Score calls one after another (one client): the
    median wall time of ``repeats`` rounds each, and the model executions one round took (ModelStatistics)."""
    config = load_config(env={})
    rows = np.random.default_rng(2).standard_normal((256, len(FEATURES))).astype(np.float32)
    channel = open_channel("scorer", config, address=address)
    stub = pb_grpc.ScorerServiceStub(channel)
    oip = oip_grpc.GRPCInferenceServiceStub(channel)

    def executions() -> int:
        stats = oip.ModelStatistics(repo_pb.ModelStatisticsRequest(name="bench", version="v1"))
        return int(stats.model_stats[0].execution_count)

    def requests(tag: str) -> list[pb.ScoreRequest]:
        return [
            pb.ScoreRequest(
                model="bench", request_id=f"{tag}-{i}", features=dict(zip(FEATURES, map(float, r), strict=True))
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


def load_model(address: str) -> str:
    """Register and activate the MLP on the scorer at ``address``; return the device it runs on."""
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
    return device


def serve_and_measure(
    seconds: float, rounds: int
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]], dict[str, float]]:
    """Start two scorers side by side, batching on and off (``max_batch_size = 1``), load the MLP on both,
    and measure every client count in ``rounds`` interleaved rounds (on, off; off, on; ...) so that both
    see the same machine; per figure the median over the rounds. Then ScoreBatch vs Score calls (on)."""
    base = {"GUARDMESH__SCORER__DEVICE": "auto", "GUARDMESH__SCORER__DRIFT_EVERY": "1000000"}
    results: dict[str, dict[int, dict[str, float]]] = {"on": {}, "off": {}}
    with (
        service_process("scorer", base) as on_address,
        service_process("scorer", {**base, "GUARDMESH__SCORER__MAX_BATCH_SIZE": "1"}) as off_address,
    ):
        addresses = {"on": on_address, "off": off_address}
        device = load_model(on_address)
        load_model(off_address)
        for clients in CLIENTS:
            taken: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            for k in range(rounds):
                for mode in ("on", "off") if k % 2 == 0 else ("off", "on"):  # neither always goes first
                    taken[mode].append(run_clients(addresses[mode], clients, seconds))
            for mode in ("on", "off"):
                r = results[mode][clients] = {
                    key: statistics.median(t[key] for t in taken[mode]) for key in taken[mode][0]
                }
                print(
                    f"batching {mode:3s} {clients:3d} clients: {r['qps']:8,.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                    f"  p99 {r['p99_ms']:6.2f} ms  ({device}; median of {rounds} interleaved rounds)"
                )
        batch = batch_vs_single(on_address)
    return results["on"], results["off"], batch


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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per client count (median reported)")
    ap.add_argument("--skip-drift", action="store_true", help="leave the drift statistics records as they are")
    ap.add_argument("--note", default="", help="a note on every record of this run (e.g. how loaded the machine was)")
    args = ap.parse_args(argv)
    on, off, batch = serve_and_measure(args.seconds, args.rounds)
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
                5.0 if clients == 64 else 0.9 if clients == 1 else None,
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
    records.append(
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
    )
    from bench import drift_bench

    for r in [] if args.skip_drift else drift_bench.run():
        records.append(
            record(r["name"], r["unit"], r["ours"], r["peer"], r["peer_value"], r["target"], r["higher_is_better"])
        )
    if args.note:
        for r in records:
            r["note"] = args.note
    write_records("scorer", keep_others(records))
    return 0


def keep_others(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of bench/results/scorer.json that this run did not produce (other benchmarks write
    there too), followed by this run's."""
    existing: list[dict[str, Any]] = []
    for path in (results_path("scorer.json"), RESULTS / "scorer.json"):  # where this run writes, else the record
        try:
            existing = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            continue
    ours = {r["name"] for r in records}
    varying = "ScoreBatch of 256 rows"  # its name carries the run's model-run counts
    kept = [r for r in existing if r.get("name") not in ours and not str(r.get("name", "")).startswith(varying)]
    return kept + records


if __name__ == "__main__":
    raise SystemExit(main())
