"""A/B analysis of the abrouter on simulated experiments with known truths (no gRPC)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from services.abrouter import analysis
from services.abrouter.analysis import (
    DailyEffect,
    MetricInput,
    analyze_experiment,
    analyze_metric,
)


def unit_level(
    metric: str,
    arms: np.ndarray,
    values: np.ndarray,
    *,
    days: np.ndarray | None = None,
    **extra: object,
) -> MetricInput:
    """One observation per unit carrying the unit's value."""
    n = arms.shape[0]
    return MetricInput(
        metric=metric,
        unit_arms=arms,
        obs_unit=np.arange(n),
        obs_value=np.asarray(values, dtype=np.float64),
        obs_days=np.zeros(n) if days is None else days,
        **extra,  # type: ignore[arg-type]
    )


def normal_experiment(seed: int, n: int, effect: float, sd: float = 1.0) -> MetricInput:
    rng = np.random.default_rng(seed)
    arms = np.repeat([0, 1], n)
    values = rng.normal(10.0, sd, 2 * n) + effect * arms
    return unit_level("m", arms, values)


# ------------------------------------------------------------------------------------------- effect, CI, p-value


def test_true_effect_is_covered_by_the_ci_and_significant():
    covered = 0
    for seed in range(30):
        r = analyze_metric(normal_experiment(seed, 400, 0.3), n_resamples=1000, seed=seed)
        covered += r.ci.low <= 0.3 <= r.ci.high
    assert covered >= 25  # nominal 95 %: P(<= 24 of 30) is ~0.1 %
    r = analyze_metric(normal_experiment(99, 2000, 0.3))
    assert r.ci.low <= 0.3 <= r.ci.high
    assert r.ci.low > 0 and r.p_value < 1e-6
    assert r.effect == pytest.approx(r.treatment_mean - r.control_mean)
    assert r.relative_effect == pytest.approx(r.effect / r.control_mean)
    assert r.n_control == r.n_treatment == 2000


def test_null_effect_is_not_significant_most_of_the_time():
    p_values = [
        analyze_metric(normal_experiment(seed, 300, 0.0), n_resamples=200, seed=seed).p_value for seed in range(40)
    ]
    assert np.mean(np.asarray(p_values) > 0.05) >= 0.85
    assert 0.3 < np.mean(p_values) < 0.7  # roughly uniform


def test_p_value_is_welch_t_test():
    rng = np.random.default_rng(3)
    arms = np.repeat([0, 1], [300, 700])
    values = np.where(arms == 1, rng.normal(1.1, 3.0, 1000), rng.normal(1.0, 1.0, 1000))
    r = analyze_metric(unit_level("m", arms, values), n_resamples=100)
    expected = stats.ttest_ind(values[arms == 1], values[arms == 0], equal_var=False).pvalue
    assert r.p_value == pytest.approx(expected, rel=1e-9)


def test_bootstrap_ci_agrees_with_normal_theory_on_a_large_sample():
    rng = np.random.default_rng(5)
    n = 20_000  # 40,000 units: the multinomial/index path, not scipy's
    arms = np.repeat([0, 1], n)
    values = rng.exponential(2.0, 2 * n) * (1.0 + 0.05 * arms)  # skewed
    r = analyze_metric(unit_level("m", arms, values))
    assert "scipy" not in r.ci_method
    t, c = values[arms == 1], values[arms == 0]
    se = math.sqrt(t.var(ddof=1) / n + c.var(ddof=1) / n)
    half = 1.959964 * se
    assert r.ci.low == pytest.approx(r.effect - half, abs=0.12 * half)
    assert r.ci.high == pytest.approx(r.effect + half, abs=0.12 * half)


