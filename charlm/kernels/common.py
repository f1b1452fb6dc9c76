"""Shared kernels: linear layer, embedding, softmax cross-entropy, sampling draw.

Dimensions: N batch, T time, V vocab, E embedding, H hidden, M = T*N positions.

Every ``*_backward`` kernel ADDS into its ``d*`` arrays; the caller zeroes them.
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

JIT = dict(cache=True, error_model="numpy", nogil=True)

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
# in tests/test_kernels.py). Vectorises, which np.exp does not in this Numba build: the
# softmax of a training step went from 0.46 to 0.20 ms for 2048 x 65.
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


# ------------------------------------------------------------ parallel building blocks
# Two cores are used by splitting work between threads (numba prange) with each
# BLAS call single-threaded, rather than letting BLAS split every small per-step
# product: GRU/RNN recurrences are split by batch rows (no synchronisation inside
# the time loop), the LSTM's by hidden units (a barrier per step, larger products:
# see lstm.py), whole-window products by time or rows. The caller keeps BLAS at one thread
# and passes parts = the number of threads (kernels read no globals: Numba's
# get_num_threads() would also make them uncacheable).
PJIT = dict(JIT, parallel=True)


@njit(**JIT)
def chunk(c, nc, n):
    """Bounds [lo, hi) of part c of nc near-equal parts of range(n)."""
    return c * n // nc, (c + 1) * n // nc


@njit(**JIT)
def n_parts(parts, n):
    """How many parts to split n rows into: `parts` (one per thread), at most n."""
    return max(1, min(parts, n))


@njit(**JIT)
def embedding_forward(out, ids, table):
    """out[m] = table[ids[m]]. out (M, E), ids (M,) ints, table (V, E)."""
    M, E = out.shape
    for m in range(M):
        row = ids[m]
        for e in range(E):
            out[m, e] = table[row, e]


@njit(**JIT)
def embedding_backward(dtable, dout, ids):
    """ADDS dout rows into dtable (V, E) at ids (M,). dout (M, E)."""
    M, E = dout.shape
    for m in range(M):
        row = ids[m]
        for e in range(E):
            dtable[row, e] += dout[m, e]


@njit(**JIT)
def _softmax_rows(probs, logits, targets, m0, m1):
    """softmax_xent_forward on rows [m0, m1); returns their summed -log p."""
    V = logits.shape[1]
    ibuf = np.empty(2 * V, dtype=np.int32)
    total = 0.0
    for m in range(m0, m1):
        mx = logits[m, 0]
        for v in range(1, V):
            if logits[m, v] > mx:
                mx = logits[m, v]
        t = targets[m]
        target_logit = logits[m, t] if t >= 0 else mx
        s = exp_shifted(probs[m], logits[m], mx, ibuf)
        inv = 1.0 / s
        for v in range(V):
            probs[m, v] *= inv
        if t >= 0:
            # -log p = log(sum) - (logit - max): exact even when p underflows
            total += np.log(s) - (target_logit - mx)
    return total


@njit(**PJIT)
def softmax_xent_forward(probs, logits, targets, parts=1):
    """Row-wise softmax of logits into probs; returns sum_m -log probs[m, targets[m]].

    probs (M, V) may be the same array as logits (M, V); targets (M,) ints.
    The sum is accumulated in float64. Rows whose target is negative are
    skipped in the sum (their probabilities are still computed). Rows are
    split between `parts` threads.
    """
    M = logits.shape[0]
    nc = n_parts(parts, M)
    partial = np.zeros(nc)
    for c in prange(nc):
        m0, m1 = chunk(c, nc, M)
        partial[c] = _softmax_rows(probs, logits, targets, m0, m1)
    return partial.sum()


@njit(**PJIT)
def log_softmax_gather(out, logits, targets, parts=1):
    """out[m] = log softmax(logits[m])[targets[m]] (float64 out (M,)); logits (M, V).
    A negative target gives out[m] = 0 (padding). Rows split between `parts` threads."""
    M, V = logits.shape
    nc = n_parts(parts, M)
    for c in prange(nc):
        m0, m1 = chunk(c, nc, M)
        for m in range(m0, m1):
            t = targets[m]
            if t < 0:
                out[m] = 0.0
                continue
            mx = np.float64(logits[m, 0])
            for v in range(1, V):
                if logits[m, v] > mx:
                    mx = np.float64(logits[m, v])
            s = 0.0
            for v in range(V):
                s += np.exp(np.float64(logits[m, v]) - mx)
            out[m] = (np.float64(logits[m, t]) - mx) - np.log(s)


@njit(**PJIT)
def softmax_xent_backward(dlogits, probs, targets, scale, parts=1):
    """dlogits = scale * (probs - onehot(targets)). Overwrites dlogits (M, V).

    dlogits may be the same array as probs (M, V). Rows with a negative target
    get zero gradient. Rows split between `parts` threads.
    """
    M, V = probs.shape
    nc = n_parts(parts, M)
    for c in prange(nc):
        m0, m1 = chunk(c, nc, M)
        for m in range(m0, m1):
            t = targets[m]
            if t < 0:
                for v in range(V):
                    dlogits[m, v] = 0.0
                continue
            for v in range(V):
                dlogits[m, v] = probs[m, v] * scale
            dlogits[m, t] -= scale


@njit(**JIT)
def draw_token(logits, temperature, top_k, greedy, u, scratch):
    """Pick a token from one row of logits (V,).

    greedy: argmax. Otherwise softmax(logits / temperature) restricted to the
    top_k largest logits (top_k <= 0 means all) and inverse-CDF draw with the
    uniform u in [0, 1). scratch (V,) float64 work space.
    """
    V = logits.shape[0]
    best = 0
    for v in range(1, V):
        if logits[v] > logits[best]:
            best = v
    if greedy:
        return best
    cutoff = -np.inf
    if top_k > 0 and top_k < V:
        # k-th largest logit: partial selection on a copy
        for v in range(V):
            scratch[v] = logits[v]
        srt = np.sort(scratch)
        cutoff = srt[V - top_k]
    mx = np.float64(logits[best])
    s = 0.0
    for v in range(V):
        if logits[v] >= cutoff:
            e = np.exp((np.float64(logits[v]) - mx) / temperature)
        else:
            e = 0.0
        scratch[v] = e
        s += e
    target = u * s
    acc = 0.0
    last = best
    for v in range(V):
        if scratch[v] > 0.0:
            acc += scratch[v]
            last = v
            if acc > target:
                return v
    return last


@njit(**JIT)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, gscale):
    """One fused Adam step on flat arrays p, g, m, v (K,), in place.

    g is multiplied by gscale first (gradient clipping); bc1 = 1 - beta1**t,
    bc2 = 1 - beta2**t are the bias corrections.
    """
    step = lr / bc1
    for k in range(p.shape[0]):
        gk = g[k] * gscale
        mk = beta1 * m[k] + (1.0 - beta1) * gk
        vk = beta2 * v[k] + (1.0 - beta2) * gk * gk
        m[k] = mk
        v[k] = vk
        p[k] -= step * mk / (np.sqrt(vk / bc2) + eps)


@njit(**JIT)
def sum_squares(a):
    """sum(a**2) of a flat array (K,), accumulated in float64."""
    s = 0.0
    for k in range(a.shape[0]):
        s += np.float64(a[k]) * a[k]
    return s


@njit(**PJIT)
def linear_forward(out, x, W, b, parts=1):
    """out = x @ W.T + b, rows split between `parts` threads.

    out (M, K), x (M, D), W (K, D), b (K,). Arrays C-contiguous.
    """
    M, D = x.shape
    K = W.shape[0]
    nc = n_parts(parts, M)
    for c in prange(nc):
        m0, m1 = chunk(c, nc, M)
        o = out[m0:m1]
        np.dot(x[m0:m1], W.T, o)
        for m in range(m1 - m0):
            for k in range(K):
                o[m, k] += b[k]


@njit(**PJIT)
def linear_backward(dx, dW, db, dout, x, W, parts=1):
    """Gradients of out = x @ W.T + b. ADDS into dW (K, D) and, unless it has
    shape (0,), db (K,), and unless dx has shape (0, 0), dx (M, D). dout (M, K),
    x (M, D), W (K, D).

    Rows are split between `parts` threads; each sums its rows into its own
    partial dW and db, added together at the end.
    """
    M, D = x.shape
    K = W.shape[0]
    nc = n_parts(parts, M)
    pW = np.empty((nc, K, D), dtype=dW.dtype)  # every part overwrites its own (np.dot out=)
    pb = np.zeros((nc, K), dtype=db.dtype)
    with_dx = dx.shape[0] == M
    with_db = db.shape[0] == K
    for c in prange(nc):
        m0, m1 = chunk(c, nc, M)
        d2 = dout[m0:m1]
        np.dot(d2.T, x[m0:m1], pW[c])
        if with_db:
            for r in range(m1 - m0):
                for k in range(K):
                    pb[c, k] += d2[r, k]
        if with_dx:
            dx[m0:m1] += np.dot(d2, W)
    for c in range(nc):
        dW += pW[c]
        if with_db:
            db += pb[c]


@njit(**PJIT)
def proj_forward(out, x, W, parts=1):
    """out = x @ W.T for a whole window, split by time. out (T, N, K), x (T, N, D), W (K, D)."""
    T, N, D = x.shape
    K = W.shape[0]
    nc = n_parts(parts, T)
    for c in prange(nc):
        t0, t1 = chunk(c, nc, T)
        np.dot(x[t0:t1].reshape((t1 - t0) * N, D), W.T, out[t0:t1].reshape((t1 - t0) * N, K))


@njit(**JIT)
def proj_backward(dx, dW, db, dout, x, W, parts=1):
    """Gradients of out = x @ W.T + b over a window (T, N, .): linear_backward on
    the (T*N)-row views. ADDS into dW (K, D), db (K,) unless it has shape (0,),
    and, unless dx has shape (0, 0, 0), dx (T, N, D). dout (T, N, K), x (T, N, D),
    W (K, D)."""
    T, N, D = x.shape
    K = W.shape[0]
    dx2 = dx.reshape(T * N, D) if dx.shape[0] == T else dx.reshape(0, 0)
    linear_backward(dx2, dW, db, dout.reshape(T * N, K), x.reshape(T * N, D), W, parts)
