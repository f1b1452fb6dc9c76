"""Dynamic evaluation: the model keeps learning from the text it is scoring (Mikolov et al. 2010,
RNNLM's -dynamic; Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models").

The text is cut into windows of T tokens (by default the model's training seq_len) read in order by
one stream, the state carried from window to window. For each window:

    1. score it with the current weights (token_logprobs: exactly what static evaluation adds up),
    2. take one plain SGD step on the same window's mean cross-entropy (loss_and_grads from the
       same starting state, no dropout), its gradient clipped to a global norm of `clip`,
    3. optionally pull the weights back towards the loaded ones: w += decay * (w0 - w)
       (Krause's decay to the prior, simplified: a constant rate instead of an RMS-scaled one),

then move to the next window with the state after this one. A token is therefore always scored by
weights that have never seen it: the gain comes only from what the model learns about the text so
far (names, topic, style), never from peeking. lr 0 gives static evaluation's numbers exactly.

Only the BaseModel API is used (token_logprobs, loss_and_grads, zero_state, zero_grads, trainable):
the update changes the model's own trainable arrays in place (the arrays training updates, so any
sharing or caching a model does stays consistent), and the loaded values are copied back in a
`finally` block, bit for bit, whatever happens. The checkpoint file is only ever read.

Defaults, measured on tinyshakespeare (README, "Dynamic evaluation"):

    lr       DEFAULT_LR: plain SGD on the window's mean loss. Adam or RMS-scaled steps (Krause's
             best) need per-parameter statistics of the training gradients that a checkpoint does
             not keep; SGD needs nothing and is what Mikolov's RNNLM does. 0.1 took a one-minute
             char model from 3.117 to 3.020 bits/char and a word model from perplexity 252.7 to
             226.1 (0.3 did a little better on both, 1.0 lost most of the gain).
    clip     DEFAULT_CLIP: one odd window (a table, a run of digits) must not wreck the weights for
             the rest of the text.
    window   the training seq_len: the length the model's gradients were taken over.
    decay    0: no pull back (Mikolov's). Long texts that change topic may like a small one.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import numpy as np

from ..errors import CharlmError
from ..optim import SGD, clip_scale, grad_norm
from .base import BaseModel

DEFAULT_LR = 0.1     # see the module docstring and the README's measurements
DEFAULT_CLIP = 1.0   # global gradient norm of one window's mean loss


class DynamicResult(NamedTuple):
    """What dynamic evaluation adds up: ln P of all scored targets (nats, <= 0), their count, and
    ln P of the targets marked out of vocabulary."""
    logprob: float
    count: int
    oov_logprob: float


def check_dynamic(lr, decay=0.0, seq_len=None) -> None:
    """CharlmError unless lr is a finite number >= 0, decay a number in [0, 1) and seq_len a positive
    whole number (or None)."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise CharlmError(f"dynamic_lr must be a finite number >= 0 (0: static evaluation), got {str(lr)[:40]}")
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay < 1:
        raise CharlmError(f"dynamic_decay must be a number in [0, 1) (0: no pull back), got {str(decay)[:40]}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral)
                                or seq_len <= 0):
        raise CharlmError(f"seq_len must be a positive whole number, got {str(seq_len)[:40]}")


@contextmanager
def restored(model: BaseModel) -> Iterator[dict[str, np.ndarray]]:
    """Yield copies of the model's trainable arrays; on exit (normal or not) copy them back into
    the model's own arrays, so the model ends as it started, bit for bit."""
    arrays = model.trainable
    saved = {n: np.array(a, copy=True) for n, a in arrays.items()}
    try:
        yield saved
    finally:
        for n, a in arrays.items():
            np.copyto(a, saved[n])


def dynamic_logprob(model: BaseModel, full: np.ndarray, seq_len: int, lr: float, *, clip: float = DEFAULT_CLIP,
                    decay: float = 0.0, is_oov: np.ndarray | None = None,
                    progress: Callable[[int, int], None] | None = None) -> DynamicResult:
    """Dynamic evaluation of one token sequence (see the module docstring): the targets full[1:]
    given the inputs full[:-1], from the zero state, in windows of seq_len, one stream.

    full (n + 1,) int ids, the first the begin context (<eos>); is_oov (n,) bool marks the targets
    whose ln P also goes into oov_logprob; progress(done, n) after each window. The model's
    weights are the same after the call as before it."""
    check_dynamic(lr, decay, seq_len)
    seq_len, lr, decay = int(seq_len), float(lr), float(decay)
    full = np.ascontiguousarray(full, dtype=np.int32)
    n = len(full) - 1
    total = oov_lp = 0.0
    if n <= 0:
        return DynamicResult(0.0, 0, 0.0)
    sgd = SGD({})
    grads = model.zero_grads()
    state = model.zero_state(1)
    with restored(model) as w0:
        weights = model.trainable
        for s in range(0, n, seq_len):
            T = min(seq_len, n - s)
            x = full[s:s + T].reshape(T, 1)
            y = full[s + 1:s + 1 + T].reshape(T, 1)
            lp, _ = model.token_logprobs(x, y, state)             # 1. scored before it is learned from
            total += float(lp.sum())
            if is_oov is not None:
                oov_lp += float(lp[is_oov[s:s + T], 0].sum())
            _, state = model.loss_and_grads(x, y, state, grads)   # 2. the same window, no dropout
            norm = grad_norm(grads)
            if math.isfinite(norm):                               # a non-finite gradient: no step
                sgd.step(weights, grads, lr, clip_scale(norm, clip))
                if decay:                                         # 3. back towards the loaded weights
                    for name, a in weights.items():
                        a += decay * (w0[name] - a)
            if progress:
                progress(s + T, n)
    return DynamicResult(total, n, oov_lp)


def evaluate_text(model: BaseModel, vocab, text: str, *, seq_len: int, lr: float, clip: float = DEFAULT_CLIP,
                  decay: float = 0.0, progress: Callable[[int, int], None] | None = None) -> dict:
    """charlm.lm.score.evaluate_text's result ("streams" 1) for dynamic evaluation of text: the same
    tokens (one <eos> per line for words, the newlines for characters), begin context, OOV accounting
    and keys (keep the two alike), the sum coming from dynamic_logprob."""
    from .score import eval_ids, totals
    n, full, is_oov, oov = eval_ids(vocab, text)
    r = dynamic_logprob(model, full, seq_len, lr, clip=clip, decay=decay, is_oov=is_oov, progress=progress)
    return {
        **totals(r.logprob, n, r.oov_logprob, int(is_oov.sum())),
        "oov": len(oov),
        "streams": 1,
        "in_vocab": int((full[1:] != vocab.eos_id).sum()) - int(is_oov.sum()),
        "oov_tokens": sorted({t for _, t in oov[:100_000]})[:6],
    }
