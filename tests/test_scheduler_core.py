"""Unit tests of the scheduler's pure core: placement policies, FGD kernels, invariant, gangs, topology,
preemption, leases, durability, validation and scale signals. No gRPC; a fake clock drives time."""

from __future__ import annotations

import contextlib
import math
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from guardmesh.config import SchedulerSettings
from guardmesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from guardmesh.inventory import GpuDevice, NodeSpec, uniform_node
from native import fragmentation as frag  # type: ignore[attr-defined]
from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import HOLDS_ALLOCATION, TERMINAL, EventKind, JobSpec, JobState, Qos, Topology
from services.scheduler.placement import ReplicaShape, make_policy, place_replica
from services.scheduler.scaling import NodeShape, ScaleDirection
from services.scheduler.scheduler import Scheduler
from services.scheduler.store import Store

T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_settings(**kw: Any) -> SchedulerSettings:
    base: dict[str, Any] = {
        "gpu_reserve_mib": 0,
        "lease_ttl_s": 3600,
        "preemption_grace_s": 10.0,
        "policy": "first-fit",
        "scale_window_s": 10.0,
    }
    base.update(kw)
    return SchedulerSettings(**base)


def make_sched(
    nodes: list[NodeSpec], *, store: Store | None = None, clock: FakeClock | None = None, **kw: Any
) -> tuple[Scheduler, FakeClock]:
    clock = clock or FakeClock()
    sched = Scheduler(make_settings(**kw), store, clock=clock)
    if nodes:
        sched.register_nodes(nodes)
    return sched, clock


def spec(
    job_id: str,
    *,
    gpus: int = 1,
    replicas: int = 1,
    mem: int | None = None,
    share: int | None = None,
    **kw: Any,
) -> JobSpec:
    if mem is None and share is None:
        share = 1000
    kw.setdefault("tenant", "team-a")
    return JobSpec(
        job_id=job_id, replicas=replicas, gpus_per_replica=gpus, memory_mib_per_gpu=mem, share_milli=share, **kw
    )


def held(sched: Scheduler, job_id: str) -> set[tuple[str, int]]:
    """(node, gpu index) pairs on which ``job_id`` holds an allocation, read from list_nodes."""
    out = set()
    for nv in sched.list_nodes():
        for g in nv.gpus:
            if any(a[0] == job_id for a in g.allocations):
                out.add((nv.spec.name, g.index))
    return out


def state_of(sched: Scheduler) -> tuple[Any, ...]:
    """Everything a caller can observe: jobs, nodes, events, pending set."""
    return (sched.list_jobs(), sched.list_nodes(), sched.events_after(0, 10_000), sorted(sched.pending))


def independent_violations(sched: Scheduler) -> list[str]:
    """The card invariant and job/allocation consistency, checked from the public views only."""
    out = []
    reserve = sched.settings.gpu_reserve_mib
    allocs: dict[str, set[tuple[str, int, int, bool]]] = {}
    for nv in sched.list_nodes():
        for g in nv.gpus:
            label = f"{nv.spec.name}/{g.index}"
            if len(g.allocations) > 1 and not all(a[3] for a in g.allocations):
                out.append(f"{label}: exclusive allocation shares the card: {g.allocations}")
            total = sum(a[2] for a in g.allocations)
            if total > g.memory_mib - reserve:
                out.append(f"{label}: caps {total} > {g.memory_mib - reserve}")
            for jid, rep, cap, shared in g.allocations:
                allocs.setdefault(jid, set()).add((g.uuid, rep, cap, shared))
    for job in sched.list_jobs():
        expected: set[tuple[str, int, int, bool]] = set()
        if job.state in HOLDS_ALLOCATION:
            expected = {
                (gr.uuid, r, gr.memory_cap_mib, job.spec.allow_sharing)
                for r, rp in job.placements.items()
                for gr in rp.gpus
            }
            if job.spec.gang and len(job.placements) != job.spec.replicas:
                out.append(f"gang {job.job_id} holds {len(job.placements)} of {job.spec.replicas} replicas")
        got = allocs.pop(job.job_id, set())
        if got != expected:
            out.append(f"{job.job_id} ({job.state.name}): allocations {sorted(got)} != placements {sorted(expected)}")
        if job.state == JobState.PENDING and not job.pending_reason:
            out.append(f"{job.job_id}: pending without a reason")
    if allocs:
        out.append(f"allocations of unknown jobs: {sorted(allocs)}")
    return out


# --------------------------------------------------------------------------------------------------------
# Policies on hand-built clusters
# --------------------------------------------------------------------------------------------------------


def cluster(*nodes: NodeSpec, reserve: int = 0) -> ClusterState:
    state = ClusterState(reserve)
    state.set_nodes(list(nodes))
    return state


def bound(name: str, state: ClusterState) -> Any:
    policy = make_policy(name)
    policy.attach(state)
    return policy


def shape(**kw: Any) -> ReplicaShape:
    return ReplicaShape.of(spec("probe", **kw))


def test_first_fit_takes_lowest_index_and_best_fit_the_fuller_node() -> None:
    # node-a idle; node-b has gpu0 held by an exclusive job.
    for name, expected in (("first-fit", 0), ("best-fit", 3)):
        state = cluster(uniform_node("node-a", "A", 2, 16000), uniform_node("node-b", "A", 2, 16000))
        policy = bound(name, state)
        state.allocate("busy", 0, [2], [16000], allow_sharing=False)
        choice = place_replica(state, shape(), policy)
        assert choice is not None
        assert choice.gpus == (expected,), name
    # First-fit keeps walking the inventory in order.
    state = cluster(uniform_node("node-a", "A", 2, 16000), uniform_node("node-b", "A", 2, 16000))
    policy = bound("first-fit", state)
    taken = []
    for i in range(4):
        choice = place_replica(state, shape(), policy)
        assert choice is not None
        state.allocate(f"j{i}", 0, list(choice.gpus), list(choice.caps), allow_sharing=False)
        taken.append(choice.gpus[0])
    assert taken == [0, 1, 2, 3]
    assert place_replica(state, shape(), policy) is None


def test_best_fit_packs_shared_job_onto_the_fuller_card() -> None:
    for name, expected in (("best-fit", 1), ("first-fit", 0)):
        state = cluster(uniform_node("node-a", "A", 2, 10000))
        policy = bound(name, state)
        state.allocate("pre", 0, [1], [4000], allow_sharing=True)
        choice = place_replica(state, shape(share=300, allow_sharing=True), policy)
        assert choice is not None
        assert choice.gpus == (expected,), name
        assert choice.caps == (3000,)


def fgd_trained_state(policy_name: str) -> tuple[ClusterState, Any]:
    """One node with two 10,000 MiB cards; card 0 holds a 40% shared job (room 600), card 1 is idle."""
    state = cluster(uniform_node("node-a", "A", 2, 10000))
    policy = bound(policy_name, state)
    state.allocate("pre", 0, [0], [4000], allow_sharing=True)
    # The workload: jobs that take 60% of a card (shared).
    for _ in range(100):
        policy.observe(shape(share=600, allow_sharing=True))
    if policy_name == "fgd":
        policy.rebuild()
    return state, policy


