"""Guardrail metrics: roll an arm back to control when it makes a metric worse, with statistical support.

An experiment optimises one metric but must not quietly damage others (latency, errors, revenue). Each guardrail
names a metric and how much worse an arm may be than control (``max_relative_drop``). An arm *trips* the
guardrail, and the router sends its traffic back to control, only when all three hold:

1. both the control and the arm have at least ``min_units`` units with a value (no decisions on a handful);
2. the point estimate is worse than the bound: ``relative_change <= -max_relative_drop``;
3. a one-sided test says so with ``p < alpha``.

Effect and test
---------------
Values are per unit (one number per exposed unit; NaN = the unit has no value and is left out). With
``s = +1`` for higher-is-better and ``-1`` for lower-is-better, ``d = s * (arm_mean - control_mean)`` is the
change in the "better" direction, and ``relative_change = d / |control_mean|`` (negative = worse; latency up 10 %
on a lower-is-better metric is -0.10).

The test is non-inferiority turned around: H0 "the arm is at most ``max_relative_drop`` worse"
(``d >= -drop * |control_mean|``, e.g. ``arm >= (1 - drop) * control``) against H1 "worse than that". The
statistic ``L = d + drop * |control_mean|`` is a linear combination of the two means, ``s * arm_mean - g *
control_mean`` with ``g = s - drop * sign(control_mean)``, so its standard error is
``sqrt(var_arm / n_arm + g^2 var_control / n_control)`` and ``p = P(T <= L / se)`` with T Student-t on the
Welch-Satterthwaite degrees of freedom (at the unit counts guardrails need, the normal approximation).

Control mean of zero
--------------------
A change relative to 0 is undefined, so when ``|control_mean|`` is zero (below 1e-12 of the largest value's
magnitude) the scale is the pooled within-arm standard deviation instead: ``relative_change = d / sd_pooled``
(a standardised effect, Cohen's d) and the bound is ``d >= -drop * sd_pooled`` with ``sd_pooled`` taken as fixed.
If both arms have no spread, the standard deviation of all values together is used; if that is 0 too, every value
is equal and the change is 0. Zero variance elsewhere gives ``se = 0``: the sign of ``L`` then decides exactly
(``p = 0`` when ``L < 0``, else 1). Nothing here produces a NaN from a division by zero.

Inputs break their rule with a ValueError whose message is ``"<field>: <rule>"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: |control_mean| at or below this share of the largest |value| counts as a zero control mean.
ZERO_MEAN_RTOL = 1e-12


@dataclass(frozen=True)
class Guardrail:
    """A metric an arm must not make worse than ``max_relative_drop`` (with significance ``alpha``)."""

    metric: str
    higher_is_better: bool = True
    max_relative_drop: float = 0.05
    alpha: float = 0.05
    min_units: int = 100

    def validate(self) -> None:
        """metric non-empty; 0 < max_relative_drop < 1; 0 < alpha < 0.5; min_units an integer >= 2."""
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError("metric: must be a non-empty string")
        if not isinstance(self.higher_is_better, bool | np.bool_):
            raise ValueError("higher_is_better: must be a bool")
        if not _real(self.max_relative_drop) or not 0 < self.max_relative_drop < 1:
            raise ValueError(f"max_relative_drop: must be in (0, 1) (got {self.max_relative_drop})")
        if not _real(self.alpha) or not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha: must be in (0, 0.5) (got {self.alpha})")
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int | np.integer):
            raise ValueError("min_units: must be an integer")
        if self.min_units < 2:
            raise ValueError(f"min_units: must be >= 2 (got {self.min_units})")


@dataclass(frozen=True)
class GuardrailVerdict:
    """The comparison of one arm with control on one guardrail metric.

    ``relative_change`` is signed so that negative means worse (see the module docstring); ``p_value`` is the
    one-sided p-value of "worse than the bound" (NaN when an arm has fewer than 2 units).
    """

    metric: str
    arm: int
    n_control: int
    n_arm: int
    control_mean: float
    arm_mean: float
    relative_change: float
    p_value: float
    tripped: bool
    reason: str


def _real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _values(values: np.ndarray, name: str) -> np.ndarray:
    """Finite float64 values of a 1-D array, NaN (missing) left out; ValueError naming ``name`` otherwise."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be numeric per-unit values ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D (one value per unit), got shape {arr.shape}")
    present = arr[~np.isnan(arr)]
    if not np.all(np.isfinite(present)):
        raise ValueError(f"{name}: values must be finite (NaN marks a missing value)")
    return present


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    n = x.shape[0]
    if n == 0:
        return math.nan, math.nan
    mean = float(np.mean(x))
    var = float(np.var(x, ddof=1)) if n >= 2 else math.nan
    return mean, var


