"""Feature drift between a reference window and a live sliding window, with noise floors that hold.

Per feature the core measures how far live traffic has moved from the data the model knows, with effect
sizes first (p-values on large windows flag differences nobody cares about):

* **PSI** (population stability index) over quantile bins of the reference;
* the exact two-sample **Kolmogorov-Smirnov statistic** D = sup |F_ref - F_live| (an effect size: the largest
  share of the distribution that moved) and its asymptotic p-value;
* the **missing rate** in both windows and its change;
* **Cohen's d**, the standardised mean difference with the pooled standard deviation;
* a **drift score** in [0, 1] combining PSI, D and the missing-rate increase, and one model-level score.

The scorer turns the model-level score into its decision threshold with ``decision.ThresholdPolicy``.

Conventions
-----------
Data arrive as rows x features (a torch tensor or anything ``numpy.asarray`` accepts). A non-finite value
(NaN, or +-inf, which no model input should carry either) is *missing*: it counts in the missing rate and is
left out of every other statistic. Everything is computed in float64 (float32 inputs convert exactly), on the
reference window's device, vectorised over all features at once: no Python loop runs per feature. Storage is
features-major (features x rows) so each feature's values are contiguous for sorting and searching. The one
exception to "all in torch": on the CPU, rows are sorted by numpy's SIMD sort (zero-copy, ~3x faster there
than ``torch.sort``, which always builds an index tensor too).

PSI binning
-----------
Interior edges are the deciles (``bins - 1`` = 9 cut points at q = 1/10 ... 9/10) of the reference's
non-missing values, with numpy's default ``linear`` quantile method, de-duplicated (a feature with ties, such
as a 0/1 flag, gets fewer bins). The bins are open-ended and closed on the left:
``(-inf, e1), [e1, e2), ..., [e_last, +inf)``; a value's bin is ``searchsorted(edges, x, side="right")``.
Empty bins: each window's proportions are smoothed with ``PSI_PSEUDO_COUNT`` = 0.5 per bin in use (the
Jeffreys / Krichevsky-Trofimov estimate ``(count + 0.5) / (n + 0.5 B)``) before
``PSI = sum((p_live - p_ref) * ln(p_live / p_ref))``, so an empty bin adds a bounded term that shrinks with
the window instead of ``ln`` of a tiny floor (with a 1e-4 floor one empty bin of a 20-row window added 0.69).

KS p-value, Cohen's d, mean and variance: guardmesh.stats
---------------------------------------------------------
The drift report computes what only it can do fast (sorting, PSI of every feature at once, on the reference's
device) and takes the rest from :mod:`guardmesh.stats`, the one implementation that the A/B router's audit and
guardrails use too: ``ks_statistic_sorted`` for the exact D of every feature against the reference sorted once
(``ks_run_starts`` prepared with it), ``ks_p_value`` for D, ``mean_var`` from each window's count, sum and
sum of squares, ``standardized_mean_difference`` for Cohen's d (the per-feature vectors go to the host and back).
``ks_pvalue = Q(sqrt(en) * D)`` with ``en = n_ref * n_live / (n_ref + n_live)`` and Q the survival function of
the Kolmogorov distribution (``scipy.special.kolmogorov``, the limit law of sqrt(en) * D). Note that
``scipy.stats.ks_2samp(method="asymp")`` uses ``kstwo.sf(D, round(en))`` instead, the exact one-sample law at
n = round(en); the two differ by O(1/sqrt(en)): at most 0.009 for 1,000 vs 100,000 rows, 0.003 for 10,000
vs 100,000. The statistic D is computed exactly in integers (one rounding at the end) and equals
``ks_2samp(...).statistic`` to ~1e-16 (scipy rounds each ECDF value before subtracting).

Drift score and its noise floors
--------------------------------
Each effect size first loses its *noise floor*: the value sampling noise alone exceeds with probability
``level = FALSE_ALARM_RATE / (3 * features)`` at these window sizes (``FALSE_ALARM_RATE`` = 0.05; three tests
per feature, Bonferroni over all of them). So under no drift the chance that *any* feature scores above 0 is
about 5 % whatever the window size and feature count (the floors are approximations: 2-12 % measured over
windows of 20-1,000 rows, 1-100 features, 0-20 % missing), and the model score rarely leaves 0; a tiny
shift on a huge window stays tiny too. With ``sat(x, h) = 1 - 2 ** (-max(x, 0) / h)`` (0 at 0, 0.5 at h):

* ``score_psi = sat(PSI - floor_psi, 0.1)``: PSI 0.1 above the floor scores 0.5, 0.25 above 0.82;
  ``floor_psi = chi2.isf(level, bins in use - 1) * (1/n_ref + 1/n_live)``: under no drift ``PSI * n_eff``
  follows chi-square with bins - 1 degrees of freedom (smoothed PSI tracks it from 50 rows up; at 20 rows
  its tail is lighter, so the floor is conservative there);
* ``score_ks = max(D - floor_ks, 0) / (1 - floor_ks)``: D is already a share of the distribution in [0, 1];
  ``floor_ks = kolmogi(level) * sqrt(1/n_ref + 1/n_live)`` (the Kolmogorov limit law, conservative on small
  windows and with ties);
* ``score_missing = sat(missing_live - missing_ref - floor_missing, 0.1)``: only increases count, a rise of
  10 percentage points above the floor scores 0.5; with p the pooled missing rate, ``floor_missing`` is the
  larger of the normal bound ``z(level) * sqrt(p (1 - p) (1/rows_ref + 1/rows_live))`` (z the standard
  normal's upper quantile: noise in both windows) and the exact binomial one ``binom.isf(level, rows_live, p)
  / rows_live - p`` (the live count's skewed tail on small windows and rare missing values, where the normal
  bound alone let 70 % of 20-row windows of 100 features with 1 % missing score above 0);
* ``score = max(score_psi, score_ks, score_missing)`` per feature (an undefined term, e.g. D of a feature
  missing everywhere in the live window, counts as 0).

The model-level score is the mean of the ``top_k`` highest feature scores (``top_k = 1``, the default: the
worst feature). The scorer alerts at 0.5 (``ALERT_LEVEL``). Measured (``bench/drift_bench.py``): under no
drift the share of windows above 0.5 stays far below 5 % from 20 rows and 1 feature to 1,000 rows and 100
features, while a 0.5 SD shift of one feature on 1,000 rows scores above 0.5. Cohen's d is reported but not
scored: PSI and D already see a location shift, and d alone misses changes of shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import special as scipy_special
from scipy import stats as scipy_stats

from guardmesh import stats as shared_stats

__all__ = [
    "ALERT_LEVEL",
    "DEFAULT_BINS",
    "DEFAULT_LIVE_ROWS",
    "FALSE_ALARM_RATE",
    "KS_PVALUE_METHOD",
    "PSI_PSEUDO_COUNT",
    "SAMPLE_ROWS",
    "DriftReport",
    "FeatureDrift",
    "LiveWindow",
    "ReferenceWindow",
    "drift_stats",
    "noise_floor_level",
]

DEFAULT_LIVE_ROWS = 1_000
DEFAULT_BINS = 10
SAMPLE_ROWS = 1_000  # whole reference rows kept for row-wise figures
PSI_PSEUDO_COUNT = 0.5  # per bin in use, both windows (Jeffreys)
PSI_HALF = 0.1  # PSI excess scoring 0.5
MISSING_HALF = 0.1  # missing-rate increase (share of rows) scoring 0.5
#: Chance, under no drift, that any feature's score leaves 0 (family-wise over features and their 3 tests).
FALSE_ALARM_RATE = 0.05
#: Model drift score at and above which the scorer alerts (the metric's alert rule in the README).
ALERT_LEVEL = 0.5
TESTS_PER_FEATURE = 3  # PSI, KS, missing-rate increase
KS_PVALUE_METHOD = "asymptotic Kolmogorov distribution: Q(sqrt(n_ref*n_live/(n_ref+n_live)) * D)"

_F64 = torch.float64

ArrayLike = Any  # torch.Tensor, numpy array or nested sequences: rows x features


def _features_major(data: ArrayLike, device: torch.device, name: str) -> torch.Tensor:
    """``data`` (rows x features) as a contiguous float64 features x rows tensor on ``device``."""
    if isinstance(data, torch.Tensor):
        t = data.detach()
    else:
        try:
            t = torch.from_numpy(np.asarray(data, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: must be numeric rows x features ({exc})") from exc
    if t.ndim != 2:
        raise ValueError(f"{name}: must be 2-D (rows x features), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: needs at least one feature")
    return t.to(device=device, dtype=_F64).T.contiguous()


def _sort_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On the CPU through numpy's SIMD sort, zero-copy: ``torch.sort`` always
    builds an index tensor too and runs ~3x slower there; on an accelerator ``torch.sort``."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=1))
    return torch.sort(values, dim=1).values


def _sort_missing_last(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted with its missing values replaced by +inf (so they sort last), and its present count."""
    ordered = _sort_rows(torch.nan_to_num(values, nan=torch.inf, posinf=torch.inf, neginf=torch.inf))
    top = torch.full((ordered.shape[0], 1), torch.inf, dtype=ordered.dtype, device=ordered.device)
    return ordered, torch.searchsorted(ordered, top).squeeze(1)  # values below +inf: the present ones


