"""GRU kernels (PyTorch's nn.GRU equations, gate order [r, z, n]).

Dimensions: N batch, T time, D layer input, H hidden, G = 3 gates.

    ax = x W_ih^T + b_ih,  ah = h_{t-1} W_hh^T + b_hh          # (N, 3H) each
    r = sigmoid(ax_r + ah_r)
    z = sigmoid(ax_z + ah_z)
    n = tanh(ax_n + r * ah_n)             # the lecture's h' = tanh(Ux + r o (W h))
    h_t = z * h_{t-1} + (1 - z) * n       # z near 1 copies the past

Parameters: W_ih (3H, D), W_hh (3H, H), b_ih (3H,), b_hh (3H,), row blocks
[r | z | n], exactly as torch.nn.GRU stores them.

hs (T+1, N, H) with hs[0] = h0. acts (T, N, 4H) keeps [r, z, n, ah_n] per
step (ah_n = the n-block of h_{t-1} W_hh^T + b_hh, needed by the backward
pass). cs is unused (same signature as lstm).
"""
import numpy as np
from numba import njit, prange

from .fastmath import act_sigmoid, act_tanh
from .layers import proj_backward, proj_forward
from .parallel import JIT, PJIT, chunk, gate_product, n_parts, state_T, transpose_into, unit_parts


@njit(**JIT)
def gru_cell(hout, act, ax, ah, h, H, j0=0, j1=-1):
    """ax, ah (N, 3H) pre-activations; act (N, 4H) out; h (N, H) previous; hout (N, H);
    for the hidden units j0 <= j < j1 (j1 = -1: all). Row by row through 1-D gate
    views and 0-based loops, so the loop vectorises (indexing act[n, H + j] did
    not: see lstm.lstm_cell)."""
    N = ax.shape[0]
    one = h.dtype.type(1.0)
    if j1 < 0:
        j1 = H
    for n in range(N):
        x, a, o = ax[n], ah[n], act[n]
        xr, xz, xn = x[j0:j1], x[H + j0:H + j1], x[2 * H + j0:2 * H + j1]
        ar, az, an = a[j0:j1], a[H + j0:H + j1], a[2 * H + j0:2 * H + j1]
        orr, oz = o[j0:j1], o[H + j0:H + j1]
        on, oa = o[2 * H + j0:2 * H + j1], o[3 * H + j0:3 * H + j1]
        hp, hn = h[n, j0:j1], hout[n, j0:j1]
        for j in range(j1 - j0):
            r = act_sigmoid(xr[j] + ar[j])
            z = act_sigmoid(xz[j] + az[j])
            ahn = an[j]
            nn = act_tanh(xn[j] + r * ahn)
            orr[j] = r
            oz[j] = z
            on[j] = nn
            oa[j] = ahn
            hn[j] = z * hp[j] + (one - z) * nn


@njit(**JIT)
def gru_step_forward(hout, cout, act, x, h, c, Wih, Whh, bih, bhh):
    """One step. hout (N, H); cout, c unused; act (N, 4H) out; x (N, D); h (N, H)."""
    H = h.shape[1]
    ax = np.dot(x, Wih.T)  # (N, 3H)
    ax += bih
    ah = np.dot(h, Whh.T)  # (N, 3H)
    ah += bhh
    gru_cell(hout, act, ax, ah, h, H)


@njit(**PJIT)
def _gru_recur_by_units(hs, acts, ax_all, Whh, bih, bhh, nc):
    """gru_forward's recurrence split by hidden units into nc parts, a barrier per
    step, as lstm._lstm_recur_by_units: part c owns units [j0, j1) of all three
    gates and computes its rows of W_hh h^T."""
    T, N, G3 = ax_all.shape
    H = hs.shape[2]
    wmax = (H + nc - 1) // nc
    recT = np.empty((nc, 3 * wmax * N), dtype=acts.dtype)
    ah = np.empty((N, G3), dtype=acts.dtype)  # each part writes its own columns
    hT = state_T(hs[0])
    for t in range(T):
        for c in prange(nc):
            j0, j1 = chunk(c, nc, H)
            w = j1 - j0
            rT = gate_product(Whh, 3, j0, j1, hT[t % 2], recT[c], t)  # (3w, N)
            ax = ax_all[t]
            for g in range(3):
                transpose_into(ah[:, g * H + j0:g * H + j1], rT[g * w:(g + 1) * w])
                for n in range(N):
                    xa = ax[n, g * H + j0:g * H + j1]
                    ha = ah[n, g * H + j0:g * H + j1]
                    bi = bih[g * H + j0:g * H + j1]
                    bh = bhh[g * H + j0:g * H + j1]
                    for j in range(w):
                        xa[j] += bi[j]
                        ha[j] += bh[j]
            gru_cell(hs[t + 1], acts[t], ax, ah, hs[t], H, j0, j1)
            transpose_into(hT[(t + 1) % 2, j0:j1], hs[t + 1, :, j0:j1])


