"""The language model: embedding -> L recurrent layers -> linear decoder -> softmax.

This module is the one source of truth for parameter names and shapes. The names
are those of a PyTorch module with attributes ``embedding`` (nn.Embedding),
``rnn`` (nn.RNN / nn.GRU / nn.LSTM with batch_first=False) and ``decoder``
(nn.Linear), so a checkpoint's arrays load into ``state_dict`` one to one:

    embedding.weight        (V, E)
    rnn.weight_ih_l{k}      (G*H, E if k == 0 else H)
    rnn.weight_hh_l{k}      (G*H, H)
    rnn.bias_ih_l{k}        (G*H,)
    rnn.bias_hh_l{k}        (G*H,)
    decoder.weight          (V, H)
    decoder.bias            (V,)

Dropout p (if > 0) is applied to the output of every recurrent layer but the
last, as torch.nn.LSTM(dropout=p) does.

Dimensions: N batch, T time, V vocab, E embedding, H hidden, L layers,
G gates (rnn 1, gru 3, lstm 4), M = T*N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ..config import ModelConfig
from ..errors import CharlmError
from ..kernels import gru, layers, lstm, rnn

_CELL_KERNELS = {
    "rnn": (rnn.rnn_forward, rnn.rnn_backward),
    "gru": (gru.gru_forward, gru.gru_backward),
    "lstm": (lstm.lstm_forward, lstm.lstm_backward),
}


def acts_width(cfg: ModelConfig) -> int:
    """Width of the per-step activation cache: gru keeps [r, z, n, ah_n]."""
    return 4 * cfg.hidden if cfg.cell == "gru" else cfg.gates * cfg.hidden


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter, in a fixed order."""
    V, E, H, G = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.gates
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (V, E)}
    for k in range(cfg.layers):
        D = E if k == 0 else H
        shapes[f"rnn.weight_ih_l{k}"] = (G * H, D)
        shapes[f"rnn.weight_hh_l{k}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{k}"] = (G * H,)
        shapes[f"rnn.bias_hh_l{k}"] = (G * H,)
    shapes["decoder.weight"] = (V, H)
    shapes["decoder.bias"] = (V,)
    return shapes


