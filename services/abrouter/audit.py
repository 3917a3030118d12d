"""Randomisation audit of an A/B experiment: is the split what was configured, and is it really random?

Why: an experiment is only as good as its randomisation, and a broken one looks like a treatment effect. Real
cases this module is written against: a medical trial whose arms differed in lesion size because hash
collisions clustered similar samples into one arm; an experiment whose window spanned a change of season, with
one arm over-represented in winter; one scanner model over-represented in one arm. So the audit checks

* **sample ratio** (SRM): arm counts against the configured weights, chi-square goodness of fit. It alerts
  only when the sample is large enough, the p-value is tiny *and* the relative deviation is material, so a
  huge experiment does not cry wolf over a 0.1 % wobble. A unit in an arm with weight 0 is always an alert;
* **hash uniformity**: the bucket values (GrowthBook's hash in [0, 1)) of all hashed units, chi-square over
  equal bins;
* **clustering**: arms must be independent of anything but the hash: of the id's structure (sequential
  blocks, prefix, last character), of the arm the unit has in other experiments (carry-over), and of the
  time window or device of the exposure (arm shares by window);
* **covariate balance**: every treatment arm against control for every covariate, overall and within each
  day / ISO week / meteorological season and each value of the categorical covariates (every one logged, or
  those named: ``device``, ``site``, ``scanner`` ...), so an imbalance confined to one season or one site that
  washes out overall is still seen.

Conventions
-----------
* Contingency tests are Pearson chi-square without Yates' correction (``scipy.stats.chi2_contingency(table,
  correction=False)`` gives the same statistic and p-value), after leaving out empty rows and columns and
  merging the columns whose smallest expected count is below ``MIN_EXPECTED`` (5) into one "other" column,
  the textbook validity condition of the chi-square approximation. A table left with fewer than 2 rows or
  columns is not tested (p = 1, the detail says why; in the balance such a comparison, e.g. "device" within
  "device:CT-1000", is left out). Effect size: Cramér's V.
* Numeric covariates: two-sample Kolmogorov-Smirnov, NaN (and +-inf, which no covariate should hold either)
  left out. The statistic D equals
  ``scipy.stats.ks_2samp(a, b).statistic``; the p-value is ``guardmesh.stats.ks_p_value``, the asymptotic
  ``Q(sqrt(en) * D)`` with ``en = n_a n_b / (n_a + n_b)`` and Q the Kolmogorov survival function, shared with
  the scorer's drift: scipy's own p-values (exact below 10,000 units, ``kstwo.sf`` above) cost from
  milliseconds to a third of a second *each*, and an audit runs hundreds of them. Effect size: the
  standardised mean difference of ``guardmesh.stats`` (Cohen's d, degrees-of-freedom weighted pooled SD),
  from each window's count, sum and sum of squares (``guardmesh.stats.mean_var``).
* Speed: a full audit of a million exposures must stay well under a second, so nothing loops over units in
  Python. Each numeric covariate is ranked once (one sort of packed 64-bit keys); per window grouping the
  KS statistics of all windows come from one sort of 32-bit ``window | rank | arm`` keys and one cumulative
  sum; contingency tables are ``np.bincount``. The id tests run on a deterministic random sample of at most
  ``ID_SAMPLE_MAX`` (200,000) units (seed ``ID_SAMPLE_SEED``), parsed as one UTF-32 buffer instead of
  1,000,000 Python string operations; 200,000 units still see a shift of ~4 points of the arm shares within
  one of the 20 sequential blocks. The id tests and the per-covariate balance tasks run on two worker
  threads (numpy releases the GIL in sorts, cumulative sums and element-wise loops).
* Windows are UTC: "day:2026-11-20", "week:2026-W47" (ISO 8601 week), meteorological seasons of the
  northern hemisphere "season:spring-2026" (Mar-May), "season:summer-2026", "season:autumn-2026" (Sep-Nov),
  "season:winter-2026/27" (Dec 2026 - Feb 2027); per categorical value "device:CT-1000". A comparison in a
  window is made only when both arms have at least ``min_n`` units there *and* ``min_n`` non-missing values
  of the covariate.
* Multiple testing: ``covariate_balance`` and ``balance_over_windows`` flag ``p < alpha`` per test, as asked.
  ``full_audit`` flags the overall comparisons (window "all", one per covariate and arm) at ``p < alpha_balance``
  (0.01) and the hundreds of per-window tests (5 covariates x 150 windows) at the Bonferroni threshold
  ``alpha_balance / number of window tests`` (``AuditReport.balance_alpha``): with a per-test 0.01 there, a
  sound experiment would raise several alerts in every audit.
  ``familywise_balance`` applies the same rule to any list of results.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

from guardmesh.stats import ks_p_value, ks_statistic_grouped, mean_var, standardized_mean_difference
from services.abrouter.columns import ExposureColumns

__all__ = [
    "HASH_RESOLUTIONS",
    "ID_SAMPLE_MAX",
    "ID_SAMPLE_SEED",
    "MAX_WINDOW_VALUES",
    "MIN_EXPECTED",
    "TIME_WINDOWS",
    "AuditReport",
    "BalanceResult",
    "SRMResult",
    "TestResult",
    "arm_share_by_window",
    "arm_share_over_windows",
    "balance_over_windows",
    "bucket_uniformity",
    "carry_over_tests",
    "covariate_balance",
    "familywise_balance",
    "full_audit",
    "id_structure_tests",
    "sample_ratio_test",
]

#: Distinct hash values of GrowthBook's hash v1 and v2: uniformity bins must divide both.
HASH_RESOLUTIONS = (1000, 10_000)
#: The id tests run on a deterministic random sample of at most this many units.
ID_SAMPLE_MAX = 200_000
ID_SAMPLE_SEED = 20_261_120
#: Contingency columns whose smallest expected count is below this are merged into "other".
MIN_EXPECTED = 5.0
#: A categorical covariate with more values than this gets no per-value windows unless named (id-like values).
MAX_WINDOW_VALUES = 1000
TIME_WINDOWS = ("day", "week", "season")

_SECONDS_PER_DAY = 86_400.0
_EPOCH = dt.date(1970, 1, 1)
_MIN_DAY = (dt.date.min - _EPOCH).days
_MAX_DAY = (dt.date.max - _EPOCH).days
_SEASONS = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring"}
_SEASONS |= {6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn"}
_ID_SEPARATORS = (ord("-"), ord("_"), ord(":"), ord("."))
_PREFIX_CHARS = 64  # prefixes are compared on their first 64 characters and their length
_TAIL_DIGITS = 300  # trailing integers of up to 300 digits (float64 above 18)
#: Random odd multipliers of the prefix hash (sum of (code point + 1) * multiplier[position], mod 2**64).
_HASH_MULTIPLIERS = np.random.default_rng(0xAB).integers(0, 2**64 - 1, _PREFIX_CHARS, dtype=np.uint64) | np.uint64(1)
_BIN_EPSILON = 1e-9  # bucket k/1000 * bins lands an ulp below its bin edge without it
_U32 = np.uint32
_U64 = np.uint64


# ---------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SRMResult:
    """Sample ratio test: arm counts against the configured weights."""

    chi2: float
    p_value: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    #: max over arms with weight > 0 of |observed share - expected share| / expected share
    max_relative_deviation: float
    alert: bool
    reason: str


@dataclass(frozen=True)
class TestResult:
    """One randomisation test (uniformity, id structure, carry-over, arm share by window)."""

    __test__ = False  # not a pytest test class

    name: str
    test: str
    statistic: float
    p_value: float
    dof: int
    alert: bool
    detail: str


@dataclass(frozen=True)
class BalanceResult:
    """Balance of one covariate between control (``arm_a``) and one treatment arm (``arm_b``) in one window."""

    covariate: str
    window: str
    arm_a: int
    arm_b: int
    test: str  # "ks" (numeric) or "chi2" (categorical)
    statistic: float  # KS D or chi-square
    p_value: float
    effect_size: float  # standardised mean difference (b - a) or Cramér's V
    n_a: int  # non-missing values compared
    n_b: int
    imbalanced: bool


@dataclass(frozen=True)
class AuditReport:
    """Everything ``full_audit`` checked; ``alert`` if any part alerts, ``reasons`` says which."""

    exposures: int
    srm: SRMResult
    uniformity: TestResult
    clustering: tuple[TestResult, ...]
    balance: tuple[BalanceResult, ...]
    alert: bool
    seconds: float
    #: per-test threshold behind a per-window ``balance[i].imbalanced``: alpha_balance / number of window tests
    balance_alpha: float = 0.0
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------- checks


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"{name}: must be in (0, 1), got {alpha!r}")


def _check_count(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _as_arms(arms: np.ndarray, n_arms: int | None, name: str = "arms") -> np.ndarray:
    """``arms`` as a 1-d intp array of indices in [0, n_arms)."""
    a = np.asarray(arms)
    if a.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: must hold integer arm indices, got dtype {a.dtype}")
    a = a.astype(np.intp, copy=False)
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0:
            raise ValueError(f"{name}: arm indices must be >= 0, got {lo}")
        if n_arms is not None and hi >= n_arms:
            raise ValueError(f"{name}: arm index {hi} out of range for {n_arms} arms")
    return a


def _check_columns(cols: ExposureColumns) -> int:
    n = len(cols)
    named = {"unit_ids": cols.unit_ids, "buckets": cols.buckets, "timestamps": cols.timestamps}
    named |= {f"numeric[{k!r}]": v for k, v in cols.numeric.items()}
    named |= {f"categorical[{k!r}]": v.codes for k, v in cols.categorical.items()}
    for name, column in named.items():
        if np.shape(column) != (n,):
            raise ValueError(f"cols.{name}: expected {n} values (one per exposure), got shape {np.shape(column)}")
    return n


# ---------------------------------------------------------------------------------------------------- chi-square


def _chi2_tables(tables: np.ndarray, *, merge_small: bool = True) -> tuple[np.ndarray, ...]:
    """Pearson chi-square of a stack of R x C tables (G x R x C), vectorised over the stack.

    Empty rows and columns are left out; with ``merge_small`` the columns whose smallest expected count (over
    non-empty rows) is below ``MIN_EXPECTED`` are merged into one extra column first. Returns statistic, dof,
    p-value, total, Cramér's V and the number of non-empty rows and columns, one per table.
    """
    t = np.asarray(tables, dtype=np.float64)
    if merge_small and t.shape[2] > 0:
        row, col = t.sum(axis=2), t.sum(axis=1)
        total = row.sum(axis=1)
        smallest_row = np.where(row > 0, row, np.inf).min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            min_expected = smallest_row[:, None] * col / total[:, None]
        small = (col > 0) & (min_expected < MIN_EXPECTED)
        if small.any():
            other = np.where(small[:, None, :], t, 0.0).sum(axis=2, keepdims=True)
            t = np.concatenate([np.where(small[:, None, :], 0.0, t), other], axis=2)
    row, col = t.sum(axis=2), t.sum(axis=1)
    total = row.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = row[:, :, None] * col[:, None, :] / total[:, None, None]
        terms = np.where(expected > 0, (t - expected) ** 2 / expected, 0.0)
    stat = terms.sum(axis=(1, 2))
    rows, cols = (row > 0).sum(axis=1), (col > 0).sum(axis=1)
    dof = np.where((rows >= 2) & (cols >= 2), (rows - 1) * (cols - 1), 0)
    p = np.ones_like(stat)
    tested = dof > 0
    if tested.any():
        p[tested] = stats.chi2.sf(stat[tested], dof[tested])
    k = np.minimum(rows, cols) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(tested, np.sqrt(stat / (total * np.maximum(k, 1))), 0.0)
    return stat, dof, p, total, v, rows, cols


def _contingency_result(
    name: str, table: np.ndarray, alpha: float, what: str, *, merge_small: bool = True, note: str = ""
) -> TestResult:
    """One contingency table (arms x something) as a TestResult."""
    stat, dof, p, total, v, rows, cols = (float(x[0]) for x in _chi2_tables(table[None], merge_small=merge_small))
    suffix = f"; {note}" if note else ""
    if dof <= 0:
        detail = (
            f"skipped: fewer than 2 arms or 2 {what} with data after merging small cells "
            f"({int(rows)} x {int(cols)}, n={int(total)}){suffix}"
        )
        return TestResult(name, "chi2_contingency", 0.0, 1.0, 0, False, detail)
    alert = p < alpha
    verdict = "arms depend on " + what if alert else "no dependence on " + what
    detail = (
        f"{verdict}: chi2={stat:.1f}, dof={int(dof)}, p={p:.3g}, Cramér's V={v:.4f}, "
        f"{int(rows)} arms x {int(cols)} {what}, n={int(total)}{suffix}"
    )
    return TestResult(name, "chi2_contingency", stat, p, int(dof), bool(alert), detail)


def _factorize_ints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer ``values`` as codes 0..k-1 into their sorted distinct values (bincount when the range is small)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.intp), values[:0]
    lo, hi = int(values.min()), int(values.max())
    if hi - lo <= 4 * values.size + 4096:
        offset = values - lo
        present = np.flatnonzero(np.bincount(offset, minlength=hi - lo + 1))
        lut = np.zeros(hi - lo + 1, dtype=np.intp)
        lut[present] = np.arange(present.size)
        return lut[offset], present + lo
    uniques, codes = np.unique(values, return_inverse=True)
    return codes.reshape(-1), uniques


# ---------------------------------------------------------------------------------------------------- SRM


def sample_ratio_test(
    counts: Sequence[int] | np.ndarray,
    weights: Sequence[float],
    *,
    alpha: float = 0.001,
    min_sample: int = 1000,
    min_deviation: float = 0.01,
) -> SRMResult:
    """Chi-square goodness of fit of arm counts against the (normalised) configured weights.

    Alerts only when n >= ``min_sample``, p < ``alpha`` and the largest relative deviation of an arm's share
    is at least ``min_deviation``. Arms with weight 0 are left out of the test, but any unit in one is itself
    an alert (the assignment sent units where it must not).
    """
    obs = np.asarray(counts)
    if obs.ndim != 1 or obs.size == 0:
        raise ValueError(f"counts: must be a non-empty 1-D sequence of arm counts, got shape {obs.shape}")
    if not np.issubdtype(obs.dtype, np.integer):
        as_float = obs.astype(np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError("counts: must be whole numbers of units")
    obs = obs.astype(np.int64)
    if (obs < 0).any():
        raise ValueError(f"counts: must be >= 0, got {obs.tolist()}")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != obs.shape:
        raise ValueError(f"weights: need one per arm ({obs.size}), got {w.size}")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights: must be finite, >= 0 and not all 0, got {w.tolist()}")
    _check_alpha(alpha)
    _check_count(min_sample, "min_sample", 0)
    if not 0.0 <= min_deviation < 1.0:
        raise ValueError(f"min_deviation: must be in [0, 1), got {min_deviation!r}")
    live = w > 0
    share = w / w.sum()
    n = int(obs[live].sum())
    expected = share * n
    stray = int(obs[~live].sum())
    chi2, p, deviation = 0.0, 1.0, 0.0
    if n > 0:
        deviation = float(np.max(np.abs(obs[live] / n - share[live]) / share[live]))
        if live.sum() >= 2:
            res = stats.chisquare(obs[live], expected[live])
            chi2, p = float(res.statistic), float(res.pvalue)
    observed = tuple(int(c) for c in obs)
    expected_t = tuple(float(e) for e in expected)
    if stray:
        arms = np.flatnonzero(~live & (obs > 0)).tolist()
        reason = f"{stray} units in arm(s) {arms} whose weight is 0"
        return SRMResult(chi2, p, observed, expected_t, deviation, True, reason)
    if n < min_sample:
        reason = f"below min_sample (n={n}, need {min_sample})"
        return SRMResult(chi2, p, observed, expected_t, deviation, False, reason)
    if p < alpha and deviation < min_deviation:
        reason = f"p={p:.3g} < alpha={alpha:g} but deviation {deviation:.4f} < min_deviation {min_deviation:g}"
        return SRMResult(chi2, p, observed, expected_t, deviation, False, reason)
    if p < alpha:
        reason = (
            f"sample ratio mismatch: p={p:.3g} < alpha={alpha:g}, observed {list(observed)}, expected "
            f"{[round(e, 1) for e in expected_t]}, max relative deviation {deviation:.2%}"
        )
        return SRMResult(chi2, p, observed, expected_t, deviation, True, reason)
    return SRMResult(chi2, p, observed, expected_t, deviation, False, "ok")


# ---------------------------------------------------------------------------------------------------- uniformity


def bucket_uniformity(buckets: np.ndarray, *, bins: int = 100, alpha: float = 0.001) -> TestResult:
    """Chi-square of the hash values in [0, 1) over ``bins`` equal bins: hashed units must be uniform.

    ``bins`` must divide 1000 (GrowthBook's hash v1 takes 1000 distinct values, v2 10000), so that every bin
    holds the same number of possible values. NaN marks a unit that was not hashed and is left out.
    """
    _check_count(bins, "bins", 2)
    if any(level % bins for level in HASH_RESOLUTIONS):
        raise ValueError(
            f"bins: must divide {HASH_RESOLUTIONS[0]} (GrowthBook's hash v1 has 1000 distinct values, v2 10000), "
            f"got {bins}"
        )
    _check_alpha(alpha)
    b = np.asarray(buckets, dtype=np.float64)
    if b.ndim != 1:
        raise ValueError(f"buckets: must be 1-D, got shape {b.shape}")
    missing = np.isnan(b)
    unhashed = int(missing.sum())
    hashed = b[~missing] if unhashed else b
    n = int(hashed.size)
    if n and (hashed.min() < 0.0 or hashed.max() >= 1.0):
        raise ValueError(f"buckets: hash values must be in [0, 1), got [{hashed.min()!r}, {hashed.max()!r}]")
    index = np.floor(hashed * bins + _BIN_EPSILON).astype(np.intp)
    np.minimum(index, bins - 1, out=index)
    return uniformity_from_counts(np.bincount(index, minlength=bins), unhashed, alpha)


def uniformity_from_counts(counts: np.ndarray, unhashed: int, alpha: float) -> TestResult:
    """The bucket-uniformity test from the hashed units per equal-width bin (``unhashed``: units left out for
    having no hash value, named in the detail)."""
    bins = int(counts.size)
    n = int(counts.sum())
    note = f", {unhashed} unhashed units left out" if unhashed else ""
    if n < MIN_EXPECTED * bins:
        detail = f"skipped: {n} hashed units, need >= {int(MIN_EXPECTED * bins)} for {bins} bins{note}"
        return TestResult("bucket_uniformity", "chi2_gof", 0.0, 1.0, 0, False, detail)
    res = stats.chisquare(counts)
    stat, p = float(res.statistic), float(res.pvalue)
    mean = n / bins
    worst = int(np.argmax(np.abs(counts - mean)))
    alert = p < alpha
    detail = (
        f"{'hash values not uniform' if alert else 'uniform'}: chi2={stat:.1f}, dof={bins - 1}, p={p:.3g}; "
        f"{n} hashed units in {bins} bins, fullest deviation bin [{worst / bins:g}, {(worst + 1) / bins:g}) "
        f"with {int(counts[worst])} units ({counts[worst] / mean - 1:+.1%}){note}"
    )
    return TestResult("bucket_uniformity", "chi2_gof", stat, p, bins - 1, bool(alert), detail)


# ---------------------------------------------------------------------------------------------------- id structure


def covered_uniformity(
    buckets: np.ndarray,
    ranges: Sequence[tuple[float, float]],
    resolution: int,
    *,
    bins: int = 100,
    alpha: float = 0.001,
) -> TestResult:
    """Uniformity of the hash values of *exposed* units, which lie only in the covered bucket ranges.

    With coverage below 1 the exposed units' hash values are uniform on the covered part of [0, 1) only, so the
    expected count of each of ``bins`` equal bins is proportional to the number of GrowthBook hash values
    (``k / resolution``: 1000 for hash v1, 10000 for v2) that fall in a range inside that bin. A unit whose
    value lies outside every range is itself an alert (an assignment that the config cannot produce).
    """
    _check_count(bins, "bins", 2)
    if resolution not in HASH_RESOLUTIONS or resolution % bins:
        raise ValueError(f"resolution: must be one of {HASH_RESOLUTIONS} and divisible by bins={bins}")
    _check_alpha(alpha)
    b = np.asarray(buckets, dtype=np.float64)
    b = b[~np.isnan(b)]
    values = np.minimum(np.rint(b * resolution).astype(np.int64), resolution - 1)
    return covered_uniformity_from_counts(np.bincount(values, minlength=resolution), ranges, bins, alpha)


def covered_uniformity_from_counts(
    per_value: np.ndarray, ranges: Sequence[tuple[float, float]], bins: int, alpha: float
) -> TestResult:
    """:func:`covered_uniformity` from the exposed units per hash value ``k / resolution`` (``resolution`` is
    ``per_value.size``)."""
    resolution = int(per_value.size)
    grid = np.arange(resolution) / resolution
    covered = np.zeros(resolution, dtype=bool)
    for start, end in ranges:
        covered |= (grid >= start) & (grid < end)
    n = int(per_value.sum())
    outside = int(per_value[~covered].sum())
    per_bin = covered.reshape(bins, -1).sum(axis=1)
    observed = per_value.reshape(bins, -1).sum(axis=1)
    keep = per_bin > 0
    if outside:
        detail = f"{outside} of {n} exposed units have hash values outside every covered range"
        return TestResult("bucket_uniformity", "chi2_gof", math.inf, 0.0, 0, True, detail)
    if int(keep.sum()) < 2 or n < MIN_EXPECTED * int(keep.sum()):
        detail = f"skipped: {n} exposed units over {int(keep.sum())} covered bins"
        return TestResult("bucket_uniformity", "chi2_gof", 0.0, 1.0, 0, False, detail)
    expected = per_bin[keep] / per_bin[keep].sum() * n
    res = stats.chisquare(observed[keep], expected)
    stat, p = float(res.statistic), float(res.pvalue)
    dof = int(keep.sum()) - 1
    alert = p < alpha
    detail = (
        f"{'hash values not uniform over the covered ranges' if alert else 'uniform over the covered ranges'}: "
        f"chi2={stat:.1f}, dof={dof}, p={p:.3g}; {n} exposed units, {int(keep.sum())} of {bins} bins covered"
    )
    return TestResult("bucket_uniformity", "chi2_gof", stat, p, dof, bool(alert), detail)


def _id_sample(n: int) -> np.ndarray | None:
    """Deterministic random rows (sorted) when there are more than ``ID_SAMPLE_MAX``, else None (all rows).

    Bernoulli sampling at 99.5 % of the target rate (one uniform draw per row, seed ``ID_SAMPLE_SEED``) is a
    tenth of the cost of ``choice(replace=False)``; the rare overshoot is cut to ``ID_SAMPLE_MAX``.
    """
    if n <= ID_SAMPLE_MAX:
        return None
    rng = np.random.default_rng(ID_SAMPLE_SEED)
    rows = np.flatnonzero(rng.random(n) < 0.995 * ID_SAMPLE_MAX / n)
    return rows[:ID_SAMPLE_MAX]


def _id_strings(ids: np.ndarray) -> list[str]:
    """The ids as a list of str (an object array of str, the usual case, as it is; checked when joined)."""
    if ids.dtype == object:
        values: list[str] = ids.tolist()
        return values
    return [str(v) for v in ids.tolist()]


@dataclass(frozen=True)
class _IdFeatures:
    trailing: np.ndarray | None  # trailing integer per id (None unless every id has one)
    prefix: np.ndarray  # codes
    prefix_rows: np.ndarray  # per prefix code, the first id that has it
    prefix_lengths: np.ndarray  # per id
    suffix: np.ndarray  # codes
    suffix_labels: list[str]
    lengths: np.ndarray  # characters per id
    cp: np.ndarray  # the ids' code points (uint8 when all are ASCII), each id followed by a NUL


def _lexical_order(strings: list[str], feats: _IdFeatures) -> np.ndarray:
    """Order of the ids as Python compares them: numpy sorts fixed-width arrays without the GIL."""
    m, lengths = len(strings), feats.lengths
    width = int(lengths.max())
    if feats.cp.dtype == np.uint8 and width > 0 and lengths.min() == width:  # ASCII ids of one length (uuids)
        fixed = np.ascontiguousarray(feats.cp.reshape(m, width + 1)[:, :width]).view(f"S{width}").reshape(m)
        return np.argsort(fixed, kind="stable")
    if width <= 64:
        return np.argsort(np.array(strings, dtype=f"<U{max(width, 1)}"), kind="stable")
    return np.array(sorted(range(m), key=strings.__getitem__), dtype=np.intp)


def _id_features(strings: list[str]) -> _IdFeatures:
    """Trailing integer, prefix and last character of every id, vectorised over one buffer of code points.

    The ids are joined with NUL (replaced by U+0001 inside an id) and encoded once: as bytes when all are ASCII
    (the usual case, a quarter of the memory traffic), else as UTF-32 code points. The NULs give every id's
    start and end; each feature is a few array operations over all ids or a short loop over character
    positions (prefix length, trailing digits), never a loop over ids.
    """
    m = len(strings)
    try:
        joined = "\x00".join(strings)
    except TypeError:  # not all str
        strings[:] = [str(v) for v in strings]
        joined = "\x00".join(strings)
    if joined.count("\x00") != m - 1:
        joined = "\x00".join(s.replace("\x00", "\x01") for s in strings)
    joined += "\x00"
    if joined.isascii():
        cp: np.ndarray = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    else:
        cp = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), dtype="<i4")
    ends = np.flatnonzero(cp == 0)
    starts = np.empty(m, dtype=np.intp)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts
    size = cp.size

    last = np.where(lengths > 0, cp[np.maximum(ends - 1, 0)].astype(np.int64), -1)
    suffix, suffix_values = _factorize_ints(last)
    suffix_labels = [chr(c) if c >= 0 else "" for c in suffix_values.tolist()]

    # prefix: up to the first separator at or after the id's start (each id's closing NUL stops it too)
    stop = cp == 0
    for sep in _ID_SEPARATORS:
        stop |= cp == sep
    if lengths.min() == lengths.max():  # ids of one length (uuids, zero-padded numbers): one row each
        first = starts + stop.reshape(m, -1).argmax(axis=1)
    else:
        stops = np.flatnonzero(stop)
        first = stops[np.searchsorted(stops, starts)]
    pend = np.where(first < ends, first, np.minimum(starts + 2, ends))
    plen = pend - starts
    h = np.zeros(m, dtype=_U64)
    for j in range(min(int(plen.max()), _PREFIX_CHARS)):
        c = cp[np.minimum(starts + j, size - 1)].astype(_U64) + _U64(1)
        h += np.where(j < plen, c * _HASH_MULTIPLIERS[j], _U64(0))
    h ^= plen.astype(_U64) << _U64(48)
    _, first_row, prefix = np.unique(h, return_index=True, return_inverse=True)

    # trailing integer, read backwards from each id's end (none unless every id ends in a digit)
    trailing: np.ndarray | None = None
    if last.min() >= 48 and last.max() <= 57:
        value: np.ndarray = np.zeros(m, dtype=np.int64)
        alive = np.ones(m, dtype=bool)
        for j in range(_TAIL_DIGITS + 1):
            at = ends - 1 - j
            digit = cp[np.maximum(at, 0)].astype(np.int64) - 48
            alive &= (at >= starts) & (digit >= 0) & (digit <= 9)
            if not alive.any():
                trailing = value
                break
            if j == 18:  # int64 holds 18 digits exactly; longer integers order by float64 (approximately)
                value = value.astype(np.float64)
            value += np.where(alive, digit * (10**j if j < 18 else 10.0**j), 0)
    return _IdFeatures(trailing, prefix.reshape(-1), first_row, plen, suffix, suffix_labels, lengths, cp)


def _stable_order(values: np.ndarray) -> np.ndarray:
    """Stable argsort; for non-negative integers through one SIMD sort of ``value << index bits | index``."""
    m = values.size
    bits = max(1, (m - 1).bit_length())
    if values.dtype == np.int64 and m and values.min() >= 0 and int(values.max()) < 1 << (63 - bits):
        key = (values << bits) | np.arange(m, dtype=np.int64)
        key.sort()
        return key & ((1 << bits) - 1)
    return np.argsort(values, kind="stable")


def id_structure_tests(
    unit_ids: np.ndarray, arms: np.ndarray, n_arms: int, *, alpha: float = 0.001, groups: int = 20
) -> list[TestResult]:
    """Arms must not depend on the id's structure: "id_sequential", "id_prefix" and "id_suffix".

    * sequential: units ordered by the integer at the end of the id when every id has one ("user-000123"),
      else lexically, cut into ``groups`` equal contiguous blocks; chi-square arm x block;
    * prefix: arm x the part before the first '-', '_', ':' or '.' (else the first 2 characters), rare
      prefixes merged into "other"; skipped when fewer than 2 prefixes remain;
    * suffix: arm x the last character.

    With more than ``ID_SAMPLE_MAX`` units the tests run on a deterministic random sample of that many.
    """
    _check_count(n_arms, "n_arms", 1)
    _check_count(groups, "groups", 2)
    _check_alpha(alpha)
    a = _as_arms(arms, n_arms)
    ids = np.asarray(unit_ids)
    if ids.shape != a.shape:
        raise ValueError(f"unit_ids: expected {a.size} ids (one per arm), got shape {ids.shape}")
    n = a.size
    rows = _id_sample(n)
    if rows is not None:
        ids, a = ids[rows], a[rows]
    m = a.size
    note = f"on a deterministic random sample of {m} of {n} units" if rows is not None else ""
    if m == 0:
        detail = "skipped: no units"
        return [TestResult(name, "chi2_contingency", 0.0, 1.0, 0, False, detail) for name in _ID_TESTS]
    strings = _id_strings(ids)
    feats = _id_features(strings)

    if feats.trailing is not None:
        order = _stable_order(feats.trailing)
        how = "the integer at the end of the id"
    else:
        order = _lexical_order(strings, feats)
        how = "id (lexically)"
    block = np.empty(m, dtype=np.intp)
    block[order] = np.arange(m) * groups // m
    blocks = min(groups, m)
    table = np.bincount(a * groups + block, minlength=n_arms * groups).reshape(n_arms, groups)
    seq_note = f"{blocks} blocks of units ordered by {how}" + (f", {note}" if note else "")
    results = [_contingency_result("id_sequential", table, alpha, "id blocks", merge_small=False, note=seq_note)]

    def prefix_label(code: int) -> str:
        row = int(feats.prefix_rows[code])
        return strings[row][: int(feats.prefix_lengths[row])]

    for name, codes, k, label, what in (
        ("id_prefix", feats.prefix, feats.prefix_rows.size, prefix_label, "id prefixes"),
        ("id_suffix", feats.suffix, len(feats.suffix_labels), feats.suffix_labels.__getitem__, "last characters"),
    ):
        table = np.bincount(a * k + codes, minlength=n_arms * k).reshape(n_arms, k)
        top = ", ".join(repr(label(int(i))) for i in np.argsort(-table.sum(axis=0), kind="stable")[:5])
        sub_note = f"{k} distinct ({top}{', ...' if k > 5 else ''})" + (f", {note}" if note else "")
        results.append(_contingency_result(name, table, alpha, what, note=sub_note))
    return results


_ID_TESTS = ("id_sequential", "id_prefix", "id_suffix")


# ---------------------------------------------------------------------------------------------------- carry-over


def carry_over_tests(
    arms: np.ndarray, other_arms: Mapping[str, np.ndarray], *, alpha: float = 0.001
) -> list[TestResult]:
    """Arms must be independent of the arm the same unit has in other experiments ("carry_over:{key}").

    ``other_arms[key]`` is aligned with ``arms`` and holds the unit's arm in experiment ``key`` (-1: not in it;
    those units are left out). A dependence means the two assignments share a hash (same seed, same key) or
    one experiment's exposure steered the other's.
    """
    _check_alpha(alpha)
    a = _as_arms(arms, None)
    n_arms = int(a.max()) + 1 if a.size else 1
    results = []
    for key, other in other_arms.items():
        o = np.asarray(other)
        if o.shape != a.shape:
            raise ValueError(f"other_arms[{key!r}]: expected {a.size} values aligned with arms, got shape {o.shape}")
        if o.size and not np.issubdtype(o.dtype, np.integer):
            raise ValueError(f"other_arms[{key!r}]: must hold integer arm indices (-1: not in it), got {o.dtype}")
        both = o >= 0
        mine, theirs = a[both], o[both].astype(np.intp)
        k = int(theirs.max()) + 1 if theirs.size else 1
        table = np.bincount(mine * k + theirs, minlength=n_arms * k).reshape(n_arms, k)
        note = f"{int(both.sum())} units in both experiments"
        results.append(_contingency_result(f"carry_over:{key}", table, alpha, f"arms of '{key}'", note=note))
    return results


# ---------------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class _Base:
    """A finest partition of the units that groupings coarsen: the UTC days, or one categorical's values.

    Its last row is a spare one for the units in none of them (no timestamp, missing value); per-covariate
    counts and sums are ``np.bincount`` over ``cells`` once per base, then summed into each grouping's windows.
    """

    rows: int
    row: np.ndarray  # row per unit (uint32)
    cells: np.ndarray  # row * A + arm per unit (intp)
    units: np.ndarray  # rows x A


@dataclass(frozen=True)
class _Prepared:
    """One grouping (a partition of the units into named windows) over a base."""

    kind: str
    names: tuple[str, ...]
    base: int
    lut: np.ndarray  # base row -> window; len(names) is the spare window (units in none), which sorts last
    gkey: np.ndarray | None  # window per unit (uint32) for the KS sort keys; None for one window of all units
    units: np.ndarray  # units per window and arm (G x A)


def _make_base(row: np.ndarray, rows: int, arms: np.ndarray, n_arms: int) -> _Base:
    cells = row.astype(np.intp) * n_arms + arms
    units = np.bincount(cells, minlength=rows * n_arms).reshape(rows, n_arms)
    return _Base(rows, row.astype(_U32), cells, units)


def _coarsen(values: np.ndarray, lut: np.ndarray, rows: int) -> np.ndarray:
    """Rows of ``values`` summed into ``rows`` rows: row i goes to ``lut[i]``."""
    out = np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
    np.add.at(out, lut, values)
    return out


def _group(kind: str, names: Sequence[str], base_index: int, base: _Base, lut: np.ndarray) -> _Prepared:
    """The grouping ``kind`` whose windows ``names`` coarsen the rows of ``base`` through ``lut``."""
    n_groups = len(names)
    units = _coarsen(base.units, lut, n_groups + 1)[:n_groups]
    gkey = None
    if kind != "all":
        identity = lut.size == n_groups + 1 and bool((lut == np.arange(n_groups + 1)).all())
        gkey = base.row if identity else lut.astype(_U32)[base.row]
    return _Prepared(kind, tuple(names), base_index, lut, gkey, units)


def _window_label(kind: str, day: dt.date) -> str:
    if kind == "day":
        return f"day:{day.isoformat()}"
    if kind == "week":
        year, week, _ = day.isocalendar()
        return f"week:{year}-W{week:02d}"
    season = _SEASONS[day.month]
    if season == "winter":
        start = day.year if day.month == 12 else day.year - 1
        return f"season:winter-{start}/{(start + 1) % 100:02d}"
    return f"season:{season}-{day.year}"


def _day_rows(timestamps: np.ndarray) -> tuple[np.ndarray, list[dt.date]]:
    """Per unit the index of its UTC day among the distinct days (their count for no usable timestamp)."""
    ts = np.asarray(timestamps, dtype=np.float64)
    days = np.floor(ts / _SECONDS_PER_DAY)
    ok = np.isfinite(days) & (days >= _MIN_DAY) & (days <= _MAX_DAY)
    if ok.all():
        row, distinct = _factorize_ints(days.astype(np.int64))
    else:
        sub, distinct = _factorize_ints(days[ok].astype(np.int64))
        row = np.full(ts.size, distinct.size, dtype=np.intp)
        row[ok] = sub
    return row, [_EPOCH + dt.timedelta(days=int(d)) for d in distinct.tolist()]


def _prepare(
    cols: ExposureColumns,
    arms: np.ndarray,
    n_arms: int,
    windows: Sequence[str],
    by_categorical: Sequence[str] | None,
    overall: str | None,
) -> tuple[list[_Base], list[_Prepared], list[str]]:
    """Bases and groupings: ``overall`` (one window of all units, if named), the time windows, then one
    grouping per categorical name; and notes on names in ``by_categorical`` that ``cols`` has no column for.

    ``by_categorical`` None means every categorical covariate of ``cols`` with at most
    ``MAX_WINDOW_VALUES`` values (an id-like covariate with more is noted and left out; name it to include it).
    """
    unknown = [w for w in windows if w not in TIME_WINDOWS]
    if unknown:
        raise ValueError(f"windows: unknown {unknown}; choose from {list(TIME_WINDOWS)}")
    bases: list[_Base] = []
    prepared: list[_Prepared] = []
    notes = []
    if windows:
        row, dates = _day_rows(cols.timestamps)
        bases.append(_make_base(row, len(dates) + 1, arms, n_arms))
        for kind in dict.fromkeys(windows):
            labels = [_window_label(kind, d) for d in dates]
            names = tuple(dict.fromkeys(labels))  # chronological, distinct
            position = {name: i for i, name in enumerate(names)}
            lut = np.array([position[label] for label in labels] + [len(names)], dtype=np.intp)
            prepared.append(_group(kind, names, 0, bases[0], lut))
    if by_categorical is None:
        chosen: list[str] = []
        for name, values in cols.categorical.items():
            if len(values.vocabulary) > MAX_WINDOW_VALUES:
                notes.append(
                    f"{name}: {len(values.vocabulary)} values, more than {MAX_WINDOW_VALUES}: no windows by it"
                )
            else:
                chosen.append(name)
        by_categorical = chosen
    for name in dict.fromkeys(by_categorical):
        column = cols.categorical.get(name)
        if column is None:
            notes.append(f"by_categorical '{name}' is not a categorical covariate: no windows by it")
            continue
        k = len(column.vocabulary)
        codes = _categorical_codes(name, column.codes, k)
        bases.append(_make_base(codes, k + 1, arms, n_arms))
        names = tuple(f"{name}:{value}" for value in column.vocabulary)
        prepared.append(_group(name, names, len(bases) - 1, bases[-1], np.arange(k + 1)))
    if overall is not None:
        if not bases:
            bases.append(_make_base(np.zeros(arms.size, dtype=np.intp), 1, arms, n_arms))
        lut = np.zeros(bases[0].rows, dtype=np.intp)
        prepared.insert(0, _group("all", (overall,), 0, bases[0], lut))
    return bases, prepared, notes


def _arm_share_table(arms: np.ndarray, codes: np.ndarray, n_groups: int, n_arms: int) -> np.ndarray:
    """Units per arm x window (n_arms x n_groups); units with a negative code left out."""
    keep = codes >= 0
    flat = arms * n_groups + codes
    if not keep.all():
        flat = flat[keep]
    return np.bincount(flat, minlength=n_arms * n_groups).reshape(n_arms, n_groups)


def _arm_share_result(table: np.ndarray, names: Sequence[str], name: str, alpha: float) -> TestResult:
    result = _contingency_result(name, table, alpha, "windows", note=f"{len(names)} windows")
    if result.dof > 0:  # name the window whose arm shares are furthest from the overall ones
        t = table.astype(np.float64)
        total = t.sum()
        expected = t.sum(axis=1, keepdims=True) * t.sum(axis=0, keepdims=True) / total
        with np.errstate(divide="ignore", invalid="ignore"):
            resid = np.where(expected > 0, np.abs(t - expected) / np.sqrt(expected), 0.0)
        worst = int(np.argmax(resid.max(axis=0)))
        shares = t[:, worst] / max(t[:, worst].sum(), 1.0)
        overall = t.sum(axis=1) / total
        fmt = ", ".join(f"{s:.3f}" for s in shares)
        ref = ", ".join(f"{s:.3f}" for s in overall)
        detail = f"{result.detail}; furthest window {names[worst]}: arm shares ({fmt}) vs ({ref}) overall"
        result = replace(result, detail=detail)
    return result


def arm_share_by_window(arms: np.ndarray, labels: np.ndarray, name: str, *, alpha: float = 0.001) -> TestResult:
    """Chi-square of arm x window label: are arm shares stable across days / weeks / seasons / devices?

    ``labels`` is one window label per unit (strings, or integers where a negative one means no window; None
    means no window too); units without one are left out.
    """
    _check_alpha(alpha)
    a = _as_arms(arms, None)
    lab = np.asarray(labels)
    if lab.shape != a.shape:
        raise ValueError(f"labels: expected {a.size} labels (one per unit), got shape {lab.shape}")
    codes = np.full(a.size, -1, dtype=np.intp)
    if np.issubdtype(lab.dtype, np.integer):
        keep = lab >= 0
        sub, values = _factorize_ints(lab[keep])
        names = [str(v) for v in values.tolist()]
    else:
        keep = np.array([v is not None for v in lab.tolist()], dtype=bool)
        values, sub = np.unique(lab[keep].astype(str), return_inverse=True)
        names = values.tolist()
    codes[keep] = sub.reshape(-1)
    n_arms = int(a.max()) + 1 if a.size else 1
    return _arm_share_result(_arm_share_table(a, codes, len(names), n_arms), names, name, alpha)


def arm_share_over_windows(
    cols: ExposureColumns,
    *,
    alpha: float = 0.001,
    windows: Sequence[str] = TIME_WINDOWS,
    by_categorical: Sequence[str] | None = None,
) -> list[TestResult]:
    """``arm_share_by_window`` for the windows of ``balance_over_windows``: "arm_share:day", ... "arm_share:device"."""
    _check_alpha(alpha)
    _check_columns(cols)
    a = _as_arms(cols.arms, None, "cols.arms")
    n_arms = int(a.max()) + 1 if a.size else 1
    _, prepared, _ = _prepare(cols, a, n_arms, windows, by_categorical, None)
    return _arm_shares(prepared, alpha)


def _arm_shares(prepared: Sequence[_Prepared], alpha: float) -> list[TestResult]:
    return [_arm_share_result(p.units.T, p.names, f"arm_share:{p.kind}", alpha) for p in prepared if p.kind != "all"]


# ---------------------------------------------------------------------------------------------------- balance


@dataclass(frozen=True)
class _Ranked:
    """A numeric covariate prepared for KS tests in any grouping: its non-missing values ranked once."""

    valid: np.ndarray | None  # rows with a value (None: all)
    rank_arm: np.ndarray  # (dense rank << arm_bits) | arm per valid row, uint32 or uint64
    rank_bits: int
    arms_sorted: np.ndarray  # arm of the valid rows in value order
    run_end: np.ndarray | None  # in that order: last of its run of equal values (None: no ties)
    centred: np.ndarray  # value - center per valid row
    center: float


def _sortable_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> uint64 whose unsigned order is the float order (negatives: all bits flipped; else sign set)."""
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.int64)
    flip = bits >> 63  # -1 for negatives, 0 else
    flip &= 0x7FFF_FFFF_FFFF_FFFF
    flip ^= bits
    key = flip.view(_U64)
    key ^= _U64(1 << 63)
    return key


