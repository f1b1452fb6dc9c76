"""Optimizers (Adam, SGD) and gradient clipping by global norm."""
from __future__ import annotations

import math

import numpy as np

from .kernels.optim import adam_update, sum_squares


def grad_norm(grads: dict[str, np.ndarray]) -> float:
    """Global L2 norm of all gradients (float64 accumulation)."""
    return math.sqrt(sum(sum_squares(g.reshape(-1)) for g in grads.values()))


def clip_scale(norm: float, max_norm: float) -> float:
    """Factor that brings a gradient of this norm down to max_norm (1 if below, or clipping off)."""
    if max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return 1.0


class Adam:
    """Adam (Kingma & Ba) with bias correction; state m, v per parameter and step t."""
    name = "adam"

    def __init__(self, params: dict[str, np.ndarray], beta1=0.9, beta2=0.999, eps=1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = 0
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}

    def step(self, params, grads, lr: float, gscale: float = 1.0) -> None:
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        for n, p in params.items():
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

    def step(self, params, grads, lr: float, gscale: float = 1.0) -> None:
        self.t += 1
        for n, p in params.items():
            p -= (lr * gscale) * grads[n]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def state_meta(self) -> dict:
        return {"name": self.name, "t": self.t}

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.t = int(meta["t"])


def make_optimizer(name: str, params: dict[str, np.ndarray]):
    return Adam(params) if name == "adam" else SGD(params)
