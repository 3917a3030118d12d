"""The Open Inference Protocol (KServe v2) gRPC API over any model backend.

:class:`OpenInferenceServicer` serves ``inference.GRPCInferenceService`` (ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer, and Triton's ModelConfig, RepositoryIndex and
ModelStatistics) so that existing clients (tritonclient, the kserve SDK) talk to the scorer unchanged.
It only translates: protobuf tensors to numpy arrays and back, checks every request against the model's
signature, and raises :mod:`guardmesh.errors` domain errors that the runtime turns into status codes.
Models run behind the small :class:`InferenceBackend` protocol and know nothing of gRPC; this module imports no torch.

Rules of the wire format (from the spec):

* Input data travels either as ``raw_input_contents`` (one little-endian, row-major byte string per input,
  in the order of ``inputs``; BYTES elements as a 4-byte little-endian length then the bytes) or as typed
  ``contents`` on every input; never both.
* **Responses answer in the form the request used**: ``raw_output_contents`` when the request carried
  ``raw_input_contents`` (what tritonclient sends and the only numeric form it reads; Triton always answers
  raw), typed ``contents`` otherwise, so a client that builds typed requests by hand reads typed answers.
  A typed answer falls back to raw when an output's datatype has no typed field (FP16).
* ``outputs`` in the request selects a subset, answered in the requested order; empty means every output
  of the model, in the signature's order.
* An empty model version means the model's default: the last (newest) of its ``versions``.

Errors: NOT_FOUND (unknown model or version), UNAVAILABLE (model not ready), INVALID_ARGUMENT (malformed
request; the message names the input or output: ``input 'x': shape [2, 4] of FP32 needs 32 bytes,
raw_input_contents[0] has 28``).
"""

from __future__ import annotations

import asyncio
import math
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import grpc
import numpy as np

from guardmesh import __version__
from guardmesh.errors import InvalidArgument, NotFound, Unavailable
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inference import model_repository_pb2 as repo_pb

#: The gRPC service this module serves (for ServiceDefinition.service_names, health and reflection).
SERVICE_NAME = "inference.GRPCInferenceService"

#: Spec datatype -> numpy dtype of one element as it travels raw (little-endian). BYTES is handled apart.
_RAW_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

#: Spec datatype -> the InferTensorContents field that carries it typed (FP16 has none: raw only).
_TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: Every datatype this adapter accepts (BF16 is left out: numpy has no bfloat16).
DATATYPES = (*_RAW_DTYPES, "BYTES")

#: Parameters of protocol extensions this server does not implement; a request using them is refused
#: rather than half-served (the extensions are not announced in ServerMetadata).
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "the shared-memory extension is not supported",
    "shared_memory_byte_size": "the shared-memory extension is not supported",
    "shared_memory_offset": "the shared-memory extension is not supported",
    "classification": "the classification extension is not supported",
}