def test_fgd_avoids_fragmenting_where_best_fit_does() -> None:
    """Placing a 5% job: on card 0 (room 600 -> 550) the 60% class no longer fits there, so the node's
    expected fragmentation grows by 550 (more than half of FGD's comparison step of 1,000); on card 1 (room
    1000 -> 950) it still fits, growth 0. FGD picks card 1; best-fit packs onto the fuller card 0."""
    small = shape(share=50, allow_sharing=True)
    big = shape(share=600, allow_sharing=True)
    outcomes: dict[str, Any] = {}
    for name in ("fgd", "best-fit"):
        state, policy = fgd_trained_state(name)
        choice = place_replica(state, small, policy)
        assert choice is not None
        outcomes[name] = choice.gpus
        state.allocate("small", 0, list(choice.gpus), list(choice.caps), allow_sharing=True)
        placed_big = 0
        for i in range(2):
            c = place_replica(state, big, policy)
            if c is None:
                break
            state.allocate(f"big{i}", 0, list(c.gpus), list(c.caps), allow_sharing=True)
            placed_big += 1
        outcomes[name + ":big"] = placed_big
        assert state.violations() == []
    assert outcomes["best-fit"] == (0,)
    assert outcomes["fgd"] == (1,)
    # FGD's choice leaves room for two jobs of the popular class; best-fit's for only one.
    assert outcomes["fgd:big"] == 2
    assert outcomes["best-fit:big"] == 1


def test_fgd_score_matches_definition_on_the_example() -> None:
    state, policy = fgd_trained_state("fgd")
    cands = np.array([0, 1], dtype=np.int64)
    take = np.array([300.0, 300.0], dtype=np.float32)
    scores = policy.fragmentation_growth(state, cands, take)
    assert scores[0] == pytest.approx(1.0 * 300, abs=1e-3)
    assert scores[1] == pytest.approx(0.0, abs=1e-3)


# --------------------------------------------------------------------------------------------------------
# Native kernels against a pure-Python reference
# --------------------------------------------------------------------------------------------------------


def f32(x: float | np.floating[Any]) -> float:
    return float(np.float32(x))


def ref_node_fragmentation(rooms: list[float], models: list[int], d: np.ndarray, k: np.ndarray, p: np.ndarray) -> float:
    """The .pyx definition, slowly: per class, sum of r over GPUs that cannot serve it, or over all GPUs
    when fewer than k of them can; nothing when every GPU is of a model it can never use (d > 1000);
    weighted by popularity."""
    total = sum(rooms)
    acc = 0.0
    for c in range(d.shape[0]):
        if all(float(d[c, m]) > 1000.5 for m in models):
            continue
        serving = [j for j in range(len(rooms)) if rooms[j] >= float(d[c, models[j]])]
        if len(serving) < int(k[c]):
            frag_c = total
        else:
            frag_c = sum(rooms[j] for j in range(len(rooms)) if rooms[j] < float(d[c, models[j]]))
        acc += float(p[c]) * frag_c
    return acc


@st.composite
def frag_cases(draw: st.DrawFn) -> dict[str, Any]:
    nmodels = draw(st.integers(1, 3))
    ngpu = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    total = sum(ngpu)
    room = st.one_of(st.integers(0, 1000).map(float), st.floats(0, 1000, width=32, allow_nan=False))
    r = np.array(draw(st.lists(room, min_size=total, max_size=total)), dtype=np.float32)
    gpu_model = np.array(draw(st.lists(st.integers(0, nmodels - 1), min_size=total, max_size=total)), dtype=np.int32)
    nc = draw(st.integers(1, 5))
    d = np.array([[draw(st.integers(1, 1001)) for _ in range(nmodels)] for _ in range(nc)], dtype=np.float32).reshape(
        nc, nmodels
    )
    k = np.array(draw(st.lists(st.integers(1, 4), min_size=nc, max_size=nc)), dtype=np.int32)
    raw_p = draw(st.lists(st.floats(0.01, 1.0), min_size=nc, max_size=nc))
    p = (np.array(raw_p) / sum(raw_p)).astype(np.float32)
    cands = sorted(draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=total, unique=True)))
    takes = draw(
        st.lists(
            st.one_of(st.integers(0, 1000).map(float), st.floats(0, 1000, width=32, allow_nan=False)),
            min_size=len(cands),
            max_size=len(cands),
        )
    )
    node_ngpu = np.array(ngpu, dtype=np.int32)
    node_first = (np.cumsum(node_ngpu) - node_ngpu).astype(np.int32)
    gpu_node = np.repeat(np.arange(len(ngpu), dtype=np.int32), node_ngpu)
    return {
        "r": r,
        "gpu_model": gpu_model,
        "d": d,
        "k": k,
        "p": p,
        "node_ngpu": node_ngpu,
        "node_first": node_first,
        "gpu_node": gpu_node,
        "cand": np.array(cands, dtype=np.int64),
        "take": np.array(takes, dtype=np.float32),
    }


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frag_cases())
def test_native_kernels_match_python_reference(case: dict[str, Any]) -> None:
    r, gpu_model, d, k, p = case["r"], case["gpu_model"], case["d"], case["k"], case["p"]
    node_first, node_ngpu, gpu_node = case["node_first"], case["node_ngpu"], case["gpu_node"]
    n, nc = node_ngpu.shape[0], d.shape[0]

    count_fit = np.zeros((n, nc), dtype=np.int32)
    sum_frag = np.zeros((n, nc), dtype=np.float32)
    sum_r = np.zeros(n, dtype=np.float32)
    frag.refresh_nodes(r, gpu_model, node_first, node_ngpu, np.arange(n, dtype=np.int32), d, count_fit, sum_frag, sum_r)

    def node_slice(i: int) -> slice:
        return slice(int(node_first[i]), int(node_first[i] + node_ngpu[i]))

    for i in range(n):
        rooms = [float(x) for x in r[node_slice(i)]]
        models = [int(m) for m in gpu_model[node_slice(i)]]
        assert sum_r[i] == pytest.approx(sum(rooms), abs=1e-2)
        for c in range(nc):
            fits = [rooms[j] >= float(d[c, models[j]]) for j in range(len(rooms))]
            never = all(float(d[c, m]) > 1000.5 for m in models)
            assert count_fit[i, c] == (-1 if never else sum(fits))
            assert sum_frag[i, c] == pytest.approx(sum(x for x, f in zip(rooms, fits, strict=True) if not f), abs=1e-2)
        native = frag.node_fragmentation(
            np.ascontiguousarray(r[node_slice(i)]), np.ascontiguousarray(gpu_model[node_slice(i)]), d, k, p
        )
        assert native == pytest.approx(ref_node_fragmentation(rooms, models, d, k, p), abs=2e-2, rel=1e-5)

    out = np.full(case["cand"].shape[0], np.nan, dtype=np.float32)
    frag.single_gpu_delta(case["cand"], case["take"], r, gpu_node, gpu_model, d, k, p, count_fit, sum_frag, sum_r, out)
    for i, g in enumerate(case["cand"].tolist()):
        node = int(gpu_node[g])
        sl = node_slice(node)
        rooms = [float(x) for x in r[sl]]
        models = [int(m) for m in gpu_model[sl]]
        after = list(rooms)
        pos = g - int(node_first[node])
        # The kernel subtracts in float32 and clamps at 0; do the same so threshold comparisons agree.
        after[pos] = max(f32(np.float32(rooms[pos]) - np.float32(case["take"][i])), 0.0)
        expected = ref_node_fragmentation(after, models, d, k, p) - ref_node_fragmentation(rooms, models, d, k, p)
        assert float(out[i]) == pytest.approx(expected, abs=2e-2, rel=1e-5), (g, case["take"][i])