def _fix_truncation_ties(key: np.ndarray, xs: np.ndarray, order: np.ndarray, shift: int) -> None:
    """Re-sort by value, in place, the blocks of equal ``key >> shift`` that hold a descent of ``xs``."""
    m = xs.size
    descents = np.flatnonzero(xs[1:] < xs[:-1])
    if descents.size == 0:
        return
    s = _U64(shift)
    lo, hi = descents.copy(), descents + 1
    for _ in range(64):  # blocks are 2-3 long: grow each descent to its whole block
        grow_lo = (lo > 0) & ((key[np.maximum(lo - 1, 0)] >> s) == (key[lo] >> s))
        grow_hi = (hi < m - 1) & ((key[np.minimum(hi + 1, m - 1)] >> s) == (key[hi] >> s))
        if not (grow_lo.any() or grow_hi.any()):
            rows = np.unique(
                np.concatenate([np.arange(a, b + 1) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)])
            )
            break
        lo -= grow_lo
        hi += grow_hi
    else:  # a huge block of near-equal values: find every block the slow way
        prefix = key >> s
        block = np.zeros(m, dtype=np.intp)
        np.cumsum(prefix[1:] != prefix[:-1], out=block[1:])
        bad = np.zeros(int(block[-1]) + 1, dtype=bool)
        bad[block[descents]] = True
        rows = np.flatnonzero(bad[block])
    resorted = rows[np.lexsort((xs[rows], key[rows] >> s))]
    order[rows] = order[resorted]
    xs[rows] = xs[resorted]


