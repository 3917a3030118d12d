"""The parameter server's guards over real gRPC: a restarted worker is applied, clipping by the global norm
across shards, throughput-drop detection, SYNC with backup workers and changing membership, and the
staleness-scaled learning rate and momentum against torch."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from guardmesh.config import MeshConfig
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk.paramserver import (
    HashRing,
    ParamServerClient,
    asynchronous,
    bounded_staleness,
    sync,
)
from guardmesh.v1 import common_pb2
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc
from services.paramserver.server import ParamServerBinding

from .conftest import REPO, ps_config
from .conftest import ps_client as client


def stats(c: ParamServerClient, shard: int = 0) -> pb.GetStatsResponse:
    """GetStats of ``c``'s model on one shard."""
    return pb_grpc.ParamServerServiceStub(c.channels[shard]).GetStats(pb.GetStatsRequest(model=c.model))


# -- #17.7: a restarted worker ------------------------------------------------------------------------------


def test_train_digits_run_twice_under_one_worker_id_makes_progress_the_second_time(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "examples" / "train_digits.py"), "--workers", "1", "--epochs", "1"]
    versions, printed = [], []
    for _ in range(2):  # the same worker id ("worker-0"), step ids from 0 again in the new process
        out = subprocess.run(
            [*command, "--address", running.address], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "DUPLICATE" not in out.stderr
        printed.append(int(re.findall(r"versions \[(\d+)\]", out.stdout)[-1]))
        versions.append(stats(client(running, config, model="digits-example")).version)
    assert versions[0] > 0 and versions[1] == 2 * versions[0]  # every push of the second run was applied
    assert printed[1] > printed[0]  # what the user saw: the same versions both times
    assert stats(client(running, config, model="digits-example")).pushes_duplicate == 0


def test_a_duplicate_answer_to_a_step_this_client_never_sent_is_warned_about(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    first = client(running, config)
    first.create({"w": np.zeros(2)}, pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_SGD, learning_rate=1.0), asynchronous())
    first.pull()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a retry of its own step is expected: no warning
        assert first.push({"w": np.ones(2)}, step_id=0)[0].outcome == pb.PUSH_OUTCOME_APPLIED
        assert first.push({"w": np.ones(2)}, step_id=0)[0].outcome == pb.PUSH_OUTCOME_DUPLICATE
    second = client(running, config)
    second.session = first.session  # a second process that reuses the session: its step 0 is taken for a retry
    second.pull()
    with pytest.warns(UserWarning, match="answered DUPLICATE to step 0 .* NOT applied"):
        assert second.push({"w": np.ones(2)}, step_id=0)[0].outcome == pb.PUSH_OUTCOME_DUPLICATE
    third = client(running, config)  # its own session: applied
    third.pull()
    assert third.push({"w": np.ones(2)}, step_id=0)[0].outcome == pb.PUSH_OUTCOME_APPLIED
    np.testing.assert_allclose(third.pull().tensors["w"], [-2.0, -2.0])


def test_sync_a_worker_restarted_after_pushing_for_a_version_is_told_its_push_is_counted(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    a, b = client(running, config, worker="a"), client(running, config, worker="b")
    a.create({"w": np.zeros(1)}, sgd1(), sync(2))
    for c in (a, b):
        c.pull()
    assert a.push({"w": np.array([2.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
    a_again = client(running, config, worker="a")  # a's process restarted: a new session, step ids from 0
    a_again.pull()
    with pytest.warns(UserWarning, match="previous process of this worker already pushed for this version"):
        again = a_again.push({"w": np.array([100.0])})[0]
    assert again.outcome == pb.PUSH_OUTCOME_DUPLICATE and again.version == 0 and again.completes == 1
    assert a_again.awaiting == [1]  # its next pull waits for the version its first life's push completes
    assert b.push({"w": np.array([4.0])})[0].outcome == pb.PUSH_OUTCOME_APPLIED
    np.testing.assert_allclose(a_again.pull().tensors["w"], [-3.0])  # (2 + 4) / 2: a's first life counted once
    assert a_again.push({"w": np.array([1.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED  # the next version: its own
    assert stats(a).pushes_accepted == 3


# -- #17.8: clipping by the global norm -----------------------------------------------------------------------


@pytest.fixture
def two_shards(tmp_path: Path) -> Iterator[tuple[list[RunningService], MeshConfig]]:
    """Two in-process shards (indices 0 and 1) with one state folder."""
    configs = [ps_config(tmp_path, **{"paramserver.shard_index": i, "paramserver.shards": 2}) for i in range(2)]
    shards = [start_service(load_definition("paramserver"), cfg, port=0) for cfg in configs]
    yield shards, configs[0]
    for s in shards:
        s.stop(grace=0.5)


def names_on_each_shard() -> tuple[str, str]:
    """A tensor name the 2-shard ring gives shard 0, and one it gives shard 1."""
    ring = HashRing(2)
    names = [f"layer{i}.weight" for i in range(64)]
    return next(n for n in names if ring.shard_of(n) == 0), next(n for n in names if ring.shard_of(n) == 1)


@pytest.mark.parametrize("streamed", [False, True])
def test_clipping_scales_every_shard_by_the_global_norm(
    two_shards: tuple[list[RunningService], MeshConfig], streamed: bool
) -> None:
    shards, config = two_shards
    a, b = names_on_each_shard()
    c = ParamServerClient.connect("m", config=config, addresses=[s.address for s in shards])
    if streamed:
        c.threshold = 0  # every push streamed in chunks: the norm travels in the stream's header
    clip = pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_SGD, learning_rate=1.0, clip_norm=1.0)
    c.create({a: np.zeros(1), b: np.zeros(1)}, clip, asynchronous())
    c.pull()
    c.push({a: np.array([3.0]), b: np.array([4.0])})  # global norm 5, clip 1: scaled by 0.2 on both shards
    after = c.pull().tensors
    np.testing.assert_allclose([after[a][0], after[b][0]], [-0.6, -0.8], rtol=1e-6)
    c.push({a: np.array([0.3]), b: np.array([0.4])})  # norm 0.5 <= 1: not scaled
    after = c.pull().tensors
    np.testing.assert_allclose([after[a][0], after[b][0]], [-0.9, -1.2], rtol=1e-6)
    # A client that attached without pulling learns that the model clips before its first push.
    fresh = ParamServerClient.connect("m", worker_id="fresh", config=config, addresses=[s.address for s in shards])
    fresh.push({a: np.array([3.0]), b: np.array([4.0])})
    after = c.pull().tensors
    np.testing.assert_allclose([after[a][0], after[b][0]], [-1.5, -2.0], rtol=1e-6)


def test_sync_clips_each_push_by_its_global_norm_before_averaging(
    two_shards: tuple[list[RunningService], MeshConfig],
) -> None:
    shards, config = two_shards
    a, b = names_on_each_shard()
    workers = [
        ParamServerClient.connect("m", worker_id=f"w{i}", config=config, addresses=[s.address for s in shards])
        for i in range(2)
    ]
    clip = pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_SGD, learning_rate=1.0, clip_norm=1.0)
    workers[0].create({a: np.zeros(1), b: np.zeros(1)}, clip, sync(2))
    for w in workers:
        w.pull()
    workers[0].push({a: np.array([3.0]), b: np.array([4.0])})  # norm 5: clipped to (0.6, 0.8)
    workers[1].push({a: np.array([0.0]), b: np.array([0.5])})  # norm 0.5: as it is
    after = workers[0].pull(min_versions=[1, 1], timeout=30).tensors
    np.testing.assert_allclose([after[a][0], after[b][0]], [-0.3, -0.65], rtol=1e-6)


# -- #17.9: throughput drops ----------------------------------------------------------------------------------


class FakeClock:
    """A clock the test moves: the shard measures push throughput with it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[RunningService, MeshConfig, FakeClock]]:
    """A real paramserver whose shards measure time with a FakeClock; its monitor thread stays idle (the
    test runs the monitor's rounds itself, at chosen times)."""
    clock = FakeClock()
    config = ps_config(tmp_path, **{"paramserver.monitor_interval_s": 3600.0, "paramserver.throughput_window_s": 10.0})
    definition = dataclasses.replace(load_definition("paramserver"), build=lambda cfg: ParamServerBinding(cfg, clock))
    running = start_service(definition, config, port=0)
    yield running, config, clock
    running.stop(grace=0.5)


def push_at_rate(c: ParamServerClient, binding: ParamServerBinding, clock: FakeClock, per_second: list[int]) -> None:
    """Each second of fake time: that many pushes, then one monitor round."""
    for count in per_second:
        clock.now += 1.0
        for _ in range(count):
            c.pull()
            c.push({"w": np.zeros(2)})
        binding.watch()


def drop_events(c: ParamServerClient) -> list[str]:
    return [e for e in stats(c).events if "throughput fell" in e]


@pytest.fixture
def pushed(
    clocked: tuple[RunningService, MeshConfig, FakeClock],
) -> Callable[[list[int]], list[str]]:
    """A model on the clocked server; pushes at the given per-second counts, then answers its drop events."""
    running, config, clock = clocked
    binding = running.binding
    assert isinstance(binding, ParamServerBinding)
    c = client(running, config)
    c.create({"w": np.zeros(2)}, pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_SGD, learning_rate=0.1), asynchronous())

    def push(per_second: list[int]) -> list[str]:
        push_at_rate(c, binding, clock, per_second)
        return drop_events(c)

    return push


def test_throughput_falling_from_90_to_45_percent_of_expected_raises_one_event(
    pushed: Callable[[list[int]], list[str]],
) -> None:
    assert pushed([9] * 30) == []  # 90 % of an expected 10/s
    events = pushed([4, 5] * 10)  # 45 %: exactly half of the rate before
    assert len(events) == 1 and "4.50/s" in events[0] and "peak 9.00/s" in events[0]
    assert len(pushed([4, 5] * 10)) == 1  # still 45 %: the same drop, no second event


def test_a_gradual_decline_raises_an_event_when_it_reaches_half_of_the_peak(
    pushed: Callable[[list[int]], list[str]],
) -> None:
    assert pushed([10] * 20) == []
    for rate in (9, 8, 7, 6):  # 10 % less every 10 s: never half of the rate just before
        assert pushed([rate] * 10) == [], rate
    events = pushed([5] * 10)  # half of the peak
    assert len(events) == 1 and "5.00/s" in events[0] and "peak 10.00/s" in events[0]


# -- #17.10: SYNC with backup workers and changing membership ----------------------------------------------


def sgd1() -> pb.OptimizerConfig:
    return pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_SGD, learning_rate=1.0)


def test_sync_backup_workers_first_n_win_and_the_late_one_joins_the_next_version(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    w = [client(running, config, worker=f"w{i}") for i in range(3)]
    w[0].create({"w": np.zeros(1)}, sgd1(), sync(2, backup_workers=1))
    for c in w:
        c.pull()
    assert w[2].push({"w": np.array([2.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
    assert w[0].push({"w": np.array([4.0])})[0].outcome == pb.PUSH_OUTCOME_APPLIED  # the first two of three win
    late = w[1].push({"w": np.array([100.0])})[0]
    assert late.outcome == pb.PUSH_OUTCOME_LATE and late.version == 1
    np.testing.assert_allclose(w[1].pull().tensors["w"], [-3.0])  # (2 + 4) / 2; the late push not applied
    # Version 1: the late worker is first this time, another is the backup.
    for c in w:
        c.pull()
    assert w[1].push({"w": np.array([1.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
    assert w[2].push({"w": np.array([3.0])})[0].outcome == pb.PUSH_OUTCOME_APPLIED
    assert w[0].push({"w": np.array([50.0])})[0].outcome == pb.PUSH_OUTCOME_LATE
    np.testing.assert_allclose(w[0].pull().tensors["w"], [-5.0])
    st = stats(w[0])
    assert st.pushes_late == 2 and st.pushes_accepted == 4 and st.pushes_rejected_stale == 0
    # A retry of the late push is answered from the step-id window: nothing applied.
    assert w[0].push({"w": np.array([50.0])}, step_id=1)[0].outcome == pb.PUSH_OUTCOME_DUPLICATE


@pytest.fixture
def ps_no_monitor(tmp_path: Path) -> Iterator[tuple[RunningService, MeshConfig]]:
    """A real paramserver whose monitor thread stays idle: only a waiting pull completes a timed-out version.

    With the monitor's 5 s rounds a round falling in a gap of more than the straggler timeout between two
    pushes (a loaded machine) would complete a version early, and a test on a real clock would fail."""
    config = ps_config(tmp_path, **{"paramserver.monitor_interval_s": 3600.0})
    running = start_service(load_definition("paramserver"), config, port=0)
    yield running, config
    running.stop(grace=0.5)


def test_sync_worker_that_stops_pushing_stalls_one_version_then_none_and_rejoins(
    ps_no_monitor: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps_no_monitor
    a, b = client(running, config, worker="a"), client(running, config, worker="b")
    # 3 s, not 0.5: with 0.5 s a loaded machine could leave more than that between a's and b's pushes, and b
    # was dropped as a straggler before it ever stopped.
    timed = pb.ConsistencyConfig(mode=pb.CONSISTENCY_MODE_SYNC, workers=2, straggler_timeout_s=3.0)
    a.create({"w": np.zeros(1)}, sgd1(), timed)
    for c in (a, b):
        c.pull()
    a.push({"w": np.array([1.0])})
    b.push({"w": np.array([3.0])})  # version 1 = -(1 + 3) / 2
    a.pull()
    # b stops pushing. a's push waits for it at most the straggler timeout, then completes alone.
    assert a.push({"w": np.array([2.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
    pulled = a.pull(timeout=60)  # waits for version 2 (the one its buffered push completes)
    assert pulled.versions == [2]
    np.testing.assert_allclose(pulled.tensors["w"], [-4.0])
    assert list(stats(a).sync_members) == ["a"]
    # The next versions no longer wait for b.
    assert a.push({"w": np.array([1.0])})[0].outcome == pb.PUSH_OUTCOME_APPLIED
    a.pull()
    # b comes back: a member again, versions wait for both.
    b.pull()
    assert b.push({"w": np.array([2.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
    assert a.push({"w": np.array([4.0])})[0].outcome == pb.PUSH_OUTCOME_APPLIED
    np.testing.assert_allclose(a.pull().tensors["w"], [-8.0])  # -5 - (2 + 4) / 2
    assert sorted(stats(a).sync_members) == ["a", "b"]


def test_sync_worker_that_leaves_completes_the_version_it_held_up(ps: tuple[RunningService, MeshConfig]) -> None:
    running, config = ps
    a, b = client(running, config, worker="a"), client(running, config, worker="b")
    a.create({"w": np.zeros(1)}, sgd1(), sync(2))  # the default timeout (30 s) is never reached here
    for c in (a, b):
        c.pull()
    b.push({"w": np.array([2.0])})
    a.push({"w": np.array([4.0])})
    a.pull()
    b.pull()
    assert a.push({"w": np.array([1.0])})[0].outcome == pb.PUSH_OUTCOME_BUFFERED
    b.leave()  # version 1 waited only for b: it completes with a's push
    pulled = a.pull(timeout=60)
    assert pulled.versions == [2]
    np.testing.assert_allclose(pulled.tensors["w"], [-4.0])
    assert a.push({"w": np.array([1.0])})[0].outcome == pb.PUSH_OUTCOME_APPLIED  # no longer waits for b


# -- #17.11: the staleness-scaled learning rate and momentum, against torch ---------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01},
    ],
    ids=["momentum", "nesterov", "dampening-decay"],
)
def test_momentum_matches_torch(ps: tuple[RunningService, MeshConfig], settings: dict[str, Any]) -> None:
    running, config = ps
    rng = np.random.default_rng(1)
    init = rng.normal(size=(3, 4)).astype(np.float32)
    c = client(running, config)
    c.create(
        {"w": init},
        pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_MOMENTUM, learning_rate=0.05, **settings),
        asynchronous(),
    )
    ref = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = torch.optim.SGD([ref], lr=0.05, **settings)
    for _ in range(12):
        g = rng.normal(size=(3, 4)).astype(np.float32)
        c.pull()
        c.push({"w": g})
        ref.grad = torch.from_numpy(g)
        opt.step()
    np.testing.assert_allclose(c.pull().tensors["w"], ref.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
@pytest.mark.parametrize("mode", ["bounded", "async"])
def test_staleness_scaled_learning_rate_matches_torch_with_the_scaled_rate(
    ps: tuple[RunningService, MeshConfig], optimizer: str, mode: str
) -> None:
    running, config = ps
    rng = np.random.default_rng(2)
    init = rng.normal(size=5).astype(np.float32)
    kind = pb.OPTIMIZER_KIND_MOMENTUM if optimizer == "momentum" else pb.OPTIMIZER_KIND_SGD
    moment = 0.9 if optimizer == "momentum" else 0.0
    consistency = bounded_staleness(3, scale_lr=True) if mode == "bounded" else asynchronous(scale_lr=True)
    fast, slow = client(running, config, worker="fast"), client(running, config, worker="slow")
    fast.create({"w": init}, pb.OptimizerConfig(kind=kind, learning_rate=0.1, momentum=moment), consistency)
    ref = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = torch.optim.SGD([ref], lr=0.1, momentum=moment)
    # (pushes by the fast worker before the slow one pushes on its old pull): staleness 0, 1, 2 and 3
    for ahead in (0, 1, 2, 3, 0, 2):
        slow.pull()
        for _ in range(ahead):
            fast.pull()
            g = rng.normal(size=5).astype(np.float32)
            result = fast.push({"w": g})[0]
            assert result.staleness == 0 and result.lr_scale == 1.0
            ref.grad = torch.from_numpy(g)
            opt.param_groups[0]["lr"] = 0.1
            opt.step()
        g = rng.normal(size=5).astype(np.float32)
        result = slow.push({"w": g})[0]
        assert result.staleness == ahead and result.lr_scale == pytest.approx(1.0 / max(1, ahead))
        ref.grad = torch.from_numpy(g)
        opt.param_groups[0]["lr"] = 0.1 / max(1, ahead)
        opt.step()
    np.testing.assert_allclose(fast.pull().tensors["w"], ref.detach().numpy(), rtol=1e-5, atol=1e-6)


# -- bad input on the new fields and methods ------------------------------------------------------------------


def test_bad_sessions_norms_cuts_and_leaves_are_refused_naming_the_field_and_change_nothing(
    ps: tuple[RunningService, MeshConfig],
) -> None:
    running, config = ps
    c = client(running, config)
    c.create({"w": np.zeros(2)}, sgd1(), asynchronous())
    stub = pb_grpc.ParamServerServiceStub(c.channels[0])
    tensor = pb.NamedTensor(
        name="w", tensor=common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[2], data=b"\0" * 8)
    )

    def refused(call: Callable[[], object], code: grpc.StatusCode, words: str) -> None:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and words in (err.value.details() or ""), err.value.details()

    push = pb.PushRequest(model="m", worker_id="w", base_version=0, step_id=0, gradients=[tensor])
    refused(lambda: stub.Push(pb.PushRequest(**_fields(push), session="s" * 129)), INVALID, "session")
    refused(lambda: stub.Push(pb.PushRequest(**_fields(push), global_norm=-1.0)), INVALID, "global_norm")
    refused(lambda: stub.Push(pb.PushRequest(**_fields(push), global_norm=float("nan"))), INVALID, "global_norm")
    refused(lambda: stub.RestoreCut(pb.RestoreCutRequest(model="m", version=0, cause="")), INVALID, "cause")
    refused(lambda: stub.RestoreCut(pb.RestoreCutRequest(model="m", version=-1, cause="x")), INVALID, "version")
    refused(
        lambda: stub.RestoreCut(pb.RestoreCutRequest(model="m", version=7, cause="x")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no verified checkpoint",
    )
    refused(lambda: stub.LeaveSync(pb.LeaveSyncRequest(model="m", worker_id="")), INVALID, "worker_id")
    create = pb.CreateModelRequest(
        model="other", tensors=[tensor], optimizer=sgd1(), consistency=asynchronous(), cut_shards=[1, 2]
    )
    refused(lambda: stub.CreateModel(create), INVALID, "cut_shards")
    refused(
        lambda: stub.CreateModel(pb.CreateModelRequest(**{**_fields(create), "cut_shards": [0, 0]})),
        INVALID,
        "cut_shards",
    )
    timed = pb.ConsistencyConfig(mode=pb.CONSISTENCY_MODE_SYNC, workers=1, straggler_timeout_s=-1)
    refused(
        lambda: stub.CreateModel(pb.CreateModelRequest(**{**_fields(create), "cut_shards": [0], "consistency": timed})),
        INVALID,
        "straggler_timeout_s",
    )
    info = stub.DescribeModel(pb.DescribeModelRequest(model="m")).model
    assert info.version == 0 and info.restored_version == -1 and list(info.cut_shards) == [0]
    np.testing.assert_array_equal(c.pull().tensors["w"], [0.0, 0.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.DescribeModel(pb.DescribeModelRequest(model="other"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _fields(msg: Any) -> dict[str, Any]:
    """A message's set fields, to build a variant of it."""
    return {f.name: v for f, v in msg.ListFields()}
