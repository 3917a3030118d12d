"""A/B effect estimates that say where an effect comes from, not only how big it is.

A news recommender once reported "+15 % clicks" for a new ranker. The lift was real in the data and gone in
production: the treatment's items had been shown in better slots, users clicked the new thing because it was new,
and a few heavy users carried most of the difference. A headline effect with a confidence interval exposes none of
that, so for one metric and one treatment arm against control ``analyze_metric`` reports, beside the raw
difference of per-unit means:

* the **bootstrap CI** (BCa), the **Welch p-value** and **P(treatment better)**;
* **CUPED** (pre-period covariate) effect, CI and variance reduction;
* the **winsorised** effect and the effect **without the top 1 %** of units, and the share of the effect those
  units carry (heavy users);
* the **position-corrected** effect, post-stratified on the slot each unit saw (position bias);
* the **weighted** (Hajek/IPW) effect when the assignment was not uniform (bandits, reweighting);
* the **daily** effect by day since first exposure and its trend (novelty / primacy);
* the **corrected** effect, all corrections chained, and ``correction_factor = corrected / raw``: far from 1 means
  the headline number is not the effect.

``analyze_experiment`` runs it for every metric x every treatment arm (the multi-metric table). No gRPC here.

Units and observations
----------------------
Units are the *exposed* units (one row each, ``unit_arms``); observations (``obs_*``) belong to a unit. The
per-unit value is the sum of its observations (a unit with none counts as 0: the exposure happened, the click did
not) or, with ``aggregate="mean"``, their mean (a unit with none is left out: a mean of nothing is no value).
Every statistic below is over per-unit values of the control and treatment units (units are the randomisation
unit; observations of a unit are not independent). "Higher is better" throughout: ``prob_treatment_better`` is
P(treatment mean > control mean).

Confidence interval: the bootstrap
----------------------------------
BCa (bias-corrected and accelerated) percentile interval of the difference of means, resampling the two arms
independently (two independent samples), ``n_resamples`` resamples:

* up to ``SCIPY_BOOTSTRAP_MAX_UNITS`` units (both arms) through ``scipy.stats.bootstrap(method="BCa")`` as is;
* above, scipy's jackknife for the acceleration is O(n^2) and its index resampling O(n) per resample, so the same
  interval is computed here in O(n) plus the resamples: the jackknife of a difference of means is exact in closed
  form (leaving unit i out of an arm moves its mean by ``(mean - x_i) / (n - 1)``, so scipy's ``U_i`` is
  ``x_i - mean``, negated for control), and the resamples are drawn in an exactly equivalent, cheaper way: a
  resample's mean depends only on how many draws land on each unit, and draws landing on units that share a value
  are interchangeable, so the counts on each value held by >= ``TIE_CATEGORY_MIN`` units are one
  ``Generator.multinomial`` draw (with a last category "any other unit"), and only the draws landing on the other
  units are drawn one by one (``Generator.integers``). 0/1 and count metrics (clicks, conversions) then cost
  O(distinct values) per resample, zero-inflated ones (revenue) O(non-zero units), continuous ones O(n).
  The resampling distribution is exactly the ordinary bootstrap's; only the random stream differs from scipy's.
* **Cap**: where ``n_resamples`` resamples would cost more than ``BOOTSTRAP_DRAW_BUDGET`` single draws (both arms),
  the number of resamples is lowered to ``max(MIN_CAPPED_RESAMPLES, budget / draws per resample)`` (but never
  raised); the scipy path, which holds every resample in memory, is capped the same way at ``SCIPY_DRAW_BUDGET``
  draws (resamples x units). At the default 2,000 resamples that happens only for large continuous metrics
  (e.g. > 50,000 units with continuous values at 2,000 resamples), where the Monte-Carlo error of a 95 %
  endpoint at 500 resamples is ~0.12 standard errors (vs ~0.06 at 2,000). ``MetricAnalysis.ci_method`` says
  which path ran and with how many resamples.

If both arms are constant the interval is the point (``effect, effect``). CUPED's CI bootstraps the adjusted values
with the coefficient held at its full-sample estimate (its sampling error is O(1/n) in the effect, negligible).

p-value and P(better)
---------------------
``p_value`` is Welch's two-sided t-test from the arms' means and variances (ddof=1). When the standard error is 0
(both arms constant) it is 1.0 if the means are equal and 0.0 if not; with fewer than 2 units in an arm it is NaN.
``prob_treatment_better``: if every per-unit value is 0 or 1, Beta(1 + successes, 1 + failures) posteriors per arm
(uniform priors) and ``BETA_DRAWS`` seeded Monte-Carlo draws of each; otherwise the normal approximation
``Phi(effect / se)`` with the Welch standard error (flat priors on the two means).

CUPED
-----
Covariates: the unit's pre-period value, NaN filled with the mean of the present ones, plus a "pre missing"
indicator when some units lack it (new users behave differently: the indicator absorbs that instead of biasing
the coefficient). ``theta`` is the pooled (both arms) OLS coefficient vector of the per-unit value on the centred
covariates; the adjusted value is ``y - (X - mean(X)) @ theta``. ``variance_reduction`` is ``1 - Var(effect,
adjusted) / Var(effect, raw)`` with ``Var(effect) = s_t^2/n_t + s_c^2/n_c`` (within-arm variances, so the effect
itself does not inflate it): ~rho^2 for a pre/post correlation rho. None of the three CUPED fields is set without
``unit_pre`` or when no unit has a pre-period value.

Heavy users
-----------
``winsorized_effect`` clips per-unit values from above at the ``winsor_quantile`` quantile of the two arms pooled
(``numpy.quantile``, linear). ``effect_without_top`` drops the top ``TOP_FRACTION`` (1 %) of the pooled units by
value, exactly ``0.01 * n`` units: units tied at the cut-off value are dropped fractionally, the same fraction in
both arms (weights), so ties - e.g. many units with one click - never drop one arm's units before the other's.
``top_share_of_effect = 1 - effect_without_top / effect``.

Position bias, weights
----------------------
``position_corrected_effect`` post-stratifies on ``unit_position``: ``sum_s w_s (mean_t,s - mean_c,s)`` with ``w_s``
the pooled share of units at position s; positions with no unit in one of the arms are dropped and the weights
renormalised. Unknown position (-1) is a stratum of its own (dropping those units could bias). ``weighted_effect``
is the Hajek difference ``sum(w y) / sum(w)`` per arm with ``unit_weights``.

Novelty and primacy
-------------------
Day d is ``floor(obs_days)``. The effect on day d compares the units of each arm with an observation on day d, each
with its aggregate of that day's observations. Its trend is a weighted least-squares line through the daily
effects (days with >= 2 units per arm and some spread), weights ``1 / se_d^2``; the slope's standard error is
scaled by ``sqrt(max(1, residual chi^2 / (days - 2)))`` (day-to-day variation beyond sampling noise widens it, never
narrows it) and the two-sided p-value is Student-t on ``days - 2`` degrees of freedom. ``early_effect`` is the
inverse-variance mean of days 0-2, ``late_effect`` that of the last third of those days. **Novelty**: slope < 0 with
p < 0.05 and early > late (the effect wears off). **Primacy**: the mirror, slope > 0 with p < 0.05 and early < late
(users need time to learn the change). Fewer than 3 usable days give a NaN slope and neither flag.

Corrected effect
----------------
The chain, each step on the previous one's output: winsorised per-unit values; CUPED-adjusted (theta re-estimated
on them) when ``unit_pre`` is given; post-stratified on position when ``unit_position`` is given; Hajek-weighted
(within strata, with weighted stratum shares) when ``unit_weights`` are given.
``correction_factor = corrected_effect / effect`` (NaN when the effect is 0).

``detail`` spells the findings out in words: novelty/primacy, and each correction (without the top 1 %, position,
the full chain) that moves the effect by more than half the CI width - material against the uncertainty, where
on a noise effect a ratio such as ``top_share_of_effect`` is noise itself.

Inputs break their rule with a ValueError whose message is ``"<field>: <rule>"``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from guardmesh.sdk.abrouter import DailyEffect, Interval, MetricAnalysis
from guardmesh.stats import mean_var

__all__ = [
    "AGGREGATES",
    "BETA_DRAWS",
    "BOOTSTRAP_DRAW_BUDGET",
    "EARLY_DAYS",
    "MIN_CAPPED_RESAMPLES",
    "NOVELTY_ALPHA",
    "SCIPY_BOOTSTRAP_MAX_UNITS",
    "SCIPY_DRAW_BUDGET",
    "TIE_CATEGORY_MIN",
    "TOP_FRACTION",
    "DailyEffect",
    "Interval",
    "MetricAnalysis",
    "MetricInput",
    "analyze_experiment",
    "analyze_metric",
]

AGGREGATES = ("sum", "mean")
#: Share of the pooled units dropped by ``effect_without_top``.
TOP_FRACTION = 0.01
#: Days 0 .. EARLY_DAYS - 1 make the "early" effect.
EARLY_DAYS = 3
NOVELTY_ALPHA = 0.05
#: Up to this many units (both arms) the CI is ``scipy.stats.bootstrap`` itself.
SCIPY_BOOTSTRAP_MAX_UNITS = 2_000
#: Single draws (both arms, all resamples) one bootstrap CI may cost before ``n_resamples`` is capped.
BOOTSTRAP_DRAW_BUDGET = 100_000_000
#: Draws (resamples x units) scipy's bootstrap may hold in memory before ``n_resamples`` is capped.
SCIPY_DRAW_BUDGET = 20_000_000
#: Resamples a capped bootstrap keeps at least.
MIN_CAPPED_RESAMPLES = 500
#: A value held by at least this many units of an arm is one multinomial category in the resampling.
TIE_CATEGORY_MIN = 16
#: Monte-Carlo draws per Beta posterior.
BETA_DRAWS = 200_000

# scipy >= 1.15 takes the generator as ``rng`` (``random_state`` is deprecated there); older versions only as
# ``random_state``: pyproject allows scipy >= 1.11.
_BOOTSTRAP_RNG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
_CATEGORY_COST = 15.0  # a multinomial category costs about as much as this many single draws
_CHUNK_DRAWS = 1 << 22  # single draws per vectorised resampling chunk (bounds memory)


@dataclass(frozen=True)
class MetricInput:
    """One metric of one experiment: exposed units and their observations (see the module docstring)."""

    metric: str
    unit_arms: np.ndarray
    """int, arm index per exposed unit (0 = control)."""
    obs_unit: np.ndarray
    """int, index into ``unit_arms`` per observation."""
    obs_value: np.ndarray
    """float64, value per observation."""
    obs_days: np.ndarray
    """float64, days between the unit's first exposure and the observation (>= 0)."""
    unit_pre: np.ndarray | None = None
    """float64 per unit: pre-period value (CUPED covariate), NaN = none."""
    unit_position: np.ndarray | None = None
    """int per unit: position/slot code (-1 = unknown), for position-bias correction."""
    unit_weights: np.ndarray | None = None
    """float64 per unit: reweighting or IPW weights (1.0 = none)."""
    aggregate: str = "sum"
    """Per-unit aggregation of observations: "sum" (no observation = 0) or "mean" (no observation = left out)."""


