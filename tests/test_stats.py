"""guardmesh.stats against scipy and the textbook formulas (known answers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from guardmesh.stats import (
    Moments,
    ks_p_value,
    ks_run_starts,
    ks_statistic_grouped,
    ks_statistic_sorted,
    ks_two_sample,
    mean_var,
    standardized_mean_difference,
)


def test_moments_match_numpy_and_add_up() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(3.0, 2.0, 500), rng.exponential(1.0, 300)
    mx, my = Moments.of(x), Moments.of(y)
    both = np.concatenate([x, y])
    assert (mx + my).mean == pytest.approx(both.mean(), rel=1e-12)
    assert (mx + my).variance == pytest.approx(both.var(ddof=1), rel=1e-10)
    step = Moments()
    for v in x:
        step = step.add(v)
    assert step.count == 500 and step.variance == pytest.approx(x.var(ddof=1), rel=1e-10)
    grown = mx.replace_value(x[0], x[0] + 5.0)
    x2 = x.copy()
    x2[0] += 5.0
    assert grown.mean == pytest.approx(x2.mean(), rel=1e-12) and grown.variance == pytest.approx(x2.var(ddof=1))


def test_mean_var_edge_cases_and_vectorised() -> None:
    assert math.isnan(Moments().mean) and math.isnan(Moments.of([4.0]).variance)
    assert Moments.of([4.0, np.nan, np.inf]).count == 1
    assert Moments.of([2.0, 2.0, 2.0]).variance == 0.0
    mean, var = mean_var(np.array([0, 2, 3]), np.array([0.0, 3.0, 6.0]), np.array([0.0, 5.0, 14.0]))
    assert math.isnan(mean[0]) and mean[1] == 1.5 and mean[2] == 2.0
    assert var[1] == pytest.approx(np.var([1, 2], ddof=1)) and var[2] == pytest.approx(np.var([1, 2, 3], ddof=1))


def test_smd_is_cohens_d_with_pooled_sd() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 40), rng.normal(0.5, 2, 90)
    pooled = math.sqrt((39 * a.var(ddof=1) + 89 * b.var(ddof=1)) / 128)
    got = standardized_mean_difference(a.mean(), a.var(ddof=1), 40, b.mean(), b.var(ddof=1), 90)
    assert got == pytest.approx((b.mean() - a.mean()) / pooled, rel=1e-12)
    assert standardized_mean_difference(1.0, 0.0, 5, 1.0, 0.0, 5) == 0.0
    assert standardized_mean_difference(1.0, 0.0, 5, 2.0, 0.0, 5) == math.inf
    assert standardized_mean_difference(2.0, 0.0, 5, 1.0, math.nan, 1) == -math.inf
    assert math.isnan(standardized_mean_difference(1.0, math.nan, 1, 2.0, math.nan, 1))
    assert math.isnan(standardized_mean_difference(1.0, 1.0, 0, 2.0, 1.0, 9))


def test_ks_statistic_is_scipys_and_p_value_the_kolmogorov_limit() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 700), rng.normal(0.2, 1, 400)
    r = ks_two_sample(np.append(a, np.nan), b)
    ref = stats.ks_2samp(a, b)
    assert (r.n_a, r.n_b) == (700, 400) and r.statistic == pytest.approx(ref.statistic, abs=1e-15)
    en = 700 * 400 / 1100
    assert r.p_value == pytest.approx(special.kolmogorov(math.sqrt(en) * ref.statistic), rel=1e-12)
    # the asymptotic law is close to scipy's exact p-value at this size
    assert r.p_value == pytest.approx(ref.pvalue, abs=0.01)
    p = ks_p_value(np.array([0.0, 0.1, 1.0]), np.array([10, 0, 10]), np.array([10, 5, 10]))
    assert p[0] == 1.0 and math.isnan(p[1]) and p[2] < 1e-3
    assert math.isnan(ks_two_sample([], [1.0]).statistic)


@pytest.mark.parametrize("ties", [False, True])
def test_grouped_ks_statistic_is_scipys_per_group_and_sample(ties: bool) -> None:
    """Several groups (one empty, one without sample 2) and two samples against sample 0, as the audit calls it."""
    rng = np.random.default_rng(11)
    sizes = {(0, 0): 300, (0, 1): 200, (0, 2): 150, (1, 0): 0, (1, 1): 0, (1, 2): 0, (2, 0): 40, (2, 1): 1}
    sizes |= {(2, 2): 0, (3, 0): 1, (3, 1): 1, (3, 2): 2}
    samples = {}
    for (g, k), n in sizes.items():
        x = rng.normal(0.3 * k, 1.0, n)
        samples[g, k] = np.round(x, 1) if ties else x  # rounding: many equal values across samples
    group = np.concatenate([np.full(n, g) for (g, _), n in sizes.items()])
    cell = np.concatenate([np.full(n, g * 4 + k) for (g, k), n in sizes.items()])
    values = np.concatenate(list(samples.values()))
    order = np.lexsort((values, group))
    run_end = np.empty(order.size, dtype=bool)
    run_end[:-1] = (values[order][1:] != values[order][:-1]) | (group[order][1:] != group[order][:-1])
    run_end[-1] = True
    counts = np.zeros((4, 4), dtype=np.int64)
    for (g, k), n in sizes.items():
        counts[g, k] = n
    d = ks_statistic_grouped(cell[order], run_end if ties else None, counts, 4, 0, [1, 2])
    for g in range(4):
        for j, k in enumerate((1, 2)):
            a, b = samples[g, 0], samples[g, k]
            if a.size and b.size:
                assert d[g, j] == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-15), (g, k)
            else:
                assert math.isnan(d[g, j]), (g, k)
    # the one-group form behind ks_two_sample, ties and all
    a, b = samples[0, 0], samples[0, 2]
    assert ks_two_sample(a, b).statistic == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-15)


def _padded_sorted_rows(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(s.size for s in samples))
    rows = np.full((len(samples), width), np.inf)
    for i, s in enumerate(samples):
        rows[i, : s.size] = np.sort(s)
    return torch.from_numpy(rows), torch.tensor([s.size for s in samples])


def test_sorted_reference_ks_is_scipys_per_row_with_ties_empty_rows_and_different_sizes() -> None:
    rng = np.random.default_rng(18)
    references, others = [], []
    for n_ref, n_other, mode in [
        (500, 120, "normal"),
        (37, 900, "ties"),  # few distinct values, shared between the samples
        (1, 1, "ties"),
        (80, 80, "identical"),
        (0, 40, "normal"),  # empty reference row
        (60, 0, "normal"),  # empty other row
        (250, 3, "shifted"),
        (3, 3, "disjoint"),
    ]:
        if mode == "ties":
            ref, other = rng.integers(0, 4, n_ref).astype(float), rng.integers(1, 5, n_other).astype(float)
        elif mode == "identical":
            ref = rng.normal(size=n_ref)
            other = ref[rng.permutation(n_ref)]
        elif mode == "disjoint":
            ref, other = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
        else:
            ref, other = rng.normal(size=n_ref), rng.normal(0.5 if mode == "shifted" else 0.0, 1, n_other)
        references.append(ref)
        others.append(other)
    reference, n_reference = _padded_sorted_rows(references)
    other_rows, other_counts = _padded_sorted_rows(others)
    d = ks_statistic_sorted(reference, ks_run_starts(reference), n_reference, other_rows, other_counts).numpy()
    for i, (ref_values, other_values) in enumerate(zip(references, others, strict=True)):
        if ref_values.size == 0 or other_values.size == 0:
            assert math.isnan(d[i])
        else:
            assert d[i] == pytest.approx(stats.ks_2samp(ref_values, other_values).statistic, abs=1e-15), i
    # the reference is reused: a second sample against the same sorted rows needs no re-sort
    again, n_again = _padded_sorted_rows([rng.normal(size=50) for _ in references])
    d2 = ks_statistic_sorted(reference, ks_run_starts(reference), n_reference, again, n_again).numpy()
    assert d2[0] == pytest.approx(stats.ks_2samp(references[0], again[0, :50].numpy()).statistic, abs=1e-15)


@pytest.mark.parametrize("ties", [False, True])
def test_two_sample_ks_and_the_grouped_audit_path_agree(ties: bool) -> None:
    # ks_two_sample (sorted-reference D) and ks_statistic_grouped (the audit's windows) give the same D
    rng = np.random.default_rng(7)
    a = rng.integers(0, 6, 300).astype(float) if ties else rng.normal(size=300)
    b = rng.integers(0, 7, 170).astype(float) if ties else rng.normal(0.3, 1, 170)
    values = np.concatenate([a, b])
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    run_end = np.append(ordered[1:] != ordered[:-1], True)
    cell = (order >= a.size).astype(np.intp)
    grouped = ks_statistic_grouped(cell, run_end, np.array([[a.size, b.size]]), 2, 0, [1])[0, 0]
    assert ks_two_sample(a, b).statistic == pytest.approx(grouped, abs=1e-15)
