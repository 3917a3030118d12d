"""abrouter replicas: an exposure still committing below the restore point is not missed (issue #16 item 2).

On PostgreSQL row numbers are handed out at insert, not at commit: a replica starting while another's
exposure (row n) is still committing sees row n + 1 but not n. Its restore must not pass n for good: n is
taken in once it commits. A real PostgreSQL server (tests/postgres.py) and two real connections.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from guardmesh.config import ABRouterSettings
from services.abrouter.experiments import ArmSpec, ExperimentSpec
from services.abrouter.router import Router
from services.abrouter.store import RouterStore
from tests.postgres import PostgresServer

WAIT_S = 30.0
INSERT = (
    "INSERT INTO exposures (key, unit, arm, bucket, propensity, at, config_version, covariates, origin) "
    "VALUES ('k', %s, 0, 0.1, 0.5, %s, 1, '', 'another-replica') RETURNING seq"
)


def test_an_exposure_committing_below_the_restore_point_is_taken_in(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    config = ABRouterSettings(guardrail_interval_s=3600, audit_interval_s=0)
    first = Router(config, RouterStore(url, "NORMAL", shared=True))
    first.create(ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5))))
    first.close()
    assert first.store is not None
    first.store.close()

    slow = psycopg.connect(url)  # another replica's commit, in flight while the router restores
    fast = psycopg.connect(url, autocommit=True)
    try:
        slow_seq = slow.execute(INSERT, ("slow-unit", time.time())).fetchone()
        fast_seq = fast.execute(INSERT, ("fast-unit", time.time())).fetchone()
        assert slow_seq is not None and fast_seq is not None and slow_seq[0] < fast_seq[0]

        router = Router(config, RouterStore(url, "NORMAL", shared=True))
        try:
            router.restore()
            table = router.live["k"].table
            assert "fast-unit" in table and "slow-unit" not in table  # not committed yet: not visible
            slow.commit()
            deadline = time.monotonic() + WAIT_S
            while "slow-unit" not in table:
                if time.monotonic() > deadline:
                    pytest.fail(f"the exposure committed below the restore point was not taken in within {WAIT_S} s")
                router.take_in_others()
                time.sleep(0.05)
            assert len(table) == 2
        finally:
            router.close()
            assert router.store is not None
            router.store.close()
    finally:
        slow.close()
        fast.close()