def _int_array(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "b" or (arr.size and arr.dtype.kind != "f"):
            raise ValueError(f"{name}: must be integers, got dtype {arr.dtype}")
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name}: must be integers, got non-integral values")
    return arr.astype(np.int64, copy=False)


def _float_array(value: object, name: str, size: int | None, *, allow_nan: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be numeric ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name}: length must match {_LENGTH_OF[name]} ({size}), got {arr.shape[0]}")
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if bad.any():
        rule = "must be finite or NaN (NaN = none)" if allow_nan else "must be finite"
        raise ValueError(f"{name}: {rule}, got {arr[bad][0]} at index {int(np.flatnonzero(bad)[0])}")
    return arr


_LENGTH_OF = {
    "obs_value": "obs_unit",
    "obs_days": "obs_unit",
    "unit_pre": "unit_arms",
    "unit_position": "unit_arms",
    "unit_weights": "unit_arms",
}


@dataclass(frozen=True)
class _Checked:
    arms: np.ndarray
    obs_unit: np.ndarray
    obs_value: np.ndarray
    obs_days: np.ndarray
    pre: np.ndarray | None
    position: np.ndarray | None
    weights: np.ndarray | None


def _check_input(data: MetricInput) -> _Checked:
    if not isinstance(data.metric, str) or not data.metric:
        raise ValueError("metric: must be a non-empty string")
    if data.aggregate not in AGGREGATES:
        raise ValueError(f"aggregate: must be one of {AGGREGATES}, got {data.aggregate!r}")
    arms = _int_array(data.unit_arms, "unit_arms")
    if arms.size and arms.min() < 0:
        raise ValueError(f"unit_arms: arm indices must be >= 0, got {int(arms.min())}")
    n_units = arms.shape[0]
    obs_unit = _int_array(data.obs_unit, "obs_unit")
    if obs_unit.size and (obs_unit.min() < 0 or obs_unit.max() >= n_units):
        bad = obs_unit[(obs_unit < 0) | (obs_unit >= n_units)][0]
        raise ValueError(f"obs_unit: must index unit_arms (0 <= i < {n_units}), got {int(bad)}")
    n_obs = obs_unit.shape[0]
    obs_value = _float_array(data.obs_value, "obs_value", n_obs)
    obs_days = _float_array(data.obs_days, "obs_days", n_obs)
    if obs_days.size and obs_days.min() < 0:
        raise ValueError(f"obs_days: must be >= 0 (days since first exposure), got {float(obs_days.min())}")
    pre = None if data.unit_pre is None else _float_array(data.unit_pre, "unit_pre", n_units, allow_nan=True)
    position = None
    if data.unit_position is not None:
        position = _int_array(data.unit_position, "unit_position")
        if position.shape[0] != n_units:
            raise ValueError(f"unit_position: length must match unit_arms ({n_units}), got {position.shape[0]}")
        if position.size and position.min() < -1:
            raise ValueError(f"unit_position: codes must be >= 0 or -1 (unknown), got {int(position.min())}")
    weights = None
    if data.unit_weights is not None:
        weights = _float_array(data.unit_weights, "unit_weights", n_units)
        if weights.size and weights.min() < 0:
            raise ValueError(f"unit_weights: must be >= 0, got {float(weights.min())}")
    return _Checked(arms, obs_unit, obs_value, obs_days, pre, position, weights)


