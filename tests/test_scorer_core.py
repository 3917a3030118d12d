"""Scorer core without gRPC: the model registry (real PyTorch models) and the dynamic batcher."""

from __future__ import annotations

import contextlib
import errno
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from guardmesh.config import load_config
from guardmesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.scorer.batching import DynamicBatcher
from services.scorer.decision import ThresholdPolicy
from services.scorer.monitoring import CleaningPolicy
from services.scorer.persistence import RegistryStore
from services.scorer.registry import ModelFormat, ModelRegistry, ModelVersion, mlp, pick_device
from services.scorer.scorer import Registration, Scorer, VersionConfig

FEATURES = [f"f{i}" for i in range(8)]


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def export_bytes(module: torch.nn.Module, n: int) -> bytes:
    buf = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (torch.zeros(2, n),), dynamic_shapes=({0: batch},))
    torch.export.save(program, buf)
    return buf.getvalue()


def test_device_is_cpu_without_cuda() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match=r"scorer\.device"):
            pick_device("cuda")


@pytest.mark.parametrize("fmt", list(ModelFormat))
def test_every_format_loads_and_scores_like_the_original(fmt: ModelFormat) -> None:
    torch.manual_seed(0)
    model = mlp(len(FEATURES), hidden=(16,)).eval()
    if fmt is ModelFormat.TORCHSCRIPT:
        payload = torchscript_bytes(model)
    elif fmt is ModelFormat.TORCH_EXPORT:
        payload = export_bytes(model, len(FEATURES))
    else:
        payload = st_save(model.state_dict())
    reg = ModelRegistry(torch.device("cpu"))
    mv = reg.register("risk", "v1", FEATURES, fmt, payload, arch="mlp", options={"hidden": (16,)})
    x = torch.randn(5, len(FEATURES))
    np.testing.assert_allclose(mv(x).numpy(), model(x).detach()[:, 0].numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("head", ["column", "flat", "float64"])
def test_the_batchers_scores_are_the_modules_as_one_float32_per_row(head: str) -> None:
    """ModelVersion.scores (the batcher's forward, numpy after the module's call) answers what the module
    answers, one float32 per row, whatever the head's shape ((n, 1) or (n,)) and dtype."""
    torch.manual_seed(0)
    net = mlp(len(FEATURES), hidden=(16,)).eval()

    def module(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        return out[:, 0] if head == "flat" else out.double() if head == "float64" else out

    mv = ModelVersion("risk", "v1", tuple(FEATURES), module, ModelFormat.TORCHSCRIPT, 0.0)
    x = torch.randn(7, len(FEATURES))
    got = mv.scores(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (7,)
    np.testing.assert_allclose(got, net(x).detach()[:, 0].numpy(), rtol=1e-6, atol=1e-7)
    assert mv.scores(torch.empty(0, len(FEATURES))).shape == (0,)


def test_bad_versions_are_refused_and_the_active_one_keeps_serving() -> None:
    torch.manual_seed(0)
    good = mlp(len(FEATURES), hidden=(4,)).eval()
    reg = ModelRegistry(torch.device("cpu"))
    reg.register("risk", "v1", FEATURES, ModelFormat.TORCHSCRIPT, torchscript_bytes(good))
    reg.activate("risk", "v1")
    with pytest.raises(InvalidArgument, match="model"):
        reg.register("risk", "v2", FEATURES, ModelFormat.TORCHSCRIPT, b"not a model")
    with pytest.raises(InvalidArgument, match="architecture"):
        reg.register("risk", "v2", FEATURES, ModelFormat.STATE_DICT, st_save(good.state_dict()), arch="nope")
    with pytest.raises(InvalidArgument, match="state_dict"):
        reg.register("risk", "v2", FEATURES, ModelFormat.STATE_DICT, st_save(good.state_dict()), arch="logistic")

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1, keepdim=True) / 0.0 * 0.0  # NaN scores

    with pytest.raises(FailedPrecondition, match="warm-up"):
        reg.register("risk", "v3", FEATURES, ModelFormat.TORCHSCRIPT, torchscript_bytes(Broken()))
    with pytest.raises(AlreadyExists):
        reg.register("risk", "v1", FEATURES, ModelFormat.TORCHSCRIPT, torchscript_bytes(good))
    assert reg.active("risk").version == "v1"
    assert reg.list() == [("risk", ["v1"], "v1")]


def test_activate_and_rollback() -> None:
    reg = ModelRegistry(torch.device("cpu"))
    for v in ("v1", "v2", "v3"):
        reg.register("m", v, FEATURES, ModelFormat.TORCHSCRIPT, torchscript_bytes(mlp(len(FEATURES), hidden=(2,))))
    with pytest.raises(FailedPrecondition):
        reg.active("m")
    reg.activate("m", "v1")
    reg.activate("m", "v2")
    reg.activate("m", "v3")
    assert reg.rollback("m").version == "v2"
    assert reg.rollback("m").version == "v1"
    with pytest.raises(FailedPrecondition, match="roll back"):
        reg.rollback("m")
    with pytest.raises(NotFound):
        reg.activate("m", "v9")


def test_batcher_groups_concurrent_requests_and_keeps_each_answer() -> None:
    torch.manual_seed(0)
    model = mlp(len(FEATURES), hidden=(32,)).eval()

    def run(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(rows))[:, 0].numpy()

    batcher = DynamicBatcher(run, max_batch_size=32, max_queue_delay_s=0.01)
    rng = np.random.default_rng(0)
    requests = [rng.standard_normal((int(rng.integers(1, 4)), len(FEATURES))).astype(np.float32) for _ in range(200)]
    results: list[np.ndarray | None] = [None] * len(requests)

    def client(k: int) -> None:
        for i in range(k, len(requests), 16):
            results[i] = batcher.submit(requests[i]).result(timeout=10)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for req, res in zip(requests, results, strict=True):
        assert res is not None
        np.testing.assert_allclose(res, run(req), rtol=1e-5, atol=1e-6)
    assert batcher.stats.rows == sum(r.shape[0] for r in requests)
    assert batcher.stats.batches < len(requests)  # requests were really grouped
    assert batcher.stats.largest <= 32


def test_batcher_queue_bound_refuses_with_resource_exhausted() -> None:
    gate = threading.Event()

    def slow(rows: np.ndarray) -> np.ndarray:
        gate.wait(10)
        return rows[:, 0]

    batcher = DynamicBatcher(slow, max_batch_size=4, max_queue_delay_s=0.0, max_queue_rows=8)
    first = batcher.submit(np.ones((4, 2), np.float32))
    accepted = []
    with pytest.raises(ResourceExhausted, match="queue full"):
        for _ in range(10):
            accepted.append(batcher.submit(np.ones((4, 2), np.float32)))
    assert 1 <= len(accepted) <= 3
    gate.set()
    assert first.result(timeout=10).shape == (4,)
    for f in accepted:
        assert f.result(timeout=10).shape == (4,)
    with pytest.raises(InvalidArgument, match="rows"):
        batcher.submit(np.ones((5, 2), np.float32))
    batcher.close()


def test_batcher_passes_model_errors_to_every_waiter() -> None:
    def broken(rows: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    batcher = DynamicBatcher(broken, max_batch_size=8, max_queue_delay_s=0.005)
    futures = [batcher.submit(np.ones((1, 2), np.float32)) for _ in range(3)]
    for f in futures:
        with pytest.raises(RuntimeError, match="device lost"):
            f.result(timeout=10)
    batcher.close()


def test_a_lone_request_is_dispatched_at_once_not_after_the_delay() -> None:
    # A delay of a minute: waiting it would run past the result's timeout. The batcher's own record says why
    # it dispatched: nothing else was queued or on its way.
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=64, max_queue_delay_s=60.0)
    for k in range(3):
        assert batcher.submit(np.full((1, 2), k, np.float32)).result(timeout=30).tolist() == [k]
    batcher.close()
    assert batcher.stats.reason_log == ["idle", "idle", "idle"] and batcher.stats.sizes == [1, 1, 1]


def test_announced_callers_are_waited_for_until_the_preferred_size() -> None:
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=8, preferred_batch_size=4, max_queue_delay_s=60.0)
    futures = []
    with contextlib.ExitStack() as callers:
        for _ in range(4):
            callers.enter_context(batcher.arriving())
        for k in range(4):  # each caller "parses", then submits; the worker waits for all four
            futures.append(batcher.submit(np.full((1, 2), k, np.float32)))
    assert [f.result(timeout=30).tolist() for f in futures] == [[0], [1], [2], [3]]
    batcher.close()
    assert batcher.stats.sizes == [4] and batcher.stats.reason_log == ["preferred"]


def test_the_delay_bounds_the_wait_for_a_caller_that_never_comes() -> None:
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=8, max_queue_delay_s=0.05)
    with batcher.arriving():  # announced, never submits
        with batcher.arriving():
            future = batcher.submit(np.ones((1, 2), np.float32))
        assert future.result(timeout=30).tolist() == [1.0]
    batcher.close()
    assert batcher.stats.reason_log == ["delay"]


