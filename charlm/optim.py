"""Optimizers (Adam, SGD) and gradient clipping by global norm."""
from __future__ import annotations

import math

import numpy as np

from .kernels.optim import adam_update, adam_update_rows, sum_squares


def grad_norm(grads: dict[str, np.ndarray], rows: dict[str, np.ndarray] | None = None) -> float:
    """Global L2 norm of all gradients (float64 accumulation). rows: for a parameter whose gradient is
    zero outside some rows (an embedding's, charlm.lm.base.BaseModel.touched), those rows (ascending):
    only they are read, and the sum is the same bit for bit (adding 0.0 changes no partial sum)."""
    rows = rows or {}
    return math.sqrt(sum(sum_squares(g[rows[n]].reshape(-1) if n in rows else g.reshape(-1))
                         for n, g in grads.items()))


def clip_scale(norm: float, max_norm: float) -> float:
    """Factor that brings a gradient of this norm down to max_norm (1 if below, or clipping off)."""
    if max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return 1.0


class Adam:
    """Adam (Kingma & Ba) with bias correction; state m, v per parameter and step t.

    lazy: step() updates only the given rows of a parameter passed in `rows` (--sparse-embedding):
    the other rows keep weights and moments, as PyTorch's SparseAdam (the bias correction still
    counts every step). Not lazy, rows are ignored: exact Adam, every row every step."""
    name = "adam"

    def __init__(self, params: dict[str, np.ndarray], beta1=0.9, beta2=0.999, eps=1e-8, lazy: bool = False):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.lazy = lazy
        self.t = 0
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}

    def step(self, params, grads, lr: float, gscale: float = 1.0, rows: dict[str, np.ndarray] | None = None) -> None:
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        rows = (rows or {}) if self.lazy else {}
        for n, p in params.items():
            if n in rows:
                adam_update_rows(p, grads[n], self.m[n], self.v[n], rows[n], lr, self.beta1, self.beta2, self.eps,
                                 bc1, bc2, gscale)
                continue
            adam_update(p.reshape(-1), grads[n].reshape(-1), self.m[n].reshape(-1), self.v[n].reshape(-1),
                        lr, self.beta1, self.beta2, self.eps, bc1, bc2, gscale)

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"m/{n}": a for n, a in self.m.items()}
        out.update({f"v/{n}": a for n, a in self.v.items()})
        return out

    def state_meta(self) -> dict:
        return {"name": self.name, "t": self.t, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.t = int(meta["t"])
        for n in self.m:
            self.m[n][...] = arrays[f"m/{n}"]
            self.v[n][...] = arrays[f"v/{n}"]


class SGD:
    """Plain stochastic gradient descent."""
    name = "sgd"

    def __init__(self, params: dict[str, np.ndarray]):
        self.t = 0

    def step(self, params, grads, lr: float, gscale: float = 1.0, rows: dict[str, np.ndarray] | None = None) -> None:
        """rows: a parameter's rows outside which its gradient is zero; only they are updated, which
        changes nothing but the time (the others would move by -lr * 0)."""
        self.t += 1
        rows = rows or {}
        for n, p in params.items():
            if n in rows:
                r = rows[n]
                p[r] -= (lr * gscale) * grads[n][r]
            else:
                p -= (lr * gscale) * grads[n]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def state_meta(self) -> dict:
        return {"name": self.name, "t": self.t}

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.t = int(meta["t"])


def make_optimizer(name: str, params: dict[str, np.ndarray], lazy: bool = False):
    return Adam(params, lazy=lazy) if name == "adam" else SGD(params)
