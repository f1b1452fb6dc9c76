"""Adaptive softmax (Grave et al. 2017): the exact kernels.

Dimensions: M rows (positions), H hidden, V vocab, K tail clusters, S = c_0 + K head
outputs, P a tail's projection (hsz), O the outputs of one softmax (S for the head, a
cluster's size for a tail), n the rows one softmax sees (M for the head, a tail's rows),
D its input width (H for the head, P for a tail), nc parts (threads), w a part's columns,
wmax the widest part's.

Layout, as torch.nn.AdaptiveLogSoftmaxWithLoss(head_bias=True) lays it out, for cutoffs
c_0 < ... < c_{K-1} < V and c_K = V (word ids sorted by frequency):

    head      W (S, H), b (S,)   rows: the shortlist words 0 .. c_0 - 1, then one per tail cluster
    tail i    W0 (P_i, H), W1 (O_i, P_i), no bias; P_i = max(1, int(H // div ** (i + 1))),
              O_i = c_{i+1} - c_i

    ln P(w) = lsm(head)[w]                                   for w < c_0
    ln P(w) = lsm(head)[c_0 + i] + lsm(W1 W0 h)[w - c_i]     for c_i <= w < c_{i+1}

with lsm the log-softmax. A training step groups the rows by the cluster of their target
(cluster_sort), computes the head on every row and each tail on its own rows only
(tail_project_forward, then the same log-softmax layer as the head).

The log-softmax layer (lsm_forward / lsm_backward) splits its output columns between the
threads: part c owns the columns [k0, k1) of W for all n rows, so every product is one
large GEMM per thread, and the only sums across threads are per row (the log-sum-exp,
from each part's maximum and sum of exponentials) and the (n, D) input gradient. Each
layer is one parallel region forward and one backward. lsm_forward_1 / lsm_backward_1
(and lsm_rows_1 beside lsm_rows, which gives every log-probability) do the same work on
the calling thread with no parallel region, for layers too small to repay one: waking
the other threads and waiting for the slowest costs tens of microseconds on an idle
machine and milliseconds on a busy one. Sums of exponentials, log-sum-exps and losses
are float64; float32 exponentials are fastmath.exp_shifted's.

Every ``*_backward`` kernel ADDS into its ``d*`` arrays; the caller zeroes them.
"""
import numpy as np
from numba import njit, prange

from .fastmath import exp_shifted
from .parallel import JIT, PJIT, chunk, n_parts


@njit(**JIT)
def cluster_sort(hcol, order, tloc, starts, targets, cuts):
    """Group the rows by the cluster of their target: a stable counting sort.

    targets (M,) ints, each below V (negative: padding); cuts (K+1,) int64 =
    [c_0, c_1, ..., c_{K-1}, V]. Writes hcol (M,) int64, the head column of each
    row's target (the word itself below c_0, c_0 + i for a word of tail i, -1 for
    padding); starts (K+1,) int64 and order (M,) int64: tail i's rows are
    order[starts[i]:starts[i+1]], ascending; tloc (M,) int64 aligned with order:
    the word's column in its tail (target - c_i). Returns the number of tail rows.
    """
    M = targets.shape[0]
    K = cuts.shape[0] - 1
    c0 = cuts[0]
    counts = np.zeros(K, dtype=np.int64)
    for m in range(M):
        t = np.int64(targets[m])
        if t < 0:
            hcol[m] = -1
        elif t < c0:
            hcol[m] = t
        else:
            i = 0
            while i < K - 1 and t >= cuts[i + 1]:
                i += 1
            hcol[m] = c0 + i
            counts[i] += 1
    starts[0] = 0
    for i in range(K):
        starts[i + 1] = starts[i] + counts[i]
    fill = starts[:K].copy()
    for m in range(M):
        h = hcol[m]
        if h >= c0:
            i = h - c0
            j = fill[i]
            order[j] = m
            tloc[j] = np.int64(targets[m]) - cuts[i]
            fill[i] = j + 1
    return starts[K]


