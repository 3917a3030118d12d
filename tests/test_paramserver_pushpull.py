"""PushPull and PushPullStream over real gRPC: one round trip per training step, with Push's guarantees."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from guardmesh.config import MeshConfig
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk import train_loop
from guardmesh.sdk.paramserver import StalePush, _creation_stream, asynchronous, bounded_staleness, sgd, sync
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc

from .conftest import ps_client as client
from .conftest import ps_config

F32 = common_pb2.D_TYPE_FLOAT32


def test_push_pull_applies_the_push_and_answers_the_new_parameters(ps: tuple[RunningService, MeshConfig]) -> None:
    running, config = ps
    c = client(running, config)
    c.create({"w": np.ones((2, 3)), "b": np.zeros(3)}, sgd(0.5), bounded_staleness(0))
    c.pull()
    results, pulled = c.push_pull({"w": np.full((2, 3), 2.0), "b": np.ones(3)})
    assert [(r.outcome, r.version, r.staleness) for r in results] == [(pb.PUSH_OUTCOME_APPLIED, 1, 0)]
    assert pulled.versions == [1] and c.versions == [1]
    np.testing.assert_array_equal(pulled.tensors["w"], np.zeros((2, 3)))
    np.testing.assert_array_equal(pulled.tensors["b"], np.full(3, -0.5))
    # The answer's version is the base of the next push: with a bound of 0 it must not be stale.
    results, pulled = c.push_pull({"w": np.ones((2, 3)), "b": np.ones(3)})
    assert results[0].staleness == 0 and pulled.versions == [2]
    np.testing.assert_array_equal(pulled.tensors["b"], np.full(3, -1.0))


def test_a_plain_protobuf_client_reads_the_push_pull_answer(ps: tuple[RunningService, MeshConfig]) -> None:
    running, config = ps
    c = client(running, config)
    c.create({"w": np.arange(4.0)}, sgd(1.0), asynchronous())
    stub = pb_grpc.ParamServerServiceStub(c.channels[0])  # upb on both ends of this call
    g = np.full(4, 0.5, np.float32)
    request = pb.PushPullRequest(model="m", worker_id="upb", base_version=0, step_id=1)
    request.gradients.add(name="w", tensor=common_pb2.Tensor(dtype=F32, shape=[4], data=g.tobytes()))
    answer = stub.PushPull(request)
    assert answer.result.outcome == pb.PUSH_OUTCOME_APPLIED and answer.version == 1
    assert [(t.name, list(t.tensor.shape)) for t in answer.tensors] == [("w", [4])]
    np.testing.assert_array_equal(np.frombuffer(answer.tensors[0].tensor.data, np.float32), np.arange(4.0) - 0.5)


def test_sync_push_pull_waits_for_the_version_it_completes(ps: tuple[RunningService, MeshConfig]) -> None:
    running, config = ps
    a, b = client(running, config, "a"), client(running, config, "b")
    a.create({"w": np.zeros(3)}, sgd(1.0), sync(2))
    a.pull()
    b.pull()
    answers: dict[str, object] = {}

    def first() -> None:
        answers["a"] = a.push_pull({"w": np.full(3, 2.0)}, timeout=30)

    waiting = threading.Thread(target=first)
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive()  # a's answer waits for b's gradients: SYNC's barrier
    results_b, pulled_b = b.push_pull({"w": np.full(3, 4.0)}, timeout=30)
    waiting.join(timeout=30)
    results_a, pulled_a = answers["a"]  # type: ignore[misc]
    assert results_a[0].outcome == pb.PUSH_OUTCOME_BUFFERED and results_b[0].outcome == pb.PUSH_OUTCOME_APPLIED
    for pulled in (pulled_a, pulled_b):
        assert pulled.versions == [1]
        np.testing.assert_array_equal(pulled.tensors["w"], np.full(3, -3.0))  # 0 - 1.0 * mean(2, 4)


def test_a_buffered_push_whose_answer_timed_out_is_received_by_a_retry(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    a, b = client(running, config, "a"), client(running, config, "b")
    a.create({"w": np.zeros(2)}, sgd(1.0), sync(2))
    a.pull()
    b.pull()
    with pytest.raises(grpc.RpcError) as err:
        # 3 s, not 0.5: the server answers 0.25 s before the caller's deadline (0.05 s at 0.5 s, which a loaded
        # machine missed: the caller then saw its own DEADLINE_EXCEEDED without the server's advice).
        a.push_pull({"w": np.ones(2)}, step_id=7, timeout=3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "retry with the same step id" in (err.value.details() or "")
    b.push({"w": np.full(2, 3.0)})  # completes version 1 with a's buffered push
    results, pulled = a.push_pull({"w": np.ones(2)}, step_id=7, timeout=30)  # the retry: not applied twice
    assert results[0].outcome == pb.PUSH_OUTCOME_DUPLICATE
    assert pulled.versions == [1]
    np.testing.assert_array_equal(pulled.tensors["w"], np.full(2, -2.0))


def test_a_stale_push_pull_is_refused_and_changes_nothing(ps: tuple[RunningService, MeshConfig]) -> None:
    running, config = ps
    fast, slow = client(running, config, "fast"), client(running, config, "slow")
    fast.create({"w": np.zeros(2)}, sgd(1.0), bounded_staleness(1))
    slow.pull()
    fast.pull()
    for _ in range(2):
        fast.push_pull({"w": np.ones(2)})
    with pytest.raises(StalePush) as err:
        slow.push_pull({"w": np.full(2, 100.0)})
    assert err.value.detail is not None and err.value.detail.staleness == 2 and err.value.detail.current_version == 2
    np.testing.assert_array_equal(fast.pull().tensors["w"], np.full(2, -2.0))
    assert fast.versions == [2]


def test_push_pull_streams_large_tensors_both_ways(tmp_path: Path) -> None:
    config = ps_config(tmp_path, **{"grpc.max_message_mib": 4, "paramserver.stream_threshold_mib": 1.0})
    running = start_service(load_definition("paramserver"), config, port=0)
    try:
        c = client(running, config)
        big = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32)  # 12 MB > 4 MiB limit
        c.create({"big": big, "small": np.zeros(2)}, sgd(1.0), asynchronous())
        c.pull()
        stub = pb_grpc.ParamServerServiceStub(c.channels[0])
        small = pb.PushPullRequest(model="m", worker_id="upb", base_version=0, step_id=1)
        small.gradients.add(name="small", tensor=common_pb2.Tensor(dtype=F32, shape=[2], data=bytes(8)))
        with pytest.raises(grpc.RpcError) as err:
            stub.PushPull(small)  # the answer would exceed the message limit: refused before the push
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "use the streamed method" in (err.value.details() or "")
        assert stub.DescribeModel(pb.DescribeModelRequest(model="m")).model.version == 0
        results, pulled = c.push_pull({"big": np.ones_like(big), "small": np.ones(2)})
        assert results[0].outcome == pb.PUSH_OUTCOME_APPLIED and pulled.versions == [1]
        np.testing.assert_allclose(pulled.tensors["big"], big - 1.0, rtol=1e-6)
        np.testing.assert_array_equal(pulled.tensors["small"], np.full(2, -1.0))
    finally:
        running.stop(grace=0.5)


def test_fused_training_steps_follow_the_same_trajectory_as_pull_then_push(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    """One worker: a fused step computes on exactly the parameters a pull would have given it."""
    running, config = ps
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]) + 0.3
    finals = []
    for fused in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 1)
        c = client(running, config, model=f"lin-{fused}")
        c.create_from_module(model, sgd(0.05), bounded_staleness(0))
        losses = []
        for _ in range(30):

            def compute(model: torch.nn.Module = model) -> float:
                loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
                loss.backward()
                return loss.item()

            report = c.train_step(model, compute, fused=fused)
            assert report.repulls == 0 and report.results[0].staleness == 0
            losses.append(report.loss)
        assert losses[-1] < losses[0] / 4  # it trains
        finals.append((losses, c.pull().tensors["weight"].copy()))
        c.close()
    (losses_plain, w_plain), (losses_fused, w_fused) = finals
    assert losses_fused == losses_plain
    np.testing.assert_array_equal(w_fused, w_plain)


def test_train_loop_with_fused_steps_trains_and_ends_on_the_server_parameters(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    y = x @ torch.tensor([0.5, -1.0, 2.0])
    c = client(running, config, model="loop")
    c.create_from_module(model, sgd(0.1), asynchronous())
    summary = train_loop(
        c,
        model,
        [(x, y)] * 4,
        lambda b: torch.nn.functional.mse_loss(model(b[0]).squeeze(1), b[1]),
        epochs=5,
        fused=True,
    )
    assert summary.steps == 20 and summary.repulls == 0
    assert summary.losses[-1] < summary.losses[0] / 10
    server = c.pull()
    assert server.versions == [20]
    np.testing.assert_array_equal(model.weight.detach().numpy(), server.tensors["weight"])


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "streamed"])
def test_pulls_land_in_the_callers_arrays(tmp_path: Path, streamed: bool) -> None:
    overrides = {"grpc.max_message_mib": 1, "paramserver.stream_threshold_mib": 0.25} if streamed else {}
    config = ps_config(tmp_path, **overrides)
    running = start_service(load_definition("paramserver"), config, port=0)
    try:
        c = client(running, config)
        w0 = np.random.default_rng(1).standard_normal((600, 500)).astype(np.float32)  # 1.2 MB: streamed at 1 MiB
        c.create({"w": w0, "b": np.zeros(3)}, sgd(1.0), asynchronous())
        dest = {"w": np.empty((600, 500), np.float32)}
        pulled = c.pull(into=dest)
        assert pulled.tensors["w"] is dest["w"]
        np.testing.assert_array_equal(dest["w"], w0)
        np.testing.assert_array_equal(pulled.tensors["b"], np.zeros(3))  # not named in into: as usual
        _, pulled = c.push_pull({"w": np.ones_like(w0), "b": np.ones(3)}, into=dest)
        assert pulled.tensors["w"] is dest["w"] and pulled.versions == [1]
        np.testing.assert_array_equal(dest["w"], w0 - 1.0)
        for bad in (np.empty(10, np.float32), np.empty((600, 500), np.float64), np.empty((500, 600), np.float32).T):
            with pytest.raises(ValueError, match=r"into\['w'\] must be a C-contiguous, writable float32 array"):
                c.pull(into={"w": bad})
    finally:
        running.stop(grace=0.5)


def test_a_float16_tensor_pulled_into_a_float32_array_is_converted(tmp_path: Path) -> None:
    config = ps_config(tmp_path, **{"grpc.max_message_mib": 1, "paramserver.stream_threshold_mib": 0.25})
    running = start_service(load_definition("paramserver"), config, port=0)
    try:
        values = np.linspace(-2, 2, 300_000, dtype=np.float16)  # 600 KB: streamed
        request = pb.CreateModelRequest(model="m", optimizer=sgd(1.0), consistency=asynchronous())
        request.tensors.add(
            name="h", tensor=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT16, shape=[300_000], data=values.tobytes())
        )
        c = client(running, config)
        pb_grpc.ParamServerServiceStub(c.channels[0]).CreateModelStream(iter(list(_creation_stream(request, 1 << 18))))
        dest = {"h": np.empty(300_000, np.float32)}
        assert c.pull(into=dest).tensors["h"] is dest["h"]
        np.testing.assert_array_equal(dest["h"], values.astype(np.float32))
    finally:
        running.stop(grace=0.5)