def _decile_edges(sorted_values: torch.Tensor, counts: torch.Tensor, bins: int) -> torch.Tensor:
    """Per row the interior PSI edges: quantiles q = 1/bins ... (bins-1)/bins, de-duplicated, +inf padded.

    Mirrors ``numpy.quantile(method="linear")`` step by step (virtual index ``(n - 1) * q``, numpy's
    two-sided lerp) so that the edges equal numpy's bit for bit; ``numpy.unique`` then becomes "a value equal
    to its left neighbour turns into +inf", and +inf edges are never <= a present value, so they add only
    bins that stay empty in both windows.
    """
    # q as numpy has it (i / bins, correctly rounded, made on the host): CUDA divides by a Python scalar
    # through its reciprocal, and 3 * (1/10) != 3/10 moves an edge off a tied value by an ulp.
    q = torch.tensor([i / bins for i in range(1, bins)], dtype=_F64).to(sorted_values.device)
    n = counts.to(_F64).unsqueeze(1)
    virtual = (n - 1) * q
    below = torch.floor(virtual)
    gamma = virtual - below
    last = (counts - 1).clamp(min=0).unsqueeze(1)
    at_end = virtual >= n - 1
    lo = torch.where(at_end, last, below.long()).clamp(min=0)
    hi = torch.where(at_end, last, below.long() + 1).clamp(min=0)
    a = sorted_values.gather(1, lo)
    b = sorted_values.gather(1, hi)
    diff = b - a
    edges = torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    edges = torch.where(counts.unsqueeze(1) > 0, edges, torch.inf)
    edges = _sort_rows(edges)
    repeat = torch.zeros_like(edges, dtype=torch.bool)
    repeat[:, 1:] = edges[:, 1:] == edges[:, :-1]
    return _sort_rows(torch.where(repeat, torch.inf, edges))