def test_requests_queued_while_the_model_runs_form_the_next_batch() -> None:
    started, gate = threading.Event(), threading.Event()

    def model(rows: np.ndarray) -> np.ndarray:
        started.set()
        gate.wait(30)
        return rows[:, 0]

    batcher = DynamicBatcher(model, max_batch_size=64, max_queue_delay_s=0.0)
    first = batcher.submit(np.zeros((1, 2), np.float32))
    assert started.wait(30)
    later = [batcher.submit(np.full((1, 2), k, np.float32)) for k in range(1, 6)]
    gate.set()
    assert first.result(timeout=30).tolist() == [0.0]
    assert [f.result(timeout=30).tolist() for f in later] == [[1.0], [2.0], [3.0], [4.0], [5.0]]
    batcher.close()
    assert batcher.stats.sizes == [1, 5]


def test_submit_many_fills_whole_batches() -> None:
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=64, max_queue_delay_s=0.0)
    rows = np.arange(256 * 2, dtype=np.float32).reshape(256, 2)
    scores = np.concatenate([f.result(timeout=30) for f in batcher.submit_many(rows)])
    batcher.close()
    np.testing.assert_array_equal(scores, rows[:, 0])
    assert batcher.stats.sizes == [64, 64, 64, 64]


def _registry_error(module: torch.nn.Module, features: list[str] = FEATURES) -> str:
    reg = ModelRegistry(torch.device("cpu"))
    with pytest.raises(FailedPrecondition) as err:
        reg.register("risk", "v1", features, ModelFormat.TORCHSCRIPT, torchscript_bytes(module))
    assert reg.list() == []  # nothing registered
    return err.value.message


