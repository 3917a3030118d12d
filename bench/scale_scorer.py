"""The scorer part of ``make bench-scale`` (called by bench/scale.py): Score + Feedback across two replicas.

Two scorer processes on one PostgreSQL database and one artefact folder; ``clients`` threads each score a
request on replica A and send its label to replica B (the label must find A's decision in the store), as
many pairs as asked. Peer: the same workload against one replica (Score and Feedback both on A), on a
database of its own on the same server, in the same run. Also measured: a rollback made on A until B
serves it (ListModels polled every 10 ms), the median and worst of ``rollbacks`` rounds; target 1 s.
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.processes import calls_per_second, clean_env, free_port, start, stop, wait_serving
from bench.records import record
from guardmesh.localpg import LocalPostgres
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc

FEATURES = ["amount", "velocity", "age_days", "foreign"]


class ScorerReplica:
    """``python -m services.scorer`` on a free port, on ``store_url`` with a shared artefact folder."""

    def __init__(self, folder: Path, name: str, store_url: str, artefacts: Path) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = clean_env(
            self.folder,
            GUARDMESH__SERVICES__SCORER__PORT=str(self.port),
            GUARDMESH__SERVICES__SCORER__METRICS_PORT="0",
            GUARDMESH__SCORER__STORE_URL=store_url,
            GUARDMESH__SCORER__ARTEFACT_URL=str(artefacts),
            GUARDMESH__SCORER__DEVICE="cpu",
        )
        log = self.folder / "scorer.log"
        self.proc: subprocess.Popen[bytes] = start([sys.executable, "-m", "services.scorer"], env, log)
        wait_serving(self.address, "scorer", self.proc, log, timeout=180)

    def stop(self) -> None:
        stop(self.proc)


def _model(weight: float) -> bytes:
    layer = torch.nn.Linear(len(FEATURES), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[weight, 0.5, -0.2, 0.0]]))
        layer.bias.fill_(0.0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(layer, torch.nn.Sigmoid()).eval()), buf)
    return buf.getvalue()


def _register(stub: pb_grpc.ScorerServiceStub, version: str, weight: float) -> None:
    stub.RegisterModel(
        pb.RegisterModelRequest(
            model="bench",
            version=version,
            features=FEATURES,
            format=pb.MODEL_FORMAT_TORCHSCRIPT,
            payload=_model(weight),
            activate=True,
        ),
        timeout=60,
    )


def _active(stub: pb_grpc.ScorerServiceStub) -> str:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    return models[0].active_version if models else ""


def _until(check: Any, limit_s: float = 60.0) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > limit_s:
            raise RuntimeError(f"not reached within {limit_s} s")
        time.sleep(0.01)
    return time.monotonic() - began


def score_feedback_pairs(score_stub: Any, feedback_stub: Any, prefix: str, pairs: int, clients: int) -> float:
    """Score on one stub then Feedback for it on the other, ``clients`` threads; pairs per second."""

    def pair(c: int, n: int) -> None:
        rid = f"{prefix}-{c}-{n}"
        features = {f: float((n + i) % 7) - 3.0 for i, f in enumerate(FEATURES)}
        out = score_stub.Score(pb.ScoreRequest(model="bench", request_id=rid, features=features), timeout=30)
        got = feedback_stub.Feedback(
            pb.FeedbackRequest(model="bench", labels=[pb.Label(request_id=rid, label=out.decision)]),
            timeout=30,
        )
        if got.accepted != 1:
            raise RuntimeError(f"label of {rid} not accepted: {got}")

    return calls_per_second(pair, clients, max(1, pairs // clients))


def scorer_records(
    server: LocalPostgres, folder: Path, pairs: int, clients: int, rollbacks: int
) -> list[dict[str, Any]]:
    """The scorer's scale records (see the module docstring)."""
    import grpc

    artefacts = folder / "scorer-artefacts"
    shared = server.ensure_database("scorer_pair")
    a = ScorerReplica(folder, "scorer-a", shared, artefacts)
    b = ScorerReplica(folder, "scorer-b", shared, artefacts)
    lone = ScorerReplica(folder, "scorer-lone", server.ensure_database("scorer_lone"), artefacts)
    try:
        with (
            grpc.insecure_channel(a.address) as ca,
            grpc.insecure_channel(b.address) as cb,
            grpc.insecure_channel(lone.address) as cl,
        ):
            sa, sb, sl = (pb_grpc.ScorerServiceStub(c) for c in (ca, cb, cl))
            _register(sa, "v1", 1.0)
            _register(sl, "v1", 1.0)
            _until(lambda: _active(sb) == "v1")
            score_feedback_pairs(sa, sb, "warm", clients, clients)
            score_feedback_pairs(sl, sl, "warm", clients, clients)
            across = score_feedback_pairs(sa, sb, "pair", pairs, clients)
            alone = score_feedback_pairs(sl, sl, "pair", pairs, clients)
            propagation = []
            for i in range(rollbacks):
                _register(sa, f"r{i}", -1.0)
                _until(lambda i=i: _active(sb) == f"r{i}")
                began = time.monotonic()
                rolled = sa.RollbackModel(pb.RollbackModelRequest(model="bench"), timeout=30).active_version
                _until(lambda rolled=rolled: _active(sb) == rolled)
                propagation.append(time.monotonic() - began)
    finally:
        for r in (a, b, lone):
            r.stop()
    records = [
        record(
            f"scorer Score + Feedback pairs/s, Score on replica A and Feedback on replica B (PostgreSQL), "
            f"{clients} clients",
            "pairs/s",
            across,
            "one replica taking both (same server, own database)",
            alone,
            None,
        )
    ]
    for what, pick in (("median", statistics.median), ("worst", max)):
        rec = record(
            f"scorer rollback on A -> served by B (ListModels polled every 10 ms), {what} of {len(propagation)}",
            "s",
            pick(propagation),
            "target 1 s",
            1.0,
            None,
            higher_is_better=False,
        )
        rec["samples_s"] = propagation
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run only the scorer's records and put them into ``scale.json`` beside the other services' records."""
    import argparse
    import json
    import tempfile

    from bench.records import machine, results_path, write_records
    from bench.scale import postgres

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400, help="Score + Feedback pairs per setup")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rollbacks", type=int, default=5, help="rollback propagation rounds")
    parser.add_argument("--note", default="", help="added to each record's machine (e.g. 'loaded machine')")
    args = parser.parse_args(argv)
    with postgres() as server, tempfile.TemporaryDirectory(prefix="guardmesh-bench-scorer-") as tmp:
        ours = scorer_records(server, Path(tmp), args.pairs, args.clients, args.rollbacks)
    if args.note:
        for r in ours:
            r["machine"] = f"{machine()}; {args.note}"
    path = results_path("scale.json")
    kept = [r for r in json.loads(path.read_text()) if not r["name"].startswith("scorer ")] if path.exists() else []
    write_records("scale", kept + ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
