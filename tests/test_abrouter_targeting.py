"""GrowthBook parity of targeting and weights: known-answer vectors from GrowthBook's shared ``cases.json``
(tests/data/growthbook_cases.json names its source), and the same semantics over real gRPC."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from growthbook.core import evalCondition

from guardmesh.errors import InvalidArgument
from native import abhash
from services.abrouter.experiments import ArmSpec, Experiment, ExperimentSpec, ExperimentState, bucket_ranges
from services.abrouter.targeting import eval_condition

from .test_abrouter import (
    Stub,
    assign_one,
    code_of,
    create,
    serve_router,
)

CASES = json.loads((Path(__file__).parent / "data" / "growthbook_cases.json").read_text(encoding="utf-8"))


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Stub]:
    yield from serve_router(tmp_path)


@pytest.mark.parametrize(("name", "condition", "attributes", "expected"), CASES["evalCondition"], ids=lambda v: "")
def test_eval_condition_matches_growthbooks_cases(
    name: str, condition: dict[str, Any], attributes: dict[str, Any], expected: bool
) -> None:
    assert eval_condition(attributes, condition) is expected, name


def test_the_python_package_differs_where_the_reference_converts() -> None:
    """Why the router does not call ``growthbook.core.evalCondition``: these reference cases fail there."""
    differing = {
        name
        for name, condition, attributes, expected in CASES["evalCondition"]
        if evalCondition(attributes, condition) is not expected
    }
    assert {"missing attribute with comparison operators", "comparing numbers and strings"} <= differing


@pytest.mark.parametrize(
    ("condition", "attributes", "expected"),
    [
        ({"age": {"$lt": 18}}, {}, True),  # missing is null, null < 18
        ({"age": {"$gt": 18}}, {}, False),
        ({"age": {"$gte": 0}}, {"age": None}, True),
        ({"age": {"$lt": 18}}, {"age": "abc"}, False),  # NaN compares false
        ({"age": {"$lte": 18}}, {"age": " 18 "}, True),  # white space trimmed, as Number(" 18 ")
        ({"age": {"$gt": 1}}, {"age": "0x10"}, True),  # Number("0x10") = 16
        ({"age": {"$gt": 1}}, {"age": "1_000"}, False),  # not a JS number (Python's float() would take it)
        ({"age": {"$gt": 1}}, {"age": [5]}, True),  # [5] -> "5" -> 5
        ({"flag": {"$lt": 1}}, {"flag": False}, True),  # false -> 0
        ({"n": 8}, {"n": "8"}, True),  # bare number: value * 1 === 8
        ({"n": "8"}, {"n": 8.0}, True),  # bare string: String(8) === "8"
        ({"n": {"$eq": 8}}, {"n": "8"}, False),  # $eq is ===
        ({"on": True}, {"on": "yes"}, True),  # bare boolean: !!"yes"
        ({"on": False}, {}, False),  # value !== null fails first
        ({"name": {"$regex": "^nu"}}, {}, True),  # String(null) = "null"
        ({"tags": {"$elemMatch": {"$lt": 1}}}, {"tags": [0, 5]}, False),  # 0 is falsy: skipped
        ({"n": {"$in": [float("nan")]}}, {"n": float("nan")}, True),  # includes: SameValueZero
        ({"g": {"$inGroup": "beta"}}, {"g": 1}, False),
        ({"g": {"$notInGroup": "beta"}}, {"g": 1}, True),
        ({"w": {"$gt": "B"}}, {"w": "a"}, True),  # strings by code unit
    ],
)
def test_javascript_conversions(condition: dict[str, Any], attributes: dict[str, Any], expected: bool) -> None:
    assert eval_condition(attributes, condition) is expected


@pytest.mark.parametrize(("name", "args", "expected"), CASES["getBucketRange"], ids=lambda v: "")
def test_bucket_ranges_match_growthbooks_cases(name: str, args: list[Any], expected: list[list[float]]) -> None:
    n, coverage, weights = args
    weights = weights if weights is not None else [1.0 / n] * n
    arms = tuple(ArmSpec(f"a{i}", w) for i, w in enumerate(weights))
    spec = ExperimentSpec(key="k", arms=arms, coverage=min(max(coverage, 0.0), 1.0))
    total = math.fsum(weights)
    if not 0.99 <= total <= 1.01:  # GrowthBook falls back to equal weights; the router refuses the spec
        with pytest.raises(InvalidArgument) as info:
            spec.validate()
        assert info.value.field == "spec.arms.weight"
        return
    spec.validate()
    got = bucket_ranges(spec.weights, coverage)
    assert len(got) == len(expected), name
    for (start, end), (want_start, want_end) in zip(got, expected, strict=True):
        assert start == pytest.approx(want_start, abs=1e-9) and end == pytest.approx(want_end, abs=1e-9), name


def test_propensities_are_the_normalised_covered_shares() -> None:
    spec = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.4), ArmSpec("b", 0.5999)))
    exp = Experiment(spec, 1, ExperimentState.RUNNING, spec.weights, 0.0, 0.0)
    assert exp.propensities() == pytest.approx((0.4 / 0.9999, 0.5999 / 0.9999))
    over = ExperimentSpec(key="k", arms=(ArmSpec("a", 0.5), ArmSpec("b", 0.51)))
    exp = Experiment(over, 1, ExperimentState.RUNNING, over.weights, 0.0, 0.0)
    assert exp.propensities() == pytest.approx((0.5, 0.5))  # the last range is cut at 1, as GrowthBook's


def _attrs(**values: Any) -> dict[str, Any]:
    attributes = struct_pb2.Struct()
    attributes.update(values)
    return {"attributes": attributes}


def test_targeting_over_grpc_enrols_what_growthbook_enrols(router: Stub) -> None:
    create(router, "kids", condition_json=json.dumps({"age": {"$lt": 18}}))
    create(router, "mid", condition_json=json.dumps({"n": {"$gt": "5", "$lt": "10"}}))
    missing = assign_one(router, "kids", "u1", log=False)
    assert missing.in_experiment and missing.reason == "assigned"  # GrowthBook enrols a missing age
    adult = assign_one(router, "kids", "u2", log=False, **_attrs(age=30))
    assert not adult.in_experiment and adult.reason == "not_targeted"
    assert assign_one(router, "mid", "u3", log=False, **_attrs(n=8)).in_experiment
    assert not assign_one(router, "mid", "u4", log=False, **_attrs(n=11)).in_experiment


def test_weights_within_the_slack_keep_growthbooks_ranges_over_grpc(router: Stub) -> None:
    exp = create(router, "slack", (0.4, 0.5999))
    assert list(exp.weights) == [0.4, 0.5999]
    uncovered = next(f"u{i}" for i in range(100_000) if abhash.hash_value("slack", f"u{i}", 2) >= 0.9999)
    a = assign_one(router, "slack", uncovered, log=False)
    assert not a.in_experiment and a.reason == "not_covered"  # as GrowthBook: [0.9999, 1) is in no range
    inside = assign_one(router, "slack", "u-in", log=False)
    assert inside.in_experiment
    assert inside.propensity == pytest.approx([0.4, 0.5999][inside.arm_index] / 0.9999)
    code, details = code_of(lambda: create(router, "off", (0.5, 0.48)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.arms.weight:")
