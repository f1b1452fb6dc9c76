"""The recurrent language model (cells rnn, gru, lstm): embedding -> L recurrent layers ->
linear decoder -> softmax. Model is a BaseModel (charlm.lm.base: scoring, training step,
state) beside the ESN (charlm.lm.esn); charlm.lm.models builds either from a config.

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

Tied (--tie, embed == hidden): there is no decoder.weight; the decoder's weight is
embedding.weight (in torch: ``decoder.weight = embedding.weight``). Adaptive softmax
(--softmax adaptive): ``decoder`` is nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs,
div_value, head_bias=True) and its arrays are its state_dict's (charlm.lm.adaptive):

    decoder.head.weight         (c0 + K, H)    c0 = cutoffs[0], K tail clusters
    decoder.head.bias           (c0 + K,)
    decoder.tail.{i}.0.weight   (H // div_value**(i+1), H)
    decoder.tail.{i}.1.weight   (cluster i's words, H // div_value**(i+1))

Dropout (training only): --dropout p on the output of every recurrent layer but the
last, as torch.nn.LSTM(dropout=p) does; --dropout-in on the embeddings and
--dropout-out on the last layer's output, as PyTorch's word-language-model example
(nn.Dropout before the LSTM and before the decoder); --variational draws one mask
per window and stream, shared by its time steps (Gal & Ghahramani 2016).

Dimensions: N batch, T time, V vocab, E embedding, H hidden, L layers,
G gates (rnn 1, gru 3, lstm 4), M = T*N.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..runtime import governed, parts
from ..errors import CharlmError
from ..kernels import gru, layers, lstm, rnn
from ..kernels.sample import CELL_CODES, pack, stack_sample
from ..kernels.sample import draw_tokens
from .base import BaseModel, SampleStep, State
from .heads import build_head
from .precompile import forward_split, sampler_split

_CELL_KERNELS = {
    "rnn": (rnn.rnn_forward, rnn.rnn_backward),
    "gru": (gru.gru_forward, gru.gru_backward),
    "lstm": (lstm.lstm_forward, lstm.lstm_backward),
}


def acts_width(cfg: ModelConfig) -> int:
    """Width of the per-step activation cache: gru keeps [r, z, n, ah_n]."""
    return 4 * cfg.hidden if cfg.cell == "gru" else cfg.gates * cfg.hidden


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter, in a fixed order (the output head's last)."""
    V, E, H, G = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.gates
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (V, E)}
    for k in range(cfg.layers):
        D = E if k == 0 else H
        shapes[f"rnn.weight_ih_l{k}"] = (G * H, D)
        shapes[f"rnn.weight_hh_l{k}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{k}"] = (G * H,)
        shapes[f"rnn.bias_hh_l{k}"] = (G * H,)
    shapes.update(build_head(cfg).param_shapes())
    return shapes


