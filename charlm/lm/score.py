"""Scoring by the chain rule: P(W) = prod_{k=1}^{M+1} P(w_k | w_1..w_{k-1}), the
last factor being the end of the sentence (<eos> for words, the newline for
characters) unless eos=False.

Context: the zero state with the end token fed as the first input, the context
every line after the first had in training (like KenLM's <s>).

Out-of-vocabulary tokens: a word outside the vocabulary contributes
P(<unk> | history) and is counted as OOV; a character outside the vocabulary is
left out of the product and counted as OOV. A text with OOV tokens and none in
the vocabulary is scored all the same, but an OOVWarning says that its figures
are of <unk> or of its line ends alone (OOVCheck). With N scored factors (the end
factor included, as KenLM counts), total ln P and the ln P of the OOV factors:

    perplexity           = exp(-lnP / N)
    perplexity_excl_oov  = exp(-(lnP - lnP_oov) / (N - n_oov))
    bits_per_token       = -lnP / (N ln 2)
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .. import dist
from ..data import Vocab
from . import shard
from .base import BaseModel

LN10 = math.log(10.0)
NOTHING_TO_SCORE = ("nothing to score: the text has no token in the vocabulary and the end factor is left out "
                    "(--no-eos); a perplexity of such a text would be meaningless")
LN2 = math.log(2.0)


def safe_exp(x: float) -> float:
    """exp(x), inf instead of OverflowError (a perplexity past 1e308, from a diverged model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


class OOVWarning(UserWarning):
    """Nothing of a text was in the model's vocabulary: its figures are those of <unk> (words) or of
    the ends of line (characters) alone, not of the text (issue 18; the CLI prints it on stderr)."""
    prefix = "warning"


class OOVCheck:
    """Finds the texts among scored results (each with "in_vocab": the factors whose target is a token
    of the text in the vocabulary, the end factors left out) that have OOV tokens and nothing else,
    and words the warning: a perplexity of such a text describes <unk> or empty lines, not the text."""

    def __init__(self, level: str):
        self.word = level == "word"
        self.n_texts = self.oov = self.n_end = 0
        self.empty: list[int] = []  # indices of the texts with nothing in the vocabulary (the first few)
        self.n_empty = 0
        self.tokens: set[str] = set()

    def add(self, r: dict) -> None:
        if r["oov"] and not r["in_vocab"]:
            self.n_empty += 1
            if len(self.empty) < 3:
                self.empty.append(self.n_texts)
            self.oov += r["oov"]
            self.n_end += r["n_tokens"] - (r["oov"] if self.word else 0)
            if len(self.tokens) < 6:
                self.tokens.update(list(r.get("oov_tokens", ()))[:6])
        self.n_texts += 1

    def message(self, what: str = "the text") -> str | None:
        if not self.n_empty or (self.n_texts == 1 and not self.word and not self.n_end):
            return None  # (one text with no factor at all is refused: NOTHING_TO_SCORE)
        unit = "word" if self.word else "character"
        if self.n_empty < self.n_texts:
            first = ", ".join(str(k + 1) for k in self.empty) + (", ..." if self.n_empty > len(self.empty) else "")
            return (f"{self.n_empty} of {self.n_texts} texts have no {unit} in the model's vocabulary (text {first}): "
                    f"their figures are those of " + ("<unk>" if self.word else "the end of line") + " alone")
        subject = what if self.n_texts == 1 else f"the {self.n_texts} texts"
        toks = sorted(self.tokens)[:5]
        shown = ", ".join(map(repr, toks)) + (", ..." if len(self.tokens) > 5 else "")
        n, e = self.oov, self.n_end
        ends = f", and only {'its' if self.n_texts == 1 else 'their'} {e} line end{'s' if e != 1 else ''}" if e else ""
        if self.word:
            return (f"nothing of {subject} is in the model's vocabulary: {n} word{'s' if n != 1 else ''} ({shown}) "
                    f"{'were each' if n != 1 else 'was'} scored as <unk>{ends + ' as themselves' if e else ''}; the "
                    f"perplexity says how likely <unk> is, not how well the model predicts {subject}")
        return (f"nothing of {subject} is in the model's vocabulary: {n} character{'s' if n != 1 else ''} ({shown}) "
                f"{'were' if n != 1 else 'was'} left out{ends + (' were' if e != 1 else ' was') + ' scored' if e else ''}; "
                f"the figures describe empty lines, not {subject}")

    def warn(self, what: str = "the text") -> None:
        message = self.message(what)
        if message:
            import warnings
            warnings.warn(message, OOVWarning, stacklevel=3)


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
    r = summarize(targets, lp, shown, is_oov, n_skipped=0 if vocab.level == "word" else len(oov),
                  oov_tokens=[t for _, t in oov])
    r["in_vocab"] = int(((targets != vocab.eos_id) & ~is_oov).sum())  # the text's own tokens scored as themselves
    return r


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
    n, full, is_oov, oov = eval_ids(vocab, text)
    K = max(1, min(streams, n))
    L = -(-n // K) if n else 0  # ceil: the last part may be shorter, padded with skipped targets
    total = 0.0
    oov_lp = 0.0
    done = 0
    if n:
        offs = np.arange(K) * L
        block = dist.block(K) if dist.size() > 1 else None  # under MPI: this rank's block of the K streams
        state = model.zero_state(K if block is None else block[1] - block[0])
        for start in range(0, L, window):
            T = min(window, L - start)
            pos = offs[None, :] + start + np.arange(T)[:, None]          # (T, K) target positions
            valid = pos < n
            x = np.where(valid, full[np.minimum(pos, n)], 0).astype(np.int32)
            y = np.where(valid, full[np.minimum(pos + 1, n)], -1).astype(np.int32)
            if block is None:
                lp, state = model.token_logprobs(x, y, state)
            else:  # rank 0 gets every column, computed as one process computes it, and adds up alone
                lp, state = shard.window_logprobs(model, x, y, state, block)
                if lp is None:
                    continue
            total += float(lp[valid].sum())
            oov_lp += float(lp[valid & is_oov[np.minimum(pos, n - 1)]].sum())
            done += int(valid.sum())
            if progress:
                progress(done, n)
        if block is not None:
            total, oov_lp = dist.bcast((total, oov_lp), what="the evaluation's totals")
    return {
        **totals(total, n, oov_lp, int(is_oov.sum())),
        "oov": len(oov),
        "streams": K,
        "in_vocab": int((full[1:] != vocab.eos_id).sum()) - int(is_oov.sum()),  # the text's tokens scored as themselves
        "oov_tokens": sorted({t for _, t in oov[:100_000]})[:6],
    }


# ------------------------------------------------------------------ many texts, totals only
def eval_ids(vocab: Vocab, text: str) -> tuple[int, np.ndarray, np.ndarray, list]:
    """What evaluating text scores: n tokens (one <eos> per line for words, the newlines for characters),
    full (n+1,) int32 the inputs full[t] and targets full[t+1] after the begin context, is_oov (n,) the
    words fed as <unk>, and the vocabulary's OOV report. Static and dynamic evaluation share it."""
    ids, oov = vocab.encode(text)
    ids = ids.astype(np.int32)
    n = len(ids)
    full = np.concatenate([[vocab.eos_id], ids]).astype(np.int32)  # inputs full[t], target full[t+1]
    is_oov = np.zeros(n, dtype=bool)
    if vocab.level == "word":
        for pos, _ in oov:
            is_oov[pos] = True
    return n, full, is_oov, oov


def _char_ids(vocab: Vocab, text: str) -> tuple[np.ndarray, int, list[str]]:
    """A character text's ids (int32) with the characters outside the vocabulary left out, their
    count and the distinct ones, sorted: vectorised, without a Python object per character (a
    10 MB line stays small)."""
    table = getattr(vocab, "_char_table", None)
    if table is None:
        table = np.full(max(map(ord, vocab.tokens)) + 2, -1, dtype=np.int32)
        for i, t in enumerate(vocab.tokens):
            table[ord(t)] = i
        object.__setattr__(vocab, "_char_table", table)  # a cache on the frozen Vocab
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    ids = table[np.minimum(cps, len(table) - 1)]
    keep = ids >= 0
    skipped = int(len(ids) - keep.sum())
    oov = sorted(chr(c) for c in np.unique(cps[~keep]).tolist()) if skipped else []
    return ids[keep], skipped, oov


def _targets(vocab: Vocab, text: str, eos: bool) -> tuple[np.ndarray, np.ndarray | None, int, list[str]]:
    """Targets (int32) of one text, the OOV mask of its factors (words) or None, the number of
    characters left out, and the OOV tokens."""
    if vocab.level == "char":
        ids, skipped, oov_tokens = _char_ids(vocab, text)
        mask = None
    else:
        ids, oov = vocab.encode(text)
        skipped, oov_tokens = 0, sorted({t for _, t in oov})
        mask = np.zeros(len(ids) + 1, dtype=bool)
        for pos, _ in oov:
            mask[pos] = True
        mask = mask if eos else mask[:-1]
    targets = np.concatenate([ids, [vocab.eos_id]] if eos else [ids]).astype(np.int32)
    return targets, mask, skipped, oov_tokens


def score_totals(model: BaseModel, vocab: Vocab, texts: list[str], *, eos: bool = True,
                 positions: int = 8192) -> list[dict]:
    """Each text scored on its own, as score_text, but only its totals (no "tokens"): texts of
    similar length side by side, one stream each, in windows of about `positions` positions
    (a long text alone, window by window: memory stays flat). Each result has score_text's keys
    but "tokens"; results in the order of texts."""
    enc = [_targets(vocab, t, eos) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i][0]))
    results: list[dict] = [{}] * len(texts)
    for g0 in range(0, len(order), 64):
        group = order[g0:g0 + 64]
        B = len(group)
        T = max(len(enc[i][0]) for i in group)
        y = np.full((T, B), -1, dtype=np.int32)
        is_oov = np.zeros((T, B), dtype=bool)
        for b, i in enumerate(group):
            tg, mask = enc[i][0], enc[i][1]
            y[:len(tg), b] = tg
            if mask is not None:
                is_oov[:len(tg), b] = mask[:len(tg)]
        x = np.vstack([np.full((1, B), vocab.eos_id, np.int32), np.maximum(y[:-1], 0)]) if T else y
        total = np.zeros(B)
        oov_lp = np.zeros(B)
        window = max(32, min(512, positions // B))
        state = model.zero_state(B)
        for s in range(0, T, window):
            lp, state = model.token_logprobs(x[s:s + window], y[s:s + window], state)  # padding gives 0
            total += lp.sum(axis=0)
            oov_lp += np.where(is_oov[s:s + window], lp, 0.0).sum(axis=0)
        for b, i in enumerate(group):
            n, n_oov_factors = len(enc[i][0]), int(is_oov[:, b].sum())
            results[i] = {**totals(float(total[b]), n, float(oov_lp[b]), n_oov_factors),
                          "oov": n_oov_factors + enc[i][2], "oov_logprob": float(oov_lp[b]),
                          "oov_tokens": enc[i][3],
                          "in_vocab": int((enc[i][0] != vocab.eos_id).sum()) - n_oov_factors}
    return results


class Tally:
    """Corpus totals of results added one at a time (corpus_total without keeping them)."""

    def __init__(self, level: str):
        self.word = level == "word"
        self.n = self.n_texts = self.oov = self.oov_factors = 0
        self.logprob = self.oov_lp = 0.0

    def add(self, r: dict) -> None:
        self.n += r["n_tokens"]
        self.n_texts += 1
        self.logprob += r["logprob"]
        self.oov += r["oov"]
        self.oov_factors += r["oov"] if self.word else 0
        self.oov_lp += r.get("oov_logprob", 0.0)

    def total(self) -> dict:
        return {**totals(self.logprob, self.n, self.oov_lp, self.oov_factors), "oov": self.oov,
                "n_texts": self.n_texts}


def parse_nbest(line: str) -> tuple[str, str]:
    """Kaldi's n-best text line `uttid-N w1 w2 ...` -> (uttid-N, "w1 w2 ...")."""
    parts = line.strip().split(None, 1)
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""
