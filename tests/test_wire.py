"""``guardmesh.wire`` against upb, the protobuf runtime: same bytes, same messages, in both directions.

The codec decodes the parameter server's tensor-carrying messages without copying their bytes fields and
frames tensors into messages with one copy; a contract client (any protobuf runtime) must see no
difference. Every property here compares with upb on the same bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardmesh import wire
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk.paramserver import ParamServerClient, sgd, sync
from guardmesh.tensors import decode as decode_tensor
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb

from .conftest import make_config

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
TEXT = st.text(max_size=20)
DIMS = st.lists(st.integers(0, (1 << 63) - 1), max_size=4)
DTYPES = st.sampled_from([0, 1, 2, 3, 99])  # open enums: unknown numbers survive

F32 = common_pb2.D_TYPE_FLOAT32


@st.composite
def tensors(draw: st.DrawFn) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=draw(DTYPES), shape=draw(DIMS), data=draw(st.binary(max_size=64)))


@st.composite
def named(draw: st.DrawFn) -> pb.NamedTensor:
    nt = pb.NamedTensor(name=draw(TEXT))
    if draw(st.booleans()):
        nt.tensor.CopyFrom(draw(tensors()))
    return nt


@st.composite
def push_requests(draw: st.DrawFn) -> pb.PushRequest:
    return pb.PushRequest(
        model=draw(TEXT),
        worker_id=draw(TEXT),
        base_version=draw(INT64),
        step_id=draw(INT64),
        gradients=draw(st.lists(named(), max_size=3)),
        incarnation=draw(TEXT),
    )


@st.composite
def pull_responses(draw: st.DrawFn) -> pb.PullResponse:
    return pb.PullResponse(version=draw(INT64), incarnation=draw(TEXT), tensors=draw(st.lists(named(), max_size=3)))


@st.composite
def stream_parts(draw: st.DrawFn) -> pb.PushStreamRequest:
    msg = pb.PushStreamRequest()
    if draw(st.booleans()):
        h = msg.header
        h.model, h.version, h.incarnation = draw(TEXT), draw(INT64), draw(TEXT)
        h.worker_id, h.step_id = draw(TEXT), draw(INT64)
        for _ in range(draw(st.integers(0, 3))):
            h.tensors.add(name=draw(TEXT), dtype=draw(DTYPES), shape=draw(DIMS))
    elif draw(st.booleans()):
        msg.chunk.tensor, msg.chunk.offset, msg.chunk.data = draw(INT32), draw(INT64), draw(st.binary(max_size=64))
    return msg


def roundtrip(msg: Message) -> Message:
    """upb's bytes, decoded by the codec, back into a upb message."""
    return wire.decode(msg.DESCRIPTOR, msg.SerializeToString()).to_message(type(msg))


@settings(max_examples=300, deadline=None)
@given(push_requests())
def test_push_requests_decode_as_upb_encodes_them(msg: pb.PushRequest) -> None:
    assert roundtrip(msg) == msg


@settings(max_examples=300, deadline=None)
@given(pull_responses())
def test_pull_responses_decode_as_upb_encodes_them(msg: pb.PullResponse) -> None:
    assert roundtrip(msg) == msg


@settings(max_examples=300, deadline=None)
@given(stream_parts())
def test_stream_messages_decode_with_their_oneof(msg: pb.PushStreamRequest) -> None:
    decoded = wire.decode(msg.DESCRIPTOR, msg.SerializeToString())
    assert decoded.WhichOneof("part") == msg.WhichOneof("part")
    assert decoded.to_message(pb.PushStreamRequest) == msg
    as_pull = pb.PullStreamResponse.FromString(msg.SerializeToString())  # same layout, other message
    assert roundtrip(as_pull) == as_pull


def test_bytes_fields_are_views_of_the_received_buffer_not_copies() -> None:
    payload = np.arange(1 << 16, dtype=np.float32)
    data = pb.PushRequest(
        gradients=[pb.NamedTensor(name="w", tensor=common_pb2.Tensor(dtype=F32, data=payload.tobytes()))]
    ).SerializeToString()
    got = wire.decode(pb.PushRequest.DESCRIPTOR, data).gradients[0].tensor.data
    assert isinstance(got, memoryview) and got.obj is data
    np.testing.assert_array_equal(np.frombuffer(got, np.float32), payload)


