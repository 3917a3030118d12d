# cython: language_level=3
"""Score's feature map taken out of a serialised ``guardmesh.v1.ScoreRequest`` in one walk.

A Score request of a 1,024-feature model is ~17 KB, nearly all of it ``features`` (field 3,
``map<string, double>``): parsing it into a protobuf map and reading the map back by name costs more than the
rest of the call's Python. :func:`split_score_request` walks the bytes once and returns the request without its
``features`` entries (every other field, unknown ones included, in their order: protobuf parses that cheaply)
and the entries in wire order as one blob of UTF-8 keys, the keys' end offsets in it and the values.

The rules are upb's (protobuf's Python runtime), checked against it rather than recalled (see
tests/test_native_features.py): a map entry's missing key is "" and missing value 0.0; within an entry the last
key and the last value win; a key that is not valid UTF-8 refuses the message, even one a later key in its entry
replaces. The walk returns None, and its caller parses the request with protobuf instead, for everything it does
not take as it is: a malformed or truncated tag, varint or length, field number 0 or above 2**29 - 1, a group or
wire type 6/7 at the top level, ``features`` with another wire type than length-delimited, a key that is not
valid UTF-8, and an entry that holds any field besides key (1, length-delimited) and value (2, 64-bit). upb
keeps such an entry out of the map (it goes into the message's unknown fields whole), refuses the message, or
skips the field; protobuf's own parse gives each case exactly. A key repeated across entries is returned as
many times as it came: the last entry wins when the caller makes a map of them, as protobuf's does.
"""

import sys

import numpy as np

cimport numpy as cnp
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cnp.import_array()

#: The walk reads doubles as the host lays them out: on a big-endian host it always gives up (protobuf parses).
LITTLE_ENDIAN = sys.byteorder == "little"

cdef enum:
    WIRE_VARINT = 0
    WIRE_FIXED64 = 1
    WIRE_DELIMITED = 2
    WIRE_FIXED32 = 5
    FEATURES_FIELD = 3
    KEY_TAG = (1 << 3) | WIRE_DELIMITED
    VALUE_TAG = (2 << 3) | WIRE_FIXED64
    MAX_FIELD = (1 << 29) - 1


