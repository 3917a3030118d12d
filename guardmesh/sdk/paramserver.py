"""Trainer-side client of the parameter server: sharding, streaming, retries and re-pulls hidden.

A training loop needs a few lines::

    ps = ParamServerClient.connect("mnist-mlp")
    ps.create_from_module(model, optimizer=adam(1e-3), consistency=bounded_staleness(2))
    for batch in loader:
        ps.pull_into(model)                 # parameters and the versions they belong to
        loss_fn(model(batch.x), batch.y).backward()
        ps.push_from(model)                 # gradients; a stale push is recomputed after a re-pull

Tensors are spread over the shards by consistent hashing on their names; each shard keeps its own
version, and a push carries, per shard, the version its gradients were computed on.

Each client is one session (a random id): step ids are deduplicated per worker and session, so a worker
restarted under the same worker id is applied, not taken for a retry; a DUPLICATE answer for a step this
client never sent is warned about. A push carries its L2 norm over every shard, which clipping scales by.
When a shard restarted from a checkpoint cut (kill -9), the client rolls the other shards back to the same
cut before it pulls (RestoreCut), so a model is never a mix of versions.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import logging
import math
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from opentelemetry import trace

from guardmesh import wire
from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.discovery import registry_for
from guardmesh.errors import status_details
from guardmesh.tensors import decode
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("guardmesh.sdk.paramserver")
VIRTUAL_NODES = 64
#: Step ids remembered per client to tell a retry (DUPLICATE expected) from a collision (warned about).
SENT_STEPS = 4096
#: Arrays the caller wants tensors pulled into, by name (see :meth:`ParamServerClient.pull`).
Into = dict[str, np.ndarray] | None


def sgd(lr: float, weight_decay: float = 0.0) -> pb.OptimizerConfig:
    """Plain SGD settings."""
    return pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_SGD, learning_rate=lr, weight_decay=weight_decay)


def momentum(lr: float, momentum: float = 0.9, nesterov: bool = False) -> pb.OptimizerConfig:
    """SGD with momentum."""
    return pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_MOMENTUM, learning_rate=lr, momentum=momentum, nesterov=nesterov)


def adam(lr: float, weight_decay: float = 0.0, decoupled: bool = False, clip_norm: float = 0.0) -> pb.OptimizerConfig:
    """Adam (or AdamW with ``decoupled``)."""
    kind = pb.OPTIMIZER_KIND_ADAMW if decoupled else pb.OPTIMIZER_KIND_ADAM
    return pb.OptimizerConfig(kind=kind, learning_rate=lr, weight_decay=weight_decay, clip_norm=clip_norm)


def sync(workers: int, backup_workers: int = 0) -> pb.ConsistencyConfig:
    """Bulk-synchronous: average ``workers`` gradients per version."""
    return pb.ConsistencyConfig(mode=pb.CONSISTENCY_MODE_SYNC, workers=workers, backup_workers=backup_workers)


def bounded_staleness(max_staleness: int, scale_lr: bool = False) -> pb.ConsistencyConfig:
    """Stale-synchronous: accept staleness <= ``max_staleness``."""
    return pb.ConsistencyConfig(
        mode=pb.CONSISTENCY_MODE_BOUNDED_STALENESS, max_staleness=max_staleness, scale_lr_by_staleness=scale_lr
    )


def asynchronous(scale_lr: bool = False) -> pb.ConsistencyConfig:
    """Fully asynchronous (risky: unbounded staleness)."""
    return pb.ConsistencyConfig(mode=pb.CONSISTENCY_MODE_ASYNC, scale_lr_by_staleness=scale_lr)


class HashRing:
    """Consistent hashing of tensor names onto shards (64 virtual nodes per shard)."""

    def __init__(self, shards: int) -> None:
        points = []
        for s in range(shards):
            for v in range(VIRTUAL_NODES):
                points.append((self._hash(f"shard-{s}#{v}"), s))
        points.sort()
        self.keys = [p for p, _ in points]
        self.owners = [s for _, s in points]

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")

    def shard_of(self, name: str) -> int:
        """Shard owning tensor ``name``."""
        i = bisect.bisect(self.keys, self._hash(name)) % len(self.keys)
        return self.owners[i]


_SERVICE = "/guardmesh.v1.ParamServerService/"


class WireStub(pb_grpc.ParamServerServiceStub):
    """The generated stub, with the tensor-carrying methods through ``guardmesh.wire``.

    Answers carrying tensors (Pull, PullStream, PushPull, PushPullStream) decode into
    :class:`guardmesh.wire.WireMessage` (tensors are views of the received bytes); pushes send bytes framed
    by the SDK (gradients copied once, into the message), though protobuf messages are accepted too. The
    bytes on the wire are the proto contract's either way.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        pull_response, pull_stream_response = pb.PullResponse.DESCRIPTOR, pb.PullStreamResponse.DESCRIPTOR
        self.Pull = channel.unary_unary(
            _SERVICE + "Pull",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=lambda data: wire.decode(pull_response, data),
            _registered_method=True,
        )
        self.PullStream = channel.unary_stream(
            _SERVICE + "PullStream",
            request_serializer=pb.PullStreamRequest.SerializeToString,
            response_deserializer=lambda data: wire.decode(pull_stream_response, data),
            _registered_method=True,
        )
        self.Push = channel.unary_unary(
            _SERVICE + "Push",
            request_serializer=wire.serialize,
            response_deserializer=pb.PushResponse.FromString,
            _registered_method=True,
        )
        self.PushStream = channel.stream_unary(
            _SERVICE + "PushStream",
            request_serializer=wire.serialize,
            response_deserializer=pb.PushStreamResponse.FromString,
            _registered_method=True,
        )
        push_pull_response = pb.PushPullResponse.DESCRIPTOR
        push_pull_stream_response = pb.PushPullStreamResponse.DESCRIPTOR
        self.PushPull = channel.unary_unary(
            _SERVICE + "PushPull",
            request_serializer=wire.serialize,
            response_deserializer=lambda data: wire.decode(push_pull_response, data),
            _registered_method=True,
        )
        self.PushPullStream = channel.stream_stream(
            _SERVICE + "PushPullStream",
            request_serializer=wire.serialize,
            response_deserializer=lambda data: wire.decode(push_pull_stream_response, data),
            _registered_method=True,
        )


