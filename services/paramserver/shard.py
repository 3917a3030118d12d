"""One model on one parameter-server shard: versions, staleness, dedupe, aggregation and stats.

Staleness = current version - base version of a push. SYNC buffers the gradients of ``workers`` pushes
for the current version and applies their average as one step; BOUNDED_STALENESS applies each push at
once when its staleness is within the bound; ASYNC applies everything. A push is validated completely
(names, shapes, NaN/Inf) before anything changes, and a retried push (same worker and step id) is
answered from the step-id window without being applied twice.
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


@dataclass(frozen=True)
class ConsistencySettings:
    """Validated consistency settings."""

    mode: Mode
    workers: int = 1
    backup_workers: int = 0
    max_staleness: int = 0
    scale_lr_by_staleness: bool = False

    def validate(self) -> None:
        """Raise InvalidArgument naming the field."""
        if self.mode == Mode.SYNC and not 1 <= self.workers <= 4096:
            raise InvalidArgument("consistency.workers", f"must be 1 to 4096 in SYNC mode (got {self.workers})")
        if not 0 <= self.backup_workers <= 4096:
            raise InvalidArgument("consistency.backup_workers", "must be 0 to 4096")
        if not 0 <= self.max_staleness <= 1_000_000:
            raise InvalidArgument("consistency.max_staleness", "must be 0 to 1,000,000")


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
    """Accepted pushes per second, and an event when the rate drops below a share of its recent level."""

    window_s: float = 10.0
    drop_share: float = 0.5
    stamps: deque[float] = field(default_factory=deque)
    baseline: float = 0.0
    dropped: bool = False

    def record(self, now: float) -> None:
        """Count one accepted push."""
        self.stamps.append(now)

    def rate(self, now: float) -> float:
        """Accepted pushes per second over the last window."""
        while self.stamps and self.stamps[0] < now - self.window_s:
            self.stamps.popleft()
        return len(self.stamps) / self.window_s

    def check(self, now: float) -> str | None:
        """An event message when the rate fell below ``drop_share`` of the baseline (once per drop)."""
        current = self.rate(now)
        if not self.dropped and self.baseline > 0 and current < self.drop_share * self.baseline:
            self.dropped = True
            return (
                f"push throughput fell to {current:.1f}/s, {current / self.baseline:.0%} of its recent "
                f"{self.baseline:.1f}/s"
            )
        if current >= self.drop_share * self.baseline:
            self.dropped = False
            # The baseline follows the healthy rate (slowly), never a degraded one.
            self.baseline = current if self.baseline == 0 else 0.8 * self.baseline + 0.2 * current
        return None


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
    ) -> None:
        """``answer_limit``: the largest answer in bytes; a shard whose tensors are all float32 on the wire and
        fit in one answer keeps them in an :class:`AnswerBuffer` (0: never)."""
        self.name = name
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
        self.cond = threading.Condition()
        self.step_window = step_window
        self.seen: dict[str, OrderedDict[int, PushResult]] = {}
        self.sync_buffer: dict[str, dict[str, np.ndarray]] = {}
        self.clock = clock
        self.accepted = 0
        self.rejected_stale = 0
        self.rejected_nonfinite = 0
        self.duplicates = 0
        self.answers_in_place = 0
        self.answers_copied = 0
        self.staleness_hist = [0] * STALENESS_BUCKETS
        self.throughput = ThroughputMonitor(throughput_window_s, throughput_drop_share)
        self.events: deque[str] = deque(maxlen=100)

    # -- reading ---------------------------------------------------------------------------------------

    def wait_version(self, min_version: int, timeout: float | None) -> bool:
        """Block until ``version >= min_version`` (or the timeout); True if reached."""
        with self.cond:
            return self.cond.wait_for(lambda: self.version >= min_version, timeout=timeout)

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
        self, worker: str, base_version: int, step_id: int, grads: Mapping[str, Gradient], incarnation: str = ""
    ) -> PushResult:
        """Apply, buffer or reject one push (see the module docstring).

        ``incarnation``, when given, is the incarnation of the pull the gradients were computed from: a push
        computed before a restart and restore is refused (ABORTED) even if its base version exists again.
        """
        if incarnation and incarnation != self.incarnation:
            raise Aborted(
                f"the gradients were computed on incarnation {incarnation}, the server is incarnation "
                f"{self.incarnation} (restarted and restored version {self.restored_version}); re-pull",
                details=[self._detail(base_version, -1)],
            )
        if not 1 <= len(worker) <= 256:
            raise InvalidArgument("worker_id", "must be 1 to 256 characters")
        if base_version < 0:
            raise InvalidArgument("base_version", "must be >= 0")
        if step_id < 0:
            raise InvalidArgument("step_id", "must be >= 0")
        c = self.consistency
        self._validate(grads, need_all=c.mode == Mode.SYNC)
        with self.cond:
            window = self.seen.get(worker)
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
            if bound >= 0 and staleness > bound:
                self.rejected_stale += 1
                raise FailedPrecondition(
                    f"push from {worker} is {staleness} versions stale (bound {bound}, version {self.version}); "
                    "re-pull and recompute",
                    details=[self._detail(base_version, bound)],
                )
            if c.mode == Mode.SYNC:
                result = self._push_sync(worker, staleness, grads)
            else:
                scale = 1.0 / max(1, staleness) if c.scale_lr_by_staleness else 1.0
                self._apply([grads], [1.0], scale)
                result = PushResult(Outcome.APPLIED, self.version, staleness, scale)
            self.accepted += 1
            self.throughput.record(self.clock())
            window = self.seen.setdefault(worker, OrderedDict())
            window[step_id] = result
            while len(window) > self.step_window:
                window.popitem(last=False)
            return result

    def _push_sync(self, worker: str, staleness: int, grads: Mapping[str, Gradient]) -> PushResult:
        if worker in self.sync_buffer:
            raise FailedPrecondition(
                f"worker {worker} already pushed for version {self.version} under another step id",
                details=[self._detail(self.version, 0)],
            )
        for name, g in grads.items():
            bad = nonfinite(g)
            if bad:
                self.rejected_nonfinite += 1
                raise InvalidArgument(f"gradients[{name}]", f"contains {bad} NaN/Inf values; push rejected")
        self.sync_buffer[worker] = {n: contiguous(g) for n, g in grads.items()}
        if len(self.sync_buffer) < self.consistency.workers:
            return PushResult(Outcome.BUFFERED, self.version, staleness, 1.0)
        buffered = list(self.sync_buffer.values())
        self.sync_buffer.clear()
        self._apply(buffered, [1.0 / len(buffered)] * len(buffered), 1.0)
        return PushResult(Outcome.APPLIED, self.version, staleness, 1.0)

    def _apply(self, pushes: Sequence[Mapping[str, Gradient]], weights: list[float], lr_scale: float) -> None:
        """Aggregate ``pushes`` (fused native pass), clip, step the optimizer, advance the version.

        Nothing changes if a gradient holds NaN/Inf: the aggregate lands in scratch buffers first.
        """
        names = [n for n in self.masters if n in pushes[0]]
        clip = self.optimizer_settings.clip_norm
        if len(pushes) == 1 and weights[0] == 1.0 and clip == 0:
            # One push, unweighted, no clipping: the optimizer reads the received gradient in place after a
            # read-only NaN/Inf pass, instead of an aggregate that would only copy it into scratch.
            for name in names:
                bad = nonfinite(pushes[0][name])
                if bad:
                    self.rejected_nonfinite += 1
                    raise InvalidArgument(f"gradients[{name}]", f"contains {bad} NaN/Inf values; push rejected")
            self._writable()
            self.optimizer.step(self.masters, {n: pushes[0][n] for n in names}, lr_scale, 1.0)
            self.version += 1
            self.cond.notify_all()
            return
        w = np.asarray(weights, dtype=np.float64)
        total_sq = 0.0
        for name in names:
            bad, sq = _agg.aggregate(self.scratch[name], [contiguous(p[name]) for p in pushes], w)
            if bad:
                self.rejected_nonfinite += 1
                raise InvalidArgument(f"gradients[{name}]", f"contains {bad} NaN/Inf values; push rejected")
            total_sq += sq
        norm = math.sqrt(total_sq)
        grad_scale = clip / norm if clip > 0 and norm > clip else 1.0
        self._writable()
        self.optimizer.step(self.masters, {n: self.scratch[n] for n in names}, lr_scale, grad_scale)
        self.version += 1
        self.cond.notify_all()

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
                "step_ids": {
                    w: [[s, int(r.outcome), r.version, r.staleness, r.lr_scale] for s, r in win.items()]
                    for w, win in self.seen.items()
                },
            }
            return self.version, arrays, metadata

    def load_checkpoint(self, version: int, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
        """Restore masters, optimizer state, version and step-id windows from a verified checkpoint."""
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
            self.seen = {
                w: OrderedDict((int(s), PushResult(Outcome(o), v, st, lr)) for s, o, v, st, lr in win)
                for w, win in metadata.get("step_ids", {}).items()
            }

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