def test_absent_fields_read_as_protobuf_defaults() -> None:
    m = wire.decode(pb.PushStreamRequest.DESCRIPTOR, b"")
    assert m.WhichOneof("part") is None and not m.HasField("header")
    assert m.header.tensors == [] and m.header.model == "" and m.header.version == 0 and m.chunk.data == b""
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = m.nope
    with pytest.raises(ValueError, match="no oneof"):
        m.WhichOneof("nope")


# -- encodings other writers may produce ---------------------------------------------------------------------


def key(number: int, wire_type: int) -> bytes:
    return wire.varint(number << 3 | wire_type)


def ld(number: int, body: bytes) -> bytes:
    return key(number, 2) + wire.varint(len(body)) + body


def test_non_canonical_encodings_decode_as_upb_reads_them() -> None:
    unpacked_shape = key(2, 0) + wire.varint(3) + key(2, 0) + wire.varint(5)  # repeated int64 not packed
    tensor_a = ld(3, b"abcd") + unpacked_shape  # data before dtype and shape
    tensor_b = key(1, 0) + wire.varint(1)  # a second occurrence of `tensor` merges into the first
    unknown = (
        key(99, 0) + wire.varint(7)
        + key(98, 1) + bytes(8)
        + key(97, 5) + bytes(4)
        + ld(96, b"zz")
        + key(95, 3) + key(1, 0) + wire.varint(1) + key(95, 4)  # a group, skipped whole
    )  # fmt: skip
    grad = ld(2, tensor_a) + unknown + ld(1, b"w") + ld(2, tensor_b)
    data = (
        key(4, 0) + wire.varint(9)
        + ld(5, grad)
        + key(3, 0) + wire.varint((1 << 64) - 2)  # base_version -2, two's complement
        + ld(1, b"first") + ld(1, b"model")  # a singular field given twice: the last wins
        + key(2, 5) + bytes(4)  # worker_id with a wrong wire type: an unknown field, as upb reads it
    )  # fmt: skip
    ref = pb.PushRequest.FromString(data)
    ref.DiscardUnknownFields()  # upb keeps them to re-serialize; the codec skips them
    assert ref.base_version == -2 and ref.model == "model" and list(ref.gradients[0].tensor.shape) == [3, 5]
    assert wire.decode(pb.PushRequest.DESCRIPTOR, data).to_message(pb.PushRequest) == ref


def test_the_last_oneof_member_wins_as_in_upb() -> None:
    data = pb.PullStreamResponse(header=pb.StreamHeader(model="m")).SerializeToString()
    data += pb.PullStreamResponse(chunk=pb.TensorChunk(tensor=1, data=b"x")).SerializeToString()
    decoded = wire.decode(pb.PullStreamResponse.DESCRIPTOR, data)
    assert decoded.WhichOneof("part") == "chunk" and not decoded.HasField("header")
    assert decoded.to_message(pb.PullStreamResponse) == pb.PullStreamResponse.FromString(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_arbitrary_bytes_are_accepted_or_refused_exactly_as_upb_does(data: bytes) -> None:
    try:
        ref: pb.PushRequest | None = pb.PushRequest.FromString(data)
        ref.DiscardUnknownFields()  # type: ignore[union-attr]
    except DecodeError:
        ref = None
    try:
        ours: Message | None = wire.decode(pb.PushRequest.DESCRIPTOR, data).to_message(pb.PushRequest)
    except wire.WireError:
        ours = None
    if ref is None:
        assert ours is None
    else:
        assert ours == ref


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(push_requests(), st.data())
def test_damaged_messages_are_accepted_or_refused_exactly_as_upb_does(msg: pb.PushRequest, draw: st.DataObject) -> None:
    data = bytearray(msg.SerializeToString())
    for _ in range(draw.draw(st.integers(1, 3))):
        if not data:
            break
        at = draw.draw(st.integers(0, len(data) - 1))
        action = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] = draw.draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw.draw(st.binary(min_size=1, max_size=3))
    test_arbitrary_bytes_are_accepted_or_refused_exactly_as_upb_does.hypothesis.inner_test(bytes(data))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "path", "rule"),
    [
        (key(3, 0) + b"\xff", "base_version", "truncated varint"),
        (key(3, 0) + b"\xff" * 10 + b"\x01", "base_version", "longer than 10 bytes"),
        (ld(5, ld(2, key(3, 2) + wire.varint(100))), "gradients.tensor.data", "past the end"),
        (ld(1, b"\xff\xfe"), "model", "valid UTF-8"),
        (key(0, 0) + b"\x00", "message", "field number 0"),
        (key(7, 6), "message", "invalid wire type"),
        (key(7, 3) + key(8, 4), "message", "group end"),
    ],
)
def test_malformed_bytes_name_the_field_and_the_rule(data: bytes, path: str, rule: str) -> None:
    with pytest.raises(DecodeError):
        pb.PushRequest.FromString(data)
    with pytest.raises(wire.WireError) as err:
        wire.decode(pb.PushRequest.DESCRIPTOR, data)
    assert err.value.path == path and rule in err.value.rule


