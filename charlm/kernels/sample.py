"""Compiled generation loop for a stack of L recurrent layers, batch 1.

Dimensions: V vocab, E embedding, H hidden, L layers, G gates (rnn 1, gru 3,
lstm 4), P prime length, K tokens to generate.

One sampler serves every cell: ``cell`` is 0 (rnn), 1 (gru) or 2 (lstm) and
selects the cell's element-wise step (the same functions the sequence kernels
use). Batch 1 needs matrix-vector products, not BLAS matrix products: the
weights are passed transposed and split by hidden units between threads
(pack()) so each product is a sum of contiguous rows scaled by one input each,
which vectorises, and each thread streams only its share.

Weights in bfloat16 (pack(precision="bf16"), `charlm sample --precision bf16`): the recurrent
and output weights are stored as the upper 16 bits of their float32 values (rounded to
nearest even), half the bytes a token streams; every product widens them back to float32
as it reads them (widen()) and accumulates in float32, so the arithmetic is float32 on
slightly rounded weights. The same kernels compile once more for uint16 weights.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .fastmath import act_tanh
from .gru import gru_cell
from .layers import pick_token
from .lstm import lstm_cell
from .parallel import JIT, PJIT, chunk, copy_row, unit_parts

CELL_CODES = {"rnn": 0, "gru": 1, "lstm": 2}
PRECISIONS = ("float32", "bf16")


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 array -> its bfloat16 bits (uint16), rounded to nearest, ties to even (finite values)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> the float32 values they stand for."""
    return (b.astype(np.uint32) << 16).view(np.float32)


