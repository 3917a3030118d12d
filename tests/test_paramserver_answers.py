"""Answer buffers: a shard's float32 parameters kept inside the encoded answer that carries them.

The unit tests read every answer with upb (the reference protobuf parser), and check the one rule that makes
writing into a ``bytes`` object safe: no byte of an answer changes after it was handed out, because the
parameters move to a fresh buffer while anything still holds the old one. The gRPC tests check that a real
server's answers follow every push, stay right in SYNC (several workers answered the same version, some
from the buffer, the others framed), after a restore, and for a subset of the tensors (framed).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import unknown_fields

from guardmesh.config import MeshConfig
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk.paramserver import asynchronous, sgd, sync
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc
from native.buffers import MessageBuffer
from services.paramserver.frames import HEAD_BYTES, AnswerBuffer
from services.paramserver.shard import ModelShard

from .conftest import ps_client as client
from .conftest import ps_config

F32 = common_pb2.D_TYPE_FLOAT32
TENSORS = [("w", (2, 3), 6), ("bias", (3,), 3), ("embedding.weight", (5, 4), 20)]


def filled(buffer: AnswerBuffer, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values written into the buffer's parameters; returns copies of them."""
    rng = np.random.default_rng(seed)
    for values in buffer.arrays.values():
        values[:] = rng.standard_normal(values.size, dtype=np.float32)
    return {n: v.copy() for n, v in buffer.arrays.items()}


def tensors_of(answer: pb.PullResponse | pb.PushPullResponse) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(t.tensor.data, np.float32) for t in answer.tensors}


def test_message_buffer_is_shared_while_anything_holds_its_bytes() -> None:
    buf = MessageBuffer(64)
    assert not buf.shared and buf.data == bytes(64)
    view = np.frombuffer(buf, np.float32, 4, 16)  # a writable view holds the buffer, not its bytes
    view[:] = 1.5
    assert not buf.shared and buf.data[16:32] == np.full(4, 1.5, np.float32).tobytes()
    held = [buf.data]
    assert buf.shared
    held.clear()
    assert not buf.shared


@pytest.mark.parametrize("number, message", [(3, pb.PullResponse), (4, pb.PushPullResponse)])
def test_an_answer_is_the_buffer_and_reads_back_with_upb(number: int, message: type) -> None:
    buffer = AnswerBuffer(TENSORS)
    expected = filled(buffer)
    if message is pb.PullResponse:
        head = pb.PullResponse(version=7, incarnation="abc")
    else:
        result = pb.PushResponse(outcome=pb.PUSH_OUTCOME_APPLIED, version=7, staleness=2, lr_scale=0.5)
        head = pb.PushPullResponse(result=result, version=7, incarnation="abc")
    raw = buffer.answer(number, head.SerializeToString())
    assert raw is buffer.buffer.data  # the stored bytes themselves, not a copy
    got = message.FromString(raw)
    expected_head = message()
    expected_head.CopyFrom(head)
    got_head = message()
    got_head.CopyFrom(got)
    del got_head.tensors[:]
    got_head.ClearField("padding")
    assert got_head == expected_head
    assert [(t.name, list(t.tensor.shape), t.tensor.dtype) for t in got.tensors] == [
        (n, list(s), F32) for n, s, _ in TENSORS
    ]
    for name, values in tensors_of(got).items():
        np.testing.assert_array_equal(values, expected[name])
    for name, values in buffer.arrays.items():  # the data sits aligned where the parameter is stored
        offset = values.ctypes.data - np.frombuffer(memoryview(buffer.buffer), np.uint8).ctypes.data
        assert offset % 16 == 0 and raw[offset : offset + values.nbytes] == values.tobytes(), name


def test_parameters_move_before_a_write_while_an_answer_is_held_and_the_answer_never_changes() -> None:
    buffer = AnswerBuffer(TENSORS)
    before = filled(buffer, seed=1)
    answer = buffer.answer(3, pb.PullResponse(version=1).SerializeToString())
    assert answer is not None
    snapshot = bytes(answer)  # what the receiver must see, whatever happens to the parameters later
    assert buffer.answer(3, pb.PullResponse(version=2).SerializeToString()) is None  # still held: no rewrite
    assert buffer.writable() and buffer.moves == 1  # held: the parameters move (one copy) ...
    for name, values in buffer.arrays.items():
        np.testing.assert_array_equal(values, before[name])  # ... with their values
        values += 1.0
    assert answer == snapshot  # writing the moved parameters left the handed-out answer as it was
    assert not buffer.writable() and buffer.moves == 1  # the new buffer is nobody else's: written in place
    del answer
    fresh = buffer.answer(3, pb.PullResponse(version=2).SerializeToString())
    assert fresh is not None
    for name, values in tensors_of(pb.PullResponse.FromString(fresh)).items():
        np.testing.assert_array_equal(values, before[name] + 1.0)


