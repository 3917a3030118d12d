"""A training worker process for the parameter-server convergence tests.

Trains multinomial logistic regression on scikit-learn's digits through the real parameter server with the SDK's
``train_step``; writes a JSON report (steps, re-pulls, stalls, staleness seen) to ``--out``. A straggler is slow on
every step (``--straggle-ms``) and, with ``--stall-every``, also stalls now and then between a pull and its push
(``--stall-ms``, a paused or preempted worker): the stall is once per step, so when the server refuses the stale push
the re-pulled recomputation runs at the worker's normal speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from guardmesh.config import load_config
from guardmesh.sdk.paramserver import ParamServerClient, StalePush, adam, asynchronous, bounded_staleness, sgd, sync


def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits, standardised, split 75/25 with a fixed seed (the same in every process)."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    return (scaler.transform(x_tr).astype(np.float32), y_tr, scaler.transform(x_te).astype(np.float32), y_te)


def make_model() -> torch.nn.Module:
    """Multinomial logistic regression, initialised identically in every process."""
    torch.manual_seed(0)
    return torch.nn.Linear(64, 10)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy."""
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def consistency(mode: str, workers: int, bound: int) -> object:
    """Consistency settings by name."""
    if mode == "sync":
        return sync(workers)
    if mode == "ssp":
        return bounded_staleness(bound)
    return asynchronous()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["sync", "ssp", "async"], required=True)
    ap.add_argument("--worker", type=int, required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="rows per step; 0 = the worker's whole shard")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--bound", type=int, default=2)
    ap.add_argument("--straggle-ms", type=float, default=0.0, help="extra time of every computation")
    ap.add_argument("--stall-every", type=int, default=0, help="every N-th step stalls between its pull and push")
    ap.add_argument("--stall-ms", type=float, default=0.0, help="the stall, once per step (not in a recomputation)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-file", default="", help="stop early once this file exists (the straggler)")
    ap.add_argument("--max-repulls", type=int, default=5, help="drop a batch after this many stale pushes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x_tr, y_tr, _, _ = dataset()
    mine = np.arange(len(x_tr))[args.worker :: args.workers]
    model = make_model()
    ps = ParamServerClient.connect(
        args.model, worker_id=f"w{args.worker}", config=load_config(), addresses=[args.address]
    )
    optimizer = (
        sgd(args.lr, weight_decay=args.weight_decay) if args.optimizer == "sgd" else adam(args.lr, args.weight_decay)
    )
    ps.create_from_module(model, optimizer, consistency(args.mode, args.workers, args.bound))  # idempotent
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(args.worker)
    steps = repulls = dropped = stalls = batches = 0
    stale: list[int] = []
    stop = Path(args.stop_file) if args.stop_file else None
    for _ in range(args.epochs):
        order = rng.permutation(mine)
        batch = args.batch or len(order)
        for start in range(0, len(order) - batch + 1, batch):
            if stop is not None and stop.exists():
                break
            idx = order[start : start + batch]
            xb, yb = torch.from_numpy(x_tr[idx]), torch.from_numpy(y_tr[idx])
            batches += 1
            stall = [args.stall_ms / 1000 if args.stall_every and batches % args.stall_every == 0 else 0.0]
            stalls += stall[0] > 0

            def compute(xb: torch.Tensor = xb, yb: torch.Tensor = yb, stall: list[float] = stall) -> float:
                if stall[0]:
                    # Stalled after the pull: the others keep pushing, so this gradient is many versions old
                    # when it arrives. Once per step: a recomputation after a refused push does not stall.
                    time.sleep(stall[0])
                    stall[0] = 0.0
                if args.straggle_ms:
                    time.sleep(args.straggle_ms / 1000)  # slow worker: its gradient ages while it computes
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss.item()

            try:
                report = ps.train_step(model, compute, max_repulls=args.max_repulls)
            except StalePush:
                dropped += 1  # too stale every time: give the batch up, as a bounded-staleness worker must
                repulls += args.max_repulls + 1
                continue
            steps += 1
            repulls += report.repulls
            stale.extend(r.staleness for r in report.results)
    ps.close()
    with open(args.out, "w") as fh:
        json.dump(
            {
                "steps": steps,
                "repulls": repulls,
                "dropped": dropped,
                "stalls": stalls,
                "max_staleness": max(stale, default=0),
                "mean_staleness": float(np.mean(stale)) if stale else 0.0,
            },
            fh,
        )


if __name__ == "__main__":
    main()
