"""Guardrail metrics: roll an arm back to control when it makes a metric worse, on an always-valid sequential test.

An experiment optimises one metric but must not quietly damage others (latency, errors, revenue). Each guardrail
names a metric and how much worse an arm may be than control (``max_relative_drop``). The router looks at the
guardrails every few seconds for as long as the experiment runs, so the test must hold however often it looks: a
fixed-sample test checked at every look trips far more often than its alpha (9.5 % of no-difference runs over 30
looks at alpha 0.05 in the review that asked for this). An arm *trips* the guardrail, and the router sends its
traffic back to control, only when both hold:

1. both the control and the arm have at least ``min_units`` units with a value (no decisions on a handful, and
   the normal approximation below needs a sample);
2. the always-valid upper confidence bound of the arm's relative change is below ``-max_relative_drop``
   (equivalently: the sequential p-value of "worse than the bound" is below ``alpha``).

Values
------
Per-unit values follow the metric's declared kind (:mod:`services.abrouter.metrics`: EVENT = sum of the unit's
observations with silent exposed units counting 0, CONTINUOUS = mean with silent units left out), and arrive as
per-arm moments (count, sum, sum of squares; :class:`guardmesh.stats.Moments`) kept incrementally by the router.

Effect
------
With ``s = +1`` for higher-is-better and ``-1`` for lower-is-better, ``d = s * (arm_mean - control_mean)`` is the
change in the "better" direction and ``relative_change = d / |control_mean|`` (negative = worse; latency up 10 %
on a lower-is-better metric is -0.10). H0 "the arm is at most ``max_relative_drop`` worse" is ``L >= 0`` for
``L = d + drop * |control_mean|``, a linear combination ``s * arm_mean - g * control_mean`` of the two means with
``g = s - drop * sign(control_mean)``, so ``Var(L) = v = var_arm / n_arm + g^2 var_control / n_control``.

Sequential test (mixture SPRT)
------------------------------
The mixture sequential probability ratio test of Optimizely's Stats Engine (Johari, Koomen, Pekelis and Walsh,
"Peeking at A/B Tests", KDD 2017; the same normal-mixture boundary as Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021, and the asymptotic
confidence sequences Eppo uses): with the estimate ``L`` approximately normal with variance ``v`` and a normal
mixing distribution of variance ``tau^2`` over the true ``L``,

    Lambda = sqrt(v / (v + tau^2)) * exp(tau^2 L^2 / (2 v (v + tau^2)))

is (asymptotically) a nonnegative martingale under ``L_true = 0``, so by Ville's inequality
``P(Lambda >= 1/alpha at any look) <= alpha`` however many looks there are.

The guardrail is one-sided. The symmetric mixture is the average of two one-sided mixtures (over positive and
over negative true effects), each a martingale; while ``L < 0`` the positive one is at most 1, so the negative
one is at least ``2 Lambda - 1``, and Ville's inequality applied to it makes ``p = 1 / (2 Lambda - 1)`` (capped
at 1; 1 when ``L >= 0``) an always-valid one-sided p-value. The matching one-sided confidence bound is ``L + w``
with

    w = sqrt(2 v (v + tau^2) / tau^2 * (log((1 + alpha) / (2 alpha)) + log((v + tau^2) / v) / 2)),

and the guardrail trips when ``L + w < 0`` (exactly when ``p < alpha``), i.e. when the upper bound
``bound = relative_change + w / scale`` of the relative change is below ``-drop``. The mixing standard deviation
is ``tau = MIXING_SD_IN_DROPS * drop * scale``. ``scale`` (and the variances) are estimates plugged in, as in the
asymptotic confidence sequences; under an arm exactly at the bound (the least favourable case) the false-trip
rate over 30 looks is measured in ``bench/abrouter.py`` and asserted with a binomial bound in the tests.

Control mean of zero
--------------------
A change relative to 0 is undefined, so when ``|control_mean|`` is zero (at most 1e-12 of the larger root mean
square of the two arms) the scale is the pooled within-arm standard deviation instead: ``relative_change`` is
then the standardised mean difference (``d / sd_pooled``, ``guardmesh.stats.pooled_sd``) and the bound
``d >= -drop * sd_pooled`` with ``sd_pooled`` taken as fixed. If both arms have no spread, the standard deviation
of all values together is used; if that is 0 too, every value is equal and the change is 0. Zero variance
elsewhere gives ``v = 0``: the sign of ``L`` then decides exactly (``p = 0`` when ``L < 0``, else 1). Nothing
here produces a NaN from a division by zero.

Inputs break their rule with a ValueError whose message is ``"<field>: <rule>"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from guardmesh.stats import Moments, mean_var, pooled_sd

#: |control_mean| at or below this share of the larger root mean square of the arms counts as a zero mean.
ZERO_MEAN_RTOL = 1e-12
#: The mixing distribution's standard deviation in units of the bound (``tau = 4 * drop * scale``): weight on
#: effects a few times the bound, the size a guardrail must catch. Any fixed value keeps the false-trip rate;
#: this one only moves power (bench/abrouter.py: 3x to 8x were within a few points of each other).
MIXING_SD_IN_DROPS = 4.0


@dataclass(frozen=True)
class Guardrail:
    """A metric an arm must not make worse than ``max_relative_drop`` (sequential test at level ``alpha``)."""

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
    """The comparison of one arm with control on one guardrail metric at one look.

    ``relative_change`` is signed so that negative means worse (see the module docstring); ``bound`` is the
    always-valid upper confidence bound of the relative change (trips below ``-max_relative_drop``; NaN when an
    arm has fewer than 2 units); ``p_value`` the always-valid p-value of "worse than the bound".
    """

    metric: str
    arm: int
    n_control: int
    n_arm: int
    control_mean: float
    arm_mean: float
    relative_change: float
    bound: float
    p_value: float
    tripped: bool
    reason: str


def _real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _moments(value: object, name: str) -> Moments:
    if not isinstance(value, Moments):
        raise ValueError(f"{name}: must be guardmesh.stats.Moments, got {type(value).__name__}")
    if value.count < 0 or not (math.isfinite(value.total) and math.isfinite(value.total_sq)):
        raise ValueError(f"{name}: count must be >= 0 and sums finite")
    return value


def mixture_sprt(estimate: float, variance: float, tau2: float, alpha: float) -> tuple[float, float]:
    """``(one-sided p, half-width w)`` of the normal-mixture SPRT of "``estimate`` < 0" (see the module docstring).

    ``variance`` is the estimate's variance ``v`` and ``tau2`` the mixing variance (both > 0). ``p`` is
    ``1 / (2 Lambda - 1)`` capped at 1 when ``estimate < 0``, else 1; ``p < alpha`` exactly when
    ``estimate + w < 0``. Computed in log space, so a huge ``Lambda`` never overflows.
    """
    total = variance + tau2
    log_lambda = 0.5 * math.log(variance / total) + tau2 * estimate * estimate / (2.0 * variance * total)
    p = 1.0
    if estimate < 0 and log_lambda > 0:
        inverse = math.exp(-log_lambda)  # 1 / Lambda in (0, 1)
        p = inverse / (2.0 - inverse)
    level = math.log((1.0 + alpha) / (2.0 * alpha))
    width = math.sqrt(2.0 * variance * total / tau2 * (level + 0.5 * math.log(total / variance)))
    return p, width


def evaluate_guardrail(guardrail: Guardrail, control: Moments, arm: Moments, arm_index: int) -> GuardrailVerdict:
    """Compare arm ``arm_index`` (moments ``arm``) with control (arm 0) on ``guardrail`` at this look."""
    guardrail.validate()
    if isinstance(arm_index, bool) or not isinstance(arm_index, int | np.integer) or arm_index < 1:
        raise ValueError(f"arm_index: must be an integer >= 1 (arm 0 is control), got {arm_index!r}")
    c, a = _moments(control, "control"), _moments(arm, "arm")
    n_c, n_a = c.count, a.count
    mean_c, var_c = (float(x) for x in mean_var(n_c, c.total, c.total_sq))
    mean_a, var_a = (float(x) for x in mean_var(n_a, a.total, a.total_sq))
    drop = float(guardrail.max_relative_drop)
    sign = 1.0 if guardrail.higher_is_better else -1.0

    def verdict(relative: float, bound: float, p: float, tripped: bool, reason: str) -> GuardrailVerdict:
        return GuardrailVerdict(
            guardrail.metric, int(arm_index), n_c, n_a, mean_c, mean_a, relative, bound, p, tripped, reason
        )

    if n_c < 2 or n_a < 2:
        return verdict(math.nan, math.nan, math.nan, False, _insufficient(n_c, n_a, guardrail.min_units))

    d = sign * (mean_a - mean_c)
    rms = max(math.sqrt(c.total_sq / n_c), math.sqrt(a.total_sq / n_a))
    if abs(mean_c) > ZERO_MEAN_RTOL * rms:
        scale = abs(mean_c)
        relative = d / scale
        g = sign - drop * math.copysign(1.0, mean_c)  # L = sign * arm_mean - g * control_mean
    else:
        scale = _scale_sd(c, a, var_c, var_a)
        relative = d / scale if scale > 0 else 0.0  # the standardised mean difference while within-arm SD > 0
        g = sign  # the scale is taken as fixed: L = sign * (arm_mean - control_mean) + drop * scale
    limit = d + drop * scale  # L: < 0 means worse than the bound
    variance = var_a / n_a + g * g * var_c / n_c
    if scale == 0.0:  # every value equal: no change, nothing to test
        bound, p = 0.0, 1.0
    elif not variance > 0:
        bound, p = relative, (0.0 if limit < 0 else 1.0)
    else:
        tau = MIXING_SD_IN_DROPS * drop * scale
        p, width = mixture_sprt(limit, variance, tau * tau, float(guardrail.alpha))
        bound = relative + width / scale

    if n_c < guardrail.min_units or n_a < guardrail.min_units:
        return verdict(relative, bound, p, False, _insufficient(n_c, n_a, guardrail.min_units))
    if not bound < -drop:
        why = f"change {relative:+.2%}, upper bound {bound:+.2%}, bound -{drop:.2%}; sequential p={p:.3g}"
        return verdict(relative, bound, p, False, f"not shown worse than the bound ({why})")
    reason = (
        f"worse than bound (change {relative:+.2%}, upper bound {bound:+.2%} < -{drop:.2%}; "
        f"sequential p={p:.3g} < alpha={guardrail.alpha:g})"
    )
    return verdict(relative, bound, p, True, reason)


def _insufficient(n_c: int, n_a: int, min_units: int) -> str:
    return f"insufficient units (n={n_c} control, n={n_a} arm; need {min_units} each)"


def _scale_sd(c: Moments, a: Moments, var_c: float, var_a: float) -> float:
    """Pooled within-arm SD; the SD of all values together if that is 0; 0 if all values are equal."""
    pooled = float(pooled_sd(var_c, c.count, var_a, a.count))
    if pooled > 0:
        return pooled
    return math.sqrt((c + a).variance)


def evaluate_guardrails(
    guardrails: Sequence[Guardrail], per_metric: Mapping[str, Sequence[Moments]]
) -> list[GuardrailVerdict]:
    """Every non-control arm against arm 0 on every guardrail; ``per_metric[metric][arm]`` = the arm's moments.

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
