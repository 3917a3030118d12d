"""One model on one parameter-server shard: versions, staleness, dedupe, aggregation and stats.

Staleness = current version - base version of a push. SYNC buffers the gradients of the current version's
pushes and applies their average as one step once ``workers`` of them arrived (fewer after members left or
timed out; see ``SyncMembership``); with backup workers, the pushes of a version that arrive after it
completed are answered LATE. BOUNDED_STALENESS applies each push at once when its staleness is within the
bound; ASYNC applies everything. A push is validated completely (names, shapes, NaN/Inf) before anything
changes, and a retried push (same worker, session and step id) is answered from the step-id window without
being applied twice.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

import numpy as np

from guardmesh.errors import Aborted, FailedPrecondition, InvalidArgument
from guardmesh.tensors import wire_array
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb
from native import aggregate as _agg  # type: ignore[attr-defined]
from native import buffers
from services.paramserver.frames import AnswerBuffer, frame_answer
from services.paramserver.gradients import Gradient, contiguous, nonfinite
from services.paramserver.optimizer import OptimizerSettings, ServerOptimizer

T = TypeVar("T")
STALENESS_BUCKETS = 17  # 0..15 and ">= 16"
#: Sessions whose step-id windows are kept per worker: a restarted worker is a new session; older ones go.
SESSIONS_PER_WORKER = 8
#: SYNC's straggler timeout when ConsistencyConfig.straggler_timeout_s is 0, seconds.
DEFAULT_STRAGGLER_TIMEOUT_S = 30.0


class Mode(IntEnum):
    """Numbers match ``guardmesh.v1.ConsistencyMode``."""

    SYNC = 1
    BOUNDED_STALENESS = 2
    ASYNC = 3


class Outcome(IntEnum):
    """Numbers match ``guardmesh.v1.PushOutcome``."""

    APPLIED = 1
    BUFFERED = 2
    DUPLICATE = 3
    LATE = 4


@dataclass(frozen=True)
class ConsistencySettings:
    """Validated consistency settings."""

    mode: Mode
    workers: int = 1
    backup_workers: int = 0
    max_staleness: int = 0
    scale_lr_by_staleness: bool = False
    straggler_timeout_s: float = 0.0

    @property
    def straggler_timeout(self) -> float:
        """SYNC's straggler timeout in seconds, the default filled in."""
        return self.straggler_timeout_s or DEFAULT_STRAGGLER_TIMEOUT_S

    def validate(self) -> None:
        """Raise InvalidArgument naming the field."""
        if self.mode == Mode.SYNC and not 1 <= self.workers <= 4096:
            raise InvalidArgument("consistency.workers", f"must be 1 to 4096 in SYNC mode (got {self.workers})")
        if not 0 <= self.backup_workers <= 4096:
            raise InvalidArgument("consistency.backup_workers", "must be 0 to 4096")
        if not 0 <= self.max_staleness <= 1_000_000:
            raise InvalidArgument("consistency.max_staleness", "must be 0 to 1,000,000")
        if not (math.isfinite(self.straggler_timeout_s) and 0 <= self.straggler_timeout_s <= 86_400):
            raise InvalidArgument("consistency.straggler_timeout_s", "must be 0 to 86,400 seconds (0: 30 s)")


@dataclass(frozen=True)
class TensorMeta:
    """Wire dtype and shape of a stored tensor."""

    dtype: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Element count."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class PushResult:
    """What a push did."""

    outcome: Outcome
    version: int
    staleness: int
    lr_scale: float
    #: The version that includes this push (a buffered SYNC push completes the next one; a duplicate, its
    #: original's): what a pull after it waits for. Derived from the outcome unless given.
    completes: int = -1

    def __post_init__(self) -> None:
        if self.completes < 0:
            object.__setattr__(
                self, "completes", self.version + 1 if self.outcome == Outcome.BUFFERED else self.version
            )


