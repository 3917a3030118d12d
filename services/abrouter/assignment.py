"""Assignment: a pure function of the unit, the experiment and its config (GrowthBook's ``_run``).

No state is read except the optional sticky record, so every replica and every restart gives the same
arm. The order follows GrowthBook: the hash value of the experiment's hash attribute; a sticky bucket
skips targeting; namespace, targeting condition (GrowthBook's reference semantics, its JS SDK's
``evalCondition``: :mod:`services.abrouter.targeting`, so migrated conditions enrol the same units), the
holdout; then the bucket ``gbhash(seed or key, value, version)`` and the first bucket range that holds it.
Hashing is the Cython kernel in ``native/abhash.pyx``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardmesh.errors import InvalidArgument
from native import abhash
from services.abrouter.experiments import Experiment, ExperimentState
from services.abrouter.targeting import eval_condition

ID_LIMIT = 256
HOLDOUT_PREFIX = "__holdout__"


@dataclass(frozen=True)
class AssignmentResult:
    """The arm one unit got in one experiment (fields as in ``abrouter.proto``'s Assignment)."""

    experiment_key: str
    arm_index: int
    arm: str
    in_experiment: bool
    bucket: float
    hash_version: int
    config_version: int
    reason: str
    propensity: float
    hash_value: str


def hash_value_of(experiment: Experiment, unit_id: str, attributes: Mapping[str, Any]) -> str:
    """The string hashed for this unit: ``unit_id`` for hash attribute "id", else that attribute.

    Numbers are formatted as GrowthBook's JS SDK does (integral floats without ".0"). InvalidArgument when
    the value is missing, empty, too long or not a string/number.
    """
    attr = experiment.spec.hash_attribute
    value: Any = unit_id if attr == "id" and unit_id else attributes.get(attr)
    field = "unit_id" if attr == "id" else f"attributes.{attr}"
    if value is None or value == "":
        raise InvalidArgument(field, f"empty: experiment '{experiment.key}' hashes on '{attr}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidArgument(field, f"must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(field, "must be finite")
        value = str(int(value)) if value.is_integer() else repr(value)
    value = str(value)
    if len(value) > ID_LIMIT:
        raise InvalidArgument(field, f"at most {ID_LIMIT} characters, got {len(value)}")
    return value


def _out(experiment: Experiment, value: str, bucket: float, reason: str) -> AssignmentResult:
    return AssignmentResult(
        experiment_key=experiment.key,
        arm_index=-1,
        arm=experiment.spec.arms[0].name,
        in_experiment=False,
        bucket=bucket,
        hash_version=experiment.spec.hash_version,
        config_version=experiment.version,
        reason=reason,
        propensity=0.0,
        hash_value=value,
    )


def assign(
    experiment: Experiment,
    value: str,
    attributes: Mapping[str, Any],
    now: float,
    sticky_arm: int | None = None,
) -> AssignmentResult:
    """Assign the unit whose hash value is ``value`` (see :func:`hash_value_of`)."""
    spec = experiment.spec
    bucket = abhash.hash_value(spec.hash_seed, value, spec.hash_version)
    if experiment.state is ExperimentState.ROLLED_BACK:
        return _out(experiment, value, bucket, "rolled_back")
    if experiment.state is ExperimentState.STOPPED or (spec.stop_at and now >= spec.stop_at):
        return _out(experiment, value, bucket, "stopped")
    if spec.start_at and now < spec.start_at:
        return _out(experiment, value, bucket, "not_started")
    if sticky_arm is not None and 0 <= sticky_arm < len(spec.arms):
        return AssignmentResult(
            experiment.key,
            sticky_arm,
            spec.arms[sticky_arm].name,
            True,
            bucket,
            spec.hash_version,
            experiment.version,
            "sticky",
            experiment.propensities()[sticky_arm],
            value,
        )
    if spec.namespace is not None:
        ns = abhash.hash_value("__" + spec.namespace.name, value, 1)
        if not spec.namespace.start <= ns < spec.namespace.end:
            return _out(experiment, value, bucket, "not_in_namespace")
    if spec.condition and not eval_condition(attributes, spec.condition):
        return _out(experiment, value, bucket, "not_targeted")
    holdout = spec.holdout
    if holdout is not None and abhash.hash_value(HOLDOUT_PREFIX + holdout.name, value, 2) < holdout.share:
        return _out(experiment, value, bucket, "held_out")
    for index, (start, end) in enumerate(experiment.ranges()):
        if start <= bucket < end:
            return AssignmentResult(
                experiment.key,
                index,
                spec.arms[index].name,
                True,
                bucket,
                spec.hash_version,
                experiment.version,
                "assigned",
                experiment.propensities()[index],
                value,
            )
    return _out(experiment, value, bucket, "not_covered")


def assign_batch(
    experiment: Experiment, values: Sequence[str], now: float, sticky: Mapping[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Arms (int16, -1 = not in the experiment) and buckets of many units, without targeting conditions.

    Same answers as :func:`assign` for units without attributes-based targeting; the caller refuses
    experiments with a condition. ``sticky`` maps hash values to recorded arms.
    """
    spec = experiment.spec
    values = list(values)
    for i, v in enumerate(values):
        if not isinstance(v, str) or not 1 <= len(v) <= ID_LIMIT:
            raise InvalidArgument(f"unit_ids[{i}]", f"must be 1 to {ID_LIMIT} characters")
    ranges = experiment.ranges()
    starts = np.array([r[0] for r in ranges], dtype=np.float64)
    ends = np.array([r[1] for r in ranges], dtype=np.float64)
    ns = spec.namespace
    arms, buckets = abhash.assign_many(
        spec.hash_seed,
        values,
        spec.hash_version,
        starts,
        ends,
        ns.name if ns else None,
        ns.start if ns else 0.0,
        ns.end if ns else 1.0,
    )
    closed = (
        experiment.state is not ExperimentState.RUNNING
        or (spec.stop_at and now >= spec.stop_at)
        or (spec.start_at and now < spec.start_at)
    )
    if closed:
        arms[:] = -1
        return arms, buckets
    if spec.holdout is not None and spec.holdout.share > 0:
        held, _ = abhash.assign_many(
            HOLDOUT_PREFIX + spec.holdout.name, values, 2, np.array([0.0]), np.array([spec.holdout.share])
        )
        arms[held == 0] = -1
    if sticky:
        for i, v in enumerate(values):
            arm = sticky.get(v)
            if arm is not None:
                arms[i] = arm
    return arms, buckets