def evaluate_guardrail(guardrail: Guardrail, control: np.ndarray, arm_values: np.ndarray, arm: int) -> GuardrailVerdict:
    """Compare ``arm_values`` (arm ``arm``) with ``control`` (arm 0) on ``guardrail``: tripped or not, and why."""
    guardrail.validate()
    if isinstance(arm, bool) or not isinstance(arm, int | np.integer) or arm < 1:
        raise ValueError(f"arm: must be an integer >= 1 (arm 0 is control), got {arm!r}")
    c = _values(control, "control")
    a = _values(arm_values, "arm_values")
    n_c, n_a = int(c.shape[0]), int(a.shape[0])
    mean_c, var_c = _mean_var(c)
    mean_a, var_a = _mean_var(a)
    drop = float(guardrail.max_relative_drop)
    sign = 1.0 if guardrail.higher_is_better else -1.0

    def verdict(relative: float, p: float, tripped: bool, reason: str) -> GuardrailVerdict:
        return GuardrailVerdict(guardrail.metric, int(arm), n_c, n_a, mean_c, mean_a, relative, p, tripped, reason)

    if n_c == 0 or n_a == 0:
        return verdict(math.nan, math.nan, False, _insufficient(n_c, n_a, guardrail.min_units))

    d = sign * (mean_a - mean_c)
    largest = max(float(np.max(np.abs(c))), float(np.max(np.abs(a))))
    if abs(mean_c) > ZERO_MEAN_RTOL * largest:
        scale = abs(mean_c)
        g = sign - drop * math.copysign(1.0, mean_c)  # L = sign * arm_mean - g * control_mean
    else:
        scale = _pooled_sd(c, a, var_c, var_a)
        g = sign  # the scale is taken as fixed: L = sign * (arm_mean - control_mean) + drop * scale
    relative = d / scale if scale > 0 else 0.0
    limit = d + drop * scale  # L: < 0 means worse than the bound

    p = math.nan
    if n_c >= 2 and n_a >= 2:
        p = _p_worse(limit, var_a / n_a, g * g * var_c / n_c, n_a, n_c)

    if n_c < guardrail.min_units or n_a < guardrail.min_units:
        return verdict(relative, p, False, _insufficient(n_c, n_a, guardrail.min_units))
    if relative > -drop:
        return verdict(relative, p, False, f"within bound (change {relative:+.2%}, bound -{drop:.2%})")
    if not p < guardrail.alpha:
        return verdict(relative, p, False, f"not significant (p={p:.3g}, alpha={guardrail.alpha:g})")
    reason = f"worse than bound (change {relative:+.2%}, bound -{drop:.2%}; p={p:.3g} < alpha={guardrail.alpha:g})"
    return verdict(relative, p, True, reason)


def _insufficient(n_c: int, n_a: int, min_units: int) -> str:
    return f"insufficient units (n={n_c} control, n={n_a} arm; need {min_units} each)"


def _pooled_sd(c: np.ndarray, a: np.ndarray, var_c: float, var_a: float) -> float:
    """Pooled within-arm SD; the SD of all values together if that is 0 or undefined; 0 if all values are equal."""
    n_c, n_a = c.shape[0], a.shape[0]
    dof = (n_c - 1) + (n_a - 1)
    if dof > 0:
        ss = (n_c - 1) * (0.0 if n_c < 2 else var_c) + (n_a - 1) * (0.0 if n_a < 2 else var_a)
        pooled = math.sqrt(max(ss / dof, 0.0))
        if pooled > 0:
            return pooled
    both = np.concatenate([c, a])
    return float(np.std(both, ddof=1)) if both.shape[0] >= 2 else 0.0


def _p_worse(limit: float, va: float, vc: float, n_a: int, n_c: int) -> float:
    """One-sided Welch p-value of "L < 0" given ``L`` and the two variance terms of its standard error."""
    se2 = va + vc
    if not se2 > 0:
        return 0.0 if limit < 0 else 1.0
    denom = (va * va) / (n_a - 1) + (vc * vc) / (n_c - 1)
    df = se2 * se2 / denom if denom > 0 else math.inf
    z = limit / math.sqrt(se2)
    return float(stats.norm.cdf(z)) if math.isinf(df) else float(stats.t.cdf(z, df))


def evaluate_guardrails(
    guardrails: Sequence[Guardrail], per_metric: Mapping[str, Sequence[np.ndarray]]
) -> list[GuardrailVerdict]:
    """Every non-control arm against arm 0 on every guardrail; ``per_metric[metric][arm]`` = per-unit values.

    Verdicts come in guardrail order, then arm order.
    """
    verdicts: list[GuardrailVerdict] = []
    for i, guardrail in enumerate(guardrails):
        if not isinstance(guardrail, Guardrail):
            raise ValueError(f"guardrails[{i}]: must be a Guardrail")
        guardrail.validate()
        if guardrail.metric not in per_metric:
            raise ValueError(f"per_metric: no values for guardrail metric {guardrail.metric!r}")
        arms = per_metric[guardrail.metric]
        if len(arms) < 2:
            raise ValueError(f"per_metric[{guardrail.metric!r}]: needs control (arm 0) and at least one arm")
        for arm in range(1, len(arms)):
            verdicts.append(evaluate_guardrail(guardrail, arms[0], arms[arm], arm))
    return verdicts
