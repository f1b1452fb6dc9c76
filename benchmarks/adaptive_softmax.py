"""charlm's adaptive softmax against torch.nn.AdaptiveLogSoftmaxWithLoss: the same numbers, and its speed.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/adaptive_softmax.py [--quick] [--reps R]

(a) Equivalence. torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs, div_value, head_bias=True) is given
    charlm's parameters; the names map by dropping the leading "decoder.":

        charlm                       torch state_dict
        decoder.head.weight     ->   head.weight        (c_0 + K, H)
        decoder.head.bias       ->   head.bias          (c_0 + K,)
        decoder.tail.{i}.0.weight -> tail.{i}.0.weight  (hsz_i, H)
        decoder.tail.{i}.1.weight -> tail.{i}.1.weight  (osz_i, hsz_i)

    Compared (float32): log_prob() against charlm's log_probs, forward()'s output and loss against
    gather and loss, and the gradients of the summed loss. Exits non-zero if any differs by more
    than 1e-4 (gradients: relative to their largest entry).
(b) Speed of the output layer alone (no recurrent model), float32, M rows with Zipf-distributed
    targets (benchmarks/zipf_corpus.py): a training step (forward + backward) of charlm's adaptive
    softmax, of torch's, and of charlm's full softmax (linear_forward, softmax_xent_forward,
    softmax_xent_backward, linear_backward over all V words); and exact evaluation (charlm's gather,
    torch's forward under no_grad). Both libraries use the same number of threads (Numba's); charlm
    splits the work between its threads with single-threaded BLAS calls, as in training.

Default size: V 267,000 (WikiText-103), H 512, M = 32 x 35 = 1,120 rows, cutoffs 20000,40000,200000,
div_value 4. --quick: V 20,000, H 128, M 256, cutoffs 2000,6000,12000. Timings are the median of
--reps rounds after a warm-up, the libraries taking turns; the table gives the best and the median
wall time and the median CPU time (all threads). On a shared machine the wall times move with the
other work on it; the best time is the least disturbed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zipf_corpus import zipf_ids  # noqa: E402

FULL = dict(V=267_000, H=512, M=32 * 35, cutoffs=(20000, 40000, 200000), div=4.0)
QUICK = dict(V=20_000, H=128, M=256, cutoffs=(2000, 6000, 12000), div=4.0)
TOL = 1e-4


def torch_module(head, params, torch):
    """torch.nn.AdaptiveLogSoftmaxWithLoss with charlm's parameters (names without "decoder.")."""
    m = torch.nn.AdaptiveLogSoftmaxWithLoss(head.H, head.V, list(head.cutoffs), div_value=head.cfg.div_value,
                                            head_bias=True)
    state = {name[len("decoder."):]: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in params.items()}
    m.load_state_dict(state, strict=True)
    return m


def timed(fns: dict, reps: int) -> dict:
    """{name: (min, median wall seconds, median CPU seconds of the process)} of each fn() over reps
    calls, after one warm-up call each. The functions take turns (one call of each per round), so
    that a change in the machine's other work falls on all of them alike. CPU time counts every
    thread of this process (so threads that wait by spinning count too)."""
    for fn in fns.values():
        fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (min(wall[k]), float(np.median(wall[k])), float(np.median(cpu[k]))) for k in fns}


