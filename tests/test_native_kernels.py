"""The parameter server's native hot path (``native/aggregate.pyx``, ``native/optim.pyx``) against references.

Every kernel has a pure numpy reference below (the obvious slow formula), and hypothesis draws the cases:
lengths 0..10_000 (0 and 1 included), K = 1..8 buffers, weights, and values that mix ordinary data with
NaN, +-Inf, signed zeros, subnormals and values near the float32 limit. The optimizer kernels are also
run against ``torch.optim.SGD``/``Adam``/``AdamW`` (``foreach=False``) over several steps, including a
push sequence in which poisoned pushes are rejected and the step counter is not advanced.

Tolerances, and why (u = 2**-24, the unit roundoff of float32):

* Non-finite counts are exact.
* ``aggregate``: the kernel sums ``f32(w_k) * b_k`` left to right in float32. Against the float64 sum of
  the unrounded terms, rounding the K weights, the K products and the K-1 additions bounds the error by
  ``gamma_(2K) * sum_k |w_k b_k|`` with ``gamma_n = n*u/(1-n*u)`` (plus ``2K * 2**-150`` for gradual
  underflow). A tolerance relative to the *result* would be dishonest: with cancellation the relative
  error of a float32 sum is unbounded. For K = 8 the bound is ~1e-6 of the terms' magnitude. On x86-64
  (no FMA contraction in this build, none in numpy) the kernel must also equal the numpy float32
  reference bit for bit, which is what its docstring promises.
* Squared norms are float64 sums of exact float64 squares: two summation orders of n non-negative terms
  differ by at most ``2 (n-1) 2**-53`` relative (~1e-12 at n = 10_000).
* SGD and momentum use the same float32 operations in the same order as the reference (and as torch's
  ``_single_tensor_sgd``): we allow 4u of the terms' magnitude, which is exact up to an FMA contraction on
  other architectures. Against torch itself, whose vectorised kernels may fuse multiply-adds, over several
  steps we allow 1e-6 relative plus 1e-6 of the array's largest magnitude (cancellation in ``buf``).
* Adam: the kernel multiplies ``sqrt(v)`` by ``f32(1/sqrt(bc2))`` where torch divides by ``f32(sqrt(bc2))``
  (a few ulps in the denominator); the moments use torch's own operations. Against the float32 reference
  we allow 8u of the magnitude of the terms of each output (``|param| + |update|``, ``|m| + |g|``, ...).
  Against torch over many steps: 1e-6 relative plus 1e-6 of the array's largest magnitude (``exp_avg``
  passes through zero where ``beta1*m`` and ``(1-beta1)*g`` cancel, so a purely relative test is not
  meaningful there).
"""

from __future__ import annotations

import math
import platform
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from native.aggregate import PARALLEL_THRESHOLD, STREAM_THRESHOLD, aggregate, count_nonfinite, scale_inplace
from native.optim import adam_step, momentum_step, sgd_step

F32 = np.float32
U = 2.0**-24
TINY = 2.0**-149
FLT_MAX = float(np.finfo(np.float32).max)
X86 = platform.machine().lower() in {"x86_64", "amd64"}
HYP = hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL_VALUES = [
    math.nan, math.inf, -math.inf, 0.0, -0.0, TINY, -TINY, 1.1754942e-38, 1.0e-42,
    FLT_MAX, -FLT_MAX, 1e30, -1e30, 1.0, -1.0,
]  # fmt: skip


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), the bound on n float32 roundings."""
    return n * U / (1 - n * U)


# -- pure numpy references ---------------------------------------------------------------------------------


def ref_count_nonfinite(x: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(x)))


def ref_aggregate32(buffers: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """``o = f32(w0)*b0; o += f32(w1)*b1; ...`` in float32."""
    with np.errstate(all="ignore"):
        acc: np.ndarray = F32(weights[0]) * buffers[0]
        for w, b in zip(weights[1:], buffers[1:], strict=True):
            acc = acc + F32(w) * b
    return acc.astype(np.float32)


def ref_aggregate64(buffers: list[np.ndarray], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The float64 sum of the unrounded terms and ``sum_k |w_k b_k|`` (the scale of the rounding error)."""
    with np.errstate(all="ignore"):
        terms = [np.float64(w) * b.astype(np.float64) for w, b in zip(weights, buffers, strict=True)]
        return np.sum(terms, axis=0), np.sum(np.abs(terms), axis=0)