@dataclass
class ThroughputMonitor:
    """Accepted pushes per second over a window, and an event when the rate falls to ``drop_share`` of its
    peak since the last event, or lower.

    The reference is the peak, not a moving average: an average follows a gradual decline down and never
    fires. After an event the peak restarts from the current rate, so one drop is one event and a further
    fall to the share of the new level is another. No rate counts before a full window has passed since the
    first push (a partly filled window is not a rate).
    """

    window_s: float = 10.0
    drop_share: float = 0.5
    stamps: deque[float] = field(default_factory=deque)
    peak: float = 0.0
    started: float | None = None

    def record(self, now: float) -> None:
        """Count one accepted push."""
        if self.started is None:
            self.started = now
        self.stamps.append(now)

    def rate(self, now: float) -> float:
        """Accepted pushes per second over the last window."""
        while self.stamps and self.stamps[0] <= now - self.window_s:
            self.stamps.popleft()
        return len(self.stamps) / self.window_s

    def check(self, now: float) -> str | None:
        """An event message when the rate fell to ``drop_share`` of the peak or below (once per drop)."""
        if self.started is None or now - self.started < self.window_s:
            return None
        current = self.rate(now)
        if current > self.peak:
            self.peak = current
            return None
        # A relative tolerance: 4.5/s against half of 9.0/s is a drop to the share, whatever the rounding.
        if self.peak > 0 and current <= self.drop_share * self.peak * (1 + 1e-9):
            event = (
                f"push throughput fell to {current:.2f}/s, {current / self.peak:.0%} of its peak "
                f"{self.peak:.2f}/s (threshold {self.drop_share:.0%})"
            )
            self.peak = current
            return event
        return None


@dataclass
class SyncMembership:
    """SYNC's workers: who is a member, and how many pushes complete a version.

    A version completes with ``workers`` pushes while no timeout has happened. When the current version's
    first push has waited ``timeout`` seconds, the version completes with the pushes it has and every
    worker that pushed nothing for that long leaves; from then on a version needs
    ``min(workers, members)`` pushes, so a departed worker stalls one version, not all. A worker that pushes
    is a member again; ``leave`` removes one at once.
    """

    workers: int
    timeout: float
    members: dict[str, float] = field(default_factory=dict)
    reduced: bool = False
    first_push: float | None = None

    def quorum(self) -> int:
        """Pushes that complete a version now."""
        return max(1, min(self.workers, len(self.members))) if self.reduced else self.workers

    def seen(self, worker: str, now: float) -> None:
        """``worker`` pushed (or was late) at ``now``."""
        self.members[worker] = now
        if self.reduced and len(self.members) >= self.workers:
            self.reduced = False

    def expired(self, now: float, buffered: set[str]) -> bool:
        """True when the current version waited too long: then the members that stayed silent leave."""
        if self.first_push is None or now - self.first_push < self.timeout:
            return False
        self.members = {w: t for w, t in self.members.items() if w in buffered or t > now - self.timeout}
        self.reduced = True
        return True

    def leave(self, worker: str) -> None:
        """``worker`` leaves the membership now."""
        self.members.pop(worker, None)
        self.reduced = True


