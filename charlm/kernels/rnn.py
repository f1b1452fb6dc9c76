"""Vanilla (Elman) RNN kernels, torch.nn.RNN with nonlinearity='tanh'.

Dimensions: N batch, T time, D layer input, H hidden, G = 1.

    s_t = tanh(x_t W_ih^T + b_ih + s_{t-1} W_hh^T + b_hh)

(the lecture's s_t = tanh(U x_t + W s_{t-1}) with U = W_ih, W = W_hh, plus biases).
Parameters: W_ih (H, D), W_hh (H, H), b_ih (H,), b_hh (H,).

hs (T+1, N, H) with hs[0] = h0. acts (T, N, H) is unused by the forward pass
(the activations are hs itself) but kept for a common signature; cs unused.
"""
import numpy as np
from numba import njit, prange

from .fastmath import act_tanh
from .layers import proj_backward, proj_forward
from .parallel import JIT, PJIT, chunk, gate_product, n_parts, state_T, transpose_into, unit_parts


@njit(**JIT)
def rnn_step_forward(hout, cout, act, x, h, c, Wih, Whh, bih, bhh):
    """One step. hout (N, H); act (N, H) scratch; x (N, D); h (N, H); c, cout unused."""
    N, H = hout.shape
    np.dot(x, Wih.T, act)
    act += np.dot(h, Whh.T)  # (N, H)
    for n in range(N):
        for j in range(H):
            hout[n, j] = act_tanh(act[n, j] + bih[j] + bhh[j])


@njit(**PJIT)
def _rnn_recur_by_units(hs, acts, Whh, bias, nc):
    """rnn_forward's recurrence split by hidden units into nc parts, a barrier per
    step, as lstm._lstm_recur_by_units."""
    T, N, H = acts.shape
    wmax = (H + nc - 1) // nc
    recT = np.empty((nc, wmax * N), dtype=acts.dtype)
    hT = state_T(hs[0])
    for t in range(T):
        for c in prange(nc):
            j0, j1 = chunk(c, nc, H)
            w = j1 - j0
            rT = gate_product(Whh, 1, j0, j1, hT[t % 2], recT[c], t)  # (w, N)
            for n in range(N):
                a = acts[t, n, j0:j1]
                ho = hs[t + 1, n, j0:j1]
                b = bias[j0:j1]
                for j in range(w):
                    ho[j] = act_tanh(a[j] + rT[j, n] + b[j])
            transpose_into(hT[(t + 1) % 2, j0:j1], hs[t + 1, :, j0:j1])


@njit(**PJIT)
def rnn_forward(hs, cs, acts, x, Wih, Whh, bih, bhh, parts=1):
    """Run T steps. hs (T+1, N, H) with hs[0] = h0; acts (T, N, H) work space;
    x (T, N, D); cs unused. Input projection by time; the recurrence by batch
    rows, each thread running the whole time loop on its rows, or, with fewer
    rows than threads (scoring one text), by hidden units (_rnn_recur_by_units)."""
    T, N, D = x.shape
    H = hs.shape[2]
    proj_forward(acts, x, Wih, parts)
    bias = bih + bhh
    nu = unit_parts(parts, H)
    if N < parts and nu > 1:
        _rnn_recur_by_units(hs, acts, Whh, bias, nu)
        return
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        rec = np.empty((n1 - n0, H), dtype=acts.dtype)
        for t in range(T):
            np.dot(hs[t, n0:n1], Whh.T, rec)  # (n, H)
            a = acts[t, n0:n1]
            ho = hs[t + 1, n0:n1]
            for n in range(n1 - n0):
                for j in range(H):
                    ho[n, j] = act_tanh(a[n, j] + rec[n, j] + bias[j])


@njit(**PJIT)
def rnn_backward(dx, dWih, dWhh, dbih, dbhh, dh0, dc0, dacts, dacts_h,
                 dhs, hs, cs, acts, x, Wih, Whh, parts=1):
    """Backpropagation through the T steps of rnn_forward.

    ADDS into dx (T, N, D), dWih (H, D), dWhh (H, H), dbih, dbhh (H,),
    dh0 (N, H); the caller zeroes them. dc0, dacts_h untouched. dacts
    (T, N, H) work space. dhs (T, N, H) is dL/dh_t from above for t = 1..T.
    dx of shape (0, 0, 0) skips it.
    """
    T, N, D = x.shape
    H = hs.shape[2]
    one = hs.dtype.type(1.0)
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        dh = np.zeros((n1 - n0, H), dtype=hs.dtype)
        for t in range(T - 1, -1, -1):
            da = dacts[t, n0:n1]
            ho = hs[t + 1, n0:n1]
            for n in range(n1 - n0):
                for j in range(H):
                    h = ho[n, j]
                    da[n, j] = (dhs[t, n0 + n, j] + dh[n, j]) * (one - h * h)
            np.dot(da, Whh, dh)  # (n, H)
        dh0[n0:n1] += dh
    # b_ih and b_hh get the same gradient (both add to the same pre-activations): summed once
    db = np.zeros_like(dbih)
    proj_backward(dx, dWih, db, dacts, x, Wih, parts)
    proj_backward(dx[:0], dWhh, dbhh[:0], dacts, hs[:T], Whh, parts)
    dbih += db
    dbhh += db
