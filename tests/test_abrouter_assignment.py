"""Assignment is GrowthBook's: the native hash and the router's choice are checked against the growthbook SDK.

The peer is the published ``growthbook`` Python SDK (its ``gbhash``/``fnv1a32`` and ``GrowthBook.run``), on
many random inputs including non-ASCII, astral-plane and lone-surrogate ids.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from growthbook import Experiment as GBExperiment
from growthbook import GrowthBook
from growthbook.core import fnv1a32 as gb_fnv1a32
from growthbook.core import gbhash as gb_gbhash
from growthbook.core import getBucketRanges
from hypothesis import given, settings
from hypothesis import strategies as st

from guardmesh.errors import InvalidArgument
from native import abhash
from services.abrouter.assignment import assign, assign_batch, hash_value_of
from services.abrouter.experiments import (
    ArmSpec,
    Experiment,
    ExperimentSpec,
    ExperimentState,
    HoldoutSpec,
    NamespaceSpec,
    bucket_ranges,
)

ALPHABETS = [
    string.ascii_letters + string.digits + "-_.:@",
    "äöüßéèçñ",  # Latin-1
    "日本語中文한국어ΩЖ",  # BMP beyond Latin-1
    "😀🎉𝄞🀄",  # astral: surrogate pairs in UTF-16
]


def random_id(rng: random.Random) -> str:
    n = rng.randint(0, 24)
    return "".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(n))


def make(spec: ExperimentSpec, weights: tuple[float, ...] | None = None) -> Experiment:
    spec.validate()
    return Experiment(spec, 1, ExperimentState.RUNNING, weights or spec.weights, 0.0, 0.0)


def random_weights(rng: random.Random, n: int) -> tuple[float, ...]:
    raw = [rng.random() + 0.05 for _ in range(n)]
    total = sum(raw)
    w = [x / total for x in raw]
    w[-1] = 1.0 - sum(w[:-1])  # exact sum 1 within float error
    return tuple(w)


def test_fnv1a32_and_gbhash_match_the_sdk_on_random_ids() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        value, seed = random_id(rng), random_id(rng)
        assert abhash.fnv1a32(value) == gb_fnv1a32(value), value
        for version in (1, 2):
            assert abhash.gbhash(seed, value, version) == gb_gbhash(seed, value, version), (seed, value, version)
    assert abhash.gbhash("s", "v", 3) is None


def test_lone_surrogates_hash_like_the_sdk() -> None:
    for value in ["a\ud800b", "\udfff", "x\ud83d"]:
        assert abhash.fnv1a32(value) == gb_fnv1a32(value)
        assert abhash.gbhash("seed", value, 2) == gb_gbhash("seed", value, 2)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=20), st.sampled_from([1, 2]))
def test_gbhash_matches_the_sdk_for_any_text(value: str, seed: str, version: int) -> None:
    assert abhash.gbhash(seed, value, version) == gb_gbhash(seed, value, version)


def test_bucket_ranges_are_growthbooks() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(2, 6)
        w = random_weights(rng, n)
        coverage = rng.random()
        assert bucket_ranges(w, coverage) == getBucketRanges(n, coverage, list(w))


def test_assignment_matches_growthbook_run_on_random_experiments() -> None:
    rng = random.Random(11)
    checked_in = checked_out = 0
    for e in range(60):
        n = rng.randint(2, 4)
        weights = random_weights(rng, n)
        coverage = rng.choice([1.0, rng.random()])
        version = rng.choice([1, 2])
        seed = rng.choice(["", random_id(rng)])
        ns = rng.choice([None, ("layer-" + str(e % 3), 0.2, 0.7)])
        spec = ExperimentSpec(
            key=f"exp-{e}",
            arms=tuple(ArmSpec(f"arm{i}", w) for i, w in enumerate(weights)),
            seed=seed,
            coverage=coverage,
            hash_version=version,
            namespace=NamespaceSpec(*ns) if ns else None,
        )
        exp = make(spec)
        gb_exp = GBExperiment(
            key=spec.key,
            variations=list(range(n)),
            weights=list(weights),
            coverage=coverage,
            hashVersion=version,
            seed=seed or None,
            namespace=ns,
        )
        for _ in range(150):
            uid = random_id(rng) or "x"
            ours = assign(exp, uid, {}, now=1.0)
            theirs = GrowthBook(attributes={"id": uid}).run(gb_exp)
            assert ours.in_experiment == theirs.inExperiment, (spec, uid, ours)
            if theirs.inExperiment:
                checked_in += 1
                assert ours.arm_index == theirs.variationId
                assert ours.bucket == theirs.bucket
            else:
                checked_out += 1
    assert checked_in > 3000 and checked_out > 500  # both outcomes were really compared


def test_targeting_condition_is_growthbooks() -> None:
    condition = {"country": {"$in": ["US", "CA"]}, "age": {"$gte": 18}}
    spec = ExperimentSpec(key="cond", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), condition=condition)
    exp = make(spec)
    gb_exp = GBExperiment(key="cond", variations=[0, 1], condition=condition, hashVersion=2)
    rng = random.Random(5)
    for i in range(500):
        attrs = {"id": f"u{i}", "country": rng.choice(["US", "CA", "FR"]), "age": rng.randint(10, 40)}
        ours = assign(exp, str(attrs["id"]), attrs, now=1.0)
        theirs = GrowthBook(attributes=attrs).run(gb_exp)
        assert ours.in_experiment == theirs.inExperiment
        assert ours.reason in ("assigned", "not_targeted")
        if theirs.inExperiment:
            assert ours.arm_index == theirs.variationId


def test_lowering_coverage_keeps_every_still_covered_unit_in_its_arm() -> None:
    arms = (ArmSpec("control", 0.5), ArmSpec("treatment", 0.5))
    full = make(ExperimentSpec(key="cov", arms=arms, coverage=1.0))
    half = make(ExperimentSpec(key="cov", arms=arms, coverage=0.4))
    moved = kept = 0
    for i in range(5000):
        a, b = assign(full, f"user-{i}", {}, 1.0), assign(half, f"user-{i}", {}, 1.0)
        assert a.bucket == b.bucket
        if b.in_experiment:
            kept += 1
            moved += a.arm_index != b.arm_index
    assert moved == 0 and 1500 < kept < 2500


def test_batch_equals_single_assignment_with_namespace_and_holdout() -> None:
    spec = ExperimentSpec(
        key="batch",
        arms=(ArmSpec("a", 0.2), ArmSpec("b", 0.3), ArmSpec("c", 0.5)),
        coverage=0.9,
        namespace=NamespaceSpec("ns", 0.1, 0.8),
        holdout=HoldoutSpec("global", 0.1),
    )
    exp = make(spec)
    ids = [f"user-{i}" for i in range(3000)] + ["ü日本😀", "a\ud800"]
    arms, buckets = assign_batch(exp, ids, 1.0)
    reasons = set()
    for i, uid in enumerate(ids):
        one = assign(exp, uid, {}, 1.0)
        reasons.add(one.reason)
        assert arms[i] == one.arm_index, uid
        assert buckets[i] == one.bucket
    assert {"assigned", "not_in_namespace", "held_out", "not_covered"} <= reasons


def test_batch_is_parallel_above_the_threshold_and_identical() -> None:
    exp = make(ExperimentSpec(key="big", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5))))
    ids = [f"u{i}" for i in range(abhash.PARALLEL_THRESHOLD * 3)]
    arms, buckets = assign_batch(exp, ids, 1.0)
    expected = np.array([gb_gbhash("big", u, 2) for u in ids])
    assert np.array_equal(buckets, expected)
    assert np.array_equal(arms, (expected >= 0.5).astype(np.int16))


def test_hash_attribute_and_bad_ids() -> None:
    spec = ExperimentSpec(key="dev", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.5)), hash_attribute="device_id")
    exp = make(spec)
    assert hash_value_of(exp, "user-1", {"device_id": "d-9"}) == "d-9"
    assert hash_value_of(exp, "", {"device_id": 42.0}) == "42"
    with pytest.raises(InvalidArgument, match=r"attributes\.device_id: empty"):
        hash_value_of(exp, "user-1", {})
    with pytest.raises(InvalidArgument, match="must be a string or a number"):
        hash_value_of(exp, "", {"device_id": {"nested": 1}})
    by_id = make(ExperimentSpec(key="uid", arms=spec.arms))
    with pytest.raises(InvalidArgument, match="unit_id: empty"):
        hash_value_of(by_id, "", {})
    with pytest.raises(InvalidArgument, match=r"unit_ids\[1\]"):
        assign_batch(by_id, ["ok", ""], 1.0)
    with pytest.raises(TypeError, match=r"values\[0\]"):
        abhash.assign_many("s", [3], 2, np.array([0.0]), np.array([1.0]))  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"arms": (ArmSpec("a", 0.5), ArmSpec("b", 0.6))}, "weights must sum to 1"),
        ({"arms": (ArmSpec("a", 1.0),)}, "at least 2 arms"),
        ({"arms": (ArmSpec("a", 0.5), ArmSpec("a", 0.5))}, "duplicate arm name"),
        ({"key": "bad key!"}, "spec.key"),
        ({"coverage": 1.5}, "spec.coverage"),
        ({"hash_version": 3}, "spec.hash_version"),
        ({"namespace": NamespaceSpec("n", 0.6, 0.4)}, "spec.namespace"),
        ({"holdout": HoldoutSpec("h", 1.0)}, "spec.holdout.share"),
        ({"arms": (ArmSpec("a", float("nan")), ArmSpec("b", 0.5))}, r"spec.arms\[0\].weight"),
    ],
)
def test_bad_specs_name_the_field_and_rule(change: dict, field: str) -> None:
    base = {"key": "k", "arms": (ArmSpec("a", 0.5), ArmSpec("b", 0.5))}
    with pytest.raises(InvalidArgument, match=field):
        ExperimentSpec(**{**base, **change}).validate()