# --------------------------------------------------------------------------------------------------------
# The card invariant under random operation sequences
# --------------------------------------------------------------------------------------------------------


def random_spec(rng: random.Random, i: int) -> JobSpec:
    gpus = rng.choice([1, 1, 1, 2, 2, 3])
    kw: dict[str, Any] = {
        "gpus": gpus,
        "replicas": rng.choice([1, 1, 2, 3]),
        "allow_sharing": rng.random() < 0.5,
        "qos": rng.choice([Qos.GUARANTEED, Qos.BURSTABLE, Qos.BURSTABLE, Qos.BEST_EFFORT, Qos.BEST_EFFORT]),
        "priority": rng.randint(-5, 5),
        "gang": rng.random() < 0.3,
        "topology": rng.choice(list(Topology)),
        "allowed_models": rng.choice([(), (), ("A",), ("B",), ("A", "B")]),
        "lease_ttl_s": rng.choice([0, 20, 60]),
    }
    if rng.random() < 0.5:
        kw["mem"] = rng.choice([2000, 5000, 8000, 15000, 20000])
    elif gpus == 1:
        kw["share"] = rng.choice([100, 250, 500, 700, 1000])
    else:
        kw["share"] = 1000
    return spec(f"j{i}", **kw)


@pytest.mark.parametrize(("policy", "seed"), [("fgd", 1), ("best-fit", 2), ("first-fit", 3), ("fgd", 4)])
def test_card_invariant_holds_under_random_operations(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    nodes = [
        uniform_node("node-a", "A", 4, 16384, group_size=2),
        uniform_node("node-b", "A", 2, 16384),
        uniform_node("node-c", "B", 2, 24576, group_size=1),
    ]
    sched, clock = make_sched(nodes, policy=policy, gpu_reserve_mib=512, lease_ttl_s=30, preemption_grace_s=5.0)
    counter = 0
    kinds_seen: set[EventKind] = set()
    for step in range(250):
        op = rng.random()
        jobs = sched.list_jobs()
        live = [j for j in jobs if j.state not in TERMINAL]
        if op < 0.40:
            counter += 1
            with contextlib.suppress(InvalidArgument):
                sched.submit(random_spec(rng, counter))
        elif op < 0.55 and live:
            sched.release(rng.choice(live).job_id)
        elif op < 0.75:
            for j in jobs:
                if j.state in HOLDS_ALLOCATION and rng.random() < 0.7:
                    for r in j.placements:
                        sched.renew(j.job_id, r)
            clock.advance(rng.uniform(0, 12))
            sched.tick()
        elif op < 0.85:
            # Workers stay within their caps; an idle card reports nothing in use.
            nv = rng.choice(sched.list_nodes())
            usage = [(g.uuid, rng.randint(0, sum(a[2] for a in g.allocations)), rng.random()) for g in nv.gpus]
            sched.report_node_status(nv.spec.name, usage)
        else:
            clock.advance(rng.uniform(0, 40))
            sched.tick()
        assert sched.violations() == [], f"step {step}"
        assert independent_violations(sched) == [], f"step {step}"
        kinds_seen |= {e.kind for e in sched.events_after(0, 10_000)}
    # The sequence really exercised the interesting paths.
    assert {EventKind.PLACED, EventKind.PENDING, EventKind.RELEASED, EventKind.LEASE_EXPIRED} <= kinds_seen
    assert EventKind.PREEMPTION_NOTICE in kinds_seen


# --------------------------------------------------------------------------------------------------------
# Gangs
# --------------------------------------------------------------------------------------------------------


def two_by_four() -> list[NodeSpec]:
    return [uniform_node("node-a", "A", 4, 16000), uniform_node("node-b", "A", 4, 16000)]


def test_gang_that_does_not_fit_holds_nothing() -> None:
    sched, _ = make_sched(two_by_four())
    sched.submit(spec("filler", replicas=3))  # node-a gpus 0..2
    before_nodes = sched.list_nodes()
    job = sched.submit(spec("gang", replicas=3, gpus=2, gang=True))
    assert job.state == JobState.PENDING
    assert job.placements == {}
    assert "gang" in job.pending_reason and "2 of 3" in job.pending_reason
    assert held(sched, "gang") == set()
    assert sched.list_nodes() == before_nodes
    assert [e.kind for e in sched.events_after(0, job_id="gang")] == [EventKind.PENDING]
    # Room appears: the whole gang lands at once.
    sched.release("filler")
    job = sched.describe("gang")
    assert job.state == JobState.RUNNING
    assert sorted(job.placements) == [0, 1, 2]
    assert len(held(sched, "gang")) == 6
    assert sched.violations() == []


def test_two_large_gangs_never_deadlock() -> None:
    sched, _ = make_sched(two_by_four())
    a = sched.submit(spec("gang-a", replicas=3, gpus=2, gang=True))
    b = sched.submit(spec("gang-b", replicas=3, gpus=2, gang=True))
    assert a.state == JobState.RUNNING and len(a.placements) == 3
    assert b.state == JobState.PENDING and b.placements == {}
    assert held(sched, "gang-b") == set()
    sched.release("gang-a")
    b = sched.describe("gang-b")
    assert b.state == JobState.RUNNING and len(b.placements) == 3
    assert held(sched, "gang-a") == set()
    assert independent_violations(sched) == []


def test_two_large_gangs_submitted_concurrently() -> None:
    sched, _ = make_sched(two_by_four())
    barrier = threading.Barrier(2)
    results: dict[str, JobState] = {}

    def submit(job_id: str) -> None:
        barrier.wait()
        results[job_id] = sched.submit(spec(job_id, replicas=3, gpus=2, gang=True)).state

    threads = [threading.Thread(target=submit, args=(j,)) for j in ("gang-a", "gang-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results.values()) == [JobState.PENDING, JobState.RUNNING]
    winner = next(j for j, s in results.items() if s == JobState.RUNNING)
    loser = next(j for j, s in results.items() if s == JobState.PENDING)
    assert held(sched, loser) == set()
    sched.release(winner)
    assert sched.describe(loser).state == JobState.RUNNING
    assert independent_violations(sched) == []


def test_shared_gang_that_fits_on_one_card_is_accepted() -> None:
    """Four 25% shared replicas fit on one card (a non-gang job with the same shape runs there), so the
    gang is not 'larger than the cluster' and must not be rejected."""
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 10000)])
    plain = sched.submit(spec("plain", replicas=4, share=250, allow_sharing=True))
    assert plain.state == JobState.RUNNING and len(plain.placements) == 4
    sched.release("plain")
    job = sched.submit(spec("gang", replicas=4, share=250, allow_sharing=True, gang=True))
    assert job.state == JobState.RUNNING
    assert len(job.placements) == 4


