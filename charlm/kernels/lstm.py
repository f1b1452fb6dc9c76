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

from .fastmath import act_sigmoid, act_tanh
from .layers import proj_backward, proj_forward
from .parallel import (JIT, PJIT, chunk, copy_row, dot_rows, gate_product, small_rows, state_T, transpose_into,
                       unit_parts)


@njit(**JIT)
def lstm_cell(hout, cout, a, c, H, j0, j1):
    """Activate the pre-activations a (N, 4H) in place (a then holds the gates
    i, f, g, o) and write h, c (N, H), for the hidden units j0 <= j < j1.

    Each row is handled through four 1-D gate views and 0-based loops: indexing
    a[n, H + j] and writing back into the same array made LLVM give up on
    vectorising (it cannot rule out overlap at an unknown distance), which made
    the activations an order of magnitude slower per unit (see BENCHMARKS.md).
    """
    N = a.shape[0]
    w = j1 - j0
    for n in range(N):
        r = a[n]
        gi = r[j0:j1]
        gf = r[H + j0:H + j1]
        gg = r[2 * H + j0:2 * H + j1]
        go = r[3 * H + j0:3 * H + j1]
        cp = c[n, j0:j1]
        cn_ = cout[n, j0:j1]
        hn = hout[n, j0:j1]
        for j in range(w):
            i = act_sigmoid(gi[j])
            f = act_sigmoid(gf[j])
            g = act_tanh(gg[j])
            o = act_sigmoid(go[j])
            gi[j] = i
            gf[j] = f
            gg[j] = g
            go[j] = o
            cn = f * cp[j] + i * g
            cn_[j] = cn
            hn[j] = o * act_tanh(cn)


@njit(**JIT)
def lstm_step_forward(hout, cout, act, x, h, c, Wih, Whh, bih, bhh):
    """One time step. hout, cout (N, H); act (N, 4H) scratch/gates out;
    x (N, D); h, c (N, H); Wih (4H, D); Whh (4H, H); bih, bhh (4H,)."""
    H = h.shape[1]
    np.dot(x, Wih.T, act)
    act += np.dot(h, Whh.T)  # (N, 4H)
    act += bih
    act += bhh
    lstm_cell(hout, cout, act, c, H, 0, H)



@njit(**JIT)
def _lstm_cell_units(hout, cout, a, recT, rec, bias, c, H, j0, j1):
    """Add the recurrent part recT (4w, N) (transposed: the gate blocks of units
    [j0, j1) in gate_product's order, one row per unit) and the bias (4H,) into
    a (N, 4H), then lstm_cell on those units. rec (N, 4w) is work space."""
    N = a.shape[0]
    w = j1 - j0
    transpose_into(rec, recT)
    for n in range(N):
        r = a[n]
        q = rec[n]
        for g in range(4):
            dst = r[g * H + j0:g * H + j1]
            src = q[g * w:(g + 1) * w]
            b = bias[g * H + j0:g * H + j1]
            for j in range(w):
                dst[j] += src[j] + b[j]
    lstm_cell(hout, cout, a, c, H, j0, j1)


@njit(**PJIT)
def _lstm_recur_by_units(hs, cs, acts, Whh, bias, nc):
    """The recurrence of lstm_forward split by hidden units into nc parts (see
    above), with a barrier at the end of every step. The product is W h^T with
    h^T kept as its own contiguous (H, N) copy (double-buffered by step parity:
    a part writes step t + 1's units while another may still read step t's).
    W h^T with the part's packed rows contiguous is a quicker product than h W^T
    over strided columns, and quicker again in row blocks (small_rows); see
    BENCHMARKS.md."""
    T, N, _ = acts.shape
    H = hs.shape[2]
    wmax = (H + nc - 1) // nc
    recT = np.empty((nc, N * 4 * wmax), dtype=acts.dtype)
    rec = np.empty((nc, N * 4 * wmax), dtype=acts.dtype)
    hT = state_T(hs[0])
    for t in range(T):
        for c in prange(nc):
            _recur_part(t, np.int64(c), nc, hs, cs, acts, Whh, bias, hT, recT, rec)


