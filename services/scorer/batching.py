"""Dynamic batching across concurrent requests, in the manner of Triton's dynamic batcher.

Requests wait in a bounded queue; one worker per model version forms batches and runs the model once per
batch. A batch is dispatched as soon as one of these holds, whichever comes first:

* ``preferred``: the rows taken reach ``preferred_batch_size`` (default ``max_batch_size``);
* ``idle``: no more rows are queued and no caller is on its way to the queue (callers announce themselves
  with :meth:`DynamicBatcher.arriving` while they parse their request), so a lone caller never waits;
* ``delay``: ``max_queue_delay_s`` has passed since the oldest row arrived: the upper bound on waiting for
  callers that announced themselves;
* ``closing``: the batcher is closing and runs what is left.

While the model runs, new requests queue up and form the next batch, so concurrent callers share batches
without any waiting. A full queue is refused at once (RESOURCE_EXHAUSTED), never buffered without bound.

A caller may ask to run its rows itself (``submit_many(..., inline=True)``): when nothing is queued, no other
caller is on its way and no batch is running, the rows form an ``idle`` batch at once on the caller's thread,
exactly as the worker would have dispatched them, without the two thread hand-offs (to the worker and back)
that would otherwise cost more than a small model's forward. Otherwise the rows queue as usual.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from guardmesh.errors import InvalidArgument, ResourceExhausted, Unavailable

#: Why a batch was dispatched (see the module docstring).
DISPATCH_REASONS = ("preferred", "idle", "delay", "closing")


@dataclass
class Arrival:
    """A caller announced by :meth:`DynamicBatcher.arriving`; ``done`` once its rows are queued."""

    done: bool = False


@dataclass
class _Pending:
    rows: np.ndarray
    future: Future[np.ndarray]
    arrived: float


@dataclass
class BatchStats:
    """What the batcher did (for metrics and tests): batches, rows, and why each batch left."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    #: The dispatch reason of each of the first 10,000 batches, in order (parallel to ``sizes``).
    reason_log: list[str] = field(default_factory=list)
    #: When the last batch ran (Unix time, seconds; 0: never).
    last_at: float = 0.0


