# cython: language_level=3
# distutils: extra_compile_args = -fno-math-errno
"""Fused in-place optimizer steps of the parameter server over float32 1-D arrays.

Each step reads every state array once and writes it once (one pass), with the GIL released and the
element range split across OpenMP threads in contiguous chunks (``OMP_NUM_THREADS`` caps them; arrays under
``PARALLEL_THRESHOLD`` elements run on the calling thread). The element math is float32, as in PyTorch for
float32 parameters; the per-step scalars (bias corrections, step size, decay factor) are computed once in
float64 and then rounded to float32, as PyTorch does when it passes Python floats to its float32 kernels.

Semantics follow ``torch.optim.SGD`` and ``torch.optim.Adam``/``AdamW`` (``_single_tensor_*``):

* ``sgd_step``: ``g = grad + wd*param; param -= lr*g``.
* ``momentum_step``: ``buf = g`` on the first step, else ``buf = momentum*buf + (1-dampening)*g``; then
  ``g = g + momentum*buf`` (Nesterov) or ``g = buf``; ``param -= lr*g``.
* ``adam_step``: ``g = grad*grad_scale``; AdamW (``decoupled``) ``param *= 1 - lr*wd``, else L2
  ``g += wd*param``; ``m = lerp(m, g, 1-beta1)``; ``v = beta2*v + (1-beta2)*g*g``;
  ``param -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`` with ``bc_i = 1 - beta_i**step``. ``step`` is the
  1-based number of APPLIED updates: the caller advances it only when an update is applied, so rejected
  or retried pushes never skew the bias correction.

Like PyTorch, a weight decay of 0 skips the decay terms entirely (no ``0*param`` that would turn an
infinite parameter into NaN). The float32 operations are torch's, in torch's order (``lerp`` as
``m + w*(g - m)``, ``v*beta2 + ((1-beta2)*g)*g``, ``p + (-step_size*m)/denom``), with one exception: the
denominator is ``sqrt(v) * f32(1/sqrt(bc2)) + eps`` where torch divides by ``f32(sqrt(bc2))``, one
division per element less, within a few float32 ulps of torch's. torch's vectorised kernels may also fuse
multiply-adds (FMA) where this build rounds each operation, so results agree to float32 rounding, not bits.

``-fno-math-errno`` (the ``distutils`` line above) lets the compiler vectorise ``sqrtf``: without it, C's
``sqrtf`` must be able to set ``errno`` and the Adam loop stays scalar. Threads take chunks dynamically, so
a thread slowed by a busy core does not hold the step back.
"""

cimport cython
from cython.parallel cimport prange
from libc.math cimport isfinite, pow, sqrt, sqrtf

cdef enum:
    CHUNK = 65536          # elements per unit of parallel work (a thread streams contiguous chunks)
    PARALLEL_MIN = 131072  # below this many elements, no threads are started

#: Element count under which a step runs on the calling thread only.
PARALLEL_THRESHOLD = PARALLEL_MIN


# -- inner loops (no GIL, no exceptions); ``lo``/``hi`` bound one chunk ---------------------------------------


cdef inline void _sgd(float* p, const float* g, Py_ssize_t lo, Py_ssize_t hi, float neg_lr, float wd) noexcept nogil:
    cdef Py_ssize_t i
    if wd != 0:
        for i in range(lo, hi):
            p[i] = p[i] + neg_lr * (g[i] + wd * p[i])
    else:
        for i in range(lo, hi):
            p[i] = p[i] + neg_lr * g[i]


cdef inline void _momentum(
    float* p, const float* grad, float* buf, Py_ssize_t lo, Py_ssize_t hi,
    float neg_lr, float mom, float one_minus_damp, float wd, bint nesterov, bint first
) noexcept nogil:
    cdef Py_ssize_t i
    cdef float g, b
    for i in range(lo, hi):
        g = grad[i]
        if wd != 0:
            g = g + wd * p[i]
        if first:
            b = g
        else:
            b = buf[i] * mom + one_minus_damp * g
        buf[i] = b
        if nesterov:
            g = g + mom * b
        else:
            g = b
        p[i] = p[i] + neg_lr * g