def test_fast_bootstrap_path_agrees_with_scipy(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(8)
    # continuous: the fast path draws the same index stream as scipy, so the same generator gives scipy's BCa
    # interval to rounding (checks the closed-form jackknife acceleration and the BCa levels)
    yt, yc = rng.lognormal(0.0, 1.0, 700), rng.lognormal(0.1, 1.0, 900)
    # zero-inflated, skewed: multinomial categories plus single draws, another stream: agreement within MC error
    zt = np.where(rng.random(700) < 0.7, 0.0, rng.lognormal(0.0, 1.0, 700))
    zc = np.where(rng.random(900) < 0.7, 0.0, rng.lognormal(0.0, 1.0, 900))
    scipy_cont, method = analysis._bootstrap_ci(yt, yc, 0.9, 3000, np.random.default_rng(1))
    scipy_zero, _ = analysis._bootstrap_ci(zt, zc, 0.9, 3000, np.random.default_rng(1))
    assert "scipy" in method
    monkeypatch.setattr(analysis, "SCIPY_BOOTSTRAP_MAX_UNITS", 0)
    fast_cont, method = analysis._bootstrap_ci(yt, yc, 0.9, 3000, np.random.default_rng(1))
    fast_zero, _ = analysis._bootstrap_ci(zt, zc, 0.9, 3000, np.random.default_rng(1))
    assert "scipy" not in method
    assert (fast_cont.low, fast_cont.high) == pytest.approx((scipy_cont.low, scipy_cont.high), rel=1e-9)
    se = math.sqrt(zt.var() / zt.size + zc.var() / zc.size)
    assert fast_zero.low == pytest.approx(scipy_zero.low, abs=0.1 * se)
    assert fast_zero.high == pytest.approx(scipy_zero.high, abs=0.1 * se)


def test_resampler_reproduces_the_bootstrap_distribution_of_the_mean():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.zeros(6000), rng.integers(1, 4, 3000).astype(float), rng.lognormal(0, 1, 1000)])
    sampler = analysis._MeanResampler(x)
    assert 0 < sampler.rest.size < x.size and sampler.values.size >= 4  # both mechanisms in play
    means = sampler.draw(4000, np.random.default_rng(0))
    sd = math.sqrt(x.var() / x.size)  # exact sd of the bootstrap mean
    assert means.mean() == pytest.approx(x.mean(), abs=4 * sd / math.sqrt(4000))
    assert means.std() == pytest.approx(sd, rel=0.05)


