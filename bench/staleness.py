"""Where does async training with a straggler lose accuracy that bounded staleness keeps? A study, not a race.

``python -m bench.staleness`` trains the convergence test's problem (multinomial logistic regression on
scikit-learn's digits, split 75/25, four workers on disjoint shards, each step on the worker's whole shard)
through the real ``services.paramserver.shard.ModelShard`` and its native optimizer kernels, on a
deterministic schedule of simulated time instead of processes, so that every figure is reproducible. Each
straggler model runs in SYNC, ASYNC and BOUNDED_STALENESS (bound 8) on the same schedule; the reference is
single-process full-batch training with the same optimizer (per-push learning rate = single-process rate / 4,
as in the test: four pushes cover what one full-batch step covers). Every step takes 1 +- ``JITTER`` units of
time (seeded), so the other workers' pushes are 0 to 8 versions stale, as in the test's processes; in SYNC the
barrier waits for the straggler whatever it does (time, not accuracy), so there it pushes in lock-step, as in the
test. Straggler models:

- ``stalls``: a worker 2x slower than the others (its pushes are about 6 versions stale, within the bound)
  that every 40th step pauses between its pull and its push for as long as 40 steps of a fast worker (about
  120 versions); a refused push is recomputed on a fresh pull without pausing again.
- ``slow-link``: the convergence test's straggler, the issue's cross-datacenter case. Every gradient of the
  straggler reaches the server ``delay`` versions after the pull it was computed on, while the straggler
  keeps computing (pipelined): a quarter of all gradients are ``delay`` versions stale. When the others
  finish, what is still on the link (a quarter to a third of ``delay`` gradients) lands back to back: the
  backlog.
- ``preempted``: the straggler pulls at version 0, is preempted for the whole run, and its version-0
  gradient lands after the others have finished: the stalest push possible, applied last.

Records go to ``bench/results/staleness.json``: ``ours`` is ASYNC's test accuracy, the peer BOUNDED
STALENESS's on the same schedule, with the single-process and SYNC accuracies, ASYNC's accuracy before a slow
link's backlog landed, and the staleness of what was applied.

What it shows on this (convex) problem: while fresh gradients outnumber the stale ones, ASYNC stays within
about 2 points of bounded staleness even with a quarter of its gradients 300 versions old
(``async_before_backlog``; Adam at 0.2, where every mode fails, aside). What it does not recover from is stale
gradients with no fresh ones after them: a slow link's backlog landing after the others have finished costs it
up to 38 points, the more the larger the learning rate and the delay (nothing at SGD 0.5). A straggler that
only pauses now and then, or a single very stale push, costs it 1.6 points at most (Adam at 0.2 aside).
Bounded staleness refuses all of it.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.records import record, write_records
from guardmesh.errors import FailedPrecondition
from services.paramserver.optimizer import OptimizerKind, OptimizerSettings
from services.paramserver.shard import ConsistencySettings, Mode, ModelShard, Outcome, TensorMeta

F32 = 1  # guardmesh.v1.D_TYPE_FLOAT32
WORKERS = 4
STRAGGLER = WORKERS - 1
EPOCHS = 250
BOUND = 8
WEIGHT_DECAY = 0.01
#: Every step takes 1 +- JITTER time (seeded): the fast workers' pushes are 0 to about 8 versions stale, as
#: four worker processes sharing two cores saw in the convergence test.
JITTER = 0.6


@dataclass(frozen=True)
class Problem:
    """The convergence test's data: standardized digits, 75/25 stratified split, one shard per worker."""

    x_tr: np.ndarray
    y_tr: np.ndarray
    x_te: np.ndarray
    y_te: np.ndarray

    @classmethod
    def load(cls, test_size: float = 0.25) -> Problem:
        """Split and scale exactly as ``tests/ps_worker.py`` does."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        x, y = load_digits(return_X_y=True)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=0, stratify=y)
        scaler = StandardScaler().fit(x_tr)
        return cls(scaler.transform(x_tr).astype(np.float32), y_tr, scaler.transform(x_te).astype(np.float32), y_te)

    def shard(self, worker: int) -> np.ndarray:
        """Row indices of a worker's shard."""
        return np.arange(len(self.x_tr))[worker::WORKERS]

    def initial(self) -> dict[str, np.ndarray]:
        """``torch.nn.Linear(64, 10)`` under seed 0, as the test's model starts (weight as stored: 10 x 64)."""
        import torch

        torch.manual_seed(0)
        m = torch.nn.Linear(64, 10)
        return {"w": m.weight.detach().numpy().reshape(-1).copy(), "b": m.bias.detach().numpy().copy()}

    def gradient(self, params: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Mean cross-entropy gradient over ``rows`` (weight decay is the optimizer's)."""
        w = params["w"].reshape(10, 64)
        x = self.x_tr[rows]
        z = x @ w.T + params["b"]
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(rows)), self.y_tr[rows]] -= 1.0
        p /= len(rows)
        return {"w": (p.T @ x).astype(np.float32).reshape(-1), "b": p.sum(axis=0).astype(np.float32)}

    def accuracy(self, params: dict[str, np.ndarray]) -> float:
        """Test accuracy."""
        logits = self.x_te @ params["w"].reshape(10, 64).T + params["b"]
        return float((logits.argmax(axis=1) == self.y_te).mean())


