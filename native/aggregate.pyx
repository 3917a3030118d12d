# cython: language_level=3
"""Gradient aggregation kernels of the parameter server: one fused pass over K pushed buffers.

``aggregate`` computes ``out[i] = sum_k weights[k] * buffers[k][i]`` while it counts the non-finite input
elements (a poisoned push is rejected, never applied) and the squared L2 norm of ``out`` (for clipping), in
ONE pass over memory: every input is read once and ``out`` is written once.

How it is laid out:

* The element range is cut into super-blocks of ``SUPER`` elements (256 KiB of each input); ``prange``
  hands them to the OpenMP threads (dynamic schedule, so a thread slowed by a busy core does not hold
  the others back), and a thread streams each super-block's memory contiguously. Per-super-block results
  (norm, count) go into arrays and are summed serially afterwards, so the returned figures do not depend
  on the number of threads or on their timing (deterministic to the last bit).
* Inside a super-block, blocks of ``BLOCK`` elements of ``out`` stay in L1 while the inputs are added in
  groups of up to four (one simple, vectorised loop per group). The arithmetic is float32, left to right:
  ``out = w0*b0 + w1*b1 + ...`` rounds exactly as ``o = f32(w0)*b0; o += f32(w1)*b1; ...`` in numpy. The
  squared norm of the stored float32 values is accumulated in float64 (each square is exact in float64).
* From ``STREAM_THRESHOLD`` elements on (an ``out`` larger than a cache would keep anyway) a block is
  summed in a stack buffer and written to ``out`` with streaming (non-temporal) stores on x86: that saves
  the read-for-ownership of ``out``'s cache lines, one memory stream in K + 2.
* The non-finite count costs nothing on clean data: with finite weights any NaN/Inf input makes its
  output element non-finite (``w*Inf`` is Inf or, for ``w = 0``, NaN; Inf + -Inf is NaN), which makes the
  float64 norm of its super-block non-finite (a float32 square cannot overflow float64). Only a
  super-block whose norm is not finite is rescanned to count its NaN/Inf inputs exactly (this also covers
  a finite sum that overflowed float32: it is rescanned and counts 0).

Threads: OpenMP, ``OMP_NUM_THREADS`` caps them; arrays under ``PARALLEL_THRESHOLD`` elements run on the
calling thread only. Every kernel releases the GIL while it runs.
"""

import sys

cimport cython
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from cython.parallel cimport prange
from libc.float cimport FLT_MAX
from libc.math cimport fabs, fabsf, isfinite
from libc.stdint cimport uintptr_t

cdef enum:
    BLOCK = 1024           # elements of out kept in L1 while the input groups are added
    SUPER = 65536          # elements per unit of parallel work (and per partial norm/count)
    PARALLEL_MIN = 131072  # below this many elements, no threads are started
    STREAM_MIN = 1048576   # from this many elements (4 MiB) on, out is written with streaming stores

cdef extern from *:
    """
    /* Non-temporal (streaming) stores of a finished block into out: on x86 they skip the read-for-ownership
       of out's cache lines, which is one memory stream in K+2 saved. dst must be 16-byte aligned. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #define GM_CAN_STREAM 1
    static inline void gm_stream(float *dst, const float *src, Py_ssize_t m) {
        Py_ssize_t j = 0;
        for (; j + 4 <= m; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
        for (; j < m; j++) dst[j] = src[j];
    }
    static inline void gm_fence(void) { _mm_sfence(); }
    #else
    #define GM_CAN_STREAM 0
    static inline void gm_stream(float *dst, const float *src, Py_ssize_t m) {
        for (Py_ssize_t j = 0; j < m; j++) dst[j] = src[j];
    }
    static inline void gm_fence(void) {}
    #endif
    """
    const bint GM_CAN_STREAM
    void gm_stream(float* dst, const float* src, Py_ssize_t m) noexcept nogil
    void gm_fence() noexcept nogil

cdef bint _LITTLE = sys.byteorder == "little"

#: Element count under which a kernel runs on the calling thread only.
PARALLEL_THRESHOLD = PARALLEL_MIN
#: Element count from which ``aggregate`` writes a 16-byte aligned ``out`` with streaming stores (x86).
STREAM_THRESHOLD = STREAM_MIN


# -- inner loops (no GIL, no exceptions) ------------------------------------------------------------------


