"""Compiled generation loop for a stack of L recurrent layers, batch 1.

Dimensions: V vocab, E embedding, H hidden, L layers, G gates (rnn 1, gru 3,
lstm 4), P prime length, K tokens to generate.

One sampler serves every cell: ``cell`` is 0 (rnn), 1 (gru) or 2 (lstm) and
selects the cell's element-wise step (the same functions the sequence kernels
use). Batch 1 needs matrix-vector products, not BLAS matrix products: the
weights are passed transposed (pack()) so each product is a sum of contiguous
rows scaled by one input each, which vectorises and stays in cache.
"""
import numpy as np
from numba import njit

from .common import JIT, act_tanh, draw_token
from .gru import _gru_cell
from .lstm import _lstm_cell

CELL_CODES = {"rnn": 0, "gru": 1, "lstm": 2}


def pack(params: dict, layers: int, dtype=None) -> tuple:
    """Parameters by model name -> the arrays stack_sample takes, weights transposed
    so that every matrix-vector product runs along contiguous rows:

    emb (V, E); WihT0 (E, GH) = W_ih_l0^T; WihT_rest (max(L-1, 1), H, GH);
    WhhT (L, H, GH); bih, bhh (L, GH); WoutT (H, V); bout (V,).
    """
    L = layers
    dt = dtype or params["embedding.weight"].dtype
    c = lambda a: np.ascontiguousarray(a, dtype=dt)
    GH, H = params["rnn.weight_hh_l0"].shape
    rest = [params[f"rnn.weight_ih_l{k}"].T for k in range(1, L)] or [np.zeros((H, GH))]
    return (c(params["embedding.weight"]), c(params["rnn.weight_ih_l0"].T), c(np.stack(rest)),
            c(np.stack([params[f"rnn.weight_hh_l{k}"].T for k in range(L)])),
            c(np.stack([params[f"rnn.bias_ih_l{k}"] for k in range(L)])),
            c(np.stack([params[f"rnn.bias_hh_l{k}"] for k in range(L)])),
            c(params["decoder.weight"].T), c(params["decoder.bias"]))


@njit(**JIT)
def _matvec_t(out, x, WT, b):
    """out = b + x @ WT for one vector: x (D,), WT (D, K), b, out (K,). Row-wise
    axpy, so the inner loop runs along contiguous memory and vectorises."""
    K = out.shape[0]
    for k in range(K):
        out[k] = b[k]
    for d in range(x.shape[0]):
        xd = x[d]
        row = WT[d]
        for k in range(K):
            out[k] += xd * row[k]


@njit(**JIT)
def _stack_step(cell, hs, cs, tmp_h, tmp_c, act, ax, ah, token, emb, WihT0, WihT_rest,
                WhhT, bih, bhh):
    """Feed one token through all layers, updating hs, cs (L, 1, H) in place."""
    L, _, H = hs.shape
    for l in range(L):
        inp = emb[token] if l == 0 else hs[l - 1, 0]
        _matvec_t(ax[0], inp, WihT0 if l == 0 else WihT_rest[l - 1], bih[l])
        _matvec_t(ah[0], hs[l, 0], WhhT[l], bhh[l])
        if cell == 0:
            for j in range(H):
                tmp_h[0, j] = act_tanh(ax[0, j] + ah[0, j])
        elif cell == 1:
            _gru_cell(tmp_h, act, ax, ah, hs[l], H)
        else:
            ax += ah
            _lstm_cell(tmp_h, tmp_c, ax, cs[l], H, 0, H)
        hs[l, :, :] = tmp_h
        if cell == 2:
            cs[l, :, :] = tmp_c


@njit(**JIT)
def stack_sample(out, hs, cs, prime, uniforms, cell, emb, WihT0, WihT_rest, WhhT,
                 bih, bhh, WoutT, bout, temperature, top_k, greedy):
    """Feed prime (P,) ids (P >= 1), then generate K = out.shape[0] tokens into out.

    hs, cs (L, 1, H) state in/out (cs unused for rnn/gru). uniforms (K,) in
    [0, 1) drawn by the caller. The weights as pack() lays them out. After the
    call the state has consumed prime and out[:-1], so the next call continues
    with prime = out[-1:].
    """
    L, _, H = hs.shape
    V = emb.shape[0]
    GH = WhhT.shape[2]
    tmp_h = np.empty((1, H), dtype=hs.dtype)
    tmp_c = np.zeros((1, H), dtype=hs.dtype)
    ax = np.empty((1, GH), dtype=hs.dtype)
    ah = np.empty((1, GH), dtype=hs.dtype)
    act = np.empty((1, 4 * H if cell == 1 else GH), dtype=hs.dtype)  # gru keeps 4H
    logits = np.empty(V, dtype=hs.dtype)
    scratch = np.empty(V, dtype=np.float64)
    for p in range(prime.shape[0]):
        _stack_step(cell, hs, cs, tmp_h, tmp_c, act, ax, ah, prime[p], emb, WihT0, WihT_rest, WhhT, bih, bhh)
    K = out.shape[0]
    for k in range(K):
        _matvec_t(logits, hs[L - 1, 0], WoutT, bout)
        tok = draw_token(logits, temperature, top_k, greedy, uniforms[k], scratch)
        out[k] = tok
        if k + 1 < K:
            _stack_step(cell, hs, cs, tmp_h, tmp_c, act, ax, ah, tok, emb, WihT0, WihT_rest, WhhT, bih, bhh)