cdef inline void _adam_plain(
    float* p, const float* grad, float* m, float* v, Py_ssize_t lo, Py_ssize_t hi,
    float gs, float w1, float b2, float c2, float inv_bc2s, float eps, float neg_step
) noexcept nogil:
    """No weight decay."""
    cdef Py_ssize_t i
    cdef float g, mi, vi
    for i in range(lo, hi):
        g = grad[i] * gs
        mi = m[i]
        mi = mi + w1 * (g - mi)
        vi = v[i] * b2 + c2 * g * g
        m[i] = mi
        v[i] = vi
        p[i] = p[i] + (neg_step * mi) / (sqrtf(vi) * inv_bc2s + eps)


cdef inline void _adam_l2(
    float* p, const float* grad, float* m, float* v, Py_ssize_t lo, Py_ssize_t hi,
    float gs, float wd, float w1, float b2, float c2, float inv_bc2s, float eps, float neg_step
) noexcept nogil:
    """Adam with L2 weight decay folded into the gradient."""
    cdef Py_ssize_t i
    cdef float g, mi, vi, pi
    for i in range(lo, hi):
        pi = p[i]
        g = grad[i] * gs + wd * pi
        mi = m[i]
        mi = mi + w1 * (g - mi)
        vi = v[i] * b2 + c2 * g * g
        m[i] = mi
        v[i] = vi
        p[i] = pi + (neg_step * mi) / (sqrtf(vi) * inv_bc2s + eps)


cdef inline void _adamw(
    float* p, const float* grad, float* m, float* v, Py_ssize_t lo, Py_ssize_t hi,
    float gs, float decay, float w1, float b2, float c2, float inv_bc2s, float eps, float neg_step
) noexcept nogil:
    """AdamW: decoupled weight decay ``param *= decay`` before the update."""
    cdef Py_ssize_t i
    cdef float g, mi, vi
    for i in range(lo, hi):
        g = grad[i] * gs
        mi = m[i]
        mi = mi + w1 * (g - mi)
        vi = v[i] * b2 + c2 * g * g
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay + (neg_step * mi) / (sqrtf(vi) * inv_bc2s + eps)


# -- checks -----------------------------------------------------------------------------------------------


cdef int _same_length(Py_ssize_t n, Py_ssize_t other, str name) except -1:
    if other != n:
        raise ValueError(f"{name} has {other} elements, param has {n}; all arrays must have the same length")
    return 0


cdef int _finite(double value, str name) except -1:
    if not isfinite(value):
        raise ValueError(f"{name} = {value} is not finite")
    return 0


# -- public kernels ---------------------------------------------------------------------------------------


@cython.boundscheck(False)
@cython.wraparound(False)
def sgd_step(float[::1] param, const float[::1] grad, double lr, double weight_decay):
    """Plain SGD, in place: ``param -= lr * (grad + weight_decay * param)`` (torch.optim.SGD, momentum 0)."""
    cdef Py_ssize_t n = param.shape[0]
    cdef Py_ssize_t nc = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t c, lo
    _same_length(n, grad.shape[0], "grad")
    _finite(lr, "lr")
    _finite(weight_decay, "weight_decay")
    if n == 0:
        return
    cdef float* p = &param[0]
    cdef const float* g = &grad[0]
    cdef float neg_lr = <float>(-lr)
    cdef float wd = <float>weight_decay
    with nogil:
        for c in prange(nc, schedule="dynamic", chunksize=1, use_threads_if=n >= PARALLEL_MIN):
            lo = c * CHUNK
            _sgd(p, g, lo, min(lo + CHUNK, n), neg_lr, wd)