cdef inline Py_ssize_t _count_nonfinite(const float* p, Py_ssize_t n) noexcept nogil:
    """Number of NaN or +-Inf among ``p[0:n]`` (``not |x| <= FLT_MAX`` is true exactly for those)."""
    cdef Py_ssize_t i
    cdef Py_ssize_t c = 0
    for i in range(n):
        c += not (fabsf(p[i]) <= FLT_MAX)
    return c


cdef inline void _sum_group(
    float* o, const float** src, const float* w, Py_ssize_t g, bint accumulate, Py_ssize_t lo, Py_ssize_t m
) noexcept nogil:
    """``o[0:m] (+)= w[0]*src[0][lo:lo+m] + ... + w[g-1]*src[g-1][lo:lo+m]`` for 1 <= g <= 4 inputs.

    Left to right in float32, exactly as ``o = w0*b0; o += w1*b1; ...`` would round.
    """
    cdef Py_ssize_t j
    cdef const float* p0 = src[0] + lo
    cdef const float* p1 = src[1 if g > 1 else 0] + lo
    cdef const float* p2 = src[2 if g > 2 else 0] + lo
    cdef const float* p3 = src[3 if g > 3 else 0] + lo
    cdef float w0 = w[0]
    cdef float w1 = w[1 if g > 1 else 0]
    cdef float w2 = w[2 if g > 2 else 0]
    cdef float w3 = w[3 if g > 3 else 0]
    if not accumulate:
        if g == 1:
            for j in range(m):
                o[j] = w0 * p0[j]
        elif g == 2:
            for j in range(m):
                o[j] = w0 * p0[j] + w1 * p1[j]
        elif g == 3:
            for j in range(m):
                o[j] = w0 * p0[j] + w1 * p1[j] + w2 * p2[j]
        else:
            for j in range(m):
                o[j] = w0 * p0[j] + w1 * p1[j] + w2 * p2[j] + w3 * p3[j]
    else:
        if g == 1:
            for j in range(m):
                o[j] = o[j] + w0 * p0[j]
        elif g == 2:
            for j in range(m):
                o[j] = o[j] + w0 * p0[j] + w1 * p1[j]
        elif g == 3:
            for j in range(m):
                o[j] = o[j] + w0 * p0[j] + w1 * p1[j] + w2 * p2[j]
        else:
            for j in range(m):
                o[j] = o[j] + w0 * p0[j] + w1 * p1[j] + w2 * p2[j] + w3 * p3[j]


cdef inline double _norm_sq(const float* o, Py_ssize_t m) noexcept nogil:
    """``sum(o[0:m]**2)`` in float64, in eight independent lanes (so the loop vectorises)."""
    cdef Py_ssize_t j, l
    cdef Py_ssize_t m8 = m - m % 8
    cdef double acc[8]
    cdef double s
    for l in range(8):
        acc[l] = 0.0
    for j in range(0, m8, 8):
        for l in range(8):
            acc[l] = acc[l] + <double>o[j + l] * <double>o[j + l]
    s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for j in range(m8, m):
        s = s + <double>o[j] * <double>o[j]
    return s


cdef inline double _agg_block(
    float* out, const float** src, const float* w, Py_ssize_t K, Py_ssize_t lo, Py_ssize_t m, bint stream
) noexcept nogil:
    """``out[lo:lo+m] = sum_k w[k] * src[k][lo:lo+m]`` (float32, k in order); returns its float64 norm**2.

    Inputs are taken four at a time into an L1-resident block (``out`` itself, or with ``stream`` a stack
    block then streamed into ``out``), so memory sees each input read once and ``out`` written once.
    """
    cdef Py_ssize_t k = 0
    cdef float tmp[BLOCK]
    cdef float* o = &tmp[0] if stream else out + lo
    cdef double s
    while k < K:
        _sum_group(o, src + k, w + k, min(K - k, <Py_ssize_t>4), k > 0, lo, m)
        k = k + 4
    s = _norm_sq(o, m)
    if stream:
        gm_stream(out + lo, tmp, m)
    return s