def test_registration_checks_the_output_contract_with_readable_errors() -> None:
    torch.manual_seed(0)
    logits = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    message = _registry_error(logits)
    assert "rule: scores are probabilities" in message and "sigmoid" in message
    two_columns = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 2), torch.nn.Softmax(dim=1))
    assert "rule: one score per row" in _registry_error(two_columns)
    # A model built for 5 inputs registered with 8 features: the TorchScript interpreter's traceback is
    # reduced to its cause, and the message names the features the model must take.
    narrow = torch.nn.Sequential(torch.nn.Linear(5, 1), torch.nn.Sigmoid())
    message = _registry_error(narrow)
    assert "rule: input width" in message and "(rows, 8)" in message and "f0, f1" in message
    assert "Traceback" not in message and "\n" not in message and len(message) < 700
    # A sigmoid model passes, also on rows far from zero.
    reg = ModelRegistry(torch.device("cpu"))
    reg.register("risk", "v1", FEATURES, ModelFormat.TORCHSCRIPT, torchscript_bytes(mlp(len(FEATURES), hidden=(4,))))


def test_an_arrival_ends_when_its_rows_are_queued() -> None:
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=4, max_queue_delay_s=60.0, max_queue_rows=8)
    with batcher.arriving() as arrival:
        assert batcher.incoming == 1
        futures = batcher.submit_many(np.ones((6, 2), np.float32), arrival)
        assert arrival.done and batcher.incoming == 0  # the worker need not wait for this caller any more
    assert [f.result(timeout=30).shape for f in futures] == [(4,), (2,)]
    started, gate = threading.Event(), threading.Event()

    def held(rows: np.ndarray) -> np.ndarray:
        started.set()
        gate.wait(30)
        return rows[:, 0]

    blocked = DynamicBatcher(held, max_batch_size=4, max_queue_rows=8)
    running = blocked.submit(np.ones((4, 2), np.float32))  # taken by the worker, which waits on the gate
    assert started.wait(30)
    queued = blocked.submit_many(np.ones((4, 2), np.float32))
    with blocked.arriving() as arrival, pytest.raises(ResourceExhausted):  # refused: nothing more queued
        blocked.submit_many(np.ones((5, 2), np.float32), arrival)
    assert blocked.incoming == 0 and blocked.queued_rows == 4
    gate.set()
    assert running.result(timeout=30).shape == (4,) and queued[0].result(timeout=30).shape == (4,)
    blocked.close()
    batcher.close()