# --------------------------------------------------------------------------------------------------------
# Topology and pending reasons
# --------------------------------------------------------------------------------------------------------


def split_groups_node() -> NodeSpec:
    """node-a: four cards in groups {0, 1} and {2, 3}; cards 0 and 2 are of model Z, so the only model-A
    cards (1 and 3) lie in different groups."""
    return NodeSpec(
        "node-a",
        tuple(
            GpuDevice(i, f"GPU-node-a-{i}", "Z" if i in (0, 2) else "A", 16000, f"node-a/nvl{i // 2}") for i in range(4)
        ),
    )


@pytest.mark.parametrize("policy", ["first-fit", "best-fit", "fgd"])
def test_two_gpu_replica_lands_inside_one_topology_group(policy: str) -> None:
    nodes = [split_groups_node(), uniform_node("node-b", "A", 4, 16000, group_size=2)]
    sched, _ = make_sched(nodes, policy=policy)
    job = sched.submit(spec("pair", gpus=2, allowed_models=("A",)))
    assert job.state == JobState.RUNNING
    rp = job.placements[0]
    assert rp.node == "node-b"
    assert len({g.topology_group for g in rp.gpus}) == 1, rp.gpus
    # Without a topology preference first-fit takes the first node that has two cards (spanning groups).
    if policy == "first-fit":
        none = sched.submit(spec("none", gpus=2, allowed_models=("A",), topology=Topology.NONE))
        assert none.placements[0].node == "node-a"
        assert {g.index for g in none.placements[0].gpus} == {1, 3}


def test_required_topology_stays_pending_while_preferred_spans() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 4, 16000, group_size=2)])
    for i in range(3):
        sched.submit(spec(f"x{i}"))  # gpus 0, 1, 2
    sched.release("x1")  # free: gpu1 (nvl0) and gpu3 (nvl1)
    req = sched.submit(spec("req", gpus=2, topology=Topology.REQUIRED))
    assert req.state == JobState.PENDING
    assert "topology group" in req.pending_reason
    assert "best candidate node-a has 1" in req.pending_reason
    assert held(sched, "req") == set()
    # Ranked ahead of the waiting REQUIRED job (a later equal-priority job would queue behind it).
    pref = sched.submit(spec("pref", gpus=2, topology=Topology.PREFERRED, priority=1))
    assert pref.state == JobState.RUNNING
    assert {g.index for g in pref.placements[0].gpus} == {1, 3}
    assert len({g.topology_group for g in pref.placements[0].gpus}) == 2
    assert sched.describe("req").state == JobState.PENDING
    # Free a whole group: REQUIRED lands inside it.
    sched.release("pref")
    sched.release("x2")
    req = sched.describe("req")
    assert req.state == JobState.RUNNING
    assert {g.index for g in req.placements[0].gpus} == {2, 3}
    assert {g.topology_group for g in req.placements[0].gpus} == {"node-a/nvl1"}


def test_pending_reason_names_best_candidate_node() -> None:
    sched, _ = make_sched([uniform_node("node-w", "A", 2, 16000), uniform_node("node-x", "A", 2, 16000)])
    for i in range(3):
        sched.submit(spec(f"x{i}"))  # node-w 0, 1; node-x 0
    job = sched.submit(spec("two", gpus=2))
    assert job.state == JobState.PENDING
    assert "best candidate node-x has 1" in job.pending_reason
    assert "2 idle GPUs" in job.pending_reason
    ev = sched.events_after(0, job_id="two")
    assert [e.kind for e in ev] == [EventKind.PENDING]
    assert "best candidate node-x has 1" in ev[0].message


# --------------------------------------------------------------------------------------------------------
# QoS preemption
# --------------------------------------------------------------------------------------------------------


def test_guaranteed_job_preempts_fewest_victims_on_one_node_after_grace() -> None:
    nodes = [uniform_node(n, "A", 2, 16000) for n in ("node-a", "node-b", "node-c")]
    sched, clock = make_sched(nodes, preemption_grace_s=10.0)
    sched.submit(spec("be-a0", qos=Qos.BEST_EFFORT))
    sched.submit(spec("be-a1", qos=Qos.BEST_EFFORT))
    sched.submit(spec("be-b", gpus=2, qos=Qos.BEST_EFFORT))
    sched.submit(spec("bu-c", gpus=2, qos=Qos.BURSTABLE))
    assert held(sched, "be-a0") | held(sched, "be-a1") == {("node-a", 0), ("node-a", 1)}
    assert held(sched, "be-b") == {("node-b", 0), ("node-b", 1)}
    assert held(sched, "bu-c") == {("node-c", 0), ("node-c", 1)}

    g = sched.submit(spec("guar", gpus=2, qos=Qos.GUARANTEED))
    assert g.state == JobState.PENDING
    assert g.awaiting_victims == {"be-b"}
    states = {j.job_id: j.state for j in sched.list_jobs()}
    assert states == {
        "be-a0": JobState.RUNNING,
        "be-a1": JobState.RUNNING,
        "be-b": JobState.PREEMPTING,
        "bu-c": JobState.RUNNING,
        "guar": JobState.PENDING,
    }
    victim = sched.describe("be-b")
    assert victim.preempted_by == "guar"
    assert victim.preemption_deadline == pytest.approx(clock() + 10.0)
    notices = [e for e in sched.events_after(0) if e.kind == EventKind.PREEMPTION_NOTICE]
    assert [e.job_id for e in notices] == ["be-b"]
    # The victim keeps its cards through the grace period and can still renew (learning it is preempting).
    assert held(sched, "be-b") == {("node-b", 0), ("node-b", 1)}
    assert held(sched, "guar") == set()
    assert sched.renew("be-b", 0).state == JobState.PREEMPTING
    clock.advance(9.0)
    sched.tick()
    assert sched.describe("be-b").state == JobState.PREEMPTING
    assert held(sched, "be-b") == {("node-b", 0), ("node-b", 1)}
    assert sched.violations() == []
    clock.advance(1.5)
    sched.tick()
    assert sched.describe("be-b").state == JobState.PREEMPTED
    assert [e.kind for e in sched.events_after(0, job_id="be-b")][-1] == EventKind.PREEMPTED
    g = sched.describe("guar")
    assert g.state == JobState.RUNNING
    assert held(sched, "guar") == {("node-b", 0), ("node-b", 1)}
    assert {j.job_id for j in sched.list_jobs(state=JobState.RUNNING)} == {"be-a0", "be-a1", "bu-c", "guar"}
    assert independent_violations(sched) == []


def test_best_effort_is_preempted_before_burstable() -> None:
    sched, clock = make_sched([uniform_node("node-a", "A", 2, 16000)], preemption_grace_s=5.0)
    # The best-effort job is older and of higher priority: only the QoS class makes it the victim.
    sched.submit(spec("be", qos=Qos.BEST_EFFORT, priority=1000))
    sched.submit(spec("bu", qos=Qos.BURSTABLE, priority=-1000))
    be_cards = held(sched, "be")
    sched.submit(spec("guar", qos=Qos.GUARANTEED))
    assert sched.describe("be").state == JobState.PREEMPTING
    assert sched.describe("bu").state == JobState.RUNNING
    clock.advance(6)
    sched.tick()
    assert sched.describe("guar").state == JobState.RUNNING
    assert held(sched, "guar") == be_cards
    assert sched.describe("bu").state == JobState.RUNNING


