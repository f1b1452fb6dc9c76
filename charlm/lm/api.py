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
import math
import os
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from ..config import ModelConfig, models_dir
from ..data import Vocab, read_text
from ..errors import CharlmError
from . import checkpoint
from .models import build_model
from .score import NOTHING_TO_SCORE, OOVCheck, corpus_total, evaluate_text, score_text

# what score() leaves out of each text's result unless details=True (the CLI's tables show them)
SCORE_DETAILS = ("oov_tokens", "oov_logprob")
INTERNAL = ("in_vocab",)  # what the scoring functions count for the OOV warning, never returned
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
        # its weights never change for good (dynamic evaluation restores them): the sampler's packed
        # copy is made once, not at every generate / stream / sample call
        self._model.sampler_cache = {}
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

    def export(self, path: str | os.PathLike, format: str = "safetensors") -> list[str]:
        """Write the model as `charlm export MODEL --format FORMAT -o PATH` does ("safetensors": tensors
        named as torch.nn state_dict keys; "onnx": a graph from ids and state to log-probabilities and
        the new state, needs the onnx extra). Returns the files written (the model, and PATH + ".json":
        configuration and vocabulary)."""
        from .export import export
        return export(self._ckpt, os.fspath(path), format)

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
               stop: str | Sequence[str] | None = None, precision: str = "float32") -> Iterator[str]:
        """Yield the generated text in chunks as it is produced (what `charlm sample` prints after the
        prime). The context starts from the zero state with the end-of-line token fed first, then the
        prime. The same seed gives the same text; seed None draws a fresh one. greedy (or temperature 0)
        always takes the most likely token; top_k > 0 samples among the k most likely, top_p < 1 among
        the fewest most likely whose probability adds up to top_p; repetition_penalty > 1 makes tokens
        already in the prime or the text less likely (HF's). stop: a string or several; the text ends
        at the first one (included), else after `length` tokens. precision "bf16" stores the weights as
        bfloat16 for the sampler (half the bytes a token reads; the numbers differ slightly from the
        model's: README, "Sampling in bfloat16"); "float32", the default, is exact.
        """
        from .sample import Decoding, check_length, check_stops, generate  # scoring never needs these kernels
        check_length(length)
        dec = Decoding(temperature, top_k, top_p, repetition_penalty, greedy, precision)
        chunks = generate(self._model, self.vocab, length, temperature=dec.temperature, prime=prime, seed=seed,
                          top_k=top_k, greedy=greedy, top_p=top_p, repetition_penalty=repetition_penalty,
                          stop=check_stops(stop), precision=precision)
        # the compiled sampler calls no BLAS: without threads given, `charlm sample` starts faster
        # without threadpoolctl; the parts and the thread governor (charlm.runtime) apply either way
        compiled = self.config.softmax == "full"
        return self._on_threads(chunks, blas=not compiled or self._threads is not None)

    def _on_threads(self, chunks: Iterator[str], blas: bool = True) -> Iterator[str]:
        from ..runtime import compute_threads
        with compute_threads(self._threads, blas=blas):  # held from the first chunk to the last
            yield from chunks

    def generate(self, prime: str = "", length: int = 500, temperature: float = 0.8, seed: int | None = None,
                 top_k: int = 0, greedy: bool = False, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, precision: str = "float32") -> str:
        """The generated text, without the prime (see stream for the arguments): `length` tokens (fewer
        after a stop string), words joined by spaces and <eos> written as a newline for a word model."""
        return "".join(self.stream(prime, length, temperature, seed, top_k, greedy, top_p=top_p,
                                   repetition_penalty=repetition_penalty, stop=stop, precision=precision))

    def sample(self, prime: str = "", length: int = 500, temperature: float = 0.8, seed: int | None = None,
               top_k: int = 0, greedy: bool = False, *, top_p: float = 1.0, repetition_penalty: float = 1.0,
               stop: str | Sequence[str] | None = None, num_samples: int = 1,
               precision: str = "float32") -> list[dict]:
        """num_samples samples (arguments as for stream), each {"text", "tokens", "ids", "logprob",
        "n_tokens"}: the text without the prime, its tokens and their ids, and the natural-log probability
        of those tokens under the model (temperature 1). What `charlm sample --json` prints. One sample
        is the text generate() gives for the same seed; several are generated side by side (one batched
        step per token for all of them), from one generator seeded by seed. precision as for stream
        (one sample only)."""
        from .sample import Decoding, check_length, check_stops, sample_batch, sample_one
        check_length(length)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise CharlmError(f"num_samples must be a positive whole number, got {num_samples!r}")
        self._check_batch_memory(num_samples, length)
        dec = Decoding(temperature, top_k, top_p, repetition_penalty, greedy, precision)
        with self._compute():
            if num_samples == 1:
                return [sample_one(self._model, self.vocab, length, dec, prime, seed, check_stops(stop))]
            return sample_batch(self._model, self.vocab, num_samples, length, dec, prime, seed, check_stops(stop))

    def _check_batch_memory(self, n: int, length: int) -> None:
        """CharlmError before allocating if n samples side by side cannot fit: per sample its logits,
        repetition mask and state, and per token its Python records (id, ln P, text piece)."""
        from ..runtime import machine_memory
        c = self.config
        per_sample = len(self.vocab) * 13 + c.layers * max(c.hidden, getattr(c, "units", 0) or 0) * 4 * 12 \
            + min(length, 1 << 40) * 160
        have, who = machine_memory()
        if n * per_sample > have:
            raise CharlmError(f"{n:,} samples of {length:,} tokens side by side need ~{n * per_sample / 2**30:.1f} "
                              f"GiB of memory; {who} {have / 2**30:.1f} GiB: ask for fewer samples or tokens")

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
        if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
            raise CharlmError(f"length_penalty must be a finite number, got {length_penalty!r}")
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
        A text with OOV tokens and nothing in the vocabulary is scored all the same, with an OOVWarning
        (charlm.lm.score) saying that its figures are of <unk> or of its end alone; score_many, score_lines
        and evaluate give the same warning (one for all their texts).
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
        check = OOVCheck(self.level)  # texts with nothing in the vocabulary: an OOVWarning says so
        for r in results:
            check.add(r)
        check.warn()
        hide = INTERNAL + (() if details else SCORE_DETAILS)
        results = [{k: v for k, v in r.items() if k not in hide} for r in results]
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
        check = OOVCheck(self.level)  # texts with nothing in the vocabulary: an OOVWarning at the end
        hide = INTERNAL + (() if details else SCORE_DETAILS)
        while True:  # under MPI each rank reads the same lines and scores every k-th batch of them
            blocks = [[line[:-1] if line.endswith("\n") else line for line in itertools.islice(it, batch)]
                      for _ in range(k)]
            if not blocks[0]:
                check.warn()
                return
            with self._compute():
                results = score_totals(self._model, self.vocab, blocks[me], eos=eos) if blocks[me] else []
            if k > 1:
                results = [r for part in dist.allgather(results, "gathering the scores") for r in part]
            for r in results:
                check.add(r)
                yield {k: v for k, v in r.items() if k not in hide}

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
                 details: bool = False, dynamic: bool = False, dynamic_lr: float | None = None,
                 dynamic_decay: float = 0.0, seq_len: int | None = None) -> dict:
        """Perplexity and bits per token of a whole text file ("-": standard input): the dict
        `charlm eval FILE --json` prints. See evaluate_text; errors: strict, replace or ignore."""
        path = os.fspath(path)
        text = read_text(path, encoding, errors, what="file")
        return self.evaluate_text(text, streams, progress=progress, details=details, source=path, dynamic=dynamic,
                                  dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay, seq_len=seq_len)

    def evaluate_text(self, text: str, streams: int = 1, *, progress: Callable[[int, int], None] | None = None,
                      details: bool = False, source: str = "the text", dynamic: bool = False,
                      dynamic_lr: float | None = None, dynamic_decay: float = 0.0, seq_len: int | None = None) -> dict:
        """Perplexity and bits per token of a whole text: {"n_tokens", "logprob", "perplexity",
        "perplexity_excl_oov", "bits_per_token", "oov"}.

        The text is one token sequence (one <eos> per line for a word model, the newline characters for
        a character model; the last line ends with one too, newline or not), scored from the begin
        context. streams 1 is exact (the state is carried through the whole text); K > 1 scores K
        contiguous parts side by side, faster but slightly pessimistic (each part restarts from the zero
        state). progress(done_tokens, total_tokens) is called as the work advances. details=True adds
        "streams" (K, at most the number of tokens). source names the text in error messages.

        dynamic=True: dynamic evaluation (charlm.lm.dynamic; Mikolov's RNNLM -dynamic, Krause et al.
        2018): one stream, in windows of seq_len tokens (None: the model's training seq_len), each
        scored with the current weights and then learned from by one SGD step of dynamic_lr (None:
        charlm.lm.dynamic.DEFAULT_LR; 0 gives the static numbers) on the window's mean loss, the
        gradient clipped to a norm of DEFAULT_CLIP, the weights pulled back towards the loaded ones
        by dynamic_decay in [0, 1) after each step. The result then also has "dynamic": True,
        "dynamic_lr", "dynamic_decay" and "seq_len". This LanguageModel's weights are the same after
        the call as before it, and the checkpoint file is never written. One process only: under
        MPI it is refused (it is sequential, there is nothing to share).
        """
        if not isinstance(streams, int) or isinstance(streams, bool) or streams <= 0:
            raise CharlmError(f"streams must be a positive whole number, got {streams!r}")
        if dynamic:
            from .dynamic import DEFAULT_LR, check_dynamic
            dynamic_lr = DEFAULT_LR if dynamic_lr is None else dynamic_lr
            seq_len = seq_len if seq_len is not None else (self._ckpt.train.seq_len if self._ckpt.train else 64)
            check_dynamic(dynamic_lr, dynamic_decay, seq_len)
            seq_len = int(seq_len)
            if streams != 1:
                raise CharlmError(f"dynamic evaluation reads the text in order on one stream (streams=1), got "
                                  f"streams={streams}")
            from .. import dist
            if dist.size() > 1:
                raise CharlmError("dynamic evaluation is sequential and runs in one process: run it without mpiexec")
        elif dynamic_lr is not None or dynamic_decay or seq_len is not None:
            raise CharlmError("dynamic_lr, dynamic_decay and seq_len apply to dynamic evaluation: give dynamic=True")
        if text and not text.endswith("\n"):
            text += "\n"  # the last line ends with <eos> too, newline or not
        with self._compute():
            if dynamic:
                from .dynamic import evaluate_text as dynamic_evaluate_text
                r = dynamic_evaluate_text(self._model, self.vocab, text, seq_len=seq_len, lr=float(dynamic_lr),
                                          decay=float(dynamic_decay), progress=progress)
            else:
                r = evaluate_text(self._model, self.vocab, text, streams=streams, progress=progress)
        if r["n_tokens"] == 0:  # not a perfect perplexity of 1
            raise CharlmError(f"nothing to evaluate: {source} is empty" + (
                f" but for {r['oov']} characters outside the model's vocabulary" if r["oov"] else ""))
        check = OOVCheck(self.level)  # nothing of the text in the vocabulary: an OOVWarning says so
        check.add(r)
        check.warn(source)
        result = {k: r[k] for k in EVAL_KEYS + (("streams",) if details else ())}
        if dynamic:
            result.update(dynamic=True, dynamic_lr=float(dynamic_lr), dynamic_decay=float(dynamic_decay),
                          seq_len=seq_len)
        return result
