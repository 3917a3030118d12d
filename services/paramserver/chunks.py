"""Streamed tensors as they arrive in chunks: the header's element counts, in-order chunks collected
without a copy, and one buffer per tensor (or the chunks themselves, for float32 in whole elements)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from guardmesh.errors import InvalidArgument, ResourceExhausted
from guardmesh.tensors import MAX_ELEMENTS, WIRE_DTYPES
from services.paramserver.gradients import Segments


def header_elements(field: str, dtype: int, shape: tuple[int, ...]) -> int:
    """Element count of a tensor announced in a stream header (its data follows in chunks).

    The rules of :func:`guardmesh.tensors.check_shape` without the byte length: a wire dtype, dimensions
    >= 0 and at most ``MAX_ELEMENTS`` elements (exact integers: no int64 wrap-around).
    """
    if dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"{field}.dtype", "must be float32, float16 or bfloat16")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"dimensions must be >= 0 (got {len(shape)} dimensions)")
    if 0 in shape:
        return 0
    count = 1
    for d in shape:  # stops as soon as the bound is passed: a product of thousands of huge dimensions is slow
        count *= d
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"{field}.shape", f"at most {MAX_ELEMENTS} elements ({len(shape)} dimensions)")
    return count


def collect_chunks(sizes: list[int], chunks: Iterator[Any]) -> list[list[tuple[int, memoryview]]]:
    """In-order chunks of each tensor as (byte offset, bytes) without copying them; INVALID_ARGUMENT for gaps,
    overflow or anything but chunks after the header. ``sizes`` are the tensors' byte lengths."""
    parts: list[list[tuple[int, memoryview]]] = [[] for _ in sizes]
    filled = [0] * len(sizes)
    for c in chunks:
        if c is None:
            raise InvalidArgument("chunk", "only chunks may follow the header")
        if not 0 <= c.tensor < len(sizes):
            raise InvalidArgument("chunk.tensor", f"must index the header's {len(sizes)} tensors")
        if c.offset != filled[c.tensor]:
            raise InvalidArgument("chunk.offset", f"expected {filled[c.tensor]} (chunks arrive in order)")
        data = memoryview(c.data)
        end = c.offset + data.nbytes
        if end > sizes[c.tensor]:
            raise InvalidArgument("chunk.data", "overflows the tensor's byte length")
        if data.nbytes:
            parts[c.tensor].append((c.offset, data))
        filled[c.tensor] = end
    for i, n in enumerate(sizes):
        if filled[i] != n:
            raise InvalidArgument(f"header.tensors[{i}]", f"received {filled[i]} of {n} bytes")
    return parts


def assemble(field: str, size: int, parts: list[tuple[int, memoryview]]) -> np.ndarray:
    """One buffer of ``size`` bytes from validated chunks (:func:`collect_chunks`): their one copy."""
    try:
        out = np.empty(size, dtype=np.uint8)
    except (MemoryError, ValueError):
        raise ResourceExhausted(f"{field}: {size} bytes cannot be allocated on this shard") from None
    for offset, data in parts:
        out[offset : offset + data.nbytes] = np.frombuffer(data, dtype=np.uint8)
    return out


def assemble_chunks(sizes: list[int], chunks: Iterator[Any]) -> list[np.ndarray]:
    """Fill one buffer per tensor from in-order chunks; INVALID_ARGUMENT for gaps, overflow or extras."""
    parts = collect_chunks(sizes, chunks)
    return [assemble(f"header.tensors[{i}]", n, p) for i, (n, p) in enumerate(zip(sizes, parts, strict=True))]


def chunked_float32(parts: list[tuple[int, memoryview]], count: int) -> Segments | None:
    """A float32 gradient as views of its chunks, when every chunk holds whole, 4-byte aligned elements
    (the SDK's chunks do); None when it must be assembled."""
    views = []
    for offset, data in parts:
        if offset % 4 or data.nbytes % 4:
            return None
        values = np.frombuffer(data, dtype="<f4")
        if values.ctypes.data % 4:
            return None
        views.append((offset // 4, values))
    return Segments(tuple(views), count)
