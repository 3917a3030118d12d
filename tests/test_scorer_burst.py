"""The scorer's request path under bursts and when idle: the batcher's inline dispatch (a lone caller runs its
rows on its own thread) never overlaps a running batch, keeps errors per caller, and counts its batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from services.scorer.batching import DynamicBatcher


def test_a_lone_caller_runs_its_rows_on_its_own_thread_when_the_batcher_is_idle() -> None:
    ran_on: list[str] = []

    def run(rows: np.ndarray) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        return rows[:, 0] * 2

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=60.0)
    try:
        with batcher.arriving() as arrival:
            [future] = batcher.submit_many(np.full((3, 2), 1.5, np.float32), arrival, inline=True)
        assert future.done()  # answered before submit_many returned: no hand-off to the worker and back
        assert future.result().tolist() == [3.0, 3.0, 3.0]
        assert ran_on == [threading.current_thread().name]
        assert batcher.stats.batches == 1 and batcher.stats.rows == 3 and batcher.stats.reason_log == ["idle"]
    finally:
        batcher.close()


def test_inline_rows_queue_behind_a_running_batch_and_never_run_beside_it() -> None:
    release = threading.Event()
    started = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def run(rows: np.ndarray) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        started.set()
        release.wait(timeout=30)
        with lock:
            running -= 1
        return rows[:, 0]

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0.0)
    try:
        first = batcher.submit(np.zeros((1, 2), np.float32))  # the worker runs it and blocks in the model
        assert started.wait(timeout=30)
        [second] = batcher.submit_many(np.ones((1, 2), np.float32), inline=True)
        assert not second.done()  # queued, not run on this thread while a batch runs
        release.set()
        assert first.result(timeout=30).tolist() == [0.0]
        assert second.result(timeout=30).tolist() == [1.0]
        assert most == 1
        assert batcher.stats.batches == 2
    finally:
        release.set()
        batcher.close()


def test_inline_rows_wait_for_callers_on_their_way() -> None:
    """Another caller announced (parsing its request): the rows queue so that the worker can batch both."""
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=8, max_queue_delay_s=60.0)
    try:
        with batcher.arriving():  # the other caller, still parsing
            with batcher.arriving() as arrival:
                [mine] = batcher.submit_many(np.ones((1, 2), np.float32), arrival, inline=True)
            assert not mine.done()
            [theirs] = batcher.submit_many(np.full((1, 2), 2.0, np.float32), inline=True)
        assert mine.result(timeout=30).tolist() == [1.0] and theirs.result(timeout=30).tolist() == [2.0]
        assert batcher.stats.sizes == [2]  # one batch for both callers
    finally:
        batcher.close()


def test_a_model_error_inline_reaches_only_its_caller_and_the_batcher_keeps_serving() -> None:
    def run(rows: np.ndarray) -> np.ndarray:
        if rows[0, 0] < 0:
            raise RuntimeError("model failed")
        return rows[:, 0]

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0.0)
    try:
        [bad] = batcher.submit_many(np.full((1, 2), -1.0, np.float32), inline=True)
        with pytest.raises(RuntimeError, match="model failed"):
            bad.result(timeout=30)
        [good] = batcher.submit_many(np.full((1, 2), 4.0, np.float32), inline=True)
        assert good.result(timeout=30).tolist() == [4.0]
        queued = batcher.submit(np.full((1, 2), 5.0, np.float32))  # the worker is not left waiting either
        assert queued.result(timeout=30).tolist() == [5.0]
    finally:
        batcher.close()