def _check_options(control: int, treatment: int, confidence: float, n_resamples: int, winsor_quantile: float) -> None:
    if isinstance(control, bool) or not isinstance(control, int | np.integer) or control < 0:
        raise ValueError(f"control: must be an arm index >= 0, got {control!r}")
    if isinstance(treatment, bool) or not isinstance(treatment, int | np.integer) or treatment < 0:
        raise ValueError(f"treatment: must be an arm index >= 0, got {treatment!r}")
    if control == treatment:
        raise ValueError(f"treatment: must differ from control ({control})")
    if not (isinstance(confidence, float | int) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) or n_resamples < 10:
        raise ValueError(f"n_resamples: must be an integer >= 10, got {n_resamples!r}")
    if not (isinstance(winsor_quantile, float | int) and 0.5 < winsor_quantile <= 1.0):
        raise ValueError(f"winsor_quantile: must be in (0.5, 1], got {winsor_quantile!r}")


# ------------------------------------------------------------------------------------------------ small helpers


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    """Mean and variance (ddof=1; NaN with fewer than 2 values): ``guardmesh.stats.mean_var`` of the values
    centred at their mean (a shift changes no variance, and centring keeps every digit)."""
    m = float(x.mean())
    c = x - m
    return m, float(mean_var(x.shape[0], float(c.sum()), float(c @ c))[1])


