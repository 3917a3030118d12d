"""Type stub of the Cython module ``native/abhash.pyx`` (GrowthBook-compatible hashing)."""

import numpy as np

PARALLEL_THRESHOLD: int

def fnv1a32(s: str) -> int:
    """FNV-1a 32-bit of ``s`` over its UTF-16 code units."""

def gbhash(seed: str, value: str, version: int) -> float | None:
    """GrowthBook's ``gbhash``: the unit's hash value in [0, 1); None for an unknown version."""

def hash_value(seed: str, value: str, version: int) -> float:
    """Like ``gbhash`` for a validated version (ValueError otherwise)."""

def assign_many(
    seed: str,
    values: list[str],
    version: int,
    starts: np.ndarray,
    ends: np.ndarray,
    namespace: str | None = None,
    ns_start: float = 0.0,
    ns_end: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Arms (int16, -1: none) and hash values of every id."""
