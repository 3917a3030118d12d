"""Experiments as the router stores them: the spec an operator writes, its validation, and its state.

A spec is validated once, when it is written (create or update); a spec that breaks a rule is refused with
the field and the rule, and the stored experiment is unchanged. Bucket ranges follow GrowthBook's
``getBucketRanges``: arm ``i`` covers ``[c_i, c_i + coverage * w_i)`` where ``c_i`` is the cumulative
weight before it, so lowering coverage shrinks ranges from their ends and keeps their starts (units that
stay covered keep their arm).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum, StrEnum
from typing import Any

from guardmesh.errors import InvalidArgument
from services.abrouter.bandit import RewardKind
from services.abrouter.guardrails import Guardrail
from services.abrouter.metrics import MetricKind

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
NAME_LIMIT = 64
#: Weights must sum to one within GrowthBook's slack (its SDK accepts sums in 0.99..1.01 and silently falls back
#: to equal weights outside; the router refuses instead, so what is configured is what runs). Bucket ranges use
#: the weights as configured, as GrowthBook's ``getBucketRanges`` does (a unit lands in the arm GrowthBook gives
#: it); the propensities are normalised to sum to 1 (``Experiment.propensities``).
WEIGHT_SUM_RANGE = (0.99, 1.01)


class ExperimentState(StrEnum):
    """Lifecycle of an experiment."""

    RUNNING = "running"
    STOPPED = "stopped"
    ROLLED_BACK = "rolled_back"


class AllocationMode(StrEnum):
    """How arm weights are set."""

    FIXED = "fixed"
    BANDIT = "bandit"


@dataclass(frozen=True)
class ArmSpec:
    """One arm; the first of an experiment is its control."""

    name: str
    weight: float
    model_version: str = ""


@dataclass(frozen=True)
class NamespaceSpec:
    """GrowthBook namespace range ``[start, end)``."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class HoldoutSpec:
    """Units whose holdout hash is below ``share`` are kept out."""

    name: str
    share: float


@dataclass(frozen=True)
class BanditSpec:
    """Thompson-sampling settings."""

    reward_metric: str
    kind: RewardKind
    update_interval_s: float = 60.0
    min_weight: float = 0.01
    min_rewards: int = 20


@dataclass(frozen=True)
class ShadowSpec:
    """Mirror ``fraction`` of Route requests to scorer model ``version``."""

    version: str = ""
    fraction: float = 0.0


