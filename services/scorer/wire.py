"""Score's feature map as the request carried it: names decoded only when asked.

The Score handler's request deserializer (``server.py``) splits the request's bytes with the native kernel
(``native/features.pyx``): the other fields parse as protobuf, the ``features`` entries stay as one blob of
UTF-8 keys with their end offsets and a float64 array of values, in wire order. :class:`WireFeatures` is that
map as a ``Mapping[str, float]`` (protobuf's rules: the last entry of a repeated key wins) for any code that
reads it by name; :meth:`~services.scorer.scorer.Scorer._parse` instead compares :attr:`WireFeatures.layout`
with the model's own (:func:`layout_of`) and takes the values as they are. No gRPC here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise

import numpy as np

from native import features as _kernel

#: The names of a map in wire order as (UTF-8 keys one after the other, their int64 end offsets as bytes):
#: equal layouts name the same features in the same order.
Layout = tuple[bytes, bytes]


def layout_of(names: Sequence[str]) -> Layout:
    """The layout a map naming ``names`` in this order has on the wire."""
    encoded = [name.encode() for name in names]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.empty(0, np.int64)
    return b"".join(encoded), ends.tobytes()


def names_of(layout: Layout) -> tuple[str, ...]:
    """The feature names of a layout, in wire order (repeated names kept)."""
    keys, ends_bytes = layout
    ends = np.frombuffer(ends_bytes, np.int64).tolist()
    return tuple(keys[a:b].decode() for a, b in pairwise([0, *ends]))


class WireFeatures(Mapping[str, float]):
    """A request's feature map in wire order: ``key_blob`` (the UTF-8 names one after the other), ``key_ends``
    (int64, each name's end offset in ``key_blob``) and ``entry_values`` (float64, one per entry). As a mapping:
    the last entry of a repeated name wins, iteration in the order names first came."""

    __slots__ = ("_by_name", "_layout", "entry_values", "key_blob", "key_ends")

    def __init__(self, key_blob: bytes, key_ends: np.ndarray, entry_values: np.ndarray) -> None:
        self.key_blob = key_blob
        self.key_ends = key_ends
        self.entry_values = entry_values
        self._layout: Layout | None = None
        self._by_name: dict[str, float] | None = None

    @property
    def layout(self) -> Layout:
        """The map's names in wire order (see :data:`Layout`)."""
        if self._layout is None:
            self._layout = (self.key_blob, self.key_ends.tobytes())
        return self._layout

    def _mapping(self) -> dict[str, float]:
        if self._by_name is None:
            self._by_name = dict(zip(names_of(self.layout), self.entry_values.tolist(), strict=True))
        return self._by_name

    def __getitem__(self, name: str) -> float:
        return self._mapping()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())

    def __repr__(self) -> str:
        return f"WireFeatures({self._mapping()!r})"


def split_features(raw: bytes) -> tuple[bytes, WireFeatures] | None:
    """A serialised ScoreRequest as (its bytes without ``features``, the feature map); None where protobuf must
    parse the whole request (malformed bytes, a key that is not UTF-8, an entry with fields besides key and
    value: see ``native/features.pyx``)."""
    split = _kernel.split_score_request(raw)
    if split is None:
        return None
    rest, keys, ends, values = split
    return rest, WireFeatures(keys, ends, values)