class DynamicBatcher:
    """Batches rows for one model version; ``run`` maps (n, features) float32 to (n,) scores."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.002,
        max_queue_rows: int = 4096,
        preferred_batch_size: int | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise InvalidArgument("max_batch_size", "must be >= 1")
        if max_queue_delay_s < 0:
            raise InvalidArgument("max_queue_delay_s", "must be >= 0")
        preferred = max_batch_size if preferred_batch_size is None else preferred_batch_size
        if not 1 <= preferred <= max_batch_size:
            raise InvalidArgument("preferred_batch_size", f"must be 1 to max_batch_size ({max_batch_size})")
        self.run = run
        self.max_batch_size = max_batch_size
        self.preferred_batch_size = preferred
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_rows = max_queue_rows
        self.queue: deque[_Pending] = deque()
        self.queued_rows = 0
        self.incoming = 0  # callers between arriving() and submit(): rows that are about to be queued
        self.cond = threading.Condition()
        self.stats = BatchStats()
        self.closed = False
        self.running = False  # a batch is running (on the worker or inline on a caller's thread)
        self.worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self.worker.start()

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Announce a caller that will submit soon (while it parses its request), so the worker may wait
        for it (up to the delay) instead of dispatching a smaller batch. Passing the arrival to
        :meth:`submit_many` ends the announcement in the same step as the rows are queued (no second
        wake-up of the worker); leaving the block ends it otherwise."""
        arrival = Arrival()
        with self.cond:
            self.incoming += 1
        try:
            yield arrival
        finally:
            if not arrival.done:
                with self.cond:
                    self._arrived(arrival)
                    self.cond.notify_all()

    def _arrived(self, arrival: Arrival | None) -> None:
        if arrival is not None and not arrival.done:  # under self.cond
            arrival.done = True
            self.incoming -= 1

    def submit(self, rows: np.ndarray, arrival: Arrival | None = None) -> Future[np.ndarray]:
        """Queue rows (a (n, features) array, n <= max_batch_size); the future gets their n scores."""
        return self.submit_many(rows, arrival, _limit=True)[0]

    def submit_many(
        self, rows: np.ndarray, arrival: Arrival | None = None, *, inline: bool = False, _limit: bool = False
    ) -> list[Future[np.ndarray]]:
        """Queue any number of rows in chunks of at most ``max_batch_size``; one future per chunk, in order.

        All chunks are queued at once, so a large request fills whole batches; a queue without room for
        all of them refuses them all (RESOURCE_EXHAUSTED, or INVALID_ARGUMENT for more rows than the queue
        bound), and queues nothing. With ``inline``, rows that fit one batch while the batcher is idle (see
        the module docstring) run on this thread before this returns; their future is then already done.
        """
        n = rows.shape[0] if rows.ndim == 2 else 0
        if n < 1:
            raise InvalidArgument("rows", "must be a non-empty (rows, features) array")
        if _limit and n > self.max_batch_size:
            raise InvalidArgument("rows", f"at most {self.max_batch_size} rows per request (got {n})")
        if n > self.max_queue_rows:  # could never be queued: not a reason to retry
            raise InvalidArgument("rows", f"at most {self.max_queue_rows} rows at once, the queue bound (got {n})")
        chunks = [rows[i : i + self.max_batch_size] for i in range(0, n, self.max_batch_size)]
        futures: list[Future[np.ndarray]] = [Future() for _ in chunks]
        run_here = False
        with self.cond:
            try:
                if self.closed:
                    raise Unavailable("the model version is being unloaded")
                if self.queued_rows + n > self.max_queue_rows:
                    raise ResourceExhausted(
                        f"scoring queue full ({self.queued_rows} rows waiting, bound {self.max_queue_rows}); "
                        "retry later"
                    )
                self._arrived(arrival)
                if inline and len(chunks) == 1 and not self.queue and not self.running and self.incoming == 0:
                    self.running = True  # the worker takes no batch until this one is done
                    run_here = True
                else:
                    now = time.monotonic()
                    for chunk, future in zip(chunks, futures, strict=True):
                        self.queue.append(_Pending(chunk, future, now))
                    self.queued_rows += n
            finally:
                self._arrived(arrival)
                if not run_here:  # running here changes nothing the worker waits for: no wake-up
                    self.cond.notify_all()
        if run_here:
            self._execute([_Pending(rows, futures[0], 0.0)], "idle")
        return futures

    def _take(self) -> tuple[list[_Pending], str] | None:
        with self.cond:
            while (not self.queue or self.running) and not (self.closed and not self.running):
                self.cond.wait()
            if not self.queue:
                return None
            deadline = self.queue[0].arrived + self.max_queue_delay_s
            reason = "preferred"
            while self.queued_rows < self.preferred_batch_size:
                if self.closed:
                    reason = "closing"
                    break
                if self.incoming == 0:
                    reason = "idle"  # nothing else is on its way: waiting would only add latency
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = "delay"
                    break
                self.cond.wait(left)
            batch: list[_Pending] = []
            size = 0
            while self.queue and size + self.queue[0].rows.shape[0] <= self.max_batch_size:
                item = self.queue.popleft()
                size += item.rows.shape[0]
                batch.append(item)
            self.queued_rows -= size
            self.running = True
            return batch, reason

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            self._execute(*taken)

    def _execute(self, batch: list[_Pending], reason: str) -> None:
        """Run one batch (``self.running`` is set: by ``_take`` on the worker, by ``submit_many`` inline)
        and resolve its futures; then let the worker take the next batch."""
        try:
            rows = np.concatenate([p.rows for p in batch]) if len(batch) > 1 else batch[0].rows
            try:
                scores = self.run(rows)
            except Exception as exc:
                for p in batch:
                    p.future.set_exception(exc)
                return
            self._count(rows.shape[0], reason)
            start = 0
            for p in batch:
                n = p.rows.shape[0]
                p.future.set_result(scores[start : start + n])
                start += n
        finally:
            with self.cond:
                self.running = False
                if self.queue or self.closed:  # the worker waits for both, never for an empty queue
                    self.cond.notify_all()

    def _count(self, n: int, reason: str) -> None:
        self.stats.batches += 1
        self.stats.rows += n
        self.stats.largest = max(self.stats.largest, n)
        self.stats.reasons[reason] += 1
        self.stats.last_at = time.time()
        if len(self.stats.sizes) < 10_000:
            self.stats.sizes.append(n)
            self.stats.reason_log.append(reason)

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.worker.join(timeout=10)
