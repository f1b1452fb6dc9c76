"""Peak resident memory of `charlm train` on a large corpus.

    python benchmarks/memory.py --mb 1024 [--steps 20]

Builds a corpus of about --mb megabytes (Tiny Shakespeare repeated, or generated text
when the shared corpus is absent) in a temporary folder, trains a 2x256 LSTM on it for a
few steps in a child process, and prints the child's peak resident set size next to the
corpus size and the model + optimizer state. The corpus is read in pieces and tokenised
into a memory-mapped id file, so the peak should not grow with the corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "tinyshakespeare" / "input.txt"


def build_corpus(path: Path, mb: int) -> int:
    if SHAKESPEARE.is_file():
        block = SHAKESPEARE.read_bytes()
    else:
        block = b"".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n".encode() for i in range(20000))
    target = mb * 1024 * 1024
    written = 0
    with open(path, "wb") as f:
        while written < target:
            piece = block[: target - written]
            f.write(piece)
            written += len(piece)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the corpus (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        corpus = d / "big.txt"
        t = time.perf_counter()
        size = build_corpus(corpus, args.mb)
        build_s = time.perf_counter() - t
        cmd = [sys.executable, "-m", "charlm", "train", str(corpus), "--steps", str(args.steps),
               "--eval-every", "1000000", "--val-frac", "0.0005", "--sample-length", "0", "--json",
               "--out", str(d / "run")]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        done = json.loads(proc.stdout.strip().splitlines()[-1])
        tokens_file = (d / "run" / "tokens.bin").stat().st_size
        ckpt = (d / "run" / "latest.npz").stat().st_size
        print(json.dumps({
            "corpus_bytes": size, "corpus_build_s": round(build_s, 1), "token_file_bytes": tokens_file,
            "train_wall_s": round(wall, 1), "steps": done["steps"],
            "peak_rss_mb": round(peak_kb / 1024, 1),
            "checkpoint_bytes (model + Adam state + metadata)": ckpt,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
