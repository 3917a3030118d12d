"""Dynamic batching across concurrent requests, in the manner of Triton's dynamic batcher.

Requests wait in a bounded queue; a worker takes the oldest, then keeps taking until the batch holds
``max_batch_size`` rows or ``max_queue_delay_s`` has passed since the oldest arrived, runs the model once
and hands each request its rows. A full queue is refused at once (RESOURCE_EXHAUSTED), never buffered
without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from guardmesh.errors import InvalidArgument, ResourceExhausted, Unavailable


@dataclass
class _Pending:
    rows: np.ndarray
    future: Future[np.ndarray]
    arrived: float


@dataclass
class BatchStats:
    """What the batcher did (for metrics and tests)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)


class DynamicBatcher:
    """Batches rows for one model version; ``run`` maps (n, features) float32 to (n,) scores."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.002,
        max_queue_rows: int = 4096,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise InvalidArgument("max_batch_size", "must be >= 1")
        if max_queue_delay_s < 0:
            raise InvalidArgument("max_queue_delay_s", "must be >= 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_rows = max_queue_rows
        self.queue: deque[_Pending] = deque()
        self.queued_rows = 0
        self.cond = threading.Condition()
        self.stats = BatchStats()
        self.closed = False
        self.worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self.worker.start()

    def submit(self, rows: np.ndarray) -> Future[np.ndarray]:
        """Queue rows (a (n, features) array, n <= max_batch_size); the future gets their n scores."""
        if rows.ndim != 2 or rows.shape[0] < 1:
            raise InvalidArgument("rows", "must be a non-empty (rows, features) array")
        if rows.shape[0] > self.max_batch_size:
            raise InvalidArgument("rows", f"at most {self.max_batch_size} rows per request (got {rows.shape[0]})")
        future: Future[np.ndarray] = Future()
        with self.cond:
            if self.closed:
                raise Unavailable("the model version is being unloaded")
            if self.queued_rows + rows.shape[0] > self.max_queue_rows:
                raise ResourceExhausted(
                    f"scoring queue full ({self.queued_rows} rows waiting, bound {self.max_queue_rows}); retry later"
                )
            self.queue.append(_Pending(rows, future, time.monotonic()))
            self.queued_rows += rows.shape[0]
            self.cond.notify()
        return future

    def _take(self) -> list[_Pending] | None:
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            if not self.queue:
                return None
            deadline = self.queue[0].arrived + self.max_queue_delay_s
            while self.queued_rows < self.max_batch_size and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch: list[_Pending] = []
            size = 0
            while self.queue and size + self.queue[0].rows.shape[0] <= self.max_batch_size:
                item = self.queue.popleft()
                size += item.rows.shape[0]
                batch.append(item)
            self.queued_rows -= size
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            rows = np.concatenate([p.rows for p in batch]) if len(batch) > 1 else batch[0].rows
            try:
                scores = self.run(rows)
            except Exception as exc:
                for p in batch:
                    p.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.rows += rows.shape[0]
            self.stats.largest = max(self.stats.largest, rows.shape[0])
            if len(self.stats.sizes) < 10_000:
                self.stats.sizes.append(rows.shape[0])
            start = 0
            for p in batch:
                n = p.rows.shape[0]
                p.future.set_result(scores[start : start + n])
                start += n

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.worker.join(timeout=10)
