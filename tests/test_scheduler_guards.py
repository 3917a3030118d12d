"""Issue 17's scheduler guards over real gRPC and on the core: minimal preemption, no starvation, fail-stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardmesh.inventory import uniform_node
from guardmesh.v1 import scheduler_pb2 as spb
from services.scheduler.jobs import JobState, Qos
from services.scheduler.placement import ReplicaShape
from services.scheduler.preemption import fewest_victims
from services.scheduler.scaling import ScaleDirection
from tests.conftest import node_pb
from tests.test_scheduler_core import make_sched, spec
from tests.test_scheduler_grpc import custom_scheduler, describe, holders, job_pb, submit

CARD_16G = 16384


def notices(stub, job_id: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    events = stub.ListEvents(spb.ListEventsRequest(after_seq=0, job_id=job_id)).events
    return [e.job_id for e in events if e.kind == spb.EVENT_KIND_PREEMPTION_NOTICE]


# -- preemption: the fewest victims ---------------------------------------------------------------------


def test_guaranteed_job_preempts_only_the_burstable_job_that_frees_enough(tmp_path: Path) -> None:
    """The observed case: best-effort 2,000 MiB + burstable 12,000 MiB on a card; a guaranteed job needs
    12,000 MiB. Evicting the burstable job alone is enough, so only it gets PREEMPTION_NOTICE."""
    with custom_scheduler(tmp_path, **{"scheduler.preemption_grace_s": 30.0}) as stub:
        stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("gpu-1", 1, CARD_16G)))
        submit(stub, job_pb("be", mem=2000, allow_sharing=True, qos=spb.QOS_CLASS_BEST_EFFORT))
        submit(stub, job_pb("bu", mem=12000, allow_sharing=True, qos=spb.QOS_CLASS_BURSTABLE))
        assert set(holders(stub)) == {"be", "bu"}

        guar = submit(stub, job_pb("guar", mem=12000, allow_sharing=True, qos=spb.QOS_CLASS_GUARANTEED))
        assert guar.state == spb.JOB_STATE_PENDING
        assert notices(stub) == ["bu"]
        assert describe(stub, "bu").state == spb.JOB_STATE_PREEMPTING
        assert describe(stub, "be").state == spb.JOB_STATE_RUNNING

        stub.ReleaseJob(spb.ReleaseJobRequest(job_id="bu"))
        assert describe(stub, "guar").state == spb.JOB_STATE_RUNNING
        assert set(holders(stub)) == {"be", "guar"}


def test_victim_search_spans_nodes_for_the_smallest_set() -> None:
    """Node a needs two evictions, node b one (a larger, more valuable job): the set size decides first."""
    nodes = [uniform_node("node-a", "A", 1, 16000), uniform_node("node-b", "A", 1, 16000)]
    sched, _ = make_sched(nodes, policy="first-fit")
    sched.submit(spec("be-a1", mem=8000, allow_sharing=True, qos=Qos.BEST_EFFORT))
    sched.submit(spec("be-a2", mem=8000, allow_sharing=True, qos=Qos.BEST_EFFORT))
    sched.submit(spec("bu-b", mem=16000, allow_sharing=True, qos=Qos.BURSTABLE))
    assert {j.job_id for j in sched.list_jobs(state=JobState.RUNNING)} == {"be-a1", "be-a2", "bu-b"}

    g = sched.submit(spec("guar", mem=16000, allow_sharing=True, qos=Qos.GUARANTEED))
    assert g.awaiting_victims == {"bu-b"}
    assert {j.job_id for j in sched.list_jobs(state=JobState.PREEMPTING)} == {"bu-b"}


def test_preemption_search_changes_nothing_it_only_simulates() -> None:
    """The live state is never touched by the search: no listener fires, arrays and liveness unchanged."""
    nodes = [uniform_node(f"node-{i}", "A", 2, 16000) for i in range(4)]
    sched, _ = make_sched(nodes, policy="fgd")
    for i in range(8):
        sched.submit(spec(f"be-{i}", mem=9000, allow_sharing=True, qos=Qos.BEST_EFFORT))
    fired: list[object] = []
    sched.state.listeners.append(fired.append)
    before = (sched.state.gpu_avail.copy(), sched.state.node_alive.copy(), dict(sched.state.job_gpus))
    shape = ReplicaShape.of(spec("g", gpus=2, mem=16000, qos=Qos.GUARANTEED))
    plan = fewest_victims(sched.state, shape, {f"be-{i}" for i in range(8)}, sched._victim_order)
    assert plan is not None and len(plan) == 2
    assert fired == []
    assert (before[0] == sched.state.gpu_avail).all() and (before[1] == sched.state.node_alive).all()
    assert before[2] == sched.state.job_gpus
    assert all(r >= 0 for held in sched.state.job_gpus.values() for r, _ in held)


def test_gang_preemption_takes_one_node_per_replica_and_fewest_in_total() -> None:
    nodes = [uniform_node(f"node-{i}", "A", 2, 16000) for i in range(3)]
    sched, _ = make_sched(nodes, policy="first-fit")
    sched.submit(spec("be-0", gpus=2, qos=Qos.BEST_EFFORT))  # node-0 whole
    sched.submit(spec("be-1a", qos=Qos.BEST_EFFORT))  # node-1 two jobs
    sched.submit(spec("be-1b", qos=Qos.BEST_EFFORT))
    sched.submit(spec("bu-2", gpus=2, qos=Qos.BURSTABLE))  # node-2 whole
    g = sched.submit(spec("guar", gpus=2, replicas=2, gang=True, qos=Qos.GUARANTEED))
    assert g.awaiting_victims == {"be-0", "bu-2"}


def test_no_victim_set_frees_room_preempts_nothing() -> None:
    sched, _ = make_sched([uniform_node("node-a", "A", 1, 16000)])
    sched.submit(spec("guar-1", qos=Qos.GUARANTEED))
    sched.submit(spec("be", mem=100, allow_sharing=True, qos=Qos.BEST_EFFORT))
    g = sched.submit(spec("guar-2", qos=Qos.GUARANTEED))
    assert g.state == JobState.PENDING and not g.awaiting_victims
    assert "would not make room" in g.pending_reason
    assert sched.describe("be").state in (JobState.RUNNING, JobState.PENDING)


@pytest.mark.parametrize("policy", ["first-fit", "best-fit", "fgd"])
def test_preemption_leaves_the_card_invariant(policy: str) -> None:
    nodes = [uniform_node(f"node-{i}", "A", 4, 16000) for i in range(3)]
    sched, clock = make_sched(nodes, policy=policy, preemption_grace_s=1.0)
    for i in range(24):
        sched.submit(spec(f"be-{i}", mem=4000 + 1000 * (i % 3), allow_sharing=True, qos=Qos.BEST_EFFORT))
    sched.submit(spec("guar", gpus=4, replicas=2, gang=True, qos=Qos.GUARANTEED))
    clock.advance(2.0)
    sched.tick()
    assert sched.describe("guar").state == JobState.RUNNING
    assert sched.violations() == []


# -- the queue: no starvation -----------------------------------------------------------------------------


def test_high_priority_gang_is_not_starved_by_a_stream_of_low_priority_jobs(tmp_path: Path) -> None:
    """Two 4-GPU nodes, full of single-GPU jobs; a priority-1000 gang of 2 x 4 GPUs waits. As each old job
    leaves, a later priority -1000 single-GPU job arrives: it must queue behind the gang, not take the card."""
    with custom_scheduler(tmp_path, **{"scheduler.policy": "best-fit"}) as stub:
        for name in ("gpu-1", "gpu-2"):
            stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb(name, 4, CARD_16G)))
        for i in range(8):
            assert submit(stub, job_pb(f"old-{i}")).state == spb.JOB_STATE_RUNNING
        gang = submit(stub, job_pb("gang", gpus=4, replicas=2, gang=True, priority=1000))
        assert gang.state == spb.JOB_STATE_PENDING
        for i in range(8):
            stub.ReleaseJob(spb.ReleaseJobRequest(job_id=f"old-{i}"))
            low = submit(stub, job_pb(f"low-{i}", priority=-1000))
            if i < 7:
                assert low.state == spb.JOB_STATE_PENDING, f"low-{i} skipped the queue"
                assert "queued behind gang" in low.pending_reason
                assert describe(stub, "gang").state == spb.JOB_STATE_PENDING
        assert describe(stub, "gang").state == spb.JOB_STATE_RUNNING
        assert {j for j in holders(stub)} == {"gang"}
        # The low-priority jobs wait their turn behind it, in age order, and are placed once room appears.
        stub.ReleaseJob(spb.ReleaseJobRequest(job_id="gang"))
        assert {j for j in holders(stub)} == {f"low-{i}" for i in range(8)}


def test_a_later_job_backfills_only_where_the_blocked_head_cannot_run() -> None:
    nodes = [uniform_node("node-a", "A", 2, 16000), uniform_node("node-b", "B", 2, 16000)]
    sched, _ = make_sched(nodes, policy="first-fit")
    sched.submit(spec("old", allowed_models=("A",)))
    head = sched.submit(spec("head", gpus=2, allowed_models=("A",), priority=1000))
    assert head.state == JobState.PENDING
    # Fits on node-a's free card too, but that card is the head's: it goes to node-b (model B).
    assert sched.submit(spec("fill-1", priority=-1000)).placements[0].node == "node-b"
    assert sched.submit(spec("fill-2", priority=-1000)).placements[0].node == "node-b"
    # Only node-a's free card is left: the low-priority job waits rather than delay the head.
    waiting = sched.submit(spec("fill-3", priority=-1000))
    assert waiting.state == JobState.PENDING and "queued behind head" in waiting.pending_reason
    sched.release("old")
    assert sched.describe("head").state == JobState.RUNNING
    assert sched.describe("fill-3").state == JobState.PENDING
    # A job ranked ahead of the head is not held back by it.
    urgent = sched.submit(spec("urgent", priority=1000, qos=Qos.GUARANTEED))
    assert urgent.state in (JobState.PENDING, JobState.RUNNING) and "queued behind" not in urgent.pending_reason


# -- scale-out by utilisation: a node count from the demand ----------------------------------------------


@pytest.mark.parametrize(("threshold", "expected"), [(0.9, 1), (0.6, 3), (0.5, 4)])
def test_sustained_scale_out_recommends_the_nodes_that_bring_the_share_to_the_threshold(
    threshold: float, expected: int
) -> None:
    """Four full 2-GPU nodes: allocated 128,000 MiB of 128,000. At threshold t the pool needs
    128,000 / t MiB, i.e. ceil(4 / t - 4) more nodes: 0.44 -> 1, 2.67 -> 3, 4 -> 4."""
    nodes = [uniform_node(f"node-{i}", "A", 2, 16000) for i in range(4)]
    sched, clock = make_sched(nodes, scale_window_s=10.0, scale_out_utilization=threshold, scale_in_utilization=0.1)
    for i in range(8):
        sched.submit(spec(f"x{i}"))
    sched.tick()
    clock.advance(11.0)
    changed = sched.tick()
    assert [(s.pool, s.direction, s.nodes) for s in changed] == [("A", ScaleDirection.OUT, expected)]
    assert changed[0].utilization == pytest.approx(1.0)


# -- the default policy: FGD's task classes respect allowed models ---------------------------------------


def test_fgd_task_classes_respect_allowed_models() -> None:
    """The workload is jobs that may only run on model A (whole cards). A half-card job that may run
    anywhere costs class A-only half a card on node-a (model A) and nothing on node-b (model B, which the
    class can never use): FGD sends it to node-b. A model-blind class would see the two cards as equal and
    take node-a, the first in inventory order."""
    nodes = [uniform_node("node-a", "A", 1, 16000), uniform_node("node-b", "B", 1, 16000)]
    sched, _ = make_sched(nodes, policy="fgd")
    a_only = ReplicaShape.of(spec("probe", allowed_models=("A",)))
    for _ in range(200):
        sched.policy.observe(a_only)
    assert a_only.class_key[-1] == frozenset({"A"})
    job = sched.submit(spec("anywhere", share=500, allow_sharing=True))
    assert job.placements[0].node == "node-b"
    # The class sees model B's room as never usable: d > 1000 there, a card's demand on model A.
    policy = sched.policy
    row = policy._keys.index(a_only.class_key)  # type: ignore[attr-defined]
    d = policy.d  # type: ignore[attr-defined]
    assert d[row, sched.state.model_index["A"]] == 1000.0
    assert d[row, sched.state.model_index["B"]] > 1000.0


def test_past_the_exact_bound_the_greedy_fallback_is_pruned_to_a_minimal_set() -> None:
    """Eight cards each shared by four best-effort jobs: a whole card needs four victims. Sets of up to
    three among 32 jobs exceed the exact bound, so the greedy fallback runs; pruning leaves exactly the
    four jobs of one card (minimal by inclusion, and here the smallest)."""
    sched, _ = make_sched([uniform_node("node-a", "A", 8, 16000)], policy="first-fit")
    for i in range(32):
        sched.submit(spec(f"be-{i}", mem=4000, allow_sharing=True, qos=Qos.BEST_EFFORT))
    assert len(sched.list_jobs(state=JobState.RUNNING)) == 32
    g = sched.submit(spec("guar", qos=Qos.GUARANTEED))
    assert len(g.awaiting_victims) == 4
    cards = {
        gpu.index for nv in sched.list_nodes() for gpu in nv.gpus for a in gpu.allocations if a[0] in g.awaiting_victims
    }
    assert len(cards) == 1