def _bin_counts(sorted_values: torch.Tensor, counts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Present values per bin ``(-inf, e1), [e1, e2), ..., [e_last, inf)`` of sorted, +inf padded rows."""
    below = torch.searchsorted(sorted_values, edges, right=False)  # values < edge; padding is never < edge
    below = torch.minimum(below, counts.unsqueeze(1))
    zero = torch.zeros_like(counts).unsqueeze(1)
    cumulative = torch.cat([zero, below, counts.unsqueeze(1)], dim=1)
    return cumulative.diff(dim=1)


def _mean_var(ordered: torch.Tensor, counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row the mean and sample variance of the present values of sorted, +inf padded rows, on the host:
    count, sum and sum of squares summed on the device, then ``guardmesh.stats.mean_var``."""
    present = torch.arange(ordered.shape[1], device=ordered.device).unsqueeze(0) < counts.unsqueeze(1)
    values = torch.where(present, ordered, 0.0)
    total, total_sq = values.sum(dim=1), torch.linalg.vecdot(values, values)
    mean, var = shared_stats.mean_var(counts.cpu().numpy(), total.cpu().numpy(), total_sq.cpu().numpy())
    return np.asarray(mean, dtype=np.float64).reshape(-1), np.asarray(var, dtype=np.float64).reshape(-1)


def _on(like: torch.Tensor, values: Any) -> torch.Tensor:
    """Host figures (a numpy array or scalar per feature) as a float64 tensor of ``like``'s shape and device."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(like.shape)).to(like.device)


def _share(count: torch.Tensor, total: int) -> torch.Tensor:
    """``count / total`` in float64, correctly rounded on every device (not through 1/total on CUDA)."""
    return count.to(_F64) / torch.tensor(float(total), dtype=_F64, device=count.device)


def noise_floor_level(n_features: int) -> float:
    """Per-test false-alarm level of each noise floor: ``FALSE_ALARM_RATE / (3 * n_features)`` (Bonferroni)."""
    return FALSE_ALARM_RATE / (TESTS_PER_FEATURE * n_features)


def _chi2_quantiles(n_bins: torch.Tensor, level: float) -> torch.Tensor:
    """Per feature the upper ``level`` quantile of chi-square with ``n_bins - 1`` degrees of freedom (0 for 0)."""
    df = n_bins.cpu().numpy() - 1
    quantile = np.where(df > 0, scipy_stats.chi2.isf(level, np.maximum(df, 1)), 0.0)
    return torch.from_numpy(quantile.astype(np.float64)).to(n_bins.device)


def _smoothed_proportions(bin_counts: torch.Tensor, n_bins: torch.Tensor) -> torch.Tensor:
    """``(count + 0.5) / (n + 0.5 B)`` over each row's ``B = n_bins`` bins in use; 0 in the padding bins."""
    in_use = torch.arange(bin_counts.shape[1], device=bin_counts.device).unsqueeze(0) < n_bins.unsqueeze(1)
    total = bin_counts.sum(dim=1, keepdim=True).to(_F64) + PSI_PSEUDO_COUNT * n_bins.unsqueeze(1).to(_F64)
    return torch.where(in_use, (bin_counts.to(_F64) + PSI_PSEUDO_COUNT) / total, 0.0)


def _saturate(x: torch.Tensor, half: float) -> torch.Tensor:
    """``1 - 2**(-max(x, 0)/half)``: 0 at 0, 0.5 at ``half``, tending to 1; NaN counts as 0."""
    return 1 - torch.exp2(-torch.nan_to_num(x, nan=0.0).clamp(min=0) / half)


class LiveWindow:
    """Sliding window of the last ``capacity`` rows (default 1,000), a ring buffer on ``device``.

    Rows are kept features-major (features x capacity, float64); missing values stay NaN/inf and are counted as
    missing by ``drift_stats``.
    """

    def __init__(
        self, n_features: int, capacity: int = DEFAULT_LIVE_ROWS, *, device: torch.device | str = "cpu"
    ) -> None:
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError("n_features: must be an integer >= 1")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError("capacity: must be an integer >= 1")
        self._buffer = torch.full((n_features, capacity), torch.nan, dtype=_F64, device=torch.device(device))
        # On the CPU, rows are written through a numpy view of the same memory: one numpy assignment costs a
        # few microseconds, the torch conversions and strided copy of a small batch several times that.
        self._host: np.ndarray | None = self._buffer.numpy() if self._buffer.device.type == "cpu" else None
        self._next = 0  # column the next row goes to
        self._size = 0
        self._seen = 0

    @property
    def capacity(self) -> int:
        """Most rows the window holds."""
        return self._buffer.shape[1]

    @property
    def n_features(self) -> int:
        """Features per row."""
        return self._buffer.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the buffer lives."""
        return self._buffer.device

    @property
    def rows_seen(self) -> int:
        """Rows added since creation, including those that have slid out."""
        return self._seen

    def __len__(self) -> int:
        return self._size

    def add(self, batch: ArrayLike) -> None:
        """Append rows (rows x features; one 1-D row is accepted); the oldest rows beyond capacity slide out."""
        rows_in: np.ndarray | torch.Tensor
        if isinstance(batch, torch.Tensor):
            rows_in = batch.detach()
            if self._host is not None:
                rows_in = rows_in.to(device="cpu", dtype=_F64).numpy()
        else:
            try:
                rows_in = np.asarray(batch, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"batch: must be numeric rows x features ({exc})") from exc
            if self._host is None:
                rows_in = torch.from_numpy(rows_in)
        if rows_in.ndim == 1:
            rows_in = rows_in[None, :]
        if rows_in.ndim != 2 or rows_in.shape[1] != self.n_features:
            raise ValueError(f"batch: must be rows x {self.n_features} features, got shape {tuple(rows_in.shape)}")
        rows = rows_in.shape[0]
        if rows == 0:
            return
        self._seen += rows
        if rows > self.capacity:
            rows_in = rows_in[-self.capacity :]
        kept = rows_in.shape[0]
        buffer: Any = self._buffer if self._host is None else self._host  # a numpy or a torch view of the ring
        if isinstance(rows_in, torch.Tensor):
            rows_in = rows_in.to(device=self.device, dtype=_F64)
        columns = rows_in.T
        first = min(kept, self.capacity - self._next)  # columns up to the buffer's end; the rest wrap to 0
        # Plain slices: an index tensor (torch.arange) cost ~0.1 ms per call, most of an add.
        buffer[:, self._next : self._next + first] = columns[:, :first]
        if first < kept:
            buffer[:, : kept - first] = columns[:, first:]
        self._next = (self._next + kept) % self.capacity
        self._size = min(self._size + kept, self.capacity)

    def values(self) -> torch.Tensor:
        """The held rows features-major (features x len), in buffer order (statistics ignore order)."""
        return self._buffer if self._size == self.capacity else self._buffer[:, : self._size]

    def rows(self) -> torch.Tensor:
        """The held rows as rows x features, oldest first."""
        if self._size < self.capacity:
            return self._buffer[:, : self._size].T.clone()
        return torch.roll(self._buffer, -self._next, dims=1).T.contiguous()


@dataclass(frozen=True, eq=False)
class ReferenceWindow:
    """What the live window is compared with, prepared once: per feature (rows of every tensor) on ``device``.

    Built with ``from_rows`` (training data) or ``from_live`` (the first N rows after activation).
    """

    sorted_values: torch.Tensor
    """features x rows, float64: each feature's present values ascending, then +inf for its missing ones."""
    counts: torch.Tensor
    """features, int64: present (non-missing) values per feature."""
    rows: int
    """Rows in the window."""
    edges: torch.Tensor
    """features x (bins - 1), float64: interior PSI edges ascending, de-duplicated, +inf padded."""
    n_bins: torch.Tensor
    """features, int64: PSI bins actually in use (finite edges + 1)."""
    run_start: torch.Tensor
    """features x rows, int32: index in ``sorted_values`` where the run of values equal to this one starts."""
    proportions: torch.Tensor
    """features x bins, float64: each feature's smoothed share per bin in use (``_smoothed_proportions``),
    0 in unused bins."""
    psi_quantile: torch.Tensor
    """features, float64: chi-square quantile at ``noise_floor_level(features)`` with ``n_bins - 1`` degrees of
    freedom; the PSI noise floor is this times ``1/n_ref + 1/n_live``."""
    mean: torch.Tensor
    """features, float64: mean of the present values (NaN for a feature with none)."""
    variance: torch.Tensor
    """features, float64: sample variance of the present values (NaN with fewer than 2)."""
    names: tuple[str, ...]
    """Feature names (default f0, f1, ...)."""
    sample: torch.Tensor
    """rows x features, float64: up to ``SAMPLE_ROWS`` whole reference rows (evenly spaced, in order; NaN =
    missing), for figures that need rows rather than per-feature values (the attribution shift)."""

    @classmethod
    def from_rows(
        cls,
        rows: ArrayLike,
        *,
        device: torch.device | str | None = None,
        bins: int = DEFAULT_BINS,
        names: Sequence[str] | None = None,
    ) -> ReferenceWindow:
        """Prepare a reference from rows x features (NaN = missing) on ``device``.

        ``device`` defaults to the tensor's own device, or the CPU for other inputs. ``bins`` is the number of
        quantile bins before de-duplication (10: deciles).
        """
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 1000:
            raise ValueError("bins: must be an integer from 2 to 1000")
        if device is None:
            device = rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu")
        values = _features_major(rows, torch.device(device), "rows")
        step = -(-values.shape[1] // SAMPLE_ROWS)  # ceil: at most SAMPLE_ROWS rows, evenly spaced
        sample = values[:, ::step].T.contiguous()
        if values.shape[1] == 0:
            raise ValueError("rows: the reference window needs at least one row")
        n_features = values.shape[0]
        if names is None:
            names = [f"f{i}" for i in range(n_features)]
        if len(names) != n_features:
            raise ValueError(f"names: {len(names)} names for {n_features} features")
        sorted_values, counts = _sort_missing_last(values)
        del values
        mean, variance = _mean_var(sorted_values, counts)
        edges = _decile_edges(sorted_values, counts, bins)
        n_bins = torch.isfinite(edges).sum(dim=1) + 1
        return cls(
            sorted_values=sorted_values,
            counts=counts,
            run_start=shared_stats.ks_run_starts(sorted_values),
            rows=sorted_values.shape[1],
            edges=edges,
            n_bins=n_bins,
            proportions=_smoothed_proportions(_bin_counts(sorted_values, counts, edges), n_bins),
            psi_quantile=_chi2_quantiles(n_bins, noise_floor_level(n_features)),
            mean=torch.from_numpy(mean).to(sorted_values.device),
            variance=torch.from_numpy(variance).to(sorted_values.device),
            names=tuple(str(n) for n in names),
            sample=sample,
        )

    @classmethod
    def from_live(
        cls,
        live: LiveWindow,
        *,
        device: torch.device | str | None = None,
        bins: int = DEFAULT_BINS,
        names: Sequence[str] | None = None,
    ) -> ReferenceWindow:
        """Snapshot the rows a live window holds now (the first N after activation) as the reference."""
        if len(live) == 0:
            raise ValueError("live: the window holds no rows yet")
        return cls.from_rows(live.values().T, device=device or live.device, bins=bins, names=names)

    @property
    def device(self) -> torch.device:
        """Where every statistic is computed."""
        return self.sorted_values.device

    @property
    def n_features(self) -> int:
        """Features per row."""
        return self.sorted_values.shape[0]

    @property
    def missing_rate(self) -> torch.Tensor:
        """features, float64: share of rows with the feature missing."""
        return _share(self.rows - self.counts, self.rows)


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's figures, as plain numbers (what the drift report RPC returns per feature)."""

    name: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    missing_reference: float
    missing_live: float
    missing_delta: float
    smd: float
    score: float
    score_psi: float
    score_ks: float
    score_missing: float
    floor_psi: float
    floor_ks: float
    floor_missing: float
    n_reference: int
    n_live: int


@dataclass(frozen=True, eq=False)
class DriftReport:
    """Per-feature drift figures (tensors of length features, on the reference's device) and the model score.

    An undefined figure is NaN: PSI, D, its p-value and Cohen's d of a feature with no present value in either
    window; d when there are fewer than 2 values in all. Cohen's d is +-inf when both windows are constant at
    different values.
    """

    names: tuple[str, ...]
    psi: torch.Tensor
    """Population stability index over the reference's quantile bins (>= 0)."""
    ks_statistic: torch.Tensor
    """Exact two-sample KS statistic D in [0, 1]."""
    ks_pvalue: torch.Tensor
    """Asymptotic p-value of D (``KS_PVALUE_METHOD``)."""
    missing_reference: torch.Tensor
    """Share of reference rows with the feature missing."""
    missing_live: torch.Tensor
    """Share of live rows with the feature missing."""
    missing_delta: torch.Tensor
    """missing_live - missing_reference."""
    smd: torch.Tensor
    """Cohen's d: (mean_live - mean_ref) / pooled SD."""
    score_psi: torch.Tensor
    """PSI term of the drift score, in [0, 1]."""
    score_ks: torch.Tensor
    """KS term of the drift score, in [0, 1]."""
    score_missing: torch.Tensor
    """Missing-rate term of the drift score, in [0, 1]."""
    floor_psi: torch.Tensor
    """PSI noise floor at these window sizes (what no drift exceeds with probability ``level``)."""
    floor_ks: torch.Tensor
    """KS statistic noise floor at these window sizes."""
    floor_missing: torch.Tensor
    """Missing-rate increase noise floor at these window sizes."""
    feature_score: torch.Tensor
    """Per-feature drift score in [0, 1]: the largest of the three terms."""
    n_reference: torch.Tensor
    """Present values per feature in the reference window."""
    n_live: torch.Tensor
    """Present values per feature in the live window."""
    reference_rows: int
    live_rows: int
    top_k: int
    level: float
    """Per-test false-alarm level of the noise floors: ``noise_floor_level(features)``."""
    score: float
    """Model-level drift score in [0, 1]: mean of the ``top_k`` highest feature scores."""

    def features(self) -> list[FeatureDrift]:
        """Every feature's figures as plain numbers (one device-to-host copy per figure)."""
        columns = {
            "psi": self.psi,
            "ks_statistic": self.ks_statistic,
            "ks_pvalue": self.ks_pvalue,
            "missing_reference": self.missing_reference,
            "missing_live": self.missing_live,
            "missing_delta": self.missing_delta,
            "smd": self.smd,
            "score": self.feature_score,
            "score_psi": self.score_psi,
            "score_ks": self.score_ks,
            "score_missing": self.score_missing,
            "floor_psi": self.floor_psi,
            "floor_ks": self.floor_ks,
            "floor_missing": self.floor_missing,
        }
        host = {key: value.tolist() for key, value in columns.items()}
        n_ref, n_live = self.n_reference.tolist(), self.n_live.tolist()
        return [
            FeatureDrift(name=name, n_reference=n_ref[i], n_live=n_live[i], **{key: host[key][i] for key in host})
            for i, name in enumerate(self.names)
        ]


def drift_stats(reference: ReferenceWindow, live: LiveWindow | ArrayLike, *, top_k: int = 1) -> DriftReport:
    """Compare the live window (a ``LiveWindow`` or rows x features) with the reference, all features at once.

    Runs on the reference's device (live rows elsewhere are copied there first). Raises ValueError naming
    ``live`` for an empty window or a feature count that does not match, ``top_k`` outside 1..features.
    """
    n_features = reference.n_features
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_features:
        raise ValueError(f"top_k: must be an integer from 1 to {n_features}")
    if isinstance(live, LiveWindow):
        values = live.values().to(device=reference.device)
    else:
        values = _features_major(live, reference.device, "live")
    if values.shape[0] != n_features:
        raise ValueError(f"live: has {values.shape[0]} features, the reference {n_features}")
    live_rows = values.shape[1]
    if live_rows == 0:
        raise ValueError("live: the window holds no rows")

    live_sorted, n_live = _sort_missing_last(values)
    live_mean, live_var = _mean_var(live_sorted, n_live)
    n_ref = reference.counts
    defined = (n_ref > 0) & (n_live > 0)

    # PSI: live counts per reference bin, both windows smoothed over the bins in use (padding bins: 0 in both).
    p_live = _smoothed_proportions(_bin_counts(live_sorted, n_live, reference.edges), reference.n_bins)
    p_ref = reference.proportions
    terms = torch.where(p_ref > 0, (p_live - p_ref) * torch.log(p_live / p_ref), 0.0)
    psi = torch.where(defined, terms.sum(dim=1), torch.nan)

    # KS: the shared exact D against the reference sorted once (missing live values sort last as +inf padding).
    d = shared_stats.ks_statistic_sorted(reference.sorted_values, reference.run_start, n_ref, live_sorted, n_live)
    d = torch.where(defined, d, torch.nan)
    inv_n = 1 / n_ref.to(_F64) + 1 / n_live.to(_F64)  # 1 / en; inf when a window has no present value
    n_ref_host, n_live_host = n_ref.cpu().numpy(), n_live.cpu().numpy()
    pvalue = _on(d, shared_stats.ks_p_value(d.cpu().numpy(), n_ref_host, n_live_host))

    # Missing rates (share of rows).
    missing_ref = reference.missing_rate
    missing_live = _share(live_rows - n_live, live_rows)
    missing_delta = missing_live - missing_ref

    # Cohen's d with the pooled SD; a zero SD gives 0 for equal means, +-inf otherwise.
    ref_mean, ref_var = reference.mean.cpu().numpy(), reference.variance.cpu().numpy()
    smd = _on(
        d, shared_stats.standardized_mean_difference(ref_mean, ref_var, n_ref_host, live_mean, live_var, n_live_host)
    )

    # Drift score: each effect size beyond its no-drift noise floor at the Bonferroni level, saturated, then
    # the largest; the floors are reported beside the figures.
    level = noise_floor_level(n_features)
    floor_psi = reference.psi_quantile * inv_n
    score_psi = torch.where(defined, _saturate(psi - floor_psi, PSI_HALF), 0.0)
    floor_ks = float(scipy_special.kolmogi(level)) * torch.sqrt(inv_n)
    score_ks = torch.where(defined & (floor_ks < 1), (d - floor_ks).clamp(min=0) / (1 - floor_ks), 0.0)
    pooled_missing = ((reference.rows - n_ref) + (live_rows - n_live)).to(_F64) / (reference.rows + live_rows)
    normal_floor = float(scipy_special.ndtri(1 - level)) * torch.sqrt(
        pooled_missing * (1 - pooled_missing) * (1 / reference.rows + 1 / live_rows)
    )
    pooled_host = pooled_missing.cpu().numpy()
    binomial_floor = _on(pooled_missing, scipy_stats.binom.isf(level, live_rows, pooled_host) / live_rows - pooled_host)
    floor_missing = torch.maximum(normal_floor, binomial_floor)
    score_missing = _saturate(missing_delta - floor_missing, MISSING_HALF)
    feature_score = torch.stack([score_psi, score_ks, score_missing]).amax(dim=0).clamp(0.0, 1.0)
    score = float(torch.topk(feature_score, top_k).values.mean())

    return DriftReport(
        names=reference.names,
        psi=psi,
        ks_statistic=d,
        ks_pvalue=pvalue,
        missing_reference=missing_ref,
        missing_live=missing_live,
        missing_delta=missing_delta,
        smd=smd,
        score_psi=score_psi,
        score_ks=score_ks,
        score_missing=score_missing,
        floor_psi=torch.where(defined, floor_psi, torch.nan),
        floor_ks=torch.where(defined, floor_ks, torch.nan),
        floor_missing=floor_missing,
        feature_score=feature_score,
        n_reference=n_ref,
        n_live=n_live,
        reference_rows=reference.rows,
        live_rows=live_rows,
        top_k=top_k,
        level=level,
        score=min(max(score, 0.0), 1.0),
    )