def ref_norm_sq(out: np.ndarray) -> float:
    with np.errstate(all="ignore"):
        return float(np.sum(out.astype(np.float64) ** 2))


def ref_sgd(p: np.ndarray, g: np.ndarray, lr: float, wd: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        if wd != 0:
            g = g + F32(wd) * p
        return (p + F32(-lr) * g).astype(np.float32)


def ref_momentum(
    p: np.ndarray, g: np.ndarray, buf: np.ndarray, lr: float, momentum: float, dampening: float,
    nesterov: bool, wd: float, first: bool,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    with np.errstate(all="ignore"):
        if wd != 0:
            g = g + F32(wd) * p
        new_buf = g.copy() if first else buf * F32(momentum) + F32(1 - dampening) * g
        d = g + F32(momentum) * new_buf if nesterov else new_buf
        return (p + F32(-lr) * d).astype(np.float32), new_buf.astype(np.float32)


def ref_adam(
    p: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float, beta1: float,
    beta2: float, eps: float, wd: float, decoupled: bool, grad_scale: float = 1.0,
) -> dict[str, np.ndarray]:  # fmt: skip
    """torch's ``_single_tensor_adam`` in float32 numpy; also returns the terms' magnitudes."""
    with np.errstate(all="ignore"):
        g: np.ndarray = grad * F32(grad_scale)
        if wd != 0:
            if decoupled:
                p = p * F32(1 - lr * wd)
            else:
                g = g + F32(wd) * p
        m_new = m + F32(1 - beta1) * (g - m)
        v_new = v * F32(beta2) + F32(1 - beta2) * g * g
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        denom = np.sqrt(v_new) / F32(math.sqrt(bc2)) + F32(eps)
        update = (F32(-lr / bc1) * m_new) / denom
        return {
            "param": (p + update).astype(np.float32),
            "exp_avg": m_new.astype(np.float32),
            "exp_avg_sq": v_new.astype(np.float32),
            "param_scale": np.abs(p) + np.abs(update),
            "exp_avg_scale": np.abs(m) + np.abs(g),
            "exp_avg_sq_scale": np.abs(v) + np.abs(F32(1 - beta2) * g * g),
        }


# -- comparison helpers ------------------------------------------------------------------------------------


def assert_same_nonfinite(actual: np.ndarray, expected: np.ndarray) -> None:
    """NaN where the reference has NaN, the same infinity where it has one."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    inf = np.isinf(expected)
    np.testing.assert_array_equal(actual[inf], expected[inf])


def assert_within(actual: np.ndarray, expected: np.ndarray, tol: np.ndarray | float, what: str) -> None:
    """``|actual - expected| <= tol`` where the reference is finite; identical non-finite pattern elsewhere."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    finite = np.isfinite(expected)
    if not X86:  # an FMA contraction may move a value across the overflow threshold; compare the rest
        finite &= np.isfinite(actual)
    else:
        assert_same_nonfinite(actual, expected)
    tol_arr = np.broadcast_to(np.asarray(tol, dtype=np.float64), expected.shape)
    with np.errstate(all="ignore"):
        err = np.abs(actual[finite].astype(np.float64) - expected[finite].astype(np.float64))
    bad = err > tol_arr[finite]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements off; first: got {actual[finite][i]!r}, "
            f"want {expected[finite][i]!r}, |diff| {err[i]:.3g} > tol {tol_arr[finite][i]:.3g}"
        )


# -- strategies --------------------------------------------------------------------------------------------

SCALES = [1.0, 1e-3, 1e3, 1e-40, 1e-44, 1e19, 1e30, 3e38]


@st.composite
def f32_array(draw: st.DrawFn, n: int, specials: bool = True) -> np.ndarray:
    """n float32 values: seeded normal data at a drawn scale, plus a few drawn edge values at drawn places."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    with np.errstate(all="ignore"):
        x = (rng.standard_normal(n) * draw(st.sampled_from(SCALES))).astype(np.float32)
    if specials and n:
        count = draw(st.integers(0, min(n, 6)))
        for _ in range(count):
            value = draw(st.sampled_from(SPECIAL_VALUES) | st.floats(width=32))
            x[draw(st.integers(0, n - 1))] = value
    return x


sizes = st.sampled_from([0, 1, 2, 7, 8, 9]) | st.integers(0, 10_000)
weight_values = st.sampled_from([1.0, 0.5, 1 / 3, 0.125, 0.0, -1.0, 1e-30, 1e30]) | st.floats(-4.0, 4.0, width=32)


def as_buffer(x: np.ndarray, kind: str) -> Any:
    """The same float32 data as a numpy array, ``bytes``, a byte memoryview or a float memoryview."""
    if kind == "bytes":
        return x.tobytes()
    if kind == "memoryview-bytes":
        return memoryview(bytearray(x.tobytes()))
    if kind == "memoryview-float":
        return memoryview(x)  # type: ignore[arg-type]
    return x


# -- count_nonfinite ---------------------------------------------------------------------------------------


@HYP
@given(data=st.data(), n=sizes)
def test_count_nonfinite_is_exact(data: st.DataObject, n: int) -> None:
    x = data.draw(f32_array(n))
    assert count_nonfinite(x) == ref_count_nonfinite(x)


@HYP
@given(x=st.lists(st.floats(width=32), max_size=64).map(lambda v: np.array(v, dtype=np.float32)))
def test_count_nonfinite_every_float32_value(x: np.ndarray) -> None:
    assert count_nonfinite(x) == ref_count_nonfinite(x)


def test_count_nonfinite_threaded_range() -> None:
    n = 3 * PARALLEL_THRESHOLD + 12_345
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    positions = [0, 65_535, 65_536, n // 2, n - 1]
    x[positions] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
    assert count_nonfinite(x) == len(positions)
    assert count_nonfinite(np.asarray(x.view(np.uint32) | 0x7F800000).view(np.float32)) == n  # all NaN/Inf


# -- aggregate ---------------------------------------------------------------------------------------------


def check_aggregate(buffers: list[np.ndarray], weights: list[float], kinds: list[str] | None = None) -> None:
    n = buffers[0].shape[0]
    kinds = kinds or ["ndarray"] * len(buffers)
    out = np.full(n, 7.0, dtype=np.float32)
    bad, norm_sq = aggregate(out, [as_buffer(b, k) for b, k in zip(buffers, kinds, strict=True)],
                             np.array(weights, dtype=np.float64))  # fmt: skip
    assert isinstance(bad, int) and isinstance(norm_sq, float)
    assert bad == sum(ref_count_nonfinite(b) for b in buffers)

    ref32 = ref_aggregate32(buffers, weights)
    exact, magnitude = ref_aggregate64(buffers, weights)
    K = len(buffers)
    assert_within(out, ref32, gamma(2 * K) * 2 * magnitude + 4 * K * TINY, "aggregate vs float32 reference")
    inputs_finite = np.all([np.isfinite(b) for b in buffers], axis=0) if n else np.ones(0, bool)
    ok = inputs_finite & np.isfinite(out)  # a finite sum may still overflow float32: Inf is right there
    with np.errstate(all="ignore"):
        err = np.abs(out[ok].astype(np.float64) - exact[ok])
    assert np.all(err <= gamma(2 * K) * magnitude[ok] + 2 * K * TINY), "aggregate vs exact sum"
    if X86:
        np.testing.assert_array_equal(out, ref32)  # bit for bit (NaN == NaN for array_equal's purposes)

    if bad:
        assert not math.isfinite(norm_sq)
    elif np.all(np.isfinite(out)):
        want = ref_norm_sq(out)
        assert math.isclose(norm_sq, want, rel_tol=2 * max(n - 1, 1) * 2.0**-53, abs_tol=0.0)
    else:  # finite inputs whose products or sum overflowed float32 (Inf, or NaN from Inf - Inf)
        assert not math.isfinite(norm_sq)


@HYP
@given(data=st.data(), n=sizes, K=st.integers(1, 8))
def test_aggregate_matches_reference(data: st.DataObject, n: int, K: int) -> None:
    buffers = [data.draw(f32_array(n)) for _ in range(K)]
    weights = data.draw(st.lists(weight_values, min_size=K, max_size=K))
    kinds = data.draw(
        st.lists(st.sampled_from(["ndarray", "bytes", "memoryview-bytes", "memoryview-float"]), min_size=K, max_size=K)
    )
    check_aggregate(buffers, weights, kinds)


@HYP
@given(
    data=st.data(),
    n=st.integers(0, 40),
    K=st.integers(1, 8),
)
def test_aggregate_every_float32_value(data: st.DataObject, n: int, K: int) -> None:
    buffers = [
        np.array(data.draw(st.lists(st.floats(width=32), min_size=n, max_size=n)), dtype=np.float32) for _ in range(K)
    ]
    weights = data.draw(st.lists(weight_values, min_size=K, max_size=K))
    check_aggregate(buffers, weights)


@pytest.mark.parametrize("K", [1, 3, 8])
def test_aggregate_threaded_range_and_poison(K: int) -> None:
    """Past the threading threshold, with a ragged last super-block and poison in two super-blocks."""
    n = 2 * PARALLEL_THRESHOLD + 4_099
    rng = np.random.default_rng(K)
    buffers = [rng.standard_normal(n).astype(np.float32) for _ in range(K)]
    weights = [1.0 / K] * K
    check_aggregate(buffers, weights)
    out = np.empty(n, np.float32)
    first = aggregate(out, buffers, np.array(weights))
    assert aggregate(out, buffers, np.array(weights)) == first  # deterministic to the last bit
    buffers[0][70_000] = np.nan
    buffers[-1][n - 1] = -np.inf
    buffers[-1][n - 2] = np.inf
    check_aggregate(buffers, weights)
    assert aggregate(out, buffers, np.array(weights))[0] == 3


@pytest.mark.parametrize("offset", [0, 1])
def test_aggregate_streaming_range(offset: int) -> None:
    """Past the streaming-store threshold: an aligned out (streamed) and one 4 bytes off (plain stores)."""
    n = STREAM_THRESHOLD + 4_099
    rng = np.random.default_rng(offset)
    buffers = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    buffers[1][n - 5] = np.nan
    out = np.empty(n + offset, np.float32)[offset:]
    bad, norm_sq = aggregate(out, buffers, np.array([0.5, 0.25, 0.25]))
    assert bad == 1 and not math.isfinite(norm_sq)
    np.testing.assert_array_equal(out, ref_aggregate32(buffers, [0.5, 0.25, 0.25]))
    buffers[1][n - 5] = 1.0
    bad, norm_sq = aggregate(buffers[0], buffers, np.array([0.5, 0.25, 0.25]))  # in place, streamed
    assert bad == 0
    assert math.isclose(norm_sq, ref_norm_sq(buffers[0]), rel_tol=1e-10)


def test_aggregate_average_in_place_into_first_buffer() -> None:
    rng = np.random.default_rng(5)
    buffers = [rng.standard_normal(300_001).astype(np.float32) for _ in range(4)]
    want = ref_aggregate32(buffers, [0.25] * 4)
    bad, norm_sq = aggregate(buffers[0], buffers, np.full(4, 0.25))
    assert bad == 0
    np.testing.assert_allclose(buffers[0], want, rtol=0, atol=float(gamma(8) * 4 * np.abs(want).max()))
    assert math.isclose(norm_sq, ref_norm_sq(buffers[0]), rel_tol=1e-10)


def test_aggregate_overflow_is_not_counted_as_poison() -> None:
    big = np.full(10, 3e38, dtype=np.float32)
    out = np.empty(10, np.float32)
    bad, norm_sq = aggregate(out, [big, big], np.ones(2))
    assert bad == 0 and norm_sq == math.inf and np.all(out == np.inf)


def test_aggregate_zero_weight_still_rejects_poison() -> None:
    x = np.ones(5, np.float32)
    y = np.array([1, np.inf, 1, np.nan, 1], dtype=np.float32)
    bad, norm_sq = aggregate(np.empty(5, np.float32), [x, y], np.array([1.0, 0.0]))
    assert bad == 2 and not math.isfinite(norm_sq)


@pytest.mark.parametrize(
    ("buffers", "weights", "message"),
    [
        ([], [], "at least one buffer"),
        ([np.ones(4, np.float32)], [1.0, 1.0], "2 weights for 1 buffers"),
        ([np.ones(4, np.float32), np.ones(3, np.float32)], [1.0, 1.0], "buffers\\[1\\] has 3 float32 elements"),
        ([np.ones(4, np.float64)], [1.0], "format 'd'"),
        ([np.ones(8, np.float32)[::2]], [1.0], "C-contiguous"),
        ([b"\x00" * 15], [1.0], "not a whole number of float32"),
        ([memoryview(b"\x00" * 17)[1:]], [1.0], "4-byte aligned"),
        ([np.ones(4, np.float32)], [math.nan], "not a finite float32"),
        ([np.ones(4, np.float32)], [1e39], "not a finite float32"),
        ([3], [1.0], "buffers\\[0\\]"),
    ],
)
def test_aggregate_rejects_bad_input(buffers: list[Any], weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate(np.empty(4, np.float32), buffers, np.array(weights, dtype=np.float64))


def test_aggregate_refuses_partial_overlap_with_out() -> None:
    base = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match="overlaps out"):
        aggregate(base[:10], [np.ones(10, np.float32), base[5:15]], np.ones(2))
    with pytest.raises(ValueError, match="overlaps out"):
        aggregate(base[:10], [np.ones(10, np.float32), base[:10]], np.ones(2))  # out may only be buffers[0]


def test_aggregate_big_endian_floats_are_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        aggregate(np.empty(4, np.float32), [np.ones(4, dtype=">f4")], np.ones(1))


# -- scale_inplace -----------------------------------------------------------------------------------------


@HYP
@given(data=st.data(), n=sizes, factor=st.sampled_from([0.0, 0.5, 1.0, -2.0, 1e-30, 1e30]) | st.floats(width=32))
def test_scale_inplace_matches_reference(data: st.DataObject, n: int, factor: float) -> None:
    x = data.draw(f32_array(n))
    with np.errstate(all="ignore"):
        want = x * F32(factor)
    scale_inplace(x, factor)
    np.testing.assert_array_equal(x, want)  # one correctly rounded product per element, everywhere


def test_scale_inplace_threaded_range() -> None:
    x = np.random.default_rng(2).standard_normal(PARALLEL_THRESHOLD * 2 + 3).astype(np.float32)
    want = x * F32(0.3)
    scale_inplace(x, 0.3)
    np.testing.assert_array_equal(x, want)


# -- SGD and momentum --------------------------------------------------------------------------------------

lrs = st.sampled_from([0.0, 1e-3, 0.1, 1.0]) | st.floats(1e-6, 2.0)
decays = st.sampled_from([0.0, 1e-4, 0.01, 0.5])


@HYP
@given(data=st.data(), n=sizes, lr=lrs, wd=decays)
def test_sgd_matches_reference(data: st.DataObject, n: int, lr: float, wd: float) -> None:
    p, g = data.draw(f32_array(n)), data.draw(f32_array(n))
    want = ref_sgd(p, g, lr, wd)
    with np.errstate(all="ignore"):
        scale = np.abs(p) + lr * (np.abs(g) + wd * np.abs(p))
    sgd_step(p, g, lr, wd)
    assert_within(p, want, 4 * U * scale + 4 * TINY, "sgd param")


@HYP
@given(
    data=st.data(),
    n=sizes,
    lr=lrs,
    momentum=st.sampled_from([0.5, 0.9, 0.99]),
    dampening=st.sampled_from([0.0, 0.1, 0.5]),
    nesterov=st.booleans(),
    wd=decays,
    first=st.booleans(),
)
def test_momentum_matches_reference(
    data: st.DataObject, n: int, lr: float, momentum: float, dampening: float, nesterov: bool, wd: float, first: bool
) -> None:
    if nesterov:
        dampening = 0.0
    p, g, buf = data.draw(f32_array(n)), data.draw(f32_array(n)), data.draw(f32_array(n))
    want_p, want_buf = ref_momentum(p, g, buf, lr, momentum, dampening, nesterov, wd, first)
    with np.errstate(all="ignore"):
        g_abs = np.abs(g) + wd * np.abs(p)
        buf_scale = g_abs if first else momentum * np.abs(buf) + g_abs
        p_scale = np.abs(p) + lr * (g_abs + buf_scale)
    momentum_step(p, g, buf, lr, momentum, dampening, nesterov, wd, first)
    assert_within(buf, want_buf, 4 * U * buf_scale + 4 * TINY, "momentum buf")
    assert_within(p, want_p, 6 * U * p_scale + 4 * TINY, "momentum param")


def close_to_torch(actual: np.ndarray, expected: torch.Tensor, what: str) -> None:
    want = expected.detach().numpy()
    atol = 1e-6 * float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(actual, want, rtol=1e-6, atol=atol, err_msg=what)


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "wd"),
    [(0.0, 0.0, False, 0.0), (0.0, 0.0, False, 0.01), (0.9, 0.0, False, 0.0), (0.9, 0.1, False, 1e-3),
     (0.9, 0.0, True, 0.0), (0.8, 0.0, True, 0.05)],
)  # fmt: skip
def test_sgd_and_momentum_match_torch(momentum: float, dampening: float, nesterov: bool, wd: float) -> None:
    rng = np.random.default_rng(11)
    n, lr = 5_000, 0.05
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(8)]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD(
        [tp], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, foreach=False
    )
    p, buf = p0.copy(), np.zeros(n, np.float32)
    for t, g in enumerate(grads, start=1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        if momentum:
            momentum_step(p, g, buf, lr, momentum, dampening, nesterov, wd, t == 1)
        else:
            sgd_step(p, g, lr, wd)
    close_to_torch(p, tp, "param")
    if momentum:
        close_to_torch(buf, opt.state[tp]["momentum_buffer"], "momentum_buffer")


def test_momentum_rejects_bad_arguments() -> None:
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="Nesterov"):
        momentum_step(a, a.copy(), a.copy(), 0.1, 0.9, 0.1, True, 0.0, True)
    with pytest.raises(ValueError, match="buf has 3 elements"):
        momentum_step(a, a.copy(), np.zeros(3, np.float32), 0.1, 0.9, 0.0, False, 0.0, True)
    with pytest.raises(ValueError, match="grad has 5 elements"):
        sgd_step(a, np.zeros(5, np.float32), 0.1, 0.0)
    with pytest.raises(ValueError, match="lr"):
        sgd_step(a, a.copy(), math.nan, 0.0)


# -- Adam / AdamW ------------------------------------------------------------------------------------------


@HYP
@given(
    data=st.data(),
    n=sizes,
    step=st.sampled_from([1, 2, 10, 1000, 10**6]) | st.integers(1, 100),
    lr=lrs,
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    beta2=st.sampled_from([0.0, 0.9, 0.999, 0.99999]),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3, 0.0]),
    wd=decays,
    decoupled=st.booleans(),
    grad_scale=st.sampled_from([1.0, 0.5, 1 / 3, 1e-3, 0.0]),
)
def test_adam_matches_reference(
    data: st.DataObject, n: int, step: int, lr: float, beta1: float, beta2: float, eps: float, wd: float,
    decoupled: bool, grad_scale: float,
) -> None:  # fmt: skip
    p, g = data.draw(f32_array(n)), data.draw(f32_array(n))
    m = data.draw(f32_array(n))
    with np.errstate(all="ignore"):
        v = np.abs(data.draw(f32_array(n)))  # a second moment is never negative
    want = ref_adam(p, g, m, v, step, lr, beta1, beta2, eps, wd, decoupled, grad_scale)
    adam_step(p, g, m, v, step, lr, beta1, beta2, eps, wd, decoupled, grad_scale)
    for name, got in (("exp_avg", m), ("exp_avg_sq", v), ("param", p)):
        assert_within(got, want[name], 8 * U * want[f"{name}_scale"] + 8 * TINY, f"adam {name}")


def run_torch_adam(
    p0: np.ndarray, grads: list[np.ndarray], decoupled: bool, **hyper: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """torch.optim.Adam/AdamW (foreach=False) over ``grads``; returns the parameter and its state."""
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([tp], foreach=False, **hyper)
    for g in grads:
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
    return tp, opt.state[tp]


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_matches_torch_over_many_steps(decoupled: bool, wd: float) -> None:
    rng = np.random.default_rng(3)
    n = 4_000
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32) for _ in range(25)]
    hyper = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd}
    tp, state = run_torch_adam(p0, grads, decoupled, **hyper)
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t, g in enumerate(grads, start=1):
        adam_step(p, g, m, v, t, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
    assert int(state["step"]) == len(grads)
    close_to_torch(p, tp, "param")
    close_to_torch(m, state["exp_avg"], "exp_avg")
    close_to_torch(v, state["exp_avg_sq"], "exp_avg_sq")


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_with_rejected_pushes_matches_torch_on_applied_gradients(decoupled: bool) -> None:
    """Pushes from K workers are averaged by ``aggregate``; a poisoned round is rejected, never applied.

    The step counter advances only on applied rounds, so the kernel equals torch run on the applied
    averages alone; advancing it on rejected rounds too (the bug this guards against) is visibly wrong.
    """
    rng = np.random.default_rng(7)
    n, K, rounds = 3_000, 3, 14
    poisoned = {2, 3, 7, 11}
    hyper = {"lr": 5e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.02}
    p0 = rng.standard_normal(n).astype(np.float32)
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    wrong_p, wrong_m, wrong_v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    applied: list[np.ndarray] = []
    steps = 0
    for r in range(rounds):
        pushes = [rng.standard_normal(n).astype(np.float32) for _ in range(K)]
        if r in poisoned:
            pushes[r % K][rng.integers(n)] = [np.nan, np.inf, -np.inf][r % 3]
        avg = np.empty(n, np.float32)
        bad, norm_sq = aggregate(avg, pushes, np.full(K, 1.0 / K))
        if bad:
            assert r in poisoned and not math.isfinite(norm_sq)
            continue
        assert math.isfinite(norm_sq)
        steps += 1
        applied.append(avg.copy())
        adam_step(p, avg, m, v, steps, hyper["lr"], 0.9, 0.99, 1e-8, 0.02, decoupled)
        adam_step(wrong_p, avg, wrong_m, wrong_v, r + 1, hyper["lr"], 0.9, 0.99, 1e-8, 0.02, decoupled)
    assert steps == rounds - len(poisoned)
    tp, state = run_torch_adam(p0, applied, decoupled, **hyper)
    assert int(state["step"]) == steps
    close_to_torch(p, tp, "param")
    close_to_torch(m, state["exp_avg"], "exp_avg")
    close_to_torch(v, state["exp_avg_sq"], "exp_avg_sq")
    with pytest.raises(AssertionError):
        close_to_torch(wrong_p, tp, "param with the step advanced on rejected pushes")


def test_adam_grad_scale_equals_scaling_the_gradient_for_torch() -> None:
    rng = np.random.default_rng(9)
    n = 2_000
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(5)]
    scales = [0.5, 0.25, 1.0, 0.8, 1 / 3]
    tp, state = run_torch_adam(
        p0, [g * F32(s) for g, s in zip(grads, scales, strict=True)], True, lr=1e-3, weight_decay=0.1
    )
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t, (g, s) in enumerate(zip(grads, scales, strict=True), start=1):
        adam_step(p, g, m, v, t, 1e-3, 0.9, 0.999, 1e-8, 0.1, True, s)
    close_to_torch(p, tp, "param")
    close_to_torch(v, state["exp_avg_sq"], "exp_avg_sq")


def test_adam_threaded_range_matches_reference() -> None:
    rng = np.random.default_rng(4)
    n = 2 * PARALLEL_THRESHOLD + 777
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m = rng.standard_normal(n).astype(np.float32) * F32(0.1)
    v = np.abs(rng.standard_normal(n)).astype(np.float32) * F32(0.01)
    for decoupled in (False, True):
        want = ref_adam(p, g, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, decoupled, 0.5)
        pp, mm, vv = p.copy(), m.copy(), v.copy()
        adam_step(pp, g, mm, vv, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, decoupled, 0.5)
        for name, got in (("exp_avg", mm), ("exp_avg_sq", vv), ("param", pp)):
            assert_within(got, want[name], 8 * U * want[f"{name}_scale"], f"adam {name}")


def test_adam_rejects_bad_arguments() -> None:
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="step = 0"):
        adam_step(a, a.copy(), a.copy(), a.copy(), 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="exp_avg_sq has 2 elements"):
        adam_step(a, a.copy(), a.copy(), np.zeros(2, np.float32), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="betas"):
        adam_step(a, a.copy(), a.copy(), a.copy(), 1, 1e-3, 1.0, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="grad_scale"):
        adam_step(a, a.copy(), a.copy(), a.copy(), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, math.inf)
    adam_step(np.zeros(0, np.float32), a[:0], a[:0], a[:0], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)  # empty: no-op
