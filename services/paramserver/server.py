"""gRPC shell of the parameter server: protobuf in, shard calls, protobuf out."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from opentelemetry import metrics, trace

from guardmesh import wire
from guardmesh.config import MeshConfig
from guardmesh.errors import GuardmeshError, InvalidArgument, ResourceExhausted
from guardmesh.runtime import ServiceDefinition
from guardmesh.security import allow
from guardmesh.tensors import WIRE_DTYPES, check_shape, decode, to_float32
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc
from services.paramserver.chunks import assemble, assemble_chunks, chunked_float32, collect_chunks, header_elements
from services.paramserver.core import ModelSpec, ParamServerCore
from services.paramserver.gradients import Gradient
from services.paramserver.memory import keep_freed_memory
from services.paramserver.optimizer import OptimizerKind, OptimizerSettings
from services.paramserver.shard import ConsistencySettings, Mode, ModelShard, PushResult, TensorMeta

log = logging.getLogger(__name__)
MODEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DEFAULT_CHUNK = 4 << 20
#: Field numbers of the tensors in the unary answers (what ``ModelShard.answer`` frames them as).
PULL_TENSORS = pb.PullResponse.DESCRIPTOR.fields_by_name["tensors"].number
PUSH_PULL_TENSORS = pb.PushPullResponse.DESCRIPTOR.fields_by_name["tensors"].number

_meter = metrics.get_meter("guardmesh.paramserver")
# One bucket per version up to 8, so that a bound of 1 or 2 can be told apart; coarser beyond.
_staleness_hist = _meter.create_histogram(
    "guardmesh.paramserver.staleness_versions",
    unit="{version}",
    description="Versions a push's base version lagged behind the model when it arrived",
    explicit_bucket_boundaries_advisory=[0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024],
)
_pushes = _meter.create_counter(
    "guardmesh.paramserver.pushes", unit="{push}", description="Pushes answered, by outcome (APPLIED, REJECTED_...)"
)


def optimizer_from_pb(msg: pb.OptimizerConfig) -> OptimizerSettings:
    """Validated optimizer settings (0 means default for the Adam constants)."""
    try:
        kind = OptimizerKind(msg.kind)
    except ValueError:
        raise InvalidArgument("optimizer.kind", "must be SGD, MOMENTUM, ADAM or ADAMW") from None
    settings = OptimizerSettings(
        kind=kind,
        learning_rate=msg.learning_rate,
        momentum=msg.momentum,
        dampening=msg.dampening,
        nesterov=msg.nesterov,
        beta1=msg.beta1 or 0.9,
        beta2=msg.beta2 or 0.999,
        epsilon=msg.epsilon or 1e-8,
        weight_decay=msg.weight_decay,
        clip_norm=msg.clip_norm,
    )
    settings.validate()
    return settings


def optimizer_to_pb(s: OptimizerSettings) -> pb.OptimizerConfig:
    """Message form."""
    return pb.OptimizerConfig(
        kind=int(s.kind),  # type: ignore[arg-type]
        learning_rate=s.learning_rate,
        momentum=s.momentum,
        dampening=s.dampening,  # type: ignore[arg-type]
        nesterov=s.nesterov,
        beta1=s.beta1,
        beta2=s.beta2,
        epsilon=s.epsilon,
        weight_decay=s.weight_decay,
        clip_norm=s.clip_norm,
    )


def consistency_from_pb(msg: pb.ConsistencyConfig) -> ConsistencySettings:
    """Validated consistency settings."""
    try:
        mode = Mode(msg.mode)
    except ValueError:
        raise InvalidArgument("consistency.mode", "must be SYNC, BOUNDED_STALENESS or ASYNC") from None
    settings = ConsistencySettings(
        mode, msg.workers, msg.backup_workers, msg.max_staleness, msg.scale_lr_by_staleness, msg.straggler_timeout_s
    )
    settings.validate()
    return settings


def consistency_to_pb(s: ConsistencySettings) -> pb.ConsistencyConfig:
    """Message form."""
    return pb.ConsistencyConfig(
        mode=int(s.mode),  # type: ignore[arg-type]
        workers=s.workers,
        backup_workers=s.backup_workers,
        max_staleness=s.max_staleness,
        scale_lr_by_staleness=s.scale_lr_by_staleness,
        straggler_timeout_s=s.straggler_timeout_s,
    )


def _info(shard: ModelShard) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=shard.name,
        tensors=[pb.TensorInfo(name=n, dtype=m.dtype, shape=list(m.shape)) for n, m in shard.meta.items()],  # type: ignore[arg-type]
        version=shard.version,
        incarnation=shard.incarnation,
        optimizer=optimizer_to_pb(shard.optimizer_settings),
        consistency=consistency_to_pb(shard.consistency),
        checkpoint_every=shard.checkpoint_every,
        restored_version=shard.restored_version,
        cut_shards=list(shard.cut_shards),
        restore_cause=shard.restore_cause,
    )


def _result_pb(r: PushResult) -> pb.PushResponse:
    return pb.PushResponse(
        outcome=int(r.outcome),  # type: ignore[arg-type]
        version=r.version,
        staleness=r.staleness,
        lr_scale=r.lr_scale,
        completes=r.completes,
    )


def _wait_budget(context: grpc.ServicerContext) -> float | None:
    """How long a handler may wait for a version: the call's remaining time less a margin, so that its own
    DEADLINE_EXCEEDED (which says what it waited for) reaches the caller before the caller's deadline fires.
    None without a deadline (grpc then reports a huge number that ``Condition.wait`` rejects)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 86_400:
        return None
    return max(0.0, remaining - min(0.25, 0.1 * remaining))