@pytest.mark.parametrize("number", [3, 4])
def test_every_head_length_that_fits_reads_back_with_upb(number: int) -> None:
    buffer = AnswerBuffer(TENSORS)
    expected = filled(buffer, seed=2)
    message = pb.PullResponse if number == 3 else pb.PushPullResponse
    for length in [0, *range(2, HEAD_BYTES + 1)]:  # one byte cannot hold a field
        text = "x" * (length - 2) if length > 2 else ""  # a tag, a one-byte length, the text
        head = message(incarnation=text, version=1 if length == 2 else 0).SerializeToString()
        assert len(head) == length
        raw = buffer.answer(number, head)
        if length == HEAD_BYTES - 1:  # one byte left: too little for a padding field
            assert raw is None
            continue
        assert raw is not None, length
        got = message.FromString(raw)
        assert got.incarnation == text and got.padding == bytes(len(got.padding)), length
        assert len(unknown_fields.UnknownFieldSet(got)) == 0, length
        assert [t.name for t in got.tensors] == [n for n, _, _ in TENSORS]
        for name, values in tensors_of(got).items():
            np.testing.assert_array_equal(values, expected[name])
        del raw, got


def test_a_shard_never_changes_an_answer_it_handed_out() -> None:
    """Answers held (as gRPC holds them) while pushes are applied (single-push path, the aggregate path with
    clipping, a SYNC step) and a checkpoint is restored: every held answer keeps its bytes, and a fresh one
    says the current parameters."""
    from services.paramserver.optimizer import OptimizerKind, OptimizerSettings
    from services.paramserver.shard import ConsistencySettings, Mode, TensorMeta

    def head(version: int) -> bytes:
        return pb.PullResponse(version=version, incarnation="inc").SerializeToString()

    for mode, clip, workers in ((Mode.ASYNC, 0.0, 1), (Mode.ASYNC, 0.5, 1), (Mode.SYNC, 0.0, 2)):
        tensors = {
            "w": (TensorMeta(F32, (4, 5)), np.arange(20, dtype=np.float32)),
            "b": (TensorMeta(F32, (5,)), np.ones(5, np.float32)),
        }
        shard = ModelShard(
            "m",
            tensors,
            OptimizerSettings(OptimizerKind.ADAM, 0.1, clip_norm=clip),
            ConsistencySettings(mode, workers=workers),
            0,
            "inc",
            answer_limit=1 << 20,
        )
        held: list[tuple[bytes, bytes]] = []
        for step in range(6):
            answer = shard.answer([], 3, head)
            held.append((answer, bytes(answer)))
            for w in range(workers):
                grads = {"w": np.full(20, 0.3 * (w + 1), np.float32), "b": np.full(5, -0.2, np.float32)}
                shard.push(f"w{w}", shard.version, step, grads)
            if step % 2:
                held.pop(0)  # some answers are released (sent), others still held
        assert all(answer == snapshot for answer, snapshot in held), mode
        assert shard.answers is not None and shard.answers.moves > 0
        assert shard.stats()["answer_buffer_moves"] == shard.answers.moves
        fresh = pb.PullResponse.FromString(shard.answer([], 3, head))
        assert fresh.version == shard.version == 6
        np.testing.assert_array_equal(tensors_of(fresh)["w"], shard.masters["w"])
        version, arrays, metadata = shard.checkpoint_payload()
        answer = shard.answer([], 3, head)
        snapshot = bytes(answer)
        shard.load_checkpoint(version, {k: np.full_like(v, 7.0) if k.startswith("param/") else v
                                        for k, v in arrays.items()}, metadata)  # fmt: skip
        assert answer == snapshot and (shard.masters["w"] == 7).all()


def test_an_answer_whose_fields_do_not_fit_is_refused_so_the_caller_frames_it() -> None:
    buffer = AnswerBuffer(TENSORS)
    assert buffer.answer(3, pb.PullResponse(incarnation="x" * HEAD_BYTES).SerializeToString()) is None
    exactly = pb.PullResponse(incarnation="x" * (HEAD_BYTES - 3)).SerializeToString()
    assert len(exactly) == HEAD_BYTES - 1  # one byte left: too little for a padding field
    assert buffer.answer(3, exactly) is None
    full = pb.PullResponse(incarnation="x" * (HEAD_BYTES - 2)).SerializeToString()
    assert len(full) == HEAD_BYTES  # no byte left: no padding needed
    got = buffer.answer(3, full)
    assert got is not None and pb.PullResponse.FromString(got).incarnation == "x" * (HEAD_BYTES - 2)


