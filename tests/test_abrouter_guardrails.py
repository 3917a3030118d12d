"""Guardrails without gRPC: the sequential (mixture SPRT) test, its false-trip rate over repeated looks, and the
per-unit value of a metric (EVENT / CONTINUOUS) kept incrementally per arm."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from guardmesh.stats import Moments
from services.abrouter.guardrails import Guardrail, evaluate_guardrail, evaluate_guardrails, mixture_sprt
from services.abrouter.metrics import ArmStatistics, MetricKind


def normal_arms(control_mean: float, arm_mean: float, n: int, sd: float, seed: int) -> tuple[Moments, Moments]:
    rng = np.random.default_rng(seed)
    return Moments.of(rng.normal(control_mean, sd, n)), Moments.of(rng.normal(arm_mean, sd, n))


def test_ten_percent_drop_on_5000_units_trips() -> None:
    control, arm = normal_arms(10.0, 9.0, 5000, 2.0, seed=1)
    v = evaluate_guardrail(Guardrail("revenue"), control, arm, 1)
    assert v.tripped, v.reason
    assert v.relative_change == pytest.approx(-0.10, abs=0.01)
    assert v.relative_change < v.bound < -0.05 and v.p_value < 1e-6
    assert (v.metric, v.arm, v.n_control, v.n_arm) == ("revenue", 1, 5000, 5000)
    assert v.reason.startswith("worse than bound")


def test_one_percent_drop_is_not_shown_worse() -> None:
    control, arm = normal_arms(10.0, 9.9, 5000, 2.0, seed=2)
    v = evaluate_guardrail(Guardrail("revenue"), control, arm, 1)
    assert not v.tripped and v.bound > -0.05
    assert v.reason.startswith("not shown worse than the bound") and v.p_value == 1.0  # L > 0: better than bound


def test_ten_percent_drop_on_20_units_is_insufficient() -> None:
    control, arm = normal_arms(10.0, 9.0, 20, 2.0, seed=3)
    v = evaluate_guardrail(Guardrail("revenue"), control, arm, 1)
    assert not v.tripped
    assert v.reason.startswith("insufficient units (n=20")
    assert math.isfinite(v.p_value) and math.isfinite(v.bound)


def test_drop_beyond_bound_but_noisy_is_not_tripped() -> None:
    rng = np.random.default_rng(4)
    c, a = rng.normal(10.0, 20.0, 200), rng.normal(9.0, 20.0, 200)
    v = evaluate_guardrail(Guardrail("revenue"), Moments.of(c - c.mean() + 10.0), Moments.of(a - a.mean() + 9.0), 1)
    assert v.relative_change == pytest.approx(-0.10)
    assert not v.tripped and v.bound > -0.05 and v.p_value >= 0.05


def test_latency_up_ten_percent_trips_lower_is_better() -> None:
    control, arm = normal_arms(100.0, 110.0, 5000, 15.0, seed=5)
    latency = Guardrail("latency_ms", higher_is_better=False)
    v = evaluate_guardrail(latency, control, arm, 2)
    assert v.tripped, v.reason
    assert v.relative_change == pytest.approx(-0.10, abs=0.01) and v.arm == 2
    faster = evaluate_guardrail(latency, control, normal_arms(100.0, 90.0, 5000, 15.0, seed=6)[1], 1)
    assert not faster.tripped and faster.relative_change > 0 and faster.p_value == 1.0
    assert not evaluate_guardrail(Guardrail("latency_ms"), control, arm, 1).tripped  # higher is better: a gain


def test_zero_variance_does_not_crash() -> None:
    g = Guardrail("m", min_units=10)
    v = evaluate_guardrail(g, Moments.of(np.full(50, 10.0)), Moments.of(np.full(50, 8.0)), 1)
    assert v.tripped and v.p_value == 0.0 and v.relative_change == pytest.approx(-0.2)
    v = evaluate_guardrail(g, Moments.of(np.full(50, 10.0)), Moments.of(np.full(50, 10.0)), 1)
    assert not v.tripped and v.relative_change == 0.0 and v.p_value == 1.0
    noisy = Moments.of(np.random.default_rng(0).normal(9.99, 0.01, 50))
    v = evaluate_guardrail(g, Moments.of(np.full(50, 10.0)), noisy, 1)
    assert not v.tripped and math.isfinite(v.p_value) and math.isfinite(v.bound)


def test_zero_control_mean_uses_the_standardised_mean_difference() -> None:
    g = Guardrail("margin", min_units=10)
    zeros = Moments.of(np.zeros(100))
    v = evaluate_guardrail(g, zeros, zeros, 1)
    assert not v.tripped and v.relative_change == 0.0 and not math.isnan(v.p_value)
    v = evaluate_guardrail(g, zeros, Moments.of(np.full(100, -1.0)), 1)
    assert v.tripped and all(math.isfinite(x) for x in (v.relative_change, v.p_value))
    rng = np.random.default_rng(3)
    c = rng.normal(0, 1, 5000)
    c -= c.mean()  # mean exactly (numerically) zero
    a = rng.normal(-0.5, 1, 5000)
    v = evaluate_guardrail(g, Moments.of(c), Moments.of(a), 1)
    pooled = math.sqrt((c.var(ddof=1) + a.var(ddof=1)) / 2)  # equal sizes: the dof-weighted pooled SD
    assert v.tripped and v.relative_change == pytest.approx((a.mean() - c.mean()) / pooled)  # Cohen's d
    v = evaluate_guardrail(g, Moments.of(c), Moments.of(rng.normal(-0.01, 1, 5000)), 1)
    assert not v.tripped


def test_empty_and_single_unit_arms_are_insufficient() -> None:
    control, _ = normal_arms(10.0, 9.0, 300, 1.0, seed=7)
    v = evaluate_guardrail(Guardrail("m"), control, Moments(), 1)
    assert v.n_arm == 0 and not v.tripped and math.isnan(v.arm_mean) and v.reason.startswith("insufficient")
    v = evaluate_guardrail(Guardrail("m"), control, Moments.of([3.0]), 1)
    assert v.n_arm == 1 and not v.tripped and math.isnan(v.bound)


def test_mixture_sprt_matches_its_formula_and_bound_and_p_agree() -> None:
    v, tau2, alpha = 0.04, 0.09, 0.05
    for estimate in (-0.9, -0.5, -0.2, 0.0, 0.3):
        p, w = mixture_sprt(estimate, v, tau2, alpha)
        lam = math.sqrt(v / (v + tau2)) * math.exp(tau2 * estimate**2 / (2 * v * (v + tau2)))
        expected = min(1.0, 1.0 / (2 * lam - 1)) if estimate < 0 and lam > 1 else 1.0
        assert p == pytest.approx(expected, rel=1e-12)
        assert (p < alpha) == (estimate + w < 0)
    # at the boundary the mixture ratio is exactly (1 + alpha) / (2 alpha), i.e. p = alpha
    _, w = mixture_sprt(-1.0, v, tau2, alpha)
    assert mixture_sprt(-w, v, tau2, alpha)[0] == pytest.approx(alpha, rel=1e-9)
    assert mixture_sprt(-1e6, 1e-6, 1.0, alpha)[0] == 0.0  # no overflow


def _false_trip_share(pc: float, pa: float, drop: float, runs: int, looks: int, per_look: int, seed: int) -> int:
    """Runs (of Bernoulli arms, ``per_look`` more units each per look) in which any of ``looks`` looks trips."""
    rng = np.random.default_rng(seed)
    g = Guardrail("conversion", max_relative_drop=drop, alpha=0.05, min_units=100)
    control = rng.binomial(per_look, pc, (runs, looks)).cumsum(axis=1)
    arm = rng.binomial(per_look, pa, (runs, looks)).cumsum(axis=1)
    tripped = 0
    for r in range(runs):
        for k in range(looks):
            n = per_look * (k + 1)
            c, a = float(control[r, k]), float(arm[r, k])  # 0/1 values: sum of squares = sum
            if evaluate_guardrail(g, Moments(n, c, c), Moments(n, a, a), 1).tripped:
                tripped += 1
                break
    return tripped


def test_false_rollback_rate_over_30_looks_stays_at_alpha() -> None:
    """An arm exactly at the bound (the least favourable null): P(trip at any of 30 looks) <= alpha = 0.05.

    A fixed-sample test checked at every look trips in ~24 % of these runs. 600 runs: the count must stay
    below the binomial(600, 0.05) quantile 0.999 (a rate at alpha exceeds it 1 time in 1000).
    """
    runs = 600
    trips = _false_trip_share(0.30, 0.30 * 0.95, 0.05, runs=runs, looks=30, per_look=300, seed=11)
    assert trips <= stats.binom.ppf(0.999, runs, 0.05), trips
    no_difference = _false_trip_share(0.30, 0.30, 0.01, runs=runs, looks=30, per_look=300, seed=12)
    assert no_difference <= stats.binom.ppf(0.999, runs, 0.05), no_difference


def test_a_true_five_percent_drop_trips_with_enough_units() -> None:
    runs = 100
    trips = _false_trip_share(0.30, 0.30 * 0.95, 0.01, runs=runs, looks=30, per_look=1000, seed=13)
    assert trips >= 50, trips  # ~75 % power at 30,000 units per arm (bench/abrouter.py measures it)


def test_evaluate_guardrails_all_arms_vs_control() -> None:
    rng = np.random.default_rng(8)

    def m(mean: float, sd: float) -> Moments:
        return Moments.of(rng.normal(mean, sd, 4000))

    per_metric = {
        "revenue": [m(10, 2), m(10, 2), m(8.5, 2)],
        "latency": [m(100, 10), m(120, 10), m(100, 10)],
    }
    verdicts = evaluate_guardrails([Guardrail("revenue"), Guardrail("latency", higher_is_better=False)], per_metric)
    assert [(v.metric, v.arm, v.tripped) for v in verdicts] == [
        ("revenue", 1, False),
        ("revenue", 2, True),
        ("latency", 1, True),
        ("latency", 2, False),
    ]
    with pytest.raises(ValueError, match=r"^per_metric: no values for guardrail metric 'errors'"):
        evaluate_guardrails([Guardrail("errors")], per_metric)
    with pytest.raises(ValueError, match=r"^per_metric\['x'\]: needs control"):
        evaluate_guardrails([Guardrail("x")], {"x": [Moments()]})


@pytest.mark.parametrize(
    ("guardrail", "field"),
    [
        (Guardrail(""), "metric"),
        (Guardrail("m", max_relative_drop=0.0), "max_relative_drop"),
        (Guardrail("m", max_relative_drop=1.0), "max_relative_drop"),
        (Guardrail("m", max_relative_drop=math.nan), "max_relative_drop"),
        (Guardrail("m", alpha=0.0), "alpha"),
        (Guardrail("m", alpha=0.5), "alpha"),
        (Guardrail("m", min_units=1), "min_units"),
    ],
)
def test_guardrail_validate_names_the_field(guardrail: Guardrail, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        guardrail.validate()
    with pytest.raises(ValueError, match=f"^{field}: "):
        evaluate_guardrail(guardrail, Moments.of(np.ones(200)), Moments.of(np.ones(200)), 1)


def test_evaluate_guardrail_bad_moments() -> None:
    with pytest.raises(ValueError, match=r"^control: must be guardmesh.stats.Moments"):
        evaluate_guardrail(Guardrail("m"), np.ones(3), Moments(), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^arm: count must be >= 0 and sums finite"):
        evaluate_guardrail(Guardrail("m"), Moments(), Moments(3, math.inf, 1.0), 1)
    with pytest.raises(ValueError, match=r"^arm_index: must be an integer >= 1"):
        evaluate_guardrail(Guardrail("m"), Moments(), Moments(), 0)


# ------------------------------------------------------------------------------------- per-unit values


def _observations(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exposed units 0..199 in arms 0/1; observations on some units, several on a few."""
    rng = np.random.default_rng(seed)
    arms = rng.integers(0, 2, 200)
    rows = rng.integers(0, 120, 400)  # units 120..199 stay silent
    return arms, rows, rng.exponential(3.0, 400)


@pytest.mark.parametrize("kind", [MetricKind.EVENT, MetricKind.CONTINUOUS])
def test_arm_statistics_equal_the_per_unit_definition(kind: MetricKind) -> None:
    arms, rows, values = _observations(5)
    statistics = ArmStatistics(kind, 2)
    for row, value in zip(rows.tolist(), values.tolist(), strict=True):
        statistics.observe(row, int(arms[row]), value)
    sums = np.bincount(rows, weights=values, minlength=200)
    counts = np.bincount(rows, minlength=200)
    exposed = np.bincount(arms, minlength=2)
    for arm in (0, 1):
        if kind is MetricKind.EVENT:  # sum per unit; silent exposed units count 0
            per_unit = sums[arms == arm]
        else:  # mean per unit; silent units left out
            seen = (arms == arm) & (counts > 0)
            per_unit = sums[seen] / counts[seen]
        got = statistics.moments(arm, int(exposed[arm]))
        assert got.count == per_unit.size
        assert got.mean == pytest.approx(per_unit.mean(), rel=1e-12)
        assert got.variance == pytest.approx(per_unit.var(ddof=1), rel=1e-9)
    assert kind.aggregate == ("sum" if kind is MetricKind.EVENT else "mean")
