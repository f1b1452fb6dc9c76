"""Word models at a large vocabulary: training and exact evaluation tokens/s of the whole model
(embedding -> 2-layer LSTM -> output head), charlm's adaptive softmax side by side with PyTorch's
nn.AdaptiveLogSoftmaxWithLoss (same sizes, same cutoffs), and charlm's full softmax on the same model.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/large_vocab.py [--quick]

Default: V = 267,000 (WikiText-103's vocabulary size), embedding = hidden = 512, 2 layers, batch 32,
windows of 35 words, cutoffs 20000,40000,200000, div_value 4, Adam, clipping 0.25. The token ids
follow a Zipf law (exponent 1.1, benchmarks/zipf_corpus.py's), so the tail clusters see the share of
rows a real corpus gives them. A training step is forward, backward, clipping and the Adam update
(the embedding's gradient is dense on both sides: nn.Embedding's default). Exact evaluation: the
summed log-probability of each window's targets (no gradient), state carried.

--sparse: the embedding updated in the rows a batch uses only, on both sides: charlm as `charlm train
--sparse-embedding` runs it (gradient rows, their norm, lazy Adam), PyTorch with nn.Embedding(sparse=True)
and torch.optim.SparseAdam for it (Adam for the rest), the same semantics.

Prints a markdown table with the ratios and one JSON line. PyTorch is the benchmark-only extra.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numba
import numpy as np

from charlm.config import ModelConfig
from charlm.lm.models import create_model
from charlm.optim import Adam, clip_scale, grad_norm
from charlm.runtime import compute_threads


def zipf_ids(V: int, n: int, seed: int, s: float = 1.1) -> np.ndarray:
    """n ids in [0, V) with P(id = k) proportional to 1 / (k + 1)^s (id 0 the most frequent)."""
    p = 1.0 / np.arange(1, V + 1) ** s
    cdf = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(cdf, np.random.default_rng(seed).random(n)), V - 1).astype(np.int64)


def windows(ids: np.ndarray, T: int, N: int, steps: int):
    """steps (x, y) windows of (T, N) from one id stream cut into N streams."""
    L = (len(ids) - 1) // N
    streams = ids[:N * L + 1]
    for k in range(steps):
        t0 = (k * T) % (L - T - 1)
        idx = np.arange(N)[None, :] * L + t0 + np.arange(T)[:, None]
        yield streams[idx], streams[idx + 1]


def ours(cfg: ModelConfig, data, steps: int, clip: float, evaluate: bool, sparse: bool = False) -> float:
    """Tokens/s of charlm's training step (or exact evaluation) over the windows after one warm-up, on
    every core as the command line runs (compute_threads: Numba splits the work, BLAS single-threaded;
    without it each Numba thread's BLAS call would start threads of its own)."""
    with compute_threads(None):
        return _ours(cfg, data, steps, clip, evaluate, sparse)


def _ours(cfg: ModelConfig, data, steps: int, clip: float, evaluate: bool, sparse: bool) -> float:
    model = create_model(cfg, seed=0)
    opt = Adam(model.trainable, lazy=sparse)
    model.sparse_grads = True  # as the trainer sets it (one process): the embedding's gradient rows only
    grads = model.zero_grads()
    N = data[0][0].shape[1]
    state = model.zero_state(N)
    t = 0.0
    for i, (x, y) in enumerate(data[:steps + 1]):
        t0 = time.perf_counter()
        if evaluate:
            lp, state = model.token_logprobs(x, y, state)
        else:
            loss, state = model.loss_and_grads(x, y, state, grads)
            rows = model.touched()
            opt.step(model.trainable, grads, 1e-3, clip_scale(grad_norm(grads, rows), clip), rows)
        if i:
            t += time.perf_counter() - t0
    return steps * data[0][0].size / t


def theirs(torch, cfg: ModelConfig, data, steps: int, clip: float, evaluate: bool, sparse: bool = False) -> float:
    """The same with torch: Embedding + LSTM + AdaptiveLogSoftmaxWithLoss (head_bias=True, as ours)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(cfg.vocab_size, cfg.embed, sparse=sparse)
            self.rnn = torch.nn.LSTM(cfg.embed, cfg.hidden, cfg.layers)
            self.decoder = torch.nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden, cfg.vocab_size, list(cfg.cutoffs),
                                                               div_value=cfg.div_value, head_bias=True)

    net = Net()
    if sparse:
        dense_params = [p for n, p in net.named_parameters() if not n.startswith("embedding.")]
        opts = [torch.optim.SparseAdam(list(net.embedding.parameters()), lr=1e-3), torch.optim.Adam(dense_params, lr=1e-3)]
    else:
        opts = [torch.optim.Adam(net.parameters(), lr=1e-3)]
    state = None
    t = 0.0
    for i, (x, y) in enumerate(data[:steps + 1]):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        if evaluate:
            with torch.no_grad():
                out, state = net.rnn(net.embedding(xt), state)
                net.decoder(out.reshape(-1, cfg.hidden), yt.reshape(-1)).output.sum().item()
        else:
            if state is not None:
                state = tuple(s.detach() for s in state)
            out, state = net.rnn(net.embedding(xt), state)
            loss = net.decoder(out.reshape(-1, cfg.hidden), yt.reshape(-1)).loss
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            if not sparse:  # clip_grad_norm_ does not take sparse gradients: clip the dense ones
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if not p.grad.is_sparse], clip)
            for opt in opts:
                opt.step()
        if i:
            t += time.perf_counter() - t0
    return steps * data[0][0].size / t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="V = 50,000, hidden 256, 3 steps: a smoke run")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8, after one warm-up)")
    ap.add_argument("--full-steps", type=int, default=2, help="timed steps of our full softmax (default 2: slow)")
    ap.add_argument("--sparse", action="store_true", help="embedding rows of the batch only, both sides (see above)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(numba.get_num_threads())
    V, H, cutoffs = (50_000, 256, (5000, 10000, 40000)) if args.quick else (267_000, 512, (20000, 40000, 200000))
    steps = 3 if args.quick else args.steps
    N, T, clip = 32, 35, 0.25
    ids = zipf_ids(V, N * (T * (steps + 2) + 1) + 1, seed=0)
    data = list(windows(ids, T, N, steps + 1))
    adaptive = ModelConfig(cell="lstm", vocab_size=V, embed=H, hidden=H, layers=2, softmax="adaptive",
                           cutoffs=cutoffs, div_value=4.0)
    full = ModelConfig(cell="lstm", vocab_size=V, embed=H, hidden=H, layers=2)
    rows = {}
    for what, ev in (("training", False), ("exact evaluation", True)):
        o = ours(adaptive, data, steps, clip, ev, args.sparse)
        p = theirs(torch, adaptive, data, steps, clip, ev, args.sparse)
        f = ours(full, data, min(steps, args.full_steps), clip, ev, args.sparse)
        rows[what] = {"ours_adaptive": o, "torch_adaptive": p, "ours_full": f}
    print(f"LSTM 2x{H}, V = {V:,}, cutoffs {','.join(map(str, cutoffs))}, batch {N}, windows {T}, "
          f"{numba.get_num_threads()} threads, torch {torch.__version__}"
          f"{', sparse embedding updates (both sides)' if args.sparse else ''}\n")
    print("| work | charlm adaptive tok/s | PyTorch adaptive tok/s | ratio | charlm full softmax tok/s | adaptive / full |")
    print("|---|---|---|---|---|---|")
    for what, r in rows.items():
        print(f"| {what} | {r['ours_adaptive']:,.0f} | {r['torch_adaptive']:,.0f} | "
              f"{r['ours_adaptive'] / r['torch_adaptive']:.2f}x | {r['ours_full']:,.0f} | "
              f"{r['ours_adaptive'] / r['ours_full']:.1f}x |")
    print(json.dumps({"V": V, "H": H, "cutoffs": cutoffs, "sparse": args.sparse, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