def test_large_continuous_bootstrap_is_capped_and_says_so(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(analysis, "BOOTSTRAP_DRAW_BUDGET", 1_000_000)
    monkeypatch.setattr(analysis, "MIN_CAPPED_RESAMPLES", 100)
    r = analyze_metric(normal_experiment(0, 5000, 0.1), n_resamples=2000)
    assert "100 resamples (capped from 2000)" in r.ci_method
    assert r.ci.low < r.effect < r.ci.high


def test_constant_arms_give_a_point_interval():
    arms = np.repeat([0, 1], 50)
    r = analyze_metric(unit_level("m", arms, np.where(arms == 1, 2.0, 1.0)))
    assert (r.ci.low, r.ci.high) == (1.0, 1.0)
    assert r.p_value == 0.0 and r.prob_treatment_better == 1.0


# ----------------------------------------------------------------------------------------------------- CUPED


def test_cuped_reduces_variance_by_rho_squared_and_narrows_the_ci():
    rng = np.random.default_rng(11)
    n, rho = 20_000, 0.7
    arms = np.repeat([0, 1], n // 2)
    pre = rng.normal(0.0, 1.0, n)
    post = rho * pre + math.sqrt(1 - rho**2) * rng.normal(0.0, 1.0, n) + 0.05 * arms
    r = analyze_metric(unit_level("m", arms, post + 5.0, unit_pre=pre), n_resamples=1000)
    assert r.variance_reduction is not None and r.cuped_ci is not None and r.cuped_effect is not None
    assert r.variance_reduction == pytest.approx(rho**2, abs=0.03)
    assert 1.0 - r.variance_reduction == pytest.approx(1.0 - rho**2, abs=0.03)  # remaining variance share
    assert r.cuped_ci.width < r.ci.width * 0.8  # sqrt(1 - 0.49) = 0.71
    assert r.cuped_ci.low <= 0.05 <= r.cuped_ci.high
    assert abs(r.cuped_effect - 0.05) < abs(r.effect - 0.05) + 0.02


def test_cuped_handles_missing_pre_values_with_an_indicator():
    rng = np.random.default_rng(12)
    n = 8000
    arms = rng.integers(0, 2, n)
    new_user = rng.random(n) < 0.3
    pre = np.where(new_user, np.nan, rng.normal(0.0, 1.0, n))
    post = np.where(new_user, 3.0, 0.8 * np.nan_to_num(pre)) + rng.normal(0.0, 0.5, n)
    r = analyze_metric(unit_level("m", arms, post, unit_pre=pre), n_resamples=200)
    assert r.variance_reduction is not None and r.variance_reduction > 0.8  # indicator explains the new users
    assert r.cuped_effect == pytest.approx(0.0, abs=0.05)
    none = analyze_metric(unit_level("m", arms, post, unit_pre=np.full(n, np.nan)), n_resamples=200)
    assert none.cuped_effect is None and none.cuped_ci is None and none.variance_reduction is None


# ------------------------------------------------------------------------------------------ novelty, primacy


def daily_experiment(effect_by_day: np.ndarray, seed: int = 0, n: int = 6000) -> MetricInput:
    rng = np.random.default_rng(seed)
    arms = np.repeat([0, 1], n // 2)
    n_days = effect_by_day.shape[0]
    active = rng.random((n, n_days)) < 0.6
    unit, day = np.nonzero(active)
    values = rng.normal(1.0, 1.0, unit.size) + effect_by_day[day] * arms[unit]
    hours = rng.uniform(0.0, 0.99, unit.size)
    return MetricInput("engagement", arms, unit, values, day + hours)


def test_novelty_is_detected_and_a_constant_effect_is_not():
    novel = analyze_metric(daily_experiment(np.r_[np.full(3, 0.5), np.zeros(11)]), n_resamples=200)
    assert novel.novelty and not novel.primacy
    assert novel.novelty_slope < 0 and novel.novelty_p_value < 0.05
    assert novel.early_effect == pytest.approx(0.5, abs=0.1) and novel.late_effect == pytest.approx(0.0, abs=0.1)
    assert "novelty" in novel.detail
    assert [d.day for d in novel.daily] == list(range(14))
    constant = [analyze_metric(daily_experiment(np.full(14, 0.3), seed=s), n_resamples=100) for s in range(1, 7)]
    assert not any(r.novelty or r.primacy for r in constant)
    assert all(r.novelty_p_value > 0.05 for r in constant)
    assert any(r.novelty_slope < 0 for r in constant)  # a falling slope alone is not novelty


def test_primacy_is_the_mirror_of_novelty():
    r = analyze_metric(daily_experiment(np.r_[np.zeros(3), np.linspace(0.1, 0.5, 11)], seed=2), n_resamples=200)
    assert r.primacy and not r.novelty and r.novelty_slope > 0


def test_daily_effects_use_the_units_active_that_day():
    arms = np.array([0, 0, 1, 1])
    obs_unit = np.array([0, 0, 1, 2, 3, 3])
    obs_value = np.array([1.0, 2.0, 5.0, 4.0, 1.0, 7.0])
    obs_days = np.array([0.1, 0.9, 1.5, 0.0, 0.5, 1.2])
    r = analyze_metric(MetricInput("m", arms, obs_unit, obs_value, obs_days), n_resamples=50)
    # day 0: control unit 0 -> 3, treatment units 2 -> 4 and 3 -> 1; day 1: control 1 -> 5, treatment 3 -> 7
    assert r.daily == (DailyEffect(0, 2.5 - 3.0, 1, 2), DailyEffect(1, 7.0 - 5.0, 1, 1))
    assert math.isnan(r.novelty_slope) and not r.novelty
    mean = analyze_metric(MetricInput("m", arms, obs_unit, obs_value, obs_days, aggregate="mean"), n_resamples=50)
    assert mean.daily[0] == DailyEffect(0, 2.5 - 1.5, 1, 2)


# -------------------------------------------------------------------------------------- heavy users, position


def test_heavy_users_are_exposed_by_winsorising_and_dropping_the_top():
    rng = np.random.default_rng(21)
    n = 10_000
    arms = np.repeat([0, 1], n // 2)
    clicks = rng.poisson(2.0, n).astype(float)  # no true effect
    heavy = np.flatnonzero(arms == 1)[:30]
    clicks[heavy] = 500.0
    r = analyze_metric(unit_level("clicks", arms, clicks), n_resamples=300)
    se = math.sqrt(2.0 / (n / 2) * 2)
    assert r.effect > 2.5 and r.p_value < 0.05
    assert abs(r.winsorized_effect) < 4 * se
    assert abs(r.effect_without_top) < 4 * se
    assert r.top_share_of_effect > 0.9
    assert "heavy users" in r.detail
    assert r.corrected_effect == pytest.approx(r.winsorized_effect)


def test_without_top_drops_exactly_one_percent_with_ties_shared_between_arms():
    arms = np.repeat([0, 1], 500)
    values = np.zeros(1000)
    values[:20] = 1.0  # 20 control units tied at the top ...
    values[500:520] = 1.0  # ... and 20 treatment ones: 10 units dropped, half from each arm
    r = analyze_metric(unit_level("m", arms, values), n_resamples=50)
    assert r.effect == 0.0
    assert r.effect_without_top == pytest.approx(0.0, abs=1e-15)
    keep = analysis._top_keep_weights(values, 0.01)
    assert keep.sum() == pytest.approx(990.0)
    assert keep[arms == 0].sum() == pytest.approx(keep[arms == 1].sum())


def test_position_bias_is_removed_by_post_stratification():
    rng = np.random.default_rng(31)
    n = 40_000
    arms = rng.integers(0, 2, n)
    # treatment gets the top slots more often; CTR depends on the slot only (no true effect)
    position = np.where(arms == 1, rng.choice(5, n, p=[0.4, 0.3, 0.15, 0.1, 0.05]), rng.integers(0, 5, n))
    position[rng.random(n) < 0.05] = -1
    ctr = np.array([0.30, 0.20, 0.12, 0.08, 0.05, 0.15])[position]  # -1 picks the last
    clicks = (rng.random(n) < ctr).astype(float)
    r = analyze_metric(unit_level("ctr", arms, clicks, unit_position=position), n_resamples=300)
    se = math.sqrt(0.15 * 0.85 * 4 / n)
    assert r.effect > 5 * se and r.p_value < 1e-6
    assert r.position_corrected_effect is not None
    assert abs(r.position_corrected_effect) < 3 * se
    assert abs(r.corrected_effect) < 3 * se
    assert "position bias" in r.detail


def test_position_strata_missing_in_one_arm_are_dropped_and_reweighted():
    arms = np.array([0, 0, 1, 1, 1, 0])
    position = np.array([0, 1, 0, 1, 2, 1])  # position 2 only in treatment
    values = np.array([1.0, 2.0, 2.0, 4.0, 100.0, 2.0])
    r = analyze_metric(unit_level("m", arms, values, unit_position=position), n_resamples=50)
    # strata 0 (2 units: diff 1) and 1 (3 units: diff 2) -> (2 * 1 + 3 * 2) / 5
    assert r.position_corrected_effect == pytest.approx(8.0 / 5.0)


def test_weighted_effect_undoes_unequal_assignment():
    rng = np.random.default_rng(41)
    n = 40_000
    segment = rng.random(n) < 0.5
    p_treat = np.where(segment, 0.8, 0.2)
    arms = (rng.random(n) < p_treat).astype(np.int64)
    values = 10.0 * segment + rng.normal(0.0, 1.0, n)  # no true effect
    weights = np.where(arms == 1, 1.0 / p_treat, 1.0 / (1.0 - p_treat))
    r = analyze_metric(unit_level("m", arms, values, unit_weights=weights), n_resamples=200)
    assert r.effect > 5.0
    assert r.weighted_effect is not None and abs(r.weighted_effect) < 0.1
    assert abs(r.corrected_effect) < 0.1


# ---------------------------------------------------------------------------------------- Bayesian, corrections


def test_bernoulli_prob_treatment_better():
    rng = np.random.default_rng(51)
    arms = np.repeat([0, 1], 5000)
    win = (rng.random(10_000) < np.where(arms == 1, 0.15, 0.10)).astype(float)
    assert analyze_metric(unit_level("conv", arms, win), n_resamples=200).prob_treatment_better > 0.999
    same = np.tile((np.arange(5000) < 500).astype(float), 2)  # 10 % in both arms, exactly
    assert analyze_metric(unit_level("conv", arms, same), n_resamples=200).prob_treatment_better == pytest.approx(
        0.5, abs=0.01
    )
    nulls = [
        analyze_metric(
            unit_level("conv", arms, (np.random.default_rng(s).random(10_000) < 0.1).astype(float)), n_resamples=100
        ).prob_treatment_better
        for s in range(30)
    ]
    assert 0.35 < np.mean(nulls) < 0.65


def test_prob_better_uses_the_normal_approximation_for_non_binary_metrics():
    data = normal_experiment(4, 500, 0.05)
    r = analyze_metric(data, n_resamples=100)
    values, arms = np.asarray(data.obs_value), np.asarray(data.unit_arms)
    t, c = values[arms == 1], values[arms == 0]
    se = math.sqrt(t.var(ddof=1) / t.size + c.var(ddof=1) / c.size)
    assert r.prob_treatment_better == pytest.approx(stats.norm.cdf(r.effect / se), rel=1e-9)


def test_correction_factor_is_corrected_over_raw():
    rng = np.random.default_rng(61)
    n = 5000
    arms = rng.integers(0, 2, n)
    pre = rng.gamma(2.0, 1.0, n)
    values = pre + rng.exponential(1.0, n) + 0.2 * arms
    data = unit_level(
        "rev", arms, values, unit_pre=pre, unit_position=rng.integers(0, 3, n), unit_weights=rng.uniform(0.5, 2, n)
    )
    r = analyze_metric(data, n_resamples=200)
    assert r.correction_factor == pytest.approx(r.corrected_effect / r.effect)
    plain = analyze_metric(unit_level("rev", arms, values), n_resamples=200, winsor_quantile=1.0)
    assert plain.corrected_effect == pytest.approx(plain.effect) and plain.correction_factor == pytest.approx(1.0)
    assert plain.winsorized_effect == pytest.approx(plain.effect)
    assert plain.cuped_effect is None and plain.position_corrected_effect is None and plain.weighted_effect is None


def test_aggregate_sum_counts_silent_units_as_zero_and_mean_leaves_them_out():
    arms = np.array([0, 0, 0, 1, 1, 1])
    obs_unit = np.array([0, 0, 1, 3, 3, 4])
    obs_value = np.array([1.0, 3.0, 2.0, 4.0, 6.0, 1.0])
    days = np.zeros(6)
    s = analyze_metric(MetricInput("m", arms, obs_unit, obs_value, days), n_resamples=50)
    assert (s.n_control, s.n_treatment) == (3, 3)
    assert s.control_mean == pytest.approx(6.0 / 3) and s.treatment_mean == pytest.approx(11.0 / 3)
    m = analyze_metric(MetricInput("m", arms, obs_unit, obs_value, days, aggregate="mean"), n_resamples=50)
    assert (m.n_control, m.n_treatment) == (2, 2)
    assert m.control_mean == pytest.approx((2.0 + 2.0) / 2) and m.treatment_mean == pytest.approx((5.0 + 1.0) / 2)


def test_results_are_deterministic_for_a_seed():
    data = daily_experiment(np.full(5, 0.1), n=2000)
    a, b = analyze_metric(data, seed=7, n_resamples=300), analyze_metric(data, seed=7, n_resamples=300)
    assert a == b


# -------------------------------------------------------------------------------------------- experiment level


def test_analyze_experiment_covers_every_metric_and_treatment_arm():
    rng = np.random.default_rng(71)
    arms = rng.integers(0, 3, 3000)
    inputs = [unit_level(name, arms, rng.normal(0, 1, 3000) + 0.2 * arms) for name in ("a", "b")]
    results = analyze_experiment(inputs, 3, n_resamples=100)
    assert [(r.metric, r.control, r.treatment) for r in results] == [("a", 0, 1), ("a", 0, 2), ("b", 0, 1), ("b", 0, 2)]
    assert results[1].effect > results[0].effect > 0
    with pytest.raises(ValueError, match=r"^unit_arms: .*n_arms"):
        analyze_experiment(inputs, 2)
    with pytest.raises(ValueError, match=r"^metric: "):
        analyze_experiment([inputs[0], inputs[0]], 3)
    with pytest.raises(ValueError, match=r"^treatment: "):
        analyze_experiment(inputs, 3, treatment=1)


# ------------------------------------------------------------------------------------------------ validation


def good_input(**changes: object) -> MetricInput:
    fields: dict[str, Any] = {
        "metric": "m",
        "unit_arms": np.array([0, 0, 1, 1]),
        "obs_unit": np.array([0, 1, 2, 3]),
        "obs_value": np.array([1.0, 2.0, 3.0, 4.0]),
        "obs_days": np.array([0.0, 1.0, 2.0, 3.0]),
    }
    fields.update(changes)
    return MetricInput(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "options", "field"),
    [
        ({"obs_value": np.array([1.0, 2.0, 3.0])}, {}, "obs_value"),
        ({"obs_days": np.array([0.0, 1.0])}, {}, "obs_days"),
        ({"obs_value": np.array([1.0, np.nan, 3.0, 4.0])}, {}, "obs_value"),
        ({"obs_value": np.array([1.0, np.inf, 3.0, 4.0])}, {}, "obs_value"),
        ({"obs_days": np.array([0.0, -1.0, 2.0, 3.0])}, {}, "obs_days"),
        ({"obs_unit": np.array([0, 1, 2, 4])}, {}, "obs_unit"),
        ({"obs_unit": np.array([0.0, 1.5, 2.0, 3.0])}, {}, "obs_unit"),
        ({"unit_arms": np.array([0, -1, 1, 1])}, {}, "unit_arms"),
        ({"unit_arms": np.array([0, 0, 0, 0])}, {}, "unit_arms"),  # empty treatment arm
        ({"unit_pre": np.array([1.0, np.inf, 1.0, 1.0])}, {}, "unit_pre"),
        ({"unit_pre": np.array([1.0, 1.0])}, {}, "unit_pre"),
        ({"unit_position": np.array([0, 1, -2, 1])}, {}, "unit_position"),
        ({"unit_weights": np.array([1.0, -1.0, 1.0, 1.0])}, {}, "unit_weights"),
        ({"unit_weights": np.array([1.0, 1.0, 0.0, 0.0])}, {}, "unit_weights"),
        ({"aggregate": "median"}, {}, "aggregate"),
        ({}, {"confidence": 1.0}, "confidence"),
        ({}, {"confidence": 0.0}, "confidence"),
        ({}, {"winsor_quantile": 0.5}, "winsor_quantile"),
        ({}, {"winsor_quantile": 1.01}, "winsor_quantile"),
        ({}, {"treatment": 0}, "treatment"),
        ({}, {"n_resamples": 0}, "n_resamples"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(changes, options, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        analyze_metric(good_input(**changes), **options)


def test_empty_arm_error_names_the_arm():
    with pytest.raises(ValueError, match=r"arm 2 \(treatment\)"):
        analyze_metric(good_input(), treatment=2)
    silent = good_input(obs_unit=np.array([0, 1, 0, 1]), aggregate="mean")
    with pytest.raises(ValueError, match=r"arm 1 \(treatment\) has no units with an observation"):
        analyze_metric(silent)
