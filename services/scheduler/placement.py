"""Placement: one feasibility filter and interchangeable scoring policies.

Like the Kubernetes scheduler framework, a decision first filters (which GPUs and nodes can take the
replica at all) and then scores the feasible candidates with a policy; the lowest score wins. Policies:

* ``first-fit``: the first feasible GPU in inventory order;
* ``best-fit``: the node (then GPU) left with the least room, packing tightly;
* ``fgd``: fragmentation gradient descent (Weng et al., "Beware of Fragmentation", USENIX ATC 2023): the
  candidate whose placement grows the node's expected fragmentation least, measured against the recent
  distribution of job shapes. Its per-candidate cost is O(task classes) thanks to per-node aggregates
  kept current by the native kernels in ``native/fragmentation.pyx``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from native import fragmentation as _frag  # type: ignore[attr-defined]
from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import JobSpec, Topology

#: Added to the score of a multi-GPU replica that must span topology groups, so any node that can hold it
#: inside one group wins first.
SPAN_PENALTY = 1e12
#: Candidate nodes evaluated exactly for a multi-GPU replica (after a vectorised pre-ranking).
MULTI_GPU_NODES_EVALUATED = 32


#: A task class of FGD's workload: GPUs, allows sharing, share (thousandths), memory (MiB), allowed models.
TaskClass = tuple[int, bool, int | None, int | None, frozenset[str]]


@dataclass(frozen=True)
class ReplicaShape:
    """What one replica needs, independent of where it goes."""

    gpus: int
    memory_mib: int | None
    share_milli: int | None
    allow_sharing: bool
    models: frozenset[str]
    selector: tuple[tuple[str, str], ...]
    cpu_milli: int
    host_memory_mib: int
    topology: Topology

    @classmethod
    def of(cls, spec: JobSpec) -> ReplicaShape:
        """The replica shape of a job (memoised: specs are immutable)."""
        return _shape_of(spec)

    @property
    def class_key(self) -> TaskClass:
        """Key of the shape's task class in the workload distribution (allowed models included: a class
        that may only use some models cannot use the room on the others)."""
        return (self.gpus, self.allow_sharing, self.share_milli, self.memory_mib, self.models)

    def describe_need(self) -> str:
        """The per-GPU need in words."""
        if self.memory_mib is not None:
            need = f"{self.memory_mib} MiB"
        else:
            need = f"{(self.share_milli or 0) / 10:g}% of a card"
        kind = "shareable" if self.allow_sharing else "idle"
        plural = "s" if self.gpus > 1 else ""
        return f"{self.gpus} {kind} GPU{plural} with >= {need} allocatable"


@functools.lru_cache(maxsize=8192)
def _shape_of(spec: JobSpec) -> ReplicaShape:
    return ReplicaShape(
        gpus=spec.gpus_per_replica,
        memory_mib=spec.memory_mib_per_gpu,
        share_milli=spec.share_milli,
        allow_sharing=spec.allow_sharing,
        models=frozenset(spec.allowed_models),
        selector=spec.node_selector,
        cpu_milli=spec.cpu_milli,
        host_memory_mib=spec.host_memory_mib,
        topology=spec.topology,
    )


@dataclass(frozen=True)
class Choice:
    """A feasible placement of one replica."""

    node: int
    gpus: tuple[int, ...]
    caps: tuple[int, ...]
    score: float
    spans_groups: bool


def caps_for(state: ClusterState, shape: ReplicaShape) -> np.ndarray:
    """Memory cap, MiB, the replica would get on each GPU (cached per inventory generation)."""
    key = ("caps", shape.memory_mib, shape.share_milli)
    cached = state.cache.get(key)
    if cached is not None:
        return cached
    if shape.memory_mib is not None:
        caps = np.full(state.gpu_count, shape.memory_mib, dtype=np.int64)
    else:
        assert shape.share_milli is not None
        caps = np.maximum(state.gpu_usable * shape.share_milli // 1000, 1)
    state.cache[key] = caps
    return caps


def model_mask(state: ClusterState, shape: ReplicaShape) -> np.ndarray:
    """GPUs of an allowed model (cached per inventory generation)."""
    key = ("models", shape.models)
    cached = state.cache.get(key)
    if cached is not None:
        return cached
    if not shape.models:
        mask = np.ones(state.gpu_count, dtype=bool)
    else:
        ids = [state.model_index[m] for m in shape.models if m in state.model_index]
        mask = np.isin(state.gpu_model, np.asarray(ids, dtype=np.int32))
    state.cache[key] = mask
    return mask


def selector_mask(state: ClusterState, shape: ReplicaShape) -> np.ndarray:
    """Nodes that are alive and match the selector (host resources are checked separately)."""
    if not shape.selector:
        return state.node_alive
    key = ("selector", shape.selector)
    sel = state.cache.get(key)
    if sel is None:
        sel = np.array([all(labels.get(k) == v for k, v in shape.selector) for labels in state.node_labels], dtype=bool)
        sel = state.cache[key] = sel.reshape(state.node_alive.shape)
    return state.node_alive & sel


def host_free(state: ClusterState) -> tuple[np.ndarray, np.ndarray]:
    """Free CPU (milli) and host memory (MiB) per node, as float64 (untracked nodes: practically infinite)."""
    return state.host_free()


def node_mask(state: ClusterState, shape: ReplicaShape) -> np.ndarray:
    """Nodes that are alive, match the selector and have the replica's CPU and host memory free."""
    ok = selector_mask(state, shape).copy()
    if shape.cpu_milli:
        ok &= state.node_cpu - state.node_cpu_used >= shape.cpu_milli
    if shape.host_memory_mib:
        ok &= state.node_mem - state.node_mem_used >= shape.host_memory_mib
    return ok


