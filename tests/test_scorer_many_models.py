"""A ScoreMany call naming several models queues every model's rows before any runs: none runs on the
caller's thread ahead of the next model's rows being queued."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from guardmesh.config import load_config
from services.scorer.scorer import ScoreCall, Scorer
from tests.test_scorer_store import FEATURES, registration


def _record_threads(core: Scorer, model: str, seen: list[tuple[str, str]]) -> None:
    """Wrap the active version's batch runner to note which thread ran each batch."""
    batcher = core._state(core.lines[model], "v1").batcher
    run: Callable[[np.ndarray], np.ndarray] = batcher.run

    def noted(rows: np.ndarray) -> np.ndarray:
        seen.append((model, threading.current_thread().name))
        return run(rows)

    batcher.run = noted


def test_several_models_are_all_queued_before_any_runs() -> None:
    core = Scorer(load_config(env={}).scorer, torch.device("cpu"))
    try:
        core.register(registration("v1", [1.0, 0.0]), activate=True)
        core.register(replace(registration("v1", [0.0, 1.0]), model="fraud"), activate=True)
        seen: list[tuple[str, str]] = []
        _record_threads(core, "risk", seen)
        _record_threads(core, "fraud", seen)
        row = {f: 0.3 for f in FEATURES}
        outcomes = core.score_many([ScoreCall("risk", "a", row), ScoreCall("fraud", "b", row)])
        assert all(not isinstance(o, Exception) for o in outcomes)
        caller = threading.current_thread().name
        assert {m for m, _ in seen} == {"risk", "fraud"}
        assert all(thread != caller for _, thread in seen), seen
    finally:
        core.close()
