"""Scorer explanations: exact linear SHAP against brute-force Shapley values, IG completeness, drift ranking."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from guardmesh.errors import FailedPrecondition, InvalidArgument
from guardmesh.sdk.scorer import Score
from guardmesh.v1 import scorer_pb2 as pb
from services.scorer.explain import (
    AttributionDrift,
    attribution_shift,
    explain,
    integrated_gradients,
    is_linear,
    linear_model,
    linear_shap,
)

from .test_scorer_drift import served_scorer

# TorchScript is deprecated in recent torch but still how many models ship; its warning is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


# --- reference implementation: Shapley values by enumerating every coalition --------------------------------


def brute_force_shapley(score, x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Interventional Shapley values of ``score`` at ``x`` (1-D), the absent features taken from each background row.

    v(S) = mean over background rows b of score(x on S, b elsewhere); phi_i = sum over S not containing i of
    |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)). Exponential in n, so only for small n.
    """
    n = x.shape[0]
    value: dict[frozenset[int], float] = {}
    for r in range(n + 1):
        for subset in itertools.combinations(range(n), r):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[list(subset)] = True
            rows = torch.where(mask, x, background)  # (rows, n): x on S, background elsewhere
            value[frozenset(subset)] = float(score(rows).mean())
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r in range(n):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for subset in itertools.combinations(others, r):
                s = frozenset(subset)
                phi[i] += weight * (value[s | {i}] - value[s])
    return phi


def log_odds_of(model: nn.Module):
    """The model's score in the space linear SHAP works in: log-odds for a sigmoid output, else raw."""
    sigmoid = isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Sigmoid)

    def score(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(rows).reshape(-1)
        return torch.logit(out) if sigmoid else out

    return score


def random_linear(n: int, logistic: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Linear(n, 1).double()
    with torch.no_grad():
        layer.weight.normal_(0.0, 1.0)
        layer.bias.normal_(0.0, 1.0)
    return nn.Sequential(layer, nn.Sigmoid()) if logistic else layer


def smooth_mlp(n: int, seed: int, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))


# --- exact SHAP for linear and logistic models ---------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), logistic=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_shap_equals_brute_force_shapley(n: int, logistic: bool, seed: int) -> None:
    model = random_linear(n, logistic, seed)
    gen = torch.Generator().manual_seed(seed)
    background = torch.randn((24, n), generator=gen, dtype=torch.float64) * 1.5 + 0.3
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 2.0

    expected = brute_force_shapley(log_odds_of(model), x, background)
    # With the background mean as the single reference row: the same values (the score is linear).
    expected_mean = brute_force_shapley(log_odds_of(model), x, background.mean(dim=0, keepdim=True))

    lin = linear_model(model)
    assert lin is not None
    phi = linear_shap(lin.weight, lin.bias, x, background.mean(dim=0))
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(phi, expected_mean, rtol=0, atol=1e-6)

    e = explain(model, x, background)
    assert e.method == "linear_shap"
    assert e.space == ("log-odds" if logistic else "raw score")
    torch.testing.assert_close(e.attributions, expected, rtol=0, atol=1e-6)


def test_linear_shap_completeness_is_exact_in_log_odds() -> None:
    model = random_linear(5, logistic=True, seed=3)
    gen = torch.Generator().manual_seed(3)
    background = torch.randn((100, 5), generator=gen, dtype=torch.float64)
    x = torch.randn((8, 5), generator=gen, dtype=torch.float64) * 2

    e = explain(model, x, background)
    score = log_odds_of(model)
    f_x, f_base = score(x), score(background.mean(dim=0, keepdim=True))
    torch.testing.assert_close(e.attributions.sum(dim=-1), f_x - f_base, rtol=0, atol=1e-9)
    torch.testing.assert_close(e.score, f_x, rtol=0, atol=1e-9)
    assert e.baseline_score == pytest.approx(float(f_base), abs=1e-9)
    assert float(e.completeness_error.max()) < 1e-12
    assert e.attributions.shape == x.shape and e.score.shape == (8,)


def test_linear_shap_ignores_bias_and_accepts_a_layer_weight() -> None:
    w = torch.tensor([[2.0, -1.0, 0.5]])
    x = torch.tensor([1.0, 1.0, 1.0])
    mean = torch.tensor([0.0, 2.0, 1.0])
    expected = torch.tensor([2.0, 1.0, 0.0])
    torch.testing.assert_close(linear_shap(w, torch.tensor(7.0), x, mean), expected)
    torch.testing.assert_close(linear_shap(w.reshape(-1), None, x, mean), expected)
    with pytest.raises(InvalidArgument, match="weight"):
        linear_shap(torch.ones((2, 3)), None, x, mean)
    with pytest.raises(InvalidArgument, match="background_mean"):
        linear_shap(w, None, x, torch.zeros(4))


# --- which models count as linear ----------------------------------------------------------------------------


class ShiftedLinear(nn.Linear):
    """A subclass that looks linear but is not: it must not be explained with the linear formula."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) ** 2


class Linear(nn.Module):
    """A look-alike whose TorchScript original name is "Linear" but whose output is not linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 3))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.t() + self.bias)