class TensorSpec(NamedTuple):
    """One input or output of a model: name, spec datatype and shape (-1 for a dimension that varies)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSignature:
    """What a model declares: its versions (oldest first; the last is the default), platform and tensors.

    ``max_batch_size`` > 0 says the first dimension of every tensor is the batch (Triton's convention:
    the model configuration then lists shapes without it); ``parameters`` are served in the model
    configuration (the scorer's "feature_names").
    """

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ExecutionStats:
    """What the model did at one version, whichever way the rows came in."""

    #: Rows scored.
    inference_count: int = 0
    #: Model executions (batches).
    execution_count: int = 0
    #: Time of the last execution, milliseconds since the Unix epoch (0: never).
    last_inference_ms: int = 0
    #: Executions by batch size.
    batch_sizes: tuple[tuple[int, int], ...] = ()


@dataclass
class _RequestStats:
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0


class InferenceBackend(Protocol):
    """Models behind the Open Inference Protocol; no gRPC here.

    The adapter checks ``name`` against :meth:`model_names` and resolves an empty version to the last of
    ``model_metadata(name, "").versions`` before anything else, so the other calls receive a known model
    and a known, concrete version (empty only for a model that declares no versions). Input arrays handed
    to :meth:`infer` already match the signature (names, datatypes, shapes) and may be read-only views of
    the request's bytes.
    """

    def server_ready(self) -> bool:
        """Whether every model the server must serve is ready."""
        ...

    def model_names(self) -> list[str]:
        """Names of the models served."""
        ...

    def model_ready(self, name: str, version: str) -> bool:
        """Whether ``name`` at ``version`` can run inference now."""
        ...

    def model_metadata(self, name: str, version: str) -> ModelSignature:
        """The signature of ``name`` at ``version`` (an empty version: the default one)."""
        ...

    def infer(self, name: str, version: str, inputs: dict[str, np.ndarray], request_id: str) -> dict[str, np.ndarray]:
        """Run the model on the request (``request_id``: its ``id``, may be empty); return at least every
        output of its signature, by name."""
        ...

    def statistics(self, name: str, version: str) -> ExecutionStats:
        """What the model did at ``version`` (for ModelStatistics)."""
        ...


def _config_type(datatype: str) -> int:
    """The model configuration's DataType of a protocol datatype (BYTES is TYPE_STRING there)."""
    return int(repo_pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    """A tensor's dimensions as the model configuration lists them: without the batch dimension."""
    return list(spec.shape[1:] if batched else spec.shape)


def _shape_text(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_parameters(where: str, parameters: Mapping[str, pb.InferParameter]) -> None:
    for key in parameters:
        if key in _UNSUPPORTED_PARAMETERS:
            raise InvalidArgument(where, f"parameter '{key}': {_UNSUPPORTED_PARAMETERS[key]}")


def decode_raw(where: str, datatype: str, shape: Sequence[int], data: bytes, source: str) -> np.ndarray:
    """Decode one raw tensor (little-endian, row-major) into an array of ``shape``; native byte order."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_raw_bytes(where, shape, data, source, count)
    dtype = _RAW_DTYPES[datatype]
    needed = count * dtype.itemsize
    if len(data) != needed:
        raise InvalidArgument(
            where, f"shape {_shape_text(shape)} of {datatype} needs {needed} bytes, {source} has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _decode_raw_bytes(where: str, shape: Sequence[int], data: bytes, source: str, count: int) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidArgument(where, f"{source}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidArgument(where, f"{source}: BYTES element {len(items)} runs past the end of the data")
        items.append(bytes(data[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidArgument(
            where, f"shape {_shape_text(shape)} needs {count} BYTES elements, {source} has {len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def decode_typed(where: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> np.ndarray:
    """Decode one tensor given as typed ``contents`` into an array of ``shape``."""
    field = _TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(where, f"{datatype} has no typed contents field; send it in raw_input_contents")
    stray = [f.name for f, _ in contents.ListFields() if f.name != field]
    if stray:
        raise InvalidArgument(where, f"contents.{stray[0]} is set but datatype {datatype} travels in contents.{field}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            where, f"shape {_shape_text(shape)} needs {count} elements, contents.{field} has {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = _RAW_DTYPES[datatype].newbyteorder("=")
    if dtype.kind in "iu" and dtype.itemsize < 4 and count:
        # INT8/16 and UINT8/16 travel widened to 32 bits: refuse values the declared type cannot hold.
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(where, f"contents.{field} holds values outside the range of {datatype}")
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_raw(datatype: str, array: np.ndarray) -> bytes:
    """Encode an array as one raw tensor: little-endian, row-major (BYTES: length-prefixed elements)."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts += [struct.pack("<I", len(data)), data]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=_RAW_DTYPES[datatype]).tobytes()


def encode_typed(datatype: str, array: np.ndarray, contents: pb.InferTensorContents) -> None:
    """Write an array into the typed ``contents`` field that carries ``datatype``."""
    field = getattr(contents, _TYPED_FIELDS[datatype])
    flat = array.reshape(-1)
    if datatype == "BYTES":
        field.extend(item.encode() if isinstance(item, str) else bytes(item) for item in flat)
    else:
        field.extend(flat.tolist())


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over an :class:`InferenceBackend` (see the module docstring)."""

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        server_name: str = "guardmesh-scorer",
        server_version: str = __version__,
        extensions: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.server_name = server_name
        self.server_version = server_version
        self.extensions = tuple(extensions)
        self._stats: dict[tuple[str, str], _RequestStats] = {}
        self._stats_lock = threading.Lock()

    # -- health and metadata -------------------------------------------------------------------------

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        """The process answers, so it is live."""
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        """Ready when the backend says every model is."""
        return pb.ServerReadyResponse(ready=bool(self.backend.server_ready()))

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        """Whether one model (version) is ready. Errors: NOT_FOUND (unknown model or version)."""
        version, _ = self._resolve("name", request.name, request.version)
        return pb.ModelReadyResponse(ready=bool(self.backend.model_ready(request.name, version)))

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        return pb.ServerMetadataResponse(
            name=self.server_name, version=self.server_version, extensions=list(self.extensions)
        )

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """A model's versions, platform and tensors. Errors: NOT_FOUND (unknown model or version)."""
        _, signature = self._resolve("name", request.name, request.version)

        def tensors(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
                for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=signature.name or request.name,
            versions=list(signature.versions),
            platform=signature.platform,
            inputs=tensors(signature.inputs),
            outputs=tensors(signature.outputs),
        )

    # -- inference -----------------------------------------------------------------------------------

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        """Decode, check, run, encode. Errors: NOT_FOUND, UNAVAILABLE, INVALID_ARGUMENT (see the module)."""
        name = request.model_name
        version, signature = self._resolve("model_name", name, request.model_version)
        with self._counted(name, version):
            inputs, wanted, raw = self._decode(request, name, version, signature)
            results = self.backend.infer(name, version, inputs, request.id)
            return self._encode(request, name, version, wanted, raw, results)

    @contextmanager
    def _counted(self, name: str, version: str) -> Iterator[None]:
        """Count the request run in the block, with its time, as a success or (it raised) a failure."""
        started = time.perf_counter_ns()
        ok = False
        try:
            yield
            ok = True
        finally:
            elapsed = time.perf_counter_ns() - started
            with self._stats_lock:
                stats = self._stats.setdefault((name, version), _RequestStats())
                if ok:
                    stats.success, stats.success_ns = stats.success + 1, stats.success_ns + elapsed
                else:
                    stats.fail, stats.fail_ns = stats.fail + 1, stats.fail_ns + elapsed

    def _decode(
        self, request: pb.ModelInferRequest, name: str, version: str, signature: ModelSignature
    ) -> tuple[dict[str, np.ndarray], list[TensorSpec], bool]:
        """The request's inputs as arrays, the outputs wanted, and whether the request came raw."""
        if not self.backend.model_ready(name, version):
            raise Unavailable(f"model '{name}' version '{version}': not ready")
        _check_parameters("parameters", request.parameters)
        raw = len(request.raw_input_contents) > 0
        return self._decode_inputs(request, signature, raw), self._requested_outputs(request, signature), raw

    def _encode(
        self,
        request: pb.ModelInferRequest,
        name: str,
        version: str,
        wanted: list[TensorSpec],
        raw: bool,
        results: Mapping[str, np.ndarray],
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
        outputs: list[tuple[TensorSpec, np.ndarray]] = []
        for spec in wanted:
            if spec.name not in results:
                raise RuntimeError(f"model '{name}': backend returned no output '{spec.name}'")
            outputs.append((spec, self._conform_output(name, spec, results[spec.name])))
        as_raw = raw or any(spec.datatype not in _TYPED_FIELDS for spec, _ in outputs)
        for spec, array in outputs:
            tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
            if as_raw:
                response.raw_output_contents.append(encode_raw(spec.datatype, array))
            else:
                encode_typed(spec.datatype, array, tensor.contents)
        return response

    # -- Triton's model-repository extension ---------------------------------------------------------

    def ModelConfig(
        self, request: repo_pb.ModelConfigRequest, context: grpc.ServicerContext
    ) -> repo_pb.ModelConfigResponse:
        """The model's configuration in Triton's form. Errors: INVALID_ARGUMENT, NOT_FOUND."""
        _, signature = self._resolve("name", request.name, request.version)
        batched = signature.max_batch_size > 0
        config = repo_pb.ModelConfig(
            name=signature.name or request.name,
            platform=signature.platform,
            backend=signature.platform.split("_", 1)[0],
            max_batch_size=signature.max_batch_size,
        )
        for spec in signature.inputs:
            config.input.add(name=spec.name, data_type=_config_type(spec.datatype), dims=_dims(spec, batched))
        for spec in signature.outputs:
            config.output.add(name=spec.name, data_type=_config_type(spec.datatype), dims=_dims(spec, batched))
        if batched:
            config.dynamic_batching.preferred_batch_size.extend(signature.preferred_batch_sizes)
            config.dynamic_batching.max_queue_delay_microseconds = signature.max_queue_delay_us
        for key, value in signature.parameters:
            config.parameters[key].string_value = value
        return repo_pb.ModelConfigResponse(config=config)

    def RepositoryIndex(
        self, request: repo_pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> repo_pb.RepositoryIndexResponse:
        """Every version of every model: READY or UNAVAILABLE; the default version's reason says so."""
        response = repo_pb.RepositoryIndexResponse()
        for name in sorted(self.backend.model_names()):
            versions = self.backend.model_metadata(name, "").versions
            for version in versions:
                ready = bool(self.backend.model_ready(name, version))
                if request.ready and not ready:
                    continue
                response.models.add(
                    name=name,
                    version=version,
                    state="READY" if ready else "UNAVAILABLE",
                    reason="default" if version == versions[-1] else "",
                )
        return response

    def ModelStatistics(
        self, request: repo_pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> repo_pb.ModelStatisticsResponse:
        """Executions and request counts per model version. Errors: NOT_FOUND (unknown model or version)."""
        if request.name:
            version, signature = self._resolve("name", request.name, request.version)
            wanted = [(request.name, v) for v in ((version,) if request.version else signature.versions)]
        else:
            wanted = [
                (n, v) for n in sorted(self.backend.model_names()) for v in self.backend.model_metadata(n, "").versions
            ]
        response = repo_pb.ModelStatisticsResponse()
        for name, version in wanted:
            executed = self.backend.statistics(name, version)
            with self._stats_lock:
                asked = self._stats.get((name, version), _RequestStats())
                success, success_ns, fail, fail_ns = asked.success, asked.success_ns, asked.fail, asked.fail_ns
            entry = response.model_stats.add(
                name=name,
                version=version,
                last_inference=executed.last_inference_ms,
                inference_count=executed.inference_count,
                execution_count=executed.execution_count,
            )
            entry.inference_stats.success.count, entry.inference_stats.success.ns = success, success_ns
            entry.inference_stats.fail.count, entry.inference_stats.fail.ns = fail, fail_ns
            for size, count in executed.batch_sizes:
                entry.batch_stats.add(batch_size=size).compute_infer.count = count
        return response

    def _resolve(self, field: str, name: str, version: str) -> tuple[str, ModelSignature]:
        """Check the model and version exist; return the concrete version and its signature."""
        if not name:
            raise InvalidArgument(field, "required: the name of a served model")
        served = list(self.backend.model_names())
        if name not in served:
            raise NotFound(f"model '{name}': unknown (served: {', '.join(sorted(served)) or 'none'})")
        signature = self.backend.model_metadata(name, "")
        if not version:
            version = signature.versions[-1] if signature.versions else ""
        elif version not in signature.versions:
            known = ", ".join(signature.versions) or "none"
            raise NotFound(f"model '{name}' version '{version}': unknown (versions: {known})")
        if signature.versions and version != signature.versions[-1]:
            signature = self.backend.model_metadata(name, version)
        return version, signature

    def _decode_inputs(
        self, request: pb.ModelInferRequest, signature: ModelSignature, raw: bool
    ) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in signature.inputs}
        if raw and len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument(
                "raw_input_contents",
                f"has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs; "
                "send one per input, in the order of inputs",
            )
        decoded: dict[str, np.ndarray] = {}
        for index, tensor in enumerate(request.inputs):
            where = f"input '{tensor.name}'"
            spec = specs.get(tensor.name)
            if spec is None:
                raise InvalidArgument(
                    where, f"not an input of model '{signature.name}' (inputs: {', '.join(specs) or 'none'})"
                )
            if tensor.name in decoded:
                raise InvalidArgument(where, "given more than once")
            _check_parameters(where, tensor.parameters)
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(where, f"datatype '{tensor.datatype}' but the model takes {spec.datatype}")
            if spec.datatype not in DATATYPES:
                raise InvalidArgument(where, f"datatype {spec.datatype} is not supported by this server")
            shape = tuple(tensor.shape)
            if any(d < 0 for d in shape):
                raise InvalidArgument(where, f"shape {_shape_text(shape)} has a negative dimension")
            if len(shape) != len(spec.shape) or any(w not in (-1, d) for w, d in zip(spec.shape, shape, strict=True)):
                columns = dict(signature.parameters).get("feature_names")
                raise InvalidArgument(
                    where,
                    f"shape {_shape_text(shape)} does not match the model's {_shape_text(spec.shape)}"
                    + (f" (columns: feature_names {columns})" if columns else ""),
                )
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidArgument(where, "carries contents while the request uses raw_input_contents")
                decoded[tensor.name] = decode_raw(
                    where, spec.datatype, shape, request.raw_input_contents[index], f"raw_input_contents[{index}]"
                )
            else:
                decoded[tensor.name] = decode_typed(where, spec.datatype, shape, tensor.contents)
        missing = [s.name for s in signature.inputs if s.name not in decoded]
        if missing:
            raise InvalidArgument("inputs", f"missing input(s) of model '{signature.name}': {', '.join(missing)}")
        return decoded

    def _requested_outputs(self, request: pb.ModelInferRequest, signature: ModelSignature) -> list[TensorSpec]:
        specs = {s.name: s for s in signature.outputs}
        if not request.outputs:
            return list(signature.outputs)
        wanted: list[TensorSpec] = []
        for requested in request.outputs:
            where = f"output '{requested.name}'"
            spec = specs.get(requested.name)
            if spec is None:
                raise InvalidArgument(
                    where, f"not an output of model '{signature.name}' (outputs: {', '.join(specs) or 'none'})"
                )
            if spec in wanted:
                raise InvalidArgument(where, "requested more than once")
            _check_parameters(where, requested.parameters)
            wanted.append(spec)
        return wanted

    @staticmethod
    def _conform_output(model: str, spec: TensorSpec, value: np.ndarray) -> np.ndarray:
        """The backend's array in the signature's datatype (a backend bug raises, reported as UNKNOWN)."""
        array = np.asarray(value)
        if spec.datatype == "BYTES":
            return array.astype(object, copy=False)
        if spec.datatype not in _RAW_DTYPES:
            raise RuntimeError(f"model '{model}' output '{spec.name}': datatype {spec.datatype} is not supported")
        target = _RAW_DTYPES[spec.datatype].newbyteorder("=")
        if array.dtype != target:
            try:
                array = array.astype(target, casting="same_kind")
            except TypeError as exc:
                raise RuntimeError(
                    f"model '{model}' output '{spec.name}': numpy {array.dtype} cannot become {spec.datatype}"
                ) from exc
        return array


class AsyncOpenInferenceServicer(OpenInferenceServicer):
    """:class:`OpenInferenceServicer` with ModelInfer as ``async def``, for a grpc.aio server: the request is
    decoded and the response encoded on the event loop; a backend with ``async def infer_async`` is awaited on
    the loop, otherwise its ``infer`` (which waits for the model) runs on ``executor``; either way the loop
    goes on taking calls up meanwhile."""

    def __init__(self, backend: InferenceBackend, executor: Executor, **options: Any) -> None:
        super().__init__(backend, **options)
        self.executor = executor

    async def ModelInfer(  # type: ignore[override]
        self, request: pb.ModelInferRequest, context: object
    ) -> pb.ModelInferResponse:
        """As :meth:`OpenInferenceServicer.ModelInfer`."""
        name = request.model_name
        version, signature = self._resolve("model_name", name, request.model_version)
        with self._counted(name, version):
            inputs, wanted, raw = self._decode(request, name, version, signature)
            infer_async = getattr(self.backend, "infer_async", None)
            if infer_async is not None:  # the backend waits on the loop itself (the scorer: its gathering)
                results = await infer_async(name, version, inputs, request.id)
            else:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.backend.infer, name, version, inputs, request.id
                )
            return self._encode(request, name, version, wanted, raw, results)
