"""Regenerate the material of the README section "Vanishing and exploding gradients": gradient flow through time in untrained and trained
RNN / GRU / LSTM models, and exploding gradients with and without clipping.

    python benchmarks/grads_demo.py [--corpus ../shared/corpora/tinyshakespeare/input.txt]
                                    [--work /tmp/charlm-grads-demo] [--minutes 2]

1. Trains a 1x128 rnn, gru and lstm for --minutes each (one thread) into WORK/<cell>-trained/, unless
   a checkpoint is already there.
2. `charlm grads` on the corpus for the three trained models and three untrained ones of the same
   size; the figure goes to docs/img/grads_flow.png.
3. Writes a vanilla RNN in the exploding regime (W_hh = 3 Q, Q orthogonal) as a checkpoint,
   measures it (docs/img/grads_exploding.png, against the default initialisation), and trains from
   it with SGD, lr 0.5, windows of 256 characters, 100 steps, --clip 0 and then --clip 5.

Every command is printed with its real output. Runs `python -m charlm` from the repository root,
with NUMBA_NUM_THREADS=1 and --threads 1, so it uses one core.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
ENV = {**os.environ, "NUMBA_NUM_THREADS": "1", "COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
SIZE = ["--hidden", "128", "--layers", "1"]


def charlm(*args, show_stderr: bool = False) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    print("$ charlm " + " ".join(args), flush=True)
    res = subprocess.run([sys.executable, "-m", "charlm", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    print(res.stdout, end="", flush=True)
    if show_stderr or res.returncode:
        print(res.stderr, end="", flush=True)
    print(f"(exit code {res.returncode})\n", flush=True)
    return res


def exploding_checkpoint(corpus: Path, path: Path, hidden: int = 64, embed: int = 16, gain: float = 3.0) -> None:
    """A vanilla RNN with charlm's initialisation but W_hh = gain * Q (Q orthogonal): every singular
    value of W_hh is `gain`, and the gradient grows as it goes back in time."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from charlm.lm import checkpoint
    from charlm.config import ModelConfig
    from charlm.data import Vocab, read_text
    from charlm.lm.model import init_params

    vocab = Vocab.from_text(read_text(str(corpus)))
    cfg = ModelConfig(cell="rnn", vocab_size=len(vocab), embed=embed, hidden=hidden, layers=1)
    params = init_params(cfg, np.random.default_rng(0))
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((hidden, hidden)))
    params["rnn.weight_hh_l0"][...] = gain * q
    checkpoint.save(checkpoint.Checkpoint(model=cfg, vocab=vocab, params=params), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpora" / "tinyshakespeare" / "input.txt"))
    ap.add_argument("--work", default="/tmp/charlm-grads-demo", help="folder for the runs (default: %(default)s)")
    ap.add_argument("--minutes", type=float, default=2.0, help="training time per model (default: %(default)s)")
    a = ap.parse_args()
    corpus, work = Path(a.corpus).resolve(), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    IMG.mkdir(parents=True, exist_ok=True)

    print("## 1. training (skipped where a checkpoint exists)\n")
    for cell in ("rnn", "gru", "lstm"):
        run = work / f"{cell}-trained"
        if (run / "best.npz").is_file():
            print(f"{run}: already trained\n")
            continue
        charlm("train", corpus, "--cell", cell, *SIZE, "--minutes", a.minutes, "--threads", "1",
               "--eval-every", "1000", "--json", "--sample-length", "0", "--out", run)

    print("## 2. gradient flow, untrained and trained\n")
    charlm("grads", corpus, *[x for c in ("rnn", "gru", "lstm") for x in ("--model", work / f"{c}-trained")],
           "--cell", "rnn", "--cell", "gru", "--cell", "lstm", *SIZE, "--threads", "1",
           "--plot", IMG / "grads_flow.png")

    print("## 3. exploding gradients and clipping\n")
    exp = work / "rnn-exploding"
    exp.mkdir(exist_ok=True)
    exploding_checkpoint(corpus, exp / "best.npz")
    charlm("grads", corpus, "--model", exp, "--cell", "rnn", "--hidden", "64", "--embed", "16", "--layers", "1",
           "--threads", "1", "--plot", IMG / "grads_exploding.png")
    for clip in ("0", "5"):
        out = work / f"clip{clip}"
        shutil.rmtree(out, ignore_errors=True)
        charlm("train", corpus, "--init-from", exp / "best.npz", "--optimizer", "sgd", "--lr", "0.5",
               "--seq-len", "256", "--batch", "4", "--steps", "100", "--eval-every", "25", "--clip", clip,
               "--threads", "1", "--json", "--sample-length", "0", "--out", out, show_stderr=True)
        charlm("grads", corpus, "--model", out / "latest.npz", "--max-lag", "16", "--windows", "8", "--threads", "1")
    for f in sorted(IMG.glob("grads_*.png")):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