def _value_order(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of ``x`` (no NaN) and ``x`` in that order.

    One SIMD sort of 64-bit keys ``(order-preserving bits of x, low bits cleared) | index`` (numpy's ``argsort``
    of float64 has no SIMD path and is ~3x slower). Values that agree in all but the cleared low bits (relative
    difference < 2**-(52 - index bits); a million continuous values hold ~100 such pairs) sort by index instead
    of value: the few blocks of equal truncated keys that hold a descent are re-sorted by value.
    """
    m = x.size
    index_bits = max(1, (m - 1).bit_length())
    if index_bits > 40:
        order = np.argsort(x, kind="stable")
        return order, x[order]
    key = _sortable_bits(x)
    mask = _U64((1 << index_bits) - 1)
    key &= ~mask
    key |= np.arange(m, dtype=_U64)
    key.sort()
    order = np.bitwise_and(key, mask).view(np.int64)
    xs = x[order]
    if m > 1:
        _fix_truncation_ties(key, xs, order, index_bits)
    return order, xs


def _prepare_numeric(values: np.ndarray, arms: np.ndarray, arm_bits: int) -> _Ranked:
    x = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(x)
    valid: np.ndarray | None = None
    if missing.any():
        valid = ~missing
        x, arms = x[valid], arms[valid]
    m = x.size
    order, xs = _value_order(x)
    run_end = None
    kt: type[np.unsignedinteger[Any]] = _U32
    dense_sorted = np.zeros(m, dtype=kt)
    if m > 1:
        step = np.empty(m, dtype=bool)
        np.not_equal(xs[1:], xs[:-1], out=step[:-1])
        step[-1] = True
        run_end = None if step.all() else step
        rank_bits = max(1, int(np.count_nonzero(step) - 1).bit_length())
        if rank_bits + arm_bits > 24:  # leave >= 8 bits of a uint32 key for windows
            kt = _U64
            dense_sorted = dense_sorted.astype(kt)
        np.cumsum(step[:-1], out=dense_sorted[1:])
    else:
        rank_bits = 1
    arms_sorted = arms.astype(np.uint8 if arm_bits <= 8 else np.int64)[order]
    rank_arm_sorted = np.left_shift(dense_sorted, kt(arm_bits))
    rank_arm_sorted |= arms_sorted
    rank_arm = np.empty_like(rank_arm_sorted)
    rank_arm[order] = rank_arm_sorted
    center = float(x.mean()) if m else 0.0
    return _Ranked(valid, rank_arm, rank_bits, arms_sorted, run_end, x - center, center)


def _ks_in_grouping(
    r: _Ranked, prep: _Prepared, counts: np.ndarray, arm_bits: int, control: int, treatments: Sequence[int]
) -> np.ndarray:
    """KS D per window (incl. the spare one) and treatment of one covariate in one grouping.

    Over all units the ranking's order serves; per window grouping one sort of the keys
    ``window | dense rank | arm`` (uint32 when they fit) orders the units by window, then value.
    """
    arm_cells = 1 << arm_bits
    if prep.gkey is None:
        return ks_statistic_grouped(r.arms_sorted, r.run_end, counts, arm_cells, control, treatments)
    gk = prep.gkey if r.valid is None else prep.gkey[r.valid]
    shift = r.rank_bits + arm_bits
    bits = shift + len(prep.names).bit_length()  # windows 0..len(names), the last the spare one
    if bits > 64:
        raise ValueError("too many distinct covariate values and windows to rank together")
    kt = _U32 if r.rank_arm.dtype == _U32 and bits <= 32 else _U64
    key = np.left_shift(gk.astype(kt, copy=False), kt(shift))
    key |= r.rank_arm
    key.sort()
    cell = np.bitwise_or(np.left_shift(key >> kt(shift), kt(arm_bits)), key & kt(arm_cells - 1)).astype(np.intp)
    run_end = None
    if r.run_end is not None:  # ties in the covariate: mark the last unit of each run within a window
        run_end = np.empty(key.size, dtype=bool)
        np.greater_equal(key[1:] ^ key[:-1], kt(arm_cells), out=run_end[:-1])
        run_end[-1] = True
    return ks_statistic_grouped(cell, run_end, counts, arm_cells, control, treatments)


def _categorical_codes(name: str, codes: np.ndarray, k: int) -> np.ndarray:
    """Codes of a categorical covariate with missing (-1) moved to code ``k`` (intp); ValueError if invalid."""
    c = np.asarray(codes)
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"cols.categorical[{name!r}]: codes must be integers, got dtype {c.dtype}")
    if c.size and (int(c.max()) >= k or int(c.min()) < -1):
        got = f"{int(c.min())}..{int(c.max())}"
        raise ValueError(f"cols.categorical[{name!r}]: codes must be in [-1, {k}) ({k} categories), got {got}")
    return np.where(c < 0, k, c).astype(np.intp)


@dataclass(frozen=True)
class _Plan:
    """What every per-covariate task needs."""

    arms: np.ndarray
    n_arms: int
    arm_bits: int
    control: int
    treatments: list[int]
    alpha: float
    min_n: int
    bases: list[_Base]
    prepared: list[_Prepared]
    pair_ok: list[np.ndarray]  # per grouping: G x T, both arms have >= min_n units in the window


_Found = list[tuple[tuple[int, int, int, int], BalanceResult]]


def _numeric_task(
    plan: _Plan, index: int, name: str, values: np.ndarray, ranked: Future[_Ranked] | None = None
) -> _Found:
    """KS and standardised mean difference of one numeric covariate in every window of every grouping."""
    r = _prepare_numeric(values, plan.arms, plan.arm_bits) if ranked is None else ranked.result()
    n_arms, control = plan.n_arms, plan.control
    per_base = []
    squares = r.centred * r.centred
    for b in plan.bases:
        flat = b.cells if r.valid is None else b.cells[r.valid]
        size = b.rows * n_arms
        counts = b.units.reshape(-1) if r.valid is None else np.bincount(flat, minlength=size)
        sums = np.bincount(flat, weights=r.centred, minlength=size)
        per_base.append(np.stack([counts, sums, np.bincount(flat, weights=squares, minlength=size)], axis=1))
    per_base = [p.reshape(b.rows, n_arms, 3) for p, b in zip(per_base, plan.bases, strict=True)]
    found: _Found = []
    for pi, prep in enumerate(plan.prepared):
        pair_ok = plan.pair_ok[pi]
        if not pair_ok.any():
            continue
        agg = _coarsen(per_base[prep.base], prep.lut, len(prep.names) + 1)
        counts = agg[:, :, 0].astype(np.int64)
        d = _ks_in_grouping(r, prep, counts, plan.arm_bits, control, plan.treatments)
        mean, var = mean_var(counts, agg[:, :, 1], agg[:, :, 2])  # of the centred values: the same variance
        mean = mean + r.center
        for g, j in zip(*np.nonzero(pair_ok), strict=True):
            t = plan.treatments[j]
            n_a, n_b = int(counts[g, control]), int(counts[g, t])
            if n_a < plan.min_n or n_b < plan.min_n:
                continue
            stat = float(d[g, j])
            p = float(ks_p_value(stat, n_a, n_b))
            effect = float(
                standardized_mean_difference(mean[g, control], var[g, control], n_a, mean[g, t], var[g, t], n_b)
            )
            result = BalanceResult(name, prep.names[g], control, t, "ks", stat, p, effect, n_a, n_b, p < plan.alpha)
            found.append(((pi, int(g), int(j), index), result))
    return found


def _categorical_task(plan: _Plan, index: int, name: str, codes: np.ndarray, k: int) -> _Found:
    """Chi-square and Cramér's V of one categorical covariate in every window of every grouping."""
    n_arms, control = plan.n_arms, plan.control
    c = _categorical_codes(name, codes, k)
    per_base = [
        np.bincount(b.cells * (k + 1) + c, minlength=b.rows * n_arms * (k + 1)).reshape(b.rows, n_arms, k + 1)
        for b in plan.bases
    ]
    found: _Found = []
    for pi, prep in enumerate(plan.prepared):
        pair_ok = plan.pair_ok[pi]
        if not pair_ok.any():
            continue
        n_groups = len(prep.names)
        tables = _coarsen(per_base[prep.base], prep.lut, n_groups + 1)[:n_groups, :, :k]
        for j, t in enumerate(plan.treatments):
            pair = tables[:, [control, t], :]
            chi, dof, pv, _, v, _, _ = _chi2_tables(pair)
            n_pair = pair.sum(axis=2)
            for g in np.flatnonzero(pair_ok[:, j] & (dof > 0)):
                n_a, n_b = int(n_pair[g, 0]), int(n_pair[g, 1])
                if n_a < plan.min_n or n_b < plan.min_n:
                    continue
                p = float(pv[g])
                result = BalanceResult(
                    name, prep.names[g], control, t, "chi2", float(chi[g]), p, float(v[g]), n_a, n_b, p < plan.alpha
                )
                found.append(((pi, int(g), j, index), result))
    return found


#: Below this many units the balance runs in the calling thread.
_PARALLEL_MIN_UNITS = 100_000
_WORKERS = max(1, min(2, os.cpu_count() or 1))


def _balance(
    cols: ExposureColumns,
    arms: np.ndarray,
    n_arms: int,
    bases: list[_Base],
    prepared: list[_Prepared],
    control: int,
    alpha: float,
    min_n: int,
    pool: Executor | None = None,
    ranked: Sequence[Future[_Ranked]] = (),
) -> list[BalanceResult]:
    """Every treatment arm vs control for every covariate in every window of every grouping, ordered by
    grouping, window, treatment arm, then covariate (numeric, then categorical, each in column order).

    One task per covariate; with ``pool`` (or a million units) the tasks run on worker threads: numpy releases
    the GIL in sorts, cumulative sums and element-wise loops, so two cores finish ~1.4x sooner. ``ranked``:
    the numeric covariates' rankings (``_prepare_numeric``) already submitted to ``pool``, in column order.
    """
    per_arm = np.bincount(arms, minlength=n_arms)
    if control >= n_arms or per_arm[control] == 0:
        return []
    treatments = [t for t in range(n_arms) if t != control and per_arm[t] > 0]
    if not treatments:
        return []
    pair_ok = [(p.units[:, [control]] >= min_n) & (p.units[:, treatments] >= min_n) for p in prepared]
    plan = _Plan(arms, n_arms, _arm_bits(n_arms), control, treatments, alpha, min_n, bases, prepared, pair_ok)
    offset = len(cols.numeric)
    tasks: list[tuple[Callable[..., _Found], tuple[object, ...]]] = [
        (_categorical_task, (plan, offset + i, name, column.codes, len(column.vocabulary)))
        for i, (name, column) in enumerate(cols.categorical.items())
    ]
    tasks += [
        (_numeric_task, (plan, i, name, values, ranked[i] if ranked else None))
        for i, (name, values) in enumerate(cols.numeric.items())
    ]
    found: _Found = []
    if pool is None and (arms.size < _PARALLEL_MIN_UNITS or _WORKERS < 2 or len(tasks) < 2):
        for fn, args in tasks:
            found += fn(*args)
    elif pool is None:
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="audit") as own:
            for future in [own.submit(fn, *args) for fn, args in tasks]:
                found += future.result()
    else:
        for future in [pool.submit(fn, *args) for fn, args in tasks]:
            found += future.result()
    found.sort(key=lambda item: item[0])
    return [result for _, result in found]


