"""A Score refused UNAVAILABLE because its decisions could not be stored leaves no trace: its rows are not in
the live window, the missing-value monitor or the drift count (a real SQLite commit that fails)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from guardmesh.config import load_config
from guardmesh.errors import Unavailable
from services.scorer.persistence import open_shared_registry
from services.scorer.scorer import Scorer
from tests.test_scorer_store import FEATURES, registration


def test_a_refused_score_leaves_the_live_window_and_monitors_unchanged(tmp_path: Path) -> None:
    store = open_shared_registry(f"sqlite:///{tmp_path}/s.db", str(tmp_path / "art"), "a")
    core = Scorer(load_config(env={}).scorer, torch.device("cpu"), store)
    try:
        core.register(registration("v1", [1.0, 0.0]), activate=True)
        core.score("risk", "r0", {f: 0.1 for f in FEATURES})
        line = core.lines["risk"]
        assert line.missing is not None
        before = (core.live_rows("risk").tolist(), line.rows_since_drift, line.missing.rates().tolist())
        db = getattr(store.log, "db", None)
        assert db is not None
        db.execute(
            "CREATE TRIGGER fail_decisions BEFORE INSERT ON scorer_decisions "
            "BEGIN SELECT RAISE(ABORT, 'injected failure (disk full)'); END"
        )
        with pytest.raises(Unavailable, match="scorer store unavailable"):
            core.score("risk", "r1", {FEATURES[0]: math.nan, FEATURES[1]: 5.0})
        after = (core.live_rows("risk").tolist(), line.rows_since_drift, line.missing.rates().tolist())
        assert after == before
        assert not np.isnan(core.live_rows("risk")).any()
    finally:
        core.close()
        store.log.close()


def test_the_next_groups_forward_runs_while_a_groups_commit_is_held_and_answers_wait_for_their_commit(
    tmp_path: Path,
) -> None:
    """scorer.commit_ahead on: a group's callers are answered only once its decisions are in SQLite (held here
    by another connection's write lock); the next group is parsed and run through the model meanwhile; the
    live window takes both groups, in order, once their commits are done."""
    import asyncio
    import sqlite3
    import time

    from services.scorer.scorer import ScoreCall, ScoreOutcome

    store = open_shared_registry(f"sqlite:///{tmp_path}/s.db", str(tmp_path / "art"), "a")
    core = Scorer(load_config(env={"GUARDMESH__SCORER__COMMIT_AHEAD": "true"}).scorer, torch.device("cpu"), store)
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        core.register(registration("v1", [1.0, 0.0]), activate=True)
        batcher = core.lines["risk"].versions["v1"].batcher

        async def scenario() -> tuple[bool, int, object, object]:
            holder.execute("BEGIN IMMEDIATE")  # the decision log cannot commit until this ends
            first = asyncio.ensure_future(core.score_async(ScoreCall("risk", "r0", {"amount": 0.25, "velocity": 1.0})))
            second = None
            deadline = time.monotonic() + 30
            while batcher.stats.batches < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            second = asyncio.ensure_future(core.score_async(ScoreCall("risk", "r1", {"amount": 0.5, "velocity": 2.0})))
            while batcher.stats.batches < 2:  # the second group's forward, the first's commit still held
                assert time.monotonic() < deadline, "the next group did not run while the commit was held"
                await asyncio.sleep(0.005)
            answered_early = first.done() or second.done()
            live_before = len(core.live_rows("risk"))
            holder.execute("COMMIT")
            return answered_early, live_before, await asyncio.wait_for(first, 30), await asyncio.wait_for(second, 30)

        answered_early, live_before, first, second = asyncio.run(scenario())
        assert not answered_early and live_before == 0  # nothing answered or taken in before its commit
        assert isinstance(first, ScoreOutcome) and isinstance(second, ScoreOutcome)
        assert first.decision.score is not None and second.decision.score is not None
        np.testing.assert_array_equal(core.live_rows("risk"), np.array([[0.25, 1.0], [0.5, 2.0]], np.float32))
        stored = holder.execute("SELECT request_id FROM scorer_decisions ORDER BY request_id").fetchall()
        assert [r[0] for r in stored] == ["r0", "r1"]
    finally:
        holder.close()
        core.close()
        store.log.close()
