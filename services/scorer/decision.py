"""The decision path: rules before the model, then the score against a drift-aware threshold.

Every decision says which path it took (the rule, or the model version) and which threshold it used, so a
person investigating a wrong decision can replay it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from guardmesh.errors import InvalidArgument


class RuleAction(Enum):
    """What a matching rule decides."""

    BLOCK = "block"
    PASS = "pass"


@dataclass(frozen=True)
class Rule:
    """``feature`` above ``limit`` sends the request to the rule engine, which blocks or passes it."""

    name: str
    feature: str
    limit: float
    action: RuleAction

    def validate(self, features: tuple[str, ...], where: str) -> None:
        """Rules name known features and finite limits."""
        if not self.name:
            raise InvalidArgument(f"{where}.name", "must not be empty")
        if self.feature not in features:
            raise InvalidArgument(f"{where}.feature", f"{self.feature!r} is not a feature of the model")
        if not math.isfinite(self.limit):
            raise InvalidArgument(f"{where}.limit", "must be finite")


@dataclass(frozen=True)
class ThresholdPolicy:
    """threshold = base x (1 - k x drift_score), clamped to [lower, upper]."""

    base: float = 0.5
    k: float = 0.3
    lower: float = 0.05
    upper: float = 0.95

    def validate(self) -> None:
        """Each bound in [0, 1], lower <= base <= upper, k in [0, 1]."""
        for field, value in (("base", self.base), ("lower", self.lower), ("upper", self.upper), ("k", self.k)):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidArgument(f"threshold.{field}", f"must be in [0, 1] (got {value})")
        if not self.lower <= self.base <= self.upper:
            raise InvalidArgument("threshold.base", f"must lie in [lower, upper] = [{self.lower}, {self.upper}]")

    def threshold(self, drift_score: float) -> float:
        """The threshold in force at ``drift_score`` (in [0, 1])."""
        raw = self.base * (1.0 - self.k * min(max(drift_score, 0.0), 1.0))
        return min(max(raw, self.lower), self.upper)


@dataclass(frozen=True)
class Decision:
    """The outcome of one request."""

    score: float | None
    positive: bool
    threshold: float | None
    path: str
    drift_score: float


def decide(
    row: dict[str, float],
    rules: tuple[Rule, ...],
    score: float | None,
    model_path: str,
    policy: ThresholdPolicy,
    drift_score: float,
) -> Decision:
    """Apply the first matching rule; otherwise compare ``score`` with the drift-adjusted threshold.

    ``positive`` is the model's positive class (e.g. "block the payment", "show the item").
    """
    for rule in rules:
        value = row.get(rule.feature)
        if value is not None and not math.isnan(value) and value > rule.limit:
            return Decision(None, rule.action is RuleAction.BLOCK, None, f"rule:{rule.name}", drift_score)
    if score is None:
        raise InvalidArgument("score", "the model must score a request no rule decided")
    threshold = policy.threshold(drift_score)
    return Decision(score, score >= threshold, threshold, f"{model_path}@threshold={threshold:.4f}", drift_score)