def _se2(vt: float, nt: int, vc: float, nc: int) -> float:
    return vt / nt + vc / nc


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) else math.nan


def _welch_p(effect: float, vt: float, nt: int, vc: float, nc: int) -> float:
    if nt < 2 or nc < 2:
        return math.nan
    se2 = _se2(vt, nt, vc, nc)
    if se2 == 0:
        return 1.0 if effect == 0 else 0.0
    df = se2**2 / ((vt / nt) ** 2 / (nt - 1) + (vc / nc) ** 2 / (nc - 1))
    return float(2.0 * stats.t.sf(abs(effect) / math.sqrt(se2), df))


def _prob_better(yt: np.ndarray, yc: np.ndarray, effect: float, se2: float, rng: np.random.Generator) -> float:
    binary = bool(np.all((yt == 0) | (yt == 1)) and np.all((yc == 0) | (yc == 1)))
    if binary:
        st, sc = float(yt.sum()), float(yc.sum())
        pt = rng.beta(1.0 + st, 1.0 + yt.shape[0] - st, size=BETA_DRAWS)
        pc = rng.beta(1.0 + sc, 1.0 + yc.shape[0] - sc, size=BETA_DRAWS)
        return float(np.mean(pt > pc))
    if not math.isfinite(se2):
        return math.nan
    if se2 == 0:
        return 1.0 if effect > 0 else (0.0 if effect < 0 else 0.5)
    return float(special.ndtr(effect / math.sqrt(se2)))


def _weighted_diff(y: np.ndarray, is_t: np.ndarray, w: np.ndarray) -> float:
    wt, wc = float(w[is_t].sum()), float(w[~is_t].sum())
    if wt <= 0 or wc <= 0:
        return math.nan
    return float((w[is_t] * y[is_t]).sum() / wt - (w[~is_t] * y[~is_t]).sum() / wc)


def _stratified_diff(y: np.ndarray, is_t: np.ndarray, strata: np.ndarray, w: np.ndarray | None = None) -> float:
    """``sum_s share_s (mean_t,s - mean_c,s)``, (weighted) means and pooled shares; one-sided strata dropped."""
    _, code = np.unique(strata, return_inverse=True)
    n_strata = int(code.max()) + 1
    cell = code * 2 + is_t
    size = np.bincount(cell, weights=w, minlength=2 * n_strata).reshape(n_strata, 2)
    total = np.bincount(cell, weights=y if w is None else w * y, minlength=2 * n_strata).reshape(n_strata, 2)
    both = (size[:, 0] > 0) & (size[:, 1] > 0)
    if not both.any():
        return math.nan
    share = size[both].sum(axis=1)
    share = share / share.sum()
    means = total[both] / size[both]
    return float((share * (means[:, 1] - means[:, 0])).sum())