class StalePush(Exception):
    """A push was rejected as stale (or ahead after a restore); re-pull and recompute."""

    def __init__(self, shard: int, detail: pb.StalenessDetail | None, code: grpc.StatusCode) -> None:
        super().__init__(f"shard {shard}: push rejected ({code.name}): {detail}")
        self.shard = shard
        self.detail = detail
        self.code = code


@dataclass
class StepReport:
    """What one :meth:`ParamServerClient.train_step` did."""

    loss: object
    results: list[pb.PushResponse]
    repulls: int


@dataclass
class PullResult:
    """Tensors by name, and the version of each shard they came from."""

    tensors: dict[str, np.ndarray]
    versions: list[int]
    incarnations: list[str]


def shard_addresses(config: MeshConfig) -> list[str]:
    """Address of every paramserver shard: ``port + i`` statically, ``paramserver-<i>`` in Consul."""
    shards = config.paramserver.shards
    if config.discovery.mode == "consul":
        registry = registry_for(config)
        return [registry.resolve(f"paramserver-{i}")[0].address for i in range(shards)]
    ep = config.endpoint("paramserver")
    return [f"{ep.host}:{ep.port + i}" for i in range(shards)]


@dataclass
class ParamServerClient:
    """A model's parameters across every shard."""

    model: str
    addresses: list[str]
    config: MeshConfig
    worker_id: str = "worker-0"
    channels: list[grpc.Channel] = field(default_factory=list)
    stubs: list[WireStub] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    incarnations: list[str] = field(default_factory=list)
    _steps: Iterator[int] = field(default_factory=itertools.count)
    #: The module the last fused step's answer was loaded into (its next fused step needs no pull).
    _loaded: object = None
    #: Stage a CUDA module's gradients and parameters through page-locked host buffers (see ``_host``).
    pinned: bool = True
    #: id(parameter) -> (a weak reference to it, its page-locked buffers by kind); dropped with the parameter.
    _staging: dict[int, tuple[weakref.ref[Any], dict[str, Any]]] = field(default_factory=dict)
    #: This client's session (see PushRequest.session): a new one per client, so per process.
    session: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.ring = HashRing(len(self.addresses))
        self.channels = [open_channel("paramserver", self.config, address=a) for a in self.addresses]
        self.stubs = [WireStub(c) for c in self.channels]
        self.versions = [0] * len(self.addresses)
        self.incarnations = [""] * len(self.addresses)
        self.awaiting = [0] * len(self.addresses)
        #: Wire size of each shard's tensors (-1: not known yet); decides unary or streamed pulls.
        self.wire_bytes = [-1] * len(self.addresses)
        self.threshold = int(self.config.paramserver.stream_threshold_mib * (1 << 20))
        # Chunks stay well under the message limit (headers and field tags need room too).
        self.chunk = min(4 << 20, (self.config.grpc.max_message_mib << 20) - (1 << 16))
        #: (shard, step id) of the pushes sent, newest last: a DUPLICATE answer for one is a retry's.
        self._sent: OrderedDict[tuple[int, int], None] = OrderedDict()
        #: The model's clip norm (from DescribeModel or CreateModel); None until known.
        self.clip_norm: float | None = None
        #: Per shard, (restore_cause, restored_version) as last described; causes rolled back already.
        self._restores: dict[int, tuple[str, int]] = {}
        self._handled: set[str] = set()

    @classmethod
    def connect(
        cls,
        model: str,
        *,
        worker_id: str = "worker-0",
        config: MeshConfig | None = None,
        addresses: list[str] | None = None,
    ) -> ParamServerClient:
        """A client for ``model`` over the configured shards (or explicit addresses)."""
        config = config or load_config()
        return cls(model, addresses or shard_addresses(config), config, worker_id)

    def close(self) -> None:
        """Close the channels."""
        for c in self.channels:
            c.close()

    def stats(self, shard: int = 0) -> pb.GetStatsResponse:
        """One shard's push statistics for this model (``GetStats``): its version, the pushes applied and
        rejected as stale, and the staleness histogram of arriving pushes (NOT_FOUND for an unknown model)."""
        return self.stubs[shard].GetStats(pb.GetStatsRequest(model=self.model))

    def leave(self) -> None:
        """Leave a SYNC model on every shard: versions stop waiting for this worker (LeaveSync)."""
        for stub in self.stubs:
            stub.LeaveSync(pb.LeaveSyncRequest(model=self.model, worker_id=self.worker_id))

    # -- creation --------------------------------------------------------------------------------------

    def create(
        self,
        tensors: dict[str, np.ndarray],
        optimizer: pb.OptimizerConfig,
        consistency: pb.ConsistencyConfig,
        checkpoint_every: int = 0,
    ) -> list[pb.ModelInfo]:
        """Create (or attach to an identical) model: each shard gets the tensors the ring gives it."""
        per_shard: list[list[pb.NamedTensor]] = [[] for _ in self.stubs]
        for name, value in tensors.items():
            arr = np.ascontiguousarray(value, dtype="<f4")
            per_shard[self.ring.shard_of(name)].append(
                pb.NamedTensor(
                    name=name,
                    tensor=common_pb2.Tensor(
                        dtype=common_pb2.D_TYPE_FLOAT32, shape=list(arr.shape), data=arr.tobytes()
                    ),
                )
            )
        infos = []
        holders = [i for i, part in enumerate(per_shard) if part]  # a checkpoint cut needs each of them
        self.clip_norm = optimizer.clip_norm
        for i, stub in enumerate(self.stubs):
            if not per_shard[i]:
                continue
            request = pb.CreateModelRequest(
                model=self.model,
                tensors=per_shard[i],
                optimizer=optimizer,
                consistency=consistency,
                checkpoint_every=checkpoint_every,
                cut_shards=holders,
            )
            if sum(len(t.tensor.data) for t in per_shard[i]) <= self.threshold:
                info = stub.CreateModel(request).model
            else:
                info = stub.CreateModelStream(_creation_stream(request, self.chunk)).model
            self.versions[i] = info.version
            self.incarnations[i] = info.incarnation
            infos.append(info)
        return infos

    def create_from_state_dict(
        self,
        state_dict: dict[str, object],
        optimizer: pb.OptimizerConfig,
        consistency: pb.ConsistencyConfig,
        checkpoint_every: int = 0,
    ) -> list[pb.ModelInfo]:
        """Create the model from a PyTorch ``state_dict`` (floating-point entries; buffers included)."""
        tensors = {
            n: t.detach().cpu().float().numpy()  # type: ignore[attr-defined]
            for n, t in state_dict.items()
            if getattr(t, "is_floating_point", lambda: False)()
        }
        return self.create(tensors, optimizer, consistency, checkpoint_every)

    def create_from_module(
        self,
        module: object,
        optimizer: pb.OptimizerConfig,
        consistency: pb.ConsistencyConfig,
        checkpoint_every: int = 0,
    ) -> list[pb.ModelInfo]:
        """Create the model from a ``torch.nn.Module``'s parameters (its ``named_parameters``)."""
        tensors = {n: p.detach().cpu().numpy() for n, p in module.named_parameters()}  # type: ignore[attr-defined]
        return self.create(tensors, optimizer, consistency, checkpoint_every)

    # -- pull ------------------------------------------------------------------------------------------

    def _describe(self, i: int) -> pb.ModelInfo:
        """The shard's model; records the wire size of its tensors (which decides unary or streamed calls)."""
        info = self.stubs[i].DescribeModel(pb.DescribeModelRequest(model=self.model)).model
        self.wire_bytes[i] = sum(
            int(np.prod(t.shape)) * (4 if t.dtype == common_pb2.D_TYPE_FLOAT32 else 2) for t in info.tensors
        )
        self.clip_norm = info.optimizer.clip_norm
        self._restores[i] = (info.restore_cause, info.restored_version)
        return info

    def _roll_back_peers(self) -> bool:
        """After a shard restarted from a checkpoint cut, roll every other shard back to that cut (once per
        restart, whichever client does it: RestoreCut is idempotent per cause). True if a shard rolled back
        (what was pulled before is then of the wrong cut)."""
        rolled = False
        for i, (cause, version) in list(self._restores.items()):
            if not cause or cause in self._handled:
                continue
            for j, stub in enumerate(self.stubs):
                if j == i:
                    continue
                try:
                    resp = stub.RestoreCut(pb.RestoreCutRequest(model=self.model, version=version, cause=cause))
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.NOT_FOUND:  # the model has no part on that shard
                        continue
                    raise
                if resp.rolled_back:
                    log.warning("shard %d rolled back to cut v%d: shard %d restarted from it", j, version, i)
                rolled |= resp.rolled_back
            self._handled.add(cause)
        return rolled

    def _pull_shard(
        self, i: int, min_version: int, timeout: float | None, into: Into = None
    ) -> tuple[int, str, dict[str, np.ndarray]]:
        stub = self.stubs[i]
        if self.wire_bytes[i] < 0 or min_version > 0:
            # First contact, or about to wait for a version: check the shard did not restart meanwhile.
            info = self._describe(i)
            if self.incarnations[i] and info.incarnation != self.incarnations[i]:
                min_version = 0  # the shard restarted: the version we waited for may never come
                self.awaiting[i] = 0
        req = pb.PullRequest(model=self.model, min_version=min_version)
        if self.wire_bytes[i] <= self.threshold:
            resp = stub.Pull(req, timeout=timeout)
            return resp.version, resp.incarnation, {nt.name: _received(nt, into) for nt in resp.tensors}
        version, incarnation, out, _ = _assemble(
            stub.PullStream(pb.PullStreamRequest(pull=req, chunk_bytes=self.chunk), timeout=timeout), into
        )
        return version, incarnation, out

    def _pulled(self, i: int, version: int, incarnation: str) -> None:
        """Record the version and incarnation a shard's tensors were received at."""
        if self.incarnations[i] and incarnation != self.incarnations[i]:
            log.warning(
                "shard %d restarted (incarnation %s -> %s, version %d)", i, self.incarnations[i], incarnation, version
            )
            self._describe(i)  # restored from a cut? then the other shards roll back to it
        self.versions[i] = version
        self.incarnations[i] = incarnation
        if version >= self.awaiting[i]:
            self.awaiting[i] = 0

    def pull(
        self, min_versions: list[int] | None = None, timeout: float | None = None, into: Into = None
    ) -> PullResult:
        """Every tensor, with the version of each shard.

        Waits for ``min_versions`` if given; by default, after a SYNC push was buffered, for the version
        that push will produce (so a fast worker does not recompute on the version it already served).
        Tensors named in ``into`` are written into those arrays (C-contiguous, writable float32 of the
        tensor's size: a streamed answer's chunks land there directly, with no buffer of their own) and
        returned as them; the others are views of the received bytes (read-only) or new arrays.
        """
        while True:
            tensors: dict[str, np.ndarray] = {}
            wanted = min_versions or self.awaiting
            for i in range(len(self.stubs)):
                version, incarnation, part = self._pull_shard(i, wanted[i], timeout, into)
                self._pulled(i, version, incarnation)
                tensors.update(part)
            if not self._roll_back_peers():
                return PullResult(tensors, list(self.versions), list(self.incarnations))

    def pull_into(self, module: object, min_versions: list[int] | None = None) -> PullResult:
        """Copy the server's parameters into a ``torch.nn.Module`` in place."""
        result = self.pull(min_versions, into=self._module_into(module))
        self._load_module(module, result)
        return result

    # -- push ------------------------------------------------------------------------------------------

    def _split(self, grads: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        per_shard: list[dict[str, np.ndarray]] = [{} for _ in self.stubs]
        for name, g in grads.items():
            per_shard[self.ring.shard_of(name)][name] = np.ascontiguousarray(g, dtype="<f4")
        return per_shard

    @staticmethod
    @contextlib.contextmanager
    def _stale_pushes_raised(i: int) -> Iterator[None]:
        """Turn shard ``i``'s refusal of a push as stale (status with a StalenessDetail) into StalePush."""
        try:
            yield
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
                details = status_details(err, pb.StalenessDetail)
                if details:
                    raise StalePush(i, details[0], err.code()) from err  # type: ignore[arg-type]
            raise

    def _global_norm(self, parts: list[dict[str, np.ndarray]]) -> float:
        """The L2 norm of a push (its parts by shard) over every shard when the model clips (0 otherwise: not
        needed)."""
        if self.clip_norm is None:
            self._describe(next((i for i, part in enumerate(parts) if part), 0))
        if not self.clip_norm:
            return 0.0
        return math.sqrt(
            math.fsum(float(np.dot(g.reshape(-1), g.reshape(-1))) for part in parts for g in part.values())
        )

    def _sending(self, i: int, step: int) -> bool:
        """Record that step ``step`` goes to shard ``i``; True if it went there before (a retry)."""
        key = (i, step)
        before = key in self._sent
        self._sent[key] = None
        self._sent.move_to_end(key)
        while len(self._sent) > SENT_STEPS:
            self._sent.popitem(last=False)
        return before

    def _answered(self, i: int, step: int, retry: bool, result: pb.PushResponse) -> None:
        """Warn about a DUPLICATE answer to a push this client had not sent before: the shard took it for a
        retry of another process's push (same worker id and session), so it was not applied."""
        if result.outcome == pb.PUSH_OUTCOME_DUPLICATE and not retry:
            message = (
                f"shard {i} answered DUPLICATE to step {step} of worker {self.worker_id!r} (session {self.session}), "
                "which this client had not sent: the push was NOT applied. Another client uses the same worker id "
                "and session, the step ids repeat, or (SYNC) a previous process of this worker already pushed for "
                "this version."
            )
            log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=4)

    def push(self, grads: dict[str, np.ndarray], step_id: int | None = None) -> list[pb.PushResponse]:
        """Push gradients computed on the last pulled versions. Raises StalePush to ask for a re-pull."""
        step = next(self._steps) if step_id is None else step_id
        results = []
        parts = self._split(grads)
        norm = self._global_norm(parts)
        for i, part in enumerate(parts):
            if not part:
                continue
            retry = self._sending(i, step)
            with self._stale_pushes_raised(i):
                result = self._push_shard(i, part, step, norm)
            self._answered(i, step, retry, result)
            results.append(result)
            # A buffered SYNC push (or a restarted worker's DUPLICATE of one) completes a later version: the next
            # pull waits for it. ``completes`` is 0 from a server that does not send it.
            buffered = result.version + 1 if result.outcome == pb.PUSH_OUTCOME_BUFFERED else 0
            completes = max(result.completes, buffered)
            self.awaiting[i] = completes if completes > result.version else 0
        return results

    def push_pull(
        self,
        grads: dict[str, np.ndarray],
        step_id: int | None = None,
        timeout: float | None = None,
        into: Into = None,
    ) -> tuple[list[pb.PushResponse], PullResult]:
        """Push gradients and receive the parameters for the next step in one call per shard (PushPull).

        The answer of a shard is the version that includes the push (SYNC waits for the other workers'
        pushes, within ``timeout``). A shard without gradients in ``grads`` is pulled. ``into`` as for
        :meth:`pull`. Raises StalePush as :meth:`push` does; nothing of that shard was pulled then.
        """
        step = next(self._steps) if step_id is None else step_id
        results: list[pb.PushResponse] = []
        tensors: dict[str, np.ndarray] = {}
        parts = self._split(grads)
        norm = self._global_norm(parts)
        for i, part in enumerate(parts):
            if not part:
                version, incarnation, out = self._pull_shard(i, self.awaiting[i], timeout, into)
            else:
                retry = self._sending(i, step)
                with self._stale_pushes_raised(i):
                    result, version, incarnation, out = self._push_pull_shard(i, part, step, timeout, into, norm)
                self._answered(i, step, retry, result)
                results.append(result)
            self._pulled(i, version, incarnation)
            tensors.update(out)
        if self._roll_back_peers():  # a shard restarted from a cut: what was answered mixes cuts
            return results, self.pull(timeout=timeout, into=into)
        return results, PullResult(tensors, list(self.versions), list(self.incarnations))

    def _push_head(self, i: int, step: int, norm: float) -> bytes:
        """A PushRequest (or PushPullRequest: the same fields) without gradients, serialized."""
        return pb.PushRequest(
            model=self.model,
            worker_id=self.worker_id,
            base_version=self.versions[i],
            step_id=step,
            incarnation=self.incarnations[i],  # a restore since the pull makes the server refuse it
            session=self.session,
            global_norm=norm,
        ).SerializeToString()

    def _push_message(self, i: int, part: dict[str, np.ndarray], step: int, norm: float) -> bytes:
        frames = wire.Frames(self._push_head(i, step, norm))
        for n, g in part.items():
            frames.named_tensor(5, n, common_pb2.D_TYPE_FLOAT32, g.shape, g)
        return frames.join()  # the join is the gradients' one copy

    def _push_messages(self, i: int, part: dict[str, np.ndarray], step: int, norm: float) -> Iterator[bytes]:
        """A streamed push: a header, then chunks of each gradient (each chunk copied once, into its message)."""
        head = pb.PushStreamRequest()
        head.header.model = self.model
        head.header.version = self.versions[i]
        head.header.worker_id = self.worker_id
        head.header.step_id = step
        head.header.incarnation = self.incarnations[i]
        head.header.session = self.session
        head.header.global_norm = norm
        for n, g in part.items():
            head.header.tensors.add(name=n, dtype=common_pb2.D_TYPE_FLOAT32, shape=list(g.shape))
        yield head.SerializeToString()
        for t, g in enumerate(part.values()):
            raw = g.reshape(-1).view(np.uint8)
            for off in range(0, raw.size, self.chunk):
                yield b"".join(wire.tensor_chunk(2, t, off, raw[off : off + self.chunk]))

    def _push_shard(self, i: int, part: dict[str, np.ndarray], step: int, norm: float) -> pb.PushResponse:
        if sum(g.nbytes for g in part.values()) <= self.threshold:
            return self.stubs[i].Push(self._push_message(i, part, step, norm))
        return self.stubs[i].PushStream(self._push_messages(i, part, step, norm)).result

    def _push_pull_shard(
        self, i: int, part: dict[str, np.ndarray], step: int, timeout: float | None, into: Into, norm: float
    ) -> tuple[pb.PushResponse, int, str, dict[str, np.ndarray]]:
        stub = self.stubs[i]
        if self.wire_bytes[i] < 0:
            self._describe(i)
        if max(self.wire_bytes[i], sum(g.nbytes for g in part.values())) <= self.threshold:
            resp = stub.PushPull(self._push_message(i, part, step, norm), timeout=timeout)
            out = {nt.name: _received(nt, into) for nt in resp.tensors}
            return resp.result.to_message(pb.PushResponse), resp.version, resp.incarnation, out
        version, incarnation, out, header = _assemble(
            stub.PushPullStream(self._push_messages(i, part, step, norm), timeout=timeout), into
        )
        return header.result.to_message(pb.PushResponse), version, incarnation, out

    def train_step(
        self,
        module: object,
        compute: Callable[[], object],
        *,
        fused: bool = False,
        max_repulls: int = 20,
        unavailable_wait_s: float = 0.5,
        unavailable_budget_s: float = 60.0,
    ) -> StepReport:
        """One training step: pull into ``module``, run ``compute`` (forward + ``backward()``), push.

        With ``fused``, the push is a PushPull whose answer loads ``module`` with the parameters for the
        next step, so a step costs one round trip instead of two (the next step then computes on the
        parameters of the end of this one rather than of a fresh pull: its staleness may be slightly higher).

        A push rejected as stale (or ahead of a restored server) is recomputed after a re-pull; a shard
        that stays UNAVAILABLE beyond the channel's own retries (a restart) is waited for up to
        ``unavailable_budget_s``. The step id is fixed for the step, so a push retried after a lost answer
        is applied once. The step is one span (``guardmesh.train_step``): its pulls and pushes are child spans,
        and so is anything the caller does inside it in the same trace (a lease renewal).
        """
        step = next(self._steps)
        repulls = 0
        waited = 0.0
        with _tracer.start_as_current_span(
            "guardmesh.train_step",
            attributes={"guardmesh.model": self.model, "guardmesh.step_id": step, "guardmesh.fused": fused},
        ) as span:
            while True:
                try:
                    if not (fused and self._loaded is module):
                        self.pull_into(module)
                    self._loaded = None
                    for p in module.parameters():  # type: ignore[attr-defined]
                        p.grad = None
                    loss = compute()
                    if fused:
                        results = self.push_pull_from(module, step_id=step)
                        self._loaded = module
                    else:
                        results = self.push_from(module, step_id=step)
                    span.set_attribute("guardmesh.repulls", repulls)
                    span.set_attribute("guardmesh.versions", [r.version for r in results])
                    span.set_attribute("guardmesh.staleness", [r.staleness for r in results])
                    return StepReport(loss, results, repulls)
                except StalePush:
                    repulls += 1
                    span.add_event("stale push rejected; re-pull", {"guardmesh.repulls": repulls})
                    if repulls > max_repulls:
                        raise
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or waited >= unavailable_budget_s:
                        raise
                    time.sleep(unavailable_wait_s)
                    waited += unavailable_wait_s

    def push_from(self, module: object, step_id: int | None = None) -> list[pb.PushResponse]:
        """Push the ``.grad`` of every parameter of a ``torch.nn.Module``."""
        return self.push(self._module_grads(module), step_id)

    def push_pull_from(self, module: object, step_id: int | None = None) -> list[pb.PushResponse]:
        """PushPull the ``.grad`` of every parameter of a ``torch.nn.Module`` and load the answer into it."""
        results, pulled = self.push_pull(self._module_grads(module), step_id, into=self._module_into(module))
        self._load_module(module, pulled)
        return results

    # -- torch modules ---------------------------------------------------------------------------------

    def _host(self, p: object, kind: str) -> Any:
        """The page-locked host buffer of ``kind`` ("grad" or "param") for the CUDA parameter ``p``.

        Copies between the GPU and page-locked memory are DMA transfers that need no staging through the
        driver's own buffers; kept per parameter, the buffers are allocated once, not on every step.
        """
        import torch

        buffers = self._staged(p)
        if buffers is None:
            buffers = {}
            self._staging[id(p)] = (weakref.ref(p), buffers)
            weakref.finalize(p, self._staging.pop, id(p), None)  # frees the page-locked memory with it
        buf = buffers.get(kind)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:  # type: ignore[attr-defined]
            buf = buffers[kind] = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)  # type: ignore[attr-defined]
        return buf

    def _staged(self, p: object) -> dict[str, Any] | None:
        """The page-locked buffers of parameter ``p`` (tensors compare elementwise: looked up by identity)."""
        entry = self._staging.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else None

    def _module_grads(self, module: object) -> dict[str, np.ndarray]:
        """The ``.grad`` of every parameter that has one, as numpy arrays (CUDA ones through ``_host``)."""
        import torch

        grads: dict[str, np.ndarray] = {}
        devices = set()
        for n, p in module.named_parameters():  # type: ignore[attr-defined]
            if p.grad is None:
                continue
            if self.pinned and p.grad.is_cuda:
                buf = self._host(p, "grad")
                buf.copy_(p.grad.detach(), non_blocking=True)
                devices.add(p.grad.device)
                grads[n] = buf.numpy()
            else:
                grads[n] = p.grad.detach().cpu().numpy()
        for device in devices:  # the copies have landed before the push reads the buffers
            torch.cuda.synchronize(device)
        return grads

    def _module_into(self, module: object) -> Into:
        """Page-locked buffers to pull a CUDA module's float32 parameters into (None without any)."""
        import torch

        if not self.pinned:
            return None
        into = {
            n: self._host(p, "param").numpy()
            for n, p in module.named_parameters()  # type: ignore[attr-defined]
            if p.is_cuda and p.dtype == torch.float32
        }
        return into or None

    def _load_module(self, module: object, pulled: PullResult) -> None:
        """Copy pulled tensors into a ``torch.nn.Module``'s parameters in place (from the page-locked buffers
        when they were pulled there: asynchronously, then waited for, so the buffers are free again)."""
        import torch

        devices = set()
        with torch.no_grad(), warnings.catch_warnings():
            # The arrays view the received bytes (read-only, no copy); copy_ only reads them.
            warnings.simplefilter("ignore", UserWarning)
            for name, p in module.named_parameters():  # type: ignore[attr-defined]
                values = pulled.tensors[name]
                buffers = self._staged(p) if p.is_cuda else None
                staged = buffers.get("param") if buffers is not None else None
                if staged is not None and values.ctypes.data == staged.data_ptr():  # type: ignore[attr-defined]
                    p.copy_(staged, non_blocking=True)
                    devices.add(p.device)
                else:
                    p.copy_(torch.from_numpy(values.reshape(tuple(p.shape))))
        for device in devices:
            torch.cuda.synchronize(device)


