"""A training worker process for the parameter-server convergence tests.

Trains multinomial logistic regression on scikit-learn's digits through the real parameter server with the SDK's
``train_step``; writes a JSON report (steps, re-pulls, refused pushes, staleness of what was applied) to ``--out``.

With ``--link-delay D`` the worker is a straggler behind a slow link (a worker in another datacenter): each of its
gradients reaches the server ``D`` versions after the pull it was computed on, while the worker goes on computing on
newer pulls (its pushes are a pipeline in flight), one gradient per round of the other workers' pushes. The delay
is counted in the server's versions, not in milliseconds, so the staleness does not depend on the machine's load;
what is still in flight when the worker stops arrives then. A push the server refuses as stale is dropped (it
was computed long ago; the worker is already computing on a fresh pull). In SYNC no version passes without the
straggler's gradient, so its slow link is a time per push instead (``--link-delay-ms``): the barrier waits it out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
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
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
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
    ap.add_argument("--link-delay", type=int, default=0, help="straggler: versions its gradients take to arrive")
    ap.add_argument("--link-delay-ms", type=float, default=0.0, help="straggler in sync: time each push takes")
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
    steps = repulls = dropped = 0
    stale: list[int] = []
    stop = Path(args.stop_file) if args.stop_file else None
    in_flight: deque[tuple[int, str, dict[str, np.ndarray]]] = deque()  # (base version, incarnation, gradients)
    stale_refused: list[int] = []

    def arrive(base: int, incarnation: str, grads: dict[str, np.ndarray]) -> None:
        """A delayed gradient reaches the server: pushed with the version it was computed on."""
        nonlocal steps
        # The message the link delivers is the one built at the pull: it carries that pull's version.
        ps.versions[0], ps.incarnations[0] = base, incarnation
        try:
            result = ps.push(grads)[0]
        except StalePush as err:
            stale_refused.append(  # too stale for the bound: dropped
                err.detail.staleness if err.detail is not None else -1
            )
            return
        steps += 1
        stale.append(result.staleness)

    for _ in range(args.epochs):
        order = rng.permutation(mine)
        batch = args.batch or len(order)
        for start in range(0, len(order) - batch + 1, batch):
            if stop is not None and stop.exists():
                break
            idx = order[start : start + batch]
            xb, yb = torch.from_numpy(x_tr[idx]), torch.from_numpy(y_tr[idx])
            if args.link_delay:
                ps.pull_into(model)
                base, incarnation = ps.versions[0], ps.incarnations[0]
                while in_flight and in_flight[0][0] + args.link_delay <= base:
                    arrive(*in_flight.popleft())
                while in_flight and base - in_flight[-1][0] < args.workers - 1:
                    # At the others' pace: one gradient per round of theirs (a quarter of all gradients).
                    time.sleep(0.001)
                    ps.pull_into(model)
                    base, incarnation = ps.versions[0], ps.incarnations[0]
                    if stop is not None and stop.exists():
                        break
                model.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
                in_flight.append((base, incarnation, grads))
                continue

            def compute(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> float:
                loss = loss_fn(model(xb), yb)
                loss.backward()
                if args.link_delay_ms:
                    time.sleep(args.link_delay_ms / 1000)  # the gradient on its way: the others wait at the barrier
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
    while in_flight:  # what is still on the link arrives after the worker stopped
        arrive(*in_flight.popleft())
    ps.close()
    with open(args.out, "w") as fh:
        json.dump(
            {
                "steps": steps,
                "repulls": repulls,
                "dropped": dropped,
                "refused": len(stale_refused),
                "max_refused_staleness": max(stale_refused, default=0),
                "max_staleness": max(stale, default=0),
                "mean_staleness": float(np.mean(stale)) if stale else 0.0,
            },
            fh,
        )


if __name__ == "__main__":
    main()
