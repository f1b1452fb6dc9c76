"""The adaptive softmax output head (Grave et al. 2017), exact, with the layout of
torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs, div_value, head_bias=True).

Parameters (names as that module's state_dict under an attribute ``decoder``; K = len(cutoffs),
c_K = V, S = c_0 + K):

    decoder.head.weight       (S, H)      the shortlist words 0 .. c_0 - 1, then one row per tail cluster
    decoder.head.bias         (S,)
    decoder.tail.{i}.0.weight (P_i, H)    P_i = max(1, int(H // div_value ** (i + 1))) (PyTorch's formula,
                                          floored at 1 where PyTorch would give an empty layer)
    decoder.tail.{i}.1.weight (O_i, P_i)  O_i = c_{i+1} - c_i

    ln P(w) = lsm(head h)[w] for w < c_0, and for c_i <= w < c_{i+1}:
    ln P(w) = lsm(head h)[c_0 + i] + lsm(tail_i.1 tail_i.0 h)[w - c_i]

A training step computes the head on every row and each tail only on the rows whose target
falls in it (charlm.kernels.adaptive). The distribution is exact: log_probs gives every
token's ln P, and exp of it sums to 1.

Dimensions: M rows, H hidden, V vocab, K tail clusters, S head outputs, P_i / O_i a tail's
projection / cluster size.
"""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import CharlmError
from ..kernels import adaptive as ak
from ..kernels.parallel import n_parts

# A softmax layer is split between threads from this many logits (rows x outputs) up: below, the
# start and end of a parallel region (waking the other threads, waiting for the slowest) costs
# about what the split saves, and much more on a machine whose cores are busy with other work.
PARALLEL_MIN = 1 << 17