def test_is_linear_detects_linear_and_logistic_models_only() -> None:
    assert is_linear(nn.Linear(4, 1))
    assert is_linear(nn.Linear(4, 1, bias=False))
    assert is_linear(nn.Sequential(nn.Linear(4, 1)))
    assert is_linear(nn.Sequential(nn.Linear(4, 1), nn.Sigmoid()))
    assert linear_model(nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())).link == "sigmoid"  # type: ignore[union-attr]

    assert not is_linear(nn.Linear(4, 2))
    assert not is_linear(nn.Sequential(nn.Linear(4, 1), nn.ReLU()))
    assert not is_linear(nn.Sequential(nn.Linear(4, 1), nn.Sigmoid(), nn.Linear(1, 1)))
    assert not is_linear(smooth_mlp(4, seed=0))
    assert not is_linear(ShiftedLinear(4, 1))

    hooked = nn.Linear(4, 1)
    hooked.register_forward_hook(lambda _m, _i, out: out * 2 + 1)
    assert not is_linear(hooked)  # the probe rows catch what the structure hides


def test_is_linear_detects_torchscript_models() -> None:
    logistic = nn.Sequential(nn.Linear(3, 1), nn.Sigmoid())
    assert is_linear(torch.jit.script(nn.Linear(3, 1)))
    assert is_linear(torch.jit.script(logistic))
    assert is_linear(torch.jit.trace(logistic, torch.randn(2, 3)))
    assert not is_linear(torch.jit.script(nn.Sequential(nn.Linear(3, 1), nn.Tanh())))
    assert not is_linear(torch.jit.script(Linear()))  # named Linear, but the probe shows tanh

    scripted = torch.jit.script(logistic)
    x, background = torch.randn(5, 3), torch.randn(50, 3)
    torch.testing.assert_close(
        explain(scripted, x, background).attributions, explain(logistic, x, background).attributions
    )


# --- Integrated Gradients --------------------------------------------------------------------------------------


def test_integrated_gradients_completeness_within_delta() -> None:
    model = smooth_mlp(5, seed=1).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((16, 5), generator=gen, dtype=torch.float64) * 2
    baseline = torch.randn(5, generator=gen, dtype=torch.float64) * 0.1

    attributions, delta = integrated_gradients(model, x, baseline, steps=64)
    with torch.no_grad():
        gap = model(x).reshape(-1) - model(baseline.reshape(1, 5)).reshape(())
    # captum's delta is exactly the completeness gap, and for a smooth MLP with 64 steps it is tiny.
    torch.testing.assert_close(delta, attributions.sum(dim=-1) - gap, rtol=0, atol=1e-12)
    assert float(delta.abs().max()) < 1e-6 * max(1.0, float(gap.abs().max()))
    # More quadrature points, smaller error.
    _, coarse = integrated_gradients(model, x, baseline, steps=4)
    assert float(delta.abs().max()) < float(coarse.abs().max())