def test_nesting_beyond_the_depth_limit_is_refused() -> None:
    body = b""
    for _ in range(wire.MAX_DEPTH + 5):  # unknown groups inside unknown groups
        body = key(9, 3) + body + key(9, 4)
    with pytest.raises(wire.WireError, match="nested deeper"):
        wire.decode(pb.PushRequest.DESCRIPTOR, body)


# -- framing -------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(max_size=300),
    tensors=st.lists(
        st.tuples(st.text(min_size=1, max_size=200), st.integers(0, 40_000), st.sampled_from([1, 2, 3])),
        max_size=4,
    ),
)
def test_framed_tensors_are_the_message_upb_reads_with_data_aligned(
    model: str, tensors: list[tuple[str, int, int]]
) -> None:
    head = pb.PushRequest(model=model, worker_id="w", base_version=3, step_id=4).SerializeToString()
    frames = wire.Frames(head)
    payloads = []
    for i, (name, n, dtype) in enumerate(tensors):
        payload = np.arange(n, dtype=np.float32) + i
        payloads.append(payload)
        frames.named_tensor(5, name, dtype, (n,), payload)
    data = frames.join()
    assert frames.size == len(data)
    ref = pb.PushRequest.FromString(data)
    assert (ref.model, ref.worker_id, ref.base_version, ref.step_id) == (model, "w", 3, 4)
    assert [(g.name, g.tensor.dtype, list(g.tensor.shape)) for g in ref.gradients] == [
        (name, dtype, [n]) for name, n, dtype in tensors
    ]
    decoded = wire.decode(pb.PushRequest.DESCRIPTOR, data)
    base = np.frombuffer(data, np.uint8).ctypes.data
    for g, payload in zip(decoded.gradients, payloads, strict=True):
        assert bytes(g.tensor.data) == payload.tobytes()
        if payload.size:
            offset = np.frombuffer(g.tensor.data, np.uint8).ctypes.data - base
            assert offset % wire.ALIGN == 0, offset  # usable in place by the kernels


