"""Output heads: from the last layer's output (M, H) to exact log-probabilities over the vocabulary.

    FullSoftmax       decoder.weight (V, H), decoder.bias (V,): softmax(W h + b) over all V tokens;
                      with cfg.tie the weight is the embedding table (embedding.weight, V x E, E == H)
    AdaptiveSoftmax   charlm.lm.adaptive: a head over the frequent words plus one token per tail
                      cluster, tails with narrower projections (Grave et al. 2017); exact too

A head has the interface (M rows, targets < 0 are padding, skipped):

    param_shapes()                             names and shapes of its own parameters
    init_params(rng, dtype)                    new arrays for them
    loss(params, top, targets, parts)          float64 sum of -ln P(target) over the rows
    loss_and_backward(params, top, targets, scale, dtop, grads, parts)
                                               the same sum; dtop (M, H) OVERWRITTEN with scale x its
                                               gradient (skipped when dtop has shape (0, 0)); grads ADDED
    gather(params, top, targets, out, parts)   out (M,) float64 = ln P(target), 0 for padding
    log_probs(params, top, out, parts)         out (M, V): scores whose softmax is the distribution
                                               (exact log-probabilities for the adaptive head, the
                                               logits for the full one)

build_head(cfg) picks the head of a configuration.
"""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..kernels import layers


class FullSoftmax:
    """The decoder (nn.Linear(H, V)) and a softmax over every token. Tied (cfg.tie): the weight is
    the embedding table, so its gradient adds into embedding.weight's."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.weight_name = "embedding.weight" if cfg.tie else "decoder.weight"
        self._buf: dict[tuple, np.ndarray] = {}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        V, H = self.cfg.vocab_size, self.cfg.hidden
        return ({} if self.cfg.tie else {"decoder.weight": (V, H)}) | {"decoder.bias": (V,)}

    def init_params(self, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
        """U(-0.1, 0.1) weight and a zero bias, as PyTorch's word-language-model example."""
        out = {}
        for name, shape in self.param_shapes().items():
            a = np.zeros(shape) if name == "decoder.bias" else rng.uniform(-0.1, 0.1, size=shape)
            out[name] = np.ascontiguousarray(a, dtype=dtype)
        return out

    def _logits(self, params, top: np.ndarray, parts: int) -> np.ndarray:
        """The logits (M, V) of top (M, H) in a buffer kept for that shape (overwritten by the next call)."""
        key = (top.shape[0], top.dtype)
        buf = self._buf.get(key)
        if buf is None:
            if len(self._buf) > 4:  # odd window lengths (evaluation tails) come and go
                self._buf.clear()
            buf = self._buf[key] = np.empty((top.shape[0], self.cfg.vocab_size), top.dtype)
        layers.linear_forward(buf, top, params[self.weight_name], params["decoder.bias"], parts)
        return buf

    def loss(self, params, top, targets, parts=1) -> float:
        logits = self._logits(params, top, parts)
        return float(layers.softmax_xent_forward(logits, logits, targets, parts))

    def loss_and_backward(self, params, top, targets, scale, dtop, grads, parts=1) -> float:
        logits = self._logits(params, top, parts)
        total = float(layers.softmax_xent_forward(logits, logits, targets, parts))
        layers.softmax_xent_backward(logits, logits, targets, scale, parts)  # logits := d(scaled sum)/d logits
        if dtop.shape[0]:
            dtop.fill(0)
        layers.linear_backward(dtop, grads[self.weight_name], grads["decoder.bias"], logits, top,
                               params[self.weight_name], parts)
        return total

    def gather(self, params, top, targets, out, parts=1) -> None:
        layers.log_softmax_gather(out, self._logits(params, top, parts), targets, parts)

    def log_probs(self, params, top, out, parts=1) -> None:
        layers.linear_forward(out, top, params[self.weight_name], params["decoder.bias"], parts)


def build_head(cfg: ModelConfig):
    """The output head of cfg: FullSoftmax, or the adaptive softmax (charlm.lm.adaptive)."""
    if cfg.softmax == "adaptive":
        from .adaptive import AdaptiveSoftmax
        return AdaptiveSoftmax(cfg)
    return FullSoftmax(cfg)
