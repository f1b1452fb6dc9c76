"""Training's warm-up: every kernel a step uses compiled (or loaded) before the clock starts, and the
sampler compiled beside the first steps by a child process (charlm.lm.precompile.Background) rather than
before them."""
from __future__ import annotations

from .precompile import Background, backward_split, cached


def compile_sampler(cfg, vocab, dtype: str, threads: int) -> None:
    """Compile (or load) the sampler of a model of cfg with parameters of dtype: a two-token sample of a
    fresh model, on `threads` threads (the parent's count, so the packing is the same)."""
    import numpy as np
    from ..runtime import compute_threads
    from .models import create_model
    from .sample import generate
    with compute_threads(threads):
        "".join(generate(create_model(cfg, 0, np.dtype(dtype)), vocab, 2, seed=0))


def sampler_in_background(model, vocab) -> Background | None:
    """Start compiling model's sampler in a child process (see the module docstring), or None if the
    cache holds it already or a child would run the program's main script again (runtime.spawn_safe):
    then the first sample compiles it."""
    from ..kernels.sample import stack_sample
    from ..runtime import parts, spawn_safe
    if not spawn_safe():
        return None
    if model.cfg.cell != "esn" and model.cfg.softmax == "full" and cached(stack_sample, model.dtype):
        return None
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
    backward = backward_split(model)  # from an empty cache: the backward kernel in a child meanwhile
    model.loss(x, y, model.zero_state(1))
    if backward is not None:
        backward.wait()
    model.loss_and_grads(x, y, model.zero_state(1), grads, rng)
    opt = make_optimizer("adam", {k: v.copy() for k, v in model.trainable.items()}, lazy=lazy)
    rows = model.touched()  # lazy (--sparse-embedding): the row-wise Adam kernel too
    opt.step({k: v.copy() for k, v in model.trainable.items()}, grads, 1e-3, 1.0, rows)
    grad_norm(grads, rows)
    if with_sampler:
        from .sample import generate
        "".join(generate(model, vocab, 2, seed=0))
