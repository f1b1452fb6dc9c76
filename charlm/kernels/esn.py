"""Echo State Network reservoir kernels (leaky tanh units, sparse fixed recurrence).

Dimensions: N batch, T time, V vocab, H reservoir units, Z non-zeros of W.

    u_t = Win[:, x_t] + b                                   # the token's input column, (H,)
    h_t = (1 - a) h_{t-1} + a tanh(u_t + W h_{t-1})          # a = leak rate
    y_t = softmax(Wout h_t + bout)                          # the trained readout

W (H, H) is stored as CSR: data (Z,), indices (Z,) column of each value,
indptr (H+1,); row i holds the weights unit i reads. The input columns are
looked up, not multiplied: the caller passes u (T, N, H) = Win^T[x] + b, made
with layers.embedding_forward over the table Win^T (V, H).

hs (T+1, N, H) with hs[0] = h0. Nothing here is trained, so there is no
backward kernel: the readout's gradient is layers.linear_backward's.
"""
import numpy as np
from numba import njit, prange

from .fastmath import act_tanh
from .layers import pick_token
from .parallel import JIT, PJIT, chunk, n_parts


@njit(**JIT)
def csr_matvec(out, data, indices, indptr, x):
    """out = W x for one vector. out, x (H,); W as CSR (data, indices, indptr)."""
    for i in range(out.shape[0]):
        s = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            s += data[p] * x[indices[p]]
        out[i] = s


@njit(**JIT)
def _esn_rows(hs, u, data, indices, indptr, leak, n0, n1):
    """esn_forward for the batch rows [n0, n1). The state is kept transposed
    (H, n1-n0) so the inner loop over a weight's streams is contiguous."""
    T = u.shape[0]
    H = hs.shape[2]
    K = n1 - n0
    hT = np.empty((H, K), dtype=hs.dtype)
    acc = np.empty(K, dtype=hs.dtype)
    one = hs.dtype.type(1.0)
    a = hs.dtype.type(leak)
    for n in range(K):
        for j in range(H):
            hT[j, n] = hs[0, n0 + n, j]
    for t in range(T):
        for i in range(H):
            for n in range(K):
                acc[n] = u[t, n0 + n, i]
            for p in range(indptr[i], indptr[i + 1]):
                w = data[p]
                row = hT[indices[p]]
                for n in range(K):
                    acc[n] += w * row[n]
            for n in range(K):
                hs[t + 1, n0 + n, i] = (one - a) * hs[t, n0 + n, i] + a * act_tanh(acc[n])
        for n in range(K):
            for j in range(H):
                hT[j, n] = hs[t + 1, n0 + n, j]


@njit(**PJIT)
def esn_forward(hs, u, data, indices, indptr, leak, parts=1):
    """Run T reservoir steps. hs (T+1, N, H) with hs[0] = h0, filled; u (T, N, H)
    the looked-up input plus bias; W as CSR; leak the rate a in (0, 1].
    Batch rows are split between `parts` threads (no synchronisation per step)."""
    N = hs.shape[1]
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        _esn_rows(hs, u, data, indices, indptr, leak, n0, n1)


@njit(**JIT)
def _esn_step1(h, tmp, table, bias, data, indices, indptr, leak, token):
    """Feed one token to a single stream: h (H,) updated in place; tmp (H,) scratch."""
    H = h.shape[0]
    one = h.dtype.type(1.0)
    a = h.dtype.type(leak)
    for i in range(H):
        s = table[token, i] + bias[i]
        for p in range(indptr[i], indptr[i + 1]):
            s += data[p] * h[indices[p]]
        tmp[i] = s
    for i in range(H):
        h[i] = (one - a) * h[i] + a * act_tanh(tmp[i])


@njit(**JIT)
def esn_sample(out, lps, h, seen, prime, uniforms, table, bias, data, indices, indptr, leak, WoutT, bout,
               temperature, top_k, top_p, penalty, greedy):
    """Feed prime (P,) ids (P >= 1), then generate K = out.shape[0] tokens into out
    and their ln P into lps (K,) float64 (see sample.stack_sample).

    h (H,) state in/out; seen (V,) uint8 in/out (layers.pick_token); uniforms (K,)
    in [0, 1) drawn by the caller; table (V, H) = Win^T; bias (H,); W as CSR;
    WoutT (H, V) the readout transposed; bout (V,). Afterwards the state has
    consumed prime and out[:-1] (continue with out[-1:]).
    """
    H = h.shape[0]
    V = bout.shape[0]
    tmp = np.empty(H, dtype=h.dtype)
    logits = np.empty(V, dtype=h.dtype)
    adj = np.empty(V, dtype=np.float64)
    scratch = np.empty(V, dtype=np.float64)
    for p in range(prime.shape[0]):
        _esn_step1(h, tmp, table, bias, data, indices, indptr, leak, prime[p])
    K = out.shape[0]
    for k in range(K):
        for v in range(V):
            logits[v] = bout[v]
        for j in range(H):
            hj = h[j]
            row = WoutT[j]
            for v in range(V):
                logits[v] += hj * row[v]
        tok, lp = pick_token(logits, seen, temperature, top_k, top_p, penalty, greedy, uniforms[k], adj, scratch)
        out[k] = tok
        lps[k] = lp
        if k + 1 < K:
            _esn_step1(h, tmp, table, bias, data, indices, indptr, leak, tok)