def new_shard(problem: Problem, optimizer: OptimizerSettings, mode: Mode) -> ModelShard:
    """A real shard holding the model, in ``mode``: bound ``BOUND`` when bounded, SYNC over all workers."""
    init = problem.initial()
    tensors = {n: (TensorMeta(F32, v.shape), v) for n, v in init.items()}
    consistency = ConsistencySettings(
        mode, workers=WORKERS, max_staleness=BOUND if mode == Mode.BOUNDED_STALENESS else 0
    )
    return ModelShard("study", tensors, optimizer, consistency, 0, "study", answer_limit=1 << 26)


def snapshot(shard: ModelShard) -> tuple[int, dict[str, np.ndarray]]:
    """A pull: the version and a copy of the parameters."""
    with shard.cond:
        return shard.version, {n: v.copy() for n, v in shard.masters.items()}


def single_process(problem: Problem, optimizer: OptimizerSettings) -> float:
    """Full-batch training in one process through the same kernels, for ``EPOCHS`` steps."""
    shard = new_shard(problem, optimizer, Mode.ASYNC)
    rows = np.arange(len(problem.x_tr))
    for step in range(EPOCHS):
        version, params = snapshot(shard)
        shard.push("single", version, step, problem.gradient(params, rows))
    return problem.accuracy(snapshot(shard)[1])


@dataclass
class Run:
    """What one simulated training applied."""

    accuracy: float
    #: Accuracy when the other workers finished, before what was still in flight landed (slow link only).
    before_backlog: float = float("nan")
    applied_staleness: list[int] = field(default_factory=list)
    refused: int = 0


def simulate(
    problem: Problem, optimizer: OptimizerSettings, mode: Mode, straggler: str, delay: int, jitter: float = JITTER
) -> Run:
    """Four workers on a deterministic schedule (time in steps of a fast worker); see the module docstring.

    In SYNC the barrier waits for every worker, so a slow link or a preemption only makes each version wait
    (time, not accuracy): the straggler then pushes like the others, as in the convergence test.
    """
    if mode == Mode.SYNC and straggler != "stalls":
        straggler = "none"
    shard = new_shard(problem, optimizer, mode)
    rngs = [np.random.default_rng(w) for w in range(WORKERS)]  # per worker: a retry does not shift the others
    out = Run(0.0)
    steps = [0] * WORKERS
    step_ids = [0] * WORKERS
    events: list[tuple[float, int, int, int, dict[str, np.ndarray]]] = []  # (time, order, worker, base, params)
    delayed: list[tuple[int, int, int, dict[str, np.ndarray]]] = []  # slow link: (due version, id, base, grad)
    sent = itertools.count()
    order = 0
    fast_done = 0

    def start(worker: int, now: float, stall: bool = True) -> None:
        nonlocal order
        version, params = snapshot(shard)
        duration = rngs[worker].uniform(1.0 - jitter, 1.0 + jitter)  # steps vary, as on a shared machine
        if worker == STRAGGLER and straggler == "stalls":
            duration = 2.0 + (40.0 if stall and (steps[worker] + 1) % 40 == 0 else 0.0)
        if worker == STRAGGLER and straggler == "preempted":
            duration = float("inf")  # lands after everyone else (below)
        order += 1
        heapq.heappush(events, (now + duration, order, worker, version, params))

    waiting: list[int] = []  # SYNC: workers whose push is buffered until the version completes
    clock = [0.0]

    def push(worker: int, base: int, grad: dict[str, np.ndarray]) -> bool:
        step_ids[worker] += 1
        try:
            result = shard.push(f"w{worker}", base, step_ids[worker], grad)
        except FailedPrecondition:
            out.refused += 1
            return False
        if result.outcome == Outcome.BUFFERED:
            waiting.append(worker)
            return True
        out.applied_staleness.append(result.staleness)
        for w in waiting:  # the version they waited for is complete: they go on from it
            out.applied_staleness.append(result.staleness)
            after_step(w, clock[0])
        waiting.clear()
        return True

    def after_step(worker: int, now: float) -> None:
        nonlocal fast_done
        steps[worker] += 1
        if steps[worker] < EPOCHS:
            start(worker, now)
        elif worker != STRAGGLER:
            fast_done += 1

    def deliver_due() -> None:
        while delayed and delayed[0][0] <= shard.version:
            _, _, base, grad = heapq.heappop(delayed)
            push(STRAGGLER, base, grad)

    for w in range(WORKERS):
        start(w, 0.0)
    while events:
        now, _, worker, base, params = heapq.heappop(events)
        clock[0] = now
        if worker == STRAGGLER and now == float("inf"):  # the preempted one lands last ...
            if not push(worker, base, problem.gradient(params, problem.shard(worker))):
                version, params = snapshot(shard)  # ... and, refused as stale, recomputes on a fresh pull
                push(worker, version, problem.gradient(params, problem.shard(worker)))
            continue
        if worker == STRAGGLER and fast_done == WORKERS - 1:
            continue  # the others are done: the straggler stops, as in the test
        grad = problem.gradient(params, problem.shard(worker))
        if worker == STRAGGLER and straggler == "slow-link":
            heapq.heappush(delayed, (base + delay, next(sent), base, grad))
            steps[worker] += 1
            start(worker, now)  # pipelined: the next step starts while this gradient travels
            continue
        if not push(worker, base, grad):
            start(worker, now, stall=False)  # refused as stale (or late): re-pull and recompute this step
            continue
        deliver_due()
        if worker not in waiting:
            after_step(worker, now)
    out.before_backlog = problem.accuracy(snapshot(shard)[1])
    while delayed:  # what was still on the slow link arrives after the others stopped
        _, _, base, grad = heapq.heappop(delayed)
        push(STRAGGLER, base, grad)
    out.accuracy = problem.accuracy(snapshot(shard)[1])
    return out


