"""Tensors on the wire: raw little-endian bytes with dtype and shape, read into numpy without copies."""

from __future__ import annotations

import numpy as np

from guardmesh.errors import InvalidArgument
from guardmesh.v1 import common_pb2

#: Wire dtypes a parameter tensor may have. Masters are kept in float32 whatever the wire dtype.
WIRE_DTYPES: dict[int, np.dtype] = {
    common_pb2.D_TYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.D_TYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.D_TYPE_BFLOAT16: np.dtype("<u2"),  # upper half of a float32, converted by hand
}
MAX_ELEMENTS = 1 << 34


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits with round-to-nearest-even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def check_shape(field: str, dtype: int, shape: list[int] | tuple[int, ...], nbytes: int) -> int:
    """Validate dtype, shape and byte length; return the element count."""
    if dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"{field}.dtype", "must be float32, float16 or bfloat16")
    for i, d in enumerate(shape):
        if d < 0:
            raise InvalidArgument(f"{field}.shape[{i}]", f"dimensions must be >= 0 (got {d})")
    # Multiplied one dimension at a time and stopped at the limit: a hostile shape of thousands of huge
    # dimensions must cost nothing (its full product has thousands of digits).
    count = 0 if 0 in shape else 1
    if count:
        for d in shape:
            count *= d
            if count > MAX_ELEMENTS:
                raise InvalidArgument(
                    f"{field}.shape", f"at most {MAX_ELEMENTS} elements (a shape of {len(shape)} dimensions exceeds it)"
                )
    expected = count * WIRE_DTYPES[dtype].itemsize
    if nbytes != expected:
        raise InvalidArgument(f"{field}.data", f"must be prod(shape) * itemsize = {expected} bytes (got {nbytes})")
    return count


def to_float32(field: str, tensor: common_pb2.Tensor) -> np.ndarray:
    """A flat float32 view of a wire tensor (no copy for float32; one conversion otherwise)."""
    check_shape(field, tensor.dtype, tuple(tensor.shape), len(tensor.data))
    return decode(tensor.dtype, tensor.data)


def decode(dtype: int, data: bytes | bytearray | memoryview) -> np.ndarray:
    """Flat float32 array from raw bytes of a wire dtype (zero-copy for 4-byte aligned float32)."""
    raw = np.frombuffer(data, dtype=WIRE_DTYPES[dtype])
    if dtype == common_pb2.D_TYPE_FLOAT32:
        # Writers framing with guardmesh.wire align data (Tensor.padding); other writers may not.
        return raw if raw.ctypes.data % 4 == 0 else raw.copy()
    if dtype == common_pb2.D_TYPE_FLOAT16:
        return raw.astype(np.float32)
    return bf16_to_f32(raw)


def wire_array(dtype: int, values: np.ndarray) -> np.ndarray:
    """A float32 array in a wire dtype: ``values`` itself when it is contiguous little-endian float32."""
    if dtype == common_pb2.D_TYPE_FLOAT32:
        return np.ascontiguousarray(values, dtype="<f4")
    if dtype == common_pb2.D_TYPE_FLOAT16:
        return values.astype("<f2")
    return f32_to_bf16(values)


def encode(dtype: int, values: np.ndarray) -> bytes:
    """Raw bytes of a float32 array in a wire dtype."""
    return wire_array(dtype, values).tobytes()