@njit(**JIT)
def _recur_part(t, c, nc, hs, cs, acts, Whh, bias, hT, recT, rec):
    """Step t of _lstm_recur_by_units for part c of nc (its units [j0, j1)); a call as the whole
    prange body (see _backrecur_part)."""
    N, H = hs.shape[1], hs.shape[2]
    j0, j1 = chunk(c, nc, H)
    w = j1 - j0
    rT = gate_product(Whh, 4, j0, j1, hT[t % 2], recT[c], t)  # (4w, N)
    _lstm_cell_units(hs[t + 1], cs[t + 1], acts[t], rT, rec[c, :N * 4 * w].reshape(N, 4 * w),
                     bias, cs[t], H, j0, j1)
    transpose_into(hT[(t + 1) % 2, j0:j1], hs[t + 1, :, j0:j1])


@njit(**JIT)
def lstm_forward(hs, cs, acts, x, Wih, Whh, bih, bhh, parts=1):
    """Run T steps. hs, cs (T+1, N, H) with hs[0], cs[0] the initial state;
    acts (T, N, 4H) out; x (T, N, D); parts: how many threads share the work.

    The input projection of the whole window is one product (split by time).
    The recurrence is split by hidden units between threads, a barrier per step
    (_lstm_recur_by_units; one part with one thread); below 16 units, a plain
    loop over time.
    """
    H = hs.shape[2]
    proj_forward(acts, x, Wih, parts)
    bias = bih + bhh
    if H >= 16:
        _lstm_recur_by_units(hs, cs, acts, Whh, bias, unit_parts(parts, H))
    else:
        _lstm_recur_plain(hs, cs, acts, Whh, bias)


@njit(**JIT)
def _lstm_recur_plain(hs, cs, acts, Whh, bias):
    """The recurrence of lstm_forward as a plain loop over time (h W^T per step)."""
    T, N, G4 = acts.shape
    H = hs.shape[2]
    rec = np.empty((N, G4), dtype=acts.dtype)
    for t in range(T):
        np.dot(hs[t], Whh.T, rec)  # (N, 4H)
        a = acts[t]
        for n in range(N):
            for k in range(G4):
                a[n, k] += rec[n, k] + bias[k]
        lstm_cell(hs[t + 1], cs[t + 1], a, cs[t], H, 0, H)


@njit(**JIT)
def _lstm_cell_backward(da, dh, dc, act, c_prev, c, dh_above, H, j0, j1):
    """One row of one step backwards, for the units j0 <= j < j1 (w of them).
    In: act (4H,) the gates, c_prev, c (H,) the cell before and after, dh_above
    (H,) dL/dh_t from the layer above, dh (w,) dL/dh_t through step t + 1 (read
    only), dc (w,) dL/dc_t through step t + 1, replaced by dL/dc_{t-1}. Out: the
    units' four blocks of da (4H,), the pre-activation gradients. 1-D views and
    0-based loops, so it vectorises (see lstm_cell)."""
    one = act.dtype.type(1.0)
    w = j1 - j0
    gi, gf = act[j0:j1], act[H + j0:H + j1]
    gg, go = act[2 * H + j0:2 * H + j1], act[3 * H + j0:3 * H + j1]
    di, df = da[j0:j1], da[H + j0:H + j1]
    dg, do = da[2 * H + j0:2 * H + j1], da[3 * H + j0:3 * H + j1]
    cp, cc, dha = c_prev[j0:j1], c[j0:j1], dh_above[j0:j1]
    for j in range(w):
        i = gi[j]
        f = gf[j]
        g = gg[j]
        o = go[j]
        tc = act_tanh(cc[j])
        dht = dha[j] + dh[j]
        dct = dc[j] + dht * o * (one - tc * tc)
        di[j] = dct * g * i * (one - i)
        df[j] = dct * cp[j] * f * (one - f)
        dg[j] = dct * i * (one - g * g)
        do[j] = dht * tc * o * (one - o)
        dc[j] = dct * f


