"""The scorer's request path under bursts and when idle: the batcher's inline dispatch (a lone caller runs its
rows on its own thread) never overlaps a running batch, keeps errors per caller, and counts its batches; the
array parse of a request's features refuses the first bad feature in the request's order and puts every
value in its feature's column. (A burst over gRPC deciding as the same calls one by one: tests/test_scorer.py.)"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from guardmesh.config import ConfigError, load_config
from guardmesh.errors import InvalidArgument
from guardmesh.runtime import load_definition, start_service
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scorer_pb2 as pb
from guardmesh.v1 import scorer_pb2_grpc as pb_grpc
from inference import grpc_predict_v2_pb2 as oip_pb
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from services.scorer.batching import DynamicBatcher
from services.scorer.decision import Rule, RuleAction, ThresholdPolicy
from services.scorer.monitoring import CleaningPolicy
from services.scorer.registry import ModelFormat, mlp
from services.scorer.scorer import Registration, RowsCall, RowsResult, ScoreCall, ScoreOutcome, Scorer, VersionConfig

from .conftest import make_config


def test_a_lone_caller_runs_its_rows_on_its_own_thread_when_the_batcher_is_idle() -> None:
    ran_on: list[str] = []

    def run(rows: np.ndarray) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        return rows[:, 0] * 2

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=60.0)
    try:
        with batcher.arriving() as arrival:
            [future] = batcher.submit_many(np.full((3, 2), 1.5, np.float32), arrival, inline=True)
        assert future.done()  # answered before submit_many returned: no hand-off to the worker and back
        assert future.result().tolist() == [3.0, 3.0, 3.0]
        assert ran_on == [threading.current_thread().name]
        assert batcher.stats.batches == 1 and batcher.stats.rows == 3 and batcher.stats.reason_log == ["idle"]
    finally:
        batcher.close()


def test_inline_rows_queue_behind_a_running_batch_and_never_run_beside_it() -> None:
    release = threading.Event()
    started = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def run(rows: np.ndarray) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        started.set()
        release.wait(timeout=30)
        with lock:
            running -= 1
        return rows[:, 0]

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0.0)
    try:
        first = batcher.submit(np.zeros((1, 2), np.float32))  # the worker runs it and blocks in the model
        assert started.wait(timeout=30)
        [second] = batcher.submit_many(np.ones((1, 2), np.float32), inline=True)
        assert not second.done()  # queued, not run on this thread while a batch runs
        release.set()
        assert first.result(timeout=30).tolist() == [0.0]
        assert second.result(timeout=30).tolist() == [1.0]
        assert most == 1
        assert batcher.stats.batches == 2
    finally:
        release.set()
        batcher.close()


def test_inline_rows_wait_for_callers_on_their_way() -> None:
    """Another caller announced (parsing its request): the rows queue so that the worker can batch both."""
    batcher = DynamicBatcher(lambda rows: rows[:, 0], max_batch_size=8, max_queue_delay_s=60.0)
    try:
        with batcher.arriving():  # the other caller, still parsing
            with batcher.arriving() as arrival:
                [mine] = batcher.submit_many(np.ones((1, 2), np.float32), arrival, inline=True)
            assert not mine.done()
            [theirs] = batcher.submit_many(np.full((1, 2), 2.0, np.float32), inline=True)
        assert mine.result(timeout=30).tolist() == [1.0] and theirs.result(timeout=30).tolist() == [2.0]
        assert batcher.stats.sizes == [2]  # one batch for both callers
    finally:
        batcher.close()


def test_a_model_error_inline_reaches_only_its_caller_and_the_batcher_keeps_serving() -> None:
    def run(rows: np.ndarray) -> np.ndarray:
        if rows[0, 0] < 0:
            raise RuntimeError("model failed")
        return rows[:, 0]

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0.0)
    try:
        [bad] = batcher.submit_many(np.full((1, 2), -1.0, np.float32), inline=True)
        with pytest.raises(RuntimeError, match="model failed"):
            bad.result(timeout=30)
        [good] = batcher.submit_many(np.full((1, 2), 4.0, np.float32), inline=True)
        assert good.result(timeout=30).tolist() == [4.0]
        queued = batcher.submit(np.full((1, 2), 5.0, np.float32))  # the worker is not left waiting either
        assert queued.result(timeout=30).tolist() == [5.0]
    finally:
        batcher.close()


FEATURES = tuple(f"x{i}" for i in range(6))


def _risk_core(config: VersionConfig) -> Scorer:
    """A scorer core with a small MLP registered and active under ``config``, its reference the medians' source."""
    settings = load_config(env={}).scorer
    scorer = Scorer(settings, torch.device("cpu"), None)
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(mlp(len(FEATURES), (8,)).eval()), buf)
    reference = np.random.default_rng(1).standard_normal((200, len(FEATURES))).astype(np.float32)
    registration = Registration(
        "risk", "v1", FEATURES, ModelFormat.TORCHSCRIPT, buf.getvalue(), config, reference=reference
    )
    scorer.register(registration, activate=True)
    return scorer


