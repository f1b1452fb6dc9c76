"""Optimizer kernels on flat arrays (charlm.optim drives them)."""
import numpy as np
from numba import njit

from .parallel import JIT


@njit(**JIT)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, gscale):
    """One fused Adam step on flat arrays p, g, m, v (K,), in place.

    g is multiplied by gscale first (gradient clipping); bc1 = 1 - beta1**t,
    bc2 = 1 - beta2**t are the bias corrections.
    """
    step = lr / bc1
    for k in range(p.shape[0]):
        gk = g[k] * gscale
        mk = beta1 * m[k] + (1.0 - beta1) * gk
        vk = beta2 * v[k] + (1.0 - beta2) * gk * gk
        m[k] = mk
        v[k] = vk
        p[k] -= step * mk / (np.sqrt(vk / bc2) + eps)


@njit(**JIT)
def adam_update_rows(p, g, m, v, rows, lr, beta1, beta2, eps, bc1, bc2, gscale):
    """adam_update on the rows `rows` (R,) int64 of p, g, m, v (V, E) only; the other rows keep their
    weights and moments ("lazy" Adam, as PyTorch's SparseAdam: a row moves only when a batch uses it)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        adam_update(p[r], g[r], m[r], v[r], lr, beta1, beta2, eps, bc1, bc2, gscale)


@njit(**JIT)
def sum_squares(a):
    """sum(a**2) of a flat array (K,), accumulated in float64."""
    s = 0.0
    for k in range(a.shape[0]):
        s += np.float64(a[k]) * a[k]
    return s
