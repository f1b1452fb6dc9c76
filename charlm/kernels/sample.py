"""Compiled generation loop for a stack of L recurrent layers, batch 1.

Dimensions: V vocab, E embedding, H hidden, L layers, G gates (rnn 1, gru 3,
lstm 4), P prime length, K tokens to generate.

One sampler serves every cell: ``cell`` is 0 (rnn), 1 (gru) or 2 (lstm) and
selects the step kernel; all three have the same signature. (One loop instead
of three copies of it; Numba compiles the branch once per dtype.)
"""
import numpy as np
from numba import njit

from .common import JIT, draw_token
from .gru import gru_step_forward
from .lstm import lstm_step_forward
from .rnn import rnn_step_forward

CELL_CODES = {"rnn": 0, "gru": 1, "lstm": 2}


@njit(**JIT)
def _stack_step(cell, hs, cs, tmp_h, tmp_c, act, token, emb, Wih0, Wih_rest,
                Whh, bih, bhh):
    """Feed one token through all layers, updating hs, cs (L, 1, H) in place."""
    L = hs.shape[0]
    x = emb[token:token + 1]  # (1, E)
    for l in range(L):
        Wih = Wih0 if l == 0 else Wih_rest[l - 1]
        inp = x if l == 0 else hs[l - 1]
        if cell == 0:
            rnn_step_forward(tmp_h, tmp_c, act, inp, hs[l], cs[l], Wih, Whh[l], bih[l], bhh[l])
        elif cell == 1:
            gru_step_forward(tmp_h, tmp_c, act, inp, hs[l], cs[l], Wih, Whh[l], bih[l], bhh[l])
        else:
            lstm_step_forward(tmp_h, tmp_c, act, inp, hs[l], cs[l], Wih, Whh[l], bih[l], bhh[l])
        hs[l, :, :] = tmp_h
        cs[l, :, :] = tmp_c


@njit(**JIT)
def stack_sample(out, hs, cs, prime, uniforms, cell, emb, Wih0, Wih_rest, Whh,
                 bih, bhh, Wout, bout, temperature, top_k, greedy):
    """Feed prime (P,) ids (P >= 1), then generate K = out.shape[0] tokens into out.

    hs, cs (L, 1, H) state in/out (cs unused for rnn/gru). uniforms (K,) in
    [0, 1) drawn by the caller. emb (V, E); Wih0 (G*H, E); Wih_rest
    (max(L-1, 1), G*H, H); Whh (L, G*H, H); bih, bhh (L, G*H); Wout (V, H);
    bout (V,). After the call the state has consumed prime and out[:-1], so
    the next call continues with prime = out[-1:].
    """
    L, _, H = hs.shape
    V = emb.shape[0]
    GH = Whh.shape[1]
    tmp_h = np.empty((1, H), dtype=hs.dtype)
    tmp_c = np.zeros((1, H), dtype=hs.dtype)
    act = np.empty((1, 4 * H if cell == 1 else GH), dtype=hs.dtype)  # gru keeps 4H
    logits = np.empty(V, dtype=hs.dtype)
    scratch = np.empty(V, dtype=np.float64)
    for p in range(prime.shape[0]):
        _stack_step(cell, hs, cs, tmp_h, tmp_c, act, prime[p], emb, Wih0, Wih_rest, Whh, bih, bhh)
    K = out.shape[0]
    for k in range(K):
        top = hs[L - 1, 0]
        np.dot(Wout, top, logits)
        logits += bout
        tok = draw_token(logits, temperature, top_k, greedy, uniforms[k], scratch)
        out[k] = tok
        if k + 1 < K:
            _stack_step(cell, hs, cs, tmp_h, tmp_c, act, tok, emb, Wih0, Wih_rest, Whh, bih, bhh)
