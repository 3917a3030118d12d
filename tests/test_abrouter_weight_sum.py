"""The weight-sum rule is GrowthBook's to the last bit: a spec is accepted exactly when the growthbook SDK would
bucket on its weights rather than fall back to equal weights (near-limit sets where the rounding of a
left-to-right sum and of an exact sum disagree)."""

from __future__ import annotations

import math
import random

import pytest
from growthbook.core import getBucketRanges, getEqualWeights

from guardmesh.errors import InvalidArgument
from services.abrouter.experiments import ArmSpec, ExperimentSpec


def _near_limit_sets() -> list[list[float]]:
    """Hundredths summing to 0.99 or 1.01 on paper, half whose float sum lands on each side of the limit."""
    rng = random.Random(1)
    inside: list[list[float]] = []
    outside: list[list[float]] = []
    while len(inside) < 40 or len(outside) < 40:
        n = rng.randint(2, 5)
        hundredths = rng.choice([99, 101])
        cuts = sorted(rng.sample(range(1, hundredths), n - 1))
        w = [(b - a) / 100 for a, b in zip([0, *cuts], [*cuts, hundredths], strict=True)]
        # an exactly rounded sum says 0.99/1.01 (inside) for all of these; GrowthBook's may not
        assert 0.99 <= math.fsum(w) <= 1.01
        honoured = getBucketRanges(len(w), 1.0, w) != getBucketRanges(len(w), 1.0, getEqualWeights(len(w)))
        (inside if honoured else outside).append(w)
    return [[0.7, 0.2, 0.09], [0.09, 0.2, 0.7], *inside[:40], *outside[:40]]


@pytest.mark.parametrize("weights", _near_limit_sets(), ids=str)
def test_a_spec_is_accepted_exactly_when_growthbook_honours_its_weights(weights: list[float]) -> None:
    spec = ExperimentSpec(key="k", arms=tuple(ArmSpec(f"arm{i}", w) for i, w in enumerate(weights)))
    honoured = getBucketRanges(len(weights), 1.0, weights) != getBucketRanges(
        len(weights), 1.0, getEqualWeights(len(weights))
    )
    if honoured:
        spec.validate()
    else:
        with pytest.raises(InvalidArgument, match="weights must sum to 1"):
            spec.validate()


def test_the_reviewers_case_is_refused_as_growthbook_ignores_it() -> None:
    # 0.7 + 0.2 + 0.09 is 0.9899999999999999 added left to right: GrowthBook buckets on equal weights
    assert getBucketRanges(3, 1.0, [0.7, 0.2, 0.09]) == getBucketRanges(3, 1.0, getEqualWeights(3))
    with pytest.raises(InvalidArgument, match=r"spec\.arms\.weight"):
        ExperimentSpec(key="k", arms=(ArmSpec("a", 0.7), ArmSpec("b", 0.2), ArmSpec("c", 0.09))).validate()