@njit(**JIT)
def row_max(row):
    """The largest entry of a row (w,), w >= 1: eight running maxima, so that the comparisons do
    not wait on each other (one chain runs at the latency of a compare: several times slower)."""
    w = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    w8 = w - w % 8
    for k in range(0, w8, 8):
        m0 = max(m0, row[k])
        m1 = max(m1, row[k + 1])
        m2 = max(m2, row[k + 2])
        m3 = max(m3, row[k + 3])
        m4 = max(m4, row[k + 4])
        m5 = max(m5, row[k + 5])
        m6 = max(m6, row[k + 6])
        m7 = max(m7, row[k + 7])
    for k in range(w8, w):
        m0 = max(m0, row[k])
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(**JIT)
def _lsm_part_forward(tl, L, pmax, psum, X, W, b, tcol, c, nc):
    """Part c of nc of lsm_forward: its columns' logits, their maximum and sum of exponentials
    per row, and the target logits that fall in its columns into tl (n,) float64."""
    n = X.shape[0]
    O = W.shape[0]
    wmax = (O + nc - 1) // nc
    k0, k1 = chunk(c, nc, O)
    w = k1 - k0
    with_b = b.shape[0] == O
    Lc = L[c * n * wmax:c * n * wmax + n * w].reshape(n, w)  # (n, w)
    np.dot(X, W[k0:k1].T, Lc)
    ibuf = np.empty(2 * w, dtype=np.int32)
    bc = b[k0:k1] if with_b else b
    for m in range(n):
        row = Lc[m]
        if with_b:
            for k in range(w):
                row[k] += bc[k]
        t = tcol[m]
        if t >= k0 and t < k1:
            tl[m] = row[t - k0]
        mx = row_max(row)
        pmax[c, m] = mx
        psum[c, m] = exp_shifted(row, row, mx, ibuf)


@njit(**JIT)
def _lsm_combine(lp, lse, tl, pmax, psum, tcol, nc):
    """Each row's log-sum-exp from its parts' maxima and sums, and its target's log-probability."""
    n = lp.shape[0]
    for m in range(n):
        mx = pmax[0, m]
        for c in range(1, nc):
            mx = max(mx, pmax[c, m])
        s = 0.0
        for c in range(nc):
            s += psum[c, m] * np.exp(pmax[c, m] - mx)
        lse[m] = mx + np.log(s)
        lp[m] = tl[m] - lse[m] if tcol[m] >= 0 else 0.0


@njit(**PJIT)
def lsm_forward(lp, L, pmax, psum, lse, X, W, b, tcol, parts=1):
    """Log-softmax of the linear layer X @ W.T + b, read at one column per row.

    lp (n,) float64 out: ln softmax(X W^T + b)[m, tcol[m]], 0.0 where tcol[m] < 0.
    lse (n,) float64 out: each row's log-sum-exp. X (n, D), W (O, D), b (O,) or
    (0,) for none, tcol (n,) int64 (-1: no target).
    Work space kept for lsm_backward: L (nc * n * wmax,) or longer, pmax, psum
    (nc, n) float64, with nc = n_parts(parts, O) and wmax = ceil(O / nc). Part c
    owns columns [k0, k1) (chunk), one thread each, and leaves in L[c n wmax:][:n w]
    the (n, w) matrix exp(logit - pmax[c, m]); psum[c, m] is that row's sum.
    """
    n = X.shape[0]
    nc = n_parts(parts, W.shape[0])
    tl = np.zeros(n)  # target logits, float64
    for c in prange(nc):
        _lsm_part_forward(tl, L, pmax, psum, X, W, b, tcol, c, nc)
    _lsm_combine(lp, lse, tl, pmax, psum, tcol, nc)


