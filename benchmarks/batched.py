"""Batched generation and rescoring against one at a time (issue: generation and rescoring).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/batched.py [--quick]

- n-best rescoring: Kaldi-style hypotheses (word model trained briefly on WikiText-2's first 2 MB,
  1x256 LSTM), scored by LanguageModel.rescore_nbest, which `charlm score --nbest` runs (batches of
  64 hypotheses side by side), against batch 1 (one hypothesis at a time): sentences/s of each, and
  a check that both give the same costs.
- samples: LanguageModel.sample(num_samples=16) (one batched step per token for all samples), against
  16 calls of sample() with one sample each (the compiled batch-1 sampler): samples/s, char LSTM 2x256.

Prints a markdown table and one JSON line. Untrained models give the same speeds (the work does not
depend on the weights), so the char model is a fresh one; the word model is trained a little so that
its hypotheses are words of a real vocabulary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import charlm
from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.lm import checkpoint
from charlm.lm.models import create_model

WT2 = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "wikitext-2" / "train.txt"
TS = Path(__file__).resolve().parents[1] / "corpora" / "tinyshakespeare" / "input.txt"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def word_model(tmp: Path, quick: bool) -> tuple[Path, list[str]]:
    """A briefly trained word model and n-best lines from its training text."""
    text = WT2.read_text(encoding="utf-8")[:2_000_000] if WT2.is_file() else TS.read_text(encoding="utf-8")
    corpus = tmp / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    for _ in charlm.train(str(corpus), level="word", hidden=256, embed=64, layers=1, steps=20 if quick else 60,
                          out=str(tmp / "run"), sample_length=0):
        pass
    rng = np.random.default_rng(0)
    sentences = [line.split() for line in text.splitlines() if 5 <= len(line.split()) <= 30]
    lines = []
    for u in range(100 if quick else 400):
        words = sentences[int(rng.integers(len(sentences)))]
        for n in range(1, 11):  # ten hypotheses per utterance: one or two words changed
            w = list(words)
            for _ in range(int(rng.integers(1, 3))):
                w[int(rng.integers(len(w)))] = words[int(rng.integers(len(words)))]
            lines.append(f"utt{u}-{n} " + " ".join(w))
    return tmp / "run", lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        run, lines = word_model(Path(d), args.quick)
        lm = charlm.load(str(run))
        batched = list(lm.rescore_nbest(lines))
        single = list(lm.rescore_nbest(lines, batch=1))
        diff = max(abs(a["cost"] - b["cost"]) for a, b in zip(batched, single))
        tb = best_of(lambda: list(lm.rescore_nbest(lines)), args.repeats)
        ts = best_of(lambda: list(lm.rescore_nbest(lines, batch=1)), args.repeats)
        rows["rescore"] = {"hypotheses": len(lines), "batched_per_s": len(lines) / tb, "single_per_s": len(lines) / ts,
                           "max_cost_diff": diff}

        vocab = Vocab.from_text(TS.read_text(encoding="utf-8"))
        cfg = ModelConfig(cell="lstm", vocab_size=len(vocab), embed=64, hidden=256, layers=2)
        ck = checkpoint.Checkpoint(model=cfg, vocab=vocab, params=create_model(cfg, seed=0).params)
        path = Path(d) / "char.npz"
        checkpoint.save(ck, path)
        lm = charlm.load(str(path))
        n, length = 16, 100 if args.quick else 300
        lm.sample(length=5, num_samples=2, seed=0)
        lm.sample(length=5, seed=0)
        tb = best_of(lambda: lm.sample(length=length, num_samples=n, seed=1), args.repeats)
        ts = best_of(lambda: [lm.sample(length=length, seed=s) for s in range(n)], args.repeats)
        rows["sample"] = {"samples": n, "length": length, "batched_s": tb, "single_s": ts}
    r, s = rows["rescore"], rows["sample"]
    print("| work | batched | one at a time | speed-up |")
    print("|---|---|---|---|")
    print(f"| n-best rescoring, word LSTM 1x256, {r['hypotheses']:,} hypotheses (`score --nbest`) | "
          f"{r['batched_per_s']:,.0f} sentences/s | {r['single_per_s']:,.0f} sentences/s | "
          f"{r['batched_per_s'] / r['single_per_s']:.1f}x |")
    print(f"| {s['samples']} samples of {s['length']} characters, char LSTM 2x256 (`sample -n {s['samples']}`) | "
          f"{s['batched_s']:.2f} s | {s['single_s']:.2f} s | {s['single_s'] / s['batched_s']:.1f}x |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
