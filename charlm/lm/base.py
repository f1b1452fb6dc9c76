"""What every language model of charlm shares: the carried State, the workspace cache,
and the scoring and training methods, written once over the hooks each model provides.

The models (peers, built by charlm.lm.models from a config's cell):

    Model      charlm.lm.model   embedding -> L recurrent layers (rnn, gru, lstm) -> decoder;
                                 its module docstring has the parameter names (torch.nn's)
    EsnModel   charlm.lm.esn     fixed random reservoir -> trained readout (decoder)

A model subclasses BaseModel and provides

    cells                        the config cells it implements (the factory's registry keys)
    check_params, init_params    static: validate / draw the arrays of a config
    workspace_type               the class of its per-(T, N) workspace: every array one pass needs
    state_layers                 rows of State.h / State.c
    _forward(x, state, rng)      fill the workspace from ids x (T, N) up to .top (T*N, H), the
                                 input of the output head (charlm.lm.heads); rng draws dropout
                                 masks (training) or is None
    _final_state(ws)             the State after the window, in new arrays
    _dtop(ws)                    the (T*N, H) array the head writes dL/dtop into ((0, 0): not needed)
    _backward(ws, x, grads, rng) ADD d(mean loss)/d(trainable) into grads, given dL/dtop in
                                 _dtop(ws) and the head's gradients already in grads (the caller
                                 zeroes grads)
    sampler()                    the generation step for charlm.lm.sample.generate

and gets loss, token_logprobs, probs_last, logits_last, loss_and_grads, forward, zero_state, zero_grads.

The output head (self.head: full softmax, tied or not, or adaptive softmax) turns .top into
exact log-probabilities; every scoring and training method goes through it.

Dimensions: N batch, T time, V vocab, H hidden, L state layers, M = T*N.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..runtime import governed, parts
from .heads import build_head

# out (k,) int32, lps (k,) float64, hs (L, 1, H), cs (L, 1, H), seen (V,) uint8, feed ids, uniforms (k,),
# temperature, top_k, top_p, repetition penalty, greedy
SampleStep = Callable[..., None]


@dataclass
class State:
    """Recurrent state carried between windows: h, c (L, N, H); c is zeros but for the LSTM."""
    h: np.ndarray
    c: np.ndarray

    def copy(self) -> "State":
        return State(self.h.copy(), self.c.copy())


class BaseModel:
    """Parameters plus the passes over (T, N) windows of token ids (see the module docstring).
    ``params`` holds every array (what a checkpoint saves); ``trainable`` what the optimizer updates."""

    cells: tuple[str, ...] = ()
    workspace_type: type
    check_params: Callable[[ModelConfig, dict], None]
    init_params: Callable[..., dict]

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray]):
        self.check_params(cfg, params)
        self.cfg = cfg
        self.params = params
        self.head = build_head(cfg)
        self.dtype = params["decoder.bias" if "decoder.bias" in params else "decoder.head.weight"].dtype
        self._ws: dict[tuple[int, int], object] = {}
        # sparse_grads (set by the trainer when one process owns its gradients): the gradient of
        # sparse_param() is zero outside the rows of the ids a window used, so loss_and_grads zeroes
        # only the rows it wrote last time into that same array, and touched() names the rows
        self.sparse_grads = False
        self._touched: tuple | None = None  # (weakref to the gradient array, its written rows)
        # sampler_cache: None (the default), or a dict in which sampler() keeps what it prepares from
        # the weights (the batch-1 sampler's packed copy) for the next call. Only for a model whose
        # weights no longer change in place (charlm.load's LanguageModel sets it; training never does)
        self.sampler_cache: dict | None = None

    def sparse_param(self) -> str | None:
        """The parameter whose gradient is zero outside the rows of a window's input ids (an input
        embedding not shared with the output layer), or None."""
        return None

    def touched(self) -> dict[str, np.ndarray] | None:
        """After loss_and_grads with sparse_grads: {sparse_param(): the rows of its gradient that may be
        nonzero, ascending (int64)}; else None."""
        if not self.sparse_grads or self._touched is None:
            return None
        return {self.sparse_param(): self._touched[1]}

    @classmethod
    def create(cls, cfg: ModelConfig, seed: int = 0, dtype=np.float32):
        """A freshly initialised model of cfg, drawn from seed."""
        return cls(cfg, cls.init_params(cfg, np.random.default_rng(seed), dtype))

    @property
    def trainable(self) -> dict[str, np.ndarray]:
        """The parameters the optimizer updates (by default all of them)."""
        return self.params

    @property
    def state_layers(self) -> int:
        return self.cfg.layers

    def zero_state(self, N: int) -> State:
        L, H = self.state_layers, self.cfg.hidden
        return State(np.zeros((L, N, H), self.dtype), np.zeros((L, N, H), self.dtype))

    def zero_grads(self) -> dict[str, np.ndarray]:
        return {n: np.zeros_like(p) for n, p in self.trainable.items()}

    def _workspace(self, T: int, N: int):
        ws = self._ws.get((T, N))
        if ws is None:
            if len(self._ws) > 4:  # windows of odd lengths (eval tails) come and go
                self._ws.clear()
            ws = self._ws[(T, N)] = self.workspace_type(self.cfg, T, N, self.dtype)
        return ws

    # ---------------------------------------------------------------- hooks
    def _forward(self, x: np.ndarray, state: State, rng: np.random.Generator | None):
        raise NotImplementedError

    def _final_state(self, ws) -> State:
        raise NotImplementedError

    def _dtop(self, ws) -> np.ndarray:
        raise NotImplementedError

    def _backward(self, ws, x: np.ndarray, grads: dict[str, np.ndarray], rng: np.random.Generator | None) -> None:
        raise NotImplementedError

    def sampler(self, precision: str = "float32") -> SampleStep:
        """step(out, lps, hs, cs, seen, feed, uniforms, temperature, top_k, top_p, penalty, greedy):
        feed the ids `feed` from the state (hs, cs) (updated in place), then sample len(out)
        tokens into out (their ln P into lps), each fed back as the next input; seen (V,) uint8
        marks the tokens the repetition penalty applies to (kernels.layers.pick_token). precision "bf16":
        the weights stored as bfloat16 (kernels.sample), where the model has such a sampler."""
        raise NotImplementedError

    # ---------------------------------------------------------------- forward
    def forward(self, x: np.ndarray, state: State):
        """The workspace after a pass over ids x (T, N) from state, without dropout: .top (T*N, H),
        the output head's input, and the model's caches. Its arrays are reused by the next pass
        of the same shape: copy what you keep."""
        return self._forward(x, state, None)

    def loss(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[float, State]:
        """Mean cross-entropy (nats) of targets y (T, N) given inputs x (T, N); no dropout."""
        with governed(x.size, ("loss", x.shape[1])):
            return self._loss(x, y, state)

    def _loss(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[float, State]:
        ws = self._forward(x, state, None)
        total = self.head.loss(self.params, ws.top, np.ascontiguousarray(y, dtype=np.int32).reshape(-1), parts())
        return float(total) / y.size, self._final_state(ws)  # float: a NumPy scalar without the JIT

    def token_logprobs(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """log P(y[t, n] | inputs up to x[t, n]) as float64 (T, N), and the state after."""
        with governed(x.size, ("score", x.shape[1])):
            return self._token_logprobs(x, y, state)

    def _token_logprobs(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        ws = self._forward(x, state, None)
        out = np.empty(y.size, dtype=np.float64)
        self.head.gather(self.params, ws.top, np.ascontiguousarray(y, dtype=np.int32).reshape(-1), out, parts())
        return out.reshape(y.shape), self._final_state(ws)

    def _last_scores(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Scores (N, V) after the last input of x (T, N) (a new array; their softmax is the
        next-token distribution) and the state after x."""
        with governed(x.size, ("last", x.shape[1])):
            return self._scores_after(x, state)

    def _scores_after(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        ws = self._forward(x, state, None)
        T, N = x.shape
        top = np.ascontiguousarray(ws.top.reshape(T, N, -1)[-1])
        out = np.empty((N, self.cfg.vocab_size), self.dtype)
        self.head.log_probs(self.params, top, out, parts())
        return out, self._final_state(ws)

    def probs_last(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Next-token distribution after the last input of x (T, N): (N, V) float64."""
        last, new_state = self._last_scores(x, state)
        last = last.astype(np.float64)
        last -= last.max(axis=1, keepdims=True)
        e = np.exp(last)
        return e / e.sum(axis=1, keepdims=True), new_state

    def logits_last(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Logits (N, V) after the last input of x (T, N) (a copy; for the adaptive softmax the
        log-probabilities, which are logits of the same distribution) and the state after x: one
        step of N streams decoded side by side (charlm.lm.sample, charlm.lm.beam)."""
        return self._last_scores(x, state)

    # --------------------------------------------------------------- backward
    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, state: State, grads: dict[str, np.ndarray],
                       rng: np.random.Generator | None = None) -> tuple[float, State]:
        """Mean cross-entropy over the window and its exact gradient with respect to the
        trainable parameters (truncated BPTT: no gradient flows into the carried state).
        Overwrites grads. rng draws the dropout masks (needed when dropout > 0)."""
        with governed(x.size, ("train", x.shape[1])):
            return self._loss_and_grads(x, y, state, grads, rng)

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray, state: State, grads: dict[str, np.ndarray],
                        rng: np.random.Generator | None) -> tuple[float, State]:
        T, N = x.shape
        M = T * N
        n_parts = parts()
        ws = self._forward(x, state, rng)
        targets = np.ascontiguousarray(y, dtype=np.int32).reshape(M)  # int32 ids, whatever the caller passes: one signature per kernel
        sparse = self.sparse_param() if self.sparse_grads else None
        for name, g in grads.items():
            if name == sparse and self._touched is not None and self._touched[0]() is g:
                g[self._touched[1]] = 0  # the only rows the last window wrote
            else:
                g.fill(0)
        self._touched = None
        if sparse is not None:
            self._touched = (weakref.ref(grads[sparse]), np.unique(x).astype(np.int64))
        total = self.head.loss_and_backward(self.params, ws.top, targets, 1.0 / M, self._dtop(ws), grads, n_parts)
        self._backward(ws, x, grads, rng)
        return float(total) / M, self._final_state(ws)
