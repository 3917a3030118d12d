"""Columnar, in-memory view of an experiment's exposures: what audits and analysis read.

The exposure log is durable in SQLite; audits of a million exposures must run in well under a second, so
the router also keeps each experiment's *first* exposure per unit as growable numpy columns (appended as
exposures are logged, rebuilt from SQLite on start). Categorical covariates are stored as int32 codes into
a per-column vocabulary so that contingency tables are a ``bincount`` away.

With ``abrouter.exposures_in_memory = false`` the router keeps no per-unit columns: :class:`ExposureCounts` holds
the exposed units per arm as counters and the first exposures of the units seen most recently in a bounded
:class:`LruCache` (the store answers for the others); audits and analysis then read the exposure table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")

#: Code of a missing categorical value.
MISSING_CODE = -1


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical covariate: ``codes[i]`` indexes ``vocabulary`` (-1: missing)."""

    codes: np.ndarray
    vocabulary: tuple[str, ...]

    def labels(self) -> np.ndarray:
        """Codes turned back into strings ("" where missing)."""
        vocab = np.array([*self.vocabulary, ""], dtype=object)
        return vocab[self.codes]  # -1 picks the trailing ""


@dataclass(frozen=True)
class ExposureColumns:
    """One row per exposed unit (its first exposure), aligned across every column.

    ``arms`` are arm indices (0 is control); ``buckets`` GrowthBook's hash value in [0, 1); ``timestamps``
    unix seconds; ``propensity`` the probability the unit had of landing in its arm when it was assigned;
    numeric covariates are float64 with NaN for missing.
    """

    unit_ids: np.ndarray
    arms: np.ndarray
    buckets: np.ndarray
    timestamps: np.ndarray
    propensity: np.ndarray
    numeric: Mapping[str, np.ndarray] = field(default_factory=dict)
    categorical: Mapping[str, CategoricalColumn] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.arms.shape[0])

    def take(self, index: np.ndarray) -> ExposureColumns:
        """Rows selected by a boolean mask or an index array."""
        return ExposureColumns(
            unit_ids=self.unit_ids[index],
            arms=self.arms[index],
            buckets=self.buckets[index],
            timestamps=self.timestamps[index],
            propensity=self.propensity[index],
            numeric={k: v[index] for k, v in self.numeric.items()},
            categorical={k: CategoricalColumn(v.codes[index], v.vocabulary) for k, v in self.categorical.items()},
        )