@intrinsic
def _f32_of_bits(typingctx, u):
    """The float32 whose bits are the uint32 u (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def widen(w):
    """A stored weight as float32: itself, or the float32 of its bfloat16 bits."""
    return w


@overload(widen, jit_options={"error_model": "numpy"})
def _widen(w):
    if isinstance(w, types.Integer):
        return lambda w: _f32_of_bits(np.uint32(w) << np.uint32(16))
    return lambda w: w


def pack(params: dict, layers: int, dtype=None, parts: int = 1, precision: str = "float32") -> tuple:
    """Parameters by model name -> the arrays stack_sample takes. The recurrent
    weights are transposed, so every matrix-vector product runs along contiguous
    rows, and split by hidden units into P = unit_parts(parts, H) parts: part p
    holds the columns of its units [j0, j1) of every gate, gate blocks of w =
    j1 - j0 columns side by side (the layout the cells expect with H = w), so
    each thread streams only its own contiguous share of the weights.

    emb (V, E); WihT0 (P, E, G wmax); WihT_rest (max(L-1, 1), P, H, G wmax);
    WhhT (L, P, H, G wmax); bih, bhh (L, P, G wmax); WoutT (H, V); bout (V,);
    table (P, V, G wmax), or (P, 0, G wmax) when not built (see TABLE_MAX_MACS).
    precision "bf16": WihT0, WihT_rest, WhhT and WoutT as bfloat16 bits (uint16); the table is
    computed from the float32 weights, the embedding and biases stay float32.
    """
    L = layers
    dt = dtype or params["embedding.weight"].dtype
    GH, H = params["rnn.weight_hh_l0"].shape
    G = GH // H
    P = int(unit_parts(parts, H))  # as the training loops: at most parts, 16 units or more each
    wmax = -(-H // P)

    def split(WT):  # (D, GH) -> (P, D, G wmax)
        out = np.zeros((P, WT.shape[0], G * wmax), dtype=dt)
        for p in range(P):
            j0, j1 = p * H // P, (p + 1) * H // P
            w = j1 - j0
            for g in range(G):
                out[p, :, g * w:(g + 1) * w] = WT[:, g * H + j0:g * H + j1]
        return out

    rest = [split(params[f"rnn.weight_ih_l{k}"].T) for k in range(1, L)] or [np.zeros((P, H, G * wmax), dt)]
    emb = np.ascontiguousarray(params["embedding.weight"], dtype=dt)
    WihT0 = split(params["rnn.weight_ih_l0"].T)
    bih = np.stack([split(params[f"rnn.bias_ih_l{k}"][None])[:, 0] for k in range(L)])
    V, E = emb.shape
    if V * E * GH <= TABLE_MAX_MACS:  # a character model: every token's first-layer input product, once
        table = _input_table(emb, WihT0, bih[0])
    else:
        table = np.zeros((P, 0, G * wmax), dt)
    store = to_bf16 if precision == "bf16" else (lambda a: a)
    return (emb, store(WihT0), store(np.stack(rest)),
            store(np.stack([split(params[f"rnn.weight_hh_l{k}"].T) for k in range(L)])),
            bih, np.stack([split(params[f"rnn.bias_hh_l{k}"][None])[:, 0] for k in range(L)]),
            store(np.ascontiguousarray(params["decoder.weight"].T, dtype=dt)),
            np.ascontiguousarray(params["decoder.bias"], dtype=dt), table)


# The first layer's input product of a token is a fixed vector per vocabulary entry. For a
# small vocabulary pack() computes them all once (table (P, V, G wmax)): sampling then
# reads one row per token instead of the E x 4H input weights (a 2x256 character LSTM:
# 0.13 MB of the 1.66 MB each of two threads streams per token). Computed by _affine,
# so every value is bit for bit the per-token product's. Build cost V E 4H multiply-adds,
# capped at TABLE_MAX_MACS so building it stays a small part of a short `charlm sample`;
# a word model's vocabulary is over the cap and skips it.
TABLE_MAX_MACS = 32_000_000


@njit(**JIT)
def _input_table(emb, WihT0, bih0):
    P, E, Gw = WihT0.shape
    V = emb.shape[0]
    table = np.empty((P, V, Gw), dtype=WihT0.dtype)
    for p in range(P):
        for v in range(V):
            _affine(table[p, v], emb[v], WihT0[p], bih0[p], np.int64(0), Gw)
    return table


# The batch-1 products: fused multiply-adds allowed (fastmath "contract" only: no reassociation,
# so every output sums its inputs in the same order whatever the split between threads).
MJIT = dict(JIT, fastmath={"contract"})


@njit(**MJIT)
def _affine(out, x, WT, b, k0, k1):
    """out[k0:k1] = b[k0:k1] + x @ WT[:, k0:k1] for one vector: x (D,), WT (D, K) float or bfloat16
    bits, b and out (K,); the rest of out untouched. Along contiguous rows of WT, four rows per pass
    over the output (one load and store of it per four rows, not one per row: a quarter of the L1
    traffic of a plain row-wise axpy, measured 1.4-1.5x quicker on weights resident in L2); each
    output adds its terms in the order of d, in pairs. Every batch-1 product is this one function
    with int64 bounds (a literal 0 would compile it once more)."""
    n = k1 - k0
    o = out[k0:k1]
    bb = b[k0:k1]
    for k in range(n):
        o[k] = bb[k]
    D = x.shape[0]
    d = 0
    while d + 4 <= D:
        x0, x1, x2, x3 = x[d], x[d + 1], x[d + 2], x[d + 3]
        r0, r1, r2, r3 = WT[d, k0:k1], WT[d + 1, k0:k1], WT[d + 2, k0:k1], WT[d + 3, k0:k1]
        for k in range(n):
            o[k] += (x0 * widen(r0[k]) + x1 * widen(r1[k])) + (x2 * widen(r2[k]) + x3 * widen(r3[k]))
        d += 4
    while d < D:
        xd = x[d]
        r = WT[d, k0:k1]
        for k in range(n):
            o[k] += xd * widen(r[k])
        d += 1


@njit(**JIT)
def _layer_part(cell, hnew, c, act, ax, ah, inp, hold, WihT, WhhT, bih, bhh, j0, j1, pre):
    """One layer, one token, the part owning hidden units [j0, j1): its packed
    weights WihT (D, G wmax), WhhT (H, G wmax), biases (G wmax,) (pack());
    inp (D,) the layer's input, hold (H,) its previous state. Writes hnew[j0:j1]
    and c[j0:j1] (H,). ax, ah (1, G wmax) and act (1, 4 wmax): the part's own
    work space. pre (G wmax,): the input product already done (a table row), or
    empty. Padding columns (a part narrower than wmax) are computed and never
    read."""
    w = j1 - j0
    if pre.shape[0] > 0:
        copy_row(ax[0], pre)
    else:
        _affine(ax[0], inp, WihT, bih, np.int64(0), ax.shape[1])
    _affine(ah[0], hold, WhhT, bhh, np.int64(0), ah.shape[1])
    hn = hnew[j0:j1].reshape((1, w))
    if cell == 0:
        for j in range(w):
            hn[0, j] = act_tanh(ax[0, j] + ah[0, j])
    elif cell == 1:
        gru_cell(hn, act, ax, ah, hold[j0:j1].reshape((1, w)), w)
    else:
        ax += ah
        cc = c[j0:j1].reshape((1, w))
        lstm_cell(hn, cc, ax, cc, w, 0, w)


@njit(**PJIT)
def _stack_step(cell, hb, cur, cs, act, ax, ah, token, emb, WihT0, WihT_rest, WhhT, bih, bhh, table):
    """Feed one token through all layers. hb (2, L, H): hb[cur] is the state
    before, hb[1 - cur] receives the state after (other threads still read a
    layer's old h while one writes its new units); cs (L, 1, H) in place. Each
    layer is split by hidden units between the P threads of the packing; the end
    of each prange is the barrier the next layer needs."""
    L = hb.shape[1]
    H = hb.shape[2]
    P = WhhT.shape[1]
    for l in range(L):
        inp = emb[token] if l == 0 else hb[1 - cur, l - 1]
        for p in prange(P):
            j0, j1 = chunk(p, P, H)
            WihT = WihT0[p] if l == 0 else WihT_rest[l - 1, p]
            pre = table[p, token] if l == 0 and table.shape[1] > 0 else bih[l, p, :0]
            _layer_part(cell, hb[1 - cur, l], cs[l, 0], act[p], ax[p], ah[p], inp, hb[cur, l],
                        WihT, WhhT[l, p], bih[l, p], bhh[l, p], j0, j1, pre)


@njit(**PJIT)
def _decode(logits, h, WoutT, bout, nv):
    """logits (V,) = bout + h @ WoutT, the vocabulary split between nv threads."""
    V = logits.shape[0]
    for p in prange(nv):
        v0, v1 = chunk(p, nv, V)
        _affine(logits, h, WoutT, bout, v0, v1)


@njit(**JIT)
def stack_sample(out, lps, hs, cs, seen, prime, uniforms, cell, emb, WihT0, WihT_rest, WhhT,
                 bih, bhh, WoutT, bout, table, temperature, top_k, top_p, penalty, greedy, parts=1):
    """Feed prime (P,) ids (P >= 1), then generate K = out.shape[0] tokens into out
    and the ln P of each (under the model, temperature 1) into lps (K,) float64.

    hs, cs (L, 1, H) state in/out (cs unused for rnn/gru). seen (V,) uint8 the
    tokens the repetition penalty applies to, in/out (each generated token is
    added). uniforms (K,) in [0, 1) drawn by the caller. The weights as pack()
    lays them out; the layers are split by hidden units between as many threads
    as pack() made parts, and the decoder by vocabulary between up to `parts`
    threads (at least 64 words each). Batch 1 streams every weight once per
    token, so two cores bring twice the cache bandwidth. The result does not
    depend on either split. After the call the state has consumed prime and
    out[:-1], so the next call continues with prime = out[-1:].
    """
    L, _, H = hs.shape
    V = emb.shape[0]
    P = WhhT.shape[1]
    Gw = WhhT.shape[3]
    wmax = -(-H // P)
    nv = max(1, min(parts, V // 64))
    hb = np.empty((2, L, H), dtype=hs.dtype)
    for l in range(L):
        copy_row(hb[0, l], hs[l, 0])
    cur = np.int64(0)  # not the literal 0, which would compile _stack_step once more
    ax = np.empty((P, 1, Gw), dtype=hs.dtype)
    ah = np.empty((P, 1, Gw), dtype=hs.dtype)
    act = np.empty((P, 1, 4 * wmax), dtype=hs.dtype)  # gru keeps 4 blocks
    logits = np.empty(V, dtype=hs.dtype)
    adj = np.empty(V, dtype=np.float64)
    scratch = np.empty(V, dtype=np.float64)
    for p in range(prime.shape[0]):  # the token as int64, as the sampled ones: one compiled _stack_step
        _stack_step(cell, hb, cur, cs, act, ax, ah, np.int64(prime[p]), emb, WihT0, WihT_rest, WhhT, bih, bhh,
                    table)
        cur = 1 - cur
    K = out.shape[0]
    for k in range(K):
        if nv > 1:
            _decode(logits, hb[cur, L - 1], WoutT, bout, nv)
        else:  # a small vocabulary: a parallel launch would cost more than the product
            _affine(logits, hb[cur, L - 1], WoutT, bout, np.int64(0), V)
        tok, lp = pick_token(logits, seen, temperature, top_k, top_p, penalty, greedy, uniforms[k], adj, scratch)
        out[k] = tok
        lps[k] = lp
        if k + 1 < K:
            _stack_step(cell, hb, cur, cs, act, ax, ah, tok, emb, WihT0, WihT_rest, WhhT, bih, bhh, table)
            cur = 1 - cur
    for l in range(L):
        copy_row(hs[l, 0], hb[cur, l])


@njit(**JIT)
def draw_tokens(out, lps, seen, logits, uniforms, temperature, top_k, top_p, penalty, greedy):
    """One step of N streams generated side by side: out (N,) the token of each row of
    logits (N, V), lps (N,) float64 its ln P, seen (N, V) uint8 per stream (see
    layers.pick_token), uniforms (N,) in [0, 1) drawn by the caller."""
    N, V = logits.shape
    adj = np.empty(V, dtype=np.float64)
    scratch = np.empty(V, dtype=np.float64)
    for n in range(N):
        tok, lp = pick_token(logits[n], seen[n], temperature, top_k, top_p, penalty, greedy, uniforms[n],
                             adj, scratch)
        out[n] = tok
        lps[n] = lp