@pytest.fixture()
def core() -> Iterator[Scorer]:
    """A scorer core with a small MLP registered and active, its reference the medians' source."""
    scorer = _risk_core(VersionConfig(ThresholdPolicy(), (), CleaningPolicy.IMPUTE, 0.02, None, 0.05, 1000))
    try:
        yield scorer
    finally:
        scorer.close()


def test_rows_calls_gathered_with_score_calls_decide_and_record_as_the_same_calls_one_by_one() -> None:
    """ModelInfer's all-or-nothing calls (RowsCall) in one group with Score calls: one forward for the group's
    model rows; each call answered as alone; a refused row refuses its own call only (naming the row, none of
    its rows run or recorded); the live window takes the rows in the calls' order, and the decision log the
    same decisions, as the calls one by one."""
    block_big = (Rule("big", "x0", 2.0, RuleAction.BLOCK),)
    config = VersionConfig(ThresholdPolicy(), block_big, CleaningPolicy.REJECT, 0.02, None, 0.05, 1000)
    rng = np.random.default_rng(3)
    good = rng.standard_normal((3, len(FEATURES))).astype(np.float32)
    good[1, 0] = 3.0  # a rule decides this row
    bad = rng.standard_normal((3, len(FEATURES))).astype(np.float32)
    bad[0, 0] = 3.0  # ruled, but its request is refused: not recorded either
    bad[1, 4] = np.nan  # missing and the policy rejects: refuses the request
    single = rng.standard_normal((2, len(FEATURES))).astype(np.float32)
    single[:, 0] = np.minimum(single[:, 0], 1.5)  # the rule leaves these to the model
    good[[0, 2], 0] = np.minimum(good[[0, 2], 0], 1.5)
    calls: list[ScoreCall | RowsCall] = [
        ScoreCall("risk", "a", dict(zip(FEATURES, map(float, single[0]), strict=True))),
        RowsCall("risk", good, ["g/0", "g/1", "g/2"]),
        RowsCall("risk", bad, ["b/0", "b/1", "b/2"]),
        ScoreCall("risk", "c", dict(zip(FEATURES, map(float, single[1]), strict=True))),
    ]
    together_core, alone_core = _risk_core(config), _risk_core(config)
    try:
        together = together_core.score_many(calls)
        alone = [alone_core.score_many([call])[0] for call in calls]
        assert together_core.batch_stats("risk", "v1").sizes == [4]  # a, g/0, g/2, c: one forward
        for a, b in zip(alone, together, strict=True):
            if isinstance(a, InvalidArgument):
                assert isinstance(b, InvalidArgument) and (b.field, b.rule) == (a.field, a.rule)
                continue
            assert isinstance(a, ScoreOutcome | RowsResult) and isinstance(b, ScoreOutcome | RowsResult)
            outcomes_a = a.outcomes if isinstance(a, RowsResult) else [a]
            outcomes_b = b.outcomes if isinstance(b, RowsResult) else [b]
            assert [(o.decision, o.version) for o in outcomes_b] == [(o.decision, o.version) for o in outcomes_a]
        assert isinstance(together[2], InvalidArgument) and together[2].field == "row 1 features[x4]"
        assert isinstance(together[1], RowsResult) and together[1].outcomes[1].decision.score is None  # ruled
        expected_rows = np.concatenate([single[:1], good, single[1:]])
        np.testing.assert_array_equal(together_core.live_rows("risk"), expected_rows)
        np.testing.assert_array_equal(alone_core.live_rows("risk"), expected_rows)
        for scorer in (together_core, alone_core):
            log = scorer.lines["risk"].decisions
            assert [log.pop(r) is not None for r in ("a", "g/0", "g/1", "g/2", "b/0", "b/1", "b/2", "c")] == [
                True, True, False, True, False, False, False, True
            ]  # fmt: skip
    finally:
        together_core.close()
        alone_core.close()


