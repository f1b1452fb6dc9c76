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


def cached(dispatcher, dtype) -> bool:
    """Whether Numba's on-disk cache holds the kernel for some signature with arrays of dtype (then a
    child would only load it too, after a second or more of start-up). Reads Numba's cache index (an
    internal interface): any surprise counts as not cached, which only costs the child."""
    try:
        import numpy as np
        name = np.dtype(dtype).name
        index = dispatcher._cache._cache_file._load_index()
        return any(str(getattr(a, "dtype", "")) == name for key in index for a in key[0])
    except Exception:
        return False


def sampler_in_background(model, vocab) -> Background | None:
    """Start compiling model's sampler in a child process (see the module docstring), or None if the
    cache holds it already."""
    from ..kernels.sample import stack_sample
    if model.cfg.cell != "esn" and model.cfg.softmax == "full" and cached(stack_sample, model.dtype):
        return None
    from ..runtime import parts
    return Background(compile_sampler, model.cfg, vocab, model.dtype.str, parts())


def warm_up(model, batches, with_sampler: bool, vocab, lazy: bool = False) -> None:
    """Call every kernel a training step uses once on a tiny window so Numba compiles
    (or loads from its cache) before the clock starts; the sampler too when with_sampler
    (else it is compiled in the background: charlm.lm.train._Trainer._start)."""
    import numpy as np

    from ..optim import grad_norm, make_optimizer
    x, y = batches.window(0)
    x, y = np.ascontiguousarray(x[:2, :1]), np.ascontiguousarray(y[:2, :1])
    grads = model.zero_grads()
    rng = np.random.default_rng(0)
    model.loss_and_grads(x, y, model.zero_state(1), grads, rng)
    model.loss(x, y, model.zero_state(1))
    opt = make_optimizer("adam", {k: v.copy() for k, v in model.trainable.items()}, lazy=lazy)
    rows = model.touched()  # lazy (--sparse-embedding): the row-wise Adam kernel too
    opt.step({k: v.copy() for k, v in model.trainable.items()}, grads, 1e-3, 1.0, rows)
    grad_norm(grads, rows)
    if with_sampler:
        from .sample import generate
        "".join(generate(model, vocab, 2, seed=0))