def _top_keep_weights(y: np.ndarray, fraction: float) -> np.ndarray:
    """Weights in [0, 1] removing exactly ``fraction * n`` units from the top; ties at the cut share the cut."""
    n = y.shape[0]
    m = fraction * n
    keep = np.ones(n)
    k = math.floor(m)
    if m <= 0 or k >= n:
        return keep
    cut = np.partition(y, n - 1 - k)[n - 1 - k]  # the (k+1)-th largest value
    above = y > cut
    tied = y == cut
    n_above = int(above.sum())
    keep[above] = 0.0
    keep[tied] = 1.0 - (m - n_above) / int(tied.sum())
    return keep


def _cuped_adjust(y: np.ndarray, pre: np.ndarray) -> np.ndarray | None:
    """``y - (X - mean X) @ theta`` with pooled OLS theta; X = pre (NaN filled) and a missing indicator."""
    has = ~np.isnan(pre)
    if not has.any():
        return None
    filled = np.where(has, pre, pre[has].mean())
    columns = [filled] if has.all() else [filled, (~has).astype(np.float64)]
    x = np.column_stack(columns)
    x -= x.mean(axis=0)
    theta = np.linalg.pinv(x.T @ x) @ (x.T @ (y - y.mean()))
    return np.asarray(y - x @ theta)


# --------------------------------------------------------------------------------------------------- bootstrap