OPTIMIZERS: dict[str, Callable[[float], OptimizerSettings]] = {
    "sgd": lambda lr: OptimizerSettings(OptimizerKind.SGD, lr, weight_decay=WEIGHT_DECAY),
    "momentum": lambda lr: OptimizerSettings(OptimizerKind.MOMENTUM, lr, momentum=0.9, weight_decay=WEIGHT_DECAY),
    "adam": lambda lr: OptimizerSettings(OptimizerKind.ADAM, lr, weight_decay=WEIGHT_DECAY),
}
#: Single-process learning rates per optimizer: the test's (SGD 0.5) and larger ones, up to where
#: single-process training itself stops converging well.
RATES = {"sgd": (0.5, 2.0, 4.0), "momentum": (0.05, 0.2, 0.5), "adam": (0.01, 0.05, 0.2)}
STRAGGLERS: tuple[tuple[str, int], ...] = (
    ("stalls", 0),
    ("slow-link", 40),
    ("slow-link", 100),
    ("slow-link", 300),
    ("preempted", 0),
)


def run(optimizers: Sequence[str]) -> list[dict[str, Any]]:
    """Every straggler model x optimizer x rate, ASYNC beside BOUNDED_STALENESS; the records."""
    problem = Problem.load()
    records = []
    for kind in optimizers:
        for lr in RATES[kind]:
            reference = single_process(problem, OPTIMIZERS[kind](lr))
            for straggler, delay in STRAGGLERS:
                settings = OPTIMIZERS[kind](lr / WORKERS)
                modes = (Mode.SYNC, Mode.BOUNDED_STALENESS, Mode.ASYNC)
                got = {m: simulate(problem, settings if m != Mode.SYNC else OPTIMIZERS[kind](lr), m, straggler, delay)
                       for m in modes}  # fmt: skip
                syn, asy, ssp = got[Mode.SYNC], got[Mode.ASYNC], got[Mode.BOUNDED_STALENESS]
                label = straggler + (f" {delay} versions" if delay else "")
                r = record(
                    f"test accuracy, straggler {label}, {kind} lr {lr:g} (single process {reference:.4f})",
                    "accuracy",
                    asy.accuracy,
                    f"bounded staleness (bound {BOUND}), same schedule",
                    ssp.accuracy,
                    None,
                )
                r.update(
                    single_process=reference,
                    sync=syn.accuracy,
                    async_before_backlog=asy.before_backlog,
                    async_max_staleness=max(asy.applied_staleness, default=0),
                    ssp_max_staleness=max(ssp.applied_staleness, default=0),
                    ssp_refused=ssp.refused,
                    async_minus_ssp_points=100 * (asy.accuracy - ssp.accuracy),
                    ssp_minus_single_points=100 * (ssp.accuracy - reference),
                )
                records.append(r)
                print(
                    f"{kind:8} lr {lr:<5g} {label:22} single {reference:.4f}  sync {syn.accuracy:.4f}  "
                    f"async {asy.accuracy:.4f} (before the backlog {asy.before_backlog:.4f}, "
                    f"max staleness {r['async_max_staleness']})  ssp {ssp.accuracy:.4f} "
                    f"(refused {ssp.refused})  async-ssp {r['async_minus_ssp_points']:+.2f} pt",
                    flush=True,
                )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study and write ``bench/results/staleness.json``."""
    ap = argparse.ArgumentParser(prog="python -m bench.staleness", description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    args = ap.parse_args(argv)
    write_records("staleness", run(args.optimizers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
