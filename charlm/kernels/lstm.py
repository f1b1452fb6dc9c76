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
from numba import njit

from .common import JIT, act_sigmoid, act_tanh


@njit(**JIT)
def _lstm_cell(hout, cout, act, a, c, H):
    """Activate pre-activations a (N, 4H) in place into act; write h, c (N, H)."""
    N = a.shape[0]
    for n in range(N):
        for j in range(H):
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
    _lstm_cell(hout, cout, act, act, c, H)


@njit(**JIT)
def lstm_forward(hs, cs, acts, x, Wih, Whh, bih, bhh):
    """Run T steps. hs, cs (T+1, N, H) with hs[0], cs[0] the initial state;
    acts (T, N, 4H) out; x (T, N, D)."""
    T, N, D = x.shape
    H = hs.shape[2]
    G4 = 4 * H
    # input projection of the whole window: one GEMM
    np.dot(x.reshape(T * N, D), Wih.T, acts.reshape(T * N, G4))
    bias = bih + bhh
    rec = np.empty((N, G4), dtype=acts.dtype)
    for t in range(T):
        np.dot(hs[t], Whh.T, rec)  # (N, 4H)
        a = acts[t]
        for n in range(N):
            for k in range(G4):
                a[n, k] += rec[n, k] + bias[k]
        _lstm_cell(hs[t + 1], cs[t + 1], a, a, cs[t], H)


@njit(**JIT)
def lstm_backward(dx, dWih, dWhh, dbih, dbhh, dh0, dc0, dacts, dacts_h,
                  dhs, hs, cs, acts, x, Wih, Whh):
    """Backpropagation through the T steps of lstm_forward.

    ADDS into dx (T, N, D), dWih (4H, D), dWhh (4H, H), dbih, dbhh (4H,),
    dh0, dc0 (N, H); the caller zeroes them. dacts (T, N, 4H) is work space
    (pre-activation gradients); dacts_h is unused (same signature as gru).
    dhs (T, N, H) is dL/dh_t from above for t = 1..T (gradient beyond the
    window is zero: truncated BPTT). dx of shape (0, 0, 0) skips it.
    """
    T, N, D = x.shape
    H = hs.shape[2]
    G4 = 4 * H
    one = hs.dtype.type(1.0)
    dh = np.zeros((N, H), dtype=hs.dtype)
    dc = np.zeros((N, H), dtype=hs.dtype)
    for t in range(T - 1, -1, -1):
        act = acts[t]
        da = dacts[t]
        for n in range(N):
            for j in range(H):
                i = act[n, j]
                f = act[n, H + j]
                g = act[n, 2 * H + j]
                o = act[n, 3 * H + j]
                tc = act_tanh(cs[t + 1, n, j])
                dht = dhs[t, n, j] + dh[n, j]
                dct = dc[n, j] + dht * o * (one - tc * tc)
                da[n, j] = dct * g * i * (one - i)
                da[n, H + j] = dct * cs[t, n, j] * f * (one - f)
                da[n, 2 * H + j] = dct * i * (one - g * g)
                da[n, 3 * H + j] = dht * tc * o * (one - o)
                dc[n, j] = dct * f
        np.dot(da, Whh, dh)  # (N, H)
    dh0 += dh
    dc0 += dc
    M = T * N
    da2 = dacts.reshape(M, G4)
    dWhh += np.dot(da2.T, hs[:T].reshape(M, H))
    dWih += np.dot(da2.T, x.reshape(M, D))
    for m in range(M):
        for k in range(G4):
            dbih[k] += da2[m, k]
            dbhh[k] += da2[m, k]
    if dx.shape[0] == T:
        dx.reshape(M, D)[:, :] += np.dot(da2, Wih)
