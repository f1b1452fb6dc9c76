"""Compile kernels in another process while this one works; Numba's on-disk cache hands them over.

A first run compiles every kernel it calls (seconds each, from an empty cache). What is not needed at
once is compiled by a child process on the other core instead: training starts its first step without
the sampler, which a child compiles meanwhile (charlm.lm.warmup); the trainer waits for the child
(usually long done) before its first sample and then loads the sampler from the cache. A first sample,
score or eval splits its own kernels between a child and itself (below). The child compiles whole entry
points (a kernel and its callees) and the parent does not call them before the child is done, so no
process compiles a kernel against a callee the other one cached halfway (they may both compile a
small shared callee, each writing the same cache entry).

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
    """One child process running target(*args); wait() joins it and returns the seconds waited. Start
    one only where runtime.spawn_safe() (every caller here checks it first)."""

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


# ------------------------------------------------------------------ a first `charlm sample`
# The batch-1 sampler (kernels.sample.stack_sample) compiles in about 9 s from an empty cache, half of it
# the parallel step _stack_step (Numba's parallel transform). A first sample splits the work: a child
# compiles _stack_step while this process packs the weights and compiles the step's other callees (the
# draw, the parallel decoder); then it waits for the child and compiles stack_sample itself, loading
# _stack_step from the cache. The child is told the argument types only (small arrays of those types:
# the shapes do not matter to a compiled kernel), the types stack_sample passes
# (tests/test_compile.py checks they are).

def _sampler_arrays(dtype: str, store: str) -> dict:
    """Small arrays of the types stack_sample hands its callees: the model's dtype for states and
    biases, `store` (the dtype, or uint16 for bfloat16) for the packed weights."""
    import numpy as np
    f, s = np.dtype(dtype), np.dtype(store)
    one = np.int64(1)
    step = (one, np.zeros((2, 1, 16), f), one, np.zeros((1, 1, 16), f), np.zeros((1, 1, 64), f),
            np.zeros((1, 1, 64), f), np.zeros((1, 1, 64), f), one, np.zeros((2, 4), f), np.zeros((1, 4, 64), s),
            np.zeros((1, 1, 16, 64), s), np.zeros((1, 1, 16, 64), s), np.zeros((1, 1, 64), f),
            np.zeros((1, 1, 64), f), np.zeros((1, 0, 64), f))
    decode = (np.zeros(2, f), np.zeros((2, 1, 16), f)[1, 0], np.zeros((16, 2), s), np.zeros(2, f), one)
    pick = (np.zeros(2, f), np.zeros(2, np.uint8), 1.0, 0, 1.0, 1.0, False, 0.5, np.zeros(2), np.zeros(2))
    return {"step": step, "decode": decode, "pick": pick}


def _compile_step(dtype: str, store: str) -> None:
    from ..kernels import sample
    sample._stack_step.compile(_signature(_sampler_arrays(dtype, store)["step"]))


def _signature(args) -> tuple:
    import numba
    return tuple(numba.typeof(a) for a in args)


class SamplerSplit:
    """The split compile of a first sample (above): the child starts here, finish() does this process's
    share and waits for it."""

    def __init__(self, dtype: str, store: str):
        self.dtype, self.store = dtype, store
        self.child = Background(_compile_step, dtype, store)

    def finish(self) -> None:
        """Compile the other callees here, then wait for the child (on failure the parent compiles
        _stack_step itself, as without the split)."""
        from ..kernels import layers, sample
        arrays = _sampler_arrays(self.dtype, self.store)
        sample._decode.compile(_signature(arrays["decode"]))
        layers.pick_token.compile(_signature(arrays["pick"]))
        self.child.wait()


def sampler_split(model, precision: str) -> SamplerSplit | None:
    """Start the split compile of model's batch-1 sampler, or None when the cache holds stack_sample for
    these weights already, a second core is not free (one thread asked for, several processes under
    MPI, or other processes' threads running: runtime.cores_taken), or a child would run the program's
    main script again (runtime.spawn_safe: a library user's unguarded script)."""
    import numpy as np
    from .. import dist
    from ..kernels.sample import stack_sample
    from ..runtime import cores_taken, parts, spawn_safe
    store = "uint16" if precision == "bf16" else model.dtype.name
    if not spawn_safe() or dist.size() > 1 or parts() < 2 or cached(stack_sample, store) or cores_taken(2):
        return None
    try:
        return SamplerSplit(np.dtype(model.dtype).name, store)
    except Exception:  # no child: compile here, as without the split
        return None


# ------------------------------------------------------------------ a first `charlm score` / `eval`
# The same split for the forward pass of an RNN / GRU / LSTM stack: a child compiles the recurrence split
# by hidden units (the parallel time loop, about half of a first `charlm score`'s 9 s), this process the
# output head, the embedding lookup and the window's input product meanwhile; then the cell's forward
# compiles here and loads the recurrence from the cache.

def _recur_call(cell: str, dtype: str) -> tuple:
    """(module name, kernel name, small arguments of the types the cell's forward passes)."""
    import numpy as np
    z = lambda *s: np.zeros(s, np.dtype(dtype))
    nc = np.int64(1)
    if cell == "lstm":
        return "lstm", "_lstm_recur_by_units", (z(2, 1, 16), z(2, 1, 16), z(1, 1, 64), z(64, 16), z(64), nc)
    if cell == "gru":
        return "gru", "_gru_recur_by_units", (z(2, 1, 16), z(1, 1, 64), z(1, 1, 48), z(48, 16), z(48), z(48), nc)
    return "rnn", "_rnn_recur_by_units", (z(2, 1, 16), z(1, 1, 16), z(16, 16), z(16), nc)


def _compile_recur(cell: str, dtype: str) -> None:
    import importlib
    module, name, args = _recur_call(cell, dtype)
    getattr(importlib.import_module(f"charlm.kernels.{module}"), name).compile(_signature(args))


class ForwardSplit:
    """The split compile of a first scoring pass (above), as SamplerSplit."""

    def __init__(self, model):
        self.model = model
        self.child = Background(_compile_recur, model.cfg.cell, model.dtype.name)

    def finish(self) -> None:
        """Compile the forward's other kernels here by running them on one token, then wait for the child."""
        import numpy as np
        from ..kernels import layers, lstm
        from ..runtime import parts
        m, dt = self.model, self.model.dtype
        cfg = m.cfg
        z = lambda *s: np.zeros(s, dt)
        layers.embedding_forward(z(1, cfg.embed), np.zeros(1, np.int32), m.params["embedding.weight"])
        layers.proj_forward(z(1, 1, cfg.gates * cfg.hidden), z(1, 1, cfg.embed), m.params["rnn.weight_ih_l0"],
                            parts())
        if cfg.cell == "lstm":  # the loop lstm_forward keeps for fewer than 16 units
            lstm._lstm_recur_plain(z(2, 1, 4), z(2, 1, 4), z(1, 1, 16), z(16, 4), z(16))
        m.head.gather(m.params, z(1, cfg.hidden), np.zeros(1, np.int32), np.zeros(1), parts())
        self.child.wait()


def forward_split(model) -> ForwardSplit | None:
    """Start the split compile of model's forward pass, or None: as sampler_split."""
    from .. import dist
    from ..runtime import cores_taken, parts, spawn_safe
    if not spawn_safe() or dist.size() > 1 or parts() < 2 or cached(model._fwd, model.dtype) or cores_taken(2):
        return None
    try:
        return ForwardSplit(model)
    except Exception:
        return None


# ------------------------------------------------------------------ training's warm-up
# The same split for a first `charlm train`: a child compiles the cell's backward kernel (about 10 s of the
# warm-up's 26 for the default LSTM: the parallel backward time loop and the weight gradients) while this
# process compiles and runs the forward pass and the loss; it waits for the child before the first backward.

def _backward_args(dtype: str) -> tuple:
    """Small arguments of the types Model.layer_backward passes to the cell's backward kernel."""
    import numpy as np
    z = lambda *s: np.zeros(s, np.dtype(dtype))
    return (z(1, 1, 4), z(16, 4), z(16, 4), z(16), z(16), z(1, 4), z(1, 4), z(1, 1, 16), z(1, 1, 16),
            z(1, 1, 4), z(2, 1, 4), z(2, 1, 4), z(1, 1, 16), z(1, 1, 4), z(16, 4), z(16, 4), np.int64(1))


def _compile_backward(module: str, name: str, dtype: str) -> None:
    import importlib
    getattr(importlib.import_module(module), name).compile(_signature(_backward_args(dtype)))


def backward_split(model) -> Background | None:
    """A child compiling model's backward kernel (RNN / GRU / LSTM), or None: as sampler_split. The caller
    waits for it before the first backward pass."""
    from .. import dist
    from ..runtime import cores_taken, parts, spawn_safe
    bwd = getattr(model, "_bwd", None)
    if (bwd is None or not spawn_safe() or dist.size() > 1 or parts() < 2 or cached(bwd, model.dtype)
            or cores_taken(2)):
        return None
    try:
        return Background(_compile_backward, bwd.py_func.__module__, bwd.py_func.__name__, model.dtype.name)
    except Exception:
        return None
