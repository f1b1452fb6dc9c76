"""Text generation: each sampled token is fed back as the next input.

One sample streams from the model's own compiled batch-1 sampler (BaseModel.sampler); several
samples (num_samples > 1) advance side by side, one batched forward step per token for all of them
(BaseModel.logits_last, then kernels.sample.draw_tokens), so N samples cost far less than N runs.
Beam search is charlm.lm.beam. The controls follow HF's generate: repetition penalty, then
temperature, top-k and top-p (kernels.layers.pick_token); temperature 0 is greedy; a stop string
ends a sample, which then ends with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..config import check_seed
from ..data import Vocab
from ..errors import CharlmError
from ..kernels.sample import PRECISIONS, draw_tokens
from .base import BaseModel


@dataclass(frozen=True)
class Decoding:
    """How each token is chosen. temperature 0 (or greedy) takes the most likely token; top_k 0 and
    top_p 1 keep every token; repetition_penalty 1 is off (HF's: the logit of a token already in the
    prime or the text is divided by it when positive, multiplied when negative)."""
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    greedy: bool = False
    precision: str = "float32"  # the batch-1 sampler's weights: "float32", or "bf16" (see kernels.sample)

    def __post_init__(self):
        if not self.greedy and (not self.temperature >= 0 or math.isinf(self.temperature)):
            raise CharlmError(f"temperature must be positive (0: greedy), got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise CharlmError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise CharlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise CharlmError(f"repetition_penalty must be positive (1: off), got {self.repetition_penalty}")
        if self.precision not in PRECISIONS:
            raise CharlmError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def exact(self, what: str) -> None:
        """CharlmError unless the weights are the model's own (bf16 is the batch-1 sampler's only)."""
        if self.precision != "float32":
            raise CharlmError(f"--precision {self.precision} is for one sample at a time (the batch-1 sampler); "
                              f"{what} compute in float32: drop --precision")

    @property
    def args(self) -> tuple:
        """(temperature, top_k, top_p, penalty, greedy) as the kernels take them."""
        greedy = self.greedy or self.temperature == 0
        return (float(self.temperature if not greedy else 1.0), int(self.top_k), float(self.top_p),
                float(self.repetition_penalty), bool(greedy))


def check_length(length) -> None:
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length <= 0:
        raise CharlmError(f"length must be a positive whole number, got {length!r}")


def check_stops(stop) -> tuple[str, ...]:
    """stop: None, one string or several; each must be non-empty."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise CharlmError("a stop string must be a non-empty string")
    return stops


class Detokenizer:
    """Token ids to text, one piece per token: characters as they are; words joined by spaces with
    <eos> as a newline (no space at a line start)."""

    def __init__(self, vocab: Vocab, at_line_start: bool):
        self.vocab = vocab
        self.at_line_start = at_line_start

    def piece(self, tok: int) -> str:
        if self.vocab.level == "char":
            return self.vocab.tokens[tok]
        text, self.at_line_start = self.vocab.decode_words((tok,), self.at_line_start)
        return text