def test_victim_that_releases_early_lets_guaranteed_job_in_at_once() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("be", qos=Qos.BEST_EFFORT))
    sched.submit(spec("guar", qos=Qos.GUARANTEED))
    assert sched.describe("be").state == JobState.PREEMPTING
    sched.release("be")
    assert sched.describe("be").state == JobState.RELEASED
    assert sched.describe("guar").state == JobState.RUNNING


@pytest.mark.parametrize("qos", [Qos.BURSTABLE, Qos.BEST_EFFORT])
def test_non_guaranteed_job_never_preempts(qos: Qos) -> None:
    sched, clock = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("be", qos=Qos.BEST_EFFORT))
    job = sched.submit(spec("other", qos=qos, priority=1000))
    assert job.state == JobState.PENDING
    clock.advance(60)
    sched.tick()
    assert sched.describe("be").state == JobState.RUNNING
    assert held(sched, "be") == {("node-a", 0)}
    assert not [e for e in sched.events_after(0) if e.kind == EventKind.PREEMPTION_NOTICE]


def test_guaranteed_job_never_preempts_guaranteed_work() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("g1", qos=Qos.GUARANTEED))
    job = sched.submit(spec("g2", qos=Qos.GUARANTEED))
    assert job.state == JobState.PENDING
    assert sched.describe("g1").state == JobState.RUNNING
    assert not [e for e in sched.events_after(0) if e.kind == EventKind.PREEMPTION_NOTICE]


# --------------------------------------------------------------------------------------------------------
# Leases
# --------------------------------------------------------------------------------------------------------


def test_unrenewed_lease_is_reclaimed_and_renew_extends() -> None:
    sched, clock = make_sched([uniform_node("node-a", "A", 2, 16000)], lease_ttl_s=30)
    kept = sched.submit(spec("kept"))
    short = sched.submit(spec("short", lease_ttl_s=10))
    assert kept.lease_ttl_s == 30 and short.lease_ttl_s == 10
    assert kept.lease_expiry == {0: T0 + 30}
    waiting = sched.submit(spec("waiting"))
    assert waiting.state == JobState.PENDING

    clock.advance(20)
    renewed = sched.renew("kept", 0)
    assert renewed.lease_expiry == {0: T0 + 50}
    sched.tick()
    short = sched.describe("short")
    assert short.state == JobState.LEASE_EXPIRED
    assert held(sched, "short") == set()
    ev = sched.events_after(0, job_id="short")
    assert ev[-1].kind == EventKind.LEASE_EXPIRED
    assert "replica 0" in ev[-1].message
    # The freed card went to the waiting job.
    assert sched.describe("waiting").state == JobState.RUNNING

    clock.advance(25)  # T0 + 45: past the original expiry (T0 + 30), before the renewed one
    sched.tick()
    assert sched.describe("kept").state == JobState.RUNNING
    clock.advance(6)  # T0 + 51
    sched.tick()
    assert sched.describe("kept").state == JobState.LEASE_EXPIRED
    assert held(sched, "kept") == set()

    with pytest.raises(FailedPrecondition):
        sched.renew("kept", 0)
    with pytest.raises(FailedPrecondition):
        sched.renew("short", 0)


def test_one_lapsed_replica_reclaims_the_job() -> None:
    sched, clock = make_sched([uniform_node("node-a", "A", 2, 16000)], lease_ttl_s=10)
    sched.submit(spec("two", replicas=2))
    clock.advance(8)
    sched.renew("two", 0)
    clock.advance(3)
    sched.tick()
    job = sched.describe("two")
    assert job.state == JobState.LEASE_EXPIRED
    assert held(sched, "two") == set()
    assert "replica 1" in sched.events_after(0, job_id="two")[-1].message


def test_renew_errors() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("run"))
    sched.submit(spec("wait"))
    sched.submit(spec("gone", mem=1000, allow_sharing=False, tenant="b"))  # pending too (card exclusive)
    sched.release("gone")
    with pytest.raises(FailedPrecondition):
        sched.renew("wait", 0)
    with pytest.raises(FailedPrecondition):
        sched.renew("gone", 0)
    with pytest.raises(InvalidArgument) as exc:
        sched.renew("run", 1)
    assert exc.value.field == "replica"
    with pytest.raises(NotFound):
        sched.renew("nope", 0)
    with pytest.raises(InvalidArgument) as exc:
        sched.renew("", 0)
    assert exc.value.field == "job_id"


# --------------------------------------------------------------------------------------------------------
# Durability
# --------------------------------------------------------------------------------------------------------


