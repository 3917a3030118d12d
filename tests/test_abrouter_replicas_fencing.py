"""abrouter replicas: the monitor's periodic decisions are fenced by the monitor lease's epoch (issue #16 item 2).

A replica that held the monitor lease, was paused past it (here: its lease simply left to expire while the
other replica takes it over, as after SIGSTOP/SIGCONT) and then decides a bandit update or a guardrail
rollback, has that write refused inside the transaction: nothing of it lands in the store, its memory goes
back to what the store holds, and it keeps serving. Runs on both backends (SQLite file, real PostgreSQL).
"""

from __future__ import annotations

import time

import pytest

from guardmesh.config import ABRouterSettings
from guardmesh.leadership import Lease
from services.abrouter.bandit import RewardKind
from services.abrouter.experiments import AllocationMode, ArmSpec, BanditSpec, ExperimentSpec
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


def take_over(lease: Lease) -> None:
    """Claim ``lease`` until it is held (the previous holder's expiry judged on the store's clock)."""
    deadline = time.monotonic() + WAIT_S
    while not lease.claim().leader:
        if time.monotonic() > deadline:
            pytest.fail(f"lease {lease.name} not taken over within {WAIT_S} s")
        time.sleep(0.05)


def test_a_deposed_monitor_writes_no_bandit_update(store_url: str) -> None:
    config = ABRouterSettings(guardrail_interval_s=3600, audit_interval_s=0)
    a = Router(config, RouterStore(store_url, "NORMAL", shared=True))
    b = Router(config, RouterStore(store_url, "NORMAL", shared=True))
    try:
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
    finally:
        for r in (a, b):
            r.close()
            assert r.store is not None
            r.store.close()
