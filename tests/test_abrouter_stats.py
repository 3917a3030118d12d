"""The abrouter's randomisation audit and imbalance corrections, checked against scipy and against data whose
flaw (or its absence) is known: a skewed split, clustered hashes, arms alternating by id block, arms copied
from another experiment, a shifted covariate, an over-represented device, an imbalance inside one season."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import pytest
from scipy import special, stats

from services.abrouter import audit, correction
from services.abrouter.columns import CategoricalColumn, ExposureColumns

DAY = 86_400.0
NOV_20_2026 = dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp()
DEVICES = ("CT-1000", "CT-2000", "MR-3000", "US-4000")


def make_cols(
    n: int,
    seed: int = 0,
    *,
    arms: np.ndarray | None = None,
    start: float = NOV_20_2026,
    days: float = 30.0,
    numeric: dict[str, np.ndarray] | None = None,
    device: np.ndarray | None = None,
    timestamps: np.ndarray | None = None,
) -> ExposureColumns:
    """n exposures with a sound 50/50 randomisation unless told otherwise."""
    rng = np.random.default_rng(seed)
    buckets = rng.integers(0, 1000, n) / 1000  # GrowthBook hash v1 values
    if arms is None:
        arms = (buckets >= 0.5).astype(np.int16)
    if numeric is None:
        lesion = rng.lognormal(2.0, 0.5, n)
        lesion[rng.random(n) < 0.05] = np.nan
        numeric = {"lesion_mm": lesion, "age": rng.integers(18, 90, n).astype(np.float64)}
    if device is None:
        device = rng.integers(-1, len(DEVICES), n).astype(np.int32)
    if timestamps is None:
        timestamps = start + rng.uniform(0, days * DAY, n)
    return ExposureColumns(
        unit_ids=np.array([f"user-{i:07d}" for i in rng.permutation(n)], dtype=object),
        arms=np.asarray(arms, dtype=np.int16),
        buckets=buckets,
        timestamps=timestamps,
        propensity=np.full(n, 0.5),
        numeric=numeric,
        categorical={"device": CategoricalColumn(device, DEVICES)},
    )


def utc_date(timestamp: float) -> dt.date:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date()


def by_name(results: list[audit.TestResult]) -> dict[str, audit.TestResult]:
    return {r.name: r for r in results}


# ---------------------------------------------------------------------------------------------------- SRM


def test_srm_alerts_on_a_52_48_split_and_matches_scipy() -> None:
    res = audit.sample_ratio_test([52_000, 48_000], [0.5, 0.5])
    ref = stats.chisquare([52_000, 48_000], [50_000, 50_000])
    assert res.alert and res.reason.startswith("sample ratio mismatch")
    assert res.chi2 == pytest.approx(ref.statistic) and res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.max_relative_deviation == pytest.approx(0.04)
    assert res.observed == (52_000, 48_000) and res.expected == (50_000.0, 50_000.0)


def test_srm_is_quiet_on_a_sound_split_small_samples_and_tiny_deviations() -> None:
    ok = audit.sample_ratio_test([50_100, 49_900], [1, 1])
    assert not ok.alert and ok.reason == "ok"
    # 100 million units, 0.1 % relative deviation: p is astronomically small, the deviation immaterial
    huge = audit.sample_ratio_test([50_050_000, 49_950_000], [0.5, 0.5])
    assert huge.p_value < 1e-20 and huge.max_relative_deviation == pytest.approx(0.001)
    assert not huge.alert and "min_deviation" in huge.reason
    small = audit.sample_ratio_test([600, 300], [0.5, 0.5])
    assert small.p_value < 0.001 and not small.alert and "below min_sample" in small.reason
    # unequal weights are normalised
    assert not audit.sample_ratio_test([20_100, 79_900], [1, 4]).alert
    assert audit.sample_ratio_test([25_000, 75_000], [1, 4]).alert


def test_srm_zero_weight_arms() -> None:
    quiet = audit.sample_ratio_test([5_000, 5_000, 0], [0.5, 0.5, 0.0])
    assert not quiet.alert and quiet.expected[2] == 0.0 and quiet.chi2 == pytest.approx(0.0)
    stray = audit.sample_ratio_test([5_000, 5_000, 3], [0.5, 0.5, 0.0])
    assert stray.alert and "weight is 0" in stray.reason and "[2]" in stray.reason


@pytest.mark.parametrize(
    ("counts", "weights", "needle"),
    [
        ([10, -1], [1, 1], "counts: must be >= 0"),
        ([10, 10], [1, 1, 1], "weights: need one per arm"),
        ([10, 10], [0, 0], "not all 0"),
        ([10, 10], [1, float("nan")], "weights: must be finite"),
        ([10.5, 10], [1, 1], "whole numbers"),
        ([], [], "non-empty"),
    ],
)
def test_srm_rejects_bad_input(counts: list[float], weights: list[float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        audit.sample_ratio_test(counts, weights)  # type: ignore[arg-type]  # bad input on purpose


# ---------------------------------------------------------------------------------------------------- uniformity


def test_uniformity_passes_hash_grids_and_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    v1 = rng.integers(0, 1000, 200_000) / 1000  # k/1000 * 100 lands an ulp below its bin edge without care
    res = audit.bucket_uniformity(v1)
    assert not res.alert and res.dof == 99
    counts = np.bincount(np.rint(v1 * 1000).astype(int) // 10, minlength=100)
    ref = stats.chisquare(counts)
    assert res.statistic == pytest.approx(ref.statistic) and res.p_value == pytest.approx(ref.pvalue)
    v2 = rng.integers(0, 10_000, 200_000) / 10_000
    assert not audit.bucket_uniformity(v2, bins=1000).alert
    with_unhashed = np.where(rng.random(v1.size) < 0.1, np.nan, v1)
    assert "unhashed" in audit.bucket_uniformity(with_unhashed).detail


def test_uniformity_rejects_clustered_hashes() -> None:
    rng = np.random.default_rng(2)
    values = rng.integers(0, 1000, 100_000) / 1000
    values[:8_000] = rng.choice([0.123, 0.124, 0.5], 8_000)  # collisions pile units onto a few values
    res = audit.bucket_uniformity(values)
    assert res.alert and res.p_value < 1e-10 and "not uniform" in res.detail


def test_uniformity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bins: must divide 1000"):
        audit.bucket_uniformity(np.zeros(10), bins=64)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        audit.bucket_uniformity(np.array([0.2, 1.0]))
    assert "skipped" in audit.bucket_uniformity(np.full(10, 0.5)).detail


# ---------------------------------------------------------------------------------------------------- id structure


def test_id_tests_pass_on_hash_assignment() -> None:
    cols = make_cols(60_000, 3)
    results = by_name(audit.id_structure_tests(cols.unit_ids, cols.arms, 2))
    assert set(results) == {"id_sequential", "id_prefix", "id_suffix"}
    assert not any(r.alert for r in results.values())
    assert "integer at the end" in results["id_sequential"].detail
    assert results["id_prefix"].dof == 0 and "skipped" in results["id_prefix"].detail  # every id is "user-..."


def test_id_sequential_catches_arms_alternating_by_id_block() -> None:
    n = 60_000
    ids = np.array([f"patient_{i:06d}" for i in range(n)], dtype=object)
    arms = (np.arange(n) // 5_000) % 2  # blocks of consecutive ids share an arm
    order = np.random.default_rng(4).permutation(n)  # log order is unrelated to the ids
    results = by_name(audit.id_structure_tests(ids[order], arms[order], 2))
    assert results["id_sequential"].alert and results["id_sequential"].p_value < 1e-12
    assert not results["id_suffix"].alert


def test_id_prefix_and_suffix_catch_structure() -> None:
    rng = np.random.default_rng(5)
    n = 40_000
    prefix = rng.choice(["ios", "web", "and"], n)
    ids = np.array([f"{p}:{i}" for i, p in enumerate(prefix)], dtype=object)
    arms = np.where(prefix == "ios", rng.random(n) < 0.6, rng.random(n) < 0.5).astype(np.int8)
    results = by_name(audit.id_structure_tests(ids, arms, 2))
    assert results["id_prefix"].alert and "'ios'" in results["id_prefix"].detail
    assert not results["id_sequential"].alert
    parity = np.array([int(s[-1]) % 2 for s in ids])
    flipped = np.where(rng.random(n) < 0.1, 1 - parity, parity)
    assert by_name(audit.id_structure_tests(ids, flipped, 2))["id_suffix"].alert


def test_id_tests_order_lexically_without_trailing_integers_and_sample_large_inputs() -> None:
    rng = np.random.default_rng(6)
    ids = np.array([f"{v:032x}" for v in rng.integers(0, 2**62, 20_000)], dtype=object)
    arms = rng.integers(0, 3, ids.size)
    results = by_name(audit.id_structure_tests(ids, arms, 3))
    assert "lexically" in results["id_sequential"].detail and not results["id_sequential"].alert
    big = make_cols(audit.ID_SAMPLE_MAX + 30_000, 7)
    detail = by_name(audit.id_structure_tests(big.unit_ids, big.arms, 2))["id_sequential"].detail
    assert "deterministic random sample" in detail
    with pytest.raises(ValueError, match="out of range"):
        audit.id_structure_tests(ids, arms, 2)
    with pytest.raises(ValueError, match="unit_ids"):
        audit.id_structure_tests(ids[:5], arms, 3)


@pytest.mark.parametrize("alphabet", ["abc-_:.0123456789", "abc-_:.0123456789é😀", "0123456789abcdef"])
@pytest.mark.parametrize("fixed_length", [False, True])
def test_id_features_match_a_per_string_reference(alphabet: str, fixed_length: bool) -> None:
    """The vectorised parsing (ASCII bytes or UTF-32, ids of one length or not) against plain Python."""
    rng = np.random.default_rng(21)
    lengths = np.full(3_000, 12) if fixed_length else rng.integers(0, 16, 3_000)
    ids = ["".join(rng.choice(list(alphabet), k)) for k in lengths]
    if not fixed_length:
        ids += ["user-000123", "", "q" * 70 + "-1", "k:" + "7" * 19]
    feats = audit._id_features(list(ids))
    for i, s in enumerate(ids):
        cut = [j for j in (s.find(c) for c in "-_:.") if j >= 0]
        row = feats.prefix_rows[feats.prefix[i]]
        assert ids[row][: feats.prefix_lengths[row]] == (s[: min(cut)] if cut else s[:2]), s
        assert feats.suffix_labels[feats.suffix[i]] == s[-1:], s
    assert [ids[i] for i in audit._lexical_order(ids, feats)] == sorted(ids)
    numbered = [f"{p}-{v}" for p, v in zip(rng.choice(["a", "bb"], 500), rng.integers(0, 10**15, 500), strict=True)]
    trailing = audit._id_features(numbered).trailing
    assert trailing is not None and trailing.tolist() == [int(s.split("-")[1]) for s in numbered]


# ---------------------------------------------------------------------------------------------------- carry-over


def test_carry_over_catches_copied_arms_and_passes_independent_ones() -> None:
    rng = np.random.default_rng(8)
    n = 50_000
    arms = rng.integers(0, 2, n)
    copied = np.where(rng.random(n) < 0.3, -1, arms)  # same hash, 30 % not in the other experiment
    copied[rng.random(n) < 0.2] = 1  # even partially copied
    independent = np.where(rng.random(n) < 0.5, -1, rng.integers(0, 3, n))
    results = by_name(audit.carry_over_tests(arms, {"exp-b": copied, "exp-c": independent}))
    assert results["carry_over:exp-b"].alert and results["carry_over:exp-b"].p_value < 1e-12
    assert not results["carry_over:exp-c"].alert and results["carry_over:exp-c"].dof == 2
    keep = independent >= 0
    table = np.array([[np.sum((arms[keep] == a) & (independent[keep] == b)) for b in range(3)] for a in range(2)])
    ref = stats.chi2_contingency(table, correction=False)
    assert results["carry_over:exp-c"].statistic == pytest.approx(ref.statistic)
    assert results["carry_over:exp-c"].p_value == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError, match=r"other_arms\['x'\]"):
        audit.carry_over_tests(arms, {"x": copied[:10]})


# ---------------------------------------------------------------------------------------------------- windows


def test_arm_share_by_window() -> None:
    rng = np.random.default_rng(9)
    n = 40_000
    day = rng.integers(0, 10, n)
    sound = rng.integers(0, 2, n)
    assert not audit.arm_share_by_window(sound, day, "arm_share:day").alert
    drifting = (rng.random(n) < 0.45 + 0.01 * day).astype(int)  # treatment share grows day by day
    res = audit.arm_share_by_window(drifting, day, "arm_share:day")
    table = np.array([np.bincount(day[drifting == a], minlength=10) for a in (0, 1)])
    ref = stats.chi2_contingency(table, correction=False)
    assert res.alert and res.statistic == pytest.approx(ref.statistic) and res.dof == 9
    labels = np.array([f"CT-{d}" for d in day], dtype=object)
    assert audit.arm_share_by_window(drifting, labels, "arm_share:device").alert


def test_window_names() -> None:
    ts = np.array(
        [NOV_20_2026, NOV_20_2026 + 30 * DAY, dt.datetime(2027, 1, 10, tzinfo=dt.UTC).timestamp(), np.nan] * 50
    )
    cols = make_cols(ts.size, 10, timestamps=ts)
    _, prepared, notes = audit._prepare(cols, cols.arms.astype(np.intp), 2, audit.TIME_WINDOWS, ("device",), None)
    names = {p.kind: p.names for p in prepared}
    assert names["day"] == ("day:2026-11-20", "day:2026-12-20", "day:2027-01-10")
    assert names["week"] == ("week:2026-W47", "week:2026-W51", "week:2027-W01")
    assert names["season"] == ("season:autumn-2026", "season:winter-2026/27")
    assert names["device"] == tuple(f"device:{d}" for d in DEVICES) and not notes
    with pytest.raises(ValueError, match="windows: unknown"):
        audit.balance_over_windows(cols, windows=("month",))


# ---------------------------------------------------------------------------------------------------- balance


def test_balance_flags_a_shifted_covariate_and_an_over_represented_device() -> None:
    rng = np.random.default_rng(11)
    n = 20_000
    arms = rng.integers(0, 2, n)
    lesion = rng.normal(10.0, 2.0, n) + 0.6 * arms  # treatment's lesions 0.3 sd larger
    age = rng.normal(50, 10, n)
    device = np.where(arms == 1, rng.choice(4, n, p=[0.4, 0.2, 0.2, 0.2]), rng.integers(0, 4, n)).astype(np.int32)
    cols = make_cols(n, 11, arms=arms, numeric={"lesion_mm": lesion, "age": age}, device=device)
    results = {r.covariate: r for r in audit.covariate_balance(cols, alpha=0.001)}
    lesion_r = results["lesion_mm"]
    assert lesion_r.imbalanced and lesion_r.test == "ks" and (lesion_r.arm_a, lesion_r.arm_b) == (0, 1)
    assert lesion_r.window == "all" and lesion_r.effect_size == pytest.approx(0.3, abs=0.05)
    a, b = lesion[arms == 0], lesion[arms == 1]
    assert lesion_r.statistic == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    en = a.size * b.size / (a.size + b.size)
    assert lesion_r.p_value == pytest.approx(special.kolmogorov(np.sqrt(en) * lesion_r.statistic))
    pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    smd = (b.mean() - a.mean()) / pooled  # Cohen's d (guardmesh.stats)
    assert lesion_r.effect_size == pytest.approx(smd) and (lesion_r.n_a, lesion_r.n_b) == (a.size, b.size)
    assert not results["age"].imbalanced
    dev = results["device"]
    table = np.array([np.bincount(device[arms == k], minlength=4) for k in (0, 1)])
    ref = stats.chi2_contingency(table, correction=False)
    assert dev.imbalanced and dev.test == "chi2" and dev.statistic == pytest.approx(ref.statistic)
    assert dev.effect_size == pytest.approx(np.sqrt(ref.statistic / n))  # Cramér's V of a 2 x k table


def test_balance_flags_an_imbalance_inside_one_season_that_washes_out_overall() -> None:
    rng = np.random.default_rng(12)
    n = 40_000
    x = rng.normal(size=n)
    summer = rng.random(n) < 0.5
    # summer: treatment over-samples high x; autumn: low x. Overall P(treatment | x) = 0.5 for every x.
    p_treat = 0.5 + np.where(summer, 0.15, -0.15) * np.sign(x)
    arms = (rng.random(n) < p_treat).astype(int)
    ts = np.where(
        summer,
        dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp() + rng.uniform(0, 30 * DAY, n),
        dt.datetime(2026, 10, 1, tzinfo=dt.UTC).timestamp() + rng.uniform(0, 30 * DAY, n),
    )
    cols = make_cols(n, 12, arms=arms, numeric={"x": x}, timestamps=ts)
    overall = {r.covariate: r for r in audit.covariate_balance(cols)}
    assert not overall["x"].imbalanced
    windowed = [r for r in audit.balance_over_windows(cols) if r.covariate == "x"]
    seasons = {r.window: r for r in windowed if r.window.startswith("season:")}
    assert set(seasons) == {"season:summer-2026", "season:autumn-2026"}
    assert all(r.imbalanced for r in seasons.values())
    assert seasons["season:summer-2026"].effect_size > 0.2 > -0.2 > seasons["season:autumn-2026"].effect_size
    in_summer = summer & (cols.arms == 0), summer & (cols.arms == 1)
    ks = stats.ks_2samp(x[in_summer[0]], x[in_summer[1]])
    assert seasons["season:summer-2026"].statistic == pytest.approx(ks.statistic, abs=1e-12)
    assert any(r.window.startswith("day:") for r in windowed) and any(r.window.startswith("week:") for r in windowed)
    # one full_audit sees it too (Bonferroni over all its balance tests)
    report = audit.full_audit(cols, [0.5, 0.5])
    assert report.alert and any("season:" in reason for reason in report.reasons)


def test_ks_statistic_is_exact_with_ties_and_near_ties() -> None:
    rng = np.random.default_rng(13)
    n = 50_000
    ulp = np.spacing(1.0)
    x = 1.0 + rng.integers(0, 40, n) * ulp  # exact ties, and values a few ulps apart
    x = np.where(rng.random(n) < 0.3, rng.normal(size=n), x)  # and continuous values
    arms = rng.integers(0, 3, n)
    age = rng.integers(18, 90, n).astype(np.float64)
    age[rng.random(n) < 0.05] = np.nan
    cols = make_cols(n, 13, arms=arms, numeric={"x": x, "age": age})
    for r in audit.covariate_balance(cols):
        if r.covariate == "x":
            ref = stats.ks_2samp(x[arms == r.arm_a], x[arms == r.arm_b]).statistic
            assert r.statistic == pytest.approx(ref, abs=1e-12), r
    # within windows too (one sort of window | rank | arm keys per grouping): integer ages tie heavily
    week = np.array([f"week:{d.isocalendar()[0]}-W{d.isocalendar()[1]:02d}" for d in map(utc_date, cols.timestamps)])
    checked = 0
    for r in audit.balance_over_windows(cols, windows=("week",), by_categorical=("device",)):
        if r.covariate in ("age", "x"):
            values = cols.numeric[r.covariate]
            if r.window.startswith("week:"):
                in_window = week == r.window
            else:
                in_window = cols.categorical["device"].codes == DEVICES.index(r.window.split(":", 1)[1])
            a = values[in_window & (arms == r.arm_a) & ~np.isnan(values)]
            b = values[in_window & (arms == r.arm_b) & ~np.isnan(values)]
            assert (r.n_a, r.n_b) == (a.size, b.size)
            assert r.statistic == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12), r
            checked += 1
    assert checked >= 30


def test_balance_windows_skip_small_windows_and_respect_min_n() -> None:
    cols = make_cols(3_000, 14, days=60)  # ~25 units per arm and day
    results = audit.balance_over_windows(cols, min_n=40)
    assert results and all(r.n_a >= 40 and r.n_b >= 40 for r in results)
    assert not any(r.window.startswith("day:") for r in results)
    assert any(r.window.startswith("week:") for r in results)
    assert audit.balance_over_windows(cols, by_categorical=("scanner",), windows=()) == []
    with pytest.raises(ValueError, match="min_n"):
        audit.covariate_balance(cols, min_n=0)
    with pytest.raises(ValueError, match="alpha"):
        audit.covariate_balance(cols, alpha=1.5)


def test_familywise_balance() -> None:
    cols = make_cols(10_000, 15)
    results = audit.covariate_balance(cols) + audit.balance_over_windows(cols)
    adjusted = audit.familywise_balance(results, 0.01)
    assert len(adjusted) == len(results) and not any(r.imbalanced for r in adjusted)


# ---------------------------------------------------------------------------------------------------- full audit


def test_full_audit_of_a_sound_experiment() -> None:
    cols = make_cols(60_000, 16)
    rng = np.random.default_rng(16)
    other = {"exp-b": np.where(rng.random(len(cols)) < 0.5, -1, rng.integers(0, 2, len(cols)))}
    report = audit.full_audit(cols, [0.5, 0.5], other_arms=other)
    assert not report.alert and report.reasons == () and report.exposures == 60_000
    assert report.srm.reason == "ok" and not report.uniformity.alert
    names = [t.name for t in report.clustering]
    assert names[:3] == ["id_sequential", "id_prefix", "id_suffix"]
    assert "carry_over:exp-b" in names and "arm_share:day" in names and "arm_share:device" in names
    windows = {r.window.split(":")[0] for r in report.balance}
    assert windows == {"all", "day", "week", "season", "device"}
    assert report.balance[0].window == "all"
    windowed = [r for r in report.balance if r.window != "all"]
    assert report.balance_alpha == pytest.approx(0.01 / len(windowed))
    assert report.seconds > 0


def test_full_audit_alerts_on_broken_randomisation() -> None:
    rng = np.random.default_rng(17)
    n = 60_000
    arms = (rng.random(n) < 0.53).astype(int)  # SRM
    cols = make_cols(n, 17, arms=arms)
    report = audit.full_audit(cols, [0.5, 0.5])
    assert report.alert and report.srm.alert and report.reasons[0].startswith("srm:")
    lesion = rng.normal(10, 2, n) + 0.4 * arms
    report = audit.full_audit(make_cols(n, 17, numeric={"lesion_mm": lesion}, arms=(rng.random(n) < 0.5)), [1, 1])
    assert not report.alert  # lesion independent of these arms
    shifted = make_cols(n, 17, numeric={"lesion_mm": lesion}, arms=arms)
    flagged = [b for b in audit.full_audit(shifted, [0.47, 0.53]).balance if b.imbalanced]
    assert any(b.covariate == "lesion_mm" and b.window == "all" for b in flagged)
    with pytest.raises(ValueError, match="out of range"):
        audit.full_audit(cols, [1.0])


# ---------------------------------------------------------------------------------------------------- correction


def test_bin_weights_on_a_small_example() -> None:
    arms = np.array([0, 0, 0, 1, 1, 1, 1, 2, 1])
    strata = np.array([0, 0, 1, 0, 1, 1, 1, 0, 7])  # bin 7: treatment only
    w = correction.bin_weights(arms, strata)
    # control shares: bin 0 2/3, bin 1 1/3; treatment: bin 0 1/5, bin 1 3/5, bin 7 1/5
    expected = [1, 1, 1, (2 / 3) / (1 / 5), (1 / 3) / (3 / 5), (1 / 3) / (3 / 5), (1 / 3) / (3 / 5), 1, 1]
    assert w == pytest.approx(expected)
    assert correction.bin_weights(arms, strata - 100)[3] == pytest.approx(10 / 3)  # any integer codes
    with pytest.raises(ValueError, match="strata"):
        correction.bin_weights(arms, strata[:3])
    with pytest.raises(ValueError, match="different arms"):
        correction.bin_weights(arms, strata, control=1, treatment=1)


def test_bin_weights_remove_a_known_bias() -> None:
    rng = np.random.default_rng(18)
    n = 60_000
    arms = rng.integers(0, 2, n)
    high = rng.random(n) < np.where(arms == 1, 0.7, 0.3)  # treatment over-samples the high-value bin
    true_effect = 0.5
    y = 1.0 + 2.0 * high + true_effect * arms + rng.normal(0, 1, n)
    raw = correction.weighted_effect(y, arms, np.ones(n))
    assert raw == pytest.approx(true_effect + 0.8, abs=0.05)  # biased by 2 * (0.7 - 0.3)
    w = correction.bin_weights(arms, high.astype(int))
    assert correction.weighted_effect(y, arms, w) == pytest.approx(true_effect, abs=0.04)


def test_strata_codes() -> None:
    rng = np.random.default_rng(19)
    n = 5_000
    x = rng.normal(size=n)
    x[:100] = np.nan
    cols = make_cols(n, 19, numeric={"x": x})
    codes = correction.strata_codes(cols, ["x"], bins=4)
    assert len(np.unique(codes)) == 5  # 4 quantile bins + NaN
    assert len(np.unique(codes[:100])) == 1 and codes[100:].max() < codes[0]
    counts = np.bincount(codes[100:])
    assert counts.min() > 0.2 * (n - 100) and counts.max() < 0.3 * (n - 100)
    both = correction.strata_codes(cols, ["x", "device"], bins=4)
    assert len(np.unique(both)) == 5 * (len(DEVICES) + 1)  # device missing (-1) is its own bin
    assert np.array_equal(correction.strata_codes(cols, []), np.zeros(n))
    with pytest.raises(ValueError, match="'scanner' is not a covariate"):
        correction.strata_codes(cols, ["scanner"])


def test_ipw_recovers_the_true_mean_under_unequal_propensities() -> None:
    rng = np.random.default_rng(20)
    n = 80_000
    high = rng.random(n) < 0.5
    p_treat = np.where(high, 0.8, 0.2)  # known, unequal propensities
    arms = (rng.random(n) < p_treat).astype(int)
    y0 = 1.0 + 3.0 * high + rng.normal(0, 1, n)
    y = y0 + 0.5 * arms
    propensity = np.where(arms == 1, p_treat, 1 - p_treat)  # of the arm each unit landed in
    w = correction.ipw_weights(propensity)
    treated = arms == 1
    true_mean = 1.0 + 3.0 * 0.5 + 0.5
    assert np.average(y[treated], weights=w[treated]) == pytest.approx(true_mean, abs=0.05)
    assert y[treated].mean() == pytest.approx(true_mean + 0.9, abs=0.05)  # unweighted: biased
    assert correction.weighted_effect(y, arms, w) == pytest.approx(0.5, abs=0.05)
    assert correction.weighted_effect(y, arms, np.ones(n)) > 1.5


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_ipw_rejects_propensities_outside_0_1(bad: float) -> None:
    with pytest.raises(ValueError, match=r"propensity: every value must be in \(0, 1\] and not NaN.*propensity\[2\]"):
        correction.ipw_weights(np.array([0.5, 1.0, bad, 0.2]))


def test_weighted_effect_rejects_bad_input() -> None:
    y, arms, w = np.array([1.0, 2.0, np.nan, 4.0]), np.array([0, 1, 1, 0]), np.ones(4)
    assert correction.weighted_effect(y, arms, w) == pytest.approx(2.0 - 2.5)  # NaN left out
    with pytest.raises(ValueError, match="must align"):
        correction.weighted_effect(y[:3], arms, w)
    with pytest.raises(ValueError, match="finite and >= 0"):
        correction.weighted_effect(y, arms, -w)
    with pytest.raises(ValueError, match="treatment arm 2"):
        correction.weighted_effect(y, arms, w, treatment=2)


def test_covered_uniformity_accepts_partial_coverage_and_catches_impossible_values() -> None:
    from services.abrouter.audit import bucket_uniformity, covered_uniformity

    rng = np.random.default_rng(12)
    ranges = [(0.0, 0.185), (0.5, 0.685)]  # coverage 0.37 of a 50/50 experiment
    values = rng.integers(0, 10_000, 400_000) / 10_000
    covered = values[((values >= 0.0) & (values < 0.185)) | ((values >= 0.5) & (values < 0.685))]
    assert bucket_uniformity(covered).alert  # the plain test cries wolf on a correct partial-coverage log
    ok = covered_uniformity(covered, ranges, 10_000)
    assert not ok.alert and ok.dof > 10
    clustered = np.concatenate([covered, np.full(3000, 0.1)])
    assert covered_uniformity(clustered, ranges, 10_000).alert
    impossible = np.concatenate([covered, [0.3]])
    bad = covered_uniformity(impossible, ranges, 10_000)
    assert bad.alert and "outside every covered range" in bad.detail


def test_per_value_windows_for_any_categorical_covariate_not_only_device() -> None:
    """An imbalance confined to one site (a covariate not named "device") is seen in its own window."""
    rng = np.random.default_rng(21)
    n = 40_000
    x = rng.normal(size=n)
    sites = ("berlin", "lyon", "oslo", "porto")
    site = rng.integers(0, 4, n).astype(np.int32)
    # berlin (1/4 of units): treatment over-samples high x; elsewhere slightly the other way; overall balanced
    p_treat = 0.5 + np.where(site == 0, 0.15, -0.05) * np.sign(x)
    arms = (rng.random(n) < p_treat).astype(int)
    cols = replace(make_cols(n, 21, arms=arms, numeric={"x": x}), categorical={"site": CategoricalColumn(site, sites)})
    assert not {r.covariate: r for r in audit.covariate_balance(cols)}["x"].imbalanced
    windowed = {r.window: r for r in audit.balance_over_windows(cols, windows=()) if r.covariate == "x"}
    assert set(windowed) == {f"site:{s}" for s in sites}
    assert windowed["site:berlin"].imbalanced and windowed["site:berlin"].effect_size > 0.2
    report = audit.full_audit(cols, [0.5, 0.5])
    assert any("site:berlin" in reason for reason in report.reasons)
    assert "arm_share:site" in {t.name for t in report.clustering}


def test_an_id_like_categorical_gets_windows_only_when_named() -> None:
    n = 3000
    visitors = tuple(f"v{i}" for i in range(audit.MAX_WINDOW_VALUES + 1))
    codes = (np.arange(n) % len(visitors)).astype(np.int32)
    cols = replace(make_cols(n, 22), categorical={"visitor": CategoricalColumn(codes, visitors)})
    arms = cols.arms.astype(np.intp)
    _, prepared, notes = audit._prepare(cols, arms, 2, (), None, None)
    assert prepared == [] and notes == [f"visitor: {len(visitors)} values, more than 1000: no windows by it"]
    _, prepared, notes = audit._prepare(cols, arms, 2, (), ("visitor",), None)
    assert [p.kind for p in prepared] == ["visitor"] and notes == []
