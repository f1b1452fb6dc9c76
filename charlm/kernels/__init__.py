"""Numba kernels: arrays and scalars in, arrays out.

Dimension legend used in every kernel module:
    N batch, T time steps, V vocab, E embedding (layer input D), H hidden,
    G gates (rnn 1, gru 3, lstm 4), M = T*N flattened positions.

Kernels never read configuration objects or module globals; randomness is drawn
by the caller and passed in as uniforms.
"""

from ..runtime import load_blas

load_blas()  # before any kernel is compiled or loaded from the cache: see charlm/runtime.py
