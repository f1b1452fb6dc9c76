"""Beam search: the N most likely continuations of a prime, with their log-probabilities.

At each step the K live hypotheses (the beam) are extended by every token in one batched forward
step (BaseModel.logits_last over K streams); of the K x V candidates, ranked by their summed ln P,
the best K that do not end in a stop string stay live and those that do are finished. After
`length` tokens the live ones are finished too. Finished hypotheses are ranked by

    score = ln P / n^A        (n generated tokens, A the length penalty; A = 0 ranks by ln P)

which is HF's length_penalty (HF's default is A = 1; here 0, so with no stop strings the result is
the most probable continuations of exactly `length` tokens). The search ends early once N
hypotheses are finished and no live one can still beat the N-th (exact for the bound below, since
ln P only falls as tokens are added). K = 1 is greedy decoding; a beam as wide as every prefix
(K >= V^(length-1)) is exhaustive search. Deterministic: no randomness.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import Vocab
from ..errors import CharlmError
from .base import BaseModel, State
from .sample import Detokenizer, StopWatch, begin, result


@dataclass
class Hyp:
    ids: list
    lps: list
    text: str
    logprob: float
    at_line_start: bool
    tail: str
    done: bool = False


def _extend(h: Hyp, tok: int, lp: float, vocab: Vocab, stops) -> Hyp:
    detok = Detokenizer(vocab, h.at_line_start)
    piece = detok.piece(tok)
    watch = StopWatch(stops)
    watch.tail = h.tail
    cut = watch.feed(piece)
    return Hyp(h.ids + [tok], h.lps + [lp], h.text + (piece if cut is None else piece[:cut]), h.logprob + lp,
               detok.at_line_start, watch.tail, cut is not None)


def _score(h: Hyp, alpha: float) -> float:
    return h.logprob / (len(h.ids) ** alpha) if alpha else h.logprob


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _can_stop(finished: list[Hyp], live: list[Hyp], nbest: int, alpha: float, n: int, length: int) -> bool:
    """True when N are finished and no live hypothesis can reach the N-th score: with ln P <= its
    current value, its best possible score is ln P / length^A (A > 0) or ln P / n^A (A <= 0)."""
    if len(finished) < nbest or not live:
        return not live
    worst = sorted((_score(h, alpha) for h in finished), reverse=True)[nbest - 1]
    best = max(h.logprob for h in live)
    bound = best / (length ** alpha if alpha > 0 else n ** alpha)
    return bound <= worst


def beam_search(model: BaseModel, vocab: Vocab, prime: str, length: int, beam: int, nbest: int = 1,
                length_penalty: float = 0.0, stops=()) -> list[dict]:
    """The nbest best continuations of prime (see the module docstring), best first: dicts
    {"text", "tokens", "ids", "logprob", "n_tokens", "score"}. The greedy continuation (beam 1) is
    always a candidate too: a wider beam can lose the greedy path on the way, never its result."""
    if not isinstance(beam, (int, np.integer)) or beam <= 0:
        raise CharlmError(f"beam must be a positive whole number, got {beam!r}")
    if not isinstance(nbest, (int, np.integer)) or not 0 < nbest <= beam:
        raise CharlmError(f"nbest must be between 1 and the beam width {beam}, got {nbest!r}")
    finished = _search(model, vocab, prime, length, beam, nbest, length_penalty, stops)
    if beam > 1:
        seen = {tuple(h.ids) for h in finished}
        finished += [h for h in _search(model, vocab, prime, length, 1, 1, length_penalty, stops)
                     if tuple(h.ids) not in seen]
    ranked = sorted(finished, key=lambda h: -_score(h, length_penalty))[:nbest]
    out = [result(vocab, h.ids, h.lps, h.text) for h in ranked]
    for r in out:
        r["score"] = r["logprob"] / r["n_tokens"] ** length_penalty if length_penalty else r["logprob"]
    return out


def _search(model: BaseModel, vocab: Vocab, prime: str, length: int, beam: int, nbest: int,
            length_penalty: float, stops) -> list[Hyp]:
    """The finished hypotheses of one beam search."""
    feed, _, at_line_start = begin(vocab, prime)
    logits, state = model.logits_last(feed[:, None], model.zero_state(1))
    live = [Hyp([], [], "", 0.0, at_line_start, "")]
    finished: list[Hyp] = []
    V = logits.shape[1]
    for t in range(length):
        logp = _log_softmax(logits)
        cand = (np.array([h.logprob for h in live])[:, None] + logp).ravel()
        m = min(2 * beam, cand.size)
        top = np.argpartition(-cand, m - 1)[:m]
        top = top[np.lexsort((top, -cand[top]))]  # best first; ties by index, so deterministic
        nxt, parents = [], []
        for idx in top.tolist():
            k, v = divmod(idx, V)
            h = _extend(live[k], v, float(logp[k, v]), vocab, stops)
            if h.done:
                finished.append(h)
            elif len(nxt) < beam:
                nxt.append(h)
                parents.append(k)
        live = nxt
        if t + 1 == length:
            finished.extend(live)
            break
        if _can_stop(finished, live, nbest, length_penalty, t + 1, length):
            break
        p = np.array(parents)
        state = State(state.h[:, p], state.c[:, p])
        logits, state = model.logits_last(np.array([[h.ids[-1] for h in live]], dtype=np.int32), state)
    return finished