def init_params(cfg: ModelConfig, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """PyTorch's initialisation for the recurrent layers (U(-1/sqrt(H), 1/sqrt(H)));
    embedding and decoder U(-0.1, 0.1) with a zero decoder bias, as in PyTorch's
    word-language-model example, so the loss at initialisation is close to ln V."""
    params = {}
    k = 1.0 / math.sqrt(cfg.hidden)
    for name, shape in param_shapes(cfg).items():
        if name.startswith("rnn."):
            a = rng.uniform(-k, k, size=shape)
        elif name == "decoder.bias":
            a = np.zeros(shape)
        else:
            a = rng.uniform(-0.1, 0.1, size=shape)
        params[name] = np.ascontiguousarray(a, dtype=dtype)
    return params


def check_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> None:
    """Every expected array present, with the right shape, one float dtype, finite."""
    if cfg.cell == "esn":
        from .esn import check_params as check_esn
        return check_esn(cfg, params)
    shapes = param_shapes(cfg)
    missing = [n for n in shapes if n not in params]
    if missing:
        raise CharlmError(f"checkpoint is missing parameters: {', '.join(missing)}")
    dtypes = {params[n].dtype for n in shapes}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise CharlmError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    for n, s in shapes.items():
        if params[n].shape != s:
            raise CharlmError(f"parameter {n} has shape {params[n].shape}, expected {s}")


def build_model(cfg: ModelConfig, params: dict[str, np.ndarray]):
    """The model a configuration describes, over the given parameters: Model, or EsnModel for cell esn."""
    if cfg.cell == "esn":
        from .esn import EsnModel
        return EsnModel(cfg, params)
    return Model(cfg, params)


def create_model(cfg: ModelConfig, seed: int = 0, dtype=np.float32):
    """A freshly initialised model of cfg (see build_model)."""
    if cfg.cell == "esn":
        from .esn import EsnModel
        return EsnModel.create(cfg, seed, dtype)
    return Model.create(cfg, seed, dtype)


@dataclass
class State:
    """Recurrent state carried between windows: h, c (L, N, H); c is zeros for rnn/gru."""
    h: np.ndarray
    c: np.ndarray

    def copy(self) -> "State":
        return State(self.h.copy(), self.c.copy())


class _Workspace:
    """Every array one forward/backward pass over a (T, N) window needs, allocated once."""

    def __init__(self, cfg: ModelConfig, T: int, N: int, dtype):
        L, E, H, V, GH = cfg.layers, cfg.embed, cfg.hidden, cfg.vocab_size, cfg.gates * cfg.hidden
        z = lambda *s: np.zeros(s, dtype=dtype)
        self.emb = z(T, N, E)
        self.hs = [z(T + 1, N, H) for _ in range(L)]
        self.cs = [z(T + 1, N, H) if cfg.cell == "lstm" else z(1, 1, 1) for _ in range(L)]
        self.acts = [z(T, N, acts_width(cfg)) for _ in range(L)]
        self.dacts = z(T, N, GH)
        self.dacts_h = z(T, N, GH) if cfg.cell == "gru" else self.dacts
        self.dhs = [z(T, N, H) for _ in range(L)]
        self.dx = [z(T, N, E if k == 0 else H) for k in range(L)]
        self.inputs = [self.emb] + [z(T, N, H) if cfg.dropout > 0 else None for _ in range(L - 1)]
        self.masks = [None] + [z(T, N, H) if cfg.dropout > 0 else None for _ in range(L - 1)]
        self.logits = z(T * N, V)
        self.dh0 = z(N, H)
        self.dc0 = z(N, H)


class Model:
    """Parameters plus the forward and backward passes over (T, N) windows of ids."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray]):
        check_params(cfg, params)
        self.cfg = cfg
        self.params = params
        self.dtype = params["embedding.weight"].dtype
        self._ws: dict[tuple[int, int], _Workspace] = {}
        self._fwd, self._bwd = _CELL_KERNELS[cfg.cell]

    @classmethod
    def create(cls, cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> "Model":
        return cls(cfg, init_params(cfg, np.random.default_rng(seed), dtype))

    @property
    def trainable(self) -> dict[str, np.ndarray]:
        """The parameters the optimizer updates: all of them (an ESN's reservoir is not)."""
        return self.params

    def zero_state(self, N: int) -> State:
        L, H = self.cfg.layers, self.cfg.hidden
        return State(np.zeros((L, N, H), self.dtype), np.zeros((L, N, H), self.dtype))

    def zero_grads(self) -> dict[str, np.ndarray]:
        return {n: np.zeros_like(p) for n, p in self.params.items()}

    def _workspace(self, T: int, N: int) -> _Workspace:
        ws = self._ws.get((T, N))
        if ws is None:
            if len(self._ws) > 4:  # windows of odd lengths (eval tails) come and go
                self._ws.clear()
            ws = self._ws[(T, N)] = _Workspace(self.cfg, T, N, self.dtype)
        return ws

    # ---------------------------------------------------------------- forward
    def _forward(self, x: np.ndarray, state: State, rng: np.random.Generator | None) -> _Workspace:
        """Run the stack over ids x (T, N); fills the workspace up to logits (M, V).
        Dropout masks are drawn from rng when it is given (training), else no dropout."""
        T, N = x.shape
        cfg, p = self.cfg, self.params
        ws = self._workspace(T, N)
        ids = np.ascontiguousarray(x).reshape(T * N)
        layers.embedding_forward(ws.emb.reshape(T * N, cfg.embed), ids, p["embedding.weight"])
        for k in range(cfg.layers):
            if k == 0:
                inp = ws.emb
            elif rng is not None and cfg.dropout > 0:
                keep = rng.random(ws.masks[k].shape, dtype=np.float32) >= cfg.dropout
                np.multiply(keep, 1.0 / (1.0 - cfg.dropout), out=ws.masks[k], casting="unsafe")
                inp = ws.inputs[k]
                np.multiply(ws.hs[k - 1][1:], ws.masks[k], out=inp)
            else:
                inp = ws.hs[k - 1][1:]
            ws.hs[k][0] = state.h[k]
            if cfg.cell == "lstm":
                ws.cs[k][0] = state.c[k]
            self._fwd(ws.hs[k], ws.cs[k], ws.acts[k], inp,
                      p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"],
                      p[f"rnn.bias_ih_l{k}"], p[f"rnn.bias_hh_l{k}"], numba.get_num_threads())
        top = ws.hs[-1][1:].reshape(T * N, cfg.hidden)
        layers.linear_forward(ws.logits, top, p["decoder.weight"], p["decoder.bias"], numba.get_num_threads())
        return ws

    def _final_state(self, ws: _Workspace) -> State:
        h = np.stack([hs[-1] for hs in ws.hs])
        c = np.stack([cs[-1] for cs in ws.cs]) if self.cfg.cell == "lstm" else np.zeros_like(h)
        return State(h, c)

    def loss(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[float, State]:
        """Mean cross-entropy (nats) of targets y (T, N) given inputs x (T, N); no dropout."""
        ws = self._forward(x, state, None)
        total = layers.softmax_xent_forward(ws.logits, ws.logits, np.ascontiguousarray(y).reshape(-1),
                                            numba.get_num_threads())
        return float(total) / y.size, self._final_state(ws)  # float: a NumPy scalar without the JIT

    def token_logprobs(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """log P(y[t, n] | inputs up to x[t, n]) as float64 (T, N), and the state after."""
        ws = self._forward(x, state, None)
        out = np.empty(y.size, dtype=np.float64)
        layers.log_softmax_gather(out, ws.logits, np.ascontiguousarray(y).reshape(-1), numba.get_num_threads())
        return out.reshape(y.shape), self._final_state(ws)

    def probs_last(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Next-token distribution after the last input of x (T, N): (N, V) float64."""
        ws = self._forward(x, state, None)
        T, N = x.shape
        last = ws.logits.reshape(T, N, -1)[-1].astype(np.float64)
        last -= last.max(axis=1, keepdims=True)
        e = np.exp(last)
        return e / e.sum(axis=1, keepdims=True), self._final_state(ws)

    # --------------------------------------------------------------- backward
    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, state: State, grads: dict[str, np.ndarray],
                       rng: np.random.Generator | None = None) -> tuple[float, State]:
        """Mean cross-entropy over the window and its exact gradient (truncated
        BPTT: no gradient flows into the carried state). Overwrites grads.
        rng draws the dropout masks (needed when dropout > 0)."""
        cfg, p = self.cfg, self.params
        T, N = x.shape
        M = T * N
        ws = self._forward(x, state, rng if cfg.dropout > 0 else None)
        targets = np.ascontiguousarray(y).reshape(M)
        targets_in = np.ascontiguousarray(x).reshape(M)
        parts = numba.get_num_threads()
        total = layers.softmax_xent_forward(ws.logits, ws.logits, targets, parts)
        layers.softmax_xent_backward(ws.logits, ws.logits, targets, 1.0 / M, parts)
        for g in grads.values():
            g.fill(0)
        for d in ws.dhs:
            d.fill(0)
        ws.dh0.fill(0)
        ws.dc0.fill(0)
        top = ws.hs[-1][1:].reshape(M, cfg.hidden)
        layers.linear_backward(ws.dhs[-1].reshape(M, cfg.hidden), grads["decoder.weight"],
                               grads["decoder.bias"], ws.logits, top, p["decoder.weight"], parts)
        dropout = cfg.dropout > 0 and rng is not None
        for k in range(cfg.layers - 1, -1, -1):
            inp = ws.emb if k == 0 else (ws.inputs[k] if dropout else ws.hs[k - 1][1:])
            dx = ws.dx[k]
            dx.fill(0)
            self._bwd(dx, grads[f"rnn.weight_ih_l{k}"], grads[f"rnn.weight_hh_l{k}"],
                      grads[f"rnn.bias_ih_l{k}"], grads[f"rnn.bias_hh_l{k}"], ws.dh0, ws.dc0,
                      ws.dacts, ws.dacts_h, ws.dhs[k], ws.hs[k], ws.cs[k], ws.acts[k], inp,
                      p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"], numba.get_num_threads())
            if k > 0:
                if dropout:
                    np.multiply(dx, ws.masks[k], out=dx)
                ws.dhs[k - 1] += dx
        layers.embedding_backward(grads["embedding.weight"], ws.dx[0].reshape(M, cfg.embed), targets_in)
        return float(total) / M, self._final_state(ws)