@cython.boundscheck(False)
@cython.wraparound(False)
def momentum_step(
    float[::1] param,
    const float[::1] grad,
    float[::1] buf,
    double lr,
    double momentum,
    double dampening,
    bint nesterov,
    double weight_decay,
    bint first_step,
):
    """SGD with momentum, in place on ``param`` and ``buf`` (torch.optim.SGD with ``momentum > 0``).

    ``first_step`` must be True on the first applied update of ``buf``: it then becomes ``g`` itself
    (dampening is not applied), as torch does when the momentum buffer does not exist yet.
    """
    cdef Py_ssize_t n = param.shape[0]
    cdef Py_ssize_t nc = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t c, lo
    _same_length(n, grad.shape[0], "grad")
    _same_length(n, buf.shape[0], "buf")
    for value, name in ((lr, "lr"), (momentum, "momentum"), (dampening, "dampening"), (weight_decay, "weight_decay")):
        _finite(value, name)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    if n == 0:
        return
    cdef float* p = &param[0]
    cdef const float* g = &grad[0]
    cdef float* b = &buf[0]
    cdef float neg_lr = <float>(-lr)
    cdef float mom = <float>momentum
    cdef float omd = <float>(1.0 - dampening)
    cdef float wd = <float>weight_decay
    with nogil:
        for c in prange(nc, schedule="dynamic", chunksize=1, use_threads_if=n >= PARALLEL_MIN):
            lo = c * CHUNK
            _momentum(p, g, b, lo, min(lo + CHUNK, n), neg_lr, mom, omd, wd, nesterov, first_step)


@cython.boundscheck(False)
@cython.wraparound(False)
def adam_step(
    float[::1] param,
    const float[::1] grad,
    float[::1] exp_avg,
    float[::1] exp_avg_sq,
    long long step,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bint decoupled,
    double grad_scale=1.0,
):
    """One Adam (``decoupled=False``, L2 decay) or AdamW (``decoupled=True``) update, in place.

    ``step`` is the 1-based count of applied updates including this one (torch's ``state['step']`` after
    its increment). ``grad`` is multiplied by ``grad_scale`` first (averaging, clipping, staleness).
    """
    cdef Py_ssize_t n = param.shape[0]
    cdef Py_ssize_t nc = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t c, lo
    _same_length(n, grad.shape[0], "grad")
    _same_length(n, exp_avg.shape[0], "exp_avg")
    _same_length(n, exp_avg_sq.shape[0], "exp_avg_sq")
    if step < 1:
        raise ValueError(f"step = {step}; it counts applied updates including this one, so it starts at 1")
    for value, name in ((lr, "lr"), (eps, "eps"), (weight_decay, "weight_decay"), (grad_scale, "grad_scale")):
        _finite(value, name)
    if not (0.0 <= beta1 < 1.0) or not (0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got ({beta1}, {beta2})")
    if n == 0:
        return
    # Scalars in float64 once (as torch computes them in Python), rounded to float32 for the loop.
    cdef double bc1 = 1.0 - pow(beta1, <double>step)
    cdef double bc2 = 1.0 - pow(beta2, <double>step)
    cdef float neg_step = <float>(-(lr / bc1))
    cdef float inv_bc2s = <float>(1.0 / sqrt(bc2))
    cdef float w1 = <float>(1.0 - beta1)
    cdef float b2 = <float>beta2
    cdef float c2 = <float>(1.0 - beta2)
    cdef float feps = <float>eps
    cdef float gs = <float>grad_scale
    cdef float wd = <float>weight_decay
    cdef float decay = <float>(1.0 - lr * weight_decay)
    cdef int mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    cdef float* p = &param[0]
    cdef const float* g = &grad[0]
    cdef float* m = &exp_avg[0]
    cdef float* v = &exp_avg_sq[0]
    with nogil:
        for c in prange(nc, schedule="dynamic", chunksize=1, use_threads_if=n >= PARALLEL_MIN):
            lo = c * CHUNK
            if mode == 0:
                _adam_plain(p, g, m, v, lo, min(lo + CHUNK, n), gs, w1, b2, c2, inv_bc2s, feps, neg_step)
            elif mode == 1:
                _adam_l2(p, g, m, v, lo, min(lo + CHUNK, n), gs, wd, w1, b2, c2, inv_bc2s, feps, neg_step)
            else:
                _adamw(p, g, m, v, lo, min(lo + CHUNK, n), gs, decay, w1, b2, c2, inv_bc2s, feps, neg_step)