cdef inline void _agg_super(
    float* out, const float** src, const float* w, Py_ssize_t K, Py_ssize_t lo, Py_ssize_t hi,
    double* norm, Py_ssize_t* count, bint stream
) noexcept nogil:
    """One super-block ``[lo, hi)``: sum, norm and (only if the norm is not finite) the exact count."""
    cdef double s = 0.0
    cdef Py_ssize_t b, k
    cdef Py_ssize_t c = 0
    b = lo
    while b < hi:
        s = s + _agg_block(out, src, w, K, b, min(<Py_ssize_t>BLOCK, hi - b), stream)
        b = b + BLOCK
    if stream:
        gm_fence()  # streaming stores are weakly ordered: make them visible before the thread reports done
    if not isfinite(s):
        for k in range(K):
            c = c + _count_nonfinite(src[k] + lo, hi - lo)
    norm[0] = s
    count[0] = c


cdef inline void _scale(float* x, Py_ssize_t n, float factor) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] * factor


# -- buffer acquisition -----------------------------------------------------------------------------------


cdef Py_ssize_t _acquire(object obj, Py_buffer* view, Py_ssize_t k) except -1:
    """Take a C-contiguous read-only view of ``obj`` as float32; return its element count.

    Accepted: buffers of format ``f`` (native, ``=``, ``@`` or - on little-endian hosts - ``<``), and byte
    buffers (format ``B``/``b``/``c``, e.g. ``bytes`` or a ``memoryview`` of a protobuf payload) whose
    length is a multiple of 4, read as native-endian float32. The data must be 4-byte aligned.
    """
    cdef bytes fmt, raw
    cdef Py_ssize_t n
    try:
        PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, TypeError, ValueError) as exc:
        raise ValueError(
            f"buffers[{k}] ({type(obj).__name__}) is not a C-contiguous buffer: {exc}"
        ) from None
    raw = view.format if view.format != NULL else b"B"
    fmt = raw
    if len(fmt) > 1 and (fmt[:1] in (b"@", b"=") or (_LITTLE and fmt[:1] == b"<")):
        fmt = fmt[1:]
    if view.itemsize == 4 and fmt == b"f":
        n = view.len // 4
    elif view.itemsize == 1 and fmt in (b"B", b"b", b"c"):
        if view.len % 4:
            PyBuffer_Release(view)
            raise ValueError(f"buffers[{k}] holds {view.len} bytes, not a whole number of float32 values")
        n = view.len // 4
    else:
        PyBuffer_Release(view)
        raise ValueError(
            f"buffers[{k}] has format {raw.decode(errors='replace')!r} "
            f"(itemsize {view.itemsize}); expected float32 ('f') or raw bytes"
        )
    if (<uintptr_t>view.buf) % 4:
        PyBuffer_Release(view)
        raise ValueError(f"buffers[{k}] is not 4-byte aligned; copy it into an aligned array first")
    return n


# -- public kernels ---------------------------------------------------------------------------------------


