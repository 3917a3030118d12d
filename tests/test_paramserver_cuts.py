"""Consistent checkpoints of a model on two shard processes: kill -9 of one shard rolls the model back to one
cut on both; SIGTERM of one shard loses nothing acknowledged; a whole restart restores one cut."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from guardmesh.sdk.paramserver import HashRing, ParamServerClient, PullResult, bounded_staleness, sgd
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc

from .conftest import make_config
from .processes import ServiceProcess

MODEL = "cut"


def names_on_each_shard() -> tuple[str, str]:
    """A tensor name the 2-shard ring gives shard 0, and one it gives shard 1."""
    ring = HashRing(2)
    names = [f"layer{i}.weight" for i in range(64)]
    return next(n for n in names if ring.shard_of(n) == 0), next(n for n in names if ring.shard_of(n) == 1)


A, B = names_on_each_shard()


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Two paramserver processes, shard 0 and shard 1 of one mesh: one state folder, like ``make up``."""
    state = tmp_path / "state"
    procs = [
        ServiceProcess(
            "paramserver",
            tmp_path / f"shard-{i}",
            {
                "GUARDMESH__PARAMSERVER__SHARD_INDEX": str(i),
                "GUARDMESH__PARAMSERVER__SHARDS": "2",
                "GUARDMESH__METRICS__ENABLED": "false",
            },
            state=state,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            p.start(timeout_s=120, service="paramserver")
        yield procs
    finally:
        for p in procs:
            p.stop(timeout_s=30)


def trainer(tmp_path: Path, procs: list[ServiceProcess], worker: str = "w0") -> ParamServerClient:
    config = make_config(tmp_path / worker)
    return ParamServerClient.connect(MODEL, worker_id=worker, config=config, addresses=[p.address for p in procs])


def step(c: ParamServerClient) -> None:
    """Pull, then push the same gradient to both tensors: they stay equal exactly while both shards have
    applied the same pushes, so A == B says the model is one cut."""
    c.pull()
    c.push({A: np.ones(4), B: np.ones(4)})


def assert_one_cut_at(pulled: PullResult, version: int) -> None:
    """Both shards answer ``version`` and both tensors hold ``version`` SGD steps of ``step``'s gradient."""
    assert pulled.versions == [version, version]
    np.testing.assert_array_equal(pulled.tensors[A], np.full(4, -0.5 * version))
    np.testing.assert_array_equal(pulled.tensors[A], pulled.tensors[B])


def cut_versions(state: Path) -> list[int]:
    """Versions with a cut manifest (every shard's file of that version written)."""
    found = set()
    for replica in ("replica-a", "replica-b"):
        folder = state / "checkpoints" / replica / "cuts" / MODEL
        found |= {int(p.stem[1:]) for p in folder.glob("v*.json")} if folder.exists() else set()
    return sorted(found)


def wait_for_cut(state: Path, version: int) -> None:
    """Until cut ``version``'s manifest is in every location (they are written one after the other)."""
    deadline = time.monotonic() + 120
    folders = [state / "checkpoints" / replica / "cuts" / MODEL for replica in ("replica-a", "replica-b")]
    while not all((folder / f"v{version:012d}.json").exists() for folder in folders):
        assert time.monotonic() < deadline, f"cut {version} never completed: {cut_versions(state)}"
        time.sleep(0.05)


def describe(c: ParamServerClient, shard: int) -> pb.ModelInfo:
    """DescribeModel on one shard; after a restart it waits (within a minute) for the channel to reconnect
    instead of failing fast while the channel backs off from the refused connections of the dead process."""
    stub = pb_grpc.ParamServerServiceStub(c.channels[shard])
    return stub.DescribeModel(pb.DescribeModelRequest(model=MODEL), wait_for_ready=True, timeout=60).model


def restart(proc: ServiceProcess, c: ParamServerClient, shard: int) -> None:
    proc.start(timeout_s=120, service="paramserver")
    describe(c, shard)  # c's channel is connected again


def start_model(tmp_path: Path, procs: list[ServiceProcess], steps: int) -> ParamServerClient:
    c = trainer(tmp_path, procs)
    c.create({A: np.zeros(4), B: np.zeros(4)}, sgd(0.5), bounded_staleness(2), checkpoint_every=5)
    for _ in range(steps):
        step(c)
    return c


@pytest.mark.timeout(600)
def test_kill9_of_one_shard_rolls_both_back_to_the_newest_complete_cut(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    c = start_model(tmp_path, shards, 23)
    assert c.pull().versions == [23, 23]
    wait_for_cut(shards[0].state, 20)
    assert max(cut_versions(shards[0].state)) == 20  # 25 never reached
    shards[1].kill9()
    restart(shards[1], c, 1)
    restarted = describe(c, 1)
    assert restarted.restored_version == 20 and restarted.restore_cause == restarted.incarnation
    pulled = c.pull()  # the client sees the restart and rolls shard 0 back to the same cut
    assert_one_cut_at(pulled, 20)
    rolled = describe(c, 0)
    assert rolled.restored_version == 20 and rolled.restore_cause == restarted.incarnation
    for _ in range(3):
        step(c)
    # Another trainer that learns of the restart later rolls nothing back a second time.
    other = trainer(tmp_path, shards, "w1")
    again = other.pull()
    assert_one_cut_at(again, 23)


@pytest.mark.timeout(600)
def test_sigterm_of_one_shard_loses_nothing_acknowledged_and_a_later_kill9_restores_a_cut(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    c = start_model(tmp_path, shards, 23)
    wait_for_cut(shards[0].state, 20)
    assert shards[1].stop(timeout_s=60) == 0  # SIGTERM: drained, final checkpoint at version 23
    restart(shards[1], c, 1)
    restarted = describe(c, 1)
    assert restarted.restored_version == 23 and restarted.restore_cause == ""
    pulled = c.pull()
    assert_one_cut_at(pulled, 23)  # nothing acknowledged was lost, nothing rolled back
    assert describe(c, 0).restored_version == -1
    # The final checkpoint served its one start: a kill -9 now restores the newest complete cut again.
    step(c)
    shards[1].kill9()
    restart(shards[1], c, 1)
    pulled = c.pull()
    assert pulled.versions == [20, 20]
    np.testing.assert_array_equal(pulled.tensors[A], pulled.tensors[B])
    # Both shards stopped gracefully at the same version: the restart restores that cut on both.
    for _ in range(2):
        step(c)
    for p in shards:
        assert p.stop(timeout_s=60) == 0
    for i, p in enumerate(shards):
        restart(p, c, i)
    whole = trainer(tmp_path, shards, "w2").pull()
    assert_one_cut_at(whole, 22)


@pytest.mark.timeout(600)
def test_a_cut_whose_manifest_was_never_written_is_still_restored_when_every_shard_file_is_there(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    c = start_model(tmp_path, shards, 12)
    wait_for_cut(shards[0].state, 10)
    for replica in ("replica-a", "replica-b"):  # as if the last writer died between its file and the manifest
        (shards[0].state / "checkpoints" / replica / "cuts" / MODEL / "v000000000010.json").unlink()
    assert 10 not in cut_versions(shards[0].state)
    for p in shards:
        p.kill9()
    for i, p in enumerate(shards):
        restart(p, c, i)
    pulled = trainer(tmp_path, shards, "w1").pull()
    assert_one_cut_at(pulled, 10)
    assert 10 in cut_versions(shards[0].state)  # the manifest was written when the cut was found complete
    c.close()


@pytest.mark.timeout(600)
def test_kill9_before_the_first_periodic_cut_rolls_back_to_the_creation(
    tmp_path: Path, shards: list[ServiceProcess]
) -> None:
    c = start_model(tmp_path, shards, 3)
    wait_for_cut(shards[0].state, 0)  # the creation is the first cut
    shards[0].kill9()
    restart(shards[0], c, 0)
    pulled = c.pull()
    assert pulled.versions == [0, 0]
    np.testing.assert_array_equal(pulled.tensors[A], np.zeros(4))
    np.testing.assert_array_equal(pulled.tensors[B], np.zeros(4))
    step(c)
    assert c.pull().versions == [1, 1]