@njit(**JIT)
def _pack_unit_rows_t(Whh, nc):
    """W_hh (4H, H) -> (nc, H 4wmax) flat: part c's rows (gate_product's order) transposed, a
    contiguous (H, 4w) matrix at the start of row c. Each gate block of the part's rows (contiguous
    in W_hh) goes through the tiled transpose into tmp, then into its columns: an element loop over
    the strided transpose took 1.3 ms per 2x256 layer and step, 10 ms at 512 (benchmarks/profile_step.py)."""
    G4, H = Whh.shape
    wmax = (H + nc - 1) // nc
    out = np.zeros((nc, H * 4 * wmax), dtype=Whh.dtype)
    tmp = np.empty(H * wmax, dtype=Whh.dtype)
    for c in range(nc):
        j0, j1 = chunk(c, nc, H)
        w = j1 - j0
        o = out[c, :H * 4 * w].reshape(H, 4 * w)
        t = tmp[:H * w].reshape(H, w)
        for g in range(4):
            transpose_into(t, Whh[g * H + j0:g * H + j1])  # (H, w)
            for k in range(H):
                copy_row(o[k, g * w:(g + 1) * w], t[k])
    return out


@njit(**PJIT)
def _lstm_backrecur_by_units(dh0, dc0, dacts, dhs, cs, acts, Whh, nc):
    """The backward time loop of lstm_backward split by hidden units into nc
    parts. In step t, part c computes the gate gradients da of its own units
    for all rows, then its share of dL/dh_{t-1} = da W_hh over its own gate rows
    only: a partial sum over all H units, (W_hh rows)^T da^T of shape (H, N).
    After the barrier that ends the step, each part adds the nc partials for its
    own units. Splitting the sum (K) rather than the output keeps every operand
    of the product the part's own (no thread reads another's da), which measured
    faster than splitting the output (see BENCHMARKS.md). Partials are
    double-buffered by step parity: a part may start writing step t's while
    another still reads step t + 1's."""
    T, N, G4 = dacts.shape
    H = G4 // 4
    WrT = _pack_unit_rows_t(Whh, nc)
    wmax = (H + nc - 1) // nc
    part, dac, dacT, dhT, dh, dc = _backrecur_buffers(nc, N, H, wmax, acts)
    for t in range(T - 1, -1, -1):
        for c in prange(nc):
            _backrecur_part(t, np.int64(c), nc, part, dac, dacT, dhT, dh, dc, dacts, dhs, cs, acts, WrT)
    for c in prange(nc):
        _backrecur_finish(np.int64(c), nc, part, dhT, dh, dc, dh0, dc0)


@njit(**JIT)
def _backrecur_buffers(nc, N, H, wmax, acts):
    """The zeroed work space of _lstm_backrecur_by_units: partials (2, nc, H N) [parity, part],
    and per part dac, dacT (nc, 4 wmax N), dhT, dh, dc (nc, wmax N). Allocated here, outside the
    parallel kernel, where Numba would turn each np.zeros into one more parallel loop to compile."""
    dt = acts.dtype
    return (np.zeros((2, nc, H * N), dtype=dt), np.zeros((nc, N * 4 * wmax), dtype=dt),
            np.zeros((nc, 4 * wmax * N), dtype=dt), np.zeros((nc, wmax * N), dtype=dt),
            np.zeros((nc, N * wmax), dtype=dt), np.zeros((nc, N * wmax), dtype=dt))


# The bodies of the prange loops above are calls: Numba's parallel transform then has
# nothing to analyse inside them, which made the kernel compile in ~2 s instead of ~7 s
# (benchmarks/compile_times.py), for the same machine code in each thread.
@njit(**JIT)
def _backrecur_part(t, c, nc, part, dac, dacT, dhT, dh, dc, dacts, dhs, cs, acts, WrT):
    """Step t of _lstm_backrecur_by_units for part c of nc (its units [j0, j1))."""
    T, N, G4 = dacts.shape
    H = G4 // 4
    j0, j1 = chunk(c, nc, H)
    w = j1 - j0
    dhc = dh[c, :N * w].reshape(N, w)
    dcc = dc[c, :N * w].reshape(N, w)
    if t + 1 < T:
        _sum_partials(dhc, dhT[c, :w * N].reshape(w, N), part[(t + 1) % 2], N, j0, j1)
    d4 = dac[c, :N * 4 * w].reshape(N, 4 * w)
    d4T = dacT[c, :4 * w * N].reshape(4 * w, N)
    for n in range(N):
        _lstm_cell_backward(dacts[t, n], dhc[n], dcc[n], acts[t, n], cs[t, n], cs[t + 1, n],
                            dhs[t, n], H, j0, j1)
        src = dacts[t, n]
        dst = d4[n]
        for g in range(4):
            s = src[g * H + j0:g * H + j1]
            o = dst[g * w:(g + 1) * w]
            for j in range(w):
                o[j] = s[j]
    transpose_into(d4T, d4)
    dot_rows(WrT[c, :H * 4 * w].reshape(H, 4 * w), d4T, part[t % 2, c].reshape(H, N),
             small_rows(H, 4 * w, N))