def test_explain_uses_integrated_gradients_for_a_network() -> None:
    model = smooth_mlp(4, seed=2).double().eval()
    gen = torch.Generator().manual_seed(2)
    background = torch.randn((200, 4), generator=gen, dtype=torch.float64)
    x = torch.randn(4, generator=gen, dtype=torch.float64)

    e = explain(model, x, background, steps=64)
    assert e.method == "integrated_gradients" and e.space == "model output"
    with torch.no_grad():
        f_x = float(model(x.reshape(1, 4)))
        f_base = float(model(background.mean(dim=0, keepdim=True)))
    assert e.attributions.shape == (4,) and e.score.shape == ()
    assert float(e.score) == pytest.approx(f_x, abs=1e-12)
    assert e.baseline_score == pytest.approx(f_base, abs=1e-12)
    assert float(e.attributions.sum()) == pytest.approx(f_x - f_base, abs=1e-6)
    assert float(e.completeness_error) < 1e-6


def test_integrated_gradients_gives_zero_to_an_ignored_feature() -> None:
    model = smooth_mlp(5, seed=4).double().eval()
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.weight[:, 2] = 0.0  # nothing flows from feature 2
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((10, 5), generator=gen, dtype=torch.float64) * 3
    background = torch.randn((100, 5), generator=gen, dtype=torch.float64)

    e = explain(model, x, background)
    assert float(e.attributions[:, 2].abs().max()) < 1e-12
    assert float(e.attributions[:, [0, 1, 3, 4]].abs().mean()) > 1e-3


