"""Gradients as the shard receives them: one array, or the segments of a streamed push (views of its chunks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from native import aggregate as _agg  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Segments:
    """A flat float32 gradient received in chunks, kept as views of the chunks' bytes (not assembled).

    The optimizer steps each segment on the matching slice of the parameter, so a streamed push is never
    copied into one buffer when it is applied alone; :meth:`assemble` makes the one buffer when it must be.
    """

    parts: tuple[tuple[int, np.ndarray], ...]  # (element offset, float32 values), in order, covering size
    size: int

    @property
    def shape(self) -> tuple[int]:
        """As a flat array's shape."""
        return (self.size,)

    def assemble(self) -> np.ndarray:
        """The gradient as one float32 array (one copy)."""
        out = np.empty(self.size, dtype=np.float32)
        for lo, values in self.parts:
            out[lo : lo + values.size] = values
        return out


Gradient = np.ndarray | Segments


def nonfinite(g: Gradient) -> int:
    """NaN/Inf elements of a gradient (fused native pass over each segment)."""
    if isinstance(g, Segments):
        return sum(_agg.count_nonfinite(values) for _, values in g.parts)
    return int(_agg.count_nonfinite(g))


def contiguous(g: Gradient) -> np.ndarray:
    """A gradient as one array (assembled if it arrived in segments)."""
    return g.assemble() if isinstance(g, Segments) else g