def equivalence(head, params, top, targets, torch, parts, lp_rows: int) -> float:
    """Largest difference between charlm and torch (see the module docstring); prints each."""
    M = top.shape[0]
    net = torch_module(head, params, torch)
    x = torch.from_numpy(top.copy()).requires_grad_(True)
    y = torch.from_numpy(targets.astype(np.int64))
    out = net(x, y)
    (out.loss * M).backward()  # the summed loss, as charlm's
    worst = {}
    # log_prob on the first lp_rows rows (an (rows, V) matrix)
    r = min(lp_rows, M)
    ours_lp = np.empty((r, head.V), np.float32)
    head.log_probs(params, top[:r], ours_lp, parts)
    with torch.no_grad():
        theirs_lp = net.log_prob(torch.from_numpy(top[:r])).numpy()
    worst["log_prob (every token)"] = float(np.abs(ours_lp - theirs_lp).max())
    g = np.empty(M)
    head.gather(params, top, targets, g, parts)
    worst["forward output (target ln P)"] = float(np.abs(g - out.output.detach().double().numpy()).max())
    loss = head.loss(params, top, targets, parts)
    worst["loss (mean over rows)"] = abs(loss / M - float(out.loss.detach()))
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    dtop = np.empty_like(top)
    head.loss_and_backward(params, top, targets, 1.0, dtop, grads, parts)
    tparams = dict(net.named_parameters())
    for name, gr in grads.items():
        t = tparams[name[len("decoder."):]].grad
        t = np.zeros_like(gr) if t is None else t.numpy()
        worst[f"grad {name}"] = float(np.abs(gr - t).max() / max(np.abs(t).max(), 1e-30))
    worst["grad top"] = float(np.abs(dtop - x.grad.numpy()).max() / np.abs(x.grad.numpy()).max())
    print("| compared (float32) | max abs diff (gradients: over their largest entry) |\n|---|---|")
    for k, v in worst.items():
        print(f"| {k} | {v:.2e} |")
    return max(worst.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small size (seconds)")
    ap.add_argument("--reps", type=int, default=0, help="timed rounds (default 5, quick 10)")
    ap.add_argument("--no-full", action="store_true", help="skip charlm's full softmax (the slowest line)")
    a = ap.parse_args()
    size = QUICK if a.quick else FULL
    reps = a.reps or (10 if a.quick else 5)

    import numba
    import torch

    from charlm.config import ModelConfig
    from charlm.kernels import layers
    from charlm.lm.adaptive import AdaptiveSoftmax
    from charlm.runtime import compute_threads

    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    V, H, M = size["V"], size["H"], size["M"]
    cfg = ModelConfig(vocab_size=V, hidden=H, softmax="adaptive", cutoffs=size["cutoffs"], div_value=size["div"])
    head = AdaptiveSoftmax(cfg)
    rng = np.random.default_rng(0)
    params = head.init_params(rng, np.float32)
    params["decoder.head.bias"][:] = rng.uniform(-0.1, 0.1, params["decoder.head.bias"].shape)
    top = rng.standard_normal((M, H)).astype(np.float32)
    targets = zipf_ids(V, M, rng, 1.1)
    bounds = (0,) + head.bounds
    counts = [int(((targets >= lo) & (targets < hi)).sum()) for lo, hi in zip(bounds, bounds[1:])]
    print(f"# adaptive softmax: V {V:,}, H {H}, M {M} rows, cutoffs {','.join(map(str, head.cutoffs))}, "
          f"div_value {cfg.div_value:g}, float32, {threads} threads (torch {torch.__version__}, "
          f"numba {numba.__version__})")
    print(f"rows per cluster (head, tails): {counts}; tail widths: {[p for p, _ in head.tails]}\n")

    with compute_threads(threads):
        worst = equivalence(head, params, top, targets, torch, threads, lp_rows=64)
    ok = worst <= TOL
    print(f"\nlargest difference {worst:.2e}: {'within' if ok else 'OVER'} {TOL:g}\n")

    # ---------------------------------------------------------------- speed
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    dtop = np.empty_like(top)
    gout = np.empty(M)
    net = torch_module(head, params, torch)
    x = torch.from_numpy(top.copy()).requires_grad_(True)
    y = torch.from_numpy(targets.astype(np.int64))

    def ours_step():
        for g in grads.values():
            g.fill(0)
        head.loss_and_backward(params, top, targets, 1.0 / M, dtop, grads, threads)

    def ours_eval():
        head.gather(params, top, targets, gout, threads)

    def torch_step():
        net.zero_grad(set_to_none=True)
        x.grad = None
        net(x, y).loss.backward()

    def torch_eval():
        with torch.no_grad():
            net(x, y)

    names = {"ours": "charlm adaptive", "torch": "torch AdaptiveLogSoftmaxWithLoss", "full": "charlm full softmax"}
    train = {"ours": ours_step, "torch": torch_step}
    if not a.no_full:
        W = rng.uniform(-0.1, 0.1, (V, H)).astype(np.float32)
        b = np.zeros(V, np.float32)
        dW, db = np.zeros_like(W), np.zeros_like(b)
        logits = np.empty((M, V), np.float32)
        t32 = targets.astype(np.int32)

        def full_step():
            dW.fill(0)
            db.fill(0)
            dtop.fill(0)
            layers.linear_forward(logits, top, W, b, threads)
            layers.softmax_xent_forward(logits, logits, t32, threads)
            layers.softmax_xent_backward(logits, logits, t32, 1.0 / M, threads)
            layers.linear_backward(dtop, dW, db, logits, top, W, threads)
        train["full"] = full_step
    # charlm as in training: Numba threads, single-threaded BLAS calls (compute_threads). The limit
    # does not reach torch: its MKL is linked into libtorch, and its OpenMP pool is left alone.
    with compute_threads(threads):
        tr = timed(train, reps)
        ev = timed({"ours": ours_eval, "torch": torch_eval}, reps)

    print(f"| output layer, float32, {M} tokens a batch | ms / batch (best) | ms (median) | CPU ms (median) "
          f"| tokens/s (best) | charlm adaptive's speed-up (best) |\n|---|---|---|---|---|---|")
    for kind, res in (("train step (forward + backward)", tr), ("eval (target ln P, forward)", ev)):
        for k, (best, med, cpu) in res.items():
            ratio = "" if k == "ours" else f"{best / res['ours'][0]:.2f}x"
            print(f"| {names[k]}, {kind} | {best * 1e3:.1f} | {med * 1e3:.1f} | {cpu * 1e3:.0f} | {M / best:,.0f} "
                  f"| {ratio} |")
    line = f"\ntokens/s ratios (best times): train charlm adaptive / torch = {tr['torch'][0] / tr['ours'][0]:.2f}x"
    if "full" in tr:
        line += f", / charlm full softmax = {tr['full'][0] / tr['ours'][0]:.2f}x"
    line += f"; eval charlm / torch = {ev['torch'][0] / ev['ours'][0]:.2f}x"
    line += (f" (medians: {tr['torch'][1] / tr['ours'][1]:.2f}x"
             + (f", {tr['full'][1] / tr['ours'][1]:.2f}x" if "full" in tr else "")
             + f", {ev['torch'][1] / ev['ours'][1]:.2f}x)")
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
