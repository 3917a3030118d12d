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