def _arm_bits(n_arms: int) -> int:
    return max(1, (n_arms - 1).bit_length())


def _balance_setup(cols: ExposureColumns, control: int, alpha: float, min_n: int) -> tuple[np.ndarray, int]:
    _check_count(control, "control", 0)
    _check_alpha(alpha)
    _check_count(min_n, "min_n", 1)
    _check_columns(cols)
    arms = _as_arms(cols.arms, None, "cols.arms")
    return arms, int(arms.max()) + 1 if arms.size else 1


def covariate_balance(
    cols: ExposureColumns, *, control: int = 0, alpha: float = 0.01, min_n: int = 20, window: str = "all"
) -> list[BalanceResult]:
    """Every treatment arm vs control for every covariate over all units (``window`` names them).

    Numeric: two-sample KS (NaN and +-inf left out), effect size the standardised mean difference; categorical:
    chi-square of the 2 x categories table (missing code -1 left out), effect size Cramér's V. Imbalanced when
    p < alpha. Comparisons with fewer than ``min_n`` values in either arm are skipped.
    """
    arms, n_arms = _balance_setup(cols, control, alpha, min_n)
    bases, prepared, _ = _prepare(cols, arms, n_arms, (), (), window)
    return _balance(cols, arms, n_arms, bases, prepared, control, alpha, min_n)


