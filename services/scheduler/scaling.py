"""Scale signals and capacity planning.

A pool is all GPUs of one model. The signals follow its allocated share: the share of its allocatable
memory held by jobs (a card held by a job that does not share counts as full); the GPUs' busy share as
NVML reports it is a separate figure (the ``gpu_utilization_ratio`` metric), since a card can be fully
allocated and idle. When the allocated share stays at or above the scale-out threshold over the whole
window, the advisor recommends the nodes that bring it back to the threshold (from the demand, at least
one); when pending demand cannot be placed, the nodes that demand needs; when the share stays at or below
the scale-in threshold over the window with nothing pending, removing idle nodes (keeping one spare).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import JobSpec


class ScaleDirection(IntEnum):
    """Numbers match ``guardmesh.v1.ScaleDirection``."""

    OUT = 1
    IN = 2
    NONE = 3


@dataclass(frozen=True)
class NodeShape:
    """Shape of nodes to add or remove."""

    model: str
    gpus: int
    memory_mib_per_gpu: int


@dataclass(frozen=True)
class ScaleSignal:
    """A recommendation for one pool."""

    pool: str
    direction: ScaleDirection
    nodes: int
    shape: NodeShape
    utilization: float
    reason: str
    at: float


@dataclass(frozen=True)
class CapacityPlan:
    """Result of the capacity-planning rule."""

    requested_memory_mib: int
    free_memory_mib_per_node: int
    nodes_by_memory: int
    nodes_by_unshared_gpus: int

    @property
    def nodes_needed(self) -> int:
        """The larger of the two figures."""
        return max(self.nodes_by_memory, self.nodes_by_unshared_gpus)


def plan_capacity(shape: NodeShape, jobs: list[JobSpec], reserve_mib: int) -> CapacityPlan:
    """nodes needed = ceil(requested memory / free memory per node), and whole cards for the jobs that do not
    allow sharing."""
    usable = max(shape.memory_mib_per_gpu - reserve_mib, 0)
    requested = 0
    unshared_gpus = 0
    for job in jobs:
        if job.memory_mib_per_gpu is not None:
            per_gpu = job.memory_mib_per_gpu
        else:
            per_gpu = usable * (job.share_milli or 0) // 1000
        requested += job.total_gpus * per_gpu
        if not job.allow_sharing:
            unshared_gpus += job.total_gpus
    free = shape.gpus * usable
    by_memory = math.ceil(requested / free) if free > 0 and requested else 0
    by_gpus = math.ceil(unshared_gpus / shape.gpus) if unshared_gpus else 0
    return CapacityPlan(requested, free, by_memory, by_gpus)


def pool_shape(state: ClusterState, model: str) -> NodeShape:
    """The most common node shape among the pool's nodes."""
    shapes: Counter[tuple[int, int]] = Counter()
    for node in state.nodes:
        devices = [g for g in node.gpus if g.model == model]
        if devices:
            shapes[(len(devices), devices[0].memory_mib)] += 1
    (count, memory), _ = shapes.most_common(1)[0]
    return NodeShape(model, count, memory)