@njit(**JIT)
def lsm_forward_1(lp, L, pmax, psum, lse, X, W, b, tcol):
    """lsm_forward in one part on the calling thread (no parallel region: for small layers)."""
    tl = np.zeros(X.shape[0])
    _lsm_part_forward(tl, L, pmax, psum, X, W, b, tcol, 0, 1)
    _lsm_combine(lp, lse, tl, pmax, psum, tcol, 1)


@njit(**JIT)
def _lsm_part_backward(dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, scale, c, nc, with_dx):
    """Part c of nc of lsm_backward: its columns' logit gradients, dW rows and db entries
    (ADDED), and its partial input gradient into dXp[c] (overwritten) if with_dx."""
    n, D = X.shape
    O = W.shape[0]
    wmax = (O + nc - 1) // nc
    k0, k1 = chunk(c, nc, O)
    w = k1 - k0
    Lc = L[c * n * wmax:c * n * wmax + n * w].reshape(n, w)  # (n, w)
    f = np.empty(n, dtype=L.dtype)  # scale * exp(pmax - lse): exp(logit - pmax) -> scale * softmax
    for m in range(n):
        f[m] = scale * np.exp(pmax[c, m] - lse[m]) if tcol[m] >= 0 else 0.0
    for m in range(n):
        row = Lc[m]
        fm = f[m]
        for k in range(w):
            row[k] *= fm
        t = tcol[m]
        if t >= k0 and t < k1:
            row[t - k0] -= scale
    if with_dx:
        np.dot(Lc, W[k0:k1], dXp[c])  # (n, D)
    g = dWp[c * wmax * D:c * wmax * D + w * D].reshape(w, D)
    np.dot(Lc.T, X, g)  # (w, D)
    dWc = dW[k0:k1]
    for k in range(w):
        gk = g[k]
        dk = dWc[k]
        for d in range(D):
            dk[d] += gk[d]
    if db.shape[0] == O:
        sb = np.zeros(w)  # float64 column sums
        for m in range(n):
            row = Lc[m]
            for k in range(w):
                sb[k] += row[k]
        for k in range(w):
            db[k0 + k] += sb[k]


@njit(**JIT)
def _add_parts(dX, dXp, nc):
    """dX (n, D) += sum over c < nc of dXp[c]."""
    n, D = dX.shape
    for c in range(nc):
        for m in range(n):
            src = dXp[c, m]
            dst = dX[m]
            for d in range(D):
                dst[d] += src[d]


@njit(**PJIT)
def lsm_backward(dX, dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, scale, parts=1):
    """Gradient of -sum_m lp[m] (the rows with tcol[m] >= 0) after lsm_forward, times scale.

    ADDS into dW (O, D) and, unless they have shape (0, 0) and (0,), into dX
    (n, D) and db (O,). Rows with tcol[m] < 0 give nothing. L, pmax, lse as
    lsm_forward left them (L is overwritten by the logits' gradient); X (n, D),
    W (O, D), tcol (n,) int64; parts as given to lsm_forward. Work space: dXp
    (nc, n, D), dWp (nc * wmax * D,) or longer (nc, wmax as in lsm_forward).
    Part c (one thread each) computes its columns' dW rows and a partial dX; the
    partials are added up at the end on the calling thread (a few adds per input
    element: cheaper than a second parallel region).
    """
    n = X.shape[0]
    nc = n_parts(parts, W.shape[0])
    with_dx = dX.shape[0] == n
    for c in prange(nc):
        _lsm_part_backward(dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, scale, c, nc, with_dx)
    if with_dx:
        _add_parts(dX, dXp, nc)


@njit(**JIT)
def lsm_backward_1(dX, dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, scale):
    """lsm_backward after lsm_forward_1, on the calling thread. dXp (1, n, D)."""
    with_dx = dX.shape[0] == X.shape[0]
    _lsm_part_backward(dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, scale, 0, 1, with_dx)
    if with_dx:
        _add_parts(dX, dXp, 1)


