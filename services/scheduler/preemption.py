"""Preemption: the fewest victims whose eviction lets a guaranteed job's replicas fit.

Everything here reads the cluster state and never changes it. A multi-replica job is simulated on a copy
(:meth:`ClusterState.simulation`): no listener of the live state fires, no replica id is invented, no node
is marked dead, and nothing needs undoing if the search raises.

The search, for one replica:

* a node is a candidate when the replica would fit there with every eligible victim on it gone;
* on each candidate node the victim sets are tried by size (0, 1, 2, ...), and within a size in victim
  order (already-preempting jobs are free, then best-effort before burstable, low priority, newest), so
  the first set that fits is the smallest and, among the smallest, the cheapest;
* the exact enumeration stops after :data:`EXACT_SETS_PER_NODE` sets on a node; beyond that bound the
  fallback is greedy: add victims in victim order until the replica fits, then drop every chosen victim
  that is not needed (most valuable first), so the result is minimal by inclusion though maybe not in size;
* across nodes the smallest set wins; ties go to the set whose most valuable victim is least valuable.

A replica whose victims span several jobs on one node never evicts a job on another node: the set is per
node, because a replica runs on one node. A victim job's allocations on other nodes are freed with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import combinations

import numpy as np

from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import Topology
from services.scheduler.placement import ReplicaShape, caps_for, could_host, model_mask, selector_mask

#: Victim sets examined exactly on one node before the greedy fallback (C(12, 3) = 220, C(16, 4) = 1,820).
EXACT_SETS_PER_NODE = 2048

#: Victim order key of a job id: lower is evicted first; element 0 is 0 for an already-preempting job.
VictimOrder = Callable[[str], tuple[int, ...]]


HostHeld = dict[str, dict[int, tuple[int, int]]]


def host_held(state: ClusterState, jobs: Iterable[str]) -> HostHeld:
    """CPU milli and host MiB each of ``jobs`` holds, by node."""
    wanted = set(jobs)
    out: HostHeld = {}
    for (job_id, _), (where, cpu, mem) in state.charges.items():
        if job_id in wanted:
            per_node = out.setdefault(job_id, {})
            n = state.node_index[where]
            c, m = per_node.get(n, (0, 0))
            per_node[n] = (c + cpu, m + mem)
    return out


def fits_without(
    state: ClusterState, shape: ReplicaShape, node: int, gone: Iterable[str], held_host: HostHeld | None = None
) -> bool:
    """Would one replica of ``shape`` fit on ``node`` if the jobs ``gone`` held nothing? (Pure.)

    The same rules as the placement filter (``placement.feasible_gpus``): memory after the larger of the
    caps and the observed use, cards held by a job that does not allow sharing, allowed models, the
    selector, the node's CPU and host memory, and a required topology group. ``held_host`` (from
    :func:`host_held`) saves a scan of the charges when called many times.
    """
    gone = list(gone)
    if held_host is None:
        held_host = host_held(state, gone)
    first = int(state.node_first[node])
    count = int(state.node_ngpu[node])
    caps_held = state.gpu_caps[first : first + count].copy()
    nalloc = state.gpu_nalloc[first : first + count].copy()
    unshareable = state.gpu_unshareable[first : first + count].copy()
    cpu_free = int(state.node_cpu[node] - state.node_cpu_used[node])
    mem_free = int(state.node_mem[node] - state.node_mem_used[node])
    for job_id in gone:
        for replica, g in state.job_gpus.get(job_id, ()):
            if not first <= g < first + count:
                continue
            alloc = state.allocs[g].get((job_id, replica))
            if alloc is None:
                continue
            caps_held[g - first] -= alloc.cap_mib
            nalloc[g - first] -= 1
            if not alloc.allow_sharing:
                unshareable[g - first] = False
        cpu, mem = held_host.get(job_id, {}).get(node, (0, 0))
        cpu_free += cpu
        mem_free += mem
    if not selector_mask(state, shape)[node] or cpu_free < shape.cpu_milli or mem_free < shape.host_memory_mib:
        return False
    if shape.gpus == 0:
        return True
    usable = state.gpu_usable[first : first + count]
    held = np.maximum(caps_held, state.gpu_used[first : first + count])
    avail = np.where(unshareable, 0, np.maximum(usable - held, 0))
    ok = (avail >= caps_for(state, shape)[first : first + count]) & model_mask(state, shape)[first : first + count]
    if not shape.allow_sharing:
        ok &= nalloc == 0
    if shape.topology == Topology.REQUIRED and shape.gpus > 1:
        groups = state.gpu_group[first : first + count][ok]
        return bool(groups.size) and int(np.bincount(groups).max()) >= shape.gpus
    return int(ok.sum()) >= shape.gpus


def victims_by_node(state: ClusterState, eligible: set[str]) -> dict[int, list[str]]:
    """Eligible jobs by the nodes where they hold GPUs or CPU and host memory."""
    out: dict[int, set[str]] = {}
    for job_id in eligible:
        for _, g in state.job_gpus.get(job_id, ()):
            out.setdefault(int(state.gpu_node[g]), set()).add(job_id)
    for (job_id, _), (where, _, _) in state.charges.items():
        if job_id in eligible:
            out.setdefault(state.node_index[where], set()).add(job_id)
    return {n: sorted(js) for n, js in out.items()}


#: Whether a replica fits on a node with the given jobs gone (``fits_without`` bound to one search).
Fits = Callable[[int, list[str]], bool]


def _prune(fits: Fits, node: int, chosen: list[str], order: VictimOrder) -> list[str]:
    """Drop every victim not needed for the fit, the most valuable first (minimal by inclusion)."""
    kept = list(chosen)
    for vid in sorted(chosen, key=order, reverse=True):
        trial = [v for v in kept if v != vid]
        if fits(node, trial):
            kept = trial
    return kept


def _on_node(fits: Fits, node: int, victims: list[str], order: VictimOrder, limit: int) -> list[str] | None:
    """The smallest (then cheapest) victim set on ``node`` with at most ``limit`` new victims, or None."""
    if not fits(node, victims):
        return None
    free = [v for v in victims if order(v)[0] == 0]  # already preempting: costs nothing more
    paid = sorted((v for v in victims if order(v)[0] != 0), key=order)
    examined = 0
    for size in range(min(limit, len(paid)) + 1):
        for combo in combinations(paid, size):
            examined += 1
            if examined > EXACT_SETS_PER_NODE:
                return _greedy(fits, node, free, paid, order, limit)
            if fits(node, [*free, *combo]):
                return _prune(fits, node, [*free, *combo], order)
    return None


def _greedy(
    fits: Fits, node: int, free: list[str], paid: list[str], order: VictimOrder, limit: int
) -> list[str] | None:
    """Fallback beyond the exact bound: victims in order until it fits, then prune."""
    chosen = list(free)
    for vid in paid:
        chosen.append(vid)
        if fits(node, chosen):
            kept = _prune(fits, node, chosen, order)
            return kept if sum(1 for v in kept if order(v)[0] != 0) <= limit else None
    return None


def fewest_victims(
    state: ClusterState, shape: ReplicaShape, eligible: Iterable[str], order: VictimOrder
) -> list[str] | None:
    """The smallest set of ``eligible`` jobs whose eviction lets one replica of ``shape`` fit on one node.

    None when no such set exists. Already-preempting jobs (``order(v)[0] == 0``) do not count toward the
    size. See the module docstring for the search and its fallback.
    """
    eligible = set(eligible)
    held = host_held(state, eligible)

    def fits(node: int, gone: list[str]) -> bool:
        return fits_without(state, shape, node, gone, held)

    best: tuple[tuple[int, list[tuple[int, ...]]], list[str]] | None = None
    possible = could_host(state, shape)  # a node too small even when empty needs no search
    for node, victims in sorted(victims_by_node(state, eligible).items()):
        if not possible[node]:
            continue
        limit = best[0][0] if best is not None else len(victims)
        chosen = _on_node(fits, node, victims, order, limit)
        if chosen is None:
            continue
        paid = [v for v in chosen if order(v)[0] != 0]
        key = (len(paid), sorted((order(v) for v in paid), reverse=True))
        if best is None or key < best[0]:
            best = (key, chosen)
            if not paid:
                break
    return best[1] if best is not None else None
