"""Train logistic regression on scikit-learn's digits through the parameter server.

    make up                                  # or any running paramserver shards
    .venv/bin/python examples/train_digits.py --workers 1

Each worker process pulls the parameters into its torch module, computes gradients on its share of the
data and pushes them; a stale push is recomputed after a re-pull, a restarting shard is waited for.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from guardmesh.sdk.paramserver import ParamServerClient, adam, bounded_staleness


def main(argv: list[str] | None = None) -> float:
    """Train one worker's share for ``--epochs``; return the test accuracy of the shared model."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="digits-example")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--address", action="append", help="shard address (default: from the mesh config)")
    args = ap.parse_args(argv)

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr).astype(np.float32), scaler.transform(x_te).astype(np.float32)
    mine = np.arange(len(x_tr))[args.worker :: args.workers]

    torch.manual_seed(0)  # every worker creates the same initial model: creation is idempotent
    model = torch.nn.Linear(64, 10)
    ps = ParamServerClient.connect(args.model, worker_id=f"worker-{args.worker}", addresses=args.address)
    ps.create_from_module(model, optimizer=adam(0.03), consistency=bounded_staleness(2), checkpoint_every=20)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(args.worker)
    for epoch in range(args.epochs):
        order = rng.permutation(mine)
        for start in range(0, len(order) - 31, 32):
            idx = order[start : start + 32]

            def compute(idx: np.ndarray = idx) -> float:
                loss = loss_fn(model(torch.from_numpy(x_tr[idx])), torch.from_numpy(y_tr[idx]))
                loss.backward()
                return loss.item()

            report = ps.train_step(model, compute)
        print(f"epoch {epoch}: loss {report.loss:.3f}, versions {ps.versions}")
    ps.pull_into(model)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    print(f"test accuracy {acc:.3f}")
    ps.close()
    return acc


if __name__ == "__main__":
    main()
