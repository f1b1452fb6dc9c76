"""Write a synthetic word corpus whose word frequencies follow Zipf's law.

    python benchmarks/zipf_corpus.py --vocab 267000 --tokens 1000000 --out /tmp/zipf.txt [--alpha 1.1] [--seed 0]

Word k (named w{k}, k = 0 .. V-1) has probability proportional to (k + 1) ** -alpha, so w0 is the
most frequent; tokens are drawn independently and written as lines of 15 to 25 words (20 on
average) separated by spaces. The same arguments give the same file, byte for byte.
Also importable: zipf_probs(V, alpha) and zipf_ids(V, n, rng, alpha) give the distribution and
draws of word ids (benchmarks/adaptive_softmax.py uses them for its targets).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def zipf_probs(vocab: int, alpha: float = 1.1) -> np.ndarray:
    """P(word k) proportional to (k + 1) ** -alpha, k = 0 .. vocab - 1 (float64, sums to 1)."""
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -alpha
    return p / p.sum()


def zipf_ids(vocab: int, n: int, rng: np.random.Generator, alpha: float = 1.1) -> np.ndarray:
    """n word ids (int64) drawn independently from zipf_probs(vocab, alpha)."""
    cdf = np.cumsum(zipf_probs(vocab, alpha))
    cdf[-1] = 1.0
    ids = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(ids, vocab - 1)


def write_corpus(path: str, vocab: int, tokens: int, alpha: float = 1.1, seed: int = 0,
                 block: int = 1 << 20) -> None:
    """tokens Zipf-distributed words from a vocabulary of vocab, in lines of ~20 words, to path."""
    rng = np.random.default_rng(seed)
    names = np.array([f"w{k}" for k in range(vocab)], dtype=object)
    cdf = np.cumsum(zipf_probs(vocab, alpha))
    cdf[-1] = 1.0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        left = tokens
        carry: list[str] = []
        while left > 0:
            n = min(block, left)
            left -= n
            ids = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), vocab - 1)
            words = carry + list(names[ids])
            lengths = rng.integers(15, 26, size=len(words) // 15 + 1)
            lines, i = [], 0
            for ln in lengths:
                if i + ln > len(words):
                    break
                lines.append(" ".join(words[i:i + ln]))
                i += ln
            carry = words[i:] if left > 0 else []
            if left <= 0 and i < len(words):
                lines.append(" ".join(words[i:]))
            if lines:
                f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, required=True, help="number of distinct words V (w0 .. w{V-1})")
    ap.add_argument("--tokens", type=int, required=True, help="number of words to write")
    ap.add_argument("--out", required=True, help="output text file")
    ap.add_argument("--alpha", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = ap.parse_args(argv)
    if a.vocab < 1 or a.tokens < 1 or a.alpha <= 0:
        ap.error("--vocab and --tokens must be positive, --alpha over 0")
    write_corpus(a.out, a.vocab, a.tokens, a.alpha, a.seed)
    print(f"wrote {a.tokens:,} tokens over {a.vocab:,} words (Zipf {a.alpha}) to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