def test_integrated_gradients_on_a_multi_output_model_needs_a_target() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    x, background = torch.randn(4, 3, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    with pytest.raises(InvalidArgument, match="target"):
        explain(model, x, background)
    e = explain(model, x, background, target=1, steps=64)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(background.mean(dim=0, keepdim=True))[0, 1]
    torch.testing.assert_close(e.attributions.sum(dim=-1), gap, rtol=0, atol=1e-6)


def test_explain_rejects_bad_inputs() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(InvalidArgument, match="x"):
        explain(model, torch.zeros(4), torch.zeros(10, 3))
    with pytest.raises(InvalidArgument, match="x"):
        explain(model, torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(10, 3))
    with pytest.raises(InvalidArgument, match="background"):
        explain(model, torch.zeros(3), torch.zeros(0, 3))
    with pytest.raises(InvalidArgument, match="features"):
        explain(model, torch.zeros(4), torch.zeros(10, 4))


# --- attribution drift -----------------------------------------------------------------------------------------


def test_attribution_drift_windows_slide_and_report_means() -> None:
    drift = AttributionDrift(2, window=3, feature_names=["amount", "country"])
    drift.add_reference(torch.tensor([[1.0, -1.0], [3.0, -1.0]]))
    drift.add_live(torch.tensor([[100.0, 0.0], [100.0, 0.0]]))  # slides out below
    drift.add_live(torch.tensor([[0.0, 2.0], [0.0, -4.0]]))
    drift.add_live(torch.tensor([0.0, 5.0]))
    assert drift.reference_rows == 2 and drift.live_rows == 3

    report = drift.report()
    amount, country = report.features
    assert amount.name == "amount" and country.feature == 1
    assert amount.reference_mean_abs == pytest.approx(2.0) and amount.reference_mean == pytest.approx(2.0)
    assert amount.live_mean_abs == pytest.approx(0.0) and amount.change_mean == pytest.approx(-2.0)
    assert country.live_mean_abs == pytest.approx(11 / 3) and country.live_mean == pytest.approx(1.0)
    assert country.change_mean_abs == pytest.approx(11 / 3 - 1) and country.change_mean == pytest.approx(2.0)
    assert report.ranked == [1, 0]  # country's |attribution| grew by 2.67, amount's signed mean fell by 2
    assert report.score_change == pytest.approx(0.0)
    assert [f.name for f in report.top(1)] == ["country"]

    drift.add_live(torch.arange(20.0).reshape(10, 2))  # a batch larger than the window keeps its last rows
    assert drift.report().features[0].live_mean == pytest.approx((14 + 16 + 18) / 3)

    drift.rebaseline()
    assert drift.reference_rows == 3 and drift.live_rows == 0
    with pytest.raises(FailedPrecondition):
        drift.report()
    with pytest.raises(InvalidArgument, match="attributions"):
        drift.add_live(torch.zeros(3))


def trained_mlp(n: int, gen: torch.Generator) -> tuple[nn.Sequential, torch.Tensor]:
    """A small MLP trained (logits out) on labels driven mostly by feature 3, a little by 0 and 1; and its
    training rows. Features 2, 4, 5 never influence the label."""
    torch.manual_seed(7)
    x_train = torch.randn((2000, n), generator=gen)
    logits = 3.0 * x_train[:, 3] + 0.7 * x_train[:, 0] - 0.5 * x_train[:, 1]
    y = torch.bernoulli(torch.sigmoid(logits), generator=gen)

    model = nn.Sequential(nn.Linear(n, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(150):
        optimizer.zero_grad()
        loss_fn(model(x_train).reshape(-1), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float(((model(x_train).reshape(-1) > 0).float() == y).float().mean())
    assert accuracy > 0.8  # it learned something, mostly from feature 3
    return model, x_train


def test_attribution_drift_ranks_the_shifted_feature_of_a_trained_mlp_first() -> None:
    n = 6
    gen = torch.Generator().manual_seed(7)
    model, x_train = trained_mlp(n, gen)

    background = x_train[:300]
    reference = torch.randn((1000, n), generator=gen)
    live = torch.randn((1000, n), generator=gen)
    live[:, 3] += 1.5  # the feature that drives decisions moves
    live[:, 5] += 3.0  # a feature the label never depended on moves further: input drift alone would rank it first

    drift = AttributionDrift(n)
    ref_e, live_e = explain(model, reference, background), explain(model, live, background)
    assert ref_e.method == "integrated_gradients"
    drift.add_reference(ref_e.attributions)
    drift.add_live(live_e.attributions)
    report = drift.report()

    assert report.ranked[0] == 3
    assert report.features[3].change_mean > 0  # it now pushes scores up
    # The signed changes account for the change of the mean score (IG completeness, up to its error).
    mean_score_change = float(live_e.score.mean() - ref_e.score.mean())
    assert report.score_change == pytest.approx(mean_score_change, abs=1e-3 + 0.01 * abs(mean_score_change))


# --- attribution shift served over real gRPC ----------------------------------------------------------------


def test_attribution_shift_is_served_and_names_the_feature_that_moved_decisions(tmp_path: Path) -> None:
    n = 6
    names = [f"x{i}" for i in range(n)]
    gen = torch.Generator().manual_seed(7)
    logits, _ = trained_mlp(n, gen)
    model = nn.Sequential(*logits, nn.Sigmoid()).eval()  # served scores are probabilities
    reference = torch.randn((1_000, n), generator=gen)
    live = torch.randn((1_000, n), generator=gen)
    live[:, 3] += 1.5  # the feature that drives decisions moves
    live[:, 5] += 3.0  # a feature the model ignores moves twice as far: input drift alone ranks it first

    with served_scorer(tmp_path) as client:
        client.register_module("fraud", "v1", model, names, activate=True, reference=reference.numpy())
        with pytest.raises(grpc.RpcError) as err:
            client.stub.GetAttributionDrift(pb.GetAttributionDriftRequest(model="fraud"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # nothing scored yet
        for start in range(0, 1_000, 250):
            rows = live[start : start + 250].tolist()
            answers = client.score_batch("fraud", [dict(zip(names, row, strict=True)) for row in rows])
            assert all(isinstance(a, Score) for a in answers)

        drift = client.stub.GetAttributionDrift(pb.GetAttributionDriftRequest(model="fraud"))
        assert (drift.model_version, drift.method, drift.space) == ("v1", "integrated_gradients", "model output")
        assert drift.reference_rows == 1_000 and drift.live_rows == 1_000
        shifts = {f.feature: f for f in drift.features}
        assert [f.feature for f in drift.features] == names
        assert shifts["x3"].rank == 1 and sorted(f.rank for f in drift.features) == list(range(1, n + 1))
        assert shifts["x3"].change_mean > 0  # it now pushes scores up
        assert shifts["x3"].shift > shifts["x5"].shift > 0  # x5 matters a little, x3 most
        through_sdk = client.attribution_drift("fraud")  # the SDK's view of the same RPC
        assert through_sdk.ranked()[0] == "x3" and through_sdk.method == "integrated_gradients"
        assert through_sdk.features["x3"].shift == pytest.approx(shifts["x3"].shift, rel=1e-9)
        # the signed changes add up to the change of the mean score (IG completeness, up to its error)
        with torch.no_grad():
            mean_change = float(model(live).mean() - model(reference).mean())
        assert drift.score_change == pytest.approx(mean_change, abs=0.01)

        report = client.stub.GetDriftReport(pb.GetDriftReportRequest(model="fraud"))
        by_feature = {f.feature: f for f in report.features}
        assert report.attribution_method == "integrated_gradients"
        assert max(by_feature, key=lambda f: by_feature[f].attribution_shift) == "x3"
        assert by_feature["x3"].attribution_shift == pytest.approx(shifts["x3"].shift, rel=1e-6)
        # input drift says x5 moved most; only the attribution shift says x3 is what moved the decisions
        assert by_feature["x5"].standardized_mean_difference > by_feature["x3"].standardized_mean_difference

        for model_name, version in [("nope", ""), ("fraud", "v9")]:
            with pytest.raises(grpc.RpcError) as err:
                client.stub.GetAttributionDrift(pb.GetAttributionDriftRequest(model=model_name, version=version))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_attribution_shift_of_a_linear_model_is_its_weight_times_the_mean_shift() -> None:
    # Known answer: for f(x) = w.x + b, exact SHAP gives w_i (x_i - baseline_i), so the change of the mean
    # attribution between two windows is w_i (mean_live_i - mean_ref_i), whatever the baseline.
    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
    reference = torch.randn((400, 3), generator=gen, dtype=torch.float64)
    live = torch.randn((300, 3), generator=gen, dtype=torch.float64) + torch.tensor([0.0, 1.0, 0.0])
    live[:50, 2] = torch.nan  # missing: filled from `fill` as the served path imputes
    live[50, :] = torch.nan  # a row that stays incomplete (no fill for feature 0 either) is left out
    fill = torch.tensor([torch.nan, 0.0, 4.0], dtype=torch.float64)
    live[50, 1:] = 0.0
    report = attribution_shift(layer, reference, live, reference.mean(dim=0), fill, ["a", "b", "c"])
    assert report.method == "linear_shap" and report.space == "raw score"
    assert report.reference_rows == 400 and report.live_rows == 299
    kept = torch.cat([live[:50], live[51:]])
    kept[:, 2] = torch.where(torch.isnan(kept[:, 2]), 4.0, kept[:, 2])
    expected = layer.weight[0].detach().double() * (kept.mean(dim=0) - reference.mean(dim=0))
    changes = torch.tensor([f.change_mean for f in report.features], dtype=torch.float64)
    torch.testing.assert_close(changes, expected, rtol=1e-5, atol=1e-5)
    assert report.features[report.ranked[0]].name == "b"  # shifted by 1 SD with weight -1: the largest move
    with pytest.raises(FailedPrecondition, match="no finite mean"):
        attribution_shift(layer, reference, live, torch.full((3,), torch.nan), fill, ["a", "b", "c"])