def test_restart_restores_jobs_placements_events_and_fresh_leases(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    nodes = [uniform_node("node-a", "A", 2, 16000, group_size=2), uniform_node("node-b", "B", 1, 24000)]
    sched, clock = make_sched(nodes, store=Store(db), policy="fgd", lease_ttl_s=30)
    sched.submit(spec("pair", gpus=2, allowed_models=("A",)))
    sched.submit(spec("shared", mem=6000, allow_sharing=True, allowed_models=("B",), lease_ttl_s=60))
    sched.submit(spec("shared2", mem=7000, allow_sharing=True, allowed_models=("B",), tenant="team-b"))
    sched.submit(spec("waits", gpus=2, allowed_models=("A",)))
    sched.submit(spec("done", mem=100, allow_sharing=True))
    sched.release("done")
    before_jobs = sched.list_jobs()
    before_nodes = sched.list_nodes()
    before_events = sched.events_after(0, 10_000)
    assert {j.job_id: j.state for j in before_jobs}["waits"] == JobState.PENDING
    sched.close()

    clock2 = FakeClock(clock() + 100)  # the old leases (T0 + 30/60) lie in the past now
    again = Scheduler(make_settings(policy="fgd", lease_ttl_s=30), Store(db), clock=clock2)
    after_jobs = again.list_jobs()
    assert [j.job_id for j in after_jobs] == [j.job_id for j in before_jobs]
    for b, a in zip(before_jobs, after_jobs, strict=True):
        assert (a.spec, a.state, a.placements, a.seq, a.pending_reason, a.submitted_at, a.lease_ttl_s) == (
            b.spec,
            b.state,
            b.placements,
            b.seq,
            b.pending_reason,
            b.submitted_at,
            b.lease_ttl_s,
        ), b.job_id
        if a.state in HOLDS_ALLOCATION:
            assert a.lease_expiry == {r: clock2() + a.lease_ttl_s for r in a.placements}
    assert [(n.spec, n.gpus) for n in again.list_nodes()] == [(n.spec, n.gpus) for n in before_nodes]
    assert again.events_after(0, 10_000) == before_events
    assert again.violations() == []
    assert independent_violations(again) == []

    # Leases run from the restart: a tick now reclaims nothing.
    again.tick()
    assert {j.job_id for j in again.list_jobs(state=JobState.RUNNING)} == {"pair", "shared", "shared2"}
    # The pending job is still queued and the event sequence continues.
    again.release("pair")
    assert again.describe("waits").state == JobState.RUNNING
    seqs = [e.seq for e in again.events_after(0, 10_000)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[-1] > before_events[-1].seq
    new = again.submit(spec("new", mem=100, allow_sharing=True, allowed_models=("B",)))
    assert new.seq > max(j.seq for j in before_jobs)
    again.close()

    third = Scheduler(make_settings(policy="fgd", lease_ttl_s=30), Store(db), clock=FakeClock(clock2() + 5))
    assert third.describe("pair").state == JobState.RELEASED
    assert third.describe("waits").state == JobState.RUNNING
    assert third.describe("new").state == JobState.RUNNING
    assert independent_violations(third) == []
    third.close()


def test_restart_during_preemption_keeps_victim_and_deadline(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    sched, clock = make_sched([uniform_node("node-a", "A", 1, 16000)], store=Store(db), preemption_grace_s=10.0)
    sched.submit(spec("be", qos=Qos.BEST_EFFORT))
    sched.submit(spec("guar", qos=Qos.GUARANTEED))
    deadline = sched.describe("be").preemption_deadline
    sched.close()

    clock2 = FakeClock(clock() + 2)
    again = Scheduler(make_settings(preemption_grace_s=10.0), Store(db), clock=clock2)
    victim = again.describe("be")
    assert victim.state == JobState.PREEMPTING
    assert victim.preemption_deadline == deadline
    assert held(again, "be") == {("node-a", 0)}
    assert again.describe("guar").state == JobState.PENDING
    clock2.advance(9)
    again.tick()
    assert again.describe("be").state == JobState.PREEMPTED
    assert again.describe("guar").state == JobState.RUNNING
    assert independent_violations(again) == []
    again.close()


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("replicas-zero", {"replicas": 0}, "job.replicas"),
    ("replicas-huge", {"replicas": 5000}, "job.replicas"),
    ("memory-zero", {"mem": 0}, "job.memory_mib_per_gpu"),
    ("memory-too-big-for-any-card", {"mem": 30000}, "job.memory_mib_per_gpu"),
    ("memory-too-big-for-model", {"mem": 20000, "allowed_models": ("A",)}, "job.memory_mib_per_gpu"),
    ("share-with-two-gpus", {"share": 500, "gpus": 2}, "job.gpu_share_milli"),
    ("share-zero", {"share": 0}, "job.gpu_share_milli"),
    ("share-over", {"share": 1001}, "job.gpu_share_milli"),
    ("memory-and-share", {"mem": 100, "share": 100}, "job.gpu_memory"),
    ("unknown-model", {"allowed_models": ("H100",)}, "job.allowed_models"),
    ("second-model-unknown", {"allowed_models": ("A", "H100")}, "job.allowed_models[1]"),
    ("gang-larger-than-cluster", {"replicas": 4, "gang": True}, "job.replicas"),
    ("gang-of-pairs-too-large", {"replicas": 2, "gpus": 2, "gang": True}, "job.replicas"),
    ("gpus-more-than-a-node", {"gpus": 3}, "job.gpus_per_replica"),
    ("bad-id", {"job_id": "bad id!"}, "job.job_id"),
    ("empty-tenant", {"tenant": ""}, "job.tenant"),
    ("priority", {"priority": 2000}, "job.priority"),
    ("lease", {"lease_ttl_s": -1}, "job.lease_ttl_s"),
]


@pytest.mark.parametrize(("case", "kw", "field"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_rejected_naming_the_field_and_changes_nothing(case: str, kw: dict[str, Any], field: str) -> None:
    nodes = [uniform_node("node-a", "A", 2, 16000), uniform_node("node-b", "B", 1, 24000)]
    sched, _ = make_sched(nodes, gpu_reserve_mib=512)
    sched.submit(spec("existing", mem=1000, allow_sharing=True, allowed_models=("B",)))
    queued = sched.submit(spec("queued", gpus=2, replicas=2))  # one pair placed on node-a, the other queued
    assert queued.state == JobState.RUNNING and sorted(queued.placements) == [0]
    before = state_of(sched)
    kw = dict(kw)
    job_id = kw.pop("job_id", "rejected")
    with pytest.raises(InvalidArgument) as exc:
        sched.submit(spec(job_id, **kw))
    assert exc.value.field.startswith(field), (exc.value.field, field)
    assert str(exc.value).startswith(exc.value.field + ":")
    assert state_of(sched) == before
    with pytest.raises(NotFound):
        sched.describe(job_id)
    assert sched.violations() == []


def test_duplicate_id_different_spec_already_exists_same_spec_idempotent() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 2, 16000)])
    first = sched.submit(spec("dup", mem=1000))
    before = state_of(sched)
    with pytest.raises(AlreadyExists):
        sched.submit(spec("dup", mem=2000))
    assert state_of(sched) == before
    again = sched.submit(spec("dup", mem=1000))
    assert again == first
    assert state_of(sched) == before
    # Also after the job ended: the id stays taken.
    sched.release("dup")
    with pytest.raises(AlreadyExists):
        sched.submit(spec("dup", mem=3000))
    assert sched.submit(spec("dup", mem=1000)).state == JobState.RELEASED


def test_submit_without_nodes_is_failed_precondition() -> None:
    sched, _ = make_sched([])
    with pytest.raises(FailedPrecondition):
        sched.submit(spec("early"))
    assert sched.list_jobs() == []


def test_bad_node_registration_changes_nothing() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("run"))
    before = state_of(sched)
    with pytest.raises(InvalidArgument) as exc:
        sched.register_nodes([uniform_node("bad name", "A", 1, 16000)])
    assert exc.value.field == "node.name"
    with pytest.raises(InvalidArgument) as exc:
        sched.register_nodes([uniform_node("node-z", "A", 1, 0)])
    assert exc.value.field == "node.gpus[0].memory_mib"
    with pytest.raises(InvalidArgument) as exc:
        sched.register_nodes([NodeSpec("node-y", (uniform_node("node-a", "A", 1, 16000).gpus[0],))])
    assert exc.value.field == "node.gpus[0].uuid"
    with pytest.raises(FailedPrecondition):
        sched.register_nodes([uniform_node("node-a", "A", 1, 8000)])  # shrinks a card that holds a job
    assert state_of(sched) == before


# --------------------------------------------------------------------------------------------------------
# Watching
# --------------------------------------------------------------------------------------------------------


def test_watch_snapshot_does_not_block_other_callers() -> None:
    """A watcher that has taken the snapshot and not yet asked for the next item must not hold the
    scheduler's lock: every other caller (and the gRPC handler sending the snapshot) would wait on it."""
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("job"))
    stream = sched.watch("job", lambda: False)
    ev, snap = next(stream)
    assert ev is None and snap.state == JobState.RUNNING
    done = threading.Event()

    def other() -> None:
        sched.release("job")
        done.set()

    t = threading.Thread(target=other, daemon=True)
    t.start()
    finished = done.wait(30.0)  # a wait, not a speed check: a blocked release() never finishes
    # Let the blocked thread go before asserting, so the test never leaves it hanging.
    items = list(stream)
    t.join(5)
    assert finished, "release() blocked while a watcher held its snapshot"
    assert [e.kind for e, _ in items if e is not None] == [EventKind.RELEASED]
    assert all(e is not None for e, _ in items)