def balance_over_windows(
    cols: ExposureColumns,
    *,
    control: int = 0,
    alpha: float = 0.01,
    windows: Sequence[str] = TIME_WINDOWS,
    by_categorical: Sequence[str] | None = None,
    min_n: int = 20,
) -> list[BalanceResult]:
    """``covariate_balance`` within each UTC day / ISO week / meteorological season and each value of the
    categorical covariates ("device:CT-1000", "site:berlin"; ``by_categorical`` None: every one logged, see
    ``_prepare``); windows with fewer than ``min_n`` units per arm are skipped, and names in ``by_categorical``
    that ``cols`` has no column for are ignored."""
    arms, n_arms = _balance_setup(cols, control, alpha, min_n)
    bases, prepared, _ = _prepare(cols, arms, n_arms, windows, by_categorical, None)
    return _balance(cols, arms, n_arms, bases, prepared, control, alpha, min_n)


def familywise_balance(results: Sequence[BalanceResult], alpha: float = 0.01) -> list[BalanceResult]:
    """``results`` with ``imbalanced`` re-flagged at the Bonferroni threshold ``alpha / len(results)``.

    Use it on the output of ``covariate_balance`` + ``balance_over_windows`` before raising alerts: hundreds of
    per-test flags at 0.01 always hold a few false ones.
    """
    _check_alpha(alpha)
    threshold = alpha / max(len(results), 1)
    return [replace(r, imbalanced=r.p_value < threshold) for r in results]


