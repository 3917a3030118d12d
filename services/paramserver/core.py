"""The models of one parameter-server shard, without gRPC: the registry, creation, restore at start,
checkpoints as consistent cuts (written in the background at exactly their version, and a final one on a
graceful stop), roll backs to a cut, SYNC membership and the throughput watch.

``services.paramserver.server`` is the protocol shell over it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from guardmesh.config import MeshConfig
from guardmesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.paramserver.checkpoint import CheckpointError, CheckpointStore
from services.paramserver.optimizer import OptimizerKind, OptimizerSettings
from services.paramserver.shard import ConsistencySettings, Mode, ModelShard, TensorMeta

log = logging.getLogger(__name__)
#: Snapshots waiting for the background writer before pushes wait for it (each is a copy of a shard).
MAX_PENDING_SNAPSHOTS = 2

Snapshot = tuple[int, dict[str, np.ndarray], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """A model as created: validated tensors and settings, and the shards that hold a part of it."""

    name: str
    tensors: dict[str, tuple[TensorMeta, np.ndarray]]
    optimizer: OptimizerSettings
    consistency: ConsistencySettings
    checkpoint_every: int
    cut_shards: list[int]


class ParamServerCore:
    """Every model this shard holds. Thread-safe."""

    def __init__(self, config: MeshConfig, answer_limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        """``answer_limit``: the largest unary answer in bytes (see ``ModelShard``); ``clock``: what SYNC
        timeouts and push throughput are measured with."""
        self.config = config
        self.settings = config.paramserver
        self.index = self.settings.shard_index
        self.answer_limit = answer_limit
        self.clock = clock
        self.incarnation = uuid.uuid4().hex
        self.models: dict[str, ModelShard] = {}
        self.lock = threading.Lock()
        self.store: CheckpointStore | None = None
        #: One checkpoint write at a time; a roll back holds it so no older life's file lands after it.
        self.write_lock = threading.RLock()
        self.pending: queue.Queue[tuple[ModelShard, str, Snapshot] | None] = queue.Queue()
        self.writer: threading.Thread | None = None
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the checkpoint store, restore every model found there and start the checkpoint writer."""
        locations = [
            loc if "://" in loc else str(self.config.state_path(loc)) for loc in self.settings.checkpoint_locations
        ]
        self.store = CheckpointStore(locations, self.index, self.settings.min_replicas)
        for model in self.store.models():
            self._restore(model)
        self.writer = threading.Thread(target=self._write_pending, name="paramserver-checkpoints", daemon=True)
        self.writer.start()
        self.ready = True

    def _restore(self, model: str) -> None:
        assert self.store is not None
        restored = self.store.restore(model)
        if restored is None:
            log.error("no verified checkpoint in a complete cut", extra={"model": model})
            return
        md = restored.metadata
        arrays = restored.arrays
        tensors = {n: (TensorMeta(int(dt), tuple(s)), arrays[f"param/{n}"]) for n, (dt, s) in md["meta"].items()}
        opt = OptimizerSettings(**{**md["optimizer"], "kind": OptimizerKind(md["optimizer"]["kind"])})
        cons = ConsistencySettings(**{**md["consistency"], "mode": Mode(md["consistency"]["mode"])})
        cuts = md.get("cut_shards", [self.index])
        shard = self._new_shard(ModelSpec(model, tensors, opt, cons, md["checkpoint_every"], cuts))
        # A cut: the shards of the model roll back to it (the SDK asks them, naming this restart as the cause).
        # This shard's own final checkpoint: nothing was lost, nothing to roll back.
        shard.load_checkpoint(restored.version, restored.arrays, md, "" if restored.final else self.incarnation)
        if restored.final:
            self.store.mark_used(model, restored.version)
        else:
            self.store.drop_after(model, restored.version)
        for s in restored.skipped:
            shard.events.append(f"restore skipped {s}")
        kind = "final checkpoint" if restored.final else "cut"
        shard.events.append(f"restored {kind} v{restored.version} from {restored.location}")
        self.models[model] = shard
        log.info("restored model", extra={"model": model, "version": restored.version, "final": restored.final})

    def close(self) -> None:
        """Write what is pending, then a final checkpoint of every model at its version (a graceful stop loses
        nothing acknowledged). Call after the last call ended."""
        if self.writer is not None:
            self.pending.put(None)
            self.writer.join()
            self.writer = None
        if self.store is None:
            return
        for shard in list(self.models.values()):
            try:
                version, _, _ = self._write(shard, shard.checkpoint_payload(), final=True)
                log.info("final checkpoint written", extra={"model": shard.name, "version": version})
            except Exception as exc:
                log.error("final checkpoint failed", extra={"model": shard.name, "error": str(exc)})

    # -- models ----------------------------------------------------------------------------------------

    def _new_shard(self, spec: ModelSpec) -> ModelShard:
        shard = ModelShard(
            spec.name,
            spec.tensors,
            spec.optimizer,
            spec.consistency,
            spec.checkpoint_every,
            self.incarnation,
            step_window=self.settings.step_id_window,
            clock=self.clock,
            throughput_window_s=self.settings.throughput_window_s,
            throughput_drop_share=self.settings.throughput_drop_share,
            answer_limit=self.answer_limit,
            cut_shards=tuple(spec.cut_shards),
        )

        def snapshot(payload: Snapshot) -> None:  # under the shard's lock: only queued here
            self.pending.put((shard, shard.incarnation, payload))

        shard.on_snapshot = snapshot
        return shard

    def shard(self, model: str) -> ModelShard:
        """The model's shard; UNAVAILABLE while starting, INVALID_ARGUMENT for no name, NOT_FOUND."""
        if not self.ready:
            raise Unavailable("paramserver is starting")
        if not model:
            raise InvalidArgument("model", "must not be empty")
        shard = self.models.get(model)
        if shard is None:
            raise NotFound(f"model {model!r} not found on this shard")
        return shard

    def cut_shards(self, requested: list[int]) -> list[int]:
        """Validated CreateModelRequest.cut_shards (empty: this shard alone)."""
        if not requested:
            return [self.index]
        for i, s in enumerate(requested):
            if not 0 <= s <= 255:
                raise InvalidArgument(f"cut_shards[{i}]", "must be 0 to 255")
        if len(set(requested)) != len(requested):
            raise InvalidArgument("cut_shards", "must not repeat a shard")
        if self.index not in requested:
            raise InvalidArgument("cut_shards", f"must include this shard's index {self.index} (got {requested})")
        return sorted(requested)

    def create(self, spec: ModelSpec) -> ModelShard:
        """Create the model (its tensors and settings validated by the caller; ``cut_shards`` checked here), or
        return the identical one; ALREADY_EXISTS if it exists with different tensors or settings."""
        if not self.ready:
            raise Unavailable("paramserver is starting")
        spec = replace(spec, cut_shards=self.cut_shards(spec.cut_shards))
        with self.lock:
            existing = self.models.get(spec.name)
            if existing is not None:
                same = (
                    {n: m for n, (m, _) in spec.tensors.items()} == existing.meta
                    and existing.optimizer_settings == spec.optimizer
                    and existing.consistency == spec.consistency
                    and existing.checkpoint_every == spec.checkpoint_every
                    and list(existing.cut_shards) == spec.cut_shards
                )
                if not same:
                    raise AlreadyExists(f"model {spec.name!r} exists with different tensors or settings")
                return existing
            shard = self._new_shard(spec)
            self.models[spec.name] = shard
        if spec.checkpoint_every and shard.on_snapshot is not None:
            # Version 0 is a multiple too: a kill -9 before the first periodic cut rolls back to the creation.
            shard.on_snapshot(shard.checkpoint_payload())
        return shard

    # -- checkpoints -----------------------------------------------------------------------------------

    def _write(self, shard: ModelShard, payload: Snapshot, *, final: bool = False) -> tuple[int, str, list[str]]:
        assert self.store is not None
        version, arrays, metadata = payload
        with self.write_lock:
            digest, written = self.store.save(
                shard.name, version, arrays, metadata, list(shard.cut_shards), final=final
            )
        log.info("checkpoint written", extra={"model": shard.name, "version": version, "locations": written})
        return version, digest, written

    def _write_pending(self) -> None:
        """The background writer: snapshots taken at their version, in order; one of a rolled back life is
        dropped (its version no longer names these parameters)."""
        while (item := self.pending.get()) is not None:
            shard, incarnation, payload = item
            try:
                with self.write_lock:
                    if shard.incarnation != incarnation:
                        continue
                    self._write(shard, payload)
            except Exception as exc:
                shard.events.append(f"checkpoint v{payload[0]} failed: {exc}")
                log.error("checkpoint failed", extra={"model": shard.name, "error": str(exc)})

    def wait_for_writer(self, timeout: float = 60.0) -> None:
        """Back pressure: a push waits (outside any lock) while the writer is behind by more than
        ``MAX_PENDING_SNAPSHOTS`` snapshots, so copies of the model do not pile up in memory."""
        end = time.monotonic() + timeout
        while self.pending.qsize() > MAX_PENDING_SNAPSHOTS and time.monotonic() < end:
            time.sleep(0.01)

    def checkpoint(self, model: str) -> tuple[int, str, list[str]]:
        """Write the model's checkpoint at its current version now; UNAVAILABLE below the replica minimum."""
        shard = self.shard(model)
        try:
            return self._write(shard, shard.checkpoint_payload())
        except CheckpointError as exc:
            raise Unavailable(str(exc)) from None

    def restore_cut(self, model: str, version: int, cause: str) -> tuple[ModelShard, bool]:
        """Roll the model back to this shard's checkpoint of the complete cut ``version`` (see the proto's
        RestoreCut); (shard, whether it rolled back)."""
        if version < 0:
            raise InvalidArgument("version", "must be >= 0")
        if not 1 <= len(cause) <= 128:
            raise InvalidArgument("cause", "must be 1 to 128 characters")
        shard = self.shard(model)
        assert self.store is not None
        with self.write_lock, shard.cond:
            if cause in shard.causes:
                return shard, False
            restored = self.store.restore(model, version)
            if restored is None:
                raise FailedPrecondition(
                    f"shard {self.index} has no verified checkpoint of {model!r} at version {version} in a complete cut"
                )
            shard.incarnation = uuid.uuid4().hex  # pushes computed on the parameters before are refused
            shard.load_checkpoint(version, restored.arrays, restored.metadata, cause)
            self.store.drop_after(model, version)
            shard.events.append(f"rolled back to cut v{version} (cause {cause})")
        log.warning("rolled back to a cut", extra={"model": model, "version": version, "cause": cause})
        return shard, True

    # -- background ------------------------------------------------------------------------------------

    def watch(self) -> list[tuple[str, str]]:
        """Complete SYNC versions past their straggler timeout and check push throughput; the throughput
        events as (model, event)."""
        events = []
        for shard in list(self.models.values()):
            shard.tick()
            event = shard.watch_throughput()
            if event:
                events.append((shard.name, event))
        return events