class GrowableArray:
    """A 1-d numpy array with amortised O(1) append."""

    def __init__(self, dtype: type | np.dtype, fill: object = 0) -> None:
        self._data = np.full(1024, fill, dtype=dtype)
        self._fill = fill
        self.size = 0

    def reserve(self, size: int) -> None:
        """Make room for ``size`` elements."""
        if size > self._data.shape[0]:
            grown = np.full(max(size, 2 * self._data.shape[0]), self._fill, dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown

    def append(self, value: object) -> None:
        """Append one element."""
        self.reserve(self.size + 1)
        self._data[self.size] = value
        self.size += 1

    def set(self, index: int, value: object) -> None:
        """Overwrite one element."""
        self._data[index] = value

    def view(self) -> np.ndarray:
        """The elements so far (a view: copy before the array grows again)."""
        return self._data[: self.size]


class ExposureTable:
    """First exposure per unit of one experiment, as growable columns, plus the propensity of every exposure
    (a unit seen again after a bandit moved the weights was seen with another propensity). Not thread-safe: the
    router locks.
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._arm_counts: dict[int, int] = {}
        #: Every exposure, first or not: the unit's row and the propensity it was served with.
        self._exposure_rows = GrowableArray(np.int64)
        self._exposure_propensity = GrowableArray(np.float64)
        self._units: list[str] = []
        self._arms = GrowableArray(np.int16)
        self._buckets = GrowableArray(np.float64)
        self._timestamps = GrowableArray(np.float64)
        self._propensity = GrowableArray(np.float64)
        self._versions = GrowableArray(np.int64)
        self._numeric: dict[str, GrowableArray] = {}
        self._categorical: dict[str, tuple[GrowableArray, dict[str, int]]] = {}

    def __len__(self) -> int:
        return len(self._units)

    def __contains__(self, unit: str) -> bool:
        return unit in self._index

    def arm_of(self, unit: str) -> int | None:
        """Arm index of the unit's first exposure, or None if it was never exposed."""
        row = self._index.get(unit)
        return None if row is None else int(self._arms.view()[row])

    def first_exposure_at(self, unit: str) -> float | None:
        """Unix time of the unit's first exposure, or None."""
        row = self._index.get(unit)
        return None if row is None else float(self._timestamps.view()[row])

    def add(
        self,
        unit: str,
        arm: int,
        bucket: float,
        timestamp: float,
        propensity: float,
        numeric: Mapping[str, float],
        categorical: Mapping[str, str],
        config_version: int = 0,
    ) -> bool:
        """Record the unit's exposure; False if it was exposed before (only its propensity is kept then)."""
        known = self._index.get(unit)
        if known is not None:
            self._exposure_rows.append(known)
            self._exposure_propensity.append(propensity)
            return False
        row = len(self._units)
        self._exposure_rows.append(row)
        self._exposure_propensity.append(propensity)
        self._arm_counts[arm] = self._arm_counts.get(arm, 0) + 1
        self._index[unit] = row
        self._units.append(unit)
        self._arms.append(arm)
        self._buckets.append(bucket)
        self._timestamps.append(timestamp)
        self._propensity.append(propensity)
        self._versions.append(config_version)
        for name, value in numeric.items():
            column = self._numeric.get(name)
            if column is None:
                column = self._numeric[name] = GrowableArray(np.float64, np.nan)
            column.reserve(row + 1)
            column.size = row + 1
            column.set(row, value)
        for name, label in categorical.items():
            entry = self._categorical.get(name)
            if entry is None:
                entry = self._categorical[name] = (GrowableArray(np.int32, MISSING_CODE), {})
            codes, vocab = entry
            code = vocab.setdefault(label, len(vocab))
            codes.reserve(row + 1)
            codes.size = row + 1
            codes.set(row, code)
        return True

    def arm_counts(self, n_arms: int) -> list[int]:
        """Exposed units per arm (kept as units are added, no pass over the table)."""
        return [self._arm_counts.get(a, 0) for a in range(n_arms)]

    def exposure_propensities(self) -> tuple[np.ndarray, np.ndarray]:
        """Every exposure in log order: (the unit's row, the propensity it was served with); copies."""
        return self._exposure_rows.view().copy(), self._exposure_propensity.view().copy()

    def config_versions(self) -> np.ndarray:
        """Config version each unit was first exposed under (a copy)."""
        return self._versions.view().copy()

    def unit_rows(self, units: np.ndarray | list[str]) -> np.ndarray:
        """Row of each unit (-1 where never exposed)."""
        index = self._index
        return np.fromiter((index.get(u, -1) for u in units), dtype=np.int64, count=len(units))

    def columns(self) -> ExposureColumns:
        """A snapshot (copies) of every column, each padded to the number of units."""
        n = len(self._units)

        def padded(column: GrowableArray) -> np.ndarray:
            column.reserve(n)
            return column._data[:n].copy()

        return ExposureColumns(
            unit_ids=np.array(self._units, dtype=object),
            arms=self._arms.view().copy(),
            buckets=self._buckets.view().copy(),
            timestamps=self._timestamps.view().copy(),
            propensity=self._propensity.view().copy(),
            numeric={name: padded(col) for name, col in self._numeric.items()},
            categorical={
                name: CategoricalColumn(padded(codes), tuple(vocab))
                for name, (codes, vocab) in self._categorical.items()
            },
        )


class LruCache(Generic[V]):
    """Values of the units seen most recently, at most ``capacity`` (least recently used evicted); a unit
    :meth:`pin`-ned (a write about it in flight) is not evicted until unpinned. Not thread-safe: the router locks.

    The store keeps every value; once this cache has evicted one (:attr:`evicted`), a unit it does not hold
    may be in the store."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: OrderedDict[str, V] = OrderedDict()
        self._pins: dict[str, int] = {}
        #: Whether some unit's value was dropped from memory (a miss may then be in the store).
        self.evicted = False

    def get(self, unit: str) -> V | None:
        """The unit's value, marking it recently used; None if not held."""
        value = self._values.get(unit)
        if value is not None:
            self._values.move_to_end(unit)
        return value

    def __setitem__(self, unit: str, value: V) -> None:
        self._values[unit] = value
        self._values.move_to_end(unit)
        self.shrink()

    def shrink(self) -> None:
        """Evict the least recently used unpinned units down to ``capacity`` (after unpins: pinned units may
        have held the cache above it)."""
        skipped = 0  # pinned units go back to the recent end; if all are pinned the cache waits for unpins
        while len(self._values) > self.capacity and skipped < len(self._values):
            oldest, held = self._values.popitem(last=False)
            if oldest in self._pins:
                self._values[oldest] = held
                skipped += 1
            else:
                self.evicted = True

    def setdefault(self, unit: str, value: V) -> V:
        """The unit's value, recording ``value`` if it had none."""
        held = self.get(unit)
        if held is None:
            self[unit] = held = value
        return held

    def pin(self, unit: str) -> None:
        """Keep ``unit`` (held or about to be) until as many :meth:`unpin` calls."""
        self._pins[unit] = self._pins.get(unit, 0) + 1

    def unpin(self, unit: str) -> None:
        """Undo one :meth:`pin`."""
        left = self._pins[unit] - 1
        if left:
            self._pins[unit] = left
        else:
            del self._pins[unit]

    def __contains__(self, unit: object) -> bool:
        return unit in self._values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, unit: str) -> V:
        return self._values[unit]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def keys(self) -> KeysView[str]:
        """The units held (``dict(cache)`` copies the values held)."""
        return self._values.keys()

    def as_dict(self) -> dict[str, V]:
        """A copy of the values held."""
        return dict(self._values)


class ExposureCounts:
    """An experiment's exposed units without per-unit columns (``abrouter.exposures_in_memory = false``): units
    per arm (the arm of each unit's first exposure) as counters, and (arm, time) of the first exposure of the
    units seen most recently. A unit is counted once, when its first exposure is taken in: the router's own after
    its commit (:attr:`pending` holds it meanwhile, so a concurrent exposure of the unit is not counted again), or
    another replica's from the tail. Not thread-safe: the router locks."""

    def __init__(self, capacity: int, arm_counts: Mapping[int, int] | None = None) -> None:
        self._arm_counts: dict[int, int] = dict(arm_counts or {})
        #: Units counted (their first exposure taken in), most recent first: unit -> (arm, unix time).
        self.first: LruCache[tuple[int, float]] = LruCache(capacity)
        #: Units whose first exposure is this router's, commit in flight: unit -> requests waiting on it.
        self.pending: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(self._arm_counts.values())

    def arm_counts(self, n_arms: int) -> list[int]:
        """Exposed units per arm."""
        return [self._arm_counts.get(a, 0) for a in range(n_arms)]

    def count(self, unit: str, arm: int, at: float) -> None:
        """Count ``unit``'s first exposure (in ``arm`` at ``at``)."""
        self._arm_counts[arm] = self._arm_counts.get(arm, 0) + 1
        self.first[unit] = (arm, at)
