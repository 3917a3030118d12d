"""abrouter replicas: the monitor's periodic decisions are fenced by the monitor lease's epoch (issue #16 item 2).

A replica that held the monitor lease, was paused past it (here: its lease simply left to expire while the
other replica takes it over, as after SIGSTOP/SIGCONT) and then decides a bandit update or a guardrail
rollback, has that write refused inside the transaction: nothing of it lands in the store, its memory goes
back to what the store holds, and it keeps serving. Runs on both backends (SQLite file, real PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.errors import Aborted
from guardmesh.leadership import Lease
from services.abrouter.bandit import RewardKind
from services.abrouter.experiments import AllocationMode, ArmSpec, BanditSpec, Experiment, ExperimentSpec
from services.abrouter.router import Router
from services.abrouter.store import RouterStore

WAIT_S = 30.0  # generous: the machine is shared
LEASE_TTL_S = 1.0

BANDIT = ExperimentSpec(
    key="bandit",
    arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)),
    sticky_bucketing=True,
    metrics=("clicks",),
    mode=AllocationMode.BANDIT,
    bandit=BanditSpec(reward_metric="clicks", kind=RewardKind.BERNOULLI, update_interval_s=0.001, min_rewards=0),
)


@pytest.fixture
def pair(store_url: str) -> Iterator[tuple[Router, Router]]:
    """Two router cores, each with its own connection(s) to the store, as two replicas."""
    config = ABRouterSettings(guardrail_interval_s=3600, audit_interval_s=0)
    routers = (Router(config, RouterStore(store_url, "NORMAL", shared=True)) for _ in range(2))
    a, b = routers
    yield a, b
    for r in (a, b):
        r.close()
        assert r.store is not None
        r.store.close()


def take_over(lease: Lease) -> None:
    """Claim ``lease`` until it is held (the previous holder's expiry judged on the store's clock)."""
    deadline = time.monotonic() + WAIT_S
    while not lease.claim().leader:
        if time.monotonic() > deadline:
            pytest.fail(f"lease {lease.name} not taken over within {WAIT_S} s")
        time.sleep(0.05)


def test_a_deposed_monitor_writes_no_bandit_update(pair: tuple[Router, Router]) -> None:
    a, b = pair
    a.create(BANDIT)
    assert b.sync_config() == ["bandit"]
    # a leads the monitor, then is "paused" past its lease: b takes it over with a new epoch
    assert a.store is not None and b.store is not None
    a.monitor_lease = Lease(a.store.log, "abrouter-monitor", "a", "a", LEASE_TTL_S)
    b.monitor_lease = Lease(b.store.log, "abrouter-monitor", "b", "b", LEASE_TTL_S)
    assert a.monitor_lease.claim().leader
    take_over(b.monitor_lease)
    assert b.monitor_lease.epoch == a.monitor_lease.epoch + 1

    # a wakes up and decides a bandit update under its stale epoch: refused, nothing of it lands
    assert a.update_bandits() == []
    assert a.store.versions() == {"bandit": 1}
    kinds = [row[0] for row in a.store.log.query("SELECT kind FROM events WHERE key = 'bandit'")]
    assert "bandit_updated" not in kinds
    # memory back to what the store holds; a keeps serving (no fail-stop)
    assert a.get("bandit")[0].version == 1
    assert [e.kind for e in a.list_events("bandit")] == [k for k in kinds if k != "bandit_updated"]
    [(assigned, _)] = a.assign("u1", {"id": "u1"}, ["bandit"], log_exposure=True)
    assert assigned.in_experiment

    # the new holder's decision lands, and a takes it in
    assert b.update_bandits() == ["bandit"]
    assert b.store.versions() == {"bandit": 2}
    assert a.sync_config() == ["bandit"]
    assert a.get("bandit")[0].version == 2


SPEC = ExperimentSpec(key="shared", arms=(ArmSpec("control", 0.5), ArmSpec("new", 0.5)), sticky_bucketing=True)


def moved(new_weight: float) -> ExperimentSpec:
    """SPEC with the new arm at ``new_weight`` (weights exact: the control's rounded to 1 decimal)."""
    return replace(SPEC, arms=(ArmSpec("control", round(1 - new_weight, 1)), ArmSpec("new", new_weight)))


def test_a_concurrent_edit_of_the_same_version_is_aborted_and_the_replica_keeps_serving(
    pair: tuple[Router, Router],
) -> None:
    """a reads the stored version (1), b commits version 2 in between, a writes its own version 2: the
    revision key collides. a's caller gets ABORTED naming the experiment and the version; nothing of a's
    change lands (revision, row, event); a takes in b's version and keeps serving (no fail-stop)."""
    a, b = pair
    a.create(SPEC)
    assert b.sync_config() == ["shared"]
    assert a.store is not None and b.store is not None
    read = a.store.load_experiment
    raced: list[int] = []

    def read_then_b_writes(key: str) -> Experiment | None:
        # b's edit commits just after a's read of the stored version, before a's own write
        seen = read(key)
        if not raced:
            raced.append(b.update(moved(0.9), comment="b").version)
        return seen

    a.store.load_experiment = read_then_b_writes  # type: ignore[method-assign]
    with pytest.raises(Aborted, match=r"experiment 'shared': version 2 was written first by another replica"):
        a.update(moved(0.2), comment="a")
    a.store.load_experiment = read  # type: ignore[method-assign]
    assert raced == [2]

    # exactly one version 2, b's; a's change left nothing in the store
    revisions = a.store.log.query("SELECT version, comment FROM revisions WHERE key = 'shared' ORDER BY version")
    assert [tuple(r) for r in revisions] == [(1, ""), (2, "b")]
    stored = a.store.load_experiment("shared")
    assert stored is not None and stored.weights == (0.1, 0.9)
    messages = [r[0] for r in a.store.log.query("SELECT message FROM events WHERE key = 'shared'")]
    assert not any(m.endswith(": a") for m in messages)
    # a's memory is b's version; a keeps serving and editing
    assert a.get("shared")[0].weights == (0.1, 0.9)
    assert a.get("shared")[0].version == 2
    assert not any(e.message.endswith(": a") for e in a.list_events("shared"))
    [(assigned, _)] = a.assign("u1", {"id": "u1"}, ["shared"], log_exposure=True)
    assert assigned.config_version == 2
    assert a.update(moved(0.3), comment="a again").version == 3
    assert b.sync_config() == ["shared"]
    assert b.get("shared")[0].weights == (0.7, 0.3)


def test_concurrent_creates_of_one_key_are_one_experiment(pair: tuple[Router, Router]) -> None:
    """Both replicas create the same key at once (neither has seen the other's): one wins version 1, the
    other is ABORTED and serves the winner's experiment."""
    a, b = pair
    assert a.store is not None
    read = a.store.load_experiment

    def read_then_b_creates(key: str) -> Experiment | None:
        seen = read(key)
        if "shared" not in b.live:
            b.create(moved(0.9))
        return seen

    a.store.load_experiment = read_then_b_creates  # type: ignore[method-assign]
    with pytest.raises(Aborted, match="experiment 'shared': version 1 was written first"):
        a.create(moved(0.2))
    a.store.load_experiment = read  # type: ignore[method-assign]
    assert a.get("shared")[0].weights == (0.1, 0.9)
    assert a.store.versions() == {"shared": 1}
    assert len(a.store.log.query("SELECT 1 FROM events WHERE key = 'shared'")) == 1