def _destination(into: Into, name: str, count: int) -> np.ndarray | None:
    """The caller's array for tensor ``name`` (flat, float32), or None; ValueError if it cannot take it."""
    if not into or name not in into:
        return None
    dest = into[name]
    if dest.dtype != np.float32 or dest.size != count or not dest.flags.c_contiguous or not dest.flags.writeable:
        raise ValueError(
            f"into[{name!r}] must be a C-contiguous, writable float32 array of {count} elements "
            f"(got {dest.dtype}, {dest.size} elements)"
        )
    return dest.reshape(-1)


def _received(nt: wire.WireMessage, into: Into) -> np.ndarray:
    """A received tensor as float32: in the caller's array if ``into`` names it (one copy), else a view of
    the message's bytes when it is float32 (read-only, no copy)."""
    values = decode(nt.tensor.dtype, nt.tensor.data)
    dest = _destination(into, nt.name, values.size)
    if dest is None:
        return values.reshape(tuple(nt.tensor.shape))
    np.copyto(dest, values)
    return into[nt.name]  # type: ignore[index]


def _assemble(
    messages: Iterator[wire.WireMessage], into: Into = None
) -> tuple[int, str, dict[str, np.ndarray], wire.WireMessage]:
    """A streamed answer (header, then chunks) as (version, incarnation, tensors, header): one copy per chunk,
    straight into the caller's array for a float32 tensor that ``into`` names."""
    header: wire.WireMessage | None = None
    buffers: list[np.ndarray] = []
    direct: list[bool] = []
    for msg in messages:
        if msg.WhichOneof("part") == "header":
            header = msg.header
            buffers, direct = [], []
            for t in header.tensors:
                count = int(np.prod(t.shape))
                dest = _destination(into, t.name, count)
                direct.append(dest is not None and t.dtype == common_pb2.D_TYPE_FLOAT32)
                if dest is not None and t.dtype == common_pb2.D_TYPE_FLOAT32:
                    buffers.append(dest.view(np.uint8))
                else:
                    buffers.append(np.empty(count * (4 if t.dtype == common_pb2.D_TYPE_FLOAT32 else 2), np.uint8))
        else:
            c = msg.chunk
            buffers[c.tensor][c.offset : c.offset + len(c.data)] = np.frombuffer(c.data, dtype=np.uint8)
    if header is None:
        raise RuntimeError("the server's stream ended without a header")
    out = {}
    for t, buf, is_direct in zip(header.tensors, buffers, direct, strict=True):
        values = decode(t.dtype, buf.data)
        dest = None if is_direct else _destination(into, t.name, values.size)
        if dest is not None:
            np.copyto(dest, values)  # a float16/bfloat16 tensor: converted into the caller's array
        out[t.name] = into[t.name] if is_direct or dest is not None else values.reshape(tuple(t.shape))  # type: ignore[index]
    return header.version, header.incarnation, out, header


def _creation_stream(request: pb.CreateModelRequest, chunk: int = 4 << 20) -> Iterator[pb.CreateModelStreamRequest]:
    """A creation request as a header without data followed by chunks of each tensor."""
    header = pb.CreateModelRequest()
    header.CopyFrom(request)
    for nt in header.tensors:
        nt.tensor.data = b""
    yield pb.CreateModelStreamRequest(header=header)
    for t, nt in enumerate(request.tensors):
        raw = memoryview(nt.tensor.data)
        for off in range(0, len(raw), chunk):
            yield pb.CreateModelStreamRequest(
                chunk=pb.TensorChunk(tensor=t, offset=off, data=bytes(raw[off : off + chunk]))
            )
