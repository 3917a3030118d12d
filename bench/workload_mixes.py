"""Workload mixes built from the Alibaba 2023 default trace, and the placement study over them.

The default trace is one mix of one cluster; a placement policy must hold on others (issue 17, item 1). A
mix resamples the default trace's tasks, keeping each task's own shape, so that a chosen share of the GPU
tasks is GPU-sharing (one card, ``gpu_milli`` < 1000), multi-GPU, or restricted to particular GPU models;
CPU-only tasks keep their share. Model restrictions are drawn per task: one model (weighted by its number
of GPUs) or, for a third of them, two models, among the models whose nodes can hold the task.

The study replays each mix through the placement engine alone (filter, score, commit; the same code the
scheduler's ``submit`` runs, without job records): tasks arrive with no departures, a task that does not
fit is dropped, until the arrived GPU demand reaches ``max_pct`` of the cluster's GPUs. It reads the share
of GPU capacity left unallocated at each arrived-demand level.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from guardmesh.inventory import NodeSpec, TraceTask
from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import JobSpec, Qos
from services.scheduler.placement import Policy, ReplicaShape, make_policy, place

#: Arrived-demand levels (percent of GPU capacity) read in the study.
STUDY_POINTS = (50, 60, 70, 80, 90, 100)


@dataclass(frozen=True)
class Mix:
    """How to resample the trace: target shares among GPU tasks (None keeps the trace's own share)."""

    name: str
    sharing: float | None = None
    multi_gpu: float | None = None
    constrained: float | None = None
    about: str = ""


#: The mixes the benchmark records (the default trace first).
MIXES = (
    Mix("default", about="the trace as published (no model restrictions)"),
    Mix("sharing-80", sharing=0.8, about="80% of GPU tasks share one card"),
    Mix("sharing-10", sharing=0.1, about="10% of GPU tasks share one card"),
    Mix("multi-gpu-20", multi_gpu=0.2, about="20% of GPU tasks ask 2-8 whole cards"),
    Mix("constrained-33", constrained=0.33, about="a third of GPU tasks restricted to 1-2 GPU models"),
    Mix("constrained-66", constrained=0.66, about="two thirds of GPU tasks restricted to 1-2 GPU models"),
    Mix(
        "sharing-60-constrained-33",
        sharing=0.6,
        constrained=0.33,
        about="60% sharing and a third restricted to 1-2 models",
    ),
    Mix("multi-gpu-10-constrained-50", multi_gpu=0.1, constrained=0.5, about="10% multi-GPU, half restricted"),
)


def _kind(task: TraceTask) -> str:
    if task.num_gpu == 0:
        return "cpu"
    if task.num_gpu > 1:
        return "multi"
    return "sharing" if task.gpu_milli < 1000 else "whole"


def draw_mix(mix: Mix, tasks: Sequence[TraceTask], nodes: Sequence[NodeSpec], seed: int) -> Callable[[], TraceTask]:
    """A seeded sampler of tasks of ``mix`` (draws with replacement from the trace's tasks)."""
    rng = random.Random(seed)
    pools: dict[str, list[TraceTask]] = {}
    for t in tasks:
        pools.setdefault(_kind(t), []).append(t)
    gpu_tasks = len(tasks) - len(pools.get("cpu", []))
    cpu_share = len(pools.get("cpu", [])) / len(tasks)
    # Shares among GPU tasks: the mix's targets, the rest split like the trace.
    trace_share = {k: len(pools.get(k, [])) / gpu_tasks for k in ("sharing", "whole", "multi")}
    target = {"sharing": mix.sharing, "multi": mix.multi_gpu}
    fixed = {k: v for k, v in target.items() if v is not None}
    free_keys = [k for k in ("sharing", "whole", "multi") if k not in fixed]
    rest = max(0.0, 1.0 - sum(fixed.values()))
    free_total = sum(trace_share[k] for k in free_keys) or 1.0
    share = {**fixed, **{k: rest * trace_share[k] / free_total for k in free_keys}}
    kinds = ["cpu", "sharing", "whole", "multi"]
    weights = [cpu_share] + [(1 - cpu_share) * share[k] for k in kinds[1:]]
    # Which models can hold a task of n GPUs: a node of that model with >= n GPUs.
    gpus_by_model: dict[str, int] = {}
    biggest: dict[str, int] = {}
    for n in nodes:
        for g in n.gpus:
            gpus_by_model[g.model] = gpus_by_model.get(g.model, 0) + 1
        biggest[n.gpus[0].model] = max(biggest.get(n.gpus[0].model, 0), len(n.gpus))

    def restrict(task: TraceTask) -> TraceTask:
        able = [m for m in sorted(gpus_by_model) if biggest[m] >= task.num_gpu]
        count = 2 if rng.random() < 1 / 3 and len(able) > 1 else 1
        chosen: set[str] = set()
        while len(chosen) < count:
            chosen.add(rng.choices(able, weights=[gpus_by_model[m] for m in able])[0])
        return replace(task, gpu_spec=tuple(sorted(chosen)))

    def draw() -> TraceTask:
        kind = rng.choices(kinds, weights=weights)[0]
        task = rng.choice(pools[kind])
        if kind != "cpu" and mix.constrained is not None:
            task = restrict(task) if rng.random() < mix.constrained else replace(task, gpu_spec=())
        return task

    return draw


def task_spec(task: TraceTask, job_id: str) -> JobSpec:
    """The job a trace task becomes: one replica; every job BURSTABLE, so a replay never preempts. A
    CPU-only task (num_gpu == 0) asks for no GPU: it is placed by CPU and host memory, so the CPU it takes
    on a GPU node (stranding that node's GPUs) shows in the replay."""
    single = task.num_gpu == 1
    return JobSpec(
        job_id=job_id,
        tenant="alibaba",
        replicas=1,
        gpus_per_replica=task.num_gpu,
        share_milli=None if task.num_gpu == 0 else task.gpu_milli if single else 1000,
        qos=Qos.BURSTABLE,
        allow_sharing=single and task.gpu_milli < 1000,
        allowed_models=task.gpu_spec,
        cpu_milli=task.cpu_milli,
        host_memory_mib=task.memory_mib,
    )


def place_and_commit(state: ClusterState, spec: JobSpec, shape: ReplicaShape, policy: Policy) -> bool:
    """Show ``shape`` to ``policy``, place one replica of ``spec`` and commit it into ``state`` (replica 0).

    Only the cluster state changes (no job records, events or snapshots: those are the service's). True when
    the replica was placed, False when no node fits.
    """
    policy.observe(shape)
    choice = place(state, shape, policy)
    if choice is None:
        return False
    state.allocate(
        spec.job_id,
        0,
        list(choice.gpus),
        list(choice.caps),
        shape.allow_sharing,
        shape.cpu_milli,
        shape.host_memory_mib,
        node=choice.node,
    )
    return True


def unallocated_curve(
    policy: str, nodes: Sequence[NodeSpec], draw: Callable[[], TraceTask], max_pct: int = 100
) -> dict[int, float]:
    """One replay: unallocated share of GPU capacity at each of :data:`STUDY_POINTS` up to ``max_pct``."""
    state = ClusterState(0)
    state.set_nodes(list(nodes))
    pol = make_policy(policy)
    pol.attach(state)
    capacity = 1000 * state.gpu_count
    arrived = 0
    points = [p for p in STUDY_POINTS if p <= max_pct]
    curve: dict[int, float] = {}
    i = 0
    while points and arrived * 100 < points[-1] * capacity:
        task = draw()
        spec = task_spec(task, f"t{i}")
        place_and_commit(state, spec, ReplicaShape.of(spec), pol)
        i += 1
        arrived += task.num_gpu * (task.gpu_milli if task.num_gpu == 1 else 1000)
        for p in points:
            if p not in curve and arrived * 100 >= p * capacity:
                curve[p] = float(state.gpu_room.sum(dtype=np.float64) / capacity)
    return curve


def study(
    mixes: Sequence[Mix],
    policies: Sequence[str],
    tasks: Sequence[TraceTask],
    nodes: Sequence[NodeSpec],
    seeds: Sequence[int],
    max_pct: int = 100,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every mix x policy x seed; per mix and policy the mean and spread of the unallocated share."""
    out: dict[str, Any] = {}
    for mix in mixes:
        runs: dict[str, list[dict[int, float]]] = {}
        for policy in policies:
            # The same draws for every policy of a seed: the policies see the same tasks in the same order.
            runs[policy] = [unallocated_curve(policy, nodes, draw_mix(mix, tasks, nodes, s), max_pct) for s in seeds]
        summary: dict[str, dict[str, dict[str, Any]]] = {}
        for policy, curves in runs.items():
            summary[policy] = {
                str(p): {
                    "mean": statistics.fmean(c[p] for c in curves),
                    "stdev": statistics.stdev(c[p] for c in curves) if len(curves) > 1 else 0.0,
                    "min": min(c[p] for c in curves),
                    "max": max(c[p] for c in curves),
                    "per_seed": [c[p] for c in curves],
                }
                for p in curves[0]
            }
        out[mix.name] = {"about": mix.about, "mix": mix.__dict__, "unallocated_share": summary}
        if progress is not None:
            top = str(max_pct)
            progress(
                f"{mix.name:<28} "
                + "  ".join(
                    f"{p} {100 * summary[p][top]['mean']:5.2f}±{100 * summary[p][top]['stdev']:.2f}" for p in policies
                )
            )
    return out