def test_the_first_bad_feature_in_the_request_order_refuses_the_call(core: Scorer) -> None:
    cases = [
        ({"x0": 1.0, "nope": 1.0, "x1": math.inf}, "features[nope]", "is not a feature of 'risk'"),
        ({"x0": 1.0, "x1": math.inf, "nope": 1.0}, "features[x1]", "must be finite and fit float32"),
        ({"x2": -math.inf}, "features[x2]", "must be finite and fit float32"),
        ({"x3": 3.5e38}, "features[x3]", "must be finite and fit float32"),  # finite, beyond float32
    ]
    for features, field, rule in cases:
        with pytest.raises(InvalidArgument) as refused:
            core.score("risk", "bad", features)
        assert refused.value.field == field and rule in refused.value.rule
    assert len(core.live_rows("risk")) == 0  # refused calls leave no trace


def test_a_parsed_row_puts_every_value_in_its_feature_column_whatever_the_map_order(core: Scorer) -> None:
    row = {f: float(k) + 0.25 for k, f in enumerate(FEATURES)}
    shuffled = dict(reversed(list(row.items())))
    [a, b] = core.score_many([ScoreCall("risk", "a", row), ScoreCall("risk", "b", shuffled)])
    assert isinstance(a, ScoreOutcome) and isinstance(b, ScoreOutcome)
    assert a.decision.score == b.decision.score
    live = core.live_rows("risk")
    assert live.shape == (2, len(FEATURES))
    assert live.tolist() == [[float(k) + 0.25 for k in range(len(FEATURES))]] * 2


def test_a_group_of_alike_maps_is_parsed_as_each_map_alone(core: Scorer) -> None:
    """Calls whose maps name the same features in the same order are parsed together (one column look-up,
    one check of their values): each is refused or placed exactly as when it is parsed alone."""
    row = {f: float(k) - 2.5 for k, f in enumerate(FEATURES)}
    too_big_early = row | {"x1": 3.5e38}
    too_big_late = row | {"x5": -math.inf}
    unknown = {"x0": 1.0, "nope": 1.0, "x1": math.inf}
    unknown_late = {"x0": 1.0, "x1": math.inf, "nope": 1.0}
    missing = {"x0": math.nan, "x1": 0.5}
    maps = [row, too_big_early, row | {"x2": 7.0}, unknown, too_big_late, unknown_late, missing, {}, unknown, row]
    calls = [ScoreCall("risk", f"r{i}", m) for i, m in enumerate(maps)]
    alone = []
    for call in calls:
        [answer] = core.score_many([call])
        alone.append(answer)
    rows_alone = core.live_rows("risk")
    together = core.score_many(calls)
    assert len(together) == len(alone)
    for a, b in zip(alone, together, strict=True):
        if isinstance(a, ScoreOutcome):
            assert isinstance(b, ScoreOutcome)
            assert (b.decision.score, b.decision.positive, b.imputed) == (
                a.decision.score,
                a.decision.positive,
                a.imputed,
            )
        else:
            assert isinstance(a, InvalidArgument) and isinstance(b, InvalidArgument)
            assert (b.field, b.rule) == (a.field, a.rule)
    fields = [getattr(a, "field", None) for a in alone]
    assert fields == [None, "features[x1]", None, "features[nope]", "features[x5]", "features[x1]", None, None,
                      "features[nope]", None]  # fmt: skip
    live = core.live_rows("risk")
    assert live.shape == (2 * len(rows_alone), len(FEATURES))
    np.testing.assert_array_equal(live[len(rows_alone) :], rows_alone)  # the same rows, in the same columns


