"""How fast this machine streams weights through a batch-1 product, and what that means for the
batch-1 rows of the speed table (issue 17 item 3).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bandwidth.py [--json]

Batch-1 sampling and exact one-stream scoring are matrix-vector products: every token reads every
recurrent weight once and does one multiply-add per weight, so a token costs (bytes it streams) /
(bytes per second the machine sustains), whatever the kernel. This script measures the second
number with the sampler's own product (charlm.kernels.sample._affine, float32 and bfloat16
weights) on 1 and 2 threads, each thread streaming its own weights of 0.5 to 4 MB, repeated as a
token loop repeats them (so a working set that fits a core's cache stays there). Then, for each row,
it prints the bytes per token, the rate the target ratio needs (target x PyTorch's tokens/s, the
PyTorch rate measured here side by side with the loops run_all.py uses), and the best rate measured.
A row whose needed rate is above every measured rate cannot meet its target on this machine with
that weight format; the time per token below which no kernel goes is bytes / best rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from torch_ref import lstmcell_sampler  # noqa: E402


def stream_rates(threads: int, repeats: int) -> list[dict]:
    """GB/s of the sampler's product, each of `threads` threads streaming its own matrix of size MB."""
    import numba
    from numba import prange
    from charlm.kernels import sample
    from charlm.runtime import compute_threads

    @numba.njit(parallel=True, nogil=True)
    def run(n, out, x, W, b):  # each thread its own W[p] (M, D, K), n passes over all of it
        for p in prange(W.shape[0]):
            for _ in range(n):
                for m in range(W.shape[1]):
                    sample._affine(out[p], x, W[p, m], b, np.int64(0), np.int64(out.shape[1]))

    rows = []
    D, K = 256, 512
    with compute_threads(threads):
        for fmt in ("float32", "bf16"):
            item = 4 if fmt == "float32" else 2
            for mb in (0.5, 1.0, 2.0, 4.0):
                M = max(1, int(round(mb * 2 ** 20 / (D * K * item))))
                W = np.random.default_rng(0).random((threads, M, D, K), dtype=np.float32) - 0.5
                if fmt == "bf16":
                    W = sample.to_bf16(W.reshape(-1, K)).reshape(threads, M, D, K)
                x = np.random.default_rng(1).random(D, dtype=np.float32)
                out = np.zeros((threads, K), np.float32)
                b = np.zeros(K, np.float32)
                run(1, out, x, W, b)
                n = max(20, int(200 / mb))
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    run(n, out, x, W, b)
                    times.append(time.perf_counter() - t)
                dt = statistics.median(times)
                rows.append({"format": fmt, "threads": threads, "mb_per_thread": mb,
                             "gb_s": W.nbytes * n / dt / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def torch_rates(repeats: int) -> dict:
    """PyTorch's batch-1 tokens/s, as run_all.py measures them: the LSTMCell sampling loop and
    nn.LSTM over one stream in windows of 256."""
    import torch
    torch.set_num_threads(2)
    V, E = 65, 64
    rates = {}
    for H in (256, 512):
        n = 1000
        loop = lstmcell_sampler(torch, V, E, H, n)
        loop()
        rates[f"sample 2x{H}"] = n / statistics.median(_times(loop, repeats))
    emb, rnn, dec = torch.nn.Embedding(V, E), torch.nn.LSTM(E, 512, 2), torch.nn.Linear(512, V)
    ids = torch.randint(0, V, (20_000, 1))

    def score():
        with torch.no_grad():
            state = None
            for s in range(0, len(ids), 256):
                out, state = rnn(emb(ids[s:s + 256]), state)
                torch.log_softmax(dec(out), -1)
    score()
    rates["score 2x512, 1 stream"] = len(ids) / statistics.median(_times(score, repeats))
    return rates


def _times(f, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def bytes_per_token(H: int, V: int, what: str, item: int) -> int:
    """Weights a 2-layer char LSTM streams per token. Sampling: layer 1's recurrent weights (its
    input product is a table row), layer 2's input and recurrent weights, the output layer. One-stream
    scoring: the two recurrent matrices (input and output products are whole-window GEMMs)."""
    rec = 4 * H * H * item
    return 3 * rec + H * V * item if what == "sample" else 2 * rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="one JSON line at the end")
    args = ap.parse_args()
    rates = stream_rates(1, args.repeats) + stream_rates(2, args.repeats)
    torch_tps = torch_rates(args.repeats)
    print("\n| weights | threads | 0.5 MB/thread | 1 MB | 2 MB | 4 MB |")
    print("|---|---|---|---|---|---|")
    for fmt in ("float32", "bf16"):
        for t in (1, 2):
            r = [x["gb_s"] for x in rates if x["format"] == fmt and x["threads"] == t]
            print(f"| {fmt} | {t} | " + " | ".join(f"{g:.0f} GB/s" for g in r) + " |")
    best = {fmt: max(x["gb_s"] for x in rates if x["format"] == fmt) for fmt in ("float32", "bf16")}
    table = []
    for name, H, what, target in (("sample 2x256", 256, "sample", 5.0), ("sample 2x512", 512, "sample", 5.0),
                                  ("score 2x512, 1 stream", 512, "score", 1.5)):
        for fmt, item in (("float32", 4), ("bf16", 2)):
            b = bytes_per_token(H, 65, what, item)
            need = b * target * torch_tps[name] / 1e9
            table.append({"row": name, "format": fmt, "mb_per_token": b / 2 ** 20,
                          "pytorch_tok_s": torch_tps[name], "target": target, "needed_gb_s": need,
                          "best_gb_s": best[fmt], "floor_us_per_token": b / best[fmt] / 1e3,
                          "ceiling_ratio": best[fmt] * 1e9 / b / torch_tps[name]})
    print("\n| row | weights | MB / token | PyTorch tok/s | target | needs | best measured | "
          "at best: µs / token | at best: ratio to PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['row']} | {r['format']} | {r['mb_per_token']:.2f} | {r['pytorch_tok_s']:,.0f} | "
              f"{r['target']:.1f}× | {r['needed_gb_s']:.0f} GB/s | {r['best_gb_s']:.0f} GB/s | "
              f"{r['floor_us_per_token']:.1f} | {r['ceiling_ratio']:.2f}× |")
    if args.json:
        print(json.dumps({"stream": rates, "pytorch_tok_s": torch_tps, "rows": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
