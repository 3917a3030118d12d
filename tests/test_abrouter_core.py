"""The router core without the wire: shadow traffic never holds the live path, a full shadow queue drops
(and counts) instead of waiting, a failing shadow model never reaches the caller, and a failed write stops
the router instead of acknowledging what is not on disk."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.errors import Unavailable
from services.abrouter.experiments import ArmSpec, ExperimentSpec, ShadowSpec
from services.abrouter.guardrails import Guardrail
from services.abrouter.metrics import MetricKind
from services.abrouter.router import Observation, Router
from services.abrouter.shadow import ScoreCall, ScoreResult
from services.abrouter.store import RouterStore


class BlockingScorer:
    """Live calls answer at once; shadow calls wait until released (a very slow shadow model)."""

    def __init__(self, fail_shadow: bool = False) -> None:
        self.release = threading.Event()
        self.shadow_started = threading.Event()
        self.fail_shadow = fail_shadow
        self.calls: list[ScoreCall] = []

    def __call__(self, call: ScoreCall) -> ScoreResult:
        self.calls.append(call)
        if call.shadow:
            self.shadow_started.set()
            self.release.wait(30)
            if self.fail_shadow:
                raise RuntimeError("shadow model crashed")
            return ScoreResult(0.9, True, call.version)
        return ScoreResult(0.2, False, call.version or "v1")


def experiment(fraction: float = 1.0) -> ExperimentSpec:
    return ExperimentSpec(
        key="shadowed",
        arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5, "v2")),
        model="risk",
        shadow=ShadowSpec("v3", fraction),
    )


def test_live_answers_while_the_shadow_model_is_stuck_and_a_full_queue_drops() -> None:
    scorer = BlockingScorer()
    router = Router(ABRouterSettings(shadow_queue=2, shadow_workers=1), scoring=scorer)
    router.create(experiment())
    try:
        results = [router.route("shadowed", f"u{i}", {}, f"r{i}", {"a": 1.0}) for i in range(10)]
        # every live call returned although the (single) shadow worker is blocked on its first call
        assert scorer.shadow_started.wait(60)
        assert all(not live.decision for _, _, live, _ in results)
        mirrored = [shadowed for *_, shadowed in results]
        stats = router.shadow_report("shadowed")
        assert stats.mirrored == sum(mirrored) and stats.dropped == 10 - sum(mirrored)
        assert 2 <= stats.mirrored <= 3 and stats.dropped >= 7  # 1 in flight + 2 queued
        scorer.release.set()
        assert router.mirror is not None and router.mirror.drain(60)
        stats = router.shadow_report("shadowed")
        assert stats.compared == stats.mirrored and stats.decision_agreement == 0.0
        assert stats.mean_abs_score_diff == pytest.approx(0.7)
        assert {c.version for c in scorer.calls if c.shadow} == {"v3"}
        assert {c.version for c in scorer.calls if not c.shadow} <= {"", "v2"}
    finally:
        scorer.release.set()
        router.close()


def test_a_failing_shadow_model_is_counted_never_raised() -> None:
    scorer = BlockingScorer(fail_shadow=True)
    scorer.release.set()
    router = Router(ABRouterSettings(), scoring=scorer)
    router.create(experiment())
    try:
        for i in range(5):
            router.route("shadowed", f"u{i}", {}, f"r{i}", {"a": 1.0})
        assert router.mirror is not None and router.mirror.drain(60)
        stats = router.shadow_report("shadowed")
        assert stats.errors == stats.mirrored == 5 and stats.compared == 0
    finally:
        router.close()


def test_shadow_share_is_deterministic_per_request_id() -> None:
    scorer = BlockingScorer()
    scorer.release.set()
    router = Router(ABRouterSettings(), scoring=scorer)
    router.create(experiment(fraction=0.3))
    try:
        first = [router.route("shadowed", "u", {}, f"req-{i}", {})[3] for i in range(400)]
        again = [router.route("shadowed", "u", {}, f"req-{i}", {})[3] for i in range(400)]
        assert first == again and 80 < sum(first) < 160
    finally:
        router.close()


def test_a_failed_write_stops_the_router(tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    router.create(ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5))))
    assert store.log.db is not None
    store.log.db.execute("DROP TABLE exposures")  # the next exposure write fails, as on a broken disk
    with pytest.raises(Unavailable, match="store failed"):
        router.assign("u1", {}, ["k"], log_exposure=True)
    with pytest.raises(Unavailable):
        router.assign("u2", {}, ["k"])
    store.close()


def _failing_inserts(store: RouterStore, table: str) -> None:
    """A real SQLite trigger that aborts every insert into ``table`` (the commit fails, as on a broken disk)."""
    assert store.log.db is not None
    store.log.db.execute(
        f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )


def test_a_failed_exposure_commit_leaves_memory_unchanged(tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    router.create(ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), sticky_bucketing=True))
    router.assign("u0", {}, ["k"], log_exposure=True)
    live = router.live["k"]
    before = (len(live.table), dict(live.sticky), live.table.exposure_propensities()[0].tolist())
    _failing_inserts(store, "exposures")
    with pytest.raises(Unavailable, match="store failed"):
        router.assign("u1", {}, ["k"], log_exposure=True, numeric={"age": 30.0})
    assert (len(live.table), dict(live.sticky), live.table.exposure_propensities()[0].tolist()) == before
    assert live.pending_sticky == {} and "u1" not in live.table and "age" not in live.table.columns().numeric
    store.close()


def test_a_failed_observation_commit_leaves_memory_unchanged(tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    router.create(ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), metrics=("m",)))
    router.assign("u0", {}, ["k"], log_exposure=True)
    _failing_inserts(store, "observations")
    with pytest.raises(Unavailable, match="store failed"):
        router.record_metrics("k", [Observation("u0", "m", 1.0)])
    assert router.live["k"].metrics == {}
    store.close()


def test_every_exposure_keeps_its_propensity_also_after_a_restart(tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    spec = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), sticky_bucketing=True)
    router.create(spec)
    [(first, _)] = router.assign("u0", {}, ["k"], log_exposure=True)
    router.update(replace(spec, arms=(ArmSpec("a", 0.2), ArmSpec("b", 0.8))))
    [(again, _)] = router.assign("u0", {}, ["k"], log_exposure=True)
    assert again.arm_index == first.arm_index and again.propensity != first.propensity
    rows, propensities = router.live["k"].table.exposure_propensities()
    assert rows.tolist() == [0, 0] and propensities.tolist() == [first.propensity, again.propensity]
    store.close()
    restored = Router(ABRouterSettings(), RouterStore(tmp_path / "r.db", "NORMAL"))
    restored.restore()
    rows, propensities = restored.live["k"].table.exposure_propensities()
    assert rows.tolist() == [0, 0] and propensities.tolist() == [first.propensity, again.propensity]
    assert restored.store is not None
    restored.store.close()


def test_guardrail_statistics_follow_a_changed_metric_kind_and_a_restart(tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "r.db", "NORMAL")
    router = Router(ABRouterSettings(), store)
    spec = ExperimentSpec(
        key="k",
        arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)),
        metrics=("m",),
        guardrails=(Guardrail("m", min_units=2),),
    )
    router.create(spec)
    for i in range(40):
        router.assign(f"u{i}", {}, ["k"], log_exposure=True)
    router.record_metrics("k", [Observation(f"u{i}", "m", 2.0) for i in range(0, 40, 4)])
    [event] = router.guardrail_status("k")[0]
    assert event.n_control + event.n_arm == 40  # EVENT: every exposed unit counts
    router.update(replace(spec, metric_kinds={"m": MetricKind.CONTINUOUS}))
    [continuous] = router.guardrail_status("k")[0]
    assert continuous.n_control + continuous.n_arm == 10 and continuous.control_mean == 2.0  # observed units only
    store.close()
    restored = Router(ABRouterSettings(), RouterStore(tmp_path / "r.db", "NORMAL"))
    restored.restore()
    assert restored.guardrail_status("k")[0] == [continuous]
    assert restored.store is not None
    restored.store.close()


def test_concurrent_assignments_agree_while_weights_move(tmp_path: Path) -> None:
    """Sticky arms reach memory only after their commit; while it is in flight a concurrent assignment of the
    same unit (after a weight change) must still get the arm being committed."""
    store = RouterStore(tmp_path / "r.db", "FULL")  # fsync per commit: a wide window while one is in flight
    router = Router(ABRouterSettings(), store)
    spec = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), sticky_bucketing=True)
    router.create(spec)
    units = [f"u{i}" for i in range(4)]
    seen: dict[str, set[int]] = {u: set() for u in units}
    stop = threading.Event()

    def flip() -> None:
        heavy = False
        while not stop.is_set():
            w = (0.1, 0.9) if heavy else (0.9, 0.1)
            router.update(replace(spec, arms=(ArmSpec("a", w[0]), ArmSpec("b", w[1]))))
            heavy = not heavy

    def worker(seed: int) -> None:
        for i in range(300):
            unit = units[(seed * 7 + i) % len(units)]
            [(result, _)] = router.assign(unit, {}, ["k"], log_exposure=True)
            seen[unit].add(result.arm_index)

    flipper = threading.Thread(target=flip)
    flipper.start()
    workers = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    flipper.join()
    live = router.live["k"]
    assert all(len(arms) == 1 for arms in seen.values()), {u: a for u, a in seen.items() if len(a) > 1}
    assert live.pending_sticky == {} and live.pending_exposures == 0
    assert {u: live.sticky[u] for u in units} == {u: next(iter(a)) for u, a in seen.items()}
    assert len(live.table.exposure_propensities()[0]) == 6 * 300
    store.close()
