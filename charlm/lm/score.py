"""Scoring by the chain rule: P(W) = prod_{k=1}^{M+1} P(w_k | w_1..w_{k-1}), the
last factor being the end of the sentence (<eos> for words, the newline for
characters) unless eos=False.

Context: the zero state with the end token fed as the first input, the context
every line after the first had in training (like KenLM's <s>).

Out-of-vocabulary tokens: a word outside the vocabulary contributes
P(<unk> | history) and is counted as OOV; a character outside the vocabulary is
left out of the product and counted as OOV. With N scored factors (the end
factor included, as KenLM counts), total ln P and the ln P of the OOV factors:

    perplexity           = exp(-lnP / N)
    perplexity_excl_oov  = exp(-(lnP - lnP_oov) / (N - n_oov))
    bits_per_token       = -lnP / (N ln 2)
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..data import Vocab
from .base import BaseModel

LN10 = math.log(10.0)
LN2 = math.log(2.0)


def safe_exp(x: float) -> float:
    """exp(x), inf instead of OverflowError (a perplexity past 1e308, from a diverged model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def totals(total: float, n: int, oov_lp: float = 0.0, n_oov_factors: int = 0) -> dict:
    """The summary figures of n scored factors with total ln P (formulas in the module docstring)."""
    n_in = n - n_oov_factors
    return {
        "logprob": total,
        "log10prob": total / LN10,
        "bits_per_token": (-total / LN2 / n) if n else 0.0,
        "perplexity": safe_exp(-total / n) if n else 1.0,
        "perplexity_excl_oov": safe_exp(-(total - oov_lp) / n_in) if n_in else 1.0,
        "n_tokens": n,
    }


def _logprobs(model: BaseModel, inputs: np.ndarray, targets: np.ndarray, window: int) -> np.ndarray:
    """log P(targets[t] | inputs[..t]) for one stream from the zero state."""
    lp = np.empty(len(targets), dtype=np.float64)
    state = model.zero_state(1)
    for s in range(0, len(targets), window):
        out, state = model.token_logprobs(inputs[s:s + window, None], targets[s:s + window, None], state)
        lp[s:s + window] = out[:, 0]
    return lp


def score_text(model: BaseModel, vocab: Vocab, text: str, *, eos: bool = True, window: int = 512) -> dict:
    """Per-token probabilities and totals for one text (see the module docstring)."""
    ids, oov = vocab.encode(text)
    targets = np.concatenate([ids, [vocab.eos_id]] if eos else [ids]).astype(np.int32)
    inputs = np.concatenate([[vocab.eos_id], targets[:-1]]).astype(np.int32) if len(targets) else targets
    lp = _logprobs(model, inputs, targets, window)
    shown = [vocab.tokens[int(t)] for t in targets]
    is_oov = np.zeros(len(targets), dtype=bool)
    if vocab.level == "word":
        for pos, word in oov:
            shown[pos] = word
            is_oov[pos] = True
    return summarize(targets, lp, shown, is_oov, n_skipped=0 if vocab.level == "word" else len(oov),
                     oov_tokens=[t for _, t in oov])


def summarize(targets, lp, shown, is_oov, n_skipped: int = 0, oov_tokens=()) -> dict:
    oov_lp = float(lp[is_oov].sum())
    n_oov_factors = int(is_oov.sum())
    return {
        "tokens": [{"token": s, "id": int(t), "prob": math.exp(l), "logprob": float(l), "oov": bool(o)}
                   for s, t, l, o in zip(shown, targets, lp, is_oov)],
        **totals(float(lp.sum()), len(targets), oov_lp, n_oov_factors),
        "oov": n_oov_factors + n_skipped,
        "oov_logprob": oov_lp,
        "oov_tokens": sorted(set(oov_tokens)),
    }


def corpus_total(results: list[dict]) -> dict:
    n = sum(r["n_tokens"] for r in results)
    total = sum(r["logprob"] for r in results)
    n_oov_factors = sum(sum(t["oov"] for t in r["tokens"]) for r in results)
    oov_lp = sum(r.get("oov_logprob", 0.0) for r in results)
    return {
        **totals(total, n, oov_lp, n_oov_factors),
        "oov": sum(r["oov"] for r in results),
        "n_texts": len(results),
    }


def evaluate_text(model: BaseModel, vocab: Vocab, text: str, *, streams: int = 1, window: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity / bits per token of a whole text (one <eos> per line for words;
    the newline characters for characters).

    streams = 1 is exact: the state is carried through the whole text from the
    begin context. streams = K cuts the token sequence into K contiguous parts
    scored side by side; each part restarts from the zero state (its first
    input is the token before it), which is faster but slightly pessimistic.
    progress(done_tokens, total_tokens) is called after each window.
    window: time steps per forward pass; by default 256 for one stream, fewer
    for many (about 8,192 positions a window): the pass keeps every step's gate
    pre-activations, 256 x 64 x 4H floats would be 134 MB for H = 512, and the
    first window's pages cost more than the scoring (41k against 55k tokens/s).
    """
    if window is None:
        window = max(32, min(256, 8192 // max(1, streams)))
    ids, oov = vocab.encode(text)
    ids = ids.astype(np.int32)
    n = len(ids)
    full = np.concatenate([[vocab.eos_id], ids]).astype(np.int32)  # inputs full[t], target full[t+1]
    is_oov = np.zeros(n, dtype=bool)
    if vocab.level == "word":
        for pos, _ in oov:
            is_oov[pos] = True
    K = max(1, min(streams, n))
    L = -(-n // K) if n else 0  # ceil: the last part may be shorter, padded with skipped targets
    total = 0.0
    oov_lp = 0.0
    done = 0
    if n:
        offs = np.arange(K) * L
        state = model.zero_state(K)
        for start in range(0, L, window):
            T = min(window, L - start)
            pos = offs[None, :] + start + np.arange(T)[:, None]          # (T, K) target positions
            valid = pos < n
            x = np.where(valid, full[np.minimum(pos, n)], 0).astype(np.int32)
            y = np.where(valid, full[np.minimum(pos + 1, n)], -1).astype(np.int32)
            lp, state = model.token_logprobs(x, y, state)
            total += float(lp[valid].sum())
            oov_lp += float(lp[valid & is_oov[np.minimum(pos, n - 1)]].sum())
            done += int(valid.sum())
            if progress:
                progress(done, n)
    return {
        **totals(total, n, oov_lp, int(is_oov.sum())),
        "oov": len(oov),
        "streams": K,
    }