# ---------------------------------------------------------------------------------------------------- full audit


def full_audit(
    cols: ExposureColumns,
    weights: Sequence[float],
    *,
    other_arms: Mapping[str, np.ndarray] | None = None,
    alpha_srm: float = 0.001,
    alpha_balance: float = 0.01,
    min_sample: int = 1000,
    min_deviation: float = 0.01,
    windows: Sequence[str] = TIME_WINDOWS,
    by_categorical: Sequence[str] | None = None,
    ranges: Sequence[tuple[float, float]] | None = None,
    resolution: int = 10_000,
) -> AuditReport:
    """SRM, bucket uniformity, clustering (id structure, carry-over, arm share by window) and covariate balance
    (overall and per window) of an experiment's exposures.

    ``alpha_srm`` is also the per-test alpha of the uniformity and clustering tests (a handful of tests of the
    randomisation itself). Overall balance results are flagged at ``alpha_balance``, per-window ones at the
    Bonferroni threshold ``alpha_balance / number of window tests`` (``balance_alpha``). With ``ranges`` (the
    experiment's bucket ranges, when coverage is below 1) uniformity is tested over the covered ranges.
    ``alert`` if any part alerts; ``reasons`` lists them. The id tests
    and the per-covariate balance tasks share two worker threads.
    """
    started = time.perf_counter()
    n = _check_columns(cols)
    n_arms = len(weights)
    _check_count(n_arms, "weights (number of arms)", 1)
    arms = _as_arms(cols.arms, n_arms, "cols.arms")
    _check_alpha(alpha_balance, "alpha_balance")
    counts = np.bincount(arms, minlength=n_arms)
    srm = sample_ratio_test(counts, weights, alpha=alpha_srm, min_sample=min_sample, min_deviation=min_deviation)
    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="audit") as pool:
        id_tests = pool.submit(id_structure_tests, cols.unit_ids, arms, n_arms, alpha=alpha_srm)
        ranked = [pool.submit(_prepare_numeric, v, arms, _arm_bits(n_arms)) for v in cols.numeric.values()]
        if ranges is None or sum(e - s for s, e in ranges) >= 1.0 - 1e-12:
            uniformity = bucket_uniformity(cols.buckets, alpha=alpha_srm)
        else:
            uniformity = covered_uniformity(cols.buckets, ranges, resolution, alpha=alpha_srm)
        bases, prepared, notes = _prepare(cols, arms, n_arms, windows, by_categorical, "all")
        balance = _balance(cols, arms, n_arms, bases, prepared, 0, alpha_balance, 20, pool, ranked)
        clustering = id_tests.result()
    if other_arms:
        clustering += carry_over_tests(arms, other_arms, alpha=alpha_srm)
    clustering += _arm_shares(prepared, alpha_srm)
    return assemble_report(n, srm, uniformity, clustering, balance, alpha_balance, notes, started)


