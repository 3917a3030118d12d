"""One training worker of ``guardmesh demo``: a replica of a gang job, training through the parameter server.

Started by :func:`guardmesh.demo.run_demo` as its own process (``python -m guardmesh.demo_worker``), with the
mesh's configuration in its environment (``GUARDMESH__*``). The worker:

1. reads its replica's placement from the scheduler and applies its environment (``CUDA_VISIBLE_DEVICES``
   with the GPU UUIDs, memory caps) before torch starts;
2. holds its replica's lease with the SDK's :class:`~guardmesh.sdk.scheduler.Lease` (renewed in a background
   thread every third of the TTL);
3. loads its shard of the breast-cancer training split (the same split and scaler as the demo) and trains
   the shared logistic regression with :meth:`ParamServerClient.train_step` under bounded staleness; a
   straggler stalls before computing each step's gradients, so its pushes arrive stale, are rejected and
   are recomputed after a re-pull (``StepReport.repulls``).

It talks to the demo through one JSON object per line on stdout: ``ready`` (then it waits for a line on
stdin, so every replica starts together), ``step`` (progress) and ``done`` (the figures), after which it
keeps renewing its lease until a second line on stdin: a gang holds its cards until every replica is done.
The demo then releases the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from guardmesh.config import load_config
from guardmesh.sdk.scheduler import Lease, SchedulerClient
from guardmesh.tracing import flush_tracing, setup_tracing


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the demo."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def load_data(seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(feature names, x_train, y_train, x_test, y_test) of breast cancer: standardised float32 features,
    label 1 = malignant (the class to flag), a stratified 60/40 split."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float64)
    y = 1 - np.asarray(data.target, dtype=np.int64)  # sklearn: 0 = malignant
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    return (
        names,
        scaler.transform(x_tr).astype(np.float32),
        y_tr.astype(np.float32),
        scaler.transform(x_te).astype(np.float32),
        y_te.astype(np.float32),
    )


def logistic_regression(n_features: int) -> Any:
    """The demo's model: one linear layer and a sigmoid (the workers train it, the scorer serves it)."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(n_features, 1), torch.nn.Sigmoid())


def main(argv: list[str] | None = None) -> int:
    """Run one worker; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--job", required=True)
    ap.add_argument("--replica", type=int, required=True)
    ap.add_argument("--replicas", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds every step takes beyond the maths")
    ap.add_argument("--straggle", type=float, default=0.0, help="stall before each step's first gradient")
    ap.add_argument("--max-repulls", type=int, default=50)
    args = ap.parse_args(argv)

    config = load_config()
    setup_tracing(f"demo-worker-{args.replica}", config.tracing.otlp_endpoint)
    scheduler = SchedulerClient(config)
    job = scheduler.describe(args.job)
    placement = job.placement(args.replica)
    placement.apply_env()  # CUDA_VISIBLE_DEVICES and the memory caps, before torch starts
    # The demo releases the job once every replica is done: this worker only renews its own replica.
    lease = scheduler.lease(job, replicas=[args.replica], release_on_exit=False).start()

    import torch

    from guardmesh.sdk.paramserver import ParamServerClient

    torch.set_num_threads(1)
    _, x_tr, y_tr, _, _ = load_data()
    mine = np.arange(len(x_tr))[args.replica :: args.replicas]
    model = logistic_regression(x_tr.shape[1])
    loss_fn = torch.nn.BCELoss()
    worker_id = f"worker-{args.replica}"
    ps = ParamServerClient.connect(args.model, worker_id=worker_id, config=config)
    emit(
        "ready",
        replica=args.replica,
        pid=os.getpid(),
        node=placement.node,
        gpus=placement.gpu_uuids,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        shard_rows=len(mine),
    )
    sys.stdin.readline()  # every replica starts together

    rng = np.random.default_rng(100 + args.replica)

    def batches() -> Iterator[np.ndarray]:
        while True:  # epochs over the shard, reshuffled each time
            order = rng.permutation(mine)
            for s in range(0, len(order) - args.batch + 1, args.batch):
                yield order[s : s + args.batch]

    rejections = 0
    stale_steps = 0
    loss = float("nan")
    started = time.monotonic()
    for step, idx in zip(range(args.steps), batches(), strict=False):
        xb, yb = torch.from_numpy(x_tr[idx]), torch.from_numpy(y_tr[idx])
        attempts = [0]

        def compute(xb: torch.Tensor = xb, yb: torch.Tensor = yb, attempts: list[int] = attempts) -> float:
            attempts[0] += 1
            if args.straggle and attempts[0] == 1:
                time.sleep(args.straggle)  # a stalled data loader: the parameters it started from age meanwhile
            out = loss_fn(model(xb)[:, 0], yb)
            out.backward()
            return float(out.item())

        report = ps.train_step(model, compute, max_repulls=args.max_repulls)
        rejections += report.repulls
        stale_steps += report.repulls > 0
        loss = float(report.loss)  # type: ignore[arg-type]
        emit(
            "step",
            replica=args.replica,
            step=step + 1,
            steps=args.steps,
            loss=loss,
            rejections=rejections,
            version=int(ps.versions[0]) if ps.versions else 0,
            staleness=[int(r.staleness) for r in report.results],
        )
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if lease.lost:
            break
    seconds = time.monotonic() - started
    emit(
        "done",
        replica=args.replica,
        worker=worker_id,
        pid=os.getpid(),
        steps=args.steps,
        loss=loss,
        rejections=rejections,
        stale_steps=stale_steps,
        renewals=lease.renewals,
        lease_lost=_lost(lease),
        seconds=seconds,
    )
    # A gang holds its cards until every replica is done: keep renewing until the demo says so (a replica
    # whose lease lapsed would take the whole job's allocations with it).
    sys.stdin.readline()
    lease.stop()
    ps.close()
    scheduler.close()
    flush_tracing()
    return 0 if not lease.lost else 1


def _lost(lease: Lease) -> str:
    """Why the lease was lost ("CODE: details"); empty while it holds."""
    err = lease.error
    if not lease.lost:
        return ""
    return f"{err.code().name}: {err.details()}" if err is not None else "lost"


if __name__ == "__main__":
    sys.exit(main())