@cython.boundscheck(False)
@cython.wraparound(False)
def count_nonfinite(const float[::1] x):
    """Number of NaN or +-Inf elements of the float32 array ``x`` (exact; GIL released, threaded)."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t nsb = (n + SUPER - 1) // SUPER
    cdef Py_ssize_t sb, lo
    cdef Py_ssize_t total = 0
    if n == 0:
        return 0
    cdef const float* p = &x[0]
    with nogil:
        for sb in prange(nsb, schedule="dynamic", chunksize=1, use_threads_if=n >= PARALLEL_MIN):
            lo = sb * SUPER
            total += _count_nonfinite(p + lo, min(<Py_ssize_t>SUPER, n - lo))
    return total


@cython.boundscheck(False)
@cython.wraparound(False)
def aggregate(float[::1] out, list buffers, const double[::1] weights):
    """``out[i] = sum_k weights[k] * buffers[k][i]`` in one fused pass; returns ``(nonfinite, norm_sq)``.

    ``buffers`` holds K >= 1 float32 buffers of ``len(out)`` elements each (numpy arrays, ``bytes``,
    memoryviews: anything with the buffer protocol, C-contiguous, format ``f`` or raw bytes read as
    native-endian float32). ``weights`` holds K finite float64 weights (``1/K`` each to average).

    The weights are rounded to float32 and the sum is float32, left to right over k (numpy's
    ``o = f32(w0)*b0; o += f32(w1)*b1; ...``). ``nonfinite`` is the exact number of NaN/+-Inf elements over
    all inputs; ``norm_sq`` is ``sum(out.astype(float64)**2)`` (not finite when ``nonfinite > 0`` or when a
    sum overflowed float32). ``out`` may be ``buffers[0]`` itself (in-place accumulation); any other
    overlap between ``out`` and an input is refused. Raises ``ValueError`` on an empty list, a weight count
    other than K, a weight that is not a finite float32, a length mismatch or an unusable buffer (not
    C-contiguous, another dtype, a byte length not a multiple of 4, not 4-byte aligned).
    """
    cdef Py_ssize_t K = len(buffers)
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t k, nk, sb, lo
    cdef Py_ssize_t acquired = 0
    cdef Py_ssize_t nsb = (n + SUPER - 1) // SUPER
    cdef Py_buffer* views = NULL
    cdef const float** ptrs = NULL
    cdef float* wts = NULL
    cdef double* norms = NULL
    cdef Py_ssize_t* counts = NULL
    cdef float* optr
    cdef uintptr_t o_lo, o_hi, p_lo, p_hi
    cdef Py_ssize_t total = 0
    cdef double norm = 0.0
    cdef bint stream
    if K == 0:
        raise ValueError("aggregate needs at least one buffer (K >= 1), got an empty list")
    if weights.shape[0] != K:
        raise ValueError(f"got {weights.shape[0]} weights for {K} buffers; pass exactly one weight per buffer")
    for k in range(K):
        if not fabs(weights[k]) <= FLT_MAX:
            raise ValueError(f"weights[{k}] = {weights[k]} is not a finite float32 value")
    optr = &out[0] if n > 0 else NULL
    o_lo = <uintptr_t>optr
    o_hi = o_lo + <uintptr_t>(n * sizeof(float))
    views = <Py_buffer*>PyMem_Calloc(K, sizeof(Py_buffer))
    ptrs = <const float**>PyMem_Malloc(K * sizeof(float*))
    wts = <float*>PyMem_Malloc(K * sizeof(float))
    norms = <double*>PyMem_Malloc((nsb + 1) * sizeof(double))
    counts = <Py_ssize_t*>PyMem_Malloc((nsb + 1) * sizeof(Py_ssize_t))
    try:
        if views == NULL or ptrs == NULL or wts == NULL or norms == NULL or counts == NULL:
            raise MemoryError()
        for k in range(K):
            nk = _acquire(buffers[k], &views[k], k)
            acquired += 1
            if nk != n:
                raise ValueError(f"buffers[{k}] has {nk} float32 elements, out has {n}; all must be equal")
            ptrs[k] = <const float*>views[k].buf
            wts[k] = <float>weights[k]
            p_lo = <uintptr_t>views[k].buf
            p_hi = p_lo + <uintptr_t>(n * sizeof(float))
            if n > 0 and p_lo < o_hi and o_lo < p_hi and not (k == 0 and p_lo == o_lo):
                raise ValueError(f"buffers[{k}] overlaps out; only buffers[0] may be out itself (in place)")
        if n > 0:
            stream = GM_CAN_STREAM and n >= STREAM_MIN and o_lo % 16 == 0
            with nogil:
                for sb in prange(nsb, schedule="dynamic", chunksize=1, use_threads_if=n >= PARALLEL_MIN):
                    lo = sb * SUPER
                    _agg_super(optr, ptrs, wts, K, lo, min(lo + SUPER, n), &norms[sb], &counts[sb], stream)
            for sb in range(nsb):
                norm += norms[sb]
                total += counts[sb]
    finally:
        for k in range(acquired):
            PyBuffer_Release(&views[k])
        PyMem_Free(views)
        PyMem_Free(ptrs)
        PyMem_Free(wts)
        PyMem_Free(norms)
        PyMem_Free(counts)
    return total, norm


@cython.boundscheck(False)
@cython.wraparound(False)
def scale_inplace(float[::1] x, float factor):
    """``x *= factor`` in float32, in place (gradient clipping); GIL released, threaded."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t nsb = (n + SUPER - 1) // SUPER
    cdef Py_ssize_t sb, lo
    if n == 0:
        return
    cdef float* p = &x[0]
    with nogil:
        for sb in prange(nsb, schedule="dynamic", chunksize=1, use_threads_if=n >= PARALLEL_MIN):
            lo = sb * SUPER
            _scale(p + lo, min(<Py_ssize_t>SUPER, n - lo), factor)