@njit(**JIT)
def _backrecur_finish(c, nc, part, dhT, dh, dc, dh0, dc0):
    """After the time loop: part c adds dL/dh_0 and dL/dc_0 of its units into dh0, dc0 (N, H)."""
    N, H = dh0.shape
    j0, j1 = chunk(c, nc, H)
    w = j1 - j0
    dhc = dh[c, :N * w].reshape(N, w)
    _sum_partials(dhc, dhT[c, :w * N].reshape(w, N), part[0], N, j0, j1)  # dL/dh_0
    dcc = dc[c, :N * w].reshape(N, w)
    for n in range(N):
        for j in range(w):
            dh0[n, j0 + j] += dhc[n, j]
            dc0[n, j0 + j] += dcc[n, j]


@njit(**JIT)
def _sum_partials(dh, tmp, part, N, j0, j1):
    """dh (N, w) = the sum over parts of part[q] (H, N) rows j0..j1, transposed;
    tmp (w, N) work space."""
    w = j1 - j0
    for j in range(w):
        o = tmp[j]
        r = part[0, (j0 + j) * N:(j0 + j + 1) * N]
        for n in range(N):
            o[n] = r[n]
    for q in range(1, part.shape[0]):
        for j in range(w):
            o = tmp[j]
            r = part[q, (j0 + j) * N:(j0 + j + 1) * N]
            for n in range(N):
                o[n] += r[n]
    transpose_into(dh, tmp)


@njit(**JIT)
def _lstm_backrecur_plain(dh0, dc0, dacts, dhs, cs, acts, Whh):
    """The backward time loop of lstm_backward as a plain loop (da W_hh per step)."""
    T, N, G4 = dacts.shape
    H = G4 // 4
    dh = np.zeros((N, H), dtype=acts.dtype)
    dc = np.zeros((N, H), dtype=acts.dtype)
    for t in range(T - 1, -1, -1):
        for n in range(N):
            _lstm_cell_backward(dacts[t, n], dh[n], dc[n], acts[t, n], cs[t, n], cs[t + 1, n],
                                dhs[t, n], H, 0, H)
        np.dot(dacts[t], Whh, dh)  # (N, H)
    dh0 += dh
    dc0 += dc


@njit(**JIT)
def lstm_backward(dx, dWih, dWhh, dbih, dbhh, dh0, dc0, dacts, dacts_h,
                  dhs, hs, cs, acts, x, Wih, Whh, parts=1):
    """Backpropagation through the T steps of lstm_forward.

    ADDS into dx (T, N, D), dWih (4H, D), dWhh (4H, H), dbih, dbhh (4H,),
    dh0, dc0 (N, H); the caller zeroes them. dacts (T, N, 4H) is work space
    (pre-activation gradients); dacts_h is unused (same signature as gru).
    dhs (T, N, H) is dL/dh_t from above for t = 1..T (gradient beyond the
    window is zero: truncated BPTT). dx of shape (0, 0, 0) skips it.
    The time loop is split by hidden units as in lstm_forward (a plain loop
    below 16 units); the weight gradients are whole-window products after it.
    """
    T, N, D = x.shape
    H = hs.shape[2]
    if H >= 16:
        _lstm_backrecur_by_units(dh0, dc0, dacts, dhs, cs, acts, Whh, unit_parts(parts, H))
    else:
        _lstm_backrecur_plain(dh0, dc0, dacts, dhs, cs, acts, Whh)
    # b_ih and b_hh get the same gradient (both add to the same pre-activations): summed once
    db = np.zeros_like(dbih)
    proj_backward(dx, dWih, db, dacts, x, Wih, parts)
    proj_backward(dx[:0], dWhh, dbhh[:0], dacts, hs[:T], Whh, parts)
    dbih += db
    dbhh += db