def init_params(cfg: ModelConfig, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """PyTorch's initialisation for the recurrent layers (U(-1/sqrt(H), 1/sqrt(H)));
    embedding and decoder U(-0.1, 0.1) with a zero decoder bias, as in PyTorch's
    word-language-model example, so the loss at initialisation is close to ln V.
    Drawn in param_shapes' order from rng (the head's own rule for its arrays)."""
    params = {}
    k = 1.0 / math.sqrt(cfg.hidden)
    head = build_head(cfg)
    for name, shape in param_shapes(cfg).items():
        if name.startswith("rnn."):
            a = rng.uniform(-k, k, size=shape)
        elif name == "embedding.weight":
            a = rng.uniform(-0.1, 0.1, size=shape)
        else:
            break  # the head's, drawn below in the same order
        params[name] = np.ascontiguousarray(a, dtype=dtype)
    params.update(head.init_params(rng, dtype))
    return params


def check_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> None:
    """Every expected array present, with the right shape and one float dtype, every value finite."""
    # far fewer arrays than the layers need (a forged `layers`): say so before building the list of
    # names; a few missing arrays are named below
    if len(params) + 16 < 4 * cfg.layers + 2:
        raise CharlmError(f"checkpoint has {len(params)} parameter arrays; {cfg.layers} layers need {4 * cfg.layers + 3}")
    shapes = param_shapes(cfg)
    missing = [n for n in shapes if n not in params]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CharlmError(f"checkpoint is missing parameters: {', '.join(missing[:5])}{more}")
    dtypes = {params[n].dtype for n in shapes}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise CharlmError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    for n, s in shapes.items():
        if params[n].shape != s:
            raise CharlmError(f"parameter {n} has shape {params[n].shape}, expected {s}")
    for n in shapes:
        if not np.isfinite(params[n]).all():
            raise CharlmError(f"parameter {n} is not finite (NaN or infinity): the weights are unusable")


class Workspace:
    """Every array one forward/backward pass over a (T, N) window needs, allocated once:
    emb (T, N, E); per layer k hs[k], cs[k] (T+1, N, H) with [0] the carried state (cs: lstm,
    else a (1, 1, 1) dummy), acts[k] (T, N, acts_width) the activation caches; top (M, H) the
    output head's input and dtop (M, H) its gradient.

    Dropout (training passes): masks[k] scales layer k's input (k = 0: the embeddings, --dropout-in;
    k > 0: the layer below's output, --dropout), mask_out the last layer's output (--dropout-out);
    each (T, N, D), or (1, N, D) with --variational (one mask per window and stream). inputs[k] is
    the dropped-out input layer k reads; used[k] the input the last pass gave layer k."""

    def __init__(self, cfg: ModelConfig, T: int, N: int, dtype):
        L, E, H, GH = cfg.layers, cfg.embed, cfg.hidden, cfg.gates * cfg.hidden
        z = lambda *s: np.zeros(s, dtype=dtype)
        Tm = 1 if cfg.variational else T
        self.emb = z(T, N, E)
        self.hs = [z(T + 1, N, H) for _ in range(L)]
        self.cs = [z(T + 1, N, H) if cfg.cell == "lstm" else z(1, 1, 1) for _ in range(L)]
        self.acts = [z(T, N, acts_width(cfg)) for _ in range(L)]
        self.dacts = z(T, N, GH)
        self.dacts_h = z(T, N, GH) if cfg.cell == "gru" else self.dacts
        self.dhs = [z(T, N, H) for _ in range(L)]
        self.dx = [z(T, N, E if k == 0 else H) for k in range(L)]
        rates = [cfg.dropout_in] + [cfg.dropout] * (L - 1)
        self.inputs = [z(T, N, E if k == 0 else H) if rates[k] > 0 else None for k in range(L)]
        self.masks = [z(Tm, N, E if k == 0 else H) if rates[k] > 0 else None for k in range(L)]
        self.used: list = [None] * L
        self.mask_out = z(Tm, N, H) if cfg.dropout_out > 0 else None
        self.top_buf = z(T * N, H) if cfg.dropout_out > 0 else None
        self.top = self.hs[-1][1:].reshape(T * N, H)
        self.dtop = z(T * N, H) if cfg.dropout_out > 0 else self.dhs[-1].reshape(T * N, H)
        self.out_dropped = False
        self.dh0 = z(N, H)
        self.dc0 = z(N, H)


def _draw_mask(rng, p: float, mask: np.ndarray) -> np.ndarray:
    """Fill mask (its shape: per step, or (1, N, D) variational) with inverted-dropout scales
    (0 or 1 / (1 - p)) drawn from rng; returns it."""
    keep = rng.random(mask.shape, dtype=np.float32) >= p
    np.multiply(keep, 1.0 / (1.0 - p), out=mask, casting="unsafe")
    return mask


class Model(BaseModel):
    """The recurrent model (rnn, gru, lstm): parameters plus the forward and backward passes
    over (T, N) windows of ids. Scoring and training are BaseModel's."""

    cells = ("rnn", "gru", "lstm")
    workspace_type = Workspace
    check_params = staticmethod(check_params)
    init_params = staticmethod(init_params)

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray]):
        super().__init__(cfg, params)
        self._fwd, self._bwd = _CELL_KERNELS[cfg.cell]
        self._first_pass = True

    def _token_logprobs(self, x: np.ndarray, y: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        self._split_first_pass()
        return super()._token_logprobs(x, y, state)

    def _scores_after(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        self._split_first_pass()
        return super()._scores_after(x, state)

    def _split_first_pass(self) -> None:
        """Before this model's first pass that scores: from an empty cache, compile the forward in two
        processes (charlm.lm.precompile.forward_split)."""
        if self._first_pass:
            self._first_pass = False
            split = forward_split(self)
            if split is not None:
                split.finish()

    # ---------------------------------------------------------------- forward
    def _forward(self, x: np.ndarray, state: State, rng: np.random.Generator | None) -> Workspace:
        """Run the stack over ids x (T, N); fills the workspace up to top (M, H). Dropout masks
        are drawn from rng when it is given (training), else no dropout; the draws come in the
        order embeddings, between layers bottom up, output (StreamDropout counts them)."""
        T, N = x.shape
        cfg, p = self.cfg, self.params
        ws = self._workspace(T, N)
        ids = np.ascontiguousarray(x, dtype=np.int32).reshape(T * N)  # one id type for the kernels
        layers.embedding_forward(ws.emb.reshape(T * N, cfg.embed), ids, p["embedding.weight"])
        rates = [cfg.dropout_in] + [cfg.dropout] * (cfg.layers - 1)
        for k in range(cfg.layers):
            inp = ws.emb if k == 0 else ws.hs[k - 1][1:]
            if rng is not None and rates[k] > 0:
                np.multiply(inp, _draw_mask(rng, rates[k], ws.masks[k]), out=ws.inputs[k])
                inp = ws.inputs[k]
            ws.used[k] = inp
            ws.hs[k][0] = state.h[k]
            if cfg.cell == "lstm":
                ws.cs[k][0] = state.c[k]
            self._fwd(ws.hs[k], ws.cs[k], ws.acts[k], inp,
                      p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"],
                      p[f"rnn.bias_ih_l{k}"], p[f"rnn.bias_hh_l{k}"], parts())
        ws.out_dropped = rng is not None and cfg.dropout_out > 0
        top = ws.hs[-1][1:]
        if ws.out_dropped:
            np.multiply(top, _draw_mask(rng, cfg.dropout_out, ws.mask_out), out=ws.top_buf.reshape(T, N, -1))
            ws.top = ws.top_buf
        else:
            ws.top = top.reshape(T * N, cfg.hidden)
        return ws

    def _final_state(self, ws: Workspace) -> State:
        h = np.stack([hs[-1] for hs in ws.hs])
        c = np.stack([cs[-1] for cs in ws.cs]) if self.cfg.cell == "lstm" else np.zeros_like(h)
        return State(h, c)

    def _dtop(self, ws: Workspace) -> np.ndarray:
        return ws.dtop  # without output dropout, the top layer's dhs itself

    # --------------------------------------------------------------- backward
    def layer_backward(self, k: int, dx: np.ndarray, grads: dict[str, np.ndarray], dh0: np.ndarray,
                       dc0: np.ndarray, dacts: np.ndarray, dacts_h: np.ndarray, dhs: np.ndarray,
                       hs: np.ndarray, cs: np.ndarray, acts: np.ndarray, inp: np.ndarray) -> None:
        """The cell's backward kernel for layer k over the T steps of the given caches.

        ADDS into dx (T, N, D) (the gradient of the layer's input; (0, 0, 0) to skip it),
        grads["rnn.*_l{k}"], dh0 and dc0 (N, H) (the gradient of the initial state); the
        caller zeroes them. dacts, dacts_h (T, N, G*H) scratch (dacts_h only read for gru);
        dhs (T, N, H) the gradient arriving at each output h_1..h_T (overwritten); hs, cs
        (T+1, N, H) and acts (T, N, acts_width) the forward caches of those steps (cs: lstm,
        else a (1, 1, 1) dummy); inp (T, N, D) the layer's input."""
        p = self.params
        self._bwd(dx, grads[f"rnn.weight_ih_l{k}"], grads[f"rnn.weight_hh_l{k}"],
                  grads[f"rnn.bias_ih_l{k}"], grads[f"rnn.bias_hh_l{k}"], dh0, dc0,
                  dacts, dacts_h, dhs, hs, cs, acts, inp,
                  p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"], parts())

    def _backward(self, ws: Workspace, x: np.ndarray, grads: dict[str, np.ndarray],
                  rng: np.random.Generator | None) -> None:
        """Backpropagation through the window, from dL/dtop (the head's): layers top to bottom,
        then the embedding (its gradient adds to the tied decoder's, which the head wrote)."""
        cfg = self.cfg
        T, N = x.shape
        M = T * N
        for d in ws.dhs[:-1]:
            d.fill(0)
        ws.dh0.fill(0)
        ws.dc0.fill(0)
        if ws.out_dropped:
            np.multiply(ws.dtop.reshape(T, N, -1), ws.mask_out, out=ws.dhs[-1])
        elif cfg.dropout_out > 0:
            ws.dhs[-1][...] = ws.dtop.reshape(T, N, -1)  # output dropout configured but off (no rng)
        for k in range(cfg.layers - 1, -1, -1):
            inp = ws.used[k]
            dx = ws.dx[k]
            dx.fill(0)
            self.layer_backward(k, dx, grads, ws.dh0, ws.dc0, ws.dacts, ws.dacts_h, ws.dhs[k],
                                ws.hs[k], ws.cs[k], ws.acts[k], inp)
            if ws.inputs[k] is not None and inp is ws.inputs[k]:  # this pass dropped the input out
                np.multiply(dx, ws.masks[k], out=dx)
            if k > 0:
                ws.dhs[k - 1] += dx
        layers.embedding_backward(grads["embedding.weight"], ws.dx[0].reshape(M, cfg.embed),
                                  np.ascontiguousarray(x, dtype=np.int32).reshape(M))

    # --------------------------------------------------------------- sampling
    def sparse_param(self) -> str | None:
        return None if self.cfg.tie else "embedding.weight"  # tied: the output layer writes every row

    def sampler(self, precision: str = "float32") -> SampleStep:
        """The compiled stack sampler over this model's packed weights (see BaseModel.sampler);
        with the adaptive softmax, steps of the model's own forward pass and exact log-probabilities."""
        if self.cfg.softmax != "full":
            if precision != "float32":
                raise CharlmError(f"--precision {precision} is for models with the full softmax (this one has "
                                  f"--softmax {self.cfg.softmax}): drop --precision")
            return self._stepwise_sampler()
        n_parts = parts()
        key = ("packed", precision, n_parts)
        packed = None if self.sampler_cache is None else self.sampler_cache.get(key)
        if packed is None:  # 7-10 ms for a 2x512 model: once per call, or once per model with a cache
            split = sampler_split(self, precision)  # a first sample: compile in two processes
            params = self.params if not self.cfg.tie else {**self.params,
                                                           "decoder.weight": self.params["embedding.weight"]}
            packed = pack(params, self.cfg.layers, parts=n_parts, precision=precision)
            if split is not None:
                split.finish()
            if self.sampler_cache is not None:
                self.sampler_cache[key] = packed
        code = CELL_CODES[self.cfg.cell]

        def step(out, lps, hs, cs, seen, feed, u, temperature, top_k, top_p, penalty, greedy):
            with governed(len(out) + len(feed), "sample"):  # tokens fed and drawn
                stack_sample(out, lps, hs, cs, seen, feed, u, code, *packed, temperature, top_k, top_p, penalty,
                             greedy, n_parts)
        return step

    def _stepwise_sampler(self) -> SampleStep:
        """BaseModel.sampler's step from logits_last, one token at a time: draws from the exact
        distribution of any head."""
        def step(out, lps, hs, cs, seen, feed, u, temperature, top_k, top_p, penalty, greedy):
            state = State(hs, cs)
            scores, state = self.logits_last(np.asarray(feed, dtype=np.int32).reshape(-1, 1), state)
            for i in range(len(out)):
                draw_tokens(out[i:i + 1], lps[i:i + 1], seen[None], scores, u[i:i + 1], temperature, top_k,
                            top_p, penalty, greedy)
                if i + 1 < len(out):
                    scores, state = self.logits_last(out[i:i + 1].reshape(1, 1), state)
            hs[...] = state.h
            cs[...] = state.c
        return step
