"""Compile kernels in another process while this one works; Numba's on-disk cache hands them over.

A first run compiles every kernel it calls (seconds each, from an empty cache). What is not needed at
once is compiled by a child process on the other core instead: training starts its first step without
the sampler, which a child compiles meanwhile; the trainer waits for the child (usually long done)
before its first sample and then loads the sampler from the cache. The child compiles whole entry
points (a kernel and its callees) and the parent does not call them before the child is done, so no
process compiles a kernel against a callee the other one cached halfway.

The child starts with `spawn` (a fresh interpreter: no copy of the parent's threads or locks), ignores
Ctrl-C (the parent decides) and writes nothing to the terminal. If it fails, the parent compiles the
kernels itself when it needs them, as without it.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time


class Background:
    """One child process running target(*args); wait() joins it and returns the seconds waited."""

    def __init__(self, target, *args):
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_quiet, args=(target, *args), daemon=True)
        self.proc.start()

    def wait(self) -> float:
        t0 = time.perf_counter()
        self.proc.join()
        return time.perf_counter() - t0

    def stop(self) -> None:
        """Stop it if it still runs (the parent is leaving)."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def _quiet(target, *args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    target(*args)


def compile_sampler(cfg, vocab, dtype: str, threads: int) -> None:
    """Compile (or load) the sampler of a model of cfg with parameters of dtype: a two-token sample of a
    fresh model, on `threads` threads (the parent's count, so the packing is the same)."""
    import numpy as np
    from ..runtime import compute_threads
    from .models import create_model
    from .sample import generate
    with compute_threads(threads):
        "".join(generate(create_model(cfg, 0, np.dtype(dtype)), vocab, 2, seed=0))


def compile_backward(cfg, dtype: str, threads: int) -> None:
    """Compile (or load) the recurrent layers' backward kernel of a model of cfg with parameters of
    dtype, on zero arrays of a one-step, one-stream window (the kernels' signatures depend on the
    arrays' types, not their sizes)."""
    import numpy as np
    from ..runtime import compute_threads
    from .models import create_model
    model = create_model(cfg, 0, np.dtype(dtype))
    ws = model.workspace_type(cfg, 1, 1, model.dtype)
    grads = model.zero_grads()
    with compute_threads(threads):
        for k in range(min(cfg.layers, 2)):  # layer 0 reads the embeddings, the others the layer below
            model.layer_backward(k, ws.dx[k], grads, ws.dh0, ws.dc0, ws.dacts, ws.dacts_h, ws.dhs[k],
                                 ws.hs[k], ws.cs[k], ws.acts[k], ws.emb if k == 0 else ws.hs[k - 1][1:])


def backward_in_background(model) -> Background | None:
    """Start compiling model's backward kernel in a child process, or None if it has none (the ESN)."""
    if not hasattr(model, "layer_backward"):
        return None
    import numba
    return Background(compile_backward, model.cfg, model.dtype.str, numba.get_num_threads())


def sampler_in_background(model, vocab) -> Background:
    """Start compiling model's sampler in a child process (see the module docstring)."""
    import numba
    return Background(compile_sampler, model.cfg, vocab, model.dtype.str, numba.get_num_threads())
