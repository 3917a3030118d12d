"""The scorer's Open Inference Protocol API: tritonclient[grpc] against a real server running a PyTorch model.

tritonclient ships its own generated copy of the ``inference`` protos and registers the same symbols
(``inference.ServerLiveRequest``, ...) in protobuf's process-wide descriptor pool as ours, so the two cannot
be imported into one process (the well-known "duplicate symbol 'inference.ServerLiveRequest'", see
kserve/kserve#3099). The server and our stubs live in the test process; tritonclient runs in a child
Python process that executes a list of calls and answers in JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardmesh.runtime import RunningService, ServiceDefinition, start_service
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.scorer.oip import (
    SERVICE_NAME,
    ExecutionStats,
    ModelSignature,
    OpenInferenceServicer,
    TensorSpec,
    decode_raw,
    decode_typed,
    encode_raw,
    encode_typed,
)

from .conftest import make_config

MODEL = "linear"
SIGNATURE = ModelSignature(
    name=MODEL,
    versions=("1", "2"),
    platform="pytorch_eager",
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 2)), TensorSpec("probabilities", "FP32", (-1, 2))),
)


def _linear(scale: float) -> torch.nn.Module:
    layer = torch.nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0], [-0.75, 0.3, 1.5, -0.2]]) * scale)
        layer.bias.copy_(torch.tensor([0.1, -0.2]) * scale)
    return layer.eval()


class TorchBackend:
    """Two versions of a real torch.nn.Linear(4, 2) on the CPU; version 2 (the default) has doubled weights."""

    def __init__(self) -> None:
        self.modules = {"1": _linear(1.0), "2": _linear(2.0)}
        self.ready = True
        self.calls: list[tuple[str, str]] = []

    def server_ready(self) -> bool:
        return self.ready

    def model_names(self) -> list[str]:
        return [MODEL]

    def model_ready(self, name: str, version: str) -> bool:
        return self.ready

    def model_metadata(self, name: str, version: str) -> ModelSignature:
        return SIGNATURE

    def infer(self, name: str, version: str, inputs: dict[str, np.ndarray], request_id: str) -> dict[str, np.ndarray]:
        self.calls.append((name, version))
        x = torch.from_numpy(np.array(inputs["input"]))  # a copy: arrays from the request are read-only
        with torch.no_grad():
            logits = self.modules[version](x)
        return {"logits": logits.numpy(), "probabilities": torch.softmax(logits, dim=-1).numpy()}

    def statistics(self, name: str, version: str) -> ExecutionStats:
        runs = sum(1 for call in self.calls if call == (name, version))
        return ExecutionStats(execution_count=runs)


def forward(backend: TorchBackend, version: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """torch's own forward pass: the reference the served answers are compared with."""
    with torch.no_grad():
        logits = backend.modules[version](torch.tensor(x))
    return {"logits": logits.numpy(), "probabilities": torch.softmax(logits, dim=-1).numpy()}