# --------------------------------------------------------------------------------------------------------
# Scale signals and capacity planning
# --------------------------------------------------------------------------------------------------------


def tick_every(sched: Scheduler, clock: FakeClock, period: float, until: float) -> list[tuple[float, Any]]:
    """Tick like the reaper (period not a divisor of the window) until ``until``; (time, signal) changes."""
    out: list[tuple[float, Any]] = []
    while clock() + period <= until:
        clock.advance(period)
        out.extend((clock(), s) for s in sched.tick())
    return out


def test_sustained_utilisation_gives_scale_out_only_after_the_window() -> None:
    nodes = [uniform_node("node-a", "A", 2, 16000), uniform_node("node-b", "A", 2, 16000)]
    sched, clock = make_sched(nodes, scale_window_s=10.0, scale_out_utilization=0.9)
    for i in range(4):
        sched.submit(spec(f"x{i}"))
    assert sched.tick() == []
    assert tick_every(sched, clock, 0.7, T0 + 3.9) == []
    # A dip: one sample at 75% (T0 + 4), then the pool is full again.
    clock.t = T0 + 4
    sched.release("x3")
    assert sched.tick() == []
    sched.submit(spec("x4"))
    changes = tick_every(sched, clock, 0.7, T0 + 20)
    assert changes, "no scale-out after the pool stayed full for a whole window"
    at, sig = changes[0]
    # Not while the dip is inside the window; by the first tick whose window holds only full samples.
    assert T0 + 14 < at <= T0 + 16, at - T0
    assert (sig.pool, sig.direction, sig.nodes) == ("A", ScaleDirection.OUT, 1)
    assert sig.utilization == pytest.approx(1.0)
    assert sig.shape == NodeShape("A", 2, 16000)
    assert "allocated share" in sig.reason
    assert sched.scale_signals() == [sig]
    assert len(changes) == 1  # an unchanged signal is not repeated


def test_pending_demand_gives_scale_out_by_memory() -> None:
    sched, clock = make_sched([uniform_node("node-a", "A", 2, 10000)], scale_window_s=1000.0)
    sched.submit(spec("x0"))
    sched.submit(spec("x1"))
    job = sched.submit(spec("wide", replicas=5, mem=7000, allow_sharing=True))
    assert job.state == JobState.PENDING
    changed = sched.tick()
    assert len(changed) == 1
    sig = changed[0]
    assert sig.direction == ScaleDirection.OUT
    # 5 x 7000 MiB requested; a 2 x 10,000 MiB node frees 20,000 MiB: ceil(35,000 / 20,000) = 2.
    assert sig.nodes == math.ceil(35000 / 20000) == 2
    assert "pending" in sig.reason and "35000" in sig.reason
    # Pending demand is cleared: the recommendation is withdrawn.
    sched.release("wide")
    clock.advance(1)
    changed = sched.tick()
    assert [(s.direction, s.nodes) for s in changed] == [(ScaleDirection.NONE, 0)]


def test_pending_demand_counts_only_unplaced_replicas() -> None:
    """Two of four 9,000 MiB replicas run; the demand that cannot be placed is 2 x 9,000 MiB, which one
    2 x 10,000 MiB node holds."""
    sched, _ = make_sched([uniform_node("node-a", "A", 2, 10000)], scale_window_s=1000.0)
    job = sched.submit(spec("four", replicas=4, mem=9000, allow_sharing=True))
    assert job.state == JobState.RUNNING and len(job.placements) == 2
    changed = sched.tick()
    assert len(changed) == 1
    assert changed[0].direction == ScaleDirection.OUT
    assert changed[0].nodes == math.ceil(2 * 9000 / 20000) == 1


def test_idle_pool_gives_scale_in_keeping_one_spare() -> None:
    nodes = [uniform_node(f"node-{i}", "A", 2, 16000) for i in range(3)]
    sched, clock = make_sched(nodes, scale_window_s=10.0, scale_in_utilization=0.2)
    assert sched.tick() == []
    changes = tick_every(sched, clock, 0.7, T0 + 12)
    assert changes, "no scale-in after the pool stayed idle for a whole window"
    at, sig = changes[0]
    assert T0 + 10 <= at <= T0 + 11.5, at - T0
    assert (sig.pool, sig.direction, sig.nodes) == ("A", ScaleDirection.IN, 2)
    # One job makes one node busy: one fewer removable node.
    sched.submit(spec("x", mem=100, allow_sharing=True))
    changes = tick_every(sched, clock, 0.7, clock() + 1)
    assert [(s.direction, s.nodes) for _, s in changes] == [(ScaleDirection.IN, 1)]