def test_more_rows_than_the_queue_bound_are_invalid_not_retryable() -> None:
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=4, max_queue_rows=8)
    with pytest.raises(InvalidArgument, match=r"rows: at most 8 rows at once, the queue bound \(got 9\)"):
        batcher.submit_many(np.ones((9, 2), np.float32))
    assert batcher.queued_rows == 0 and batcher.stats.batches == 0
    batcher.close()


class FullDiskStore(RegistryStore):
    """Stand-in for a registry folder on a full disk: every registration write fails as the OS would."""

    def save_registration(self, registration: Registration, *, seq: int | None = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_version_whose_record_cannot_be_written_is_not_served(tmp_path: Path) -> None:
    settings = load_config(env={}).scorer
    core = Scorer(settings, torch.device("cpu"), FullDiskStore(tmp_path / "models"))
    config = VersionConfig(ThresholdPolicy(), (), CleaningPolicy.IMPUTE, 0.02, None, 0.05, 1000)
    payload = torchscript_bytes(mlp(len(FEATURES), hidden=(4,)).eval())
    registration = Registration("risk", "v1", tuple(FEATURES), ModelFormat.TORCHSCRIPT, payload, config)
    with pytest.raises(OSError, match="No space left"):
        core.register(registration, activate=True)
    assert core.model_lines() == [] and core.registry.list() == []
    with pytest.raises(NotFound):
        core.score("risk", "r1", dict.fromkeys(FEATURES, 0.0), version="v1")
    # With room on the disk again, the same version registers.
    core.store = RegistryStore(tmp_path / "models")
    assert core.register(registration, activate=True).active
    assert [r.version for r in core.store.registrations()] == ["v1"]
    core.close()


class ActiveWriteFails(RegistryStore):
    """Stand-in for a registry folder whose active-versions file can no longer be written (full disk)."""

    def save_active(self, active: dict[str, tuple[str, list[str]]]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_activation_that_cannot_be_recorded_changes_nothing(tmp_path: Path) -> None:
    settings = load_config(env={}).scorer
    store = RegistryStore(tmp_path / "models")
    core = Scorer(settings, torch.device("cpu"), store)
    config = VersionConfig(ThresholdPolicy(), (), CleaningPolicy.IMPUTE, 0.02, None, 0.05, 1000)
    for version in ("v1", "v2"):
        payload = torchscript_bytes(mlp(len(FEATURES), hidden=(4,)).eval())
        core.register(Registration("risk", version, tuple(FEATURES), ModelFormat.TORCHSCRIPT, payload, config))
    core.activate("risk", "v1")
    core.activate("risk", "v2")
    core.store = ActiveWriteFails(tmp_path / "models")
    with pytest.raises(OSError, match="No space left"):
        core.rollback("risk")
    with pytest.raises(OSError, match="No space left"):
        core.activate("risk", "v1")
    assert core.registry.active("risk").version == "v2" and core.registry.lines["risk"].history == ["v1"]
    assert core.score("risk", "r1", dict.fromkeys(FEATURES, 0.0)).version == "v2"
    assert store.active() == {"risk": ("v2", ["v1"])}  # what was recorded is what serves
    core.close()
