"""`charlm sample`, `charlm score` and `charlm eval`: use a trained model.

Each command checks its flags, reads its input, loads the model (charlm.lm.api.load) and calls one
LanguageModel method (stream, score_many, evaluate_text), then renders what it returns
(charlm.cli.render_score): the library and the command line give the same numbers."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..config import check_seed
from ..errors import CharlmError

from .common import PPL_HELP, THREADS_HELP, dumps, fail, out, warn


def sample_cmd(
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory (its best checkpoint). "
        "Default: the most recently written run under models/.", show_default=False)] = None,
    temp: Annotated[float, typer.Option(help="Temperature: below 1 is more conservative, above 1 more varied; "
                                             "0 always takes the most likely token (greedy).")] = 0.8,
    length: Annotated[int, typer.Option(help="Number of tokens to generate (at most, with --stop).")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (words, for a word model); it is printed first. "
                                            "Characters not in the vocabulary are skipped, words not in it are fed "
                                            "as <unk>, with a warning.")] = "",
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same text. Default: random.",
                                                show_default=False)] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely token (ignores --temp).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample only among the K most likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Sample only among the fewest most likely tokens whose "
                                                         "probability adds up to P (nucleus sampling; 1: all).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(
        "--repetition-penalty", help="Make tokens already in the prime or the text less likely: their logit is "
                                     "divided by it when positive, multiplied when negative (HF's; 1: off).")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(
        help="End a sample at this string (included); repeat for several. \\n and \\t are a newline and a "
             "tab.", show_default=False)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Number of samples, generated side by "
                                                                         "side (far quicker than one by one).")] = 1,
    beam: Annotated[int, typer.Option(help="Beam search with this many hypotheses instead of sampling (0: off); "
                                           "prints the --nbest most likely continuations with their ln P.")] = 0,
    nbest: Annotated[int, typer.Option(help="How many continuations beam search prints.")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam search ranks by ln P / tokens^A (HF's length_penalty; "
                                                       "0 ranks by ln P).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sample: text, tokens, ids, logprob, "
                                                         "n_tokens (and score for beam search).")] = False,
    precision: Annotated[str, typer.Option(help="Weights of the one-sample sampler: float32 (exact), or bf16 "
                                                "(bfloat16 storage, float32 arithmetic: half the bytes per token, "
                                                "faster on large models; ln P differs slightly from the model's). "
                                                "One sample at a time; LSTM, GRU, RNN with the full softmax.")
                         ] = "float32",
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
):
    """Generate text from a trained model, streamed to stdout as it is produced.

    Several samples (-n) or beam search print each text after a header line with its ln P (natural log of its
    probability under the model) and its length in tokens.
    """
    try:
        _check_sample_flags(length, temp, greedy, top_k, top_p, repetition_penalty, num_samples, beam, nbest)
        if precision not in ("float32", "bf16"):
            fail(f"--precision must be float32 or bf16, got {precision!r}")
        if precision != "float32" and (beam or num_samples > 1):
            fail(f"--precision {precision} is for one sample at a time: drop --beam / --num-samples or --precision")
        if not abs(length_penalty) < float("inf"):
            fail(f"--length-penalty must be a finite number, got {length_penalty}")
        _check_threads(threads)
        if seed is not None:
            check_seed("--seed", seed)
        stops = [_unescape(s) for s in stop or []]
        from ..lm.api import load
        lm = load(model, threads=threads)
        _warn_prime_oov(lm, prime)
        kw = dict(top_p=top_p, repetition_penalty=repetition_penalty, stop=stops, precision=precision)
        if beam:
            results = lm.beam_search(prime, length, beam, nbest, length_penalty=length_penalty, stop=stops)  # float32
        elif num_samples > 1 or as_json:
            results = lm.sample(prime, length, temp, seed, top_k, greedy, num_samples=num_samples, **kw)
        else:
            sys.stdout.write(prime)
            for chunk in lm.stream(prime, length, temperature=temp, seed=seed, top_k=top_k, greedy=greedy, **kw):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        _print_samples(results, prime, as_json, beam=bool(beam))
    except CharlmError as e:
        fail(str(e))


def _check_sample_flags(length, temp, greedy, top_k, top_p, penalty, num_samples, beam, nbest) -> None:
    if length <= 0:
        fail(f"--length must be positive, got {length}")
    if not greedy and not temp >= 0:
        fail(f"--temp must be positive (0: greedy), got {temp}")
    if top_k < 0:
        fail(f"--top-k must be 0 (off) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        fail(f"--top-p must be in (0, 1], got {top_p}")
    if not penalty > 0:
        fail(f"--repetition-penalty must be positive (1: off), got {penalty}")
    if num_samples <= 0:
        fail(f"--num-samples must be positive, got {num_samples}")
    if beam < 0:
        fail(f"--beam must be 0 (off) or positive, got {beam}")
    if beam and num_samples > 1:
        fail("give either --beam or --num-samples, not both")
    if not 0 < nbest <= max(beam, 1):
        fail(f"--nbest must be between 1 and the beam width (--beam {beam}), got {nbest}")


def _unescape(s: str) -> str:
    """--stop '\\n' is a newline, '\\t' a tab, '\\\\' a backslash."""
    import re
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m.group(1), m.group(0)), s)


def _print_samples(results: list[dict], prime: str, as_json: bool, beam: bool) -> None:
    if as_json:
        for r in results:
            print(dumps(r, ensure_ascii=False))
        return
    for i, r in enumerate(results, 1):
        extra = f" (score {r['score']:.4f})" if beam and r["score"] != r["logprob"] else ""
        what = "continuation" if beam else "sample"
        out.print(f"[bold]--- {what} {i} of {len(results)}: ln P = {r['logprob']:.4f}{extra}, "
                  f"{r['n_tokens']} tokens ---[/]")
        sys.stdout.flush()
        sys.stdout.write(prime + r["text"] + "\n")
        sys.stdout.flush()


def _warn_prime_oov(lm, prime: str) -> None:
    oov = lm.oov(prime)
    if not oov:
        return
    if lm.level == "word":
        words = " ".join(sorted(set(oov)))
        warn(f"{len(oov)} prime word(s) not in the model's vocabulary are fed as <unk>: {words}")
    else:
        chars = "".join(sorted(set(oov)))
        warn(f"{len(oov)} prime character(s) not in the model's vocabulary were skipped: {chars!r}")


def _check_threads(threads: Optional[int]) -> None:
    if threads is not None and threads <= 0:
        fail(f"--threads must be positive, got {threads}")


def score_cmd(
    text: Annotated[Optional[str], typer.Argument(help="The text to score; '-' reads standard input, one text per line, "
                                                       "each scored as soon as it is read.", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option(help="Read texts from this file, one per line.", show_default=False)] = None,
    nbest: Annotated[Optional[str], typer.Option(help="Rescore a Kaldi n-best list ('-': standard input): lines "
                                                      "'uttid-N w1 w2 ...' in, 'uttid-N cost' out, cost = -ln P.",
                                                 show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Leave out the end-of-sentence factor P(<eos> | text) "
                                                          "(the newline for character models).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="A table of factors for every text, not one line "
                                                                 "per text.")] = False,
    batch: Annotated[Optional[int], typer.Option(help="Texts scored side by side. Default: 64 from a file, 1 from "
                                                      "standard input (each line printed as soon as it is read).",
                                                 show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables (with --nbest: one object per "
                                                         "hypothesis).")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
):
    """Score text by the chain rule: P(W) = prod_k P(w_k | w_1..w_(k-1)), token by token.

    Each text starts from the begin-of-sentence context (the zero state with <eos>, or a newline for character
    models, fed first, like KenLM's <s>) and ends with the factor P(<eos> | the whole text) unless --no-eos.
    A word outside the vocabulary contributes P(<unk> | history) and counts as OOV; a character outside it is
    left out of the product and counted as OOV. One TEXT gets a table of its factors; texts from a file or
    standard input get one line each, printed as they are scored, then the totals (--verbose: a table each).
    """
    from ..lm.api import load
    try:
        _check_threads(threads)
        if batch is not None and batch <= 0:
            fail(f"--batch must be positive, got {batch}")
        if nbest is not None:
            if text is not None or file is not None:
                fail("give either --nbest or TEXT / --file, not both")
            _check_input(nbest, "n-best list")
            lines = _first_then_rest(nbest, "n-best list")  # an empty input is refused before loading
            return _score_nbest(load(model, threads=threads), lines, not no_eos, batch or (1 if nbest == "-" else 64),
                                as_json)
        source = _score_source(text, file)
        if source is None or as_json or verbose:
            texts = [text] if source is None else _read_lines(source)
            _score_whole(load(model, threads=threads), texts, not no_eos, as_json)
        else:
            lines = _first_then_rest(source, "input")
            _score_streamed(load(model, threads=threads), lines, not no_eos, batch or (1 if source == "-" else 64))
    except CharlmError as e:
        fail(str(e))


def _score_source(text: Optional[str], file: Optional[str]) -> Optional[str]:
    """The file to read texts from ('-': standard input), or None for the one TEXT."""
    if text is not None and file is not None:
        fail("give either TEXT or --file, not both")
    if file is not None:
        _check_input(file)
        return file
    if text == "-":
        from .. import dist
        if dist.launched() and dist.size() > 1:  # the launcher gives standard input to rank 0 alone
            fail("under mpiexec every process reads the texts: give them with --file FILE, not on standard input")
        return "-"
    if text is not None:
        return None
    fail("give a TEXT to score, '-' for standard input, --file FILE or --nbest FILE")


def _check_input(path: str, what: str = "input") -> None:
    """A missing, unreadable or empty file is refused before the model is loaded."""
    import os

    from ..data import check_text_file
    if path == "-":
        return
    check_text_file(path, what=what)
    if os.path.getsize(path) == 0:
        fail(f"no text to score: the {what} is empty")


def _first_then_rest(source: str, what: str):
    """The lines of source as an iterator, its first line already read (failing if there is none)."""
    import itertools

    from ..data.corpus import iter_lines
    lines = iter_lines(source, what=what)
    first = next(lines, None)
    if first is None:
        fail(f"no text to score: the {what} is empty")
    return itertools.chain([first], lines)


def _read_lines(source: str) -> list[str]:
    from ..data.corpus import iter_lines
    texts = list(iter_lines(source, what="input"))
    if not texts:
        fail("no text to score: the input is empty")
    return texts


def _score_whole(lm, texts: list[str], eos: bool, as_json: bool) -> None:
    """Per-token detail for every text: the JSON of score_many, or a table each."""
    from .render_score import print_score_json, print_score_tables
    result = lm.score_many(texts, eos=eos, details=not as_json)
    if len(texts) == 1 and result["texts"][0]["n_tokens"] == 0:  # not a perfect perplexity of 1
        from ..lm.score import NOTHING_TO_SCORE
        fail(NOTHING_TO_SCORE)
    if as_json:
        print_score_json(result)
    else:
        print_score_tables(result, word=lm.level == "word")


def _score_streamed(lm, texts, eos: bool, batch: int) -> None:
    """One line per text as it is scored, then the corpus totals; memory stays flat."""
    from ..lm.score import Tally
    from .render_score import print_score_line, print_score_total, score_header
    tally = Tally(lm.level)
    pending = []  # the texts of the batch being scored, to print beside their scores

    def remember():
        for t in texts:
            pending.append(t)
            yield t
    for r in lm.score_lines(remember(), eos, batch=batch, details=True):
        if not tally.n_texts:
            score_header(word=lm.level == "word")
        tally.add(r)
        print_score_line(r, pending.pop(0), word=lm.level == "word")
    if not tally.n_texts:
        fail("no text to score: the input is empty")
    print_score_total(tally.total())


def _score_nbest(lm, lines, eos: bool, batch: int, as_json: bool) -> None:
    """Kaldi's n-best rescoring: `uttid-N cost` per hypothesis, printed as scored."""
    for r in lm.rescore_nbest(lines, eos, batch=batch):
        print(dumps(r) if as_json else f"{r['id']} {r['cost']:.4f}", flush=True)


score_cmd.__doc__ = score_cmd.__doc__ + "\n\n" + PPL_HELP


def eval_cmd(
    file: Annotated[str, typer.Argument(help="Text file to evaluate ('-' reads standard input).", show_default=False)],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    streams: Annotated[int, typer.Option(help="Score the file as K contiguous parts side by side, for speed. Each part "
                                              "restarts from the zero state, so K > 1 is slightly pessimistic; "
                                              "1 is exact (the state is carried through the whole file).")] = 1,
    encoding: Annotated[str, typer.Option(help="Text encoding of the file.")] = "utf-8",
    errors: Annotated[str, typer.Option(help="Undecodable bytes: strict, replace or ignore.")] = "strict",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the summary.")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic evaluation (Mikolov's RNNLM -dynamic, Krause et "
        "al. 2018): the model keeps learning from the file as it reads it. Each window is scored with the current "
        "weights, then one SGD step is taken on that same window, and the next window is read with the state "
        "carried. Sequential by nature: one stream (--streams 1) and one process (refused under mpiexec). The "
        "checkpoint on disk is never changed.")] = False,
    dynamic_lr: Annotated[Optional[float], typer.Option("--dynamic-lr", help="With --dynamic: SGD learning rate of "
        "the step on each window's mean loss (gradient clipped to norm 1); 0 gives the static numbers. "
        "Default: 0.1.", show_default=False)] = None,
    dynamic_decay: Annotated[Optional[float], typer.Option("--dynamic-decay", help="With --dynamic: after each step "
        "pull the weights back towards the loaded ones by this fraction, in [0, 1) (Krause's decay). "
        "Default: 0 (none).", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="With --dynamic: tokens per window (one "
        "update each). Default: the model's training --seq-len.", show_default=False)] = None,
):
    """Perplexity (word models) or bits per character (character models) of a whole file.

    The file is one token sequence (one <eos> per line for word models, the newline characters for character
    models) scored from the begin context, the first input being <eos> (or a newline). With --dynamic the
    model adapts to the file as it goes (dynamic evaluation): usually a lower perplexity on long texts that
    repeat their names and phrases, at the cost of a backward pass per window on one stream.
    """
    from ..data import read_text
    from ..lm.api import load
    from .render_score import eval_progress, print_eval
    try:
        if streams <= 0:
            fail(f"--streams must be positive, got {streams}")
        _check_dynamic_flags(dynamic, dynamic_lr, dynamic_decay, seq_len, streams)
        text = read_text(file, encoding, errors, what="file")
        _check_threads(threads)
        lm = load(model, threads=threads)
        bar, advance = eval_progress(disable=as_json)
        extra = dict(dynamic=True, dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay or 0.0,
                     seq_len=seq_len) if dynamic else {}
        with bar:
            r = lm.evaluate_text(text, streams, progress=advance, details=not as_json, source=file, **extra)
        if dynamic and not as_json:
            out.print(f"dynamic evaluation: SGD lr {r['dynamic_lr']:g} after each window of {r['seq_len']} tokens, "
                      f"decay {r['dynamic_decay']:g} (the checkpoint is not changed)")
        print_eval(r, word=lm.level == "word", as_json=as_json)
    except CharlmError as e:
        fail(str(e))


def _check_dynamic_flags(dynamic: bool, lr: Optional[float], decay: Optional[float], seq_len: Optional[int],
                         streams: int) -> None:
    """The --dynamic flags, checked before the model is loaded, in the flags' own names."""
    if not dynamic:
        flags = (("--dynamic-lr", lr), ("--dynamic-decay", decay), ("--seq-len", seq_len))
        given = [f for f, v in flags if v is not None]
        if given:
            fail(f"{given[0]} applies to dynamic evaluation: add --dynamic")
        return
    import math
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        fail(f"--dynamic-lr must be a finite number >= 0 (0: static evaluation), got {lr}")
    if decay is not None and not 0 <= decay < 1:
        fail(f"--dynamic-decay must be in [0, 1) (0: no pull back), got {decay}")
    if seq_len is not None and seq_len <= 0:
        fail(f"--seq-len must be positive, got {seq_len}")
    if streams != 1:
        fail(f"--dynamic reads the file in order on one stream: drop --streams {streams}")
    from .. import dist
    if dist.launched() and dist.size() > 1:
        fail("--dynamic is sequential and runs in one process: run it without mpiexec")


eval_cmd.__doc__ = eval_cmd.__doc__ + "\n\n" + PPL_HELP

