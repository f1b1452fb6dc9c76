"""A trained model as a Python object: charlm.load() and LanguageModel.

    lm = charlm.load("models/run")            # a run directory (its best checkpoint) or a .npz file
    lm.generate(prime="ROMEO:", length=200, seed=1)
    lm.score("To be, or not to be")           # the dict `charlm score TEXT --json` prints
    lm.evaluate("test.txt")                   # the dict `charlm eval FILE --json` prints

The commands `charlm sample`, `score` and `eval` call these methods and only render what they
return, so the library and the command line give the same numbers (one code path). Every method
returns plain values (str, float, int, list, dict); problems a user can fix raise CharlmError.
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from ..config import ModelConfig, models_dir
from ..data import Vocab, read_text
from ..errors import CharlmError
from . import checkpoint
from .models import build_model
from .score import NOTHING_TO_SCORE, corpus_total, evaluate_text, score_text

# what score() leaves out of each text's result unless details=True (the CLI's tables show them)
SCORE_DETAILS = ("oov_tokens", "oov_logprob")
# what evaluate() returns (`charlm eval --json`); details=True adds "streams", the parts actually used
EVAL_KEYS = ("n_tokens", "logprob", "perplexity", "perplexity_excl_oov", "bits_per_token", "oov")


class TokenLogprob(NamedTuple):
    """One factor of the chain rule: the token (an out-of-vocabulary word as written, though it
    was scored as <unk>) and its natural-log probability given everything before it."""
    token: str
    logprob: float


def load(path: str | os.PathLike | None = None, *, threads: int | None = None) -> "LanguageModel":
    """The model in a checkpoint file, or in a run directory (its best checkpoint, else its latest).

    path None: the most recently written run under charlm.config.models_dir() ($CHARLM_MODELS_DIR,
    or models/ in the working folder). threads: see LanguageModel. The file is verified (format,
    version, SHA-256) and never unpickled; any problem is a CharlmError naming it.
    """
    file = checkpoint.resolve(os.fspath(path) if path is not None else None, models_dir())
    return LanguageModel(checkpoint.load(file), threads=threads)


class LanguageModel:
    """A trained model with its vocabulary and configuration (see charlm.load).

    threads: how many threads the kernels run on (None: every core). Results do not depend on it
    except in the last bits of float32 sums. It may be changed at any time (lm.threads = 1).
    """

    def __init__(self, ckpt: checkpoint.Checkpoint, *, threads: int | None = None):
        self._ckpt = ckpt
        self._model = build_model(ckpt.model, ckpt.params)
        self.threads = threads

    def __repr__(self) -> str:
        c = self.config
        return (f"LanguageModel({self.path!r}: {c.cell}, {c.layers}x{c.hidden}, {self.level} level, "
                f"{len(self.vocab)} tokens, step {self.step})")

    # ------------------------------------------------------------------ what it is
    @property
    def config(self) -> ModelConfig:
        """The architecture (cell, vocab_size, embed, hidden, layers, ...)."""
        return self._ckpt.model

    @property
    def vocab(self) -> Vocab:
        return self._ckpt.vocab

    @property
    def level(self) -> str:
        """"char" (a token is a Unicode code point) or "word" (whitespace-separated, <eos> per line)."""
        return self._ckpt.vocab.level

    @property
    def path(self) -> str:
        """The checkpoint file the model was loaded from."""
        return self._ckpt.path

    @property
    def step(self) -> int:
        """The training steps behind these weights."""
        return self._ckpt.step

    def info(self) -> dict:
        """What `charlm info MODEL --json` prints: architecture, vocabulary, parameters, steps, best
        validation and its step, corpus and checksum (charlm.lm.info.describe)."""
        from .info import describe
        return describe(self._ckpt)

    def plot(self, path: str | os.PathLike = "curves.png", title: str | None = None) -> dict:
        """Write the training and validation curves of the checkpoint's history to a PNG (as `charlm
        plot`; needs matplotlib) and return them: {"unit", "steps", "train", "val", "best_step",
        "best_val"}."""
        from .info import plot_curves
        return plot_curves(self._ckpt, os.fspath(path), title)

    @property
    def threads(self) -> int | None:
        return self._threads

    @threads.setter
    def threads(self, n: int | None) -> None:
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise CharlmError(f"threads must be a positive whole number or None, got {n!r}")
        self._threads = n

    def _compute(self):
        from ..runtime import compute_threads
        return compute_threads(self._threads)

    # ------------------------------------------------------------------ text out
    def oov(self, text: str) -> list[str]:
        """The tokens of text outside the vocabulary, in order, repeats included. generate() skips
        such characters in a prime and feeds such words as <unk>; score() counts them as OOV."""
        return [tok for _, tok in self.vocab.encode(text)[1]]

    def stream(self, prime: str = "", length: int = 500, temperature: float = 0.8, seed: int | None = None,
               top_k: int = 0, greedy: bool = False, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """Yield the generated text in chunks as it is produced (what `charlm sample` prints after the
        prime). The context starts from the zero state with the end-of-line token fed first, then the
        prime. The same seed gives the same text; seed None draws a fresh one. greedy (or temperature 0)
        always takes the most likely token; top_k > 0 samples among the k most likely, top_p < 1 among
        the fewest most likely whose probability adds up to top_p; repetition_penalty > 1 makes tokens
        already in the prime or the text less likely (HF's). stop: a string or several; the text ends
        at the first one (included), else after `length` tokens.
        """
        from .sample import Decoding, check_length, check_stops, generate  # scoring never needs these kernels
        check_length(length)
        dec = Decoding(temperature, top_k, top_p, repetition_penalty, greedy)
        chunks = generate(self._model, self.vocab, length, temperature=dec.temperature, prime=prime, seed=seed,
                          top_k=top_k, greedy=greedy, top_p=top_p, repetition_penalty=repetition_penalty,
                          stop=check_stops(stop))
        # threads None: Numba's current setting (every core unless changed) as is; sampling calls no BLAS to
        # limit, and `charlm sample` starts faster without threadpoolctl
        return chunks if self._threads is None else self._on_threads(chunks)

    def _on_threads(self, chunks: Iterator[str]) -> Iterator[str]:
        with self._compute():  # held from the first chunk to the last
            yield from chunks

    def generate(self, prime: str = "", length: int = 500, temperature: float = 0.8, seed: int | None = None,
                 top_k: int = 0, greedy: bool = False, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None) -> str:
        """The generated text, without the prime (see stream for the arguments): `length` tokens (fewer
        after a stop string), words joined by spaces and <eos> written as a newline for a word model."""
        return "".join(self.stream(prime, length, temperature, seed, top_k, greedy, top_p=top_p,
                                   repetition_penalty=repetition_penalty, stop=stop))

    def sample(self, prime: str = "", length: int = 500, temperature: float = 0.8, seed: int | None = None,
               top_k: int = 0, greedy: bool = False, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
               stop: str | Sequence[str] | None = None, num_samples: int = 1) -> list[dict]:
        """num_samples samples (arguments as for stream), each {"text", "tokens", "ids", "logprob",
        "n_tokens"}: the text without the prime, its tokens and their ids, and the natural-log probability
        of those tokens under the model (temperature 1). What `charlm sample --json` prints. One sample
        is the text generate() gives for the same seed; several are generated side by side (one batched
        step per token for all of them), from one generator seeded by seed."""
        from .sample import Decoding, check_length, check_stops, sample_batch, sample_one
        check_length(length)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise CharlmError(f"num_samples must be a positive whole number, got {num_samples!r}")
        dec = Decoding(temperature, top_k, top_p, repetition_penalty, greedy)
        with self._compute():
            if num_samples == 1:
                return [sample_one(self._model, self.vocab, length, dec, prime, seed, check_stops(stop))]
            return sample_batch(self._model, self.vocab, num_samples, length, dec, prime, seed, check_stops(stop))

    def beam_search(self, prime: str = "", length: int = 100, beam: int = 4, nbest: int = 1, *,
                    length_penalty: float = 0.0, stop: str | Sequence[str] | None = None) -> list[dict]:
        """The nbest most likely continuations of prime found by a beam of width `beam`, best first:
        {"text", "tokens", "ids", "logprob", "n_tokens", "score"} (score = logprob / n_tokens **
        length_penalty; 0 ranks by logprob). A continuation ends at a stop string (included) or after
        `length` tokens. beam 1 is greedy decoding. Deterministic. What `charlm sample --beam K --json`
        prints."""
        from .beam import beam_search
        from .sample import check_length, check_stops
        check_length(length)
        with self._compute():
            return beam_search(self._model, self.vocab, prime, length, beam, nbest, float(length_penalty),
                               check_stops(stop))

    # ------------------------------------------------------------------ text in
    def score(self, text: str, eos: bool = True) -> dict:
        """P(text) by the chain rule, token by token: the dict `charlm score TEXT --json` prints.

        {"tokens": [{"token", "id", "prob", "logprob", "oov"}], "logprob", "log10prob", "bits_per_token",
        "perplexity", "perplexity_excl_oov", "n_tokens", "oov"}, natural logs. The text starts from the
        begin context and ends with the factor P(end | text) unless eos is False. A word outside the
        vocabulary contributes P(<unk> | history); a character outside it is left out; both count as oov.
        """
        result = self.score_many([text], eos)["texts"][0]
        if result["n_tokens"] == 0:  # not a perfect perplexity of 1
            raise CharlmError(NOTHING_TO_SCORE)
        return result

    def score_many(self, texts: list[str], eos: bool = True, *, details: bool = False) -> dict:
        """Score each text on its own (n-best rescoring): {"texts": [score(t) for t in texts], "total":
        {"logprob", "log10prob", "bits_per_token", "perplexity", "perplexity_excl_oov", "n_tokens", "oov",
        "n_texts"}}, as `charlm score --file F --json` prints. details=True adds to each text
        "oov_tokens" (its sorted out-of-vocabulary tokens) and "oov_logprob" (ln P of their factors)."""
        if isinstance(texts, str):
            raise CharlmError("score_many takes a list of texts; use score() for one text")
        from .shard import share_texts
        lo, hi = share_texts(texts)  # under MPI: this rank's block of the texts, then all of them gathered
        with self._compute():
            results = [score_text(self._model, self.vocab, t, eos=eos) for t in texts[lo:hi]]
        if hi - lo != len(texts):
            from .. import dist
            results = [r for part in dist.allgather(results, "gathering the scores") for r in part]
        total = corpus_total(results)
        if not details:
            results = [{k: v for k, v in r.items() if k not in SCORE_DETAILS} for r in results]
        return {"texts": results, "total": total}

    def score_lines(self, lines: Iterable[str], eos: bool = True, *, batch: int = 64,
                    details: bool = False) -> Iterator[dict]:
        """Score each line on its own, streamed: yields, in order, score(line) without "tokens" (only the
        totals, so memory stays flat whatever the input) as soon as each batch of `batch` lines is read
        and scored side by side (batch 1: one line at a time). A trailing newline of a line is dropped.
        What `charlm score --file F` / `score -` prints one line each for. details=True adds "oov_tokens"
        and "oov_logprob" as score_many does."""
        from .score import score_totals
        if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
            raise CharlmError(f"batch must be a positive whole number, got {batch!r}")
        from .. import dist
        it, k, me = iter(lines), dist.size(), dist.rank()
        while True:  # under MPI each rank reads the same lines and scores every k-th batch of them
            blocks = [[line[:-1] if line.endswith("\n") else line for line in itertools.islice(it, batch)]
                      for _ in range(k)]
            if not blocks[0]:
                return
            with self._compute():
                results = score_totals(self._model, self.vocab, blocks[me], eos=eos) if blocks[me] else []
            if k > 1:
                results = [r for part in dist.allgather(results, "gathering the scores") for r in part]
            for r in results:
                yield r if details else {k: v for k, v in r.items() if k not in SCORE_DETAILS}

    def rescore_nbest(self, lines: Iterable[str], eos: bool = True, *, batch: int = 64) -> Iterator[dict]:
        """Kaldi n-best rescoring: each line `uttid-N w1 w2 ...` (the first field an id, the rest the
        hypothesis) gives {"id", "cost", "logprob", "n_tokens", "oov"}, cost = -ln P(hypothesis) with
        the end-of-sentence factor (unless eos is False), streamed in order as in score_lines."""
        from collections import deque

        from .score import parse_nbest
        ids: deque[str] = deque()  # read ahead of the scores by at most one batch

        def texts():
            for line in lines:
                uid, text = parse_nbest(line)
                ids.append(uid)
                yield text
        for r in self.score_lines(texts(), eos, batch=batch):
            yield {"id": ids.popleft(), "cost": -r["logprob"], "logprob": r["logprob"], "n_tokens": r["n_tokens"],
                   "oov": r["oov"]}

    def logprobs(self, text: str, eos: bool = True) -> list[TokenLogprob]:
        """The chain rule's factors of score(text) as (token, logprob) pairs (TokenLogprob named
        tuples, natural logs); their sum is score(text)["logprob"]."""
        return [TokenLogprob(t["token"], t["logprob"]) for t in self.score(text, eos)["tokens"]]

    def evaluate(self, path: str | os.PathLike, streams: int = 1, *, encoding: str = "utf-8",
                 errors: str = "strict", progress: Callable[[int, int], None] | None = None,
                 details: bool = False) -> dict:
        """Perplexity and bits per token of a whole text file ("-": standard input): the dict
        `charlm eval FILE --json` prints. See evaluate_text; errors: strict, replace or ignore."""
        path = os.fspath(path)
        text = read_text(path, encoding, errors, what="file")
        return self.evaluate_text(text, streams, progress=progress, details=details, source=path)

    def evaluate_text(self, text: str, streams: int = 1, *, progress: Callable[[int, int], None] | None = None,
                      details: bool = False, source: str = "the text") -> dict:
        """Perplexity and bits per token of a whole text: {"n_tokens", "logprob", "perplexity",
        "perplexity_excl_oov", "bits_per_token", "oov"}.

        The text is one token sequence (one <eos> per line for a word model, the newline characters for
        a character model; the last line ends with one too, newline or not), scored from the begin
        context. streams 1 is exact (the state is carried through the whole text); K > 1 scores K
        contiguous parts side by side, faster but slightly pessimistic (each part restarts from the zero
        state). progress(done_tokens, total_tokens) is called as the work advances. details=True adds
        "streams" (K, at most the number of tokens). source names the text in error messages.
        """
        if not isinstance(streams, int) or isinstance(streams, bool) or streams <= 0:
            raise CharlmError(f"streams must be a positive whole number, got {streams!r}")
        if text and not text.endswith("\n"):
            text += "\n"  # the last line ends with <eos> too, newline or not
        with self._compute():
            r = evaluate_text(self._model, self.vocab, text, streams=streams, progress=progress)
        if r["n_tokens"] == 0:  # not a perfect perplexity of 1
            raise CharlmError(f"nothing to evaluate: {source} is empty" + (
                f" but for {r['oov']} characters outside the model's vocabulary" if r["oov"] else ""))
        return {k: r[k] for k in EVAL_KEYS + (("streams",) if details else ())}