class ParamServerServicer(pb_grpc.ParamServerServiceServicer):
    """Implements ``guardmesh.v1.ParamServerService``."""

    def __init__(self, config: MeshConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.core = ParamServerCore(config, self._answer_limit(), clock)

    def _shard(self, model: str) -> ModelShard:
        return self.core.shard(model)

    # -- RPCs ------------------------------------------------------------------------------------------

    def CreateModelStream(
        self, request_iterator: Iterator[pb.CreateModelStreamRequest], context: grpc.ServicerContext
    ) -> pb.CreateModelStreamResponse:
        """See the proto."""
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "a streamed creation starts with a header")
        header = first.header
        sizes = []
        for i, nt in enumerate(header.tensors):
            field = f"header.tensors[{i}].tensor"
            if nt.tensor.data:
                raise InvalidArgument(f"{field}.data", "must be empty in the header (chunks follow)")
            # dtype, dimensions >= 0 and the element bound, in exact integers: before anything is allocated.
            count = header_elements(field, nt.tensor.dtype, tuple(nt.tensor.shape))
            sizes.append(count * WIRE_DTYPES[nt.tensor.dtype].itemsize)
        buffers = assemble_chunks(
            sizes, (m.chunk if m.WhichOneof("part") == "chunk" else None for m in request_iterator)
        )
        for nt, buf in zip(header.tensors, buffers, strict=True):
            nt.tensor.data = buf.tobytes()
        return pb.CreateModelStreamResponse(model=self.CreateModel(header, context).model)

    def CreateModel(self, request: pb.CreateModelRequest, context: grpc.ServicerContext) -> pb.CreateModelResponse:
        """See the proto."""
        if not MODEL_RE.match(request.model):
            raise InvalidArgument("model", "must be 1 to 128 characters of [A-Za-z0-9._-]")
        optimizer = optimizer_from_pb(request.optimizer)
        consistency = consistency_from_pb(request.consistency)
        if not 0 <= request.checkpoint_every <= 1_000_000:
            raise InvalidArgument("checkpoint_every", "must be 0 to 1,000,000")
        if not request.tensors:
            raise InvalidArgument("tensors", "must not be empty")
        tensors: dict[str, tuple[TensorMeta, np.ndarray]] = {}
        for i, nt in enumerate(request.tensors):
            field = f"tensors[{i}]"
            if not 1 <= len(nt.name) <= 512:
                raise InvalidArgument(f"{field}.name", "must be 1 to 512 characters")
            if nt.name in tensors:
                raise InvalidArgument(f"{field}.name", f"duplicate tensor name {nt.name!r}")
            values = to_float32(f"{field}.tensor", nt.tensor)
            if not np.isfinite(values).all():
                raise InvalidArgument(f"{field}.tensor", "initial values must be finite")
            tensors[nt.name] = (TensorMeta(nt.tensor.dtype, tuple(nt.tensor.shape)), values)
        spec = ModelSpec(
            request.model, tensors, optimizer, consistency, request.checkpoint_every, list(request.cut_shards)
        )
        shard = self.core.create(spec)
        return pb.CreateModelResponse(model=_info(shard))

    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
    ) -> pb.DescribeModelResponse:
        """See the proto."""
        return pb.DescribeModelResponse(model=_info(self._shard(request.model)))

    def _pull(self, shard: ModelShard, request: pb.PullRequest, context: grpc.ServicerContext) -> None:
        """Return once ``shard`` has reached the pull's ``min_version`` if asked (within the deadline)."""
        if request.min_version < 0:
            raise InvalidArgument("min_version", "must be >= 0")
        if request.min_version > shard.version and not shard.wait_version(request.min_version, _wait_budget(context)):
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"version {request.min_version} not reached (now {shard.version})",
            )

    def _check_unary_size(self, shard: ModelShard, names: list[str]) -> None:
        total = shard.wire_bytes(names)
        if total > self._answer_limit():
            raise ResourceExhausted(
                f"{total} bytes of tensors exceed the {self.config.grpc.max_message_mib} MiB message limit; "
                "use the streamed method"
            )

    def _answer_limit(self) -> int:
        """The largest unary answer in bytes (the message limit less 64 KiB of room)."""
        return (self.config.grpc.max_message_mib << 20) - (1 << 16)

    def _default_chunk(self) -> int:
        return min(DEFAULT_CHUNK, self._answer_limit())

    @staticmethod
    def _stream_frames(
        shard: ModelShard, chunk: int, result: pb.PushResponse | None = None
    ) -> Callable[[int, list[tuple[str, TensorMeta, np.ndarray]]], list[bytes]]:
        """A ``framed`` callback encoding a header and every chunk: the tensors' one copy, under the lock."""

        def frame(version: int, items: list[tuple[str, TensorMeta, np.ndarray]]) -> list[bytes]:
            header = pb.PullStreamResponse()
            header.header.model = shard.name
            header.header.version = version
            header.header.incarnation = shard.incarnation
            if result is not None:
                header.header.result.CopyFrom(result)
            for n, m, _ in items:
                header.header.tensors.add(name=n, dtype=m.dtype, shape=list(m.shape))  # type: ignore[arg-type]
            messages = [header.SerializeToString()]
            for i, (_, _, values) in enumerate(items):
                raw = values.reshape(-1).view(np.uint8)
                for off in range(0, raw.size, chunk):
                    messages.append(b"".join(wire.tensor_chunk(2, i, off, raw[off : off + chunk])))
            return messages

        return frame

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> bytes:
        """See the proto. Answers the PullResponse already encoded: a shard's answer buffer as it is, or the
        tensors copied once into the answer (``ModelShard.answer``)."""
        shard = self._shard(request.model)
        self._check_unary_size(shard, list(request.names))
        self._pull(shard, request, context)

        def head(version: int) -> bytes:
            return pb.PullResponse(version=version, incarnation=shard.incarnation).SerializeToString()

        return shard.answer(list(request.names), PULL_TENSORS, head)

    def PullStream(self, request: pb.PullStreamRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """See the proto. The messages are encoded under the shard's lock (one copy of each tensor), then sent."""
        chunk = request.chunk_bytes or self._default_chunk()
        if not 65_536 <= chunk <= 16_777_216:
            raise InvalidArgument("chunk_bytes", "must be 65,536 to 16,777,216 (or 0 for 4 MiB)")
        shard = self._shard(request.pull.model)
        self._pull(shard, request.pull, context)
        yield from shard.framed(list(request.pull.names), self._stream_frames(shard, chunk))

    def _after_push(self, shard: ModelShard, result: PushResult) -> None:
        span = trace.get_current_span()
        span.set_attribute("guardmesh.model", shard.name)
        span.set_attribute("guardmesh.version", result.version)
        span.set_attribute("guardmesh.staleness", result.staleness)
        span.set_attribute("guardmesh.push_outcome", result.outcome.name)
        _staleness_hist.record(result.staleness, {"model": shard.name})
        _pushes.add(1, {"model": shard.name, "outcome": result.outcome.name})
        self.core.wait_for_writer()

    def _record_rejection(self, shard: ModelShard, err: GuardmeshError) -> None:
        span = trace.get_current_span()
        span.set_attribute("guardmesh.model", shard.name)
        span.set_attribute("guardmesh.push_outcome", f"REJECTED_{err.code.name}")
        span.set_attribute("guardmesh.version", shard.version)
        _pushes.add(1, {"model": shard.name, "outcome": f"REJECTED_{err.code.name}"})

    def _apply_push(self, shard: ModelShard, head: Any, base: int, grads: Mapping[str, Gradient]) -> PushResult:
        """Apply a decoded push to ``shard`` and record its outcome (metrics, span). ``head``: the PushRequest,
        PushPullRequest or StreamHeader (worker, step, incarnation, session, global norm); ``base``: its base
        version (``version`` in a StreamHeader)."""
        try:
            result = shard.push(
                head.worker_id, base, head.step_id, grads, head.incarnation, head.session, head.global_norm
            )
        except GuardmeshError as err:
            self._record_rejection(shard, err)
            raise
        self._after_push(shard, result)
        return result

    def _push(self, request: Any, shard: ModelShard | None = None) -> tuple[ModelShard, PushResult]:
        """A unary push (PushRequest or PushPullRequest, decoded by ``guardmesh.wire``), applied; ``shard`` when
        the caller has already looked it up."""
        request = wire.accept(request)
        shard = shard or self._shard(request.model)
        grads: dict[str, Gradient] = {}
        for i, nt in enumerate(request.gradients):
            if nt.name in grads:
                raise InvalidArgument(f"gradients[{i}].name", f"duplicate gradient {nt.name!r}")
            grads[nt.name] = to_float32(f"gradients[{i}].tensor", nt.tensor)
        result = self._apply_push(shard, request, request.base_version, grads)
        return shard, result

    def _push_stream(self, request_iterator: Iterator[Any]) -> tuple[ModelShard, PushResult]:
        """A streamed push: the header, then every chunk copied once into its gradient; applied."""
        request_iterator = wire.accept_all(request_iterator)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "a streamed push starts with a header")
        header = first.header
        shard = self._shard(header.model)
        sizes = []
        seen: set[str] = set()
        for i, info in enumerate(header.tensors):
            meta = shard.meta.get(info.name)
            if meta is None:
                raise InvalidArgument(f"header.tensors[{i}].name", f"no tensor {info.name!r} on this shard")
            if info.name in seen:
                raise InvalidArgument(f"header.tensors[{i}].name", f"duplicate gradient {info.name!r}")
            seen.add(info.name)
            itemsize = 4 if info.dtype == common_pb2.D_TYPE_FLOAT32 else 2
            check_shape(f"header.tensors[{i}]", info.dtype, tuple(info.shape), meta.size * itemsize)
            sizes.append(meta.size * itemsize)
        parts = collect_chunks(sizes, (m.chunk if m.WhichOneof("part") == "chunk" else None for m in request_iterator))
        grads: dict[str, Gradient] = {}
        for i, info in enumerate(header.tensors):
            in_place = chunked_float32(parts[i], sizes[i] // 4) if info.dtype == common_pb2.D_TYPE_FLOAT32 else None
            # float32 in whole aligned elements stays in its chunks (no copy, no allocation); otherwise one copy
            grads[info.name] = in_place or decode(info.dtype, assemble(f"header.tensors[{i}]", sizes[i], parts[i]).data)
        return shard, self._apply_push(shard, header, header.version, grads)

    def _completed(self, shard: ModelShard, result: PushResult, context: grpc.ServicerContext) -> None:
        """After a push, wait (within the deadline) for the version that includes it: SYNC's barrier."""
        if result.completes <= shard.version:
            return
        if not shard.wait_version(result.completes, _wait_budget(context)):
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"push buffered; version {result.completes} not completed by the other workers in time "
                f"(now {shard.version}); retry with the same step id to receive it",
            )

    def Push(self, request: pb.PushRequest | wire.WireMessage, context: grpc.ServicerContext) -> pb.PushResponse:
        """See the proto. The request arrives decoded by ``guardmesh.wire``: gradients are views of its bytes."""
        return _result_pb(self._push(request)[1])

    def PushStream(
        self, request_iterator: Iterator[pb.PushStreamRequest | wire.WireMessage], context: grpc.ServicerContext
    ) -> pb.PushStreamResponse:
        """See the proto. Chunks arrive decoded by ``guardmesh.wire`` and are copied once, into the gradient."""
        return pb.PushStreamResponse(result=_result_pb(self._push_stream(request_iterator)[1]))

    def PushPull(self, request: pb.PushPullRequest | wire.WireMessage, context: grpc.ServicerContext) -> bytes:
        """See the proto: ``Push``, then the shard's tensors framed as ``Pull`` frames them."""
        request = wire.accept(request)
        shard = self._shard(request.model)
        self._check_unary_size(shard, [])  # before the push: an answer too large must change nothing
        shard, result = self._push(request, shard)
        self._completed(shard, result, context)
        answered = _result_pb(result)

        def head(version: int) -> bytes:
            return pb.PushPullResponse(
                result=answered, version=version, incarnation=shard.incarnation
            ).SerializeToString()

        return shard.answer([], PUSH_PULL_TENSORS, head)

    def PushPullStream(
        self, request_iterator: Iterator[pb.PushPullStreamRequest | wire.WireMessage], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """See the proto: ``PushStream``, then the shard's tensors streamed as ``PullStream`` streams them."""
        shard, result = self._push_stream(request_iterator)
        self._completed(shard, result, context)
        yield from shard.framed([], self._stream_frames(shard, self._default_chunk(), _result_pb(result)))

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        """See the proto."""
        version, digest, written = self.core.checkpoint(request.model)
        return pb.CheckpointResponse(version=version, locations=written, sha256=digest)

    def RestoreCut(self, request: pb.RestoreCutRequest, context: grpc.ServicerContext) -> pb.RestoreCutResponse:
        """See the proto."""
        shard, rolled_back = self.core.restore_cut(request.model, request.version, request.cause)
        return pb.RestoreCutResponse(model=_info(shard), rolled_back=rolled_back)

    def LeaveSync(self, request: pb.LeaveSyncRequest, context: grpc.ServicerContext) -> pb.LeaveSyncResponse:
        """See the proto."""
        return pb.LeaveSyncResponse(version=self._shard(request.model).leave(request.worker_id))

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.GetStatsResponse:
        """See the proto."""
        st = self._shard(request.model).stats()
        return pb.GetStatsResponse(
            version=st["version"],
            pushes_accepted=st["accepted"],
            pushes_rejected_stale=st["rejected_stale"],
            pushes_rejected_nonfinite=st["rejected_nonfinite"],
            pushes_duplicate=st["duplicates"],
            pushes_late=st["late"],
            sync_members=st["members"],
            staleness=[pb.StalenessBucket(staleness=i, count=c) for i, c in enumerate(st["staleness"]) if c],
            push_rate=st["rate"],
            events=st["events"],
            answers_in_place=st["answers_in_place"],
            answers_copied=st["answers_copied"],
            answer_buffer_moves=st["answer_buffer_moves"],
        )


class ParamServerBinding:
    """Servicer plus the monitor thread that completes timed-out SYNC versions and watches push throughput."""

    def __init__(self, config: MeshConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.servicer = ParamServerServicer(config, clock)
        self.config = config
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def add_to_server(self, server: grpc.Server) -> None:
        """Add the servicer; the tensor-carrying methods use ``guardmesh.wire`` instead of upb (same bytes)."""
        wire.add_servicer(
            server,
            pb.DESCRIPTOR.services_by_name["ParamServerService"],
            self.servicer,
            requests={
                "Push": pb.PushRequest,
                "PushStream": pb.PushStreamRequest,
                "PushPull": pb.PushPullRequest,
                "PushPullStream": pb.PushPullStreamRequest,
            },
            framed_responses=("Pull", "PullStream", "PushPull", "PushPullStream"),
        )

    def start(self) -> None:
        """Tune the heap for message buffers, restore from checkpoints and start the throughput monitor."""
        keep_freed_memory(self.config.paramserver.heap_keep_mib)
        self.servicer.core.start()
        self._monitor = threading.Thread(target=self._watch, name="paramserver-monitor", daemon=True)
        self._monitor.start()

    def watch(self) -> None:
        """One round of the monitor (see ``ParamServerCore.watch``)."""
        for model, event in self.servicer.core.watch():
            log.warning("throughput drop", extra={"model": model, "event": event})

    def _watch(self) -> None:
        while not self._stop.wait(self.config.paramserver.monitor_interval_s):
            self.watch()

    def drain(self) -> None:
        """Nothing streams indefinitely here."""

    def close(self) -> None:
        """Stop the monitor, then write a final checkpoint of every model (no call is in flight any more)."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        self.servicer.core.close()


_PARAMSERVER = pb.DESCRIPTOR.services_by_name["ParamServerService"].full_name
SERVICE = ServiceDefinition(
    name="paramserver",
    service_names=(_PARAMSERVER,),
    build=ParamServerBinding,
    instance_name=lambda config: f"paramserver-{config.paramserver.shard_index}",
    # Trainers create, pull and push models; checkpoints on demand are admin's.
    roles=allow(
        _PARAMSERVER,
        ("trainer",),
        "CreateModel",
        "CreateModelStream",
        "DescribeModel",
        "Pull",
        "PullStream",
        "Push",
        "PushStream",
        "PushPull",
        "PushPullStream",
        "GetStats",
        "RestoreCut",
        "LeaveSync",
    ),
)
