"""LSTM kernels (PyTorch's nn.LSTM equations, gate order [i, f, g, o]).

Dimensions: N batch, T time, D layer input, H hidden, G = 4 gates.

    a = x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh            # (N, 4H)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

Parameters: W_ih (4H, D), W_hh (4H, H), b_ih (4H,), b_hh (4H,): rows are the
blocks [i | f | g | o] of H rows each, exactly as torch.nn.LSTM stores them.

Histories have T+1 rows: hs[0] = h0 and cs[0] = c0 on entry, so the time loop
never special-cases t = 0. acts (T, N, 4H) keeps the activated gates.
"""
import numpy as np
from numba import njit, prange

from .common import JIT, PJIT, act_sigmoid, act_tanh, chunk, n_parts, proj_backward, proj_forward


@njit(**JIT)
def _lstm_cell(hout, cout, act, a, c, H, j0, j1):
    """Activate pre-activations a (N, 4H) in place into act; write h, c (N, H),
    for the hidden units j0 <= j < j1."""
    N = a.shape[0]
    for n in range(N):
        for j in range(j0, j1):
            i = act_sigmoid(a[n, j])
            f = act_sigmoid(a[n, H + j])
            g = act_tanh(a[n, 2 * H + j])
            o = act_sigmoid(a[n, 3 * H + j])
            cn = f * c[n, j] + i * g
            act[n, j] = i
            act[n, H + j] = f
            act[n, 2 * H + j] = g
            act[n, 3 * H + j] = o
            cout[n, j] = cn
            hout[n, j] = o * act_tanh(cn)


@njit(**JIT)
def lstm_step_forward(hout, cout, act, x, h, c, Wih, Whh, bih, bhh):
    """One time step. hout, cout (N, H); act (N, 4H) scratch/gates out;
    x (N, D); h, c (N, H); Wih (4H, D); Whh (4H, H); bih, bhh (4H,)."""
    H = h.shape[1]
    np.dot(x, Wih.T, act)
    act += np.dot(h, Whh.T)  # (N, 4H)
    act += bih
    act += bhh
    _lstm_cell(hout, cout, act, act, c, H, 0, H)


@njit(**PJIT)
def _lstm_recur_by_units(hs, cs, acts, Whh, bias, nc):
    """The recurrence of lstm_forward for fewer streams than threads (scoring one
    text): each step's product and cell are split by hidden units, nc parts,
    with a barrier at the end of every step (the next step needs all of h)."""
    T, N, _ = acts.shape
    H = hs.shape[2]
    for t in range(T):
        for c in prange(nc):
            j0, j1 = chunk(c, nc, H)
            a = acts[t]
            for g in range(4):
                r0 = g * H + j0
                blk = np.dot(hs[t], Whh[r0:g * H + j1].T)  # (N, j1 - j0)
                for n in range(N):
                    for j in range(j1 - j0):
                        a[n, r0 + j] += blk[n, j] + bias[r0 + j]
            _lstm_cell(hs[t + 1], cs[t + 1], a, a, cs[t], H, j0, j1)


@njit(**PJIT)
def lstm_forward(hs, cs, acts, x, Wih, Whh, bih, bhh, parts=1):
    """Run T steps. hs, cs (T+1, N, H) with hs[0], cs[0] the initial state;
    acts (T, N, 4H) out; x (T, N, D); parts: how many threads share the work.

    The input projection of the whole window is one product (split by time);
    the recurrence is split by batch rows, each thread running the whole time
    loop on its rows, so threads never wait for each other inside the loop.
    With fewer rows than threads it is split by hidden units instead.
    """
    T, N, D = x.shape
    H = hs.shape[2]
    G4 = 4 * H
    proj_forward(acts, x, Wih, parts)
    bias = bih + bhh
    if N < parts:
        _lstm_recur_by_units(hs, cs, acts, Whh, bias, min(parts, H))
        return
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        rec = np.empty((n1 - n0, G4), dtype=acts.dtype)
        for t in range(T):
            np.dot(hs[t, n0:n1], Whh.T, rec)  # (n, 4H)
            a = acts[t, n0:n1]
            for n in range(n1 - n0):
                for k in range(G4):
                    a[n, k] += rec[n, k] + bias[k]
            _lstm_cell(hs[t + 1, n0:n1], cs[t + 1, n0:n1], a, a, cs[t, n0:n1], H, 0, H)


@njit(**PJIT)
def lstm_backward(dx, dWih, dWhh, dbih, dbhh, dh0, dc0, dacts, dacts_h,
                  dhs, hs, cs, acts, x, Wih, Whh, parts=1):
    """Backpropagation through the T steps of lstm_forward.

    ADDS into dx (T, N, D), dWih (4H, D), dWhh (4H, H), dbih, dbhh (4H,),
    dh0, dc0 (N, H); the caller zeroes them. dacts (T, N, 4H) is work space
    (pre-activation gradients); dacts_h is unused (same signature as gru).
    dhs (T, N, H) is dL/dh_t from above for t = 1..T (gradient beyond the
    window is zero: truncated BPTT). dx of shape (0, 0, 0) skips it.
    """
    T, N, D = x.shape
    H = hs.shape[2]
    one = hs.dtype.type(1.0)
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        nr = n1 - n0
        dh = np.zeros((nr, H), dtype=hs.dtype)
        dc = np.zeros((nr, H), dtype=hs.dtype)
        for t in range(T - 1, -1, -1):
            act = acts[t, n0:n1]
            da = dacts[t, n0:n1]
            for n in range(nr):
                for j in range(H):
                    i = act[n, j]
                    f = act[n, H + j]
                    g = act[n, 2 * H + j]
                    o = act[n, 3 * H + j]
                    tc = act_tanh(cs[t + 1, n0 + n, j])
                    dht = dhs[t, n0 + n, j] + dh[n, j]
                    dct = dc[n, j] + dht * o * (one - tc * tc)
                    da[n, j] = dct * g * i * (one - i)
                    da[n, H + j] = dct * cs[t, n0 + n, j] * f * (one - f)
                    da[n, 2 * H + j] = dct * i * (one - g * g)
                    da[n, 3 * H + j] = dht * tc * o * (one - o)
                    dc[n, j] = dct * f
            np.dot(da, Whh, dh)  # (n, H)
        dh0[n0:n1] += dh
        dc0[n0:n1] += dc
    proj_backward(dx, dWih, dbih, dacts, x, Wih, parts)
    proj_backward(dx[:0], dWhh, dbhh, dacts, hs[:T], Whh, parts)
