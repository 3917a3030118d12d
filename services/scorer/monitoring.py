"""Model monitoring: rolling precision/recall/F1 from ground-truth feedback, the F1 rollback trigger, and
the missing-value alert (once per episode)."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from guardmesh.errors import InvalidArgument


@dataclass
class RollingF1:
    """Precision, recall and F1 over the last ``window`` labelled decisions of one model version."""

    window: int = 1000
    outcomes: deque[tuple[bool, bool]] = field(default_factory=deque)

    def add(self, predicted: bool, actual: bool) -> None:
        """Record one labelled decision."""
        self.outcomes.append((predicted, actual))
        while len(self.outcomes) > self.window:
            self.outcomes.popleft()

    def metrics(self) -> tuple[float, float, float, int]:
        """(precision, recall, F1, labelled count); 0 where undefined."""
        tp = sum(1 for p, a in self.outcomes if p and a)
        fp = sum(1 for p, a in self.outcomes if p and not a)
        fn = sum(1 for p, a in self.outcomes if not p and a)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1, len(self.outcomes)


@dataclass
class VersionHealth:
    """Feedback state of one version: the F1 baseline (first full window, or configured) and the rolling F1."""

    rolling: RollingF1
    baseline_f1: float | None = None
    min_labels: int = 200

    def observe(self, predicted: bool, actual: bool) -> None:
        """Record one label; fix the baseline once ``min_labels`` have arrived (if not configured)."""
        self.rolling.add(predicted, actual)
        if self.baseline_f1 is None and len(self.rolling.outcomes) >= self.min_labels:
            self.baseline_f1 = self.rolling.metrics()[2]

    def degraded(self, max_relative_drop: float) -> tuple[bool, float]:
        """(F1 dropped by at least ``max_relative_drop`` of its baseline, relative drop)."""
        _, _, f1, n = self.rolling.metrics()
        if self.baseline_f1 is None or self.baseline_f1 <= 0 or n < self.min_labels:
            return False, 0.0
        drop = (self.baseline_f1 - f1) / self.baseline_f1
        return drop >= max_relative_drop, drop


class DecisionLog:
    """The last decisions by request id, so feedback can find what was predicted and by which version."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[str, bool]] = OrderedDict()

    def record(self, request_id: str, version: str, predicted: bool) -> None:
        """Remember one model decision."""
        self.entries[request_id] = (version, predicted)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def pop(self, request_id: str) -> tuple[str, bool] | None:
        """The decision of ``request_id`` (once)."""
        return self.entries.pop(request_id, None)


class CleaningPolicy(Enum):
    """What happens to a request with a missing feature, per version (a model cannot score a missing value).

    Applies to every request with a missing feature, whether or not the feature's missing rate is alerting.
    """

    IMPUTE = "impute"  # use the reference median and flag the request
    REJECT = "reject"  # refuse the request (INVALID_ARGUMENT naming the feature)


#: An episode ends when the feature's missing rate falls below this share of the alert rate.
CLEAR_FRACTION = 0.5
#: No episode starts before the window holds this many rows (one missing value in 20 rows is 5 %).
MIN_ROWS = 100


@dataclass
class MissingMonitor:
    """Per-feature missing rate over the live window, alerting once per episode (hysteresis).

    An episode of a feature starts when its missing rate over the window rises above ``alert_rate``
    (default 2 %) with at least ``min_rows`` rows in the window, and ends only when the rate falls below
    ``clear_rate`` (default ``CLEAR_FRACTION`` x ``alert_rate``, 1 %). A rate hovering around the alert level
    therefore gives one alert, not one per crossing; a feature alerts again only after it recovered.
    Cleaning is not the monitor's: the scorer applies each version's own policy to every request with a
    missing value, whether or not the feature is alerting.
    """

    features: tuple[str, ...]
    alert_rate: float = 0.02
    window: int = 1000
    clear_rate: float | None = None
    min_rows: int = MIN_ROWS
    recent: deque[np.ndarray] = field(default_factory=deque)
    alerted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alert_rate <= 1.0:
            raise InvalidArgument("missing.alert_rate", "must be in [0, 1]")
        if self.clear_rate is None:
            self.clear_rate = CLEAR_FRACTION * self.alert_rate
        self._clear_rate: float = self.clear_rate
        if not 0.0 <= self.clear_rate <= self.alert_rate:
            raise InvalidArgument("missing.clear_rate", "must be in [0, alert_rate]")
        if self.min_rows < 1:
            raise InvalidArgument("missing.min_rows", "must be >= 1")
        self.counts = np.zeros(len(self.features), dtype=np.int64)
        self._index = {f: i for i, f in enumerate(self.features)}

    def observe(self, missing: np.ndarray) -> list[str]:
        """Record one batch's missing mask (rows x features); return the features whose episode starts now.

        Running counts make this O(features) per batch, whatever the window: the batch's rows are counted in
        one sum, the rows sliding out in another (a batch is a gathered group of requests, once per group).
        """
        if len(missing):
            self.recent.extend(missing)
            self.counts += missing.sum(axis=0, dtype=np.int64)
            extra = len(self.recent) - self.window
            if extra > 0:
                self.counts -= np.sum([self.recent.popleft() for _ in range(extra)], axis=0, dtype=np.int64)
        rates = self.rates()
        fresh: list[str] = []
        if len(self.recent) >= self.min_rows:
            fresh = [f for i in np.flatnonzero(rates > self.alert_rate) if (f := self.features[i]) not in self.alerted]
        recovered = {f for f in self.alerted if rates[self._index[f]] < self._clear_rate}
        self.alerted = (self.alerted - recovered) | set(fresh)
        return fresh

    def rates(self) -> np.ndarray:
        """Missing rate per feature over the window."""
        if not self.recent:
            return np.zeros(len(self.features))
        return self.counts / len(self.recent)