@dataclass(frozen=True)
class ExperimentSpec:
    """What an operator writes (see ``abrouter.proto`` for every field's rule)."""

    key: str
    arms: tuple[ArmSpec, ...]
    seed: str = ""
    coverage: float = 1.0
    hash_attribute: str = "id"
    hash_version: int = 2
    condition: dict[str, Any] | None = None
    namespace: NamespaceSpec | None = None
    holdout: HoldoutSpec | None = None
    sticky_bucketing: bool = False
    metrics: tuple[str, ...] = ()
    #: Declared kind of a metric (what its value per unit is); a metric not listed is an EVENT metric.
    metric_kinds: dict[str, MetricKind] = field(default_factory=dict)
    guardrails: tuple[Guardrail, ...] = ()
    mode: AllocationMode = AllocationMode.FIXED
    bandit: BanditSpec | None = None
    model: str = ""
    shadow: ShadowSpec = field(default_factory=ShadowSpec)
    start_at: float = 0.0
    stop_at: float = 0.0

    @property
    def hash_seed(self) -> str:
        """Seed hashed with the unit (GrowthBook: ``seed or key``)."""
        return self.seed or self.key

    @property
    def weights(self) -> tuple[float, ...]:
        """Configured weights, by arm."""
        return tuple(a.weight for a in self.arms)

    def kind_of(self, metric: str) -> MetricKind:
        """The declared kind of ``metric`` (EVENT unless declared otherwise)."""
        return self.metric_kinds.get(metric, MetricKind.EVENT)

    def arm_index(self, name: str) -> int | None:
        """Index of the arm called ``name``."""
        for i, arm in enumerate(self.arms):
            if arm.name == name:
                return i
        return None

    def validate(self) -> None:
        """Raise InvalidArgument naming the first field that breaks its rule."""
        if not KEY_PATTERN.match(self.key):
            raise InvalidArgument("spec.key", "must be 1 to 128 characters of letters, digits, '_', '-', '.'")
        if len(self.arms) < 2:
            raise InvalidArgument("spec.arms", f"an experiment needs at least 2 arms, got {len(self.arms)}")
        names = set()
        for i, arm in enumerate(self.arms):
            if not 1 <= len(arm.name) <= NAME_LIMIT:
                raise InvalidArgument(f"spec.arms[{i}].name", f"must be 1 to {NAME_LIMIT} characters")
            if arm.name in names:
                raise InvalidArgument(f"spec.arms[{i}].name", f"duplicate arm name '{arm.name}'")
            names.add(arm.name)
            if not (math.isfinite(arm.weight) and 0 <= arm.weight <= 1):
                raise InvalidArgument(f"spec.arms[{i}].weight", f"must be in [0, 1], got {arm.weight}")
        # GrowthBook adds the weights left to right (the JS SDK's reduce, the Python SDK's sum() on 3.11) and
        # falls back to equal weights outside 0.99..1.01: the same float additions accept exactly what it honours.
        total = 0.0
        for weight in self.weights:
            total += weight
        if not WEIGHT_SUM_RANGE[0] <= total <= WEIGHT_SUM_RANGE[1]:
            raise InvalidArgument("spec.arms.weight", f"weights must sum to 1 (within 0.99..1.01), got {total:.9g}")
        if not (math.isfinite(self.coverage) and 0 <= self.coverage <= 1):
            raise InvalidArgument("spec.coverage", f"must be in [0, 1], got {self.coverage}")
        if not 1 <= len(self.hash_attribute) <= NAME_LIMIT:
            raise InvalidArgument("spec.hash_attribute", f"must be 1 to {NAME_LIMIT} characters")
        if self.hash_version not in (1, 2):
            raise InvalidArgument("spec.hash_version", f"must be 1 or 2 (0 means 2), got {self.hash_version}")
        if self.condition is not None and not isinstance(self.condition, dict):
            raise InvalidArgument("spec.condition_json", "must be a JSON object")
        if self.namespace is not None:
            ns = self.namespace
            if not 1 <= len(ns.name) <= NAME_LIMIT:
                raise InvalidArgument("spec.namespace.name", f"must be 1 to {NAME_LIMIT} characters")
            if not (0 <= ns.start < ns.end <= 1):
                raise InvalidArgument("spec.namespace", f"need 0 <= start < end <= 1, got [{ns.start}, {ns.end})")
        if self.holdout is not None:
            if not 1 <= len(self.holdout.name) <= NAME_LIMIT:
                raise InvalidArgument("spec.holdout.name", f"must be 1 to {NAME_LIMIT} characters")
            if not 0 <= self.holdout.share < 1:
                raise InvalidArgument("spec.holdout.share", f"must be in [0, 1), got {self.holdout.share}")
        metric_names = set()
        for i, metric in enumerate(self.metrics):
            if not 1 <= len(metric) <= NAME_LIMIT:
                raise InvalidArgument(f"spec.metrics[{i}]", f"must be 1 to {NAME_LIMIT} characters")
            if metric in metric_names:
                raise InvalidArgument(f"spec.metrics[{i}]", f"duplicate metric '{metric}'")
            metric_names.add(metric)
        for name, kind in self.metric_kinds.items():
            if name not in metric_names:
                raise InvalidArgument(f"spec.metric_kinds[{name}]", f"'{name}' is not in spec.metrics")
            if not isinstance(kind, MetricKind):
                raise InvalidArgument(
                    f"spec.metric_kinds[{name}]", "must be METRIC_KIND_EVENT or METRIC_KIND_CONTINUOUS"
                )
        for i, guardrail in enumerate(self.guardrails):
            if guardrail.metric not in metric_names:
                raise InvalidArgument(f"spec.guardrails[{i}].metric", f"'{guardrail.metric}' is not in spec.metrics")
            try:
                guardrail.validate()
            except ValueError as exc:
                raise InvalidArgument(f"spec.guardrails[{i}]", str(exc)) from None
        if self.mode is AllocationMode.BANDIT:
            self._validate_bandit(metric_names)
        if not (math.isfinite(self.shadow.fraction) and 0 <= self.shadow.fraction <= 1):
            raise InvalidArgument("spec.shadow.fraction", f"must be in [0, 1], got {self.shadow.fraction}")
        if self.shadow.version and not self.model:
            raise InvalidArgument("spec.shadow.version", "shadow traffic needs spec.model (the scorer model)")
        for name in ("start_at", "stop_at"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"spec.{name}", f"must be unix seconds >= 0, got {value}")
        if self.stop_at and self.stop_at <= self.start_at:
            raise InvalidArgument("spec.stop_at", "must be after spec.start_at")

    def _validate_bandit(self, metric_names: set[str]) -> None:
        bandit = self.bandit
        if bandit is None:
            raise InvalidArgument("spec.bandit", "required when spec.mode is ALLOCATION_MODE_BANDIT")
        if not self.sticky_bucketing:
            raise InvalidArgument(
                "spec.sticky_bucketing",
                "must be true for a bandit: its weights move, and exposed units must keep their arm",
            )
        if bandit.reward_metric not in metric_names:
            raise InvalidArgument("spec.bandit.reward_metric", f"'{bandit.reward_metric}' is not in spec.metrics")
        if not (math.isfinite(bandit.update_interval_s) and bandit.update_interval_s > 0):
            raise InvalidArgument("spec.bandit.update_interval_s", "must be > 0")
        if not 0 <= bandit.min_weight <= 1 / len(self.arms):
            raise InvalidArgument("spec.bandit.min_weight", f"must be in [0, 1/{len(self.arms)}]")
        if bandit.min_rewards < 0:
            raise InvalidArgument("spec.bandit.min_rewards", "must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in SQLite)."""
        return json.loads(json.dumps(asdict(self), default=lambda v: v.value if isinstance(v, Enum) else str(v)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentSpec:
        """Inverse of :meth:`to_dict`."""
        bandit = d.get("bandit")
        return cls(
            key=d["key"],
            arms=tuple(ArmSpec(**a) for a in d["arms"]),
            seed=d.get("seed", ""),
            coverage=d.get("coverage", 1.0),
            hash_attribute=d.get("hash_attribute", "id"),
            hash_version=d.get("hash_version", 2),
            condition=d.get("condition"),
            namespace=NamespaceSpec(**d["namespace"]) if d.get("namespace") else None,
            holdout=HoldoutSpec(**d["holdout"]) if d.get("holdout") else None,
            sticky_bucketing=d.get("sticky_bucketing", False),
            metrics=tuple(d.get("metrics", ())),
            metric_kinds={k: MetricKind(v) for k, v in d.get("metric_kinds", {}).items()},
            guardrails=tuple(Guardrail(**g) for g in d.get("guardrails", ())),
            mode=AllocationMode(d.get("mode", "fixed")),
            bandit=BanditSpec(**{**bandit, "kind": RewardKind(bandit["kind"])}) if bandit else None,
            model=d.get("model", ""),
            shadow=ShadowSpec(**d.get("shadow", {})),
            start_at=d.get("start_at", 0.0),
            stop_at=d.get("stop_at", 0.0),
        )


def bucket_ranges(weights: tuple[float, ...] | list[float], coverage: float) -> list[tuple[float, float]]:
    """GrowthBook's ``getBucketRanges`` for validated weights (same arithmetic, same floats)."""
    coverage = min(max(coverage, 0.0), 1.0)
    cumulative: float = 0
    ranges = []
    for w in weights:
        start = cumulative
        cumulative += w
        ranges.append((start, start + coverage * w))
    return ranges


@dataclass(frozen=True)
class Experiment:
    """A stored experiment: the spec, the weights in force and the lifecycle state."""

    spec: ExperimentSpec
    version: int
    state: ExperimentState
    weights: tuple[float, ...]
    created_at: float
    updated_at: float
    reason: str = ""

    @property
    def key(self) -> str:
        """Experiment key."""
        return self.spec.key

    def ranges(self) -> list[tuple[float, float]]:
        """Bucket ranges of the weights in force."""
        return bucket_ranges(self.weights, self.spec.coverage)

    def propensities(self) -> tuple[float, ...]:
        """Probability of each arm for a unit that is in the experiment: each bucket range's share of the
        covered part of [0, 1), so weights summing to 0.99..1.01 give probabilities summing to 1."""
        lengths = [max(0.0, min(end, 1.0) - start) for start, end in self.ranges()]
        total = math.fsum(lengths)
        if total <= 0:  # zero coverage: nobody is in, the configured split is the only answer
            total_w = math.fsum(self.weights)
            return tuple(w / total_w for w in self.weights)
        return tuple(length / total for length in lengths)

    def with_changes(self, **changes: Any) -> Experiment:
        """A copy with the version bumped and the given fields changed."""
        return replace(self, version=self.version + 1, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in SQLite)."""
        return {
            "spec": self.spec.to_dict(),
            "version": self.version,
            "state": self.state.value,
            "weights": list(self.weights),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        """Inverse of :meth:`to_dict`."""
        return cls(
            spec=ExperimentSpec.from_dict(d["spec"]),
            version=d["version"],
            state=ExperimentState(d["state"]),
            weights=tuple(d["weights"]),
            created_at=d["created_at"],
            updated_at=d["updated_at"],
            reason=d.get("reason", ""),
        )