def test_a_shard_keeps_an_answer_buffer_only_for_float32_tensors_that_fit_one_answer() -> None:
    def shard(dtype: int, limit: int) -> ModelShard:
        from services.paramserver.optimizer import OptimizerKind, OptimizerSettings
        from services.paramserver.shard import ConsistencySettings, Mode, TensorMeta

        tensors = {"w": (TensorMeta(dtype, (4, 4)), np.arange(16, dtype=np.float32))}
        return ModelShard(
            "m",
            tensors,
            OptimizerSettings(OptimizerKind.SGD, 0.1),
            ConsistencySettings(Mode.ASYNC),
            0,
            "inc",
            answer_limit=limit,
        )

    kept = shard(F32, 1 << 20)
    assert kept.answers is not None
    np.testing.assert_array_equal(kept.masters["w"], np.arange(16))
    assert kept.masters["w"].ctypes.data == kept.answers.arrays["w"].ctypes.data
    assert shard(common_pb2.D_TYPE_FLOAT16, 1 << 20).answers is None  # converted on the way out: framed
    assert shard(F32, 64).answers is None  # larger than one answer: streamed, framed per chunk


def test_a_server_answers_its_buffer_and_the_values_follow_every_push(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    c = client(running, config)
    c.create({"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}, sgd(0.5), asynchronous())
    shard = running.binding.servicer.core.models["m"]  # type: ignore[attr-defined]
    assert shard.answers is not None
    expected_w, expected_b = np.arange(6.0).reshape(2, 3), np.ones(3)
    for step in range(1, 21):
        g = np.full((2, 3), float(step)), np.full(3, -1.0)
        _, pulled = c.push_pull({"w": g[0], "b": g[1]})
        expected_w, expected_b = expected_w - 0.5 * g[0], expected_b - 0.5 * g[1]
        assert pulled.versions == [step]
        np.testing.assert_allclose(pulled.tensors["w"], expected_w, rtol=1e-6)
        np.testing.assert_allclose(pulled.tensors["b"], expected_b, rtol=1e-6)
        assert c.pull().tensors["w"].tobytes() == pulled.tensors["w"].tobytes()
    stub = pb_grpc.ParamServerServiceStub(c.channels[0])
    subset = stub.Pull(pb.PullRequest(model="m", names=["b"]))  # a subset is framed (one copy), the same values
    assert [t.name for t in subset.tensors] == ["b"] and subset.version == 20
    np.testing.assert_allclose(tensors_of(subset)["b"], expected_b, rtol=1e-6)
    stats = stub.GetStats(pb.GetStatsRequest(model="m"))
    # 20 PushPull and 20 Pull answers of every tensor, one of a subset: the first answer found the bytes nobody's,
    # the subset was framed; the others went out in place unless gRPC still held the previous answer.
    assert stats.answers_in_place + stats.answers_copied == 41 and stats.answers_in_place >= 1
    assert stats.answers_copied >= 1 and stats.answer_buffer_moves == shard.answers.moves


def test_sync_workers_answered_the_same_version_all_get_it(ps: tuple[RunningService, MeshConfig]) -> None:
    running, config = ps
    workers = [client(running, config, f"w{i}") for i in range(3)]
    workers[0].create({"w": np.zeros(1000)}, sgd(1.0), sync(3))
    for c in workers:
        c.pull()
    for step in range(1, 6):
        answers: dict[int, np.ndarray] = {}

        def run(i: int, answers: dict[int, np.ndarray] = answers) -> None:
            _, pulled = workers[i].push_pull({"w": np.full(1000, float(i + 1))})
            answers[i] = pulled.tensors["w"].copy()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for i in range(3):  # one version, one set of values, however many of the answers were the buffer
            np.testing.assert_allclose(answers[i], np.full(1000, -2.0 * step), rtol=1e-6)


def test_a_restored_shard_answers_the_restored_parameters(tmp_path: Path) -> None:
    config = ps_config(tmp_path)
    running = start_service(load_definition("paramserver"), config, port=0)
    try:
        c = client(running, config)
        c.create({"w": np.zeros(64)}, sgd(1.0), asynchronous())
        for _ in range(4):
            c.push_pull({"w": np.full(64, 0.25)})
        assert pb_grpc.ParamServerServiceStub(c.channels[0]).Checkpoint(pb.CheckpointRequest(model="m")).version == 4
        c.close()
    finally:
        running.stop(grace=0.5)
    running = start_service(load_definition("paramserver"), config, port=0)
    try:
        c = client(running, config, "w1")  # another worker: w0's step ids 1-4 are in the restored window
        shard = running.binding.servicer.core.models["m"]  # type: ignore[attr-defined]
        assert shard.answers is not None and shard.version == 4
        pulled = c.pull()
        np.testing.assert_array_equal(pulled.tensors["w"], np.full(64, -1.0))
        results, after = c.push_pull({"w": np.full(64, 1.0)})
        assert results[0].outcome == pb.PUSH_OUTCOME_APPLIED
        np.testing.assert_array_equal(after.tensors["w"], np.full(64, -2.0))
    finally:
        running.stop(grace=0.5)