def assemble_report(
    exposures: int,
    srm: SRMResult,
    uniformity: TestResult,
    clustering: list[TestResult],
    balance: list[BalanceResult],
    alpha_balance: float,
    notes: Sequence[str],
    started: float,
) -> AuditReport:
    """The audit's report from its parts (shared by the in-memory audit and the table audit): ``reasons`` name
    every alert; ``started`` is the ``time.perf_counter()`` at which the audit began."""
    # The overall comparison (a handful of tests) is flagged at alpha_balance; the hundreds of per-window tests
    # at the Bonferroni threshold over them, so that a sound experiment does not raise false alarms every audit.
    windowed = sum(b.window != "all" for b in balance)
    balance_alpha = alpha_balance / max(windowed, 1)
    balance = [
        replace(b, imbalanced=b.p_value < (alpha_balance if b.window == "all" else balance_alpha)) for b in balance
    ]
    reasons = []
    if srm.alert:
        reasons.append(f"srm: {srm.reason}")
    if uniformity.alert:
        reasons.append(f"{uniformity.name}: {uniformity.detail}")
    reasons += [f"{t.name}: {t.detail}" for t in clustering if t.alert]
    flagged = [b for b in balance if b.imbalanced]
    if flagged:
        worst = min(flagged, key=lambda b: b.p_value)
        reasons.append(
            f"balance: {len(flagged)} of {len(balance)} tests imbalanced, worst {worst.covariate} "
            f"in {worst.window}: arm {worst.arm_b} vs {worst.arm_a}, {worst.test} p={worst.p_value:.3g}, "
            f"effect size {worst.effect_size:+.3f}"
        )
    return AuditReport(
        exposures=exposures,
        srm=srm,
        uniformity=uniformity,
        clustering=tuple(clustering),
        balance=tuple(balance),
        alert=bool(reasons),
        seconds=time.perf_counter() - started,
        balance_alpha=balance_alpha,
        reasons=tuple(reasons),
        notes=tuple(notes),
    )


def with_srm_since(
    report: AuditReport,
    arms: np.ndarray,
    versions: np.ndarray,
    since: int,
    weights: Sequence[float],
    *,
    min_sample: int,
    min_deviation: float,
) -> AuditReport:
    """The report with SRM over the units first exposed at config version >= ``since`` only (the weights
    in force apply from there), when some were exposed before; ``alert`` recomputed."""
    if not (versions < since).any():
        return report
    counts = np.bincount(arms[versions >= since], minlength=len(weights))
    srm = sample_ratio_test(counts, weights, min_sample=min_sample, min_deviation=min_deviation)
    srm = replace(srm, reason=f"{srm.reason} (units exposed since version {since})")
    alert = (
        srm.alert
        or report.uniformity.alert
        or any(t.alert for t in report.clustering)
        or any(b.imbalanced for b in report.balance)
    )
    return replace(report, srm=srm, alert=alert)
