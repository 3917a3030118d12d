"""abrouter: the sticky cache is bounded (``abrouter.sticky_cache_units``, least recently used evicted) and a
unit evicted from it keeps its arm, looked up in the store (a real SQLite file, and PostgreSQL shared by two
cores), also after a restart that loads only the newest arms."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from guardmesh.config import ABRouterSettings
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.router import Router
from services.abrouter.store import RouterStore

CAPACITY = 3
SPEC = ExperimentSpec(key="sticky", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), sticky_bucketing=True)
#: After the first units were assigned, every new unit goes to "new": a unit that kept its arm is visible.
ALL_NEW = replace(SPEC, arms=(ArmSpec("control", 0.0), ArmSpec("new", 1.0)))


def router(url: str, shared: bool) -> Router:
    config = ABRouterSettings(guardrail_interval_s=3600, audit_interval_s=0, sticky_cache_units=CAPACITY)
    return Router(config, RouterStore(url, "NORMAL", shared=shared))


def arm_of(r: Router, unit: str) -> int:
    [(assigned, _)] = r.assign(unit, {"id": unit}, ["sticky"], log_exposure=True)
    assert assigned.in_experiment
    return assigned.arm_index


def control_units(r: Router, n: int) -> list[str]:
    """The first ``n`` units (in name order) the 50/50 split puts in control, assigned and recorded."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        unit = f"u{i}"
        i += 1
        if arm_of(r, unit) == 0:
            found.append(unit)
    return found


def close(*routers: Router) -> None:
    for r in routers:
        r.close()
        assert r.store is not None
        r.store.close()


def test_an_evicted_unit_keeps_its_arm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    r = router(url, shared=False)
    try:
        r.create(SPEC)
        early = control_units(r, 2 * CAPACITY)
        st = r.live["sticky"]
        assert len(st.sticky) <= CAPACITY  # bounded, although more units were recorded
        assert st.sticky.evicted and early[0] not in st.sticky
        r.update(ALL_NEW)
        assert arm_of(r, "a-new-unit") == 1
        assert [arm_of(r, u) for u in early] == [0] * len(early)  # evicted ones too, from the store
        assert len(st.sticky) <= CAPACITY
        # offline batch assignment sees the evicted units' arms as well
        arms, _buckets, _exp = r.assign_batch("sticky", early)
        assert list(arms) == [0] * len(early)
    finally:
        close(r)
    # a restart loads at most the cache's worth; the rest still keep their arm
    r = router(url, shared=False)
    try:
        r.restore()
        assert len(r.live["sticky"].sticky) <= CAPACITY
        assert [arm_of(r, u) for u in early] == [0] * len(early)
    finally:
        close(r)


def test_an_evicted_unit_keeps_its_arm_on_a_shared_store(store_url: str) -> None:
    a, b = router(store_url, shared=True), router(store_url, shared=True)
    try:
        a.create(SPEC)
        early = control_units(a, 2 * CAPACITY)
        assert b.sync_config() == ["sticky"]
        b.update(ALL_NEW, expected_version=1)
        assert a.sync_config() == ["sticky"]
        for r in (a, b):
            assert [arm_of(r, u) for u in early] == [0] * len(early)
            assert len(r.live["sticky"].sticky) <= CAPACITY
    finally:
        close(a, b)