class StopWatch:
    """Finds the first stop string in text fed piece by piece (a stop may span pieces)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.keep = max(map(len, self.stops), default=1) - 1
        self.tail = ""

    def feed(self, piece: str) -> int | None:
        """None if no stop string ends in this piece, else how many of its characters to keep
        (the text then ends with the stop string)."""
        if not self.stops:
            return None
        buf = self.tail + piece
        ends = [i + len(s) for s in self.stops
                for i in [buf.find(s, max(0, len(self.tail) - len(s) + 1))] if i >= 0]
        if ends:
            return min(ends) - len(self.tail)
        self.tail = buf[-self.keep:] if self.keep else ""
        return None


def begin(vocab: Vocab, prime: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """The ids fed before generating (the end token, the begin-of-text context, then the prime's),
    the prime's ids, and whether the text starts at a line start (no space before a first word)."""
    ids, _ = vocab.encode(prime)
    feed = np.concatenate([[vocab.eos_id], ids]).astype(np.int32)
    at_line_start = len(ids) == 0 or int(ids[-1]) == vocab.eos_id or prime[-1:].isspace()
    return feed, ids, at_line_start


def _chunks(model: BaseModel, vocab: Vocab, length: int, dec: Decoding, prime: str, seed: int | None,
            stops: Sequence[str], chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(ids, ln Ps, text) of each chunk from the compiled sampler, cut after a stop string."""
    step = model.sampler(dec.precision)
    rng = _rng(seed)
    state = model.zero_state(1)
    hs, cs = state.h, state.c
    feed, ids, at_line_start = begin(vocab, prime)
    seen = np.zeros(len(vocab), dtype=np.uint8)
    seen[ids] = 1
    detok, watch = Detokenizer(vocab, at_line_start), StopWatch(stops)
    done = 0
    while done < length:
        k = min(chunk, length - done)
        out = np.empty(k, dtype=np.int32)
        lps = np.empty(k, dtype=np.float64)
        u = rng.random(k)
        step(out, lps, hs, cs, seen, feed, u, *dec.args)
        done += k
        feed = out[-1:].copy()
        if not stops:
            if vocab.level == "word":
                text, detok.at_line_start = vocab.decode_words(out, detok.at_line_start)
            else:
                text = vocab.decode(out)
            yield out, lps, text
            continue
        pieces = []
        for i, tok in enumerate(out.tolist()):
            piece = detok.piece(tok)
            cut = watch.feed(piece)
            if cut is not None:
                pieces.append(piece[:cut])
                yield out[:i + 1], lps[:i + 1], "".join(pieces)
                return
            pieces.append(piece)
        yield out, lps, "".join(pieces)


def generate(model: BaseModel, vocab: Vocab, length: int, *, temperature: float = 0.8, prime: str = "",
             seed: int | None = None, top_k: int = 0, greedy: bool = False, top_p: float = 1.0,
             repetition_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
             chunk: int = 64, precision: str = "float32") -> Iterator[str]:
    """Yield the generated text in chunks (the prime text is not repeated).

    The context starts from the zero state with the end-of-line token fed first
    (the begin-of-text context used in training and scoring), then the prime's
    tokens (characters outside the vocabulary are skipped; words outside it are
    fed as <unk>). Words are joined by spaces, <eos> becomes a newline. The
    same seed gives the same text. At most `length` tokens: fewer if a stop
    string appears, the text then ending with it.
    """
    if length <= 0:
        raise CharlmError(f"--length must be positive, got {length}")
    if not greedy and not temperature >= 0:
        raise CharlmError(f"--temp must be positive (0: greedy), got {temperature}")
    if top_k < 0:
        raise CharlmError(f"--top-k must be 0 (off) or positive, got {top_k}")
    dec = Decoding(temperature, top_k, top_p, repetition_penalty, greedy, precision)
    for _, _, text in _chunks(model, vocab, length, dec, prime, seed, check_stops(stop), chunk):
        yield text


def result(vocab: Vocab, ids: Sequence[int], lps: Sequence[float], text: str) -> dict:
    """What sample and beam search return per text: {"text", "tokens", "ids", "logprob", "n_tokens"}
    with logprob the natural-log probability of the tokens under the model (temperature 1)."""
    ids = [int(i) for i in ids]
    return {"text": text, "tokens": [vocab.tokens[i] for i in ids], "ids": ids,
            "logprob": float(math.fsum(lps)), "n_tokens": len(ids)}


def sample_one(model: BaseModel, vocab: Vocab, length: int, dec: Decoding, prime: str = "",
               seed: int | None = None, stops: Sequence[str] = ()) -> dict:
    """One sample from the compiled sampler (the text generate() streams for the same arguments)."""
    ids, lps, texts = [], [], []
    for out, lp, text in _chunks(model, vocab, length, dec, prime, seed, stops, 64):
        ids.extend(out.tolist())
        lps.extend(lp.tolist())
        texts.append(text)
    return result(vocab, ids, lps, "".join(texts))


def sample_batch(model: BaseModel, vocab: Vocab, n: int, length: int, dec: Decoding, prime: str = "",
                 seed: int | None = None, stops: Sequence[str] = ()) -> list[dict]:
    """n samples generated side by side: one forward step of the n streams per token, the draws
    from one generator seeded by seed (n uniforms per step). Each stops at its own stop string;
    the batch ends when all have stopped or after `length` tokens."""
    dec.exact("several samples side by side")
    feed, ids, at_line_start = begin(vocab, prime)
    logits, state = model.logits_last(feed[:, None], model.zero_state(1))
    state.h, state.c = np.repeat(state.h, n, axis=1), np.repeat(state.c, n, axis=1)
    logits = np.repeat(logits, n, axis=0)
    rng = _rng(seed)
    seen = np.zeros((n, len(vocab)), dtype=np.uint8)
    seen[:, ids] = 1
    detoks = [Detokenizer(vocab, at_line_start) for _ in range(n)]
    watches = [StopWatch(stops) for _ in range(n)]
    toks = [[] for _ in range(n)]
    lpss = [[] for _ in range(n)]
    texts = [[] for _ in range(n)]
    live = np.ones(n, dtype=bool)
    out = np.empty(n, dtype=np.int32)
    lps = np.empty(n, dtype=np.float64)
    for t in range(length):
        draw_tokens(out, lps, seen, np.ascontiguousarray(logits), rng.random(n), *dec.args)
        for i in np.flatnonzero(live):
            tok = int(out[i])
            piece = detoks[i].piece(tok)
            cut = watches[i].feed(piece)
            toks[i].append(tok)
            lpss[i].append(float(lps[i]))
            texts[i].append(piece if cut is None else piece[:cut])
            if cut is not None:
                live[i] = False
        if not live.any() or t + 1 == length:
            break
        logits, state = model.logits_last(out[None, :].copy(), state)
    return [result(vocab, toks[i], lpss[i], "".join(texts[i])) for i in range(n)]


def _rng(seed: int | None) -> np.random.Generator:
    """The generator a sampling run draws from: seeded (a whole number from 0 to 2**64 - 1), or fresh."""
    if seed is not None:
        check_seed("seed", seed)
    return np.random.default_rng(seed)