class OipBinding:
    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceServicer(self.backend), server)

    def start(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend()


@pytest.fixture(scope="module")
def oip_service(backend: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    config = make_config(tmp_path_factory.mktemp("oip"))
    definition = ServiceDefinition("oip-test", (SERVICE_NAME,), lambda cfg: OipBinding(backend))
    running = start_service(definition, config, port=0)
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def stub(oip_service: RunningService) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(oip_service.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# -- tritonclient, in a child process ----------------------------------------------------------------------

TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

def tensors(items):
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

def plain(array):
    if array.dtype == object:  # BYTES
        return [item.decode() for item in array.reshape(-1)]
    return array.tolist()

def call(client, op):
    kind = op["call"]
    if kind in ("is_server_live", "is_server_ready"):
        return getattr(client, kind)()
    if kind == "is_model_ready":
        return client.is_model_ready(op["model"], op.get("version", ""))
    if kind == "get_server_metadata":
        m = client.get_server_metadata()
        return {"name": m.name, "version": m.version, "extensions": list(m.extensions)}
    if kind == "get_model_metadata":
        m = client.get_model_metadata(op["model"], op.get("version", ""))
        return {"name": m.name, "versions": list(m.versions), "platform": m.platform,
                "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)}
    if kind == "get_model_config":
        c = client.get_model_config(op["model"], op.get("version", "")).config
        return {"name": c.name, "platform": c.platform, "max_batch_size": c.max_batch_size,
                "inputs": [{"name": t.name, "data_type": t.data_type, "dims": list(t.dims)} for t in c.input],
                "outputs": [{"name": t.name, "data_type": t.data_type, "dims": list(t.dims)} for t in c.output],
                "preferred_batch_size": list(c.dynamic_batching.preferred_batch_size),
                "parameters": {k: v.string_value for k, v in c.parameters.items()}}
    if kind == "get_model_repository_index":
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                for m in client.get_model_repository_index().models]
    if kind == "get_inference_statistics":
        stats = client.get_inference_statistics(op.get("model", ""), op.get("version", "")).model_stats
        return [{"name": m.name, "version": m.version, "inference_count": m.inference_count,
                 "execution_count": m.execution_count, "success": m.inference_stats.success.count,
                 "fail": m.inference_stats.fail.count, "last_inference": m.last_inference,
                 "batch_stats": {b.batch_size: b.compute_infer.count for b in m.batch_stats}} for m in stats]
    if kind == "infer":
        inputs = []
        for spec in op["inputs"]:
            data = np.asarray(spec["data"], dtype=triton_to_np_dtype(spec["datatype"]))
            tensor = grpcclient.InferInput(spec["name"], list(data.shape), spec["datatype"])
            tensor.set_data_from_numpy(data)  # raw_input_contents
            if "declared_shape" in spec:
                tensor.set_shape(spec["declared_shape"])
            inputs.append(tensor)
        outputs = None
        if op.get("outputs") is not None:
            outputs = [grpcclient.InferRequestedOutput(name) for name in op["outputs"]]
        result = client.infer(op["model"], inputs, model_version=op.get("version", ""), outputs=outputs,
                               request_id=op.get("id", ""))
        response = result.get_response()
        return {
            "model_version": response.model_version,
            "id": response.id,
            "raw_count": len(response.raw_output_contents),
            "outputs": {o.name: {"datatype": o.datatype, "shape": list(o.shape),
                                 "data": plain(result.as_numpy(o.name))} for o in response.outputs},
            "order": [o.name for o in response.outputs],
        }
    raise ValueError(kind)

request = json.load(sys.stdin)
client = grpcclient.InferenceServerClient(url=request["url"])
answers = []
for op in request["ops"]:
    try:
        answers.append({"ok": call(client, op)})
    except InferenceServerException as exc:
        answers.append({"error": {"status": exc.status(), "message": exc.message()}})
client.close()
json.dump(answers, sys.stdout)
"""


def triton(address: str, *ops: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``ops`` (tritonclient calls) in a child process against ``address``; one answer per op."""
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT],
        input=json.dumps({"url": address, "ops": list(ops)}),
        capture_output=True,
        text=True,
        timeout=180,  # a child that imports tritonclient on a loaded machine
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


def infer_op(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    spec = {"name": "input", "datatype": "FP32", "data": x.tolist()}
    spec.update(extra.pop("input", {}))
    return {"call": "infer", "model": MODEL, "inputs": [spec], **extra}


def batch(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


# -- tests ------------------------------------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(oip_service: RunningService) -> None:
    live, ready, model_ready, v1_ready, server, meta = triton(
        oip_service.address,
        {"call": "is_server_live"},
        {"call": "is_server_ready"},
        {"call": "is_model_ready", "model": MODEL},
        {"call": "is_model_ready", "model": MODEL, "version": "1"},
        {"call": "get_server_metadata"},
        {"call": "get_model_metadata", "model": MODEL},
    )
    assert live == {"ok": True} and ready == {"ok": True}
    assert model_ready == {"ok": True} and v1_ready == {"ok": True}
    assert server["ok"]["name"] == "guardmesh-scorer" and server["ok"]["version"]
    assert meta["ok"] == {
        "name": MODEL,
        "versions": ["1", "2"],
        "platform": "pytorch_eager",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
    }
    with grpc.insecure_channel(oip_service.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for name in ("oip-test", SERVICE_NAME):
            assert check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def test_tritonclient_infer_matches_torch_forward(oip_service: RunningService, backend: TorchBackend) -> None:
    x3, x5 = batch(3, seed=1), batch(5, seed=2)
    default, v1, subset = triton(
        oip_service.address,
        infer_op(x3, id="req-7"),
        infer_op(x5, version="1"),
        infer_op(x5, outputs=["probabilities"]),
    )
    # No version: the default (newest) version answers; every output in the signature's order, raw.
    answer = default["ok"]
    assert answer["model_version"] == "2" and answer["id"] == "req-7"
    assert answer["order"] == ["logits", "probabilities"] and answer["raw_count"] == 2
    expected = forward(backend, "2", x3)
    for name, want in expected.items():
        got = answer["outputs"][name]
        assert got["datatype"] == "FP32" and got["shape"] == [3, 2]
        np.testing.assert_allclose(np.asarray(got["data"], np.float32), want, rtol=0, atol=1e-6)
    answer = v1["ok"]
    assert answer["model_version"] == "1"
    np.testing.assert_allclose(
        np.asarray(answer["outputs"]["logits"]["data"], np.float32), forward(backend, "1", x5)["logits"], atol=1e-6
    )
    # A requested subset: only that output comes back.
    answer = subset["ok"]
    assert answer["order"] == ["probabilities"] and answer["raw_count"] == 1
    np.testing.assert_allclose(
        np.asarray(answer["outputs"]["probabilities"]["data"], np.float32),
        forward(backend, "2", x5)["probabilities"],
        atol=1e-6,
    )


def test_tritonclient_bad_requests(oip_service: RunningService) -> None:
    x = batch(2)
    answers = triton(
        oip_service.address,
        infer_op(x, input={"declared_shape": [3, 4]}),  # 32 bytes of data for a declared 3 x 4
        infer_op(batch(2)[:, :3]),  # 2 x 3: not the model's [-1, 4]
        infer_op(x, input={"datatype": "FP64"}),
        infer_op(x, outputs=["embedding"]),
        {"call": "infer", "model": "nope", "inputs": [{"name": "input", "datatype": "FP32", "data": x.tolist()}]},
        infer_op(x, version="9"),
        {"call": "is_model_ready", "model": "nope"},
        {"call": "get_model_metadata", "model": "nope"},
    )
    status = [a["error"]["status"] for a in answers]
    messages = [a["error"]["message"] for a in answers]
    assert status[:4] == ["StatusCode.INVALID_ARGUMENT"] * 4
    assert status[4:] == ["StatusCode.NOT_FOUND"] * 4
    assert messages[0] == "input 'input': shape [3, 4] of FP32 needs 48 bytes, raw_input_contents[0] has 32"
    assert messages[1] == "input 'input': shape [2, 3] does not match the model's [-1, 4]"
    assert messages[2] == "input 'input': datatype 'FP64' but the model takes FP32"
    assert messages[3].startswith("output 'embedding': not an output of model 'linear'")
    assert messages[4] == "model 'nope': unknown (served: linear)"
    assert messages[5] == "model 'linear' version '9': unknown (versions: 1, 2)"


def test_typed_contents_request_by_hand(stub: pb_grpc.GRPCInferenceServiceStub, backend: TorchBackend) -> None:
    x = batch(4, seed=3)
    request = pb.ModelInferRequest(
        model_name=MODEL,
        model_version="1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[4, 4], contents=pb.InferTensorContents(fp32_contents=x.ravel())
            )
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
    )
    response = stub.ModelInfer(request, timeout=10)
    # A typed request is answered typed.
    assert len(response.raw_output_contents) == 0 and response.model_version == "1"
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [4, 2])
    got = np.asarray(out.contents.fp32_contents, np.float32).reshape(4, 2)
    np.testing.assert_allclose(got, forward(backend, "1", x)["logits"], rtol=0, atol=1e-6)

    # Raw by hand: answered raw, and identical to the typed answer.
    raw = pb.ModelInferRequest(model_name=MODEL, model_version="1", outputs=request.outputs)
    raw.inputs.add(name="input", datatype="FP32", shape=[4, 4])
    raw.raw_input_contents.append(x.astype("<f4").tobytes())
    raw_response = stub.ModelInfer(raw, timeout=10)
    np.testing.assert_array_equal(
        np.frombuffer(raw_response.raw_output_contents[0], "<f4").reshape(4, 2), got.astype(np.float32)
    )


def test_typed_and_raw_malformed_by_hand(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    def expect_invalid(request: pb.ModelInferRequest, message: str) -> None:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == message

    def request(**contents: Any) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="input", datatype="FP32", shape=[2, 4], contents=pb.InferTensorContents(**contents))
        return req

    expect_invalid(
        request(fp32_contents=[0.0] * 7), "input 'input': shape [2, 4] needs 8 elements, contents.fp32_contents has 7"
    )
    expect_invalid(
        request(int64_contents=[0] * 8),
        "input 'input': contents.int64_contents is set but datatype FP32 travels in contents.fp32_contents",
    )
    both = request(fp32_contents=[0.0] * 8)
    both.raw_input_contents.append(b"\0" * 32)
    expect_invalid(both, "input 'input': carries contents while the request uses raw_input_contents")
    missing = pb.ModelInferRequest(model_name=MODEL)
    expect_invalid(missing, "inputs: missing input(s) of model 'linear': input")
    extra_raw = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"", b""])
    extra_raw.inputs.add(name="input", datatype="FP32", shape=[0, 4])
    expect_invalid(
        extra_raw, "raw_input_contents: has 2 entries for 1 inputs; send one per input, in the order of inputs"
    )
    shm = request(fp32_contents=[0.0] * 8)
    shm.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    expect_invalid(shm, "input 'input': parameter 'shared_memory_region': the shared-memory extension is not supported")


def test_model_not_ready_is_unavailable(stub: pb_grpc.GRPCInferenceServiceStub, backend: TorchBackend) -> None:
    backend.ready = False
    try:
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready is False
        req = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[batch(1).tobytes()])
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "model 'linear' version '2': not ready"
    finally:
        backend.ready = True