def test_nan_and_absent_features_are_missing_and_imputed(core: Scorer) -> None:
    outcome = core.score("risk", "gap", {"x0": math.nan, "x1": 0.5})
    assert outcome.imputed
    live = core.live_rows("risk")
    assert np.isnan(live[0, 0]) and live[0, 1] == 0.5 and np.isnan(live[0, 2:]).all()  # recorded as sent


def test_the_models_intra_op_threads_follow_the_setting() -> None:
    before = torch.get_num_threads()
    settings = load_config(env={"GUARDMESH__SCORER__TORCH_THREADS": "1"}).scorer
    try:
        Scorer(settings, torch.device("cpu"), None).close()
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match=r"scorer\.torch_threads"):
            load_config(env={"GUARDMESH__SCORER__TORCH_THREADS": "-1"})
    finally:
        torch.set_num_threads(before)


def test_model_infer_never_reads_feedback_health_from_the_store(tmp_path: Path) -> None:
    """Every ModelInfer resolves the model's signature and readiness; that must come from memory. Reading each
    version's feedback health from the shared store per request (as it did) made concurrent ModelInfer calls
    wait on SQLite and fail UNAVAILABLE ("database is locked") after its 10 s busy timeout."""
    config = make_config(tmp_path, **{"services.scorer.port": 0})
    running = start_service(load_definition("scorer"), config, port=0)
    try:
        core = running.binding.servicer.core  # type: ignore[attr-defined]
        assert core.shared is not None  # the default store: decisions and labels in SQLite
        reads: list[str] = []
        health = core._health_from_store

        def counted(model: str, version: str, state: object) -> None:
            reads.append(version)
            health(model, version, state)

        core._health_from_store = counted
        channel = grpc.insecure_channel(running.address)
        torch.manual_seed(0)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(mlp(len(FEATURES), (8,)).eval()), buf)
        reference = np.random.default_rng(1).standard_normal((200, len(FEATURES))).astype("<f4")
        pb_grpc.ScorerServiceStub(channel).RegisterModel(
            pb.RegisterModelRequest(
                model="risk",
                version="v1",
                features=FEATURES,
                format=pb.MODEL_FORMAT_TORCHSCRIPT,
                payload=buf.getvalue(),
                activate=True,
                reference=common_pb2.Tensor(
                    dtype=common_pb2.D_TYPE_FLOAT32, shape=list(reference.shape), data=reference.tobytes()
                ),
            )
        )
        reads.clear()
        infer = oip_grpc.GRPCInferenceServiceStub(channel)
        rows = np.random.default_rng(2).standard_normal((4, len(FEATURES))).astype("<f4")
        for i, row in enumerate(rows):
            answer = infer.ModelInfer(
                oip_pb.ModelInferRequest(
                    model_name="risk",
                    id=f"oip-{i}",
                    inputs=[
                        oip_pb.ModelInferRequest.InferInputTensor(
                            name="features", datatype="FP32", shape=[1, len(FEATURES)]
                        )
                    ],
                    raw_input_contents=[row.tobytes()],
                )
            )
            assert answer.outputs[0].name == "score"
        assert reads == []
        channel.close()
    finally:
        running.stop(grace=0.5)
