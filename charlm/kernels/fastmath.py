"""Fast float32 activations for kernels, exact on float64.

act_tanh / act_sigmoid: a rational tanh (and sigmoid from it) on float32, np.tanh /
the logistic on float64, chosen at compile time by type. exp_shifted: exp of a softmax
row after subtracting its maximum, vectorisable on float32. Both are bounded in
tests/test_kernels.py; gradient checks run float64 and so see the exact functions.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .parallel import JIT

# tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9 (clamped outside), a [4/4] rational
# approximation fitted for charlm by weighted least squares (Lawson iterations) to
# tanh on [0, 9]; max error 2.0e-8 in exact arithmetic, 3.3e-7 evaluated in float32
# (bounded in tests/test_kernels.py). Only mul, add, div, min and max: the loops
# that use it vectorise, which np.tanh / np.exp do not in this Numba build.
_TP1, _TP2, _TP3, _TP4 = 0.1338034372, 0.003494789503, 2.059659844e-05, 1.33387705e-08
_TQ1, _TQ2, _TQ3, _TQ4 = 0.4671366115, 0.02587391023, 0.0003284355597, 7.769750277e-07
TANH_CLAMP = 9.0


def tanh_rational(x):
    """Rational tanh in float32 (see above); pure Python too, for tests."""
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    s = x * x
    p = 1.0 + s * (_TP1 + s * (_TP2 + s * (_TP3 + s * _TP4)))
    q = 1.0 + s * (_TQ1 + s * (_TQ2 + s * (_TQ3 + s * _TQ4)))
    return min(max(x * p / q, -1.0), 1.0)


def act_tanh(x):
    """tanh for kernels: the rational approximation on float32, exact np.tanh on
    float64 (gradient checks stay exact). Chosen at compile time by type."""
    return np.tanh(x)


def act_sigmoid(x):
    """Logistic sigmoid for kernels: 0.5 + 0.5 tanh(x / 2) with the rational tanh
    on float32 (max error half the tanh's), exact on float64."""
    return 1.0 / (1.0 + np.exp(-x))


def _is_f32(x):
    return isinstance(x, types.Float) and x.bitwidth == 32


_F32 = dict(c=np.float32(TANH_CLAMP), one=np.float32(1.0), half=np.float32(0.5),
            p=tuple(np.float32(v) for v in (_TP1, _TP2, _TP3, _TP4)),
            q=tuple(np.float32(v) for v in (_TQ1, _TQ2, _TQ3, _TQ4)))


def _tanh32_impl():
    c, one = _F32["c"], _F32["one"]
    p1, p2, p3, p4 = _F32["p"]
    q1, q2, q3, q4 = _F32["q"]

    def impl(x):
        x = min(max(x, -c), c)
        s = x * x
        p = one + s * (p1 + s * (p2 + s * (p3 + s * p4)))
        q = one + s * (q1 + s * (q2 + s * (q3 + s * q4)))
        return min(max(x * p / q, -one), one)
    return impl


@overload(act_tanh, jit_options={"error_model": "numpy"})
def _act_tanh(x):
    if _is_f32(x):
        return _tanh32_impl()
    return lambda x: np.tanh(x)


@overload(act_sigmoid, jit_options={"error_model": "numpy"})
def _act_sigmoid(x):
    if _is_f32(x):
        half = _F32["half"]
        return lambda x: half * act_tanh(half * x) + half
    return lambda x: 1.0 / (1.0 + np.exp(-x))


# exp(x) in float32 for x <= 0 (softmax rows, after subtracting the maximum): Cody-Waite
# reduction x = k ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor polynomial for e^r, and 2^k
# built from its exponent bits in an int32 buffer viewed as float32. Arguments below -87
# give exp(-87) ~ 1.6e-38 (absolute error under 2e-38). Max relative error 2.5e-7 (bounded
# in tests/test_kernels.py). Written because it vectorises, which np.exp does not in this
# Numba build, and the softmax over V of every position is a visible part of a training step
# (see BENCHMARKS.md).
_E = dict(log2e=np.float32(1.4426950408889634), magic=np.float32(12582912.0),  # 1.5 * 2**23
          ln2hi=np.float32(0.693359375), ln2lo=np.float32(-2.12194440e-4), lo=np.float32(-87.0),
          c=tuple(np.float32(1.0 / f) for f in (2.0, 6.0, 24.0, 120.0, 720.0)), one=np.float32(1.0))


def exp_shifted(out, x, mx, ibuf):
    """out[v] = exp(x[v] - mx) for a row x (V,) with mx >= max(x) (out may be x); returns
    sum(out) as a float64. ibuf (2V,) int32 work space (float32 path). Exact np.exp on
    float64."""
    total = 0.0
    for v in range(x.shape[0]):
        out[v] = np.exp(x[v] - mx)
        total += out[v]
    return total


@overload(exp_shifted, jit_options={"error_model": "numpy"})
def _exp_shifted(out, x, mx, ibuf):
    if not _is_f32(x.dtype):
        def exact(out, x, mx, ibuf):
            total = 0.0
            for v in range(x.shape[0]):
                e = np.exp(x[v] - mx)
                out[v] = e
                total += e
            return total
        return exact
    log2e, magic, ln2hi, ln2lo, lo, one = (_E[k] for k in ("log2e", "magic", "ln2hi", "ln2lo", "lo", "one"))
    c2, c3, c4, c5, c6 = _E["c"]

    def fast(out, x, mx, ibuf):
        # two passes through work space, never reading and writing one array in the same loop:
        # out is often x itself (softmax in place), and LLVM vectorises only provably
        # disjoint reads and writes
        V = x.shape[0]
        bits = ibuf[:V]
        poly = ibuf[V:2 * V].view(np.float32)
        for v in range(V):
            t = x[v] - mx
            t = lo if t < lo else t  # a NaN stays NaN (the divergence guard relies on it)
            kf = (t * log2e + magic) - magic  # round to nearest, in float32
            r = (t - kf * ln2hi) - kf * ln2lo
            poly[v] = one + r * (one + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * c6)))))
            bits[v] = (np.int32(kf) + 127) << 23  # the bits of 2^k
        scale = bits.view(np.float32)
        total = 0.0
        for v in range(V):
            e = poly[v] * scale[v]
            out[v] = e
            total += e
        return total
    return fast


@njit(**JIT)
def exp_shifted_kernel(out, x, mx):
    """exp_shifted on a flat array: exposes both paths to tests."""
    return exp_shifted(out, x, mx, np.empty(2 * x.shape[0], dtype=np.int32))


@njit(**JIT)
def tanh_kernel(out, x):
    """out[k] = act_tanh(x[k]) over a flat array: exposes the fast path to tests."""
    for k in range(x.shape[0]):
        out[k] = act_tanh(x[k])


@njit(**JIT)
def sigmoid_kernel(out, x):
    """out[k] = act_sigmoid(x[k]) over a flat array."""
    for k in range(x.shape[0]):
        out[k] = act_sigmoid(x[k])