# -- the codec, directly --------------------------------------------------------------------------------

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_codec_round_trips_every_datatype(datatype: str) -> None:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        array = np.array([b"a", b"", b"\x00xyz", b"guard", b"mesh", b"!"], dtype=object).reshape(2, 3)
    elif datatype == "BOOL":
        array = rng.integers(0, 2, size=(2, 3)).astype(bool)
    elif datatype.startswith(("INT", "UINT")):
        info = np.iinfo(NUMERIC[datatype])
        array = np.array([[info.min, info.max, 0], [1, 2, 3]], dtype=NUMERIC[datatype])
    else:
        array = rng.normal(size=(2, 3)).astype(NUMERIC[datatype])
    raw = encode_raw(datatype, array)
    back = decode_raw("input 'x'", datatype, (2, 3), raw, "raw_input_contents[0]")
    assert back.shape == (2, 3) and back.tolist() == array.tolist()
    if datatype != "BYTES":
        assert raw == array.astype(np.dtype(NUMERIC[datatype]).newbyteorder("<")).tobytes()  # little-endian
    if datatype == "FP16":
        with pytest.raises(Exception, match="no typed contents field"):
            decode_typed("input 'x'", datatype, (2, 3), pb.InferTensorContents())
        return
    contents = pb.InferTensorContents()
    encode_typed(datatype, array, contents)
    back = decode_typed("input 'x'", datatype, (2, 3), contents)
    assert back.tolist() == array.tolist()


def test_typed_narrow_integers_are_range_checked() -> None:
    with pytest.raises(Exception, match="outside the range of INT8"):
        decode_typed("input 'x'", "INT8", (2,), pb.InferTensorContents(int_contents=[1, 300]))
