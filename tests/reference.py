"""Plain NumPy reference implementations (no Numba) that the kernels are checked against.

Written from the equations of torch.nn.RNN / GRU / LSTM, not from the kernels:

    rnn:  h' = tanh(W_ih x + b_ih + W_hh h + b_hh)
    gru:  [r, z, n] blocks;  r = s(Wx_r x + b_ir + W_hr h + b_hr),  z = s(... z ...)
          n = tanh(Wx_n x + b_in + r * (W_hn h + b_hn));  h' = z * h + (1 - z) * n
    lstm: [i, f, g, o] blocks;  a = W_ih x + b_ih + W_hh h + b_hh
          c' = s(a_f) * c + s(a_i) * tanh(a_g);  h' = s(a_o) * tanh(c')

Dimensions: N batch, T time, D layer input, E embedding, H hidden, V vocab, L layers.
Arrays are time-major: x (T, N, D); histories (T+1, N, H) with row 0 the initial state.
"""
from __future__ import annotations

import numpy as np

CELLS = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


# ------------------------------------------------------------------ basics
def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def log_softmax(z, axis=-1):
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    s = z - m
    return s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))


def softmax(z, axis=-1):
    return np.exp(log_softmax(z, axis=axis))


# ------------------------------------------------------------------ cells
def rnn_step(x, h, c, Wih, Whh, bih, bhh):
    """x (N, D), h (N, H); c ignored. Returns (h', c)."""
    return np.tanh(x @ Wih.T + bih + h @ Whh.T + bhh), c


def gru_step(x, h, c, Wih, Whh, bih, bhh):
    """x (N, D), h (N, H); c ignored. Returns (h', c)."""
    H = h.shape[1]
    gx = x @ Wih.T + bih  # (N, 3H)
    gh = h @ Whh.T + bhh  # (N, 3H)
    r = sigmoid(gx[:, :H] + gh[:, :H])
    z = sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
    n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
    return z * h + (1.0 - z) * n, c


def lstm_step(x, h, c, Wih, Whh, bih, bhh):
    """x (N, D), h, c (N, H). Returns (h', c')."""
    H = h.shape[1]
    a = x @ Wih.T + bih + h @ Whh.T + bhh  # (N, 4H)
    i = sigmoid(a[:, :H])
    f = sigmoid(a[:, H:2 * H])
    g = np.tanh(a[:, 2 * H:3 * H])
    o = sigmoid(a[:, 3 * H:])
    c_new = f * c + i * g
    return o * np.tanh(c_new), c_new


STEPS = {"rnn": rnn_step, "gru": gru_step, "lstm": lstm_step}


def step(cell, x, h, c, Wih, Whh, bih, bhh):
    """One step of any cell: returns (h', c'); c' is c unchanged for rnn / gru."""
    return STEPS[cell](x, h, c, Wih, Whh, bih, bhh)


def sequence(cell, x, h0, c0, Wih, Whh, bih, bhh):
    """Run x (T, N, D) from h0, c0 (N, H). Returns hs, cs (T+1, N, H) with hs[0] = h0
    (cs is c0 repeated for rnn / gru)."""
    T = x.shape[0]
    hs = [np.asarray(h0)]
    cs = [np.asarray(c0)]
    for t in range(T):
        h, c = step(cell, x[t], hs[-1], cs[-1], Wih, Whh, bih, bhh)
        hs.append(h)
        cs.append(c)
    return np.stack(hs), np.stack(cs)


def rnn_sequence(x, h0, Wih, Whh, bih, bhh):
    return sequence("rnn", x, h0, np.zeros_like(h0), Wih, Whh, bih, bhh)[0]


def gru_sequence(x, h0, Wih, Whh, bih, bhh):
    return sequence("gru", x, h0, np.zeros_like(h0), Wih, Whh, bih, bhh)[0]


def lstm_sequence(x, h0, c0, Wih, Whh, bih, bhh):
    return sequence("lstm", x, h0, c0, Wih, Whh, bih, bhh)


# ------------------------------------------------------------------ full model
def num_layers(params):
    return sum(1 for name in params if name.startswith("rnn.weight_hh_l"))


def layer_params(params, k):
    return (params[f"rnn.weight_ih_l{k}"], params[f"rnn.weight_hh_l{k}"],
            params[f"rnn.bias_ih_l{k}"], params[f"rnn.bias_hh_l{k}"])


def model_forward(cell, params, x, h0, c0, masks=None):
    """Embedding -> L layers -> decoder. x (T, N) ids; h0, c0 (L, N, H).

    masks: optional list of L (T, N, H) multipliers applied to the input of
    layer k (None or masks[k] None: no dropout for that layer).
    Returns logits (T, N, V) float64, final h, c (L, N, H)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x)
    inp = p["embedding.weight"][x]  # (T, N, E)
    hT, cT = [], []
    for k in range(num_layers(p)):
        if k > 0 and masks is not None and masks[k] is not None:
            inp = inp * masks[k]
        hs, cs = sequence(cell, inp, np.asarray(h0[k], np.float64), np.asarray(c0[k], np.float64),
                          *layer_params(p, k))
        hT.append(hs[-1])
        cT.append(cs[-1] if cell == "lstm" else np.zeros_like(hs[-1]))
        inp = hs[1:]
    logits = inp @ p["decoder.weight"].T + p["decoder.bias"]
    return logits, np.stack(hT), np.stack(cT)


def model_token_logprobs(cell, params, x, y, h0, c0, masks=None):
    """log P(y[t, n]) (T, N), final h, c."""
    logits, h, c = model_forward(cell, params, x, h0, c0, masks)
    lp = log_softmax(logits, axis=-1)
    y = np.asarray(y)
    T, N = y.shape
    out = lp[np.arange(T)[:, None], np.arange(N)[None, :], y]
    return out, h, c


def model_loss(cell, params, x, y, h0, c0, masks=None):
    """Mean softmax cross-entropy (nats) over all T*N positions, final h, c."""
    lp, h, c = model_token_logprobs(cell, params, x, y, h0, c0, masks)
    return -lp.mean(), h, c


# ------------------------------------------------------------------ sampling
def draw(logits, temperature, u):
    """Inverse-CDF draw from softmax(logits / temperature) with uniform u in [0, 1)."""
    p = softmax(np.asarray(logits, np.float64) / temperature)
    return int(min(np.searchsorted(np.cumsum(p), u, side="right"), len(p) - 1))


def generate(cell, params, prime, K, h0, c0, greedy=True, temperature=1.0, uniforms=None):
    """Batch-1 generation loop: feed prime ids, then produce K ids (greedy argmax,
    or inverse-CDF draws with the given uniforms). h0, c0 (L, 1, H).
    Returns ids (K,), and the state (L, 1, H) after consuming prime and out[:-1]."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    L = num_layers(p)
    h = [np.array(h0[k], np.float64) for k in range(L)]
    c = [np.array(c0[k], np.float64) for k in range(L)]

    def feed(tok):
        inp = p["embedding.weight"][tok][None, :]  # (1, E)
        for k in range(L):
            h[k], c[k] = step(cell, inp, h[k], c[k], *layer_params(p, k))
            inp = h[k]

    for tok in prime:
        feed(int(tok))
    out = []
    for k in range(K):
        logits = h[-1][0] @ p["decoder.weight"].T + p["decoder.bias"]
        tok = int(np.argmax(logits)) if greedy else draw(logits, temperature, uniforms[k])
        out.append(tok)
        if k + 1 < K:
            feed(tok)
    return np.array(out), np.stack(h), np.stack(c)