class ScaleAdvisor:
    """Keeps utilisation samples per pool and turns them into signals."""

    def __init__(self, out_threshold: float, in_threshold: float, window_s: float, reserve_mib: int) -> None:
        self.out_threshold = out_threshold
        self.in_threshold = in_threshold
        self.window_s = window_s
        self.reserve_mib = reserve_mib
        self.samples: dict[str, deque[tuple[float, float]]] = {}
        self.current: dict[str, ScaleSignal] = {}

    @staticmethod
    def allocated_share(state: ClusterState) -> dict[str, float]:
        """Allocated share of allocatable memory per pool."""
        out = {}
        for m, model in enumerate(state.models):
            mask = state.gpu_model == m
            usable = float(state.gpu_usable[mask].sum())
            if usable > 0:
                out[model] = 1.0 - float(state.gpu_avail[mask].sum()) / usable
        return out

    def evaluate(self, state: ClusterState, pending: list[JobSpec], now: float) -> list[ScaleSignal]:
        """Sample utilisation and return the signals that changed since the last evaluation."""
        changed = []
        util = self.allocated_share(state)
        demand: dict[str, list[JobSpec]] = {}
        for job in pending:
            demand.setdefault(self._pool_of(state, job), []).append(job)
        for pool, u in util.items():
            samples = self.samples.setdefault(pool, deque())
            samples.append((now, u))
            # Keep the newest sample at or before the window's start: it says what held from then on.
            while len(samples) >= 2 and samples[1][0] <= now - self.window_s:
                samples.popleft()
            full_window = samples[0][0] <= now - self.window_s
            signal = self._decide(state, pool, u, samples, full_window, demand.get(pool, []), now)
            old = self.current.get(pool)
            if signal is None:
                if old is not None and old.direction != ScaleDirection.NONE:
                    withdrawn = ScaleSignal(pool, ScaleDirection.NONE, 0, old.shape, u, "conditions cleared", now)
                    self.current[pool] = withdrawn
                    changed.append(withdrawn)
                continue
            if old is None or (old.direction, old.nodes) != (signal.direction, signal.nodes):
                self.current[pool] = signal
                changed.append(signal)
        return changed

    def nodes_to_threshold(self, state: ClusterState, pool: str, shape: NodeShape, share: float) -> int:
        """Nodes of ``shape`` after which the pool's allocated memory (``share`` of its allocatable memory
        today) is at most the scale-out threshold: ceil((allocated / threshold - allocatable) / node's
        allocatable), and at least 1."""
        mask = state.gpu_model == state.model_index[pool]
        usable = float(state.gpu_usable[mask].sum())
        per_node = shape.gpus * max(shape.memory_mib_per_gpu - self.reserve_mib, 0)
        if per_node <= 0:
            return 1
        missing = usable * share / self.out_threshold - usable
        return max(1, math.ceil(missing / per_node - 1e-9))

    def _pool_of(self, state: ClusterState, job: JobSpec) -> str:
        allowed = [m for m in sorted(job.allowed_models) if m in state.model_index]
        if allowed:
            return allowed[0]
        counts = np.bincount(state.gpu_model, minlength=len(state.models))
        return state.models[int(np.argmax(counts))]

    def _decide(
        self,
        state: ClusterState,
        pool: str,
        u: float,
        samples: deque[tuple[float, float]],
        full_window: bool,
        pending: list[JobSpec],
        now: float,
    ) -> ScaleSignal | None:
        shape = pool_shape(state, pool)
        if pending:
            plan = plan_capacity(shape, pending, self.reserve_mib)
            nodes = max(plan.nodes_needed, 1)
            reason = (
                f"{len(pending)} pending job(s) ask {plan.requested_memory_mib} MiB that cannot be placed; "
                f"a {shape.gpus}x{shape.model} node frees {plan.free_memory_mib_per_node} MiB"
            )
            return ScaleSignal(pool, ScaleDirection.OUT, nodes, shape, u, reason, now)
        sustained = min(s[1] for s in samples)
        if full_window and sustained >= self.out_threshold:
            nodes = self.nodes_to_threshold(state, pool, shape, sustained)
            reason = (
                f"allocated share >= {self.out_threshold:.0%} for the whole {self.window_s:g}s window "
                f"(at least {sustained:.1%}): {nodes} {shape.gpus}x{shape.model} node(s) bring it to "
                f"{self.out_threshold:.0%}"
            )
            return ScaleSignal(pool, ScaleDirection.OUT, nodes, shape, u, reason, now)
        if full_window and max(s[1] for s in samples) <= self.in_threshold:
            m = state.model_index[pool]
            idle = 0
            for n in range(len(state.nodes)):
                first, count = int(state.node_first[n]), int(state.node_ngpu[n])
                sl = slice(first, first + count)
                if (state.gpu_model[sl] == m).any() and int(state.gpu_nalloc[sl].sum()) == 0:
                    idle += 1
            removable = idle - 1  # keep one idle node as headroom
            if removable > 0:
                reason = f"utilisation <= {self.in_threshold:.0%} for the whole {self.window_s:g}s window"
                return ScaleSignal(pool, ScaleDirection.IN, removable, shape, u, reason, now)
        return None