@njit(**JIT)
def tail_project_forward(Z, X, top, rows, W0):
    """A tail's rows and their projection: X[j] = top[rows[j]], Z = X @ W0.T.

    Z (n, P), X (n, H) out; top (M, H), rows (n,) int64, W0 (P, H).
    """
    n, H = X.shape
    for j in range(n):
        src = top[rows[j]]
        dst = X[j]
        for h in range(H):
            dst[h] = src[h]
    np.dot(X, W0.T, Z)


@njit(**JIT)
def tail_project_backward(dtop, dW0, dX, dZ, X, W0, rows):
    """Gradients of tail_project_forward. ADDS dZ.T @ X into dW0 (P, H) and, unless
    dtop has shape (0, 0), each row of dZ @ W0 into dtop (M, H) at rows (n,) int64
    (distinct). dX (n, H) work space; dZ (n, P), X (n, H), W0 (P, H)."""
    n, H = X.shape
    P = W0.shape[0]
    g = np.dot(dZ.T, X)  # (P, H)
    for p in range(P):
        for h in range(H):
            dW0[p, h] += g[p, h]
    if dtop.shape[0] == 0:
        return
    np.dot(dZ, W0, dX)  # (n, H)
    for j in range(n):
        src = dX[j]
        dst = dtop[rows[j]]
        for h in range(H):
            dst[h] += src[h]


@njit(**JIT)
def scatter_add(out, rows, vals):
    """out[rows[j]] += vals[j]. out (M,), rows (n,) int64, vals (n,)."""
    for j in range(rows.shape[0]):
        out[rows[j]] += vals[j]


@njit(**JIT)
def _lsm_rows_part(out, rest, X, W, b, add, m0, m1):
    """lsm_rows on rows [m0, m1), in blocks of rows of at most 2**18 logits."""
    O = W.shape[0]
    Oa = O - rest.shape[1]
    with_b = b.shape[0] == O
    R = max(1, min(m1 - m0, (1 << 18) // O))  # rows per block
    buf = np.empty((R, O), dtype=X.dtype)
    e = np.empty(O, dtype=X.dtype)
    ibuf = np.empty(2 * O, dtype=np.int32)
    for r0 in range(m0, m1, R):
        r1 = min(r0 + R, m1)
        blk = buf[:r1 - r0]
        np.dot(X[r0:r1], W.T, blk)  # (r1 - r0, O)
        for j in range(r1 - r0):
            row = blk[j]
            if with_b:
                for k in range(O):
                    row[k] += b[k]
            mx = row_max(row)
            s = exp_shifted(e, row, mx, ibuf)
            off = np.float64(mx) + np.log(s) - add[r0 + j]  # lse - add
            m = r0 + j
            for k in range(Oa):
                out[m, k] = np.float64(row[k]) - off
            for k in range(Oa, O):
                rest[m, k - Oa] = np.float64(row[k]) - off


@njit(**PJIT)
def lsm_rows(out, rest, X, W, b, add, parts=1):
    """Every log-probability of a softmax layer, plus a per-row offset:
    lsm(X @ W.T + b)[m, k] + add[m] into out[m, k] for the first Oa = O - rest.shape[1]
    columns and into rest[m, k - Oa] for the others.

    out (n, Oa) (any layout, the dtype of X or float64), rest (n, O - Oa) float64,
    X (n, D), W (O, D), b (O,) or (0,) for none, add (n,) float64. Rows are split
    between `parts` threads.
    """
    n = X.shape[0]
    nc = n_parts(parts, n)
    for c in prange(nc):
        m0, m1 = chunk(c, nc, n)
        _lsm_rows_part(out, rest, X, W, b, add, m0, m1)


@njit(**JIT)
def lsm_rows_1(out, rest, X, W, b, add):
    """lsm_rows on the calling thread (no parallel region: for a few rows)."""
    _lsm_rows_part(out, rest, X, W, b, add, 0, X.shape[0])