def tail_width(hidden: int, div_value: float, i: int) -> int:
    """Tail i's projection width: PyTorch's int(H // div_value ** (i + 1)), at least 1."""
    try:
        return max(1, int(hidden // (div_value ** (i + 1))))
    except OverflowError:
        return 1


class _Work:
    """Flat work arrays kept between calls, grown when a call needs more; views of them are
    C-contiguous. Each name is used for one purpose at a time within a call."""

    def __init__(self):
        self._flat: dict[tuple, np.ndarray] = {}

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        key = (name, dtype)
        flat = self._flat.get(key)
        if flat is None or flat.size < size:
            flat = self._flat[key] = np.empty(max(size, 1), dtype)
        return flat[:size].reshape(shape)


class AdaptiveSoftmax:
    """Exact adaptive softmax head: see the module docstring for the layout.

    The methods take the parameters as a dict (only the decoder.* names are read; arrays of
    the dtype of top, C-contiguous, or they are converted), top (M, H) float32 or float64 and
    `parts` threads. Work arrays are kept on the instance between calls (the largest layer's
    logits, M x (c_0 + K) for the head or rows x size for a tail, and one weight gradient's size),
    so one instance serves one thread at a time.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        V, H = int(cfg.vocab_size), int(cfg.hidden)
        cutoffs = tuple(int(c) for c in cfg.cutoffs)
        if not cutoffs:
            raise CharlmError("the adaptive softmax needs --cutoffs (ascending word ids below the vocabulary size)")
        if V < 2:
            raise CharlmError(f"the adaptive softmax needs a vocabulary of 2 tokens or more, got {V}")
        if cutoffs[0] < 1 or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])) or cutoffs[-1] >= V:
            raise CharlmError(f"--cutoffs must be positive, ascending and below the vocabulary size {V:,}, "
                              f"got {','.join(map(str, cutoffs))[:60]}")
        self.V, self.H, self.K = V, H, len(cutoffs)
        self.cutoffs = cutoffs
        self.bounds = cutoffs + (V,)                    # c_0 .. c_K
        self.cuts = np.array(self.bounds, dtype=np.int64)
        self.head_size = cutoffs[0] + self.K            # S
        self.tails = [(tail_width(H, float(cfg.div_value), i), self.bounds[i + 1] - self.bounds[i])
                      for i in range(self.K)]           # (P_i, O_i)
        self._work = _Work()
        self._empty: dict = {}
        self.parallel_min = PARALLEL_MIN                # tests set 0 to run every layer threaded

    # ------------------------------------------------------------------ parameters
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        H = self.H
        shapes = {"decoder.head.weight": (self.head_size, H), "decoder.head.bias": (self.head_size,)}
        for i, (P, O) in enumerate(self.tails):
            shapes[f"decoder.tail.{i}.0.weight"] = (P, H)
            shapes[f"decoder.tail.{i}.1.weight"] = (O, P)
        return shapes

    def init_params(self, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
        """U(-0.1, 0.1) weights and a zero head bias, drawn in param_shapes order."""
        out = {}
        for name, shape in self.param_shapes().items():
            a = np.zeros(shape) if name == "decoder.head.bias" else rng.uniform(-0.1, 0.1, size=shape)
            out[name] = np.ascontiguousarray(a, dtype=dtype)
        return out

    # ------------------------------------------------------------------ checks
    def _top(self, top) -> np.ndarray:
        if not isinstance(top, np.ndarray) or top.ndim != 2 or top.shape[1] != self.H \
                or top.dtype not in (np.float32, np.float64):
            raise CharlmError(f"the adaptive softmax takes a float32/float64 (M, {self.H}) input, "
                              f"got {getattr(top, 'shape', type(top))}")
        return np.ascontiguousarray(top)

    def _targets(self, targets, M: int) -> np.ndarray:
        t = np.ascontiguousarray(targets, dtype=np.int64)
        if t.shape != (M,):
            raise CharlmError(f"the adaptive softmax needs one target per row ({M}), got shape {t.shape}")
        if M and int(t.max()) >= self.V:
            raise CharlmError(f"target {int(t.max())} is outside the vocabulary of {self.V:,} tokens")
        return t

    def _params(self, params, dtype) -> tuple:
        """(head W, head b, [(W0, W1) per tail]) as C-contiguous arrays of dtype."""
        def get(name):
            return np.ascontiguousarray(params[name], dtype=dtype)
        tails = [(get(f"decoder.tail.{i}.0.weight"), get(f"decoder.tail.{i}.1.weight")) for i in range(self.K)]
        return get("decoder.head.weight"), get("decoder.head.bias"), tails

    def _none(self, dtype, ndim: int) -> np.ndarray:
        """An empty array meaning 'none' to the kernels ((0,) or (0, 0))."""
        key = (np.dtype(dtype), ndim)
        if key not in self._empty:
            self._empty[key] = np.zeros((0,) * ndim, dtype)
        return self._empty[key]

    # ------------------------------------------------------------------ the pass
    def _layer(self, lp, X, W, b, tcol, parts, grad=None):
        """One log-softmax layer (the head or a tail's second matrix) on rows X (n, D): lp (n,)
        the target log-probabilities; with grad = (dX, dW, db, scale) its gradients ADDED.
        Split between threads only when it is large enough to repay a parallel region."""
        n, D = X.shape
        O = W.shape[0]
        threaded = parts > 1 and n * O >= self.parallel_min
        nc = n_parts(parts, O) if threaded else 1
        wmax = -(-O // nc)
        dt = X.dtype
        L = self._work.get("L", (nc * n * wmax,), dt)
        pmax = self._work.get("pmax", (nc, n), np.float64)
        psum = self._work.get("psum", (nc, n), np.float64)
        lse = self._work.get("lse", (n,), np.float64)
        if threaded:
            ak.lsm_forward(lp, L, pmax, psum, lse, X, W, b, tcol, parts)
        else:
            ak.lsm_forward_1(lp, L, pmax, psum, lse, X, W, b, tcol)
        if grad is not None:
            dX, dW, db, scale = grad
            dXp = self._work.get("dXp", (nc, n, D) if dX.shape[0] else (nc, 0, D), dt)
            dWp = self._work.get("dWp", (nc * wmax * D,), dt)
            if threaded:
                ak.lsm_backward(dX, dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, float(scale), parts)
            else:
                ak.lsm_backward_1(dX, dW, db, dXp, dWp, L, pmax, lse, X, W, tcol, float(scale))

    def _run(self, params, top, targets, lp, parts, grad=None):
        """lp (M,) float64 := ln P(targets); with grad = (scale, dtop, grads) the gradients too."""
        M = top.shape[0]
        dt = top.dtype
        Wh, bh, tails = self._params(params, dt)
        hcol = self._work.get("hcol", (M,), np.int64)
        order = self._work.get("order", (M,), np.int64)
        tloc = self._work.get("tloc", (M,), np.int64)
        starts = self._work.get("starts", (self.K + 1,), np.int64)
        ak.cluster_sort(hcol, order, tloc, starts, targets, self.cuts)
        head_grad = None
        if grad is not None:
            scale, dtop, grads = grad
            if dtop.shape[0]:
                dtop.fill(0)
            head_grad = (dtop if dtop.shape[0] else self._none(dt, 2), grads["decoder.head.weight"],
                         grads["decoder.head.bias"], scale)
        self._layer(lp, top, Wh, bh, hcol, parts, head_grad)
        for i, (P, O) in enumerate(self.tails):
            s, e = int(starts[i]), int(starts[i + 1])
            if e == s:
                continue
            n = e - s
            rows = order[s:e]
            X = self._work.get("X", (n, self.H), dt)
            Z = self._work.get("Z", (n, P), dt)
            W0, W1 = tails[i]
            ak.tail_project_forward(Z, X, top, rows, W0)
            lpi = self._work.get("lpi", (n,), np.float64)
            if grad is None:
                self._layer(lpi, Z, W1, self._none(dt, 1), tloc[s:e], parts)
            else:
                dZ = self._work.get("dZ", (n, P), dt)
                dZ.fill(0)
                self._layer(lpi, Z, W1, self._none(dt, 1), tloc[s:e], parts,
                            (dZ, grads[f"decoder.tail.{i}.1.weight"], self._none(dt, 1), scale))
                dXs = self._work.get("dXs", (n, self.H), dt)
                ak.tail_project_backward(dtop if dtop.shape[0] else self._none(dt, 2),
                                         grads[f"decoder.tail.{i}.0.weight"], dXs, dZ, X, W0, rows)
            ak.scatter_add(lp, rows, lpi)

    # ------------------------------------------------------------------ the interface
    def loss(self, params, top, targets, parts=1) -> float:
        """Float64 sum over the rows with target >= 0 of -ln P(target). top (M, H), targets (M,)."""
        top = self._top(top)
        t = self._targets(targets, top.shape[0])
        if not top.shape[0]:
            return 0.0
        lp = self._work.get("lp", (top.shape[0],), np.float64)
        self._run(params, top, t, lp, parts)
        return 0.0 - float(lp.sum())  # 0.0 - : +0.0, not -0.0, when every row is padding

    def loss_and_backward(self, params, top, targets, scale, dtop, grads, parts=1) -> float:
        """loss(); dtop (M, H) OVERWRITTEN with scale * its gradient (skipped if dtop has shape
        (0, 0)); scale * each decoder.* parameter's gradient ADDED into grads[name]. Padding rows
        (target < 0) give no gradient."""
        top = self._top(top)
        M = top.shape[0]
        t = self._targets(targets, M)
        if dtop.shape[0] and (dtop.shape != top.shape or dtop.dtype != top.dtype or not dtop.flags.c_contiguous):
            raise CharlmError(f"dtop must be a C-contiguous {top.dtype} array of shape {top.shape}, got {dtop.shape}")
        if not M:
            return 0.0
        if not (t >= 0).any():  # all padding: no loss, no gradient
            if dtop.shape[0]:
                dtop.fill(0)
            return 0.0
        lp = self._work.get("lp", (M,), np.float64)
        self._run(params, top, t, lp, parts, (scale, dtop, grads))
        return 0.0 - float(lp.sum())  # 0.0 - : +0.0, not -0.0, when every row is padding

    def gather(self, params, top, targets, out, parts=1) -> None:
        """out (M,) float64 := ln P(targets[m]); 0.0 where the target is negative."""
        top = self._top(top)
        t = self._targets(targets, top.shape[0])
        if not top.shape[0]:
            return
        if out.dtype == np.float64 and out.flags.c_contiguous and out.shape == (top.shape[0],):
            self._run(params, top, t, out, parts)
        else:
            lp = self._work.get("lp", (top.shape[0],), np.float64)
            self._run(params, top, t, lp, parts)
            out[...] = lp

    def log_probs(self, params, top, out, parts=1) -> None:
        """out (M, V) (the dtype of top, or float64) := ln P of every token, exact."""
        top = self._top(top)
        M = top.shape[0]
        if out.shape != (M, self.V) or out.dtype not in (top.dtype, np.float64):
            raise CharlmError(f"log_probs needs a {top.dtype} or float64 output of shape {(M, self.V)}, "
                              f"got {out.dtype} {out.shape}")
        if not M:
            return
        dt = top.dtype
        Wh, bh, tails = self._params(params, dt)
        c0 = self.cutoffs[0]
        cluster_lp = np.empty((M, self.K), np.float64)      # ln P(cluster i) per row
        threaded = parts > 1 and M > 1

        def rows(o, rest, X, W, b, add):
            if threaded and M * W.shape[0] >= self.parallel_min:
                ak.lsm_rows(o, rest, X, W, b, add, parts)
            else:
                ak.lsm_rows_1(o, rest, X, W, b, add)

        rows(out[:, :c0], cluster_lp, top, Wh, bh, np.zeros(M))
        for i, (P, O) in enumerate(self.tails):
            W0, W1 = tails[i]
            Z = np.empty((M, P), dt)
            ak.tail_project_forward(Z, self._work.get("X", (M, self.H), dt), top, np.arange(M), W0)
            rows(out[:, self.bounds[i]:self.bounds[i + 1]], np.empty((M, 0)), Z, W1, self._none(dt, 1),
                 np.ascontiguousarray(cluster_lp[:, i]))
