"""Type stub of the Cython module ``native/features.pyx`` (Score's feature map out of a request's bytes)."""

import numpy as np

LITTLE_ENDIAN: bool

def split_score_request(raw: bytes | bytearray | memoryview) -> tuple[bytes, bytes, np.ndarray, np.ndarray] | None:
    """``(rest, keys, ends, values)`` of a serialised ScoreRequest (the bytes without ``features``, the entries'
    UTF-8 keys as one blob, each key's int64 end offset in it, the float64 values, in wire order), or None where
    protobuf must parse the request itself."""
