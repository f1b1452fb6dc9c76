"""Central finite differences, shared by every gradient check (kernels, model, memory network).

Run them in float64: with eps = 1e-6 the truncation error is O(eps^2) and the rounding error
O(1e-16 / eps), so an analytic gradient that is right agrees to about 1e-8 relative."""
import numpy as np


def rel_err(a, b):
    """max |a - b| / max(|a| + |b|): 0 when equal, 1 when one side is zero."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.max(np.abs(a) + np.abs(b))
    return float(np.max(np.abs(a - b)) / den) if den > 0 else 0.0


def numeric_grad(f, a, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of a (changed in place)."""
    g = np.zeros(a.shape, dtype=np.float64)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        fp = f()
        a[idx] = old - eps
        fm = f()
        a[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g
