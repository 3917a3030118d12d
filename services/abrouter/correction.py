"""Correction of covariate imbalance between arms: reweighting by covariate bins, inverse propensity weights,
and the weighted (Hajek) effect.

Why: when the audit finds a covariate imbalanced (treatment over-sampled large lesions, one scanner model
landed mostly in one arm, an arm's share moved with the season), the raw difference of means mixes the
treatment effect with the covariate's own effect on the metric. Two standard corrections remove the part that
the covariates explain:

* **reweighting by bins** (post-stratification): every treatment unit is weighted by ``control share of its
  bin / treatment share of its bin``, so the weighted treatment arm has control's distribution over the bins.
  The effect estimated is the one on the control population (the units the experiment meant to represent);
  a bin empty in either arm cannot be matched and keeps weight 1;
* **inverse propensity weights** ``1 / p``: ``p`` is the probability the unit had of landing in its arm when
  it was assigned (the router records it per exposure). With unequal, known propensities (a bandit, a ramp,
  a targeted holdout) IPW undoes the selection.

``weighted_effect`` is the Hajek estimator: the self-normalised weighted mean of treatment minus that of
control, which stays within the range of the data even when weights are large. Everything is numpy: no
Python loop runs per unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.abrouter.columns import ExposureColumns

__all__ = ["bin_weights", "ipw_weights", "strata_codes", "weighted_effect"]


def _arms(arms: np.ndarray, name: str = "arms") -> np.ndarray:
    a = np.asarray(arms)
    if a.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: must hold integer arm indices, got dtype {a.dtype}")
    return a


def _check_pair(control: int, treatment: int) -> None:
    for name, value in (("control", control), ("treatment", treatment)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}: must be an arm index >= 0, got {value!r}")
    if control == treatment:
        raise ValueError(f"control and treatment must be different arms, both are {control}")


def _codes(strata: np.ndarray) -> np.ndarray:
    """``strata`` as codes 0..k-1 (bincount directly when they are small non-negative integers)."""
    lo, hi = int(strata.min()), int(strata.max())
    if lo >= 0 and hi <= 4 * strata.size + 4096:
        return strata.astype(np.intp, copy=False)
    return np.unique(strata, return_inverse=True)[1].reshape(-1)


def bin_weights(arms: np.ndarray, strata: np.ndarray, *, control: int = 0, treatment: int = 1) -> np.ndarray:
    """Weights that give the treatment arm control's distribution over the covariate bins ``strata``.

    ``strata`` is an integer code per unit (one covariate's bin, or a combination: ``strata_codes``). A
    treatment unit in bin b gets ``(control share of b) / (treatment share of b)``, 1.0 where either share is
    0 (a bin the other arm never saw cannot be matched); control units and units of other arms get 1.0.
    """
    _check_pair(control, treatment)
    a = _arms(arms)
    s = np.asarray(strata)
    if s.shape != a.shape:
        raise ValueError(f"strata: expected one code per unit ({a.size}), got shape {s.shape}")
    if s.size and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"strata: must hold integer bin codes, got dtype {s.dtype}")
    weights = np.ones(a.size, dtype=np.float64)
    if a.size == 0:
        return weights
    codes = _codes(s)
    k = int(codes.max()) + 1
    is_c, is_t = a == control, a == treatment
    n_c, n_t = int(is_c.sum()), int(is_t.sum())
    if n_c == 0 or n_t == 0:
        return weights
    share_c = np.bincount(codes[is_c], minlength=k) / n_c
    share_t = np.bincount(codes[is_t], minlength=k) / n_t
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((share_c > 0) & (share_t > 0), share_c / share_t, 1.0)
    weights[is_t] = ratio[codes[is_t]]
    return weights


def strata_codes(cols: ExposureColumns, covariates: Sequence[str], *, bins: int = 5) -> np.ndarray:
    """One int64 code per unit combining the named covariates' bins, for ``bin_weights``.

    A categorical covariate contributes its code (missing, -1, its own bin); a numeric one its quantile bin
    among ``bins`` equal-count bins of its non-missing values (tied edges merged), NaN its own bin. The
    combination is a mixed-radix number, renumbered densely whenever it would outgrow int64.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins: must be an integer >= 1, got {bins!r}")
    n = len(cols)
    code = np.zeros(n, dtype=np.int64)
    size = 1
    for name in covariates:
        if name in cols.numeric:
            x = np.asarray(cols.numeric[name], dtype=np.float64)
            if x.shape != (n,):
                raise ValueError(f"cols.numeric[{name!r}]: expected {n} values, got shape {x.shape}")
            present = ~np.isnan(x)
            finite = np.isfinite(x)
            edges = np.zeros(0)
            if finite.any() and bins > 1:  # +-inf fall into the outer bins
                edges = np.unique(np.quantile(x[finite], np.linspace(0.0, 1.0, bins + 1)[1:-1]))
            part = np.searchsorted(edges, x, side="right").astype(np.int64)
            radix = edges.size + 2
            part[~present] = radix - 1
        elif name in cols.categorical:
            column = cols.categorical[name]
            c = np.asarray(column.codes)
            if c.shape != (n,):
                raise ValueError(f"cols.categorical[{name!r}]: expected {n} codes, got shape {c.shape}")
            radix = len(column.vocabulary) + 1
            part = np.where(c < 0, radix - 1, c).astype(np.int64)
            if n and (int(part.min()) < 0 or int(part.max()) >= radix):
                raise ValueError(f"cols.categorical[{name!r}]: codes must be in [-1, {radix - 1})")
        else:
            known = sorted([*cols.numeric, *cols.categorical])
            raise ValueError(f"covariates: '{name}' is not a covariate of these exposures (known: {known})")
        if size * radix >= 2**62:
            code = np.unique(code, return_inverse=True)[1].reshape(-1).astype(np.int64)
            size = int(code.max()) + 1 if n else 1
        code = code * radix + part
        size *= radix
    return code


def ipw_weights(propensity: np.ndarray) -> np.ndarray:
    """Inverse-propensity weights ``1 / p``; ValueError unless every p is in (0, 1] (no NaN)."""
    p = np.asarray(propensity, dtype=np.float64)
    bad = ~((p > 0.0) & (p <= 1.0))  # NaN fails both comparisons
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        index = first[0] if len(first) == 1 else first
        raise ValueError(
            f"propensity: every value must be in (0, 1] and not NaN; {int(bad.sum())} are not, "
            f"first propensity[{index}] = {p[first]!r}"
        )
    return 1.0 / p


def weighted_effect(
    values: np.ndarray, arms: np.ndarray, weights: np.ndarray, *, control: int = 0, treatment: int = 1
) -> float:
    """Hajek estimate: weighted mean of ``values`` in treatment minus that in control.

    Units with a NaN value are left out. ValueError on misaligned inputs, negative or non-finite weights, or
    an arm with no positive weight.
    """
    _check_pair(control, treatment)
    a = _arms(arms)
    y = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if y.shape != a.shape or w.shape != a.shape:
        raise ValueError(f"values, arms and weights must align: shapes {y.shape}, {a.shape}, {w.shape}")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("weights: must be finite and >= 0")
    present = ~np.isnan(y)
    means = []
    for arm, label in ((treatment, "treatment"), (control, "control")):
        sel = present & (a == arm)
        total = float(w[sel].sum())
        if total <= 0:
            raise ValueError(f"{label} arm {arm}: no unit with a value and a positive weight")
        means.append(float(np.dot(w[sel], y[sel])) / total)
    return means[0] - means[1]