class _MeanResampler:
    """Draws bootstrap means of one sample; exact in distribution (see the module docstring)."""

    def __init__(self, x: np.ndarray) -> None:
        self.n = x.shape[0]
        values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        heavy = counts >= TIE_CATEGORY_MIN
        self.values = values[heavy]
        self.rest = x[~heavy[inverse]]
        self.probs = np.append(counts[heavy], self.rest.shape[0]) / self.n
        self.cost = self.rest.shape[0] + _CATEGORY_COST * self.values.shape[0]

    def draw(self, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
        n, n_rest = self.n, self.rest.shape[0]
        sums = np.zeros(n_resamples)
        if self.values.size:
            counts = rng.multinomial(n, self.probs, size=n_resamples)
            sums += counts[:, :-1] @ self.values
            rest_counts = counts[:, -1]
        else:
            rest_counts = np.full(n_resamples, n, dtype=np.int64)
        if n_rest:
            if n_rest == n:  # every draw lands on a single-unit value: plain fixed-size resamples
                step = max(1, _CHUNK_DRAWS // n)
                for b in range(0, n_resamples, step):
                    idx = rng.integers(0, n, size=(min(step, n_resamples - b), n))
                    sums[b : b + idx.shape[0]] = np.take(self.rest, idx).sum(axis=1)
            else:
                b = 0
                while b < n_resamples:
                    stop = b + max(1, int(np.searchsorted(np.cumsum(rest_counts[b:]), _CHUNK_DRAWS, side="right")))
                    chunk = rest_counts[b:stop]
                    nz = np.flatnonzero(chunk)
                    if nz.size:
                        drawn = np.take(self.rest, rng.integers(0, n_rest, size=int(chunk.sum())))
                        starts = np.concatenate(([0], np.cumsum(chunk[nz])[:-1]))
                        sums[b + nz] += np.add.reduceat(drawn, starts)
                    b = stop
        return sums / n


def _mean_difference(t: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(np.mean(t, axis=axis) - np.mean(c, axis=axis))


def _bootstrap_ci(
    yt: np.ndarray, yc: np.ndarray, confidence: float, n_resamples: int, rng: np.random.Generator
) -> tuple[Interval, str]:
    """BCa interval of ``mean(yt) - mean(yc)`` (two independent samples)."""
    effect = float(yt.mean() - yc.mean())
    if np.ptp(yt) == 0 and np.ptp(yc) == 0:
        return Interval(effect, effect), "degenerate: both arms constant"
    nt, nc = yt.shape[0], yc.shape[0]
    if nt + nc <= SCIPY_BOOTSTRAP_MAX_UNITS and nt >= 2 and nc >= 2:
        # scipy holds every resample in memory (resamples x units): capped like the path below, on its own budget.
        used = n_resamples
        if n_resamples * (nt + nc) > SCIPY_DRAW_BUDGET:
            used = min(n_resamples, max(MIN_CAPPED_RESAMPLES, SCIPY_DRAW_BUDGET // (nt + nc)))
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.bootstrap(
                (yt, yc),
                _mean_difference,
                n_resamples=used,
                vectorized=True,
                confidence_level=confidence,
                method="BCa",
                **{_BOOTSTRAP_RNG: rng},
            )
        ci = res.confidence_interval
        capped = f" (capped from {n_resamples})" if used < n_resamples else ""
        return Interval(float(ci.low), float(ci.high)), f"scipy.stats.bootstrap BCa, {used} resamples{capped}"
    rt, rc = _MeanResampler(yt), _MeanResampler(yc)
    cost = rt.cost + rc.cost
    used = n_resamples
    if n_resamples * cost > BOOTSTRAP_DRAW_BUDGET:
        used = min(n_resamples, max(MIN_CAPPED_RESAMPLES, int(BOOTSTRAP_DRAW_BUDGET // cost)))
    theta_b = rt.draw(used, rng) - rc.draw(used, rng)
    # BCa as scipy computes it, with the closed-form jackknife of a difference of means.
    ut, uc = yt - yt.mean(), -(yc - yc.mean())
    num = (ut**3).sum() / nt**3 + (uc**3).sum() / nc**3
    den = ((ut**2).sum() / nt**2 + (uc**2).sum() / nc**2) ** 1.5
    a_hat = num / den / 6.0 if den > 0 else 0.0
    z0 = special.ndtri((np.count_nonzero(theta_b < effect) + np.count_nonzero(theta_b <= effect)) / (2.0 * used))
    z_alpha = float(special.ndtri((1.0 - confidence) / 2.0))
    levels = []
    for z in (z_alpha, -z_alpha):
        shifted = z0 + z
        levels.append(float(special.ndtr(z0 + shifted / (1.0 - a_hat * shifted))))
    low, high = np.percentile(theta_b, [100.0 * levels[0], 100.0 * levels[1]])
    capped = f" (capped from {n_resamples})" if used < n_resamples else ""
    return Interval(float(low), float(high)), f"BCa, exact multinomial/index resampling, {used} resamples{capped}"


# ------------------------------------------------------------------------------------------------------- daily


@dataclass(frozen=True)
class _Trend:
    daily: tuple[DailyEffect, ...]
    slope: float
    p_value: float
    early: float
    late: float


def _daily_trend(
    chk: _Checked, control: int, treatment: int, mean_aggregate: bool, early_days: int = EARLY_DAYS
) -> _Trend:
    obs_arm = chk.arms[chk.obs_unit]
    keep = (obs_arm == control) | (obs_arm == treatment)
    unit = chk.obs_unit[keep]
    if unit.size == 0:
        return _Trend((), math.nan, math.nan, math.nan, math.nan)
    day_values, day_code = np.unique(np.floor(chk.obs_days[keep]), return_inverse=True)
    n_units = chk.arms.shape[0]
    key, inverse = np.unique(day_code.astype(np.int64) * n_units + unit, return_inverse=True)
    per_unit: np.ndarray = np.bincount(inverse, weights=chk.obs_value[keep])
    if mean_aggregate:
        per_unit = per_unit / np.bincount(inverse)
    key_day, key_unit = key // n_units, key % n_units
    cell = key_day * 2 + (chk.arms[key_unit] == treatment)
    size = 2 * day_values.shape[0]
    count = np.bincount(cell, minlength=size).reshape(-1, 2)
    total = np.bincount(cell, weights=per_unit, minlength=size).reshape(-1, 2)
    square = np.bincount(cell, weights=per_unit * per_unit, minlength=size).reshape(-1, 2)
    shown = (count > 0).all(axis=1)
    mean, var = mean_var(count, total, square)
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = mean[:, 1] - mean[:, 0]
        se2 = var[:, 1] / count[:, 1] + var[:, 0] / count[:, 0]
    daily = tuple(
        DailyEffect(int(day_values[i]), float(effect[i]), int(count[i, 0]), int(count[i, 1]))
        for i in np.flatnonzero(shown)
    )
    usable = shown & (count >= 2).all(axis=1) & (se2 > 0) & np.isfinite(se2)
    if usable.sum() < 3:
        return _Trend(daily, math.nan, math.nan, math.nan, math.nan)
    x, e, w = day_values[usable], effect[usable], 1.0 / se2[usable]
    xbar = (w * x).sum() / w.sum()
    ebar = (w * e).sum() / w.sum()
    sxx = (w * (x - xbar) ** 2).sum()
    slope = float((w * (x - xbar) * (e - ebar)).sum() / sxx)
    resid = e - ebar - slope * (x - xbar)
    df = x.shape[0] - 2
    dispersion = float((w * resid**2).sum() / df)
    se = math.sqrt(max(1.0, dispersion) / sxx)
    p = float(2.0 * stats.t.sf(abs(slope) / se, df)) if se > 0 else math.nan
    early_mask = x < early_days
    early = float((w[early_mask] * e[early_mask]).sum() / w[early_mask].sum()) if early_mask.any() else math.nan
    n_late = math.ceil(x.shape[0] / 3)
    late = float((w[-n_late:] * e[-n_late:]).sum() / w[-n_late:].sum())
    return _Trend(daily, slope, p, early, late)


# ----------------------------------------------------------------------------------------------------- analysis


def _per_unit(chk: _Checked, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit values and the mask of units that have one."""
    n_units = chk.arms.shape[0]
    sums = np.bincount(chk.obs_unit, weights=chk.obs_value, minlength=n_units)
    if aggregate == "sum":
        return sums, np.ones(n_units, dtype=bool)
    counts = np.bincount(chk.obs_unit, minlength=n_units)
    present = counts > 0
    return np.divide(sums, counts, out=np.zeros(n_units), where=present), present


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _findings(
    effect: float,
    ci: Interval,
    trend: _Trend,
    novelty: bool,
    primacy: bool,
    without_top: float,
    top_share: float,
    position_corrected: float | None,
    corrected: float,
) -> list[str]:
    """The ``detail`` lines. A correction is reported when it moves the effect by more than half the CI width
    (material against the uncertainty; on a noise effect the ratios alone are noise too)."""

    def moves(other: float | None) -> bool:
        return other is not None and math.isfinite(other) and abs(other - effect) > ci.width / 2

    notes = []
    if novelty or primacy:
        kind = "novelty: the effect wears off" if novelty else "primacy: the effect grows"
        notes.append(
            f"{kind} ({_fmt(trend.slope)}/day, p={trend.p_value:.2g}; days 0-2 {_fmt(trend.early)}, "
            f"late {_fmt(trend.late)})"
        )
    if moves(without_top):
        notes.append(f"heavy users: the top 1% of units carry {top_share:.0%} of the effect")
    if moves(position_corrected):
        notes.append(f"position bias: post-stratified on position the effect is {_fmt(position_corrected or 0.0)}")
    if moves(corrected):
        notes.append(f"corrections move the effect from {_fmt(effect)} to {_fmt(corrected)}")
    return notes


def analyze_metric(
    data: MetricInput,
    *,
    control: int = 0,
    treatment: int = 1,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    winsor_quantile: float = 0.99,
    seed: int = 0,
) -> MetricAnalysis:
    """Analyse one metric for ``treatment`` against ``control``: raw effect, CI, tests and every correction.

    Deterministic for a given ``seed``. Raises ValueError (``"<field>: <rule>"``) on bad input and when an arm
    has no unit (with ``aggregate="mean"``: no unit with an observation).
    """
    _check_options(control, treatment, confidence, n_resamples, winsor_quantile)
    chk = _check_input(data)
    values, present = _per_unit(chk, data.aggregate)
    sel = present & ((chk.arms == control) | (chk.arms == treatment))
    is_t = chk.arms[sel] == treatment
    y = values[sel]
    nt = int(is_t.sum())
    nc = int(y.shape[0] - nt)
    for arm, role, n in ((control, "control", nc), (treatment, "treatment", nt)):
        if n == 0:
            what = "units with an observation (aggregate='mean')" if data.aggregate == "mean" else "exposed units"
            raise ValueError(f"unit_arms: arm {arm} ({role}) has no {what} in metric {data.metric!r}")
    if chk.weights is not None:
        w_sel = chk.weights[sel]
        for arm, mask in ((control, ~is_t), (treatment, is_t)):
            if not w_sel[mask].sum() > 0:
                raise ValueError(f"unit_weights: arm {arm} has zero total weight")
    ss_ci, ss_cuped, ss_beta = np.random.SeedSequence(seed).spawn(3)

    yt, yc = y[is_t], y[~is_t]
    mt, vt = _mean_var(yt)
    mc, vc = _mean_var(yc)
    effect = mt - mc
    se2 = _se2(vt, nt, vc, nc)
    ci, ci_method = _bootstrap_ci(yt, yc, confidence, n_resamples, np.random.default_rng(ss_ci))
    p_value = _welch_p(effect, vt, nt, vc, nc)
    prob_better = _prob_better(yt, yc, effect, se2, np.random.default_rng(ss_beta))

    cuped_effect = cuped_ci = variance_reduction = None
    pre = None if chk.pre is None else chk.pre[sel]
    adjusted = None if pre is None else _cuped_adjust(y, pre)
    if adjusted is not None:
        at, ac = adjusted[is_t], adjusted[~is_t]
        _, avt = _mean_var(at)
        _, avc = _mean_var(ac)
        cuped_effect = float(at.mean() - ac.mean())
        cuped_ci, _ = _bootstrap_ci(at, ac, confidence, n_resamples, np.random.default_rng(ss_cuped))
        variance_reduction = 1.0 - _ratio(_se2(avt, nt, avc, nc), se2)

    cap = float(np.quantile(y, winsor_quantile))
    yw = np.minimum(y, cap)
    winsorized_effect = float(yw[is_t].mean() - yw[~is_t].mean())
    effect_without_top = _weighted_diff(y, is_t, _top_keep_weights(y, TOP_FRACTION))
    top_share = 1.0 - _ratio(effect_without_top, effect) if effect != 0 else math.nan

    position = None if chk.position is None else chk.position[sel]
    position_corrected = None if position is None else _stratified_diff(y, is_t, position)
    weights = None if chk.weights is None else chk.weights[sel]
    weighted_effect = None if weights is None else _weighted_diff(y, is_t, weights)

    chained = yw
    if pre is not None:
        adjusted_w = _cuped_adjust(yw, pre)
        chained = yw if adjusted_w is None else adjusted_w
    strata = position if position is not None else np.zeros(y.shape[0], dtype=np.int64)
    corrected = _stratified_diff(chained, is_t, strata, weights)
    correction_factor = _ratio(corrected, effect)

    trend = _daily_trend(chk, control, treatment, data.aggregate == "mean")
    significant = math.isfinite(trend.p_value) and trend.p_value < NOVELTY_ALPHA
    novelty = bool(significant and trend.slope < 0 and trend.early > trend.late)
    primacy = bool(significant and trend.slope > 0 and trend.early < trend.late)

    notes = _findings(effect, ci, trend, novelty, primacy, effect_without_top, top_share, position_corrected, corrected)
    return MetricAnalysis(
        metric=data.metric,
        control=int(control),
        treatment=int(treatment),
        n_control=nc,
        n_treatment=nt,
        control_mean=mc,
        treatment_mean=mt,
        effect=effect,
        relative_effect=_ratio(effect, mc),
        ci=ci,
        p_value=p_value,
        prob_treatment_better=prob_better,
        cuped_effect=cuped_effect,
        cuped_ci=cuped_ci,
        variance_reduction=variance_reduction,
        winsorized_effect=winsorized_effect,
        effect_without_top=effect_without_top,
        top_share_of_effect=top_share,
        position_corrected_effect=position_corrected,
        weighted_effect=weighted_effect,
        daily=trend.daily,
        novelty_slope=trend.slope,
        novelty_p_value=trend.p_value,
        novelty=novelty,
        corrected_effect=corrected,
        correction_factor=correction_factor,
        primacy=primacy,
        early_effect=trend.early,
        late_effect=trend.late,
        ci_method=ci_method,
        detail="; ".join(notes),
    )


def analyze_experiment(inputs: Sequence[MetricInput], n_arms: int, **options: Any) -> list[MetricAnalysis]:
    """Every metric x every treatment arm (``1 .. n_arms - 1`` except ``control``) against control.

    ``options`` are ``analyze_metric``'s keywords except ``treatment``. Results are metric-major, arms ascending.
    """
    if isinstance(n_arms, bool) or not isinstance(n_arms, int | np.integer) or n_arms < 2:
        raise ValueError(f"n_arms: must be an integer >= 2, got {n_arms!r}")
    if "treatment" in options:
        raise ValueError("treatment: analyze_experiment compares every arm with control; do not pass it")
    control = options.get("control", 0)
    if isinstance(control, bool) or not isinstance(control, int | np.integer) or not 0 <= control < n_arms:
        raise ValueError(f"control: must be an arm index in [0, {n_arms}), got {control!r}")
    names = [m.metric for m in inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"metric: names must be unique, got duplicates {duplicates}")
    results = []
    for data in inputs:
        arms = np.asarray(data.unit_arms)
        if arms.size and arms.ndim == 1 and arms.dtype.kind in "iuf" and np.nanmax(arms) >= n_arms:
            raise ValueError(f"unit_arms: arm indices must be < n_arms ({n_arms}) in metric {data.metric!r}")
        for arm in range(n_arms):
            if arm != control:
                results.append(analyze_metric(data, treatment=arm, **options))
    return results
