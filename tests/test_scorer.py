"""The scorer over real gRPC with real PyTorch models: decisions, drift-aware thresholds, explanations,
missing values, feedback-driven rollback, and bad input."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from inference import grpc_predict_v2_pb2 as oip
from inference import grpc_predict_v2_pb2_grpc as oip_grpc

from .conftest import make_config

FEATURES = ["amount", "velocity", "age_days", "foreign"]


def logistic(weights: list[float], bias: float) -> torch.nn.Module:
    layer = torch.nn.Linear(len(weights), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.bias.fill_(bias)
    return torch.nn.Sequential(layer, torch.nn.Sigmoid()).eval()


def torchscript(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def tensor(rows: np.ndarray) -> common_pb2.Tensor:
    arr = np.ascontiguousarray(rows, dtype="<f4")
    return common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=list(arr.shape), data=arr.tobytes())


@pytest.fixture
def scorer(tmp_path: Path) -> Iterator[tuple[RunningService, MeshConfig, pb_grpc.ScorerServiceStub]]:
    config = make_config(tmp_path, **{"services.scorer.port": 0, "scorer.drift_every": 20, "scorer.min_labels": 50})
    running = start_service(load_definition("scorer"), config, port=0)
    channel = open_channel("scorer", config, address=running.address)
    yield running, config, pb_grpc.ScorerServiceStub(channel)
    channel.close()
    running.stop(grace=0.5)


def reference_rows(n: int = 2000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, len(FEATURES))).astype(np.float32)


def register(
    stub: pb_grpc.ScorerServiceStub, version: str, model: torch.nn.Module, **kw: object
) -> pb.RegisterModelResponse:
    return stub.RegisterModel(
        pb.RegisterModelRequest(
            model="risk",
            version=version,
            features=FEATURES,
            format=pb.MODEL_FORMAT_TORCHSCRIPT,
            payload=torchscript(model),
            reference=tensor(reference_rows()),
            **kw,  # type: ignore[arg-type]
        )
    )


def score(stub: pb_grpc.ScorerServiceStub, rid: str, row: np.ndarray, **kw: object) -> pb.ScoreResponse:
    return stub.Score(
        pb.ScoreRequest(model="risk", request_id=rid, features=dict(zip(FEATURES, map(float, row), strict=True)), **kw)  # type: ignore[arg-type]
    )


def test_decision_path_threshold_and_explanation(scorer) -> None:  # type: ignore[no-untyped-def]
    _, _, stub = scorer
    model = logistic([2.0, 1.0, -0.5, 0.0], -0.2)
    resp = register(
        stub,
        "v1",
        model,
        activate=True,
        threshold=pb.ThresholdConfig(base=0.6, k=0.3),
        rules=[pb.ScoringRule(name="huge-amount", feature="amount", limit=5.0, block=True)],
    )
    assert resp.device in ("cpu", "cuda") or resp.device.startswith("cuda")
    row = np.array([0.5, 0.2, 1.0, 3.0], dtype=np.float32)
    out = score(stub, "r1", row, explain=True, experiment="exp-1", arm="b")
    expected = float(model(torch.from_numpy(row[None, :])).detach()[0, 0])
    assert out.score == pytest.approx(expected, rel=1e-5)
    assert out.threshold == pytest.approx(0.6) and out.decision == (expected >= 0.6)
    assert out.path == "model:risk:v1@threshold=0.6000" and out.model_version == "v1"
    # Exact SHAP for a logistic model: w_i * (x_i - reference mean_i), in log-odds.
    ref_mean = reference_rows().astype(np.float64).mean(axis=0)
    got = {a.feature: a.attribution for a in out.attributions}
    for i, f in enumerate(FEATURES):
        assert got[f] == pytest.approx([2.0, 1.0, -0.5, 0.0][i] * (row[i] - ref_mean[i]), abs=1e-4)
    assert out.attribution_method == "linear_shap"
    ruled = score(stub, "r2", np.array([9.0, 0, 0, 0], dtype=np.float32))
    assert ruled.path == "rule:huge-amount" and ruled.decision and ruled.model_version == ""


def test_drift_lowers_the_threshold_and_reports_per_feature(scorer) -> None:  # type: ignore[no-untyped-def]
    _, _, stub = scorer
    register(stub, "v1", logistic([1.0, 0, 0, 0], 0.0), activate=True, threshold=pb.ThresholdConfig(base=0.5, k=0.3))
    rng = np.random.default_rng(1)
    for i in range(200):
        score(stub, f"a{i}", rng.standard_normal(4).astype(np.float32))
    calm = stub.GetDriftReport(pb.GetDriftReportRequest(model="risk"))
    assert calm.drift_score < 0.3 and calm.threshold > 0.45
    shifted = rng.standard_normal((1000, 4)).astype(np.float32)
    shifted[:, 1] += 3.8  # the shopping-festival shift, on "velocity"
    for i, row in enumerate(shifted):
        last = score(stub, f"b{i}", row)
    report = stub.GetDriftReport(pb.GetDriftReportRequest(model="risk"))
    by_feature = {f.feature: f for f in report.features}
    assert by_feature["velocity"].ks_statistic > 0.8 and by_feature["velocity"].psi > 1.0
    assert by_feature["amount"].ks_statistic < 0.1
    assert report.drift_score > 0.5
    assert report.threshold == pytest.approx(0.5 * (1 - 0.3 * report.drift_score), rel=1e-6)
    assert last.threshold < 0.45 and last.drift_score > 0.5  # decisions used the adapted threshold


def test_missing_values_alert_and_imputation_or_rejection(scorer) -> None:  # type: ignore[no-untyped-def]
    _, _, stub = scorer
    register(stub, "v1", logistic([1.0, 1.0, 0, 0], 0.0), activate=True)
    rng = np.random.default_rng(2)
    for i in range(100):
        row = rng.standard_normal(4).astype(np.float32)
        features = dict(zip(FEATURES, map(float, row), strict=True))
        if i % 10 == 0:
            del features["velocity"]  # 10% missing > 2%
        out = stub.Score(pb.ScoreRequest(model="risk", request_id=f"m{i}", features=features))
        assert out.imputed == (i % 10 == 0)
    events = stub.ListScorerEvents(pb.ListScorerEventsRequest(model="risk")).events
    assert any(e.kind == "missing_alert" and "velocity" in e.message for e in events)
    register(stub, "v2", logistic([1.0, 1.0, 0, 0], 0.0), activate=False, cleaning=pb.CLEANING_POLICY_REJECT)
    stub.ActivateModel(pb.ActivateModelRequest(model="risk", version="v2"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(pb.ScoreRequest(model="risk", request_id="x", features={"amount": 1.0}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "features[" in err.value.details()


def test_f1_drop_rolls_back_to_the_previous_version(scorer) -> None:  # type: ignore[no-untyped-def]
    _, _, stub = scorer
    good = logistic([3.0, 0, 0, 0], 0.0)  # the label is "amount > 0"
    register(stub, "v1", good, activate=True)
    register(stub, "v2", good)
    stub.ActivateModel(pb.ActivateModelRequest(model="risk", version="v2"))
    rng = np.random.default_rng(3)

    def round_(prefix: str, n: int, flipped: bool) -> pb.FeedbackResponse:
        rows = rng.standard_normal((n, 4)).astype(np.float32)
        for i, row in enumerate(rows):
            score(stub, f"{prefix}{i}", row)
        labels = [pb.Label(request_id=f"{prefix}{i}", label=bool(row[0] > 0) != flipped) for i, row in enumerate(rows)]
        return stub.Feedback(pb.FeedbackRequest(model="risk", labels=labels))

    first = round_("a", 60, flipped=False)  # 60 >= min_labels: v2's F1 baseline is fixed near 1
    assert first.accepted == 60 and first.f1 > 0.9 and not first.rolled_back and first.active_version == "v2"
    models = stub.ListModels(pb.ListModelsRequest()).models[0]
    assert {v.version: v.baseline_f1 for v in models.versions}["v2"] > 0.9
    # The world changes (the label now follows the opposite rule): v2's rolling F1 collapses.
    outcome = None
    for k in range(6):
        outcome = round_(f"b{k}", 20, flipped=True)
        if outcome.rolled_back:
            break
    assert outcome is not None and outcome.rolled_back and outcome.active_version == "v1"
    events = stub.ListScorerEvents(pb.ListScorerEventsRequest(model="risk")).events
    rollback = [e for e in events if e.kind == "rollback"]
    assert len(rollback) == 1 and "v2 -> v1" in rollback[0].message and "below its baseline" in rollback[0].message
    assert score(stub, "after", np.zeros(4, dtype=np.float32)).model_version == "v1"
    unknown = stub.Feedback(pb.FeedbackRequest(model="risk", labels=[pb.Label(request_id="nope", label=True)]))
    assert unknown.unknown == 1 and unknown.accepted == 0


def test_bad_input_gets_clear_statuses_and_active_model_unaffected(scorer) -> None:  # type: ignore[no-untyped-def]
    _, _, stub = scorer
    register(stub, "v1", logistic([1.0, 0, 0, 0], 0.0), activate=True)
    cases = [
        (
            pb.ScoreRequest(model="risk", request_id="a", features={"nope": 1.0}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features[nope]",
        ),
        (
            pb.ScoreRequest(model="risk", request_id="a", features={"amount": float("inf")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
        (
            pb.ScoreRequest(model="risk", request_id="", features={"amount": 1.0}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id",
        ),
        (pb.ScoreRequest(model="nope", request_id="a", features={}), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            pb.ScoreRequest(model="risk", request_id="a", features={"amount": 1.0}, version="v9"),
            grpc.StatusCode.NOT_FOUND,
            "v9",
        ),
    ]
    for req, code, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(req)
        assert err.value.code() == code and needle in err.value.details(), err.value.details()
    bad_models = [
        (
            pb.RegisterModelRequest(
                model="risk", version="v2", features=FEATURES, format=pb.MODEL_FORMAT_TORCHSCRIPT, payload=b"junk"
            ),
            "model",
        ),
        (
            pb.RegisterModelRequest(
                model="risk", version="v2", features=FEATURES, format=pb.MODEL_FORMAT_UNSPECIFIED, payload=b"x"
            ),
            "format",
        ),
        (
            pb.RegisterModelRequest(
                model="risk", version="v2", features=["a", "a"], format=pb.MODEL_FORMAT_TORCHSCRIPT, payload=b"x"
            ),
            "features",
        ),
        (
            pb.RegisterModelRequest(
                model="risk",
                version="v2",
                features=FEATURES,
                format=pb.MODEL_FORMAT_TORCHSCRIPT,
                payload=torchscript(logistic([1, 0, 0, 0], 0)),
                threshold=pb.ThresholdConfig(base=2.0),
            ),
            "threshold.base",
        ),
        (
            pb.RegisterModelRequest(
                model="risk",
                version="v1",
                features=FEATURES,
                format=pb.MODEL_FORMAT_TORCHSCRIPT,
                payload=torchscript(logistic([1, 0, 0, 0], 0)),
            ),
            "v1",
        ),
    ]
    for req, needle in bad_models:
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterModel(req)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
        assert needle in err.value.details()
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.model, m.active_version, [v.version for v in m.versions]) for m in models] == [("risk", "v1", ["v1"])]
    ok = score(stub, "fine", np.zeros(4, dtype=np.float32))
    assert ok.model_version == "v1"


def test_score_batch_and_concurrent_clients_share_batches(scorer) -> None:  # type: ignore[no-untyped-def]
    import threading

    running, _, stub = scorer
    model = logistic([1.0, -1.0, 0.5, 0.0], 0.1)
    register(stub, "v1", model, activate=True)
    rows = np.random.default_rng(4).standard_normal((64, 4)).astype(np.float32)
    batch = stub.ScoreBatch(
        pb.ScoreBatchRequest(
            requests=[
                pb.ScoreRequest(
                    model="risk", request_id=f"s{i}", features=dict(zip(FEATURES, map(float, r), strict=True))
                )
                for i, r in enumerate(rows)
            ]
            + [pb.ScoreRequest(model="risk", request_id="bad", features={"nope": 1.0})]
        )
    )
    assert [r.WhichOneof("result") for r in batch.results] == ["response"] * 64 + ["error"]
    expected = model(torch.from_numpy(rows))[:, 0].detach().numpy()
    np.testing.assert_allclose([r.response.score for r in batch.results[:64]], expected, rtol=1e-5)
    core = running.binding.servicer.core  # type: ignore[attr-defined]
    stats = core.batch_stats("risk", "v1")
    assert stats.rows == 64 and stats.sizes == [64]  # the ScoreBatch call's rows went as one batch

    def concurrent_round(n: int) -> list[int]:
        """64 single-row Score calls from 16 threads started together; the sizes of the batches they made."""
        results: dict[int, float] = {}
        start = threading.Barrier(16)

        def client(k: int) -> None:
            start.wait()
            for i in range(k, 64, 16):
                results[i] = score(stub, f"c{n}-{i}", rows[i]).score

        first = len(stats.sizes)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_allclose([results[i] for i in range(64)], expected, rtol=1e-5)
        return stats.sizes[first:]

    # Concurrent requests share batches: a round whose calls all ran alone can happen on a loaded machine
    # (each caller finding the batcher idle), so rounds repeat until one shares, 20 rounds at most.
    rounds = []
    for n in range(20):
        rounds.append(concurrent_round(n))
        assert sum(rounds[-1]) == 64  # every call scored once
        if max(rounds[-1]) > 1:
            break
    assert max(rounds[-1]) > 1, f"no two concurrent Score calls ever shared a batch: {rounds}"


def test_open_inference_protocol_serves_the_active_version(scorer) -> None:  # type: ignore[no-untyped-def]
    running, config, stub = scorer
    model = logistic([1.0, 2.0, -1.0, 0.5], 0.0)
    register(stub, "v1", model, activate=True)
    rows = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    channel = open_channel("scorer", config, address=running.address)
    oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name="risk", version="v1")).ready
    meta = oip_stub.ModelMetadata(oip.ModelMetadataRequest(name="risk"))
    assert list(meta.versions)[-1] == "v1" and meta.inputs[0].name == "features"
    request = oip.ModelInferRequest(model_name="risk")
    tensor_in = request.inputs.add()
    tensor_in.name, tensor_in.datatype = "features", "FP32"
    tensor_in.shape.extend([3, 4])
    request.raw_input_contents.append(rows.tobytes())
    resp = oip_stub.ModelInfer(request)
    scores = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    np.testing.assert_allclose(scores, model(torch.from_numpy(rows))[:, 0].detach().numpy(), rtol=1e-6)
    assert resp.model_version == "v1"
    channel.close()


def test_registered_versions_and_the_active_one_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"services.scorer.port": 0})
    running = start_service(load_definition("scorer"), config, port=0)
    channel = open_channel("scorer", config, address=running.address)
    stub = pb_grpc.ScorerServiceStub(channel)
    register(stub, "v1", logistic([1.0, 0.0, 0.0, 0.0], 0.0), activate=True)
    register(stub, "v2", logistic([-1.0, 0.0, 0.0, 0.0], 0.0))
    stub.ActivateModel(pb.ActivateModelRequest(model="risk", version="v2"))
    before = score(stub, "a", np.array([2.0, 0.0, 0.0, 0.0]))
    channel.close()
    running.stop(grace=0.5)
    running = start_service(load_definition("scorer"), config, port=0)
    channel = open_channel("scorer", config, address=running.address)
    stub = pb_grpc.ScorerServiceStub(channel)
    try:
        [line] = stub.ListModels(pb.ListModelsRequest()).models
        assert line.active_version == "v2" and [v.version for v in line.versions] == ["v1", "v2"]
        after = score(stub, "b", np.array([2.0, 0.0, 0.0, 0.0]))
        assert after.model_version == "v2" and after.score == pytest.approx(before.score)
        stub.RollbackModel(pb.RollbackModelRequest(model="risk"))
    finally:
        channel.close()
        running.stop(grace=0.5)
    running = start_service(load_definition("scorer"), config, port=0)
    try:
        with open_channel("scorer", config, address=running.address) as ch:
            [line] = pb_grpc.ScorerServiceStub(ch).ListModels(pb.ListModelsRequest()).models
            assert line.active_version == "v1"  # the rollback was recorded too
    finally:
        running.stop(grace=0.5)


def _rows_request(rows: np.ndarray, prefix: str, **kw: object) -> pb.ScoreBatchRequest:
    return pb.ScoreBatchRequest(
        requests=[
            pb.ScoreRequest(
                model="risk",
                request_id=f"{prefix}{i}",
                features={f: float(v) for f, v in zip(FEATURES, r, strict=True) if not np.isnan(v)},
                **kw,  # type: ignore[arg-type]
            )
            for i, r in enumerate(rows)
        ]
    )


def test_score_batch_of_256_rows_is_four_model_runs_with_the_same_answers(scorer) -> None:  # type: ignore[no-untyped-def]
    running, _, stub = scorer
    model = logistic([1.0, -1.0, 0.5, 0.0], 0.1)
    register(
        stub, "v1", model, activate=True, rules=[pb.ScoringRule(name="big", feature="amount", limit=2.0, block=True)]
    )
    rows = np.random.default_rng(6).standard_normal((256, 4)).astype(np.float32)
    batch = stub.ScoreBatch(_rows_request(rows, "b"))
    core = running.binding.servicer.core  # type: ignore[attr-defined]
    stats = core.batch_stats("risk", "v1")
    ruled = int((rows[:, 0] > 2.0).sum())
    assert ruled > 0
    # One model run per max_batch_size (64) of the rows the rules left to the model.
    assert stats.rows == 256 - ruled and stats.batches == -(-(256 - ruled) // 64)
    assert stats.sizes[:-1] == [64] * (stats.batches - 1)
    expected = model(torch.from_numpy(rows))[:, 0].detach().numpy()
    for row, result, want in zip(rows, batch.results, expected, strict=True):
        r = result.response
        if row[0] > 2.0:
            assert r.path == "rule:big" and r.decision and r.model_version == ""
        else:
            assert r.score == pytest.approx(float(want), rel=1e-5) and r.model_version == "v1"
    assert core.live_rows("risk").shape == (256, 4)  # every row is in the drift window, once


def _burst(
    stub: pb_grpc.ScorerServiceStub, requests: list[pb.ScoreRequest], clients: int
) -> dict[str, pb.ScoreResponse]:
    """Send ``requests`` from ``clients`` threads released together; the answers by request id."""
    import threading

    got: dict[str, pb.ScoreResponse] = {}
    go = threading.Barrier(clients)

    def client(k: int) -> None:
        go.wait()
        for r in requests[k::clients]:
            got[r.request_id] = stub.Score(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_a_burst_of_concurrent_calls_decides_exactly_as_the_same_calls_one_by_one(tmp_path: Path) -> None:
    model = logistic([1.5, -1.0, 0.5, 0.25], -0.1)
    rng = np.random.default_rng(7)
    warm = rng.standard_normal((100, 4)).astype(np.float32)
    warm[:, 1] += 1.0  # drifted: the threshold in force is below its base
    burst = rng.standard_normal((96, 4)).astype(np.float32)
    burst[::7, 2] = np.nan  # missing: imputed from the reference median
    burst[::11, 0] = 4.0  # rule-decided
    servers = []
    answers: list[dict[str, pb.ScoreResponse]] = []
    for mode in ("one_by_one", "burst"):
        config = make_config(tmp_path / mode, **{"services.scorer.port": 0, "scorer.drift_every": 100})
        running = start_service(load_definition("scorer"), config, port=0)
        channel = open_channel("scorer", config, address=running.address)
        stub = pb_grpc.ScorerServiceStub(channel)
        servers.append((running, channel))
        register(
            stub,
            "v1",
            model,
            activate=True,
            rules=[pb.ScoringRule(name="big", feature="amount", limit=3.0, block=True)],
        )
        stub.ScoreBatch(_rows_request(warm, "w"))  # 100 rows: drift is computed once, then not during the burst
        requests = _rows_request(burst, "r").requests
        got: dict[str, pb.ScoreResponse] = {}
        if mode == "one_by_one":
            for r in requests:
                got[r.request_id] = stub.Score(r)
        else:
            got = _burst(stub, list(requests), clients=16)
        answers.append(got)
    cores = [running.binding.servicer.core for running, _ in servers]  # type: ignore[attr-defined]
    try:
        sequential, concurrent = answers
        assert sequential.keys() == concurrent.keys() and len(sequential) == 96
        assert any(r.path.startswith("rule:") for r in sequential.values())
        assert any(r.imputed for r in sequential.values())
        assert 0 < sequential["r1"].threshold < 0.5  # the drifted threshold, not the base
        for rid, one in sequential.items():
            other = concurrent[rid]
            assert (other.decision, other.path, other.model_version, other.imputed) == (
                one.decision,
                one.path,
                one.model_version,
                one.imputed,
            ), rid
            assert other.threshold == one.threshold and other.drift_score == one.drift_score
            assert other.score == pytest.approx(one.score, rel=1e-6, abs=1e-7)
        # The drift windows hold the same rows (as sent, NaN = missing), whatever order they arrived in.
        windows = [np.nan_to_num(core.live_rows("risk"), nan=-1e9) for core in cores]
        assert windows[0].shape == (196, 4)
        np.testing.assert_array_equal(*(w[np.lexsort(w.T[::-1])] for w in windows))
        # The decision logs hold the same decisions: labels for every request are matched on both.
        reports = [
            pb_grpc.ScorerServiceStub(channel).Feedback(
                pb.FeedbackRequest(model="risk", labels=[pb.Label(request_id=rid, label=True) for rid in sequential])
            )
            for _, channel in servers
        ]
        assert reports[0].accepted == reports[1].accepted == sum(1 for r in sequential.values() if r.model_version)
        assert (reports[0].precision, reports[0].recall) == (reports[1].precision, reports[1].recall)
    finally:
        for running, channel in servers:
            channel.close()
            running.stop(grace=0.5)


def _infer(
    oip_stub: oip_grpc.GRPCInferenceServiceStub, rows: np.ndarray, request_id: str = ""
) -> oip.ModelInferResponse:
    request = oip.ModelInferRequest(model_name="risk", id=request_id)
    tensor_in = request.inputs.add()
    tensor_in.name, tensor_in.datatype = "features", "FP32"
    tensor_in.shape.extend(rows.shape)
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype="<f4").tobytes())
    return oip_stub.ModelInfer(request)


def test_open_inference_protocol_goes_through_rules_drift_and_the_decision_log(scorer) -> None:  # type: ignore[no-untyped-def]
    running, config, stub = scorer
    model = logistic([1.0, 0.5, 0.0, 0.0], 0.0)
    register(
        stub,
        "v1",
        model,
        activate=True,
        threshold=pb.ThresholdConfig(base=0.5, k=0.3),
        rules=[pb.ScoringRule(name="huge-amount", feature="amount", limit=6.0, block=True)],
    )
    channel = open_channel("scorer", config, address=running.address)
    oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(8)
    shifted = rng.standard_normal((600, 4)).astype(np.float32)
    shifted[:, 1] += 3.8  # the shopping-festival shift, through OIP only
    shifted[5, 0] = 9.0  # a rule decides this row
    for k in range(10):
        resp = _infer(oip_stub, shifted[k * 60 : (k + 1) * 60], request_id=f"oip{k}")
        outputs = {o.name: i for i, o in enumerate(resp.outputs)}
        assert list(outputs) == ["score", "decision", "threshold", "path", "request_id"]
        scores = np.frombuffer(resp.raw_output_contents[outputs["score"]], dtype="<f4")
        decisions = np.frombuffer(resp.raw_output_contents[outputs["decision"]], dtype="?")
        if k == 0:
            assert np.isnan(scores[5]) and decisions[5]  # the rule decided, the model did not score
            expected = model(torch.from_numpy(shifted[:60]))[:, 0].detach().numpy()
            keep = np.arange(60) != 5
            np.testing.assert_allclose(scores[keep], expected[keep], rtol=1e-5)
    report = stub.GetDriftReport(pb.GetDriftReportRequest(model="risk"))
    by_feature = {f.feature: f for f in report.features}
    assert report.live_rows == 600 and report.drift_score > 0.5 and by_feature["velocity"].ks_statistic > 0.8
    assert report.threshold < 0.45  # the threshold moved with the drift the OIP rows caused
    last = np.frombuffer(resp.raw_output_contents[outputs["threshold"]], dtype="<f4")
    assert np.all(last < 0.5)  # and OIP decisions used it
    # Decisions are in the decision log under "<id>/<row>": labels sent through Feedback find them.
    labels = [pb.Label(request_id=f"oip{k}/{i}", label=True) for k in range(10) for i in range(60)]
    fed = stub.Feedback(pb.FeedbackRequest(model="risk", labels=labels))
    assert fed.accepted == 599 and fed.unknown == 1  # the rule-decided row is not a model decision
    # A row with an infinite value refuses the whole request, naming the row and feature; nothing is recorded.
    bad = np.zeros((3, 4), np.float32)
    bad[2, 3] = np.inf
    with pytest.raises(grpc.RpcError) as err:
        _infer(oip_stub, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "row 2 features[foreign]" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # more rows than the queue can ever hold: not retryable
        _infer(oip_stub, np.zeros((4097, 4), np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4096 rows" in err.value.details()
    assert stub.GetDriftReport(pb.GetDriftReportRequest(model="risk")).live_rows == 600
    channel.close()


def test_tritonclient_discovers_features_repository_and_statistics(scorer) -> None:  # type: ignore[no-untyped-def]
    from .test_scorer_oip import triton

    running, _, stub = scorer
    register(stub, "v1", logistic([1.0, 0, 0, 0], 0.0))
    register(stub, "v2", logistic([0.5, 0, 0, 0], 0.0), activate=True)
    rows = np.random.default_rng(9).standard_normal((5, 4)).astype(np.float32)
    config, index, infer, refused, stats, unknown = triton(
        running.address,
        {"call": "get_model_config", "model": "risk"},
        {"call": "get_model_repository_index"},
        {"call": "infer", "model": "risk", "inputs": [{"name": "features", "datatype": "FP32", "data": rows.tolist()}]},
        {"call": "infer", "model": "risk", "inputs": [{"name": "features", "datatype": "FP32", "data": [[1.0] * 3]}]},
        {"call": "get_inference_statistics", "model": "risk"},
        {"call": "get_model_config", "model": "nope"},
    )
    c = config["ok"]
    assert json.loads(c["parameters"]["feature_names"]) == FEATURES
    assert c["max_batch_size"] == 64 and c["platform"] == "pytorch_libtorch"
    assert c["inputs"] == [{"name": "features", "data_type": 11, "dims": [4]}]  # TYPE_FP32, batch dim left out
    assert [o["name"] for o in c["outputs"]] == ["score", "decision", "threshold", "path", "request_id"]
    assert index["ok"] == [
        {"name": "risk", "version": "v1", "state": "READY", "reason": ""},
        {"name": "risk", "version": "v2", "state": "READY", "reason": "default"},
    ]
    answer = infer["ok"]
    assert answer["model_version"] == "v2" and answer["outputs"]["path"]["data"][0].startswith("model:risk:v2@")
    assert [rid.rsplit("/", 1)[1] for rid in answer["outputs"]["request_id"]["data"]] == ["0", "1", "2", "3", "4"]
    by_version = {s["version"]: s for s in stats["ok"]}
    assert by_version["v2"]["inference_count"] == 5 and by_version["v2"]["execution_count"] == 1
    assert refused["error"]["status"] == "StatusCode.INVALID_ARGUMENT"  # 3 columns for 4 features
    assert refused["error"]["message"].endswith(
        'does not match the model\'s [-1, 4] (columns: feature_names ["amount", "velocity", "age_days", "foreign"])'
    )
    assert by_version["v2"]["success"] == 1 and by_version["v2"]["fail"] == 1
    assert by_version["v2"]["batch_stats"] == {"5": 1}
    assert by_version["v1"]["inference_count"] == 0 and by_version["v1"]["last_inference"] == 0
    assert unknown["error"]["status"] == "StatusCode.NOT_FOUND"


def test_registration_refuses_logits_and_wrong_widths_and_scoring_names_the_features(scorer) -> None:  # type: ignore[no-untyped-def]
    from guardmesh.sdk.scorer import ScorerClient

    running, _, stub = scorer
    logits = torch.nn.Linear(4, 1)  # no sigmoid: scores outside [0, 1]
    with pytest.raises(grpc.RpcError) as err:
        register(stub, "v1", logits, activate=True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rule: scores are probabilities" in err.value.details()
    wide = torch.nn.Sequential(torch.nn.Linear(6, 1), torch.nn.Sigmoid())
    with pytest.raises(grpc.RpcError) as err:
        register(stub, "v1", wide, activate=True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "rule: input width" in details and "amount, velocity, age_days, foreign" in details
    assert "Traceback" not in details
    assert stub.ListModels(pb.ListModelsRequest()).models == []  # nothing half-registered
    register(stub, "v1", logistic([1.0, 0, 0, 0], 0.0), activate=True)
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(pb.ScoreRequest(model="risk", request_id="a", features={"amount": 1.0, "speed": 2.0}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features[speed]" in err.value.details() and "4 features: amount, velocity, age_days, foreign" in (
        err.value.details()
    )
    with ScorerClient(address=running.address) as client:
        with pytest.raises(TypeError, match=r"features: must be a mapping of feature name to value.*got a list"):
            client.score("risk", [1.0, 2.0, 3.0, 4.0])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"features\[amount\]: must be a number"):
            client.score("risk", {"amount": "high"})  # type: ignore[dict-item]
        assert client.score("risk", {"amount": 1.0}).model_version == "v1"


def test_a_registry_folder_in_the_old_format_is_migrated(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"services.scorer.port": 0})
    folder = config.state_path(config.scorer.registry_dir)
    folder.mkdir(parents=True)
    # What the scorer used to write: the RegisterModelRequest itself, and the active versions.
    for seq, (version, weights) in enumerate((("v1", [1.0, 0, 0, 0]), ("v2", [-1.0, 0, 0, 0])), start=1):
        old = pb.RegisterModelRequest(
            model="risk",
            version=version,
            features=FEATURES,
            format=pb.MODEL_FORMAT_TORCHSCRIPT,
            payload=torchscript(logistic(weights, 0.0)),
            reference=tensor(reference_rows(50)),
            threshold=pb.ThresholdConfig(base=0.7),
            rules=[pb.ScoringRule(name="huge", feature="amount", limit=5.0, block=True)],
        )
        (folder / f"{seq:08d}-{b'risk'.hex()}-{version.encode().hex()}.pb").write_bytes(old.SerializeToString())
    (folder / "active.json").write_text('{"risk": {"active": "v2", "history": ["v1"]}}')
    running = start_service(load_definition("scorer"), config, port=0)
    try:
        with open_channel("scorer", config, address=running.address) as channel:
            stub = pb_grpc.ScorerServiceStub(channel)
            [line] = stub.ListModels(pb.ListModelsRequest()).models
            assert line.active_version == "v2" and [v.version for v in line.versions] == ["v1", "v2"]
            out = score(stub, "a", np.array([2.0, 0.0, 0.0, 0.0]))
            assert out.model_version == "v2" and out.threshold == pytest.approx(0.7)
            assert score(stub, "b", np.array([9.0, 0.0, 0.0, 0.0])).path == "rule:huge"
            assert stub.RollbackModel(pb.RollbackModelRequest(model="risk")).active_version == "v1"
    finally:
        running.stop(grace=0.5)
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.pb.migrated")) == ["00000001", "00000002"]
    assert not list(folder.glob("*.pb"))
    assert sorted(p.name.split("-")[0] for p in folder.iterdir() if p.is_dir()) == ["00000001", "00000002"]
    record = json.loads(next(folder.glob("00000001-*/registration.json")).read_text())
    assert record["model"] == "risk" and record["threshold"]["base"] == pytest.approx(0.7)
    # A crash between writing the new record and setting the old file aside: the restart only sets it aside.
    first = next(folder.glob("00000001-*.pb.migrated"))
    first.rename(first.with_name(first.name.removesuffix(".migrated")))
    # A restart reads the new records only, and still has the rollback.
    running = start_service(load_definition("scorer"), config, port=0)
    try:
        with open_channel("scorer", config, address=running.address) as channel:
            [line] = pb_grpc.ScorerServiceStub(channel).ListModels(pb.ListModelsRequest()).models
            assert line.active_version == "v1" and [v.version for v in line.versions] == ["v1", "v2"]
    finally:
        running.stop(grace=0.5)
    assert not list(folder.glob("*.pb")) and len([p for p in folder.iterdir() if p.is_dir()]) == 2


def test_a_lone_score_call_is_not_held_for_the_queue_delay(tmp_path: Path) -> None:
    # A one-minute delay: a call held for it would run past the call's deadline.
    config = make_config(tmp_path, **{"services.scorer.port": 0, "scorer.max_queue_delay_ms": 60_000.0})
    running = start_service(load_definition("scorer"), config, port=0)
    try:
        with open_channel("scorer", config, address=running.address) as channel:
            stub = pb_grpc.ScorerServiceStub(channel)
            register(stub, "v1", logistic([1.0, 0, 0, 0], 0.0), activate=True)
            for i in range(3):
                request = pb.ScoreRequest(model="risk", request_id=f"a{i}", features={"amount": float(i)})
                assert stub.Score(request, timeout=30).model_version == "v1"
            stub.ScoreBatch(_rows_request(reference_rows(10), "b"), timeout=30)
        stats = running.binding.servicer.core.batch_stats("risk", "v1")  # type: ignore[attr-defined]
        assert stats.reason_log == ["idle"] * 4 and stats.sizes == [1, 1, 1, 10]
    finally:
        running.stop(grace=0.5)


def test_a_score_batch_across_models_answers_each_request_from_its_own_model(scorer) -> None:  # type: ignore[no-untyped-def]
    running, _, stub = scorer
    risk, fraud = logistic([1.0, 0, 0, 0], 0.0), logistic([0, 0, 0, 2.0], -1.0)
    register(stub, "v1", risk, activate=True)
    stub.RegisterModel(
        pb.RegisterModelRequest(
            model="fraud",
            version="f1",
            features=FEATURES,
            format=pb.MODEL_FORMAT_TORCHSCRIPT,
            payload=torchscript(fraud),
            activate=True,
        )
    )
    rows = np.random.default_rng(10).standard_normal((6, 4)).astype(np.float32)
    models = ["risk", "fraud", "nope", "risk", "fraud", "risk"]
    batch = stub.ScoreBatch(
        pb.ScoreBatchRequest(
            requests=[
                pb.ScoreRequest(model=m, request_id=f"x{i}", features=dict(zip(FEATURES, map(float, r), strict=True)))
                for i, (m, r) in enumerate(zip(models, rows, strict=True))
            ]
        )
    )
    for m, row, result in zip(models, rows, batch.results, strict=True):
        if m == "nope":
            assert result.error.code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in result.error.message
            continue
        want = float((risk if m == "risk" else fraud)(torch.from_numpy(row[None, :])).detach()[0, 0])
        assert result.response.score == pytest.approx(want, rel=1e-5)
        assert result.response.model_version == ("v1" if m == "risk" else "f1")
    core = running.binding.servicer.core  # type: ignore[attr-defined]
    assert core.batch_stats("risk", "v1").sizes == [3] and core.batch_stats("fraud", "f1").sizes == [2]


def test_concurrent_model_infer_calls_are_gathered_all_or_nothing_each(scorer) -> None:  # type: ignore[no-untyped-def]
    """ModelInfer goes through the scorer's gathering like Score (one forward and one decision-log commit per
    group, awaited on the loop): a burst of ModelInfer and Score calls is answered per request, a request with
    a refused row is refused whole naming its row, and only the other requests' rows are recorded."""
    import threading

    running, config, stub = scorer
    model = logistic([1.0, 0.5, 0.0, 0.0], 0.0)
    register(stub, "v1", model, activate=True, cleaning=pb.CLEANING_POLICY_REJECT)
    core = running.binding.servicer.core
    assert core.gathering is not None
    before = core.gathering.calls
    channel = open_channel("scorer", config, address=running.address)
    oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(24)]
    batches[7][1, 2] = np.nan  # missing and the policy rejects: request 7 is refused, naming row 1
    singles = rng.standard_normal((24, 4)).astype(np.float32)
    answers: dict[str, object] = {}
    go = threading.Barrier(8)

    def client(k: int) -> None:
        go.wait()
        for i in range(k, 24, 8):
            try:
                answers[f"oip{i}"] = _infer(oip_stub, batches[i], request_id=f"oip{i}")
            except grpc.RpcError as err:
                answers[f"oip{i}"] = err
            answers[f"s{i}"] = score(stub, f"s{i}", singles[i])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert core.gathering.calls - before == 48  # every call went through the gathering (none around it)
    refused = answers.pop("oip7")
    assert isinstance(refused, grpc.RpcError)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 1 features[age_days]" in refused.details() and "rejects" in refused.details()
    for i in range(24):
        expected = model(torch.from_numpy(singles[i : i + 1]))[0, 0].item()
        assert answers[f"s{i}"].score == pytest.approx(expected, rel=1e-5)  # type: ignore[attr-defined]
        if i == 7:
            continue
        resp = answers[f"oip{i}"]
        assert isinstance(resp, oip.ModelInferResponse)
        scores = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
        np.testing.assert_allclose(scores, model(torch.from_numpy(batches[i]))[:, 0].detach().numpy(), rtol=1e-5)
    assert stub.GetDriftReport(pb.GetDriftReportRequest(model="risk")).live_rows == 23 * 3 + 24
    labels = [pb.Label(request_id=f"oip{i}/{r}", label=True) for i in range(24) for r in range(3)]
    fed = stub.Feedback(pb.FeedbackRequest(model="risk", labels=labels))
    assert fed.accepted == 23 * 3 and fed.unknown == 3  # request 7's rows never reached the decision log
    channel.close()