def test_plan_follows_ceil_requested_over_free_per_node() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)], gpu_reserve_mib=512)
    node = NodeShape("A100", 4, 81920)
    free = 4 * (81920 - 512)
    plan = sched.plan(node, [spec("a", replicas=3, gpus=2, mem=40000, allow_sharing=True)])
    assert plan.requested_memory_mib == 240000
    assert plan.free_memory_mib_per_node == free
    assert plan.nodes_by_memory == math.ceil(240000 / free) == 1
    assert plan.nodes_by_unshared_gpus == 0
    assert plan.nodes_needed == 1
    jobs = [spec("b", replicas=10, mem=70000, allow_sharing=True), spec("c", replicas=2, share=500, allow_sharing=True)]
    plan = sched.plan(node, jobs)
    requested = 10 * 70000 + 2 * ((81920 - 512) * 500 // 1000)
    assert plan.requested_memory_mib == requested
    assert plan.nodes_by_memory == math.ceil(requested / free) == 3
    # Exclusive whole cards: 9 GPUs on 4-GPU nodes need 3 nodes even though memory fits in 1.
    plan = sched.plan(node, [spec("d", replicas=9, mem=1000)])
    assert plan.nodes_by_memory == 1
    assert plan.nodes_by_unshared_gpus == 3
    assert plan.nodes_needed == 3
    with pytest.raises(InvalidArgument) as exc:
        sched.plan(NodeShape("", 4, 81920), [])
    assert exc.value.field == "shape.model"
    with pytest.raises(InvalidArgument) as exc:
        sched.plan(NodeShape("A", 0, 81920), [])
    assert exc.value.field == "shape.gpus"
    with pytest.raises(InvalidArgument) as exc:
        sched.plan(node, [spec("ok"), spec("bad", replicas=0)])
    assert exc.value.field == "jobs[1].replicas"


def test_plan_without_jobs_uses_pending_jobs_of_the_model() -> None:
    nodes = [uniform_node("node-a", "A", 1, 10000), uniform_node("node-b", "B", 1, 10000)]
    sched, _ = make_sched(nodes)
    sched.submit(spec("fill-a", allowed_models=("A",)))
    sched.submit(spec("fill-b", allowed_models=("B",)))
    sched.submit(spec("want-a", mem=6000, allowed_models=("A",)))
    sched.submit(spec("want-b", mem=3000, allowed_models=("B",)))
    plan = sched.plan(NodeShape("A", 1, 10000), [])
    assert plan.requested_memory_mib == 6000
    assert plan.nodes_needed == 1


def test_group_commit_acknowledges_only_durable_state(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3
    import threading

    from guardmesh.config import SchedulerSettings
    from guardmesh.inventory import uniform_node
    from services.scheduler.jobs import JobSpec
    from services.scheduler.scheduler import Scheduler
    from services.scheduler.store import Store

    store = Store(tmp_path / "h.db")
    s = Scheduler(SchedulerSettings(gpu_reserve_mib=0), store)
    s.register_nodes([uniform_node(f"n{i}", "A100", 8, 81920) for i in range(5)])
    acked: list[str] = []
    missing: list[str] = []

    def submit(i: int) -> None:
        s.submit(JobSpec(job_id=f"j{i}", tenant="t", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=1000))
        # Acknowledged: a second connection must already see it on disk.
        other = sqlite3.connect(tmp_path / "h.db")
        if other.execute("SELECT 1 FROM jobs WHERE job_id = ?", (f"j{i}",)).fetchone() is None:
            missing.append(f"j{i}")
        other.close()
        acked.append(f"j{i}")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(acked) == 40 and missing == []
    assert store.transactions <= 41  # concurrent submits may share a transaction, never need more
    s.close()


def ref_host_fragmentation(
    rooms: list[float],
    models: list[int],
    d: np.ndarray,
    k: np.ndarray,
    p: np.ndarray,
    cpu: float,
    mem: float,
    cls_cpu: np.ndarray,
    cls_mem: np.ndarray,
) -> float:
    """FGD's full definition: a class the node cannot host for lack of CPU or memory sees all room as fragments
    (a class that can use none of the node's GPUs sees none)."""
    total = sum(rooms)
    acc = 0.0
    for c in range(d.shape[0]):
        if all(float(d[c, m]) > 1000.5 for m in models):
            continue
        serving = [j for j in range(len(rooms)) if rooms[j] >= float(d[c, models[j]])]
        hostable = cpu >= float(cls_cpu[c]) and mem >= float(cls_mem[c])
        if len(serving) < int(k[c]) or not hostable:
            frag_c = total
        else:
            frag_c = sum(rooms[j] for j in range(len(rooms)) if rooms[j] < float(d[c, models[j]]))
        acc += float(p[c]) * frag_c
    return acc


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frag_cases(), st.data())
def test_host_aware_kernels_match_python_reference(case: dict[str, Any], data: st.DataObject) -> None:
    r, gpu_model, d, k, p = case["r"], case["gpu_model"], case["d"], case["k"], case["p"]
    node_first, node_ngpu, gpu_node = case["node_first"], case["node_ngpu"], case["gpu_node"]
    n, nc = node_ngpu.shape[0], d.shape[0]
    small = st.integers(0, 8).map(lambda x: float(x * 1000))
    cpu_free = np.array(data.draw(st.lists(small, min_size=n, max_size=n)), dtype=np.float64)
    mem_free = np.array(data.draw(st.lists(small, min_size=n, max_size=n)), dtype=np.float64)
    cls_cpu = np.array(data.draw(st.lists(small, min_size=nc, max_size=nc)), dtype=np.float64)
    cls_mem = np.array(data.draw(st.lists(small, min_size=nc, max_size=nc)), dtype=np.float64)
    task_cpu, task_mem = data.draw(small), data.draw(small)
    count_fit = np.zeros((n, nc), dtype=np.int32)
    sum_frag = np.zeros((n, nc), dtype=np.float32)
    sum_r = np.zeros(n, dtype=np.float32)
    frag.refresh_nodes(r, gpu_model, node_first, node_ngpu, np.arange(n, dtype=np.int32), d, count_fit, sum_frag, sum_r)
    out = np.full(case["cand"].shape[0], np.nan, dtype=np.float32)
    frag.single_gpu_delta(
        case["cand"],
        case["take"],
        r,
        gpu_node,
        gpu_model,
        d,
        k,
        p,
        count_fit,
        sum_frag,
        sum_r,
        out,
        cpu_free,
        mem_free,
        task_cpu,
        task_mem,
        cls_cpu,
        cls_mem,
    )
    for i, g in enumerate(case["cand"].tolist()):
        node = int(gpu_node[g])
        sl = slice(int(node_first[node]), int(node_first[node] + node_ngpu[node]))
        rooms = [float(x) for x in r[sl]]
        models = [int(m) for m in gpu_model[sl]]
        after = list(rooms)
        pos = g - int(node_first[node])
        after[pos] = max(f32(np.float32(rooms[pos]) - np.float32(case["take"][i])), 0.0)
        before_v = ref_host_fragmentation(rooms, models, d, k, p, cpu_free[node], mem_free[node], cls_cpu, cls_mem)
        after_v = ref_host_fragmentation(
            after, models, d, k, p, cpu_free[node] - task_cpu, mem_free[node] - task_mem, cls_cpu, cls_mem
        )
        assert float(out[i]) == pytest.approx(after_v - before_v, abs=2e-2, rel=1e-5)
        native = frag.node_fragmentation(
            np.ascontiguousarray(r[sl]),
            np.ascontiguousarray(gpu_model[sl]),
            d,
            k,
            p,
            cpu_free[node],
            mem_free[node],
            cls_cpu,
            cls_mem,
        )
        assert native == pytest.approx(before_v, abs=2e-2, rel=1e-5)


@pytest.mark.parametrize("parallel", [False, True])
def test_fused_single_gpu_kernel_agrees_with_numpy_reference(parallel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path picks the same GPU as the filter + score reference, host resources included;
    the two-thread scan combines its halves exactly as one scan would."""
    from services.scheduler.placement import place_replica, place_single_gpu

    if parallel:
        monkeypatch.setattr(frag, "PARALLEL_GPUS", 8)
    rng = np.random.default_rng(3)
    for policy in ("first-fit", "best-fit", "fgd"):
        state = ClusterState(512)
        state.set_nodes(
            [
                uniform_node(
                    f"n{i}", "A100" if i % 2 else "T4", 4, 16384 * (1 + i % 2), cpu_milli=16000, host_memory_mib=65536
                )
                for i in range(12)
            ]
        )
        pol = make_policy(policy)
        pol.attach(state)
        for step in range(150):
            shape = ReplicaShape(
                1,
                None,
                int(rng.choice([250, 500, 1000])),
                bool(rng.random() < 0.3),
                frozenset(),
                (),
                int(rng.choice([0, 2000, 6000])),
                int(rng.choice([0, 8192])),
                Topology.PREFERRED,
            )
            shape = replace(shape, allow_sharing=(shape.share_milli or 1000) < 1000)
            pol.observe(shape)
            ref, fast = place_replica(state, shape, pol), place_single_gpu(state, shape, pol)
            assert (ref is None) == (fast is None), (policy, step)
            if ref is None or fast is None:
                continue
            if ref.gpus != fast.gpus:  # only a floating-point tie may differ
                assert ref.score == pytest.approx(fast.score, rel=1e-6, abs=1e-3), (policy, step)
            state.allocate(
                f"j{step}",
                0,
                list(fast.gpus),
                list(fast.caps),
                shape.allow_sharing,
                shape.cpu_milli,
                shape.host_memory_mib,
            )
        assert state.violations() == []
