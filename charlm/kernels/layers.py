"""Shared layers: embedding, softmax cross-entropy, linear and projection layers, the sampling draw.

Dimensions: N batch, T time, V vocab, E embedding, D input, K output, H hidden, M = T*N positions.

Every ``*_backward`` kernel ADDS into its ``d*`` arrays; the caller zeroes them.
"""
import numpy as np
from numba import njit, prange

from .fastmath import exp_shifted
from .parallel import JIT, PJIT, chunk, n_parts


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
    partial = np.empty(nc)
    for c in prange(nc):
        m0, m1 = chunk(np.int64(c), nc, M)
        partial[c] = _softmax_rows(probs, logits, targets, m0, m1)
    total = 0.0
    for c in range(nc):  # a loop: partial.sum() would be one more parallel reduction to compile
        total += partial[c]
    return total


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
def sort_inplace(a):
    """Sort the 1-D array a ascending, in place (heapsort: O(n log n), no allocation). np.sort
    would do the same and compiles Numba's quicksort, about 0.9 s of a first `charlm sample`
    (benchmarks/compile_times.py) against 0.1 s for these lines."""
    n = a.shape[0]
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(a, start, n)
    for end in range(n - 1, 0, -1):
        top = a[0]
        a[0] = a[end]
        a[end] = top
        _sift_down(a, 0, end)


@njit(**JIT)
def _sift_down(a, i, n):
    """Restore the max-heap below position i of a[:n] (the children of i are heaps)."""
    x = a[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and a[c + 1] > a[c]:
            c += 1
        if a[c] <= x:
            break
        a[i] = a[c]
        i = c
    a[i] = x


@njit(**JIT)
def draw_token(logits, temperature, top_k, top_p, greedy, u, scratch):
    """Pick a token from one row of logits (V,).

    greedy: argmax. Otherwise softmax(logits / temperature) restricted to the
    top_k largest logits (top_k <= 0 means all), then to the nucleus: the
    fewest most likely tokens whose probability adds up to top_p or more
    (top_p >= 1 means all; tokens tied with the last one kept are kept too),
    and an inverse-CDF draw with the uniform u in [0, 1). scratch (V,) float64
    work space. The order is HF's: temperature, top-k, top-p.
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
        srt = np.empty(V, dtype=np.float64)
        for v in range(V):
            srt[v] = logits[v]
        sort_inplace(srt)
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
    if top_p < 1.0:
        srt = np.empty(V, dtype=np.float64)
        for v in range(V):
            srt[v] = scratch[v]
        sort_inplace(srt)  # ascending: accumulate from the most likely down
        acc = 0.0
        keep = srt[V - 1]
        for i in range(V - 1, -1, -1):
            acc += srt[i]
            keep = srt[i]
            if acc >= top_p * s:
                break
        s = 0.0
        for v in range(V):
            if scratch[v] < keep:
                scratch[v] = 0.0
            s += scratch[v]
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
def token_logprob(logits, tok):
    """ln softmax(logits)[tok] in float64: the model's own probability (temperature 1)."""
    V = logits.shape[0]
    mx = np.float64(logits[0])
    for v in range(1, V):
        if logits[v] > mx:
            mx = np.float64(logits[v])
    s = 0.0
    for v in range(V):
        s += np.exp(np.float64(logits[v]) - mx)
    return (np.float64(logits[tok]) - mx) - np.log(s)


@njit(**JIT)
def pick_token(logits, seen, temperature, top_k, top_p, penalty, greedy, u, adj, scratch):
    """One generation step's choice from logits (V,): HF's repetition penalty on the
    tokens marked in seen (V,) uint8 (a positive logit divided by penalty, a negative
    one multiplied; penalty 1 is off), then draw_token. Marks the token in seen.
    adj, scratch (V,) float64 work space. Returns (token, its ln P under the
    unmodified distribution)."""
    V = logits.shape[0]
    for v in range(V):
        adj[v] = logits[v]
    if penalty != 1.0:
        for v in range(V):
            if seen[v]:
                adj[v] = adj[v] * penalty if adj[v] < 0.0 else adj[v] / penalty
    tok = draw_token(adj, temperature, top_k, top_p, greedy, u, scratch)
    seen[tok] = 1
    return tok, token_logprob(logits, tok)


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
    pb = _zeros_2d(nc, K, db)
    with_dx = dx.shape[0] == M
    with_db = db.shape[0] == K
    for c in prange(nc):
        _linear_backward_part(dx, pW[c], pb[c], dout, x, W, np.int64(c), nc, with_dx, with_db)
    _add_partials(dW, db, pW, pb, with_db)


@njit(**JIT)
def _zeros_2d(n, k, like):
    """np.zeros((n, k)) of like's dtype, outside the parallel kernel (where Numba would turn the
    zeroing into one more parallel loop to compile)."""
    return np.zeros((n, k), dtype=like.dtype)


@njit(**JIT)
def _add_partials(dW, db, pW, pb, with_db):
    """dW (K, D) += sum over parts of pW (nc, K, D); db (K,) += that of pb (nc, K) when with_db."""
    K, D = dW.shape
    for c in range(pW.shape[0]):
        for k in range(K):
            for d in range(D):
                dW[k, d] += pW[c, k, d]
            if with_db:
                db[k] += pb[c, k]


@njit(**JIT)
def _linear_backward_part(dx, pW, pb, dout, x, W, c, nc, with_dx, with_db):
    """Part c of nc of linear_backward: its rows' dW into pW (K, D) (overwritten), db into
    pb (K,) (added), dx rows (added). A call as the whole prange body: Numba's parallel
    transform compiles it several times faster than the same code written inline
    (benchmarks/compile_times.py)."""
    M = x.shape[0]
    K = W.shape[0]
    m0, m1 = chunk(c, nc, M)
    d2 = dout[m0:m1]
    np.dot(d2.T, x[m0:m1], pW)
    if with_db:
        for r in range(m1 - m0):
            for k in range(K):
                pb[k] += d2[r, k]
    if with_dx:
        dxp = dx[m0:m1]  # a name: `dx[m0:m1] += ...` would assign a slice (see parallel.copy_row)
        dxp += np.dot(d2, W)


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
