"""kill -9 of a real paramserver process during training and during a checkpoint write."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from guardmesh.sdk.paramserver import ParamServerClient, adam, bounded_staleness
from guardmesh.v1 import paramserver_pb2 as pb
from guardmesh.v1 import paramserver_pb2_grpc as pb_grpc

from .conftest import make_config
from .processes import START_TIMEOUT_S, ServiceProcess
from .ps_worker import accuracy, dataset, make_model

REPO = Path(__file__).resolve().parent.parent


def _start(server: ServiceProcess) -> None:
    """Start (or restart) the paramserver and wait until its health says SERVING."""
    server.start(service="paramserver")  # START_TIMEOUT_S: torch import on a loaded machine


def _checkpoints(state: Path, model: str) -> list[int]:
    """Versions with a manifest in either replica (a manifest is written after its tensors; on one shard each
    file is a complete cut)."""
    found = set()
    for replica in ("replica-a", "replica-b"):
        folder = state / "checkpoints" / replica / "shard-0" / model
        found |= {int(p.stem[1:]) for p in folder.glob("v*.json")} if folder.exists() else set()
    return sorted(found)


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_kill9_during_training_resumes_from_verified_checkpoint_and_converges(tmp_path: Path) -> None:
    server = ServiceProcess("paramserver", tmp_path)
    port, state = server.port, server.state
    _start(server)
    config = make_config(tmp_path, **{"services.paramserver.port": port})
    x_tr, y_tr, x_te, y_te = dataset()
    model = make_model()
    ps = ParamServerClient.connect("digits", config=config, addresses=[f"127.0.0.1:{port}"])
    ps.create_from_module(model, adam(0.03), bounded_staleness(2), checkpoint_every=10)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    killed_at = -1
    on_disk: list[int] = []
    timer: threading.Timer | None = None
    steps = 0
    try:
        for _ in range(5):
            order = rng.permutation(len(x_tr))
            for start in range(0, len(order) - 64 + 1, 64):
                idx = order[start : start + 64]

                def compute(idx: np.ndarray = idx) -> float:
                    loss = loss_fn(model(torch.from_numpy(x_tr[idx])), torch.from_numpy(y_tr[idx]))
                    loss.backward()
                    return loss.item()

                # The restart below may take as long as a start: the step waits for it that long.
                ps.train_step(model, compute, unavailable_budget_s=START_TIMEOUT_S + 30)
                steps += 1
                if steps == 35:
                    deadline = time.monotonic() + 120
                    while max(_checkpoints(state, "digits"), default=0) < 30:
                        assert time.monotonic() < deadline, f"no v30 checkpoint: {_checkpoints(state, 'digits')}"
                        time.sleep(0.02)  # the v30 checkpoint is written in the background
                    killed_at = ps.versions[0]
                    server.kill9()
                    # The background writer snapshots the shard when it runs, so on a loaded machine the newest
                    # checkpoint may be of a later version than the one that triggered it.
                    on_disk = _checkpoints(state, "digits")
                    # Restart a moment later while the trainer is already retrying.
                    timer = threading.Timer(1.0, _start, (server,))
                    timer.start()
        info = pb_grpc.ParamServerServiceStub(ps.channels[0]).DescribeModel(pb.DescribeModelRequest(model="digits"))
        assert info.model.restored_version == max(on_disk) >= 30  # the newest checkpoint, verified by its checksum
        assert info.model.version > max(killed_at, info.model.restored_version)  # training went on after the restore
        ps.pull_into(model)
        assert accuracy(model, x_te, y_te) > 0.93
    finally:
        ps.close()
        if timer is not None:
            timer.join()  # a restart still pending would otherwise outlive the test
        server.stop(timeout_s=30, must_exit=True)


@pytest.mark.timeout(600)  # two process starts of up to START_TIMEOUT_S each on a loaded machine
def test_kill9_during_checkpoint_write_restores_previous_verified_version(tmp_path: Path) -> None:
    server = ServiceProcess("paramserver", tmp_path)
    port, state = server.port, server.state
    _start(server)
    config = make_config(tmp_path, **{"services.paramserver.port": port})
    ps = ParamServerClient.connect("big", config=config, addresses=[f"127.0.0.1:{port}"])
    big = np.zeros(20_000_000, dtype=np.float32)  # 80 MB: the write takes long enough to be interrupted
    ps.create({"big": big, "w": np.zeros(4)}, adam(0.1), bounded_staleness(4))
    stub = pb_grpc.ParamServerServiceStub(ps.channels[0])
    ps.pull()
    ps.push({"big": np.ones_like(big), "w": np.ones(4)}, step_id=0)
    first = stub.Checkpoint(pb.CheckpointRequest(model="big"), timeout=120)
    assert first.version == 1
    ps.pull()
    ps.push({"big": np.ones_like(big), "w": np.ones(4)}, step_id=1)
    folders = [state / "checkpoints" / r / "shard-0" / "big" for r in ("replica-a", "replica-b")]
    threading.Thread(target=lambda: _quiet(stub.Checkpoint, pb.CheckpointRequest(model="big")), daemon=True).start()
    deadline = time.monotonic() + 60
    while not any(".tmp-" in p.name for f in folders for p in f.iterdir()):
        assert time.monotonic() < deadline, "no checkpoint write observed"
        time.sleep(0.001)
    server.kill9()
    leftovers = [p.name for f in folders for p in f.iterdir() if ".tmp-" in p.name]
    _start(server)
    try:
        info = stub.DescribeModel(pb.DescribeModelRequest(model="big")).model
        assert leftovers, "the kill should have interrupted a write"
        # v2 never completed on every replica: whatever verified copy is newest wins, never a torn file.
        assert info.restored_version in (1, 2)
        pulled = ps.pull()
        expected = -0.1 * info.restored_version  # Adam's first steps move each weight by lr
        np.testing.assert_allclose(pulled.tensors["w"], np.full(4, expected), rtol=1e-4)
        ps.push({"w": np.ones(4), "big": np.ones_like(big)}, step_id=5)
        assert ps.pull().versions[0] == info.restored_version + 1
    finally:
        ps.close()
        server.stop(timeout_s=30, must_exit=True)


def _quiet(fn, request) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(grpc.RpcError):  # the server is killed mid-call
        fn(request, timeout=120)