cdef inline Py_ssize_t _varint(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, int most, uint64_t* out) noexcept nogil:
    """The varint at ``pos`` (at most ``most`` bytes, before ``end``) into ``out``; the position after it, or -1."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef int taken = 0
    cdef uint8_t byte
    while taken < most and pos < end:
        byte = p[pos]
        pos += 1
        taken += 1
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            out[0] = value
            return pos
        shift += 7
    return -1


cdef inline bint _utf8(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Whether ``s[:n]`` is well-formed UTF-8 (Unicode 15, table 3-7: no overlong forms, no surrogates, at most
    U+10FFFF), the check upb makes on a proto3 string."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, lo, hi
    cdef int follow, k
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo, hi = 0x80, 0xBF
        if 0xC2 <= c <= 0xDF:
            follow = 1
        elif 0xE0 <= c <= 0xEF:
            follow = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            follow = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if i + follow >= n:  # the sequence runs past the string
            return False
        if s[i + 1] < lo or s[i + 1] > hi:
            return False
        for k in range(2, follow + 1):
            if s[i + k] < 0x80 or s[i + k] > 0xBF:
                return False
        i += follow + 1
    return True


cdef inline Py_ssize_t _skip(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, int wire) noexcept nogil:
    """The position after a field's payload of wire type ``wire`` at ``pos``; -1 for a group, wire type 6/7 or
    a payload that does not fit."""
    cdef uint64_t length
    if wire == WIRE_VARINT:
        return _varint(p, pos, end, 10, &length)
    if wire == WIRE_FIXED64:
        return pos + 8 if end - pos >= 8 else -1
    if wire == WIRE_FIXED32:
        return pos + 4 if end - pos >= 4 else -1
    if wire == WIRE_DELIMITED:
        pos = _varint(p, pos, end, 5, &length)
        if pos < 0 or length > <uint64_t>(end - pos):
            return -1
        return pos + <Py_ssize_t>length
    return -1


def split_score_request(const uint8_t[::1] raw not None):
    """``(rest, keys, ends, values)`` of a serialised ScoreRequest, or None where protobuf must parse it (see
    the module docstring).

    ``rest``: the request's bytes without its ``features`` entries; ``keys``: the entries' UTF-8 keys, one
    after the other, in wire order; ``ends``: int64, each key's end offset in ``keys``; ``values``: float64,
    each entry's value (an entry's missing key is "", its missing value 0.0)."""
    cdef Py_ssize_t n = raw.shape[0]
    if not LITTLE_ENDIAN:
        return None
    if n == 0:
        return b"", b"", np.empty(0, np.int64), np.empty(0, np.float64)
    cdef const uint8_t* p = &raw[0]
    # Upper bounds: the rest and the keys are no longer than the message; an entry takes at least two bytes.
    cdef Py_ssize_t most_entries = n // 2 + 1
    cdef uint8_t* rest = <uint8_t*>malloc(n)
    cdef uint8_t* keys = <uint8_t*>malloc(n)
    cdef int64_t* ends = <int64_t*>malloc(most_entries * sizeof(int64_t))
    cdef double* values = <double*>malloc(most_entries * sizeof(double))
    cdef Py_ssize_t rest_len = 0, keys_len = 0, count = 0
    cdef Py_ssize_t pos = 0, start, after, entry_end, key_start, key_end
    cdef uint64_t tag, length
    cdef int wire
    cdef double value
    cdef bint ok = True
    try:
        if rest == NULL or keys == NULL or ends == NULL or values == NULL:
            raise MemoryError()
        # The GIL stays held: the walk takes microseconds on the server's event loop, and a thread that gives
        # the GIL up waits for it again behind the others for up to the switch interval.
        while pos < n:
            start = pos
            pos = _varint(p, pos, n, 5, &tag)
            if pos < 0 or (tag >> 32) != 0:
                ok = False
                break
            wire = <int>(tag & 7)
            if (tag >> 3) == 0 or (tag >> 3) > MAX_FIELD:
                ok = False
                break
            if (tag >> 3) != FEATURES_FIELD:
                after = _skip(p, pos, n, wire)
                if after < 0:
                    ok = False
                    break
                memcpy(rest + rest_len, p + start, after - start)
                rest_len += after - start
                pos = after
                continue
            if wire != WIRE_DELIMITED:
                ok = False
                break
            pos = _varint(p, pos, n, 5, &length)
            if pos < 0 or length > <uint64_t>(n - pos):
                ok = False
                break
            entry_end = pos + <Py_ssize_t>length
            key_start = key_end = 0
            value = 0.0
            while pos < entry_end:
                pos = _varint(p, pos, entry_end, 5, &tag)
                if pos < 0:
                    ok = False
                    break
                if tag == KEY_TAG:
                    pos = _varint(p, pos, entry_end, 5, &length)
                    if pos < 0 or length > <uint64_t>(entry_end - pos):
                        ok = False
                        break
                    key_start = pos
                    key_end = pos + <Py_ssize_t>length
                    pos = key_end
                    if not _utf8(p + key_start, key_end - key_start):  # each key as read, a later one too
                        ok = False
                        break
                elif tag == VALUE_TAG:
                    if entry_end - pos < 8:
                        ok = False
                        break
                    memcpy(&value, p + pos, 8)
                    pos += 8
                else:  # upb keeps an entry with any other field out of the map: protobuf decides
                    ok = False
                    break
            if not ok:
                break
            memcpy(keys + keys_len, p + key_start, key_end - key_start)
            keys_len += key_end - key_start
            ends[count] = keys_len
            values[count] = value
            count += 1
        if not ok:
            return None
        out_ends = np.empty(count, np.int64)
        out_values = np.empty(count, np.float64)
        if count:
            memcpy(cnp.PyArray_DATA(out_ends), ends, count * sizeof(int64_t))
            memcpy(cnp.PyArray_DATA(out_values), values, count * sizeof(double))
        return (
            PyBytes_FromStringAndSize(<char*>rest, rest_len),
            PyBytes_FromStringAndSize(<char*>keys, keys_len),
            out_ends,
            out_values,
        )
    finally:
        free(rest)
        free(keys)
        free(ends)
        free(values)