@njit(**PJIT)
def gru_forward(hs, cs, acts, x, Wih, Whh, bih, bhh, parts=1):
    """Run T steps. hs (T+1, N, H) with hs[0] = h0; acts (T, N, 4H) out;
    x (T, N, D); cs unused. Input projection by time; the recurrence by batch
    rows, each thread running the whole time loop on its rows, or, with fewer
    rows than threads (scoring one text), by hidden units (_gru_recur_by_units)."""
    T, N, D = x.shape
    H = hs.shape[2]
    G3 = 3 * H
    ax_all = np.empty((T, N, G3), dtype=acts.dtype)  # x W_ih^T for the window
    proj_forward(ax_all, x, Wih, parts)
    nu = unit_parts(parts, H)
    if N < parts and nu > 1:
        _gru_recur_by_units(hs, acts, ax_all, Whh, bih, bhh, nu)
        return
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        ah = np.empty((n1 - n0, G3), dtype=acts.dtype)
        for t in range(T):
            ax = ax_all[t, n0:n1]
            np.dot(hs[t, n0:n1], Whh.T, ah)  # (n, 3H)
            for n in range(n1 - n0):
                for k in range(G3):
                    ax[n, k] += bih[k]
                    ah[n, k] += bhh[k]
            gru_cell(hs[t + 1, n0:n1], acts[t, n0:n1], ax, ah, hs[t, n0:n1], H)


@njit(**JIT)
def _gru_cell_backward(gx, gh, dh, act, hp, dh_above, H):
    """One row of one step backwards. act (4H,) [r, z, n, ah_n]; hp (H,) h_{t-1};
    dh_above (H,) dL/dh_t from the layer above; dh (H,) dL/dh_t through step
    t + 1, replaced by the part of dL/dh_{t-1} that flows through z (the caller
    adds gh W_hh). Out: gx, gh (3H,) gradients wrt ax and ah. Vectorises (1-D
    views, 0-based loops)."""
    one = act.dtype.type(1.0)
    ar, az, an, aa = act[:H], act[H:2 * H], act[2 * H:3 * H], act[3 * H:4 * H]
    xr, xz, xn = gx[:H], gx[H:2 * H], gx[2 * H:3 * H]
    hr, hz, hn = gh[:H], gh[H:2 * H], gh[2 * H:3 * H]
    for j in range(H):
        r = ar[j]
        z = az[j]
        nn = an[j]
        dht = dh_above[j] + dh[j]
        dan = dht * (one - z) * (one - nn * nn)
        daz = dht * (hp[j] - nn) * z * (one - z)
        dar = dan * aa[j] * r * (one - r)
        xr[j] = dar
        xz[j] = daz
        xn[j] = dan
        hr[j] = dar
        hz[j] = daz
        hn[j] = dan * r
        dh[j] = dht * z


@njit(**PJIT)
def gru_backward(dx, dWih, dWhh, dbih, dbhh, dh0, dc0, dacts, dacts_h,
                 dhs, hs, cs, acts, x, Wih, Whh, parts=1):
    """Backpropagation through the T steps of gru_forward.

    ADDS into dx (T, N, D), dWih (3H, D), dWhh (3H, H), dbih, dbhh (3H,),
    dh0 (N, H); the caller zeroes them. dc0 is untouched. dacts (T, N, 3H)
    and dacts_h (T, N, 3H) are work space: gradients wrt ax and ah.
    dhs (T, N, H) is dL/dh_t from above for t = 1..T. dx of shape (0, 0, 0)
    skips it.
    """
    T, N, D = x.shape
    H = hs.shape[2]
    nc = n_parts(parts, N)
    for c in prange(nc):
        n0, n1 = chunk(c, nc, N)
        nr = n1 - n0
        dh = np.zeros((nr, H), dtype=hs.dtype)
        dhW = np.empty((nr, H), dtype=hs.dtype)
        for t in range(T - 1, -1, -1):
            act = acts[t, n0:n1]
            gx = dacts[t, n0:n1]
            gh = dacts_h[t, n0:n1]
            hp = hs[t, n0:n1]
            for n in range(nr):
                _gru_cell_backward(gx[n], gh[n], dh[n], act[n], hp[n], dhs[t, n0 + n], H)
            np.dot(gh, Whh, dhW)  # (n, H)
            dh += dhW
        dh0[n0:n1] += dh
    proj_backward(dx, dWih, dbih, dacts, x, Wih, parts)
    proj_backward(dx[:0], dWhh, dbhh, dacts_h, hs[:T], Whh, parts)
