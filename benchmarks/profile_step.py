"""Where the time of one training step goes, kernel by kernel (charlm only).

    python benchmarks/profile_step.py --cell lstm --hidden 256 --layers 2 [--threads 2]

Times each stage of Model.loss_and_grads and the optimizer on random data (median of
repeats) and prints a table with each stage's share of the step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charlm.config import ModelConfig  # noqa: E402
from charlm.lm.model import _CELL_KERNELS, Model  # noqa: E402
from charlm.runtime import compute_threads
from charlm.optim import Adam, grad_norm  # noqa: E402


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", default="lstm")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    cfg = ModelConfig(cell=a.cell, vocab_size=a.vocab, embed=a.embed, hidden=a.hidden, layers=a.layers)
    m = Model.create(cfg, seed=0)
    T, N = a.seq_len, a.batch
    rng = np.random.default_rng(0)
    x = rng.integers(0, a.vocab, (T, N)).astype(np.int32)
    y = rng.integers(0, a.vocab, (T, N)).astype(np.int32)
    grads = m.zero_grads()
    opt = Adam(m.params)
    state = m.zero_state(N)
    fwd, bwd = _CELL_KERNELS[a.cell]
    with compute_threads(a.threads):
        parts = numba.get_num_threads()
        m.loss_and_grads(x, y, state, grads)
        ws = m._workspace(T, N)
        p = m.params
        rows = []
        total = timed(lambda: m.loss_and_grads(x, y, state, grads), a.repeats)
        rows.append(("whole loss_and_grads", total))
        for k in range(a.layers):
            inp = ws.emb if k == 0 else ws.hs[k - 1][1:]
            args = (p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"], p[f"rnn.bias_ih_l{k}"], p[f"rnn.bias_hh_l{k}"])
            rows.append((f"  layer {k} forward", timed(lambda: fwd(ws.hs[k], ws.cs[k], ws.acts[k], inp, *args, parts), a.repeats)))
            g = {n: np.zeros_like(v) for n, v in grads.items()}
            dx = ws.dx[k]
            rows.append((f"  layer {k} backward", timed(lambda: bwd(
                dx, g[f"rnn.weight_ih_l{k}"], g[f"rnn.weight_hh_l{k}"], g[f"rnn.bias_ih_l{k}"], g[f"rnn.bias_hh_l{k}"],
                ws.dh0, ws.dc0, ws.dacts, ws.dacts_h, ws.dhs[k], ws.hs[k], ws.cs[k], ws.acts[k], inp,
                p[f"rnn.weight_ih_l{k}"], p[f"rnn.weight_hh_l{k}"], parts), a.repeats)))
        top = np.ascontiguousarray(ws.hs[-1][1:].reshape(T * N, a.hidden))
        tg = y.reshape(-1)
        head = m.head
        rows.append(("  output head forward (loss)", timed(lambda: head.loss(p, top, tg, parts), a.repeats)))
        dtop = np.empty_like(top)
        rows.append(("  output head forward + backward", timed(
            lambda: head.loss_and_backward(p, top, tg, 1.0 / tg.size, dtop, grads, parts), a.repeats)))
        rows.append(("gradient norm", timed(lambda: grad_norm(grads), a.repeats)))
        rows.append(("Adam step", timed(lambda: opt.step(m.params, grads, 1e-9), a.repeats)))
    step = total + rows[-1][1] + rows[-2][1]
    print(f"{a.cell} {a.layers}x{a.hidden}, V {a.vocab}, E {a.embed}, N {N}, T {T}, threads {parts}: "
          f"{T * N / step:,.0f} tok/s")
    for name, t in rows:
        print(f"{name:28s} {1e3 * t:8.2f} ms  {100 * t / step:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
