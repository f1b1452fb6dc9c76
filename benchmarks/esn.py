"""The Echo State Network on Tiny Shakespeare: held-out bits per character against an
add-one-smoothed character bigram model (and the LSTM), and how bpc changes with the
reservoir's size.

    python benchmarks/esn.py [--minutes 3 | --steps N] [--units 500 1000 2000 4000] [--threads N] [--lstm] [--ridge]

Every model is trained with `charlm train --cell esn --minutes M` on the same split the
trainer makes (the last 5 % of the text held out); the bigram counts the training part
and is scored on the same held-out characters, each conditioned on the one before
(the first on the newline, as charlm's evaluation starts). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "../shared/corpora/tinyshakespeare/input.txt"


def bigram_bpc(text: str, val_frac: float = 0.05) -> tuple[float, float]:
    """Add-one-smoothed character bigram: (held-out bpc, training bpc)."""
    sys.path.insert(0, str(ROOT))
    from charlm.data import Vocab, split_train_val
    vocab = Vocab.from_text(text)
    ids, _ = vocab.encode(text)
    train, val = split_train_val(ids.astype(np.int64), val_frac)
    V = len(vocab)
    counts = np.ones((V, V))
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))

    def bpc(seq):
        prev = np.concatenate([[vocab.eos_id], seq[:-1]])
        return -logp[prev, seq].mean() / math.log(2)
    return bpc(val), bpc(train)


def ridge_readout(text: str, units: int, seed: int = 0, val_frac: float = 0.05,
                  lambdas=(1e-6, 1e-4, 1e-2, 1.0)) -> dict:
    """The other readout the issue names: ridge regression of one-hot targets on the reservoir
    states (the classic ESN readout, one pass over the text), then a softmax temperature fitted
    on the held-out part so the outputs become probabilities. Returns held-out bpc for the best
    ridge strength (chosen on the held-out part itself, which flatters ridge)."""
    sys.path.insert(0, str(ROOT))
    from charlm.config import ModelConfig
    from charlm.data import Batches, Vocab, split_train_val
    from charlm.lm.esn import EsnModel
    from charlm.runtime import compute_threads
    vocab = Vocab.from_text(text)
    ids, _ = vocab.encode(text)
    train, val = split_train_val(ids.astype(np.int64), val_frac)
    V = len(vocab)
    model = EsnModel.create(ModelConfig(cell="esn", vocab_size=V, hidden=units, layers=1), seed=seed)
    batches = Batches(train, 64, 32)
    G = np.zeros((units + 1, units + 1))
    B = np.zeros((V, units + 1))
    state = model.zero_state(batches.N)
    with compute_threads(None):
        for k in range(batches.windows_per_epoch):
            x, y = batches.window(k)
            hs = model.states(x, state)
            X = np.concatenate([hs[1:].reshape(-1, units), np.ones((x.size, 1), np.float32)], axis=1)
            state.h[0] = hs[-1]
            G += X.T.astype(np.float64) @ X
            np.add.at(B, y.reshape(-1), X)
        xv = np.concatenate([[vocab.eos_id], val[:-1]]).astype(np.int32)[:, None]
        Xv = np.concatenate([model.states(xv, model.zero_state(1))[1:, 0].copy(), np.ones((len(val), 1))], axis=1)
    n = batches.windows_per_epoch * 64 * batches.N
    best = None
    for lam in lambdas:
        W = np.linalg.solve(G + lam * n * np.eye(units + 1), B.T)  # (H+1, V)
        O = Xv @ W

        def nll(tau):
            z = tau * O
            z -= z.max(axis=1, keepdims=True)
            return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(val)), val]).mean())
        lo, hi = 0.1, 200.0  # golden-section search for the temperature (log scale)
        g = (math.sqrt(5) - 1) / 2
        a, b = math.log(lo), math.log(hi)
        for _ in range(40):
            c, d = b - g * (b - a), a + g * (b - a)
            if nll(math.exp(c)) < nll(math.exp(d)):
                b = d
            else:
                a = c
        tau = math.exp((a + b) / 2)
        bpc = nll(tau) / math.log(2)
        if best is None or bpc < best["bpc"]:
            best = {"bpc": bpc, "lambda": lam, "tau": tau}
    return best


def train_run(args: list[str], minutes: float, threads: int | None, steps: int = 0) -> dict:
    budget = ["--steps", str(steps)] if steps else ["--minutes", str(minutes)]
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "charlm", "train", str(CORPUS), *args, *budget,
               "--out", f"{d}/run", "--json", "--quiet"] + (["--threads", str(threads)] if threads else [])
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
        lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        return next(x for x in lines if x["event"] == "done")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=0, help="train every model this many steps instead of --minutes")
    ap.add_argument("--units", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lstm", action="store_true", help="also train the default 2x256 LSTM for the same minutes")
    ap.add_argument("--ridge", action="store_true", help="also fit ridge-regression readouts (one per --units)")
    ap.add_argument("--extra", default="", help="extra charlm train options for the ESN runs, e.g. '--leak 0.5'")
    a = ap.parse_args()
    if not CORPUS.is_file():
        raise SystemExit(f"skipped: {CORPUS} is absent")
    text = CORPUS.read_text(encoding="utf-8")
    val_bigram, train_bigram = bigram_bpc(text)
    rows = [("character bigram, add-one", f"{val_bigram:.3f}", "counts, < 1 s", "")]
    for units in a.units:
        done = train_run(["--cell", "esn", "--units", str(units), *a.extra.split()], a.minutes, a.threads, a.steps)
        rows.append((f"ESN {units} units {a.extra}".strip(), f"{done['best_val_bpc']:.3f}",
                     f"{done['seconds'] / 60:.1f} min, {done['steps']:,} steps", f"{done['tokens_per_s']:,.0f}"))
        print(rows[-1], file=sys.stderr, flush=True)
    if a.ridge:
        for units in a.units:
            r = ridge_readout(text, units)
            rows.append((f"ESN {units} units, ridge readout + fitted temperature", f"{r['bpc']:.3f}",
                         f"one pass; lambda {r['lambda']:g}, temperature {r['tau']:.1f}", ""))
            print(rows[-1], file=sys.stderr, flush=True)
    if a.lstm:
        done = train_run([], a.minutes, a.threads, a.steps)
        rows.append(("LSTM 2x256 (charlm default)", f"{done['best_val_bpc']:.3f}",
                     f"{done['seconds'] / 60:.1f} min, {done['steps']:,} steps", f"{done['tokens_per_s']:,.0f}"))
    print("| model | held-out bpc | training | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
