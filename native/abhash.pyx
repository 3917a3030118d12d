# cython: language_level=3
"""GrowthBook-compatible hashing and arm choice for the abrouter: the assignment hot loop.

GrowthBook's published algorithm (its ``core.py``, checked against its SDK in the tests):

* ``fnv1a32(s)``: FNV-1a 32-bit over the UTF-16 code units of ``s`` (the JS SDK's ``charCodeAt`` loop;
  the Python SDK encodes UTF-16 too), so a character outside the BMP feeds its two surrogates;
* hash version 1: ``(fnv1a32(value + seed) % 1000) / 1000``;
* hash version 2: ``(fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000``;
* namespaces: version 1 of ``("__" + namespace, value)``;
* the arm is the first bucket range ``[start, end)`` holding the hash value, or -1.

FNV-1a is a streaming hash, so ``seed + value`` is never built: the state after the first part is fed the
second. ``assign_many`` first reads every id's UTF-16 source (kind, data pointer, length) with the GIL,
then hashes and chooses arms with the GIL released, split across cores with ``prange``; the list holds
the strings alive meanwhile.
"""

from cython.parallel cimport prange
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc

import numpy as np

cimport numpy as cnp

cnp.import_array()

cdef extern from "Python.h":
    int PyUnicode_READY(object o) except -1
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)

cdef uint32_t FNV_OFFSET = 0x811C9DC5
cdef uint32_t FNV_PRIME = 0x01000193

#: Ids at or above this count are hashed on several threads.
PARALLEL_THRESHOLD = 4096


cdef inline uint32_t _feed_unit(uint32_t h, uint32_t unit) noexcept nogil:
    return (h ^ unit) * FNV_PRIME


cdef inline uint32_t _feed_point(uint32_t h, uint32_t cp) noexcept nogil:
    # A code point above the BMP is two UTF-16 code units (a surrogate pair).
    if cp < 0x10000:
        return _feed_unit(h, cp)
    cp -= 0x10000
    h = _feed_unit(h, 0xD800 + (cp >> 10))
    return _feed_unit(h, 0xDC00 + (cp & 0x3FF))


cdef inline uint32_t _feed_raw(uint32_t h, int kind, const void* data, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if kind == 1:
        for i in range(n):
            h = _feed_unit(h, (<const uint8_t*>data)[i])
    elif kind == 2:
        for i in range(n):
            h = _feed_unit(h, (<const uint16_t*>data)[i])
    else:
        for i in range(n):
            h = _feed_point(h, (<const uint32_t*>data)[i])
    return h


cdef inline uint32_t _feed_decimal(uint32_t h, uint32_t n) noexcept nogil:
    # Feeds str(n): its ASCII digits, most significant first.
    cdef char digits[10]
    cdef int count = 0
    if n == 0:
        return _feed_unit(h, 48)
    while n > 0:
        digits[count] = <char>(48 + n % 10)
        n //= 10
        count += 1
    while count > 0:
        count -= 1
        h = _feed_unit(h, <uint32_t>digits[count])
    return h


cdef struct _Source:
    int kind
    const void* data
    Py_ssize_t length


cdef inline _Source _source(str s) except *:
    cdef _Source src
    PyUnicode_READY(s)
    src.kind = PyUnicode_KIND(s)
    src.data = PyUnicode_DATA(s)
    src.length = PyUnicode_GET_LENGTH(s)
    return src


cdef inline uint32_t _feed(uint32_t h, _Source s) noexcept nogil:
    return _feed_raw(h, s.kind, s.data, s.length)


cdef inline double _hash(_Source seed, _Source value, int version) noexcept nogil:
    cdef uint32_t h
    if version == 2:
        h = _feed(_feed(FNV_OFFSET, seed), value)
        h = _feed_decimal(FNV_OFFSET, h)
        return <double>(h % 10000) / 10000.0
    h = _feed(_feed(FNV_OFFSET, value), seed)
    return <double>(h % 1000) / 1000.0


def fnv1a32(str s) -> int:
    """FNV-1a 32-bit of ``s`` over its UTF-16 code units (GrowthBook's ``fnv1a32``)."""
    return _feed(FNV_OFFSET, _source(s))


def gbhash(str seed, str value, int version) -> float | None:
    """GrowthBook's ``gbhash``: the unit's hash value in [0, 1); None for an unknown version."""
    if version != 1 and version != 2:
        return None
    return _hash(_source(seed), _source(value), version)


def hash_value(str seed, str value, int version) -> float:
    """Like :func:`gbhash`, for a version already validated: ValueError for anything but 1 or 2."""
    if version != 1 and version != 2:
        raise ValueError(f"hash_version: must be 1 or 2, got {version}")
    return _hash(_source(seed), _source(value), version)


def assign_many(
    str seed,
    list values,
    int version,
    const double[::1] starts,
    const double[::1] ends,
    str namespace = None,
    double ns_start = 0.0,
    double ns_end = 1.0,
):
    """Hash every id in ``values`` and choose its arm.

    Returns ``(arms, buckets)``: int16 arm indices (-1: in no range, or outside the namespace range) and
    float64 hash values. ``starts``/``ends`` are the bucket ranges (GrowthBook's ``getBucketRanges``).
    ``namespace`` (without GrowthBook's ``"__"`` prefix) restricts the experiment to units whose namespace
    hash lies in ``[ns_start, ns_end)``. Every element of ``values`` must be a ``str``.
    """
    if version != 1 and version != 2:
        raise ValueError(f"hash_version: must be 1 or 2, got {version}")
    if starts.shape[0] != ends.shape[0]:
        raise ValueError("starts and ends: must have the same length")
    cdef Py_ssize_t n = len(values), i, j
    cdef Py_ssize_t n_ranges = starts.shape[0]
    arms_arr = np.empty(n, dtype=np.int16)
    buckets_arr = np.empty(n, dtype=np.float64)
    cdef short[::1] arms = arms_arr
    cdef double[::1] buckets = buckets_arr
    cdef _Source* sources = <_Source*>malloc(max(n, 1) * sizeof(_Source))
    if sources == NULL:
        raise MemoryError()
    cdef _Source seed_src = _source(seed)
    cdef _Source ns_src
    cdef bint has_ns = namespace is not None
    cdef str ns_seed
    if has_ns:
        ns_seed = "__" + namespace
        ns_src = _source(ns_seed)
    cdef double b, nsb
    cdef short arm
    cdef int threads = 2 if n >= PARALLEL_THRESHOLD else 1
    try:
        for i in range(n):
            value = values[i]
            if type(value) is not str:
                raise TypeError(f"values[{i}]: must be str, got {type(value).__name__}")
            sources[i] = _source(<str>value)
        with nogil:
            for i in prange(n, schedule="static", num_threads=threads):
                b = _hash(seed_src, sources[i], version)
                buckets[i] = b
                arm = -1
                nsb = 0.0
                if has_ns:
                    nsb = _hash(ns_src, sources[i], 1)
                if not has_ns or (ns_start <= nsb and nsb < ns_end):
                    for j in range(n_ranges):
                        if starts[j] <= b and b < ends[j]:
                            arm = <short>j
                            break
                arms[i] = arm
    finally:
        free(sources)
    return arms_arr, buckets_arr
