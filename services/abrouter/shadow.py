"""Shadow traffic: mirror a share of live requests to a shadow model version, compare, never serve.

The live path only *offers* a request to a bounded queue (``put_nowait``): a full queue drops the mirror
and counts it, so the live response never waits on the shadow model. Worker threads call the scorer with
``shadow=True`` (the scorer records nothing for it), and each comparison (live vs shadow score and
decision) is kept per experiment and handed to ``on_result`` for the durable log.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("guardmesh.abrouter.shadow")


@dataclass(frozen=True)
class ScoreCall:
    """One call to the scorer."""

    model: str
    version: str
    request_id: str
    features: Mapping[str, float]
    experiment: str
    arm: str
    shadow: bool = False


@dataclass(frozen=True)
class ScoreResult:
    """What the router needs of a score: the value, the decision and the version that answered."""

    score: float
    decision: bool
    model_version: str
    #: The transport's own answer (the ScoreResponse message), passed through to the caller.
    raw: object = None


#: Scores one call; raises on failure. Supplied by the server (a gRPC client of the scorer).
ScoreFn = Callable[[ScoreCall], ScoreResult]


@dataclass
class ShadowStats:
    """Running comparison of one experiment's shadow traffic."""

    shadow_version: str = ""
    mirrored: int = 0
    compared: int = 0
    dropped: int = 0
    errors: int = 0
    agreements: int = 0
    abs_diff_sum: float = 0.0

    @property
    def decision_agreement(self) -> float:
        """Share of comparisons where both decisions agree (NaN before the first)."""
        return self.agreements / self.compared if self.compared else float("nan")

    @property
    def mean_abs_score_diff(self) -> float:
        """Mean |shadow - live| score (NaN before the first comparison)."""
        return self.abs_diff_sum / self.compared if self.compared else float("nan")

    def add(self, live: ScoreResult, shadow: ScoreResult) -> None:
        """Count one comparison."""
        self.compared += 1
        self.agreements += int(live.decision == shadow.decision)
        self.abs_diff_sum += abs(shadow.score - live.score)


@dataclass(frozen=True)
class _Job:
    key: str
    call: ScoreCall
    live: ScoreResult
    #: Trace context of the live request: the shadow call is a child span of it, in the same trace.
    context: otel_context.Context


class ShadowMirror:
    """Bounded queue plus worker threads that run shadow calls off the live path."""

    def __init__(
        self,
        score: ScoreFn,
        *,
        queue_size: int,
        workers: int,
        on_result: Callable[[str, ScoreCall, ScoreResult, ScoreResult], None] | None = None,
    ) -> None:
        self._score = score
        self._on_result = on_result
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self.stats: dict[str, ShadowStats] = {}
        self._threads = [threading.Thread(target=self._work, name=f"shadow-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def _stats(self, key: str, version: str) -> ShadowStats:
        stats = self.stats.get(key)
        if stats is None or stats.shadow_version != version:
            stats = self.stats[key] = ShadowStats(shadow_version=version)
        return stats

    def offer(self, key: str, call: ScoreCall, live: ScoreResult) -> bool:
        """Queue a shadow call without waiting; False (counted as dropped) when the queue is full."""
        with self._lock:
            stats = self._stats(key, call.version)
            try:
                self._queue.put_nowait(_Job(key, call, live, otel_context.get_current()))
            except queue.Full:
                stats.dropped += 1
                return False
            stats.mirrored += 1
            self._pending += 1
            return True

    def restore(self, key: str, version: str, live: ScoreResult, shadow: ScoreResult) -> None:
        """Count a comparison read back from the durable log at start."""
        with self._lock:
            self._stats(key, version).add(live, shadow)

    def snapshot(self, key: str) -> ShadowStats:
        """A copy of one experiment's stats."""
        with self._lock:
            s = self.stats.get(key, ShadowStats())
            return ShadowStats(**vars(s))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _run(self, job: _Job) -> None:
        token = otel_context.attach(job.context)
        try:
            with _tracer.start_as_current_span(
                "abrouter.shadow",
                attributes={
                    "guardmesh.experiment": job.key,
                    "guardmesh.arm": job.call.arm,
                    "guardmesh.shadow_version": job.call.version,
                    "guardmesh.live_version": job.live.model_version,
                },
            ) as span:
                self._compare(job, span)
        finally:
            otel_context.detach(token)

    def _compare(self, job: _Job, span: trace.Span) -> None:
        try:
            result = self._score(job.call)
        except Exception as exc:  # a failing shadow model must never affect live traffic
            log.warning("shadow call failed", extra={"experiment": job.key, "error": str(exc)})
            with self._lock:
                self._stats(job.key, job.call.version).errors += 1
            return
        span.set_attribute("guardmesh.shadow_decision", result.decision)
        span.set_attribute("guardmesh.live_decision", job.live.decision)
        span.set_attribute("guardmesh.score_diff", result.score - job.live.score)
        if self._on_result is not None:
            try:
                self._on_result(job.key, job.call, job.live, result)
            except Exception as exc:
                log.warning("shadow result not recorded", extra={"experiment": job.key, "error": str(exc)})
        with self._lock:
            self._stats(job.key, job.call.version).add(job.live, result)

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every queued shadow call is done (at most ``timeout`` seconds); True if all are."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Stop the workers (queued calls that did not start are abandoned: they are shadows)."""
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                break
        for t in self._threads:
            t.join(timeout=5.0)
