"""The cluster's GPUs and the allocations on them, kept as flat numpy arrays for fast placement.

GPUs of all nodes lie in one flat index (node by node, each node's GPUs in index order). Every figure a
placement decision reads is an array over that index; every change goes through :meth:`allocate` and
:meth:`free`, which keep the arrays, the per-GPU allocation lists and the change listeners consistent.

The card invariant lives here: a GPU holds one allocation unless every allocation on it allows sharing, and the
caps on it never add up to more than its memory minus the reserve. :meth:`violations` checks it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from guardmesh.errors import FailedPrecondition, InvalidArgument
from guardmesh.inventory import NodeSpec

UNTRACKED = np.iinfo(np.int64).max // 4


@dataclass(frozen=True)
class Allocation:
    """One job replica's hold on one GPU."""

    job_id: str
    replica: int
    cap_mib: int
    allow_sharing: bool


class ClusterState:
    """Inventory and allocations. Not thread-safe: the scheduler serialises access."""

    # Per-GPU arrays (flat GPU index) and per-node arrays, built by _part() and appended to as nodes arrive.
    gpu_total: np.ndarray
    gpu_usable: np.ndarray
    gpu_caps: np.ndarray
    gpu_used: np.ndarray
    gpu_util: np.ndarray
    gpu_nalloc: np.ndarray
    gpu_unshareable: np.ndarray
    gpu_model: np.ndarray
    gpu_node: np.ndarray
    gpu_group: np.ndarray
    gpu_avail: np.ndarray
    gpu_room: np.ndarray
    node_ngpu: np.ndarray
    node_first: np.ndarray
    node_cpu: np.ndarray
    node_mem: np.ndarray
    node_cpu_used: np.ndarray
    node_mem_used: np.ndarray
    node_alive: np.ndarray
    node_room: np.ndarray
    group_node: np.ndarray
    group_count: int

    def __init__(self, reserve_mib: int) -> None:
        self.reserve_mib = reserve_mib
        self.nodes: list[NodeSpec] = []
        self.node_index: dict[str, int] = {}
        self.models: list[str] = []
        self.model_index: dict[str, int] = {}
        self.uuid_index: dict[str, int] = {}
        self.allocs: list[dict[tuple[str, int], Allocation]] = []
        self.job_gpus: dict[str, list[tuple[int, int]]] = {}
        self.listeners: list[Callable[[np.ndarray], None]] = []
        #: CPU and host memory charged per (job, replica): (node name, cpu milli, host MiB).
        self.charges: dict[tuple[str, int], tuple[str, int, int]] = {}
        #: Replicas placed without GPUs (CPU and host memory only), per job.
        self.host_only: dict[str, set[int]] = {}
        self.node_labels: list[dict[str, str]] = []
        self._build_arrays()

    # -- inventory -------------------------------------------------------------------------------------

    def _part(
        self, nodes: list[NodeSpec], node0: int, gpu0: int, group0: int
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Arrays for ``nodes`` placed after ``node0`` nodes, ``gpu0`` GPUs and ``group0`` groups."""
        gpus = [g for n in nodes for g in n.gpus]
        count = len(gpus)
        total = np.array([g.memory_mib for g in gpus], dtype=np.int64).reshape(count)
        usable = np.maximum(total - self.reserve_mib, 0)
        groups: dict[tuple[int, str], int] = {}
        gids = []
        for i, n in enumerate(nodes):
            for g in n.gpus:
                gids.append(group0 + groups.setdefault((i, g.topology_group), len(groups)))
        group_node = np.zeros(len(groups), dtype=np.int32)
        for (node, _), gid in groups.items():
            group_node[gid] = node0 + node
        ngpu = np.array([len(n.gpus) for n in nodes], dtype=np.int32).reshape(len(nodes))
        room = np.where(usable > 0, 1000.0, 0.0).astype(np.float32)
        first = (np.cumsum(ngpu) - ngpu + gpu0).astype(np.int32)
        arrays = {
            "gpu_total": total,
            "gpu_usable": usable,
            "gpu_caps": np.zeros(count, dtype=np.int64),
            "gpu_used": np.zeros(count, dtype=np.int64),
            "gpu_util": np.zeros(count, dtype=np.float64),
            "gpu_nalloc": np.zeros(count, dtype=np.int32),
            "gpu_unshareable": np.zeros(count, dtype=bool),
            "gpu_model": np.array([self.model_index[g.model] for g in gpus], dtype=np.int32).reshape(count),
            "gpu_node": np.repeat(np.arange(node0, node0 + len(nodes), dtype=np.int32), ngpu),
            "gpu_group": np.array(gids, dtype=np.int32).reshape(count),
            "gpu_avail": usable.copy(),
            "gpu_room": room,
            "node_ngpu": ngpu,
            "node_first": first,
            "node_cpu": np.array([n.cpu_milli or UNTRACKED for n in nodes], dtype=np.int64).reshape(len(nodes)),
            "node_mem": np.array([n.host_memory_mib or UNTRACKED for n in nodes], dtype=np.int64).reshape(len(nodes)),
            "node_cpu_used": np.zeros(len(nodes), dtype=np.int64),
            "node_mem_used": np.zeros(len(nodes), dtype=np.int64),
            "node_alive": np.ones(len(nodes), dtype=bool),
            "node_room": np.array(
                [float(room[f - gpu0 : f - gpu0 + k].sum()) for f, k in zip(first, ngpu, strict=True)], dtype=np.float64
            ).reshape(len(nodes)),
        }
        return arrays, group_node

    def _build_arrays(self) -> None:
        arrays, group_node = self._part(self.nodes, 0, 0, 0)
        for name, value in arrays.items():
            setattr(self, name, value)
        self.group_node = group_node
        self.group_count = len(group_node)
        self.uuid_index = {g.uuid: i for i, g in enumerate(g for n in self.nodes for g in n.gpus)}
        self.allocs = [{} for _ in range(self.gpu_count)]
        self.node_labels = [dict(n.labels) for n in self.nodes]
        #: Arrays derived from the inventory alone (caps per share, model masks), valid until it changes.
        self.cache: dict[object, np.ndarray] = {}
        self._host_free_stale = True
        self.node_cpu_free = np.zeros(0, dtype=np.float64)
        self.node_mem_free = np.zeros(0, dtype=np.float64)

    def _append_nodes(self, specs: list[NodeSpec]) -> None:
        """Add new nodes at the end without rebuilding what exists (agents register one by one)."""
        node0, gpu0 = len(self.nodes), self.gpu_count
        arrays, group_node = self._part(specs, node0, gpu0, self.group_count)
        for name, value in arrays.items():
            setattr(self, name, np.concatenate((getattr(self, name), value)))
        self.group_node = np.concatenate((self.group_node, group_node))
        self.group_count += len(group_node)
        for spec in specs:
            self.node_index[spec.name] = len(self.nodes)
            self.nodes.append(spec)
            self.node_labels.append(dict(spec.labels))
            for g in spec.gpus:
                self.uuid_index[g.uuid] = len(self.allocs)
                self.allocs.append({})
        self.cache = {}
        self._host_free_stale = True
        self._notify(np.arange(node0, len(self.nodes), dtype=np.int32))

    def simulation(self) -> ClusterState:
        """A copy to try changes on: own arrays and allocations, no listeners, the same inventory.

        Changes to the copy never reach the live state or its listeners (FGD's aggregates), so a search
        that raises half-way leaves nothing to undo.
        """
        sim = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                setattr(sim, name, value.copy())
        sim.allocs = [dict(a) for a in self.allocs]
        sim.job_gpus = {job: list(held) for job, held in self.job_gpus.items()}
        sim.charges = dict(self.charges)
        sim.host_only = {job: set(reps) for job, reps in self.host_only.items()}
        sim.listeners = []
        return sim

    @property
    def gpu_count(self) -> int:
        """GPUs in the cluster."""
        return int(self.gpu_total.shape[0])

    def set_nodes(self, specs: list[NodeSpec]) -> None:
        """Add or update nodes (in bulk), keeping every existing allocation.

        A node that holds allocations may change labels and CPU/host memory, but not lose, move or shrink
        a GPU that holds one (FailedPrecondition). The whole batch is checked before anything changes.
        """
        merged = list(self.nodes)
        index = dict(self.node_index)
        claimed: dict[str, str] = {}
        for spec in specs:
            for i, g in enumerate(spec.gpus):
                owner = claimed.get(g.uuid)
                if owner is None and g.uuid in self.uuid_index:
                    owner = self.nodes[int(self.gpu_node[self.uuid_index[g.uuid]])].name
                if owner is not None and owner != spec.name:
                    raise InvalidArgument(f"node.gpus[{i}].uuid", f"{g.uuid!r} is registered on node {owner}")
                claimed[g.uuid] = spec.name
            if spec.name in index:
                old = merged[index[spec.name]]
                self._check_update(old, spec)
                merged[index[spec.name]] = spec
            else:
                index[spec.name] = len(merged)
                merged.append(spec)
        if all(spec.name not in self.node_index for spec in specs):
            for spec in specs:
                for g in spec.gpus:
                    if g.model not in self.model_index:
                        self.model_index[g.model] = len(self.models)
                        self.models.append(g.model)
            self._append_nodes(specs)
            return
        saved = [(a, self._gpu_uuid(g)) for g, gpu_allocs in enumerate(self.allocs) for a in gpu_allocs.values()]
        used = {self._gpu_uuid(int(g)): int(self.gpu_used[g]) for g in np.flatnonzero(self.gpu_used)}
        self.nodes = merged
        self.node_index = index
        for spec in specs:
            for g in spec.gpus:
                if g.model not in self.model_index:
                    self.model_index[g.model] = len(self.models)
                    self.models.append(g.model)
        self._build_arrays()
        self.job_gpus = {}
        for alloc, uuid in saved:
            self._apply(self.uuid_index[uuid], alloc, notify=False)
        for uuid, value in used.items():
            if uuid in self.uuid_index:
                self.gpu_used[self.uuid_index[uuid]] = value
        self._refresh(np.arange(self.gpu_count))
        self._rebuild_node_resources()
        self._notify(np.arange(len(self.nodes), dtype=np.int32))

    def _check_update(self, old: NodeSpec, new: NodeSpec) -> None:
        new_gpus = {g.uuid: g for g in new.gpus}
        first = self.node_first[self.node_index[old.name]] if self.nodes else 0
        for j, g in enumerate(old.gpus):
            if not self.allocs[first + j]:
                continue
            ng = new_gpus.get(g.uuid)
            if ng is None or ng.memory_mib < g.memory_mib or ng.model != g.model:
                raise FailedPrecondition(
                    f"node {old.name}: GPU {g.uuid} holds allocations and cannot be removed, "
                    "shrunk or change model; release its jobs first"
                )

    def host_free(self) -> tuple[np.ndarray, np.ndarray]:
        """Free CPU (milli) and host memory (MiB) per node as float64, kept current incrementally."""
        if self._host_free_stale or self.node_cpu_free.shape[0] != len(self.nodes):
            self.node_cpu_free = (self.node_cpu - self.node_cpu_used).astype(np.float64)
            self.node_mem_free = (self.node_mem - self.node_mem_used).astype(np.float64)
            self._host_free_stale = False
        return self.node_cpu_free, self.node_mem_free

    def _gpu_uuid(self, g: int) -> str:
        n = int(self.gpu_node[g])
        return self.nodes[n].gpus[g - int(self.node_first[n])].uuid

    def gpu_device(self, g: int) -> tuple[NodeSpec, int]:
        """The node of flat GPU ``g`` and the GPU's position on it."""
        n = int(self.gpu_node[g])
        return self.nodes[n], g - int(self.node_first[n])

    def _rebuild_node_resources(self) -> None:
        self.node_cpu_used[:] = 0
        self.node_mem_used[:] = 0
        self._host_free_stale = True
        for node, cpu, mem in self.charges.values():
            n = self.node_index[node]
            self.node_cpu_used[n] += cpu
            self.node_mem_used[n] += mem

    # -- allocations -----------------------------------------------------------------------------------

    def _refresh(self, gpus: np.ndarray) -> None:
        if gpus.shape[0] <= 16:
            for g in gpus.tolist():
                usable = int(self.gpu_usable[g])
                held = max(int(self.gpu_caps[g]), int(self.gpu_used[g]))
                avail = 0 if self.gpu_unshareable[g] else max(usable - held, 0)
                self.gpu_avail[g] = avail
                old = float(self.gpu_room[g])
                self.gpu_room[g] = avail * 1000.0 / usable if usable > 0 else 0.0
                self.node_room[self.gpu_node[g]] += float(self.gpu_room[g]) - old
            return
        usable = self.gpu_usable[gpus]
        held = np.maximum(self.gpu_caps[gpus], self.gpu_used[gpus])
        avail = np.maximum(usable - held, 0)
        avail[self.gpu_unshareable[gpus]] = 0
        self.gpu_avail[gpus] = avail
        room = np.where(usable > 0, avail * 1000.0 / np.maximum(usable, 1), 0.0)
        self.gpu_room[gpus] = room.astype(np.float32)
        self.node_room = np.add.reduceat(self.gpu_room.astype(np.float64), self.node_first)

    def _apply(self, g: int, alloc: Allocation, *, notify: bool = True) -> None:
        self.allocs[g][(alloc.job_id, alloc.replica)] = alloc
        self.gpu_caps[g] += alloc.cap_mib
        self.gpu_nalloc[g] += 1
        if not alloc.allow_sharing:
            self.gpu_unshareable[g] = True
        self.job_gpus.setdefault(alloc.job_id, []).append((alloc.replica, g))
        if notify:
            self._refresh(np.array([g]))
            self._notify(np.array([self.gpu_node[g]], dtype=np.int32))

    def allocate(
        self,
        job_id: str,
        replica: int,
        gpus: list[int],
        caps: list[int],
        allow_sharing: bool,
        cpu_milli: int = 0,
        host_memory_mib: int = 0,
        node: int | None = None,
    ) -> None:
        """Give ``gpus`` (all on one node) to one replica with the given memory caps.

        The caller checked feasibility; CPU and host memory are charged to the node. A replica with no
        GPU names its ``node``.
        """
        if gpus:
            node = int(self.gpu_node[gpus[0]])
        elif node is None:
            raise ValueError("a replica without GPUs needs its node")
        else:
            self.host_only.setdefault(job_id, set()).add(replica)
        self.charges[(job_id, replica)] = (self.nodes[node].name, cpu_milli, host_memory_mib)
        self.node_cpu_used[node] += cpu_milli
        self.node_mem_used[node] += host_memory_mib
        if not self._host_free_stale:
            self.node_cpu_free[node] -= cpu_milli
            self.node_mem_free[node] -= host_memory_mib
        for g, cap in zip(gpus, caps, strict=True):
            self._apply(g, Allocation(job_id, replica, cap, allow_sharing), notify=False)
        if gpus:
            self._refresh(np.asarray(gpus, dtype=np.int64))
        self._notify(np.array([node], dtype=np.int32))

    def free(self, job_id: str, replica: int | None = None) -> list[int]:
        """Remove a job's allocations (one replica's, or all); return the GPUs touched."""
        held = self.job_gpus.get(job_id, [])
        keep, touched = [], []
        for rep, g in held:
            if replica is not None and rep != replica:
                keep.append((rep, g))
                continue
            alloc = self.allocs[g].pop((job_id, rep), None)
            if alloc is None:
                continue
            self.gpu_caps[g] -= alloc.cap_mib
            self.gpu_nalloc[g] -= 1
            if not alloc.allow_sharing:
                self.gpu_unshareable[g] = False
            touched.append(g)
        host_only = self.host_only.get(job_id, set())
        freed_host = {rep for rep in host_only if replica is None or rep == replica}
        if freed_host:
            host_only -= freed_host
            if not host_only:
                del self.host_only[job_id]
        for rep in {rep for rep, _ in held if replica is None or rep == replica} | freed_host:
            charge = self.charges.pop((job_id, rep), None)
            if charge is None:
                continue
            node, cpu, mem = charge
            n = self.node_index[node]
            self.node_cpu_used[n] -= cpu
            self.node_mem_used[n] -= mem
            if not self._host_free_stale:
                self.node_cpu_free[n] += cpu
                self.node_mem_free[n] += mem
        if keep:
            self.job_gpus[job_id] = keep
        else:
            self.job_gpus.pop(job_id, None)
        if touched:
            idx = np.asarray(touched, dtype=np.int64)
            self._refresh(idx)
            nodes = self.gpu_node[idx]
            self._notify(nodes[:1] if len(nodes) == 1 else np.unique(nodes))
        return touched

    def observe(self, g: int, used_mib: int, utilization: float) -> bool:
        """Record a GPU's observed memory use and utilisation; True if the GPU gained room."""
        before = int(self.gpu_avail[g])
        self.gpu_used[g] = used_mib
        self.gpu_util[g] = utilization
        self._refresh(np.array([g]))
        if int(self.gpu_avail[g]) != before:
            self._notify(np.array([self.gpu_node[g]], dtype=np.int32))
        return int(self.gpu_avail[g]) > before

    def _notify(self, nodes: np.ndarray) -> None:
        for listener in self.listeners:
            listener(nodes.astype(np.int32, copy=False))

    # -- checks ----------------------------------------------------------------------------------------

    def violations(self) -> list[str]:
        """Every breach of the card invariant, in words; empty when it holds."""
        out = []
        for g, gpu_allocs in enumerate(self.allocs):
            if not gpu_allocs:
                continue
            node, pos = self.gpu_device(g)
            label = f"{node.name}/gpu{node.gpus[pos].index}"
            values = list(gpu_allocs.values())
            if len(values) > 1 and not all(a.allow_sharing for a in values):
                jobs = sorted({a.job_id for a in values})
                out.append(f"{label}: a job that does not allow sharing shares the card with {jobs}")
            total = sum(a.cap_mib for a in values)
            if total > int(self.gpu_usable[g]):
                out.append(f"{label}: caps {total} MiB exceed {int(self.gpu_usable[g])} MiB allocatable")
        return out