def feasible_gpus(state: ClusterState, shape: ReplicaShape, caps: np.ndarray) -> np.ndarray:
    """The filter: GPUs that can take one of the replica's GPUs right now."""
    ok = state.gpu_avail >= caps
    if not shape.allow_sharing:
        ok &= state.gpu_nalloc == 0
    ok &= model_mask(state, shape)
    ok &= node_mask(state, shape)[state.gpu_node]
    return ok


def take_milli(state: ClusterState, shape: ReplicaShape, gpus: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Room (thousandths of allocatable memory) each candidate GPU loses if the replica lands on it."""
    if not shape.allow_sharing:
        return state.gpu_room[gpus].astype(np.float32)
    usable = np.maximum(state.gpu_usable[gpus], 1)
    return (caps[gpus] * 1000.0 / usable).astype(np.float32)


_NO_TABLES = (
    np.zeros((0, 1), dtype=np.float32),
    np.zeros(0, dtype=np.int32),
    np.zeros(0, dtype=np.float32),
    np.zeros((0, 0), dtype=np.int32),
    np.zeros((0, 0), dtype=np.float32),
    np.zeros(0, dtype=np.float32),
)


class Policy(ABC):
    """A scoring policy over feasible candidates; lower scores are better."""

    name: str = "policy"
    #: Policy number understood by the fused native one-GPU kernel.
    native_code: int = -1

    def native_tables(self) -> tuple[np.ndarray, ...]:
        """Class tables and node aggregates the native kernel reads (FGD only)."""
        return _NO_TABLES

    def host_tables(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-class CPU and host memory demand (FGD only): a node short of them cannot host the class."""
        return None, None

    def attach(self, state: ClusterState) -> None:
        """Bind to the cluster state (policies that keep aggregates subscribe to changes)."""
        self.state = state

    def observe(self, shape: ReplicaShape) -> None:  # noqa: B027 - optional hook
        """See a submitted job's shape (FGD learns the workload distribution from these)."""

    @abstractmethod
    def gpu_scores(
        self,
        state: ClusterState,
        cands: np.ndarray,
        take: np.ndarray,
        task: tuple[float, float] = (0.0, 0.0),
        allow_sharing: bool = False,
    ) -> np.ndarray:
        """Scores of single-GPU placements on ``cands`` taking ``take`` thousandths each (``task``: the
        replica's CPU milli and host MiB; ``allow_sharing``: the replica's)."""

    @abstractmethod
    def set_score(
        self, state: ClusterState, node: int, gpus: np.ndarray, take: np.ndarray, task: tuple[float, float] = (0.0, 0.0)
    ) -> float:
        """Score of placing a multi-GPU replica on ``gpus`` of ``node``."""

    def host_scores(self, state: ClusterState, nodes: np.ndarray, task: tuple[float, float]) -> np.ndarray:
        """Scores of placing a replica with no GPU (``task``: CPU milli, host MiB) on ``nodes``."""
        return host_packing(state, nodes, task)

    def node_rank(self, state: ClusterState, nodes: np.ndarray) -> np.ndarray:
        """Cheap vectorised pre-ranking of candidate nodes for multi-GPU replicas (lower first)."""
        sums = np.add.reduceat(state.gpu_room, state.node_first)[nodes] if len(state.nodes) else nodes
        return np.asarray(sums, dtype=np.float64)


def host_packing(state: ClusterState, nodes: np.ndarray, task: tuple[float, float]) -> np.ndarray:
    """Share of CPU plus share of host memory a node keeps free after ``task`` (best fit: lowest first)."""
    cpu_free, mem_free = host_free(state)
    cpu = (cpu_free[nodes] - task[0]) / np.maximum(state.node_cpu[nodes], 1)
    mem = (mem_free[nodes] - task[1]) / np.maximum(state.node_mem[nodes], 1)
    return np.asarray(cpu + mem, dtype=np.float64)


class FirstFit(Policy):
    """The first feasible GPU in inventory order."""

    name = "first-fit"
    native_code = 0

    def host_scores(self, state: ClusterState, nodes: np.ndarray, task: tuple[float, float]) -> np.ndarray:
        """Inventory order."""
        return nodes.astype(np.float64)

    def gpu_scores(
        self,
        state: ClusterState,
        cands: np.ndarray,
        take: np.ndarray,
        task: tuple[float, float] = (0.0, 0.0),
        allow_sharing: bool = False,
    ) -> np.ndarray:
        """Inventory position."""
        return cands.astype(np.float64)

    def set_score(
        self, state: ClusterState, node: int, gpus: np.ndarray, take: np.ndarray, task: tuple[float, float] = (0.0, 0.0)
    ) -> float:
        """Inventory position of the node."""
        return float(node)

    def node_rank(self, state: ClusterState, nodes: np.ndarray) -> np.ndarray:
        """Inventory order."""
        return nodes.astype(np.float64)


class BestFit(Policy):
    """The node, then the GPU, left with the least room after placement."""

    name = "best-fit"
    native_code = 1

    def gpu_scores(
        self,
        state: ClusterState,
        cands: np.ndarray,
        take: np.ndarray,
        task: tuple[float, float] = (0.0, 0.0),
        allow_sharing: bool = False,
    ) -> np.ndarray:
        """Node room after placement, then GPU room after placement."""
        node_room = np.add.reduceat(state.gpu_room, state.node_first).astype(np.float64)
        after_gpu = state.gpu_room[cands].astype(np.float64) - take
        return (node_room[state.gpu_node[cands]] - take) * 100_000.0 + after_gpu

    def set_score(
        self, state: ClusterState, node: int, gpus: np.ndarray, take: np.ndarray, task: tuple[float, float] = (0.0, 0.0)
    ) -> float:
        """Node room after placement."""
        first = int(state.node_first[node])
        room = float(state.gpu_room[first : first + int(state.node_ngpu[node])].sum())
        return room - float(take.sum())


class Workload:
    """The recent distribution of job shapes (FGD's target workload), as task classes."""

    def __init__(self, window: int = 2000, max_classes: int = 16) -> None:
        self.recent: deque[TaskClass] = deque(maxlen=window)
        self.max_classes = max_classes
        #: Running mean CPU (milli) and host memory (MiB) per class key.
        self.host: dict[TaskClass, tuple[float, float, int]] = {}

    def observe(self, key: TaskClass, cpu: float = 0.0, mem: float = 0.0) -> None:
        """Count one submitted shape with its CPU and host memory per replica."""
        self.recent.append(key)
        c, m, n = self.host.get(key, (0.0, 0.0, 0))
        self.host[key] = ((c * n + cpu) / (n + 1), (m * n + mem) / (n + 1), min(n + 1, 1000))

    def host_demand(self, key: TaskClass) -> tuple[float, float]:
        """Mean CPU and host memory of a class."""
        c, m, _ = self.host.get(key, (0.0, 0.0, 0))
        return c, m

    def classes(self) -> list[tuple[TaskClass, float]]:
        """The most frequent classes with their popularity (summing to 1)."""
        if not self.recent:
            return [((1, False, 1000, None, frozenset()), 1.0)]
        top = Counter(self.recent).most_common(self.max_classes)
        total = sum(c for _, c in top)
        return [(key, c / total) for key, c in top]


class FragmentationAware(Policy):
    """FGD: minimise the growth of expected fragmentation (see the module docstring)."""

    name = "fgd"
    native_code = 2

    def __init__(self, window: int = 2000, max_classes: int = 16, refresh_every: int = 100) -> None:
        self.workload = Workload(window, max_classes)
        self.refresh_every = refresh_every
        self._since_refresh = 0
        self.count_fit = np.zeros((0, 1), dtype=np.int32)
        self.sum_frag = np.zeros((0, 1), dtype=np.float32)
        self.sum_r = np.zeros(0, dtype=np.float32)
        self.d = np.zeros((0, 0), dtype=np.float32)
        self.cls_cpu = np.zeros(0, dtype=np.float64)
        self.cls_mem = np.zeros(0, dtype=np.float64)
        self._keys: list[TaskClass] = []

    def attach(self, state: ClusterState) -> None:
        """Subscribe to the state's changes and build the aggregates."""
        super().attach(state)
        state.listeners.append(self._on_change)
        self.rebuild()

    def observe(self, shape: ReplicaShape) -> None:
        """Learn the workload; rebuild the class tables every ``refresh_every`` shapes."""
        if shape.gpus == 0:
            return  # a task class is a GPU demand; CPU-only jobs are felt through the nodes' free CPU
        self.workload.observe(shape.class_key, shape.cpu_milli, shape.host_memory_mib)
        self._since_refresh += 1
        if self._since_refresh >= self.refresh_every:
            self.rebuild()

    def rebuild(self) -> None:
        """Recompute the class tables; the per-node aggregates only when the set of classes changed."""
        self._since_refresh = 0
        state = self.state
        classes = self.workload.classes()
        keys = [key for key, _ in classes]
        self.p = np.array([p for _, p in classes], dtype=np.float32)
        host = [self.workload.host_demand(key) for key in keys]
        self.cls_cpu = np.array([c for c, _ in host], dtype=np.float64)
        self.cls_mem = np.array([m for _, m in host], dtype=np.float64)
        nmodels = max(len(state.models), 1)
        n = len(state.nodes)
        if keys == self._keys and self.sum_r.shape[0] == n and self.d.shape[1] == nmodels:
            return
        self._keys = keys
        usable = np.zeros(nmodels, dtype=np.int64)
        np.maximum.at(usable, state.gpu_model, state.gpu_usable)
        d = np.zeros((len(classes), nmodels), dtype=np.float32)
        for c, (gpus, allow_sharing, share, mem, models) in enumerate(keys):
            for m in range(nmodels):
                if models and (m >= len(state.models) or state.models[m] not in models):
                    d[c, m] = 1001.0  # a model the class may not use: its room is a fragment to the class
                elif not allow_sharing or gpus > 1:
                    d[c, m] = 1000.0
                elif share is not None:
                    d[c, m] = float(share)
                else:
                    assert mem is not None
                    d[c, m] = min(1001.0, math.ceil(mem * 1000 / usable[m])) if usable[m] > 0 else 1001.0
        self.d = d
        self.k = np.array([key[0] for key in keys], dtype=np.int32)
        self.count_fit = np.zeros((n, len(classes)), dtype=np.int32)
        self.sum_frag = np.zeros((n, len(classes)), dtype=np.float32)
        self.sum_r = np.zeros(n, dtype=np.float32)
        self._refresh(np.arange(n, dtype=np.int32))

    def native_tables(self) -> tuple[np.ndarray, ...]:
        """Class demands, sizes, popularity and the per-node aggregates."""
        return (self.d, self.k, self.p, self.count_fit, self.sum_frag, self.sum_r)

    def host_tables(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-class mean CPU and host memory."""
        return self.cls_cpu, self.cls_mem

    def _refresh(self, nodes: np.ndarray) -> None:
        s = self.state
        _frag.refresh_nodes(
            s.gpu_room,
            s.gpu_model,
            s.node_first,
            s.node_ngpu,
            np.ascontiguousarray(nodes, dtype=np.int32),
            self.d,
            self.count_fit,
            self.sum_frag,
            self.sum_r,
        )

    def _on_change(self, nodes: np.ndarray) -> None:
        if self.sum_r.shape[0] != len(self.state.nodes) or self.d.shape[1] < max(len(self.state.models), 1):
            self.rebuild()
        else:
            self._refresh(nodes)

    def gpu_scores(
        self,
        state: ClusterState,
        cands: np.ndarray,
        take: np.ndarray,
        task: tuple[float, float] = (0.0, 0.0),
        allow_sharing: bool = False,
    ) -> np.ndarray:
        """Growth of expected fragmentation of the candidate's node, in steps of ``FGD_QUANTUM``; within a
        step, the fullest node for a replica that allows sharing, else inventory order (see the kernel)."""
        growth = self.fragmentation_growth(state, cands, take, task)
        steps = np.floor(growth / _frag.FGD_QUANTUM + 0.5) * _frag.FGD_STEP
        if allow_sharing:
            return steps + (state.node_room[state.gpu_node[cands]] - take.astype(np.float64))
        return steps + cands.astype(np.float64)

    def fragmentation_growth(
        self, state: ClusterState, cands: np.ndarray, take: np.ndarray, task: tuple[float, float] = (0.0, 0.0)
    ) -> np.ndarray:
        """Growth of expected fragmentation of the candidate's node (FGD's own score)."""
        out = np.empty(cands.shape[0], dtype=np.float32)
        _frag.single_gpu_delta(
            np.ascontiguousarray(cands, dtype=np.int64),
            np.ascontiguousarray(take, dtype=np.float32),
            state.gpu_room,
            state.gpu_node,
            state.gpu_model,
            self.d,
            self.k,
            self.p,
            self.count_fit,
            self.sum_frag,
            self.sum_r,
            out,
            *host_free(state),
            task[0],
            task[1],
            self.cls_cpu,
            self.cls_mem,
        )
        return out.astype(np.float64)

    def set_score(
        self, state: ClusterState, node: int, gpus: np.ndarray, take: np.ndarray, task: tuple[float, float] = (0.0, 0.0)
    ) -> float:
        """Exact growth of the node's expected fragmentation for the whole GPU set."""
        first = int(state.node_first[node])
        sl = slice(first, first + int(state.node_ngpu[node]))
        room = state.gpu_room[sl].copy()
        models = state.gpu_model[sl]
        cpu = float(state.node_cpu[node] - state.node_cpu_used[node])
        mem = float(state.node_mem[node] - state.node_mem_used[node])
        before = _frag.node_fragmentation(room, models, self.d, self.k, self.p, cpu, mem, self.cls_cpu, self.cls_mem)
        room[gpus - first] = np.maximum(room[gpus - first] - take, 0)
        after = _frag.node_fragmentation(
            room, models, self.d, self.k, self.p, cpu - task[0], mem - task[1], self.cls_cpu, self.cls_mem
        )
        return float(after - before)

    def host_scores(self, state: ClusterState, nodes: np.ndarray, task: tuple[float, float]) -> np.ndarray:
        """Growth of the node's expected fragmentation from the CPU and host memory taken (the GPU room it
        strands); best fit by CPU and host memory breaks ties. A node with no GPU room left strands nothing
        (growth 0), so those are taken first; otherwise the nodes with the least GPU room are evaluated."""
        packing = host_packing(state, nodes, task)
        room = state.node_room[nodes]
        out = np.full(nodes.shape[0], np.inf)
        full = room <= 0
        if full.any():
            out[full] = packing[full]
            return out
        none = np.zeros(0, dtype=np.int64)
        for i in np.lexsort((packing, room))[:MULTI_GPU_NODES_EVALUATED]:
            delta = self.set_score(state, int(nodes[i]), none, np.zeros(0, dtype=np.float32), task)
            out[i] = delta * 1e3 + packing[i]
        return out


POLICIES: dict[str, type[Policy]] = {"first-fit": FirstFit, "best-fit": BestFit, "fgd": FragmentationAware}


def make_policy(name: str) -> Policy:
    """A fresh policy by name (``fgd``, ``best-fit`` or ``first-fit``)."""
    return POLICIES[name]()


def could_host(state: ClusterState, shape: ReplicaShape) -> np.ndarray:
    """Nodes that could hold one replica of ``shape`` if they were empty (live or not), per node.

    The queue reserves these for a blocked head: a later job may only backfill elsewhere.
    """
    key = ("could_host", shape)
    cached = state.cache.get(key)
    if cached is not None:
        return cached
    ok = np.array([all(labels.get(k) == v for k, v in shape.selector) for labels in state.node_labels], dtype=bool)
    ok = ok.reshape(len(state.nodes))
    ok &= (state.node_cpu >= shape.cpu_milli) & (state.node_mem >= shape.host_memory_mib)
    if shape.gpus:
        fits_card = model_mask(state, shape) & (state.gpu_usable >= caps_for(state, shape))
        ok &= np.bincount(state.gpu_node[fits_card], minlength=len(state.nodes)) >= shape.gpus
    state.cache[key] = ok
    return ok


def place_replica(
    state: ClusterState, shape: ReplicaShape, policy: Policy, nodes_allowed: np.ndarray | None = None
) -> Choice | None:
    """The best feasible placement of one replica under ``policy``, or None if none is feasible.

    ``nodes_allowed`` (a mask over nodes) narrows the candidates, e.g. to backfill around a blocked head.
    """
    if state.gpu_count == 0:
        return None
    caps = caps_for(state, shape)
    feas = feasible_gpus(state, shape, caps)
    if nodes_allowed is not None:
        feas &= nodes_allowed[state.gpu_node]
    cands = np.flatnonzero(feas)
    if cands.shape[0] < shape.gpus:
        return None
    if shape.gpus == 1:
        take = take_milli(state, shape, cands, caps)
        scores = policy.gpu_scores(state, cands, take, (shape.cpu_milli, shape.host_memory_mib), shape.allow_sharing)
        i = int(np.argmin(scores))
        g = int(cands[i])
        return Choice(int(state.gpu_node[g]), (g,), (int(caps[g]),), float(scores[i]), False)
    return _place_multi(state, shape, policy, feas, cands, caps)


def place_single_gpu(
    state: ClusterState, shape: ReplicaShape, policy: Policy, nodes_allowed: np.ndarray | None = None
) -> Choice | None:
    """Fast path for one-GPU replicas: filter, score and pick in one native pass.

    Chooses the same GPU as :func:`place_replica` (the numpy reference) for the built-in policies.
    """
    if state.gpu_count == 0:
        return None
    caps = caps_for(state, shape)
    g, score = _frag.select_single_gpu(
        policy.native_code,
        not shape.allow_sharing,  # the kernel's flag: only an idle card will do
        caps,
        state.gpu_avail,
        state.gpu_nalloc,
        model_mask(state, shape).view(np.uint8),
        (selector_mask(state, shape) if nodes_allowed is None else selector_mask(state, shape) & nodes_allowed).view(
            np.uint8
        ),
        state.gpu_node,
        state.gpu_model,
        state.gpu_usable,
        state.gpu_room,
        state.node_room,
        *policy.native_tables(),
        *host_free(state),
        float(shape.cpu_milli),
        float(shape.host_memory_mib),
        *policy.host_tables(),
    )
    if g < 0:
        return None
    return Choice(int(state.gpu_node[g]), (int(g),), (int(caps[g]),), float(score), False)


def place_host_only(
    state: ClusterState, shape: ReplicaShape, policy: Policy, nodes_allowed: np.ndarray | None = None
) -> Choice | None:
    """A replica with no GPU: the node with the CPU and host memory free that ``policy`` scores best."""
    ok = node_mask(state, shape)
    if nodes_allowed is not None:
        ok &= nodes_allowed
    nodes = np.flatnonzero(ok)
    if nodes.shape[0] == 0:
        return None
    scores = policy.host_scores(state, nodes, (float(shape.cpu_milli), float(shape.host_memory_mib)))
    i = int(np.argmin(scores))
    return Choice(int(nodes[i]), (), (), float(scores[i]), False)


def place(
    state: ClusterState, shape: ReplicaShape, policy: Policy, nodes_allowed: np.ndarray | None = None
) -> Choice | None:
    """The placement the scheduler uses: the native fast path for one-GPU replicas, else the reference."""
    if shape.gpus == 0:
        return place_host_only(state, shape, policy, nodes_allowed)
    if shape.gpus == 1 and policy.native_code >= 0:
        return place_single_gpu(state, shape, policy, nodes_allowed)
    return place_replica(state, shape, policy, nodes_allowed)


def _place_multi(
    state: ClusterState,
    shape: ReplicaShape,
    policy: Policy,
    feas: np.ndarray,
    cands: np.ndarray,
    caps: np.ndarray,
) -> Choice | None:
    per_node = np.bincount(state.gpu_node[cands], minlength=len(state.nodes))
    per_group = np.bincount(state.gpu_group[cands], minlength=state.group_count)
    best_group = np.zeros(len(state.nodes), dtype=np.int64)
    np.maximum.at(best_group, state.group_node, per_group)
    inside = best_group >= shape.gpus
    ok = per_node >= shape.gpus
    if shape.topology == Topology.REQUIRED:
        ok &= inside
    nodes = np.flatnonzero(ok)
    if nodes.shape[0] == 0:
        return None
    rank = policy.node_rank(state, nodes)
    if shape.topology != Topology.NONE:
        rank = rank + np.where(inside[nodes], 0.0, SPAN_PENALTY)
    order = nodes[np.argsort(rank, kind="stable")[:MULTI_GPU_NODES_EVALUATED]]
    best: Choice | None = None
    for node in order:
        choice = _choose_on_node(state, shape, policy, int(node), feas, caps)
        if choice is not None and (best is None or choice.score < best.score):
            best = choice
    return best


def _choose_on_node(
    state: ClusterState, shape: ReplicaShape, policy: Policy, node: int, feas: np.ndarray, caps: np.ndarray
) -> Choice | None:
    first = int(state.node_first[node])
    gpus = first + np.flatnonzero(feas[first : first + int(state.node_ngpu[node])])
    take = take_milli(state, shape, gpus, caps)
    task = (float(shape.cpu_milli), float(shape.host_memory_mib))
    prefs = policy.gpu_scores(state, gpus, take, task, shape.allow_sharing)
    spans = False
    if shape.topology != Topology.NONE:
        groups = state.gpu_group[gpus]
        ids, counts = np.unique(groups, return_counts=True)
        fitting = counts >= shape.gpus
        if fitting.any():
            # The tightest group that fits keeps larger islands whole for larger replicas.
            gid = ids[fitting][np.argmin(counts[fitting])]
            sel = groups == gid
            gpus, take, prefs = gpus[sel], take[sel], prefs[sel]
        elif shape.topology == Topology.REQUIRED:
            return None
        else:
            spans = True
    pick = np.argsort(prefs, kind="stable")[: shape.gpus]
    chosen, chosen_take = gpus[pick], take[pick]
    score = policy.set_score(state, node, chosen, chosen_take, task) + (SPAN_PENALTY if spans else 0.0)
    return Choice(node, tuple(int(g) for g in chosen), tuple(int(caps[g]) for g in chosen), score, spans)


def pending_reason(state: ClusterState, shape: ReplicaShape) -> str:
    """Why one replica of ``shape`` cannot be placed now, naming the best candidate node."""
    if state.gpu_count == 0:
        return "the cluster has no registered GPUs"
    if shape.gpus == 0:
        return f"no live node has {shape.cpu_milli} CPU milli and {shape.host_memory_mib} MiB host memory free"
    nodes_ok = node_mask(state, shape)
    if not nodes_ok.any():
        parts = []
        if shape.selector:
            parts.append(f"node_selector {dict(shape.selector)}")
        if shape.cpu_milli or shape.host_memory_mib:
            parts.append(f"{shape.cpu_milli} CPU milli and {shape.host_memory_mib} MiB host memory free")
        return "no live node matches " + (" with ".join(parts) or "the request")
    caps = caps_for(state, shape)
    feas = feasible_gpus(state, shape, caps)
    models = f" of model {'|'.join(sorted(shape.models))}" if shape.models else ""
    group = " in one topology group" if shape.topology == Topology.REQUIRED and shape.gpus > 1 else ""
    if shape.topology == Topology.REQUIRED and shape.gpus > 1:
        per_group = np.bincount(state.gpu_group[feas], minlength=state.group_count)
        counts = np.zeros(len(state.nodes), dtype=np.int64)
        np.maximum.at(counts, state.group_node, per_group)
    else:
        counts = np.bincount(state.gpu_node[feas], minlength=len(state.nodes))
    best = int(np.argmax(counts))
    reason = f"no node has {shape.describe_need()}{models}{group}"
    if counts[best] > 0:
        reason += f"; best candidate {state.nodes[best].name} has {int(counts[best])}"
    else:
        reason += "; no GPU qualifies now"
    return reason
