"""Scoring by the chain rule: P(W) = prod_k P(w_k | w_1..w_{k-1}), the last factor
being the end of the text (the newline token), unless eos=False.

Context: the zero state with the end-of-line token fed as the first input, the
same begin-of-text context that sampling uses (like KenLM's <s>).
"""
from __future__ import annotations

import math

import numpy as np

from .data import Vocab
from .model import Model

LN10 = math.log(10.0)
LN2 = math.log(2.0)


def score_text(model: Model, vocab: Vocab, text: str, *, eos: bool = True, window: int = 512) -> dict:
    """Per-token probabilities and totals for one text (see the module docstring).

    Characters outside the vocabulary are left out of the product and counted in "oov".
    """
    ids, oov = vocab.encode(text)
    targets = np.concatenate([ids, [vocab.eos_id]] if eos else [ids]).astype(np.int32)
    inputs = np.concatenate([[vocab.eos_id], targets[:-1]]).astype(np.int32) if len(targets) else targets
    lp = np.empty(len(targets), dtype=np.float64)
    state = model.zero_state(1)
    for s in range(0, len(targets), window):
        x = inputs[s:s + window, None]
        y = targets[s:s + window, None]
        out, state = model.token_logprobs(x, y, state)
        lp[s:s + window] = out[:, 0]
    return summarize(vocab, targets, lp, len(oov), [ch for _, ch in oov])


def summarize(vocab: Vocab, targets: np.ndarray, lp: np.ndarray, n_oov: int, oov_tokens=()) -> dict:
    n = len(targets)
    total = float(lp.sum())
    return {
        "tokens": [{"token": vocab.tokens[int(t)], "id": int(t), "prob": math.exp(l), "logprob": float(l)}
                   for t, l in zip(targets, lp)],
        "logprob": total,
        "log10prob": total / LN10,
        "bits_per_token": (-total / LN2 / n) if n else 0.0,
        "perplexity": math.exp(-total / n) if n else 1.0,
        "n_tokens": n,
        "oov": n_oov,
        "oov_tokens": sorted(set(oov_tokens)),
    }


def corpus_total(results: list[dict]) -> dict:
    n = sum(r["n_tokens"] for r in results)
    total = sum(r["logprob"] for r in results)
    return {
        "logprob": total,
        "log10prob": total / LN10,
        "bits_per_token": (-total / LN2 / n) if n else 0.0,
        "perplexity": math.exp(-total / n) if n else 1.0,
        "n_tokens": n,
        "oov": sum(r["oov"] for r in results),
        "n_texts": len(results),
    }