class ModelShard:
    """A model's tensors on this shard. Thread-safe: one condition guards everything."""

    def __init__(
        self,
        name: str,
        tensors: dict[str, tuple[TensorMeta, np.ndarray]],
        optimizer: OptimizerSettings,
        consistency: ConsistencySettings,
        checkpoint_every: int,
        incarnation: str,
        *,
        step_window: int = 4096,
        clock: Any = time.monotonic,
        throughput_window_s: float = 10.0,
        throughput_drop_share: float = 0.5,
        answer_limit: int = 0,
        cut_shards: tuple[int, ...] = (0,),
    ) -> None:
        """``answer_limit``: the largest answer in bytes; a shard whose tensors are all float32 on the wire and
        fit in one answer keeps them in an :class:`AnswerBuffer` (0: never). ``cut_shards``: the shard
        indices holding a part of the model (a checkpoint cut needs each of them)."""
        self.name = name
        self.cut_shards = cut_shards
        self.meta = {n: m for n, (m, _) in tensors.items()}
        self.answers: AnswerBuffer | None = None
        layout = [(n, m.shape, m.size) for n, m in self.meta.items()]
        float32 = all(m.dtype == common_pb2.D_TYPE_FLOAT32 for m in self.meta.values())
        if float32 and buffers.SAFE and AnswerBuffer.answer_size(layout) <= answer_limit:
            self.answers = AnswerBuffer(layout)
        if self.answers is not None:
            self.masters = self.answers.arrays
            for n, (_, v) in tensors.items():
                self.masters[n][:] = np.asarray(v, dtype=np.float32).reshape(-1)
        else:
            self.masters = {n: np.ascontiguousarray(v, dtype=np.float32).copy() for n, (_, v) in tensors.items()}
        self.scratch = {n: np.empty_like(v) for n, v in self.masters.items()}
        self.optimizer_settings = optimizer
        self.optimizer = ServerOptimizer(optimizer, self.masters)
        self.consistency = consistency
        self.checkpoint_every = checkpoint_every
        self.incarnation = incarnation
        self.version = 0
        self.restored_version = -1
        #: See ModelInfo.restore_cause; ``causes``: the roll backs already done (RestoreCut is idempotent).
        self.restore_cause = ""
        self.causes: list[str] = []
        self.cond = threading.Condition()
        self.step_window = step_window
        #: Step-id windows by worker, then by session (a restarted worker is a new session).
        self.seen: dict[str, OrderedDict[str, OrderedDict[int, PushResult]]] = {}
        #: SYNC: the current version's pushes by worker, with the norm each is clipped by (0: unknown).
        self.sync_buffer: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        #: SYNC: the session of each buffered push.
        self.sync_sessions: dict[str, str] = {}
        self.membership = SyncMembership(consistency.workers, consistency.straggler_timeout)
        self.clock = clock
        #: Called under the lock with each checkpoint payload taken at a multiple of ``checkpoint_every``.
        self.on_snapshot: Callable[[tuple[int, dict[str, np.ndarray], dict[str, Any]]], None] | None = None
        self.accepted = 0
        self.late = 0
        self.rejected_stale = 0
        self.rejected_nonfinite = 0
        self.duplicates = 0
        self.answers_in_place = 0
        self.answers_copied = 0
        # Counted as pushes arrive (stale rejections included, retries not); the Prometheus histogram counts
        # answered pushes instead (retries included, rejections not): see GetStatsResponse.staleness.
        self.staleness_hist = [0] * STALENESS_BUCKETS
        self.throughput = ThroughputMonitor(throughput_window_s, throughput_drop_share)
        self.events: deque[str] = deque(maxlen=100)

    # -- reading ---------------------------------------------------------------------------------------

    def wait_version(self, min_version: int, timeout: float | None) -> bool:
        """Block until ``version >= min_version`` (or the timeout); True if reached.

        In SYNC a waiter also completes a version whose straggler timeout passed (``tick``): whoever waits
        for a version is who needs it, so no timer thread is needed for it.
        """
        end = None if timeout is None else time.monotonic() + timeout
        poll = max(0.01, self.consistency.straggler_timeout / 10) if self.consistency.mode == Mode.SYNC else None
        with self.cond:
            while self.version < min_version:
                self.tick()
                if self.version >= min_version:
                    break
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                waits = [x for x in (left, poll) if x is not None]
                self.cond.wait(min(waits) if waits else None)
            return True

    def tick(self) -> bool:
        """SYNC: complete the current version if its straggler timeout passed; True if it did."""
        with self.cond:
            if self.consistency.mode != Mode.SYNC or not self.sync_buffer:
                return False
            if not self.membership.expired(self.clock(), set(self.sync_buffer)):
                return False
            self._complete_sync()
            return True

    def leave(self, worker: str) -> int:
        """SYNC: ``worker`` leaves; a version that waited only for it completes. Returns the version."""
        if not 1 <= len(worker) <= 256:
            raise InvalidArgument("worker_id", "must be 1 to 256 characters")
        with self.cond:
            if self.consistency.mode == Mode.SYNC:
                self.membership.leave(worker)
                if self.sync_buffer and len(self.sync_buffer) >= self.membership.quorum():
                    self._complete_sync()
            return self.version

    def framed(self, names: list[str], frame: Callable[[int, list[tuple[str, TensorMeta, np.ndarray]]], T]) -> T:
        """``frame(version, [(name, meta, values in the wire dtype)])``, called atomically under the lock.

        float32 tensors are passed as the masters themselves (no copy): ``frame`` copies what it keeps (the
        join that makes the answer's bytes is that one copy) and never writes to them.
        """
        for i, n in enumerate(names):
            if n not in self.meta:
                raise InvalidArgument(f"names[{i}]", f"tensor {n!r} is not on this shard of model {self.name!r}")
        with self.cond:
            chosen = names or list(self.masters)
            return frame(
                self.version, [(n, self.meta[n], wire_array(self.meta[n].dtype, self.masters[n])) for n in chosen]
            )

    def answer(self, names: list[str], number: int, head: Callable[[int], bytes]) -> bytes:
        """An encoded answer: ``head(version)`` (its fields before the tensors, encoded), then the named
        tensors (all if empty) as the ``NamedTensor`` field ``number``, atomically under the lock.

        All tensors of a shard with an answer buffer go out as the buffer itself, without a copy (see
        ``services.paramserver.frames``); otherwise the answer is framed with one copy of each tensor.
        """
        if not names and self.answers is not None:
            with self.cond:
                out = self.answers.answer(number, head(self.version))
                if out is not None:
                    self.answers_in_place += 1
                    return out

        def framed_once(version: int, items: list[tuple[str, TensorMeta, np.ndarray]]) -> bytes:
            self.answers_copied += 1  # under the lock, as ``framed`` calls it
            return frame_answer(head(version), number, items)

        return self.framed(names, framed_once)

    def _writable(self) -> None:
        """Before the masters are written: move them out of an answer gRPC still holds (see ``answer``)."""
        if self.answers is not None and self.answers.writable():
            self.masters = self.answers.arrays

    def wire_bytes(self, names: list[str]) -> int:
        """Bytes the named tensors (all if empty) take on the wire."""
        chosen = names or list(self.meta)
        return sum(self.meta[n].size * (4 if self.meta[n].dtype == 1 else 2) for n in chosen if n in self.meta)

    # -- pushing ---------------------------------------------------------------------------------------

    def _detail(self, base: int, max_staleness: int) -> pb.StalenessDetail:
        return pb.StalenessDetail(
            current_version=self.version,
            base_version=base,
            staleness=self.version - base,
            max_staleness=max_staleness,
            incarnation=self.incarnation,
        )

    def _validate(self, grads: Mapping[str, Gradient], need_all: bool) -> None:
        if not grads:
            raise InvalidArgument("gradients", "must not be empty")
        for name, g in grads.items():
            meta = self.meta.get(name)
            if meta is None:
                raise InvalidArgument(f"gradients[{name}]", f"no tensor {name!r} on this shard of {self.name!r}")
            if g.shape[0] != meta.size:
                raise InvalidArgument(
                    f"gradients[{name}]", f"has {g.shape[0]} elements; the tensor has {meta.size} {list(meta.shape)}"
                )
        if need_all:
            missing = sorted(set(self.meta) - set(grads))
            if missing:
                raise InvalidArgument("gradients", f"SYNC needs every tensor of the shard; missing {missing[:5]}")

    def push(
        self,
        worker: str,
        base_version: int,
        step_id: int,
        grads: Mapping[str, Gradient],
        incarnation: str = "",
        session: str = "",
        global_norm: float = 0.0,
    ) -> PushResult:
        """Apply, buffer or reject one push (see the module docstring).

        ``incarnation``, when given, is the incarnation of the pull the gradients were computed from: a push
        computed before a restart and restore is refused (ABORTED) even if its base version exists again.
        ``session`` keys the step ids with ``worker``; ``global_norm`` is the push's norm over every shard
        (0: unknown), what clipping scales by.
        """
        if incarnation and incarnation != self.incarnation:
            raise Aborted(
                f"the gradients were computed on incarnation {incarnation}, the server is incarnation "
                f"{self.incarnation} (restored version {self.restored_version}); re-pull",
                details=[self._detail(base_version, -1)],
            )
        if not 1 <= len(worker) <= 256:
            raise InvalidArgument("worker_id", "must be 1 to 256 characters")
        if len(session) > 128:
            raise InvalidArgument("session", "must be at most 128 characters")
        if base_version < 0:
            raise InvalidArgument("base_version", "must be >= 0")
        if step_id < 0:
            raise InvalidArgument("step_id", "must be >= 0")
        if not (math.isfinite(global_norm) and global_norm >= 0):
            raise InvalidArgument("global_norm", "must be >= 0 and finite (0: unknown)")
        c = self.consistency
        self._validate(grads, need_all=c.mode == Mode.SYNC)
        with self.cond:
            sessions = self.seen.get(worker)
            window = sessions.get(session) if sessions is not None else None
            prior = window.get(step_id) if window is not None else None
            if prior is not None:
                self.duplicates += 1
                return PushResult(Outcome.DUPLICATE, self.version, prior.staleness, prior.lr_scale, prior.completes)
            staleness = self.version - base_version
            bound = 0 if c.mode == Mode.SYNC else (c.max_staleness if c.mode == Mode.BOUNDED_STALENESS else -1)
            if staleness < 0:
                raise Aborted(
                    f"base_version {base_version} is ahead of version {self.version} "
                    f"(incarnation {self.incarnation}: restored from a checkpoint?); re-pull",
                    details=[self._detail(base_version, bound)],
                )
            self.staleness_hist[min(staleness, STALENESS_BUCKETS - 1)] += 1
            if c.mode == Mode.SYNC and staleness > 0 and c.backup_workers > 0:
                # A backup worker's push for a version the first ``workers`` pushes completed: not an error.
                self.late += 1
                self.membership.seen(worker, self.clock())
                result = PushResult(Outcome.LATE, self.version, staleness, 0.0)
            elif bound >= 0 and staleness > bound:
                self.rejected_stale += 1
                raise FailedPrecondition(
                    f"push from {worker} is {staleness} versions stale (bound {bound}, version {self.version}); "
                    "re-pull and recompute",
                    details=[self._detail(base_version, bound)],
                )
            elif c.mode == Mode.SYNC:
                result = self._push_sync(worker, session, staleness, grads, global_norm)
            else:
                scale = 1.0 / max(1, staleness) if c.scale_lr_by_staleness else 1.0
                self._apply([grads], [1.0], scale, [global_norm])
                result = PushResult(Outcome.APPLIED, self.version, staleness, scale)
            if result.outcome in (Outcome.APPLIED, Outcome.BUFFERED):
                self.accepted += 1
                self.throughput.record(self.clock())
            self._remember(worker, session, step_id, result)
            return result

    def _remember(self, worker: str, session: str, step_id: int, result: PushResult) -> None:
        """Keep ``result`` in the step-id window of (worker, session): a retry is answered from it."""
        sessions = self.seen.setdefault(worker, OrderedDict())
        window = sessions.get(session)
        if window is None:
            window = sessions[session] = OrderedDict()
            while len(sessions) > SESSIONS_PER_WORKER:
                sessions.popitem(last=False)
        sessions.move_to_end(session)
        window[step_id] = result
        while len(window) > self.step_window:
            window.popitem(last=False)

    def _push_sync(
        self, worker: str, session: str, staleness: int, grads: Mapping[str, Gradient], norm: float
    ) -> PushResult:
        held = self.sync_sessions.get(worker)
        if held is not None and held != session:
            # The worker restarted (a new session) after its previous life pushed for this version: that push
            # stands for the worker; this one is not applied and waits for the version like it (the SDK warns).
            self.duplicates += 1
            return PushResult(Outcome.DUPLICATE, self.version, staleness, 1.0, self.version + 1)
        if held is not None:
            raise FailedPrecondition(
                f"worker {worker} already pushed for version {self.version} under another step id",
                details=[self._detail(self.version, 0)],
            )
        for name, g in grads.items():
            bad = nonfinite(g)
            if bad:
                self.rejected_nonfinite += 1
                raise InvalidArgument(f"gradients[{name}]", f"contains {bad} NaN/Inf values; push rejected")
        now = self.clock()
        self.membership.seen(worker, now)
        if not self.sync_buffer:
            self.membership.first_push = now
        self.sync_buffer[worker] = ({n: contiguous(g) for n, g in grads.items()}, norm)
        self.sync_sessions[worker] = session
        if len(self.sync_buffer) < self.membership.quorum():
            return PushResult(Outcome.BUFFERED, self.version, staleness, 1.0)
        self._complete_sync()
        return PushResult(Outcome.APPLIED, self.version, staleness, 1.0)

    def _complete_sync(self) -> None:
        """Apply the average of the buffered SYNC pushes as one step (under the lock)."""
        buffered = list(self.sync_buffer.values())
        self.sync_buffer.clear()
        self.sync_sessions.clear()
        self.membership.first_push = None
        self._apply([g for g, _ in buffered], [1.0 / len(buffered)] * len(buffered), 1.0, [n for _, n in buffered])

    def _clip_scales(self, pushes: Sequence[Mapping[str, Gradient]], norms: list[float]) -> list[float] | None:
        """Each push's clipping factor min(1, clip / norm), by its global norm when known, else by the norm of
        its part here; None for a single push of unknown norm (clipped after aggregation: the same)."""
        clip = self.optimizer_settings.clip_norm
        if clip == 0:
            return [1.0] * len(pushes)
        if len(pushes) == 1 and norms[0] == 0:
            return None
        scales = []
        for push, norm in zip(pushes, norms, strict=True):
            if norm == 0:
                parts = (contiguous(g).astype(np.float64) for g in push.values())
                norm = math.sqrt(sum(float(np.dot(v, v)) for v in parts))
            scales.append(clip / norm if norm > clip else 1.0)
        return scales

    def _apply(
        self, pushes: Sequence[Mapping[str, Gradient]], weights: list[float], lr_scale: float, norms: list[float]
    ) -> None:
        """Aggregate ``pushes`` (fused native pass), clip, step the optimizer, advance the version.

        ``norms``: each push's global L2 norm (0: unknown); see ``_clip_scales``. Nothing changes if a
        gradient holds NaN/Inf: the aggregate lands in scratch buffers first.
        """
        names = [n for n in self.masters if n in pushes[0]]
        scales = self._clip_scales(pushes, norms)
        if len(pushes) == 1 and weights[0] == 1.0 and scales is not None:
            # One push, unweighted, its clip factor known: the optimizer reads the received gradient in place
            # after a read-only NaN/Inf pass, instead of an aggregate that would only copy it into scratch.
            for name in names:
                bad = nonfinite(pushes[0][name])
                if bad:
                    self.rejected_nonfinite += 1
                    raise InvalidArgument(f"gradients[{name}]", f"contains {bad} NaN/Inf values; push rejected")
            self._writable()
            self.optimizer.step(self.masters, {n: pushes[0][n] for n in names}, lr_scale, scales[0])
            self._advanced()
            return
        w = np.asarray(weights if scales is None else [a * b for a, b in zip(weights, scales, strict=True)])
        total_sq = 0.0
        for name in names:
            bad, sq = _agg.aggregate(self.scratch[name], [contiguous(p[name]) for p in pushes], w)
            if bad:
                self.rejected_nonfinite += 1
                raise InvalidArgument(f"gradients[{name}]", f"contains {bad} NaN/Inf values; push rejected")
            total_sq += sq
        clip, norm = self.optimizer_settings.clip_norm, math.sqrt(total_sq)
        grad_scale = clip / norm if scales is None and norm > clip else 1.0
        self._writable()
        self.optimizer.step(self.masters, {n: self.scratch[n] for n in names}, lr_scale, grad_scale)
        self._advanced()

    def _advanced(self) -> None:
        """After an update: the version moves on, waiters wake, and a multiple of ``checkpoint_every`` is
        snapshotted at exactly that version (so that every shard's checkpoint of it forms a cut)."""
        self.version += 1
        self.cond.notify_all()
        every = self.checkpoint_every
        if every and self.version % every == 0 and self.on_snapshot is not None:
            self.on_snapshot(self.checkpoint_payload())

    # -- checkpoints and stats -------------------------------------------------------------------------

    def checkpoint_payload(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """(version, arrays, metadata) of a consistent copy, for a checkpoint written outside the lock."""
        with self.cond:
            arrays = {f"param/{n}": v.copy() for n, v in self.masters.items()}
            for n, st in self.optimizer.state.items():
                for k, v in st.items():
                    arrays[f"opt/{k}/{n}"] = v.copy()
            metadata = {
                "model": self.name,
                "version": self.version,
                "optimizer_steps": self.optimizer.steps,
                "tensor_steps": self.optimizer.tensor_steps,
                "meta": {n: [m.dtype, list(m.shape)] for n, m in self.meta.items()},
                "optimizer": {
                    k: (int(v) if isinstance(v, IntEnum) else v) for k, v in self.optimizer_settings.__dict__.items()
                },
                "consistency": {
                    k: (int(v) if isinstance(v, IntEnum) else v) for k, v in self.consistency.__dict__.items()
                },
                "checkpoint_every": self.checkpoint_every,
                "cut_shards": list(self.cut_shards),
                "causes": self.causes[-16:],
                "step_ids": [
                    [w, session, [[s, int(r.outcome), r.version, r.staleness, r.lr_scale] for s, r in win.items()]]
                    for w, sessions in self.seen.items()
                    for session, win in sessions.items()
                ],
            }
            return self.version, arrays, metadata

    def load_checkpoint(
        self, version: int, arrays: dict[str, np.ndarray], metadata: dict[str, Any], cause: str = ""
    ) -> None:
        """Restore masters, optimizer state, version and step-id windows from a verified checkpoint.

        ``cause``: see ModelInfo.restore_cause (recorded, so that a RestoreCut for it is not repeated).
        """
        with self.cond:
            self._writable()
            for n in self.masters:
                self.masters[n][:] = arrays[f"param/{n}"].reshape(-1)
            for n, st in self.optimizer.state.items():
                for k in st:
                    st[k][:] = arrays[f"opt/{k}/{n}"]
            self.optimizer.steps = int(metadata["optimizer_steps"])
            self.optimizer.tensor_steps = {n: int(v) for n, v in metadata["tensor_steps"].items()}
            self.version = version
            self.restored_version = version
            self.restore_cause = cause
            self.causes = [*metadata.get("causes", []), *([cause] if cause else [])][-16:]
            self.seen = {}
            windows = metadata.get("step_ids", [])
            if isinstance(windows, dict):  # written before sessions: one window per worker
                windows = [[w, "", win] for w, win in windows.items()]
            for w, session, win in windows:
                self.seen.setdefault(w, OrderedDict())[session] = OrderedDict(
                    (int(s), PushResult(Outcome(o), v, st, lr)) for s, o, v, st, lr in win
                )
            self.sync_buffer.clear()
            self.sync_sessions.clear()
            self.membership = SyncMembership(self.consistency.workers, self.consistency.straggler_timeout)
            self.cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """Counters for GetStats."""
        with self.cond:
            now = self.clock()
            return {
                "version": self.version,
                "accepted": self.accepted,
                "rejected_stale": self.rejected_stale,
                "rejected_nonfinite": self.rejected_nonfinite,
                "duplicates": self.duplicates,
                "late": self.late,
                "members": sorted(self.membership.members) if self.consistency.mode == Mode.SYNC else [],
                "answers_in_place": self.answers_in_place,
                "answers_copied": self.answers_copied,
                "answer_buffer_moves": self.answers.moves if self.answers is not None else 0,
                "staleness": list(self.staleness_hist),
                "rate": self.throughput.rate(now),
                "events": list(self.events),
            }

    def watch_throughput(self) -> str | None:
        """Evaluate the throughput monitor; record and return an event if throughput dropped."""
        with self.cond:
            event = self.throughput.check(self.clock())
            if event:
                self.events.append(event)
            return event