def test_frames_settle_aligned_at_every_offset_and_varint_boundary() -> None:
    """Every start offset mod 64 against lengths around the 1- and 2-byte varint boundaries (a frame whose
    length sits on one flips its prefix size back and forth unless padded further)."""
    sizes = sorted({0, 4, 28, 96, 100, 112, 116, 120, 124, 128, 132, 16_376, 16_380, 16_384, 16_388})
    for start, size, name_len in itertools.product(range(64), sizes, (1, 2, 60, 125, 126, 127, 128)):
        payload = bytes(size)
        head, _ = wire.named_tensor(5, "n" * name_len, F32, (size // 4,), payload, start)
        assert size == 0 or (start + len(head)) % wire.ALIGN == 0
        parsed = pb.PushRequest.FromString(head + payload)
        assert parsed.gradients[0].name == "n" * name_len and len(parsed.gradients[0].tensor.data) == size
        chunk_head, _ = wire.tensor_chunk(2, name_len, start, payload)  # a chunk message starts at 0
        assert size == 0 or len(chunk_head) % wire.ALIGN == 0
        assert len(pb.PullStreamResponse.FromString(chunk_head + payload).chunk.data) == size
    # the case hypothesis found: the second frame's length prefix flipped between 1 and 2 bytes
    frames = wire.Frames(b"")
    frames.named_tensor(5, "0", F32, (1,), np.zeros(1, np.float32))
    frames.named_tensor(5, "0\U00010000", F32, (28,), np.zeros(28, np.float32))
    assert len(pb.PushRequest.FromString(frames.join()).gradients) == 2


@settings(max_examples=200, deadline=None)
@given(tensor=st.integers(0, 1 << 31 - 1), offset=st.integers(0, 1 << 40), data=st.binary(max_size=100))
def test_framed_chunks_are_the_message_upb_reads_with_data_aligned(tensor: int, offset: int, data: bytes) -> None:
    raw = b"".join(wire.tensor_chunk(2, tensor, offset, data))
    parsed = pb.PullStreamResponse.FromString(raw)
    assert not parsed.chunk.padding.strip(b"\0")  # zeros only: ignored by readers
    parsed.chunk.ClearField("padding")
    assert parsed == pb.PullStreamResponse(chunk=pb.TensorChunk(tensor=tensor, offset=offset, data=data))
    if data:
        view = wire.decode(pb.PullStreamResponse.DESCRIPTOR, raw).chunk.data
        offset_in_message = np.frombuffer(view, np.uint8).ctypes.data - np.frombuffer(raw, np.uint8).ctypes.data
        assert offset_in_message % wire.ALIGN == 0


def test_misaligned_float32_from_other_writers_is_copied_aligned() -> None:
    raw = b"\x00" + np.arange(8, dtype=np.float32).tobytes()
    values = decode_tensor(common_pb2.D_TYPE_FLOAT32, memoryview(raw)[1:])
    assert values.ctypes.data % 4 == 0
    np.testing.assert_array_equal(values, np.arange(8, dtype=np.float32))


# -- the parameter server over the wire ---------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningService]:
    running = start_service(
        load_definition("paramserver"), make_config(tmp_path, **{"services.paramserver.port": 0}), port=0
    )
    yield running
    running.stop(grace=0.5)


def test_malformed_push_bytes_get_invalid_argument_naming_the_field(server: RunningService) -> None:
    channel = grpc.insecure_channel(server.address)
    try:
        raw_push = channel.unary_unary("/guardmesh.v1.ParamServerService/Push")
        with pytest.raises(grpc.RpcError) as err:
            raw_push(ld(5, ld(2, key(3, 2) + wire.varint(100))), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gradients.tensor.data" in (err.value.details() or "")
        raw_stream = channel.stream_unary("/guardmesh.v1.ParamServerService/PushStream")
        with pytest.raises(grpc.RpcError) as err:
            raw_stream(iter([ld(1, ld(1, b"\xff"))]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header.model" in (err.value.details() or "")
    finally:
        channel.close()


def test_sdk_and_plain_protobuf_clients_meet_on_the_same_server(server: RunningService, tmp_path: Path) -> None:
    """A SYNC step where one worker is the SDK (wire codec) and the other a generated upb stub."""
    config = make_config(tmp_path)
    sdk = ParamServerClient.connect("mixed", config=config, addresses=[server.address], worker_id="sdk")
    channel = grpc.insecure_channel(server.address)
    try:
        from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc

        stub = pb_grpc.ParamServerServiceStub(channel)
        w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
        sdk.create({"w": w0}, sgd(0.5), sync(2))
        sdk.pull()
        g_sdk, g_upb = np.full((2, 3), 1.0, np.float32), np.full((2, 3), 3.0, np.float32)
        assert sdk.push({"w": g_sdk})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
        upb_push = pb.PushRequest(model="mixed", worker_id="upb", base_version=0, step_id=1)
        upb_push.gradients.add(name="w", tensor=common_pb2.Tensor(dtype=F32, shape=[2, 3], data=g_upb.tobytes()))
        assert stub.Push(upb_push).outcome == pb.PUSH_OUTCOME_APPLIED
        expected = w0 - 0.5 * (g_sdk + g_upb) / 2
        via_sdk = sdk.pull().tensors["w"]
        via_upb = stub.Pull(pb.PullRequest(model="mixed"))
        assert via_upb.version == 1 and list(via_upb.tensors[0].tensor.shape) == [2, 3]
        np.testing.assert_array_equal(via_sdk, expected)
        np.testing.assert_array_equal(np.frombuffer(via_upb.tensors[0].tensor.data, np.float32).reshape(2, 3), expected)
    finally:
        channel.close()
        sdk.close()
