"""Text generation: each sampled token is fed back as the next input (the model's own
compiled sampler, BaseModel.sampler)."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..data import Vocab
from ..errors import CharlmError
from .base import BaseModel


def generate(model: BaseModel, vocab: Vocab, length: int, *, temperature: float = 0.8, prime: str = "",
             seed: int | None = None, top_k: int = 0, greedy: bool = False,
             chunk: int = 64) -> Iterator[str]:
    """Yield the generated text in chunks (the prime text is not repeated).

    The context starts from the zero state with the end-of-line token fed first
    (the begin-of-text context used in training and scoring), then the prime's
    tokens (characters outside the vocabulary are skipped; words outside it are
    fed as <unk>). Words are joined by spaces, <eos> becomes a newline. The
    same seed gives the same text.
    """
    if length <= 0:
        raise CharlmError(f"--length must be positive, got {length}")
    if not greedy and not temperature > 0:
        raise CharlmError(f"--temp must be positive, got {temperature}")
    if top_k < 0:
        raise CharlmError(f"--top-k must be 0 (off) or positive, got {top_k}")
    step = model.sampler()
    rng = np.random.default_rng(seed)
    state = model.zero_state(1)
    hs, cs = state.h, state.c
    ids, _ = vocab.encode(prime)
    feed = np.concatenate([[vocab.eos_id], ids]).astype(np.int32)
    done = 0
    # no space before the first word at a line start or after a prime that ends in whitespace
    at_line_start = len(ids) == 0 or int(ids[-1]) == vocab.eos_id or prime[-1:].isspace()
    while done < length:
        k = min(chunk, length - done)
        out = np.empty(k, dtype=np.int32)
        u = rng.random(k)
        step(out, hs, cs, feed, u, float(temperature if not greedy else 1.0), int(top_k), bool(greedy))
        done += k
        feed = out[-1:].copy()
        if vocab.level == "word":
            text, at_line_start = vocab.decode_words(out, at_line_start)
            yield text
        else:
            yield vocab.decode(out)
