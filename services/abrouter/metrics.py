"""What a metric's value per unit is, declared with the metric, and its per-arm statistics kept incrementally.

One definition serves the guardrails and the analysis, so a guardrail never averages something else than what
AnalyzeExperiment reports (the observed case: conversions recorded only when they happen, 30 % in control and
10 % in treatment; a guardrail that averaged only the units with an observation saw 1.0 against 1.0):

* ``EVENT`` (count / sum, the default): a unit's value is the **sum** of its observations, and an exposed unit
  with none counts **0** (conversions, purchases, revenue, errors). The analysis's ``aggregate="sum"``.
* ``CONTINUOUS``: a unit's value is the **mean** of its observations, and a unit with none is **left out** (a
  mean of nothing is no value: latency, rating, session length). The analysis's ``aggregate="mean"``.

:class:`ArmStatistics` keeps, per arm, the moments (count, sum, sum of squares; :class:`guardmesh.stats.Moments`)
of the per-unit values as observations arrive: O(1) per observation (each unit's running sum and count, and its
arm's moments), never a pass over the whole exposure table. A unit's value changing from ``v`` to ``v'`` moves
its arm's sum by ``v' - v`` and sum of squares by ``v'^2 - v^2``; silent exposed units of an ``EVENT`` metric add
to the count only (their value 0 adds nothing to the sums). The same three numbers per arm are what a database
computes with ``COUNT/SUM/SUM(x*x)``, so the statistic moves to a store unchanged.

With ``abrouter.exposures_in_memory = false`` the per-unit running sums live in a bounded cache
(:class:`CachedArmStatistics`), the store being the truth for a unit the cache does not hold, and a restart
reads the per-arm moments from the store's ``GROUP BY``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum

from guardmesh.stats import Moments
from services.abrouter.columns import LruCache


class MetricKind(StrEnum):
    """How a metric's observations become one value per exposed unit (see the module docstring)."""

    EVENT = "event"
    CONTINUOUS = "continuous"

    @property
    def aggregate(self) -> str:
        """The analysis's name of the same definition: "sum" (EVENT) or "mean" (CONTINUOUS)."""
        return "sum" if self is MetricKind.EVENT else "mean"


@dataclass
class ArmStatistics:
    """Per-unit values of one metric of one experiment, summarised per arm and updated per observation."""

    kind: MetricKind
    n_arms: int
    #: Per unit (its exposure row in memory): running sum and number of the unit's observations.
    unit_sum: dict[Hashable, float] = field(default_factory=dict)
    unit_count: dict[Hashable, int] = field(default_factory=dict)
    #: Per arm: moments of the values of the units that have at least one observation.
    observed: list[Moments] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.observed:
            self.observed = [Moments() for _ in range(self.n_arms)]

    def _value(self, total: float, count: int) -> float:
        return total if self.kind is MetricKind.EVENT else total / count

    def unit_total(self, unit: Hashable) -> tuple[float, int]:
        """The unit's running (sum, number) of observations taken in so far."""
        return self.unit_sum.get(unit, 0.0), self.unit_count.get(unit, 0)

    def _set_unit_total(self, unit: Hashable, total: float, count: int) -> None:
        self.unit_sum[unit], self.unit_count[unit] = total, count

    def observe(self, unit: Hashable, arm: int, value: float) -> None:
        """One observation ``value`` of ``unit`` (its exposure row in memory, or its id; in arm ``arm``)."""
        total, count = self.unit_total(unit)
        new_total, new_count = total + value, count + 1
        new_value = self._value(new_total, new_count)
        if count == 0:
            self.observed[arm] = self.observed[arm].add(new_value)
        else:
            self.observed[arm] = self.observed[arm].replace_value(self._value(total, count), new_value)
        self._set_unit_total(unit, new_total, new_count)

    def moments(self, arm: int, exposed: int) -> Moments:
        """Moments of the arm's per-unit values; ``exposed`` = units exposed in the arm (EVENT counts them all)."""
        seen = self.observed[arm]
        if self.kind is MetricKind.EVENT:
            return Moments(max(exposed, seen.count), seen.total, seen.total_sq)
        return seen


@dataclass
class CachedArmStatistics(ArmStatistics):
    """:class:`ArmStatistics` whose per-unit running sums are held for the units seen most recently only
    (``abrouter.exposures_in_memory = false``): memory does not grow with the units. The caller puts a unit's
    totals from the store into :attr:`units` (:meth:`hold`) before observing a unit the cache does not hold, and
    pins a unit while an observation of it is in flight, so the moments stay exact."""

    units: LruCache[tuple[float, int]] = field(default_factory=lambda: LruCache(1))

    def unit_total(self, unit: Hashable) -> tuple[float, int]:
        """The unit's running (sum, number) as held; (0, 0) if not held (:meth:`hold` it first)."""
        held = self.units.get(str(unit))
        return held if held is not None else (0.0, 0)

    def _set_unit_total(self, unit: Hashable, total: float, count: int) -> None:
        self.units[str(unit)] = (total, count)

    def hold(self, unit: str, total: float, count: int) -> None:
        """Hold the unit's running (sum, number) as the store has it (already in the per-arm moments)."""
        self.units[unit] = (total, count)
