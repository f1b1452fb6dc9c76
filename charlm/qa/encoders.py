"""The sentence encoders of the memory network (charlm.qa.model): S sentences of up to J
words, ids (S, J) with lengths (S,), to vectors (S, d) through embedding k (E, (V, d)).
A sentence x_1..x_L becomes

    bow    sum_j E[x_j]
    pe     sum_j l_j * E[x_j],  l_kj = (1 - j/L) - (k/d)(1 - 2j/L)    (position encoding)
    gru    pe + the last state of a GRU (H = d) run over E[x_1..x_L]
    bigru  pe + [forward GRU state after x_L ; backward GRU state after x_1]  (H = d/2 each),
           the backward GRU reading the sentence reversed within its own length

The GRUs are charlm's Numba kernels (charlm.kernels.gru); the PE term is a residual
path beside them.

`cfg` is the network's QAConfig: the encoder, dim, and the GRU directions and width it implies.
"""
from __future__ import annotations

import numpy as np

from ..kernels.gru import gru_backward, gru_forward
from ..kernels.layers import embedding_backward

ENCODERS = ("bow", "pe", "gru", "bigru")


def word_weights(lens: np.ndarray, J: int, d: int, encoder: str, dtype) -> np.ndarray:
    """Per-word weights (S, J, d) for the bag: position encoding, or ones for bow
    ((S, J, 1)); zero past each sentence's length."""
    j = np.arange(1, J + 1, dtype=np.float64)[None, :, None]
    L = np.maximum(lens, 1).astype(np.float64)[:, None, None]
    valid = j <= lens[:, None, None]
    if encoder == "bow":
        return valid.astype(dtype)
    kd = np.arange(1, d + 1, dtype=np.float64)[None, None, :] / d
    w = (1.0 - j / L) - kd * (1.0 - 2.0 * j / L)
    return (w * valid).astype(dtype)


def reverse_ids(ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Each row of ids (S, J) reversed within its own length; padding stays at the end."""
    J = ids.shape[1]
    t = np.arange(J)[None, :]
    src = lens[:, None] - 1 - t                             # (S, J)
    ok = src >= 0
    out = np.take_along_axis(ids, np.where(ok, src, 0), axis=1)
    return np.where(ok, out, 0).astype(ids.dtype)


def _gru_run(params, prefix, xt):
    """GRU over xt (J, S, d) from h0 = 0; returns hs (J+1, S, H), acts."""
    Wih = params[prefix + ".Wih"]
    J, S, _ = xt.shape
    H = Wih.shape[0] // 3
    hs = np.zeros((J + 1, S, H), xt.dtype)
    acts = np.empty((J, S, 4 * H), xt.dtype)
    cs = np.zeros((1, 1, 1), xt.dtype)
    gru_forward(hs, cs, acts, xt, Wih, params[prefix + ".Whh"], params[prefix + ".bih"],
                params[prefix + ".bhh"], 1)
    return hs, acts


def encoder_forward(params, cfg, k: int, ids: np.ndarray, lens: np.ndarray, w: np.ndarray):
    """Encode sentences ids (S, J) with lengths lens (S,) through embedding k; w the word
    weights (word_weights). Returns out (S, d) and the cache for encoder_backward."""
    E = params[f"emb{k}"]
    x = E[ids]                                              # (S, J, d)
    out = (x * w).sum(1)                                    # (S, d) the weighted bag
    cache = {"ids": ids, "lens": lens, "w": w, "runs": []}
    if cfg.directions:
        S = ids.shape[0]
        rows = np.arange(S)
        H = cfg.gru_hidden
        for r, col in zip(cfg.directions, range(0, cfg.dim, H)):
            rid = ids if r == "f" else reverse_ids(ids, lens)
            xt = np.ascontiguousarray(E[rid].transpose(1, 0, 2))   # (J, S, d)
            hs, acts = _gru_run(params, f"gru{k}{r}", xt)
            out[:, col:col + H] += hs[lens, rows]          # state after each sentence's last word
            cache["runs"].append((r, col, rid, xt, hs, acts))
    return out, cache


def encoder_backward(grads, params, cfg, k: int, dout: np.ndarray, cache) -> None:
    """ADDS the gradients of encoder_forward's out (dout (S, d)) into grads[emb{k}] and the GRUs'."""
    ids, lens, w = cache["ids"], cache["lens"], cache["w"]
    S, J = ids.shape
    d = dout.shape[1]
    dE = grads[f"emb{k}"]
    embedding_backward(dE, np.ascontiguousarray((dout[:, None, :] * w).reshape(S * J, d)), ids.reshape(-1))
    H = cfg.gru_hidden
    has = lens > 0
    rows = np.arange(S)[has]
    for r, col, rid, xt, hs, acts in cache["runs"]:
        p = f"gru{k}{r}"
        dhs = np.zeros((J, S, H), dout.dtype)
        dhs[lens[has] - 1, rows] = dout[has, col:col + H]
        dx = np.zeros_like(xt)
        dh0 = np.zeros((S, H), dout.dtype)
        dacts = np.empty((J, S, 3 * H), dout.dtype)
        dacts_h = np.empty((J, S, 3 * H), dout.dtype)
        gru_backward(dx, grads[p + ".Wih"], grads[p + ".Whh"], grads[p + ".bih"], grads[p + ".bhh"], dh0,
                     dh0, dacts, dacts_h, dhs, hs, np.zeros((1, 1, 1), dout.dtype), acts, xt,
                     params[p + ".Wih"], params[p + ".Whh"], 1)
        embedding_backward(dE, np.ascontiguousarray(dx.transpose(1, 0, 2)).reshape(S * J, d), rid.reshape(-1))
